"""
One WebSocket connection: the wire on one side, the registry on the other.

Commands go to the registry through ``defer.maybeDeferred``, so a registry may
answer later; while a command is pending, the connection's further input is
held and handled in order once it completes. In a session, each frame goes
straight to the partner through the link the registry handed over: no
decoding, parsing or logging on that path.
"""

from collections import deque

from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from signalling import wire
from signalling.interfaces import IPeer, SignallingError, UidTaken

_OPEN = WebSocketProtocol.STATE_OPEN
_TEXT = 1
_BINARY = 2

#: Close code and reason when no HELLO arrives in time (policy violation).
CLOSE_HELLO_TIMEOUT = 1008
#: Close code after an unexpected error in the server (internal error).
CLOSE_INTERNAL_ERROR = 1011


@implementer(IPeer)
class SignallingServerProtocol(WebSocketServerProtocol):
    """
    The server side of one signalling connection.

    Autobahn owns ``log``, ``state``, ``peer`` and friends, so our own state is
    prefixed with ``_``. Class-level defaults keep an idle connection small.
    """

    _log = Logger()

    #: uid once registered.
    _uid = None
    #: Partner's uid and relay callable while in a session.
    _partner_uid = None
    _link = None
    #: Room id while in a room.
    _room_id = None
    #: Input held while a command is pending (a deque), else None.
    _held = None
    #: True once we stop handling input (close sent or connection lost).
    _closing = False
    _closed = False
    _hello_call = None

    # Autobahn callbacks.

    def onOpen(self):
        """Start the deadline for the first message."""
        self._log.info("connection from {peer_addr}", peer_addr=self.peer)
        self.factory.connections.add(self)
        self._hello_call = self.factory.clock.callLater(
            self.factory.hello_timeout, self._hello_timed_out
        )

    def onMessage(self, payload, isBinary):
        """Relay in a session; otherwise handle the message as a command."""
        link = self._link
        if link is not None and self._held is None:
            link(payload, isBinary)
            return
        self._receive(payload, isBinary)

    def onClose(self, wasClean, code, reason):
        """Cancel timers and release everything this connection held."""
        self._closed = self._closing = True
        self._link = None
        self._held = None
        self.factory.connections.discard(self)
        if self._hello_call is not None:
            if self._hello_call.active():
                self._hello_call.cancel()
            self._hello_call = None
        # Autobahn leaves this timer running when the TCP connection ends
        # before the peer answered our close frame; it would hold this
        # connection for the whole close-handshake timeout.
        if self.closeHandshakeTimeoutCall is not None:
            self.closeHandshakeTimeoutCall.cancel()
            self.closeHandshakeTimeoutCall = None
        uid, self._uid = self._uid, None
        if uid is None:
            self._log.info(
                "connection from {peer_addr} closed (code {code})",
                peer_addr=self.peer,
                code=code,
            )
            return
        if self._room_id is not None:
            self._log.info(
                "peer {uid} left room {room_id}", uid=uid, room_id=self._room_id
            )
        self._log.info(
            "peer {uid} at {peer_addr} disconnected (code {code})",
            uid=uid,
            peer_addr=self.peer,
            code=code,
            room_id=self._room_id,
        )
        self._release(uid)

    # IPeer: what the registry does to this connection.

    def onAutoPingTimeout(self):
        """Count the keepalive timeout; Autobahn then drops the connection."""
        self.factory.stats.keepalive_timeouts += 1
        super().onAutoPingTimeout()

    def going_away(self):
        """Close for a server shutdown: code 1001, no message."""
        self._closing = True
        self._link = None
        if self.state == _OPEN:
            self.sendCloseFrame(code=1001, reasonUtf8=b"going away")

    def send_frame(self, payload, is_binary):
        """Relay one message to this connection, unless it is closing."""
        if self.state == _OPEN:
            stats = self.factory.stats
            stats.session_messages += 1
            stats.session_bytes += len(payload)
            self.sendFrame(_BINARY if is_binary else _TEXT, payload)

    def session_started(self, partner_uid, link, caller):
        """Start relaying to ``partner_uid``; the caller is told ``SESSION_OK``."""
        self._partner_uid = partner_uid
        if self.factory.log_payloads:
            link = self._logging_link(link, partner_uid)
        self._link = link
        if caller:
            self.factory.stats.sessions_started += 1
            self._send_text("SESSION_OK")
            self._log.info(
                "session from {uid} to {callee}", uid=self._uid, callee=partner_uid
            )

    def session_ended(self, partner_uid):
        """The partner left: close this connection too (1000, no message)."""
        self._log.info(
            "session of {uid} ended: {partner_uid} left",
            uid=self._uid,
            partner_uid=partner_uid,
        )
        # The registry has already released our uid.
        self._uid = None
        self._link = None
        self._closing = True
        if self.state == _OPEN:
            self.sendClose(1000)

    def room_joined(self, room_id, members):
        """Answer ``ROOM_OK`` with the members already there."""
        self._room_id = room_id
        self._send_text(wire.room_ok(members))
        self._log.info(
            "peer {uid} joined room {room_id}", uid=self._uid, room_id=room_id
        )

    def room_peer_joined(self, room_id, uid):
        """Tell this member that ``uid`` joined."""
        self._send_text(wire.room_peer_joined(uid))

    def room_peer_left(self, room_id, uid):
        """Tell this member that ``uid`` left."""
        self._send_text(wire.room_peer_left(uid))

    def room_message(self, sender_uid, payload):
        """Hand over a room member's message."""
        stats = self.factory.stats
        stats.room_messages += 1
        stats.room_bytes += len(payload.encode("utf-8"))
        if self.factory.log_payloads:
            self._log.info(
                "room message from {sender_uid} to {uid}: {payload}",
                sender_uid=sender_uid,
                uid=self._uid,
                payload=payload,
            )
        self._send_text(wire.room_peer_msg(sender_uid, payload))

    def _logging_link(self, link, partner_uid):
        """Wrap a session link to log each payload (``--log-payloads`` only)."""
        log, uid = self._log, self._uid

        def logged(payload, is_binary):
            log.info(
                "relay from {uid} to {partner_uid}: {payload}",
                uid=uid,
                partner_uid=partner_uid,
                payload=payload if is_binary else payload.decode("utf-8", "replace"),
            )
            link(payload, is_binary)

        return logged

    # Input.

    def _receive(self, payload, is_binary):
        if self._closing:
            return
        if self._held is not None:
            self._held.append((payload, is_binary))
            return
        if self._link is not None:
            self._link(payload, is_binary)
            return
        with self._log.failuresHandled(
            "while handling a message from {uid} at {peer_addr}",
            uid=self._uid,
            peer_addr=self.peer,
        ) as op:
            pending = self._command(payload, is_binary)
        if op.failed:
            self._fail()
        elif pending is not None and not pending.called:
            self._held = deque()
            pending.addBoth(self._resume)

    def _resume(self, result):
        """A command completed: handle the input that arrived meanwhile."""
        held, self._held = self._held, None
        while held:
            if self._held is not None:
                # Another command is pending; keep the rest behind it.
                self._held.extend(held)
                break
            self._receive(*held.popleft())
        return result

    def _command(self, payload, is_binary):
        """
        Handle one message outside a session.

        :returns: the Deferred of a registry call, or None when answered at once.
        """
        if self._uid is None:
            return self._hello(payload, is_binary)
        if is_binary:
            return self._send_error(wire.BINARY_OUTSIDE_SESSION, "binary_outside_session")
        command, rest = wire.split_command(payload.decode("utf-8"))
        registry = self.factory.registry
        if self._room_id is not None:
            if command == wire.ROOM_PEER_MSG:
                try:
                    target, message = wire.parse_room_peer_msg(rest)
                except wire.WireError as e:
                    return self._send_error(e.reason, e.kind)
                return self._call(registry.room_message, self._uid, target, message)
            if command == wire.ROOM_PEER_LIST:
                d = self._call(registry.room_members, self._uid)
                d.addCallback(self._send_peer_list)
                return d
            return self._send_error(wire.ALREADY_IN_ROOM, "already_in_room")
        if command == wire.SESSION:
            if not rest:
                return self._send_error(wire.SESSION_NEEDS_UID, "missing_arguments")
            return self._call(registry.start_session, self._uid, rest)
        if command == wire.ROOM:
            try:
                wire.check_room_id(rest)
            except wire.WireError as e:
                return self._send_error(e.reason, e.kind)
            return self._call(registry.join_room, self._uid, rest)
        if command in (wire.ROOM_PEER_MSG, wire.ROOM_PEER_LIST):
            return self._send_error(wire.NOT_IN_ROOM, "not_in_room")
        if command == wire.HELLO:
            return self._send_error(wire.ALREADY_REGISTERED, "already_registered")
        if not command:
            return self._send_error(wire.EMPTY_MESSAGE, "empty_message")
        return self._send_error(wire.unknown_command(command), "unknown_command")

    def _hello(self, payload, is_binary):
        if is_binary:
            return self._refuse(
                wire.BINARY_OUTSIDE_SESSION, wire.CLOSE_INVALID_PROTOCOL, "invalid_protocol"
            )
        command, uid = wire.split_command(payload.decode("utf-8"))
        if command != wire.HELLO:
            return self._refuse(
                wire.EXPECTED_HELLO, wire.CLOSE_INVALID_PROTOCOL, "invalid_protocol"
            )
        try:
            wire.check_uid(uid)
        except wire.WireError as e:
            return self._refuse(e.reason, wire.CLOSE_INVALID_UID, "invalid_uid")
        d = defer.maybeDeferred(self.factory.registry.register, uid, self)
        d.addCallbacks(self._registered, self._hello_failed, callbackArgs=(uid,))
        d.addErrback(self._unexpected)
        return d

    def _registered(self, _, uid):
        if self._closed:
            # The connection went away while the registry worked.
            self._release(uid)
            return
        self._uid = uid
        if self._hello_call is not None and self._hello_call.active():
            self._hello_call.cancel()
        self._hello_call = None
        self._send_text(wire.HELLO)
        self._log.info(
            "peer {uid} registered from {peer_addr}", uid=uid, peer_addr=self.peer
        )

    def _hello_failed(self, failure):
        failure.trap(UidTaken)
        self._refuse(wire.reason_for(failure.value), wire.CLOSE_INVALID_UID, "uid_taken")

    def _call(self, method, *args):
        """Run one registry command; its domain errors become ``ERROR`` lines."""
        d = defer.maybeDeferred(method, *args)
        d.addErrback(self._command_failed)
        return d

    def _command_failed(self, failure):
        if failure.check(SignallingError):
            self._send_error(wire.reason_for(failure.value), wire.kind_for(failure.value))
        else:
            self._unexpected(failure)

    def _send_peer_list(self, members):
        if members is not None:
            self._send_text(wire.room_peer_list(members))

    def _unexpected(self, failure):
        self._log.failure(
            "unexpected error for {uid} at {peer_addr}",
            failure,
            uid=self._uid,
            peer_addr=self.peer,
        )
        self._fail()

    # Output and closing.

    def _send_text(self, text):
        # sendFrame, not sendMessage: the incoming size limit must not apply
        # to what we send (a relayed room message carries a prefix).
        if self.state == _OPEN:
            self.sendFrame(_TEXT, text.encode("utf-8"))

    def _send_error(self, reason, kind):
        self.factory.stats.error_sent(kind)
        self._log.info(
            "refused a request from {uid} at {peer_addr}: {reason}",
            uid=self._uid,
            peer_addr=self.peer,
            reason=reason,
        )
        self._send_text(wire.error(reason))

    def _refuse(self, reason, close_reason, kind):
        """Refuse the first message: ``ERROR``, then close with 1002."""
        self.factory.stats.hello_rejected(kind)
        self._log.info(
            "refused HELLO from {peer_addr}: {reason}", peer_addr=self.peer, reason=reason
        )
        self._closing = True
        self._send_text(wire.error(reason))
        if self.state == _OPEN:
            # sendClose() refuses 1002, which the protocol mandates here.
            self.sendCloseFrame(code=1002, reasonUtf8=close_reason.encode("utf-8"))

    def _hello_timed_out(self):
        self._hello_call = None
        if self._uid is None and not self._closing:
            self._log.info("no HELLO from {peer_addr} in time", peer_addr=self.peer)
            self.factory.stats.hello_rejected("hello_timeout")
            self._closing = True
            if self.state == _OPEN:
                self.sendCloseFrame(code=CLOSE_HELLO_TIMEOUT, reasonUtf8=b"no HELLO in time")

    def _fail(self):
        """Close this one connection after an unexpected error."""
        self._closing = True
        self._link = None
        if self.state == _OPEN:
            self.sendCloseFrame(code=CLOSE_INTERNAL_ERROR, reasonUtf8=b"internal error")

    def _release(self, uid):
        d = defer.maybeDeferred(self.factory.registry.remove, uid, self)
        d.addErrback(
            lambda f: self._log.failure("while removing {uid}", f, uid=uid)
        )

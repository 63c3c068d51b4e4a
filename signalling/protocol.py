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
from autobahn.websocket.utf8validator import Utf8Validator
from autobahn.websocket.xormasker import create_xor_masker
from OpenSSL import SSL
from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from zope.interface import implementer

from signalling import wire
from signalling.interfaces import IPeer, SignallingError, UidTaken
from signalling.tls import tls_failure_reason

_OPEN = WebSocketProtocol.STATE_OPEN
_CLOSED = WebSocketProtocol.STATE_CLOSED
_TEXT = 1
_BINARY = 2

#: First header byte of an unfragmented text and binary frame (FIN set, no
#: RSV bits): the only frames the fast receive path takes.
_FIN_TEXT = 0x80 | _TEXT
_FIN_BINARY = 0x80 | _BINARY
#: Payloads up to this size are unmasked with Python's big integers, which
#: beat Autobahn's masker (a cffi object per frame) below a couple of KiB.
_SMALL_UNMASK = 2048

_from_bytes = int.from_bytes


def _unmask(payload, mask):
    """:returns: ``payload`` XORed with the 4-byte ``mask`` (RFC 6455 5.3)."""
    n = len(payload)
    if n > _SMALL_UNMASK:
        return create_xor_masker(mask, n).process(payload)
    key = mask * ((n >> 2) + 1)
    return (_from_bytes(payload, "little") ^ _from_bytes(key[:n], "little")).to_bytes(
        n, "little"
    )


class _FactoryOption:
    """
    An Autobahn protocol option read from the factory, where Autobahn would
    copy every option onto each connection (29 entries in each instance's
    dictionary). A non-data descriptor: an option set on one connection
    still lands in its own dictionary and wins.
    """

    __slots__ = ("_name",)

    def __init__(self, name):
        self._name = name

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        return getattr(instance.factory, self._name)


class _CreatedOnUse:
    """
    A per-connection object made on first use and then kept in the
    instance's dictionary; until then the connection does not pay for it.
    """

    __slots__ = ("_name", "_make")

    def __init__(self, name, make):
        self._name = name
        self._make = make

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        value = instance.__dict__[self._name] = self._make()
        return value


class _SendQueue:
    """
    Autobahn's queue of chopped or synchronous writes, which this server never
    makes: a ``deque`` (over 700 bytes) only once something is queued.
    """

    __slots__ = ("items",)

    def __init__(self):
        self.items = None

    def __len__(self):
        return len(self.items) if self.items else 0

    def append(self, item):
        if self.items is None:
            self.items = deque()
        self.items.append(item)

    def popleft(self):
        if not self.items:
            raise IndexError("pop from an empty queue")
        return self.items.popleft()


#: Attributes of Autobahn's server handshake that nothing reads once the
#: connection is open; dropped then (several hundred bytes of request text
#: and headers per connection).
_HANDSHAKE_LEFTOVERS = frozenset(
    (
        "http_request_data",
        "http_response_data",
        "http_status_line",
        "http_headers",
        "http_headers_cnt",
        "http_request_uri",
        "http_request_path",
        "http_request_params",
        "http_request_host",
        "websocket_origin",
        "websocket_protocols",
        "websocket_extensions",
        "_wskey",
    )
)

#: Autobahn's per-connection flags and timers whose value is the same on
#: every new connection; as class attributes they cost nothing until one
#: changes (Autobahn then sets it on the instance, as before).
_AUTOBAHN_DEFAULTS = {
    "_perMessageCompress": None,
    "trackedTimings": None,
    "send_state": WebSocketProtocol.SEND_STATE_GROUND,
    "triggered": False,
    "wasMaxFramePayloadSizeExceeded": False,
    "wasMaxMessagePayloadSizeExceeded": False,
    "closedByMe": False,
    "failedByMe": False,
    "droppedByMe": False,
    "wasClean": False,
    "wasNotCleanReason": None,
    "wasOpenHandshakeTimeout": False,
    "wasCloseHandshakeTimeout": False,
    "wasServingFlashSocketPolicyFile": False,
    "localCloseCode": None,
    "localCloseReason": None,
    "remoteCloseCode": None,
    "remoteCloseReason": None,
    "openHandshakeTimeoutCall": None,
    "closeHandshakeTimeoutCall": None,
    "autoPingTimeoutCall": None,
    "autoPingPending": None,
    "autoPingPendingSeq": 0,
    "autoPingPendingSent": None,
    "inside_message": False,
    "current_frame": None,
    "websocket_protocol_in_use": None,
    "data": b"",
}


def _frame_header(opcode_byte, length):
    """:returns: the header of an unmasked server frame of ``length`` bytes."""
    if length < 126:
        return bytes((opcode_byte, length))
    if length < 0x10000:
        return bytes((opcode_byte, 126)) + length.to_bytes(2, "big")
    return bytes((opcode_byte, 127)) + length.to_bytes(8, "big")

#: The frame size limit when neither Autobahn limit is set.
_NO_LIMIT = 1 << 63

#: Largest HTTP request head (request line and headers) an opening handshake
#: may send; a longer one is refused with 431 rather than buffered.
MAX_REQUEST_HEAD = 16 * 1024


def asks_for_websocket(head):
    """
    :param head: an HTTP request head, without the blank line that ends it.
    :returns: whether it asks for a WebSocket upgrade (an ``Upgrade`` header
        naming ``websocket``), which is all it takes to go to the WebSocket
        side rather than the web pages.
    """
    for line in head.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"upgrade" and b"websocket" in value.lower():
            return True
    return False


#: Close code and reason when no HELLO arrives in time (policy violation).
CLOSE_HELLO_TIMEOUT = 1008
#: What the log says of a connection closed because the server stops.
SHUTDOWN_CAUSE = "the server is shutting down"
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

    # Per-connection memory: Autobahn's options come from the factory (see
    # _FactoryOption), so there is nothing for _connectionMade to copy (and
    # pretty-print for a debug line, a tenth of the CPU of a call set-up).
    # The options themselves and _AUTOBAHN_DEFAULTS are set on the class
    # below it.
    CONFIG_ATTRS = ()
    utf8validator = _CreatedOnUse("utf8validator", Utf8Validator)

    #: uid once registered.
    _uid = None
    #: Partner's uid and relay callable while in a session.
    _partner_uid = None
    _link = None
    #: Room id while in a room.
    _room_id = None
    #: ``(uid, partner_uid)`` once the partner ended our session.
    _ended = None
    #: Input held while a command is pending (a deque), else None.
    _held = None
    #: True once we stop handling input (close sent or connection lost).
    _closing = False
    _closed = False
    #: True once the registry was told to let go of our uid, session and room.
    _released = False
    _hello_call = None
    #: Aborts the transport if a closing connection outlives its bound.
    _drop_call = None
    #: True when why the connection ended was logged already (TLS failures).
    _close_logged = False
    #: Why the server closed this connection, for the log, when the close
    #: frame's reason does not say it.
    _cause = None

    # Autobahn callbacks.

    #: False where frame or octet logging, or masking, needs Autobahn's own
    #: send path; decided once per connection, not per relayed message.
    _plain_writes = True

    # Autobahn's entry points below build the arguments of debug log lines
    # (type names, highlighted values) on every call, whether or not debug
    # logging is on: about 4 % of the CPU of a call set-up, and part of every
    # read on the relay path. These overrides do the same work without them.

    def dataReceived(self, data):
        self._dataReceived(data)

    def onConnect(self, request):
        """Accept every upgrade, with no subprotocol."""
        return None

    def _connectionMade(self):
        WebSocketProtocol._connectionMade(self)
        self.factory.countConnections += 1
        self.send_queue = _SendQueue()
        if self.logFrames or self.logOctets or self.maskServerFrames:
            self._plain_writes = False
        # Made on first use (a cffi object), and never by the fast path.
        self.__dict__.pop("utf8validator", None)

    def processHandshake(self):
        """
        Parse the opening handshake once the request head is complete; hand a
        plain HTTP request (no WebSocket upgrade) to the factory's web site.

        WebSocket upgrades are parsed once, by Autobahn, rather than by
        twisted.web first and Autobahn again; and no twisted.web channel stays
        behind as the transport's producer for the life of the connection.
        """
        data = self.data
        end = data.find(b"\r\n\r\n", 0, MAX_REQUEST_HEAD + 4)
        if end < 0:
            if len(data) >= MAX_REQUEST_HEAD + 4:
                self.failHandshake("Request header fields too large", 431)
            return
        web = self.factory.web
        if web is not None and not asks_for_websocket(data[:end]):
            self._hand_over_to_web(web)
            return
        WebSocketServerProtocol.processHandshake(self)

    def _hand_over_to_web(self, web):
        """
        Give the connection, and the bytes read so far, to a protocol of the
        ``web`` factory (twisted.web's HTTP channel); this protocol is done.
        """
        transport = self.transport
        channel = web.buildProtocol(transport.getPeer())
        if channel is None:
            # The site refuses the connection (a factory may).
            self.dropConnection(abort=True)
            return
        if self.openHandshakeTimeoutCall is not None:
            self.openHandshakeTimeoutCall.cancel()
            self.openHandshakeTimeoutCall = None
        # What _connectionLost would do: this connection never was a WebSocket.
        self.state = _CLOSED
        self.factory.countConnections -= 1
        data, self.data = self.data, b""
        if isinstance(transport, ProtocolWrapper):
            # TLS: the transport is the TLS layer, which wraps this protocol.
            transport.wrappedProtocol = channel
        else:
            transport.protocol = channel
        self.transport = None
        channel.makeConnection(transport)
        channel.dataReceived(data)

    def connectionLost(self, reason):
        """
        Log a failed TLS handshake once, at info level and in plain words,
        instead of Autobahn's error line; then tear the connection down.
        """
        if isinstance(reason.value, SSL.Error):
            if not self._close_logged:
                self._log.info(
                    "TLS with {peer_addr} failed: {reason}",
                    peer_addr=self.peer,
                    reason=tls_failure_reason(reason.value),
                )
            self._close_logged = True
            self._connectionLost(reason)
            return
        WebSocketServerProtocol.connectionLost(self, reason)

    def quiet_close(self):
        """The TLS layer logged why this connection ends; onClose need not."""
        self._close_logged = True

    def _connectionLost(self, reason):
        if self._drop_call is not None:
            if self._drop_call.active():
                self._drop_call.cancel()
            self._drop_call = None
        WebSocketProtocol._connectionLost(self, reason)
        self.factory.countConnections -= 1

    def sendCloseFrame(self, code=None, reasonUtf8=None, isReply=False):
        """
        Send a close frame (ours, or the reply to the peer's); from then on
        the connection holds nothing in the registry: its partner and room
        are told now, not when the peer gets round to closing its side.
        """
        WebSocketServerProtocol.sendCloseFrame(self, code, reasonUtf8, isReply)
        if self.state != _OPEN:
            self._let_go()

    def dropConnection(self, abort=False):
        """
        Close the transport, gracefully after a complete close handshake.
        A graceful close is bounded too: TLS waits for the peer's
        ``close_notify``, which a peer that stopped reading never sends, so
        the transport is aborted after ``close_timeout``.
        """
        if abort and self.wasClean:
            # The close handshake is complete; what we wrote last (our close
            # frame, when both sides closed at once) must still reach the
            # peer, which an abort would throw away.
            abort = False
        was_closed = self.state == _CLOSED
        WebSocketServerProtocol.dropConnection(self, abort)
        self._let_go()
        if (
            not abort
            and not was_closed
            and self.transport is not None
            and self._drop_call is None
        ):
            self._drop_call = self.factory.clock.callLater(
                self.factory.close_timeout, self._abort
            )

    def _abort(self):
        self._drop_call = None
        if self.transport is not None:
            self.transport.abortConnection()

    def _let_go(self):
        """
        Stop handling input and release our uid, session and room, once,
        whatever the reason the connection ends.
        """
        if self._released:
            return
        self._released = self._closing = True
        self._link = None
        self._held = None
        if self._hello_call is not None:
            if self._hello_call.active():
                self._hello_call.cancel()
            self._hello_call = None
        if self._uid is not None:
            self._release(self._uid)

    def _compact(self):
        """
        Rebuild this connection's attribute dictionary without what the class
        already provides (a dictionary never shrinks by itself).
        """
        d = self.__dict__
        defaults = _AUTOBAHN_DEFAULTS
        self.__dict__ = {
            k: v
            for k, v in d.items()
            if k not in _HANDSHAKE_LEFTOVERS and not (k in defaults and v is defaults[k])
        }

    def onOpen(self):
        """Start the deadline for the first message."""
        # Once, when the handshake has left its last attribute behind.
        self._compact()
        # Logged when it registers or closes: one line fewer per connection.
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
        """Cancel timers, release everything this connection held, log why."""
        self._closed = True
        self._let_go()
        self.factory.connections.discard(self)
        # Autobahn leaves this timer running when the TCP connection ends
        # before the peer answered our close frame; it would hold this
        # connection for the whole close-handshake timeout.
        if self.closeHandshakeTimeoutCall is not None:
            self.closeHandshakeTimeoutCall.cancel()
            self.closeHandshakeTimeoutCall = None
        code, cause = self._close_cause(code)
        uid, self._uid = self._uid, None
        if uid is None:
            ended = self._ended
            if self._close_logged:
                pass
            elif ended is None:
                self._log.info(
                    "connection from {peer_addr} closed (code {code}, {cause})",
                    peer_addr=self.peer,
                    code=code,
                    cause=cause,
                )
            else:
                self._log.info(
                    "peer {uid} at {peer_addr} disconnected (code {code}): "
                    "{partner_uid} ended the session",
                    uid=ended[0],
                    partner_uid=ended[1],
                    peer_addr=self.peer,
                    code=code,
                    cause=cause,
                )
            return
        if self._room_id is None:
            self._log.info(
                "peer {uid} at {peer_addr} disconnected (code {code}, {cause})",
                uid=uid,
                peer_addr=self.peer,
                code=code,
                cause=cause,
                partner_uid=self._partner_uid,
            )
        else:
            self._log.info(
                "peer {uid} at {peer_addr} disconnected (code {code}, {cause}), "
                "leaving room {room_id}",
                uid=uid,
                peer_addr=self.peer,
                code=code,
                cause=cause,
                room_id=self._room_id,
            )

    def _close_cause(self, code):
        """
        :param code: the close code Autobahn reports (the peer's, or 1006).
        :returns: ``(code, cause)`` for the log: the code of the close frame
            that started the close, and who started it and why.
        """
        if self._cause is not None:
            return (self.localCloseCode or code), self._cause
        if self.closedByMe and self.localCloseCode is not None:
            reason = (self.localCloseReason or b"").decode("utf-8", "replace")
            return self.localCloseCode, f"closed by the server: {reason}" if reason else (
                "closed by the server"
            )
        if self.remoteCloseCode is not None:
            return self.remoteCloseCode, "closed by the peer"
        if self.wasNotCleanReason:
            return code, self.wasNotCleanReason
        return code, "connection lost"

    def processData(self):
        """
        Take every complete, unfragmented, masked text or binary frame at the
        front of the input in one loop, and hand each to :meth:`onMessage`.

        This is what Autobahn's ``processData``, ``onFrameBegin``,
        ``onFrameData``, ``onFrameEnd`` and ``onMessageEnd`` do for such a
        frame, with a frame and message object and half a dozen calls fewer
        per frame. Everything else goes to Autobahn unchanged, and so does any
        frame this loop does not accept as it stands: a control frame, a
        fragment, a frame not yet complete, one over the size limit (Autobahn
        closes with 1009), and a text frame that is not valid UTF-8 (Autobahn
        finds the same error and closes with 1007). Frames are handled in
        order, and each one once: the loop stops at the first frame it leaves
        to Autobahn.
        """
        if (
            self.state != _OPEN
            or self.current_frame is not None
            or self.inside_message
            or self._perMessageCompress is not None
            or self.logFrames
            or not self.requireMaskedClientFrames
            or self.failedByMe
        ):
            return WebSocketServerProtocol.processData(self)
        data = self.data
        end_of_data = len(data)
        pos = 0
        limit = self.maxMessagePayloadSize
        frame_limit = self.maxFramePayloadSize
        if limit <= 0 or 0 < frame_limit < limit:
            limit = frame_limit if frame_limit > 0 else _NO_LIMIT
        validate = self.utf8validateIncoming
        traffic = self.trafficStats
        # Frames for the session partner, written to it together when the
        # loop ends: one write (over TLS, one record) instead of one each.
        partner = self._batch_partner()
        batch = []
        try:
            while end_of_data - pos >= 6:
                first = data[pos]
                second = data[pos + 1]
                if (first != _FIN_TEXT and first != _FIN_BINARY) or second < 0x80:
                    break
                length = second & 0x7F
                if length < 126:
                    start = pos + 6
                elif length == 126:
                    if end_of_data - pos < 8:
                        break
                    length = (data[pos + 2] << 8) | data[pos + 3]
                    if length < 126:
                        break
                    start = pos + 8
                else:
                    break
                end = start + length
                if end > end_of_data or length > limit:
                    break
                payload = data[start:end]
                if length:
                    payload = _unmask(payload, data[start - 4 : start])
                if first == _FIN_TEXT and validate and not payload.isascii():
                    try:
                        payload.decode("utf-8")
                    except UnicodeDecodeError:
                        break
                pos = end
                traffic.incomingOctetsWebSocketLevel += length
                traffic.incomingOctetsAppLevel += length
                traffic.incomingWebSocketFrames += 1
                traffic.incomingWebSocketMessages += 1
                if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
                    self._cancelAutoPingTimeoutCall()
                if partner is not None and self._held is None:
                    batch.append((first, payload))
                    continue
                if batch:
                    partner.send_frames(batch)
                    batch = []
                self.onMessage(payload, first == _FIN_BINARY)
                if self._listeners is not None:
                    self._fire_message(payload, first == _FIN_BINARY)
                if self.state != _OPEN:
                    break
                # A command may have started or ended a session.
                partner = self._batch_partner()
        finally:
            if pos:
                self.data = data[pos:]
            if batch:
                partner.send_frames(batch)
        if not pos:
            return WebSocketServerProtocol.processData(self)
        return len(self.data) > 0

    def _batch_partner(self):
        """
        :returns: the session partner, when our link is its own
            ``send_frame`` and frames for it may be batched (``send_frames``);
            else None. Not while ``onMessage`` is a subclass's, which must see
            every message, nor while ``on("message")`` has observers.
        """
        link = self._link
        if (
            link is None
            or getattr(link, "__func__", None) is not _SEND_FRAME
            or self._listeners is not None
            or type(self).onMessage is not _ON_MESSAGE
        ):
            return None
        return link.__self__

    def _fire_message(self, payload, is_binary):
        """Tell ``on("message")`` observers, as Autobahn's ``onMessageEnd`` does."""
        d = self.fire("message", payload, is_binary=is_binary)
        d.addErrback(
            lambda f: self.log.error("Firing signal 'message' failed: {fail}", fail=f)
        )

    # IPeer: what the registry does to this connection.

    def onAutoPingTimeout(self):
        """Count the keepalive timeout; Autobahn then drops the connection."""
        self.factory.stats.keepalive_timeouts += 1
        super().onAutoPingTimeout()

    def going_away(self):
        """Close for a server shutdown: code 1001, no message."""
        self._cause = SHUTDOWN_CAUSE
        self._closing = True
        self._link = None
        if self.state == _OPEN:
            self.sendCloseFrame(code=1001, reasonUtf8=b"going away")
        else:
            self._let_go()

    def send_frame(self, payload, is_binary):
        """Relay one message to this connection, unless it is closing."""
        self.send_frames(((_FIN_BINARY if is_binary else _FIN_TEXT, payload),))

    def send_frames(self, frames):
        """
        Relay messages, ``(first header byte, payload)`` each, in one write,
        unless this connection is closing.
        """
        if self.state == _OPEN:
            stats = self.factory.stats
            stats.session_messages += len(frames)
            stats.session_bytes += sum(len(payload) for _, payload in frames)
            self._write_frames(frames)

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
        """
        The partner left: close this connection too (1000, no message). The
        line logged when it has closed names both.
        """
        # The registry has already released our uid.
        uid, self._uid = self._uid, None
        self._link = None
        self._closing = True
        if self.factory.shutting_down:
            # Every connection is being closed: this one for that reason.
            self.going_away()
            return
        self._ended = (uid, partner_uid)
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
        """Tell this member that ``uid`` left (not while every member is
        being closed for a shutdown)."""
        if not self.factory.shutting_down:
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
        if self._released:
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
        # A frame, not sendMessage: the incoming size limit must not apply
        # to what we send (a relayed room message carries a prefix).
        if self.state == _OPEN:
            self._write_frames(((_FIN_TEXT, text.encode("utf-8")),))

    def _write_frames(self, frames):
        """
        Send unfragmented data frames, ``(first header byte, payload)`` each,
        in one write; the caller checked the state.

        What Autobahn's ``sendFrame`` and ``sendData`` do for such frames,
        without their generality: the headers are built here and the frames
        go to the transport together, with Autobahn's traffic counts kept.
        Whatever needs Autobahn's own path (a queued or chopped write
        pending, frame or octet logging, masking) still takes it.
        """
        if self.send_queue.items or not self._plain_writes:
            for first, payload in frames:
                self.sendFrame(first & 0x0F, payload)
            return
        parts = []
        for first, payload in frames:
            parts.append(_frame_header(first, len(payload)))
            parts.append(payload)
        data = b"".join(parts)
        self.transport.write(data)
        traffic = self.trafficStats
        traffic.outgoingWebSocketFrames += len(frames)
        traffic.outgoingOctetsWireLevel += len(data)

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


#: What a session link is when the registry hands over a partner's own
#: ``send_frame``: then frames can be batched for it (``send_frames``).
_SEND_FRAME = SignallingServerProtocol.send_frame
_ON_MESSAGE = SignallingServerProtocol.onMessage

for _name in WebSocketServerProtocol.CONFIG_ATTRS:
    setattr(SignallingServerProtocol, _name, _FactoryOption(_name))
for _name, _value in _AUTOBAHN_DEFAULTS.items():
    setattr(SignallingServerProtocol, _name, _value)
del _name, _value

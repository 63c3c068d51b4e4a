"""
The signalling logic of one connection, without Autobahn or sockets.

A :class:`Connection` takes each message as it arrives (:meth:`received`),
asks the registry, and writes through an
:class:`signalling.core.interfaces.IConnectionOutput`; the registry reaches it as
an :class:`signalling.core.interfaces.IPeer`, and its session partner through
:attr:`Connection.receiver` (an :class:`signalling.core.interfaces.ILink`). The
WebSocket protocol (``signalling.server.protocol``) only adapts Autobahn to it.

It keeps the protocol's ordering rules under every order of answers and
notifications the registry contract allows (``signalling.core.interfaces``):

- While a command is pending, further input is held, and handled in order
  once the command is complete. ``SESSION`` and ``ROOM`` are complete when
  their notification (``session_started`` for the caller, ``room_joined``)
  has arrived, or they failed; ``HELLO`` when its result has.
- While a reply is owed (``HELLO``, ``SESSION_OK``, ``ROOM_OK``), what
  others cause here (relayed messages, room notices and messages, the close
  that ends a session) waits, in arrival order, and follows the reply.
- A request that fails because a crossed call made this peer a callee
  meanwhile is relayed to the new partner, like any input in a session.
"""

import enum
from collections import deque

from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from signalling.core import wire
from signalling.core.interfaces import (
    BINARY_FRAME,
    AlreadyEngaged,
    TEXT_FRAME,
    UidTaken,
    IConnectionOutput,
    ILink,
    IPeer,
    SignallingError,
    Unavailable,
)

#: Close codes the connection asks for.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
#: A policy violation: no HELLO in time, a peer too slow to read.
CLOSE_POLICY_VIOLATION = 1008
CLOSE_HELLO_TIMEOUT = CLOSE_POLICY_VIOLATION
#: An unexpected error in the server (internal error).
CLOSE_INTERNAL_ERROR = 1011

#: The close reason of a HELLO for a uid the connection's token does not allow.
NOT_ALLOWED_CLOSE = "not allowed by the token"

#: Commands refused for the rate in a row before the connection is closed.
RATE_STRIKES = 20

#: Bytes of input a connection may have held while a command is pending (a
#: registry answer, a Redis round trip, a reclaim probe): past it, reading
#: stops until the held input is handled, and TCP pushes back on the peer.
#: At least one message is always held, whatever its size.
MAX_HELD_INPUT = 64 * 1024
#: The reason reading is paused for while that much is held.
HELD_INPUT = "held input"

#: Why reading from a peer is paused when it does not read what is sent to
#: it (its other reasons are the server's own: a partner that does not read,
#: a turn of reading used up).
OWN_OUTPUT = "own output"

#: What the log says of a connection closed because the server stops.
SHUTDOWN_CAUSE = "the server is shutting down"
#: ... and of one whose uid a new connection took over.
REPLACED_CAUSE = "silent, replaced by a new connection for its uid"
#: ... and of one whose peer did not read what was sent to it.
TOO_SLOW_CAUSE = "too slow to read what is sent to it"
#: ... and of one the backend can no longer serve (a cluster node lost Redis).
UNAVAILABLE_CAUSE = "the cluster lost Redis"

class Phase(enum.Enum):
    """
    Where a connection of the examples' dialect stands; its transitions are
    :data:`_NEXT`, taken in :meth:`Connection._enter` alone. (Whether it is
    closing is every dialect's concern: ``ConnectionCommon._closing``.)
    """

    #: No uid yet: waiting for ``HELLO``, or for its answer.
    HELLO = "hello"
    #: Registered, in no session and no room.
    IDLE = "idle"
    #: In a session (possibly called before its ``HELLO`` was answered).
    SESSION = "session"
    #: In a room.
    ROOM = "room"
    #: Its partner ended its session; the registry let its uid go.
    ENDED = "ended"


#: The phases each phase may go on to. A backend may tell of a session's
#: end before its start (the two come from different peers): a session can
#: end from any phase but a room, and its start told late changes nothing.
_NEXT = {
    Phase.HELLO: frozenset({Phase.IDLE, Phase.SESSION, Phase.ENDED}),
    Phase.IDLE: frozenset({Phase.SESSION, Phase.ROOM, Phase.ENDED}),
    Phase.SESSION: frozenset({Phase.ENDED}),
    Phase.ROOM: frozenset(),
    Phase.ENDED: frozenset(),
}

#: What the log says of a connection that is gone, by the phase it was in.
_LOST_LOG = {
    Phase.HELLO: "connection from {peer_addr} closed (code {code}, {cause})",
    Phase.IDLE: "peer {uid} at {peer_addr} disconnected (code {code}, {cause})",
    Phase.SESSION: "peer {uid} at {peer_addr} disconnected (code {code}, {cause})",
    Phase.ROOM: "peer {uid} at {peer_addr} disconnected (code {code}, {cause}), "
    "leaving room {room_id}",
    Phase.ENDED: "peer {uid} at {peer_addr} disconnected (code {code}): "
    "{partner_uid} ended the session",
}

# Kinds of pending command.
_HELLO = "hello"
_SESSION = "session"
_ROOM = "room"
_LIST = "list"
_OTHER = "other"
#: Commands that owe a reply which what others cause here must follow.
_GATED = (_HELLO, _SESSION, _ROOM)


def examples_token_allows(grant):
    """
    :returns: whether a token is for the examples' dialect: not one that
        names JSON roles alone (a stream viewer's), which would otherwise
        let its holder register any uid it likes.
    """
    return grant.roles is None or any(
        claim is not None for claim in (grant.uid, grant.rooms, grant.calls)
    )


def take_token(connection, clock, settings):
    """
    Take a token from ``connection``'s bucket of commands (its ``_tokens``,
    ``_tokens_at`` and ``_strikes``): ``settings.command_burst`` tokens,
    refilled at ``settings.command_rate`` a second.

    :returns: True if there was one; else the refusals in a row are counted
        in ``_strikes``.
    """
    now = clock.seconds()
    burst = settings.command_burst
    tokens = connection._tokens
    if tokens is None:
        tokens = burst
    else:
        tokens = min(burst, tokens + (now - connection._tokens_at) * settings.command_rate)
    connection._tokens_at = now
    if tokens >= 1:
        connection._tokens = tokens - 1
        connection._strikes = 0
        return True
    connection._tokens = tokens
    connection._strikes += 1
    return False


class _Pending:
    """
    A command in progress: what it is, the message it came from, its uid;
    whether its result (``answered``) and, for ``SESSION`` and ``ROOM``, its
    notification (``notified``) have arrived.
    """

    __slots__ = (
        "kind", "payload", "is_binary", "uid", "answered", "notified", "engaged", "reclaimed"
    )

    def __init__(self, kind, payload, is_binary, uid=None):
        self.kind = kind
        self.payload = payload
        self.is_binary = is_binary
        self.uid = uid
        self.answered = False
        self.notified = False
        #: Refused because a crossed call engaged this peer; its
        #: ``session_started`` is on the way.
        self.engaged = False
        #: A HELLO that tried to reclaim its uid from a silent holder once.
        self.reclaimed = False


@implementer(ILink)
class _LoggingLink:
    """A session link that logs each payload (``--log-payloads`` only)."""

    _log = Logger(namespace="signalling.core.connection")

    def __init__(self, link, uid, partner_uid):
        self._link = link
        self._uid = uid
        self._partner_uid = partner_uid

    def send_frames(self, frames):
        for first, payload in frames:
            self._log.info(
                "relay from {uid} to {partner_uid}: {payload}",
                uid=self._uid,
                partner_uid=self._partner_uid,
                payload=payload if first == BINARY_FRAME else payload.decode("utf-8", "replace"),
            )
        self._link.send_frames(frames)

    def set_backpressure(self, active):
        self._link.set_backpressure(active)


@implementer(IConnectionOutput)
class _Withdrawn:
    """The output of a withdrawn connection's logic: it writes nowhere."""

    grant = None

    def __init__(self, peer_addr):
        self.peer_addr = peer_addr

    def send_text(self, text):
        pass

    def send_frames(self, frames):
        pass

    def probe(self, timeout):
        return defer.succeed(False)

    def pause_reading(self, reason):
        pass

    def resume_reading(self, reason):
        pass

    def close(self, code, reason=None):
        pass


class ConnectionCommon:
    """
    What the connections of every dialect do alike: input held while a
    command waits, the command rate, flow control, closing for the server's
    own reasons, letting go of their id, and unexpected errors. A subclass
    provides ``opened()``, ``_handle(payload, is_binary)``, a ``_pending``
    that is true while a command waits, and ``_error_text(reason)``: a
    refusal in its words.

    :param shared: what the connections of a server share (the WebSocket
        factory): ``registry`` (an
        :class:`signalling.core.interfaces.IRegistry`), ``clock`` (an
        ``IReactorTime``), ``stats`` (a
        :class:`signalling.server.metrics.Stats`), ``settings`` (a
        :class:`signalling.server.settings.ServerSettings`) and
        ``shutting_down``.
    :param output: the :class:`signalling.core.interfaces.IConnectionOutput`.

    :ivar uid: the peer's id once registered (welcomed), else None.
    :ivar cause: why the server closed the connection, for the log, when
        the close frame's reason does not say it.
    """

    __slots__ = (
        "_shared",
        "_output",
        "_stats",
        "uid",
        "cause",
        "_held",
        "_held_bytes",
        "_queued",
        "_closing",
        "_released",
        "_resuming",
        "_tokens",
        "_tokens_at",
        "_strikes",
        "__weakref__",
    )
    _log = Logger()

    def __init__(self, shared, output):
        self._shared = shared
        self._output = output
        self._stats = shared.stats
        self.uid = None
        self.cause = None
        #: Input held while a request is pending (a deque), else None, and
        #: its size in bytes.
        self._held = None
        self._held_bytes = 0
        #: ``(method, *args)`` held while a reply is owed, else None.
        self._queued = None
        #: True once we stop handling input.
        self._closing = False
        #: True once the registry was told to let go of our id.
        self._released = False
        self._resuming = False
        #: The command rate's token bucket: tokens left (None: full), when
        #: counted, and commands refused in a row.
        self._tokens = None
        self._tokens_at = 0.0
        self._strikes = 0

    @property
    def _settings(self):
        """The server's :class:`signalling.server.settings.ServerSettings`."""
        return self._shared.settings

    # Input.

    def received(self, payload, is_binary):
        """
        One message arrived: handle it, or hold it while a command is
        pending (reading stops once :data:`MAX_HELD_INPUT` bytes are held).
        """
        if self._closing:
            return
        if self._pending:
            held = self._held
            if held is None:
                held = self._held = deque()
            held.append((payload, is_binary))
            self._held_bytes += len(payload)
            if self._held_bytes >= MAX_HELD_INPUT:
                self._output.pause_reading(HELD_INPUT)
            return
        self._handle(payload, is_binary)

    def _resume(self):
        """Handle the input that arrived while a command was pending, in order."""
        if self._resuming:
            return  # the loop below goes on
        self._resuming = True
        try:
            held = self._held
            while held and not self._pending and not self._closing:
                payload, is_binary = held.popleft()
                self._held_bytes -= len(payload)
                self._handle(payload, is_binary)
            if self._held is not None and not self._held:
                self._held = None
            if self._held_bytes < MAX_HELD_INPUT:
                self._output.resume_reading(HELD_INPUT)
        finally:
            self._resuming = False

    def _drop_held(self):
        """The connection is ending: what is held is never handled."""
        self._held = None
        self._held_bytes = 0

    # Closing.

    #: The session link every message goes to as it arrives, for the fast
    #: path (a dialect with sessions overrides it); None: none.
    relay_link = None

    def closing(self):
        """
        The connection is ending, for whatever reason: stop handling input
        and release its id (and what the registry holds for it), once.
        """
        if self._released:
            return
        self._released = self._closing = True
        self._drop_held()
        self._queued = None
        self._let_go()
        if self.uid is not None:
            self._release(self.uid)

    def _let_go(self):
        """The connection is ending: let go of what the dialect holds (a hook)."""

    def asked(self, question):
        """A question handed over by the registry's ``ask``: none is taken (a hook)."""
        return None

    def withdraw(self):
        """
        The connection goes on in another dialect (an auto port welcomed it
        for its silence, then its first message was another dialect's): let
        go of everything as for a close, and write nothing more to the
        connection: what the registry still tells this peer goes nowhere.
        """
        self.closing()
        self.uid = None
        self._output = _Withdrawn(self._output.peer_addr)

    def lost(self, code, cause, log=True):
        """
        The connection is gone: let go (if not done yet) and log it.

        :param code: the close code the server sent, else the peer's.
        :param cause: who closed it and why.
        :param log: False when why it ended was logged already.
        """
        self.closing()
        uid, self.uid = self.uid, None
        if log:
            self._log_lost(uid, code, self.cause or cause)

    #: What the log calls a peer that closed before it had an id.
    _unregistered = "(not registered)"

    def _log_lost(self, uid, code, cause):
        self._log.info(
            "peer {uid} at {peer_addr} disconnected (code {code}, {cause})",
            uid=uid or self._unregistered,
            peer_addr=self._output.peer_addr,
            code=code,
            cause=cause,
        )

    def _send_text(self, text):
        self._output.send_text(text)

    def _send_error(self, reason, kind):
        """Refuse a request: count it, log it, and answer in the dialect's words (``_error_text``)."""
        self._stats.error_sent(kind)
        self._log.info(
            "refused a request from {uid} at {peer_addr}: {reason}",
            uid=self.uid,
            peer_addr=self._output.peer_addr,
            reason=reason,
        )
        self._send_text(self._error_text(reason))

    def _close_for(self, cause, code, reason):
        """Stop handling input and close with ``code`` and ``reason`` (``cause`` for the log)."""
        self.cause = cause
        self._closing = True
        self._stop_relaying()
        self._output.close(code, reason)

    def unavailable(self):
        """IPeer: the backend removed us, as it cannot serve us now: close with 1013."""
        self._close_for(UNAVAILABLE_CAUSE, wire.CLOSE_TRY_AGAIN_LATER, "try again later")
    #: The reason a command past the rate is refused with.
    rate_limited = wire.RATE_LIMITED

    def _stop_relaying(self):
        """The connection is ending: relay nothing more (a hook)."""

    def _partner_backpressure(self, blocked):
        """Our peer stopped reading (or caught up): hold back whoever feeds it (a hook)."""

    def _rate_allows(self):
        """
        Take a token from the connection's bucket (``command_burst`` tokens,
        refilled at ``command_rate`` a second). Without one the command is
        refused with :attr:`rate_limited`; after :data:`RATE_STRIKES`
        refusals in a row the connection is closed with 1008.
        """
        if take_token(self, self._shared.clock, self._shared.settings):
            return True
        if self._strikes > RATE_STRIKES:
            self._stats.error_sent("rate_limited")
            self._close_for(
                "went on past the rate limit", CLOSE_POLICY_VIOLATION, "rate limit exceeded"
            )
        else:
            self._send_error(self.rate_limited, "rate_limited")
        return False

    def output_changed(self, blocked):
        """
        The peer stopped reading what is sent to it (``blocked``), or caught
        up. While it does not read, its own input is not read either (it
        cannot pile up replies), and neither is its session partner's.
        """
        if blocked:
            self._output.pause_reading(OWN_OUTPUT)
        else:
            self._output.resume_reading(OWN_OUTPUT)
        self._partner_backpressure(blocked)

    def too_slow(self):
        """
        More is waiting for the peer than the server keeps for one that does
        not read (room messages from many senders): close it with 1008, and
        its room is told as for any close.
        """
        if self._closing:
            return
        self._stats.error_sent("too_slow")
        self._close_for(TOO_SLOW_CAUSE, CLOSE_POLICY_VIOLATION, "too slow to read")

    def going_away(self):
        """Close for a server shutdown: code 1001."""
        self._close_for(SHUTDOWN_CAUSE, CLOSE_GOING_AWAY, "going away")

    def token_ended(self, code, reason):
        """The connection's token expired or was revoked: close with ``code`` and ``reason``."""
        self._close_for(f"closed by the server: {reason}", code, reason)

    def _unexpected(self, failure):
        self._log.failure(
            "unexpected error for {uid} at {peer_addr}",
            failure,
            uid=self.uid,
            peer_addr=self._output.peer_addr,
        )
        self._fail()

    def _fail(self):
        """Close this one connection after an unexpected error."""
        self._close_for(self.cause, CLOSE_INTERNAL_ERROR, "internal error")

    def _release(self, uid):
        d = defer.maybeDeferred(self._shared.registry.remove, uid, self)
        d.addErrback(lambda f: self._log.failure("while removing {uid}", f, uid=uid))


class _CommandOrder(ConnectionCommon):
    """
    The ordering rules of the examples' commands (see the module's
    docstring): a command is pending from its registry call until its
    result (and, for ``SESSION`` and ``ROOM``, its notification) came;
    meanwhile input is held and what others cause here waits for the
    reply. :class:`Connection` is the rest of the dialect.
    """

    __slots__ = ()

    def _start(self, kind, payload, is_binary, method, *args, uid=None):
        """
        Ask the registry; the command is pending until :meth:`_complete`.
        What others cause here waits until a gated command's reply is out.
        """
        pending = self._pending = _Pending(kind, payload, is_binary, uid)
        if kind in _GATED and self._queued is None:
            self._queued = []
        self._ask(pending, method, *args)

    def _ask(self, pending, method, *args):
        """Call the registry for ``pending``; its answer goes to :meth:`_answered` or :meth:`_refused`."""
        try:
            result = method(*args)
        except SignallingError:
            # Answered at once (the in-memory registry): no Deferred needed.
            self._refused(Failure(), pending)
            return
        except Exception:
            self._unexpected(Failure())
            return
        if isinstance(result, defer.Deferred):
            result.addCallbacks(
                self._answered, self._refused, callbackArgs=(pending,), errbackArgs=(pending,)
            )
            result.addErrback(self._unexpected)
        else:
            self._answered(result, pending)

    def _answered(self, result, pending):
        if pending.kind == _HELLO and self._released:
            # The connection went away while the registry worked.
            self._release(pending.uid)
            return
        if pending is not self._pending or self._released:
            return  # completed by its notification already
        kind = pending.kind
        if kind == _HELLO:
            self._registered(pending)
        elif kind == _LIST:
            if result is not None:
                self._send_text(wire.room_peer_list(result))
            self._complete(pending)
        elif kind == _OTHER:
            self._complete(pending)
        else:
            # SESSION and ROOM: complete once their notification came too.
            pending.answered = True
            if pending.notified:
                self._complete(pending)

    def _refused(self, failure, pending):
        if not failure.check(SignallingError):
            return failure
        if pending is not self._pending or self._released:
            return None
        error = failure.value
        if pending.notified:
            # Its notification came, so it did take effect.
            self._complete(pending)
            return None
        if pending.kind == _HELLO:
            if isinstance(error, UidTaken) and not pending.reclaimed:
                pending.reclaimed = True
                if self._reclaim(pending):
                    return None
            if isinstance(error, Unavailable):
                self._refuse(
                    wire.reason_for(error),
                    "try again later",
                    wire.kind_for(error),
                    code=wire.CLOSE_TRY_AGAIN_LATER,
                )
                return None
            self._refuse(wire.reason_for(error), wire.CLOSE_INVALID_UID, wire.kind_for(error))
            return None
        if self.link is not None:
            # A crossed call made this peer a callee while its request was on
            # its way: in a session, every message is relayed, this one too.
            self._relay_pending(pending)
            return None
        if isinstance(error, AlreadyEngaged) and self.phase is not Phase.ROOM:
            # Engaged, though no session_started came yet: a crossed call's
            # is on its way (the contract says every peer hears of its
            # session). The request is relayed once it comes.
            pending.engaged = True
            return None
        self._send_error(wire.reason_for(error), wire.kind_for(error))
        self._complete(pending)
        return None

    def _notified(self, kind):
        """
        The notification a ``SESSION`` or ``ROOM`` command waits for came,
        and its reply went out: what waited for the reply follows. The
        command is complete once its result has come too (held input is
        never handled inside a registry call).
        """
        pending = self._pending
        if pending is None or pending.kind != kind:
            return
        pending.notified = True
        self._open_gate()
        if pending.answered:
            self._complete(pending)

    def _reclaim(self, pending):
        """
        Our ``HELLO``'s uid is taken: if its holder (on this node) has gone
        silent, take the uid over. A token for the uid takes it at once;
        else, with a ``reclaim_timeout``, the holder is pinged, and if no pong comes back within the
        server's ``reclaim_timeout`` it is closed (its partner and room are
        told as for any close) and the uid registered again for us.

        :returns: False when there is nothing to try (the HELLO is refused).
        """
        timeout = self._settings.reclaim_timeout
        grant = self._output.grant
        owner = grant is not None and grant.uid == pending.uid
        if not (timeout or owner):
            return False
        holder = self._shared.registry.peer_of(pending.uid)
        if holder is None or holder is self:
            return False
        alive = defer.succeed(False) if owner else holder.probe(timeout)
        alive.addCallback(self._reclaimed, holder, pending)
        alive.addErrback(self._unexpected)
        return True

    def _reclaimed(self, alive, holder, pending):
        if pending is not self._pending or self._released:
            return
        if alive:
            self._refuse(
                wire.reason_for(UidTaken(pending.uid)), wire.CLOSE_INVALID_UID, UidTaken.kind
            )
            return
        self._log.info(
            "peer {uid}: its connection at {old_addr} is silent, taken over from {peer_addr}",
            uid=pending.uid,
            old_addr=holder.peer_addr,
            peer_addr=self._output.peer_addr,
        )
        holder.replaced()
        self._ask(pending, self._shared.registry.register, pending.uid, self)

    def _relay_pending(self, pending):
        self.link.send_frames(
            ((BINARY_FRAME if pending.is_binary else TEXT_FRAME, pending.payload),)
        )
        self._complete(pending)

    def _registered(self, pending):
        if self.phase is not Phase.ENDED:
            # Unless a partner ended a session this uid was called into
            # before our answer came: then the registry has let it go.
            self.uid = pending.uid
        if self.phase is Phase.HELLO:
            self._enter(Phase.IDLE)
        self._cancel_hello_call()
        self._send_text(wire.HELLO)
        self._log.info(
            "peer {uid} registered from {peer_addr}",
            uid=pending.uid,
            peer_addr=self._output.peer_addr,
        )
        self._complete(pending)

    def _hello_uid(self):
        pending = self._pending
        return pending.uid if pending is not None and pending.kind == _HELLO else None

    def _open_gate(self):
        """The reply owed went out: what others caused here meanwhile follows, in order."""
        queued, self._queued = self._queued, None
        if queued:
            for method, *args in queued:
                method(*args)

    def _complete(self, pending):
        """The command is done: what waited for its reply follows, then held input."""
        if pending is not self._pending:
            return
        self._pending = None
        if self._queued is not None:
            self._open_gate()
        if self._held:
            self._resume()


@implementer(IPeer, ILink)
class Connection(_CommandOrder):
    """
    One signalling connection's state and logic.

    :param shared: what the connections of a server share (see
        :class:`ConnectionCommon`).
    :param output: the :class:`signalling.core.interfaces.IConnectionOutput`.

    :ivar uid: the registered uid, or None.
    :ivar partner_uid: the session partner's uid, or None.
    :ivar room_id: the room's id, or None.
    :ivar link: the :class:`signalling.core.interfaces.ILink` to the session
        partner, or None.
    """

    _log = Logger()

    __slots__ = (
        "phase",
        "partner_uid",
        "room_id",
        "link",
        "_ended_uid",
        "_pending",
        "_hello_call",
    )

    def __init__(self, shared, output):
        super().__init__(shared, output)
        #: Where the connection stands (:class:`Phase`).
        self.phase = Phase.HELLO
        self.partner_uid = None
        self.room_id = None
        self.link = None
        #: The uid it had when its partner ended its session.
        self._ended_uid = None
        #: The command in progress (a _Pending), else None.
        self._pending = None
        self._hello_call = None

    @property
    def receiver(self):
        """What the registry hands our session partner: this connection (an ILink)."""
        return self

    def __repr__(self):
        return f"<Connection {self.uid or '?'} at {self._output.peer_addr}>"

    # What happens on the wire.

    def opened(self):
        """The WebSocket is open: start the deadline for ``HELLO``."""
        self._hello_call = self._shared.clock.callLater(
            self._settings.hello_timeout, self._hello_timed_out
        )

    def _handle(self, payload, is_binary):
        """Relay one message in a session; else handle it as a command."""
        link = self.link
        if link is not None:
            link.send_frames(((BINARY_FRAME if is_binary else TEXT_FRAME, payload),))
            return
        # What Logger.failuresHandled does, without a context manager and a
        # closure made for every command.
        uid, peer_addr = self.uid, self._output.peer_addr
        try:
            self._command(payload, is_binary)
        except BaseException:
            self._log.failure(
                "while handling a message from {uid} at {peer_addr}",
                level=LogLevel.critical,
                uid=uid,
                peer_addr=peer_addr,
            )
            self._fail()

    @property
    def relay_link(self):
        """
        The link every message goes to as it arrives (in a session, with no
        command pending and nothing held), for the fast path; else None.
        """
        if self._pending is None and self._held is None and not self._closing:
            return self.link
        return None

    def _let_go(self):
        """The connection is ending: its session link and HELLO deadline go."""
        if self.link is not None:
            # Whatever this connection held back on its partner is let go.
            self.link.set_backpressure(False)
        self.link = None
        self._cancel_hello_call()

    def _enter(self, phase):
        """Go on to ``phase``: the one place the phase changes (see :data:`_NEXT`)."""
        if phase not in _NEXT[self.phase]:
            raise RuntimeError(f"{self!r}: no way from {self.phase.name} to {phase.name}")
        self.phase = phase

    def _log_lost(self, uid, code, cause):
        phase = self.phase
        if phase is Phase.ENDED:
            uid = self._ended_uid
        elif uid is None:
            # Called before its HELLO was answered, then gone: it never
            # registered.
            phase = Phase.HELLO
        self._log.info(
            _LOST_LOG[phase],
            uid=uid,
            peer_addr=self._output.peer_addr,
            code=code,
            cause=cause,
            partner_uid=self.partner_uid,
            room_id=self.room_id,
        )

    def _stop_relaying(self):
        link, self.link = self.link, None
        if link is not None:
            # Whatever this connection held back on its partner is let go
            # now: closing() no longer finds the link.
            link.set_backpressure(False)

    def _partner_backpressure(self, blocked):
        # The session behaves like the TCP stream it stands for.
        link = self.link
        if link is not None:
            link.set_backpressure(blocked)

    def set_backpressure(self, active):
        """ILink: our partner cannot keep up; stop (or resume) reading our input."""
        if active:
            self._output.pause_reading("partner")
        else:
            self._output.resume_reading("partner")

    # IPeer and ILink: what the registry and the partner do to this connection.

    def send_frames(self, frames):
        """Relay messages from the session partner to this connection."""
        if self._queued is not None:
            self._queued.append((self.send_frames, frames))
            return
        stats = self._stats
        stats.session_messages += len(frames)
        stats.session_bytes += sum(len(payload) for _, payload in frames)
        self._output.send_frames(frames)

    def session_started(self, partner_uid, link, caller):
        """Start relaying to ``partner_uid``; the caller is told ``SESSION_OK``."""
        if self.phase is not Phase.ENDED:
            self._enter(Phase.SESSION)
        self.partner_uid = partner_uid
        if self._settings.log_payloads:
            link = _LoggingLink(link, self.uid or self._hello_uid(), partner_uid)
        self.link = link
        if not caller:
            pending = self._pending
            if pending is not None and pending.engaged:
                # The request that crossed this call is relayed now.
                self._relay_pending(pending)
            return
        self._stats.sessions_started += 1
        self._send_text(wire.SESSION_OK)
        self._log.info("session from {uid} to {callee}", uid=self.uid, callee=partner_uid)
        self._notified(_SESSION)

    def session_ended(self, partner_uid):
        """
        The partner left, and the registry removed this peer too: close this
        connection (1000, no message), or 1001 while the server stops.
        """
        uid = self.uid if self.uid is not None else self._hello_uid()
        self.uid = None
        self.link = None
        self._closing = True
        if self._shared.shutting_down:
            # Every connection is being closed: this one for that reason.
            self.going_away()
            return
        self._enter(Phase.ENDED)
        self._ended_uid = uid
        self._close_normally()

    def _close_normally(self):
        if self._queued is not None:
            self._queued.append((self._close_normally,))
            return
        self._output.close(CLOSE_NORMAL)

    def room_joined(self, room_id, members):
        """Answer ``ROOM_OK`` with the members already there."""
        self._enter(Phase.ROOM)
        self.room_id = room_id
        self._send_text(wire.room_ok(members))
        self._log.info("peer {uid} joined room {room_id}", uid=self.uid, room_id=room_id)
        self._notified(_ROOM)

    def room_peer_joined(self, room_id, uid):
        """Tell this member that ``uid`` joined."""
        if self._queued is not None:
            self._queued.append((self.room_peer_joined, room_id, uid))
            return
        self._send_text(wire.room_peer_joined(uid))

    def room_peer_left(self, room_id, uid):
        """
        Tell this member that ``uid`` left (not while every member is being
        closed for a shutdown).
        """
        if self._queued is not None:
            self._queued.append((self.room_peer_left, room_id, uid))
            return
        if not self._shared.shutting_down:
            self._send_text(wire.room_peer_left(uid))

    def room_message(self, sender_uid, payload):
        """Hand over a room member's message."""
        if self._queued is not None:
            self._queued.append((self.room_message, sender_uid, payload))
            return
        stats = self._stats
        stats.room_messages += 1
        stats.room_bytes += len(payload.encode("utf-8"))
        if self._settings.log_payloads:
            self._log.info(
                "room message from {sender_uid} to {uid}: {payload}",
                sender_uid=sender_uid,
                uid=self.uid,
                payload=payload,
            )
        self._send_text(wire.room_peer_msg(sender_uid, payload))

    # Commands.

    def _command(self, payload, is_binary):
        """Handle one message outside a session."""
        if not self._rate_allows():
            return
        phase = self.phase
        if phase is Phase.HELLO:
            self._hello(payload, is_binary)
            return
        if is_binary:
            self._send_error(wire.BINARY_OUTSIDE_SESSION, "binary_outside_session")
            return
        command, rest = wire.split_command(payload.decode("utf-8"))
        registry = self._shared.registry
        if phase is Phase.ROOM:
            if command == wire.ROOM_PEER_MSG:
                try:
                    target, message = wire.parse_room_peer_msg(rest)
                except wire.WireError as e:
                    self._send_error(e.reason, e.kind)
                    return
                self._start(_OTHER, payload, is_binary, registry.room_message, self.uid, target, message)
            elif command == wire.ROOM_PEER_LIST:
                self._start(_LIST, payload, is_binary, registry.room_members, self.uid)
            else:
                self._send_error(wire.ALREADY_IN_ROOM, "already_in_room")
            return
        grant = self._output.grant
        if command == wire.SESSION:
            if not rest:
                self._send_error(wire.SESSION_NEEDS_UID, "missing_arguments")
                return
            if grant is not None and not grant.allows_call(rest):
                self._send_error(wire.not_allowed("a call to", rest), "not_allowed")
                return
            self._start(_SESSION, payload, is_binary, registry.start_session, self.uid, rest)
        elif command == wire.ROOM:
            try:
                wire.check_room_id(rest)
            except wire.WireError as e:
                self._send_error(e.reason, e.kind)
                return
            if grant is not None and not grant.allows_room(rest):
                self._send_error(wire.not_allowed("room", rest), "not_allowed")
                return
            self._start(_ROOM, payload, is_binary, registry.join_room, self.uid, rest)
        elif command in (wire.ROOM_PEER_MSG, wire.ROOM_PEER_LIST):
            self._send_error(wire.NOT_IN_ROOM, "not_in_room")
        elif command == wire.HELLO:
            self._send_error(wire.ALREADY_REGISTERED, "already_registered")
        elif not command:
            self._send_error(wire.EMPTY_MESSAGE, "empty_message")
        else:
            self._send_error(wire.unknown_command(command), "unknown_command")

    def _hello(self, payload, is_binary):
        if is_binary:
            self._refuse(
                wire.BINARY_OUTSIDE_SESSION, wire.CLOSE_INVALID_PROTOCOL, "invalid_protocol"
            )
            return
        command, uid = wire.split_command(payload.decode("utf-8"))
        if command != wire.HELLO:
            self._refuse(wire.EXPECTED_HELLO, wire.CLOSE_INVALID_PROTOCOL, "invalid_protocol")
            return
        try:
            wire.check_uid(uid)
        except wire.WireError as e:
            self._refuse(e.reason, wire.CLOSE_INVALID_UID, "invalid_uid")
            return
        grant = self._output.grant
        if grant is not None and not examples_token_allows(grant):
            self._refuse(
                wire.not_allowed("the protocol", "examples"), NOT_ALLOWED_CLOSE, "not_allowed"
            )
            return
        if grant is not None and not grant.allows_uid(uid):
            self._refuse(wire.not_allowed("uid", uid), NOT_ALLOWED_CLOSE, "not_allowed")
            return
        self._start(_HELLO, payload, is_binary, self._shared.registry.register, uid, self, uid=uid)

    def probe(self, timeout):
        """IPeer: is the peer still there? (a Deferred firing True or False)"""
        return self._output.probe(timeout)

    @property
    def peer_addr(self):
        return self._output.peer_addr

    def replaced(self):
        """IPeer: a new connection took our uid over: close with 1008."""
        self._close_for(REPLACED_CAUSE, CLOSE_POLICY_VIOLATION, "replaced by a new connection")

    # Output and closing.

    #: The ``ERROR`` line of a refusal.
    _error_text = staticmethod(wire.error)

    def _refuse(self, reason, close_reason, kind, code=CLOSE_PROTOCOL_ERROR):
        """Refuse the first message: ``ERROR``, then close with ``code`` (1002)."""
        self._stats.hello_rejected(kind)
        self._log.info(
            "refused HELLO from {peer_addr}: {reason}",
            peer_addr=self._output.peer_addr,
            reason=reason,
        )
        self._closing = True
        self._send_text(wire.error(reason))
        self._output.close(code, close_reason)

    def _hello_timed_out(self):
        self._hello_call = None
        if self.phase is Phase.HELLO and not self._closing:
            self._log.info("no HELLO from {peer_addr} in time", peer_addr=self._output.peer_addr)
            self._stats.hello_rejected("hello_timeout")
            self._closing = True
            self._output.close(CLOSE_HELLO_TIMEOUT, "no HELLO in time")

    def _cancel_hello_call(self):
        if self._hello_call is not None:
            if self._hello_call.active():
                self._hello_call.cancel()
            self._hello_call = None

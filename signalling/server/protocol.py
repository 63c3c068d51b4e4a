"""
The signalling protocol on a WebSocket connection: Autobahn's callbacks
adapted to the per-connection logic, which holds the protocol itself, one
class per dialect (the factory's :class:`signalling.core.dialects.DialectTable`
says which). A port pinned to one dialect starts it at once; on an ``auto``
port the first message chooses, and a silent connection gets the dialect
whose clients wait for the server (JSON).

How long "silent" is, on an auto port: the server pings the client with its
``101`` and measures the pong. The examples' clients send ``HELLO`` from
their open callback, which their WebSocket library calls on the ``101``,
before or about when it answers the ping that follows it; a JSON client
sends nothing. So a connection that said nothing by the pong plus a margin
(the settings' ``dialect_margin``, 10 ms by default, or the round trip the
pong measured when that is longer) is welcomed as JSON. The round trip is the application's, through any
proxy, and it grows with a slow or loaded client, whose ``HELLO`` is late
too. A client that answers no ping is welcomed after ``dialect_wait``. Should
a first message of another dialect come after the welcome all the same (a
client that sends ``HELLO`` late), the connection switches to that dialect:
the JSON peer is withdrawn, and the client has had one stray line. Its
address is remembered for a while (:class:`signalling.server.policy.LateSpeakers`):
its next connections get the whole ``dialect_wait``.

:class:`SignallingServerProtocol` runs on the fast WebSocket layer,
:class:`PlainSignallingServerProtocol` on Autobahn's own paths; the factory
chooses (``fast_path``). Both behave the same on the wire.
"""

import os

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from signalling.core.connection import OWN_OUTPUT, SHUTDOWN_CAUSE
from signalling.core.dialects import AUTO
from signalling.core.interfaces import IConnectionOutput
from signalling.server.auth import CLOSE_TOKEN, TOKEN_EXPIRED, TOKEN_REVOKED
from signalling.server.websocket import FastServerProtocol, ServerProtocol, _OPEN


_log = Logger(namespace="signalling.core.connection.Connection")

#: The ping an auto port sends with its ``101``: its pong measures the
#: client's round trip, its own processing included.
DIALECT_PING = b"dialect?"
#: When the wait is over but input waits unread: seconds before looking
#: again, and how many times (then the connection is welcomed as JSON).
DIALECT_RECHECK = 0.05
DIALECT_RECHECKS = 100


class _Switchable:
    """What ``_choosing`` is while a connection welcomed for its silence may still switch."""

    def cancel(self):
        pass


_SWITCHABLE = _Switchable()

#: The metrics label of each close for a token.
_TOKEN_LABELS = {TOKEN_EXPIRED: "expired", TOKEN_REVOKED: "revoked"}


@implementer(IConnectionOutput)
class _Signalling:
    """
    The adapter, on either WebSocket layer: Autobahn's callbacks go to the
    connection's logic, and the connection's output goes to the wire.

    :ivar connection: the connection's logic (its dialect's class), once the
        WebSocket is open and its dialect known.
    """

    connection = None
    #: On an auto port: the timer that starts the silent connection's
    #: dialect unless a first message chooses (its arguments say whether
    #: the dialect ping went, and when: ``(rechecks, pinged_at or None)``);
    #: then :data:`_SWITCHABLE` from a welcome for silence to the first
    #: message. One key of the connection's dictionary for all of it (a key
    #: more can double the dictionary's size, for the connection's life).
    _choosing = None
    #: ``(payload, [Deferred], timer)`` while a probe waits for its pong.
    _probe = None
    #: Bytes written while the peer was not reading (output_blocked).
    _unread = 0
    #: Closes the connection when its token expires (with tokens only).
    _token_call = None

    @property
    def peer_addr(self):
        return self.peer

    # Autobahn callbacks.

    def onOpen(self):
        """
        Start the connection's logic in the dialect the path is pinned to;
        else wait for the first message a short while (the examples' clients
        send ``HELLO`` at once, JSON clients wait for ``welcome``).
        """
        factory = self.factory
        settings = factory.settings
        dialect = settings.dialect_for(self.http_request_path)
        self.compact()
        # Logged when it registers or closes: one line fewer per connection.
        factory.connections.add(self)
        if self.grant is not None:
            if factory.policy.revoked(self.grant):
                # Its secret went (SIGHUP) while the handshake completed.
                self.token_ended(TOKEN_REVOKED)
                return
            self._token_call = factory.clock.callLater(
                max(0.0, self.grant.expires - factory.clock.seconds()),
                self.token_ended,
                TOKEN_EXPIRED,
            )
        if dialect == AUTO:
            clock = factory.clock
            pinged_at = None
            late = factory.late_speakers
            # (The client's address is worked out only when some spoke late.)
            if not late or self._client_host() not in late:
                pinged_at = clock.seconds()
                self.sendPing(DIALECT_PING)
            self._choosing = clock.callLater(settings.dialect_wait, self._waited, 0, pinged_at)
        else:
            self._begin(settings.dialects[dialect])

    def _ponged(self):
        """
        The dialect ping's pong came back before a first message: the
        connection is silent if nothing comes within the margin.
        """
        call = self._choosing
        rtt = self.factory.clock.seconds() - call.args[1]
        # The same timer, moved (a cancelled one would stay in the reactor's
        # heap until its time, a peak's worth of them in memory).
        call.args = (0, None)
        call.reset(max(self.factory.settings.dialect_margin, rtt))

    def _waited(self, rechecks, pinged_at):
        """
        The wait is over with no first message handled: begin the dialect
        whose clients wait for the server (JSON), unless input already came
        and waits to be read (a loaded server reaches timers before the
        input of the same moment); then look again a little later, for a
        bounded time.
        """
        if rechecks < DIALECT_RECHECKS and self.has_unread_input():
            self._choosing = self.factory.clock.callLater(
                DIALECT_RECHECK, self._waited, rechecks + 1, None
            )
            return
        self._begin(self.factory.settings.dialects.for_silence, switchable=True)

    def _begin(self, dialect, switchable=False):
        """
        Start the connection's logic in ``dialect``; ``switchable``: begun
        for the connection's silence (its first message may switch it).
        """
        if switchable:
            self._choosing = _SWITCHABLE
        else:
            # Back to the class default: one key fewer in the dictionary.
            self.__dict__.pop("_choosing", None)
        self.connection = dialect.connection(self.factory, self)
        self.connection.opened()

    def onMessage(self, payload, isBinary):
        """Every message goes to the connection's logic (the first may choose it)."""
        connection = self.connection
        if connection is None:
            if self._choosing is None:
                return  # closed already
            self._choosing.cancel()
            dialects = self.factory.settings.dialects
            self._begin(dialects.for_first_message(payload, isBinary) or dialects.for_silence)
            connection = self.connection
        elif self._choosing is _SWITCHABLE:
            self.__dict__.pop("_choosing", None)
            connection = self._switch(connection, payload, isBinary)
        connection.received(payload, isBinary)

    def _switch(self, connection, payload, is_binary):
        """
        The first message of a connection welcomed for its silence: if it
        is another dialect's, withdraw the connection from the one it was
        welcomed in and begin that one.

        :returns: the connection's logic from now on.
        """
        dialects = self.factory.settings.dialects
        dialect = dialects.for_first_message(payload, is_binary)
        if dialect is None or dialect is dialects.for_silence:
            return connection
        connection.withdraw()
        self.factory.stats.dialect_switched(dialect.label)
        self.factory.late_speakers.remember(self._client_host())
        _log.info(
            "connection from {peer_addr} switched to the {dialect} dialect: its first "
            "message came after it was welcomed as silent (its address gets the "
            "whole --dialect-wait for a while)",
            peer_addr=self.peer,
            dialect=dialect.name,
        )
        self._begin(dialect)
        return self.connection

    def onClose(self, wasClean, code, reason):
        """Release everything this connection held, and log why it ended."""
        connections = self.factory.connections
        was_open = self in connections
        connections.discard(self)
        # Autobahn leaves this timer running when the TCP connection ends
        # before the peer answered our close frame; it would hold this
        # connection for the whole close-handshake timeout.
        if self.closeHandshakeTimeoutCall is not None:
            self.closeHandshakeTimeoutCall.cancel()
            self.closeHandshakeTimeoutCall = None
        connection = self.connection
        if connection is None:
            if was_open and not self.close_logged:
                # It closed before its first message chose a dialect.
                code, cause = self.close_cause(code)
                if self.factory.shutting_down:
                    cause = SHUTDOWN_CAUSE
                _log.info(
                    "connection from {peer_addr} closed (code {code}, {cause})",
                    peer_addr=self.peer,
                    code=code,
                    cause=cause,
                )
            return
        code, cause = self.close_cause(code)
        connection.lost(code, cause, log=not self.close_logged)

    def _client_host(self):
        """The client's address without its port (the forwarded one behind a trusted proxy)."""
        peer = self.peer
        if peer.startswith(("tcp4:", "tcp6:")):
            return peer[5:].rpartition(":")[0]
        return peer

    def onPong(self, payload):
        if payload == DIALECT_PING:
            call = self._choosing
            if self.connection is None and call is not None and call.args[1] is not None:
                self._ponged()
            return
        probe = self._probe
        if probe is not None and payload == probe[0]:
            self._end_probe(True)

    def probe(self, timeout):
        """
        IConnectionOutput: ping the peer now; the Deferred fires True if its
        pong comes back within ``timeout`` seconds, or if the server itself
        holds the peer's input back then (see :meth:`_probe_expired`), else
        False (at once for a connection that is closing).
        """
        d = defer.Deferred()
        if self.state != _OPEN:
            d.callback(False)
            return d
        if self._probe is None:
            payload = os.urandom(8)
            call = self.factory.clock.callLater(timeout, self._probe_expired)
            self._probe = (payload, [], call)
            self.sendPing(payload)
        self._probe[1].append(d)
        return d

    def _probe_expired(self):
        """
        No pong within the probe's time. Silent, unless reading from the
        peer is paused for a reason of the server's own: its session
        partner does not read (backpressure), or its turn of reading is
        used up. Its pong then waits unread behind what it sent before,
        over TCP behind up to megabytes of its own messages in the two
        sides' socket buffers, where no reading of control frames could
        reach it; and a peer that is held back sent until then. So it
        counts as alive (were it dead, keepalive still ends it). Paused
        because the peer does not read what is sent to it (``OWN_OUTPUT``),
        it has not read the ping either: it is judged by its pong, like any
        other peer.
        """
        self._end_probe(self._held_back())

    def _held_back(self):
        """
        :returns: whether reading from the peer is paused for reasons of the
            server's own only (see :meth:`_probe_expired`): a pong it sent
            waits unread, through no fault of its own.
        """
        pauses = self.read_pauses
        return bool(pauses) and OWN_OUTPUT not in pauses

    def _end_probe(self, alive):
        probe, self._probe = self._probe, None
        if probe is None:
            return
        if probe[2].active():
            probe[2].cancel()
        for d in probe[1]:
            d.callback(alive)

    def onAutoPingTimeout(self):
        """
        No pong in time: count the keepalive timeout, and Autobahn drops the
        connection; unless the server holds the peer's input back (its
        partner does not read), when its pong waits unread as for a probe
        (:meth:`_probe_expired`): then it gets another keepalive timeout.
        The partner that does not read is judged by its own pongs, and
        once it reads again, or is dropped, this peer is read again.
        """
        if self._held_back():
            self.wait_longer_for_pong()
            return
        self.factory.stats.keepalive_timeouts += 1
        super().onAutoPingTimeout()

    def token_ended(self, reason):
        """
        Close the connection because of its token (code 4001), whichever
        its dialect and whether or not it chose one yet.

        :param reason: ``token expired`` (at its ``exp``), or ``token
            revoked`` (the secret that signed it was removed and reloaded).
        """
        self._cancel_token_call()
        if self.state != _OPEN:
            return
        self.factory.stats.token_closed(_TOKEN_LABELS[reason])
        if self.connection is not None:
            self.connection.token_ended(CLOSE_TOKEN, reason)
        else:
            self.close_with(CLOSE_TOKEN, reason)

    def _cancel_token_call(self):
        call = self._token_call
        if call is not None:
            self._token_call = None
            if call.active():
                call.cancel()

    # The WebSocket layer's hooks.

    def closing(self):
        self._cancel_token_call()
        self._end_probe(False)
        if self.connection is not None:
            self.connection.closing()
        elif self._choosing is not None:
            self._choosing.cancel()
            self._choosing = None

    def closed(self):
        # The connection's logic refers back to this protocol (its output);
        # it keeps that link, which no longer makes a cycle.
        self.connection = None

    def output_changed(self):
        if not self.output_blocked:
            self._unread = 0
        if self.connection is not None:
            self.connection.output_changed(self.output_blocked)

    def _fits(self, size):
        """
        :returns: whether ``size`` more bytes may be queued for the peer: the
            output bound (``max_output``) counts what waits unread (while
            the peer does not read) and what is about to be queued, before
            it is queued. A reply or notice that cannot fit is not queued;
            the connection is closed as too slow instead.
        """
        unread = self._unread if self.output_blocked else 0
        if unread + size <= self.factory.settings.max_output:
            return True
        if self.connection is not None:
            self.connection.too_slow()
        else:
            self.close_with(1008, "too slow to read")
        return False

    def _count_unread(self, size):
        self._unread += size

    def batch_link(self):
        # Not while onMessage is a subclass's, which must see every message.
        if type(self).onMessage is not _ON_MESSAGE or self.connection is None:
            return None
        return self.connection.relay_link

    # IConnectionOutput: what the connection's logic writes.

    def send_text(self, text):
        # A frame, not sendMessage: the incoming size limit must not apply
        # to what we send (a relayed room message carries a prefix).
        if self.state == _OPEN:
            size = len(text)
            if self.output_blocked or size > self.factory.fits_unchecked:
                # A character is up to 4 bytes in UTF-8.
                if not self._fits(size if text.isascii() else len(text.encode("utf-8"))):
                    return
            size = self.write_text(text)
            if self.output_blocked:
                self._count_unread(size)

    def send_frames(self, frames):
        # Relayed messages: a peer that stops reading holds its partner back
        # (backpressure), so they are counted against the bound only while
        # it does not read, before they are queued; while it reads, the
        # transport's buffer takes them (one attribute read on the relay path).
        if self.state == _OPEN:
            if self.output_blocked:
                size = sum(len(payload) for _, payload in frames)
                if self._fits(size):
                    self.write_frames(frames)
                    self._count_unread(size)
                return
            self.write_frames(frames)
            if self.output_blocked:
                self._count_unread(sum(len(payload) for _, payload in frames))

    def close(self, code, reason=None):
        if code == 1000 and reason is None and self.state == _OPEN:
            self.sendClose(1000)
        else:
            self.close_with(code, reason)

    def going_away(self):
        """Close for a server shutdown (code 1001)."""
        if self.connection is not None:
            self.connection.going_away()
        else:
            self.close_with(1001, "going away")


class SignallingServerProtocol(_Signalling, FastServerProtocol):
    """The server side of one signalling connection, on the fast layer."""


class PlainSignallingServerProtocol(_Signalling, ServerProtocol):
    """The server side of one signalling connection, on Autobahn's own paths."""

    def compact(self):
        """Nothing to compact on Autobahn's own paths."""


_ON_MESSAGE = _Signalling.onMessage

"""
A WebSocket connection's transport and socket, below Autobahn: what it
writes that the peer does not read (flow control, through the transport's
producer interface), reading paused for the server's own reasons, and what
the kernel and OpenSSL know of the socket (the round trip, bytes waiting
unread), and writes sent and connections closed at once
(:func:`send_now`, :func:`close_now`). Twisted's public
transport interface and the socket, and the buffer state of Twisted's TCP
connection that :func:`send_now` reads: nothing here reaches into Autobahn,
which :mod:`signalling.server.websocket` adapts.
``tests/test_transport.py`` checks what :func:`send_now` assumes of
Twisted's TCP connection, on real ones, and
``tests/test_framework_assumptions.py`` what the rest assumes of Twisted's
TLS layer.

:class:`TransportControl` is a mixin of
:class:`signalling.server.websocket.ServerProtocol`, which holds its
per-connection defaults as class attributes with the others
(``output_blocked``, ``_read_pauses``) and registers the output guard when
the connection is made.
"""

import socket

from OpenSSL import SSL
from twisted.internet.interfaces import IPushProducer
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.tcp import Connection as _TCPConnection
from twisted.python.failure import Failure
from zope.interface import implementer

#: Bytes written to one connection that are held back to go together at
#: most (what a connection's input makes the server write, a TLS layer's
#: writes of one turn): one TLS record's worth of application data. Past it
#: they go at once, so that the output bound, which counts what the
#: transport holds, sees them.
TURN_WRITES = 16 * 1024


#: The kernel's send buffer of each signalling connection (``SO_SNDBUF``;
#: Linux keeps twice this, for its own bookkeeping): a fixed size rather
#: than Linux's automatic growth up to ``net.ipv4.tcp_wmem``'s maximum
#: (4 MiB by default). What the server sends goes into it at once
#: (:func:`send_now`), so a peer that stops reading could otherwise leave
#: megabytes there, outside the output bound, before the server holds any
#: of it; now it costs at most this much beyond the bound. It is still
#: several times the largest message of a call (an offer with its
#: candidates), and over a hundred milliseconds of round trip at 10 Mbit/s.
SEND_BUFFER = 128 * 1024


def limit_send_buffer(port):
    """
    Give the connections ``port`` (an ``IListeningPort``) accepts a send
    buffer of :data:`SEND_BUFFER`: Linux copies a listening socket's buffer
    sizes to each connection it accepts. A port without a socket of its own
    (in memory, in tests) is left alone.
    """
    sock = getattr(port, "socket", None)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


def _idle_tcp(transport):
    """
    :returns: whether ``transport`` is a TCP connection of its own (not a
        TLS one) that is open, not closing, and holds nothing unsent.
    """
    return (
        isinstance(transport, _TCPConnection)
        and not transport._tempDataLen
        and not transport.dataBuffer
        and transport.connected
        and not transport.disconnecting
        and not transport._aborting
        and not transport._writeDisconnected
        and not transport.TLS
    )


def can_close_now(transport):
    """:returns: whether :func:`close_now` would close ``transport`` at once."""
    producer = transport.producer if isinstance(transport, _TCPConnection) else None
    return _idle_tcp(transport) and (
        producer is None or (transport.streamingProducer and not transport.producerPaused)
    )


def close_now(transport):
    """
    Close ``transport`` gracefully: a TCP connection with nothing unsent
    (and no producer it would wait for) at once, as Twisted closes one
    whose writing side is already shut: ``shutdown``, ``close``, and the
    protocol's ``connectionLost`` (with ``ConnectionDone``) before this
    returns. Twisted's own ``loseConnection`` registers the socket for
    writing, and the next poll finds nothing to write and closes it: two
    more ``epoll_ctl`` calls, an empty ``send`` and a turn of the reactor
    for each connection. Any other transport gets its ``loseConnection``.

    :returns: whether the connection was closed at once.
    """
    if not can_close_now(transport):
        transport.loseConnection()
        return False
    transport.stopReading()
    transport.stopWriting()
    transport.connectionLost(Failure(CONNECTION_DONE))
    return True


def send_now(transport, data):
    """
    Write ``data`` to ``transport``; to a TCP connection with nothing
    waiting to be sent, at once, with one ``send``. Twisted's own write
    buffers the data and registers the socket for writing, and the next
    poll sends it and withdraws the registration: two ``epoll_ctl`` calls
    and a turn of the reactor for each write, a third of what a short-lived
    connection costs the kernel.

    Whatever the socket does not take at once (it is full, or broken) goes
    to the transport's own write, which buffers it, pushes back on the
    producer and finds the error, as it always does; and so does everything
    written while the transport holds unsent bytes (the order is kept), once
    it is closing, aborted or half-closed, or when it is not a TCP
    connection of its own (an in-memory transport, a TLS layer).
    """
    if _idle_tcp(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


@implementer(IPushProducer)
class _OutputGuard:
    """
    The producer a connection registers with its own transport: the
    transport pauses it when what waits to be sent to the peer passes the
    transport's buffer size (the peer is not reading fast enough), and
    resumes it once that is sent.
    """

    __slots__ = ("_protocol",)

    def __init__(self, protocol):
        self._protocol = protocol

    def pauseProducing(self):
        if self._protocol is not None:
            self._protocol._output_paused()

    def resumeProducing(self):
        if self._protocol is not None:
            self._protocol._output_resumed()

    def stopProducing(self):
        pass


class TransportControl:
    """
    Flow control and the socket's state for a protocol with a
    ``transport``: the peer that stops reading (``output_blocked``), the
    reasons reading from the peer is paused, the round trip, unread bytes.
    """

    def output_changed(self):
        """
        :attr:`output_blocked` changed: the peer stopped reading what we
        send (its unread output passed the transport's buffer size), or it
        caught up again. A subclass provides it.
        """

    def _watch_output(self):
        """Be told when the peer stops reading (and when it caught up)."""
        guard = self._guard = _OutputGuard(self)
        try:
            self.transport.registerProducer(guard, True)
        except RuntimeError:
            # Handed over by twisted.web (an upgrade after a plain request
            # on one connection): its channel is still the producer.
            self.transport.unregisterProducer()
            self.transport.registerProducer(guard, True)

    def _output_paused(self):
        self.output_blocked = True
        self.output_changed()

    def _output_resumed(self):
        self.output_blocked = False
        self.output_changed()

    def pause_reading(self, reason):
        """
        Stop reading from the peer (TCP then pushes back on it) until every
        reason given is withdrawn with :meth:`resume_reading`.
        """
        if reason in self._read_pauses or self.transport is None:
            return
        if not self._read_pauses:
            self.transport.pauseProducing()
        self._read_pauses = self._read_pauses | {reason}

    def resume_reading(self, reason):
        """Withdraw a reason to stop reading; read again when none is left."""
        if reason not in self._read_pauses:
            return
        pauses = self._read_pauses - {reason}
        if pauses:
            self._read_pauses = pauses
            return
        # Back to the class's empty set: no key of its own in the
        # connection's dictionary, for the rest of its life.
        self.__dict__.pop("_read_pauses", None)
        if self.transport is not None:
            self.transport.resumeProducing()

    @property
    def read_pauses(self):
        """The reasons reading from the peer is paused for (a frozenset; empty: reading)."""
        return self._read_pauses

    def unread_in_socket(self):
        """
        :returns: whether bytes from the peer wait unread in the kernel's
            socket buffer (peeked) or in OpenSSL's.
        """
        transport = self.transport
        try:
            handle = transport.getHandle()
            if isinstance(handle, SSL.Connection):
                if handle.pending():
                    return True
                handle = transport.transport.getHandle()
            return bool(handle.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except (AttributeError, OSError):
            return False

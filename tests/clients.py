"""
The test clients: the one WebSocket client the tests talk to the server
with (:class:`Client`, a real Autobahn client, over real sockets or over
``twisted.test.iosim`` in memory), a raw client for hand-made frames and
plain HTTP (:class:`RawClient`), one that never answers a close
(:class:`StubbornTLSClient`), a TLS client that records the handshake
(:class:`TLSClient`), and a tool run as a process (:class:`ClientProcess`).

Everything waits on the real reactor with a bound: a wait that runs out fails
the test with what was received so far, long before trial's own timeout.
"""

import base64
import os
import struct

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from OpenSSL import SSL, crypto
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import FailTest
from zope.interface import implementer

from signalling.server.protocol import DIALECT_PING

#: Longest time, in seconds, any one expected event may take.
WAIT = 5.0
#: How often conditions are polled, in seconds.
POLL = 0.01

_OPEN = WebSocketProtocol.STATE_OPEN
_CONNECTING = WebSocketProtocol.STATE_CONNECTING


def pause(seconds):
    """:returns: a Deferred that fires after ``seconds`` on the real reactor."""
    return task.deferLater(reactor, seconds, lambda: None)


async def close_clients(clients, raw_clients, server_done=lambda: True):
    """
    Close every client (WebSocket ``clients`` with a close handshake, raw
    TCP ``raw_clients`` by closing their transport) and wait until all of
    them are lost and ``server_done()`` holds. After a failure whatever is
    still there goes the hard way, so that one failing test does not leave a
    dirty reactor behind.
    """

    def gone():
        return (
            all(c.is_lost for c in clients)
            and all(r.is_lost for r in raw_clients)
            and server_done()
        )

    for client in clients:
        client.close()
    for raw in raw_clients:
        if not raw.is_lost:
            raw.transport.loseConnection()
    try:
        await eventually(gone, "every connection to close")
    finally:
        for client in clients:
            if not client.is_lost and client.transport is not None:
                client.transport.abortConnection()
        for raw in raw_clients:
            if not raw.is_lost:
                raw.transport.abortConnection()
        await eventually(gone, "every connection to be gone after aborting")


async def eventually(predicate, what, timeout=WAIT):
    """
    Poll ``predicate`` on the reactor until it holds.

    :param what: describes the condition, for the failure message; a callable
        is called at failure time.
    :raises FailTest: when it does not hold within ``timeout`` seconds.
    """
    for _ in range(int(timeout / POLL) + 1):
        if predicate():
            return
        await pause(POLL)
    if predicate():
        return
    raise FailTest(f"timed out after {timeout} s waiting for {what() if callable(what) else what}")


class Waiting:
    """
    Event-driven waiting: :meth:`_until` returns once a condition on this
    connection holds, re-checked whenever something arrives or the connection
    is lost, and fails the test when it does not hold in time.
    """

    def _changed(self):
        for waiter in list(self._waiters):
            predicate, d = waiter
            if predicate():
                self._waiters.remove(waiter)
                # Resume the test on a fresh stack, not inside our callback.
                reactor.callLater(0, lambda d=d: d.called or d.callback(None))

    async def _until(self, predicate, what, timeout=WAIT):
        if predicate():
            return
        d = defer.Deferred()
        waiter = (predicate, d)
        self._waiters.append(waiter)
        d.addTimeout(timeout, reactor)
        try:
            await d
        except defer.TimeoutError:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            raise FailTest(
                f"timed out after {timeout} s waiting for {what() if callable(what) else what}"
            ) from None


class Client(Waiting, WebSocketClientProtocol):
    """
    A real Autobahn client that records every message it receives: text as
    ``str``, binary as ``bytes``. Tests read them in order with
    :meth:`next` / :meth:`expect`, and wait for the end with :meth:`closed`.

    :ivar answer_pings: set to False to ignore the server's pings.
    :ivar pings: how many pings arrived.
    :ivar unread_at_close: the messages not yet read when the connection
        closed (None while open).
    """

    answer_pings = True

    def __init__(self):
        super().__init__()
        self.messages = []
        self._cursor = 0
        self.pings = 0
        self.dialect_pings = 0
        self.opened = defer.Deferred()
        self.lost = defer.Deferred()
        self.is_lost = False
        self.close_code = None
        self.close_reason = None
        self.unread_at_close = None
        #: ``(wasClean, code, reason)`` as Autobahn reported the close, or None.
        self.close_info = None
        self._waiters = []

    def __repr__(self):
        return f"<Client {getattr(self, 'name', '?')}>"

    # Autobahn callbacks.

    def onOpen(self):
        self.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.messages.append(payload if isBinary else payload.decode("utf-8"))
        self._changed()

    def onPing(self, payload):
        # The ping an auto port sends with its 101 (to time the client's
        # answer) is counted apart from the keepalive's and the probes'.
        if payload == DIALECT_PING:
            self.dialect_pings += 1
        else:
            self.pings += 1
        if self.answer_pings:
            super().onPing(payload)
        self._changed()

    def onClose(self, wasClean, code, reason):
        self.close_info = (wasClean, code, reason)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        # What the server said in its close frame, if it sent one.
        self.close_code = self.remoteCloseCode
        self.close_reason = self.remoteCloseReason
        self.unread_at_close = self.messages[self._cursor:]
        self.is_lost = True
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"{self!r} closed before opening: {reason.value}"))
        self.lost.callback(self)
        self._changed()

    # Sending.

    def send_text(self, text):
        """Send one text frame."""
        self.sendMessage(text.encode("utf-8"), isBinary=False)

    def send_bytes(self, payload, binary=True):
        """Send ``payload`` as it is, in a binary (or text) frame."""
        self.sendMessage(payload, isBinary=binary)

    def abort(self):
        """Drop the connection without a close frame (unless it is gone already)."""
        if self.is_lost:
            return
        self.transport.abortConnection()

    @property
    def is_live(self):
        return self.state == _OPEN and not self.is_lost

    # Reading.

    def unread(self):
        """:returns: the messages received and not yet read, without reading them."""
        return self.messages[self._cursor:]

    def drain(self):
        """
        :returns: the messages received and not yet read, and reads them
            (for tests in memory, where everything has arrived already).
        """
        taken = self.messages[self._cursor:]
        self._cursor = len(self.messages)
        return taken

    def next_message(self, timeout=WAIT):
        """:returns: a Deferred for :meth:`next` (for ``inlineCallbacks`` tests)."""
        return defer.ensureDeferred(self.next(timeout))

    async def next(self, timeout=WAIT):
        """:returns: the next message not yet read, waiting for it if needed."""
        await self._until(
            lambda: len(self.messages) > self._cursor or self.is_lost,
            lambda: f"a message on {self!r} (read so far: {self.messages[-5:]!r})",
            timeout,
        )
        if len(self.messages) <= self._cursor:
            raise FailTest(
                f"{self!r} closed ({self.close_code} {self.close_reason!r}) "
                f"while a message was expected; last read: {self.messages[-5:]!r}"
            )
        message = self.messages[self._cursor]
        self._cursor += 1
        return message

    async def take(self, count, timeout=WAIT):
        """:returns: the next ``count`` messages."""
        await self._until(
            lambda: len(self.messages) - self._cursor >= count or self.is_lost,
            lambda: f"{count} messages on {self!r} (have {len(self.messages) - self._cursor})",
            timeout,
        )
        taken = self.messages[self._cursor:self._cursor + count]
        self._cursor += len(taken)
        if len(taken) < count:
            raise FailTest(
                f"{self!r} closed after {len(taken)} of {count} messages: {taken[-5:]!r}"
            )
        return taken

    async def expect(self, *expected):
        """Read as many messages as given and check they are exactly those."""
        received = await self.take(len(expected))
        if received != list(expected):
            raise FailTest(f"{self!r} received {received!r}, expected {list(expected)!r}")

    async def wait_pings(self, count, timeout=WAIT):
        """
        Wait until ``count`` pings arrived, or the connection is gone (the
        caller checks which).
        """
        await self._until(
            lambda: self.pings >= count or self.is_lost,
            lambda: f"{count} pings on {self!r} (have {self.pings})",
            timeout,
        )

    async def closed(self, timeout=WAIT):
        """
        Wait until the connection is gone.

        :returns: ``(code, reason)`` from the server's close frame (None, None
            when it sent none).
        """
        await self._until(lambda: self.is_lost, f"{self!r} to be closed", timeout)
        return self.close_code, self.close_reason

    def close(self):
        """Start a normal close (1000), or drop a connection not yet open."""
        if self.is_lost:
            return
        if self.state == _OPEN:
            self.sendClose(1000)
        elif self.state == _CONNECTING:
            self.transport.abortConnection()


class ClientFactory(WebSocketClientFactory):
    """
    Builds :class:`Client` s, handing each to ``on_build`` (the server
    fixture, which closes them after the test).
    """

    protocol = Client

    def __init__(self, url, on_build=lambda client: None, **kwargs):
        super().__init__(url, **kwargs)
        self._on_build = on_build

    def buildProtocol(self, addr):
        client = super().buildProtocol(addr)
        self._on_build(client)
        return client


def upgrade_request(headers=b"", query=""):
    """:returns: a WebSocket opening handshake for ``/`` (``query`` added), with ``headers``."""
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET /" + query.encode() + b" HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n" + headers + b"\r\n"
    )


def frame(opcode, payload, fin=True, mask=True):
    """
    Encode one RFC 6455 frame as a client sends it.

    :param opcode: 1 text, 2 binary, 0 continuation, 8 close, 9 ping, 10 pong.
    """
    head = bytes([(0x80 if fin else 0) | opcode])
    bit = 0x80 if mask else 0
    length = len(payload)
    if length < 126:
        head += bytes([bit | length])
    elif length < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    # XOR through int arithmetic: fast enough for any size used here.
    repeated = (key * (length // 4 + 1))[:length]
    masked = int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    masked = masked.to_bytes(length, "big")
    return head + key + masked


class RawClient(Waiting, Protocol):
    """
    A raw TCP (or TLS) client: writes whatever the test hands it and keeps
    every byte it receives. Used for plain HTTP and for hand-made WebSocket
    frames the Autobahn client would never send.
    """

    def __init__(self):
        self.received = b""
        self.is_lost = False
        self._frames_at = None
        self._waiters = []

    def connectionLost(self, reason):
        self.is_lost = True
        self._changed()

    def dataReceived(self, data):
        self.received += data
        self._changed()

    def abort(self):
        self.transport.abortConnection()

    async def dropped(self, timeout=WAIT):
        """Wait until the server has dropped the connection."""
        await self._until(lambda: self.is_lost, "the server to drop the connection", timeout)

    async def hello(self, uid):
        """Upgrade, send ``HELLO uid`` and read the ``HELLO`` reply."""
        await self.upgrade()
        self.send_frame(1, f"HELLO {uid}".encode("utf-8"))
        frames = await self.next_frames(1)
        if frames != [(1, b"HELLO")]:
            raise FailTest(f"HELLO {uid} was answered {frames!r}")

    async def response(self):
        """:returns: everything received once the server closes the connection."""
        await self._until(lambda: self.is_lost, "the server to close the connection")
        return self.received

    async def upgrade(self, path="/"):
        """Do the WebSocket opening handshake; frames follow."""
        key = base64.b64encode(os.urandom(16))
        self.transport.write(
            b"GET " + path.encode("ascii") + b" HTTP/1.1\r\n"
            b"Host: localhost\r\n"
            b"Upgrade: websocket\r\n"
            b"Connection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        await self._until(
            lambda: b"\r\n\r\n" in self.received or self.is_lost, "the handshake answer"
        )
        head, _, _ = self.received.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise FailTest(f"upgrade refused: {head!r}")
        self._frames_at = len(head) + 4

    def send_frame(self, opcode, payload, fin=True, mask=True):
        self.transport.write(frame(opcode, payload, fin, mask))

    def frames(self):
        """
        :returns: the complete frames received since the handshake, as
            ``(opcode, payload)``; not the ping an auto port sends with its
            101 (which this client does not answer).
        """
        data = self.received[self._frames_at:]
        frames = []
        while len(data) >= 2:
            opcode, length, offset = data[0] & 0x0F, data[1] & 0x7F, 2
            if length == 126:
                if len(data) < 4:
                    break
                length, offset = struct.unpack("!H", data[2:4])[0], 4
            elif length == 127:
                if len(data) < 10:
                    break
                length, offset = struct.unpack("!Q", data[2:10])[0], 10
            if len(data) < offset + length:
                break
            payload = data[offset:offset + length]
            if not (opcode == 9 and payload == DIALECT_PING):
                frames.append((opcode, payload))
            data = data[offset + length:]
        return frames

    async def next_frames(self, count):
        """:returns: the first ``count`` frames since the handshake, waiting for them."""
        await self._until(
            lambda: len(self.frames()) >= count or self.is_lost,
            lambda: f"{count} frames (have {self.frames()!r})",
        )
        frames = self.frames()
        if len(frames) < count:
            raise FailTest(f"connection lost after frames {frames!r}")
        return frames[:count]

    async def close_frame(self):
        """
        Wait for the server's close frame.

        :returns: ``(code, reason)``, and the frames that came before it.
        """
        await self._until(
            lambda: any(op == 8 for op, _ in self.frames()) or self.is_lost,
            lambda: f"a close frame (frames so far: {self.frames()!r})",
        )
        frames = self.frames()
        for index, (opcode, payload) in enumerate(frames):
            if opcode == 8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                return (code, payload[2:].decode("utf-8")), frames[:index]
        raise FailTest(f"connection lost without a close frame; frames: {frames!r}")


class StubbornTLSClient(RawClient):
    """
    A raw client that does TLS by hand (pyOpenSSL over memory BIOs) and
    never answers the server's TLS ``close_notify``, nor closes its side: a
    client that has gone quiet. What the server's own TLS layer must not
    wait on forever.

    :ivar close_notified: True once the server's ``close_notify`` arrived.
    """

    def __init__(self, trust_pem):
        super().__init__()
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.get_cert_store().add_cert(
            crypto.load_certificate(crypto.FILETYPE_PEM, trust_pem)
        )
        context.set_verify(SSL.VERIFY_PEER, lambda *args: args[-1])
        self._tls = SSL.Connection(context, None)
        self._tls.set_tlsext_host_name(b"localhost")
        self._tls.set_connect_state()
        self._pending = []
        self._handshaken = False
        self.close_notified = False

    def makeConnection(self, transport):
        self._tcp = transport
        super().makeConnection(_TLSTransport(self, transport))

    def connectionMade(self):
        self._step()

    def _flush(self):
        while True:
            try:
                data = self._tls.bio_read(65536)
            except SSL.WantReadError:
                return
            if not data:
                return
            self._tcp.write(data)

    def _step(self):
        if self._handshaken:
            return True
        try:
            self._tls.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return False
        self._handshaken = True
        self._flush()
        pending, self._pending = self._pending, []
        for data in pending:
            self.write(data)
        return True

    def write(self, data):
        """Send ``data`` through TLS (held until the handshake is done)."""
        if not self._handshaken:
            self._pending.append(data)
            return
        self._tls.sendall(data)
        self._flush()

    def dataReceived(self, data):
        self._tls.bio_write(data)
        if not self._step():
            return
        while True:
            try:
                plain = self._tls.recv(65536)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                # The server's close_notify: seen, and never answered.
                self.close_notified = True
                self._changed()
                break
            RawClient.dataReceived(self, plain)
        self._flush()


class _TLSTransport:
    """The transport a :class:`StubbornTLSClient` writes to: TLS over TCP."""

    def __init__(self, client, tcp):
        self._client = client
        self._tcp = tcp

    def write(self, data):
        self._client.write(data)

    def loseConnection(self):
        self._tcp.loseConnection()

    def abortConnection(self):
        self._tcp.abortConnection()

    def getPeer(self):
        return self._tcp.getPeer()

    def getHost(self):
        return self._tcp.getHost()



@implementer(IHandshakeListener)
class TLSClient(Protocol):
    """
    A TLS client that records the certificates the server sent, then sends
    ``request`` (or closes at once when there is none) and keeps what comes
    back until the connection is closed.

    :ivar chain: the peer's certificate chain as sent, leaf first
        (``cryptography`` certificates), or None if the handshake failed.
    :ivar protocol: the protocol agreed on by ALPN, if any.
    :ivar received: the bytes received after the handshake.
    :ivar reason: why the connection was closed (a Failure), once it is.
    :ivar closed: fires once the connection is closed.
    """

    def __init__(self, request=b""):
        self.request = request
        self.chain = None
        self.protocol = None
        self.received = b""
        self.reason = None
        self.closed = defer.Deferred()

    def handshakeCompleted(self):
        connection = self.transport.getHandle()
        self.chain = [c.to_cryptography() for c in connection.get_peer_cert_chain()]
        self.protocol = self.transport.negotiatedProtocol
        if self.request:
            self.transport.write(self.request)
        else:
            self.transport.loseConnection()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.reason = reason
        self.closed.callback(None)



class ClientProcess(protocol.ProcessProtocol):
    """
    A ``signalling-client`` subprocess: collects its output and tells when a
    line appears and when it ends.

    :ivar ended: fires with this object once the process has ended.
    :ivar status: the exit status once ended (None if killed by a signal).
    """

    def __init__(self, argv):
        self.argv = argv
        self.out = b""
        self.err = b""
        self.status = None
        self.ended = defer.Deferred()
        self._waiting = []

    def __repr__(self):
        return f"<ClientProcess {' '.join(self.argv)}>"

    def outReceived(self, data):
        self.out += data
        self._check()

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        self.status = reason.value.exitCode
        waiting, self._waiting = self._waiting, []
        for line, d in waiting:
            d.errback(
                AssertionError(
                    f"{self!r} ended without printing {line!r}:\n{self.report()}"
                )
            )
        self.ended.callback(self)

    @property
    def lines(self):
        """The complete lines printed to stdout so far."""
        complete = self.out[: self.out.rfind(b"\n") + 1]
        return complete.decode("utf-8").splitlines()

    @property
    def error_lines(self):
        """The lines printed to stderr."""
        return self.err.decode("utf-8").splitlines()

    def report(self):
        """:returns: the status and output, for failure messages."""
        return (
            f"status {self.status}\nstdout:\n{self.out.decode('utf-8', 'replace')}"
            f"stderr:\n{self.err.decode('utf-8', 'replace')}"
        )

    def wait_for_line(self, line):
        """:returns: a Deferred that fires once ``line`` has been printed."""
        d = defer.Deferred()
        self._waiting.append((line, d))
        self._check()
        return d

    def _check(self):
        lines = self.lines
        still = []
        for line, d in self._waiting:
            if line in lines:
                d.callback(None)
            else:
                still.append((line, d))
        self._waiting = still



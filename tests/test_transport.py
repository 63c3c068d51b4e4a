"""
Writes sent and connections closed at once
(``signalling.server.transport.send_now``, ``close_now``), on real TCP
connections over loopback: what the socket takes goes at once, without the
transport registering for writing; anything else takes Twisted's own
buffered path, in order, with its push-back on the producer; a connection
with nothing unsent closes before ``close_now`` returns, any other the
transport's way. And a connection's own replies go in one write, and its
close handshake ends it within the read of the peer's close frame
(``FastServerProtocol``).
"""

import socket

from twisted.internet import defer, endpoints, error, reactor, task
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from signalling.server import tls
from signalling.server.service import PortService
from signalling.server.transport import SEND_BUFFER, TURN_WRITES, close_now, send_now
from tests.certificates import write_certificate
from signalling.server.websocket import FastServerProtocol
from tests.test_protocol import _CountingTransport, _UPGRADE, _open, masked_frame
from tests.servers import Loopback

WAIT = 10.0


class _Collect(Protocol):
    """The client side: keeps what it reads, and tells when the connection ends."""

    def __init__(self):
        self.received = bytearray()
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.reason = reason.value
        self.lost.callback(None)


@implementer(IPushProducer)
class _Producer:
    def __init__(self):
        self.paused = 0

    def pauseProducing(self):
        self.paused += 1

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


async def _until(predicate, what):
    for _ in range(int(WAIT / 0.01)):
        if predicate():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


class SendNowTests(unittest.TestCase):
    """``send_now`` on a server-side TCP transport of a real connection."""

    async def connect(self):
        """
        :returns: the server's TCP transport and the client protocol; the
            server side's connectionLost fires ``self.server_lost`` with its reason.
        """
        made = defer.Deferred()
        self.server_lost = lost = defer.Deferred()

        class Server(Protocol):
            def connectionMade(self):
                made.callback(self.transport)

            def connectionLost(self, reason):
                lost.callback(reason.value)

        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Server)
        )
        self.addCleanup(port.stopListening)
        client = _Collect()
        await endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client
        )
        transport = await made
        self.addCleanup(lambda: client.lost if transport.connected else None)
        self.addCleanup(transport.abortConnection)
        return transport, client

    async def test_an_idle_connection_is_written_at_once(self):
        """Nothing is buffered, and the socket is not registered for writing."""
        transport, client = await self.connect()
        send_now(transport, b"x" * 1000)
        self.assertEqual((transport._tempDataLen, transport.dataBuffer), (0, b""))
        self.assertNotIn(transport, reactor.getWriters())
        await _until(lambda: len(client.received) == 1000, "the bytes")

    async def test_bytes_not_yet_sent_go_first(self):
        """Behind bytes the transport holds, a write waits its turn: order is kept."""
        transport, client = await self.connect()
        transport.write(b"first ")
        send_now(transport, b"second")
        self.assertEqual(transport._tempDataLen, len(b"first second"))
        await _until(lambda: bytes(client.received) == b"first second", "both, in order")

    async def test_what_the_socket_does_not_take_is_buffered_and_pushes_back(self):
        """
        A peer that does not read: the socket takes what it can, the rest is
        buffered, the producer is paused, and everything arrives in order
        once the peer reads.
        """
        transport, client = await self.connect()
        producer = _Producer()
        transport.registerProducer(producer, True)
        client.transport.pauseProducing()
        data = bytes(range(256)) * (32 * 1024)  # 8 MB: more than the socket buffers
        send_now(transport, data)
        self.assertGreater(transport._tempDataLen, 0)
        self.assertLess(transport._tempDataLen, len(data))
        self.assertEqual(producer.paused, 1)
        send_now(transport, b"end")
        client.transport.resumeProducing()
        await _until(lambda: len(client.received) == len(data) + 3, "every byte")
        self.assertEqual(bytes(client.received), data + b"end")

    async def test_a_closing_connection_sends_what_it_was_given_then_closes(self):
        """After ``loseConnection``, the write is the transport's: sent, then the close."""
        transport, client = await self.connect()
        transport.loseConnection()
        send_now(transport, b"last words")
        await client.lost
        self.assertEqual(bytes(client.received), b"last words")

    async def test_an_aborted_connection_sends_nothing_more(self):
        """After ``abortConnection``, nothing more goes to the socket."""
        transport, client = await self.connect()
        transport.abortConnection()
        send_now(transport, b"never")
        await client.lost
        self.assertEqual(bytes(client.received), b"")

    async def test_a_broken_connection_is_found_by_the_transport(self):
        """
        A peer that reset the connection: the write is handed to the
        transport, which finds the error and ends the connection.
        """
        transport, client = await self.connect()
        transport.stopReading()  # the reset is found by the write alone
        handle = client.transport.getHandle()
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.transport.abortConnection()
        await client.lost
        await task.deferLater(reactor, 0.05, lambda: None)
        for _ in range(3):
            if transport.connected:
                send_now(transport, b"x" * 1000)
                await task.deferLater(reactor, 0.05, lambda: None)
        reason = await self.server_lost
        self.assertIsInstance(reason, error.ConnectionLost)
        self.assertFalse(transport.connected)

    def test_other_transports_get_a_plain_write(self):
        """An in-memory transport (or a TLS layer) is written to as always."""
        transport = StringTransport()
        send_now(transport, b"data")
        self.assertEqual(transport.value(), b"data")


class CloseNowTests(SendNowTests):
    """``close_now`` on a server-side TCP transport of a real connection."""

    async def test_an_idle_connection_is_closed_before_it_returns(self):
        """
        Shut down and closed, the protocol told (``ConnectionDone``), and
        never registered for writing; the peer gets what was sent before,
        then an orderly end.
        """
        transport, client = await self.connect()
        send_now(transport, b"last words")
        writers = []
        self.patch(transport, "startWriting", lambda: writers.append(transport))
        self.assertTrue(close_now(transport))
        self.assertTrue(self.server_lost.called)
        self.assertIsInstance(await self.server_lost, error.ConnectionDone)
        self.assertEqual(writers, [])
        self.assertNotIn(transport, reactor.getReaders())
        self.assertFalse(transport.connected)
        await client.lost
        self.assertEqual(bytes(client.received), b"last words")
        self.assertIsInstance(client.reason, error.ConnectionDone)

    async def test_unsent_bytes_are_sent_first_then_the_connection_closes(self):
        """Behind bytes the transport holds, the close is Twisted's: after them."""
        transport, client = await self.connect()
        transport.write(b"still buffered")
        self.assertFalse(close_now(transport))
        self.assertTrue(transport.disconnecting)
        self.assertFalse(self.server_lost.called)
        self.assertIsInstance(await self.server_lost, error.ConnectionDone)
        await client.lost
        self.assertEqual(bytes(client.received), b"still buffered")

    async def test_a_paused_producer_leaves_the_close_to_the_transport(self):
        """A producer the transport paused is one Twisted's close deals with."""
        transport, client = await self.connect()
        producer = _Producer()
        transport.registerProducer(producer, True)
        transport.producerPaused = True
        self.assertFalse(close_now(transport))
        self.assertTrue(transport.disconnecting)
        self.assertFalse(self.server_lost.called)

    async def test_a_closing_connection_is_left_to_its_close(self):
        """After ``loseConnection``, nothing changes: the transport closes it."""
        transport, client = await self.connect()
        transport.loseConnection()
        self.assertFalse(close_now(transport))
        self.assertFalse(self.server_lost.called)
        self.assertIsInstance(await self.server_lost, error.ConnectionDone)

    def test_other_transports_lose_their_connection(self):
        """An in-memory transport (or a TLS layer) is closed as always."""
        transport = StringTransport()
        self.assertFalse(close_now(transport))
        self.assertTrue(transport.disconnecting)


class TLSSendNowTests(unittest.TestCase):
    """
    The project's TLS layer (``ServerTLSFactory``) over a real TCP
    connection: what TLS makes for the peer goes to the socket at once
    when the TCP connection holds nothing unsent, else takes Twisted's
    buffered path, in order, with its push-back.
    """

    async def connect(self):
        """:returns: the server's TLS transport, its TCP transport and the client protocol."""
        made = defer.Deferred()

        class Server(Protocol):
            def connectionMade(self):
                made.callback(self.transport)

        files = write_certificate(self.mktemp())
        factory = tls.ServerTLSFactory(tls.ServerTLS(files), Factory.forProtocol(Server))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = _Collect()
        endpoint = endpoints.wrapClientTLS(
            optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(files.pem)),
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
        )
        await endpoint.connect(Factory.forProtocol(lambda: client))
        server = await made
        self.addCleanup(lambda: None if client.lost.called else client.lost)
        self.addCleanup(lambda: server.abortConnection() if server.transport.connected else None)
        # The handshake is done once the client has what the server wrote.
        server.write(b"hello")
        await _until(lambda: bytes(client.received) == b"hello", "the handshake and a first write")
        return server, server.transport, client

    async def test_a_record_goes_to_an_idle_socket_at_once(self):
        server, tcp, client = await self.connect()
        writers = []
        start_writing = tcp.startWriting
        self.patch(tcp, "startWriting", lambda: (writers.append(tcp), start_writing()))
        server.write(b"x" * 1000)
        await _until(lambda: len(client.received) == 5 + 1000, "the bytes")
        self.assertEqual(writers, [])

    async def test_what_the_socket_does_not_take_is_buffered_and_pushes_back(self):
        server, tcp, client = await self.connect()
        producer = _Producer()
        server.registerProducer(producer, True)
        client.transport.pauseProducing()
        data = bytes(range(256)) * (32 * 1024)  # 8 MB: more than the socket buffers
        server.write(data)
        await _until(lambda: tcp._tempDataLen or tcp.dataBuffer, "bytes held by the transport")
        self.assertEqual(producer.paused, 1)
        server.write(b"end")
        client.transport.resumeProducing()
        await _until(lambda: len(client.received) == 5 + len(data) + 3, "every byte")
        self.assertEqual(bytes(client.received), b"hello" + data + b"end")


class SendBufferTests(unittest.TestCase):
    """
    The connections of a signalling port get a send buffer of
    ``SEND_BUFFER`` (Linux keeps twice what is set), not one Linux lets
    grow to megabytes; the metrics port keeps the system's.
    """

    async def accepted(self, option):
        made = defer.Deferred()

        class Server(Protocol):
            def connectionMade(self):
                made.callback(self.transport)

        service = PortService(
            "tcp:0",
            endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
            Factory.forProtocol(Server),
            option,
        )
        _, port = await service.listen()
        self.addCleanup(service.stop_listening)
        client = _Collect()
        await endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client
        )
        transport = await made
        self.addCleanup(lambda: client.lost)
        self.addCleanup(transport.loseConnection)
        return transport.getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    async def test_a_signalling_port_connection_has_a_fixed_send_buffer(self):
        self.assertEqual(await self.accepted("--port"), 2 * SEND_BUFFER)

    async def test_the_metrics_port_keeps_the_systems(self):
        self.assertNotEqual(await self.accepted("--metrics-port"), 2 * SEND_BUFFER)


class CloseHandshakeTests(unittest.TestCase):
    """
    A server connection on a real TCP socket ends within the read of the
    peer's close frame: what it answered goes first, then an orderly close.
    """

    async def connect(self):
        net = Loopback(self)
        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(net.factory)
        self.addCleanup(port.stopListening)
        client = _Collect()
        await endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client
        )
        self.addCleanup(lambda: None if client.lost.called else client.transport.abortConnection())
        after_reads = []
        original = FastServerProtocol.dataReceived

        def reading(proto, data):
            original(proto, data)
            after_reads.append((data, proto.transport.connected))

        self.patch(FastServerProtocol, "dataReceived", reading)
        return net, client, after_reads

    async def test_the_close_reply_goes_then_the_connection_ends_within_the_read(self):
        net, client, after_reads = await self.connect()
        client.transport.write(_UPGRADE)
        await _until(lambda: b"dialect?" in client.received, "the 101")
        close = masked_frame(b"\x03\xe8", opcode=0x8)
        client.transport.write(masked_frame(b"HELLO closer") + close)
        await client.lost
        self.assertIsInstance(client.reason, error.ConnectionDone)
        self.assertTrue(bytes(client.received).endswith(b"\x81\x05HELLO\x88\x02\x03\xe8"))
        self.assertEqual(after_reads[-1][1], 0, "closed within the read of the close frame")
        self.assertTrue(net.registry.is_empty())
        self.assertEqual(net.factory.countConnections, 0)

    async def test_a_close_frame_read_alone_ends_the_connection_too(self):
        net, client, after_reads = await self.connect()
        client.transport.write(_UPGRADE + masked_frame(b"HELLO alone"))
        await _until(lambda: b"\x81\x05HELLO" in client.received, "the HELLO reply")
        client.transport.write(masked_frame(b"\x03\xe8", opcode=0x8))
        await client.lost
        self.assertIsInstance(client.reason, error.ConnectionDone)
        self.assertTrue(bytes(client.received).endswith(b"\x88\x02\x03\xe8"))
        self.assertEqual(after_reads[-1][1], 0, "closed within the read of the close frame")
        self.assertTrue(net.registry.is_empty())


class OwnInputTests(unittest.TestCase):
    """What a connection's own input makes it write goes in one write."""

    def test_the_101_and_the_dialect_ping_are_one_write(self):
        net = Loopback(self)
        proto = net.factory.buildProtocol(None)
        transport = _CountingTransport()
        proto.makeConnection(transport)
        proto.dataReceived(_UPGRADE)
        self.assertEqual(len(transport.writes), 1)
        head, _, ping = transport.writes[0].partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "))
        self.assertEqual(ping, b"\x89\x08dialect?")
        proto.dataReceived(masked_frame(b"HELLO one") + masked_frame(b"SESSION nobody"))
        self.assertEqual(
            transport.writes[1:], [b"\x81\x05HELLO" + b"\x81\x1dERROR peer 'nobody' not found"]
        )
        proto.dataReceived(masked_frame(b"\x03\xe8", opcode=0x8))
        self.assertEqual(transport.writes[2:], [b"\x88\x02\x03\xe8"])

    def test_what_is_held_goes_once_it_reaches_a_tls_records_worth(self):
        """
        What a connection's own input makes it write is held up to
        ``TURN_WRITES`` at most: the output bound counts what the transport
        holds, so a flood of replies is checked against it as it grows.
        """
        net = Loopback(self)
        proto, transport = _open(self, net.factory, "talker")
        proto.dataReceived(masked_frame(b"ROOM echo"))
        del transport.writes[:]
        line = b"ROOM_PEER_MSG talker " + b"m" * 10_000
        proto.dataReceived(masked_frame(line) * 4)
        # Two relayed messages pass a TLS record's worth: two writes of two.
        self.assertLess(10_025, TURN_WRITES)
        self.assertGreaterEqual(2 * 10_025, TURN_WRITES)
        self.assertEqual([w.count(b"ROOM_PEER_MSG talker m") for w in transport.writes], [2, 2])

    def test_what_one_input_sends_to_another_connection_is_one_write(self):
        """Room messages read together reach each member in one write."""
        net = Loopback(self)
        members = []
        for uid in ("sender", "one", "two"):
            proto, transport = _open(self, net.factory, uid)
            proto.dataReceived(masked_frame(b"ROOM r"))
            members.append((proto, transport))
        for _, transport in members:
            del transport.writes[:]
        sender = members[0][0]
        sender.dataReceived(
            b"".join(masked_frame(b"ROOM_PEER_MSG %s m%d" % (uid, n)) for n in range(3) for uid in (b"one", b"two"))
        )
        for (_, transport), uid in zip(members[1:], ("one", "two")):
            self.assertEqual(
                transport.writes,
                [b"".join(b"\x81\x17ROOM_PEER_MSG sender m%d" % n for n in range(3))],
                uid,
            )

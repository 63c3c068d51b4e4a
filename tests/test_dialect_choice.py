"""
The auto port's choice of dialect over a link with 200 ms of round trip,
against the real ``twistd -n signalling`` on its defaults (one port, both
dialects), plaintext and over TLS (the project's own layer).

The link is :class:`DelayLink`: a TCP relay on loopback that delivers every
byte 100 ms after it came, in each direction, in order; the clients connect
through it, as through a far network (or a reverse proxy in front of a far
client: the server's kernel sees the relay's round trip, microseconds, and
only what the application measures sees the client's). This kernel has no
``netem`` queueing discipline, so ``tc`` cannot add the delay; a relay in
user space does the same for the server's purposes, which are the
application's round trips.

What must hold:

- an examples' client that sends ``HELLO`` the moment it is open is answered
  ``HELLO`` first: never a JSON ``welcome`` (no stray line);
- so is one that sends ``HELLO`` 50 ms after its handshake completed;
- a JSON client is welcomed two round trips after its open, not after a
  fixed wait.
"""

from collections import deque
import json

from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.trial import unittest

from tests.certificates import write_certificate
from tests.clients import WAIT
from tests.servers import ProcessMixin, client_endpoint, client_factory

#: Seconds each byte takes through the link, each way.
ONE_WAY = 0.1


class _Direction:
    """One direction of a :class:`DelayLink` connection: bytes delivered ``ONE_WAY`` late, in order."""

    def __init__(self):
        self.to = None
        self._queue = deque()
        self._call = None
        #: True once the link stopped: nothing is delivered any more.
        self.dead = False

    def push(self, data):
        self._queue.append((reactor.seconds() + ONE_WAY, data))
        self._schedule()

    def close(self):
        self._queue.append((reactor.seconds() + ONE_WAY, None))
        self._schedule()

    def _schedule(self):
        if self.dead:
            return
        if self._call is None and self._queue and self.to is not None:
            due = self._queue[0][0]
            self._call = reactor.callLater(max(0.0, due - reactor.seconds()), self._deliver)

    def _deliver(self):
        self._call = None
        now = reactor.seconds()
        while self._queue and self._queue[0][0] <= now:
            _, data = self._queue.popleft()
            if self.to.transport is None:
                continue
            if data is None:
                self.to.transport.loseConnection()
            else:
                self.to.transport.write(data)
        self._schedule()

    def cancel(self):
        self.dead = True
        self._queue.clear()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class _Side(protocol.Protocol):
    def __init__(self, incoming, outgoing):
        #: What this side receives goes out through ``outgoing``.
        self.incoming = incoming
        self.outgoing = outgoing

    def dataReceived(self, data):
        self.outgoing.push(data)

    def connectionLost(self, reason):
        self.outgoing.close()


class _Accepted(_Side):
    """The client's side of a link connection: it connects on to the server."""

    def __init__(self, link):
        self.link = link
        super().__init__(None, _Direction())

    def connectionMade(self):
        self.transport.pauseProducing()
        to_client = _Direction()
        to_client.to = self
        server_side = _Side(None, to_client)
        self.link.sides.append(self)
        self.link.sides.append(server_side)
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.link.target)
        d = endpoint.connect(protocol.Factory.forProtocol(lambda: server_side))

        def connected(_):
            self.outgoing.to = server_side
            self.outgoing._schedule()
            self.transport.resumeProducing()

        d.addCallbacks(connected, lambda _: self.transport.loseConnection())


class DelayLink:
    """A TCP relay on loopback to ``target`` that delays each direction by :data:`ONE_WAY`."""

    def __init__(self, target):
        self.target = target
        self.sides = []
        self.port = None

    async def start(self):
        factory = protocol.Factory.forProtocol(lambda: _Accepted(self))
        self.port = await endpoints.TCP4ServerEndpoint(
            reactor, 0, interface="127.0.0.1"
        ).listen(factory)
        return self.port.getHost().port

    async def stop(self):
        for side in self.sides:
            side.outgoing.cancel()
        for side in self.sides:
            if side.transport is not None:
                side.transport.abortConnection()
        await self.port.stopListening()


class FarClientCases(ProcessMixin):
    """A subclass sets :attr:`tls`."""

    timeout = 60
    tls = False

    async def setUp(self):
        ProcessMixin.setUp(self)
        self.pem = write_certificate(self.cert_dir).pem if self.tls else None
        template = ("ssl" if self.tls else "tcp") + ":{port}:interface=127.0.0.1"
        self.server, port = await self.start_server(template, "--cert-path", self.cert_dir)
        self.link = DelayLink(port)
        self.link_port = await self.link.start()
        self.clients = []
        self.addCleanup(self._stop)

    async def _stop(self):
        for client in self.clients:
            if client.transport is not None:
                client.transport.abortConnection()
        await self.link.stop()
        await self.stop_server(self.server)

    async def connect(self):
        """:returns: ``(client, when it opened)``: a client through the link on ``/``."""
        scheme = "wss" if self.tls else "ws"
        url = f"{scheme}://localhost:{self.link_port}/"
        client = await client_endpoint(self.link_port, self.pem).connect(client_factory(url))
        self.clients.append(client)
        await defer.Deferred.addTimeout(client.opened, WAIT, reactor)
        return client, reactor.seconds()

    async def test_a_hello_sent_at_once_from_200_ms_away_is_answered_first(self):
        """Ten examples' clients 200 ms away, HELLO at once: each is answered HELLO first."""
        clients = []
        for index in range(10):
            client, _ = await self.connect()
            client.send_text(f"HELLO far-{index}")
            clients.append(client)
        for client in clients:
            self.assertEqual(await client.next(), "HELLO")
        clients[0].send_text("SESSION far-1")
        await clients[0].expect("SESSION_OK")
        clients[0].send_text("across the far link")
        await clients[1].expect("across the far link")

    async def test_a_hello_50_ms_after_the_handshake_from_200_ms_away_is_answered_first(self):
        """An examples' client 200 ms away that sends HELLO 50 ms after its handshake: HELLO first."""
        client, _ = await self.connect()
        await task.deferLater(reactor, 0.05, lambda: None)
        client.send_text("HELLO far-and-slow")
        self.assertEqual(await client.next(), "HELLO")

    async def test_a_json_client_200_ms_away_is_welcomed_within_two_round_trips(self):
        """
        A JSON client 200 ms away is welcomed two round trips after its
        open (the rest of the pong's round trip, a margin as long, and the
        welcome's way), and is served.
        """
        client, opened = await self.connect()
        welcome = json.loads(await client.next())
        waited = reactor.seconds() - opened
        self.assertEqual(welcome["type"], "welcome")
        # The pong comes back one round trip after the 101 left, the margin
        # is as long, and the welcome takes a way: 5 one-ways after the 101
        # left, 4 after the client opened (one after the 101 left).
        self.assertGreaterEqual(waited, 4 * ONE_WAY - 0.01)
        self.assertLess(waited, 4 * ONE_WAY + 0.15)
        client.send_text('{"type":"listConsumers"}')
        self.assertEqual(json.loads(await client.next()), {"type": "listConsumers", "consumers": []})


class PlaintextFarClientTests(FarClientCases, unittest.TestCase):
    """Through the 200 ms link, plaintext."""


class TLSFarClientTests(FarClientCases, unittest.TestCase):
    """Through the 200 ms link, over TLS."""

    tls = True

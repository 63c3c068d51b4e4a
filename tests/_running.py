"""
Support for tests of the whole server as ``signalling.server.tap.makeService``
builds it, running on the real reactor and real loopback ports: start it,
connect real clients (WebSocket, raw TCP, TLS handshakes, HTTP) to any of its
ports, read ``sd_notify`` datagrams, and clean up.

Cleanup closes every client, stops the service, waits until the server holds
no connection on any of its ports, and checks that the registry is empty and
no Autobahn timer is left.
"""

import os
import shutil
import signal
import socket
import tempfile

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, endpoints, reactor, tcp
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.trial.unittest import FailTest
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from signalling.server import tap
from signalling.server.tls import ServerTLSFactory
from tests._realserver import WAIT, Client, RawClient, close_clients, eventually
from tests.test_tap import parse, websocket_factory
from tests.test_tls import TLSClient

#: Environment variables of the service manager; makeService reads them.
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


#: Passed as ``reactor`` to :func:`make_service`: let makeService find the
#: global reactor itself, as under twistd (it then handles signals).
AS_UNDER_TWISTD = object()


def make_service(argv, environ=None, reactor=reactor):
    """
    ``makeService`` for ``argv``, with only the systemd variables of
    ``environ`` visible to it (none of the test runner's own).

    :param reactor: the reactor to give it, or :data:`AS_UNDER_TWISTD`.
    """
    if reactor is AS_UNDER_TWISTD:
        reactor = None
    saved = {name: os.environ.pop(name) for name in SYSTEMD_VARIABLES if name in os.environ}
    try:
        for name, value in (environ or {}).items():
            os.environ[name] = value
        return tap.makeService(parse(*argv), reactor=reactor)
    finally:
        for name in SYSTEMD_VARIABLES:
            os.environ.pop(name, None)
        os.environ.update(saved)


class NotifySocket:
    """
    A Unix datagram socket standing in for systemd's ``$NOTIFY_SOCKET``,
    bound in a short temporary directory (socket paths are limited to about
    100 bytes) that is removed on cleanup.

    :ivar address: the value for ``NOTIFY_SOCKET``.
    """

    def __init__(self, testcase, abstract=False):
        self._pending = []
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.setblocking(False)
        testcase.addCleanup(self.socket.close)
        if abstract:
            name = f"signalling-test-{os.getpid()}-{id(self)}"
            self.socket.bind("\0" + name)
            self.address = "@" + name
        else:
            directory = tempfile.mkdtemp(prefix="sd-")
            testcase.addCleanup(shutil.rmtree, directory, True)
            self.address = os.path.join(directory, "notify")
            self.socket.bind(self.address)

    def environ(self, **more):
        """:returns: an environment naming this socket, plus ``more``."""
        return dict(NOTIFY_SOCKET=self.address, **more)

    def _drain(self):
        while True:
            try:
                data = self.socket.recv(4096)
            except BlockingIOError:
                return
            self._pending.append(data.decode("utf-8").split("\n"))

    def datagrams(self):
        """
        :returns: every datagram received since the last call, each as the
            list of its lines (a datagram sent is queued at once, so nothing
            needs waiting for when it is sent from the test's own call).
        """
        self._drain()
        received, self._pending = self._pending, []
        return received

    def has(self, count):
        """:returns: True once ``count`` datagrams wait to be read (for polling)."""
        self._drain()
        return len(self._pending) >= count


class _ClientFactory(WebSocketClientFactory):
    protocol = Client

    def __init__(self, url, built, **kwargs):
        super().__init__(url, **kwargs)
        self._built = built

    def buildProtocol(self, addr):
        client = super().buildProtocol(addr)
        self._built(client)
        return client


def client_endpoint(port_number, trust_pem=None):
    """:returns: a client endpoint to a loopback port, over TLS trusting ``trust_pem`` if given."""
    tcp_endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port_number, timeout=5)
    if trust_pem is None:
        return tcp_endpoint
    options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(trust_pem))
    return endpoints.wrapClientTLS(options, tcp_endpoint)


async def tls_handshake(port_number, trust_pem):
    """
    Complete a TLS handshake with a loopback port (checking the name
    ``localhost`` against ``trust_pem`` only), then close.

    :returns: the :class:`tests.test_tls.TLSClient`; its ``chain`` is what the
        server sent, or None when the handshake failed.
    """
    client = TLSClient()
    await client_endpoint(port_number, trust_pem).connect(Factory.forProtocol(lambda: client))
    await defer.Deferred.addTimeout(client.closed, WAIT, reactor)
    return client


class RunningServer:
    """
    A server built by ``makeService`` on the real reactor, started, with its
    clients. Create it with :meth:`start`; it cleans up after the test.

    :ivar service: the :class:`signalling.server.service.SignallingService`.
    :ivar pem: the certificate clients of TLS ports trust (set by the test
        that wrote it), or None.
    """

    def __init__(self, testcase, service):
        self.testcase = testcase
        self.service = service
        self.pem = None
        self.clients = []
        self.raw_clients = []
        self.ports = []

    @classmethod
    async def start(cls, testcase, *argv, environ=None, under_twistd=False):
        """
        :param argv: the command line; ports should be ephemeral loopback
            ones (``tcp:0:interface=127.0.0.1``).
        :param under_twistd: let makeService take the global reactor itself,
            as under twistd, so that the service handles signals; the
            handlers of SIGHUP, SIGTERM and SIGINT are put back after the test.
        :returns: a started :class:`RunningServer` listening on every port.
        """
        if under_twistd:
            for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                handler = signal.getsignal(signum)
                if handler is not None:
                    testcase.addCleanup(signal.signal, signum, handler)
            service = make_service(argv, environ, AS_UNDER_TWISTD)
        else:
            service = make_service(argv, environ)
        return await cls.attach(testcase, service)

    @classmethod
    async def attach(cls, testcase, service):
        """
        Start a service built by the test (listening on real loopback
        ports), cleaned up after the test like one from :meth:`start`.

        :returns: a started :class:`RunningServer`.
        """
        server = cls(testcase, service)
        service.startService()
        testcase.addCleanup(server.stop)
        await defer.Deferred.addTimeout(service.ready, WAIT, reactor)
        server.ports = service.listening_ports
        return server

    # The server's parts.

    def port_number(self, index=0):
        """:returns: the port number of the ``index``-th port listening."""
        return self.ports[index].getHost().port

    def site(self, index=0):
        """:returns: the Site the ``index``-th port serves (under TLS, if any)."""
        factory = self.ports[index].factory
        if isinstance(factory, ServerTLSFactory):
            factory = factory.wrappedFactory
        return factory

    def ws_factory(self, index=0):
        """:returns: the WebSocket factory of the ``index``-th port."""
        return websocket_factory(self.site(index))

    @property
    def registry(self):
        return self.ws_factory(0).registry

    @property
    def stats(self):
        return self.ws_factory(0).stats

    def server_connections(self):
        """:returns: the server's open TCP connections, on any of its ports."""
        ours = set(map(id, self.ports))
        selectables = set(reactor.getReaders()) | set(reactor.getWriters())
        return [
            s for s in selectables if isinstance(s, tcp.Server) and id(s.server) in ours
        ]

    # Clients.

    async def connect(self, index=0, path="/", name=None, answer_pings=True, tls=False, headers=None):
        """:returns: a new open :class:`tests._realserver.Client` on the ``index``-th port."""
        label = name or f"client-{len(self.clients) + 1}"

        def built(client):
            client.name = label
            client.answer_pings = answer_pings
            self.clients.append(client)

        scheme = "wss" if tls else "ws"
        port_number = self.port_number(index)
        factory = _ClientFactory(
            f"{scheme}://localhost:{port_number}{path}", built, headers=headers
        )
        factory.setProtocolOptions(
            closeHandshakeTimeout=2, serverConnectionDropTimeout=2, openHandshakeTimeout=5
        )
        endpoint = client_endpoint(port_number, self.pem if tls else None)
        client = await endpoint.connect(factory)
        await defer.Deferred.addTimeout(client.opened, WAIT, reactor)
        return client

    async def hello(self, uid, index=0, **kwargs):
        """:returns: a new client registered as ``uid``."""
        client = await self.connect(index, name=kwargs.pop("name", uid), **kwargs)
        client.send_text(f"HELLO {uid}")
        answer = await client.next()
        if answer != "HELLO":
            raise FailTest(f"HELLO {uid} was answered {answer!r}")
        return client

    async def raw(self, index=0, tls=False):
        """:returns: a connected :class:`tests._realserver.RawClient` (nothing sent)."""
        endpoint = client_endpoint(self.port_number(index), self.pem if tls else None)
        client = await endpoint.connect(Factory.forProtocol(RawClient))
        self.raw_clients.append(client)
        return client

    async def get(self, path, index=0):
        """
        ``GET path`` over real HTTP (twisted.web's Agent).

        :returns: ``(status, content_type, body)``.
        """
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent(reactor, pool=pool)
        url = f"http://127.0.0.1:{self.port_number(index)}{path}".encode("ascii")
        response = await agent.request(b"GET", url)
        body = await readBody(response)
        [content_type] = response.headers.getRawHeaders(b"content-type", [b""])
        await self.wait_for_no_connection_from(lambda c: c.getHost().port == self.port_number(index))
        return response.code, content_type.decode("ascii"), body

    async def wait_for_no_connection_from(self, predicate, timeout=WAIT):
        """Wait until the server holds no connection matching ``predicate``."""
        await eventually(
            lambda: not [c for c in self.server_connections() if predicate(c)],
            lambda: f"the server to close {self.server_connections()!r}",
            timeout,
        )

    def leftover_timers(self):
        """:returns: pending reactor calls of the WebSocket factories' Autobahn timers."""
        timers = set()
        for index, port in enumerate(self.ports):
            try:
                timers.add(id(self.ws_factory(index)._batched_timer))
            except Exception:
                # Not a signalling port (the metrics port).
                continue
        return [
            call
            for call in reactor.getDelayedCalls()
            if call.active() and id(getattr(call.func, "__self__", None)) in timers
        ]

    # Cleanup.

    async def stop(self):
        """
        Close every client, stop the service, wait until no connection is
        left, and check the registry and the timers.
        """
        try:
            await close_clients(self.clients, self.raw_clients)
        finally:
            if self.service.running:
                await defer.Deferred.addTimeout(
                    defer.maybeDeferred(self.service.stopService), WAIT * 2, reactor
                )
            await self.wait_for_no_connection_from(lambda c: True)
        registry = self.registry
        if not registry.is_empty():
            raise FailTest(
                f"registry not empty after the test: {registry.peer_count} peers, "
                f"{registry.session_count} sessions, {registry.room_count} rooms"
            )
        await eventually(
            lambda: not self.leftover_timers(),
            lambda: f"Autobahn's timers to be cancelled: {self.leftover_timers()!r}",
        )

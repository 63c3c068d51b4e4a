"""
The servers the tests run, in one place, from the smallest to the largest:

- :class:`Loopback`: the signalling factory and real Autobahn clients in
  memory (``twisted.test.iosim``) on one fake clock, over any backend;
- :class:`Server`: the server as ``makeService`` builds it, started on the
  real reactor and loopback ports (plaintext, or TLS through the project's
  own TLS layer), with real clients, cleaned up and checked after the test;
- :class:`ProcessMixin`: ``twistd -n signalling`` as a child process;
- the server in a network namespace of ``tests/_interop.py`` is such a
  process, started inside the namespace.

The clients are those of ``tests/clients.py``.
"""

import os
import random
import shutil
import signal
import socket
import sys
import tempfile

import txaio
from autobahn.websocket.compress import PerMessageDeflateOffer
from twisted.internet import defer, endpoints, reactor, task, tcp
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import FailTest
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from signalling.core.registry import Registry
from signalling.server import tap
from signalling.server.tls import ServerTLSFactory
from tests.certificates import write_certificate
from tests.clients import (
    WAIT,
    Client,
    ClientFactory,
    RawClient,
    StubbornTLSClient,
    TLSClient,
    close_clients,
    eventually,
)
from tests.helpers import parse, signalling_factory, websocket_factory


# In memory.

class FlowTransport(iosim.FakeTransport):
    """
    An in-memory transport with TCP's flow control, which iosim's has not:
    while its protocol is paused (``pauseProducing``) what arrives for it
    is held, and delivered when it is resumed; and while more than
    :attr:`buffer_size` bytes are held, the other end's producer is paused
    (as a TCP transport pauses it when its peer does not read), until they
    are delivered.

    :ivar peer: the other end's :class:`FlowTransport`.
    """

    #: Twisted's ``FileDescriptor.bufferSize``.
    buffer_size = 2**16
    peer = None
    _paused = False
    _pushed_back = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._held = []

    @property
    def held(self):
        """Bytes that arrived and wait for the protocol to read them."""
        return sum(map(len, self._held))

    def bufferReceived(self, buf):
        if not self._paused:
            super().bufferReceived(buf)
            return
        self._held.append(buf)
        producer = self.peer.producer
        if not self._pushed_back and self.held > self.buffer_size and producer is not None:
            self._pushed_back = True
            producer.pauseProducing()

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        while self._held and not self._paused:
            super().bufferReceived(self._held.pop(0))
        if self._pushed_back and not self._held:
            self._pushed_back = False
            producer = self.peer.producer
            if producer is not None:
                producer.resumeProducing()


class Loopback:
    """
    A signalling server factory and any number of real Autobahn clients
    connected to it in memory, on one :class:`Clock` (Autobahn's own timers
    follow it through ``txaio.config.loop``).

    :param testcase: the ``TestCase``; used to patch txaio's loop.
    :param registry: the registry; else ``backend(clock, seed)`` (see
        ``tests/backends.py``); else a new in-memory one.
    :param flow_control: connect each client through :class:`FlowTransport`s
        (pausing a transport holds what arrives for it, and pushes back on
        the other end), instead of iosim's, which ignore pauses.
    :param clock: the :class:`Clock`, if the test made it already.
    """

    def __init__(
        self, testcase, registry=None, backend=None, seed=0, flow_control=False,
        clock=None, **factory_kwargs
    ):
        self.clock = Clock() if clock is None else clock
        self.flow_control = flow_control
        testcase.patch(txaio.config, "loop", self.clock)
        if registry is None:
            registry = backend(self.clock, seed) if backend is not None else Registry()
        self.registry = registry
        factory_kwargs.setdefault("keepalive", 5)
        self.factory = signalling_factory(
            self.registry, self.clock, "ws://localhost", **factory_kwargs
        )
        self.pumps = []

    def client(self, protocol=None, answer_pings=True, path="/"):
        """
        :param protocol: the client class; :class:`tests.clients.Client` by
            default (a subclass may change what a client does).
        :param answer_pings: False for a client that never answers a ping,
            like a peer whose network died.
        :param path: the path (and query) of its WebSocket URL.
        :returns: a new connected (and opened) client.
        """
        client_factory = ClientFactory("ws://localhost" + path)
        client_factory.protocol = protocol or Client
        server = self.factory.buildProtocol(None)
        client = client_factory.buildProtocol(None)
        # Before it connects: it hears the ping an auto port sends with its 101.
        client.answer_pings = answer_pings
        if self.flow_control:
            server_io = FlowTransport(server, isServer=True)
            client_io = FlowTransport(client, isServer=False)
            server_io.peer, client_io.peer = client_io, server_io
        else:
            server_io, client_io = iosim.makeFakeServer(server), iosim.makeFakeClient(client)
        pump = iosim.connect(server, server_io, client, client_io, clock=self.clock)
        client.server = server
        client.pump = pump
        client.answer_pings = answer_pings
        self.pumps.append(pump)
        return client

    def deliver_bytes(self):
        """
        Deliver every pending byte in every direction, without moving the
        clock: what the backend has in flight stays in flight.
        """
        while any(pump.pump() for pump in self.pumps):
            pass

    def flush(self):
        """
        Deliver every pending byte in every direction, and everything the
        backend has in flight (moving the clock on as far as that takes),
        until quiet.
        """
        next_delivery = getattr(self.registry, "next_delivery", None)
        clock = self.clock
        while True:
            while any(pump.pump() for pump in self.pumps):
                pass
            if any(call.getTime() <= clock.seconds() for call in clock.getDelayedCalls()):
                # A connection yielded to the others until the next turn.
                clock.advance(0)
                continue
            wait = next_delivery() if next_delivery is not None else None
            if wait is None:
                return
            clock.advance(wait)

    def hello(self, uid, protocol=None, answer_pings=True, path="/"):
        """:returns: a client registered as ``uid``."""
        client = self.client(protocol, answer_pings, path)
        client.send_text(f"HELLO {uid}")
        self.flush()
        received = client.drain()
        if received != ["HELLO"]:
            raise AssertionError(f"HELLO {uid} answered {received!r}")
        return client



# Built by makeService, on the real reactor.

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




class Server:
    """
    A server built by ``makeService`` on the real reactor, started, with its
    clients. Create it with :meth:`start` (a command line), :meth:`listening`
    (one loopback port, plaintext or TLS) or :meth:`attach` (a service the
    test built); it cleans up after the test: every client closed, the
    service stopped, no connection left, the registry empty, no Autobahn
    timer left.

    :ivar service: the :class:`signalling.server.service.SignallingService`.
    :ivar pem: the certificate clients of TLS ports trust, or None.
    :ivar tls: whether clients use TLS unless told otherwise.
    """

    def __init__(self, testcase, service):
        self.testcase = testcase
        self.service = service
        self.pem = None
        self.tls = False
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
        :returns: a started :class:`Server` listening on every port.
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
    async def on_loopback(cls, testcase, tls, *argv):
        """
        :returns: a started :class:`Server` on one loopback port, plaintext
            or TLS (a bare ``ssl:0`` through the project's own TLS layer,
            with a certificate written for the test), with ``argv`` added.
        """
        cert_dir = testcase.mktemp()
        pem = write_certificate(cert_dir).pem
        kind = "ssl" if tls else "tcp"
        server = await cls.start(
            testcase, "--port", f"{kind}:0:interface=127.0.0.1", "--cert-path", cert_dir, *argv
        )
        server.tls = tls
        server.pem = pem
        return server

    @classmethod
    async def listening(
        cls,
        testcase,
        tls,
        keepalive=None,
        max_message=None,
        hello_timeout=None,
        close_timeout=None,
        max_fragments=None,
        max_output=None,
        command_rate=None,
        command_burst=None,
        dialect=None,
        redis=None,
    ):
        """
        One port on 127.0.0.1: plaintext (``tcp:0``) or TLS (a bare
        ``ssl:0``, so through the project's own TLS layer, with a
        certificate written for the test); the other settings are the
        command line's defaults unless given.

        :returns: a started :class:`Server` whose clients use TLS if ``tls``.
        """
        argv = []
        cert_dir = None
        if tls:
            cert_dir = testcase.mktemp()
            pem = write_certificate(cert_dir).pem
            argv += ["--port", "ssl:0:interface=127.0.0.1", "--cert-path", cert_dir]
        else:
            argv += ["--port", "tcp:0:interface=127.0.0.1"]
        for option, value in (
            ("--keepalive-timeout", keepalive),
            ("--max-message-size", max_message),
            ("--hello-timeout", hello_timeout),
            ("--close-timeout", close_timeout),
            ("--max-fragments", max_fragments),
            ("--max-output-buffer", max_output),
            ("--command-rate", command_rate),
            ("--command-burst", command_burst),
            ("--dialect", dialect),
            ("--redis", redis),
        ):
            if value is not None:
                argv += [option, str(value)]
        server = await cls.start(testcase, *argv)
        server.tls = bool(tls)
        if tls:
            server.pem = pem
        return server

    @classmethod
    async def attach(cls, testcase, service):
        """
        Start a service built by the test (listening on real loopback
        ports), cleaned up after the test like one from :meth:`start`.

        :returns: a started :class:`Server`.
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

    @property
    def scheme(self):
        return "wss" if self.tls else "ws"

    def url(self, path="/", index=0):
        """:returns: the WebSocket URL of the ``index``-th port."""
        return f"{self.scheme}://localhost:{self.port_number(index)}{path}"

    def site(self, index=0):
        """:returns: the factory the ``index``-th port serves (under TLS, if any)."""
        factory = self.ports[index].factory
        if isinstance(factory, ServerTLSFactory):
            factory = factory.wrappedFactory
        return factory

    def ws_factory(self, index=0):
        """:returns: the WebSocket factory of the ``index``-th port."""
        return websocket_factory(self.site(index))

    @property
    def factory(self):
        """The WebSocket factory of the first port."""
        return self.ws_factory(0)

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

    def _use_tls(self, tls):
        return self.tls if tls is None else tls

    async def connect(
        self, index=0, path="/", name=None, answer_pings=True, tls=None, headers=None,
        compression=False,
    ):
        """
        :param compression: offer permessage-deflate, as browsers do.
        :returns: a new open :class:`tests.clients.Client` on the ``index``-th port.
        """
        label = name or f"client-{len(self.clients) + 1}"
        tls = self._use_tls(tls)

        def built(client):
            client.name = label
            client.answer_pings = answer_pings
            self.clients.append(client)

        scheme = "wss" if tls else "ws"
        port_number = self.port_number(index)
        factory = ClientFactory(
            f"{scheme}://localhost:{port_number}{path}", built, headers=headers
        )
        factory.setProtocolOptions(
            # Bound the closing handshake so cleanup never hangs.
            closeHandshakeTimeout=2, serverConnectionDropTimeout=2, openHandshakeTimeout=5
        )
        if compression:
            factory.setProtocolOptions(perMessageCompressionOffers=[PerMessageDeflateOffer()])
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

    async def session(self, caller_uid, callee_uid):
        """:returns: ``(caller, callee)``, registered and in a session."""
        callee = await self.hello(callee_uid)
        caller = await self.hello(caller_uid)
        caller.send_text(f"SESSION {callee_uid}")
        await caller.expect("SESSION_OK")
        return caller, callee

    async def room(self, room_id, *uids):
        """
        :returns: clients registered as ``uids``, all in ``room_id``, joined
            in order, with the notices of the joins already read.
        """
        members = []
        for uid in uids:
            client = await self.hello(uid)
            client.send_text(f"ROOM {room_id}")
            await client.expect("ROOM_OK " + " ".join(m.name for m in members))
            for member in members:
                await member.expect(f"ROOM_PEER_JOINED {uid}")
            members.append(client)
        return members

    async def raw(self, index=0, tls=None):
        """:returns: a connected :class:`tests.clients.RawClient` (nothing sent)."""
        tls = self._use_tls(tls)
        endpoint = client_endpoint(self.port_number(index), self.pem if tls else None)
        client = await endpoint.connect(Factory.forProtocol(RawClient))
        self.raw_clients.append(client)
        return client

    async def stubborn(self, index=0):
        """
        :returns: a connected raw client that never answers a close: over
            TLS a :class:`tests.clients.StubbornTLSClient`, which ignores
            ``close_notify`` too; over plaintext a :class:`tests.clients.RawClient`.
        """
        if not self.tls:
            return await self.raw(index)
        tcp_endpoint = client_endpoint(self.port_number(index))
        client = await tcp_endpoint.connect(
            Factory.forProtocol(lambda: StubbornTLSClient(self.pem))
        )
        self.raw_clients.append(client)
        return client

    async def http(self, request, index=0, tls=None):
        """
        Send one raw HTTP request and read the answer, until the server
        closes the connection.

        :returns: ``(status, headers, body)``; ``headers`` maps lower-case
            names to values.
        """
        client = await self.raw(index, tls)
        client.transport.write(request)
        data = await client.response()
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = _dechunk(body)
        return status, headers, body

    async def upgrade_status(self, request, index=0, tls=None):
        """
        Send a raw opening handshake and read the answer's head.

        :returns: its status (101 when upgraded; the connection is dropped).
        """
        raw = await self.raw(index, tls)
        raw.transport.write(request)
        await raw._until(lambda: b"\r\n\r\n" in raw.received, "the answer's head")
        status = int(raw.received.split()[1])
        raw.abort()
        await raw.dropped()
        return status

    async def get(self, path, index=0, tls=None):
        """:returns: ``(status, headers, body)`` of a plain ``GET path``."""
        return await self.http(
            b"GET " + path.encode("ascii") + b" HTTP/1.1\r\n"
            b"Host: localhost:" + str(self.port_number(index)).encode("ascii") + b"\r\n"
            b"Connection: close\r\n\r\n",
            index,
            tls,
        )

    async def wait_for_connections(self, count, timeout=WAIT, index=0):
        """Wait until the ``index``-th port holds exactly ``count`` WebSocket connections."""
        factory = self.ws_factory(index)
        await eventually(
            lambda: factory.getConnectionCount() == count,
            lambda: f"{count} connections (have {factory.getConnectionCount()})",
            timeout,
        )

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


def _dechunk(body):
    """:returns: the body of a chunked HTTP/1.1 response, joined."""
    joined = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        joined += body[:size]
        body = body[size + 2:]
    return joined


# twistd as a child process.

#: The checkout root: PYTHONPATH for the child, so that it finds
#: twisted/plugins/signalling_plugin.py and the signalling package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: How long the server may take to start or to stop.
START_TIMEOUT = 15.0
#: How long any one reply may take.
REPLY_TIMEOUT = 5.0


def twistd_command():
    """
    :returns: the argv prefix running this interpreter's ``twistd``: the
        console script beside ``sys.executable`` (a venv's), else the same
        entry point through ``-c``.
    """
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(script, os.X_OK):
        return [script]
    entry = "import sys; from twisted.scripts.twistd import run; sys.exit(run())"
    return [sys.executable, "-c", entry]


def free_port():
    """:returns: a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports_in_a_row(count):
    """
    :returns: the first of ``count`` consecutive TCP ports on 127.0.0.1 that
        were all free a moment ago, below the kernel's range of ephemeral
        ports (an outgoing connection of another test takes any port of
        that range at any time, so the neighbour of a free one there may be
        gone a moment later).
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first_ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 32768
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10000, max(10001, first_ephemeral - count))
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
        return base
    raise RuntimeError(f"no {count} free ports in a row below {first_ephemeral}")


class ServerProcess(ProcessProtocol):
    """
    A running ``twistd`` child: collects its output and tells when it ends.

    :ivar reason: the ``ProcessDone``/``ProcessTerminated`` it ended with,
        or None while it runs.
    """

    def __init__(self):
        self._chunks = []
        self._waiting = []
        self.reason = None

    @property
    def output(self):
        """Everything it wrote to stdout and stderr so far, as text."""
        return b"".join(self._chunks).decode("utf-8", "replace")

    @property
    def running(self):
        return self.reason is None

    def outReceived(self, data):
        self._chunks.append(data)

    errReceived = outReceived

    def processEnded(self, reason):
        self.reason = reason.value
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(self.reason)

    def wait(self, timeout=START_TIMEOUT):
        """:returns: a Deferred firing with the end reason (or timing out)."""
        d = Deferred()
        if self.running:
            self._waiting.append(d)
            d.addTimeout(timeout, reactor)
        else:
            d.callback(self.reason)
        return d


def client_factory(url):
    """
    :returns: a client factory for ``url`` building
        :class:`tests.clients.Client`.

    Autobahn's handshake timers are off: every wait here has its own bound,
    and Autobahn's batched timer leaves its pending DelayedCall behind after
    a cancel, which trial reports as a dirty reactor.
    """
    factory = ClientFactory(url)
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
    return factory


@implementer(IPolicyForHTTPS)
class TrustOne:
    """An HTTPS policy that trusts one certificate, for the name ``localhost``."""

    def __init__(self, pem):
        self._pem = pem

    def creatorForNetloc(self, hostname, port):
        return optionsForClientTLS(
            "localhost", trustRoot=Certificate.loadPEM(self._pem)
        )


class ProcessMixin:
    """Start and stop ``twistd -n signalling`` children; always stop them."""

    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.cert_dir = os.path.join(self.workdir, "certs")

    def spawn(self, *args):
        """
        Start ``twistd -n --pidfile= signalling ARGS`` in the work directory;
        it is killed on cleanup if still running.

        :returns: its :class:`ServerProcess`.
        """
        server = ServerProcess()
        argv = twistd_command() + ["-n", "--pidfile=", "signalling", *args]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        env["PYTHONUNBUFFERED"] = "1"
        reactor.spawnProcess(server, argv[0], argv, env=env, path=self.workdir)
        self.addCleanup(self._kill, server)
        return server

    def spawn_daemon(self, *args):
        """
        Start ``twistd --pidfile=P --logfile=L signalling ARGS``: twistd
        puts the server in the background and returns.

        :returns: ``(process, pid_file)``: the command twistd runs in the
            foreground, and its pid file's path.
        """
        pid_file = os.path.join(self.workdir, "twistd.pid")
        log_file = os.path.join(self.workdir, "twistd.log")
        server = ServerProcess()
        argv = twistd_command() + [
            f"--pidfile={pid_file}", f"--logfile={log_file}", "signalling", *args
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        reactor.spawnProcess(server, argv[0], argv, env=env, path=self.workdir)
        self.addCleanup(self._kill, server)
        self.addCleanup(self._kill_daemon, pid_file)
        return server, pid_file

    def _kill_daemon(self, pid_file):
        try:
            with open(pid_file) as f:
                os.kill(int(f.read().strip()), 9)
        except (OSError, ValueError):
            pass

    @inlineCallbacks
    def _kill(self, server, signal_name="TERM"):
        """Stop a child with ``signal_name``, and with SIGKILL if it does not end in time."""
        if server.running:
            server.transport.signalProcess(signal_name)
            try:
                yield server.wait(START_TIMEOUT)
            except Exception:
                if server.running:
                    server.transport.signalProcess("KILL")
                yield server.wait(START_TIMEOUT)
                raise

    @inlineCallbacks
    def start_server(self, port_template, *args):
        """
        Start a server listening on ``port_template`` (with ``{port}`` for a
        free port), retrying with another port if that one was taken
        meanwhile.

        :returns: ``(server, port)`` once the server accepts connections.
        """
        for attempt in range(3):
            port = free_port()
            server = self.spawn("--port", port_template.format(port=port), *args)
            if (yield self.wait_until_listening(server, port)):
                return server, port
            if "Address already in use" not in server.output:
                break
        self.fail(f"the server did not start:\n{server.output}")

    @inlineCallbacks
    def wait_until_listening(self, server, port):
        """
        Poll (bounded) until ``server`` accepts a TCP connection on ``port``
        and has logged that it listens there.

        :returns: True once it does; False if it exited first.
        """
        started = reactor.seconds()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=1)
        while server.running:
            if reactor.seconds() - started > START_TIMEOUT:
                self.fail(f"the server is not listening on {port}:\n{server.output}")
            if f"starting on {port}" in server.output:
                try:
                    probe = yield endpoint.connect(Factory.forProtocol(Protocol))
                except ConnectError:
                    pass
                else:
                    probe.transport.abortConnection()
                    return True
            yield task.deferLater(reactor, 0.05, lambda: None)
        return False

    @inlineCallbacks
    def stop_server(self, server, signal_name="TERM"):
        """
        Stop ``server`` with SIGTERM (or ``signal_name``) as an operator
        would, and check that it shut down with exit status 0, without
        logging a traceback or an unhandled error.
        """
        server.transport.signalProcess(signal_name)
        reason = yield server.wait(START_TIMEOUT)
        output = server.output
        self.assertNotIn("Traceback", output)
        self.assertNotIn("Unhandled", output)
        self.assertIn("Server Shut Down", output)
        self.assertIsNone(reason.signal, "ended by the signal, not by exiting")
        self.assertEqual(reason.exitCode, 0)



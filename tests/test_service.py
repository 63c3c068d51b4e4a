"""
Tests for signalling.server.service: the running server as a Twisted service.

It listens on every port itself and tells the service manager it is ready
(``READY=1``) only once every port listens; a port that cannot be bound
stops the start with one line; the watchdog pings from the reactor's clock;
a stop sends ``STOPPING=1``, stops listening, closes every WebSocket
connection with 1001 and waits for them a bounded time; a reload swaps the
TLS certificate for new handshakes while established connections go on.

The service manager is a real Unix datagram socket the tests read
(:class:`tests._running.NotifySocket`). Time is a clock the tests advance
wherever the behaviour is about time; connections are real Autobahn clients
on real loopback ports.
"""

import os
import resource
import shutil
import signal
import time

import txaio
from cryptography import x509
from twisted.internet import defer, reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import (
    CannotListenError,
    ConnectionDone,
    ConnectionRefusedError,
)
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import (
    MemoryReactor,
    MemoryReactorClock,
    StringTransport,
)
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from signalling.server import tls
from signalling.server.metrics import Stats
from signalling.core.registry import Registry
from signalling.server import service as service_module
from signalling.server.service import SignallingService
from signalling.server.systemd import Notifier
from signalling.server.web import with_pages
from tests.certificates import write_certificate
from tests.clients import WAIT, eventually
from tests.helpers import hide_service_manager, signalling_factory, websocket_factory
from tests.servers import NotifySocket, Server, client_endpoint, make_service, tls_handshake

READY = ["READY=1", "STATUS=accepting connections"]
STOPPING = ["STOPPING=1", "STATUS=closing connections"]
LOOPBACK = "tcp:0:interface=127.0.0.1"


@implementer(IStreamServerEndpoint)
class PendingEndpoint:
    """An endpoint whose ``listen`` completes when the test says so."""

    def __init__(self):
        self.listening = defer.Deferred()
        self.calls = 0

    def listen(self, factory):
        self.calls += 1
        return self.listening


def fake_port():
    """:returns: a listening port of a memory reactor (it has an address)."""
    return MemoryReactor().listenTCP(0, Factory())


def build_service(clock, descriptions=(LOOPBACK,), **kwargs):
    """
    A SignallingService built the way makeService builds it (a WebSocket
    factory with its pages per port, one registry and one Stats), listening on
    real loopback ports but taking its time from ``clock``.

    :returns: the service (not started).
    """
    registry, stats = Registry(), Stats()
    listen, factories = [], []
    for description in descriptions:
        factory = signalling_factory(registry, clock, stats=stats)
        with_pages(factory, b"/health")
        listen.append((description, serverFromString(reactor, description), factory))
        factories.append(factory)
    return SignallingService(clock, listen, factories, **kwargs)


def pem_certificate(pem):
    """:returns: the ``cryptography`` certificate of PEM bytes."""
    return x509.load_pem_x509_certificate(pem)


class ReadinessTests(unittest.TestCase):
    """READY=1 goes out once every port listens, and only then."""

    def setUp(self):
        self.notify = NotifySocket(self)
        self.clock = MemoryReactorClock()
        self.notifier = Notifier(self.notify.environ())
        self.addCleanup(self.notifier.close)

    def service(self, endpoints):
        service = SignallingService(
            self.clock,
            [(f"port-{i}", endpoint, Factory()) for i, endpoint in enumerate(endpoints)],
            [],
            notifier=self.notifier,
        )
        return service

    def test_ready_only_after_every_port_listens(self):
        """
        With two ports whose listening completes later, nothing is sent
        until both listen; then one datagram says READY=1 with a STATUS,
        and ``ready`` fires with both ports.
        """
        first, second = PendingEndpoint(), PendingEndpoint()
        service = self.service([first, second])
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(self.notify.datagrams(), [])
        first_port, second_port = fake_port(), fake_port()
        first.listening.callback(first_port)
        self.assertEqual(self.notify.datagrams(), [])
        self.assertNoResult(service.ready)
        self.assertEqual(service.listening_ports, [])
        second.listening.callback(second_port)
        self.assertEqual(self.notify.datagrams(), [READY])
        self.assertEqual(self.successResultOf(service.ready), [first_port, second_port])
        self.assertEqual(service.listening_ports, [first_port, second_port])

    def test_every_port_is_logged_with_its_address(self):
        """Each port, once listening, is logged with its description and address."""
        endpoint = PendingEndpoint()
        service = self.service([endpoint])
        with capturedLogs() as events:
            service.startService()
            self.addCleanup(service.stopService)
            port = fake_port()
            endpoint.listening.callback(port)
        [event] = [e for e in events if e.get("endpoint") == "port-0"]
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event["address"], str(port.getHost()))

    def test_privileged_start_then_start_listens_once(self):
        """
        twistd calls privilegedStartService (to bind before dropping
        privileges) and then startService: each port is listened on once,
        and READY=1 is sent once.
        """
        endpoint = PendingEndpoint()
        service = self.service([endpoint])
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        endpoint.listening.callback(fake_port())
        self.assertEqual(endpoint.calls, 1)
        self.assertEqual(self.notify.datagrams(), [READY])

    def fail_second_port_later(self):
        """
        Start two ports; the first listens, the second fails afterwards.

        :returns: the events logged when it failed.
        """
        first, second = PendingEndpoint(), PendingEndpoint()
        service = self.service([first, second])
        service.startService()
        self.addCleanup(service.stopService)
        first.listening.callback(fake_port())
        with capturedLogs() as events:
            second.listening.errback(
                CannotListenError("127.0.0.1", 8443, OSError(98, "Address in use"))
            )
        return events

    def test_port_failing_after_start_stops_the_reactor_without_ready(self):
        """
        A port whose listening fails after the start (asynchronously) is
        logged as critical, stops the reactor, and READY=1 is never sent.
        """
        events = self.fail_second_port_later()
        self.assertTrue(self.clock.hasStopped)
        self.assertEqual(
            len([e for e in events if e["log_level"] == LogLevel.critical]), 1, events
        )
        self.assertEqual(self.notify.datagrams(), [])

    def test_port_failing_after_start_is_logged_as_one_readable_line(self):
        """
        The critical event of a port failing after the start renders as the
        operator's one line, whatever other observers are installed. (A
        field called ``message`` is the legacy log system's: its observer
        wrapper replaces it with ``()`` in the shared event, so the line
        would read "()" under trial, or with twistd --syslog.)
        """
        events = self.fail_second_port_later()
        [critical] = [e for e in events if e["log_level"] == LogLevel.critical]
        self.assertEqual(
            formatEvent(critical),
            "signalling: cannot listen on 127.0.0.1:8443: [Errno 98] Address in use "
            "(--port port-1: stop what holds it, or choose another port with --port)",
        )

    def test_without_a_service_manager_nothing_is_sent(self):
        """A service without a notifier starts and stops all the same."""
        endpoint = PendingEndpoint()
        service = SignallingService(self.clock, [("p", endpoint, Factory())], [])
        service.startService()
        endpoint.listening.callback(fake_port())
        self.successResultOf(service.ready)
        self.successResultOf(service.stopService())
        self.assertEqual(self.notify.datagrams(), [])

    async def test_make_service_is_ready_once_every_real_port_accepts(self):
        """
        Built by makeService with NOTIFY_SOCKET set, the server on two real
        loopback ports has sent READY=1 by the time its start returns, and
        at that time both ports accept WebSocket connections.
        """
        server = await Server.start(
            self,
            "--port", LOOPBACK, "--port", LOOPBACK,
            environ=self.notify.environ(),
        )
        self.assertEqual(self.notify.datagrams(), [READY])
        for index in (0, 1):
            client = await server.connect(index)
            self.assertTrue(client.is_live)


class ListenFailureTests(unittest.TestCase):
    """A port that cannot be bound stops the start with one line."""

    def setUp(self):
        self.notify = NotifySocket(self)
        self.busy = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(self.busy.stopListening)
        self.busy_port = self.busy.getHost().port

    def our_listening_ports(self, service):
        """:returns: real ports the reactor still listens on for ``service``'s sites."""
        sites = {id(port.factory) for port in service.ports}
        return [
            r for r in reactor.getReaders()
            if getattr(r, "factory", None) is not None and id(r.factory) in sites
            and hasattr(r, "stopListening")
        ]

    def failed_start(self):
        """
        Start a service on a free loopback port and the busy one.

        :returns: the SystemExit's message.
        """
        notifier = Notifier(self.notify.environ())
        self.addCleanup(notifier.close)
        service = build_service(
            Clock(),
            (LOOPBACK, f"tcp:{self.busy_port}:interface=127.0.0.1"),
            notifier=notifier,
        )
        self.service = service
        # Whatever the service left listening is released after the test.
        self.addCleanup(
            lambda: defer.gatherResults(
                [p.stopListening() for p in self.our_listening_ports(service)]
            )
        )
        e = self.assertRaises(SystemExit, service.startService)
        return e.code

    def test_port_that_cannot_be_bound_is_one_line(self):
        """
        A port in use makes startService raise SystemExit with one line,
        ``signalling: cannot listen on ADDRESS:PORT: REASON``, and READY=1
        is not sent.
        """
        message = self.failed_start()
        self.assertIsInstance(message, str)
        self.assertNotIn("\n", message)
        self.assertTrue(
            message.startswith(
                f"signalling: cannot listen on 127.0.0.1:{self.busy_port}: "
            ),
            message,
        )
        self.assertIn("in use", message)
        self.assertEqual(self.notify.datagrams(), [])

    def test_ports_already_listening_are_released_when_another_cannot_be_bound(self):
        """
        When one port cannot be bound, the ports of the same service that
        were already bound are closed again: a failed start leaves nothing
        listening (a process embedding the service, or a test, would
        otherwise keep a port it never serves).
        """
        self.failed_start()
        self.assertEqual(self.our_listening_ports(self.service), [])

    def test_make_service_port_in_use_is_one_line(self):
        """Through makeService, a --port in use is the same one line."""
        hide_service_manager(self)
        service = make_service(["--port", f"tcp:{self.busy_port}:interface=127.0.0.1"])
        e = self.assertRaises(SystemExit, service.privilegedStartService)
        self.assertTrue(
            e.code.startswith(f"signalling: cannot listen on 127.0.0.1:{self.busy_port}: "),
            e.code,
        )


class WatchdogTests(unittest.SynchronousTestCase):
    """WATCHDOG=1 at half WATCHDOG_USEC, from the service's clock."""

    def setUp(self):
        self.notify = NotifySocket(self)
        self.clock = MemoryReactorClock()

    def start(self, **environ):
        notifier = Notifier(self.notify.environ(**environ), pid=4321)
        self.addCleanup(notifier.close)
        self.endpoint = PendingEndpoint()
        service = SignallingService(
            self.clock, [("p", self.endpoint, Factory())], [], notifier=notifier
        )
        service.startService()
        return service

    def test_watchdog_pings_start_with_ready_and_follow_the_clock(self):
        """
        With WATCHDOG_USEC=10 s, no ping goes out before the ports listen;
        then READY=1 and a first WATCHDOG=1, and one more every 5 s of the
        clock (not of real time).
        """
        service = self.start(WATCHDOG_USEC="10000000", WATCHDOG_PID="4321")
        self.addCleanup(service.stopService)
        self.clock.advance(60)
        self.assertEqual(self.notify.datagrams(), [])
        self.endpoint.listening.callback(fake_port())
        self.assertEqual(self.notify.datagrams(), [READY, ["WATCHDOG=1"]])
        self.clock.advance(4.9)
        self.assertEqual(self.notify.datagrams(), [])
        self.clock.advance(0.1)
        self.assertEqual(self.notify.datagrams(), [["WATCHDOG=1"]])
        self.clock.pump([5] * 4)
        self.assertEqual(self.notify.datagrams(), [["WATCHDOG=1"]] * 4)

    def test_stop_sends_stopping_and_ends_the_pings(self):
        """stopService sends STOPPING=1, and no WATCHDOG=1 follows."""
        service = self.start(WATCHDOG_USEC="10000000")
        self.endpoint.listening.callback(fake_port())
        self.notify.datagrams()
        self.successResultOf(service.stopService())
        self.assertEqual(self.notify.datagrams(), [STOPPING])
        self.clock.advance(60)
        self.assertEqual(self.notify.datagrams(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_watchdog_without_watchdog_usec(self):
        """Without WATCHDOG_USEC only READY=1 is sent, and nothing is scheduled."""
        service = self.start()
        self.addCleanup(service.stopService)
        self.endpoint.listening.callback(fake_port())
        self.clock.advance(3600)
        self.assertEqual(self.notify.datagrams(), [READY])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_watchdog_for_another_process(self):
        """A WATCHDOG_PID of another process: READY=1, but no pings."""
        service = self.start(WATCHDOG_USEC="10000000", WATCHDOG_PID="1")
        self.addCleanup(service.stopService)
        self.endpoint.listening.callback(fake_port())
        self.clock.advance(60)
        self.assertEqual(self.notify.datagrams(), [READY])


class ShutdownTests(unittest.TestCase):
    """Stop accepting, close every connection with 1001, wait a bounded time."""

    timeout = 30

    def setUp(self):
        self.notify = NotifySocket(self)
        self.cert_dir = self.mktemp()
        self.files = write_certificate(self.cert_dir)

    async def test_every_connection_is_closed_with_1001_and_nothing_listens(self):
        """
        stopService sends STOPPING=1 at once, stops listening on every
        port, closes every open WebSocket connection (in a session, in a
        room, registered or not, plaintext or TLS) with 1001 "going away",
        and completes once they are gone, long before the timeout; the
        registry is empty.
        """
        server = await Server.start(
            self,
            "--port", LOOPBACK,
            "--port", "ssl:0:interface=127.0.0.1",
            "--cert-path", self.cert_dir,
            "--shutdown-timeout", "60",
            environ=self.notify.environ(),
        )
        server.pem = self.files.pem
        alice = await server.hello("alice", 0)
        bob = await server.hello("bob", 1, tls=True)
        alice.send_text("SESSION bob")
        await alice.expect("SESSION_OK")
        carol = await server.hello("carol", 1, tls=True)
        carol.send_text("ROOM r1")
        await carol.expect("ROOM_OK ")
        dave = await server.hello("dave", 0)
        dave.send_text("ROOM r1")
        await dave.expect("ROOM_OK carol")
        await carol.expect("ROOM_PEER_JOINED dave")
        eve = await server.connect(0)
        clients = [alice, bob, carol, dave, eve]
        ports = [server.port_number(0), server.port_number(1)]
        self.notify.datagrams()

        started = reactor.seconds()
        with capturedLogs() as events:
            stopped = server.service.stopService()
            self.assertEqual(self.notify.datagrams(), [STOPPING])
            await defer.Deferred.addTimeout(stopped, WAIT, reactor)
        self.assertLess(reactor.seconds() - started, WAIT)
        for client in clients:
            self.assertEqual(await client.closed(), (1001, "going away"), client)
            self.assertEqual(client.unread(), [], client)
        # Each close is logged with the code the server sent and the real
        # cause; no session end is put down to the partner.
        closes = [e for e in events if "code" in e and "cause" in e]
        self.assertEqual(len(closes), len(clients), [formatEvent(e) for e in closes])
        for event in closes:
            self.assertEqual(event["code"], 1001, formatEvent(event))
            self.assertEqual(event["cause"], "the server is shutting down")
            self.assertNotIn("ended the session", event["log_format"])
        self.assertTrue(server.registry.is_empty())
        for index in (0, 1):
            self.assertEqual(server.ws_factory(index).getConnectionCount(), 0)
        for port in ports:
            with self.assertRaises(ConnectionRefusedError):
                await client_endpoint(port).connect(Factory())
        self.assertEqual(self.notify.datagrams(), [])

    async def test_stop_completes_when_the_last_connection_closes(self):
        """
        On a clock that does not move, the stop completes at the first
        check after every client answered the close: it does not wait for
        the timeout.
        """
        clock = Clock()
        server = await Server.attach(
            self, build_service(clock, shutdown_timeout=60)
        )
        clients = [await server.hello("alice"), await server.hello("bob")]
        stopped = server.service.stopService()
        for client in clients:
            self.assertEqual(await client.closed(), (1001, "going away"))
        await server.wait_for_no_connection_from(lambda c: True)
        self.assertNoResult(stopped)
        clock.advance(0.05)
        self.successResultOf(stopped)

    async def test_stop_without_connections_completes_at_once(self):
        """With no connection open, the stop completes once the ports are closed."""
        clock = Clock()
        server = await Server.attach(self, build_service(clock))
        await defer.Deferred.addTimeout(server.service.stopService(), WAIT, reactor)
        self.assertEqual(clock.getDelayedCalls(), [])

    async def test_a_client_that_never_answers_is_waited_for_until_the_timeout(self):
        """
        A client that never answers the close frame (it received 1001) is
        waited for until shutdown_timeout of the clock has passed, not less;
        then the stop completes with a warning counting it.
        """
        clock = Clock()
        server = await Server.attach(
            self, build_service(clock, shutdown_timeout=2.0)
        )
        deaf = await server.raw()
        await deaf.upgrade()
        polite = await server.hello("polite")
        with capturedLogs() as events:
            stopped = server.service.stopService()
            (code, reason), _ = await deaf.close_frame()
            self.assertEqual((code, reason), (1001, "going away"))
            self.assertEqual(await polite.closed(), (1001, "going away"))
            await eventually(
                lambda: server.ws_factory().getConnectionCount() == 1,
                "the polite client's connection to go",
            )
            clock.pump([0.05] * 38)
            self.assertNoResult(stopped)
            clock.advance(0.2)
            self.successResultOf(stopped)
        [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(warning["count"], 1)

    def test_shutdown_timeout_option_bounds_the_wait(self):
        """
        --shutdown-timeout 2 through makeService: with a connection that
        never answers its 1001 close, the stop completes after 2 s of the
        reactor's clock, not before.
        """
        hide_service_manager(self)
        clock = MemoryReactorClock()
        self.patch(txaio.config, "loop", clock)
        service = make_service(
            ["--port", "tcp:8080", "--shutdown-timeout", "2"], reactor=clock
        )
        service.startService()
        site = clock.tcpServers[0][1]
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        # What a TCP transport has, and Autobahn's resource looks at.
        transport.protocol = channel
        channel.dataReceived(
            b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 "), transport.value())
        factory = websocket_factory(site)
        [protocol] = factory.connections
        self.addCleanup(protocol.connectionLost, Failure(ConnectionDone()))
        transport.clear()
        stopped = service.stopService()
        # An unmasked close frame from the server: 1001, "going away".
        self.assertEqual(transport.value(), b"\x88\x0c\x03\xe9going away")
        clock.pump([0.05] * 38)
        self.assertNoResult(stopped)
        clock.advance(0.2)
        self.successResultOf(stopped)


class ReloadTests(unittest.TestCase):
    """A new certificate for new handshakes; established connections go on."""

    timeout = 30

    def setUp(self):
        self.notify = NotifySocket(self)
        self.cert_dir = self.mktemp()
        self.old = write_certificate(self.cert_dir)
        self.new = write_certificate(self.mktemp())

    async def start(self):
        server = await Server.start(
            self,
            "--port", "ssl:0:interface=127.0.0.1",
            "--cert-path", self.cert_dir,
            environ=self.notify.environ(),
        )
        server.pem = self.old.pem
        self.notify.datagrams()
        return server

    def install_new_pair(self):
        """Put the new pair where the old one was, as certbot's renewal does."""
        shutil.copy(self.new.cert, self.old.cert)
        shutil.copy(self.new.key, self.old.key)

    async def assertServes(self, server, files):
        """Assert that a new handshake gets ``files``' certificate (and only it)."""
        client = await tls_handshake(server.port_number(), files.pem)
        self.assertIsNotNone(client.chain, client.reason)
        self.assertEqual(client.chain, [pem_certificate(files.pem)])

    async def test_good_new_pair_is_served_to_new_handshakes(self):
        """
        reload() with a good new pair returns True and logs the new
        fingerprint; new handshakes get the new certificate (a client that
        trusts only the old one fails), while a session set up before keeps
        relaying both ways.
        """
        server = await self.start()
        await self.assertServes(server, self.old)
        alice = await server.hello("alice", tls=True)
        bob = await server.hello("bob", tls=True)
        alice.send_text("SESSION bob")
        await alice.expect("SESSION_OK")
        self.install_new_pair()
        with capturedLogs() as events:
            self.assertTrue(server.service.reload())
        [info] = [e for e in events if "fingerprint" in e]
        self.assertEqual(info["fingerprint"], tls.fingerprint(pem_certificate(self.new.pem)))
        await self.assertServes(server, self.new)
        refused = await tls_handshake(server.port_number(), self.old.pem)
        self.assertIsNone(refused.chain)
        alice.send_text("offer after the reload")
        await bob.expect("offer after the reload")
        bob.send_text("answer after the reload")
        await alice.expect("answer after the reload")
        server.pem = self.new.pem
        carol = await server.hello("carol", tls=True)
        self.assertTrue(carol.is_live)

    async def assertRefusedReload(self, break_files, *fragments):
        """
        After ``break_files``, reload() returns False with one error event
        whose reason names ``fragments``, the old certificate is still
        served, and an established connection goes on.
        """
        server = await self.start()
        alice = await server.hello("alice", tls=True)
        break_files()
        with capturedLogs() as events:
            self.assertFalse(server.service.reload())
        errors = [e for e in events if e["log_level"] >= LogLevel.warn]
        self.assertEqual(len(errors), 1, errors)
        [error] = errors
        self.assertEqual(error["log_level"], LogLevel.error)
        for fragment in fragments:
            self.assertIn(fragment, error["reason"])
        self.assertNotIn("\n", error["reason"])
        await self.assertServes(server, self.old)
        alice.send_text("SESSION nobody")
        await alice.expect("ERROR peer 'nobody' not found")
        self.assertEqual(
            self.notify.datagrams()[-1], READY, "READY=1 after a refused reload"
        )

    async def test_certificate_that_does_not_match_its_key_is_refused(self):
        """A new certificate with the old key: False, one error, old one served."""
        await self.assertRefusedReload(
            lambda: shutil.copy(self.new.cert, self.old.cert), "does not match"
        )

    async def test_key_that_does_not_match_its_certificate_is_refused(self):
        """A new key with the old certificate: False, one error, old one served."""
        await self.assertRefusedReload(
            lambda: shutil.copy(self.new.key, self.old.key), "does not match"
        )

    async def test_missing_certificate_is_refused(self):
        """A certificate file that is gone: False, one error naming it, old one served."""
        await self.assertRefusedReload(lambda: os.remove(self.old.cert), self.old.cert)

    async def test_certificate_that_is_not_pem_is_refused(self):
        """A half-written certificate file: False, one error naming it, old one served."""

        def truncate():
            with open(self.old.cert, "wb") as f:
                f.write(self.new.pem[:40])

        await self.assertRefusedReload(truncate, self.old.cert)

    async def test_reload_is_announced_to_the_service_manager(self):
        """
        reload() sends RELOADING=1 with MONOTONIC_USEC (the monotonic clock
        when the reload began, in microseconds), then READY=1 once done.
        """
        server = await self.start()
        self.install_new_pair()
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.assertTrue(server.service.reload())
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        reloading, ready = self.notify.datagrams()
        self.assertEqual(reloading[0], "RELOADING=1")
        name, _, value = reloading[1].partition("=")
        self.assertEqual(name, "MONOTONIC_USEC")
        self.assertTrue(before <= int(value) <= after, (before, value, after))
        self.assertEqual(len(reloading), 2)
        self.assertEqual(ready, READY)

    async def test_sighup_reloads_and_the_old_handler_comes_back_at_stop(self):
        """
        Built as under twistd (makeService finds the global reactor), a
        real SIGHUP to the process reloads the certificate (from the
        reactor, not inside the signal handler); after stopService the
        SIGHUP handler that was there before is back.
        """
        before = signal.getsignal(signal.SIGHUP)
        server = await Server.start(
            self,
            "--port", "ssl:0:interface=127.0.0.1",
            "--cert-path", self.cert_dir,
            under_twistd=True,
        )
        self.assertIsNot(signal.getsignal(signal.SIGHUP), before)
        self.install_new_pair()
        with capturedLogs() as events:
            os.kill(os.getpid(), signal.SIGHUP)
            await eventually(
                lambda: any("fingerprint" in e for e in events), "the reload"
            )
        await self.assertServes(server, self.new)
        await server.stop()
        self.assertIs(signal.getsignal(signal.SIGHUP), before)

    async def test_reload_without_tls_says_so(self):
        """
        reload() on a server without TLS ports returns False, logs that
        there is nothing to reload, and still answers the service manager
        RELOADING=1 then READY=1.
        """
        server = await Server.start(
            self, "--port", LOOPBACK, environ=self.notify.environ()
        )
        self.notify.datagrams()
        with capturedLogs() as events:
            self.assertFalse(server.service.reload())
        self.assertEqual([e["log_level"] for e in events], [LogLevel.info])
        reloading, ready = self.notify.datagrams()
        self.assertEqual(reloading[0], "RELOADING=1")
        self.assertEqual(ready, READY)

    async def test_sighup_does_not_kill_a_server_without_tls(self):
        """
        ``systemctl reload`` (ExecReload sends SIGHUP) must not kill a
        server whose ports serve no TLS of ours (plaintext behind a proxy):
        once started as under twistd it handles SIGHUP instead of leaving
        the default action, which terminates the process, and a real SIGHUP
        is answered with RELOADING=1 and READY=1.
        """
        previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        await Server.start(
            self, "--port", LOOPBACK, environ=self.notify.environ(), under_twistd=True
        )
        self.assertIsNot(signal.getsignal(signal.SIGHUP), signal.SIG_DFL)
        self.notify.datagrams()
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: self.notify.has(2), "RELOADING and READY")
        reloading, ready = self.notify.datagrams()
        self.assertEqual(reloading[0], "RELOADING=1")
        self.assertEqual(ready, READY)


class SignalTests(unittest.TestCase):
    """Which signals the service takes, and that it gives them back."""

    timeout = 30

    async def test_stop_gives_back_every_signal_handler_it_took(self):
        """
        Built as under twistd, the service takes SIGHUP (reload) and
        SIGTERM/SIGINT (graceful stop); after stopService every one of them
        has the handler it had before, so an embedding process or a test
        runner is not left with handlers of a stopped service.
        """
        signals = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
        before = {signum: signal.getsignal(signum) for signum in signals}
        server = await Server.start(self, "--port", LOOPBACK, under_twistd=True)
        taken = {signum: signal.getsignal(signum) for signum in signals}
        self.assertNotEqual(taken, before)
        await server.stop()
        self.assertEqual(
            {signum: signal.getsignal(signum) for signum in signals}, before
        )

    async def test_an_injected_reactor_leaves_signals_alone(self):
        """With a reactor given to makeService (tests), no signal handler changes."""
        signals = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
        before = {signum: signal.getsignal(signum) for signum in signals}
        await Server.start(self, "--port", LOOPBACK)
        self.assertEqual({signum: signal.getsignal(signum) for signum in signals}, before)


class FileLimitTests(unittest.TestCase):
    """raise_file_limit() lifts the soft open-file limit to the hard one."""

    def test_soft_limit_is_raised_to_the_hard_limit_and_logged(self):
        """Each peer is a file descriptor: the soft limit goes up to the hard one."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        lowered = min(soft, 256) if hard == resource.RLIM_INFINITY else min(soft, hard, 256)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
        with capturedLogs() as events:
            before, after = service_module.raise_file_limit()
        self.assertEqual(before, lowered)
        now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.assertEqual(after, now)
        if hard != resource.RLIM_INFINITY:
            self.assertEqual(now, hard)
        limits = [e for e in events if e.get("limit") == now]
        self.assertEqual(len(limits), 1)
        self.assertEqual(limits[0]["previous"], lowered)

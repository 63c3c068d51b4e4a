"""
Production operation with the real ``twistd -n signalling`` process: socket
activation and the service manager's notifications (without systemd itself),
graceful shutdown, certificate reload on SIGHUP, JSON logs, nginx in front of
the server, and ``systemd-analyze verify`` of the shipped units.

nginx and systemd-analyze come from Debian's ``nginx`` and ``systemd``
packages. Without them these tests skip, naming the package; with
``CI=true`` they fail instead.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactor
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from signalling.server import listening, tap, tls
from signalling.server.settings import DEFAULT_KEEPALIVE
from tests.certificates import write_certificate
from tests.helpers import ROOT
from tests.servers import ProcessMixin, REPLY_TIMEOUT, START_TIMEOUT, ServerProcess, TrustOne, client_factory, free_port, twistd_command

CONTRIB = os.path.join(ROOT, "contrib")
#: How much longer than its --shutdown-timeout a stopping server may take
#: (the interpreter's own exit on a shared, busy machine).
EXIT_MARGIN = 3.0
#: Environment variables of a service manager, never passed on by accident.
_MANAGER_ENV = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
                "WATCHDOG_USEC", "WATCHDOG_PID")


def in_ci():
    """:returns: True when running in CI (``CI=true``)."""
    return os.environ.get("CI", "").lower() == "true"


def require_program(name, package, candidates=()):
    """
    :returns: the path of the program ``name``.
    :raises SkipTest: when it is missing (naming the Debian ``package``);
        in CI a ``FailTest`` instead.
    """
    for path in [shutil.which(name), *candidates]:
        if path and os.access(path, os.X_OK):
            return path
    message = f"{name} is not installed (Debian package {package})"
    if in_ci():
        raise unittest.FailTest(message + "; CI=true: missing programs fail")
    raise unittest.SkipTest(message)


class OutputProcess(ServerProcess):
    """A :class:`ServerProcess` that also keeps stdout and stderr apart."""

    def __init__(self):
        super().__init__()
        self._stdout = []
        self._stderr = []

    @property
    def stdout(self):
        return b"".join(self._stdout).decode("utf-8", "replace")

    @property
    def stderr(self):
        return b"".join(self._stderr).decode("utf-8", "replace")

    def outReceived(self, data):
        self._stdout.append(data)
        super().outReceived(data)

    def errReceived(self, data):
        self._stderr.append(data)
        super().errReceived(data)


class NotifyRecorder(DatagramProtocol):
    """
    The service manager's end of ``$NOTIFY_SOCKET``: records every datagram
    as ``(time received, [state lines])``.

    :ivar on_datagram: called with the state lines of each datagram, if set.
    """

    def __init__(self):
        self.datagrams = []
        self.on_datagram = None

    def datagramReceived(self, datagram, address=None):
        states = datagram.decode("utf-8").split("\n")
        self.datagrams.append((reactor.seconds(), states))
        if self.on_datagram is not None:
            self.on_datagram(states)

    def times(self, state):
        """:returns: when each datagram containing ``state`` arrived."""
        return [when for when, states in self.datagrams if state in states]

    def sequence(self):
        """:returns: every state line received, in order."""
        return [s for _, states in self.datagrams for s in states]


class RawWebSocketClient(Protocol):
    """
    A WebSocket client written by hand that registers and then never reads
    another byte: it does not answer the server's close frame and does not
    close the TCP connection (a peer whose program hangs).
    """

    def __init__(self, uid):
        self.uid = uid
        self.received = b""
        self.lost = Deferred()
        self._upgraded = False

    def connectionMade(self):
        self.transport.write(
            b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )

    def dataReceived(self, data):
        self.received += data
        if not self._upgraded and b"\r\n\r\n" in self.received:
            self._upgraded = True
            payload = f"HELLO {self.uid}".encode("ascii")
            # A masked text frame; the all-zero mask leaves the payload as is.
            self.transport.write(bytes([0x81, 0x80 | len(payload)]) + bytes(4) + payload)

    @property
    def registered(self):
        return b"\x81\x05HELLO" in self.received

    def connectionLost(self, reason):
        self.lost.callback(None)


class ProductionMixin(ProcessMixin):
    """Starting servers the way a service manager does, and waiting on them."""

    #: argv put before twistd's by :meth:`spawn` (a program that execs it).
    spawn_prefix = ()
    #: The address clients connect to.
    loopback = "127.0.0.1"

    def spawn_process(
        self, args, env=None, inherit=None, own_pid=(), prefix=(), fd_names=True
    ):
        """
        Start ``twistd -n --pidfile= signalling ARGS``; it is killed on
        cleanup if still running.

        :param env: extra environment variables.
        :param inherit: a listening socket the child gets as file descriptor
            3, with ``LISTEN_FDS=1`` and ``LISTEN_PID`` set to its pid.
        :param own_pid: further variables to set to the child's own pid
            (``WATCHDOG_PID``).
        :param prefix: argv of a program that execs the rest.
        :param fd_names: set ``LISTEN_FDNAMES`` for the inherited socket, as
            systemd does (``systemd-socket-activate`` does not, unless given
            ``--fdname``).
        :returns: its :class:`OutputProcess`.
        """
        server = OutputProcess()
        argv = [*prefix, *twistd_command(), "-n", "--pidfile=", "signalling", *args]
        child_env = {k: v for k, v in os.environ.items() if k not in _MANAGER_ENV}
        child_env["PYTHONPATH"] = os.pathsep.join(
            [ROOT] + [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        child_env["PYTHONUNBUFFERED"] = "1"
        child_env.update(env or {})
        fds = {0: "w", 1: "r", 2: "r"}
        pid_names = list(own_pid)
        if inherit is not None:
            fds[3] = inherit.fileno()
            child_env["LISTEN_FDS"] = "1"
            if fd_names:
                # systemd (227 and later) names every socket.
                child_env["LISTEN_FDNAMES"] = "signalling.socket"
            pid_names.append("LISTEN_PID")
        if pid_names:
            # The pid is known only in the child: a shell exports its own pid
            # and then becomes twistd (exec keeps the pid).
            exports = " ".join(f"{name}=$$" for name in pid_names)
            argv = ["/bin/sh", "-c", f'export {exports}; exec "$@"', "sh", *argv]
        reactor.spawnProcess(
            server, argv[0], argv, env=child_env, path=self.workdir, childFDs=fds
        )
        self.addCleanup(self._kill, server)
        return server

    def spawn(self, *args):
        """ProcessMixin.start_server spawns through this: a clean environment."""
        return self.spawn_process(list(args), prefix=self.spawn_prefix)

    def notify_socket(self):
        """
        Bind a datagram socket for ``$NOTIFY_SOCKET`` (in a short temporary
        directory: Unix socket paths are limited to 107 bytes).

        :returns: ``(path, recorder)``.
        """
        directory = tempfile.mkdtemp(prefix="signalling-notify-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "notify")
        recorder = NotifyRecorder()
        port = reactor.listenUNIXDatagram(path, recorder)
        self.addCleanup(port.stopListening)
        return path, recorder

    def listening_socket(self, family=socket.AF_INET, address="127.0.0.1"):
        """
        :returns: a listening TCP socket on a free loopback port, as systemd
            would bind it (closed on cleanup).
        """
        sock = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind((address, 0))
        sock.listen(64)
        return sock

    @inlineCallbacks
    def poll(self, predicate, what, timeout=REPLY_TIMEOUT, server=None):
        """
        Poll ``predicate`` until it is true, within ``timeout`` seconds.

        :param server: an :class:`OutputProcess` whose output is shown when
            waiting fails, and whose exit ends the wait.
        :returns: the predicate's true value.
        """
        deadline = reactor.seconds() + timeout
        while True:
            value = predicate()
            if value:
                return value
            output = f":\n{server.output}" if server is not None else ""
            if server is not None and not server.running:
                self.fail(f"the server exited while waiting for {what}{output}")
            if reactor.seconds() > deadline:
                self.fail(f"no {what} within {timeout} s{output}")
            yield task.deferLater(reactor, 0.02, lambda: None)

    @inlineCallbacks
    def connect(self, port, pem=None, bind=None, headers=None):
        """
        :param pem: the certificate to trust for ``wss://localhost``; plain
            ``ws://`` when None.
        :param bind: the local ``(address, port)`` to connect from.
        :param headers: extra HTTP headers for the opening handshake.
        :returns: an opened WebSocket client (closed again on cleanup).
        """
        scheme = "wss" if pem else "ws"
        factory = client_factory(f"{scheme}://localhost:{port}/")
        if headers:
            factory.headers = dict(headers)
        tcp = TCP6ClientEndpoint if ":" in self.loopback else TCP4ClientEndpoint
        endpoint = tcp(
            reactor, self.loopback, port, timeout=REPLY_TIMEOUT, bindAddress=bind
        )
        if pem is not None:
            endpoint = wrapClientTLS(
                optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(pem)),
                endpoint,
            )
        client = yield endpoint.connect(factory).addTimeout(REPLY_TIMEOUT, reactor)
        self.addCleanup(self.close_client, client)
        yield client.opened.addTimeout(REPLY_TIMEOUT, reactor)
        return client

    def close_client(self, client):
        if not client.lost.called:
            client.sendClose()
        return client.lost.addTimeout(REPLY_TIMEOUT, reactor)

    @inlineCallbacks
    def hello(self, port, uid, **kwargs):
        """:returns: a client registered as ``uid``."""
        client = yield self.connect(port, **kwargs)
        client.send_text(f"HELLO {uid}")
        self.assertEqual((yield client.next_message()), "HELLO")
        return client

    @inlineCallbacks
    def session(self, port, caller, callee, **kwargs):
        """:returns: ``(caller, callee)`` clients in a session."""
        a = yield self.hello(port, caller, **kwargs)
        b = yield self.hello(port, callee, **kwargs)
        a.send_text(f"SESSION {callee}")
        self.assertEqual((yield a.next_message()), "SESSION_OK")
        return a, b

    @inlineCallbacks
    def assertRelays(self, a, b, marker="x"):
        """Assert that a session relays one message each way."""
        offer = f'{{"sdp": {{"type": "offer", "sdp": "v=0 {marker}"}}}}'
        a.send_text(offer)
        self.assertEqual((yield b.next_message()), offer)
        answer = f'{{"sdp": {{"type": "answer", "sdp": "v=0 {marker}"}}}}'
        b.send_text(answer)
        self.assertEqual((yield a.next_message()), answer)

    def assertStoppedCleanly(self, server, reason):
        """
        Assert that ``server`` ended with exit status 0 (not by re-raising
        the signal it stopped on, which twistd would do on its own), with no
        traceback.
        """
        self.assertNotIn("Traceback", server.output)
        self.assertNotIn("Unhandled", server.output)
        self.assertIsNone(reason.signal, server.output)
        self.assertEqual(reason.exitCode, 0, server.output)

    @inlineCallbacks
    def terminate(self, server, timeout=START_TIMEOUT):
        """
        Send SIGTERM and wait for the exit.

        :returns: ``(seconds it took, end reason)``.
        """
        started = reactor.seconds()
        server.transport.signalProcess("TERM")
        reason = yield server.wait(timeout)
        return reactor.seconds() - started, reason


class SocketActivationMixin(ProductionMixin):
    """
    A listening socket handed over as systemd does (``LISTEN_FDS``,
    ``LISTEN_PID``, file descriptor 3) and ``$NOTIFY_SOCKET`` read by the
    test. Subclasses set ``port_description``, and :meth:`pem` for TLS.
    """

    family = socket.AF_INET

    def pem(self):
        return None

    @inlineCallbacks
    def test_ready_once_the_inherited_port_answers_then_stopping(self):
        """
        With an inherited socket and ``--port ...systemd:domain=...:index=0``,
        ``READY=1`` arrives once; a client connecting at that moment is
        answered HELLO; SIGTERM sends ``STOPPING=1`` and the process exits
        cleanly.
        """
        try:
            sock = self.listening_socket(self.family, self.loopback)
        except OSError as e:
            raise unittest.SkipTest(f"no {self.loopback}: {e}")
        port = sock.getsockname()[1]
        path, recorder = self.notify_socket()
        answered = []

        def on_datagram(states):
            if "READY=1" in states and not answered:
                # At the moment READY=1 arrives, not later.
                answered.append(self.hello(port, "early", pem=self.pem()))

        recorder.on_datagram = on_datagram
        server = self.spawn_process(
            ["--port", self.port_description, "--cert-path", self.cert_dir],
            env={"NOTIFY_SOCKET": path},
            inherit=sock,
        )
        yield self.poll(lambda: answered, "READY=1", START_TIMEOUT, server)
        client = yield answered[0]
        self.assertIn("STATUS=accepting connections", recorder.sequence())
        other = yield self.hello(port, "late", pem=self.pem())
        client.send_text("SESSION late")
        self.assertEqual((yield client.next_message()), "SESSION_OK")
        yield self.assertRelays(client, other)
        elapsed, reason = yield self.terminate(server)
        self.assertStoppedCleanly(server, reason)
        yield self.poll(lambda: recorder.times("STOPPING=1"), "STOPPING=1")
        self.assertEqual(len(recorder.times("READY=1")), 1, recorder.datagrams)
        self.assertEqual(client.remoteCloseCode, 1001)


class PlaintextSocketActivationTests(SocketActivationMixin, unittest.TestCase):
    """``--port systemd:domain=INET:index=0`` (plaintext)."""

    port_description = "systemd:domain=INET:index=0"

    @inlineCallbacks
    def test_socket_passed_without_names_is_found_by_index(self):
        """
        A socket handed over without ``LISTEN_FDNAMES`` (as
        ``systemd-socket-activate`` does unless given ``--fdname``) is served
        with ``index=0``.
        """
        sock = self.listening_socket()
        port = sock.getsockname()[1]
        path, recorder = self.notify_socket()
        server = self.spawn_process(
            ["--port", self.port_description],
            env={"NOTIFY_SOCKET": path},
            inherit=sock,
            fd_names=False,
        )
        yield self.poll(lambda: recorder.times("READY=1"), "READY=1", START_TIMEOUT, server)
        yield self.hello(port, "unnamed")
        elapsed, reason = yield self.terminate(server)
        self.assertStoppedCleanly(server, reason)

    @inlineCallbacks
    def test_no_socket_passed_in_is_one_line_saying_what_is_missing(self):
        """
        ``--port systemd:...`` started without a socket (no ``LISTEN_FDS``)
        exits with status 1 and one line that says no socket was passed in,
        not ``list index out of range``.
        """
        server = self.spawn_process(["--port", self.port_description])
        reason = yield server.wait(START_TIMEOUT)
        output = server.output
        self.assertEqual(reason.exitCode, 1, output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("out of range", output)
        [line] = [l for l in output.splitlines() if l.startswith("signalling: ")]
        self.assertIn("no socket was passed in", line)
        self.assertIn("LISTEN_FDS", line)

    @inlineCallbacks
    def test_watchdog_pings_at_half_the_interval(self):
        """
        With ``WATCHDOG_USEC=400000`` and ``WATCHDOG_PID`` the child's pid,
        ``WATCHDOG=1`` datagrams keep arriving about every 0.2 s.
        """
        sock = self.listening_socket()
        path, recorder = self.notify_socket()
        server = self.spawn_process(
            ["--port", self.port_description],
            env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"},
            inherit=sock,
            own_pid=["WATCHDOG_PID"],
        )
        yield self.poll(lambda: recorder.times("READY=1"), "READY=1", START_TIMEOUT, server)
        yield self.poll(
            lambda: len(recorder.times("WATCHDOG=1")) >= 8, "8 watchdog pings", 5.0, server
        )
        pings = recorder.times("WATCHDOG=1")
        gaps = sorted(b - a for a, b in zip(pings, pings[1:]))
        median = gaps[len(gaps) // 2]
        # 0.2 s apart; a shared machine delays single pings, not the median.
        self.assertTrue(0.12 <= median <= 0.35, gaps)

    @inlineCallbacks
    def test_listening_socket_outlives_a_restart(self):
        """
        The service manager keeps the listening socket while the server
        restarts: a client that connects while no server runs waits in the
        backlog and is answered by the next server; a client of the old
        server was sent 1001.
        """
        sock = self.listening_socket()
        port = sock.getsockname()[1]
        path, recorder = self.notify_socket()
        args = ["--port", self.port_description]
        first = self.spawn_process(args, env={"NOTIFY_SOCKET": path}, inherit=sock)
        yield self.poll(lambda: recorder.times("READY=1"), "READY=1", START_TIMEOUT, first)
        old = yield self.hello(port, "old")
        _, reason = yield self.terminate(first)
        self.assertStoppedCleanly(first, reason)
        self.assertEqual(old.remoteCloseCode, 1001)
        # No server runs now; the connection waits in the socket's backlog.
        factory = client_factory(f"ws://localhost:{port}/")
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=REPLY_TIMEOUT)
        waiting = yield endpoint.connect(factory).addTimeout(REPLY_TIMEOUT, reactor)
        self.addCleanup(self.close_client, waiting)
        self.assertFalse(waiting.opened.called)
        second = self.spawn_process(args, env={"NOTIFY_SOCKET": path}, inherit=sock)
        yield waiting.opened.addTimeout(START_TIMEOUT, reactor)
        waiting.send_text("HELLO waiting")
        self.assertEqual((yield waiting.next_message()), "HELLO")
        self.assertEqual(len(recorder.times("READY=1")), 2)
        self.assertTrue(second.running)


class TLSSocketActivationTests(SocketActivationMixin, unittest.TestCase):
    """
    ``--port tls:systemd:domain=INET:index=0``: our TLS, with a generated
    certificate in --cert-path, on the inherited socket.
    """

    port_description = "tls:systemd:domain=INET:index=0"

    def setUp(self):
        super().setUp()
        self.files = write_certificate(self.cert_dir)

    def pem(self):
        return self.files.pem


class IPv6TLSSocketActivationTests(TLSSocketActivationTests):
    """
    ``--port tls:systemd:domain=INET6:index=0``, as in signalling.service,
    on an IPv6 socket (bound to ``::1``).
    """

    port_description = "tls:systemd:domain=INET6:index=0"
    family = socket.AF_INET6
    loopback = "::1"


class ReadinessTests(ProductionMixin, unittest.TestCase):
    """``READY=1`` waits for every port, not only the first."""

    @inlineCallbacks
    def test_ready_only_once_every_port_accepts(self):
        """
        With two WebSocket ports and a metrics port bound by the server
        itself, each one accepts a TCP connection at the moment ``READY=1``
        arrives.
        """
        path, recorder = self.notify_socket()
        ports = [free_port(), free_port(), free_port()]
        refused = []

        def on_datagram(states):
            if "READY=1" not in states:
                return
            for port in ports:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError as e:
                    refused.append((port, e))

        recorder.on_datagram = on_datagram
        server = self.spawn_process(
            [
                "--port", f"tcp:{ports[0]}:interface=127.0.0.1",
                "--port", f"tcp:{ports[1]}:interface=127.0.0.1",
                "--metrics-port", f"tcp:{ports[2]}:interface=127.0.0.1",
            ],
            env={"NOTIFY_SOCKET": path},
        )
        yield self.poll(lambda: recorder.times("READY=1"), "READY=1", START_TIMEOUT, server)
        self.assertEqual(refused, [])


class ShutdownTests(ProductionMixin, unittest.TestCase):
    """SIGTERM: 1001 for everyone, then a bounded wait, then exit."""

    @inlineCallbacks
    def start(self, shutdown_timeout):
        server, port = yield self.start_server(
            "tcp:{port}:interface=127.0.0.1", "--shutdown-timeout", str(shutdown_timeout)
        )
        return server, port

    @inlineCallbacks
    def test_every_peer_is_sent_1001_and_the_process_exits(self):
        """
        50 peers (10 sessions, two rooms of 10, 10 only registered): on
        SIGTERM every one receives close code 1001, and the process exits
        cleanly well within --shutdown-timeout, since all of them answer.
        """
        server, port = yield self.start(5)
        clients = []
        for i in range(10):
            pair = yield self.session(port, f"caller{i}", f"callee{i}")
            clients.extend(pair)
        for room in ("red", "blue"):
            for i in range(10):
                member = yield self.hello(port, f"{room}{i}")
                member.send_text(f"ROOM {room}")
                reply = yield member.next_message()
                self.assertTrue(reply.startswith("ROOM_OK"), reply)
                clients.append(member)
        registered = yield gatherResults(
            [self.hello(port, f"idle{i}") for i in range(10)]
        )
        clients.extend(registered)
        self.assertEqual(len(clients), 50)
        elapsed, reason = yield self.terminate(server, 5 + EXIT_MARGIN)
        yield gatherResults([c.lost for c in clients]).addTimeout(REPLY_TIMEOUT, reactor)
        codes = [c.remoteCloseCode for c in clients]
        self.assertEqual(codes, [1001] * 50)
        self.assertStoppedCleanly(server, reason)
        self.assertLess(elapsed, 5)
        self.assertNotIn("still open", server.output)

    @inlineCallbacks
    def test_a_peer_that_never_answers_does_not_hold_the_exit(self):
        """
        A peer that never answers the close frame (nor closes its TCP
        connection) keeps the process no longer than --shutdown-timeout:
        it exits after about one second, saying one connection was open.
        """
        server, port = yield self.start(1)
        alice = yield self.hello(port, "alice")
        deaf = RawWebSocketClient("deaf")
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            Factory.forProtocol(lambda: deaf)
        ).addTimeout(REPLY_TIMEOUT, reactor)
        self.addCleanup(lambda: deaf.lost.called or deaf.transport.abortConnection())
        yield self.poll(lambda: deaf.registered, "HELLO for the deaf peer")
        elapsed, reason = yield self.terminate(server, 1 + EXIT_MARGIN)
        self.assertStoppedCleanly(server, reason)
        self.assertEqual(alice.remoteCloseCode, 1001)
        # The close frame reached the deaf peer; it just never answered.
        self.assertIn(b"\x88", deaf.received)
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 1 + EXIT_MARGIN)
        self.assertIn("shutting down with 1 connections still open", server.output)


class ReloadTests(ProductionMixin, unittest.TestCase):
    """SIGHUP reloads the certificate of a TLS port."""

    def install(self, cert_from, key_from):
        """
        Replace fullchain.pem and privkey.pem (Let's Encrypt's names) in
        --cert-path, each atomically, as the deploy hook in docs/deploy.md.
        """
        for source, name in ((cert_from, "fullchain.pem"), (key_from, "privkey.pem")):
            staged = os.path.join(self.cert_dir, name + ".new")
            shutil.copyfile(source, staged)
            os.replace(staged, os.path.join(self.cert_dir, name))

    def peer_fingerprint(self, client):
        cert = client.transport.getPeerCertificate().to_cryptography()
        return tls.fingerprint(cert)

    @inlineCallbacks
    def test_sighup_serves_the_new_certificate_and_keeps_sessions(self):
        """
        After the files are swapped to certificate B and SIGHUP is sent, a
        new client sees B's fingerprint while a session set up under A keeps
        relaying both ways; the service manager is told ``RELOADING=1`` and
        ``READY=1``. A key that does not match its certificate is then
        refused with one error line, new clients still get B, and the
        process keeps running.
        """
        a = write_certificate(os.path.join(self.workdir, "a"))
        b = write_certificate(os.path.join(self.workdir, "b"))
        os.makedirs(self.cert_dir)
        self.install(a.cert, a.key)
        path, recorder = self.notify_socket()
        port = free_port()
        server = self.spawn_process(
            ["--port", f"ssl:{port}:interface=127.0.0.1", "--cert-path", self.cert_dir],
            env={"NOTIFY_SOCKET": path},
        )
        yield self.poll(lambda: recorder.times("READY=1"), "READY=1", START_TIMEOUT, server)
        alice, bob = yield self.session(port, "alice", "bob", pem=a.pem)
        self.assertEqual(self.peer_fingerprint(alice), self.fingerprint(a))

        self.install(b.cert, b.key)
        server.transport.signalProcess("HUP")
        yield self.poll(
            lambda: "TLS certificate reloaded" in server.output, "the reload log line",
            server=server,
        )
        carol = yield self.hello(port, "carol", pem=b.pem)
        self.assertEqual(self.peer_fingerprint(carol), self.fingerprint(b))
        yield self.assertRelays(alice, bob)
        states = recorder.sequence()
        reloading = states.index("RELOADING=1")
        self.assertIn("READY=1", states[reloading:])
        self.assertTrue(any(s.startswith("MONOTONIC_USEC=") for s in states))

        # B's certificate with A's key: refused, B stays.
        self.install(b.cert, a.key)
        server.transport.signalProcess("HUP")
        yield self.poll(
            lambda: "not reloaded" in server.output, "the refusal log line", server=server
        )
        lines = [l for l in server.output.splitlines() if "not reloaded" in l]
        self.assertEqual(len(lines), 1, server.output)
        self.assertIn("does not match", lines[0])
        self.assertIn(os.path.join(self.cert_dir, "privkey.pem"), lines[0])
        self.assertNotIn("Traceback", server.output)
        dave = yield self.hello(port, "dave", pem=b.pem)
        self.assertEqual(self.peer_fingerprint(dave), self.fingerprint(b))
        yield self.assertRelays(alice, bob, "after the refusal")
        self.assertTrue(server.running)

    def fingerprint(self, files):
        cert, _, _ = tls.load_certificate(tls.CertificateFiles(files.cert, files.key))
        return tls.fingerprint(cert)


class JSONLogTests(ProductionMixin, unittest.TestCase):
    """``--log-format json``: one JSON object per line on stdout."""

    SECRET = "a=fingerprint:sha-256 SECRET-SDP-LINE"

    @inlineCallbacks
    def run_a_call(self, *args):
        """
        Start a server with ``args``, make a session and a room exchange
        carrying :attr:`SECRET`, and stop it.

        :returns: the stopped :class:`OutputProcess`.
        """
        server, port = yield self.start_server(
            "tcp:{port}:interface=127.0.0.1", "--log-format", "json", *args
        )
        alice, bob = yield self.session(port, "alice", "bob")
        yield self.assertRelays(alice, bob, self.SECRET)
        carol = yield self.hello(port, "carol")
        dave = yield self.hello(port, "dave")
        for member in (carol, dave):
            member.send_text("ROOM lobby")
            yield member.next_message()
        yield carol.next_message()  # ROOM_PEER_JOINED dave
        carol.send_text(f"ROOM_PEER_MSG dave {self.SECRET}")
        self.assertEqual((yield dave.next_message()), f"ROOM_PEER_MSG carol {self.SECRET}")
        yield self.close_client(alice)
        _, reason = yield self.terminate(server)
        self.assertStoppedCleanly(server, reason)
        return server

    def records(self, server):
        """:returns: every stdout line parsed, asserting each is one JSON object."""
        records = []
        for line in server.stdout.splitlines():
            record = json.loads(line)
            self.assertIsInstance(record, dict, line)
            self.assertIsInstance(record["time"], float, line)
            self.assertIn(record["level"], ("debug", "info", "warn", "error", "critical"))
            self.assertIsInstance(record["namespace"], str, line)
            self.assertIsInstance(record["message"], str, line)
            records.append(record)
        return records

    @inlineCallbacks
    def test_every_line_is_a_json_object_with_fields_and_no_payload(self):
        """
        Every stdout line is one JSON object with time, level, namespace and
        message, the peer events carry uid and peer_addr fields, the close
        code is a field, nothing goes to stderr, and no payload is logged.
        """
        server = yield self.run_a_call()
        records = self.records(server)
        self.assertEqual(server.stderr, "")
        registered = [r for r in records if r.get("uid") == "alice" and "peer_addr" in r]
        self.assertTrue(registered, server.stdout)
        self.assertTrue(registered[0]["peer_addr"].startswith("tcp4:127.0.0.1:"), registered)
        self.assertTrue(any(r.get("code") == 1000 for r in records), server.stdout)
        self.assertTrue(any(r.get("room_id") == "lobby" for r in records), server.stdout)
        self.assertNotIn("SECRET-SDP-LINE", server.output)
        self.assertNotIn("log-payloads", server.output)

    @inlineCallbacks
    def test_log_payloads_warns_at_startup_and_logs_payloads(self):
        """
        With --log-payloads a warning says so before the server listens,
        and the relayed session and room payloads appear in the log.
        """
        server = yield self.run_a_call("--log-payloads")
        records = self.records(server)
        warnings = [
            i for i, r in enumerate(records)
            if r["level"] == "warn" and "--log-payloads" in r["message"]
        ]
        listening = [i for i, r in enumerate(records) if r["message"].startswith("listening on")]
        self.assertEqual(len(warnings), 1, server.stdout)
        self.assertLess(warnings[0], listening[0])
        with_payload = [r for r in records if "SECRET-SDP-LINE" in json.dumps(r)]
        # Two session messages and one room message.
        self.assertGreaterEqual(len(with_payload), 3, server.stdout)


class NginxTests(ProductionMixin, unittest.TestCase):
    """The shipped ``contrib/nginx/signalling.conf`` in front of the server."""

    EXAMPLE = os.path.join(CONTRIB, "nginx", "signalling.conf")

    def example(self):
        with open(self.EXAMPLE) as f:
            return f.read()

    def nginx_config(self, directory, listen_port, backend_port, cert_dir):
        """
        Write nginx.conf for a non-root nginx in ``directory``, including
        the example with only its addresses and paths replaced.

        :returns: the path of nginx.conf.
        """
        replacements = [
            ("    listen 443 ssl;\n", f"    listen 127.0.0.1:{listen_port} ssl;\n"),
            ("    listen [::]:443 ssl;\n", ""),
            ("server 127.0.0.1:8080;", f"server 127.0.0.1:{backend_port};"),
            ("/etc/letsencrypt/live/signalling.example.org/", cert_dir + "/"),
        ]
        site = self.example()
        for old, new in replacements:
            self.assertIn(old, site, f"the example changed: {old!r} is gone")
            site = site.replace(old, new)
        with open(os.path.join(directory, "signalling.conf"), "w") as f:
            f.write(site)
        temp_paths = "\n".join(
            f"    {kind}_temp_path {directory}/{kind}_temp;"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        config = os.path.join(directory, "nginx.conf")
        with open(config, "w") as f:
            f.write(
                f"worker_processes 1;\n"
                f"pid {directory}/nginx.pid;\n"
                f"error_log {directory}/error.log info;\n"
                f"events {{ worker_connections 256; }}\n"
                f"http {{\n"
                f"    access_log {directory}/access.log;\n"
                f"{temp_paths}\n"
                f"    include {directory}/signalling.conf;\n"
                f"}}\n"
            )
        return config

    @inlineCallbacks
    def start_nginx(self, nginx, backend_port, cert_dir):
        """:returns: ``(nginx process, its port)`` once it accepts connections."""
        directory = os.path.join(self.workdir, "nginx")
        os.makedirs(directory)
        for attempt in range(3):
            port = free_port()
            config = self.nginx_config(directory, port, backend_port, cert_dir)
            process = OutputProcess()
            argv = [nginx, "-e", "stderr", "-p", directory, "-c", config,
                    "-g", "daemon off;"]
            reactor.spawnProcess(process, nginx, argv, env={}, path=directory)
            self.addCleanup(self._stop_nginx, process)

            def accepting():
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    return not process.running
                return True

            yield self.poll(accepting, "nginx listening", START_TIMEOUT)
            if process.running:
                return process, port
            with open(os.path.join(directory, "error.log")) as f:
                log = f.read()
            if "Address already in use" not in log + process.output:
                break
        self.fail(f"nginx did not start:\n{process.output}\n{log}")

    def _stop_nginx(self, process):
        return self._kill(process, signal.SIGQUIT)

    def test_example_outlasts_the_keepalive_interval(self):
        """
        The example's proxy_read_timeout and proxy_send_timeout are longer
        than twice the server's default keepalive interval (ping, then pong).
        """
        for directive in ("proxy_read_timeout", "proxy_send_timeout"):
            match = re.search(rf"^\s*{directive} (\d+)s;", self.example(), re.M)
            self.assertIsNotNone(match, directive)
            self.assertGreater(int(match.group(1)), 2 * DEFAULT_KEEPALIVE)

    @inlineCallbacks
    def test_session_and_health_through_nginx_over_tls(self):
        """
        nginx, configured from the example, terminates TLS and proxies to a
        plaintext server started with --trust-proxy 1: a session relays
        both ways, /health answers, and the server logs the client's own
        address (127.0.0.2) from X-Forwarded-For, never a forged entry the
        client sent itself.
        """
        nginx = require_program("nginx", "nginx", ["/usr/sbin/nginx"])
        cert_dir = os.path.join(self.workdir, "letsencrypt")
        files = write_certificate(cert_dir)
        os.rename(files.cert, os.path.join(cert_dir, "fullchain.pem"))
        os.rename(files.key, os.path.join(cert_dir, "privkey.pem"))
        server, backend = yield self.start_server(
            "tcp:{port}:interface=127.0.0.1", "--trust-proxy", "1"
        )
        proxy, port = yield self.start_nginx(nginx, backend, cert_dir)
        options = {
            "pem": files.pem,
            "bind": ("127.0.0.2", 0),
            "headers": {"X-Forwarded-For": "203.0.113.9"},
        }
        alice, bob = yield self.session(port, "alice", "bob", **options)
        yield self.assertRelays(alice, bob)

        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, contextFactory=TrustOne(files.pem), pool=pool)
        response = yield agent.request(
            b"GET", f"https://localhost:{port}/health".encode("ascii")
        ).addTimeout(REPLY_TIMEOUT, reactor)
        body = yield readBody(response).addTimeout(REPLY_TIMEOUT, reactor)
        self.assertEqual((response.code, body), (200, b"OK\n"))

        self.assertIn("peer alice registered from 127.0.0.2", server.output)
        self.assertIn("peer bob registered from 127.0.0.2", server.output)
        self.assertNotIn("203.0.113.9", server.output)
        self.assertTrue(proxy.running)


class SystemdUnitTests(unittest.TestCase):
    """The shipped units in ``contrib/systemd``."""

    UNITS = os.path.join(CONTRIB, "systemd")
    #: Where the units expect the installed twistd (a venv under /opt).
    TWISTD = "/opt/signalling/bin/twistd"

    def unit_files(self):
        names = sorted(os.listdir(self.UNITS))
        units = [n for n in names if n.endswith((".service", ".socket"))]
        self.assertIn("signalling.service", units)
        self.assertIn("signalling.socket", units)
        self.assertIn("signalling-standalone.service", units)
        return units

    def copy_for_verify(self):
        """
        Copy the units into a temporary directory with ExecStart's
        ``/opt/signalling/bin/twistd`` replaced by an executable that exists
        here, as ``systemd-analyze verify`` checks that it does.

        :returns: the paths of the copies.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        installed = twistd_command()[0]
        copies = []
        for name in self.unit_files():
            with open(os.path.join(self.UNITS, name)) as f:
                text = f.read()
            if name.endswith(".service"):
                self.assertIn(f"ExecStart={self.TWISTD} ", text, name)
                text = text.replace(self.TWISTD, installed)
            path = os.path.join(directory, name)
            with open(path, "w") as f:
                f.write(text)
            copies.append(path)
        return copies

    def verify(self, paths):
        """:returns: ``(exit status, output)`` of systemd-analyze verify."""
        analyze = require_program(
            "systemd-analyze", "systemd", ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        )
        result = subprocess.run(
            [analyze, "verify", *paths],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
        )
        return result.returncode, (result.stdout + result.stderr).strip()

    def test_units_pass_systemd_analyze_verify(self):
        """
        ``systemd-analyze verify`` accepts every unit with no complaint at
        all (a warning such as an unknown key fails too).
        """
        status, output = self.verify(self.copy_for_verify())
        self.assertEqual((status, output), (0, ""))

    def test_verify_catches_a_broken_unit(self):
        """
        The check above is sharp: a copy with a misspelt key and a bad
        value is reported.
        """
        copies = self.copy_for_verify()
        service = [p for p in copies if p.endswith("/signalling.service")][0]
        with open(service) as f:
            text = f.read()
        text = text.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
        with open(service, "w") as f:
            f.write(text.replace("Restart=on-failure", "Restart=sometimes"))
        status, output = self.verify(copies)
        self.assertIn("NoNewPrivilege", output)
        self.assertIn("sometimes", output)

    def exec_start(self, name):
        """:returns: the argv of a unit's ExecStart, unquoted as systemd does."""
        with open(os.path.join(self.UNITS, name)) as f:
            text = f.read().replace("\\\n", " ")
        line = [l for l in text.splitlines() if l.startswith("ExecStart=")][0]
        return shlex.split(line[len("ExecStart="):])

    def test_exec_start_lines_are_valid_signalling_options(self):
        """
        The options in each unit's ExecStart parse, with %d (the
        credentials or certificate directory) standing for a directory, and
        every --port and --metrics-port is a valid endpoint description.
        """
        for name in self.unit_files():
            if not name.endswith(".service"):
                continue
            argv = self.exec_start(name)
            self.assertEqual(argv[0], self.TWISTD, name)
            self.assertIn("--nodaemon", argv)
            args = [a.replace("%d", "/run/credentials/signalling.service")
                    for a in argv[argv.index("signalling") + 1:]]
            config = tap.Options()
            config.parseOptions(args)
            descriptions = list(config["port"])
            if config["metrics-port"]:
                descriptions.append(config["metrics-port"])
            for description in descriptions:
                if description.startswith("tls:"):
                    description = description[len("tls:"):]
                elif tls.is_bare_ssl(description):
                    description = tls.tcp_description(description)
                if description.startswith("systemd:"):
                    continue  # needs an inherited descriptor to parse
                listening.parse(MemoryReactor(), description)

    def test_socket_unit_matches_the_service_port(self):
        """
        signalling.socket listens on IPv4 and IPv6 (one dual-stack socket),
        and signalling.service adopts it as an INET6 socket with our TLS.
        """
        with open(os.path.join(self.UNITS, "signalling.socket")) as f:
            socket_unit = f.read()
        self.assertRegex(socket_unit, r"(?m)^ListenStream=\[::\]:\d+$")
        self.assertRegex(socket_unit, r"(?m)^BindIPv6Only=both$")
        argv = self.exec_start("signalling.service")
        self.assertIn("tls:systemd:domain=INET6:index=0", argv)


#: Runs argv[2:] after setting the prctl options listed in argv[1]
#: (comma-separated numbers, each set to 1), keeping the pid.
_RESTRICT = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for option in filter(None, sys.argv[1].split(",")):
    if libc.prctl(int(option), 1, 0, 0, 0) != 0:
        sys.exit(f"prctl {option}: {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[2], sys.argv[2:])
"""
PR_SET_NO_NEW_PRIVS = 38
#: With PR_MDWE_REFUSE_EXEC_GAIN (1): no memory that is writable and
#: executable, what systemd's MemoryDenyWriteExecute= enforces.
PR_SET_MDWE = 65


class UnitHardeningTests(ProductionMixin, unittest.TestCase):
    """The TLS server under the restrictions the service units ask for."""

    def restrictions(self):
        """
        :returns: the prctl options emulating the service units' settings:
            NoNewPrivileges= and MemoryDenyWriteExecute= (any unit's yes).
        """
        options = set()
        for name in os.listdir(os.path.join(CONTRIB, "systemd")):
            if not name.endswith(".service"):
                continue
            with open(os.path.join(CONTRIB, "systemd", name)) as f:
                settings = f.read().splitlines()
            if "NoNewPrivileges=yes" in settings:
                options.add(PR_SET_NO_NEW_PRIVS)
            if "MemoryDenyWriteExecute=yes" in settings:
                options.add(PR_SET_MDWE)
        return sorted(options)

    @inlineCallbacks
    def test_tls_server_runs_under_the_units_restrictions(self):
        """
        A TLS server started under the restrictions the units set that the
        kernel can apply by itself (NoNewPrivileges= as PR_SET_NO_NEW_PRIVS,
        MemoryDenyWriteExecute= as PR_SET_MDWE) answers HELLO. (pyOpenSSL's
        callbacks need writable and executable memory: under
        MemoryDenyWriteExecute=yes the server cannot start.)
        """
        options = self.restrictions()
        probe = subprocess.run(
            [sys.executable, "-c", _RESTRICT, ",".join(map(str, options)), "/bin/true"],
            capture_output=True, text=True, timeout=30,
        )
        if probe.returncode != 0:
            raise unittest.SkipTest(f"this kernel cannot apply them: {probe.stderr}")
        self.spawn_prefix = (sys.executable, "-c", _RESTRICT, ",".join(map(str, options)))
        files = write_certificate(self.cert_dir)
        server, port = yield self.start_server(
            "ssl:{port}:interface=127.0.0.1", "--cert-path", self.cert_dir
        )
        yield self.hello(port, "restricted", pem=files.pem)


class WorkersUnitTests(ProductionMixin, unittest.TestCase):
    """
    ``contrib/systemd/signalling-workers.service`` as systemd runs it: its
    ExecStart options (with a test Redis, certificate and metrics port), the
    socket handed over as file descriptor 3, ``$NOTIFY_SOCKET`` and
    ``$WATCHDOG_USEC`` read by the test.
    """

    timeout = 90
    UNITS = SystemdUnitTests.UNITS

    @inlineCallbacks
    def test_the_workers_unit_is_ready_once_every_worker_is_serves_and_stops_cleanly(self):
        """
        READY=1 comes once, after both workers are ready, with watchdog pings
        after it; clients on the handed-over socket call each other across
        the workers; SIGTERM (KillMode=mixed: to the main process alone)
        closes them with 1001 and everything exits with status 0.
        """
        from tests._redis import RedisServer

        redis = RedisServer(self)
        yield Deferred.fromCoroutine(redis.start())
        files = write_certificate(self.cert_dir)
        argv = SystemdUnitTests.exec_start(self, "signalling-workers.service")
        options = argv[argv.index("signalling") + 1:]
        replaced = {
            "--cert-path": self.cert_dir,
            "--redis": redis.url,
            "--workers": "2",
            "--metrics-port": f"tcp:{free_port()}:interface=127.0.0.1",
            "--port": "tls:systemd:domain=INET:index=0",
        }
        for i, option in enumerate(options):
            if option in replaced:
                options[i + 1] = replaced[option]
        sock = self.listening_socket()
        port = sock.getsockname()[1]
        path, recorder = self.notify_socket()
        server = self.spawn_process(
            options, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}, inherit=sock,
            own_pid=("WATCHDOG_PID",),
        )
        yield self.poll(lambda: recorder.times("READY=1"), "READY=1", 30, server)
        self.assertEqual(len(re.findall(r"worker \d+ ready", server.output)), 2, server.output)
        yield self.poll(lambda: recorder.times("WATCHDOG=1"), "a watchdog ping", 5, server)
        clients = []
        for i in range(10):
            clients.append((yield self.hello(port, f"w{i}", pem=files.pem)))
        for i in range(0, 10, 2):
            clients[i].send_text(f"SESSION w{i + 1}")
            self.assertEqual((yield clients[i].next_message()), "SESSION_OK")
            yield self.assertRelays(clients[i], clients[i + 1])
        elapsed, reason = yield self.terminate(server, 30)
        self.assertStoppedCleanly(server, reason)
        self.assertEqual(len(recorder.times("READY=1")), 1, recorder.datagrams)
        self.assertEqual({c.remoteCloseCode for c in clients}, {1001})

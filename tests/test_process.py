"""
Tests that start the real ``twistd -n signalling`` process on a free
loopback port and talk to it with real WebSocket and HTTP clients, once in
plaintext and once over TLS with the certificate the server generates.

These are slow (each starts a Python process); keep them few.
"""

import os
import socket
import sys

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, DeferredQueue, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from signalling.server import tls
from tests.helpers import write_certificate

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


class QueueClientProtocol(WebSocketClientProtocol):
    """
    A real Autobahn client whose received messages are taken one at a time
    with :meth:`next_message` (text as ``str``, binary as ``bytes``).
    """

    def __init__(self):
        super().__init__()
        self.opened = Deferred()
        self.lost = Deferred()
        self._messages = DeferredQueue()

    def onOpen(self):
        self.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self._messages.put(payload if isBinary else payload.decode("utf-8"))

    def onClose(self, wasClean, code, reason):
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"closed before open: {code} {reason}"))

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.lost.callback(None)

    def send_text(self, text):
        self.sendMessage(text.encode("utf-8"), isBinary=False)

    def next_message(self):
        """:returns: a Deferred for the next message received."""
        return self._messages.get().addTimeout(REPLY_TIMEOUT, reactor)


def client_factory(url):
    """
    :returns: an Autobahn client factory for ``url`` building
        :class:`QueueClientProtocol`.

    Autobahn's handshake timers are off: every wait here has its own bound,
    and Autobahn's batched timer leaves its pending DelayedCall behind after
    a cancel, which trial reports as a dirty reactor.
    """
    factory = WebSocketClientFactory(url)
    factory.protocol = QueueClientProtocol
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
    return factory


@implementer(IPolicyForHTTPS)
class _TrustOne:
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
    def _kill(self, server):
        if server.running:
            server.transport.signalProcess("TERM")
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


class RunningServerMixin(ProcessMixin):
    """
    A conversation with a real server; subclasses say how to reach it:
    ``scheme`` (ws or wss), ``port_template`` and :meth:`client_endpoint`.
    """

    @inlineCallbacks
    def setUp(self):
        super().setUp()
        self.server, self.port = yield self.start_server(
            self.port_template, "--cert-path", self.cert_dir
        )

    def client_endpoint(self):
        raise NotImplementedError

    def http_agent(self):
        raise NotImplementedError

    @inlineCallbacks
    def connect(self):
        """:returns: an opened WebSocket client (closed again on cleanup)."""
        factory = client_factory(f"{self.scheme}://localhost:{self.port}/")
        client = yield self.client_endpoint().connect(factory)
        self.addCleanup(self._close, client)
        yield client.opened.addTimeout(REPLY_TIMEOUT, reactor)
        return client

    def _close(self, client):
        if not client.lost.called:
            client.sendClose()
        return client.lost.addTimeout(REPLY_TIMEOUT, reactor)

    @inlineCallbacks
    def hello(self, uid):
        """:returns: a client registered as ``uid``."""
        client = yield self.connect()
        client.send_text(f"HELLO {uid}")
        self.assertEqual((yield client.next_message()), "HELLO")
        return client

    @inlineCallbacks
    def get(self, path):
        """:returns: ``(status, body)`` of a plain GET on the server's port."""
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        if self.scheme == "wss":
            agent = Agent(reactor, contextFactory=self.http_policy(), pool=pool)
            scheme = "https"
        else:
            agent = Agent(reactor, pool=pool)
            scheme = "http"
        response = yield agent.request(
            b"GET", f"{scheme}://127.0.0.1:{self.port}{path}".encode("ascii")
        ).addTimeout(REPLY_TIMEOUT, reactor)
        body = yield readBody(response)
        return response.code, body

    @inlineCallbacks
    def test_hello_is_answered_and_a_session_relays_both_ways(self):
        """
        Two clients register, one starts a session with the other, and
        messages are relayed verbatim in both directions.
        """
        alice = yield self.hello("alice")
        bob = yield self.hello("bob")
        alice.send_text("SESSION bob")
        self.assertEqual((yield alice.next_message()), "SESSION_OK")
        offer = '{"sdp": {"type": "offer", "sdp": "v=0\\r\\n"}}'
        alice.send_text(offer)
        self.assertEqual((yield bob.next_message()), offer)
        bob.send_text("HELLO looks like a command but is relayed")
        self.assertEqual(
            (yield alice.next_message()), "HELLO looks like a command but is relayed"
        )

    @inlineCallbacks
    def test_health_check_answers_ok_on_the_same_port(self):
        """A plain GET /health on the WebSocket port answers 200 with OK."""
        status, body = yield self.get("/health")
        self.assertEqual((status, body), (200, b"OK\n"))

    @inlineCallbacks
    def test_server_shuts_down_cleanly_after_use(self):
        """
        After a client has come and gone, SIGTERM stops the server with no
        traceback or unhandled error in its log.
        """
        client = yield self.hello("carol")
        yield self._close(client)
        yield self.stop_server(self.server)

    @inlineCallbacks
    def test_sigint_stops_the_server_with_status_0(self):
        """SIGINT (Ctrl-C) stops the server as SIGTERM does, with status 0."""
        client = yield self.hello("dave")
        yield self._close(client)
        yield self.stop_server(self.server, "INT")


class PlaintextProcessTests(RunningServerMixin, unittest.TestCase):
    """``twistd -n signalling --port tcp:PORT:interface=127.0.0.1``."""

    scheme = "ws"
    port_template = "tcp:{port}:interface=127.0.0.1"

    def client_endpoint(self):
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)

    def test_plaintext_port_leaves_cert_path_alone(self):
        """A tcp: port neither reads nor creates anything in --cert-path."""
        self.assertFalse(os.path.exists(self.cert_dir))


class TLSProcessTests(RunningServerMixin, unittest.TestCase):
    """
    ``twistd -n signalling --port ssl:PORT:interface=127.0.0.1`` with an
    empty ``--cert-path``: the server makes its own certificate, and the
    clients trust exactly that one.
    """

    scheme = "wss"
    port_template = "ssl:{port}:interface=127.0.0.1"

    def pem(self):
        with open(os.path.join(self.cert_dir, "cert.pem"), "rb") as f:
            return f.read()

    def client_endpoint(self):
        return wrapClientTLS(
            optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(self.pem())),
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
        )

    def http_policy(self):
        return _TrustOne(self.pem())

    def test_generated_certificate_is_written_and_logged(self):
        """
        The server writes cert.pem and a private key.pem into --cert-path,
        and its log names the certificate's path and SHA-256 fingerprint.
        """
        cert_file = os.path.join(self.cert_dir, "cert.pem")
        key_file = os.path.join(self.cert_dir, "key.pem")
        self.assertTrue(os.path.isfile(cert_file))
        self.assertEqual(os.stat(key_file).st_mode & 0o777, 0o600)
        cert, _, _ = tls.load_certificate(tls.CertificateFiles(cert_file, key_file))
        fingerprint = tls.fingerprint(cert)
        lines = [l for l in self.server.output.splitlines() if fingerprint in l]
        self.assertEqual(len(lines), 1, self.server.output)
        self.assertIn(cert_file, lines[0])
        self.assertIn("SHA-256", lines[0])

    @inlineCallbacks
    def test_client_trusting_another_certificate_is_refused(self):
        """
        The server really serves the generated certificate: a client that
        trusts only some other certificate fails the TLS handshake.
        """
        other = write_certificate(os.path.join(self.workdir, "other"))
        factory = client_factory(f"wss://localhost:{self.port}/")
        endpoint = wrapClientTLS(
            optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(other.pem)),
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
        )
        client = yield endpoint.connect(factory)
        yield self.assertFailure(
            client.opened.addTimeout(REPLY_TIMEOUT, reactor), ConnectionError
        )
        yield client.lost.addTimeout(REPLY_TIMEOUT, reactor)


class StartupFailureTests(ProcessMixin, unittest.TestCase):
    """What an operator sees when the server cannot start."""

    @inlineCallbacks
    def assertFailsWithOneLine(self, server, *fragments):
        """
        Assert that ``server`` exits with status 1, printing one line that
        contains ``signalling: `` and the fragments, and no traceback.
        """
        reason = yield server.wait(START_TIMEOUT)
        output = server.output
        self.assertEqual(reason.exitCode, 1, output)
        self.assertNotIn("Traceback", output)
        lines = [l for l in output.splitlines() if "signalling: " in l]
        self.assertEqual(len(lines), 1, output)
        for fragment in fragments:
            self.assertIn(fragment, lines[0])
        return lines[0]

    @inlineCallbacks
    def test_key_that_does_not_match_its_certificate_exits_with_one_line(self):
        """
        A cert dir whose key.pem belongs to another certificate: exit status
        1, and the whole output is one line starting with ``signalling:``.
        """
        files = write_certificate(self.cert_dir)
        other = write_certificate(os.path.join(self.workdir, "other"))
        os.replace(other.key, files.key)
        server = self.spawn(
            "--port",
            f"ssl:{free_port()}:interface=127.0.0.1",
            "--cert-path",
            self.cert_dir,
        )
        line = yield self.assertFailsWithOneLine(server, "does not match", files.key)
        self.assertTrue(line.startswith("signalling: "), line)
        self.assertEqual(server.output.strip(), line)

    @inlineCallbacks
    def test_port_in_use_exits_with_one_line(self):
        """
        A port another program holds: exit status 1 with one line naming the
        address, and no traceback.
        """
        holder = reactor.listenTCP(
            0, Factory.forProtocol(Protocol), interface="127.0.0.1"
        )
        self.addCleanup(holder.stopListening)
        port = holder.getHost().port
        server = self.spawn("--port", f"tcp:{port}:interface=127.0.0.1")
        line = yield self.assertFailsWithOneLine(server, f"127.0.0.1:{port}", "--port")
        self.assertIn("in use", line)

    def busy_port(self):
        """:returns: a loopback port another listener holds for the test."""
        holder = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(holder.stopListening)
        return holder.getHost().port

    @inlineCallbacks
    def test_daemon_with_a_port_in_use_exits_with_the_same_line_and_no_pid_file(self):
        """
        Without -n (twistd daemonizes), a --port in use ends the command at
        once with exit status 1 and the same one line as with -n; no pid
        file is left behind.
        """
        port = self.busy_port()
        description = f"tcp:{port}:interface=127.0.0.1"
        foreground = self.spawn("--port", description)
        expected = yield self.assertFailsWithOneLine(foreground, f"127.0.0.1:{port}")
        daemon, pid_file = self.spawn_daemon("--port", description)
        line = yield self.assertFailsWithOneLine(daemon, f"127.0.0.1:{port}", "--port")
        self.assertEqual(line, expected)
        self.assertFalse(os.path.exists(pid_file))

    @inlineCallbacks
    def test_daemon_with_a_metrics_port_in_use_exits_with_one_line_naming_it(self):
        """
        Without -n, a --metrics-port in use ends the command at once with
        exit status 1 and one line naming --metrics-port; no pid file.
        """
        busy = self.busy_port()
        daemon, pid_file = self.spawn_daemon(
            "--port", f"tcp:{free_port()}:interface=127.0.0.1",
            "--metrics-port", f"tcp:{busy}:interface=127.0.0.1",
        )
        line = yield self.assertFailsWithOneLine(daemon, f"127.0.0.1:{busy}", "--metrics-port")
        self.assertIn("in use", line)
        self.assertFalse(os.path.exists(pid_file))

    @inlineCallbacks
    def test_daemon_starts_and_writes_its_pid_file_when_the_port_is_free(self):
        """
        The check that makes a busy port fail at once does not stop a
        daemon whose port is free: twistd returns 0, the daemon serves, and
        its pid file names it.
        """
        port = free_port()
        daemon, pid_file = self.spawn_daemon("--port", f"tcp:{port}:interface=127.0.0.1")
        reason = yield daemon.wait(START_TIMEOUT)
        self.assertEqual(reason.exitCode, 0, daemon.output)
        self.assertTrue(os.path.exists(pid_file))
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2)
        probe = yield endpoint.connect(Factory.forProtocol(Protocol))
        probe.transport.abortConnection()
        with open(pid_file) as f:
            os.kill(int(f.read().strip()), 15)

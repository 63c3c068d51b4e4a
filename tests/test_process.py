"""
Tests that start the real ``twistd -n signalling`` process on a free
loopback port and talk to it with real WebSocket and HTTP clients, once in
plaintext and once over TLS with the certificate the server generates.

These are slow (each starts a Python process); keep them few.
"""

import os

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from signalling.server import tls
from tests.certificates import write_certificate
from tests.servers import ProcessMixin, REPLY_TIMEOUT, START_TIMEOUT, TrustOne, client_factory, free_port

class RunningProcessMixin(ProcessMixin):
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


class PlaintextProcessTests(RunningProcessMixin, unittest.TestCase):
    """``twistd -n signalling --port tcp:PORT:interface=127.0.0.1``."""

    scheme = "ws"
    port_template = "tcp:{port}:interface=127.0.0.1"

    def client_endpoint(self):
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)

    def test_plaintext_port_leaves_cert_path_alone(self):
        """A tcp: port neither reads nor creates anything in --cert-path."""
        self.assertFalse(os.path.exists(self.cert_dir))


class TLSProcessTests(RunningProcessMixin, unittest.TestCase):
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
        return TrustOne(self.pem())

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

"""
A real ``redis-server`` (Debian's package) for the cluster's tests, started
by the test on a free loopback port, with no persistence, and stopped,
killed or restarted (empty, on the same port) at will.
"""

import os
import shutil

from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol

from tests._interop import missing_requirement
from tests.clients import eventually
from tests.servers import free_port


class _RedisProcess(ProcessProtocol):
    def __init__(self):
        self.output = b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(None)


class RedisServer:
    """
    ``redis-server`` on 127.0.0.1.

    :ivar port: its port (kept over a restart).
    """

    def __init__(self, testcase, password=None, tls=None):
        """
        :param password: the password clients must give (``requirepass``).
        :param tls: a :class:`signalling.server.tls.CertificateFiles` to serve
            TLS with (then only TLS, no plaintext port).
        """
        self._testcase = testcase
        self.password = password
        self.tls = tls
        self._process = None
        self.port = None
        self.binary = shutil.which("redis-server") or shutil.which("valkey-server")
        if self.binary is None:
            missing_requirement("redis-server; install the Debian package redis-server")
        self._dir = os.path.abspath(testcase.mktemp())
        os.makedirs(self._dir)
        testcase.addCleanup(self.kill)

    @property
    def url(self):
        if self.tls is not None:
            return f"rediss://localhost:{self.port}/0"
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self):
        return self._process is not None and not self._process.ended.called

    async def start(self):
        """Start it (on a free port the first time, on the same port again after)."""
        for attempt in range(3):
            if not self._keep_port:
                self.port = free_port()
            process = _RedisProcess()
            argv = [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--dir", self._dir, "--logfile", "",
            ]
            if self.password is not None:
                argv += ["--requirepass", self.password]
            if self.tls is not None:
                argv[2] = "0"
                argv += [
                    "--tls-port", str(self.port), "--tls-cert-file", self.tls.cert,
                    "--tls-key-file", self.tls.key, "--tls-ca-cert-file", self.tls.cert,
                    "--tls-auth-clients", "no",
                ]
            reactor.spawnProcess(process, self.binary, argv, env=dict(os.environ))
            self._process = process
            await eventually(
                lambda: b"Ready to accept connections" in process.output or process.ended.called,
                "redis-server to start",
                15,
            )
            if not process.ended.called:
                return
            if b"Address already in use" not in process.output:
                break
        raise AssertionError("redis-server did not start:\n" + process.output.decode(errors="replace"))

    _keep_port = False

    async def restart(self):
        """Kill it and start an empty one on the same port."""
        await self.kill()
        self._keep_port = True
        try:
            await self.start()
        finally:
            self._keep_port = False

    async def kill(self):
        """Stop it at once (SIGKILL)."""
        process = self._process
        if process is not None and not process.ended.called:
            process.transport.signalProcess("KILL")
            await process.ended

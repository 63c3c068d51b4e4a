"""
A real ``redis-server`` (Debian's package) for the cluster's tests, started
by the test on a free loopback port, with no persistence, and stopped,
killed or restarted (empty, on the same port) at will.
"""

import os
import shutil

from twisted.internet import reactor

from tests._interop import missing_requirement
from tests.clients import eventually
from tests.servers import ServerProcess, free_port


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

    async def start(self, keep_port=False):
        """Start it on a free port (or, with ``keep_port``, on the one it had)."""
        for attempt in range(3):
            if not keep_port:
                self.port = free_port()
            process = ServerProcess()
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
                lambda: "Ready to accept connections" in process.output or not process.running,
                "redis-server to start",
                15,
            )
            if process.running:
                return
            if "Address already in use" not in process.output or keep_port:
                break
        raise AssertionError("redis-server did not start:\n" + process.output)

    async def restart(self):
        """Kill it and start an empty one on the same port."""
        await self.kill()
        await self.start(keep_port=True)

    async def kill(self):
        """Stop it at once (SIGKILL)."""
        process = self._process
        if process is not None and process.running:
            process.transport.signalProcess("KILL")
            await process.wait()

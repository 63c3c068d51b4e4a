"""
``--workers N``: one process binds the ports and supervises N worker
processes that accept on them, all on one real Redis (started by the test).
Real ``twistd`` processes, real clients.
"""

import os
import re

from twisted.internet import defer, reactor, task
from twisted.internet.error import ProcessDone
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from signalling.server.tap import Options, _offset_port
from signalling.server.workers import worker_argv
from tests._redis import RedisServer
from tests.clients import eventually
from tests.servers import NotifySocket, ProcessMixin, ROOT, ServerProcess, free_port, twistd_command
from tests.test_cluster import _close_client, client_factory_connect


class WorkerOptionsTests(TestCase):
    """What --workers asks for, and what a worker is started with."""

    def test_workers_need_redis(self):
        """--workers without --redis is a usage error; --workers 1 means no workers."""
        from twisted.python import usage

        with self.assertRaises(usage.UsageError):
            Options().parseOptions(["--workers", "2"])
        options = Options()
        options.parseOptions(["--workers", "2", "--redis", "redis://127.0.0.1:6379/0"])
        self.assertEqual(options["workers"], 2)
        options = Options()
        options.parseOptions(["--workers", "1"])
        self.assertEqual(options["workers"], 0)

    def test_a_worker_gets_the_parents_options_less_workers(self):
        """Every option but --workers (either spelling) is handed to the workers."""
        argv = ["--port", "tcp:1", "--workers", "3", "--redis", "r", "--workers=4", "--health", "/h"]
        self.assertEqual(worker_argv(argv), ["--port", "tcp:1", "--redis", "r", "--health", "/h"])

    def test_each_worker_serves_metrics_on_its_own_port(self):
        """A tcp: --metrics-port moves by the worker's index; other descriptions stay."""
        self.assertEqual(_offset_port("tcp:9100:interface=127.0.0.1", 2), "tcp:9102:interface=127.0.0.1")
        self.assertEqual(_offset_port("tcp:port=9100", 1), "tcp:port=9101")
        self.assertEqual(_offset_port("unix:/run/m.sock", 1), "unix:/run/m.sock")

    def test_bad_worker_fds_are_usage_errors(self):
        """A --worker-fds value that names no socket is refused."""
        from twisted.python import usage

        for spec in ("x", "3:AF_PACKET", "3", "-1:AF_INET"):
            with self.assertRaises(usage.UsageError, msg=spec):
                Options().parseOptions(["--worker-fds", spec])


#: Pairs in the dead-worker test: enough that some pair spans the two
#: workers (all 20 on one side each by chance: about one in a million).
PAIRS = 20


class WorkersTests(ProcessMixin, TestCase):
    """A parent and its workers."""

    timeout = 120

    def setUp(self):
        ProcessMixin.setUp(self)
        return defer.ensureDeferred(self._redis())

    async def _redis(self):
        self.redis = RedisServer(self)
        await self.redis.start()

    def spawn_parent(self, count, *args, environ=None):
        """Start ``twistd -n signalling --workers count`` on a free port; :returns: ``(process, port)``."""
        port = free_port()
        server = ServerProcess()
        argv = twistd_command() + [
            "-n", "--pidfile=", "signalling", "--port", f"tcp:{port}:interface=127.0.0.1",
            "--redis", self.redis.url, "--workers", str(count), *args,
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        env["PYTHONUNBUFFERED"] = "1"
        env.update(environ or {})
        reactor.spawnProcess(server, argv[0], argv, env=env, path=self.workdir)
        self.addCleanup(self._kill, server)
        return server, port

    async def until(self, predicate, what, timeout=30):
        await eventually(predicate, what, timeout)

    def ready_pids(self, server):
        """:returns: ``{index: pid}`` of the workers the parent last said were ready."""
        pids = {}
        for index, pid in re.findall(r"worker (\d+) ready \(pid (\d+)\)", server.output):
            pids[int(index)] = int(pid)
        return pids

    async def all_ready(self, server, count):
        await self.until(lambda: len(self.ready_pids(server)) == count, lambda: f"{count} workers ready:\n{server.output}")

    async def metrics(self, port):
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await Agent(reactor, pool=pool).request(b"GET", f"http://127.0.0.1:{port}/metrics".encode())
        return (await readBody(response)).decode()

    async def hello(self, port, uid):
        client = await client_factory_connect(port)
        self.addCleanup(_close_client, client)
        client.send_text(f"HELLO {uid}")
        await client.expect("HELLO")
        return client

    async def test_workers_share_the_port_and_the_peers(self):
        """
        Two workers accept on the one port; peers that landed on different
        workers call each other and share a room; each worker serves its
        own metrics port, and together they hold every peer.
        """
        metrics_port = free_port()
        server, port = self.spawn_parent(2, "--metrics-port", f"tcp:{metrics_port}:interface=127.0.0.1")
        await self.all_ready(server, 2)
        clients = [await self.hello(port, f"p{i}") for i in range(40)]
        texts = [await self.metrics(metrics_port), await self.metrics(metrics_port + 1)]
        counts = [
            int(float(re.search(r'^signalling_peers\{dialect="examples"\} (\S+)$', text, re.M).group(1)))
            for text in texts
        ]
        self.assertEqual(sum(counts), 40, counts)
        self.assertTrue(all(counts), f"every worker accepts: {counts}")
        for i in range(0, 40, 2):
            clients[i].send_text(f"SESSION p{i + 1}")
            await clients[i].expect("SESSION_OK")
            clients[i].send_text("over")
            await clients[i + 1].expect("over")

    async def test_a_dead_worker_is_started_again_and_its_peers_released(self):
        """
        A worker killed with SIGKILL is started again by the parent; its
        peers' partners on the other worker are closed (1000) and the port
        keeps serving throughout.
        """
        server, port = self.spawn_parent(2)
        await self.all_ready(server, 2)
        pids = self.ready_pids(server)
        clients = [await self.hello(port, f"k{i}") for i in range(PAIRS * 2)]
        for i in range(0, PAIRS * 2, 2):
            clients[i].send_text(f"SESSION k{i + 1}")
            await clients[i].expect("SESSION_OK")
        os.kill(pids[0], 9)
        await self.until(
            lambda: self.ready_pids(server).get(0) not in (None, pids[0]),
            lambda: f"worker 0 to be started again:\n{server.output}",
        )
        self.assertIn("worker 0 (pid", server.output)
        # Every pair with a peer on the dead worker ended on both sides
        # (the other side within the cluster's few seconds); the others relay.
        told = 0
        for i in range(0, PAIRS * 2, 2):
            a, b = clients[i], clients[i + 1]
            if a.is_lost or b.is_lost:
                # The side on the dead worker lost its TCP connection (no
                # close code); the other, if it lived elsewhere, got 1000.
                codes = {(await a.closed(timeout=10))[0], (await b.closed(timeout=10))[0]} - {None}
                self.assertLessEqual(codes, {1000})
                told += bool(codes)
            else:
                a.send_text("still here")
                await b.expect("still here")
        self.assertGreater(told, 0)
        await self.hello(port, "after-the-restart")

    async def test_sighup_is_passed_on_and_sigterm_stops_everything(self):
        """
        SIGHUP reaches every worker (each reloads); SIGTERM closes every
        client with 1001, stops every worker, and the parent exits with 0.
        """
        server, port = self.spawn_parent(2, "--cert-path", self.cert_dir)
        await self.all_ready(server, 2)
        client = await self.hello(port, "stays")
        server.transport.signalProcess("HUP")
        await self.until(
            lambda: server.output.count("reload asked for, but no port serves our TLS") == 2,
            lambda: f"both workers to reload:\n{server.output}",
        )
        pids = list(self.ready_pids(server).values())
        server.transport.signalProcess("TERM")
        code, _ = await client.closed(timeout=15)
        self.assertEqual(code, 1001)
        reason = await server.wait(30)
        self.assertIsInstance(reason, ProcessDone, server.output)
        for pid in pids:
            self.assertFalse(os.path.exists(f"/proc/{pid}") and _alive(pid), pid)

    async def test_systemd_hears_ready_once_every_worker_is_and_the_watchdog_only_while_all_live(self):
        """
        READY=1 goes out once both workers are ready; watchdog pings go out
        while both are alive and stop while one is wedged (SIGSTOP), which
        the parent then kills and starts again, after which pings resume.
        """
        notify = NotifySocket(self)
        server, port = self.spawn_parent(
            2, environ=notify.environ(WATCHDOG_USEC="1000000")
        )
        await self.all_ready(server, 2)
        await self.until(lambda: notify.has(1), "a datagram")
        seen = [line for datagram in notify.datagrams() for line in datagram]
        self.assertIn("READY=1", seen)
        await task.deferLater(reactor, 1.5, lambda: None)
        self.assertIn(["WATCHDOG=1"], notify.datagrams())
        wedged = self.ready_pids(server)[1]
        os.kill(wedged, 19)  # SIGSTOP
        self.addCleanup(lambda: _alive(wedged) and os.kill(wedged, 9))
        await task.deferLater(reactor, 3.5, lambda: None)
        notify.datagrams()
        await task.deferLater(reactor, 2.0, lambda: None)
        self.assertNotIn(["WATCHDOG=1"], notify.datagrams())
        await self.until(
            lambda: self.ready_pids(server).get(1) not in (None, wedged),
            lambda: f"the wedged worker to be replaced:\n{server.output}",
            30,
        )
        await task.deferLater(reactor, 1.5, lambda: None)
        self.assertIn(["WATCHDOG=1"], notify.datagrams())
        await self.hello(port, "after")


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False

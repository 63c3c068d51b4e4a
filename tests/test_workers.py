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
from tests.servers import (
    NotifySocket,
    ProcessMixin,
    ROOT,
    ServerProcess,
    free_port,
    free_ports_in_a_row,
    twistd_command,
)
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


#: Most connections the dead-worker test opens to reach both workers.
MAX_PEERS = 200


def _worker_of(client, pids):
    """:returns: which of the processes ``pids`` holds the server side of ``client``'s connection."""
    local_port = client.transport.getHost().port
    for pid in pids:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
        with open(f"/proc/{pid}/net/tcp") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                remote_port = int(fields[2].split(":")[1], 16)
                if remote_port == local_port and fields[9] in inodes:
                    return pid
    raise AssertionError(f"no process of {list(pids)} holds the connection from port {local_port}")


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
        workers call each other; each worker serves its own metrics port,
        counting its own peers, and together they hold every peer.
        """
        # Worker i serves metrics on the port after the one before.
        metrics_port = free_ports_in_a_row(2)
        server, port = self.spawn_parent(2, "--metrics-port", f"tcp:{metrics_port}:interface=127.0.0.1")
        await self.all_ready(server, 2)
        pids = self.ready_pids(server)
        # At least 40 peers, and more until both workers hold some (the
        # kernel may hand one worker many accepts in a row).
        clients, on = [], {pids[0]: [], pids[1]: []}
        while len(clients) < 40 or not all(on.values()):
            self.assertLess(len(clients), MAX_PEERS, {p: len(c) for p, c in on.items()})
            client = await self.hello(port, f"p{len(clients)}")
            client.uid = f"p{len(clients)}"
            on[_worker_of(client, pids.values())].append(client)
            clients.append(client)
        texts = [await self.metrics(metrics_port), await self.metrics(metrics_port + 1)]
        counts = [
            int(float(re.search(r'^signalling_peers\{dialect="examples"\} (\S+)$', text, re.M).group(1)))
            for text in texts
        ]
        self.assertEqual(sum(counts), len(clients), counts)
        self.assertTrue(all(counts), f"every worker accepts: {counts}")
        self.assertEqual(counts, [len(on[pids[0]]), len(on[pids[1]])])
        # The first pair spans the workers; the rest as they came.
        first = (on[pids[0]][0], on[pids[1]][0])
        rest = [c for c in clients if c not in first]
        for a, b in [first] + list(zip(rest[0::2], rest[1::2])):
            a.send_text(f"SESSION {b.uid}")
            await a.expect("SESSION_OK")
            a.send_text("over")
            await b.expect("over")

    async def test_a_dead_worker_is_started_again_and_its_peers_released(self):
        """
        A worker killed with SIGKILL is started again by the parent; its
        peers' partners on the other worker are closed (1000), a pair on
        the other worker keeps relaying, and the port keeps serving
        throughout.
        """
        server, port = self.spawn_parent(2)
        await self.all_ready(server, 2)
        pids = self.ready_pids(server)
        # Peers until both workers hold two (the kernel may give one worker
        # many accepts in a row); which worker holds a peer, from /proc.
        on = {pids[0]: [], pids[1]: []}
        for i in range(MAX_PEERS):
            client = await self.hello(port, f"k{i}")
            client.uid = f"k{i}"
            on[_worker_of(client, pids.values())].append(client)
            if all(len(held) >= 2 for held in on.values()):
                break
        doomed, survivor = on[pids[0]], on[pids[1]]
        self.assertTrue(len(doomed) >= 2 and len(survivor) >= 2, {p: len(c) for p, c in on.items()})
        pairs = [(doomed[0], survivor[0]), (survivor[1], doomed[1])]
        for a, b in pairs:
            a.send_text(f"SESSION {b.uid}")
            await a.expect("SESSION_OK")
        extra_a = await self._on_worker(port, pids[1], "extra-a", pids.values())
        extra_b = await self._on_worker(port, pids[1], "extra-b", pids.values())
        extra_a.send_text(f"SESSION {extra_b.uid}")
        await extra_a.expect("SESSION_OK")
        os.kill(pids[0], 9)
        await self.until(
            lambda: self.ready_pids(server).get(0) not in (None, pids[0]),
            lambda: f"worker 0 to be started again:\n{server.output}",
        )
        self.assertIn("worker 0 (pid", server.output)
        # The side on the dead worker lost its TCP connection (no close
        # code); its partner on the other worker got 1000, once the cluster
        # released the dead one.
        for a, b in pairs:
            dead, alive = (a, b) if a in doomed else (b, a)
            self.assertEqual((await dead.closed(timeout=10))[0], None)
            self.assertEqual((await alive.closed(timeout=10))[0], 1000)
        extra_a.send_text("still here")
        await extra_b.expect("still here")
        await self.hello(port, "after-the-restart")

    async def _on_worker(self, port, pid, uid, pids, tries=MAX_PEERS):
        """:returns: a client registered as ``uid`` on the worker ``pid`` (others are closed)."""
        for attempt in range(tries):
            client = await self.hello(port, f"{uid}-{attempt}")
            client.uid = f"{uid}-{attempt}"
            if _worker_of(client, pids) == pid:
                return client
            client.close()
            await client.closed()
        self.fail(f"no connection reached worker {pid} in {tries} tries")

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

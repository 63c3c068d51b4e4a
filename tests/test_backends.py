"""
The registry contract (``signalling.core.interfaces``), checked at the registry
level on every backend: the in-memory registry as it is, and behind the
adversarial network of ``tests/backends.py`` with many seeds, so that
results and notifications arrive in every order the contract allows. A new
backend (the cluster's) joins by adding its factory to
:func:`tests.backends.backends`.

The peers are :class:`tests.helpers.FakePeer`: they record every
notification and every relayed message. Each test issues its commands,
lets everything in flight arrive (:meth:`BackendTestCase.settle`), and then
checks results and notifications; the races issue their commands without
settling in between.
"""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from signalling.core.interfaces import (
    AlreadyEngaged,
    NotInRoom,
    PeerBusy,
    PeerNotFound,
    PeerNotInRoom,
    SessionWithSelf,
    UidTaken,
)
from tests.helpers import FakePeer
from tests import backends


class BackendTestCase(unittest.TestCase):
    """
    A backend on a fake clock, and fake peers; or, with ``redis`` set, a
    cluster of that many nodes on a real ``redis-server`` (see
    :class:`tests.backends.RedisCluster`), on the real reactor.
    """

    backend = staticmethod(backends.memory)
    seed = 0
    #: How many cluster nodes on a real Redis (0: the fake-clock backend).
    redis = 0

    def setUp(self):
        if self.redis:
            return defer.ensureDeferred(self._start_cluster())
        self.clock = Clock()
        self.registry = self.backend(self.clock, self.seed)
        return None

    async def _start_cluster(self):
        from tests._redis import RedisServer

        server = RedisServer(self)
        await server.start()
        self.registry = backends.RedisCluster(server.url, self.redis)
        self.addCleanup(self.registry.stop)
        await self.registry.start()

    async def settle(self):
        """Let everything in flight arrive (move the fake clock on, or wait for the cluster)."""
        if self.redis:
            await self.registry.settle()
            return
        while True:
            wait = self.registry.next_delivery()
            if wait is None:
                return
            self.clock.advance(wait)

    def call(self, method, *args):
        """:returns: the Deferred result of a registry command (not yet settled)."""
        return defer.maybeDeferred(method, *args)

    async def ok(self, method, *args):
        """Run a command, let everything arrive, and return its result."""
        d = self.call(method, *args)
        await self.settle()
        return self.successResultOf(d)

    async def refused(self, error, method, *args):
        """Run a command, let everything arrive; it fails with ``error``."""
        d = self.call(method, *args)
        await self.settle()
        return self.failureResultOf(d, error).value

    async def peers(self, *uids):
        """:returns: a registered :class:`FakePeer` for each uid."""
        made = []
        for uid in uids:
            peer = FakePeer(uid)
            await self.ok(self.registry.register, uid, peer)
            made.append(peer)
        return made

    async def session(self, caller="a", callee="b"):
        a, b = await self.peers(caller, callee)
        await self.ok(self.registry.start_session, caller, callee)
        return a, b

    async def room(self, *uids, room_id="r"):
        members = await self.peers(*uids)
        for uid in uids:
            await self.ok(self.registry.join_room, uid, room_id)
        for member in members:
            del member.calls[:]
        return members

    async def assertEmpty(self):
        """No peer, session or room is left (in Redis too, for the cluster)."""
        self.assertTrue(self.registry.is_empty())
        if self.redis:
            self.assertEqual(await self.registry.redis_keys(), [])

    async def remove_all(self, *peers):
        for peer in peers:
            await self.ok(self.registry.remove, peer.name, peer)
        await self.assertEmpty()

    def assertNothingHappened(self, *peers):
        for peer in peers:
            self.assertEqual((peer.calls, peer.frames), ([], []), peer)


class RegistrationConformance(BackendTestCase):
    """register() and remove()."""

    async def test_a_uid_is_held_by_one_peer_and_free_again_after_remove(self):
        """The second peer with a uid is refused; once removed, the uid is free."""
        (a,) = await self.peers("a")
        other = FakePeer("a")
        error = await self.refused(UidTaken, self.registry.register, "a", other)
        self.assertEqual(error.uid, "a")
        self.assertNothingHappened(a, other)
        await self.ok(self.registry.remove, "a", a)
        await self.ok(self.registry.register, "a", other)
        await self.remove_all(other)

    async def test_remove_is_idempotent_and_only_by_the_holder(self):
        """Removing twice, or by a peer that does not hold the uid, changes nothing."""
        (a,) = await self.peers("a")
        await self.ok(self.registry.remove, "a", FakePeer("a"))
        self.assertEqual(self.registry.peer_count, 1)
        await self.ok(self.registry.remove, "a", a)
        await self.ok(self.registry.remove, "a", a)
        await self.assertEmpty()

    async def test_two_registrations_of_one_uid_at_once_register_exactly_one(self):
        """Two peers offer one uid at the same moment: exactly one holds it."""
        first, second = FakePeer("x"), FakePeer("x")
        results = [
            self.call(self.registry.register, "x", first),
            self.call(self.registry.register, "x", second),
        ]
        await self.settle()
        outcomes = []
        for d in results:
            d.addCallbacks(lambda _: outcomes.append("ok"), lambda f: outcomes.append(f.trap(UidTaken)))
        self.assertEqual(sorted(map(str, outcomes)), sorted(["ok", str(UidTaken)]))
        self.assertEqual(self.registry.peer_count, 1)
        holder = first if outcomes[0] == "ok" else second
        await self.remove_all(holder)


class SessionConformance(BackendTestCase):
    """start_session(), links, and the end of a session."""

    async def test_each_partner_is_told_once_and_links_relay_in_order(self):
        """
        Both partners get session_started once (the caller with caller=True),
        and every message sent through a link reaches the partner, in order.
        """
        a, b = await self.session()
        self.assertEqual(a.calls, [("session_started", "b", True)])
        self.assertEqual(b.calls, [("session_started", "a", False)])
        for i in range(20):
            a.send(f"a{i}".encode(), False)
            b.send(bytes([i]), True)
        await self.settle()
        self.assertEqual(b.frames, [(f"a{i}".encode(), False) for i in range(20)])
        self.assertEqual(a.frames, [(bytes([i]), True) for i in range(20)])
        self.assertEqual(self.registry.session_count, 1)
        await self.remove_all(a)

    async def test_removing_one_partner_ends_the_session_for_the_other_once(self):
        """The other partner is removed too, and told once, after every message sent before."""
        a, b = await self.session()
        for i in range(5):
            a.send(f"m{i}".encode(), False)
        await self.ok(self.registry.remove, "a", a)
        self.assertEqual(b.calls[-1], ("session_ended", "a"))
        self.assertEqual([c for c in b.calls if c[0] == "session_ended"], [("session_ended", "a")])
        self.assertEqual(b.frames, [(f"m{i}".encode(), False) for i in range(5)])
        await self.assertEmpty()

    async def test_errors_change_nothing(self):
        """Not found, busy, yourself, already engaged: refused, and nobody is told."""
        a, b = await self.session()
        c, d = await self.peers("c", "d")
        await self.ok(self.registry.join_room, "d", "r")
        del d.calls[:]
        self.assertEqual((await self.refused(PeerNotFound, self.registry.start_session, "c", "zz")).uid, "zz")
        self.assertEqual((await self.refused(PeerBusy, self.registry.start_session, "c", "a")).uid, "a")
        self.assertEqual((await self.refused(PeerBusy, self.registry.start_session, "c", "d")).uid, "d")
        await self.refused(SessionWithSelf, self.registry.start_session, "c", "c")
        self.assertEqual((await self.refused(AlreadyEngaged, self.registry.start_session, "a", "c")).uid, "a")
        await self.refused(AlreadyEngaged, self.registry.join_room, "a", "r")
        self.assertNothingHappened(c, d)
        self.assertEqual(len(a.calls), 1)
        await self.remove_all(a, c, d)

    async def test_crossed_calls_end_in_one_session_each_partner_told_once(self):
        """
        a calls b while b calls a: exactly one call succeeds, the other is
        refused as engaged or busy, and each peer hears of the one session
        exactly once.
        """
        a, b = await self.peers("a", "b")
        ab = self.call(self.registry.start_session, "a", "b")
        ba = self.call(self.registry.start_session, "b", "a")
        await self.settle()
        outcomes = []
        for d in (ab, ba):
            d.addCallbacks(
                lambda _: outcomes.append(None),
                lambda f: outcomes.append(f.trap(AlreadyEngaged, PeerBusy)),
            )
        self.assertEqual(outcomes.count(None), 1, outcomes)
        self.assertEqual(self.registry.session_count, 1)
        started = [call for peer in (a, b) for call in peer.calls]
        self.assertEqual(len(started), 2, started)
        self.assertEqual(sorted(call[2] for call in started), [False, True])
        await self.remove_all(a)

    async def test_callee_leaving_during_set_up_ends_cleanly_either_way(self):
        """
        The callee is removed as it is called: either the call fails (not
        found) and the caller is untouched, or it succeeds and the caller
        hears of the session and then of its end, once each.
        """
        a, b = await self.peers("a", "b")
        call = self.call(self.registry.start_session, "a", "b")
        self.call(self.registry.remove, "b", b)
        await self.settle()
        outcome = []
        call.addCallbacks(lambda _: outcome.append("ok"), lambda f: outcome.append(f.trap(PeerNotFound)))
        if outcome == ["ok"]:
            # Caused by different peers: they may come in either order here
            # (the connection puts them in order).
            self.assertEqual(sorted(a.calls), [("session_ended", "b"), ("session_started", "b", True)])
            await self.assertEmpty()
        else:
            self.assertEqual(outcome, [PeerNotFound])
            self.assertEqual(a.calls, [])
            await self.remove_all(a)


class RoomConformance(BackendTestCase):
    """join_room(), room messages, members, and leaving."""

    async def test_joins_are_told_once_to_the_joiner_and_to_every_member(self):
        """The joiner's list holds the members already there; each member hears of the join once."""
        a, b, c = await self.peers("a", "b", "c")
        for peer in (a, b, c):
            await self.ok(self.registry.join_room, peer.name, "r")
        self.assertEqual(a.calls, [("room_joined", "r", []), ("room_peer_joined", "r", "b"), ("room_peer_joined", "r", "c")])
        self.assertEqual(b.calls, [("room_joined", "r", ["a"]), ("room_peer_joined", "r", "c")])
        self.assertEqual(c.calls, [("room_joined", "r", ["a", "b"])])
        self.assertEqual(await self.ok(self.registry.room_members, "a"), ["b", "c"])
        await self.remove_all(a, b, c)

    async def test_messages_reach_their_member_in_order_and_errors_change_nothing(self):
        """ROOM_PEER_MSG reaches the member in order; each error is refused and nobody is told."""
        a, b = await self.room("a", "b")
        (outsider,) = await self.peers("outsider")
        for i in range(10):
            self.call(self.registry.room_message, "a", "b", f"hello {i}")
        await self.settle()
        self.assertEqual(b.calls, [("room_message", "a", f"hello {i}") for i in range(10)])
        del b.calls[:]
        await self.refused(PeerNotFound, self.registry.room_message, "a", "zz", "x")
        await self.refused(PeerNotInRoom, self.registry.room_message, "a", "outsider", "x")
        await self.refused(NotInRoom, self.registry.room_message, "outsider", "a", "x")
        await self.refused(NotInRoom, self.registry.room_members, "outsider")
        self.assertNothingHappened(a, b, outsider)
        await self.remove_all(a, b, outsider)

    async def test_a_leave_is_told_once_to_every_remaining_member_and_an_empty_room_goes(self):
        """Remaining members hear of a leave once; the last one out takes the room with it."""
        a, b, c = await self.room("a", "b", "c")
        await self.ok(self.registry.remove, "b", b)
        self.assertEqual(a.calls, [("room_peer_left", "r", "b")])
        self.assertEqual(c.calls, [("room_peer_left", "r", "b")])
        await self.remove_all(a, c)
        self.assertEqual(self.registry.room_count, 0)

    async def test_leaving_while_another_joins_is_told_consistently(self):
        """
        a leaves as b joins: b's list holds a and b then hears of a's leave
        once, or it does not hold a and b hears nothing of a; c hears of
        both once.
        """
        a, c = await self.room("a", "c")
        (b,) = await self.peers("b")
        self.call(self.registry.join_room, "b", "r")
        self.call(self.registry.remove, "a", a)
        await self.settle()
        [joined] = [call for call in b.calls if call[0] == "room_joined"]
        # b's join and a's leave are caused by different peers: here they may
        # come in either order (the connection puts them in order).
        if "a" in joined[2]:
            self.assertEqual(sorted(b.calls), [("room_joined", "r", ["a", "c"]), ("room_peer_left", "r", "a")])
        else:
            self.assertEqual(b.calls, [("room_joined", "r", ["c"])])
        self.assertEqual(sorted(c.calls), [("room_peer_joined", "r", "b"), ("room_peer_left", "r", "a")])
        await self.remove_all(b, c)

    async def test_peers_joining_at_once_each_hear_of_every_other_once(self):
        """Five joins at one moment: each peer hears of each other exactly once."""
        peers = await self.peers(*"abcde")
        for peer in peers:
            self.call(self.registry.join_room, peer.name, "r")
        await self.settle()
        for peer in peers:
            [joined] = [call for call in peer.calls if call[0] == "room_joined"]
            heard = list(joined[2])
            heard += [call[2] for call in peer.calls if call[0] == "room_peer_joined"]
            self.assertEqual(sorted(heard), sorted(set("abcde") - {peer.name}), peer.calls)
        await self.remove_all(*peers)


class AdversaryTests(unittest.TestCase):
    """The reordering network really produces the orders the suites are about."""

    def test_results_come_before_and_after_their_notifications_across_seeds(self):
        """
        Over the seeds, a start_session's result arrives sometimes before
        and sometimes after the caller's session_started, and the callee's
        relayed messages sometimes overtake the caller's notification.
        """
        orders = set()
        overtaken = 0
        for seed in range(backends.SEEDS):
            clock = Clock()
            registry = backends.reordering(clock, seed)
            a, b = FakePeer("a"), FakePeer("b")
            events = []
            a.session_started = lambda uid, link, caller, a=a: (
                events.append("notified"), setattr(a, "link", link)
            )
            b.session_started = lambda uid, link, caller, b=b: (
                setattr(b, "link", link), b.send(b"at once", False)
            )
            a.send_frames = lambda frames: events.append("frame")
            for peer in (a, b):
                defer.maybeDeferred(registry.register, peer.name, peer)
            while registry.next_delivery() is not None:
                clock.advance(registry.next_delivery())
            d = defer.maybeDeferred(registry.start_session, "a", "b")
            d.addCallback(lambda _: events.append("result"))
            while registry.next_delivery() is not None:
                clock.advance(registry.next_delivery())
            orders.add(events.index("result") < events.index("notified"))
            overtaken += events.index("frame") < events.index("notified")
        self.assertEqual(orders, {True, False})
        self.assertGreater(overtaken, 0)


def _variants():
    """Each conformance class over every backend of :func:`tests.backends.backends`."""
    made = {}
    for base in (RegistrationConformance, SessionConformance, RoomConformance):
        for label, backend, seed in backends.backends():
            if label == "memory":
                continue
            name = f"{base.__name__}_Reordering{seed}"
            made[name] = type(
                name, (base,), {"backend": staticmethod(backend), "seed": seed, "__module__": __name__}
            )
        for nodes in (1, 3):
            name = f"{base.__name__}_Redis{nodes}Nodes"
            made[name] = type(name, (base,), {"redis": nodes, "timeout": 30, "__module__": __name__})
    return made


globals().update(_variants())

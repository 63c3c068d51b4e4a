"""Tests for signalling.core.registry: peers, sessions and rooms without I/O."""

from twisted.trial import unittest
from zope.interface.verify import verifyObject

from signalling.core.interfaces import (
    AlreadyEngaged,
    IPeer,
    IRegistry,
    NotInRoom,
    PeerBusy,
    PeerNotFound,
    PeerNotInRoom,
    RoomFull,
    SessionWithSelf,
    TooManyRooms,
    UidTaken,
)
from signalling.core.registry import Registry
from tests.helpers import FakePeer



class RegistryTestCase(unittest.TestCase):
    """Creates a registry, and checks at the end that nothing is left."""

    def setUp(self):
        self.registry = Registry()
        self.peers = {}

    def register(self, *uids):
        for uid in uids:
            self.peers[uid] = FakePeer(uid)
            self.registry.register(uid, self.peers[uid])
        return [self.peers[uid] for uid in uids]

    def remove_all_and_check_empty(self):
        for uid, peer in list(self.peers.items()):
            self.registry.remove(uid, peer)
        self.assertTrue(self.registry.is_empty())
        self.assertEqual(
            (self.registry.peer_count, self.registry.session_count, self.registry.room_count),
            (0, 0, 0),
        )


class InterfaceTests(RegistryTestCase):
    """The registry and the fake peer keep the interfaces."""

    def test_registry_provides_iregistry(self):
        """Registry implements every IRegistry method and attribute."""
        self.assertTrue(verifyObject(IRegistry, self.registry))

    def test_fake_peer_provides_ipeer(self):
        """The fake used here is a faithful IPeer."""
        self.assertTrue(verifyObject(IPeer, FakePeer()))


class RegistrationTests(RegistryTestCase):
    """register() and remove()."""

    def test_registered_peer_is_counted(self):
        """A registered peer counts until it is removed."""
        self.register("a", "b")
        self.assertEqual(self.registry.peer_count, 2)
        self.remove_all_and_check_empty()

    def test_second_registration_of_a_uid_is_refused(self):
        """First one wins; the second gets UidTaken and changes nothing."""
        (a,) = self.register("a")
        error = self.assertRaises(UidTaken, self.registry.register, "a", FakePeer())
        self.assertEqual(error.uid, "a")
        self.assertEqual(self.registry.peer_count, 1)
        self.remove_all_and_check_empty()

    def test_uid_is_free_again_once_removed(self):
        """A removed uid can be registered at once by another peer."""
        (a,) = self.register("a")
        self.registry.remove("a", a)
        self.register("a")
        self.remove_all_and_check_empty()

    def test_remove_is_idempotent(self):
        """Removing twice does nothing the second time."""
        (a,) = self.register("a")
        self.registry.remove("a", a)
        self.registry.remove("a", a)
        self.assertTrue(self.registry.is_empty())

    def test_remove_by_a_stale_peer_leaves_the_new_holder_alone(self):
        """A closed connection's late remove() cannot evict the uid's new owner."""
        (old,) = self.register("a")
        self.registry.remove("a", old)
        (new,) = self.register("a")
        self.registry.remove("a", old)
        self.assertEqual(self.registry.peer_count, 1)
        self.remove_all_and_check_empty()


class SessionTests(RegistryTestCase):
    """start_session() and the end of a session."""

    def test_session_links_both_peers_caller_first(self):
        """The caller is told first, then the callee; each gets the other's receiver as its link."""
        a, b = self.register("a", "b")
        order = []
        a.session_started = lambda uid, link, caller: order.append(("a", uid, link, caller))
        b.session_started = lambda uid, link, caller: order.append(("b", uid, link, caller))
        self.registry.start_session("a", "b")
        self.assertEqual(
            order, [("a", "b", b.receiver, True), ("b", "a", a.receiver, False)]
        )
        self.assertEqual(self.registry.session_count, 1)
        self.remove_all_and_check_empty()

    def test_link_relays_to_the_partner(self):
        """What a peer sends through its link reaches the partner unchanged."""
        a, b = self.register("a", "b")
        self.registry.start_session("a", "b")
        a.send(b"offer", False)
        b.send(b"\x00bin", True)
        self.assertEqual(b.frames, [(b"offer", False)])
        self.assertEqual(a.frames, [(b"\x00bin", True)])
        self.remove_all_and_check_empty()

    def test_unknown_callee_is_not_found(self):
        """SESSION to a uid nobody holds raises PeerNotFound with that uid."""
        self.register("a")
        error = self.assertRaises(PeerNotFound, self.registry.start_session, "a", "zz")
        self.assertEqual(error.uid, "zz")
        self.remove_all_and_check_empty()

    def test_calling_yourself_is_refused(self):
        """A session with yourself raises SessionWithSelf."""
        self.register("a")
        self.assertRaises(SessionWithSelf, self.registry.start_session, "a", "a")
        self.assertEqual(self.registry.session_count, 0)
        self.remove_all_and_check_empty()

    def test_callee_in_a_session_is_busy(self):
        """A third peer calling someone in a session gets PeerBusy."""
        a, b, c = self.register("a", "b", "c")
        self.registry.start_session("a", "b")
        for callee in ("a", "b"):
            error = self.assertRaises(PeerBusy, self.registry.start_session, "c", callee)
            self.assertEqual(error.uid, callee)
        self.assertEqual(c.calls, [])
        self.remove_all_and_check_empty()

    def test_callee_in_a_room_is_busy(self):
        """A peer in a room cannot be called."""
        self.register("a", "b")
        self.registry.join_room("b", "r")
        self.assertRaises(PeerBusy, self.registry.start_session, "a", "b")
        self.remove_all_and_check_empty()

    def test_caller_already_engaged_is_refused(self):
        """A peer in a session or a room cannot start another session."""
        self.register("a", "b", "c", "d")
        self.registry.start_session("a", "b")
        self.registry.join_room("c", "r")
        self.assertRaises(AlreadyEngaged, self.registry.start_session, "a", "d")
        self.assertRaises(AlreadyEngaged, self.registry.start_session, "c", "d")
        self.remove_all_and_check_empty()

    def test_caller_that_is_gone_is_not_found(self):
        """A caller removed before its SESSION is handled gets PeerNotFound."""
        a, b = self.register("a", "b")
        self.registry.remove("a", a)
        self.assertRaises(PeerNotFound, self.registry.start_session, "a", "b")
        self.assertEqual(b.calls, [])
        self.remove_all_and_check_empty()

    def test_crossed_calls_first_one_wins(self):
        """A calls B while B calls A: the first is linked, the second is busy."""
        a, b = self.register("a", "b")
        self.registry.start_session("a", "b")
        self.assertRaises(AlreadyEngaged, self.registry.start_session, "b", "a")
        self.assertEqual(a.calls, [("session_started", "b", True)])
        self.assertEqual(b.calls, [("session_started", "a", False)])
        self.remove_all_and_check_empty()

    def test_removing_one_partner_removes_and_tells_the_other(self):
        """The partner is removed at once and told, and its uid is free."""
        a, b = self.register("a", "b")
        self.registry.start_session("a", "b")
        self.registry.remove("a", a)
        self.assertEqual(b.calls[-1], ("session_ended", "a"))
        self.assertTrue(self.registry.is_empty())
        self.register("b")
        self.remove_all_and_check_empty()

    def test_callee_removed_before_the_call_is_not_found(self):
        """The callee disconnecting first makes the SESSION fail cleanly."""
        a, b = self.register("a", "b")
        self.registry.remove("b", b)
        self.assertRaises(PeerNotFound, self.registry.start_session, "a", "b")
        self.assertEqual(a.calls, [])
        self.remove_all_and_check_empty()

    def test_partner_told_of_the_end_sees_a_consistent_registry(self):
        """When session_ended runs, both peers are already gone."""
        a, b = self.register("a", "b")
        self.registry.start_session("a", "b")
        seen = []
        b.session_ended = lambda uid: seen.append(
            (self.registry.peer_count, self.registry.session_count)
        )
        self.registry.remove("a", a)
        self.assertEqual(seen, [(0, 0)])


class RoomTests(RegistryTestCase):
    """join_room(), room_message(), room_members() and leaving."""

    def test_first_member_gets_an_empty_list(self):
        """Joining a new room lists no one."""
        (a,) = self.register("a")
        self.registry.join_room("a", "r")
        self.assertEqual(a.calls, [("room_joined", "r", [])])
        self.assertEqual(self.registry.room_count, 1)
        self.remove_all_and_check_empty()

    def test_joiner_is_told_first_then_members_in_join_order(self):
        """ROOM_OK goes to the joiner before any JOINED notice goes out."""
        a, b, c = self.register("a", "b", "c")
        self.registry.join_room("a", "r")
        self.registry.join_room("b", "r")
        order = []
        c.room_joined = lambda room_id, members: order.append(("c", list(members)))
        a.room_peer_joined = lambda room_id, uid: order.append(("a", uid))
        b.room_peer_joined = lambda room_id, uid: order.append(("b", uid))
        self.registry.join_room("c", "r")
        self.assertEqual(order, [("c", ["a", "b"]), ("a", "c"), ("b", "c")])
        self.remove_all_and_check_empty()

    def test_members_exclude_yourself(self):
        """room_members() lists the others in join order."""
        self.register("a", "b", "c")
        for uid in ("b", "a", "c"):
            self.registry.join_room(uid, "r")
        self.assertEqual(self.registry.room_members("a"), ["b", "c"])
        self.assertEqual(self.registry.room_members("c"), ["b", "a"])
        self.remove_all_and_check_empty()

    def test_rooms_are_separate(self):
        """Members of one room do not see another room's members."""
        a, b = self.register("a", "b")
        self.registry.join_room("a", "r1")
        self.registry.join_room("b", "r2")
        self.assertEqual(self.registry.room_members("a"), [])
        self.assertEqual(a.calls, [("room_joined", "r1", [])])
        self.assertRaises(PeerNotInRoom, self.registry.room_message, "a", "b", "x")
        self.remove_all_and_check_empty()

    def test_room_message_reaches_only_the_target(self):
        """A message is handed to its target with the sender's uid."""
        a, b, c = self.register("a", "b", "c")
        for uid in ("a", "b", "c"):
            self.registry.join_room(uid, "r")
        self.registry.room_message("a", "b", " hi  there ")
        self.assertEqual(b.calls[-1], ("room_message", "a", " hi  there "))
        self.assertNotIn("room_message", [call[0] for call in c.calls + a.calls])
        self.remove_all_and_check_empty()

    def test_room_message_errors(self):
        """Unknown target, target outside the room, sender outside any room."""
        self.register("a", "b", "c")
        self.registry.join_room("a", "r")
        self.registry.join_room("b", "other")
        self.assertRaises(PeerNotFound, self.registry.room_message, "a", "zz", "x")
        self.assertRaises(PeerNotInRoom, self.registry.room_message, "a", "b", "x")
        self.assertRaises(PeerNotInRoom, self.registry.room_message, "a", "c", "x")
        self.assertRaises(NotInRoom, self.registry.room_message, "c", "a", "x")
        self.assertRaises(NotInRoom, self.registry.room_members, "c")
        self.remove_all_and_check_empty()

    def test_peer_in_a_room_cannot_join_again(self):
        """A peer is in at most one room."""
        self.register("a")
        self.registry.join_room("a", "r")
        self.assertRaises(AlreadyEngaged, self.registry.join_room, "a", "r2")
        self.assertRaises(AlreadyEngaged, self.registry.join_room, "a", "r")
        self.assertEqual(self.registry.room_members("a"), [])
        self.remove_all_and_check_empty()

    def test_peer_in_a_session_cannot_join_a_room(self):
        """A peer is never in a room and a session at once."""
        self.register("a", "b")
        self.registry.start_session("a", "b")
        self.assertRaises(AlreadyEngaged, self.registry.join_room, "b", "r")
        self.assertEqual(self.registry.room_count, 0)
        self.remove_all_and_check_empty()

    def test_leaving_tells_the_remaining_members(self):
        """Every remaining member gets exactly one LEFT; the room goes when empty."""
        a, b, c = self.register("a", "b", "c")
        for uid in ("a", "b", "c"):
            self.registry.join_room(uid, "r")
        self.registry.remove("b", b)
        self.assertEqual(a.calls[-1], ("room_peer_left", "r", "b"))
        self.assertEqual(c.calls[-1], ("room_peer_left", "r", "b"))
        self.assertNotIn(("room_peer_left", "r", "b"), b.calls)
        self.registry.remove("a", a)
        self.registry.remove("c", c)
        self.assertEqual(self.registry.room_count, 0)
        self.assertTrue(self.registry.is_empty())

    def test_leave_while_another_joins_never_shows_an_unseen_peer(self):
        """
        Interleave joins and leaves: every member sees the JOINED of each later
        joiner and the LEFT of each earlier leaver once, and never a LEFT for a
        peer it never saw.
        """
        uids = [f"p{i}" for i in range(6)]
        peers = dict(zip(uids, self.register(*uids)))
        script = [
            ("join", "p0"), ("join", "p1"), ("join", "p2"), ("leave", "p1"),
            ("join", "p3"), ("leave", "p0"), ("join", "p4"), ("leave", "p3"),
            ("join", "p5"), ("leave", "p2"),
        ]
        for action, uid in script:
            if action == "join":
                self.registry.join_room(uid, "r")
            else:
                self.registry.remove(uid, peers[uid])
        for uid, peer in peers.items():
            seen = set()
            for call in peer.calls:
                if call[0] == "room_joined":
                    seen.update(call[2])
                elif call[0] == "room_peer_joined":
                    self.assertNotIn(call[2], seen)
                    seen.add(call[2])
                elif call[0] == "room_peer_left":
                    self.assertIn(call[2], seen, f"{uid} saw LEFT of unseen {call[2]}")
                    seen.discard(call[2])
        self.assertEqual(self.registry.room_members("p4"), ["p5"])
        self.assertEqual(
            peers["p4"].calls,
            [
                ("room_joined", "r", ["p2", "p3"]),
                ("room_peer_left", "r", "p3"),
                ("room_peer_joined", "r", "p5"),
                ("room_peer_left", "r", "p2"),
            ],
        )
        self.remove_all_and_check_empty()

    def test_uid_not_registered_cannot_join(self):
        """join_room for an unknown uid raises PeerNotFound and leaves no room."""
        self.assertRaises(PeerNotFound, self.registry.join_room, "ghost", "r")
        self.assertTrue(self.registry.is_empty())


class LimitTests(unittest.TestCase):
    """A registry's room limits: refused, and nothing changes."""

    def test_a_full_room_refuses_one_more_member(self):
        """The member past max_room_members gets RoomFull; the room is untouched."""
        registry = Registry(max_room_members=2)
        peers = [FakePeer(uid) for uid in "abc"]
        for peer in peers:
            registry.register(peer.name, peer)
        registry.join_room("a", "r")
        registry.join_room("b", "r")
        error = self.assertRaises(RoomFull, registry.join_room, "c", "r")
        self.assertEqual(error.uid, "r")
        self.assertEqual(registry.room_members("a"), ["b"])
        self.assertEqual(peers[2].calls, [])
        registry.join_room("c", "other")
        for peer in peers:
            registry.remove(peer.name, peer)
        self.assertTrue(registry.is_empty())

    def test_a_new_room_past_max_rooms_is_refused_but_existing_ones_take_members(self):
        """Past max_rooms a new room is refused with TooManyRooms; joining one that exists is not."""
        registry = Registry(max_rooms=1)
        peers = [FakePeer(uid) for uid in "abc"]
        for peer in peers:
            registry.register(peer.name, peer)
        registry.join_room("a", "r")
        self.assertEqual(self.assertRaises(TooManyRooms, registry.join_room, "b", "s").uid, "s")
        registry.join_room("b", "r")
        registry.remove("a", peers[0])
        registry.remove("b", peers[1])
        registry.join_room("c", "s")
        self.assertEqual(registry.room_count, 1)
        registry.remove("c", peers[2])
        self.assertTrue(registry.is_empty())

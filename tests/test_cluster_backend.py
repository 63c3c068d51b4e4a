"""
The cluster node's own logic (:class:`signalling.cluster.backend.ClusterRegistry`)
on a fake store and a fake clock: what it does when Redis goes away and
comes back, its heartbeat, probes of another node's peer, and how it reads
its channel; and that the channel's kinds, the dialects' codes and the
kinds of refusal are the same in the Lua scripts as in Python. (The scripts
themselves run on a real Redis in ``tests/test_backends.py`` and
``tests/test_cluster.py``.)
"""

import pathlib
import re

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from signalling.cluster import channel, peers, scripts
from signalling.cluster.backend import ClusterRegistry
from signalling.cluster.channel import DIALECT_EXAMPLES, Kind, decode_frames, encode_frames, header
from signalling.core.interfaces import (
    BINARY_FRAME,
    ERRORS_BY_KIND,
    TEXT_FRAME,
    JsonRefused,
    Unavailable,
)
from tests.helpers import FakePeer


class FakeStore:
    """Records what the node asks of Redis; the test answers."""

    def __init__(self):
        self.calls = []
        self.published = []

    def call(self, name, *args):
        d = defer.Deferred()
        self.calls.append((name, args, d))
        return d

    def publish(self, node, payload):
        self.published.append((node, payload))

    def answer(self, name, reply):
        """Answer the oldest pending call of script ``name``."""
        for i, (called, args, d) in enumerate(self.calls):
            if called == name and not d.called:
                d.callback(reply)
                return args
        raise AssertionError(f"no pending {name}: {self.calls}")


Peer = FakePeer


class NodeTestCase(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.store = FakeStore()
        self.node = ClusterRegistry(self.store, self.clock, node="here")
        self.node.store_up()
        self.store.answer("resync", [])
        self.assertTrue(self.node.up)

    def register(self, uid):
        peer = Peer(uid)
        d = self.node.register(uid, peer)
        args = self.store.answer("register", b"ok")
        self.successResultOf(d)
        return peer, args[2]

    def deliver(self, kind, conns, *fields):
        self.node.delivered(header(kind, conns) + "\0".join(fields).encode())


class SameNodeSessionTests(NodeTestCase):
    def test_a_callee_on_the_callers_node_starts_with_the_callers_notice(self):
        """
        A session within the node: the callee starts its session as the
        caller hears of it, before the callee's own notice comes through the
        channel. The caller's first message can reach the callee before that
        notice, and a callee that answers it must already be in its session
        (a fast client's answer was refused as an unknown command). Its own
        notice then changes nothing.
        """
        a, a_conn = self.register("a")
        b, b_conn = self.register("b")
        self.deliver(Kind.SESSION_STARTED, a_conn, "b", "here", b_conn, "1")
        self.assertEqual(a.calls[-1], ("session_started", "b", True))
        self.assertEqual(b.calls[-1], ("session_started", "a", False))
        a.send(b"offer", False)
        b.send(b"answer", False)
        self.assertEqual((a.frames, b.frames), ([(b"answer", False)], [(b"offer", False)]))
        calls = list(b.calls)
        self.deliver(Kind.SESSION_STARTED, b_conn, "a", "here", a_conn, "0")
        self.assertEqual(b.calls, calls)
        b.send(b"again", False)
        self.assertEqual(a.frames[-1], (b"again", False))

    def test_a_callee_on_another_node_starts_with_its_own_notice(self):
        """Across nodes, each side starts with its own notice, as before."""
        a, a_conn = self.register("a")
        self.deliver(Kind.SESSION_STARTED, a_conn, "far", "there", "7", "1")
        self.assertEqual(a.calls[-1], ("session_started", "far", True))


class OutageTests(NodeTestCase):
    def test_losing_redis_ends_what_spans_nodes_and_keeps_what_does_not(self):
        """
        A peer in a session with another node's peer is told the session
        ended; a room member is closed as unavailable; a session within the
        node and an idle peer are untouched and the local session relays.
        """
        far, far_conn = self.register("far")
        a, a_conn = self.register("a")
        b, b_conn = self.register("b")
        member, member_conn = self.register("member")
        idle, _ = self.register("idle")
        self.deliver(Kind.SESSION_STARTED, far_conn, "x", "there", "7", "1")
        self.deliver(Kind.SESSION_STARTED, a_conn, "b", "here", b_conn, "1")
        self.deliver(Kind.SESSION_STARTED, b_conn, "a", "here", a_conn, "0")
        self.deliver(Kind.ROOM_JOINED, member_conn, "r", "")
        told = []
        self.node.watchers.append(told.append)
        self.node.store_down()
        self.assertEqual((self.node.up, self.node.outages, told), (False, 1, [False]))
        self.assertEqual(far.calls[-1], ("session_ended", "x"))
        self.assertEqual(member.calls[-1], ("unavailable",))
        self.assertEqual(idle.calls, [])
        a.send(b"still", False)
        self.assertEqual(b.frames, [(b"still", False)])
        self.assertEqual(self.node.peer_count, 3)

    def test_commands_during_an_outage_are_refused_at_once(self):
        """Register, call, join and JSON requests raise Unavailable; nothing reaches the store."""
        (a, _), = [self.register("a")]
        self.node.store_down()
        before = len(self.store.calls)
        self.assertRaises(Unavailable, self.node.register, "new", Peer("new"))
        self.assertRaises(Unavailable, self.node.start_session, "a", "b")
        self.assertRaises(Unavailable, self.node.join_room, "a", "r")
        self.assertRaises(Unavailable, self.node.json_peers, "producer")
        self.assertEqual(len(self.store.calls), before)

    def test_a_close_during_an_outage_ends_a_session_within_the_node(self):
        """The partner on this node is told at once, and both are let go; Redis is told at the resync."""
        a, a_conn = self.register("a")
        b, b_conn = self.register("b")
        self.deliver(Kind.SESSION_STARTED, a_conn, "b", "here", b_conn, "1")
        self.deliver(Kind.SESSION_STARTED, b_conn, "a", "here", a_conn, "0")
        self.node.store_down()
        before = len(self.store.calls)
        self.assertIsNone(self.node.remove("a", a))
        self.assertEqual(b.calls[-1], ("session_ended", "a"))
        self.assertTrue(self.node.is_empty())
        self.assertEqual(len(self.store.calls), before)

    def test_the_resync_claims_what_the_node_holds_and_replaces_peers_whose_uid_went(self):
        """
        Back from an outage, the node sends every live peer (uid, conn,
        dialect, partner); a uid another node took meanwhile closes its
        peer here (replaced); then the node serves again.
        """
        a, a_conn = self.register("a")
        b, b_conn = self.register("b")
        lost, lost_conn = self.register("lost")
        self.deliver(Kind.SESSION_STARTED, a_conn, "b", "here", b_conn, "1")
        self.deliver(Kind.SESSION_STARTED, b_conn, "a", "here", a_conn, "0")
        self.node.store_down()
        self.node.store_up()
        self.assertFalse(self.node.up)
        args = self.store.answer("resync", [b"lost"])
        self.assertEqual(args[:2], ("here", "5000"))
        peers = [args[i:i + 4] for i in range(2, len(args), 4)]
        self.assertEqual(
            sorted(peers),
            sorted([
                ("a", a_conn, DIALECT_EXAMPLES, "b"),
                ("b", b_conn, DIALECT_EXAMPLES, "a"),
                ("lost", lost_conn, DIALECT_EXAMPLES, ""),
            ]),
        )
        self.assertEqual(lost.calls, [("replaced",)])
        self.assertTrue(self.node.up)
        self.assertEqual(self.node.peer_count, 2)


class HeartbeatTests(NodeTestCase):
    def test_a_node_found_released_by_the_others_resynchronises(self):
        """A heartbeat answered 'reaped' stops serving and resynchronises; released nodes are counted."""
        self.node.start()
        self.addCleanup(self.node.stop)
        self.clock.advance(1.0)
        self.store.answer("heartbeat", 2)
        self.assertEqual(self.node.nodes_released, 2)
        self.clock.advance(1.0)
        self.store.answer("heartbeat", b"reaped")
        self.assertFalse(self.node.up)
        self.store.answer("resync", [])
        self.assertTrue(self.node.up)
        self.assertEqual(self.node.resyncs, 2)

    def test_no_heartbeat_while_redis_is_away(self):
        """While Redis is away the node sends no heartbeat (the store would fail it anyway)."""
        self.node.start()
        self.addCleanup(self.node.stop)
        self.node.store_down()
        before = len(self.store.calls)
        self.clock.advance(5.0)
        self.assertEqual(len(self.store.calls), before)


class ProbeTests(NodeTestCase):
    def test_a_holder_on_a_node_that_does_not_answer_counts_as_silent(self):
        """The probe goes to the holder's node; with no answer within the timeout (+1 s) it is False."""
        d = self.node.probes.ask("x", 0.5)
        self.store.answer("locate", [b"ok", [b"there", b"4"]])
        [(node, payload)] = self.store.published
        self.assertEqual(node, "there")
        self.assertTrue(payload.startswith(Kind.PROBE + b"4\0here\0"))
        self.assertNoResult(d)
        self.clock.advance(1.5)
        self.assertEqual(self.successResultOf(d), (False, ("there", "4")))

    def test_the_holders_node_answers_alive(self):
        """The holder's node's answer (PROBE_ANSWER, alive) ends the probe with True at once."""
        d = self.node.probes.ask("x", 0.5)
        self.store.answer("locate", [b"ok", [b"there", b"4"]])
        token = self.store.published[0][1].split(b"\0")[2]
        self.node.delivered(Kind.PROBE_ANSWER + b"\0" + b"1" + token)
        self.assertEqual(self.successResultOf(d), (True, ("there", "4")))

    def test_a_probe_asked_of_this_node_pings_its_peer_and_answers(self):
        """Another node's PROBE pings the local holder and answers on the asker's channel."""
        peer, conn = self.register("held")
        peer.alive = False
        self.deliver(Kind.PROBE, conn, "asker", "tok", "0.5")
        self.assertEqual(peer.calls[-1], ("probe", 0.5))
        self.assertEqual(self.store.published[-1], ("asker", Kind.PROBE_ANSWER + b"\x000tok"))


class ChannelTests(NodeTestCase):
    def test_relayed_frames_survive_the_trip(self):
        """Frames relayed to another node's peer are encoded and decoded unchanged, empty ones too."""
        frames = [(TEXT_FRAME, b"hello"), (BINARY_FRAME, b"\x00\x01"), (TEXT_FRAME, b"")]
        self.assertEqual(decode_frames(encode_frames(frames)), frames)

    def test_messages_for_a_connection_that_left_are_dropped(self):
        """Notifications and frames for a connection no longer here touch nobody."""
        peer, conn = self.register("a")
        self.node.remove("a", peer)
        self.deliver(Kind.ROOM_MESSAGE, conn, "b", "hi")
        self.node.delivered(header(Kind.RELAYED_FRAMES, conn) + encode_frames([(TEXT_FRAME, b"x")]))
        self.assertEqual((peer.calls, peer.frames), ([], []))

    def test_a_room_message_keeps_its_text_whole(self):
        """A room message's text is the last field: whatever it holds reaches the member as sent."""
        peer, conn = self.register("a")
        self.deliver(Kind.ROOM_MESSAGE, conn, "b", "a\0b c")
        self.assertEqual(peer.calls, [("room_message", "b", "a\0b c")])


def lua_calls(source, function):
    """:returns: the arguments (Lua text) of every call of ``function`` in ``source``, its definition left out."""
    calls = []
    for match in re.finditer(r"(?<![\w.])" + function + r"\(", source):
        if source.endswith("function ", 0, match.start()):
            continue
        args, current, depth, quote = [], "", 0, None
        i = match.end()
        while True:
            c = source[i]
            if quote:
                if c == "\\":
                    c += source[i + 1]
                    i += 1
                elif c == quote:
                    quote = None
            elif c in "'\"":
                quote = c
            elif c in "({[":
                depth += 1
            elif c in ")}]" and depth:
                depth -= 1
            elif c == ")" or (c == "," and not depth):
                args.append(current.strip())
                current = ""
                if c == ")":
                    break
                i += 1
                continue
            current += c
            i += 1
        calls.append(args)
    return calls


class SharedNamesTests(unittest.TestCase):
    """The Lua and the Python side of the cluster name its kinds and codes from one table."""

    lua = scripts._PRELUDE + "".join(scripts.SCRIPTS.values())

    def test_every_kind_is_one_letter_of_its_own_with_a_handler(self):
        """The kinds are distinct letters, and the node's channel has a handler for each of them."""
        values = list(channel.KINDS.values())
        self.assertEqual(len(set(values)), len(values))
        self.assertTrue(all(len(v) == 1 and v.isalpha() for v in values), values)
        self.assertEqual(set(peers.HANDLERS), set(values))

    def test_every_kind_the_lua_publishes_is_one_the_python_decodes(self):
        """Each notify and multicast of the scripts names a kind (never a literal) that has a handler."""
        kinds = [args[2] for args in lua_calls(self.lua, "notify")]
        kinds += [args[1] for args in lua_calls(self.lua, "multicast")]
        # multicast hands its kind on to notify.
        self.assertEqual(kinds.count("kind"), 1)
        kinds.remove("kind")
        self.assertGreater(len(kinds), 10)
        for kind in kinds:
            with self.subTest(kind=kind):
                self.assertIn(kind, channel.KINDS)
                self.assertIn(channel.KINDS[kind], peers.HANDLERS)
        self.assertEqual(
            set(kinds),
            set(channel.KINDS) - {"RELAYED_FRAMES", "PROBE", "PROBE_ANSWER", "ASK", "ASK_ANSWER"},
            "every notification a handler reads is one a script publishes",
        )

    def test_every_refusal_the_lua_answers_is_one_the_python_decodes(self):
        """Each refusal of the scripts is named, and its name reads back as its exception."""
        names = channel.lua_names()
        kinds = [args[0] for args in lua_calls(self.lua, "err")]
        kinds += re.findall(r"\{'err', (\w+)", self.lua)
        # err hands its kind on to the answer.
        self.assertEqual(kinds.count("kind"), 1)
        kinds.remove("kind")
        self.assertGreater(len(kinds), 10)
        for kind in set(kinds):
            with self.subTest(kind=kind):
                self.assertIn(kind, names)
                reply = [b"err", names[kind].encode(), b"x", b"", b"y", b""]
                error = self.assertRaises(Exception, channel.answer, reply)
                expected = ERRORS_BY_KIND.get(names[kind], JsonRefused)
                self.assertIs(type(error), expected)
        self.assertEqual(
            {names[kind] for kind in kinds} - {"json", "json_roles"}, set(ERRORS_BY_KIND)
        )

    def test_the_scripts_name_every_dialect(self):
        """No script compares a dialect with a literal: each is a DIALECT_ name of the table."""
        self.assertEqual(re.findall(r"[=~]=\s*'[A-Za-z]'", self.lua), [])
        used = set(re.findall(r"\bDIALECT_\w+", self.lua))
        self.assertEqual(used, {"DIALECT_EXAMPLES", "DIALECT_JSON"})
        self.assertEqual(
            {name: channel.lua_names()[name] for name in used},
            {"DIALECT_EXAMPLES": channel.DIALECT_EXAMPLES, "DIALECT_JSON": channel.DIALECT_JSON},
        )

    def test_every_script_starts_with_the_names(self):
        """The Lua each node loads declares every name of the table first."""
        for name in scripts.SCRIPTS:
            with self.subTest(script=name):
                self.assertTrue(scripts.source(name).startswith(channel.lua_constants()))
        self.assertIn("local SESSION_STARTED = '" + Kind.SESSION_STARTED.decode() + "'\n", channel.lua_constants())

    def test_no_other_module_of_the_cluster_writes_a_kind_or_a_code(self):
        """Outside channel.py, the cluster's Python names kinds and dialects; it spells none."""
        folder = pathlib.Path(channel.__file__).parent
        for path in sorted(folder.glob("*.py")):
            if path.name == "channel.py":
                continue
            with self.subTest(module=path.name):
                self.assertEqual(re.findall(r'\bb?"[A-Za-z]"', path.read_text()), [])


class JsonCountTests(NodeTestCase):
    def welcome(self, peer_id):
        peer = Peer(peer_id)
        peer.json_session_started = lambda *a: peer.calls.append(("started",) + a)
        peer.json_session_ended = lambda *a: peer.calls.append(("ended",) + a)
        d = self.node.welcome(peer_id, peer)
        args = self.store.answer("register", b"ok")
        self.successResultOf(d)
        return peer, args[2]

    def test_json_sessions_are_counted_on_their_consumers_node(self):
        """
        A session this node's peer consumes counts from its start until the
        other side ends it, the peer ends it, or the peer gives up the
        consumer role (which ended them).
        """
        peer, conn = self.welcome("c")
        for session_id in ("s1", "s2", "s3"):
            self.deliver(Kind.CONSUMER_SESSION_STARTED, conn, "producer", session_id)
        self.assertEqual(self.node.json_session_count, 3)
        self.deliver(Kind.JSON_SESSION_ENDED, conn, "s1", "")
        self.assertEqual(self.node.json_session_count, 2)
        d = self.node.end_json_session("c", "s2")
        self.store.answer("end_json_session", b"ok")
        self.successResultOf(d)
        self.assertEqual(self.node.json_session_count, 1)
        d = self.node.set_peer_status("c", ["listener"], "null", None)
        self.store.answer("set_peer_status", b"ok")
        self.assertEqual(self.node.json_session_count, 1, "it never had the consumer role")
        d = self.node.set_peer_status("c", ["consumer"], "null", None)
        self.store.answer("set_peer_status", b"ok")
        d = self.node.set_peer_status("c", [], "null", None)
        self.store.answer("set_peer_status", b"ok")
        self.assertEqual(self.node.json_session_count, 0)

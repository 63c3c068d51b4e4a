"""
The bounds every dialect gets from the shared path (issue 19), checked in
memory on one fake clock with real Autobahn clients: input held while a
command waits, output counted before it is queued, the size and depth of
what is parsed and kept, and client text echoed into errors and logs. The
real process, both backends and both transports are in
``tests/test_adversarial.py``.
"""

import json

from twisted.internet import defer
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from signalling.core import json_wire
from signalling.core.connection import HELD_INPUT, MAX_HELD_INPUT
from signalling.core.echo import ECHO_LIMIT, clip, quote
from tests.backends import Memory
from tests.servers import Loopback


def obj(text):
    return json.loads(text)


class Stalling(Memory):
    """The in-memory registry, with every JSON ``peer`` message answered only when told."""

    def __init__(self):
        super().__init__()
        self.stalled = []

    def json_message(self, peer_id, message):
        super().json_message(peer_id, message)
        d = defer.Deferred()
        self.stalled.append(d)
        return d

    def answer_all(self):
        stalled, self.stalled = self.stalled, []
        for d in stalled:
            d.callback(None)


def read_pauses(client):
    """:returns: why the server side of ``client`` does not read from it."""
    return client.server._read_pauses


class HeldInputTests(unittest.TestCase):
    """Input that arrives while a command is pending is held, up to a bound."""

    def test_a_hello_waiting_on_a_reclaim_probe_stops_reading_once_the_bound_is_held(self):
        """
        Examples' dialect: while a HELLO waits for the silent holder of its
        uid to answer a ping, what the newcomer sends next is held; past
        MAX_HELD_INPUT bytes, reading stops. Once the uid is taken over, the
        held input is handled in order and reading resumes.
        """
        net = Loopback(self, reclaim_timeout=2.0, dialect="examples")
        net.hello("alice", answer_pings=False)
        newcomer = net.client()
        newcomer.send_text("HELLO alice")
        net.deliver_bytes()
        chunk = "x" * 1024
        count = MAX_HELD_INPUT // 1024 + 8
        for i in range(count):
            newcomer.send_text(f"ROOM_PEER_LIST {i} {chunk}")
        net.deliver_bytes()
        self.assertIn(HELD_INPUT, read_pauses(newcomer))
        held = newcomer.server.connection._held_bytes
        self.assertGreaterEqual(held, MAX_HELD_INPUT)
        self.assertLess(held, MAX_HELD_INPUT + 64 * 1024)
        net.clock.advance(2.1)
        net.flush()
        self.assertNotIn(HELD_INPUT, read_pauses(newcomer))
        replies = newcomer.drain()
        self.assertEqual(replies[0], "HELLO")
        self.assertEqual(len(replies), count + 1)
        self.assertEqual(set(replies[1:]), {"ERROR not in a room"})
        self.assertEqual(newcomer.server.connection._held_bytes, 0)

    def test_json_messages_waiting_for_the_backend_stop_reading_once_the_bound_is_held(self):
        """
        JSON dialect: ``peer`` messages each wait for the backend (a cluster
        node's Redis round trip); what comes meanwhile is held, and reading
        stops past MAX_HELD_INPUT bytes until the backend has answered.
        """
        registry = Stalling()
        net = Loopback(self, registry=registry, dialect="json")
        client = net.client()
        net.flush()
        self.assertEqual(obj(client.drain()[0])["type"], "welcome")
        message = json.dumps(
            {"type": "peer", "sessionId": "none", "ice": {"candidate": "c" * 4096, "sdpMLineIndex": 0}}
        )
        count = MAX_HELD_INPUT // len(message) + 8
        for _ in range(count):
            client.send_text(message)
        net.deliver_bytes()
        self.assertIn(HELD_INPUT, read_pauses(client))
        self.assertEqual(len(registry.stalled), 1)
        while registry.stalled:
            registry.answer_all()
            net.deliver_bytes()
        self.assertNotIn(HELD_INPUT, read_pauses(client))
        self.assertEqual(client.server.connection._held_bytes, 0)
        self.assertTrue(client.is_live)

    def test_a_closing_connection_lets_go_of_what_it_held(self):
        """A connection that closes while input is held drops it, counted bytes included."""
        registry = Stalling()
        net = Loopback(self, registry=registry, dialect="json")
        client = net.client()
        net.flush()
        client.drain()
        for _ in range(3):
            client.send_text('{"type":"peer","sessionId":"s","ice":{"candidate":"c","sdpMLineIndex":0}}')
        net.deliver_bytes()
        connection = client.server.connection
        self.assertGreater(connection._held_bytes, 0)
        client.sendClose(1000)
        net.flush()
        self.assertIsNone(connection._held)
        self.assertEqual(connection._held_bytes, 0)


class OutputBoundTests(unittest.TestCase):
    """Every reply and notice counts against --max-output-buffer before it is queued."""

    def producers(self, net, count, meta_size):
        for i in range(count):
            producer = net.client()
            net.flush()
            producer.drain()
            meta = {"name": f"p{i}", "blob": "m" * meta_size}
            producer.send_text(json.dumps({"type": "setPeerStatus", "roles": ["producer"], "meta": meta}))
        net.flush()

    def list_under_bound(self, max_output):
        """:returns: ``(net, asker)``: three producers with 3,000-byte meta, and a peer that asked for the list."""
        net = Loopback(self, dialect="json", max_output=max_output)
        self.producers(net, 3, 3000)
        asker = net.client()
        net.flush()
        asker.drain()
        asker.send_text('{"type":"list"}')
        net.flush()
        return net, asker

    def test_a_json_list_larger_than_the_bound_is_not_queued_and_the_peer_is_closed(self):
        """
        A ``list`` whose reply would not fit in the output bound is not
        queued: the peer that asked is closed with 1008, and a producer is
        not harmed.
        """
        net, asker = self.list_under_bound(8000)
        self.assertEqual(asker.drain(), [])
        self.assertEqual((asker.close_code, asker.close_reason), (1008, "too slow to read"))
        self.assertEqual(net.factory.stats.errors.get("too_slow"), 1)

    def test_a_json_list_within_the_bound_is_answered(self):
        """The same list, under a bound it fits, is answered whole."""
        _, asker = self.list_under_bound(20000)
        [reply] = [obj(m) for m in asker.drain()]
        self.assertEqual([p["meta"]["name"] for p in reply["producers"]], ["p0", "p1", "p2"])
        self.assertTrue(asker.is_live)

    def test_an_examples_member_list_larger_than_the_bound_is_not_queued(self):
        """
        Examples' dialect: a ROOM_PEER_LIST that would not fit in the output
        bound is not queued; the member that asked is closed with 1008 and
        the room told it left.
        """
        net = Loopback(self, dialect="examples", max_output=1500)
        asker = net.hello("asker")
        asker.send_text("ROOM r")
        members = []
        for i in range(6):
            member = net.hello(f"{i:03d}" + "u" * 253)
            member.send_text("ROOM r")
            net.flush()
            members.append(member)
        self.assertTrue(all(m.is_live for m in members))
        for client in [asker, *members]:
            client.drain()
        asker.send_text("ROOM_PEER_LIST")
        net.flush()
        self.assertEqual(asker.drain(), [])
        self.assertEqual((asker.close_code, asker.close_reason), (1008, "too slow to read"))
        self.assertEqual(members[0].drain(), ["ROOM_PEER_LEFT asker"])


class ParsedSizeTests(unittest.TestCase):
    """What is parsed and kept of a JSON peer is bounded in size and depth."""

    def setUp(self):
        self.net = Loopback(self, dialect="json", max_meta_size=1000)
        self.listener = self.json_peer()
        self.listener.send_text('{"type":"setPeerStatus","roles":["listener"]}')
        self.net.flush()
        self.listener.drain()

    def json_peer(self):
        client = self.net.client()
        self.net.flush()
        [welcome] = [obj(m) for m in client.drain()]
        client.peer_id = welcome["peerId"]
        return client

    def test_a_meta_larger_than_the_limit_is_refused_and_not_kept(self):
        """
        A setPeerStatus whose meta is larger than --max-meta-size gets an
        error and changes nothing: listeners hear nothing, lists do not
        show it. One at the limit is kept.
        """
        producer = self.json_peer()
        big = {"blob": "b" * 1000}
        producer.send_text(json.dumps({"type": "setPeerStatus", "roles": ["producer"], "meta": big}))
        self.net.flush()
        [error] = [obj(m) for m in producer.drain()]
        size = len(json_wire.canonical(big))
        self.assertEqual(
            error,
            {
                "type": "error",
                "details": f"Peer '{producer.peer_id}' meta is too large: {size} bytes, at most 1000",
            },
        )
        self.assertEqual(self.listener.drain(), [])
        fits = {"blob": "b" * (1000 - len(json_wire.canonical({"blob": ""})))}
        producer.send_text(json.dumps({"type": "setPeerStatus", "roles": ["producer"], "meta": fits}))
        self.net.flush()
        [notice] = [obj(m) for m in self.listener.drain()]
        self.assertEqual(notice["meta"], fits)

    def test_a_meta_nested_past_the_limit_is_dropped_and_breaks_no_reply(self):
        """
        A meta nested deeper than MAX_DEPTH levels (970 here) is dropped as
        invalid: no reply, no notice, and other clients' lists still work.
        """
        producer = self.json_peer()
        deep = "[" * 970 + "]" * 970
        producer.send_text('{"type":"setPeerStatus","roles":["producer"],"meta":' + deep + "}")
        self.net.flush()
        self.assertEqual(producer.drain(), [])
        self.assertEqual(self.listener.drain(), [])
        self.listener.send_text('{"type":"list"}')
        self.net.flush()
        self.assertEqual([obj(m) for m in self.listener.drain()], [{"type": "list", "producers": []}])
        self.assertTrue(producer.is_live and self.listener.is_live)

    def test_a_message_nested_100000_levels_is_dropped_without_an_error_in_the_log(self):
        """
        A message nested 100,000 levels (past what the decoder can take) is
        dropped like any invalid message: the connection stays open, and
        nothing unexpected is logged.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        producer = self.json_peer()
        producer.send_text('{"type":"setPeerStatus","meta":' + "[" * 100000 + "]" * 100000 + "}")
        self.net.flush()
        self.assertEqual(producer.drain(), [])
        self.assertTrue(producer.is_live)
        self.assertEqual([e for e in observer if e.get("log_failure") is not None], [])
        producer.send_text('{"type":"setPeerStatus","roles":["producer"],"meta":{"name":"ok"}}')
        self.net.flush()
        self.assertEqual(obj(self.listener.drain()[0])["meta"], {"name": "ok"})

    def test_meta_at_the_depth_limit_is_kept_and_one_deeper_is_not(self):
        """The depth limit is MAX_DEPTH levels exactly."""
        at_limit = "[" * json_wire.MAX_DEPTH + "]" * json_wire.MAX_DEPTH
        deeper = "[" + at_limit + "]"
        for meta, kept in ((at_limit, True), (deeper, False)):
            message = json_wire.parse('{"type":"setPeerStatus","roles":[],"meta":' + meta + "}")
            self.assertEqual(message is not None, kept, meta)

    def test_a_peer_message_with_a_key_twice_never_reaches_the_other_side(self):
        """
        A consumer's peer message with two ``sdp`` keys (an offer, then an
        answer) is dropped as invalid: it could pass the check that a
        consumer sends no offer and be read as the offer at the producer.
        """
        producer = self.json_peer()
        producer.send_text('{"type":"setPeerStatus","roles":["producer"]}')
        consumer = self.json_peer()
        consumer.send_text(json.dumps({"type": "startSession", "peerId": producer.peer_id}))
        self.net.flush()
        session_id = obj(consumer.drain()[0])["sessionId"]
        producer.drain()
        twice = (
            '{"type":"peer","sessionId":"%s","sdp":{"type":"offer","sdp":"v=0 evil"},'
            '"sdp":{"type":"answer","sdp":"v=0"}}' % session_id
        )
        consumer.send_text(twice)
        consumer.send_text(
            '{"type":"peer","sessionId":"%s","sdp":{"type":"answer","sdp":"v=0","type":"offer"}}'
            % session_id
        )
        self.net.flush()
        self.assertEqual(producer.drain(), [])
        self.assertEqual(consumer.drain(), [])
        answer = {"type": "peer", "sessionId": session_id, "sdp": {"type": "answer", "sdp": "v=0"}}
        consumer.send_text(json.dumps(answer))
        self.net.flush()
        self.assertEqual([obj(m) for m in producer.drain()], [answer])


class DuplicateKeyTests(unittest.SynchronousTestCase):
    """json_wire.parse refuses a key given twice in any spelling, and forwards the rest as it came."""

    SESSION = "3f2a1b4c-1111-2222-3333-444455556666"

    def peer(self, body):
        return '{"type":"peer","sessionId":"%s",%s}' % (self.SESSION, body)

    def test_a_key_twice_is_refused_however_it_is_written(self):
        """Twice at the top or inside, after a space, escaped, or with another type of value: None."""
        for text in (
            self.peer('"sdp":{"type":"offer","sdp":"v=0"},"sdp":{"type":"answer","sdp":"v=0"}'),
            self.peer('"sdp":{"type":"answer","sdp":"v=0","type":"offer"}'),
            self.peer('"sdp" :{"type":"answer","sdp":"v=0"},"sdp":{"type":"offer","sdp":"x"}'),
            self.peer('"ice":{"candidate":"c","sdpMLineIndex":"1","sdpMLineIndex":0}'),
            self.peer('"ice":{"sdpMLineIndex":0,"candidate":"\\u0022x\\u0022","candidate":"c"}'),
            self.peer('"\\u0069ce":{"candidate":"c","sdpMLineIndex":0},"ice":{"candidate":"d","sdpMLineIndex":0}'),
            '{"type":"peer","type":"peer","sessionId":"s","ice":{"candidate":"c","sdpMLineIndex":0}}',
            '{"type":"setPeerStatus","roles":["producer"],"roles":["listener"]}',
        ):
            self.assertIsNone(json_wire.parse(text), text)

    def test_quotes_inside_values_are_forwarded_as_they_came(self):
        """Escaped quotes in a candidate do not make a key twice: the text is forwarded as it came."""
        for text in (
            self.peer('"ice":{"candidate":"a\\":b","sdpMLineIndex":0}'),
            self.peer('"ice":{"candidate":"a\\"\\"\\":b","sdpMLineIndex":0}'),
            self.peer('"sdp": {"type": "answer", "sdp": "v=0 \\"x\\""}'),
        ):
            message = json_wire.parse(text)
            self.assertIsNotNone(message, text)
            self.assertEqual(message.text, text)


class EchoTests(unittest.TestCase):
    """Client text in error replies and log lines is bounded, in both dialects."""

    def test_the_helper_cuts_and_escapes(self):
        """clip cuts past ECHO_LIMIT characters and escapes control characters; quote quotes it."""
        self.assertEqual(clip("a\nb"), "a\\x0ab")
        self.assertEqual(clip("x" * 1000), "x" * ECHO_LIMIT + "...")
        self.assertEqual(quote("x" * 1000), "'" + "x" * ECHO_LIMIT + "...'")
        self.assertEqual(clip(["a"]), "['a']")

    def logged_text(self, observer):
        return sum(
            len(str(value)) for event in observer for value in event.values() if isinstance(value, str)
        )

    def test_a_json_session_with_a_huge_peer_id_is_answered_and_logged_briefly(self):
        """
        A JSON startSession with a 512 KB peerId gets upstream's "not found"
        with at most ECHO_LIMIT characters of it, and the log line is as short.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        net = Loopback(self, dialect="json")
        client = net.client()
        net.flush()
        client.drain()
        huge = "p" * (512 * 1024)
        client.send_text(json.dumps({"type": "startSession", "peerId": huge}))
        net.flush()
        [error] = [obj(m) for m in client.drain()]
        self.assertEqual(error["details"], f"Peer with ID '{'p' * ECHO_LIMIT}...' not found")
        self.assertLess(self.logged_text(observer), 4096)

    def test_examples_commands_with_huge_words_are_answered_and_logged_briefly(self):
        """
        Examples' dialect: SESSION and ROOM with a 512 KB argument are answered
        with a bounded echo, and the log lines are as short.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        net = Loopback(self, dialect="examples")
        client = net.hello("alice")
        huge = "w" * (512 * 1024)
        client.send_text("SESSION " + huge)
        client.send_text("ROOM " + huge)
        net.flush()
        replies = client.drain()
        self.assertEqual(len(replies), 2)
        for reply in replies:
            self.assertLess(len(reply), 400, reply[:80])
        self.assertLess(self.logged_text(observer), 8192)

"""
The JSON dialect (the protocol of GStreamer's webrtcsink, webrtcsrc and
gstwebrtc-api, as gst-plugins-rs' ``gst-webrtc-signalling-server`` serves it):
its wire format, its part of the registry, and real Autobahn clients in
memory on one fake clock, on a port that speaks both dialects.
"""

import json

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest

from signalling.core import json_wire
from signalling.core.dialects import DIALECTS
from signalling.core.interfaces import IJsonRegistry, JsonRefused, PeerNotFound, UidTaken
from signalling.core.registry import Registry
from signalling.server.settings import DEFAULT_DIALECT_MARGIN as DIALECT_MARGIN
from signalling.server.settings import DEFAULT_DIALECT_WAIT
from signalling.server.protocol import (
    DIALECT_PING,
    DIALECT_RECHECK,
    DIALECT_RECHECKS,
)
from signalling.server.metrics import SignallingCollector
from signalling.server.policy import LATE_SPEAKERS_TTL, LateSpeakers
from tests import backends
from tests.clients import eventually
from tests.servers import Loopback, Server
from tests.helpers import change_settings


def obj(text):
    return json.loads(text)


class ParseTests(unittest.SynchronousTestCase):
    """What the server takes, and what it drops without a reply."""

    def test_every_message_of_the_protocol_is_parsed(self):
        """
        Every message a peer may send is parsed, its optional fields None when
        absent; a meta is kept as its canonical JSON text (keys sorted, no
        spaces), ``null`` when absent.
        """
        cases = {
            '{"type":"setProtocolVersion","version":"v1_1"}': {"version": "v1_1"},
            '{"type":"setPeerStatus","roles":["producer","listener"],'
            '"meta":{"name":"x", "a": [1, {"b": null}]}}': {
                "roles": ["producer", "listener"],
                "meta": '{"a":[1,{"b":null}],"name":"x"}',
                "peerId": None,
            },
            '{"type":"setPeerStatus","roles":[]}': {
                "roles": [],
                "meta": "null",
                "peerId": None,
            },
            '{"type":"startSession","peerId":"p"}': {"peerId": "p", "offer": None},
            '{"type":"startSession","peerId":"p","offer":"v=0"}': {"peerId": "p", "offer": "v=0"},
            '{"type":"endSession","sessionId":"s"}': {"sessionId": "s", "error": None},
            '{"type":"endSessionV1_1","sessionId":"s","error":"bad"}': {
                "sessionId": "s",
                "error": "bad",
            },
            '{"type":"list"}': {},
            '{"type":"listConsumers"}': {},
            '{"type":"peer","sessionId":"s","sdp":{"type":"offer","sdp":"v=0"}}': {
                "sessionId": "s",
                "sdp": {"type": "offer", "sdp": "v=0"},
            },
            '{"type":"peer","sessionId":"s","ice":{"candidate":"c","sdpMLineIndex":0}}': {
                "sessionId": "s",
                "ice": {"candidate": "c", "sdpMLineIndex": 0},
            },
        }
        for text, fields in cases.items():
            message = json_wire.parse(text)
            self.assertIsNotNone(message, text)
            self.assertEqual(message.type, obj(text)["type"])
            self.assertEqual(message.fields, fields, text)

    def test_what_upstream_cannot_parse_is_dropped(self):
        """
        What the upstream server would fail to parse (not JSON, an unknown or
        server-only type, a missing or ill-typed field) parses to None.
        """
        for text in [
            "HELLO 1",
            "not json",
            "[1, 2]",
            '"text"',
            "{}",
            '{"type":"nope"}',
            '{"type":"newPeer"}',
            '{"type":"setProtocolVersion","version":"v2"}',
            '{"type":"setPeerStatus"}',
            '{"type":"setPeerStatus","roles":["king"]}',
            '{"type":"setPeerStatus","roles":"producer"}',
            '{"type":"setPeerStatus","roles":[],"peerId":5}',
            '{"type":"startSession"}',
            '{"type":"startSession","peerId":1}',
            '{"type":"startSession","peerId":"p","offer":5}',
            '{"type":"endSession"}',
            '{"type":"peer","sessionId":"s"}',
            '{"type":"peer","sdp":{"type":"offer","sdp":"v=0"}}',
            '{"type":"peer","sessionId":"s","sdp":{"type":"pranswer","sdp":"v=0"}}',
            '{"type":"peer","sessionId":"s","ice":{"candidate":"c"}}',
            '{"type":"peer","sessionId":"s","ice":{"candidate":"c","sdpMLineIndex":-1}}',
        ]:
            self.assertIsNone(json_wire.parse(text), text)

    def test_a_peer_message_is_forwarded_as_sent_unless_it_carries_more(self):
        """
        A peer message is forwarded as its very text; one with extra fields is
        sent again with only the fields the protocol knows.
        """
        plain = '{"sessionId":"s","type":"peer","ice":{"sdpMLineIndex":1,"candidate":"c"}}'
        self.assertEqual(json_wire.peer_message(json_wire.parse(plain)), plain)
        extra = '{"type":"peer","sessionId":"s","x":1,"sdp":{"type":"answer","sdp":"v=0","y":2}}'
        self.assertEqual(
            obj(json_wire.peer_message(json_wire.parse(extra))),
            {"type": "peer", "sessionId": "s", "sdp": {"type": "answer", "sdp": "v=0"}},
        )

    def test_meta_names_are_read_alike_and_remembered_within_bounds(self):
        """
        ``meta_name`` answers the same whether it remembers the meta or not;
        it remembers small metas only, and no more than ``NAMES_MAX``.
        """
        self.patch(json_wire, "_NAMES", {})
        self.patch(json_wire, "NAMES_MAX", 3)
        cases = [
            ('{"name":"cam"}', "cam"),
            ('{"name":7}', None),
            ('["name"]', None),
            ('{"other":"name"}', None),
            ('{"name":"\\u00e9"}', "\u00e9"),
            ("null", None),
        ]
        for _ in range(2):
            for meta, name in cases:
                self.assertEqual(json_wire.meta_name(meta), name, meta)
        self.assertLessEqual(len(json_wire._NAMES), 3)
        large = json_wire.canonical({"name": "big", "pad": "x" * json_wire.NAMES_META_MAX})
        self.assertEqual(json_wire.meta_name(large), "big")
        self.assertNotIn(large, json_wire._NAMES)

    def test_what_the_server_sends_names_every_field_null_included(self):
        """
        The server's messages name every field, null for an empty one; v1_0's
        endSession has no error, v1_1's endSessionV1_1 has one.
        """
        self.assertEqual(obj(json_wire.welcome("a")), {"type": "welcome", "peerId": "a"})
        self.assertEqual(
            obj(json_wire.peer_status_changed("a", [], json_wire.NO_META)),
            {"type": "peerStatusChanged", "roles": [], "meta": None, "peerId": "a"},
        )
        self.assertEqual(
            obj(json_wire.start_session("c", "s", None)),
            {"type": "startSession", "peerId": "c", "sessionId": "s", "offer": None},
        )
        self.assertEqual(
            obj(json_wire.end_session("s", None, json_wire.V1_0)),
            {"type": "endSession", "sessionId": "s"},
        )
        self.assertEqual(
            obj(json_wire.end_session("s", "gone", json_wire.V1_1)),
            {"type": "endSessionV1_1", "sessionId": "s", "error": "gone"},
        )
        self.assertEqual(
            obj(json_wire.producer_list([("p", json_wire.NO_META)])),
            {"type": "list", "producers": [{"id": "p", "meta": None}]},
        )


class Recorder:
    """An IJsonPeer that records what the registry tells it."""

    def __init__(self):
        self.told = []

    def __getattr__(self, name):
        if name.startswith(("peer_status", "json_")):
            return lambda *args: self.told.append((name, *args))
        raise AttributeError(name)


class RegistryTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.registry = Registry()
        self.peers = {}

    def peer(self, peer_id, *roles, meta=json_wire.NO_META):
        peer = self.peers[peer_id] = Recorder()
        self.registry.welcome(peer_id, peer)
        if roles:
            self.registry.set_peer_status(peer_id, list(roles), meta, None)
        return peer

    def test_ids_are_unique_across_both_dialects(self):
        """An id taken in one dialect cannot be taken in the other."""
        self.registry.register("taken", object())
        self.assertRaises(UidTaken, self.registry.welcome, "taken", Recorder())
        self.peer("json-id")
        self.assertRaises(UidTaken, self.registry.register, "json-id", object())

    def test_the_examples_commands_do_not_find_json_peers(self):
        """An examples session cannot be started to or from a JSON peer: it is not found."""
        self.peer("json-id")
        self.registry.register("caller", object())
        self.assertRaises(PeerNotFound, self.registry.start_session, "caller", "json-id")
        self.assertRaises(PeerNotFound, self.registry.start_session, "json-id", "caller")

    def test_listeners_hear_of_every_status_and_of_a_leave(self):
        """
        Listeners hear of every status set, their own included, and of a peer
        that leaves (with no roles); a peer that is no listener hears nothing.
        """
        listener = self.peer("l", "listener")
        self.assertEqual(listener.told, [("peer_status_changed", "l", ["listener"], "null")])
        producer = self.peer("p", "producer", meta='{"n":1}')
        self.assertEqual(listener.told[-1], ("peer_status_changed", "p", ["producer"], '{"n":1}'))
        self.assertEqual(producer.told, [])
        self.registry.remove("p", producer)
        self.assertEqual(listener.told[-1], ("peer_status_changed", "p", [], '{"n":1}'))

    def test_the_same_status_again_changes_nothing_when_it_names_the_peer(self):
        """
        The same status set again tells the listeners nothing if it names the
        peer's own id, and tells them again if it does not.
        """
        listener = self.peer("l", "listener")
        self.registry.set_peer_status("l", ["listener"], "null", "l")
        self.assertEqual(len(listener.told), 1)
        self.registry.set_peer_status("l", ["listener"], "null", None)
        self.assertEqual(len(listener.told), 2)

    def test_producer_and_consumer_at_once_is_refused(self):
        """
        Asking for the producer and the consumer roles at once is refused, in upstream's words.
        """
        self.peer("x")
        e = self.assertRaises(
            JsonRefused, self.registry.set_peer_status, "x", ["producer", "consumer"], "null", None
        )
        self.assertEqual(e.details, "Cannot register peer x as both producer and passive consumer")

    def test_lists_name_producers_and_consumers_with_their_meta(self):
        """The lists of producers and of consumers name each, in turn, with its meta."""
        self.peer("p1", "producer", meta='{"a":1}')
        self.peer("c1", "consumer")
        self.peer("p2", "producer", "listener")
        self.assertEqual(
            self.registry.json_peers("producer"), [("p1", '{"a":1}'), ("p2", "null")]
        )
        self.assertEqual(self.registry.json_peers("consumer"), [("c1", "null")])

    def test_a_session_with_a_producer_tells_the_consumer_then_the_producer(self):
        """
        A session asked of a producer tells the asker that it started and the
        producer to start it, with no offer.
        """
        producer = self.peer("p", "producer")
        consumer = self.peer("c")
        session_id = self.registry.start_json_session("c", "p", None)
        self.assertEqual(consumer.told, [("json_session_started", "p", session_id)])
        self.assertEqual(producer.told, [("json_start_session", "c", session_id, None)])

    def test_a_producer_may_start_a_session_with_a_passive_consumer(self):
        """A producer may start a session with a passive consumer, with an offer."""
        producer = self.peer("p", "producer")
        consumer = self.peer("c", "consumer")
        session_id = self.registry.start_json_session("p", "c", "v=0 offer")
        self.assertEqual(consumer.told, [("json_session_started", "p", session_id)])
        self.assertEqual(producer.told, [("json_start_session", "c", session_id, "v=0 offer")])

    def test_a_session_needs_a_producer_or_a_consumer_on_the_other_side(self):
        """
        A session between peers none of which is a producer or a passive consumer
        is refused, and so is one with a peer that does not exist.
        """
        self.peer("a", "listener")
        self.peer("b")
        e = self.assertRaises(JsonRefused, self.registry.start_json_session, "a", "b", None)
        self.assertEqual(
            e.details, "Missing a producer or a consumer: id a roles [Listener], id b roles []"
        )
        e = self.assertRaises(JsonRefused, self.registry.start_json_session, "a", "nobody", None)
        self.assertEqual(e.details, "Peer with ID 'nobody' not found")

    def session(self):
        producer = self.peer("p", "producer")
        consumer = self.peer("c")
        session_id = self.registry.start_json_session("c", "p", None)
        producer.told.clear()
        consumer.told.clear()
        return producer, consumer, session_id

    def message(self, session_id, **inner):
        return json_wire.parse(json.dumps({"type": "peer", "sessionId": session_id, **inner}))

    def test_peer_messages_go_to_the_other_side(self):
        """
        A session's peer messages go to the other side: the offer to the consumer,
        the answer to the producer.
        """
        producer, consumer, session_id = self.session()
        offer = self.message(session_id, sdp={"type": "offer", "sdp": "o"})
        self.registry.json_message("p", offer)
        self.assertEqual(consumer.told, [("json_peer_message", offer)])
        answer = self.message(session_id, sdp={"type": "answer", "sdp": "a"})
        self.registry.json_message("c", answer)
        self.assertEqual(producer.told, [("json_peer_message", answer)])

    def test_a_consumer_may_not_send_an_offer(self):
        """An offer from the consumer is refused and does not reach the producer."""
        producer, consumer, session_id = self.session()
        e = self.assertRaises(
            JsonRefused,
            self.registry.json_message,
            "c",
            self.message(session_id, sdp={"type": "offer", "sdp": "o"}),
        )
        self.assertEqual(
            e.details, 'cannot forward offer from "c" to "p" as "c" is not the producer'
        )
        self.assertEqual(producer.told, [])

    def test_a_message_for_an_unknown_session_is_dropped_and_a_stranger_refused(self):
        """
        A peer message for an unknown session is dropped without an error; one
        from a peer outside the session is refused; neither reaches the session.
        """
        producer, consumer, session_id = self.session()
        self.registry.json_message("p", self.message("nope", ice={"candidate": "", "sdpMLineIndex": 0}))
        self.peer("x")
        e = self.assertRaises(
            JsonRefused,
            self.registry.json_message,
            "x",
            self.message(session_id, ice={"candidate": "", "sdpMLineIndex": 0}),
        )
        self.assertEqual(e.details, f"Peer x is not part of {session_id}")
        self.assertEqual((producer.told, consumer.told), ([], []))

    def test_ending_a_session_tells_the_other_side_once(self):
        """
        Ending a session tells the other side, with the reason, once; ending it
        again does nothing.
        """
        producer, consumer, session_id = self.session()
        self.registry.end_json_session("c", session_id, "bye")
        self.assertEqual(producer.told, [("json_session_ended", session_id, "bye")])
        self.registry.end_json_session("c", session_id)
        self.assertEqual(len(producer.told), 1)
        self.assertEqual(self.registry.json_session_count, 0)

    def test_a_stranger_cannot_end_a_session(self):
        """A peer outside a session cannot end it: the session stands."""
        producer, consumer, session_id = self.session()
        self.peer("x")
        self.assertRaises(JsonRefused, self.registry.end_json_session, "x", session_id)
        self.assertEqual(self.registry.json_session_count, 1)

    def test_giving_up_a_role_or_leaving_ends_its_sessions(self):
        """
        A producer that gives up its role, or a peer that leaves, ends its
        sessions and the other side is told; at the end the registry is empty.
        """
        producer, consumer, session_id = self.session()
        self.registry.set_peer_status("p", ["listener"], "null", None)
        self.assertEqual(consumer.told, [("json_session_ended", session_id, None)])
        self.registry.set_peer_status("p", ["producer"], "null", None)
        second = self.registry.start_json_session("c", "p", None)
        self.registry.remove("c", consumer)
        self.assertEqual(producer.told[-1], ("json_session_ended", second, None))
        self.registry.remove("p", producer)
        self.assertTrue(self.registry.is_empty())


class LateSpeakersTests(unittest.SynchronousTestCase):
    """The addresses an auto port remembers as late speakers: bounded in time and number."""

    def test_an_address_is_remembered_for_its_time_and_the_oldest_go_first(self):
        clock = Clock()
        late = LateSpeakers(clock, capacity=3, ttl=10)
        self.assertNotIn("10.0.0.1", late)
        for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
            late.remember(host)
        self.assertIn("10.0.0.1", late)
        late.remember("10.0.0.1")  # again: now the newest
        late.remember("10.0.0.4")
        self.assertEqual(len(late), 3)
        self.assertNotIn("10.0.0.2", late)
        self.assertIn("10.0.0.1", late)
        clock.advance(10)
        self.assertNotIn("10.0.0.1", late)
        self.assertNotIn("10.0.0.4", late)


class DialectTests(unittest.TestCase):
    """A port of each dialect, and one that lets the first message choose."""

    backend = staticmethod(backends.memory)
    seed = 0
    fast_path = True

    def setUp(self):
        self.net = Loopback(self, backend=self.backend, seed=self.seed, fast_path=self.fast_path)

    def json_client(self):
        """:returns: ``(client, peer id)`` once welcomed on the auto port."""
        client = self.net.client()
        self.net.clock.advance(DEFAULT_DIALECT_WAIT)
        self.net.flush()
        [welcome] = [obj(m) for m in client.drain()]
        self.assertEqual(welcome["type"], "welcome")
        return client, welcome["peerId"]

    def received(self, client):
        self.net.flush()
        return [obj(m) for m in client.drain()]

    def welcomed_after(self, client, wait, early=0.0005):
        """
        ``client`` is sent nothing until ``wait`` more seconds have passed
        (``early`` before them, nothing), then its welcome: :returns: it.
        """
        self.net.clock.advance(wait - early)
        self.net.deliver_bytes()
        self.assertEqual(client.drain(), [])
        self.net.clock.advance(early)
        self.net.flush()
        [welcome] = [obj(m) for m in client.drain()]
        self.assertEqual(welcome["type"], "welcome")
        return welcome

    def test_a_silent_connection_is_welcomed_a_margin_after_its_pong(self):
        """
        The server pings a connection with its 101; one that sends nothing
        is welcomed, with a UUID, :data:`DIALECT_MARGIN` after its pong came
        back (in memory, at once) and not before.
        """
        client = self.net.client()
        self.net.deliver_bytes()
        self.assertEqual(client.dialect_pings, 1)
        welcome = self.welcomed_after(client, DIALECT_MARGIN)
        self.assertEqual(set(welcome), {"type", "peerId"})
        self.assertEqual(len(welcome["peerId"]), 36)

    def test_the_margin_is_the_pongs_round_trip_when_that_is_longer(self):
        """
        A client whose pong takes 0.2 s (a far or a loaded client, whose
        HELLO would be as late) is welcomed 0.2 s after the pong, not before.
        """
        client = self.net.client(answer_pings=False)
        self.net.deliver_bytes()
        self.net.clock.advance(0.2)
        client.sendPong(DIALECT_PING)
        self.net.deliver_bytes()
        self.welcomed_after(client, 0.2, early=0.001)

    def test_a_silent_connection_that_answers_no_ping_is_welcomed_after_the_wait(self):
        """Without a pong, a silent connection is welcomed after the wait, and not before."""
        client = self.net.client(answer_pings=False)
        self.welcomed_after(client, DEFAULT_DIALECT_WAIT, early=0.01)

    def test_a_hello_before_or_with_the_pong_is_the_examples_dialect(self):
        """
        The examples' clients send HELLO on the 101, before they answer the
        ping behind it, or about when: within the margin after the pong,
        HELLO still chooses, and no welcome is ever sent.
        """
        first = self.net.client(answer_pings=False)
        first.send_text("HELLO first")
        first.sendPong(DIALECT_PING)
        self.net.flush()
        self.assertEqual(first.drain(), ["HELLO"])
        second = self.net.client()
        self.net.deliver_bytes()
        self.net.clock.advance(DIALECT_MARGIN / 2)
        second.send_text("HELLO second")
        self.net.flush()
        self.net.clock.advance(DEFAULT_DIALECT_WAIT)
        self.net.flush()
        self.assertEqual(second.drain(), ["HELLO"])
        self.assertEqual(self.net.factory.stats.dialect_switches, {})

    def test_a_hello_after_the_welcome_switches_the_connection_to_the_examples_dialect(self):
        """
        A HELLO that comes after the connection was welcomed for its
        silence (a client that sends it late): the JSON peer is withdrawn
        (a listener hears it leave, no list names it), the HELLO is answered,
        and the connection is an examples' peer from then on, with calls
        and everything; counted and logged once.
        """
        listener, _ = self.json_client()
        listener.send_text('{"type":"setPeerStatus","roles":["listener"],"meta":null}')
        self.received(listener)
        late, peer_id = self.json_client()
        with capturedLogs() as events:
            late.send_text("HELLO late")
            self.net.flush()
        # Its HELLO is answered in the examples' words.
        self.assertEqual(late.drain(), ["HELLO"])
        callee = self.net.hello("callee")
        late.send_text("SESSION callee")
        self.net.flush()
        self.assertEqual(late.drain(), ["SESSION_OK"])
        late.send_text("hi")
        self.net.flush()
        self.assertEqual(callee.drain(), ["hi"])
        # The JSON peer it was welcomed as is gone, as when a peer leaves:
        # the listener heard it, and nobody lists it.
        self.assertEqual(
            self.received(listener),
            [{"type": "peerStatusChanged", "roles": [], "meta": None, "peerId": peer_id}],
        )
        listener.send_text('{"type":"listConsumers"}')
        self.assertEqual(self.received(listener), [{"type": "listConsumers", "consumers": []}])
        self.assertEqual(self.net.registry.counts_by_part()[IJsonRegistry][0], 1)
        self.assertEqual(self.net.factory.stats.dialect_switches, {"examples": 1})
        lines = [formatEvent(e) for e in events if "switched" in formatEvent(e)]
        self.assertEqual(len(lines), 1, lines)
        self.assertRegex(lines[0], r"^connection from \S+ switched to the examples dialect")
        late.close()
        callee.close()
        listener.close()
        self.net.flush()
        self.assertTrue(self.net.registry.is_empty())

    def test_after_a_switch_the_clients_address_gets_the_whole_wait_for_a_while(self):
        """
        A client whose HELLO came after its welcome (the examples' browser
        page then reconnects): the next connections from its address are
        not pinged, and get the whole wait to speak, so its HELLO is in time;
        after :data:`LATE_SPEAKERS_TTL` the margin after the pong is back.
        """
        late, _ = self.json_client()
        late.send_text("HELLO misjudged")
        self.net.flush()
        self.assertEqual(late.drain(), ["HELLO"])
        late.close()
        again = self.net.client()
        self.net.deliver_bytes()
        self.assertEqual(again.dialect_pings, 0)
        self.net.clock.advance(DEFAULT_DIALECT_WAIT / 2)
        self.net.flush()
        self.assertEqual(again.drain(), [])
        again.send_text("HELLO misjudged-again")
        self.net.flush()
        self.assertEqual(again.drain(), ["HELLO"])
        self.net.clock.advance(LATE_SPEAKERS_TTL)
        quick = self.net.client()
        self.net.deliver_bytes()
        self.assertEqual(quick.dialect_pings, 1)
        self.net.clock.advance(DIALECT_MARGIN)
        self.net.flush()
        self.assertEqual([obj(m)["type"] for m in quick.drain()], ["welcome"])

    def test_a_connection_that_answered_pings_holds_nothing_more(self):
        """
        A producer on the auto port (it answered the dialect ping and a
        keepalive ping) keeps the same attributes as one on a pinned path
        that answered none: nothing of a parsed frame (its unmasking object,
        its payload list) stays on the connection.
        """
        change_settings(self.net.factory, dialect_paths={"/json": "json"})
        producers = []
        for path in ("/", "/json"):
            client = self.net.client(path=path)
            self.net.deliver_bytes()
            self.net.clock.advance(DIALECT_MARGIN)
            self.net.flush()
            self.assertEqual([obj(m)["type"] for m in client.drain()], ["welcome"])
            client.send_text('{"type":"setPeerStatus","roles":["producer"],"meta":null}')
            self.net.flush()
            producers.append(client)
        auto, pinned = (client.server for client in producers)
        self.assertEqual(producers[0].dialect_pings, 1)
        self.assertEqual(producers[1].dialect_pings, 0)
        auto.sendPing(b"keepalive")
        self.net.flush()
        self.assertEqual(sorted(auto.__dict__), sorted(pinned.__dict__))

    def test_a_connection_that_paused_for_a_turn_holds_nothing_more(self):
        """
        A connection whose turn of reading ran out (reading paused, the next
        turn scheduled, as ``consumeData`` does) holds, once it reads again,
        the same attributes as before: the pause and the turn's call go back
        to the class's. (How long a turn takes decided whether a connection
        in other tests kept two keys more.)
        """
        client, _ = self.json_client()
        server = client.server
        before = sorted(server.__dict__)
        server.pause_reading("turn")
        server.pause_reading("held input")
        server._next_turn_call = self.net.clock.callLater(0, server._next_turn)
        self.assertEqual(server.read_pauses, {"turn", "held input"})
        self.net.flush()
        self.assertEqual(server.read_pauses, {"held input"})
        server.resume_reading("held input")
        self.assertEqual(server.read_pauses, frozenset())
        self.assertEqual(sorted(server.__dict__), before)
        client.send_text('{"type":"list"}')
        self.net.flush()
        self.assertEqual(obj(client.drain()[-1])["type"], "list")

    def test_only_the_first_message_after_the_welcome_may_switch(self):
        """A JSON message first keeps the dialect: a HELLO after it is garbage, dropped."""
        client, _ = self.json_client()
        client.send_text('{"type":"listConsumers"}')
        client.send_text("HELLO x")
        self.assertEqual(self.received(client), [{"type": "listConsumers", "consumers": []}])
        client.send_text('{"type":"listConsumers"}')
        self.assertEqual(self.received(client), [{"type": "listConsumers", "consumers": []}])
        self.assertEqual(self.net.factory.stats.dialect_switches, {})

    def test_input_that_waits_unread_when_the_wait_ends_still_chooses(self):
        """
        A loaded server can reach the end of the wait before the first
        message that came in time: while input waits unread, the connection
        is not welcomed; once read, a HELLO makes it the examples' dialect.
        Input that stays unread does not hold the choice for ever.
        """
        client = self.net.client()
        [protocol] = self.net.factory.connections
        protocol.has_unread_input = lambda: True
        self.net.clock.advance(DEFAULT_DIALECT_WAIT + 1)
        self.net.flush()
        self.assertEqual(client.drain(), [])
        client.send_text("HELLO late-reader")
        self.net.flush()
        self.assertEqual(client.drain(), ["HELLO"])
        other = self.net.client()
        [stuck] = [p for p in self.net.factory.connections if p is not protocol]
        stuck.has_unread_input = lambda: True
        self.net.clock.advance(DEFAULT_DIALECT_WAIT)
        for _ in range(DIALECT_RECHECKS - 1):
            self.net.clock.advance(DIALECT_RECHECK)
        self.net.flush()
        self.assertEqual(other.drain(), [])
        self.net.clock.advance(DIALECT_RECHECK)
        self.net.flush()
        self.assertEqual([obj(m)["type"] for m in other.drain()], ["welcome"])

    def test_hello_first_is_the_examples_dialect_and_nothing_else_is_sent(self):
        """A HELLO first makes the connection the examples' dialect: no welcome follows."""
        client = self.net.hello("alice")
        self.net.clock.advance(10)
        self.net.flush()
        self.assertEqual(client.drain(), [])

    def test_set_protocol_version_first_is_the_json_dialect_at_once(self):
        """setProtocolVersion first is welcomed at once, at the version it names."""
        client = self.net.client()
        client.send_text('{"type":"setProtocolVersion","version":"v1_1"}')
        self.net.flush()
        [welcome] = [obj(m) for m in client.drain()]
        self.assertEqual(welcome["type"], "welcome")
        [protocol] = self.net.factory.connections
        self.assertEqual(protocol.connection.version, "v1_1")

    def test_a_server_id_that_is_taken_is_chosen_again(self):
        """An examples peer holding the first UUID drawn does not stop the welcome."""
        import uuid as uuid_module

        drawn = iter(["00000000-0000-4000-8000-000000000001", "00000000-0000-4000-8000-000000000002"])
        self.patch(uuid_module, "uuid4", lambda: next(drawn))
        squatter = self.net.hello("00000000-0000-4000-8000-000000000001")
        client, peer_id = self.json_client()
        self.assertEqual(peer_id, "00000000-0000-4000-8000-000000000002")
        self.assertTrue(client.is_live and squatter.is_live)

    def test_a_pinned_port_welcomes_at_once(self):
        """On a port pinned to the JSON dialect a connection is welcomed at once."""
        change_settings(self.net.factory, dialect="json")
        client = self.net.client()
        self.net.flush()
        self.assertEqual(obj(client.drain()[0])["type"], "welcome")

    def test_a_pinned_path_welcomes_at_once(self):
        """On a path pinned to the JSON dialect a connection is welcomed at once."""
        change_settings(self.net.factory, dialect_paths={"/": "json"})
        client = self.net.client()
        self.net.flush()
        self.assertEqual(obj(client.drain()[0])["type"], "welcome")

    def test_a_whole_session_between_a_producer_and_a_consumer(self):
        """
        A listener, a producer and a consumer: status notices, the list, a
        session started, its messages relayed byte for byte and ended, and the
        producer's leave; nothing stays in the registry.
        """
        listener, listener_id = self.json_client()
        listener.send_text('{"type":"setPeerStatus","roles":["listener"],"meta":null}')
        self.assertEqual(
            self.received(listener),
            [{"type": "peerStatusChanged", "roles": ["listener"], "meta": None, "peerId": listener_id}],
        )
        producer, producer_id = self.json_client()
        producer.send_text('{"type":"setPeerStatus","roles":["producer"],"meta":{"name":"cam"}}')
        self.net.flush()
        self.assertEqual(producer.drain(), [])  # no reply to setPeerStatus
        self.assertEqual(
            self.received(listener),
            [{"type": "peerStatusChanged", "roles": ["producer"], "meta": {"name": "cam"}, "peerId": producer_id}],
        )
        consumer, consumer_id = self.json_client()
        consumer.send_text('{"type":"list"}')
        self.assertEqual(
            self.received(consumer),
            [{"type": "list", "producers": [{"id": producer_id, "meta": {"name": "cam"}}]}],
        )
        consumer.send_text(json.dumps({"type": "startSession", "peerId": producer_id}))
        [started] = self.received(consumer)
        session_id = started["sessionId"]
        self.assertEqual(started, {"type": "sessionStarted", "peerId": producer_id, "sessionId": session_id})
        self.assertEqual(
            self.received(producer),
            [{"type": "startSession", "peerId": consumer_id, "sessionId": session_id, "offer": None}],
        )
        offer = json.dumps({"type": "peer", "sessionId": session_id, "sdp": {"type": "offer", "sdp": "v=0"}})
        producer.send_text(offer)
        self.net.flush()
        self.assertEqual(consumer.drain(), [offer])  # byte for byte
        candidate = {"type": "peer", "sessionId": session_id, "ice": {"candidate": "a", "sdpMLineIndex": 0}}
        consumer.send_text(json.dumps(candidate))
        self.assertEqual(self.received(producer), [candidate])
        consumer.send_text(json.dumps({"type": "endSession", "sessionId": session_id}))
        self.assertEqual(self.received(producer), [{"type": "endSession", "sessionId": session_id}])
        producer.close()
        self.net.flush()
        self.assertEqual(
            self.received(listener),
            [{"type": "peerStatusChanged", "roles": [], "meta": {"name": "cam"}, "peerId": producer_id}],
        )
        for client in (listener, consumer):
            client.close()
        self.net.flush()
        self.assertTrue(self.net.registry.is_empty())

    def test_the_metrics_count_json_peers_sessions_and_messages_by_dialect(self):
        """
        The metrics count peers and sessions by dialect, and the messages and
        bytes relayed in JSON sessions.
        """
        producer, producer_id = self.json_client()
        producer.send_text('{"type":"setPeerStatus","roles":["producer"]}')
        consumer, consumer_id = self.json_client()
        examples = self.net.hello("ex")
        consumer.send_text(json.dumps({"type": "startSession", "peerId": producer_id}))
        session_id = self.received(consumer)[0]["sessionId"]
        candidate = json.dumps(
            {"type": "peer", "sessionId": session_id, "ice": {"candidate": "c", "sdpMLineIndex": 0}}
        )
        consumer.send_text(candidate)
        self.net.flush()
        collector = SignallingCollector(self.net.factory.stats, self.net.registry, [], DIALECTS)
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in collector.collect()
            for sample in family.samples
        }
        self.assertEqual(samples[("signalling_peers", (("dialect", "json"),))], 2)
        self.assertEqual(samples[("signalling_peers", (("dialect", "examples"),))], 1)
        self.assertEqual(samples[("signalling_sessions", (("dialect", "json"),))], 1)
        self.assertEqual(
            samples[("signalling_relayed_messages_total", (("kind", "json_session"),))], 1
        )
        self.assertEqual(
            samples[("signalling_relayed_bytes_total", (("kind", "json_session"),))],
            len(candidate),
        )
        for client in (producer, consumer, examples):
            client.close()
        self.net.flush()

    def test_errors_go_to_the_peer_that_caused_them_and_garbage_is_dropped(self):
        """
        Garbage is dropped without a reply and is not a first message; a refused
        request is an error to its sender, whose connection stays open.
        """
        client, peer_id = self.json_client()
        # (Garbage of the JSON dialect first: a first message of the
        # examples' would switch the connection to that dialect.)
        for garbage in ("{", "HELLO x", '{"type":"what"}', '{"type":"newPeer"}'):
            client.send_text(garbage)
        client.send_bytes(b"\x00\x01")
        # What was dropped does not count: the version may still be chosen.
        client.send_text('{"type":"setProtocolVersion","version":"v1_1"}')
        self.assertEqual(self.received(client), [])
        client.send_text('{"type":"listConsumers"}')
        self.assertEqual(self.received(client), [{"type": "listConsumers", "consumers": []}])
        client.send_text('{"type":"setProtocolVersion","version":"v1_1"}')
        self.assertEqual(
            self.received(client),
            [{"type": "error", "details": f"Protocol version selection for peer '{peer_id}' must be first message"}],
        )
        client.send_text('{"type":"startSession","peerId":"nobody"}')
        self.assertEqual(
            self.received(client), [{"type": "error", "details": "Peer with ID 'nobody' not found"}]
        )
        self.assertTrue(client.is_live)

    def test_requests_past_the_rate_are_refused_and_a_flood_is_closed_with_1008(self):
        """Requests past the burst get a rate-limit error; a flood is closed with 1008."""
        change_settings(self.net.factory, command_rate=1.0, command_burst=3)
        client, _ = self.json_client()
        for _ in range(3):
            client.send_text('{"type":"listConsumers"}')
        self.assertEqual(len(self.received(client)), 3)
        client.send_text('{"type":"listConsumers"}')
        self.assertEqual(self.received(client), [{"type": "error", "details": "rate limit exceeded"}])
        for _ in range(30):
            client.send_text('{"type":"listConsumers"}')
        self.net.flush()
        self.assertEqual(client.remoteCloseCode, 1008)

    def test_welcome_and_leave_are_logged_with_the_peer_id(self):
        """A JSON peer's welcome and its disconnection are logged with its id."""
        with capturedLogs() as events:
            client, peer_id = self.json_client()
            client.close()
            self.net.flush()
        lines = [formatEvent(e) for e in events if e.get("log_namespace", "").startswith("signalling")]
        self.assertTrue(any(f"peer {peer_id} welcomed from " in line for line in lines), lines)
        self.assertTrue(any(f"peer {peer_id} at " in line and "disconnected" in line for line in lines), lines)

    def test_a_v1_1_peer_is_told_why_its_session_ended(self):
        """A v1_1 peer gets endSessionV1_1 with the error the other (v1_1) side gave."""
        producer = self.net.client()
        producer.send_text('{"type":"setProtocolVersion","version":"v1_1"}')
        self.net.flush()
        producer_id = obj(producer.drain()[0])["peerId"]
        producer.send_text('{"type":"setPeerStatus","roles":["producer"]}')
        consumer = self.net.client()
        consumer.send_text('{"type":"setProtocolVersion","version":"v1_1"}')
        self.net.flush()
        consumer.drain()
        consumer.send_text(json.dumps({"type": "startSession", "peerId": producer_id}))
        session_id = self.received(consumer)[0]["sessionId"]
        self.received(producer)
        consumer.send_text(
            json.dumps({"type": "endSessionV1_1", "sessionId": session_id, "error": "no codec"})
        )
        self.assertEqual(
            self.received(producer),
            [{"type": "endSessionV1_1", "sessionId": session_id, "error": "no codec"}],
        )

    def test_a_json_peer_and_an_examples_peer_share_the_port_but_not_their_ids(self):
        """
        On one port, HELLO with a JSON peer's id is refused, and an examples
        SESSION to that id finds no peer.
        """
        client, peer_id = self.json_client()
        examples = self.net.client()
        examples.send_text(f"HELLO {peer_id}")
        self.net.flush()
        self.assertEqual(examples.drain()[0][:6], "ERROR ")
        caller = self.net.hello("caller")
        caller.send_text(f"SESSION {peer_id}")
        self.net.flush()
        self.assertEqual(caller.drain(), [f"ERROR peer '{peer_id}' not found"])


class RealSocketsMixin:
    """Both dialects on one real listening port, plaintext or TLS."""

    timeout = 30

    async def setUp(self):
        self.server = await Server.listening(self, self.tls)

    async def welcomed(self, first=None):
        """:returns: ``(client, peer id)``: a JSON client, welcomed."""
        client = await self.server.connect()
        if first is not None:
            client.send_text(first)
        welcome = obj(await client.next())
        self.assertEqual(welcome["type"], "welcome")
        return client, welcome["peerId"]

    async def next_json(self, client):
        return obj(await client.next())

    async def test_a_producer_and_a_consumer_meet_beside_an_examples_call(self):
        """
        Over real sockets: a webrtcsink-like producer, a webrtcsrc-like
        consumer and a listener on the port where two examples peers call.
        """
        caller, callee = await self.server.session("ex-a", "ex-b")
        listener, listener_id = await self.welcomed()
        listener.send_text('{"type":"setPeerStatus","roles":["listener"],"meta":null}')
        self.assertEqual((await self.next_json(listener))["peerId"], listener_id)
        producer, producer_id = await self.welcomed(
            '{"type":"setProtocolVersion","version":"v1_1"}'
        )
        producer.send_text(
            '{"type":"setPeerStatus","roles":["producer"],"meta":{"display-name":"cam"}}'
        )
        changed = await self.next_json(listener)
        self.assertEqual(
            changed,
            {
                "type": "peerStatusChanged",
                "roles": ["producer"],
                "meta": {"display-name": "cam"},
                "peerId": producer_id,
            },
        )
        consumer, consumer_id = await self.welcomed()
        consumer.send_text(json.dumps({"type": "startSession", "peerId": producer_id}))
        started = await self.next_json(consumer)
        session_id = started["sessionId"]
        self.assertEqual(
            await self.next_json(producer),
            {"type": "startSession", "peerId": consumer_id, "sessionId": session_id, "offer": None},
        )
        offer = json.dumps(
            {"type": "peer", "sessionId": session_id, "sdp": {"type": "offer", "sdp": "v=0\r\n"}}
        )
        producer.send_text(offer)
        self.assertEqual(await consumer.next(), offer)
        caller.send_text("through the examples session")
        await callee.expect("through the examples session")
        consumer.close()
        self.assertEqual(
            await self.next_json(producer),
            {"type": "endSessionV1_1", "sessionId": session_id, "error": None},
        )
        producer.close()
        # Listeners hear of every peer that leaves, one with no role too.
        self.assertEqual(
            [await self.next_json(listener), await self.next_json(listener)],
            [
                {"type": "peerStatusChanged", "roles": [], "meta": None, "peerId": consumer_id},
                {
                    "type": "peerStatusChanged",
                    "roles": [],
                    "meta": {"display-name": "cam"},
                    "peerId": producer_id,
                },
            ],
        )

    async def test_an_examples_client_is_answered_hello_without_waiting(self):
        """HELLO is answered at once on an auto port: no JSON client's wait."""
        client = await self.server.connect()
        started = reactor.seconds()
        client.send_text("HELLO quick")
        await client.expect("HELLO")
        self.assertLess(reactor.seconds() - started, DEFAULT_DIALECT_WAIT)


class RealSocketsMoreMixin(RealSocketsMixin):
    """Every refusal, the versions, the wait, and shutdown, over real sockets."""

    async def test_every_refusal_is_an_error_to_its_sender_only(self):
        """
        Each refused request is an error to its sender alone; the session the
        refusals were about stands, and the others hear nothing of them.
        """
        listener, listener_id = await self.welcomed()
        listener.send_text('{"type":"setPeerStatus","roles":["listener"]}')
        await self.next_json(listener)
        peer, peer_id = await self.welcomed()
        producer, producer_id = await self.welcomed()
        producer.send_text('{"type":"setPeerStatus","roles":["producer"]}')
        await self.next_json(listener)
        cases = [
            (
                '{"type":"setPeerStatus","roles":["producer","consumer"]}',
                f"Cannot register peer {peer_id} as both producer and passive consumer",
            ),
            ('{"type":"startSession","peerId":"nobody"}', "Peer with ID 'nobody' not found"),
            (
                json.dumps({"type": "startSession", "peerId": listener_id}),
                f"Missing a producer or a consumer: id {peer_id} roles [], "
                f"id {listener_id} roles [Listener]",
            ),
            (
                '{"type":"setProtocolVersion","version":"v1_1"}',
                f"Protocol version selection for peer '{peer_id}' must be first message",
            ),
        ]
        for request, details in cases:
            peer.send_text(request)
            self.assertEqual(await self.next_json(peer), {"type": "error", "details": details})
        peer.send_text(json.dumps({"type": "startSession", "peerId": producer_id}))
        session_id = (await self.next_json(peer))["sessionId"]
        await self.next_json(producer)
        peer.send_text(
            json.dumps({"type": "peer", "sessionId": session_id, "sdp": {"type": "offer", "sdp": "x"}})
        )
        self.assertEqual(
            await self.next_json(peer),
            {
                "type": "error",
                "details": f'cannot forward offer from "{peer_id}" to "{producer_id}" as '
                f'"{peer_id}" is not the producer',
            },
        )
        stranger, stranger_id = await self.welcomed()
        stranger.send_text(json.dumps({"type": "endSession", "sessionId": session_id}))
        self.assertEqual(
            await self.next_json(stranger),
            {"type": "error", "details": f"Peer {stranger_id} is not part of {session_id}"},
        )
        # The session still stands: the producer's answer... its offer goes through.
        offer = json.dumps(
            {"type": "peer", "sessionId": session_id, "sdp": {"type": "offer", "sdp": "y"}}
        )
        producer.send_text(offer)
        self.assertEqual(await peer.next(), offer)
        self.assertEqual(producer.unread(), [])
        self.assertEqual(listener.unread(), [])

    async def test_a_v1_0_peer_gets_end_session_and_a_v1_1_peer_end_session_v1_1(self):
        """
        A session's end reaches a v1_1 peer as endSessionV1_1 and a v1_0 peer
        as endSession, whichever form the other side sent. A v1_0 peer's
        endSessionV1_1 that carries an error is refused, as upstream refuses
        it, and ends nothing; without an error it ends the session.
        """
        old, old_id = await self.welcomed('{"type":"setProtocolVersion","version":"v1_0"}')
        new, new_id = await self.welcomed('{"type":"setProtocolVersion","version":"v1_1"}')
        old.send_text('{"type":"setPeerStatus","roles":["producer"]}')
        old.send_text('{"type":"list"}')  # answered once the status is set
        self.assertEqual((await self.next_json(old))["producers"][0]["id"], old_id)
        new.send_text(json.dumps({"type": "startSession", "peerId": old_id}))
        session_id = (await self.next_json(new))["sessionId"]
        await self.next_json(old)
        old.send_text(
            json.dumps({"type": "endSessionV1_1", "sessionId": session_id, "error": "codec"})
        )
        self.assertEqual(
            await self.next_json(old),
            {
                "type": "error",
                "details": f"Invalid end session message with error from peer '{old_id}', "
                "minimum protocol version is 1.1",
            },
        )
        old.send_text(json.dumps({"type": "endSessionV1_1", "sessionId": session_id}))
        self.assertEqual(
            await self.next_json(new),
            {"type": "endSessionV1_1", "sessionId": session_id, "error": None},
        )
        new.send_text(json.dumps({"type": "startSession", "peerId": old_id}))
        second = (await self.next_json(new))["sessionId"]
        await self.next_json(old)
        new.send_text(json.dumps({"type": "endSessionV1_1", "sessionId": second, "error": "bye"}))
        self.assertEqual(await self.next_json(old), {"type": "endSession", "sessionId": second})

    async def test_a_silent_client_is_welcomed_soon_and_at_once_on_a_pinned_path(self):
        """
        A silent client that answers the server's ping is welcomed soon after
        its pong (far sooner than the wait for one that answers none), and at
        once on a path pinned to the JSON dialect.
        """
        started = reactor.seconds()
        client = await self.server.connect()
        welcome = await self.next_json(client)
        waited = reactor.seconds() - started
        self.assertEqual(welcome["type"], "welcome")
        self.assertEqual(client.dialect_pings, 1)
        self.assertLess(waited, DEFAULT_DIALECT_WAIT / 2)
        change_settings(self.server.factory, dialect_paths={"/gst": "json"})
        started = reactor.seconds()
        pinned = await self.server.connect(path="/gst")
        self.assertEqual((await self.next_json(pinned))["type"], "welcome")
        self.assertLess(reactor.seconds() - started, DEFAULT_DIALECT_WAIT)

    async def test_unread_input_is_seen_in_the_socket(self):
        """
        ``has_unread_input`` sees a frame the server has not read yet: in
        the kernel's buffer (plaintext) or behind the TLS layer.
        """
        client = await self.server.connect()
        [protocol] = list(self.server.factory.connections)
        self.assertFalse(protocol.has_unread_input())
        protocol.transport.pauseProducing()
        client.send_text("HELLO unread")
        await eventually(protocol.has_unread_input, "the frame to wait in the socket")
        protocol.transport.resumeProducing()
        await client.expect("HELLO")
        self.assertFalse(protocol.has_unread_input())

    async def test_shutdown_closes_json_peers_with_1001(self):
        """
        Shutting the server down closes JSON peers in a session with 1001 and
        leaves the registry empty.
        """
        producer, producer_id = await self.welcomed()
        producer.send_text('{"type":"setPeerStatus","roles":["producer"]}')
        producer.send_text('{"type":"list"}')  # answered once the status is set
        await self.next_json(producer)
        consumer, _ = await self.welcomed()
        consumer.send_text(json.dumps({"type": "startSession", "peerId": producer_id}))
        await self.next_json(consumer)
        await self.next_json(producer)
        await self.server.service.stopService()
        for client in (producer, consumer):
            self.assertEqual((await client.closed())[0], 1001)
        self.assertTrue(self.server.registry.is_empty())


class PlaintextRealSocketsTests(RealSocketsMoreMixin, unittest.TestCase):
    tls = False


class TLSRealSocketsTests(RealSocketsMoreMixin, unittest.TestCase):
    tls = True


# The dialect tests over Autobahn's own paths, and over the reordering backend.
globals().update(backends.variants([DialectTests], __name__))

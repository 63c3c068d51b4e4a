"""
WHEP and WHIP (issue 22), the HTTP dialects of the table: the SDP they read,
then their sessions in memory on one fake clock, with real Autobahn JSON
producers and consumers in memory, over the in-memory backend and the one
that reorders what the registry contract lets it reorder (the HTTP
resource is driven with twisted.web's request stand-in). Real sockets,
every status, TLS and the cluster are in ``tests/test_whep_sockets.py``.
"""

import io
import json

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from signalling.core import sdp
from signalling.core.dialects import DIALECTS
from signalling.core.http_connections import WhepSession
from signalling.server.auth import TokenKeys, mint
from signalling.server.http_dialects import HttpDialectResource, HttpSession, link_headers
from signalling.server.limits import ConnectionLimits
from signalling.server.metrics import SignallingCollector
from signalling.server.settings import DEFAULT_DIALECT_WAIT
from tests import backends
from tests.servers import Loopback

#: A Chromium-like offer: video and a data channel, bundled.
OFFER = (
    "v=0\r\n"
    "o=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n"
    "s=-\r\n"
    "t=0 0\r\n"
    "a=group:BUNDLE 0 1\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
    "c=IN IP4 0.0.0.0\r\n"
    "a=ice-ufrag:Hx3k\r\n"
    "a=ice-pwd:8dR0V4yE3mPq2tJw1nZc6aLb\r\n"
    "a=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF\r\n"
    "a=setup:actpass\r\n"
    "a=mid:0\r\n"
    "a=recvonly\r\n"
    "a=rtpmap:96 VP8/90000\r\n"
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
    "c=IN IP4 0.0.0.0\r\n"
    "a=mid:1\r\n"
    "a=sctp-port:5000\r\n"
)
ANSWER = (
    "v=0\r\n"
    "o=- 1 1 IN IP4 0.0.0.0\r\n"
    "s=-\r\n"
    "t=0 0\r\n"
    "a=group:BUNDLE 0 1\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
    "c=IN IP4 0.0.0.0\r\n"
    "a=ice-ufrag:pr0d\r\n"
    "a=ice-pwd:producerpasswordproducer\r\n"
    "a=mid:0\r\n"
    "a=sendonly\r\n"
    "a=rtpmap:96 VP8/90000\r\n"
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
    "c=IN IP4 0.0.0.0\r\n"
    "a=mid:1\r\n"
)
CANDIDATE = "candidate:1 1 UDP 2122252543 127.0.0.1 40000 typ host"
CANDIDATE_2 = "candidate:2 1 TCP 1518280447 127.0.0.1 9 typ host tcptype active"
CLIENT_CANDIDATE = "candidate:7 1 UDP 2122260223 127.0.0.1 51000 typ host"
FRAGMENT = (
    "a=ice-ufrag:Hx3k\r\na=ice-pwd:8dR0V4yE3mPq2tJw1nZc6aLb\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\na=" + CLIENT_CANDIDATE + "\r\n"
).encode()

WHEP = DIALECTS["whep"]
WHIP = DIALECTS["whip"]
SECRET = b"whep-test-secret-0123456789abcdef0123"


def obj(text):
    return json.loads(text)


class SdpTests(unittest.SynchronousTestCase):
    """What the HTTP dialects read of SDP."""

    def test_an_offer_is_checked_and_given_crlf_line_ends(self):
        """A description with a media section passes, LF line ends become CRLF."""
        text = sdp.check_offer(OFFER.replace("\r\n", "\n").encode())
        self.assertEqual(text, OFFER)
        self.assertEqual(sdp.sections(text), ["0", "1"])

    def test_what_is_not_an_offer_is_refused_with_a_reason(self):
        for body, reason in (
            (b"", "v=0"),
            (b"\xff\xfe", "UTF-8"),
            (b"hello", "v=0"),
            (b"v=0\r\ns=-\r\n", "no media section"),
            (b"v=0\r\nm=video 9 RTP/AVP 0\r\nnot a line\r\n", "not an SDP line"),
            (b"v=0\r\nm=video 9 RTP/AVP 0\r\na=x\x00y\r\n", "not an SDP line"),
            (b"v=0\r\n" + b"m=audio 9 RTP/AVP 0\r\n" * 65, "more than 64"),
        ):
            with self.assertRaises(sdp.BadSdp) as caught:
                sdp.check_offer(body)
            self.assertIn(reason, str(caught.exception))

    def test_candidates_go_to_the_end_of_their_section_with_an_end_marker(self):
        answer = sdp.with_candidates(
            ANSWER, [(0, CANDIDATE), (1, "a=" + CANDIDATE_2), (5, CANDIDATE), (0, "junk")]
        )
        lines = answer.split("\r\n")
        video = lines.index("m=video 9 UDP/TLS/RTP/SAVPF 96")
        data = lines.index("m=application 9 UDP/DTLS/SCTP webrtc-datachannel")
        self.assertEqual(lines[data - 2 : data], ["a=" + CANDIDATE, "a=end-of-candidates"])
        self.assertEqual(lines[-3:], ["a=" + CANDIDATE_2, "a=end-of-candidates", ""])
        self.assertGreater(data, video)
        # Nothing for a section the answer lacks; no junk.
        self.assertEqual(answer.count("a=candidate:"), 2)
        self.assertNotIn("junk", answer)

    def test_a_candidate_the_answer_holds_already_is_not_added_twice(self):
        holding = ANSWER.replace("a=mid:0\r\n", "a=mid:0\r\na=" + CANDIDATE + "\r\n")
        self.assertEqual(sdp.with_candidates(holding, [(0, CANDIDATE)]).count(CANDIDATE), 1)

    def test_a_fragment_gives_each_candidate_its_section(self):
        candidates, ended = sdp.fragment_candidates(
            FRAGMENT + b"a=mid:1\r\na=" + CANDIDATE_2.encode() + b"\r\na=end-of-candidates\r\n",
            ["0", "1"],
        )
        self.assertEqual(candidates, [(0, CLIENT_CANDIDATE), (1, CANDIDATE_2)])
        self.assertTrue(ended)
        # By place when no mid is named.
        candidates, _ = sdp.fragment_candidates(
            b"m=audio 9 RTP/AVP 0\r\nm=video 9 RTP/AVP 0\r\na=" + CANDIDATE.encode(), ["a", "b"]
        )
        self.assertEqual(candidates, [(1, CANDIDATE)])

    def test_a_bad_fragment_is_refused(self):
        for body in (
            b"\xff",
            b"a=mid:9\r\na=" + CANDIDATE.encode(),
            b"m=a 9 x 0\r\nm=b 9 x 0\r\nm=c 9 x 0\r\na=" + CANDIDATE.encode(),
            b"a=candidate:" + b"x" * 2000,
            b"nonsense",
            b"a=" + CANDIDATE.encode() + b"\r\n" + (b"a=" + CANDIDATE.encode() + b"\r\n") * 300,
        ):
            with self.assertRaises(sdp.BadSdp):
                sdp.fragment_candidates(body, ["0", "1"])

    def test_link_headers_carry_each_url_and_the_credentials(self):
        links = link_headers(
            [
                {"urls": "stun:stun.example.org:3478"},
                {"urls": ["turn:t.example.org:3478?transport=udp", "turns:t.example.org:5349"],
                 "username": "1700000000:v", "credential": 'p"w'},
                {"urls": ["bad>url"]},
            ]
        )
        self.assertEqual(
            links,
            [
                b'<stun:stun.example.org:3478>; rel="ice-server"',
                b'<turn:t.example.org:3478?transport=udp>; rel="ice-server"; '
                b'username="1700000000:v"; credential="p\\"w"; credential-type="password"',
                b'<turns:t.example.org:5349>; rel="ice-server"; '
                b'username="1700000000:v"; credential="p\\"w"; credential-type="password"',
            ],
        )


class Request(DummyRequest):
    """twisted.web's request stand-in, with what the resource reads of a real one."""

    def __init__(self, method, path, body=b"", headers=None, host="192.0.2.1"):
        super().__init__([])
        self.method = method
        self.path = self.uri = path
        self.content = io.BytesIO(body)
        for name, value in (headers or {}).items():
            self.requestHeaders.setRawHeaders(name, [value])
        self._address = IPv4Address("TCP", host, 40000)

    def getClientAddress(self):
        return self._address

    @property
    def body(self):
        return b"".join(self.written)

    def header(self, name):
        values = self.responseHeaders.getRawHeaders(name)
        return values[0] if values else None

    def client_went(self):
        """The client closed its connection before the answer."""
        deferreds, self._finishedDeferreds = self._finishedDeferreds, None
        for d in deferreds or ():
            d.errback(Failure(ConnectionDone()))


class SessionsMixin:
    """WHEP and WHIP sessions in memory, on one fake clock."""

    backend = staticmethod(backends.memory)

    def setUp(self):
        self.net = Loopback(self, backend=self.backend, **self.settings())
        self.factory = self.net.factory
        self.whep = HttpDialectResource(WHEP, self.factory)
        self.whip = HttpDialectResource(WHIP, self.factory)

    def settings(self):
        return {}

    # Peers.

    def json_client(self):
        client = self.net.client()
        self.net.clock.advance(DEFAULT_DIALECT_WAIT)
        self.net.flush()
        [welcome] = [obj(m) for m in client.drain()]
        self.assertEqual(welcome["type"], "welcome")
        return client, welcome["peerId"]

    def producer(self, name="cam"):
        client, peer_id = self.json_client()
        client.send_text(
            json.dumps({"type": "setPeerStatus", "roles": ["producer"], "meta": {"name": name}})
        )
        self.net.flush()
        return client, peer_id

    def received(self, client):
        self.net.flush()
        return [obj(m) for m in client.drain()]

    # Requests.

    def post(self, resource, path, body=OFFER.encode(), headers=None, **kwargs):
        headers = {b"content-type": b"application/sdp", **(headers or {})}
        request = Request(b"POST", path, body, headers, **kwargs)
        result = resource.render(request)
        if result is not NOT_DONE_YET:
            request.write(result)
            request.finish()
        self.net.flush()
        return request

    def call(self, resource, method, path, body=b"", headers=None):
        request = Request(method, path, body, headers)
        result = resource.render(request)
        if result is not NOT_DONE_YET:
            request.write(result)
            request.finish()
        self.net.flush()
        self.assertTrue(request.finished)
        return request

    def patch_session(self, resource, location, body=FRAGMENT):
        return self.call(
            resource, b"PATCH", location, body,
            {b"content-type": b"application/trickle-ice-sdpfrag"},
        )

    def answer(self, producer, session_id, *candidates, end=True):
        """The producer answers, with ``candidates`` (and an empty one to end, if ``end``)."""
        producer.send_text(
            json.dumps(
                {"type": "peer", "sessionId": session_id, "sdp": {"type": "answer", "sdp": ANSWER}}
            )
        )
        for candidate in candidates + (("",) if end else ()):
            producer.send_text(
                json.dumps(
                    {
                        "type": "peer",
                        "sessionId": session_id,
                        "ice": {"candidate": candidate, "sdpMLineIndex": 0},
                    }
                )
            )
        self.net.flush()

    def producer_ids(self):
        """:returns: the ids of the registered producers (through any backend's delays)."""
        d = self.net.registry.json_peers("producer")
        self.net.flush()
        if not isinstance(d, list):
            d = self.successResultOf(d)
        return [peer_id for peer_id, _ in d]

    def started(self, producer):
        """:returns: the ``startSession`` the producer was sent (asserting it carries the offer)."""
        [start] = self.received(producer)
        self.assertEqual(start["type"], "startSession")
        self.assertEqual(start["offer"], OFFER)
        return start

    # WHEP.

    def test_a_whep_viewer_gets_the_producers_answer_and_candidates(self):
        """
        POST with the offer: the producer named by its meta is asked with
        the offer, and its answer with its candidates is the 201.
        """
        producer, producer_id = self.producer("cam")
        request = self.post(self.whep, b"/whep/cam")
        self.assertFalse(request.finished)
        start = self.started(producer)
        self.answer(producer, start["sessionId"], CANDIDATE, CANDIDATE_2)
        self.assertEqual(request.responseCode, 201)
        self.assertEqual(request.header(b"content-type"), b"application/sdp")
        body = request.body.decode()
        self.assertIn("a=" + CANDIDATE + "\r\n", body)
        self.assertIn("a=" + CANDIDATE_2 + "\r\n", body)
        self.assertIn("a=end-of-candidates", body)
        self.assertTrue(body.startswith("v=0\r\n"))
        location = request.header(b"location")
        self.assertTrue(location.startswith(b"/whep/cam/"))
        self.assertEqual(request.header(b"accept-patch"), b"application/trickle-ice-sdpfrag")
        # The session stands among the port's connections, and is counted.
        self.assertEqual(len(self.whep.sessions), 1)
        self.assertEqual(self.factory.stats.http_sessions["whep"], 1)
        self.assertEqual(self.factory.stats.http_responses[("whep", "201")], 1)

    def test_the_metrics_count_responses_and_open_sessions_by_dialect(self):
        """``signalling_http_responses_total`` by dialect and status; open sessions by dialect."""
        producer, _ = self.producer("cam")
        self.post(self.whep, b"/whep/nobody")
        request = self.post(self.whep, b"/whep/cam")
        self.answer(producer, self.started(producer)["sessionId"])
        self.assertEqual(request.responseCode, 201)
        collector = SignallingCollector(
            self.factory.stats, self.net.registry, [], self.factory.settings.dialects
        )
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in collector.collect()
            for sample in family.samples
        }
        self.assertEqual(
            samples[("signalling_http_responses_total", (("dialect", "whep"), ("status", "404")))], 1
        )
        self.assertEqual(
            samples[("signalling_http_responses_total", (("dialect", "whep"), ("status", "201")))], 1
        )
        self.assertEqual(samples[("signalling_http_sessions", (("dialect", "whep"),))], 1)
        self.assertEqual(samples[("signalling_http_sessions", (("dialect", "whip"),))], 0)
        # A WHEP viewer is a JSON peer, counted with them.
        self.assertEqual(samples[("signalling_peers", (("dialect", "json"),))], 2)

    def test_a_producer_is_found_by_its_id_too(self):
        producer, producer_id = self.producer("cam")
        request = self.post(self.whep, b"/whep/" + producer_id.encode())
        start = self.started(producer)
        self.answer(producer, start["sessionId"])
        self.assertEqual(request.responseCode, 201)

    def test_the_answer_waits_for_quiet_without_an_end_of_candidates(self):
        """
        Without an empty candidate, the answer goes out ``candidate_wait``
        after the last candidate came, and not before.
        """
        wait = self.factory.settings.candidate_wait
        producer, _ = self.producer()
        request = self.post(self.whep, b"/whep/cam")
        start = self.started(producer)
        self.answer(producer, start["sessionId"], CANDIDATE, end=False)
        self.net.clock.advance(wait * 0.9)
        self.net.flush()
        self.assertFalse(request.finished)
        self.answer_candidate(producer, start["sessionId"], CANDIDATE_2)
        self.net.clock.advance(wait * 0.9)
        self.net.flush()
        self.assertFalse(request.finished)
        self.net.clock.advance(wait * 0.2)
        self.net.flush()
        self.assertEqual(request.responseCode, 201)
        self.assertIn(CANDIDATE_2, request.body.decode())

    def answer_candidate(self, producer, session_id, candidate):
        producer.send_text(
            json.dumps(
                {"type": "peer", "sessionId": session_id,
                 "ice": {"candidate": candidate, "sdpMLineIndex": 0}}
            )
        )
        self.net.flush()

    def test_an_unknown_producer_is_404_and_nothing_is_left(self):
        self.producer("cam")
        request = self.post(self.whep, b"/whep/other")
        self.assertEqual(request.responseCode, 404)
        self.assertEqual(self.whep.sessions, {})
        self.assertEqual(self.factory.stats.http_sessions["whep"], 0)
        self.assertEqual(self.net.registry.json_peer_count, 1)

    def test_a_producer_that_does_not_answer_is_504_and_its_session_ends(self):
        producer, _ = self.producer()
        request = self.post(self.whep, b"/whep/cam")
        start = self.started(producer)
        self.net.clock.advance(self.factory.settings.answer_timeout)
        self.net.flush()
        self.assertEqual(request.responseCode, 504)
        self.assertEqual(
            self.received(producer), [{"type": "endSession", "sessionId": start["sessionId"]}]
        )
        self.assertEqual(self.whep.sessions, {})
        self.assertEqual(self.net.registry.json_peer_count, 1)

    def test_a_producer_that_leaves_before_answering_is_502(self):
        producer, _ = self.producer()
        request = self.post(self.whep, b"/whep/cam")
        self.started(producer)
        producer.close()
        self.net.flush()
        self.assertEqual(request.responseCode, 502)
        self.assertEqual(self.whep.sessions, {})

    def test_patch_forwards_candidates_and_delete_ends_the_session(self):
        """
        PATCH: the client's candidates go to the producer as peer ICE
        messages, in the section its a=mid names; DELETE: endSession.
        """
        producer, _ = self.producer()
        request = self.post(self.whep, b"/whep/cam")
        session_id = self.started(producer)["sessionId"]
        self.answer(producer, session_id)
        location = request.header(b"location")
        patched = self.patch_session(self.whep, location)
        self.assertEqual(patched.responseCode, 204)
        self.assertEqual(
            self.received(producer),
            [{"type": "peer", "sessionId": session_id,
              "ice": {"candidate": CLIENT_CANDIDATE, "sdpMLineIndex": 0}}],
        )
        deleted = self.call(self.whep, b"DELETE", location)
        self.assertEqual(deleted.responseCode, 200)
        self.assertEqual(
            self.received(producer), [{"type": "endSession", "sessionId": session_id}]
        )
        self.assertEqual(self.patch_session(self.whep, location).responseCode, 404)
        self.assertEqual(self.whep.sessions, {})
        self.assertEqual([c for c in self.factory.connections if isinstance(c, HttpSession)], [])

    def test_candidates_given_before_the_session_started_follow_its_start(self):
        """
        Candidates a WHIP publisher's session gets before a consumer came
        are kept, and sent to the consumer after the offer.
        """
        request = self.post(self.whip, b"/whip/studio")
        [session] = self.whip.sessions.values()
        session.connection.trickle([(1, CANDIDATE_2)])
        [producer_id] = self.producer_ids()
        consumer, _ = self.json_client()
        consumer.send_text(json.dumps({"type": "startSession", "peerId": producer_id}))
        started, offer, ice = self.received(consumer)
        self.assertEqual(offer["sdp"]["type"], "offer")
        self.assertEqual(ice["ice"], {"candidate": CANDIDATE_2, "sdpMLineIndex": 1})
        self.assertFalse(request.finished)

    def test_a_producers_answer_that_overtakes_session_started_is_taken(self):
        """
        The producer's answer may reach the viewer before ``sessionStarted``
        (a cluster delivers what two peers cause in any order): it names
        the session, and is the answer.
        """
        held = []
        self.patch(WhepSession, "json_session_started", lambda self, *args: held.append(args))
        producer, producer_id = self.producer()
        request = self.post(self.whep, b"/whep/cam")
        session_id = self.started(producer)["sessionId"]
        self.answer(producer, session_id, CANDIDATE)
        self.assertEqual(request.responseCode, 201)
        self.assertIn(CANDIDATE, request.body.decode())
        self.assertEqual(held, [(producer_id, session_id)])
        [session] = self.whep.sessions.values()
        self.assertEqual(session.connection.session_id, session_id)

    def test_a_producer_that_leaves_ends_its_whep_sessions(self):
        producer, _ = self.producer()
        request = self.post(self.whep, b"/whep/cam")
        self.answer(producer, self.started(producer)["sessionId"])
        location = request.header(b"location")
        producer.close()
        self.net.flush()
        self.assertEqual(self.patch_session(self.whep, location).responseCode, 404)
        self.assertEqual(self.whep.sessions, {})
        self.assertEqual(self.factory.stats.http_sessions["whep"], 0)

    def test_a_client_that_goes_before_its_answer_ends_its_session(self):
        producer, _ = self.producer()
        request = self.post(self.whep, b"/whep/cam")
        session_id = self.started(producer)["sessionId"]
        request.client_went()
        self.net.flush()
        self.assertEqual(
            self.received(producer), [{"type": "endSession", "sessionId": session_id}]
        )
        self.assertEqual(self.whep.sessions, {})

    def test_a_shutdown_ends_every_session(self):
        producer, _ = self.producer()
        request = self.post(self.whep, b"/whep/cam")
        session_id = self.started(producer)["sessionId"]
        self.answer(producer, session_id)
        self.assertEqual(request.responseCode, 201)
        self.factory.close_all()
        self.net.flush()
        self.assertEqual(self.whep.sessions, {})
        # ... and a new POST is 503, to try again elsewhere or later.
        refused = self.post(self.whep, b"/whep/cam")
        self.assertEqual(refused.responseCode, 503)
        self.assertIsNotNone(refused.header(b"retry-after"))

    # WHIP.

    def test_a_whip_stream_goes_to_the_first_consumer_and_its_answer_back(self):
        """
        POST /whip/NAME: a producer named NAME (and marked WHIP) appears to
        listeners; a consumer that starts a session gets the offer; its
        answer and candidates are the 201.
        """
        listener, _ = self.json_client()
        listener.send_text('{"type":"setPeerStatus","roles":["listener"],"meta":null}')
        self.received(listener)
        request = self.post(self.whip, b"/whip/studio")
        [status] = self.received(listener)
        self.assertEqual(
            (status["roles"], status["meta"]), (["producer"], {"name": "studio", "whip": True})
        )
        consumer, _ = self.json_client()
        consumer.send_text(json.dumps({"type": "startSession", "peerId": status["peerId"]}))
        started, offer = self.received(consumer)
        self.assertEqual(started["type"], "sessionStarted")
        session_id = started["sessionId"]
        self.assertEqual(
            offer, {"type": "peer", "sessionId": session_id, "sdp": {"type": "offer", "sdp": OFFER}}
        )
        # The consumer answers.
        self.answer(consumer, session_id, CANDIDATE)
        self.assertEqual(request.responseCode, 201)
        self.assertIn("a=" + CANDIDATE, request.body.decode())
        # One consumer per publish: a second is ended at once.
        second, _ = self.json_client()
        second.send_text(json.dumps({"type": "startSession", "peerId": status["peerId"]}))
        self.assertEqual(
            [m["type"] for m in self.received(second)], ["sessionStarted", "endSession"]
        )
        # The client's candidates go to the consumer; DELETE unpublishes.
        location = request.header(b"location")
        self.assertEqual(self.patch_session(self.whip, location).responseCode, 204)
        [ice] = self.received(consumer)
        self.assertEqual(ice["ice"]["candidate"], CLIENT_CANDIDATE)
        self.assertEqual(self.call(self.whip, b"DELETE", location).responseCode, 200)
        self.assertEqual(self.received(consumer), [{"type": "endSession", "sessionId": session_id}])
        [left] = self.received(listener)[-1:]
        self.assertEqual((left["peerId"], left["roles"]), (status["peerId"], []))

    def test_a_whip_stream_with_no_consumer_in_time_is_503_and_removed(self):
        listener, _ = self.json_client()
        listener.send_text('{"type":"setPeerStatus","roles":["listener"],"meta":null}')
        self.received(listener)
        request = self.post(self.whip, b"/whip/studio")
        self.assertEqual(len(self.received(listener)), 1)
        self.net.clock.advance(self.factory.settings.whip_wait)
        self.net.flush()
        self.assertEqual(request.responseCode, 503)
        self.assertIsNotNone(request.header(b"retry-after"))
        [left] = self.received(listener)
        self.assertEqual(left["roles"], [])
        self.assertEqual(self.net.registry.json_peer_count, 1)
        self.assertEqual(self.whip.sessions, {})

    def test_when_its_consumer_leaves_a_whip_stream_ends(self):
        request = self.post(self.whip, b"/whip/studio")
        [producer_id] = self.producer_ids()
        consumer, _ = self.json_client()
        consumer.send_text(json.dumps({"type": "startSession", "peerId": producer_id}))
        started, _ = self.received(consumer)
        self.answer(consumer, started["sessionId"])
        location = request.header(b"location")
        consumer.close()
        self.net.flush()
        self.assertEqual(self.patch_session(self.whip, location).responseCode, 404)
        self.assertEqual(self.producer_ids(), [])

    def test_a_consumer_that_offers_is_ended_the_stream_waits_for_another(self):
        """The WHIP client made the offer: a consumer that brings its own is turned away."""
        request = self.post(self.whip, b"/whip/studio")
        [producer_id] = self.producer_ids()
        offering, _ = self.json_client()
        offering.send_text(
            json.dumps({"type": "startSession", "peerId": producer_id, "offer": OFFER})
        )
        self.assertEqual(
            [m["type"] for m in self.received(offering)], ["sessionStarted", "endSession"]
        )
        self.assertFalse(request.finished)
        consumer, _ = self.json_client()
        consumer.send_text(json.dumps({"type": "startSession", "peerId": producer_id}))
        started, _ = self.received(consumer)
        self.answer(consumer, started["sessionId"])
        self.assertEqual(request.responseCode, 201)


class WithTokensMixin:
    """Tokens, claims and limits on the HTTP dialects, in memory."""

    backend = staticmethod(backends.memory)

    def setUp(self):
        self.net = Loopback(self, backend=self.backend)
        self.factory = self.net.factory
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(SECRET)
        self.factory.policy.auth = TokenKeys(path, self.net.clock)
        self.whep = HttpDialectResource(WHEP, self.factory)
        self.whip = HttpDialectResource(WHIP, self.factory)

    def token(self, ttl=3600, **claims):
        token = mint(SECRET, ttl, now=self.net.clock.seconds(), **claims)
        return b"Bearer " + token.encode()

    post = SessionsMixin.post
    producer_ids = SessionsMixin.producer_ids
    json_client = SessionsMixin.json_client
    received = SessionsMixin.received

    def producer(self, name):
        # Producers connect without tokens here: only the HTTP side is under test.
        auth, self.factory.policy.auth = self.factory.policy.auth, None
        try:
            return SessionsMixin.producer(self, name)
        finally:
            self.factory.policy.auth = auth

    def test_no_token_is_401_with_a_bearer_challenge(self):
        self.producer("cam")
        request = self.post(self.whep, b"/whep/cam")
        self.assertEqual(request.responseCode, 401)
        self.assertEqual(request.header(b"www-authenticate"), b"Bearer")
        self.assertEqual(
            self.post(
                self.whep, b"/whep/cam", headers={b"authorization": b"Basic dXNlcjpwYXNz"}
            ).responseCode,
            401,
        )

    def test_calls_say_which_producers_may_be_watched(self):
        producer, _ = self.producer("cam")
        self.producer("secret")
        refused = self.post(
            self.whep, b"/whep/secret", headers={b"authorization": self.token(calls=["cam"])}
        )
        self.assertEqual(refused.responseCode, 403)
        allowed = self.post(
            self.whep, b"/whep/cam", headers={b"authorization": self.token(calls=["cam"])}
        )
        self.assertFalse(allowed.finished)
        self.assertEqual([m["type"] for m in self.received(producer)], ["startSession"])

    def test_roles_say_who_may_watch_and_who_may_publish(self):
        self.producer("cam")
        producer_only = self.token(roles=["producer"])
        self.assertEqual(
            self.post(self.whep, b"/whep/cam", headers={b"authorization": producer_only}).responseCode,
            403,
        )
        consumer_only = self.token(roles=["consumer"])
        self.assertEqual(
            self.post(self.whip, b"/whip/x", headers={b"authorization": consumer_only}).responseCode,
            403,
        )

    def test_a_whip_tokens_subject_names_the_stream(self):
        """A token whose ``sub`` is another name may not publish under this one."""
        request = self.post(
            self.whip, b"/whip/studio", headers={b"authorization": self.token(uid="other")}
        )
        self.assertEqual(request.responseCode, 403)
        self.assertEqual(self.producer_ids(), [])
        self.assertEqual(self.whip.sessions, {})
        ok = self.post(
            self.whip, b"/whip/studio", headers={b"authorization": self.token(uid="studio")}
        )
        self.assertFalse(ok.finished)
        self.assertEqual(len(self.producer_ids()), 1)

    def test_a_session_ends_when_its_token_expires(self):
        producer, _ = self.producer("cam")
        request = self.post(
            self.whep, b"/whep/cam",
            headers={b"authorization": self.token(ttl=60)},
        )
        [start] = self.received(producer)
        SessionsMixin.answer(self, producer, start["sessionId"])
        self.assertEqual(request.responseCode, 201)
        self.net.clock.advance(60)
        self.net.flush()
        self.assertEqual(
            self.received(producer), [{"type": "endSession", "sessionId": start["sessionId"]}]
        )
        self.assertEqual(self.whep.sessions, {})
        self.assertEqual(self.factory.stats.token_closes, {"expired": 1})

    def test_sessions_count_against_the_address_and_the_total(self):
        """Each open session holds one of its address's connections and one of the total."""
        self.factory.policy.auth = None
        self.producer("cam")
        limits = self.factory.policy.limits = ConnectionLimits(per_address=2, total=3)
        first = self.post(self.whep, b"/whep/cam")
        second = self.post(self.whep, b"/whep/cam")
        third = self.post(self.whep, b"/whep/cam")
        self.assertEqual((first.finished, second.finished), (0, 0))
        self.assertEqual(third.responseCode, 429)
        self.assertEqual(limits.websockets, 2)
        other = self.post(self.whep, b"/whep/cam", host="192.0.2.2")
        self.assertFalse(other.finished)
        full = self.post(self.whep, b"/whep/cam", host="192.0.2.3")
        self.assertEqual(full.responseCode, 503)
        first.client_went()
        self.net.flush()
        self.assertEqual(limits.websockets, 2)
        self.assertEqual(self.post(self.whep, b"/whep/cam", host="192.0.2.3").finished, 0)

    def test_requests_past_the_rate_are_429(self):
        """An address's requests draw on one bucket (command burst, then the rate)."""
        self.factory.policy.auth = None
        self.factory.settings = self.factory.settings.replace(command_burst=3, command_rate=1.0)
        whep = HttpDialectResource(WHEP, self.factory)
        statuses = [self.post(whep, b"/whep/none").responseCode for _ in range(5)]
        self.assertEqual(statuses, [404, 404, 404, 429, 429])
        self.net.clock.advance(1.0)
        self.assertEqual(self.post(whep, b"/whep/none").responseCode, 404)
        # Another address has its own bucket.
        self.assertEqual(self.post(whep, b"/whep/none", host="192.0.2.9").responseCode, 404)


class MemorySessionTests(SessionsMixin, unittest.TestCase):
    """On the in-memory backend."""


class ReorderingSessionTests(SessionsMixin, unittest.TestCase):
    """On the backend that reorders results and notifications."""

    backend = staticmethod(backends.reordering)


class MemoryTokenTests(WithTokensMixin, unittest.TestCase):
    """Tokens and limits, on the in-memory backend."""


class ReorderingTokenTests(WithTokensMixin, unittest.TestCase):
    """Tokens and limits, on the reordering backend."""

    backend = staticmethod(backends.reordering)

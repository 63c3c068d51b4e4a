"""
Interoperability: real WebRTC calls through the real server.

GStreamer's ``webrtcbin`` (``contrib/gst_peer.py``, under the system Python)
and aiortc (``signalling-peer``) call each other through ``twistd -n
signalling``, in sessions with either side making the offer and in a room of
three. Each test asserts that ICE connected, that video frames were decoded
and that data channel messages arrived, not only that signalling messages
went through.

Everything runs in a network namespace of the test's own that holds only
loopback addresses (see ``tests/_interop.py``): WebRTC traffic never reaches
another address, and nothing multicast leaves the namespace. Without root,
iproute2, the Debian GStreamer packages or aiortc these tests skip, naming
what to install; with ``CI=true`` they fail instead.
"""

import os

from twisted.trial import unittest

from signalling.server.auth import mint
from tests._interop import InteropMixin

#: The tests' token secret (32 characters or more).
AUTH_SECRET = b"interop-token-secret-0123456789abcdef"

#: Seconds any one step of a call (registration, negotiation, ICE, the first
#: frames) may take.
STEP = 20.0
#: Video frames each side must decode before the call counts as flowing
#: (the peers send 15 frames a second).
FRAMES = 20
#: Data channel greeting each peer sends when the channel opens.
HELLO = "hello from {}"


class SessionTests(InteropMixin, unittest.TestCase):
    """1-1 sessions between GStreamer and aiortc, with both offer directions."""

    timeout = 60

    async def assert_call_flows(self, gst, gst_remote, aio, aio_remote, gst_uid, aio_uid):
        """
        Both sides reach ICE connected, each decodes video frames from the
        other, each receives the other's data channel greeting, and each
        received the other's candidates trickled; every candidate either
        side sent is a loopback address.

        ``gst_remote`` and ``aio_remote`` are how each side names the other
        in its events (None for the caller, whose uid the callee is not told).
        """
        await gst.until(lambda: gst.ice_connected(gst_remote), "GStreamer's ICE connected", STEP)
        await aio.until(lambda: aio.ice_connected(aio_remote), "aiortc's ICE connected", STEP)
        await aio.until(
            lambda: aio.frames_from(aio_remote) >= FRAMES,
            f"aiortc to decode {FRAMES} frames from GStreamer's videotestsrc", STEP,
        )
        await gst.until(
            lambda: gst.frames_from(gst_remote) >= FRAMES,
            f"GStreamer to decode {FRAMES} frames from aiortc", STEP,
        )
        await gst.until(
            lambda: HELLO.format(aio_uid) in gst.messages_from(gst_remote),
            "aiortc's data channel greeting at GStreamer", STEP,
        )
        await aio.until(
            lambda: HELLO.format(gst_uid) in aio.messages_from(aio_remote),
            "GStreamer's data channel greeting at aiortc", STEP,
        )
        self.assert_loopback_candidates(gst, aio)
        # Trickle ICE both ways: each side got the other's candidates as
        # separate messages.
        self.assertTrue(gst.find("remote-candidate", peer=gst_remote), gst.output())
        self.assertTrue(aio.find("remote-candidate", peer=aio_remote), aio.output())
        for peer in (gst, aio):
            self.assertEqual(peer.find("error"), [], peer.output())

    async def hang_up(self, leaving, staying):
        """
        ``leaving`` quits on SIGTERM with status 0; the server then ends the
        session and ``staying`` reports it and exits 0 too.
        """
        await leaving.stop()
        self.assertEqual(leaving.exit_code, 0, leaving.output())
        await staying.wait_for("session-ended", STEP)
        await staying.until(lambda: not staying.running, "its exit", STEP)
        self.assertEqual(staying.exit_code, 0, staying.output())

    async def test_gstreamer_offers_to_aiortc(self):
        """
        GStreamer calls aiortc with SESSION over TLS and sends the offer;
        aiortc answers; candidates trickle both ways (aiortc's are sent as
        ``ice`` messages, not in its SDP); both reach ICE connected, aiortc
        decodes the videotestsrc frames, GStreamer decodes aiortc's video,
        and both get the other's data channel greeting.
        """
        await self.start_namespace()
        await self.start_server(tls=True)
        aio = self.start_aiortc("aio-callee")
        await aio.wait_for("registered", STEP, uid="aio-callee")
        gst = self.start_gst("gst-caller", "--call", "aio-callee")

        await gst.wait_for("session", STEP, peer="aio-callee")
        await gst.wait_for("offer-sent", STEP, peer="aio-callee")
        await aio.wait_for("offer-received", STEP, peer=None)
        await aio.wait_for("answer-sent", STEP, peer=None)
        await gst.wait_for("answer-received", STEP, peer="aio-callee")
        await self.assert_call_flows(gst, "aio-callee", aio, None, "gst-caller", "aio-callee")
        self.assertEqual(gst.find("offer-received"), [])
        self.assertEqual(aio.find("offer-sent"), [])
        await self.hang_up(gst, aio)

    async def test_gstreamer_asks_aiortc_to_offer(self):
        """
        The reverse direction, in plaintext: GStreamer calls aiortc and
        sends OFFER_REQUEST; aiortc makes the offer and GStreamer answers;
        the call connects with media and data both ways.
        """
        await self.start_namespace()
        await self.start_server(tls=False)
        aio = self.start_aiortc("aio-callee")
        await aio.wait_for("registered", STEP, uid="aio-callee")
        gst = self.start_gst("gst-caller", "--call", "aio-callee", "--offer-request")

        await gst.wait_for("offer-request-sent", STEP, peer="aio-callee")
        await aio.wait_for("offer-request-received", STEP, peer=None)
        await aio.wait_for("offer-sent", STEP, peer=None)
        await gst.wait_for("offer-received", STEP, peer="aio-callee")
        await gst.wait_for("answer-sent", STEP, peer="aio-callee")
        await aio.wait_for("answer-received", STEP, peer=None)
        await self.assert_call_flows(gst, "aio-callee", aio, None, "gst-caller", "aio-callee")
        self.assertEqual(gst.find("offer-sent"), [])
        await self.hang_up(aio, gst)

    async def test_aiortc_asks_gstreamer_to_offer(self):
        """
        aiortc calls GStreamer over TLS and sends OFFER_REQUEST; GStreamer
        (the callee) makes the offer and aiortc answers; the call connects
        with media and data both ways.
        """
        await self.start_namespace()
        await self.start_server(tls=True)
        gst = self.start_gst("gst-callee")
        await gst.wait_for("registered", STEP, uid="gst-callee")
        aio = self.start_aiortc("aio-caller", "--call", "gst-callee", "--offer-request")

        await aio.wait_for("offer-request-sent", STEP, peer="gst-callee")
        await gst.wait_for("offer-request-received", STEP, peer=None)
        await gst.wait_for("offer-sent", STEP, peer=None)
        await aio.wait_for("answer-sent", STEP, peer="gst-callee")
        await self.assert_call_flows(gst, None, aio, "gst-callee", "gst-callee", "aio-caller")
        await self.hang_up(gst, aio)


class RoomTests(InteropMixin, unittest.TestCase):
    """A room mixing GStreamer and aiortc peers."""

    timeout = 60

    async def test_room_of_three(self):
        """
        gst-a (GStreamer), then aio-b (aiortc), then gst-c (GStreamer) join a
        room. Each newcomer offers to every member already there through
        ROOM_PEER_MSG, and nobody else offers; every pair reaches ICE
        connected, decodes the other's video and gets its greeting. When
        gst-c leaves, gst-a and aio-b see ROOM_PEER_LEFT and tear down their
        call with gst-c only: their own call keeps its media flowing.
        """
        await self.start_namespace()
        await self.start_server(tls=True)
        room = ["--room", "interop"]
        a = self.start_gst("gst-a", *room)
        await a.wait_for("room", STEP, members=[])
        b = self.start_aiortc("aio-b", *room)
        await b.wait_for("room", STEP, members=["gst-a"])
        await a.wait_for("peer-joined", STEP, peer="aio-b")
        c = self.start_gst("gst-c", *room)
        await c.wait_for("room", STEP, members=["gst-a", "aio-b"])
        peers = {"gst-a": a, "aio-b": b, "gst-c": c}

        for uid, peer in peers.items():
            for other in peers:
                if other == uid:
                    continue
                await peer.until(
                    lambda: peer.ice_connected(other), f"ICE with {other} connected", STEP
                )
                await peer.until(
                    lambda: peer.frames_from(other) >= FRAMES,
                    f"{FRAMES} frames from {other}", STEP,
                )
                await peer.until(
                    lambda: HELLO.format(other) in peer.messages_from(other),
                    f"the greeting of {other}", STEP,
                )
        # The newcomer offers; members answer.
        self.assertEqual([e["peer"] for e in a.find("offer-sent")], [])
        self.assertEqual([e["peer"] for e in b.find("offer-sent")], ["gst-a"])
        self.assertEqual(sorted(e["peer"] for e in c.find("offer-sent")), ["aio-b", "gst-a"])
        self.assertEqual(sorted(e["peer"] for e in a.find("offer-received")), ["aio-b", "gst-c"])
        self.assertEqual([e["peer"] for e in b.find("offer-received")], ["gst-c"])
        self.assert_loopback_candidates(a, b, c)

        await c.stop()
        self.assertEqual(c.exit_code, 0, c.output())
        for peer in (a, b):
            await peer.wait_for("peer-left", STEP, peer="gst-c")
            await peer.wait_for("call-closed", STEP, peer="gst-c")
        # The call between the two who stay goes on.
        a_had, b_had = a.frames_from("aio-b"), b.frames_from("gst-a")
        await a.until(
            lambda: a.frames_from("aio-b") >= a_had + FRAMES,
            "more frames from aio-b after gst-c left", STEP,
        )
        await b.until(
            lambda: b.frames_from("gst-a") >= b_had + FRAMES,
            "more frames from gst-a after gst-c left", STEP,
        )
        self.assertEqual(a.find("call-closed", peer="aio-b"), [])
        self.assertEqual(b.find("call-closed", peer="gst-a"), [])
        self.assertEqual(a.find("peer-left", peer="aio-b"), [])
        self.assertEqual(b.find("peer-left", peer="gst-a"), [])


class JsonDialectTests(InteropMixin, unittest.TestCase):
    """
    The JSON dialect (webrtcsink and webrtcsrc's protocol) with real WebRTC
    stacks, on the server's one port.
    """

    timeout = 90

    async def meet(self, start_producer, start_consumer, consume=None, producer_args=(),
                   consumer_args=()):
        """
        Start a producer (``start_producer``: :meth:`start_aiortc` or
        :meth:`start_gst`), then a consumer of it (``consume``: its id when
        None, or ``first``), and wait until the consumer's session started.

        :returns: ``(producer, producer id, consumer, consumer id)``.
        """
        producer = start_producer(
            "producer", "--protocol", "json", "--produce", *producer_args
        )
        await producer.wait_for("registered", STEP)
        producer_id = producer.find("registered")[0]["uid"]
        consumer = start_consumer(
            "consumer", "--protocol", "json", "--consume", consume or producer_id, *consumer_args
        )
        await consumer.wait_for("session", STEP, peer=producer_id)
        consumer_id = consumer.find("registered")[0]["uid"]
        return producer, producer_id, consumer, consumer_id

    async def assert_media_flows(self, producer, producer_id, consumer, consumer_id):
        """Each side decodes the other's video; every candidate is a loopback one."""
        await consumer.until(
            lambda: consumer.frames_from(producer_id) >= FRAMES,
            "the consumer to decode the producer's video", STEP,
        )
        await producer.until(
            lambda: producer.frames_from(consumer_id) >= FRAMES,
            "the producer to decode the consumer's video", STEP,
        )
        self.assert_loopback_candidates(producer, consumer)

    async def test_an_aiortc_consumer_plays_an_aiortc_producer(self):
        """
        A producer registers with a display name; a v1.1 consumer finds it
        as a listener, starts a session and answers the producer's offer;
        media and the data channel flow both ways, candidates are loopback
        ones; when the consumer leaves, the producer is told the session
        ended and stays registered.
        """
        await self.start_namespace()
        await self.start_server(tls=True)
        producer, producer_id, consumer, consumer_id = await self.meet(
            self.start_aiortc, self.start_aiortc, "first",
            ("--meta", "cam"), ("--protocol-version", "v1_1"),
        )
        await producer.wait_for("offer-sent", STEP, peer=consumer_id)
        await consumer.wait_for("answer-sent", STEP, peer=producer_id)
        await self.assert_media_flows(producer, producer_id, consumer, consumer_id)
        await consumer.until(
            lambda: HELLO.format(producer_id) in consumer.messages_from(producer_id),
            "the producer's data channel greeting", STEP,
        )
        await consumer.stop()
        self.assertEqual(consumer.exit_code, 0, consumer.output())
        await producer.wait_for("session-ended", STEP)
        self.assertTrue(producer.running, producer.output())
        for peer in (producer, consumer):
            self.assertEqual(peer.find("error"), [], peer.output())

    async def test_a_gstreamer_consumer_plays_a_gstreamer_producer(self):
        """
        webrtcbin as webrtcsink and webrtcsrc use it: the producer offers
        on startSession, the consumer (which asked for the producer by its
        id) answers; media flows both ways; the producer leaves and the
        consumer is told its session ended.
        """
        await self.start_namespace()
        await self.start_server(tls=True)
        producer, producer_id, consumer, consumer_id = await self.meet(
            self.start_gst, self.start_gst
        )
        await producer.wait_for("offer-sent", STEP, peer=consumer_id)
        await self.assert_media_flows(producer, producer_id, consumer, consumer_id)
        await producer.stop()
        await consumer.wait_for("session-ended", STEP)
        await consumer.until(lambda: not consumer.running, "its exit", STEP)
        self.assertEqual(consumer.exit_code, 0, consumer.output())

    async def test_an_aiortc_consumer_plays_a_gstreamer_producer_and_the_reverse(self):
        """Across stacks, in plaintext: aiortc consumes GStreamer, GStreamer consumes aiortc."""
        await self.start_namespace()
        await self.start_server(tls=False)
        await self.assert_media_flows(*await self.meet(self.start_gst, self.start_aiortc))
        await self.assert_media_flows(*await self.meet(self.start_aiortc, self.start_gst))


class TokenTests(InteropMixin, unittest.TestCase):
    """Real peers that present tokens to a server that asks for them."""

    timeout = 60
    assert_call_flows = SessionTests.assert_call_flows

    def setUp(self):
        secrets = os.path.abspath(self.mktemp())
        with open(secrets, "wb") as f:
            f.write(AUTH_SECRET + b"\n")
        self.server_args = ("--auth-secret", secrets)

    def url_for(self, uid):
        return f"{self.server.url}/?token={mint(AUTH_SECRET, 300, uid=uid)}"

    async def test_gstreamer_and_aiortc_call_each_other_with_tokens(self):
        """
        Each peer's URL carries a token for its own uid: they register, call
        and reach a connected call; a peer without a token is refused.
        """
        await self.start_namespace()
        await self.start_server(tls=True)
        aio = self.start_aiortc("aio-callee", "--url", self.url_for("aio-callee"))
        await aio.wait_for("registered", STEP, uid="aio-callee")
        gst = self.start_gst("gst-caller", "--server", self.url_for("gst-caller"), "--call", "aio-callee")
        await gst.wait_for("session", STEP, peer="aio-callee")
        await self.assert_call_flows(gst, "aio-callee", aio, None, "gst-caller", "aio-callee")
        refused = self.start_aiortc("no-token")
        await refused.until(lambda: not refused.running, "the peer without a token to give up", STEP)
        self.assertEqual(refused.exit_code, 3, refused.output())

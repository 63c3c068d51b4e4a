"""
The call page in a real browser: headless Chromium (Debian's ``chromium``,
driven through the DevTools protocol, see ``tests/_chromium.py``) opens the
page the server serves at ``/`` and makes real WebRTC calls through the
server, with other pages and with the GStreamer peer (``contrib/gst_peer.py``,
run by Debian's Python with ``gi``).

The fixtures are the interop tests' (``tests/_interop.py``): every test runs
the server (``twistd signalling``, TLS), the browser and the GStreamer peers
inside a network namespace of its own that holds loopback addresses only, so
ICE checks and media reach nothing but loopback.

Assertions are on what the page decodes: the remote ``<video>`` has a size,
its count of decoded frames keeps growing, and the candidate pair in use
joins two loopback addresses.

A screenshot of the page in a connected call is written to each test's
temporary directory; with ``SIGNALLING_UPDATE_SCREENSHOT=1`` in the
environment, the one of
:meth:`GStreamerBrowserTests.test_a_gstreamer_peer_calls_the_page` also
replaces ``docs/call-page.png`` (``docs/clients.md`` shows it).

Without Chromium, GStreamer or the rights to make a namespace the tests skip,
naming what to install; with ``CI=true`` they fail instead.
"""

import json
import os
import shutil
from urllib.parse import quote, urlencode

from twisted.trial.unittest import TestCase

from twisted.internet import reactor, task

from signalling.server.auth import mint
from tests import _chromium, _interop

#: The tests' token secret (32 characters or more).
AUTH_SECRET = b"browser-token-secret-0123456789abcdef"


def _chromium_pause(seconds):
    """:returns: a Deferred that fires after ``seconds``."""
    return task.deferLater(reactor, seconds, lambda: None)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCREENSHOT = os.path.join(ROOT, "docs", "call-page.png")
VIEWER_SCREENSHOT = os.path.join(ROOT, "docs", "viewer-page.png")

#: How long one call may take to show decoded video, in seconds.
CALL_TIMEOUT = 30.0
#: Frames a page must decode after the first, to show that video flows.
MORE_FRAMES = 10


def _pages_unavailable():
    """:returns: why the page tests cannot run here, or None when they can."""
    if not os.path.exists("/proc/self/ns/net"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating a network namespace needs root"
    if shutil.which("ip") is None:
        return "the ip command; install the Debian package iproute2"
    return _chromium.unavailable()


def _peer_expression(uid):
    """:returns: JavaScript for the page's stats of the peer ``uid`` (None: the caller)."""
    return f"callPage.peers().find((p) => p.uid === {json.dumps(uid)})"


#: A short SDP description with one media section, as an offer and as an answer.
_SDP = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\n"
)
_OFFER = _SDP + "a=recvonly\r\n"
_ANSWER = _SDP + "a=sendonly\r\n"

#: JavaScript: a function of a meta that connects a producer of the JSON
#: protocol from the page (a WebSocket of its own), which answers every
#: offer a session brings with :data:`_ANSWER` and counts them; it resolves
#: to the producer's id once welcomed.
_FAKE_PRODUCER = """(meta) => new Promise((resolve, reject) => {
  const scheme = location.protocol === 'https:' ? 'wss://' : 'ws://';
  const ws = new WebSocket(scheme + location.host + '/');
  ws.offers = 0;
  (window.fakeProducers = window.fakeProducers || []).push(ws);
  ws.onerror = () => reject(new Error('the producer could not connect'));
  ws.onmessage = (event) => {
    const m = JSON.parse(event.data);
    if (m.type === 'welcome') {
      ws.send(JSON.stringify({type: 'setPeerStatus', roles: ['producer'], meta: meta}));
      resolve(m.peerId);
    } else if (m.type === 'startSession' && m.offer) {
      ws.offers += 1;
      ws.send(JSON.stringify({type: 'peer', sessionId: m.sessionId,
                              sdp: {type: 'answer', sdp: %s}}));
    }
  };
})""" % json.dumps(_ANSWER)


def _shown_whep_url(producer_id):
    """:returns: JavaScript for the WHEP URL the page shows with a producer (null: none)."""
    return (
        "(() => { const item = [...document.querySelectorAll('#producer-list li')]"
        f".find((li) => li.dataset.producerId === {json.dumps(producer_id)}); "
        "if (!item) return null; const code = item.querySelector('.whep-url'); "
        "return code ? code.textContent : ''; })()"
    )


def _received_video_frames(gst):
    """:returns: how many video frames a GStreamer peer has decoded, over all its calls."""
    return max([e.get("frames", 0) for e in gst.find("media", kind="video")] or [0])


class BrowserTestsMixin(_interop.InteropMixin):
    """The namespace, the server and Chromium for one test, and GStreamer peers."""

    timeout = 120

    async def start(self, gst=False):
        """
        Make the namespace (loopback only), start the server (TLS) and
        Chromium inside it.

        :param gst: the test also runs GStreamer peers.
        """
        if gst:
            reason = _pages_unavailable()
            if reason is not None:
                _interop.missing_requirement(reason)
            await self.start_namespace()
        else:
            await self._start_namespace_for_pages()
        await self.start_server(tls=True)
        self.browser = await _chromium.Browser.launch(self, wrap=self.namespace.command)

    async def _start_namespace_for_pages(self):
        """:meth:`start_namespace` without the GStreamer and aiortc requirements."""
        reason = _pages_unavailable()
        if reason is not None:
            _interop.missing_requirement(reason)
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        namespace = _interop.NetworkNamespace()
        self.addCleanup(namespace.delete)
        await namespace.create()
        await namespace.assert_loopback_only()
        self.namespace = namespace

    def page_url(self, **query):
        """:returns: the call page's URL with ``query`` (``id``, ``call``, ``room``...)."""
        url = self.server.url.replace("wss://", "https://").replace("ws://", "http://") + "/"
        return url + ("?" + urlencode(query, doseq=True) if query else "")

    async def open_page(self, label, **query):
        """:returns: a :class:`_chromium.Page` showing the call page, registered."""
        page = await self.browser.open(self.page_url(**query), label)
        await page.wait_for("callPage.registered", f"{label} to register", timeout=15)
        return page

    def whep_url(self, name):
        """:returns: the WHEP URL naming ``name`` (a producer's name or id) on the test's server."""
        return self.page_url()[:-1] + "/whep/" + quote(name, safe="")

    async def gst_decodes_video(self, gst):
        """Wait until the GStreamer peer ``gst`` has decoded video frames."""
        await gst.until(
            lambda: _received_video_frames(gst) >= MORE_FRAMES,
            f"{MORE_FRAMES} decoded video frames",
            CALL_TIMEOUT,
        )

    async def assert_decodes_video(self, page, uid, size=None):
        """
        Wait until ``page`` is connected to ``uid`` (None: the caller of a
        session) and its video element shows frames that keep coming.

        :param size: the expected ``(width, height)`` of the decoded video.
        :returns: the peer's stats from the page.
        """
        peer = _peer_expression(uid)
        first = await page.wait_for(
            f"(() => {{ const p = {peer}; "
            "return p && p.state === 'connected' && p.videoWidth > 0 && p.frames > 0 ? p : null; })()",
            f"decoded video from {uid or 'the caller'}",
            timeout=CALL_TIMEOUT,
        )
        await page.wait_for(
            f"{peer}.frames >= {first['frames'] + MORE_FRAMES}",
            f"more frames from {uid or 'the caller'} (had {first['frames']})",
            timeout=CALL_TIMEOUT,
        )
        if size is not None:
            self.assertEqual((first["videoWidth"], first["videoHeight"]), size)
        pairs = await page.evaluate("callPage.selectedPairs()")
        [pair] = [p["pair"] for p in pairs if p["uid"] == uid]
        _chromium.assert_loopback_pair(self, pair, pairs)
        return first

    async def screenshot(self, page, name):
        """Save a PNG of ``page`` in the test's temporary directory. :returns: its bytes."""
        return await _chromium.save_screenshot(self, page, name)


class BrowserTests(BrowserTestsMixin, TestCase):
    """Pages calling pages, and what the page says when a call cannot be made."""

    async def test_two_pages_meet_in_a_room_and_decode_each_others_video(self):
        """
        Two pages that join the same room connect (the newcomer offers with
        ``ROOM_PEER_MSG``), and each decodes the other's camera. When one
        leaves, the other drops its video and stays in the room.
        """
        await self.start()
        alice = await self.open_page("alice", id="alice", room="demo")
        await alice.wait_for("callPage.mode === 'room'", "alice to be in the room")
        bob = await self.open_page("bob", id="bob", room="demo")
        await self.assert_decodes_video(alice, "bob")
        await self.assert_decodes_video(bob, "alice")
        for page in (alice, bob):
            await page.wait_for("callPage.callState === 'connected'", "the page to say connected")
            text = await page.evaluate("callPage.callText")
            self.assertEqual(text, "In room 'demo': connected to 1 of 1 member")
        await self.screenshot(alice, "room.png")

        # bob leaves: alice drops his video and waits for others.
        await bob.evaluate("document.getElementById('hangup-button').click()")
        await alice.wait_for("callPage.peers().length === 0", "bob's video to go")
        self.assertEqual(
            await alice.evaluate("callPage.callText"), "In room 'demo', waiting for others to join"
        )
        await bob.wait_for("callPage.callState === 'ended'", "bob to have left")
        self.assertEqual(await bob.evaluate("callPage.callText"), "Left room 'demo'")

    async def test_a_page_calls_another_page_by_id(self):
        """
        A page types another page's id and clicks Call: both decode the
        other's camera. Hanging up ends the call on both pages, which then
        register again: a second call, the other way, connects too.
        """
        await self.start()
        callee = await self.open_page("callee", id="callee")
        await callee.wait_for("callPage.callState === 'ready'", "the callee to say it is ready")
        caller = await self.open_page("caller", id="caller")
        await caller.evaluate(
            "document.getElementById('peer-id').value = 'callee';"
            "document.getElementById('call-button').click()"
        )
        await self.assert_decodes_video(caller, "callee")
        await self.assert_decodes_video(callee, None)
        for page in (caller, callee):
            await page.wait_for("callPage.callState === 'connected'", "the page to say connected")
        self.assertEqual(await caller.evaluate("callPage.callText"), "In a call with 'callee'")
        await self.screenshot(caller, "call.png")

        await caller.evaluate("document.getElementById('hangup-button').click()")
        for page, text in ((caller, "Call ended"), (callee, "Call ended: the caller hung up")):
            await page.wait_for("callPage.callState === 'ended'", "the call to end")
            self.assertEqual(await page.evaluate("callPage.callText"), text)
            await page.wait_for("callPage.registered", "the page to register again")
            self.assertEqual(await page.evaluate("callPage.peers().length"), 0)
        # Registered again, each can take the next call.
        await callee.evaluate("callPage.call('caller', false)")
        await self.assert_decodes_video(callee, "caller")

    async def test_a_caller_page_can_ask_the_callee_page_to_make_the_offer(self):
        """
        With "ask the callee to make the offer", the caller sends
        ``OFFER_REQUEST`` after ``SESSION_OK``; the callee page makes the
        offer and the call connects both ways.
        """
        await self.start()
        callee = await self.open_page("callee", id="callee")
        caller = await self.open_page("caller", id="caller", call="callee", offer_request="1")
        await self.assert_decodes_video(callee, None)
        await self.assert_decodes_video(caller, "callee")
        logged = "\n".join(self.browser.console)
        self.assertIn("Asked 'callee' to make the offer", logged)

    async def test_a_page_without_a_camera_sends_a_test_pattern(self):
        """
        A browser without camera or microphone says so on the page and sends
        a moving test pattern instead, which the page it calls decodes.
        """
        await self.start()
        callee = await self.open_page("callee", id="callee")
        bare = await _chromium.Browser.launch(self, wrap=self.namespace.command, fake_devices=False)
        caller = await bare.open(self.page_url(id="no-camera", call="callee"), "no-camera")
        await caller.wait_for("callPage.registered", "the page without a camera to register")
        await self.assert_decodes_video(callee, None, size=(640, 360))
        await self.assert_decodes_video(caller, "callee")
        note = await caller.evaluate("callPage.mediaNote")
        self.assertTrue(note.startswith("No camera ("), note)
        self.assertIn("sending a test pattern instead", note)
        self.assertIn("No microphone", note)
        self.assertEqual(await caller.evaluate("callPage.localTracks"), ["video"])
        self.assertFalse(await caller.evaluate("document.getElementById('media-note').hidden"))
        await self.screenshot(caller, "no-camera.png")

    async def test_calling_an_unknown_peer_shows_the_servers_reason(self):
        """
        Calling an id nobody has registered shows the server's ``ERROR``
        reason; the page stays registered and ready for calls.
        """
        await self.start()
        page = await self.open_page("lonely", id="lonely", call="nobody")
        await page.wait_for("callPage.callState === 'error'", "the call to fail")
        self.assertEqual(
            await page.evaluate("callPage.callText"),
            "Cannot call 'nobody': peer 'nobody' not found",
        )
        self.assertEqual(await page.evaluate("callPage.mode"), "idle")
        self.assertTrue(await page.evaluate("callPage.registered"))
        self.assertFalse(await page.evaluate("document.getElementById('call-button').disabled"))

    async def test_a_taken_id_is_refused_with_the_servers_reason(self):
        """
        A page asked to register under an id another page holds says so with
        the server's reason, and does not take another id by itself.
        """
        await self.start()
        await self.open_page("first", id="same")
        second = await self.browser.open(self.page_url(id="same"), "second")
        await second.wait_for("callPage.callState === 'error'", "the refusal")
        self.assertEqual(
            await second.evaluate("callPage.callText"),
            "Cannot register as 'same': peer uid 'same' is already taken. "
            "Choose another id with ?id=...",
        )
        self.assertFalse(await second.evaluate("callPage.registered"))
        self.assertEqual(await second.evaluate("callPage.ourId"), "same")

    async def test_ice_servers_come_from_the_page_address(self):
        """
        ``?ice=`` takes STUN and TURN servers, GStreamer's
        ``turn://user:password@host:port`` included, and the page shows them.
        """
        await self.start()
        page = await self.open_page(
            "ice", id="ice", ice=["stun:127.0.0.1:3478", "turn://user:pa%40ss@127.0.0.1:3479"]
        )
        self.assertEqual(
            await page.evaluate("callPage.iceServers"),
            [
                {"urls": "stun:127.0.0.1:3478"},
                {"urls": "turn:127.0.0.1:3479", "username": "user", "credential": "pa@ss"},
            ],
        )
        shown = await page.evaluate("document.getElementById('ice-servers').textContent")
        self.assertEqual(shown, "stun:127.0.0.1:3478; turn:127.0.0.1:3479")


class GStreamerBrowserTests(BrowserTestsMixin, TestCase):
    """The page against the GStreamer peer (``contrib/gst_peer.py``)."""

    async def test_a_gstreamer_peer_calls_the_page(self):
        """
        The GStreamer peer calls the page by id (``SESSION``, then its offer):
        the page decodes the 320x240 ``videotestsrc`` picture, and GStreamer
        decodes the page's camera.
        """
        await self.start(gst=True)
        page = await self.open_page("browser", id="browser")
        gst = self.start_gst("gst-caller", "--call", "browser")
        await self.assert_decodes_video(page, None, size=(320, 240))
        await self.gst_decodes_video(gst)
        png = await self.screenshot(page, "called-by-gstreamer.png")
        if os.environ.get("SIGNALLING_UPDATE_SCREENSHOT") == "1":
            with open(SCREENSHOT, "wb") as f:
                f.write(png)

    async def test_the_page_calls_a_gstreamer_peer(self):
        """
        The page calls a waiting GStreamer peer by id and makes the offer:
        both decode the other's video.
        """
        await self.start(gst=True)
        gst = self.start_gst("gst-callee")
        await gst.wait_for("registered", CALL_TIMEOUT)
        page = await self.open_page("browser", id="browser", call="gst-callee")
        await self.assert_decodes_video(page, "gst-callee", size=(320, 240))
        await self.gst_decodes_video(gst)

    async def test_a_receive_only_page_calls_a_gstreamer_peer(self):
        """
        A page with ``?media=none`` sends nothing: its offer only asks to
        receive, and it decodes the GStreamer peer's video.
        """
        await self.start(gst=True)
        gst = self.start_gst("gst-callee")
        await gst.wait_for("registered", CALL_TIMEOUT)
        page = await self.open_page("browser", id="browser", call="gst-callee", media="none")
        await self.assert_decodes_video(page, "gst-callee", size=(320, 240))
        self.assertEqual(await page.evaluate("callPage.localTracks"), [])
        self.assertIn("Receive only", await page.evaluate("callPage.mediaNote"))

    async def test_the_page_asks_a_gstreamer_peer_to_make_the_offer(self):
        """
        The page calls with ``OFFER_REQUEST``: the GStreamer peer makes the
        offer, the page answers, and video flows both ways.
        """
        await self.start(gst=True)
        gst = self.start_gst("gst-callee")
        await gst.wait_for("registered", CALL_TIMEOUT)
        page = await self.open_page(
            "browser", id="browser", call="gst-callee", offer_request="1"
        )
        await self.assert_decodes_video(page, "gst-callee", size=(320, 240))
        await gst.wait_for("offer-request-received", CALL_TIMEOUT)
        await self.gst_decodes_video(gst)

    async def test_a_gstreamer_peer_asks_the_page_to_make_the_offer(self):
        """
        The GStreamer peer calls with ``OFFER_REQUEST``: the page makes the
        offer, and video flows both ways.
        """
        await self.start(gst=True)
        page = await self.open_page("browser", id="browser")
        gst = self.start_gst("gst-caller", "--call", "browser", "--offer-request")
        await self.assert_decodes_video(page, None, size=(320, 240))
        await gst.wait_for("offer-received", CALL_TIMEOUT)
        await self.gst_decodes_video(gst)

    async def test_a_page_and_a_gstreamer_peer_meet_in_a_room(self):
        """
        A GStreamer peer joins a room where a page waits: it offers with
        ``ROOM_PEER_MSG``, and both decode the other's video.
        """
        await self.start(gst=True)
        page = await self.open_page("browser", id="browser", room="mixed")
        await page.wait_for("callPage.mode === 'room'", "the page to be in the room")
        gst = self.start_gst("gst-member", "--room", "mixed")
        await self.assert_decodes_video(page, "gst-member", size=(320, 240))
        await self.gst_decodes_video(gst)


class StreamViewerTests(BrowserTestsMixin, TestCase):
    """
    The stream viewer of the page at ``/`` (gstwebrtc-api from npm, served
    by the server) with producers and consumers of the JSON protocol.
    """

    async def test_the_page_lists_a_gstreamer_producer_and_plays_it(self):
        """
        A webrtcbin producer (as webrtcsink) registers with a display name:
        the page lists it live with its meta, plays it as a consumer and
        decodes its 320x240 test picture; when it leaves, the list forgets it.
        """
        await self.start(gst=True)
        page = await self.open_page("viewer")
        await page.wait_for("streamsPage.clientId", "the viewer to be welcomed", timeout=15)
        producer = self.start_gst("gst-producer", "--protocol", "json", "--produce", "--meta", "bars")
        await producer.wait_for("registered", CALL_TIMEOUT)
        producer_id = producer.find("registered")[0]["uid"]
        listed = await page.wait_for(
            f"streamsPage.producers().find((p) => p.id === {json.dumps(producer_id)})",
            "the producer in the page's list",
            timeout=15,
        )
        self.assertEqual(listed["meta"], {"display-name": "bars"})
        # No name in its meta: its WHEP URL names it by its id.
        shown = await page.wait_for(_shown_whep_url(producer_id), "the producer's WHEP URL")
        self.assertEqual(shown, self.whep_url(producer_id))
        await page.evaluate(f"streamsPage.play({json.dumps(producer_id)})")
        frames = f"streamsPage.frames({json.dumps(producer_id)})"
        first = await page.wait_for(
            f"(() => {{ const f = {frames}; return f && f.frames > 0 && f.videoWidth > 0 ? f : null; }})()",
            "decoded video from the producer",
            timeout=CALL_TIMEOUT,
        )
        self.assertEqual((first["videoWidth"], first["videoHeight"]), (320, 240))
        await page.wait_for(
            f"{frames}.frames >= {first['frames'] + MORE_FRAMES}",
            "more frames from the producer",
            timeout=CALL_TIMEOUT,
        )
        png = await self.screenshot(page, "viewer-playing-gstreamer.png")
        if os.environ.get("SIGNALLING_UPDATE_SCREENSHOT") == "1":
            with open(VIEWER_SCREENSHOT, "wb") as f:
                f.write(png)
        await producer.stop()
        await page.wait_for(
            f"!streamsPage.producers().some((p) => p.id === {json.dumps(producer_id)})",
            "the producer to leave the list",
            timeout=15,
        )

    async def test_each_listed_stream_shows_its_whep_url(self):
        """
        Each listed producer shows its WHEP URL on the page's origin, by the
        name in its meta (percent-encoded) when that name leads to it alone,
        else by its id; a stream published over WHIP shows none. A POST of
        an offer to the URL reaches that producer and brings back its answer;
        the copy button puts the URL on the clipboard.
        """
        await self.start()
        page = await self.open_page("viewer", media="none")
        await page.wait_for("streamsPage.clientId", "the viewer to be welcomed", timeout=15)
        self.assertEqual(
            await page.evaluate("document.getElementById('whip-url').textContent"),
            self.page_url()[:-1] + "/whip/NAME",
        )
        metas = {
            "named": {"name": "cam 1/\u00e9"},
            "unnamed": {"display-name": "bars"},
            "twin 1": {"name": "twin"},
            "twin 2": {"name": "twin"},
            "whip": {"name": "obs", "whip": True},
        }
        ids = {}
        for label, meta in metas.items():
            ids[label] = await page.evaluate(f"({_FAKE_PRODUCER})({json.dumps(meta)})")
        for label, producer_id in ids.items():
            await page.wait_for(
                f"{_shown_whep_url(producer_id)} !== null", f"the {label} producer in the list"
            )
        shown = {
            label: await page.evaluate(_shown_whep_url(producer_id))
            for label, producer_id in ids.items()
        }
        self.assertEqual(
            shown,
            {
                "named": self.whep_url("cam 1/\u00e9"),
                "unnamed": self.whep_url(ids["unnamed"]),
                # One name, two producers: the name would reach the older only.
                "twin 1": self.whep_url(ids["twin 1"]),
                "twin 2": self.whep_url(ids["twin 2"]),
                "whip": "",
            },
        )
        self.assertTrue(shown["named"].endswith("/whep/cam%201%2F%C3%A9"))

        post = await page.evaluate(
            "(async () => { "
            f"const url = {json.dumps(shown['named'])}; "
            "const r = await fetch(url, {method: 'POST', "
            f"headers: {{'Content-Type': 'application/sdp'}}, body: {json.dumps(_OFFER)}}}); "
            "const body = await r.text(); const location = r.headers.get('Location'); "
            "const gone = location ? "
            "(await fetch(new URL(location, url), {method: 'DELETE'})).status : null; "
            "return {status: r.status, body: body, gone: gone, "
            "offers: window.fakeProducers.map((ws) => ws.offers)}; })()"
        )
        self.assertEqual((post["status"], post["gone"]), (201, 200), post)
        self.assertEqual(post["body"], _ANSWER + "a=end-of-candidates\r\n")
        self.assertEqual(post["offers"], [1, 0, 0, 0, 0])

        await self.browser.send(
            "Browser.grantPermissions",
            {"origin": self.page_url()[:-1],
             "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
        )
        await page.send("Emulation.setFocusEmulationEnabled", {"enabled": True})
        item = (
            "[...document.querySelectorAll('#producer-list li')]"
            f".find((li) => li.dataset.producerId === {json.dumps(ids['named'])})"
        )
        await page.evaluate(f"{item}.querySelector('button.copy').click()")
        await page.wait_for(
            f"{item}.querySelector('button.copy').dataset.copied === 'yes'", "the URL to be copied"
        )
        self.assertEqual(await page.evaluate("navigator.clipboard.readText()"), shown["named"])

    async def test_a_gstreamer_consumer_plays_the_page_camera(self):
        """
        The page publishes its (fake) camera as a producer through
        gstwebrtc-api; a webrtcbin consumer (as webrtcsrc) finds it and
        decodes its video.
        """
        await self.start(gst=True)
        page = await self.open_page("publisher", stream_name="camera page")
        await page.wait_for("streamsPage.clientId", "the page to be welcomed", timeout=15)
        await page.wait_for("callPage.localStream !== null", "the page's camera", timeout=15)
        await page.evaluate("streamsPage.publish()")
        await page.wait_for("streamsPage.publishing", "the page to publish", timeout=15)
        page_id = await page.evaluate("streamsPage.clientId")
        consumer = self.start_gst("gst-consumer", "--protocol", "json", "--consume", "first")
        await consumer.wait_for("session", CALL_TIMEOUT, peer=page_id)
        await self.gst_decodes_video(consumer)


class TokenPageTests(BrowserTestsMixin, TestCase):
    """The page on a server that asks for tokens: it passes on its own ``?token=``."""

    def setUp(self):
        secrets = os.path.abspath(self.mktemp())
        with open(secrets, "wb") as f:
            f.write(AUTH_SECRET + b"\n")
        self.server_args = ("--auth-secret", secrets)

    async def test_the_page_connects_with_its_token_and_not_without(self):
        """
        With ``?token=`` (for its uid) the page registers and its viewer is
        welcomed; the token is not shown on the page. Without one, neither.
        """
        await self.start()
        token = mint(AUTH_SECRET, 300, uid="browser")
        page = await self.open_page("with-token", id="browser", token=token)
        await page.wait_for("streamsPage.clientId", "the viewer to be welcomed", timeout=15)
        shown = await page.evaluate("document.getElementById('server-url').textContent")
        self.assertNotIn(token, shown)
        bare = await self.browser.open(self.page_url(id="bare"), "without-token")
        await _chromium_pause(3)
        self.assertFalse(await bare.evaluate("callPage.registered"))
        self.assertIsNone(await bare.evaluate("streamsPage.clientId"))

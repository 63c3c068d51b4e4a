"""
WHEP and WHIP with real clients no one here wrote: two npm libraries,
unmodified, in headless Chromium (Debian's ``chromium``, driven through the
DevTools protocol, see ``tests/_chromium.py``), against the real server and
GStreamer's webrtcbin (``contrib/gst_peer.py``):

- ``@eyevinn/webrtc-player`` (its WHEP adapter) watches a webrtcbin
  producer of the JSON dialect (as webrtcsink), found by the ``name`` in
  its meta (``POST /whep/<name>``);
- ``@eyevinn/whip-web-client`` publishes Chromium's fake camera
  (``POST /whip/<name>``) to a webrtcbin consumer (as webrtcsrc).

The harness is ``tests/whep-clients/``: ``package.json`` and
``package-lock.json`` pin the libraries, ``clients.js`` uses them as their
READMEs show, and ``index.html`` is the page. esbuild bundles them into
``tests/whep-clients/dist/clients.js``: ``.ci/run`` does, and so do these
tests when the bundle is missing or older than its sources (``npm ci``
first, from the npm registry, when ``node_modules`` is).

The page is served by a static HTTP server of its own
(``http://127.0.0.1:8000``), so the clients reach the signalling server
(``https://127.0.0.1:8443``, or plain ``http://``) from another origin, with
CORS, as players on a web site do. Everything runs in the interop tests'
network namespace that holds loopback addresses only (``tests/_interop.py``).

Assertions are on media: the player's ``<video>`` has the producer's size
and shows more and more frames, decoded frames grow in the browser's
statistics, the GStreamer consumer decodes the page's camera, the candidate
pair in use joins two loopback addresses; and ``DELETE`` (the libraries'
``unload`` and ``destroy``) ends the session on the other side. Both run
over TLS and plaintext; a WHIP client publishes before its consumer is
there (its POST waits past ``--http-timeout``); then with tokens (``--auth-secret``: each library's
key as its ``Authorization`` header, a 401 without one), and with
``--allowed-origin`` (Chromium keeps a page of another origin from
watching).

Without Chromium, GStreamer, node and npm or the rights to make a namespace
the tests skip, naming what is missing; with ``CI=true`` they fail instead.
"""

import json
import os
import shutil
import subprocess
import sys

from twisted.internet import reactor, task
from twisted.trial.unittest import TestCase

from signalling.server.auth import mint
from tests import _chromium, _interop

#: The token secret of the tests with tokens (32 characters or more).
AUTH_SECRET = b"whep-browser-token-secret-0123456789abcdef"
#: An ICE server for the Link headers (nothing listens there, nothing uses it).
STUN = "stun:127.0.0.1:3478"

#: The harness: the pinned npm clients, the page, and the bundle esbuild makes.
CLIENTS = os.path.join(_interop.ROOT, "tests", "whep-clients")
BUNDLE = os.path.join(CLIENTS, "dist", "clients.js")
#: What the bundle is made of: a newer one means the bundle is stale.
BUNDLE_SOURCES = ("clients.js", "package.json", "package-lock.json")
#: Seconds ``npm ci`` and the build may take.
NPM_TIMEOUT = 300

#: Where the page is served in the namespace (another origin than the server's).
PAGE_PORT = 8000
#: Another origin for the same page (the origin tests).
OTHER_PAGE_PORT = 8001


#: What the tests read of the page for failure messages.
PAGE_STATE = (
    "({events: clientsPage.events, failure: clientsPage.failure, "
    "resource: clientsPage.resource, watched: clientsPage.watched()})"
)

#: Seconds a step (a session answered, the first frames) may take.
STEP = 30.0
#: Frames that must follow the first, to show that video flows.
MORE_FRAMES = 10
#: The producer's picture (``gst_peer.py``'s videotestsrc).
PRODUCER_SIZE = (320, 240)

_bundle = []


def page_origin(port=PAGE_PORT):
    """:returns: the origin of the page served on ``port``."""
    return f"http://127.0.0.1:{port}"


def _build_bundle():
    """
    Make ``tests/whep-clients/dist/clients.js`` unless it is newer than its
    sources: ``npm ci`` when ``node_modules`` is missing or older than the
    lock file, then ``npm run build`` (esbuild).

    :returns: None when the bundle is there, else why it is not.
    """
    stamp = os.path.join(CLIENTS, "node_modules", ".package-lock.json")
    newest = max(os.path.getmtime(os.path.join(CLIENTS, name)) for name in BUNDLE_SOURCES)
    if os.path.exists(BUNDLE) and os.path.getmtime(BUNDLE) >= newest and os.path.exists(stamp):
        return None
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        return "node and npm to build tests/whep-clients; install the Debian packages nodejs npm"
    lock = os.path.join(CLIENTS, "package-lock.json")
    steps = [[npm, "run", "build"]]
    if not os.path.exists(stamp) or os.path.getmtime(stamp) < os.path.getmtime(lock):
        steps.insert(0, [npm, "ci", "--no-audit", "--no-fund"])
    for argv in steps:
        try:
            done = subprocess.run(
                argv, cwd=CLIENTS, capture_output=True, text=True, timeout=NPM_TIMEOUT
            )
        except subprocess.TimeoutExpired:
            return f"{' '.join(argv[1:])} in {CLIENTS} did not end within {NPM_TIMEOUT} s"
        if done.returncode != 0:
            output = (done.stdout + done.stderr)[-1500:]
            return f"{' '.join(argv[1:])} in {CLIENTS} failed: {output}"
    if not os.path.exists(BUNDLE):
        return f"npm run build made no {BUNDLE}"
    return None


def bundle_problem():
    """:returns: why the clients' bundle cannot be had (once per run), or None."""
    if not _bundle:
        _bundle.append(_build_bundle())
    return _bundle[0]


def _browser_unavailable():
    """:returns: why the browser cannot run here, or None."""
    if os.geteuid() != 0:
        return "creating a network namespace needs root"
    if shutil.which("ip") is None:
        return "the ip command; install the Debian package iproute2"
    return _chromium.unavailable()


class PageServer(_interop.OutputProcess):
    """Python's static HTTP server, serving ``tests/whep-clients`` in the namespace."""

    def __init__(self, port):
        super().__init__(f"page-server-{port}")


class WhepClientsMixin(_interop.InteropMixin):
    """
    The namespace, the server (TLS when :attr:`tls`), the page's own HTTP
    server and Chromium with the page open, for one test.
    """

    timeout = 120
    #: The signalling server speaks TLS (``ssl:``), else plain ``tcp:``.
    tls = True

    async def start(self):
        """Start everything; skip (fail under ``CI=true``) when something is missing."""
        for reason in (_browser_unavailable(), bundle_problem()):
            if reason is not None:
                _interop.missing_requirement(reason)
        await self.start_namespace()
        await self.start_server(tls=self.tls)
        await self.start_page_server()
        self.browser = await _chromium.Browser.launch(self, wrap=self.namespace.command)
        self.page = await self.open_page("clients")

    async def start_page_server(self, port=PAGE_PORT):
        """Serve the harness at :func:`page_origin` of ``port`` inside the namespace."""
        server = PageServer(port)
        argv = [sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1",
                "--directory", CLIENTS, str(port)]
        self._spawn(server, argv, _interop.child_env())
        await server.until(
            lambda: b"Serving HTTP" in server.stdout,
            f"the page's HTTP server on {port}",
            _interop.START_TIMEOUT,
        )
        return server

    async def open_page(self, label, port=PAGE_PORT):
        """:returns: a :class:`_chromium.Page` showing the harness, served on ``port``."""
        return await self.browser.open(
            f"{page_origin(port)}/index.html", label, ready="!!window.clientsPage",
            state=PAGE_STATE,
        )

    def endpoint(self, path):
        """:returns: the URL of ``path`` on the signalling server (https:// or http://)."""
        base = self.server.url.replace("wss://", "https://").replace("ws://", "http://")
        return base + path

    async def connection(self, page=None, state="connected"):
        """
        Wait until the latest peer connection of ``page`` (by default the
        test's page) is in ``state``.

        :returns: its statistics (see ``clients.js``).
        """
        page = page or self.page
        return await page.wait_for(
            "clientsPage.connections().then((all) => all.length > 0 "
            f"&& all[all.length - 1].connectionState === {json.dumps(state)} "
            "? all[all.length - 1] : null)",
            f"the page's peer connection to be {state}",
            timeout=STEP,
        )

    async def assert_plays(self, page, producer):
        """
        Wait until ``page``'s player shows the producer's picture, frame
        after frame, over a loopback candidate pair.

        :returns: the producer's ``session`` event.
        """
        first = await page.wait_for(
            "(() => { const w = clientsPage.watched(); "
            "return w.videoWidth > 0 && w.frames > 0 ? w : null; })()",
            "the player's video to show frames",
            timeout=STEP,
        )
        self.assertEqual((first["videoWidth"], first["videoHeight"]), PRODUCER_SIZE)
        await page.wait_for(
            f"clientsPage.watched().frames >= {first['frames'] + MORE_FRAMES}",
            f"more frames in the player (had {first['frames']})",
            timeout=STEP,
        )
        info = await self.connection(page)
        self.assertGreater(info["framesDecoded"], MORE_FRAMES, info)
        self.assert_loopback_pair(info)
        [session] = producer.find("session")
        self.assertTrue(producer.find("answer-sent", peer=session["peer"]), producer.output())
        return session

    async def assert_publishes(self, consumer, endpoint):
        """
        Wait until the consumer decodes the page's camera, published to
        ``endpoint``, over a loopback candidate pair.

        :returns: the resource's URL.
        """
        session = await consumer.wait_for("session", STEP)
        await consumer.until(
            lambda: consumer.frames_from(session["peer"]) >= MORE_FRAMES,
            f"{MORE_FRAMES} frames of the page's camera",
            STEP,
        )
        resource = await self.page.wait_for("clientsPage.resource", "the WHIP resource", STEP)
        self.assertTrue(resource.startswith(endpoint + "/"), resource)
        info = await self.connection()
        self.assertGreater(info["framesEncoded"], 0, info)
        self.assert_loopback_pair(info)
        return resource

    def assert_loopback_pair(self, info):
        """Fail unless the candidate pair in use joins two loopback addresses."""
        _chromium.assert_loopback_pair(self, info["pair"], info)

    async def screenshot(self, page, name):
        """Save a PNG of ``page`` in the test's temporary directory (to look at a failure)."""
        await _chromium.save_screenshot(self, page, name)

    def assert_no_failure_logged(self):
        """Fail if the libraries logged an error or the page threw."""
        bad = [
            line for line in self.browser.console
            if "console.error" in line or "uncaught" in line
        ]
        self.assertEqual(bad, [], "\n".join(self.browser.console[-40:]))


class WatchAndPublishMixin(WhepClientsMixin):
    """Each library with a webrtcbin peer, through a server that asks for nothing."""

    async def test_the_whep_player_plays_a_gstreamer_producer_found_by_name(self):
        """
        ``@eyevinn/webrtc-player`` POSTs its offer (video and audio, receive
        only, every candidate in it) to ``/whep/bars``, where a webrtcbin
        producer registered with ``{"name": "bars"}`` in its meta: the
        producer answers through the server, the 201's answer (with the
        producer's candidates) connects, and the ``<video>`` shows the
        320x240 test picture, frame after frame. ``unload()`` DELETEs the
        session: the producer is told it ended, and stays registered.
        """
        await self.start()
        producer = self.start_gst(
            "gst-producer", "--protocol", "json", "--produce", "--name", "bars"
        )
        await producer.wait_for("registered", STEP)
        url = json.dumps(self.endpoint("/whep/bars"))
        await self.page.evaluate(f"void clientsPage.watch({url})")
        await self.assert_plays(self.page, producer)
        await self.screenshot(self.page, "whep-player.png")

        await self.page.evaluate("clientsPage.unwatch()")
        await producer.wait_for("session-ended", STEP)
        self.assertTrue(producer.running, producer.output())
        self.assertEqual(producer.find("error"), [], producer.output())
        self.assert_no_failure_logged()

    async def test_the_whip_client_publishes_the_camera_to_a_gstreamer_consumer(self):
        """
        ``@eyevinn/whip-web-client`` publishes Chromium's fake camera to
        ``/whip/camera``: the server registers it as a producer, a webrtcbin
        consumer waiting for the first producer starts a session with it
        and answers its offer, and the consumer decodes the camera's frames.
        The client learns its resource from ``Location`` (readable across
        origins), and ``destroy()`` DELETEs it: the consumer's session ends.
        """
        await self.start()
        consumer = self.start_gst("gst-consumer", "--protocol", "json", "--consume", "first")
        await consumer.wait_for("registered", STEP)
        endpoint = self.endpoint("/whip/camera")
        await self.page.evaluate(f"void clientsPage.publish({json.dumps(endpoint)})")
        await self.assert_publishes(consumer, endpoint)
        await self.screenshot(self.page, "whip-client.png")

        await self.page.evaluate("clientsPage.unpublish()")
        await consumer.wait_for("session-ended", STEP)
        await consumer.until(lambda: not consumer.running, "the consumer to exit", STEP)
        self.assertEqual(consumer.exit_code, 0, consumer.output())
        self.assertEqual(consumer.find("error"), [], consumer.output())
        self.assert_no_failure_logged()


class WhepClientsOverTlsTests(WatchAndPublishMixin, TestCase):
    """The clients against the server over TLS (``https://``)."""

    tls = True


class WhepClientsOverPlaintextTests(WatchAndPublishMixin, TestCase):
    """The clients against the server over plain HTTP (``http://``)."""

    tls = False


class WhipPublisherFirstTests(WhepClientsMixin, TestCase):
    """A WHIP client that publishes before any consumer is there, as an encoder may."""

    tls = False
    #: Seconds a plain HTTP connection may stay idle: shorter than the wait below.
    HTTP_TIMEOUT = 2
    server_args = ("--http-timeout", str(HTTP_TIMEOUT))

    async def test_a_stream_published_first_waits_for_its_consumer(self):
        """
        The WHIP client's POST waits, past the server's ``--http-timeout``
        (it is no idle connection), until a webrtcbin consumer comes and
        finds the stream in the producers' list; the consumer's answer is
        the 201's body, and the consumer decodes the camera.
        """
        await self.start()
        endpoint = self.endpoint("/whip/camera")
        await self.page.evaluate(f"void clientsPage.publish({json.dumps(endpoint)})")
        await self.server.until(
            lambda: b"WHIP stream 'camera' published" in self.server.stdout,
            "the server to register the stream",
            STEP,
        )
        await task.deferLater(reactor, self.HTTP_TIMEOUT + 1, lambda: None)
        self.assertIsNone(await self.page.evaluate("clientsPage.resource"))
        consumer = self.start_gst("gst-consumer", "--protocol", "json", "--consume", "first")
        await self.assert_publishes(consumer, endpoint)
        self.assertEqual(consumer.find("error"), [], consumer.output())
        self.assert_no_failure_logged()


class WhepClientsWithTokensTests(WhepClientsMixin, TestCase):
    """
    The clients on a server that asks for tokens (``--auth-secret``): each
    library sends its key as the ``Authorization`` header of every request,
    across origins (the preflight allows it).
    """

    def setUp(self):
        secrets = os.path.abspath(self.mktemp())
        with open(secrets, "wb") as f:
            f.write(AUTH_SECRET + b"\n")
        self.server_args = ("--auth-secret", secrets, "--ice-server", STUN)

    def url_with_token(self, **claims):
        """:returns: the WebSocket URL with a token for a GStreamer peer."""
        return f"{self.server.url}/?token={mint(AUTH_SECRET, 300, **claims)}"

    async def test_the_player_is_refused_without_a_token_and_plays_with_one(self):
        """
        Without a key the player's POST is answered 401 (readable across
        origins: the player reports the failed connection) and the
        producer sees no session; with ``Bearer <token>`` for a consumer, a
        second player plays, and its DELETE (with the token too) ends the
        session.
        """
        await self.start()
        producer = self.start_gst(
            "gst-producer", "--server", self.url_with_token(roles=["producer"]),
            "--protocol", "json", "--produce", "--name", "bars",
        )
        await producer.wait_for("registered", STEP)
        url = json.dumps(self.endpoint("/whep/bars"))
        await self.page.evaluate(f"void clientsPage.watch({url})")
        await self.page.wait_for(
            "clientsPage.events.includes('player: initial-connection-failed')",
            "the player to fail without a token",
            timeout=STEP,
        )
        self.assertIn(
            "clients: console.error: WebRTC-player sendAnswer response: 401", self.browser.console
        )
        self.assertEqual(producer.find("session"), [], producer.output())

        token = mint(AUTH_SECRET, 300, roles=["consumer"])
        page = await self.open_page("with-token")
        await page.evaluate(f"void clientsPage.watch({url}, {{authKey: 'Bearer {token}'}})")
        await self.assert_plays(page, producer)
        await page.evaluate("clientsPage.unwatch()")
        await producer.wait_for("session-ended", STEP)
        self.assertEqual(producer.find("error"), [], producer.output())

    async def test_the_whip_client_publishes_with_its_token_and_reads_the_link_headers(self):
        """
        The WHIP client, given a producer's token as its ``authkey``, asks
        the endpoint for ICE servers (``OPTIONS``), publishes with the
        token as a bearer token, and reads the 201's ``Link`` header (the
        server's ``--ice-server``) across origins; its DELETE, with the
        token, ends the consumer's session.
        """
        await self.start()
        consumer = self.start_gst(
            "gst-consumer", "--server", self.url_with_token(),
            "--protocol", "json", "--consume", "first",
        )
        await consumer.wait_for("registered", STEP)
        endpoint = self.endpoint("/whip/camera")
        token = mint(AUTH_SECRET, 300, roles=["producer"])
        await self.page.evaluate(
            f"void clientsPage.publish({json.dumps(endpoint)}, {{authkey: {json.dumps(token)}}})"
        )
        await self.assert_publishes(consumer, endpoint)
        self.assertEqual(
            await self.page.evaluate("clientsPage.extensions"), [f'<{STUN}>; rel="ice-server"']
        )
        await self.page.evaluate("clientsPage.unpublish()")
        await consumer.wait_for("session-ended", STEP)
        self.assertEqual(consumer.find("error"), [], consumer.output())
        self.assert_no_failure_logged()


class WhepClientsOriginTests(WhepClientsMixin, TestCase):
    """
    The clients on a server that names the origins its pages may come from
    (``--allowed-origin``): Chromium itself enforces it, from the server's
    CORS answers.
    """

    server_args = ("--allowed-origin", page_origin(PAGE_PORT))

    async def test_only_a_player_of_an_allowed_origin_may_watch(self):
        """
        The same page served from another origin cannot watch: the
        server's CORS answers do not name that origin, so Chromium fails
        the player's request and the offer never reaches the producer.
        From the allowed origin, the player plays.
        """
        await self.start()
        await self.start_page_server(OTHER_PAGE_PORT)
        producer = self.start_gst(
            "gst-producer", "--protocol", "json", "--produce", "--name", "bars"
        )
        await producer.wait_for("registered", STEP)
        url = json.dumps(self.endpoint("/whep/bars"))
        elsewhere = await self.open_page("elsewhere", port=OTHER_PAGE_PORT)
        await elsewhere.evaluate(f"void clientsPage.watch({url})")
        await elsewhere.wait_for(
            "clientsPage.events.includes('unhandled: TypeError: Failed to fetch')",
            "the player's request to be refused by Chromium",
            timeout=STEP,
        )
        self.assertEqual(producer.find("session"), [], producer.output())

        await self.page.evaluate(f"void clientsPage.watch({url})")
        await self.assert_plays(self.page, producer)

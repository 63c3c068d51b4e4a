"""
Tests for signalling.server.web's call page: the page at ``/`` with its
configuration, the files under ``/static/``, the ICE server settings
(``--ice-server`` and :func:`signalling.server.web.parse_ice_server`), over real
HTTP on a loopback port. What the page does in a browser is tested in
``tests/test_browser.py``.
"""

import json
import os
import re

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial import unittest
from twisted.web.http import HTTPChannel
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from signalling.server import websocket as web_protocol
from signalling.server import tap, web
from signalling.core.registry import Registry
from tests.helpers import http_get, signalling_factory

_CONFIG = re.compile(r'<script id="config" type="application/json">(.*?)</script>', re.S)


def page_config(page):
    """:returns: the configuration the page carries, decoded."""
    match = _CONFIG.search(page)
    if match is None:
        raise AssertionError(f"no configuration in the page: {page[:2000]}")
    return json.loads(match.group(1))


class WebTestsMixin:
    """
    Serve a port's pages on a loopback port for one test, the way a port
    serves them: through the WebSocket factory, which hands plain requests
    on to its :class:`web.SignallingRoot` site.
    """

    def serve_root(self, **kwargs):
        """Listen on ``127.0.0.1``; stop listening at cleanup."""
        factory = web.with_pages(
            signalling_factory(Registry(), reactor), b"/health", **kwargs
        )
        self.assertIsInstance(factory.web.resource, web.SignallingRoot)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"

    async def request(self, path, method=b"GET"):
        """:returns: ``(status, headers, body)`` of one request."""
        agent = Agent(reactor)
        response = await agent.request(
            method, (self.base + path).encode("ascii"), Headers({b"host": [b"localhost"]})
        )
        body = await readBody(response)
        return response.code, response.headers, body

    @staticmethod
    def header(headers, name):
        values = headers.getRawHeaders(name.encode("ascii"))
        return values[0].decode("latin-1") if values else None


class PageTests(WebTestsMixin, unittest.TestCase):
    """The call page and its files."""

    def setUp(self):
        self.serve_root()

    async def test_root_is_the_call_page_with_its_script_and_style(self):
        """``GET /`` is the HTML call page, loading its script and style from ``/static/``."""
        status, headers, body = await self.request("/")
        self.assertEqual(status, 200)
        self.assertEqual(self.header(headers, "content-type"), "text/html; charset=utf-8")
        page = body.decode("utf-8")
        self.assertIn('<script src="/static/call.js"></script>', page)
        self.assertIn('<link rel="stylesheet" href="/static/style.css">', page)
        self.assertIn('<form id="call-form"', page)
        self.assertIn('<form id="room-form"', page)
        self.assertIn('id="hangup-button"', page)

    async def test_page_names_the_websocket_url_of_the_request(self):
        """The page shows the WebSocket URL the browser will use: same host, ``ws://`` here."""
        _, _, body = await self.request("/")
        self.assertIn("<code id=\"server-url\">ws://localhost/</code>", body.decode("utf-8"))

    async def test_page_has_no_ice_servers_by_default(self):
        """Without ``--ice-server`` the page's configuration lists no ICE server."""
        _, _, body = await self.request("/")
        self.assertEqual(page_config(body.decode("utf-8")), {"iceServers": []})

    async def test_page_loads_nothing_from_another_origin(self):
        """
        Every ``src`` and ``href`` of the page is a path on this server, and
        a Content-Security-Policy keeps scripts, styles and connections to it.
        """
        status, headers, body = await self.request("/")
        page = body.decode("utf-8")
        links = re.findall(r'(?:src|href)="([^"]*)"', page)
        self.assertTrue(links)
        for link in links:
            self.assertTrue(link.startswith("/") or link.startswith("#"), link)
        policy = self.header(headers, "content-security-policy")
        for directive in (
            "default-src 'none'",
            "script-src 'self'",
            "connect-src 'self' ws://localhost;",
        ):
            self.assertIn(directive, policy)
        for name in os.listdir(web.STATIC_DIR):
            with open(os.path.join(web.STATIC_DIR, name), encoding="utf-8") as f:
                text = f.read()
            self.assertNotRegex(text, r"(?:src|href|url)\s*[=(]\s*[\"']?(?:https?:)?//", name)
            self.assertNotIn("import(", text, name)

    async def test_an_odd_host_header_stays_out_of_the_policy(self):
        """A Host header with anything but a host name and port is not copied into the policy."""
        agent = Agent(reactor)
        response = await agent.request(
            b"GET", (self.base + "/").encode("ascii"),
            Headers({b"host": [b"evil.example;script-src *"]}),
        )
        await readBody(response)
        policy = self.header(response.headers, "content-security-policy")
        self.assertIn("connect-src 'self'; ", policy)
        self.assertNotIn("evil", policy)

    async def test_static_files_are_served_with_their_types(self):
        """The page's script and style sheet are served with JavaScript and CSS types."""
        for path, kind in (("/static/call.js", "javascript"), ("/static/style.css", "text/css")):
            status, headers, body = await self.request(path)
            self.assertEqual(status, 200, path)
            self.assertIn(kind, self.header(headers, "content-type"))
            with open(os.path.join(web.STATIC_DIR, path.rsplit("/", 1)[1]), "rb") as f:
                self.assertEqual(body, f.read())

    async def test_other_static_paths_are_404(self):
        """
        The page template, the directory itself, unknown files and paths
        below a file are not served.
        """
        for path in (
            "/static/index.html",
            "/static/",
            "/static",
            "/static/nope.js",
            "/static/call.js/more",
            "/call.js",
            "/static/../web.py",
        ):
            status, _, _ = await self.request(path)
            self.assertEqual(status, 404, path)

    async def test_other_methods_on_the_page_are_405(self):
        """``POST`` to the page or to one of its files is ``405``."""
        for path in ("/", "/static/call.js"):
            status, _, _ = await self.request(path, method=b"POST")
            self.assertEqual(status, 405, path)

    async def test_the_page_runs_no_inline_script(self):
        """
        The policy runs only the server's own script files, so the page
        holds none of its own: every ``<script>`` loads a file or is the
        JSON configuration, and no element carries an event handler
        attribute (the stream viewer's copy buttons get theirs from
        ``streams.js``).
        """
        _, _, body = await self.request("/")
        page = body.decode("utf-8")
        scripts = re.findall(r"<script([^>]*)>", page)
        self.assertEqual(len(scripts), 4)
        for attributes in scripts:
            self.assertRegex(
                attributes, r'^ (src="/static/[^"]+\.js"|id="config" type="application/json")$'
            )
        self.assertNotRegex(page, r"<[^>]*\son[a-z]+\s*=")
        self.assertNotIn("javascript:", page)

    async def test_the_viewers_whep_and_whip_urls_reach_their_resources(self):
        """
        The stream viewer shows ``<origin>/whep/<name>``, the name encoded as
        ``encodeURIComponent`` does (a space as %20, a slash as %2F), and
        ``<origin>/whip/NAME``: those paths are the WHEP and WHIP resources'
        (a ``GET`` is 405 naming ``POST``, an ``OPTIONS`` names the SDP they
        take), not the 404 of an unknown path; the page's placeholder for the
        WHIP URL is there for the script to fill.
        """
        _, _, body = await self.request("/")
        self.assertIn('<code id="whip-url">/whip/NAME</code>', body.decode("utf-8"))
        for path in ("/whep/cam%201%2F%C3%A9", "/whep/1b4e28ba-2fa1-11d2-883f-0016d3cca427",
                     "/whip/NAME"):
            status, headers, _ = await self.request(path)
            self.assertEqual((status, self.header(headers, "allow")), (405, "POST, OPTIONS"), path)
            status, headers, _ = await self.request(path, method=b"OPTIONS")
            self.assertEqual(
                (status, self.header(headers, "accept-post")), (204, "application/sdp"), path
            )

    async def test_head_of_the_page_has_no_body(self):
        """``HEAD /`` answers ``200`` without a body."""
        status, _, body = await self.request("/", method=b"HEAD")
        self.assertEqual((status, body), (200, b""))


class IceServerPageTests(WebTestsMixin, unittest.TestCase):
    """ICE servers handed to the page."""

    async def test_page_carries_the_configured_ice_servers(self):
        """The ICE servers given to the root are in the page's configuration, in order."""
        servers = [
            {"urls": "stun:stun.example.org:3478"},
            {"urls": "turn:turn.example.org:3478", "username": "u", "credential": "p"},
        ]
        self.serve_root(ice_servers=servers)
        _, _, body = await self.request("/")
        self.assertEqual(page_config(body.decode("utf-8")), {"iceServers": servers})

    async def test_configuration_cannot_end_the_script_element(self):
        """
        A credential holding ``</script>`` or ``<!--`` cannot break out of
        the configuration's ``<script>`` element, and still reads back intact.
        """
        server = {"urls": "turn:t.example.org", "username": "</script><b>", "credential": "<!--&"}
        self.serve_root(ice_servers=[server])
        _, _, body = await self.request("/")
        page = body.decode("utf-8")
        # The configuration and the three scripts: no element ended early.
        self.assertEqual(page.count("<script"), 4)
        self.assertEqual(page.count("</script>"), 4)
        self.assertNotIn("<!--", page)
        self.assertEqual(page_config(page), {"iceServers": [server]})


class ParseIceServerTests(unittest.SynchronousTestCase):
    """:func:`signalling.server.web.parse_ice_server`."""

    def test_plain_urls_are_kept(self):
        """``stun:``, ``stuns:``, ``turn:`` and ``turns:`` URLs are kept as they are."""
        for url in (
            "stun:stun.example.org:3478",
            "stuns:stun.example.org",
            "turn:turn.example.org:3478?transport=tcp",
            "turns:turn.example.org:5349",
        ):
            self.assertEqual(web.parse_ice_server(url), {"urls": url})

    def test_gstreamer_style_credentials_are_split_out(self):
        """
        ``turn://user:password@host:port`` (webrtcbin's form) becomes a URL
        with ``username`` and ``credential``, percent-escapes decoded.
        """
        self.assertEqual(
            web.parse_ice_server("turn://alice:s%40cret@turn.example.org:3478"),
            {"urls": "turn:turn.example.org:3478", "username": "alice", "credential": "s@cret"},
        )
        self.assertEqual(
            web.parse_ice_server("stun://stun.example.org:3478"),
            {"urls": "stun:stun.example.org:3478"},
        )

    def test_json_objects_are_taken_as_they_are(self):
        """A JSON ``RTCIceServer`` object is taken whole."""
        server = {"urls": ["turn:a:3478", "turns:a:5349"], "username": "u", "credential": "c"}
        self.assertEqual(web.parse_ice_server(json.dumps(server)), server)

    def test_anything_else_is_refused(self):
        """Other schemes, missing hosts, whitespace and bad JSON raise ``ValueError``."""
        for text in (
            "",
            "stun",
            "stun:",
            "http://stun.example.org",
            "turn://user:pass@",
            "stun:a b",
            "{",
            "{}",
            '{"username": "u"}',
            "[]",
        ):
            with self.assertRaises(ValueError, msg=text):
                web.parse_ice_server(text)


class IceServerOptionTests(unittest.TestCase):
    """``twistd signalling --ice-server``."""

    def parse(self, *argv):
        config = tap.Options()
        config.parseOptions(list(argv))
        return config

    def test_no_ice_server_by_default(self):
        """Without the option the list is empty."""
        self.assertEqual(self.parse()["ice-server"], [])

    def test_ice_server_is_repeatable_and_parsed(self):
        """Each ``--ice-server`` adds one parsed server, in order."""
        config = self.parse(
            "--ice-server", "stun:stun.example.org:3478",
            "--ice-server", "turn://u:p@turn.example.org:3478",
        )
        self.assertEqual(
            config["ice-server"],
            [
                {"urls": "stun:stun.example.org:3478"},
                {"urls": "turn:turn.example.org:3478", "username": "u", "credential": "p"},
            ],
        )

    def test_a_bad_ice_server_is_a_usage_error(self):
        """An ICE server that cannot be read is a usage error naming the option."""
        with self.assertRaises(UsageError) as caught:
            self.parse("--ice-server", "http://example.org")
        self.assertIn("--ice-server", str(caught.exception))

    def test_help_describes_the_option(self):
        """The usage text names ``--ice-server``."""
        self.assertIn("--ice-server", str(tap.Options()))

    def test_make_service_hands_the_servers_to_the_page(self):
        """The page served by ``makeService``'s site carries the ``--ice-server`` list."""
        memory = MemoryReactorClock()
        config = self.parse(
            "--port", "tcp:8080", "--ice-server", "stun:stun.example.org:3478"
        )
        service = tap.makeService(config, reactor=memory)
        service.startService()
        self.addCleanup(service.stopService)
        [(_, site, _, _)] = memory.tcpServers
        head, _, page = http_get(site, b"/").partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertEqual(
            page_config(page.decode("utf-8")),
            {"iceServers": [{"urls": "stun:stun.example.org:3478"}]},
        )


_UPGRADE = (
    b"GET /any/path HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


class _TCPLikeTransport(StringTransport):
    """A StringTransport that, like TCP and TLS transports, lets a protocol
    unregister a producer it never registered (Autobahn does, on a drop)."""

    def unregisterProducer(self):
        self.producer = None
        self.streaming = None


class PortRoutingTests(unittest.SynchronousTestCase):
    """
    A port listens with the WebSocket factory: an upgrade request is parsed
    once, by Autobahn, and anything else goes on to the pages' site.
    """

    def setUp(self):
        self.clock = Clock()
        self.factory = web.with_pages(signalling_factory(Registry(), self.clock))

    def connect(self):
        """:returns: ``(protocol, transport)`` of a new connection."""
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = _TCPLikeTransport()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.addCleanup(lambda: transport.protocol.connectionLost(Failure(ConnectionDone())))
        return protocol, transport

    def test_asks_for_websocket(self):
        """Only an Upgrade header naming websocket (any case, in a list) counts."""
        ask = web_protocol.asks_for_websocket
        self.assertTrue(ask(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket"))
        self.assertTrue(ask(b"GET / HTTP/1.1\r\nupgrade :  h2c, WebSocket"))
        self.assertFalse(ask(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c"))
        self.assertFalse(ask(b"GET / HTTP/1.1\r\nHost: x\r\nX-Upgrade: websocket"))
        self.assertFalse(ask(b"GET /?Upgrade:websocket HTTP/1.1\r\nHost: x"))
        self.assertFalse(ask(b"GET / HTTP/1.1\r\nHost: websocket"))

    def test_upgrade_stays_with_the_websocket_protocol(self):
        """
        An upgrade is answered by the protocol the port built, and no
        twisted.web channel is left on the transport (as its producer).
        """
        protocol, transport = self.connect()
        protocol.dataReceived(_UPGRADE)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 "), transport.value())
        self.assertIs(transport.protocol, protocol)
        self.assertNotIsInstance(transport.producer, HTTPChannel)
        self.assertEqual(self.factory.connections, {protocol})
        self.assertEqual(self.factory.countConnections, 1)

    def test_upgrade_split_over_many_reads(self):
        """The request head may arrive a byte at a time."""
        protocol, transport = self.connect()
        for i in range(len(_UPGRADE)):
            protocol.dataReceived(_UPGRADE[i : i + 1])
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 "), transport.value())

    def test_plain_request_goes_to_the_site(self):
        """
        A GET without an upgrade is answered by the site: the connection
        now belongs to its channel, the WebSocket protocol is done (no
        handshake timer left), and the health check answers.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertIsInstance(transport.protocol, type(self.factory.web.buildProtocol(None)))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value())
        self.assertTrue(transport.value().endswith(b"\r\n\r\nOK\n"), transport.value())
        self.assertIsNone(protocol.transport)
        self.assertIsNone(protocol.openHandshakeTimeoutCall)
        self.assertEqual(self.factory.countConnections, 0)
        self.assertEqual(self.factory.connections, set())
        self.assertEqual(
            [c for c in self.clock.getDelayedCalls() if "Handshake" in repr(c)], []
        )

    def test_upgrade_after_a_plain_request_on_the_same_connection(self):
        """
        An upgrade that follows a plain request on a kept-alive connection
        is handed back from the site to a WebSocket protocol.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        transport.clear()
        transport.protocol.dataReceived(_UPGRADE)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 "), transport.value())
        [opened] = self.factory.connections
        self.assertIsNot(opened, protocol)
        self.assertIs(transport.protocol, opened)

    def test_request_and_more_in_one_read(self):
        """Bytes after the head in the same read reach the site too (a body)."""
        protocol, transport = self.connect()
        protocol.dataReceived(
            b"POST /health HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n\r\nabcd"
            b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
        )
        responses = transport.value().count(b"HTTP/1.1 ")
        self.assertEqual(responses, 2, transport.value())

    def test_endless_request_head_is_refused_with_431(self):
        """A head that never ends is not buffered beyond the limit."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
        while not transport.disconnecting:
            protocol.dataReceived(filler)
            self.assertLess(len(protocol.data), 2 * web_protocol.MAX_REQUEST_HEAD)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "), transport.value())

    def test_oversized_upgrade_head_is_refused_with_431(self):
        """An upgrade whose complete head is over the limit is refused."""
        protocol, transport = self.connect()
        big = _UPGRADE[:-2] + b"X-Filler: " + b"a" * web_protocol.MAX_REQUEST_HEAD + b"\r\n\r\n"
        protocol.dataReceived(big)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "), transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.factory.connections, set())

    def test_oversized_plain_request_head_is_refused_with_431(self):
        """The limit holds for requests meant for the pages too."""
        protocol, transport = self.connect()
        big = b"GET /health HTTP/1.1\r\nX-Filler: " + b"a" * web_protocol.MAX_REQUEST_HEAD
        protocol.dataReceived(big + b"\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "), transport.value())
        self.assertIs(transport.protocol, protocol)
        self.assertTrue(transport.disconnecting)

    def test_without_pages_a_plain_request_gets_426(self):
        """A factory with no site refuses plain requests: Upgrade Required."""
        self.factory = signalling_factory(Registry(), self.clock)
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 426 "), transport.value())

    def test_a_site_that_refuses_the_connection_gets_it_dropped(self):
        """A web factory that builds no protocol: the connection is dropped."""
        self.patch(self.factory.web, "buildProtocol", lambda addr: None)
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertIs(transport.protocol, protocol)
        self.assertEqual(transport.value(), b"")

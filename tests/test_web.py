"""
Tests for signalling.web's call page: the page at ``/`` with its
configuration, the files under ``/static/``, the ICE server settings
(``--ice-server`` and :func:`signalling.web.parse_ice_server`), over real
HTTP on a loopback port. What the page does in a browser is tested in
``tests/test_browser.py``.
"""

import json
import os
import re

from twisted.internet import reactor
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.usage import UsageError
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from signalling import tap, web
from signalling.factory import SignallingServerFactory
from signalling.registry import Registry

_CONFIG = re.compile(r'<script id="config" type="application/json">(.*?)</script>', re.S)


def page_config(page):
    """:returns: the configuration the page carries, decoded."""
    match = _CONFIG.search(page)
    if match is None:
        raise AssertionError(f"no configuration in the page: {page[:2000]}")
    return json.loads(match.group(1))


class WebTestsMixin:
    """Serve a :class:`web.SignallingRoot` on a loopback port for one test."""

    def serve(self, root):
        """Listen with ``root`` on ``127.0.0.1``; stop listening at cleanup."""
        site = Site(root)
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"

    def serve_root(self, **kwargs):
        factory = SignallingServerFactory(None, Registry(), reactor)
        self.serve(web.SignallingRoot(factory, b"/health", **kwargs))

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
        self.assertEqual(page.count("</script>"), 2)
        self.assertNotIn("<!--", page)
        self.assertEqual(page_config(page), {"iceServers": [server]})


class ParseIceServerTests(unittest.SynchronousTestCase):
    """:func:`signalling.web.parse_ice_server`."""

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
        memory = MemoryReactor()
        config = self.parse(
            "--port", "tcp:8080", "--ice-server", "stun:stun.example.org:3478"
        )
        service = tap.makeService(config, reactor=memory)
        service.startService()
        self.addCleanup(service.stopService)
        [(_, site, _, _)] = memory.tcpServers
        protocol = site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        protocol.connectionLost(None)
        head, _, page = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertEqual(
            page_config(page.decode("utf-8")),
            {"iceServers": [{"urls": "stun:stun.example.org:3478"}]},
        )

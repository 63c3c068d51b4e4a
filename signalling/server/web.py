"""
The HTTP side of the port: WebSocket upgrades on any path, a health check,
and the call page: ``/`` with its files under ``/static/``.
"""

import html
import json
import os
import re
import string
from urllib.parse import unquote

from twisted.web import static
from twisted.web.http import HTTPChannel
from twisted.web.resource import NoResource, Resource
from twisted.web.server import Request, Site

from signalling.server.auth import TokenRefused, bearer_token
from signalling.server.http_dialects import HttpDialectResource
from signalling.server.policy import RequestRates
from signalling.server.websocket import UpgradeResource

#: The directory of the page's files, shipped in the package.
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")

#: The page template; its files are everything else in STATIC_DIR.
_PAGE_FILE = "index.html"

_ICE_SCHEMES = ("stun", "stuns", "turn", "turns")

#: The page runs only our own script and style, and talks only to this server
#: (``{websocket}``: its WebSocket URL, for browsers whose ``'self'`` does not
#: cover ``wss:``).
_CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src 'self' blob: mediastream:; connect-src 'self'{websocket}; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)

#: A Host header that may be repeated in the policy as it is.
_PLAIN_HOST = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]+)?|\[[0-9A-Fa-f:.]+\](:[0-9]+)?")


def parse_ice_server(text):
    """
    Read one ICE server setting (``--ice-server``) into an ``RTCIceServer``
    dictionary for the page.

    Accepted: a URL such as ``stun:stun.example.org:3478`` or
    ``turn:turn.example.org:3478?transport=udp``; GStreamer's form with
    credentials, ``turn://user:password@turn.example.org:3478`` (``stun://``
    too); or a JSON object with ``urls`` (and ``username``, ``credential``).

    :raises ValueError: with a reason, when it is none of these.
    """
    text = text.strip()
    if text.startswith("{"):
        try:
            server = json.loads(text)
        except ValueError as e:
            raise ValueError(f"invalid JSON: {e}") from None
        if not isinstance(server, dict) or not server.get("urls"):
            raise ValueError('a JSON ICE server must be an object with "urls"')
        return server
    scheme, colon, rest = text.partition(":")
    if not colon or scheme not in _ICE_SCHEMES or not rest or any(c.isspace() for c in rest):
        raise ValueError(
            f"{text!r} is not an ICE server URL (stun:HOST:PORT, turn:HOST:PORT, "
            "turn://USER:PASSWORD@HOST:PORT or a JSON object)"
        )
    if not rest.startswith("//"):
        return {"urls": text}
    credentials, at, where = rest[2:].rpartition("@")
    if not where:
        raise ValueError(f"{text!r} names no host")
    server = {"urls": f"{scheme}:{where}"}
    if at:
        user, _, password = credentials.partition(":")
        server["username"] = unquote(user)
        server["credential"] = unquote(password)
    return server


def has_credentials(server):
    """:returns: whether an ``RTCIceServer`` dictionary carries credentials (a TURN password)."""
    return "username" in server or "credential" in server


def _script_json(value):
    """:returns: ``value`` as JSON that is safe inside a ``<script>`` element."""
    text = json.dumps(value, sort_keys=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class HealthResource(Resource):
    """
    Answers ``200 OK`` with the body ``OK\\n`` while the server runs; ``503``
    while its registry cannot serve (a cluster node that has not reached
    Redis, or lost it), so that a load balancer sends new clients elsewhere.
    """

    isLeaf = True

    def __init__(self, registry):
        super().__init__()
        self._registry = registry

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if not self._registry.up:
            request.setResponseCode(503)
            return b"UNAVAILABLE: the cluster cannot reach Redis\n"
        return b"OK\n"

    render_HEAD = render_GET


def _request_token(request):
    """
    :returns: a plain HTTP request's token: ``?token=`` or ``Authorization:
        Bearer``; None for none, and for an ``Authorization`` header of
        another scheme (``Basic``) or one that is not ASCII.
    """
    values = request.args.get(b"token")
    if values:
        return values[0].decode("utf-8", "replace")
    return bearer_token(request)


class IceServersResource(Resource):
    """
    ``GET /ice-servers``: the ICE servers for clients other than the page,
    ``{"iceServers": [...]}``, with fresh TURN credentials (for ``?uid=``,
    if given).

    :param ice_servers: the ``--ice-server`` entries.
    :param turn: a :class:`signalling.server.turn.TurnCredentials`, or None.
    :param policy: the :class:`signalling.server.policy.HandshakePolicy`
        that says what a request's token allows.
    """

    isLeaf = True

    def __init__(self, ice_servers, turn, policy):
        super().__init__()
        self._ice_servers = list(ice_servers)
        self._turn = turn
        self._policy = policy

    def render_GET(self, request):
        try:
            grant = self._policy.grant_for(_request_token(request))
        except TokenRefused:
            request.setResponseCode(401)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"A valid token is needed\n"
        servers = list(self._ice_servers)
        if self._turn is not None:
            uid = (request.args.get(b"uid") or [b""])[0].decode("utf-8", "replace").strip()
            if grant is not None and grant.uid is not None:
                uid = grant.uid
            servers += self._turn.ice_servers(uid[:256] or None)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps({"iceServers": servers}).encode("utf-8")


class PageResource(Resource):
    """
    The call page at ``/``: it names the service and its WebSocket URL, and
    carries the page's configuration (the ICE servers).

    :param ice_servers: ``RTCIceServer`` dictionaries for the page (see
        :func:`parse_ice_server`).
    :param turn: a :class:`signalling.server.turn.TurnCredentials`, or None.
    :param policy: the :class:`signalling.server.policy.HandshakePolicy`
        that says what a request's token allows.
    """

    isLeaf = True

    def __init__(self, ice_servers, turn, policy):
        super().__init__()
        self._policy = policy
        with open(os.path.join(STATIC_DIR, _PAGE_FILE), encoding="utf-8") as f:
            self._template = string.Template(f.read())
        self._ice_servers = list(ice_servers)
        self._turn = turn
        self._config = _script_json({"iceServers": self._ice_servers})
        #: What a page asked for without a valid token gets when tokens are
        #: on: the ICE servers that carry no credentials (STUN).
        self._public_config = _script_json(
            {"iceServers": [s for s in self._ice_servers if not has_credentials(s)]}
        )

    def render_GET(self, request):
        scheme = "wss" if request.isSecure() else "ws"
        host = (request.getHeader(b"host") or b"localhost").decode("latin-1")
        if not self._may_relay(request):
            config = self._public_config
        elif self._turn is not None:
            # Fresh TURN credentials with every page.
            config = _script_json({"iceServers": self._ice_servers + self._turn.ice_servers()})
        else:
            config = self._config
        body = self._template.safe_substitute(
            ws_url=html.escape(f"{scheme}://{host}/"), config=config
        )
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        websocket = f" {scheme}://{host}" if _PLAIN_HOST.fullmatch(host) else ""
        policy = _CONTENT_SECURITY_POLICY.format(websocket=websocket)
        request.setHeader(b"content-security-policy", policy.encode("ascii"))
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        return body.encode("utf-8")

    render_HEAD = render_GET

    def _may_relay(self, request):
        """
        With tokens on, only a page asked for with a valid token gets TURN
        credentials: the ``--ice-server`` ones and ``--turn-secret``'s.
        """
        try:
            self._policy.grant_for(_request_token(request))
        except TokenRefused:
            return False
        return True


def _static_files():
    """:returns: ``{path: resource}`` for the page's files under ``/static/``."""
    files = {}
    for name in sorted(os.listdir(STATIC_DIR)):
        path = os.path.join(STATIC_DIR, name)
        if name == _PAGE_FILE or name.startswith(".") or not os.path.isfile(path):
            continue
        resource = static.File(path, defaultType="application/octet-stream")
        # A file, not a directory: nothing below it.
        resource.isLeaf = True
        files[b"/static/" + name.encode("utf-8")] = resource
    return files


class SignallingRoot(Resource):
    """
    The root of the site: routes WebSocket upgrades (any path) to the
    signalling factory, and plain requests to the health check, the call
    page and its files, or a 404.

    :param ws_factory: the :class:`signalling.server.factory.SignallingServerFactory`.
    :param health_path: the path of the health check, as bytes (``b"/health"``).
    :param ice_servers: ``RTCIceServer`` dictionaries for the call page.
    """

    def __init__(self, ws_factory, health_path=b"/health", ice_servers=(), turn=None):
        super().__init__()
        self._websocket = UpgradeResource(ws_factory)
        self._health_path = health_path
        self._health = HealthResource(ws_factory.registry)
        policy = ws_factory.policy
        self._page = PageResource(ice_servers, turn, policy)
        self._ice_servers = IceServersResource(ice_servers, turn, policy)
        self._files = _static_files()
        rates = RequestRates(ws_factory.clock, ws_factory.settings)
        #: ``(prefix, resource)`` of each HTTP dialect of the table (WHEP, WHIP).
        self.http_dialects = [
            (
                dialect.http_prefix.encode("ascii"),
                HttpDialectResource(dialect, ws_factory, ice_servers, turn, rates),
            )
            for dialect in ws_factory.settings.dialects.http
        ]

    def getChildWithDefault(self, path, request):
        upgrade = request.getHeader(b"upgrade")
        if upgrade is not None and b"websocket" in upgrade.lower():
            return self._websocket
        if request.path == self._health_path:
            return self._health
        if request.path == b"/":
            return self._page
        if request.path == ICE_SERVERS_PATH:
            return self._ice_servers
        if request.path in self._files:
            return self._files[request.path]
        for prefix, resource in self.http_dialects:
            if request.path.startswith(prefix):
                return resource
        return NoResource()


#: Where clients other than the page get the ICE servers (and TURN credentials).
ICE_SERVERS_PATH = b"/ice-servers"


#: Seconds a plain HTTP connection may stay idle between requests, and may
#: take to send one request whole, by default.
DEFAULT_HTTP_TIMEOUT = 10.0


class PageChannel(HTTPChannel):
    """
    twisted.web's HTTP/1.1 channel for the pages, bounded: it holds its
    client address's count (taken over from the WebSocket protocol that
    handed the connection on) until the connection ends, and a request
    must arrive whole, head and body, within the site's
    ``request_timeout`` of its first byte, however slowly it trickles in
    (the idle timeout alone starts again with every byte).
    """

    _policy = None
    #: The key the policy counts this connection under, if any.
    _counted = None
    #: Ends the connection when the request being received is late.
    _request_call = None

    def hold_count(self, policy, key):
        """Hold the count ``policy`` keeps under ``key`` until the connection ends."""
        self._policy, self._counted = policy, key

    def release_count(self):
        """Give the count back (the connection ends, or becomes a WebSocket)."""
        key, self._counted = self._counted, None
        if key is not None:
            self._policy.release(key)

    def dataReceived(self, data):
        if self._request_call is None:
            self._request_call = self.callLater(self.site.request_timeout, self._too_slow)
        HTTPChannel.dataReceived(self, data)

    def allContentReceived(self):
        self._cancel_request_call()
        HTTPChannel.allContentReceived(self)

    def _too_slow(self):
        self._request_call = None
        # Closes gracefully, and aborts after abortTimeout.
        self.timeoutConnection()

    def _cancel_request_call(self):
        call, self._request_call = self._request_call, None
        if call is not None and call.active():
            call.cancel()

    def connectionLost(self, reason):
        self._cancel_request_call()
        self.release_count()
        HTTPChannel.connectionLost(self, reason)


class PageRequest(Request):
    """
    A request with a bounded body: one that says (``Content-Length``) or
    turns out (chunked) to be larger than the site's ``max_body`` is
    answered ``413`` and its connection closed, before more of it is kept.
    """

    _body_bytes = 0
    _too_large = False

    def gotLength(self, length):
        if length is not None and length > self.channel.site.max_body:
            self._refuse_body()
            length = 0
        Request.gotLength(self, length)

    def handleContentChunk(self, data):
        if self._too_large:
            return
        self._body_bytes += len(data)
        if self._body_bytes > self.channel.site.max_body:
            self._refuse_body()
            return
        Request.handleContentChunk(self, data)

    def _refuse_body(self):
        if self._too_large:
            return
        self._too_large = True
        channel = self.channel
        channel.transport.write(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: 24\r\nConnection: close\r\n\r\nThe body is too large.\r\n"
        )
        channel.loseConnection()

    def process(self):
        if not self._too_large:
            Request.process(self)


class PagesSite(Site):
    """
    The site of a port's pages, on the WebSocket factory's clock.

    :param root: the :class:`SignallingRoot`.
    :param clock: the ``IReactorTime`` of the timeouts.
    :param timeout: seconds a connection may stay idle between requests,
        and may take to send one request whole.
    :param close_timeout: seconds a connection closed for its timeout may
        take to go before it is aborted.
    :param max_body: the largest request body taken, in bytes (413 past it).
    """

    protocol = PageChannel

    def __init__(
        self, root, clock, timeout=DEFAULT_HTTP_TIMEOUT, close_timeout=5.0, max_body=1024 * 1024
    ):
        super().__init__(root, timeout=timeout, reactor=clock, requestFactory=PageRequest)
        self.request_timeout = timeout
        self.close_timeout = close_timeout
        #: The largest request body taken (``--max-message-size``: an SDP
        #: offer is no larger than a message that could carry it).
        self.max_body = max_body
        self.noisy = False

    def buildProtocol(self, addr):
        channel = Site.buildProtocol(self, addr)
        channel.abortTimeout = self.close_timeout
        return channel


def with_pages(
    ws_factory, health_path=b"/health", ice_servers=(), turn=None, timeout=DEFAULT_HTTP_TIMEOUT
):
    """
    Give a signalling factory the pages of a port: requests that ask for no
    WebSocket upgrade go on to a :class:`SignallingRoot` site.

    :param timeout: seconds a plain HTTP connection may stay idle between
        requests, and may take to send one request whole.
    :returns: ``ws_factory``, the factory to listen with.
    """
    ws_factory.web = PagesSite(
        SignallingRoot(ws_factory, health_path, ice_servers, turn),
        ws_factory.clock,
        timeout,
        ws_factory.settings.close_timeout,
        ws_factory.settings.max_message,
    )
    return ws_factory

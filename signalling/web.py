"""
The HTTP side of the port: WebSocket upgrades on any path, a health check,
and a short page at ``/`` naming the service and its WebSocket URL.
"""

import html

from autobahn.twisted.resource import WebSocketResource
from twisted.web.resource import NoResource, Resource

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>WebRTC signalling server</title>
</head>
<body>
<h1>WebRTC signalling server</h1>
<p>This is a WebRTC signalling server for GStreamer <code>webrtcbin</code>
applications and browsers.</p>
<p>Its WebSocket URL is <code>{url}</code>.</p>
</body>
</html>
"""


class HealthResource(Resource):
    """Answers ``200 OK`` with the body ``OK\\n`` while the server runs."""

    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return b"OK\n"

    render_HEAD = render_GET


class PageResource(Resource):
    """The page at ``/``: what this service is and where to connect."""

    isLeaf = True

    def render_GET(self, request):
        scheme = "wss" if request.isSecure() else "ws"
        host = (request.getHeader(b"host") or b"localhost").decode("latin-1")
        body = _PAGE.format(url=html.escape(f"{scheme}://{host}/"))
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return body.encode("utf-8")

    render_HEAD = render_GET


class SignallingRoot(Resource):
    """
    The root of the site: routes WebSocket upgrades (any path) to the
    signalling factory, and plain requests to the health check, the page, or
    a 404.

    :param ws_factory: the :class:`signalling.factory.SignallingServerFactory`.
    :param health_path: the path of the health check, as bytes (``b"/health"``).
    """

    def __init__(self, ws_factory, health_path=b"/health"):
        super().__init__()
        self._websocket = WebSocketResource(ws_factory)
        self._health_path = health_path
        self._health = HealthResource()
        self._page = PageResource()

    def getChildWithDefault(self, path, request):
        upgrade = request.getHeader(b"upgrade")
        if upgrade is not None and b"websocket" in upgrade.lower():
            return self._websocket
        if request.path == self._health_path:
            return self._health
        if request.path == b"/":
            return self._page
        return NoResource()

"""
The twistd plugin's options and service: ``twistd -n signalling``.
"""

import math

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.web.server import Site

from signalling import factory as _factory
from signalling import tls
from signalling.registry import Registry
from signalling.web import SignallingRoot, parse_ice_server

DEFAULT_PORT = "ssl:8443"
DEFAULT_PLAIN_PORT = "tcp:8443"


def _positive(kind, minimum=None):
    def coerce(value):
        number = kind(value)
        if not math.isfinite(number):
            raise ValueError(f"must be a finite number, not {value}")
        if minimum is not None and number < minimum:
            raise ValueError(f"must be at least {minimum}, not {value}")
        if number <= 0:
            raise ValueError(f"must be greater than 0, not {value}")
        return number

    if minimum is None:
        coerce.coerceDoc = "Must be greater than 0."
    else:
        coerce.coerceDoc = f"Must be at least {minimum:g}."
    return coerce


class Options(usage.Options):
    """Command-line options of ``twistd signalling``."""

    synopsis = "[options]"
    longdesc = (
        "A WebRTC signalling server for GStreamer webrtcbin applications and "
        "browsers. It listens on each --port (a Twisted endpoint description; "
        "default ssl:8443) and serves the signalling WebSocket on every path, "
        "a health check and a short page on the same port. A bare ssl:PORT "
        "takes cert.pem/key.pem (or Let's Encrypt's privkey.pem with cert.pem "
        "or fullchain.pem) from --cert-path, creating a self-signed certificate "
        "for localhost there on first start if there is none."
    )

    optFlags = [
        ["disable-ssl", None, "Listen on tcp:8443 (plaintext) instead of ssl:8443 "
         "by default, e.g. behind a TLS-terminating proxy."],
    ]

    optParameters = [
        ["cert-path", None, "certs",
         "Directory with cert.pem and key.pem (or Let's Encrypt's files), used "
         "by ssl: endpoints that name no privateKey=/certKey=.", str],
        ["keepalive-timeout", None, _factory.DEFAULT_KEEPALIVE,
         "Seconds between WebSocket pings; a peer whose pong does not come back "
         "within that time is disconnected.",
         _positive(float, _factory.MIN_KEEPALIVE)],
        ["health", None, "/health",
         "Path of the HTTP health check (answers 200 OK).", str],
        ["max-message-size", None, _factory.DEFAULT_MAX_MESSAGE,
         "Largest message accepted, in bytes; a larger one closes the connection "
         "with code 1009.", _positive(int)],
        ["hello-timeout", None, _factory.DEFAULT_HELLO_TIMEOUT,
         "Seconds a new connection has to send HELLO before it is closed.",
         _positive(float)],
    ]

    compData = usage.Completions(
        optActions={"cert-path": usage.CompleteDirs()}
    )

    def __init__(self):
        super().__init__()
        self["port"] = []
        self["ice-server"] = []

    def opt_port(self, description):
        """Listen on this Twisted endpoint description (repeatable), e.g. ssl:8443, tcp:8080:interface=127.0.0.1 or systemd:domain=INET6:index=0. Default: ssl:8443."""
        self["port"].append(description)

    opt_p = opt_port

    def opt_ice_server(self, server):
        """An ICE server for the call page at /, e.g. stun:stun.example.org:3478 or turn://USER:PASSWORD@turn.example.org:3478 (or a JSON RTCIceServer object). Repeatable. Default: none."""
        try:
            self["ice-server"].append(parse_ice_server(server))
        except ValueError as e:
            raise usage.UsageError(f"--ice-server: {e}")

    def postOptions(self):
        if self["disable-ssl"] and any(p.startswith("ssl:") for p in self["port"]):
            raise usage.UsageError("--disable-ssl conflicts with an ssl: --port")
        if not self["port"]:
            self["port"] = [DEFAULT_PLAIN_PORT if self["disable-ssl"] else DEFAULT_PORT]
        health = self["health"]
        if not health.startswith("/") or health == "/" or "?" in health:
            raise usage.UsageError(
                f"--health must be a path such as /health, not {health!r}"
            )


class SignallingService(MultiService):
    """
    The server's ports. A port that cannot be bound at start-up stops twistd
    with one line for the operator instead of a traceback.
    """

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            where = f"{e.interface}:{e.port}" if e.interface else f"port {e.port}"
            raise SystemExit(f"signalling: cannot listen on {where}: {e.socketError}")


def makeService(config, reactor=None):
    """
    Build the server from parsed :class:`Options`; nothing listens until the
    returned service starts.

    :param reactor: the reactor to listen on and take time from; the global
        one when None.
    :returns: a :class:`SignallingService` with one endpoint service per
        ``--port``.
    :raises SystemExit: with one line for the operator when the TLS material
        or an endpoint description cannot be used.
    """
    if reactor is None:
        from twisted.internet import reactor
    registry = Registry()
    ws_factory = _factory.SignallingServerFactory(
        None,
        registry,
        reactor,
        keepalive=config["keepalive-timeout"],
        max_message=config["max-message-size"],
        hello_timeout=config["hello-timeout"],
    )
    site = Site(
        SignallingRoot(
            ws_factory, config["health"].encode("utf-8"), ice_servers=config["ice-server"]
        )
    )
    site.noisy = False
    service = SignallingService()
    ports = []
    for description in config["port"]:
        bare_ssl = tls.is_bare_ssl(description)
        endpoint = tls.tcp_description(description) if bare_ssl else description
        _check_endpoint(reactor, description, endpoint)
        ports.append((endpoint, bare_ssl))
    # Only once every description is known to be good: this may create files.
    server_tls = None
    if any(bare_ssl for _, bare_ssl in ports):
        try:
            server_tls = tls.server_tls(config["cert-path"])
        except tls.TLSConfigError as e:
            raise SystemExit(f"signalling: {e}")
    for endpoint, bare_ssl in ports:
        factory = site
        if bare_ssl:
            factory = TLSMemoryBIOFactory(server_tls, False, site)
            factory.noisy = False
        strports.service(endpoint, factory, reactor=reactor).setServiceParent(service)
    return service


def _check_endpoint(reactor, description, listen_on):
    """
    Parse an endpoint description (nothing binds yet).

    :raises SystemExit: one line naming the ``--port`` given, when it is wrong.
    """
    try:
        serverFromString(reactor, listen_on)
    except Exception as e:
        text = " ".join((str(e) or type(e).__name__).split())
        raise SystemExit(f"signalling: cannot use --port {description!r}: {text}")

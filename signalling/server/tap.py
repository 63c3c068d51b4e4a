"""
The twistd plugin's options and service: ``twistd -n signalling``.
"""

import ipaddress
import math
import os
import re
import resource
import sys
from typing import NamedTuple

from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

import signalling
from signalling.server import factory as _factory
from signalling.server import settings as _settings
from signalling.server.policy import HandshakePolicy, ServerNames
from signalling.server.settings import ServerSettings
from signalling.server import auth, limits, listening, logs, memory, tls, turn, workers
from signalling.server.limits import ConnectionLimits
from signalling.server.metrics import SignallingCollector, Stats, metrics_resource
from signalling.cluster.redis import RedisAddress, RedisURLError
from signalling.core.dialects import AUTO, DIALECTS
from signalling.server.backends import build_backend
from signalling.server.service import PortService, SignallingService, raise_file_limit
from signalling.server.systemd import Notifier
from signalling.server import web
from signalling.server.web import parse_ice_server, with_pages

_log = Logger()

DEFAULT_PORT = "ssl:8443"
DEFAULT_PLAIN_PORT = "tcp:8443"
#: Most members of a room and most rooms, by default: far above what a call
#: page or a GStreamer room example does (a room of 50 is ordinary).
DEFAULT_MAX_ROOM_MEMBERS = 1000
DEFAULT_MAX_ROOMS = 100_000
#: The only --cert-path created without asking, with a self-signed pair.
DEFAULT_CERT_PATH = "certs"


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

    if minimum is not None:
        coerce.coerceDoc = f"Must be at least {minimum:g}."
    elif kind is int:
        coerce.coerceDoc = "Must be a whole number, 1 or more."
    else:
        coerce.coerceDoc = "Must be greater than 0."
    return coerce


def _log_format(value):
    if value not in ("text", "json"):
        raise ValueError(f"must be text or json, not {value!r}")
    return value


_log_format.coerceDoc = "One of text, json."


#: What --dialect may be: auto, or a dialect of the table.
_PORT_DIALECTS = (AUTO, *DIALECTS.websocket_names)


def _dialect(value):
    if value not in _PORT_DIALECTS:
        raise ValueError(f"must be one of {', '.join(_PORT_DIALECTS)}, not {value!r}")
    return value


_dialect.coerceDoc = f"One of {', '.join(_PORT_DIALECTS)}."


def _non_negative_int(value):
    number = int(value)
    if number < 0:
        raise ValueError(f"must be 0 or more, not {value}")
    return number


_non_negative_int.coerceDoc = "Must be a whole number, 0 or more."


def _non_negative_float(value):
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"must be 0 or more, not {value}")
    return number


_non_negative_float.coerceDoc = "Must be 0 or more."


def _prefix_length(value):
    number = int(value)
    if not 1 <= number <= 128:
        raise ValueError(f"must be from 1 to 128, not {value}")
    return number


_prefix_length.coerceDoc = "Must be a whole number from 1 to 128."


def _worker_fds(value):
    try:
        return workers.parse_worker_fds(value)
    except ValueError as e:
        raise usage.UsageError(f"--worker-fds: {e}")


class Options(usage.Options):
    """Command-line options of ``twistd signalling``."""

    synopsis = "[options]"
    longdesc = (
        "A WebRTC signalling server for GStreamer webrtcbin applications and "
        "browsers. It listens on each --port (a Twisted endpoint description; "
        "default ssl:8443) and serves the signalling WebSocket on every path, "
        "a health check and a browser call page on the same port. A bare ssl:PORT "
        "takes cert.pem/key.pem (or Let's Encrypt's privkey.pem with cert.pem "
        "or fullchain.pem) from --cert-path, creating a self-signed certificate "
        "for localhost there on first start if there is none; tls:ENDPOINT "
        "serves the same TLS on any endpoint (tls:systemd:domain=INET6:index=0). "
        "SIGHUP reloads that certificate; SIGTERM closes every connection with "
        "1001 and stops."
    )

    optFlags = [
        ["disable-ssl", None, "Listen on tcp:8443 (plaintext, on every IPv4 and "
         "IPv6 address) instead of ssl:8443 by default, e.g. behind a "
         "TLS-terminating proxy. It cannot be combined with an ssl: --port."],
        ["log-payloads", None, "Log every relayed message (SDP, ICE) at info "
         "level; the server warns at start that it does. For debugging only: "
         "it slows the relay and logs private data."],
        ["create-cert-path", None, "Create a --cert-path that does not exist, with "
         "a self-signed certificate in it (done without asking only for the "
         "default, certs)."],
    ]

    optParameters = [
        ["cert-path", None, DEFAULT_CERT_PATH,
         "Directory with cert.pem and key.pem (or Let's Encrypt's files), used "
         "by tls: ports and by ssl: ports that name no privateKey=/certKey=; a "
         "relative path is resolved from the working directory. Only the default is "
         "created when missing (with a self-signed certificate); any other "
         "missing directory (a typo?) stops the start with one line, unless "
         "--create-cert-path is given.", str],
        ["keepalive-timeout", None, _settings.DEFAULT_KEEPALIVE,
         "Seconds between WebSocket pings; a peer whose pong does not come back "
         "within that time is disconnected.",
         _positive(float, _settings.MIN_KEEPALIVE)],
        ["health", None, "/health",
         "Path of the HTTP health check (answers 200 OK): it starts with /, is "
         "not / itself and has no ?.", str],
        ["max-message-size", None, _settings.DEFAULT_MAX_MESSAGE,
         "Largest message accepted, in bytes; a larger one closes the connection "
         "with code 1009. What the server relays is not held to it.",
         _positive(int)],
        ["hello-timeout", None, _settings.DEFAULT_HELLO_TIMEOUT,
         "Seconds a new connection of the examples' protocol has to send HELLO "
         "before it is closed (code 1008). On an auto port a silent connection "
         "is welcomed as a JSON client instead, after --dialect-wait.",
         _positive(float)],
        ["max-output-buffer", None, _settings.DEFAULT_MAX_OUTPUT,
         "Bytes the server keeps for a peer that does not read what is sent to "
         "it, beyond its socket's buffer. A peer that stops reading is not read "
         "from either, nor is its session partner (TCP pushes back on the "
         "sender, as on a direct connection); a room member that falls this far "
         "behind is closed with 1008 and its room told. Every reply and notice "
         "counts against it before it is queued: one that would not fit (a long "
         "list, say) is not queued, and the client is closed with 1008.",
         _positive(int)],
        ["max-meta-size", None, _settings.DEFAULT_MAX_META,
         "Largest meta a JSON peer may set with setPeerStatus, in bytes of "
         "its JSON; a larger one is answered with an error and not kept. It is "
         "kept as its JSON text, at most 32 levels deep.",
         _positive(int)],
        ["max-room-members", None, DEFAULT_MAX_ROOM_MEMBERS,
         "Most members a room may have; one more is answered ERROR room '<id>' "
         "is full.", _positive(int)],
        ["max-rooms", None, DEFAULT_MAX_ROOMS,
         "Most rooms at once; a new one past it is answered ERROR too many "
         "rooms on this server.", _positive(int)],
        ["command-rate", None, _settings.DEFAULT_COMMAND_RATE,
         "Commands (messages outside a session: HELLO, SESSION, ROOM, "
         "ROOM_PEER_MSG, ...) a connection may send a second, on average; past "
         "it a command is answered ERROR rate limit exceeded, and a connection "
         "that goes on (20 refusals in a row) is closed with 1008. Messages "
         "relayed in a session are not counted (backpressure holds those).",
         _positive(float)],
        ["command-burst", None, _settings.DEFAULT_COMMAND_BURST,
         "Commands a connection may send at once: enough for a newcomer "
         "greeting and offering to every member of a large room.", _positive(int)],
        ["max-connections-per-address", None, limits.DEFAULT_PER_ADDRESS,
         "Most connections one client address may hold, each counted from "
         "accept until it closes (one kept alive for the page or /health "
         "included); more are closed as they connect, before any TLS "
         "handshake, and counted in the metrics. IPv6 clients are counted by "
         "--ipv6-prefix-length; --unlimited-address networks are not counted. "
         "Behind --trust-proxy the forwarded address counts (past it: 429 at "
         "the upgrade).", _positive(int)],
        # No final period: with no default shown, twistd adds ". " and the range.
        ["max-connections", None, None,
         "Most open WebSocket connections; more are refused at the upgrade "
         "with 503 (/health still answers). Default: the open-file limit less "
         f"{limits.FD_RESERVE}, kept for health checks, metrics and logs",
         _positive(int)],
        ["max-fragments", None, _settings.DEFAULT_MAX_FRAGMENTS,
         "Most fragments (continuation frames) one message may come in; more "
         "closes the connection with 1009. Browsers and GStreamer send "
         "messages whole.", _positive(int)],
        ["close-timeout", None, _settings.CLOSE_HANDSHAKE_TIMEOUT,
         "Seconds a connection the server closes may take: for the peer to "
         "answer the close, and for its TCP (and TLS) connection to end; then "
         "it is dropped. Its uid, session and room are released at once either "
         "way.", _positive(float)],
        ["auth-secret", None, None,
         "A file of secrets, one a line, 32 characters or more: all are "
         "accepted (two during a rotation), the first signs, and SIGHUP reloads "
         "the file, closing the connections whose token a removed secret signed "
         "(4001, token revoked). Every WebSocket then needs a token minted with "
         "signalling-token, as ?token= on its URL (the page at / passes its own "
         "on) or Authorization: Bearer; without a valid one the handshake gets "
         "401, counted by reason (token_missing, token_invalid, token_expired, "
         "token_lifetime). A connection is closed (4001, token expired) when "
         "its token expires. The token's claims limit the uid (sub), the JSON "
         "dialect's roles, the rooms and the peers that may be called. /health "
         "and the page need none.", str],
        ["max-token-lifetime", None, auth.DEFAULT_MAX_LIFETIME,
         "With --auth-secret: the longest a token may live, in seconds, from "
         "its iat (or from the handshake if it has none, or its iat lies "
         "ahead); a token issued for longer is refused with 401 "
         "(token_lifetime), so that a leaked token is worth a day at most "
         "(signalling-token mints tokens for an hour by default). 0: no limit. "
         "A connection is closed (4001) when its token expires either way.",
         _non_negative_float],
        ["turn-secret", None, None,
         "A file holding the secret shared with a TURN server (coturn's "
         "static-auth-secret, with use-auth-secret): the page at / and GET "
         "/ice-servers then hand out time-limited credentials in coturn's REST "
         "format (user name EXPIRY:UID, password the base64 HMAC-SHA1 of it), "
         "valid for --turn-ttl seconds, for every --turn-uri. Needs "
         "--turn-uri.", str],
        ["turn-ttl", None, turn.DEFAULT_TTL,
         "Seconds the TURN credentials stay valid.", _positive(int)],
        ["reclaim-timeout", None, _settings.DEFAULT_RECLAIM_TIMEOUT,
         "When a HELLO asks for a uid another connection holds, that "
         "connection is pinged: if no pong comes back within this many "
         "seconds it is closed (1008, replaced by a new connection) and the "
         "uid goes to the new one, so a reloaded page or a reconnecting peer "
         "gets its uid back. 0 (the default): a taken uid is refused at once, "
         "as the original server did; try 2. With --auth-secret, a token that "
         "names the uid takes it over at once either way.",
         _non_negative_float],
        ["answer-timeout", None, _settings.DEFAULT_ANSWER_TIMEOUT,
         "Seconds a WHEP POST (/whep/PRODUCER) waits for the producer's SDP "
         "answer before it is answered 504 and the session ends.",
         _positive(float)],
        ["candidate-wait", None, _settings.DEFAULT_CANDIDATE_WAIT,
         "WHEP and WHIP give the server no way to send candidates after its "
         "answer: it waits until no new candidate came from the other side "
         "for this many seconds (or it signals the end of its candidates) "
         "and puts those it has into the answer.",
         _positive(float)],
        ["whip-wait", None, _settings.DEFAULT_WHIP_WAIT,
         "Seconds a WHIP POST (/whip/NAME) waits for a consumer to start a "
         "session with the stream and answer; then it is answered 503 with "
         "Retry-After and the stream is removed.",
         _positive(float)],
        ["dialect", None, AUTO,
         "The protocol the ports speak: examples (GStreamer's webrtc "
         "examples: HELLO, SESSION, ROOM), json (webrtcsink, webrtcsrc and "
         "gstwebrtc-api), or auto: a connection whose first message is a JSON "
         "object speaks json, one whose first message is anything else "
         "examples, and a silent one is welcomed as a JSON client: soon after "
         "it answered the ping the server sends with its 101 (--dialect-margin, 10 ms, "
         "or the ping's round trip if longer), or after --dialect-wait.",
         _dialect],
        ["dialect-wait", None, _settings.DEFAULT_DIALECT_WAIT,
         "Seconds a silent connection on an auto port that answers no ping "
         "waits before it is taken for a JSON client and welcomed (one that "
         "answers is welcomed soon after its pong).", _positive(float)],
        ["dialect-margin", None, _settings.DEFAULT_DIALECT_MARGIN,
         "Seconds a silent connection on an auto port may still take to send "
         "its first message after it answered the server's ping (at least: the "
         "ping's round trip when that is longer), before it is welcomed as a "
         "JSON client. Raise it for examples' clients on loaded machines that "
         "send HELLO late; every JSON client waits that long.",
         _non_negative_float],
        ["trim-interval", None, memory.DEFAULT_INTERVAL,
         "Seconds between looks at the C allocator's heap: when more than "
         f"{memory.DEFAULT_THRESHOLD // 2**20} MiB of it became free since the "
         "last look (after a peak: a crowd leaving, buffers of slow readers let "
         "go), it is given back to the system (malloc_trim). 0: never. Needs "
         "glibc (Debian's C library); elsewhere it does nothing.",
         _non_negative_float],
        ["shutdown-timeout", None, 5.0,
         "On SIGTERM or SIGINT the server stops accepting, closes every "
         "connection with code 1001 and waits this long for the close "
         "handshakes, then exits with status 0.", _positive(float)],
        ["metrics-port", None, None,
         "Serve Prometheus metrics at /metrics on this separate endpoint "
         "description (e.g. tcp:9100:interface=127.0.0.1), never on the public "
         "port. Default: no metrics.", str],
        ["log-format", None, "text",
         "Log format under twistd: text, or json: one JSON object per line on "
         "standard output (time, level, namespace, message and the event's "
         "fields: uid, peer_addr, room_id, code, ...), for journald and log "
         "shippers.", _log_format],
        ["backlog", None, 4096,
         "Listen backlog of tcp:, ssl: and unix: ports that name none "
         "(Twisted's default of 50 drops connections in a reconnect storm; the "
         "kernel caps it at net.core.somaxconn).", _positive(int)],
        ["redis", None, None,
         "Join the cluster of every server on this Redis (redis://HOST:PORT/DB, "
         "or rediss:// for TLS): uids are unique across the processes, "
         "sessions and rooms span them, and peers on different processes call "
         "each other as on one. /health answers 503 until the process has "
         "reached Redis, and while it cannot. Default: none (this process "
         "alone, in memory).", str],
        ["redis-password-file", None, None,
         "A file holding the password of --redis (its first line); for a Redis "
         "ACL user, put the user in the URL (redis://USER@HOST/0).", str],
        ["node-timeout", None, 5.0,
         "With --redis: seconds after its last heartbeat (sent every second, "
         "or a third of this if less) that a process counts as dead and the "
         "others release its peers (their partners closed, their rooms told). "
         "Raise it on machines so loaded that a process can stall for that "
         "long.", _positive(float, 1.0)],
        ["redis-ca-file", None, None,
         "Trust the certificates in this PEM file for a rediss:// --redis "
         "(default: the system's trust store).", str],
        ["workers", None, 0,
         "Run this many worker processes that accept on the same ports (this "
         "process binds them and supervises the workers: it starts one again "
         "when it ends, passes SIGHUP and SIGTERM on, tells systemd READY=1 "
         "once every worker is ready and pings the watchdog only while all are "
         "alive). Needs --redis, which the workers share. Each worker serves "
         "--metrics-port's number plus its index (9100, 9101, ...). "
         "0: no workers, this process serves.", _non_negative_int],
        ["worker-index", None, None, "(Set by --workers for a worker: its index.)", int],
        ["worker-fds", None, None,
         "(Set by --workers for a worker: the listening sockets it adopts.)", _worker_fds],
        ["worker-pipe", None, None,
         "(Set by --workers for a worker: where it tells the parent it is alive.)", int],
        ["trust-proxy", None, 0,
         "Trust this many hops of X-Forwarded-For for the peer address (behind "
         "a reverse proxy), on connections from the proxy only: an "
         "--unlimited-address network (loopback by default) or a Unix socket. "
         "The forwarded value must be an IP address (else 400, counted as "
         "reason=\"forwarded\"); it is logged in its one normal spelling and "
         "always counted, loopback too.", _non_negative_int],
        ["ipv6-prefix-length", None, limits.DEFAULT_IPV6_PREFIX,
         "IPv6 clients are counted against --max-connections-per-address by "
         "this prefix (one home or machine commonly holds a whole /64); 128 "
         "counts each address alone. An IPv4-mapped address "
         "(::ffff:192.0.2.1) counts as its IPv4 address.", _prefix_length],
        ["http-timeout", None, web.DEFAULT_HTTP_TIMEOUT,
         "Seconds a plain HTTP connection (the page, /health, /ice-servers) may "
         "stay idle between requests, and may take to send one request whole, "
         "head and body, however slowly it trickles in; then it is closed. A "
         "connection's first request (and its TLS handshake) has "
         f"{_factory.OPEN_HANDSHAKE_TIMEOUT:g} s.", _positive(float)],
    ]

    compData = usage.Completions(
        optActions={"cert-path": usage.CompleteDirs()}
    )

    def __init__(self):
        super().__init__()
        self["port"] = []
        self["ice-server"] = []
        self["unlimited-address"] = []
        self["dialect-path"] = {}
        self["allowed-origin"] = []
        self["turn-uri"] = []
        self["server-name"] = []

    def opt_turn_uri(self, uri):
        """A TURN server for --turn-secret's credentials, e.g. turn:turn.example.org:3478 or turns:turn.example.org:5349?transport=tcp. Repeatable."""
        if not uri.startswith(("turn:", "turns:")):
            raise usage.UsageError(f"--turn-uri: expected turn: or turns:, not {uri!r}")
        self["turn-uri"].append(uri)

    def opt_allowed_origin(self, origin):
        """A web origin (https://app.example.org, or with :PORT if not the default) whose pages may open a WebSocket here; a browser's handshake from any other origin gets 403, counted as reason="origin". Repeatable. The server's own page is always allowed: an http or https origin naming the host and port of the handshake's Host header, when that host is localhost, an IP address, a DNS name of the --cert-path certificate or a --server-name (any other name may be another site's, resolving to this server). Clients that send no Origin (GStreamer, aiortc, native apps) are not affected. Default: any origin."""
        scheme, sep, rest = origin.partition("://")
        if scheme.lower() not in ("http", "https") or not sep or not rest or "/" in rest.rstrip("/"):
            raise usage.UsageError(
                f"--allowed-origin: expected https://HOST or https://HOST:PORT, not {origin!r}"
            )
        self["allowed-origin"].append(origin)

    def opt_server_name(self, name):
        """A host name of this server (e.g. signalling.example.org, or *.example.org for one label): with --allowed-origin, a page served under it, on the host and port the handshake names, counts as the server's own page. localhost, IP addresses and the DNS names of the --cert-path certificate count without it; a name that is in no certificate (behind a TLS-terminating proxy, or with an ssl: port naming its own files) needs it. Repeatable."""
        name = name.strip().rstrip(".")
        if not name or any(c in name for c in ":/[]@ ") or name.startswith("*") and not name.startswith("*."):
            raise usage.UsageError(f"--server-name: expected a host name, not {name!r}")
        self["server-name"].append(name)

    def opt_dialect_path(self, pin):
        """PATH=DIALECT: connections that upgrade on this path (e.g. /webrtcsink=json or /=examples) speak that dialect (examples or json) from the start, with no wait. Repeatable."""
        path, sep, dialect = pin.rpartition("=")
        if not sep or not path.startswith("/") or dialect not in DIALECTS.websocket_names:
            choices = " or ".join(f"PATH={name}" for name in DIALECTS.websocket_names)
            raise usage.UsageError(
                f"--dialect-path: expected {choices} with PATH starting with /, not {pin!r}"
            )
        self["dialect-path"][path] = dialect

    def opt_unlimited_address(self, network):
        """A client network (e.g. 10.0.0.5/32) whose connections are not counted against --max-connections-per-address: a reverse proxy's, whose forwarded addresses --trust-proxy reads. Repeatable; the first replaces the default, the loopback addresses (127.0.0.0/8, ::1)."""
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError as e:
            raise usage.UsageError(f"--unlimited-address: {e}")
        self["unlimited-address"].append(network)

    def opt_port(self, description):
        """Listen on this Twisted endpoint description, e.g. ssl:8443, tcp:8080:interface=127.0.0.1, systemd:domain=INET6:index=0 or tls:systemd:domain=INET6:index=0 (a bare number is refused with a suggestion). Repeatable: once per address to listen on. Default: ssl:8443 on every IPv4 and every IPv6 address (two sockets, so IPv4 peers keep their IPv4 addresses in the logs); an explicit --port listens exactly where it says (ssl:8443 is IPv4 only)."""
        self["port"].append(description)

    opt_p = opt_port

    def opt_ice_server(self, server):
        """An ICE server for the call page at / and GET /ice-servers: stun:HOST:PORT, turn:HOST:PORT?transport=tcp, GStreamer's turn://USER:PASSWORD@HOST:PORT, or a JSON RTCIceServer object. Repeatable. The server itself never contacts it. With --auth-secret, one with credentials goes only to a page asked for with a valid token. Default: none."""
        try:
            self["ice-server"].append(parse_ice_server(server))
        except ValueError as e:
            raise usage.UsageError(f"--ice-server: {e}")

    def opt_version(self):
        """Print signalling VERSION and exit. The version is also the first line the server logs."""
        print(f"signalling {signalling.__version__}")
        raise SystemExit(0)

    def parseOptions(self, options=None):
        #: The command line as given: a --workers parent starts its workers with it.
        self["argv"] = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def postOptions(self):
        if self["workers"] == 1:
            self["workers"] = 0
        if self["workers"] and self["redis"] is None:
            raise usage.UsageError(
                "--workers needs --redis: the workers share their peers, sessions and rooms through it"
            )
        if self["workers"] and self["worker-fds"] is not None:
            raise usage.UsageError("--workers and --worker-fds do not go together")
        if self["disable-ssl"] and any(p.startswith("ssl:") for p in self["port"]):
            raise usage.UsageError("--disable-ssl conflicts with an ssl: --port")
        #: The default port listens on IPv6 too; a --port exactly as given.
        self["default-port"] = not self["port"]
        if not self["port"]:
            self["port"] = [DEFAULT_PLAIN_PORT if self["disable-ssl"] else DEFAULT_PORT]
        if bool(self["turn-secret"]) != bool(self["turn-uri"]):
            raise usage.UsageError("--turn-secret and --turn-uri go together")
        for option in ("redis-password-file", "redis-ca-file"):
            if self[option] is not None and self["redis"] is None:
                raise usage.UsageError(f"--{option} needs --redis")
        #: --redis parsed, once: the backend is built from it.
        self["redis-address"] = None
        if self["redis"] is not None:
            try:
                self["redis-address"] = RedisAddress(self["redis"])
            except RedisURLError as e:
                raise usage.UsageError(f"--redis: {e}")
        health = self["health"]
        if not health.startswith("/") or health == "/" or "?" in health:
            raise usage.UsageError(
                f"--health must be a path such as /health, not {health!r}"
            )


def _offset_port(description, offset):
    """:returns: ``tcp:PORT...`` with ``offset`` added to PORT (other descriptions as they are)."""
    match = re.match(r"^(tcp6?:(?:port=)?)(\d+)(.*)$", description)
    if match is None or offset == 0:
        return description
    return f"{match.group(1)}{int(match.group(2)) + offset}{match.group(3)}"


class _Port(NamedTuple):
    """A port to serve, as :func:`makeService` prepares it."""

    #: The description as given, for logs and errors.
    description: str
    #: What to listen on (a description with its backlog), for the early check.
    listen_on: object
    #: The endpoint; None in a worker until it adopts its socket.
    endpoint: object
    #: Served through the project's own TLS layer (``tls:`` and bare ``ssl:``).
    wrap: bool


class _Shared(NamedTuple):
    """What the sites of every port share."""

    reactor: object
    registry: object
    settings: ServerSettings
    policy: HandshakePolicy
    stats: Stats
    server_tls: object


def makeService(config, reactor=None):
    """
    Build the server from parsed :class:`Options`; nothing listens until the
    returned service starts, and nothing reads ``config`` afterwards.

    :param reactor: the reactor to listen on and take time from; the global
        one when None.
    :returns: a :class:`signalling.server.service.SignallingService`, or
        with ``--workers`` a :class:`signalling.server.workers.Supervisor`.
    :raises SystemExit: with one line for the operator when the TLS material
        or an endpoint description cannot be used.
    """
    # Signals are ours only when we run on the global reactor (under twistd).
    handle_signals = reactor is None
    if reactor is None:
        from twisted.internet import reactor
    if config["log-format"] == "json":
        log_observer = logs.json_observer()
    else:
        log_observer = logs.twistd_text_observer(config)
    registry, backend = build_backend(config, reactor)
    stats = Stats()
    ports = _ports(config, reactor)
    metrics_port = _metrics_port(config, reactor)
    if handle_signals and config["worker-fds"] is None:
        _check_can_listen(ports, metrics_port)
    # Only once every description is known to be good: this may create files.
    server_tls = _server_tls(config, ports)
    _log.info("signalling {version}", version=signalling.__version__)
    if handle_signals:
        # Before the connection limits, which follow the open-file limit.
        raise_file_limit(_log)
    settings = ServerSettings.from_options(config)
    policy = _handshake_policy(config, reactor, settings, stats, server_tls)
    turn_credentials = _turn_credentials(config, reactor)
    if config["workers"]:
        return _supervisor(config, reactor, ports, handle_signals, log_observer)
    shared = _Shared(reactor, registry, settings, policy, stats, server_tls)
    pipe = _worker_pipe(config, reactor)
    listen, ws_factories = _sites(config, ports, shared, turn_credentials)
    if pipe is not None and handle_signals:
        pipe.stop_in_step([f for _, f in ws_factories])
    if config["log-payloads"]:
        _log.warn("--log-payloads: every relayed message is logged, payloads included")
    service = SignallingService(
        reactor,
        listen,
        [f for _, f in ws_factories],
        notifier=Notifier(),
        shutdown_timeout=config["shutdown-timeout"],
        server_tls=server_tls,
        handle_signals=handle_signals,
        log_observer=log_observer,
        token_keys=policy.auth,
        backend=backend,
        on_ready=None if pipe is None else pipe.when_serving(registry),
    )
    for name, child in _children(config, metrics_port, shared, ws_factories).items():
        child.setName(name)
        child.setServiceParent(service)
    return service


def _ports(config, reactor):
    """
    :returns: a :class:`_Port` for every ``--port`` (and the default's IPv6
        twin); in a worker, each with the socket its parent bound.
    :raises SystemExit: with one line for a description that cannot be used.
    """
    ports = []
    for description in config["port"]:
        ports.extend(_port(config, reactor, description))
    if config["worker-fds"] is None:
        return ports
    adopted = workers.adopted(reactor, config["worker-fds"])
    if len(adopted) != len(ports):
        raise SystemExit(
            f"signalling: --worker-fds names {len(adopted)} sockets for {len(ports)} ports"
        )
    return [
        port._replace(endpoint=endpoint)
        for port, endpoint in zip(ports, adopted)
        if endpoint is not None
    ]


def _port(config, reactor, description):
    """:returns: the :class:`_Port`\\ s of one ``--port``: one, or the default's two."""
    if description.startswith("tls:"):
        endpoint = description[len("tls:"):]
        if not endpoint:
            listening.parse(reactor, description, endpoint)
    elif tls.is_bare_ssl(description):
        endpoint = tls.tcp_description(description)
    else:
        endpoint = None
    wrap = endpoint is not None
    listen_on = with_backlog(endpoint or description, config["backlog"])
    # A worker adopts the socket its parent bound instead (see _ports).
    parsed = None
    if config["worker-fds"] is None:
        parsed = listening.parse(reactor, description, listen_on)
    ports = [_Port(description, listen_on, parsed, wrap)]
    if config.get("default-port"):
        # The default listens on every IPv6 address as well, on a
        # socket of its own (IPv4 peers keep their IPv4 addresses).
        twin = listening.ipv6_twin(reactor, listen_on)
        ports.append(_Port(description + ":interface=\\:\\:", twin, twin, wrap))
    return ports


def _metrics_port(config, reactor):
    """
    :returns: the :class:`_Port` of ``--metrics-port`` (a worker's moved by
        its index: each serves its own), or None.
    :raises SystemExit: with one line naming the option when it cannot be used.
    """
    description = config["metrics-port"]
    if description is None:
        return None
    if config["worker-index"] is not None:
        description = _offset_port(description, config["worker-index"])
    listen_on = with_backlog(description, config["backlog"])
    endpoint = listening.parse(reactor, description, listen_on, "--metrics-port")
    return _Port(description, listen_on, endpoint, False)


def _check_can_listen(ports, metrics_port):
    """
    Under twistd: a busy port is reported now, before a daemon forks and
    could only write it to its log file.
    """
    for port in ports:
        listening.check_can_listen(port.listen_on, port.description)
    if metrics_port is not None:
        listening.check_can_listen(
            metrics_port.listen_on, metrics_port.description, "--metrics-port"
        )


def _server_tls(config, ports):
    """
    :returns: the :class:`signalling.server.tls.ServerTLS` of
        ``--cert-path`` when a port serves the project's TLS, else None. The
        default directory (or one ``--create-cert-path`` names) is created
        with a self-signed pair.
    :raises SystemExit: with one line when the TLS material cannot be used.
    """
    if not any(port.wrap for port in ports):
        return None
    create_dir = config["create-cert-path"] or (
        os.path.abspath(config["cert-path"]) == os.path.abspath(DEFAULT_CERT_PATH)
    )
    try:
        return tls.server_tls(config["cert-path"], create_dir=create_dir)
    except tls.TLSConfigError as e:
        raise SystemExit(f"signalling: {e}")


def _handshake_policy(config, reactor, settings, stats, server_tls):
    """
    :returns: the :class:`signalling.server.policy.HandshakePolicy`: the
        connection limits, the token secrets (``policy.auth``) and the
        server's own names.
    :raises SystemExit: with one line when ``--auth-secret`` cannot be used.
    """
    connection_limits = ConnectionLimits(
        config["max-connections-per-address"],
        config["max-connections"] or default_max_connections(),
        config["unlimited-address"] or limits.DEFAULT_EXEMPT,
        stats,
        config["ipv6-prefix-length"],
    )
    token_keys = None
    if config["auth-secret"] is not None:
        try:
            token_keys = auth.TokenKeys(
                config["auth-secret"], reactor, config["max-token-lifetime"]
            )
        except auth.AuthConfigError as e:
            raise SystemExit(f"signalling: {e}")
    server_names = ServerNames(config["server-name"], server_tls)
    return HandshakePolicy(settings, stats, token_keys, connection_limits, server_names)


def _turn_credentials(config, reactor):
    """
    :returns: the :class:`signalling.server.turn.TurnCredentials` of
        ``--turn-secret``, or None.
    :raises SystemExit: with one line when the secret cannot be read.
    """
    if config["turn-secret"] is None:
        return None
    try:
        secret = turn.read_secret(config["turn-secret"])
    except turn.TurnConfigError as e:
        raise SystemExit(f"signalling: {e}")
    return turn.TurnCredentials(secret, config["turn-uri"], reactor, config["turn-ttl"])


def _supervisor(config, reactor, ports, handle_signals, log_observer):
    """:returns: the parent of ``--workers``: it binds ``ports`` and supervises the workers."""
    return workers.Supervisor(
        reactor,
        [(port.description, port.endpoint) for port in ports],
        config["workers"],
        workers.worker_argv(config["argv"]),
        notifier=Notifier(),
        shutdown_timeout=config["shutdown-timeout"],
        handle_signals=handle_signals,
        log_observer=log_observer,
    )


def _worker_pipe(config, reactor):
    """:returns: a worker's pipe to its parent (``--worker-pipe``), or None."""
    if config["worker-pipe"] is None:
        return None
    return workers.WorkerPipe(config["worker-pipe"], reactor)


def _sites(config, ports, shared, turn_credentials):
    """
    A WebSocket factory with the pages for every port, under the project's
    TLS where the port asks for it.

    :returns: ``[(description, endpoint, factory)]`` to listen on, and
        ``[(description, WebSocket factory)]``.
    """
    listen, ws_factories = [], []
    for port in ports:
        ws_factory = _factory.SignallingServerFactory(
            None,
            shared.registry,
            shared.reactor,
            shared.settings,
            shared.policy,
            shared.stats,
            # Client addresses are counted by the port's outermost layer.
            count_addresses=not port.wrap,
        )
        ws_factories.append((port.description, ws_factory))
        with_pages(
            ws_factory,
            config["health"].encode("utf-8"),
            config["ice-server"],
            turn_credentials,
            config["http-timeout"],
        )
        factory = ws_factory
        if port.wrap:
            factory = tls.ServerTLSFactory(
                shared.server_tls, ws_factory, shared.stats, shared.policy, shared.reactor
            )
        listen.append((port.description, port.endpoint, factory))
    return listen, ws_factories


def _children(config, metrics_port, shared, ws_factories):
    """
    :returns: ``{name: service}``: the children of the service tree that
        run while the server serves, besides its ports and backend (the
        metrics port, the memory reclaimer), each when configured.
    """
    children = {
        "metrics": _metrics(metrics_port, shared, ws_factories),
        "memory": _reclaimer(config, shared.reactor, shared.stats),
    }
    return {name: child for name, child in children.items() if child is not None}


def _metrics(metrics_port, shared, ws_factories):
    """:returns: the port serving Prometheus metrics at /metrics on ``--metrics-port``, or None."""
    if metrics_port is None:
        return None
    collector = SignallingCollector(
        shared.stats, shared.registry, ws_factories, shared.settings.dialects
    )
    site = Site(metrics_resource(collector))
    site.noisy = False
    return PortService(metrics_port.description, metrics_port.endpoint, site, "--metrics-port")


def _reclaimer(config, reactor, stats):
    """:returns: the :class:`signalling.server.memory.MemoryReclaimer` of ``--trim-interval``, or None (0, or no glibc)."""
    heap = memory.glibc_heap() if config["trim-interval"] > 0 else None
    if heap is None:
        return None
    return memory.MemoryReclaimer(heap, reactor, config["trim-interval"], stats=stats)


_LISTENING_TYPES = ("tcp:", "tcp6:", "ssl:", "unix:")


def with_backlog(description, backlog):
    """
    Give a listening endpoint description a listen backlog, unless it names
    one. Twisted's default of 50 drops connections in a reconnect storm.

    :returns: the description to listen on.
    """
    if not description.startswith(_LISTENING_TYPES) or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


def default_max_connections():
    """:returns: the open-file limit less a reserve (health checks, logs, ports)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1_048_576
    return max(1, soft - limits.FD_RESERVE)

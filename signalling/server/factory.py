"""
The WebSocket factory: owns the registry, the clock and the connection limits.
"""

from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet.interfaces import IProtocolNegotiationFactory
from zope.interface import implementer

from signalling.server.auth import TOKEN_REVOKED
from signalling.server.limits import REFUSED
from signalling.server.metrics import Stats
from signalling.server.protocol import PlainSignallingServerProtocol, SignallingServerProtocol
from signalling.server.websocket import ServerNames, normalize_origin

#: Largest message accepted by default (the example server's limit).
DEFAULT_MAX_MESSAGE = 1024 * 1024
DEFAULT_KEEPALIVE = 30.0
DEFAULT_HELLO_TIMEOUT = 30.0
#: Bytes kept for a peer that does not read, by default, before it is closed.
DEFAULT_MAX_OUTPUT = 4 * 1024 * 1024
#: See :attr:`SignallingServerFactory.fits_unchecked`.
FITS_UNCHECKED = 64 * 1024
#: Largest ``meta`` a JSON peer may set, by default (bytes of its JSON).
DEFAULT_MAX_META = 64 * 1024
#: Commands a connection may send, by default: 200 a second on average, and
#: 2000 at once (a newcomer offering to 50 room members, candidates and all,
#: sends some 600).
DEFAULT_COMMAND_RATE = 200.0
DEFAULT_COMMAND_BURST = 2000
#: Most fragments a message may come in, by default (a 1 MiB message in
#: 1 KiB fragments; browsers and GStreamer send messages whole).
DEFAULT_MAX_FRAGMENTS = 1024
#: Seconds a connection on an auto port waits for a first message before it
#: is taken for a JSON client and welcomed (plus three of its round trips).
DEFAULT_DIALECT_WAIT = 0.5
#: Seconds the holder of a uid has to answer a ping when a new connection
#: asks for its uid; 0: a taken uid is refused at once (as the original
#: server did), unless the newcomer's token names the uid.
DEFAULT_RECLAIM_TIMEOUT = 0.0
#: How long a close handshake may take before the TCP connection is dropped.
#: Autobahn's 1 s can cut off an ``ERROR`` line a slow client has not read.
CLOSE_HANDSHAKE_TIMEOUT = 5.0
#: How long the HTTP upgrade may take.
OPEN_HANDSHAKE_TIMEOUT = 10.0
#: Autobahn's timers go through txaio's batched timer, which rounds every
#: deadline down to a whole second of clock time, so a timer may fire up to
#: this much early. The pong deadline gets it added so that a pong always has
#: at least the full keepalive time.
TIMER_ROUNDING = 1.0
#: The shortest keepalive that rounding leaves meaningful.
MIN_KEEPALIVE = 1.0


def _refuse_compression(offers):
    """Accept no permessage-deflate offer: it costs memory per connection."""
    return None


@implementer(IProtocolNegotiationFactory)
class SignallingServerFactory(WebSocketServerFactory):
    """
    Builds one :class:`SignallingServerProtocol` per connection.

    :param url: the WebSocket URL clients use, or None.
    :param registry: an :class:`signalling.core.interfaces.IRegistry`.
    :param clock: an ``IReactorTime`` for our own timers.
    :param keepalive: seconds between pings, and how long a pong may take
        (at least :data:`MIN_KEEPALIVE`).
    :param max_message: largest message accepted, in bytes; a larger one
        closes the connection with 1009.
    :param hello_timeout: seconds a new connection has to send ``HELLO``.
    :param stats: the :class:`signalling.server.metrics.Stats` to count into
        (shared by the factories of one server); a new one when None.
    :param trust_proxy: how many ``X-Forwarded-For`` hops to trust for the
        peer address (0: none).
    :param log_payloads: log every relayed payload (for debugging only).
    :param web: the protocol factory (a twisted.web ``Site``) that gets every
        connection whose first request asks for no WebSocket upgrade, or
        None to refuse those with 426.
    :param fast_path: use the fast WebSocket layer
        (:class:`signalling.server.websocket.FastServerProtocol`); False runs every
        frame through Autobahn's own paths, for comparison and diagnosis.
    :param max_output: bytes the server keeps for a peer that does not read
        (beyond what its transport buffers); past it, the peer is closed
        with 1008. Session partners are held back long before (backpressure).
    :param max_meta_size: largest ``meta`` a JSON peer may set, in bytes of
        its JSON; a larger one is refused with an ``error``.
    :param limits: the server's :class:`signalling.server.limits.ConnectionLimits`,
        or None for no limits.
    :param count_addresses: count client addresses here, at accept (the
        factory is the port's outermost; under TLS the TLS layer counts).
    :param dialect: ``auto``, ``examples`` or ``json``: the protocol this
        port speaks; ``auto`` takes the examples' one for a connection whose
        first message is not a JSON object, the JSON one for the others and
        for a connection silent for ``dialect_wait`` seconds.
    :param dialect_paths: ``{path: dialect}`` for paths pinned to one.
    :param allowed_origins: ``scheme://host[:port]`` origins whose pages may
        open a WebSocket; a browser's handshake from another origin gets
        403. Empty: any origin.
    :param server_names: the :class:`signalling.server.websocket.ServerNames`
        whose pages are the server's own (allowed with ``allowed_origins``);
        None: ``localhost`` and IP literals.
    :param command_rate: commands a connection may send a second, on
        average (messages relayed in a session are not commands).
    :param command_burst: commands a connection may send at once.
    :param max_fragments: most fragments one message may come in; more
        closes the connection with 1009.
    :param close_timeout: seconds a closing connection may take: for the
        peer to answer our close frame, and for the transport to close
        (TLS waits for the peer's ``close_notify``) before it is aborted.
    """

    protocol = SignallingServerProtocol

    def __init__(
        self,
        url,
        registry,
        clock,
        keepalive=DEFAULT_KEEPALIVE,
        max_message=DEFAULT_MAX_MESSAGE,
        hello_timeout=DEFAULT_HELLO_TIMEOUT,
        stats=None,
        trust_proxy=0,
        log_payloads=False,
        web=None,
        close_timeout=CLOSE_HANDSHAKE_TIMEOUT,
        fast_path=True,
        max_output=DEFAULT_MAX_OUTPUT,
        max_meta_size=DEFAULT_MAX_META,
        max_fragments=DEFAULT_MAX_FRAGMENTS,
        command_rate=DEFAULT_COMMAND_RATE,
        command_burst=DEFAULT_COMMAND_BURST,
        limits=None,
        count_addresses=False,
        dialect="auto",
        dialect_paths=None,
        dialect_wait=DEFAULT_DIALECT_WAIT,
        allowed_origins=(),
        auth=None,
        reclaim_timeout=DEFAULT_RECLAIM_TIMEOUT,
        server_names=None,
    ):
        if keepalive < MIN_KEEPALIVE:
            raise ValueError(f"keepalive must be at least {MIN_KEEPALIVE} s")
        super().__init__(url)
        if not fast_path:
            self.protocol = PlainSignallingServerProtocol
        self.registry = registry
        self.clock = clock
        self.hello_timeout = hello_timeout
        self.stats = Stats() if stats is None else stats
        self.log_payloads = log_payloads
        self.web = web
        self.close_timeout = close_timeout
        self.max_output = max_output
        #: Output up to this size is queued for a peer that reads without a
        #: look at the bound: the transport's buffer (64 KiB) takes it, and
        #: says when the peer stops reading.
        self.fits_unchecked = min(FITS_UNCHECKED, max_output)
        self.max_meta_size = max_meta_size
        self.max_fragments = max_fragments
        self.command_rate = command_rate
        self.command_burst = command_burst
        self.limits = limits
        self.count_addresses = count_addresses
        #: The dialect of this port (auto, examples or json), and of paths
        #: pinned to one; seconds an auto connection waits for a first message.
        self.dialect = dialect
        self.dialect_paths = dict(dialect_paths or {})
        self.dialect_wait = dialect_wait
        #: Origins whose pages may open a WebSocket (besides the server's
        #: own); empty: any. Clients that send no Origin are not affected.
        self.allowed_origins = frozenset(normalize_origin(o) for o in allowed_origins)
        #: The host names whose pages are the server's own.
        self.server_names = ServerNames() if server_names is None else server_names
        #: The token keys (signalling.server.auth.TokenKeys), or None: no token needed.
        self.auth = auth
        #: Seconds a silent holder of a uid has to answer a ping before a
        #: new HELLO for its uid takes it over (0: never).
        self.reclaim_timeout = reclaim_timeout
        #: True once :meth:`close_all` ran: the server is shutting down.
        self.shutting_down = False
        #: Open (past the handshake) connections, for a graceful shutdown.
        self.connections = set()
        self.setProtocolOptions(
            # Plain GETs go to self.web (or get 426), never Autobahn's page.
            webStatus=False,
            # Protocol errors get a close frame (1002, 1007, 1009) rather than
            # a dropped TCP connection.
            failByDrop=False,
            utf8validateIncoming=True,
            maxMessagePayloadSize=max_message,
            maxFramePayloadSize=max_message,
            autoPingInterval=keepalive,
            autoPingTimeout=keepalive + TIMER_ROUNDING,
            openHandshakeTimeout=OPEN_HANDSHAKE_TIMEOUT,
            closeHandshakeTimeout=close_timeout,
            perMessageCompressionAccept=_refuse_compression,
            trustXForwardedFor=trust_proxy,
        )
        # One log line per listening port start is enough; not one per client.
        self.noisy = False

    def buildProtocol(self, addr):
        """
        A protocol for a new connection, unless its client address holds as
        many connections as it may (then None: the connection is closed).
        """
        host = None
        if self.limits is not None and self.count_addresses:
            host = self.limits.admit_address(addr)
            if host is REFUSED:
                return None
        proto = WebSocketServerFactory.buildProtocol(self, addr)
        if host is not None:
            proto.counted_host = host
        return proto

    def acceptableProtocols(self):
        """
        The protocol to agree on over TLS (ALPN): HTTP/1.1, which carries
        both the WebSocket upgrade and the pages. A client that offers ALPN
        gets no handshake at all from a TLS layer with nothing to offer.
        """
        return [b"http/1.1"]

    def begin_shutdown(self):
        """
        The server is stopping: a session or room partner that goes from
        now on is closed for that reason (1001), not as if its partner had
        left. Every factory of a server is told before any closes.
        """
        self.shutting_down = True

    def close_revoked(self):
        """
        Close (4001, ``token revoked``) every open connection whose token
        was signed with a secret the token keys no longer hold (after a
        reload).

        :returns: how many.
        """
        if self.auth is None:
            return 0
        revoked = [
            protocol
            for protocol in self.connections
            if protocol.grant is not None and self.auth.revoked(protocol.grant)
        ]
        for protocol in revoked:
            protocol.token_ended(TOKEN_REVOKED)
        return len(revoked)

    def close_all(self):
        """Close every open connection with 1001 (going away)."""
        self.begin_shutdown()
        for protocol in list(self.connections):
            protocol.going_away()

"""
The server's settings: one frozen value, built and checked once from the
command line (:meth:`ServerSettings.from_options`), and read by the factory,
the WebSocket layer and the per-connection logic (which receives it as
``settings``). Nothing downstream reads the options.
"""

import dataclasses
from types import MappingProxyType

from signalling.core.dialects import AUTO, DIALECTS, DialectTable

#: Largest message accepted by default (the example server's limit).
DEFAULT_MAX_MESSAGE = 1024 * 1024
DEFAULT_KEEPALIVE = 30.0
#: The shortest keepalive that the rounding of Autobahn's timers leaves
#: meaningful.
MIN_KEEPALIVE = 1.0
DEFAULT_HELLO_TIMEOUT = 30.0
#: Bytes kept for a peer that does not read, by default, before it is closed.
DEFAULT_MAX_OUTPUT = 4 * 1024 * 1024
#: Output up to this size is queued for a peer that reads without a look at
#: the output bound: the transport's buffer (64 KiB) takes it, and says when
#: the peer stops reading.
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
#: Seconds a silent connection on an auto port that answers no ping waits
#: before it is welcomed as a JSON client; and the least time one that
#: answered may still take to speak after its pong.
DEFAULT_DIALECT_WAIT = 2.0
DEFAULT_DIALECT_MARGIN = 0.01
#: Seconds a WHEP ``POST`` waits for the producer's answer, by default.
DEFAULT_ANSWER_TIMEOUT = 15.0
#: Seconds without a new candidate after which a WHEP or WHIP answer goes
#: out with the candidates gathered so far, by default.
DEFAULT_CANDIDATE_WAIT = 0.2
#: Seconds a WHIP ``POST`` waits for a consumer (and its answer), by default.
DEFAULT_WHIP_WAIT = 30.0
#: Seconds the holder of a uid has to answer a ping when a new connection
#: asks for its uid; 0: a taken uid is refused at once (as the original
#: server did), unless the newcomer's token names the uid.
DEFAULT_RECLAIM_TIMEOUT = 0.0
#: How long a close handshake may take before the TCP connection is dropped.
#: Autobahn's 1 s can cut off an ``ERROR`` line a slow client has not read.
CLOSE_HANDSHAKE_TIMEOUT = 5.0


def normalize_origin(origin):
    """:returns: ``origin`` (``scheme://host[:port]``) as browsers send it, lower case."""
    return origin.strip().rstrip("/").lower()


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """
    What a server's ports do, fixed at start-up.

    :ivar keepalive: seconds between pings, and how long a pong may take
        (at least :data:`MIN_KEEPALIVE`).
    :ivar max_message: largest message accepted, in bytes; a larger one
        closes the connection with 1009.
    :ivar hello_timeout: seconds a connection of the examples' dialect has
        to send ``HELLO``.
    :ivar trust_proxy: how many ``X-Forwarded-For`` hops to trust (0: none).
    :ivar log_payloads: log every relayed payload (debugging only).
    :ivar close_timeout: seconds a closing connection may take (the close
        handshake, then the transport) before it is aborted.
    :ivar fast_path: use the fast WebSocket layer; False runs every frame
        through Autobahn's own paths (for comparison and diagnosis).
    :ivar max_output: bytes kept for a peer that does not read (beyond what
        its transport buffers); what would not fit closes it with 1008.
    :ivar max_meta_size: largest ``meta`` a JSON peer may set, in bytes.
    :ivar max_fragments: most fragments one message may come in.
    :ivar command_rate: commands a connection may send a second, on average.
    :ivar command_burst: commands a connection may send at once.
    :ivar dialect: the ports' dialect: ``auto`` or a name in ``dialects``.
    :ivar dialects: the :class:`signalling.core.dialects.DialectTable`.
    :ivar dialect_paths: ``{path: dialect name}`` for paths pinned to one.
    :ivar dialect_wait: seconds a silent connection on an auto port that
        answers no ping waits before it is welcomed as a JSON client.
    :ivar dialect_margin: seconds a silent connection on an auto port may
        still take to send its first message after its pong (at least; the
        pong's round trip when longer) before it is welcomed as a JSON client.
    :ivar allowed_origins: ``scheme://host[:port]`` origins whose pages may
        open a WebSocket (besides the server's own); empty: any.
    :ivar reclaim_timeout: seconds a silent holder of a uid has to answer a
        ping before a ``HELLO`` for its uid takes it over (0: never).
    :ivar answer_timeout: seconds a WHEP ``POST`` waits for the producer's
        answer (then 504).
    :ivar candidate_wait: seconds without a new candidate after which a
        WHEP or WHIP answer goes out (the server cannot trickle them later).
    :ivar whip_wait: seconds a WHIP ``POST`` waits for a consumer and its
        answer (then 503).
    """

    keepalive: float = DEFAULT_KEEPALIVE
    max_message: int = DEFAULT_MAX_MESSAGE
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT
    trust_proxy: int = 0
    log_payloads: bool = False
    close_timeout: float = CLOSE_HANDSHAKE_TIMEOUT
    fast_path: bool = True
    max_output: int = DEFAULT_MAX_OUTPUT
    max_meta_size: int = DEFAULT_MAX_META
    max_fragments: int = DEFAULT_MAX_FRAGMENTS
    command_rate: float = DEFAULT_COMMAND_RATE
    command_burst: int = DEFAULT_COMMAND_BURST
    dialect: str = AUTO
    dialects: DialectTable = DIALECTS
    dialect_paths: object = dataclasses.field(default_factory=dict)
    dialect_wait: float = DEFAULT_DIALECT_WAIT
    dialect_margin: float = DEFAULT_DIALECT_MARGIN
    allowed_origins: frozenset = frozenset()
    reclaim_timeout: float = DEFAULT_RECLAIM_TIMEOUT
    answer_timeout: float = DEFAULT_ANSWER_TIMEOUT
    candidate_wait: float = DEFAULT_CANDIDATE_WAIT
    whip_wait: float = DEFAULT_WHIP_WAIT

    def __post_init__(self):
        if self.keepalive < MIN_KEEPALIVE:
            raise ValueError(f"keepalive must be at least {MIN_KEEPALIVE} s")
        for name in (self.dialect, *self.dialect_paths.values()):
            if name != AUTO and name not in self.dialects.websocket_names:
                raise ValueError(f"unknown dialect {name!r} (for a WebSocket)")
        setattr_ = object.__setattr__
        setattr_(self, "dialect_paths", MappingProxyType(dict(self.dialect_paths)))
        setattr_(
            self, "allowed_origins", frozenset(normalize_origin(o) for o in self.allowed_origins)
        )

    @property
    def fits_unchecked(self):
        """Output up to this size is queued for a reading peer without a look at the bound."""
        return min(FITS_UNCHECKED, self.max_output)

    def dialect_for(self, path):
        """:returns: the dialect name (or ``auto``) of a connection that upgraded on ``path``."""
        paths = self.dialect_paths
        return paths.get(path, self.dialect) if paths else self.dialect

    def replace(self, **changes):
        """:returns: these settings with ``changes``."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_options(cls, config):
        """:returns: the settings of parsed :class:`signalling.server.tap.Options`."""
        return cls(
            keepalive=config["keepalive-timeout"],
            max_message=config["max-message-size"],
            hello_timeout=config["hello-timeout"],
            trust_proxy=config["trust-proxy"],
            log_payloads=config["log-payloads"],
            close_timeout=config["close-timeout"],
            max_output=config["max-output-buffer"],
            max_meta_size=config["max-meta-size"],
            max_fragments=config["max-fragments"],
            command_rate=config["command-rate"],
            command_burst=config["command-burst"],
            dialect=config["dialect"],
            dialect_paths=config["dialect-path"],
            dialect_wait=config["dialect-wait"],
            dialect_margin=config["dialect-margin"],
            allowed_origins=config["allowed-origin"],
            reclaim_timeout=config["reclaim-timeout"],
            answer_timeout=config["answer-timeout"],
            candidate_wait=config["candidate-wait"],
            whip_wait=config["whip-wait"],
        )


#: The names of :class:`ServerSettings`' fields.
FIELDS = frozenset(f.name for f in dataclasses.fields(ServerSettings))

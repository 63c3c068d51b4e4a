"""
The WebSocket factory of one port: it holds what the port's connections
share (the registry, the clock, the counters, the settings, the handshake
policy), and gives each connection's logic that much and no more.
"""

from types import FunctionType

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.interfaces import IProtocolNegotiationFactory
from zope.interface import implementer

from signalling.server.auth import TOKEN_REVOKED
from signalling.server.limits import REFUSED
from signalling.server.metrics import Stats
from signalling.server.policy import HandshakePolicy, LateSpeakers
from signalling.server.protocol import PlainSignallingServerProtocol, SignallingServerProtocol
from signalling.server.settings import ServerSettings
from signalling.server.websocket import FastServerProtocol

#: How long the HTTP upgrade may take.
OPEN_HANDSHAKE_TIMEOUT = 10.0
#: Autobahn's timers go through txaio's batched timer, which rounds every
#: deadline down to a whole second of clock time, so a timer may fire up to
#: this much early. The pong deadline gets it added so that a pong always has
#: at least the full keepalive time.
TIMER_ROUNDING = 1.0


#: Autobahn's protocol options, which its factory holds.
_OPTIONS = frozenset(WebSocketServerProtocol.CONFIG_ATTRS)


def _as_class_attribute(value):
    """
    :returns: ``value`` to be read from a class as it is: a function (an
        option's callback, ``perMessageCompressionAccept``) as a static
        method, which a connection does not bind to itself.
    """
    return staticmethod(value) if isinstance(value, FunctionType) else value


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
    :param settings: the :class:`signalling.server.settings.ServerSettings`;
        the defaults when None.
    :param policy: the :class:`signalling.server.policy.HandshakePolicy` of
        the server (shared by its ports); one with no token, no limits and
        the settings' origins when None.
    :param stats: the :class:`signalling.server.metrics.Stats` to count into
        (shared by the factories of one server); a new one when None.
    :param web: the protocol factory (a twisted.web ``Site``) that gets every
        connection whose first request asks for no WebSocket upgrade, or
        None to refuse those with 426.
    :param count_addresses: count client addresses here, at accept (the
        factory is the port's outermost; under TLS the TLS layer counts).

    :ivar shutting_down: True once the server began to stop.
    :ivar connections: open (past the handshake) connections.
    """

    protocol = SignallingServerProtocol
    #: ``(protocol, the class built from it)``: see :meth:`_built_protocol`.
    _built = None

    def __init__(
        self,
        url,
        registry,
        clock,
        settings=None,
        policy=None,
        stats=None,
        web=None,
        count_addresses=False,
    ):
        super().__init__(url)
        settings = ServerSettings() if settings is None else settings
        if not settings.fast_path:
            self.protocol = PlainSignallingServerProtocol
        self.registry = registry
        self.clock = clock
        self.settings = settings
        self.stats = Stats(settings.dialects) if stats is None else stats
        self.policy = HandshakePolicy(settings, self.stats) if policy is None else policy
        #: Client addresses whose first message came after a welcome (auto ports).
        self.late_speakers = LateSpeakers(clock)
        self.web = web
        self.count_addresses = count_addresses
        #: Output up to this size is queued for a peer that reads without a
        #: look at the output bound (read on every relayed message).
        self.fits_unchecked = settings.fits_unchecked
        self.shutting_down = False
        self.connections = set()
        self.setProtocolOptions(
            # Plain GETs go to self.web (or get 426), never Autobahn's page.
            webStatus=False,
            # Protocol errors get a close frame (1002, 1007, 1009) rather than
            # a dropped TCP connection.
            failByDrop=False,
            utf8validateIncoming=True,
            maxMessagePayloadSize=settings.max_message,
            maxFramePayloadSize=settings.max_message,
            autoPingInterval=settings.keepalive,
            autoPingTimeout=settings.keepalive + TIMER_ROUNDING,
            openHandshakeTimeout=OPEN_HANDSHAKE_TIMEOUT,
            closeHandshakeTimeout=settings.close_timeout,
            perMessageCompressionAccept=_refuse_compression,
            trustXForwardedFor=settings.trust_proxy,
        )
        # One log line per listening port start is enough; not one per client.
        self.noisy = False

    def buildProtocol(self, addr):
        """
        A protocol for a new connection, unless its client address holds as
        many connections as it may (then None: the connection is closed).
        """
        host = None
        if self.count_addresses:
            host = self.policy.admit_address(addr)
            if host is REFUSED:
                return None
        proto = self._built_protocol()()
        proto.factory = self
        if host is not None:
            proto.counted_host = host
        return proto

    def __setattr__(self, name, value):
        # An Autobahn option set (by setProtocolOptions, or on the factory
        # itself, as logFrames is): the class of the next connection is
        # made again, with it (see _built_protocol).
        object.__setattr__(self, name, value)
        if name in _OPTIONS:
            object.__setattr__(self, "_built", None)

    def _built_protocol(self):
        """
        :returns: the class of this factory's connections: a subclass of
            ``self.protocol`` whose Autobahn options are class attributes
            with the factory's values when it is a
            :class:`FastServerProtocol` (its connections read each option
            from the factory otherwise, with a call each time; Autobahn
            copies every option onto each connection); else ``self.protocol``.
            Made again when the options or the protocol change.
        """
        protocol = self.protocol
        built = self._built
        if built is None or built[0] is not protocol:
            made = protocol
            if issubclass(protocol, FastServerProtocol):
                attributes = {name: _as_class_attribute(getattr(self, name)) for name in _OPTIONS}
                attributes["__module__"] = protocol.__module__
                attributes["__qualname__"] = protocol.__qualname__
                made = type(protocol.__name__, (protocol,), attributes)
            built = self._built = (protocol, made)
        return built[1]

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
        revoked = [
            protocol
            for protocol in self.connections
            if protocol.grant is not None and self.policy.revoked(protocol.grant)
        ]
        for protocol in revoked:
            protocol.token_ended(TOKEN_REVOKED)
        return len(revoked)

    def close_all(self):
        """Close every open connection with 1001 (going away)."""
        self.begin_shutdown()
        for protocol in list(self.connections):
            protocol.going_away()

"""
Who may connect, from where and in which dialect: the decisions of the
opening handshake, in one object that the factory holds and that both the
WebSocket side and the pages ask. The WebSocket layer only adapts Autobahn
to it.

- At accept: each client address (an IPv6 client by its prefix) holds at
  most so many connections (:class:`signalling.server.limits.ConnectionLimits`).
- At the upgrade: behind a trusted proxy, the forwarded address (an IP
  address, or 400) is counted instead (429); a token (401 without a valid
  one; 403 for a dialect it is not for); the page's origin (403); the
  server's total of WebSocket connections (503).
- The pages: the token of a plain request (TURN credentials, ``/ice-servers``).
"""

import ipaddress
from collections import OrderedDict

from signalling.core.connection import take_token
from signalling.core.dialects import AUTO
from signalling.server.auth import TokenRefused
from signalling.server.limits import REFUSED, parse_address
from signalling.server.settings import normalize_origin


class Refused(Exception):
    """
    A handshake the policy refuses.

    :ivar status: the HTTP status to answer.
    :ivar text: the reason phrase.
    """

    def __init__(self, status, text):
        super().__init__(status, text)
        self.status = status
        self.text = text


def host_name(netloc):
    """
    :returns: the host of ``host[:port]`` (a ``Host`` header, an origin's
        part after ``://``), lower case, an IPv6 literal without its brackets.
    """
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:].partition("]")[0]
    host, colon, port = netloc.rpartition(":")
    if colon and port.isdigit():
        return host
    return netloc


class ServerNames:
    """
    The host names the server knows are its own, for the origin check:
    ``localhost``, any IP literal, the ``names`` given (``--server-name``)
    and the DNS names of the TLS certificate it serves (as reloaded). A
    wildcard name, ``*.example.org``, covers one label (``a.example.org``).

    :param names: host names.
    :param server_tls: a :class:`signalling.server.tls.ServerTLS`, or None.
    """

    def __init__(self, names=(), server_tls=None):
        self._names = frozenset(n.strip().lower().rstrip(".") for n in names) | {"localhost"}
        self._tls = server_tls

    def __contains__(self, host):
        host = host.rstrip(".")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return True
        label, dot, parent = host.partition(".")
        wildcard = "*." + parent if dot and label else None
        for names in (self._names, self._tls.dns_names if self._tls is not None else ()):
            if host in names or (wildcard is not None and wildcard in names):
                return True
        return False


def origin_allowed(origin, allowed, host, own_names):
    """
    :returns: whether a handshake with this ``Origin`` may go on: one of the
        ``allowed`` origins, or the server's own: the page it serves, an
        ``http``/``https`` origin naming the host and port of the
        request's ``Host``, when that host is one of ``own_names`` (a
        :class:`ServerNames`). Any other name may reach the server through
        DNS (rebinding) and carry a page of another site.
    """
    origin = normalize_origin(origin)
    if origin in allowed:
        return True
    scheme, _, netloc = origin.partition("://")
    if scheme not in ("http", "https") or not host or netloc != host.strip().lower():
        return False
    return host_name(netloc) in own_names


#: How many client addresses :class:`LateSpeakers` keeps, and for how long (seconds).
LATE_SPEAKERS = 4096
LATE_SPEAKERS_TTL = 600.0


class LateSpeakers:
    """
    The client addresses (hosts) of connections an auto port welcomed for
    their silence and then switched to another dialect (their first message
    came late): for a while, a connection from one of them is given the
    whole ``dialect_wait`` to speak, not the margin after its pong, so that
    a client that was misjudged once (and reconnects, as the examples'
    browser page does) is not misjudged again. The oldest is forgotten past
    :data:`LATE_SPEAKERS` addresses.

    :param clock: an ``IReactorTime``.
    """

    def __init__(self, clock, capacity=LATE_SPEAKERS, ttl=LATE_SPEAKERS_TTL):
        self._clock = clock
        self._capacity = capacity
        self._ttl = ttl
        self._until = OrderedDict()

    def __len__(self):
        return len(self._until)

    def remember(self, host):
        """A connection from ``host`` spoke late."""
        until = self._until
        until.pop(host, None)
        until[host] = self._clock.seconds() + self._ttl
        while len(until) > self._capacity:
            until.popitem(last=False)

    def __contains__(self, host):
        """:returns: whether a connection from ``host`` spoke late within the last ``ttl`` seconds."""
        until = self._until
        if not until:
            return False
        expires = until.get(host)
        if expires is None:
            return False
        if expires <= self._clock.seconds():
            del until[host]
            return False
        return True


#: How many client addresses :class:`RequestRates` keeps a bucket for.
REQUEST_RATES = 4096


class _Bucket:
    __slots__ = ("_tokens", "_tokens_at", "_strikes")

    def __init__(self):
        self._tokens = None
        self._tokens_at = 0.0
        self._strikes = 0


class RequestRates:
    """
    The request rate of the HTTP dialects, per client address: an address's
    ``POST``, ``PATCH`` and ``DELETE`` requests draw on one bucket, as one
    WebSocket connection's commands do (``command_rate`` a second,
    ``command_burst`` at once: :func:`signalling.core.connection.take_token`).
    The exempt networks of the limits (a local proxy's, ``--unlimited-address``)
    draw on none, as they hold no count: requests that a proxy passes on
    without the client's address would otherwise share one bucket.
    The buckets of the :data:`REQUEST_RATES` addresses seen last are kept
    (a forgotten one starts full again).

    :param clock: an ``IReactorTime``.
    :param settings: the :class:`signalling.server.settings.ServerSettings`.
    """

    def __init__(self, clock, settings, capacity=REQUEST_RATES):
        self._clock = clock
        self._settings = settings
        self._capacity = capacity
        self._buckets = OrderedDict()

    def __len__(self):
        return len(self._buckets)

    def allows(self, key, exempt=False):
        """
        :returns: whether a request from the address ``key`` may go on now
            (always, for an ``exempt`` one: see :meth:`HandshakePolicy.client_key`).
        """
        if exempt:
            return True
        buckets = self._buckets
        bucket = buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket()
        buckets[key] = bucket
        while len(buckets) > self._capacity:
            buckets.popitem(last=False)
        return take_token(bucket, self._clock, self._settings)

    def retry_after(self):
        """:returns: whole seconds until a refused address has a token again."""
        return max(1, int(1.0 / self._settings.command_rate + 0.999))


#: What :meth:`HandshakePolicy.admit_upgrade` counted for a connection:
#: ``(forwarded address key or None, counted among the WebSocket
#: connections)``. The common answers are shared values, so that a
#: connection holds no object of its own for them.
NOTHING_COUNTED = (None, False)
WEBSOCKET_COUNTED = (None, True)


class HandshakePolicy:
    """
    The handshake decisions of one server.

    :param settings: the :class:`signalling.server.settings.ServerSettings`
        (dialects and their paths, allowed origins, proxy hops).
    :param stats: the :class:`signalling.server.metrics.Stats` refusals are
        counted in.
    :param auth: the :class:`signalling.server.auth.TokenKeys`, or None: no
        token needed.
    :param limits: the :class:`signalling.server.limits.ConnectionLimits`,
        or None: no limits.
    :param server_names: the :class:`ServerNames` whose pages are the
        server's own; None: ``localhost`` and IP literals.
    """

    def __init__(self, settings, stats, auth=None, limits=None, server_names=None):
        self.settings = settings
        self.auth = auth
        self.limits = limits
        self.server_names = ServerNames() if server_names is None else server_names
        self._stats = stats

    # At accept.

    def admit_address(self, address):
        """
        Count a new connection by its client address (a Twisted address).

        :returns: the key counted (to :meth:`release` later), None when
            nothing was counted, or :data:`signalling.server.limits.REFUSED`.
        """
        if self.limits is None:
            return None
        return self.limits.admit_address(address)

    def release(self, key):
        """A connection counted under ``key`` (at accept) ended."""
        self.limits.release(key)

    # At the upgrade.

    def forwarded_address(self, header, own_host):
        """
        The client address a trusted proxy forwarded in ``X-Forwarded-For``.
        It counts only on a connection from the proxy (an exempt network of
        the limits, or a Unix socket: ``own_host`` None; any connection when
        there are no limits), and only as an IP address.

        :param header: the header's value, or None.
        :param own_host: the host the connection comes from (its socket).
        :returns: the address (``ipaddress``), or None.
        :raises Refused: 400 for anything that is not an IP address.
        """
        hops = self.settings.trust_proxy
        if not hops or header is None:
            return None
        if self.limits is not None and own_host is not None and not self.limits.exempt(own_host):
            return None
        values = [hop.strip() for hop in header.split(",")]
        try:
            return parse_address(values[-hops:][0])
        except ValueError:
            self._stats.connection_refused("forwarded")
            raise Refused(400, "X-Forwarded-For does not name an IP address")

    def admit_upgrade(self, path, headers, token, forwarded):
        """
        Decide a WebSocket upgrade.

        :param path: the request's path.
        :param headers: its headers (lower-case names).
        :param token: its token (``?token=`` or a Bearer header), or None.
        :param forwarded: the forwarded client address, or None.
        :returns: ``(grant, admission)``: what the token allows (None
            without tokens) and what was counted (a pair, see
            :data:`WEBSOCKET_COUNTED`), to give back with :meth:`release_upgrade`.
        :raises Refused: 401, 403, 429 or 503.
        """
        settings = self.settings
        pinned = settings.dialect_for(path)
        grant = self._grant(token, None if pinned == AUTO else settings.dialects[pinned])
        self._check_origin(headers)
        limits = self.limits
        if limits is None:
            return grant, NOTHING_COUNTED
        key = None
        if forwarded is not None:
            key = limits.admit_forwarded(forwarded)
            if key is REFUSED:
                raise Refused(429, "Too many connections from your address")
        if not limits.admit_websocket():
            self.release_upgrade((key, False))
            raise Refused(503, "Server full")
        return grant, WEBSOCKET_COUNTED if key is None else (key, True)

    def _grant(self, token, dialect):
        """
        :returns: what ``token`` allows (None without tokens).
        :raises Refused: 401 without a valid token; 403 for one that is not
            for ``dialect`` (None: any).
        """
        if self.auth is None:
            return None
        try:
            grant = self.auth.check(token)
        except TokenRefused as e:
            self._stats.connection_refused("token_" + e.reason)
            raise Refused(401, "A valid token is needed")
        if dialect is not None and not dialect.token_allows(grant):
            # A valid token, for another dialect.
            self._stats.connection_refused("token_not_allowed")
            raise Refused(403, "The token does not allow this protocol")
        return grant

    def _check_origin(self, headers):
        """:raises Refused: 403 for a page whose ``Origin`` may not use the server."""
        allowed = self.settings.allowed_origins
        if allowed:
            origin = headers.get("origin")
            host = headers.get("host", "")
            if origin is not None and not origin_allowed(origin, allowed, host, self.server_names):
                self._stats.connection_refused("origin")
                raise Refused(403, "Origin not allowed")

    def origin_allowed(self, origin, host):
        """:returns: whether a page of ``origin`` may use the server (CORS), as for an upgrade."""
        allowed = self.settings.allowed_origins
        return not allowed or origin_allowed(origin, allowed, host, self.server_names)

    # The HTTP dialects' sessions.

    def client_key(self, host, forwarded):
        """
        :returns: what an HTTP request's client counts as (the forwarded
            address behind a trusted proxy, else its own host), and whether
            it is exempt from the per-address limit.
        """
        if forwarded is not None:
            key = str(forwarded)
            if self.limits is not None:
                key = self.limits.key_of(key)
            return key, False
        if host is None:
            return "unix", True
        if self.limits is None:
            return host, False
        return self.limits.key_of(host), self.limits.exempt(host)

    def admit_session(self, dialect, headers, token, key, exempt):
        """
        Decide a new session of an HTTP dialect (a WHEP or WHIP ``POST``):
        as a WebSocket upgrade is decided, and counted as one (against the
        client address and the server's total) for the session's life.

        :param dialect: the :class:`signalling.core.dialects.Dialect`.
        :param headers: the request's headers (lower-case names).
        :param token: its token, or None.
        :param key: its client's key, and whether that is ``exempt`` (see
            :meth:`client_key`).
        :returns: ``(grant, admission)``; give ``admission`` back with
            :meth:`release_upgrade`.
        :raises Refused: 401, 403, 429 or 503.
        """
        grant = self._grant(token, dialect)
        self._check_origin(headers)
        limits = self.limits
        if limits is None:
            return grant, NOTHING_COUNTED
        counted = None
        if not exempt:
            if not limits.admit(key):
                raise Refused(429, "Too many connections from your address")
            counted = key
        if not limits.admit_websocket():
            self.release_upgrade((counted, False))
            raise Refused(503, "Server full")
        return grant, (counted, True)

    def grant_of_request(self, token):
        """
        :returns: what the token of a request on an existing session allows
            (None without tokens).
        :raises Refused: 401 without a valid token.
        """
        return self._grant(token, None)

    def release_upgrade(self, admission):
        """Give back what :meth:`admit_upgrade` counted (``admission``: its pair)."""
        forwarded, websocket = admission
        if forwarded is not None:
            self.limits.release(forwarded)
        if websocket:
            self.limits.release_websocket()

    # The pages, and tokens over a connection's life.

    def grant_for(self, token):
        """
        :returns: what a plain request's token allows, or None when the
            server needs no token.
        :raises signalling.server.auth.TokenRefused: no valid token.
        """
        if self.auth is None:
            return None
        return self.auth.check(token)

    def revoked(self, grant):
        """:returns: whether the secret that signed ``grant``'s token is gone (a reload)."""
        return self.auth is not None and self.auth.revoked(grant)

"""
How many connections the server takes: per client address, counted from the
moment a TCP connection is accepted (before any TLS handshake) and refused
at once past the limit; and WebSocket connections in all, refused at the
upgrade with 503 past the limit, so that a full server still answers
``/health`` and has file descriptors left to log with.

Every connection counts from accept until it closes, whatever it carries
(a WebSocket, or plain HTTP requests for the pages). IPv4 addresses are
counted one by one, IPv6 ones by their prefix (a /64 by default: one
machine or one home network commonly holds a whole /64), and an
IPv4-mapped IPv6 address as the IPv4 address it maps.

Addresses in the exempt networks (by default the loopback addresses, where a
local reverse proxy connects from) are not counted at accept; behind a
trusted proxy (``--trust-proxy``) the address the proxy forwarded is
counted instead, at the upgrade (refused with 429), and is never exempt.
"""

import ipaddress

from twisted.logger import Logger

#: Connections one client address may hold, by default.
DEFAULT_PER_ADDRESS = 256
#: Networks not counted at accept, by default: where a local proxy connects from.
DEFAULT_EXEMPT = ("127.0.0.0/8", "::1/128")
#: IPv6 clients are counted by this prefix length, by default.
DEFAULT_IPV6_PREFIX = 64
#: What :meth:`ConnectionLimits.admit_address` answers for a refusal.
REFUSED = object()
#: Hosts whose exemption and key are remembered, at most (then forgotten at once).
_HOST_CACHE = 4096
#: File descriptors kept free below the open-file limit when the total is
#: derived from it: for health checks, metrics, logs and the listening ports.
FD_RESERVE = 100


class ConnectionLimits:
    """
    The connection counts of one server, shared by all its public ports.

    Counts are kept by key (:meth:`key_of`): an IPv4 address, or the
    network of an IPv6 one (``2001:db8:0:1::/64``).

    :param per_address: most connections one client address may hold.
    :param total: most open WebSocket connections.
    :param exempt: networks (strings) whose connections are not counted at
        accept.
    :param stats: a :class:`signalling.server.metrics.Stats` for the
        refusals, or None.
    :param ipv6_prefix: the prefix length IPv6 addresses are counted by
        (128: each address alone).
    """

    _log = Logger()

    def __init__(
        self, per_address, total, exempt=DEFAULT_EXEMPT, stats=None, ipv6_prefix=DEFAULT_IPV6_PREFIX
    ):
        self.per_address = per_address
        self.total = total
        self.ipv6_prefix = ipv6_prefix
        self._exempt = [ipaddress.ip_network(n, strict=False) for n in exempt]
        self._stats = stats
        #: ``host: (exempt, key)``, remembered: most connections come from
        #: hosts seen before (a local proxy, returning clients).
        self._hosts = {}
        self._open = {}
        #: Open WebSocket connections (past the upgrade), on every port.
        self.websockets = 0

    def exempt(self, host):
        """:returns: whether ``host`` is in an exempt network."""
        return self._known(host)[0]

    def key_of(self, host):
        """
        :returns: what ``host`` is counted as: an IPv4 address (an
            IPv4-mapped IPv6 one too), the ``/ipv6_prefix`` network of an
            IPv6 address, or ``host`` itself when it is not an address.
        """
        return self._known(host)[1]

    def _known(self, host):
        known = self._hosts.get(host)
        if known is None:
            if len(self._hosts) >= _HOST_CACHE:
                self._hosts.clear()
            known = self._hosts[host] = self._look_up(host)
        return known

    def _look_up(self, host):
        try:
            address = parse_address(host)
        except ValueError:
            return False, host
        exempt = any(address in network for network in self._exempt)
        if address.version == 6 and self.ipv6_prefix < 128:
            network = ipaddress.IPv6Network((address, self.ipv6_prefix), strict=False)
            return exempt, str(network)
        return exempt, str(address)

    def admit_address(self, address):
        """
        Count a new connection by its client address, unless that address is
        exempt (or has no host: a Unix socket).

        :param address: the Twisted address the connection comes from.
        :returns: the key counted (to :meth:`release` later), None when
            nothing was counted, or :data:`REFUSED` when the address holds
            as many connections as it may.
        """
        host = host_of(address)
        if host is None:
            return None
        exempt, key = self._known(host)
        if exempt:
            return None
        return key if self.admit(key) else REFUSED

    def admit_forwarded(self, address):
        """
        Count a connection by the client address a trusted proxy forwarded
        (never exempt: the exempt networks are the proxy's own).

        :param address: an ``ipaddress`` address (see :func:`parse_address`).
        :returns: the key counted (to :meth:`release` later), or
            :data:`REFUSED`.
        """
        key = self.key_of(str(address))
        return key if self.admit(key) else REFUSED

    def admit(self, key):
        """
        Count a connection under ``key`` (see :meth:`key_of`).

        :returns: True if it may stay; False (nothing counted) when the
            address holds as many as it may.
        """
        count = self._open.get(key, 0)
        if count >= self.per_address:
            self._refused("per_address", key)
            return False
        self._open[key] = count + 1
        return True

    def release(self, key):
        """A connection counted by :meth:`admit` ended."""
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)

    def admit_websocket(self):
        """
        Count an upgrade to a WebSocket connection.

        :returns: True, or False (nothing counted) when the server holds
            as many as it may.
        """
        if self.websockets >= self.total:
            self._refused("total", None)
            return False
        self.websockets += 1
        return True

    def release_websocket(self):
        self.websockets -= 1

    def _refused(self, reason, host):
        if self._stats is not None:
            self._stats.connection_refused(reason)


def host_of(address):
    """:returns: the host of a Twisted address, or None (a Unix socket)."""
    return getattr(address, "host", None)


def parse_address(text):
    """
    :returns: the IP address ``text`` spells, as an ``ipaddress`` object, an
        IPv4-mapped IPv6 address (``::ffff:192.0.2.1``) as the IPv4 address
        it maps; IPv6 in its one normal spelling, without a zone.
    :raises ValueError: when ``text`` is not an IP address.
    """
    address = ipaddress.ip_address(text.strip())
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:
            address = ipaddress.IPv6Address(address.packed)
    return address

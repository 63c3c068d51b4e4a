"""
How many connections the server takes: per client address, counted from the
moment a TCP connection is accepted (before any TLS handshake) and refused
at once past the limit; and WebSocket connections in all, refused at the
upgrade with 503 past the limit, so that a full server still answers
``/health`` and has file descriptors left to log with.

Addresses in the exempt networks (by default the loopback addresses, where a
local reverse proxy connects from) are not counted at accept; behind a
trusted proxy (``--trust-proxy``) the address the proxy forwarded is
counted instead, at the upgrade (refused with 429).
"""

import ipaddress

from twisted.logger import Logger

#: Connections one client address may hold, by default.
DEFAULT_PER_ADDRESS = 256
#: Networks not counted at accept, by default: where a local proxy connects from.
DEFAULT_EXEMPT = ("127.0.0.0/8", "::1/128")
#: What :meth:`ConnectionLimits.admit_address` answers for a refusal.
REFUSED = object()
#: Hosts whose exemption is remembered, at most (then forgotten at once).
_EXEMPT_CACHE = 4096
#: File descriptors kept free below the open-file limit when the total is
#: derived from it: for health checks, metrics, logs and the listening ports.
FD_RESERVE = 100


class ConnectionLimits:
    """
    The connection counts of one server, shared by all its public ports.

    :param per_address: most connections one client address may hold.
    :param total: most open WebSocket connections.
    :param exempt: networks (strings) whose connections are not counted at
        accept.
    :param stats: a :class:`signalling.server.metrics.Stats` for the
        refusals, or None.
    """

    _log = Logger()

    def __init__(self, per_address, total, exempt=DEFAULT_EXEMPT, stats=None):
        self.per_address = per_address
        self.total = total
        self._exempt = [ipaddress.ip_network(n, strict=False) for n in exempt]
        self._stats = stats
        #: Whether a host is exempt, remembered: most connections come from
        #: hosts seen before (a local proxy, returning clients).
        self._exempt_hosts = {}
        self._open = {}
        #: Open WebSocket connections (past the upgrade), on every port.
        self.websockets = 0

    def exempt(self, host):
        """:returns: whether ``host`` is in an exempt network."""
        known = self._exempt_hosts.get(host)
        if known is None:
            if len(self._exempt_hosts) >= _EXEMPT_CACHE:
                self._exempt_hosts.clear()
            known = self._exempt_hosts[host] = self._look_up(host)
        return known

    def _look_up(self, host):
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._exempt)

    def admit_address(self, address):
        """
        Count a new connection by its client address, unless that address is
        exempt (or has no host: a Unix socket).

        :param address: the Twisted address the connection comes from.
        :returns: the host counted (to :meth:`release` later), None when
            nothing was counted, or :data:`REFUSED` when the address holds
            as many connections as it may.
        """
        host = host_of(address)
        if host is None or self.exempt(host):
            return None
        return host if self.admit(host) else REFUSED

    def admit(self, host):
        """
        Count a connection from ``host``.

        :returns: True if it may stay; False (nothing counted) when the
            address holds as many as it may.
        """
        count = self._open.get(host, 0)
        if count >= self.per_address:
            self._refused("per_address", host)
            return False
        self._open[host] = count + 1
        return True

    def release(self, host):
        """A connection counted by :meth:`admit` ended."""
        count = self._open.get(host, 0) - 1
        if count > 0:
            self._open[host] = count
        else:
            self._open.pop(host, None)

    def open_from(self, host):
        """:returns: how many connections ``host`` holds."""
        return self._open.get(host, 0)

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

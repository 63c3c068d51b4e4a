"""
A node's two connections to Redis, with txredisapi (a Twisted-native Redis
client: its commands are Deferreds on the server's own reactor, and it
parses replies with no thread and no second event loop).

One connection carries every command (the scripts of
:mod:`signalling.cluster.scripts`) and every relayed message, in order, so
that what a peer causes reaches other nodes in the order it was caused; the
other is subscribed to this node's channel. Each is a
``twisted.application.internet.ClientService``: it reconnects on its own,
with a capped back-off, whenever Redis goes away. The store reports to the
node when both are ready (:meth:`ClusterRegistry.store_up`) and when either
is lost (:meth:`ClusterRegistry.store_down`).
"""

import copy
import socket
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, endpoints, protocol, ssl
from twisted.logger import Logger

from signalling.cluster import scripts


_BACKOFF = backoffPolicy(initialDelay=0.1, maxDelay=2.0, factor=2.0, jitter=lambda: 0)


class RedisURLError(ValueError):
    """A ``--redis`` URL that cannot be used."""


class RedisAddress:
    """Where Redis is: from ``redis://[[user]:password@]host[:port][/db]`` or ``rediss://``."""

    def __init__(self, url, password=None, ca_pem=None):
        self.ca_pem = ca_pem
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise RedisURLError(f"{url!r}: the URL must start with redis:// or rediss://")
        if not parts.hostname:
            raise RedisURLError(f"{url!r}: no host")
        self.tls = parts.scheme == "rediss"
        self.host = parts.hostname
        try:
            self.port = parts.port or 6379
        except ValueError:
            raise RedisURLError(f"{url!r}: the port is not a number") from None
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise RedisURLError(f"{url!r}: the database must be a number")
        self.db = int(path) if path else 0
        self.username = unquote(parts.username) if parts.username else None
        self.password = password if password is not None else (
            unquote(parts.password) if parts.password else None
        )

    def with_secrets(self, password=None, ca_pem=None):
        """
        :returns: this address with a password (one given overrides the
            URL's) and the PEM certificates to trust, without parsing the
            URL again.
        """
        address = copy.copy(self)
        if password is not None:
            address.password = password
        address.ca_pem = ca_pem
        return address

    def endpoint(self, reactor):
        tcp = endpoints.HostnameEndpoint(reactor, self.host, self.port, timeout=5)
        if not self.tls:
            return tcp
        trust = None
        if self.ca_pem is not None:
            trust = ssl.trustRootFromCertificates(
                [ssl.Certificate.loadPEM(pem) for pem in _pems(self.ca_pem)]
            )
        return endpoints.wrapClientTLS(ssl.optionsForClientTLS(self.host, trustRoot=trust), tcp)

    def __str__(self):
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


def _pems(data):
    """:returns: each PEM certificate in ``data`` (bytes)."""
    end = b"-----END CERTIFICATE-----"
    return [part + end for part in data.split(end) if b"-----BEGIN CERTIFICATE-----" in part]


#: TCP keepalive of the connections to Redis: first probe after 5 s of
#: silence, then every 2 s, dead after 3 unanswered (about 11 s): found by
#: the kernel, however busy the process is.
KEEPALIVE = (5, 2, 3)


def _keep_alive(transport):
    """Turn TCP keepalive on for ``transport``'s socket (under TLS, the TCP one's)."""
    handle = getattr(transport, "getHandle", lambda: None)()
    if handle is not None and not hasattr(handle, "setsockopt"):
        handle = getattr(getattr(transport, "transport", None), "getHandle", lambda: None)()
    if handle is None or not hasattr(handle, "setsockopt"):
        return
    idle, interval, count = KEEPALIVE
    try:
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    except (OSError, AttributeError):
        pass


class _Commands(txredisapi.RedisProtocol):
    def connectionMade(self):
        txredisapi.RedisProtocol.connectionMade(self)
        _keep_alive(self.transport)
        self.factory.prepare(self)

    def connectionLost(self, why):
        txredisapi.RedisProtocol.connectionLost(self, why)
        self.factory.store._lost(self)


class _Subscriber(txredisapi.SubscriberProtocol):
    def connectionMade(self):
        txredisapi.SubscriberProtocol.connectionMade(self)
        _keep_alive(self.transport)
        self.factory.prepare(self)

    def messageReceived(self, pattern, channel, message):
        self.factory.store.delivered(message)

    def connectionLost(self, why):
        txredisapi.SubscriberProtocol.connectionLost(self, why)
        self.factory.store._lost(self)


class _Factory(protocol.Factory):
    noisy = False

    def __init__(self, store, protocol_class, reply_timeout, prepare):
        self.store = store
        self.protocol_class = protocol_class
        self.reply_timeout = reply_timeout
        #: Called with each new connection: log in, and get it ready.
        self.prepare = prepare

    def buildProtocol(self, addr):
        p = self.protocol_class(charset=None, replyTimeout=self.reply_timeout, convertNumbers=False)
        p.factory = self
        return p


class RedisStore(service.Service):
    """
    The store of a :class:`signalling.cluster.backend.ClusterRegistry` on a
    real Redis.

    :param reactor: the reactor.
    :param address: a :class:`RedisAddress`.
    :param reply_timeout: seconds to wait for a reply before the connection
        counts as lost, or None (the default): a node that is itself far
        behind (closing thousands of connections at once) reads replies
        late though Redis answered at once, and must not take that for an
        outage. A Redis that is gone for good is found by TCP keepalives
        (:data:`KEEPALIVE`), one that restarts by its closed connection.
    """

    _log = Logger()

    def __init__(self, reactor, address, reply_timeout=None):
        self._reactor = reactor
        self._address = address
        self._reply_timeout = reply_timeout
        self._backend = None
        self._shas = {}
        self._commands = None
        self._subscriber = None
        self._services = []
        self._was_up = False
        #: Connections in a row that were lost or rejected before they were ready.
        self._failures = 0

    def attach(self, backend):
        """Serve ``backend`` (a :class:`ClusterRegistry`)."""
        self._backend = backend
        #: Called with every message of the node's channel: the node's
        #: reader itself, with no call in between on the relay path.
        self.delivered = backend.delivered

    @property
    def channel(self):
        return scripts.PREFIX + "n:" + self._backend.node

    def startService(self):
        service.Service.startService(self)
        for protocol_class, prepare in (
            (_Commands, self._prepare_commands),
            (_Subscriber, self._prepare_subscriber),
        ):
            # Connections are got ready by the protocol itself rather than by
            # ClientService's prepareConnection, which leaves a connection it
            # rejects open and cannot take its loss. So ClientService counts
            # every connection as made; the delay follows our own count of
            # connections lost before they were ready.
            client = ClientService(
                self._address.endpoint(self._reactor),
                _Factory(self, protocol_class, self._reply_timeout, prepare),
                retryPolicy=self._retry_delay,
            )
            client.startService()
            self._services.append(client)
        self._backend.start()

    def stopService(self):
        service.Service.stopService(self)
        self._backend.stop()
        services, self._services = self._services, []
        return defer.DeferredList([s.stopService() for s in services])

    def _retry_delay(self, attempt):
        """Seconds before the next attempt: 0.1 s, doubled per failure in a row, at most 2 s."""
        return _BACKOFF(max(attempt, self._failures))

    @defer.inlineCallbacks
    def _login(self, p):
        if self._address.password is not None:
            args = ["AUTH"]
            if self._address.username:
                args.append(self._address.username)
            yield p.execute_command(*args, self._address.password)
        if self._address.db:
            yield p.execute_command("SELECT", self._address.db)

    @defer.inlineCallbacks
    def _prepare_commands(self, p):
        try:
            yield self._login(p)
            shas = {}
            for name in scripts.SCRIPTS:
                sha = yield p.execute_command("SCRIPT", "LOAD", scripts.source(name))
                shas[name] = sha
        except Exception as e:
            self._rejected(p, e)
            return
        self._shas = shas
        self._commands = p
        self._ready()

    @defer.inlineCallbacks
    def _prepare_subscriber(self, p):
        try:
            yield self._login(p)
            yield p.subscribe(self.channel)
        except Exception as e:
            self._rejected(p, e)
            return
        self._subscriber = p
        self._ready()

    def _rejected(self, p, error):
        """A connection could not be got ready (a wrong password, say): close it, try later."""
        self._failures += 1
        self._log.warn("Redis at {address}: {error}", address=str(self._address), error=str(error))
        if p.transport is not None:
            p.transport.loseConnection()

    def _ready(self):
        if self._commands is not None and self._subscriber is not None:
            self._failures = 0
            self._log.info("cluster node {node} reached Redis at {address}", node=self._backend.node, address=str(self._address))
            self._was_up = True
            self._backend.store_up()

    def _lost(self, p):
        if p is not self._commands and p is not self._subscriber:
            self._failures += 1
        if p is self._commands:
            self._commands = None
        elif p is self._subscriber:
            self._subscriber = None
        else:
            return
        if not self.running:
            return  # stopping: the connections were closed on purpose
        if self._was_up:
            self._was_up = False
            self._log.warn(
                "cluster node {node} lost Redis at {address}",
                node=self._backend.node,
                address=str(self._address),
            )
        self._backend.store_down()

    # What the backend asks for.

    def call(self, name, *args):
        """Run script ``name``; a Deferred of its answer."""
        p = self._commands
        if p is None:
            return defer.fail(ConnectionError("Redis is not reachable"))
        try:
            d = p.execute_command("EVALSHA", self._shas[name], 0, *args)
        except Exception:
            return defer.fail()
        d.addErrback(self._failed, name)
        return d

    def _failed(self, failure, name):
        if failure.check(txredisapi.ResponseError):
            self._log.error(
                "cluster script {name} failed: {error}", name=name, error=failure.getErrorMessage()
            )
        return failure

    def flush(self):
        """
        :returns: a Deferred fired once Redis answered everything sent
            before, and this node left the cluster (a clean stop).
        """
        p = self._commands
        if p is None:
            return defer.succeed(None)
        d = self.call("leave", self._backend.node)
        d.addErrback(lambda f: None)
        return d

    def publish(self, node, payload):
        """Send ``payload`` to ``node``'s channel, after every command sent before."""
        p = self._commands
        if p is None:
            return
        try:
            d = p.execute_command("PUBLISH", scripts.PREFIX + "n:" + node, payload)
        except Exception:
            return
        d.addErrback(lambda f: None)

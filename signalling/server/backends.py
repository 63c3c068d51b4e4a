"""
The backend, chosen and built in one place: the in-memory registry of
:mod:`signalling.core.registry`, or with ``--redis`` a node of the cluster
(:class:`signalling.cluster.backend.ClusterRegistry` on a
:class:`signalling.cluster.redis.RedisStore`). The server receives a
registry and, for a backend that runs (connects, heartbeats), a service to
put in its tree; it never asks which backend it has.
"""

from twisted.application.service import Service

from signalling.cluster.backend import ClusterRegistry
from signalling.cluster.redis import RedisStore
from signalling.core.registry import Registry


class StoreService(Service):
    """
    A cluster node's store as a child of the service tree: it starts the
    store, and on stop lets the other nodes hear of every peer that left
    (:meth:`RedisStore.flush`) before it lets go of Redis. Its parent stops
    it once every connection has closed.

    :ivar store: the :class:`signalling.cluster.redis.RedisStore`.
    """

    def __init__(self, store):
        self.store = store

    def startService(self):
        super().startService()
        if not self.store.running:
            self.store.startService()

    def stopService(self):
        super().stopService()
        if not self.store.running:
            return None
        d = self.store.flush()
        d.addBoth(lambda _: self.store.stopService())
        return d


def _option_file(config, option):
    """
    :returns: the bytes of the file an option names.
    :raises SystemExit: with one line for the operator if it cannot be read.
    """
    try:
        with open(config[option], "rb") as f:
            return f.read()
    except OSError as e:
        raise SystemExit(f"signalling: --{option}: {e.strerror}: {e.filename}")


def _redis_address(config):
    """:returns: ``--redis``'s address (parsed by the options) with its password and CA files read."""
    password = None
    if config["redis-password-file"] is not None:
        lines = _option_file(config, "redis-password-file").decode("utf-8").splitlines()
        password = lines[0].strip() if lines else ""
    ca_pem = None
    if config["redis-ca-file"] is not None:
        ca_pem = _option_file(config, "redis-ca-file")
    return config["redis-address"].with_secrets(password, ca_pem)


def build_backend(config, reactor):
    """
    Choose and build the backend of parsed
    :class:`signalling.server.tap.Options`.

    :param reactor: the reactor the cluster node connects and keeps time on.
    :returns: ``(registry, service)``: the registry the connections use, and
        the ``IService`` that runs it (started before the ports listen,
        stopped after the last connection closed), or None for the
        in-memory registry, which needs none.
    :raises SystemExit: with one line when a Redis option's file cannot be read.
    """
    limits = dict(max_room_members=config["max-room-members"], max_rooms=config["max-rooms"])
    if config["redis-address"] is None:
        return Registry(**limits), None
    store = RedisStore(reactor, _redis_address(config))
    registry = ClusterRegistry(
        store,
        reactor,
        heartbeat=min(1.0, config["node-timeout"] / 3),
        ttl=config["node-timeout"],
        **limits,
    )
    store.attach(registry)
    return registry, StoreService(store)

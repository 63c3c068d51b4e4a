"""
Counters kept by the server, and their Prometheus exposition.

The counters are plain integers on a :class:`Stats` object (the relay path
adds to them with one attribute increment, no locks, no labels lookups); a
collector turns them into Prometheus metric families when scraped, together
with gauges read from the registry and the listening factories.
"""

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.twisted import MetricsResource
from twisted.web.resource import Resource

from signalling.core.dialects import DIALECTS


class Stats:
    """
    What happened since start-up: monotonic counters.

    :param dialects: the :class:`signalling.core.dialects.DialectTable`
        whose relay counters (``relay_kinds``) it keeps.
    """

    def __init__(self, dialects=DIALECTS):
        for dialect in dialects:
            for _, messages, payload_bytes in dialect.relay_kinds:
                setattr(self, messages, 0)
                setattr(self, payload_bytes, 0)
        self.sessions_started = 0
        self.keepalive_timeouts = 0
        #: Times free heap was given back to the system, and how much.
        self.memory_trims = 0
        self.memory_trimmed_bytes = 0
        self.tls_handshake_failures = 0
        #: ERROR lines sent, by kind (a fixed vocabulary, never a uid).
        self.errors = {}
        #: refused first messages, by close reason kind.
        self.hello_rejections = {}
        #: connections refused by the limits, by reason (per_address, total).
        self.connections_refused = {}
        #: connections closed because of their token (expired, revoked).
        self.token_closes = {}
        #: connections welcomed for their silence on an auto port whose
        #: first message then switched them, by the dialect they switched to.
        self.dialect_switches = {}
        #: Responses of the HTTP dialects, by ``(dialect, status)``; their
        #: open sessions, by dialect.
        self.http_responses = {}
        self.http_sessions = {}

    def error_sent(self, kind):
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def connection_refused(self, reason):
        self.connections_refused[reason] = self.connections_refused.get(reason, 0) + 1

    def token_closed(self, reason):
        self.token_closes[reason] = self.token_closes.get(reason, 0) + 1

    def dialect_switched(self, dialect):
        self.dialect_switches[dialect] = self.dialect_switches.get(dialect, 0) + 1

    def http_response(self, dialect, status):
        key = (dialect, str(status))
        self.http_responses[key] = self.http_responses.get(key, 0) + 1

    def http_session_opened(self, dialect):
        self.http_sessions[dialect] = self.http_sessions.get(dialect, 0) + 1

    def http_session_closed(self, dialect):
        self.http_sessions[dialect] -= 1

    def hello_rejected(self, kind):
        self.hello_rejections[kind] = self.hello_rejections.get(kind, 0) + 1


class SignallingCollector:
    """
    A Prometheus collector for one server.

    :param stats: the :class:`Stats`.
    :param registry: the signalling registry (peer, session, room counts).
    :param endpoints: ``[(label, factory)]`` of the WebSocket factories, one
        per listening port.
    :param dialects: the :class:`signalling.core.dialects.DialectTable` the
        server speaks: the ``dialect`` label of each registry part's counts.
    """

    def __init__(self, stats, registry, endpoints, dialects):
        self._stats = stats
        self._registry = registry
        self._endpoints = endpoints
        self._labels = {}
        self._relay_kinds = [kind for dialect in dialects for kind in dialect.relay_kinds]
        self._http_labels = [dialect.label for dialect in dialects.http]
        for dialect in dialects:
            if dialect.owns_part:
                self._labels[dialect.registry_part] = dialect.label

    def collect(self):
        stats, registry = self._stats, self._registry
        connections = GaugeMetricFamily(
            "signalling_connections",
            "Open WebSocket connections, by listening endpoint.",
            labels=["endpoint"],
        )
        for label, factory in self._endpoints:
            connections.add_metric([label], factory.getConnectionCount())
        yield connections
        peers = GaugeMetricFamily(
            "signalling_peers", "Registered peers, by dialect.", labels=["dialect"]
        )
        sessions = GaugeMetricFamily(
            "signalling_sessions", "Sessions in progress, by dialect.", labels=["dialect"]
        )
        for part, (peer_count, session_count) in registry.counts_by_part().items():
            label = self._labels.get(part)
            if label is not None:
                peers.add_metric([label], peer_count)
                sessions.add_metric([label], session_count)
        yield peers
        yield sessions
        yield GaugeMetricFamily(
            "signalling_rooms", "Rooms with at least one member.", value=registry.room_count
        )
        yield GaugeMetricFamily(
            "signalling_room_members",
            "Peers in a room.",
            value=registry.room_member_count,
        )
        messages = CounterMetricFamily(
            "signalling_relayed_messages",
            "Messages relayed between peers, by kind.",
            labels=["kind"],
        )
        relayed_bytes = CounterMetricFamily(
            "signalling_relayed_bytes",
            "Payload bytes relayed between peers, by kind.",
            labels=["kind"],
        )
        for kind, count, payload_bytes in self._relay_kinds:
            messages.add_metric([kind], getattr(stats, count))
            relayed_bytes.add_metric([kind], getattr(stats, payload_bytes))
        yield messages
        yield relayed_bytes
        yield CounterMetricFamily(
            "signalling_sessions_started",
            "Sessions set up (SESSION answered SESSION_OK).",
            value=stats.sessions_started,
        )
        yield _by_reason(
            "signalling_errors_sent", "ERROR lines sent, by reason.", stats.errors
        )
        yield _by_reason(
            "signalling_hello_rejections",
            "Connections refused at their first message, by reason.",
            stats.hello_rejections,
        )
        yield _by_reason(
            "signalling_connections_refused",
            "Connections refused by the connection limits, by reason "
            "(per_address: at accept; total: at the WebSocket upgrade).",
            stats.connections_refused,
        )
        yield _by_reason(
            "signalling_token_closes",
            "Connections closed (4001) because of their token, by reason "
            "(expired; revoked: its secret was removed and reloaded).",
            stats.token_closes,
        )
        switches = CounterMetricFamily(
            "signalling_dialect_switches",
            "Connections on an auto port welcomed as JSON clients for their "
            "silence whose first message, coming later, switched them to "
            "another dialect, by that dialect (each had one stray line).",
            labels=["dialect"],
        )
        for dialect, count in sorted(stats.dialect_switches.items()):
            switches.add_metric([dialect], count)
        yield switches
        responses = CounterMetricFamily(
            "signalling_http_responses",
            "Responses of the HTTP dialects (WHEP, WHIP), by dialect and status.",
            labels=["dialect", "status"],
        )
        for (dialect, status), count in sorted(stats.http_responses.items()):
            responses.add_metric([dialect, status], count)
        yield responses
        http_sessions = GaugeMetricFamily(
            "signalling_http_sessions",
            "Open sessions of the HTTP dialects (WHEP viewers, WHIP streams), by dialect.",
            labels=["dialect"],
        )
        for dialect in self._http_labels:
            http_sessions.add_metric([dialect], stats.http_sessions.get(dialect, 0))
        yield http_sessions
        yield CounterMetricFamily(
            "signalling_keepalive_timeouts",
            "Connections dropped because a pong did not come back in time.",
            value=stats.keepalive_timeouts,
        )
        yield CounterMetricFamily(
            "signalling_memory_trims",
            "Times the C allocator's free heap was given back to the system "
            "(--trim-interval).",
            value=stats.memory_trims,
        )
        yield CounterMetricFamily(
            "signalling_memory_trimmed_bytes",
            "Bytes of free heap given back to the system.",
            value=stats.memory_trimmed_bytes,
        )
        yield CounterMetricFamily(
            "signalling_tls_handshake_failures",
            "TLS connections that closed before their handshake completed.",
            value=stats.tls_handshake_failures,
        )
        if registry.spans_processes:
            # A cluster node (--redis).
            yield GaugeMetricFamily(
                "signalling_cluster_up",
                "1 while this node reaches Redis and serves, 0 during an outage.",
                value=1 if registry.up else 0,
            )
            yield CounterMetricFamily(
                "signalling_cluster_outages",
                "Times this node lost Redis.",
                value=registry.outages,
            )
            yield CounterMetricFamily(
                "signalling_cluster_resyncs",
                "Times this node made Redis agree with the peers it holds "
                "(at start-up and after each outage).",
                value=registry.resyncs,
            )
            yield CounterMetricFamily(
                "signalling_cluster_nodes_released",
                "Dead nodes whose peers this node released.",
                value=registry.nodes_released,
            )


def metrics_resource(collector, process=True):
    """
    :param collector: a :class:`SignallingCollector`.
    :param process: also export the process's CPU, memory and file descriptors.
    :returns: a twisted.web resource tree answering ``/metrics`` (and ``/``).
    """
    prometheus = CollectorRegistry(auto_describe=True)
    prometheus.register(collector)
    if process:
        ProcessCollector(registry=prometheus)
    metrics = MetricsResource(registry=prometheus)
    root = Resource()
    root.putChild(b"metrics", metrics)
    root.putChild(b"", metrics)
    return root


def _by_reason(name, documentation, counts):
    """:returns: a counter of ``name`` with one sample per reason in ``counts``."""
    family = CounterMetricFamily(name, documentation, labels=["reason"])
    for reason, count in sorted(counts.items()):
        family.add_metric([reason], count)
    return family

"""
Turning results into numbers a reader can use: percentiles, the bottleneck
verdict, readable tables, and the comparison of two servers.
"""

import statistics
from array import array

#: CPU use (percent of one core) from which a process counts as saturated.
SATURATED = 85.0

#: Metrics only meaningful in the first round, on a server started just
#: before: later rounds reuse memory that earlier scenarios freed.
FIRST_ROUND_ONLY = {"rss_per_peer_bytes", "rss_settled_per_peer_bytes", "redis_rss_per_peer_bytes"}

#: The metrics compared between two servers, per scenario:
#: ``(key, label, higher_is_better)``.
METRICS = {
    "relay": [
        ("messages_per_s", "relayed messages/s", True),
        ("rtt_p50_ms", "round trip p50 (ms)", False),
        ("rtt_p99_ms", "round trip p99 (ms)", False),
        ("rtt_max_ms", "round trip max (ms)", False),
    ],
    "setup": [
        ("calls_per_s", "calls/s", True),
        ("setup_p50_ms", "set-up p50 (ms)", False),
        ("setup_p99_ms", "set-up p99 (ms)", False),
    ],
    "idle": [
        ("hellos_per_s", "HELLOs/s in the storm", True),
        ("storm_seconds", "storm (s)", False),
        ("rss_per_peer_bytes", "RSS per idle peer (bytes, round 1)", False),
        ("rss_settled_per_peer_bytes", "RSS per idle peer, settled (bytes, round 1)", False),
    ],
    "rooms": [
        ("total_seconds", "room storm (s)", False),
        ("join_seconds", "joins (s)", False),
    ],
    "soak": [
        ("cycles_per_s", "churn cycles/s", True),
        ("rss_end_kb", "RSS at the end (KiB)", False),
    ],
    "whep-setup": [
        ("setups_per_s", "WHEP set-ups/s", True),
        ("setup_p50_ms", "connect to 201 p50 (ms)", False),
        ("setup_p99_ms", "connect to 201 p99 (ms)", False),
        ("server_cpu_ms_per_setup", "server CPU per set-up (ms)", False),
    ],
    "json-consumer-setup": [
        ("setups_per_s", "JSON consumer set-ups/s", True),
        ("setup_p50_ms", "connect to answer p50 (ms)", False),
        ("setup_p99_ms", "connect to answer p99 (ms)", False),
        ("server_cpu_ms_per_setup", "server CPU per set-up (ms)", False),
    ],
    "whep-latency": [
        ("json_p50_ms", "JSON consumer, connect to answer p50 (ms)", False),
        ("whep_p50_ms", "WHEP viewer, connect to 201 p50 (ms)", False),
        ("added_p50_ms", "WHEP minus JSON, median over pairs (ms)", False),
        ("ratio_p50", "WHEP p50 / JSON p50", False),
    ],
}

#: More metrics compared when either server has several nodes.
CLUSTER_METRICS = {
    "relay": [
        ("cross_share", "share of round trips across nodes", None),
        ("rtt_same_p50_ms", "same-node round trip p50 (ms)", False),
        ("rtt_same_p99_ms", "same-node round trip p99 (ms)", False),
        ("rtt_cross_p50_ms", "cross-node round trip p50 (ms)", False),
        ("rtt_cross_p99_ms", "cross-node round trip p99 (ms)", False),
    ],
    "setup": [
        ("cross_share", "share of calls across nodes", None),
        ("setup_same_p50_ms", "same-node set-up p50 (ms)", False),
        ("setup_same_p99_ms", "same-node set-up p99 (ms)", False),
        ("setup_cross_p50_ms", "cross-node set-up p50 (ms)", False),
        ("setup_cross_p99_ms", "cross-node set-up p99 (ms)", False),
    ],
    "idle": [
        ("redis_rss_per_peer_bytes", "Redis RSS per idle peer (bytes, round 1)", False),
    ],
}

#: The columns of each scenario's table: ``(header, key, format)``.
COLUMNS = {
    "relay": [
        ("pairs", "pairs", "{}"),
        ("in flight", "inflight", "{}"),
        ("msg/s", "messages_per_s", "{:,.0f}"),
        ("p50 ms", "rtt_p50_ms", "{:.2f}"),
        ("p99 ms", "rtt_p99_ms", "{:.2f}"),
        ("max ms", "rtt_max_ms", "{:.1f}"),
        ("errors", "errors", "{}"),
    ],
    "setup": [
        ("calls/s", "calls_per_s", "{:,.1f}"),
        ("calls", "calls", "{}"),
        ("p50 ms", "setup_p50_ms", "{:.1f}"),
        ("p99 ms", "setup_p99_ms", "{:.1f}"),
        ("failed", "failures", "{}"),
    ],
    "idle": [
        ("HELLO/s", "hellos_per_s", "{:,.0f}"),
        ("storm s", "storm_seconds", "{:.2f}"),
        ("registered", "registered", "{}"),
        ("answered", "answered", "{}"),
        ("answers s", "answer_seconds", "{:.2f}"),
        ("RSS/peer B", "rss_per_peer_bytes", "{:,.0f}"),
        ("settled B", "rss_settled_per_peer_bytes", "{:,.0f}"),
        ("RSS KiB", "rss_after_kb", "{:,}"),
    ],
    "soak": [
        ("cycles", "cycles", "{:,}"),
        ("cycles/s", "cycles_per_s", "{:,.1f}"),
        ("failed", "failures", "{}"),
        ("RSS start KiB", "rss_start_kb", "{:,}"),
        ("RSS max KiB", "rss_max_kb", "{:,}"),
        ("RSS end KiB", "rss_end_kb", "{:,}"),
    ],
    "whep-setup": [
        ("set-ups/s", "setups_per_s", "{:,.1f}"),
        ("set-ups", "setups", "{}"),
        ("p50 ms", "setup_p50_ms", "{:.2f}"),
        ("p99 ms", "setup_p99_ms", "{:.2f}"),
        ("POST p50", "post_p50_ms", "{:.2f}"),
        ("failed", "failures", "{}"),
        ("producers' sessions", "producer_sessions", "{}"),
        ("ended", "producer_ended", "{}"),
        ("server ms/set-up", "server_cpu_ms_per_setup", "{:.2f}"),
    ],
    "json-consumer-setup": [
        ("set-ups/s", "setups_per_s", "{:,.1f}"),
        ("set-ups", "setups", "{}"),
        ("p50 ms", "setup_p50_ms", "{:.2f}"),
        ("p99 ms", "setup_p99_ms", "{:.2f}"),
        ("start-answer p50", "post_p50_ms", "{:.2f}"),
        ("failed", "failures", "{}"),
        ("producers' sessions", "producer_sessions", "{}"),
        ("ended", "producer_ended", "{}"),
        ("server ms/set-up", "server_cpu_ms_per_setup", "{:.2f}"),
    ],
    "whep-latency": [
        ("pairs", "pairs", "{}"),
        ("JSON p50", "json_p50_ms", "{:.2f}"),
        ("JSON p99", "json_p99_ms", "{:.2f}"),
        ("WHEP p50", "whep_p50_ms", "{:.2f}"),
        ("WHEP p99", "whep_p99_ms", "{:.2f}"),
        ("WHEP-JSON", "added_p50_ms", "{:+.2f}"),
        ("WHEP/JSON", "ratio_p50", "{:.2f}x"),
        ("JSON welcome", "json_welcome_p50_ms", "{:.2f}"),
        ("JSON start-answer", "json_after_welcome_p50_ms", "{:.2f}"),
        ("WHEP POST-201", "whep_post_p50_ms", "{:.2f}"),
        ("failed", "failures", "{}"),
    ],
    "rooms": [
        ("total s", "total_seconds", "{:.3f}"),
        ("joins s", "join_seconds", "{:.3f}"),
        ("notices", "notices_received", "{}"),
        ("of", "notices_expected", "{}"),
        ("messages", "messages_received", "{}"),
        ("of", "messages_expected", "{}"),
    ],
}

#: More columns when a server of the table has several nodes.
CLUSTER_COLUMNS = {
    "relay": [
        ("nodes", "nodes", "{}"),
        ("pairs across", "cross_share_placed", "{:.0%}"),
        ("traffic across", "cross_share", "{:.0%}"),
        ("same p50", "rtt_same_p50_ms", "{:.2f}"),
        ("same p99", "rtt_same_p99_ms", "{:.2f}"),
        ("cross p50", "rtt_cross_p50_ms", "{:.2f}"),
        ("cross p99", "rtt_cross_p99_ms", "{:.2f}"),
    ],
    "setup": [
        ("nodes", "nodes", "{}"),
        ("across", "cross_share", "{:.0%}"),
        ("same p50", "setup_same_p50_ms", "{:.1f}"),
        ("same p99", "setup_same_p99_ms", "{:.1f}"),
        ("cross p50", "setup_cross_p50_ms", "{:.1f}"),
        ("cross p99", "setup_cross_p99_ms", "{:.1f}"),
    ],
    "idle": [
        ("nodes", "nodes", "{}"),
        ("per node", "registered_per_node", "{}"),
        ("refused", "unavailable", "{}"),
        ("Redis B/peer", "redis_rss_per_peer_bytes", "{:,.0f}"),
    ],
    "rooms": [("nodes", "nodes", "{}")],
    "soak": [("nodes", "nodes", "{}")],
}

TITLES = {
    "relay": "relay: {pairs} pairs x {inflight} in flight x {size} B, {duration:g} s",
    "setup": "call set-up: {workers} workers, {duration:g} s",
    "idle": "idle: {peers} peers opened in a storm",
    "rooms": "rooms: {rooms} rooms x {members} members",
    "soak": "soak: {peers} peers churning through {rooms} rooms and calls, {duration:g} s",
    "whep-setup": (
        "WHEP set-up: {workers} viewers (connect, POST, 201, DELETE, close) against "
        "{producers} producers ({candidates_end}), {duration:g} s"
    ),
    "json-consumer-setup": (
        "JSON consumer set-up: {workers} consumers (connect, welcome, startSession, "
        "answer, endSession, close) against {producers} producers ({candidates_end}), "
        "{duration:g} s"
    ),
    "whep-latency": (
        "WHEP against a JSON consumer, alternating, {workers} at a time, {producers} "
        "producers ({candidates_end}), {duration:g} s; p50 and p99 in ms"
    ),
}


def merge_samples(parts):
    """:returns: one ``array('d')`` of all the samples in ``parts``."""
    merged = array("d")
    for part in parts:
        merged.extend(part)
    return merged


def percentiles(samples):
    """
    :param samples: durations in seconds.
    :returns: ``p50``, ``p99`` and ``max`` in milliseconds (nearest rank),
        each None when there is no sample.
    """
    if not samples:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(samples)
    count = len(ordered)

    def rank(fraction):
        return ordered[min(count - 1, max(0, int(fraction * count + 0.999999) - 1))] * 1000

    return {"p50": rank(0.50), "p99": rank(0.99), "max": ordered[-1] * 1000}


def bottleneck(server_percent, generator_percents, machine_percent=None, cores=None, redis_percent=None):
    """
    :param server_percent: the CPU of the server's busiest process (each
        process runs one thread, so saturates at one core).
    :param redis_percent: the CPU of the Redis server a cluster shares, or None.
    :returns: which side ran out of CPU: ``"server"``, ``"generator"``,
        ``"both"``, ``"redis"`` (or several joined by ``+``, e.g.
        ``"server+redis"``); ``"machine"`` when none did but every core of
        the machine was busy (other programs, or the other processes of a
        cluster, took the rest); ``"neither"`` (waiting on something else:
        the network, a timer, the protocol's round trips); or ``"unknown"``
        without the server's pid.
    """
    generator = bool(generator_percents) and max(generator_percents) >= SATURATED
    redis = redis_percent is not None and redis_percent >= SATURATED
    if server_percent is None:
        sides = [n for n, full in (("generator", generator), ("redis", redis)) if full]
        return "+".join(sides) if sides else "unknown"
    server = server_percent >= SATURATED
    if server and generator and not redis:
        return "both"
    sides = [n for n, full in (("server", server), ("generator", generator), ("redis", redis)) if full]
    if sides:
        return "+".join(sides)
    if machine_percent is not None and cores and machine_percent >= SATURATED * cores:
        return "machine"
    return "neither"


def _format(value, fmt):
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _percent(value):
    return "-" if value is None else f"{value:.0f}%"


def _server_cpu(result):
    """The server's CPU: in all, and each process's when there are several."""
    total = _percent(result.get("server_cpu_percent"))
    each = result.get("server_cpu_percent_each") or []
    if len(each) > 1:
        total += " (" + " ".join(f"{p:.0f}" for p in each) + ")"
    return total


def is_cluster(results):
    """:returns: whether a server of ``results`` has several nodes."""
    return any((r.get("nodes") or 1) > 1 for r in results)


def _format_cell(value, fmt):
    """:func:`_format`, and a list (one value per node) joined by slashes."""
    if isinstance(value, (list, tuple)):
        return "/".join(_format(v, fmt) for v in value)
    return _format(value, fmt)


def table(rows, headers):
    """:returns: ``rows`` (lists of strings) under ``headers``, aligned."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def scenario_table(results):
    """
    :param results: results of one scenario (any targets and rounds).
    :returns: a titled table, one row per run, with the CPU split and the
        bottleneck verdict.
    """
    name = results[0]["scenario"]
    columns = COLUMNS[name]
    if is_cluster(results):
        columns = columns + CLUSTER_COLUMNS.get(name, [])
    redis = any(r.get("redis_cpu_percent") is not None for r in results)
    headers = ["server", "round"] + [c[0] for c in columns] + [
        "ok",
        "listen drops",
        "server CPU",
    ] + (["Redis CPU"] if redis else []) + [
        "generator CPU",
        "machine CPU",
        "bottleneck",
    ]
    rows = []
    for result in results:
        rows.append(
            [result.get("target", "-"), str(result.get("round", 1))]
            + [_format_cell(result.get(key), fmt) for _, key, fmt in columns]
            + [
                "yes" if result.get("ok") else "NO",
                _format(result.get("listen_drops"), "{:,}"),
                _server_cpu(result),
            ]
            + ([_percent(result.get("redis_cpu_percent"))] if redis else [])
            + [
                " ".join(_percent(p) for p in result.get("generator_cpu_percent", [])),
                _percent(result.get("machine_cpu_percent"))
                + (f" of {result['machine_cores'] * 100}%" if result.get("machine_cores") else ""),
                result.get("bottleneck", "-"),
            ]
        )
    lines = [TITLES[name].format(**results[0]), table(rows, headers)]
    if name == "idle" and any(r.get("round", 1) > 1 for r in results):
        lines.append(
            "  RSS per peer counts only in round 1, on a freshly started server: "
            "later rounds reuse memory freed by earlier scenarios."
        )
    for result in results:
        for reason in result.get("reasons", []):
            lines.append(f"  {result.get('target', '-')} round {result.get('round', 1)}: {reason}")
    return "\n".join(lines)


def compare(results, ours, theirs):
    """
    Medians over the rounds of each metric for two servers, and their ratio
    (the first round's value for :data:`FIRST_ROUND_ONLY`).

    :param results: results of one scenario, with ``target`` set to
        ``ours`` or ``theirs``.
    :returns: a comparison object: ``scenario``, ``rounds``, and per metric
        ``{ours: median, theirs: median, "ratio": ours / theirs,
        "higher_is_better": bool}``.
    """
    name = results[0]["scenario"]
    metrics = {}
    wanted = METRICS[name] + (CLUSTER_METRICS.get(name, []) if is_cluster(results) else [])
    for key, label, higher in wanted:
        medians = {}
        for side in (ours, theirs):
            values = [
                r[key]
                for r in results
                if r.get("target") == side
                and r.get(key) is not None
                and (key not in FIRST_ROUND_ONLY or r.get("round", 1) == 1)
            ]
            medians[side] = statistics.median(values) if values else None
        a, b = medians[ours], medians[theirs]
        metrics[key] = {
            "label": label,
            ours: a,
            theirs: b,
            "ratio": (a / b) if a is not None and b else None,
            "higher_is_better": higher,
        }
    return {
        "scenario": name,
        "comparison": [ours, theirs],
        "rounds": len([r for r in results if r.get("target") == ours]),
        "metrics": metrics,
        "ok": {side: all(r.get("ok") for r in results if r.get("target") == side) for side in (ours, theirs)},
    }


def comparison_table(comparison):
    """:returns: the comparison as a readable table, ratios ``ours / theirs``."""
    ours, theirs = comparison["comparison"]
    headers = ["metric", ours, theirs, f"{ours} / {theirs}", "better"]
    rows = []
    for metric in comparison["metrics"].values():
        ratio = metric["ratio"]
        if ratio is None or metric["higher_is_better"] is None:
            better = "-"
        elif ratio == 1:
            better = "same"
        else:
            better = ours if (ratio > 1) == metric["higher_is_better"] else theirs
        rows.append(
            [
                metric["label"],
                _format(metric[ours], "{:,.2f}"),
                _format(metric[theirs], "{:,.2f}"),
                _format(ratio, "{:.2f}x"),
                better,
            ]
        )
    title = f"{comparison['scenario']}: median of {comparison['rounds']} round(s)"
    return title + "\n" + table(rows, headers)

"""
PNG plots of a relay sweep (``signalling-bench --plot DIR``), one line per
server: throughput and p99 round trip against the offered load (messages in
flight), and p99 round trip against the throughput reached (which shows the
latency at, say, half of a server's maximum throughput). Needs matplotlib
(``pip install '.[bench]'``).
"""

import os


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "signalling-bench: --plot needs matplotlib: pip install 'webrtcbin-signalling[bench]'"
        ) from None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def check_available():
    """Exit with a one-line message now, rather than after the run, without matplotlib."""
    _pyplot()


def _offered(point):
    return point["pairs"] * point["inflight"]


#: The plots: file name, x (key or function), y key, labels, log axes.
PLOTS = (
    (
        "relay-throughput.png",
        _offered,
        "messages_per_s",
        "offered load: messages in flight",
        "relayed messages per second",
        (True, False),
    ),
    (
        "relay-latency.png",
        _offered,
        "rtt_p99_ms",
        "offered load: messages in flight",
        "p99 round trip (ms)",
        (True, True),
    ),
    (
        "relay-latency-throughput.png",
        lambda p: p["messages_per_s"],
        "rtt_p99_ms",
        "relayed messages per second",
        "p99 round trip (ms)",
        (False, True),
    ),
)


def plot_relay_sweep(points, directory):
    """
    Write the PNG files of :data:`PLOTS` into ``directory``.

    :param points: relay results of the sweep, each with ``target``, ``url``,
        ``pairs``, ``inflight``, ``size``, ``duration``, ``messages_per_s``
        and ``rtt_p99_ms``.
    :returns: the paths written.
    """
    pyplot = _pyplot()
    from matplotlib.ticker import ScalarFormatter

    os.makedirs(directory, exist_ok=True)
    targets = []
    for point in points:
        if point["target"] not in targets:
            targets.append(point["target"])
    first = points[0]
    subtitle = (
        f"up to {max(p['pairs'] for p in points)} session pairs, {first['size']} B messages, "
        f"{first['duration']:g} s per point"
    )
    paths = []
    for name, x, y, x_label, y_label, (x_log, y_log) in PLOTS:
        figure, axes = pyplot.subplots(figsize=(7, 4.5), dpi=100)
        for target in targets:
            mine = sorted(
                (p for p in points if p["target"] == target and p.get(y) is not None),
                key=_offered,
            )
            if not mine:
                continue
            axes.plot(
                [x(p) for p in mine],
                [p[y] for p in mine],
                marker="o",
                label=f"{target} ({mine[0]['url']})",
            )
        for log, axis, set_scale in (
            (x_log, axes.xaxis, axes.set_xscale),
            (y_log, axes.yaxis, axes.set_yscale),
        ):
            if log:
                set_scale("log")
                formatter = ScalarFormatter()
                formatter.set_scientific(False)
                axis.set_major_formatter(formatter)
        if not y_log:
            axes.set_ylim(bottom=0)
        if not x_log:
            axes.set_xlim(left=0)
        axes.set_xlabel(x_label)
        axes.set_ylabel(y_label)
        axes.set_title(f"{y_label}\n{subtitle}", fontsize=10)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = os.path.join(directory, name)
        figure.savefig(path)
        pyplot.close(figure)
        paths.append(path)
    return paths

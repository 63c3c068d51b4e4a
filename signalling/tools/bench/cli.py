"""
The ``signalling-bench`` command: run the scenarios against one server, or
against two side by side (``--compare``), print a table per scenario and
write one JSON object per scenario run.

Exit status: 0 when every run passed its checks, 1 when one did not (a lost
notice, a peer that did not answer, a failed call), 2 for a bad command
line, 3 when the generator itself failed (a client process died or hung, or
the server could not be reached at all).
"""

import argparse
import json
import math
import os
import sys

from signalling.tools.bench import report
from signalling.tools.bench.runner import BenchError, Pool, raise_nofile, run_scenario
from signalling.tools.bench.wsclient import Target

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_BENCH_FAILED = 3

#: What runs by default, in this order.
DEFAULT_SCENARIOS = ("idle", "relay", "setup", "rooms")
#: The WHEP scenarios (the server's HTTP dialect, against producers the
#: bench runs): only when named.
WHEP_SCENARIOS = ("whep-setup", "json-consumer-setup", "whep-latency")
#: ... and what may be asked for: the soak runs for minutes, so only when named.
ALL_SCENARIOS = DEFAULT_SCENARIOS + ("soak",) + WHEP_SCENARIOS
#: The scenarios that --dialect json changes.
JSON_SCENARIOS = ("idle", "relay", "setup")
#: The smallest relayed message of the JSON dialect: a peer message with its
#: session id and ICE fields around the sequence number.
JSON_MIN_SIZE = 128


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (value > 0) or (kind is float and math.isinf(value)):
            raise argparse.ArgumentTypeError(f"must be a finite number above 0: {text!r}")
        return value

    return parse


def _non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (0 <= value < math.inf):
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more: {text!r}")
    return value


def _scenarios(text):
    if text.strip() == "none":
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario {', '.join(unknown) or text!r}; choose from {', '.join(ALL_SCENARIOS)}"
        )
    return names


def _int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"needs numbers above 0: {text!r}")
    return values


def _target(text):
    try:
        Target(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _nodes(text):
    """A server's URL, or its nodes' URLs separated by commas: a list of URLs."""
    urls = [u.strip() for u in text.split(",")]
    if not all(urls):
        raise argparse.ArgumentTypeError(f"an empty URL in {text!r}")
    return [_target(u) for u in urls]


def _pids(text):
    """A process id, or several separated by commas: a list of them."""
    try:
        pids = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a process id or a list of them: {text!r}") from None
    if any(p <= 0 for p in pids):
        raise argparse.ArgumentTypeError(f"process ids are above 0: {text!r}")
    return pids


def _share(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"must be from 0 to 1: {text!r}")
    return value


def build_parser():
    """:returns: the ``argparse`` parser of ``signalling-bench``."""
    parser = argparse.ArgumentParser(
        prog="signalling-bench",
        description=(
            "Load generator for WebRTC signalling servers that speak the GStreamer "
            "webrtc examples' protocol. Runs the scenarios against URL (and against "
            "--compare URL2, alternating), prints a table per scenario and the CPU "
            "split between the server and the generator's client processes."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "url", type=_nodes,
        help="ws:// or wss:// URL of the server; for a server of several nodes "
        "(a cluster on one Redis), their URLs separated by commas: the clients "
        "spread over them in turn",
    )  # fmt: skip
    parser.add_argument(
        "--server-pid", type=_pids,
        help="the server's process id, for its CPU and memory (/proc); several "
        "separated by commas (a cluster's nodes, in the order of their URLs, or "
        "the workers of one port): summed, and each shown",
    )  # fmt: skip
    parser.add_argument(
        "--redis-pid", type=int,
        help="the process id of the Redis server a cluster uses, for its CPU and memory",
    )  # fmt: skip
    parser.add_argument("--name", default="A", help="name of the server at URL in the reports")
    parser.add_argument("--compare", metavar="URL2", type=_nodes, help="a second server (or its nodes, separated by commas) to run the same scenarios against")
    parser.add_argument("--compare-pid", type=_pids, help="the second server's process id(s)")
    parser.add_argument("--compare-redis-pid", type=int, help="the second server's Redis process id")
    parser.add_argument(
        "--cross-share", type=_share,
        help="for relay and setup against a server of several nodes: the share "
        "(0 to 1) of pairs and calls whose two peers go to different nodes "
        "(default: (N-1)/N for N nodes, what a peer choosing its node "
        "independently of its partner gives on average)",
    )  # fmt: skip
    parser.add_argument("--compare-name", default="B", help="name of the second server in the reports")
    parser.add_argument("--rounds", type=_positive(int), help="rounds of every scenario (default: 1, or 2 with --compare)")
    parser.add_argument(
        "--scenarios",
        type=_scenarios,
        default=list(DEFAULT_SCENARIOS),
        help="comma-separated, run in this order ('none': only the --plot sweep)",
    )
    parser.add_argument(
        "--processes",
        type=_positive(int),
        default=os.cpu_count() or 2,
        help="client processes, each with its own event loop",
    )
    parser.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop of the client processes; auto takes uvloop when it is installed",
    )
    parser.add_argument("--insecure", action="store_true", help="do not verify the server's TLS certificate")
    parser.add_argument("--ca-file", help="trust only the certificates in this PEM file (wss://)")
    parser.add_argument("--timeout", type=_positive(float), default=10.0, help="seconds any one expected message may take")
    parser.add_argument(
        "--dialect", choices=("examples", "json"), default="examples",
        help="the protocol of the idle, relay and setup scenarios: the "
        "examples' (HELLO, SESSION) or the JSON one of webrtcsink and "
        "webrtcsrc (producers, consumers, peer messages); for json, point "
        "the URL at a path the server pins to it (--dialect-path), or every "
        "connection waits for the server's --dialect-wait",
    )
    parser.add_argument("--json", metavar="FILE", help="write one JSON object per line to FILE ('-': standard output, the tables go to standard error)")

    relay = parser.add_argument_group("relay")
    relay.add_argument("--pairs", type=_positive(int), default=50, help="session pairs (P)")
    relay.add_argument("--inflight", type=_positive(int), default=4, help="messages each pair keeps on the way (W)")
    relay.add_argument("--size", type=_positive(int), default=300, help="bytes per message (S, at least 16)")
    relay.add_argument("--duration", type=_positive(float), default=5.0, help="seconds measured, for relay and setup")
    relay.add_argument("--warmup", type=_non_negative_float, default=1.0, help="seconds of relay before the measured window")

    setup = parser.add_argument_group("setup")
    setup.add_argument("--setup-workers", type=_positive(int), default=20, help="concurrent workers making calls (C)")

    idle = parser.add_argument_group("idle")
    idle.add_argument("--peers", type=_positive(int), default=2000, help="idle peers opened in the storm (N)")
    idle.add_argument(
        "--storm-concurrency",
        type=_positive(int),
        default=1000,
        help="connections each client process opens at once",
    )
    idle.add_argument(
        "--storm-timeout",
        type=_positive(float),
        default=40.0,
        help="seconds one peer of the storm may take to connect and register "
        "(the kernel retries a dropped SYN after 1, 3, 7, 15, 31 s)",
    )
    idle.add_argument(
        "--settle",
        type=_non_negative_float,
        default=0.0,
        help="also measure the server's memory this many seconds after the storm ended, "
        "its peers still connected: what it gives back after the storm's peak "
        "(this server trims its heap every --trim-interval, 5 s); 0: not measured",
    )
    idle.add_argument(
        "--source-addresses",
        type=int,
        default=0,
        help="loopback source addresses to spread idle peers over (0: one per 20,000 peers)",
    )

    soak = parser.add_argument_group("soak (only when named in --scenarios)")
    soak.add_argument(
        "--soak-peers", type=_positive(int), default=1000,
        help="workers churning at once (each a peer, or two in a call)",
    )
    soak.add_argument(
        "--soak-duration", type=_positive(float), default=120.0, help="seconds of churn"
    )
    soak.add_argument(
        "--soak-rooms", type=_positive(int), default=20, help="rooms the workers visit"
    )
    whep = parser.add_argument_group(
        "whep-setup, json-consumer-setup and whep-latency (only when named in --scenarios)",
        "WHEP viewers (POST /whep/PRODUCER on the URL's host and port, over "
        "https for a wss:// URL) against JSON producers the bench runs at "
        "the URL, which answer every session at once with an SDP answer and "
        "two candidates. whep-setup: --setup-workers viewers, each one "
        "set-up after another; json-consumer-setup: the same with JSON "
        "consumers at the URL, to run beside it. whep-latency: a JSON "
        "consumer's set-up and a WHEP viewer's, alternating, side by side.",
    )
    whep.add_argument("--whep-producers", type=_positive(int), default=4, help="producers the viewers take in turn")
    whep.add_argument(
        "--no-end-of-candidates", dest="end_marker", action="store_false",
        help="the producers send no empty candidate after theirs, so that the "
        "server answers a POST only after its --candidate-wait",
    )  # fmt: skip
    whep.add_argument(
        "--latency-workers", type=_positive(int), default=1,
        help="whep-latency: set-ups on their way at once (1: the latency of one alone)",
    )  # fmt: skip
    whep.add_argument(
        "--whep-sources", type=int, default=0,
        help="loopback source addresses the viewers take in turn, each "
        "set-up the next (0: 64); the server bounds the requests of one "
        "address (--command-rate, 200 a second by default; a set-up makes two)",
    )  # fmt: skip
    rooms = parser.add_argument_group("rooms")
    rooms.add_argument("--rooms", type=_positive(int), default=5, help="rooms (R)")
    rooms.add_argument("--members", type=_positive(int), default=40, help="members per room (M)")

    plot = parser.add_argument_group("plots")
    plot.add_argument("--plot", metavar="DIR", help="sweep the relay load and write PNG plots into DIR (needs matplotlib)")
    plot.add_argument(
        "--sweep",
        type=_int_list,
        default=[1, 4, 16, 50, 100, 200, 400],
        help="offered loads of the sweep, as messages in flight in all: each point "
        "uses min(load, --pairs) pairs, each keeping load / pairs messages in flight",
    )
    return parser


def parse_args(argv):
    """:returns: the options for ``argv``; exits with status 2 on a usage error."""
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.compare_pid is not None and not options.compare:
        parser.error("--compare-pid needs --compare")
    for pid in (options.server_pid or []) + (options.compare_pid or []) + [
        p for p in (options.redis_pid, options.compare_redis_pid) if p is not None
    ]:
        if not os.path.exists(f"/proc/{pid}"):
            parser.error(f"no process {pid} (its CPU and memory are read from /proc/{pid})")
    if options.compare_redis_pid is not None and not options.compare:
        parser.error("--compare-redis-pid needs --compare")
    if options.cross_share is not None and len(options.url) < 2 and len(options.compare or []) < 2:
        parser.error("--cross-share needs a server of several nodes (URLs separated by commas)")
    if options.compare and options.compare_name == options.name:
        parser.error("--name and --compare-name must differ")
    if not options.scenarios and not options.plot:
        parser.error("--scenarios none needs --plot")
    if options.rounds is None:
        options.rounds = 2 if options.compare else 1
    if options.size < 16:
        parser.error("--size must be at least 16 bytes")
    if options.ca_file and not os.path.isfile(options.ca_file):
        parser.error(f"--ca-file: no such file: {options.ca_file}")
    if options.source_addresses < 0:
        parser.error("--source-addresses must be 0 or more")
    if options.whep_sources < 0:
        parser.error("--whep-sources must be 0 or more")
    if options.dialect == "json":
        others = [
            name for name in options.scenarios if name not in JSON_SCENARIOS + WHEP_SCENARIOS
        ]
        if others:
            parser.error(f"--dialect json runs {', '.join(JSON_SCENARIOS)}, not {', '.join(others)}")
        if options.size < JSON_MIN_SIZE:
            parser.error(
                f"--dialect json needs --size {JSON_MIN_SIZE} or more (a peer message's own fields)"
            )
    return options


def scenario_params(name, options):
    """:returns: the parameters of scenario ``name`` from the options."""
    params = _scenario_params(name, options)
    if name in JSON_SCENARIOS:
        params["dialect"] = options.dialect
    return params


def _scenario_params(name, options):
    timeout = options.timeout
    if name == "relay":
        return {
            "pairs": options.pairs,
            "inflight": options.inflight,
            "size": options.size,
            "warmup": options.warmup,
            "duration": options.duration,
            "timeout": timeout,
            "cross_share": options.cross_share,
        }
    if name == "setup":
        return {
            "workers_per_target": options.setup_workers,
            "duration": options.duration,
            "timeout": timeout,
            "cross_share": options.cross_share,
        }
    if name == "idle":
        return {
            "peers": options.peers,
            "storm_concurrency": options.storm_concurrency,
            "storm_timeout": options.storm_timeout,
            "settle": options.settle,
            "source_addresses": options.source_addresses,
            "timeout": timeout,
        }
    if name in WHEP_SCENARIOS:
        return {
            "workers_per_target": (
                options.latency_workers if name == "whep-latency" else options.setup_workers
            ),
            "producers": options.whep_producers,
            "end_marker": options.end_marker,
            "duration": options.duration,
            "timeout": timeout,
            "source_addresses": options.whep_sources,
        }
    if name == "soak":
        return {
            "peers": options.soak_peers,
            "rooms": options.soak_rooms,
            "duration": options.soak_duration,
            "timeout": timeout,
        }
    return {"rooms": options.rooms, "members": options.members, "timeout": timeout}


class Output:
    """Where the JSON lines, tables and progress go."""

    def __init__(self, json_path, stdout, stderr):
        self._stderr = stderr
        self._json = None
        self._close = False
        if json_path == "-":
            self._json = stdout
            self.tables = stderr
        else:
            self.tables = stdout
            if json_path:
                self._json = open(json_path, "w")
                self._close = True

    def emit(self, obj):
        if self._json is not None:
            self._json.write(json.dumps(obj, sort_keys=True, allow_nan=False, default=str) + "\n")
            self._json.flush()

    def progress(self, text):
        self._stderr.write(text + "\n")
        self._stderr.flush()

    def table(self, text):
        self.tables.write(text + "\n\n")
        self.tables.flush()

    def close(self):
        if self._close:
            self._json.close()


def _clean(result):
    """A result ready for JSON: no NaN, plain lists."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in result.items()
    }


def _urls(target):
    """:returns: a target's URL, or its nodes' URLs."""
    if isinstance(target, list):
        return f"{len(target)} nodes " + ",".join(t.url for t in target)
    return target.url


def run(options, out):
    """
    Run everything ``options`` asks for.

    :returns: the exit status.
    """
    if options.plot:
        from signalling.tools.bench import plot

        plot.check_available()
    soft, hard = raise_nofile()

    def nodes(urls):
        made = [Target(url, options.insecure, options.ca_file) for url in urls]
        return made[0] if len(made) == 1 else made

    targets = [(options.name, nodes(options.url), (options.server_pid, options.redis_pid))]
    if options.compare:
        targets.append(
            (options.compare_name, nodes(options.compare), (options.compare_pid, options.compare_redis_pid))
        )
    out.progress(
        f"signalling-bench: {options.processes} client processes, open files limit {soft} (hard {hard}); "
        + ", ".join(f"{name} = {_urls(target)}" for name, target, _ in targets)
    )
    results = {name: [] for name in options.scenarios}
    status = EXIT_OK
    try:
        pool = Pool(options.processes, options.loop)
    except BenchError as e:
        out.progress(f"signalling-bench: {e}")
        return EXIT_BENCH_FAILED
    out.progress(f"signalling-bench: client processes run the {pool.loop_name} event loop")
    with pool:
        for round_number in range(1, options.rounds + 1):
            for scenario in options.scenarios:
                params = scenario_params(scenario, options)
                for name, target, pids in targets:
                    out.progress(f"  round {round_number}: {scenario} against {name} ...")
                    try:
                        result = run_scenario(pool, scenario, target, params, *pids)
                    except BenchError as e:
                        out.progress(f"signalling-bench: {scenario} against {name} failed:\n{e}")
                        return EXIT_BENCH_FAILED
                    result.update(target=name, round=round_number, generator_loop=pool.loop_name)
                    result = _clean(result)
                    if not result["ok"]:
                        status = EXIT_CHECK_FAILED
                    results[scenario].append(result)
                    out.emit(result)
        for scenario in options.scenarios:
            out.table(report.scenario_table(results[scenario]))
        if options.compare:
            for scenario in options.scenarios:
                comparison = report.compare(results[scenario], options.name, options.compare_name)
                out.emit(comparison)
                out.table(report.comparison_table(comparison))
        if options.plot:
            points = []
            for load in options.sweep:
                pairs = min(options.pairs, load)
                inflight = max(1, round(load / pairs))
                params = dict(scenario_params("relay", options), pairs=pairs, inflight=inflight)
                for name, target, pids in targets:
                    out.progress(
                        f"  sweep: relay, {pairs} pairs x {inflight} in flight, against {name} ..."
                    )
                    try:
                        result = run_scenario(pool, "relay", target, params, *pids)
                    except BenchError as e:
                        out.progress(f"signalling-bench: the sweep failed against {name}:\n{e}")
                        return EXIT_BENCH_FAILED
                    result.update(target=name, round=1, sweep=True, generator_loop=pool.loop_name)
                    result = _clean(result)
                    points.append(result)
                    out.emit(result)
            out.table(report.scenario_table(points))
            from signalling.tools.bench import plot

            for path in plot.plot_relay_sweep(points, options.plot):
                out.progress(f"wrote {path}")
    return status


def main(argv=None):
    """The ``signalling-bench`` console script."""
    options = parse_args(sys.argv[1:] if argv is None else argv)
    out = Output(options.json, sys.stdout, sys.stderr)
    try:
        return run(options, out)
    except KeyboardInterrupt:
        return 130
    finally:
        out.close()


if __name__ == "__main__":
    sys.exit(main())

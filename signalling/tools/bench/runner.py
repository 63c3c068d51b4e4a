"""
The parent side of the load generator: a pool of client processes, each
with its own asyncio event loop, driven through one scenario at a time; the
server's CPU time and memory read from ``/proc/PID``; and one result
(a flat ``dict``, ready for JSON) per scenario run.

The processes are started with ``spawn``: they share nothing with the
parent (which may be a test running a Twisted reactor, with threads), and
the pool is kept for every scenario and round of a run.
"""

import asyncio
import functools
import math
import multiprocessing
import os
import resource
import secrets
import time
import traceback

from signalling.tools.bench import report, scenarios, whep
from signalling.tools.bench.scenarios import Control
from signalling.tools.bench.wsclient import Endpoint

#: What a client process runs, by scenario.
SCENARIOS = {**scenarios.SCENARIOS, **whep.SCENARIOS}

#: Seconds between telling the processes when to start and the start.
LEAD = 0.2
#: Extra seconds any phase may take beyond its own bound before the parent
#: gives up on a client process.
GRACE = 30.0

now = time.monotonic


class BenchError(Exception):
    """A scenario could not run (a client process failed or hung)."""


def raise_nofile():
    """
    Raise this process's soft limit on open files to its hard limit.

    :returns: ``(soft, hard)`` after the change.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def sleep_until(moment):
    """Block until ``time.monotonic()`` reaches ``moment``."""
    delay = moment - now()
    if delay > 0:
        time.sleep(delay)


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _read_proc(pid, name):
    try:
        with open(f"/proc/{pid}/{name}") as f:
            return f.read()
    except FileNotFoundError:
        raise BenchError(f"process {pid} is gone (no /proc/{pid}/{name})") from None


def process_cpu(pid):
    """:returns: user plus system CPU seconds of process ``pid`` (and its waited-for children)."""
    stat = _read_proc(pid, "stat")
    # The command name may hold spaces; the fields after it do not.
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def process_rss_kb(pid):
    """:returns: the resident memory (``VmRSS``) of process ``pid``, in KiB, or None."""
    for line in _read_proc(pid, "status").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def _pids(pid):
    if pid is None:
        return []
    if isinstance(pid, int):
        return [pid]
    return list(pid)


class ServerProbe:
    """
    Reads the CPU time and resident memory of a server's processes from
    ``/proc``: one process, or several (the nodes of a cluster, or the
    workers sharing one port), summed, and each on its own; and those of the
    Redis server a cluster shares, apart. Without a pid every reading is
    None.

    :param pid: a process id, a list of them, or None.
    :param redis_pid: the Redis server's process id, or None.
    """

    def __init__(self, pid=None, redis_pid=None):
        self.pids = _pids(pid)
        self.redis_pid = redis_pid

    @property
    def pid(self):
        """The first process's id (None without any)."""
        return self.pids[0] if self.pids else None

    def cpu_each(self):
        """:returns: each process's CPU seconds (:func:`process_cpu`), or None."""
        return [process_cpu(pid) for pid in self.pids] if self.pids else None

    def cpu(self):
        """:returns: user plus system CPU seconds of the processes, summed."""
        each = self.cpu_each()
        return None if each is None else sum(each)

    def rss_each(self):
        """:returns: each process's resident memory in KiB, or None."""
        if not self.pids:
            return None
        each = [process_rss_kb(pid) for pid in self.pids]
        return None if None in each else each

    def rss_kb(self):
        """:returns: the processes' resident memory (``VmRSS``), summed, in KiB."""
        each = self.rss_each()
        return None if each is None else sum(each)

    def redis_cpu(self):
        """:returns: the Redis server's CPU seconds, or None."""
        return None if self.redis_pid is None else process_cpu(self.redis_pid)

    def redis_rss_kb(self):
        """:returns: the Redis server's resident memory in KiB, or None."""
        return None if self.redis_pid is None else process_rss_kb(self.redis_pid)


def machine_cpu():
    """
    :returns: ``(busy, total)`` jiffies of all the machine's cores, from
        ``/proc/stat`` (None where there is no ``/proc``). Busy counts
        everything but idle and I/O wait, whoever ran it.
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    total = sum(fields[:8])
    return total - fields[3] - fields[4], total


def machine_percent(before, after):
    """
    :returns: how busy the machine was between two :func:`machine_cpu`
        readings, in percent of one core (200 is two cores fully busy).
    """
    if before is None or after is None or after[1] <= before[1]:
        return None
    cores = os.cpu_count() or 1
    return 100.0 * cores * (after[0] - before[0]) / (after[1] - before[1])


def tcp_counters():
    """
    :returns: the kernel's ``TcpExt`` counters (``/proc/net/netstat``) of
        this network namespace, or None. ``ListenDrops`` counts connection
        attempts dropped because a listen queue was full: the client then
        retries its SYN after 1, 3, 7... seconds.
    """
    try:
        with open("/proc/net/netstat") as f:
            lines = [line.split() for line in f if line.startswith("TcpExt:")]
    except OSError:
        return None
    if len(lines) < 2:
        return None
    return dict(zip(lines[0][1:], (int(v) for v in lines[1][1:])))


class Reading:
    """The server's CPU time (and Redis's), the machine's and the TCP counters, at one moment."""

    def __init__(self, probe):
        self.server_cpu_each = probe.cpu_each()
        self.server_cpu = None if self.server_cpu_each is None else sum(self.server_cpu_each)
        self.redis_cpu = probe.redis_cpu()
        self.machine = machine_cpu()
        self.tcp = tcp_counters()


# The client processes.


class _Aborted(Exception):
    """The parent called the scenario off (another process failed)."""


def loop_factory(choice):
    """
    :param choice: ``"asyncio"``, ``"uvloop"``, or ``"auto"`` (uvloop when
        it is installed: it makes the client processes cheaper still).
    :returns: ``(name, factory)``: the event loop's name and a callable that
        makes one.
    :raises BenchError: for ``"uvloop"`` when it is not installed.
    """
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise BenchError("--loop uvloop: uvloop is not installed") from None
        else:
            return "uvloop", uvloop.new_event_loop
    return "asyncio", asyncio.new_event_loop


def _worker_main(pipe, index, loop_choice="auto"):
    """A client process: run the scenarios the parent sends until told to quit."""
    raise_nofile()
    _, new_loop = loop_factory(loop_choice)
    while True:
        try:
            message = pipe.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if message[0] == "quit":
            return
        _, name, targets, spec = message
        try:
            with asyncio.Runner(loop_factory=new_loop) as runner:
                result = runner.run(_run_scenario(name, targets, spec, pipe))
        except _Aborted:
            pipe.send(("aborted", None))
        except BaseException:  # noqa: B036 - report everything to the parent
            pipe.send(("error", f"client process {index}:\n{traceback.format_exc()}"))
        else:
            pipe.send(("done", result))


async def _run_scenario(name, targets, spec, pipe):
    loop = asyncio.get_running_loop()

    async def sync(step, info):
        pipe.send(("sync", step, info))
        reply = await loop.run_in_executor(None, pipe.recv)
        if reply[0] == "abort":
            raise _Aborted()
        return reply[1]

    # Each process starts its round-robin over the nodes at another node.
    control = Control([Endpoint(t) for t in targets], sync, first=spec["worker"])
    try:
        return await SCENARIOS[name](spec, control)
    finally:
        await control.cleanup()


class Pool:
    """
    ``processes`` client processes, reused for every scenario, each running
    the event loop ``loop`` (see :func:`loop_factory`).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, processes, loop="auto"):
        #: The event loop the client processes run ("asyncio" or "uvloop").
        self.loop_name, _ = loop_factory(loop)
        context = multiprocessing.get_context("spawn")
        self._workers = []
        self.broken = False
        for index in range(processes):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=_worker_main,
                args=(child_end, index, self.loop_name),
                name=f"signalling-bench-{index}",
                daemon=True,
            )
            process.start()
            child_end.close()
            self._workers.append((process, parent_end))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self):
        return len(self._workers)

    @property
    def pids(self):
        return [process.pid for process, _ in self._workers]

    def close(self):
        """Stop the client processes."""
        for process, pipe in self._workers:
            try:
                pipe.send(("quit",))
            except (OSError, ValueError):
                pass
        for process, pipe in self._workers:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
            pipe.close()
        self._workers = []

    def start(self, name, target, spec):
        """
        Start scenario ``name`` in every process against ``target`` (a
        :class:`Target`, or a list of them: the nodes of one server);
        :returns: a :class:`_Run` to follow it through its steps.
        """
        if self.broken:
            raise BenchError("the client processes are gone after an earlier failure")
        targets = as_nodes(target)
        count = len(self._workers)
        for index, (_, pipe) in enumerate(self._workers):
            pipe.send(("run", name, targets, dict(spec, worker=index, workers=count)))
        return _Run(self)

    def _receive_all(self, within):
        deadline = now() + within
        messages = []
        for index, (process, pipe) in enumerate(self._workers):
            if not pipe.poll(max(deadline - now(), 0)):
                self._kill()
                raise BenchError(f"client process {index} did not answer within {within:.0f} s")
            try:
                messages.append(pipe.recv())
            except EOFError:
                self._kill()
                raise BenchError(f"client process {index} died") from None
        return messages

    def _kill(self):
        self.broken = True
        for process, _ in self._workers:
            process.kill()

    def _gather(self, kind, step, within):
        messages = self._receive_all(within)
        if all(m[0] == kind and (step is None or m[1] == step) for m in messages):
            return [m[-1] for m in messages]
        # One process failed: release those waiting at the step, then report.
        waiting = [i for i, m in enumerate(messages) if m[0] == "sync"]
        for index in waiting:
            self._workers[index][1].send(("abort",))
        for index in waiting:
            _, pipe = self._workers[index]
            if not pipe.poll(GRACE):
                self._kill()
                break
            pipe.recv()
        errors = [m[1] for m in messages if m[0] == "error"]
        raise BenchError(errors[0] if errors else f"client processes out of step: {messages!r}")


class _Run:
    """One scenario running in every process of a :class:`Pool`."""

    def __init__(self, pool):
        self._pool = pool

    def sync(self, step, within):
        """Wait until every process reached ``step``; :returns: their reports."""
        return self._pool._gather("sync", step, within)

    def answer(self, value):
        """Let every process waiting at a step go on, with ``value``."""
        for _, pipe in self._pool._workers:
            pipe.send(("go", value))

    def results(self, within):
        """Wait until every process is done; :returns: their results."""
        return self._pool._gather("done", None, within)


# The scenarios, parent side.


def as_nodes(target):
    """:returns: ``target`` (a :class:`Target` or a sequence of them) as a tuple of nodes."""
    if isinstance(target, (list, tuple)):
        if not target:
            raise ValueError("a server needs at least one node")
        return tuple(target)
    return (target,)


def cross_share(params, nodes):
    """
    :returns: the share of pairs and calls whose two peers go to different
        nodes: ``params["cross_share"]`` when given (0 to 1), else what
        placing each peer on a node of its own choosing gives on average,
        ``(nodes - 1) / nodes``; 0 for one node.
    """
    if nodes <= 1:
        return 0.0
    share = params.get("cross_share")
    return (nodes - 1) / nodes if share is None else float(share)


def new_tag():
    """:returns: a short prefix for the uids and room ids of one scenario run."""
    return "b" + secrets.token_hex(3)


def _cpu_fields(before, after, wall, results):
    """
    The CPU part of a result: the server's, each client process's, and the
    whole machine's (other programs included), in percent of one core; and
    the connections the kernel dropped from full listen queues meanwhile.

    :param before: the :class:`Reading` at the start of the window.
    :param after: the :class:`Reading` at its end.
    """
    wall = max(wall, 1e-9)
    server_cpu = each = None
    if before.server_cpu_each is not None and after.server_cpu_each is not None:
        each = [100.0 * (b - a) / wall for a, b in zip(before.server_cpu_each, after.server_cpu_each)]
        server_cpu = sum(each)
    redis_cpu = None
    if before.redis_cpu is not None and after.redis_cpu is not None:
        redis_cpu = 100.0 * (after.redis_cpu - before.redis_cpu) / wall
    machine = machine_percent(before.machine, after.machine)
    generator = [100.0 * r["cpu"] / max(r["wall"], 1e-9) for r in results]
    drops = None
    if before.tcp is not None and after.tcp is not None:
        drops = after.tcp.get("ListenDrops", 0) - before.tcp.get("ListenDrops", 0)
    return {
        #: All the server's processes together (one core is 100).
        "server_cpu_percent": server_cpu,
        #: Each of them (one entry for a server of one process).
        "server_cpu_percent_each": each,
        "redis_cpu_percent": redis_cpu,
        "generator_cpu_percent": generator,
        "machine_cpu_percent": machine,
        "machine_cores": os.cpu_count(),
        "listen_drops": drops,
        # Each server process and Redis run one thread: one of them
        # saturates at a core, whatever the others do.
        "bottleneck": report.bottleneck(
            max(each) if each else None, generator, machine, os.cpu_count(), redis_cpu
        ),
    }


def _reasons(results):
    reasons = []
    for result in results:
        reasons.extend(result.get("reasons", []))
    return reasons[:5]


def run_relay(pool, target, params, probe):
    """
    The relay scenario.

    :param params: ``pairs``, ``inflight``, ``size``, ``warmup``,
        ``duration``, ``timeout``.
    :returns: the result.
    """
    nodes = len(as_nodes(target))
    spec = dict(params, tag=new_tag(), cross_share=cross_share(params, nodes))
    timeout = spec["timeout"]
    run = pool.start("relay", target, spec)
    ready = run.sync("ready", within=timeout * (spec["pairs"] / 50 + 3) + GRACE)
    failed = sum(r["failed"] for r in ready)
    start_at = now() + LEAD
    run.answer(start_at)
    window_start = start_at + spec["warmup"]
    window_end = window_start + spec["duration"]
    sleep_until(window_start)
    before = Reading(probe)
    sleep_until(window_end)
    after = Reading(probe)
    results = run.results(within=3 * timeout + GRACE)
    same = report.merge_samples(r["samples_same"] for r in results)
    cross = report.merge_samples(r["samples_cross"] for r in results)
    round_trips = sum(r["round_trips"] for r in results)
    round_trips_cross = sum(r["round_trips_cross"] for r in results)
    pairs_made = sum(r["pairs"] for r in results)
    pairs_cross = sum(r["pairs_cross"] for r in results)
    errors = sum(r["errors"] for r in results)
    latency = report.percentiles(report.merge_samples([same, cross]))
    result = {
        "pairs": spec["pairs"],
        "pairs_failed": failed,
        "inflight": spec["inflight"],
        "size": spec["size"],
        "duration": spec["duration"],
        "round_trips": round_trips,
        "round_trips_cross": round_trips_cross,
        "relayed_messages": 2 * round_trips,
        "messages_per_s": 2 * round_trips / spec["duration"],
        "rtt_p50_ms": latency["p50"],
        "rtt_p99_ms": latency["p99"],
        "rtt_max_ms": latency["max"],
        "errors": errors,
        "reasons": ([r["reason"] for r in ready if r["reason"]] + _reasons(results))[:5],
        "ok": failed == 0 and errors == 0 and round_trips > 0,
    }
    result.update(
        _split_fields(
            "rtt", nodes, spec["cross_share"], pairs_made, pairs_cross,
            round_trips, round_trips_cross, same, cross,
        )
    )  # fmt: skip
    result.update(_cpu_fields(before, after, spec["duration"], results))
    return result


def _split_fields(prefix, nodes, share, placed, placed_cross, count, count_cross, same, cross):
    """
    The part of a relay or set-up result that tells same-node pairs from
    cross-node ones.

    :param share: the share of pairs or calls asked to cross.
    :param placed: pairs (relay) or calls (set-up) made; ``placed_cross``
        of them across nodes.
    :param count: round trips (relay) or calls (set-up) counted;
        ``count_cross`` of them across nodes.
    :param same: the times of the same-node ones (seconds).
    :param cross: the times of the cross-node ones.
    """
    same_latency = report.percentiles(same)
    cross_latency = report.percentiles(cross)
    return {
        "nodes": nodes,
        "cross_share_asked": share,
        #: Of the pairs (relay) or calls (set-up) made, the share across nodes.
        "cross_share_placed": placed_cross / placed if placed else None,
        #: Of the round trips (relay) or calls (set-up) counted, the share across nodes.
        "cross_share": count_cross / count if count else None,
        f"{prefix}_same_p50_ms": same_latency["p50"],
        f"{prefix}_same_p99_ms": same_latency["p99"],
        f"{prefix}_cross_p50_ms": cross_latency["p50"],
        f"{prefix}_cross_p99_ms": cross_latency["p99"],
    }


def run_setup(pool, target, params, probe):
    """
    The call set-up scenario.

    :param params: ``workers_per_target`` (C), ``duration``, ``timeout``.
    """
    nodes = len(as_nodes(target))
    spec = dict(params, tag=new_tag(), cross_share=cross_share(params, nodes))
    timeout = spec["timeout"]
    run = pool.start("setup", target, spec)
    run.sync("ready", within=GRACE)
    start_at = now() + LEAD
    run.answer(start_at)
    sleep_until(start_at)
    before = Reading(probe)
    results = run.results(within=spec["duration"] + 8 * timeout + GRACE)
    after = Reading(probe)
    wall = now() - start_at
    calls = sum(r["calls"] for r in results)
    calls_cross = sum(r["calls_cross"] for r in results)
    failures = sum(r["failures"] for r in results)
    ends = [r["last_end"] for r in results if r["last_end"] is not None]
    elapsed = (max(ends) - start_at) if ends else spec["duration"]
    same = report.merge_samples(r["samples_same"] for r in results)
    cross = report.merge_samples(r["samples_cross"] for r in results)
    latency = report.percentiles(report.merge_samples([same, cross]))
    result = {
        "workers": spec["workers_per_target"],
        "duration": spec["duration"],
        "calls": calls,
        "calls_cross": calls_cross,
        "failures": failures,
        "calls_per_s": calls / elapsed if elapsed > 0 else 0.0,
        "setup_p50_ms": latency["p50"],
        "setup_p99_ms": latency["p99"],
        "setup_max_ms": latency["max"],
        "reasons": _reasons(results),
        "ok": failures == 0 and calls > 0,
    }
    result.update(
        _split_fields("setup", nodes, spec["cross_share"], calls, calls_cross, calls, calls_cross, same, cross)
    )
    result.update(_cpu_fields(before, after, wall, results))
    return result


def source_hosts(target, peers, count):
    """
    :returns: the local addresses to spread ``peers`` connections over: one
        loopback address per 20,000 connections (the ephemeral ports of one
        source address to one server address run out near 28,000), or
        ``count`` of them when given; ``[None]`` (the kernel's choice) when
        the server is not on an IPv4 loopback address.
    """
    if not count:
        count = math.ceil(peers / 20000)
    if count <= 1:
        return [None]
    return _loopback_sources(target, count)


def _loopback_sources(target, count):
    """
    :returns: ``count`` loopback addresses (127.0.x.y) to connect from, or
        ``[None]`` (the kernel's choice) when the server is not on an IPv4
        loopback address.
    """
    try:
        ip = Endpoint(target).resolve_ipv4()[0]
    except OSError:
        return [None]
    if not ip.startswith("127."):
        return [None]
    return [f"127.0.{1 + n // 250}.{1 + n % 250}" for n in range(count)]


def run_idle(pool, target, params, probe):
    """
    The idle capacity scenario.

    :param params: ``peers``, ``storm_concurrency``, ``storm_timeout``,
        ``timeout``, ``source_addresses`` (0 for automatic), ``settle``
        (seconds after the storm's end to measure memory again; 0 or absent:
        not measured).
    """
    spec = dict(params, tag=new_tag())
    nodes = as_nodes(target)
    spec["source_hosts"] = source_hosts(nodes[0], spec["peers"], spec.get("source_addresses", 0))
    timeout = spec["timeout"]
    run = pool.start("idle", target, spec)
    run.sync("ready", within=GRACE)
    rss_before_each = probe.rss_each()
    rss_before = probe.rss_kb()
    redis_before = probe.redis_rss_kb()
    start_at = now() + LEAD
    run.answer(start_at)
    sleep_until(start_at)
    before = Reading(probe)
    waves = math.ceil(spec["peers"] / max(spec["storm_concurrency"] * len(pool), 1))
    stormed = run.sync("stormed", within=spec["storm_timeout"] * (waves + 1) + GRACE)
    after = Reading(probe)
    stormed_at = now()
    rss_after_each = probe.rss_each()
    rss_after = probe.rss_kb()
    redis_after = probe.redis_rss_kb()
    run.answer(None)
    # At most storm_concurrency questions of a process on their way at once,
    # each bounded by the timeout.
    asks = math.ceil(spec["peers"] / len(pool) / max(spec["storm_concurrency"], 1))
    run.sync("answered", within=timeout * (asks + 1) + GRACE)
    # Memory once the storm's peak has had time to go back (the peers wait,
    # connected, for the answer below).
    rss_settled = None
    if spec.get("settle"):
        sleep_until(stormed_at + spec["settle"])
        rss_settled = probe.rss_kb()
    run.answer(None)
    results = run.results(within=3 * timeout + GRACE)
    registered = sum(s["registered"] for s in stormed)
    lasts = [s["last"] for s in stormed if s["last"] is not None]
    storm_seconds = (max(lasts) - start_at) if lasts else None
    answered = sum(r["answered"] for r in results)
    failures = sum(r["failures"] for r in results)
    answer_seconds = max(r["answered_by"] for r in results) - min(r["asked_from"] for r in results)
    per_node = [sum(s["registered_per_node"][n] for s in stormed) for n in range(len(nodes))]
    per_peer = None
    if rss_before is not None and rss_after is not None and registered:
        per_peer = (rss_after - rss_before) * 1024 / registered
    settled_per_peer = None
    if rss_before is not None and rss_settled is not None and registered:
        settled_per_peer = (rss_settled - rss_before) * 1024 / registered
    redis_per_peer = None
    if redis_before is not None and redis_after is not None and registered:
        redis_per_peer = (redis_after - redis_before) * 1024 / registered
    # Per node, when there is one process per node (in the nodes' order).
    per_peer_each = None
    if rss_before_each and rss_after_each and len(rss_after_each) == len(nodes) > 1:
        per_peer_each = [
            (b - a) * 1024 / n if n else None
            for a, b, n in zip(rss_before_each, rss_after_each, per_node)
        ]
    result = {
        "peers": spec["peers"],
        "registered": registered,
        "failures": failures,
        "storm_seconds": storm_seconds,
        "hellos_per_s": registered / storm_seconds if storm_seconds else 0.0,
        "rss_before_kb": rss_before,
        "rss_after_kb": rss_after,
        "rss_per_peer_bytes": per_peer,
        "settle_seconds": spec.get("settle") or None,
        "rss_settled_kb": rss_settled,
        "rss_settled_per_peer_bytes": settled_per_peer,
        "nodes": len(nodes),
        "registered_per_node": per_node,
        "rss_before_kb_each": rss_before_each,
        "rss_after_kb_each": rss_after_each,
        "rss_per_peer_bytes_each": per_peer_each,
        "redis_rss_before_kb": redis_before,
        "redis_rss_after_kb": redis_after,
        "redis_rss_per_peer_bytes": redis_per_peer,
        "answered": answered,
        #: Questions refused as "try again later" (a cluster node without Redis).
        "unavailable": sum(r["unavailable"] for r in results),
        #: From the first question to the last answer, all processes together.
        "answer_seconds": answer_seconds,
        "answers_per_s": answered / answer_seconds if answer_seconds > 0 else None,
        "source_addresses": len(spec["source_hosts"]),
        "reasons": _reasons(results),
        "ok": registered == spec["peers"] and answered == registered,
    }
    result.update(_cpu_fields(before, after, stormed_at - start_at, results))
    return result


def run_rooms(pool, target, params, probe):
    """
    The room storm scenario.

    :param params: ``rooms``, ``members``, ``timeout``.
    """
    spec = dict(params, tag=new_tag())
    timeout = spec["timeout"]
    rooms, members = spec["rooms"], spec["members"]
    run = pool.start("rooms", target, spec)
    run.sync("ready", within=GRACE)
    start_at = now() + LEAD
    run.answer(start_at)
    sleep_until(start_at)
    before = Reading(probe)
    results = run.results(within=timeout * (members + 4) + GRACE)
    after = Reading(probe)
    wall = now() - start_at
    ends = [r["last_end"] for r in results if r["last_end"] is not None]
    joins = [r["join_seconds"] for r in results if r["join_seconds"] is not None]
    notices_expected = rooms * members * (members - 1) // 2
    messages_expected = rooms * members * (members - 1)
    notices = sum(r["joins_received"] for r in results)
    messages = sum(r["messages_received"] for r in results)
    errors = sum(r["errors"] for r in results)
    result = {
        "rooms": rooms,
        "members": members,
        "total_seconds": (max(ends) - start_at) if ends else None,
        "join_seconds": max(joins) if joins else None,
        "notices_expected": notices_expected,
        "notices_received": notices,
        "messages_expected": messages_expected,
        "messages_received": messages,
        "errors": errors,
        "reasons": _reasons(results),
        "ok": errors == 0 and notices == notices_expected and messages == messages_expected,
    }
    result.update(_cpu_fields(before, after, wall, results))
    return result


def run_soak(pool, target, params, probe):
    """
    The soak scenario: peers churning for a while; the server's memory is
    sampled as it goes, and must end where it began.

    :param params: ``peers``, ``rooms``, ``duration``, ``timeout``.
    """
    spec = dict(params, tag=new_tag())
    timeout = spec["timeout"]
    run = pool.start("soak", target, spec)
    run.sync("ready", within=GRACE)
    rss_start = probe.rss_kb()
    start_at = now() + LEAD
    run.answer(start_at)
    sleep_until(start_at)
    before = Reading(probe)
    samples = []
    end_at = start_at + spec["duration"]
    while now() < end_at:
        sample = probe.rss_kb()
        if sample is not None:
            samples.append((round(now() - start_at, 1), sample))
        sleep_until(min(end_at, now() + max(spec["duration"] / 20, 0.5)))
    churned = run.sync("churned", within=6 * timeout + GRACE)
    after = Reading(probe)
    wall = now() - start_at
    run.answer(None)
    results = run.results(within=(spec["rooms"] + 2) * 2 * timeout + GRACE)
    rss_end = probe.rss_kb()
    failures = sum(r["failures"] for r in results)
    cycles = sum(c["cycles"] for c in churned)
    result = {
        "peers": spec["peers"],
        "rooms": spec["rooms"],
        "duration": spec["duration"],
        "cycles": cycles,
        "cycles_per_s": cycles / wall if wall else 0.0,
        "failures": failures,
        "rss_start_kb": rss_start,
        "rss_max_kb": max(kb for _, kb in samples) if samples else None,
        "rss_end_kb": rss_end,
        #: ``(seconds since the start, KiB)`` while the peers churned.
        "rss_samples": samples,
        "reasons": _reasons(results),
        "ok": failures == 0 and cycles > 0,
    }
    result.update(_cpu_fields(before, after, wall, results))
    return result


#: Loopback source addresses the WHEP viewers take in turn, by default.
VIEWER_SOURCES = 64


def viewer_sources(target, count=0):
    """
    :returns: the local addresses the WHEP viewers take in turn:
        ``count`` loopback addresses (:data:`VIEWER_SOURCES` for 0), as
        viewers are clients of their own, and the server bounds the
        requests of one address (``--command-rate``: 200 a second by
        default, and a set-up makes two); ``[None]`` (the kernel's choice)
        when the server is not on an IPv4 loopback address.
    """
    return _loopback_sources(target, count or VIEWER_SOURCES)


def _start_whep(pool, name, target, params):
    """
    Start a WHEP scenario: the producers opened in every process, their
    names and peer ids handed to all, the start named.

    :returns: ``(spec, run, start_at, {name: peer id}, reasons)``.
    """
    nodes = as_nodes(target)
    spec = dict(params, tag=new_tag())
    spec["source_hosts"] = viewer_sources(nodes[0], spec.get("source_addresses", 0))
    run = pool.start(name, target, spec)
    ready = run.sync("ready", within=3 * spec["timeout"] + GRACE)
    ids = {}
    reasons = []
    for info in ready:
        ids.update(info["producers"])
        if info["reason"]:
            reasons.append(f"producers: {info['reason']}")
    start_at = now() + LEAD
    run.answer({"start_at": start_at, "producers": ids})
    return spec, run, start_at, ids, reasons


def _finish_whep(run, spec, probe, start_at, within):
    """
    Wait until every process's viewers are done, read the CPU, let the
    producers drain; :returns: ``(results, before, after, wall)``.
    """
    sleep_until(start_at)
    before = Reading(probe)
    run.sync("done", within=within)
    after = Reading(probe)
    wall = now() - start_at
    run.answer(None)
    results = run.results(within=3 * spec["timeout"] + GRACE)
    return results, before, after, wall


def _producer_fields(spec, ids, results):
    """The producers' side of a WHEP result: how many, their sessions, what went wrong."""
    return {
        "producers": spec["producers"],
        "producers_opened": len(ids),
        "end_marker": spec.get("end_marker", True),
        "candidates_end": (
            "an empty candidate after theirs"
            if spec.get("end_marker", True)
            else "no end marker, the server waits --candidate-wait"
        ),
        #: Sessions the producers were asked for (``startSession``), and that ended.
        "producer_sessions": sum(r["producer_started"] for r in results),
        "producer_ended": sum(r["producer_ended"] for r in results),
        "producer_errors": sum(r["producer_errors"] for r in results),
    }


def _server_ms_per(result, wall, count):
    """:returns: milliseconds of the server's CPU per set-up (None without its pid)."""
    cpu = result.get("server_cpu_percent")
    if cpu is None or not count:
        return None
    return cpu / 100.0 * wall / count * 1000


def run_whep_setup(pool, target, params, probe, name="whep-setup"):
    """
    The WHEP set-up scenario (or, ``name`` ``json-consumer-setup``, the
    same with JSON consumers).

    :param params: ``workers_per_target`` (C), ``producers``,
        ``end_marker``, ``duration``, ``timeout``, ``source_addresses``
        (0: :data:`VIEWER_SOURCES`).
    """
    spec, run, start_at, ids, reasons = _start_whep(pool, name, target, params)
    timeout = spec["timeout"]
    results, before, after, wall = _finish_whep(
        run, spec, probe, start_at, spec["duration"] + 4 * timeout + GRACE
    )
    setups = sum(r["setups"] for r in results)
    failures = sum(r["failures"] for r in results)
    ends = [r["last_end"] for r in results if r["last_end"] is not None]
    elapsed = (max(ends) - start_at) if ends else spec["duration"]
    latency = report.percentiles(report.merge_samples(r["samples"] for r in results))
    post = report.percentiles(report.merge_samples(r["post_samples"] for r in results))
    result = {
        "workers": spec["workers_per_target"],
        "duration": spec["duration"],
        "setups": setups,
        "failures": failures,
        "setups_per_s": setups / elapsed if elapsed > 0 else 0.0,
        #: From the start of the connection to the 201 read whole (a JSON
        #: consumer: to the producer's answer).
        "setup_p50_ms": latency["p50"],
        "setup_p99_ms": latency["p99"],
        "setup_max_ms": latency["max"],
        #: From the POST sent (on the open connection) to the 201 (a JSON
        #: consumer: from its startSession, once welcomed, to the answer).
        "post_p50_ms": post["p50"],
        "post_p99_ms": post["p99"],
        "source_addresses": len([h for h in spec["source_hosts"] if h is not None]),
    }
    _whep_verdict(result, spec, ids, results, reasons, failures, setups > 0, setups)
    result.update(_cpu_fields(before, after, wall, results))
    result["server_cpu_ms_per_setup"] = _server_ms_per(result, wall, setups)
    return result


def _whep_verdict(result, spec, ids, results, reasons, failures, counted, sessions):
    """
    Add to a WHEP scenario's ``result`` the producers' counts, the first
    reasons of failure, and ``ok``: no failure, something ``counted``, every
    producer opened and without error, and as many sessions at the
    producers, each ended there, as the viewers made (``sessions``).
    """
    result.update(_producer_fields(spec, ids, results))
    result["reasons"] = (reasons + _reasons(results) + [
        reason for r in results for reason in r["producer_reasons"]
    ])[:5]  # fmt: skip
    result["ok"] = (
        failures == 0
        and counted
        and result["producers_opened"] == spec["producers"]
        and result["producer_errors"] == 0
        and result["producer_sessions"] == sessions
        and result["producer_ended"] == sessions
    )


def run_whep_latency(pool, target, params, probe):
    """
    The side-by-side latency of a JSON consumer's set-up and a WHEP
    viewer's, alternating, against the same producers.

    :param params: ``workers_per_target`` (1: one set-up at a time),
        ``producers``, ``end_marker``, ``duration``, ``timeout``,
        ``source_addresses``.
    """
    spec, run, start_at, ids, reasons = _start_whep(pool, "whep-latency", target, params)
    timeout = spec["timeout"]
    results, before, after, wall = _finish_whep(
        run, spec, probe, start_at, spec["duration"] + 8 * timeout + GRACE
    )
    pairs = sum(r["pairs"] for r in results)
    sessions = sum(r["sessions"] for r in results)
    failures = sum(r["failures"] for r in results)
    kinds = ("json", "whep", "json_welcome", "json_after_welcome", "json_complete", "whep_post")
    merged = {k: report.merge_samples(r["samples"][k] for r in results) for k in kinds}
    added = report.merge_samples(r["added"] for r in results)
    result = {
        "workers": spec["workers_per_target"],
        "duration": spec["duration"],
        #: Pairs counted (a JSON set-up and a WHEP one each).
        "pairs": pairs,
        "failures": failures,
        "source_addresses": len([h for h in spec["source_hosts"] if h is not None]),
    }
    for kind in kinds:
        latency = report.percentiles(merged[kind])
        result[f"{kind}_p50_ms"] = latency["p50"]
        result[f"{kind}_p99_ms"] = latency["p99"]
    #: The median over the pairs of (WHEP - JSON), and the ratio of their medians.
    result["added_p50_ms"] = whep.median_ms(added)
    json_p50, whep_p50 = result["json_p50_ms"], result["whep_p50_ms"]
    result["ratio_p50"] = whep_p50 / json_p50 if json_p50 and whep_p50 is not None else None
    # Every set-up the viewers made (the warm-up pairs' too) was a session
    # at a producer, and ended there.
    _whep_verdict(result, spec, ids, results, reasons, failures, pairs > 0, sessions)
    result.update(_cpu_fields(before, after, wall, results))
    return result


RUNNERS = {
    "relay": run_relay,
    "setup": run_setup,
    "idle": run_idle,
    "rooms": run_rooms,
    "soak": run_soak,
    "whep-setup": run_whep_setup,
    "json-consumer-setup": functools.partial(run_whep_setup, name="json-consumer-setup"),
    "whep-latency": run_whep_latency,
}


def run_scenario(pool, name, target, params, pid=None, redis_pid=None):
    """
    Run one scenario against ``target`` with ``params``.

    :param target: a :class:`~signalling.tools.bench.wsclient.Target`, or a
        list of them: the nodes of one server (a cluster), over which the
        clients spread.
    :param pid: the server's process id, for its CPU and memory; or a list
        of them (a server of several processes), summed.
    :param redis_pid: the process id of the Redis server a cluster shares.
    :returns: the result, with ``scenario`` and ``url`` (the nodes' URLs,
        comma-separated) in it.
    """
    nodes = as_nodes(target)
    result = {"scenario": name, "url": ",".join(t.url for t in nodes)}
    probe = ServerProbe(pid, redis_pid)
    result.update(RUNNERS[name](pool, nodes if len(nodes) > 1 else nodes[0], params, probe))
    result.setdefault("nodes", len(nodes))
    return result

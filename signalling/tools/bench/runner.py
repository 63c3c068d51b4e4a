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
import math
import multiprocessing
import os
import resource
import secrets
import time
import traceback

from signalling.tools.bench import report
from signalling.tools.bench.scenarios import SCENARIOS, Control
from signalling.tools.bench.wsclient import Endpoint

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


class ServerProbe:
    """
    Reads a server process's CPU time and resident memory from ``/proc``.
    Without a pid every reading is None.
    """

    _ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, pid=None):
        self.pid = pid

    def cpu(self):
        """:returns: user plus system CPU seconds of the process (and its waited-for children)."""
        if self.pid is None:
            return None
        with open(f"/proc/{self.pid}/stat") as f:
            stat = f.read()
        # The command name may hold spaces; the fields after it do not.
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / self._ticks

    def rss_kb(self):
        """:returns: the process's resident memory (``VmRSS``), in KiB."""
        if self.pid is None:
            return None
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return None


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
    """The server's CPU time, the machine's and the TCP counters, at one moment."""

    def __init__(self, probe):
        self.server_cpu = probe.cpu()
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
        _, name, target, spec = message
        try:
            with asyncio.Runner(loop_factory=new_loop) as runner:
                result = runner.run(_run_scenario(name, target, spec, pipe))
        except _Aborted:
            pipe.send(("aborted", None))
        except BaseException:  # noqa: B036 - report everything to the parent
            pipe.send(("error", f"client process {index}:\n{traceback.format_exc()}"))
        else:
            pipe.send(("done", result))


async def _run_scenario(name, target, spec, pipe):
    loop = asyncio.get_running_loop()

    async def sync(step, info):
        pipe.send(("sync", step, info))
        reply = await loop.run_in_executor(None, pipe.recv)
        if reply[0] == "abort":
            raise _Aborted()
        return reply[1]

    control = Control(Endpoint(target), sync)
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
        Start scenario ``name`` in every process; :returns: a :class:`_Run`
        to follow it through its steps.
        """
        if self.broken:
            raise BenchError("the client processes are gone after an earlier failure")
        count = len(self._workers)
        for index, (_, pipe) in enumerate(self._workers):
            pipe.send(("run", name, target, dict(spec, worker=index, workers=count)))
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
    server_cpu = None
    if before.server_cpu is not None and after.server_cpu is not None:
        server_cpu = 100.0 * (after.server_cpu - before.server_cpu) / max(wall, 1e-9)
    machine = machine_percent(before.machine, after.machine)
    generator = [100.0 * r["cpu"] / max(r["wall"], 1e-9) for r in results]
    drops = None
    if before.tcp is not None and after.tcp is not None:
        drops = after.tcp.get("ListenDrops", 0) - before.tcp.get("ListenDrops", 0)
    return {
        "server_cpu_percent": server_cpu,
        "generator_cpu_percent": generator,
        "machine_cpu_percent": machine,
        "machine_cores": os.cpu_count(),
        "listen_drops": drops,
        "bottleneck": report.bottleneck(server_cpu, generator, machine, os.cpu_count()),
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
    spec = dict(params, tag=new_tag())
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
    samples = report.merge_samples(r["samples"] for r in results)
    round_trips = sum(r["round_trips"] for r in results)
    errors = sum(r["errors"] for r in results)
    latency = report.percentiles(samples)
    result = {
        "pairs": spec["pairs"],
        "pairs_failed": failed,
        "inflight": spec["inflight"],
        "size": spec["size"],
        "duration": spec["duration"],
        "round_trips": round_trips,
        "relayed_messages": 2 * round_trips,
        "messages_per_s": 2 * round_trips / spec["duration"],
        "rtt_p50_ms": latency["p50"],
        "rtt_p99_ms": latency["p99"],
        "rtt_max_ms": latency["max"],
        "errors": errors,
        "reasons": ([r["reason"] for r in ready if r["reason"]] + _reasons(results))[:5],
        "ok": failed == 0 and errors == 0 and round_trips > 0,
    }
    result.update(_cpu_fields(before, after, spec["duration"], results))
    return result


def run_setup(pool, target, params, probe):
    """
    The call set-up scenario.

    :param params: ``workers_per_target`` (C), ``duration``, ``timeout``.
    """
    spec = dict(params, tag=new_tag())
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
    failures = sum(r["failures"] for r in results)
    ends = [r["last_end"] for r in results if r["last_end"] is not None]
    elapsed = (max(ends) - start_at) if ends else spec["duration"]
    latency = report.percentiles(report.merge_samples(r["samples"] for r in results))
    result = {
        "workers": spec["workers_per_target"],
        "duration": spec["duration"],
        "calls": calls,
        "failures": failures,
        "calls_per_s": calls / elapsed if elapsed > 0 else 0.0,
        "setup_p50_ms": latency["p50"],
        "setup_p99_ms": latency["p99"],
        "setup_max_ms": latency["max"],
        "reasons": _reasons(results),
        "ok": failures == 0 and calls > 0,
    }
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
    try:
        ip = Endpoint(target).resolve_ipv4()[0]
    except OSError:
        return [None]
    if not ip.startswith("127."):
        return [None]
    if not count:
        count = math.ceil(peers / 20000)
    if count <= 1:
        return [None]
    return [f"127.0.{1 + n // 250}.{1 + n % 250}" for n in range(count)]


def run_idle(pool, target, params, probe):
    """
    The idle capacity scenario.

    :param params: ``peers``, ``storm_concurrency``, ``storm_timeout``,
        ``timeout``, ``source_addresses`` (0 for automatic).
    """
    spec = dict(params, tag=new_tag())
    spec["source_hosts"] = source_hosts(target, spec["peers"], spec.get("source_addresses", 0))
    timeout = spec["timeout"]
    run = pool.start("idle", target, spec)
    run.sync("ready", within=GRACE)
    rss_before = probe.rss_kb()
    start_at = now() + LEAD
    run.answer(start_at)
    sleep_until(start_at)
    before = Reading(probe)
    waves = math.ceil(spec["peers"] / max(spec["storm_concurrency"] * len(pool), 1))
    stormed = run.sync("stormed", within=spec["storm_timeout"] * (waves + 1) + GRACE)
    after = Reading(probe)
    stormed_at = now()
    rss_after = probe.rss_kb()
    run.answer(None)
    results = run.results(within=3 * timeout + GRACE)
    registered = sum(s["registered"] for s in stormed)
    lasts = [s["last"] for s in stormed if s["last"] is not None]
    storm_seconds = (max(lasts) - start_at) if lasts else None
    answered = sum(r["answered"] for r in results)
    failures = sum(r["failures"] for r in results)
    per_peer = None
    if rss_before is not None and rss_after is not None and registered:
        per_peer = (rss_after - rss_before) * 1024 / registered
    result = {
        "peers": spec["peers"],
        "registered": registered,
        "failures": failures,
        "storm_seconds": storm_seconds,
        "hellos_per_s": registered / storm_seconds if storm_seconds else 0.0,
        "rss_before_kb": rss_before,
        "rss_after_kb": rss_after,
        "rss_per_peer_bytes": per_peer,
        "answered": answered,
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


RUNNERS = {
    "relay": run_relay,
    "setup": run_setup,
    "idle": run_idle,
    "rooms": run_rooms,
    "soak": run_soak,
}


def run_scenario(pool, name, target, params, pid=None):
    """
    Run one scenario against ``target`` with ``params``.

    :param pid: the server's process id, for its CPU and memory.
    :returns: the result, with ``scenario`` and ``url`` in it.
    """
    result = {"scenario": name, "url": target.url}
    result.update(RUNNERS[name](pool, target, params, ServerProbe(pid)))
    return result

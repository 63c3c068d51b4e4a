"""
Tests of the load generator ``signalling-bench`` (:mod:`signalling.tools.bench`).

Each scenario runs for real, with tiny sizes, in client processes of its
own against our server listening on a loopback port in this process; the
generator's parent side runs in a thread, so that the reactor here keeps
serving. The correctness checks are run against servers broken on purpose
(a notice dropped, a question left unanswered, a relayed message lost), to
show that they catch what they are meant to catch.
"""

import dataclasses
import asyncio
import importlib.util
import io
import json
import os
import re
import socket
import struct
import sys

import http.client
import shutil
import time

from twisted.internet import defer, reactor, threads, utils
from twisted.trial import unittest

from signalling.tools.bench import cli, report, runner, scenarios, wsclient
from signalling.tools.bench.runner import Pool, ServerProbe, run_scenario
from signalling.core.connection import Connection
from signalling.core.dialects import DIALECTS
from signalling.core.registry import Registry
from signalling.server.protocol import SignallingServerProtocol
from tests._interop import missing_requirement
from tests._redis import RedisServer
from tests.clients import pause
from tests.servers import ProcessMixin, Server
from tests.helpers import change_settings

#: Bound for one expected message in the scenarios that should pass.
TIMEOUT = 5.0
#: Bound in the scenarios where a message never comes: how long the
#: generator waits before it reports the loss.
SHORT_TIMEOUT = 1.0

TINY = {
    "relay": {"pairs": 2, "inflight": 2, "size": 100, "warmup": 0.0, "duration": 1.0},
    "setup": {"workers_per_target": 2, "duration": 1.0},
    "idle": {"peers": 30, "storm_concurrency": 100, "storm_timeout": 5.0, "source_addresses": 0},
    "rooms": {"rooms": 2, "members": 4},
    "soak": {"peers": 10, "rooms": 3, "duration": 1.5},
}


def bench(name, url, timeout=TIMEOUT, ca_file=None, pid=None, redis_pid=None, **params):
    """
    Run scenario ``name`` against ``url`` with two client processes, from a
    thread; this process is the server, so its pid gives the server's CPU
    and memory (unless ``pid`` names others).

    :param url: a URL, or a list of them (the nodes of a cluster).
    :returns: a Deferred that fires with the result.
    """
    spec = dict(TINY[name], timeout=timeout)
    spec.update(params)
    if isinstance(url, list):
        target = [wsclient.Target(u, ca_file=ca_file) for u in url]
    else:
        target = wsclient.Target(url, ca_file=ca_file)

    def work():
        with Pool(2, "asyncio") as pool:
            return run_scenario(
                pool, name, target, spec, os.getpid() if pid is None else pid, redis_pid
            )

    return threads.deferToThread(work)


class ScenarioTests(unittest.TestCase):
    """Every scenario against our server, with tiny sizes."""

    def assertCpuReported(self, result):
        """The server's, each client process's and the machine's CPU are there."""
        self.assertEqual(len(result["generator_cpu_percent"]), 2)
        self.assertGreater(sum(result["generator_cpu_percent"]), 0)
        # /proc counts in clock ticks (10 ms): a short scenario may read 0.
        self.assertGreaterEqual(result["server_cpu_percent"], 0)
        self.assertIn(
            result["bottleneck"], ("server", "generator", "both", "machine", "neither")
        )

    async def test_relay_reports_relayed_messages_and_round_trip_times(self):
        """Relay: messages flow both ways, with sane throughput and latency percentiles."""
        server = await Server.listening(self, tls=False)
        result = await bench("relay", server.url())
        self.assertTrue(result["ok"], result)
        self.assertEqual(result["errors"], 0)
        self.assertGreater(result["round_trips"], 0)
        self.assertEqual(result["relayed_messages"], 2 * result["round_trips"])
        self.assertAlmostEqual(result["messages_per_s"], result["relayed_messages"] / 1.0)
        self.assertGreater(result["rtt_p50_ms"], 0)
        self.assertLessEqual(result["rtt_p50_ms"], result["rtt_p99_ms"])
        self.assertLessEqual(result["rtt_p99_ms"], result["rtt_max_ms"])
        self.assertCpuReported(result)
        self.assertGreater(result["server_cpu_percent"], 0)

    async def test_relay_over_tls_trusting_a_ca_file(self):
        """Relay over wss://, the server's certificate trusted through --ca-file."""
        server = await Server.listening(self, tls=True)
        ca_file = self.mktemp()
        with open(ca_file, "wb") as f:
            f.write(server.pem)
        result = await bench("relay", server.url(), ca_file=ca_file)
        self.assertTrue(result["ok"], result)
        self.assertGreater(result["round_trips"], 0)
        self.assertTrue(result["url"].startswith("wss://"))

    async def test_setup_reports_calls_per_second_and_setup_times(self):
        """Setup: whole calls complete, and their set-up times are measured."""
        server = await Server.listening(self, tls=False)
        result = await bench("setup", server.url())
        self.assertTrue(result["ok"], result)
        self.assertEqual(result["failures"], 0)
        self.assertGreater(result["calls"], 0)
        self.assertGreater(result["calls_per_s"], 0)
        self.assertGreater(result["setup_p50_ms"], 0)
        self.assertLessEqual(result["setup_p50_ms"], result["setup_p99_ms"])
        self.assertCpuReported(result)

    async def test_idle_registers_every_peer_and_every_peer_answers(self):
        """Idle: all peers register in the storm, memory is read, all answer afterwards."""
        server = await Server.listening(self, tls=False)
        result = await bench("idle", server.url())
        self.assertTrue(result["ok"], result)
        self.assertEqual(result["registered"], 30)
        self.assertEqual(result["answered"], 30)
        self.assertGreater(result["hellos_per_s"], 0)
        self.assertGreater(result["storm_seconds"], 0)
        self.assertGreater(result["rss_before_kb"], 0)
        self.assertGreater(result["rss_after_kb"], 0)
        self.assertIsNotNone(result["rss_per_peer_bytes"])
        self.assertIsNone(result["rss_settled_kb"])
        self.assertIsNone(result["rss_settled_per_peer_bytes"])
        self.assertCpuReported(result)

    async def test_idle_measures_memory_again_once_settled_with_the_peers_connected(self):
        """
        Idle with ``settle``: the server's memory is read again that long
        after the storm's end, while every peer is still registered.
        """
        server = await Server.listening(self, tls=False)
        registry = server.factory.registry
        counts = []
        original = ServerProbe.rss_kb

        def rss_kb(probe):
            counts.append(registry.peer_count)
            return original(probe)

        self.patch(ServerProbe, "rss_kb", rss_kb)
        started = time.monotonic()
        result = await bench("idle", server.url(), settle=1.5)
        self.assertTrue(result["ok"], result)
        self.assertGreaterEqual(time.monotonic() - started, 1.5)
        self.assertEqual(result["settle_seconds"], 1.5)
        self.assertGreater(result["rss_settled_kb"], 0)
        self.assertIsNotNone(result["rss_settled_per_peer_bytes"])
        # Before the storm, right after it, and settled: every peer still there.
        self.assertEqual(counts, [0, 30, 30])

    async def test_rooms_sees_every_notice_and_message_arrive(self):
        """Rooms: every join notice and every member-to-member message is counted."""
        server = await Server.listening(self, tls=False)
        result = await bench("rooms", server.url())
        self.assertTrue(result["ok"], result)
        self.assertEqual(result["notices_expected"], 2 * (4 * 3 // 2))
        self.assertEqual(result["notices_received"], result["notices_expected"])
        self.assertEqual(result["messages_expected"], 2 * 4 * 3)
        self.assertEqual(result["messages_received"], result["messages_expected"])
        self.assertGreater(result["total_seconds"], 0)
        self.assertCpuReported(result)


    async def test_soak_churns_and_leaves_nothing_behind(self):
        """
        Soak: peers churn through rooms and calls for the duration; every
        cycle succeeds, every room is empty and a churned uid free at the
        end, and the server's memory is sampled.
        """
        server = await Server.listening(self, tls=False)
        result = await bench("soak", server.url())
        self.assertTrue(result["ok"], result)
        self.assertGreater(result["cycles"], 10)
        self.assertEqual(result["failures"], 0)
        for key in ("rss_start_kb", "rss_max_kb", "rss_end_kb"):
            self.assertGreater(result[key], 0, key)
        self.assertCpuReported(result)
        self.assertTrue(server.registry.is_empty())


class JsonScenarioTests(unittest.TestCase):
    """
    The idle, relay and setup scenarios in the JSON dialect (``--dialect
    json``), against our server with the path pinned to it.
    """

    async def json_server(self):
        server = await Server.listening(self, tls=False)
        change_settings(server.factory, dialect_paths={"/json": "json"})
        return server

    async def test_idle_registers_every_producer_and_every_one_is_answered(self):
        """
        Idle: every producer is registered and answered, and the memory per peer
        is reported.
        """
        server = await self.json_server()
        result = await bench("idle", server.url("/json"), dialect="json")
        self.assertTrue(result["ok"], result)
        self.assertEqual((result["registered"], result["answered"]), (30, 30))
        self.assertIsNotNone(result["rss_per_peer_bytes"])

    async def test_relay_sends_peer_messages_both_ways_in_order(self):
        """
        Relay: peer messages make round trips without errors, relayed as JSON
        messages and none as examples ones.
        """
        server = await self.json_server()
        result = await bench("relay", server.url("/json"), dialect="json", size=300)
        self.assertTrue(result["ok"], result)
        self.assertEqual(result["errors"], 0)
        self.assertGreater(result["round_trips"], 0)
        self.assertGreater(server.stats.json_messages, 0)
        self.assertEqual(server.stats.session_messages, 0)

    async def test_setup_makes_whole_json_sessions(self):
        """
        Setup: whole JSON sessions are made without a failure, and nothing is
        left on the server after.
        """
        server = await self.json_server()
        result = await bench("setup", server.url("/json"), dialect="json")
        self.assertTrue(result["ok"], result)
        self.assertEqual(result["failures"], 0)
        self.assertGreater(result["calls"], 0)
        await server.wait_for_connections(0)
        self.assertTrue(server.registry.is_empty())

    def test_json_runs_only_the_scenarios_it_changes(self):
        """``--dialect json`` with a scenario it does not change (rooms) is refused."""
        with self.assertRaises(SystemExit):
            cli.parse_args(["ws://127.0.0.1:1/", "--dialect", "json", "--scenarios", "rooms"])


class BrokenServerTests(unittest.TestCase):
    """The checks of the scenarios catch a server that loses something."""

    async def broken_server(self, protocol=SignallingServerProtocol, connection=None):
        """
        :returns: our server, its connections built from ``protocol``, with
            their logic in ``connection`` (a :class:`Connection` subclass).
        """
        server = await Server.listening(self, tls=False)
        if connection is not None:
            change_settings(
                server.factory,
                dialects=DIALECTS.replacing(
                    dataclasses.replace(DIALECTS["examples"], connection=connection)
                ),
            )
        server.factory.protocol = protocol
        return server

    async def test_rooms_reports_a_dropped_join_notice(self):
        """A server that drops one ROOM_PEER_JOINED fails the room scenario."""

        class DropsOneNotice(Connection):
            dropped = False

            def room_peer_joined(self, room_id, uid):
                if not DropsOneNotice.dropped:
                    DropsOneNotice.dropped = True
                    return
                super().room_peer_joined(room_id, uid)

        server = await self.broken_server(connection=DropsOneNotice)
        result = await bench("rooms", server.url(), timeout=SHORT_TIMEOUT)
        self.assertTrue(DropsOneNotice.dropped)
        self.assertFalse(result["ok"])
        self.assertEqual(result["notices_received"], result["notices_expected"] - 1)
        self.assertEqual(result["messages_received"], result["messages_expected"])
        self.assertGreater(result["errors"], 0)

    async def test_rooms_reports_a_duplicated_message(self):
        """A server that delivers one room message twice fails the room scenario."""

        class DuplicatesOneMessage(Connection):
            doubled = False

            def room_message(self, sender_uid, payload):
                super().room_message(sender_uid, payload)
                if not DuplicatesOneMessage.doubled:
                    DuplicatesOneMessage.doubled = True
                    super().room_message(sender_uid, payload)

        server = await self.broken_server(connection=DuplicatesOneMessage)
        result = await bench("rooms", server.url(), timeout=SHORT_TIMEOUT)
        self.assertTrue(DuplicatesOneMessage.doubled)
        self.assertFalse(result["ok"])
        self.assertGreater(result["errors"], 0)

    async def test_idle_reports_a_peer_that_does_not_answer(self):
        """A server that ignores one idle peer's question fails the idle scenario."""

        class IgnoresOnePeer(SignallingServerProtocol):
            ignored = False

            def onMessage(self, payload, isBinary):
                if payload.startswith(b"SESSION ") and not IgnoresOnePeer.ignored:
                    IgnoresOnePeer.ignored = True
                    return
                super().onMessage(payload, isBinary)

        server = await self.broken_server(IgnoresOnePeer)
        result = await bench("idle", server.url(), timeout=SHORT_TIMEOUT)
        self.assertTrue(IgnoresOnePeer.ignored)
        self.assertFalse(result["ok"])
        self.assertEqual(result["registered"], 30)
        self.assertEqual(result["answered"], 29)

    async def test_idle_counts_a_refusal_as_no_answer(self):
        """
        A peer refused with "try again later" (a cluster node that lost
        Redis) did not answer: the idle scenario fails and counts it.
        """

        class RefusesOnePeer(SignallingServerProtocol):
            refused = False

            def onMessage(self, payload, isBinary):
                if payload.startswith(b"SESSION ") and not RefusesOnePeer.refused:
                    RefusesOnePeer.refused = True
                    self.sendMessage(b"ERROR server unavailable, try again later")
                    return
                super().onMessage(payload, isBinary)

        server = await self.broken_server(RefusesOnePeer)
        result = await bench("idle", server.url(), timeout=SHORT_TIMEOUT)
        self.assertTrue(RefusesOnePeer.refused)
        self.assertFalse(result["ok"])
        self.assertEqual((result["answered"], result["unavailable"]), (29, 1))
        self.assertTrue(any("unavailable" in r for r in result["reasons"]), result["reasons"])

    async def test_soak_reports_a_room_left_with_a_member(self):
        """A server that keeps one leaver in its room fails the soak's check."""

        class KeepsOneMember(Registry):
            kept = False

            def remove(self, uid, peer):
                if not KeepsOneMember.kept and uid in self._room_of:
                    KeepsOneMember.kept = True
                    # Forget the peer but leave it in its room.
                    self._peers.pop(uid, None)
                    return
                super().remove(uid, peer)

        server = await self.broken_server()
        broken = KeepsOneMember()
        server.factory.registry = broken
        result = await bench("soak", server.url(), timeout=SHORT_TIMEOUT)
        self.assertTrue(KeepsOneMember.kept)
        self.assertFalse(result["ok"])
        self.assertTrue(any("not empty" in r for r in result["reasons"]), result["reasons"])
        # What the broken registry left behind is not the real registry's.
        broken._rooms.clear()
        broken._room_of.clear()

    async def test_relay_reports_a_lost_message(self):
        """A server that loses one relayed message fails the relay scenario."""

        class LosesOneMessage(SignallingServerProtocol):
            lost = False

            def onMessage(self, payload, isBinary):
                # (No connection logic yet before the first message chose a dialect.)
                link = self.connection.link if self.connection is not None else None
                if link is not None and not LosesOneMessage.lost:
                    LosesOneMessage.lost = True
                    return
                super().onMessage(payload, isBinary)

        server = await self.broken_server(LosesOneMessage)
        result = await bench("relay", server.url(), timeout=SHORT_TIMEOUT)
        self.assertTrue(LosesOneMessage.lost)
        self.assertFalse(result["ok"])
        self.assertGreater(result["errors"], 0)


def run_cli(*argv):
    """
    Run ``signalling-bench`` with ``argv`` in a thread.

    :returns: a Deferred firing with ``(status, stdout, stderr)``.
    """
    options = cli.parse_args(list(argv))
    stdout, stderr = io.StringIO(), io.StringIO()

    def work():
        out = cli.Output(options.json, stdout, stderr)
        try:
            return cli.run(options, out)
        finally:
            out.close()

    d = threads.deferToThread(work)
    d.addCallback(lambda status: (status, stdout.getvalue(), stderr.getvalue()))
    return d


class CommandLineTests(unittest.TestCase):
    """The ``signalling-bench`` command."""

    def setUp(self):
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def assertUsageError(self, *argv):
        """``argv`` is refused with status 2."""
        exc = self.assertRaises(SystemExit, cli.parse_args, list(argv))
        self.assertEqual(exc.code, 2)

    def test_bad_command_lines_are_refused(self):
        """Unknown scenarios, bad URLs and numbers, and lone --compare-pid are usage errors."""
        self.assertUsageError("ws://127.0.0.1:1", "--scenarios", "relay,nap")
        self.assertUsageError("http://127.0.0.1:1")
        self.assertUsageError("ws://127.0.0.1:1", "--pairs", "0")
        self.assertUsageError("ws://127.0.0.1:1", "--duration", "inf")
        self.assertUsageError("ws://127.0.0.1:1", "--compare-pid", "1")
        self.assertUsageError("ws://127.0.0.1:1", "--size", "8")
        self.assertUsageError("ws://127.0.0.1:1", "--scenarios", "none")

    def test_compare_defaults_to_two_rounds(self):
        """With --compare, each scenario runs twice against each server unless told."""
        self.assertEqual(cli.parse_args(["ws://a:1"]).rounds, 1)
        self.assertEqual(cli.parse_args(["ws://a:1", "--compare", "ws://b:1"]).rounds, 2)

    async def test_compare_alternates_servers_and_reports_ratios(self):
        """--compare runs A, B, A, B, writes a JSON line per run and one comparison per scenario."""
        ours = await Server.listening(self, tls=False)
        theirs = await Server.listening(self, tls=False)
        path = self.mktemp()
        status, stdout, stderr = await run_cli(
            ours.url(), "--server-pid", str(os.getpid()),
            "--compare", theirs.url(),
            "--name", "ours", "--compare-name", "theirs",
            "--scenarios", "rooms,idle", "--rooms", "1", "--members", "3",
            "--peers", "10", "--processes", "2", "--loop", "asyncio",
            "--json", path,
        )  # fmt: skip
        self.assertEqual(status, cli.EXIT_OK, stderr)
        with open(path) as f:
            lines = [json.loads(line) for line in f]
        runs = [line for line in lines if "comparison" not in line]
        self.assertEqual(
            [(r["round"], r["scenario"], r["target"]) for r in runs],
            [
                (1, "rooms", "ours"), (1, "rooms", "theirs"),
                (1, "idle", "ours"), (1, "idle", "theirs"),
                (2, "rooms", "ours"), (2, "rooms", "theirs"),
                (2, "idle", "ours"), (2, "idle", "theirs"),
            ],
        )  # fmt: skip
        self.assertTrue(all(r["ok"] for r in runs))
        self.assertIsNone(runs[1]["server_cpu_percent"])
        comparisons = {line["scenario"]: line for line in lines if "comparison" in line}
        self.assertEqual(set(comparisons), {"rooms", "idle"})
        rooms = comparisons["rooms"]["metrics"]["total_seconds"]
        self.assertEqual(rooms["ratio"], rooms["ours"] / rooms["theirs"])
        self.assertIn("ours / theirs", stdout)
        self.assertIn("rooms: 1 rooms x 3 members", stdout)

    async def test_json_to_standard_output_moves_the_tables_to_standard_error(self):
        """--json - writes only JSON lines on standard output."""
        server = await Server.listening(self, tls=False)
        status, stdout, stderr = await run_cli(
            server.url(), "--scenarios", "rooms", "--rooms", "1", "--members", "2",
            "--processes", "1", "--loop", "asyncio", "--json", "-",
        )  # fmt: skip
        self.assertEqual(status, cli.EXIT_OK, stderr)
        [line] = stdout.splitlines()
        self.assertEqual(json.loads(line)["scenario"], "rooms")
        self.assertIn("rooms: 1 rooms x 2 members", stderr)

    async def test_uvloop_client_processes_over_tls(self):
        """
        --loop uvloop (what auto picks: the bench and test extras install it)
        runs the client processes on uvloop, TLS included, and says so.
        """
        if importlib.util.find_spec("uvloop") is None:
            message = "uvloop is not installed (the test and bench extras)"
            if os.environ.get("CI"):
                self.fail(message)
            raise unittest.SkipTest(message)
        server = await Server.listening(self, tls=True)
        ca_file = self.mktemp()
        with open(ca_file, "wb") as f:
            f.write(server.pem)
        status, stdout, stderr = await run_cli(
            server.url(), "--ca-file", ca_file, "--scenarios", "setup,rooms",
            "--setup-workers", "2", "--duration", "0.5", "--rooms", "1", "--members", "3",
            "--processes", "1", "--loop", "uvloop", "--json", "-",
        )  # fmt: skip
        self.assertEqual(status, cli.EXIT_OK, stderr)
        self.assertIn("client processes run the uvloop event loop", stderr)
        runs = [json.loads(line) for line in stdout.splitlines()]
        self.assertEqual([r["scenario"] for r in runs], ["setup", "rooms"])
        self.assertTrue(all(r["ok"] for r in runs), runs)
        self.assertGreater(runs[0]["calls"], 0)

    async def test_failed_check_gives_status_1(self):
        """A run whose checks fail (nothing listens there) ends with status 1."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            url = f"ws://127.0.0.1:{sock.getsockname()[1]}/"
        status, stdout, stderr = await run_cli(
            url, "--scenarios", "idle", "--peers", "3", "--processes", "1",
            "--loop", "asyncio", "--timeout", "2",
        )  # fmt: skip
        self.assertEqual(status, cli.EXIT_CHECK_FAILED, stderr)
        self.assertIn("NO", stdout)

    async def test_plot_sweeps_the_offered_load_and_writes_pngs(self):
        """--plot runs the relay at each load of --sweep and writes three PNG files."""
        if importlib.util.find_spec("matplotlib") is None:
            message = "matplotlib is not installed (the test and bench extras)"
            if os.environ.get("CI") == "true":
                self.fail(message)
            raise unittest.SkipTest(message)
        server = await Server.listening(self, tls=False)
        directory = self.mktemp()
        path = self.mktemp()
        status, stdout, stderr = await run_cli(
            server.url(), "--scenarios", "none", "--plot", directory,
            "--sweep", "1,4", "--pairs", "2", "--duration", "0.5", "--warmup", "0",
            "--processes", "1", "--loop", "asyncio", "--json", path,
        )  # fmt: skip
        self.assertEqual(status, cli.EXIT_OK, stderr)
        with open(path) as f:
            points = [json.loads(line) for line in f]
        self.assertEqual([(p["pairs"], p["inflight"]) for p in points], [(1, 1), (2, 2)])
        self.assertTrue(all(p["sweep"] and p["ok"] for p in points))
        for name in ("relay-throughput.png", "relay-latency.png", "relay-latency-throughput.png"):
            with open(os.path.join(directory, name), "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")


class OpenSSLCostTests(unittest.TestCase):
    """benchmarks/openssl-cost: OpenSSL's own share of a TLS connection."""

    def test_reports_handshake_cpu_and_heap_per_connection(self):
        """It completes real TLS 1.3 handshakes and reports what they cost."""
        script = os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            "benchmarks",
            "openssl-cost",
        )
        d = utils.getProcessOutputAndValue(
            sys.executable, [script, "50"], env=dict(os.environ), reactor=reactor
        )

        def check(result):
            out, err, code = result
            self.assertEqual(code, 0, err)
            report = json.loads(out)
            self.assertEqual(report["handshakes"], 50)
            self.assertEqual(report["protocol"], "TLSv1.3")
            self.assertGreater(report["server_cpu_ms_per_handshake"], 0)
            # An established server connection keeps some kilobytes of C heap.
            self.assertGreater(report["server_heap_bytes_per_connection"], 1000)

        return d.addCallback(check)


class RoomPeakTests(unittest.TestCase):
    """benchmarks/room-peak: memory while a crowd joins one room and leaves."""

    timeout = 60

    async def test_reports_memory_around_each_crowd_and_the_crowd_leaves(self):
        """
        Each round of 30 members joining one room is reported with the memory
        after each second, and the crowd leaves nothing behind.
        """
        server = await Server.listening(self, tls=True)
        script = os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            "benchmarks",
            "room-peak",
        )
        ca_file = self.mktemp()
        with open(ca_file, "w") as f:
            f.write(server.pem if isinstance(server.pem, str) else server.pem.decode())
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable,
            [
                script, server.url(), "--server-pid", str(os.getpid()),
                "--members", "30", "--rounds", "2", "--settle", "1", "--ca-file", ca_file,
            ],
            env=dict(os.environ),
            reactor=reactor,
        )
        self.assertEqual(code, 0, err)
        rounds = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([r["round"] for r in rounds], [1, 2])
        for r in rounds:
            self.assertEqual(r["members"], 30)
            self.assertEqual(len(r["after_each_second"]), 1)
            self.assertGreater(r["joined"], 0)
        await server.wait_for_connections(0)
        self.assertTrue(server.registry.is_empty())


class ReportTests(unittest.TestCase):
    """Percentiles, the bottleneck verdict, and /proc readings."""

    def test_percentiles_use_the_nearest_rank(self):
        """p50, p99 and max of 1..100 ms are 50, 99 and 100 ms."""
        result = report.percentiles([n / 1000 for n in range(100, 0, -1)])
        self.assertAlmostEqual(result["p50"], 50)
        self.assertAlmostEqual(result["p99"], 99)
        self.assertAlmostEqual(result["max"], 100)
        self.assertEqual(report.percentiles([]), {"p50": None, "p99": None, "max": None})

    def test_bottleneck_names_the_saturated_side(self):
        """The side near a full core is the bottleneck; a busy machine is named too."""
        self.assertEqual(report.bottleneck(99, [20, 30]), "server")
        self.assertEqual(report.bottleneck(40, [95, 30]), "generator")
        self.assertEqual(report.bottleneck(95, [95]), "both")
        self.assertEqual(report.bottleneck(40, [30], 195, 2), "machine")
        self.assertEqual(report.bottleneck(40, [30], 80, 2), "neither")
        self.assertEqual(report.bottleneck(None, [30]), "unknown")

    def test_server_probe_reads_this_process(self):
        """CPU seconds and resident memory of a live process come from /proc."""
        probe = ServerProbe(os.getpid())
        self.assertGreater(probe.cpu(), 0)
        self.assertGreater(probe.rss_kb(), 1000)
        self.assertIsNone(ServerProbe(None).cpu())


class _FakeTransport:
    """Collects what a :class:`wsclient.Connection` writes."""

    def __init__(self):
        self.written = b""
        self.aborted = False

    def write(self, data):
        self.written += data

    def is_closing(self):
        return self.aborted

    def abort(self):
        self.aborted = True


class _FakeEndpoint:
    path = "/"
    host_header = "localhost"


def server_frame(opcode, payload, fin=True):
    """:returns: one unmasked frame, as a server sends it."""
    head = bytes([(0x80 if fin else 0) | opcode])
    if len(payload) < 126:
        return head + bytes([len(payload)]) + payload
    if len(payload) < 1 << 16:
        return head + bytes([126]) + struct.pack("!H", len(payload)) + payload
    return head + bytes([127]) + struct.pack("!Q", len(payload)) + payload


def client_frames(data):
    """:returns: the ``(opcode, unmasked payload)`` of the client frames in ``data``."""
    frames = []
    while data:
        opcode, length, offset = data[0] & 0x0F, data[1] & 0x7F, 2
        if length == 126:
            length, offset = struct.unpack("!H", data[2:4])[0], 4
        elif length == 127:
            length, offset = struct.unpack("!Q", data[2:10])[0], 10
        key = data[offset:offset + 4]
        payload = data[offset + 4:offset + 4 + length]
        frames.append((opcode, wsclient.apply_mask(payload, key)))
        data = data[offset + 4 + length:]
    return frames


class WebSocketClientTests(unittest.TestCase):
    """The generator's own WebSocket client, fed bytes by hand."""

    def setUp(self):
        self.loop = asyncio.new_event_loop()
        self.addCleanup(self.loop.close)
        self.connection = wsclient.Connection(self.loop, _FakeEndpoint())
        self.transport = _FakeTransport()
        self.connection.connection_made(self.transport)
        self.request = self.transport.written
        self.transport.written = b""

    def answer_handshake(self, accept=None):
        accept = accept or self.connection._accept
        self.connection.data_received(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )

    def test_handshake_checks_the_accept_header(self):
        """The upgrade is accepted only with the Sec-WebSocket-Accept of RFC 6455."""
        self.assertTrue(self.request.startswith(b"GET / HTTP/1.1\r\nHost: localhost\r\n"))
        self.answer_handshake(b"d3Jvbmc=")
        self.assertIsInstance(self.connection.opened.exception(), wsclient.HandshakeError)
        self.assertTrue(self.transport.aborted)

    def test_fragments_are_joined_and_pings_answered_in_between(self):
        """A fragmented message arrives whole; a ping between its fragments gets its pong."""
        received = []
        self.answer_handshake()
        self.assertIs(self.connection.opened.result(), self.connection)
        self.connection.set_handler(lambda payload, opcode: received.append((payload, opcode)))
        data = (
            server_frame(wsclient.TEXT, b"hel", fin=False)
            + server_frame(wsclient.PING, b"p")
            + server_frame(0, b"lo")
        )
        # Split at every byte boundary: frames may arrive in any pieces.
        for index in range(len(data)):
            self.connection.data_received(data[index:index + 1])
        self.assertEqual(received, [(b"hello", wsclient.TEXT)])
        self.assertEqual(client_frames(self.transport.written), [(wsclient.PONG, b"p")])

    def test_long_frames_are_read_and_written(self):
        """Frames with 16-bit and 64-bit lengths go both ways intact."""
        self.answer_handshake()
        medium, large = b"m" * 300, os.urandom(70000)
        data = server_frame(wsclient.TEXT, medium) + server_frame(wsclient.BINARY, large)
        self.connection.data_received(data[:1000])
        self.connection.data_received(data[1000:])
        self.assertEqual(
            list(self.connection._queue), [(medium, wsclient.TEXT), (large, wsclient.BINARY)]
        )
        self.connection.send(medium)
        self.connection.send(large, wsclient.BINARY)
        self.assertEqual(
            client_frames(self.transport.written),
            [(wsclient.TEXT, medium), (wsclient.BINARY, large)],
        )

    def test_a_close_frame_is_answered_with_the_same_code(self):
        """The server's close frame is echoed, and nothing is sent after it."""
        self.answer_handshake()
        self.connection.data_received(server_frame(wsclient.CLOSE, struct.pack("!H", 1000)))
        self.assertEqual(self.connection.close_code, 1000)
        self.connection.send_text("late")
        self.assertEqual(
            client_frames(self.transport.written), [(wsclient.CLOSE, struct.pack("!H", 1000))]
        )
        self.connection.connection_lost(None)
        self.assertEqual(self.connection.closed.result(), 1000)

    def test_pure_python_masking_matches_rfc_6455(self):
        """The fallback mask XORs each byte with the key byte at its position mod 4."""
        key = b"\x01\x02\x03\xff"
        for data in (b"", b"a", b"abcde", os.urandom(1001)):
            expected = bytes(b ^ key[i % 4] for i, b in enumerate(data))
            self.assertEqual(wsclient._py_apply_mask(data, key), expected)
            self.assertEqual(wsclient.apply_mask(data, key), expected)


# Servers of several nodes (a cluster on one Redis).


class PlacementTests(unittest.TestCase):
    """Which node each peer of a relay pair or a call goes to."""

    def test_the_share_of_relay_pairs_across_nodes_is_the_one_asked(self):
        """Of P pairs, P x share cross nodes (within one per node), for any share and node count."""
        for nodes in (2, 3, 4):
            for share in (0.0, 0.1, 0.25, 0.5, 2 / 3, 0.75, 1.0):
                for pairs in (4, 50, 200):
                    placed = [scenarios.relay_nodes(i, nodes, share) for i in range(pairs)]
                    crossing = sum(a != b for a, b in placed)
                    self.assertLessEqual(abs(crossing - pairs * share), nodes, (nodes, share, pairs))
                    self.assertTrue(all(0 <= n < nodes for pair in placed for n in pair))

    def test_every_node_carries_the_same_load(self):
        """Whatever the share, every node holds as many peers as the others (to a pair)."""
        for nodes in (2, 3, 4):
            for share in (0.0, 0.25, 0.5, 0.75, 1.0):
                pairs = 60 * nodes
                load = [0] * nodes
                for callee, caller in (scenarios.relay_nodes(i, nodes, share) for i in range(pairs)):
                    load[callee] += 1
                    load[caller] += 1
                self.assertLessEqual(max(load) - min(load), 2, (nodes, share, load))

    def test_each_set_up_worker_crosses_at_the_share_however_many_calls_it_makes(self):
        """A fast worker and a slow one both cross nodes in the share asked."""
        for share in (0.0, 0.3, 0.5, 1.0):
            for worker, calls in ((0, 7), (3, 100)):
                placed = [scenarios.call_nodes(worker, k, 20, 4, share) for k in range(calls)]
                crossing = sum(a != b for a, b in placed)
                self.assertLessEqual(abs(crossing - calls * share), 1, (share, worker, calls))

    def test_the_default_share_is_that_of_peers_placed_independently(self):
        """(N-1)/N for N nodes unless asked; nothing crosses on one node."""
        self.assertEqual(runner.cross_share({}, 1), 0.0)
        self.assertEqual(runner.cross_share({"cross_share": 1.0}, 1), 0.0)
        self.assertEqual(runner.cross_share({"cross_share": None}, 2), 0.5)
        self.assertEqual(runner.cross_share({}, 4), 0.75)
        self.assertEqual(runner.cross_share({"cross_share": 0.0}, 4), 0.0)
        self.assertEqual([scenarios.relay_nodes(i, 1, 1.0) for i in range(3)], [(0, 0)] * 3)


class NodeRoutingTests(unittest.TestCase):
    """A client process's connections go to the node they are meant for."""

    async def test_a_named_node_or_else_the_next_in_turn(self):
        """
        A peer registers on the node it names, or else on the next node in turn
        from the first one given.
        """
        servers = [await Server.listening(self, tls=False) for _ in range(2)]
        endpoints = [wsclient.Endpoint(wsclient.Target(s.url())) for s in servers]
        loop = asyncio.new_event_loop()
        control = scenarios.Control(endpoints, sync=None, first=1)

        async def register():
            # Named nodes, then two more in turn from node 1: 1, 0.
            for uid, node in (("on0", 0), ("on1", 1), ("next1", None), ("next0", None)):
                await control.hello(uid, TIMEOUT, node=node)

        await threads.deferToThread(loop.run_until_complete, register())
        try:
            self.assertEqual(control.nodes, 2)
            self.assertIs(control.endpoint, endpoints[0])
            self.assertEqual(
                [sorted(s.registry._peers) for s in servers], [["next0", "on0"], ["next1", "on1"]]
            )
        finally:
            await threads.deferToThread(loop.run_until_complete, control.cleanup())
            loop.close()
        for server in servers:
            await server.wait_for_connections(0)


def redis_publishes(port):
    """:returns: how many PUBLISH commands the Redis server on ``port`` ran (blocking)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"INFO commandstats\r\n")
        data = b""
        while True:
            data += sock.recv(65536)
            head, _, rest = data.partition(b"\r\n")
            if head.startswith(b"$") and len(rest) >= int(head[1:]):
                break
    for line in rest.decode().splitlines():
        if line.startswith("cmdstat_publish:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def health(port):
    """:returns: the status of ``GET /health`` on ``port``, or None (blocking)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


class ClusterTests(ProcessMixin, unittest.TestCase):
    """
    The scenarios against two real ``twistd -n signalling --redis``
    processes on one real ``redis-server``: peers spread over both nodes,
    relay pairs and calls placed within or across nodes as asked (Redis
    counts the relays that crossed), CPU and memory per process and Redis's.
    """

    timeout = 120

    def setUp(self):
        ProcessMixin.setUp(self)
        return defer.ensureDeferred(self.start_cluster())

    async def start_cluster(self):
        self.redis = RedisServer(self)
        await self.redis.start()
        self.ports = []
        self.pids = []
        for _ in range(2):
            process, port = await self.start_server(
                "tcp:{port}:interface=127.0.0.1", "--redis", self.redis.url
            )
            self.ports.append(port)
            self.pids.append(process.transport.pid)
        deadline = time.monotonic() + 15
        for port in self.ports:
            while (await threads.deferToThread(health, port)) != 200:
                if time.monotonic() > deadline:
                    self.fail(f"/health on {port} did not answer 200")
                await pause(0.05)
        self.urls = [f"ws://127.0.0.1:{port}/" for port in self.ports]
        self.redis_pid = self.redis._process.transport.pid

    def bench(self, name, **params):
        return bench(name, self.urls, pid=self.pids, redis_pid=self.redis_pid, **params)

    def publishes(self):
        return threads.deferToThread(redis_publishes, self.redis.port)

    def assertClusterCpu(self, result):
        """Each node's CPU, their sum and Redis's are there."""
        self.assertEqual(result["nodes"], 2)
        self.assertEqual(len(result["server_cpu_percent_each"]), 2)
        self.assertAlmostEqual(result["server_cpu_percent"], sum(result["server_cpu_percent_each"]))
        self.assertGreaterEqual(result["redis_cpu_percent"], 0)

    async def test_relay_pairs_cross_nodes_in_the_share_asked(self):
        """
        Half the pairs across the nodes: their round trips and times are
        kept apart. All on one node: nothing goes through Redis. All across:
        every round trip does.
        """
        result = await self.bench("relay", pairs=4, cross_share=0.5)
        self.assertTrue(result["ok"], result)
        self.assertClusterCpu(result)
        self.assertEqual(result["cross_share_placed"], 0.5)
        self.assertGreater(result["round_trips_cross"], 0)
        self.assertGreater(result["round_trips"], result["round_trips_cross"])
        self.assertAlmostEqual(result["cross_share"], result["round_trips_cross"] / result["round_trips"])
        for kind in ("same", "cross"):
            self.assertGreater(result[f"rtt_{kind}_p50_ms"], 0)
            self.assertLessEqual(result[f"rtt_{kind}_p50_ms"], result[f"rtt_{kind}_p99_ms"])

        before = await self.publishes()
        same = await self.bench("relay", pairs=4, cross_share=0.0)
        between = await self.publishes()
        cross = await self.bench("relay", pairs=4, cross_share=1.0)
        after = await self.publishes()
        self.assertTrue(same["ok"] and cross["ok"], (same, cross))
        self.assertEqual((same["cross_share"], same["round_trips_cross"]), (0.0, 0))
        self.assertIsNone(same["rtt_cross_p50_ms"])
        self.assertEqual(cross["cross_share"], 1.0)
        self.assertIsNone(cross["rtt_same_p50_ms"])
        # Sessions and closes publish a few notices; relayed messages only across.
        self.assertLess(between - before, 50)
        self.assertGreaterEqual(after - between, cross["round_trips"])

    async def test_calls_cross_nodes_in_the_share_asked(self):
        """Every call across the nodes, then none: set-up times apart, all calls whole."""
        cross = await self.bench("setup", cross_share=1.0)
        self.assertTrue(cross["ok"], cross)
        self.assertClusterCpu(cross)
        self.assertGreater(cross["calls"], 0)
        self.assertEqual(cross["calls_cross"], cross["calls"])
        self.assertEqual(cross["cross_share"], 1.0)
        self.assertIsNone(cross["setup_same_p50_ms"])
        self.assertGreater(cross["setup_cross_p99_ms"], 0)
        same = await self.bench("setup", cross_share=0.0)
        self.assertTrue(same["ok"], same)
        self.assertEqual((same["calls_cross"], same["cross_share"]), (0, 0.0))
        self.assertGreater(same["setup_same_p50_ms"], 0)

    async def test_idle_peers_spread_over_the_nodes_and_all_answer(self):
        """Idle: half the peers on each node, all answer; memory per node and Redis's."""
        result = await self.bench("idle")
        self.assertTrue(result["ok"], result)
        self.assertEqual(result["registered_per_node"], [15, 15])
        self.assertEqual(result["answered"], 30)
        self.assertGreater(result["answer_seconds"], 0)
        self.assertEqual(result["answers_per_s"], 30 / result["answer_seconds"])
        self.assertEqual(len(result["rss_after_kb_each"]), 2)
        self.assertEqual(result["rss_after_kb"], sum(result["rss_after_kb_each"]))
        self.assertEqual(len(result["rss_per_peer_bytes_each"]), 2)
        self.assertGreater(result["redis_rss_after_kb"], 0)
        self.assertIsNotNone(result["redis_rss_per_peer_bytes"])
        self.assertClusterCpu(result)

    async def test_rooms_and_the_command_line(self):
        """
        Rooms with members on both nodes; and signalling-bench with the
        nodes' URLs and pids separated by commas: a table with the nodes'
        columns, the CPU of each process, Redis's.
        """
        rooms = await self.bench("rooms")
        self.assertTrue(rooms["ok"], rooms)
        path = self.mktemp()
        status, stdout, stderr = await run_cli(
            ",".join(self.urls), "--server-pid", ",".join(map(str, self.pids)),
            "--redis-pid", str(self.redis_pid), "--scenarios", "relay,setup",
            "--pairs", "4", "--duration", "0.5", "--warmup", "0", "--setup-workers", "2",
            "--cross-share", "0.5", "--processes", "2", "--loop", "asyncio", "--json", path,
        )  # fmt: skip
        self.assertEqual(status, cli.EXIT_OK, stderr)
        with open(path) as f:
            relay, setup = [json.loads(line) for line in f]
        self.assertEqual(relay["url"], ",".join(self.urls))
        self.assertEqual((relay["nodes"], relay["cross_share_placed"]), (2, 0.5))
        self.assertEqual(setup["cross_share_asked"], 0.5)
        self.assertIn("2 nodes ws://", stderr)
        for header in ("cross p99", "same p99", "Redis CPU"):
            self.assertIn(header, stdout)


class ClusterCommandLineTests(unittest.TestCase):
    """The command line of servers with several nodes."""

    def setUp(self):
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def test_nodes_and_pids_separated_by_commas(self):
        """
        Nodes' URLs and pids are separated by commas; ``--cross-share`` goes to
        the scenarios, None unless given.
        """
        options = cli.parse_args(
            ["ws://a:1,wss://b:2/x", "--server-pid", f"{os.getpid()},{os.getppid()}",
             "--cross-share", "0.25", "--compare", "ws://c:3"]
        )  # fmt: skip
        self.assertEqual(options.url, ["ws://a:1", "wss://b:2/x"])
        self.assertEqual(options.server_pid, [os.getpid(), os.getppid()])
        self.assertEqual(options.compare, ["ws://c:3"])
        self.assertEqual(cli.scenario_params("relay", options)["cross_share"], 0.25)
        self.assertIsNone(cli.scenario_params("setup", cli.parse_args(["ws://a:1"]))["cross_share"])

    def test_bad_cluster_command_lines_are_refused(self):
        """
        An empty or non-WebSocket node URL, a bad or absent pid, a cross share
        out of range or on one node, and a Redis pid to compare with nothing are
        refused (exit 2).
        """
        for argv in (
            ["ws://a:1,"],
            ["ws://a:1,http://b:2"],
            ["ws://a:1,ws://b:2", "--cross-share", "1.5"],
            ["ws://a:1", "--cross-share", "0.5"],
            ["ws://a:1", "--server-pid", "1,x"],
            ["ws://a:1", "--compare-redis-pid", "1"],
            ["ws://a:1", "--server-pid", str(2**22 + 12345)],
        ):
            exc = self.assertRaises(SystemExit, cli.parse_args, argv)
            self.assertEqual(exc.code, 2, argv)


class ClusterReportTests(unittest.TestCase):
    """Tables, comparisons and verdicts for servers of several processes."""

    def result(self, **fields):
        base = {
            "scenario": "relay", "pairs": 4, "inflight": 2, "size": 100, "duration": 1.0,
            "messages_per_s": 1000.0, "rtt_p50_ms": 1.0, "rtt_p99_ms": 2.0, "rtt_max_ms": 3.0,
            "errors": 0, "ok": True, "generator_cpu_percent": [10.0],
        }  # fmt: skip
        base.update(fields)
        return base

    def test_the_busiest_process_or_redis_is_the_bottleneck(self):
        """
        Redis near a full core is the bottleneck, or shares it with the server;
        a Redis that is not busy leaves the verdict to the others.
        """
        self.assertEqual(report.bottleneck(40, [30], 150, 2, redis_percent=95), "redis")
        self.assertEqual(report.bottleneck(95, [30], 190, 2, redis_percent=95), "server+redis")
        self.assertEqual(report.bottleneck(95, [95], 190, 2, redis_percent=10), "both")
        self.assertEqual(report.bottleneck(None, [30], redis_percent=90), "redis")

    def test_tables_show_nodes_cross_share_and_each_process(self):
        """
        Tables and comparisons show the cross share, cross-node round trips and
        each process's CPU only when a server of several nodes is in them.
        """
        single = self.result(target="one")
        cluster = self.result(
            target="four", nodes=4, cross_share=0.75, rtt_same_p50_ms=0.5, rtt_same_p99_ms=1.5,
            rtt_cross_p50_ms=2.5, rtt_cross_p99_ms=4.5, server_cpu_percent=160.0,
            server_cpu_percent_each=[40.0, 40.0, 40.0, 40.0], redis_cpu_percent=30.0,
        )  # fmt: skip
        self.assertNotIn("cross p99", report.scenario_table([single]))
        table = report.scenario_table([single, cluster])
        for text in ("cross p99", "4.50", "75%", "160% (40 40 40 40)", "Redis CPU", "30%"):
            self.assertIn(text, table)
        comparison = report.compare([cluster, single], "four", "one")
        cross = comparison["metrics"]["rtt_cross_p99_ms"]
        self.assertEqual((cross["four"], cross["one"], cross["ratio"]), (4.5, None, None))
        self.assertIn("cross-node round trip p99", report.comparison_table(comparison))
        self.assertNotIn("rtt_cross_p99_ms", report.compare([single, single], "one", "one")["metrics"])

    def test_a_probe_of_several_processes_sums_them(self):
        """
        A probe of several pids reads each and sums them, Redis apart; no pid
        reads nothing, and a pid that does not exist is an error.
        """
        pids = [os.getpid(), os.getppid()]
        probe = ServerProbe(pids, redis_pid=os.getpid())
        self.assertEqual(len(probe.cpu_each()), 2)
        # (This process's memory may move between two readings.)
        self.assertLessEqual(abs(probe.rss_kb() - sum(probe.rss_each())), 1024)
        self.assertGreater(probe.redis_rss_kb(), 1000)
        self.assertEqual(probe.pid, os.getpid())
        self.assertIsNone(ServerProbe(None).rss_each())
        self.assertRaises(runner.BenchError, ServerProbe(2**22 + 12345).cpu)


class ClusterScalingScriptTests(unittest.TestCase):
    """benchmarks/cluster-scaling: its own Redis and nodes, every phase (TLS storm included), all stopped after."""

    timeout = 180

    async def test_scaling_and_capacity_with_tiny_sizes(self):
        """
        With tiny sizes every phase makes its table without a failure, and every
        node the script started was shut down cleanly.
        """
        if shutil.which("redis-server") is None:
            missing_requirement("redis-server; install the Debian package redis-server")
        script = os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            "benchmarks",
            "cluster-scaling",
        )
        out = os.path.abspath(self.mktemp())
        stdout, stderr, code = await utils.getProcessOutputAndValue(
            sys.executable,
            [
                script, "--out", out, "--nodes", "0,2", "--transports", "plain", "--rounds", "1",
                "--duration", "0.5", "--processes", "1", "--capacity-peers", "200",
                "--capacity-nodes", "2", "--storm-peers", "40",
            ],
            env=dict(os.environ),
            reactor=reactor,
        )  # fmt: skip
        self.assertEqual(code, 0, stdout.decode() + stderr.decode())
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        self.assertEqual(summary["failures"], [])
        relay = {row["server"]: row for row in summary["tables"]["relay-plain"]}
        self.assertEqual(
            set(relay),
            {"1 process, no Redis", "2 nodes", "2 nodes, every pair within a node",
             "2 nodes, every pair across nodes"},
        )  # fmt: skip
        self.assertEqual(relay["2 nodes"]["cross_share_placed"], 0.5)
        self.assertEqual(relay["2 nodes, every pair across nodes"]["cross_share"], 1.0)
        self.assertGreater(relay["2 nodes"]["node_cpu_per_unit"], 0)
        self.assertIn("setup-plain", summary["tables"])
        storm = {row["server"]: row for row in summary["tables"]["storm-tls"]}
        self.assertEqual(set(storm), {"2 nodes", "1 node", "1 process, no Redis"})
        self.assertTrue(all(row["ok"] and row["hellos_per_s"] > 0 for row in storm.values()), storm)
        [capacity] = summary["tables"]["capacity"]
        self.assertEqual(
            (capacity["registered"], capacity["answered"], capacity["registered_per_node"]),
            (200, 200, [100, 100]),
        )
        with open(os.path.join(out, "summary.md")) as f:
            self.assertIn("### Capacity: idle registered peers", f.read())
        # Every node it started was stopped (and shut down cleanly).
        logs = os.path.join(out, "logs")
        nodes = [name for name in os.listdir(logs) if re.search(r"-node\d+\.log$", name)]
        # The certificate's; the scaling's baseline and 2 nodes; the storm's
        # 2 nodes, 1 node and baseline; the capacity's 2 nodes.
        self.assertEqual(len(nodes), 1 + 3 + 4 + 2)
        for name in nodes:
            with open(os.path.join(logs, name)) as f:
                text = f.read()
            self.assertIn("Server Shut Down", text, name)
            self.assertNotIn("Traceback", text, name)


class WorkersScriptTests(unittest.TestCase):
    """benchmarks/workers-storm and benchmarks/workers-capacity, with tiny sizes."""

    timeout = 180

    async def run_script(self, name, *args):
        if shutil.which("redis-server") is None:
            missing_requirement("redis-server; install the Debian package redis-server")
        script = os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", name
        )
        out = os.path.abspath(self.mktemp())
        os.makedirs(out)
        stdout, stderr, code = await utils.getProcessOutputAndValue(
            "/bin/bash", [script, *args],
            env=dict(os.environ, OUT=out, PYTHON=sys.executable), reactor=reactor,
        )  # fmt: skip
        output = stdout.decode() + stderr.decode()
        self.assertEqual(code, 0, output)
        with open(os.path.join(out, "results.jsonl")) as f:
            return [json.loads(line) for line in f], output

    async def test_workers_capacity_registers_and_asks_every_peer(self):
        """Every peer of a tiny capacity run on two workers registers and answers; no node is released."""
        rows, output = await self.run_script("workers-capacity", "200", "2")
        [row] = rows
        self.assertEqual((row["registered"], row["answered"], row["failures"]), (200, 200, 0))
        self.assertEqual(len(row["server_cpu_percent_each"]), 2)
        self.assertIn("released by the others: 0; lost Redis: 0", output)

    async def test_workers_storm_compares_four_workers_with_one_process(self):
        """A tiny TLS storm runs against four workers and one process, alternating, twice each."""
        rows, _ = await self.run_script("workers-storm", "40")
        # The runs (the file also holds the comparison of their medians).
        rows = [row for row in rows if "target" in row]
        self.assertEqual(
            sorted((row["target"], row["round"]) for row in rows),
            sorted([(t, r) for t in ("4 workers", "1 process, no Redis") for r in (1, 2)]),
        )
        self.assertTrue(all(row["ok"] and row["registered"] == 40 for row in rows), rows)


class RelayCpuScriptTests(unittest.TestCase):
    """benchmarks/relay-cpu, with tiny sizes."""

    timeout = 60

    async def test_it_relays_every_message_of_both_dialects_through_the_servers_objects(self):
        """
        The script sets up a session of each dialect in memory, relays every
        message, and reports microseconds per message for this tree.
        """
        script = os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "relay-cpu"
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for dialect in ("examples", "json"):
            stdout, stderr, code = await utils.getProcessOutputAndValue(
                sys.executable, [script, "--dialect", dialect, "--messages", "64", "--batch", "8"],
                env=dict(os.environ, PYTHONPATH=root), reactor=reactor,
            )  # fmt: skip
            output = stdout.decode() + stderr.decode()
            self.assertEqual(code, 0, output)
            self.assertRegex(output, rf"^{dialect}: [\d.]+ µs per relayed message \({re.escape(root)}\)")

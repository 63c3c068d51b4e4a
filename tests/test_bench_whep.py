"""
Tests of the WHEP scenarios of ``signalling-bench`` (``whep-setup`` and
``whep-latency``, :mod:`signalling.tools.bench.whep`): each runs briefly, in
client processes of its own, against our server on a loopback port in this
process (see tests/test_bench.py), and what the generator reports must
agree with what the server counted (its metrics) and with what the bench's
producers saw. Checks are shown to catch a server that answers without the
producer's candidates, or that does not end a session when asked.
"""

import io
import json
import os
import sys

from twisted.internet import reactor, threads, utils
from twisted.trial import unittest

from signalling.core import http_connections, sdp
from signalling.tools.bench import cli, report, whep, wsclient
from signalling.tools.bench.runner import Pool, run_scenario
from tests.servers import Server

#: Bound for one expected message in the scenarios that should pass.
TIMEOUT = 5.0
#: Where a session never ends: how long the producers wait for it.
SHORT_TIMEOUT = 1.0

TINY = {
    "whep-setup": {"workers_per_target": 3, "producers": 3, "duration": 1.0},
    "json-consumer-setup": {"workers_per_target": 3, "producers": 3, "duration": 1.0},
    "whep-latency": {"workers_per_target": 1, "producers": 2, "duration": 1.0},
}


def whep_bench(name, url, timeout=TIMEOUT, ca_file=None, **params):
    """
    Run WHEP scenario ``name`` against ``url`` with two client processes,
    from a thread (this process is the server, so its pid gives the
    server's CPU).

    :returns: a Deferred that fires with the result.
    """
    spec = dict(TINY[name], timeout=timeout, end_marker=True, source_addresses=0)
    spec.update(params)
    target = wsclient.Target(url, ca_file=ca_file)

    def work():
        with Pool(2, "asyncio") as pool:
            return run_scenario(pool, name, target, spec, os.getpid())

    return threads.deferToThread(work)


class OfferTests(unittest.TestCase):
    """What the viewers send and the producers answer."""

    def test_the_offer_is_a_chromium_sized_offer_the_server_takes_whole(self):
        """
        The offer is 3 to 5 KB, with an audio and a video section, and the
        server's check keeps it as it is (so that a producer can tell it
        arrived unchanged).
        """
        self.assertTrue(3000 <= len(whep.OFFER_BYTES) <= 5000, len(whep.OFFER_BYTES))
        self.assertEqual(sdp.check_offer(whep.OFFER_BYTES), whep.OFFER)
        self.assertEqual(sdp.sections(whep.OFFER), ["0", "1"])

    def test_the_answer_with_the_candidates_holds_what_a_viewer_checks(self):
        """The producer's answer, with its candidates written in, holds every line checked."""
        answer = sdp.with_candidates(whep.ANSWER, [(0, c) for c in whep.CANDIDATES]).encode()
        self.assertIn(whep.ANSWER_MARK, answer)
        for line in whep.CANDIDATE_LINES:
            self.assertIn(line, answer)
        self.assertIn(whep.END_OF_CANDIDATES, answer)

    def test_a_name_is_quoted_in_the_path(self):
        """A producer's name becomes one path segment under /whep/."""
        self.assertEqual(whep.whep_path("cam 1/a"), "/whep/cam%201%2Fa")


class WhepScenarioTests(unittest.TestCase):
    """The WHEP scenarios against our server, with tiny sizes."""

    def assertAgreesWithTheServer(self, server, setups):
        """
        The server answered ``setups`` POSTs with 201 and as many DELETEs
        with 200, refused nothing, and holds no session and no peer after.
        """
        responses = {
            status: count
            for (dialect, status), count in server.stats.http_responses.items()
            if dialect == "whep"
        }
        self.assertEqual(responses, {"201": setups, "200": setups})
        self.assertEqual(server.stats.http_sessions.get("whep", 0), 0)

    async def assertEmptyAfter(self, server):
        await server.wait_for_connections(0)
        self.assertTrue(server.registry.is_empty())

    async def test_whep_setup_counts_real_set_ups(self):
        """
        whep-setup: set-ups happen, one viewer at a time per worker, the
        viewers from the loopback addresses in turn; the producers saw as
        many sessions start and end, and the server counted as many 201s and
        DELETEs.
        """
        server = await Server.listening(self, tls=False)
        result = await whep_bench("whep-setup", server.url())
        self.assertTrue(result["ok"], result)
        setups = result["setups"]
        self.assertGreater(setups, 3)
        self.assertEqual(result["failures"], 0)
        self.assertEqual(
            (result["producer_sessions"], result["producer_ended"]), (setups, setups)
        )
        self.assertEqual((result["producers_opened"], result["source_addresses"]), (3, 64))
        # Set-ups over the time from the start to the last one (about 1 s).
        self.assertLessEqual(abs(result["setups_per_s"] - setups), setups * 0.5)
        self.assertGreater(result["setup_p50_ms"], 0)
        self.assertLessEqual(result["post_p50_ms"], result["setup_p50_ms"])
        self.assertLessEqual(result["setup_p50_ms"], result["setup_p99_ms"])
        self.assertLessEqual(result["setup_p99_ms"], result["setup_max_ms"])
        self.assertGreater(result["server_cpu_ms_per_setup"], 0)
        self.assertAgreesWithTheServer(server, setups)
        await self.assertEmptyAfter(server)

    async def test_json_consumers_make_the_same_set_ups_without_whep(self):
        """
        json-consumer-setup: JSON consumers make the set-ups the WHEP viewers
        make, against the same kind of producers; the server answered no WHEP
        request, and the producers saw every session start and end.
        """
        server = await Server.listening(self, tls=False)
        result = await whep_bench("json-consumer-setup", server.url())
        self.assertTrue(result["ok"], result)
        setups = result["setups"]
        self.assertGreater(setups, 3)
        self.assertEqual(
            (result["producer_sessions"], result["producer_ended"]), (setups, setups)
        )
        self.assertLess(result["post_p50_ms"], result["setup_p50_ms"])
        self.assertEqual(server.stats.http_responses, {})
        await self.assertEmptyAfter(server)

    async def test_whep_setup_over_tls(self):
        """whep-setup over https, the server's certificate trusted through --ca-file."""
        server = await Server.listening(self, tls=True)
        ca_file = self.mktemp()
        with open(ca_file, "wb") as f:
            f.write(server.pem)
        result = await whep_bench("whep-setup", server.url(), ca_file=ca_file)
        self.assertTrue(result["ok"], result)
        self.assertTrue(result["url"].startswith("wss://"))
        self.assertGreater(result["setups"], 0)
        self.assertAgreesWithTheServer(server, result["setups"])
        await self.assertEmptyAfter(server)

    async def test_without_the_end_marker_each_set_up_waits_the_candidate_wait(self):
        """
        Producers that do not mark the end of their candidates: every 201
        comes after the server's --candidate-wait (0.2 s by default).
        """
        server = await Server.listening(self, tls=False)
        wait = server.factory.settings.candidate_wait
        self.assertEqual(wait, 0.2)
        result = await whep_bench("whep-setup", server.url(), end_marker=False)
        self.assertTrue(result["ok"], result)
        self.assertFalse(result["end_marker"])
        self.assertGreater(result["setups"], 0)
        self.assertGreaterEqual(result["post_p50_ms"], wait * 1000)
        self.assertAgreesWithTheServer(server, result["setups"])
        await self.assertEmptyAfter(server)

    async def test_whep_latency_alternates_json_consumers_and_whep_viewers(self):
        """
        whep-latency: pairs of a JSON consumer and a WHEP viewer, the first
        pair a warm-up; the server saw one WHEP set-up per pair, the producers
        two sessions, and the reported difference and ratio follow from the
        samples.
        """
        server = await Server.listening(self, tls=False)
        result = await whep_bench("whep-latency", server.url())
        self.assertTrue(result["ok"], result)
        pairs = result["pairs"]
        self.assertGreater(pairs, 2)
        self.assertEqual(result["failures"], 0)
        # One worker: its warm-up pair is not counted.
        self.assertEqual(result["producer_sessions"], 2 * (pairs + 1))
        self.assertEqual(result["producer_ended"], result["producer_sessions"])
        self.assertAgreesWithTheServer(server, pairs + 1)
        for kind in ("json", "whep", "json_welcome", "json_after_welcome", "whep_post"):
            self.assertGreater(result[f"{kind}_p50_ms"], 0, kind)
        # The parts of each set-up come in order.
        self.assertLess(result["json_welcome_p50_ms"], result["json_p50_ms"])
        self.assertLessEqual(result["json_p50_ms"], result["json_complete_p50_ms"])
        self.assertLess(result["whep_post_p50_ms"], result["whep_p50_ms"])
        self.assertEqual(result["ratio_p50"], result["whep_p50_ms"] / result["json_p50_ms"])
        self.assertIsNotNone(result["added_p50_ms"])
        await self.assertEmptyAfter(server)

    async def test_a_201_without_the_candidates_fails_the_set_ups(self):
        """A server that leaves the producer's candidates out of its answers fails whep-setup."""
        server = await Server.listening(self, tls=False)
        self.patch(
            http_connections.sdp, "with_candidates", lambda answer, candidates, complete=True: answer
        )
        result = await whep_bench("whep-setup", server.url(), workers_per_target=1)
        self.assertFalse(result["ok"])
        self.assertEqual(result["setups"], 0)
        self.assertGreater(result["failures"], 0)
        self.assertIn("does not hold the producer's answer", result["reasons"][0])
        await self.assertEmptyAfter(server)

    async def test_a_session_not_ended_by_delete_fails_the_check(self):
        """
        A server that answers DELETE but keeps the session: the producers
        never see it end, and whep-setup says so (the sessions end when the
        producers leave).
        """
        server = await Server.listening(self, tls=False)
        self.patch(http_connections.WhepSession, "end", lambda session: None)
        result = await whep_bench(
            "whep-setup", server.url(), timeout=SHORT_TIMEOUT, workers_per_target=1, duration=0.5
        )
        self.assertFalse(result["ok"])
        self.assertEqual(result["failures"], 0)
        self.assertGreater(result["producer_sessions"], 0)
        self.assertEqual(result["producer_ended"], 0)
        self.assertTrue(any("never ended" in r for r in result["reasons"]), result["reasons"])
        await self.assertEmptyAfter(server)


class WhepCommandLineTests(unittest.TestCase):
    """The WHEP scenarios on the command line, and in the tables."""

    def setUp(self):
        self.patch(sys, "stderr", io.StringIO())

    def test_whep_scenarios_run_only_when_named_and_take_their_options(self):
        """
        The WHEP scenarios are not in the default run; named, they take the
        set-up workers (whep-setup) or the latency workers, the producers, the
        end marker and the source addresses.
        """
        self.assertNotIn("whep-setup", cli.parse_args(["ws://a:1"]).scenarios)
        options = cli.parse_args(
            ["wss://a:1/", "--scenarios", "whep-setup,whep-latency", "--setup-workers", "7",
             "--latency-workers", "2", "--whep-producers", "5", "--no-end-of-candidates",
             "--whep-sources", "3", "--dialect", "json"]
        )  # fmt: skip
        setup = cli.scenario_params("whep-setup", options)
        json_setup = cli.scenario_params("json-consumer-setup", options)
        latency = cli.scenario_params("whep-latency", options)
        self.assertEqual(
            [p["workers_per_target"] for p in (setup, json_setup, latency)], [7, 7, 2]
        )
        for params in (setup, json_setup, latency):
            self.assertEqual(
                (params["producers"], params["end_marker"], params["source_addresses"]),
                (5, False, 3),
            )
        self.assertTrue(cli.scenario_params("whep-setup", cli.parse_args(["ws://a:1"]))["end_marker"])
        exc = self.assertRaises(SystemExit, cli.parse_args, ["ws://a:1", "--whep-sources", "-1"])
        self.assertEqual(exc.code, 2)

    def test_tables_and_comparisons_of_the_whep_scenarios(self):
        """Each WHEP scenario has its table and its compared metrics."""
        setup = {
            "scenario": "whep-setup", "target": "A", "workers": 2, "producers": 2,
            "duration": 1.0, "candidates_end": "an empty candidate after theirs",
            "setups_per_s": 100.0, "setups": 100, "setup_p50_ms": 3.0, "ok": True,
        }  # fmt: skip
        latency = {
            "scenario": "whep-latency", "target": "A", "workers": 1, "producers": 2,
            "duration": 1.0, "candidates_end": "an empty candidate after theirs",
            "json_p50_ms": 12.0, "whep_p50_ms": 3.0, "added_p50_ms": -9.0, "ratio_p50": 0.25,
            "ok": True,
        }  # fmt: skip
        self.assertIn("WHEP set-up: 2 viewers", report.scenario_table([setup]))
        table = report.scenario_table([latency])
        for text in ("WHEP against a JSON consumer", "-9.00", "0.25x"):
            self.assertIn(text, table)
        other = dict(latency, target="B", json_p50_ms=6.0)
        comparison = report.compare([latency, other], "A", "B")
        self.assertEqual(comparison["metrics"]["json_p50_ms"]["ratio"], 2.0)


class RunWhepScriptTests(unittest.TestCase):
    """benchmarks/run-whep, with tiny sizes."""

    timeout = 180

    async def test_every_part_runs_on_a_fresh_server_and_is_summarised(self):
        """
        The plaintext part (with and without the end marker) and the pinned
        aside run without a failure, on servers that stopped cleanly, and the
        summary holds each part's figures.
        """
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = os.path.abspath(self.mktemp())
        stdout, stderr, code = await utils.getProcessOutputAndValue(
            sys.executable,
            [os.path.join(root, "benchmarks", "run-whep"), "--parts", "plain,pinned",
             "--rounds", "1", "--duration", "0.5", "--processes", "1", "--loop", "asyncio"],
            env=dict(os.environ, OUT=out, PYTHON=sys.executable), reactor=reactor,
        )  # fmt: skip
        self.assertEqual(code, 0, stdout.decode() + stderr.decode())
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        self.assertEqual(summary["failures"], [])
        parts = {part: sorted(scenarios) for part, scenarios in summary["summary"].items()}
        self.assertEqual(
            parts,
            {"plain": ["json-consumer-setup", "ratios", "whep-latency", "whep-setup"],
             "plain-no-end-marker": ["json-consumer-setup", "ratios", "whep-latency", "whep-setup"],
             "pinned": ["whep-latency"]},
        )  # fmt: skip
        ratio = summary["summary"]["plain"]["ratios"]["setups_whep_over_json"]
        self.assertEqual(len(ratio["values"]), 1)
        self.assertGreater(ratio["median"], 0)
        with open(os.path.join(out, "results.jsonl")) as f:
            runs = [json.loads(line) for line in f]
        self.assertEqual(len(runs), 7)
        self.assertTrue(all(run["ok"] for run in runs), runs)
        self.assertEqual(
            {run["end_marker"] for run in runs if run["part"] == "plain-no-end-marker"}, {False}
        )
        with open(os.path.join(out, "summary.md")) as f:
            self.assertIn("### plain: whep-setup", f.read())
        for name in ("plain.log", "pinned.log"):
            with open(os.path.join(out, "logs", name)) as f:
                log = f.read()
            self.assertIn("Server Shut Down", log, name)
            self.assertNotIn("Traceback", log, name)

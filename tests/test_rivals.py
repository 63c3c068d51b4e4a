"""
Tests of the rivals benchmark: the Node.js relay of the examples' protocol
(``benchmarks/node-relay``) against signalling-bench's scenarios, the script
``benchmarks/run-rivals`` with tiny sizes, and the JSON dialect's texts that
let a server which re-encodes what it relays (gst-plugins-rs' Rust server)
pass the bench's checks.

They need ``node`` and ``npm`` (the Debian packages nodejs and npm) and,
when ``benchmarks/node-relay/node_modules`` is missing, the npm registry
(``npm ci``). Without them they are skipped, naming what to install; with
``CI=true`` they fail instead.
"""

import json
import os
import shutil
import subprocess
import sys
import uuid

from twisted.trial import unittest

from signalling.server import tls
from signalling.tools.bench import scenarios
from tests._interop import missing_requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELAY = os.path.join(ROOT, "benchmarks", "node-relay")
#: Seconds npm may take to install the relay's one dependency.
NPM_TIMEOUT = 300
#: Seconds one tiny signalling-bench run may take.
BENCH_TIMEOUT = 120


def node_with_relay():
    """
    :returns: the node binary, once the relay's dependencies are installed
        (``npm ci`` when ``node_modules`` is missing); skips the test (fails
        it with ``CI=true``) when that cannot be.
    """
    node = shutil.which("node")
    if node is None:
        missing_requirement("node; install the Debian package nodejs")
    if not os.path.isdir(os.path.join(RELAY, "node_modules", "ws")):
        npm = shutil.which("npm")
        if npm is None:
            missing_requirement("npm; install the Debian package npm")
        try:
            done = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"], cwd=RELAY, capture_output=True,
                text=True, timeout=NPM_TIMEOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            missing_requirement(f"npm ci in {RELAY} did not end within {NPM_TIMEOUT} s")
        if done.returncode != 0:
            missing_requirement(f"npm ci in {RELAY} failed: {(done.stdout + done.stderr)[-1500:]}")
    return node


def bench(url, *args, ca_file=None):
    """:returns: the results of one signalling-bench run (its JSON lines), and its output."""
    argv = [
        sys.executable, "-m", "signalling.tools.bench.cli", url, "--processes", "1",
        "--loop", "asyncio", "--timeout", "5", "--json", "-", *args,
    ]  # fmt: skip
    if ca_file:
        argv += ["--ca-file", ca_file]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=BENCH_TIMEOUT, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.DEVNULL,
    )  # fmt: skip
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise AssertionError(f"signalling-bench exited {done.returncode}:\n{output[-4000:]}")
    return [json.loads(line) for line in done.stdout.splitlines()], output


class NodeRelay:
    """The Node relay on a free loopback port, for one test."""

    def __init__(self, case, node, cert_dir=None):
        argv = [node, os.path.join(RELAY, "server.js"), "--host", "127.0.0.1", "--port", "0"]
        if cert_dir:
            argv += ["--cert", os.path.join(cert_dir, "cert.pem"), "--key", os.path.join(cert_dir, "key.pem")]
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True
        )
        case.addCleanup(self.stop)
        # Its one line once it listens (a port of 0 lets the kernel choose).
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            raise AssertionError(f"the Node relay did not start: {line}{self.process.stdout.read()}")
        self.url = line.split()[-1].replace("127.0.0.1", "localhost") + "/"

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(10)
        self.process.stdout.close()


class NodeRelayTests(unittest.TestCase):
    """benchmarks/node-relay speaks what signalling-bench's examples scenarios check."""

    def setUp(self):
        self.node = node_with_relay()

    def test_every_examples_scenario_passes_its_checks_in_plaintext(self):
        """
        The HELLO storm (every peer registered and answered with ERROR), the
        relay (every echo intact and in order), call set-ups (the callee
        closed with 1000) and the room storm (every notice and message once)
        all pass against the relay.
        """
        relay = NodeRelay(self, self.node)
        results, output = bench(
            relay.url, "--scenarios", "idle,relay,setup,rooms", "--peers", "30", "--pairs", "2",
            "--duration", "0.5", "--warmup", "0", "--setup-workers", "2", "--rooms", "2",
            "--members", "4", "--server-pid", str(relay.process.pid),
        )  # fmt: skip
        by_scenario = {r["scenario"]: r for r in results}
        self.assertEqual(set(by_scenario), {"idle", "relay", "setup", "rooms"})
        self.assertTrue(all(r["ok"] for r in results), output)
        self.assertEqual((by_scenario["idle"]["registered"], by_scenario["idle"]["answered"]), (30, 30))
        self.assertGreater(by_scenario["relay"]["round_trips"], 0)
        self.assertGreater(by_scenario["setup"]["calls"], 0)
        self.assertEqual(by_scenario["rooms"]["messages_received"], 2 * 4 * 3)

    def test_call_set_ups_and_rooms_over_tls(self):
        """Over TLS with the certificate our server makes for itself, set-ups and rooms pass."""
        certs = os.path.abspath(self.mktemp())
        tls.create_self_signed(certs)
        relay = NodeRelay(self, self.node, certs)
        self.assertTrue(relay.url.startswith("wss://localhost:"))
        results, output = bench(
            relay.url, "--scenarios", "setup,rooms", "--duration", "0.5", "--setup-workers", "2",
            "--rooms", "1", "--members", "3", ca_file=os.path.join(certs, "cert.pem"),
        )  # fmt: skip
        self.assertEqual([r["scenario"] for r in results], ["setup", "rooms"])
        self.assertTrue(all(r["ok"] for r in results), output)
        self.assertGreater(results[0]["calls"], 0)


class RunRivalsTests(unittest.TestCase):
    """benchmarks/run-rivals, with tiny sizes."""

    def test_examples_and_json_parts_without_the_rust_server(self):
        """
        Our server against the Node relay and our server on its defaults
        against itself pinned to JSON: every run passes, the summary holds a
        ratio for each figure, the missing Rust server is said and skipped,
        and no server is left running.
        """
        node = node_with_relay()
        out = os.path.abspath(self.mktemp())
        done = subprocess.run(
            [sys.executable, os.path.join(ROOT, "benchmarks", "run-rivals"),
             "--rust-server", os.path.join(out, "no-such-binary"), "--node", node,
             "--parts", "examples-plain,json", "--rounds", "1", "--duration", "0.5",
             "--warmup", "0", "--peers", "20", "--timeout", "5", "--processes", "1",
             "--loop", "asyncio", "--pairs", "2", "--setup-workers", "2", "--rooms", "1",
             "--members", "3"],
            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
            env=dict(os.environ, OUT=out, PYTHON=sys.executable),
        )  # fmt: skip
        output = done.stdout + done.stderr
        self.assertEqual(done.returncode, 0, output)
        self.assertIn("Rust server not found: skipping its comparisons", output)
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        self.assertEqual(summary["failures"], [])
        figures = {(row["pair"], row["scenario"], row["figure"]): row for row in summary["rows"]}
        for scenario, figure in [("idle", "hellos_per_s"), ("relay", "messages_per_s"),
                                 ("setup", "calls_per_s"), ("rooms", "total_seconds")]:  # fmt: skip
            row = figures[("ours / node", scenario, figure)]
            self.assertEqual(len(row["ratios"]), 1)
            self.assertAlmostEqual(row["ratio_median"], row["a"] / row["b"])
        for scenario, figure in [("idle", "hellos_per_s"), ("relay", "messages_per_s"),
                                 ("setup", "calls_per_s")]:  # fmt: skip
            self.assertIn(("ours-auto / ours-pinned", scenario, figure), figures)
        with open(os.path.join(out, "summary.md")) as f:
            self.assertIn("| examples-plain | ours / node | relay | relayed messages/s |", f.read())
        # Every server it started was stopped.
        logs = os.path.join(out, "logs")
        self.assertEqual(
            sorted(os.listdir(logs)),
            ["examples-plain-node.log", "examples-plain-ours.log",
             "json-ours-auto-vs-ours-pinned-ours-auto.log", "json-ours-auto-vs-ours-pinned-ours-pinned.log"],
        )  # fmt: skip
        for name in os.listdir(logs):
            if "-ours" in name:
                with open(os.path.join(logs, name)) as f:
                    self.assertIn("Server Shut Down", f.read(), name)


class JsonFormTests(unittest.TestCase):
    """The JSON dialect's texts, as a server that decodes and encodes them writes them."""

    def test_a_reencoded_message_is_the_text_sent(self):
        """
        Every negotiation message and every relayed message of the JSON
        dialect is its own compact re-encoding (no spaces, the keys in the
        protocol's order), so that a server that relays by decoding and
        encoding delivers the very text that was sent.
        """

        def reencoded(text):
            return json.dumps(json.loads(text), separators=(",", ":"))

        session_id = str(uuid.uuid4())
        texts = [scenarios._peer_message(session_id, scenarios.JSON_FORM[t]) for t in scenarios.JSON_FORM]
        prefix, suffix = scenarios._relay_wrapping(session_id)
        texts.append((prefix + b"%010d" % 7 + b"x" * 100 + suffix).decode())
        self.assertEqual(len(texts), 2 + 20 + 1)
        for text in texts:
            self.assertEqual(reencoded(text), text)
            message = json.loads(text)
            self.assertEqual(list(message)[:2], ["type", "sessionId"])
            if "ice" in message:
                self.assertEqual(list(message["ice"]), ["candidate", "sdpMLineIndex"])
            else:
                self.assertEqual(list(message["sdp"]), ["type", "sdp"])

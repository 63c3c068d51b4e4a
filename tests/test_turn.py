"""
TURN credentials in coturn's REST format (``--turn-secret``, ``--turn-uri``):
their form, and real allocations with Debian's ``coturn`` started by the
test on loopback: fresh credentials from the server work, expired ones do
not.
"""

import base64
import hashlib
import hmac
import json
import os
import shutil
import socket
import sys

from twisted.internet import reactor, utils
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial import unittest

from signalling.server import turn
from signalling.server.auth import mint
from signalling.server.tap import Options
from tests._interop import missing_requirement
from tests.clients import eventually
from tests.servers import Server, ServerProcess

SECRET = b"test-turn-secret"
ALLOCATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_turn_allocate.py")


class CredentialTests(unittest.SynchronousTestCase):
    def test_username_is_expiry_and_uid_and_password_its_hmac(self):
        username, password = turn.credentials(SECRET, "alice", 1_800_000_000.7)
        self.assertEqual(username, "1800000000:alice")
        expected = hmac.new(SECRET, b"1800000000:alice", hashlib.sha1).digest()
        self.assertEqual(base64.b64decode(password), expected)

    def test_credentials_expire_ttl_seconds_from_now_for_every_uri(self):
        clock = Clock()
        clock.advance(1_700_000_000)
        credentials = turn.TurnCredentials(SECRET, ["turn:t:3478", "turns:t:5349"], clock, ttl=60)
        [server] = credentials.ice_servers("bob")
        self.assertEqual(server["urls"], ["turn:t:3478", "turns:t:5349"])
        self.assertEqual(server["username"], "1700000060:bob")
        self.assertEqual(
            (server["username"], server["credential"]),
            turn.credentials(SECRET, "bob", 1_700_000_060),
        )
        anonymous = credentials.ice_servers()[0]["username"]
        self.assertTrue(anonymous.startswith("1700000060:anonymous-"), anonymous)

    def test_the_secret_file_must_hold_a_secret(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"  \n")
        self.assertRaises(turn.TurnConfigError, turn.read_secret, path)
        self.assertRaises(turn.TurnConfigError, turn.read_secret, path + ".missing")
        with open(path, "wb") as f:
            f.write(SECRET + b"\n")
        self.assertEqual(turn.read_secret(path), SECRET)

    def test_secret_and_uri_go_together(self):
        for argv in (["--turn-secret", "f"], ["--turn-uri", "turn:t:3478"]):
            with self.assertRaises(usage.UsageError):
                Options().parseOptions(argv)
        with self.assertRaises(usage.UsageError):
            Options().parseOptions(["--turn-secret", "f", "--turn-uri", "stun:t:3478"])


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AllocationTests(unittest.TestCase):
    """Real allocations on a real coturn with the server's credentials."""

    timeout = 60

    async def start_coturn(self, secret_file):
        binary = shutil.which("turnserver")
        if binary is None:
            missing_requirement("coturn's turnserver; install the Debian package coturn")
        port = free_udp_port()
        relay = free_udp_port()
        coturn = ServerProcess()
        argv = [
            binary, "-n", "--listening-ip=127.0.0.1", f"--listening-port={port}",
            "--relay-ip=127.0.0.1", f"--min-port={relay}", f"--max-port={relay + 20}",
            "--use-auth-secret", f"--static-auth-secret={SECRET.decode()}", "--realm=test",
            "--no-tls", "--no-dtls", "--no-cli", "--log-file=stdout", "--simple-log",
            "--allow-loopback-peers", "--no-multicast-peers",
            f"--userdb={os.path.abspath(self.mktemp())}",
            f"--pidfile={os.path.abspath(self.mktemp())}",
        ]
        reactor.spawnProcess(coturn, binary, argv, env=dict(os.environ))

        async def stop():
            if coturn.running:
                coturn.transport.signalProcess("KILL")
            await coturn.wait()

        self.addCleanup(stop)
        await eventually(
            lambda: "Total General servers" in coturn.output or not coturn.running,
            "coturn to listen",
            15,
        )
        self.assertTrue(coturn.running, coturn.output)
        return port

    async def allocate(self, port, username, password):
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, [ALLOCATE, "127.0.0.1", str(port), username, password],
            env=dict(os.environ), reactor=reactor,
        )
        return code, out.decode() + err.decode()

    async def test_with_tokens_credentials_need_a_token_and_are_for_its_uid(self):
        secret_file = self.mktemp()
        with open(secret_file, "wb") as f:
            f.write(SECRET + b"\n")
        auth_file = self.mktemp()
        with open(auth_file, "wb") as f:
            f.write(b"k" * 40 + b"\n")
        server = await Server.start(
            self, "--port", "tcp:0:interface=127.0.0.1", "--auth-secret", auth_file,
            "--turn-secret", secret_file, "--turn-uri", "turn:127.0.0.1:3478",
        )
        status, _, _ = await server.get("/ice-servers?uid=mallory")
        self.assertEqual(status, 401)
        status, _, page = await server.get("/")
        self.assertEqual(status, 200)
        self.assertNotIn(b"turn:127.0.0.1:3478", page)
        token = mint(b"k" * 40, 60, uid="alice")
        status, _, body = await server.get(f"/ice-servers?uid=mallory&token={token}")
        self.assertEqual(status, 200)
        [ice] = json.loads(body)["iceServers"]
        self.assertTrue(ice["username"].endswith(":alice"), ice)
        status, _, page = await server.get(f"/?token={token}")
        self.assertIn(b"turn:127.0.0.1:3478", page)

    async def test_fresh_credentials_from_the_server_allocate_and_expired_ones_do_not(self):
        secret_file = self.mktemp()
        with open(secret_file, "wb") as f:
            f.write(SECRET + b"\n")
        port = await self.start_coturn(secret_file)
        server = await Server.start(
            self, "--port", "tcp:0:interface=127.0.0.1",
            "--turn-secret", secret_file, "--turn-uri", f"turn:127.0.0.1:{port}",
        )
        status, headers, body = await server.get("/ice-servers?uid=alice")
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"cache-control"], b"no-store")
        [ice] = json.loads(body)["iceServers"]
        self.assertEqual(ice["urls"], [f"turn:127.0.0.1:{port}"])
        self.assertTrue(ice["username"].endswith(":alice"), ice)
        code, output = await self.allocate(port, ice["username"], ice["credential"])
        self.assertEqual(code, 0, output)
        self.assertTrue(output.startswith("relayed 127.0.0.1 "), output)
        # The page carries credentials of its own.
        status, _, page = await server.get("/")
        self.assertIn(f"turn:127.0.0.1:{port}".encode(), page)
        # Expired an hour ago: refused (401).
        username, password = turn.credentials(SECRET, "alice", reactor.seconds() - 3600)
        code, output = await self.allocate(port, username, password)
        self.assertEqual(code, 1, output)
        self.assertIn("401", output)
        # Signed with another secret: refused too.
        username, password = turn.credentials(b"not-the-secret", "alice", reactor.seconds() + 600)
        code, output = await self.allocate(port, username, password)
        self.assertEqual(code, 1, output)

"""
Tokens (``--auth-secret``): what they are, and a real server that refuses
handshakes without a valid one (401) and holds each connection to what its
token allows, over plaintext and TLS; key rotation and reload; the
``signalling-token`` command.
"""

import io
import json
import os
import sys

import jwt
from twisted.internet import reactor
from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest

from signalling.server import auth
from signalling.tools import token as token_tool
from tests.certificates import write_certificate
from tests.clients import upgrade_request
from tests.servers import Server
from tests.helpers import change_settings

OLD = b"o" * 40
NEW = b"n" * 40


class TokenTests(unittest.SynchronousTestCase):
    def keys(self, *secrets):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"\n".join(secrets) + b"\n")
        return path, auth.TokenKeys(path, reactor)

    def test_a_valid_token_grants_what_its_claims_say(self):
        """
        A valid token allows the uid, rooms, calls and roles it names and no
        others; what it does not name is not limited.
        """
        _, keys = self.keys(NEW)
        grant = keys.check(auth.mint(NEW, 60, uid="alice", rooms=["r1"], calls=["bob"]))
        self.assertTrue(grant.allows_uid("alice"))
        self.assertFalse(grant.allows_uid("mallory"))
        self.assertTrue(grant.allows_room("r1"))
        self.assertFalse(grant.allows_room("r2"))
        self.assertTrue(grant.allows_call("bob"))
        self.assertFalse(grant.allows_call("carol"))
        self.assertTrue(grant.allows_roles(["producer", "listener"]))
        open_grant = keys.check(auth.mint(NEW, 60, roles=["consumer"]))
        self.assertTrue(open_grant.allows_uid("anyone") and open_grant.allows_room("any"))
        self.assertFalse(open_grant.allows_roles(["producer"]))

    def test_missing_bad_expired_and_foreign_tokens_are_refused_by_reason(self):
        """
        No token or an empty one is refused as missing, an expired one as expired;
        garbage, another secret's, one without exp, with ill-typed claims or signed
        with another algorithm as invalid.
        """
        _, keys = self.keys(NEW)
        cases = [
            (None, "missing"),
            ("", "missing"),
            ("not-a-token", "invalid"),
            (auth.mint(OLD, 60, uid="a"), "invalid"),
            (auth.mint(NEW, -10, uid="a"), "expired"),
            (jwt.encode({"sub": "a"}, NEW, algorithm="HS256"), "invalid"),  # no exp
            (jwt.encode({"exp": 2**40, "rooms": "r1"}, NEW, algorithm="HS256"), "invalid"),
            (jwt.encode({"exp": 2**40}, NEW, algorithm="HS512"), "invalid"),
        ]
        for token, reason in cases:
            with self.assertRaises(auth.TokenRefused) as caught:
                keys.check(token)
            self.assertEqual(caught.exception.reason, reason, token)

    def test_both_secrets_are_accepted_during_a_rotation_and_reload_reads_the_file(self):
        """
        While the file holds two secrets, tokens signed with either pass; once it
        holds only the new one, a reload refuses the old secret's tokens.
        """
        path, keys = self.keys(NEW, OLD)
        keys.check(auth.mint(OLD, 60))
        keys.check(auth.mint(NEW, 60))
        with open(path, "wb") as f:
            f.write(NEW + b"\n")
        keys.reload()
        self.assertRaises(auth.TokenRefused, keys.check, auth.mint(OLD, 60))
        keys.check(auth.mint(NEW, 60))

    def test_a_secrets_file_must_hold_long_secrets(self):
        """An empty, blank, short-secret or missing secrets file is a configuration error."""
        path = self.mktemp()
        for content in (b"", b"\n \n", b"short\n"):
            with open(path, "wb") as f:
                f.write(content)
            self.assertRaises(auth.AuthConfigError, auth.read_secrets, path)
        self.assertRaises(auth.AuthConfigError, auth.read_secrets, path + ".missing")

    def test_signalling_token_mints_with_the_first_secret(self):
        """
        ``signalling-token`` prints a token signed with the file's first secret,
        for the uid and room asked for.
        """
        path, keys = self.keys(NEW, OLD)
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        token_tool.main(["--secret-file", path, "--uid", "alice", "--room", "r1", "--ttl", "60"])
        token = out.getvalue().strip()
        self.assertEqual(jwt.decode(token, NEW, algorithms=["HS256"])["sub"], "alice")
        grant = keys.check(token)
        self.assertEqual((grant.uid, grant.rooms), ("alice", frozenset({"r1"})))


class AuthMixin:
    """A real server with --auth-secret; subclasses choose plaintext or TLS."""

    timeout = 30

    async def setUp(self):
        self.secrets = os.path.abspath(self.mktemp())
        with open(self.secrets, "wb") as f:
            f.write(NEW + b"\n")
        cert_dir = self.mktemp()
        pem = write_certificate(cert_dir).pem
        kind = "ssl" if self.tls else "tcp"
        self.server = await Server.start(
            self, "--port", f"{kind}:0:interface=127.0.0.1", "--cert-path", cert_dir,
            "--auth-secret", self.secrets,
        )
        self.server.tls = self.tls
        self.server.pem = pem

    def status(self, query="", headers=b""):
        """:returns: (a Deferred of) the status a raw opening handshake gets."""
        return self.server.upgrade_status(upgrade_request(headers, query))

    async def test_a_handshake_without_a_valid_token_gets_401(self):
        """
        A handshake with no token, a bad or an expired one gets 401, counted by
        reason; a valid token in the query or a Bearer header gets 101, and
        /health needs none.
        """
        self.assertEqual(await self.status(), 401)
        self.assertEqual(await self.status("?token=nope"), 401)
        expired = auth.mint(NEW, -5, uid="a")
        self.assertEqual(await self.status("?token=" + expired), 401)
        self.assertEqual(
            self.server.stats.connections_refused,
            {"token_missing": 1, "token_invalid": 1, "token_expired": 1},
        )
        good = auth.mint(NEW, 60, uid="a")
        self.assertEqual(await self.status("?token=" + good), 101)
        bearer = b"Authorization: Bearer " + good.encode() + b"\r\n"
        self.assertEqual(await self.status(headers=bearer), 101)
        status, _, body = await self.server.get("/health")
        self.assertEqual((status, body), (200, b"OK\n"))

    async def test_a_connection_may_do_what_its_token_allows_and_nothing_else(self):
        """
        HELLO with a uid the token does not allow is an ERROR and a close (1002);
        with the allowed uid, a call or room the token does not name is an ERROR
        (counted as not_allowed), and one it names goes through.
        """
        token = auth.mint(NEW, 60, uid="alice", rooms=["r1"], calls=["bob"])
        mallory = await self.server.connect(path="/?token=" + token)
        mallory.send_text("HELLO mallory")
        self.assertEqual(await mallory.next(), "ERROR the token does not allow uid 'mallory'")
        self.assertEqual((await mallory.closed())[0], 1002)
        alice = await self.server.connect(path="/?token=" + token)
        alice.send_text("HELLO alice")
        await alice.expect("HELLO")
        alice.send_text("SESSION carol")
        await alice.expect("ERROR the token does not allow a call to 'carol'")
        alice.send_text("ROOM r2")
        await alice.expect("ERROR the token does not allow room 'r2'")
        alice.send_text("ROOM r1")
        await alice.expect("ROOM_OK ")
        self.assertEqual(self.server.stats.errors.get("not_allowed"), 2)

    async def test_a_json_peer_may_take_only_the_roles_its_token_allows(self):
        """
        A JSON peer asking for a role its token does not name gets an error; one
        it names is granted.
        """
        token = auth.mint(NEW, 60, roles=["consumer", "listener"])
        client = await self.server.connect(path="/?token=" + token)
        client.send_text('{"type":"setProtocolVersion","version":"v1_1"}')
        self.assertEqual(json.loads(await client.next())["type"], "welcome")
        client.send_text('{"type":"setPeerStatus","roles":["producer"]}')
        self.assertEqual(
            json.loads(await client.next()),
            {"type": "error", "details": "the token does not allow the roles [Producer]"},
        )
        client.send_text('{"type":"setPeerStatus","roles":["listener"]}')
        self.assertEqual(json.loads(await client.next())["type"], "peerStatusChanged")

    async def json_peer(self, token):
        """:returns: ``(client, peer id)``, welcomed on the JSON path with ``token``."""
        client = await self.server.connect(path="/?token=" + token)
        client.send_text('{"type":"setProtocolVersion","version":"v1_1"}')
        welcome = json.loads(await client.next())
        self.assertEqual(welcome["type"], "welcome")
        return client, welcome["peerId"]

    async def test_a_json_token_names_its_peer_and_limits_whom_it_may_see_and_call(self):
        """
        JSON dialect (docs/protocol.md, "Tokens"): ``sub`` is the peer's
        ``meta.name``, set by the server (a meta naming another name is
        refused); ``calls`` limits startSession, ``list`` and the status
        notices to peers whose name it lists. A token with uid, room and
        call claims (the call page's) is held to them on the JSON side too.
        """
        viewer, _ = await self.json_peer(auth.mint(NEW, 60, uid="alice", rooms=["r1"], calls=["cam"]))
        viewer.send_text('{"type":"setPeerStatus","roles":["listener"]}')
        self.assertEqual(json.loads(await viewer.next())["meta"], {"name": "alice"})
        cam, cam_id = await self.json_peer(auth.mint(NEW, 60, uid="cam", roles=["producer"]))
        cam.send_text('{"type":"setPeerStatus","roles":["producer"],"meta":{"name":"impostor"}}')
        self.assertEqual(
            json.loads(await cam.next()),
            {
                "type": "error",
                "details": "the token names this peer 'cam': its meta must be an object "
                "without another name",
            },
        )
        cam.send_text('{"type":"setPeerStatus","roles":["producer"],"meta":{"room":"hall"}}')
        notice = json.loads(await viewer.next())
        self.assertEqual((notice["peerId"], notice["meta"]), (cam_id, {"name": "cam", "room": "hall"}))
        other, other_id = await self.json_peer(auth.mint(NEW, 60, uid="other", roles=["producer"]))
        other.send_text('{"type":"setPeerStatus","roles":["producer"]}')
        free, free_id = await self.json_peer(auth.mint(NEW, 60, roles=["producer"]))
        free.send_text('{"type":"setPeerStatus","roles":["producer"],"meta":{"name":"cam2"}}')
        viewer.send_text('{"type":"list"}')
        listed = json.loads(await viewer.next())
        self.assertEqual(listed["producers"], [{"id": cam_id, "meta": {"name": "cam", "room": "hall"}}])
        for refused in (other_id, free_id):
            viewer.send_text(json.dumps({"type": "startSession", "peerId": refused}))
            self.assertEqual(
                json.loads(await viewer.next()),
                {"type": "error", "details": f"the token does not allow a session with '{refused}'"},
            )
        viewer.send_text(json.dumps({"type": "startSession", "peerId": cam_id}))
        self.assertEqual(json.loads(await viewer.next())["type"], "sessionStarted")
        self.assertEqual(json.loads(await cam.next())["type"], "startSession")
        nodes = getattr(self.server, "nodes", [self.server])
        self.assertEqual(sum(n.stats.errors.get("not_allowed", 0) for n in nodes), 1)

    async def test_a_token_for_one_protocol_is_refused_on_a_path_pinned_to_the_other(self):
        """
        A valid token that names only JSON roles (a viewer's) gets 403 on a
        path pinned to the examples' protocol and passes on one pinned to
        JSON; a token naming a uid, or nothing, passes on both.
        """
        change_settings(self.server.factory, dialect_paths={"/ex": "examples", "/gst": "json"})
        viewer = auth.mint(NEW, 60, roles=["consumer"])
        caller = auth.mint(NEW, 60, uid="alice")
        anything = auth.mint(NEW, 60)
        statuses = {}
        for name, token in (("viewer", viewer), ("caller", caller), ("anything", anything)):
            for path in ("/ex", "/gst"):
                request = upgrade_request(b"", "?token=" + token).replace(
                    b"GET /?", f"GET {path}?".encode(), 1
                )
                statuses[name, path] = await self.server.upgrade_status(request)
        self.assertEqual(
            statuses,
            {
                ("viewer", "/ex"): 403, ("viewer", "/gst"): 101,
                ("caller", "/ex"): 101, ("caller", "/gst"): 101,
                ("anything", "/ex"): 101, ("anything", "/gst"): 101,
            },
        )
        self.assertEqual(self.server.stats.connections_refused, {"token_not_allowed": 1})

    async def test_on_an_auto_port_the_first_message_is_refused_for_the_other_protocol(self):
        """
        On a port where the first message chooses: HELLO with a token that
        names only JSON roles gets ERROR and a close (1002); the same token
        welcomes a JSON client.
        """
        viewer = auth.mint(NEW, 60, roles=["consumer"])
        client = await self.server.connect(path="/?token=" + viewer)
        client.send_text("HELLO anyone")
        self.assertEqual(await client.next(), "ERROR the token does not allow the protocol 'examples'")
        self.assertEqual((await client.closed())[0], 1002)
        client = await self.server.connect(path="/?token=" + viewer)
        client.send_text('{"type":"setProtocolVersion","version":"v1_1"}')
        self.assertEqual(json.loads(await client.next())["type"], "welcome")

    async def test_no_token_appears_in_the_logs(self):
        """
        Neither a token, good or bad, nor its signature, nor a secret is logged,
        while the uid is.
        """
        token = auth.mint(NEW, 60, uid="alice")
        bad = auth.mint(OLD, 60, uid="alice")
        with capturedLogs() as events:
            client = await self.server.connect(path="/?token=" + token)
            client.send_text("HELLO mallory")
            await client.closed()
            self.assertEqual(await self.status("?token=" + bad), 401)
            client = await self.server.connect(path="/?token=" + token)
            client.send_text("HELLO alice")
            await client.expect("HELLO")
            client.close()
            await client.closed()
        text = "\n".join(formatEvent(e) + repr(e) for e in events)
        self.assertIn("alice", text)
        for secret in (token, bad, NEW.decode(), OLD.decode()):
            self.assertNotIn(secret, text)
        for part in (token.split(".")[2], bad.split(".")[2]):
            self.assertNotIn(part, text)

    async def test_a_token_for_the_uid_takes_it_over_at_once(self):
        """
        A second connection with a token for the uid takes it over: the first is
        closed (1008) at once, without a ping to check that it is alive.
        """
        token = auth.mint(NEW, 60, uid="alice")
        old = await self.server.connect(path="/?token=" + token)
        old.send_text("HELLO alice")
        await old.expect("HELLO")
        new = await self.server.connect(path="/?token=" + token)
        new.send_text("HELLO alice")
        await new.expect("HELLO")
        self.assertEqual(await old.closed(), (1008, "replaced by a new connection"))
        self.assertEqual(old.pings, 0)

    async def test_a_reload_rotates_the_secrets(self):
        """
        Once the secrets file has changed, a reload of the service refuses tokens
        of the old secret (401) and accepts those of the new one.
        """
        old_token = auth.mint(NEW, 60)
        with open(self.secrets, "wb") as f:
            f.write(OLD + b"\n")
        self.server.service.reload()
        self.assertEqual(await self.status("?token=" + old_token), 401)
        self.assertEqual(await self.status("?token=" + auth.mint(OLD, 60)), 101)


class PlaintextAuthTests(AuthMixin, unittest.TestCase):
    tls = False


class TLSAuthTests(AuthMixin, unittest.TestCase):
    tls = True

"""
How long a token lets a connection live (issue 19): a connection is closed
(4001, ``token expired``) when its token expires, on the factory's clock;
one whose token was signed with a secret a reload removed is closed (4001,
``token revoked``); a token that lives longer than ``--max-token-lifetime``
is refused at the handshake (401). Both dialects, in memory on a fake
clock and over real sockets (plaintext and TLS); the option; the metrics.
"""

import json
import os
import signal
import time

import jwt
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python import usage
from twisted.trial import unittest

from signalling.server import auth
from signalling.server.auth import DEFAULT_MAX_LIFETIME, TokenKeys, TokenRefused
from signalling.server.metrics import SignallingCollector
from tests.certificates import write_certificate
from tests.clients import upgrade_request
from tests.helpers import parse
from tests.servers import Loopback, Server, make_service

OLD = b"o" * 40
NEW = b"n" * 40
#: The fake clock's time in the tests in memory.
NOW = 1_800_000_000.0
WELCOME = '{"type":"setProtocolVersion","version":"v1_1"}'


def write_secrets(path, *secrets):
    with open(path, "wb") as f:
        f.write(b"\n".join(secrets) + b"\n")


def token(secret, exp, **claims):
    """:returns: a token signed with ``secret`` with these exact claims (``exp`` may be a float)."""
    return jwt.encode(dict(claims, exp=exp), secret, algorithm="HS256")


class TokenTimesTests(unittest.SynchronousTestCase):
    """The times of a token, checked against the server's clock."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)

    def keys(self, *secrets, max_lifetime=3600):
        path = self.mktemp()
        write_secrets(path, *(secrets or (NEW,)))
        return path, TokenKeys(path, self.clock, max_lifetime)

    def refused(self, keys, token_text):
        with self.assertRaises(TokenRefused) as caught:
            keys.check(token_text)
        return caught.exception.reason

    def test_expiry_is_checked_against_the_servers_clock(self):
        """
        A token is valid until its exp, on the clock the server gives
        (not the machine's): at exp it is expired; a grant says when it
        expires and which secret signed it.
        """
        _, keys = self.keys()
        text = token(NEW, NOW + 10.5)
        self.clock.advance(10)
        grant = keys.check(text)
        self.assertEqual((grant.expires, grant.secret), (NOW + 10.5, NEW))
        self.clock.advance(0.5)
        self.assertEqual(self.refused(keys, text), "expired")
        # Long expired by the machine's clock, valid by the server's.
        early = Clock()
        early.advance(60)
        TokenKeys(self.keys()[0], early).check(token(NEW, 100, iat=50))

    def test_a_token_living_longer_than_the_maximum_is_refused(self):
        """
        With a maximum of an hour: a token issued for more (from its iat,
        or from now when it has none or its iat is ahead) is refused as
        ``lifetime``; one for an hour exactly passes, and so does anything
        with no maximum (0).
        """
        _, keys = self.keys(max_lifetime=3600)
        keys.check(token(NEW, NOW + 3600, iat=NOW))
        keys.check(token(NEW, NOW + 3600))
        keys.check(token(NEW, NOW + 3000, iat=NOW + 500))
        self.assertEqual(self.refused(keys, token(NEW, NOW + 3601, iat=NOW)), "lifetime")
        self.assertEqual(self.refused(keys, token(NEW, NOW + 3601)), "lifetime")
        # Issued for two hours, an hour ago: its remaining hour does not count.
        self.assertEqual(
            self.refused(keys, token(NEW, NOW + 3600, iat=NOW - 3600)), "lifetime"
        )
        _, unlimited = self.keys(max_lifetime=0)
        unlimited.check(token(NEW, NOW + 10 * 365 * 86400, iat=NOW))

    def test_ill_typed_times_and_a_future_nbf_are_invalid(self):
        """A non-numeric exp, iat or nbf, and an nbf still ahead, make a token invalid."""
        _, keys = self.keys()
        for bad in (
            token(NEW, "soon"),
            token(NEW, True),
            token(NEW, NOW + 60, iat="now"),
            token(NEW, NOW + 60, nbf=NOW + 1),
        ):
            self.assertEqual(self.refused(keys, bad), "invalid")

    def test_a_grant_is_revoked_once_a_reload_removed_its_secret(self):
        """
        After the secrets file lost the old secret and was reloaded, a
        grant of the old secret is revoked, one of the new is not.
        """
        path, keys = self.keys(NEW, OLD)
        old = keys.check(token(OLD, NOW + 60))
        new = keys.check(token(NEW, NOW + 60))
        self.assertFalse(keys.revoked(old) or keys.revoked(new))
        write_secrets(path, NEW)
        keys.reload()
        self.assertTrue(keys.revoked(old))
        self.assertFalse(keys.revoked(new))

    def test_minted_tokens_say_when_they_were_issued(self):
        """``signalling-token`` (mint) sets iat, so that the maximum counts from it."""
        claims = jwt.decode(auth.mint(NEW, 60, now=NOW), NEW, algorithms=["HS256"],
                            options={"verify_exp": False, "verify_iat": False})
        self.assertEqual((claims["iat"], claims["exp"]), (int(NOW), int(NOW) + 60))


class OptionTests(unittest.SynchronousTestCase):
    """``--max-token-lifetime``."""

    def test_the_default_is_a_day_and_zero_means_no_limit(self):
        """The default is 86400 s; 0 and any positive number are accepted."""
        self.assertEqual(parse()["max-token-lifetime"], 86400.0)
        self.assertEqual(DEFAULT_MAX_LIFETIME, 86400.0)
        self.assertEqual(parse("--max-token-lifetime", "0")["max-token-lifetime"], 0.0)
        self.assertEqual(parse("--max-token-lifetime", "3600")["max-token-lifetime"], 3600.0)

    def test_a_negative_or_non_number_is_a_usage_error(self):
        """A negative number, nan, inf or a word is refused with a usage error."""
        for value in ("-1", "nan", "inf", "a day"):
            self.assertRaises(usage.UsageError, parse, "--max-token-lifetime", value)

    def test_the_server_checks_tokens_with_it(self):
        """makeService gives the token keys the maximum from the command line."""
        path = self.mktemp()
        write_secrets(path, NEW)
        service = make_service(
            ["--port", "tcp:0", "--auth-secret", path, "--max-token-lifetime", "600"],
            reactor=MemoryReactorClock(),
        )
        self.assertEqual(service.token_keys.max_lifetime, 600.0)


class InMemoryTests(unittest.TestCase):
    """Expiry and revocation in memory, on the factory's (fake) clock, on an auto port."""

    def setUp(self):
        self.secrets = self.mktemp()
        write_secrets(self.secrets, NEW, OLD)
        clock = Clock()
        clock.advance(NOW)
        self.keys = TokenKeys(self.secrets, clock, 3600)
        self.net = Loopback(self, clock=clock, auth=self.keys)

    def path(self, secret=NEW, ttl=60, **claims):
        return "/?token=" + token(secret, self.net.clock.seconds() + ttl, **claims)

    def json_client(self, path):
        client = self.net.client(path=path)
        client.send_text(WELCOME)
        self.net.flush()
        self.assertEqual(json.loads(client.drain()[0])["type"], "welcome")
        return client

    def assert_closed(self, client, reason):
        self.assertEqual((client.remoteCloseCode, client.remoteCloseReason), (4001, reason))
        self.assertIsNotNone(client.close_info)

    def assert_nothing_left(self):
        self.assertTrue(self.net.registry.is_empty())
        self.assertEqual(self.net.factory.getConnectionCount(), 0)
        self.assertEqual(
            [c for c in self.net.clock.getDelayedCalls() if c.func.__name__ == "token_ended"], []
        )

    def close(self, *clients):
        for client in clients:
            if client.close_info is None:
                client.sendClose(1000)
        self.net.flush()
        self.assert_nothing_left()

    def test_a_peer_is_closed_when_its_token_expires_and_its_partner_is_told(self):
        """
        A registered peer in a session is closed with 4001 ``token
        expired`` at its token's exp, not a moment before; its partner
        (a longer token) is closed with 1000 as for any close.
        """
        alice = self.net.hello("alice", path=self.path(ttl=10.5))
        bob = self.net.hello("bob", path=self.path(ttl=60))
        alice.send_text("SESSION bob")
        self.net.flush()
        self.assertEqual(alice.drain(), ["SESSION_OK"])
        self.net.clock.advance(10.4)
        self.net.flush()
        self.assertIsNone(alice.close_info)
        with capturedLogs() as events:
            self.net.clock.advance(0.1)
            self.net.flush()
        self.assert_closed(alice, "token expired")
        self.assertEqual((bob.remoteCloseCode, bob.close_info[0]), (1000, True))
        self.assertEqual(self.net.factory.stats.token_closes, {"expired": 1})
        causes = [e.get("cause") for e in events if e.get("uid") == "alice"]
        self.assertEqual(causes, ["closed by the server: token expired"])
        self.close(alice, bob)

    def test_a_json_peer_is_closed_when_its_token_expires(self):
        """A welcomed peer of the JSON dialect is closed the same way at exp."""
        client = self.json_client(self.path(ttl=5, roles=["listener"]))
        self.net.clock.advance(5)
        self.net.flush()
        self.assert_closed(client, "token expired")
        self.close(client)

    def test_a_connection_that_has_not_chosen_its_dialect_is_closed_too(self):
        """On an auto port, a token that expires before the first message closes the connection."""
        client = self.net.client(path=self.path(ttl=0.25))
        self.net.clock.advance(0.25)
        self.net.flush()
        self.assert_closed(client, "token expired")
        self.close(client)

    def test_the_timer_goes_with_a_connection_that_closes_first(self):
        """A connection closed before its token expires leaves no timer behind."""
        client = self.net.hello("alice", path=self.path(ttl=60))
        self.assertEqual(
            len([c for c in self.net.clock.getDelayedCalls() if c.func.__name__ == "token_ended"]),
            1,
        )
        self.close(client)
        self.net.clock.advance(60)
        self.assertEqual(self.net.factory.stats.token_closes, {})

    def test_connections_whose_secret_was_removed_are_closed_on_reload(self):
        """
        After the old secret left the file and the keys were reloaded,
        the factory closes the connections of either dialect whose token
        it signed (4001 ``token revoked``), and no other.
        """
        old_peer = self.net.hello("old", path=self.path(OLD))
        old_json = self.json_client(self.path(OLD, roles=["listener"]))
        new_peer = self.net.hello("new", path=self.path(NEW))
        write_secrets(self.secrets, NEW)
        self.keys.reload()
        self.assertEqual(self.net.factory.close_revoked(), 2)
        self.net.flush()
        self.assert_closed(old_peer, "token revoked")
        self.assert_closed(old_json, "token revoked")
        self.assertIsNone(new_peer.close_info)
        self.assertEqual(self.net.factory.stats.token_closes, {"revoked": 2})
        self.assertEqual(self.net.factory.close_revoked(), 0)
        self.close(old_peer, old_json, new_peer)

    def test_closes_for_a_token_are_in_the_metrics_by_reason(self):
        """One expired and one revoked close show as signalling_token_closes by reason."""
        expiring = self.net.hello("soon", path=self.path(ttl=1))
        revoked = self.net.hello("old", path=self.path(OLD))
        self.net.clock.advance(1)
        write_secrets(self.secrets, NEW)
        self.keys.reload()
        self.net.factory.close_revoked()
        self.net.flush()
        collector = SignallingCollector(self.net.factory.stats, self.net.registry, [])
        family = {f.name: f for f in collector.collect()}["signalling_token_closes"]
        self.assertEqual(
            sorted((sample.labels["reason"], sample.value) for sample in family.samples),
            [("expired", 1), ("revoked", 1)],
        )
        self.close(expiring, revoked)

    def test_a_secret_removed_during_the_handshake_closes_the_connection_once_open(self):
        """
        A reload that removes the secret between the token's check and the
        opening of the WebSocket closes the connection as it opens (4001
        ``token revoked``): no connection outlives its secret unnoticed.
        """
        check = self.keys.check

        def check_then_reload(token_text):
            grant = check(token_text)
            write_secrets(self.secrets, NEW)
            self.keys.reload()
            return grant

        self.patch(self.keys, "check", check_then_reload)
        client = self.net.client(path=self.path(OLD))
        self.net.flush()
        self.assert_closed(client, "token revoked")
        self.close(client)

    def test_a_token_living_longer_than_the_maximum_is_refused_at_the_handshake(self):
        """A token for more than the maximum (an hour here) gets 401, counted as token_lifetime."""
        client = self.net.client(path=self.path(ttl=3601, iat=NOW))
        self.failureResultOf(client.opened, ConnectionError)
        self.assertEqual(self.net.factory.stats.connections_refused, {"token_lifetime": 1})
        self.net.flush()
        self.assert_nothing_left()


class _RealServer:
    """A real server with --auth-secret and a maximum of an hour."""

    timeout = 30
    #: Built as under twistd: the server handles signals.
    under_twistd = False

    async def setUp(self):
        self.secrets = os.path.abspath(self.mktemp())
        write_secrets(self.secrets, NEW, OLD)
        cert_dir = self.mktemp()
        pem = write_certificate(cert_dir).pem
        kind = "ssl" if self.tls else "tcp"
        self.server = await Server.start(
            self, "--port", f"{kind}:0:interface=127.0.0.1", "--cert-path", cert_dir,
            "--auth-secret", self.secrets, "--max-token-lifetime", "3600",
            under_twistd=self.under_twistd,
        )
        self.server.tls = self.tls
        self.server.pem = pem

    async def connect(self, secret=NEW, ttl=60, **claims):
        return await self.server.connect(
            path="/?token=" + token(secret, time.time() + ttl, **claims)
        )

    async def hello(self, uid, secret=NEW, ttl=60):
        client = await self.connect(secret, ttl)
        client.send_text(f"HELLO {uid}")
        await client.expect("HELLO")
        return client

    async def welcomed(self, secret=NEW, ttl=60):
        client = await self.connect(secret, ttl, roles=["listener"])
        client.send_text(WELCOME)
        self.assertEqual(json.loads(await client.next())["type"], "welcome")
        return client

    async def check_revocation(self, reload):
        """
        Once the old secret left the file, ``reload()`` closes the
        connections of either dialect whose token it signed (4001 ``token
        revoked``), logs how many, and leaves the others.
        """
        old_peer = await self.hello("old", secret=OLD)
        old_listener = await self.welcomed(secret=OLD)
        new_peer = await self.hello("new", secret=NEW)
        write_secrets(self.secrets, NEW)
        with capturedLogs() as events:
            reload()
            self.assertEqual(await old_peer.closed(), (4001, "token revoked"))
            self.assertEqual(await old_listener.closed(), (4001, "token revoked"))
        self.assertEqual(
            [e["count"] for e in events if "reloaded the token secrets" in e.get("log_format", "")],
            [2],
        )
        new_peer.send_text("ROOM_PEER_LIST")
        await new_peer.expect("ERROR not in a room")
        self.assertEqual(self.server.stats.token_closes, {"revoked": 2})


class RealSocketsMixin(_RealServer):
    """Expiry, revocation and the maximum over real sockets."""

    async def test_connections_of_both_dialects_are_closed_when_their_token_expires(self):
        """
        A peer in a session and a JSON peer, each with a token that
        expires in two seconds, are closed with 4001 ``token
        expired``; the partner (a longer token) gets 1000 and stays until then.
        """
        bob = await self.hello("bob", ttl=60)
        alice = await self.hello("alice", ttl=2)
        listener = await self.welcomed(ttl=2)
        alice.send_text("SESSION bob")
        await alice.expect("SESSION_OK")
        self.assertEqual(await alice.closed(), (4001, "token expired"))
        self.assertEqual(await listener.closed(), (4001, "token expired"))
        self.assertEqual(await bob.closed(), (1000, None))
        self.assertEqual(self.server.stats.token_closes, {"expired": 2})

    async def test_a_reload_closes_the_connections_whose_secret_was_removed(self):
        """
        After the old secret left the file, the service's reload (what
        SIGHUP runs) closes the connections of either dialect whose token
        it signed with 4001 ``token revoked``, and no other.
        """
        await self.check_revocation(self.server.service.reload)

    async def test_a_token_living_longer_than_the_maximum_gets_401(self):
        """
        A token for more than --max-token-lifetime is refused with 401
        (counted as token_lifetime); one for exactly that passes.
        """
        now = int(time.time())
        too_long = token(NEW, now + 3601, iat=now)
        self.assertEqual(await self.server.upgrade_status(upgrade_request(b"", "?token=" + too_long)), 401)
        self.assertEqual(self.server.stats.connections_refused, {"token_lifetime": 1})
        hour = token(NEW, now + 3600, iat=now)
        self.assertEqual(await self.server.upgrade_status(upgrade_request(b"", "?token=" + hour)), 101)


class PlaintextTests(RealSocketsMixin, unittest.TestCase):
    tls = False


class TLSTests(RealSocketsMixin, unittest.TestCase):
    tls = True


class SighupTests(_RealServer, unittest.TestCase):
    """The reload is a real SIGHUP to the process, as ``systemctl reload`` sends."""

    tls = True
    under_twistd = True

    async def test_sighup_closes_the_connections_whose_secret_was_removed(self):
        """
        Built as under twistd, a real SIGHUP reloads the secrets file and
        closes the connections whose secret it no longer holds (4001
        ``token revoked``), of either dialect; the others stay.
        """
        await self.check_revocation(lambda: os.kill(os.getpid(), signal.SIGHUP))

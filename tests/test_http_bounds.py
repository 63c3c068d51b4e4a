"""
The same bounds everywhere (issue 19), on the pages: ``Authorization``
headers of any kind, and static TURN passwords only for a page asked for
with a valid token. A real server on loopback ports, plaintext and TLS.
"""

import json

from twisted.trial import unittest

from signalling.server.auth import mint
from tests.certificates import write_certificate
from tests.servers import Server
from tests.test_web import page_config

AUTH_SECRET = b"k" * 40
TURN_SECRET = b"t" * 40
#: A static TURN server with a password, and a STUN server.
TURN_WITH_PASSWORD = "turn://user:s3cret-password@127.0.0.1:3478"
STUN = "stun:127.0.0.1:3478"


def token_file(testcase):
    path = testcase.mktemp()
    with open(path, "wb") as f:
        f.write(AUTH_SECRET + b"\n")
    return path


class BoundsMixin:
    """A real server, plaintext or TLS; subclasses choose."""

    timeout = 60

    async def start(self, *argv):
        cert_dir = self.mktemp()
        pem = write_certificate(cert_dir).pem
        kind = "ssl" if self.tls else "tcp"
        server = await Server.start(
            self, "--port", f"{kind}:0:interface=127.0.0.1", "--cert-path", cert_dir, *argv
        )
        server.tls = self.tls
        server.pem = pem
        return server

    async def token_server(self):
        turn_file = self.mktemp()
        with open(turn_file, "wb") as f:
            f.write(TURN_SECRET + b"\n")
        return await self.start(
            "--auth-secret", token_file(self), "--turn-secret", turn_file,
            "--turn-uri", "turn:127.0.0.1:3479",
            "--ice-server", STUN, "--ice-server", TURN_WITH_PASSWORD,
        )

    async def get(self, server, path, header=b""):
        """:returns: ``(status, body)`` of ``GET path`` with the raw ``header`` line(s)."""
        status, _, body = await server.http(
            b"GET " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\n" + header
            + b"Connection: close\r\n\r\n"
        )
        return status, body

    def malformed_authorizations(self):
        return [
            b"Authorization: Basic dXNlcjpwYXNzd29yZA==\r\n",
            b"Authorization:\r\n",
            b"Authorization: Bearer\r\n",
            b"Authorization: Bearer \xff\xfe\xc3\xa9\r\n",
            b"Authorization: \xc3\xa9 token\r\n",
            b"Authorization: Bearer " + b"a" * 12000 + b"\r\n",
        ]

    async def test_ice_servers_take_a_bearer_token_and_refuse_other_headers(self):
        """
        ``/ice-servers`` with a valid ``Authorization: Bearer`` token gets
        the servers, TURN credentials for the token's uid included; a Basic,
        empty, non-ASCII or huge header gets 401, never a 500.
        """
        server = await self.token_server()
        token = mint(AUTH_SECRET, 60, uid="alice")
        status, body = await self.get(
            server, "/ice-servers", b"Authorization: Bearer " + token.encode() + b"\r\n"
        )
        self.assertEqual(status, 200, body)
        servers = json.loads(body)["iceServers"]
        self.assertTrue(servers[-1]["username"].endswith(":alice"), servers)
        self.assertIn("s3cret-password", body.decode())
        for header in self.malformed_authorizations():
            status, body = await self.get(server, "/ice-servers", header)
            self.assertEqual(status, 401, header[:60])

    async def test_the_page_answers_any_authorization_header(self):
        """
        The page asked for with a Basic, empty, non-ASCII or huge
        ``Authorization`` header is served (200), without credentials; with
        a valid Bearer token it carries them.
        """
        server = await self.token_server()
        for header in self.malformed_authorizations():
            status, body = await self.get(server, "/", header)
            self.assertEqual(status, 200, header[:60])
            self.assertEqual(page_config(body.decode()), {"iceServers": [{"urls": STUN}]})
        token = mint(AUTH_SECRET, 60, uid="alice")
        status, body = await self.get(
            server, "/", b"Authorization: Bearer " + token.encode() + b"\r\n"
        )
        self.assertEqual(status, 200)
        self.assertIn(b"s3cret-password", body)

    async def test_static_turn_passwords_only_for_a_page_with_a_token(self):
        """
        With --auth-secret, the page without a token carries the STUN server
        but no --ice-server password and no TURN credentials; with a valid
        ``?token=`` it carries all of them; an invalid token is no token.
        """
        server = await self.token_server()
        for path in ("/", "/?token=not-a-token"):
            status, body = await self.get(server, path)
            self.assertEqual(status, 200)
            self.assertNotIn(b"s3cret-password", body)
            self.assertNotIn(b"3479", body)
            self.assertEqual(page_config(body.decode()), {"iceServers": [{"urls": STUN}]})
        token = mint(AUTH_SECRET, 60, uid="alice")
        status, body = await self.get(server, f"/?token={token}")
        servers = page_config(body.decode())["iceServers"]
        self.assertEqual(
            servers[:2],
            [
                {"urls": STUN},
                {"urls": "turn:127.0.0.1:3478", "username": "user", "credential": "s3cret-password"},
            ],
        )
        self.assertEqual(servers[2]["urls"], ["turn:127.0.0.1:3479"])

    async def test_without_tokens_the_page_carries_every_ice_server(self):
        """Without --auth-secret the page carries the --ice-server passwords, as before."""
        server = await self.start("--ice-server", TURN_WITH_PASSWORD)
        _, body = await self.get(server, "/")
        self.assertIn(b"s3cret-password", body)


class PlaintextBoundsTests(BoundsMixin, unittest.TestCase):
    tls = False


class TLSBoundsTests(BoundsMixin, unittest.TestCase):
    tls = True


"""
Tests for signalling.server.metrics: Prometheus metrics scraped over real HTTP
(twisted.web's Agent) from a server built by makeService with
``--metrics-port``, while real clients make a call, use a room, get
ERRORs, are refused at HELLO, fail a TLS handshake and miss a keepalive
(issue 4, Observability). The metrics port serves no WebSocket, and the
public ports serve no metrics.
"""

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial import unittest
from tests.certificates import write_certificate
from tests.clients import eventually
from tests.servers import Server, tls_handshake


PLAIN = "tcp:0:interface=127.0.0.1"
TLS = "ssl:0:interface=127.0.0.1"
METRICS = "tcp:0:interface=127.0.0.1"
#: Index of each port in the server's listening ports.
PLAIN_PORT, TLS_PORT, METRICS_PORT = 0, 1, 2

#: Every family the server exports, and its type.
FAMILIES = {
    "signalling_connections": "gauge",
    "signalling_peers": "gauge",
    "signalling_sessions": "gauge",
    "signalling_rooms": "gauge",
    "signalling_room_members": "gauge",
    "signalling_relayed_messages": "counter",
    "signalling_relayed_bytes": "counter",
    "signalling_sessions_started": "counter",
    "signalling_errors_sent": "counter",
    "signalling_hello_rejections": "counter",
    "signalling_keepalive_timeouts": "counter",
    "signalling_tls_handshake_failures": "counter",
}


class Scrape:
    """One scrape of /metrics, parsed."""

    def __init__(self, text):
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, sample_name, **labels):
        """
        :returns: the value of the sample called ``sample_name`` (counters
            end in ``_total``) with exactly ``labels``, or None.
        """
        for family in self.families.values():
            for sample in family.samples:
                if sample.name == sample_name and sample.labels == labels:
                    return sample.value
        return None

    def labelled(self, sample_name):
        """:returns: ``{label values: value}`` of every sample called ``sample_name``."""
        return {
            tuple(sorted(sample.labels.items())): sample.value
            for family in self.families.values()
            for sample in family.samples
            if sample.name == sample_name
        }


class MetricsTests(unittest.TestCase):
    """The metrics move with what happens on the server."""

    timeout = 60

    async def setUp(self):
        cert_dir = self.mktemp()
        self.files = write_certificate(cert_dir)
        self.other = write_certificate(self.mktemp())
        self.server = await Server.start(
            self,
            "--port", PLAIN,
            "--port", TLS,
            "--cert-path", cert_dir,
            "--metrics-port", METRICS,
            "--keepalive-timeout", "1",
            "--hello-timeout", "1",
            # A silent connection is closed for want of HELLO, not welcomed
            # as a JSON client.
            "--dialect", "examples",
        )
        self.server.pem = self.files.pem

    async def scrape(self):
        """:returns: a :class:`Scrape` of ``/metrics`` on the metrics port."""
        status, headers, body = await self.server.get("/metrics", METRICS_PORT)
        content_type = headers[b"content-type"].decode("ascii")
        self.assertEqual(status, 200, body)
        self.assertTrue(content_type.startswith("text/plain"), content_type)
        return Scrape(body.decode("utf-8"))

    async def settle(self, plain, tls):
        """Wait until the public ports hold ``plain`` and ``tls`` connections."""
        factories = self.server.ws_factory(PLAIN_PORT), self.server.ws_factory(TLS_PORT)
        await eventually(
            lambda: [f.getConnectionCount() for f in factories] == [plain, tls],
            lambda: f"{plain} and {tls} connections "
            f"(have {[f.getConnectionCount() for f in factories]})",
        )

    async def refused_hello(self, first_message):
        """Connect on the plaintext port, send ``first_message``, wait for the close."""
        client = await self.server.connect(PLAIN_PORT)
        client.send_text(first_message)
        code, _ = await client.closed()
        self.assertEqual(code, 1002)

    async def test_metrics_follow_a_real_call(self):
        """
        Scraped before, during and after a session, a room, refused
        requests and HELLOs (invalid, taken, missing in time), a failed TLS
        handshake and a keepalive timeout: gauges show what is there now (connections by endpoint,
        peers, sessions, rooms, room members), counters what happened
        (relayed messages and bytes by kind, call set-ups, ERRORs by
        reason, HELLO rejections by reason, keepalive timeouts, TLS
        handshake failures), and counters never go down.
        """
        before = await self.scrape()
        for name, kind in FAMILIES.items():
            self.assertEqual(before.families[name].type, kind, name)
        self.assertEqual(
            before.labelled("signalling_connections"),
            {(("endpoint", PLAIN),): 0, (("endpoint", TLS),): 0},
        )
        for name in ("peers", "sessions"):
            for dialect in ("examples", "json"):
                self.assertEqual(before.value(f"signalling_{name}", dialect=dialect), 0, name)
        for name in ("rooms", "room_members"):
            self.assertEqual(before.value(f"signalling_{name}"), 0, name)
        for kind in ("session", "room"):
            self.assertEqual(before.value("signalling_relayed_messages_total", kind=kind), 0)
            self.assertEqual(before.value("signalling_relayed_bytes_total", kind=kind), 0)
        for name in ("sessions_started", "keepalive_timeouts", "tls_handshake_failures"):
            self.assertEqual(before.value(f"signalling_{name}_total"), 0, name)
        self.assertEqual(before.labelled("signalling_errors_sent_total"), {})
        self.assertEqual(before.labelled("signalling_hello_rejections_total"), {})
        self.assertIsNotNone(before.value("process_open_fds"))

        # A call across the two ports, plaintext to TLS.
        alice = await self.server.hello("alice", PLAIN_PORT)
        bob = await self.server.hello("bob", TLS_PORT, tls=True)
        alice.send_text("SESSION bob")
        await alice.expect("SESSION_OK")
        offer = "v=0 offer \u00e9"
        alice.send_text(offer)
        alice.send_bytes(b"\x00\x01\x02")
        await bob.expect(offer, b"\x00\x01\x02")
        bob.send_text("answer")
        await alice.expect("answer")
        session_bytes = len(offer.encode("utf-8")) + 3 + len("answer")

        # A room across the two ports.
        carol = await self.server.hello("carol", PLAIN_PORT)
        dave = await self.server.hello("dave", TLS_PORT, tls=True)
        carol.send_text("ROOM r1")
        await carol.expect("ROOM_OK ")
        dave.send_text("ROOM r1")
        await dave.expect("ROOM_OK carol")
        await carol.expect("ROOM_PEER_JOINED dave")
        carol.send_text("ROOM_PEER_MSG dave hello-dave")
        await dave.expect("ROOM_PEER_MSG carol hello-dave")

        # ERRORs, which change nothing else.
        eve = await self.server.hello("eve", PLAIN_PORT)
        eve.send_text("SESSION nobody")
        await eve.expect("ERROR peer 'nobody' not found")
        eve.send_text("SESSION nobody")
        await eve.expect("ERROR peer 'nobody' not found")
        eve.send_text("FROB")
        await eve.next()
        eve.send_text("ROOM_PEER_LIST")
        await eve.expect("ERROR not in a room")
        carol.send_text("ROOM_PEER_MSG alice hi")
        await carol.expect("ERROR peer 'alice' is not in the room")

        # Refused HELLOs, a failed TLS handshake, a peer that stopped answering.
        await self.refused_hello("HELLO a b")
        await self.refused_hello("NOT_HELLO")
        await self.refused_hello("HELLO alice")
        plain_on_tls = await self.server.raw(TLS_PORT)
        plain_on_tls.transport.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await plain_on_tls.response()
        silent = await self.server.connect(PLAIN_PORT)
        self.assertEqual((await silent.closed())[0], 1008)
        deaf = await self.server.hello("deaf", PLAIN_PORT, answer_pings=False)
        self.assertEqual(await deaf.closed(timeout=10), (None, None))
        await eventually(
            lambda: self.server.stats.tls_handshake_failures == 1,
            "the server to see the TLS handshake fail",
        )
        await self.settle(plain=3, tls=2)

        during = await self.scrape()
        self.assertEqual(
            during.labelled("signalling_connections"),
            {(("endpoint", PLAIN),): 3, (("endpoint", TLS),): 2},
        )
        self.assertEqual(during.value("signalling_peers", dialect="examples"), 5)
        self.assertEqual(during.value("signalling_sessions", dialect="examples"), 1)
        self.assertEqual(during.value("signalling_rooms"), 1)
        self.assertEqual(during.value("signalling_room_members"), 2)
        self.assertEqual(during.value("signalling_relayed_messages_total", kind="session"), 3)
        self.assertEqual(
            during.value("signalling_relayed_bytes_total", kind="session"), session_bytes
        )
        self.assertEqual(during.value("signalling_relayed_messages_total", kind="room"), 1)
        self.assertEqual(
            during.value("signalling_relayed_bytes_total", kind="room"), len("hello-dave")
        )
        self.assertEqual(during.value("signalling_sessions_started_total"), 1)
        self.assertEqual(
            during.labelled("signalling_errors_sent_total"),
            {
                (("reason", "peer_not_found"),): 2,
                (("reason", "unknown_command"),): 1,
                (("reason", "not_in_room"),): 1,
                (("reason", "peer_not_in_room"),): 1,
            },
        )
        self.assertEqual(
            during.labelled("signalling_hello_rejections_total"),
            {
                (("reason", "invalid_uid"),): 1,
                (("reason", "invalid_protocol"),): 1,
                (("reason", "uid_taken"),): 1,
                (("reason", "hello_timeout"),): 1,
            },
        )
        self.assertEqual(during.value("signalling_keepalive_timeouts_total"), 1)
        self.assertEqual(during.value("signalling_tls_handshake_failures_total"), 1)
        # No uid, room id or payload ever becomes a label or a value.
        for secret in ("alice", "bob", "nobody", "r1", "hello-dave", "offer"):
            self.assertNotIn(secret, during.text)

        # The call ends: alice hangs up, bob is closed by the server.
        alice.close()
        self.assertEqual((await bob.closed())[0], 1000)
        for client in (carol, dave, eve):
            client.close()
            await client.closed()
        await self.settle(plain=0, tls=0)

        after = await self.scrape()
        self.assertEqual(
            after.labelled("signalling_connections"),
            {(("endpoint", PLAIN),): 0, (("endpoint", TLS),): 0},
        )
        for name in ("peers", "sessions"):
            for dialect in ("examples", "json"):
                self.assertEqual(after.value(f"signalling_{name}", dialect=dialect), 0, name)
        for name in ("rooms", "room_members"):
            self.assertEqual(after.value(f"signalling_{name}"), 0, name)
        for name in FAMILIES:
            if FAMILIES[name] == "counter":
                self.assertEqual(
                    after.labelled(name + "_total"), during.labelled(name + "_total"), name
                )

    async def test_heap_given_back_to_the_system_is_counted(self):
        """The trims of the C allocator's heap show in the metrics."""
        before = await self.scrape()
        self.assertEqual(before.families["signalling_memory_trims"].type, "counter")
        self.assertEqual(before.families["signalling_memory_trimmed_bytes"].type, "counter")
        # Some 18 MB freed in glibc's heap, in holes it cannot give back by itself.
        blocks = [bytes(60_000) for _ in range(600)]
        keep = blocks[1::2]
        del blocks
        self.server.service.getServiceNamed("memory").check()
        del keep
        after = await self.scrape()
        self.assertGreaterEqual(
            after.value("signalling_memory_trims_total")
            - before.value("signalling_memory_trims_total"),
            1,
        )
        self.assertGreater(
            after.value("signalling_memory_trimmed_bytes_total")
            - before.value("signalling_memory_trimmed_bytes_total"),
            16 * 1024 * 1024,
        )

    async def test_room_bytes_count_utf8_bytes(self):
        """
        Relayed room bytes count the payload's bytes on the wire (UTF-8),
        like session bytes do, not its characters.
        """
        carol = await self.server.hello("carol")
        dave = await self.server.hello("dave")
        carol.send_text("ROOM r1")
        await carol.expect("ROOM_OK ")
        dave.send_text("ROOM r1")
        await dave.expect("ROOM_OK carol")
        await carol.expect("ROOM_PEER_JOINED dave")
        payload = "caf\u00e9 \u2713 \U0001f44b"
        carol.send_text(f"ROOM_PEER_MSG dave {payload}")
        await dave.expect(f"ROOM_PEER_MSG carol {payload}")
        scrape = await self.scrape()
        self.assertEqual(scrape.value("signalling_relayed_messages_total", kind="room"), 1)
        self.assertEqual(
            scrape.value("signalling_relayed_bytes_total", kind="room"),
            len(payload.encode("utf-8")),
        )

    async def test_client_rejecting_the_certificate_is_a_tls_handshake_failure(self):
        """
        A client that rejects the server's certificate (the usual failure:
        expired, wrong name, untrusted) counts as a TLS handshake failure.
        In TLS 1.3 the server sends its Finished message before the client
        has checked the certificate, so "our Finished was sent" does not
        mean the handshake completed; a client that completes it does not
        count.
        """
        port = self.server.port_number(TLS_PORT)
        trusting = await tls_handshake(port, self.files.pem)
        self.assertIsNotNone(trusting.chain)
        untrusting = await tls_handshake(port, self.other.pem)
        self.assertIsNone(untrusting.chain)
        await self.server.wait_for_no_connection_from(lambda c: True)
        scrape = await self.scrape()
        self.assertEqual(scrape.value("signalling_tls_handshake_failures_total"), 1)

    async def test_metrics_port_serves_no_websocket(self):
        """
        A WebSocket upgrade on the metrics port, on any path, is not
        answered with 101 and opens no signalling connection.
        """
        for path in ("/", "/metrics", "/ws"):
            raw = await self.server.raw(METRICS_PORT)
            raw.transport.write(
                f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode("ascii")
            )
            await eventually(lambda: b"\r\n\r\n" in raw.received, "an answer")
            self.assertFalse(raw.received.startswith(b"HTTP/1.1 101"), raw.received)
            raw.transport.loseConnection()
        for port in (PLAIN_PORT, TLS_PORT):
            self.assertEqual(self.server.ws_factory(port).getConnectionCount(), 0)

    async def test_public_port_serves_no_metrics(self):
        """/metrics on the public port is a 404 without any metric in it."""
        status, _, body = await self.server.get("/metrics", PLAIN_PORT)
        self.assertEqual(status, 404)
        self.assertNotIn(b"signalling_", body)

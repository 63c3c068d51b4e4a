"""
The same bounds everywhere (issue 19), on the HTTP side and for client
addresses:

- every accepted connection counts against its client address until it
  closes, plain HTTP (the page, ``/health``) included; idle and trickling
  HTTP connections are closed (``--http-timeout``);
- IPv6 clients are counted by prefix (``--ipv6-prefix-length``, /64);
- behind ``--trust-proxy``, forwarded addresses are parsed and normalised,
  never exempt, and refused when they are not IP addresses; logs name only
  a parsed address;
- malformed ``Authorization`` headers on the pages;
- static TURN passwords only for a page asked for with a valid token;
- the server's own page (with ``--allowed-origin``) only under a name the
  server knows it has (``--server-name``, its certificate, localhost, IPs).

Unit tests first, then the pages in memory on one clock, then a real server
on loopback ports (plaintext and TLS), then the real ``twistd`` process.
"""

import datetime
import ipaddress
import json
import os

import txaio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import endpoints, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial import unittest

from signalling.core.registry import Registry
from signalling.server import tap, tls, web
from signalling.server.auth import mint
from signalling.server.factory import OPEN_HANDSHAKE_TIMEOUT
from signalling.server.limits import REFUSED, ConnectionLimits, parse_address
from signalling.server.policy import ServerNames, host_name
from tests.clients import RawClient, eventually, upgrade_request
from tests.helpers import open_from, parse, signalling_factory, unwrap
from tests.servers import ProcessMixin, Server
from tests.test_web import _TCPLikeTransport, page_config

#: One IPv6 address, six ways.
SPELLINGS = (
    "2001:db8::7",
    "2001:DB8::7",
    "2001:0db8:0000:0000:0000:0000:0000:0007",
    "2001:db8:0:0:0:0:0:7",
    "2001:db8::0:7",
    "2001:db8::7%eth0",
)
#: What a proxy may not forward: none of it is an IP address.
NOT_ADDRESSES = (
    "unix:x",
    "tcp4:203.0.113.9:80",
    "evil registered from 10.0.0.1",
    "unknown",
    "203.0.113.9:80",
    "[2001:db8::7]",
    "",
)
AUTH_SECRET = b"k" * 40
TURN_SECRET = b"t" * 40
#: A static TURN server with a password, and a STUN server.
TURN_WITH_PASSWORD = "turn://user:s3cret-password@127.0.0.1:3478"
STUN = "stun:127.0.0.1:3478"


# Units: the counts, the names.

class AddressKeyTests(unittest.SynchronousTestCase):
    """What :class:`ConnectionLimits` counts a client address as."""

    def test_ipv6_clients_are_counted_by_their_64(self):
        """
        With a cap of 3, 40 addresses of one /64 get 3 places between
        them; an address of another /64 has its own.
        """
        limits = ConnectionLimits(3, 100, exempt=())
        admitted = [
            limits.admit_address(IPv6Address("TCP", f"2001:db8:0:1::{i:x}", 4000 + i))
            for i in range(1, 41)
        ]
        self.assertEqual([a for a in admitted if a is not REFUSED], ["2001:db8:0:1::/64"] * 3)
        self.assertEqual(open_from(limits, "2001:db8:0:1:ffff::1"), 3)
        other = limits.admit_address(IPv6Address("TCP", "2001:db8:0:2::1", 4000))
        self.assertEqual(other, "2001:db8:0:2::/64")
        for key in admitted[:3] + [other]:
            limits.release(key)
        self.assertEqual(limits._open, {})

    def test_the_prefix_length_is_configurable(self):
        """With /128 each IPv6 address is counted alone; with /48 a /48 shares one count."""
        alone = ConnectionLimits(1, 100, exempt=(), ipv6_prefix=128)
        self.assertEqual(alone.admit_address(IPv6Address("TCP", "2001:db8::1", 1)), "2001:db8::1")
        self.assertEqual(alone.admit_address(IPv6Address("TCP", "2001:db8::2", 1)), "2001:db8::2")
        wide = ConnectionLimits(1, 100, exempt=(), ipv6_prefix=48)
        self.assertEqual(wide.admit_address(IPv6Address("TCP", "2001:db8:0:1::1", 1)), "2001:db8::/48")
        self.assertIs(wide.admit_address(IPv6Address("TCP", "2001:db8:0:2::1", 1)), REFUSED)

    def test_ipv4_is_counted_by_address_and_mapped_ipv6_as_ipv4(self):
        """
        IPv4 addresses are counted one by one; an IPv4-mapped IPv6 address
        (a dual-stack socket's) shares the count of the IPv4 address.
        """
        limits = ConnectionLimits(2, 100, exempt=())
        self.assertEqual(limits.admit_address(IPv4Address("TCP", "192.0.2.1", 1)), "192.0.2.1")
        self.assertEqual(
            limits.admit_address(IPv6Address("TCP", "::ffff:192.0.2.1", 1)), "192.0.2.1"
        )
        self.assertIs(limits.admit_address(IPv4Address("TCP", "192.0.2.1", 2)), REFUSED)
        self.assertEqual(limits.admit_address(IPv4Address("TCP", "192.0.2.2", 1)), "192.0.2.2")

    def test_spellings_of_one_address_share_one_count(self):
        """Six spellings of one IPv6 address (even counted per /128) are one address."""
        limits = ConnectionLimits(1, 100, exempt=(), ipv6_prefix=128)
        keys = [limits.admit_forwarded(parse_address(s)) for s in SPELLINGS]
        self.assertEqual(keys, ["2001:db8::7"] + [REFUSED] * 5)

    def test_forwarded_addresses_are_never_exempt(self):
        """
        Loopback is exempt at accept (the proxy's address), but a forwarded
        loopback address is counted like any other.
        """
        limits = ConnectionLimits(1, 100)
        self.assertIsNone(limits.admit_address(IPv4Address("TCP", "127.0.0.1", 1)))
        for text in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
            key = limits.admit_forwarded(parse_address(text))
            self.assertNotEqual(key, REFUSED, text)
            self.assertIs(limits.admit_forwarded(parse_address(text)), REFUSED, text)
            limits.release(key)

    def test_only_ip_addresses_parse(self):
        """Addresses parse to one normal form; anything else raises ValueError."""
        self.assertEqual(str(parse_address(" 2001:DB8::0:7 ")), "2001:db8::7")
        self.assertEqual(str(parse_address("::ffff:203.0.113.9")), "203.0.113.9")
        self.assertEqual(str(parse_address("2001:db8::7%eth0")), "2001:db8::7")
        for text in NOT_ADDRESSES + ("01.2.3.4", "1.2.3", "localhost"):
            with self.assertRaises(ValueError, msg=text):
                parse_address(text)


def certificate_files(directory, names):
    """Write a self-signed certificate for the DNS ``names``; :returns: its CertificateFiles."""
    os.makedirs(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in names]
                + [x509.IPAddress(ipaddress.ip_address("192.0.2.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    files = tls.CertificateFiles(
        os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    )
    with open(files.cert, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(files.key, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return files


class ServerNamesTests(unittest.SynchronousTestCase):
    """The names whose pages are the server's own (:class:`ServerNames`)."""

    def test_localhost_ip_literals_and_given_names_are_own(self):
        """localhost, any IP literal and the names given are the server's; other names not."""
        names = ServerNames(["Signalling.Example.org.", "*.rooms.example.org"])
        for host in (
            "localhost",
            "127.0.0.1",
            "203.0.113.9",
            "::1",
            "signalling.example.org",
            "a.rooms.example.org",
        ):
            self.assertIn(host, names)
        for host in ("evil.example", "example.org", "b.a.rooms.example.org", "rooms.example.org"):
            self.assertNotIn(host, names)

    def test_the_certificates_dns_names_are_own_and_follow_a_reload(self):
        """
        The DNS names of the TLS certificate (a wildcard covering one label)
        are the server's; after a reload, those of the new certificate.
        """
        directory = self.mktemp()
        files = certificate_files(directory, ["signalling.test", "*.wild.test"])
        server_tls = tls.ServerTLS(files)
        names = ServerNames((), server_tls)
        self.assertIn("signalling.test", names)
        self.assertIn("a.wild.test", names)
        self.assertNotIn("wild.test", names)
        self.assertNotIn("other.test", names)
        other = certificate_files(directory + "-2", ["other.test"])
        for name in ("cert", "key"):
            os.replace(getattr(other, name), getattr(files, name))
        self.assertTrue(server_tls.reload())
        self.assertIn("other.test", names)
        self.assertNotIn("signalling.test", names)

    def test_host_name_of_a_host_header(self):
        """The host of ``host[:port]``, lower case; an IPv6 literal without brackets."""
        self.assertEqual(host_name("Example.org:8443"), "example.org")
        self.assertEqual(host_name("example.org"), "example.org")
        self.assertEqual(host_name("[::1]:8443"), "::1")
        self.assertEqual(host_name("127.0.0.1:80"), "127.0.0.1")


class OptionTests(unittest.TestCase):
    """``--ipv6-prefix-length``, ``--http-timeout`` and ``--server-name``."""

    def factory(self, *argv):
        """:returns: the WebSocket factory ``makeService`` builds for ``tcp:8080`` and ``argv``."""
        memory = MemoryReactorClock()
        service = tap.makeService(parse("--port", "tcp:8080", *argv), reactor=memory)
        service.startService()
        self.addCleanup(service.stopService)
        [(_, factory, _, _)] = memory.tcpServers
        return unwrap(factory)

    def assert_refused(self, *argv):
        with self.assertRaises(UsageError, msg=argv):
            parse(*argv)

    def test_ipv6_prefix_length(self):
        """/64 by default, from 1 to 128, described in the help, handed to the limits."""
        self.assertEqual(parse()["ipv6-prefix-length"], 64)
        for value in ("0", "129", "x"):
            self.assert_refused("--ipv6-prefix-length", value)
        self.assertIn("--ipv6-prefix-length", str(tap.Options()))
        self.assertEqual(self.factory("--ipv6-prefix-length", "56").policy.limits.ipv6_prefix, 56)

    def test_http_timeout(self):
        """10 s by default, more than 0, described in the help, handed to the pages' site."""
        self.assertEqual(parse()["http-timeout"], 10.0)
        for value in ("0", "-1", "nan"):
            self.assert_refused("--http-timeout", value)
        self.assertIn("--http-timeout", str(tap.Options()))
        site = self.factory("--http-timeout", "3").web
        self.assertEqual((site.timeOut, site.request_timeout), (3.0, 3.0))

    def test_server_name(self):
        """None by default, repeatable, host names only, described in the help, handed to the factory."""
        self.assertEqual(parse()["server-name"], [])
        for value in ("https://example.org", "example.org:8443", ""):
            self.assert_refused("--server-name", value)
        self.assertIn("--server-name", str(tap.Options()))
        names = self.factory(
            "--server-name", "signalling.example.org", "--server-name", "other.example.org"
        ).policy.server_names
        self.assertIn("signalling.example.org", names)
        self.assertIn("other.example.org", names)
        self.assertNotIn("third.example.org", names)

# The pages in memory, on one clock.

_HEALTH = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
_UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


class PageConnectionTests(unittest.SynchronousTestCase):
    """A port's plain HTTP connections, on a fake clock, from 192.0.2.1."""

    def setUp(self):
        self.clock = Clock()
        self.patch(txaio.config, "loop", self.clock)
        self.limits = ConnectionLimits(2, 100, exempt=())
        self.factory = web.with_pages(
            signalling_factory(Registry(), self.clock, limits=self.limits, count_addresses=True),
            timeout=3,
        )

    def connect(self):
        """:returns: ``(protocol, transport)`` of a new connection, or ``(None, None)`` when refused."""
        address = IPv4Address("TCP", "192.0.2.1", 40000)
        protocol = self.factory.buildProtocol(address)
        if protocol is None:
            return None, None
        transport = _TCPLikeTransport(peerAddress=address)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def lose(self, transport):
        transport.protocol.connectionLost(Failure(ConnectionDone()))

    def test_a_kept_alive_http_connection_counts_until_it_closes(self):
        """
        Two connections answered at /health and kept alive hold both places
        of their address: a third is refused at accept; once one closes, a
        new one is served.
        """
        kept = []
        for _ in range(2):
            _, transport = self.connect()
            transport.protocol.dataReceived(_HEALTH)
            self.assertTrue(transport.value().endswith(b"\r\n\r\nOK\n"), transport.value())
            self.assertFalse(transport.disconnecting)
            kept.append(transport)
        self.assertEqual(open_from(self.limits, "192.0.2.1"), 2)
        self.assertEqual(self.connect(), (None, None))
        self.lose(kept.pop())
        self.assertEqual(open_from(self.limits, "192.0.2.1"), 1)
        _, transport = self.connect()
        self.assertIsNotNone(transport)
        for transport in kept + [transport]:
            self.lose(transport)
        self.assertEqual(self.limits._open, {})

    def test_an_upgrade_after_page_requests_is_counted_once(self):
        """
        A WebSocket upgrade on a connection that asked for pages first is
        still one connection of its address, given back when it closes.
        """
        _, transport = self.connect()
        transport.protocol.dataReceived(_HEALTH)
        transport.clear()
        transport.protocol.dataReceived(_UPGRADE)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 "), transport.value())
        self.assertEqual(open_from(self.limits, "192.0.2.1"), 1)
        self.lose(transport)
        self.assertEqual(self.limits._open, {})

    def test_an_idle_kept_alive_connection_is_closed_after_the_timeout(self):
        """After its last answer, a connection that sends nothing is closed after --http-timeout."""
        _, transport = self.connect()
        transport.protocol.dataReceived(_HEALTH)
        self.clock.advance(2.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.lose(transport)
        self.assertEqual(self.limits._open, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_request_trickling_in_is_closed_after_the_timeout(self):
        """
        A second request whose head comes a line a second (each line would
        start the idle timeout again) is closed --http-timeout after its
        first byte, unanswered.
        """
        _, transport = self.connect()
        transport.protocol.dataReceived(_HEALTH)
        transport.clear()
        transport.protocol.dataReceived(b"GET /health HTTP/1.1\r\n")
        for i in range(2):
            self.clock.advance(1)
            transport.protocol.dataReceived(b"X-Trickle-%d: 1\r\n" % i)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.lose(transport)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_requests_in_time_keep_the_connection(self):
        """Requests that each arrive within the timeout are all answered on one connection."""
        _, transport = self.connect()
        for _ in range(5):
            transport.protocol.dataReceived(_HEALTH)
            self.clock.advance(2)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 "), 5)
        self.assertFalse(transport.disconnecting)
        self.lose(transport)

    def test_a_first_request_head_trickling_in_is_dropped(self):
        """The first request's head, before the pages take the connection, has a deadline too."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET /health HTTP/1.1\r\n")
        elapsed = 0
        while not transport.disconnecting and elapsed <= OPEN_HANDSHAKE_TIMEOUT + 2:
            self.clock.advance(1)
            elapsed += 1
            protocol.dataReceived(b"X-Trickle: 1\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertLessEqual(elapsed, OPEN_HANDSHAKE_TIMEOUT + 1)
        self.lose(transport)
        self.assertEqual(self.limits._open, {})


# A real server on loopback ports.

def token_file(testcase):
    path = testcase.mktemp()
    with open(path, "wb") as f:
        f.write(AUTH_SECRET + b"\n")
    return path


class BoundsMixin:
    """A real server, plaintext or TLS; subclasses choose."""

    timeout = 60

    async def start(self, *argv):
        return await Server.on_loopback(self, self.tls, *argv)

    async def raw_from(self, server, source="127.0.0.1"):
        """:returns: a raw client connected from the loopback address ``source``."""
        endpoint = endpoints.TCP4ClientEndpoint(
            reactor, "127.0.0.1", server.port_number(), timeout=5, bindAddress=(source, 0)
        )
        if self.tls:
            options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(server.pem))
            endpoint = endpoints.wrapClientTLS(options, endpoint)
        client = await endpoint.connect(Factory.forProtocol(RawClient))
        server.raw_clients.append(client)
        return client

    async def upgrade(self, server, forwarded):
        """
        Ask for an upgrade with ``X-Forwarded-For: forwarded``.

        :returns: ``(status, raw client)``; a 101 connection stays open.
        """
        raw = await server.raw()
        raw.transport.write(upgrade_request(b"X-Forwarded-For: " + forwarded.encode() + b"\r\n"))
        await raw._until(lambda: b"\r\n\r\n" in raw.received or raw.is_lost, "the answer")
        return int(raw.received.split()[1]), raw

    # Plain HTTP counts until it closes; idle connections go.

    async def test_kept_alive_page_connections_count_until_closed_and_idle_ones_go(self):
        """
        With 3 places per address (loopback counted), three kept-alive
        /health connections hold them all: a fourth from 127.0.0.1 is
        closed unanswered, /health from 127.0.0.2 answers; once idle for
        --http-timeout the three are closed and 127.0.0.1 is served again.
        """
        server = await self.start(
            "--max-connections-per-address", "3", "--unlimited-address", "10.0.0.0/8",
            "--http-timeout", "1",
        )
        kept = []
        for _ in range(3):
            client = await self.raw_from(server)
            client.transport.write(_HEALTH)
            await client._until(lambda c=client: c.received.endswith(b"OK\n"), "the answer")
            kept.append(client)
        self.assertEqual(open_from(server.factory.policy.limits, "127.0.0.1"), 3)
        refused = await self.raw_from(server)
        refused.transport.write(_HEALTH)
        await refused.dropped()
        self.assertEqual(refused.received, b"")
        other = await self.raw_from(server, "127.0.0.2")
        other.transport.write(_HEALTH)
        await other._until(lambda: other.received.endswith(b"OK\n"), "the answer")
        for client in kept:
            await client.dropped()
        await eventually(
            lambda: open_from(server.factory.policy.limits, "127.0.0.1") == 0, "the places to be given back"
        )
        await server.hello("again")

    # Forwarded addresses.

    async def test_spellings_of_one_forwarded_address_are_one_address(self):
        """
        Behind --trust-proxy 1 with one place per address, six spellings of
        one IPv6 address (counted per /128) and an IPv4 address and its
        IPv4-mapped forms are one address each: only the first gets 101.
        """
        server = await self.start(
            "--trust-proxy", "1", "--max-connections-per-address", "1",
            "--ipv6-prefix-length", "128",
        )
        for family in (SPELLINGS, ("203.0.113.9", "::ffff:203.0.113.9", "::FFFF:CB00:7109")):
            statuses = [(await self.upgrade(server, text))[0] for text in family]
            self.assertEqual(statuses, [101] + [429] * (len(family) - 1), family)

    async def test_forwarded_ipv6_addresses_are_counted_by_their_64(self):
        """Behind a proxy, two addresses of one /64 share its place; another /64 has its own."""
        server = await self.start("--trust-proxy", "1", "--max-connections-per-address", "1")
        self.assertEqual((await self.upgrade(server, "2001:db8:0:1::1"))[0], 101)
        self.assertEqual((await self.upgrade(server, "2001:db8:0:1::2"))[0], 429)
        self.assertEqual((await self.upgrade(server, "2001:db8:0:2::1"))[0], 101)

    async def test_forwarded_loopback_addresses_are_counted(self):
        """A forwarded 127.0.0.1 or ::1 is not exempt: its second connection gets 429."""
        server = await self.start("--trust-proxy", "1", "--max-connections-per-address", "1")
        for text in ("127.0.0.1", "::1"):
            self.assertEqual((await self.upgrade(server, text))[0], 101, text)
            self.assertEqual((await self.upgrade(server, text))[0], 429, text)

    async def test_a_forwarded_value_that_is_no_address_is_refused(self):
        """Anything a proxy forwards that is not an IP address gets 400, counted as forwarded."""
        server = await self.start("--trust-proxy", "1")
        with capturedLogs() as events:
            for text in NOT_ADDRESSES:
                self.assertEqual((await self.upgrade(server, text))[0], 400, text)
        self.assertEqual(server.stats.connections_refused, {"forwarded": len(NOT_ADDRESSES)})
        self.assertNotIn("evil", repr(events))

    # Logs name parsed addresses only.

    async def registered(self, server, uid, forwarded):
        """:returns: the "registered" event of ``uid`` connecting with ``X-Forwarded-For: forwarded``."""
        with capturedLogs() as events:
            await server.hello(uid, headers={"X-Forwarded-For": forwarded})
        [event] = [e for e in events if "registered from" in (e.get("log_format") or "")]
        client = server.clients[-1]
        client.close()
        await client.closed()
        return event

    async def test_the_log_names_the_forwarded_address_normalised(self):
        """The peer address logged is the forwarded one in its normal spelling."""
        server = await self.start("--trust-proxy", "1")
        event = await self.registered(server, "alice", "198.51.100.7, 2001:DB8:0:0::1")
        self.assertEqual(event["peer_addr"], "2001:db8::1")
        event = await self.registered(server, "bob", "::ffff:203.0.113.9")
        self.assertEqual(event["peer_addr"], "203.0.113.9")

    async def test_the_header_counts_only_from_the_proxy(self):
        """
        A client that is not in the exempt (proxy) networks cannot choose
        its address: its socket's address is logged, and counted.
        """
        server = await self.start(
            "--trust-proxy", "1", "--unlimited-address", "10.0.0.0/8",
            "--max-connections-per-address", "1",
        )
        event = await self.registered(server, "alice", "203.0.113.9")
        self.assertTrue(event["peer_addr"].startswith("tcp4:127.0.0.1:"), event["peer_addr"])
        limits = server.factory.policy.limits
        await eventually(lambda: open_from(limits, "127.0.0.1") == 0, "alice's place")
        status, _ = await self.upgrade(server, "evil registered from 10.0.0.1")
        self.assertEqual(status, 101)
        self.assertEqual(open_from(limits, "127.0.0.1"), 1)
        self.assertEqual(open_from(limits, "203.0.113.9"), 0)

    # Authorization headers, and TURN passwords.

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

    # The server's own page, and DNS rebinding.

    async def origin_status(self, server, host, origin):
        port = server.port_number()
        request = upgrade_request(
            b"Origin: " + origin.format(port=port).encode() + b"\r\n"
        ).replace(b"Host: localhost\r\n", b"Host: " + host.format(port=port).encode() + b"\r\n")
        return await server.upgrade_status(request)

    async def test_the_own_page_exception_needs_a_name_the_server_has(self):
        """
        With --allowed-origin, an origin equal to the Host header is the
        server's own page only under localhost, an IP literal or a
        --server-name, and only for http and https: a page of another site
        reached through a name that resolves to the server gets 403.
        """
        server = await self.start(
            "--allowed-origin", "https://app.example.org",
            "--server-name", "signalling.example.org",
        )
        cases = [
            ("evil.example:{port}", "http://evil.example:{port}", 403),
            ("evil.example:{port}", "https://evil.example:{port}", 403),
            ("evil.example", "http://evil.example", 403),
            ("localhost:{port}", "ftp://localhost:{port}", 403),
            ("localhost:{port}", "https://localhost:{port}", 101),
            ("127.0.0.1:{port}", "http://127.0.0.1:{port}", 101),
            ("[::1]:{port}", "http://[::1]:{port}", 101),
            ("signalling.example.org:{port}", "https://signalling.example.org:{port}", 101),
            ("signalling.example.org", "https://SIGNALLING.example.org", 101),
            ("localhost:{port}", "https://app.example.org", 101),
        ]
        for host, origin, expected in cases:
            status = await self.origin_status(server, host, origin)
            self.assertEqual(status, expected, (host, origin))
        self.assertEqual(server.stats.connections_refused, {"origin": 4})


class PlaintextBoundsTests(BoundsMixin, unittest.TestCase):
    tls = False


class TLSBoundsTests(BoundsMixin, unittest.TestCase):
    tls = True

    async def test_the_certificates_names_are_the_servers_own(self):
        """Over TLS, the DNS names of the served certificate count as the server's own."""
        cert_dir = self.mktemp()
        files = certificate_files(cert_dir, ["localhost", "signalling.test"])
        with open(files.cert, "rb") as f:
            pem = f.read()
        server = await Server.start(
            self, "--port", "ssl:0:interface=127.0.0.1", "--cert-path", cert_dir,
            "--allowed-origin", "https://app.example.org",
        )
        server.tls = True
        server.pem = pem
        self.assertEqual(
            await self.origin_status(
                server, "signalling.test:{port}", "https://signalling.test:{port}"
            ),
            101,
        )
        self.assertEqual(
            await self.origin_status(server, "other.test:{port}", "https://other.test:{port}"),
            403,
        )


# The real twistd process.

class ProcessBoundsTests(ProcessMixin, unittest.TestCase):
    """``twistd -n signalling`` with small bounds, over plaintext."""

    timeout = 60

    def raw_from(self, port, source):
        endpoint = endpoints.TCP4ClientEndpoint(
            reactor, "127.0.0.1", port, timeout=5, bindAddress=(source, 0)
        )
        d = endpoint.connect(Factory.forProtocol(RawClient))

        def connected(client):
            self.addCleanup(lambda: client.is_lost or client.transport.abortConnection())
            return client

        return d.addCallback(connected)

    @inlineCallbacks
    def health(self, port, source):
        """:returns: the raw answer to ``GET /health`` (closing) from ``source``."""
        client = yield self.raw_from(port, source)
        client.transport.write(
            b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        answer = yield client.response()
        return answer

    @inlineCallbacks
    def test_kept_alive_connections_are_bounded_and_health_answers_when_full(self):
        """
        With 3 places per address and 2 WebSockets in all: 3 kept-alive
        /health connections from 127.0.0.1 hold its places, the 4th to 6th
        are closed unanswered; /health from 127.0.0.2 answers; the idle
        ones are closed after --http-timeout; with the server full of
        WebSockets a third upgrade gets 503 and /health still answers; the
        server then stops cleanly.
        """
        server, port = yield self.start_server(
            "tcp:{port}:interface=127.0.0.1",
            "--max-connections-per-address", "3", "--unlimited-address", "10.0.0.0/8",
            "--http-timeout", "1", "--max-connections", "2",
        )
        kept = []
        for _ in range(3):
            client = yield self.raw_from(port, "127.0.0.1")
            client.transport.write(_HEALTH)
            yield client._until(lambda c=client: c.received.endswith(b"OK\n"), "the answer")
            kept.append(client)
        for _ in range(3):
            refused = yield self.raw_from(port, "127.0.0.1")
            refused.transport.write(_HEALTH)
            yield refused.dropped()
            self.assertEqual(refused.received, b"")
        answer = yield self.health(port, "127.0.0.2")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        for client in kept:
            yield client.dropped()
        upgraded = []
        for source in ("127.0.0.3", "127.0.0.4"):
            client = yield self.raw_from(port, source)
            yield client.upgrade()
            upgraded.append(client)
        full = yield self.raw_from(port, "127.0.0.5")
        full.transport.write(upgrade_request())
        answer = yield full.response()
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer)
        answer = yield self.health(port, "127.0.0.5")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        answer = yield self.health(port, "127.0.0.1")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        for client in upgraded:
            client.transport.loseConnection()
            yield client.dropped()
        yield self.stop_server(server)

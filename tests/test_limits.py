"""
Connection limits (``signalling.server.limits``): per client address at
accept (before TLS), in all at the WebSocket upgrade (503, while /health
still answers), and per forwarded address behind a trusted proxy (429);
refusals counted in the metrics. Unit tests of the counts, then a real
server on loopback ports, plaintext and TLS.
"""


from twisted.internet.protocol import Factory
from twisted.trial import unittest

from signalling.core.wire import MAX_ID_LENGTH
from signalling.server import tap
from signalling.server.settings import DEFAULT_MAX_OUTPUT
from signalling.server.limits import ConnectionLimits
from signalling.server.metrics import Stats
from tests.clients import RawClient, eventually, upgrade_request
from tests.servers import Server, client_endpoint
from tests.helpers import open_from


class ConnectionLimitsTests(unittest.SynchronousTestCase):
    """The counts themselves."""

    def test_an_address_holds_at_most_its_share_and_gets_it_back(self):
        """Past per_address a connection is refused (and counted); a release frees a place."""
        stats = Stats()
        limits = ConnectionLimits(2, 10, exempt=(), stats=stats)
        self.assertTrue(limits.admit("192.0.2.1"))
        self.assertTrue(limits.admit("192.0.2.1"))
        self.assertFalse(limits.admit("192.0.2.1"))
        self.assertTrue(limits.admit("192.0.2.2"))
        self.assertEqual(stats.connections_refused, {"per_address": 1})
        limits.release("192.0.2.1")
        self.assertTrue(limits.admit("192.0.2.1"))
        for _ in range(2):
            limits.release("192.0.2.1")
        limits.release("192.0.2.2")
        self.assertEqual(open_from(limits, "192.0.2.1"), 0)
        self.assertEqual(limits._open, {})

    def test_exempt_networks_cover_their_addresses_and_mapped_ones(self):
        """Loopback is exempt by default, IPv4-mapped IPv6 addresses included."""
        limits = ConnectionLimits(1, 10)
        for host in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
            self.assertTrue(limits.exempt(host), host)
        for host in ("192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1", "not an address"):
            self.assertFalse(limits.exempt(host), host)

    def test_websockets_in_all_are_capped(self):
        """Past ``total`` an upgrade is refused (and counted); a release frees a place."""
        stats = Stats()
        limits = ConnectionLimits(10, 2, stats=stats)
        self.assertTrue(limits.admit_websocket())
        self.assertTrue(limits.admit_websocket())
        self.assertFalse(limits.admit_websocket())
        limits.release_websocket()
        self.assertTrue(limits.admit_websocket())
        self.assertEqual(stats.connections_refused, {"total": 1})


class RoomOutputTests(unittest.SynchronousTestCase):
    def test_the_largest_room_fits_the_output_bound_many_times_over(self):
        """
        With the defaults, what a member of a full room can be owed at once
        (the member list, longest uids, and a notice of every member's join
        or leave) is a small part of the output bound: a member that reads
        slowly is never closed for the size of its room.
        """
        members = tap.DEFAULT_MAX_ROOM_MEMBERS
        member_list = len("ROOM_PEER_LIST") + members * (MAX_ID_LENGTH + 1)
        notices = members * len("ROOM_PEER_JOINED ") + members * MAX_ID_LENGTH
        self.assertLess(member_list + 2 * notices, DEFAULT_MAX_OUTPUT // 4)


class LimitsMixin:
    """The limits on a real server; subclasses choose plaintext or TLS."""

    timeout = 60

    async def start(self, *argv):
        return await Server.on_loopback(self, self.tls, *argv)

    async def test_an_address_past_its_share_is_refused_at_once_and_served_again_later(self):
        """
        With two connections per address (loopback not exempt), a third
        from 127.0.0.1 is closed as soon as it connects, before any TLS or
        HTTP; once one of the two closes, a new one is served; the refusal
        is counted.
        """
        server = await self.start(
            "--max-connections-per-address", "2", "--unlimited-address", "10.0.0.0/8"
        )
        first = await server.hello("first")
        second = await server.hello("second")
        tcp = client_endpoint(server.port_number())
        refused = await tcp.connect(Factory.forProtocol(RawClient))
        server.raw_clients.append(refused)
        await refused.dropped()
        self.assertEqual(refused.received, b"")
        self.assertEqual(server.stats.connections_refused, {"per_address": 1})
        first.close()
        await first.closed()
        await eventually(
            lambda: open_from(server.factory.policy.limits, "127.0.0.1") == 1,
            "the closed connection to be given back",
        )
        third = await server.hello("third")
        self.assertTrue(third.is_live and second.is_live)

    async def test_plain_http_requests_give_their_place_back_when_they_close(self):
        """
        A plain request handed to the pages holds its address's place until
        its connection closes (``Connection: close`` here), then gives it back.
        """
        server = await self.start(
            "--max-connections-per-address", "1", "--unlimited-address", "10.0.0.0/8"
        )
        for _ in range(3):
            status, _, body = await server.get("/health")
            self.assertEqual((status, body), (200, b"OK\n"))
        await server.hello("after")

    async def test_websockets_past_the_total_get_503_and_health_still_answers(self):
        """With --max-connections 2 the third upgrade gets 503; /health answers 200."""
        server = await self.start("--max-connections", "2")
        await server.hello("a")
        await server.hello("b")
        status, _, _ = await server.http(upgrade_request())
        self.assertEqual(status, 503)
        status, _, body = await server.get("/health")
        self.assertEqual((status, body), (200, b"OK\n"))
        self.assertEqual(server.stats.connections_refused, {"total": 1})

    async def test_a_full_room_of_the_longest_uids_stays_within_the_output_bound(self):
        """
        A room filled to --max-room-members with uids of 256 characters: a
        member that reads nothing while they all join is still open, and
        then gets every notice and the whole member list; so does the last.
        """
        size = 120
        server = await self.start("--max-room-members", str(size))
        uids = [f"{i:03d}".ljust(MAX_ID_LENGTH, "u") for i in range(size)]
        first = await server.hello(uids[0])
        first.send_text("ROOM big")
        await first.expect("ROOM_OK ")
        first.transport.pauseProducing()
        members = [first]
        for uid in uids[1:]:
            member = await server.hello(uid)
            member.send_text("ROOM big")
            members.append(member)
        last = members[-1]
        await last.expect("ROOM_OK " + " ".join(uids[:-1]))
        last.send_text("ROOM_PEER_LIST")
        while True:
            message = await last.next()
            if message.startswith("ROOM_PEER_LIST"):
                break
        self.assertEqual(message, "ROOM_PEER_LIST " + " ".join(uids[:-1]))
        full = server.factory.registry
        self.assertEqual(full.room_member_count, size)
        first.transport.resumeProducing()
        self.assertEqual(
            await first.take(size - 1), [f"ROOM_PEER_JOINED {uid}" for uid in uids[1:]]
        )
        first.send_text("ROOM_PEER_LIST")
        await first.expect("ROOM_PEER_LIST " + " ".join(uids[1:]))
        self.assertTrue(all(member.is_live for member in members))
        self.assertEqual(server.stats.errors, {})

    async def test_browsers_from_other_origins_get_403_and_native_clients_are_unaffected(self):
        """
        With --allowed-origin, a handshake whose Origin is another site's is
        refused with 403 and counted; the allowed origin, the server's own
        page (its Host) and a client that sends no Origin are accepted.
        """
        server = await self.start(
            "--allowed-origin", "https://app.example.org",
            "--allowed-origin", "http://other.example:8080/",
        )
        cases = [
            (b"Origin: https://evil.example\r\n", 403),
            (b"Origin: https://app.example.org.evil.example\r\n", 403),
            (b"Origin: https://app.example.org\r\n", 101),
            (b"Origin: HTTP://OTHER.EXAMPLE:8080\r\n", 101),
            (b"Origin: https://localhost\r\n", 101),
            (b"", 101),
        ]
        for header, expected in cases:
            self.assertEqual(await server.upgrade_status(upgrade_request(header)), expected, header)
        self.assertEqual(server.stats.connections_refused, {"origin": 2})
        await server.hello("native")

    async def test_behind_a_trusted_proxy_the_forwarded_address_is_counted(self):
        """
        Connections from the proxy (loopback, exempt) with --trust-proxy 1
        count against the address in X-Forwarded-For: its second gets 429,
        another forwarded address is served.
        """
        server = await self.start("--trust-proxy", "1", "--max-connections-per-address", "1")
        forwarded = b"X-Forwarded-For: 203.0.113.9\r\n"
        first = await server.raw()
        first.transport.write(upgrade_request(forwarded))
        await first._until(lambda: b"\r\n\r\n" in first.received, "the upgrade")
        self.assertTrue(first.received.startswith(b"HTTP/1.1 101 "), first.received)
        status, _, _ = await server.http(upgrade_request(forwarded))
        self.assertEqual(status, 429)
        other = await server.raw()
        other.transport.write(upgrade_request(b"X-Forwarded-For: 203.0.113.10\r\n"))
        await other._until(lambda: b"\r\n\r\n" in other.received, "the upgrade")
        self.assertTrue(other.received.startswith(b"HTTP/1.1 101 "), other.received)
        self.assertEqual(server.stats.connections_refused, {"per_address": 1})


class PlaintextLimitsTests(LimitsMixin, unittest.TestCase):
    tls = False


class TLSLimitsTests(LimitsMixin, unittest.TestCase):
    tls = True

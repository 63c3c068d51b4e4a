"""
WHEP and WHIP over real sockets: every status the resources answer, with
real HTTP requests (written byte by byte, malformed ones too) and real
WebSocket JSON peers, against servers built by ``makeService`` on loopback
ports, plaintext and TLS (the project's own TLS layer), in one process and
on a two-node cluster on a real ``redis-server`` (the producer on one node,
the WHEP or WHIP client on the other). Trial fails a test that logs an
error, so none of these requests may end in a traceback.
"""

import ipaddress
import json
import os
import re

from twisted.internet import defer, reactor
from twisted.trial import unittest

from signalling.server.auth import mint
from tests._redis import RedisServer
from tests.clients import WAIT, eventually, pause
from tests.servers import Server, _dechunk
from tests.test_whep import ANSWER, CANDIDATE, CLIENT_CANDIDATE, FRAGMENT, OFFER

SECRET = b"whep-sockets-secret-0123456789abcdef01"
TURN_SECRET = b"turn-shared-secret"


class Response:
    """A response read whole: ``status``, ``headers`` (lower-case names, every value), ``body``."""

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name):
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def __repr__(self):
        return f"<Response {self.status} {self.body[:80]!r}>"


def _parse(data):
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower().decode(), []).append(value.strip().decode())
    if headers.get("transfer-encoding", [""])[0].lower() == "chunked":
        body = _dechunk(body)
    return Response(status, headers, body)


class SocketsMixin:
    """One server or a two-node cluster; plaintext or TLS."""

    timeout = 60
    tls = False
    cluster = False
    #: Options added to each node's command line.
    options = ()

    async def setUp(self):
        argv = list(self.options)
        if self.cluster:
            self.redis = RedisServer(self)
            await self.redis.start()
            argv += ["--redis", self.redis.url]
        self.nodes = []
        for _ in range(2 if self.cluster else 1):
            self.nodes.append(await Server.on_loopback(self, self.tls, *argv))
        await eventually(
            lambda: all(node.registry.up for node in self.nodes), "every node to serve"
        )

    @property
    def near(self):
        """The node the HTTP clients use."""
        return self.nodes[0]

    @property
    def far(self):
        """The node the WebSocket peers use (the other one in a cluster)."""
        return self.nodes[-1]

    # HTTP.

    async def request(self, method, path, body=b"", headers=None, node=None, raw_head=None):
        node = node or self.near
        head = raw_head
        if head is None:
            head = f"{method} {path} HTTP/1.1\r\nHost: localhost:{node.port_number()}\r\n"
            head += "Connection: close\r\n"
            for name, value in (headers or {}).items():
                head += f"{name}: {value}\r\n"
            if body or method in ("POST", "PATCH"):
                head += f"Content-Length: {len(body)}\r\n"
            head = head.encode("latin-1") + b"\r\n"
        client = await node.raw()
        client.transport.write(head + body)
        return _parse(await client.response())

    def post(self, path, body=OFFER.encode(), content_type="application/sdp", **headers):
        headers = {"Content-Type": content_type, **headers}
        return defer.ensureDeferred(self.request("POST", path, body, headers))

    async def patch(self, location, body=FRAGMENT, node=None, **headers):
        headers = {"Content-Type": "application/trickle-ice-sdpfrag", **headers}
        return await self.request("PATCH", location, body, headers, node=node)

    # WebSocket peers.

    async def json_peer(self, node=None, token=None):
        node = node or self.far
        path = "/" if token is None else f"/?token={token}"
        client = await node.connect(path=path)
        welcome = json.loads(await client.next())
        self.assertEqual(welcome["type"], "welcome")
        return client, welcome["peerId"]

    async def producer(self, name="cam", token=None):
        client, peer_id = await self.json_peer(token=token)
        client.send_text(
            json.dumps({"type": "setPeerStatus", "roles": ["producer"], "meta": {"name": name}})
        )
        await self.listed(peer_id)
        return client, peer_id

    async def listed(self, peer_id, node=None):
        """Wait until ``near`` lists ``peer_id`` among the producers (a cluster is eventually so)."""
        lister, _ = await self.json_peer(self.near if node is None else node)
        for _ in range(100):
            lister.send_text('{"type":"list"}')
            producers = json.loads(await lister.next())["producers"]
            if any(p["id"] == peer_id for p in producers):
                break
            await pause(0.02)
        else:
            self.fail(f"{peer_id} never listed")
        lister.close()

    async def answer(self, peer, session_id, *candidates, end=True):
        peer.send_text(
            json.dumps(
                {"type": "peer", "sessionId": session_id, "sdp": {"type": "answer", "sdp": ANSWER}}
            )
        )
        for candidate in candidates + (("",) if end else ()):
            peer.send_text(
                json.dumps(
                    {"type": "peer", "sessionId": session_id,
                     "ice": {"candidate": candidate, "sdpMLineIndex": 0}}
                )
            )

    async def next_json(self, client):
        return json.loads(await client.next())

    async def whep_session(self, name="cam", **headers):
        """:returns: ``(producer, session id, 201 response)``."""
        producer, _ = await self.producer(name)
        posted = self.post(f"/whep/{name}", **headers)
        start = await self.next_json(producer)
        self.assertEqual((start["type"], start["offer"]), ("startSession", OFFER))
        await self.answer(producer, start["sessionId"], CANDIDATE)
        response = await posted
        self.assertEqual(response.status, 201, response.body)
        return producer, start["sessionId"], response


class StatusesMixin(SocketsMixin):
    """Every status, over real sockets."""

    async def test_a_whole_whep_session(self):
        """201 with the answer and candidates, 204 for a PATCH, 200 for DELETE, then 404."""
        producer, session_id, created = await self.whep_session()
        self.assertEqual(created.header("content-type"), "application/sdp")
        self.assertIn("a=" + CANDIDATE + "\r\n", created.body.decode())
        self.assertIn("a=end-of-candidates", created.body.decode())
        location = created.header("location")
        self.assertRegex(location, r"^/whep/cam/[0-9a-f-]{36}\.[A-Za-z0-9_-]{24}$")
        patched = await self.patch(location)
        self.assertEqual(patched.status, 204)
        ice = await self.next_json(producer)
        self.assertEqual(
            ice,
            {"type": "peer", "sessionId": session_id,
             "ice": {"candidate": CLIENT_CANDIDATE, "sdpMLineIndex": 0}},
        )
        deleted = await self.request("DELETE", location)
        self.assertEqual(deleted.status, 200)
        self.assertEqual(
            await self.next_json(producer), {"type": "endSession", "sessionId": session_id}
        )
        self.assertEqual((await self.patch(location)).status, 404)
        self.assertEqual((await self.request("DELETE", location)).status, 404)
        stats = self.near.stats
        self.assertEqual(stats.http_responses[("whep", "201")], 1)
        self.assertEqual(stats.http_responses[("whep", "404")], 2)
        self.assertEqual(stats.http_sessions["whep"], 0)

    async def test_a_session_is_reached_from_every_node_with_its_secret_only(self):
        """
        A session's PATCH and DELETE may reach another node (or worker) than
        the one that took its POST: they reach the session through the
        registry. The path's secret must be the session's.
        """
        producer, session_id, created = await self.whep_session()
        location = created.header("location")
        uid, secret = location.rsplit("/", 1)[1].split(".")
        forged = location.replace(secret, "A" * len(secret))
        self.assertEqual((await self.patch(forged, node=self.far)).status, 404)
        self.assertEqual((await self.request("DELETE", forged, node=self.far)).status, 404)
        self.assertEqual((await self.patch(location, node=self.far)).status, 204)
        ice = await self.next_json(producer)
        self.assertEqual(ice["ice"]["candidate"], CLIENT_CANDIDATE)
        bad = await self.patch(location, b"a=mid:7\r\na=" + CANDIDATE.encode(), node=self.far)
        self.assertEqual(bad.status, 400)
        self.assertIn(b"media section", bad.body)
        self.assertEqual((await self.request("DELETE", location, node=self.far)).status, 200)
        self.assertEqual(
            await self.next_json(producer), {"type": "endSession", "sessionId": session_id}
        )
        self.assertEqual((await self.patch(location, node=self.far)).status, 404)
        self.assertEqual((await self.patch(location)).status, 404)
        await eventually(lambda: self.near.stats.http_sessions["whep"] == 0, "the session to go")

    async def test_a_producer_on_another_node_is_reached_and_its_leave_ends_the_session(self):
        """(On one process, the same node.) A producer that leaves: a later PATCH is 404."""
        producer, _, created = await self.whep_session()
        producer.close()
        location = created.header("location")
        for _ in range(100):
            if (await self.patch(location)).status == 404:
                break
            await pause(0.02)
        else:
            self.fail("the session outlived its producer")
        await eventually(lambda: self.near.stats.http_sessions["whep"] == 0, "the session to go")

    async def test_refusals_name_their_status(self):
        """404, 415, 400, 405 and the path's shape, each with a short text body."""
        await self.producer("cam")
        cases = [
            (await self.post("/whep/nobody"), 404),
            (await self.post("/whep/cam", content_type="text/plain"), 415),
            (await self.post("/whep/cam", body=b"not an offer"), 400),
            (await self.post("/whep/cam", body=b"v=0\r\ns=-\r\n"), 400),
            (await self.post("/whep/cam", body=b"\xff\xfe\x00"), 400),
            (await self.post("/whep/%ff"), 400),
            (await self.post("/whep/a%00b"), 400),
            (await self.post("/whep/" + "n" * 300), 400),
            (await self.request("GET", "/whep/cam"), 405),
            (await self.request("PUT", "/whep/cam", b"x"), 405),
            (await self.post("/whep/a/b/c"), 404),
            (await self.post("/whep/"), 404),
            (await self.post("/whep/cam/nosuchsession"), 404),
            (await self.patch("/whep/cam/nosuchsession"), 404),
            (await self.post("/whip/cam", content_type="application/json"), 415),
        ]
        for response, status in cases:
            self.assertEqual(response.status, status, response)
            self.assertLess(len(response.body), 400)
        self.assertEqual(cases[8][0].header("allow"), "POST, OPTIONS")

    async def test_a_body_past_the_message_size_is_413_before_it_is_read(self):
        """Declared too large: 413 at once, the connection closed; chunked: as soon as it is."""
        limit = self.near.factory.settings.max_message
        declared = await self.request(
            "POST", "/whep/cam",
            raw_head=(
                b"POST /whep/cam HTTP/1.1\r\nHost: x\r\nContent-Type: application/sdp\r\n"
                b"Content-Length: " + str(limit + 1).encode() + b"\r\n\r\n"
            ),
        )
        self.assertEqual(declared.status, 413)
        chunk = b"a" * 65536
        chunks = b"".join(
            hex(len(chunk))[2:].encode() + b"\r\n" + chunk + b"\r\n"
            for _ in range(limit // len(chunk) + 2)
        )
        chunked = await self.request(
            "POST", "/whep/cam",
            raw_head=(
                b"POST /whep/cam HTTP/1.1\r\nHost: x\r\nContent-Type: application/sdp\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
            ),
        )
        self.assertEqual(chunked.status, 413)

    async def test_cors_lets_a_browser_player_read_location_and_link(self):
        """A preflight is answered for any origin (no --allowed-origin), and so is the POST."""
        origin = "https://player.example"
        preflight = await self.request(
            "OPTIONS", "/whep/cam",
            headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type, authorization"},
        )
        self.assertEqual(preflight.status, 204)
        self.assertEqual(preflight.header("access-control-allow-origin"), origin)
        self.assertIn("POST", preflight.header("access-control-allow-methods"))
        self.assertIn("Authorization", preflight.header("access-control-allow-headers"))
        self.assertEqual(preflight.header("accept-post"), "application/sdp")
        _, _, created = await self.whep_session(Origin=origin)
        self.assertEqual(created.header("access-control-allow-origin"), origin)
        exposed = created.header("access-control-expose-headers")
        for name in ("Location", "Link"):
            self.assertIn(name, exposed)

    async def test_a_draining_server_answers_503_with_retry_after(self):
        await self.producer("cam")
        for node in self.nodes:
            node.factory.begin_shutdown()
        refused = await self.post("/whep/cam")
        self.assertEqual(refused.status, 503)
        self.assertEqual(refused.header("retry-after"), "5")
        whip = await self.post("/whip/studio")
        self.assertEqual(whip.status, 503)

    async def test_a_whip_stream_reaches_a_consumer_and_its_answer_comes_back(self):
        """
        POST /whip/NAME: a consumer on the other node that starts a session
        with the new producer gets the offer; its answer is the 201.
        """
        posted = self.post("/whip/studio")
        consumer, _ = await self.json_peer()
        for _ in range(100):
            consumer.send_text('{"type":"list"}')
            producers = json.loads(await consumer.next())["producers"]
            if producers:
                break
            await pause(0.02)
        [listed] = producers
        self.assertEqual(listed["meta"], {"name": "studio", "whip": True})
        consumer.send_text(json.dumps({"type": "startSession", "peerId": listed["id"]}))
        started = await self.next_json(consumer)
        offer = await self.next_json(consumer)
        self.assertEqual(offer["sdp"], {"type": "offer", "sdp": OFFER})
        await self.answer(consumer, started["sessionId"], CANDIDATE)
        created = await posted
        self.assertEqual(created.status, 201)
        self.assertIn("a=" + CANDIDATE, created.body.decode())
        location = created.header("location")
        self.assertTrue(location.startswith("/whip/studio/"))
        self.assertEqual((await self.request("DELETE", location)).status, 200)
        ended = await self.next_json(consumer)
        self.assertEqual(ended["type"], "endSession")

    async def test_malformed_requests_never_end_in_a_traceback(self):
        """
        Methods, headers, bodies and fragments a broken or hostile client
        sends: each is answered with a status (trial fails the test on any
        error logged), and the server serves a whole session afterwards.
        """
        producer, session_id, created = await self.whep_session()
        location = created.header("location")
        port = self.near.port_number()
        bodies = [b"", b"\x00" * 10, b"v=0", b"\xc3\x28", OFFER.encode() * 40, b"a=mid:0\r\n" * 50]
        for method in ("POST", "PATCH", "DELETE", "OPTIONS", "HEAD", "GET", "TRACE", "BREW"):
            for path in ("/whep/cam", location, "/whip/x", "/whep/%", "/whep/..%2f..", "/whip/a/b"):
                for body in bodies[:3]:
                    response = await self.request(
                        method, path, body,
                        {"Content-Type": "application/trickle-ice-sdpfrag"
                         if method == "PATCH" else "application/sdp"},
                    )
                    self.assertIn(response.status, (200, 201, 204, 400, 404, 405, 415, 503, 504))
        for body in bodies + [
            b"a=mid:9\r\na=" + CANDIDATE.encode(),
            b"a=candidate:" + b"9" * 5000,
            (b"a=" + CANDIDATE.encode() + b"\r\n") * 400,
        ]:
            response = await self.patch(location, body)
            self.assertIn(response.status, (204, 400, 404), response)
        for head in (
            b"POST /whep/cam HTTP/1.1\r\nContent-Type: application/sdp\r\nContent-Length: x\r\n\r\n",
            b"POST /whep/cam HTTP/1.1\r\nContent-Type: \xff\r\nContent-Length: 3\r\n\r\nv=0",
            b"POST /whep/cam HTTP/1.1\r\nAuthorization: Bearer \xff\xfe\r\n"
            b"Content-Type: application/sdp\r\nContent-Length: 3\r\n\r\nv=0",
            b"PATCH " + location.encode() + b" HTTP/1.1\r\nContent-Type: application/"
            b"trickle-ice-sdpfrag; charset=\x01\r\nContent-Length: 0\r\n\r\n",
            b"POST /whep/cam HTTP/1.1\r\nX-Forwarded-For: not-an-address\r\n"
            b"Content-Type: application/sdp\r\nContent-Length: 3\r\n\r\nv=0",
        ):
            response = await self.request("", "", raw_head=head.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nHost: localhost:" + str(port).encode() + b"\r\nConnection: close\r\n", 1))
            self.assertIn(response.status, (400, 404, 415), response)
        # The fuzz's DELETE ended the session; a new one is served.
        self.assertEqual((await self.patch(location)).status, 404)
        self.assertEqual(
            await self.next_json(producer), {"type": "endSession", "sessionId": session_id}
        )
        producer.close()
        await self.whep_session("cam2")


class TimesMixin(SocketsMixin):
    """The statuses of time and rate: 502, 504, WHIP's 503, and 429, over real sockets."""

    options = (
        "--answer-timeout", "0.5", "--whip-wait", "0.5",
        "--command-burst", "6", "--command-rate", "1",
        # Loopback, exempt by default (a local proxy's), is counted here.
        "--unlimited-address", "192.0.2.0/24",
    )

    async def test_a_producer_that_never_answers_is_504_and_one_that_leaves_502(self):
        producer, _ = await self.producer("cam")
        posted = self.post("/whep/cam")
        start = await self.next_json(producer)
        timed_out = await posted
        self.assertEqual(timed_out.status, 504)
        self.assertEqual(
            await self.next_json(producer), {"type": "endSession", "sessionId": start["sessionId"]}
        )
        posted = self.post("/whep/cam")
        await self.next_json(producer)
        producer.close()
        self.assertEqual((await posted).status, 502)

    async def test_a_whip_stream_no_consumer_came_for_is_503_with_retry_after(self):
        listener, _ = await self.json_peer()
        listener.send_text('{"type":"setPeerStatus","roles":["listener"],"meta":null}')
        await self.next_json(listener)
        refused = await self.post("/whip/studio")
        self.assertEqual(refused.status, 503)
        self.assertEqual(refused.header("retry-after"), "5")
        appeared, left = await self.next_json(listener), await self.next_json(listener)
        self.assertEqual(appeared["meta"], {"name": "studio", "whip": True})
        self.assertEqual((left["peerId"], left["roles"]), (appeared["peerId"], []))

    async def test_requests_past_the_rate_are_429_with_retry_after(self):
        """
        An address's HTTP requests draw on one bucket: 6 at once, then 1 a
        second; an exempt address (a local proxy's) on none.
        """
        statuses = [(await self.post("/whep/nobody")).status for _ in range(8)]
        self.assertEqual(statuses, [404] * 6 + [429] * 2)
        refused = await self.post("/whep/nobody")
        self.assertEqual(refused.header("retry-after"), "1")
        await pause(1.1)
        self.assertEqual((await self.post("/whep/nobody")).status, 404)
        for node in self.nodes:
            limits = node.factory.policy.limits
            limits._exempt.append(ipaddress.ip_network("127.0.0.0/8"))
            limits._hosts.clear()
        statuses = [(await self.post("/whep/nobody")).status for _ in range(10)]
        self.assertEqual(statuses, [404] * 10)


class TokensMixin(SocketsMixin):
    """Tokens (Authorization: Bearer), TURN credentials and ICE servers in Link headers."""

    async def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        secret = os.path.join(directory, "auth")
        with open(secret, "wb") as f:
            f.write(SECRET)
        turn = os.path.join(directory, "turn")
        with open(turn, "wb") as f:
            f.write(TURN_SECRET)
        self.options = (
            "--auth-secret", secret, "--turn-secret", turn,
            "--turn-uri", "turn:turn.example.org:3478",
            "--ice-server", "stun:stun.example.org:3478",
        )
        await super().setUp()

    def token(self, **claims):
        return mint(SECRET, 600, **claims)

    async def producer(self, name="cam", token=None):
        return await SocketsMixin.producer(
            self, name, token or self.token(roles=["producer", "listener"])
        )

    async def json_peer(self, node=None, token=None):
        return await SocketsMixin.json_peer(self, node, token or self.token())

    async def test_bearer_tokens_claims_and_link_headers(self):
        await self.producer("cam")
        await self.producer("private")
        missing = await self.post("/whep/cam")
        self.assertEqual((missing.status, missing.header("www-authenticate")), (401, "Bearer"))
        bad = await self.post("/whep/cam", Authorization="Bearer nonsense")
        self.assertEqual(bad.status, 401)
        wrong_role = await self.post(
            "/whep/cam", Authorization="Bearer " + self.token(roles=["producer"])
        )
        self.assertEqual(wrong_role.status, 403)
        not_named = await self.post(
            "/whep/private", Authorization="Bearer " + self.token(calls=["cam"])
        )
        self.assertEqual(not_named.status, 403)
        _, _, created = await self.whep_session(
            "cam3", Authorization="Bearer " + self.token(roles=["consumer"], calls=["cam3"])
        )
        links = created.headers["link"]
        self.assertIn('<stun:stun.example.org:3478>; rel="ice-server"', links)
        [turn] = [link for link in links if link.startswith("<turn:")]
        self.assertRegex(
            turn,
            r'^<turn:turn.example.org:3478>; rel="ice-server"; username="\d+:[^"]+"; '
            r'credential="[A-Za-z0-9+/=]+"; credential-type="password"$',
        )
        # A session's PATCH needs a valid token too.
        location = created.header("location")
        self.assertEqual((await self.patch(location)).status, 401)
        self.assertEqual(
            (await self.patch(location, Authorization="Bearer " + self.token())).status, 204
        )
        # WHIP: the token's subject names the stream.
        refused = await self.post("/whip/studio", Authorization="Bearer " + self.token(uid="x"))
        self.assertEqual(refused.status, 403)


class PlaintextStatusTests(StatusesMixin, unittest.TestCase):
    """One process, plaintext."""


class TLSStatusTests(StatusesMixin, unittest.TestCase):
    """One process, TLS."""

    tls = True


class ClusterPlaintextStatusTests(StatusesMixin, unittest.TestCase):
    """Two nodes on Redis, plaintext: producers on one, HTTP clients on the other."""

    cluster = True


class ClusterTLSStatusTests(StatusesMixin, unittest.TestCase):
    """Two nodes on Redis, TLS."""

    cluster = True
    tls = True


class PlaintextTimesTests(TimesMixin, unittest.TestCase):
    """Times and rates, one process, plaintext."""


class ClusterTLSTimesTests(TimesMixin, unittest.TestCase):
    """Times and rates, two nodes, TLS."""

    cluster = True
    tls = True


class PlaintextTokenTests(TokensMixin, unittest.TestCase):
    """Tokens, one process, plaintext."""


class ClusterTLSTokenTests(TokensMixin, unittest.TestCase):
    """Tokens, two nodes, TLS."""

    cluster = True
    tls = True

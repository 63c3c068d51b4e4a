"""
Issue 19's proof: one adversarial suite, run over every backend and
transport, against the real ``twistd -n signalling``.

Every case attacks the server the way a hostile or broken client would, in
both dialects where it applies: the GStreamer examples' (``HELLO``,
``SESSION``, ``ROOM``; on the path ``/examples``) and the JSON one of
gst-plugins-rs (``welcome``, ``setPeerStatus``, ``list``, ``startSession``,
``peer``, ``endSession``; on ``/json``). After each one it checks what the
docs promise:

- every server process's resident memory (``/proc/<pid>/status``) stayed
  within a few MB per abusive connection beyond what the limits allow
  (sampled during the attack: the peak; or, for one large message whose
  parsing costs memory for a moment, where it settles);
- an unrelated pair of each dialect is still served promptly (examples: a
  ``SESSION`` relaying a message; JSON: a producer/consumer session
  relaying a ``peer`` message), across the cluster's nodes where there are
  two;
- no ``Traceback`` and no ``Unhandled Error`` in any server's log (and each
  process shuts down cleanly afterwards);
- the close codes and the replies of docs/protocol.md.

:class:`TransportCases` holds the cases where the transport matters (input
held, output queued, bad frames), :class:`AdversarialCases` adds those that
are about the messages alone; each (backend x transport) is a small class
at the end. A cluster has two nodes on one real ``redis-server``: the
attacker connects to the first, its target or victim (and one side of the
unrelated pairs) to the second.

Cases that failed on main at f08e59b, before the fixes of issue 19 (the
others passed there already, and guard against regressions):

- A (input held while a command waits): the examples ``HELLO`` that waits
  on ``--reclaim-timeout`` with 1 MiB messages behind it, on every backend
  and transport (some 170 MB held); the JSON ``peer`` flood on a cluster
  node (some 250 MB held; one process handles ``peer`` at once);
- B (replies queued before the output bound is checked): ``list`` to
  sockets that never read (every backend and transport); the examples'
  room members that never read failed on the cluster over TLS only (a
  reader found no close frame);
- C (``--max-meta-size``): both cases (no error; the meta is kept);
- D (deep nesting): a traceback in the log, the connection closed;
- E (log amplification): the JSON ``startSession`` (the 1 MB peer id
  echoed whole); the examples' replies were cut already;
- F (duplicate keys): forwarded to the producer;
- G (``endSessionV1_1`` from a v1.0 peer): ended the session.

H (token claims in the JSON dialect) was written after main described it
(929548a) and was not run on f08e59b. After merging main (929548a, then
06a8c80) every case passes.
"""

import json
import os
import time

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from signalling.server.auth import mint
from tests._redis import RedisServer
from tests.certificates import write_certificate
from tests.clients import WAIT, RawClient, eventually, frame
from tests.servers import ProcessMixin, client_endpoint, client_factory
from tests.test_abuse import Flooder, rss
from tests.test_whep import OFFER

#: What --max-output-buffer is in these tests (bytes).
MAX_OUTPUT = 262144
#: The default --max-message-size (bytes).
MAX_MESSAGE = 1024 * 1024
#: The default --max-meta-size: bytes of a meta's JSON encoding.
MAX_META = 65536
#: What a server's RSS may grow by whatever the attack, and more per
#: abusive connection (beyond what the limits let it hold).
RSS_SLACK = 12 * 1024 * 1024
RSS_PER_ABUSER = 3 * 1024 * 1024
#: How often the RSS is sampled during an attack, in seconds.
RSS_EVERY = 0.05
#: Producers with a large meta, for the ``list`` of sockets that never read.
PRODUCERS = 100
#: How long an unrelated pair may take to meet and relay, in seconds.
PROMPT = 2.0
#: How long a flood goes on, in seconds (longer than the reclaim wait).
FLOOD_SECONDS = 3.0
#: --reclaim-timeout: how long a HELLO for a held uid waits.
RECLAIM = 2
#: How much a server's log may grow per oversized request.
LOG_PER_REQUEST = 8 * 1024
#: The secret tokens are signed with, where the server asks for tokens.
SECRET = b"adversarial-secret-" + b"s" * 32
#: The longest reply that counts as short (one that echoes ~256 characters).
SHORT = 1024


async def eventually_response(client):
    """:returns: what a raw client received once the server answered and closed (or it dropped)."""
    await eventually(lambda: b"\r\n\r\n" in client.received or client.is_lost, "an answer", WAIT)
    if not client.is_lost:
        client.transport.loseConnection()
    return client.received


def message(**fields):
    """:returns: a JSON-dialect message as compact text."""
    return json.dumps(fields, separators=(",", ":"))


def nested(depth):
    """:returns: JSON text of ``depth`` nested empty lists."""
    return "[" * depth + "]" * depth


class RssWatch:
    """
    Samples the RSS of some processes every :data:`RSS_EVERY` seconds from
    now on, keeping each one's peak.
    """

    def __init__(self, pids):
        self.pids = pids
        self.before = {pid: rss(pid) for pid in pids}
        self.peak = dict(self.before)
        self._loop = task.LoopingCall(self.sample)
        self._loop.start(RSS_EVERY, now=False)

    def sample(self):
        for pid in self.pids:
            try:
                self.peak[pid] = max(self.peak[pid], rss(pid))
            except OSError:
                pass  # it ended: the test says why

    def stop(self):
        if self._loop.running:
            self._loop.stop()
        self.sample()


# Each case starts its own processes, Redis included: redis-server starts in
# some tens of milliseconds (twistd takes a second), and a case then never
# sees what another left in Redis or in a server's memory.


class TransportCases(ProcessMixin):
    """
    The cases where the transport matters: input held while a command
    waits (A), replies to sockets that never read (B), bad frames (I).

    A subclass sets :attr:`tls` and :attr:`nodes` (1: one process; 2: a
    cluster of two on one Redis).
    """

    timeout = 60
    tls = False
    nodes = 1
    #: Whether the server asks for tokens (--auth-secret); clients then
    #: present one without claims unless a case gives another.
    auth = False

    async def setUp(self):
        ProcessMixin.setUp(self)
        self.pem = write_certificate(self.cert_dir).pem if self.tls else None
        argv = [
            "--cert-path", self.cert_dir,
            "--dialect-path", "/examples=examples",
            "--dialect-path", "/json=json",
            "--max-output-buffer", str(MAX_OUTPUT),
            "--reclaim-timeout", str(RECLAIM),
            "--trim-interval", "1",
        ]
        if self.auth:
            secret_file = os.path.join(self.workdir, "secrets")
            with open(secret_file, "wb") as f:
                f.write(SECRET + b"\n")
            argv += ["--auth-secret", secret_file]
        if self.nodes > 1:
            self.redis = RedisServer(self)
            await self.redis.start()
            argv += ["--redis", self.redis.url]
        template = ("ssl" if self.tls else "tcp") + ":{port}:interface=127.0.0.1"
        self.servers = await defer.gatherResults(
            [defer.ensureDeferred(self.start_server(template, *argv)) for _ in range(self.nodes)]
        )
        self.clients = []
        self.raw_clients = []
        self.watch = None
        self._pairs = 0
        self.addCleanup(self._stop_everything)
        if self.nodes > 1:
            # Until every node has reached Redis, a HELLO is refused.
            for index in range(self.nodes):
                await self.until_registered(index, f"ready-{index}")

    async def _stop_everything(self):
        if self.watch is not None:
            self.watch.stop()
        for client in self.clients:
            client.close()
        for raw in self.raw_clients:
            # Raw clients may not be reading (nor answering a TLS close).
            if not raw.is_lost:
                raw.transport.abortConnection()
        try:
            await eventually(
                lambda: all(c.is_lost for c in self.clients + self.raw_clients),
                "every client to close",
            )
        finally:
            for client in self.clients + self.raw_clients:
                if not client.is_lost and client.transport is not None:
                    client.transport.abortConnection()
        for server, _ in self.servers:
            await self.stop_server(server)

    # The servers.

    #: The node the attacker connects to, and the one of its target.
    attacker = 0

    @property
    def target(self):
        return self.nodes - 1

    def pids(self):
        return [server.transport.pid for server, _ in self.servers]

    def outputs(self):
        return [server.output for server, _ in self.servers]

    def log_size(self):
        return sum(len(output) for output in self.outputs())

    # Clients.

    def url(self, node, path):
        scheme = "wss" if self.tls else "ws"
        return f"{scheme}://localhost:{self.servers[node][1]}{path}"

    def endpoint(self, node):
        return client_endpoint(self.servers[node][1], self.pem)

    def with_token(self, path, token=None):
        """:returns: ``path`` with ``token`` (or one without claims) where tokens are asked for."""
        if not self.auth:
            return path
        return path + "?token=" + (token or mint(SECRET, 600))

    async def connect(self, node, path, token=None):
        """
        :param token: the token to present (where the server asks for
            tokens); one without claims if None.
        :returns: an open :class:`tests.clients.Client` of ``node`` on ``path``.
        """
        url = self.url(node, self.with_token(path, token))
        client = await self.endpoint(node).connect(client_factory(url))
        self.clients.append(client)
        await defer.Deferred.addTimeout(client.opened, WAIT, reactor)
        return client

    async def raw(self, node, path, kind=RawClient):
        """:returns: a raw client of ``node``, upgraded on ``path``."""
        client = await self.endpoint(node).connect(Factory.forProtocol(kind))
        self.raw_clients.append(client)
        await client.upgrade(self.with_token(path))
        return client

    async def examples(self, node, uid):
        """:returns: a client of ``node`` registered as ``uid`` (examples dialect)."""
        client = await self.connect(node, "/examples")
        client.name = uid
        client.send_text(f"HELLO {uid}")
        await client.expect("HELLO")
        return client

    async def raw_examples(self, node, uid, kind=RawClient):
        """:returns: a raw client of ``node`` registered as ``uid``."""
        client = await self.raw(node, "/examples", kind)
        client.send_frame(1, f"HELLO {uid}".encode())
        self.assertEqual(await client.next_frames(1), [(1, b"HELLO")])
        return client

    async def json_peer(self, node, version=None, token=None):
        """:returns: ``(client, peer id)``: a JSON-dialect client of ``node``, welcomed."""
        client = await self.connect(node, "/json", token)
        if version is not None:
            client.send_text(message(type="setProtocolVersion", version=version))
        welcome = json.loads(await client.next())
        self.assertEqual(welcome["type"], "welcome")
        return client, welcome["peerId"]

    async def raw_json(self, node, kind=RawClient):
        """:returns: ``(raw client, peer id)`` of ``node``, welcomed."""
        client = await self.raw(node, "/json", kind)
        [(opcode, payload)] = await client.next_frames(1)
        welcome = json.loads(payload)
        self.assertEqual((opcode, welcome["type"]), (1, "welcome"))
        return client, welcome["peerId"]

    async def next_json(self, client):
        return json.loads(await client.next())

    async def producer(self, node, meta=None, version=None, token=None):
        """:returns: ``(client, peer id)`` of a producer whose status is set."""
        client, peer_id = await self.json_peer(node, version, token)
        client.send_text(message(type="setPeerStatus", roles=["producer"], meta=meta))
        # Answered once the status is set (input is handled in order); not
        # a list, which may be larger than the output bound.
        client.send_text(message(type="listConsumers"))
        self.assertEqual((await self.next_json(client))["type"], "listConsumers")
        return client, peer_id

    async def listener(self, node):
        """:returns: ``(client, peer id)`` of a listener that heard its own status."""
        client, peer_id = await self.json_peer(node)
        client.send_text(message(type="setPeerStatus", roles=["listener"], meta=None))
        changed = await self.next_json(client)
        self.assertEqual((changed["type"], changed["peerId"]), ("peerStatusChanged", peer_id))
        return client, peer_id

    async def json_session(self, producer_version=None, consumer_version=None):
        """
        :returns: ``(producer, producer id, consumer, consumer id, session
            id)``: a session between a producer on the target's node and a
            consumer on the attacker's.
        """
        producer, producer_id = await self.producer(self.target, version=producer_version)
        consumer, consumer_id = await self.json_peer(self.attacker, consumer_version)
        consumer.send_text(message(type="startSession", peerId=producer_id))
        started = await self.next_json(consumer)
        self.assertEqual(started["type"], "sessionStarted", started)
        session_id = started["sessionId"]
        self.assertEqual(
            await self.next_json(producer),
            {"type": "startSession", "peerId": consumer_id, "sessionId": session_id,
             "offer": None},
        )
        return producer, producer_id, consumer, consumer_id, session_id

    async def until_registered(self, node, uid):
        """Register ``uid`` on ``node`` (retrying while the node cannot yet), then leave."""
        for _ in range(100):
            client = await self.connect(node, "/examples")
            client.send_text(f"HELLO {uid}")
            answer = await client.next()
            client.close()
            await client.closed()
            if answer == "HELLO":
                return
            await task.deferLater(reactor, 0.05, lambda: None)
        self.fail(f"node {node} never registered a peer")

    async def assert_silent(self, client):
        """
        ``client`` (a JSON-dialect peer) was sent nothing: its next message
        is the answer to a ``list`` it sends now.
        """
        client.send_text(message(type="list"))
        answer = await self.next_json(client)
        self.assertEqual(answer["type"], "list", answer)
        return answer

    # What every case checks afterwards.

    def watch_rss(self):
        """Start sampling every server's RSS: the attack begins."""
        self.watch = RssWatch(self.pids())

    async def check_aftermath(self, abusers=1, settled=False, allowed=0):
        """
        What every case ends with: each server's RSS grew by at most
        :data:`RSS_SLACK` plus :data:`RSS_PER_ABUSER` per abusive connection
        plus ``allowed`` (what the limits let it keep); no traceback and no
        unhandled error in any log; an unrelated pair of each dialect is
        served promptly.

        :param settled: judge the RSS where it settles (within seconds),
            not at its peak: parsing one large message takes memory for a
            moment, keeping it is what must not happen.
        """
        watch = self.watch
        watch.stop()
        limit = RSS_SLACK + abusers * RSS_PER_ABUSER + allowed
        for pid, (server, port) in zip(self.pids(), self.servers):
            before = watch.before[pid]
            if settled:
                deadline = time.monotonic() + 10
                while rss(pid) - before >= limit and time.monotonic() < deadline:
                    await task.deferLater(reactor, 0.2, lambda: None)
                grown = rss(pid) - before
            else:
                grown = watch.peak[pid] - before
            self.assertLess(
                grown,
                limit,
                f"the server on {port} grew by {grown / 2**20:.1f} MB "
                f"(from {before / 2**20:.1f} MB; limit {limit / 2**20:.1f} MB)",
            )
        self.assert_clean_logs()
        await self.assert_pairs_served()

    def assert_clean_logs(self):
        for output in self.outputs():
            self.assertNotIn("Traceback", output)
            self.assertNotIn("Unhandled Error", output)

    async def assert_pairs_served(self):
        """
        An examples pair meets in a SESSION and relays, and a JSON
        producer/consumer pair meets and relays a ``peer`` message, each
        within :data:`PROMPT` seconds, across the nodes.
        """
        self._pairs += 1
        n = self._pairs
        started = time.monotonic()
        callee = await self.examples(self.target, f"pair-b{n}")
        caller = await self.examples(self.attacker, f"pair-a{n}")
        caller.send_text(f"SESSION pair-b{n}")
        await caller.expect("SESSION_OK")
        caller.send_text("through the pair")
        await callee.expect("through the pair")
        producer, producer_id, consumer, _, session_id = await self.json_session()
        offer = message(type="peer", sessionId=session_id, sdp={"type": "offer", "sdp": "v=0"})
        producer.send_text(offer)
        self.assertEqual(await consumer.next(), offer)
        took = time.monotonic() - started
        self.assertLess(took, PROMPT, f"the unrelated pairs took {took:.2f} s")
        for client in (caller, callee, producer, consumer):
            client.close()

    # A. Input held while a command waits.

    async def flood(self, flooder, data):
        """Push ``data`` over and over from ``flooder`` for :data:`FLOOD_SECONDS`."""
        stop = reactor.callLater(FLOOD_SECONDS, setattr, flooder, "stopped", True)
        try:
            await flooder.flood(lambda: data)
        finally:
            if stop.active():
                stop.cancel()
        self.watch.sample()
        with open(os.path.join(self.workdir, "flood.txt"), "w") as f:
            f.write(
                f"{self.id()} pushed {flooder.pushed} held_back {flooder.held_back:.2f} "
                f"rss_before {self.watch.before} rss_peak {self.watch.peak}\n"
            )

    async def test_a_json_peer_streaming_peer_messages_to_no_session_is_held_back(self):
        """
        A JSON peer with no role streams ``peer`` messages for a session
        that does not exist (on a cluster node each waits for Redis), 1 MiB
        ones and small ones between them: the server stops reading once a
        little is held, its RSS stays bounded, the peer is not closed, and
        the others are served.
        """
        flooder, _ = await self.raw_json(self.attacker, Flooder)

        def peer(candidate):
            return message(type="peer", sessionId="no-such-session", ice={
                "candidate": candidate, "sdpMLineIndex": 0,
            }).encode()

        large = peer("c" * 1_000_000)
        self.assertLessEqual(len(large), MAX_MESSAGE)
        data = frame(1, large) + frame(1, peer("candidate:1 1 UDP 1 127.0.0.1 9 typ host")) * 4000
        self.watch_rss()
        await self.flood(flooder, data)
        self.assertGreater(flooder.pushed, 4 * len(data), "the flood hardly started")
        self.assertFalse(flooder.is_lost, "the flooder was closed")
        await self.check_aftermath()

    async def test_an_examples_hello_waiting_for_a_silent_holder_holds_its_input_back(self):
        """
        A ``HELLO`` for a uid whose holder (on the other node) never answers
        pings waits ``--reclaim-timeout``, while 1 MiB messages stream in
        behind it: the server stops reading, its RSS stays bounded, then the
        holder is replaced (1008, ``replaced by a new connection``) and the
        newcomer keeps its connection.
        """
        holder = await self.raw_examples(self.target, "contested")
        flooder = await self.raw(self.attacker, "/examples", Flooder)
        flooder.send_frame(1, b"HELLO contested")
        data = frame(1, b"x" * 1_000_000)
        self.watch_rss()
        await self.flood(flooder, data)
        self.assertGreater(flooder.pushed, 4 * len(data), "the flood hardly started")
        (code, reason), _ = await holder.close_frame()
        self.assertEqual((code, reason), (1008, "replaced by a new connection"))
        self.assertFalse(flooder.is_lost, "the newcomer was closed")
        await self.check_aftermath()

    # B. Replies to sockets that never read.

    async def test_json_lists_for_sockets_that_never_read_are_bounded(self):
        """
        100 producers each set a 60 KB ``meta`` (a ``list`` answer is 6
        MB), then 8 sockets that never read ask for the list 5 times each:
        each is closed with 1008 (``too slow to read``) instead of having
        the answers queued, and the server's RSS stays within the output
        bound per socket.
        """
        listener, _ = await self.listener(self.attacker)
        for i in range(PRODUCERS):
            _, producer_id = await self.producer(
                self.target, meta={"blob": f"{i:02d}" + "m" * 60_000}
            )
            changed = await self.next_json(listener)
            self.assertEqual((changed["peerId"], changed["roles"]), (producer_id, ["producer"]))
        readers = {}
        for _ in range(8):
            reader, reader_id = await self.raw_json(self.attacker)
            status = message(type="setPeerStatus", roles=["consumer"], meta=None)
            reader.send_frame(1, status.encode())
            changed = await self.next_json(listener)
            self.assertEqual((changed["peerId"], changed["roles"]), (reader_id, ["consumer"]))
            readers[reader_id] = reader
        self.watch_rss()
        for reader in readers.values():
            reader.transport.pauseProducing()
            reader.transport.write(frame(1, message(type="list").encode()) * 5)
        left = set()
        while not set(readers) <= left:
            changed = await self.next_json(listener)
            self.assertEqual(changed["roles"], [], changed)
            left.add(changed["peerId"])
        for reader in readers.values():
            reader.transport.resumeProducing()
            (code, reason), _ = await reader.close_frame()
            self.assertEqual((code, reason), (1008, "too slow to read"))
        await self.check_aftermath(abusers=len(readers), allowed=len(readers) * MAX_OUTPUT)

    async def test_room_members_that_never_read_are_closed_once_past_the_bound(self):
        """
        Room members that never read (their room has 40 members with the
        longest uids) each send 1500 ``ROOM_PEER_LIST`` at once, and are
        sent room messages: each is closed with 1008 (``too slow to read``)
        once more than the output bound waits for it, the room is told
        (``ROOM_PEER_LEFT``), and the server's RSS stays bounded.
        """
        watcher = await self.examples(self.target, "watcher")
        watcher.send_text("ROOM pile")
        await watcher.expect("ROOM_OK ")
        members = ["watcher"]
        fillers = []
        for i in range(40):
            uid = f"f{i:03d}" + "u" * 252
            filler = await self.examples(self.target, uid)
            filler.send_text("ROOM pile")
            await filler.expect("ROOM_OK " + " ".join(members))
            await watcher.expect(f"ROOM_PEER_JOINED {uid}")
            members.append(uid)
            fillers.append(filler)
        readers = {}
        for i in range(8):
            uid = f"slow{i}"
            reader = await self.raw_examples(self.attacker, uid)
            reader.send_frame(1, b"ROOM pile")
            await reader.next_frames(2)
            await watcher.expect(f"ROOM_PEER_JOINED {uid}")
            readers[uid] = reader
        self.watch_rss()
        for reader in readers.values():
            reader.transport.pauseProducing()
            reader.transport.write(frame(1, b"ROOM_PEER_LIST") * 1500)
        sender = fillers[0]
        payload = "m" * 60_000
        for _ in range(60):
            for uid in readers:
                sender.send_text(f"ROOM_PEER_MSG {uid} {payload}")
        left = set()
        while left != set(readers):
            notice = await watcher.next()
            self.assertTrue(notice.startswith("ROOM_PEER_LEFT slow"), notice)
            uid = notice.split()[1]
            left.add(uid)
            # It reads again at once: a closed connection is dropped after
            # --close-timeout, and a loaded machine may take longer than that
            # to see every member leave.
            readers[uid].transport.resumeProducing()
        for reader in readers.values():
            (code, reason), _ = await reader.close_frame()
            self.assertEqual((code, reason), (1008, "too slow to read"))
        await self.check_aftermath(abusers=len(readers), allowed=len(readers) * MAX_OUTPUT)

    # I. Bad frames.

    async def test_invalid_utf8_closes_with_1007_and_an_oversized_message_with_1009(self):
        """
        In either dialect, a text message that is not UTF-8 closes its
        connection with 1007, and one larger than --max-message-size with
        1009; nothing else is disturbed.
        """
        self.watch_rss()
        for bad, code in ((b"\xff\xfe bad", 1007), (b"x" * (MAX_MESSAGE + 1), 1009)):
            examples = await self.raw_examples(self.attacker, f"bad-{code}")
            json_client, _ = await self.raw_json(self.attacker)
            for client in (examples, json_client):
                client.send_frame(1, bad)
                (got, _), _ = await client.close_frame()
                self.assertEqual(got, code)
        await self.check_aftermath(abusers=4)

    async def test_what_is_not_the_json_protocol_is_dropped_and_the_connection_stays_open(self):
        """
        Binary frames, JSON that is not an object, objects without a known
        ``type`` and messages missing their fields are dropped without a
        reply: the next answer is that of a ``list``. In the examples'
        dialect the same input is an ``ERROR`` line, the connection open.
        """
        client, _ = await self.json_peer(self.attacker)
        self.watch_rss()
        client.send_bytes(b'{"type":"list"}')
        for text in ("[1]", '"list"', "42", "null", "true", "{}", '{"type":5}',
                     '{"type":"bogus"}', '{"type":"peer"}', '{"type":"startSession"}',
                     '{"type":"setPeerStatus","roles":"producer"}', "{", ""):
            client.send_text(text)
        await self.assert_silent(client)
        examples = await self.examples(self.attacker, "garbage")
        examples.send_bytes(b"\x00\x01")
        await examples.expect("ERROR binary messages are only relayed inside a session")
        examples.send_text('{"type":"bogus"}')
        await examples.expect("ERROR unknown command '{\"type\":\"bogus\"}'")
        await self.check_aftermath(abusers=2)


    # J. The auto port (``/``): a first message at once, late, or after the welcome.

    async def test_on_the_auto_port_a_hello_sent_at_once_is_never_welcomed_as_json(self):
        """
        Thirty examples' clients on the auto port, each sending HELLO the
        moment it is open, as the examples' clients do: each one's first
        message is the answer to its HELLO, never a JSON welcome, and none
        was switched.
        """
        self.watch_rss()
        clients = []
        for index in range(30):
            client = await self.connect(self.attacker if index % 2 else self.target, "/")
            client.send_text(f"HELLO at-once-{index}")
            clients.append(client)
        for client in clients:
            self.assertEqual(await client.next(), "HELLO")
        for client in clients:
            client.close()
        await self.check_aftermath()

    async def test_a_silent_client_on_the_auto_port_is_welcomed_without_a_noticeable_wait(self):
        """
        A JSON client on the auto port (it waits for welcome) is welcomed
        well within the wait for a client that answers no ping (0.5 s),
        and is served: a session across the nodes relays.
        """
        self.watch_rss()
        started = reactor.seconds()
        consumer = await self.connect(self.attacker, "/")
        welcome = await self.next_json(consumer)
        self.assertEqual(welcome["type"], "welcome")
        self.assertLess(reactor.seconds() - started, 0.25)
        producer, producer_id = await self.producer(self.target)
        consumer.send_text(message(type="startSession", peerId=producer_id))
        self.assertEqual((await self.next_json(consumer))["type"], "sessionStarted")
        self.assertEqual((await self.next_json(producer))["type"], "startSession")
        await self.check_aftermath()

    async def test_a_hello_after_the_welcome_switches_to_the_examples_dialect(self):
        """
        An examples' client that sends HELLO only after it was welcomed as a
        JSON client (the latest a HELLO can be): the JSON peer is withdrawn
        (a listener hears it leave), the HELLO is answered, and the client
        is an examples' peer from then on: its call relays across the nodes.
        A client that sends HELLO 50 ms after the handshake is served in the
        examples' dialect too, whether or not its welcome went out first.
        """
        listener, _ = await self.listener(self.target)
        self.watch_rss()
        late = await self.connect(self.attacker, "/")
        welcome = await self.next_json(late)
        self.assertEqual(welcome["type"], "welcome")
        late.send_text("HELLO after-welcome")
        await late.expect("HELLO")
        self.assertEqual(
            await self.next_json(listener),
            {"type": "peerStatusChanged", "roles": [], "meta": None, "peerId": welcome["peerId"]},
        )
        callee = await self.examples(self.target, "after-welcome-callee")
        late.send_text("SESSION after-welcome-callee")
        await late.expect("SESSION_OK")
        late.send_text("after the switch")
        await callee.expect("after the switch")
        slow = await self.connect(self.target, "/")
        await task.deferLater(reactor, 0.05, lambda: None)
        slow.send_text("HELLO fifty-ms-late")
        first = await slow.next()
        if first != "HELLO":
            self.assertEqual(json.loads(first)["type"], "welcome")
            await slow.expect("HELLO")
        slow.send_text("SESSION after-welcome")
        await slow.expect("ERROR peer 'after-welcome' busy")
        await self.check_aftermath()


    # W. The HTTP dialects (WHEP, WHIP).

    async def http(self, node, data):
        """:returns: a raw client of ``node`` that sent ``data`` (an HTTP request)."""
        client = await self.endpoint(node).connect(Factory.forProtocol(RawClient))
        self.raw_clients.append(client)
        client.transport.write(data)
        return client

    def whep_post(self, name, body, length=None, extra=b"", prefix=b"/whep/"):
        """:returns: the bytes of a WHEP (or, with ``prefix``, WHIP) ``POST`` of ``body``."""
        length = len(body) if length is None else length
        if self.auth:
            extra += b"Authorization: Bearer " + mint(SECRET, 600).encode() + b"\r\n"
        return (
            b"POST " + prefix + name + b" HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/sdp\r\nContent-Length: " + str(length).encode()
            + b"\r\n" + extra + b"\r\n" + body
        )

    async def test_whep_posts_that_wait_hold_little_and_end_with_their_clients(self):
        """
        200 WHEP viewers ask a producer (on the other node) that never
        answers: each waits on its own session, the servers' memory stays
        within bounds, the producer is asked 200 times; when the viewers go,
        every session ends (the producer hears each end) and nothing is
        left in the registry.
        """
        count = 200
        producer, _ = await self.producer(self.target, meta={"name": "silent"})
        self.watch_rss()
        offer = OFFER.encode()
        viewers = [await self.http(self.attacker, self.whep_post(b"silent", offer)) for _ in range(count)]
        starts = await producer.take(count, timeout=30)
        self.assertEqual({json.loads(m)["type"] for m in starts}, {"startSession"})
        for viewer in viewers:
            viewer.transport.abortConnection()
        ends = await producer.take(count, timeout=30)
        self.assertEqual({json.loads(m)["type"] for m in ends}, {"endSession"})
        self.assertEqual(
            {json.loads(m)["sessionId"] for m in ends},
            {json.loads(m)["sessionId"] for m in starts},
        )
        await self.check_aftermath(abusers=1)
        answer = await self.assert_silent(producer)
        self.assertIn({"name": "silent"}, [p["meta"] for p in answer["producers"]])

    async def test_whip_streams_that_wait_hold_little_and_go_with_their_clients(self):
        """
        100 WHIP publishers wait for consumers that never come: each is a
        producer the listener (on the other node) hears of, the servers'
        memory stays within bounds; when the publishers go, every stream
        goes (the listener hears each leave) and nothing is left.
        """
        count = 100
        listener, _ = await self.listener(self.target)
        self.watch_rss()
        publishers = [
            await self.http(self.attacker, self.whep_post(b"s%d" % i, OFFER.encode(), prefix=b"/whip/"))
            for i in range(count)
        ]
        appeared = [json.loads(m) for m in await listener.take(count, timeout=30)]
        self.assertEqual(
            sorted(m["meta"]["name"] for m in appeared), sorted(f"s{i}" for i in range(count))
        )
        for publisher in publishers:
            publisher.transport.abortConnection()
        left = [json.loads(m) for m in await listener.take(count, timeout=30)]
        self.assertEqual({m["peerId"] for m in left}, {m["peerId"] for m in appeared})
        self.assertEqual({tuple(m["roles"]) for m in left}, {()})
        await self.check_aftermath(abusers=1)
        # (The listener heard the unrelated pairs' producer come and go too.)
        listener.send_text(message(type="list"))
        while (answer := await self.next_json(listener))["type"] != "list":
            self.assertEqual(answer["type"], "peerStatusChanged")
        self.assertFalse(
            [p for p in answer["producers"] if (p["meta"] or {}).get("whip")], answer
        )

    async def test_an_oversized_http_body_is_refused_before_it_is_kept(self):
        """
        A WHEP offer that says it is 50 MB, and one that is sent chunked
        without end: 413 and the connection closed, the memory untouched.
        """
        self.watch_rss()
        declared = await self.http(self.attacker, self.whep_post(b"x", b"", length=50 * 2**20))
        self.assertIn(b" 413 ", (await declared.response()).split(b"\r\n")[0])
        chunked = await self.http(
            self.attacker,
            b"POST /whep/x HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/sdp\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
        )
        chunk = b"10000\r\n" + b"v" * 0x10000 + b"\r\n"
        for _ in range(40):
            if chunked.is_lost:
                break
            chunked.transport.write(chunk)
            await task.deferLater(reactor, 0.01, lambda: None)
        self.assertIn(b" 413 ", (await chunked.response()).split(b"\r\n")[0])
        await self.check_aftermath()


class AdversarialCases(TransportCases):
    """
    Every case: those of :class:`TransportCases` and those about the
    messages alone (meta sizes, nesting, log amplification, duplicate keys,
    protocol versions, token claims), which need not run over every
    transport. The server asks for tokens (--auth-secret): the clients of
    the other cases present one without claims.
    """

    auth = True

    # C. Meta size.

    async def test_a_meta_larger_than_the_limit_is_refused_and_not_applied(self):
        """
        ``setPeerStatus`` with a ``meta`` whose JSON encoding is larger than
        --max-meta-size (65536 bytes) is answered ``error`` and not applied:
        the listener hears nothing, ``list`` does not show it. One at the
        limit is applied.
        """
        listener, _ = await self.listener(self.target)
        attacker, attacker_id = await self.json_peer(self.attacker)
        self.watch_rss()
        too_large = "x" * (MAX_META - 1)  # its JSON encoding: MAX_META + 1 bytes
        attacker.send_text(message(type="setPeerStatus", roles=["producer"], meta=too_large))
        refused = await self.next_json(attacker)
        self.assertEqual(refused["type"], "error", refused)
        self.assertIsInstance(refused["details"], str)
        self.assertLess(len(json.dumps(refused)), SHORT)
        self.assertEqual((await self.assert_silent(attacker))["producers"], [])
        await self.assert_silent(listener)
        at_limit = "x" * (MAX_META - 2)
        attacker.send_text(message(type="setPeerStatus", roles=["producer"], meta=at_limit))
        self.assertEqual(
            await self.next_json(listener),
            {"type": "peerStatusChanged", "roles": ["producer"], "meta": at_limit,
             "peerId": attacker_id},
        )
        await self.check_aftermath()

    async def test_a_meta_of_a_million_bytes_of_empty_lists_is_not_kept(self):
        """
        A 1 MiB ``meta`` of 349,507 empty lists (some 20 MB as Python
        objects) is refused with ``error``, not listed, and not kept: the
        server's RSS comes back within the usual bound.
        """
        attacker, _ = await self.json_peer(self.attacker)
        lists = "[" + ",".join(["[]"] * 349_507) + "]"
        text = '{"type":"setPeerStatus","roles":["producer"],"meta":' + lists + "}"
        self.assertLessEqual(len(text), MAX_MESSAGE)
        self.watch_rss()
        attacker.send_text(text)
        refused = await self.next_json(attacker)
        self.assertEqual(refused["type"], "error", refused)
        self.assertEqual((await self.assert_silent(attacker))["producers"], [])
        await self.check_aftermath(settled=True)

    # D. Deep nesting.

    async def test_deeply_nested_json_is_dropped_and_breaks_nothing(self):
        """
        A message nested 100,000 levels, and a ``setPeerStatus`` whose
        ``meta`` is nested 970 levels, are dropped like any invalid message:
        no reply, the connection open, nothing in the log; a listener hears
        nothing and the others' ``list`` still works. In the examples'
        dialect the same text is an unknown command.
        """
        listener, _ = await self.listener(self.target)
        bystander, _ = await self.json_peer(self.target)
        attacker, _ = await self.json_peer(self.attacker)
        self.watch_rss()
        attacker.send_text(nested(100_000))
        attacker.send_text('{"type":"list","x":' + nested(100_000) + "}")
        attacker.send_text(
            '{"type":"setPeerStatus","roles":["producer"],"meta":' + nested(970) + "}"
        )
        self.assertEqual((await self.assert_silent(attacker))["producers"], [])
        self.assertEqual((await self.assert_silent(bystander))["producers"], [])
        await self.assert_silent(listener)
        examples = await self.examples(self.attacker, "nester")
        examples.send_text(nested(100_000))
        reply = await examples.next()
        # The word is cut (docs/protocol.md, "ERROR lines").
        self.assertTrue(reply.startswith("ERROR unknown command '[[["), reply)
        self.assertTrue(reply.endswith("...'"), reply)
        self.assertLess(len(reply), SHORT)
        await self.check_aftermath(abusers=2, settled=True)

    # E. Log amplification.

    async def until_logged(self, uid):
        """Register ``uid`` on every node and wait until each logged it (its log is flushed)."""
        for node in range(self.nodes):
            client = await self.examples(node, f"{uid}-{node}")
            await eventually(
                lambda: f"{uid}-{node}" in self.servers[node][0].output, f"{uid} logged"
            )
            client.close()

    async def test_huge_whep_names_bodies_and_fragments_are_answered_short(self):
        """
        WHEP and WHIP requests with a name of 100 KB, an offer of 1 MB of
        one line, a fragment of 1 MB of candidates for no section: each is
        answered with a short refusal, and the logs grow by far less.
        """
        await self.until_logged("before-w")
        self.watch_rss()
        logged = self.log_size()
        requests = [
            self.whep_post(b"n" * 100_000, OFFER.encode()),
            self.whep_post(b"w" * 100_000, OFFER.encode(), prefix=b"/whip/"),
            self.whep_post(b"studio", b"y" * 1_000_000, prefix=b"/whip/"),
            self.whep_post(b"cam", b"v=0\r\nm=" + b"x" * 1_000_000),
            self.whep_post(b"cam", b"v=0\r\n" + b"a=\x01\r\n" * 100_000),
            self.whep_post(b"cam", b"{" * 1_000_000).replace(b"application/sdp", b"application/json"),
            b"PATCH /whep/cam/nosuch HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
            b"application/trickle-ice-sdpfrag\r\nContent-Length: 1000000\r\n\r\n"
            + b"a=candidate:" + b"9" * 999_988,
        ]
        for request in requests:
            client = await self.http(self.attacker, request + b"")
            response = await eventually_response(client)
            status = int(response.split(b" ", 2)[1])
            self.assertIn(status, (400, 404, 414, 415, 431), response[:200])
            self.assertLess(len(response), 2 * SHORT, response[:300])
        await self.until_logged("after-w")
        self.assertLess(self.log_size() - logged, len(requests) * LOG_PER_REQUEST)
        await self.check_aftermath(settled=True)

    async def test_a_huge_json_peer_id_is_echoed_short_in_the_reply_and_the_log(self):
        """
        ``startSession`` with a 1 MB ``peerId``, four times: each error
        reply is short (it echoes at most some 256 characters), and the
        servers' logs grow by far less than the input.
        """
        attacker, _ = await self.json_peer(self.attacker)
        await self.until_logged("before")
        self.watch_rss()
        logged = self.log_size()
        for i in range(4):
            attacker.send_text(message(type="startSession", peerId=f"{i}" + "p" * 1_000_000))
            reply = await attacker.next()
            self.assertLess(len(reply), SHORT, reply[:300])
            self.assertEqual(json.loads(reply)["type"], "error")
        await self.until_logged("after")
        self.assertLess(self.log_size() - logged, 4 * LOG_PER_REQUEST)
        await self.check_aftermath(settled=True)

    async def test_huge_examples_words_are_echoed_short_in_the_reply_and_the_log(self):
        """
        ``SESSION <1 MB uid>`` and ``ROOM <1 MB room id>``, twice each:
        each ``ERROR`` line is short, and the logs grow by far less than
        the input.
        """
        attacker = await self.examples(self.attacker, "amplifier")
        await self.until_logged("before")
        self.watch_rss()
        logged = self.log_size()
        huge = "w" * 1_000_000
        for command, expected in (
            ("SESSION", f"ERROR peer '{huge[:257]}...' not found"),
            ("ROOM", f"ERROR invalid room id '{huge[:257]}...'"),
        ):
            for _ in range(2):
                attacker.send_text(f"{command} {huge}")
                reply = await attacker.next()
                self.assertLess(len(reply), SHORT, reply[:300])
                self.assertEqual(reply, expected)
        await self.until_logged("after")
        self.assertLess(self.log_size() - logged, 4 * LOG_PER_REQUEST)
        await self.check_aftermath(settled=True)

    # F. Duplicate keys.

    async def test_a_peer_message_with_duplicate_keys_never_reaches_the_producer(self):
        """
        A consumer's ``peer`` message with two ``sdp`` keys (an offer, then
        an answer) is dropped as invalid: the producer's next message is
        the consumer's proper answer, and the consumer hears nothing.
        """
        producer, _, consumer, _, session_id = await self.json_session()
        self.watch_rss()
        consumer.send_text(
            '{"type":"peer","sessionId":"' + session_id + '",'
            '"sdp":{"type":"offer","sdp":"forged"},"sdp":{"type":"answer","sdp":"v=0"}}'
        )
        answer = message(type="peer", sessionId=session_id, sdp={"type": "answer", "sdp": "v=0"})
        consumer.send_text(answer)
        self.assertEqual(await producer.next(), answer)
        await self.assert_silent(consumer)
        await self.check_aftermath()

    # G. Protocol version.

    async def test_a_v1_0_peer_cannot_end_a_session_with_an_error(self):
        """
        A peer on protocol v1.0 (by default, or having chosen ``v1_0``)
        that sends ``endSessionV1_1`` with an ``error`` is refused (the
        upstream words) and the session goes on: the other side is told
        nothing and a ``peer`` message still goes through.
        """
        self.watch_rss()
        for version in (None, "v1_0"):
            producer, _, consumer, consumer_id, session_id = await self.json_session(
                producer_version="v1_1", consumer_version=version
            )
            consumer.send_text(message(type="endSessionV1_1", sessionId=session_id, error="boom"))
            self.assertEqual(
                await self.next_json(consumer),
                {
                    "type": "error",
                    "details": f"Invalid end session message with error from peer "
                    f"'{consumer_id}', minimum protocol version is 1.1",
                },
            )
            ice = message(type="peer", sessionId=session_id,
                          ice={"candidate": "candidate:1", "sdpMLineIndex": 0})
            producer.send_text(ice)
            self.assertEqual(await consumer.next(), ice)
            await self.assert_silent(producer)
        await self.check_aftermath()


    # H. Token claims in the JSON dialect (docs/protocol.md, "Tokens in the
    # JSON dialect"), with tokens like a call page's: sub, rooms and calls,
    # no roles.

    def refusal(self, details):
        return {"type": "error", "details": details}

    async def test_a_token_s_sub_names_the_peer_and_another_name_is_refused(self):
        """
        A peer whose token names it ``mallory`` (with rooms and calls, no
        roles) cannot pass for another: a ``meta`` naming another name, or
        one that is not an object, is refused and not applied (the listener
        hears nothing, ``list`` does not show it); without a name its meta
        gets ``"name": "mallory"``. A token with roles allows no other role.
        """
        listener, _ = await self.listener(self.target)
        token = mint(SECRET, 600, uid="mallory", rooms=["r1"], calls=["cam"])
        attacker, attacker_id = await self.json_peer(self.attacker, token=token)
        self.watch_rss()
        for meta in ({"name": "cam"}, {"name": ["mallory"]}, "mallory", ["mallory"], 1):
            attacker.send_text(message(type="setPeerStatus", roles=["producer"], meta=meta))
            self.assertEqual(
                await self.next_json(attacker),
                self.refusal(
                    "the token names this peer 'mallory': its meta must be an object "
                    "without another name"
                ),
            )
        self.assertEqual((await self.assert_silent(attacker))["producers"], [])
        await self.assert_silent(listener)
        viewer, _ = await self.json_peer(
            self.attacker, token=mint(SECRET, 600, roles=["consumer", "listener"])
        )
        viewer.send_text(message(type="setPeerStatus", roles=["producer"], meta=None))
        self.assertEqual(
            await self.next_json(viewer),
            self.refusal("the token does not allow the roles [Producer]"),
        )
        await self.assert_silent(listener)
        attacker.send_text(message(type="setPeerStatus", roles=["producer"], meta={"x": 1}))
        self.assertEqual(
            await self.next_json(listener),
            {"type": "peerStatusChanged", "roles": ["producer"],
             "meta": {"name": "mallory", "x": 1}, "peerId": attacker_id},
        )
        await self.check_aftermath(abusers=2)

    async def test_a_token_s_calls_limit_whom_it_may_list_and_call(self):
        """
        A peer whose token lists ``cam`` in ``calls`` sees only the producer
        named ``cam`` in ``list``; ``startSession`` with any other producer
        (one named by its token, one that chose its name ``cam2``) is
        refused and starts nothing (that producer hears nothing); with
        ``cam`` it starts a session.
        """
        cam, cam_id = await self.producer(
            self.target, token=mint(SECRET, 600, uid="cam", roles=["producer"])
        )
        other, other_id = await self.producer(self.target, token=mint(SECRET, 600, uid="other"))
        free, free_id = await self.producer(self.target, meta={"name": "cam2"})
        token = mint(SECRET, 600, uid="mallory", rooms=["r1"], calls=["cam"])
        attacker, _ = await self.json_peer(self.attacker, token=token)
        self.watch_rss()
        listed = await self.assert_silent(attacker)
        self.assertEqual(listed["producers"], [{"id": cam_id, "meta": {"name": "cam"}}])
        for refused in (other_id, free_id):
            attacker.send_text(message(type="startSession", peerId=refused))
            self.assertEqual(
                await self.next_json(attacker),
                self.refusal(f"the token does not allow a session with '{refused}'"),
            )
        await self.assert_silent(other)
        await self.assert_silent(free)
        attacker.send_text(message(type="startSession", peerId=cam_id))
        self.assertEqual((await self.next_json(attacker))["type"], "sessionStarted")
        self.assertEqual((await self.next_json(cam))["type"], "startSession")
        await self.check_aftermath()


class SingleProcessPlaintextTests(AdversarialCases, unittest.TestCase):
    """Every case against one process, plaintext."""


class SingleProcessTLSTests(TransportCases, unittest.TestCase):
    """The transport's cases against one process, over TLS (the project's own layer)."""

    tls = True


class ClusterPlaintextTests(AdversarialCases, unittest.TestCase):
    """Every case against two processes on one Redis, plaintext."""

    nodes = 2


class ClusterTLSTests(TransportCases, unittest.TestCase):
    """The transport's cases against two processes on one Redis, over TLS."""

    tls = True
    nodes = 2

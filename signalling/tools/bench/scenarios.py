"""
What one client process does in each scenario.

Each scenario is an ``async`` function ``(spec, control) -> dict`` run in
every client process at once, each process taking its share of the pairs,
workers, peers or rooms (``spec["worker"]`` of ``spec["workers"]``). Where
the processes must act together (start the measured window at one moment,
let the parent read the server's memory between two phases), the function
calls ``await control.sync(step, info)``: every process reports ``info`` to
the parent, and all resume with the parent's answer.

Times are ``time.monotonic()``, which is one clock for every process of the
machine, so the parent can name the moment a window starts. A process's own
CPU time (user and system, from ``getrusage``) over its measured window is in
every result, so that a reader can tell whether the generator kept up.

Every wait is bounded by ``spec["timeout"]`` (for any one expected message)
or by the scenario's duration; a scenario always ends by itself.

A target may be several *nodes* (server processes that are one logical
server, a cluster): :class:`Control` holds an endpoint per node. Idle peers
and room members are spread over the nodes in turn; the two peers of each
relay pair and of each call are placed by :func:`place`, so that a chosen
share of them sit on different nodes (``spec["cross_share"]``), and their
round trips and set-up times are kept apart (same node, across nodes).
"""

import asyncio
import json
import math
import resource
import time
from array import array
from collections import deque

from signalling.core import words
from signalling.tools.bench.wsclient import TEXT, ConnectionClosed, connect

# What the server sends, as line prefixes (the protocol's words).
_ERROR = words.ERROR + " "
_ROOM_OK = words.ROOM_OK + " "
_JOINED = words.ROOM_PEER_JOINED + " "
_MESSAGE = words.ROOM_PEER_MSG + " "
#: In the ERROR of a server that cannot serve for now (a cluster node that
#: lost Redis): a refusal, not an answer.
_UNAVAILABLE = "try again later"

#: How many connections one process opens at once while setting up.
SETUP_CONCURRENCY = 100
#: Consecutive failed calls after which a set-up worker gives up.
MAX_CONSECUTIVE_FAILURES = 20
#: Failure reasons kept per process, as examples for the report.
KEEP_REASONS = 5

now = time.monotonic


def cpu_seconds():
    """:returns: this process's user plus system CPU time, in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def sleep_until(moment):
    """Sleep until ``time.monotonic()`` reaches ``moment``."""
    delay = moment - now()
    if delay > 0:
        await asyncio.sleep(delay)


class ProtocolFailure(Exception):
    """The server answered something other than what the protocol says."""


class Failures:
    """Counts failures and keeps a few reasons as examples."""

    def __init__(self):
        self.count = 0
        self.reasons = []

    def add(self, reason):
        self.count += 1
        if len(self.reasons) < KEEP_REASONS:
            self.reasons.append(str(reason) or type(reason).__name__)


def mine(total, spec):
    """:returns: the indices out of ``total`` that this process handles."""
    return range(spec["worker"], total, spec["workers"])


def crosses(turn, share, phase=0.0):
    """
    :returns: whether item ``turn`` of a sequence is one of the ``share``
        (0 to 1) that cross: spread evenly, so that any run of items holds
        ``share`` of them within one (``phase``, 0 to 1, shifts the pattern).
    """
    return math.floor((turn + 1) * share + phase) > math.floor(turn * share + phase)


def place(home, turn, nodes, share, phase=0.0):
    """
    :returns: ``(callee's node, caller's node)`` of a pair whose callee
        lives on node ``home``: the caller is on the same node, or (for
        ``share`` of the turns) on another node, the other nodes taken in
        turn.
    """
    if nodes <= 1 or not crosses(turn, share, phase):
        return home, home
    # The how-manieth crossing of this sequence picks the other node.
    crossing = math.floor(turn * share + phase)
    return home, (home + 1 + crossing % (nodes - 1)) % nodes


def relay_nodes(index, nodes, share):
    """
    :returns: ``(callee's node, caller's node)`` of relay pair ``index``:
        the callees in turn on every node, and on each node ``share`` of
        its pairs with their caller elsewhere, so that every node carries
        the same load.
    """
    home = index % nodes
    return place(home, index // nodes, nodes, share, home / nodes)


def call_nodes(worker, count, workers, nodes, share):
    """
    :returns: ``(callee's node, caller's node)`` of call ``count`` (from 0)
        of set-up worker ``worker`` of ``workers``: each worker's calls
        cross at ``share`` however fast they go.
    """
    home = (worker + count) % nodes
    return place(home, count, nodes, share, worker / max(workers, 1))


def make_uid(spec, *parts):
    """:returns: a uid unique to this run, scenario and item."""
    return "-".join([spec["tag"], *map(str, parts)])


def describe(error):
    """:returns: a one-line description of an exception."""
    if isinstance(error, TimeoutError):
        return "timed out"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def bounded_gather(coroutines, limit):
    """Run ``coroutines`` with at most ``limit`` at once; :returns: results or exceptions."""
    semaphore = asyncio.Semaphore(limit)

    async def one(coroutine):
        async with semaphore:
            return await coroutine

    return await asyncio.gather(*(one(c) for c in coroutines), return_exceptions=True)


_PRODUCER_STATUS = '{"type":"setPeerStatus","roles":["producer"],"meta":null}'
#: Answered once the status before it is in place: the list of passive
#: consumers, empty in these scenarios (the producers' list would grow with
#: every producer).
_LIST = '{"type":"listConsumers"}'


def _json_message(text):
    """:returns: the JSON object of a text message, or ``{}``."""
    try:
        message = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


def _peer_message(session_id, inner):
    """:returns: the text of a ``peer`` message carrying ``inner`` (a JSON text of sdp or ice)."""
    return '{"type":"peer","sessionId":"' + session_id + '",' + inner[1:]


class Control:
    """
    A client process's side of the scenario: the endpoints to connect to
    (one per node of the server), every connection opened (so that none
    outlives the scenario), and the synchronisation with the parent.

    :param endpoints: a :class:`~signalling.tools.bench.wsclient.Endpoint`,
        or a list of them, one per node.
    :param sync: ``async (step, info) -> answer``, given by the process.
    :param first: the node a connection opened without naming one goes to
        first; later ones go to the next node in turn.
    """

    def __init__(self, endpoints, sync, first=0):
        if not isinstance(endpoints, (list, tuple)):
            endpoints = [endpoints]
        self.endpoints = list(endpoints)
        self._sync = sync
        self._next = first
        self.connections = set()

    @property
    def endpoint(self):
        """The first node's endpoint."""
        return self.endpoints[0]

    @property
    def nodes(self):
        """How many nodes the server has."""
        return len(self.endpoints)

    async def sync(self, step, info=None):
        """Report ``info`` to the parent; :returns: its answer, once every process is there."""
        return await self._sync(step, info)

    async def connect(self, timeout, source_host=None, node=None, first=None):
        """
        :param node: the node to connect to (an index); by default the
            next one in turn.
        :param first: a text message sent the moment the connection opens.
        :returns: an open connection, tracked for the final cleanup.
        """
        if node is None:
            node = self._next
            self._next += 1
        connection = await connect(self.endpoints[node % len(self.endpoints)], timeout, source_host, first)
        self.connections.add(connection)
        return connection

    async def hello(self, uid, timeout, source_host=None, node=None):
        """
        :returns: a connection registered as ``uid``. The ``HELLO`` goes out
            the moment the connection opens, as the examples' clients send
            it: on a port that speaks both dialects, a server takes a
            connection silent for ``--dialect-wait`` for a JSON client.
        """
        connection = await self.connect(timeout, source_host, node, first=words.hello(uid))
        reply = await connection.recv_text(timeout)
        if reply != words.HELLO:
            connection.abort()
            raise ProtocolFailure(f"HELLO {uid} was answered {reply!r}")
        return connection

    # The JSON dialect (webrtcsink and webrtcsrc's protocol).

    async def welcomed(self, timeout, source_host=None, node=None):
        """:returns: ``(connection, peer id)``, welcomed by the server."""
        connection = await self.connect(timeout, source_host, node)
        reply = await connection.recv_text(timeout)
        message = _json_message(reply)
        if message.get("type") != "welcome":
            connection.abort()
            raise ProtocolFailure(f"expected welcome, received {reply[:60]!r}")
        return connection, message["peerId"]

    async def producer(self, timeout, source_host=None, node=None, meta=None):
        """
        :param meta: the producer's meta (its ``name`` is what a WHEP
            viewer's path may name); None by default.
        :returns: ``(connection, peer id)`` of a producer whose status is set.
        """
        connection, peer_id = await self.welcomed(timeout, source_host, node)
        if meta is None:
            connection.send_text(_PRODUCER_STATUS)
        else:
            connection.send_text(
                json.dumps({"type": "setPeerStatus", "roles": ["producer"], "meta": meta})
            )
        connection.send_text(_LIST)
        reply = await connection.recv_text(timeout)
        if _json_message(reply).get("type") != "listConsumers":
            connection.abort()
            raise ProtocolFailure(f"list was answered {reply[:60]!r}")
        return connection, peer_id

    async def json_session(self, timeout, nodes=(None, None)):
        """
        :param nodes: the producer's and the consumer's nodes.
        :returns: ``(consumer, producer, session id)``: a session of the JSON dialect.
        """
        producer, producer_id = await self.producer(timeout, node=nodes[0])
        consumer, _ = await self.welcomed(timeout, node=nodes[1])
        consumer.send_text(json.dumps({"type": "startSession", "peerId": producer_id}))
        started = _json_message(await consumer.recv_text(timeout))
        asked = _json_message(await producer.recv_text(timeout))
        if started.get("type") != "sessionStarted" or asked.get("type") != "startSession":
            consumer.abort()
            producer.abort()
            raise ProtocolFailure(f"startSession: {started!r}, {asked!r}")
        return consumer, producer, started["sessionId"]

    async def close_all(self, connections, timeout):
        """
        Close ``connections`` and wait until the server let go of them, for
        at most ``timeout`` seconds; drop the rest.

        :returns: how many did not close cleanly in time.
        """
        waits = [c.close() for c in connections]
        if not waits:
            return 0
        _, pending = await asyncio.wait(waits, timeout=timeout)
        for connection in connections:
            if not connection.closed.done():
                connection.abort()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        return len(pending)

    async def cleanup(self):
        """Drop whatever is still open (after a failure)."""
        for connection in self.connections:
            connection.abort()
        waits = [c.closed for c in self.connections if not c.closed.done()]
        if waits:
            await asyncio.wait(waits, timeout=2.0)
        self.connections = set()


# relay


class _Tally:
    """Round trips within the measured window, and their times."""

    def __init__(self):
        self.samples = array("d")
        self.count = 0


class _RelayState:
    """What all pairs of one process share during the relay scenario."""

    def __init__(self, window_start, window_end, size):
        self.window_start = window_start
        self.window_end = window_end
        self.size = size
        #: Pairs whose two peers are on one node, and across two nodes.
        self.same = _Tally()
        self.cross = _Tally()
        self.errors = Failures()


class _RelayPair:
    """
    One session: the caller keeps ``inflight`` messages on the way, the
    callee echoes each back, and the caller times each round trip.

    Messages carry a sequence number, and the server must keep their order:
    the oldest message still on the way is the one whose echo comes next.
    """

    def __init__(self, caller, callee, state, loop, prefix=b"", suffix=b"", cross=False):
        self.caller = caller
        self.callee = callee
        self.state = state
        self.cross = cross
        self.tally = state.cross if cross else state.same
        # The JSON dialect wraps the sequence number in a peer message.
        self.prefix = prefix
        self.suffix = suffix
        self.pad = b"x" * (state.size - 10 - len(prefix) - len(suffix))
        if len(prefix) + 10 + len(self.pad) + len(suffix) != state.size:
            raise ValueError(f"messages of {state.size} bytes cannot hold {prefix + suffix!r}")
        self.sent = deque()
        self.seq = 0
        self.done = loop.create_future()
        callee.set_handler(callee.send)
        caller.set_handler(self.on_echo)
        caller.closed.add_done_callback(self._lost)
        callee.closed.add_done_callback(self._lost)

    def _lost(self, _):
        if not self.done.done():
            self.state.errors.add("connection lost during the relay")
            self.done.set_result(None)

    def start(self, count):
        moment = now()
        for _ in range(count):
            self.send_next(moment)

    def send_next(self, moment):
        seq = self.seq
        self.seq = seq + 1
        self.sent.append((moment, seq))
        self.caller.send(self.prefix + b"%010d" % seq + self.pad + self.suffix, TEXT)

    def on_echo(self, payload, opcode):
        moment = now()
        state = self.state
        if not self.sent:
            state.errors.add("an echo that was never sent")
            return
        sent_at, seq = self.sent.popleft()
        start = len(self.prefix)
        if len(payload) != state.size or payload[start:start + 10] != b"%010d" % seq:
            state.errors.add(f"echo of message {seq} is wrong or out of order")
        if moment < state.window_end:
            if moment >= state.window_start:
                tally = self.tally
                tally.samples.append(moment - sent_at)
                tally.count += 1
            self.send_next(moment)
        elif not self.sent and not self.done.done():
            self.done.set_result(None)


def _relay_wrapping(session_id):
    """:returns: ``(prefix, suffix)`` of a relayed message: none, or a JSON ``peer`` message's."""
    if session_id is None:
        return b"", b""
    # As a server that decodes and encodes what it relays writes it (see
    # JSON_FORM), so that the echo is the very text sent.
    prefix = '{"type":"peer","sessionId":"' + session_id + '","ice":{"candidate":"'
    return prefix.encode("ascii"), b'","sdpMLineIndex":0}}'


async def relay(spec, control):
    """
    P pairs in sessions, each keeping W messages of S bytes on the way, the
    callee echoing: round trips within the measured window, and their times.
    """
    timeout = spec["timeout"]
    size = max(spec["size"], 16)
    loop = asyncio.get_running_loop()

    share = spec.get("cross_share", 0.0)

    async def make_pair(index):
        nodes = relay_nodes(index, control.nodes, share)
        cross = nodes[0] != nodes[1]
        if spec.get("dialect") == "json":
            # The consumer sends ICE candidates, the producer echoes them.
            consumer, producer, session_id = await control.json_session(timeout, nodes)
            return consumer, producer, session_id, cross
        callee_uid = make_uid(spec, "r", index, "b")
        callee = await control.hello(callee_uid, timeout, node=nodes[0])
        caller = await control.hello(make_uid(spec, "r", index, "a"), timeout, node=nodes[1])
        caller.send_text(words.session(callee_uid))
        reply = await caller.recv_text(timeout)
        if reply != words.SESSION_OK:
            raise ProtocolFailure(f"SESSION {callee_uid} was answered {reply!r}")
        return caller, callee, None, cross

    made = await bounded_gather(
        [make_pair(i) for i in mine(spec["pairs"], spec)], SETUP_CONCURRENCY
    )
    failures = [m for m in made if isinstance(m, BaseException)]
    start_at = await control.sync(
        "ready", {"failed": len(failures), "reason": describe(failures[0]) if failures else None}
    )
    window_start = start_at + spec["warmup"]
    window_end = window_start + spec["duration"]
    state = _RelayState(window_start, window_end, size)
    pairs = [
        _RelayPair(caller, callee, state, loop, *_relay_wrapping(session_id), cross=cross)
        for caller, callee, session_id, cross in (
            m for m in made if not isinstance(m, BaseException)
        )
    ]

    await sleep_until(start_at)
    for pair in pairs:
        pair.start(spec["inflight"])
    await sleep_until(window_start)
    cpu_start = cpu_seconds()
    await sleep_until(window_end)
    cpu = cpu_seconds() - cpu_start
    if pairs:
        _, pending = await asyncio.wait([p.done for p in pairs], timeout=timeout)
        for _ in pending:
            state.errors.add("messages still on the way at the end")
    unclosed = await control.close_all([p.caller for p in pairs], timeout)
    await control.close_all([p.callee for p in pairs], timeout)
    return {
        "pairs": len(pairs),
        "pairs_cross": sum(p.cross for p in pairs),
        "round_trips": state.same.count + state.cross.count,
        "round_trips_cross": state.cross.count,
        "samples_same": state.same.samples,
        "samples_cross": state.cross.samples,
        "errors": state.errors.count,
        "reasons": state.errors.reasons,
        "unclosed": unclosed,
        "cpu": cpu,
        "wall": window_end - window_start,
    }


# setup


def _sdp(kind, length):
    """:returns: the JSON text of an SDP message of exactly ``length`` characters."""
    lines = ["v=0", "o=- 4611731400430051336 2 IN IP4 127.0.0.1", "s=-", "t=0 0"]
    body = "\r\n".join(lines) + "\r\n"
    text = json.dumps({"sdp": {"type": kind, "sdp": body}})
    filler = length - len(text)
    if filler > 0:
        body += "a=x-bench:" + "y" * max(filler - 12, 0) + "\r\n"
        text = json.dumps({"sdp": {"type": kind, "sdp": body}})
    return text


def _candidates(side):
    """:returns: the 10 ICE candidate messages one side sends."""
    return [
        json.dumps(
            {
                "ice": {
                    "candidate": f"candidate:{side}{n} 1 UDP 2122252543 127.0.0.1 {50000 + n} typ host",
                    "sdpMLineIndex": n % 2,
                }
            }
        )
        for n in range(10)
    ]


OFFER = _sdp("offer", 4096)
ANSWER = _sdp("answer", 4096)
CALLER_ICE = _candidates(1)
CALLEE_ICE = _candidates(2)

#: The negotiation texts as the JSON dialect sends them: without spaces,
#: keys in the protocol's order, which is how a server that decodes and
#: encodes what it relays (gst-plugins-rs' gst-webrtc-signalling-server,
#: with serde_json) writes them, so that every one arrives as it was sent.
#: (The examples' protocol relays any text as it is.)
JSON_FORM = {
    text: json.dumps(json.loads(text), separators=(",", ":"))
    for text in (OFFER, ANSWER, *CALLER_ICE, *CALLEE_ICE)
}


async def _expect(connection, expected, timeout, what):
    got = await connection.recv_text(timeout)
    if got != expected:
        raise ProtocolFailure(f"{what}: received {got[:60]!r}")


async def _negotiate(offerer, answerer, wrap, timeout):
    """
    The negotiation of a call: the 4 KB offer, the answer, then 10 ICE
    candidates each way, each message as ``wrap`` makes it of the bare
    negotiation text, and each checked where it arrives.
    """
    offer = wrap(OFFER)
    offerer.send_text(offer)
    await _expect(answerer, offer, timeout, "the offer")
    answer = wrap(ANSWER)
    answerer.send_text(answer)
    await _expect(offerer, answer, timeout, "the answer")
    offerer_ice = [wrap(c) for c in CALLER_ICE]
    answerer_ice = [wrap(c) for c in CALLEE_ICE]
    for candidate in offerer_ice:
        offerer.send_text(candidate)
    for candidate in answerer_ice:
        answerer.send_text(candidate)
    for candidate in offerer_ice:
        await _expect(answerer, candidate, timeout, "an offerer's ICE candidate")
    for candidate in answerer_ice:
        await _expect(offerer, candidate, timeout, "an answerer's ICE candidate")


async def _call(control, spec, caller_uid, callee_uid, timeout, nodes=(None, None)):
    """
    One call from connect to close; :returns: its set-up time in seconds.

    :param nodes: the callee's and the caller's nodes.
    """
    started = now()
    opened = await asyncio.gather(
        control.hello(callee_uid, timeout, node=nodes[0]),
        control.hello(caller_uid, timeout, node=nodes[1]),
        return_exceptions=True,
    )
    for result in opened:
        if isinstance(result, BaseException):
            for other in opened:
                if not isinstance(other, BaseException):
                    other.abort()
                    control.connections.discard(other)
            raise result
    callee, caller = opened
    try:
        caller.send_text(words.session(callee_uid))
        await _expect(caller, words.SESSION_OK, timeout, "SESSION")
        await _negotiate(caller, callee, lambda text: text, timeout)
        set_up = now() - started
        # The caller hangs up; the server must then close the callee.
        caller.close()
        async with asyncio.timeout(timeout):
            await callee.closed
            await caller.closed
        if callee.close_code != 1000:
            raise ProtocolFailure(f"callee closed with {callee.close_code}, not 1000")
        return set_up
    finally:
        caller.abort()
        callee.abort()
        control.connections.discard(caller)
        control.connections.discard(callee)


async def _json_call(control, spec, timeout, nodes=(None, None)):
    """
    One session of the JSON dialect from connect to close: a producer and a
    consumer connect and are welcomed, the producer registers, the consumer
    starts a session, the producer offers, the consumer answers, 10 ICE
    candidates each way; :returns: its set-up time in seconds.
    """
    started = now()
    consumer, producer, session_id = await control.json_session(timeout, nodes)
    try:
        await _negotiate(
            producer, consumer, lambda text: _peer_message(session_id, JSON_FORM[text]), timeout
        )
        set_up = now() - started
        # The consumer leaves; the producer is told the session ended.
        consumer.close()
        ended = _json_message(await producer.recv_text(timeout))
        if ended.get("type") != "endSession" or ended.get("sessionId") != session_id:
            raise ProtocolFailure(f"expected endSession, received {ended!r}")
        producer.close()
        async with asyncio.timeout(timeout):
            await consumer.closed
            await producer.closed
        return set_up
    finally:
        consumer.abort()
        producer.abort()
        control.connections.discard(consumer)
        control.connections.discard(producer)


async def setup(spec, control):
    """
    C workers each making calls one after another until the duration is
    over: connect two peers, HELLO, SESSION, offer, answer, 10 ICE
    candidates each way, close.
    """
    timeout = spec["timeout"]
    workers = list(mine(spec["workers_per_target"], spec))
    start_at = await control.sync("ready", {"workers": len(workers)})
    deadline = start_at + spec["duration"]
    #: Set-up times of calls with both peers on one node, and across nodes.
    times = {False: array("d"), True: array("d")}
    share = spec.get("cross_share", 0.0)
    failures = Failures()
    ends = []

    async def worker(index):
        count = consecutive = 0
        while now() < deadline and consecutive < MAX_CONSECUTIVE_FAILURES:
            nodes = call_nodes(index, count, spec["workers_per_target"], control.nodes, share)
            count += 1
            try:
                if spec.get("dialect") == "json":
                    took = await _json_call(control, spec, timeout, nodes)
                else:
                    took = await _call(
                        control,
                        spec,
                        make_uid(spec, "s", index, count, "a"),
                        make_uid(spec, "s", index, count, "b"),
                        timeout,
                        nodes,
                    )
                times[nodes[0] != nodes[1]].append(took)
                consecutive = 0
                ends.append(now())
            except (OSError, ConnectionClosed, ProtocolFailure, TimeoutError) as e:
                consecutive += 1
                failures.add(describe(e))

    await sleep_until(start_at)
    cpu_start = cpu_seconds()
    await asyncio.gather(*(worker(i) for i in workers))
    cpu = cpu_seconds() - cpu_start
    return {
        "calls": len(times[False]) + len(times[True]),
        "calls_cross": len(times[True]),
        "samples_same": times[False],
        "samples_cross": times[True],
        "failures": failures.count,
        "reasons": failures.reasons,
        "last_end": max(ends) if ends else None,
        "cpu": cpu,
        "wall": max(now() - start_at, 1e-9),
    }


# idle


async def idle(spec, control):
    """
    N peers opened in a storm and registered, held idle, then each asked
    one question (a ``SESSION`` to a uid nobody has) that every server
    answers with ``ERROR`` (at most ``storm_concurrency`` questions of a
    process on their way at once).

    A peer of the storm may take ``spec["storm_timeout"]`` seconds to be
    registered: a connection dropped from a full listen queue is retried
    by the kernel after 1, 3, 7, 15 and 31 seconds.
    """
    timeout = spec["timeout"]
    sources = spec.get("source_hosts") or [None]
    indices = list(mine(spec["peers"], spec))
    failures = Failures()
    start_at = await control.sync("ready", {"peers": len(indices)})

    hello_times = array("d")

    json_dialect = spec.get("dialect") == "json"

    nodes = control.nodes
    registered_per_node = [0] * nodes

    async def open_peer(index):
        source = sources[index % len(sources)]
        node = index % nodes
        if json_dialect:
            connection, _ = await control.producer(spec["storm_timeout"], source, node)
        else:
            connection = await control.hello(
                make_uid(spec, "i", index), spec["storm_timeout"], source, node
            )
        hello_times.append(now())
        registered_per_node[node] += 1
        return connection

    await sleep_until(start_at)
    cpu_start = cpu_seconds()
    opened = await bounded_gather(
        [open_peer(i) for i in indices], spec["storm_concurrency"]
    )
    cpu_storm = cpu_seconds() - cpu_start
    storm_end = now()
    peers = []
    for result in opened:
        if isinstance(result, BaseException):
            failures.add(describe(result))
        else:
            peers.append(result)
    last = max(hello_times) if hello_times else None
    await control.sync(
        "stormed",
        {"registered": len(peers), "last": last, "registered_per_node": registered_per_node},
    )

    if json_dialect:
        question = json.dumps({"type": "startSession", "peerId": make_uid(spec, "nobody")})
    else:
        question = words.session(make_uid(spec, "nobody"))

    async def ask(connection):
        connection.send_text(question)
        try:
            reply = await connection.recv_text(timeout)
        except (ConnectionClosed, TimeoutError) as e:
            return describe(e)
        if isinstance(reply, str) and (
            _json_message(reply).get("type") == "error"
            if json_dialect
            else reply.startswith(_ERROR)
        ):
            if _UNAVAILABLE in reply:
                # Refused, not answered: a cluster node that lost Redis.
                return f"unavailable: {reply[:60]!r}"
            return None
        return f"answered {reply[:60]!r}"

    # As many questions on their way at once as connections in the storm:
    # with many peers, each question a command for a cluster's Redis, all
    # at once would wait longer than the timeout in the server's queues.
    asked_from = now()
    answers = await bounded_gather([ask(c) for c in peers], spec["storm_concurrency"])
    answered_by = now()
    silent = Failures()
    unavailable = 0
    for answer in answers:
        if answer is not None:
            silent.add(describe(answer) if isinstance(answer, BaseException) else answer)
            unavailable += isinstance(answer, str) and answer.startswith("unavailable")
    # Every process's peers answer before any closes: a server's work on a
    # crowd of closes (for a cluster node, a command to Redis each) would
    # slow the others' answers.
    await control.sync("answered", None)
    unclosed = await control.close_all(peers, timeout)
    return {
        "peers": len(indices),
        "registered": len(peers),
        "failures": failures.count,
        "reasons": failures.reasons + silent.reasons,
        "answered": len(peers) - silent.count,
        "unavailable": unavailable,
        "asked_from": asked_from,
        "answered_by": answered_by,
        "last": last,
        "unclosed": unclosed,
        "cpu": cpu_storm,
        "wall": max(storm_end - start_at, 1e-9),
    }


# rooms


class _Member:
    """A room member that records every notice and message it receives."""

    def __init__(self, uid, connection, expected_joins, expected_messages, loop):
        self.uid = uid
        self.connection = connection
        self.joined = []
        self.messages = []
        self.other = []
        self.expected_joins = expected_joins
        self.expected_messages = expected_messages
        self.complete = loop.create_future()
        connection.closed.add_done_callback(lambda _: self._check())

    def listen(self):
        self.connection.set_handler(self.on_message)
        self._check()

    def on_message(self, payload, opcode):
        text = payload.decode("utf-8", "replace")
        if text.startswith(_JOINED):
            self.joined.append(text[len(_JOINED):])
        elif text.startswith(_MESSAGE):
            self.messages.append(text[len(_MESSAGE):])
        else:
            self.other.append(text)
        self._check()

    def _check(self):
        if self.complete.done():
            return
        if (
            len(self.joined) >= self.expected_joins
            and len(self.messages) >= self.expected_messages
        ) or self.connection.closed.done():
            self.complete.set_result(None)


async def _room(control, spec, number, timeout, loop):
    """One room: join one by one, then everyone messages everyone once."""
    size = spec["members"]
    room_id = make_uid(spec, "room", number)
    uids = [make_uid(spec, "m", number, j) for j in range(size)]
    errors = Failures()
    started = now()
    # The members of a room spread over the nodes in turn.
    connections = await asyncio.gather(
        *(control.hello(uid, timeout, node=number + j) for j, uid in enumerate(uids))
    )
    members = [
        _Member(uid, connection, size - 1 - j, size - 1, loop)
        for j, (uid, connection) in enumerate(zip(uids, connections))
    ]
    for j, member in enumerate(members):
        member.connection.send_text(words.room(room_id))
        reply = await member.connection.recv_text(timeout)
        if not isinstance(reply, str) or not reply.startswith(_ROOM_OK):
            raise ProtocolFailure(f"ROOM {room_id} was answered {reply!r}")
        if sorted(reply[len(_ROOM_OK):].split()) != sorted(uids[:j]):
            errors.add(f"ROOM_OK of member {j} does not list the {j} members before it")
        member.listen()
    joined = now()
    for member in members:
        for other in members:
            if other is not member:
                member.connection.send_text(
                    words.room_peer_msg(other.uid, f"hi {member.uid} to {other.uid}")
                )
    done, _ = await asyncio.wait([m.complete for m in members], timeout=timeout)
    finished = now()
    joins_received = messages_received = 0
    for j, member in enumerate(members):
        expected_joins = uids[j + 1:]
        good_joins = [u for u in member.joined if u in expected_joins]
        joins_received += len(set(good_joins))
        if member.joined != expected_joins:
            errors.add(
                f"member {j} saw joins {len(member.joined)} of {len(expected_joins)}"
                + ("" if len(set(member.joined)) == len(member.joined) else " (duplicates)")
            )
        expected_messages = {
            f"{other} hi {other} to {member.uid}" for other in uids if other != member.uid
        }
        good = [m for m in member.messages if m in expected_messages]
        messages_received += len(set(good))
        if sorted(member.messages) != sorted(expected_messages):
            errors.add(
                f"member {j} received {len(member.messages)} of {len(expected_messages)} messages"
            )
        if member.other:
            errors.add(f"member {j} received {member.other[0][:60]!r}")
    await control.close_all(connections, timeout)
    for connection in connections:
        control.connections.discard(connection)
    return {
        "join_seconds": joined - started,
        "seconds": finished - started,
        "end": finished,
        "joins_received": joins_received,
        "messages_received": messages_received,
        "errors": errors,
    }


async def rooms(spec, control):
    """
    R rooms of M members, the rooms side by side: every member joins one
    after another, then every member sends every other one message; every
    join notice and every message must arrive exactly once.
    """
    timeout = spec["timeout"]
    loop = asyncio.get_running_loop()
    numbers = list(mine(spec["rooms"], spec))
    start_at = await control.sync("ready", {"rooms": len(numbers)})
    await sleep_until(start_at)
    cpu_start = cpu_seconds()
    results = await asyncio.gather(
        *(_room(control, spec, n, timeout, loop) for n in numbers), return_exceptions=True
    )
    cpu = cpu_seconds() - cpu_start
    errors = Failures()
    joins = messages = 0
    ends = []
    join_seconds = []
    for result in results:
        if isinstance(result, BaseException):
            errors.add(describe(result))
            continue
        joins += result["joins_received"]
        messages += result["messages_received"]
        ends.append(result["end"])
        join_seconds.append(result["join_seconds"])
        errors.count += result["errors"].count
        for reason in result["errors"].reasons:
            if len(errors.reasons) < KEEP_REASONS:
                errors.reasons.append(reason)
    return {
        "rooms": len(numbers),
        "joins_received": joins,
        "messages_received": messages,
        "join_seconds": max(join_seconds) if join_seconds else None,
        "last_end": max(ends) if ends else None,
        "errors": errors.count,
        "reasons": errors.reasons,
        "cpu": cpu,
        "wall": max((max(ends) if ends else now()) - start_at, 1e-9),
    }


# soak


async def _room_visit(control, spec, uid, room_id, timeout):
    """
    One short stay in a room: register, join, ask for the member list,
    greet the first member listed (if any), leave.
    """
    connection = await control.hello(uid, timeout)
    try:
        connection.send_text(words.room(room_id))
        reply = await connection.recv_text(timeout)
        if not isinstance(reply, str) or not reply.startswith(_ROOM_OK):
            raise ProtocolFailure(f"ROOM {room_id} was answered {reply!r}")
        members = reply[len(_ROOM_OK):].split()
        connection.send_text(words.ROOM_PEER_LIST)
        # Notices of others' joins and leaves may come first.
        while True:
            reply = await connection.recv_text(timeout)
            if isinstance(reply, str) and reply.startswith(words.ROOM_PEER_LIST):
                break
        if members:
            connection.send_text(words.room_peer_msg(members[0], "hi from " + uid))
    finally:
        await control.close_all([connection], timeout)
        control.connections.discard(connection)


async def soak(spec, control):
    """
    Peers churning for ``duration`` seconds: each of ``peers`` workers,
    again and again, registers under a new uid and visits one of ``rooms``
    rooms (joins, lists, greets, leaves), and every fifth time makes a
    whole call instead. Afterwards worker 0 checks that every room is empty
    and that a churned uid is free again.
    """
    timeout = spec["timeout"]
    workers = list(mine(spec["peers"], spec))
    failures = Failures()
    cycles = 0
    start_at = await control.sync("ready", {"peers": len(workers)})
    await sleep_until(start_at)
    end_at = start_at + spec["duration"]
    cpu_start = cpu_seconds()

    async def worker(w):
        nonlocal cycles
        n = 0
        while now() < end_at:
            n += 1
            try:
                if n % 5 == 0:
                    await _call(
                        control, spec, make_uid(spec, "c", w, n), make_uid(spec, "d", w, n), timeout
                    )
                else:
                    room_id = make_uid(spec, "room", (w + n) % spec["rooms"])
                    await _room_visit(control, spec, make_uid(spec, "s", w, n), room_id, timeout)
                cycles += 1
            except Exception as e:
                failures.add(describe(e))

    await asyncio.gather(*(worker(w) for w in workers))
    cpu = cpu_seconds() - cpu_start
    await control.sync("churned", {"cycles": cycles})
    leftovers = Failures()
    if spec["worker"] == 0:
        for number in range(spec["rooms"]):
            room_id = make_uid(spec, "room", number)
            try:
                connection = await control.hello(make_uid(spec, "check", number), timeout)
                connection.send_text(words.room(room_id))
                reply = await connection.recv_text(timeout)
                if reply != _ROOM_OK:
                    leftovers.add(f"room {number} not empty after the churn: {reply[:80]!r}")
                await control.close_all([connection], timeout)
            except Exception as e:
                leftovers.add(describe(e))
        try:
            # A uid of the churn is free again.
            connection = await control.hello(make_uid(spec, "s", workers[0] if workers else 0, 1), timeout)
            await control.close_all([connection], timeout)
        except Exception as e:
            leftovers.add(f"a churned uid is not free: {describe(e)}")
    return {
        "cycles": cycles,
        "failures": failures.count + leftovers.count,
        "reasons": failures.reasons + leftovers.reasons,
        "cpu": cpu,
        "wall": max(now() - start_at, 1e-9),
    }


SCENARIOS = {"relay": relay, "setup": setup, "idle": idle, "rooms": rooms, "soak": soak}

"""
What one client process does in the WHEP scenarios (``whep-setup`` and
``whep-latency``), against producers the bench runs itself.

The producers are JSON peers (as ``webrtcsink`` is) that register with a
``name`` in their meta and answer every ``startSession`` at once: an SDP
answer and two ICE candidates, then (unless ``spec["end_marker"]`` is
False) an empty candidate, the end of their candidates, which lets the
server answer a WHEP ``POST`` without waiting ``--candidate-wait``. They
count the sessions started and ended, so that the parent can check that
every set-up the viewers counted was a real one.

- ``whep-setup``: C workers, each a viewer after another: connect (each
  viewer from the next of the loopback addresses given, as viewers are
  clients of their own), ``POST /whep/<producer>``
  with a Chromium-like offer, ``201`` with the answer and the candidates,
  ``DELETE`` its ``Location``, close.
- ``json-consumer-setup``: the same with JSON consumers (connect,
  ``welcome``, ``startSession`` with the offer, the producer's answer and
  candidates, ``endSession``, close), for a side by side with whep-setup.
- ``whep-latency``: one set-up at a time, alternating a JSON consumer
  (connect, ``welcome``, ``startSession`` with the offer, the producer's
  answer) and a WHEP viewer (connect, ``POST``, ``201``), the two in turn
  first, against the same producers: the time from the start to the answer
  in hand for each.

The scenario functions follow :mod:`signalling.tools.bench.scenarios`:
``async (spec, control) -> dict``, synchronised with the parent through
``control.sync``.
"""

import asyncio
import json
import statistics
from array import array
from urllib.parse import quote

from signalling.core import words
from signalling.tools.bench.httpclient import HttpConnection, HttpError
from signalling.tools.bench.scenarios import (
    Failures,
    ProtocolFailure,
    _json_message,
    cpu_seconds,
    describe,
    make_uid,
    mine,
    now,
    sleep_until,
)
from signalling.tools.bench.wsclient import ConnectionClosed

#: What a failed set-up may raise.
FAILURES = (OSError, ConnectionClosed, ProtocolFailure, TimeoutError, HttpError)
#: Consecutive failed set-ups after which a worker gives up.
MAX_CONSECUTIVE_FAILURES = 20


def _fingerprint():
    return (
        "a=fingerprint:sha-256 95:C7:25:9A:D1:7F:04:E1:A7:43:24:58:90:61:FD:47:09:DF:"
        "CE:9E:7A:27:85:60:87:B9:C8:CC:11:27:2F:B5"
    )


def _offer():
    """
    :returns: a viewer's offer as Chromium writes it for WHEP (an audio and
        a video transceiver, both ``recvonly``, bundled, no candidates yet):
        about 4.5 KB, its codecs those of a desktop Chromium.
    """
    session = [
        "v=0",
        "o=- 4215775240449105457 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "a=extmap-allow-mixed",
        "a=msid-semantic: WMS",
    ]
    transport = [
        "c=IN IP4 0.0.0.0",
        "a=rtcp:9 IN IP4 0.0.0.0",
        "a=ice-ufrag:Qm3x",
        "a=ice-pwd:7c2Hh8ktBrSLdw3nVgmvQ6Mb",
        "a=ice-options:trickle",
        _fingerprint(),
        "a=setup:actpass",
    ]
    audio = (
        ["m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126"]
        + transport
        + [
            "a=mid:0",
            "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
            "a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
            "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
            "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
            "a=recvonly",
            "a=rtcp-mux",
            "a=rtcp-rsize",
            "a=rtpmap:111 opus/48000/2",
            "a=rtcp-fb:111 transport-cc",
            "a=fmtp:111 minptime=10;useinbandfec=1",
            "a=rtpmap:63 red/48000/2",
            "a=fmtp:63 111/111",
            "a=rtpmap:9 G722/8000",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:8 PCMA/8000",
            "a=rtpmap:13 CN/8000",
            "a=rtpmap:110 telephone-event/48000",
            "a=rtpmap:126 telephone-event/8000",
        ]
    )
    # (payload type, codec, fmtp or None, its rtx payload type or None)
    codecs = [
        (96, "VP8/90000", None, 97),
        (98, "VP9/90000", "profile-id=0", 99),
        (100, "VP9/90000", "profile-id=2", 101),
        (45, "AV1/90000", "level-idx=5;profile=0;tier=0", 46),
        (102, "H264/90000", "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f", 103),
        (104, "H264/90000", "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42001f", 105),
        (106, "H264/90000", "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f", 107),
        (112, "H264/90000", "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=64001f", 113),
    ]
    feedback = ["goog-remb", "transport-cc", "ccm fir", "nack", "nack pli"]
    types = [str(pt) for c in codecs for pt in (c[0], c[3])] + ["114", "115", "116"]
    video = (
        ["m=video 9 UDP/TLS/RTP/SAVPF " + " ".join(types)]
        + transport
        + [
            "a=mid:1",
            "a=extmap:14 urn:ietf:params:rtp-hdrext:toffset",
            "a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
            "a=extmap:13 urn:3gpp:video-orientation",
            "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
            "a=extmap:5 http://www.webrtc.org/experiments/rtp-hdrext/playout-delay",
            "a=extmap:6 http://www.webrtc.org/experiments/rtp-hdrext/video-content-type",
            "a=extmap:7 http://www.webrtc.org/experiments/rtp-hdrext/video-timing",
            "a=extmap:8 http://www.webrtc.org/experiments/rtp-hdrext/color-space",
            "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
            "a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
            "a=extmap:11 urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id",
            "a=recvonly",
            "a=rtcp-mux",
            "a=rtcp-rsize",
        ]
    )
    for pt, codec, fmtp, rtx in codecs:
        video.append(f"a=rtpmap:{pt} {codec}")
        video += [f"a=rtcp-fb:{pt} {fb}" for fb in feedback]
        if fmtp:
            video.append(f"a=fmtp:{pt} {fmtp}")
        video += [f"a=rtpmap:{rtx} rtx/90000", f"a=fmtp:{rtx} apt={pt}"]
    video += [
        "a=rtpmap:114 red/90000",
        "a=rtpmap:115 rtx/90000",
        "a=fmtp:115 apt=114",
        "a=rtpmap:116 ulpfec/90000",
    ]
    return "\r\n".join(session + audio + video) + "\r\n"


def _answer():
    """:returns: a producer's answer as ``webrtcsink`` writes it: opus and VP8, ``sendonly``."""
    transport = [
        "c=IN IP4 0.0.0.0",
        "a=ice-ufrag:zP4kSx9QbVg2Lw7H",
        "a=ice-pwd:Ghu3kRfD0sLbq8XnV2eTzWcY5aJm1pQo",
        "a=fingerprint:sha-256 0B:DE:C2:38:15:11:D1:33:6B:39:27:76:E0:48:5D:07:71:3F:"
        "68:25:B4:F1:E0:5B:BF:A5:96:70:DC:74:32:30",
        "a=setup:passive",
        "a=rtcp-mux",
        "a=rtcp-rsize",
    ]
    lines = [
        "v=0",
        "o=- 1356229318227003419 0 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        "a=ice-options:trickle",
        "a=group:BUNDLE 0 1",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
    ] + transport + [
        "a=mid:0",
        "a=sendonly",
        "a=rtpmap:111 OPUS/48000/2",
        "a=rtcp-fb:111 transport-cc",
        "a=fmtp:111 sprop-stereo=0;sprop-maxcapturerate=48000",
        "a=ssrc:3380422612 msid:webrtcsink audio_0",
        "a=ssrc:3380422612 cname:webrtcsink",
        "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
        "a=msid:webrtcsink audio_0",
        "m=video 9 UDP/TLS/RTP/SAVPF 96 97",
    ] + transport + [
        "a=mid:1",
        "a=sendonly",
        "a=rtpmap:96 VP8/90000",
        "a=rtcp-fb:96 nack",
        "a=rtcp-fb:96 nack pli",
        "a=rtcp-fb:96 ccm fir",
        "a=rtcp-fb:96 transport-cc",
        "a=rtpmap:97 rtx/90000",
        "a=fmtp:97 apt=96",
        "a=ssrc-group:FID 2146917046 1528416341",
        "a=ssrc:2146917046 msid:webrtcsink video_0",
        "a=ssrc:2146917046 cname:webrtcsink",
        "a=ssrc:1528416341 msid:webrtcsink video_0",
        "a=ssrc:1528416341 cname:webrtcsink",
        "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
        "a=msid:webrtcsink video_0",
    ]
    return "\r\n".join(lines) + "\r\n"


OFFER = _offer()
ANSWER = _answer()
#: The producer's candidates (for the bundled first section): a host and a
#: server-reflexive one, as a producer behind a NAT gathers them.
CANDIDATES = (
    "candidate:1 1 UDP 2122252543 192.168.1.20 50734 typ host",
    "candidate:2 1 UDP 1686052863 203.0.113.7 50734 typ srflx raddr 192.168.1.20 rport 50734",
)
OFFER_BYTES = OFFER.encode("ascii")
#: What a ``201`` must hold: the producer's answer, its candidates, and the
#: end of them.
ANSWER_MARK = b"a=ice-ufrag:zP4kSx9QbVg2Lw7H"
CANDIDATE_LINES = tuple(("a=" + c).encode("ascii") for c in CANDIDATES)
END_OF_CANDIDATES = b"a=end-of-candidates"

_SDP = "application/sdp"
_ANSWER_JSON = json.dumps({"type": "answer", "sdp": ANSWER}, separators=(",", ":"))
_ICE_JSON = [
    json.dumps({"candidate": c, "sdpMLineIndex": 0}, separators=(",", ":"))
    for c in CANDIDATES + ("",)
]
_OFFER_JSON = json.dumps(OFFER)


def whep_path(name):
    """:returns: the WHEP resource of the producer called ``name``."""
    return words.WHEP_PREFIX + quote(name, safe="")


def _peer(session_id, key, inner):
    return '{"type":"peer","sessionId":' + json.dumps(session_id) + ',"' + key + '":' + inner + "}"


class BenchProducer:
    """
    A producer of the bench: answers every ``startSession`` at once, in one
    write (answer, two candidates, and the empty one when ``end_marker``),
    and counts the sessions.

    :ivar started: sessions started with it.
    :ivar ended: sessions that ended (``endSession`` received).
    :ivar errors: what went wrong (an offer that arrived changed, an
        ``error`` message).
    """

    def __init__(self, connection, peer_id, name, end_marker, loop):
        self.connection = connection
        self.peer_id = peer_id
        self.name = name
        self._ice = _ICE_JSON if end_marker else _ICE_JSON[:-1]
        self._loop = loop
        self.started = 0
        self.ended = 0
        self.open = set()
        self.errors = Failures()
        self._drained = None
        connection.set_handler(self.on_message)

    def on_message(self, payload, opcode):
        message = _json_message(payload.decode("utf-8", "replace"))
        kind = message.get("type")
        if kind == "startSession":
            session_id = message.get("sessionId")
            self.started += 1
            self.open.add(session_id)
            if message.get("offer") != OFFER:
                self.errors.add("a producer received an offer other than the viewer's")
            send = self.connection.send_text
            send(_peer(session_id, "sdp", _ANSWER_JSON))
            for ice in self._ice:
                send(_peer(session_id, "ice", ice))
        elif kind == "endSession":
            session_id = message.get("sessionId")
            if session_id in self.open:
                self.open.discard(session_id)
                self.ended += 1
            else:
                self.errors.add("endSession of a session the producer did not have")
            if not self.open and self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
        elif kind == "error":
            self.errors.add(f"a producer was sent an error: {message.get('details')!r}"[:120])

    async def drained(self, timeout):
        """Wait (at most ``timeout`` seconds) until every session it had ended."""
        if not self.open:
            return
        self._drained = self._loop.create_future()
        try:
            await asyncio.wait_for(self._drained, timeout)
        except TimeoutError:
            self.errors.add(f"{len(self.open)} session(s) never ended at a producer")


async def _open_producers(spec, control):
    """:returns: this process's share of the ``spec["producers"]`` producers."""
    loop = asyncio.get_running_loop()
    timeout = spec["timeout"]

    async def one(index):
        name = make_uid(spec, "p", index)
        meta = {"name": name}
        connection, peer_id = await control.producer(timeout, node=index, meta=meta)
        return BenchProducer(connection, peer_id, name, spec.get("end_marker", True), loop)

    return await asyncio.gather(*(one(i) for i in mine(spec["producers"], spec)))


async def _ready(spec, control, info):
    """
    Open the producers, report them (and ``info``) to the parent; :returns:
    ``(producers, start_at, {name: peer id} of every process's producers)``.
    """
    try:
        producers = await _open_producers(spec, control)
        reason = None
    except FAILURES as e:
        producers, reason = [], describe(e)
    answer = await control.sync(
        "ready",
        dict(info, producers={p.name: p.peer_id for p in producers}, reason=reason),
    )
    return producers, answer["start_at"], answer["producers"]


async def _finish(spec, control, producers, info, start_at, cpu_start):
    """
    Once every process's viewers are done: wait until each producer's
    sessions ended, close them; :returns: ``info`` with the producers'
    counts, and this process's CPU time and wall time from the start until
    every process was done (its producers served the others' viewers).
    """
    await control.sync("done", None)
    info = dict(info, cpu=cpu_seconds() - cpu_start, wall=max(now() - start_at, 1e-9))
    timeout = spec["timeout"]
    await asyncio.gather(*(p.drained(timeout) for p in producers))
    errors = Failures()
    for producer in producers:
        errors.count += producer.errors.count
        errors.reasons.extend(producer.errors.reasons)
    await control.close_all([p.connection for p in producers], timeout)
    return dict(
        info,
        producer_started=sum(p.started for p in producers),
        producer_ended=sum(p.ended for p in producers),
        producer_errors=errors.count,
        producer_reasons=errors.reasons[:5],
    )


def _source(spec, worker, count):
    """
    :returns: the local address of set-up ``count`` of worker ``worker``, or
        None (the kernel's choice): the workers take the addresses in turn,
        each set-up the next, as each viewer is a client of its own.
    """
    hosts = spec.get("source_hosts") or [None]
    return hosts[(worker + count * spec["workers_per_target"]) % len(hosts)]


async def whep_viewer(endpoint, name, timeout, source_host=None):
    """
    One WHEP viewer: connect, ``POST`` the offer, check the ``201``,
    ``DELETE`` the session, close.

    :returns: ``(connect to 201, POST sent to 201)`` in seconds.
    :raises ProtocolFailure: for an answer other than the producer's.
    """
    started = now()
    connection = await HttpConnection.open(endpoint, timeout, source_host)
    try:
        posted = now()
        response = await connection.request(
            "POST", whep_path(name), OFFER_BYTES, [("Content-Type", _SDP)], timeout
        )
        answered = now()
        if response.status != 201:
            raise ProtocolFailure(
                f"POST answered {response.status}: {response.body[:60].decode('latin-1')!r}"
            )
        body = response.body
        location = response.headers.get("location")
        if not location:
            raise ProtocolFailure("the 201 has no Location")
        whole = (
            response.headers.get("content-type") == _SDP
            and ANSWER_MARK in body
            and all(line in body for line in CANDIDATE_LINES)
            and END_OF_CANDIDATES in body
        )
        # The session ends either way, as a viewer that cannot use the
        # answer ends it.
        response = await connection.request("DELETE", location, timeout=timeout)
        if not whole:
            raise ProtocolFailure(f"the 201 does not hold the producer's answer: {body[:60]!r}")
        if response.status != 200:
            raise ProtocolFailure(f"DELETE answered {response.status}")
        return answered - started, answered - posted
    finally:
        connection.close()


async def json_consumer(control, peer_id, timeout, end_marker, source_host=None, node=None):
    """
    One JSON consumer: connect, be welcomed, ``startSession`` with the
    offer, receive the producer's answer and candidates, end, close.

    :returns: seconds from the start to: the welcome, the answer, the last
        candidate (the end marker, when the producer sends one); and from
        ``startSession`` sent to the answer.
    """
    started = now()
    connection, _ = await control.welcomed(timeout, source_host, node)
    try:
        welcomed = now()
        connection.send_text(
            '{"type":"startSession","peerId":' + json.dumps(peer_id) + ',"offer":' + _OFFER_JSON + "}"
        )
        session_id = answered = None
        expected = len(CANDIDATES) + (1 if end_marker else 0)
        candidates = 0
        while candidates < expected:
            message = _json_message(await connection.recv_text(timeout))
            kind = message.get("type")
            if kind == "sessionStarted":
                session_id = message.get("sessionId")
            elif kind == "peer" and message.get("sessionId") == session_id:
                if "sdp" in message:
                    if message["sdp"].get("sdp") != ANSWER:
                        raise ProtocolFailure("the consumer received an answer not the producer's")
                    answered = now()
                elif "ice" in message and answered is not None:
                    candidates += 1
            else:
                raise ProtocolFailure(f"the consumer received {str(message)[:60]!r}")
        complete = now()
        connection.send_text('{"type":"endSession","sessionId":' + json.dumps(session_id) + "}")
        return welcomed - started, answered - started, complete - started, answered - welcomed
    finally:
        await control.close_all([connection], timeout)
        control.connections.discard(connection)


async def whep_setup(spec, control, viewer="whep"):
    """
    C viewers (``spec["workers_per_target"]``), each one set-up after
    another until the duration is over, against the producers of every
    process in turn.

    :param viewer: ``"whep"``: WHEP viewers (the set-up time runs from the
        connect to the ``201``, its second part from the ``POST``);
        ``"json"``: JSON consumers doing the same (from the connect to the
        answer, its second part from ``startSession``).
    """
    timeout = spec["timeout"]
    end_marker = spec.get("end_marker", True)
    workers = list(mine(spec["workers_per_target"], spec))
    producers, start_at, ids = await _ready(spec, control, {"workers": len(workers)})
    names = sorted(ids)
    deadline = start_at + spec["duration"]
    setup_times = array("d")
    post_times = array("d")
    failures = Failures()
    ends = []

    async def worker(index):
        count = consecutive = 0
        endpoint = control.endpoints[index % control.nodes]
        while now() < deadline and consecutive < MAX_CONSECUTIVE_FAILURES and names:
            name = names[(index + count) % len(names)]
            source = _source(spec, index, count)
            count += 1
            try:
                if viewer == "json":
                    _, took, _, post = await json_consumer(
                        control, ids[name], timeout, end_marker, source, index % control.nodes
                    )
                else:
                    took, post = await whep_viewer(endpoint, name, timeout, source)
            except FAILURES as e:
                consecutive += 1
                failures.add(describe(e))
                continue
            consecutive = 0
            setup_times.append(took)
            post_times.append(post)
            ends.append(now())

    await sleep_until(start_at)
    cpu_start = cpu_seconds()
    await asyncio.gather(*(worker(i) for i in workers))
    return await _finish(spec, control, producers, {
        "setups": len(setup_times),
        "samples": setup_times,
        "post_samples": post_times,
        "failures": failures.count,
        "reasons": failures.reasons,
        "last_end": max(ends) if ends else None,
    }, start_at, cpu_start)  # fmt: skip


async def whep_latency(spec, control):
    """
    ``spec["workers_per_target"]`` workers (1 by default: one set-up at a
    time), each alternating a JSON consumer's set-up and a WHEP viewer's
    against one producer after another, the JSON one first in every other
    pair; the first pair of each worker warms up and is not counted.
    """
    timeout = spec["timeout"]
    end_marker = spec.get("end_marker", True)
    workers = list(mine(spec["workers_per_target"], spec))
    producers, start_at, ids = await _ready(spec, control, {"workers": len(workers)})
    names = sorted(ids)
    deadline = start_at + spec["duration"]
    kinds = ("json", "whep", "json_welcome", "json_after_welcome", "json_complete", "whep_post")
    samples = {kind: array("d") for kind in kinds}
    added = array("d")
    failures = Failures()
    sessions = 0

    async def worker(index):
        nonlocal sessions
        endpoint = control.endpoints[index % control.nodes]
        node = index % control.nodes
        pair = consecutive = 0
        while now() < deadline and consecutive < MAX_CONSECUTIVE_FAILURES and names:
            name = names[(index + pair) % len(names)]
            # The JSON consumer and the WHEP viewer of a pair from one address.
            source = _source(spec, index, pair)
            got = {}
            try:
                for kind in ("json", "whep") if pair % 2 == 0 else ("whep", "json"):
                    if kind == "json":
                        welcome, answer, complete, after = await json_consumer(
                            control, ids[name], timeout, end_marker, source, node
                        )
                        got.update(
                            json=answer, json_welcome=welcome, json_complete=complete,
                            json_after_welcome=after,
                        )  # fmt: skip
                    else:
                        got["whep"], got["whep_post"] = await whep_viewer(
                            endpoint, name, timeout, source
                        )
                    sessions += 1
            except FAILURES as e:
                consecutive += 1
                failures.add(describe(e))
                pair += 1
                continue
            consecutive = 0
            if pair > 0:
                for kind in kinds:
                    samples[kind].append(got[kind])
                added.append(got["whep"] - got["json"])
            pair += 1

    await sleep_until(start_at)
    cpu_start = cpu_seconds()
    await asyncio.gather(*(worker(i) for i in workers))
    return await _finish(spec, control, producers, {
        "pairs": len(added),
        #: Set-ups made, of either kind, the warm-up pairs' too.
        "sessions": sessions,
        "samples": samples,
        "added": added,
        "failures": failures.count,
        "reasons": failures.reasons,
    }, start_at, cpu_start)  # fmt: skip


async def json_consumer_setup(spec, control):
    """:func:`whep_setup` with JSON consumers in place of the WHEP viewers."""
    return await whep_setup(spec, control, viewer="json")


def median_ms(samples):
    """:returns: the median of ``samples`` (seconds) in milliseconds, or None."""
    return statistics.median(samples) * 1000 if samples else None


SCENARIOS = {
    "whep-setup": whep_setup,
    "json-consumer-setup": json_consumer_setup,
    "whep-latency": whep_latency,
}

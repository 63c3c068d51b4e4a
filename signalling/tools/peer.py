"""
``signalling-peer``: a real WebRTC endpoint (aiortc) for testing a signalling
server deployment end to end from a terminal.

It registers with ``HELLO`` and then, like ``signalling-client``, calls a
peer (``--call UID``; with ``--offer-request`` the callee makes the offer),
joins a room and calls every member already there (``--room ROOM_ID``), or
waits to be called. Every call sends a moving colour-bar test pattern,
opens a data channel (the offerer creates it) and greets the other side on
it, and receives the other side's video. It prints the call's progress, the
ICE and connection states, and statistics of the media received (frames
decoded, RTP packets, bytes).

Negotiation follows the conventions of GStreamer's webrtc examples:
``{"sdp": {"type": ..., "sdp": ...}}`` and trickled ``{"ice": {"candidate":
..., "sdpMLineIndex": N}}``. aiortc gathers its candidates before it can
give a description, so this tool takes them out of its SDP and sends them
as ``ice`` messages, which is what browsers and ``webrtcbin`` do.

aiortc runs on asyncio, so this tool does too, with the ``websockets``
library for the signalling connection (install with the ``peer`` extra:
``pip install 'webrtcbin-signalling[peer]'``). ICE gathers host candidates only
unless ``--stun``/``--turn`` are given.

With ``--json`` every line on stdout is a JSON object with the same events
as ``contrib/gst_peer.py`` prints (``registered``, ``session``, ``room``,
``peer-joined``, ``peer-left``, ``offer-sent``, ``answer-received``,
``local-candidate``, ``remote-candidate``, ``ice-connection-state``, ``connection-state``,
``data-channel-open``, ``data``, ``media``, ``call-closed``,
``session-ended``, ``error``, ``exit``), for scripts and tests.
"""

import argparse
import asyncio
import json
import secrets
import signal
import ssl
import sys
import textwrap
from fractions import Fraction

from signalling.core import words
from signalling.core.words import (
    EXIT_CLOSED,
    EXIT_CONNECT,
    EXIT_GAVE_UP,
    EXIT_INTERNAL,
    EXIT_NEGOTIATION,
    EXIT_OK,
    EXIT_SERVER_ERROR,
    EXIT_TLS,
    EXIT_USAGE,
)

PROG = "signalling-peer"
DEFAULT_URL = "wss://localhost:8443"
DEFAULT_UID_PREFIX = "peer-"
#: Seconds the connection and the WebSocket handshake may take.
CONNECT_TIMEOUT = 10.0
#: Seconds the closing handshake may take.
CLOSE_TIMEOUT = 3.0
#: Seconds between two media statistics lines of one call.
STATS_INTERVAL = 1.0
#: The label of the data channel the offerer opens.
CHANNEL_LABEL = "chat"

#: The test pattern: size and rate.
WIDTH, HEIGHT, FPS = 320, 240, 15
#: RTP video clock rate.
VIDEO_CLOCK = 90000

#: Colour bars in Y'CbCr (BT.601): white, yellow, cyan, green, magenta, red,
#: blue, black.
BARS = (
    (235, 128, 128),
    (210, 16, 146),
    (170, 166, 16),
    (145, 54, 34),
    (106, 202, 222),
    (81, 90, 240),
    (41, 240, 110),
    (16, 128, 128),
)

EXIT_STATUSES = (
    (EXIT_OK, "done: --frames arrived, --duration passed, the session ended, or Ctrl-C"),
    (EXIT_INTERNAL, "internal error (with a traceback), or aiortc is not installed"),
    (EXIT_USAGE, "bad command line, or a --ca-file that cannot be used"),
    (EXIT_CONNECT, "cannot connect, or the WebSocket handshake failed"),
    (EXIT_TLS, "TLS failure, e.g. a certificate that cannot be verified"),
    (EXIT_SERVER_ERROR, "the server answered ERROR (uid taken, peer not found or busy, ...)"),
    (EXIT_CLOSED, "the connection closed unexpectedly"),
    (EXIT_GAVE_UP, "gave up: --timeout passed before --frames arrived"),
    (EXIT_NEGOTIATION, "the remote peer's offer or answer could not be used"),
)


class Done(Exception):
    """Ends the run with an exit status (and maybe a message for stderr)."""

    def __init__(self, status, message=None):
        super().__init__(message)
        self.status = status
        self.message = message


# Output.


class Output:
    """
    Prints events: one JSON object a line (``--json``), or sentences.

    Errors go to stderr as ``signalling-peer: ...`` in sentence mode.
    """

    def __init__(self, as_json, stream=None, errors=None):
        self.as_json = as_json
        self.stream = stream or sys.stdout
        self.errors = errors or sys.stderr

    def __call__(self, event, **fields):
        if self.as_json:
            print(json.dumps({"event": event, **fields}), file=self.stream, flush=True)
            return
        text = describe(event, fields)
        if text is None:
            return
        if event == "error":
            print(f"{PROG}: {text}", file=self.errors, flush=True)
        else:
            print(text, file=self.stream, flush=True)


def _who(peer):
    return "the caller" if peer is None else f"{peer!r}"


def _count(number, noun):
    return f"{number} {noun}" + ("" if number == 1 else "s")


def describe(event, fields):
    """:returns: the sentence for one event, or None to say nothing."""
    peer = fields.get("peer")
    if event == "registered":
        return f"Our uid is {fields['uid']!r}"
    if event == "session":
        return f"Session with {_who(peer)} started"
    if event == "room":
        members = fields["members"]
        listed = "members: " + " ".join(members) if members else "no other members"
        return f"Joined room {fields['room']!r}; {listed}"
    if event == "peer-joined":
        return f"Peer {peer!r} joined"
    if event == "peer-left":
        return f"Peer {peer!r} left"
    if event in ("offer-sent", "answer-sent", "offer-request-sent"):
        what = event[: -len("-sent")].replace("-", " ")
        return f"Sent an {what} to {_who(peer)}"
    if event in ("offer-received", "answer-received", "offer-request-received"):
        what = event[: -len("-received")].replace("-", " ")
        return f"Received an {what} from {_who(peer)}"
    if event in ("local-candidate", "remote-candidate"):
        return None
    if event == "ice-connection-state":
        return f"ICE connection with {_who(peer)}: {fields['state']}"
    if event == "connection-state":
        return f"Connection with {_who(peer)}: {fields['state']}"
    if event == "data-channel-open":
        return f"Data channel {fields['label']!r} with {_who(peer)} open"
    if event == "data":
        return f"Message from {_who(peer)}: {fields['message']}"
    if event == "media":
        return (
            f"{fields['kind'].capitalize()} from {_who(peer)}: "
            f"{_count(fields['frames'], 'frame')}, {_count(fields['packets'], 'packet')}, "
            f"{_count(fields['bytes'], 'byte')}"
        )
    if event == "call-closed":
        return f"Call with {_who(peer)} closed"
    if event == "session-ended":
        return "Session ended"
    if event == "error":
        return fields["message"]
    if event == "exit":
        return None
    return f"{event}: {fields}"


# SDP helpers.


def split_candidates(sdp):
    """
    Take the candidates out of an SDP text, for trickling.

    :returns: ``(sdp, candidates)``: the SDP without its ``a=candidate`` and
        ``a=end-of-candidates`` lines, and a list of ``ice`` objects
        (``candidate``, ``sdpMLineIndex``, ``sdpMid``), each candidate once,
        with the first media section it appears in.
    """
    kept, candidates, seen = [], [], set()
    index, mid = -1, None
    for line in sdp.splitlines():
        if line.startswith("m="):
            index, mid = index + 1, None
        elif line.startswith("a=mid:"):
            mid = line[len("a=mid:"):]
            for candidate in candidates:
                if candidate["sdpMLineIndex"] == index and candidate["sdpMid"] is None:
                    candidate["sdpMid"] = mid
        if line.startswith("a=candidate:"):
            value = line[2:]
            if value not in seen:
                seen.add(value)
                candidates.append({"candidate": value, "sdpMLineIndex": index, "sdpMid": mid})
            continue
        if line == "a=end-of-candidates":
            continue
        kept.append(line)
    return "\r\n".join(kept) + "\r\n", candidates


# Media.


def _bars_row(width, bars, shift, channel):
    """One row of a plane: the bars' ``channel`` component, rotated by ``shift``."""
    row = bytearray(width)
    for x in range(width):
        row[x] = bars[((x + shift) * len(bars) // width) % len(bars)][channel]
    return bytes(row)


def make_pattern_planes(width=WIDTH, height=HEIGHT, steps=16):
    """
    :returns: ``steps`` pictures of colour bars, each shifted a little more
        to the left, as ``(y, u, v)`` rows: bytes of one row of each plane
        (every row of a plane is the same).
    """
    pictures = []
    for step in range(steps):
        shift = step * width // steps
        pictures.append(
            (
                _bars_row(width, BARS, shift, 0),
                _bars_row(width // 2, BARS, shift // 2, 1),
                _bars_row(width // 2, BARS, shift // 2, 2),
            )
        )
    return pictures


def test_pattern_track():
    """
    :returns: an aiortc video track that produces moving colour bars at
        :data:`FPS` frames a second.
    """
    import av
    from aiortc import VideoStreamTrack
    from aiortc.mediastreams import MediaStreamError

    pictures = make_pattern_planes()

    class TestPatternTrack(VideoStreamTrack):
        def __init__(self):
            super().__init__()
            self._count = 0
            self._started = None

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            loop = asyncio.get_running_loop()
            if self._started is None:
                self._started = loop.time()
            else:
                wait = self._started + self._count / FPS - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            frame = av.VideoFrame(width=WIDTH, height=HEIGHT, format="yuv420p")
            rows = pictures[self._count % len(pictures)]
            for plane, row in zip(frame.planes, rows):
                padding = bytes(plane.line_size - len(row))
                plane.update((row + padding) * (plane.buffer_size // plane.line_size))
            frame.pts = self._count * (VIDEO_CLOCK // FPS)
            frame.time_base = Fraction(1, VIDEO_CLOCK)
            self._count += 1
            return frame

    return TestPatternTrack()


# Calls.

#: aiortc's own DTLS cipher suites (ECDSA only, for its ECDSA certificate),
#: then the same with RSA: GStreamer before 1.24 has an RSA certificate, and
#: when it is the DTLS server an ECDSA-only client finds "no shared cipher".
DTLS_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:"
    b"ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:"
    b"ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-CHACHA20-POLY1305:"
    b"ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA"
)


def accept_rsa_dtls_servers():
    """
    Let aiortc's DTLS client accept a server with an RSA certificate
    (GStreamer 1.22's ``webrtcbin``, for one), by adding RSA key exchange
    suites to the cipher list aiortc sets. Our own certificate stays
    aiortc's ECDSA one; the peer's is still checked against the SDP
    fingerprint. Does nothing if aiortc no longer has the hook.
    """
    from aiortc.rtcdtlstransport import RTCCertificate

    original = getattr(RTCCertificate, "_create_ssl_context", None)
    if original is None or getattr(original, "accepts_rsa", False):
        return

    def create_ssl_context(self, *args, **kwargs):
        context = original(self, *args, **kwargs)
        context.set_cipher_list(DTLS_CIPHERS)
        return context

    create_ssl_context.accepts_rsa = True
    RTCCertificate._create_ssl_context = create_ssl_context


class Call:
    """
    One WebRTC call with one remote peer: an aiortc ``RTCPeerConnection``
    sending the test pattern, with a data channel.

    :param run: the :class:`PeerRun` it belongs to.
    :param remote: the remote uid, or None for the unnamed session caller.
    :param send: a coroutine function sending a JSON-able dict to the remote.
    :param offerer: True to make the offer and open the data channel.
    """

    def __init__(self, run, remote, send, offerer):
        from aiortc import RTCConfiguration, RTCPeerConnection

        self.run = run
        self.out = run.out
        self.remote = remote
        self._send = send
        self.offerer = offerer
        self.closed = False
        self.frames = 0
        self._reported = None
        self._tasks = set()
        # An empty list, not None: aiortc's default is a public STUN server.
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=run.ice_servers))
        self.pc.addTrack(test_pattern_track())
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._watch_channel)
        self.pc.on("iceconnectionstatechange", self._on_ice_state)
        self.pc.on("connectionstatechange", self._on_connection_state)
        if offerer:
            self._watch_channel(self.pc.createDataChannel(CHANNEL_LABEL))
        self._spawn(self._report_stats_every_interval())

    def _spawn(self, coroutine):
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # Negotiation.

    async def offer(self):
        """Make the offer and send it, then our candidates."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        await self._send_local_description()

    async def remote_description(self, kind, sdp):
        """Apply the remote ``offer`` (and answer it) or ``answer``."""
        from aiortc import RTCSessionDescription

        self.out(f"{kind}-received", peer=self.remote)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        if kind == "offer":
            await self.pc.setLocalDescription(await self.pc.createAnswer())
            await self._send_local_description()

    async def _send_local_description(self):
        description = self.pc.localDescription
        sdp, candidates = split_candidates(description.sdp)
        await self._send({"sdp": {"type": description.type, "sdp": sdp}})
        self.out(f"{description.type}-sent", peer=self.remote)
        for ice in candidates:
            self.out("local-candidate", peer=self.remote, candidate=ice["candidate"])
            await self._send({"ice": ice})

    async def remote_candidate(self, ice):
        """Add a trickled candidate from the remote peer."""
        from aiortc.sdp import candidate_from_sdp

        text = ice.get("candidate") or ""
        if text.startswith("candidate:"):
            text = text[len("candidate:"):]
        if not text.strip():
            return  # end of candidates
        self.out("remote-candidate", peer=self.remote, candidate=ice.get("candidate"))
        candidate = candidate_from_sdp(text)
        candidate.sdpMid = ice.get("sdpMid")
        index = ice.get("sdpMLineIndex")
        candidate.sdpMLineIndex = int(index) if index is not None else None
        if candidate.sdpMid is None and candidate.sdpMLineIndex is None:
            candidate.sdpMLineIndex = 0
        await self.pc.addIceCandidate(candidate)

    # State.

    def _on_ice_state(self):
        self.out("ice-connection-state", peer=self.remote, state=self.pc.iceConnectionState)

    def _on_connection_state(self):
        self.out("connection-state", peer=self.remote, state=self.pc.connectionState)

    # Data channel.

    def _watch_channel(self, channel):
        def opened():
            self.out("data-channel-open", peer=self.remote, label=channel.label)
            channel.send(f"hello from {self.run.uid}")

        def message(data):
            if isinstance(data, bytes):
                data = data.hex()
            self.out("data", peer=self.remote, message=data)

        channel.on("message", message)
        if channel.readyState == "open":
            opened()
        else:
            channel.on("open", opened)

    # Received media.

    def _on_track(self, track):
        if track.kind == "video":
            self._spawn(self._receive(track))

    async def _receive(self, track):
        from aiortc.mediastreams import MediaStreamError

        while not self.closed:
            try:
                await track.recv()
            except MediaStreamError:
                return
            self.frames += 1
            if self.frames == 1:
                await self.report_stats()
            self.run.frames_received()

    async def report_stats(self):
        """Print a ``media`` line if more frames arrived since the last one."""
        if self.closed or not self.frames or self._reported == self.frames:
            return
        self._reported = self.frames
        packets = size = 0
        report = await self.pc.getStats()
        for stats in report.values():
            if stats.type == "inbound-rtp" and stats.kind == "video":
                packets += stats.packetsReceived
            elif stats.type == "transport":
                size += stats.bytesReceived
        self.out(
            "media", peer=self.remote, kind="video", frames=self.frames, packets=packets,
            bytes=size,
        )

    async def _report_stats_every_interval(self):
        while not self.closed:
            await asyncio.sleep(STATS_INTERVAL)
            await self.report_stats()

    # The end.

    async def close(self):
        """Close the peer connection; nothing is sent to the remote."""
        if self.closed:
            return
        await self.report_stats()
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        await self.pc.close()
        self.out("call-closed", peer=self.remote)


# The signalling side.


class PeerRun:
    """
    One run of the tool: the WebSocket to the server, the protocol state,
    and the calls.

    :param options: the parsed command line.
    :param out: an :class:`Output`.
    """

    def __init__(self, options, out):
        from aiortc import RTCIceServer

        self.options = options
        self.out = out
        self.uid = options.id
        self.ice_servers = []
        if options.stun:
            self.ice_servers.append(RTCIceServer(options.stun))
        if options.turn:
            self.ice_servers.append(
                RTCIceServer(options.turn, username=options.turn_user,
                             credential=options.turn_password)
            )
        accept_rsa_dtls_servers()
        self.ws = None
        #: registering, calling, waiting, session, joining, room
        self.state = "connecting"
        self.calls = {}
        self._finished = None

    def finish(self, status, message=None):
        """End the run with ``status`` (the first call wins)."""
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(Done(status, message))

    async def run(self):
        """:returns: the :class:`Done` that ended the run."""
        import websockets
        from websockets.asyncio.client import connect

        loop = asyncio.get_running_loop()
        self._finished = loop.create_future()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.finish, EXIT_OK)
        if self.options.duration is not None:
            loop.call_later(self.options.duration, self.finish, EXIT_OK)
        if self.options.timeout is not None:
            loop.call_later(
                self.options.timeout, self.finish, EXIT_GAVE_UP,
                f"gave up after {self.options.timeout:g} s",
            )
        try:
            self.ws = await connect(
                self.options.url,
                ssl=self.options.ssl_context,
                open_timeout=CONNECT_TIMEOUT,
                close_timeout=CLOSE_TIMEOUT,
                max_size=None,
            )
        except ssl.SSLError as e:
            return Done(EXIT_TLS, f"TLS failure with {self.options.url}: {e}")
        except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException) as e:
            if isinstance(e.__cause__, ssl.SSLError) or isinstance(e, ssl.SSLError):
                return Done(EXIT_TLS, f"TLS failure with {self.options.url}: {e}")
            return Done(EXIT_CONNECT, f"cannot connect to {self.options.url}: {e}")
        reader = asyncio.ensure_future(self._read())
        try:
            await self.begin()
            done = await self._finished
        finally:
            reader.cancel()
            for call in list(self.calls.values()):
                await call.close()
            self.calls.clear()
            await self.ws.close()
        return done

    async def _read(self):
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    self.out("error", message="ignored a binary message")
                    continue
                try:
                    await self._handle(message)
                except Exception as e:  # a bad message costs only that message
                    self.out("error", message=f"cannot handle {message[:80]!r}: {e!r}")
        except ConnectionClosed:
            pass
        code = self.ws.close_code
        if self.state == "session" and code == 1000:
            self.out("session-ended")
            self.finish(EXIT_OK)
        else:
            self.finish(EXIT_CLOSED, f"the server closed the connection ({code})")

    # The protocol.

    async def begin(self):
        """The WebSocket is open: register."""
        self.state = "registering"
        await self.ws.send(words.hello(self.uid))

    async def send_text(self, text):
        await self.ws.send(text)

    async def _handle(self, text):
        state = self.state
        reply = words.parse_reply(text)
        if reply.word == words.ERROR and state != "session":
            if state in ("registering", "calling", "joining"):
                what = {
                    "registering": f"register as {self.uid!r}",
                    "calling": f"call {self.options.call!r}",
                    "joining": f"join room {self.options.room!r}",
                }[state]
                self.finish(EXIT_SERVER_ERROR, f"cannot {what}: {text}")
            else:
                self.out("error", message=text)
            return
        if state == "registering":
            if reply.word != words.HELLO:
                self.finish(EXIT_CLOSED, f"expected HELLO, got {text[:80]!r}")
                return
            self.out("registered", uid=self.uid)
            if self.options.call:
                self.state = "calling"
                await self.send_text(words.session(self.options.call))
            elif self.options.room:
                self.state = "joining"
                await self.send_text(words.room(self.options.room))
            else:
                self.state = "waiting"
        elif state == "calling":
            if reply.word != words.SESSION_OK:
                self.finish(EXIT_CLOSED, f"expected SESSION_OK, got {text[:80]!r}")
                return
            self.state = "session"
            self.out("session", peer=self.options.call)
            if self.options.offer_request:
                await self.send_text(words.OFFER_REQUEST)
                self.out("offer-request-sent", peer=self.options.call)
            else:
                call = self.calls[None] = Call(self, self.options.call, self._send_session, True)
                await call.offer()
        elif state in ("waiting", "session"):
            if state == "waiting":
                self.state = "session"
                self.out("session", peer=None)
            await self._negotiate(None, self.options.call, self._send_session, text)
        elif state == "joining":
            if reply.word != words.ROOM_OK:
                self.finish(EXIT_CLOSED, f"expected ROOM_OK, got {text[:80]!r}")
                return
            self.state = "room"
            members = reply.uids
            self.out("room", room=self.options.room, members=members)
            # By convention the newcomer makes the offers.
            for uid in members:
                call = self.calls[uid] = Call(self, uid, self._room_sender(uid), True)
                await call.offer()
        elif state == "room":
            await self._handle_room(text)

    async def _handle_room(self, text):
        reply = words.parse_reply(text)
        if reply.word == words.ROOM_PEER_JOINED:
            self.out("peer-joined", peer=reply.uid)
        elif reply.word == words.ROOM_PEER_LEFT:
            self.out("peer-left", peer=reply.uid)
            call = self.calls.pop(reply.uid, None)
            if call is not None:
                await call.close()
        elif reply.word == words.ROOM_PEER_MSG:
            uid = reply.uid
            await self._negotiate(uid, uid, self._room_sender(uid), reply.payload)
        elif reply.word == words.ERROR:
            self.out("error", message=text)
        elif reply.word != words.ROOM_PEER_LIST:
            self.out("error", message=f"unexpected message in the room: {text[:80]!r}")

    async def _negotiate(self, key, remote, send, payload):
        """Handle one negotiation message from ``remote``; ``key`` names its call."""
        call = self.calls.get(key)
        if payload.strip() == words.OFFER_REQUEST:
            self.out("offer-request-received", peer=remote)
            if call is not None:
                await call.close()
            call = self.calls[key] = Call(self, remote, send, True)
            await call.offer()
            return
        try:
            message = json.loads(payload)
        except ValueError:
            self.out("error", message=f"ignored a message that is not JSON: {payload[:80]!r}")
            return
        sdp = message.get("sdp") if isinstance(message, dict) else None
        ice = message.get("ice") if isinstance(message, dict) else None
        if isinstance(sdp, dict) and sdp.get("type") == "offer":
            if call is not None:
                await call.close()
            call = self.calls[key] = Call(self, remote, send, False)
            await self._apply(call, "offer", sdp.get("sdp", ""))
        elif isinstance(sdp, dict) and sdp.get("type") == "answer" and call is not None:
            await self._apply(call, "answer", sdp.get("sdp", ""))
        elif isinstance(ice, dict) and call is not None:
            await call.remote_candidate(ice)
        else:
            self.out("error", message=f"ignored an unexpected message: {payload[:80]!r}")

    async def _apply(self, call, kind, sdp):
        """
        Apply the remote ``offer`` or ``answer``. One that cannot be used
        ends the run at once: without it the call can never connect.
        """
        try:
            await call.remote_description(kind, sdp)
        except Exception as e:
            who = f"{call.remote!r}" if call.remote is not None else "the caller"
            self.finish(EXIT_NEGOTIATION, f"cannot use the {kind} from {who}: {e}")

    async def _send_session(self, message):
        if self.state == "session":
            await self.send_text(json.dumps(message))

    def _room_sender(self, uid):
        async def send(message):
            if self.state == "room" and uid in self.calls:
                await self.send_text(words.room_peer_msg(uid, json.dumps(message)))

        return send

    def frames_received(self):
        """Finish once every call has ``--frames`` video frames."""
        wanted = self.options.frames
        calls = list(self.calls.values())
        if wanted is not None and calls and all(c.frames >= wanted for c in calls):
            self.finish(EXIT_OK)


class JsonPeerRun(PeerRun):
    """
    A run in the JSON dialect (GStreamer's webrtcsink and webrtcsrc):
    welcomed with an id the server chooses, then a producer (``--produce``)
    that makes the offer for every consumer that starts a session, or a
    consumer (``--consume PEER_ID``, or ``first`` for the first producer
    the server lists or announces) that answers.
    """

    def __init__(self, options, out):
        super().__init__(options, out)
        #: The session the consumer is in, and its producer.
        self.session_id = None
        self.producer_id = None

    async def begin(self):
        self.state = "welcoming"
        if self.options.protocol_version:
            await self._send({"type": "setProtocolVersion", "version": self.options.protocol_version})

    async def _send(self, message):
        await self.send_text(json.dumps(message))

    async def _handle(self, text):
        message = json.loads(text)
        kind = message.get("type")
        state = self.state
        if kind == "error":
            if state in ("welcoming", "producing", "looking", "consuming"):
                self.finish(EXIT_SERVER_ERROR, f"the server refused: {message.get('details')}")
            else:
                self.out("error", message=message.get("details"))
        elif kind == "welcome":
            self.uid = message["peerId"]
            self.out("registered", uid=self.uid)
            self.state, messages = words.json_after_welcome(self.options, self.uid)
            if self.state == "consuming":
                self.out("calling", peer=self.options.consume)
            for first in messages:
                await self._send(first)
        elif kind in ("list", "peerStatusChanged") and state == "looking":
            ids = words.producers_in(message)
            if ids:
                self.state = "consuming"
                await self._start(ids[0])
        elif kind == "sessionStarted":
            self.session_id = message["sessionId"]
            self.producer_id = message["peerId"]
            self.state = "session"
            self.out("session", peer=self.producer_id)
        elif kind == "startSession":
            # A consumer asks this producer for a session: make the offer
            # (or answer the one it sent).
            session_id = message["sessionId"]
            self.out("session", peer=message["peerId"])
            offer = message.get("offer")
            call = self.calls[session_id] = Call(
                self, message["peerId"], self._peer_sender(session_id), offer is None
            )
            if offer is None:
                await call.offer()
            else:
                await self._apply(call, "offer", offer)
        elif kind == "peer":
            await self._peer(message)
        elif kind in ("endSession", "endSessionV1_1"):
            call = self.calls.pop(message["sessionId"], None)
            if call is not None:
                await call.close()
            self.out("session-ended")
            if not self.options.produce:
                self.finish(EXIT_OK)

    async def _start(self, producer_id):
        self.out("calling", peer=producer_id)
        await self._send({"type": "startSession", "peerId": producer_id})

    async def _peer(self, message):
        session_id = message["sessionId"]
        call = self.calls.get(session_id)
        sdp, ice = message.get("sdp"), message.get("ice")
        if sdp is not None and sdp.get("type") == "offer" and call is None:
            call = self.calls[session_id] = Call(
                self, self.producer_id, self._peer_sender(session_id), False
            )
        if call is None:
            self.out("error", message=f"a message for no call: {json.dumps(message)[:80]}")
        elif sdp is not None:
            await self._apply(call, sdp["type"], sdp["sdp"])
        elif ice is not None:
            await call.remote_candidate(ice)

    def _peer_sender(self, session_id):
        async def send(message):
            if session_id in self.calls:
                await self._send(words.json_peer(session_id, message))

        return send


# The command line.


def build_parser():
    statuses = "\n".join(f"  {code}  {text}" for code, text in EXIT_STATUSES)
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            A real WebRTC peer (aiortc) for testing a signalling server end to
            end: it registers, then calls a peer (--call), joins a room and
            calls every member (--room), or waits to be called. Each call sends
            a colour-bar test pattern and a data channel greeting, and the tool
            prints the connection states and the media it receives.
            """
        ),
        epilog="exit statuses:\n" + statuses,
    )
    parser.add_argument(
        "--url", "--server", dest="url", default=DEFAULT_URL,
        help="the server's WebSocket URL, ws:// or wss:// (default: %(default)s)",
    )
    parser.add_argument("--id", help=f"our uid (default: a random {DEFAULT_UID_PREFIX}XXXXXX)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--call", metavar="UID", help="start a session with this peer")
    mode.add_argument(
        "--room", metavar="ROOM_ID", help="join this room and call every member already there"
    )
    words.add_json_arguments(parser, mode, "")
    parser.add_argument(
        "--offer-request", action="store_true",
        help="with --call: ask the callee to make the offer (OFFER_REQUEST)",
    )
    parser.add_argument(
        "--frames", type=int, metavar="N",
        help="exit 0 once N video frames have arrived on every call",
    )
    parser.add_argument(
        "--duration", type=float, metavar="SECONDS", help="leave and exit 0 after SECONDS"
    )
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS",
        help=f"give up with exit status {EXIT_GAVE_UP} if not done after SECONDS",
    )
    parser.add_argument(
        "--ca-file", metavar="PEM", help="trust the certificate(s) in this PEM file"
    )
    parser.add_argument(
        "--insecure", action="store_true",
        help="do not verify the server's TLS certificate (for tests only)",
    )
    parser.add_argument("--stun", metavar="URL", help="a STUN server (stun:host:port); none by default")
    parser.add_argument("--turn", metavar="URL", help="a TURN server (turn:host:port)")
    parser.add_argument("--turn-user", metavar="NAME", help="the TURN user name")
    parser.add_argument("--turn-password", metavar="SECRET", help="the TURN password")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object a line (for scripts)"
    )
    return parser


def parse_args(argv=None):
    """
    Parse and check the command line.

    :returns: an ``argparse.Namespace``, with ``ssl_context`` added (None for
        ``ws://``).
    :raises SystemExit: with status 2 and a usage message on stderr.
    """
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.offer_request and not options.call:
        parser.error("--offer-request needs --call")
    words.check_json_arguments(parser, options)
    for name in ("frames", "duration", "timeout"):
        value = getattr(options, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} must be positive")
    if options.id is None:
        options.id = DEFAULT_UID_PREFIX + secrets.token_hex(3)
    secure = options.url.startswith("wss://")
    if not secure and not options.url.startswith("ws://"):
        parser.error(f"--url must start with ws:// or wss://, not {options.url!r}")
    if not secure and (options.ca_file or options.insecure):
        parser.error(f"--{'ca-file' if options.ca_file else 'insecure'} needs a wss:// URL")
    options.ssl_context = None
    if secure:
        try:
            options.ssl_context = ssl.create_default_context(cafile=options.ca_file)
        except (OSError, ssl.SSLError) as e:
            parser.error(f"--ca-file: cannot use {options.ca_file!r}: {e}")
        if options.insecure:
            options.ssl_context.check_hostname = False
            options.ssl_context.verify_mode = ssl.CERT_NONE
    return options


def main(argv=None):
    """
    The ``signalling-peer`` console script.

    :param argv: the arguments without the program name; ``sys.argv[1:]``
        when None.
    """
    options = parse_args(argv)
    out = Output(options.json)
    try:
        import aiortc  # noqa: F401
        import websockets  # noqa: F401
    except ImportError as e:
        out("error", message=f"{e}; install the peer extra: pip install 'webrtcbin-signalling[peer]'")
        raise SystemExit(EXIT_INTERNAL)
    run = (JsonPeerRun if options.protocol == "json" else PeerRun)(options, out)
    done = asyncio.run(run.run())
    if done.message:
        out("error", message=done.message)
    out("exit", status=done.status)
    if done.status != EXIT_OK:
        raise SystemExit(done.status)


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""
gst_peer.py: a GStreamer ``webrtcbin`` peer for the signalling server.

A real WebRTC endpoint that speaks the server's protocol (see
docs/protocol.md): it sends a VP8 ``videotestsrc`` picture, opens a data
channel and greets the other side on it, decodes whatever media arrives, and
prints what happens as one JSON object per line on stdout, so that a test (or
a person with ``jq``) can follow every call.

It runs under the system Python that has GStreamer's introspection data, not
in the project's virtual environment. On Debian::

    apt-get install python3-gi gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 \\
        gir1.2-gst-plugins-bad-1.0 gir1.2-soup-3.0 glib-networking \\
        gstreamer1.0-plugins-base gstreamer1.0-plugins-good \\
        gstreamer1.0-plugins-bad gstreamer1.0-nice

Modes (after ``HELLO``):

- ``--call UID``: ``SESSION UID``, then send the SDP offer; with
  ``--offer-request``, send ``OFFER_REQUEST`` instead and answer the offer
  the callee makes.
- ``--room ROOM_ID``: join the room and offer to every member already there
  (``ROOM_PEER_MSG``); answer the offers of members who join later; when a
  member leaves (``ROOM_PEER_LEFT``), tear down that member's call only.
- neither: wait to be called; answer an offer, or make one when the caller
  sends ``OFFER_REQUEST``.

``--check`` only checks that everything this program needs is installed.

Every call has its own pipeline (``videotestsrc ! vp8enc ! rtpvp8pay !
webrtcbin``), so a call ends without touching the others. ICE uses host
candidates only: no STUN or TURN server unless ``--stun``/``--turn`` is given,
no ICE-TCP, and libnice's UPnP port mapping (which sends multicast discovery)
is off.

Output lines (``peer`` is the remote uid, or null for the caller in a session
we were called into, whose uid the protocol does not tell)::

    {"event": "registered", "uid": "gst-1"}
    {"event": "session", "peer": "bob"}
    {"event": "room", "room": "demo", "members": ["a", "b"]}
    {"event": "peer-joined", "peer": "c"}
    {"event": "peer-left", "peer": "c"}
    {"event": "offer-sent", "peer": "bob"}          (also offer-received, answer-sent,
                                                    answer-received, offer-request-sent,
                                                    offer-request-received)
    {"event": "local-candidate", "peer": "bob", "candidate": "candidate:1 1 UDP ..."}
    {"event": "remote-candidate", "peer": "bob", "candidate": "candidate:..."}
    {"event": "ice-connection-state", "peer": "bob", "state": "connected"}
    {"event": "connection-state", "peer": "bob", "state": "connected"}
    {"event": "data-channel-open", "peer": "bob", "label": "chat"}
    {"event": "data", "peer": "bob", "message": "hello from bob"}
    {"event": "media", "peer": "bob", "kind": "video", "frames": 42, "bytes": 51234}
    {"event": "call-closed", "peer": "c"}
    {"event": "session-ended"}
    {"event": "error", "message": "..."}
    {"event": "exit", "status": 0}

``media`` lines come on the first decoded frame of each kind and then once a
second while more arrive: ``frames`` counts decoded frames (or audio buffers),
``bytes`` the RTP bytes received for that kind.

Exit statuses (as ``signalling-client``): 0 done (the session ended,
``--duration`` passed, SIGINT or SIGTERM), 1 internal error or missing
package, 2 bad command line, 3 cannot connect, 4 TLS failure, 5 the server
answered ``ERROR``, 6 the connection closed unexpectedly, 8 the other peer's
offer or answer could not be used (``signalling.core.words`` has the table).
"""

import argparse
import json
import os
import re
import secrets
import signal
import sys

# The protocol's words and the tools' exit statuses, shared with the server
# and signalling-client: a standard-library module of the checkout this file
# belongs to (the system Python has nothing else of the project).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from signalling.core import words  # noqa: E402
from signalling.core.words import (  # noqa: E402
    EXIT_CLOSED,
    EXIT_CONNECT,
    EXIT_INTERNAL,
    EXIT_NEGOTIATION,
    EXIT_OK,
    EXIT_SERVER_ERROR,
    EXIT_TLS,
    EXIT_USAGE,
)

#: The Debian packages this program needs, for the error message.
DEBIAN_PACKAGES = (
    "python3-gi gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 "
    "gir1.2-gst-plugins-bad-1.0 gir1.2-soup-3.0 glib-networking "
    "gstreamer1.0-plugins-base gstreamer1.0-plugins-good "
    "gstreamer1.0-plugins-bad gstreamer1.0-nice"
)

#: GStreamer elements every call needs.
ELEMENTS = ("webrtcbin", "nicesrc", "videotestsrc", "vp8enc", "rtpvp8pay", "decodebin")

#: The label of the data channel the offerer opens.
CHANNEL_LABEL = "chat"

#: Seconds the closing handshake may take when we leave.
CLOSE_TIMEOUT = 3

#: The sending half of every call's pipeline; ``{pt}`` is the RTP payload
#: type of VP8, ``{pattern}`` the videotestsrc pattern.
SEND_PIPELINE = (
    "webrtcbin name=webrtc bundle-policy=max-bundle latency=100 "
    "videotestsrc is-live=true pattern={pattern} horizontal-speed=2 "
    "! video/x-raw,width=320,height=240,framerate=15/1 "
    "! videoconvert ! queue max-size-buffers=2 leaky=downstream "
    "! vp8enc deadline=1 cpu-used=8 target-bitrate=300000 keyframe-max-dist=30 "
    "! rtpvp8pay pt={pt} picture-id-mode=15-bit "
    "! queue ! application/x-rtp,media=video,encoding-name=VP8,payload={pt} "
    "! webrtc."
)

#: Our usual payload type for VP8 when we make the offer.
DEFAULT_VP8_PT = 96


def emit(event, **fields):
    """Print one status line: a JSON object with ``event`` first."""
    print(json.dumps({"event": event, **fields}), flush=True)


def import_gi():
    """
    Import GStreamer, its WebRTC and SDP libraries, and libsoup through
    PyGObject.

    :returns: the ``(GLib, Gio, Gst, GstSdp, GstWebRTC, Soup)`` modules.
    :raises SystemExit: with a message naming the Debian packages when one is
        missing.
    """
    try:
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstSdp", "1.0")
        gi.require_version("GstWebRTC", "1.0")
        gi.require_version("Soup", "3.0")
        from gi.repository import Gio, GLib, Gst, GstSdp, GstWebRTC, Soup
    except (ImportError, ValueError) as e:
        sys.exit(f"gst_peer: {e}; install the Debian packages {DEBIAN_PACKAGES}")
    Gst.init(None)
    missing = [name for name in ELEMENTS if Gst.ElementFactory.find(name) is None]
    if missing:
        sys.exit(
            f"gst_peer: GStreamer elements missing: {', '.join(missing)}; "
            f"install the Debian packages {DEBIAN_PACKAGES}"
        )
    return GLib, Gio, Gst, GstSdp, GstWebRTC, Soup


def owned(obj):
    """
    Make sure ``obj``, a GObject read from a property, is not freed when
    Python drops it.

    webrtcbin 1.22 never sinks the floating reference of its ICE agent, so
    the Python wrapper sinks it and takes the only reference: dropping the
    wrapper would free the agent under webrtcbin (and crash). When the
    wrapper holds the only reference, give webrtcbin one of its own.

    :returns: ``obj``.
    """
    if obj.__grefcount__ == 1:
        import ctypes

        gobject = ctypes.CDLL("libgobject-2.0.so.0")
        gobject.g_object_ref.argtypes = [ctypes.c_void_p]
        gobject.g_object_ref.restype = ctypes.c_void_p
        get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
        get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        get_pointer.restype = ctypes.c_void_p
        gobject.g_object_ref(get_pointer(obj.__gpointer__, None))
    return obj


def vp8_payload_type(sdp):
    """
    :returns: the RTP payload type the SDP ``sdp`` (text) gives VP8 in its
        first video section, or None when it has none.
    """
    in_video = False
    for line in sdp.splitlines():
        if line.startswith("m="):
            if in_video:
                return None
            in_video = line.startswith("m=video")
        elif in_video:
            match = re.match(r"a=rtpmap:(\d+) VP8/90000", line, re.IGNORECASE)
            if match:
                return int(match.group(1))
    return None


class Call:
    """
    One WebRTC call with one remote peer: its own pipeline and ``webrtcbin``.

    Everything here runs on the GLib main loop; webrtcbin's signals, which
    come from its own threads, are handed over with ``GLib.idle_add``.

    :param peer: the :class:`Peer` that owns the call.
    :param remote: the remote uid (None for the unnamed session caller).
    :param send: called with a JSON-able dict to send to the remote peer.
    :param offerer: True to make the offer (and open the data channel).
    :param pt: the RTP payload type for our VP8 stream.
    """

    def __init__(self, peer, remote, send, offerer, pt=DEFAULT_VP8_PT):
        self.peer = peer
        self.remote = remote
        self._send = send
        self.offerer = offerer
        self.closed = False
        self._offered = False
        self._channels = []
        self._opened = []
        #: kind -> [frames, bytes]; written by streaming threads.
        self._stats = {}
        self._reported = {}
        self._ice_state = None
        self._connection_state = None
        gst = peer.Gst
        self.pipeline = gst.parse_launch(
            SEND_PIPELINE.format(pt=pt, pattern=peer.options.pattern)
        )
        self.webrtc = self.pipeline.get_by_name("webrtc")
        if peer.options.stun:
            self.webrtc.set_property("stun-server", peer.options.stun)
        if peer.options.turn:
            self.webrtc.set_property("turn-server", peer.options.turn)
        # Host candidates over UDP only, and no UPnP: libnice would otherwise
        # send SSDP discovery multicasts to map ports on a router.
        ice = owned(self.webrtc.get_property("ice-agent"))
        ice.set_property("ice-tcp", False)
        ice.get_property("agent").set_property("upnp", False)
        self._bus = self.pipeline.get_bus()
        self._bus.add_signal_watch()
        self._bus.connect("message::error", self._on_bus_error)
        self.webrtc.connect("on-negotiation-needed", self._on_negotiation_needed)
        self.webrtc.connect("on-ice-candidate", self._on_ice_candidate)
        self.webrtc.connect("on-data-channel", self._on_data_channel)
        self.webrtc.connect("pad-added", self._on_pad_added)
        self.webrtc.connect("notify::ice-connection-state", self._on_state)
        self.webrtc.connect("notify::connection-state", self._on_state)
        self.pipeline.set_state(gst.State.PLAYING)
        # A sendrecv transceiver, so that the offer (or answer) asks for the
        # remote peer's media too.
        transceiver = self.webrtc.emit("get-transceiver", 0)
        if transceiver is not None:
            transceiver.set_property(
                "direction", peer.GstWebRTC.WebRTCRTPTransceiverDirection.SENDRECV
            )
        if offerer:
            # Created before the main loop runs again, so before the offer.
            channel = self.webrtc.emit("create-data-channel", CHANNEL_LABEL, None)
            if channel is None:
                self.peer.error(f"cannot create a data channel for {remote!r}")
            else:
                self._watch_channel(channel)
        self._stats_timer = peer.GLib.timeout_add(1000, self._report_stats)

    def _idle(self, function, *args):
        """Run ``function(*args)`` on the main loop unless the call is closed."""

        def run():
            if not self.closed:
                function(*args)
            return False

        self.peer.GLib.idle_add(run)

    # Negotiation.

    def _on_negotiation_needed(self, webrtc):
        if self.offerer:
            self._idle(self._create_offer)

    def _create_offer(self):
        if self._offered:
            return
        self._offered = True
        promise = self.peer.Gst.Promise.new_with_change_func(
            lambda p, _: self._idle(self._on_description_created, p, "offer"), None
        )
        self.webrtc.emit("create-offer", None, promise)

    def _on_description_created(self, promise, kind):
        reply = promise.get_reply()
        description = reply.get_value(kind) if reply is not None else None
        if description is None:
            error = reply.get_value("error") if reply is not None else None
            self.peer.error(f"cannot create the {kind} for {self.remote!r}: {error}")
            return
        self.webrtc.emit("set-local-description", description, self.peer.Gst.Promise.new())
        self._send({"sdp": {"type": kind, "sdp": description.sdp.as_text()}})
        emit(f"{kind}-sent", peer=self.remote)

    def remote_description(self, kind, text):
        """Apply the remote peer's SDP ``offer`` or ``answer`` (text)."""
        emit(f"{kind}-received", peer=self.remote)
        GstSdp, GstWebRTC = self.peer.GstSdp, self.peer.GstWebRTC
        result, message = GstSdp.SDPMessage.new_from_text(text)
        if result != GstSdp.SDPResult.OK:
            # Without it the call can never connect: fail at once.
            self.peer.error(f"cannot use the {kind} from {self.remote!r}: unparsable SDP")
            self.peer.quit(EXIT_NEGOTIATION)
            return
        sdp_type = (
            GstWebRTC.WebRTCSDPType.OFFER if kind == "offer" else GstWebRTC.WebRTCSDPType.ANSWER
        )
        description = GstWebRTC.WebRTCSessionDescription.new(sdp_type, message)
        if kind == "offer":
            promise = self.peer.Gst.Promise.new_with_change_func(
                lambda p, _: self._idle(self._create_answer), None
            )
        else:
            promise = self.peer.Gst.Promise.new()
        self.webrtc.emit("set-remote-description", description, promise)

    def _create_answer(self):
        promise = self.peer.Gst.Promise.new_with_change_func(
            lambda p, _: self._idle(self._on_description_created, p, "answer"), None
        )
        self.webrtc.emit("create-answer", None, promise)

    def _on_ice_candidate(self, webrtc, mline, candidate):
        if candidate:
            self._idle(self._send_candidate, mline, candidate)

    def _send_candidate(self, mline, candidate):
        emit("local-candidate", peer=self.remote, candidate=candidate)
        self._send({"ice": {"candidate": candidate, "sdpMLineIndex": mline}})

    def remote_candidate(self, ice):
        """Add a trickled candidate from the remote peer (an ``ice`` object)."""
        candidate = ice.get("candidate")
        if candidate:
            emit("remote-candidate", peer=self.remote, candidate=candidate)
            self.webrtc.emit("add-ice-candidate", int(ice.get("sdpMLineIndex") or 0), candidate)

    # State.

    def _on_state(self, webrtc, pspec):
        self._idle(self._report_state)

    def _report_state(self):
        ice = self.webrtc.get_property("ice-connection-state").value_nick
        if ice != self._ice_state:
            self._ice_state = ice
            emit("ice-connection-state", peer=self.remote, state=ice)
        connection = self.webrtc.get_property("connection-state").value_nick
        if connection != self._connection_state:
            self._connection_state = connection
            emit("connection-state", peer=self.remote, state=connection)

    def _on_bus_error(self, bus, message):
        error, debug = message.parse_error()
        self.peer.error(f"pipeline of the call with {self.remote!r}: {error.message}")

    # Data channel.

    def _on_data_channel(self, webrtc, channel):
        # Connect at once, from webrtcbin's thread: a message that arrives
        # before the main loop runs again must not be missed.
        self._watch_channel(channel)

    def _watch_channel(self, channel):
        self._channels.append(channel)
        channel.connect("on-open", lambda ch: self._idle(self._channel_open, ch))
        channel.connect(
            "on-message-string", lambda ch, text: self._idle(self._channel_message, text)
        )
        channel.connect(
            "on-message-data",
            lambda ch, data: self._idle(self._channel_message, bytes(data.get_data()).hex()),
        )
        state = channel.get_property("ready-state")
        if state == self.peer.GstWebRTC.WebRTCDataChannelState.OPEN:
            self._idle(self._channel_open, channel)

    def _channel_open(self, channel):
        # Both the on-open signal and the state check may report it.
        if channel in self._opened:
            return
        self._opened.append(channel)
        emit("data-channel-open", peer=self.remote, label=channel.get_property("label"))
        channel.emit("send-string", f"hello from {self.peer.uid}")

    def _channel_message(self, text):
        emit("data", peer=self.remote, message=text)

    # Received media.

    def _on_pad_added(self, webrtc, pad):
        gst = self.peer.Gst
        if pad.get_direction() != gst.PadDirection.SRC:
            return
        caps = pad.get_current_caps() or pad.query_caps(None)
        kind = caps.get_structure(0).get_string("media") or "unknown"
        self._stats.setdefault(kind, [0, 0])
        pad.add_probe(gst.PadProbeType.BUFFER, self._count_bytes, kind)
        decodebin = gst.ElementFactory.make("decodebin")
        decodebin.connect("pad-added", self._on_decoded_pad, kind)
        self.pipeline.add(decodebin)
        decodebin.sync_state_with_parent()
        pad.link(decodebin.get_static_pad("sink"))

    def _on_decoded_pad(self, decodebin, pad, kind):
        gst = self.peer.Gst
        sink = gst.ElementFactory.make("fakesink")
        sink.set_property("sync", False)
        sink.set_property("async", False)
        self.pipeline.add(sink)
        sink.sync_state_with_parent()
        sink.get_static_pad("sink").add_probe(gst.PadProbeType.BUFFER, self._count_frame, kind)
        pad.link(sink.get_static_pad("sink"))

    def _count_bytes(self, pad, info, kind):
        self._stats[kind][1] += info.get_buffer().get_size()
        return self.peer.Gst.PadProbeReturn.OK

    def _count_frame(self, pad, info, kind):
        stats = self._stats[kind]
        stats[0] += 1
        if stats[0] == 1:
            self._idle(self._report_stats)
        return self.peer.Gst.PadProbeReturn.OK

    def _report_stats(self):
        if self.closed:
            return False
        for kind, (frames, size) in list(self._stats.items()):
            if frames and self._reported.get(kind) != frames:
                self._reported[kind] = frames
                emit("media", peer=self.remote, kind=kind, frames=frames, bytes=size)
        return True

    # The end.

    def close(self):
        """Stop the pipeline and forget the call; nothing is sent."""
        if self.closed:
            return
        self._report_stats()
        self.closed = True
        self.peer.GLib.source_remove(self._stats_timer)
        self._bus.remove_signal_watch()
        self.pipeline.set_state(self.peer.Gst.State.NULL)
        emit("call-closed", peer=self.remote)


class Peer:
    """
    The signalling side: one WebSocket to the server (libsoup), the protocol
    state, and the calls.

    :param options: the parsed command line.
    :param modules: what :func:`import_gi` returns.
    """

    def __init__(self, options, modules):
        self.options = options
        self.GLib, self.Gio, self.Gst, self.GstSdp, self.GstWebRTC, self.Soup = modules
        self.uid = options.id or f"gst-peer-{secrets.token_hex(3)}"
        self.loop = self.GLib.MainLoop()
        self.status = EXIT_OK
        self.connection = None
        #: uid -> Call in a room; None -> the Call of a session.
        self.calls = {}
        #: registering, calling, waiting, session, joining, room, leaving
        #: (the JSON dialect: welcoming, producing, looking, consuming)
        self.state = "connecting"
        #: The JSON dialect's consumer: the producer of its session.
        self.producer_id = None

    # Life cycle.

    def run(self):
        """Connect, run until done. :returns: the exit status."""
        session = self.Soup.Session()
        self._soup = session
        message = self.Soup.Message.new("GET", self.options.url)
        if message is None:
            emit("error", message=f"invalid URL {self.options.url!r}")
            return EXIT_USAGE
        if self.options.ca_file:
            try:
                # GIO wants an absolute path here.
                path = os.path.abspath(self.options.ca_file)
                session.set_tls_database(self.Gio.TlsFileDatabase.new(path))
            except self.GLib.Error as e:
                emit("error", message=f"cannot use --ca-file {self.options.ca_file!r}: {e.message}")
                return EXIT_USAGE
        if self.options.insecure:
            message.connect("accept-certificate", lambda *args: True)
        session.websocket_connect_async(
            message, None, None, self.GLib.PRIORITY_DEFAULT, None, self._on_connected, None
        )
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.GLib.unix_signal_add(self.GLib.PRIORITY_DEFAULT, signum, self._on_signal)
        if self.options.duration is not None:
            self.GLib.timeout_add(int(self.options.duration * 1000), self._on_duration)
        self.loop.run()
        for call in list(self.calls.values()):
            call.close()
        emit("exit", status=self.status)
        return self.status

    def quit(self, status=EXIT_OK):
        """Leave: close the WebSocket (bounded), then stop the main loop."""
        if self.state == "leaving":
            return
        self.state = "leaving"
        self.status = status
        for call in list(self.calls.values()):
            call.close()
        if self.connection is not None and self.connection.get_state() == self.Soup.WebsocketState.OPEN:
            self.connection.close(1000, None)
            self.GLib.timeout_add(CLOSE_TIMEOUT * 1000, self._stop)
        else:
            self._stop()

    def _stop(self):
        self.loop.quit()
        return False

    def _on_signal(self):
        self.quit(EXIT_OK)
        return False

    def _on_duration(self):
        self.quit(EXIT_OK)
        return False

    def error(self, text):
        emit("error", message=text)

    # The WebSocket.

    def _on_connected(self, session, result, data):
        try:
            self.connection = session.websocket_connect_finish(result)
        except self.GLib.Error as e:
            tls = e.domain in ("g-tls-error-quark",) or "certificate" in e.message.lower()
            emit("error", message=f"cannot connect to {self.options.url}: {e.message}")
            self.quit(EXIT_TLS if tls else EXIT_CONNECT)
            return
        self.connection.set_max_incoming_payload_size(0)
        self.connection.connect("message", self._on_message)
        self.connection.connect("closed", self._on_closed)
        self.begin()

    def begin(self):
        """The WebSocket is open: register."""
        self.state = "registering"
        self.send_text(words.hello(self.uid))

    def send_text(self, text):
        self.connection.send_text(text)

    def _on_closed(self, connection):
        code = connection.get_close_code()
        if self.state == "leaving":
            self._stop()
        elif self.state == "session" and code == 1000:
            emit("session-ended")
            self.quit(EXIT_OK)
        else:
            emit("error", message=f"the server closed the connection ({code})")
            self.quit(EXIT_CLOSED)

    def _on_message(self, connection, kind, data):
        if kind != self.Soup.WebsocketDataType.TEXT:
            self.error("ignored a binary message")
            return
        text = bytes(data.get_data()).decode("utf-8", "replace")
        try:
            self._handle(text)
        except Exception as e:  # a bad message costs only that message
            self.error(f"cannot handle {text[:80]!r}: {e!r}")

    # The protocol.

    def _handle(self, text):
        state = self.state
        if state == "leaving":
            return
        reply = words.parse_reply(text)
        if reply.word == words.ERROR and state != "session":
            emit("error", message=text)
            if state in ("registering", "calling", "joining"):
                self.quit(EXIT_SERVER_ERROR)
            return
        if state == "registering":
            if reply.word != words.HELLO:
                self.error(f"expected HELLO, got {text[:80]!r}")
                self.quit(EXIT_CLOSED)
                return
            emit("registered", uid=self.uid)
            if self.options.call:
                self.state = "calling"
                self.send_text(words.session(self.options.call))
            elif self.options.room:
                self.state = "joining"
                self.send_text(words.room(self.options.room))
            else:
                self.state = "waiting"
        elif state == "calling":
            if reply.word != words.SESSION_OK:
                self.error(f"expected SESSION_OK, got {text[:80]!r}")
                self.quit(EXIT_CLOSED)
                return
            self.state = "session"
            remote = self.options.call
            emit("session", peer=remote)
            if self.options.offer_request:
                self.send_text(words.OFFER_REQUEST)
                emit("offer-request-sent", peer=remote)
            else:
                self.calls[None] = self._new_call(remote, self._send_session, offerer=True)
        elif state in ("waiting", "session"):
            if state == "waiting":
                self.state = "session"
                emit("session", peer=None)
            remote = self.options.call if self.options.call else None
            call = self._negotiate(self.calls.get(None), remote, self._send_session, text)
            if call is not None:
                self.calls[None] = call
        elif state == "joining":
            if reply.word != words.ROOM_OK:
                self.error(f"expected ROOM_OK, got {text[:80]!r}")
                self.quit(EXIT_CLOSED)
                return
            self.state = "room"
            members = reply.uids
            emit("room", room=self.options.room, members=members)
            # By convention the newcomer makes the offers.
            for uid in members:
                self.calls[uid] = self._new_call(uid, self._room_sender(uid), offerer=True)
        elif state == "room":
            self._handle_room(text)

    def _handle_room(self, text):
        reply = words.parse_reply(text)
        if reply.word == words.ROOM_PEER_JOINED:
            emit("peer-joined", peer=reply.uid)
        elif reply.word == words.ROOM_PEER_LEFT:
            uid = reply.uid
            emit("peer-left", peer=uid)
            call = self.calls.pop(uid, None)
            if call is not None:
                call.close()
        elif reply.word == words.ROOM_PEER_MSG:
            uid = reply.uid
            call = self._negotiate(self.calls.get(uid), uid, self._room_sender(uid), reply.payload)
            if call is not None:
                self.calls[uid] = call
        elif reply.word == words.ROOM_PEER_LIST:
            pass
        elif reply.word == words.ERROR:
            emit("error", message=text)
        else:
            self.error(f"unexpected message in the room: {text[:80]!r}")

    def _negotiate(self, call, remote, send, payload):
        """
        Handle one negotiation message from ``remote`` for ``call`` (None
        when there is no call with it yet).

        :returns: the call, new or existing (or None).
        """
        if payload.strip() == words.OFFER_REQUEST:
            emit("offer-request-received", peer=remote)
            if call is not None:
                call.close()
            return self._new_call(remote, send, offerer=True)
        try:
            message = json.loads(payload)
        except ValueError:
            self.error(f"ignored a message that is not JSON: {payload[:80]!r}")
            return call
        if not isinstance(message, dict):
            self.error(f"ignored an unexpected message: {payload[:80]!r}")
            return call
        sdp = message.get("sdp")
        if isinstance(sdp, dict) and sdp.get("type") == "offer":
            if call is not None:
                call.close()
            pt = vp8_payload_type(sdp.get("sdp", "")) or DEFAULT_VP8_PT
            call = self._new_call(remote, send, offerer=False, pt=pt)
            call.remote_description("offer", sdp.get("sdp", ""))
        elif isinstance(sdp, dict) and sdp.get("type") == "answer" and call is not None:
            call.remote_description("answer", sdp.get("sdp", ""))
        elif isinstance(message.get("ice"), dict) and call is not None:
            call.remote_candidate(message["ice"])
        else:
            self.error(f"ignored an unexpected message: {payload[:80]!r}")
        return call

    def _new_call(self, remote, send, offerer, pt=DEFAULT_VP8_PT):
        return Call(self, remote, send, offerer, pt)

    def _send_session(self, message):
        if self.state == "session":
            self.send_text(json.dumps(message))

    def _room_sender(self, uid):
        def send(message):
            if self.state == "room" and uid in self.calls:
                self.send_text(words.room_peer_msg(uid, json.dumps(message)))

        return send


class JsonPeer(Peer):
    """
    The JSON dialect, as GStreamer's webrtcsink (``--produce``: register as a
    producer, offer to each consumer that starts a session) and webrtcsrc
    (``--consume PEER_ID`` or ``first``: start a session with a producer and
    answer its offer) speak it: welcomed with an id the server chooses,
    ``peer`` messages carry the SDP and the candidates of one session.
    """

    def begin(self):
        self.state = "welcoming"
        if self.options.protocol_version:
            self._send({"type": "setProtocolVersion", "version": self.options.protocol_version})

    def _send(self, message):
        self.send_text(json.dumps(message))

    def _on_closed(self, connection):
        if self.state == "leaving":
            self._stop()
        else:
            emit("error", message=f"the server closed the connection ({connection.get_close_code()})")
            self.quit(EXIT_CLOSED)

    def _handle(self, text):
        state = self.state
        if state == "leaving":
            return
        message = json.loads(text)
        kind = message.get("type")
        if kind == "error":
            emit("error", message=message.get("details"))
            if state in ("welcoming", "producing", "looking", "consuming"):
                self.quit(EXIT_SERVER_ERROR)
        elif kind == "welcome":
            self.uid = message["peerId"]
            emit("registered", uid=self.uid)
            self.state, messages = words.json_after_welcome(self.options, self.uid)
            if self.state == "consuming":
                emit("calling", peer=self.options.consume)
            for first in messages:
                self._send(first)
        elif kind in ("list", "peerStatusChanged") and state == "looking":
            ids = words.producers_in(message)
            if ids:
                self.state = "consuming"
                self._start(ids[0])
        elif kind == "sessionStarted":
            self.producer_id = message["peerId"]
            self.state = "session"
            emit("session", peer=self.producer_id)
        elif kind == "startSession":
            session_id = message["sessionId"]
            emit("session", peer=message["peerId"])
            send = self._peer_sender(session_id)
            offer = message.get("offer")
            if offer is None:
                self.calls[session_id] = self._new_call(message["peerId"], send, offerer=True)
            else:
                self.calls[session_id] = self._negotiate(
                    None, message["peerId"], send,
                    json.dumps({"sdp": {"type": "offer", "sdp": offer}}),
                )
        elif kind == "peer":
            session_id = message["sessionId"]
            remote = self.producer_id if not self.options.produce else None
            call = self.calls.get(session_id)
            if call is not None:
                remote = call.remote
            inner = {key: message[key] for key in ("sdp", "ice") if key in message}
            call = self._negotiate(call, remote, self._peer_sender(session_id), json.dumps(inner))
            if call is not None:
                self.calls[session_id] = call
        elif kind in ("endSession", "endSessionV1_1"):
            call = self.calls.pop(message["sessionId"], None)
            if call is not None:
                call.close()
            emit("session-ended")
            if not self.options.produce:
                self.quit(EXIT_OK)

    def _start(self, producer_id):
        emit("calling", peer=producer_id)
        self._send({"type": "startSession", "peerId": producer_id})

    def _peer_sender(self, session_id):
        def send(message):
            if self.state != "leaving":
                self._send(words.json_peer(session_id, message))

        return send


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="gst_peer.py",
        description=(
            "A GStreamer webrtcbin peer for the signalling server: sends a VP8 "
            "test picture and a data channel greeting, and prints what happens "
            "as JSON lines on stdout."
        ),
        epilog=(
            "Exit statuses: 0 done, 1 internal error or missing package, 2 bad "
            "command line, 3 cannot connect, 4 TLS failure, 5 the server answered "
            "ERROR, 6 the connection closed unexpectedly, 8 the other peer's offer "
            "or answer could not be used."
        ),
    )
    parser.add_argument(
        "--server", "--url", dest="url", default="wss://localhost:8443",
        help="the server's WebSocket URL, ws:// or wss:// (default: %(default)s)",
    )
    parser.add_argument("--id", help="our uid (default: a random gst-peer-XXXXXX)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--call", metavar="UID", help="start a session with this peer")
    mode.add_argument("--room", metavar="ROOM_ID", help="join this room and call every member")
    words.add_json_arguments(parser, mode, ", as webrtcsink does")
    parser.add_argument(
        "--offer-request", action="store_true",
        help="with --call: ask the callee to make the offer (OFFER_REQUEST)",
    )
    parser.add_argument("--ca-file", metavar="PEM", help="trust the certificate(s) in this PEM file")
    parser.add_argument(
        "--insecure", action="store_true", help="do not verify the server's TLS certificate"
    )
    parser.add_argument(
        "--duration", type=float, metavar="SECONDS", help="leave and exit 0 after SECONDS"
    )
    parser.add_argument(
        "--pattern", default="smpte",
        help="the videotestsrc pattern to send (default: %(default)s)",
    )
    parser.add_argument("--stun", metavar="URL", help="a STUN server (stun://host:port); none by default")
    parser.add_argument(
        "--turn", metavar="URL", help="a TURN server (turn://user:pass@host:port); none by default"
    )
    parser.add_argument(
        "--check", action="store_true",
        help="only check that every package this program needs is installed, and exit",
    )
    options = parser.parse_args(argv)
    if options.offer_request and not options.call:
        parser.error("--offer-request needs --call")
    if not options.check:
        words.check_json_arguments(parser, options)
    return options


def main(argv=None):
    options = parse_args(argv)
    modules = import_gi()
    if options.check:
        print("gst_peer: every needed package is installed", flush=True)
        return EXIT_OK
    return (JsonPeer if options.protocol == "json" else Peer)(options, modules).run()


if __name__ == "__main__":
    sys.exit(main())

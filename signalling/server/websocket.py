"""
The WebSocket layer under the signalling protocol: every Autobahn override
and every use of an Autobahn or Twisted private name lives here, so that an
upgrade that changes one shows in this module and in
``tests/test_framework_assumptions.py``, which checks each of them by name.
What a connection does with its transport and socket below Autobahn (flow
control, reading paused for reasons, the round trip, unread bytes) uses
Twisted's public interfaces only: it is :mod:`signalling.server.transport`
(:class:`~signalling.server.transport.TransportControl`, a base of
:class:`ServerProtocol`), named in that test too.

:class:`ServerProtocol` is Autobahn's server protocol with what the server
needs whatever the speed: plain HTTP requests handed over to the pages'
site, request heads bounded, closes that release the connection at once and
end within a bounded time (TLS included), and failed TLS handshakes logged
once in plain words. :class:`FastServerProtocol` adds the fast paths:
complete, unfragmented data frames read and written without Autobahn's
per-frame objects, frames for the session partner written in one write,
and a small per-connection footprint. A factory chooses one or the other
(``fast_path``); both behave the same on the wire.

What a subclass provides: :meth:`ServerProtocol.closing` (the connection
lets go of its state), :meth:`ServerProtocol.batch_link` (the link to batch
relayed frames to, or None), ``output_changed`` (the peer stopped reading,
or caught up), and Autobahn's ``onOpen``, ``onMessage`` and ``onClose``.
"""

import re
import time
from collections import deque
from urllib.parse import parse_qs

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.util import create_transport_details, peer2str
from autobahn.wamp.types import TransportDetails
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.protocol import (
    TrafficStats,
    WebSocketProtocol,
    _is_same_origin,
    _url_to_origin,
)
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from autobahn.websocket.utf8validator import Utf8Validator
from autobahn.websocket.xormasker import create_xor_masker
from OpenSSL import SSL
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
import txaio

from signalling.server.auth import token_of
from signalling.server.limits import host_of
from signalling.server.policy import NOTHING_COUNTED, Refused
from signalling.server.tls import tls_failure_reason
from signalling.server.transport import (
    TURN_WRITES,
    TransportControl,
    can_close_now,
    close_now,
    send_now,
)

_OPEN = WebSocketProtocol.STATE_OPEN
_CLOSED = WebSocketProtocol.STATE_CLOSED
_CLOSING = WebSocketProtocol.STATE_CLOSING
_CONNECTING = WebSocketProtocol.STATE_CONNECTING

#: Steps of reading one connection may take in one turn of the reactor
#: before the others get theirs: Autobahn takes two for a frame (its header,
#: then its payload), the fast path one for up to FRAMES_PER_STEP frames.
TURN_STEPS = 16
#: ... and the time they may take, in seconds (a step may overrun it by at
#: most one step: :data:`FRAMES_PER_STEP` frames of the fast path).
TURN_SECONDS = 0.0005
#: Frames the fast path takes in one step.
FRAMES_PER_STEP = 64
_TEXT = 1
_BINARY = 2

#: First header byte of an unfragmented text and binary frame (FIN set, no
#: RSV bits): the only frames the fast receive path takes.
_FIN_TEXT = 0x80 | _TEXT
_FIN_BINARY = 0x80 | _BINARY
#: ... and of a close frame and a pong, which the fast path takes when they
#: come first.
_FIN_CLOSE = 0x80 | 8
_FIN_PONG = 0x80 | 10
#: Payloads up to this size are unmasked with Python's big integers, which
#: beat Autobahn's masker (a cffi object per frame) below a couple of KiB.
_SMALL_UNMASK = 2048

_from_bytes = int.from_bytes
_now = time.perf_counter


def _unmask(payload, mask):
    """:returns: ``payload`` XORed with the 4-byte ``mask`` (RFC 6455 5.3)."""
    n = len(payload)
    if n > _SMALL_UNMASK:
        return create_xor_masker(mask, n).process(payload)
    key = mask * ((n >> 2) + 1)
    return (_from_bytes(payload, "little") ^ _from_bytes(key[:n], "little")).to_bytes(
        n, "little"
    )


class _FactoryOption:
    """
    An Autobahn protocol option read from the factory, where Autobahn would
    copy every option onto each connection (29 entries in each instance's
    dictionary). A non-data descriptor: an option set on one connection
    still lands in its own dictionary and wins.
    """

    __slots__ = ("_name",)

    def __init__(self, name):
        self._name = name

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        return getattr(instance.factory, self._name)


class _CreatedOnUse:
    """
    A per-connection object made on first use and then kept in the
    instance's dictionary; until then the connection does not pay for it.
    """

    __slots__ = ("_name", "_make")

    def __init__(self, name, make):
        self._name = name
        self._make = make

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        value = instance.__dict__[self._name] = self._make()
        return value


class _SendQueue:
    """
    Autobahn's queue of chopped or synchronous writes, which this server never
    makes: a ``deque`` (over 700 bytes) only once something is queued.
    """

    __slots__ = ("items",)

    def __init__(self):
        self.items = None

    def __len__(self):
        return len(self.items) if self.items else 0

    def append(self, item):
        if self.items is None:
            self.items = deque()
        self.items.append(item)

    def popleft(self):
        if not self.items:
            raise IndexError("pop from an empty queue")
        return self.items.popleft()


#: Attributes of Autobahn's server handshake that nothing reads once the
#: connection is open; dropped then (several hundred bytes of request text
#: and headers per connection).
_HANDSHAKE_LEFTOVERS = frozenset(
    (
        "http_request_data",
        "http_response_data",
        "http_status_line",
        "http_headers",
        "http_request_uri",
        "http_request_path",
        "http_request_params",
        "http_request_host",
        "websocket_origin",
        "websocket_protocols",
        "websocket_extensions",
        "_wskey",
    )
)

#: Autobahn's per-connection flags and timers whose value is the same on
#: every new connection; as class attributes they cost nothing until one
#: changes (Autobahn then sets it on the instance, as before).
_AUTOBAHN_DEFAULTS = {
    "_perMessageCompress": None,
    "trackedTimings": None,
    "send_state": WebSocketProtocol.SEND_STATE_GROUND,
    "triggered": False,
    "wasMaxFramePayloadSizeExceeded": False,
    "wasMaxMessagePayloadSizeExceeded": False,
    "closedByMe": False,
    "failedByMe": False,
    "droppedByMe": False,
    "wasClean": False,
    "wasNotCleanReason": None,
    "wasOpenHandshakeTimeout": False,
    "wasCloseHandshakeTimeout": False,
    "wasServingFlashSocketPolicyFile": False,
    "wasServerConnectionDropTimeout": False,
    "localCloseCode": None,
    "localCloseReason": None,
    "remoteCloseCode": None,
    "remoteCloseReason": None,
    "openHandshakeTimeoutCall": None,
    "closeHandshakeTimeoutCall": None,
    "autoPingTimeoutCall": None,
    "autoPingPending": None,
    "autoPingPendingSeq": 0,
    "autoPingPendingSent": None,
    "autoPingPendingCall": None,
    "inside_message": False,
    "current_frame": None,
    "websocket_protocol_in_use": None,
    "data": b"",
}


def _frame_header(opcode_byte, length):
    """:returns: the header of an unmasked server frame of ``length`` bytes."""
    if length < 126:
        return bytes((opcode_byte, length))
    if length < 0x10000:
        return bytes((opcode_byte, 126)) + length.to_bytes(2, "big")
    return bytes((opcode_byte, 127)) + length.to_bytes(8, "big")

#: The frame size limit when neither Autobahn limit is set.
_NO_LIMIT = 1 << 63

#: Largest HTTP request head (request line and headers) an opening handshake
#: may send; a longer one is refused with 431 rather than buffered.
MAX_REQUEST_HEAD = 16 * 1024


#: A request head the fast handshake takes (FastServerProtocol._plain_upgrade):
#: ``GET`` of an origin-form target without a fragment or ``;`` parameters,
#: HTTP/1.1, and header lines of a token, a colon and printable ASCII.
_PLAIN_HEAD = re.compile(
    rb"GET /(?!/)[\x21\x22\x24-\x3a\x3c-\x7e]* HTTP/1\.1"
    rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[ \t]*(?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?[ \t]*)*"
)
#: A Sec-WebSocket-Key as RFC 6455 spells it: 16 bytes in base64.
_KEY = re.compile(r"[A-Za-z0-9+/]{22}==")


def _has_token(value, token):
    """:returns: whether the comma-separated header ``value`` (or None) holds ``token``, in any case."""
    return value is not None and any(part.strip().lower() == token for part in value.split(","))


def asks_for_websocket(head):
    """
    :param head: an HTTP request head, without the blank line that ends it.
    :returns: whether it asks for a WebSocket upgrade (an ``Upgrade`` header
        naming ``websocket``), which is all it takes to go to the WebSocket
        side rather than the web pages.
    """
    for line in head.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"upgrade" and b"websocket" in value.lower():
            return True
    return False


class UpgradeResource(WebSocketResource):
    """
    Autobahn's resource for a WebSocket upgrade that comes over a plain HTTP
    connection (after requests for the pages): the connection goes back to
    a new WebSocket protocol, whose factory counts its client address
    again, so the page channel lets go of its count first.
    """

    def render(self, request):
        request.channel.release_count()
        return WebSocketResource.render(self, request)


class ServerProtocol(TransportControl, WebSocketServerProtocol):
    """
    Autobahn's server protocol, with the hand-over of plain HTTP requests,
    bounded request heads, bounded closes and quiet TLS failures; flow
    control and the socket's state come from :class:`TransportControl`,
    whose per-connection defaults are class attributes here, with the others.
    """

    _log = Logger()

    #: Aborts the transport if a closing connection outlives its bound.
    _drop_call = None
    #: True when why the connection ended was logged already (TLS failures).
    _close_logged = False
    #: True while the transport holds more than its buffer size for the peer
    #: (TransportControl).
    output_blocked = False
    #: Fragments of the message being received so far.
    _fragments = 0
    #: Continues reading in the next turn of the reactor (see consumeData).
    _next_turn_call = None
    #: Autobahn's frame being parsed and a control frame's payload, between
    #: frames (see onFrameEnd).
    current_frame = None
    control_frame_data = None
    #: The client address counted for this connection (limits), if any.
    counted_host = None
    #: What the policy counted at the upgrade (see signalling.server.policy.WEBSOCKET_COUNTED).
    _admission = None
    #: Why reading from the peer is paused (a frozenset of reasons; TransportControl).
    _read_pauses = frozenset()
    #: What the connection's token allows (signalling.server.auth.Grant),
    #: or None when the server asks for no token.
    grant = None

    # What a subclass provides.

    def closing(self):
        """
        The connection is ending: a close frame went out or came in, or the
        transport is being dropped or is gone. Called at least once, maybe
        more often.
        """

    def batch_link(self):
        """
        :returns: the :class:`signalling.core.interfaces.ILink` that relayed
            frames may go to together (the fast path batches them), or None.
        """
        return None

    # Keepalive and input.

    def wait_longer_for_pong(self):
        """
        Give the keepalive ping in flight another ``autoPingTimeout``, on
        the same timer as Autobahn's own (``_sendAutoPing``).
        """
        self.autoPingTimeoutCall = self.factory._batched_timer.call_later(
            self.autoPingTimeout, self.onAutoPingTimeout
        )

    def has_unread_input(self):
        """
        :returns: whether bytes from the peer wait unread: in Autobahn's
            buffer (a turn of input left for later), or in the socket's
            (:meth:`unread_in_socket`). A busy server may reach a timer
            before the input that came in time for it.
        """
        return bool(self.data) or self.unread_in_socket()

    # Sending.

    def write_frames(self, frames):
        """
        Send data frames, ``(first header byte, payload)`` each, through
        Autobahn; the caller checked that the connection is open.
        """
        for first, payload in frames:
            self.sendFrame(first & 0x0F, payload)

    def write_text(self, text):
        """
        Send ``text`` as one text frame; the caller checked that the
        connection is open.

        :returns: the size of the payload.
        """
        data = text.encode("utf-8")
        self.write_frames(((0x80 | _TEXT, data),))
        return len(data)

    def close_with(self, code, reason=None):
        """
        Start the close handshake with ``code`` (any code, 1002 and 1011
        included, which ``sendClose`` refuses) and ``reason``; or, when the
        connection is no longer open, let go of it.
        """
        if self.state == _OPEN:
            self.sendCloseFrame(
                code=code, reasonUtf8=reason.encode("utf-8") if reason else None
            )
        else:
            self.closing()

    # The opening handshake.

    def onConnect(self, request):
        """
        Accept the upgrade, with no subprotocol, unless it comes from a
        page whose origin is not allowed (403: a browser's handshake from
        another site, when ``--allowed-origin`` is given), the server holds
        as many WebSocket connections as it may (503), or, behind a trusted
        proxy, the forwarded client address is no IP address (400) or holds
        as many as it may (429).
        """
        policy = self.factory.policy
        try:
            forwarded = None
            if self.trustXForwardedFor:
                # Autobahn took ``peer`` from X-Forwarded-For as it was
                # sent, on any connection: the logs name the socket's
                # address, or the forwarded one the policy accepts, in its
                # one normal spelling.
                self.peer = peer2str(self.transport)
                forwarded = policy.forwarded_address(
                    request.headers.get("x-forwarded-for"), host_of(self.transport.getPeer())
                )
                if forwarded is not None:
                    self.peer = str(forwarded)
            grant, admission = policy.admit_upgrade(
                request.path, request.headers, token_of(request), forwarded
            )
        except Refused as e:
            raise ConnectionDeny(e.status, e.text)
        # Only what differs from the class defaults goes into the
        # connection's dictionary (a key more can double its size).
        if grant is not None:
            self.grant = grant
        if admission != NOTHING_COUNTED:
            self._admission = admission
        return None

    def _release_counts(self):
        """Give back what the policy counted for this connection."""
        policy = self.factory.policy
        if self.counted_host is not None:
            policy.release(self.counted_host)
            self.counted_host = None
        admission = self.__dict__.pop("_admission", None)
        if admission is not None:
            policy.release_upgrade(admission)

    def _connectionMade(self):
        WebSocketServerProtocol._connectionMade(self)
        self._watch_output()

    def processHandshake(self):
        """
        Parse the opening handshake once the request head is complete; hand a
        plain HTTP request (no WebSocket upgrade) to the factory's web site.

        WebSocket upgrades are parsed once (by :meth:`_plain_upgrade`, else
        by Autobahn), rather than by twisted.web first and Autobahn again;
        and no twisted.web channel stays behind as the transport's producer
        for the life of the connection.
        """
        data = self.data
        end = data.find(b"\r\n\r\n", 0, MAX_REQUEST_HEAD + 4)
        if end < 0:
            if len(data) >= MAX_REQUEST_HEAD + 4:
                self.failHandshake("Request header fields too large", 431)
            return
        # A plain upgrade names websocket in its Upgrade header: never one
        # for the web site.
        if self._plain_upgrade(end):
            return
        web = self.factory.web
        if web is not None and not asks_for_websocket(data[:end]):
            self._hand_over_to_web(web)
            return
        WebSocketServerProtocol.processHandshake(self)

    def _plain_upgrade(self, end):
        """
        Accept a plain upgrade whose request head ends at ``end`` without
        Autobahn's handshake (the fast layer does).

        :returns: False: none here.
        """
        return False

    def _hand_over_to_web(self, web):
        """
        Give the connection, and the bytes read so far, to a protocol of the
        ``web`` factory (a :class:`signalling.server.web.PageChannel`), with
        the count of its client address; this protocol is done.
        """
        transport = self.transport
        channel = web.buildProtocol(transport.getPeer())
        if channel is None:
            # The site refuses the connection (a factory may).
            self.dropConnection(abort=True)
            return
        if self.openHandshakeTimeoutCall is not None:
            self.openHandshakeTimeoutCall.cancel()
            self.openHandshakeTimeoutCall = None
        # What _connectionLost would do: this connection never was a WebSocket.
        # The web channel watches the transport itself, and holds the
        # client address's count until the connection ends.
        transport.unregisterProducer()
        if self.counted_host is not None:
            channel.hold_count(self.factory.policy, self.counted_host)
            self.counted_host = None
        self._release_counts()
        self.state = _CLOSED
        self.factory.countConnections -= 1
        data, self.data = self.data, b""
        if isinstance(transport, ProtocolWrapper):
            # TLS: the transport is the TLS layer, which wraps this protocol.
            transport.wrappedProtocol = channel
        else:
            transport.protocol = channel
        self.transport = None
        channel.makeConnection(transport)
        channel.dataReceived(data)

    # Reading, fairly.

    def consumeData(self):
        """
        Handle what was read, but at most :data:`TURN_STEPS` steps, and no
        more than :data:`TURN_SECONDS`, in one turn of the reactor: then stop
        reading for a moment and go on in the next turn, so that a
        connection flooding small frames cannot hold the others up.
        """
        state = self.state
        if state != _OPEN and state != _CLOSING:
            WebSocketServerProtocol.consumeData(self)
            return
        if self._next_turn_call is not None:
            # This turn's steps are spent. A TLS layer hands over all it has
            # decrypted even while reading is paused; it waits for the next
            # turn too (else each hand-over would start a chain of turns of
            # its own, and they would add up).
            return
        budget = TURN_STEPS
        deadline = _now() + TURN_SECONDS
        while self.processData() and self.state != _CLOSED:
            budget -= 1
            if not budget or _now() > deadline:
                self.pause_reading("turn")
                self._next_turn_call = self.factory.clock.callLater(0, self._next_turn)
                return

    def _next_turn(self):
        # Back to the class default (None): no key of its own in the dictionary.
        self.__dict__.pop("_next_turn_call", None)
        self.resume_reading("turn")
        # A frame whose header was read may be complete with no more data
        # (an empty payload: a close or ping frame, an empty message).
        if (self.data or self.current_frame is not None) and (
            self.state == _OPEN or self.state == _CLOSING
        ):
            self.consumeData()

    def onMessageBegin(self, isBinary):
        self._fragments = 0
        WebSocketServerProtocol.onMessageBegin(self, isBinary)

    def onFrameEnd(self):
        """
        A frame Autobahn parsed has ended: let go of what Autobahn keeps of
        it on the connection (the frame's unmasking object, the control
        frame's payload list, the frame itself, all done with), so that an
        idle connection that answered a ping holds no more than one that
        did not.
        """
        result = WebSocketServerProtocol.onFrameEnd(self)
        d = self.__dict__
        d.pop("current_frame_masker", None)
        # Back to the class defaults (None).
        for name in ("control_frame_data", "current_frame"):
            if name in d and d[name] is None:
                del d[name]
        return result

    def onMessageFrameBegin(self, length):
        """
        Count the fragments of a message: one that comes in more than the
        factory's ``max_fragments`` is refused with 1009 (each fragment costs
        memory of its own, whatever its size).
        """
        WebSocketServerProtocol.onMessageFrameBegin(self, length)
        self._fragments += 1
        if self._fragments > self.factory.settings.max_fragments and not self.failedByMe:
            self._fail_connection(
                WebSocketProtocol.CLOSE_STATUS_CODE_MESSAGE_TOO_BIG,
                f"message in more than {self.factory.settings.max_fragments} fragments",
            )

    # Closing.

    def connectionLost(self, reason):
        """
        Log a failed TLS handshake once, at info level and in plain words,
        instead of Autobahn's error line; then tear the connection down.
        """
        if isinstance(reason.value, SSL.Error):
            if not self._close_logged:
                self._log.info(
                    "TLS with {peer_addr} failed: {reason}",
                    peer_addr=self.peer,
                    reason=tls_failure_reason(reason.value),
                )
            self._close_logged = True
            self._connectionLost(reason)
            return
        WebSocketServerProtocol.connectionLost(self, reason)

    def quiet_close(self):
        """The TLS layer logged why this connection ends; onClose need not."""
        self._close_logged = True

    def _connectionLost(self, reason):
        self._cancel_timers()
        self._release_counts()
        WebSocketServerProtocol._connectionLost(self, reason)
        self.closing()
        self._unlink()

    def _unlink(self):
        """
        The connection is gone: break the reference cycles it is part of, so
        that reference counting frees it as soon as the reactor lets go of
        it. Left to the cyclic garbage collector, which may not run for
        minutes, every connection closed in a peak would stay in memory.
        Autobahn resolves ``is_closed`` with the protocol itself, the
        transport keeps our output guard, and a subclass may add its own
        links (:meth:`closed`).
        """
        d = self.__dict__
        d.pop("is_closed", None)
        # The transport (a TLS layer keeps it after the connection is lost)
        # holds our output guard as its producer.
        guard = d.pop("_guard", None)
        if guard is not None:
            guard._protocol = None
        self.closed()

    def closed(self):
        """The connection is gone; let go of whatever refers back to it."""

    def sendCloseFrame(self, code=None, reasonUtf8=None, isReply=False):
        """
        Send a close frame (ours, or the reply to the peer's); from then on
        the connection holds nothing: its partner and room are told now, not
        when the peer gets round to closing its side.
        """
        WebSocketServerProtocol.sendCloseFrame(self, code, reasonUtf8, isReply)
        if self.state != _OPEN:
            self.closing()

    def dropConnection(self, abort=False):
        """
        Close the transport, gracefully after a complete close handshake.
        A graceful close is bounded too: TLS waits for the peer's
        ``close_notify``, which a peer that stopped reading never sends, so
        the transport is aborted after the factory's ``close_timeout``.
        """
        if abort and self.wasClean:
            # The close handshake is complete; what we wrote last (our close
            # frame, when both sides closed at once) must still reach the
            # peer, which an abort would throw away.
            abort = False
        was_closed = self.state == _CLOSED
        WebSocketServerProtocol.dropConnection(self, abort)
        self.closing()
        if not abort and not was_closed and self not in _closing:
            self._bound_close()

    def _bound_close(self):
        """Abort the transport if its graceful close takes longer than the factory's ``close_timeout``."""
        if self.transport is not None and self._drop_call is None:
            self._drop_call = self.factory.clock.callLater(
                self.factory.settings.close_timeout, self._abort
            )

    def _cancel_timers(self):
        for name in ("_drop_call", "_next_turn_call"):
            call = getattr(self, name)
            if call is not None:
                if call.active():
                    call.cancel()
                setattr(self, name, None)

    def _abort(self):
        self._drop_call = None
        if self.transport is not None:
            self.transport.abortConnection()

    def close_cause(self, code):
        """
        :param code: the close code Autobahn reports to ``onClose`` (the
            peer's, or 1006).
        :returns: ``(code, cause)`` for the log: the code of the close frame
            that started the close, and who started it and why.
        """
        if self.closedByMe and self.localCloseCode is not None:
            reason = (self.localCloseReason or b"").decode("utf-8", "replace")
            return self.localCloseCode, f"closed by the server: {reason}" if reason else (
                "closed by the server"
            )
        if self.remoteCloseCode is not None:
            return self.remoteCloseCode, "closed by the peer"
        if self.wasNotCleanReason:
            return code, self.wasNotCleanReason
        return code, "connection lost"

    @property
    def close_logged(self):
        """Whether why the connection ended was logged already (a failed TLS handshake)."""
        return self._close_logged



class FastServerProtocol(ServerProtocol):
    """
    :class:`ServerProtocol` with the fast receive and send paths for data
    frames and a small per-connection footprint. Class-level defaults keep
    an idle connection small.
    """

    # Per-connection memory: Autobahn's options are class attributes of the
    # subclass the factory builds its connections from (its
    # _built_protocol), else come from the factory (see _FactoryOption), so
    # there is nothing for _connectionMade to copy (and pretty-print for a
    # debug line, a tenth of the CPU of a call set-up). The options
    # themselves and _AUTOBAHN_DEFAULTS are set on the class below it.
    CONFIG_ATTRS = ()
    utf8validator = _CreatedOnUse("utf8validator", Utf8Validator)

    #: False where frame or octet logging, or masking, needs Autobahn's own
    #: send path; decided once per connection, not per relayed message.
    _plain_writes = True

    # Autobahn's entry points below build the arguments of debug log lines
    # (type names, highlighted values) on every call, whether or not debug
    # logging is on: about 4 % of the CPU of a call set-up, and part of every
    # read on the relay path. These overrides do the same work without them.

    def __init__(self):
        WebSocketServerProtocol.__init__(self)
        # Autobahn's blank details, replaced by every connection (see
        # _transport_details).
        self.__dict__.pop("_transport_details_made", None)

    def _plain_upgrade(self, end):
        """
        Accept the upgrade whose request head ends at ``end`` when it is one
        Autobahn's handshake is known to accept as it is (the requests of
        the examples' clients, browsers and GStreamer's), with what it would
        find in it, without its parser's pass over each line and its
        promise-based call of ``onConnect``: ``GET`` of an
        origin-form target (no fragment, no ``;`` parameters) in HTTP/1.1,
        printable ASCII header lines each named once, a ``Host``, the
        upgrade's headers as RFC 6455 spells them (version 13, a well-formed
        key), no subprotocol asked for, an Origin Autobahn allows, no
        forwarded address to take, room for another connection. Sets what
        Autobahn's handshake sets and calls ``onConnect`` as it does.

        :returns: False, having done nothing, for any other request (the
            web site's, or Autobahn's to accept or refuse as always).
        """
        data = self.data
        head = data[:end]
        if not _PLAIN_HEAD.fullmatch(head):
            return False
        lines = head.decode("ascii").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.lower()
            if name in headers:
                return False
            headers[name] = value.strip(" \t")
        host = headers.get("host")
        key = headers.get("sec-websocket-key")
        factory = self.factory
        if (
            host is None
            or key is None
            or not _KEY.fullmatch(key)
            or headers.get("sec-websocket-version") != "13"
            or 13 not in self.versions
            or "sec-websocket-protocol" in headers
            or not _has_token(headers.get("upgrade"), "websocket")
            or not _has_token(headers.get("connection"), "upgrade")
            or (self.trustXForwardedFor and "x-forwarded-for" in headers)
            or (self.maxConnections > 0 and factory.countConnections > self.maxConnections)
        ):
            return False
        if ":" in host and not host.endswith("]"):
            hostname, port = host.rsplit(":", 1)
            try:
                port = int(port.strip())
            except ValueError:
                return False
            if factory.externalPort and port != factory.externalPort:
                return False
            host = hostname
        origin = headers.get("origin")
        if origin is not None:
            try:
                allowed = _url_to_origin(origin)
                if not (allowed == "null" and factory.allowNullOrigin):
                    allowed = _is_same_origin(
                        allowed,
                        "https" if factory.isSecure else "http",
                        factory.externalPort or factory.port,
                        self.allowedOriginsPatterns,
                    )
            except Exception:
                return False
            if not allowed:
                return False
        extensions = headers.get("sec-websocket-extensions")
        extensions = [] if extensions is None else self._parseExtensionsHeader(extensions)
        status_line = lines[0]
        target = status_line[4:-9]
        path, _, query = target.partition("?")
        params = parse_qs(query) if query else {}
        self.http_request_data = data[: end + 4]
        self.http_status_line = status_line
        self.http_headers = headers
        self.http_request_uri = target
        self.http_request_path = path
        self.http_request_params = params
        self.http_request_host = host
        self.websocket_version = 13
        self.websocket_protocols = []
        self.websocket_origin = "" if origin is None else origin
        self.websocket_extensions = extensions
        self.data = data[end + 4 :]
        self._wskey = key
        request = ConnectionRequest(
            self.peer, headers, host, path, params, 13, self.websocket_origin, [], extensions
        )
        try:
            accepted = self.onConnect(request)
        except ConnectionDeny as deny:
            self.failHandshake(deny.reason, deny.code)
        except Exception:
            # As Autobahn's handshake reports an error of onConnect.
            failure = Failure()
            self.log.warn("Unexpected exception in onConnect ['{err.value}']", err=failure)
            self.log.warn("{tb}", tb=txaio.failure_format_traceback(failure))
            self.failHandshake(
                f"Internal server error: {failure.value}", ConnectionDeny.INTERNAL_SERVER_ERROR
            )
        else:
            self.succeedHandshake(accepted)
        return True

    def dataReceived(self, data):
        # What this connection's input makes the server write, to it (the
        # 101 and the dialect ping, a reply and what follows it) and to
        # others (relayed messages, a room's notices), goes to each
        # connection in one write once that input is handled: with
        # send_now, one system call each.
        global _reading
        if _reading is not None:
            self._dataReceived(data)
            return
        _reading = self
        try:
            self._dataReceived(data)
        finally:
            _reading = None
            if _held:
                for proto in list(_held):
                    proto._send_held()
            if _closing:
                self._close_now()

    def _close_now(self):
        """
        Close the connections a graceful drop during this input left to
        close (see :meth:`_closeConnection`), now that everything held for
        them is sent: each at once if it has nothing unsent, else the
        transport's way, bounded by the close timeout.
        """
        closing = _closing[:]
        del _closing[:]
        for proto in closing:
            transport = proto.transport
            if (
                transport is None
                or not transport.connected
                or transport.disconnecting
                or getattr(transport, "_aborting", False)
            ):
                continue
            try:
                if not close_now(transport):
                    proto._bound_close()
            except Exception:
                self._log.failure("while closing {peer}", peer=proto.peer)

    def _write(self, data):
        """
        Write ``data`` to the transport: while a connection's input is
        handled, held until it is (at most TURN_WRITES for one connection,
        then at once: the output bound counts what the transport holds);
        else at once.
        """
        if _reading is None:
            send_now(self.transport, data)
            return
        held = _held.get(self)
        if held is None:
            held = _held[self] = [0, []]
        held[0] += len(data)
        held[1].append(data)
        if held[0] >= TURN_WRITES:
            self._send_held()

    def _closeConnection(self, abort=False):
        # What was held goes before the close (a transport closing or
        # aborted, and a TLS layer closing, take no more writes).
        if self in _held:
            self._send_held()
        if not abort and _reading is not None and can_close_now(self.transport):
            # Closed at once once the input is handled (_close_now), from
            # the reactor's read of it rather than from within Autobahn's
            # frame handling, which goes on after this returns.
            if self not in _closing:
                _closing.append(self)
            return
        WebSocketServerProtocol._closeConnection(self, abort)

    def _send_held(self):
        """Write what was held for this connection (see :meth:`dataReceived`), unless its transport is gone."""
        held = _held.pop(self, None)
        if held is None:
            return
        chunks = held[1]
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if self.transport is not None:
            send_now(self.transport, data)

    def connectionMade(self):
        # Autobahn's, without its debug line (whose arguments it builds
        # anyway), and with the transport's details made only if asked for
        # (transport_details): every connection needs its peer, none of
        # them the rest (over TLS, a channel id and the peer's certificate,
        # read again once the handshake is done).
        self.peer = peer2str(self.transport)
        try:
            self.transport.setTcpNoDelay(self.tcpNoDelay)
        except Exception:
            # Not a TCP socket (a Unix socket, say): as Autobahn does.
            pass
        self._connectionMade()

    def _connectionMade(self):
        # What Autobahn's _connectionMade sets that is not a class default
        # here (_AUTOBAHN_DEFAULTS, the options and the UTF-8 validator
        # made on use), without the copy of each option onto the
        # connection and its pretty-printed debug line.
        if self.trackTimings:
            self.setTrackTimings(True)
        self.trafficStats = TrafficStats()
        self.state = WebSocketProtocol.STATE_CONNECTING
        self.send_queue = _SendQueue()
        if self.openHandshakeTimeout > 0:
            self.openHandshakeTimeoutCall = self.factory._batched_timer.call_later(
                self.openHandshakeTimeout, self.onOpenHandshakeTimeout
            )
        self.factory.countConnections += 1
        self._watch_output()
        if self.logFrames or self.logOctets or self.maskServerFrames:
            self._plain_writes = False

    @property
    def _transport_details(self):
        # Autobahn's details of the transport, made on first use (see
        # connectionMade); kept once made.
        details = self.__dict__.get("_transport_details_made")
        if details is None:
            details = create_transport_details(self.transport, self.is_server)
            details.channel_framing = TransportDetails.CHANNEL_FRAMING_WEBSOCKET
            self.__dict__["_transport_details_made"] = details
        return details

    @_transport_details.setter
    def _transport_details(self, details):
        self.__dict__["_transport_details_made"] = details

    def _onOpen(self):
        # Autobahn's reads the TLS channel id and the peer's certificate
        # into the transport's details here; they are made on use instead.
        self.onOpen()

    def sendData(self, data, sync=False, chopsize=None):
        # Autobahn's, without its debug line's arguments, for the one case
        # the server has: one write at once, nothing queued.
        if chopsize or sync or self.send_queue.items or self.logOctets:
            if self in _held:
                # Autobahn's path writes to the transport: what was held goes first.
                self._send_held()
            return WebSocketServerProtocol.sendData(self, data, sync, chopsize)
        self._write(data)
        state = self.state
        if state == _OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        elif state == _CONNECTING:
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)

    def sendPing(self, payload=None):
        # Autobahn's, for the pings the server sends (a payload, nothing
        # queued, no frame logging or masking), without building the frame
        # in general.
        if (
            payload
            and len(payload) <= 125
            and self.state == _OPEN
            and self._plain_writes
            and not self.send_queue.items
        ):
            self.sendData(bytes((0x89, len(payload))) + payload)
            return
        WebSocketServerProtocol.sendPing(self, payload)

    def connectionLost(self, reason):
        if isinstance(reason.value, SSL.Error):
            return ServerProtocol.connectionLost(self, reason)
        # Autobahn's adapter does no more for any other reason than this,
        # and debug lines whose arguments it builds anyway.
        self._connectionLost(reason)

    def _connectionLost(self, reason):
        self._cancel_timers()
        self._release_counts()
        WebSocketProtocol._connectionLost(self, reason)
        self.factory.countConnections -= 1
        self.closing()
        self._unlink()

    def compact(self):
        """
        Rebuild this connection's attribute dictionary without what the class
        already provides (a dictionary never shrinks by itself). Call it once
        the handshake is done (``onOpen``).
        """
        d = self.__dict__
        defaults = _AUTOBAHN_DEFAULTS
        self.__dict__ = {
            k: v
            for k, v in d.items()
            if k not in _HANDSHAKE_LEFTOVERS and not (k in defaults and v is defaults[k])
        }

    def processData(self):
        """
        Take every complete, unfragmented, masked text or binary frame at the
        front of the input in one loop (at most :data:`FRAMES_PER_STEP`),
        and hand each to :meth:`onMessage`.

        This is what Autobahn's ``processData``, ``onFrameBegin``,
        ``onFrameData``, ``onFrameEnd`` and ``onMessageEnd`` do for such a
        frame, with a frame and message object and half a dozen calls fewer
        per frame. Everything else goes to Autobahn unchanged, and so does any
        frame this loop does not accept as it stands: a control frame, a
        fragment, a frame not yet complete, one over the size limit (Autobahn
        closes with 1009), and a text frame that is not valid UTF-8 (Autobahn
        finds the same error and closes with 1007). Frames are handled in
        order, and each one once: the loop stops at the first frame it leaves
        to Autobahn.
        """
        if (
            self.state != _OPEN
            or self.current_frame is not None
            or self.inside_message
            or self._perMessageCompress is not None
            or self.logFrames
            or not self.requireMaskedClientFrames
            or self.failedByMe
        ):
            return WebSocketServerProtocol.processData(self)
        data = self.data
        end_of_data = len(data)
        pos = 0
        limit = self.maxMessagePayloadSize
        frame_limit = self.maxFramePayloadSize
        if limit <= 0 or 0 < frame_limit < limit:
            limit = frame_limit if frame_limit > 0 else _NO_LIMIT
        validate = self.utf8validateIncoming
        traffic = self.trafficStats
        # Frames for the session partner, written to it together when the
        # loop ends: one write (over TLS, one record) instead of one each.
        link = self._batch_link()
        batch = []
        frames_left = FRAMES_PER_STEP
        try:
            while end_of_data - pos >= 6 and frames_left:
                frames_left -= 1
                first = data[pos]
                second = data[pos + 1]
                if (first != _FIN_TEXT and first != _FIN_BINARY) or second < 0x80:
                    break
                length = second & 0x7F
                if length < 126:
                    start = pos + 6
                elif length == 126:
                    if end_of_data - pos < 8:
                        break
                    length = (data[pos + 2] << 8) | data[pos + 3]
                    if length < 126:
                        break
                    start = pos + 8
                else:
                    break
                end = start + length
                if end > end_of_data or length > limit:
                    break
                payload = data[start:end]
                if length:
                    payload = _unmask(payload, data[start - 4 : start])
                if first == _FIN_TEXT and validate and not payload.isascii():
                    try:
                        payload.decode("utf-8")
                    except UnicodeDecodeError:
                        break
                pos = end
                traffic.incomingOctetsWebSocketLevel += length
                traffic.incomingOctetsAppLevel += length
                traffic.incomingWebSocketFrames += 1
                traffic.incomingWebSocketMessages += 1
                if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
                    self._cancelAutoPingTimeoutCall()
                if link is not None:
                    batch.append((first, payload))
                    continue
                self.onMessage(payload, first == _FIN_BINARY)
                if self._listeners is not None:
                    self._fire_message(payload, first == _FIN_BINARY)
                if self.state != _OPEN:
                    break
                # A command may have started or ended a session.
                link = self._batch_link()
        finally:
            if pos:
                self.data = data[pos:]
            if batch:
                link.send_frames(batch)
        if not pos:
            if self._close_frame() or self._pong_frame():
                return len(self.data) > 0
            return WebSocketServerProtocol.processData(self)
        return len(self.data) > 0

    def _take_control_frame(self, first):
        """
        Take a complete, masked control frame whose first byte is ``first``
        (FIN set, no RSV bits) at the front of the input, as Autobahn's
        ``processData`` does, without a frame object, a masker object and
        four calls.

        :returns: its unmasked payload, or None when there is none such to
            take: no such frame first, not yet complete, unmasked, over 125
            bytes or over the frame size limit (all left to Autobahn), and a
            close frame's payload of one byte (Autobahn refuses it).
        """
        data = self.data
        if len(data) < 6 or data[0] != first:
            return None
        # Masked: the mask bit cleared leaves the length; unmasked: over 125.
        length = data[1] ^ 0x80
        if length > 125 or len(data) < 6 + length or (length == 1 and first == _FIN_CLOSE):
            return None
        frame_limit = self.maxFramePayloadSize
        if 0 < frame_limit < length:
            return None
        self.data = data[6 + length :]
        return _unmask(data[6 : 6 + length], data[2:6]) if length else b""

    def _close_frame(self):
        """
        Take a close frame at the front of the input (no payload, or a code
        and a reason: :meth:`_take_control_frame`) as Autobahn's
        ``processControlFrame`` does: its code and reason go to
        ``onCloseFrame``, which checks them.

        :returns: whether it took one.
        """
        payload = self._take_control_frame(_FIN_CLOSE)
        if payload is None:
            return False
        code = reason = None
        if payload:
            code = (payload[0] << 8) | payload[1]
            if len(payload) > 2:
                reason = payload[2:]
        self.onCloseFrame(code, reason)
        return True

    def _pong_frame(self):
        """
        Take a pong at the front of the input (:meth:`_take_control_frame`)
        while no keepalive ping waits for its pong: its payload is then for
        ``onPong`` alone (the dialect ping's, a probe's), as in Autobahn's
        ``processControlFrame``. A keepalive's pong is left to Autobahn.

        :returns: whether it took one.
        """
        if self.autoPingPending:
            return False
        payload = self._take_control_frame(_FIN_PONG)
        if payload is None:
            return False
        self.onPong(payload)
        return True

    def _batch_link(self):
        """
        :returns: the link relayed frames are batched for, unless
            ``on("message")`` has observers (Autobahn's ``onMessageEnd``
            tells them of every message).
        """
        if self._listeners is not None:
            return None
        return self.batch_link()

    def _fire_message(self, payload, is_binary):
        """Tell ``on("message")`` observers, as Autobahn's ``onMessageEnd`` does."""
        d = self.fire("message", payload, is_binary=is_binary)
        d.addErrback(
            lambda f: self.log.error("Firing signal 'message' failed: {fail}", fail=f)
        )

    def write_frames(self, frames):
        """
        Send unfragmented data frames, ``(first header byte, payload)`` each,
        in one write; the caller checked that the connection is open.

        What Autobahn's ``sendFrame`` and ``sendData`` do for such frames,
        without their generality: the headers are built here and the frames
        go to the transport together, with Autobahn's traffic counts kept.
        Whatever needs Autobahn's own path (a queued or chopped write
        pending, frame or octet logging, masking) still takes it.
        """
        if self.send_queue.items or not self._plain_writes:
            for first, payload in frames:
                self.sendFrame(first & 0x0F, payload)
            return
        parts = []
        for first, payload in frames:
            parts.append(_frame_header(first, len(payload)))
            parts.append(payload)
        data = b"".join(parts)
        self._write(data)
        traffic = self.trafficStats
        traffic.outgoingWebSocketFrames += len(frames)
        traffic.outgoingOctetsWireLevel += len(data)

    def write_text(self, text):
        """
        Send ``text`` as one text frame. The same text sent to connection
        after connection (a room's notice to each member) is encoded once,
        and every transport holds the same frame until it is written: a
        thousand members leaving at once queue half a million notices, and
        each its own object would leave the allocator's arenas fragmented
        long after they are sent.
        """
        global _last_text
        if self.send_queue.items or not self._plain_writes:
            return ServerProtocol.write_text(self, text)
        last_text, data, size = _last_text
        if text != last_text:
            payload = text.encode("utf-8")
            size = len(payload)
            data = _frame_header(0x80 | _TEXT, size) + payload
            _last_text = (text, data, size)
        self._write(data)
        traffic = self.trafficStats
        traffic.outgoingWebSocketFrames += 1
        traffic.outgoingOctetsWireLevel += len(data)
        return size


#: The connection whose input is being handled (one at a time: the reactor
#: reads one connection after another); what is written to any connection
#: meanwhile is written together once that input is handled
#: (FastServerProtocol.dataReceived).
_reading = None
#: What was written to each connection meanwhile: ``[size, [bytes, ...]]``.
_held = {}
#: The connections a graceful drop meanwhile left to close once it is
#: handled (FastServerProtocol._closeConnection).
_closing = []

#: The last text :meth:`FastServerProtocol.write_text` encoded, its frame and
#: its payload size.
_last_text = ("", b"\x81\x00", 0)



for _name in WebSocketServerProtocol.CONFIG_ATTRS:
    setattr(FastServerProtocol, _name, _FactoryOption(_name))
for _name, _value in _AUTOBAHN_DEFAULTS.items():
    setattr(FastServerProtocol, _name, _value)
del _name, _value

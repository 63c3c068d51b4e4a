"""
``signalling-client``: a command-line client for trying out a signalling server.

It registers with ``HELLO`` and then does one of three things:

- with ``--call UID`` it starts a session with ``SESSION UID``, sends a test
  SDP offer once ``SESSION_OK`` arrives, prints the reply the callee relays
  and exits once an SDP answer has come;
- with ``--room ROOM_ID`` it joins the room, sends a test message to every
  member (those already there and those who join later) and prints what
  arrives, until interrupted, ``--count`` messages have come or ``--duration``
  has passed;
- with neither, it waits to be called, prints every relayed message, answers
  an SDP offer with a test answer, and exits when the session ends.

The protocol logic lives in :class:`ClientSession`, which does no I/O of its
own; :class:`ClientRun` connects it to a WebSocket (Autobahn on Twisted), and
:func:`main` is the console script. Output lines go to stdout and are flushed
one by one; errors are one line on stderr and a non-zero exit status (see
:data:`EXIT_CODES`).
"""

import argparse
import json
import math
import secrets
import sys
import textwrap

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.util import parse_url
from twisted.internet import defer, error, ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
)
from zope.interface import implementer

import signalling
from signalling.core import wire, words

# The exit statuses, one table for every tool (signalling.core.words).
from signalling.core.words import (
    EXIT_CLOSED,
    EXIT_CONNECT,
    EXIT_GAVE_UP,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_SERVER_ERROR,
    EXIT_TLS,
    EXIT_USAGE,
)

PROG = "signalling-client"
DEFAULT_URL = "wss://localhost:8443"
#: Prefix of the random default uid; six hex digits follow.
DEFAULT_UID_PREFIX = "ws-test-client-"
#: Seconds a TCP connection may take to establish.
CONNECT_TIMEOUT = 10.0
#: Seconds the WebSocket opening and closing handshakes may take.
HANDSHAKE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 3.0

#: Every exit status and what it means, as shown by ``--help``.
EXIT_CODES = (
    (
        EXIT_OK,
        "done: the call was answered, the session or the --count/--duration "
        "of a room ended, or Ctrl-C while waiting or in a room",
    ),
    (EXIT_INTERNAL, "internal error in the client (with a traceback)"),
    (EXIT_USAGE, "bad command line, or a --ca-file that cannot be used"),
    (
        EXIT_CONNECT,
        "cannot connect: refused, unreachable, unknown host, or the "
        "WebSocket handshake failed",
    ),
    (EXIT_TLS, "TLS failure, e.g. a certificate that cannot be verified"),
    (EXIT_SERVER_ERROR, "the server answered ERROR to HELLO, SESSION or ROOM"),
    (
        EXIT_CLOSED,
        "the connection closed unexpectedly, or the server sent "
        "something the protocol does not allow",
    ),
    (
        EXIT_GAVE_UP,
        "--timeout passed, or Ctrl-C, before the call was answered "
        "(or, with --timeout, before the client was done)",
    ),
)

WAIT = "wait"
CALL = "call"
ROOM = "room"

# The WebSocket states we look at.
_CONNECTING = WebSocketProtocol.STATE_CONNECTING
_OPEN = WebSocketProtocol.STATE_OPEN

_TEST_SDP = "\r\n".join(
    [
        "v=0",
        "o=- 0 0 IN IP4 127.0.0.1",
        "s=signalling-client test {kind}",
        "t=0 0",
        "",
    ]
)


def sample_sdp(kind):
    """
    :param kind: ``"offer"`` or ``"answer"``.
    :returns: the JSON text of a test SDP message of that kind, on one line.
    """
    return json.dumps({"sdp": {"type": kind, "sdp": _TEST_SDP.format(kind=kind)}})


def sdp_type(text):
    """
    :returns: the ``type`` of an ``{"sdp": {"type": ...}}`` message (such as
        ``"offer"`` or ``"answer"``), or None when ``text`` is not one.
    """
    try:
        message = json.loads(text)
    except ValueError:
        return None
    if not isinstance(message, dict) or not isinstance(message.get("sdp"), dict):
        return None
    kind = message["sdp"].get("type")
    return kind if isinstance(kind, str) else None


def room_greeting(uid):
    """:returns: the test message a room member sends to every other member."""
    return f"hello from {uid}"


def random_uid():
    """:returns: a fresh default uid, ``ws-test-client-`` and six hex digits."""
    return DEFAULT_UID_PREFIX + secrets.token_hex(3)


class Outcome:
    """
    How a run ended.

    :ivar code: the exit status (one of the ``EXIT_*`` constants).
    :ivar message: the line for stderr (without the program name), or None.
    """

    def __init__(self, code, message=None):
        self.code = code
        self.message = message

    def __repr__(self):
        return f"Outcome({self.code!r}, {self.message!r})"

    def __eq__(self, other):
        if not isinstance(other, Outcome):
            return NotImplemented
        return (self.code, self.message) == (other.code, other.message)


def _close_description(code, reason):
    if code == WebSocketProtocol.CLOSE_STATUS_CODE_ABNORMAL_CLOSE or code is None:
        return "the connection was lost"
    text = f"the server closed the connection (code {code}"
    if reason:
        text += f": {reason}"
    return text + ")"


class ClientSession:
    """
    What the client says and does on one connection, without any I/O.

    The owner calls :meth:`connection_opened`, :meth:`text_received`,
    :meth:`binary_received` and :meth:`connection_closed` as things happen,
    and :meth:`time_is_up`, :meth:`give_up` and :meth:`interrupted` for the
    timers and signals. Once :attr:`result` is set the session is over: it
    has asked the connection to close and ignores further input.

    :param uid: our uid.
    :param mode: :data:`WAIT`, :data:`CALL` or :data:`ROOM`.
    :param target: the callee's uid (call) or the room id (room), else None.
    :param connection: has ``send_text(text)`` and ``close()``.
    :param output: called with each line for stdout.
    :param warn: called with each warning line for stderr.
    :param count: in a room, leave once this many messages have arrived
        (None: no limit).
    :param duration: in a room, leave this many seconds after joining
        (None: no limit).
    :param clock: an ``IReactorTime`` for ``duration``.
    """

    def __init__(
        self,
        uid,
        mode,
        target,
        connection,
        output,
        warn,
        count=None,
        duration=None,
        clock=None,
    ):
        self.uid = uid
        self.mode = mode
        self.target = target
        self.count = count
        self.duration = duration
        self._clock = clock
        self._duration_call = None
        self._connection = connection
        self._output = output
        self._warn = warn
        #: ``connecting``, ``hello``, ``calling``, ``joining``, ``waiting``,
        #: ``in_session``, ``in_room`` or ``done``.
        self.state = "connecting"
        #: The :class:`Outcome` once the session is over.
        self.result = None
        #: How many room messages arrived.
        self.received = 0

    # What happens on the connection.

    def connection_opened(self):
        """The WebSocket is open: register."""
        self.state = "hello"
        self._send(words.hello(self.uid))

    def text_received(self, text):
        """Handle one text message from the server."""
        handler = getattr(self, "_on_" + self.state, None)
        if handler is not None:
            handler(text)

    def binary_received(self, payload):
        """Handle one binary message; only a session partner may send one."""
        if self.state == "done":
            return
        if self.state in ("in_session", "waiting"):
            self.state = "in_session"
            self._output(f"Received: <{len(payload)} bytes of binary data>")
            return
        self._unexpected(f"a binary message of {len(payload)} bytes")

    def connection_closed(self, code, reason):
        """
        The connection closed after it had opened.

        :param code: the close code (1006 when the connection was lost).
        :param reason: the close reason, or None.
        """
        if self.state == "done":
            return
        if (
            self.mode == WAIT
            and self.state in ("waiting", "in_session")
            and code == 1000
        ):
            self._output("Session ended")
            self.finish(EXIT_OK)
            return
        description = _close_description(code, reason)
        if self.state == "in_session" and self.mode == CALL:
            self.finish(
                EXIT_CLOSED,
                f"the session with '{self.target}' ended before an answer "
                f"arrived: {description}",
            )
        else:
            self.finish(EXIT_CLOSED, description)

    # Timers and signals.

    def time_is_up(self):
        """``--duration`` has passed since we joined: leave the room."""
        self._duration_call = None
        if self.state == "in_room":
            self._output(f"Leaving room '{self.target}'")
            self.finish(EXIT_OK)

    def give_up(self, why):
        """Stop now and fail with :data:`EXIT_GAVE_UP`: ``why`` tells the user."""
        if self.state != "done":
            self.finish(EXIT_GAVE_UP, f"{why} ({self._waiting_for()})")

    def interrupted(self):
        """
        Ctrl-C or SIGTERM: leave cleanly. That is the normal end of waiting and
        of a room; a call that was not answered has failed.
        """
        if self.state == "done":
            return
        if self.mode == CALL:
            self.give_up("interrupted")
        else:
            self.finish(EXIT_OK)

    def finish(self, code, message=None):
        """
        End the session with an exit status (the first call wins) and close
        the connection.
        """
        if self.state == "done":
            return
        self.state = "done"
        self.result = Outcome(code, message)
        if self._duration_call is not None:
            if self._duration_call.active():
                self._duration_call.cancel()
            self._duration_call = None
        self._connection.close()

    # Messages, by state.

    def _on_hello(self, text):
        reply = words.parse_reply(text)
        if reply.word == words.HELLO:
            self._output(f"Our uid is '{self.uid}'")
            if self.mode == CALL:
                self.state = "calling"
                self._send(words.session(self.target))
                self._output(f"Calling '{self.target}'")
            elif self.mode == ROOM:
                self.state = "joining"
                self._send(words.room(self.target))
            else:
                self.state = "waiting"
        elif reply.word == words.ERROR:
            self.finish(
                EXIT_SERVER_ERROR, f"the server refused uid '{self.uid}': {text}"
            )
        else:
            self._unexpected(repr(text), "in reply to HELLO")

    def _on_calling(self, text):
        reply = words.parse_reply(text)
        if reply.word == words.SESSION_OK:
            self.state = "in_session"
            self._output(f"Session with '{self.target}' started")
            self._send_sdp("offer")
        elif reply.word == words.ERROR:
            self.finish(EXIT_SERVER_ERROR, f"cannot call '{self.target}': {text}")
        else:
            self._unexpected(repr(text), "in reply to SESSION")

    def _on_waiting(self, text):
        # The callee is told nothing by the server: the first relayed
        # message is the session's start.
        self.state = "in_session"
        self._on_in_session(text)

    def _on_in_session(self, text):
        # Everything in a session is the partner's, relayed verbatim; even
        # an "ERROR ..." line is not the server's.
        self._output(f"Received: {text}")
        kind = sdp_type(text)
        if self.mode == CALL:
            if kind == "answer":
                self.finish(EXIT_OK)
        elif kind == "offer":
            self._send_sdp("answer")
        elif text == words.OFFER_REQUEST:
            self._send_sdp("offer")

    def _on_joining(self, text):
        reply = words.parse_reply(text)
        if reply.word == words.ROOM_OK:
            self.state = "in_room"
            members = reply.uids
            if members:
                self._output(
                    f"Joined room '{self.target}'; members: {' '.join(members)}"
                )
            else:
                self._output(f"Joined room '{self.target}'; no other members")
            for member in members:
                self._greet(member)
            if self.duration is not None:
                self._duration_call = self._clock.callLater(
                    self.duration, self.time_is_up
                )
            self._check_count()
        elif reply.word == words.ERROR:
            self.finish(EXIT_SERVER_ERROR, f"cannot join room '{self.target}': {text}")
        else:
            self._unexpected(repr(text), "in reply to ROOM")

    def _on_in_room(self, text):
        reply = words.parse_reply(text)
        if reply.word == words.ROOM_PEER_JOINED:
            self._output(f"Peer '{reply.uid}' joined")
            self._greet(reply.uid)
        elif reply.word == words.ROOM_PEER_LEFT:
            self._output(f"Peer '{reply.uid}' left")
        elif reply.word == words.ROOM_PEER_MSG:
            self.received += 1
            self._output(f"Message from '{reply.uid}': {reply.payload}")
            self._check_count()
        elif reply.word == words.ERROR:
            # Only a ROOM_PEER_MSG is answered in a room, and only when it
            # fails: most likely its peer has just left. Not fatal.
            self._warn(f"warning: {text}")
        else:
            self._unexpected(repr(text))

    # Helpers.

    def _send(self, text):
        self._connection.send_text(text)

    def _send_sdp(self, kind):
        text = sample_sdp(kind)
        self._send(text)
        self._output(f"Sent: {text}")

    def _greet(self, member):
        greeting = room_greeting(self.uid)
        self._send(words.room_peer_msg(member, greeting))
        self._output(f"Sent to '{member}': {greeting}")

    def _check_count(self):
        if self.count is not None and self.received >= self.count:
            self._output(f"Leaving room '{self.target}'")
            self.finish(EXIT_OK)

    def _unexpected(self, what, context=None):
        message = f"unexpected message from the server: {what}"
        if context:
            message += f" {context}"
        self.finish(EXIT_CLOSED, message)

    def _waiting_for(self):
        """:returns: what the session was waiting for, for the user."""
        if self.state == "connecting":
            return "not connected yet"
        if self.state == "hello":
            return "no reply to HELLO"
        if self.state == "calling":
            return f"no reply to SESSION {self.target}"
        if self.state == "joining":
            return f"no reply to ROOM {self.target}"
        if self.mode == CALL:
            return f"no answer from '{self.target}'"
        if self.state == "waiting":
            return "nobody called"
        if self.state == "in_session":
            return "the session had not ended"
        if self.count is not None:
            return f"{self.received} of {self.count} messages arrived"
        return "still in the room"


# TLS.


@implementer(IOpenSSLClientConnectionCreator)
class UnverifiedTLS:
    """
    TLS without certificate or host name verification (``--insecure``); it
    still sends the host name (SNI) so that a server with several
    certificates picks the right one.

    :param hostname: the host name from the URL.
    """

    def __init__(self, hostname):
        self._options = ssl.CertificateOptions()
        if isIPAddress(hostname) or isIPv6Address(hostname):
            self._server_name = None
        else:
            self._server_name = hostname.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol):
        """:returns: an OpenSSL connection that verifies nothing."""
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        return connection


def load_trust_root(path):
    """
    Read the certificates to trust from a PEM file (one certificate or a
    bundle).

    :returns: an ``IOpenSSLTrustRoot``.
    :raises ValueError: with one line saying what is wrong.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{path} holds no PEM certificate") from None
    return ssl.trustRootFromCertificates(
        [ssl.Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in certificates]
    )


def tls_options(hostname, trust_root=None, insecure=False):
    """
    :returns: the client TLS connection creator for ``hostname``: verified
        against the platform's trust store, or against ``trust_root``, or
        not verified at all when ``insecure``.
    """
    if insecure:
        return UnverifiedTLS(hostname)
    if trust_root is None:
        return ssl.optionsForClientTLS(hostname)
    return ssl.optionsForClientTLS(hostname, trustRoot=trust_root)


def describe_tls_failure(exc, hostname):
    """
    :returns: one line for a TLS failure, or None when ``exc`` is not one.
    """
    from OpenSSL import SSL

    try:
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover - service_identity is required
        VerificationError = ()
    if isinstance(exc, VerificationError):
        return (
            f"the server's certificate is not valid for '{hostname}' "
            "(use the name the certificate was issued for, or --insecure)"
        )
    if isinstance(exc, SSL.Error):
        reasons = []
        for item in exc.args[0] if exc.args and isinstance(exc.args[0], list) else ():
            if isinstance(item, tuple) and item:
                reasons.append(str(item[-1]))
        text = "; ".join(r for r in reasons if r) or "handshake failed"
        if "certificate verify failed" in text:
            text += (
                " (to trust a self-signed certificate use --ca-file PEM, "
                "or --insecure)"
            )
        elif "wrong version number" in text or "packet length too long" in text:
            text += " (is the server using TLS? try a ws:// URL)"
        return "TLS: " + text
    return None


def describe_connect_failure(exc):
    """:returns: a few words for why a TCP connection could not be made."""
    if isinstance(exc, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, error.DNSLookupError):
        return "unknown host"
    if isinstance(exc, (error.TimeoutError, error.TCPTimedOutError)):
        return "timed out"
    if isinstance(exc, error.NoRouteError):
        return "no route to host"
    if isinstance(exc, defer.CancelledError):
        return "cancelled"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# Twisted and Autobahn.


@implementer(IHandshakeListener)
class SignallingClientProtocol(WebSocketClientProtocol):
    """
    Hands the WebSocket's events to the factory's :class:`ClientRun`.

    Autobahn owns ``log``, ``state``, ``peer`` and friends; ours start with ``_``.
    """

    _lost_reason = None
    _tls_done = False

    def handshakeCompleted(self):
        """The TLS handshake is done (only called for ``wss://``)."""
        self._tls_done = True

    def connectionMade(self):
        """Tell the run which protocol it talks through."""
        self.factory.client_run.connected(self)
        super().connectionMade()

    def connectionLost(self, reason):
        """Keep the reason (a TLS failure, say) for :meth:`onClose`."""
        self._lost_reason = reason
        super().connectionLost(reason)

    def onOpen(self):
        """The opening handshake is done."""
        self.factory.client_run.opened()

    def onMessage(self, payload, isBinary):
        """Pass a message on, text decoded."""
        self.factory.client_run.message(payload, isBinary)

    def onClose(self, wasClean, code, reason):
        """The connection is gone, whatever the cause."""
        lost = self._lost_reason.value if self._lost_reason is not None else None
        self.factory.client_run.closed(
            code, reason, self.wasNotCleanReason, lost, self._tls_done
        )


class SignallingClientFactory(WebSocketClientFactory):
    """
    Builds the one :class:`SignallingClientProtocol` of a run.

    :param url: the WebSocket URL.
    :param run: the :class:`ClientRun` the protocol reports to.
    :param reactor: passed to Autobahn.
    """

    protocol = SignallingClientProtocol

    def __init__(self, url, run, reactor=None):
        super().__init__(url, reactor=reactor)
        self.client_run = run
        self.setProtocolOptions(
            openHandshakeTimeout=HANDSHAKE_TIMEOUT,
            closeHandshakeTimeout=CLOSE_TIMEOUT,
        )
        self.noisy = False


class ClientRun:
    """
    One run of the client: connects, feeds a :class:`ClientSession`, and
    fires :attr:`done` with an :class:`Outcome` once the connection is gone.

    :param clock: an ``IReactorTime`` for ``--duration`` and ``--timeout``.
    :param options: the parsed command line (:func:`parse_args`).
    :param endpoint: an ``IStreamClientEndpoint`` to connect through.
    :param output: called with each line for stdout.
    :param warn: called with each line for stderr.
    :param reactor: passed to Autobahn; the global reactor when None.
    """

    def __init__(self, clock, options, endpoint, output, warn, reactor=None):
        self._clock = clock
        self._options = options
        self._endpoint = endpoint
        self._reactor = reactor
        self.session = ClientSession(
            options.id,
            options.mode,
            options.target,
            self,
            output,
            warn,
            count=options.count,
            duration=options.duration,
            clock=clock,
        )
        self.done = defer.Deferred()
        self._connecting = None
        self._protocol = None
        self._opened = False
        self._timeout_call = None

    def start(self):
        """
        Connect and start the timers.

        :returns: :attr:`done`.
        """
        if self._options.timeout is not None:
            timeout = self._options.timeout
            self._timeout_call = self._clock.callLater(
                timeout, self.session.give_up, f"gave up after {timeout:g} seconds"
            )
        factory = SignallingClientFactory(
            self._options.url, self, reactor=self._reactor
        )
        self._connecting = self._endpoint.connect(factory)
        self._connecting.addCallbacks(self._connect_done, self._connect_failed)
        return self.done

    def interrupt(self):
        """
        Ctrl-C or SIGTERM: leave cleanly.

        :returns: a Deferred that fires once the connection is gone, or None.
        """
        if self.done.called:
            return None
        waiting = defer.Deferred()
        self.done.addBoth(lambda result: (waiting.callback(None), result)[1])
        self.session.interrupted()
        return waiting

    # The connection, as ClientSession sees it.

    def send_text(self, text):
        """Send one text message, if the connection is open."""
        if self._protocol is not None and self._protocol.state == _OPEN:
            self._protocol.sendMessage(text.encode("utf-8"), isBinary=False)

    def close(self):
        """Close the connection in whatever state it is in."""
        protocol = self._protocol
        if protocol is None:
            if self._connecting is not None and not self._connecting.called:
                self._connecting.cancel()
            return
        if protocol.state == _OPEN:
            protocol.sendClose(1000)
        elif protocol.state == _CONNECTING:
            protocol.dropConnection(abort=True)

    # Events from the endpoint and the protocol.

    def _connect_done(self, protocol):
        self._connecting = None

    def _connect_failed(self, failure):
        self._connecting = None
        exc = failure.value
        if self.session.result is None:
            tls_failure = describe_tls_failure(exc, self._options.host)
            if tls_failure is not None:
                self.session.finish(
                    EXIT_TLS, f"cannot connect to {self._options.url}: {tls_failure}"
                )
            else:
                self.session.finish(
                    EXIT_CONNECT,
                    f"cannot connect to {self._options.url}: "
                    f"{describe_connect_failure(exc)}",
                )
        self._fire()

    def connected(self, protocol):
        """The TCP (and TLS) connection exists; the WebSocket handshake starts."""
        self._protocol = protocol
        if self.session.result is not None:
            # Finished (a timeout) while connecting.
            protocol.dropConnection(abort=True)

    def opened(self):
        """The WebSocket is open."""
        self._opened = True
        if self.session.result is not None:
            self.close()
            return
        self.session.connection_opened()

    def message(self, payload, is_binary):
        """One message arrived."""
        if is_binary:
            self.session.binary_received(payload)
            return
        self.session.text_received(payload.decode("utf-8", errors="replace"))

    def closed(self, code, reason, unclean_reason, lost, tls_done=False):
        """
        The connection is gone.

        :param code: the close code; 1006 when it was lost.
        :param reason: the close reason, or None.
        :param unclean_reason: Autobahn's explanation of an unclean close.
        :param lost: the exception the connection was lost with, or None.
        :param tls_done: whether a TLS handshake completed.
        """
        if self.session.result is None:
            if self._opened:
                self.session.connection_closed(code, reason)
            else:
                self._handshake_failed(code, reason, unclean_reason, lost, tls_done)
        self._fire()

    def _handshake_failed(self, code, reason, unclean_reason, lost, tls_done):
        """Finish with one line for a connection that never opened."""
        prefix = f"cannot connect to {self._options.url}: "
        tls_failure = describe_tls_failure(lost, self._options.host)
        if tls_failure is None and self._options.secure and not tls_done:
            tls_failure = (
                "TLS: the TLS handshake did not complete "
                "(is the server using TLS? try a ws:// URL)"
            )
        if tls_failure is not None:
            self.session.finish(EXIT_TLS, prefix + tls_failure)
            return
        why = unclean_reason or _close_description(code, reason)
        if why.startswith("peer dropped the TCP connection"):
            why = "the server closed the connection during the WebSocket handshake"
            if not self._options.secure:
                why += " (is it a wss:// server?)"
        else:
            why = "WebSocket handshake failed: " + why
        self.session.finish(EXIT_CONNECT, prefix + why)

    def _fire(self):
        if self.done.called:
            return
        if self._timeout_call is not None and self._timeout_call.active():
            self._timeout_call.cancel()
        self._timeout_call = None
        result = self.session.result
        if result is None:
            result = Outcome(EXIT_CLOSED, "the connection closed")
        self.done.callback(result)


# The command line.


def _uid(text):
    try:
        wire.check_uid(text)
    except wire.WireError as e:
        raise argparse.ArgumentTypeError(e.reason) from None
    return text


def _room_id(text):
    try:
        wire.check_room_id(text)
    except wire.WireError as e:
        raise argparse.ArgumentTypeError(e.reason) from None
    return text


def _url(text):
    try:
        parsed = parse_url(text)
    except Exception as e:
        raise argparse.ArgumentTypeError(" ".join(str(e).split())) from None
    if parsed[1] == "unix":
        raise argparse.ArgumentTypeError("Unix socket URLs are not supported")
    return text


def _number(kind, minimum, inclusive):
    """:returns: an argparse type for a finite number above ``minimum``."""

    def coerce(text):
        try:
            number = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(number):
            raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
        if number < minimum or (not inclusive and number == minimum):
            relation = "at least" if inclusive else "greater than"
            raise argparse.ArgumentTypeError(
                f"must be {relation} {minimum}, not {text}"
            )
        return number

    return coerce


def _epilog():
    lines = ["exit status:"]
    for code, meaning in EXIT_CODES:
        lines += textwrap.wrap(
            meaning, width=76, initial_indent=f"  {code}  ", subsequent_indent="     "
        )
    lines += [
        "",
        "examples:",
        f"  {PROG} --url wss://localhost:8443 --ca-file certs/cert.pem",
        "      wait to be called; prints \"Our uid is '...'\"",
        f"  {PROG} --ca-file certs/cert.pem --call ws-test-client-8f63b9",
        "      call that client, send a test offer, print its answer",
        f"  {PROG} --url ws://127.0.0.1:8080 --room 42 --count 2",
        "      join room 42, greet everyone, leave after 2 messages",
    ]
    return "\n".join(lines)


def build_parser():
    """:returns: the ``argparse`` parser of ``signalling-client``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Try out a WebRTC signalling server. After HELLO the client waits\n"
            "to be called (it answers an SDP offer with a test answer and exits\n"
            "when the session ends), or calls a peer (--call), or joins a room\n"
            "(--room). What arrives is printed to stdout; an error is one line\n"
            "on stderr and a non-zero exit status."
        ),
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--url",
        type=_url,
        default=DEFAULT_URL,
        help="the server's WebSocket URL, ws:// or wss:// (default: %(default)s)",
    )
    parser.add_argument(
        "--id",
        type=_uid,
        default=None,
        metavar="UID",
        help="our uid (default: a random ws-test-client-XXXXXX)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--call",
        type=_uid,
        metavar="UID",
        help="start a session with this peer, send a test offer, print the "
        "reply and exit once an answer arrives",
    )
    mode.add_argument(
        "--room",
        type=_room_id,
        metavar="ROOM_ID",
        help="join this room, send a test message to every member (also "
        "those who join later) and print what arrives; runs until "
        "interrupted unless --count or --duration is given",
    )
    parser.add_argument(
        "--count",
        type=_number(int, 0, True),
        metavar="N",
        help="with --room: leave and exit 0 once N messages have arrived",
    )
    parser.add_argument(
        "--duration",
        type=_number(float, 0, True),
        metavar="SECONDS",
        help="with --room: leave and exit 0 after SECONDS in the room",
    )
    parser.add_argument(
        "--timeout",
        type=_number(float, 0, False),
        metavar="SECONDS",
        help=f"give up with exit status {EXIT_GAVE_UP} if not done after "
        "SECONDS (default: wait forever)",
    )
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument(
        "--ca-file",
        metavar="PEM",
        help="trust the certificate(s) in this PEM file instead of the "
        "system's trust store (e.g. the server's self-signed certs/cert.pem)",
    )
    tls.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify the server's TLS certificate (for tests only)",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {signalling.__version__}"
    )
    return parser


def parse_args(argv=None):
    """
    Parse and check the command line.

    :param argv: the arguments without the program name; ``sys.argv[1:]``
        when None.
    :returns: an ``argparse.Namespace`` with the options and the derived
        ``mode`` (:data:`WAIT`, :data:`CALL` or :data:`ROOM`), ``target``,
        ``secure``, ``host``, ``port`` and ``trust_root``.
    :raises SystemExit: with status 2 and a usage message on stderr.
    """
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.room is None:
        for name in ("count", "duration"):
            if getattr(options, name) is not None:
                parser.error(f"--{name} needs --room")
    if options.call is not None:
        options.mode, options.target = CALL, options.call
    elif options.room is not None:
        options.mode, options.target = ROOM, options.room
    else:
        options.mode, options.target = WAIT, None
    if options.id is None:
        options.id = random_uid()
    secure, host, port = parse_url(options.url)[:3]
    options.secure, options.host, options.port = secure, host, port
    if not secure and (options.ca_file is not None or options.insecure):
        parser.error(
            f"--{'ca-file' if options.ca_file is not None else 'insecure'} "
            "needs a wss:// URL"
        )
    options.trust_root = None
    if options.ca_file is not None:
        try:
            options.trust_root = load_trust_root(options.ca_file)
        except ValueError as e:
            parser.error(f"--ca-file: {e}")
    return options


def make_endpoint(reactor, options):
    """
    :returns: the client endpoint for the parsed ``options``: TCP to the
        URL's host and port, wrapped in TLS for ``wss://``.
    """
    endpoint = HostnameEndpoint(
        reactor, options.host, options.port, timeout=CONNECT_TIMEOUT
    )
    if options.secure:
        endpoint = wrapClientTLS(
            tls_options(options.host, options.trust_root, options.insecure), endpoint
        )
    return endpoint


def _printer(stream):
    def output(line):
        print(line, file=stream, flush=True)

    return output


def run(reactor, options, stdout=None, stderr=None):
    """
    Run the client on ``reactor`` until it is done.

    Ctrl-C and SIGTERM (which stop the reactor) close the connection cleanly
    first.

    :param options: from :func:`parse_args`.
    :returns: a Deferred that fires with an :class:`Outcome`.
    """
    output = _printer(stdout if stdout is not None else sys.stdout)
    warn_stream = stderr if stderr is not None else sys.stderr

    def warn(line):
        print(f"{PROG}: {line}", file=warn_stream, flush=True)

    if options.insecure:
        warn("warning: --insecure: the server's TLS certificate is not verified")
    client = ClientRun(
        reactor, options, make_endpoint(reactor, options), output, warn, reactor=reactor
    )
    shutting_down = []

    def interrupt():
        shutting_down.append(True)
        return client.interrupt()

    trigger = reactor.addSystemEventTrigger("before", "shutdown", interrupt)
    d = client.start()

    def finished(outcome):
        if not shutting_down:
            reactor.removeSystemEventTrigger(trigger)
        return outcome

    return d.addBoth(finished)


def main(argv=None):
    """
    The ``signalling-client`` console script.

    :param argv: the arguments without the program name; ``sys.argv[1:]``
        when None.
    """
    from twisted.internet import task

    options = parse_args(argv)

    def report(outcome):
        if outcome.message:
            print(f"{PROG}: {outcome.message}", file=sys.stderr, flush=True)
        if outcome.code != EXIT_OK:
            raise SystemExit(outcome.code)

    def crashed(failure):
        failure.trap(Exception)
        print(f"{PROG}: internal error:", file=sys.stderr)
        failure.printTraceback(file=sys.stderr)
        sys.stderr.flush()
        raise SystemExit(EXIT_INTERNAL)

    def start(reactor):
        d = defer.maybeDeferred(run, reactor, options)
        d.addCallbacks(report, crashed)
        return d

    task.react(start)


if __name__ == "__main__":
    main()

"""
The logic of one connection that speaks the JSON dialect: the protocol of
GStreamer's ``webrtcsink``, ``webrtcsrc`` and ``gstwebrtc-api``, as the upstream
``gst-webrtc-signalling-server`` (gst-plugins-rs) serves it, on the registry
the examples' dialect uses (:class:`signalling.core.interfaces.IRegistry`).

The server names the peer (a UUIDv4) and welcomes it; every message after
that is handled in order, one at a time (input that arrives while the
registry works on a request waits). What the upstream server cannot parse is
dropped without a reply, as there; a refused request is answered ``error``
to the peer that made it. Notifications that arrive before ``welcome`` went
out follow it.

Where this server differs from the upstream one, on purpose:

- ``newPeer`` (an internal message there, which a client could send to reset
  its own status) is dropped;
- ``endSession`` for a session the sender is not part of is refused without
  ending it (there it is ended, and neither side is told).
"""

import uuid
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from signalling.core import json_wire
from signalling.core.echo import quote
from signalling.core.connection import ConnectionCommon
from signalling.core.interfaces import (
    TEXT_FRAME,
    IJsonPeer,
    JsonRefused,
    SignallingError,
    Unavailable,
)

#: What a peer is told when its requests come faster than the rate allows.
RATE_LIMITED = "rate limit exceeded"


def json_token_allows(grant):
    """:returns: True: every token is for the JSON dialect (its claims apply per request)."""
    return True


@implementer(IJsonPeer)
class JsonConnection(ConnectionCommon):
    """
    One JSON-dialect connection's state and logic.

    :param shared: what the connections of a server share (see
        :class:`signalling.core.connection.ConnectionCommon`).
    :param output: the :class:`signalling.core.interfaces.IConnectionOutput`.

    :ivar uid: the peer id, once welcomed.
    :ivar version: the protocol version the peer chose (``v1_0`` unless it
        sent ``setProtocolVersion``).
    """

    _log = Logger()
    rate_limited = RATE_LIMITED
    _unregistered = "(not welcomed)"

    __slots__ = ("version", "_peer_id", "_first", "_pending")

    def __init__(self, shared, output):
        super().__init__(shared, output)
        self.version = json_wire.V1_0
        self._peer_id = None
        #: True until a message was handled (setProtocolVersion must be first).
        self._first = True
        #: True while the registry works on a request.
        self._pending = False
        #: Notifications that came before ``welcome`` went out, else None.
        self._queued = []

    def __repr__(self):
        return f"<JsonConnection {self.uid or '?'} at {self._output.peer_addr}>"

    # What happens on the wire.

    def opened(self):
        """The WebSocket is open: name the peer and welcome it."""
        peer_id = self._peer_id = str(uuid.uuid4())
        self._call(self._welcomed, self._shared.registry.welcome, peer_id, self)

    def _handle(self, payload, is_binary):
        if is_binary:
            return  # dropped, as upstream does
        text = payload.decode("utf-8")
        message = json_wire.parse(text)
        if message is None:
            self._log.debug(
                "dropped a message from {uid} that is not the protocol's: {start!r}",
                uid=self.uid,
                start=text[:64],
            )
            return
        first, self._first = self._first, False
        registry = self._shared.registry
        kind = message.type
        if kind == "peer":
            if len(message.fields["sessionId"]) > json_wire.MAX_ID_LENGTH:
                return  # no such session: dropped, as for any unknown one
            if message.text is not None:
                # Forwarded as it came: no re-encoding on the relay path.
                message.raw = payload
            self._call(None, registry.json_message, self.uid, message)
            return
        if not self._rate_allows():
            return
        fields = message.fields
        grant = self._output.grant
        if kind == "setPeerStatus":
            self._set_peer_status(registry, grant, fields)
        elif kind == "startSession":
            peer_id = fields["peerId"]
            if len(peer_id) > json_wire.MAX_ID_LENGTH:
                # Names nobody: answered here, with a bounded echo.
                self._send_error(json_wire.peer_not_found(peer_id))
                return
            names = grant.calls if grant is not None else None
            self._call(
                None,
                registry.start_json_session,
                self.uid,
                peer_id,
                fields["offer"],
                names,
            )
        elif kind == "endSession" or kind == "endSessionV1_1":
            if fields["error"] is not None and self.version == json_wire.V1_0:
                self._send_error(json_wire.end_needs_v1_1(self.uid))
                return
            if len(fields["sessionId"]) > json_wire.MAX_ID_LENGTH:
                return  # no such session, as for any unknown one
            self._call(
                None, registry.end_json_session, self.uid, fields["sessionId"], fields["error"]
            )
        elif kind == "list":
            self._call(self._listed, registry.json_peers, json_wire.PRODUCER)
        elif kind == "listConsumers":
            self._call(self._listed_consumers, registry.json_peers, json_wire.CONSUMER)
        elif kind == "setProtocolVersion":
            if not first:
                self._send_error(
                    f"Protocol version selection for peer '{self.uid}' must be first message"
                )
            else:
                self.version = fields["version"]

    def _set_peer_status(self, registry, grant, fields):
        """
        ``setPeerStatus``: within what the token allows (its ``roles``; its
        ``sub`` names the peer: ``meta.name``), and with a ``meta`` no
        larger than the server keeps.
        """
        roles = fields["roles"]
        meta = fields["meta"]
        if grant is not None:
            if not grant.allows_roles(roles):
                self._send_error(
                    f"the token does not allow the roles {json_wire.roles_debug(roles)}",
                    "not_allowed",
                )
                return
            if grant.uid is not None:
                named = json_wire.named(meta, grant.uid)
                if named is None:
                    self._send_error(
                        f"the token names this peer {quote(grant.uid)}: its meta must be "
                        "an object without another name",
                        "not_allowed",
                    )
                    return
                meta = named
        size = len(meta) if meta.isascii() else len(meta.encode("utf-8"))
        limit = self._settings.max_meta_size
        if size > limit:
            self._send_error(json_wire.meta_too_large(self.uid, size, limit), "meta_too_large")
            return
        self._call(None, registry.set_peer_status, self.uid, roles, meta, fields["peerId"])

    def _may_call(self, meta):
        """:returns: whether the token's ``calls`` (if any) name the peer with ``meta``."""
        grant = self._output.grant
        return grant is None or grant.calls is None or json_wire.meta_name(meta) in grant.calls

    # Asking the registry.

    def _call(self, answered, method, *args):
        """
        Ask the registry; until it answers, input waits. ``answered(result)``
        follows a success; a :class:`JsonRefused` is answered ``error``.
        """
        try:
            result = method(*args)
        except JsonRefused as e:
            self._send_error(e.details)
            return
        except SignallingError:
            # Answered at once: the server's id for the peer was taken.
            self._refused(Failure())
            return
        except Exception:
            self._unexpected(Failure())
            return
        if isinstance(result, defer.Deferred):
            self._pending = True
            result.addCallbacks(self._done, self._refused, callbackArgs=(answered,))
            result.addErrback(self._unexpected)
        elif answered is not None:
            answered(result)

    def _done(self, result, answered):
        self._pending = False
        if self._released:
            if answered == self._welcomed:
                self._release(self._peer_id)
            return
        if answered is not None:
            answered(result)
        self._resume()

    def _refused(self, failure):
        self._pending = False
        if not failure.check(SignallingError):
            return failure
        if not self._released:
            if failure.check(Unavailable):
                self.unavailable()
                return None
            if failure.check(JsonRefused):
                self._send_error(failure.value.details)
            elif self.uid is None:
                # The id was taken (a collision of UUIDs): try again.
                self.opened()
                return None
            self._resume()
        return None

    def _welcomed(self, result):
        self.uid = self._peer_id
        self._send_text(json_wire.welcome(self.uid))
        self._log.info(
            "peer {uid} welcomed from {peer_addr} (JSON dialect)",
            uid=self.uid,
            peer_addr=self._output.peer_addr,
        )
        queued, self._queued = self._queued, None
        for method, *args in queued:
            method(*args)

    def _listed(self, producers):
        """Answer ``list``: the producers, those the token may call."""
        self._send_text(json_wire.producer_list(p for p in producers if self._may_call(p[1])))

    def _listed_consumers(self, consumers):
        """Answer ``listConsumers``: the consumers, those the token may call."""
        self._send_text(json_wire.consumer_list(c for c in consumers if self._may_call(c[1])))

    # IJsonPeer: what the registry tells this peer.

    def _later(self, method, *args):
        """:returns: True if ``welcome`` has not gone out yet (the call waits for it)."""
        if self._queued is not None:
            self._queued.append((method, *args))
            return True
        return False

    def peer_status_changed(self, peer_id, roles, meta):
        if self._later(self.peer_status_changed, peer_id, roles, meta):
            return
        if peer_id != self.uid and not self._may_call(meta):
            return  # a peer the token does not let this one see
        self._send_text(json_wire.peer_status_changed(peer_id, roles, meta))

    def json_session_started(self, peer_id, session_id):
        if not self._later(self.json_session_started, peer_id, session_id):
            self._log.info(
                "session {session_id} of consumer {uid} with producer {peer_id}",
                session_id=session_id,
                uid=self.uid,
                peer_id=peer_id,
            )
            self._send_text(json_wire.session_started(peer_id, session_id))

    def json_start_session(self, peer_id, session_id, offer):
        if not self._later(self.json_start_session, peer_id, session_id, offer):
            self._stats.sessions_started += 1
            self._send_text(json_wire.start_session(peer_id, session_id, offer))

    def json_peer_message(self, message):
        if self._later(self.json_peer_message, message):
            return
        stats = self._stats
        stats.json_messages += 1
        raw = message.raw
        if raw is not None:
            stats.json_bytes += len(raw)
            self._output.send_frames(((TEXT_FRAME, raw),))
        else:
            text = json_wire.peer_message(message)
            stats.json_bytes += len(text.encode("utf-8"))
            self._send_text(text)

    def json_session_ended(self, session_id, error):
        if not self._later(self.json_session_ended, session_id, error):
            self._send_text(json_wire.end_session(session_id, error, self.version))

    #: The ``error`` message of a refusal.
    _error_text = staticmethod(json_wire.error)

    def _send_error(self, details, kind="json_refused"):
        ConnectionCommon._send_error(self, details, kind)

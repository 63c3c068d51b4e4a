"""
The wire format of the JSON dialect: the protocol of GStreamer's own WebRTC
elements (``webrtcsink``, ``webrtcsrc``, the ``gstwebrtc-api`` library) and of
``gst-webrtc-signalling-server`` (gst-plugins-rs, ``net/webrtc/protocol``).

Text frames, one JSON object each, with a ``"type"`` in camelCase. What the
upstream server cannot parse it drops without a reply, and so does this
module: :func:`parse` returns None for invalid JSON, an unknown type, a
missing or mistyped field. Fields the upstream types declare as optional are
sent as ``null``, never left out (clients read them). Standard library only.
"""

import json

#: Roles of a peer, in the words of the protocol.
PRODUCER = "producer"
CONSUMER = "consumer"
LISTENER = "listener"
ROLES = (PRODUCER, CONSUMER, LISTENER)
#: How the upstream server names roles in its error texts (Rust's Debug).
_ROLE_NAMES = {PRODUCER: "Producer", CONSUMER: "Consumer", LISTENER: "Listener"}

#: Protocol versions a client may choose with ``setProtocolVersion``.
V1_0 = "v1_0"
V1_1 = "v1_1"
VERSIONS = (V1_0, V1_1)

_decode = json.JSONDecoder().decode
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class Message:
    """
    One parsed client message: ``type`` and its fields, as the upstream
    server's types hold them (a missing optional field is None).
    """

    __slots__ = ("type", "fields", "text", "raw")

    def __init__(self, type_, fields, text):
        self.type = type_
        self.fields = fields
        #: The frame's text, or None for a ``peer`` message that holds more
        #: than the protocol defines (it is forwarded rebuilt).
        self.text = text
        #: The frame's payload (UTF-8) where it may be forwarded as it came.
        self.raw = None

    def __getitem__(self, name):
        return self.fields[name]

    def __repr__(self):
        return f"Message({self.type!r}, {self.fields!r})"


def _is_u32(value):
    return type(value) is int and 0 <= value <= 0xFFFFFFFF


def _optional_string(obj, name):
    """:returns: ``(ok, value)`` for an optional string field."""
    value = obj.get(name)
    return (value is None or type(value) is str), value


def _peer_inner(obj):
    """
    :returns: ``("sdp", {"type", "sdp"})`` or ``("ice", {"candidate",
        "sdpMLineIndex"})``, the first of the two keys the object holds, or
        None when neither is valid.
    """
    for key in obj:
        if key == "sdp":
            sdp = obj[key]
            if (
                type(sdp) is dict
                and sdp.get("type") in ("offer", "answer")
                and type(sdp.get("sdp")) is str
            ):
                return "sdp", sdp
            return None
        if key == "ice":
            ice = obj[key]
            if (
                type(ice) is dict
                and type(ice.get("candidate")) is str
                and _is_u32(ice.get("sdpMLineIndex"))
            ):
                return "ice", ice
            return None
    return None


def parse(text):
    """
    :param text: a text frame's payload (``str``).
    :returns: a :class:`Message`, or None for what the upstream server
        drops without a reply.
    """
    try:
        obj = _decode(text)
    except ValueError:
        return None
    if type(obj) is not dict:
        return None
    kind = obj.get("type")
    if kind == "peer":
        session_id = obj.get("sessionId")
        inner = _peer_inner(obj)
        if type(session_id) is not str or inner is None:
            return None
        key, value = inner
        fields = {"sessionId": session_id, key: value}
        if len(obj) != 3 or len(value) != 2:
            # More than the protocol defines: forwarded without the rest.
            text = None
        return Message(kind, fields, text)
    if kind == "setPeerStatus":
        roles = obj.get("roles")
        if type(roles) is not list or not all(role in ROLES for role in roles):
            return None
        ok, peer_id = _optional_string(obj, "peerId")
        if not ok:
            return None
        return Message(kind, {"roles": roles, "meta": obj.get("meta"), "peerId": peer_id}, text)
    if kind == "startSession":
        peer_id = obj.get("peerId")
        ok, offer = _optional_string(obj, "offer")
        if type(peer_id) is not str or not ok:
            return None
        return Message(kind, {"peerId": peer_id, "offer": offer}, text)
    if kind == "endSession" or kind == "endSessionV1_1":
        session_id = obj.get("sessionId")
        if type(session_id) is not str:
            return None
        error = None
        if kind == "endSessionV1_1":
            ok, error = _optional_string(obj, "error")
            if not ok:
                return None
        return Message(kind, {"sessionId": session_id, "error": error}, text)
    if kind == "list" or kind == "listConsumers":
        return Message(kind, {}, text)
    if kind == "setProtocolVersion":
        version = obj.get("version")
        if version not in VERSIONS:
            return None
        return Message(kind, {"version": version}, text)
    return None


def looks_like_json(text):
    """:returns: whether a first message could be the JSON dialect's (an object)."""
    return text.lstrip()[:1] == "{"


# What the server sends.


def welcome(peer_id):
    return _encode({"type": "welcome", "peerId": peer_id})


def peer_status_changed(peer_id, roles, meta):
    return _encode({"type": "peerStatusChanged", "roles": roles, "meta": meta, "peerId": peer_id})


def start_session(peer_id, session_id, offer):
    return _encode(
        {"type": "startSession", "peerId": peer_id, "sessionId": session_id, "offer": offer}
    )


def session_started(peer_id, session_id):
    return _encode({"type": "sessionStarted", "peerId": peer_id, "sessionId": session_id})


def end_session(session_id, error, version):
    """:returns: ``endSessionV1_1`` (with ``error``) for a v1.1 peer, else ``endSession``."""
    if version == V1_1:
        return _encode({"type": "endSessionV1_1", "sessionId": session_id, "error": error})
    return _encode({"type": "endSession", "sessionId": session_id})


def peer_message(message):
    """
    :returns: the ``peer`` message to forward: as the sender wrote it when it
        holds nothing but what the protocol defines (no re-encoding on the
        relay path), else rebuilt from those fields alone, as the upstream
        server forwards it.
    """
    if message.text is not None:
        return message.text
    fields = message.fields
    out = {"type": "peer", "sessionId": fields["sessionId"]}
    if "sdp" in fields:
        sdp = fields["sdp"]
        out["sdp"] = {"type": sdp["type"], "sdp": sdp["sdp"]}
    else:
        ice = fields["ice"]
        out["ice"] = {"candidate": ice["candidate"], "sdpMLineIndex": ice["sdpMLineIndex"]}
    return _encode(out)


def producer_list(producers):
    """:param producers: ``(id, meta)`` pairs."""
    return _encode({"type": "list", "producers": [{"id": i, "meta": m} for i, m in producers]})


def consumer_list(consumers):
    return _encode(
        {"type": "listConsumers", "consumers": [{"id": i, "meta": m} for i, m in consumers]}
    )


def error(details):
    return _encode({"type": "error", "details": details})


def roles_debug(roles):
    """:returns: ``roles`` as the upstream server writes them in errors: ``[Producer, Listener]``."""
    return "[" + ", ".join(_ROLE_NAMES[role] for role in roles) + "]"

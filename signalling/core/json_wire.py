"""
The wire format of the JSON dialect: the protocol of GStreamer's own WebRTC
elements (``webrtcsink``, ``webrtcsrc``, the ``gstwebrtc-api`` library) and of
``gst-webrtc-signalling-server`` (gst-plugins-rs, ``net/webrtc/protocol``).

Text frames, one JSON object each, with a ``"type"`` in camelCase. What the
upstream server cannot parse it drops without a reply, and so does this
module: :func:`parse` returns None for invalid JSON, an unknown type, a
missing or mistyped field, and so are what upstream would take but this
server does not: a message nested too deeply for the decoder, an object with
a key twice (checked as one value, read as another by the peer it is
forwarded to), and ``meta`` nested more than :data:`MAX_DEPTH` levels.
Fields the upstream types declare as optional are sent as ``null``, never
left out (clients read them).

A peer's ``meta`` is held as its canonical JSON text (:func:`canonical`):
it costs about its size, whatever its shape, and every reply that carries
it embeds the text as it is, so no stored value can fail another client's
reply. Standard library only.
"""

import json

from signalling.core.echo import clip, quote

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

#: Most levels of nesting of a ``meta`` value (1: a flat object or list).
MAX_DEPTH = 32


class _DuplicateKey(ValueError):
    """An object holds a key twice."""


def _unique_keys(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey()
    return obj


_decode = json.JSONDecoder(object_pairs_hook=_unique_keys).decode
_decode_plain = json.JSONDecoder().decode

#: The double quotes of a ``peer`` message that holds the protocol's keys
#: and nothing else, by its second key: ``ice`` has eight strings (five
#: keys, the type, the session id and the candidate), ``sdp`` nine (the
#: type and the SDP). One more is an escaped quote in a value; a key given
#: twice is a string, two quotes, more than its decoded form shows.
_PEER_QUOTES = {"ice": 2 * 8 + 1, "sdp": 2 * 9 + 1}


def _has_a_key_twice(text):
    """
    :returns: whether the JSON ``text`` gives some object a key twice, or
        nests deeper than the checking decoder takes (which refuses it as
        the plain decoder refuses deeper nesting).
    """
    try:
        _decode(text)
    except (_DuplicateKey, RecursionError):
        return True
    return False
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_canonical = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode


def canonical(value):
    """:returns: ``value`` (parsed JSON) as canonical JSON text: keys sorted, no spaces."""
    return _canonical(value)


#: The canonical text of a missing ``meta``.
NO_META = "null"


def depth(value, limit=MAX_DEPTH):
    """
    :returns: how many levels of objects and lists ``value`` nests (0 for a
        scalar), counted without recursion, or ``limit + 1`` as soon as it
        is seen to nest deeper than ``limit``.
    """
    deepest = 0
    stack = [(value, 1)]
    pop = stack.pop
    push = stack.append
    while stack:
        item, level = pop()
        kind = type(item)
        if kind is dict:
            children = item.values()
        elif kind is list:
            children = item
        else:
            continue
        if level > deepest:
            deepest = level
            if deepest > limit:
                return deepest
        for child in children:
            if type(child) in (dict, list):
                push((child, level + 1))
    return deepest


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
        obj = _decode_plain(text)
    except (ValueError, RecursionError):
        # Not JSON, or nested past what the decoder can take.
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
            # More than the protocol defines: forwarded without the rest
            # (rebuilt from what was checked).
            text = None
        elif text.count('"') > _PEER_QUOTES[key] and _has_a_key_twice(text):
            # Forwarded as it came, it must be read as it was checked.
            return None
        return Message(kind, fields, text)
    # Any other message is rare: decoded again, with a key twice refused.
    if _has_a_key_twice(text):
        return None
    if kind == "setPeerStatus":
        roles = obj.get("roles")
        if type(roles) is not list or not all(role in ROLES for role in roles):
            return None
        ok, peer_id = _optional_string(obj, "peerId")
        if not ok:
            return None
        meta = obj.get("meta")
        if type(meta) in (dict, list) and depth(meta) > MAX_DEPTH:
            return None
        return Message(kind, {"roles": roles, "meta": _canonical(meta), "peerId": peer_id}, text)
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


# What the server sends.


def welcome(peer_id):
    return _encode({"type": "welcome", "peerId": peer_id})


def peer_status_changed(peer_id, roles, meta):
    """:param meta: the peer's meta as canonical JSON text."""
    return (
        '{"type":"peerStatusChanged","roles":'
        + _encode(roles)
        + ',"meta":'
        + meta
        + ',"peerId":'
        + _encode(peer_id)
        + "}"
    )


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


def _peer_list(kind, key, peers):
    return (
        '{"type":"'
        + kind
        + '","'
        + key
        + '":['
        + ",".join('{"id":' + _encode(i) + ',"meta":' + m + "}" for i, m in peers)
        + "]}"
    )


def producer_list(producers):
    """:param producers: ``(id, meta)`` pairs, each meta canonical JSON text."""
    return _peer_list("list", "producers", producers)


def consumer_list(consumers):
    """:param consumers: ``(id, meta)`` pairs, each meta canonical JSON text."""
    return _peer_list("listConsumers", "consumers", consumers)


def error(details):
    return _encode({"type": "error", "details": details})


def roles_debug(roles):
    """:returns: ``roles`` as the upstream server writes them in errors: ``[Producer, Listener]``."""
    return clip("[" + ", ".join(_ROLE_NAMES[role] for role in roles) + "]")


#: Longest peer or session id that can name anything (the examples' uids;
#: the server's own ids are UUIDs): a longer one is answered at once.
MAX_ID_LENGTH = 256


def peer_not_found(peer_id):
    """:returns: upstream's refusal of a session with an unknown peer."""
    return f"Peer with ID {quote(peer_id)} not found"


def not_part_of(peer_id, session_id):
    """:returns: upstream's refusal of a message or end for another's session."""
    return f"Peer {peer_id} is not part of {clip(session_id)}"


def end_needs_v1_1(peer_id):
    """:returns: upstream's refusal of ``endSessionV1_1`` with an error from a v1.0 peer."""
    return (
        f"Invalid end session message with error from peer '{peer_id}', "
        "minimum protocol version is 1.1"
    )


def not_allowed_session(peer_id):
    """:returns: the refusal of a session with a peer the token's ``calls`` do not name."""
    return f"the token does not allow a session with {quote(peer_id)}"


def meta_too_large(peer_id, size, limit):
    """:returns: the refusal of a ``meta`` larger than the server keeps."""
    return f"Peer '{peer_id}' meta is too large: {size} bytes, at most {limit}"


#: The names of the metas read last (:func:`meta_name`): metas up to
#: :data:`NAMES_META_MAX` characters, the :data:`NAMES_MAX` read first
#: since they were remembered (the oldest goes first). A producer's meta is
#: the registry's own text, shared; metas of peers gone hold at most 16 MB.
_NAMES = {}
NAMES_MAX = 16384
NAMES_META_MAX = 1024
_UNKNOWN = object()


def meta_name(meta):
    """
    :param meta: canonical JSON text.
    :returns: its ``name`` when it is an object whose ``name`` is text, else None.

    A WHEP ``POST`` reads the name of every producer's meta, and a
    ``list`` every one the token's ``calls`` filter: the names of small
    metas are remembered, so that these cost a dictionary look-up per
    producer rather than a JSON decoding (10 ms for 5,000 producers).
    """
    if '"name"' not in meta:
        return None
    small = len(meta) <= NAMES_META_MAX
    if small:
        name = _NAMES.get(meta, _UNKNOWN)
        if name is not _UNKNOWN:
            return name
    value = _decode(meta)
    name = value.get("name") if type(value) is dict else None
    if type(name) is not str:
        name = None
    if small:
        if len(_NAMES) >= NAMES_MAX:
            del _NAMES[next(iter(_NAMES))]
        _NAMES[meta] = name
    return name


def named(meta, name):
    """
    :param meta: canonical JSON text, from a peer whose token names it ``name``.
    :returns: ``meta`` with its ``name`` set to ``name`` (an absent meta
        becomes ``{"name": name}``), or None when ``meta`` is not an object
        or already names another name.
    """
    value = _decode(meta)
    if value is None:
        value = {}
    if type(value) is not dict or value.get("name", name) != name:
        return None
    value["name"] = name
    return _canonical(value)

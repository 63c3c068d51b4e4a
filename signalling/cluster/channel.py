"""
What Redis and the nodes tell a node: the messages of its channel, and the
answers of the scripts.

A message of a node's channel (one ``PUBLISH`` to ``n:<node>``) is its kind
(one byte, a name of :class:`Kind`), the connections it is for
(comma-separated connection numbers, or none), a NUL, and its body: the
NUL-separated text fields of a notification (uids and room ids never hold
control characters; a free-form field, such as a room message, comes
last), relayed frames (:func:`encode_frames`), a JSON message's text, or a
probe's answer.

The Lua scripts use the same names: :func:`lua_constants` declares every
kind, every dialect code and every kind of refusal as a Lua local at the
head of every script (:func:`signalling.cluster.scripts.source`), so that
the two sides cannot disagree.
"""

from signalling.core import json_wire
from signalling.core.interfaces import ERRORS_BY_KIND, JsonRefused, SignallingError


class Kind:
    """The kinds of message of a node's channel, by name: the one table of them."""

    # What the scripts publish, to the peers named (its fields):
    #: The peer is in a session (partner uid, its node, its conn, "1" for the caller).
    SESSION_STARTED = b"S"
    #: The partner left (its uid); the peer is removed.
    SESSION_ENDED = b"E"
    #: The peer joined a room (room id, then the members already there).
    ROOM_JOINED = b"J"
    #: Another member joined the peer's room (room id, uid).
    ROOM_PEER_JOINED = b"j"
    #: Another member left the peer's room (room id, uid).
    ROOM_PEER_LEFT = b"L"
    #: A room member sent the peer a message (its uid, the text).
    ROOM_MESSAGE = b"R"
    #: The peer's uid was taken over (its uid); the peer is removed.
    REPLACED = b"X"
    #: The JSON dialect: a peer's status changed (its id, roles, meta).
    STATUS_CHANGED = b"u"
    #: The JSON dialect: the consumer's session started (producer id, session id).
    CONSUMER_SESSION_STARTED = b"a"
    #: The JSON dialect: the producer is asked to start a session (consumer
    #: id, session id, "" or "1" and the offer).
    PRODUCER_SESSION_ASKED = b"b"
    #: The JSON dialect: the other side ended a session (session id, "" or
    #: "1" and the reason).
    JSON_SESSION_ENDED = b"e"
    #: The JSON dialect: a ``peer`` message of the session (its text, as the body).
    JSON_MESSAGE = b"m"
    # What nodes send each other:
    #: Messages relayed to a session partner (:func:`encode_frames`, as the body).
    RELAYED_FRAMES = b"M"
    #: Ping the peer (the asking node, a token, the timeout in seconds).
    PROBE = b"P"
    #: A probe's answer (no connection; "1" alive or "0", then the token).
    PROBE_ANSWER = b"A"
    #: A question for the peer (the asking node, a token, then the question
    #: as the rest): an HTTP dialect's request that reached another node.
    ASK = b"Q"
    #: A question's answer (no connection; the token, NUL, the answer; "-"
    #: before the token: no answer).
    ASK_ANSWER = b"q"


#: Every kind by its name.
KINDS = {name: value for name, value in vars(Kind).items() if not name.startswith("_")}

#: The dialects as a peer's record in Redis holds them (its field ``d``):
#: the server's name of a dialect -> its code. One byte each: nodes of
#: earlier versions, which share a Redis during an upgrade, store and read
#: these codes.
DIALECTS = {"examples": "e", "json": "j"}
DIALECT_EXAMPLES = DIALECTS["examples"]
DIALECT_JSON = DIALECTS["json"]

#: The kinds of a script's refusal of a JSON request (besides those of
#: :data:`signalling.core.interfaces.ERRORS_BY_KIND`): the upstream server's
#: words, or the roles a session needs and the peers do not have.
JSON_REFUSED = b"json"
JSON_MISSING_ROLES = b"json_roles"


def lua_names():
    """
    :returns: ``{name: value}`` of what the scripts name: every kind, every
        dialect code (``DIALECT_EXAMPLES``, …) and every kind of refusal
        (``UID_TAKEN``, …, ``JSON_REFUSED``).
    """
    names = {name: value.decode("ascii") for name, value in KINDS.items()}
    names.update((f"DIALECT_{name.upper()}", code) for name, code in DIALECTS.items())
    names.update((kind.upper(), kind) for kind in ERRORS_BY_KIND)
    names.update(JSON_REFUSED=JSON_REFUSED.decode("ascii"))
    names.update(JSON_MISSING_ROLES=JSON_MISSING_ROLES.decode("ascii"))
    return names


def lua_constants():
    """:returns: Lua that declares each of :func:`lua_names` as a local."""
    return "".join(f"local {name} = '{value}'\n" for name, value in lua_names().items())


def header(kind, conns):
    """:returns: the start of a message of ``kind`` for ``conns`` (text), up to its body."""
    return kind + conns.encode() + b"\0"


def encode_frames(frames):
    """``(first_byte, payload)`` pairs as one byte string (first byte, 4-byte length, payload)."""
    out = bytearray()
    for first, payload in frames:
        out.append(first)
        out += len(payload).to_bytes(4, "big")
        out += payload
    return bytes(out)


def decode_frames(data, start=0):
    """The inverse of :func:`encode_frames`, from ``start``."""
    frames = []
    end = len(data)
    i = start
    while i < end:
        first = data[i]
        size = int.from_bytes(data[i + 1 : i + 5], "big")
        frames.append((first, data[i + 5 : i + 5 + size]))
        i += 5 + size
    return frames


def probe(conn, asker, token, timeout):
    """:returns: the message that asks the node of ``conn`` to ping it."""
    return header(Kind.PROBE, conn) + f"{asker}\0{token}\0{timeout}".encode()


def probe_answer(token, alive):
    """:returns: the answer to the probe ``token`` (bytes)."""
    return header(Kind.PROBE_ANSWER, "") + (b"1" if alive else b"0") + token


def read_probe_answer(body):
    """:returns: ``(token, alive)`` of a :func:`probe_answer`'s body."""
    return body[1:], body[:1] == b"1"


def ask(conn, asker, token, question):
    """:returns: the message that hands ``question`` (bytes) to the peer of ``conn``."""
    return header(Kind.ASK, conn) + f"{asker}\0{token}\0".encode() + question


def read_ask(body):
    """:returns: ``(asker, token, question)`` of an :func:`ask`'s body."""
    asker, _, rest = body.partition(b"\0")
    token, _, question = rest.partition(b"\0")
    return text(asker), token, question


def ask_answer(token, answer):
    """:returns: the answer (bytes, or None for none) to the question ``token`` (bytes)."""
    if answer is None:
        return header(Kind.ASK_ANSWER, "") + b"-" + token + b"\0"
    return header(Kind.ASK_ANSWER, "") + token + b"\0" + answer


def read_ask_answer(body):
    """:returns: ``(token, answer or None)`` of an :func:`ask_answer`'s body."""
    token, _, answer = body.partition(b"\0")
    if token.startswith(b"-"):
        return token[1:], None
    return token, answer


def text(value):
    """:returns: ``value`` as text (Redis answers bytes)."""
    return value.decode("utf-8") if isinstance(value, bytes) else value


def roles(field):
    """:returns: the roles of a comma-separated field."""
    return [role for role in field.split(",") if role] if field else []


def answer(reply):
    """Turn a script's answer into its value, or raise its refusal."""
    if isinstance(reply, list) and reply and reply[0] == b"err":
        kind = reply[1]
        if kind == JSON_REFUSED:
            raise JsonRefused(text(reply[2]))
        if kind == JSON_MISSING_ROLES:
            peer_id, mine, other_id, theirs = (text(v) for v in reply[2:6])
            raise JsonRefused(
                f"Missing a producer or a consumer: id {peer_id} roles "
                f"{json_wire.roles_debug(roles(mine))}, id {other_id} roles "
                f"{json_wire.roles_debug(roles(theirs))}"
            )
        raise ERRORS_BY_KIND.get(text(kind), SignallingError)(text(reply[2]))
    if isinstance(reply, list) and reply and reply[0] == b"ok":
        return reply[1]
    return None

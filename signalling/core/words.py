"""
The words of the signalling protocol (``docs/protocol.md``), written once for
both sides: the commands and replies, a parser for what the server sends,
the client side of the JSON dialect the WebRTC peers share, and the exit
statuses of the client tools.

Standard library only and no imports from the rest of the package: the
server (through ``signalling.core.wire``), the tools in ``signalling.tools``
and ``contrib/gst_peer.py`` (which runs under the system Python with
GStreamer's bindings and nothing else) all read it.
"""

# Commands a client sends.
HELLO = "HELLO"
SESSION = "SESSION"
ROOM = "ROOM"
ROOM_PEER_MSG = "ROOM_PEER_MSG"
ROOM_PEER_LIST = "ROOM_PEER_LIST"
#: Not a command: a payload some clients relay to ask the partner for an offer.
OFFER_REQUEST = "OFFER_REQUEST"

#: Where the HTTP dialects' resources live on every port: ``/whep/<producer>``
#: (watch a producer: WHEP) and ``/whip/<stream>`` (publish: WHIP).
WHEP_PREFIX = "/whep/"
WHIP_PREFIX = "/whip/"

# Replies and notices the server sends.
SESSION_OK = "SESSION_OK"
ROOM_OK = "ROOM_OK"
ROOM_PEER_JOINED = "ROOM_PEER_JOINED"
ROOM_PEER_LEFT = "ROOM_PEER_LEFT"
ERROR = "ERROR"


def hello(uid):
    """:returns: the line that registers ``uid``."""
    return f"{HELLO} {uid}"


def session(uid):
    """:returns: the line that starts a session with ``uid``."""
    return f"{SESSION} {uid}"


def room(room_id):
    """:returns: the line that joins ``room_id``."""
    return f"{ROOM} {room_id}"


def room_peer_msg(uid, payload):
    """:returns: the line that sends ``payload`` to room member ``uid`` (and
    what that member receives, with the sender's uid)."""
    return f"{ROOM_PEER_MSG} {uid} {payload}"


class Reply:
    """
    One line from the server, read.

    :ivar word: :data:`HELLO`, :data:`SESSION_OK`, :data:`ROOM_OK`,
        :data:`ROOM_PEER_LIST`, :data:`ROOM_PEER_JOINED`,
        :data:`ROOM_PEER_LEFT`, :data:`ROOM_PEER_MSG` or :data:`ERROR`; None
        for anything else (in a session: the partner's message).
    :ivar uids: the members of ``ROOM_OK`` and ``ROOM_PEER_LIST``; the one
        uid of ``ROOM_PEER_JOINED``, ``ROOM_PEER_LEFT`` and ``ROOM_PEER_MSG``.
    :ivar payload: the message of ``ROOM_PEER_MSG``, kept as sent.
    :ivar reason: the text after ``ERROR``.
    :ivar text: the whole line.
    """

    __slots__ = ("word", "uids", "payload", "reason", "text")

    def __init__(self, word, text, uids=(), payload=None, reason=None):
        self.word = word
        self.text = text
        self.uids = list(uids)
        self.payload = payload
        self.reason = reason

    @property
    def uid(self):
        """The one uid of a notice or room message, else None."""
        return self.uids[0] if len(self.uids) == 1 else None

    def __repr__(self):
        return f"<Reply {self.word} {self.text[:60]!r}>"


def parse_reply(text):
    """
    Read a line from the server as the protocol defines it, exactly: a word
    must stand alone or be followed by one space (``ROOM_OK`` always is).

    :returns: a :class:`Reply`; its ``word`` is None when the line is none
        of the server's (a relayed message in a session).
    """
    if text == HELLO or text == SESSION_OK:
        return Reply(text, text)
    if text == ERROR:
        return Reply(ERROR, text, reason="")
    word, space, rest = text.partition(" ")
    if not space:
        return Reply(None, text)
    if word == ERROR:
        return Reply(ERROR, text, reason=rest)
    if word in (ROOM_OK, ROOM_PEER_LIST):
        return Reply(word, text, uids=rest.split())
    if word in (ROOM_PEER_JOINED, ROOM_PEER_LEFT):
        if rest and len(rest.split()) == 1 and rest == rest.strip():
            return Reply(word, text, uids=[rest])
        return Reply(None, text)
    if word == ROOM_PEER_MSG:
        uid, space, payload = rest.partition(" ")
        if uid and space:
            return Reply(word, text, uids=[uid], payload=payload)
    return Reply(None, text)


# The JSON dialect (webrtcsink and webrtcsrc's protocol), as the WebRTC peers
# (signalling-peer and contrib/gst_peer.py, --protocol json) speak it.


def add_json_arguments(parser, mode, verb):
    """
    Add the JSON dialect's options: ``--produce`` and ``--consume`` to the
    ``mode`` group, ``--protocol``, ``--protocol-version``, ``--meta`` and
    ``--name``.

    :param verb: how the peer plays, for the help (``as webrtcsink does``).
    """
    mode.add_argument(
        "--produce", action="store_true",
        help=f"with --protocol json: register as a producer and offer to every "
        f"consumer that starts a session{verb}",
    )
    mode.add_argument(
        "--consume", metavar="PEER_ID",
        help="with --protocol json: start a session with this producer and "
        "answer its offer ('first': the first producer listed or announced)",
    )
    parser.add_argument(
        "--protocol", choices=("examples", "json"), default="examples",
        help="the GStreamer examples' protocol (HELLO, SESSION, ROOM) or the "
        "JSON one of webrtcsink and webrtcsrc (default: %(default)s)",
    )
    parser.add_argument(
        "--protocol-version", choices=("v1_0", "v1_1"),
        help="with --protocol json: send setProtocolVersion first",
    )
    parser.add_argument(
        "--meta", metavar="NAME", help="with --produce: the display-name in the producer's meta"
    )
    parser.add_argument(
        "--name", metavar="NAME",
        help="with --produce: the name in the producer's meta, by which WHEP "
        "viewers find it (POST /whep/NAME)",
    )


def check_json_arguments(parser, options):
    """Refuse (``parser.error``) options that do not fit the protocol chosen."""
    if options.protocol == "json":
        if options.call or options.room:
            parser.error("--protocol json takes --produce or --consume, not --call or --room")
        if not (options.produce or options.consume):
            parser.error("--protocol json needs --produce or --consume")
    elif options.produce or options.consume or options.protocol_version:
        parser.error("--produce, --consume and --protocol-version need --protocol json")


def json_after_welcome(options, peer_id):
    """
    :returns: ``(state, messages)``: what a peer does once welcomed as
        ``peer_id``: a producer registers (``producing``); a consumer of the
        first producer listens and asks for the list (``looking``); one of a
        named producer starts the session (``consuming``).
    """
    if options.produce:
        meta = {"display-name": options.meta or peer_id}
        if options.name:
            meta["name"] = options.name
        return "producing", [{"type": "setPeerStatus", "roles": ["producer"], "meta": meta}]
    if options.consume == "first":
        return "looking", [
            {"type": "setPeerStatus", "roles": ["listener"], "meta": None},
            {"type": "list"},
        ]
    return "consuming", [{"type": "startSession", "peerId": options.consume}]


def producers_in(message):
    """:returns: the producer ids a ``list`` or ``peerStatusChanged`` message names."""
    if message.get("type") == "list":
        return [p["id"] for p in message.get("producers", [])]
    if "producer" in message.get("roles", []):
        return [message["peerId"]]
    return []


def json_peer(session_id, message):
    """
    :returns: the ``peer`` message of ``session_id`` that carries ``message``,
        a negotiation message (``{"sdp": ...}`` or ``{"ice": ...}``).
    """
    out = {"type": "peer", "sessionId": session_id}
    if "sdp" in message:
        out["sdp"] = message["sdp"]
    else:
        ice = message["ice"]
        out["ice"] = {
            "candidate": ice["candidate"],
            "sdpMLineIndex": int(ice.get("sdpMLineIndex") or 0),
        }
    return out


# How the client tools end (signalling-client, signalling-peer,
# contrib/gst_peer.py): one table for all of them.
EXIT_OK = 0
#: A bug in the tool (it prints a traceback), or a missing package.
EXIT_INTERNAL = 1
#: Bad command line (argparse's own status).
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_TLS = 4
EXIT_SERVER_ERROR = 5
EXIT_CLOSED = 6
EXIT_GAVE_UP = 7
#: The other peer's offer or answer could not be used (WebRTC peers).
EXIT_NEGOTIATION = 8

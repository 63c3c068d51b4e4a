"""
Parse and format the lines of the signalling protocol (``docs/protocol.md``).

Pure functions and constants: nothing here knows about connections, Twisted or
Autobahn. Whitespace is what ``str.split()`` splits on, control characters are
Unicode category Cc, and lengths are counted in code points.
"""

import re

from signalling.core import interfaces
from signalling.core.echo import ECHO_LIMIT, quote

# The words themselves are written once, for the server and the tools.
from signalling.core.words import (
    ERROR,
    HELLO,
    ROOM,
    ROOM_OK,
    ROOM_PEER_JOINED,
    ROOM_PEER_LEFT,
    ROOM_PEER_LIST,
    ROOM_PEER_MSG,
    SESSION,
    SESSION_OK,
)

#: Longest uid or room id accepted, in characters.
MAX_ID_LENGTH = 256

#: How much of an offending word is echoed back in an ``ERROR`` line.
_ECHO_LIMIT = ECHO_LIMIT

#: Unicode category Cc is exactly U+0000-U+001F and U+007F-U+009F.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")

#: The room id upstream reserves for its own bookkeeping.
RESERVED_ROOM_ID = "session"


#: Close reasons the protocol mandates for a refused first message (code 1002).
CLOSE_INVALID_PROTOCOL = "invalid protocol"
CLOSE_INVALID_UID = "invalid peer uid"


class WireError(Exception):
    """
    Input that is answered with an ``ERROR`` line.

    :ivar reason: the text after ``ERROR ``.
    :ivar kind: a fixed name for the kind of error (a metrics label).
    """

    def __init__(self, reason, kind="invalid_request"):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


def split_command(text):
    """
    Split a line into its command word and the rest.

    :param text: the decoded message.
    :returns: ``(command, rest)``; ``command`` is ``""`` for an empty or
        all-whitespace line, ``rest`` is everything after the first run of
        whitespace that follows the command, kept as it is (trailing
        whitespace included).
    """
    parts = text.split(maxsplit=1)
    if not parts:
        return "", ""
    if len(parts) == 1:
        return parts[0], ""
    return parts[0], parts[1]


def _echo(word, limit=_ECHO_LIMIT):
    """Quote an offending word for an ``ERROR`` line (:func:`signalling.core.echo.quote`)."""
    return quote(word, limit)


def _is_valid_id(word):
    return (
        0 < len(word) <= MAX_ID_LENGTH
        and word.split() == [word]
        and _CONTROL.search(word) is None
    )


def check_uid(uid):
    """
    Check a uid offered with ``HELLO``.

    :raises WireError: if it is empty, too long, or holds whitespace or
        control characters.
    """
    if not uid:
        raise WireError(
            "missing peer uid: the first message must be 'HELLO <uid>'", "invalid_uid"
        )
    if not _is_valid_id(uid):
        raise WireError(
            f"invalid peer uid {_echo(uid)}: it must be 1 to {MAX_ID_LENGTH} "
            "characters without whitespace or control characters",
            "invalid_uid",
        )


def check_room_id(room_id):
    """
    Check a room id offered with ``ROOM``.

    :raises WireError: ``invalid room id '<room_id>'``.
    """
    if room_id == RESERVED_ROOM_ID or not _is_valid_id(room_id):
        raise WireError(f"invalid room id {_echo(room_id)}", "invalid_room_id")


def parse_room_peer_msg(rest):
    """
    Split the arguments of ``ROOM_PEER_MSG``.

    :param rest: what follows the command word.
    :returns: ``(uid, payload)``, the payload kept character for character.
    :raises WireError: when the uid or the payload is missing.
    """
    parts = rest.split(maxsplit=1)
    if len(parts) < 2:
        raise WireError(
            "ROOM_PEER_MSG needs a peer uid and a message", "missing_arguments"
        )
    return parts[0], parts[1]


# What the server sends.


def error(reason):
    """:returns: the ``ERROR`` line for ``reason``."""
    return ERROR + " " + reason


def room_ok(members):
    """:returns: ``ROOM_OK`` and the members, always with one space after the word."""
    return ROOM_OK + " " + " ".join(members)


def room_peer_list(members):
    """:returns: ``ROOM_PEER_LIST`` and the members, always with one space after the word."""
    return ROOM_PEER_LIST + " " + " ".join(members)


def room_peer_joined(uid):
    """:returns: the notice that ``uid`` joined the room."""
    return ROOM_PEER_JOINED + " " + uid


def room_peer_left(uid):
    """:returns: the notice that ``uid`` left the room."""
    return ROOM_PEER_LEFT + " " + uid


def room_peer_msg(sender_uid, payload):
    """:returns: the relayed room message as the recipient sees it."""
    return ROOM_PEER_MSG + " " + sender_uid + " " + payload


#: An unknown "command" may be a payload sent outside a session (compact
#: JSON has no whitespace); echo (and so log) only its start.
_COMMAND_ECHO_LIMIT = 32


def unknown_command(command):
    """:returns: the reason for a command the server does not know."""
    return f"unknown command {_echo(command, _COMMAND_ECHO_LIMIT)}"


#: The reason of an ERROR for a request a cluster node cannot serve while
#: it has lost its Redis (ext); after HELLO the connection closes with 1013.
UNAVAILABLE = "server unavailable, try again later"
#: Try again later: the close code of a connection the server cannot serve now.
CLOSE_TRY_AGAIN_LATER = 1013
EXPECTED_HELLO = "the first message must be 'HELLO <uid>'"
BINARY_OUTSIDE_SESSION = "binary messages are only relayed inside a session"
EMPTY_MESSAGE = "empty message"
NOT_IN_ROOM = "not in a room"
ALREADY_IN_ROOM = "invalid msg, already in room"
SESSION_NEEDS_UID = "SESSION needs a peer uid"
ALREADY_REGISTERED = "already registered"
RATE_LIMITED = "rate limit exceeded"


def not_allowed(what, name):
    """:returns: the reason for a ``what`` (uid, room, call) the connection's token does not allow."""
    return f"the token does not allow {what} {_echo(name, _COMMAND_ECHO_LIMIT)}"


def kind_for(exc):
    """
    :returns: the fixed name of a registry's domain exception (a metrics
        label): its class's :attr:`~interfaces.SignallingError.kind`.
    """
    if isinstance(exc, interfaces.SignallingError):
        return exc.kind
    return interfaces.SignallingError.kind


def reason_for(exc):
    """
    Turn a registry's domain exception into the reason of an ``ERROR`` line.

    :param exc: an :class:`interfaces.SignallingError`.
    :returns: the text after ``ERROR ``.
    """
    kind = kind_for(exc)
    if kind == "uid_taken":
        return f"peer uid {_echo(exc.uid)} is already taken"
    if kind == "peer_not_found":
        return f"peer {_echo(exc.uid)} not found"
    if kind == "peer_busy":
        return f"peer {_echo(exc.uid)} busy"
    if kind == "session_with_self":
        return "cannot start a session with yourself"
    if kind == "peer_not_in_room":
        return f"peer {_echo(exc.uid)} is not in the room"
    if kind == "not_in_room":
        return NOT_IN_ROOM
    if kind == "already_engaged":
        return "already in a session or a room"
    if kind == "room_full":
        return f"room {_echo(exc.uid)} is full"
    if kind == "too_many_rooms":
        return "too many rooms on this server"
    if kind == "unavailable":
        return UNAVAILABLE
    return "request failed"

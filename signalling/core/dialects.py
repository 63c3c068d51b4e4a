"""
The dialects a port may speak, as values: one table maps each dialect's name
to what the server needs to know of it, and the server reads the table
rather than naming a dialect.

- ``examples``: the protocol of GStreamer's webrtc examples (``HELLO``,
  ``SESSION``, ``ROOM``), :class:`signalling.core.connection.Connection`;
- ``json``: the protocol of gst-plugins-rs (``webrtcsink``, ``webrtcsrc``,
  ``gstwebrtc-api``), :class:`signalling.core.json_connection.JsonConnection`;
- ``whep`` and ``whip``: the HTTP ones, WHEP (watch a producer) and WHIP
  (RFC 9725, publish), at ``/whep/`` and ``/whip/`` on every port:
  :mod:`signalling.core.http_connections`, peers of the JSON dialect's part
  of the registry driven by HTTP requests.

On a port that speaks every WebSocket dialect (``auto``), a connection's
first message chooses: the first WebSocket dialect in the table that
recognises it, in the table's order; a connection that says nothing for a while is welcomed in the
dialect that waits for the server to speak first.
"""

from dataclasses import dataclass, field
from typing import Callable

from signalling.core import words
from signalling.core.connection import Connection, examples_token_allows
from signalling.core.http_connections import (
    WhepSession,
    WhipSession,
    whep_token_allows,
    whip_token_allows,
)
from signalling.core.interfaces import IExamplesRegistry, IJsonRegistry
from signalling.core.json_connection import JsonConnection, json_token_allows

#: What a port (or a path) that lets the first message choose is set to.
AUTO = "auto"


@dataclass(frozen=True)
class Dialect:
    """
    One dialect.

    :ivar name: how options, paths and logs name it.
    :ivar connection: the per-connection logic's class, built as
        ``connection(server, output)`` (see
        :class:`signalling.core.connection.ConnectionCommon`).
    :ivar recognises: ``(payload, is_binary) -> bool``: whether a first
        message is one of this dialect's.
    :ivar speaks_first: True for the dialect whose clients wait for the
        server (a silent connection on an ``auto`` port is welcomed in it).
    :ivar token_allows: ``(grant) -> bool``: whether a token is for this
        dialect at all (its claims apply in the connection's logic).
    :ivar label: the value of the ``dialect`` label of its metrics.
    :ivar registry_part: the interface of the registry it needs.
    :ivar owns_part: whether the counts of that part are this dialect's
        (labelled with its label); False for a dialect that shares another's
        part, whose peers count with that dialect's.
    :ivar relay_kinds: ``(kind, messages, bytes)`` for each kind of message
        it relays: the ``kind`` label of the relay metrics, and the names of
        the counters its connections add to (on the server's ``Stats``).
    :ivar http_prefix: None for a WebSocket dialect; for an HTTP one, the
        path its resources live under on every port (``/whep/``): its
        connection's class then takes ``begin``, ``trickle`` and ``end``
        (:mod:`signalling.core.http_connections`).
    """

    name: str
    connection: type
    recognises: Callable[[bytes, bool], bool]
    token_allows: Callable[[object], bool]
    registry_part: object
    speaks_first: bool = False
    label: str = field(default="")
    owns_part: bool = True
    relay_kinds: tuple = ()
    http_prefix: str = None

    @property
    def over_websocket(self):
        """Whether the dialect is spoken on a WebSocket (else over plain HTTP requests)."""
        return self.http_prefix is None

    def __post_init__(self):
        if not self.label:
            object.__setattr__(self, "label", self.name)


class DialectTable:
    """
    The dialects a server speaks, in the order their first messages are
    tried.

    :param dialects: :class:`Dialect` values; names are unique, and at most
        one speaks first.
    """

    def __init__(self, dialects):
        self._dialects = tuple(dialects)
        self._by_name = {d.name: d for d in self._dialects}
        if len(self._by_name) != len(self._dialects) or AUTO in self._by_name:
            raise ValueError("dialect names must be unique, and not 'auto'")
        first = [d for d in self._dialects if d.speaks_first]
        if len(first) > 1:
            raise ValueError("at most one dialect speaks first")
        #: The dialect a silent connection on an auto port gets, or None.
        self.speaks_first = first[0] if first else None
        #: The dialects spoken on a WebSocket, in order, and the HTTP ones.
        self.websocket = tuple(d for d in self._dialects if d.over_websocket)
        self.http = tuple(d for d in self._dialects if not d.over_websocket)
        if not self.websocket:
            raise ValueError("a table needs a WebSocket dialect")
        if any(d.speaks_first for d in self.http):
            raise ValueError("an HTTP dialect does not speak first")

    def __iter__(self):
        return iter(self._dialects)

    def __getitem__(self, name):
        return self._by_name[name]

    def __contains__(self, name):
        return name in self._by_name

    @property
    def names(self):
        """The dialects' names, in order."""
        return tuple(d.name for d in self._dialects)

    @property
    def websocket_names(self):
        """The names of the dialects a WebSocket port or path may be pinned to, in order."""
        return tuple(d.name for d in self.websocket)

    def for_first_message(self, payload, is_binary):
        """:returns: the first WebSocket dialect that recognises a first message, or None."""
        for dialect in self.websocket:
            if dialect.recognises(payload, is_binary):
                return dialect
        return None

    @property
    def for_silence(self):
        """The dialect a connection on an auto port that says nothing gets."""
        return self.speaks_first or self.websocket[-1]

    def for_http_path(self, path):
        """:returns: the HTTP dialect whose resources ``path`` (text) is under, or None."""
        for dialect in self.http:
            if path.startswith(dialect.http_prefix):
                return dialect
        return None

    def replacing(self, dialect):
        """:returns: a new table with ``dialect`` in place of the one of its name."""
        return DialectTable(dialect if d.name == dialect.name else d for d in self._dialects)

    def with_dialect(self, dialect, before=None):
        """
        :returns: a new table with ``dialect`` added (before the one named
            ``before``, else last).
        """
        dialects = list(self._dialects)
        index = len(dialects)
        if before is not None:
            index = dialects.index(self._by_name[before])
        dialects.insert(index, dialect)
        return DialectTable(dialects)


def _is_json_object(payload, is_binary):
    return not is_binary and payload.lstrip()[:1] == b"{"


def _anything(payload, is_binary):
    return True


def _nothing(payload, is_binary):
    return False


JSON = Dialect(
    name="json",
    connection=JsonConnection,
    recognises=_is_json_object,
    token_allows=json_token_allows,
    registry_part=IJsonRegistry,
    speaks_first=True,
    relay_kinds=(("json_session", "json_messages", "json_bytes"),),
)
EXAMPLES = Dialect(
    name="examples",
    connection=Connection,
    recognises=_anything,
    token_allows=examples_token_allows,
    registry_part=IExamplesRegistry,
    relay_kinds=(
        ("session", "session_messages", "session_bytes"),
        ("room", "room_messages", "room_bytes"),
    ),
)

WHEP = Dialect(
    name="whep",
    connection=WhepSession,
    recognises=_nothing,
    token_allows=whep_token_allows,
    registry_part=IJsonRegistry,
    owns_part=False,
    http_prefix=words.WHEP_PREFIX,
)
WHIP = Dialect(
    name="whip",
    connection=WhipSession,
    recognises=_nothing,
    token_allows=whip_token_allows,
    registry_part=IJsonRegistry,
    owns_part=False,
    http_prefix=words.WHIP_PREFIX,
)

#: The server's dialects: on a WebSocket, a first message that is a JSON
#: object speaks the JSON dialect, anything else the examples' one (whose
#: clients send HELLO at once), and a silent connection is a JSON client
#: waiting for welcome; over HTTP, WHEP and WHIP (peers of the JSON
#: dialect's part, counted with it).
DIALECTS = DialectTable([JSON, EXAMPLES, WHEP, WHIP])

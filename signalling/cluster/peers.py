"""
A node's own peers: what it keeps of each, the links to their session
partners, and what the node's channel tells them (one handler per kind of
message, in one table).
"""

from twisted.logger import Logger
from zope.interface import implementer

from signalling.core import json_wire
from signalling.core.interfaces import ILink
from signalling.cluster import channel
from signalling.cluster.channel import (
    DIALECT_JSON,
    Kind,
    decode_frames,
    encode_frames,
    header,
    roles,
)


@implementer(ILink)
class RemoteLink:
    """The way to a session partner on another node: through its node's channel."""

    __slots__ = ("_backend", "_prefix", "_node")

    def __init__(self, backend, node, conn):
        self._backend = backend
        self._node = node
        self._prefix = header(Kind.RELAYED_FRAMES, conn)

    def send_frames(self, frames):
        self._backend.relay(self._node, self._prefix + encode_frames(frames))

    def set_backpressure(self, active):
        """Another node's peer is not held back (the holder's output bound applies)."""


@implementer(ILink)
class _Gone:
    """A link to a partner that already left this node: its messages go nowhere."""

    def send_frames(self, frames):
        pass

    def set_backpressure(self, active):
        pass


_GONE = _Gone()


class Local:
    """What the node keeps of one of its peers."""

    __slots__ = ("uid", "peer", "dialect", "partner", "room", "consuming", "roles")

    def __init__(self, uid, peer, dialect):
        self.uid = uid
        self.peer = peer
        #: Its dialect's code (:data:`signalling.cluster.channel.DIALECTS`).
        self.dialect = dialect
        #: ``(partner_uid, node, conn, caller)`` while in a session.
        self.partner = None
        self.room = None
        #: The JSON dialect: ids of the sessions it is the consumer of, and its roles.
        self.consuming = None
        self.roles = ()


class LocalPeers:
    """
    The peers of one node, each under a connection number (*conn*) of its
    own: a uid that leaves and comes back gets a new one, so that what
    Redis still says of the old holder reaches nobody.

    :param backend: the node (its ``node`` id, ``relay`` and ``probes``).
    """

    _log = Logger()

    def __init__(self, backend):
        self._backend = backend
        #: conn -> :class:`Local`
        self.records = {}
        #: peer -> conn
        self._conn_of = {}
        #: uid -> conn of its latest local holder
        self._holder = {}
        self._serial = 0

    def is_empty(self):
        """:returns: True when the node holds no peer."""
        return not (self.records or self._conn_of or self._holder)

    def adopt(self, uid, peer, dialect):
        """:returns: the conn of a new local ``peer`` holding ``uid``."""
        self._serial += 1
        conn = str(self._serial)
        self.records[conn] = Local(uid, peer, dialect)
        self._conn_of[peer] = conn
        self._holder[uid] = conn
        return conn

    def drop(self, conn):
        """Forget ``conn``. :returns: its :class:`Local`, or None."""
        local = self.records.pop(conn, None)
        if local is None:
            return None
        if self._conn_of.get(local.peer) == conn:
            del self._conn_of[local.peer]
        if self._holder.get(local.uid) == conn:
            del self._holder[local.uid]
        return local

    def own(self, uid, peer=None):
        """:returns: the conn of the local peer holding ``uid`` (by ``peer`` if given)."""
        if peer is not None:
            conn = self._conn_of.get(peer)
        else:
            conn = self._holder.get(uid)
        local = self.records.get(conn)
        if local is None or local.uid != uid:
            return None
        return conn

    def holding(self, uid):
        """:returns: the :class:`Local` of ``uid``'s latest local holder, or None."""
        return self.records.get(self._holder.get(uid))

    def rooms(self):
        """:returns: the ids of the rooms the node's peers are in."""
        return {local.room for local in self.records.values() if local.room is not None}

    # When Redis goes away and comes back.

    def keep_what_is_local(self):
        """
        Redis is gone: end what spans nodes (a session with another node's
        peer; a room, and the JSON dialect, which Redis holds), and keep
        what does not.
        """
        node = self._backend.node
        for conn, local in list(self.records.items()):
            partner = local.partner
            if partner is not None and partner[1] != node:
                self.drop(conn)
                local.peer.session_ended(partner[0])
            elif local.room is not None or local.dialect == DIALECT_JSON:
                self.drop(conn)
                local.peer.unavailable()

    def end_local_session(self, local):
        """``local`` left during an outage: its partner (on this node) is told at once."""
        partner = local.partner
        if partner is not None:
            other = self.drop(partner[2])
            if other is not None:
                other.peer.session_ended(local.uid)

    def claims(self):
        """:returns: uid, conn, dialect and partner ('' for none) of every peer, flat."""
        args = []
        for conn, local in self.records.items():
            partner = local.partner[0] if local.partner is not None else ""
            args += [local.uid, conn, local.dialect, partner]
        return args

    def replace(self, uid):
        """Another node holds ``uid`` now: close its local holder (replaced)."""
        conn = self._holder.get(uid)
        local = self.records.get(conn)
        if local is not None:
            self.drop(conn)
            local.peer.replaced()

    # What the node's channel delivers.

    def delivered(self, payload):
        """One message of the node's channel: its kind's handler in :data:`HANDLERS` reads it."""
        head, _, body = payload.partition(b"\0")
        handler = HANDLERS.get(head[:1])
        if handler is not None:
            handler(self, head[1:], body)

    def _relayed_frames(self, conn, body):
        local = self.records.get(conn.decode())
        if local is not None:
            local.peer.receiver.send_frames(decode_frames(body))

    def _json_message(self, conn, body):
        local = self.records.get(conn.decode())
        if local is not None:
            message = json_wire.Message("peer", None, None)
            message.raw = body
            local.peer.json_peer_message(message)

    def _probe_answer(self, conns, body):
        self._backend.probes.answered(body)

    def _ask(self, conn, body):
        local = self.records.get(conn.decode())
        if local is not None:
            self._backend.probes.question_asked(local.peer, body)
        else:
            asker, token, _ = channel.read_ask(body)
            self._backend.relay(asker, channel.ask_answer(token, None))

    def _ask_answer(self, conns, body):
        self._backend.probes.question_answered(body)

    def _session_started(self, conn, local, fields):
        partner_uid, node, partner_conn, caller = fields[0], fields[1], fields[2], fields[3] == "1"
        partner = (partner_uid, node, partner_conn, caller)
        if local.partner == partner:
            return  # started with its caller's notice (below)
        other = None
        if node == self._backend.node:
            other = self.records.get(partner_conn)
            link = other.peer.receiver if other is not None else _GONE
        else:
            link = RemoteLink(self._backend, node, partner_conn)
        local.partner = partner
        local.peer.session_started(partner_uid, link, caller)
        if caller and other is not None and other.partner is None:
            # The callee is on this node: it starts now, as the in-memory
            # registry starts it, right after its caller. Its own notice
            # follows on the channel, but the caller's first message goes
            # to it directly and can come first: a callee that answered it
            # would not yet be in its session.
            other.partner = (local.uid, node, conn, False)
            other.peer.session_started(local.uid, local.peer.receiver, False)

    def _session_ended(self, conn, local, fields):
        self.drop(conn)
        local.peer.session_ended(fields[0])

    def _room_joined(self, conn, local, fields):
        room_id = fields[0]
        local.room = room_id
        local.peer.room_joined(room_id, [uid for uid in fields[1:] if uid])

    def _room_peer_joined(self, conn, local, fields):
        local.peer.room_peer_joined(fields[0], fields[1])

    def _room_peer_left(self, conn, local, fields):
        local.peer.room_peer_left(fields[0], fields[1])

    def _room_message(self, conn, local, fields):
        local.peer.room_message(fields[0], "\0".join(fields[1:]))

    def _replaced(self, conn, local, fields):
        self.drop(conn)
        local.peer.replaced()

    def _status_changed(self, conn, local, fields):
        local.peer.peer_status_changed(fields[0], roles(fields[1]), "\0".join(fields[2:]))

    def _consumer_session_started(self, conn, local, fields):
        if local.consuming is None:
            local.consuming = set()
        local.consuming.add(fields[1])
        local.peer.json_session_started(fields[0], fields[1])

    def _producer_session_asked(self, conn, local, fields):
        offer = "\0".join(fields[2:])
        local.peer.json_start_session(fields[0], fields[1], offer[1:] if offer else None)

    def _json_session_ended(self, conn, local, fields):
        if local.consuming:
            local.consuming.discard(fields[0])
        reason = "\0".join(fields[1:])
        local.peer.json_session_ended(fields[0], reason[1:] if reason else None)

    def _probe(self, conn, local, fields):
        self._backend.probes.asked(local.peer, fields)


def _to_each(handle):
    """
    :returns: the handler of a notification: its fields, told by
        ``handle(peers, conn, local, fields)`` to each connection it names
        that is still here.
    """

    def notify(self, conns, body):
        fields = body.decode("utf-8").split("\0")
        for conn in conns.decode().split(","):
            local = self.records.get(conn)
            if local is None:
                continue  # it left meanwhile: its removal settles the rest
            try:
                handle(self, conn, local, fields)
            except Exception:
                self._log.failure("while notifying {uid}", uid=local.uid)

    return notify


#: Every kind of message of a node's channel -> its handler ``(peers, conns, body)``.
HANDLERS = {
    Kind.RELAYED_FRAMES: LocalPeers._relayed_frames,
    Kind.JSON_MESSAGE: LocalPeers._json_message,
    Kind.PROBE_ANSWER: LocalPeers._probe_answer,
    Kind.ASK: LocalPeers._ask,
    Kind.ASK_ANSWER: LocalPeers._ask_answer,
    Kind.SESSION_STARTED: _to_each(LocalPeers._session_started),
    Kind.SESSION_ENDED: _to_each(LocalPeers._session_ended),
    Kind.ROOM_JOINED: _to_each(LocalPeers._room_joined),
    Kind.ROOM_PEER_JOINED: _to_each(LocalPeers._room_peer_joined),
    Kind.ROOM_PEER_LEFT: _to_each(LocalPeers._room_peer_left),
    Kind.ROOM_MESSAGE: _to_each(LocalPeers._room_message),
    Kind.REPLACED: _to_each(LocalPeers._replaced),
    Kind.STATUS_CHANGED: _to_each(LocalPeers._status_changed),
    Kind.CONSUMER_SESSION_STARTED: _to_each(LocalPeers._consumer_session_started),
    Kind.PRODUCER_SESSION_ASKED: _to_each(LocalPeers._producer_session_asked),
    Kind.JSON_SESSION_ENDED: _to_each(LocalPeers._json_session_ended),
    Kind.PROBE: _to_each(LocalPeers._probe),
}

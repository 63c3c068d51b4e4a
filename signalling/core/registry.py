"""
The in-memory registry: peers, sessions and rooms of one server process.

Pure and synchronous: no I/O, no clock, no Twisted. Each method finishes all of
its work (or raises before changing anything) before it tells any peer, so
the protocol's races become "first one wins".
"""

from zope.interface import implementer

import uuid

from signalling.core import json_wire
from signalling.core.interfaces import (
    AlreadyEngaged,
    IRegistry,
    JsonRefused,
    NotInRoom,
    PeerBusy,
    PeerNotFound,
    PeerNotInRoom,
    RoomFull,
    SessionWithSelf,
    TooManyRooms,
    UidTaken,
    counts_by_part,
)


@implementer(IRegistry)
class Registry:
    """Peers by uid, session partners by uid, rooms by room id."""

    def __init__(self, max_room_members=None, max_rooms=None):
        """
        :param max_room_members: most members a room may have (None: no limit).
        :param max_rooms: most rooms at once (None: no limit).
        """
        self._max_room_members = max_room_members
        self._max_rooms = max_rooms
        self._peers = {}
        self._partners = {}
        # room id -> {uid: peer}, in join order
        self._rooms = {}
        self._room_of = {}
        # The JSON dialect: peer id -> _JsonPeer (its peer is in _peers too,
        # so ids are unique across the dialects), and its sessions.
        self._json = {}
        self._json_sessions = {}
        # role -> {peer_id: None}: the peers with that role, in the order
        # they took it (so that lists and notices cost what they return).
        self._json_roles = {role: {} for role in json_wire.ROLES}

    # IRegistryStatus: always up, one process.
    up = True
    watchers = ()
    spans_processes = False
    outages = resyncs = nodes_released = 0
    counts_by_part = counts_by_part

    @property
    def peer_count(self):
        return len(self._peers)

    @property
    def session_count(self):
        return len(self._partners) // 2

    @property
    def room_count(self):
        return len(self._rooms)

    @property
    def room_member_count(self):
        return len(self._room_of)

    @property
    def json_peer_count(self):
        return len(self._json)

    @property
    def json_session_count(self):
        return len(self._json_sessions)

    def is_empty(self):
        """:returns: True when no peer, session or room is left."""
        return not (
            self._peers or self._partners or self._rooms or self._room_of
            or self._json or self._json_sessions
        )

    def _examples_peer(self, uid):
        """:returns: the examples' peer registered as ``uid``, or None."""
        if uid in self._json:
            return None
        return self._peers.get(uid)

    def register(self, uid, peer):
        if uid in self._peers:
            raise UidTaken(uid)
        self._peers[uid] = peer

    def peer_of(self, uid):
        """:returns: the peer of the examples' dialect registered as ``uid`` here, or None."""
        return self._examples_peer(uid)

    def ask(self, uid, question):
        peer = self._peers.get(uid)
        return None if peer is None else peer.asked(question)

    def remove(self, uid, peer):
        if self._peers.get(uid) is not peer:
            return
        del self._peers[uid]
        if uid in self._json:
            self._remove_json(uid)
            return
        partner_uid = self._partners.pop(uid, None)
        partner = None
        if partner_uid is not None:
            del self._partners[partner_uid]
            partner = self._peers.pop(partner_uid)
        room_id = self._room_of.pop(uid, None)
        members = ()
        if room_id is not None:
            room = self._rooms[room_id]
            del room[uid]
            if room:
                members = list(room.values())
            else:
                del self._rooms[room_id]
        # The state is final before anyone hears of it.
        if partner is not None:
            partner.session_ended(uid)
        for member in members:
            member.room_peer_left(room_id, uid)

    def _engaged(self, uid):
        return uid in self._partners or uid in self._room_of

    def start_session(self, caller_uid, callee_uid):
        caller = self._examples_peer(caller_uid)
        if caller is None:
            raise PeerNotFound(caller_uid)
        if self._engaged(caller_uid):
            raise AlreadyEngaged(caller_uid)
        if callee_uid == caller_uid:
            raise SessionWithSelf(caller_uid)
        callee = self._examples_peer(callee_uid)
        if callee is None:
            raise PeerNotFound(callee_uid)
        if self._engaged(callee_uid):
            raise PeerBusy(callee_uid)
        self._partners[caller_uid] = callee_uid
        self._partners[callee_uid] = caller_uid
        caller.session_started(callee_uid, callee.receiver, True)
        callee.session_started(caller_uid, caller.receiver, False)

    def join_room(self, uid, room_id):
        peer = self._examples_peer(uid)
        if peer is None:
            raise PeerNotFound(uid)
        if self._engaged(uid):
            raise AlreadyEngaged(uid)
        room = self._rooms.get(room_id)
        if room is None:
            if self._max_rooms is not None and len(self._rooms) >= self._max_rooms:
                raise TooManyRooms(room_id)
            room = self._rooms[room_id] = {}
        elif self._max_room_members is not None and len(room) >= self._max_room_members:
            raise RoomFull(room_id)
        others = list(room.items())
        room[uid] = peer
        self._room_of[uid] = room_id
        peer.room_joined(room_id, [member_uid for member_uid, _ in others])
        for _, member in others:
            member.room_peer_joined(room_id, uid)

    def room_message(self, sender_uid, target_uid, payload):
        room_id = self._room_of.get(sender_uid)
        if room_id is None:
            raise NotInRoom(sender_uid)
        target = self._rooms[room_id].get(target_uid)
        if target is None:
            if self._examples_peer(target_uid) is not None:
                raise PeerNotInRoom(target_uid)
            raise PeerNotFound(target_uid)
        target.room_message(sender_uid, payload)

    def room_members(self, uid):
        room_id = self._room_of.get(uid)
        if room_id is None:
            raise NotInRoom(uid)
        return [member for member in self._rooms[room_id] if member != uid]

    # The JSON dialect.

    def welcome(self, peer_id, peer):
        if peer_id in self._peers:
            raise UidTaken(peer_id)
        self._peers[peer_id] = peer
        self._json[peer_id] = _JsonPeer(peer)

    def set_peer_status(self, peer_id, roles, meta, claimed_id):
        entry = self._json.get(peer_id)
        if entry is None:
            raise JsonRefused(f"Peer '{peer_id}' hasn't been welcomed")
        if roles == entry.roles and meta == entry.meta and claimed_id == peer_id:
            # The upstream server compares the whole status, its peerId
            # included (its own copy holds the peer's id).
            return
        producing = json_wire.PRODUCER in roles
        consuming = json_wire.CONSUMER in roles
        if producing and consuming:
            raise JsonRefused(
                f"Cannot register peer {peer_id} as both producer and passive consumer"
            )
        if json_wire.PRODUCER in entry.roles and not producing:
            self._end_role_sessions(peer_id, entry, "producer")
        elif json_wire.CONSUMER in entry.roles and not consuming:
            self._end_role_sessions(peer_id, entry, "consumer")
        for role, holders in self._json_roles.items():
            if role in roles:
                holders.setdefault(peer_id)
            else:
                holders.pop(peer_id, None)
        entry.roles = list(roles)
        entry.meta = meta
        json = self._json
        for listener_id in list(self._json_roles[json_wire.LISTENER]):
            json[listener_id].peer.peer_status_changed(peer_id, entry.roles, meta)

    def json_peers(self, role):
        json = self._json
        return [(peer_id, json[peer_id].meta) for peer_id in self._json_roles[role]]

    def start_json_session(self, peer_id, other_id, offer, names=None):
        entry = self._json.get(peer_id)
        if entry is None:
            raise JsonRefused(f"Peer with ID '{peer_id}' not found")
        other = self._json.get(other_id)
        if other is None:
            raise JsonRefused(f"Peer with ID '{other_id}' not found")
        if names is not None and json_wire.meta_name(other.meta) not in names:
            raise JsonRefused(json_wire.not_allowed_session(other_id))
        if json_wire.PRODUCER in other.roles:
            producer_id, consumer_id = other_id, peer_id
        elif json_wire.CONSUMER in other.roles:
            producer_id, consumer_id = peer_id, other_id
        else:
            raise JsonRefused(
                f"Missing a producer or a consumer: id {peer_id} roles "
                f"{json_wire.roles_debug(entry.roles)}, id {other_id} roles "
                f"{json_wire.roles_debug(other.roles)}"
            )
        session_id = str(uuid.uuid4())
        self._json_sessions[session_id] = (producer_id, consumer_id)
        producer = self._json[producer_id]
        consumer = self._json[consumer_id]
        producer.producing.add(session_id)
        consumer.consuming.add(session_id)
        consumer.peer.json_session_started(producer_id, session_id)
        producer.peer.json_start_session(consumer_id, session_id, offer)
        return session_id

    def json_message(self, peer_id, message):
        session_id = message.fields["sessionId"]
        session = self._json_sessions.get(session_id)
        if session is None:
            return
        producer_id, consumer_id = session
        if "sdp" in message.fields and message.fields["sdp"]["type"] == "offer" and (
            peer_id == consumer_id
        ):
            raise JsonRefused(
                f'cannot forward offer from "{peer_id}" to "{producer_id}" as '
                f'"{peer_id}" is not the producer'
            )
        if peer_id == producer_id:
            other_id = consumer_id
        elif peer_id == consumer_id:
            other_id = producer_id
        else:
            raise JsonRefused(f"Peer {peer_id} is not part of {session_id}")
        self._json[other_id].peer.json_peer_message(message)

    def end_json_session(self, peer_id, session_id, error=None):
        session = self._json_sessions.get(session_id)
        if session is None:
            return
        if peer_id not in session:
            # The upstream server ends the session anyway and tells neither
            # side; here a stranger cannot end others' sessions.
            raise JsonRefused(f"Peer {peer_id} is not part of {session_id}")
        self._end_json_session(peer_id, session_id, error)

    def _end_json_session(self, peer_id, session_id, error):
        producer_id, consumer_id = self._json_sessions.pop(session_id)
        self._json[producer_id].producing.discard(session_id)
        self._json[consumer_id].consuming.discard(session_id)
        other_id = consumer_id if peer_id == producer_id else producer_id
        self._json[other_id].peer.json_session_ended(session_id, error)

    def _end_role_sessions(self, peer_id, entry, role):
        sessions = entry.producing if role == "producer" else entry.consuming
        for session_id in list(sessions):
            self._end_json_session(peer_id, session_id, None)

    def _remove_json(self, peer_id):
        entry = self._json[peer_id]
        # Its sessions end for the other sides, then every listener hears
        # that it has no role left; it is gone before anyone hears of it.
        sessions = entry.producing | entry.consuming
        ended = []
        for session_id in sessions:
            producer_id, consumer_id = self._json_sessions.pop(session_id)
            self._json[producer_id].producing.discard(session_id)
            self._json[consumer_id].consuming.discard(session_id)
            other_id = consumer_id if peer_id == producer_id else producer_id
            ended.append((other_id, session_id))
        del self._json[peer_id]
        for holders in self._json_roles.values():
            holders.pop(peer_id, None)
        for other_id, session_id in ended:
            other = self._json.get(other_id)
            if other is not None:
                other.peer.json_session_ended(session_id, None)
        json = self._json
        for listener_id in list(self._json_roles[json_wire.LISTENER]):
            json[listener_id].peer.peer_status_changed(peer_id, [], entry.meta)


class _JsonPeer:
    """What the registry keeps of a JSON peer: its status and its sessions."""

    __slots__ = ("peer", "roles", "meta", "producing", "consuming")

    def __init__(self, peer):
        self.peer = peer
        self.roles = []
        #: Canonical JSON text (json_wire.canonical).
        self.meta = json_wire.NO_META
        #: Ids of the sessions it is the producer, and the consumer, of.
        self.producing = set()
        self.consuming = set()

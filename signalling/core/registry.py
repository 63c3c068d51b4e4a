"""
The in-memory registry: peers, sessions and rooms of one server process.

Pure and synchronous: no I/O, no clock, no Twisted. Each method finishes all of
its work (or raises before changing anything) before it tells any peer, so
the protocol's races become "first one wins".
"""

from zope.interface import implementer

from signalling.core.interfaces import (
    AlreadyEngaged,
    IRegistry,
    NotInRoom,
    PeerBusy,
    PeerNotFound,
    PeerNotInRoom,
    RoomFull,
    SessionWithSelf,
    TooManyRooms,
    UidTaken,
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

    def is_empty(self):
        """:returns: True when no peer, session or room is left."""
        return not (self._peers or self._partners or self._rooms or self._room_of)

    def register(self, uid, peer):
        if uid in self._peers:
            raise UidTaken(uid)
        self._peers[uid] = peer

    def remove(self, uid, peer):
        if self._peers.get(uid) is not peer:
            return
        del self._peers[uid]
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
        caller = self._peers.get(caller_uid)
        if caller is None:
            raise PeerNotFound(caller_uid)
        if self._engaged(caller_uid):
            raise AlreadyEngaged(caller_uid)
        if callee_uid == caller_uid:
            raise SessionWithSelf(caller_uid)
        callee = self._peers.get(callee_uid)
        if callee is None:
            raise PeerNotFound(callee_uid)
        if self._engaged(callee_uid):
            raise PeerBusy(callee_uid)
        self._partners[caller_uid] = callee_uid
        self._partners[callee_uid] = caller_uid
        caller.session_started(callee_uid, callee.receiver, True)
        callee.session_started(caller_uid, caller.receiver, False)

    def join_room(self, uid, room_id):
        peer = self._peers.get(uid)
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
            if target_uid in self._peers:
                raise PeerNotInRoom(target_uid)
            raise PeerNotFound(target_uid)
        target.room_message(sender_uid, payload)

    def room_members(self, uid):
        room_id = self._room_of.get(uid)
        if room_id is None:
            raise NotInRoom(uid)
        return [member for member in self._rooms[room_id] if member != uid]

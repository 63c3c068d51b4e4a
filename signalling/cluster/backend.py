"""
The cluster's registry backend: one per server process (a *node*), all on
one Redis, together one logical signalling server.

Every command is decided inside Redis by a script of
:mod:`signalling.cluster.scripts` ("first one wins" across nodes, as in one
process), and every notification it causes reaches the node of the peer it
is for through that node's channel, in the order Redis decided. Messages
relayed between session partners on different nodes go through the same
channel, on the same connection to Redis as the sender's commands, so that
a close is ordered after the messages sent before it; partners on one node
relay directly, as without a cluster.

A node speaks to Redis through a *store* (:class:`signalling.cluster.redis.RedisStore`
in production): ``call(script, *args)`` runs a script and returns a
Deferred of its answer; ``publish(node, payload)`` sends to a node's channel
in order with the calls; the store calls :meth:`ClusterRegistry.delivered`
with every message of this node's channel, :meth:`ClusterRegistry.store_up`
once it can serve again and :meth:`ClusterRegistry.store_down` when it lost
Redis.

When Redis is lost (the *outage*), the node keeps what needs nobody else:
registered peers stay, and sessions with both partners here keep relaying.
Everything that spans nodes ends at once, so that nothing is lost
silently: a peer in a session with another node's peer is told that the
session ended (it closes with 1000, as for any partner's close); a peer in a
room, and a JSON peer, is closed with 1013 (try again later); new commands are
refused (:class:`Unavailable`). When Redis is back, the node makes it agree
with what it holds (``resync``) before it takes new registrations: what
Redis still says of peers that left meanwhile is removed (their partners and
rooms on other nodes told), its peers' uids are claimed again where Redis
lost them, and sessions Redis holds that the node does not know of end on
the other side.

Nodes that die are found by their heartbeat key expiring: every node
refreshes its own each second and releases the dead ones' peers in one
script, so exactly once however many nodes notice.
"""

import json
import uuid

from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from signalling.core import json_wire
from signalling.core.interfaces import (
    AlreadyEngaged,
    ILink,
    IRegistry,
    JsonRefused,
    NotInRoom,
    PeerBusy,
    PeerNotFound,
    PeerNotInRoom,
    RoomFull,
    SessionWithSelf,
    SignallingError,
    TooManyRooms,
    UidTaken,
    Unavailable,
)

_ERRORS = {
    b"uid_taken": UidTaken,
    b"peer_not_found": PeerNotFound,
    b"peer_busy": PeerBusy,
    b"session_with_self": SessionWithSelf,
    b"already_engaged": AlreadyEngaged,
    b"not_in_room": NotInRoom,
    b"peer_not_in_room": PeerNotInRoom,
    b"room_full": RoomFull,
    b"too_many_rooms": TooManyRooms,
    b"unavailable": Unavailable,
}

#: Seconds between two heartbeats of a node.
HEARTBEAT = 1.0
#: Seconds after its last heartbeat that a node counts as dead.
NODE_TTL = 5.0


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _answer(reply):
    """Turn a script's answer into its value, or raise its refusal."""
    if isinstance(reply, list) and reply and reply[0] == b"err":
        kind = reply[1]
        if kind == b"json":
            raise JsonRefused(_text(reply[2]))
        if kind == b"json_roles":
            peer_id, mine, other_id, theirs = (_text(v) for v in reply[2:6])
            raise JsonRefused(
                f"Missing a producer or a consumer: id {peer_id} roles "
                f"{json_wire.roles_debug(_roles(mine))}, id {other_id} roles "
                f"{json_wire.roles_debug(_roles(theirs))}"
            )
        raise _ERRORS.get(kind, SignallingError)(_text(reply[2]))
    if isinstance(reply, list) and reply and reply[0] == b"ok":
        return reply[1]
    return None


def _roles(text):
    return [role for role in text.split(",") if role] if text else []


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


@implementer(ILink)
class RemoteLink:
    """The way to a session partner on another node: through its node's channel."""

    __slots__ = ("_backend", "_prefix", "_node")

    def __init__(self, backend, node, conn):
        self._backend = backend
        self._node = node
        self._prefix = b"M" + conn.encode() + b"\0"

    def send_frames(self, frames):
        self._backend.relay(self._node, self._prefix + encode_frames(frames))

    def set_backpressure(self, active):
        """Another node's peer is not held back (the holder's output bound applies)."""


class RemoteHolder:
    """
    The holder of a uid on another node, as a ``HELLO`` that wants the uid
    back sees it (see ``Connection._reclaim``, which uses ``probe``,
    ``replaced`` and ``peer_addr`` of :meth:`IRegistry.peer_of`'s answer):
    its probe and its replacement go through Redis to the holder's node.
    """

    def __init__(self, backend, uid):
        self._backend = backend
        self._uid = uid
        self._where = None
        self._probed = False
        self.receiver = None

    @property
    def peer_addr(self):
        node = self._where[0] if self._where else "another node"
        return f"cluster node {node}"

    def probe(self, timeout):
        d = self._backend.probe_remote(self._uid, timeout)

        def answered(result):
            alive, self._where = result
            self._probed = True
            return alive

        d.addCallback(answered)
        d.addErrback(lambda f: True)
        return d

    def replaced(self):
        if self._probed:
            # Found silent by its probe: that very connection goes.
            self._backend.replace_remote(self._uid, self._where)
        else:
            # A token for the uid takes it over at once, from whoever holds it.
            self._backend.evict(self._uid)


@implementer(ILink)
class _Gone:
    """A link to a partner that already left this node: its messages go nowhere."""

    def send_frames(self, frames):
        pass

    def set_backpressure(self, active):
        pass


_GONE = _Gone()


class _Local:
    """What the node keeps of one of its peers."""

    __slots__ = ("uid", "peer", "dialect", "partner", "room", "consuming", "roles")

    def __init__(self, uid, peer, dialect):
        self.uid = uid
        self.peer = peer
        self.dialect = dialect
        #: ``(partner_uid, node, conn, caller)`` while in a session.
        self.partner = None
        self.room = None
        #: The JSON dialect: ids of the sessions it is the consumer of, and its roles.
        self.consuming = None
        self.roles = ()


@implementer(IRegistry)
class ClusterRegistry:
    """
    A node of the cluster.

    :param store: its connection to Redis (see the module's docstring).
    :param clock: an ``IReactorTime`` for the heartbeat.
    :param node: this node's id (a new one for every start).
    :param max_room_members: most members a room may have (None: no limit).
    :param max_rooms: most rooms at once, cluster-wide (None: no limit).
    :param heartbeat: seconds between heartbeats.
    :param ttl: seconds after which a silent node counts as dead.
    """

    _log = Logger()

    def __init__(
        self,
        store,
        clock,
        node=None,
        max_room_members=None,
        max_rooms=None,
        heartbeat=HEARTBEAT,
        ttl=NODE_TTL,
    ):
        self._store = store
        self._clock = clock
        self.node = node or uuid.uuid4().hex[:12]
        self._max_room_members = max_room_members or 0
        self._max_rooms = max_rooms or 0
        self._heartbeat_every = heartbeat
        self._ttl_ms = str(int(ttl * 1000))
        #: conn -> _Local
        self._locals = {}
        #: peer -> conn
        self._conn_of = {}
        #: uid -> conn of its latest local holder
        self._holder = {}
        self._serial = 0
        self._heart = None
        #: Whether Redis is reachable and this node agrees with it.
        self.up = False
        self._syncing = False
        #: How often the node lost Redis, and how many dead nodes it released.
        self.outages = 0
        self.nodes_released = 0
        self.resyncs = 0
        self._barriers = {}
        #: Commands sent to Redis and not yet answered.
        self.in_flight = 0
        self._idle = []
        #: Probes of this node's peers asked for by other nodes, by token.
        self._probes = {}
        #: Callables told ``(up)`` whenever the node's availability changes.
        self.watchers = []

    # What the server reads.

    @property
    def peer_count(self):
        return len(self._locals)

    @property
    def session_count(self):
        """Sessions this node's peers called (each counted on its caller's node)."""
        return sum(1 for local in self._locals.values() if local.partner and local.partner[3])

    @property
    def room_count(self):
        return len({local.room for local in self._locals.values() if local.room is not None})

    @property
    def room_member_count(self):
        return sum(1 for local in self._locals.values() if local.room is not None)

    @property
    def json_peer_count(self):
        return sum(1 for local in self._locals.values() if local.dialect == "j")

    @property
    def json_session_count(self):
        """JSON sessions this node's peers consume (each counted on its consumer's node)."""
        return sum(len(local.consuming) for local in self._locals.values() if local.consuming)

    def is_empty(self):
        """:returns: True when this node holds no peer."""
        return not (self._locals or self._conn_of or self._holder)

    # Start and stop.

    def start(self):
        """Start the heartbeat (the store reports when Redis is reachable)."""
        self._heart = task.LoopingCall(self._beat)
        self._heart.clock = self._clock
        self._heart.start(self._heartbeat_every, now=False)

    def stop(self):
        if self._heart is not None and self._heart.running:
            self._heart.stop()
        self._heart = None

    def _beat(self):
        if not self.up:
            return None
        d = self._store.call("heartbeat", self.node, self._ttl_ms)
        d.addCallbacks(self._beaten, lambda f: None)
        return None

    def _beaten(self, reply):
        if reply == b"reaped":
            # Found dead by others (it could not refresh its heartbeat in
            # time): everything it held was released; claim it again.
            self._log.warn("cluster node {node} was released by the others; resynchronising", node=self.node)
            self._set_up(False)
            self.store_up()
        elif isinstance(reply, int) and reply:
            self.nodes_released += reply
            self._log.info("released {count} dead cluster node(s)", count=reply)

    def store_up(self):
        """The store reached Redis: agree with it, then serve."""
        if self._syncing:
            return
        self._syncing = True
        args = [self.node, self._ttl_ms]
        for conn, local in self._locals.items():
            partner = ""
            if local.partner is not None:
                partner = local.partner[0]
            args += [local.uid, conn, local.dialect, partner]
        d = self._store.call("resync", *args)
        d.addCallbacks(self._resynced, self._resync_failed)

    def _resynced(self, lost):
        self._syncing = False
        self.resyncs += 1
        for uid in lost or ():
            uid = _text(uid)
            conn = self._holder.get(uid)
            local = self._locals.get(conn)
            if local is not None:
                self._drop(conn)
                local.peer.replaced()
        self._set_up(True)

    def _resync_failed(self, failure):
        self._syncing = False
        self._log.warn("cluster resynchronisation failed: {error}", error=failure.getErrorMessage())

    def store_down(self):
        """
        The store lost Redis: end what spans nodes, keep what does not,
        refuse new commands until Redis is back.
        """
        was_up = self.up
        self._set_up(False)
        self._syncing = False
        if was_up:
            self.outages += 1
        for conn, local in list(self._locals.items()):
            partner = local.partner
            if partner is not None and partner[1] != self.node:
                self._drop(conn)
                local.peer.session_ended(partner[0])
            elif local.room is not None or local.dialect == "j":
                self._drop(conn)
                local.peer.unavailable()

    def _set_up(self, up):
        if up != self.up:
            self.up = up
            for watcher in list(self.watchers):
                watcher(up)

    # The local side.

    def _adopt(self, uid, peer, dialect):
        self._serial += 1
        conn = str(self._serial)
        self._locals[conn] = _Local(uid, peer, dialect)
        self._conn_of[peer] = conn
        self._holder[uid] = conn
        return conn

    def _drop(self, conn):
        local = self._locals.pop(conn, None)
        if local is None:
            return None
        if self._conn_of.get(local.peer) == conn:
            del self._conn_of[local.peer]
        if self._holder.get(local.uid) == conn:
            del self._holder[local.uid]
        return local

    def _own(self, uid, peer=None):
        """:returns: the conn of the local peer holding ``uid`` (by ``peer`` if given)."""
        if peer is not None:
            conn = self._conn_of.get(peer)
        else:
            conn = self._holder.get(uid)
        local = self._locals.get(conn)
        if local is None or local.uid != uid:
            return None
        return conn

    def _call(self, name, *args):
        if not self.up:
            raise Unavailable(args[0] if args else None)
        d = self._track(self._store.call(name, *args))
        d.addCallbacks(_answer, self._store_failed)
        return d

    def _track(self, d):
        self.in_flight += 1

        def done(result):
            self.in_flight -= 1
            if not self.in_flight and self._idle:
                # After what the answer causes (it runs on down this chain,
                # and may send another command).
                self._clock.callLater(0, self._maybe_idle)
            return result

        return d.addBoth(done)

    def _maybe_idle(self):
        if not self.in_flight:
            idle, self._idle = self._idle, []
            for waiter in idle:
                waiter.callback(None)

    def idle(self):
        """:returns: a Deferred fired once no command of this node awaits Redis."""
        if not self.in_flight:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle.append(d)
        return d

    @staticmethod
    def _store_failed(failure):
        if failure.check(SignallingError):
            return failure
        raise Unavailable(None)

    def relay(self, node, payload):
        """Send a relayed message to another node's peer (dropped while Redis is away)."""
        if self.up:
            self._store.publish(node, payload)

    # IRegistry.

    def register(self, uid, peer):
        return self._claim(uid, peer, "e")

    def _claim(self, uid, peer, dialect):
        if not self.up:
            raise Unavailable(uid)
        if self._holder.get(uid) in self._locals:
            # Held by a peer of this node: no need to ask Redis.
            raise UidTaken(uid)
        conn = self._adopt(uid, peer, dialect)
        d = self._call("register", uid, self.node, conn, dialect)

        def refused(failure):
            self._drop(conn)
            return failure

        d.addErrback(refused)
        d.addCallback(lambda _: None)
        return d

    def remove(self, uid, peer):
        conn = self._own(uid, peer)
        if conn is None:
            return None
        local = self._drop(conn)
        if not self.up:
            # Only sessions within this node survive an outage: end it here.
            partner = local.partner
            if partner is not None:
                other = self._drop(partner[2])
                if other is not None:
                    other.peer.session_ended(uid)
            return None
        d = self._track(self._store.call("remove", uid, self.node, conn))
        # If Redis is lost on the way, the resync removes what is left.
        d.addBoth(lambda _: None)
        return d

    def peer_of(self, uid):
        """
        :returns: the peer holding ``uid`` on this node; else, while Redis is
            reachable, a stand-in for a holder on another node (whose probe
            and replacement go through Redis), which may turn out to hold
            nothing.
        """
        conn = self._holder.get(uid)
        local = self._locals.get(conn)
        if local is not None:
            return local.peer if local.dialect == "e" else None
        if not self.up:
            return None
        return RemoteHolder(self, uid)

    def start_session(self, caller_uid, callee_uid):
        conn = self._own(caller_uid)
        if conn is None:
            raise PeerNotFound(caller_uid)
        return self._call("start_session", caller_uid, callee_uid, self.node, conn)

    def join_room(self, uid, room_id):
        conn = self._own(uid)
        if conn is None:
            raise PeerNotFound(uid)
        return self._call(
            "join_room", uid, room_id, self.node, conn, self._max_room_members, self._max_rooms
        )

    def room_message(self, sender_uid, target_uid, payload):
        conn = self._own(sender_uid)
        if conn is None:
            raise NotInRoom(sender_uid)
        return self._call("room_message", sender_uid, target_uid, payload, self.node, conn)

    def room_members(self, uid):
        conn = self._own(uid)
        if conn is None:
            raise NotInRoom(uid)
        d = self._call("room_members", uid, self.node, conn)
        d.addCallback(lambda members: [_text(m) for m in members])
        return d

    # The JSON dialect.

    def welcome(self, peer_id, peer):
        return self._claim(peer_id, peer, "j")

    def set_peer_status(self, peer_id, roles, meta, claimed_id):
        conn = self._own(peer_id)
        if conn is None:
            raise JsonRefused(f"Peer '{peer_id}' hasn't been welcomed")
        d = self._call(
            "set_peer_status",
            peer_id,
            ",".join(roles),
            meta,
            claimed_id if claimed_id is not None else "",
            self.node,
            conn,
        )

        def done(_):
            local = self._locals.get(conn)
            if local is None:
                return
            if "consumer" in local.roles and "consumer" not in roles:
                # Giving the role up ended its sessions as consumer.
                local.consuming = None
            local.roles = tuple(roles)

        d.addCallback(done)
        return d

    def json_peers(self, role):
        d = self._call("json_peers", role)

        def listed(flat):
            return [
                (_text(flat[i]), _text(flat[i + 1])) for i in range(0, len(flat), 2)
            ]

        d.addCallback(listed)
        return d

    def start_json_session(self, peer_id, other_id, offer, names=None):
        conn = self._own(peer_id)
        if conn is None:
            raise JsonRefused(f"Peer with ID '{peer_id}' not found")
        session_id = str(uuid.uuid4())
        d = self._call(
            "start_json_session",
            peer_id,
            other_id,
            "" if offer is None else "1" + offer,
            session_id,
            self.node,
            conn,
            "" if names is None else json.dumps(sorted(names)),
            json_wire.not_allowed_session(other_id),
        )
        d.addCallback(_text)
        return d

    def json_message(self, peer_id, message):
        fields = message.fields
        session_id = fields["sessionId"]
        sdp = fields.get("sdp")
        is_offer = "1" if sdp and sdp["type"] == "offer" else ""
        raw = message.raw
        text = raw if raw is not None else json_wire.peer_message(message).encode("utf-8")
        d = self._call("json_message", peer_id, session_id, is_offer, text)
        d.addCallback(lambda _: None)
        return d

    def end_json_session(self, peer_id, session_id, error=None):
        d = self._call(
            "end_json_session", peer_id, session_id, "" if error is None else "1" + error
        )

        def done(_):
            local = self._locals.get(self._holder.get(peer_id))
            if local is not None and local.consuming:
                local.consuming.discard(session_id)

        d.addCallback(done)
        return d

    # What Redis delivers on this node's channel.

    def delivered(self, payload):
        """One message of this node's channel (see :mod:`signalling.cluster.scripts`)."""
        kind = payload[:1]
        head, _, body = payload[1:].partition(b"\0")
        if kind == b"M":
            local = self._locals.get(head.decode())
            if local is not None:
                local.peer.receiver.send_frames(decode_frames(body))
            return
        if kind == b"m":
            local = self._locals.get(head.decode())
            if local is not None:
                message = json_wire.Message("peer", None, None)
                message.raw = body
                local.peer.json_peer_message(message)
            return
        if kind == b"B":
            d = self._barriers.pop(body, None)
            if d is not None:
                d.callback(None)
            return
        if kind == b"A":
            d = self._probes.pop(body[1:], None)
            if d is not None and not d.called:
                d.callback(body[:1] == b"1")
            return
        fields = body.decode("utf-8").split("\0")
        for conn in head.decode().split(","):
            local = self._locals.get(conn)
            if local is None:
                continue  # it left meanwhile: its removal settles the rest
            try:
                self._notify(kind, conn, local, fields)
            except Exception:
                self._log.failure("while notifying {uid}", uid=local.uid)

    def _notify(self, kind, conn, local, fields):
        peer = local.peer
        if kind == b"S":
            partner_uid, node, partner_conn, caller = fields[0], fields[1], fields[2], fields[3] == "1"
            if node == self.node:
                other = self._locals.get(partner_conn)
                link = other.peer.receiver if other is not None else _GONE
            else:
                link = RemoteLink(self, node, partner_conn)
            local.partner = (partner_uid, node, partner_conn, caller)
            peer.session_started(partner_uid, link, caller)
        elif kind == b"E":
            self._drop(conn)
            peer.session_ended(fields[0])
        elif kind == b"J":
            room_id = fields[0]
            local.room = room_id
            members = [uid for uid in fields[1:] if uid]
            peer.room_joined(room_id, members)
        elif kind == b"j":
            peer.room_peer_joined(fields[0], fields[1])
        elif kind == b"L":
            peer.room_peer_left(fields[0], fields[1])
        elif kind == b"R":
            sender, payload = fields[0], "\0".join(fields[1:])
            peer.room_message(sender, payload)
        elif kind == b"u":
            peer_id, roles, meta = fields[0], fields[1], "\0".join(fields[2:])
            peer.peer_status_changed(peer_id, _roles(roles), meta)
        elif kind == b"a":
            if local.consuming is None:
                local.consuming = set()
            local.consuming.add(fields[1])
            peer.json_session_started(fields[0], fields[1])
        elif kind == b"b":
            offer = "\0".join(fields[2:])
            peer.json_start_session(fields[0], fields[1], offer[1:] if offer else None)
        elif kind == b"e":
            if local.consuming:
                local.consuming.discard(fields[0])
            reason = "\0".join(fields[1:])
            peer.json_session_ended(fields[0], reason[1:] if reason else None)
        elif kind == b"X":
            self._drop(conn)
            peer.replaced()
        elif kind == b"P":
            reply_node, token, timeout = fields[0], fields[1], float(fields[2])
            answer = peer.probe(timeout)
            answer.addErrback(lambda f: False)
            answer.addCallback(
                lambda alive: self.relay(reply_node, b"A\0" + (b"1" if alive else b"0") + token.encode())
            )

    # Reclaiming a uid held on another node.

    def probe_remote(self, uid, timeout):
        """
        Ask the node holding ``uid`` to ping its peer.

        :returns: a Deferred firing ``(alive, (node, conn))``: whether its
            pong came back within ``timeout`` seconds (False when no node
            answers in time), and where the holder was.
        """
        located = self._call("locate", uid)

        def ask(where):
            if not where:
                return False, None
            node, conn = _text(where[0]), _text(where[1])
            token = uuid.uuid4().hex
            d = self._probes[token.encode()] = defer.Deferred()
            self.relay(
                node, b"P" + conn.encode() + b"\0" + f"{self.node}\0{token}\0{timeout}".encode()
            )
            # The holder's node answers within ``timeout``; a node that
            # cannot answer (gone, or far behind) counts as silent.
            d.addTimeout(timeout + 1.0, self._clock, lambda *_: self._probes.pop(token.encode(), None) and False)
            d.addCallback(lambda alive: (bool(alive), (node, conn)))
            return d

        located.addCallback(ask)
        return located

    def evict(self, uid):
        """Remove whoever holds ``uid`` and have its node close it (1008)."""
        if self.up:
            self._store.call("evict", uid).addErrback(lambda f: None)

    def replace_remote(self, uid, where):
        """Remove ``uid``'s holder at ``where`` (``(node, conn)``) and have its node close it (1008)."""
        if where is None or not self.up:
            return
        d = self._store.call("replace", uid, *where)
        d.addErrback(lambda f: None)

    # For the tests: a barrier through the channels.

    def expect_barrier(self, token):
        """:returns: a Deferred fired when the barrier ``token`` (bytes) reaches this node."""
        d = self._barriers[token] = defer.Deferred()
        return d

    def send_barrier(self, node, token):
        """Send barrier ``token`` to ``node``'s channel, after everything sent before."""
        self._store.publish(node, b"B\0" + token)

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
in order with the calls; the store calls ``delivered`` with every message
of this node's channel (:mod:`signalling.cluster.channel` says what they
are; :meth:`signalling.cluster.peers.LocalPeers.delivered` reads them),
:meth:`ClusterRegistry.store_up` once it can serve again and
:meth:`ClusterRegistry.store_down` when it lost Redis.

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

What the node holds of its own peers is in :mod:`signalling.cluster.peers`,
its probes of other nodes' peers in :mod:`signalling.cluster.probes`.
"""

import json
import uuid

from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from signalling.core import json_wire
from signalling.core.interfaces import (
    IRegistry,
    JsonRefused,
    NotInRoom,
    PeerNotFound,
    SignallingError,
    UidTaken,
    Unavailable,
    counts_by_part,
)
from signalling.cluster.channel import DIALECT_EXAMPLES, DIALECT_JSON, answer, text
from signalling.cluster.peers import LocalPeers
from signalling.cluster.probes import Probes, RemoteHolder

#: Seconds between two heartbeats of a node.
HEARTBEAT = 1.0
#: Seconds after its last heartbeat that a node counts as dead.
NODE_TTL = 5.0
#: Seconds a question for a peer on another node waits for its answer.
ASK_TIMEOUT = 5.0


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
        #: This node's peers (:class:`signalling.cluster.peers.LocalPeers`).
        self.local = LocalPeers(self)
        #: Its probes of other nodes' peers, and its answers to theirs.
        self.probes = Probes(self, clock)
        #: What the store calls with every message of this node's channel.
        self.delivered = self.local.delivered
        self._heart = None
        #: Whether Redis is reachable and this node agrees with it.
        self.up = False
        self._syncing = False
        #: How often the node lost Redis, and how many dead nodes it released.
        self.outages = 0
        self.nodes_released = 0
        self.resyncs = 0
        #: Commands sent to Redis and not yet answered.
        self.in_flight = 0
        self._idle = []
        #: Callables told ``(up)`` whenever the node's availability changes.
        self.watchers = []

    # What the server reads (IRegistryStatus).

    spans_processes = True
    counts_by_part = counts_by_part

    @property
    def peer_count(self):
        return len(self.local.records)

    @property
    def session_count(self):
        """Sessions this node's peers called (each counted on its caller's node)."""
        return sum(1 for local in self.local.records.values() if local.partner and local.partner[3])

    @property
    def room_count(self):
        return len(self.local.rooms())

    @property
    def room_member_count(self):
        return sum(1 for local in self.local.records.values() if local.room is not None)

    @property
    def json_peer_count(self):
        return sum(1 for local in self.local.records.values() if local.dialect == DIALECT_JSON)

    @property
    def json_session_count(self):
        """JSON sessions this node's peers consume (each counted on its consumer's node)."""
        return sum(len(local.consuming) for local in self.local.records.values() if local.consuming)

    def is_empty(self):
        """:returns: True when this node holds no peer."""
        return self.local.is_empty()

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
        d = self._store.call("resync", self.node, self._ttl_ms, *self.local.claims())
        d.addCallbacks(self._resynced, self._resync_failed)

    def _resynced(self, lost):
        self._syncing = False
        self.resyncs += 1
        for uid in lost or ():
            self.local.replace(text(uid))
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
        self.local.keep_what_is_local()

    def _set_up(self, up):
        if up != self.up:
            self.up = up
            for watcher in list(self.watchers):
                watcher(up)

    # Talking to Redis.

    def call(self, name, *args):
        """
        Run script ``name`` (counted in :attr:`in_flight`).

        :returns: a Deferred of its answer's value (:func:`channel.answer`),
            failed with its refusal, or :class:`Unavailable` if Redis is lost.
        :raises Unavailable: Redis is away.
        """
        if not self.up:
            raise Unavailable(args[0] if args else None)
        d = self._track(self._store.call(name, *args))
        d.addCallbacks(answer, self._store_failed)
        return d

    def cast(self, name, *args):
        """Run script ``name`` for what it does alone (nothing while Redis is away)."""
        if self.up:
            self._store.call(name, *args).addErrback(lambda f: None)

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
        return self._claim(uid, peer, DIALECT_EXAMPLES)

    def _claim(self, uid, peer, dialect):
        if not self.up:
            raise Unavailable(uid)
        if self.local.holding(uid) is not None:
            # Held by a peer of this node: no need to ask Redis.
            raise UidTaken(uid)
        conn = self.local.adopt(uid, peer, dialect)
        d = self.call("register", uid, self.node, conn, dialect)

        def refused(failure):
            self.local.drop(conn)
            return failure

        d.addErrback(refused)
        d.addCallback(lambda _: None)
        return d

    def remove(self, uid, peer):
        conn = self.local.own(uid, peer)
        if conn is None:
            return None
        local = self.local.drop(conn)
        if not self.up:
            # Only sessions within this node survive an outage: end it here.
            self.local.end_local_session(local)
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
        local = self.local.holding(uid)
        if local is not None:
            return local.peer if local.dialect == DIALECT_EXAMPLES else None
        if not self.up:
            return None
        return RemoteHolder(self.probes, uid)

    def ask(self, uid, question):
        """
        The peer's answer: at once for a peer of this node; else, while
        Redis is reachable, through its node (None after :data:`ASK_TIMEOUT`).
        """
        local = self.local.holding(uid)
        if local is not None:
            return local.peer.asked(question)
        if not self.up:
            return None
        return self.probes.question(uid, question, ASK_TIMEOUT)

    def start_session(self, caller_uid, callee_uid):
        conn = self.local.own(caller_uid)
        if conn is None:
            raise PeerNotFound(caller_uid)
        return self.call("start_session", caller_uid, callee_uid, self.node, conn)

    def join_room(self, uid, room_id):
        conn = self.local.own(uid)
        if conn is None:
            raise PeerNotFound(uid)
        return self.call(
            "join_room", uid, room_id, self.node, conn, self._max_room_members, self._max_rooms
        )

    def room_message(self, sender_uid, target_uid, payload):
        conn = self.local.own(sender_uid)
        if conn is None:
            raise NotInRoom(sender_uid)
        return self.call("room_message", sender_uid, target_uid, payload, self.node, conn)

    def room_members(self, uid):
        conn = self.local.own(uid)
        if conn is None:
            raise NotInRoom(uid)
        d = self.call("room_members", uid, self.node, conn)
        d.addCallback(lambda members: [text(m) for m in members])
        return d

    # The JSON dialect.

    def welcome(self, peer_id, peer):
        return self._claim(peer_id, peer, DIALECT_JSON)

    def set_peer_status(self, peer_id, roles, meta, claimed_id):
        conn = self.local.own(peer_id)
        if conn is None:
            raise JsonRefused(f"Peer '{peer_id}' hasn't been welcomed")
        d = self.call(
            "set_peer_status",
            peer_id,
            ",".join(roles),
            meta,
            claimed_id if claimed_id is not None else "",
            self.node,
            conn,
        )

        def done(_):
            local = self.local.records.get(conn)
            if local is None:
                return
            if "consumer" in local.roles and "consumer" not in roles:
                # Giving the role up ended its sessions as consumer.
                local.consuming = None
            local.roles = tuple(roles)

        d.addCallback(done)
        return d

    def json_peers(self, role):
        d = self.call("json_peers", role)

        def listed(flat):
            return [
                (text(flat[i]), text(flat[i + 1])) for i in range(0, len(flat), 2)
            ]

        d.addCallback(listed)
        return d

    def start_json_session(self, peer_id, other_id, offer, names=None):
        conn = self.local.own(peer_id)
        if conn is None:
            raise JsonRefused(f"Peer with ID '{peer_id}' not found")
        session_id = str(uuid.uuid4())
        d = self.call(
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
        d.addCallback(text)
        return d

    def json_message(self, peer_id, message):
        fields = message.fields
        session_id = fields["sessionId"]
        sdp = fields.get("sdp")
        is_offer = "1" if sdp and sdp["type"] == "offer" else ""
        raw = message.raw
        body = raw if raw is not None else json_wire.peer_message(message).encode("utf-8")
        d = self.call("json_message", peer_id, session_id, is_offer, body)
        d.addCallback(lambda _: None)
        return d

    def end_json_session(self, peer_id, session_id, error=None):
        d = self.call(
            "end_json_session", peer_id, session_id, "" if error is None else "1" + error
        )

        def done(_):
            local = self.local.holding(peer_id)
            if local is not None and local.consuming:
                local.consuming.discard(session_id)

        d.addCallback(done)
        return d

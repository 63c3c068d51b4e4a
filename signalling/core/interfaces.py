"""
The seams of the server: what a registry backend may do to a peer
(:class:`IPeer`), what a connection may ask of a backend (:class:`IRegistry`),
how messages travel between session partners (:class:`ILink`), what the
per-connection logic writes to its wire (:class:`IConnectionOutput`), and
the domain exceptions a backend raises.

The contract between a backend and the connections
==================================================

A backend is the in-memory :class:`signalling.core.registry.Registry`, or one that
answers over the network (a cluster). Connections call every
:class:`IRegistry` method through ``defer.maybeDeferred``: a method may
return its result at once or as a Deferred, and raise or fail it with a
:class:`SignallingError`.

What a backend must do:

1. **Decide at once, atomically.** Each command takes effect completely or
   not at all, and competing commands resolve as "first one wins" (two
   HELLOs for one uid, crossed calls, a leave during a join).
2. **Tell each affected peer once.** A successful ``start_session`` calls
   :meth:`IPeer.session_started` once on each partner; ``join_room`` calls
   :meth:`IPeer.room_joined` once on the joiner and
   :meth:`IPeer.room_peer_joined` once on every member already there;
   ``remove`` calls :meth:`IPeer.session_ended` once on the partner and
   :meth:`IPeer.room_peer_left` once on every remaining member. A member is
   told of another's join either in its ``room_joined`` list or by
   ``room_peer_joined``, never both, and of a leave only for a peer it was
   told about. In the JSON dialect, ``start_json_session`` tells the
   consumer, then the producer, once each; a status change, every listener
   once; ``end_json_session`` and the end of a role or of a peer, the other
   side of each session once. A command refused with :class:`AlreadyEngaged` because a
   crossed call made the peer a callee is followed by that call's
   ``session_started`` (the connection then relays the refused line).
3. **Keep each sender's order.** Everything one peer causes at another
   (the notifications of its commands and the messages it relays through
   its :class:`ILink`) reaches that other peer in the order it was caused.

What a backend may do, and every connection copes with:

4. **Answer and notify in any order.** A command's result (the Deferred's
   callback or errback) and the notifications it causes, to this peer and
   to others, on this node or another, may arrive in any order relative to
   each other. A uid may be visible to other peers (and be called) before
   the peer's own ``register`` has answered.
5. **Interleave senders.** What different peers cause at one peer may
   arrive interleaved in any way; in particular a partner's relayed messages
   may arrive before the ``session_started`` of the peer that asked for the
   session.
6. **Link locally or remotely.** The :class:`ILink` handed over with
   ``session_started`` may write straight to the partner's connection (on
   this node; it may take several messages at once) or carry messages
   through the backend.
7. **Be unavailable for a while.** A backend that cannot serve (a cluster
   node that lost its Redis) refuses commands with :class:`Unavailable`, and
   may remove a peer whose state spans what it lost, telling it
   :meth:`IPeer.unavailable` (or :meth:`IPeer.session_ended`, for a session
   with another node's peer).

What the connection side guarantees under every such order (see
``docs/protocol.md``): no notification or relayed message before the reply
it must follow (``HELLO``, ``SESSION_OK``, ``ROOM_OK``); input that arrives
while a command is pending is handled, in order, once the command is
complete (a ``SESSION`` or ``ROOM`` command is complete when its
notification has arrived, not merely its result); once in a session nothing
is treated as a command; a request that fails because a crossed call made
this peer a callee meanwhile is relayed to the new partner, as the protocol
says of crossed calls; each sender's order is kept; ``ROOM_PEER_JOINED`` and
``ROOM_PEER_LEFT`` are sent exactly once per member, each ``LEFT`` after its
``JOINED``.
"""

from zope.interface import Attribute, Interface


class SignallingError(Exception):
    """A request the registry refuses; the protocol answers with ``ERROR``."""

    #: The refusal's fixed name: its metrics label, and how a cluster
    #: script names it (:data:`ERRORS_BY_KIND`).
    kind = "request_failed"

    def __init__(self, uid=None):
        super().__init__(uid)
        self.uid = uid


class UidTaken(SignallingError):
    """Another connected peer holds the uid."""

    kind = "uid_taken"


class PeerNotFound(SignallingError):
    """No connected peer has the uid."""

    kind = "peer_not_found"


class PeerBusy(SignallingError):
    """The callee is already in a session or a room."""

    kind = "peer_busy"


class SessionWithSelf(SignallingError):
    """A peer tried to start a session with itself."""

    kind = "session_with_self"


class AlreadyEngaged(SignallingError):
    """The requesting peer is already in a session or a room."""

    kind = "already_engaged"


class NotInRoom(SignallingError):
    """The requesting peer is in no room."""

    kind = "not_in_room"


class PeerNotInRoom(SignallingError):
    """The addressed peer is registered but not in the sender's room."""

    kind = "peer_not_in_room"


class RoomFull(SignallingError):
    """The room has as many members as a room may have (``uid`` holds the room id)."""

    kind = "room_full"


class TooManyRooms(SignallingError):
    """The server has as many rooms as it may have (``uid`` holds the room id)."""

    kind = "too_many_rooms"


class Unavailable(SignallingError):
    """
    The backend cannot serve the request now (a cluster node lost its
    Redis): the peer may try again later.
    """

    kind = "unavailable"


class JsonRefused(SignallingError):
    """
    A request of the JSON dialect the registry refuses; the peer is sent
    ``error`` with :attr:`details`, the upstream server's words.
    """

    def __init__(self, details):
        super().__init__(None)
        self.details = details

    def __str__(self):
        return self.details


#: The refusals of the examples' dialect by their kind: the one table of
#: them (for the ``ERROR`` lines and metrics, and a cluster script's answers).
ERRORS_BY_KIND = {
    cls.kind: cls
    for cls in (
        UidTaken,
        PeerNotFound,
        PeerBusy,
        SessionWithSelf,
        AlreadyEngaged,
        NotInRoom,
        PeerNotInRoom,
        RoomFull,
        TooManyRooms,
        Unavailable,
    )
}


#: First header byte of an unfragmented text and binary WebSocket frame
#: (FIN set, no RSV bits, opcode 1 or 2): how relayed messages are tagged.
TEXT_FRAME = 0x81
BINARY_FRAME = 0x82


class ILink(Interface):
    """
    The way to a session partner: messages given to it reach the partner
    verbatim, in order. A local link writes to the partner's connection
    directly; a remote one carries them through the backend.
    """

    def send_frames(frames):
        """
        Relay messages to the partner, in order, in one write where it can.

        :param frames: a sequence of ``(first_byte, payload)``: the first
            header byte (:data:`TEXT_FRAME` or :data:`BINARY_FRAME`) and the
            payload bytes of each message.
        """

    def set_backpressure(active):
        """
        The holder of this link is not keeping up with what the partner
        sends (its own peer is not reading): while ``active``, stop reading
        the partner's input, so that TCP pushes back on it, as it would on a
        direct connection. A remote link may do nothing; the holder's output
        bound applies then.
        """


class IPeer(Interface):
    """
    A registered connection as the registry sees it. Every method is called
    by the registry, and none may call back into the registry synchronously.
    """

    receiver = Attribute(
        "An ILink that relays messages to this peer: what its session "
        "partner is handed."
    )

    def session_started(partner_uid, link, caller):
        """
        This peer is now in a session with ``partner_uid``.

        :param link: the :class:`ILink` to the partner.
        :param caller: True for the peer that asked for the session (it is
            answered ``SESSION_OK``), False for the callee (told nothing).
        """

    def session_ended(partner_uid):
        """
        The partner's connection closed; this peer has been removed from the
        registry and must close its own connection (code 1000, no message).
        """

    def room_joined(room_id, members):
        """
        This peer joined ``room_id``.

        :param members: uids of the members already there, in join order.
        """

    def room_peer_joined(room_id, uid):
        """``uid`` joined the room this peer is in."""

    def room_peer_left(room_id, uid):
        """``uid`` left the room this peer is in."""

    def probe(timeout):
        """
        :returns: a Deferred firing True if the peer answers a ping within
            ``timeout`` seconds, else False.
        """

    def replaced():
        """A new connection takes this peer's uid over: close (1008)."""

    def unavailable():
        """
        The backend lost what this peer depends on (a cluster node lost its
        Redis while the peer was in a room, or spoke the JSON dialect): the
        peer has been removed from the registry and must close (1013, try
        again later).
        """

    def room_message(sender_uid, payload):
        """
        A room member sent this peer a message.

        :param payload: the message text after the uid, kept as sent.
        """


class IJsonPeer(Interface):
    """
    A connection of the JSON dialect (the protocol of GStreamer's
    ``webrtcsink``, ``webrtcsrc`` and ``gstwebrtc-api``) as the registry sees
    it. As for :class:`IPeer`, none may call back into the registry
    synchronously.
    """

    def peer_status_changed(peer_id, roles, meta):
        """
        A peer's status changed (told to listeners; ``roles`` is empty when
        the peer left).
        """

    def json_session_started(peer_id, session_id):
        """This consumer's session ``session_id`` with producer ``peer_id`` started."""

    def json_start_session(peer_id, session_id, offer):
        """This producer is asked to start ``session_id`` with consumer ``peer_id``."""

    def json_peer_message(message):
        """
        The other side of a session sent a ``peer`` message.

        :param message: a :class:`signalling.core.json_wire.Message`.
        """

    def json_session_ended(session_id, error):
        """The other side ended ``session_id`` (``error``: its reason, or None)."""

    def asked(question):
        """
        :returns: the answer (bytes, or a Deferred of it) to a ``question``
            handed over by :meth:`IIds.ask`; None for a peer that takes none.
        """


class IIds(Interface):
    """
    The part of a registry every dialect shares: one namespace of ids, and
    letting go of one. Each method of a registry does all of its work or
    none of it, raising a :class:`SignallingError` in the second case, so
    that competing requests resolve as "first one wins". A method may return
    its result directly or as a Deferred.
    """

    def remove(uid, peer):
        """
        Forget ``peer`` registered as ``uid``, end its session (the partner is
        removed and told through :meth:`IPeer.session_ended`) and its room
        membership (members are told through :meth:`IPeer.room_peer_left`).
        Does nothing if ``uid`` is not held by ``peer``, so it is safe to call
        more than once. For a peer of the JSON dialect: its sessions end
        (the other sides are told :meth:`IJsonPeer.json_session_ended`) and
        every listener is told :meth:`IJsonPeer.peer_status_changed` with no
        role.
        """

    def peer_of(uid):
        """
        :returns: the :class:`IPeer` registered as ``uid`` if it is
            connected to this node (so that a new ``HELLO`` for its uid can
            ask whether it is still alive), else None. A cluster node may
            answer, for a uid held elsewhere, a stand-in whose ``probe``,
            ``replaced`` and ``peer_addr`` go through the backend.
        """

    def ask(uid, question):
        """
        Hand ``question`` (bytes) to the peer of the JSON dialect's part
        registered as ``uid``, wherever it is connected (a cluster node forwards it to the node that holds
        the peer), and bring back what its ``asked(question)`` answers (see
        :meth:`IJsonPeer.asked`): the requests of an HTTP dialect's session
        that reach another process than the one holding the session.

        :returns: the answer (bytes), or None when no peer holds ``uid`` or
            none answers in time; directly or as a Deferred.
        """


class IExamplesRegistry(IIds):
    """The registry's part for the examples' dialect: uids, sessions and rooms."""

    def register(uid, peer):
        """
        Register ``peer`` under ``uid``.

        :raises UidTaken: another peer holds ``uid``.
        """

    def start_session(caller_uid, callee_uid):
        """
        Link two peers: both get :meth:`IPeer.session_started`, the caller first.

        :raises PeerNotFound: no peer has ``callee_uid`` (or the caller is gone).
        :raises PeerBusy: the callee is in a session or a room.
        :raises SessionWithSelf: ``caller_uid == callee_uid``.
        :raises AlreadyEngaged: the caller is in a session or a room.
        """

    def join_room(uid, room_id):
        """
        Add ``uid`` to ``room_id``: the joiner gets :meth:`IPeer.room_joined`,
        then every other member :meth:`IPeer.room_peer_joined`.

        :raises AlreadyEngaged: the peer is in a session or a room.
        :raises RoomFull: the room has the most members a room may have.
        :raises TooManyRooms: the room is new and the server has the most
            rooms it may have.
        """

    def room_message(sender_uid, target_uid, payload):
        """
        Hand ``payload`` to ``target_uid`` through :meth:`IPeer.room_message`.

        :raises NotInRoom: the sender is in no room.
        :raises PeerNotFound: no peer has ``target_uid``.
        :raises PeerNotInRoom: the target is not in the sender's room.
        """

    def room_members(uid):
        """
        :returns: the uids of the other members of ``uid``'s room, in join order.
        :raises NotInRoom: the peer is in no room.
        """


class IJsonRegistry(IIds):
    """
    The registry's part for the JSON dialect. Peer ids share one namespace
    with the examples' uids; a JSON peer is not found by the examples'
    commands, nor an examples peer by these. Refusals raise
    :class:`JsonRefused` with the upstream server's words.
    """

    def welcome(peer_id, peer):
        """
        Register the :class:`IJsonPeer` ``peer`` under ``peer_id`` (which the
        server chose), with no role.

        :raises UidTaken: another peer holds ``peer_id``.
        """

    def set_peer_status(peer_id, roles, meta, claimed_id):
        """
        Replace the peer's roles and meta (``claimed_id``: the ``peerId``
        the message carried, or None). Unless nothing changed, every
        listener (the peer too, if it listens) is told
        :meth:`IJsonPeer.peer_status_changed`; a role given up ends that
        role's sessions (the other sides are told
        :meth:`IJsonPeer.json_session_ended`).

        :raises JsonRefused: producer together with consumer.
        """

    def json_peers(role):
        """
        :returns: ``[(peer_id, meta)]`` of the peers with ``role``, oldest
            first; each meta is canonical JSON text
            (:func:`signalling.core.json_wire.canonical`).
        """

    def start_json_session(peer_id, other_id, offer, names=None):
        """
        Start a session between ``peer_id`` and ``other_id``: the producer
        among them is told :meth:`IJsonPeer.json_start_session`, after the
        consumer :meth:`IJsonPeer.json_session_started`.

        :param names: None, or the names (a token's ``calls``) the other
            peer's ``meta.name`` must be one of.
        :returns: the new session id.
        :raises JsonRefused: ``other_id`` is unknown, or neither a producer nor
            a consumer, or not named in ``names``.
        """

    def json_message(peer_id, message):
        """
        Forward a ``peer`` message to the other side of its session
        (:meth:`IJsonPeer.json_peer_message`); one for an unknown session is
        dropped.

        :raises JsonRefused: ``peer_id`` is not in the session, or is its
            consumer and sent an offer.
        """

    def end_json_session(peer_id, session_id, error=None):
        """
        End ``session_id``: the other side is told
        :meth:`IJsonPeer.json_session_ended`. An unknown session is ignored.

        :raises JsonRefused: ``peer_id`` is not in the session.
        """


class IRegistryStatus(Interface):
    """
    What the server reads of any backend: whether it can serve, and its
    counts. The in-memory backend is always up and never spans processes.
    """

    up = Attribute("True while the backend can serve (a cluster node that reaches Redis).")
    watchers = Attribute("A list of callables told ``up`` (a bool) each time it changes.")
    spans_processes = Attribute(
        "True for a backend shared by several processes (a cluster): its outages, "
        "resyncs and released nodes mean something."
    )
    outages = Attribute("Times the backend stopped being able to serve.")
    resyncs = Attribute("Times it made its shared state agree with what this process holds.")
    nodes_released = Attribute("Dead processes whose peers it released.")
    peer_count = Attribute("How many peers are registered (here), every dialect.")
    session_count = Attribute("How many sessions of the examples' dialect are in progress.")
    room_count = Attribute("How many rooms have at least one member.")
    room_member_count = Attribute("How many peers are in a room.")
    json_peer_count = Attribute("How many peers of the JSON dialect are registered.")
    json_session_count = Attribute("How many sessions of the JSON dialect are in progress.")

    def counts_by_part():
        """
        :returns: ``{part: (peers, sessions)}`` for each registry part it
            serves, by the part's interface (:class:`IExamplesRegistry`,
            :class:`IJsonRegistry`).
        """


class IRegistry(IExamplesRegistry, IJsonRegistry, IRegistryStatus):
    """A backend that serves both dialects: what every backend here is."""


def counts_by_part(registry):
    """:returns: :meth:`IRegistryStatus.counts_by_part` from a registry's counts."""
    json_peers = registry.json_peer_count
    return {
        IExamplesRegistry: (registry.peer_count - json_peers, registry.session_count),
        IJsonRegistry: (json_peers, registry.json_session_count),
    }


class IConnectionOutput(Interface):
    """
    What the per-connection logic (:class:`signalling.core.connection.Connection`)
    writes to its wire; the WebSocket protocol provides it.
    """

    peer_addr = Attribute("The peer's address, for logs (e.g. tcp4:127.0.0.1:5555).")
    grant = Attribute(
        "What the connection's token allows (allows_uid, allows_room, allows_call, "
        "allows_roles), or None when the server asks for no token."
    )

    def send_text(text):
        """Send one protocol line (a text message), unless the connection is closing."""

    def send_frames(frames):
        """
        Send relayed messages verbatim, in one write, unless the connection
        is closing.

        :param frames: ``(first_byte, payload)`` pairs, as for :class:`ILink`.
        """

    def probe(timeout):
        """
        Ping the peer now. :returns: a Deferred firing True if its pong
        comes back within ``timeout`` seconds, else False.
        """

    def pause_reading(reason):
        """Stop reading from the peer until every reason is withdrawn."""

    def resume_reading(reason):
        """Withdraw a reason to stop reading from the peer."""

    def close(code, reason=None):
        """
        Close the connection with ``code`` (1000, 1001, 1002, 1008, 1011)
        and the ``reason`` text, if any. The connection then tells the
        logic :meth:`~signalling.core.connection.Connection.closing`.
        """

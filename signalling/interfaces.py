"""
The seams of the server: what the registry may do to a peer (:class:`IPeer`),
what the protocol may ask of a registry (:class:`IRegistry`), and the domain
exceptions a registry raises.

A registry may complete its work later (a cluster backend answers over the
network): the protocol calls every :class:`IRegistry` method through
``defer.maybeDeferred``, so a method may return a plain value or a Deferred.
"""

from zope.interface import Attribute, Interface


class SignallingError(Exception):
    """A request the registry refuses; the protocol answers with ``ERROR``."""

    def __init__(self, uid=None):
        super().__init__(uid)
        self.uid = uid


class UidTaken(SignallingError):
    """Another connected peer holds the uid."""


class PeerNotFound(SignallingError):
    """No connected peer has the uid."""


class PeerBusy(SignallingError):
    """The callee is already in a session or a room."""


class SessionWithSelf(SignallingError):
    """A peer tried to start a session with itself."""


class AlreadyEngaged(SignallingError):
    """The requesting peer is already in a session or a room."""


class NotInRoom(SignallingError):
    """The requesting peer is in no room."""


class PeerNotInRoom(SignallingError):
    """The addressed peer is registered but not in the sender's room."""


class IPeer(Interface):
    """
    A registered connection as the registry sees it. Every method is called
    by the registry, and none may call back into the registry synchronously.
    """

    def send_frame(payload, is_binary):
        """
        Relay one message to this peer as it is: the session link.

        :param payload: the message bytes.
        :param is_binary: send a binary frame rather than a text frame.
        """

    def session_started(partner_uid, link, caller):
        """
        This peer is now in a session with ``partner_uid``.

        :param link: a callable ``(payload, is_binary)`` that relays one
            message to the partner.
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

    def room_message(sender_uid, payload):
        """
        A room member sent this peer a message.

        :param payload: the message text after the uid, kept as sent.
        """


class IRegistry(Interface):
    """
    Peers, sessions and rooms. Each method does all of its work or none of
    it, raising a :class:`SignallingError` in the second case, so that
    competing requests resolve as "first one wins". A method may return its
    result directly or as a Deferred.
    """

    def register(uid, peer):
        """
        Register ``peer`` under ``uid``.

        :raises UidTaken: another peer holds ``uid``.
        """

    def remove(uid, peer):
        """
        Forget ``peer`` registered as ``uid``, end its session (the partner is
        removed and told through :meth:`IPeer.session_ended`) and its room
        membership (members are told through :meth:`IPeer.room_peer_left`).
        Does nothing if ``uid`` is not held by ``peer``, so it is safe to call
        more than once.
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

    peer_count = Attribute("How many peers are registered.")
    session_count = Attribute("How many sessions are in progress.")
    room_count = Attribute("How many rooms have at least one member.")
    room_member_count = Attribute("How many peers are in a room.")

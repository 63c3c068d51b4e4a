"""
Integration tests: a real signalling server listening on a loopback port,
over plaintext and over TLS, and real WebSocket clients (Autobahn on the real
reactor, plus a raw client for hand-made frames and plain HTTP).

Every rule here is one of ``PROTOCOL.md``; the section is named where a rule
is subtle. One suite runs over both transports. After every test all
clients are closed, the server holds no connection, and the registry holds
no peer, session or room (see :meth:`tests._realserver.RealServer.stop`).
"""

import gc
import json
import struct
import weakref

from twisted.internet import endpoints, reactor
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from signalling.server import websocket
from tests.certificates import write_certificate
from tests.clients import RawClient, WAIT, eventually, pause
from tests.servers import Server
from tests.helpers import change_settings


MiB = 1024 * 1024

#: A keepalive short enough for tests (seconds): ping interval and pong deadline.
#: Autobahn's timers round deadlines down to whole seconds of wall-clock time,
#: so a deadline of D seconds fires after somewhere between D - 1 and D.
KEEPALIVE = 1.5
#: The shortest keepalive the server accepts.
MIN_KEEPALIVE = 1.0

INVALID_UTF8 = b"HELLO caf\xc3\x28 \xff\xfe"

#: The close timeout of the servers that test closing: how long a closing
#: connection may take before the server aborts it.
CLOSE_TIMEOUT = 2.5
#: How soon a failed connection's partner or room must be told: well within
#: the close timeout (which Autobahn's timers may shorten by up to a second),
#: so before a silent peer's connection is gone.
RELEASED_AT_ONCE = 1.0


class IntegrationTestsMixin:
    """
    The whole suite; subclasses say whether the server listens with TLS.

    ``self.server`` is a server with the default settings of
    ``twistd -n signalling`` (keepalive 30 s, 1 MiB messages); tests that need
    other settings start their own with :meth:`start_server`.
    """

    tls = None
    timeout = 30
    #: What a client that sends ``HELLO`` and a close frame at once may read
    #: before the server's close: one process answers ``HELLO`` at once.
    answers_before_close = ([(1, b"HELLO")],)

    async def setUp(self):
        self.server = await self.start_server()

    async def start_server(self, **factory_kwargs):
        """:returns: another listening server, cleaned up after the test."""
        return await Server.listening(self, self.tls, **factory_kwargs)

    # Checks shared by many tests.

    async def assert_refused(self, client, close_reason):
        """
        ``client``'s next message is an ``ERROR`` line, then the server closes
        with 1002 and ``close_reason``, sending nothing else.
        """
        message = await client.next()
        self.assertTrue(message.startswith("ERROR "), message)
        code, reason = await client.closed()
        self.assertEqual((code, reason), (1002, close_reason))
        self.assertEqual(client.unread_at_close, [])

    async def assert_registered_and_idle(self, client):
        """``client`` is open, registered, in no session or room, with nothing unread."""
        self.assertEqual(client.unread(), [])
        client.send_text("PROBE-IDLE")
        await client.expect("ERROR unknown command 'PROBE-IDLE'")

    async def assert_in_room(self, client, *others):
        """``client`` is open, in a room with ``others`` (in join order), with nothing unread."""
        self.assertEqual(client.unread(), [])
        client.send_text("ROOM_PEER_LIST")
        await client.expect("ROOM_PEER_LIST " + " ".join(others))

    async def assert_session_works(self, a, b):
        """``a`` and ``b`` relay to each other, and neither had anything unread."""
        self.assertEqual((a.unread(), b.unread()), ([], []))
        a.send_text("check a->b")
        await b.expect("check a->b")
        b.send_text("check b->a")
        await a.expect("check b->a")

    async def assert_closed_by_partner(self, client):
        """The server closed ``client`` with 1000 and sent nothing first."""
        code, _ = await client.closed()
        self.assertEqual(code, 1000)
        self.assertEqual(client.unread_at_close, [])

    # Registration.

    async def test_hello_is_answered_with_hello(self):
        """``HELLO <uid>`` is answered with exactly ``HELLO``, and registers the uid."""
        client = await self.server.connect()
        client.send_text("HELLO alice")
        await client.expect("HELLO")
        caller = await self.server.hello("bob")
        caller.send_text("SESSION alice")
        await caller.expect("SESSION_OK")

    async def test_a_client_offering_compression_is_served_without_it(self):
        """
        A client that offers permessage-deflate (every browser) is accepted
        with no extension, and relays as any other.
        """
        a = await self.server.connect(compression=True)
        self.assertEqual(a.websocket_extensions_in_use, [])
        a.send_text("HELLO deflating")
        await a.expect("HELLO")
        b = await self.server.hello("plain")
        b.send_text("SESSION deflating")
        await b.expect("SESSION_OK")
        await self.assert_session_works(b, a)

    async def test_hello_accepts_tabs_repeated_spaces_and_no_break_spaces_as_separator(self):
        """Any run of Unicode whitespace separates ``HELLO`` from the uid."""
        caller = await self.server.hello("caller")
        for index, separator in enumerate(["\t", "   ", "\u00a0", " \t\u00a0\u2003"]):
            uid = f"sep-{index}"
            client = await self.server.connect()
            client.send_text(f"HELLO{separator}{uid}")
            await client.expect("HELLO")
        # Each uid is exactly the word, without the separator.
        caller.send_text("SESSION sep-3")
        await caller.expect("SESSION_OK")

    async def test_first_message_other_than_hello_is_refused_with_1002_invalid_protocol(self):
        """
        A first message that is not ``HELLO <uid>`` gets ``ERROR ...``, then
        a close with 1002 ``invalid protocol``; nothing is registered.
        """
        for text in ["SESSION bob", "ROOM r", "ROOM_PEER_LIST", "hello alice",
                     "HELLOalice", "HELLO_ alice", "OFFER_REQUEST", "garbage"]:
            client = await self.server.connect()
            client.send_text(text)
            await self.assert_refused(client, "invalid protocol")
            self.assertTrue(self.server.registry.is_empty(), text)

    async def test_invalid_uid_is_refused_with_1002_invalid_peer_uid(self):
        """
        An empty uid, or one with whitespace or control characters inside,
        or one longer than 256 characters gets ``ERROR ...`` and a close with
        1002 ``invalid peer uid``; nothing is registered.
        """
        for text in ["HELLO", "HELLO ", "HELLO \t ", "HELLO a b", "HELLO a\tb",
                     "HELLO a\u00a0b", "HELLO trailing ", "HELLO a\x01b", "HELLO nul\x00",
                     "HELLO del\x7f", "HELLO c1\x9b", "HELLO " + "x" * 257]:
            client = await self.server.connect()
            client.send_text(text)
            await self.assert_refused(client, "invalid peer uid")
            self.assertTrue(self.server.registry.is_empty(), repr(text))

    async def test_uid_of_256_characters_is_accepted(self):
        """A uid of exactly 256 characters (code points, not bytes) is registered."""
        uid = "\u00e9" * 255 + "x"
        self.assertEqual(len(uid), 256)
        await self.server.hello(uid)
        caller = await self.server.hello("caller")
        caller.send_text("SESSION " + uid)
        await caller.expect("SESSION_OK")

    async def test_taken_uid_is_refused_and_its_holder_is_unaffected(self):
        """A HELLO with a uid held by a connected peer is refused; the holder keeps it."""
        holder = await self.server.hello("alice")
        second = await self.server.connect()
        second.send_text("HELLO alice")
        await self.assert_refused(second, "invalid peer uid")
        caller = await self.server.hello("bob")
        caller.send_text("SESSION alice")
        await caller.expect("SESSION_OK")
        await self.assert_session_works(caller, holder)

    async def test_uid_is_free_again_once_its_connection_closed(self):
        """After a normal close, the uid can be registered again at once."""
        first = await self.server.hello("alice")
        first.close()
        await first.closed()
        await self.server.hello("alice")

    async def test_uid_is_free_again_after_a_drop_without_close_frame(self):
        """
        After a TCP drop with no close frame, the uid is free as soon as the
        server sees the drop.
        """
        first = await self.server.hello("alice")
        first.abort()
        await self.server.wait_for_connections(0)
        await self.server.hello("alice")

    async def test_second_hello_from_a_registered_peer_is_an_error_that_changes_nothing(self):
        """
        ``HELLO`` from a registered peer is an ``ERROR``; it keeps its uid
        and stays connected.
        """
        alice = await self.server.hello("alice")
        alice.send_text("HELLO other")
        message = await alice.next()
        self.assertTrue(message.startswith("ERROR "), message)
        caller = await self.server.hello("bob")
        caller.send_text("SESSION other")
        await caller.expect("ERROR peer 'other' not found")
        caller.send_text("SESSION alice")
        await caller.expect("SESSION_OK")
        await self.assert_session_works(caller, alice)

    async def test_connection_that_never_says_hello_is_closed_after_the_hello_timeout(self):
        """
        On a port pinned to the examples' dialect, a connection that sends
        nothing is closed (with a close frame) once the HELLO deadline passes.
        """
        server = await self.start_server(hello_timeout=0.3, dialect="examples")
        client = await server.connect()
        code, _ = await client.closed()
        self.assertIsNotNone(code)
        self.assertEqual(client.unread_at_close, [])

    # 1-1 sessions.

    async def test_session_ok_goes_to_the_caller_only(self):
        """
        The caller gets ``SESSION_OK``; the callee is told nothing, so the
        first thing it receives is what the caller relays.
        """
        callee = await self.server.hello("callee")
        caller = await self.server.hello("caller")
        caller.send_text("SESSION callee")
        await caller.expect("SESSION_OK")
        caller.send_text("OFFER_REQUEST")
        await callee.expect("OFFER_REQUEST")

    async def test_session_relays_every_message_verbatim_both_ways_in_order(self):
        """
        In a session every message goes to the partner unchanged and in
        order, even one that looks like a command; text stays text and binary
        stays binary.
        """
        caller, callee = await self.server.session("caller", "callee")
        sdp = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n"
        offer = json.dumps({"sdp": {"type": "offer", "sdp": sdp}})
        messages = [
            offer,
            "OFFER_REQUEST",
            "SESSION caller",
            "HELLO someone",
            "ROOM room",
            "ROOM_PEER_MSG caller hi",
            "ROOM_PEER_LIST",
            "ERROR not really",
            "",
            "  spaced  \tout \u00a0 ",
            "\u00fcn\u00efc\u00f6d\u00e9 \u2603 \U0001f389",
            "nul\x00 esc\x1b",
            b"\x00\x01binary\xff\xfe",
            b"",
            b"SESSION caller",
        ]
        for message in messages:
            if isinstance(message, bytes):
                caller.send_bytes(message)
                callee.send_bytes(message)
            else:
                caller.send_text(message)
                callee.send_text(message)
        self.assertEqual(await callee.take(len(messages)), messages)
        self.assertEqual(await caller.take(len(messages)), messages)
        await self.assert_session_works(caller, callee)

    async def test_session_with_an_unknown_uid_is_answered_not_found(self):
        """
        ``SESSION`` to a uid nobody holds is ``ERROR peer '<uid>' not
        found``, and changes nothing.
        """
        caller = await self.server.hello("caller")
        caller.send_text("SESSION nobody")
        await caller.expect("ERROR peer 'nobody' not found")
        await self.server.hello("callee")
        caller.send_text("SESSION callee")
        await caller.expect("SESSION_OK")

    async def test_session_with_a_peer_in_a_session_is_answered_busy(self):
        """A callee already in a session is busy; its session goes on."""
        a, b = await self.server.session("a", "b")
        caller = await self.server.hello("c")
        caller.send_text("SESSION a")
        await caller.expect("ERROR peer 'a' busy")
        caller.send_text("SESSION b")
        await caller.expect("ERROR peer 'b' busy")
        await self.assert_session_works(a, b)
        await self.assert_registered_and_idle(caller)

    async def test_session_with_a_peer_in_a_room_is_answered_busy(self):
        """A callee in a room is busy; it stays in its room."""
        (member,) = await self.server.room("r", "member")
        caller = await self.server.hello("caller")
        caller.send_text("SESSION member")
        await caller.expect("ERROR peer 'member' busy")
        await self.assert_in_room(member)
        await self.assert_registered_and_idle(caller)

    async def test_session_with_yourself_is_an_error(self):
        """
        ``SESSION <own uid>`` is ``ERROR cannot start a session with
        yourself``; the peer stays registered.
        """
        alice = await self.server.hello("alice")
        alice.send_text("SESSION alice")
        await alice.expect("ERROR cannot start a session with yourself")
        alice.send_text("ROOM r")
        await alice.expect("ROOM_OK ")

    async def test_session_without_a_uid_is_an_error(self):
        """``SESSION`` with its argument missing is an ``ERROR``; the connection stays."""
        alice = await self.server.hello("alice")
        for text in ["SESSION", "SESSION ", "SESSION \t "]:
            alice.send_text(text)
            message = await alice.next()
            self.assertTrue(message.startswith("ERROR "), (text, message))
        await self.assert_registered_and_idle(alice)

    async def test_session_arguments_may_be_separated_by_tabs_and_repeated_spaces(self):
        """Any run of whitespace separates ``SESSION`` from the callee's uid."""
        await self.server.hello("callee")
        caller = await self.server.hello("caller")
        caller.send_text("SESSION \t\u00a0 callee")
        await caller.expect("SESSION_OK")

    async def test_session_ends_with_1000_and_no_message_when_the_partner_closes(self):
        """
        When one side closes, the server closes the other with 1000, sending
        no message first, and both uids are free at once.
        """
        for closer_is_caller in (True, False):
            caller, callee = await self.server.session("caller", "callee")
            closer, other = (caller, callee) if closer_is_caller else (callee, caller)
            closer.close()
            await closer.closed()
            # The partner's uid is free even before its close handshake ends.
            fresh = await self.server.hello(other.name)
            await self.assert_closed_by_partner(other)
            fresh.close()
            await fresh.closed()
            await self.server.wait_for_connections(0)

    async def test_session_ends_with_1000_when_the_partner_drops_without_close_frame(self):
        """A partner that drops TCP without a close frame ends the session like a close."""
        caller, callee = await self.server.session("caller", "callee")
        caller.abort()
        await self.assert_closed_by_partner(callee)
        await self.server.wait_for_connections(0)
        await self.server.session("caller", "callee")

    # Rooms.

    async def test_joining_a_new_room_is_answered_with_room_ok_and_one_space(self):
        """The first member of a room gets the 8 characters ``ROOM_OK `` (PROTOCOL.md, Rooms)."""
        alice = await self.server.hello("alice")
        alice.send_text("ROOM r")
        reply = await alice.next()
        self.assertEqual(reply, "ROOM_OK ")
        self.assertEqual(len(reply), 8)

    async def test_room_ok_lists_the_members_already_there_in_join_order_never_yourself(self):
        """``ROOM_OK`` names every earlier member, in join order, and never the joiner."""
        await self.server.room("r", "m1", "m2", "m3")
        late = await self.server.hello("late")
        late.send_text("ROOM r")
        await late.expect("ROOM_OK m1 m2 m3")

    async def test_members_hear_of_a_join_after_the_joiner_got_room_ok(self):
        """
        The joiner's ``ROOM_OK`` comes before the others' ``ROOM_PEER_JOINED``:
        a member answering the notice at once reaches a joiner who already
        has its ``ROOM_OK``.
        """
        (first,) = await self.server.room("r", "first")
        joiner = await self.server.hello("joiner")
        joiner.send_text("ROOM r")
        await first.expect("ROOM_PEER_JOINED joiner")
        first.send_text("ROOM_PEER_MSG joiner welcome")
        await joiner.expect("ROOM_OK first", "ROOM_PEER_MSG first welcome")

    async def test_room_peer_msg_is_relayed_with_the_payload_kept_byte_for_byte(self):
        """
        ``ROOM_PEER_MSG <uid> <payload>`` reaches ``<uid>`` as
        ``ROOM_PEER_MSG <sender> <payload>`` with the payload exactly as sent
        (repeated spaces, tabs, trailing whitespace, Unicode, control
        characters); the sender is answered nothing.
        """
        a, b = await self.server.room("r", "a", "b")
        payloads = [
            json.dumps({"ice": {"candidate": "candidate:1 1 UDP 2122 127.0.0.1 5000 typ host",
                                "sdpMLineIndex": 0}}),
            "two  spaces\tand\ttabs",
            "trailing whitespace \t ",
            "\u00fcn\u00efc\u00f6d\u00e9 \u2603 \U0001f389",
            "ctrl \x00\x01\x1b\x7f",
            "ROOM_PEER_MSG a nested",
            "x",
        ]
        for payload in payloads:
            a.send_text("ROOM_PEER_MSG b " + payload)
        await b.expect(*["ROOM_PEER_MSG a " + payload for payload in payloads])
        await self.assert_in_room(a, "b")

    async def test_room_peer_msg_arguments_may_be_separated_by_any_whitespace(self):
        """Tabs, repeated spaces and no-break spaces separate the command, uid and payload."""
        a, b = await self.server.room("r", "a", "b")
        a.send_text("ROOM_PEER_MSG\tb \u00a0 hello  there ")
        await b.expect("ROOM_PEER_MSG a hello  there ")

    async def test_room_accepts_tabs_and_repeated_spaces_before_the_room_id(self):
        """``ROOM`` and the room id may be separated by any run of whitespace."""
        (first,) = await self.server.room("r", "first")
        second = await self.server.hello("second")
        second.send_text("ROOM\t \u00a0r")
        await second.expect("ROOM_OK first")
        await first.expect("ROOM_PEER_JOINED second")

    async def test_room_peer_list_names_the_other_members_in_join_order(self):
        """
        ``ROOM_PEER_LIST`` lists the others in join order; alone, it is
        ``ROOM_PEER_LIST `` with one space.
        """
        (a,) = await self.server.room("r", "a")
        a.send_text("ROOM_PEER_LIST")
        await a.expect("ROOM_PEER_LIST ")
        b = await self.server.hello("b")
        c = await self.server.hello("c")
        b.send_text("ROOM r")
        await b.expect("ROOM_OK a")
        c.send_text("ROOM r")
        await c.expect("ROOM_OK a b")
        await a.expect("ROOM_PEER_JOINED b", "ROOM_PEER_JOINED c")
        await b.expect("ROOM_PEER_JOINED c")
        await self.assert_in_room(a, "b", "c")
        await self.assert_in_room(b, "a", "c")
        await self.assert_in_room(c, "a", "b")

    async def test_room_peer_msg_to_an_unknown_uid_is_answered_not_found(self):
        """
        ``ROOM_PEER_MSG`` to a uid nobody holds is ``ERROR peer '<uid>' not
        found``; nothing changes.
        """
        a, b = await self.server.room("r", "a", "b")
        a.send_text("ROOM_PEER_MSG nobody hi")
        await a.expect("ERROR peer 'nobody' not found")
        await self.assert_in_room(a, "b")
        await self.assert_in_room(b, "a")

    async def test_room_peer_msg_to_a_peer_outside_the_room_is_answered_not_in_the_room(self):
        """
        A registered peer that is in no room, in another room or in a session
        is ``ERROR peer '<uid>' is not in the room``.
        """
        (a,) = await self.server.room("r", "a")
        idle = await self.server.hello("idle")
        (elsewhere,) = await self.server.room("other", "elsewhere")
        caller, callee = await self.server.session("caller", "callee")
        for uid in ["idle", "elsewhere", "caller", "callee"]:
            a.send_text(f"ROOM_PEER_MSG {uid} hi")
            await a.expect(f"ERROR peer '{uid}' is not in the room")
        await self.assert_in_room(a)
        await self.assert_registered_and_idle(idle)
        await self.assert_in_room(elsewhere)
        await self.assert_session_works(caller, callee)

    async def test_room_peer_msg_without_a_payload_is_an_error(self):
        """
        ``ROOM_PEER_MSG`` without a uid or without a payload is an
        ``ERROR``; the peer stays in the room.
        """
        a, b = await self.server.room("r", "a", "b")
        for text in ["ROOM_PEER_MSG", "ROOM_PEER_MSG ", "ROOM_PEER_MSG b", "ROOM_PEER_MSG b \t "]:
            a.send_text(text)
            message = await a.next()
            self.assertTrue(message.startswith("ERROR "), (text, message))
        await self.assert_in_room(a, "b")
        await self.assert_in_room(b, "a")

    async def test_invalid_room_id_is_refused(self):
        """
        A room id that is empty, holds whitespace or control characters, is
        longer than 256 characters or is ``session`` gets
        ``ERROR invalid room id '<room_id>'``; the peer stays registered.
        """
        alice = await self.server.hello("alice")
        long_id = "r" * 257
        for text, room_id in [
            ("ROOM session", "session"),
            ("ROOM", ""),
            ("ROOM ", ""),
            ("ROOM a b", "a b"),
            ("ROOM a\u00a0b", "a\u00a0b"),
            ("ROOM r ", "r "),
            ("ROOM " + long_id, long_id),
        ]:
            alice.send_text(text)
            await alice.expect(f"ERROR invalid room id '{room_id}'")
        # The echo of a control character may be escaped; the prefix is fixed.
        for text in ["ROOM a\tb", "ROOM a\x01", "ROOM \x7f"]:
            alice.send_text(text)
            message = await alice.next()
            self.assertTrue(message.startswith("ERROR invalid room id '"), (text, message))
        await self.assert_registered_and_idle(alice)
        alice.send_text("ROOM " + "r" * 256)
        await alice.expect("ROOM_OK ")

    async def test_any_other_message_in_a_room_is_answered_already_in_room(self):
        """
        In a room, a message other than ROOM_PEER_MSG or ROOM_PEER_LIST is
        ``ERROR invalid msg, already in room``.
        """
        a, b = await self.server.room("r", "a", "b")
        for text in ["SESSION b", "ROOM other", "ROOM r", "HELLO a", "FOO", "OFFER_REQUEST",
                     "ROOM_PEER_MSGb hi", "room_peer_list"]:
            a.send_text(text)
            await a.expect("ERROR invalid msg, already in room")
        for text in ["", " "]:
            a.send_text(text)
            message = await a.next()
            self.assertTrue(message.startswith("ERROR "), (text, message))
        a.send_bytes(b"binary")
        message = await a.next()
        self.assertTrue(message.startswith("ERROR "), message)
        await self.assert_in_room(a, "b")
        await self.assert_in_room(b, "a")

    async def test_room_commands_outside_a_room_are_answered_not_in_a_room(self):
        """
        ``ROOM_PEER_MSG`` and ``ROOM_PEER_LIST`` from a peer in no room are
        ``ERROR not in a room``.
        """
        alice = await self.server.hello("alice")
        await self.server.hello("bob")
        alice.send_text("ROOM_PEER_LIST")
        await alice.expect("ERROR not in a room")
        alice.send_text("ROOM_PEER_MSG bob hi")
        await alice.expect("ERROR not in a room")
        alice.send_text("SESSION bob")
        await alice.expect("SESSION_OK")

    async def test_remaining_members_are_told_when_a_member_closes(self):
        """
        Every remaining member gets ``ROOM_PEER_LEFT <uid>`` when a member's
        connection closes.
        """
        a, b, c = await self.server.room("r", "a", "b", "c")
        b.close()
        await b.closed()
        await a.expect("ROOM_PEER_LEFT b")
        await c.expect("ROOM_PEER_LEFT b")
        await self.assert_in_room(a, "c")
        await self.assert_in_room(c, "a")

    async def test_members_see_every_join_and_leave_exactly_once(self):
        """
        Each member sees the JOINED of every later joiner and the LEFT of
        every earlier leaver exactly once, and never a LEFT for a peer it
        never saw (PROTOCOL.md, Rooms).
        """
        server = self.server
        a, b, c = await server.room("r", "a", "b", "c")
        b.close()
        await a.expect("ROOM_PEER_LEFT b")
        await c.expect("ROOM_PEER_LEFT b")
        d = await server.hello("d")
        d.send_text("ROOM r")
        await d.expect("ROOM_OK a c")
        await a.expect("ROOM_PEER_JOINED d")
        await c.expect("ROOM_PEER_JOINED d")
        a.abort()
        await c.expect("ROOM_PEER_LEFT a")
        await d.expect("ROOM_PEER_LEFT a")
        e = await server.hello("e")
        e.send_text("ROOM r")
        await e.expect("ROOM_OK c d")
        await c.expect("ROOM_PEER_JOINED e")
        await d.expect("ROOM_PEER_JOINED e")
        await self.assert_in_room(c, "d", "e")
        await self.assert_in_room(d, "c", "e")
        await self.assert_in_room(e, "c", "d")
        self.assertEqual(
            a.messages,
            ["HELLO", "ROOM_OK ", "ROOM_PEER_JOINED b", "ROOM_PEER_JOINED c",
             "ROOM_PEER_LEFT b", "ROOM_PEER_JOINED d"],
        )
        self.assertEqual(
            c.messages,
            ["HELLO", "ROOM_OK a b", "ROOM_PEER_LEFT b", "ROOM_PEER_JOINED d",
             "ROOM_PEER_LEFT a", "ROOM_PEER_JOINED e", "ROOM_PEER_LIST d e"],
        )
        self.assertEqual(
            d.messages,
            ["HELLO", "ROOM_OK a c", "ROOM_PEER_LEFT a", "ROOM_PEER_JOINED e",
             "ROOM_PEER_LIST c e"],
        )
        self.assertEqual(e.messages, ["HELLO", "ROOM_OK c d", "ROOM_PEER_LIST c d"])

    async def test_room_is_forgotten_when_its_last_member_leaves(self):
        """Once its last member is gone, joining the room id again starts a new, empty room."""
        a, b = await self.server.room("r", "a", "b")
        a.close()
        b.abort()
        await self.server.wait_for_connections(0)
        fresh = await self.server.hello("fresh")
        fresh.send_text("ROOM r")
        await fresh.expect("ROOM_OK ")

    async def test_rooms_are_separate(self):
        """Members of different rooms neither see nor reach each other."""
        (a,) = await self.server.room("one", "a")
        (b,) = await self.server.room("two", "b")
        a.send_text("ROOM_PEER_MSG b hi")
        await a.expect("ERROR peer 'b' is not in the room")
        await self.assert_in_room(a)
        await self.assert_in_room(b)

    # Unknown commands and errors.

    async def test_unknown_command_is_an_error_and_the_connection_stays_open(self):
        """
        A registered peer's unknown command is ``ERROR unknown command
        '<first word>'``; commands are case-sensitive whole words.
        """
        alice = await self.server.hello("alice")
        await self.server.hello("bob")
        for text, word in [
            ("FOO", "FOO"),
            ("FOO bar baz", "FOO"),
            ("SESSION_OK bob", "SESSION_OK"),
            ("session bob", "session"),
            ("ROOMS r", "ROOMS"),
            ("room r", "room"),
            ("OFFER_REQUEST", "OFFER_REQUEST"),
            ("\tBAR\t x", "BAR"),
            ("{\"sdp\": 1}", "{\"sdp\":"),
        ]:
            alice.send_text(text)
            await alice.expect(f"ERROR unknown command '{word}'")
        alice.send_text("SESSION bob")
        await alice.expect("SESSION_OK")

    async def test_control_characters_in_commands_are_errors_that_change_nothing(self):
        """
        Control characters inside commands or their arguments get ``ERROR``
        lines, never a crash.
        """
        alice = await self.server.hello("alice")
        await self.server.hello("bob")
        for text in ["SESS\x00ION bob", "\x1b[31m", "SESSION bob\x00", "SESSION \x07", "\x7f"]:
            alice.send_text(text)
            message = await alice.next()
            self.assertTrue(message.startswith("ERROR "), (text, message))
        alice.send_text("SESSION bob")
        await alice.expect("SESSION_OK")

    async def test_empty_or_blank_text_from_a_registered_peer_is_an_error(self):
        """
        An empty or all-whitespace text frame from a registered peer gets an
        ``ERROR``; it stays registered.
        """
        alice = await self.server.hello("alice")
        for text in ["", " ", "\t\r\n", "\u00a0"]:
            alice.send_text(text)
            message = await alice.next()
            self.assertTrue(message.startswith("ERROR "), (text, message))
        await self.assert_registered_and_idle(alice)

    async def test_empty_text_frame_before_hello_is_refused_with_1002(self):
        """An empty first message is not a HELLO: ``ERROR`` and 1002 ``invalid protocol``."""
        client = await self.server.connect()
        client.send_text("")
        await self.assert_refused(client, "invalid protocol")

    async def test_binary_frame_outside_a_session_is_answered_with_an_error(self):
        """
        A registered peer's binary frame is ``ERROR binary messages are only
        relayed inside a session``.
        """
        alice = await self.server.hello("alice")
        for payload in [b"\x00\x01\x02", b"", b"HELLO x"]:
            alice.send_bytes(payload)
            await alice.expect("ERROR binary messages are only relayed inside a session")
        await self.assert_registered_and_idle(alice)

    async def test_binary_frame_before_hello_is_refused_with_1002(self):
        """
        A binary first message, even one reading ``HELLO x``, gets ``ERROR``
        and 1002 ``invalid protocol``.
        """
        client = await self.server.connect()
        client.send_bytes(b"HELLO alice")
        await self.assert_refused(client, "invalid protocol")

    # Invalid UTF-8.

    async def test_invalid_utf8_before_or_after_hello_closes_with_1007(self):
        """
        A text frame that is not valid UTF-8 fails the connection with 1007
        and leaves nothing behind.
        """
        unregistered = await self.server.connect()
        unregistered.send_bytes(INVALID_UTF8, binary=False)
        code, _ = await unregistered.closed()
        self.assertEqual(code, 1007)
        registered = await self.server.hello("alice")
        registered.send_bytes(b"SESSION \xed\xa0\x80", binary=False)  # a UTF-16 surrogate
        code, _ = await registered.closed()
        self.assertEqual(code, 1007)
        self.assertEqual(registered.unread_at_close, [])
        await self.server.hello("alice")

    async def test_invalid_utf8_in_a_session_closes_with_1007_and_the_partner_with_1000(self):
        """
        Invalid UTF-8 from a peer in a session closes it with 1007; the
        partner is closed as for any close.
        """
        caller, callee = await self.server.session("caller", "callee")
        caller.send_bytes(INVALID_UTF8, binary=False)
        code, _ = await caller.closed()
        self.assertEqual(code, 1007)
        await self.assert_closed_by_partner(callee)

    async def test_invalid_utf8_in_a_room_closes_with_1007_and_the_members_are_told(self):
        """
        Invalid UTF-8 from a room member closes it with 1007; the others get
        ``ROOM_PEER_LEFT``.
        """
        a, b, c = await self.server.room("r", "a", "b", "c")
        b.send_bytes(b"ROOM_PEER_MSG a \xc0\xaf", binary=False)  # an overlong encoding
        code, _ = await b.closed()
        self.assertEqual(code, 1007)
        await a.expect("ROOM_PEER_LEFT b")
        await c.expect("ROOM_PEER_LEFT b")
        await self.assert_in_room(a, "c")

    async def test_invalid_utf8_split_across_fragments_closes_with_1007(self):
        """A text message whose UTF-8 is broken across two fragments is refused with 1007."""
        raw = await self.server.raw()
        await raw.upgrade()
        raw.send_frame(1, b"HELLO caf\xc3", fin=False)
        raw.send_frame(0, b"(", fin=True)
        (code, _), frames = await raw.close_frame()
        self.assertEqual(code, 1007)
        self.assertEqual(frames, [])

    # Sizes.

    async def test_message_over_the_limit_closes_with_1009_and_affects_no_one_else(self):
        """
        A message one byte over the limit closes its sender with 1009; peers
        in other sessions and rooms carry on.
        """
        server = await self.start_server(max_message=64 * 1024)
        a, b = await server.session("a", "b")
        m1, m2 = await server.room("r", "m1", "m2")
        big = await server.hello("big")
        big.send_text("x" * (64 * 1024 + 1))
        code, _ = await big.closed()
        self.assertEqual(code, 1009)
        self.assertEqual(big.unread_at_close, [])
        await self.assert_session_works(a, b)
        await self.assert_in_room(m1, "m2")
        await self.assert_in_room(m2, "m1")
        await server.hello("big")

    async def test_message_over_the_limit_in_small_fragments_closes_with_1009(self):
        """
        The limit is on the message, not the frame: fragments that add up to
        more close with 1009.
        """
        server = await self.start_server(max_message=64 * 1024)
        raw = await server.raw()
        await raw.upgrade()
        raw.send_frame(1, b"HELLO raw")
        await raw.next_frames(1)
        raw.send_frame(1, b"x" * (40 * 1024), fin=False)
        raw.send_frame(0, b"x" * (40 * 1024), fin=True)
        (code, _), frames = await raw.close_frame()
        self.assertEqual((code, frames), (1009, [(1, b"HELLO")]))

    async def test_ten_mib_frame_closes_with_1009_under_the_default_limit(self):
        """
        A real 10 MiB frame against the default 1 MiB limit closes its
        sender with 1009 and no one else.
        """
        a, b = await self.server.session("a", "b")
        big = await self.server.hello("big")
        big.send_bytes(b"\x00" * (10 * MiB), binary=True)
        code, _ = await big.closed()
        self.assertEqual(code, 1009)
        await self.assert_session_works(a, b)
        await self.server.hello("big")

    async def test_message_over_the_limit_in_a_session_closes_the_partner_with_1000(self):
        """
        An oversized message in a session closes its sender with 1009 and
        the partner as for any close.
        """
        server = await self.start_server(max_message=4096)
        caller, callee = await server.session("caller", "callee")
        caller.send_bytes(b"x" * 4097)
        code, _ = await caller.closed()
        self.assertEqual(code, 1009)
        await self.assert_closed_by_partner(callee)

    async def test_message_of_exactly_the_limit_is_relayed_intact_in_a_session(self):
        """A message of exactly the default 1 MiB limit is relayed intact, text and binary."""
        caller, callee = await self.server.session("caller", "callee")
        # 16 bytes of UTF-8 per unit, two of them for the one non-ASCII character.
        text = ("0123456789abcd\u00e9" * (MiB // 16)).encode("utf-8")
        self.assertEqual(len(text), MiB)
        binary = bytes(range(256)) * (MiB // 256)
        caller.send_bytes(text, binary=False)
        callee.send_bytes(binary)
        self.assertEqual(await callee.next(), text.decode("utf-8"))
        self.assertEqual(await caller.next(), binary)

    async def test_room_peer_msg_at_the_limit_is_relayed_though_the_relayed_line_is_longer(self):
        """
        A ``ROOM_PEER_MSG`` of exactly the limit is relayed even though the
        line the recipient gets, with a longer sender uid, exceeds the limit
        (PROTOCOL.md, Words, whitespace, sizes).
        """
        sender_uid = "a-rather-long-sender-uid"
        sender, b = await self.server.room("r", sender_uid, "b")
        prefix = "ROOM_PEER_MSG b "
        payload = "p" * (MiB - len(prefix))
        sender.send_text(prefix + payload)
        relayed = await b.next()
        self.assertGreater(len(relayed.encode("utf-8")), MiB)
        self.assertEqual(relayed, f"ROOM_PEER_MSG {sender_uid} {payload}")
        await self.assert_in_room(sender, "b")

    # Floods.

    async def test_thousand_rapid_messages_are_relayed_in_order_in_a_session(self):
        """
        1,000 messages sent back to back, from both sides at once, arrive
        complete and in order.
        """
        caller, callee = await self.server.session("caller", "callee")
        forth = [f"forth {i}" if i % 3 else f"forth {i}".encode() for i in range(1000)]
        back = [f"back {i}" for i in range(1000)]
        for there, here in zip(forth, back):
            if isinstance(there, bytes):
                caller.send_bytes(there)
            else:
                caller.send_text(there)
            callee.send_text(here)
        self.assertEqual(await callee.take(1000), forth)
        self.assertEqual(await caller.take(1000), back)
        await self.assert_session_works(caller, callee)

    async def test_thousand_rapid_commands_are_each_answered_in_order(self):
        """1,000 commands sent back to back each get their own answer, in order."""
        alice = await self.server.hello("alice")
        expected = []
        for i in range(1000):
            if i % 2:
                alice.send_text(f"SESSION nobody-{i}")
                expected.append(f"ERROR peer 'nobody-{i}' not found")
            else:
                alice.send_text(f"CMD{i} x")
                expected.append(f"ERROR unknown command 'CMD{i}'")
        self.assertEqual(await alice.take(1000), expected)
        await self.assert_registered_and_idle(alice)

    async def test_thousand_rapid_room_messages_and_lists_are_handled_in_order(self):
        """1,000 room messages and lists sent back to back are relayed and answered in order."""
        a, b = await self.server.room("r", "a", "b")
        for i in range(1000):
            a.send_text(f"ROOM_PEER_MSG b {i}")
            a.send_text("ROOM_PEER_LIST")
        self.assertEqual(await b.take(1000), [f"ROOM_PEER_MSG a {i}" for i in range(1000)])
        self.assertEqual(await a.take(1000), ["ROOM_PEER_LIST b"] * 1000)

    async def test_many_connections_registering_and_dropping_at_once_leave_nothing_behind(self):
        """
        50 connections HELLO at once, two per uid: one of each pair is
        registered; dropping them all leaves no connection or state behind.
        """
        # Pinned to the examples' protocol: connecting 50 clients one by
        # one can take longer than --dialect-wait on a loaded machine, and
        # the first ones would be welcomed as JSON clients meanwhile.
        server = await self.start_server(dialect="examples")
        clients = [await server.connect() for _ in range(50)]
        for index, client in enumerate(clients):
            client.send_text(f"HELLO storm-{index % 25}")
        answers = [await client.next() for client in clients]
        self.assertEqual(answers.count("HELLO"), 25, [a for a in answers if a != "HELLO"])
        for client in clients:
            client.abort()
        await server.wait_for_connections(0)
        self.assertTrue(server.registry.is_empty())

    # Fragmented input from a raw client.

    async def test_fragmented_message_is_reassembled_and_relayed_as_one(self):
        """
        A message sent in fragments, with a ping between them, is handled
        and relayed as one message.
        """
        callee = await self.server.hello("callee")
        raw = await self.server.raw()
        await raw.upgrade()
        raw.send_frame(1, b"HEL", fin=False)
        raw.send_frame(9, b"are you there")
        raw.send_frame(0, b"LO ra", fin=False)
        raw.send_frame(0, b"w", fin=True)
        self.assertEqual(await raw.next_frames(2), [(10, b"are you there"), (1, b"HELLO")])
        raw.send_frame(1, b"SESSION callee")
        self.assertEqual((await raw.next_frames(3))[2], (1, b"SESSION_OK"))
        raw.send_frame(1, b"{\"sdp\": ", fin=False)
        raw.send_frame(0, "\u00e9\u2603}".encode("utf-8"), fin=True)
        await callee.expect("{\"sdp\": \u00e9\u2603}")
        raw.abort()
        await self.assert_closed_by_partner(callee)

    async def test_unmasked_client_frame_fails_the_connection_and_ends_the_session(self):
        """
        A protocol violation (an unmasked client frame) fails the
        connection; its partner is closed.
        """
        callee = await self.server.hello("callee")
        raw = await self.server.raw()
        await raw.upgrade()
        raw.send_frame(1, b"HELLO raw")
        raw.send_frame(1, b"SESSION callee")
        await raw.next_frames(2)
        raw.send_frame(1, b"not masked", mask=False)
        (code, _), _ = await raw.close_frame()
        self.assertEqual(code, 1002)
        raw.send_frame(8, struct.pack("!H", 1000))
        await raw.response()
        await self.assert_closed_by_partner(callee)

    async def test_a_message_in_too_many_fragments_is_refused_with_1009(self):
        """
        A message may come in up to ``--max-fragments`` fragments (relayed
        whole); one more closes the connection with 1009, the partner as
        for any close.
        """
        server = await self.start_server(max_fragments=8)
        callee = await server.hello("callee")
        raw = await server.raw()
        await raw.hello("frag")
        raw.send_frame(1, b"SESSION callee")
        await raw.next_frames(2)
        for i in range(7):
            raw.send_frame(1 if i == 0 else 0, b"ab", fin=False)
        raw.send_frame(0, b"!", fin=True)
        await callee.expect("ab" * 7 + "!")
        for i in range(9):
            raw.send_frame(1 if i == 0 else 0, b"x", fin=i == 8)
        (code, reason), _ = await raw.close_frame()
        self.assertEqual((code, reason), (1009, "message in more than 8 fragments"))
        await self.assert_closed_by_partner(callee)

    async def test_commands_past_the_rate_are_refused_and_a_flood_is_closed_with_1008(self):
        """
        With a burst of 10 commands and 1 a second: the eleventh at once is
        answered ERROR rate limit exceeded, and a client that goes on is
        closed with 1008; an unrelated peer is served all along.
        """
        server = await self.start_server(command_rate=1, command_burst=10)
        bystander = await server.hello("bystander")
        flooder = await server.hello("flooder")
        for _ in range(9):
            flooder.send_text("PROBE")
        flooder.send_text("PROBE")
        replies = await flooder.take(10)
        self.assertEqual(replies[:9], ["ERROR unknown command 'PROBE'"] * 9)
        self.assertEqual(replies[9], "ERROR rate limit exceeded")
        for _ in range(60):
            flooder.send_text("PROBE")
        code, reason = await flooder.closed()
        self.assertEqual((code, reason), (1008, "rate limit exceeded"))
        await self.assert_registered_and_idle(bystander)

    async def test_an_invalid_close_frame_is_answered_with_a_close_frame_naming_the_fault(self):
        """
        RFC 6455 7.1.7 and 7.4.1: a close frame with a 1-byte payload or a
        code no endpoint may send (999, 1005, 5000) is answered with 1002; a
        reason that is not UTF-8 with 1007. The connection is not just dropped.
        """
        cases = [
            (b"\x03", 1002),
            (struct.pack("!H", 999), 1002),
            (struct.pack("!H", 1005), 1002),
            (struct.pack("!H", 1006), 1002),
            (struct.pack("!H", 5000), 1002),
            (struct.pack("!H", 1000) + b"\xff\xfe", 1007),
        ]
        for payload, code in cases:
            raw = await self.server.raw()
            await raw.upgrade()
            raw.send_frame(1, b"HELLO closer")
            raw.send_frame(8, payload)
            (got, _), frames = await raw.close_frame()
            self.assertEqual((payload, got), (payload, code))
            self.assertIn(frames, self.answers_before_close)
            await raw.dropped()
            await self.server.wait_for_connections(0)
        self.assertTrue(self.server.registry.is_empty())

    async def test_frames_with_no_payload_are_handled_when_every_turn_ends_after_one_step(self):
        """
        A frame with no payload whose header was read as a turn's time ran
        out is complete with no more data: the next turn handles it (it
        waited for more input that might never come).
        """
        self.patch(websocket, "TURN_SECONDS", -1.0)
        raw = await self.server.raw()
        await raw.hello("empty")
        # Read alone: nothing follows it.
        raw.send_frame(9, b"")
        self.assertEqual(await raw.next_frames(2), [(1, b"HELLO"), (10, b"")])
        raw.send_frame(1, b"")
        raw.send_frame(8, b"")
        (got, _), frames = await raw.close_frame()
        self.assertEqual(got, 1000)
        await raw.dropped()
        await self.server.wait_for_connections(0)
        self.assertTrue(self.server.registry.is_empty())

    # A failed connection lets go at once, and its transport in bounded time.

    async def closing_server(self, **factory_kwargs):
        """:returns: a server whose closing connections are aborted after ``CLOSE_TIMEOUT``."""
        return await self.start_server(close_timeout=CLOSE_TIMEOUT, **factory_kwargs)

    async def assert_dropped_in_time(self, stubborn, code):
        """
        ``stubborn`` got a close frame with ``code`` and, though it answers
        neither the close frame nor TLS's ``close_notify``, the server drops
        its connection within the close timeout.
        """
        (got, _), _ = await stubborn.close_frame()
        self.assertEqual(got, code)
        await stubborn.dropped(timeout=CLOSE_TIMEOUT + 1.5)

    async def assert_told_at_once(self, client, message):
        """``client``'s next message is ``message``, within ``RELEASED_AT_ONCE``."""
        self.assertEqual(await client.take(1, timeout=RELEASED_AT_ONCE), [message])

    async def stubborn_in_session(self, server, callee_uid="partner"):
        """:returns: ``(stubborn, partner)``: a stubborn caller in a session with a client."""
        partner = await server.hello(callee_uid)
        stubborn = await server.stubborn()
        await stubborn.hello("stubborn")
        stubborn.send_frame(1, f"SESSION {callee_uid}".encode("utf-8"))
        self.assertEqual(await stubborn.next_frames(2), [(1, b"HELLO"), (1, b"SESSION_OK")])
        return stubborn, partner

    async def stubborn_in_room(self, server):
        """:returns: ``(stubborn, [a, b])``: a stubborn member of room ``r`` with two clients."""
        a, b = await server.room("r", "a", "b")
        stubborn = await server.stubborn()
        await stubborn.hello("stubborn")
        stubborn.send_frame(1, b"ROOM r")
        self.assertEqual(await stubborn.next_frames(2), [(1, b"HELLO"), (1, b"ROOM_OK a b")])
        await a.expect("ROOM_PEER_JOINED stubborn")
        await b.expect("ROOM_PEER_JOINED stubborn")
        return stubborn, [a, b]

    async def test_invalid_utf8_releases_the_partner_at_once_and_drops_a_silent_peer(self):
        """
        1007: a peer in a session that sends invalid UTF-8 and then answers
        nothing (no close frame, no TLS close_notify) has its partner closed
        at once, and its own connection dropped within the close timeout.
        """
        server = await self.closing_server()
        stubborn, partner = await self.stubborn_in_session(server)
        stubborn.send_frame(1, b"caf\xc3\x28")
        code, _ = await partner.closed(timeout=RELEASED_AT_ONCE)
        self.assertEqual(code, 1000)
        await self.assert_dropped_in_time(stubborn, 1007)

    async def test_message_too_big_tells_the_room_at_once_and_drops_a_silent_peer(self):
        """1009: the room hears ``ROOM_PEER_LEFT`` at once; the sender is dropped in time."""
        server = await self.closing_server(max_message=64)
        stubborn, (a, b) = await self.stubborn_in_room(server)
        stubborn.send_frame(1, b"ROOM_PEER_MSG a " + b"x" * 100)
        await self.assert_told_at_once(a, "ROOM_PEER_LEFT stubborn")
        await self.assert_told_at_once(b, "ROOM_PEER_LEFT stubborn")
        await self.assert_dropped_in_time(stubborn, 1009)
        await self.assert_in_room(a, "b")

    async def test_protocol_violation_releases_the_partner_at_once_and_drops_a_silent_peer(self):
        """1002 (an unmasked frame): the partner is closed at once; the violator dropped in time."""
        server = await self.closing_server()
        stubborn, partner = await self.stubborn_in_session(server)
        stubborn.send_frame(1, b"not masked", mask=False)
        code, _ = await partner.closed(timeout=RELEASED_AT_ONCE)
        self.assertEqual(code, 1000)
        await self.assert_dropped_in_time(stubborn, 1002)

    async def test_refused_hello_drops_a_silent_peer_in_time(self):
        """1002 (an invalid uid): a refused peer that never answers is dropped in time."""
        server = await self.closing_server()
        stubborn = await server.stubborn()
        await stubborn.upgrade()
        stubborn.send_frame(1, b"HELLO bad\x01uid")
        await self.assert_dropped_in_time(stubborn, 1002)
        self.assertEqual(server.factory.getConnectionCount(), 0)

    async def test_hello_timeout_drops_a_silent_peer_in_time(self):
        """1008 (no HELLO in time): a peer that never answers is dropped in time."""
        server = await self.closing_server(hello_timeout=0.5, dialect="examples")
        stubborn = await server.stubborn()
        await stubborn.upgrade()
        await self.assert_dropped_in_time(stubborn, 1008)
        self.assertEqual(server.factory.getConnectionCount(), 0)

    async def test_session_ended_by_the_partner_frees_the_uid_of_a_silent_peer_at_once(self):
        """
        1000: when its partner leaves, a silent peer's uid is free at once
        (another client registers it while the silent one is still being
        closed), and the silent peer is dropped in time.
        """
        server = await self.closing_server()
        caller = await server.hello("caller")
        stubborn = await server.stubborn()
        await stubborn.hello("stubborn")
        caller.send_text("SESSION stubborn")
        await caller.expect("SESSION_OK")
        caller.close()
        await caller.closed(timeout=RELEASED_AT_ONCE)
        again = await server.hello("stubborn")
        await self.assert_registered_and_idle(again)
        await self.assert_dropped_in_time(stubborn, 1000)

    async def test_shutdown_closes_with_1001_and_drops_a_silent_peer_in_time(self):
        """
        1001 (shutdown): every peer gets 1001, the partner of a silent peer
        included (never a 1000 for a partner that "left"), and the silent
        peer is dropped in time.
        """
        server = await self.closing_server()
        stubborn, partner = await self.stubborn_in_session(server)
        server.factory.close_all()
        code, _ = await partner.closed(timeout=RELEASED_AT_ONCE)
        self.assertEqual(code, 1001)
        await self.assert_dropped_in_time(stubborn, 1001)

    async def test_internal_error_tells_the_room_at_once_and_drops_a_silent_peer(self):
        """1011 (an unexpected error): the room is told at once; the peer dropped in time."""
        server = await self.closing_server()
        stubborn, (a, b) = await self.stubborn_in_room(server)

        def broken(uid):
            raise RuntimeError("a broken registry")

        server.registry.room_members = broken
        stubborn.send_frame(1, b"ROOM_PEER_LIST")
        await self.assert_told_at_once(a, "ROOM_PEER_LEFT stubborn")
        await self.assert_told_at_once(b, "ROOM_PEER_LEFT stubborn")
        await self.assert_dropped_in_time(stubborn, 1011)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    # Drops without a close frame, in every state.

    async def test_drop_before_the_websocket_handshake_leaves_nothing_behind(self):
        """
        A TCP (or TLS) connection dropped during the HTTP upgrade leaves no
        connection or state.
        """
        raw = await self.server.raw()
        raw.transport.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n")
        raw.abort()
        idle = await self.server.raw()
        idle.abort()
        await self.server.wait_for_connections(0)
        await self.server.hello("after")

    async def test_drop_before_hello_leaves_nothing_behind(self):
        """An open WebSocket dropped before HELLO leaves no connection or state."""
        client = await self.server.connect()
        client.abort()
        await self.server.wait_for_connections(0)
        self.assertTrue(self.server.registry.is_empty())

    async def test_drop_while_registered_frees_the_uid(self):
        """A registered peer that drops is forgotten: its uid is free and callers get not found."""
        alice = await self.server.hello("alice")
        caller = await self.server.hello("caller")
        alice.abort()
        await self.server.wait_for_connections(1)
        caller.send_text("SESSION alice")
        await caller.expect("ERROR peer 'alice' not found")

    async def test_drop_in_a_room_tells_the_remaining_members(self):
        """
        A room member that drops is reported with ``ROOM_PEER_LEFT`` to
        every remaining member.
        """
        a, b, c = await self.server.room("r", "a", "b", "c")
        a.abort()
        await b.expect("ROOM_PEER_LEFT a")
        await c.expect("ROOM_PEER_LEFT a")
        await self.assert_in_room(b, "c")

    async def test_drop_half_way_through_a_frame_leaves_nothing_behind(self):
        """A connection dropped in the middle of a frame is cleaned up like any other."""
        (member,) = await self.server.room("r", "member")
        raw = await self.server.raw()
        await raw.upgrade()
        raw.send_frame(1, b"HELLO raw")
        raw.send_frame(1, b"ROOM r")
        await raw.next_frames(2)
        await member.expect("ROOM_PEER_JOINED raw")
        raw.transport.write(b"\x81\xfe\x10\x00" + b"\x01\x02\x03\x04" + b"partial")
        raw.abort()
        await member.expect("ROOM_PEER_LEFT raw")
        await self.server.hello("raw")

    async def test_every_ended_connection_is_freed_without_the_garbage_collector(self):
        """
        However a connection ends (the peer closes, drops, is closed with its
        session partner, is refused, or the server fails it), reference
        counting alone frees it and its transport once it is gone: nothing
        is left for the cyclic garbage collector, which may not run for a
        long time. Otherwise thousands of closed connections stay in memory
        after a peak, and the allocator cannot give their memory back.
        """
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        caller, callee = await self.server.session("caller", "callee")
        a, b, c = await self.server.room("r", "a", "b", "c")
        lone = await self.server.hello("lone")
        unregistered = await self.server.connect()
        raw = await self.server.raw()
        await raw.upgrade()
        await self.server.wait_for_connections(8)
        watched = []
        for protocol in self.server.factory.connections:
            transport = protocol.transport
            watched += [weakref.ref(protocol), weakref.ref(transport)]
            if self.tls:
                watched.append(weakref.ref(transport.transport))
        self.assertEqual(len(watched), 8 * (3 if self.tls else 2))
        caller.close()  # and the server closes callee with 1000
        a.close()
        b.abort()
        lone.send_text("HELLO again")  # an error; the connection stays open
        self.assertTrue((await lone.next()).startswith("ERROR "))
        lone.send_bytes(b"\xff", binary=False)  # invalid UTF-8: 1007
        unregistered.send_text("SESSION x")  # refused with 1002
        raw.send_frame(1, b"HELLO raw")
        await raw.next_frames(1)
        raw.send_frame(1, b"x" * 10, mask=False)  # a protocol violation
        self.assertEqual(
            sorted(await c.take(2)), ["ROOM_PEER_LEFT a", "ROOM_PEER_LEFT b"]
        )
        c.close()
        await self.server.wait_for_connections(0)
        del protocol, transport
        await eventually(
            lambda: all(ref() is None for ref in watched),
            lambda: "every connection freed; left: "
            + ", ".join(type(ref()).__name__ for ref in watched if ref() is not None),
        )
        self.assertTrue(self.server.registry.is_empty())

    async def test_a_silent_holder_is_replaced_by_a_new_hello_for_its_uid(self):
        """
        A peer whose network died (it answers nothing, not even pings) holds
        its uid: a new HELLO for the uid pings it, and once the reclaim
        timeout passes without a pong, takes the uid over; its session
        partner is closed with 1000 as for any close.
        """
        change_settings(self.server.factory, reclaim_timeout=0.5)
        partner = await self.server.hello("partner")
        dead = await self.server.raw()
        await dead.upgrade()
        dead.send_frame(1, b"HELLO dead")
        await dead.next_frames(1)
        dead.send_frame(1, b"SESSION partner")
        await dead.next_frames(2)
        dead.transport.pauseProducing()  # hears nothing, answers nothing
        started = reactor.seconds()
        newcomer = await self.server.connect()
        newcomer.send_text("HELLO dead")
        await newcomer.expect("HELLO")
        self.assertGreaterEqual(reactor.seconds() - started, 0.4)
        self.assertEqual((await partner.closed())[0], 1000)
        dead.abort()

    async def test_a_holder_held_back_by_its_partner_keeps_its_uid(self):
        """
        A peer whose session partner stopped reading is held back (the
        server no longer reads its input), yet it is alive and answers
        pings: a new HELLO for its uid pings it, the pong waits unread
        behind what it sent, and the HELLO is refused as taken
        (docs/protocol.md, Registration). A silent holder is still
        replaced (the test above).
        """
        change_settings(self.server.factory, reclaim_timeout=0.5)
        nodes = getattr(self.server, "nodes", [self.server])
        # Backpressure holds a partner back within one process; in a
        # cluster the newcomer is on another, and probes through Redis.
        holder, partner = await nodes[0].session("holder", "partner")
        partner.transport.pauseProducing()
        await self.send_until_held_back(holder, "holder")
        newcomer = await nodes[-1].connect()
        newcomer.send_text("HELLO holder")
        self.assertEqual(await newcomer.next(), "ERROR peer uid 'holder' is already taken")
        self.assertEqual(await newcomer.closed(), (1002, "invalid peer uid"))
        await holder.wait_pings(1)
        self.assertTrue(holder.is_live)
        self.assertEqual(self.server_side("holder").read_pauses, frozenset({"partner"}))
        partner.transport.resumeProducing()

    def server_side(self, uid):
        """:returns: the server's protocol of the connection registered as ``uid``."""
        for protocol in self.server.factory.connections:
            if protocol.connection is not None and protocol.connection.uid == uid:
                return protocol
        self.fail(f"no connection registered as {uid!r}")

    async def send_until_held_back(self, client, uid, chunk=64 * 1024, most=64 * MiB):
        """
        Send binary messages from ``client`` (registered as ``uid``), as
        fast as its transport takes them, until the server holds its input
        back because its partner does not read, and the client can send no
        more (every buffer on the way is full: the server's pause is no
        longer one that the kernel's growing socket buffers lift again).
        """
        gate = _Gate()
        client.transport.registerProducer(gate, True)
        protocol = self.server_side(uid)
        payload = b"x" * chunk
        pushed = 0
        try:
            while not (gate.paused and "partner" in protocol.read_pauses):
                self.assertLess(pushed, most, "the server never held the sender back")
                if gate.paused:
                    await pause(0.01)
                else:
                    client.send_bytes(payload)
                    pushed += chunk
                    await pause(0)
        finally:
            client.transport.unregisterProducer()

    # Races, as real concurrent sends.

    async def test_peers_calling_each_other_at_once_end_in_exactly_one_session(self):
        """
        A calls B while B calls A: the first SESSION handled wins and its
        caller alone gets ``SESSION_OK``; the other SESSION then arrives from
        a peer already in the session, so it is relayed verbatim to the
        winner (PROTOCOL.md, 1-1 sessions), never answered.
        """
        a = await self.server.hello("a")
        b = await self.server.hello("b")
        a.send_text("SESSION b")
        b.send_text("SESSION a")
        await eventually(lambda: a.unread() or b.unread(), "an answer to either SESSION")
        first = (a.unread() or b.unread())[0]
        self.assertEqual(first, "SESSION_OK")
        winner, loser = (a, b) if a.unread() else (b, a)
        await winner.expect("SESSION_OK", f"SESSION {winner.name}")
        await self.assert_session_works(winner, loser)
        self.assertEqual(self.server.registry.session_count, 1)

    async def test_callee_dropping_while_a_session_request_is_in_flight(self):
        """
        A callee that drops while the caller's SESSION is in flight: either
        the caller gets ``ERROR peer '<uid>' not found`` and stays registered,
        or it gets ``SESSION_OK`` and is then closed with 1000, nothing else.
        """
        for attempt in range(5):
            callee = await self.server.hello("callee")
            caller = await self.server.hello("caller")
            caller.send_text("SESSION callee")
            callee.abort()
            answer = await caller.next()
            if answer == "SESSION_OK":
                await self.assert_closed_by_partner(caller)
            else:
                self.assertEqual(answer, "ERROR peer 'callee' not found")
                await self.assert_registered_and_idle(caller)
                caller.close()
            await self.server.wait_for_connections(0)
            self.assertTrue(self.server.registry.is_empty(), attempt)

    async def test_two_hellos_with_the_same_uid_at_once_register_exactly_one(self):
        """
        Two connections that HELLO with one uid at the same moment: one gets
        ``HELLO``, the other is refused.
        """
        for attempt in range(5):
            first = await self.server.connect()
            second = await self.server.connect()
            first.send_text("HELLO twin")
            second.send_text("HELLO twin")
            answers = [await first.next(), await second.next()]
            self.assertEqual(answers.count("HELLO"), 1, answers)
            winner, loser = (first, second) if answers[0] == "HELLO" else (second, first)
            code, reason = await loser.closed()
            self.assertEqual((code, reason), (1002, "invalid peer uid"))
            self.assertTrue([m for m in loser.messages if m.startswith("ERROR ")])
            await self.assert_registered_and_idle(winner)
            winner.close()
            await self.server.wait_for_connections(0)
            self.assertTrue(self.server.registry.is_empty(), attempt)

    async def test_member_leaving_while_another_joins(self):
        """
        B leaves while C joins: whichever happens first, C sees B's LEFT
        exactly when its ``ROOM_OK`` named B, and A sees C's JOINED and B's
        LEFT once each.
        """
        for attempt in range(5):
            room_id = f"r{attempt}"
            a, b = await self.server.room(room_id, "a", "b")
            c = await self.server.hello("c")
            c.send_text(f"ROOM {room_id}")
            b.abort()
            room_ok = await c.next()
            if room_ok == "ROOM_OK a b":
                await c.expect("ROOM_PEER_LEFT b")
                await a.expect("ROOM_PEER_JOINED c", "ROOM_PEER_LEFT b")
            else:
                self.assertEqual(room_ok, "ROOM_OK a")
                await a.expect("ROOM_PEER_LEFT b", "ROOM_PEER_JOINED c")
            await self.assert_in_room(c, "a")
            await self.assert_in_room(a, "c")
            a.close()
            c.close()
            await self.server.wait_for_connections(0)
            self.assertTrue(self.server.registry.is_empty(), attempt)

    async def test_peers_joining_a_new_room_at_once_see_a_consistent_order(self):
        """Peers that join one new room at the same moment agree on a single join order."""
        uids = ["p0", "p1", "p2", "p3", "p4"]
        clients = {uid: await self.server.hello(uid) for uid in uids}
        for client in clients.values():
            client.send_text("ROOM party")
        room_oks = {uid: await client.next() for uid, client in clients.items()}
        order = sorted(uids, key=lambda uid: len(room_oks[uid].split()))
        for position, uid in enumerate(order):
            self.assertEqual(room_oks[uid], "ROOM_OK " + " ".join(order[:position]))
            later = order[position + 1:]
            await clients[uid].expect(*[f"ROOM_PEER_JOINED {other}" for other in later])
            await self.assert_in_room(clients[uid], *[o for o in order if o != uid])

    # Keepalive.

    async def test_peers_not_answering_pings_are_dropped_and_their_partners_told(self):
        """
        With a short keepalive, peers that never answer pings are
        disconnected; a session partner is closed with 1000 and room members
        get ``ROOM_PEER_LEFT``, as for any close.
        """
        server = await self.start_server(keepalive=KEEPALIVE)
        callee = await server.hello("callee")
        mute_caller = await server.hello("mute-caller", answer_pings=False)
        mute_caller.send_text("SESSION callee")
        await mute_caller.expect("SESSION_OK")
        (member,) = await server.room("r", "member")
        mute_member = await server.hello("mute-member", answer_pings=False)
        mute_member.send_text("ROOM r")
        await mute_member.expect("ROOM_OK member")
        await member.expect("ROOM_PEER_JOINED mute-member")
        for mute in (mute_caller, mute_member):
            await mute.closed(timeout=4 * KEEPALIVE)
            self.assertGreaterEqual(mute.pings, 1, mute)
        await self.assert_closed_by_partner(callee)
        await member.expect("ROOM_PEER_LEFT mute-member")
        await self.assert_in_room(member)

    async def test_silent_peers_that_answer_pings_stay_connected(self):
        """
        Peers that answer pings stay connected through several keepalive
        intervals of silence.
        """
        server = await self.start_server(keepalive=KEEPALIVE)
        caller, callee = await server.session("caller", "callee")
        (member,) = await server.room("r", "member")
        idle = await server.hello("idle")
        clients = (caller, callee, member, idle)
        for client in clients:
            await client.wait_pings(3, timeout=5 * KEEPALIVE)
        for client in clients:
            self.assertTrue(client.is_live, (client, client.close_code))
        await self.assert_session_works(caller, callee)
        await self.assert_in_room(member)
        await self.assert_registered_and_idle(idle)

    async def test_peer_answering_pings_stays_connected_with_the_shortest_keepalive(self):
        """
        With the shortest keepalive the server accepts (1 s), a peer that
        answers every ping at once stays connected (PROTOCOL.md, Keepalive:
        only a pong that does not come back within the timeout closes the
        connection), although Autobahn's timers round to whole seconds.
        """
        server = await self.start_server(keepalive=MIN_KEEPALIVE)
        idle = await server.hello("idle")
        await idle.wait_pings(4, timeout=WAIT)
        self.assertTrue(
            idle.is_live,
            f"dropped after {idle.pings} pings answered at once (close code {idle.close_code})",
        )
        await self.assert_registered_and_idle(idle)

    # Nothing left behind.

    async def test_no_timer_is_left_when_a_connection_fails_on_invalid_utf8(self):
        """
        Once a connection failed with 1007 is gone, the server keeps no timer
        for it (a leftover closing-handshake timer would hold the connection,
        its buffers included, for seconds after it is gone).
        """
        client = await self.server.hello("alice")
        client.send_bytes(INVALID_UTF8, binary=False)
        code, _ = await client.closed()
        self.assertEqual(code, 1007)
        await self.server.wait_for_connections(0)
        self.assertEqual(self.server.leftover_timers(), [])

    async def test_no_timer_is_left_when_a_refused_peer_drops_in_the_closing_handshake(self):
        """
        A peer that is refused (``ERROR`` and 1002) and drops TCP instead of
        answering the close frame leaves no timer behind once it is gone.
        """
        raw = await self.server.raw()
        await raw.upgrade()
        raw.send_frame(1, b"garbage")
        (code, _), frames = await raw.close_frame()
        self.assertEqual(code, 1002)
        self.assertTrue(frames[0][1].startswith(b"ERROR "), frames)
        raw.abort()
        await self.server.wait_for_connections(0)
        self.assertEqual(self.server.leftover_timers(), [])

    # Plain HTTP on the same port.

    async def test_health_check_answers_200_ok(self):
        """``GET /health`` is answered ``200`` with the body ``OK\\n``."""
        status, _, body = await self.server.get("/health")
        self.assertEqual((status, body), (200, b"OK\n"))

    async def test_root_page_names_the_service_and_its_websocket_url(self):
        """``GET /`` is an HTML page naming the service and its ws:// or wss:// URL."""
        status, headers, body = await self.server.get("/")
        self.assertEqual(status, 200)
        self.assertTrue(headers[b"content-type"].startswith(b"text/html"), headers)
        page = body.decode("utf-8")
        self.assertIn("signalling", page.lower())
        self.assertIn(self.server.url("/"), page)

    async def test_unknown_path_is_404(self):
        """A plain ``GET`` of a path the server does not serve is ``404``."""
        status, _, _ = await self.server.get("/nope")
        self.assertEqual(status, 404)

    async def test_websocket_upgrade_works_on_any_path(self):
        """The WebSocket upgrade is accepted on any path, the health path included."""
        for path in ["/ws", "/health", "/nope/deeper?x=1"]:
            client = await self.server.connect(path=path)
            uid = "on-" + path.strip("/").replace("/", "-").replace("?", "-")
            client.send_text("HELLO " + uid)
            await client.expect("HELLO")


@implementer(IPushProducer)
class _Gate:
    """A producer that only notes whether its transport wants it paused."""

    paused = False

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        self.paused = True


class PlaintextTests(IntegrationTestsMixin, TestCase):
    """The suite over plaintext WebSocket (``ws://``, a ``tcp:`` endpoint)."""

    tls = False


class TLSTests(IntegrationTestsMixin, TestCase):
    """
    The suite over TLS (``wss://``, our TLS layer as on a bare ``ssl:`` port,
    a run-time certificate), and what only TLS has.
    """

    tls = True

    def tls_events(self, events):
        """:returns: our events about failed TLS, and every error-level event."""
        failed = [e for e in events if "TLS with" in (e.get("log_format") or "")]
        errors = [e for e in events if e["log_level"] >= LogLevel.error]
        return failed, errors

    async def test_a_client_that_does_not_trust_the_certificate_is_logged_once_at_info(self):
        """
        A client that refuses the certificate is one info line with its
        address and a plain reason; no error is logged.
        """
        other = write_certificate(self.mktemp())
        options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(other.pem))
        tcp = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.server.port_number())
        with capturedLogs() as events:
            client = await endpoints.wrapClientTLS(options, tcp).connect(
                Factory.forProtocol(Protocol)
            )
            await eventually(
                lambda: not client.transport.connected, "the handshake to fail"
            )
            await self.server.wait_for_connections(0)
        failed, errors = self.tls_events(events)
        self.assertEqual(errors, [])
        [event] = failed
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertTrue(event["peer_addr"].startswith("tcp4:127.0.0.1:"), event)
        self.assertIn("does not trust the certificate", event["reason"])

    async def test_plain_http_on_the_tls_port_gets_400_saying_to_use_https(self):
        """
        A plain HTTP request on the TLS port is answered with a short 400
        that says to use https:// or wss://, and logged once at info.
        """
        tcp = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.server.port_number())
        with capturedLogs() as events:
            raw = await tcp.connect(Factory.forProtocol(RawClient))
            raw.transport.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answer = await raw.response()
            await self.server.wait_for_connections(0)
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 400 "), head)
        self.assertIn(b"https://", body)
        self.assertIn(b"wss://", body)
        failed, errors = self.tls_events(events)
        self.assertEqual(errors, [])
        [event] = failed
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertIn("plain HTTP", event["reason"])

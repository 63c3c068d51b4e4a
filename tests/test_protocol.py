"""
Tests for signalling.server.protocol: the connection state machine, through real
Autobahn clients connected in memory (iosim) on one fake clock.
"""

import base64
import os
import random
import re
import struct

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial import unittest

from signalling.core.registry import Registry
from signalling.core.connection import RATE_STRIKES, Connection
from signalling.server import websocket
from signalling.server.websocket import TURN_STEPS
from tests.clients import Client
from tests.servers import Loopback

from tests import backends
from tests.helpers import change_settings

OFFER = '{"sdp": {"type": "offer", "sdp": "v=0\\r\\no=- 1 2 IN IP4 127.0.0.1\\r\\n"}}'


class ProtocolTestCase(unittest.TestCase):
    """
    A loopback server with a fresh registry; nothing may be left behind.

    The behaviour classes run once as written (the in-memory registry, the
    fast WebSocket layer) and again, at the end of this module, over
    Autobahn's own paths and over adversarial backends (``tests/backends.py``).
    """

    factory_kwargs = {}
    backend = staticmethod(backends.memory)
    seed = 0
    fast_path = True
    #: Clients connected with TCP's flow control (see tests.servers.FlowTransport).
    flow_control = False

    def setUp(self):
        self.net = Loopback(
            self,
            backend=self.backend,
            seed=self.seed,
            fast_path=self.fast_path,
            flow_control=self.flow_control,
            **self.factory_kwargs,
        )
        self.registry = self.net.registry

    def registry_says(self, method, *args):
        """:returns: what the registry answers, once everything in flight has arrived."""
        d = defer.maybeDeferred(method, *args)
        self.net.flush()
        return self.successResultOf(d)

    def close_all(self, *clients):
        for client in clients:
            if client.close_info is None:
                client.sendClose(1000)
        self.net.flush()
        self.assertTrue(self.registry.is_empty(), "registry not empty")
        self.assertEqual(self.net.factory.getConnectionCount(), 0)


class RegistrationTests(ProtocolTestCase):
    """The first message (PROTOCOL.md, Registration)."""

    def test_hello_is_answered_with_hello(self):
        """HELLO <uid> registers the peer and answers HELLO."""
        client = self.net.hello("alice")
        self.assertEqual(self.registry.peer_count, 1)
        self.close_all(client)

    def refused(self, first, close_reason, binary=False):
        before = self.registry.peer_count
        client = self.net.client()
        if binary:
            client.sendMessage(first, isBinary=True)
        else:
            client.send_text(first)
        self.net.flush()
        received = client.drain()
        self.assertEqual(len(received), 1, received)
        self.assertTrue(received[0].startswith("ERROR "), received)
        self.assertEqual(client.remoteCloseCode, 1002)
        self.assertEqual(client.remoteCloseReason, close_reason)
        self.assertIsNotNone(client.close_info)
        self.assertEqual(self.registry.peer_count, before)
        return received[0]

    def test_first_message_other_than_hello_is_refused(self):
        """Anything but HELLO first: ERROR, then close 1002 'invalid protocol'."""
        for first in ("SESSION bob", "ROOM r", "hello alice", "HELLOalice", "", "  "):
            with self.subTest(first=first):
                self.refused(first, "invalid protocol")

    def test_binary_first_message_is_refused(self):
        """A binary first message is not a HELLO."""
        self.refused(b"HELLO alice", "invalid protocol", binary=True)

    def test_invalid_uids_are_refused(self):
        """Missing, too long, whitespace or control characters: 'invalid peer uid'."""
        for first in ("HELLO", "HELLO   ", "HELLO a b", "HELLO a\x00", "HELLO " + "u" * 257):
            with self.subTest(first=first):
                self.refused(first, "invalid peer uid")

    def test_taken_uid_is_refused_and_the_holder_is_untouched(self):
        """A uid held by a connected peer is refused; the holder keeps working."""
        alice = self.net.hello("alice")
        error = self.refused("HELLO alice", "invalid peer uid")
        self.assertEqual(error, "ERROR peer uid 'alice' is already taken")
        self.assertEqual(self.registry.peer_count, 1)
        alice.send_text("ROOM_PEER_LIST")
        self.net.flush()
        self.assertEqual(alice.drain(), ["ERROR not in a room"])
        self.close_all(alice)

    def test_a_silent_holder_of_a_uid_is_replaced_by_a_new_hello(self):
        """
        A HELLO for a uid whose holder does not answer a ping within the
        reclaim timeout: the holder is closed (1008), its room is told, and
        the uid is the newcomer's.
        """
        change_settings(self.net.factory, reclaim_timeout=2.0)
        silent = self.net.hello("alice", answer_pings=False)
        silent.send_text("ROOM r")
        member = self.net.hello("member")
        member.send_text("ROOM r")
        self.net.flush()
        silent.drain()
        member.drain()
        newcomer = self.net.client()
        newcomer.send_text("HELLO alice")
        self.net.flush()
        self.assertEqual(newcomer.drain(), [])  # waiting for the holder's pong
        self.net.clock.advance(2.0)
        self.net.flush()
        self.assertEqual(newcomer.drain(), ["HELLO"])
        self.assertEqual(silent.remoteCloseCode, 1008)
        self.assertEqual(silent.remoteCloseReason, "replaced by a new connection")
        self.assertEqual(member.drain(), ["ROOM_PEER_LEFT alice"])
        self.assertEqual(self.registry.peer_count, 2)
        self.close_all(newcomer, member)

    def test_a_holder_that_answers_the_ping_keeps_its_uid(self):
        change_settings(self.net.factory, reclaim_timeout=2.0)
        alice = self.net.hello("alice")
        error = self.refused("HELLO alice", "invalid peer uid")
        self.assertEqual(error, "ERROR peer uid 'alice' is already taken")
        self.assertGreaterEqual(alice.pings, 1)
        self.assertIsNone(alice.close_info)
        self.close_all(alice)

    def test_without_a_reclaim_timeout_a_taken_uid_is_refused_at_once(self):
        change_settings(self.net.factory, reclaim_timeout=0)
        silent = self.net.hello("alice", answer_pings=False)
        self.refused("HELLO alice", "invalid peer uid")
        self.assertEqual(silent.pings, 0)
        self.close_all(silent)

    def test_two_hellos_with_one_uid_at_the_same_moment(self):
        """Both sent before either is handled: exactly one wins."""
        first, second = self.net.client(), self.net.client()
        first.send_text("HELLO same")
        second.send_text("HELLO same")
        self.net.flush()
        replies = sorted([first.drain(), second.drain()])
        self.assertEqual(replies[0], ["ERROR peer uid 'same' is already taken"])
        self.assertEqual(replies[1], ["HELLO"])
        self.assertEqual(self.registry.peer_count, 1)
        self.close_all(first, second)

    def test_uid_is_free_again_when_its_connection_closes(self):
        """A closed connection's uid can be registered at once."""
        alice = self.net.hello("alice")
        alice.sendClose(1000)
        self.net.flush()
        again = self.net.hello("alice")
        self.close_all(again)

    def test_uid_is_free_again_after_a_drop_without_close_frame(self):
        """A connection lost without a close handshake releases its uid."""
        alice = self.net.hello("alice")
        alice.transport.loseConnection()
        self.net.flush()
        self.assertTrue(self.registry.is_empty())
        again = self.net.hello("alice")
        self.close_all(again)

    def test_second_hello_is_an_error_that_keeps_the_connection(self):
        """HELLO when registered is refused without closing or re-registering."""
        alice = self.net.hello("alice")
        alice.send_text("HELLO bob")
        self.net.flush()
        self.assertEqual(alice.drain(), ["ERROR already registered"])
        self.assertIsNone(alice.close_info)
        self.assertEqual(self.registry.peer_count, 1)
        self.close_all(alice)

    def test_unknown_command_is_named_in_the_error(self):
        """An unknown command gets ERROR unknown command '<word>'; state is kept."""
        alice = self.net.hello("alice")
        for line, reply in [
            ("FROBNICATE now", "ERROR unknown command 'FROBNICATE'"),
            ("SESSION_OK x", "ERROR unknown command 'SESSION_OK'"),
            ("", "ERROR empty message"),
            (" \t ", "ERROR empty message"),
        ]:
            alice.send_text(line)
            self.net.flush()
            self.assertEqual(alice.drain(), [reply])
        alice.sendMessage(b"\x00\x01", isBinary=True)
        self.net.flush()
        self.assertEqual(
            alice.drain(), ["ERROR binary messages are only relayed inside a session"]
        )
        self.assertIsNone(alice.close_info)
        self.close_all(alice)


class HeldBackHolderTests(ProtocolTestCase):
    """
    Reclaiming a uid from a holder whose input the server holds back
    because its session partner does not read (docs/protocol.md,
    Registration): its pong cannot be read, yet it is alive.
    """

    flow_control = True
    factory_kwargs = {"reclaim_timeout": 2.0}

    def held_back_session(self):
        """
        :returns: ``(alice, bob)`` in a session, bob no longer reading, and
            alice having sent until the server holds her input back.
        """
        alice = self.net.hello("alice")
        bob = self.net.hello("bob")
        alice.send_text("SESSION bob")
        self.net.flush()
        self.assertEqual(alice.drain(), ["SESSION_OK"])
        bob.transport.pauseProducing()
        for _ in range(100):
            if alice.server.read_pauses:
                break
            alice.send_bytes(b"x" * 4096)
            self.net.flush()
        self.assertEqual(alice.server.read_pauses, frozenset({"partner"}))
        return alice, bob

    def test_a_holder_held_back_by_a_partner_that_does_not_read_keeps_its_uid(self):
        """
        A HELLO for the uid of a peer whose input is paused because its
        partner does not read: the peer answers the ping, its pong waits
        unread, and at the reclaim timeout the HELLO is refused as taken;
        the holder stays, and is read again once its partner reads.
        """
        alice, bob = self.held_back_session()
        newcomer = self.net.client()
        newcomer.send_text("HELLO alice")
        self.net.flush()
        self.assertEqual(newcomer.drain(), [])
        self.assertEqual(alice.pings, 1)  # it heard the ping, and answered it
        self.net.clock.advance(2.0)
        self.net.flush()
        self.assertEqual(newcomer.drain(), ["ERROR peer uid 'alice' is already taken"])
        self.assertEqual(newcomer.remoteCloseCode, 1002)
        self.assertIsNone(alice.close_info)
        self.assertIs(self.registry.peer_of("alice"), alice.server.connection)
        bob.transport.resumeProducing()
        self.net.flush()
        self.assertEqual(alice.server.read_pauses, frozenset())
        alice.send_text("still here")
        self.net.flush()
        self.assertEqual(bob.drain()[-1], "still here")
        self.close_all(alice, bob, newcomer)

    def test_a_peer_held_back_longer_than_the_keepalive_is_not_dropped_for_it(self):
        """
        A peer held back by a partner that does not read, past the
        keepalive's ping and pong time: its pong waits unread, and it is not
        dropped for it. The partner, which heard no ping, is dropped; the
        peer's session then ends as for any partner leaving: a clean 1000.
        """
        alice, bob = self.held_back_session()
        self.net.clock.advance(5.0)  # the keepalive pings both
        self.net.flush()
        self.assertEqual(alice.pings, 1)
        self.net.clock.advance(7.0)  # past the pong's time
        self.net.flush()
        self.assertFalse(bob.close_info[0])  # dropped, no close handshake
        self.assertEqual(alice.close_info, (True, 1000, None))
        self.assertEqual(self.net.factory.stats.keepalive_timeouts, 1)
        self.close_all(alice, bob)

    def test_a_holder_that_does_not_read_is_replaced(self):
        """
        A holder whose own input is paused because it does not read what
        is sent to it heard no ping: at the reclaim timeout it is closed
        (1008) and the uid is the newcomer's. The partner it held back is
        read again at once, and its session ends with a clean close (1000).
        """
        alice, bob = self.held_back_session()
        self.assertIn("own output", bob.server.read_pauses)
        newcomer = self.net.client()
        newcomer.send_text("HELLO bob")
        self.net.flush()
        self.assertEqual(bob.pings, 0)
        self.net.clock.advance(2.0)
        self.net.flush()
        self.assertEqual(newcomer.drain(), ["HELLO"])
        self.assertIs(self.registry.peer_of("bob"), newcomer.server.connection)
        self.assertEqual(alice.server.read_pauses, frozenset())
        self.assertEqual(alice.close_info, (True, 1000, None))
        bob.transport.resumeProducing()
        self.net.flush()
        self.assertEqual((bob.remoteCloseCode, bob.remoteCloseReason), (1008, "replaced by a new connection"))
        self.close_all(alice, bob, newcomer)


class HeldBackHolderTests_PlainAutobahn(HeldBackHolderTests):
    fast_path = False


class SessionTests(ProtocolTestCase):
    """1-1 sessions (PROTOCOL.md, 1-1 sessions)."""

    def call(self, caller="alice", callee="bob"):
        a, b = self.net.hello(caller), self.net.hello(callee)
        a.send_text(f"SESSION {callee}")
        self.net.flush()
        self.assertEqual(a.drain(), ["SESSION_OK"])
        self.assertEqual(b.drain(), [], "the callee must be told nothing")
        return a, b

    def test_messages_are_relayed_verbatim_both_ways(self):
        """Text (even command-like) and binary frames pass through unchanged."""
        a, b = self.call()
        a.send_text(OFFER)
        a.send_text("SESSION carol")
        a.send_text("")
        b.send_text("HELLO x")
        b.sendMessage(b"\x00\xffbinary", isBinary=True)
        self.net.flush()
        self.assertEqual(b.drain(), [OFFER, "SESSION carol", ""])
        self.assertEqual(a.drain(), ["HELLO x", b"\x00\xffbinary"])
        self.close_all(a, b)

    def test_frame_logging_sends_through_autobahns_own_path(self):
        """
        With Autobahn's frame logging on, relayed frames go through its
        sendFrame (which logs them) rather than the direct write, and still
        arrive intact.
        """
        self.net.factory.logFrames = True
        a, b = self.call()
        sent = []
        original = b.server.sendFrame
        b.server.sendFrame = lambda opcode, payload=b"", **kw: (
            sent.append((opcode, payload)),
            original(opcode, payload, **kw),
        )
        a.send_text(OFFER)
        self.net.flush()
        self.assertEqual(b.drain(), [OFFER])
        self.assertEqual(sent, [(1, OFFER.encode())])
        self.close_all(a, b)

    def test_relay_keeps_order_of_many_messages(self):
        """1,000 messages sent at once arrive in order."""
        a, b = self.call()
        for i in range(1000):
            a.send_text(f"m{i}")
        self.net.flush()
        self.assertEqual(b.drain(), [f"m{i}" for i in range(1000)])
        self.close_all(a, b)

    def test_closing_one_side_closes_the_other_with_1000_and_no_message(self):
        """The partner is closed with 1000 and its uid is free at once."""
        a, b = self.call()
        a.sendClose(1000)
        self.net.flush()
        self.assertEqual(b.drain(), [])
        self.assertEqual(b.remoteCloseCode, 1000)
        self.assertIsNotNone(b.close_info)
        self.assertTrue(self.registry.is_empty())
        self.close_all(self.net.hello("bob"))

    def test_callee_dropping_closes_the_caller(self):
        """A callee lost without a close frame ends the caller's connection."""
        a, b = self.call()
        b.transport.loseConnection()
        self.net.flush()
        self.assertEqual(a.remoteCloseCode, 1000)
        self.assertTrue(self.registry.is_empty())

    def test_session_errors(self):
        """Not found, yourself, missing uid, busy callee: ERROR, state unchanged."""
        a, b = self.call()
        c = self.net.hello("carol")
        for line, reply in [
            ("SESSION nobody", "ERROR peer 'nobody' not found"),
            ("SESSION carol", "ERROR cannot start a session with yourself"),
            ("SESSION", "ERROR SESSION needs a peer uid"),
            ("SESSION alice", "ERROR peer 'alice' busy"),
            ("SESSION bob", "ERROR peer 'bob' busy"),
            ("ROOM_PEER_MSG alice hi", "ERROR not in a room"),
            ("ROOM_PEER_LIST", "ERROR not in a room"),
        ]:
            c.send_text(line)
            self.net.flush()
            self.assertEqual(c.drain(), [reply])
        self.assertEqual(a.drain() + b.drain(), [])
        c.send_text("ROOM r")
        self.net.flush()
        self.assertEqual(c.drain(), ["ROOM_OK "])
        self.close_all(a, b, c)

    def test_crossed_calls_first_one_wins(self):
        """A calls B while B calls A: one SESSION_OK; the other line is relayed."""
        a, b = self.net.hello("alice"), self.net.hello("bob")
        a.send_text("SESSION bob")
        b.send_text("SESSION alice")
        self.net.flush()
        got_a, got_b = a.drain(), b.drain()
        self.assertEqual(
            sorted([got_a, got_b]), sorted([["SESSION_OK", "SESSION alice"], []])
        )
        self.assertEqual(self.registry.session_count, 1)
        self.close_all(a, b)

    def test_callee_leaving_while_the_session_is_set_up(self):
        """The callee's close arrives with the SESSION: either way, nothing is left."""
        for callee_first in (True, False):
            with self.subTest(callee_first=callee_first):
                a, b = self.net.hello("alice"), self.net.hello("bob")
                if callee_first:
                    b.sendClose(1000)
                    a.send_text("SESSION bob")
                else:
                    a.send_text("SESSION bob")
                    b.sendClose(1000)
                self.net.flush()
                reply = a.drain()
                if reply == ["SESSION_OK"]:
                    self.assertEqual(a.remoteCloseCode, 1000)
                else:
                    self.assertEqual(reply, ["ERROR peer 'bob' not found"])
                    a.sendClose(1000)
                    self.net.flush()
                self.assertTrue(self.registry.is_empty())

    def test_offer_sent_right_behind_session_follows_session_ok(self):
        """
        ``SESSION bob`` and the offer in one go: the caller gets
        ``SESSION_OK`` (never an ERROR for the offer), and the offer reaches
        the callee, whatever order the backend answers and notifies in.
        """
        a, b = self.net.hello("alice"), self.net.hello("bob")
        a.send_text("SESSION bob")
        a.send_text(OFFER)
        a.send_text("second")
        self.net.flush()
        self.assertEqual(a.drain(), ["SESSION_OK"])
        self.assertEqual(b.drain(), [OFFER, "second"])
        self.close_all(a, b)

    def test_a_peer_called_while_its_hello_is_answered_hears_hello_first(self):
        """
        bob's uid may be called before bob's HELLO is answered: bob still
        gets ``HELLO`` first, then the caller's offer; alice ``SESSION_OK``.
        """
        a = self.net.hello("alice")
        b = self.net.client()
        b.send_text("HELLO bob")
        self.net.deliver_bytes()
        a.send_text("SESSION bob")
        a.send_text(OFFER)
        self.net.flush()
        self.assertEqual(a.drain(), ["SESSION_OK"])
        self.assertEqual(b.drain(), ["HELLO", OFFER])
        b.send_text("answer")
        self.net.flush()
        self.assertEqual(a.drain(), ["answer"])
        self.close_all(a, b)

    def test_what_the_callee_sends_at_once_follows_the_callers_session_ok(self):
        """
        The callee sends the moment the server has made it a callee: the
        caller sees ``SESSION_OK`` before that message, even when it
        overtakes the caller's own notification on its way.
        """
        a, b = self.net.hello("alice"), self.net.hello("bob")
        a.send_text("SESSION bob")
        self.net.deliver_bytes()
        for _ in range(1000):
            if b.server.connection.link is not None:
                break
            self.net.clock.advance(0.0005)
            self.net.deliver_bytes()
        b.send_text("from bob at once")
        self.net.flush()
        self.assertEqual(a.drain(), ["SESSION_OK", "from bob at once"])
        self.assertEqual(b.drain(), [])
        self.close_all(a, b)

    def test_messages_of_the_evicted_partner_go_nowhere(self):
        """Once told its partner left, a peer's further input is dropped."""
        a, b = self.call()
        a.sendClose(1000)
        b.send_text("late")
        self.net.flush()
        self.assertEqual(a.drain(), [])
        self.assertTrue(self.registry.is_empty())


class RoomTests(ProtocolTestCase):
    """Rooms (PROTOCOL.md, Rooms)."""

    def join(self, uid, room_id="r"):
        client = self.net.hello(uid)
        client.send_text(f"ROOM {room_id}")
        self.net.flush()
        return client

    def test_room_of_three(self):
        """ROOM_OK lists earlier members; members are told of joins, messages, leaves."""
        a = self.join("a")
        self.assertEqual(a.drain(), ["ROOM_OK "])
        b = self.join("b")
        self.assertEqual(b.drain(), ["ROOM_OK a"])
        self.assertEqual(a.drain(), ["ROOM_PEER_JOINED b"])
        c = self.join("c")
        self.assertEqual(c.drain(), ["ROOM_OK a b"])
        self.assertEqual(a.drain() + b.drain(), ["ROOM_PEER_JOINED c"] * 2)
        c.send_text('ROOM_PEER_MSG a {"ice":  {"candidate": "x"}}  ')
        c.send_text("ROOM_PEER_LIST")
        self.net.flush()
        self.assertEqual(a.drain(), ['ROOM_PEER_MSG c {"ice":  {"candidate": "x"}}  '])
        self.assertEqual(c.drain(), ["ROOM_PEER_LIST a b"])
        self.assertEqual(b.drain(), [])
        b.sendClose(1000)
        self.net.flush()
        self.assertEqual(a.drain(), ["ROOM_PEER_LEFT b"])
        self.assertEqual(c.drain(), ["ROOM_PEER_LEFT b"])
        self.close_all(a, b, c)

    def test_leaving_while_another_joins_is_told_exactly_once_or_not_at_all(self):
        """
        a leaves as b joins: b's ``ROOM_OK`` lists a and then b hears
        ``ROOM_PEER_LEFT a`` once, or it does not list a and b hears nothing
        of a; the room is consistent after.
        """
        a = self.join("a")
        c = self.join("c")
        a.drain(), c.drain()
        b = self.net.hello("b")
        b.send_text("ROOM r")
        a.sendClose(1000)
        self.net.flush()
        got = b.drain()
        self.assertTrue(got[0].startswith("ROOM_OK "), got)
        listed = got[0][len("ROOM_OK "):].split()
        if "a" in listed:
            self.assertEqual(got, ["ROOM_OK a c", "ROOM_PEER_LEFT a"])
        else:
            self.assertEqual(got, ["ROOM_OK c"])
        self.assertEqual(sorted(c.drain()), ["ROOM_PEER_JOINED b", "ROOM_PEER_LEFT a"])
        b.send_text("ROOM_PEER_LIST")
        self.net.flush()
        self.assertEqual(b.drain(), ["ROOM_PEER_LIST c"])
        self.close_all(b, c)

    def test_peers_joining_at_once_each_hear_of_every_other_once(self):
        """
        Four peers join one room at the same moment: each hears of each of
        the others exactly once, in its ``ROOM_OK`` or as a join, always
        after its own ``ROOM_OK``; and a message sent right behind ``ROOM``
        follows the join it needs.
        """
        clients = {uid: self.net.hello(uid) for uid in "abcd"}
        for uid, client in clients.items():
            client.send_text("ROOM r")
        self.net.flush()
        for uid, client in clients.items():
            got = client.drain()
            self.assertTrue(got[0].startswith("ROOM_OK"), got)
            heard = got[0].split()[1:] + [
                line.split()[1] for line in got[1:] if line.startswith("ROOM_PEER_JOINED ")
            ]
            self.assertEqual(sorted(heard), sorted(set("abcd") - {uid}), (uid, got))
            self.assertEqual(len(got), 1 + 3 - len(got[0].split()[1:]), got)
        clients["a"].send_text("ROOM_PEER_MSG b first")
        clients["a"].send_text("ROOM_PEER_MSG b second")
        self.net.flush()
        self.assertEqual(
            clients["b"].drain(), ["ROOM_PEER_MSG a first", "ROOM_PEER_MSG a second"]
        )
        self.close_all(*clients.values())

    def test_a_full_room_is_answered_with_an_error_that_changes_nothing(self):
        """Past the room's size the joiner gets ERROR room 'r' is full and stays out."""
        self.net.registry = self.registry = backends.Memory(max_room_members=1)
        self.net.factory.registry = self.registry
        a = self.join("a")
        b = self.join("b")
        self.assertEqual(a.drain(), ["ROOM_OK "])
        self.assertEqual(b.drain(), ["ERROR room 'r' is full"])
        b.send_text("ROOM other")
        self.net.flush()
        self.assertEqual(b.drain(), ["ROOM_OK "])
        self.close_all(a, b)

    def test_room_errors(self):
        """Every room error keeps the peer in its room."""
        a = self.join("a")
        b = self.join("b", room_id="other")
        loner = self.net.hello("loner")
        a.drain()
        for line, reply in [
            ("ROOM_PEER_MSG nobody hi", "ERROR peer 'nobody' not found"),
            ("ROOM_PEER_MSG b hi", "ERROR peer 'b' is not in the room"),
            ("ROOM_PEER_MSG loner hi", "ERROR peer 'loner' is not in the room"),
            ("ROOM_PEER_MSG b", "ERROR ROOM_PEER_MSG needs a peer uid and a message"),
            ("ROOM_PEER_MSG", "ERROR ROOM_PEER_MSG needs a peer uid and a message"),
            ("ROOM r2", "ERROR invalid msg, already in room"),
            ("SESSION b", "ERROR invalid msg, already in room"),
            ("HELLO a", "ERROR invalid msg, already in room"),
            ("ROOM_PEER_LIST", "ROOM_PEER_LIST "),
        ]:
            a.send_text(line)
            self.net.flush()
            self.assertEqual(a.drain(), [reply])
        a.sendMessage(b"\x01", isBinary=True)
        self.net.flush()
        self.assertEqual(
            a.drain(), ["ERROR binary messages are only relayed inside a session"]
        )
        self.assertEqual(self.registry_says(self.registry.room_members, "a"), [])
        self.close_all(a, b, loner)

    def test_invalid_room_ids(self):
        """Empty, reserved, too long, whitespace: ERROR invalid room id."""
        a = self.net.hello("a")
        for line, reply in [
            ("ROOM", "ERROR invalid room id ''"),
            ("ROOM session", "ERROR invalid room id 'session'"),
            ("ROOM a b", "ERROR invalid room id 'a b'"),
            ("ROOM " + "r" * 257, "ERROR invalid room id '" + "r" * 257 + "'"),
        ]:
            a.send_text(line)
            self.net.flush()
            self.assertEqual(a.drain(), [reply])
        self.assertEqual(self.registry.room_count, 0)
        self.close_all(a)

    def test_room_message_to_yourself_is_delivered(self):
        """Upstream relays a member's message to itself; so do we."""
        a = self.join("a")
        a.drain()
        a.send_text("ROOM_PEER_MSG a echo")
        self.net.flush()
        self.assertEqual(a.drain(), ["ROOM_PEER_MSG a echo"])
        self.close_all(a)


class LimitsTests(ProtocolTestCase):
    """Message size limits and invalid frames."""

    factory_kwargs = {"max_message": 100}

    def test_message_over_the_limit_closes_with_1009_only_that_connection(self):
        """101 bytes: close 1009; the session partner is closed as for any close."""
        a, b = self.net.hello("a"), self.net.hello("b")
        c = self.net.hello("c")
        a.send_text("SESSION b")
        self.net.flush()
        a.drain()
        a.send_text("x" * 100)
        self.net.flush()
        self.assertEqual(b.drain(), ["x" * 100])
        a.send_text("x" * 101)
        self.net.flush()
        self.assertEqual(a.remoteCloseCode, 1009)
        self.assertEqual(b.drain(), [])
        self.assertEqual(b.remoteCloseCode, 1000)
        self.assertIsNone(c.close_info)
        self.assertEqual(self.registry.peer_count, 1)
        self.close_all(a, b, c)

    def test_relayed_room_message_may_exceed_the_incoming_limit(self):
        """The ROOM_PEER_MSG prefix makes the relayed line longer: still delivered."""
        a, b = self.net.hello("a"), self.net.hello("b")
        a.send_text("ROOM r")
        b.send_text("ROOM r")
        self.net.flush()
        a.drain()
        line = "ROOM_PEER_MSG a " + "p" * 84
        self.assertEqual(len(line), 100)
        b.send_text(line)
        self.net.flush()
        self.assertEqual(a.drain(), ["ROOM_PEER_MSG b " + "p" * 84])
        self.close_all(a, b)

    def test_invalid_utf8_closes_with_1007_and_tells_the_room(self):
        """A text frame that is not UTF-8 fails the connection with 1007."""
        a, b = self.net.hello("a"), self.net.hello("b")
        a.send_text("ROOM r")
        b.send_text("ROOM r")
        self.net.flush()
        a.drain()
        b.sendMessage(b"ROOM_PEER_MSG a \xff\xfe", isBinary=False)
        self.net.flush()
        self.assertEqual(b.remoteCloseCode, 1007)
        self.assertEqual(a.drain(), ["ROOM_PEER_LEFT b"])
        self.close_all(a, b)


class KeepaliveTests(ProtocolTestCase):
    """Pings and dead peers (PROTOCOL.md, Keepalive), with keepalive=5."""

    def test_peer_answering_pings_stays_connected(self):
        """A silent peer that answers pings is kept however long."""
        a = self.net.hello("a")
        for _ in range(20):
            self.net.clock.advance(2.6)
            self.net.flush()
        self.assertIsNone(a.close_info)
        self.assertEqual(self.registry.peer_count, 1)
        self.close_all(a)

    def test_pong_arriving_just_inside_the_timeout_keeps_the_peer(self):
        """
        A pong may take almost the whole keepalive time, although Autobahn's
        timers round their deadlines down to whole seconds.
        """
        clock = self.net.clock

        class SlowPong(Client):
            def onPing(self, payload):
                clock.callLater(4.9, self.sendPong, payload)

        clock.advance(0.95)
        a = self.net.hello("a", protocol=SlowPong)
        for _ in range(300):
            clock.advance(0.1)
            self.net.flush()
        self.assertIsNone(a.close_info)
        self.close_all(a)

    def test_peer_not_answering_is_dropped_and_its_partner_closed(self):
        """No pong within the timeout: dropped, partner closed, registry empty."""
        a = self.net.hello("a")
        b = self.net.hello("b", answer_pings=False)
        a.send_text("SESSION b")
        self.net.flush()
        a.drain()
        self.net.clock.advance(5.1)
        self.net.flush()
        self.assertIsNone(b.close_info)
        for _ in range(6):
            self.net.clock.advance(1)
            self.net.flush()
        self.assertIsNotNone(b.close_info)
        self.assertEqual(b.remoteCloseCode, None, "dropped, not closed cleanly")
        self.assertEqual(a.remoteCloseCode, 1000)
        self.assertEqual(a.drain(), [])
        self.assertTrue(self.registry.is_empty())
        self.assertEqual(self.net.factory.getConnectionCount(), 0)

    def test_room_members_are_told_when_a_dead_peer_is_dropped(self):
        """A member dropped by keepalive is announced with ROOM_PEER_LEFT."""
        a = self.net.hello("a")
        b = self.net.hello("b", answer_pings=False)
        a.send_text("ROOM r")
        b.send_text("ROOM r")
        self.net.flush()
        a.drain()
        for _ in range(12):
            self.net.clock.advance(1)
            self.net.flush()
        self.assertIsNotNone(b.close_info)
        self.assertEqual(a.drain(), ["ROOM_PEER_LEFT b"])
        self.assertIsNone(a.close_info)
        self.close_all(a)


class HelloTimeoutTests(ProtocolTestCase):
    """A connection that never sends HELLO is closed (hello_timeout)."""

    factory_kwargs = {"hello_timeout": 3, "keepalive": 100}

    def test_silent_connection_is_closed_after_the_hello_timeout(self):
        """
        On a port pinned to the examples' dialect, no HELLO in time: close
        1008; a registered peer is not affected.
        """
        change_settings(self.net.factory, dialect="examples")
        silent = self.net.client()
        registered = self.net.hello("a")
        self.net.clock.advance(2.9)
        self.net.flush()
        self.assertIsNone(silent.close_info)
        self.net.clock.advance(0.2)
        self.net.flush()
        self.assertEqual(silent.remoteCloseCode, 1008)
        self.assertEqual(silent.drain(), [])
        self.net.clock.advance(10)
        self.net.flush()
        self.assertIsNone(registered.close_info)
        self.close_all(registered)


class DelayedRegistry:
    """
    A registry whose commands complete only when the test says so, as a
    cluster backend's would; ``remove`` completes at once.
    """

    def __init__(self):
        self.inner = Registry()
        self.pending = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _later(self, method, *args):
        d = defer.Deferred()
        self.pending.append((d, method, args))
        return d

    def release(self):
        """Complete the oldest pending command."""
        d, method, args = self.pending.pop(0)
        try:
            result = method(*args)
        except Exception:
            d.errback()
        else:
            d.callback(result)

    def register(self, uid, peer):
        return self._later(self.inner.register, uid, peer)

    def start_session(self, caller_uid, callee_uid):
        return self._later(self.inner.start_session, caller_uid, callee_uid)

    def join_room(self, uid, room_id):
        return self._later(self.inner.join_room, uid, room_id)

    def room_message(self, sender_uid, target_uid, payload):
        return self._later(self.inner.room_message, sender_uid, target_uid, payload)

    def room_members(self, uid):
        return self._later(self.inner.room_members, uid)


class DelayedRegistryTests(unittest.TestCase):
    """Commands that complete later keep each connection's order."""

    def setUp(self):
        self.registry = DelayedRegistry()
        self.net = Loopback(self, registry=self.registry)

    def test_input_after_a_pending_hello_waits_for_it(self):
        """Messages sent behind HELLO are handled after HELLO completes, in order."""
        a = self.net.client()
        a.send_text("HELLO a")
        a.send_text("SESSION nobody")
        a.send_text("FROB")
        self.net.flush()
        self.assertEqual(a.drain(), [])
        self.registry.release()
        self.net.flush()
        self.assertEqual(a.drain(), ["HELLO"])
        self.registry.release()
        self.net.flush()
        self.assertEqual(
            a.drain(), ["ERROR peer 'nobody' not found", "ERROR unknown command 'FROB'"]
        )
        a.sendClose(1000)
        self.net.flush()
        self.assertTrue(self.registry.inner.is_empty())

    def test_offer_sent_right_behind_session_is_relayed_after_session_ok(self):
        """The caller's offer, sent before SESSION_OK, reaches the callee after it."""
        a, b = self.net.client(), self.net.client()
        a.send_text("HELLO a")
        b.send_text("HELLO b")
        self.net.flush()
        self.registry.release()
        self.registry.release()
        self.net.flush()
        self.assertEqual(a.drain() + b.drain(), ["HELLO", "HELLO"])
        a.send_text("SESSION b")
        a.send_text(OFFER)
        self.net.flush()
        self.assertEqual(b.drain(), [])
        self.registry.release()
        self.net.flush()
        self.assertEqual(a.drain(), ["SESSION_OK"])
        self.assertEqual(b.drain(), [OFFER])
        a.sendClose(1000)
        self.net.flush()
        self.assertEqual(b.remoteCloseCode, 1000)
        self.assertTrue(self.registry.inner.is_empty())

    def test_connection_closed_during_a_pending_hello_leaves_nothing(self):
        """A registration completing after the close is undone at once."""
        a = self.net.client()
        a.send_text("HELLO a")
        self.net.flush()
        a.sendClose(1000)
        self.net.flush()
        self.registry.release()
        self.net.flush()
        self.assertTrue(self.registry.inner.is_empty())
        self.assertEqual(self.net.factory.getConnectionCount(), 0)

    def test_caller_closed_during_a_pending_session_leaves_the_callee_free(self):
        """The session set-up finds the caller gone; the callee stays callable."""
        a, b = self.net.client(), self.net.client()
        a.send_text("HELLO a")
        b.send_text("HELLO b")
        self.net.flush()
        self.registry.release()
        self.registry.release()
        a.send_text("SESSION b")
        self.net.flush()
        a.sendClose(1000)
        self.net.flush()
        self.registry.release()
        self.net.flush()
        self.assertEqual(self.registry.inner.session_count, 0)
        self.assertEqual(self.registry.inner.peer_count, 1)
        self.assertIsNone(b.close_info)
        b.sendClose(1000)
        self.net.flush()
        self.assertTrue(self.registry.inner.is_empty())


class FailingRegistry(Registry):
    """A registry with a bug: join_room blows up."""

    def join_room(self, uid, room_id):
        raise RuntimeError("backend exploded")


class UnexpectedErrorTests(unittest.TestCase):
    """A bug costs only the connection that hit it."""

    def test_unexpected_exception_closes_only_that_connection(self):
        """The failure is logged, the peer is closed with 1011, others carry on."""
        net = Loopback(self, registry=FailingRegistry())
        a, b = net.hello("a"), net.hello("b")
        with capturedLogs() as events:
            a.send_text("ROOM r")
            net.flush()
        self.flushLoggedErrors(RuntimeError)
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertEqual(failures[0]["uid"], "a")
        self.assertEqual(a.remoteCloseCode, 1011)
        b.send_text("SESSION nobody")
        net.flush()
        self.assertEqual(b.drain(), ["ERROR peer 'nobody' not found"])
        b.sendClose(1000)
        net.flush()
        self.assertTrue(net.registry.is_empty())


class CommandFailureTests(unittest.TestCase):
    """An exception while a command is handled is logged once and costs only its connection."""

    def test_it_is_logged_critical_with_the_peer_and_closes_with_1011(self):
        net = Loopback(self)
        a, b = net.hello("a"), net.hello("b")

        def broken(connection, payload, is_binary):
            raise RuntimeError("a bug")

        with capturedLogs() as events:
            self.patch(Connection, "_command", broken)
            a.send_text("ROOM r")
            net.flush()
        self.flushLoggedErrors(RuntimeError)
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertEqual(failures[0]["log_level"], LogLevel.critical)
        self.assertEqual(failures[0]["uid"], "a")
        self.assertEqual(
            formatEvent(failures[0]),
            f"while handling a message from a at {failures[0]['peer_addr']}",
        )
        self.assertIsInstance(failures[0]["log_failure"].value, RuntimeError)
        self.assertEqual(a.remoteCloseCode, 1011)
        self.assertIsNone(b.close_info)


class LoggingTests(ProtocolTestCase):
    """What is logged, with which fields, and what never is."""

    def test_registration_session_and_disconnect_are_logged_with_fields(self):
        """Events carry uid and peer_addr; payloads never appear in any event."""
        with capturedLogs() as events:
            a, b = self.net.hello("alice"), self.net.hello("bob")
            a.send_text("SESSION bob")
            self.net.flush()
            a.send_text(OFFER)
            b.send_text("secret-answer")
            self.net.flush()
            a.sendClose(1000)
            self.net.flush()
        ours = [e for e in events if e.get("log_namespace", "").startswith("signalling")]
        formats = [e["log_format"] for e in ours]
        self.assertIn("peer {uid} registered from {peer_addr}", formats)
        self.assertIn("session from {uid} to {callee}", formats)
        self.assertIn("peer {uid} at {peer_addr} disconnected (code {code}, {cause})", formats)
        registered = [e for e in ours if e["log_format"].startswith("peer {uid} registered")]
        self.assertEqual([e["uid"] for e in registered], ["alice", "bob"])
        self.assertTrue(all(e["log_level"] >= LogLevel.info for e in ours))
        for event in events:
            for value in event.values():
                self.assertNotIn("secret-answer", str(value))
                self.assertNotIn("v=0", str(value))
        self.assertTrue(self.registry.is_empty())

    def test_a_call_costs_five_lines(self):
        """
        A whole call logs five lines: each peer's registration, the session,
        and each peer's disconnection (the callee's naming who ended it);
        opening a connection logs nothing by itself.
        """
        with capturedLogs() as events:
            a, b = self.net.hello("alice"), self.net.hello("bob")
            a.send_text("SESSION bob")
            self.net.flush()
            a.sendClose(1000)
            self.net.flush()
        self.assertEqual(b.close_code, 1000)
        ours = [
            formatEvent(e) for e in events if e.get("log_namespace", "").startswith("signalling")
        ]
        self.assertEqual(len(ours), 5, ours)
        self.assertTrue(ours[0].startswith("peer alice registered from "), ours)
        self.assertTrue(ours[1].startswith("peer bob registered from "), ours)
        self.assertEqual(ours[2], "session from alice to bob")
        self.assertRegex(ours[3], r"^peer alice at \S+ disconnected \(code 1000, closed by the peer\)$")
        self.assertRegex(
            ours[4], r"^peer bob at \S+ disconnected \(code 1000\): alice ended the session$"
        )
        self.assertTrue(self.registry.is_empty())

    def test_connections_without_hello_and_room_members_are_logged_on_close(self):
        """
        A connection that never registers is logged once, when it closes; a
        room member's disconnection names the room.
        """
        with capturedLogs() as events:
            # It does not answer the ping that times its dialect either, so
            # it closes before it is welcomed as a JSON client for silence.
            silent = self.net.client(answer_pings=False)
            self.net.flush()
            carol = self.net.hello("carol")
            carol.send_text("ROOM r1")
            self.net.flush()
            self.close_all(silent, carol)
        ours = [
            formatEvent(e) for e in events if e.get("log_namespace", "").startswith("signalling")
        ]
        closed = [line for line in ours if line.startswith("connection from ")]
        self.assertEqual(len(closed), 1, ours)
        self.assertRegex(closed[0], r"^connection from \S+ closed \(code 1000, closed by the peer\)$")
        self.assertTrue(
            any(
                re.match(r"^peer carol at \S+ disconnected \(code 1000, closed by the peer\), leaving room r1$", line)
                for line in ours
            ),
            ours,
        )

    def test_relaying_logs_nothing(self):
        """The relay path emits no log event at all."""
        a, b = self.net.hello("a"), self.net.hello("b")
        a.send_text("SESSION b")
        self.net.flush()
        with capturedLogs() as events:
            for i in range(50):
                a.send_text(f"m{i}")
                b.send_text(f"n{i}")
            self.net.flush()
        ours = [e for e in events if e.get("log_namespace", "").startswith("signalling")]
        self.assertEqual(ours, [])
        self.close_all(a, b)


class BytesLevelTests(unittest.TestCase):
    """The handshake and first frames, byte for byte, over a StringTransport."""

    def test_handshake_and_hello_over_a_string_transport(self):
        """A raw upgrade gets 101; a masked HELLO frame gets an unmasked HELLO."""
        net = Loopback(self)
        proto = net.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        key = base64.b64encode(os.urandom(16))
        proto.dataReceived(
            b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        head = transport.value()
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head[:40])
        transport.clear()
        payload = b"HELLO raw"
        mask = os.urandom(4)
        masked = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        proto.dataReceived(struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + masked)
        self.assertEqual(transport.value(), b"\x81\x05HELLO")
        self.assertEqual(net.registry.peer_count, 1)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(net.registry.is_empty())


def masked_frame(payload, opcode=0x1):
    """:returns: one unfragmented client frame (masked) carrying ``payload``."""
    mask = os.urandom(4)
    masked = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
    if len(payload) < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload))
    else:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, len(payload))
    return header + mask + masked


class _CountingTransport(StringTransport):
    """A StringTransport that keeps every write apart."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, data):
        self.writes.append(data)
        super().write(data)


_UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def _open(test, factory, uid=None):
    """
    A connection of ``factory`` over a :class:`_CountingTransport`, past the
    opening handshake (and registered as ``uid``, if given), closed at the
    end of ``test``; its transport is cleared.

    :returns: the protocol and its transport.
    """
    proto = factory.buildProtocol(None)
    transport = _CountingTransport()
    proto.makeConnection(transport)
    proto.dataReceived(_UPGRADE)
    if uid is not None:
        proto.dataReceived(masked_frame(f"HELLO {uid}".encode()))
    # A turn's time (real time) spent: the rest in the next turn, on the test's clock.
    while proto._next_turn_call is not None:
        factory.clock.advance(0)
    test.addCleanup(lambda: proto.transport and proto.connectionLost(Failure(ConnectionDone())))
    transport.clear()
    del transport.writes[:]
    return proto, transport


class RelayBatchingTests(unittest.TestCase):
    """Frames read together are relayed to the partner in one write."""

    def setUp(self):
        self.net = Loopback(self)
        self.peers = {}
        for uid in ("alice", "bob"):
            self.peers[uid] = _open(self, self.net.factory, uid)
        alice, _ = self.peers["alice"]
        alice.dataReceived(masked_frame(b"SESSION bob"))
        for _, transport in self.peers.values():
            transport.clear()
            del transport.writes[:]

    def test_a_burst_is_one_write_in_order(self):
        """
        Text and binary frames of one read reach the partner in order, in
        one write, each counted once.
        """
        alice, _ = self.peers["alice"]
        bob, bob_transport = self.peers["bob"]
        before = self.net.factory.stats.session_messages
        frames_before = bob.trafficStats.outgoingWebSocketFrames
        big = b"x" * 300
        alice.dataReceived(
            masked_frame(b"one") + masked_frame(b"\x00\x01", opcode=0x2) + masked_frame(big)
        )
        self.assertEqual(
            bob_transport.writes,
            [b"\x81\x03one" + b"\x82\x02\x00\x01" + b"\x81\x7e\x01\x2c" + big],
        )
        self.assertEqual(self.net.factory.stats.session_messages - before, 3)
        self.assertEqual(bob.trafficStats.outgoingWebSocketFrames - frames_before, 3)

    def test_a_frame_left_to_autobahn_ends_the_batch_first(self):
        """
        A ping in the middle of a burst: what came before it is handed on
        before Autobahn handles the ping, and order holds; the partner gets
        it all in one write once the burst is handled.
        """
        alice, alice_transport = self.peers["alice"]
        bob, bob_transport = self.peers["bob"]
        alice.dataReceived(
            masked_frame(b"a") + masked_frame(b"b") + masked_frame(b"p", opcode=0x9)
            + masked_frame(b"c")
        )  # fmt: skip
        self.assertEqual(bob_transport.value(), b"\x81\x01a\x81\x01b\x81\x01c")
        self.assertEqual(bob_transport.writes, [b"\x81\x01a\x81\x01b\x81\x01c"])
        self.assertIn(b"\x8a\x01p", alice_transport.value())


# Every behaviour class again: over Autobahn's own WebSocket paths
# (``fast_path=False``), and over the reordering backend with
# :data:`tests.backends.SEEDS` seeds.
globals().update(
    backends.variants(
        [
            RegistrationTests,
            SessionTests,
            RoomTests,
            LimitsTests,
            KeepaliveTests,
            HelloTimeoutTests,
            LoggingTests,
        ],
        __name__,
    )
)


class BackpressureTests(unittest.TestCase):
    """
    A peer that does not read what is sent to it: its transport tells the
    server (it pauses the connection's output guard), and the server stops
    reading from it and from its session partner, or, when many send to it
    (a room), closes it with 1008 past the output bound.
    """

    def connect(self, uid):
        return _open(self, self.factory, uid)

    def setUp(self):
        self.net = Loopback(self, max_output=10_000)
        self.factory = self.net.factory

    def test_a_partner_that_does_not_read_holds_the_sender_back_until_it_drains(self):
        """
        In a session, the receiver's full output pauses reading from the
        receiver and from the sender; once it drains, both read again.
        """
        alice, alice_transport = self.connect("alice")
        bob, bob_transport = self.connect("bob")
        alice.dataReceived(masked_frame(b"SESSION bob"))
        self.assertEqual(alice_transport.producerState, "producing")
        bob_transport.producer.pauseProducing()
        self.assertEqual(bob_transport.producerState, "paused")
        self.assertEqual(alice_transport.producerState, "paused")
        bob_transport.producer.resumeProducing()
        self.assertEqual(bob_transport.producerState, "producing")
        self.assertEqual(alice_transport.producerState, "producing")

    def test_a_sender_held_back_by_two_reasons_reads_again_when_both_are_gone(self):
        """The sender's own full output and its partner's each hold it; both must clear."""
        alice, alice_transport = self.connect("alice")
        bob, bob_transport = self.connect("bob")
        alice.dataReceived(masked_frame(b"SESSION bob"))
        bob_transport.producer.pauseProducing()
        alice_transport.producer.pauseProducing()
        bob_transport.producer.resumeProducing()
        self.assertEqual(alice_transport.producerState, "paused")
        alice_transport.producer.resumeProducing()
        self.assertEqual(alice_transport.producerState, "producing")

    def test_when_a_slow_reader_goes_its_partner_is_read_again(self):
        """A connection that held its partner back lets go of it when it closes."""
        alice, alice_transport = self.connect("alice")
        bob, bob_transport = self.connect("bob")
        alice.dataReceived(masked_frame(b"SESSION bob"))
        bob_transport.producer.pauseProducing()
        bob.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(alice_transport.producerState, "producing")

    def test_when_the_server_closes_a_slow_reader_its_partner_is_read_again(self):
        """
        A connection the server closes for its own reasons (here: replaced
        by a new connection for its uid) while it held its partner back lets
        go of the partner at once, as one that closes by itself does.
        """
        alice, alice_transport = self.connect("alice")
        bob, bob_transport = self.connect("bob")
        alice.dataReceived(masked_frame(b"SESSION bob"))
        bob_transport.producer.pauseProducing()
        self.assertEqual(alice_transport.producerState, "paused")
        bob.connection.replaced()
        self.assertEqual(alice_transport.producerState, "producing")

    def test_a_room_member_that_does_not_read_is_closed_past_the_output_bound(self):
        """
        In a room, a member whose unread output passes ``max_output`` is
        closed with 1008 and the others hear ``ROOM_PEER_LEFT``; the senders
        are not held back.
        """
        members = {uid: self.connect(uid) for uid in ("a", "b", "c")}
        for uid, (proto, _) in members.items():
            proto.dataReceived(masked_frame(b"ROOM r"))
        for _, transport in members.values():
            transport.clear()
        (a, a_transport), (b, b_transport), (c, c_transport) = members.values()
        c_transport.producer.pauseProducing()
        self.assertEqual(c_transport.producerState, "paused")
        message = masked_frame(b"ROOM_PEER_MSG c " + b"x" * 1000)
        for _ in range(12):
            a.dataReceived(message)
        self.assertEqual(a_transport.producerState, "producing")
        self.assertIn(b"\x88", c_transport.value())
        self.assertIn(struct.pack("!H", 1008) + b"too slow to read", c_transport.value())
        self.assertIn(b"ROOM_PEER_LEFT c", b_transport.value())
        self.assertEqual(self.net.registry.room_members("a"), ["b"])

    def test_a_peer_not_reading_its_own_replies_is_not_read_either(self):
        """A peer whose replies pile up is not read until it reads them."""
        a, a_transport = self.connect("a")
        a_transport.producer.pauseProducing()
        self.assertEqual(a_transport.producerState, "paused")
        a_transport.producer.resumeProducing()
        self.assertEqual(a_transport.producerState, "producing")


class RateLimitTests(unittest.TestCase):
    """Commands past the connection's rate are refused, then the connection closed."""

    def test_commands_past_the_burst_are_refused_until_tokens_come_back(self):
        """
        With a burst of 5 and 10 a second: the sixth command at once gets
        ERROR rate limit exceeded and changes nothing; a tenth of a second
        later one more is handled.
        """
        net = Loopback(self, command_rate=10.0, command_burst=5)
        a = net.hello("a")  # one token
        for _ in range(4):
            a.send_text("PROBE")
        a.send_text("ROOM r")
        net.flush()
        self.assertEqual(
            a.drain(), ["ERROR unknown command 'PROBE'"] * 4 + ["ERROR rate limit exceeded"]
        )
        self.assertEqual(net.registry.room_count, 0)
        net.clock.advance(0.1)
        a.send_text("ROOM r")
        net.flush()
        self.assertEqual(a.drain(), ["ROOM_OK "])
        a.sendClose(1000)
        net.flush()
        self.assertTrue(net.registry.is_empty())

    def test_going_on_past_the_limit_closes_the_connection_with_1008(self):
        """After RATE_STRIKES refusals in a row the connection is closed with 1008."""
        net = Loopback(self, command_rate=1.0, command_burst=2)
        a = net.hello("a")
        for _ in range(2 + RATE_STRIKES + 1):
            a.send_text("PROBE")
        net.flush()
        received = a.drain()
        self.assertEqual(received[:1], ["ERROR unknown command 'PROBE'"])
        self.assertEqual(received[1:], ["ERROR rate limit exceeded"] * RATE_STRIKES)
        self.assertEqual((a.close_info[1], a.remoteCloseReason), (1008, "rate limit exceeded"))
        self.assertTrue(net.registry.is_empty())


class FairnessTests(unittest.TestCase):
    """One connection's input does not hold the reactor for more than a turn's worth."""

    def test_a_flood_of_frames_is_handled_a_turn_at_a_time(self):
        """
        A thousand pings in one read: the connection answers what
        ``TURN_STEPS`` allows (two steps a control frame), stops reading and
        goes on in the next turn of the reactor, until every one is
        answered, in order.
        """
        # Turns end after TURN_STEPS steps or TURN_SECONDS of wall-clock
        # time: here only the steps, so that a loaded machine changes nothing.
        self.patch(websocket, "TURN_SECONDS", 3600.0)
        net = Loopback(self)
        proto, transport = _open(self, net.factory)
        pings = b"".join(masked_frame(b"%04d" % i, opcode=0x9) for i in range(1000))
        proto.dataReceived(pings)
        pongs = transport.value().count(b"\x8a\x04")
        self.assertEqual(pongs, TURN_STEPS // 2)
        self.assertEqual(transport.producerState, "paused")
        answered_at_each_turn = []
        next_turn = proto._next_turn

        def recorded():
            answered_at_each_turn.append(transport.value().count(b"\x8a\x04"))
            next_turn()

        # The second turn was scheduled already; every later one is recorded.
        proto._next_turn = recorded
        net.clock.advance(0)
        per_turn = TURN_STEPS // 2
        self.assertEqual(
            answered_at_each_turn, list(range(2 * per_turn, 1000, per_turn))
        )
        self.assertEqual(transport.producerState, "producing")
        expected = b"".join(b"\x8a\x04" + b"%04d" % i for i in range(1000))
        self.assertEqual(transport.value(), expected)


class CloseFrameTests(unittest.TestCase):
    """
    A close frame the fast layer takes itself ends the connection exactly
    as Autobahn's own paths end it: the same bytes on the wire, the same
    close code and reason, each kind of close frame.
    """

    FRAMES = [
        ("no payload", masked_frame(b"", opcode=0x8)),
        ("1000", masked_frame(b"\x03\xe8", opcode=0x8)),
        ("1000 and a reason", masked_frame(b"\x03\xe8bye", opcode=0x8)),
        ("4000 and a UTF-8 reason", masked_frame(b"\x0f\xa0" + "schöne Grüße".encode(), opcode=0x8)),
        ("a reason that is not UTF-8", masked_frame(b"\x03\xe8\xff\xfe", opcode=0x8)),
        ("an invalid code", masked_frame(b"\x03\xe7", opcode=0x8)),
        ("a reserved code", masked_frame(b"\x03\xed", opcode=0x8)),
        ("a one-byte payload", masked_frame(b"\x03", opcode=0x8)),
        ("unmasked", struct.pack("!BB", 0x88, 2) + b"\x03\xe8"),
        ("after messages in the same read", masked_frame(b"SESSION nobody") + masked_frame(b"\x03\xe8", opcode=0x8)),
        ("in two reads", masked_frame(b"\x03\xe8bye", opcode=0x8)[:5]),
    ]

    def close_with(self, fast_path, data):
        net = Loopback(self, fast_path=fast_path)
        proto, transport = _open(self, net.factory, "alice")
        proto.dataReceived(data)
        # A loaded machine can spend a turn's time (TURN_SECONDS, real time)
        # before the close frame: the rest waits for the next turn, which is
        # on this test's clock.
        while proto._next_turn_call is not None:
            net.clock.advance(0)
        return (
            transport.value(),
            proto.state,
            proto.remoteCloseCode,
            proto.remoteCloseReason,
            proto.localCloseCode,
            proto.wasClean,
        )

    def test_every_kind_of_close_frame_ends_as_on_autobahns_paths(self):
        """The fast layer and Autobahn's own paths answer each close frame alike."""
        for name, data in self.FRAMES:
            self.assertEqual(self.close_with(True, data), self.close_with(False, data), name)

    def test_every_kind_of_close_frame_ends_alike_when_each_turn_ends_at_once(self):
        """
        The same on a machine so loaded that every turn's time is spent after
        one step (the time limit is real time: this failed now and then).
        """
        self.patch(websocket, "TURN_SECONDS", -1.0)
        self.test_every_kind_of_close_frame_ends_as_on_autobahns_paths()

    def test_the_fast_layer_takes_a_close_frame_itself(self):
        """A well-formed close frame does not go through Autobahn's frame parser."""
        net = Loopback(self)
        proto, transport = _open(self, net.factory, "alice")
        parsed = []
        self.patch(websocket.WebSocketServerProtocol, "processData", lambda p: parsed.append(p))
        proto.dataReceived(masked_frame(b"\x03\xe8", opcode=0x8))
        self.assertEqual(parsed, [])
        self.assertEqual(proto.remoteCloseCode, 1000)
        self.assertTrue(transport.value().startswith(b"\x88\x02\x03\xe8"))
class PongFrameTests(unittest.TestCase):
    """
    A pong the fast layer takes itself (the dialect ping's, a probe's) is
    handled exactly as on Autobahn's own paths; a keepalive ping's pong is
    left to Autobahn.
    """

    def opened(self, fast_path):
        """:returns: a connection of an auto port past its handshake, silent, and its transport."""
        net = Loopback(self, fast_path=fast_path)
        proto = net.factory.buildProtocol(None)
        transport = _CountingTransport()
        proto.makeConnection(transport)
        self.addCleanup(lambda: proto.transport and proto.connectionLost(Failure(ConnectionDone())))
        proto.dataReceived(_UPGRADE)
        return net, proto, transport

    def after(self, fast_path, data):
        net, proto, transport = self.opened(fast_path)
        transport.clear()
        proto.dataReceived(data)
        while proto._next_turn_call is not None:
            net.clock.advance(0)
        choosing = proto._choosing
        return transport.value(), proto.state, choosing.args if choosing is not None else None

    def test_pongs_end_as_on_autobahns_paths(self):
        """The dialect pong (its round trip taken), another pong, a pong then HELLO."""
        for name, data, args in [
            ("the dialect pong", masked_frame(b"dialect?", opcode=0xA), (0, None)),
            ("another pong", masked_frame(b"other", opcode=0xA), None),
            ("an empty pong", masked_frame(b"", opcode=0xA), None),
            ("a pong then HELLO", masked_frame(b"dialect?", opcode=0xA) + masked_frame(b"HELLO p"), "hello"),
        ]:
            fast, plain = self.after(True, data), self.after(False, data)
            self.assertEqual(fast, plain, name)
            if args == "hello":
                self.assertEqual(fast[0], b"\x81\x05HELLO", name)
            elif args is not None:
                self.assertEqual(fast[2], args, name)
            else:
                self.assertNotEqual(fast[2][1], None, name)

    def test_the_fast_layer_takes_a_pong_itself(self):
        """A pong does not go through Autobahn's frame parser."""
        net, proto, transport = self.opened(True)
        parsed = []
        self.patch(websocket.WebSocketServerProtocol, "processData", lambda p: parsed.append(p))
        proto.dataReceived(masked_frame(b"dialect?", opcode=0xA))
        self.assertEqual((parsed, proto._choosing.args), ([], (0, None)))

    def test_a_keepalive_pong_is_left_to_autobahn(self):
        """While a keepalive ping waits for its pong, Autobahn matches it."""
        for fast_path in (True, False):
            net, proto, transport = self.opened(fast_path)
            proto.dataReceived(masked_frame(b"HELLO kept"))
            proto._sendAutoPing()
            pending = proto.autoPingPending
            self.assertIsNotNone(pending)
            proto.dataReceived(masked_frame(pending, opcode=0xA))
            self.assertIsNone(proto.autoPingPending)
            self.assertIsNotNone(proto.autoPingPendingCall)




def _opened_offering_compression(factory):
    """:returns: the compression callback a new connection of ``factory`` reads, after opening one that offers compression."""
    proto = factory.buildProtocol(None)
    transport = _CountingTransport()
    proto.makeConnection(transport)
    proto.dataReceived(PLAIN_UPGRADES["a browser"])
    assert transport.writes[0].startswith(b"HTTP/1.1 101 "), transport.writes[0]
    assert proto.websocket_extensions_in_use == []
    proto.connectionLost(Failure(ConnectionDone()))
    return proto.perMessageCompressionAccept


class ProtocolOptionsTests(unittest.TestCase):
    """
    Autobahn's options reach each connection as class attributes of the
    class the factory builds its connections from, with the factory's
    values when it was made: none in the connection's own dictionary.
    """

    def test_each_connection_sees_the_options_set_before_it_was_made(self):
        net = Loopback(self)
        factory = net.factory
        first, _ = _open(self, factory, "first")
        self.assertEqual(first.maxMessagePayloadSize, factory.maxMessagePayloadSize)
        self.assertEqual(first.openHandshakeTimeout, factory.openHandshakeTimeout)
        self.assertIsInstance(first, factory.protocol)
        self.assertEqual(type(first).__name__, factory.protocol.__name__)
        self.assertNotIn("maxMessagePayloadSize", first.__dict__)
        self.assertIn("maxMessagePayloadSize", type(first).__dict__)
        factory.setProtocolOptions(maxMessagePayloadSize=100)
        second, _ = _open(self, factory, "second")
        self.assertEqual(second.maxMessagePayloadSize, 100)
        # Connections made before keep theirs, as with Autobahn's copies.
        self.assertEqual(first.maxMessagePayloadSize, factory.settings.max_message)
        # The new value is the connection's bound.
        second.dataReceived(masked_frame(b"ROOM_PEER_MSG first " + b"x" * 200))
        self.assertEqual(second.localCloseCode, 1009)
        # A new protocol class gets its own built class.
        class Other(type(factory).protocol):
            pass

        factory.protocol = Other
        third, _ = _open(self, factory, "third")
        self.assertIsInstance(third, Other)
        self.assertEqual(third.maxMessagePayloadSize, 100)
        # An option set on the factory itself counts too.
        # An option that is a function is read as it is, not bound to the
        # connection: a browser's offer of compression is refused, and the
        # connection opened.
        self.assertIs(_opened_offering_compression(factory), factory.perMessageCompressionAccept)
        before = factory.openHandshakeTimeout
        factory.openHandshakeTimeout = before + 3
        fourth, _ = _open(self, factory, "fourth")
        self.assertEqual(fourth.openHandshakeTimeout, before + 3)
        self.assertEqual(third.openHandshakeTimeout, before)


def _head(*lines, target=b"/", request_line=None):
    """:returns: a request head of ``lines`` (bytes, without line ends)."""
    first = request_line if request_line is not None else b"GET " + target + b" HTTP/1.1"
    return b"\r\n".join((first,) + lines) + b"\r\n\r\n"


_KEY_LINE = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="
_BASE = (b"Host: localhost", b"Upgrade: websocket", b"Connection: Upgrade", _KEY_LINE, b"Sec-WebSocket-Version: 13")
_BROWSER = (
    b"Host: localhost:8443",
    b"Connection: Upgrade",
    b"Pragma: no-cache",
    b"Cache-Control: no-cache",
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
    b"Upgrade: websocket",
    b"Origin: http://localhost:8443",
    b"Sec-WebSocket-Version: 13",
    b"Accept-Encoding: gzip, deflate, br",
    b"Accept-Language: en-GB,en;q=0.9",
    b"Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==",
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
)

#: Requests the fast handshake takes.
PLAIN_UPGRADES = {
    "the examples' client": _head(*_BASE),
    "a browser": _head(*_BROWSER),
    "a query and a path": _head(*_BASE, target=b"/examples?token=abc%20d&x=1&x=2&empty="),
    "headers in other cases": _head(
        b"HOST: localhost", b"upgrade: WebSocket", b"connection: keep-alive, Upgrade",
        b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==", b"SEC-WEBSOCKET-VERSION: 13",
    ),
    "an IPv6 host with a port": _head(b"Host: [::1]:8443", *_BASE[1:]),
    "an IPv6 host": _head(b"Host: [::1]", *_BASE[1:]),
    "a bearer token": _head(*_BASE, b"Authorization: Bearer abc.def"),
    "an empty header and tabs": _head(*_BASE, b"X-Empty:", b"X-Tabs:\t one two \t"),
    "extensions with quoted values": _head(*_BASE, b'Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits="10", x-other'),
}

#: Requests it leaves to Autobahn's handshake (which accepts or refuses them).
OTHER_REQUESTS = {
    "two hosts": _head(b"Host: a", *_BASE),
    "no host": _head(*_BASE[1:]),
    "version 8": _head(*_BASE[:4], b"Sec-WebSocket-Version: 8"),
    "version with a space inside": _head(*_BASE[:4], b"Sec-WebSocket-Version: 1 3"),
    "a short key": _head(*_BASE[:3], b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=", *_BASE[4:]),
    "a key out of base64": _head(*_BASE[:3], b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j*Q==", *_BASE[4:]),
    "a fragment": _head(*_BASE, target=b"/#frag"),
    "parameters": _head(*_BASE, target=b"/a;b?c=d"),
    "a scheme-relative target": _head(*_BASE, target=b"//evil/path"),
    "an absolute target": _head(*_BASE, target=b"http://localhost/"),
    "POST": _head(*_BASE, request_line=b"POST / HTTP/1.1"),
    "HTTP/1.0": _head(*_BASE, request_line=b"GET / HTTP/1.0"),
    "two spaces in the request line": _head(*_BASE, request_line=b"GET  / HTTP/1.1"),
    "lower-case get": _head(*_BASE, request_line=b"get / HTTP/1.1"),
    "an origin without a host": _head(*_BASE, b"Origin: http://"),
    "an origin with a bad port": _head(*_BASE, b"Origin: http://a:99999"),
    "subprotocols": _head(*_BASE, b"Sec-WebSocket-Protocol: a, b"),
    "duplicate subprotocols": _head(*_BASE, b"Sec-WebSocket-Protocol: a, a"),
    "an obsolete line fold": _head(*_BASE, b"X-Folded: one", b" two"),
    "Latin-1 in a value": _head(*_BASE, "X-Name: caf\u00e9".encode("latin-1")),
    "a host with a bad port": _head(b"Host: localhost:abc", *_BASE[1:]),
    "no upgrade in Connection": _head(*_BASE[:2], b"Connection: keep-alive", *_BASE[3:]),
    "another upgrade": _head(_BASE[0], b"Upgrade: h2c", *_BASE[2:]),
    "a header name with a space": _head(*_BASE, b"Bad Name: x"),
    "a value with a control character": _head(*_BASE, b"X-Bell: a\x07b"),
    "a null origin": _head(*_BASE, b"Origin: null"),
    "a file origin": _head(*_BASE, b"Origin: file://"),
}


class PlainUpgradeTests(unittest.TestCase):
    """
    The fast handshake (``FastServerProtocol._plain_upgrade``) takes the
    requests every known client sends and leaves the rest to Autobahn's;
    either way a connection ends up as Autobahn's handshake alone would
    leave it: the same bytes written, the same request handed to
    ``onConnect``, the same state, the same attributes.
    """

    def connect(self, request, fast, busy=0, **options):
        """
        :param busy: connections the factory holds already.
        :param options: Autobahn options to set on the factory.
        """
        net = Loopback(self)
        if options:
            net.factory.setProtocolOptions(**options)
        net.factory.countConnections += busy
        proto = net.factory.buildProtocol(None)
        taken = []
        plain_upgrade = proto._plain_upgrade
        if fast:
            proto._plain_upgrade = lambda end: taken.append(plain_upgrade(end)) or taken[-1]
        else:
            proto._plain_upgrade = lambda end: taken.append(False) or False
        requests = []
        on_connect = proto.onConnect

        def recording(request):
            requests.append(
                {
                    name: getattr(request, name)
                    for name in (
                        "peer", "headers", "host", "path", "params", "version",
                        "origin", "protocols", "extensions",
                    )
                }
            )
            return on_connect(request)

        proto.onConnect = recording
        transport = _CountingTransport()
        proto.makeConnection(transport)
        proto.dataReceived(request + masked_frame(b"HELLO peer"))
        while proto._next_turn_call is not None:
            net.clock.advance(0)
        self.addCleanup(lambda: proto.transport and proto.connectionLost(Failure(ConnectionDone())))
        seen = {
            "writes": transport.writes,
            "requests": requests,
            "state": proto.state,
            "disconnecting": transport.disconnecting,
            "reason": proto.wasNotCleanReason,
            "peers": net.registry.peer_count,
        }
        for name in (
            "http_status_line", "http_headers", "http_request_uri", "http_request_path",
            "http_request_params", "http_request_host", "websocket_version",
            "websocket_protocols", "websocket_origin", "websocket_extensions", "peer",
        ):
            seen[name] = proto.__dict__.get(name, "(not set)")
        return taken, seen

    def check(self, requests, fast_expected, busy=0, **options):
        for name, request in requests.items():
            taken, fast = self.connect(request, True, busy, **options)
            _, autobahn = self.connect(request, False, busy, **options)
            self.assertEqual(taken, [fast_expected], name)
            self.assertEqual(fast, autobahn, name)

    def test_the_requests_of_known_clients_take_the_fast_handshake(self):
        self.check(PLAIN_UPGRADES, True)
        _, seen = self.connect(PLAIN_UPGRADES["a browser"], True)
        self.assertTrue(seen["writes"][0].startswith(b"HTTP/1.1 101 "))
        self.assertEqual(seen["peers"], 1)
        _, seen = self.connect(PLAIN_UPGRADES["a query and a path"], True)
        self.assertEqual(
            seen["requests"][0]["params"], {"token": ["abc d"], "x": ["1", "2"]}
        )

    def test_other_requests_are_autobahns_to_accept_or_refuse(self):
        self.check(OTHER_REQUESTS, False)
        refused = [
            name for name, request in OTHER_REQUESTS.items()
            if not self.connect(request, True)[1]["writes"][0].startswith(b"HTTP/1.1 101 ")
        ]
        self.assertIn("two hosts", refused)
        self.assertIn("a fragment", refused)
        self.assertNotIn("subprotocols", refused)
        self.assertNotIn("Latin-1 in a value", refused)

    def test_a_forwarded_address_is_autobahns_to_take_behind_a_trusted_proxy(self):
        forwarded = {"forwarded": _head(*_BASE, b"X-Forwarded-For: 203.0.113.9")}
        self.check(forwarded, True)
        self.check(forwarded, False, trustXForwardedFor=1)

    def test_a_full_server_is_autobahns_to_refuse(self):
        full = {"full": PLAIN_UPGRADES["the examples' client"]}
        self.check(full, True, busy=1, maxConnections=2)
        self.check(full, False, busy=2, maxConnections=2)
        _, seen = self.connect(full["full"], True, busy=2, maxConnections=2)
        self.assertTrue(seen["writes"][0].startswith(b"HTTP/1.1 503 "), seen["writes"][0])

    def test_mutated_requests_end_alike_either_way(self):
        """
        600 requests made from the ones above by random edits (a byte
        inserted, removed or changed in case, a line repeated or two
        swapped): each ends as Autobahn's handshake alone would end it.
        """
        rng = random.Random(21)
        seeds = list(PLAIN_UPGRADES.values()) + list(OTHER_REQUESTS.values())
        inserts = [b" ", b"\t", b":", b",", b"#", b";", b"/", b"?", b"=", b"\x00", b"\x7f", b"\xe9", b"\r\n", b"\n", b"\r"]
        taken = 0
        for index in range(600):
            head = bytearray(rng.choice(seeds)[:-4])
            for _ in range(rng.randint(1, 3)):
                edit = rng.randrange(5)
                at = rng.randrange(len(head))
                if edit == 0:
                    head[at:at] = rng.choice(inserts)
                elif edit == 1:
                    del head[at]
                elif edit == 2:
                    head[at:at + 1] = bytes(head[at:at + 1]).swapcase()
                else:
                    lines = bytes(head).split(b"\r\n")
                    i, j = rng.randrange(1, len(lines)), rng.randrange(1, len(lines))
                    if edit == 3:
                        lines.insert(j, lines[i])
                    else:
                        lines[i], lines[j] = lines[j], lines[i]
                    head = bytearray(b"\r\n".join(lines))
            request = bytes(head) + b"\r\n\r\n"
            fast_taken, fast = self.connect(request, True)
            _, autobahn = self.connect(request, False)
            self.assertEqual(fast, autobahn, request)
            taken += fast_taken[0] if fast_taken else 0
        # Some edits leave a request the fast handshake takes (44 of these).
        self.assertGreater(taken, 30)

    def test_a_refusal_or_an_error_of_onconnect_is_answered_alike(self):
        request = PLAIN_UPGRADES["the examples' client"]
        from autobahn.websocket.types import ConnectionDeny

        def deny(self, request):
            raise ConnectionDeny(403, "not from here")

        def fail(self, request):
            raise RuntimeError("broken")

        for name, on_connect in (("refused", deny), ("failed", fail)):
            self.patch(websocket.FastServerProtocol, "onConnect", on_connect)
            taken, fast = self.connect(request, True)
            _, autobahn = self.connect(request, False)
            self.assertEqual(taken, [True], name)
            self.assertEqual(fast, autobahn, name)
            self.assertEqual(fast["peers"], 0, name)
        self.assertTrue(fast["writes"][0].startswith(b"HTTP/1.1 500 Internal server error: broken"))
        self.flushLoggedErrors(RuntimeError)

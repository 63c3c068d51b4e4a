"""
Tests of the ``signalling-client`` tool (:mod:`signalling.tools.client`).

From fast to slow: the command line; the :class:`ClientSession` state machine
with a fake connection; a :class:`ClientRun` talking to the real server
protocol in memory (``iosim``); and the client as a real process against a
real server listening on a loopback port, over plaintext and TLS.
"""

import io
import os
import sys

import txaio
from OpenSSL import SSL
from twisted.internet import defer, endpoints, error, protocol, reactor, task
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial import unittest
from zope.interface import implementer

from signalling.tools import client
from signalling.tools.client import (
    CALL,
    EXIT_CLOSED,
    EXIT_CONNECT,
    EXIT_GAVE_UP,
    EXIT_OK,
    EXIT_SERVER_ERROR,
    EXIT_TLS,
    ROOM,
    WAIT,
    ClientRun,
    ClientSession,
    Outcome,
)
from signalling.core.registry import Registry
from signalling.server.web import with_pages
from tests.certificates import write_certificate
from tests.clients import ClientProcess
from tests.helpers import signalling_factory

#: The directory that holds the ``signalling`` package, for the subprocesses.
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OFFER = client.sample_sdp("offer")
ANSWER = client.sample_sdp("answer")


def parse(*argv):
    """:returns: the options for ``argv``, as :func:`client.parse_args` gives them."""
    return client.parse_args(list(argv))


class ParseArgsTests(unittest.TestCase):
    """The command line of ``signalling-client``."""

    def setUp(self):
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def assertUsageError(self, *argv):
        """Assert that ``argv`` is refused with status 2; :returns: the error text."""
        exc = self.assertRaises(SystemExit, parse, *argv)
        self.assertEqual(exc.code, 2)
        return self.stderr.getvalue()

    def test_defaults_wait_on_localhost_8443_with_tls_and_a_random_uid(self):
        """With no arguments the client waits for a call, over wss://localhost:8443."""
        options = parse()
        self.assertEqual(options.url, "wss://localhost:8443")
        self.assertEqual((options.mode, options.target), (WAIT, None))
        self.assertEqual(
            (options.secure, options.host, options.port), (True, "localhost", 8443)
        )
        self.assertRegex(options.id, r"\Aws-test-client-[0-9a-f]{6}\Z")
        self.assertIsNone(options.trust_root)
        self.assertFalse(options.insecure)
        self.assertIsNone(options.timeout)

    def test_random_uids_differ(self):
        """Two clients started with no --id do not collide."""
        self.assertNotEqual(parse().id, parse().id)

    def test_call_and_room_set_the_mode(self):
        """--call and --room choose the mode and its target."""
        options = parse("--url", "ws://127.0.0.1:8080", "--id", "me", "--call", "you")
        self.assertEqual(
            (options.mode, options.target, options.id), (CALL, "you", "me")
        )
        self.assertEqual((options.secure, options.port), (False, 8080))
        options = parse("--room", "42", "--count", "3", "--duration", "1.5")
        self.assertEqual((options.mode, options.target), (ROOM, "42"))
        self.assertEqual((options.count, options.duration), (3, 1.5))

    def test_call_and_room_exclude_each_other(self):
        """--call and --room together are a usage error."""
        self.assertIn(
            "not allowed", self.assertUsageError("--call", "a", "--room", "b")
        )

    def test_count_and_duration_need_a_room(self):
        """--count and --duration only make sense in a room."""
        self.assertIn("--count needs --room", self.assertUsageError("--count", "2"))
        self.stderr.truncate(0)
        self.assertIn(
            "--duration needs --room",
            self.assertUsageError("--call", "x", "--duration", "2"),
        )

    def test_bad_numbers_are_refused(self):
        """Negative, infinite or non-numbers and a zero timeout are refused."""
        self.assertUsageError("--room", "r", "--count", "-1")
        self.assertUsageError("--room", "r", "--count", "two")
        self.assertUsageError("--room", "r", "--duration", "-0.5")
        self.assertUsageError("--room", "r", "--duration", "nan")
        self.assertUsageError("--room", "r", "--duration", "inf")
        self.assertUsageError("--timeout", "0")

    def test_uids_and_room_ids_are_checked_like_the_server_does(self):
        """Ids with whitespace or control characters, and room 'session', fail."""
        self.assertUsageError("--id", "two words")
        self.assertUsageError("--id", "")
        self.assertUsageError("--call", "tab\there")
        self.assertUsageError("--room", "session")
        self.assertUsageError("--room", "x" * 257)

    def test_only_websocket_urls_are_accepted(self):
        """http:// and Unix socket URLs are refused."""
        self.assertIn("scheme", self.assertUsageError("--url", "http://localhost:8443"))
        self.assertUsageError("--url", "ws://unix:/tmp/socket")

    def test_tls_options_need_a_wss_url(self):
        """--ca-file and --insecure mean nothing over ws://."""
        self.assertIn(
            "--insecure needs a wss:// URL",
            self.assertUsageError("--url", "ws://localhost:1", "--insecure"),
        )

    def test_ca_file_and_insecure_exclude_each_other(self):
        """Trusting a certificate and trusting anything do not mix."""
        self.assertUsageError("--ca-file", "x.pem", "--insecure")

    def test_ca_file_is_loaded(self):
        """--ca-file reads the certificate into a trust root."""
        files = write_certificate(self.mktemp())
        options = parse("--ca-file", files.cert)
        self.assertIsNotNone(options.trust_root)

    def test_unreadable_or_non_pem_ca_file_is_a_usage_error(self):
        """A --ca-file that is missing or holds no certificate gives one clear error."""
        missing = self.mktemp()
        self.assertIn(
            f"cannot read {missing}", self.assertUsageError("--ca-file", missing)
        )
        self.stderr.truncate(0)
        garbage = self.mktemp()
        with open(garbage, "w") as f:
            f.write("not a certificate\n")
        self.assertIn(
            "holds no PEM certificate", self.assertUsageError("--ca-file", garbage)
        )

    def test_help_documents_every_exit_status(self):
        """--help lists each exit status with its meaning."""
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        exc = self.assertRaises(SystemExit, parse, "--help")
        self.assertEqual(exc.code, 0)
        text = stdout.getvalue()
        for code, _ in client.EXIT_CODES:
            self.assertRegex(text, rf"(?m)^  {code}  \S")
        for option in (
            "--url",
            "--id",
            "--call",
            "--room",
            "--count",
            "--duration",
            "--timeout",
            "--ca-file",
            "--insecure",
        ):
            self.assertIn(option, text)

    def test_main_stops_on_a_usage_error_before_connecting(self):
        """main() exits with status 2 on a bad command line."""
        exc = self.assertRaises(SystemExit, client.main, ["--count", "1"])
        self.assertEqual(exc.code, 2)


class FakeConnection:
    """What :class:`ClientSession` talks to: records what is sent and closes."""

    def __init__(self):
        self.sent = []
        self.closed = 0

    def send_text(self, text):
        self.sent.append(text)

    def close(self):
        self.closed += 1

    def take(self):
        """:returns: the messages sent so far, and forgets them."""
        sent, self.sent = self.sent, []
        return sent


class ClientSessionTests(unittest.TestCase):
    """The client's protocol logic, without sockets."""

    def session(self, mode=WAIT, target=None, uid="me", **kwargs):
        """:returns: a :class:`ClientSession` that has sent its HELLO."""
        self.connection = FakeConnection()
        self.lines = []
        self.warnings = []
        self.clock = Clock()
        session = ClientSession(
            uid,
            mode,
            target,
            self.connection,
            self.lines.append,
            self.warnings.append,
            clock=self.clock,
            **kwargs,
        )
        session.connection_opened()
        self.assertEqual(self.connection.take(), [f"HELLO {uid}"])
        return session

    def registered(self, *args, **kwargs):
        """:returns: a :class:`ClientSession` whose HELLO was accepted."""
        session = self.session(*args, **kwargs)
        session.text_received("HELLO")
        return session

    def assertFinished(self, session, code, message=None):
        """Assert the session is over with this outcome and closed its connection."""
        self.assertEqual(session.result, Outcome(code, message))
        self.assertEqual(self.connection.closed, 1)

    def test_sample_sdp_messages_are_one_json_line(self):
        """The test offer and answer follow the protocol's JSON convention."""
        self.assertNotIn("\n", OFFER)
        self.assertEqual(client.sdp_type(OFFER), "offer")
        self.assertEqual(client.sdp_type(ANSWER), "answer")
        for text in ("OFFER_REQUEST", "[]", '{"sdp": "x"}', '{"ice": {}}', "{"):
            self.assertIsNone(client.sdp_type(text), text)

    def test_callee_announces_its_uid_and_answers_an_offer(self):
        """A waiting client prints its uid, answers an offer, and exits 0 at hang-up."""
        session = self.registered()
        self.assertEqual(self.lines, ["Our uid is 'me'"])
        session.text_received(OFFER)
        self.assertEqual(self.connection.take(), [ANSWER])
        self.assertEqual(self.lines[1:], [f"Received: {OFFER}", f"Sent: {ANSWER}"])
        session.text_received('{"ice": {"candidate": "c", "sdpMLineIndex": 0}}')
        self.assertEqual(self.connection.take(), [])
        self.assertIsNone(session.result)
        session.connection_closed(1000, None)
        self.assertEqual(self.lines[-1], "Session ended")
        self.assertFinished(session, EXIT_OK)

    def test_callee_makes_an_offer_on_offer_request(self):
        """OFFER_REQUEST makes the callee send the offer."""
        session = self.registered()
        session.text_received("OFFER_REQUEST")
        self.assertEqual(self.connection.take(), [OFFER])

    def test_callee_relays_an_error_line_as_text(self):
        """In a session, even 'ERROR ...' is the partner's text, not the server's."""
        session = self.registered()
        session.text_received("ERROR from a joker")
        self.assertIsNone(session.result)
        self.assertEqual(self.lines[-1], "Received: ERROR from a joker")

    def test_callee_prints_binary_messages(self):
        """A binary message in a session is shown by size."""
        session = self.registered()
        session.binary_received(b"\x00\x01\x02")
        self.assertEqual(self.lines[-1], "Received: <3 bytes of binary data>")
        self.assertIsNone(session.result)

    def test_callee_fails_when_the_server_goes_away(self):
        """A close other than the hang-up's 1000 is an error."""
        session = self.registered()
        session.connection_closed(1001, "going away")
        self.assertFinished(
            session,
            EXIT_CLOSED,
            "the server closed the connection (code 1001: going away)",
        )

    def test_lost_connection_is_an_error(self):
        """A connection dropped without a close frame is an error."""
        session = self.registered()
        session.connection_closed(1006, "connection was closed uncleanly")
        self.assertFinished(session, EXIT_CLOSED, "the connection was lost")

    def test_refused_hello_is_a_server_error(self):
        """An ERROR in reply to HELLO ends the run with the server's words."""
        session = self.session(uid="taken")
        session.text_received("ERROR peer uid 'taken' is already taken")
        self.assertFinished(
            session,
            EXIT_SERVER_ERROR,
            "the server refused uid 'taken': ERROR peer uid 'taken' is already taken",
        )
        # The server's close that follows changes nothing.
        session.connection_closed(1002, "invalid peer uid")
        self.assertEqual(session.result.code, EXIT_SERVER_ERROR)
        self.assertEqual(self.connection.closed, 1)

    def test_unexpected_reply_to_hello_is_a_protocol_error(self):
        """Anything but HELLO or ERROR in reply to HELLO breaks the protocol."""
        session = self.session()
        session.text_received("HELLO me")
        self.assertFinished(
            session,
            EXIT_CLOSED,
            "unexpected message from the server: 'HELLO me' in reply to HELLO",
        )

    def test_caller_sends_an_offer_and_exits_on_the_answer(self):
        """--call: SESSION, then the offer on SESSION_OK, then exit 0 on the answer."""
        session = self.registered(CALL, "you")
        self.assertEqual(self.connection.take(), ["SESSION you"])
        session.text_received("SESSION_OK")
        self.assertEqual(self.connection.take(), [OFFER])
        ice = '{"ice": {"candidate": "c", "sdpMLineIndex": 0}}'
        session.text_received(ice)
        self.assertIsNone(session.result)
        session.text_received(ANSWER)
        self.assertFinished(session, EXIT_OK)
        self.assertEqual(
            self.lines,
            [
                "Our uid is 'me'",
                "Calling 'you'",
                "Session with 'you' started",
                f"Sent: {OFFER}",
                f"Received: {ice}",
                f"Received: {ANSWER}",
            ],
        )
        # What arrives while closing is ignored.
        session.text_received(ANSWER)
        self.assertEqual(len(self.lines), 6)

    def test_caller_reports_a_refused_session(self):
        """An ERROR in reply to SESSION ends the run with the server's words."""
        session = self.registered(CALL, "nobody")
        session.text_received("ERROR peer 'nobody' not found")
        self.assertFinished(
            session,
            EXIT_SERVER_ERROR,
            "cannot call 'nobody': ERROR peer 'nobody' not found",
        )

    def test_caller_fails_when_the_callee_hangs_up_without_answering(self):
        """The session ending before an answer is an error for the caller."""
        session = self.registered(CALL, "you")
        session.text_received("SESSION_OK")
        session.connection_closed(1000, None)
        self.assertEqual(session.result.code, EXIT_CLOSED)
        self.assertIn("before an answer arrived", session.result.message)

    def test_room_member_greets_members_and_newcomers(self):
        """--room: ROOM, greet each member, greet who joins, print the notices."""
        session = self.registered(ROOM, "lobby")
        self.assertEqual(self.connection.take(), ["ROOM lobby"])
        session.text_received("ROOM_OK a b")
        self.assertEqual(
            self.connection.take(),
            ["ROOM_PEER_MSG a hello from me", "ROOM_PEER_MSG b hello from me"],
        )
        session.text_received("ROOM_PEER_JOINED c")
        self.assertEqual(self.connection.take(), ["ROOM_PEER_MSG c hello from me"])
        session.text_received("ROOM_PEER_MSG a hi  there ")
        session.text_received("ROOM_PEER_LEFT b")
        self.assertIsNone(session.result)
        self.assertEqual(
            self.lines,
            [
                "Our uid is 'me'",
                "Joined room 'lobby'; members: a b",
                "Sent to 'a': hello from me",
                "Sent to 'b': hello from me",
                "Peer 'c' joined",
                "Sent to 'c': hello from me",
                "Message from 'a': hi  there ",
                "Peer 'b' left",
            ],
        )

    def test_first_in_an_empty_room_greets_nobody(self):
        """'ROOM_OK ' (with its one space) is an empty room."""
        session = self.registered(ROOM, "lobby")
        self.connection.take()
        session.text_received("ROOM_OK ")
        self.assertEqual(self.connection.take(), [])
        self.assertEqual(self.lines[-1], "Joined room 'lobby'; no other members")

    def test_room_ok_without_its_space_breaks_the_protocol(self):
        """A bare 'ROOM_OK' is refused: PROTOCOL.md requires the trailing space."""
        session = self.registered(ROOM, "lobby")
        session.text_received("ROOM_OK")
        self.assertEqual(session.result.code, EXIT_CLOSED)

    def test_room_member_leaves_after_count_messages(self):
        """--count N: leave and exit 0 once N messages have arrived."""
        session = self.registered(ROOM, "lobby", count=2)
        session.text_received("ROOM_OK ")
        session.text_received("ROOM_PEER_MSG a one")
        self.assertIsNone(session.result)
        session.text_received("ROOM_PEER_MSG b two")
        self.assertFinished(session, EXIT_OK)
        self.assertEqual(self.lines[-1], "Leaving room 'lobby'")

    def test_count_zero_leaves_right_after_greeting(self):
        """--count 0 greets the members and leaves at once."""
        session = self.registered(ROOM, "lobby", count=0)
        session.text_received("ROOM_OK a")
        self.assertEqual(
            self.connection.take(), ["ROOM lobby", "ROOM_PEER_MSG a hello from me"]
        )
        self.assertFinished(session, EXIT_OK)

    def test_room_member_leaves_after_duration(self):
        """--duration counts from ROOM_OK, then the member leaves with status 0."""
        session = self.registered(ROOM, "lobby", duration=2.0)
        self.clock.advance(5)
        self.assertIsNone(session.result)
        session.text_received("ROOM_OK ")
        self.clock.advance(1.9)
        self.assertIsNone(session.result)
        self.clock.advance(0.1)
        self.assertFinished(session, EXIT_OK)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_finishing_early_cancels_the_duration(self):
        """No timer outlives a session that ended another way."""
        session = self.registered(ROOM, "lobby", duration=2.0, count=1)
        session.text_received("ROOM_OK ")
        session.text_received("ROOM_PEER_MSG a one")
        self.assertEqual(session.result.code, EXIT_OK)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_error_in_a_room_is_a_warning(self):
        """An ERROR for a message to a peer who just left does not end the run."""
        session = self.registered(ROOM, "lobby")
        session.text_received("ROOM_OK a")
        session.text_received("ROOM_PEER_LEFT a")
        session.text_received("ERROR peer 'a' not found")
        self.assertIsNone(session.result)
        self.assertEqual(self.warnings, ["warning: ERROR peer 'a' not found"])

    def test_refused_room_is_a_server_error(self):
        """An ERROR in reply to ROOM ends the run with the server's words."""
        session = self.registered(ROOM, "lobby")
        session.text_received("ERROR invalid room id 'lobby'")
        self.assertFinished(
            session,
            EXIT_SERVER_ERROR,
            "cannot join room 'lobby': ERROR invalid room id 'lobby'",
        )

    def test_unknown_message_in_a_room_breaks_the_protocol(self):
        """The server sends nothing unasked; anything else in a room is an error."""
        session = self.registered(ROOM, "lobby")
        session.text_received("ROOM_OK ")
        session.text_received("SESSION_OK")
        self.assertFinished(
            session, EXIT_CLOSED, "unexpected message from the server: 'SESSION_OK'"
        )

    def test_binary_outside_a_session_breaks_the_protocol(self):
        """Only a session partner may send binary."""
        session = self.registered(ROOM, "lobby")
        session.binary_received(b"x")
        self.assertEqual(session.result.code, EXIT_CLOSED)

    def test_interrupt_ends_waiting_and_rooms_cleanly(self):
        """Ctrl-C is the normal end of waiting and of a room."""
        session = self.registered()
        session.interrupted()
        self.assertFinished(session, EXIT_OK)
        session = self.registered(ROOM, "lobby")
        session.interrupted()
        self.assertFinished(session, EXIT_OK)

    def test_interrupt_fails_an_unanswered_call(self):
        """Ctrl-C before the answer means the call did not succeed."""
        session = self.registered(CALL, "you")
        session.text_received("SESSION_OK")
        session.interrupted()
        self.assertFinished(session, EXIT_GAVE_UP, "interrupted (no answer from 'you')")

    def test_giving_up_says_what_was_missing(self):
        """A timeout names what the client was still waiting for."""
        session = self.session()
        session.give_up("gave up after 3 seconds")
        self.assertFinished(
            session, EXIT_GAVE_UP, "gave up after 3 seconds (no reply to HELLO)"
        )
        session = self.registered(ROOM, "lobby", count=3)
        session.text_received("ROOM_OK ")
        session.text_received("ROOM_PEER_MSG a one")
        session.give_up("gave up")
        self.assertEqual(session.result.message, "gave up (1 of 3 messages arrived)")


@implementer(IStreamClientEndpoint)
class LoopbackEndpoint:
    """
    Connects a client factory to a server factory in memory (``iosim``).

    :ivar pumps: the pumps of every connection made.
    """

    def __init__(self, server_factory, clock):
        self._server_factory = server_factory
        self._clock = clock
        self.pumps = []

    def connect(self, factory):
        server = self._server_factory.buildProtocol(None)
        client_protocol = factory.buildProtocol(None)
        self.pumps.append(
            iosim.connect(
                server,
                iosim.makeFakeServer(server),
                client_protocol,
                iosim.makeFakeClient(client_protocol),
                greet=False,
                clock=self._clock,
            )
        )
        return defer.succeed(client_protocol)


@implementer(IStreamClientEndpoint)
class FailingEndpoint:
    """An endpoint whose connections fail with ``exc``."""

    def __init__(self, exc):
        self._exc = exc

    def connect(self, factory):
        return defer.fail(self._exc)


class ClientRunTests(unittest.TestCase):
    """:class:`ClientRun` against the real server protocol, in memory."""

    def setUp(self):
        self.clock = Clock()
        self.patch(txaio.config, "loop", self.clock)
        self.registry = Registry()
        self.server_factory = signalling_factory(
            self.registry, self.clock, "ws://localhost", keepalive=5
        )
        self.endpoint = LoopbackEndpoint(self.server_factory, self.clock)
        self.output = []
        self.warnings = []

    def run_client(self, *argv, endpoint=None):
        """Start a client run with ``argv``; :returns: the :class:`ClientRun`."""
        options = parse("--url", "ws://localhost:9", *argv)
        run = ClientRun(
            self.clock,
            options,
            endpoint or self.endpoint,
            self.output.append,
            self.warnings.append,
        )
        run.start()
        return run

    def flush(self):
        """Deliver every pending byte on every connection, until quiet."""
        while any(pump.pump() for pump in self.endpoint.pumps):
            pass

    def test_session_between_two_runs(self):
        """A caller and a callee complete a call; both end with status 0."""
        callee = self.run_client("--id", "callee")
        self.flush()
        self.assertEqual(self.output, ["Our uid is 'callee'"])
        caller = self.run_client("--id", "caller", "--call", "callee")
        self.flush()
        self.assertEqual(self.successResultOf(caller.done), Outcome(EXIT_OK))
        self.assertEqual(self.successResultOf(callee.done), Outcome(EXIT_OK))
        self.assertIn(f"Received: {ANSWER}", self.output)
        self.assertIn(f"Received: {OFFER}", self.output)
        self.assertEqual(self.output[-1], "Session ended")
        self.assertTrue(self.registry.is_empty())
        self.assertEqual(self.server_factory.getConnectionCount(), 0)

    def test_refused_uid_ends_the_run_with_one_message(self):
        """A second client with a taken uid fails with status 5 and closes."""
        first = self.run_client("--id", "same")
        self.flush()
        second = self.run_client("--id", "same")
        self.flush()
        outcome = self.successResultOf(second.done)
        self.assertEqual(outcome.code, EXIT_SERVER_ERROR)
        self.assertIn("ERROR peer uid 'same' is already taken", outcome.message)
        self.assertNoResult(first.done)
        first.interrupt()
        self.flush()
        self.assertEqual(self.successResultOf(first.done), Outcome(EXIT_OK))
        self.assertTrue(self.registry.is_empty())

    def test_timeout_gives_up_and_closes(self):
        """--timeout ends a run that is not done with status 7."""
        run = self.run_client("--timeout", "3")
        self.flush()
        self.clock.advance(3)
        self.flush()
        self.assertEqual(
            self.successResultOf(run.done),
            Outcome(EXIT_GAVE_UP, "gave up after 3 seconds (nobody called)"),
        )
        self.assertTrue(self.registry.is_empty())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_refused_is_one_line(self):
        """A refused connection is status 3 naming the URL."""
        run = self.run_client(
            endpoint=FailingEndpoint(error.ConnectionRefusedError("nope"))
        )
        self.assertEqual(
            self.successResultOf(run.done),
            Outcome(
                EXIT_CONNECT, "cannot connect to ws://localhost:9: connection refused"
            ),
        )

    def test_tls_failure_before_opening_is_status_4(self):
        """A TLS error that ends the connection before it opens is status 4."""
        run = ClientRun(
            self.clock,
            parse("--url", "wss://localhost:9"),
            self.endpoint,
            self.output.append,
            self.warnings.append,
        )
        tls_error = SSL.Error([("SSL routines", "", "certificate verify failed")])
        run.closed(1006, None, "SSL error", tls_error, tls_done=False)
        outcome = self.successResultOf(run.done)
        self.assertEqual(outcome.code, EXIT_TLS)
        self.assertTrue(
            outcome.message.startswith(
                "cannot connect to wss://localhost:9: TLS: certificate verify failed"
            ),
            outcome.message,
        )

    def test_tls_handshake_that_never_completes_is_status_4(self):
        """wss:// to a plaintext server (no TLS reply) is reported as a TLS problem."""
        run = ClientRun(
            self.clock,
            parse("--url", "wss://localhost:9"),
            self.endpoint,
            self.output.append,
            self.warnings.append,
        )
        run.closed(
            1006, None, "WebSocket opening handshake timeout", None, tls_done=False
        )
        outcome = self.successResultOf(run.done)
        self.assertEqual(outcome.code, EXIT_TLS)
        self.assertIn("is the server using TLS?", outcome.message)

    def test_websocket_handshake_failure_is_status_3(self):
        """A server that is not a WebSocket server is a connection failure."""
        run = ClientRun(
            self.clock,
            parse("--url", "ws://localhost:9"),
            self.endpoint,
            self.output.append,
            self.warnings.append,
        )
        run.closed(1006, None, "HTTP status line: 404 Not Found", None)
        self.assertEqual(
            self.successResultOf(run.done),
            Outcome(
                EXIT_CONNECT,
                "cannot connect to ws://localhost:9: WebSocket handshake failed: "
                "HTTP status line: 404 Not Found",
            ),
        )

    def test_describe_failures(self):
        """Connection and TLS errors become a few plain words."""
        self.assertEqual(
            client.describe_connect_failure(error.DNSLookupError("x")), "unknown host"
        )
        self.assertEqual(
            client.describe_connect_failure(error.TCPTimedOutError()), "timed out"
        )
        self.assertIsNone(client.describe_tls_failure(ValueError("x"), "h"))
        from service_identity import VerificationError

        self.assertIn(
            "not valid for 'example.org'",
            client.describe_tls_failure(VerificationError([]), "example.org"),
        )


class RealServerMixin:
    """
    A real server on a loopback port, and ``signalling-client`` processes
    talking to it. Subclasses set ``tls``.
    """

    timeout = 20
    tls = False

    def setUp(self):
        self.registry = Registry()
        self.factory = signalling_factory(self.registry, reactor, keepalive=5)
        site = with_pages(self.factory)
        if self.tls:
            self.certificate = write_certificate(self.mktemp())
            description = (
                "ssl:0:interface=127.0.0.1"
                f":privateKey={endpoints.quoteStringArgument(self.certificate.key)}"
                f":certKey={endpoints.quoteStringArgument(self.certificate.cert)}"
            )
        else:
            description = "tcp:0:interface=127.0.0.1"
        d = endpoints.serverFromString(reactor, description).listen(site)
        d.addCallback(self._listening)
        return d

    def _listening(self, port):
        self.port = port
        number = port.getHost().port
        # localhost, the name in the certificate; 127.0.0.1 for plaintext.
        if self.tls:
            self.url = f"wss://localhost:{number}"
        else:
            self.url = f"ws://127.0.0.1:{number}"
        self.addCleanup(self._stop_server)

    @defer.inlineCallbacks
    def _stop_server(self):
        yield self.port.stopListening()
        for _ in range(500):
            if self.factory.getConnectionCount() == 0:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.factory.getConnectionCount(), 0)
        self.assertTrue(
            self.registry.is_empty(),
            f"{self.registry.peer_count} peers, {self.registry.session_count} "
            f"sessions, {self.registry.room_count} rooms left",
        )

    def start_client(self, *args, url=None, tls_args=None):
        """
        Start ``signalling-client`` with ``args``, talking to the test server
        (trusting its certificate unless ``tls_args`` says otherwise).

        :returns: a :class:`ClientProcess`.
        """
        argv = [sys.executable, "-m", "signalling.tools.client", "--url", url or self.url]
        if tls_args is None:
            tls_args = ["--ca-file", self.certificate.cert] if self.tls else []
        argv += tls_args
        argv += ["--timeout", "10"]
        argv += list(args)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [PROJECT_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        process = ClientProcess(argv)
        transport = reactor.spawnProcess(process, sys.executable, argv, env=env)
        self.addCleanup(self._end_process, process, transport)
        return process

    def _end_process(self, process, transport):
        if process.ended.called:
            return None
        transport.signalProcess("KILL")
        return process.ended

    def assertExit(self, process, status):
        """Assert the process ended with ``status``."""
        self.assertEqual(process.status, status, process.report())

    def assertOneErrorLine(self, process, status, start):
        """Assert the process failed with ``status`` and one line ``start...``."""
        self.assertExit(process, status)
        self.assertEqual(len(process.error_lines), 1, process.report())
        self.assertTrue(
            process.error_lines[0].startswith("signalling-client: " + start),
            process.report(),
        )

    @defer.inlineCallbacks
    def test_session_between_two_clients(self):
        """A waiting client and a caller complete a call; both exit 0."""
        callee = self.start_client("--id", "callee-1")
        yield callee.wait_for_line("Our uid is 'callee-1'")
        caller = self.start_client("--id", "caller-1", "--call", "callee-1")
        yield defer.gatherResults([caller.ended, callee.ended])
        self.assertExit(caller, 0)
        self.assertExit(callee, 0)
        self.assertEqual(
            caller.lines,
            [
                "Our uid is 'caller-1'",
                "Calling 'callee-1'",
                "Session with 'callee-1' started",
                f"Sent: {OFFER}",
                f"Received: {ANSWER}",
            ],
        )
        self.assertEqual(
            callee.lines,
            [
                "Our uid is 'callee-1'",
                f"Received: {OFFER}",
                f"Sent: {ANSWER}",
                "Session ended",
            ],
        )
        self.assertEqual((caller.err, callee.err), (b"", b""))


class PlaintextClientTests(RealServerMixin, unittest.TestCase):
    """The client process against a real server over ws://."""

    @defer.inlineCallbacks
    def test_room_of_three(self):
        """Three members each receive the other two's greetings, then leave."""
        members = {}
        # Each joins once the one before is in, so the order is known.
        for uid, joined in [
            ("a", "Joined room 'r1'; no other members"),
            ("b", "Joined room 'r1'; members: a"),
            ("c", "Joined room 'r1'; members: a b"),
        ]:
            members[uid] = self.start_client(
                "--id", uid, "--room", "r1", "--count", "2"
            )
            yield members[uid].wait_for_line(joined)
        yield defer.gatherResults([p.ended for p in members.values()])
        for uid, process in members.items():
            self.assertExit(process, 0)
            self.assertEqual(process.err, b"", process.report())
            received = sorted(
                line for line in process.lines if line.startswith("Message from")
            )
            others = sorted(set(members) - {uid})
            self.assertEqual(
                received,
                [f"Message from '{o}': hello from {o}" for o in others],
                process.report(),
            )
            self.assertEqual(process.lines[-1], "Leaving room 'r1'")
        self.assertIn("Peer 'b' joined", members["a"].lines)
        self.assertIn("Peer 'c' joined", members["a"].lines)
        self.assertIn("Peer 'c' joined", members["b"].lines)

    @defer.inlineCallbacks
    def test_call_of_unknown_uid_is_one_error_line(self):
        """ERROR from the server: one line on stderr and status 5."""
        process = self.start_client("--call", "nobody-here")
        yield process.ended
        self.assertOneErrorLine(
            process,
            EXIT_SERVER_ERROR,
            "cannot call 'nobody-here': ERROR peer 'nobody-here' not found",
        )
        self.assertEqual(process.lines[-1], "Calling 'nobody-here'")

    @defer.inlineCallbacks
    def test_taken_uid_is_one_error_line_and_sigterm_leaves_cleanly(self):
        """A taken --id fails with status 5; SIGTERM ends a waiting client with 0."""
        first = self.start_client("--id", "twin")
        yield first.wait_for_line("Our uid is 'twin'")
        second = self.start_client("--id", "twin")
        yield second.ended
        self.assertOneErrorLine(
            second,
            EXIT_SERVER_ERROR,
            "the server refused uid 'twin': ERROR peer uid 'twin' is already taken",
        )
        self.assertEqual(second.lines, [])
        self.assertEqual(self.registry.peer_count, 1)
        os.kill(first.transport.pid, 15)
        yield first.ended
        self.assertExit(first, 0)
        self.assertEqual(first.lines, ["Our uid is 'twin'"])
        self.assertEqual(first.err, b"")

    @defer.inlineCallbacks
    def test_connection_refused_is_one_error_line(self):
        """No server on the port: one line on stderr and status 3."""
        port = yield endpoints.serverFromString(
            reactor, "tcp:0:interface=127.0.0.1"
        ).listen(protocol.Factory())
        number = port.getHost().port
        yield port.stopListening()
        url = f"ws://127.0.0.1:{number}"
        process = self.start_client("--call", "x", url=url)
        yield process.ended
        self.assertExit(process, EXIT_CONNECT)
        self.assertEqual(
            process.error_lines,
            [f"signalling-client: cannot connect to {url}: connection refused"],
        )
        self.assertEqual(process.lines, [])


class TLSClientTests(RealServerMixin, unittest.TestCase):
    """The client process against a real server over wss:// (self-signed)."""

    tls = True

    @defer.inlineCallbacks
    def test_default_verification_refuses_a_self_signed_certificate(self):
        """Without --ca-file the self-signed certificate fails: one line, status 4."""
        process = self.start_client("--call", "x", tls_args=[])
        yield process.ended
        self.assertOneErrorLine(
            process,
            EXIT_TLS,
            f"cannot connect to {self.url}: TLS: certificate verify failed",
        )
        self.assertIn("--ca-file", process.error_lines[0])
        self.assertEqual(process.lines, [])

    @defer.inlineCallbacks
    def test_insecure_connects_with_a_warning(self):
        """--insecure connects to the self-signed server and warns on stderr."""
        process = self.start_client(
            "--id",
            "careless",
            "--room",
            "lobby",
            "--duration",
            "0",
            tls_args=["--insecure"],
        )
        yield process.ended
        self.assertExit(process, 0)
        self.assertEqual(
            process.lines,
            [
                "Our uid is 'careless'",
                "Joined room 'lobby'; no other members",
                "Leaving room 'lobby'",
            ],
        )
        self.assertEqual(len(process.error_lines), 1, process.report())
        self.assertRegex(
            process.error_lines[0], r"^signalling-client: warning: --insecure"
        )

"""
Tests for signalling.server.logs, the JSON lines observer of ``--log-format json``,
and for what the server logs: events with stable fields (uid, peer_addr,
room_id, callee, code, reason), captured from real sessions on real
loopback ports; payloads never logged without ``--log-payloads``, and
logged (with a warning at start) with it; the peer address behind a proxy
with ``--trust-proxy``.
"""

import io
import json
import math
import sys

from twisted.logger import (
    LogLevel,
    Logger,
    capturedLogs,
    formatEvent,
)
from twisted.logger._legacy import publishToNewObserver
from twisted.python.log import textFromEventDict
from twisted.trial import unittest

from signalling.server import logs
from tests.servers import Server

LOOPBACK = "tcp:0:interface=127.0.0.1"


def strict_loads(line):
    """Parse one line as strict JSON (RFC 8259: no NaN or Infinity)."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


class Unprintable:
    """A value json cannot encode, with a readable str()."""

    def __str__(self):
        return "<unprintable 42>"


class JSONObserverTests(unittest.SynchronousTestCase):
    """One JSON object per line, from twisted.logger events."""

    def setUp(self):
        self.out = io.StringIO()
        self.observer = logs.json_observer(self.out)
        self.log = Logger(namespace="signalling.server.protocol", observer=self.observer)

    def records(self):
        """:returns: every line written so far, each parsed as strict JSON."""
        text = self.out.getvalue()
        self.assertTrue(text.endswith("\n"), text)
        return [strict_loads(line) for line in text.splitlines()]

    def test_an_event_is_one_object_with_time_level_namespace_message_and_fields(self):
        """
        An event becomes one line: one JSON object with ``time`` (the
        event's), ``level``, ``namespace``, the rendered ``message`` and
        each of the event's own fields under its own name.
        """
        self.observer(
            {
                "log_time": 1700000000.25,
                "log_level": LogLevel.info,
                "log_namespace": "signalling.server.protocol",
                "log_format": "peer {uid} registered from {peer_addr}",
                "uid": "alice",
                "peer_addr": "tcp4:127.0.0.1:5555",
            }
        )
        [record] = self.records()
        self.assertEqual(
            record,
            {
                "time": 1700000000.25,
                "level": "info",
                "namespace": "signalling.server.protocol",
                "message": "peer alice registered from tcp4:127.0.0.1:5555",
                "uid": "alice",
                "peer_addr": "tcp4:127.0.0.1:5555",
            },
        )

    def test_every_level_has_its_name(self):
        """Levels are written by name: debug, info, warn, error, critical."""
        self.log.debug("d")
        self.log.info("i")
        self.log.warn("w")
        self.log.error("e")
        self.log.critical("c")
        self.assertEqual(
            [r["level"] for r in self.records()],
            ["debug", "info", "warn", "error", "critical"],
        )

    def test_each_event_is_exactly_one_line(self):
        """
        Line breaks in the message or in a field are escaped, so each
        event is exactly one line however many events are written.
        """
        self.log.info("first\nsecond {reason}", reason="a\nb\r\nc")
        self.log.info("peer {uid} left room {room_id}", uid="bob", room_id="r1")
        first, second = self.records()
        self.assertEqual(first["message"], "first\nsecond a\nb\r\nc")
        self.assertEqual(first["reason"], "a\nb\r\nc")
        self.assertEqual((second["uid"], second["room_id"]), ("bob", "r1"))

    def test_numbers_booleans_and_none_stay_json(self):
        """Close codes stay numbers; booleans and None stay JSON literals."""
        self.log.info(
            "closed (code {code})", code=1001, clean=False, seconds=0.5, uid=None
        )
        [record] = self.records()
        self.assertEqual(
            (record["code"], record["clean"], record["seconds"], record["uid"]),
            (1001, False, 0.5, None),
        )

    def test_values_json_cannot_encode_are_stringified(self):
        """
        Objects, sets, dicts and exceptions are written as their str();
        bytes as text (undecodable bytes replaced); tuples and lists as
        arrays of such values.
        """
        self.log.info(
            "odd values",
            thing=Unprintable(),
            members={"alice"},
            mapping={"a": Unprintable()},
            error=ValueError("bad value"),
            raw=b"caf\xc3\xa9 \xff",
            pair=("alice", Unprintable(), b"x"),
        )
        [record] = self.records()
        self.assertEqual(record["thing"], "<unprintable 42>")
        self.assertEqual(record["members"], "{'alice'}")
        self.assertTrue(record["mapping"].startswith("{'a': "), record["mapping"])
        self.assertEqual(record["error"], "bad value")
        self.assertEqual(record["raw"], "caf\u00e9 \ufffd")
        self.assertEqual(record["pair"], ["alice", "<unprintable 42>", "x"])

    def test_non_finite_numbers_are_still_strict_json(self):
        """
        A field that is NaN or infinite does not make the line invalid
        JSON: RFC 8259 has no NaN or Infinity, and log shippers that parse
        strictly would drop the whole line.
        """
        self.log.info("timing", rtt=math.nan, limit=math.inf, floor=-math.inf)
        [line] = self.out.getvalue().splitlines()
        try:
            record = strict_loads(line)
        except ValueError as e:
            self.fail(f"not strict JSON ({e}): {line}")
        for key in ("rtt", "limit", "floor"):
            self.assertIn(key, record)

    def test_failure_has_its_traceback(self):
        """
        A logged failure has its traceback, as text in ``traceback``, in
        the same one-line object as the message and the fields.
        """
        try:
            1 / 0
        except ZeroDivisionError:
            self.log.failure("while handling {uid}", uid="alice")
        [line] = self.out.getvalue().splitlines()
        record = strict_loads(line)
        self.assertEqual(record["message"], "while handling alice")
        self.assertEqual(record["level"], "critical")
        self.assertEqual(record["uid"], "alice")
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertIn("test_failure_has_its_traceback", record["traceback"])
        self.assertIn("Traceback", record["traceback"])

    def test_twisted_bookkeeping_is_left_out(self):
        """
        twisted.logger's own keys (log_*, and the legacy system's
        format/message/isError/system/time) are not copied as fields.
        """
        self.log.info("peer {uid}", uid="alice")
        [record] = self.records()
        self.assertEqual(sorted(record), ["level", "message", "namespace", "time", "uid"])

    def test_legacy_log_messages_keep_their_text(self):
        """
        A twisted.python.log.msg() line (as older Twisted code and
        libraries still log) is written with its text as the message.
        """
        publishToNewObserver(
            self.observer,
            {"message": ("legacy", "line"), "isError": 0, "system": "-", "time": 5.0},
            textFromEventDict,
        )
        [record] = self.records()
        self.assertEqual(record["message"], "legacy line")
        self.assertEqual(record["level"], "info")

    def test_standard_output_by_default(self):
        """Without a file given, lines go to standard output (for journald)."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        Logger(namespace="x", observer=logs.json_observer()).info("to stdout")
        self.assertEqual(strict_loads(out.getvalue())["message"], "to stdout")


class TextLineTests(unittest.SynchronousTestCase):
    """
    The text observer writes twistd's own lines (Twisted's
    ``formatEventAsClassicLogText``), character for character, whatever
    the event.
    """

    def events(self):
        from twisted.python.failure import Failure

        when = 1765000000.25
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        plain = dict(
            log_format="peer {uid} at {peer_addr} disconnected (code {code}, {cause})",
            uid="alice",
            peer_addr="tcp4:127.0.0.1:5555",
            code=1000,
            cause="closed by the peer",
            log_time=when,
            log_namespace="signalling.core.connection.Connection",
            log_level=LogLevel.info,
        )
        yield plain
        yield dict(plain, log_time=when + 0.9999996)
        yield dict(plain, log_time=when + 3600 * 24 * 180)
        yield dict(plain, log_time=None)
        yield dict(plain, log_time=int(when))
        yield dict(plain, log_level=None)
        yield {k: v for k, v in plain.items() if k != "log_namespace"}
        yield dict(plain, log_system="custom system")
        yield dict(plain, log_system=42)
        yield dict(plain, uid="two\nlines")
        yield dict(plain, log_namespace="name\nspace")
        yield dict(plain, uid=Unprintable())
        yield dict(plain, log_format="{{literal}} braces and {uid}")
        yield dict(plain, log_format="{uid!r} and {code:05d}")
        yield dict(plain, log_format="{uid.upper()} called")
        yield dict(plain, log_format="{missing} field")
        yield dict(plain, log_format="{} positional")
        yield dict(plain, log_format="{0} positional")
        yield dict(plain, log_format="unbalanced {")
        yield dict(plain, log_format="")
        yield dict(plain, log_format=b"bytes {uid}")
        yield {k: v for k, v in plain.items() if k != "log_format"}
        yield dict(plain, log_failure=failure, log_format="failed for {uid}")
        yield dict(plain, log_format="{log_text}", log_text="a legacy line")
        with capturedLogs() as events:
            Logger(namespace="x").info("flat {uid}", uid="bob")
        yield dict(events[0], log_flattened={"uid!:": "bob", "uid!r:": "'bob'"})

    def test_the_same_text_as_twisted(self):
        """Every kind of event gives Twisted's text, or None where Twisted gives None."""
        from twisted.logger import formatEventAsClassicLogText

        for event in self.events():
            self.assertEqual(
                logs.classic_text(event), formatEventAsClassicLogText(event), repr(event)
            )
            # Once more, with the second's time stamp kept from the first.
            self.assertEqual(
                logs.classic_text(event), formatEventAsClassicLogText(event), repr(event)
            )

    def test_the_observer_writes_each_line_to_its_file(self):
        """text_observer writes what textFileLogObserver writes."""
        from twisted.logger import textFileLogObserver

        ours, twisteds = io.StringIO(), io.StringIO()
        observer, reference = logs.text_observer(ours), textFileLogObserver(twisteds)
        for event in self.events():
            observer(event)
            reference(event)
        self.assertEqual(ours.getvalue(), twisteds.getvalue())

    def test_only_where_twistd_logs_text_to_standard_output(self):
        """
        The server takes over twistd's text lines under ``-n`` to standard
        output only; a log file (rotated by twistd), syslog, another logger
        or another runner keep twistd's own observer.
        """
        from twisted.scripts.twistd import ServerOptions

        def observer(*argv):
            options = ServerOptions()
            options.parseOptions(list(argv) + ["signalling", "--port", "tcp:0"])
            return logs.twistd_text_observer(options.subOptions)

        self.assertIsNotNone(observer("-n"))
        self.assertIsNotNone(observer("-n", "--logfile", "-"))
        self.assertIsNone(observer("-n", "--logfile", "server.log"))
        self.assertIsNone(observer("-n", "--syslog"))
        self.assertIsNone(observer())
        self.assertIsNone(observer("-n", "--logger", "twisted.logger.textFileLogObserver"))
        from signalling.server.tap import Options

        self.assertIsNone(logs.twistd_text_observer(Options()))


class SessionLogTests(unittest.TestCase):
    """What a real server logs during real sessions."""

    timeout = 30

    #: Unique markers inside payloads; they must not appear in any log event.
    SESSION_SECRET = "v=0 o=- SDP-SECRET-7131"
    BINARY_SECRET = b"\x00ICE-SECRET-2906"
    ROOM_SECRET = "candidate ROOM-SECRET-4477"

    async def run_server(self, *options):
        """
        Start a server with ``options``; make a session with a text and a
        binary payload each way, and a room with a ROOM_PEER_MSG; hang up.

        :returns: every event logged meanwhile (from the start of the server).
        """
        with capturedLogs() as events:
            server = await Server.start(self, "--port", LOOPBACK, *options)
            alice = await server.hello("alice")
            bob = await server.hello("bob")
            alice.send_text("SESSION bob")
            await alice.expect("SESSION_OK")
            alice.send_text(self.SESSION_SECRET)
            await bob.expect(self.SESSION_SECRET)
            bob.send_bytes(self.BINARY_SECRET)
            await alice.expect(self.BINARY_SECRET)
            carol = await server.hello("carol")
            dave = await server.hello("dave")
            carol.send_text("ROOM r1")
            await carol.expect("ROOM_OK ")
            dave.send_text("ROOM r1")
            await dave.expect("ROOM_OK carol")
            await carol.expect("ROOM_PEER_JOINED dave")
            carol.send_text(f"ROOM_PEER_MSG dave {self.ROOM_SECRET}")
            await dave.expect(f"ROOM_PEER_MSG carol {self.ROOM_SECRET}")
            carol.send_text("SESSION nobody")
            await carol.expect("ERROR invalid msg, already in room")
            alice.close()
            await bob.closed()
            await server.stop()
        return list(events)

    def mentions(self, events, marker):
        """:returns: the events whose rendered text or any field holds ``marker``."""
        found = []
        for event in events:
            text = formatEvent(event) + " ".join(repr(v) for v in event.values())
            if marker in text:
                found.append(event)
        return found

    def the_event(self, events, fragment, **fields):
        """:returns: the one event whose format holds ``fragment`` with ``fields``."""
        matching = [
            e
            for e in events
            if fragment in (e.get("log_format") or "")
            and all(e.get(k) == v for k, v in fields.items())
        ]
        self.assertEqual(len(matching), 1, (fragment, fields, matching))
        return matching[0]

    async def test_payloads_are_never_logged_by_default(self):
        """
        Without --log-payloads, no event (message or field, at any level)
        holds any part of a session payload, text or binary, or of a room
        message.
        """
        events = await self.run_server()
        self.assertGreater(len(events), 10)
        for marker in ("SDP-SECRET-7131", "ICE-SECRET-2906", "ROOM-SECRET-4477"):
            self.assertEqual(self.mentions(events, marker), [], marker)

    async def test_log_payloads_logs_them_and_says_so_at_start(self):
        """
        With --log-payloads a warning says so at start, and each relayed
        payload is logged at info with the uids of both sides: session
        text, session binary, and the room message.
        """
        events = await self.run_server("--log-payloads")
        [warning] = [
            e for e in events
            if e["log_level"] == LogLevel.warn and "--log-payloads" in formatEvent(e)
        ]
        self.assertEqual(warning["log_namespace"], "signalling.server.tap")
        [session] = self.mentions(events, "SDP-SECRET-7131")
        self.assertEqual(session["log_level"], LogLevel.info)
        self.assertEqual((session["uid"], session["partner_uid"]), ("alice", "bob"))
        [binary] = self.mentions(events, "ICE-SECRET-2906")
        self.assertEqual((binary["uid"], binary["partner_uid"]), ("bob", "alice"))
        [room] = self.mentions(events, "ROOM-SECRET-4477")
        self.assertEqual((room["sender_uid"], room["uid"]), ("carol", "dave"))
        self.assertEqual(room["payload"], self.ROOM_SECRET)

    async def test_events_carry_stable_fields_and_become_json_lines(self):
        """
        The events of a real session carry the documented fields (uid,
        peer_addr, callee, room_id, reason, code), and the JSON observer
        writes each of them as one line holding those fields.
        """
        events = await self.run_server()
        registered = self.the_event(events, "registered", uid="alice")
        self.assertTrue(registered["peer_addr"].startswith("tcp4:127.0.0.1:"))
        session = self.the_event(events, "session from", uid="alice")
        self.assertEqual(session["callee"], "bob")
        joined = self.the_event(events, "joined room", uid="dave")
        self.assertEqual(joined["room_id"], "r1")
        refused = self.the_event(events, "refused a request", uid="carol")
        self.assertEqual(refused["reason"], "invalid msg, already in room")
        gone = self.the_event(events, "disconnected", uid="alice")
        self.assertEqual(gone["code"], 1000)

        out = io.StringIO()
        observer = logs.json_observer(out)
        for event in events:
            observer(event)
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), len(events))
        records = [strict_loads(line) for line in lines]
        by_message = {r["message"]: r for r in records}
        record = by_message[formatEvent(registered)]
        self.assertEqual(
            (record["uid"], record["peer_addr"], record["level"], record["namespace"]),
            ("alice", registered["peer_addr"], "info", registered["log_namespace"]),
        )
        self.assertEqual(by_message[formatEvent(session)]["callee"], "bob")
        self.assertEqual(by_message[formatEvent(joined)]["room_id"], "r1")
        self.assertEqual(by_message[formatEvent(gone)]["code"], 1000)
        for record in records:
            for marker in ("SDP-SECRET", "ICE-SECRET", "ROOM-SECRET"):
                self.assertNotIn(marker, json.dumps(record))


class TrustProxyLogTests(unittest.TestCase):
    """The peer address in logs behind a reverse proxy."""

    timeout = 30

    async def connection_event(self, *options):
        """
        Connect once with ``X-Forwarded-For: 198.51.100.7, 203.0.113.9``
        (a client-supplied address, then the one the proxy appended) and
        register.

        :returns: the server's "registered" event.
        """
        server = await Server.start(self, "--port", LOOPBACK, *options)
        with capturedLogs() as events:
            await server.hello(
                "alice", headers={"X-Forwarded-For": "198.51.100.7, 203.0.113.9"}
            )
        [event] = [e for e in events if "registered from" in (e.get("log_format") or "")]
        return event

    async def test_trust_proxy_logs_the_address_the_proxy_saw(self):
        """With --trust-proxy 1 the peer address is the last X-Forwarded-For hop."""
        event = await self.connection_event("--trust-proxy", "1")
        self.assertEqual(event["peer_addr"], "203.0.113.9")

    async def test_two_trusted_hops(self):
        """With --trust-proxy 2 the address two hops back is used."""
        event = await self.connection_event("--trust-proxy", "2")
        self.assertEqual(event["peer_addr"], "198.51.100.7")

    async def test_without_trust_proxy_the_header_is_ignored(self):
        """By default X-Forwarded-For is ignored: a client cannot choose its address."""
        event = await self.connection_event()
        self.assertTrue(event["peer_addr"].startswith("tcp4:127.0.0.1:"), event["peer_addr"])

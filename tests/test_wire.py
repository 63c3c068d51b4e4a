"""Tests for signalling.core.wire: parsing and formatting protocol lines."""

from twisted.trial import unittest

from signalling.core import interfaces, wire


class SplitCommandTests(unittest.TestCase):
    """The command word and the rest of a line."""

    def test_command_and_argument_are_split_on_the_first_run_of_whitespace(self):
        """Everything after the first run of whitespace is the rest."""
        self.assertEqual(wire.split_command("HELLO  \t alice"), ("HELLO", "alice"))

    def test_rest_keeps_inner_and_trailing_whitespace(self):
        """The rest is kept as it is, trailing whitespace included."""
        self.assertEqual(
            wire.split_command("ROOM_PEER_MSG bob  a \t b  "),
            ("ROOM_PEER_MSG", "bob  a \t b  "),
        )

    def test_unicode_whitespace_separates_words(self):
        """A no-break space is whitespace, as str.split() has it."""
        self.assertEqual(wire.split_command("SESSION\u00a0bob"), ("SESSION", "bob"))

    def test_a_lone_command_has_an_empty_rest(self):
        """A command without arguments has an empty rest."""
        self.assertEqual(wire.split_command("ROOM_PEER_LIST"), ("ROOM_PEER_LIST", ""))
        self.assertEqual(wire.split_command("SESSION   "), ("SESSION", ""))

    def test_empty_and_blank_lines_have_no_command(self):
        """An empty or all-whitespace line has the empty command."""
        self.assertEqual(wire.split_command(""), ("", ""))
        self.assertEqual(wire.split_command(" \t\n"), ("", ""))

    def test_commands_are_whole_words_and_case_sensitive(self):
        """SESSION_OK is not SESSION, and session is not SESSION."""
        self.assertEqual(wire.split_command("SESSION_OK x")[0], "SESSION_OK")
        self.assertEqual(wire.split_command("session x")[0], "session")


class UidTests(unittest.TestCase):
    """Which uids HELLO accepts."""

    def test_ordinary_uids_are_accepted(self):
        """Printable words, including non-ASCII ones, are valid uids."""
        for uid in ("alice", "ws-test-client-8f63b9", "1234", "δοκιμή", "a" * 256):
            wire.check_uid(uid)

    def test_empty_uid_is_refused(self):
        """HELLO without a uid is refused."""
        self.assertRaises(wire.WireError, wire.check_uid, "")

    def test_uid_longer_than_256_characters_is_refused(self):
        """The length limit counts characters, not bytes."""
        wire.check_uid("é" * 256)
        self.assertRaises(wire.WireError, wire.check_uid, "a" * 257)

    def test_uid_with_whitespace_is_refused(self):
        """Spaces, tabs, no-break spaces and trailing whitespace are refused."""
        for uid in ("a b", "a\tb", "a\u00a0b", "a ", "a\n"):
            with self.subTest(uid=uid):
                self.assertRaises(wire.WireError, wire.check_uid, uid)

    def test_uid_with_control_characters_is_refused(self):
        """Category Cc characters (C0, DEL and C1) are refused."""
        for uid in ("a\x00b", "a\x07", "a\x7fb", "a\x85b", "a\x9f"):
            with self.subTest(uid=uid):
                self.assertRaises(wire.WireError, wire.check_uid, uid)

    def test_error_echo_writes_control_characters_as_escapes(self):
        """Control characters are never sent back raw in an ERROR line."""
        error = self.assertRaises(wire.WireError, wire.check_room_id, "a\x00b\x1b")
        self.assertEqual(error.reason, "invalid room id 'a\\x00b\\x1b'")

    def test_error_echo_of_a_huge_uid_is_bounded(self):
        """The reason quotes at most a little more than the length limit."""
        error = self.assertRaises(wire.WireError, wire.check_uid, "x" * 100_000)
        self.assertLess(len(error.reason), 600)


class RoomIdTests(unittest.TestCase):
    """Which room ids ROOM accepts."""

    def test_ordinary_room_ids_are_accepted(self):
        """Printable words up to 256 characters are valid room ids."""
        for room_id in ("1", "my-room", "r" * 256, "Session", "sessions"):
            wire.check_room_id(room_id)

    def test_invalid_room_ids_are_refused_with_the_id_quoted(self):
        """Empty, 'session', too long, whitespace or control characters."""
        for room_id in ("", "session", "r" * 257, "a b", "a\x01", "a\u3000b"):
            with self.subTest(room_id=room_id):
                error = self.assertRaises(
                    wire.WireError, wire.check_room_id, room_id
                )
                self.assertTrue(error.reason.startswith("invalid room id '"))

    def test_reason_names_the_room_id(self):
        """The reason is exactly ``invalid room id '<room_id>'``."""
        error = self.assertRaises(wire.WireError, wire.check_room_id, "session")
        self.assertEqual(error.reason, "invalid room id 'session'")


class RoomPeerMsgTests(unittest.TestCase):
    """The arguments of ROOM_PEER_MSG."""

    def test_payload_is_everything_after_the_second_run_of_whitespace(self):
        """The payload keeps its inner and trailing whitespace."""
        self.assertEqual(
            wire.parse_room_peer_msg('bob \t {"ice":  1}  \n'),
            ("bob", '{"ice":  1}  \n'),
        )

    def test_missing_payload_is_an_error(self):
        """A uid alone, or nothing, is refused."""
        for rest in ("", "bob", "bob   "):
            with self.subTest(rest=rest):
                self.assertRaises(wire.WireError, wire.parse_room_peer_msg, rest)


class FormatTests(unittest.TestCase):
    """What the server sends."""

    def test_room_ok_always_has_a_space_after_the_word(self):
        """An empty room answers the 8 characters ``ROOM_OK ``."""
        self.assertEqual(wire.room_ok([]), "ROOM_OK ")
        self.assertEqual(wire.room_ok(["a", "b"]), "ROOM_OK a b")

    def test_room_peer_list_always_has_a_space_after_the_word(self):
        """An empty list is ``ROOM_PEER_LIST `` with one space."""
        self.assertEqual(wire.room_peer_list([]), "ROOM_PEER_LIST ")
        self.assertEqual(wire.room_peer_list(["a"]), "ROOM_PEER_LIST a")

    def test_notices(self):
        """Join, leave and relayed room messages name the peer."""
        self.assertEqual(wire.room_peer_joined("a"), "ROOM_PEER_JOINED a")
        self.assertEqual(wire.room_peer_left("a"), "ROOM_PEER_LEFT a")
        self.assertEqual(wire.room_peer_msg("a", "x  y "), "ROOM_PEER_MSG a x  y ")

    def test_error_lines_start_with_error_and_a_space(self):
        """Clients test only the ``ERROR `` prefix."""
        self.assertEqual(wire.error("oops"), "ERROR oops")
        self.assertEqual(
            wire.unknown_command("FROB"), "unknown command 'FROB'"
        )

    def test_unknown_command_echo_is_cut_short(self):
        """A payload sent as a command is echoed (and logged) only in part."""
        word = '{"sdp":{"type":"offer","sdp":"v=0\\r\\no=-' + "x" * 1000
        reason = wire.unknown_command(word)
        self.assertEqual(reason, "unknown command '" + word[:32] + "...'")

    def test_every_domain_error_carries_its_kind(self):
        """
        Each refusal's kind (its metrics label, and how a cluster script
        names it) is its class's: one table, every refusal but the JSON
        dialect's in it, each under a kind of its own.
        """
        refusals = set(interfaces.SignallingError.__subclasses__()) - {interfaces.JsonRefused}
        self.assertEqual(set(interfaces.ERRORS_BY_KIND.values()), refusals)
        for kind, cls in interfaces.ERRORS_BY_KIND.items():
            with self.subTest(kind=kind):
                self.assertEqual(wire.kind_for(cls("bob")), kind)
        self.assertEqual(wire.kind_for(interfaces.JsonRefused("no")), "request_failed")
        self.assertEqual(wire.kind_for(ValueError("no")), "request_failed")

    def test_every_domain_error_has_its_own_reason(self):
        """Registry exceptions map to the protocol's texts."""
        cases = {
            interfaces.PeerNotFound("bob"): "peer 'bob' not found",
            interfaces.PeerBusy("bob"): "peer 'bob' busy",
            interfaces.SessionWithSelf("me"): "cannot start a session with yourself",
            interfaces.PeerNotInRoom("bob"): "peer 'bob' is not in the room",
            interfaces.NotInRoom("me"): "not in a room",
            interfaces.UidTaken("bob"): "peer uid 'bob' is already taken",
            interfaces.AlreadyEngaged("me"): "already in a session or a room",
        }
        for exc, reason in cases.items():
            with self.subTest(exc=exc):
                self.assertEqual(wire.reason_for(exc), reason)

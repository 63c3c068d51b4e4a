"""
The protocol's words as the server and the tools share them
(``signalling.core.words``): the reply parser reads exactly what the server
formats (``signalling.core.wire``), and nothing else; one table of exit
statuses for every tool.
"""

import argparse
import os
import subprocess
import sys

from twisted.trial import unittest

from signalling.core import wire, words
from signalling.tools import client, peer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ParseReplyTests(unittest.TestCase):
    """parse_reply reads every line the server sends."""

    def test_every_line_the_server_formats_is_read_back(self):
        """Each formatter of the wire module round-trips through the parser."""
        cases = [
            (wire.HELLO, words.HELLO, [], None, None),
            (wire.SESSION_OK, words.SESSION_OK, [], None, None),
            (wire.room_ok([]), words.ROOM_OK, [], None, None),
            (wire.room_ok(["a", "b"]), words.ROOM_OK, ["a", "b"], None, None),
            (wire.room_peer_list(["c"]), words.ROOM_PEER_LIST, ["c"], None, None),
            (wire.room_peer_joined("d"), words.ROOM_PEER_JOINED, ["d"], None, None),
            (wire.room_peer_left("e"), words.ROOM_PEER_LEFT, ["e"], None, None),
            (wire.room_peer_msg("f", " two  spaces "), words.ROOM_PEER_MSG, ["f"], " two  spaces ", None),
            (wire.error("peer 'x' not found"), words.ERROR, [], None, "peer 'x' not found"),
        ]
        for line, word, uids, payload, reason in cases:
            reply = words.parse_reply(line)
            self.assertEqual(
                (reply.word, reply.uids, reply.payload, reply.reason, reply.text),
                (word, uids, payload, reason, line),
                line,
            )

    def test_anything_else_is_not_the_servers(self):
        """Relayed payloads and near misses have no word."""
        for line in (
            '{"sdp": {"type": "offer"}}',
            "OFFER_REQUEST",
            "HELLO bob",
            "SESSION_OK please",
            "ROOM_OK",
            "ROOM_PEER_JOINED",
            "ROOM_PEER_JOINED a b",
            "ROOM_PEER_MSG a",
            "hello",
            "",
        ):
            self.assertIsNone(words.parse_reply(line).word, line)

    def test_requests_are_what_the_server_parses(self):
        """The request builders make lines the server reads as those commands."""
        self.assertEqual(wire.split_command(words.hello("a")), (wire.HELLO, "a"))
        self.assertEqual(wire.split_command(words.session("b")), (wire.SESSION, "b"))
        self.assertEqual(wire.split_command(words.room("r")), (wire.ROOM, "r"))
        command, rest = wire.split_command(words.room_peer_msg("c", "hi there"))
        self.assertEqual(command, wire.ROOM_PEER_MSG)
        self.assertEqual(wire.parse_room_peer_msg(rest), ("c", "hi there"))


class ExitStatusTests(unittest.TestCase):
    """One table of exit statuses for every tool."""

    def test_the_tools_use_the_one_table(self):
        """signalling-client and signalling-peer take their statuses from words."""
        for name, value in vars(words).items():
            if name.startswith("EXIT_") and isinstance(value, int):
                for tool in (client, peer):
                    if hasattr(tool, name):
                        self.assertIs(getattr(tool, name), value, (tool, name))
        statuses = [v for n, v in vars(words).items() if n.startswith("EXIT_")]
        self.assertEqual(sorted(statuses), list(range(9)))

    def test_words_needs_only_the_standard_library(self):
        """
        The module imports nothing of the project's dependencies, so that
        contrib/gst_peer.py can use it under the system Python.
        """
        script = (
            "import sys, builtins\n"
            "real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name.split('.')[0] in ('twisted', 'autobahn', 'zope', 'OpenSSL', 'txaio'):\n"
            "        raise ImportError('not for words: ' + name)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "import signalling.core.words as w\n"
            "print(w.parse_reply('HELLO').word)\n"
        )
        env = dict(os.environ, PYTHONPATH=ROOT)
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env
        ).stdout
        self.assertEqual(out.strip(), "HELLO")


class JsonClientTests(unittest.TestCase):
    """What the WebRTC peers say in the JSON dialect (signalling-peer, contrib/gst_peer.py)."""

    def options(self, **given):
        values = dict(produce=False, consume=None, meta=None, name=None, call=None, room=None,
                      protocol="json", protocol_version=None)
        values.update(given)
        return argparse.Namespace(**values)

    def test_after_welcome_a_producer_registers_and_a_consumer_looks_or_calls(self):
        self.assertEqual(
            words.json_after_welcome(self.options(produce=True, meta="cam"), "p1"),
            ("producing", [{"type": "setPeerStatus", "roles": ["producer"],
                            "meta": {"display-name": "cam"}}]),
        )
        state, messages = words.json_after_welcome(self.options(produce=True), "p1")
        self.assertEqual(messages[0]["meta"], {"display-name": "p1"})
        # --name: the name WHEP viewers find the producer by (POST /whep/NAME).
        state, messages = words.json_after_welcome(
            self.options(produce=True, meta="Camera", name="cam"), "p1"
        )
        self.assertEqual(messages[0]["meta"], {"display-name": "Camera", "name": "cam"})
        self.assertEqual(
            words.json_after_welcome(self.options(consume="first"), "c1")[0], "looking"
        )
        self.assertEqual(
            words.json_after_welcome(self.options(consume="p1"), "c1"),
            ("consuming", [{"type": "startSession", "peerId": "p1"}]),
        )

    def test_producers_are_found_in_lists_and_announcements(self):
        self.assertEqual(
            words.producers_in({"type": "list", "producers": [{"id": "a"}, {"id": "b"}]}),
            ["a", "b"],
        )
        self.assertEqual(
            words.producers_in({"type": "peerStatusChanged", "roles": ["producer"], "peerId": "c"}),
            ["c"],
        )
        self.assertEqual(
            words.producers_in({"type": "peerStatusChanged", "roles": [], "peerId": "c"}), []
        )

    def test_negotiation_messages_are_wrapped_in_peer_messages(self):
        self.assertEqual(
            words.json_peer("s", {"sdp": {"type": "offer", "sdp": "v=0"}}),
            {"type": "peer", "sessionId": "s", "sdp": {"type": "offer", "sdp": "v=0"}},
        )
        self.assertEqual(
            words.json_peer("s", {"ice": {"candidate": "c", "sdpMLineIndex": "1", "sdpMid": "0"}}),
            {"type": "peer", "sessionId": "s", "ice": {"candidate": "c", "sdpMLineIndex": 1}},
        )

    def test_options_that_do_not_fit_the_protocol_are_refused(self):
        parser = argparse.ArgumentParser()
        parser.error = lambda message: (_ for _ in ()).throw(ValueError(message))
        for options in (
            self.options(),
            self.options(produce=True, call="x"),
            self.options(protocol="examples", produce=True),
            self.options(protocol="examples", protocol_version="v1_1"),
        ):
            self.assertRaises(ValueError, words.check_json_arguments, parser, options)
        words.check_json_arguments(parser, self.options(consume="first"))

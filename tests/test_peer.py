"""
The pure parts of the peer programs: ``signalling-peer``'s command line,
SDP candidate splitting and output, and ``contrib/gst_peer.py``'s SDP
reading; and ``signalling-peer`` failing at once on an unusable answer,
against a real loopback server (it never gets as far as sending media; the
calls themselves are in ``tests/test_interop.py``).
"""

import importlib.util
import io
import json
import os
import sys

from twisted.trial import unittest

from signalling.tools import peer
from tests.clients import ClientProcess
from tests.servers import Server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_gst_peer():
    """Import ``contrib/gst_peer.py`` (it imports GStreamer only when run)."""
    spec = importlib.util.spec_from_file_location(
        "gst_peer", os.path.join(ROOT, "contrib", "gst_peer.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OFFER = (
    "v=0\r\n"
    "o=- 1 1 IN IP4 0.0.0.0\r\n"
    "s=-\r\n"
    "t=0 0\r\n"
    "a=group:BUNDLE 0 1\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 97 98\r\n"
    "a=mid:0\r\n"
    "a=rtpmap:97 VP8/90000\r\n"
    "a=rtpmap:98 rtx/90000\r\n"
    "a=candidate:1 1 udp 2130706431 127.0.0.2 5000 typ host\r\n"
    "a=end-of-candidates\r\n"
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
    "a=mid:1\r\n"
    "a=candidate:1 1 udp 2130706431 127.0.0.2 5000 typ host\r\n"
    "a=candidate:2 1 udp 2130706431 127.0.0.2 5002 typ host\r\n"
    "a=end-of-candidates\r\n"
)


class SplitCandidatesTests(unittest.TestCase):
    def test_candidates_leave_the_sdp_once_each(self):
        """
        Every ``a=candidate`` and ``a=end-of-candidates`` line leaves the
        SDP; each distinct candidate comes out once, with the index and mid
        of the first section it was in; the rest of the SDP is unchanged.
        """
        sdp, candidates = peer.split_candidates(OFFER)
        self.assertNotIn("a=candidate", sdp)
        self.assertNotIn("end-of-candidates", sdp)
        self.assertEqual(
            [line for line in OFFER.split("\r\n") if "candidate" not in line],
            sdp.split("\r\n"),
        )
        self.assertEqual(
            candidates,
            [
                {"candidate": "candidate:1 1 udp 2130706431 127.0.0.2 5000 typ host",
                 "sdpMLineIndex": 0, "sdpMid": "0"},
                {"candidate": "candidate:2 1 udp 2130706431 127.0.0.2 5002 typ host",
                 "sdpMLineIndex": 1, "sdpMid": "1"},
            ],
        )


class OutputTests(unittest.TestCase):
    def test_json_lines(self):
        """With ``--json`` each event is one JSON object on one line, ``event`` first."""
        stream = io.StringIO()
        out = peer.Output(True, stream=stream)
        out("media", peer="bob", kind="video", frames=3, packets=9, bytes=1000)
        out("session", peer=None)
        lines = stream.getvalue().splitlines()
        self.assertEqual(
            [json.loads(line) for line in lines],
            [
                {"event": "media", "peer": "bob", "kind": "video", "frames": 3,
                 "packets": 9, "bytes": 1000},
                {"event": "session", "peer": None},
            ],
        )
        self.assertTrue(lines[0].startswith('{"event": "media"'))

    def test_sentences(self):
        """
        Without ``--json`` events are sentences on stdout, candidates are not
        shown, and errors go to stderr with the program's name.
        """
        stream, errors = io.StringIO(), io.StringIO()
        out = peer.Output(False, stream=stream, errors=errors)
        out("ice-connection-state", peer="bob", state="completed")
        out("media", peer=None, kind="video", frames=1, packets=2, bytes=300)
        out("local-candidate", peer="bob", candidate="candidate:1 1 udp 1 127.0.0.2 1 typ host")
        out("error", message="boom")
        self.assertEqual(
            stream.getvalue().splitlines(),
            [
                "ICE connection with 'bob': completed",
                "Video from the caller: 1 frame, 2 packets, 300 bytes",
            ],
        )
        self.assertEqual(errors.getvalue(), "signalling-peer: boom\n")


class ParseArgsTests(unittest.TestCase):
    def usage_error(self, *argv):
        """:returns: the usage message of a command line that must exit with status 2."""
        self.patch(peer.sys, "stderr", io.StringIO())
        with self.assertRaises(SystemExit) as caught:
            peer.parse_args(list(argv))
        self.assertEqual(caught.exception.code, 2)
        return peer.sys.stderr.getvalue()

    def test_defaults(self):
        """A random uid, the default URL, and a verifying TLS context for ``wss://``."""
        options = peer.parse_args([])
        self.assertTrue(options.id.startswith("peer-"))
        self.assertEqual(options.url, "wss://localhost:8443")
        self.assertTrue(options.ssl_context.check_hostname)

    def test_plaintext_has_no_tls(self):
        """A ``ws://`` URL has no TLS context, and refuses ``--ca-file`` and ``--insecure``."""
        self.assertIsNone(peer.parse_args(["--url", "ws://127.0.0.1:8080"]).ssl_context)
        self.assertIn("needs a wss:// URL", self.usage_error("--url", "ws://h", "--insecure"))

    def test_bad_command_lines(self):
        """Bad combinations and values exit with status 2 and a reason."""
        self.assertIn("needs --call", self.usage_error("--offer-request"))
        self.assertIn("must be positive", self.usage_error("--frames", "0"))
        self.assertIn("ws:// or wss://", self.usage_error("--url", "http://h"))
        self.usage_error("--call", "a", "--room", "b")


class GstPeerTests(unittest.TestCase):
    def test_vp8_payload_type(self):
        """The answerer sends VP8 with the payload type the offer gave it."""
        gst_peer = load_gst_peer()
        self.assertEqual(gst_peer.vp8_payload_type(OFFER), 97)
        audio_first = "m=audio 9 RTP 111\r\na=rtpmap:96 VP8/90000\r\n" + OFFER
        self.assertEqual(gst_peer.vp8_payload_type(audio_first), 97)
        self.assertIsNone(gst_peer.vp8_payload_type("v=0\r\nm=audio 9 RTP 111\r\n"))

    def test_command_line(self):
        """``--offer-request`` needs ``--call``; ``--server`` and ``--url`` are one option."""
        gst_peer = load_gst_peer()
        options = gst_peer.parse_args(["--url", "ws://h:1", "--call", "x", "--offer-request"])
        self.assertEqual((options.url, options.call, options.offer_request), ("ws://h:1", "x", True))
        self.patch(gst_peer.sys, "stderr", io.StringIO())
        with self.assertRaises(SystemExit) as caught:
            gst_peer.parse_args(["--offer-request"])
        self.assertEqual(caught.exception.code, 2)


class UnusableAnswerTests(unittest.TestCase):
    """
    ``signalling-peer`` against a real server, calling a peer whose answer
    cannot be used: it fails at once with its own status.
    """

    timeout = 60

    async def test_an_unusable_answer_fails_at_once_with_its_own_status(self):
        """
        ``--call bob`` where bob answers the offer with SDP that is no SDP:
        the peer exits with status 8 (not 7, "gave up") long before its
        ``--timeout``, with one line naming the answer.
        """
        from twisted.internet import reactor

        server = await Server.listening(self, False)
        bob = await server.hello("bob")
        argv = [
            sys.executable, "-m", "signalling.tools.peer", "--url",
            f"ws://127.0.0.1:{server.port_number()}", "--call", "bob", "--timeout", "30",
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        process = ClientProcess(argv)
        transport = reactor.spawnProcess(process, sys.executable, argv, env=env)
        self.addCleanup(lambda: process.ended.called or transport.signalProcess("KILL"))
        started = reactor.seconds()
        offer = json.loads(await bob.next(timeout=20))
        self.assertEqual(offer["sdp"]["type"], "offer")
        bob.send_text(json.dumps({"sdp": {"type": "answer", "sdp": "this is no SDP"}}))
        await process.ended
        self.assertEqual(process.status, peer.EXIT_NEGOTIATION, process.report())
        self.assertLess(reactor.seconds() - started, 20)
        self.assertIn(b"cannot use the answer from 'bob'", process.err + process.out)
        await bob.closed()

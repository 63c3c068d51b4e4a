"""
The dialect table (``signalling.core.dialects``): a third dialect defined
here, in the test module alone, is served by the unchanged server on a path
and on an auto port, over the in-memory backend and the reordering one, and
inherits what the shared path guarantees (held input, the output bound, the
command rate, closing and letting go of its id).
"""

import dataclasses

from twisted.trial import unittest
from zope.interface import implementer

from signalling.core.connection import MAX_HELD_INPUT, HELD_INPUT, ConnectionCommon
from signalling.core.dialects import AUTO, DIALECTS, EXAMPLES, JSON, Dialect, DialectTable
from signalling.core.interfaces import IExamplesRegistry, IPeer, SignallingError
from signalling.server.metrics import SignallingCollector
from tests import backends
from tests.servers import Loopback


@implementer(IPeer)
class TinyConnection(ConnectionCommon):
    """
    A small line protocol: ``TINY <uid>`` registers the uid (in the examples'
    registry part, so uids are shared with that dialect) and is answered
    ``TINY-OK``; after that every message comes back in upper case.
    """

    __slots__ = ("_pending",)

    def __init__(self, server, output):
        super().__init__(server, output)
        self._pending = False

    def opened(self):
        """Nothing is said first."""

    def _handle(self, payload, is_binary):
        if not self._rate_allows():
            return
        text = payload.decode("utf-8")
        if self.uid is None:
            word, _, uid = text.partition(" ")
            if word != "TINY" or not uid:
                self._send_error("say TINY <uid> first", "invalid_protocol")
                return
            self._pending = True
            try:
                result = self._shared.registry.register(uid, self)
            except SignallingError:
                self._pending = False
                self._send_error("taken", "uid_taken")
                return
            if hasattr(result, "addCallbacks"):
                result.addCallbacks(self._registered, self._taken, callbackArgs=(uid,))
            else:
                self._registered(None, uid)
            return
        self._send_text(text.upper())

    def _registered(self, _, uid):
        self._pending = False
        if self._released:
            self._release(uid)
            return
        self.uid = uid
        self._send_text("TINY-OK")
        self._resume()

    def _taken(self, failure):
        self._pending = False
        failure.trap(SignallingError)
        self._send_error("taken", "uid_taken")
        self._resume()

    @staticmethod
    def _error_text(reason):
        return "TINY-ERROR " + reason

    # IPeer: nothing of sessions or rooms happens to a tiny peer.
    def probe(self, timeout):
        raise NotImplementedError

    @property
    def peer_addr(self):
        return self._output.peer_addr


def _is_tiny(payload, is_binary):
    return not is_binary and payload.startswith(b"TINY ")


TINY = Dialect(
    name="tiny",
    connection=TinyConnection,
    recognises=_is_tiny,
    token_allows=lambda grant: grant.uid is not None,
    registry_part=IExamplesRegistry,
    owns_part=False,
)

#: The server's table with the tiny dialect tried before the examples' one
#: (which takes any first message).
WITH_TINY = DIALECTS.with_dialect(TINY, before=EXAMPLES.name)


class DialectTableTests(unittest.SynchronousTestCase):
    """The table itself."""

    def test_the_servers_table_names_its_dialects_in_the_order_they_are_tried(self):
        """
        JSON is tried first (a JSON object), the examples' dialect takes the
        rest; WHEP and WHIP are spoken over HTTP, never on a WebSocket.
        """
        self.assertEqual(DIALECTS.names, ("json", "examples", "whep", "whip"))
        self.assertEqual(DIALECTS.websocket_names, ("json", "examples"))
        self.assertEqual([d.http_prefix for d in DIALECTS.http], ["/whep/", "/whip/"])
        self.assertIs(DIALECTS.for_http_path("/whep/cam"), DIALECTS["whep"])
        self.assertIsNone(DIALECTS.for_http_path("/json"))
        self.assertIs(DIALECTS.for_first_message(b' {"type":"list"}', False), JSON)
        self.assertIs(DIALECTS.for_first_message(b"HELLO 1", False), EXAMPLES)
        self.assertIs(DIALECTS.for_first_message(b"{", True), EXAMPLES)
        self.assertIs(DIALECTS.for_silence, JSON)

    def test_a_table_refuses_twice_the_same_name_auto_and_two_that_speak_first(self):
        """Names are unique and not 'auto'; at most one dialect speaks first."""
        with self.assertRaises(ValueError):
            DialectTable([JSON, JSON])
        with self.assertRaises(ValueError):
            DialectTable([dataclasses.replace(TINY, name=AUTO)])
        with self.assertRaises(ValueError):
            DialectTable([JSON, dataclasses.replace(TINY, speaks_first=True)])

    def test_a_dialect_can_be_added_and_replaced(self):
        """with_dialect inserts where asked; replacing swaps the entry of that name."""
        self.assertEqual(WITH_TINY.websocket_names, ("json", "tiny", "examples"))
        self.assertIs(WITH_TINY.for_first_message(b"TINY a", False), TINY)
        other = dataclasses.replace(TINY, label="small")
        self.assertEqual(WITH_TINY.replacing(other)["tiny"].label, "small")


class ThirdDialectMixin:
    """A third dialect, from this module alone, served by the unchanged server."""

    backend = staticmethod(backends.memory)

    def net(self, **kwargs):
        kwargs.setdefault("dialects", WITH_TINY)
        kwargs.setdefault("dialect_paths", {"/tiny": "tiny"})
        return Loopback(self, backend=self.backend, **kwargs)

    def tiny(self, net, uid, path=None):
        client = net.client(path=path or "/")
        client.send_text(f"TINY {uid}")
        net.flush()
        self.assertEqual(client.drain(), ["TINY-OK"])
        return client

    def test_a_path_pinned_to_the_third_dialect_serves_it(self):
        """On its path, a tiny client registers and is answered in its dialect."""
        net = self.net(dialect="examples")
        client = self.tiny(net, "ada", path="/tiny")
        client.send_text("hello")
        net.flush()
        self.assertEqual(client.drain(), ["HELLO"])
        self.assertIsNotNone(net.registry.peer_of("ada"))

    def test_its_first_message_chooses_it_on_an_auto_port(self):
        """On an auto port, TINY picks the third dialect; HELLO and JSON keep theirs."""
        net = self.net()
        self.tiny(net, "ada")
        examples = net.hello("bob")
        self.assertTrue(examples.is_live)
        json_client = net.client()
        json_client.send_text('{"type":"list"}')
        net.flush()
        self.assertEqual(json_client.drain()[0][:18], '{"type":"welcome",')

    def test_its_ids_are_the_registrys_so_both_dialects_see_them_taken(self):
        """A uid a tiny peer holds is taken for HELLO, and the other way round."""
        net = self.net()
        self.tiny(net, "ada")
        newcomer = net.client()
        newcomer.send_text("HELLO ada")
        net.flush()
        self.assertEqual(newcomer.drain(), ["ERROR peer uid 'ada' is already taken"])
        net.hello("bob")
        late = net.client()
        late.send_text("TINY bob")
        net.flush()
        self.assertEqual(late.drain(), ["TINY-ERROR taken"])

    def test_it_lets_go_of_its_id_when_it_closes(self):
        """A tiny peer that closes releases its uid; the registry ends empty."""
        net = self.net()
        client = self.tiny(net, "ada")
        client.sendClose(1000)
        net.flush()
        self.assertIsNone(net.registry.peer_of("ada"))
        self.assertTrue(net.registry.is_empty())

    def test_it_inherits_the_held_input_bound(self):
        """
        What a tiny client sends while its TINY waits for the registry is
        held, and reading stops past MAX_HELD_INPUT, as for every dialect.
        """
        net = self.net()
        stalled = []
        registry = net.registry
        real_register = registry.register

        def register(uid, peer):
            from twisted.internet import defer

            d = defer.Deferred()
            stalled.append((d, uid, peer))
            return d

        registry.register = register
        client = net.client()
        client.send_text("TINY ada")
        for _ in range(MAX_HELD_INPUT // 1024 + 4):
            client.send_text("x" * 1024)
        net.deliver_bytes()
        self.assertIn(HELD_INPUT, client.server._read_pauses)
        registry.register = real_register
        [(d, uid, peer)] = stalled
        d.callback(real_register(uid, peer))
        net.flush()
        self.assertNotIn(HELD_INPUT, client.server._read_pauses)
        replies = client.drain()
        self.assertEqual(replies[0], "TINY-OK")
        self.assertEqual(set(replies[1:]), {"X" * 1024})

    def test_it_inherits_the_output_bound(self):
        """A reply that cannot fit in the output bound closes a tiny peer (1008)."""
        net = self.net(max_output=1000)
        client = self.tiny(net, "ada")
        client.send_text("y" * 2000)
        net.flush()
        self.assertEqual(client.drain(), [])
        self.assertEqual((client.close_code, client.close_reason), (1008, "too slow to read"))

    def test_it_inherits_the_command_rate(self):
        """Past the command burst, a tiny peer is refused, and closed if it goes on."""
        net = self.net(command_burst=5, command_rate=0.001)
        client = self.tiny(net, "ada")
        for _ in range(30):
            client.send_text("go")
        net.flush()
        replies = client.drain()
        self.assertEqual(replies[:4], ["GO"] * 4)
        self.assertIn("TINY-ERROR rate limit exceeded", replies)
        self.assertEqual(client.close_code, 1008)

    def test_its_label_is_its_registry_parts_in_the_metrics(self):
        """
        Metrics count peers by registry part, labelled by the dialect that
        owns it: a tiny peer shares the examples' part, and counts there.
        """
        net = self.net()
        self.tiny(net, "ada")
        collector = SignallingCollector(net.factory.stats, net.registry, [], WITH_TINY)
        [peers] = [m for m in collector.collect() if m.name == "signalling_peers"]
        by_label = {s.labels["dialect"]: s.value for s in peers.samples}
        self.assertEqual(by_label, {"examples": 1, "json": 0})


class MemoryThirdDialectTests(ThirdDialectMixin, unittest.TestCase):
    """Over the in-memory registry."""


class ReorderingThirdDialectTests(ThirdDialectMixin, unittest.TestCase):
    """Over the reordering backend (answers delayed on a fake clock)."""

    backend = staticmethod(lambda clock, seed: backends.reordering(clock, 7))

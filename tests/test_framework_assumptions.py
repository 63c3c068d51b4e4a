"""
What the server assumes about Autobahn's and Twisted's internals, checked
by name: every override and private name of ``signalling/server/websocket.py``
(the WebSocket layer), what ``signalling/server/transport.py`` (the layer's
flow control and socket state, on Twisted's public interfaces) assumes of
Twisted's TLS layer and producers, the one private name of
``signalling/server/listening.py`` (Twisted's reading of systemd's sockets)
and those of ``signalling/server/tls.py`` (the start and the end of a TLS
connection). An
upgrade that changes one of them fails the test that names it, here,
rather than a call in production.

``setup.cfg`` caps Twisted and Autobahn below the next major version; when
raising the cap, this module is the first thing to run.
"""

import inspect
import os

import txaio
from autobahn.twisted import util as autobahn_util
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.xormasker import create_xor_masker
from OpenSSL import SSL
from twisted.internet import endpoints
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python import systemd
from twisted.scripts import _twistd_unix
from twisted.trial import unittest

from signalling.server import websocket


UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def fresh_connection(testcase, upgraded=False):
    """
    :returns: an Autobahn server protocol after ``_connectionMade`` (and the
        opening handshake, if ``upgraded``), on a StringTransport, its timers
        on a fake clock.
    """
    testcase.patch(txaio.config, "loop", Clock())
    factory = WebSocketServerFactory("ws://localhost")
    proto = WebSocketServerProtocol()
    proto.factory = factory
    proto.makeConnection(StringTransport())
    if upgraded:
        proto.dataReceived(UPGRADE)
    return proto


def source(function):
    return inspect.getsource(function)


class AutobahnProtocolTests(unittest.TestCase):
    """Autobahn's server protocol, as the WebSocket layer uses it."""

    def test_config_attrs_name_every_protocol_option(self):
        """
        ``CONFIG_ATTRS`` lists the options ``_connectionMade`` copies from the
        factory; the fast layer reads them from the factory instead.
        """
        attrs = WebSocketServerProtocol.CONFIG_ATTRS
        for name in (
            "maxMessagePayloadSize",
            "maxFramePayloadSize",
            "utf8validateIncoming",
            "autoPingInterval",
            "autoPingTimeout",
            "closeHandshakeTimeout",
            "openHandshakeTimeout",
            "logFrames",
            "logOctets",
            "maskServerFrames",
            "requireMaskedClientFrames",
            "autoPingRestartOnAnyTraffic",
            "trustXForwardedFor",
        ):
            self.assertIn(name, attrs)
        factory = WebSocketServerFactory("ws://localhost")
        for name in attrs:
            self.assertTrue(hasattr(factory, name), name)

    def test_connection_made_sets_the_defaults_the_fast_layer_keeps_on_the_class(self):
        """
        After the opening handshake every attribute the fast layer provides
        as a class-level default exists, with that default's value.
        """
        proto = fresh_connection(self, upgraded=True)
        for name, value in websocket._AUTOBAHN_DEFAULTS.items():
            self.assertTrue(hasattr(proto, name), name)
            if name not in ("data", "openHandshakeTimeoutCall"):
                self.assertEqual(getattr(proto, name), value, name)
        self.assertEqual(proto.data, b"")

    def test_connection_made_sets_nothing_the_fast_layer_does_not_set_or_provide(self):
        """
        Every attribute Autobahn's ``_connectionMade`` sets on a connection
        is one the fast layer's own ``_connectionMade`` sets, a class-level
        default of the fast layer (with Autobahn's value), an option it
        reads from the factory, or the UTF-8 validator it makes on use.
        """
        proto = fresh_connection(self)
        before = WebSocketServerProtocol()
        set_by_autobahn = set(proto.__dict__) - set(before.__dict__)
        set_by_the_layer = {"trafficStats", "state", "send_queue", "openHandshakeTimeoutCall"}
        options = set(WebSocketServerProtocol.CONFIG_ATTRS)
        for name in set_by_autobahn - {"factory", "transport", "connected", "peer"}:
            if name in websocket._AUTOBAHN_DEFAULTS:
                if name != "openHandshakeTimeoutCall":
                    self.assertEqual(getattr(proto, name), websocket._AUTOBAHN_DEFAULTS[name], name)
                continue
            self.assertIn(name, set_by_the_layer | options | {"utf8validator"}, name)
        self.assertIn("self.trackTimings", source(WebSocketProtocol._connectionMade))
        self.assertIn("self.onOpenHandshakeTimeout", source(WebSocketProtocol._connectionMade))

    def test_connection_made_and_on_open_of_the_twisted_adapter(self):
        """
        The Twisted adapter's ``connectionMade`` takes the peer from
        ``peer2str`` (the layer calls it alone), sets TCP_NODELAY and calls
        ``_connectionMade``; its ``_onOpen`` fills in the transport's details
        and calls ``onOpen`` (the layer makes the details on use instead).
        """
        made = source(WebSocketServerProtocol.connectionMade)
        self.assertIn("create_transport_details(", made)
        self.assertIn("setTcpNoDelay(self.tcpNoDelay)", made)
        self.assertIn("self._connectionMade()", made)
        self.assertIn("peer = peer2str(transport)", source(autobahn_util.create_transport_details))
        self.assertIn("self.onOpen()", source(WebSocketServerProtocol._onOpen))
        self.assertIn("self._transport_details", source(WebSocketServerProtocol.transport_details.fget))
        self.assertIn("TransportDetails()", source(WebSocketProtocol.__init__))

    def test_connection_lost_of_the_twisted_adapter_does_no_more_than_a_tls_error_line(self):
        """
        The Twisted adapter's ``connectionLost`` calls ``_connectionLost``,
        and besides debug lines logs a TLS error (which the layer handles
        first); the fast layer calls ``_connectionLost`` alone.
        """
        text = source(WebSocketServerProtocol.connectionLost)
        self.assertIn("self._connectionLost(reason)", text)
        self.assertIn("_is_tls_error(reason.value)", text)
        self.assertEqual(text.count("self.log.error("), 1)
        self.assertNotIn("self.log.info(", text)
        self.assertNotIn("self.log.warn", text)

    def test_send_data_writes_at_once_unless_chopped_synchronous_or_queued(self):
        """``sendData`` writes to the transport at once unless chopped, synchronous or queued."""
        text = source(WebSocketProtocol.sendData)
        self.assertIn("if sync or len(self.send_queue) > 0:", text)
        self.assertIn("self.transport.write(data)", text)
        self.assertIn("preopenOutgoingOctetsWireLevel", text)

    def test_handshake_leftovers_exist_after_an_opening_handshake(self):
        """The attributes dropped once the connection is open are Autobahn's handshake state."""
        proto = fresh_connection(self, upgraded=True)
        self.assertEqual(proto.state, WebSocketProtocol.STATE_OPEN)
        for name in websocket._HANDSHAKE_LEFTOVERS:
            self.assertIn(name, proto.__dict__, name)

    def test_states_and_send_state(self):
        """The state constants the layer compares against."""
        self.assertEqual(
            (WebSocketProtocol.STATE_CLOSED, WebSocketProtocol.STATE_OPEN),
            (websocket._CLOSED, websocket._OPEN),
        )
        self.assertTrue(hasattr(WebSocketProtocol, "SEND_STATE_GROUND"))

    def test_entry_points_the_layer_overrides_or_calls(self):
        """Each private method the layer overrides or calls exists, with the arguments it passes."""
        for name, params in (
            ("_connectionMade", ["self"]),
            ("_connectionLost", ["self", "reason"]),
            ("_dataReceived", ["self", "data"]),
            ("processData", ["self"]),
            ("processHandshake", ["self"]),
            ("_cancelAutoPingTimeoutCall", ["self"]),
            ("failHandshake", None),
            ("sendFrame", None),
            ("sendCloseFrame", ["self", "code", "reasonUtf8", "isReply"]),
            ("dropConnection", ["self", "abort"]),
            ("_fail_connection", None),
        ):
            method = getattr(WebSocketServerProtocol, name, None)
            self.assertIsNotNone(method, name)
            if params is not None:
                self.assertEqual(
                    list(inspect.signature(method).parameters)[: len(params)], params, name
                )

    def test_frame_and_message_bookkeeping_attributes(self):
        """The receive path's state: the buffer, the current frame, fragments, compression."""
        proto = fresh_connection(self, upgraded=True)
        for name in ("data", "current_frame", "inside_message", "_perMessageCompress", "failedByMe"):
            self.assertTrue(hasattr(proto, name), name)

    def test_traffic_stats_fields(self):
        """The counters the fast paths keep up to date."""
        stats = fresh_connection(self).trafficStats
        for name in (
            "incomingOctetsWebSocketLevel",
            "incomingOctetsAppLevel",
            "incomingWebSocketFrames",
            "incomingWebSocketMessages",
            "outgoingWebSocketFrames",
            "outgoingOctetsWireLevel",
        ):
            self.assertIsInstance(getattr(stats, name), int, name)

    def test_send_queue_is_a_queue_of_chopped_writes(self):
        """``send_queue`` exists after ``_connectionMade`` and is what ``sendData`` appends to."""
        proto = fresh_connection(self)
        self.assertEqual(len(proto.send_queue), 0)
        self.assertIn("send_queue", source(WebSocketProtocol.sendData))

    def test_close_bookkeeping(self):
        """Who closed, with what, and why not cleanly: read by close_cause."""
        proto = fresh_connection(self)
        for name in (
            "closedByMe",
            "localCloseCode",
            "localCloseReason",
            "remoteCloseCode",
            "wasClean",
            "wasNotCleanReason",
            "openHandshakeTimeoutCall",
            "closeHandshakeTimeoutCall",
            "autoPingTimeoutCall",
        ):
            self.assertTrue(hasattr(proto, name), name)

    def test_a_server_aborts_after_the_peer_answers_its_close(self):
        """
        Autobahn's server drops the TCP connection with ``abort=True`` once
        the close handshake completes; the layer turns that into a graceful
        close so that a close frame written last is not thrown away.
        """
        text = source(WebSocketProtocol.onCloseFrame)
        self.assertIn("self.dropConnection(abort=True)", text)
        self.assertIn("self.dropConnection(abort=False)", text)

    def test_a_failed_connection_ends_with_a_graceful_drop(self):
        """
        A protocol violation sends a close frame and may then drop
        gracefully (``abort=False``), which over TLS waits for the peer: the
        layer bounds that wait.
        """
        self.assertIn("self.dropConnection(abort=False)", source(WebSocketProtocol._fail_connection))

    def test_observers_of_message_are_in_listeners(self):
        """``on("message")`` observers live in txaio's ``_listeners`` (None when there are none)."""
        proto = fresh_connection(self)
        self.assertIsNone(proto._listeners)
        proto.on("message", lambda *args, **kwargs: None)
        self.assertIsNotNone(proto._listeners)
        self.assertTrue(callable(proto.fire))

    def test_batched_timer_is_on_the_factory(self):
        """Autobahn's timers go through the factory's batched timer (the tests look for leftovers)."""
        factory = WebSocketServerFactory("ws://localhost")
        self.assertTrue(hasattr(factory, "_batched_timer"))
        self.assertIn("_batched_timer", source(WebSocketProtocol.sendCloseFrame))
        # The keepalive's pong deadline is on it too (wait_longer_for_pong
        # arms it again for a peer whose input the server holds back).
        self.assertIn("_batched_timer", source(WebSocketProtocol._sendAutoPing))
        self.assertIn("autoPingTimeoutCall", source(WebSocketProtocol._sendAutoPing))

    def test_connection_count_is_kept_by_the_server_protocol(self):
        """``countConnections`` goes up in ``_connectionMade`` and down in ``_connectionLost``."""
        self.assertIn("countConnections += 1", source(WebSocketServerProtocol._connectionMade))
        self.assertIn("countConnections -= 1", source(WebSocketServerProtocol._connectionLost))

    def test_xor_masker(self):
        """``create_xor_masker(mask, length).process(payload)`` unmasks a payload."""
        masked = create_xor_masker(b"\x01\x02\x03\x04", 4).process(b"\x01\x02\x03\x04")
        self.assertEqual(masked, b"\x00\x00\x00\x00")
        self.assertEqual(
            websocket._unmask(b"\x01\x02\x03\x04" * 1000, b"\x01\x02\x03\x04"), bytes(4000)
        )

    def test_tls_reasons_are_made_by_autobahn_util(self):
        """The log line the layer replaces is Autobahn's ``_maybe_tls_reason``."""
        from autobahn import util

        self.assertTrue(callable(util._maybe_tls_reason))
        self.assertIn("_maybe_tls_reason", source(autobahn_protocol))


class AutobahnCycleTests(unittest.TestCase):
    """What the WebSocket layer unlinks when a connection is lost."""

    def test_is_closed_is_resolved_with_the_protocol_itself(self):
        """``_unlink`` drops ``is_closed``, whose result is the protocol: a cycle."""
        self.assertIn("txaio.resolve(self.is_closed, self)", source(WebSocketProtocol._connectionLost))
        self.assertIn("self.is_closed = txaio.create_future()", source(WebSocketProtocol.__init__))


class TwistedTests(unittest.TestCase):
    """Twisted, as the WebSocket layer, the TLS layer and listening use it."""

    def test_tls_shutdown_gets_the_failure_made_while_reading(self):
        """
        ``signalling/server/tls.py`` overrides ``_tlsShutdownFinished(reason)``
        to clean the failure ``_flushReceiveBIO`` makes (and keeps in a
        local, a reference cycle through its traceback).
        """
        self.assertEqual(
            list(inspect.signature(TLSMemoryBIOProtocol._tlsShutdownFinished).parameters),
            ["self", "reason"],
        )
        flush = source(TLSMemoryBIOProtocol._flushReceiveBIO)
        self.assertIn("Failure()", flush)
        self.assertIn("self._tlsShutdownFinished(failure)", flush)

    def test_tls_layer_flushes_its_send_bio_with_one_read_and_one_write(self):
        """
        ``signalling/server/tls.py`` overrides ``_flushSendBIO`` with the same
        read of the send BIO, and sends what it read with ``send_now``
        instead of the transport's ``write``.
        """
        lines = [
            line.strip()
            for line in source(TLSMemoryBIOProtocol._flushSendBIO).splitlines()
            if line.strip() and not line.strip().startswith("#")
        ]
        body = lines[lines.index('"""', 2) + 1 :] if lines[1] == '"""' else lines
        self.assertIn("bytes = self._tlsConnection.bio_read(2**15)", body)
        self.assertIn("except WantReadError:", body)
        self.assertEqual(body[-2:], ["else:", "self.transport.write(bytes)"])
        self.assertEqual(len([line for line in body if "self." in line]), 2)

    def test_tls_layer_is_a_protocol_wrapper(self):
        """The hand-over to the pages swaps ``wrappedProtocol`` of the TLS layer."""
        self.assertTrue(issubclass(TLSMemoryBIOProtocol, ProtocolWrapper))
        self.assertIn("wrappedProtocol", source(ProtocolWrapper.__init__))

    def test_tls_layer_make_connection_is_what_the_port_layer_repeats(self):
        """
        ``signalling/server/tls.py`` makes a TLS connection as Twisted's
        ``makeConnection`` does, without its declarations of the
        transport's interfaces one by one, which ``ProtocolWrapper``'s
        ``makeConnection`` makes at once (and registers the protocol).
        """
        lines = [
            line.strip()
            for line in source(TLSMemoryBIOProtocol.makeConnection).splitlines()
            if line.strip() and not line.strip().startswith(("#", '"""', "Connect", "necessary"))
        ]
        self.assertEqual(
            lines[1:],
            [
                "self._tlsConnection = self.factory._creatorCallable(self)",
                "self._appSendBuffer = []",
                "for interface in providedBy(transport):",
                "directlyProvides(self, interface)",
                "Protocol.makeConnection(self, transport)",
                "self.factory.registerProtocol(self)",
                "if self._connectWrapped:",
                "ProtocolWrapper.makeConnection(self, transport)",
                "self._checkHandshakeStatus()",
            ],
        )
        wrapper = source(ProtocolWrapper.makeConnection)
        self.assertIn("directlyProvides(self, providedBy(transport))", wrapper)
        self.assertIn("self.factory.registerProtocol(self)", wrapper)
        self.assertIn("self.wrappedProtocol.makeConnection(self)", wrapper)

    def test_tls_layer_hands_out_the_openssl_connection(self):
        """
        ``signalling/server/transport.py`` finds the socket under TLS by
        ``getHandle()`` (the OpenSSL connection, whose ``pending()`` counts
        decrypted bytes not yet read) and the TLS layer's ``transport`` (TCP).
        """
        self.assertIn("return self._tlsConnection", source(TLSMemoryBIOProtocol.getHandle))
        self.assertTrue(callable(SSL.Connection.pending))
        self.assertIn("Protocol.makeConnection(self, transport)", source(TLSMemoryBIOProtocol.makeConnection))

    def test_a_second_producer_is_refused_with_runtime_error(self):
        """
        A transport refuses a producer while another is registered (the
        pages' channel, after a hand-over), with RuntimeError, which
        ``TransportControl._watch_output`` catches; the TLS layer passes its
        producer on to the TCP transport, which decides.
        """
        from twisted.internet.abstract import FileDescriptor

        transport = FileDescriptor(reactor=Clock())
        transport.registerProducer(object(), True)
        self.assertRaises(RuntimeError, transport.registerProducer, object(), True)
        self.assertIn("self.transport.registerProducer(", source(TLSMemoryBIOProtocol.registerProducer))

    def test_tcp_transport_protocol_is_swappable(self):
        """A TCP transport delivers to its ``protocol`` attribute, which the hand-over replaces."""
        from twisted.internet import tcp

        self.assertIn("self.protocol", source(tcp.Connection.doRead))

    def test_systemd_parser_keeps_the_descriptors_it_read(self):
        """
        Twisted reads (and removes from the environment) LISTEN_FDS when its
        endpoints module is imported, into ``_SystemdParser._sddaemon``; the
        server looks there for the sockets systemd passed.
        """
        listen_fds = endpoints._SystemdParser._sddaemon
        self.assertIsInstance(listen_fds, systemd.ListenFDs)
        self.assertIsInstance(listen_fds.inheritedDescriptors(), list)
        self.assertIsInstance(listen_fds.inheritedNamedDescriptors(), dict)

    def test_listen_fds_without_names_are_dropped(self):
        """
        Without LISTEN_FDNAMES Twisted sees no sockets at all (why the
        server finds unnamed ones by index itself).
        """
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
        self.assertEqual(systemd.ListenFDs.fromEnvironment(environ=env).inheritedDescriptors(), [])

    def test_twistd_daemon_reports_exceptions_but_not_system_exit(self):
        """
        twistd's daemon start tells the waiting parent of an ``Exception``,
        not of a bare ``SystemExit`` (why start-up errors are both).
        """
        text = source(_twistd_unix.UnixApplicationRunner.postApplication)
        self.assertIn("except Exception", text)
        self.assertIn("statusPipe", text)


class TxRedisApiTests(unittest.TestCase):
    """
    What ``signalling/cluster/redis.py`` relies on in txredisapi, checked on
    its protocol classes fed Redis's replies in memory.
    """

    def protocol(self, cls):
        import txredisapi

        p = getattr(txredisapi, cls)(charset=None, replyTimeout=5.0, convertNumbers=False)
        # Its timers (the reply timeout; the rest of a read after a bulk
        # string, handled in a later turn) follow this clock.
        self.clock = Clock()
        p.callLater = self.clock.callLater
        transport = StringTransport()
        p.makeConnection(transport)
        return p, transport

    def feed(self, p, data):
        """Hand ``data`` to ``p`` and run the turns it schedules to finish reading it."""
        p.dataReceived(data)
        while any(call.getTime() <= self.clock.seconds() for call in self.clock.getDelayedCalls()):
            self.clock.advance(0)

    def test_commands_are_sent_at_once_and_answered_in_order_as_bytes(self):
        """
        ``execute_command`` writes the command at once (RESP), connectionMade
        needs nothing more without password or database, and with
        ``charset=None`` and ``convertNumbers=False`` a bulk reply stays bytes
        (a uid "123" stays b"123"), an integer reply is an int, a nested
        array a list, and a Redis error fails the Deferred.
        """
        p, transport = self.protocol("RedisProtocol")
        self.assertTrue(p.connected)
        results = []
        for args in (("EVALSHA", "abc", 0, "x"), ("PUBLISH", "ch", b"\x00raw"), ("GET", "k")):
            p.execute_command(*args).addBoth(results.append)
        self.assertEqual(
            transport.value(),
            b"*4\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n0\r\n$1\r\nx\r\n"
            b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$4\r\n\x00raw\r\n"
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
        )
        self.feed(p, b"*2\r\n$2\r\nok\r\n*1\r\n$3\r\n123\r\n:3\r\n-ERR nope\r\n")
        self.assertEqual(results[:2], [[b"ok", [b"123"]], 3])
        self.assertIn("nope", results[2].getErrorMessage())

    def test_a_subscriber_hands_over_each_message_with_its_channel(self):
        """``messageReceived(pattern, channel, message)`` gets every published message, as bytes."""
        p, _ = self.protocol("SubscriberProtocol")
        got = []
        p.messageReceived = lambda pattern, channel, message: got.append((channel, message))
        p.subscribe("sig:n:x")
        self.feed(p, b"*3\r\n$9\r\nsubscribe\r\n$7\r\nsig:n:x\r\n:1\r\n")
        self.feed(p, b"*3\r\n$7\r\nmessage\r\n$7\r\nsig:n:x\r\n$3\r\nS\x001\r\n")
        self.assertEqual(got, [(b"sig:n:x", b"S\x001")])

    def test_a_lost_connection_fails_what_awaits_an_answer(self):
        """Commands waiting for an answer fail when the connection is lost (the node then counts an outage)."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        p, _ = self.protocol("RedisProtocol")
        d = p.execute_command("GET", "k")
        p.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d)
        for call in self.clock.getDelayedCalls():
            call.cancel()

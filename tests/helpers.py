"""
Shared test helpers: a fake peer for registry tests, a recording WebSocket
client, an in-memory loopback between server and clients, and a certificate
writer.
"""

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.task import Clock
from twisted.test import iosim
from zope.interface import implementer
import txaio

from signalling.server import tls
from signalling.server.factory import SignallingServerFactory
from signalling.core.interfaces import BINARY_FRAME, TEXT_FRAME, ILink, IPeer
from signalling.core.registry import Registry


@implementer(IPeer, ILink)
class FakePeer:
    """
    An :class:`IPeer` that records every call the registry makes on it, and
    (as its own :attr:`receiver`) every message relayed to it, as
    ``(payload, is_binary)`` in :attr:`frames`. :meth:`send` relays through
    the link it was handed.
    """

    def __init__(self, name="peer"):
        self.name = name
        self.calls = []
        self.frames = []
        self.link = None
        self.receiver = self

    def __repr__(self):
        return f"<FakePeer {self.name}>"

    def send_frames(self, frames):
        for first, payload in frames:
            self.frames.append((payload, first == BINARY_FRAME))

    def send(self, payload, is_binary):
        """Relay one message to the partner through the link handed over."""
        self.link.send_frames(((BINARY_FRAME if is_binary else TEXT_FRAME, payload),))

    def session_started(self, partner_uid, link, caller):
        self.link = link
        self.calls.append(("session_started", partner_uid, caller))

    def session_ended(self, partner_uid):
        self.calls.append(("session_ended", partner_uid))

    def room_joined(self, room_id, members):
        self.calls.append(("room_joined", room_id, list(members)))

    def room_peer_joined(self, room_id, uid):
        self.calls.append(("room_peer_joined", room_id, uid))

    def room_peer_left(self, room_id, uid):
        self.calls.append(("room_peer_left", room_id, uid))

    def room_message(self, sender_uid, payload):
        self.calls.append(("room_message", sender_uid, payload))


class RecordingClientProtocol(WebSocketClientProtocol):
    """
    A real Autobahn client that records what it receives: ``messages`` holds
    text as ``str`` and binary as ``bytes``; ``close`` is ``(wasClean, code,
    reason)`` once the connection closed.
    """

    def __init__(self):
        super().__init__()
        self.messages = []
        self.opened = False
        self.close_info = None

    def onOpen(self):
        self.opened = True

    def onMessage(self, payload, isBinary):
        self.messages.append(payload if isBinary else payload.decode("utf-8"))

    def onClose(self, wasClean, code, reason):
        self.close_info = (wasClean, code, reason)

    def send_text(self, text):
        self.sendMessage(text.encode("utf-8"), isBinary=False)

    def take(self):
        """:returns: the messages received so far, and forgets them."""
        messages, self.messages = self.messages, []
        return messages

    @property
    def close_code(self):
        """The close code the server sent, or None while open."""
        if self.close_info is None:
            return None
        return self.remoteCloseCode


class DeafClientProtocol(RecordingClientProtocol):
    """A client that never answers pings, like a peer whose network died."""

    def onPing(self, payload):
        pass


class Loopback:
    """
    A signalling server factory and any number of real Autobahn clients
    connected to it in memory, on one :class:`Clock` (Autobahn's own timers
    follow it through ``txaio.config.loop``).

    :param testcase: the ``TestCase``; used to patch txaio's loop.
    :param registry: the registry; else ``backend(clock, seed)`` (see
        ``tests/backends.py``); else a new in-memory one.
    """

    def __init__(self, testcase, registry=None, backend=None, seed=0, **factory_kwargs):
        self.clock = Clock()
        testcase.patch(txaio.config, "loop", self.clock)
        if registry is None:
            registry = backend(self.clock, seed) if backend is not None else Registry()
        self.registry = registry
        factory_kwargs.setdefault("keepalive", 5)
        self.factory = SignallingServerFactory(
            "ws://localhost", self.registry, self.clock, **factory_kwargs
        )
        self.pumps = []

    def client(self, protocol=None):
        """
        :param protocol: the client protocol class; a
            :class:`RecordingClientProtocol` by default.
        :returns: a new connected (and opened) client.
        """
        client_factory = WebSocketClientFactory("ws://localhost")
        client_factory.protocol = protocol or RecordingClientProtocol
        server = self.factory.buildProtocol(None)
        client = client_factory.buildProtocol(None)
        pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            clock=self.clock,
        )
        client.server = server
        client.pump = pump
        self.pumps.append(pump)
        return client

    def deliver_bytes(self):
        """
        Deliver every pending byte in every direction, without moving the
        clock: what the backend has in flight stays in flight.
        """
        while any(pump.pump() for pump in self.pumps):
            pass

    def flush(self):
        """
        Deliver every pending byte in every direction, and everything the
        backend has in flight (moving the clock on as far as that takes),
        until quiet.
        """
        next_delivery = getattr(self.registry, "next_delivery", None)
        while True:
            while any(pump.pump() for pump in self.pumps):
                pass
            wait = next_delivery() if next_delivery is not None else None
            if wait is None:
                return
            self.clock.advance(wait)

    def hello(self, uid, protocol=None):
        """:returns: a client registered as ``uid``."""
        client = self.client(protocol)
        client.send_text(f"HELLO {uid}")
        self.flush()
        received = client.take()
        if received != ["HELLO"]:
            raise AssertionError(f"HELLO {uid} answered {received!r}")
        return client


def write_certificate(directory):
    """
    Write a self-signed certificate for ``localhost`` into ``directory``.

    :returns: a :class:`signalling.server.tls.CertificateFiles`, with ``pem`` (the
        certificate's PEM bytes) added for clients to trust.
    """
    files = tls.create_self_signed(directory)
    with open(files.cert, "rb") as f:
        files.pem = f.read()
    return files

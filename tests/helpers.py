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

from signalling import tls
from signalling.factory import SignallingServerFactory
from signalling.interfaces import IPeer
from signalling.registry import Registry


@implementer(IPeer)
class FakePeer:
    """An :class:`IPeer` that records every call the registry makes on it."""

    def __init__(self, name="peer"):
        self.name = name
        self.calls = []
        self.frames = []
        self.link = None

    def __repr__(self):
        return f"<FakePeer {self.name}>"

    def send_frame(self, payload, is_binary):
        self.frames.append((payload, is_binary))

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
    """

    def __init__(self, testcase, registry=None, **factory_kwargs):
        self.clock = Clock()
        testcase.patch(txaio.config, "loop", self.clock)
        self.registry = registry if registry is not None else Registry()
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

    def flush(self):
        """Deliver every pending byte in every direction, until quiet."""
        while any(pump.pump() for pump in self.pumps):
            pass

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

    :returns: a :class:`signalling.tls.CertificateFiles`, with ``pem`` (the
        certificate's PEM bytes) added for clients to trust.
    """
    files = tls.create_self_signed(directory)
    with open(files.cert, "rb") as f:
        files.pem = f.read()
    return files

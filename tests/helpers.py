"""
Small shared test helpers: a fake peer for registry tests, the server's
command line and its factories as tests look into them, and running
commands (packaging, the README's commands) in a clean environment.

The servers are in ``tests/servers.py``, the clients in ``tests/clients.py``,
certificates in ``tests/certificates.py``, the backends of the conformance
suites in ``tests/backends.py``.
"""

import os
import shutil

from twisted.internet import defer, reactor
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from signalling.core.interfaces import BINARY_FRAME, TEXT_FRAME, ILink, IPeer
from signalling.server import tap
from signalling.server.factory import SignallingServerFactory
from signalling.server.metrics import Stats
from signalling.server.policy import HandshakePolicy
from signalling.server.settings import ServerSettings


def signalling_factory(
    registry,
    clock,
    url=None,
    stats=None,
    web=None,
    count_addresses=False,
    auth=None,
    limits=None,
    server_names=None,
    **settings,
):
    """
    :returns: a :class:`SignallingServerFactory` whose settings are the
        defaults with ``settings`` (field names of
        :class:`signalling.server.settings.ServerSettings`), and whose
        handshake policy holds ``auth``, ``limits`` and ``server_names``.
    """
    settings = ServerSettings(**settings)
    stats = Stats() if stats is None else stats
    policy = HandshakePolicy(settings, stats, auth, limits, server_names)
    return SignallingServerFactory(
        url, registry, clock, settings, policy, stats, web, count_addresses
    )


def open_from(limits, host):
    """:returns: how many connections ``host`` (by its key: an IPv6 prefix) holds in ``limits``."""
    return limits._open.get(limits.key_of(host), 0)


def change_settings(factory, **changes):
    """
    Give a listening factory (or the factories of a cluster's nodes, as
    tests/test_cluster.py joins them) new settings, as a restart with other
    options would: the factory's and its handshake policy's.
    """
    for one in getattr(factory, "_factories", [factory]):
        settings = one.settings.replace(**changes)
        one.settings = one.policy.settings = settings
        one.fits_unchecked = settings.fits_unchecked


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

    def set_backpressure(self, active):
        self.calls.append(("set_backpressure", active))

    #: What :meth:`probe` answers: whether the peer still answers pings.
    alive = True

    def probe(self, timeout):
        self.calls.append(("probe", timeout))
        return defer.succeed(self.alive)

    def replaced(self):
        self.calls.append(("replaced",))

    def unavailable(self):
        self.calls.append(("unavailable",))

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


#: The checkout's root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#: What is left out of the copy: local state that a fresh clone has not.
JUNK = shutil.ignore_patterns(
    ".git",
    ".venv",
    "_trial_temp*",
    "__pycache__",
    "*.pyc",
    "build",
    "dist",
    "*.egg-info",
    "dropin.cache",
    "twistd.pid",
    "twistd.log*",
)

#: Seconds for one command run from the venv.
COMMAND_TIMEOUT = 60

def clean_environment():
    """
    :returns: this process's environment without what would let the venv
        see the checkout or another environment (PYTHONPATH and friends).
    """
    env = dict(os.environ)
    for name in (
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "PYTHONUSERBASE",
        "VIRTUAL_ENV",
    ):
        env.pop(name, None)
    env["PYTHONNOUSERSITE"] = "1"
    return env


def run(executable, args, env=None, path=None, timeout=COMMAND_TIMEOUT):
    """
    Run a command to completion on the reactor.

    :returns: a Deferred firing with ``(stdout, stderr, exit code)`` as text.
    """
    if env is None:
        env = clean_environment()
    d = getProcessOutputAndValue(executable, args, env=env, path=path)
    d.addTimeout(timeout, reactor)
    return d.addCallback(
        lambda r: (r[0].decode(errors="replace"), r[1].decode(errors="replace"), r[2])
    )


def parse(*argv):
    """:returns: ``tap.Options`` parsed from ``argv``."""
    config = tap.Options()
    config.parseOptions(list(argv))
    return config


def websocket_factory(factory):
    """
    :returns: the WebSocket factory a port listens with, ``factory`` itself,
        after checking that its pages' site hands a WebSocket upgrade that
        comes in over HTTP (after a plain request) back to it.
    """
    assert isinstance(factory, SignallingServerFactory), factory
    assert isinstance(factory.web, Site), factory.web
    request = DummyRequest([b""])
    request.requestHeaders.setRawHeaders(b"upgrade", [b"websocket"])
    request.requestHeaders.setRawHeaders(b"connection", [b"Upgrade"])
    resource = factory.web.getResourceFor(request)
    assert resource._factory is factory, resource._factory
    return factory


def http_get(factory, path):
    """
    Send a plain ``GET path`` to a port's factory over a string transport, as
    a connection would: the WebSocket side hands it on to the pages.

    :returns: the raw HTTP response bytes.
    """
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    transport.protocol = protocol
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    response = transport.value()
    transport.protocol.connectionLost(None)
    return response


def unwrap(factory):
    """:returns: the factory under a port's TLS layer, or ``factory`` itself."""
    if isinstance(factory, TLSMemoryBIOFactory):
        return factory.wrappedFactory
    return factory


def hide_service_manager(testcase):
    """
    Hide the systemd variables of the environment the tests run in from
    makeService (its Notifier reads them), restoring them after the test.
    """
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        if name in os.environ:
            testcase.addCleanup(os.environ.__setitem__, name, os.environ.pop(name))



"""
Support for the interoperability tests: real WebRTC stacks calling each
other through the real server, all inside a network namespace of their own.

The network rule: WebRTC traffic may only go to loopback addresses, and
nothing may be multicast. Each test makes a network namespace
(:class:`NetworkNamespace`) holding only ``lo`` and one more interface that
carries the loopback address :data:`NICE_ADDRESS` (libnice, GStreamer's ICE,
ignores interfaces flagged LOOPBACK, so ``lo`` alone would leave it without a
host candidate). Nothing in the namespace is linked to the outside, so no
packet can leave it; the test still checks that it holds no other address
before any process starts. The server (:class:`ServerInNamespace`) and the
peers (:class:`PeerProcess`) run in it with ``ip netns exec``; ICE uses host
candidates only, and the GStreamer peer turns libnice's UPnP off.

What the tests need: root (for ``ip netns``), iproute2, Debian's GStreamer
and PyGObject packages for ``contrib/gst_peer.py`` (run by the system
Python), and aiortc in this interpreter (the ``test`` extra).
:func:`check_requirements` tells what is missing; the tests skip then, except
in CI (``CI=true``), where they fail.

Every wait has a bound and fails the test with what the processes printed.
"""

import ipaddress
import itertools
import json
import os
import re
import shutil
import sys

from twisted.internet import reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import FailTest, SkipTest
from tests.certificates import write_certificate
from tests.clients import Waiting
from tests.servers import twistd_command


#: The checkout root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The GStreamer peer program, and the system Python that has ``gi``.
GST_PEER = os.path.join(ROOT, "contrib", "gst_peer.py")
SYSTEM_PYTHON = "/usr/bin/python3"

#: Debian packages these tests need (``.ci/run`` installs them).
DEBIAN_PACKAGES = (
    "iproute2 python3-gi gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 "
    "gir1.2-gst-plugins-bad-1.0 gir1.2-soup-3.0 glib-networking "
    "gstreamer1.0-plugins-base gstreamer1.0-plugins-good "
    "gstreamer1.0-plugins-bad gstreamer1.0-nice"
)

#: The second loopback address, on the namespace's non-loopback interface.
NICE_ADDRESS = "127.0.0.2"
#: The server's port inside the namespace (a fresh namespace has every port free).
SERVER_PORT = 8443
#: Seconds the server may take to start listening.
START_TIMEOUT = 20.0
#: Seconds a process may take to end after SIGTERM (then SIGKILL).
STOP_TIMEOUT = 10.0
#: Seconds one ``ip`` command may take.
IP_TIMEOUT = 10.0

#: Environment variables the children do not inherit: proxies (the
#: namespace has no route anywhere) and the venv's (for the system Python).
_DROPPED_ENV = re.compile(
    r"(?i)^(https?_proxy|all_proxy|no_proxy|ws_proxy|wss_proxy|pythonpath|pythonhome|"
    r"virtual_env|gst_debug|gst_plugin_path)$"
)

_names = itertools.count(1)
_requirements = None


def in_ci():
    """:returns: True when running in CI (``CI=true``)."""
    return os.environ.get("CI", "").lower() == "true"


def missing_requirement(reason):
    """
    Skip the test because ``reason`` (a missing requirement); in CI, fail it.
    """
    message = f"interop test requirement missing: {reason}"
    if in_ci():
        raise FailTest(message + " (CI=true: missing dependencies fail)")
    raise SkipTest(message)


def child_env(**extra):
    """:returns: this process's environment, cleaned for a child, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not _DROPPED_ENV.match(k)}
    env.update(extra)
    return env


async def _run(*argv, timeout=IP_TIMEOUT):
    """
    Run a short command.

    :returns: ``(out, err, code)`` as text.
    """
    d = getProcessOutputAndValue(argv[0], argv[1:], env=child_env())
    d.addTimeout(timeout, reactor)
    out, err, code = await d
    return out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), code


async def check_requirements():
    """
    Check, once per test run, what the interop tests need.

    :returns: None when everything is there, else a sentence naming what is
        missing and how to install it.
    """
    global _requirements
    if _requirements is None:
        _requirements = [await _find_missing()]
    return _requirements[0]


async def _find_missing():
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating a network namespace needs root"
    if shutil.which("ip") is None:
        return "the ip command; install the Debian package iproute2"
    try:
        import aiortc  # noqa: F401
        import websockets  # noqa: F401
    except ImportError as e:
        return f"{e}; install the test extra: pip install '.[test]'"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON}; install the Debian packages {DEBIAN_PACKAGES}"
    out, err, code = await _run(SYSTEM_PYTHON, GST_PEER, "--check", timeout=60)
    if code != 0:
        return (err.strip() or out.strip() or f"gst_peer.py --check exited {code}") + (
            f" (Debian packages: {DEBIAN_PACKAGES})"
        )
    return None


class NetworkNamespace:
    """
    A network namespace holding ``lo`` (127.0.0.1, ::1) and one interface
    carrying :data:`NICE_ADDRESS`: a ``dummy`` interface where the kernel
    has them, else a pair of ``veth`` interfaces, both inside (the second
    without any address). IPv6 address generation is off on them, so they
    carry no link-local address.
    """

    def __init__(self):
        self.name = f"sigtest-{os.getpid()}-{next(_names)}"
        self.created = False

    async def ip(self, *args):
        """Run ``ip -n NAME ARGS``; fails the test if it fails."""
        out, err, code = await _run("ip", "-n", self.name, *args)
        if code != 0:
            raise FailTest(f"ip -n {self.name} {' '.join(args)} failed: {err.strip()}")
        return out

    async def create(self):
        """Create and set up the namespace (and skip or fail if that is impossible)."""
        out, err, code = await _run("ip", "netns", "add", self.name)
        if code != 0:
            missing_requirement(f"cannot create a network namespace: {err.strip()}")
        self.created = True
        await self.ip("link", "set", "lo", "up")
        links = ["sig0"]
        out, err, code = await _run("ip", "-n", self.name, "link", "add", "sig0", "type", "dummy")
        if code != 0:
            # No dummy driver here (a container, say): a veth pair instead.
            await self.ip("link", "add", "sig0", "type", "veth", "peer", "name", "sig1")
            links.append("sig1")
        for link in links:
            await self.ip("link", "set", link, "addrgenmode", "none")
        await self.ip("addr", "add", f"{NICE_ADDRESS}/32", "dev", "sig0")
        for link in reversed(links):
            await self.ip("link", "set", link, "up")

    async def addresses(self):
        """:returns: ``[(interface, address), ...]`` for every address in the namespace."""
        found = []
        for link in json.loads(await self.ip("-j", "addr", "show")):
            for info in link.get("addr_info", []):
                found.append((link["ifname"], info["local"]))
        return found

    async def assert_loopback_only(self):
        """
        Fail unless every address in the namespace is a loopback address
        and :data:`NICE_ADDRESS` is among them.
        """
        addresses = await self.addresses()
        others = [(i, a) for i, a in addresses if not ipaddress.ip_address(a).is_loopback]
        if others:
            raise FailTest(f"namespace {self.name} has non-loopback addresses: {others}")
        if ("sig0", NICE_ADDRESS) not in addresses:
            raise FailTest(f"namespace {self.name} lacks {NICE_ADDRESS} on sig0: {addresses}")
        return addresses

    def command(self, argv):
        """:returns: ``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    async def delete(self):
        if self.created:
            await _run("ip", "netns", "delete", self.name)
            self.created = False


class OutputProcess(Waiting, ProcessProtocol):
    """
    A child process whose output is kept, with event-driven bounded waits.

    :ivar ended: the ``ProcessDone``/``ProcessTerminated`` once it ended.
    """

    def __init__(self, name):
        self.name = name
        self.stdout = b""
        self.stderr = b""
        self.ended = None
        self._waiters = []

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"

    @property
    def running(self):
        return self.ended is None

    @property
    def exit_code(self):
        """The exit status once ended (None if killed by a signal or running)."""
        return None if self.ended is None else self.ended.exitCode

    def outReceived(self, data):
        self.stdout += data
        self._changed()

    def errReceived(self, data):
        self.stderr += data
        self._changed()

    def processEnded(self, reason):
        self.ended = reason.value
        self._changed()

    def output(self, tail=4000):
        """The end of what it printed, for failure messages."""
        out = self.stdout.decode("utf-8", "replace")[-tail:]
        err = self.stderr.decode("utf-8", "replace")[-tail:]
        return f"--- {self.name} stdout:\n{out}\n--- {self.name} stderr:\n{err}"

    async def until(self, predicate, what, timeout):
        """
        Wait until ``predicate()`` holds, re-checked whenever the process
        prints something or ends.

        :raises FailTest: when it does not hold within ``timeout`` seconds,
            or the process ended first.
        """
        try:
            await self._until(lambda: predicate() or not self.running, what, timeout)
        except FailTest:
            pass
        if not predicate():
            state = "running" if self.running else f"ended ({self.ended})"
            raise FailTest(
                f"{self!r} ({state}): timed out after {timeout} s waiting for "
                f"{what}\n{self.output()}"
            )

    def signal(self, name):
        if self.running:
            try:
                self.transport.signalProcess(name)
            except OSError:
                pass

    async def stop(self, timeout=STOP_TIMEOUT):
        """SIGTERM, then SIGKILL if it does not end within ``timeout``."""
        if not self.running:
            return
        self.signal("TERM")
        try:
            await self.until(lambda: not self.running, "the end after SIGTERM", timeout)
        except FailTest:
            self.signal("KILL")
            await self.until(lambda: not self.running, "the end after SIGKILL", timeout)


class PeerProcess(OutputProcess):
    """
    A peer (``contrib/gst_peer.py`` or ``signalling-peer --json``) whose
    stdout is one JSON event a line (the schema is in ``gst_peer.py``).
    """

    def __init__(self, name, kind):
        super().__init__(name)
        self.kind = kind
        self.events = []
        self._partial = b""

    def __repr__(self):
        return f"<{self.kind} peer {self.name}>"

    def outReceived(self, data):
        self._partial += data
        *lines, self._partial = self._partial.split(b"\n")
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "unparsable", "line": line.decode("utf-8", "replace")}
            self.events.append(event)
        super().outReceived(data)

    def find(self, event, **fields):
        """:returns: the events named ``event`` whose fields have the given values."""
        return [
            e for e in self.events
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        ]

    async def wait_for(self, event, timeout, **fields):
        """:returns: the first such event, once it has been printed."""
        what = f"event {event!r} {fields}"
        await self.until(lambda: self.find(event, **fields), what, timeout)
        return self.find(event, **fields)[0]

    def ice_connected(self, peer):
        """True once ICE with ``peer`` has been connected (or completed)."""
        return any(
            e.get("state") in ("connected", "completed")
            for e in self.find("ice-connection-state", peer=peer)
        )

    def frames_from(self, peer, kind="video"):
        """:returns: how many frames of ``kind`` it last reported from ``peer``."""
        reports = self.find("media", peer=peer, kind=kind)
        return reports[-1]["frames"] if reports else 0

    def messages_from(self, peer):
        """:returns: the data channel messages received from ``peer``."""
        return [e["message"] for e in self.find("data", peer=peer)]

    def candidate_addresses(self):
        """:returns: the addresses of every local candidate it sent."""
        addresses = []
        for e in self.find("local-candidate"):
            words = e["candidate"].split()
            addresses.append(words[4] if len(words) > 4 else e["candidate"])
        return addresses


class ServerInNamespace(OutputProcess):
    """``twistd -n signalling`` running inside a namespace."""

    def __init__(self, tls):
        super().__init__("server")
        self.tls = tls
        self.url = None
        self.ca_file = None


class InteropMixin:
    """
    Fixtures for a ``TestCase``: requirements, the namespace, the server and
    the peers, all cleaned up (processes stopped, namespace deleted) after
    the test.
    """

    #: More options for the server (a test may set its own).
    server_args = ()

    async def start_namespace(self):
        """
        Check the requirements (skip or fail), create the namespace, and
        check that it holds loopback addresses only.

        :returns: the :class:`NetworkNamespace`.
        """
        reason = await check_requirements()
        if reason is not None:
            missing_requirement(reason)
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        namespace = NetworkNamespace()
        self.addCleanup(namespace.delete)
        await namespace.create()
        await namespace.assert_loopback_only()
        self.namespace = namespace
        return namespace

    def _spawn(self, protocol, argv, env):
        reactor.spawnProcess(
            protocol, "ip", self.namespace.command(argv), env=env, path=self.workdir
        )
        self.addCleanup(protocol.stop)
        return protocol

    async def start_server(self, tls):
        """
        Start the server in the namespace on :data:`SERVER_PORT`: TLS with a
        certificate written for the test (clients trust it with
        ``--ca-file``), or plaintext.

        :returns: the :class:`ServerInNamespace`, with ``url`` and ``ca_file``.
        """
        server = ServerInNamespace(tls)
        if tls:
            cert_dir = os.path.join(self.workdir, "certs")
            files = write_certificate(cert_dir)
            server.ca_file = files.cert
            port = f"ssl:{SERVER_PORT}:interface=127.0.0.1"
            args = ["--port", port, "--cert-path", cert_dir]
            server.url = f"wss://127.0.0.1:{SERVER_PORT}"
        else:
            args = ["--port", f"tcp:{SERVER_PORT}:interface=127.0.0.1"]
            server.url = f"ws://127.0.0.1:{SERVER_PORT}"
        argv = twistd_command() + ["-n", "--pidfile=", "signalling", *args, *self.server_args]
        env = child_env(PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        self._spawn(server, argv, env)
        await server.until(
            lambda: f"starting on {SERVER_PORT}".encode() in server.stdout,
            f"the server to listen on {SERVER_PORT}",
            START_TIMEOUT,
        )
        self.server = server
        return server

    def _tls_args(self):
        return ["--ca-file", self.server.ca_file] if self.server.ca_file else []

    def start_gst(self, uid, *args):
        """Start ``contrib/gst_peer.py`` as ``uid`` with ``args``."""
        peer = PeerProcess(uid, "gstreamer")
        argv = [SYSTEM_PYTHON, GST_PEER, "--server", self.server.url, "--id", uid]
        return self._spawn(peer, argv + self._tls_args() + list(args), child_env())

    def start_aiortc(self, uid, *args):
        """Start ``signalling-peer --json`` (aiortc) as ``uid`` with ``args``."""
        peer = PeerProcess(uid, "aiortc")
        argv = [sys.executable, "-m", "signalling.tools.peer", "--json", "--url", self.server.url,
                "--id", uid]
        env = child_env(PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        return self._spawn(peer, argv + self._tls_args() + list(args), env)

    def assert_loopback_candidates(self, *peers):
        """Fail unless every candidate the peers sent is a loopback address, and there were some."""
        for peer in peers:
            addresses = peer.candidate_addresses()
            self.assertTrue(addresses, f"{peer!r} sent no candidate\n{peer.output()}")
            for address in addresses:
                self.assertTrue(
                    ipaddress.ip_address(address).is_loopback,
                    f"{peer!r} sent a candidate for {address}\n{peer.output()}",
                )

"""
The README's Quick start, as a new user meets it: in a fresh copy of the
checkout (what a clone holds), the two commands the README gives, taken
from the README itself, run in either order and more than once, and the
shorter command the README gives for later runs.

The server command runs the server on its built-in defaults, so these tests
need port 8443 free on this machine; in CI (``CI=true``) a busy port fails
them instead of skipping. They build a venv and install the project and its
test extra: slow, and few.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.trial import unittest
from tests.helpers import JUNK, ROOT, clean_environment, run


#: The port the server listens on by default.
DEFAULT_PORT = 8443
#: Seconds a command that installs may take.
INSTALL_TIMEOUT = 300
#: Seconds the server may take to answer once installed.
START_TIMEOUT = 30


def readme_commands():
    """
    :returns: ``(server, tests, later)``: the README's command that installs
        and runs the server, the one that runs the test suite, and the one
        it gives for later runs of the server.
    """
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()

    def block_after(marker):
        start = text.index(marker)
        match = re.compile(r"```sh\n(.*?)\n```", re.S).search(text, start)
        return match.group(1).strip()

    later = re.search(r"later runs need only `([^`]+)`", text).group(1)
    return (
        block_after("Install and run the server with its defaults:"),
        block_after("Install and run the whole test suite:"),
        later,
    )


def fresh_copy(destination):
    """
    Copy what a clone of the checkout holds (tracked files and new ones
    not ignored, as they are in the working tree) to ``destination``.
    """
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(ROOT, destination, ignore=JUNK)
        return
    for name in filter(None, (n.decode() for n in listed)):
        source = os.path.join(ROOT, name)
        if not os.path.isfile(source):
            continue  # deleted in the working tree
        target = os.path.join(destination, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target)


def port_is_free(family, address, port):
    """:returns: whether ``address``:``port`` can be bound now (None: no such family)."""
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        return None
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as e:
            if e.errno == 99:  # EADDRNOTAVAIL: no such address here
                return None
            return False
    return True


class Shell(ProcessProtocol):
    """A ``sh -c`` command in its own process group, output collected."""

    def __init__(self):
        self.output = b""
        self.ended = Deferred()
        self.status = None

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.status = reason.value.exitCode
        self.ended.callback(self)


HEALTH = """\
import ssl, sys, urllib.request
context = ssl.create_default_context(cafile=sys.argv[1])
with urllib.request.urlopen(sys.argv[2], context=context, timeout=5) as answer:
    sys.stdout.write(answer.read().decode())
"""


class QuickStartTests(unittest.TestCase):
    """The README's two commands on a fresh copy, in either order, twice."""

    timeout = 6 * INSTALL_TIMEOUT

    def setUp(self):
        if not port_is_free(socket.AF_INET, "", DEFAULT_PORT):
            message = f"port {DEFAULT_PORT} is in use on this machine"
            if os.environ.get("CI") == "true":
                self.fail(message)
            raise unittest.SkipTest(message)
        self.ipv6 = port_is_free(socket.AF_INET6, "::1", DEFAULT_PORT) is True
        self.base = tempfile.mkdtemp(prefix="signalling-quickstart-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.clone = os.path.join(self.base, "clone")
        fresh_copy(self.clone)
        self.server_command, self.tests_command, self.later_command = readme_commands()

    def spawn(self, command):
        """Run ``command`` with ``sh -c`` in the copy, as a user would type it."""
        shell = Shell()
        shell.transport = reactor.spawnProcess(
            shell, "/bin/sh", ["/bin/sh", "-c", command],
            env=clean_environment(), path=self.clone,
        )
        self.addCleanup(self.stop, shell)
        return shell

    def twistd_pid(self):
        """:returns: the pid in the server's pid file (the README's default), or None."""
        try:
            with open(os.path.join(self.clone, "twistd.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    async def stop(self, shell):
        """Stop what is left of a command: the server with SIGTERM, as Ctrl-C would."""
        if shell.ended.called:
            return
        pid = self.twistd_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        try:
            await shell.ended.addTimeout(START_TIMEOUT, reactor)
        except Exception:
            shell.transport.signalProcess("KILL")
            raise

    async def health(self, host):
        """:returns: ``(status, output)`` of a GET /health over TLS, trusting certs/cert.pem."""
        out, err, code = await run(
            sys.executable,
            ["-c", HEALTH, os.path.join(self.clone, "certs", "cert.pem"),
             f"https://{host}:{DEFAULT_PORT}/health"],
        )
        return code, out + err

    async def assert_server_runs(self, command):
        """
        ``command`` installs (or not) and starts the server in the
        foreground on its defaults: it answers /health over TLS on IPv4
        (and on IPv6, where this machine has ``::1``), then stops with
        status 0 on SIGTERM.
        """
        shell = self.spawn(command)
        waited = 0.0
        while True:
            if shell.ended.called:
                self.fail(f"{command!r} ended with {shell.status}:\n{shell.output.decode()}")
            if os.path.exists(os.path.join(self.clone, "certs", "cert.pem")):
                code, output = await self.health("127.0.0.1")
                if code == 0:
                    break
            if waited > INSTALL_TIMEOUT:
                self.fail(f"{command!r} did not serve in time:\n{shell.output.decode()}")
            await task.deferLater(reactor, 0.5, lambda: None)
            waited += 0.5
        self.assertEqual(output, "OK\n")
        if self.ipv6:
            code, output = await self.health("[::1]")
            self.assertEqual((code, output), (0, "OK\n"), shell.output.decode())
        pid = self.twistd_pid()
        self.assertIsNotNone(pid, "the server wrote no twistd.pid")
        os.kill(pid, signal.SIGTERM)
        await shell.ended.addTimeout(START_TIMEOUT, reactor)
        self.assertEqual(shell.status, 0, shell.output.decode())
        self.assertNotIn(b"Unknown command", shell.output)

    async def assert_tests_run(self):
        """
        The README's test command (on one small module, as its Tests
        section shows) installs and ends with ``N passed, 0 failed``.
        """
        shell = self.spawn(self.tests_command + " tests.test_wire")
        await shell.ended.addTimeout(INSTALL_TIMEOUT, reactor)
        output = shell.output.decode()
        self.assertEqual(shell.status, 0, output)
        last = output.strip().splitlines()[-1]
        self.assertRegex(last, r"^[1-9]\d* passed, 0 failed$")

    async def test_the_two_commands_work_in_either_order_any_number_of_times(self):
        """
        Server, tests, server, the later-runs command, tests, and the
        later-runs command again: each works on the same copy, whatever ran
        before it (the test command once left twistd without its plugin).
        """
        self.assertIn("twistd -n signalling", self.server_command)
        self.assertEqual(self.tests_command, "./run-tests")
        self.assertEqual(self.later_command, ".venv/bin/twistd -n signalling")
        await self.assert_server_runs(self.server_command)
        await self.assert_tests_run()
        await self.assert_server_runs(self.server_command)
        await self.assert_server_runs(self.later_command)
        await self.assert_tests_run()
        await self.assert_server_runs(self.later_command)

    async def test_the_test_command_first_then_the_server(self):
        """On a copy where nothing ran yet, the tests first, then the server."""
        await self.assert_tests_run()
        await self.assert_server_runs(self.later_command)
        await self.assert_server_runs(self.server_command)

"""
Packaging as a user meets it: a plain, non-editable ``pip install`` of the
project into a fresh venv, then ``twistd`` and ``signalling-client`` from
that venv, with no checkout on the path.

This is slow (it builds a wheel and installs the dependencies); every test
of this module shares one venv, built on first use. It never skips: where
it cannot run (no index reachable, no ``venv`` module), it fails.
"""

import atexit
import os
import shutil
import stat
import sys
import sysconfig
import tempfile

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial import unittest
from tests.helpers import COMMAND_TIMEOUT, JUNK, ROOT, clean_environment, run

#: Seconds for building the venv and installing into it.
INSTALL_TIMEOUT = 240
#: A wrapper that runs a command as root without the capabilities that let
#: root write where permissions say it may not (CAP_DAC_OVERRIDE and
#: CAP_DAC_READ_SEARCH), so that a read-only directory binds it like a user.
#: PR_CAPBSET_DROP (24) removes them from the bounding set; the exec then
#: starts the command without them.
_DROP_DAC_CAPABILITIES = """\
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for capability in (1, 2):
    if libc.prctl(24, capability, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        sys.exit("cannot drop capability %d: %s" % (capability, os.strerror(errno)))
os.execv(sys.argv[1], sys.argv[1:])
"""


class Venv:
    """
    A fresh venv in a temporary directory with the project installed from
    a copy of the checkout.

    :ivar path: the venv's directory.
    :ivar log: what the install printed.
    """

    def __init__(self, base):
        self.base = base
        self.path = os.path.join(base, "venv")
        self.log = ""

    def bin(self, name):
        return os.path.join(self.path, "bin", name)

    @property
    def site_packages(self):
        paths = sysconfig.get_paths(
            vars={"base": self.path, "platbase": self.path}, scheme="venv"
        )
        return paths["purelib"]

    @property
    def plugins(self):
        return os.path.join(self.site_packages, "twisted", "plugins")

    @inlineCallbacks
    def build(self):
        """Create the venv and ``pip install`` the copied tree into it."""
        source = os.path.join(self.base, "source")
        shutil.copytree(ROOT, source, ignore=JUNK)
        env = clean_environment()
        yield self.check(
            sys.executable, ["-m", "venv", self.path], env, INSTALL_TIMEOUT
        )
        # A path, not a name: "pip install source" would fetch a project
        # called "source" from the index.
        yield self.check(
            self.bin("python"),
            ["-m", "pip", "install", "--no-input", source + os.sep],
            env,
            INSTALL_TIMEOUT,
        )

    @inlineCallbacks
    def check(self, executable, args, env, timeout):
        out, err, code = yield run(executable, args, env, self.base, timeout)
        self.log += out + err
        if code != 0:
            raise RuntimeError(
                f"{executable} {' '.join(args)} exited with {code}:\n{out}{err}"
            )


_venv = None
_venv_result = None
_venv_waiting = []


def installed_venv():
    """
    :returns: a Deferred firing with the shared :class:`Venv`, built on the
        first call (and removed when the test process exits); a failed
        build fails every test that needs it.
    """
    global _venv
    d = Deferred()
    if _venv_result is not None:
        kind, value = _venv_result
        d.callback(value) if kind == "ok" else d.errback(value)
        return d
    _venv_waiting.append(d)
    if _venv is None:
        base = tempfile.mkdtemp(prefix="signalling-packaging-")
        atexit.register(shutil.rmtree, base, True)
        _venv = Venv(base)
        _venv.build().addBoth(_built)
    return d


def _built(result):
    global _venv_result
    from twisted.python.failure import Failure

    _venv_result = ("error", result) if isinstance(result, Failure) else ("ok", _venv)
    waiting = _venv_waiting[:]
    del _venv_waiting[:]
    for d in waiting:
        if _venv_result[0] == "ok":
            d.callback(_venv)
        else:
            d.errback(result)
    return None


class InstalledPackageTests(unittest.TestCase):
    """What a non-editable ``pip install`` of the project gives a user."""

    timeout = INSTALL_TIMEOUT + 2 * COMMAND_TIMEOUT

    @inlineCallbacks
    def setUp(self):
        self.venv = yield installed_venv()
        # Run from an empty directory: nothing of the checkout is importable.
        self.cwd = os.path.abspath(self.mktemp())
        os.makedirs(self.cwd)

    def run_in_venv(self, name, *args, wrapper=None):
        """
        Run the venv's ``bin/name`` with ``args`` from an empty directory.

        :returns: a Deferred firing with ``(stdout, stderr, exit code)``.
        """
        executable = self.venv.bin(name)
        argv = list(args)
        if wrapper is not None:
            argv = wrapper[1:] + [executable] + argv
            executable = wrapper[0]
        return run(executable, argv, path=self.cwd)

    @inlineCallbacks
    def test_plugin_file_is_installed_under_site_packages_twisted_plugins(self):
        """
        The wheel puts signalling_plugin.py into site-packages/twisted/plugins/
        beside Twisted's own plugins, without replacing Twisted's
        ``__init__.py`` or shipping a plugin cache; the signalling package
        is imported from site-packages, not from a checkout.
        """
        plugin = os.path.join(self.venv.plugins, "signalling_plugin.py")
        self.assertTrue(os.path.isfile(plugin), os.listdir(self.venv.plugins))
        self.assertTrue(
            os.path.isfile(os.path.join(self.venv.plugins, "twisted_web.py"))
        )
        with open(os.path.join(self.venv.plugins, "__init__.py")) as f:
            self.assertIn("pluginPackagePaths", f.read())
        out, err, code = yield self.run_in_venv(
            "python", "-c", "import signalling; print(signalling.__file__)"
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(
            os.path.dirname(out.strip()),
            os.path.join(self.venv.site_packages, "signalling"),
        )
        self.assertFalse(os.path.exists(os.path.join(self.venv.site_packages, "tests")))

    @inlineCallbacks
    def test_the_distribution_has_a_name_of_its_own(self):
        """
        The project installs as ``webrtcbin-signalling`` with the package's
        version (``gst-signalling`` on PyPI is an unrelated project).
        """
        script = (
            "import importlib.metadata as m, signalling; "
            "print(m.version('webrtcbin-signalling'), signalling.__version__)"
        )
        out, err, code = yield self.run_in_venv("python", "-c", script)
        self.assertEqual(code, 0, err)
        installed, package = out.split()
        self.assertEqual(installed, package)

    @inlineCallbacks
    def test_twistd_help_lists_signalling(self):
        """``twistd --help`` lists the signalling command, without errors."""
        out, err, code = yield self.run_in_venv("twistd", "--help")
        self.assertEqual(code, 0, err)
        self.assertIn("    signalling ", out)
        self.assertNotIn("Traceback", out + err)

    @inlineCallbacks
    def test_twistd_signalling_help_describes_the_options(self):
        """``twistd signalling --help`` shows the server's options."""
        out, err, code = yield self.run_in_venv("twistd", "signalling", "--help")
        self.assertEqual(code, 0, err)
        for option in (
            "--port",
            "--cert-path",
            "--keepalive-timeout",
            "--health",
            "--disable-ssl",
        ):
            self.assertIn(option, out)
        self.assertNotIn("Traceback", out + err)

    @inlineCallbacks
    def test_signalling_client_help_works(self):
        """The signalling-client console script is installed and answers --help."""
        out, err, code = yield self.run_in_venv("signalling-client", "--help")
        self.assertEqual(code, 0, out + err)
        for option in ("--url", "--id", "--call", "--room", "--ca-file", "--insecure"):
            self.assertIn(option, out)

    @inlineCallbacks
    def test_the_call_page_is_installed(self):
        """
        The wheel carries the call page's files (``signalling/server/static/``), where
        the installed server reads them from.
        """
        script = "import os, signalling.server.web as w; print(*sorted(os.listdir(w.STATIC_DIR)))"
        out, err, code = yield self.run_in_venv("python", "-c", script)
        self.assertEqual(code, 0, err)
        shipped = sorted(os.listdir(os.path.join(ROOT, "signalling", "server", "static")))
        self.assertIn("gstwebrtc-api-3.0.0.min.js", shipped)
        self.assertIn("gstwebrtc-api-LICENSE-MPL-2.0.txt", shipped)
        self.assertEqual(out.split(), shipped)

    @inlineCallbacks
    def test_plugin_is_found_when_the_plugin_cache_cannot_be_written(self):
        """
        A user who cannot write site-packages/twisted/plugins (so no
        dropin.cache can be written there) still sees ``signalling`` in
        ``twistd --help``, with no error printed: no root and no manual
        step is needed after ``pip install``.

        The directory is made read-only; as root, the command also runs
        without the capabilities that override permissions, and a probe
        first proves that it cannot write there.
        """
        plugins = self.venv.plugins
        cache = os.path.join(plugins, "dropin.cache")
        if os.path.exists(cache):
            os.remove(cache)
        mode = stat.S_IMODE(os.stat(plugins).st_mode)
        os.chmod(plugins, 0o555)
        self.addCleanup(os.chmod, plugins, mode)
        wrapper = None
        if os.geteuid() == 0:
            wrapper = [sys.executable, "-c", _DROP_DAC_CAPABILITIES]

        probe = (
            "import sys\n"
            "try:\n"
            "    open(sys.argv[1], 'w')\n"
            "except PermissionError:\n"
            "    print('read-only')\n"
            "else:\n"
            "    print('writable')\n"
        )
        out, err, code = yield self.run_in_venv(
            "python", "-c", probe, os.path.join(plugins, "probe"), wrapper=wrapper
        )
        self.assertEqual((out.strip(), code), ("read-only", 0), err)

        out, err, code = yield self.run_in_venv("twistd", "--help", wrapper=wrapper)
        self.assertEqual(code, 0, err)
        self.assertIn("    signalling ", out)
        self.assertNotIn("Traceback", out + err)
        self.assertNotIn("plugin cache", out + err)
        self.assertFalse(os.path.exists(cache))

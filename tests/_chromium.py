"""
Headless Chromium for the browser tests, driven through the DevTools protocol
(CDP) over ``--remote-debugging-pipe``: a small client on Twisted, no Node.

Chromium is Debian's package (``/usr/bin/chromium``), never a downloaded
browser. It reads CDP commands on its file descriptor 3 and writes answers
and events on 4, as JSON messages each ended by a NUL byte.
"""

import base64
import ipaddress
import json
import os
import shutil
import signal

from twisted.internet import defer, error, reactor, task
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import FailTest

CHROMIUM = "/usr/bin/chromium"

#: Seconds any one CDP command may take.
COMMAND_TIMEOUT = 20.0

FAKE_DEVICES = "--use-fake-device-for-media-stream"

#: The flags every test browser gets: headless, no network of its own, fake
#: camera and microphone allowed without asking, loopback ICE candidates with
#: their real addresses (no mDNS names), and no throttling of pages that are
#: not in front.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--metrics-recording-only",
    "--password-store=basic",
    "--use-mock-keychain",
    "--use-fake-ui-for-media-stream",
    FAKE_DEVICES,
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns,MediaRouter,DialMediaRouteProvider,"
    "OptimizationHints,Translate",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    "--ignore-certificate-errors",
    "--mute-audio",
    "--window-size=1200,900",
]


def unavailable():
    """:returns: why Chromium cannot run here, or None when it can."""
    if shutil.which(CHROMIUM) is None:
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


async def save_screenshot(testcase, page, name):
    """
    Save a PNG of ``page`` in ``testcase``'s temporary directory (to look at
    a failure, or for the docs).

    :returns: its bytes.
    """
    png = await page.screenshot()
    testcase.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n")
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(png)
    return png


def assert_loopback_pair(testcase, pair, context):
    """Fail unless the candidate ``pair`` in use joins two loopback addresses."""
    testcase.assertIsNotNone(pair, f"no selected candidate pair in {context}")
    for address in (pair["local"], pair["remote"]):
        testcase.assertTrue(ipaddress.ip_address(address).is_loopback, f"not loopback: {pair}")


class CDPError(Exception):
    """A CDP command was answered with an error."""


class _Pipe(ProcessProtocol):
    """The Chromium process: CDP on fds 3 and 4, its output kept for failures."""

    def __init__(self, browser):
        self._browser = browser
        self._buffer = b""
        self.output = bytearray()
        self.is_ended = False
        self._waiters = []

    def childDataReceived(self, fd, data):
        if fd == 4:
            self._buffer += data
            *messages, self._buffer = self._buffer.split(b"\0")
            for message in messages:
                self._browser._received(json.loads(message))
        else:
            self.output += data
            del self.output[:-20000]

    def processEnded(self, reason):
        self.is_ended = True
        self._browser._ended(reason)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def exited(self, timeout):
        """:returns: a Deferred that fires when Chromium has exited, or times out."""
        if self.is_ended:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        return d.addTimeout(timeout, reactor)


class Browser:
    """
    One Chromium process. Make it with :meth:`launch`; the test's cleanup
    closes it.

    :ivar console: every console line and uncaught exception of every page,
        as text, for failure messages.
    """

    def __init__(self):
        self._next_id = 0
        self._pending = {}
        self._sessions = {}
        self._pipe = _Pipe(self)
        self._process = None
        self._gone = None
        self.console = []

    @classmethod
    async def launch(cls, testcase, wrap=lambda argv: argv, fake_devices=True):
        """
        Start Chromium with a fresh profile in the test's temporary directory.

        :param wrap: turns the command line into the one to run (to run it
            inside a network namespace, say).
        :param fake_devices: give it Chromium's fake camera and microphone;
            without them it has none (there are none here).
        :returns: a running :class:`Browser`.
        """
        browser = cls()
        profile = os.path.abspath(testcase.mktemp())
        os.makedirs(profile)
        flags = [f for f in FLAGS if fake_devices or f != FAKE_DEVICES]
        argv = wrap([
            CHROMIUM, *flags, f"--user-data-dir={profile}",
            "--remote-debugging-pipe", "about:blank",
        ])
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPLAY", "WAYLAND"))}
        browser._process = reactor.spawnProcess(
            browser._pipe, argv[0], argv, env=env,
            childFDs={0: "w", 1: "r", 2: "r", 3: "w", 4: "r"},
        )
        testcase.addCleanup(browser.close)
        await browser.send("Browser.getVersion")
        return browser

    # The pipe.

    def _received(self, message):
        if "id" in message:
            d = self._pending.pop(message["id"], None)
            if d is None:
                return
            if "error" in message:
                d.errback(CDPError(f"{message['error'].get('message')} ({message['error']})"))
            else:
                d.callback(message.get("result", {}))
            return
        session = self._sessions.get(message.get("sessionId"))
        method = message.get("method")
        params = message.get("params", {})
        label = session.label if session else "browser"
        if method == "Runtime.consoleAPICalled":
            text = " ".join(
                str(a.get("value", a.get("description", a.get("type")))) for a in params["args"]
            )
            self.console.append(f"{label}: console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            self.console.append(f"{label}: uncaught: {text}")

    def _ended(self, reason):
        self._gone = reason
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(CDPError(f"Chromium exited ({reason.value}); output: {self.output()}"))

    def output(self):
        """:returns: the end of what Chromium printed, as text."""
        return bytes(self._pipe.output[-3000:]).decode("utf-8", "replace")

    async def send(self, method, params=None, session_id=None, timeout=COMMAND_TIMEOUT):
        """
        Send one CDP command.

        :returns: its result (a dict).
        :raises CDPError: when it is answered with an error, or Chromium exits.
        """
        if self._gone is not None:
            raise CDPError(f"Chromium has exited; output: {self.output()}")
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        d = defer.Deferred()
        self._pending[self._next_id] = d
        self._process.writeToChild(3, json.dumps(message).encode("utf-8") + b"\0")
        d.addTimeout(timeout, reactor)
        try:
            return await d
        except defer.TimeoutError:
            raise CDPError(f"no answer to {method} within {timeout} s") from None

    # Pages.

    async def open(self, url, label, ready="!!window.callPage", state=None):
        """
        Open ``url`` in a new window.

        :param label: names the page in failure messages.
        :param ready: a JavaScript expression that holds once the page has
            loaded (by default: the call page's).
        :param state: a JavaScript expression for what the page shows, for
            failure messages (by default: the call page's).
        :returns: a :class:`Page`.
        """
        target = await self.send("Target.createTarget", {"url": "about:blank", "newWindow": True})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, attached["sessionId"], target["targetId"], label, state)
        self._sessions[page.session_id] = page
        await page.send("Runtime.enable")
        await page.send("Page.enable")
        await page.send("Page.navigate", {"url": url})
        await page.wait_for(f"document.readyState !== 'loading' && ({ready})",
                            f"the page {url} to load")
        return page

    async def close(self):
        """Close Chromium and wait for it to exit (killing it if it will not)."""
        if self._gone is not None or self._process is None:
            return
        try:
            await self.send("Browser.close", timeout=5)
        except CDPError:
            pass
        try:
            await self._pipe.exited(10)
        except defer.TimeoutError:
            try:
                self._process.signalProcess(signal.SIGKILL)
            except error.ProcessExitedAlready:
                pass
            await self._pipe.exited(10)


class Page:
    """One page (a CDP target) of a :class:`Browser`."""

    #: What :meth:`state` reads: the call page's state.
    CALL_PAGE_STATE = (
        "({callState: callPage.callState, callText: callPage.callText, "
        "mode: callPage.mode, ourId: callPage.ourId, registered: callPage.registered, "
        "mediaNote: callPage.mediaNote, peers: callPage.peers()})"
    )

    def __init__(self, browser, session_id, target_id, label, state=None):
        self.browser = browser
        self.session_id = session_id
        self.target_id = target_id
        self.label = label
        self._state = state or self.CALL_PAGE_STATE

    def __repr__(self):
        return f"<Page {self.label}>"

    async def send(self, method, params=None, **kwargs):
        """Send a CDP command to this page. :returns: its result."""
        return await self.browser.send(method, params, self.session_id, **kwargs)

    async def evaluate(self, expression):
        """
        Evaluate a JavaScript expression in the page (awaiting a promise).

        :returns: its value, as JSON makes it.
        :raises CDPError: when it throws.
        """
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CDPError(f"{expression!r} threw {text}")
        return result["result"].get("value")

    async def wait_for(self, expression, what, timeout=30.0, poll=0.2):
        """
        Poll a JavaScript expression until it is truthy.

        :returns: its value.
        :raises FailTest: when it is not, within ``timeout`` seconds, with the
            page's state and console.
        """
        deadline = reactor.seconds() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if reactor.seconds() > deadline:
                break
            await task.deferLater(reactor, poll, lambda: None)
        raise FailTest(
            f"{self.label}: timed out after {timeout} s waiting for {what}\n"
            f"page state: {await self.state()}\n"
            "console:\n  " + "\n  ".join(self.browser.console[-40:])
        )

    async def state(self):
        """:returns: what the page shows (by default ``window.callPage``), for failure messages."""
        try:
            return await self.evaluate(self._state)
        except CDPError as e:
            return f"(unreadable: {e})"

    async def screenshot(self):
        """:returns: a PNG of the page as it is displayed, cut below its content."""
        width, height = await self.evaluate(
            "[document.documentElement.clientWidth, Math.ceil(Math.max(0, ...Array.from("
            "document.body.children, (e) => e.getBoundingClientRect().bottom))) + 16]"
        )
        result = await self.send(
            "Page.captureScreenshot",
            {"format": "png", "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}},
        )
        return base64.b64decode(result["data"])

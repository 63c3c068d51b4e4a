"""
Tests for signalling.server.systemd: the Notifier speaking systemd's notification
protocol (sd_notify) to a real Unix datagram socket the test binds and
reads, by path and in the abstract namespace, and the watchdog interval read
from WATCHDOG_USEC and WATCHDOG_PID.
"""

import os
import shutil
import socket
import tempfile

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial import unittest

from signalling.server.systemd import Notifier
from tests.servers import NotifySocket


class NotifyTests(unittest.SynchronousTestCase):
    """State lines sent as datagrams to NOTIFY_SOCKET."""

    def test_states_go_in_one_datagram_to_a_socket_path(self):
        """
        notify() sends its states as newline-separated lines in one
        datagram to the socket NOTIFY_SOCKET names, and returns True.
        """
        receiver = NotifySocket(self)
        notifier = Notifier(receiver.environ())
        self.addCleanup(notifier.close)
        self.assertTrue(notifier.enabled)
        self.assertTrue(notifier.notify("READY=1", "STATUS=accepting connections"))
        self.assertEqual(
            receiver.datagrams(), [["READY=1", "STATUS=accepting connections"]]
        )

    def test_each_call_is_its_own_datagram(self):
        """Two calls are two datagrams, in order, through one socket."""
        receiver = NotifySocket(self)
        notifier = Notifier(receiver.environ())
        self.addCleanup(notifier.close)
        notifier.notify("RELOADING=1")
        notifier.notify("READY=1")
        self.assertEqual(receiver.datagrams(), [["RELOADING=1"], ["READY=1"]])

    def test_abstract_socket_names_start_with_an_at_sign(self):
        """
        A NOTIFY_SOCKET starting with @ names a socket in Linux's abstract
        namespace (a leading NUL byte), as systemd passes it.
        """
        receiver = NotifySocket(self, abstract=True)
        self.assertTrue(receiver.address.startswith("@"))
        notifier = Notifier(receiver.environ())
        self.addCleanup(notifier.close)
        self.assertTrue(notifier.notify("READY=1"))
        self.assertEqual(receiver.datagrams(), [["READY=1"]])

    def test_without_notify_socket_nothing_is_sent(self):
        """
        Without NOTIFY_SOCKET (or with it empty) the notifier is disabled:
        notify() returns False, opens no socket and logs nothing.
        """
        for environ in ({}, {"NOTIFY_SOCKET": ""}, {"WATCHDOG_USEC": "1000000"}):
            notifier = Notifier(environ)
            with capturedLogs() as events:
                self.assertFalse(notifier.enabled)
                self.assertFalse(notifier.notify("READY=1"))
            self.assertEqual(events, [])
            self.assertIsNone(notifier._socket)

    def test_the_process_environment_is_read_by_default(self):
        """Without an environment given, the Notifier reads the process's."""
        receiver = NotifySocket(self)
        saved = os.environ.get("NOTIFY_SOCKET")
        os.environ["NOTIFY_SOCKET"] = receiver.address
        try:
            notifier = Notifier()
        finally:
            if saved is None:
                del os.environ["NOTIFY_SOCKET"]
            else:
                os.environ["NOTIFY_SOCKET"] = saved
        self.addCleanup(notifier.close)
        self.assertTrue(notifier.notify("READY=1"))
        self.assertEqual(receiver.datagrams(), [["READY=1"]])

    def assertOneWarning(self, address, send):
        """
        Assert that each of three calls of ``send`` returns False and that
        they log exactly one warning, naming ``address``.
        """
        with capturedLogs() as events:
            self.assertEqual([send(), send(), send()], [False, False, False])
        warnings = [e for e in events if e["log_level"] >= LogLevel.warn]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertEqual(len(events), 1, events)
        [warning] = warnings
        self.assertEqual(warning["log_level"], LogLevel.warn)
        self.assertEqual(warning["log_namespace"], "signalling.server.systemd")
        self.assertIn(address.lstrip("@\0"), warning["address"])
        self.assertTrue(warning["reason"])

    def test_unreachable_socket_returns_false_and_warns_once(self):
        """
        A NOTIFY_SOCKET nobody listens on makes notify() return False and
        logs one warning naming the address, however often it is called.
        """
        directory = tempfile.mkdtemp(prefix="sd-")
        self.addCleanup(shutil.rmtree, directory, True)
        missing = os.path.join(directory, "nobody")
        notifier = Notifier({"NOTIFY_SOCKET": missing})
        self.addCleanup(notifier.close)
        self.assertTrue(notifier.enabled)
        self.assertOneWarning(missing, lambda: notifier.notify("READY=1"))

    def test_receiver_that_went_away_returns_false_and_warns_once(self):
        """
        A service manager that stopped listening after the first message
        (its socket closed and removed) costs one warning; the server goes on.
        """
        receiver = NotifySocket(self)
        notifier = Notifier(receiver.environ())
        self.addCleanup(notifier.close)
        self.assertTrue(notifier.notify("READY=1"))
        receiver.socket.close()
        os.unlink(receiver.address)
        self.assertOneWarning(receiver.address, lambda: notifier.notify("WATCHDOG=1"))

    def test_abstract_socket_nobody_listens_on_warns_once(self):
        """An abstract address nobody bound is unreachable too: False, one warning."""
        name = f"@signalling-test-nobody-{os.getpid()}"
        notifier = Notifier({"NOTIFY_SOCKET": name})
        self.addCleanup(notifier.close)
        self.assertOneWarning("\0" + name[1:], lambda: notifier.notify("READY=1"))

    def test_close_releases_the_socket_and_a_later_notify_reopens_it(self):
        """close() closes the sending socket; a later notify() still gets through."""
        receiver = NotifySocket(self)
        notifier = Notifier(receiver.environ())
        self.addCleanup(notifier.close)
        notifier.notify("READY=1")
        sending = notifier._socket
        notifier.close()
        self.assertEqual(sending.fileno(), -1)
        notifier.close()
        self.assertTrue(notifier.notify("STOPPING=1"))
        self.assertEqual(receiver.datagrams(), [["READY=1"], ["STOPPING=1"]])

    def test_the_sending_socket_does_not_block(self):
        """
        The socket never blocks the reactor: a receiver whose queue is full
        makes notify() return False (with one warning) instead of waiting.
        """
        receiver = NotifySocket(self)
        receiver.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        notifier = Notifier(receiver.environ())
        self.addCleanup(notifier.close)
        with capturedLogs() as events:
            results = [notifier.notify("WATCHDOG=1" + "x" * 512) for _ in range(10000)]
        self.assertIn(False, results)
        self.assertEqual(
            len([e for e in events if e["log_level"] == LogLevel.warn]), 1, events
        )


class WatchdogIntervalTests(unittest.SynchronousTestCase):
    """How often to ping, from WATCHDOG_USEC and WATCHDOG_PID."""

    def interval(self, pid=1234, **environ):
        """:returns: the watchdog interval of a Notifier for ``environ``."""
        environ.setdefault("NOTIFY_SOCKET", "@unused")
        return Notifier(environ, pid=pid).watchdog_interval

    def test_pings_at_half_of_watchdog_usec(self):
        """WATCHDOG_USEC=30000000 (30 s) means a ping every 15 s."""
        self.assertEqual(self.interval(WATCHDOG_USEC="30000000"), 15.0)
        self.assertEqual(self.interval(WATCHDOG_USEC="1000"), 0.0005)

    def test_no_watchdog_usec_means_no_watchdog(self):
        """Without WATCHDOG_USEC (or with it empty) there is no watchdog."""
        self.assertIsNone(self.interval())
        self.assertIsNone(self.interval(WATCHDOG_USEC=""))

    def test_watchdog_pid_of_this_process_is_accepted(self):
        """WATCHDOG_PID naming this process keeps the watchdog."""
        self.assertEqual(self.interval(WATCHDOG_USEC="4000000", WATCHDOG_PID="1234"), 2.0)

    def test_watchdog_pid_of_another_process_means_no_watchdog(self):
        """
        WATCHDOG_PID naming another process (the variables were inherited
        from a parent the watchdog is for) means no watchdog here.
        """
        self.assertIsNone(self.interval(WATCHDOG_USEC="4000000", WATCHDOG_PID="1235"))
        self.assertIsNone(self.interval(WATCHDOG_USEC="4000000", WATCHDOG_PID="junk"))

    def test_empty_watchdog_pid_is_no_restriction(self):
        """An empty WATCHDOG_PID restricts nothing."""
        self.assertEqual(self.interval(WATCHDOG_USEC="4000000", WATCHDOG_PID=""), 2.0)

    def test_the_process_id_is_this_processes_by_default(self):
        """Without a pid given, WATCHDOG_PID is compared with os.getpid()."""
        environ = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
        self.assertEqual(Notifier(environ).watchdog_interval, 2.0)
        environ["WATCHDOG_PID"] = str(os.getpid() + 1)
        self.assertIsNone(Notifier(environ).watchdog_interval)

    def test_junk_zero_and_negative_watchdog_usec_mean_no_watchdog(self):
        """A WATCHDOG_USEC that is not a positive whole number is ignored."""
        for value in ("junk", "0", "-1000000", "1.5", "1e6", " "):
            self.assertIsNone(self.interval(WATCHDOG_USEC=value), value)


class StartWatchdogTests(unittest.SynchronousTestCase):
    """The pings themselves, from the reactor's clock."""

    def setUp(self):
        self.receiver = NotifySocket(self)
        self.clock = Clock()

    def notifier(self, **environ):
        notifier = Notifier(self.receiver.environ(**environ), pid=99)
        self.addCleanup(notifier.close)
        return notifier

    def test_pings_at_once_then_every_half_interval(self):
        """
        start_watchdog pings WATCHDOG=1 at once and then every half of
        WATCHDOG_USEC of clock time (not of real time), until stopped.
        """
        ping = self.notifier(WATCHDOG_USEC="4000000").start_watchdog(self.clock)
        self.assertEqual(self.receiver.datagrams(), [["WATCHDOG=1"]])
        self.clock.advance(1.999)
        self.assertEqual(self.receiver.datagrams(), [])
        self.clock.advance(0.001)
        self.assertEqual(self.receiver.datagrams(), [["WATCHDOG=1"]])
        self.clock.pump([2.0] * 3)
        self.assertEqual(self.receiver.datagrams(), [["WATCHDOG=1"]] * 3)
        ping.stop()
        self.clock.advance(10)
        self.assertEqual(self.receiver.datagrams(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_watchdog_usec_starts_nothing(self):
        """Without WATCHDOG_USEC start_watchdog returns None and schedules nothing."""
        self.assertIsNone(self.notifier().start_watchdog(self.clock))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.receiver.datagrams(), [])

    def test_watchdog_for_another_process_starts_nothing(self):
        """A WATCHDOG_PID of another process starts no pings."""
        notifier = self.notifier(WATCHDOG_USEC="4000000", WATCHDOG_PID="98")
        self.assertIsNone(notifier.start_watchdog(self.clock))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_notify_socket_starts_nothing(self):
        """WATCHDOG_USEC without NOTIFY_SOCKET starts no pings."""
        notifier = Notifier({"WATCHDOG_USEC": "4000000"}, pid=99)
        self.assertIsNone(notifier.start_watchdog(self.clock))
        self.assertEqual(self.clock.getDelayedCalls(), [])

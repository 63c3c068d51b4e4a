"""
systemd's service notification protocol (``sd_notify``): readiness, reload,
stop and watchdog messages sent as datagrams to ``$NOTIFY_SOCKET``.

The protocol is a few lines of text on a Unix datagram socket, so it is
spoken here directly rather than through a C binding.
"""

import os
import socket

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

_log = Logger()


class Notifier:
    """
    Sends state lines to the service manager, when there is one.

    :param environ: the environment to read ``NOTIFY_SOCKET``,
        ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` from.
    :param pid: this process's id (``WATCHDOG_PID`` must match it).
    """

    def __init__(self, environ=None, pid=None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and address.startswith("@"):
            # An abstract socket: its name starts with a NUL byte.
            address = "\0" + address[1:]
        self._address = address
        self._socket = None
        self._failed = False
        self.watchdog_interval = _watchdog_interval(
            environ, os.getpid() if pid is None else pid
        )

    @property
    def enabled(self):
        """True when a service manager listens."""
        return self._address is not None

    def notify(self, *states):
        """
        Send state assignments such as ``READY=1`` in one datagram.

        :returns: True if sent; False when there is no service manager or
            sending failed (which is logged once).
        """
        if self._address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(states).encode("utf-8"), self._address)
        except OSError as e:
            if not self._failed:
                self._failed = True
                _log.warn(
                    "cannot notify the service manager at {address}: {reason}",
                    address=self._address.replace("\0", "@", 1),
                    reason=e.strerror or str(e),
                )
            return False
        return True

    def start_watchdog(self, clock):
        """
        Send ``WATCHDOG=1`` at half the interval systemd asked for, from the
        reactor, so that a wedged reactor stops the pings.

        :returns: the running ``LoopingCall``, or None when no watchdog is set.
        """
        if self.watchdog_interval is None or not self.enabled:
            return None
        ping = LoopingCall(self.notify, "WATCHDOG=1")
        ping.clock = clock
        ping.start(self.watchdog_interval, now=True)
        return ping

    def start_watchdog_with(self, clock, healthy):
        """
        Like :meth:`start_watchdog`, but each ping goes out only while
        ``healthy()`` holds (the parent of ``--workers``: while every worker
        is alive), so that systemd's watchdog sees what the clients see.
        """
        if self.watchdog_interval is None or not self.enabled:
            return None

        def ping():
            if healthy():
                self.notify("WATCHDOG=1")

        loop = LoopingCall(ping)
        loop.clock = clock
        loop.start(self.watchdog_interval, now=True)
        return loop

    def close(self):
        """Release the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_interval(environ, pid):
    """:returns: seconds between watchdog pings, or None when not asked for."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    watchdog_pid = environ.get("WATCHDOG_PID")
    if usec <= 0 or (watchdog_pid and watchdog_pid != str(pid)):
        return None
    return usec / 2 / 1_000_000

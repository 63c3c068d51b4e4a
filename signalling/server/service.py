"""
The running server as a Twisted service: it listens on every port, tells the
service manager when it is ready, reloads its TLS certificate on SIGHUP, and
on shutdown stops accepting, closes every connection with 1001 and waits a
bounded time for the close handshakes.
"""

import resource
import signal
import time

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

from signalling.server.auth import AuthConfigError
from signalling.server.listening import FamilyUnavailable, StartupError, cannot_listen
from signalling.server.transport import limit_send_buffer

def raise_file_limit(log=None):
    """
    Raise the soft limit on open files to the hard limit: every peer is a
    file descriptor. Logs the limit in use.

    :returns: ``(before, after)`` soft limits.
    """
    log = log or Logger()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
    after = soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            after = target
        except (ValueError, OSError) as e:
            log.warn("cannot raise the open file limit: {reason}", reason=str(e))
    log.info(
        "open file limit {limit} (about as many peers); raise the hard limit "
        "(LimitNOFILE=, ulimit -Hn) for more",
        limit=after,
        previous=soft,
    )
    return soft, after


#: How often a shutdown checks whether every connection has closed.
_SHUTDOWN_POLL = 0.05


class TwistdService(Service):
    """
    A service twistd runs as the application's own: it logs to
    ``_log_observer`` (set by the subclass, or None for twistd's text log).
    """

    _log_observer = None

    def setServiceParent(self, parent):
        # twistd logs to an ILogObserver component of its application, when
        # there is one (the documented way for a .tac file to choose it).
        if self._log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self._log_observer)
        super().setServiceParent(parent)


class GracefulStop:
    """
    SIGTERM and SIGINT stop the reactor, so that twistd stops the services
    and exits with status 0 (the reactor's own handlers make twistd end by
    re-raising the signal). Needs ``_reactor``, ``_log`` and a
    ``_previous_handlers`` dict; call ``_reactor.callWhenRunning(self._install_stop_handlers)``
    when started, and :meth:`_restore_stop_handlers` when stopped.
    """

    def _install_stop_handlers(self):
        if not self.running:
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.signal(signum, self._stop_signal)

    def _restore_stop_handlers(self):
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _stop_signal(self, signum, frame):
        self._log.info(
            "received {signal}, shutting down", signal=signal.Signals(signum).name
        )
        self._reactor.callFromThread(self._stop_reactor)

    def _stop_reactor(self):
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            pass  # a second signal during the shutdown


class PortService(Service):
    """
    One port of a :class:`SignallingService`, a child of it: its parent
    listens on every port at once (all of them, or none) and stops it,
    which stops listening.

    :ivar description: the endpoint description, for logs and errors.
    :ivar endpoint: the ``IStreamServerEndpoint`` to listen on.
    :ivar factory: the factory it serves.
    :ivar option: the option the port came from, for errors.
    """

    def __init__(self, description, endpoint, factory, option="--port"):
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.option = option
        self._port = None

    def listen(self):
        """:returns: a Deferred of ``(description, IListeningPort)``."""
        d = self.endpoint.listen(self.factory)
        d.addCallback(self._bound)
        return d

    def _bound(self, port):
        self._port = port
        if self.option == "--port":
            limit_send_buffer(port)
        return self.description, port

    def stop_listening(self):
        """:returns: a Deferred fired once the port no longer listens."""
        port, self._port = self._port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)

    def stopService(self):
        super().stopService()
        return self.stop_listening()


class SignallingService(GracefulStop, TwistdService, MultiService):
    """
    The root of the server's service tree. Its children: the backend's
    service, started first and stopped last; a :class:`PortService` for
    every port, listened on together; and whatever else runs while the
    server serves (the memory reclaimer, say).

    :param reactor: the reactor (time, and thread-safe calls from signal
        handlers).
    :param ports: ``[(description, endpoint, factory)]`` to listen on; a
        fourth item names the option the port came from (``--port`` by
        default), for errors. Each becomes a :class:`PortService` child; an
        endpoint that fails with
        :class:`signalling.server.listening.FamilyUnavailable` (IPv6 on a machine
        without it) is left out with a warning.
    :param ws_factories: the WebSocket factories to close on shutdown.
    :param notifier: a :class:`signalling.server.systemd.Notifier`, or None.
    :param shutdown_timeout: seconds to wait for close handshakes on shutdown.
    :param server_tls: the :class:`signalling.server.tls.ServerTLS` to reload on
        SIGHUP, or None.
    :param handle_signals: handle SIGHUP (reload) and SIGTERM/SIGINT (a
        graceful stop that exits with status 0); off in tests.
    :param log_observer: an ``ILogObserver`` to log to under twistd instead
        of its text log, or None.
    :param token_keys: the :class:`signalling.server.auth.TokenKeys` that
        SIGHUP reloads, or None.
    :param backend: the ``IService`` that runs the backend (a cluster node's
        store, ``--redis``), or None: started before the ports listen and
        stopped after the last connection closed (so that the backend hears
        of every peer that left).
    :param on_ready: called once every port listens (a worker of
        ``--workers`` then tells its parent), or None.
    """

    _log = Logger()

    def __init__(
        self,
        reactor,
        ports,
        ws_factories,
        notifier=None,
        shutdown_timeout=5.0,
        server_tls=None,
        handle_signals=False,
        log_observer=None,
        token_keys=None,
        backend=None,
        on_ready=None,
    ):
        super().__init__()
        self._on_ready = on_ready
        self._reactor = reactor
        self._ws_factories = ws_factories
        self._notifier = notifier
        self._shutdown_timeout = shutdown_timeout
        self._server_tls = server_tls
        self._handle_signals = handle_signals
        self._log_observer = log_observer
        self.token_keys = token_keys
        self.backend = backend
        self._listening = None
        self._listening_ports = []
        self._watchdog = None
        self._previous_sighup = None
        self._previous_handlers = {}
        #: Fires with the listening ports once every port listens.
        self.ready = defer.Deferred()
        if backend is not None:
            backend.setServiceParent(self)
        for port in ports:
            PortService(*port).setServiceParent(self)

    @property
    def listening_ports(self):
        """The ``IListeningPort``s, once listening."""
        return list(self._listening_ports)

    @property
    def ports(self):
        """The :class:`PortService` children, in the order they listen."""
        return [child for child in self if isinstance(child, PortService)]

    def privilegedStartService(self):
        """Bind every port (before twistd drops privileges)."""
        super().privilegedStartService()
        self._listen()

    def startService(self):
        """
        Start the backend, listen on every port (a port that cannot be
        bound stops the start here), then start the other children.
        """
        Service.startService(self)
        self._start(self.backend)
        self._listen()
        for child in self:
            self._start(child)

    @staticmethod
    def _start(child):
        """Start ``child`` (a service, or None) unless it runs already."""
        if child is not None and not child.running:
            child.startService()

    def _listen(self):
        if self._listening is not None:
            return
        failures = []
        attempts = []
        for port in self.ports:
            d = port.listen()
            d.addErrback(self._listen_failed, port.description, port.option, failures)
            attempts.append(d)
        if failures:
            for port in self.ports:
                port.stop_listening()
            # A port that cannot be bound at start-up stops twistd with one
            # line for the operator instead of a traceback.
            raise StartupError(failures[0])
        self._listening = defer.gatherResults(attempts)
        self._listening.addCallback(self._ready, failures)

    def _listen_failed(self, failure, description, option, failures):
        if failure.check(FamilyUnavailable):
            self._log.warn(
                "not listening on {endpoint}: {reason}",
                endpoint=description,
                reason=f"no IPv6 on this machine ({failure.value})",
            )
            return None
        if failure.check(CannotListenError):
            failures.append(cannot_listen(failure.value, description, option))
        else:
            failures.append(
                f"signalling: cannot listen on {description} ({option}): {failure.value}"
            )
        return None

    def _ready(self, results, failures):
        if failures:
            # An endpoint that failed later than at start-up (none of
            # Twisted's stream endpoints do).
            self._log.critical("{reason}", reason=failures[0])
            self._reactor.stop()
            return None
        return self._started([r for r in results if r is not None])

    def _started(self, listening):
        ports = [port for _, port in listening]
        self._listening_ports = ports
        for description, port in listening:
            self._log.info(
                "listening on {endpoint} ({address})",
                endpoint=description,
                address=str(port.getHost()),
            )
        if self._notifier is not None:
            self._notifier.notify("READY=1", "STATUS=accepting connections")
            self._watchdog = self._notifier.start_watchdog(self._reactor)
        if self._on_ready is not None:
            self._on_ready()

        if self._handle_signals:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
            # After the reactor's own handlers, which would make twistd end
            # by re-raising the signal instead of exiting with status 0.
            self._reactor.callWhenRunning(self._install_stop_handlers)
        self.ready.callback(ports)
        return ports

    def _sighup(self, signum, frame):
        self._reactor.callFromThread(self.reload)


    def reload(self):
        """
        Reload the TLS certificate and key from disk. New handshakes use them;
        established connections are untouched. A certificate that cannot be
        used is refused with one log line and the old one stays.

        Reload the token secrets too: connections whose token was signed
        with a secret no longer in the file are closed (4001, ``token
        revoked``). A secrets file that cannot be used leaves the old
        secrets, and every connection.

        :returns: True if the new certificate is in use.
        """
        if self._notifier is not None:
            monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self._notifier.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")
        try:
            if self.token_keys is not None:
                try:
                    self.token_keys.reload()
                except AuthConfigError as e:
                    self._log.error("{reason}; the old token secrets stay", reason=str(e))
                else:
                    closed = sum(f.close_revoked() for f in self._ws_factories)
                    self._log.info(
                        "reloaded the token secrets; closed {count} connections "
                        "whose token's secret was removed",
                        count=closed,
                    )
            if self._server_tls is None:
                self._log.info("reload asked for, but no port serves our TLS")
                return False
            return self._server_tls.reload()
        finally:
            if self._notifier is not None:
                self._notifier.notify("READY=1", "STATUS=accepting connections")

    def stopService(self):
        """
        Stop accepting, close every connection with 1001, wait for them;
        then stop the backend.
        """
        Service.stopService(self)
        if self._notifier is not None:
            self._notifier.notify("STOPPING=1", "STATUS=closing connections")
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        self._restore_stop_handlers()
        # The other children in reverse order (as MultiService): the ports
        # stop listening.
        stopped = defer.gatherResults(
            [
                defer.maybeDeferred(child.stopService)
                for child in reversed(list(self))
                if child is not self.backend
            ]
        )
        self._listening_ports = []
        stopped.addCallback(lambda _: self._close_connections())
        if self.backend is not None:
            stopped.addCallback(lambda _: self.backend.stopService())
        return stopped

    def _open_connections(self):
        return sum(f.getConnectionCount() for f in self._ws_factories)

    def _close_connections(self):
        for factory in self._ws_factories:
            factory.begin_shutdown()
        for factory in self._ws_factories:
            factory.close_all()
        if self._open_connections() == 0:
            return None
        done = defer.Deferred()
        deadline = self._reactor.seconds() + self._shutdown_timeout

        def check():
            left = self._open_connections()
            if left == 0:
                done.callback(None)
            elif self._reactor.seconds() >= deadline:
                self._log.warn(
                    "shutting down with {count} connections still open",
                    count=left,
                )
                done.callback(None)
            else:
                self._reactor.callLater(_SHUTDOWN_POLL, check)

        self._reactor.callLater(_SHUTDOWN_POLL, check)
        return done

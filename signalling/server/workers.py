"""
Worker processes on one machine (``--workers N``): one process binds every
listening socket and hands them to N worker processes, which accept on them
side by side (the kernel spreads new connections over them), all on the
same Redis, so that together they are one server.

The parent binds the ports the way Twisted documents for sharing one: it
listens, stops reading, and passes the socket's file descriptor to each
child (``spawnProcess``'s ``childFDs``), which adopts it with
``reactor.adoptStreamPort`` (an ``AdoptedStreamServerEndpoint``). The
children are ``twistd -n signalling`` with the parent's own options, plus
``--worker-index``, ``--worker-fds`` and ``--worker-pipe``.

The parent supervises them:

- a worker that exits (or is killed) is started again, after a delay that
  grows while workers keep dying at once;
- each worker writes ``ready`` on its pipe once it listens and has reached
  Redis, then ``alive`` every second from its reactor; the parent tells
  systemd ``READY=1`` once every worker has been ready, and sends its
  watchdog ping only while every worker is alive; a worker silent for
  ``worker_timeout`` seconds is killed and started again;
- SIGHUP is passed on to every worker (each reloads its certificate and
  token secrets); on SIGTERM the parent stops: every worker is sent SIGTERM
  (each closes its connections with 1001), and those still running after
  the shutdown timeout are killed.
"""

import os
import signal
import socket
import sys

from twisted.internet import defer, protocol
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from signalling.server.listening import FamilyUnavailable
from signalling.server.service import GracefulStop, TwistdService

#: Seconds between a worker's ``alive`` lines.
ALIVE_INTERVAL = 1.0
#: Seconds without an ``alive`` line after which a worker is killed.
WORKER_TIMEOUT = 10.0
#: Seconds without an ``alive`` line after which the watchdog pings stop.
UNHEALTHY_AFTER = 3 * ALIVE_INTERVAL
#: Seconds the workers get to mark themselves as stopping before SIGTERM.
PREPARE_TIMEOUT = 2.0
#: The file descriptor a worker writes ``ready`` and ``alive`` on.
PIPE_FD = 3
#: Environment variables the workers do not inherit: systemd's notification
#: socket and watchdog are the parent's, and so are sockets it passed in.
_PARENT_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                "LISTEN_FDNAMES")


def worker_argv(argv):
    """
    :returns: the options a worker is started with: the parent's, less
        ``--workers``.
    """
    out = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return out


def twistd_argv():
    """:returns: the command that runs this interpreter's twistd."""
    entry = "import sys; from twisted.scripts.twistd import run; sys.exit(run())"
    return [sys.executable, "-c", entry]


class _Worker(protocol.ProcessProtocol):
    """One worker process, as its supervisor sees it."""

    def __init__(self, supervisor, index):
        self.supervisor = supervisor
        self.index = index
        self.ready = False
        self.last_alive = None
        self.ended = defer.Deferred()
        #: Fires once the worker marked itself as stopping (SIGUSR2).
        self.stopping = defer.Deferred()
        self._buffer = b""

    def childDataReceived(self, fd, data):
        if fd != PIPE_FD:
            return
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self.supervisor._heard(self, line.strip())

    def processEnded(self, reason):
        self.ended.callback(reason.value)
        self.supervisor._ended(self, reason.value)

    @property
    def pid(self):
        return self.transport.pid if self.transport is not None else None

    def signal(self, name):
        """Send a signal (a name Twisted knows, such as ``TERM``, or a number); a gone process is fine."""
        try:
            self.transport.signalProcess(name)
        except ProcessExitedAlready:
            pass


class Supervisor(GracefulStop, TwistdService):
    """
    The parent of ``--workers N``.

    :param reactor: the reactor (``spawnProcess``, time).
    :param ports: ``[(description, endpoint)]`` to bind and hand over.
    :param count: how many workers.
    :param argv: the worker's options (see :func:`worker_argv`).
    :param notifier: a :class:`signalling.server.systemd.Notifier`, or None.
    :param shutdown_timeout: seconds the workers get to close their
        connections on SIGTERM.
    :param handle_signals: pass SIGHUP on (under twistd).
    :param command: the argv prefix that runs twistd (tests may change it).
    :param worker_timeout: seconds of silence after which a worker is killed.
    """

    _log = Logger()

    def __init__(
        self,
        reactor,
        ports,
        count,
        argv,
        notifier=None,
        shutdown_timeout=5.0,
        handle_signals=False,
        command=None,
        worker_timeout=WORKER_TIMEOUT,
        environ=None,
        log_observer=None,
    ):
        self._log_observer = log_observer
        self._reactor = reactor
        self._ports = ports
        self._count = count
        self._argv = argv
        self._notifier = notifier
        self._shutdown_timeout = shutdown_timeout
        self._handle_signals = handle_signals
        self._command = command or twistd_argv()
        self._worker_timeout = worker_timeout
        self._environ = dict(os.environ if environ is None else environ)
        for name in _PARENT_ONLY:
            self._environ.pop(name, None)
        self._listening = []
        self._fds = []
        self.workers = {}
        self._stopping = False
        self._told_ready = False
        self._deaths = []
        self._watchdog = None
        self._checker = None
        self._previous_sighup = None
        self._previous_handlers = {}
        #: How many workers were started again after they ended.
        self.restarts = 0
        #: Fires once every worker has been ready.
        self.ready = defer.Deferred()

    # Starting.

    def privilegedStartService(self):
        super().privilegedStartService()
        self._bind()

    def startService(self):
        super().startService()
        self._bind()
        for index in range(self._count):
            if index not in self.workers:
                self._spawn(index)
        self._checker = LoopingCall(self._check)
        self._checker.clock = self._reactor
        self._checker.start(ALIVE_INTERVAL, now=False)
        if self._handle_signals:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
            self._reactor.callWhenRunning(self._install_stop_handlers)

    def _bind(self):
        if self._listening:
            return
        bound = []
        for description, endpoint in self._ports:
            d = endpoint.listen(protocol.Factory())
            port, failed = [], []
            d.addCallbacks(port.append, failed.append)
            if failed and failed[0].check(FamilyUnavailable):
                # No IPv6 here: the workers leave this port out too.
                self._log.warn(
                    "not listening on {endpoint}: {reason}",
                    endpoint=description,
                    reason=f"no IPv6 on this machine ({failed[0].value})",
                )
                bound.append(None)
                continue
            if failed:
                failed[0].raiseException()
            if not port:
                # Twisted's stream endpoints listen at once; this one did not.
                raise RuntimeError(f"cannot hand over {description}: it did not listen at once")
            listening = port[0]
            # Accepting is the workers' job: the parent keeps the socket only
            # to hand it over (and to keep it bound while workers restart).
            listening.stopReading()
            bound.append(listening)
            self._log.info(
                "listening on {endpoint} ({address}) for {count} workers",
                endpoint=description,
                address=str(listening.getHost()),
                count=self._count,
            )
        self._listening = [port for port in bound if port is not None]
        #: What each worker is told: ``fd:FAMILY`` per port, ``-`` for one left out.
        self._spec = ",".join(
            f"{port.fileno()}:{_family(port)}" if port is not None else "-" for port in bound
        )
        self._fds = [port.fileno() for port in self._listening]

    def _spawn(self, index):
        worker = _Worker(self, index)
        fds = {0: "w", 1: 1, 2: 2, PIPE_FD: "r"}
        # The listening sockets keep their numbers in the worker.
        for fd in self._fds:
            fds[fd] = fd
        argv = self._command + [
            "-n", "--pidfile=", "signalling", *self._argv,
            "--worker-index", str(index),
            "--worker-fds", self._spec,
            "--worker-pipe", str(PIPE_FD),
        ]
        self._reactor.spawnProcess(
            worker, argv[0], argv, env=self._environ, childFDs=fds
        )
        worker.last_alive = self._reactor.seconds()
        self.workers[index] = worker
        self._log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)
        return worker

    # What the workers say.

    def _heard(self, worker, line):
        if self.workers.get(worker.index) is not worker:
            return
        worker.last_alive = self._reactor.seconds()
        if line == b"stopping" and not worker.stopping.called:
            self._log.info("worker {index} is stopping", index=worker.index)
            worker.stopping.callback(None)
        if line == b"ready" and not worker.ready:
            worker.ready = True
            self._log.info("worker {index} ready (pid {pid})", index=worker.index, pid=worker.pid)
            if not self._told_ready and all(
                w.ready for w in self.workers.values()
            ) and len(self.workers) == self._count:
                self._told_ready = True
                if self._notifier is not None:
                    self._notifier.notify(
                        "READY=1", f"STATUS=accepting connections with {self._count} workers"
                    )
                    self._watchdog = self._notifier.start_watchdog_with(
                        self._reactor, self.healthy
                    )
                self.ready.callback(None)

    def healthy(self):
        """:returns: whether every worker is running and said it is alive lately."""
        now = self._reactor.seconds()
        return len(self.workers) == self._count and all(
            w.ready and now - w.last_alive < UNHEALTHY_AFTER for w in self.workers.values()
        )

    def _check(self):
        now = self._reactor.seconds()
        for worker in list(self.workers.values()):
            if now - worker.last_alive >= self._worker_timeout:
                self._log.warn(
                    "worker {index} (pid {pid}) said nothing for {seconds:.0f} s: killing it",
                    index=worker.index,
                    pid=worker.pid,
                    seconds=now - worker.last_alive,
                )
                worker.last_alive = now
                worker.signal("KILL")

    def _ended(self, worker, reason):
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self._stopping:
            return
        code = getattr(reason, "exitCode", None)
        how = f"exit status {code}" if code is not None else f"signal {getattr(reason, 'signal', '?')}"
        self._log.warn(
            "worker {index} (pid {pid}) ended ({how}); starting it again",
            index=worker.index,
            pid=worker.transport.pid if worker.transport is not None else None,
            how=how,
        )
        now = self._reactor.seconds()
        self._deaths = [t for t in self._deaths if now - t < 60] + [now]
        # Workers dying one after another (a bad configuration, Redis gone
        # for good) are started again more and more slowly, up to 30 s.
        delay = min(30.0, 0.5 * 2 ** max(0, len(self._deaths) - self._count))
        self.restarts += 1
        self._reactor.callLater(delay, self._respawn, worker.index)

    def _respawn(self, index):
        if not self._stopping and index not in self.workers:
            self._spawn(index)

    # Signals.

    def _sighup(self, signum, frame):
        self._reactor.callFromThread(self.reload)

    def reload(self):
        """Pass SIGHUP on to every worker."""
        self._log.info("SIGHUP: passed on to {count} workers", count=len(self.workers))
        for worker in self.workers.values():
            worker.signal("HUP")

    # Stopping.

    def stopService(self):
        super().stopService()
        self._stopping = True
        if self._notifier is not None:
            self._notifier.notify("STOPPING=1", "STATUS=stopping the workers")
        for loop in (self._watchdog, self._checker):
            if loop is not None and loop.running:
                loop.stop()
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        self._restore_stop_handlers()
        workers = list(self.workers.values())
        # First every worker marks itself as stopping, then every worker
        # closes its connections: so no peer is told its partner on
        # another worker left (1000) when the whole server stops (1001).
        for worker in workers:
            worker.signal(signal.SIGUSR2)
        prepared = defer.DeferredList([w.stopping for w in workers], consumeErrors=True)
        prepared.addTimeout(PREPARE_TIMEOUT, self._reactor, lambda *_: None)
        prepared.addBoth(lambda _: self._terminate(workers))
        return prepared

    def _terminate(self, workers):
        for worker in workers:
            worker.signal("TERM")
        ended = defer.DeferredList([w.ended for w in workers])
        deadline = self._shutdown_timeout + 5.0

        def kill_the_rest():
            for worker in workers:
                if not worker.ended.called:
                    self._log.warn("worker {index} did not stop in time: killing it", index=worker.index)
                    worker.signal("KILL")

        late = self._reactor.callLater(deadline, kill_the_rest)
        ended.addBoth(lambda _: late.cancel() if late.active() else None)
        ended.addBoth(lambda _: self._unbind())
        return ended

    def _unbind(self):
        listening, self._listening = self._listening, []
        return defer.gatherResults(
            [defer.maybeDeferred(port.stopListening) for port in listening]
        )


def _family(port):
    """:returns: the name of a listening port's address family (AF_INET, AF_INET6, AF_UNIX)."""
    family = getattr(port, "addressFamily", None)
    if family is None:
        family = port.socket.family
    return socket.AddressFamily(family).name


def adopted(reactor, spec):
    """
    :param spec: ``--worker-fds``: ``fd:FAMILY`` per port, ``-`` for one
        the parent left out.
    :returns: per port, an ``AdoptedStreamServerEndpoint`` on the socket the
        parent handed over, or None.
    """
    endpoints = []
    for item in spec.split(","):
        if item == "-":
            endpoints.append(None)
            continue
        fd, _, family = item.partition(":")
        endpoints.append(
            AdoptedStreamServerEndpoint(reactor, int(fd), getattr(socket, family))
        )
    return endpoints


def parse_worker_fds(spec):
    """Check a ``--worker-fds`` value; :returns: it."""
    for item in spec.split(","):
        if item == "-":
            continue
        fd, sep, family = item.partition(":")
        if not sep or not fd.isdigit() or family not in ("AF_INET", "AF_INET6", "AF_UNIX"):
            raise ValueError(f"expected FD:AF_INET|AF_INET6|AF_UNIX (or -) per port, not {item!r}")
        getattr(socket, family)
    return spec


class WorkerPipe:
    """
    A worker's side of its pipe to the supervisor: ``ready`` once, then
    ``alive`` every second from the reactor (so a wedged reactor goes silent).
    """

    def __init__(self, fd, reactor):
        self._fd = fd
        self._reactor = reactor
        self._loop = None

    def when_serving(self, registry):
        """
        :returns: what the service calls once it listens: the pipe says
            ``ready`` as soon as ``registry`` serves too (a cluster node has
            reached Redis).
        """

        def listening():
            if registry.up:
                self.ready()
            else:
                registry.watchers.append(lambda up: up and self.ready())

        return listening

    def stop_in_step(self, factories):
        """
        On SIGUSR2 (the supervisor's first step of a stop), mark the
        server as stopping before any worker closes a connection: a
        partner on another worker that goes from then on is closed with
        1001, as in one process, not 1000 as if it had left. Then say
        ``stopping``; SIGTERM follows.
        """

        def prepare():
            for factory in factories:
                factory.begin_shutdown()
            self._write(b"stopping\n")

        signal.signal(signal.SIGUSR2, lambda signum, frame: self._reactor.callFromThread(prepare))

    def ready(self):
        if self._loop is not None:
            return
        self._write(b"ready\n")
        self._loop = LoopingCall(self._write, b"alive\n")
        self._loop.clock = self._reactor
        self._loop.start(ALIVE_INTERVAL, now=False)

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _write(self, line):
        try:
            os.write(self._fd, line)
        except OSError:
            # The supervisor is gone; this worker will be stopped.
            self.stop()

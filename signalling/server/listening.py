"""
Where the server listens: endpoint descriptions turned into endpoints with
errors that say what to do, the default port on both IPv4 and IPv6, sockets
handed over by systemd, and a check that a port can be bound before twistd
puts the process in the background.
"""

import errno
import os
import re
import socket
import stat

from twisted.internet import defer
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    _SystemdParser,
    serverFromString,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer


class StartupError(SystemExit, Exception):
    """
    A start-up failure the operator must fix: one line, exit status 1.

    A ``SystemExit``, so that twistd prints the line (no traceback) and
    exits 1; and an ``Exception``, so that twistd in daemon mode reports it
    to the parent process waiting for the start and removes its pid file,
    where a plain ``SystemExit`` would leave the parent waiting for ever.
    """


class FamilyUnavailable(Exception):
    """This machine has no IPv6 (or not on that address): skip the port."""


#: Errors of socket() and bind() that mean the address family is missing.
_NO_FAMILY = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


def ipv6_only_socket(interface, port, backlog):
    """
    :returns: a listening, non-blocking IPv6 TCP socket that takes no IPv4
        connections (``IPV6_V6ONLY``), so that an IPv4 port with the same
        number can listen beside it.
    :raises FamilyUnavailable: when the machine has no IPv6.
    :raises CannotListenError: when the port cannot be bound.
    """
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError as e:
        raise FamilyUnavailable(str(e)) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((interface, port))
        except OSError as e:
            if e.errno in _NO_FAMILY:
                raise FamilyUnavailable(str(e)) from None
            raise CannotListenError(interface, port, e) from None
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@implementer(IStreamServerEndpoint)
class IPv6OnlyServerEndpoint:
    """
    Listens on an IPv6 address only, beside an IPv4 port of the same number
    (what the default port does, as GStreamer's example server does).

    :param reactor: an ``IReactorSocket``.
    :param port: the port number.
    :param backlog: the listen backlog.
    :param interface: the IPv6 address, every one by default.
    """

    def __init__(self, reactor, port, backlog=50, interface="::"):
        self._reactor = reactor
        self._port = port
        self._backlog = backlog
        self._interface = interface

    def listen(self, factory):
        """:returns: a Deferred ``IListeningPort``; fails with :class:`FamilyUnavailable` without IPv6."""
        try:
            sock = ipv6_only_socket(self._interface, self._port, self._backlog)
        except (FamilyUnavailable, CannotListenError) as e:
            return defer.fail(e)
        try:
            # The reactor takes its own copy of the descriptor.
            return defer.succeed(
                self._reactor.adoptStreamPort(sock.fileno(), socket.AF_INET6, factory)
            )
        except Exception:
            return defer.fail()
        finally:
            sock.close()


def ipv6_twin(reactor, description):
    """
    :param description: the IPv4 description of a default port (every
        interface), such as ``tcp:8443:backlog=4096``.
    :returns: the IPv6 endpoint that listens beside it on the same number.
    """
    address = listen_address(description)
    return IPv6OnlyServerEndpoint(reactor, address.port, address.backlog)


class ListenAddress:
    """Where a ``tcp:``, ``tcp6:`` or ``ssl:`` description listens."""

    def __init__(self, family, interface, port, backlog):
        self.family = family
        self.interface = interface
        self.port = port
        self.backlog = backlog


def listen_address(description):
    """
    :returns: the :class:`ListenAddress` of a ``tcp:``, ``tcp6:`` or
        ``ssl:`` endpoint description, or None for any other kind (or one
        that does not parse; parsing the endpoint says what is wrong).
    """
    parts = re.split(r"(?<!\\):", description)
    kind = parts[0]
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    positional = [p for p in parts[1:] if "=" not in p]
    named = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    try:
        port = int(named.get("port", positional[0] if positional else ""))
        backlog = int(named.get("backlog", 50))
    except ValueError:
        return None
    interface = named.get("interface", "").replace("\\:", ":")
    ipv6 = kind == "tcp6" or ":" in interface
    if ipv6 and not interface:
        interface = "::"
    return ListenAddress(
        socket.AF_INET6 if ipv6 else socket.AF_INET, interface, port, backlog
    )


def parse(reactor, description, listen_on=None, option="--port"):
    """
    Parse an endpoint description (nothing binds yet).

    :param description: what the operator wrote.
    :param listen_on: the description to listen on, when the server
        rewrote it (a bare ``ssl:`` becomes ``tcp:`` under our TLS layer, a
        backlog is added); ``description`` by default.
    :param option: the option it came from, for the error.
    :returns: the endpoint.
    :raises StartupError: one line naming the option and the description
        given, and what to do, when it cannot be used.
    """
    if listen_on is None:
        listen_on = description
    try:
        if not listen_on:
            raise ValueError("no endpoint description")
        if listen_on.startswith("systemd:"):
            return systemd_endpoint(reactor, listen_on)
        return serverFromString(reactor, listen_on)
    except Exception as e:
        text = " ".join((str(e) or type(e).__name__).split())
        if re.fullmatch(r"\d+", description.strip()):
            number = description.strip()
            text = (
                f"give an endpoint, not a bare number: ssl:{number} (TLS) "
                f"or tcp:{number} (plaintext)"
            )
        raise StartupError(f"signalling: cannot use {option} {description!r}: {text}")


def _systemd_arguments(description):
    arguments = {}
    for part in re.split(r"(?<!\\):", description)[1:]:
        name, equals, value = part.partition("=")
        if not equals:
            raise ValueError(f"{part!r} is not NAME=VALUE")
        arguments[name] = value.replace("\\:", ":")
    unknown = set(arguments) - {"domain", "index", "name"}
    if unknown:
        raise ValueError(f"unknown argument {sorted(unknown)[0]!r} (domain=, index= or name=)")
    return arguments


def listening_socket_at(fd):
    """:returns: whether file descriptor ``fd`` is an open, listening stream socket."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False
    finally:
        sock.close()


def _inherited():
    """
    :returns: ``(descriptors, names)`` handed over by systemd, as Twisted
        read them (it reads and removes ``LISTEN_FDS`` and ``LISTEN_PID``
        when its endpoints module is imported).
    """
    listen_fds = _SystemdParser._sddaemon
    named = listen_fds.inheritedNamedDescriptors()
    return listen_fds.inheritedDescriptors(), list(named)


#: SD_LISTEN_FDS_START: the first descriptor systemd hands over.
_FIRST_FD = 3


def systemd_endpoint(reactor, description, inherited=None, is_listening=None):
    """
    A socket handed over by systemd (socket activation), with errors that
    say what is missing. Sockets passed without names (as
    ``systemd-socket-activate`` does unless given ``--fdname``), which
    Twisted's own parser does not see, are found by ``index=``.

    :param inherited: ``(descriptors, names)``; what systemd handed over
        by default.
    :param is_listening: tells whether a descriptor is a listening socket;
        :func:`listening_socket_at` by default.
    """
    descriptors, names = _inherited() if inherited is None else inherited
    is_listening = listening_socket_at if is_listening is None else is_listening
    arguments = _systemd_arguments(description)
    domain = arguments.get("domain")
    if domain is None:
        raise ValueError("domain= is missing (INET, INET6 or UNIX)")
    family = getattr(socket, "AF_" + domain, None)
    if family is None:
        raise ValueError(f"unknown domain {domain!r} (INET, INET6 or UNIX)")
    if ("index" in arguments) == ("name" in arguments):
        raise ValueError("give exactly one of index= and name=")
    unnamed = not descriptors and is_listening(_FIRST_FD)
    nothing = (
        "no socket was passed in (LISTEN_FDS and LISTEN_PID are not set for this "
        "process, and file descriptor 3 is no listening socket): start the server "
        "from a systemd socket unit, or listen on a port of its own such as ssl:8443"
    )
    if "index" in arguments:
        try:
            index = int(arguments["index"])
        except ValueError:
            raise ValueError(f"index= is not a number: {arguments['index']!r}") from None
        if index < 0:
            raise ValueError(f"index= must be 0 or more, not {index}")
        if index < len(descriptors):
            return AdoptedStreamServerEndpoint(reactor, descriptors[index], family)
        if unnamed:
            # Passed without LISTEN_FDNAMES: Twisted ignored them.
            if is_listening(_FIRST_FD + index):
                return AdoptedStreamServerEndpoint(reactor, _FIRST_FD + index, family)
            raise ValueError(
                f"file descriptor {_FIRST_FD + index} (index={index}) is no listening "
                f"socket; the first socket passed in is index=0"
            )
        if not descriptors:
            raise ValueError(nothing)
        count = len(descriptors)
        raise ValueError(
            f"systemd passed {count} socket{'s' if count != 1 else ''}, so "
            f"index={index} does not exist (the first is index=0)"
        )
    name = arguments["name"]
    if unnamed:
        raise ValueError(
            f"the sockets were passed without names (LISTEN_FDNAMES is not set), so "
            f"name={name} cannot be found: use index=, or name the socket "
            f"(FileDescriptorName= in the socket unit, systemd-socket-activate "
            f"--fdname={name})"
        )
    if not descriptors:
        raise ValueError(nothing)
    if name not in names:
        raise ValueError(
            f"no socket named {name!r} was passed in (LISTEN_FDNAMES: {', '.join(names)})"
        )
    return AdoptedStreamServerEndpoint(reactor, descriptors[names.index(name)], family)


def _where(interface, port):
    if not interface:
        return f"port {port}"
    if ":" in interface:
        return f"[{interface}]:{port}"
    return f"{interface}:{port}"


def cannot_listen(error, description, option="--port"):
    """
    :param error: a ``CannotListenError``.
    :returns: the operator's one line for a port that cannot be bound,
        naming the option to change.
    """
    where = _where(error.interface, error.port)
    reason = error.socketError
    hint = f"stop what holds it, or choose another port with {option}"
    code = getattr(reason, "errno", None)
    if code == errno.EACCES:
        hint = (
            f"ports below 1024 need root (twistd -u/-g drops it after binding) "
            f"or CAP_NET_BIND_SERVICE; or choose another port with {option}"
        )
    elif code == errno.EADDRNOTAVAIL:
        hint = f"no interface has that address; change {option}"
    return f"signalling: cannot listen on {where}: {reason} ({option} {description}: {hint})"


def check_can_listen(listen_on, description, option="--port"):
    """
    Bind the port of a TCP endpoint once and let it go, so that a busy port
    is reported before twistd forks into the background (where the error
    could only reach the log file). The real listening comes later.

    :param listen_on: the endpoint description to listen on (a ``tcp:``,
        ``tcp6:`` or ``ssl:`` one is checked; others are not), or an
        :class:`IPv6OnlyServerEndpoint`.
    :param description: what the operator wrote, for the error.
    :raises StartupError: with the same line the start itself would give.
    """
    v6_only = isinstance(listen_on, IPv6OnlyServerEndpoint)
    if v6_only:
        address = ListenAddress(
            socket.AF_INET6, listen_on._interface, listen_on._port, listen_on._backlog
        )
    else:
        address = listen_address(listen_on)
    if address is None or address.port == 0:
        return
    try:
        sock = socket.socket(address.family, socket.SOCK_STREAM)
    except OSError:
        return  # no such family here: the real start says so
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6_only:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.interface, address.port))
    except OSError as e:
        if v6_only and e.errno in _NO_FAMILY:
            return
        raise StartupError(
            cannot_listen(
                CannotListenError(address.interface, address.port, e), description, option
            )
        ) from None
    finally:
        sock.close()

"""
A small WebSocket client (RFC 6455) on asyncio, made to cost the load
generator as little CPU as possible per message.

It is an :class:`asyncio.Protocol` rather than a stream reader: frames are
parsed straight out of ``data_received`` and handed to a callback (or queued
for :meth:`Connection.recv`), and every frame written while one batch of
input is handled goes out in a single ``write``. It answers pings, takes part
in the closing handshake, and reassembles fragmented messages; it offers no
extension (no compression), so a server does the same work for it as for
any client that offers none.

Measured against ``websockets`` (the new asyncio client of version 13 and
later) in the relay scenario against the same server, this client used half
to a third of the CPU per round trip; ``benchmarks/README.md`` has the
numbers.
"""

import asyncio
import base64
import hashlib
import random
import socket
import ssl
import struct
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

try:  # The C helper of websockets, when installed (the test extra has it).
    from websockets.speedups import apply_mask as _c_apply_mask
except ImportError:  # pragma: no cover - depends on the environment
    _c_apply_mask = None

TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA
_CONTINUATION = 0x0

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Linux's IP_BIND_ADDRESS_NO_PORT: bind a source address now, pick the port
#: at connect time (per destination), so that many connections fit.
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

#: Masking keys need not be secret for a load generator; a fast PRNG will do.
_random_bytes = random.Random().randbytes


def _py_apply_mask(data, key):
    """XOR ``data`` with the 4-byte ``key`` repeated (pure Python)."""
    length = len(data)
    if not length:
        return b""
    repeated = (key * (length // 4 + 1))[:length]
    return (int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
        length, "little"
    )


apply_mask = _c_apply_mask or _py_apply_mask


class ConnectionClosed(Exception):
    """The connection closed while a message was expected."""


class HandshakeError(Exception):
    """The server refused or botched the opening handshake."""


@dataclass(frozen=True)
class Target:
    """
    Where to connect, as given on the command line; picklable, so that it
    can be handed to the client processes, which each make an
    :class:`Endpoint` from it.

    :param url: ``ws://`` or ``wss://`` URL.
    :param insecure: do not verify the server's certificate.
    :param ca_file: trust only the certificates in this PEM file.
    """

    url: str
    insecure: bool = False
    ca_file: str = None

    def __post_init__(self):
        parts = urlsplit(self.url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"not a ws:// or wss:// URL: {self.url!r}")
        if not parts.hostname:
            raise ValueError(f"no host in {self.url!r}")
        parts.port  # noqa: B018 - raises ValueError on a bad port

    @property
    def secure(self):
        return urlsplit(self.url).scheme == "wss"


class Endpoint:
    """
    A resolved :class:`Target`: address, TLS context, request line. Resolved
    once, so that a storm of connections does not resolve the name each time.
    """

    def __init__(self, target):
        parts = urlsplit(target.url)
        self.host = parts.hostname
        self.port = parts.port or (443 if target.secure else 80)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        self.path = path
        default_port = 443 if target.secure else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if self.port == default_port else f"{host}:{self.port}"
        self.ssl = client_context(target.insecure, target.ca_file) if target.secure else None
        #: The address that answered the first connection (asyncio tries
        #: every address of the name in turn); later connections go there
        #: directly, without resolving the name again.
        self.sockaddr = None
        self._ipv4 = None

    def learn(self, transport):
        """Remember the address ``transport`` is connected to."""
        if self.sockaddr is None:
            peer = transport.get_extra_info("peername")
            if peer is not None:
                self.sockaddr = peer

    def resolve_ipv4(self):
        """:returns: the first IPv4 address of the host (for source addresses)."""
        if self._ipv4 is None:
            self._ipv4 = socket.getaddrinfo(
                self.host, self.port, socket.AF_INET, socket.SOCK_STREAM
            )[0][4]
        return self._ipv4


def client_context(insecure=False, ca_file=None):
    """
    :returns: an ``ssl.SSLContext`` for clients: the system's trust store,
        or only ``ca_file``; no verification at all when ``insecure``.
    """
    context = ssl.create_default_context(cafile=ca_file)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Connection(asyncio.Protocol):
    """
    One client WebSocket connection.

    Received messages go to :attr:`handler` (``handler(payload, opcode)``,
    with ``payload`` as ``bytes`` and ``opcode`` :data:`TEXT` or
    :data:`BINARY`) when one is set, else into a queue read by :meth:`recv`.

    :ivar closed: a future that is done once the TCP connection is gone.
    :ivar close_code: the code of the server's close frame, if one came.
    """

    def __init__(self, loop, endpoint, first=None):
        self._loop = loop
        #: A text message sent the moment the handshake completes, or None.
        self._first = first
        self.transport = None
        key = base64.b64encode(_random_bytes(16))
        self._accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        self._request = (
            f"GET {endpoint.path} HTTP/1.1\r\n"
            f"Host: {endpoint.host_header}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode("ascii")
        self.opened = loop.create_future()
        self.closed = loop.create_future()
        self.close_code = None
        self.handler = None
        self._handshaking = True
        self._buffer = b""
        self._fragments = None
        self._fragment_opcode = None
        self._queue = deque()
        self._waiter = None
        self._batch = None
        self._close_sent = False
        self._abort_call = None

    # asyncio.Protocol

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self._request)

    def data_received(self, data):
        if self._handshaking:
            data = self._handshake(data)
            if not data:
                return
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        self._batch = batch = []
        try:
            self._parse(data)
        finally:
            self._batch = None
            if batch and not self.transport.is_closing():
                self.transport.write(b"".join(batch))

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        if self._abort_call is not None:
            self._abort_call.cancel()
            self._abort_call = None
        if not self.opened.done():
            self.opened.set_exception(
                HandshakeError(f"connection lost during the handshake: {exc or 'closed'}")
            )
        if not self.closed.done():
            self.closed.set_result(self.close_code)
        self._wake()

    # Receiving.

    def _handshake(self, data):
        """Read the answer to the upgrade; :returns: what follows it."""
        data = self._buffer + data
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > 65536:
                self._fail_handshake("oversized handshake answer")
            self._buffer = data
            return b""
        self._buffer = b""
        head = data[:end].split(b"\r\n")
        status = head[0].split(b" ", 2)
        if len(status) < 2 or status[1] != b"101":
            return self._fail_handshake(f"upgrade refused: {head[0].decode('latin-1')!r}")
        accept = None
        for line in head[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-accept":
                accept = value.strip()
        if accept != self._accept:
            return self._fail_handshake("bad Sec-WebSocket-Accept")
        self._handshaking = False
        if self._first is not None:
            # At once, as a client that speaks first does, rather than once
            # the coroutine waiting for the handshake runs again (a busy
            # event loop may take a while to get there).
            self.send_text(self._first)
        self.opened.set_result(self)
        return data[end + 4:]

    def _fail_handshake(self, reason):
        if not self.opened.done():
            self.opened.set_exception(HandshakeError(reason))
        self.transport.abort()
        return b""

    def _parse(self, data):
        size = len(data)
        pos = 0
        while size - pos >= 2:
            first = data[pos]
            length = data[pos + 1]
            masked = length & 0x80
            length &= 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = struct.unpack_from("!Q", data, pos + 2)[0]
                start = pos + 10
            if masked:
                start += 4
            end = start + length
            if end > size:
                break
            payload = data[start:end]
            if masked:  # servers must not mask; accept it anyway
                payload = apply_mask(payload, data[start - 4:start])
            pos = end
            opcode = first & 0x0F
            if opcode >= CLOSE:
                self._control(opcode, payload)
            elif first & 0x80 and opcode:
                self._deliver(payload, opcode)
            else:
                self._fragment(first & 0x80, opcode, payload)
        if pos < size:
            self._buffer = data[pos:]

    def _fragment(self, fin, opcode, payload):
        if opcode:
            self._fragments = [payload]
            self._fragment_opcode = opcode
        elif self._fragments is not None:
            self._fragments.append(payload)
        if fin and self._fragments is not None:
            message = b"".join(self._fragments)
            self._fragments = None
            self._deliver(message, self._fragment_opcode)

    def _control(self, opcode, payload):
        if opcode == PING:
            self.send(payload, PONG)
        elif opcode == CLOSE:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            if not self._close_sent:
                self.send(payload[:2], CLOSE)
                self._close_sent = True
            # The server closes the TCP connection; do it ourselves if it does not.
            self._abort_later(2.0)

    def _deliver(self, payload, opcode):
        handler = self.handler
        if handler is not None:
            handler(payload, opcode)
        else:
            self._queue.append((payload, opcode))
            self._wake()

    def _wake(self):
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def set_handler(self, handler):
        """Hand every message, those already queued first, to ``handler``."""
        self.handler = handler
        while self._queue:
            handler(*self._queue.popleft())

    async def recv(self, timeout=None):
        """
        :returns: the next message as ``(payload, opcode)``.
        :raises ConnectionClosed: when the connection is gone first.
        :raises TimeoutError: after ``timeout`` seconds.
        """
        while not self._queue:
            if self.closed.done():
                raise ConnectionClosed(f"closed (code {self.close_code})")
            self._waiter = self._loop.create_future()
            if timeout is None:
                await self._waiter
            else:
                async with asyncio.timeout(timeout):
                    await self._waiter
        return self._queue.popleft()

    async def recv_text(self, timeout=None):
        """:returns: the next message, decoded if it is text."""
        payload, opcode = await self.recv(timeout)
        return payload.decode("utf-8") if opcode == TEXT else payload

    # Sending.

    def send(self, payload, opcode=TEXT):
        """Send one frame (``payload`` is ``bytes``); a no-op once closing."""
        if self._close_sent or self.transport is None or self.transport.is_closing():
            return
        length = len(payload)
        if length < 126:
            head = bytes((0x80 | opcode, 0x80 | length))
        elif length < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0xFE, length)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, length)
        key = _random_bytes(4)
        frame = head + key + apply_mask(payload, key)
        if self._batch is not None:
            self._batch.append(frame)
        else:
            self.transport.write(frame)

    def send_text(self, text):
        """Send one text frame."""
        self.send(text.encode("utf-8"), TEXT)

    def close(self, code=1000):
        """Start the closing handshake; :returns: :attr:`closed`."""
        if not self._close_sent and not self.closed.done() and not self._handshaking:
            self.send(struct.pack("!H", code), CLOSE)
            self._close_sent = True
            self._abort_later(5.0)
        elif self._handshaking:
            self.abort()
        return self.closed

    def abort(self):
        """Drop the TCP connection at once."""
        if self.transport is not None and not self.closed.done():
            self.transport.abort()

    def _abort_later(self, delay):
        if self._abort_call is None and not self.closed.done():
            self._abort_call = self._loop.call_later(delay, self.abort)

    @property
    def is_open(self):
        return not self._handshaking and not self._close_sent and not self.closed.done()


async def connect(endpoint, timeout=10.0, source_host=None, first=None):
    """
    Open a WebSocket connection and complete the opening handshake.

    :param endpoint: an :class:`Endpoint`.
    :param source_host: bind to this local IPv4 address first (to spread
        many connections over several loopback addresses).
    :param first: a text message to send as soon as the handshake is
        complete, before this coroutine resumes.
    :returns: an open :class:`Connection`.
    """
    loop = asyncio.get_running_loop()
    connection = Connection(loop, endpoint, first)
    sock = None
    async with asyncio.timeout(timeout):
        try:
            if source_host is not None:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((source_host, 0))
                await loop.sock_connect(sock, endpoint.resolve_ipv4())
                await loop.create_connection(
                    lambda: connection,
                    sock=sock,
                    ssl=endpoint.ssl,
                    server_hostname=endpoint.host if endpoint.ssl else None,
                )
            else:
                sockaddr = endpoint.sockaddr
                transport, _ = await loop.create_connection(
                    lambda: connection,
                    endpoint.host if sockaddr is None else sockaddr[0],
                    endpoint.port,
                    ssl=endpoint.ssl,
                    server_hostname=endpoint.host if endpoint.ssl else None,
                )
                endpoint.learn(transport)
            await connection.opened
        except BaseException:
            connection.abort()
            if sock is not None and connection.transport is None:
                sock.close()
            raise
    return connection

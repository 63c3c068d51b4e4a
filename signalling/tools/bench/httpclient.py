"""
A small HTTP/1.1 client on asyncio streams, for the WHEP scenarios: one
connection (plaintext or TLS, from a chosen loopback source address), a
request at a time on it, the answer read whole (``Content-Length``,
``chunked``, or until the server closes). Standard library only; it trusts
a server's certificate as :mod:`signalling.tools.bench.wsclient` does
(the same :class:`~signalling.tools.bench.wsclient.Endpoint`).
"""

import asyncio
import socket
from dataclasses import dataclass

from signalling.tools.bench.wsclient import _IP_BIND_ADDRESS_NO_PORT

#: Largest head (status line and headers) or body read; a WHEP answer is a
#: few kilobytes.
MAX_READ = 1 << 20


class HttpError(Exception):
    """The server's answer is not HTTP/1.1 as this client reads it."""


@dataclass
class Response:
    """
    One answer.

    :ivar status: its status code.
    :ivar headers: ``{lower-case name: value}`` (the last of a repeated name).
    :ivar body: its body.
    """

    status: int
    headers: dict
    body: bytes


class HttpConnection:
    """One HTTP/1.1 connection to an :class:`~signalling.tools.bench.wsclient.Endpoint`."""

    def __init__(self, endpoint, reader, writer):
        self._endpoint = endpoint
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, endpoint, timeout=10.0, source_host=None):
        """
        :param source_host: bind to this local IPv4 address first (a client
            address of its own, as a viewer has).
        :returns: an open connection (its TLS handshake done).
        """
        ssl_context = endpoint.ssl
        server_hostname = endpoint.host if ssl_context else None
        sock = None
        async with asyncio.timeout(timeout):
            try:
                if source_host is not None:
                    loop = asyncio.get_running_loop()
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
                    sock.bind((source_host, 0))
                    await loop.sock_connect(sock, endpoint.resolve_ipv4())
                    reader, writer = await asyncio.open_connection(
                        sock=sock, ssl=ssl_context, server_hostname=server_hostname,
                        limit=MAX_READ,
                    )  # fmt: skip
                else:
                    sockaddr = endpoint.sockaddr
                    reader, writer = await asyncio.open_connection(
                        endpoint.host if sockaddr is None else sockaddr[0], endpoint.port,
                        ssl=ssl_context, server_hostname=server_hostname, limit=MAX_READ,
                    )  # fmt: skip
                    endpoint.learn(writer.transport)
            except BaseException:
                if sock is not None:
                    sock.close()
                raise
        return cls(endpoint, reader, writer)

    async def request(self, method, path, body=b"", headers=(), timeout=10.0):
        """
        Send one request and read its answer whole.

        :param headers: ``(name, value)`` pairs besides ``Host`` and
            ``Content-Length``.
        :returns: the :class:`Response`.
        :raises HttpError: for an answer that cannot be read.
        :raises ConnectionError: when the server closes first.
        """
        head = [f"{method} {path} HTTP/1.1", f"Host: {self._endpoint.host_header}"]
        head += [f"{name}: {value}" for name, value in headers]
        if body or method in ("POST", "PATCH", "PUT"):
            head.append(f"Content-Length: {len(body)}")
        self._writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        async with asyncio.timeout(timeout):
            return await self._read_response(method)

    async def _read_response(self, method):
        reader = self._reader
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            raise ConnectionError("the server closed the connection before answering") from None
        except asyncio.LimitOverrunError:
            raise HttpError("oversized head") from None
        lines = head[:-4].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise HttpError(f"not an HTTP status line: {lines[0][:60]!r}")
        status = int(parts[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked()
        elif "content-length" in headers:
            length = int(headers["content-length"])
            if length > MAX_READ:
                raise HttpError(f"a body of {length} bytes")
            body = await reader.readexactly(length)
        else:
            body = await reader.read(MAX_READ)
        return Response(status, headers, body)

    async def _read_chunked(self):
        reader = self._reader
        chunks = []
        size = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            length = int(line.split(b";", 1)[0].strip(), 16)
            if length == 0:
                # Trailers (none expected) end with an empty line.
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return b"".join(chunks)
            size += length
            if size > MAX_READ:
                raise HttpError("an oversized chunked body")
            chunks.append(await reader.readexactly(length))
            await reader.readexactly(2)

    def close(self):
        """Close the connection (without waiting for the server)."""
        self._writer.close()

    def abort(self):
        """Drop the TCP connection at once."""
        self._writer.transport.abort()

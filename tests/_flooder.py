"""
A flooding WebSocket client in a process of its own (standard library only),
so that the process measuring an unrelated pair does not share its CPU.

    python _flooder.py HOST PORT KIND SECONDS [--tls CAFILE]

KIND is ``pings`` (pings of 16 bytes, as fast as the server takes them, its
pongs read and thrown away) or ``fragments`` (messages of 1,000 one-byte
fragments, just under the server's default cap, sent into a session whose
other end, in this process too, reads and throws away what is relayed). It prints ``ready`` once the WebSocket is open and
it is about to flood, and ``sent N`` with the bytes it sent when it stops.
"""

import base64
import os
import select
import socket
import ssl
import struct
import sys
import time


def frame(opcode, payload, fin=True):
    """:returns: a masked client frame (payload under 126 bytes)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(((0x80 if fin else 0) | opcode, 0x80 | len(payload))) + mask + masked


def open_websocket(host, port, cafile):
    sock = socket.create_connection((host, port))
    if cafile:
        context = ssl.create_default_context(cafile=cafile)
        sock = context.wrap_socket(sock, server_hostname="localhost")
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            raise SystemExit("closed during the handshake")
        head += data
    if not head.startswith(b"HTTP/1.1 101"):
        raise SystemExit(f"refused: {head[:80]!r}")
    return sock


def expect(sock, what):
    """Read until ``what`` came (the server's short replies)."""
    data = b""
    while what not in data:
        more = sock.recv(4096)
        if not more:
            raise SystemExit(f"closed while waiting for {what!r}")
        data += more


def main(argv):
    host, port, kind, seconds = argv[1], int(argv[2]), argv[3], float(argv[4])
    cafile = argv[6] if len(argv) > 6 and argv[5] == "--tls" else None
    flooder = open_websocket(host, port, cafile)
    flooder.sendall(frame(1, b"HELLO flooder"))
    expect(flooder, b"HELLO")
    sockets = [flooder]
    if kind == "pings":
        chunk = frame(9, b"p" * 16) * 2000
    elif kind == "fragments":
        sink = open_websocket(host, port, cafile)
        sink.sendall(frame(1, b"HELLO flooder-sink"))
        expect(sink, b"HELLO")
        flooder.sendall(frame(1, b"SESSION flooder-sink"))
        expect(flooder, b"SESSION_OK")
        sockets.append(sink)
        chunk = (
            frame(1, b"x", fin=False)
            + frame(0, b"x", fin=False) * 998
            + frame(0, b"x", fin=True)
        )
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    for sock in sockets:
        sock.setblocking(False)
    print("ready", flush=True)
    sent = 0
    pending = memoryview(b"")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        readable, writable, _ = select.select(sockets, [flooder], [], 0.1)
        for sock in readable:
            try:
                if not sock.recv(1 << 16):
                    raise SystemExit("the server closed a connection")
            except (BlockingIOError, ssl.SSLWantReadError):
                pass
        if writable:
            if not pending:
                pending = memoryview(chunk)
            try:
                n = flooder.send(pending)
            except (BlockingIOError, ssl.SSLWantWriteError):
                continue
            sent += n
            pending = pending[n:]
    print(f"sent {sent}", flush=True)
    for sock in sockets:
        sock.close()


if __name__ == "__main__":
    main(sys.argv)

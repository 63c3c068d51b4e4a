"""
Memory the C allocator keeps after a peak goes back to the system.

glibc's ``malloc`` keeps what is freed for reuse, and gives back to the system
only what lies at the top of its heap. Everything OpenSSL allocates, and
every buffer over Python's small-object limit (512 bytes: output waiting for
a peer, long messages, large dictionaries), comes from it. After 2,000 TLS
members of a room left at once, 60 MB stayed free inside the heap, held by
the process, until ``malloc_trim(0)`` returned those pages (in about 6 ms).

:class:`MemoryReclaimer` looks at the heap every few seconds (``mallinfo2``,
cheap) and trims it when more than a threshold became free since the last trim. Where the C library
is not glibc 2.33 or later (no ``mallinfo2``), it does nothing.

What this does not return: Python's own small-object arenas (pymalloc), which
go back only when every object in one is freed. Connections are freed by
reference counting as soon as they end (the WebSocket layer breaks their
reference cycles), so those arenas empty as far as other live objects allow,
and they are reused by the next connections.
"""

import ctypes
import ctypes.util

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: Seconds between looks at the heap.
DEFAULT_INTERVAL = 5.0
#: Free bytes in the heap above which it is trimmed.
DEFAULT_THRESHOLD = 8 * 1024 * 1024


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


class GlibcHeap:
    """glibc's heap: how much of it is free, and trimming it."""

    def __init__(self, libc):
        self._mallinfo2 = libc.mallinfo2
        self._mallinfo2.restype = _Mallinfo2
        self._mallinfo2.argtypes = []
        self._malloc_trim = libc.malloc_trim
        self._malloc_trim.restype = ctypes.c_int
        self._malloc_trim.argtypes = [ctypes.c_size_t]

    def free_bytes(self):
        """:returns: bytes free inside the heap (not yet given back)."""
        return self._mallinfo2().fordblks

    def trim(self):
        """Give every free page of the heap back to the system."""
        self._malloc_trim(0)


def glibc_heap():
    """:returns: a :class:`GlibcHeap`, or None when the C library has no ``mallinfo2``."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        return GlibcHeap(libc)
    except (OSError, AttributeError):
        return None


class MemoryReclaimer(Service):
    """
    Every ``interval`` seconds while it runs (a child of the server's
    service tree), trims the heap when more than ``threshold`` bytes of it
    became free since the last trim.

    :param heap: a :class:`GlibcHeap` (or anything with ``free_bytes`` and
        ``trim``).
    :param clock: an ``IReactorTime``.
    :param stats: a :class:`signalling.server.metrics.Stats` that counts the
        trims and the bytes they gave back, or None.
    """

    _log = Logger()

    def __init__(self, heap, clock, interval=DEFAULT_INTERVAL, threshold=DEFAULT_THRESHOLD,
                 stats=None):
        self._heap = heap
        self._threshold = threshold
        self._interval = interval
        self._stats = stats
        #: Free bytes of the heap that were given back already.
        self._trimmed = 0
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock

    def startService(self):
        """Look at the heap from now on."""
        super().startService()
        if not self._loop.running:
            self._loop.start(self._interval, now=False)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def check(self):
        """
        Trim the heap if more than the threshold became free since the last
        trim. (A trim leaves the pages it gave back counted as free: they are
        still the heap's to reuse.)

        :returns: the bytes of newly free heap the trim gave back (0 when no
            trim was needed).
        """
        free = self._heap.free_bytes()
        if free < self._trimmed:
            # Reused since: what is free now was all given back.
            self._trimmed = free
        fresh = free - self._trimmed
        if fresh <= self._threshold:
            return 0
        self._heap.trim()
        self._trimmed = self._heap.free_bytes()
        if self._stats is not None:
            self._stats.memory_trims += 1
            self._stats.memory_trimmed_bytes += fresh
        self._log.debug("gave {size} bytes of free heap back to the system", size=fresh)
        return fresh

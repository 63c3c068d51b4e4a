"""
Giving the C allocator's free heap back to the system after a peak
(:mod:`signalling.server.memory`): the reclaimer on a fake clock with a fake
heap, and glibc's real heap in this process.
"""

from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.python import usage

from signalling.server import memory
from signalling.server.metrics import Stats
from signalling.server.tap import Options

MiB = 1024 * 1024


class FakeHeap:
    """A heap whose free bytes the test sets; a trim is recorded."""

    def __init__(self):
        self.free = 0
        self.trims = 0

    def free_bytes(self):
        return self.free

    def trim(self):
        self.trims += 1


class ReclaimerTests(unittest.TestCase):
    def setUp(self):
        self.heap = FakeHeap()
        self.clock = Clock()
        self.stats = Stats()
        self.reclaimer = memory.MemoryReclaimer(
            self.heap, self.clock, interval=5, threshold=8 * MiB, stats=self.stats
        )
        self.reclaimer.startService()
        self.addCleanup(self.reclaimer.stopService)

    def test_nothing_is_trimmed_while_little_is_free(self):
        self.heap.free = 8 * MiB
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertEqual(self.heap.trims, 0)
        self.assertEqual(self.stats.memory_trims, 0)

    def test_the_heap_is_trimmed_at_the_next_look_once_more_became_free(self):
        self.heap.free = 40 * MiB
        self.clock.advance(4.9)
        self.assertEqual(self.heap.trims, 0)
        self.clock.advance(0.1)
        self.assertEqual(self.heap.trims, 1)
        self.assertEqual(self.stats.memory_trims, 1)
        self.assertEqual(self.stats.memory_trimmed_bytes, 40 * MiB)

    def test_pages_given_back_are_not_given_back_again(self):
        """A trim leaves its pages counted as free; later looks leave them be."""
        self.heap.free = 40 * MiB
        self.clock.advance(5)
        for _ in range(5):
            self.clock.advance(5)
        self.assertEqual(self.heap.trims, 1)

    def test_what_becomes_free_again_after_reuse_is_trimmed_again(self):
        self.heap.free = 40 * MiB
        self.clock.advance(5)
        self.heap.free = 2 * MiB  # reused by a new peak
        self.clock.advance(5)
        self.heap.free = 30 * MiB  # and freed again
        self.clock.advance(5)
        self.assertEqual(self.heap.trims, 2)
        self.assertEqual(self.stats.memory_trimmed_bytes, 40 * MiB + 28 * MiB)

    def test_a_small_growth_after_a_trim_is_left_alone(self):
        self.heap.free = 40 * MiB
        self.clock.advance(5)
        self.heap.free = 46 * MiB
        self.clock.advance(5)
        self.assertEqual(self.heap.trims, 1)

    def test_nothing_happens_once_stopped(self):
        self.reclaimer.stopService()
        self.heap.free = 40 * MiB
        self.clock.advance(50)
        self.assertEqual(self.heap.trims, 0)


def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class GlibcHeapTests(unittest.TestCase):
    """glibc's heap in this process (Debian's C library is glibc)."""

    def test_free_heap_is_given_back_to_the_system(self):
        heap = memory.glibc_heap()
        self.assertIsNotNone(heap, "no glibc mallinfo2/malloc_trim here")
        # 64 MB in blocks too large for Python's small-object allocator and
        # too small for mappings of their own: glibc's heap. Every other one
        # stays alive, so the heap cannot shrink from its top by itself.
        blocks = [bytes(60_000) for _ in range(1200)]
        keep = blocks[1::2]
        before_free = heap.free_bytes()
        del blocks
        freed = heap.free_bytes() - before_free
        self.assertGreater(freed, 30 * MiB)
        held = rss()
        reclaimer = memory.MemoryReclaimer(heap, Clock(), threshold=8 * MiB)
        self.assertGreater(reclaimer.check(), 30 * MiB)
        self.assertLess(rss(), held - 16 * MiB)
        self.assertEqual(reclaimer.check(), 0)
        del keep


class OptionTests(unittest.TestCase):
    def test_trim_interval_defaults_to_five_seconds_and_zero_turns_it_off(self):
        options = Options()
        options.parseOptions([])
        self.assertEqual(options["trim-interval"], 5.0)
        options = Options()
        options.parseOptions(["--trim-interval", "0"])
        self.assertEqual(options["trim-interval"], 0.0)

    def test_a_negative_trim_interval_is_refused(self):
        with self.assertRaises(usage.UsageError):
            Options().parseOptions(["--trim-interval", "-1"])

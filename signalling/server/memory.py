"""
Memory that comes back: after a peak (a burst of connections, a large room
that emptied), glibc's allocator keeps the freed memory in the process, in
its heap and arenas, for reuse. ``malloc_trim`` hands it back to the system;
the service calls it every few seconds (it costs little when there is
nothing to give back).
"""

import ctypes
import ctypes.util

#: Seconds between two calls of malloc_trim.
TRIM_INTERVAL = 5.0


def malloc_trim():
    """
    :returns: a function that gives freed heap memory back to the system
        and returns whether it gave any, or None where the C library has no
        ``malloc_trim`` (not glibc).
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int

    def trim():
        return bool(function(0))

    return trim

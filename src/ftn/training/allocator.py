"""glibc's malloc told to keep freed memory in the process while it trains.

By default glibc returns large freed blocks to the OS (``mmap``/``munmap`` above a threshold,
and trimming the top of the heap), so every training step maps its activation buffers afresh and
page-faults on their first touch: a MobileNetV2 64-px demo run took 103 million minor page faults
and 218 s of system time in 13 minutes. Raising the two thresholds keeps freed blocks for reuse
(the process's resident memory then stays at its peak, which a training process reaches anyway).
The same as ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=...``
(docs/performance.md), set from inside the process with ``mallopt``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the thresholds once per process; True where they took effect (glibc on Linux),
    False elsewhere (macOS, Windows, musl), where nothing changes."""
    global _done
    if _done is None:
        _done = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _done = (mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
                     and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1)
    return _done

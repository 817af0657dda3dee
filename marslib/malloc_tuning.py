"""glibc malloc settings for a daemon that moves megabyte buffers all day.

By default glibc serves allocations over 128 KiB with mmap and returns them on free, so
every 1 MiB write re-faults its pages; raising the thresholds keeps such buffers in the
heap (measured: 1 MiB NBD writes 240-320 MiB/s by default, 0.8-1.1 GiB/s tuned).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

log = logging.getLogger(__name__)


def tune_malloc(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Apply the settings; return False where the C library has no mallopt (not glibc)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(M_TRIM_THRESHOLD, trim_threshold))
    if not ok:
        log.warning("mallopt refused the buffer settings; large writes will be slower")
    return ok

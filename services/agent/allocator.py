"""glibc tuning: memory freed after a big command output goes back to the system.

glibc serves a request over its mmap threshold (128 KiB) with its own mapping, returned on free, but it
raises the threshold to the size of each such block freed (up to 32 MiB). After the first command that
prints 1 MiB, later output buffers come from the heap instead, where freed holes stay resident: ten such
commands left the agent 4.6 MiB bigger (make bench). A fixed threshold turns that adjustment off: +0.8 MiB.
An operator's own ``MALLOC_MMAP_THRESHOLD_`` is left alone; on another C library this does nothing.
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 * 1024  # glibc's default, now fixed


def pin_mmap_threshold(environ: dict[str, str] | None = None) -> bool:
    """Fix glibc's mmap threshold at 128 KiB; return whether it was set."""
    if "MALLOC_MMAP_THRESHOLD_" in (os.environ if environ is None else environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))

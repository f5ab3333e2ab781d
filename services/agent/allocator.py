"""glibc tuning: memory freed after a big command output goes back to the system.

glibc serves a request over its mmap threshold (128 KiB at first) with its own mapping, returned on free,
but it raises the threshold to the size of each such block freed (up to 32 MiB). After the first command
that prints 1 MiB, later output buffers come from the heap instead, where freed holes stay resident: ten
such commands left the agent 4.6 MiB bigger (make bench). After a result that carried more than
`BIG_OUTPUT_BYTES`, the agent asks glibc to hand free heap pages back (``malloc_trim``, about a millisecond,
and only then), so the allocator of every other command is left as glibc tunes it. (Pinning the threshold
instead kept as little memory, 39.7 against 39.9 MiB after ten 1 MiB outputs, but also fixes glibc's trim
threshold for every small command.) On another C library this does nothing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

BIG_OUTPUT_BYTES = 256 * 1024


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_TRIM = _malloc_trim()


def release_after(output_bytes: int) -> bool:
    """After a result of `output_bytes`, give free heap memory back if it was big; whether it tried."""
    if output_bytes <= BIG_OUTPUT_BYTES or _TRIM is None:
        return False
    _TRIM(0)
    return True

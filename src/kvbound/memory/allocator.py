"""glibc's heap and the process that loads a model. Loading makes thousands of 1-10 MB temporaries (unpacked
nibbles, int32 copies for packing); once freed, glibc keeps their pages. `trim_heap` hands them back after every
load: malloc_trim is an action, not a setting. The mmap threshold is a process-wide setting, so only the process's
owner changes it: `load(tune_allocator=True)` (the CLI and cluster replicas pass it) mmaps temporaries above 256 KiB
while loading, then fixes the threshold at glibc's adaptive maximum, the value the estimator's heap model assumes.
Not glibc: nothing to do.

Measured with the default model, a 64 MiB turns+h2o chat of 8 short turns after `load()` (2-core x86-64, glibc
2.36): RSS after loading / after the turns 494 / 515 MiB with neither, 349 / 382 MiB with the trim alone, 349 / 381
MiB with the trim and the threshold.
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from typing import Any, Iterator

from kvbound.memory.estimate import GLIBC_MMAP_THRESHOLD_MAX

LOAD_MMAP_THRESHOLD = 256 << 10
M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)


def libc() -> Any | None:
    """glibc, or None on another C library."""
    try:
        lib = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None


@contextmanager
def loading_heap(enabled: bool) -> Iterator[None]:
    """Inside: temporaries above LOAD_MMAP_THRESHOLD are mmapped. After: the threshold is GLIBC_MMAP_THRESHOLD_MAX.
    With `enabled` False (or without glibc) it changes nothing."""
    lib = libc() if enabled else None
    if lib is None:
        yield
        return
    lib.mallopt(M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        lib.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (malloc_trim)."""
    lib = libc()
    if lib is not None:
        lib.malloc_trim(0)

"""glibc malloc settings for the process that loads a model. They are process-wide, so only the process's owner
turns them on: `load(tune_allocator=True)`, which the CLI and cluster replicas pass. Not glibc: nothing to tune.

Why: loading makes thousands of 1-10 MB temporaries (unpacked nibbles, int32 copies for packing). glibc's adaptive
mmap threshold moves them onto the heap after the first frees, where they fragment it. While loading they are
mmapped (returned on free); afterwards the threshold is fixed at glibc's adaptive maximum, the value the estimator's
heap model assumes for a running process, and the heap's free pages go back to the OS (glibc keeps them otherwise).
Measured with the default model, `kvbound converse --script examples/dev-200-turns.jsonl --kv-budget 64MiB --policy
turns+h2o --greedy --max-new-tokens 48 --json --turns 60` (2-core x86-64 CPU, glibc): RSS at turn 1 / turn 60 / peak
392 / 471 / 480 MiB with these settings, 537 / 597 / 597 MiB without them; the same replies.
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


def trim_heap(enabled: bool) -> None:
    """Hand the heap's free pages back to the OS (malloc_trim); with `enabled` False, nothing."""
    lib = libc() if enabled else None
    if lib is not None:
        lib.malloc_trim(0)

"""glibc heap settings for long batch runs: reuse memory instead of faulting it in again, stay flat.

By default glibc hands large blocks (the activations and attention maps of every batch, tens of MB)
back to the OS as soon as they are freed, and takes them again, page fault by page fault, for the
next batch: on a small CPU that costs a fifth of the forward pass. :func:`keep_heap_memory` makes
glibc keep them on the heap (blocks under 256 MB; the top of the heap is returned only beyond
512 MB), and :class:`PeriodicTrim` trims the heap explicitly every so many batches, so that resident
memory stays flat however many images a run streams. :func:`trim_heap` is also called before DataLoader
workers are forked: forked workers share the parent's heap pages copy-on-write, and every kept page
the model writes afterwards would fault and be copied, with a TLB flush on every core; free pages handed
back are not shared. Elsewhere than glibc all three do nothing. Measurements: docs/performance.md.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 << 20
TRIM_THRESHOLD_BYTES = 512 << 20


@lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """glibc, loaded on first use (``None`` elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist
        return libc
    except (OSError, AttributeError):  # not glibc
        return None


def keep_heap_memory() -> bool:
    """Keep freed blocks on the heap for reuse (process-wide; inherited by forked workers).
    Returns whether the setting took effect."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def trim_heap() -> None:
    """Hand the heap's free memory back to the OS now."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class PeriodicTrim:
    """Hands freed heap memory back to the OS on every ``every``-th call (glibc keeps per-thread arenas
    otherwise, and a long run's resident size creeps up with every large image the writer threads
    decoded or encoded); trimming more often costs page faults when the memory is used again."""

    def __init__(self, every: int = 16):
        self.every = every
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls % self.every == 0:
            trim_heap()

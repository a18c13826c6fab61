"""Keep freed CPU memory in the process (glibc), so big tensors stop costing page faults.

PyTorch's CPU allocator hands every tensor to glibc ``malloc``; glibc serves blocks above its mmap
threshold (at most 32 MiB, and activations of a 112 px `mbf` at batch 64 are 25-100 MiB each) with a
fresh ``mmap`` and gives them back with ``munmap`` on free. Every training step then touches
gigabytes of new pages: ~1 million minor page faults per fp32 `mbf` step at batch 64, each one a
kernel entry plus zeroing 4 KiB (and in a VM an exit to the host), which was a third to a half of
the step on the measured machines (docs/performance.md). ``mallopt(M_MMAP_MAX, 0)`` serves them from
the heap instead and ``M_TRIM_THRESHOLD`` keeps the heap from being returned, so after the first
steps a step reuses the same pages: zero faults, at the price of a resident size that stays at its
peak (~+30% for that run). The same effect as running under jemalloc/tcmalloc (``LD_PRELOAD``),
without needing either.

Process-wide and not undone by the garbage collector: the trainer calls `keep_freed_memory` once
when it trains on the CPU (``train.cpu_keep_memory``) and `restore_default` when ``fit`` returns;
embedding for evaluation and the inference benchmark use `kept_freed_memory` around their loops
(1.3-2x on CPU evaluation of `mbf`, docs/evaluation.md).
A no-op returning False where the C library is not glibc (macOS, Windows, musl).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from typing import Iterator, Optional

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
# Setting any of these turns glibc's dynamic mmap/trim thresholds off for good, so "restore" sets the
# values they converge to in a PyTorch process (the mmap threshold grows to the largest freed block,
# capped at 32 MiB; the trim threshold follows at twice that) and glibc's default mmap count.
RESTORED_MMAP_THRESHOLD = 32 * 1024 * 1024
RESTORED_TRIM_THRESHOLD = 2 * RESTORED_MMAP_THRESHOLD
DEFAULT_MMAP_MAX = 65536
_KEEP_TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt's int takes: never trim in practice

_libc: Optional[ctypes.CDLL] = None
_state = {"keeping": False}


def _glibc() -> Optional[ctypes.CDLL]:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.gnu_get_libc_version  # only glibc has it (and mallopt with these meanings)
            lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            lib.mallopt.restype = ctypes.c_int
            _libc = lib
        except (OSError, AttributeError):
            return None
    return _libc


def keep_freed_memory(enabled: bool = True) -> bool:
    """Serve big allocations from the heap and keep freed memory (``enabled``), or go back to glibc's
    usual behaviour (``enabled=False``: mmap for blocks over 32 MiB, trimming, the kept heap returned).
    Returns True when glibc accepted the settings."""
    libc = _glibc()
    if libc is None:
        return False
    if enabled:
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD) == 1
    else:
        ok = (libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX) == 1
              and libc.mallopt(M_MMAP_THRESHOLD, RESTORED_MMAP_THRESHOLD) == 1
              and libc.mallopt(M_TRIM_THRESHOLD, RESTORED_TRIM_THRESHOLD) == 1)
        libc.malloc_trim(0)  # give the kept heap back
    _state["keeping"] = bool(enabled and ok)
    return ok


def restore_default() -> bool:
    return keep_freed_memory(False)


def is_keeping() -> bool:
    return _state["keeping"]


@contextlib.contextmanager
def kept_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """`keep_freed_memory` for the duration of the block (yields whether it is on), then glibc's
    usual behaviour again; nested or inside a ``fit`` that already keeps memory, it changes nothing."""
    if not enabled or is_keeping():
        yield is_keeping()
        return
    kept = keep_freed_memory(True)
    try:
        yield kept
    finally:
        if kept:
            restore_default()

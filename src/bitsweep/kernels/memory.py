"""Huge pages for the arrays the kernels stream: packed codes, their scalars, a float16 LM head.

A GEMV reads every weight once per token, from memory. With 4 KiB pages that is a TLB miss every 4 KiB, and the
hardware prefetchers stop at each page boundary. Linux's transparent huge pages in their common ``madvise`` mode
back only memory advised ``MADV_HUGEPAGE`` with 2 MiB pages, and numpy advises only its own allocations of 4 MiB
and more, unaligned: numpy's 64 MB float32 baseline ran on huge pages while our packed matrices of a few MB mostly
did not. Measured on the Zen 4 host (TQ2_0 4096x4096 streamed from memory, one thread, interleaved in one
process): 0.34 ms on 4 KiB pages, 0.27 on huge pages; with L2 prefetches (simd.software_prefetch) 0.26 and 0.23.
The float16 head GEMV (49152 x 1024): 6.1 ms -> 4.9 ms, and 3.6 ms with L2 prefetches.

:class:`Arena` hands out arrays from 2 MiB-aligned anonymous mappings advised ``MADV_HUGEPAGE``, many arrays per
mapping, so that a model's small matrices share huge pages instead of each rounding up to its own. A mapping is
released when no array from it is left. ``BITSWEEP_HUGE_PAGES=0`` turns it off (plain numpy arrays); where the
platform has no ``MADV_HUGEPAGE`` it is off.
"""

from __future__ import annotations

import mmap
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bitsweep.errors import ConfigError

HUGE_PAGE = 2 << 20
BLOCK = 32 << 20  # bytes per mapping (address space; only pages written to are backed)
ALIGN = 64  # each array starts on a cache line
HUGE_PAGES_ENV = "BITSWEEP_HUGE_PAGES"


def huge_pages_wanted() -> bool:
    """``$BITSWEEP_HUGE_PAGES`` (0 / 1; default 1) and whether this platform can advise huge pages."""
    value = os.environ.get(HUGE_PAGES_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ConfigError(f"{HUGE_PAGES_ENV}={value!r}: 0 or 1")
    return value == "1" and hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE")


def transparent_huge_pages() -> str:
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``; empty where unknown)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""
    return next((word.strip("[]") for word in text.split() if word.startswith("[")), "")


class Arena:
    """Arrays carved out of page-aligned mappings, :data:`ALIGN`-aligned, in the order asked for. ``pages``:
    ``"huge"`` (mappings advised ``MADV_HUGEPAGE``, from a 2 MiB boundary), ``"small"`` (advised
    ``MADV_NOHUGEPAGE``: 4 KiB pages for sure, for comparisons) or ``"numpy"`` (plain numpy arrays, which numpy
    itself advises from 4 MiB); default: ``"huge"`` where :func:`huge_pages_wanted`, else ``"numpy"``."""

    def __init__(self, pages: str | None = None, block: int = BLOCK) -> None:
        if pages is None:
            pages = "huge" if huge_pages_wanted() else "numpy"
        if pages not in ("huge", "small", "numpy"):
            raise ValueError(f"pages={pages!r}: huge, small or numpy")
        self.pages, self.block = pages, block
        self._buffer: np.ndarray | None = None  # the current mapping's bytes, from a 2 MiB boundary
        self._used = 0

    @property
    def huge(self) -> bool:
        return self.pages == "huge"

    def empty(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self.pages == "numpy":
            return np.empty(shape, dtype)
        start = -(-self._used // ALIGN) * ALIGN
        if self._buffer is None or start + nbytes > self._buffer.size:
            self._buffer, start = self._map(max(self.block, -(-nbytes // HUGE_PAGE) * HUGE_PAGE)), 0
        self._used = start + nbytes
        return self._buffer[start : start + nbytes].view(dtype).reshape(shape)

    def copy(self, values: np.ndarray) -> np.ndarray:
        """A C-contiguous copy of ``values``."""
        out = self.empty(values.shape, values.dtype)
        out[...] = values
        return out

    def _map(self, size: int) -> np.ndarray:
        # a private anonymous mapping (a shared one would be shmem, which THP's madvise mode leaves alone), one huge
        # page longer than asked so that the bytes used can start on a 2 MiB boundary
        region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE if self.huge else mmap.MADV_NOHUGEPAGE)
        raw = np.frombuffer(region, np.uint8)  # keeps the mapping alive as long as any array from it
        skip = -raw.ctypes.data % HUGE_PAGE
        return raw[skip : skip + size]


_arena: Arena | None = None


def arena() -> Arena:
    """The process's arena (made on first use, reading ``$BITSWEEP_HUGE_PAGES`` then)."""
    global _arena
    if _arena is None:
        _arena = Arena()
    return _arena


@contextmanager
def using(other: Arena):
    """Within the block, :func:`arena` is ``other`` (a benchmark's copies on 4 KiB pages, say)."""
    global _arena
    previous, _arena = _arena, other
    try:
        yield other
    finally:
        _arena = previous


def copy(values: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``values`` in the process's arena."""
    return arena().copy(values)


def from_arena(values: np.ndarray) -> bool:
    """Whether ``values`` is memory of an :class:`Arena`'s mappings (a view of one; either kind of pages)."""
    base = values
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


def huge_page_bytes(values: np.ndarray) -> int:
    """Bytes of ``values``'s memory the kernel backs with huge pages (Linux: ``AnonHugePages`` of the mappings it
    lies in, from /proc/self/smaps; 0 where unknown). For tests and benchmarks."""
    first = values.ctypes.data
    last = first + max(values.nbytes, 1)
    total, inside = 0, False
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        head = line.split()[0] if line else ""
        if "-" in head and ":" not in head:
            lo, hi = (int(part, 16) for part in head.split("-"))
            inside = lo < last and first < hi
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total

"""Ultra-low-bit weight formats (BitNet-style ternary and binary, 2/3/4-bit affine) and numba kernels.

``formats`` is the NumPy reference and the byte layouts (TQ2_0/TQ1_0 bit-compatible with llama.cpp);
``fast`` holds the numba kernels under the same names. Importing this package sets up numba's CPU target
(see :func:`configure_numba`) before numba is imported, and makes numba's cache of its kernels stale whenever any
of its modules changes (:func:`cache_kernels_together`).
"""

from __future__ import annotations

import functools
import hashlib
import os


def configure_numba() -> None:
    """Let LLVM use 512-bit vectors on AVX-512 CPUs.

    LLVM's tuning for recent Intel cores prefers 256-bit vectors ("prefer-256-bit"); for these short integer
    loops the full width measured ~1.45x faster. Users can still set NUMBA_CPU_FEATURES themselves.
    """
    if "NUMBA_CPU_FEATURES" in os.environ:
        return
    try:
        from llvmlite import binding as llvm

        features = llvm.get_host_cpu_features().flatten()
    except Exception:  # pragma: no cover - llvmlite without host feature detection
        return
    if "+avx512f" in features:
        os.environ["NUMBA_CPU_FEATURES"] = features + ",-prefer-256-bit"


def kernel_sources_stamp(here: str | None = None) -> tuple:
    """The content hashes of this package's modules (of the ``.py`` files in ``here``): what every compiled kernel
    here is made of."""
    here = here or os.path.dirname(os.path.abspath(__file__))
    stamps = []
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            path = os.path.join(here, name)
            st = os.stat(path)
            stamps.append((name, _file_hash(path, st.st_mtime_ns, st.st_size)))
    return tuple(stamps)


@functools.cache
def _file_hash(path: str, mtime_ns: int, size: int) -> bytes:
    """sha256 of a file's bytes, hashed again only when its modification time or size changes."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).digest()


def cache_kernels_together() -> None:
    """Make numba's on-disk cache of a function in this package stale when any module of the package changes.

    numba keys a cached function by its own file's contents only, but fast.py's functions inline simd.py's kernels
    (and both read formats.py's and host.py's constants when they compile): after an edit of simd.py alone, numba
    would load fast.py's machine code built from the old kernels, and compute the old numbers. A locator placed in
    front of numba's own takes every function of this package's files, keeps the cache where numba's locator
    would put it, and adds :func:`kernel_sources_stamp` to its freshness stamp. Where numba's caching internals
    differ (``numba.core.caching.CacheImpl._locator_classes``), nothing changes.
    """
    try:
        from numba.core import caching

        locators = caching.CacheImpl._locator_classes
    except (ImportError, AttributeError):  # pragma: no cover - another numba
        return
    if any(getattr(cls, "bitsweep_kernels", False) for cls in locators):
        return
    here = os.path.dirname(os.path.abspath(__file__))

    class KernelsLocator(caching._CacheLocator):
        bitsweep_kernels = True

        def __init__(self, inner):
            self._inner = inner

        def ensure_cache_path(self):
            return self._inner.ensure_cache_path()

        def get_cache_path(self):
            return self._inner.get_cache_path()

        def get_source_stamp(self):
            return self._inner.get_source_stamp(), kernel_sources_stamp()

        def get_disambiguator(self):
            return self._inner.get_disambiguator()

        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.dirname(os.path.abspath(py_file)) != here:
                return None
            for other in locators:
                if other is not cls and (inner := other.from_function(py_func, py_file)) is not None:
                    return cls(inner)
            return None

    locators.insert(0, KernelsLocator)


configure_numba()
cache_kernels_together()

from bitsweep.kernels.formats import FORMATS, Format, PackedMatrix, get_format  # noqa: E402

__all__ = ["FORMATS", "Format", "PackedMatrix", "get_format"]

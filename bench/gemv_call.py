"""Where a streamed GEMV's time goes: the kernel's loop or the call around it; prints one JSON document.

    .venv/bin/python bench/gemv_call.py

A TQ2_0 (absmean) 4096x4096 GEMV on one thread, its weights streamed from memory (each candidate its own copies,
as in bench/kernels.py), timed interleaved with numpy's fp32 ``W @ x`` in one loop:

- ``gemm_prepared``: the library's call (``fast.gemm_prepared``: plan lookup, activation planes, kernel) right after
  a 64 MiB streaming read, as bench/kernels.py times its ``isolated_*`` lead call;
- ``gemm_prepared_again``: the same call on the next copy, right after the first, as a model's layers call it (and
  bench/kernels.py times its runs);
- ``loop`` and ``loop_again``: the same kernel's loop (``simd.gemv_rows_serial``) called from one compiled function
  with the planes made beforehand, once (numba's dispatcher finds its state evicted by the streams since its last
  call, as ``gemm_prepared`` does) and right after itself.

Each is reported as time and fraction of the read bandwidth: the best streaming read in the same loop (numpy's fp32
``W @ x`` or ``read_probe``, bench/kernels.py's numba int64 sum over 64 MiB or more). Then the cost of
a call on a tiny matrix (16 x 256) right after numpy has streamed 64 MB past, beside numpy's own ``sum`` of a 16 KB
array in the same state: what any call costs when the caches are cold.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# isort: off
# first: sets up bitsweep and numba
from kernels import _read_sum, host_info, llc_bytes, probe_buffers, read_bandwidth, replicate
import numba
import numpy as np
from threadpoolctl import threadpool_limits

from bitsweep.kernels import fast, memory, simd
from bitsweep.kernels.formats import prepare_activations, quantize
# isort: on


# Not cached: numba would key the cache on this file alone and keep serving the loop of an older simd.py
@numba.njit
def _loop(kern, qs, a, c, planes, xsum, xscale, out):
    simd.gemv_rows_serial(kern, qs, a, c, planes, xsum, xscale, out)


def _best_of(fn, repeats: int, flush=None) -> list[float]:
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    numba.set_num_threads(1)
    repeats, llc = 30, llc_bytes()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4096, 4096)).astype(np.float32)
    x = rng.standard_normal((1, 4096)).astype(np.float32)
    pm = quantize(w, "tq2_0", scale="absmean")
    acts = prepare_activations(x, pm.k_padded, pm.group)
    expected = fast.gemm_prepared(pm, acts)
    n = max(2, -(-2 * llc // pm.nbytes))
    arena = memory.arena()
    calls = replicate(pm, n, arena)
    qs, index = fast._kernel_rows(pm, True)
    a, c = fast._row_scalars(pm)
    kern, planes = fast._kern(pm), simd.gather_planes8(np.ascontiguousarray(acts.x, np.int16), index)
    xsum, xscale = np.ascontiguousarray(acts.xsum[0]), np.float32(acts.scale[0, 0])
    out = np.empty((1, pm.n_rows), np.float32)
    loops = {name: [arena.copy(qs) for _ in range(n)] for name in ("loop", "loop_again")}
    _loop(kern, qs, a, c, planes, xsum, xscale, out[0])
    assert np.array_equal(out, expected)
    weights = [w] + [w.copy() for _ in range(max(1, -(-2 * llc // w.nbytes)) - 1)]
    probe = probe_buffers(llc)
    cands = {
        "numpy_fp32": lambda i: weights[i % len(weights)] @ x[0],
        "read_probe": lambda i: _read_sum(probe[i % 2]),
        "gemm_prepared": lambda i: fast.gemm_prepared(calls[2 * i % n], acts),
        "gemm_prepared_again": lambda i: fast.gemm_prepared(calls[(2 * i + 1) % n], acts),
        **{name: (lambda i, q=q: _loop(kern, q[i % n], a, c, planes, xsum, xscale, out[0])) for name, q in loops.items()},
    }  # fmt: skip
    times = {name: [] for name in cands}
    with threadpool_limits(1):
        for fn in cands.values():
            for i in range(n):
                fn(i)
        for r in range(repeats):
            for name, fn in cands.items():
                t = time.perf_counter()
                fn(r)
                times[name].append(time.perf_counter() - t)
        probes_1gib = max(read_bandwidth(1, min(3 * 2**30, max(4 * llc, 2**30)), 5).values())
        tiny = quantize(rng.standard_normal((16, 256)).astype(np.float32), "tq2_0", scale="absmean")
        tiny_acts = prepare_activations(x[:, :256], tiny.k_padded, tiny.group)
        fast.gemm_prepared(tiny, tiny_acts)
        small = np.ones(4096, np.float32)

        def flush():
            weights[0] @ x[0]

        cold = {"gemm_prepared_16x256": _best_of(lambda: fast.gemm_prepared(tiny, tiny_acts), repeats, flush),
                "numpy_sum_16kb": _best_of(lambda: small.sum(), repeats, flush)}  # fmt: skip
    base = min(times["numpy_fp32"])
    nbytes = {name: pm.nbytes for name in cands} | {"numpy_fp32": w.nbytes, "read_probe": probe[0].nbytes}
    bandwidth = max(nbytes[name] / min(times[name]) for name in ("numpy_fp32", "read_probe"))
    report = {
        "host": host_info(),
        "case": {"format": "tq2_0", "scale": "absmean", "shape": [4096, 4096], "threads": 1, "repeats": repeats,
                 "copies": n, "weight_bytes": pm.nbytes},
        "read_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "read_bandwidth_gb_s_1gib_probes": round(probes_1gib / 1e9, 2),
        "candidates": {name: {"best_ms": round(min(v) * 1e3, 4), "median_ms": round(float(np.median(v)) * 1e3, 4),
                              "speedup_vs_numpy_fp32": round(base / min(v), 3),
                              "roofline": round(nbytes[name] / min(v) / bandwidth, 3)} for name, v in times.items()},
        "cold_call_us": {name: {"best": round(min(v) * 1e6, 1), "median": round(float(np.median(v)) * 1e6, 1)}
                         for name, v in cold.items()},
    }  # fmt: skip
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

"""Benchmark of the packed low-bit kernels (bitsweep.kernels.fast); prints one JSON document.

    .venv/bin/python bench/kernels.py                  # full run (several minutes)
    .venv/bin/python bench/kernels.py --quick          # fewer shapes and repeats, for a smoke check

Method: every candidate of one (shape, batch, threads) cell is timed in the same loop, interleaved, best of
``--repeats``; each repeat reads a different copy of the weights, with enough copies that their total exceeds
twice the last-level cache, so every call streams its weights from memory as in a real forward pass. Results are
ratios measured in this one run (``speedup_vs_numpy_fp32``: numpy's ``W @ x`` time over the kernel's) plus the
fraction of the measured read bandwidth each kernel reaches (``roofline``: packed bytes / time / bandwidth).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# isort: off
import bitsweep.kernels  # noqa: F401  (sets numba's CPU target, so it must come before numba)
import numba
import numpy as np
from threadpoolctl import threadpool_limits

from bitsweep.kernels import fast
from bitsweep.kernels.formats import PackedMatrix, prepare_activations, quantize
# isort: on

FORMATS = ["tq2_0", "tq1_0", "binary", "int2", "int3", "int4"]


def llc_bytes() -> int:
    sizes = []
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        text = (idx / "size").read_text().strip()
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=32 * 2**20)


@numba.njit(parallel=True, cache=True)
def _read_sum(a):
    s = np.int64(0)
    for i in numba.prange(a.shape[0]):
        s += a[i]
    return s


def read_bandwidth(threads: int, size: int, repeats: int) -> float:
    """Bytes per second of a streaming read of ``size`` bytes (int64 sum), best of ``repeats``."""
    numba.set_num_threads(threads)
    a = np.ones(size // 8, np.int64)
    _read_sum(a)
    best = min(_timed(lambda: _read_sum(a)) for _ in range(repeats))
    return a.nbytes / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def copies_for(nbytes: int, llc: int, cap: int) -> int:
    return max(2, min(cap // max(nbytes, 1), -(-2 * llc // max(nbytes, 1))))


def spread(array: np.ndarray, llc: int, cap: int) -> list[np.ndarray]:
    """The array and enough copies at distinct addresses to exceed twice the last-level cache."""
    return [array] + [array.copy() for _ in range(copies_for(array.nbytes, llc, cap) - 1)]


def replicate(pm: PackedMatrix, n: int) -> list[PackedMatrix]:
    """``n`` copies at distinct addresses, their kernel scalars converted up front (outside the timing)."""
    copies = [PackedMatrix(pm.fmt, pm.group, pm.k, pm.qs.copy(), pm.d.copy(), None if pm.m is None else pm.m.copy())
              for _ in range(n)]  # fmt: skip
    for copy in copies:
        fast.gemm_prepared(copy, prepare_activations(np.zeros((1, pm.k), np.float32), pm.k_padded, pm.group))
    return copies


def bench_cell(k, batch, threads, weights, args, bandwidth):
    """Time every candidate for one (shape, batch, threads) cell, interleaved."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    numba.set_num_threads(threads)
    cands = {}
    w32 = weights["fp32"]
    cands["numpy_fp32"] = (lambda i: w32[i % len(w32)] @ x.T, w32[0].nbytes)
    int8w, int8s = weights["int8"]
    xq = prepare_activations(x, k, k)  # one group over the whole row: the unpacked kernel's activations
    if batch == 1:
        cands["int8_unpacked"] = (
            lambda i: fast.gemv_int8_unpacked(int8w[i % len(int8w)], int8s, xq.x[0], xq.scale[0, 0]),
            int8w[0].nbytes,
        )
    for name in args.formats:
        copies = weights[name]
        acts = prepare_activations(x, copies[0].k_padded, copies[0].group)
        cands[name] = (lambda i, c=copies, a=acts: fast.gemm_prepared(c[i % len(c)], a), copies[0].nbytes)
        if args.fp32_act and batch == 1:
            acts32 = prepare_activations(x, copies[0].k_padded, copies[0].group, "fp32")
            cands[f"{name}_fp32act"] = (
                lambda i, c=copies, a=acts32: fast.gemm_prepared(c[i % len(c)], a),
                copies[0].nbytes,
            )
    times = {name: [] for name in cands}
    with threadpool_limits(threads):
        for fn, _ in cands.values():  # warm-up: compile and touch
            fn(0)
        for r in range(args.repeats):
            for name, (fn, _) in cands.items():
                times[name].append(_timed(lambda fn=fn, r=r: fn(r + 1)))
    base = min(times["numpy_fp32"])
    cell = {}
    for name, (_, nbytes) in cands.items():
        best = min(times[name])
        cell[name] = {
            "best_ms": round(best * 1e3, 4),
            "median_ms": round(float(np.median(times[name])) * 1e3, 4),
            "speedup_vs_numpy_fp32": round(base / best, 3),
            "weight_bytes": nbytes,
            "roofline": round(nbytes / best / bandwidth[threads], 3),
        }
    return cell


def bench_model(model_dir: Path, repeats: int, threads: int) -> dict:
    """End to end on a real model: greedy generation with the ternary packed model (BitNet absmean, int8
    activations, our kernels) against the same model in torch fp32, interleaved, best of ``repeats``."""
    import tempfile

    from bitsweep.backends import QuantizeRequest, backend_info, get_quantizer
    from bitsweep.backends.bitnet.runner import Runner as BitnetRunner
    from bitsweep.backends.torch_ref import TorchRunner
    from bitsweep.config import SchemeConfig

    scheme = SchemeConfig("bitnet", "tq2_0", 2, {"format": "tq2_0", "scale": "absmean", "act": "int8"})
    settings = backend_info("bitnet").parse_settings({})
    with tempfile.TemporaryDirectory() as tmp:
        request = QuantizeRequest(model_dir, scheme, settings, Path(tmp) / "tq2_0", threads=threads)
        artifact = get_quantizer("bitnet").quantize(request)
        runners = {
            "torch_fp32": TorchRunner(model_dir, threads),
            "bitnet_tq2_0": BitnetRunner(artifact.path, threads, 512),
        }
        prompt = np.arange(100, 164)
        n_new = 32
        for runner in runners.values():
            runner.generate(prompt, 4)  # warm-up (compiles the kernels for these shapes)
        times = {name: {"prompt": [], "gen": []} for name in runners}
        for _ in range(repeats):
            for name, runner in runners.items():
                prompt_s, gen_s = runner.generate(prompt, n_new)
                times[name]["prompt"].append(prompt_s)
                times[name]["gen"].append(gen_s)
        size = {"torch_fp32": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
                "bitnet_tq2_0": artifact.model_file.stat().st_size}  # fmt: skip
    out = {}
    for name, t in times.items():
        out[name] = {"tg_tok_s": round(n_new / min(t["gen"]), 2), "pp_tok_s": round(len(prompt) / min(t["prompt"]), 1),
                     "model_bytes": size[name]}  # fmt: skip
    out["tg_speedup"] = round(out["bitnet_tq2_0"]["tg_tok_s"] / out["torch_fp32"]["tg_tok_s"], 3)
    out["pp_speedup"] = round(out["bitnet_tq2_0"]["pp_tok_s"] / out["torch_fp32"]["pp_tok_s"], 3)
    out["threads"] = threads
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one shape, 5 repeats")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--formats", nargs="+", default=FORMATS)
    parser.add_argument("--fp32-act", action="store_true", help="also time the fp32-activation path (GEMV)")
    parser.add_argument("--mem-cap-gb", type=float, default=3.0, help="memory for weight copies per format")
    parser.add_argument("--model-dir", type=Path, help="an HF model folder: also time end-to-end generation")
    parser.add_argument("--model-only", action="store_true", help="only the end-to-end part")
    args = parser.parse_args()
    shapes = [(4096, 4096), (11008, 4096)]
    batches = [1, 8, 32]
    if args.quick:
        shapes, batches, args.repeats = [(4096, 4096)], [1, 8], 5
    all_threads = numba.config.NUMBA_NUM_THREADS
    thread_counts = sorted({1, all_threads})
    llc = llc_bytes()
    cap = int(args.mem_cap_gb * 2**30)
    bw_size = min(cap, max(4 * llc, 2**30))
    bandwidth = {t: read_bandwidth(t, bw_size, 5) for t in thread_counts}
    report = {
        "host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "llc_bytes": llc,
                 "numba": numba.__version__, "numpy": np.__version__,
                 "numba_cpu_features_no_prefer256": "-prefer-256-bit" in os.environ.get("NUMBA_CPU_FEATURES", "")},
        "method": {"repeats": args.repeats, "statistic": "best", "interleaved": True,
                   "weights_streamed_from_memory": True},
        "read_bandwidth_gb_s": {str(t): round(b / 1e9, 2) for t, b in bandwidth.items()},
        "cells": [],
    }  # fmt: skip
    if args.model_dir:
        report["end_to_end"] = {
            str(t): bench_model(args.model_dir, max(3, args.repeats // 4), t) for t in thread_counts
        }
    if args.model_only:
        shapes = []
    rng = np.random.default_rng(0)
    for n_rows, k in shapes:
        w = rng.standard_normal((n_rows, k)).astype(np.float32)
        weights = {"fp32": spread(w, llc, cap)}
        scale = np.abs(w).max(axis=1) / 127
        w8 = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
        weights["int8"] = (spread(w8, llc, cap), scale.astype(np.float32))
        for name in args.formats:
            pm = quantize(w, name, scale="absmean" if name in ("tq1_0", "tq2_0", "binary") else "absmax")
            weights[name] = replicate(pm, copies_for(pm.nbytes, llc, cap))
        for batch in batches:
            for threads in thread_counts:
                cell = bench_cell(k, batch, threads, weights, args, bandwidth)
                report["cells"].append(
                    {"shape": [n_rows, k], "batch": batch, "threads": threads, "results": cell}
                )
                print(f"# {n_rows}x{k} batch {batch} threads {threads}: "
                      + ", ".join(f"{n} {v['speedup_vs_numpy_fp32']}x" for n, v in cell.items()),
                      file=sys.stderr)  # fmt: skip
        del weights
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

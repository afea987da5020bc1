"""Benchmark of the packed low-bit kernels (bitsweep.kernels.fast); prints one JSON document.

    .venv/bin/python bench/kernels.py                  # full run (several minutes)
    .venv/bin/python bench/kernels.py --quick          # one shape, batches 1 and 8, 10 repeats

Method: every candidate of one (shape, batch, threads) cell is timed in the same loop, interleaved, ``--repeats``
runs each; each call reads a different copy of the weights, with enough copies that their total exceeds twice the
last-level cache, so every call streams its weights from memory as in a real forward pass. A run is what a model's
layers do: one lead call, then ``RUN`` calls of the same candidate on the next copies, each timed (best of them
all). The lead call is timed apart (``isolated_best_ms``, ``isolated_roofline``): it follows the other candidates'
streams (numpy's 64 MB), which evict from every cache the Python, numba and ctypes state any call reads, costing
a call 25-80 us on the Zen 4 host (ours and ggml's alike) that a model's calls, each right after another, do not
pay. Results are ratios measured in this one run (``speedup_vs_numpy_fp32``: numpy's ``W @ x`` time over the
kernel's) plus the fraction of the measured read bandwidth each kernel reaches (``roofline``: packed bytes /
time / bandwidth).
At batch 1, ``llamacpp_tq2_0`` is llama.cpp's own TQ2_0 product (ggml's ``mul_mat``, ``bench/ggml_peer.py``) on the
same codes and scales, as many copies, in the same loop; ``--no-llamacpp`` leaves it out. Weights lie where a
model's do (bitsweep.kernels.memory: huge pages unless ``BITSWEEP_HUGE_PAGES=0``), ggml's copies too;
``tq2_0_4k_pages`` is our TQ2_0 on 4 KiB pages in the same loop.
The bandwidth a cell's fractions are of is measured in the cell's own loop, as two more candidates: ``read_probe``
(a numba int64 sum over 64 MiB, at least twice the last-level cache) and numpy's own fp32 ``W @ x`` (what the
kernels race against), the better of the two (``read_bandwidth_gb_s`` of the cell); on the VMs measured the
bandwidth moved by a third within minutes, so a probe taken before the loop is no measure of it. Those probes
(best of three streaming reads over 1 GiB or more: the numba sum, numpy's float32 ``sum``, numpy's ``W @ x``) are
recorded too (``read_bandwidth_probes_gb_s``).

``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` (set on some machines for old OpenBLAS builds) slow numpy's BLAS: this
script unsets both before numpy loads, so the baseline is at its best, and records that it did (never do this in
tests). The JSON records the CPU model, SIMD flags, cache sizes, library versions and the kernels' instruction
set (``--isa`` or ``$BITSWEEP_KERNEL_ISA``), and ``targets``: the issue's ratios, measured now, against their goals.
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

# Before numpy (and its OpenBLAS) loads: these slow the fp32 baseline down.
OPENBLAS_UNSET = {name: os.environ.pop(name, None) for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}

# isort: off
import bitsweep.kernels  # noqa: F401, E402  (sets numba's CPU target, so it must come before numba)
import numba  # noqa: E402
import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from bitsweep.kernels import fast, memory, simd  # noqa: E402
from ggml_peer import GgmlTq2Gemv  # noqa: E402
from bitsweep.kernels.formats import PackedMatrix, prepare_activations, quantize, uniform_row_scales  # noqa: E402
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


def read_bandwidth(threads: int, size: int, repeats: int) -> dict[str, float]:
    """Bytes per second of streaming reads of ``size`` bytes, best of ``repeats`` each: a numba int64 sum,
    numpy's float32 sum and numpy's fp32 ``W @ x`` (BLAS sgemv, 4096 wide rows)."""
    numba.set_num_threads(threads)
    a = np.ones(size // 8, np.int64)
    w = np.ones((size // 4 // 4096, 4096), np.float32)
    x = np.ones(4096, np.float32)
    probes = {"numba_int64_sum": lambda: _read_sum(a), "numpy_f32_sum": lambda: w.sum(dtype=np.float32),
              "numpy_f32_gemv": lambda: w @ x}  # fmt: skip
    out = {}
    with threadpool_limits(threads):
        for name, fn in probes.items():
            fn()
            out[name] = a.nbytes / min(_timed(fn) for _ in range(repeats))
    return out


def probe_buffers(llc: int) -> list[np.ndarray]:
    """The in-loop bandwidth probe's buffers (``read_probe``, read with :func:`_read_sum`): two of twice the
    last-level cache, at least 64 MiB, on the weights' kind of pages."""
    return [memory.arena().copy(np.ones(max(2 * llc, 2**26) // 8, np.int64)) for _ in range(2)]


def host_info() -> dict:
    """CPU model (/proc/cpuinfo "model name"), SIMD flags, cache sizes, library versions, kernel ISA."""
    import llvmlite

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())  # fmt: skip
    caches = {}
    for idx in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        kind = (idx / "type").read_text().strip()
        name = f"L{(idx / 'level').read_text().strip()}{'d' if kind == 'Data' else 'i' if kind == 'Instruction' else ''}"
        caches[name] = (idx / "size").read_text().strip()
    from threadpoolctl import threadpool_info

    blas = [{k: v for k, v in lib.items() if k in ("internal_api", "version", "architecture", "num_threads")}
            for lib in threadpool_info() if lib.get("user_api") == "blas"]  # fmt: skip
    return {
        "cpu_model": model, "cores": os.cpu_count(), "machine": platform.machine(),
        "simd_flags": sorted(simd.cpu_flags() & set(simd.SIMD_FLAGS)), "caches": caches, "llc_bytes": llc_bytes(),
        "numba": numba.__version__, "llvmlite": llvmlite.__version__, "llvm": ".".join(map(str, llvm_version())),
        "llama_cpp_python": _llama_cpp_version(),
        "numpy": np.__version__, "python": platform.python_version(), "blas": blas,
        "kernel_isa": fast.current_isa(), "available_isas": simd.available_isas(),
        "gemv_prefetch_bytes_level": list(simd.software_prefetch()),
        "transparent_huge_pages": memory.transparent_huge_pages(), "weights_on_huge_pages": memory.arena().huge,
        "numba_cpu_features_no_prefer256": "-prefer-256-bit" in os.environ.get("NUMBA_CPU_FEATURES", ""),
        "openblas_env_unset_by_bench": {k: v for k, v in OPENBLAS_UNSET.items() if v is not None},
    }  # fmt: skip


def _llama_cpp_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return None


def llvm_version() -> tuple[int, ...]:
    from llvmlite import binding

    return binding.llvm_version_info


# (format, batch, threads, what it is compared with, goal): the targets for 4096x4096 (batch 32: full
# runs only, --quick times batches 1 and 8)
TARGETS = [
    ("tq2_0", 1, 1, "numpy_fp32", 11.0), ("tq2_0", 1, 2, "numpy_fp32", 10.0), ("tq2_0", 1, 1, "roofline", 0.75),
    ("tq1_0", 1, 1, "numpy_fp32", 10.0), ("binary", 1, 1, "numpy_fp32", 15.0), ("int4", 1, 1, "numpy_fp32", 6.0),
    ("tq2_0", 8, 1, "numpy_fp32", 5.0), ("tq1_0", 8, 1, "numpy_fp32", 5.0), ("int4", 8, 1, "numpy_fp32", 5.0),
    ("tq2_0", 32, 1, "numpy_fp32", 2.0), ("tq1_0", 32, 1, "numpy_fp32", 2.0), ("int4", 32, 1, "numpy_fp32", 2.0),
    ("tq2_0", 1, 1, "llamacpp_tq2_0", 0.9), ("tq2_0", 1, 2, "llamacpp_tq2_0", 0.9),
]  # fmt: skip


def target_rows(cells: list[dict], threads_available: list[int]) -> list[dict]:
    rows = []
    for fmt, batch, threads, against, goal in TARGETS:
        if threads not in threads_available:
            continue
        cell = next((c for c in cells if c["shape"] == [4096, 4096] and c["batch"] == batch
                     and c["threads"] == threads and fmt in c["results"]), None)  # fmt: skip
        if cell is None or (against == "llamacpp_tq2_0" and against not in cell["results"]):
            continue
        res = cell["results"][fmt]
        if against == "llamacpp_tq2_0":  # llama.cpp's time over ours: above 1, ours is faster
            now, what = (
                round(cell["results"][against]["best_ms"] / res["best_ms"], 3),
                "x llama.cpp TQ2_0 (ggml)",
            )
        elif against == "roofline":
            now, what = res["roofline"], "fraction of read bandwidth"
        else:
            now, what = res["speedup_vs_numpy_fp32"], "x numpy fp32"
        row = {"format": fmt, "batch": batch, "threads": threads, "measure": what, "now": now, "goal": goal,
               "met": bool(now >= goal)}  # fmt: skip
        if against == "numpy_fp32" and "speedup_vs_numpy_fp32_cpu_time" in res:
            row["now_cpu_time"] = res[
                "speedup_vs_numpy_fp32_cpu_time"
            ]  # the same ratio in CPU time (contention)
        rows.append(row)
    return rows


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def copies_for(nbytes: int, llc: int, cap: int) -> int:
    return max(2, min(cap // max(nbytes, 1), -(-2 * llc // max(nbytes, 1))))


def spread(array: np.ndarray, llc: int, cap: int) -> list[np.ndarray]:
    """The array and enough copies at distinct addresses to exceed twice the last-level cache."""
    return [array] + [array.copy() for _ in range(copies_for(array.nbytes, llc, cap) - 1)]


def replicate(pm: PackedMatrix, n: int, arena: memory.Arena) -> list[PackedMatrix]:
    """``n`` copies at distinct addresses in ``arena`` (huge pages, as a model's weights, or not), their kernel
    scalars converted up front (outside the timing; each cell's warm-up makes their plans for its thread count and
    batch)."""
    copies = [PackedMatrix(pm.fmt, pm.group, pm.k, arena.copy(pm.qs), arena.copy(pm.d),
                           None if pm.m is None else arena.copy(pm.m)) for _ in range(n)]  # fmt: skip
    zeros = prepare_activations(np.zeros((1, pm.k), np.float32), pm.k_padded, pm.group)
    with memory.using(arena):  # the kernels' own copies (byte order, scalars) in the same kind of memory
        for copy in copies:
            fast.gemm_prepared(copy, zeros)
    return copies


def per_group_spans(pm: PackedMatrix, acts) -> np.ndarray:
    previous = fast.set_group_batches(False)
    try:
        return fast.gemm_prepared(pm, acts)
    finally:
        fast.set_group_batches(previous)


def cell_weights(
    w: np.ndarray, formats: list[str], llc: int, cap: int, probe: list[np.ndarray], llamacpp: bool = True
) -> dict:
    """Every candidate's copies of the float weights ``w`` for :func:`bench_cell`: fp32 and int8 as numpy arrays,
    each packed format quantized and replicated in the arena (TQ2_0 also on 4 KiB pages and, with ``llamacpp``,
    as ggml's TQ2_0), enough copies of each to exceed twice ``llc`` within ``cap`` bytes, and the in-loop bandwidth
    probe's buffers (:func:`probe_buffers`)."""
    weights = {"fp32": spread(w, llc, cap), "read_probe": probe}
    scale = np.abs(w).max(axis=1) / 127
    w8 = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    weights["int8"] = (spread(w8, llc, cap), scale.astype(np.float32))
    for name in formats:
        pm = quantize(w, name, scale="absmean" if name in ("tq1_0", "tq2_0", "binary") else "absmax")
        weights[name] = replicate(pm, copies_for(pm.nbytes, llc, cap), memory.arena())
        if name == "tq2_0" and memory.arena().huge:
            # the same kernel on 4 KiB pages, in the same loop (bitsweep.kernels.memory)
            weights[f"{name}_4k_pages"] = replicate(pm, len(weights[name]), memory.Arena("small"))
        if name == "tq2_0" and llamacpp:
            # llama.cpp's TQ2_0 product on the same codes and scales, as many copies as ours, in the same kind of
            # memory as ours
            weights["llamacpp_tq2_0"] = GgmlTq2Gemv(pm.qs, pm.d, len(weights[name]), 1, memory.arena())
    return weights


# Calls timed per run of one candidate, after the run's lead call (timed apart: see the module's docstring).
RUN = 3


def bench_cell(k, batch, threads, weights, args):
    """Time every candidate for one (shape, batch, threads) cell, interleaved run by run: each run one lead call
    (``isolated_*``) and :data:`RUN` timed calls, each on the next copy of the weights."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    numba.set_num_threads(threads)
    cands = {}
    w32 = weights["fp32"]
    cands["numpy_fp32"] = (lambda i: w32[i % len(w32)] @ x.T, w32[0].nbytes)
    probe = weights["read_probe"]
    cands["read_probe"] = (lambda i: _read_sum(probe[i % len(probe)]), probe[0].nbytes)
    int8w, int8s = weights["int8"]
    xq = prepare_activations(x, k, k)  # one group over the whole row: the unpacked kernel's activations
    if batch == 1:
        cands["int8_unpacked"] = (
            lambda i: fast.gemv_int8_unpacked(int8w[i % len(int8w)], int8s, xq.x[0], xq.scale[0, 0]),
            int8w[0].nbytes,
        )
    peer = weights.get("llamacpp_tq2_0")
    if peer is not None and batch == 1:  # ggml quantizes x to Q8_K inside the product, as llama.cpp per token
        peer.use_threads(threads)
        peer.set_input(x[0])
        cands["llamacpp_tq2_0"] = (peer, peer.nbytes)
    for name in [*args.formats, *(f"{f}_4k_pages" for f in args.formats if f"{f}_4k_pages" in weights)]:
        copies = weights[name]
        acts = prepare_activations(x, copies[0].k_padded, copies[0].group)
        cands[name] = (lambda i, c=copies, a=acts: fast.gemm_prepared(c[i % len(c)], a), copies[0].nbytes)
        if (
            name in args.formats
            and fast.groups_batched(copies[0])
            and not uniform_row_scales(copies[0], acts)
        ):
            # the same kernel summing one span per group (the path before batching), in the same loop
            cands[f"{name}_group_spans"] = (
                lambda i, c=copies, a=acts: per_group_spans(c[i % len(c)], a),
                copies[0].nbytes,
            )
        if args.fp32_act and batch == 1 and name in args.formats:
            acts32 = prepare_activations(x, copies[0].k_padded, copies[0].group, "fp32")
            cands[f"{name}_fp32act"] = (
                lambda i, c=copies, a=acts32: fast.gemm_prepared(c[i % len(c)], a),
                copies[0].nbytes,
            )
    times = {name: [] for name in cands}
    isolated = {name: [] for name in cands}
    cpu = {
        name: [] for name in cands
    }  # one thread: the process's CPU time too (not counting time descheduled)
    with threadpool_limits(threads):
        # warm-up, untimed: every copy once, as a model's first token would (compiles the kernels and makes each
        # copy's plan for this thread count and batch: fast's entry points, the kernels' byte order)
        for fn, _ in cands.values():
            for i in range(args.repeats * (RUN + 1) + 1):
                fn(i)
        for r in range(args.repeats):
            for name, (fn, _) in cands.items():
                first = r * (RUN + 1) + 1
                isolated[name].append(_timed(lambda fn=fn, i=first: fn(i)))
                for i in range(first + 1, first + RUN + 1):
                    c0 = time.process_time()
                    times[name].append(_timed(lambda fn=fn, i=i: fn(i)))
                    cpu[name].append(time.process_time() - c0)
    base = min(times["numpy_fp32"])
    # the bandwidth the fractions are of: the best streaming read in this loop (the machine's bandwidth moves
    # by a third within minutes on the VMs measured; probes taken before the loop are recorded beside it)
    bandwidth = max(cands[name][1] / min(times[name]) for name in ("read_probe", "numpy_fp32"))
    cell = {}
    for name, (_, nbytes) in cands.items():
        best, lead = min(times[name]), min(isolated[name])
        cell[name] = {
            "best_ms": round(best * 1e3, 4),
            "median_ms": round(float(np.median(times[name])) * 1e3, 4),
            "speedup_vs_numpy_fp32": round(base / best, 3),
            "weight_bytes": nbytes,
            "roofline": round(nbytes / best / bandwidth, 3),
            "isolated_best_ms": round(lead * 1e3, 4),
            "isolated_roofline": round(nbytes / lead / bandwidth, 3),
        }
        if threads == 1:
            best_cpu = max(min(cpu[name]), 1e-9)
            cell[name]["best_cpu_ms"] = round(best_cpu * 1e3, 4)
            cell[name]["speedup_vs_numpy_fp32_cpu_time"] = round(
                max(min(cpu["numpy_fp32"]), 1e-9) / best_cpu, 3
            )
    return cell, bandwidth


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
    parser.add_argument("--quick", action="store_true", help="one shape, 10 repeats")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--formats", nargs="+", default=FORMATS)
    parser.add_argument("--fp32-act", action="store_true", help="also time the fp32-activation path (GEMV)")
    parser.add_argument("--mem-cap-gb", type=float, default=3.0, help="memory for weight copies per format")
    parser.add_argument("--model-dir", type=Path, help="an HF model folder: also time end-to-end generation")
    parser.add_argument("--model-only", action="store_true", help="only the end-to-end part")
    parser.add_argument("--no-llamacpp", action="store_true", help="leave out llama.cpp's TQ2_0 GEMV (ggml)")
    parser.add_argument("--isa", help=f"kernel instruction set: auto or one of {', '.join(simd.ISAS)}")
    args = parser.parse_args()
    if args.isa:
        fast.set_isa(args.isa)
    shapes = [(4096, 4096), (11008, 4096)]
    batches = [1, 8, 32]
    if args.quick:
        shapes, batches, args.repeats = [(4096, 4096)], [1, 8], 10
    all_threads = numba.config.NUMBA_NUM_THREADS
    thread_counts = sorted({1, all_threads})
    llc = llc_bytes()
    cap = int(args.mem_cap_gb * 2**30)
    bw_size = min(cap, max(4 * llc, 2**30))
    probes = {t: read_bandwidth(t, bw_size, 5) for t in thread_counts}
    probe = probe_buffers(llc)
    bandwidth = {t: max(p.values()) for t, p in probes.items()}
    report = {
        "host": host_info(),
        "method": {"repeats": args.repeats, "statistic": "best", "interleaved": True, "timed_calls_per_run": RUN,
                   "lead_call_per_run": "isolated_*",
                   "weights_streamed_from_memory": True,
                   "bandwidth": "per cell: the best of read_probe and numpy_fp32 in the same loop"},
        "read_bandwidth_gb_s_before_cells": {str(t): round(b / 1e9, 2) for t, b in bandwidth.items()},
        "read_bandwidth_probes_gb_s": {str(t): {k: round(v / 1e9, 2) for k, v in p.items()} for t, p in probes.items()},
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
        weights = cell_weights(w, args.formats, llc, cap, probe, llamacpp=not args.no_llamacpp)
        for batch in batches:
            for threads in thread_counts:
                cell, cell_bandwidth = bench_cell(k, batch, threads, weights, args)
                report["cells"].append({"shape": [n_rows, k], "batch": batch, "threads": threads,
                                        "read_bandwidth_gb_s": round(cell_bandwidth / 1e9, 2), "results": cell})  # fmt: skip
                print(f"# {n_rows}x{k} batch {batch} threads {threads}: "
                      + ", ".join(f"{n} {v['speedup_vs_numpy_fp32']}x" for n, v in cell.items()),
                      file=sys.stderr)  # fmt: skip
        if "llamacpp_tq2_0" in weights:
            weights["llamacpp_tq2_0"].close()
        del weights
    report["targets"] = target_rows(report["cells"], thread_counts)
    for row in report["targets"]:
        print("# target " + json.dumps(row), file=sys.stderr)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

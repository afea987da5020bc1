"""llama.cpp's own TQ2_0 matrix-vector product, called through ggml's C API (the ``libggml-base`` / ``libggml-cpu``
that llama-cpp-python ships), for bench/kernels.py to time beside ours on the same shape, threads and weights.

One ggml context holds ``copies`` TQ2_0 weight tensors (``ne0 = k``, ``ne1 = n_rows``: ggml's ``block_tq2_0`` is
64 bytes of 2-bit codes then an fp16 scale per 256 weights, the byte layout of our ``qs`` and ``d`` interleaved per
block) and one f32 input; graph ``i`` is ``ggml_mul_mat(W_i, x)``, computed on a ggml thread pool made once (so a
call does not start threads). ggml quantizes the input to Q8_K inside the product, as llama.cpp does per token.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

GGML_TYPE_F32, GGML_TYPE_TQ2_0 = 0, 35  # enum ggml_type (ggml.h)
TQ2_0_BLOCK, TQ2_0_BLOCK_BYTES = 256, 66


class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class CPlan(ctypes.Structure):  # struct ggml_cplan (ggml-cpu.h)
    _fields_ = [("work_size", ctypes.c_size_t), ("work_data", ctypes.c_void_p), ("n_threads", ctypes.c_int),
                ("threadpool", ctypes.c_void_p), ("abort_callback", ctypes.c_void_p),
                ("abort_callback_data", ctypes.c_void_p), ("use_ref", ctypes.c_bool)]  # fmt: skip


def _libraries() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    base = ctypes.CDLL(str(lib / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(lib / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for fn, res, args in [(base.ggml_init, vp, [InitParams]), (base.ggml_free, None, [vp]),
                          (base.ggml_new_tensor_2d, vp, [vp, i32, i64, i64]),
                          (base.ggml_new_tensor_1d, vp, [vp, i32, i64]), (base.ggml_mul_mat, vp, [vp, vp, vp]),
                          (base.ggml_new_graph, vp, [vp]), (base.ggml_build_forward_expand, None, [vp, vp]),
                          (base.ggml_get_data, vp, [vp]), (base.ggml_nbytes, ctypes.c_size_t, [vp]),
                          (base.ggml_tensor_overhead, ctypes.c_size_t, []),
                          (base.ggml_graph_overhead, ctypes.c_size_t, []),
                          (base.ggml_threadpool_params_init, None, [vp, i32]),
                          (cpu.ggml_threadpool_new, vp, [vp]), (cpu.ggml_threadpool_free, None, [vp]),
                          (cpu.ggml_graph_plan, CPlan, [vp, i32, vp]),
                          (cpu.ggml_graph_compute, i32, [vp, ctypes.POINTER(CPlan)]),
                          (cpu.ggml_cpu_init, None, [])]:  # fmt: skip
        fn.restype, fn.argtypes = res, args
    cpu.ggml_cpu_init()
    return base, cpu


def tq2_0_blocks(qs: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Our TQ2_0 ``qs`` ``(n_rows, n_blocks * 64)`` and ``d`` float16 ``(n_rows, n_blocks)`` as ggml's
    ``block_tq2_0`` array ``(n_rows, n_blocks * 66)``."""
    n_rows, n_blocks = d.shape
    out = np.empty((n_rows, n_blocks, TQ2_0_BLOCK_BYTES), np.uint8)
    out[:, :, :64] = qs.reshape(n_rows, n_blocks, 64)
    out[:, :, 64:] = np.ascontiguousarray(d, dtype=np.float16).view(np.uint8).reshape(n_rows, n_blocks, 2)
    return out.reshape(n_rows, -1)


class GgmlTq2Gemv:
    """``copies`` TQ2_0 matrices (the same weights at distinct addresses) times one f32 vector, by ggml."""

    def __init__(self, qs: np.ndarray, d: np.ndarray, copies: int, threads: int, arena=None) -> None:
        """``arena`` (bitsweep.kernels.memory.Arena): where ggml's context memory (tensors and graphs) lies; None:
        ggml allocates it itself."""
        self.base, self.cpu = _libraries()
        n_rows, k = qs.shape[0], d.shape[1] * TQ2_0_BLOCK
        blocks = tq2_0_blocks(qs, d)
        per_graph = 4 * self.base.ggml_tensor_overhead() + self.base.ggml_graph_overhead()
        size = copies * (blocks.nbytes + per_graph + 4 * n_rows + 4096) + 4 * k + (1 << 20)
        self.memory = None if arena is None else arena.empty(size, np.uint8)  # kept alive with the context
        buffer = None if self.memory is None else self.memory.ctypes.data
        self.ctx = self.base.ggml_init(InitParams(size, buffer, False))
        if not self.ctx:
            raise MemoryError(f"ggml_init({size} bytes) failed")
        self.x = self.base.ggml_new_tensor_1d(self.ctx, GGML_TYPE_F32, k)
        self.graphs, self.outputs = [], []
        for _ in range(copies):
            w = self.base.ggml_new_tensor_2d(self.ctx, GGML_TYPE_TQ2_0, k, n_rows)
            if self.base.ggml_nbytes(w) != blocks.nbytes:
                raise ValueError(
                    f"ggml's TQ2_0 tensor holds {self.base.ggml_nbytes(w)} bytes, ours {blocks.nbytes}"
                )
            ctypes.memmove(self.base.ggml_get_data(w), blocks.ctypes.data, blocks.nbytes)
            y = self.base.ggml_mul_mat(self.ctx, w, self.x)
            graph = self.base.ggml_new_graph(self.ctx)
            self.base.ggml_build_forward_expand(graph, y)
            self.graphs.append(graph)
            self.outputs.append(y)
        self.k, self.n_rows, self.nbytes = k, n_rows, blocks.nbytes
        self.pool = None
        self.use_threads(threads)

    def use_threads(self, threads: int) -> None:
        """A new ggml thread pool of ``threads`` and the graphs' plans for it."""
        if self.pool:
            self.cpu.ggml_threadpool_free(self.pool)
        params = ctypes.create_string_buffer(4096)  # struct ggml_threadpool_params (~530 bytes)
        self.base.ggml_threadpool_params_init(params, threads)
        self.pool = self.cpu.ggml_threadpool_new(params)
        self.plans = [self.cpu.ggml_graph_plan(g, threads, self.pool) for g in self.graphs]
        self.work = [ctypes.create_string_buffer(max(p.work_size, 1)) for p in self.plans]
        for plan, work in zip(self.plans, self.work, strict=True):
            plan.work_data = ctypes.cast(work, ctypes.c_void_p)

    def set_input(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        if x.size != self.k:
            raise ValueError(f"input of {x.size} values, the matrices are {self.k} wide")
        ctypes.memmove(self.base.ggml_get_data(self.x), x.ctypes.data, x.nbytes)

    def __call__(self, i: int) -> None:
        j = i % len(self.graphs)
        status = self.cpu.ggml_graph_compute(self.graphs[j], ctypes.byref(self.plans[j]))
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute returned {status}")

    def output(self, i: int = 0) -> np.ndarray:
        data = self.base.ggml_get_data(self.outputs[i % len(self.outputs)])
        return np.ctypeslib.as_array(ctypes.cast(data, ctypes.POINTER(ctypes.c_float)), (self.n_rows,)).copy()

    def close(self) -> None:
        if self.pool:
            self.cpu.ggml_threadpool_free(self.pool)
            self.pool = None
        if self.ctx:
            self.base.ggml_free(self.ctx)
            self.ctx = None

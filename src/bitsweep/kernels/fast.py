"""numba kernels for the packed formats of bitsweep.kernels.formats: same names, same results.

One compiled kernel per operation serves every format (a branch per group, always taken the same way). Rows are
split across threads with ``prange`` in tasks of ``ROWS_PER_TASK`` rows.

- GEMV (one token, int8 activations) fuses decoding into the dot product: one 32-byte load of codes gives
  ``8 / bits`` planes of 32 consecutive codes, each multiplied with a 32-wide slice of the activations.
- GEMM decodes each group once into an int16 buffer and reuses it for every token of the batch: the weights are
  read and decoded once per batch, not once per token, which is where packed weights beat fp32 sgemm.
- The fp32-activation path (for comparison) decodes to float32 and is compiled with ``fastmath`` so that the
  float reduction vectorises; it is close to, not bit-identical with, the reference.

On the int8 path the per-group integer sums are exact and the groups are combined in the reference's order
without fastmath, so outputs are bit-identical to bitsweep.kernels.formats.

The int8 GEMV/GEMM run the explicit-SIMD kernels of bitsweep.kernels.simd (AVX-512 VNNI, AVX-512BW, AVX-VNNI,
AVX2; chosen at import from ``$BITSWEEP_KERNEL_ISA``, default ``auto``, and switchable with :func:`set_isa`); the
loops below are the ``portable`` path. Every path gives the same bits on the same inputs.
"""

from __future__ import annotations

import ctypes

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.experimental import structref
from numba.extending import intrinsic, overload

from bitsweep.kernels import memory, simd
from bitsweep.kernels.formats import (
    FMT_BINARY,
    FMT_INT2,
    FMT_INT3,
    FMT_INT4,
    FMT_TQ1,
    FMT_TQ2,
    Activations,
    PackedMatrix,
    plane_map,
    prepare_activations,
    uniform_row_scales,
)

ROWS_PER_TASK = 16  # rows a thread handles with one decode buffer (allocating per row would cost more)

# Integer arithmetic below is written as ``np.int32(np.int16(code) * xq)``: numba types every integer product as
# int64, and the explicit narrowing lets LLVM see int16 x int16 -> int32 multiply-adds (vpmaddwd) and keep four
# times as many lanes per vector as int64 would. Sums of one group stay far below 2**31.


@njit(inline="always")
def _i16(v):
    return np.int16(v)


# One hand-unrolled decoder per code width: a loop over a runtime shift did not vectorise (measured 7x slower).


@njit(inline="always")
def _decode2(row, o, nbytes, buf):
    """2-bit planes: byte m of a 32-byte chunk holds elements 32*t + m (t = 0..3) in bits 2t, 2t+1."""
    for ch in range(nbytes // 32):
        b = ch * 128
        for m in range(32):
            q = _i16(row[o + ch * 32 + m])
            buf[b + m] = _i16(q & 3)
            buf[b + 32 + m] = _i16((q >> 2) & 3)
            buf[b + 64 + m] = _i16((q >> 4) & 3)
            buf[b + 96 + m] = _i16(q >> 6)


@njit(inline="always")
def _decode1(row, o, nbytes, buf, shift):
    """1-bit planes: byte m of a 32-byte chunk holds elements 32*t + m (t = 0..7) in bit t; ORed in at shift."""
    for ch in range(nbytes // 32):
        b = ch * 256
        for m in range(32):
            q = _i16(row[o + ch * 32 + m])
            for t in range(8):
                buf[b + 32 * t + m] |= ((q >> t) & 1) << shift


@njit(inline="always")
def _decode4(row, o, nbytes, buf):
    for ch in range(nbytes // 32):
        b = ch * 64
        for m in range(32):
            q = _i16(row[o + ch * 32 + m])
            buf[b + m] = _i16(q & 15)
            buf[b + 32 + m] = _i16(q >> 4)


@njit(inline="always")
def _trit(q, p):
    """Digit of a TQ1_0 byte: ((q * 3^i mod 256) * 3) >> 8, with p = 3^i (see formats._tq1_digits)."""
    return _i16((_i16(np.uint8(q * p)) * 3) >> 8)


@njit(inline="always")
def _decode_trits(row, o, n_bytes, n_digits, buf, base):
    """Bytes ``row[o:o+n_bytes]`` holding ``n_digits`` trits each: digit i of byte m -> ``buf[base + n_bytes*i + m]``."""
    p = np.uint8(1)
    for i in range(n_digits):
        for m in range(n_bytes):
            buf[base + n_bytes * i + m] = _trit(np.uint8(row[o + m]), p)
        p = np.uint8(p * 3)


@njit(inline="always")
def _decode_tq1(row, o, buf):
    """TQ1_0 block: 32 bytes of 5 trits (elements 0-159), 16 of 5 (160-239), then 4 of 4 (240-255)."""
    _decode_trits(row, o, 32, 5, buf, 0)
    _decode_trits(row, o + 32, 16, 5, buf, 160)
    _decode_trits(row, o + 48, 4, 4, buf, 240)


@njit(inline="always")
def _decode_group(fmt, row, o, group, bytes_per_group, buf):
    """Codes of one group into ``buf[:group]`` (int16); its bytes are sliced out first, as in _pdot_group."""
    row = row[o : o + bytes_per_group]
    o = 0
    if fmt == FMT_TQ2 or fmt == FMT_INT2:  # noqa: SIM109  (kept scalar for numba)
        _decode2(row, o, group // 4, buf)
    elif fmt == FMT_TQ1:
        _decode_tq1(row, o, buf)
    elif fmt == FMT_INT4:
        _decode4(row, o, group // 2, buf)
    elif fmt == FMT_BINARY:
        buf[:group] = 0
        _decode1(row, o, group // 8, buf, 0)
    elif fmt == FMT_INT3:
        _decode2(row, o, group // 4, buf)
        _decode1(row, o + group // 4, group // 8, buf, 2)


# GEMV: activations in "plane order". planes[t, b] is the activation that meets code t of weight byte b (see
# formats.plane_map), so one row's dot product is a single pass over its bytes against a few contiguous
# activation streams: LLVM keeps one vector accumulator per group and reduces it once (the per-32-byte-chunk
# reduction of a natural-order loop was the bottleneck: 1.4x slower).


@njit(inline="always")
def _pdot2(q, p0, p1, p2, p3):
    s = np.int32(0)
    for b in range(q.shape[0]):
        v = _i16(q[b])
        s = np.int32(s + np.int32(_i16(v & 3) * p0[b]) + np.int32(_i16((v >> 2) & 3) * p1[b])
                     + np.int32(_i16((v >> 4) & 3) * p2[b]) + np.int32(_i16(v >> 6) * p3[b]))  # fmt: skip
    return s


@njit(inline="always")
def _pdot1(q, p0, p1, p2, p3, p4, p5, p6, p7):
    s = np.int32(0)
    for b in range(q.shape[0]):
        v = _i16(q[b])
        s = np.int32(s + np.int32(_i16(v & 1) * p0[b]) + np.int32(_i16((v >> 1) & 1) * p1[b])
                     + np.int32(_i16((v >> 2) & 1) * p2[b]) + np.int32(_i16((v >> 3) & 1) * p3[b])
                     + np.int32(_i16((v >> 4) & 1) * p4[b]) + np.int32(_i16((v >> 5) & 1) * p5[b])
                     + np.int32(_i16((v >> 6) & 1) * p6[b]) + np.int32(_i16(v >> 7) * p7[b]))  # fmt: skip
    return s


@njit(inline="always")
def _pdot4(q, p0, p1):
    s = np.int32(0)
    for b in range(q.shape[0]):
        v = _i16(q[b])
        s = np.int32(s + np.int32(_i16(v & 15) * p0[b]) + np.int32(_i16(v >> 4) * p1[b]))
    return s


@njit(inline="always")
def _pdot_tq1(q, p0, p1, p2, p3, p4):
    s = np.int32(0)
    for b in range(q.shape[0]):
        v = np.uint8(q[b])
        s = np.int32(s + np.int32(_trit(v, 1) * p0[b]) + np.int32(_trit(v, 3) * p1[b])
                     + np.int32(_trit(v, 9) * p2[b]) + np.int32(_trit(v, 27) * p3[b])
                     + np.int32(_trit(v, 81) * p4[b]))  # fmt: skip
    return s


@njit(inline="always")
def _pdot_group(fmt, row, o, group, P):
    """sum_j q_j * x_j over one group (bytes ``row[o:o+bytes]``), exact in int32.

    Everything is passed on as slices so that each index inside is a loop counter: with a runtime offset LLVM
    cannot rule out numba's negative-index wraparound and stops vectorising (measured 20x slower).
    """
    if fmt == FMT_TQ2 or fmt == FMT_INT2:  # noqa: SIM109  (kept scalar for numba)
        e = o + group // 4
        return _pdot2(row[o:e], P[0, o:e], P[1, o:e], P[2, o:e], P[3, o:e])
    if fmt == FMT_TQ1:
        e = o + 52
        return _pdot_tq1(row[o:e], P[0, o:e], P[1, o:e], P[2, o:e], P[3, o:e], P[4, o:e])
    if fmt == FMT_INT4:
        e = o + group // 2
        return _pdot4(row[o:e], P[0, o:e], P[1, o:e])
    if fmt == FMT_BINARY:
        e = o + group // 8
        return _pdot1(row[o:e], P[0, o:e], P[1, o:e], P[2, o:e], P[3, o:e],
                      P[4, o:e], P[5, o:e], P[6, o:e], P[7, o:e])  # fmt: skip
    # int3: q = low + 4 * high; the low two bits as 2-bit planes, then the high bit as 1-bit planes
    m = o + group // 4
    e = m + group // 8
    low = _pdot2(row[o:m], P[0, o:m], P[1, o:m], P[2, o:m], P[3, o:m])
    high = _pdot1(
        row[m:e], P[0, m:e], P[1, m:e], P[2, m:e], P[3, m:e], P[4, m:e], P[5, m:e], P[6, m:e], P[7, m:e]
    )
    return np.int32(low + 4 * high)


@njit(parallel=True, cache=True)
def _gemv_int_rows(fmt, qs, a, c, planes, xsum_total, xscale, out):
    """GEMV for rows with one scale (BitNet's per-tensor absmean) and one activation scale: the whole row is a
    single integer dot product, combined in float once (no per-group reduction)."""
    n_rows = qs.shape[0]
    n_tasks = (n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(n_tasks):
        for i in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            row = qs[i]
            if fmt == FMT_TQ1:
                s = _pdot_tq1(row, planes[0], planes[1], planes[2], planes[3], planes[4])
            elif fmt == FMT_BINARY:
                s = _pdot1(row, planes[0], planes[1], planes[2], planes[3],
                           planes[4], planes[5], planes[6], planes[7])  # fmt: skip
            else:
                s = _pdot2(row, planes[0], planes[1], planes[2], planes[3])
            out[i] = (a[i, 0] * np.float32(s) + c[i, 0] * np.float32(xsum_total)) * xscale


@njit(inline="always")
def _dot_buf(buf, x):
    """sum_j buf[j] * x[j] over ``x``'s length, exact in int32."""
    s = np.int32(0)
    for j in range(x.shape[0]):
        s = np.int32(s + np.int32(buf[j] * x[j]))
    return s


@njit(parallel=True, cache=True)
def _gemv_int(fmt, qs, a, c, group, bytes_per_group, planes, xsum, xscale, out):
    n_rows, n_groups = a.shape
    n_tasks = (n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(n_tasks):
        for i in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            row = qs[i]
            acc = np.float32(0)
            for g in range(n_groups):
                s = _pdot_group(fmt, row, g * bytes_per_group, group, planes)
                acc += (a[i, g] * np.float32(s) + c[i, g] * np.float32(xsum[g])) * xscale[g]
            out[i] = acc


@njit(parallel=True, cache=True)
def _gemm_int(fmt, qs, a, c, group, bytes_per_group, xq, xsum, xscale, uniform, out):
    """Batched: each group is decoded once into ``buf`` and dotted with every token. ``uniform``: one scale per
    row and per token (see formats.uniform_row_scales), so integer sums run over the whole row."""
    n_rows, n_groups = a.shape
    n_tok = xq.shape[0]
    xsum_total = np.zeros(n_tok, np.int32)
    for t in range(n_tok):
        for g in range(n_groups):
            xsum_total[t] += xsum[t, g]
    n_tasks = (n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(n_tasks):
        buf = np.zeros(group, np.int16)
        acc = np.zeros(n_tok, np.float32)
        iacc = np.zeros(n_tok, np.int32)
        for i in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            row = qs[i]
            acc[:] = 0
            iacc[:] = 0
            for g in range(n_groups):
                _decode_group(fmt, row, g * bytes_per_group, group, bytes_per_group, buf)
                ag, cg, k0 = a[i, g], c[i, g], g * group
                for t in range(n_tok):
                    s = _dot_buf(buf, xq[t, k0 : k0 + group])
                    if uniform:
                        iacc[t] += s
                    else:
                        acc[t] += (ag * np.float32(s) + cg * np.float32(xsum[t, g])) * xscale[t, g]
            for t in range(n_tok):
                if uniform:
                    out[t, i] = (
                        a[i, 0] * np.float32(iacc[t]) + c[i, 0] * np.float32(xsum_total[t])
                    ) * xscale[t, 0]
                else:
                    out[t, i] = acc[t]


@njit(parallel=True, cache=True, fastmath=True)
def _gemm_f32(fmt, qs, a, c, group, bytes_per_group, x, xsum, out):
    n_rows, n_groups = a.shape
    n_tok = x.shape[0]
    n_tasks = (n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(n_tasks):
        codes = np.zeros(group, np.int16)
        buf = np.zeros(group, np.float32)
        acc = np.zeros(n_tok, np.float32)
        for i in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            acc[:] = 0
            for g in range(n_groups):
                _decode_group(fmt, qs[i], g * bytes_per_group, group, bytes_per_group, codes)
                for j in range(group):
                    buf[j] = np.float32(codes[j])
                k0 = g * group
                for t in range(n_tok):
                    xg = x[t, k0 : k0 + group]
                    s = np.float32(0)
                    for j in range(group):
                        s += buf[j] * xg[j]
                    acc[t] += a[i, g] * s + c[i, g] * xsum[t, g]
            for t in range(n_tok):
                out[t, i] = acc[t]


@njit(parallel=True, cache=True)
def _dequantize(fmt, qs, a, c, group, bytes_per_group, out):
    n_rows, n_groups = a.shape
    for i in prange(n_rows):
        buf = np.zeros(group, np.int16)
        for g in range(n_groups):
            _decode_group(fmt, qs[i], g * bytes_per_group, group, bytes_per_group, buf)
            for j in range(group):
                out[i, g * group + j] = a[i, g] * np.float32(buf[j]) + c[i, g]


# ---------------------------------------------------------------------------------------------------------------
# Batches through BLAS, exactly: the integer group sums as float32 GEMMs of integer-valued matrices


EXACT_F32 = 2**24  # every integer of magnitude up to this is a float32: sums below it are exact in any order


def codes_f32(pm: PackedMatrix) -> np.ndarray:
    """The weight codes ``q`` (the unsigned integers the kernels multiply) as float32 ``(n_rows, k_padded)``."""
    ones = np.ones((pm.n_rows, pm.k_padded // pm.group), np.float32)
    out = np.empty((pm.n_rows, pm.k_padded), np.float32)
    _dequantize(
        pm.fmt.fmt_id, pm.qs, ones, np.zeros_like(ones), pm.group, pm.fmt.bytes_per_group(pm.group), out
    )
    return out


def packed_batches(pm: PackedMatrix) -> bool:
    """Whether batches of integer activations of any size are best multiplied by the packed kernels rather than by
    :func:`gemm_exact`'s BLAS GEMMs (both give the same bits): on the SIMD paths, for every format but int3.
    Measured on the Zen 4 host, 1024x2816 to 4096x4096, 16 to 512 tokens, one and two threads: the packed GEMM
    1.4-2.4x faster for TQ2_0, 1.7-2.8x for int4 and int2, 1.0-2.9x for TQ1_0 and binary; int3's split planes
    0.6-0.75x; the portable loops are untuned."""
    return _isa != "portable" and pm.fmt.fmt_id != FMT_INT3


def gemm_exact(pm: PackedMatrix, acts: Activations) -> np.ndarray:
    """``x @ W.T`` for a batch of integer activations with the bits of :func:`gemm_prepared` (and
    bitsweep.kernels.formats.gemm), at BLAS speed, on any CPU and thread count.

    The per-group sums ``sum_j q_j x_j`` are products of integer-valued float32 matrices (codes 0..15, int8
    activations): every partial sum is an integer below :data:`EXACT_F32` in magnitude (float64 where a
    whole-row sum could reach it), so the GEMM is exact whatever order and vector width the BLAS kernel sums
    in. The groups are then combined in float32 in the reference's order (:func:`_combine_groups`). A float
    GEMM on dequantized weights instead rounds in the BLAS kernel's order, which differs between AVX2 and
    AVX-512 builds and thread counts; int8 rounding of the next layer's activations then carries a last-bit
    difference into a different model output.
    """
    import torch

    if not acts.integer:
        raise ValueError("gemm_exact takes integer activations (act int8 / int8_block)")
    n, group = acts.x.shape[0], pm.group
    n_groups = pm.k_padded // group
    codes, x = codes_f32(pm), acts.x.astype(np.float32)
    a, c = _scalars(pm)
    max_code = pm.fmt.n_levels - 1
    if uniform_row_scales(pm, acts):
        dtype = torch.float32 if 127 * max_code * pm.k_padded < EXACT_F32 else torch.float64
        dots = (torch.from_numpy(x).to(dtype) @ torch.from_numpy(codes).to(dtype).T).to(torch.float32).numpy()
        out = np.empty((n, pm.n_rows), np.float32)
        _combine_rows(dots, a[:, 0], c[:, 0], acts.xsum.sum(-1).astype(np.float32), acts.scale[:, 0], out)
        return out
    if 127 * max_code * group >= EXACT_F32:
        raise ValueError(f"group {group} too large for exact float32 group sums")
    xg = torch.from_numpy(x).view(n, n_groups, group).transpose(0, 1)  # (G, n, group)
    wg = torch.from_numpy(codes).view(pm.n_rows, n_groups, group).permute(1, 2, 0)  # (G, group, rows)
    dots = torch.bmm(xg, wg).numpy()  # (G, n, rows), exact integers
    out = np.empty((n, pm.n_rows), np.float32)
    _combine_groups(dots, *_blocked_scalars(pm), acts.xsum.astype(np.float32), acts.scale, out)
    return out


@njit(parallel=True, cache=True)
def _combine_rows(dots, a, c, xsum, scale, out):
    """``out[t, i] = (a[i] dots[t, i] + c[i] xsum[t]) scale[t]``, each operation rounded to float32 as NumPy rounds
    that expression (no fastmath), in one pass instead of NumPy's four temporaries of the whole output."""
    n_tok, n_rows = dots.shape
    for t in prange(n_tok):
        xs, sc = xsum[t], scale[t]
        for i in range(n_rows):
            out[t, i] = (a[i] * dots[t, i] + c[i] * xs) * sc


@njit(parallel=True, cache=True)
def _combine_groups(dots, dB, mB, rule, xsum, scale, out):
    """``out[t, i] = sum_g (a[i,g] dots[g,t,i] + c[i,g] xsum[t,g]) scale[t,g]`` one group after another, each
    operation rounded to float32 as formats.gemm's NumPy expression rounds it (no fastmath: no reassociation,
    no fused multiply-add). ``dB``, ``mB``, ``rule``: the scalars blocked by row task (:func:`_blocked_scalars`)."""
    n_groups, n_tok, n_rows = dots.shape
    block = dB.shape[2]
    for t in prange(n_tok):
        for i in range(n_rows):
            out[t, i] = 0
        for g in range(n_groups):
            xs, s = xsum[t, g], scale[t, g]
            for b in range(dB.shape[0]):
                r0 = b * block
                for r in range(min(block, n_rows - r0)):
                    a, c = simd.group_scalars(rule, dB, mB, b, g, r)
                    part = a * dots[g, t, r0 + r] + c * xs
                    out[t, r0 + r] = out[t, r0 + r] + part * s


@njit(parallel=True, cache=True)
def gemv_int8_unpacked(w, w_scale, xq, x_scale):
    """Baseline: int8 weights ``(n_rows, k)`` (one scale per row) times int8 activations held as int16."""
    n_rows, k = w.shape
    out = np.empty(n_rows, np.float32)
    for i in prange(n_rows):
        s = np.int32(0)
        for j in range(k):
            s += np.int32(w[i, j]) * np.int32(xq[j])
        out[i] = np.float32(s) * w_scale[i] * x_scale
    return out


def gemv_f16(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """:func:`_gemv_f16`, prefetching the rows ahead as :func:`simd.software_prefetch` says."""
    _gemv_f16(w, x, *simd.prefetch_distance(1, _prefetch), out)


@njit(parallel=True, fastmath=True, cache=True)
def _gemv_f16(w, x, ahead, level, out):
    """``out = W @ x`` for float16 weights (their uint16 bits, ``(n_rows, k)``) and float32 ``x``: each weight
    converted exactly (``vcvtph2ps``), products summed in float32 in the order the vectoriser picks (fastmath: not
    sgemv's bits). Half the bytes of the same weights in float32, and this kernel is memory-bound: a float16 LM
    head read per generated token (49152 x 1024, one thread) took 8.7 ms against 13.1 for torch's float32 product.
    With ``ahead`` > 0 each row prefetches the row that many bytes ahead into cache ``level`` (1 or 2; the
    hardware streamer stops at page boundaries on the Intel host; on the Zen 4 host L1 prefetches a page ahead
    made this GEMV 1.9x slower)."""
    n_rows, k = w.shape
    row_bytes = 2 * k
    for task in prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for i in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            if ahead > 0:
                for line in range(0, row_bytes, 64):
                    if level == 2:
                        simd.prefetch_l2(w, i * row_bytes + ahead + line)
                    else:
                        simd.prefetch_l1(w, i * row_bytes + ahead + line)
            s = np.float32(0)
            for j in range(k):
                s += simd.half_to_float(w[i, j]) * x[j]
            out[i] = s


_isa = simd.select_isa()
_prefetch = simd.software_prefetch()


def current_isa() -> str:
    """The instruction-set path the int8 kernels take (see bitsweep.kernels.simd)."""
    return _isa


def set_isa(name: str | None = None) -> str:
    """Switch the int8 kernels to ``name`` (``auto``, an ISA of simd.ISAS; None: ``$BITSWEEP_KERNEL_ISA``);
    returns the previous one. Raises ConfigError for an ISA this CPU lacks."""
    global _isa
    previous, _isa = _isa, simd.select_isa(name)
    return previous


available_isas = simd.available_isas
_group_batches = True


def set_group_batches(enabled: bool) -> bool:
    """Whether per-group sums go through simd's batched path where it applies (default) or one span per group
    (what bench/kernels.py compares it with); returns the previous setting. Both give the same bits."""
    global _group_batches
    previous, _group_batches = _group_batches, enabled
    return previous


def groups_batched(pm: PackedMatrix) -> bool:
    """Whether ``pm``'s per-group sums go through simd's batched path (on a SIMD path, where the group size
    qualifies, unless :func:`set_group_batches` turned it off). Formats with one scale per row sum whole rows."""
    bpg = pm.fmt.bytes_per_group(pm.group)
    return _group_batches and _isa != "portable" and simd.batched_groups(_isa, simd.KIND[pm.fmt.fmt_id], bpg)


def _kern(pm: PackedMatrix) -> simd.Kern:
    """The kernel type: the group size is compiled in where groups are summed in batches, else left at 0 so that
    one compilation serves every group size."""
    bpg = pm.fmt.bytes_per_group(pm.group) if groups_batched(pm) else 0
    kind, row_bytes = simd.KIND[pm.fmt.fmt_id], pm.qs.shape[1]
    if _isa in simd.VNNI and kind in simd.MASKED_BITS and row_bytes > simd.masked_span_bytes(_isa, kind):
        raise ValueError(
            f"rows of {row_bytes} bytes are longer than the {_isa} kernels' int32 sums allow "
            f"({simd.masked_span_bytes(_isa, kind)} bytes of {pm.fmt.name} codes)"
        )
    return simd.Kern(_isa, pm.fmt.fmt_id, bpg, _prefetch)


def _blocked_scalars(pm: PackedMatrix) -> tuple[np.ndarray, np.ndarray, int]:
    """``(dB, mB, rule)``: the stored float16 ``d`` and ``m`` (``d`` again where the format has none) as uint16
    bits blocked by row task, ``(n_tasks, n_groups, simd.ROWS_PER_TASK)`` (simd.block_scalars), and the rule
    that makes ``(a, c)`` of them (simd.SCALAR_RULE): the kernels combine a task's groups across its rows at
    once, reading 2-4 bytes per group instead of 8."""
    cached = pm.meta.get("_kernel_scalars_blocked")
    if cached is None:
        if pm.d.dtype != np.float16 or (pm.m is not None and pm.m.dtype != np.float16):
            raise ValueError(f"packed scalars must be float16, not {pm.d.dtype}")
        dB = memory.copy(simd.block_scalars(pm.d.view(np.uint16)))
        mB = dB if pm.m is None else memory.copy(simd.block_scalars(pm.m.view(np.uint16)))
        cached = pm.meta["_kernel_scalars_blocked"] = (dB, mB, simd.SCALAR_RULE[pm.fmt.fmt_id])
    return cached


def _scalars(pm: PackedMatrix) -> tuple[np.ndarray, np.ndarray]:
    cached = pm.meta.get("_kernel_scalars")
    if cached is None:
        cached = pm.meta["_kernel_scalars"] = pm.kernel_scalars()
    return cached


def _row_scalars(pm: PackedMatrix) -> tuple[np.ndarray, np.ndarray]:
    """``(a, c)`` of each row's first group, ``(n_rows, 1)`` float32: all the SIMD kernels read of them (rows with
    one scale; per-group scalars come blocked, :func:`_blocked_scalars`). Read from the full ``(n_rows, n_groups)``
    arrays they took a cache line per row and array, 12% on top of a 4096-wide TQ2_0 row's 1 KiB of codes."""
    cached = pm.meta.get("_kernel_row_scalars")
    if cached is None:
        a, c = _scalars(pm)
        cached = pm.meta["_kernel_row_scalars"] = (memory.copy(a[:, :1]), memory.copy(c[:, :1]))
    return cached


def _plane_index(pm: PackedMatrix) -> np.ndarray:
    index = pm.meta.get("_plane_index")
    if index is None:
        index = pm.meta["_plane_index"] = plane_map(pm.fmt, pm.group, pm.k_padded)
    return index


def _kernel_rows(pm: PackedMatrix, uniform: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(qs, plane index)`` in the SIMD kernels' byte order: :func:`simd.sliced_order` where groups are summed in
    batches (a permuted copy of the codes, made once per matrix and instruction set), the stored order otherwise,
    and for ``uniform`` rows (one integer sum per row: any byte order gives it, so no copy). A row view of a
    stacked matrix (``meta["_rows_of"] = (stack, first, end)``, bitsweep.backends.bitnet) uses the stack's rows."""
    if (parent := pm.meta.get("_rows_of")) is not None:
        qs, index = _kernel_rows(parent[0], uniform)
        return qs[parent[1] : parent[2]], index
    key, layouts = (_isa, groups_batched(pm) and not uniform), pm.meta.setdefault("_kernel_rows", {})
    if key not in layouts:
        qs, index = np.ascontiguousarray(pm.qs), _plane_index(pm)
        if key[1]:
            order = simd.sliced_order(_isa, pm.fmt.bytes_per_group(pm.group), pm.k_padded // pm.group)
            qs, index = memory.copy(qs[:, order]), np.ascontiguousarray(index[:, order])
        layouts[key] = (qs, index)
    return layouts[key]


def to_huge_pages(pm: PackedMatrix) -> None:
    """Move ``pm``'s stored arrays (codes and scales) into the huge-page arena (:mod:`bitsweep.kernels.memory`), in
    place, for a matrix kept as long as a model: rows with one scale are streamed as stored (the kernels' other
    copies go there anyway). Cached plans and copies are dropped (they point at the old arrays); views of ``pm``
    (``meta["_rows_of"]``) are the caller's to remake."""
    pm.qs, pm.d = memory.copy(pm.qs), memory.copy(pm.d)
    if pm.m is not None:
        pm.m = memory.copy(pm.m)
    for key in [key for key in pm.meta if key.startswith("_") and key != "_rows_of"]:
        del pm.meta[key]


def activation_planes(pm: PackedMatrix, x: np.ndarray) -> np.ndarray:
    """One token's activations ``(k_padded,)`` gathered into plane order ``(n_planes, row_bytes)``."""
    return _gather_planes(x, _plane_index(pm))


@njit(cache=True)
def _gather_planes(x, index):
    n_planes, n_bytes = index.shape
    out = np.empty((n_planes, n_bytes), x.dtype)
    for t in range(n_planes):
        for b in range(n_bytes):
            j = index[t, b]
            out[t, b] = x[j] if j >= 0 else 0
    return out


def gemm_prepared(pm: PackedMatrix, acts: Activations) -> np.ndarray:
    """``x @ W.T`` for activations already prepared with :func:`prepare_activations`."""
    out = np.empty((acts.x.shape[0], pm.n_rows), _F32)
    if acts.integer and _isa != "portable":
        _gemm_simd(pm, acts, out)
        return out
    a, c = _scalars(pm)
    bpg = pm.fmt.bytes_per_group(pm.group)
    if acts.integer and acts.x.shape[0] == 1 and uniform_row_scales(pm, acts):
        planes = activation_planes(pm, acts.x[0])
        xsum_total = np.int32(acts.xsum[0].sum())
        _gemv_int_rows(pm.fmt.fmt_id, pm.qs, a, c, planes, xsum_total, acts.scale[0, 0], out[0])
    elif acts.integer and acts.x.shape[0] == 1:
        planes = activation_planes(pm, acts.x[0])
        _gemv_int(pm.fmt.fmt_id, pm.qs, a, c, pm.group, bpg, planes, acts.xsum[0], acts.scale[0], out[0])
    elif acts.integer:
        uniform = uniform_row_scales(pm, acts)
        _gemm_int(pm.fmt.fmt_id, pm.qs, a, c, pm.group, bpg, acts.x, acts.xsum, acts.scale, uniform, out)
    else:
        _gemm_f32(pm.fmt.fmt_id, pm.qs, a, c, pm.group, bpg, acts.x, acts.xsum, out)
    return out


def entry_point(dispatcher, *args):
    """The machine code ``dispatcher`` compiled (or loads from numba's cache) for the numba types of ``args``, as a
    function taking exactly those types. Calling it skips the dispatcher's per-call type resolution, which costs
    20-35 us per call when the caches are cold, as they are after every streamed weight matrix (1-4 us warm; Zen 4,
    numba 0.68): a plan takes it once and passes arrays of the same types on every call (nothing checks them).
    Python ``bool`` arguments are compiled in as literals, for functions that choose what to compile from them
    (:func:`_product`; numba does not prune an ``if`` on one), so a plan must pass the same values."""
    return dispatcher.compile(
        tuple(types.literal(value) if type(value) is bool else numba.typeof(value) for value in args)
    )


def _one_thread() -> bool:
    """Whether numba runs on one thread here (its count is per calling thread), read through the getter that
    ``numba.get_num_threads`` wraps once numba's pool is up: the wrapper's launch check costs 8 us more per call
    when the caches are cold (numba 0.68; the public function where that getter is missing)."""
    return _thread_count_getter()() == 1


def _thread_count_getter():
    """numba's thread count getter (a ctypes function of its threading layer, ``int get_num_threads(void)``), or
    the public function where numba no longer keeps one."""
    global _thread_count
    if _thread_count is None:
        numba.get_num_threads()  # launches the pool
        from numba.np.ufunc import parallel

        _thread_count = getattr(parallel, "_get_num_threads", None) or numba.get_num_threads
    return _thread_count


_thread_count = None


def _thread_count_address() -> int:
    """The address of numba's C thread count getter, for compiled code to call (:func:`_call_c_int`); 0 where
    numba keeps none (the plans then ask from Python on every call)."""
    getter = _thread_count_getter()
    if not isinstance(getter, ctypes._CFuncPtr):
        return 0
    return ctypes.cast(getter, ctypes.c_void_p).value or 0


@intrinsic
def _call_c_int(typingctx, address):
    """``((int (*)(void)) address)()``. numba's own ``get_num_threads`` in compiled code embeds the getter's
    address as a constant, and numba refuses to cache such code; a plan passes the address as data instead."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        getter = ir.FunctionType(ir.IntType(32), [])
        return builder.call(builder.inttoptr(args[0], getter.as_pointer()), [])

    return types.int32(address), codegen


@structref.register
class KernelPlanType(types.StructRef):
    """numba's type of :class:`KernelPlan`."""

    def preprocess_fields(self, fields):
        return tuple((name, types.unliteral(typ)) for name, typ in fields)


class KernelPlan(structref.StructRefProxy):
    """What the SIMD kernels read of one packed matrix, held where compiled code reads it: passing the plan is one
    argument to unbox per call instead of ten (each costs ~1 us when the caches are cold, as after every streamed
    weight matrix). Fields: ``kern`` (simd.Kern), ``qs`` and ``index`` (:func:`_kernel_rows`), ``a``, ``c``
    (:func:`_row_scalars`), ``dB``, ``mB``, ``rule``, ``bpg`` (:func:`_blocked_scalars`), ``group``, and
    ``threads``, the address of numba's thread count getter (:func:`_thread_count_address`)."""


_PLAN_FIELDS = ("kern", "qs", "index", "a", "c", "dB", "mB", "rule", "bpg", "group", "threads")
structref.define_proxy(KernelPlan, KernelPlanType, list(_PLAN_FIELDS))


@njit(cache=True)
def _new_kernel_plan(kern, qs, index, a, c, dB, mB, rule, bpg, group, threads):
    """A KernelPlan, constructed by cached code (the proxy's own constructor compiles in every process)."""
    return KernelPlan(kern, qs, index, a, c, dB, mB, rule, bpg, group, threads)


def _kernel_plan(pm: PackedMatrix, uniform: bool) -> KernelPlan:
    qs, index = _kernel_rows(pm, uniform)
    group = pm.group
    return _new_kernel_plan(_kern(pm), qs, index, *_row_scalars(pm), *_blocked_scalars(pm),
                            pm.fmt.bytes_per_group(group), group, _thread_count_address())  # fmt: skip


def _product(serial, uniform, plan, P, xsum, xscale, out):
    """``out = planes P times plan's rows`` for one token, for compiled code: the kernel is chosen when the caller
    compiles, from the literal flags ``serial`` (the kernel's loop inline, else its parallel form) and ``uniform``
    (one scale per row: simd.gemv_rows; else per-group scales: simd.gemv_groups). ``xsum``, ``xscale``, ``out``:
    2-D, one row."""
    raise TypeError("_product runs in compiled code only")


@overload(_product)
def _product_typed(serial, uniform, plan, P, xsum, xscale, out):
    if not all(isinstance(flag, types.BooleanLiteral) for flag in (serial, uniform)):
        return None
    if uniform.literal_value:
        kernel = simd.gemv_rows_serial if serial.literal_value else simd.gemv_rows

        def impl(serial, uniform, plan, P, xsum, xscale, out):
            kernel(plan.kern, plan.qs, plan.a, plan.c, P, xsum[0], xscale[0, 0], out[0])

    else:
        kernel = simd.gemv_groups_serial if serial.literal_value else simd.gemv_groups

        def impl(serial, uniform, plan, P, xsum, xscale, out):
            kernel(plan.kern, plan.qs, plan.dB, plan.mB, plan.rule, plan.bpg, P, xsum[0], xscale[0], out[0])

    return impl


@njit(inline="always")
def _threads_moved(serial, threads):
    """Whether numba's thread count no longer matches ``serial`` (0: no getter to ask, the caller asked)."""
    return threads != 0 and (_call_c_int(threads) == 1) != serial


@njit(cache=True)
def _run_plan(serial, uniform, plan, x, xsum, xscale, out):
    """gemm_prepared's SIMD call for one token: the activations gathered into planes and multiplied. False, having
    done nothing, where numba's thread count no longer matches ``serial``. (Batches keep two calls, gather and kernel,
    :func:`_batch_call`: through this one a batch of 32 on int2_g128, L2-resident, took 1.2-1.45x the time in some
    processes, and a batch's call costs little next to its work.)"""
    if _threads_moved(serial, plan.threads):
        return False
    _product(serial, uniform, plan, simd.gather_planes8(x, plan.index), xsum, xscale, out)
    return True


class _Call:
    """A plan's entry point (:func:`entry_point`) compiled for numba's thread count as last seen: ``entry(serial,
    *flags, plan, *arrays)``. Each call costs one compiled call; where the entry finds the count changed it does
    nothing and returns False, and the call takes (or compiles) the entry for the new count."""

    __slots__ = ("asks", "dispatcher", "entries", "entry", "flags", "head", "plan")

    def __init__(self, dispatcher, flags: tuple, plan: KernelPlan) -> None:
        self.dispatcher, self.flags, self.plan, self.entries = dispatcher, flags, plan, {}
        self.entry, self.head = None, ()
        self.asks = _thread_count_address() == 0  # the entries cannot see the thread count

    def __call__(self, *arrays) -> None:
        if self.entry is None or self.asks or not self.entry(*self.head, *arrays):
            self._switch(arrays)

    def _switch(self, arrays: tuple) -> None:
        serial = _one_thread()
        entry = self.entries.get(serial)
        if entry is None:
            entry = self.entries[serial] = entry_point(
                self.dispatcher, serial, *self.flags, self.plan, *arrays
            )
        head = (serial, *self.flags, self.plan)
        self.entry, self.head = entry, head
        if not entry(*head, *arrays):
            raise RuntimeError("numba's thread count changed during a kernel call")


def _c_array(values: np.ndarray, dtype, ndim: int) -> np.ndarray:
    """``values`` as the C-contiguous ``dtype`` array of ``ndim`` dimensions an entry point expects (``dtype`` a
    ``np.dtype``: compared by identity, numpy's builtin dtypes being singletons)."""
    if values.ndim != ndim:
        raise ValueError(f"expected a {ndim}-D array, got shape {values.shape}")
    if values.dtype is not dtype or not values.flags.c_contiguous:
        values = np.ascontiguousarray(values, dtype=dtype)
    return values


_I16, _I32, _F32 = np.dtype(np.int16), np.dtype(np.int32), np.dtype(np.float32)


def _gemm_simd(pm: PackedMatrix, acts: Activations, out: np.ndarray) -> None:
    """The SIMD kernels through a plan made once per matrix, instruction set and kind of call: one token, one
    compiled call (a :class:`_Call` of :func:`_run_plan`); a batch, gather and kernel (:func:`_batch_call`, keyed
    by numba's thread count too). Every call after a weight matrix has streamed past finds the caches cold, where
    each Python step costs ~1-10 us: the plan's key needs no arithmetic on the activations where they say their
    scales are per token (``acts.per_token``), and dtypes are checked by identity."""
    per_token = acts.per_token
    if per_token is None:  # known only from the scales themselves
        per_token = ("scales", uniform_row_scales(pm, acts))
    plans = pm.meta.get("_gemm_plans")
    if plans is None:
        plans = pm.meta["_gemm_plans"] = {}
    batched = acts.x.shape[0] > 1
    key = (_isa, _group_batches, per_token, batched, batched and _one_thread())
    x, xsum, scale = _c_array(acts.x, _I16, 2), _c_array(acts.xsum, _I32, 2), _c_array(acts.scale, _F32, 2)
    call = plans.get(key)
    if call is None:
        uniform = uniform_row_scales(pm, acts)
        if batched:
            call = _batch_call(pm, uniform, key[-1], x, xsum, scale, out)
        else:
            call = _Call(_run_plan, (uniform,), _kernel_plan(pm, uniform))
        plans[key] = call
    call(x, xsum, scale, out)


def _batch_call(pm: PackedMatrix, uniform: bool, serial: bool, x, xsum, scale, out):
    """A batch's call: the planes gathered, then the kernel (its loop on one thread, else its parallel form), both
    as entry points."""
    qs, index = _kernel_rows(pm, uniform)
    fixed = (_kern(pm), qs, *_row_scalars(pm), *_blocked_scalars(pm), pm.fmt.bytes_per_group(pm.group))
    gather = entry_point(simd.gather_planes8, x, index)
    kernel = entry_point(simd.gemm_serial if serial else simd.gemm, *fixed, gather(x, index), xsum, scale, uniform,
                         out)  # fmt: skip

    def call(x, xsum, scale, out):
        kernel(*fixed, gather(x, index), xsum, scale, uniform, out)

    return call


def gemm(pm: PackedMatrix, x: np.ndarray, act: str = "int8") -> np.ndarray:
    """Same contract as bitsweep.kernels.formats.gemm."""
    return gemm_prepared(pm, prepare_activations(x, pm.k_padded, pm.group, act))


def gemv(pm: PackedMatrix, x: np.ndarray, act: str = "int8") -> np.ndarray:
    return gemm(pm, np.asarray(x)[None], act)[0]


def dequantize(pm: PackedMatrix) -> np.ndarray:
    a, c = _scalars(pm)
    out = np.empty((pm.n_rows, pm.k_padded), np.float32)
    _dequantize(pm.fmt.fmt_id, pm.qs, a, c, pm.group, pm.fmt.bytes_per_group(pm.group), out)
    return out[:, : pm.k]


@njit(cache=True)
def _quantize_activations(x, k_padded, group, xq, xsum, scale):
    """Per-token absmax int8 (held as int16) and per-group sums; the same float ops as the reference."""
    n_tok, k = x.shape
    for t in range(n_tok):
        absmax = np.float32(0)
        for j in range(k):
            absmax = max(absmax, abs(x[t, j]))
        inv = np.float32(127) / absmax if absmax > 0 else np.float32(0)
        scale[t, :] = absmax / np.float32(127)
        for j in range(k):
            xq[t, j] = np.int16(min(max(np.rint(x[t, j] * inv), -127), 127))
        for j in range(k, k_padded):
            xq[t, j] = 0
        for g in range(k_padded // group):
            s = np.int32(0)
            for j in range(g * group, (g + 1) * group):
                s += np.int32(xq[t, j])
            xsum[t, g] = s


def prepare_activations_fast(x: np.ndarray, k_padded: int, group: int, act: str = "int8") -> Activations:
    """bitsweep.kernels.formats.prepare_activations, the per-token int8 mode in one compiled pass."""
    if act != "int8":
        return prepare_activations(x, k_padded, group, act)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_tok = x.shape[0]
    xq = np.empty((n_tok, k_padded), np.int16)
    xsum = np.empty((n_tok, k_padded // group), np.int32)
    scale = np.empty((n_tok, k_padded // group), np.float32)
    _quantize_activations(x, k_padded, group, xq, xsum, scale)
    return Activations(xq, xsum, scale, integer=True, per_token=True)


@njit(inline="always")
def _quantize_token(x, group, n_groups):
    """One token's int8 activations, per group: (1, k_padded) int16 codes, (1, n_groups) sums and scales."""
    k_padded = n_groups * group
    xq = np.zeros((1, k_padded), np.int16)
    xsum = np.empty((1, n_groups), np.int32)
    scale = np.empty((1, n_groups), np.float32)
    _quantize_activations(x.reshape(1, x.shape[0]), k_padded, group, xq, xsum, scale)
    return xq, xsum, scale


@njit(cache=True)
def _gemv_token(fmt, qs, a, c, group, bytes_per_group, index, uniform, x, out):
    """One token, int8 per-token activations: quantize, gather planes and multiply in a single compiled call
    (generation calls this once per Linear per token, where Python-side overhead would dominate)."""
    xq, xsum, scale = _quantize_token(x, group, a.shape[1])
    planes = _gather_planes(xq[0], index)
    if uniform:
        total = simd.sum_i32(xsum[0])
        _gemv_int_rows(fmt, qs, a, c, planes, total, scale[0, 0], out)
    else:
        _gemv_int(fmt, qs, a, c, group, bytes_per_group, planes, xsum[0], scale[0], out)


@njit(cache=True)
def _run_token(serial, uniform, plan, x, out):
    """linear_token's SIMD call: quantize one token (``x``, float32 ``(k,)``), gather its planes and multiply
    into ``out`` ``(n_rows,)``. False, having done nothing, where numba's thread count no longer matches
    ``serial``."""
    if _threads_moved(serial, plan.threads):
        return False
    xq, xsum, scale = _quantize_token(x, plan.group, plan.dB.shape[1])
    P = simd.gather_planes8(xq, plan.index)
    _product(serial, uniform, plan, P, xsum, scale, out.reshape((1, out.shape[0])))
    return True


def linear_token(pm: PackedMatrix, x: np.ndarray) -> np.ndarray:
    """``W @ x`` for one token with per-token int8 activations; the same numbers as ``gemv(pm, x, "int8")``."""
    x, out = _c_array(x, _F32, 1), np.empty(pm.n_rows, _F32)
    plans = pm.meta.get("_token_plans")
    if plans is None:
        plans = pm.meta["_token_plans"] = {}
    key = (_isa, _group_batches)
    call = plans.get(key)
    if call is None:
        uniform = pm.one_scale_per_row()
        if _isa == "portable":
            call = _portable_token_call(pm, uniform, x, out)
        else:
            call = _Call(_run_token, (uniform,), _kernel_plan(pm, uniform))
        plans[key] = call
    call(x, out)
    return out


def _portable_token_call(pm: PackedMatrix, uniform: bool, x: np.ndarray, out: np.ndarray):
    """linear_token on the portable kernels (their loops always go through numba's threads)."""
    a, c = _scalars(pm)
    args = (pm.fmt.fmt_id, pm.qs, a, c, pm.group, pm.fmt.bytes_per_group(pm.group), _plane_index(pm), uniform)
    entry = entry_point(_gemv_token, *args, x, out)
    return lambda x, out: entry(*args, x, out)

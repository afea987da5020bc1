"""Explicit-SIMD integer dot products for the packed formats, one instruction set chosen at run time.

The inner loops of the int8-activation kernels are numba intrinsics that emit LLVM IR calling the x86 dot-product
instructions by name (numba 0.68 / LLVM 22 does not find them in plain loops):

===============  ======  =====================================================================================
ISA              vector  multiply-add of unsigned codes x signed int8 activations
===============  ======  =====================================================================================
``avx512vnni``   512     ``vpdpbusd`` (AVX-512 VNNI): u8 x s8, four products summed into each int32 lane
``avx512bw``     512     ``vpmaddubsw`` -> int16 pairs, planes summed in int16, ``vpmaddwd`` by 1 -> int32
``avxvnni``      256     ``vpdpbusd`` (VEX-encoded AVX-VNNI)
``avx2``         256     ``vpmaddubsw`` + ``vpmaddwd`` as avx512bw
``portable``     -       the plain numba loops of bitsweep.kernels.fast (no intrinsics)
===============  ======  =====================================================================================

``vpmaddubsw`` / ``vpdpbusd`` multiply UNSIGNED bytes by SIGNED bytes: the codes (0..2, 0..15) are the unsigned
operand and the int8 activations (|x| <= 127) the signed one. No int16 sum here can saturate or wrap: one
``vpmaddubsw`` lane is at most 2 * 15 * 128 = 3840 (int4), and the int16 sums of a block of chunks are widened
to int32 (``vpmaddwd`` by 1) before they could reach 2**15 (:data:`BLOCK16`). ``vpdpbusd`` accumulates in int32.

Work per chunk of one vector of code bytes: one load, the planes decoded with shifts and masks (TQ1_0: digits by
byte adds and two compares, see :func:`_decode`), one multiply-add per plane. GEMM decodes each chunk once for
four tokens (:func:`span4`); per-group sums (affine formats, llama.cpp-style block scales) are written for a
task's rows at once and combined in float across those rows (vectorised over rows, each row's float order kept).
Per-group sums read the row in a sliced byte order (:func:`sliced_order`, made once per matrix by
bitsweep.kernels.fast): a batch of groups as many vectors as a group has 4-byte slices, one group per int32 lane.

Every integer sum is exact and the float combination stays in the reference's order (no fastmath), so all ISAs
give the same bits as bitsweep.kernels.formats. ``BITSWEEP_KERNEL_ISA`` (``auto`` or an ISA name) picks the path;
``auto`` takes the first of :data:`ISAS` that this CPU (``/proc/cpuinfo`` flags) and numba's target
(``NUMBA_CPU_FEATURES`` or the host's) both support.

Activations are gathered once per call into int8 "planes" ``(n_tokens, n_planes, row_bytes)``: ``planes[n, t, b]``
is the activation that code ``t`` of weight byte ``b`` meets (formats.plane_map, zero where none), so any span of
a row's bytes is a dot product against a few contiguous activation streams, at any vector width.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import NativeValue, intrinsic, models, register_model, typeof_impl, unbox

from bitsweep.kernels.formats import FMT_BINARY, FMT_INT2, FMT_INT3, FMT_INT4, FMT_TQ1, FMT_TQ2
from bitsweep.kernels.host import (  # noqa: F401 (re-exported: simd.ISAS, simd.select_isa, ...)
    CPU_FLAGS,
    ENV,
    ISAS,
    LLVM_FEATURES,
    NO_PREFETCH,
    PREFETCH_BATCH,
    PREFETCH_ENV,
    PREFETCH_GEMV_L1,
    PREFETCH_GEMV_L2,
    SIMD_FLAGS,
    available_isas,
    cpu_flags,
    cpu_vendor,
    cpuinfo,
    llvm_features,
    select_isa,
    software_prefetch,
)

WIDTH = {"avx512vnni": 64, "avx512bw": 64, "avxvnni": 32, "avx2": 32}  # bytes per vector
VNNI = {"avx512vnni", "avxvnni"}


# ---------------------------------------------------------------------------------------------------------------
# LLVM IR of one span: sum over bytes b in [o, e) of a row and over planes t of code_t(row[b]) * planes[n, t, b]

I8, I16, I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
llvm.initialize_native_asmparser()  # inline assembly (:func:`_times3`); numba sets up only the printer
# LLVM 22 declares vpdpbusd's byte operands as <N x i8>; before that, as <N/4 x i32>.
_DPBUSD_BYTES = llvm.llvm_version_info[0] >= 22

# How each format's bytes decode: 2-bit planes, 1-bit planes, 4-bit planes, base-3 digits, int3's two parts
KIND = {FMT_TQ2: "2", FMT_INT2: "2", FMT_TQ1: "t", FMT_BINARY: "1", FMT_INT4: "4", FMT_INT3: "3"}
PLANES = {"2": 4, "1": 8, "1x4": 8, "4": 2, "t": 5}  # code planes per byte ("1x4": int3's high bit, times 4)
# Chunks whose int16 sums may add up before widening: one chunk adds at most planes * 2 * max_code * 128 to a
# lane (2: 3072, 1: 2048, 1x4: 8192, 4: 7680, t: 2560) and the total must stay below 2**15.
BLOCK16 = {"2": 10, "1": 15, "1x4": 3, "4": 4, "t": 12}
MAX_ACCUMULATORS = 16  # vector accumulators per span (of AVX-512's 32 registers), shared by its tokens


def prefetch_distance(ntok: int, gemv_prefetch: tuple[int, int]) -> tuple[int, int]:
    """``(bytes ahead, cache level)`` a kernel for ``ntok`` tokens per pass prefetches its weights with, (0, 0) for
    none: one token as ``gemv_prefetch`` (:func:`software_prefetch`), batches always :data:`PREFETCH_BATCH`."""
    return gemv_prefetch if ntok == 1 else PREFETCH_BATCH


def _splat(ty, value):
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [ir.Constant(ty.element, value)] * ty.count)
    return ir.Constant(ty, value)


# Bits per code of the kinds whose planes a VNNI span can leave in place (:func:`_masked_planes`).
MASKED_BITS = {"2": 2, "1": 1, "4": 4}


def masked_span_bytes(isa: str, kind: str) -> int:
    """The longest span (bytes) whose masked planes cannot overflow an int32 lane: plane t's bytes reach
    ``(2**bits - 1) * 2**(bits * t)`` (192 for 2-bit codes, 240 for 4-bit, 128 for 1-bit), each vpdpbusd adds four
    products with activations of at most 128 in magnitude to a lane, and a lane must stay below 2**31 (700 KB of
    2-bit codes with 256-bit vectors, 1.4 MB with 512-bit ones: rows far longer than any model's)."""
    bits = MASKED_BITS[kind]
    top = ((1 << bits) - 1) << (8 - bits)
    return (2**31 - 1) // (4 * top * 128) * WIDTH[isa]


def _plane_masks(builder, ty, kind):
    """The masks of :func:`_masked_planes` (``mask << bits * t`` per plane t) for vectors of type ``ty``, made
    opaque to LLVM (an empty inline assembly block passes each through a register): as constants, LLVM reloaded
    them from memory inside the loop, one more load per 64 bytes next to five, where the Zen 4 host issues one
    512-bit load per cycle: the 4096^2 TQ2_0 GEMV cache-resident 144-157 us with the reloads, 125-138 without
    (alternated, same session)."""
    bits = MASKED_BITS[kind]
    opaque = ir.InlineAsm(ir.FunctionType(ty, [ty]), "", "=v,0")
    return [builder.call(opaque, [_splat(ty, ((1 << bits) - 1) << (bits * t))]) for t in range(8 // bits)]


def _masked_planes(builder, v, masks):
    """Code planes of bytes ``v`` left in place, ``v & masks[t]`` (:func:`_plane_masks`): plane t is the codes times
    ``2**(bits * t)``. One AND each instead of a shift and an AND (LLVM lowers a byte shift to
    ``vgf2p8affineqb``, which competes with ``vpdpbusd`` for the Zen 4 host's two vector multiply pipes; the
    one-token TQ2_0 GEMV cache-resident 1.27x as fast). vpdpbusd takes them as unsigned bytes, so each plane's
    sums are the true ones times ``2**(bits * t)`` exactly; :func:`_fold` shifts them back (exact: every term is a
    multiple). Only for VNNI: pmaddubsw's int16 pair sums would saturate."""
    return [builder.and_(v, m) for m in masks]


def _decode(builder, v, kind):
    """The code planes of bytes ``v`` (i8 or <w x i8>), as bytes of the same type."""
    ty = v.type
    if kind in ("2", "1", "1x4", "4"):
        bits = {"2": 2, "1": 1, "1x4": 1, "4": 4}[kind]
        mask = (1 << bits) - 1
        out = []
        for t in range(8 // bits):
            q = builder.lshr(v, _splat(ty, bits * t)) if t else v
            if bits * (t + 1) < 8:
                q = builder.and_(q, _splat(ty, mask))
            if kind == "1x4":
                q = builder.shl(q, _splat(ty, 2))  # int3's high bit weighs 4
            out.append(q)
        return out
    # TQ1_0 digit i of byte q: ((q * 3^i mod 256) * 3) >> 8, and for m in 0..255 (m * 3) >> 8 equals
    # (m >= 86) + (m >= 171): two byte compares instead of widening to 16 bits.
    out, m = [], v
    for t in range(5):
        if t:
            m = _times3(builder, m)  # wrapping mod 256 as the format wants
        ge1 = builder.zext(builder.icmp_unsigned(">=", m, _splat(ty, 86)), ty)
        ge2 = builder.zext(builder.icmp_unsigned(">=", m, _splat(ty, 171)), ty)
        out.append(builder.add(ge1, ge2))
    return out


def _trit_multiples(builder, v):
    """``m_0 .. m_5`` of TQ1_0 bytes ``v``: ``m_t = v * 3^t mod 256`` (bytes), each three times the last, wrapping.

    Digit t is ``(3 m_t) >> 8`` (:func:`_decode`), so ``3 m_t = 256 d_t + m_{t+1}`` exactly, and for activations
    ``x_t`` (a one-token span on VNNI, :func:`_emit_span`):

        sum_t d_t x_t = (3 * sum_t m_t x_t - sum_t m_{t+1} x_t) / 256

    in every int32 lane of ``vpdpbusd`` (u8 x s8, no saturation), exactly: the true value fits, so wrapping int32
    sums give it. Ten multiply-adds on the bytes as they are instead of five on decoded digits, each of which cost
    two compares, two mask-to-vector moves and an add: on the Zen 4 host multiply-adds are the cheaper half."""
    out = [v]
    for _ in range(5):
        out.append(_times3(builder, out[-1]))
    return out


def _times3(builder, m):
    """``3 m`` mod 256 of bytes ``m``: two byte adds. For vectors as inline assembly, which LLVM cannot fold:
    it turns ``(m + m) + m`` into a byte multiply, and the chain of them into multiplies by 9, 27, 81, 243, each
    lowered to ``vpmaddubsw`` + ``vpmullw`` + ``vpermt2b`` (x86 has no byte multiply): 13 vector operations for
    the five multiples instead of 10, as many as the span's ten ``vpdpbusd`` on the Zen 4 host, whose vector
    pipes both share."""
    if not isinstance(m.type, ir.VectorType):
        return builder.add(builder.add(m, m), m)
    # AT&T operand order: $0 = $1 + $1, then $0 = $0 + $1 ($0 early-clobbered: written before $1 is last read)
    asm = ir.InlineAsm(ir.FunctionType(m.type, [m.type]), "vpaddb $1, $1, $0\n\tvpaddb $1, $0, $0", "=&v,v")
    return builder.call(asm, [m])


def _declare(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _madd_chunk(builder, isa, w, acc, codes, xs):
    """acc (<w/4 x i32>) + sum_t codes[t] . xs[t] (each <w x i8>), grouped by 4 bytes per lane."""
    v16 = ir.VectorType(I16, w // 2)
    if isa in VNNI:
        for q, x in zip(codes, xs, strict=True):
            acc = _dpbusd(builder, acc, q, x)
        return acc
    return _widen(builder, w, acc, _madd16(builder, w, ir.Constant(v16, None), codes, xs))


def _dpbusd(builder, acc, q, x):
    """``acc + vpdpbusd(q, x)``: unsigned bytes ``q`` times signed bytes ``x`` (``<w x i8>``, w 16, 32 or 64), four
    adjacent products per int32 lane of ``acc`` (the intrinsic's byte operands typed as in this LLVM)."""
    v8, v32 = q.type, acc.type
    name = f"llvm.x86.avx512.vpdpbusd.{8 * v8.count}"
    if _DPBUSD_BYTES:
        return builder.call(_declare(builder, name, v32, [v32, v8, v8]), [acc, q, x])
    fn = _declare(builder, name, v32, [v32, v32, v32])
    return builder.call(fn, [acc, builder.bitcast(q, v32), builder.bitcast(x, v32)])


def _madd16(builder, w, p16, codes, xs):
    """p16 (<w/2 x i16>) + sum_t pmaddubsw(codes[t], xs[t])."""
    v8, v16 = ir.VectorType(I8, w), ir.VectorType(I16, w // 2)
    name = {16: "llvm.x86.ssse3.pmadd.ub.sw.128", 32: "llvm.x86.avx2.pmadd.ub.sw",
            64: "llvm.x86.avx512.pmaddubs.w.512"}[w]  # fmt: skip
    fn = _declare(builder, name, v16, [v8, v8])
    for q, x in zip(codes, xs, strict=True):
        p16 = builder.add(p16, builder.call(fn, [q, x]))
    return p16


def _widen(builder, w, acc, p16):
    """acc (<w/4 x i32>) + pmaddwd(p16, 1): adjacent int16 pairs summed into int32."""
    v16, v32 = ir.VectorType(I16, w // 2), ir.VectorType(I32, w // 4)
    name = {16: "llvm.x86.sse2.pmadd.wd", 32: "llvm.x86.avx2.pmadd.wd", 64: "llvm.x86.avx512.pmaddw.d.512"}[w]
    fn = _declare(builder, name, v32, [v16, v16])
    return builder.add(acc, builder.call(fn, [p16, _splat(v16, 1)]))


def _hsum(builder, v):
    fn = _declare(builder, f"llvm.vector.reduce.add.v{v.type.count}i32", I32, [v.type])
    return builder.call(fn, [v])


def _load(builder, base, off, ty):
    ptr = builder.gep(base, [off])
    return builder.load(builder.bitcast(ptr, ty.as_pointer()), align=1)


def _prefetch(builder, ptr, level=1):
    """A read prefetch of the line at ``ptr`` into cache ``level`` (1: L1, LLVM locality 3, ``prefetcht0``; 2: L2,
    locality 2, ``prefetcht1``)."""
    fn = _declare(builder, "llvm.prefetch.p0", ir.VoidType(), [ptr.type, I32, I32, I32])
    builder.call(fn, [ptr, ir.Constant(I32, 0), ir.Constant(I32, 4 - level), ir.Constant(I32, 1)])


def _emit_span(builder, isa, kind, rowp, plane_ptrs, o, e, long=True, prefetch=NO_PREFETCH):
    """int32 sums over bytes [o, e) for each token of ``plane_ptrs`` (``[token][plane]``: i8 pointers to the
    planes' column 0). Full vectors in a loop, then at most one of each narrower width, then single bytes."""
    if (
        kind == "3"
    ):  # int3: the low two bits' bytes (group / 4 of the span's 3 * group / 8), then the high bit's
        m = builder.add(
            o, builder.udiv(builder.mul(builder.sub(e, o), ir.Constant(o.type, 2)), ir.Constant(o.type, 3))
        )
        low = _emit_span(builder, isa, "2", rowp, plane_ptrs, o, m, long, prefetch)
        high = _emit_span(builder, isa, "1x4", rowp, plane_ptrs, m, e, long, prefetch)
        return [builder.add(a, b) for a, b in zip(low, high, strict=True)]
    ntok = len(plane_ptrs)
    intp = o.type
    width = WIDTH[isa]
    vnni = isa in VNNI
    v32 = ir.VectorType(I32, width // 4)
    v16 = ir.VectorType(I16, width // 2)

    def products(w, at, masked=False):
        """Per token, the int16 (or with VNNI, the int32 += ) terms of one chunk of w bytes at ``at``."""
        v8 = ir.VectorType(I8, w)
        v = _load(builder, rowp, at, v8)
        codes = _masked_planes(builder, v, masks) if masked else _decode(builder, v, kind)
        return codes, [[_load(builder, p, at, v8) for p in plane_ptrs[n][: len(codes)]] for n in range(ntok)]

    def const(value):
        return ir.Constant(intp, value)

    n_chunks = builder.udiv(builder.sub(e, o), const(width))
    ahead, level = prefetch_distance(ntok, prefetch)
    if vnni and kind == "t" and ntok == 1:
        return _emit_trit_span(builder, isa, rowp, plane_ptrs, o, e, n_chunks, ahead, level, products)
    # With VNNI each plane's vpdpbusd would wait for the previous one's result (5 cycles of latency, one issued per
    # cycle): plane t of token n goes to accumulator t % n_acc of that token instead, summed after the loop.
    n_acc = min(PLANES[kind], max(1, MAX_ACCUMULATORS // ntok)) if vnni else 1
    # A whole row for one token, each plane with an accumulator of its own: the codes can stay in place
    # (:func:`_masked_planes`). Not for passes of several tokens, whose decode is shared and whose registers the
    # masks would take (TQ2_0 and int2 batches of 32, L2-resident, 1.25x and 1.45x the time), nor for a group's
    # few chunks (the masks made again for each group: an int2_g128 GEMV 1.3x the time), nor in group batches.
    masked = vnni and long and ntok == 1 and kind in MASKED_BITS and n_acc == PLANES[kind]
    shifts = [MASKED_BITS[kind] * t for t in range(n_acc)] if masked else None
    masks = _plane_masks(builder, ir.VectorType(I8, width), kind) if masked else None
    lanes = [
        [cgutils.alloca_once_value(builder, ir.Constant(v32, None)) for _ in range(n_acc)]
        for _ in range(ntok)
    ]
    accs = [lane[0] for lane in lanes]
    # Without VNNI, the int16 sums of up to `block` chunks are widened at once (no lane can overflow, BLOCK16):
    # whole blocks (a constant trip count, which LLVM unrolls), then one partial block.
    block = 1 if vnni else BLOCK16[kind]

    def run_block(first, count):
        start = builder.add(o, builder.mul(first, const(width)))
        if ahead:
            _prefetch(builder, builder.gep(rowp, [builder.add(start, const(ahead))]), level)
        if vnni:
            codes, xs = products(width, start, masked)
            for n in range(ntok):
                for a in range(n_acc):
                    acc = lanes[n][a]
                    mine = slice(a, None, n_acc)
                    builder.store(
                        _madd_chunk(builder, isa, width, builder.load(acc), codes[mine], xs[n][mine]), acc
                    )
            return
        p16 = [cgutils.alloca_once_value(builder, ir.Constant(v16, None)) for _ in range(ntok)]
        for n in range(ntok):
            builder.store(ir.Constant(v16, None), p16[n])
        with cgutils.for_range(builder, count) as inner:
            at = builder.add(start, builder.mul(inner.index, const(width)))
            if ahead and width * block > 64:
                _prefetch(builder, builder.gep(rowp, [builder.add(at, const(ahead))]), level)
            codes, xs = products(width, at)
            for n in range(ntok):
                builder.store(_madd16(builder, width, builder.load(p16[n]), codes, xs[n]), p16[n])
        for n in range(ntok):
            builder.store(_widen(builder, width, builder.load(accs[n]), builder.load(p16[n])), accs[n])

    if not long:  # a group's few chunks: blocks of min(block, what is left)
        with cgutils.for_range(
            builder, builder.udiv(builder.add(n_chunks, const(block - 1)), const(block))
        ) as outer:
            first = builder.mul(outer.index, const(block))
            left = builder.sub(n_chunks, first)
            run_block(first, builder.select(builder.icmp_signed("<", left, const(block)), left, const(block)))
        return _emit_tail(
            builder, isa, kind, rowp, plane_ptrs, o, e, _fold(builder, lanes, shifts), n_chunks, products
        )
    n_blocks = builder.udiv(n_chunks, const(block))
    with cgutils.for_range(builder, n_blocks) as outer:
        run_block(builder.mul(outer.index, const(block)), const(block))
    if block > 1:
        done = builder.mul(n_blocks, const(block))
        left = builder.sub(n_chunks, done)
        with builder.if_then(builder.icmp_signed(">", left, const(0))):
            run_block(done, left)
    return _emit_tail(
        builder, isa, kind, rowp, plane_ptrs, o, e, _fold(builder, lanes, shifts), n_chunks, products
    )


def _emit_trit_span(builder, isa, rowp, plane_ptrs, o, e, n_chunks, ahead, level, products):
    """A one-token TQ1_0 span on VNNI through :func:`_trit_multiples`' identity: per chunk, ``A += m_t . x_t`` and
    ``B += m_{t+1} . x_t`` for the five digits (a chain each: one would wait on vpdpbusd's latency), then each
    lane's ``(3A - B) >> 8``; the bytes after the last full vector as :func:`_emit_tail` does."""
    width, digits = WIDTH[isa], PLANES["t"]
    v8, v32 = ir.VectorType(I8, width), ir.VectorType(I32, width // 4)
    # A_t and B_t of each digit in a chain of its own: ten vpdpbusd per chunk, one per chain, none waiting on
    # another's latency (with two chains each for A and B, one had three per chunk: 15 cycles of latency for 10 of
    # throughput; the 4096^2 GEMV cache-resident 3% slower on the Zen 4 host)
    accs = [cgutils.alloca_once_value(builder, ir.Constant(v32, None)) for _ in range(2 * digits)]
    with cgutils.for_range(builder, n_chunks) as loop:
        at = builder.add(o, builder.mul(loop.index, ir.Constant(o.type, width)))
        if ahead:
            _prefetch(builder, builder.gep(rowp, [builder.add(at, ir.Constant(o.type, ahead))]), level)
        ms = _trit_multiples(builder, _load(builder, rowp, at, v8))
        for t in range(digits):
            x = _load(builder, plane_ptrs[0][t], at, v8)
            for acc, m in ((accs[t], ms[t]), (accs[digits + t], ms[t + 1])):
                builder.store(_dpbusd(builder, builder.load(acc), m, x), acc)
    a, b = (
        _tree_sum(builder, [builder.load(acc) for acc in part]) for part in (accs[:digits], accs[digits:])
    )
    lanes = builder.ashr(builder.sub(builder.mul(a, _splat(v32, 3)), b), _splat(v32, 8))
    builder.store(lanes, accs[0])
    return _emit_tail(builder, isa, "t", rowp, plane_ptrs, o, e, [accs[0]], n_chunks, products)


def _tree_sum(builder, values):
    """The (wrapping, so any order gives the same bits) sum of ``values`` as a balanced tree of adds."""
    while len(values) > 1:
        values = [builder.add(*values[i : i + 2]) if i + 1 < len(values) else values[i]
                  for i in range(0, len(values), 2)]  # fmt: skip
    return values[0]


def _fold(builder, lanes, shifts=None):
    """Each token's accumulators (``lanes[n]``) added into its first one; the first ones returned. ``shifts``: an
    arithmetic right shift per accumulator first (masked planes, :func:`_masked_planes`)."""
    for lane in lanes:
        if len(lane) == 1 and shifts is None:
            continue
        values = [builder.load(acc) for acc in lane]
        if shifts is not None:
            values = [
                builder.ashr(v, _splat(v.type, k)) if k else v for v, k in zip(values, shifts, strict=True)
            ]
        builder.store(_tree_sum(builder, values), lane[0])
    return [lane[0] for lane in lanes]


def _emit_tail(builder, isa, kind, rowp, plane_ptrs, o, e, accs, n_chunks, products):
    """Reduce the vector accumulators, then the bytes after the last full vector: at most one vector of each
    narrower width, then single bytes."""
    ntok, intp, width = len(plane_ptrs), o.type, WIDTH[isa]

    def const(value):
        return ir.Constant(intp, value)

    pos = cgutils.alloca_once_value(builder, builder.add(o, builder.mul(n_chunks, const(width))))
    totals = [cgutils.alloca_once_value(builder, _hsum(builder, builder.load(a))) for a in accs]
    w = width // 2
    while w >= 16:
        at = builder.load(pos)
        with builder.if_then(builder.icmp_signed(">=", builder.sub(e, at), const(w))):
            codes, xs = products(w, at)
            zero = ir.Constant(ir.VectorType(I32, w // 4), None)
            for n in range(ntok):
                part = _hsum(builder, _madd_chunk(builder, isa, w, zero, codes, xs[n]))
                builder.store(builder.add(builder.load(totals[n]), part), totals[n])
            builder.store(builder.add(at, const(w)), pos)
        w //= 2
    start = builder.load(pos)
    with cgutils.for_range(builder, builder.sub(e, start)) as loop:
        at = builder.add(start, loop.index)
        codes = [builder.zext(q, I32) for q in _decode(builder, builder.load(builder.gep(rowp, [at])), kind)]
        for n in range(ntok):
            s = builder.load(totals[n])
            for q, p in zip(codes, plane_ptrs[n][: len(codes)], strict=True):
                s = builder.add(s, builder.mul(q, builder.sext(builder.load(builder.gep(p, [at])), I32)))
            builder.store(s, totals[n])
    return [builder.load(t) for t in totals]


def batched_groups(isa: str, kind: str, bpg: int) -> bool:
    """Whether groups of ``bpg`` bytes are summed in batches: a power of two from 16 bytes (one 128-bit vector) to
    8 vectors of the ISA (a batch's ``bpg / 4`` vectors are unrolled code; longer groups are few per row and
    amortise one horizontal sum each); int3's split groups never."""
    return kind != "3" and bpg >= 16 and bpg & (bpg - 1) == 0 and bpg <= 8 * WIDTH[isa]


def batch_widths(isa: str, bpg: int) -> tuple[int, ...]:
    """Vector widths (bytes) of the group batches, widest first: the ISA's full width, then, where groups are
    shorter than a vector, the group's own width for the groups left after the full batches."""
    return (WIDTH[isa],) if bpg >= WIDTH[isa] else (WIDTH[isa], bpg)


def batch_lanes(width: int) -> int:
    """Groups per batch of vectors ``width`` bytes wide: their int32 lanes."""
    return width // 4


def sliced_order(isa: str, bpg: int, n_groups: int) -> np.ndarray:
    """The kernels' byte order for a row whose groups are summed in batches: ``order[j]`` is the stored byte (of a
    row of ``n_groups`` groups, ``bpg`` bytes each) at kernel position ``j``.

    Each batch of ``lanes`` groups (per vector width of :func:`batch_widths`, in turn) is laid out as ``bpg / 4``
    vectors, vector ``s`` holding bytes ``4s .. 4s+3`` of every group of the batch in turn; groups after the last
    whole batch keep their stored order. A multiply-add sums four adjacent bytes' products into one int32 lane,
    so lane ``j`` of a batch's summed vectors is group ``j``'s sum: no horizontal sum and no shuffle per group.
    (In stored order a group fills whole vectors, and 16 of them reduced to one vector of sums took 15 two-source
    shuffle merges per token, as many shuffles as multiply-adds for int4: a batch-8 int4_g128 GEMM ran 2.5x the
    time of a TQ2_0 one with one scale per row.) The activation planes follow the same order
    (``plane_map(...)[:, order]``), so every integer sum is unchanged."""
    parts, g = [], 0
    for w in batch_widths(isa, bpg):
        lanes = batch_lanes(w)
        n_batches = (n_groups - g) // lanes
        groups = g + np.arange(n_batches * lanes).reshape(n_batches, 1, lanes, 1)
        # (batch, slice, lane, byte): the stored byte group * bpg + 4 * slice + byte
        src = groups * bpg + np.arange(0, bpg, 4).reshape(1, -1, 1, 1) + np.arange(4).reshape(1, 1, 1, 4)
        parts.append(src.reshape(-1))
        g += n_batches * lanes
    parts.append(np.arange(g * bpg, n_groups * bpg))
    return np.concatenate(parts)


def _emit_group_batches(
    builder, isa, kind, bpg, w, rowp, plane_ptrs, first, n_groups, store, store_batch, prefetch
):
    """Group sums of one row from group ``first`` on, ``lanes = w / 4`` groups at a time, in the sliced byte
    order of :func:`sliced_order`: a batch is ``bpg / 4`` vectors of ``w`` bytes whose products, summed, hold
    group ``j`` of the batch in int32 lane ``j``. Integer sums, so the same values as one span per group. Each
    token's batch goes to ``store_batch(n, g0, vector)`` where given, else lane by lane to ``store(n, g, sum)``.
    Returns the index of the first group not done (whole batches only: a partial batch would cost a whole one)."""
    ntok, intp = len(plane_ptrs), n_groups.type
    lanes, slices = batch_lanes(w), bpg // 4
    v8, v16, v32 = ir.VectorType(I8, w), ir.VectorType(I16, w // 2), ir.VectorType(I32, lanes)
    block = BLOCK16[kind]  # slices whose int16 sums may add up before widening (non-VNNI)
    ahead, level = prefetch_distance(ntok, prefetch)

    def const(value):
        return ir.Constant(intp, value)

    # vpdpbusd's accumulator is also an input (5 cycles' latency): one chain per token through a batch's
    # slices x planes would wait on itself, so each token sums its slices into several chains, added at the end.
    chains = max(1, min(slices, MAX_ACCUMULATORS // ntok)) if isa in VNNI else 1

    def batch(g0):
        accs = [[ir.Constant(v32, None)] * chains for _ in range(ntok)]
        p16 = [ir.Constant(v16, None)] * ntok
        for c in range(slices):
            at = builder.add(builder.mul(g0, const(bpg)), const(c * w))
            # once per cache line (twice for 32-byte vectors: cheaper than a branch)
            if ahead and (c * w) % 64 == 0:
                _prefetch(builder, builder.gep(rowp, [builder.add(at, const(ahead))]), level)
            codes = _decode(builder, _load(builder, rowp, at, v8), kind)
            for n in range(ntok):
                xs = [_load(builder, p, at, v8) for p in plane_ptrs[n][: len(codes)]]
                if isa in VNNI:
                    accs[n][c % chains] = _madd_chunk(builder, isa, w, accs[n][c % chains], codes, xs)
                    continue
                p16[n] = _madd16(builder, w, p16[n], codes, xs)
                if (c + 1) % block == 0 or c == slices - 1:
                    accs[n][0], p16[n] = _widen(builder, w, accs[n][0], p16[n]), ir.Constant(v16, None)
        for n in range(ntok):
            total = _tree_sum(builder, accs[n])
            if store_batch is not None:
                store_batch(n, g0, total)
                continue
            for j in range(lanes):
                store(n, builder.add(g0, const(j)), builder.extract_element(total, ir.Constant(I32, j)))

    full = builder.udiv(builder.sub(n_groups, first), const(lanes))
    with cgutils.for_range(builder, full) as loop:
        batch(builder.add(first, builder.mul(loop.index, const(lanes))))
    return builder.add(first, builder.mul(full, const(lanes)))


class Kern:
    """An (instruction set, code kind, bytes per group, GEMV prefetch) tuple; numba compiles each kernel once per
    tuple (see KernType). ``bpg`` 0: the group size is only known at run time (no batched group sums);
    ``prefetch``: ``(bytes ahead, cache level)`` of one-token passes (:func:`software_prefetch`)."""

    def __init__(self, isa: str, fmt_id: int, bpg: int = 0, prefetch: tuple[int, int] = NO_PREFETCH) -> None:
        if isa not in WIDTH:
            raise ValueError(f"no SIMD kernels for {isa!r}")
        self.isa, self.kind, self.bpg, self.prefetch = isa, KIND[fmt_id], bpg, tuple(prefetch)

    def __repr__(self) -> str:
        return f"Kern({self.isa!r}, {self.kind!r}, {self.bpg}, {self.prefetch})"


class KernType(types.Type):
    def __init__(self, isa: str, kind: str, bpg: int = 0, prefetch: tuple[int, int] = NO_PREFETCH) -> None:
        self.isa, self.kind, self.bpg, self.prefetch = isa, kind, bpg, prefetch
        super().__init__(name=f"Kern({isa}, {kind}, {bpg}, prefetch {prefetch[0]} L{prefetch[1]})")


@typeof_impl.register(Kern)
def _typeof_kern(val, c):
    return KernType(val.isa, val.kind, val.bpg, val.prefetch)


register_model(KernType)(models.OpaqueModel)


@unbox(KernType)
def _unbox_kern(typ, obj, c):
    return NativeValue(c.context.get_dummy_value())


def _make_span(ntok: int):
    @intrinsic
    def span(typingctx, kern, qs, i, planes, tok, o, e):
        """int32 sum (a tuple of ``ntok`` with tokens tok..tok+ntok-1) over bytes [o, e) of row ``i`` of ``qs`` (uint8
        2-D, unit inner stride) of code times ``planes[tok, :, b]`` (int8 3-D, unit inner stride). int3 spans
        must be whole groups."""
        if not isinstance(kern, KernType) or not isinstance(planes, types.Array) or planes.ndim != 3:
            return None
        ret = types.int32 if ntok == 1 else types.UniTuple(types.int32, ntok)
        sig = ret(kern, qs, i, planes, tok, o, e)

        def codegen(context, builder, sig, args):
            qa = context.make_array(sig.args[1])(context, builder, args[1])
            pla = context.make_array(sig.args[3])(context, builder, args[3])
            i_, tok_, o_, e_ = (context.cast(builder, args[k], sig.args[k], types.intp) for k in (2, 4, 5, 6))
            q0, _ = cgutils.unpack_tuple(builder, qa.strides, 2)
            kind = sig.args[0].kind
            ptrs = _plane_pointers(builder, pla, tok_, 8 if kind == "3" else PLANES[kind], ntok)
            rowp = builder.gep(builder.bitcast(qa.data, I8.as_pointer()), [builder.mul(i_, q0)])
            kern = sig.args[0]
            sums = _emit_span(builder, kern.isa, kern.kind, rowp, ptrs, o_, e_, prefetch=kern.prefetch)
            return sums[0] if ntok == 1 else context.make_tuple(builder, sig.return_type, sums)

        return sig, codegen

    return span


span = _make_span(1)
span4 = _make_span(4)


def _plane_pointers(builder, pla, tok, n_planes, ntok):
    s0, s1, _ = cgutils.unpack_tuple(builder, pla.strides, 3)
    base = builder.bitcast(pla.data, I8.as_pointer())

    def at(n, t):
        return builder.add(builder.mul(builder.add(tok, ir.Constant(tok.type, n)), s0),
                           builder.mul(ir.Constant(tok.type, t), s1))  # fmt: skip

    return [[builder.gep(base, [at(n, t)]) for t in range(n_planes)] for n in range(ntok)]


def _make_group_sums(ntok: int):
    @intrinsic
    def group_sums(typingctx, kern, qs, i, planes, tok, bpg, sums, slot, col):
        """For every group g of row ``i`` of ``qs`` (``bpg`` bytes each) and token tok + n, n < ntok: the int32
        sum of code times activation, stored in ``sums[slot + n, g, col]`` (int32 3-D). Nothing returned. Where the
        kernel's compile-time group size allows it (:func:`batched_groups`), groups are summed a batch at a time
        (:func:`_emit_group_batches`), else one span per group."""
        if not isinstance(kern, KernType) or not isinstance(sums, types.Array) or sums.ndim != 3:
            return None
        if sums.layout != "C":
            return None
        sig = types.none(kern, qs, i, planes, tok, bpg, sums, slot, col)

        def codegen(context, builder, sig, args):
            qa = context.make_array(sig.args[1])(context, builder, args[1])
            pla = context.make_array(sig.args[3])(context, builder, args[3])
            sa = context.make_array(sig.args[6])(context, builder, args[6])
            i_, tok_, bpg_, slot_, col_ = (
                context.cast(builder, args[k], sig.args[k], types.intp) for k in (2, 4, 5, 7, 8)
            )
            q0, _ = cgutils.unpack_tuple(builder, qa.strides, 2)
            kind = sig.args[0].kind
            ptrs = _plane_pointers(builder, pla, tok_, 8 if kind == "3" else PLANES[kind], ntok)
            rowp = builder.gep(builder.bitcast(qa.data, I8.as_pointer()), [builder.mul(i_, q0)])
            _, n_groups, _ = cgutils.unpack_tuple(builder, sa.shape, 3)
            t0, t1, t2 = cgutils.unpack_tuple(builder, sa.strides, 3)
            sbase = builder.bitcast(sa.data, I8.as_pointer())

            def at(n, g):
                """Byte offset of ``sums[slot + n, g, 0]``."""
                return builder.add(
                    builder.mul(builder.add(slot_, ir.Constant(slot_.type, n)), t0), builder.mul(g, t1)
                )

            def store(n, g, s):
                off = builder.add(at(n, g), builder.mul(col_, t2))
                builder.store(s, builder.bitcast(builder.gep(sbase, [off]), I32.as_pointer()))

            def store_batch(n, g0, v):
                """Row ``col``'s sums of groups g0..g0+15 as one vector: ``sums[slot + n, g0 + col, :]``."""
                off = at(n, builder.add(g0, col_))
                builder.store(v, builder.bitcast(builder.gep(sbase, [off]), v.type.as_pointer()), align=4)

            isa, bpg, prefetch = sig.args[0].isa, sig.args[0].bpg, sig.args[0].prefetch

            def spans(first):
                """One span per group from group ``first`` on."""
                with cgutils.for_range(builder, builder.sub(n_groups, first)) as loop:
                    g = builder.add(first, loop.index)
                    o = builder.mul(g, bpg_)
                    sums_g = _emit_span(
                        builder, isa, kind, rowp, ptrs, o, builder.add(o, bpg_), long=False, prefetch=prefetch
                    )
                    for n, s in enumerate(sums_g):
                        store(n, g, s)

            done = ir.Constant(n_groups.type, 0)
            if batched_groups(isa, kind, bpg):
                for w in batch_widths(isa, bpg):
                    whole = row_blocks(isa, kind, bpg) and batch_lanes(w) == ROWS_PER_TASK
                    done = _emit_group_batches(builder, isa, kind, bpg, w, rowp, ptrs, done, n_groups, store,
                                               store_batch if whole else None, prefetch)  # fmt: skip
            spans(done)
            return context.get_dummy_value()

        return sig, codegen

    return group_sums


group_sums = _make_group_sums(1)
group_sums4 = _make_group_sums(4)


def row_blocks(isa: str, kind: str, bpg: int) -> bool:
    """Whether :func:`group_sums` leaves its full batches as row blocks (see :func:`transpose_blocks`): where a
    batch holds as many groups as a task has rows (16 on AVX-512), so a block is square."""
    return batched_groups(isa, kind, bpg) and batch_lanes(WIDTH[isa]) == ROWS_PER_TASK


def _transpose(builder, rows):
    """The transpose of a square block of vectors (``rows[r]`` lane ``c`` -> ``out[c]`` lane ``r``), ``n`` a power
    of two: for each bit b of the index, element (r, c) trades places with (r ^ b, c ^ b) where r's and c's bits
    differ, one two-source shuffle per vector and bit (swapping bit b of the row and column index, bit by bit,
    swaps the indices): 4 x 16 shuffles for 16 x 16 int32, against 256 lane extracts and stores."""
    n = len(rows)
    rows = list(rows)
    b = 1
    while b < n:
        for r in range(n):
            if r & b:
                continue
            lo, hi = rows[r], rows[r | b]
            # new lo[c] = lo[c] where c & b == 0, else hi[c ^ b]; new hi[c] = lo[c ^ b] where c & b == 0, else hi[c]
            to_lo = ir.Constant(ir.VectorType(I32, n), [n + (c ^ b) if c & b else c for c in range(n)])
            to_hi = ir.Constant(ir.VectorType(I32, n), [n + c if c & b else c ^ b for c in range(n)])
            rows[r], rows[r | b] = (
                builder.shuffle_vector(lo, hi, to_lo),
                builder.shuffle_vector(lo, hi, to_hi),
            )
        b *= 2
    return rows


@intrinsic
def transpose_blocks(typingctx, kern, sums, slot):
    """Put the row blocks that :func:`group_sums` leaves in ``sums[slot]`` (where :func:`row_blocks`) in the
    layout of its other sums, ``sums[slot, g, r]``: it stores a full batch of 16 groups of row r as one vector,
    ``sums[slot, g0 + r, :]`` (one store instead of 16 lane extracts and stores, about as many operations as the
    batch's multiply-adds for int4), so each 16 x 16 block ``sums[slot, g0:g0 + 16, :]`` is transposed here in
    place. Rows a task lacks are garbage in and out and never read. No code for other kernels."""
    if not isinstance(kern, KernType) or not isinstance(sums, types.Array):
        return None
    if sums.ndim != 3 or sums.layout != "C":
        return None
    sig = types.none(kern, sums, slot)

    def codegen(context, builder, sig, args):
        k = sig.args[0]
        if not row_blocks(k.isa, k.kind, k.bpg):
            return context.get_dummy_value()
        sa = context.make_array(sig.args[1])(context, builder, args[1])
        slot_ = context.cast(builder, args[2], sig.args[2], types.intp)
        _, n_groups, _ = cgutils.unpack_tuple(builder, sa.shape, 3)
        t0, t1, _ = cgutils.unpack_tuple(builder, sa.strides, 3)
        lanes = ROWS_PER_TASK
        v32 = ir.VectorType(I32, lanes)
        base = builder.gep(builder.bitcast(sa.data, I8.as_pointer()), [builder.mul(slot_, t0)])
        with cgutils.for_range(builder, builder.udiv(n_groups, ir.Constant(n_groups.type, lanes))) as loop:
            g0 = builder.mul(loop.index, ir.Constant(n_groups.type, lanes))
            ptrs = [builder.bitcast(builder.gep(base, [builder.mul(builder.add(g0, ir.Constant(g0.type, r)), t1)]),
                                    v32.as_pointer()) for r in range(lanes)]  # fmt: skip
            rows = _transpose(builder, [builder.load(p, align=4) for p in ptrs])
            for p, v in zip(ptrs, rows, strict=True):
                builder.store(v, p, align=4)
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------------------------
# Kernels (the same contracts and float order as bitsweep.kernels.fast's portable ones). Arrays go straight to the
# intrinsics: no row slices or inlined helpers taking arrays, whose reference counting cost more than a group's
# dot product.

ROWS_PER_TASK = 16

# How a group's float32 (a, c) (w = a * q + c: formats.Format.kernel_scalars) follow from its stored float16 d and
# m. The kernels read the 2 or 4 bytes per group the format stores instead of 8 bytes of (a, c), and compute the
# same float32 values: a float16 is exactly a float32, and 2 * d and -d are exact.
RULE_TERNARY, RULE_BINARY, RULE_AFFINE = 0, 1, 2  # (d, -d), (2d, -d), (d, m)
SCALAR_RULE = {FMT_TQ2: RULE_TERNARY, FMT_TQ1: RULE_TERNARY, FMT_BINARY: RULE_BINARY, FMT_INT2: RULE_AFFINE,
               FMT_INT3: RULE_AFFINE, FMT_INT4: RULE_AFFINE}  # fmt: skip


def block_scalars(a: np.ndarray) -> np.ndarray:
    """Per-group scalars ``(n_rows, n_groups)`` as ``(n_tasks, n_groups, ROWS_PER_TASK)``: ``out[t, g, r] = a[t *
    ROWS_PER_TASK + r, g]``, the last task's missing rows zero. A task's float combination then reads one
    contiguous stream instead of one per group: with ``(n_groups, n_rows)`` (16 streams of 64 bytes per task for
    a 4096-wide TQ2_0 matrix) the GEMV streamed from memory ran 1.08-1.1x slower."""
    n_rows, n_groups = a.shape
    n_tasks = -(-n_rows // ROWS_PER_TASK)
    out = np.zeros((n_tasks * ROWS_PER_TASK, n_groups), a.dtype)
    out[:n_rows] = a
    return np.ascontiguousarray(out.reshape(n_tasks, ROWS_PER_TASK, n_groups).transpose(0, 2, 1))


@intrinsic
def half_to_float(typingctx, bits):
    """The float32 value of a float16 given by its uint16 bits (numba has no float16 on the CPU; LLVM emits
    ``vcvtph2ps`` with F16C, a vector of them where the loop vectorises)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


def _make_prefetch(level: int):
    @intrinsic
    def prefetch(typingctx, array, offset):
        """Prefetch the cache line at byte ``offset`` from the start of ``array`` into this cache level (past the
        end of the array it is a no-op: a prefetch never faults)."""
        if not isinstance(array, types.Array) or not isinstance(offset, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            at = context.cast(builder, args[1], sig.args[1], types.intp)
            _prefetch(builder, builder.gep(builder.bitcast(data, I8.as_pointer()), [at]), level)
            return context.get_dummy_value()

        return types.none(array, offset), codegen

    return prefetch


prefetch_l1, prefetch_l2 = _make_prefetch(1), _make_prefetch(2)


@njit(inline="always")
def group_scalars(rule, dB, mB, task, g, r):
    """(a, c) of row ``task * ROWS_PER_TASK + r``, group ``g``, from the blocked float16 bits ``dB``, ``mB``."""
    d = half_to_float(dB[task, g, r])
    if rule == RULE_AFFINE:
        return d, half_to_float(mB[task, g, r])
    if rule == RULE_BINARY:
        return np.float32(2) * d, -d
    return d, -d


# Parallel chunks of row tasks, each allocating its scratch once instead of once per task (2-5% of a 4096x4096
# one-thread GEMV): enough to balance 16 threads; a constant, as numba cannot cache a kernel that asks for the
# thread count.
TASK_CHUNKS = 64


@njit(cache=True)
def gather_planes8(xq, index):
    """int8 planes ``(n_tokens, n_planes, row_bytes)`` of int8-valued activations ``xq`` ``(n_tokens, k)``."""
    n_tok = xq.shape[0]
    n_planes, n_bytes = index.shape
    out = np.empty((n_tok, n_planes, n_bytes), np.int8)
    for n in range(n_tok):
        for t in range(n_planes):
            for b in range(n_bytes):
                j = index[t, b]
                out[n, t, b] = np.int8(xq[n, j]) if j >= 0 else np.int8(0)
    return out


@njit(inline="always")
def sum_i32(values):
    """The int32 sum of a 1-D array (wrapping as int32 arithmetic does)."""
    total = np.int32(0)
    for g in range(values.shape[0]):
        total += values[g]
    return total


# Each kernel is its loop (``..._serial``: one thread, inlined into compiled callers) and a ``parallel=True`` function
# running that loop on numba's threads. Callers on one thread take the loop (bitsweep.kernels.fast): a parallel
# function launches its thread pool even for one thread (8 us more per call when the caches are cold, as
# after every streamed weight matrix; 1.1 us warm; Zen 4).


@njit(inline="always", cache=True)
def gemv_rows_serial(kern, qs, a, c, P, xsum, xscale, out):
    """One token, one scale per row (BitNet absmean) and per token: each row is one integer sum. ``xsum``: the
    token's activation sums per group (int32)."""
    n_rows, n_bytes = qs.shape
    xsum_total = sum_i32(xsum)
    for task in prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for i in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            s = span(kern, qs, i, P, 0, 0, n_bytes)
            out[i] = (a[i, 0] * np.float32(s) + c[i, 0] * np.float32(xsum_total)) * xscale


@njit(inline="always", cache=True)
def gemv_groups_serial(kern, qs, dB, mB, rule, bpg, P, xsum, xscale, out):
    """One token, per-group scales: an integer sum per group, groups combined in the reference's order. The
    combination runs across the task's rows at once, each row's own float operations unchanged, so it
    vectorises over rows. ``dB``, ``mB``: the stored float16 scalars' bits blocked by task, ``(n_tasks,
    n_groups, ROWS_PER_TASK)`` (:func:`block_scalars`), so that a task reads them as one contiguous stream;
    ``rule``: how (a, c) follow from them (:data:`SCALAR_RULE`)."""
    n_rows = qs.shape[0]
    n_groups = dB.shape[1]
    n_tasks = (n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    n_chunks = min(n_tasks, TASK_CHUNKS)
    for chunk in prange(n_chunks):
        sums = np.empty((1, n_groups, ROWS_PER_TASK), np.int32)
        acc = np.empty(ROWS_PER_TASK, np.float32)
        for task in range(chunk * n_tasks // n_chunks, (chunk + 1) * n_tasks // n_chunks):
            r0 = task * ROWS_PER_TASK
            nr = min(n_rows, r0 + ROWS_PER_TASK) - r0
            for r in range(nr):
                group_sums(kern, qs, r0 + r, P, 0, bpg, sums, 0, r)
            transpose_blocks(kern, sums, 0)
            acc[:] = 0
            for g in range(n_groups):
                xs, sc = np.float32(xsum[g]), xscale[g]
                for r in range(nr):
                    a, c = group_scalars(rule, dB, mB, task, g, r)
                    acc[r] += (a * np.float32(sums[0, g, r]) + c * xs) * sc
            for r in range(nr):
                out[r0 + r] = acc[r]


@njit(inline="always", cache=True)
def gemm_serial(kern, qs, a, c, dB, mB, rule, bpg, P, xsum, xscale, uniform, out):
    """Batched: each row is streamed from memory once (its later four-token passes find it in L2) and each chunk
    of its codes decoded once per four tokens. ``uniform``: one scale per row and per token
    (formats.uniform_row_scales), so a row is one integer sum per token; otherwise per-group sums combined as in
    gemv_groups. ``a``, ``c``: at least each row's first group's (``(n_rows, 1)`` will do: only ``uniform`` rows
    read them)."""
    n_rows, n_bytes = qs.shape
    n_groups = dB.shape[1]
    n_tok = P.shape[0]
    xsum_total = np.zeros(n_tok, np.int32)
    for t in range(n_tok):
        for g in range(n_groups):
            xsum_total[t] += xsum[t, g]
    n4 = n_tok - n_tok % 4
    n_tasks = (n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    # Four tokens at a time over all of a task's rows, then the next four: a pass's activation planes (4 KiB per
    # token at k = 4096, in every format) stay in L1 while the rows stream past, and the task's rows (16-32 KiB)
    # come back from L2 for the next pass. Row by row with all tokens, eight tokens' planes (32 KiB, all of the
    # Zen 4 host's L1) and the row's codes did not fit: batch 8 took 1.4x the time (int4, TQ2_0; 4096^2).
    if uniform:  # one integer sum per row and token: no scratch
        for task in prange(n_tasks):
            rows = range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK))
            for t in range(0, n4, 4):
                for i in rows:
                    s4 = span4(kern, qs, i, P, t, 0, n_bytes)
                    for u in range(4):
                        out[t + u, i] = (
                            a[i, 0] * np.float32(s4[u]) + c[i, 0] * np.float32(xsum_total[t + u])
                        ) * xscale[t + u, 0]
            for t in range(n4, n_tok):
                for i in rows:
                    s = span(kern, qs, i, P, t, 0, n_bytes)
                    out[t, i] = (a[i, 0] * np.float32(s) + c[i, 0] * np.float32(xsum_total[t])) * xscale[t, 0]
        return
    n_chunks = min(n_tasks, TASK_CHUNKS)
    for chunk in prange(n_chunks):
        sums = np.empty((4, n_groups, ROWS_PER_TASK), np.int32)  # one pass: up to four tokens
        acc = np.empty(ROWS_PER_TASK, np.float32)
        for task in range(chunk * n_tasks // n_chunks, (chunk + 1) * n_tasks // n_chunks):
            r0 = task * ROWS_PER_TASK
            nr = min(n_rows, r0 + ROWS_PER_TASK) - r0
            for t in range(0, n_tok, 4):
                n_pass = min(4, n_tok - t)
                for r in range(nr):
                    if n_pass == 4:
                        group_sums4(kern, qs, r0 + r, P, t, bpg, sums, 0, r)
                    else:
                        for u in range(n_pass):
                            group_sums(kern, qs, r0 + r, P, t + u, bpg, sums, u, r)
                for u in range(n_pass):
                    transpose_blocks(kern, sums, u)
                    acc[:] = 0
                    for g in range(n_groups):
                        xs, sc = np.float32(xsum[t + u, g]), xscale[t + u, g]
                        for r in range(nr):
                            ag, cg = group_scalars(rule, dB, mB, task, g, r)
                            acc[r] += (ag * np.float32(sums[u, g, r]) + cg * xs) * sc
                    for r in range(nr):
                        out[t + u, r0 + r] = acc[r]


@njit(parallel=True, cache=True)
def gemv_rows(kern, qs, a, c, P, xsum, xscale, out):
    """:func:`gemv_rows_serial` on numba's threads."""
    gemv_rows_serial(kern, qs, a, c, P, xsum, xscale, out)


@njit(parallel=True, cache=True)
def gemv_groups(kern, qs, dB, mB, rule, bpg, P, xsum, xscale, out):
    """:func:`gemv_groups_serial` on numba's threads."""
    gemv_groups_serial(kern, qs, dB, mB, rule, bpg, P, xsum, xscale, out)


@njit(parallel=True, cache=True)
def gemm(kern, qs, a, c, dB, mB, rule, bpg, P, xsum, xscale, uniform, out):
    """:func:`gemm_serial` on numba's threads."""
    gemm_serial(kern, qs, a, c, dB, mB, rule, bpg, P, xsum, xscale, uniform, out)

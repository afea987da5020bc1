"""Packed low-bit weight formats and their pure-NumPy reference (quantize / dequantize / matvec).

Every format stores a weight matrix ``W`` of shape ``(n_rows, k)`` row by row, in groups of ``group`` input
elements. Each group holds unsigned integer codes ``q`` and two per-group scalars, so that a weight is

    w = a * q + c            (a, c: float32 copies of the fp16 values the format stores)

and a row's dot product with an activation vector ``x`` splits into one integer part and one correction:

    sum_j w_j x_j = sum_groups ( a * sum_j q_j x_j  +  c * sum_j x_j )

With int8 activations the inner sums are exact integers (int32); only the per-group combination is float. The
numba kernels (bitsweep.kernels.fast) use the same codes, the same order of float operations, and therefore
produce bit-identical outputs on the int8 path.

Formats (bits per weight counts the fp16 scalars):

============  =====  ==========  ==============================================================  ======
name          codes  group       bytes of one group (codes only)                                  bpw
============  =====  ==========  ==============================================================  ======
``tq2_0``     0..2   256         64: llama.cpp TQ2_0 ``qs``; byte m of 32-byte chunk c holds      2.0625
                                 elements c*128 + 32*t + m in bits 2t..2t+1 (t = 0..3)
``tq1_0``     0..2   256         52: llama.cpp TQ1_0 ``qs`` (48) + ``qh`` (4); five base-3        1.6875
                                 digits per byte stored as ceil(v * 256 / 243), see _tq1_digits
``binary``    0..1   256k        group/8: byte m of 32-byte chunk c holds element c*256 + 32*t +  1 + 16/g
                                 m in bit t (t = 0..7)
``int2``      0..3   128k        group/4: as tq2_0                                                 2 + 32/g
``int3``      0..7   256k        group/4 low two bits (as int2) then group/8 high bit (as binary)  3 + 32/g
``int4``      0..15  64k         group/2: byte m of 32-byte chunk c holds element c*64 + 32*t + m  4 + 32/g
                                 in bits 4t..4t+3 (t = 0, 1)
============  =====  ==========  ==============================================================  ======

The "plane" layout (code t of a byte belongs to element m + 32*t) is what lets LLVM vectorise decoding: one
32-byte load, one shift and one mask give 32 consecutive codes. Ternary codes are unsigned {0, 1, 2} (= -1, 0,
+1 shifted by one) exactly as llama.cpp stores them; the shift becomes the ``c = -a`` correction.

Ternary scales follow either llama.cpp (``absmax`` per 256-block: what ``gguf.quants`` produces, for bit-exact
checks) or BitNet b1.58 (``absmean`` over the whole tensor: scale = mean|W|, codes = round-clip(W/scale, -1, 1)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from bitsweep.errors import ConfigError, unknown

QK_K = 256  # llama.cpp's super-block size: TQ1_0/TQ2_0 blocks hold 256 weights
TQ1_QS = 48  # TQ1_0: 240 weights at five per byte
TQ1_QH = 4  # TQ1_0: the last 16 weights at four per byte
TQ1_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)

# llama.cpp's GGML type of each format that has one.
GGUF_TYPE_NAMES = {"tq2_0": "TQ2_0", "tq1_0": "TQ1_0"}

# Format ids as the numba kernels see them (one compiled kernel, a branch per group).
FMT_TQ2, FMT_TQ1, FMT_BINARY, FMT_INT2, FMT_INT3, FMT_INT4 = range(6)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's ``roundf`` (what llama.cpp and ``gguf.quants`` use), not NumPy's round-half-to-even."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


@dataclass(frozen=True)
class Format:
    """A packed format: its code range, group constraints and byte layout."""

    name: str
    fmt_id: int
    code_bits: float  # bits of storage per code
    n_levels: int
    group_multiple: int  # a group must be a multiple of this many elements
    default_group: int
    fixed_group: bool = False  # tq1_0/tq2_0: the GGUF block size, not configurable
    scalars: int = 1  # fp16 scalars stored per group: 1 (scale) or 2 (scale and min)
    ternary: ClassVar[frozenset[str]] = frozenset({"tq1_0", "tq2_0"})

    @property
    def sign_scaled(self) -> bool:
        """Ternary and binary: one scale per group, set by a scale rule (absmax or absmean); no offset."""
        return self.name in self.ternary or self.name == "binary"

    def bytes_per_group(self, group: int) -> int:
        if self.name == "tq1_0":
            return TQ1_QS + TQ1_QH
        return int(group * self.code_bits) // 8

    def bpw(self, group: int) -> float:
        return 8 * (self.bytes_per_group(group) + 2 * self.scalars) / group

    def check_group(self, group: int) -> int:
        if self.fixed_group and group != self.default_group:
            raise ConfigError(f"format {self.name} has a fixed group of {self.default_group}, not {group}")
        if group <= 0 or group % self.group_multiple:
            raise ConfigError(
                f"format {self.name}: group {group} must be a multiple of {self.group_multiple}"
            )
        return group


FORMATS: dict[str, Format] = {
    f.name: f
    for f in [
        Format("tq2_0", FMT_TQ2, 2.0, 3, QK_K, QK_K, fixed_group=True),
        Format("tq1_0", FMT_TQ1, 1.625, 3, QK_K, QK_K, fixed_group=True),
        Format("binary", FMT_BINARY, 1.0, 2, 256, 256),
        Format("int2", FMT_INT2, 2.0, 4, 128, 128, scalars=2),
        Format("int3", FMT_INT3, 3.0, 8, 256, 256, scalars=2),
        Format("int4", FMT_INT4, 4.0, 16, 64, 128, scalars=2),
    ]
}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise unknown("packed weight format", name, FORMATS) from None


@dataclass
class PackedMatrix:
    """A weight matrix in one of the packed formats.

    ``qs``: uint8 ``(n_rows, n_groups * bytes_per_group)``; ``d`` (and ``m`` for affine formats): float16
    ``(n_rows, n_groups)``. ``k`` is the true input width; ``k_padded`` rounds it up to whole groups (the
    padding columns are zero weights and see zero activations).
    """

    fmt: Format
    group: int
    k: int
    qs: np.ndarray
    d: np.ndarray
    m: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return self.qs.shape[0]

    @property
    def k_padded(self) -> int:
        return self.d.shape[1] * self.group

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.d.nbytes + (self.m.nbytes if self.m is not None else 0)

    def one_scale_per_row(self) -> bool:
        """Whether every group of a row shares its scale (a sign-scaled format with BitNet's per-tensor
        absmean): then a row's dot product is one integer sum. Cached in ``meta``."""
        cached = self.meta.get("_one_scale_per_row")
        if cached is None:
            cached = self.meta["_one_scale_per_row"] = self.fmt.sign_scaled and bool(
                (self.d == self.d[:, :1]).all()
            )
        return cached

    def kernel_scalars(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-group float32 ``(a, c)`` with ``w = a * q + c`` (see the module docstring)."""
        d = self.d.astype(np.float32)
        if self.fmt.name in Format.ternary:
            return d, -d  # q in {0, 1, 2} stands for -1, 0, +1
        if self.fmt.name == "binary":
            return 2 * d, -d  # q in {0, 1} stands for -1, +1
        return d, self.m.astype(np.float32)

    def to_gguf_bytes(self) -> np.ndarray:
        """The matrix as llama.cpp stores it: rows of ``[qs | d]`` blocks (TQ2_0/TQ1_0 only), uint8."""
        if self.fmt.name not in Format.ternary:
            raise ConfigError(f"format {self.fmt.name} has no GGUF type; tq2_0 and tq1_0 do")
        if self.k_padded != self.k:
            raise ConfigError(f"GGUF rows must be a multiple of {QK_K} wide; this one is {self.k}")
        n_blocks = self.d.shape[1]
        qs = self.qs.reshape(self.n_rows, n_blocks, -1)
        d = self.d.reshape(self.n_rows, n_blocks, 1).view(np.uint8)
        return np.concatenate([qs, d], axis=-1).reshape(self.n_rows, -1)

    @classmethod
    def from_gguf_bytes(cls, fmt_name: str, data: np.ndarray, k: int) -> PackedMatrix:
        fmt = get_format(fmt_name)
        n_rows = data.shape[0]
        blocks = np.ascontiguousarray(data).reshape(n_rows, k // QK_K, -1)
        qs = blocks[..., :-2].reshape(n_rows, -1)
        d = np.ascontiguousarray(blocks[..., -2:]).view(np.float16).reshape(n_rows, -1)
        return cls(fmt, QK_K, k, np.ascontiguousarray(qs), d)


# ---------------------------------------------------------------------------------------------------------------
# Code packing: (n_rows, n_groups, group) codes <-> (n_rows, n_groups * bytes_per_group) bytes


def _pack_planes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``(..., group)`` -> bytes ``(..., group * bits / 8)`` in the plane layout (32-element planes)."""
    per_byte = 8 // bits
    chunk = 32 * per_byte
    c = codes.reshape(*codes.shape[:-1], -1, per_byte, 32).astype(np.uint8)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).reshape(per_byte, 1)
    packed = np.bitwise_or.reduce(c << shifts, axis=-2)
    return packed.reshape(*codes.shape[:-1], codes.shape[-1] // chunk * 32)


def _unpack_planes(packed: np.ndarray, bits: int) -> np.ndarray:
    per_byte = 8 // bits
    p = packed.reshape(*packed.shape[:-1], -1, 1, 32)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).reshape(per_byte, 1)
    codes = (p >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)


def _tq1_pack(codes: np.ndarray) -> np.ndarray:
    """TQ1_0: digits of elements (m, m+32, ..., m+128) -> byte m of qs[0:32], most significant first, etc."""
    lead = codes.shape[:-1]
    c = codes.astype(np.uint16)
    w5 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)[:, None]
    q0 = (c[..., :160].reshape(*lead, 5, 32) * w5).sum(-2)
    q1 = (c[..., 160:240].reshape(*lead, 5, 16) * w5).sum(-2)
    qh = (c[..., 240:].reshape(*lead, 4, 4) * w5[:4]).sum(-2)
    v = np.concatenate([q0, q1, qh], axis=-1)
    # v < 243 (five trits); store ceil(v * 256 / 243) so that multiplying by 3 (mod 256) shifts out one digit.
    return ((v * 256 + 242) // 243).astype(np.uint8)


def _tq1_digits(q: np.ndarray, n: int) -> np.ndarray:
    """The n base-3 digits of TQ1_0 bytes, most significant first: ((q * 3^i mod 256) * 3) >> 8."""
    shifted = q[..., None, :] * TQ1_POW3[:n, None]  # uint8 multiply wraps mod 256 on purpose
    return ((shifted.astype(np.uint16) * 3) >> 8).astype(np.uint8)


def _tq1_unpack(packed: np.ndarray) -> np.ndarray:
    lead = packed.shape[:-1]
    q0 = _tq1_digits(packed[..., :32], 5).reshape(*lead, 160)
    q1 = _tq1_digits(packed[..., 32:48], 5).reshape(*lead, 80)
    qh = _tq1_digits(packed[..., 48:52], 4).reshape(*lead, 16)
    return np.concatenate([q0, q1, qh], axis=-1)


def pack_codes(fmt: Format, codes: np.ndarray) -> np.ndarray:
    """Codes ``(n_rows, n_groups, group)`` (uint8) -> ``qs`` bytes ``(n_rows, n_groups * bytes_per_group)``."""
    n_rows = codes.shape[0]
    if fmt.name == "tq1_0":
        packed = _tq1_pack(codes)
    elif fmt.name in ("tq2_0", "int2"):
        packed = _pack_planes(codes, 2)
    elif fmt.name == "binary":
        packed = _pack_planes(codes, 1)
    elif fmt.name == "int4":
        packed = _pack_planes(codes, 4)
    elif fmt.name == "int3":
        packed = np.concatenate([_pack_planes(codes & 3, 2), _pack_planes(codes >> 2, 1)], axis=-1)
    else:  # pragma: no cover - FORMATS and this switch are edited together
        raise AssertionError(fmt.name)
    return np.ascontiguousarray(packed.reshape(n_rows, -1))


def unpack_codes(pm: PackedMatrix) -> np.ndarray:
    """``qs`` -> codes ``(n_rows, n_groups, group)`` uint8."""
    fmt, group = pm.fmt, pm.group
    qs = pm.qs.reshape(pm.n_rows, -1, fmt.bytes_per_group(group))
    if fmt.name == "tq1_0":
        return _tq1_unpack(qs)
    if fmt.name in ("tq2_0", "int2"):
        return _unpack_planes(qs, 2)
    if fmt.name == "binary":
        return _unpack_planes(qs, 1)
    if fmt.name == "int4":
        return _unpack_planes(qs, 4)
    low = _unpack_planes(qs[..., : group // 4], 2)
    return low | (_unpack_planes(qs[..., group // 4 :], 1) << 2)


def plane_map(fmt: Format, group: int, k_padded: int) -> np.ndarray:
    """Which activation each code of each weight byte multiplies: int64 ``(n_planes, row_bytes)``, -1 for none.

    ``index[t, b]`` is the input element that code ``t`` of byte ``b`` of a row belongs to (the same for every
    row). The numba GEMV gathers a token's activations through it once, then streams each row's bytes against
    contiguous activation planes. For int3 the group's low-bit bytes use planes 0-3 and its high-bit bytes 0-7.
    """
    bpg = fmt.bytes_per_group(group)

    def planes(nbytes: int, bits: int, base: int) -> np.ndarray:
        per_byte = 8 // bits
        b = np.arange(nbytes)
        chunk, m = b // 32, b % 32
        out = np.full((8, nbytes), -1, np.int64)
        for t in range(per_byte):
            out[t] = base + chunk * 32 * per_byte + 32 * t + m
        return out

    if fmt.name == "tq1_0":
        one = np.full((8, bpg), -1, np.int64)
        for k in range(5):
            one[k, :32] = 32 * k + np.arange(32)
            one[k, 32:48] = 160 + 16 * k + np.arange(16)
        for k in range(4):
            one[k, 48:52] = 240 + 4 * k + np.arange(4)
    elif fmt.name in ("tq2_0", "int2"):
        one = planes(bpg, 2, 0)
    elif fmt.name == "binary":
        one = planes(bpg, 1, 0)
    elif fmt.name == "int4":
        one = planes(bpg, 4, 0)
    else:  # int3
        one = np.concatenate([planes(group // 4, 2, 0), planes(group // 8, 1, 0)], axis=1)
    n_groups = k_padded // group
    offsets = (np.arange(n_groups) * group).repeat(bpg)
    index = np.tile(one, (1, n_groups))
    return np.where(index >= 0, index + offsets, -1)


# ---------------------------------------------------------------------------------------------------------------
# Quantize / dequantize / matvec (the reference)


def quantize(w: np.ndarray, fmt_name: str, group: int | None = None, scale: str = "absmax") -> PackedMatrix:
    """Quantize a float matrix ``(n_rows, k)``.

    ``scale`` (ternary and binary only): ``absmax`` per group (llama.cpp's TQ rule) or ``absmean`` over the
    whole tensor (BitNet b1.58 for ternary; BitNet's 1-bit sign with one mean|W| scale for binary). Affine
    formats (int2/3/4) use each group's min and max.
    """
    fmt = get_format(fmt_name)
    group = fmt.check_group(group or fmt.default_group)
    if scale not in ("absmax", "absmean"):
        raise unknown("scale rule", scale, ["absmax", "absmean"])
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ConfigError(f"expected a 2-D weight matrix, got shape {w.shape}")
    n_rows, k = w.shape
    n_groups = -(-k // group)
    padded = np.zeros((n_rows, n_groups * group), np.float32)
    padded[:, :k] = w
    g = padded.reshape(n_rows, n_groups, group)
    m = None
    if fmt.name in Format.ternary:
        if scale == "absmax":
            d = np.abs(g).max(axis=-1, keepdims=True)
            with np.errstate(divide="ignore"):
                inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            codes = round_half_away(g * inv)
        else:
            d = np.full((n_rows, n_groups, 1), np.abs(w).mean(dtype=np.float64), np.float32)
            with np.errstate(divide="ignore", invalid="ignore"):
                codes = np.clip(round_half_away(np.where(d == 0, 0, g / d)), -1, 1)
        codes = (codes + 1).astype(np.uint8)
    elif fmt.name == "binary":
        if scale == "absmax":  # per group: the scale that minimises the L2 error of sign(w) * d is mean|w|
            d = np.abs(g).mean(axis=-1, keepdims=True, dtype=np.float64).astype(np.float32)
        else:
            d = np.full((n_rows, n_groups, 1), np.abs(w).mean(dtype=np.float64), np.float32)
        codes = (g >= 0).astype(np.uint8)
    else:
        levels = fmt.n_levels - 1
        lo, hi = g.min(axis=-1, keepdims=True), g.max(axis=-1, keepdims=True)
        d = (hi - lo) / np.float32(levels)
        # Round d and min to fp16 first so that codes are chosen for the scalars actually stored.
        d16, m16 = d.astype(np.float16).astype(np.float32), lo.astype(np.float16).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            codes = np.clip(round_half_away(np.where(d16 == 0, 0, (g - m16) / d16)), 0, levels)
        codes = codes.astype(np.uint8)
        m = lo[..., 0].astype(np.float16)
    qs = pack_codes(fmt, codes)
    meta = {"scale": scale} if fmt.sign_scaled else {}
    return PackedMatrix(fmt, group, k, qs, d[..., 0].astype(np.float16), m, meta)


def dequantize(pm: PackedMatrix) -> np.ndarray:
    """Float32 ``(n_rows, k)``: ``a * q + c`` per element."""
    a, c = pm.kernel_scalars()
    codes = unpack_codes(pm).astype(np.float32)
    w = codes * a[..., None] + c[..., None]
    return w.reshape(pm.n_rows, -1)[:, : pm.k]


@dataclass
class Activations:
    """A batch of activations ``(n_tokens, k)`` ready for the kernels.

    ``x``: the activations, zero-padded to whole groups: int8 values held as int16 on the integer paths (the
    kernels multiply int16 x int16 into int32, which LLVM turns into vpmaddwd), float32 on the fp32 path.
    ``xsum``: their sum per group (int32 / float32). ``scale``: float32 ``(n_tokens, n_groups)``, the factor
    that turns a group's integer sums back into activation units (1 on the fp32 path).

    Integer modes: ``int8`` is BitNet's per-token absmax (``rint(x * 127 / max|x|)``, one scale per token);
    ``int8_block`` is llama.cpp's Q8_K rule per group (``iscale = -127 / x_maxabs`` with the sign of that
    element, ``q = rint(iscale * x)`` capped at 127, scale ``1 / iscale``), what llama.cpp does to activations
    before its TQ dot products.
    """

    x: np.ndarray
    xsum: np.ndarray
    scale: np.ndarray
    integer: bool


ACT_MODES = ("int8", "int8_block", "fp32")


def prepare_activations(x: np.ndarray, k_padded: int, group: int, act: str = "int8") -> Activations:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    n_tokens, k = x.shape
    n_groups = k_padded // group
    if act not in ACT_MODES:
        raise unknown("activation precision", act, ACT_MODES)
    xp = np.zeros((n_tokens, k_padded), np.float32)
    xp[:, :k] = x
    if act == "fp32":
        xsum = xp.reshape(n_tokens, n_groups, group).sum(-1, dtype=np.float32)
        return Activations(xp, xsum, np.ones((n_tokens, n_groups), np.float32), integer=False)
    if act == "int8":
        absmax = np.abs(x).max(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(absmax > 0, np.float32(127) / absmax, np.float32(0)).astype(np.float32)
        xq = np.clip(np.rint(xp * inv[:, None]), -127, 127).astype(np.int16)
        scale = np.repeat((absmax / np.float32(127)).astype(np.float32)[:, None], n_groups, axis=1)
    else:
        g = xp.reshape(n_tokens, n_groups, group)
        idx = np.abs(g).argmax(axis=-1)[..., None]
        signed_max = np.take_along_axis(g, idx, axis=-1)  # the first element of largest |x|, as ggml picks
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = np.where(signed_max != 0, np.float32(-127) / signed_max, np.float32(0)).astype(
                np.float32
            )
            scale = np.where(iscale != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)[..., 0]
        xq = np.minimum(np.rint(g * iscale), 127).astype(np.int16).reshape(n_tokens, k_padded)
    xsum = xq.reshape(n_tokens, n_groups, group).sum(-1, dtype=np.int32)
    return Activations(xq, xsum, scale, integer=True)


def uniform_row_scales(pm: PackedMatrix, acts: Activations) -> bool:
    """Whether a row's dot product can be one integer sum: integer activations with one scale per token, and a
    format whose rows carry one scale (ternary/binary with a per-tensor absmean; the affine formats and int3's
    split planes never qualify)."""
    return acts.integer and pm.one_scale_per_row() and bool((acts.scale == acts.scale[:, :1]).all())


def group_dots(pm: PackedMatrix, acts: Activations) -> np.ndarray:
    """``sum_j q_j x_j`` per (token, row, group): int64 on the int8 path (exact), float64 on the fp32 path."""
    codes = unpack_codes(pm)
    dtype = np.int64 if acts.integer else np.float64
    xg = acts.x.reshape(acts.x.shape[0], 1, -1, pm.group).astype(dtype)
    return np.einsum("rgj,trgj->trg", codes.astype(dtype), xg, optimize=False)


def gemm(pm: PackedMatrix, x: np.ndarray, act: str = "int8") -> np.ndarray:
    """``x @ W.T`` for ``x`` of shape ``(n_tokens, k)`` (or ``(k,)``): float32 ``(n_tokens, n_rows)``.

    On the integer paths the groups are combined one after another in float32, in the order the numba kernel
    uses, so both give bit-identical results. Where one scale covers a whole row and one activation scale a
    whole token (BitNet: absmean per tensor, int8 per token) the row is one exact integer sum, combined once.
    """
    acts = prepare_activations(x, pm.k_padded, pm.group, act)
    a, c = pm.kernel_scalars()
    if uniform_row_scales(pm, acts):
        dots = group_dots(pm, acts).sum(-1).astype(np.float32)
        xsum = acts.xsum.sum(-1).astype(np.float32)
        return (a[:, 0] * dots + c[:, 0] * xsum[:, None]) * acts.scale[:, :1]
    dots = group_dots(pm, acts).astype(np.float32)
    out = np.zeros((acts.x.shape[0], pm.n_rows), np.float32)
    for g in range(a.shape[1]):
        part = a[:, g] * dots[:, :, g] + c[:, g] * acts.xsum[:, g, None].astype(np.float32)
        out = out + part * acts.scale[:, g, None]
    return out


def gemv(pm: PackedMatrix, x: np.ndarray, act: str = "int8") -> np.ndarray:
    return gemm(pm, np.asarray(x)[None], act)[0]

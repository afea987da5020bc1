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

Each format is one class (gguf-py's ``gguf/quants.py`` pattern): a subclass of :class:`Format` declared with
``name=`` and ``fmt_id=`` registers itself in :data:`FORMATS` and holds its own layout (``pack_codes``,
``unpack_codes``, ``group_planes``, ``bytes_per_group``); its base class is its scale rule (:class:`SignScaled`:
ternary and binary, one scale per group; :class:`Affine`: a scale and a min per group) and gives
``quantize_blocks`` / ``dequantize_blocks`` on ``(n_rows, n_groups, group)`` blocks. Formats are used as classes,
never instantiated: ``get_format("int4").bpw(128)``. The numba kernels branch on ``fmt_id`` (the ``FMT_*`` ids)
inside compiled code.
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

# Format ids as the numba kernels see them (one compiled kernel, a branch per group).
FMT_TQ2, FMT_TQ1, FMT_BINARY, FMT_INT2, FMT_INT3, FMT_INT4 = range(6)

SCALE_RULES = ("absmax", "absmean")


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's ``roundf`` (what llama.cpp and ``gguf.quants`` use), not NumPy's round-half-to-even."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


# ---------------------------------------------------------------------------------------------------------------
# The registry and the two scale rules

# name -> format class, in definition order; filled by Format.__init_subclass__
FORMATS: dict[str, type[Format]] = {}


def get_format(name: str) -> type[Format]:
    try:
        return FORMATS[name]
    except KeyError:
        raise unknown("packed weight format", name, FORMATS) from None


class Format:
    """A packed format: its code range, group constraints and byte layout (one subclass per format).

    ``class Int4(Affine, name="int4", fmt_id=FMT_INT4)`` registers ``Int4`` under ``"int4"``; ``fmt_id`` is the
    branch the numba kernels take for it (a new format needs one there too). Everything is a classmethod or a
    class attribute: ``PackedMatrix.fmt`` is the class itself.
    """

    name: ClassVar[str]
    fmt_id: ClassVar[int]
    code_bits: ClassVar[float]  # bits of storage per code
    n_levels: ClassVar[int]
    group_multiple: ClassVar[int]  # a group must be a multiple of this many elements
    default_group: ClassVar[int]
    fixed_group: ClassVar[bool] = False  # tq1_0/tq2_0: the GGUF block size, not configurable
    scalars: ClassVar[int]  # fp16 scalars stored per group: 1 (scale) or 2 (scale and min)
    # Ternary and binary: one scale per group, set by a scale rule (absmax or absmean); no offset.
    sign_scaled: ClassVar[bool]
    gguf_type: ClassVar[str | None] = None  # llama.cpp's GGML type name, where the bytes are llama.cpp's

    def __init_subclass__(cls, name: str | None = None, fmt_id: int | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:  # a scale rule's base class, not a format
            return
        if fmt_id is None:
            raise TypeError(f"format {name!r} needs a fmt_id (the numba kernels' branch)")
        taken = {f.fmt_id: f.name for f in FORMATS.values()}
        if name in FORMATS or fmt_id in taken:
            raise TypeError(f"format {name!r} (fmt_id {fmt_id}) is already registered")
        cls.name, cls.fmt_id = name, fmt_id
        FORMATS[name] = cls

    # -- layout (each format)

    @classmethod
    def bytes_per_group(cls, group: int) -> int:
        return int(group * cls.code_bits) // 8

    @classmethod
    def pack_codes(cls, codes: np.ndarray) -> np.ndarray:
        """Codes ``(..., group)`` uint8 -> bytes ``(..., bytes_per_group)`` uint8."""
        raise NotImplementedError

    @classmethod
    def unpack_codes(cls, qs: np.ndarray, group: int) -> np.ndarray:
        """Bytes ``(..., bytes_per_group)`` -> codes ``(..., group)`` uint8."""
        raise NotImplementedError

    @classmethod
    def group_planes(cls, group: int) -> np.ndarray:
        """int64 ``(8, bytes_per_group)``: the element of the group that code ``t`` of byte ``b`` holds, or -1."""
        raise NotImplementedError

    # -- scale rule (the base class)

    @classmethod
    def quantize_blocks(
        cls, blocks: np.ndarray, scale: str = "absmax", mean_abs: float | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Float32 blocks ``(n_rows, n_groups, group)`` -> ``qs`` uint8 ``(n_rows, n_groups, bytes_per_group)``,
        ``d`` float16 ``(n_rows, n_groups)`` and ``m`` (float16 like ``d``, or None). ``mean_abs``: mean|W| of
        the whole (unpadded) tensor, for the sign-scaled formats' ``absmean`` rule."""
        raise NotImplementedError

    @classmethod
    def kernel_scalars(cls, d: np.ndarray, m: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Per-group float32 ``(a, c)`` with ``w = a * q + c`` (see the module docstring)."""
        raise NotImplementedError

    @classmethod
    def dequantize_blocks(cls, qs: np.ndarray, d: np.ndarray, m: np.ndarray | None, group: int) -> np.ndarray:
        """``qs`` ``(..., bytes_per_group)`` and its scalars ``(...)`` -> float32 ``(..., group)``: ``a * q + c``."""
        a, c = cls.kernel_scalars(d, m)
        codes = cls.unpack_codes(qs, group).astype(np.float32)
        return codes * a[..., None] + c[..., None]

    # -- sizes

    @classmethod
    def bpw(cls, group: int) -> float:
        return 8 * (cls.bytes_per_group(group) + 2 * cls.scalars) / group

    @classmethod
    def check_group(cls, group: int) -> int:
        if cls.fixed_group and group != cls.default_group:
            raise ConfigError(f"format {cls.name} has a fixed group of {cls.default_group}, not {group}")
        if group <= 0 or group % cls.group_multiple:
            raise ConfigError(f"format {cls.name}: group {group} must be a multiple of {cls.group_multiple}")
        return group


class SignScaled(Format):
    """Codes stand for signs (and zero): one fp16 scale ``d`` per group, from the ``absmax`` rule (per group,
    :meth:`group_scale`) or ``absmean`` (BitNet: mean|W| of the whole tensor, the same ``d`` everywhere)."""

    sign_scaled = True
    scalars = 1

    @classmethod
    def quantize_blocks(cls, blocks, scale="absmax", mean_abs=None):
        if scale == "absmean":
            if mean_abs is None:
                raise ValueError("the absmean rule needs mean_abs, the tensor's mean |w|")
            d = np.full((*blocks.shape[:-1], 1), mean_abs, np.float32)
        else:
            d = cls.group_scale(blocks)
        codes = cls.sign_codes(blocks, d, scale)
        return cls.pack_codes(codes), d[..., 0].astype(np.float16), None

    @classmethod
    def group_scale(cls, blocks: np.ndarray) -> np.ndarray:
        """float32 ``(..., 1)``: the ``absmax`` rule's scale of each group."""
        raise NotImplementedError

    @classmethod
    def sign_codes(cls, blocks: np.ndarray, d: np.ndarray, scale: str) -> np.ndarray:
        """uint8 codes ``(..., group)`` of float32 blocks with scales ``d`` ``(..., 1)``."""
        raise NotImplementedError


class Ternary(SignScaled):
    """Codes {0, 1, 2} for -1, 0, +1 (llama.cpp's TQ types): ``w = d * (q - 1)``."""

    n_levels = 3
    group_multiple = QK_K
    default_group = QK_K
    fixed_group = True

    @classmethod
    def group_scale(cls, blocks):
        return np.abs(blocks).max(axis=-1, keepdims=True)

    @classmethod
    def sign_codes(cls, blocks, d, scale):
        if scale == "absmax":  # as gguf.quants: times the reciprocal (no clip needed: |w| <= d)
            with np.errstate(divide="ignore"):
                inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            codes = round_half_away(blocks * inv)
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                codes = np.clip(round_half_away(np.where(d == 0, 0, blocks / d)), -1, 1)
        return (codes + 1).astype(np.uint8)

    @classmethod
    def kernel_scalars(cls, d, m):
        d = d.astype(np.float32)
        return d, -d  # q in {0, 1, 2} stands for -1, 0, +1


class Affine(Format):
    """Codes 0..n_levels-1 spanning each group's [min, max]: ``w = d * q + m`` (fp16 ``d`` and ``m``); the scale
    rule argument does not apply."""

    sign_scaled = False
    scalars = 2

    @classmethod
    def quantize_blocks(cls, blocks, scale="absmax", mean_abs=None):
        levels = cls.n_levels - 1
        lo, hi = blocks.min(axis=-1, keepdims=True), blocks.max(axis=-1, keepdims=True)
        d = (hi - lo) / np.float32(levels)
        # Round d and min to fp16 first so that codes are chosen for the scalars actually stored.
        d16, m16 = d.astype(np.float16).astype(np.float32), lo.astype(np.float16).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            codes = np.clip(round_half_away(np.where(d16 == 0, 0, (blocks - m16) / d16)), 0, levels)
        qs = cls.pack_codes(codes.astype(np.uint8))
        return qs, d[..., 0].astype(np.float16), lo[..., 0].astype(np.float16)

    @classmethod
    def kernel_scalars(cls, d, m):
        return d.astype(np.float32), m.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Shared layouts: (..., group) codes <-> (..., bytes_per_group) bytes


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


def _planes_index(nbytes: int, bits: int) -> np.ndarray:
    """int64 ``(8, nbytes)``: code t of byte b (chunk b // 32, position m = b % 32) is element chunk*32*per_byte
    + 32*t + m; -1 for t >= 8 / bits."""
    per_byte = 8 // bits
    b = np.arange(nbytes)
    chunk, m = b // 32, b % 32
    out = np.full((8, nbytes), -1, np.int64)
    for t in range(per_byte):
        out[t] = chunk * 32 * per_byte + 32 * t + m
    return out


def _tq1_digits(q: np.ndarray, n: int) -> np.ndarray:
    """The n base-3 digits of TQ1_0 bytes, most significant first: ((q * 3^i mod 256) * 3) >> 8."""
    shifted = q[..., None, :] * TQ1_POW3[:n, None]  # uint8 multiply wraps mod 256 on purpose
    return ((shifted.astype(np.uint16) * 3) >> 8).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# The formats (definition order is FORMATS' order; fmt_id is the numba kernels' branch)


class Planar:
    """Formats whose codes are whole bit planes (``code_bits`` = 1, 2 or 4): byte m of 32-byte chunk c holds
    element c * 32 * (8 / bits) + 32 * t + m in bits t*bits .. t*bits + bits - 1."""

    code_bits: ClassVar[float]

    @classmethod
    def pack_codes(cls, codes):
        return _pack_planes(codes, int(cls.code_bits))

    @classmethod
    def unpack_codes(cls, qs, group):
        return _unpack_planes(qs, int(cls.code_bits))

    @classmethod
    def group_planes(cls, group):
        return _planes_index(cls.bytes_per_group(group), int(cls.code_bits))


class TQ2_0(Planar, Ternary, name="tq2_0", fmt_id=FMT_TQ2):
    """llama.cpp TQ2_0: 2-bit planes, 64 bytes per 256-block."""

    code_bits = 2.0
    gguf_type = "TQ2_0"


class TQ1_0(Ternary, name="tq1_0", fmt_id=FMT_TQ1):
    """llama.cpp TQ1_0: base-3 digits, ``qs`` (48 bytes, five digits each) then ``qh`` (4 bytes, four each)."""

    code_bits = 1.625
    gguf_type = "TQ1_0"

    @classmethod
    def bytes_per_group(cls, group):
        return TQ1_QS + TQ1_QH

    @classmethod
    def pack_codes(cls, codes):
        """Digits of elements (m, m+32, ..., m+128) -> byte m of qs[0:32], most significant first; (160 + m,
        160 + m + 16, ...) -> byte m of qs[32:48]; (240 + m, 240 + m + 4, ...) -> byte m of qh."""
        lead = codes.shape[:-1]
        c = codes.astype(np.uint16)
        w5 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)[:, None]
        q0 = (c[..., :160].reshape(*lead, 5, 32) * w5).sum(-2)
        q1 = (c[..., 160:240].reshape(*lead, 5, 16) * w5).sum(-2)
        qh = (c[..., 240:].reshape(*lead, 4, 4) * w5[:4]).sum(-2)
        v = np.concatenate([q0, q1, qh], axis=-1)
        # v < 243 (five trits); store ceil(v * 256 / 243) so that multiplying by 3 (mod 256) shifts out one digit.
        return ((v * 256 + 242) // 243).astype(np.uint8)

    @classmethod
    def unpack_codes(cls, qs, group):
        lead = qs.shape[:-1]
        q0 = _tq1_digits(qs[..., :32], 5).reshape(*lead, 160)
        q1 = _tq1_digits(qs[..., 32:48], 5).reshape(*lead, 80)
        qh = _tq1_digits(qs[..., 48:52], 4).reshape(*lead, 16)
        return np.concatenate([q0, q1, qh], axis=-1)

    @classmethod
    def group_planes(cls, group):
        one = np.full((8, cls.bytes_per_group(group)), -1, np.int64)
        for k in range(5):  # digit k of byte m
            one[k, :32] = 32 * k + np.arange(32)
            one[k, 32:48] = 160 + 16 * k + np.arange(16)
        for k in range(4):
            one[k, 48:52] = 240 + 4 * k + np.arange(4)
        return one


class Binary(Planar, SignScaled, name="binary", fmt_id=FMT_BINARY):
    """Codes {0, 1} for -1, +1: ``w = d * (2q - 1)``; 1-bit planes."""

    code_bits = 1.0
    n_levels = 2
    group_multiple = 256
    default_group = 256

    @classmethod
    def group_scale(cls, blocks):
        # per group: the scale that minimises the L2 error of sign(w) * d is mean|w|
        return np.abs(blocks).mean(axis=-1, keepdims=True, dtype=np.float64).astype(np.float32)

    @classmethod
    def sign_codes(cls, blocks, d, scale):
        return (blocks >= 0).astype(np.uint8)

    @classmethod
    def kernel_scalars(cls, d, m):
        d = d.astype(np.float32)
        return 2 * d, -d  # q in {0, 1} stands for -1, +1


class Int2(Planar, Affine, name="int2", fmt_id=FMT_INT2):
    """2-bit affine codes, laid out as tq2_0."""

    code_bits = 2.0
    n_levels = 4
    group_multiple = 128
    default_group = 128


class Int3(Affine, name="int3", fmt_id=FMT_INT3):
    """3-bit affine codes: group/4 bytes of the low two bits (as int2), then group/8 of the high bit (as binary)."""

    code_bits = 3.0
    n_levels = 8
    group_multiple = 256
    default_group = 256

    @classmethod
    def pack_codes(cls, codes):
        return np.concatenate([_pack_planes(codes & 3, 2), _pack_planes(codes >> 2, 1)], axis=-1)

    @classmethod
    def unpack_codes(cls, qs, group):
        low = _unpack_planes(qs[..., : group // 4], 2)
        return low | (_unpack_planes(qs[..., group // 4 :], 1) << 2)

    @classmethod
    def group_planes(cls, group):
        # the low-bit bytes use planes 0-3, the high-bit bytes 0-7; both index the same group's elements
        return np.concatenate([_planes_index(group // 4, 2), _planes_index(group // 8, 1)], axis=1)


class Int4(Planar, Affine, name="int4", fmt_id=FMT_INT4):
    """4-bit affine codes: byte m of 32-byte chunk c holds element c*64 + 32*t + m in bits 4t..4t+3."""

    code_bits = 4.0
    n_levels = 16
    group_multiple = 64
    default_group = 128


# llama.cpp's GGML type of each format that has one.
GGUF_TYPE_NAMES = {name: fmt.gguf_type for name, fmt in FORMATS.items() if fmt.gguf_type}


# ---------------------------------------------------------------------------------------------------------------
# Packed matrices


@dataclass
class PackedMatrix:
    """A weight matrix in one of the packed formats.

    ``qs``: uint8 ``(n_rows, n_groups * bytes_per_group)``; ``d`` (and ``m`` for affine formats): float16
    ``(n_rows, n_groups)``. ``k`` is the true input width; ``k_padded`` rounds it up to whole groups (the
    padding columns are zero weights and see zero activations). ``fmt`` is the format's class.
    """

    fmt: type[Format]
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

    def blocks(self) -> np.ndarray:
        """``qs`` as ``(n_rows, n_groups, bytes_per_group)``."""
        return self.qs.reshape(self.n_rows, -1, self.fmt.bytes_per_group(self.group))

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
        return self.fmt.kernel_scalars(self.d, self.m)

    def to_gguf_bytes(self) -> np.ndarray:
        """The matrix as llama.cpp stores it: rows of ``[qs | d]`` blocks (TQ2_0/TQ1_0 only), uint8."""
        if self.fmt.gguf_type is None:
            raise ConfigError(f"format {self.fmt.name} has no GGUF type; {' and '.join(GGUF_TYPE_NAMES)} do")
        if self.k_padded != self.k:
            raise ConfigError(f"GGUF rows must be a multiple of {QK_K} wide; this one is {self.k}")
        n_blocks = self.d.shape[1]
        qs = self.blocks()
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


def pack_codes(fmt: type[Format], codes: np.ndarray) -> np.ndarray:
    """Codes ``(n_rows, n_groups, group)`` (uint8) -> ``qs`` bytes ``(n_rows, n_groups * bytes_per_group)``."""
    return np.ascontiguousarray(fmt.pack_codes(codes).reshape(codes.shape[0], -1))


def unpack_codes(pm: PackedMatrix) -> np.ndarray:
    """``qs`` -> codes ``(n_rows, n_groups, group)`` uint8."""
    return pm.fmt.unpack_codes(pm.blocks(), pm.group)


def plane_map(fmt: type[Format], group: int, k_padded: int) -> np.ndarray:
    """Which activation each code of each weight byte multiplies: int64 ``(n_planes, row_bytes)``, -1 for none.

    ``index[t, b]`` is the input element that code ``t`` of byte ``b`` of a row belongs to (the same for every
    row). The numba GEMV gathers a token's activations through it once, then streams each row's bytes against
    contiguous activation planes. For int3 the group's low-bit bytes use planes 0-3 and its high-bit bytes 0-7.
    """
    bpg = fmt.bytes_per_group(group)
    one = fmt.group_planes(group)
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
    if scale not in SCALE_RULES:
        raise unknown("scale rule", scale, SCALE_RULES)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ConfigError(f"expected a 2-D weight matrix, got shape {w.shape}")
    n_rows, k = w.shape
    n_groups = -(-k // group)
    padded = np.zeros((n_rows, n_groups * group), np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n_rows, n_groups, group)
    # absmean is the mean over the true tensor, not over the zero padding
    mean_abs = np.abs(w).mean(dtype=np.float64) if fmt.sign_scaled and scale == "absmean" else None
    qs, d, m = fmt.quantize_blocks(blocks, scale, mean_abs)
    meta = {"scale": scale} if fmt.sign_scaled else {}
    return PackedMatrix(fmt, group, k, np.ascontiguousarray(qs.reshape(n_rows, -1)), d, m, meta)


def dequantize(pm: PackedMatrix) -> np.ndarray:
    """Float32 ``(n_rows, k)``: ``a * q + c`` per element."""
    w = pm.fmt.dequantize_blocks(pm.blocks(), pm.d, pm.m, pm.group)
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

    ``per_token``: whether each token's groups share one scale (``int8`` makes them so); None: not known, looked
    up in ``scale`` when it matters (:func:`uniform_row_scales`).
    """

    x: np.ndarray
    xsum: np.ndarray
    scale: np.ndarray
    integer: bool
    per_token: bool | None = None


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
    return Activations(xq, xsum, scale, integer=True, per_token=True if act == "int8" else None)


def uniform_row_scales(pm: PackedMatrix, acts: Activations) -> bool:
    """Whether a row's dot product can be one integer sum: integer activations with one scale per token, and a
    format whose rows carry one scale (ternary/binary with a per-tensor absmean; the affine formats and int3's
    split planes never qualify)."""
    if not (acts.integer and pm.one_scale_per_row()):
        return False
    return acts.per_token if acts.per_token is not None else bool((acts.scale == acts.scale[:, :1]).all())


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

"""Packed low-bit formats: the NumPy reference against llama.cpp's gguf-py, and the numba kernels against the
reference (bit-exact on the int8 path, on every instruction-set path this machine has and on the forced
portable fallback)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
import numpy as np
import pytest

from bitsweep.errors import ConfigError
from bitsweep.kernels import FORMATS
from bitsweep.kernels import formats as ref
from bitsweep.kernels.formats import PackedMatrix

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

fast = pytest.importorskip("bitsweep.kernels.fast")
from bitsweep.kernels import memory, simd  # noqa: E402

GGUF_TYPES = {"tq2_0": GGMLQuantizationType.TQ2_0, "tq1_0": GGMLQuantizationType.TQ1_0}


@pytest.fixture(params=simd.available_isas())
def isa(request):
    """Each instruction-set path this machine can run, ``portable`` (the forced fallback) always. The paths this
    CPU lacks are not collected (CI fails on skips); test_simd_paths_compile_to_their_instructions still
    compiles each of them for a CPU that has it."""
    previous = fast.set_isa(request.param)
    yield request.param
    fast.set_isa(previous)


def weights(rows: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, k)).astype(np.float32) * 0.05
    w[1, : min(k, 256)] = 0  # an all-zero block
    w[2] = 0  # an all-zero row
    w[3, 5] = 1.0  # an outlier
    return w


@pytest.mark.parametrize("name", GGUF_TYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_ternary_packing_is_bit_exact_with_gguf(name, seed):
    w = weights(8, 768, seed)
    ours = ref.quantize(w, name, scale="absmax")
    theirs = gguf_quants.quantize(w, GGUF_TYPES[name])
    np.testing.assert_array_equal(ours.to_gguf_bytes(), theirs)
    # Their dequantizer reads our bytes exactly as ours (and the numba kernel) does.
    expected = gguf_quants.dequantize(ours.to_gguf_bytes(), GGUF_TYPES[name])
    np.testing.assert_array_equal(ref.dequantize(ours), expected)
    np.testing.assert_array_equal(fast.dequantize(ours), expected)
    back = PackedMatrix.from_gguf_bytes(name, theirs, 768)
    np.testing.assert_array_equal(back.qs, ours.qs)
    np.testing.assert_array_equal(back.d, ours.d)


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_bitnet_absmean_gives_ternary_weights_and_gguf_reads_them(name):
    w = weights(6, 512)
    pm = ref.quantize(w, name, scale="absmean")
    scale = np.float16(np.abs(w).mean()).astype(np.float32)
    dq = ref.dequantize(pm)
    assert set(np.unique(dq)) <= {-scale, 0.0, scale}
    codes = np.clip(ref.round_half_away(w / np.abs(w).mean()), -1, 1)
    np.testing.assert_array_equal(dq, codes * scale)
    np.testing.assert_array_equal(gguf_quants.dequantize(pm.to_gguf_bytes(), GGUF_TYPES[name]), dq)


@pytest.mark.parametrize(
    ("name", "scale"),
    [(name, "absmax") for name in sorted(FORMATS)] + [(n, "absmean") for n in ("tq1_0", "tq2_0", "binary")],
)
@pytest.mark.parametrize("k", [512, 700])  # 700: padded up to whole groups
def test_numba_kernels_match_reference(name, scale, k, isa):
    """absmean: one scale per row, so the int8 path sums whole rows (formats.uniform_row_scales)."""
    w = weights(37, k)
    x = np.random.default_rng(5).standard_normal((5, k)).astype(np.float32)
    pm = ref.quantize(w, name, scale=scale)
    assert ref.uniform_row_scales(pm, ref.prepare_activations(x, pm.k_padded, pm.group)) == (
        scale == "absmean"
    )
    np.testing.assert_array_equal(fast.dequantize(pm), ref.dequantize(pm))
    # int8 activations: integer group sums, combined in the same float order -> identical bits.
    for act in ("int8", "int8_block"):
        np.testing.assert_array_equal(fast.gemm(pm, x, act), ref.gemm(pm, x, act))
        np.testing.assert_array_equal(fast.gemv(pm, x[0], act), ref.gemv(pm, x[0], act))
    np.testing.assert_array_equal(fast.linear_token(pm, x[0]), ref.gemv(pm, x[0]))  # generation's fused call
    # fp32 activations: the numba reduction is reordered (fastmath), so only close.
    np.testing.assert_allclose(fast.gemm(pm, x, "fp32"), ref.gemm(pm, x, "fp32"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "scale"),
    [(name, "absmax") for name in sorted(FORMATS)] + [(n, "absmean") for n in ("tq1_0", "tq2_0", "binary")],
)
def test_batches_through_blas_give_the_kernels_bits_on_any_thread_count(name, scale):
    """gemm_exact (what the bitnet backend scores windows with): integer group sums as BLAS GEMMs of integer-
    valued float32 matrices, exact in any summation order, so 1 and 2 BLAS threads and the int8 kernels agree
    to the bit."""
    import torch

    w = weights(96, 700)
    x = np.random.default_rng(5).standard_normal((40, 700)).astype(np.float32) * 3
    pm = ref.quantize(w, name, scale=scale)
    previous = torch.get_num_threads()
    try:
        for act in ("int8", "int8_block"):
            acts = fast.prepare_activations_fast(x, pm.k_padded, pm.group, act)
            expected = ref.gemm(pm, x, act)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                np.testing.assert_array_equal(fast.gemm_exact(pm, acts), expected)
            np.testing.assert_array_equal(fast.gemm_prepared(pm, acts), expected)
    finally:
        torch.set_num_threads(previous)
    with pytest.raises(ValueError, match="integer activations"):
        fast.gemm_exact(pm, fast.prepare_activations_fast(x, pm.k_padded, pm.group, "fp32"))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_matvec_is_the_product_with_the_dequantized_matrix(name):
    w = weights(64, 1024)
    x = np.random.default_rng(7).standard_normal((3, 1024)).astype(np.float32)
    pm = ref.quantize(w, name)
    exact = x @ ref.dequantize(pm).T
    np.testing.assert_allclose(fast.gemm(pm, x, "fp32"), exact, rtol=1e-4, atol=1e-4)

    # int8 activations: per-token absmax quantization costs about 1% of the output scale; per 256-block
    # (llama.cpp's Q8_K) less.
    def rms_error(act):
        return np.sqrt(np.mean((fast.gemm(pm, x, act) - exact) ** 2)) / np.sqrt(np.mean(exact**2))

    assert 0 < rms_error("int8_block") < rms_error("int8") < 0.03


def test_integer_group_dots_are_exact():
    pm = ref.quantize(weights(4, 512), "int3", group=256)
    acts = ref.prepare_activations(np.random.default_rng(2).standard_normal(512), 512, 256)
    codes = ref.unpack_codes(pm).astype(np.int64)
    brute = (codes * acts.x[0].astype(np.int64).reshape(1, 2, 256)).sum(-1)
    np.testing.assert_array_equal(ref.group_dots(pm, acts)[0], brute)
    assert ref.group_dots(pm, acts).dtype == np.int64


def test_affine_formats_round_to_nearest_level():
    w = weights(16, 512)
    for name, bits in [("int2", 2), ("int3", 3), ("int4", 4)]:
        pm = ref.quantize(w, name)
        codes = ref.unpack_codes(pm)
        assert codes.max() <= 2**bits - 1
        d = pm.d.astype(np.float32)[..., None]
        err = np.abs(ref.dequantize(pm) - w).reshape(16, -1, pm.group)
        assert (err <= d / 2 + 1e-3 * np.abs(w).max()).all()
    assert ref.quantize(w, "int4").fmt.bpw(128) == 4.25


def test_binary_is_sign_times_group_mean():
    w = weights(4, 512)
    pm = ref.quantize(w, "binary")
    dq = ref.dequantize(pm).reshape(4, 2, 256)
    mean_abs = np.abs(w).reshape(4, 2, 256).mean(-1, keepdims=True).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(dq, np.where(w.reshape(4, 2, 256) >= 0, mean_abs, -mean_abs))


def test_formats_are_classes_registered_by_name():
    """One class per format (gguf-py's quants.py pattern); its fmt_id is the numba kernels' branch for it."""
    assert list(FORMATS) == ["tq2_0", "tq1_0", "binary", "int2", "int3", "int4"]
    for name, fmt in FORMATS.items():
        assert issubclass(fmt, ref.Format) and fmt.name == name and ref.get_format(name) is fmt
        assert fmt.sign_scaled is issubclass(fmt, ref.SignScaled) is not issubclass(fmt, ref.Affine)
    ids = {name: fmt.fmt_id for name, fmt in FORMATS.items()}
    assert ids == {"tq2_0": ref.FMT_TQ2, "tq1_0": ref.FMT_TQ1, "binary": ref.FMT_BINARY,
                   "int2": ref.FMT_INT2, "int3": ref.FMT_INT3, "int4": ref.FMT_INT4}  # fmt: skip
    assert sorted(ids.values()) == list(range(len(FORMATS)))
    assert {name: qtype.name for name, qtype in GGUF_TYPES.items()} == ref.GGUF_TYPE_NAMES
    with pytest.raises(TypeError, match="already registered"):

        class Again(ref.Int4, name="int4", fmt_id=99):
            pass

    assert FORMATS["int4"] is ref.Int4


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_format_class_quantizes_and_dequantizes_blocks(name):
    """``quantize_blocks`` / ``dequantize_blocks`` on ``(n_rows, n_groups, group)`` blocks are what
    quantize / dequantize do to whole matrices."""
    fmt = FORMATS[name]
    group = fmt.default_group
    w = weights(6, 2 * group)
    qs, d, m = fmt.quantize_blocks(w.reshape(6, 2, group))
    assert qs.shape == (6, 2, fmt.bytes_per_group(group)) and qs.dtype == np.uint8
    assert (m is None) == fmt.sign_scaled
    codes = fmt.unpack_codes(qs, group)
    assert codes.shape == (6, 2, group) and codes.max() < fmt.n_levels
    np.testing.assert_array_equal(fmt.pack_codes(codes), qs)
    pm = ref.quantize(w, name)
    np.testing.assert_array_equal(qs.reshape(6, -1), pm.qs)
    np.testing.assert_array_equal(d, pm.d)
    np.testing.assert_array_equal(fmt.dequantize_blocks(qs, d, m, group).reshape(6, -1), ref.dequantize(pm))


def test_bits_per_weight():
    assert FORMATS["tq2_0"].bpw(256) == 2.0625
    assert FORMATS["tq1_0"].bpw(256) == 1.6875
    assert ref.quantize(weights(4, 256), "tq1_0").qs.shape == (4, 52)


def test_bad_input_names_what_is_known():
    with pytest.raises(ConfigError, match="known: binary, int2, int3, int4, tq1_0, tq2_0"):
        ref.quantize(weights(4, 256), "int5")
    with pytest.raises(ConfigError, match="multiple of 64"):
        ref.quantize(weights(4, 256), "int4", group=96)
    with pytest.raises(ConfigError, match="fixed group of 256"):
        ref.quantize(weights(4, 256), "tq2_0", group=128)
    with pytest.raises(ConfigError, match="multiple of 256 wide"):
        ref.quantize(weights(4, 300), "tq2_0").to_gguf_bytes()
    with pytest.raises(ConfigError, match="known: fp32, int8, int8_block"):
        fast.gemv(ref.quantize(weights(4, 256), "tq2_0"), np.ones(256), act="int4")


def test_compiled_activation_quantization_matches_reference():
    x = np.random.default_rng(3).standard_normal((4, 700)).astype(np.float32)
    x[2] = 0  # an all-zero token
    want = ref.prepare_activations(x, 768, 256)
    got = fast.prepare_activations_fast(x, 768, 256)
    for name in ("x", "xsum", "scale"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))


def test_block_activations_follow_ggml_q8_k():
    """ggml's quantize_row_q8_K_ref: iscale = -127 / (the signed element of largest |x|), q = min(127, rint)."""
    x = np.zeros(512, np.float32)
    x[:256] = np.linspace(-1, 2, 256, dtype=np.float32)  # block 0: max |x| is +2 -> codes flip sign
    x[300] = -4.0  # block 1: max |x| is -4
    acts = ref.prepare_activations(x, 512, 256, "int8_block")
    assert (
        acts.x[0, 255] == -127 and acts.x[0, 0] == 64 and acts.x[0, 300] == -127
    )  # the extreme maps to -127
    np.testing.assert_allclose(acts.scale[0], [2 / -127, -4 / -127], rtol=1e-6)
    np.testing.assert_allclose(acts.x[0] * np.repeat(acts.scale[0], 256), x, atol=2 / 127)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_plane_map_covers_every_input_element_once(name):
    fmt = FORMATS[name]
    group = fmt.default_group
    index = ref.plane_map(fmt, group, 4 * group)
    assert index.shape[1] == 4 * fmt.bytes_per_group(group)
    used = np.sort(index[index >= 0])
    times = 2 if name == "int3" else 1  # int3: once for the low two bits, once for the high bit
    np.testing.assert_array_equal(used, np.repeat(np.arange(4 * group), times))


def test_every_isa_path_gives_the_same_bits(monkeypatch):
    """Same inputs through every available path and the forced fallback (as on another x86 host): identical
    outputs, equal to the reference. Shapes with tails: rows not a multiple of the vector width in bytes,
    batches not a multiple of four tokens, a last group shorter than a vector (tq1_0's 52 bytes)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((9, 1300)).astype(np.float32)
    previous = fast.current_isa()
    try:
        for name in sorted(FORMATS):
            for scale in ("absmax", "absmean") if FORMATS[name].sign_scaled else ("absmax",):
                pm = ref.quantize(weights(45, 1300, seed=3), name, scale=scale)
                want = {act: ref.gemm(pm, x, act) for act in ("int8", "int8_block")}
                for path in simd.available_isas():
                    fast.set_isa(path)
                    for act, expected in want.items():
                        np.testing.assert_array_equal(
                            fast.gemm(pm, x, act), expected, err_msg=f"{name} {path}"
                        )
                        np.testing.assert_array_equal(fast.gemm(pm, x[:1], act), expected[:1])
                    np.testing.assert_array_equal(fast.linear_token(pm, x[2]), want["int8"][2])
        monkeypatch.setenv(simd.ENV, "portable")  # the environment variable forces the fallback too
        fast.set_isa()
        assert fast.current_isa() == "portable"
    finally:
        fast.set_isa(previous)


def test_isa_choice_is_checked():
    available = simd.available_isas()
    assert available[-1] == "portable" and simd.select_isa("auto") == available[0]
    assert simd.select_isa("PORTABLE") == "portable"
    with pytest.raises(ConfigError, match="known: auto, avx512vnni"):
        simd.select_isa("neon")
    for missing in set(simd.ISAS) - set(available):
        with pytest.raises(ConfigError, match="supports only"):
            simd.select_isa(missing)


# A CPU that has each path's instructions, for LLVM to compile for when this machine lacks them.
CROSS_TARGETS = {
    "avx512vnni": ("sapphirerapids", "avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx512vnni,avxvnni"),
    "avx512bw": ("skylake-avx512", "avx512f,avx512bw,avx512vl,avx512dq,avx512cd"),
    "avxvnni": ("alderlake", "avxvnni"),
    "avx2": ("haswell", ""),
}
EXPECTED_ASM = {"avx512vnni": ("vpdpbusd", "zmm"), "avx512bw": ("vpmaddubsw", "zmm"),
                "avxvnni": ("vpdpbusd", "{vex}"), "avx2": ("vpmaddubsw", "ymm")}  # fmt: skip


@pytest.mark.parametrize("path", [p for p in simd.ISAS if p != "portable"])
def test_simd_paths_compile_to_their_instructions(path, tmp_path):
    """Every SIMD path compiles (for a CPU that has it, in a subprocess: numba's target is fixed at import) to
    its dot-product instruction. Paths this machine can run are also checked bit for bit above."""
    cpu, extra = CROSS_TARGETS[path]
    features = ",".join(f"+{f}" for f in ["avx", "avx2", "fma", "f16c", "bmi", "bmi2", "popcnt", "sse4.2",
                                          *filter(None, extra.split(","))])  # fmt: skip
    script = textwrap.dedent(f"""
        from numba import njit, types
        from bitsweep.kernels import simd

        @njit
        def row(kern, qs, i, planes):
            return simd.span(kern, qs, i, planes, 0, 0, qs.shape[1])

        @njit
        def groups(kern, qs, i, planes, sums):
            simd.group_sums4(kern, qs, i, planes, 0, 96, sums, 0, 0)  # int3: 64 + 32 bytes

        @njit
        def batched(kern, qs, i, planes, sums):
            simd.group_sums4(kern, qs, i, planes, 0, 64, sums, 0, 0)

        cases = []
        for kind in ("2", "t", "1", "4", "3"):
            args = (simd.KernType({path!r}, kind), types.uint8[:, ::1], types.intp, types.int8[:, :, ::1])
            cases += [(kind, row, args), (kind, groups, args + (types.int32[:, :, ::1],))]
        for kind in ("2", "4"):  # groups of 64 bytes (tq2_0 blocks, int4 groups of 128), summed in batches
            args = (simd.KernType({path!r}, kind, 64), types.uint8[:, ::1], types.intp, types.int8[:, :, ::1])
            cases.append((kind + "b", batched, args + (types.int32[:, :, ::1],)))
        for kind, fn, sig in cases:
            fn.compile(sig)
            asm = fn.inspect_asm(fn.signatures[-1])
            print("@@", kind, asm.count({EXPECTED_ASM[path][0]!r}), "{EXPECTED_ASM[path][1]}" in asm)
        # a GEMV prefetching into L2 (simd.software_prefetch) emits prefetcht1
        args = (simd.KernType({path!r}, "2", 0, (16384, 2)), types.uint8[:, ::1], types.intp, types.int8[:, :, ::1])
        row.compile(args)
        print("@@ prefetch", row.inspect_asm(row.signatures[-1]).count("prefetcht1"))
        # TQ1_0's multiples of three as byte adds (inline assembly, simd._times3), not LLVM's byte multiplies
        args = (simd.KernType({path!r}, "t"), types.uint8[:, ::1], types.intp, types.int8[:, :, ::1])
        print("@@ trit_adds", row.inspect_asm(args).count("#APP"))
        # with VNNI, 2-bit planes masked in place through four opaque masks (simd._plane_masks), not shifted
        args = (simd.KernType({path!r}, "2"), types.uint8[:, ::1], types.intp, types.int8[:, :, ::1])
        print("@@ plane_masks", row.inspect_asm(args).count("#APP"))
    """)
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features, NUMBA_CACHE_DIR=str(tmp_path))
    env.pop(simd.ENV, None)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.split() for line in done.stdout.splitlines() if line.startswith("@@")]
    assert len(lines) == 15 and [line[1] for line in lines[-3:]] == ["prefetch", "trit_adds", "plane_masks"]
    assert int(lines[-3][2]) > 0 and int(lines[-2][2]) >= 5, lines[-3:]
    assert int(lines[-1][2]) == (4 if path in simd.VNNI else 0), lines[-1]
    for _, kind, count, wide in lines[:-3]:
        assert int(count) > 0 and wide == "True", (path, kind, count, wide)


@pytest.mark.skipif(fast.current_isa() == "portable", reason="the SIMD kernels only")
def test_one_thread_runs_each_kernels_loop_inline_with_the_same_bits():
    """On one thread the plans call each kernel's loop itself (``simd.*_serial``, no thread launch): the same bits
    as the parallel kernels and the reference, for a GEMV with one scale per row, one with per-group scales, a
    batch and generation's fused call; the plans are kept per thread count."""
    rng = np.random.default_rng(13)
    x = rng.standard_normal((6, 640)).astype(np.float32)
    previous = numba.get_num_threads()
    for name, scale in (("tq2_0", "absmean"), ("int4", "absmax"), ("tq1_0", "absmax")):
        pm = ref.quantize(weights(35, 640, seed=7), name, scale=scale)
        expected = ref.gemm(pm, x)
        for threads in (1, previous):
            numba.set_num_threads(threads)
            try:
                np.testing.assert_array_equal(fast.gemm(pm, x), expected, err_msg=f"{name} {threads}")
                np.testing.assert_array_equal(fast.gemm(pm, x[:1]), expected[:1])
                np.testing.assert_array_equal(fast.linear_token(pm, x[3]), expected[3])
            finally:
                numba.set_num_threads(previous)
        gemv = [call for key, call in pm.meta["_gemm_plans"].items() if not key[3]]  # one token
        assert {key[-1] for key in pm.meta["_gemm_plans"] if key[3]} == {True, previous == 1}  # batches
        calls = gemv + list(pm.meta["_token_plans"].values())
        assert {serial for call in calls for serial in call.entries} == {True, previous == 1}
    with pytest.raises(ValueError, match="1-D"):
        fast.linear_token(pm, x[:1])


@pytest.mark.skipif(fast.current_isa() not in simd.VNNI, reason="masked planes are the VNNI kernels'")
def test_rows_too_long_for_masked_int32_sums_are_refused(monkeypatch):
    """The VNNI kernels leave code planes in place (simd._masked_planes), which scales their int32 sums by up to
    64 (2-bit codes): a row longer than simd.masked_span_bytes could wrap, so its plan is refused with the reason
    rather than computed wrongly. The real limit (1.4 MB of 2-bit codes per row with AVX-512) is lowered here."""
    assert simd.masked_span_bytes("avx512vnni", "2") == (2**31 - 1) // (4 * 192 * 128) * 64
    assert simd.masked_span_bytes("avxvnni", "4") == (2**31 - 1) // (4 * 240 * 128) * 32
    pm = ref.quantize(weights(16, 512, seed=4), "tq2_0", scale="absmean")  # 128 bytes per row
    monkeypatch.setattr(simd, "masked_span_bytes", lambda isa, kind: 64)
    with pytest.raises(ValueError, match="rows of 128 bytes are longer"):
        fast.gemv(pm, np.ones(512, np.float32))


def test_an_edit_of_any_kernel_module_makes_every_cached_kernel_stale(tmp_path):
    """numba keys a function's cache on its own file's contents, but fast.py's functions inline simd.py's
    kernels: the package's cache locator (bitsweep.kernels.cache_kernels_together) adds every module's hash to the
    freshness stamp of each function it compiles, so an edit of simd.py alone recompiles fast.py's too."""
    from bitsweep import kernels

    for fn in (fast._run_plan, fast._run_token, simd.gemm):
        locator = fn._cache._impl.locator
        assert getattr(type(locator), "bitsweep_kernels", False), type(locator)
        assert locator.get_source_stamp()[1] == kernels.kernel_sources_stamp()
    assert "simd.py" in dict(kernels.kernel_sources_stamp())
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 1\n")
    before = kernels.kernel_sources_stamp(str(tmp_path))
    (tmp_path / "b.py").write_text("y = 2\n")
    assert kernels.kernel_sources_stamp(str(tmp_path)) != before


@pytest.mark.skipif(fast.current_isa() == "portable", reason="the SIMD kernels only")
def test_the_kernels_can_be_cached_on_disk(recwarn, monkeypatch):
    """numba cannot cache a kernel that uses a dynamic global (the thread count, a ctypes pointer): it only warns,
    and every process then compiles the kernel again, seconds per format. Each SIMD kernel (and the float16 GEMV
    of a float head, which prefetches through an intrinsic), called with an
    output layout no other caller uses (so it compiles here unless numba's cache already holds it), loads or
    compiles without that warning, and computes the reference's product."""
    pm = ref.quantize(weights(40, 512, seed=3), "tq2_0", scale="absmax")
    x = np.random.default_rng(3).standard_normal((5, 512)).astype(np.float32)
    acts = ref.prepare_activations(x, pm.k_padded, pm.group)
    kern, bpg = fast._kern(pm), pm.fmt.bytes_per_group(pm.group)
    qs, index = fast._kernel_rows(pm, uniform=False)
    planes = simd.gather_planes8(acts.x, index)
    a, c = fast._scalars(pm)
    out = np.zeros((5, 2 * pm.n_rows), np.float32)[:, ::2]  # strided: a signature of its own
    simd.gemm(kern, qs, a, c, *fast._blocked_scalars(pm), bpg, planes, acts.xsum, acts.scale, False, out)
    np.testing.assert_array_equal(out, ref.gemm(pm, x))
    simd.gemv_groups(
        kern, qs, *fast._blocked_scalars(pm), bpg, planes[:1], acts.xsum[0], acts.scale[0], out[1]
    )
    np.testing.assert_array_equal(out[1], ref.gemm(pm, x[:1])[0])
    out[:] = 0  # the loops callers on one thread take, called from Python (compiled on their own)
    simd.gemm_serial(
        kern, qs, a, c, *fast._blocked_scalars(pm), bpg, planes, acts.xsum, acts.scale, False, out
    )
    np.testing.assert_array_equal(out, ref.gemm(pm, x))
    head = np.random.default_rng(4).standard_normal((70, 200)).astype(np.float16)
    logits = np.zeros(140, np.float32)[::2]  # strided
    fast.gemv_f16(head.view(np.uint16), np.ascontiguousarray(x[0, :200]), logits)
    want = head.astype(np.float64) @ x[0, :200].astype(np.float64)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-4)  # float32 sums in any order
    # the plans' entries (fast._run_plan, fast._run_token: a KernelPlan structref, numba's thread count getter
    # called through its address), compiled afresh for a kernel type no other test uses (its prefetch distance)
    monkeypatch.setattr(fast, "_prefetch", (simd.PREFETCH_GEMV_L2[0] + 64, 2))
    for matrix in (ref.quantize(weights(40, 512, seed=3), "tq2_0", scale="absmean"), pm):
        matrix.meta.clear()
        want = ref.gemm(matrix, x)
        np.testing.assert_array_equal(fast.gemm(matrix, x), want)
        np.testing.assert_array_equal(fast.gemm(matrix, x[:1]), want[:1])
        np.testing.assert_array_equal(fast.linear_token(matrix, x[2]), want[2])
    assert not [w for w in recwarn if "Cannot cache" in str(w.message)]


def test_prefetch_policy_is_read_from_the_environment(monkeypatch):
    """``BITSWEEP_KERNEL_PREFETCH``: 0 (none), 1 (this host's default), BYTES:L1 / BYTES:L2; anything else is an
    error naming the choices. The default goes by vendor (L1 a page ahead on Intel, L2 16 KiB ahead on AMD)."""
    monkeypatch.delenv(simd.PREFETCH_ENV, raising=False)
    default = simd.software_prefetch()
    vendor = simd.cpu_vendor()
    assert default == (simd.PREFETCH_GEMV_L2 if vendor == "AuthenticAMD" else simd.PREFETCH_GEMV_L1)
    for value, want in (("0", (0, 0)), ("1", default), ("8192:L2", (8192, 2)), ("4096:l1", (4096, 1))):
        monkeypatch.setenv(simd.PREFETCH_ENV, value)
        assert simd.software_prefetch() == want, value
    for bad in ("yes", "4096", "4096:L3", "-1:L1"):
        monkeypatch.setenv(simd.PREFETCH_ENV, bad)
        with pytest.raises(ConfigError, match="BYTES:L2"):
            simd.software_prefetch()
    assert simd.prefetch_distance(4, (0, 0)) == simd.PREFETCH_BATCH  # batches always prefetch


def test_weights_moved_to_huge_pages_give_the_same_bits(monkeypatch):
    """fast.to_huge_pages moves a matrix's codes and scales into the arena (cache-line aligned, on huge pages where
    the kernel gives them) and drops the plans made on the old arrays: the same bits after as before, for a
    GEMV, a batch and generation's call. ``BITSWEEP_HUGE_PAGES=0`` gives plain numpy arrays."""
    rng = np.random.default_rng(21)
    x = rng.standard_normal((5, 768)).astype(np.float32)
    for name, scale in (("tq2_0", "absmean"), ("int4", "absmax")):
        pm = ref.quantize(weights(50, 768, seed=8), name, scale=scale)
        before = (fast.gemm(pm, x), fast.gemm(pm, x[:1]), fast.linear_token(pm, x[2]))
        old = pm.qs
        fast.to_huge_pages(pm)
        assert pm.qs is not old and np.array_equal(pm.qs, old) and "_gemm_plans" not in pm.meta
        after = (fast.gemm(pm, x), fast.gemm(pm, x[:1]), fast.linear_token(pm, x[2]))
        for a, b in zip(before, after, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)
        if memory.arena().huge:
            assert memory.from_arena(pm.qs) and memory.from_arena(pm.d)
            assert pm.qs.ctypes.data % memory.ALIGN == 0 and pm.d.ctypes.data % memory.ALIGN == 0
    if memory.arena().huge and memory.transparent_huge_pages() in ("always", "madvise"):
        big = memory.copy(np.ones(3 * memory.HUGE_PAGE, np.uint8))  # a whole 2 MiB page at least
        assert memory.huge_page_bytes(big) >= memory.HUGE_PAGE
    small = memory.Arena("small").copy(np.ones(3 * memory.HUGE_PAGE, np.uint8))  # advised against huge pages
    assert memory.from_arena(small) and memory.huge_page_bytes(small) == 0
    monkeypatch.setenv(memory.HUGE_PAGES_ENV, "0")
    plain = memory.Arena()
    assert not plain.huge and not memory.from_arena(plain.copy(np.ones(10)))
    monkeypatch.setenv(memory.HUGE_PAGES_ENV, "maybe")
    with pytest.raises(ConfigError, match="0 or 1"):
        memory.Arena()


def test_group_batches_give_the_same_bits_as_one_span_per_group():
    """Rows long enough for the batched group sums (two full-width batches, a batch of each narrower width and a
    remainder, on every path here), for every format with per-group scales whose groups qualify: the reference's
    bits, batched or not, for one token (GEMV) and for batches of four tokens and a remainder (GEMM). 21 rows: a
    task of 16 and one of 5, so on AVX-512 the full batches' row blocks (simd.transpose_blocks) are square in one
    task and partial in the other."""
    previous = fast.current_isa()
    rng = np.random.default_rng(12)
    row_blocks = set()
    try:
        for path in [p for p in simd.available_isas() if p != "portable"]:
            fast.set_isa(path)
            for name in sorted(FORMATS):
                fmt = FORMATS[name]
                bpg = fmt.bytes_per_group(fmt.default_group)
                if not simd.batched_groups(path, simd.KIND[fmt.fmt_id], bpg):
                    continue
                if simd.row_blocks(path, simd.KIND[fmt.fmt_id], bpg):
                    row_blocks.add((path, name))
                # two batches of the widest vectors, one of each narrower width, then three groups alone
                widths = simd.batch_widths(path, bpg)
                n_groups = 2 * simd.batch_lanes(widths[0]) + sum(map(simd.batch_lanes, widths[1:])) + 3
                k = fmt.default_group * n_groups
                pm = ref.quantize(weights(21, k, seed=5), name, scale="absmax")
                x = rng.standard_normal((6, k)).astype(np.float32)
                expected = ref.gemm(pm, x)
                for batched in (True, False):
                    fast.set_group_batches(batched)
                    np.testing.assert_array_equal(
                        fast.gemm(pm, x), expected, err_msg=f"{name} {path} {batched}"
                    )
                    np.testing.assert_array_equal(fast.linear_token(pm, x[1]), expected[1])
    finally:
        fast.set_group_batches(True)
        fast.set_isa(previous)
    if {"avx512vnni", "avx512bw"} & set(simd.available_isas()):  # 16 groups per batch: row blocks
        assert {"binary", "int2", "int4", "tq2_0"} <= {name for _, name in row_blocks}, row_blocks


@pytest.mark.llamacpp
def test_the_llamacpp_peer_of_the_kernel_bench_computes_our_product():
    """bench/kernels.py times llama.cpp's TQ2_0 GEMV (ggml's mul_mat through its C API, bench/ggml_peer.py) beside
    ours: on our codes and scales it must compute our product (to its Q8_K activation rounding), on 1 and 2
    threads, or the ratio compares different work."""
    pytest.importorskip("llama_cpp")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from ggml_peer import GgmlTq2Gemv

    w = weights(96, 1024, seed=9)
    pm = ref.quantize(w, "tq2_0", scale="absmean")
    x = np.random.default_rng(9).standard_normal(1024).astype(np.float32)
    expected = ref.gemv(pm, x, "fp32")
    peer = GgmlTq2Gemv(pm.qs, pm.d, copies=2, threads=1)
    try:
        for threads in (1, 2):
            peer.use_threads(threads)
            peer.set_input(x)
            peer(1)
            got = peer.output(1)
            assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max(), threads
            assert np.corrcoef(got, expected)[0, 1] > 0.9999
        with pytest.raises(ValueError, match="1024 wide"):
            peer.set_input(x[:100])
    finally:
        peer.close()


@pytest.mark.llamacpp
def test_the_kernel_bench_times_runs_against_the_bandwidth_of_its_own_loop():
    """bench/kernels.py's cell on a small shape, as its closing-note figures come from it: every candidate (ggml's
    TQ2_0 too) timed in runs with the lead call reported apart, each fraction of the bandwidth is of the best
    streaming read of the same loop (its probe or numpy's ``W @ x``), and the issue's target rows read from cells."""
    import argparse

    pytest.importorskip("llama_cpp")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import kernels as bench

    # the bench unsets OpenBLAS's overrides at import, for its own process: put them back for the tests after this
    os.environ.update({name: value for name, value in bench.OPENBLAS_UNSET.items() if value is not None})
    previous = numba.get_num_threads()
    probe = [np.ones(2**17, np.int64) for _ in range(2)]
    w = np.random.default_rng(3).standard_normal((64, 4096)).astype(np.float32)
    cell_weights = bench.cell_weights(w, ["tq2_0", "int4"], 2**18, 2**22, probe)
    try:
        args = argparse.Namespace(formats=["tq2_0", "int4"], fp32_act=True, repeats=2)
        cell, bandwidth = bench.bench_cell(4096, 1, 1, cell_weights, args)
    finally:
        cell_weights["llamacpp_tq2_0"].close()
        numba.set_num_threads(previous)
    expected = {
        "numpy_fp32",
        "read_probe",
        "int8_unpacked",
        "llamacpp_tq2_0",
        "tq2_0",
        "int4",
        "tq2_0_fp32act",
    }
    assert expected <= set(cell), sorted(cell)
    for name, res in cell.items():
        assert res["best_ms"] > 0 and res["isolated_best_ms"] > 0, name
        fraction = res["weight_bytes"] / (res["best_ms"] / 1e3) / bandwidth  # best_ms is rounded to 0.1 us
        assert res["roofline"] == pytest.approx(fraction, rel=0.01, abs=0.002), name
    assert max(cell["read_probe"]["roofline"], cell["numpy_fp32"]["roofline"]) == 1.0
    rows = bench.target_rows([{"shape": [4096, 4096], "batch": 1, "threads": 1, "results": cell}], [1])
    measures = {(row["format"], row["measure"]) for row in rows}
    assert ("tq2_0", "fraction of read bandwidth") in measures and (
        "tq2_0",
        "x llama.cpp TQ2_0 (ggml)",
    ) in measures
    assert all(isinstance(row["met"], bool) and row["now"] > 0 for row in rows)

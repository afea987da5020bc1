"""What each backend can do, as plain data.

The workflow reads this table to reject impossible (backend, scheme, bits) cells before any job runs, so it
must never import a framework. A backend's implementation lives in the module named by ``BackendInfo.module``
and is imported only when a job actually uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bitsweep.errors import ConfigError, unknown


@dataclass(frozen=True)
class LlamaCppType:
    """One ``llama-quantize`` target type.

    ``bits`` is the nominal bit class used to place the type on the 1-8 bit axis; ``bpw`` is the type's own
    bits per weight for tensors whose rows fit its block size (the real, per-file number is measured from the
    quantized GGUF, since llama.cpp falls back to other types per tensor).
    """

    name: str
    bits: int
    bpw: float
    needs_imatrix: bool = False


# Bits per weight from ggml's block layouts (block bytes * 8 / block elements).
LLAMACPP_TYPES: dict[str, LlamaCppType] = {
    t.name: t
    for t in [
        LlamaCppType("F32", 32, 32.0),
        LlamaCppType("F16", 16, 16.0),
        LlamaCppType("BF16", 16, 16.0),
        LlamaCppType("Q8_0", 8, 8.5),
        LlamaCppType("Q6_K", 6, 6.5625),
        LlamaCppType("Q5_K_M", 5, 5.5),
        LlamaCppType("Q5_K_S", 5, 5.5),
        LlamaCppType("Q5_1", 5, 6.0),
        LlamaCppType("Q5_0", 5, 5.5),
        LlamaCppType("Q4_K_M", 4, 4.5),
        LlamaCppType("Q4_K_S", 4, 4.5),
        LlamaCppType("Q4_1", 4, 5.0),
        LlamaCppType("Q4_0", 4, 4.5),
        LlamaCppType("IQ4_NL", 4, 4.5),
        LlamaCppType("IQ4_XS", 4, 4.25),
        LlamaCppType("Q3_K_L", 3, 3.4375),
        LlamaCppType("Q3_K_M", 3, 3.4375),
        LlamaCppType("Q3_K_S", 3, 3.4375),
        LlamaCppType("IQ3_M", 3, 3.4375),
        LlamaCppType("IQ3_S", 3, 3.4375),
        LlamaCppType("IQ3_XS", 3, 3.0625, needs_imatrix=True),
        LlamaCppType("IQ3_XXS", 3, 3.0625, needs_imatrix=True),
        LlamaCppType("Q2_K", 2, 2.625),
        LlamaCppType("Q2_K_S", 2, 2.625, needs_imatrix=True),
        LlamaCppType("IQ2_M", 2, 2.5, needs_imatrix=True),
        LlamaCppType("IQ2_S", 2, 2.5, needs_imatrix=True),
        LlamaCppType("IQ2_XS", 2, 2.3125, needs_imatrix=True),
        LlamaCppType("IQ2_XXS", 2, 2.0625, needs_imatrix=True),
        LlamaCppType("TQ2_0", 2, 2.0625),
        LlamaCppType("IQ1_M", 1, 1.75, needs_imatrix=True),
        LlamaCppType("IQ1_S", 1, 1.5625, needs_imatrix=True),
        LlamaCppType("TQ1_0", 1, 1.6875),
    ]
}


# NNCF weight-compression modes (nncf.CompressWeightsMode names) and their bit class. "NONE": the fp32 IR
# as exported, the OpenVINO runtime's own full-precision check against torch.
NNCF_MODES: dict[str, int] = {
    "NONE": 32,
    "INT8_ASYM": 8, "INT8_SYM": 8, "MXFP8_E4M3": 8, "FP8_E4M3": 8,
    "INT4_ASYM": 4, "INT4_SYM": 4, "NF4": 4, "MXFP4": 4, "FP4": 4, "NVFP4": 4,
    "INT3_SYM": 3, "INT2_SYM": 2,
    "STATIC_INT8": 8,  # nncf.quantize: weights and activations
}  # fmt: skip


@dataclass(frozen=True)
class BackendInfo:
    """What the planner needs to know about a backend without importing it."""

    name: str
    module: str  # "package.module:Class", imported lazily by bitsweep.backends.get_backend
    source_format: str  # the converted format its quantizer reads: "gguf", "hf", "onnx", ...
    type_key: str  # the scheme option naming the format: "type" (llama.cpp), "mode" (NNCF)
    type_bits: dict[str, int]  # format -> bit class
    options: frozenset[str]  # every option a scheme of this backend may set
    group_sizes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # format -> group sizes it takes
    unavailable: dict[str, str] = field(default_factory=dict)  # option -> why this host cannot run it

    @property
    def bits(self) -> frozenset[int]:
        return frozenset(self.type_bits.values())

    def check_scheme(self, scheme: str, bits: int, options: dict) -> None:
        """Reject a scheme this backend cannot run, naming what it can."""
        where = f"scheme {self.name}/{scheme}"
        for option, why in self.unavailable.items():
            if options.get(option):
                raise ConfigError(f"{where}: {option} cannot run here: {why}")
        if bits not in self.bits:
            raise ConfigError(
                f"backend {self.name!r} cannot quantize to {bits} bits ({where}); "
                f"it supports: {', '.join(map(str, sorted(self.bits)))}"
            )
        extra = set(options) - self.options
        if extra:
            raise ConfigError(f"{where}: unknown options {sorted(extra)}; known: {sorted(self.options)}")
        kind = str(options.get(self.type_key, "")).upper()
        if kind not in self.type_bits:
            raise unknown(f"{self.name} {self.type_key}", kind, self.type_bits)
        if self.type_bits[kind] != bits:
            raise ConfigError(
                f"{where}: {self.type_key} {kind} is {self.type_bits[kind]}-bit, config says {bits}"
            )
        groups = self.group_sizes.get(kind)
        given = options.get("group_size")
        if groups is not None and given is not None and given not in groups:
            known = ", ".join(map(str, sorted(groups))) or "(none)"
            raise ConfigError(
                f"{where}: {self.type_key} {kind} takes group_size {known}; config says {given}"
            )


# bitsweep's own packed formats (bitsweep.kernels.formats) and their bit class: the ternary layouts sit where
# llama.cpp puts TQ2_0 (2) and TQ1_0 (1).
BITNET_FORMATS: dict[str, int] = {"TQ2_0": 2, "TQ1_0": 1, "BINARY": 1, "INT2": 2, "INT3": 3, "INT4": 4}


# ONNX Runtime's quantizers (backend onnxruntime) and their bit class. NONE: the fp32 export as is (ONNX
# Runtime's own full-precision check against torch). BLOCK_*: weight-only blockwise MatMulNBits (RTN); this
# onnxruntime's blockwise quantizer accepts bits 2, 4 and 8 only ("Only support 2, 4 or 8 bits quantization");
# its k-quant algorithm fails on SmolLM2's 576-wide rows (a reshape error inside onnxruntime 1.31), so it is not
# offered.
ORT_FORMATS: dict[str, int] = {
    "NONE": 32, "DYNAMIC_INT8": 8, "QDQ_INT8": 8, "BLOCK_INT8": 8, "BLOCK_INT4": 4, "BLOCK_INT2": 2, "HQQ_INT4": 4,
}  # fmt: skip
ORT_OPTIONS = frozenset({"format", "block_size", "symmetric", "accuracy_level", "op_types", "per_channel",
                         "weight_type", "activation_type", "calibrate_method", "exclude", "dataset"})  # fmt: skip

# Olive passes (backend olive), named by what they make. Olive runs its own graph optimisation first. Not
# offered: Olive 0.13's OnnxHqqQuantization, whose output on our export keeps every float weight beside the
# 4-bit ones (702 MB) and destroys the model (SmolLM2: KLD 66) where onnxruntime's own HQQ quantizer on the same
# graph gives KLD 0.31 (backend onnxruntime, HQQ_INT4).
OLIVE_FORMATS: dict[str, int] = {"NONE": 32, "DYNAMIC_INT8": 8, "RTN_INT8": 8, "RTN_INT4": 4}

# Qualcomm QNN QDQ configurations (onnxruntime's QNN helpers): weight bits x activation bits. The bit class is
# the weights'; 16-bit activations need opset 21.
QNN_FORMATS: dict[str, int] = {"W8A8": 8, "W8A16": 8, "W4A16": 4, "W16A16": 16}


@dataclass(frozen=True)
class MLXMode:
    """One MLX weight quantization (``mx.quantize`` through mlx-lm's ``quantize_model``).

    ``bits`` is the width of every quantized layer; for a mixed recipe it is the low width (the bit class) and
    ``high_bits`` the width mlx-lm's recipe gives v_proj/down_proj of the first and last eighth of the layers
    and of every third layer between, and a separate LM head. ``group_sizes``: those MLX accepts, its default
    first (microscaling formats have one fixed group).
    """

    name: str
    mode: str  # mx.quantize mode: affine, mxfp4, nvfp4, mxfp8; "none": the converted model as is
    bits: int
    group_sizes: tuple[int, ...] = (64, 32, 128)
    recipe: str | None = None  # mlx_lm.convert.QUANT_RECIPES
    high_bits: int | None = None


# Every affine width mx.quantize accepts ("The supported bits are 1, 2, 3, 4, 5, 6 and 8"), its microscaling
# formats and mlx-lm's mixed recipes; all run on the CPU backend. NONE: the converted fp model as is, MLX's
# own full-precision check against torch.
MLX_MODES: dict[str, MLXMode] = {
    m.name: m
    for m in [
        MLXMode("NONE", "none", 32, ()),
        *(MLXMode(f"AFFINE{b}", "affine", b) for b in (1, 2, 3, 4, 5, 6, 8)),
        MLXMode("MXFP8", "mxfp8", 8, (32,)),
        MLXMode("MXFP4", "mxfp4", 4, (32,)),
        MLXMode("NVFP4", "nvfp4", 4, (16,)),
        MLXMode("MIXED_4_6", "affine", 4, recipe="mixed_4_6", high_bits=6),
        MLXMode("MIXED_3_6", "affine", 3, recipe="mixed_3_6", high_bits=6),
        MLXMode("MIXED_3_4", "affine", 3, recipe="mixed_3_4", high_bits=4),
        MLXMode("MIXED_2_6", "affine", 2, recipe="mixed_2_6", high_bits=6),
    ]
}
# MLX features this host (Linux, MLX's CPU backend) cannot run: refused at config time, with why.
MLX_GPU_ONLY: dict[str, str] = {
    "quantize_input": "activation quantization (nn.quantize(quantize_input=True), mx.qqmm: nvfp4/mxfp8 "
    "W4A4/W8A8) has kernels only in MLX's GPU backends (Metal, CUDA); its CPU backend raises "
    "'[QQMatmul] NYI for the general case'",
}


BACKENDS: dict[str, BackendInfo] = {
    "llamacpp": BackendInfo(
        name="llamacpp",
        module="bitsweep.backends.llamacpp:LlamaCppBackend",
        source_format="gguf",
        type_key="type",
        type_bits={t.name: t.bits for t in LLAMACPP_TYPES.values()},
        options=frozenset({"type", "imatrix", "pure", "extra_args"}),
    ),
    "openvino": BackendInfo(
        name="openvino",
        module="bitsweep.backends.openvino:OpenVINOBackend",
        source_format="openvino",
        type_key="mode",
        type_bits=NNCF_MODES,
        options=frozenset(
            {
                "mode",
                "group_size",
                "ratio",
                "all_layers",
                "backup_mode",
                "awq",
                "scale_estimation",
                "gptq",
                "lora_correction",
                "sensitivity_metric",
                "dataset",
                "subset_size",
            }
        ),
    ),
    "onnxruntime": BackendInfo(
        name="onnxruntime",
        module="bitsweep.backends.onnx:OnnxRuntimeBackend",
        source_format="onnx",
        type_key="format",
        type_bits=ORT_FORMATS,
        options=ORT_OPTIONS,
    ),
    "olive": BackendInfo(
        name="olive",
        module="bitsweep.backends.olive:OliveBackend",
        source_format="onnx",
        type_key="format",
        type_bits=OLIVE_FORMATS,
        options=frozenset({"format", "block_size", "symmetric", "per_channel"}),
    ),
    "qnn": BackendInfo(
        name="qnn",
        module="bitsweep.backends.qnn:QnnBackend",
        source_format="onnx",
        type_key="format",
        type_bits=QNN_FORMATS,
        options=frozenset({"format", "per_channel", "calibrate_method", "keep_float", "dataset"}),
    ),
    "mlx": BackendInfo(
        name="mlx",
        module="bitsweep.backends.mlx:MLXBackend",
        source_format="mlx",
        type_key="mode",
        type_bits={m.name: m.bits for m in MLX_MODES.values()},
        options=frozenset({"mode", "group_size", *MLX_GPU_ONLY}),
        group_sizes={m.name: m.group_sizes for m in MLX_MODES.values()},
        unavailable=MLX_GPU_ONLY,
    ),
    "bitnet": BackendInfo(
        name="bitnet",
        module="bitsweep.backends.bitnet:BitnetBackend",
        source_format="hf",
        type_key="format",
        type_bits=BITNET_FORMATS,
        options=frozenset({"format", "scale", "group_size", "layers", "act", "keep_dtype"}),
    ),
}


def backend_info(name: str) -> BackendInfo:
    try:
        return BACKENDS[name]
    except KeyError:
        raise unknown("backend", name, BACKENDS) from None


def mlx_mode(name: str) -> MLXMode:
    try:
        return MLX_MODES[name.upper()]
    except KeyError:
        raise unknown("MLX mode", name, MLX_MODES) from None


def llamacpp_type(name: str) -> LlamaCppType:
    try:
        return LLAMACPP_TYPES[name.upper()]
    except KeyError:
        raise unknown("llama.cpp quantization type", name, LLAMACPP_TYPES) from None

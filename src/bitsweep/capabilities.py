"""What each backend can do, as plain data.

The workflow reads this table to reject impossible (backend, scheme, bits) cells before any job runs, so it
must never import a framework. A backend's implementation lives in the module named by ``BackendInfo.module``
and is imported only when a job actually uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def bits(self) -> frozenset[int]:
        return frozenset(self.type_bits.values())

    def check_scheme(self, scheme: str, bits: int, options: dict) -> None:
        """Reject a scheme this backend cannot run, naming what it can."""
        where = f"scheme {self.name}/{scheme}"
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


# bitsweep's own packed formats (bitsweep.kernels.formats) and their bit class: the ternary layouts sit where
# llama.cpp puts TQ2_0 (2) and TQ1_0 (1).
BITNET_FORMATS: dict[str, int] = {"TQ2_0": 2, "TQ1_0": 1, "BINARY": 1, "INT2": 2, "INT3": 3, "INT4": 4}


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


def llamacpp_type(name: str) -> LlamaCppType:
    try:
        return LLAMACPP_TYPES[name.upper()]
    except KeyError:
        raise unknown("llama.cpp quantization type", name, LLAMACPP_TYPES) from None

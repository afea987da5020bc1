"""llama.cpp: HF -> GGUF with its own converter, importance matrices and quantization with its own tools,
evaluation through llama-cpp-python (the same build, so the same kernels). Capability data only: nothing here
imports llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bitsweep.backends.base import BackendInfo, Footprint, FormatInfo
from bitsweep.backends.llamacpp.settings import Settings
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


def llamacpp_type(name: str) -> LlamaCppType:
    try:
        return LLAMACPP_TYPES[name.upper()]
    except KeyError:
        raise unknown("llama.cpp quantization type", name, LLAMACPP_TYPES) from None


GGUF = FormatInfo(
    "gguf",
    converter="bitsweep.backends.llamacpp.convert:convert",
    runner="bitsweep.backends.llamacpp.runner:Runner",
    # convert_hf_to_gguf loads tensors lazily and writes them one by one (f32 out)
    convert_footprint=Footprint(500, 6.0),
)


@dataclass(frozen=True)
class LlamaCppInfo(BackendInfo):
    def check_options(self, where: str, options: dict[str, Any]) -> None:
        qtype = llamacpp_type(str(options["type"]))
        if qtype.needs_imatrix and options.get("imatrix") is False:
            raise ConfigError(f"{where}: llama.cpp type {qtype.name} requires an importance matrix")

    def needs_calibration(self, options: dict[str, Any]) -> bool:
        return bool(options.get("imatrix"))

    def convert_options(self, settings: Settings) -> dict[str, Any]:
        return {"outtype": settings.convert_outtype}


INFO = LlamaCppInfo(
    # peak memory (bitsweep.planning): llama-quantize streams tensors from the mmapped f32 GGUF; the runner maps the quantized file
    quantize_footprint=Footprint(300, 4.0),
    evaluate_footprint=Footprint(700, 2.0),
    name="llamacpp",
    package=__name__,
    settings=Settings,
    source_format=GGUF,
    type_key="type",
    type_bits={t.name: t.bits for t in LLAMACPP_TYPES.values()},
    options=frozenset({"type", "imatrix", "pure", "extra_args"}),
    calibration_step=True,  # llama-imatrix on the calibration text, once for every scheme that wants it
    unsupported_architectures={
        "bitnet": "llama.cpp's convert_hf_to_gguf.py (llama-cpp-python 0.3.36) knows BitNet's sub-layer norms "
        "only by 1bitLLM's names (inner_attn_ln, ffn_layernorm), not by transformers' (attn_sub_norm, ffn_sub_norm): "
        "\"ValueError: Can not map tensor 'model.layers.0.mlp.ffn_sub_norm.weight'\"; past that, it reads a BitNet "
        "vocabulary only from a SentencePiece tokenizer.model (BitNet b1.58 2B4T ships a byte-level BPE)",
    },
)

"""Olive: a real Olive workflow per variant (graph optimisation + one quantization pass) on the ONNX export,
scored on ONNX Runtime's CPU execution provider. Capability data only: nothing here imports Olive.
"""

from __future__ import annotations

from bitsweep.backends.base import BackendInfo, BackendSettings, Footprint
from bitsweep.backends.onnx_family import ONNX, ONNX_UNSUPPORTED

# Olive passes, named by what they make. Olive runs its own graph optimisation first. Not offered: Olive 0.13's
# OnnxHqqQuantization, whose output on our export keeps every float weight beside the 4-bit ones (702 MB) and
# destroys the model (SmolLM2: KLD 66) where onnxruntime's own HQQ quantizer on the same graph gives KLD 0.31
# (backend onnxruntime, HQQ_INT4).
OLIVE_FORMATS: dict[str, int] = {"NONE": 32, "DYNAMIC_INT8": 8, "RTN_INT8": 8, "RTN_INT4": 4}

INFO = BackendInfo(
    # peak memory (bitsweep.planning): an Olive workflow runs ORT's quantizers (peak 3.3 GB measured on SmolLM2-135M)
    quantize_footprint=Footprint(700, 24.0),
    evaluate_footprint=Footprint(700, 8.0),
    name="olive",
    one_core_quantizer=True,  # Olive's passes (ONNX rewriting, ONNX Runtime's quantizers): 0.4-0.8 cores
    package=__name__,
    settings=BackendSettings,  # threads and mem_mb only
    source_format=ONNX,
    type_key="format",
    type_bits=OLIVE_FORMATS,
    options=frozenset({"format", "block_size", "symmetric", "per_channel"}),
    runner="bitsweep.backends.onnx_family:OnnxRunner",
    unsupported_architectures=ONNX_UNSUPPORTED,
)

"""OpenVINO: HF -> stateful IR with optimum-intel's exporter, weight compression / quantization with NNCF,
inference on the CPU plugin. Capability data only: nothing here imports OpenVINO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bitsweep.backends.base import BackendInfo, Footprint, FormatInfo
from bitsweep.backends.openvino.settings import Settings

# NNCF weight-compression modes (nncf.CompressWeightsMode names) and their bit class. "NONE": the fp32 IR
# as exported, the OpenVINO runtime's own full-precision check against torch.
NNCF_MODES: dict[str, int] = {
    "NONE": 32,
    "INT8_ASYM": 8, "INT8_SYM": 8, "MXFP8_E4M3": 8, "FP8_E4M3": 8,
    "INT4_ASYM": 4, "INT4_SYM": 4, "NF4": 4, "MXFP4": 4, "FP4": 4, "NVFP4": 4,
    "INT3_SYM": 3, "INT2_SYM": 2,
    "STATIC_INT8": 8,  # nncf.quantize: weights and activations
}  # fmt: skip

OPENVINO = FormatInfo(
    "openvino",
    converter="bitsweep.backends.openvino.convert:convert",
    runner="bitsweep.backends.openvino.runner:Runner",
    # optimum-intel: the fp32 torch model plus the traced IR's constants
    convert_footprint=Footprint(900, 10.0),
)


@dataclass(frozen=True)
class OpenVINOInfo(BackendInfo):
    def needs_calibration(self, options: dict[str, Any]) -> bool:
        return bool(options.get("dataset")) or self.kind(options) == "STATIC_INT8"

    def quantize_threads(self, options: dict[str, Any], threads: int) -> int:
        # NNCF's data-free compression runs on one core (1.0-1.1 cores, 8-12 s a scheme on SmolLM2); its
        # data-aware methods run the model on OpenVINO's threads (GPTQ 1.75 cores, AWQ + scale estimation 1.6).
        return threads if self.needs_calibration(options) else 1


INFO = OpenVINOInfo(
    # peak memory (bitsweep.planning): NNCF holds the fp32 IR, its compressed copy and calibration statistics; compiled models keep the compressed weights
    quantize_footprint=Footprint(900, 10.0),
    evaluate_footprint=Footprint(900, 6.0),
    name="openvino",
    package=__name__,
    settings=Settings,
    source_format=OPENVINO,
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
)

"""Qualcomm QNN: QNN-ready QDQ ONNX models (onnxruntime's QNN tooling) on the ONNX export, scored on ONNX
Runtime's CPU execution provider, plus optional Qualcomm AI Hub compile + profile jobs on a hosted device.
Capability data only: nothing here imports onnxruntime or qai-hub.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitsweep.backends.base import BackendInfo, Footprint
from bitsweep.backends.onnx_family import ONNX, ONNX_UNSUPPORTED
from bitsweep.backends.qnn.settings import Settings

# Weight x activation bits of onnxruntime's QNN QDQ configurations. The bit class is the weights'; 16-bit
# activations need opset 21.
QNN_FORMATS: dict[str, int] = {"W8A8": 8, "W8A16": 8, "W4A16": 4, "W16A16": 16}


@dataclass(frozen=True)
class QnnInfo(BackendInfo):
    def preflight(self, settings: Settings) -> None:
        from bitsweep.backends.qnn.aihub import check_aihub

        check_aihub(settings.aihub)

    def device_profile_enabled(self, settings: Settings) -> bool:
        return settings.aihub.enabled


INFO = QnnInfo(
    # peak memory (bitsweep.planning): plus calibration activations: backends.qnn.mem_mb (12 GB) is the floor
    quantize_footprint=Footprint(400, 24.0),
    evaluate_footprint=Footprint(700, 8.0),
    name="qnn",
    one_core_quantizer=True,  # QDQ quantization with calibration through ONNX Runtime: about 1.2 cores
    package=__name__,
    settings=Settings,
    source_format=ONNX,
    type_key="format",
    type_bits=QNN_FORMATS,
    options=frozenset({"format", "per_channel", "calibrate_method", "keep_float", "dataset"}),
    runner="bitsweep.backends.onnx_family:OnnxRunner",
    unsupported_architectures=ONNX_UNSUPPORTED,
    device_profiler="bitsweep.backends.qnn.aihub:profile_on_aihub",
)

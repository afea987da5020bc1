"""``backends.onnxruntime``: ONNX Runtime's quantizers on the ONNX export."""

from __future__ import annotations

from dataclasses import dataclass, field

from bitsweep.backends.base import BackendSettings, Calibration


@dataclass(frozen=True)
class Settings(BackendSettings):
    # static QDQ: windows of the calibration text (ORT's calibrator keeps every activation in memory)
    calibration: Calibration = field(default_factory=lambda: Calibration(n_ctx=128, n_samples=16))

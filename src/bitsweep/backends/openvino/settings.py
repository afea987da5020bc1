"""``backends.openvino``: OpenVINO IR (optimum-intel exporter, stateful, fp32) compressed with NNCF."""

from __future__ import annotations

from dataclasses import dataclass, field

from bitsweep.backends.base import BackendSettings, Calibration


@dataclass(frozen=True)
class Settings(BackendSettings):
    # data-aware methods and static INT8
    calibration: Calibration = field(default_factory=Calibration)

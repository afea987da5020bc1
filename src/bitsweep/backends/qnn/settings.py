"""``backends.qnn``: QDQ models made with onnxruntime's QNN helpers; Qualcomm AI Hub (off by default)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from bitsweep.backends.base import BackendSettings, Calibration
from bitsweep.errors import ConfigError, unknown


@dataclass(frozen=True)
class AiHubConfig:
    """``backends.qnn.aihub``: compile + profile each QNN variant on a hosted Snapdragon device.

    ``on_missing_token``: ``fail`` stops the workflow before any job runs; ``skip`` writes a 'skipped' record
    per variant (logged to MLflow) and carries on. Static shapes for the compiler: ``seq_len`` new tokens on
    top of ``past_len`` cached ones.
    """

    enabled: bool = False
    device: str = "Samsung Galaxy S24 (Family)"
    target_runtime: str = "qnn_context_binary"
    on_missing_token: str = "fail"
    seq_len: int = 128
    past_len: int = 128
    timeout_s: int = 3600

    RUNTIMES: ClassVar[tuple[str, ...]] = ("qnn_context_binary", "qnn_lib_aarch64_android", "tflite", "onnx",
                                            "precompiled_qnn_onnx")  # fmt: skip
    ON_MISSING: ClassVar[tuple[str, ...]] = ("fail", "skip")

    def __post_init__(self) -> None:
        if self.target_runtime not in self.RUNTIMES:
            raise unknown("AI Hub target runtime", self.target_runtime, self.RUNTIMES)
        if self.on_missing_token not in self.ON_MISSING:
            raise unknown("backends.qnn.aihub.on_missing_token", self.on_missing_token, self.ON_MISSING)
        if self.seq_len < 1 or self.past_len < 1:
            raise ConfigError(
                "backends.qnn.aihub: seq_len and past_len must be >= 1 (QNN needs static shapes)"
            )


@dataclass(frozen=True)
class Settings(BackendSettings):
    mem_mb: int = 12000  # ORT's calibration session at 512 tokens peaks near 10 GB
    # the evaluation's window length: rotary angles and cache lengths up to it are calibrated
    calibration: Calibration = field(default_factory=lambda: Calibration(n_ctx=512, n_samples=4))
    aihub: AiHubConfig = field(default_factory=AiHubConfig)

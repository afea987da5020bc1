"""``backends.llamacpp``: llama.cpp (llama-cpp-python 0.3.36 and the llama.cpp tools built with it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from bitsweep.backends.base import BackendSettings
from bitsweep.errors import ConfigError, unknown


@dataclass(frozen=True)
class Imatrix:
    """``llama-imatrix`` on the calibration text: ``chunks`` chunks of ``n_ctx`` tokens."""

    chunks: int = 32
    n_ctx: int = 512

    def __post_init__(self) -> None:
        if self.chunks < 1 or self.n_ctx < 1:
            raise ConfigError("backends.llamacpp.imatrix: chunks and n_ctx must be >= 1")


@dataclass(frozen=True)
class Settings(BackendSettings):
    # HF -> GGUF with llama.cpp's own convert_hf_to_gguf.py; f32 keeps the reference weights bit-exact.
    convert_outtype: str = "f32"
    imatrix: Imatrix = field(default_factory=Imatrix)

    OUTTYPES: ClassVar[tuple[str, ...]] = ("f32", "f16", "bf16")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.convert_outtype not in self.OUTTYPES:
            raise unknown("backends.llamacpp.convert_outtype", self.convert_outtype, self.OUTTYPES)

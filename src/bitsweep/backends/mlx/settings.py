"""``backends.mlx``: Apple MLX (mlx 0.32 + mlx-lm 0.29), on its CPU backend here (Linux: no Metal)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from bitsweep.backends.base import BackendSettings
from bitsweep.errors import unknown


@dataclass(frozen=True)
class Settings(BackendSettings):
    # float32: MLX's CPU quantized matmul is fast only with float32 activations (and scales); see mlx.convert
    convert_dtype: str = "float32"
    # `threads` is recorded; MLX's CPU backend runs a model on one thread

    DTYPES: ClassVar[tuple[str, ...]] = ("float32", "float16", "bfloat16")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.convert_dtype not in self.DTYPES:
            raise unknown("backends.mlx.convert_dtype", self.convert_dtype, self.DTYPES)

"""Apple MLX via mlx-lm (Linux: ``mlx[cpu]``, macOS: Metal). Capability data only: nothing here imports MLX."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bitsweep.backends.base import BackendInfo, Footprint, FormatInfo
from bitsweep.backends.mlx.settings import Settings
from bitsweep.errors import unknown


@dataclass(frozen=True)
class MLXMode:
    """One MLX weight quantization (``mx.quantize`` through mlx-lm's ``quantize_model``).

    ``bits`` is the width of every quantized layer; for a mixed recipe it is the low width (the bit class) and
    ``high_bits`` the width mlx-lm's recipe gives v_proj/down_proj of the first and last eighth of the layers
    and of every third layer between, and a separate LM head. ``group_sizes``: those MLX accepts, its default
    first (microscaling formats have one fixed group).
    """

    name: str
    mode: str  # mx.quantize mode: affine, mxfp4, nvfp4, mxfp8; "none": the converted model as is
    bits: int
    group_sizes: tuple[int, ...] = (64, 32, 128)
    recipe: str | None = None  # mlx_lm.convert.QUANT_RECIPES
    high_bits: int | None = None


# Every affine width mx.quantize accepts ("The supported bits are 1, 2, 3, 4, 5, 6 and 8"), its microscaling
# formats and mlx-lm's mixed recipes; all run on the CPU backend. NONE: the converted fp model as is, MLX's
# own full-precision check against torch.
MLX_MODES: dict[str, MLXMode] = {
    m.name: m
    for m in [
        MLXMode("NONE", "none", 32, ()),
        *(MLXMode(f"AFFINE{b}", "affine", b) for b in (1, 2, 3, 4, 5, 6, 8)),
        MLXMode("MXFP8", "mxfp8", 8, (32,)),
        MLXMode("MXFP4", "mxfp4", 4, (32,)),
        MLXMode("NVFP4", "nvfp4", 4, (16,)),
        MLXMode("MIXED_4_6", "affine", 4, recipe="mixed_4_6", high_bits=6),
        MLXMode("MIXED_3_6", "affine", 3, recipe="mixed_3_6", high_bits=6),
        MLXMode("MIXED_3_4", "affine", 3, recipe="mixed_3_4", high_bits=4),
        MLXMode("MIXED_2_6", "affine", 2, recipe="mixed_2_6", high_bits=6),
    ]
}
# MLX features this host (Linux, MLX's CPU backend) cannot run: refused at config time, with why.
MLX_GPU_ONLY: dict[str, str] = {
    "quantize_input": "activation quantization (nn.quantize(quantize_input=True), mx.qqmm: nvfp4/mxfp8 "
    "W4A4/W8A8) has kernels only in MLX's GPU backends (Metal, CUDA); its CPU backend raises "
    "'[QQMatmul] NYI for the general case'",
}


def mlx_mode(name: str) -> MLXMode:
    try:
        return MLX_MODES[name.upper()]
    except KeyError:
        raise unknown("MLX mode", name, MLX_MODES) from None


MLX = FormatInfo(
    "mlx",
    converter="bitsweep.backends.mlx.convert:convert",
    runner="bitsweep.backends.mlx.runner:Runner",
    # fp32 torch weights and their MLX arrays
    convert_footprint=Footprint(700, 10.0),
    # MLX 0.32's CPU backend computes on one core (runner.Runner): its 512-token fp32 window took 80 s of the
    # conversion check on SmolLM2 with a second core held idle
    runner_threads=1,
)


@dataclass(frozen=True)
class MLXInfo(BackendInfo):
    def convert_options(self, settings: Settings) -> dict[str, Any]:
        return {"dtype": settings.convert_dtype}


INFO = MLXInfo(
    # peak memory (bitsweep.planning): fp32 arrays and their quantized copy; evaluation: the quantized model
    # and the float32 torch model scoring runs on (mlx.runner)
    quantize_footprint=Footprint(600, 8.0),
    evaluate_footprint=Footprint(900, 10.0),
    name="mlx",
    one_core_quantizer=True,  # mlx-lm's quantizer on MLX's CPU backend: 0.97 cores
    package=__name__,
    settings=Settings,
    source_format=MLX,
    type_key="mode",
    type_bits={m.name: m.bits for m in MLX_MODES.values()},
    options=frozenset({"mode", "group_size", *MLX_GPU_ONLY}),
    group_sizes={m.name: m.group_sizes for m in MLX_MODES.values()},
    unavailable=MLX_GPU_ONLY,
    unsupported_architectures={
        "bitnet": "mlx-lm 0.29.1's bitnet model loads only packed ternary checkpoints (uint8 weight + weight_scale, "
        "as microsoft/bitnet-b1.58-2B-4T ships them), not BitNetForCausalLM's float weights (the -bf16 "
        'checkpoint): "ValueError: Missing 14 parameters: model.layers.0.mlp.down_proj.weight_scale, ..." '
        "(on a 2-layer model)",
    },
)

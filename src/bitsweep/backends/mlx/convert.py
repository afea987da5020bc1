"""HF -> MLX with mlx-lm's converter, in float32 (``convert_dtype``).

Why float32: MLX keeps a quantized layer's scales and biases in the dtype of the weights it quantized, and its
CPU ``quantized_matmul`` is fast only with float32 activations: 4-bit at 512 x 576 x 1536 on this project's
2-core Xeon ran at ~3 GFLOP/s in float32, ~0.26 in bfloat16 and ~0.05 in float16.

Why the config is touched: transformers 5 writes the RoPE base under ``rope_parameters``; mlx-lm's Llama
reads a top-level ``rope_theta`` and silently falls back to 10000 (SmolLM2 uses 100000: logits off by up to
17). :func:`lift_rope_parameters` copies it up; the conversion check compares the fp logits with torch.

mlx-lm's Gemma 3 reads no ``layer_types``: its layers are global when ``(i + 1) % sliding_window_pattern == 0``
(default 6, Gemma 3's own layout). :func:`set_sliding_window_pattern` writes the period ``layer_types`` has, and
refuses a layout that has none (a 2-layer [sliding, global] model failed with ``IndexError: list index out of
range`` in mlx-lm; a non-periodic one would run its layers with the wrong window and RoPE base, silently).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bitsweep.errors import ConfigError

# mlx-lm models whose sliding-window layout is ``sliding_window_pattern`` alone (they ignore ``layer_types``)
PATTERN_MODELS = ("gemma3_text",)


def lift_rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """Copy the RoPE base (and a non-default scaling) from ``rope_parameters`` to where mlx-lm reads them."""
    params = config.get("rope_parameters") or {}
    if "rope_theta" in params and "rope_theta" not in config:
        config["rope_theta"] = params["rope_theta"]
    if params.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
        config["rope_scaling"] = params
    return config


def set_sliding_window_pattern(config: dict[str, Any]) -> dict[str, Any]:
    """Write the period of ``layer_types`` (every p-th layer global) as ``sliding_window_pattern``."""
    types = config.get("layer_types")
    if config.get("model_type") not in PATTERN_MODELS or not types:
        return config
    for period in range(1, len(types) + 1):
        expected = [
            "full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(len(types))
        ]
        if types == expected:
            config["sliding_window_pattern"] = period
            return config
    raise ConfigError(
        f"mlx-lm's {config['model_type']} runs every p-th layer global (sliding_window_pattern); this model's "
        f"layer_types {types} has no such period"
    )


def export_mlx(
    model_dir: str | Path, out: str | Path, dtype: str = "float32", trust_remote_code: bool = False
) -> None:
    """HF folder -> MLX folder (``model.safetensors`` + config + tokenizer) in ``dtype``.

    >>> export_mlx("data/models/smollm2-135m", "/tmp/smollm2-mlx")  # doctest: +SKIP
    """
    from mlx_lm.convert import convert

    out = Path(out)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # mlx-lm refuses an existing folder, even an empty one
    convert(str(model_dir), str(out), dtype=dtype, trust_remote_code=trust_remote_code)
    config_path = out / "config.json"
    config = set_sliding_window_pattern(lift_rope_parameters(json.loads(config_path.read_text())))
    config_path.write_text(json.dumps(config, indent=4))


def convert(model_dir: Path, out: Path, options: dict[str, Any], trust_remote_code: bool = False) -> None:
    export_mlx(model_dir, out, options.get("dtype", "float32"), trust_remote_code)

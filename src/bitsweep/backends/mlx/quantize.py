"""mlx-lm's ``quantize_model`` (``mx.quantize``: affine 1-8 bits, mxfp4, nvfp4, mxfp8, mixed recipes) on the
converted float32 model, and what the quantized folder really stores.

Stored layout of a quantized Linear / Embedding ``<name>`` (``model.safetensors``):
  ``<name>.weight``  uint32 ``(out, in * bits / 32)``, ``32 / bits`` codes per word from the low bits up
  ``<name>.scales``  ``(out, in / group_size)``: float32 (affine), uint8 e8m0 (mxfp4, mxfp8) or e4m3 (nvfp4)
  ``<name>.biases``  ``(out, in / group_size)`` float32, affine only
``config.json`` ``quantization``: ``{"group_size", "bits", "mode"}`` plus one entry per layer a mixed recipe
gives other parameters. mlx-lm leaves a layer float32, silently, when its rows don't divide by the group size.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

from bitsweep.backends.base import Applied, BaseQuantizer, QuantizeRequest
from bitsweep.backends.mlx import mlx_mode

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"


def tensor_shapes(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) over an MLX folder's ``model*.safetensors`` (no data read)."""
    from safetensors import safe_open

    shapes = {}
    for path in sorted(folder.glob("model*.safetensors")):
        with safe_open(path, "np") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = handle.get_slice(key)
                shapes[key] = (tensor.get_dtype(), tuple(tensor.get_shape()))
    return shapes


def quantized_layers(folder: Path) -> dict[str, dict[str, Any]]:
    """Per quantized layer, the width its file really stores, from the tensor shapes and its group size.

    ``in = scales columns * group_size`` and ``bits = 32 * weight columns / in``; ``mode`` and ``group_size``
    come from ``config.json`` (per layer where a mixed recipe set them, else the model-wide entry).
    """
    config = json.loads((folder / "config.json").read_text()).get("quantization") or {}
    shapes = tensor_shapes(folder)
    layers = {}
    for key, (scale_dtype, scale_shape) in shapes.items():
        if not key.endswith(".scales"):
            continue
        name = key.removesuffix(".scales")
        params = config.get(name) if isinstance(config.get(name), dict) else config
        weight_dtype, weight_shape = shapes[f"{name}.weight"]
        group = int(params.get("group_size", config["group_size"]))
        in_features = scale_shape[-1] * group
        layers[name] = {
            "mode": params.get("mode", config.get("mode", "affine")),
            "bits": 32 * weight_shape[-1] // in_features,
            "claimed_bits": int(params.get("bits", config["bits"])),
            "group_size": group,
            "shape": [weight_shape[0], in_features],
            "weight_dtype": weight_dtype,
            "scale_dtype": scale_dtype,
            "has_biases": f"{name}.biases" in shapes,
        }
    return layers


def store_summary(folder: Path) -> dict[str, Any]:
    """Quantized layers and weight elements by stored width, and the float tensors left as they were."""
    layers = quantized_layers(folder)
    count: Counter[int] = Counter()
    elements: Counter[int] = Counter()
    for layer in layers.values():
        count[layer["bits"]] += 1
        elements[layer["bits"]] += math.prod(layer["shape"])
    packed = {f"{name}.{part}" for name in layers for part in ("weight", "scales", "biases")}
    floats = {key: shape for key, (_, shape) in tensor_shapes(folder).items() if key not in packed}
    # mlx-lm leaves a layer unquantized, silently, when its row width is not a multiple of the group size
    matrices = [shape for shape in floats.values() if len(shape) == 2]
    return {
        "layers_by_bits": dict(sorted(count.items())),
        "elements_by_bits": dict(sorted(elements.items())),
        "scale_dtypes": sorted({layer["scale_dtype"] for layer in layers.values()}),
        "unquantized_tensors": len(floats),
        "unquantized_matrices": len(matrices),
        "unquantized_matrix_elements": sum(math.prod(shape) for shape in matrices),
        "mismatched": sorted(
            name for name, layer in layers.items() if layer["bits"] != layer["claimed_bits"]
        ),
    }


def param_count(folder: Path) -> int:
    """Elements of every tensor of an unquantized MLX folder: the parameter count bits/weight divide by."""
    return sum(math.prod(shape) for _, shape in tensor_shapes(folder).values())


def model_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("model*.safetensors"))


def quantize_folder(src: Path, out: Path, mode_name: str, group_size: int | None) -> dict[str, Any]:
    """mlx-lm's load -> quantize_model -> save (what ``mlx_lm.convert -q`` does), from the converted model."""
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import load, quantize_model, save

    mode = mlx_mode(mode_name)
    if mode.mode == "none":
        shutil.copytree(src, out, dirs_exist_ok=True)
        return {}
    group = int(group_size or mode.group_sizes[0])
    model, tokenizer, config = load(str(src), lazy=True, return_config=True)
    predicate = mixed_quant_predicate_builder(mode.recipe, model, group) if mode.recipe else None
    model, config = quantize_model(model, config, group, mode.bits, mode=mode.mode, quant_predicate=predicate)
    save(out, src, model, tokenizer, config)
    return {"mode": mode.mode, "bits": mode.bits, "high_bits": mode.high_bits, "group_size": group,
            "recipe": mode.recipe}  # fmt: skip


class Quantizer(BaseQuantizer):
    name: ClassVar[str] = "mlx"

    def versions(self) -> dict[str, str]:
        import mlx.core as mx
        import mlx_lm

        return {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__}

    def apply(self, request: QuantizeRequest) -> Applied:
        options = request.scheme.options
        quant = quantize_folder(request.src, request.out, str(options["mode"]), options.get("group_size"))
        n_params = param_count(request.src)
        applied = {"mode": str(options["mode"]).upper(), **quant, **store_summary(request.out),
                   "n_params": n_params, "bpw": 8 * model_bytes(request.out) / n_params}  # fmt: skip
        if applied["mismatched"]:
            log.warning("stored width differs from config.json for %s", applied["mismatched"])
        if applied["unquantized_matrices"] and quant:
            log.warning("%d weight matrices (%.1f%% of the parameters) stay unquantized: their rows do not "
                        "divide by the group size", applied["unquantized_matrices"],
                        100 * applied["unquantized_matrix_elements"] / n_params)  # fmt: skip
        return Applied(MODEL_FILE, applied)

"""Apple MLX: HF -> MLX with mlx-lm's converter, weight quantization with mlx-lm's ``quantize_model``
(``mx.quantize``: affine 1-8 bits, mxfp4, nvfp4, mxfp8, mixed recipes), inference with mlx-lm's model code on
MLX's CPU backend (Linux: no Metal).

Why float32 (``convert_dtype``): MLX keeps a quantized layer's scales and biases in the dtype of the weights
it quantized, and its CPU ``quantized_matmul`` is fast only with float32 activations: 4-bit at
512 x 576 x 1536 on this project's 2-core Xeon ran at ~3 GFLOP/s in float32, ~0.26 in bfloat16 and ~0.05 in
float16. So the converted model is float32 and every quantized model stores float32 scales (affine: and
biases), which its measured bits/weight shows (affine 4-bit g64: 4 + 2 * 32 / 64 = 5).

Why the config is touched: transformers 5 writes the RoPE base under ``rope_parameters``; mlx-lm's Llama
reads a top-level ``rope_theta`` and silently falls back to 10000 (SmolLM2 uses 100000: logits off by up to
17). :func:`lift_rope_parameters` copies it up; stages.convert_to_mlx checks the fp logits against torch.

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
import time
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bitsweep.backends.base import Artifact, QuantizeRequest, base_meta
from bitsweep.capabilities import mlx_mode

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"


def lift_rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """Copy the RoPE base (and a non-default scaling) from ``rope_parameters`` to where mlx-lm reads them."""
    params = config.get("rope_parameters") or {}
    if "rope_theta" in params and "rope_theta" not in config:
        config["rope_theta"] = params["rope_theta"]
    if params.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
        config["rope_scaling"] = params
    return config


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
    config_path.write_text(json.dumps(lift_rope_parameters(json.loads(config_path.read_text())), indent=4))


# ---------------------------------------------------------------------------------------------------------
# What a folder stores


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


# ---------------------------------------------------------------------------------------------------------
# Backend


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


class MLXBackend:
    name: ClassVar[str] = "mlx"

    def versions(self) -> dict[str, str]:
        import mlx.core as mx
        import mlx_lm

        return {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__}

    def quantize(self, request: QuantizeRequest) -> Artifact:
        options = request.scheme.options
        request.out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        quant = quantize_folder(request.src, request.out, str(options["mode"]), options.get("group_size"))
        seconds = time.perf_counter() - started
        n_params = param_count(request.src)
        meta = base_meta(request, self.name, self.versions())
        meta.update(
            model_file=MODEL_FILE,
            mode=str(options["mode"]).upper(),
            quantize_seconds=seconds,
            applied={**quant, **store_summary(request.out), "n_params": n_params,
                     "bpw": 8 * model_bytes(request.out) / n_params},
        )  # fmt: skip
        applied = meta["applied"]
        if applied["mismatched"]:
            log.warning("stored width differs from config.json for %s", applied["mismatched"])
        if applied["unquantized_matrices"] and quant:
            log.warning("%d weight matrices (%.1f%% of the parameters) stay unquantized: their rows do not "
                        "divide by the group size", applied["unquantized_matrices"],
                        100 * applied["unquantized_matrix_elements"] / n_params)  # fmt: skip
        artifact = Artifact(request.out, meta)
        artifact.save()
        return artifact

    def load(self, artifact: Artifact, threads: int, n_ctx: int = 512) -> MLXRunner:
        return MLXRunner(artifact.path, threads)


class MLXRunner:
    """mlx-lm's model on MLX's CPU device; logits and generation synchronised with ``mx.eval``.

    ``threads`` is not applied: MLX 0.32's CPU backend ran on one core in every layout we tried (two CPU
    streams, thread-local streams in two Python threads: cpu/wall 1.0), its bundled reference BLAS included.
    Neither ``mx.compile`` nor scoring a window in KV-cached chunks made a window faster: logits are one call.
    """

    def __init__(self, model_dir: str | Path, threads: int) -> None:
        import mlx.core as mx
        from mlx_lm.utils import load_model
        from transformers import AutoTokenizer

        mx.set_default_device(mx.cpu)
        self.mx = mx
        self.model, _ = load_model(Path(model_dir))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def _forward(self, ids: np.ndarray, cache=None):
        return self.model(self.mx.array(np.asarray(ids, dtype=np.int32)[None]), cache=cache)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        out = self._forward(ids)[0]
        self.mx.eval(out)
        return np.array(out.astype(self.mx.float32))

    def detokenize(self, ids: np.ndarray) -> bytes:
        return self.tokenizer.decode(ids.tolist(), clean_up_tokenization_spaces=False).encode()

    def generate(self, prompt: np.ndarray, n_new: int) -> tuple[float, float]:
        from mlx_lm.models.cache import make_prompt_cache

        mx = self.mx
        cache = make_prompt_cache(self.model)
        started = time.perf_counter()
        token = mx.argmax(self._forward(prompt, cache)[:, -1], axis=-1)
        mx.eval(token)
        prompt_done = time.perf_counter()
        for _ in range(n_new):
            token = mx.argmax(self.model(token[:, None], cache=cache)[:, -1], axis=-1)
            mx.eval(token)
        return prompt_done - started, time.perf_counter() - prompt_done

    def close(self) -> None:
        log.info("MLX peak memory %.0f MiB", self.mx.get_peak_memory() / 2**20)
        del self.model

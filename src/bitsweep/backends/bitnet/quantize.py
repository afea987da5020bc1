"""Quantize: the reference safetensors are read as NumPy arrays; every 2-D weight whose module name ends in one of
``layers`` (default: the projections of each decoder block, separate or fused) is packed with
bitsweep.kernels.formats (ternary TQ2_0/TQ1_0 layouts with BitNet's absmean scale by default, binary,
int2/3/4); everything else (embeddings, norms, a separate lm_head) stays as it is (``keep_dtype``). One
``model.safetensors`` holds both, so its size is the variant's size.

Option ``head`` (a format name; default ``float``) packs the LM head too, as llama.cpp's own TQ1_0/TQ2_0
quantization does (it stores the embedding/head in Q4_K): on a model with a tied head the one packed matrix serves
both, the embedding looking up dequantized rows (bitnet.runner.packed_embedding).

Post-training ternarisation of a model that was not trained ternary scores badly: that is the finding, not a bug.
A natively ternary checkpoint (BitNet b1.58 from the hub) packs without loss.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bitsweep.backends.base import Applied, BaseQuantizer, QuantizeRequest, copy_side_files
from bitsweep.errors import ConfigError, unknown

log = logging.getLogger(__name__)

# The projections of a decoder block, separate (Llama, Qwen3, Gemma 3, BitNet) or fused (Phi-3/Phi-4-mini: qkv_proj,
# gate_up_proj; without those two a Phi model kept 5/7 of its block weights in float16, silently).
DEFAULT_LAYERS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
                  "down_proj")  # fmt: skip
PACKED_JSON = "packed.json"
MODEL_FILE = "model.safetensors"
HEAD = "lm_head"


def scheme_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The scheme's options with defaults: format, scale, group_size, layers, act, keep_dtype, head."""
    from bitsweep.kernels.formats import ACT_MODES, FORMATS, get_format

    fmt = get_format(str(options.get("format", "tq2_0")).lower())
    out = {
        "format": fmt.name,
        "scale": options.get("scale", "absmean"),
        "group_size": fmt.check_group(int(options.get("group_size", fmt.default_group))),
        "layers": list(options.get("layers", DEFAULT_LAYERS)),
        "act": options.get("act", "int8"),
        # 2-D tensors left unpacked (embeddings, a separate lm_head); 1-D ones (norms) always stay fp32
        "keep_dtype": options.get("keep_dtype", "float16"),
        # the LM head: kept float, or packed in one of the formats (int4 groups of 64 ~ llama.cpp's Q4_K head)
        "head": str(options.get("head", "float")).lower(),
    }
    if out["head"] != "float":
        if out["head"] not in FORMATS:
            raise unknown("bitnet head format (option head)", out["head"], ["float", *FORMATS])
        head_fmt = FORMATS[out["head"]]
        out["head_group_size"] = head_fmt.check_group(
            int(options.get("head_group_size", head_fmt.default_group))
        )
    elif "head_group_size" in options:
        raise ConfigError("bitnet option head_group_size needs a packed head (option head: int4, ...)")
    if out["keep_dtype"] not in ("float16", "float32"):
        raise ConfigError(f"bitnet option keep_dtype must be float16 or float32, got {out['keep_dtype']!r}")
    if out["act"] not in ACT_MODES:
        raise unknown("bitnet activation mode (option act)", out["act"], ACT_MODES)
    return out


def _selected(name: str, array: np.ndarray, layers: list[str]) -> bool:
    """``layers`` entries are module names' last part (``down_proj``) or patterns on the whole name
    (``model.layers.1?.mlp.*``)."""
    if not (name.endswith(".weight") and array.ndim == 2):
        return False
    module = name.removesuffix(".weight")
    last = module.rsplit(".", 1)[-1]
    return any(
        last == pat if "." not in pat and "*" not in pat else fnmatch.fnmatchcase(module, pat)
        for pat in layers
    )


def head_tensor(tensors: dict[str, np.ndarray]) -> tuple[str, bool]:
    """The LM head's weight in a state dict and whether it is tied (the input embedding, which then stands in
    for it: transformers saves a tied head once, as the embedding)."""
    if f"{HEAD}.weight" in tensors:
        return f"{HEAD}.weight", False
    embeddings = [name for name in tensors if name.endswith("embed_tokens.weight")]
    if len(embeddings) != 1:
        raise ConfigError(
            f"no lm_head.weight and {len(embeddings)} embed_tokens weights: cannot find the LM head"
        )
    return embeddings[0], True


def pack_state_dict(tensors: dict[str, np.ndarray], settings: dict[str, Any]):
    """Split a state dict into packed matrices (by module name) and the tensors kept as they are."""
    from bitsweep.kernels.formats import quantize

    packed, kept = {}, {}
    if settings["head"] != "float":
        name, _ = head_tensor(tensors)
        tensors = dict(tensors)
        # group min/max (affine formats) or per-group absmax (sign-scaled ones): the head has no absmean rule
        packed[HEAD] = quantize(
            tensors.pop(name).astype(np.float32), settings["head"], settings["head_group_size"]
        )
    for name, array in tensors.items():
        if _selected(name, array, settings["layers"]):
            # `scale` is the rule of the sign-scaled formats; the affine ones always use each group's min/max
            packed[name.removesuffix(".weight")] = quantize(
                array.astype(np.float32), settings["format"], settings["group_size"], settings["scale"]
            )
        elif array.ndim >= 2 and np.issubdtype(array.dtype, np.floating):
            kept[name] = array.astype(settings["keep_dtype"])
        else:
            kept[name] = array
    if not set(packed) - {HEAD}:
        raise ConfigError(
            f"no 2-D weights match layers {settings['layers']}; check the bitnet option 'layers'"
        )
    return packed, kept


def _save(packed, kept, out: Path) -> None:
    from safetensors.numpy import save_file

    arrays = dict(kept)
    for module, pm in packed.items():  # the head's fmt and group are in packed.json
        arrays[f"{module}.qs"] = pm.qs
        arrays[f"{module}.d"] = pm.d
        if pm.m is not None:
            arrays[f"{module}.m"] = pm.m
    save_file(arrays, str(out / MODEL_FILE))


def load_packed(path: Path):
    """(packed matrices by module name, the other tensors, packed.json) of a bitnet artifact."""
    from safetensors.numpy import load_file

    from bitsweep.kernels.formats import PackedMatrix, get_format

    info = json.loads((path / PACKED_JSON).read_text())
    arrays = load_file(str(path / MODEL_FILE))
    packed = {}
    for module, spec in info["tensors"].items():
        packed[module] = PackedMatrix(
            get_format(spec.get("format", info["format"])), spec.get("group_size", info["group_size"]), spec["k"],
            arrays.pop(f"{module}.qs"), arrays.pop(f"{module}.d"), arrays.pop(f"{module}.m", None),
        )  # fmt: skip
    return packed, arrays, info


class Quantizer(BaseQuantizer):
    name: ClassVar[str] = "bitnet"

    def versions(self) -> dict[str, str]:
        import numba
        import torch
        import transformers

        return {"numba": numba.__version__, "numpy": np.__version__, "torch": torch.__version__,
                "transformers": transformers.__version__}  # fmt: skip

    def apply(self, request: QuantizeRequest) -> Applied:
        from safetensors.numpy import load_file

        settings = scheme_settings(request.scheme.options)
        src = Path(request.src)
        files = sorted(src.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"{src}: no *.safetensors files (bitnet reads the HF model folder)")
        tensors = {}
        for file in files:
            tensors |= load_file(str(file))
        packed, kept = pack_state_dict(tensors, settings)
        tied = HEAD in packed and f"{HEAD}.weight" not in tensors  # packed from the embedding (head_tensor)
        out = Path(request.out)
        _save(packed, kept, out)
        copy_side_files(src, out)
        packed_params = sum(pm.n_rows * pm.k for pm in packed.values())
        n_params = sum(a.size for a in kept.values()) + packed_params
        body = {m: pm for m, pm in packed.items() if m != HEAD}  # the block weights in the scheme's format
        packed_bytes = sum(pm.nbytes for pm in body.values())
        body_params = sum(pm.n_rows * pm.k for pm in body.values())
        padded = {m: [pm.k, pm.k_padded] for m, pm in packed.items() if pm.k_padded != pm.k}
        (out / PACKED_JSON).write_text(json.dumps({
            **settings,
            "tensors": {m: {"shape": [pm.n_rows, pm.k], "k_padded": pm.k_padded, "k": pm.k}
                        | ({"format": pm.fmt.name, "group_size": pm.group} if m == HEAD else {})
                        for m, pm in packed.items()},
            "tied_head": tied,  # the packed head is the input embedding too
        }, indent=1))  # fmt: skip
        file_bytes = (out / MODEL_FILE).stat().st_size
        applied = {
            **settings,
            "n_packed_tensors": len(packed),
            "n_params": n_params,
            "packed_params": packed_params,
            "bpw": 8 * file_bytes / n_params,
            # bits per weight of the packed layers alone, padding included
            "packed_bpw": 8 * packed_bytes / body_params,
            "nominal_bpw": next(iter(body.values())).fmt.bpw(settings["group_size"]),
            "padded_tensors": len(padded),
            "padding_example": next(iter(padded.items()), None),
        }
        log.info("packed %d tensors as %s: %.3f bits/weight in the packed layers, %.3f overall",
                 len(packed), settings["format"], applied["packed_bpw"], applied["bpw"])  # fmt: skip
        return Applied(MODEL_FILE, applied)

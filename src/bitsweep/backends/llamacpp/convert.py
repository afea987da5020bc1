"""HF -> GGUF with llama.cpp's own convert_hf_to_gguf.py, run with this interpreter (its gguf-py is installed).

Why a converted GGUF is sometimes rewritten (:func:`correct_gguf`): llama.cpp's Gemma 3 takes two things from its
own defaults instead of the model's config, and is silently wrong for a model that differs from them:

- the sliding-window layout: the converter writes none, and the runtime then assumes every 6th layer is global
  (``load_swa_pattern``); a 2-layer [sliding, global] Gemma 3 ran its global layer with the window and the local
  RoPE base (max |logit diff| vs torch 3.1). We write ``<arch>.attention.sliding_window_pattern`` from
  ``layer_types``.
- the attention scale: ``query_pre_attn_scalar`` is not read; queries are scaled by 1/sqrt(head_dim), or
  1/sqrt(hidden / heads) for the 62-layer 27B (right for every published Gemma 3). For any other value we fold
  sqrt(llama.cpp's divisor / query_pre_attn_scalar) into ``attn_q_norm`` (the queries are normalised right
  before RoPE and the product, so this scales exactly the scores): 0.93 -> 0.003 on a tiny model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bitsweep.backends.llamacpp.tools import converter_path, run_tool

GEMMA3_27B_LAYERS = 62  # llama.cpp's LLM_TYPE_27B for Gemma 3, whose query scale is 1/sqrt(hidden / heads)


def gguf_file(folder: str | Path) -> Path:
    """The one ``*.gguf`` of a converted or quantized folder (or the file itself)."""
    if Path(folder).is_file():
        return Path(folder)
    files = sorted(Path(folder).glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"{folder}: expected one .gguf file, found {[f.name for f in files]}")
    return files[0]


def convert_hf_to_gguf(model_dir: str | Path, out: str | Path, outtype: str = "f32") -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.gguf")
    run_tool([sys.executable, converter_path(), model_dir, "--outfile", tmp, "--outtype", outtype])
    config = json.loads((Path(model_dir) / "config.json").read_text())
    corrected = out.with_suffix(".corrected.gguf")
    if correct_gguf(tmp, config, corrected):
        corrected.replace(tmp)
    tmp.replace(out)


def sliding_layers(config: dict[str, Any]) -> list[bool] | None:
    """Which layers use the sliding window, from ``layer_types`` (or, in older configs, every
    ``sliding_window_pattern``-th layer global); None when no layer does."""
    types, period = config.get("layer_types"), config.get("sliding_window_pattern")
    if not types and isinstance(period, int) and period > 1 and config.get("sliding_window"):
        return [(i + 1) % period != 0 for i in range(config["num_hidden_layers"])]
    pattern = [t == "sliding_attention" for t in types or []]
    return pattern if any(pattern) else None


def query_scale_factor(model_type: str, text: dict[str, Any]) -> float:
    """What Gemma 3's queries must be multiplied by for llama.cpp's fixed scale to give the model's own."""
    if model_type not in ("gemma3_text", "gemma3"):
        return 1.0
    head_dim, scalar = text.get("head_dim", 256), text.get("query_pre_attn_scalar", 256)
    if text["num_hidden_layers"] == GEMMA3_27B_LAYERS:
        head_dim = text["hidden_size"] / text["num_attention_heads"]
    return float(np.sqrt(head_dim / scalar))


def correct_gguf(src: Path, config: dict[str, Any], out: Path) -> list[str]:
    """Write ``src`` corrected for ``config`` to ``out`` (see the module docstring); return what was corrected
    (nothing written when nothing needed it)."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    text = config.get("text_config") or config  # a multimodal Gemma 3 nests the language model's config
    pattern = sliding_layers(text)
    if gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch) in reader.fields:
        pattern = None
    factor = query_scale_factor(config.get("model_type", ""), text)
    done = ["sliding_window_pattern"] * bool(pattern) + ["query_scale"] * (factor != 1.0)
    if not done:
        return []
    writer = gguf.GGUFWriter(str(out), arch=arch)
    copy_metadata(reader, writer)
    if pattern:
        writer.add_sliding_window_pattern(pattern)
    tensors = [(t, _scaled(t, factor)) for t in reader.tensors]
    for tensor, data in tensors:
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data in tensors:
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()
    return done


def copy_metadata(reader, writer) -> None:
    """Every key/value of a GGUFReader into a GGUFWriter made for the same architecture (which writes the
    architecture and the file's own GGUF.* fields itself)."""
    import gguf

    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)


def _scaled(tensor, factor: float) -> np.ndarray:
    """A query-norm weight times ``factor`` (GGUF stores Gemma's ``1 + w``); any other tensor as it is."""
    if factor == 1.0 or not tensor.name.endswith("attn_q_norm.weight"):
        return tensor.data
    if tensor.data.dtype != np.float32:
        raise ValueError(f"{tensor.name}: expected float32, got {tensor.data.dtype}")
    return (tensor.data * np.float32(factor)).astype(np.float32)


def convert(model_dir: Path, out: Path, options: dict[str, Any], trust_remote_code: bool = False) -> None:
    """The converted folder holds ``model-<outtype>.gguf``."""
    outtype = options.get("outtype", "f32")
    convert_hf_to_gguf(model_dir, Path(out) / f"model-{outtype}.gguf", outtype)

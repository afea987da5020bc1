"""GGUF export (ternary formats): llama.cpp evaluates exactly our weights.

:func:`export_gguf` writes the packed model into a GGUF that llama.cpp loads, ternary tensors as TQ2_0 / TQ1_0
bytes (bit-identical to ours) and rows llama.cpp cannot hold as TQ (width not a multiple of 256) as their
dequantized fp32 values; :func:`cross_check_llamacpp` compares llama.cpp's logits on it with our kernels'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bitsweep.backends.bitnet.quantize import HEAD, load_packed
from bitsweep.errors import ConfigError


def _row_permutation(gguf_name: str, n_rows: int, config: dict) -> np.ndarray | None:
    """llama.cpp's converter permutes the rows of Q and K (rotary pairs interleaved); return that order."""
    n_head = config["num_attention_heads"]
    if gguf_name.endswith("attn_q"):
        heads = n_head
    elif gguf_name.endswith("attn_k"):
        heads = config.get("num_key_value_heads") or n_head
    else:
        return None
    idx = np.arange(n_rows)
    return idx.reshape(heads, 2, n_rows // heads // 2).swapaxes(1, 2).reshape(n_rows)


def export_gguf(artifact_dir: Path, f32_gguf: Path, out: Path) -> dict[str, Any]:
    """Write the packed model as a GGUF, starting from llama.cpp's f32 conversion of the same source model.

    Ternary tensors whose rows are whole 256-blocks are stored as TQ2_0/TQ1_0 bytes (ours, row-permuted like
    the converter for Q/K); other packed tensors as their dequantized fp32 values; everything else unchanged.
    Each replaced tensor is checked against the f32 GGUF: re-quantizing llama.cpp's own copy of the source
    weights with our rule must give our codes, which proves the name mapping and the row order.
    """
    import gguf

    from bitsweep.backends.llamacpp.convert import copy_metadata
    from bitsweep.kernels.formats import GGUF_TYPE_NAMES, dequantize, quantize

    packed, _, info = load_packed(artifact_dir)
    if HEAD in packed:
        raise ConfigError(
            "GGUF export keeps the LM head as llama.cpp converted it: export a scheme with head: float"
        )
    if info["format"] not in GGUF_TYPE_NAMES:
        raise ConfigError(f"GGUF export needs a ternary format (tq2_0, tq1_0), not {info['format']}")
    config = json.loads((artifact_dir / "config.json").read_text())
    qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPE_NAMES[info["format"]])
    reader = gguf.GGUFReader(str(f32_gguf))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    n_blocks = config["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(_arch_enum(gguf, arch), n_blocks)
    by_gguf = {}
    for module, pm in packed.items():
        target = name_map.get_name(module)
        if target is None:
            raise ConfigError(f"no GGUF tensor name for {module}")
        by_gguf[f"{target}.weight"] = (module, pm)

    writer = gguf.GGUFWriter(str(out), arch=arch)
    copy_metadata(reader, writer)
    stats = {"tq_tensors": 0, "f32_tensors": 0, "copied_tensors": 0}
    payloads = []
    for tensor in reader.tensors:
        if tensor.name not in by_gguf:
            data = np.array(tensor.data)
            if data.ndim >= 2 and data.dtype == np.float32:  # as the artifact keeps it (keep_dtype)
                data = data.astype(info["keep_dtype"])
            payloads.append((tensor.name, data, None))
            stats["copied_tensors"] += 1
            continue
        module, pm = by_gguf[tensor.name]
        source = np.asarray(tensor.data, dtype=np.float32).reshape(pm.n_rows, pm.k)
        perm = _row_permutation(tensor.name.removesuffix(".weight"), pm.n_rows, config)
        ours = pm if perm is None else type(pm)(pm.fmt, pm.group, pm.k, pm.qs[perm], pm.d[perm])
        check = quantize(source, info["format"], pm.group, info["scale"])
        if not (np.array_equal(check.qs, ours.qs) and np.array_equal(check.d, ours.d)):
            raise ConfigError(f"{tensor.name}: llama.cpp's weights do not re-quantize to ours ({module})")
        if pm.k_padded == pm.k:  # rows of whole 256-blocks: the GGUF holds our TQ bytes
            payloads.append((tensor.name, ours.to_gguf_bytes(), qtype))
            stats["tq_tensors"] += 1
        else:
            payloads.append((tensor.name, dequantize(ours), None))
            stats["f32_tensors"] += 1
    for name, data, raw in payloads:
        if raw is None:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {**stats, "format": info["format"], "gguf": str(out), "bytes": out.stat().st_size}


def _arch_enum(gguf, arch: str):
    for enum, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return enum
    raise ConfigError(f"unknown GGUF architecture {arch!r}")


def compare_logits(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """KL(a || b) per position (mean, max), top-1 agreement and max |logit diff| of two runs on one window."""
    from bitsweep.metrics import log_softmax

    pa, pb = log_softmax(a), log_softmax(b)
    kld = (np.exp(pa) * (pa - pb)).sum(-1)
    return {"kld_mean": float(kld.mean()), "kld_max": float(kld.max()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
            "max_abs_logit_diff": float(np.abs(a - b).max())}  # fmt: skip


def cross_check_llamacpp(artifact_dir: Path, f32_gguf: Path, windows: list[np.ndarray], out_gguf: Path,
                         threads: int = 2) -> dict[str, Any]:  # fmt: skip
    """Export to GGUF, run llama.cpp on it and our kernels on the artifact (both activation paths), compare."""
    from bitsweep.backends.bitnet.runner import Runner as BitnetRunner
    from bitsweep.backends.llamacpp.runner import Runner as LlamaCppRunner

    export = export_gguf(artifact_dir, f32_gguf, out_gguf)
    n_ctx = max(len(w) for w in windows)
    llama = LlamaCppRunner(out_gguf, threads, n_ctx)
    theirs = [llama.logits(w) for w in windows]
    llama.close()
    result: dict[str, Any] = {"export": export}
    for act in ("int8", "int8_block", "fp32"):
        ours = BitnetRunner(artifact_dir, threads, n_ctx, act=act)
        stats = [compare_logits(t, ours.logits(w)) for t, w in zip(theirs, windows, strict=True)]
        result[f"ours_{act}_vs_llamacpp"] = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}
        ours.close()
    return result

"""Backend ``bitnet``: the HF model with its Linear layers packed into our low-bit formats, run by our kernels.

Quantize: the reference safetensors are read as NumPy arrays; every 2-D weight whose module name ends in one of
``layers`` (default: the seven projections of each decoder block) is packed with bitsweep.kernels.formats
(ternary TQ2_0/TQ1_0 layouts with BitNet's absmean scale by default, binary, int2/3/4); everything else
(embeddings, norms, a separate lm_head) stays fp32. One ``model.safetensors`` holds both, so its size is the
variant's size. Post-training ternarisation of a model that was not trained ternary scores badly: that is the
finding, not a bug. A natively ternary checkpoint (BitNet b1.58 from the hub) packs without loss.

Run: transformers builds the architecture from ``config.json``; each packed Linear becomes a
:class:`PackedLinear` whose forward quantizes activations per token (int8 absmax, BitNet) or keeps them fp32, and
calls bitsweep.kernels.fast. Everything else (attention, norms, lm_head) is torch fp32.

Export: :func:`export_gguf` writes the packed model into a GGUF that llama.cpp loads, ternary tensors as TQ2_0 /
TQ1_0 bytes (bit-identical to ours) and rows llama.cpp cannot hold as TQ (width not a multiple of 256) as
their dequantized fp32 values, so llama.cpp evaluates exactly our weights.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from bitsweep.backends.base import Artifact, QuantizeRequest, base_meta, copy_side_files
from bitsweep.backends.torch_ref import TorchRunner
from bitsweep.errors import ConfigError, unknown

log = logging.getLogger(__name__)

DEFAULT_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PACKED_JSON = "packed.json"
# From this many tokens per call (prompt processing, scoring windows) PackedLinear decodes the weights and uses
# sgemm; below it (generation, small batches) it runs the packed GEMV/GEMM kernels directly. bench/kernels.py:
# the packed GEMM beats fp32 sgemm ~2x at 8 tokens and loses at 32 (0.55-0.85x).
DEQUANT_BATCH = 16
MODEL_FILE = "model.safetensors"


def scheme_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The scheme's options with defaults: format, scale, group_size, layers, act."""
    from bitsweep.kernels.formats import ACT_MODES, get_format

    fmt = get_format(str(options.get("format", "tq2_0")).lower())
    out = {
        "format": fmt.name,
        "scale": options.get("scale", "absmean"),
        "group_size": fmt.check_group(int(options.get("group_size", fmt.default_group))),
        "layers": list(options.get("layers", DEFAULT_LAYERS)),
        "act": options.get("act", "int8"),
        # 2-D tensors left unpacked (embeddings, a separate lm_head); 1-D ones (norms) always stay fp32
        "keep_dtype": options.get("keep_dtype", "float16"),
    }
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


def pack_state_dict(tensors: dict[str, np.ndarray], settings: dict[str, Any]):
    """Split a state dict into packed matrices (by module name) and the tensors kept as they are."""
    from bitsweep.kernels.formats import quantize

    packed, kept = {}, {}
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
    if not packed:
        raise ConfigError(
            f"no 2-D weights match layers {settings['layers']}; check the bitnet option 'layers'"
        )
    return packed, kept


def _save(packed, kept, out: Path) -> None:
    from safetensors.numpy import save_file

    arrays = dict(kept)
    for module, pm in packed.items():
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
            get_format(info["format"]), info["group_size"], spec["k"],
            arrays.pop(f"{module}.qs"), arrays.pop(f"{module}.d"), arrays.pop(f"{module}.m", None),
        )  # fmt: skip
    return packed, arrays, info


class BitnetBackend:
    name = "bitnet"

    def versions(self) -> dict[str, str]:
        import numba
        import torch
        import transformers

        return {"numba": numba.__version__, "numpy": np.__version__, "torch": torch.__version__,
                "transformers": transformers.__version__}  # fmt: skip

    def quantize(self, request: QuantizeRequest) -> Artifact:
        from safetensors.numpy import load_file

        settings = scheme_settings(request.scheme.options)
        src = Path(request.src)
        files = sorted(src.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"{src}: no *.safetensors files (bitnet reads the HF model folder)")
        started = time.perf_counter()
        tensors = {}
        for file in files:
            tensors |= load_file(str(file))
        packed, kept = pack_state_dict(tensors, settings)
        out = Path(request.out)
        out.mkdir(parents=True, exist_ok=True)
        _save(packed, kept, out)
        copy_side_files(src, out)
        packed_params = sum(pm.n_rows * pm.k for pm in packed.values())
        n_params = sum(a.size for a in kept.values()) + packed_params
        packed_bytes = sum(pm.nbytes for pm in packed.values())
        padded = {m: [pm.k, pm.k_padded] for m, pm in packed.items() if pm.k_padded != pm.k}
        (out / PACKED_JSON).write_text(json.dumps({
            **settings,
            "tensors": {m: {"shape": [pm.n_rows, pm.k], "k_padded": pm.k_padded, "k": pm.k} for m, pm in packed.items()},
        }, indent=1))  # fmt: skip
        file_bytes = (out / MODEL_FILE).stat().st_size
        applied = {
            **settings,
            "n_packed_tensors": len(packed),
            "n_params": n_params,
            "packed_params": packed_params,
            "bpw": 8 * file_bytes / n_params,
            # bits per weight of the packed layers alone, padding included
            "packed_bpw": 8 * packed_bytes / packed_params,
            "nominal_bpw": packed[next(iter(packed))].fmt.bpw(settings["group_size"]),
            "padded_tensors": len(padded),
            "padding_example": next(iter(padded.items()), None),
            "seconds": round(time.perf_counter() - started, 2),
        }
        log.info("packed %d tensors as %s: %.3f bits/weight in the packed layers, %.3f overall",
                 len(packed), settings["format"], applied["packed_bpw"], applied["bpw"])  # fmt: skip
        artifact = Artifact(out, {**base_meta(request, self.name, self.versions()), "model_file": MODEL_FILE,
                                  "applied": applied})  # fmt: skip
        artifact.save()
        return artifact

    def load(self, artifact: Artifact, threads: int, n_ctx: int) -> BitnetRunner:
        return BitnetRunner(artifact.path, threads)


def packed_linear_class():
    import torch

    from bitsweep.kernels import fast

    class PackedLinear(torch.nn.Module):
        """``y = x @ W.T (+ b)`` with ``W`` packed; x ``(..., k)`` fp32 -> y ``(..., n_rows)`` fp32."""

        def __init__(self, pm, bias, act: str) -> None:
            super().__init__()
            self.pm, self.act = pm, act
            self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

        def forward(self, x):
            shape, pm = x.shape, self.pm
            if self.act == "int8" and x.numel() == shape[-1] and x.dtype == torch.float32:
                # Generation: one token, one compiled call (Python-side overhead dominates otherwise).
                y = torch.from_numpy(fast.linear_token(pm, x.numpy().reshape(-1))).view(
                    *shape[:-1], pm.n_rows
                )
                return y if self.bias is None else y + self.bias
            flat = x.reshape(-1, shape[-1]).float().contiguous().numpy()
            acts = fast.prepare_activations_fast(flat, pm.k_padded, pm.group, self.act)
            if flat.shape[0] < DEQUANT_BATCH:
                y = torch.from_numpy(fast.gemm_prepared(pm, acts))
            else:
                # Prompt-sized batches: decode the weights once (our kernel) and let sgemm do the products, on
                # the same (int8-rounded) activations: the quantized model's arithmetic, in another order.
                n = flat.shape[0]
                x_used = (acts.x.reshape(n, -1, pm.group) * acts.scale[:, :, None]).reshape(n, -1)[:, : pm.k]
                y = torch.from_numpy(x_used) @ torch.from_numpy(fast.dequantize(pm)).T
            y = y.reshape(*shape[:-1], pm.n_rows)
            return y if self.bias is None else y + self.bias

        def extra_repr(self) -> str:
            return f"{self.pm.fmt.name}, group={self.pm.group}, k={self.pm.k}, n={self.pm.n_rows}, act={self.act}"

    return PackedLinear


def build_model(path: Path, act: str | None = None):
    """The transformers model of a bitnet artifact, its packed Linear layers replaced by PackedLinear."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    packed, kept, info = load_packed(path)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    PackedLinear = packed_linear_class()
    for module, pm in packed.items():
        parent_name, _, child = module.rpartition(".")
        parent = model.get_submodule(parent_name)
        bias = kept.pop(f"{module}.bias", None)
        linear = PackedLinear(pm, None if bias is None else torch.from_numpy(bias), act or info["act"])
        setattr(parent, child, linear)
    state = {name: torch.from_numpy(array.astype(np.float32)) for name, array in kept.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ConfigError(f"{path}: tensors the architecture does not have: {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers (rotary inv_freq): rebuilt on the CPU below
            missing.append(name)
    if any(not name.endswith("inv_freq") for name in missing):
        raise ConfigError(f"{path}: weights missing from the artifact: {missing[:5]}")
    _rebuild_rotary(model, config)
    return model.eval(), info


def _rebuild_rotary(model, config) -> None:
    """Rotary embeddings keep ``inv_freq`` as a non-persistent buffer: recreate those modules on the CPU."""
    import torch

    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            with torch.device("cpu"):
                setattr(parent, child, type(module)(config=config))


class BitnetRunner(TorchRunner):
    """TorchRunner's scoring and timed generation, on the packed model."""

    def __init__(self, path: str | Path, threads: int, act: str | None = None) -> None:
        import numba
        import torch
        from transformers import AutoTokenizer

        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        self.torch = torch
        self.model, self.info = build_model(Path(path), act)
        self.tokenizer = AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------------------------
# GGUF export (ternary formats): llama.cpp evaluates exactly our weights


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

    from bitsweep.kernels.formats import GGUF_TYPE_NAMES, dequantize, quantize

    packed, _, info = load_packed(artifact_dir)
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
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), val_type, sub_type=sub_type)
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
    from bitsweep.backends.llamacpp import LlamaCppRunner

    export = export_gguf(artifact_dir, f32_gguf, out_gguf)
    n_ctx = max(len(w) for w in windows)
    llama = LlamaCppRunner(out_gguf, threads, n_ctx)
    theirs = [llama.logits(w) for w in windows]
    llama.close()
    result: dict[str, Any] = {"export": export}
    for act in ("int8", "int8_block", "fp32"):
        ours = BitnetRunner(artifact_dir, threads, act=act)
        stats = [compare_logits(t, ours.logits(w)) for t, w in zip(theirs, windows, strict=True)]
        result[f"ours_{act}_vs_llamacpp"] = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}
        ours.close()
    return result

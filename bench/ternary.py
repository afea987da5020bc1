"""Benchmark: bitsweep's bitnet backend (TQ2_0, BitNet absmean weights, int8 activations, our numba kernels) side by
side with llama.cpp's TQ2_0 on the same weights and torch fp32 on the same model; prints one JSON document.

    .venv/bin/python bench/ternary.py                          # 1024 wide, 16 layers (~250 M parameters)
    .venv/bin/python bench/ternary.py --hidden 1536 --layers 24 --threads 1

The model: a random-weight Llama whose projection rows are whole 256-blocks (so llama.cpp holds every ternary
tensor as TQ2_0) with SmolLM2's tokenizer and vocabulary (49152), embedding tied to the head. Our quantizer packs
it; bitsweep.backends.bitnet.export writes those exact codes into a GGUF (each tensor checked against llama.cpp's
own f32 conversion), so both runtimes run the same ternary weights; the embedding/head stays float in both (f16
stored; llama.cpp multiplies in f16, we in fp32). Protocol: llama-bench's (prompt P from an empty cache, N tokens
generated after one, R repeats, mean ± sd), the three sides interleaved per thread count, each side's machine
load recorded. ``ratio_*``: ours over llama.cpp's (the issue's targets: >= 0.8 for generation and prompt). Our
generation runs the fused decoder (bitsweep.backends.bitnet.decode, ``bitnet_decode_path``); the packed-head model
also generates through transformers' forward in the same rounds (``ratio_tg_fused_vs_transformers_decode``).

A second pair runs the LM head packed, as llama.cpp's own TQ2_0 quantization stores it: ``llama-quantize ... TQ2_0``
on the f32 GGUF (llama.cpp's ternary codes, token_embd/head in Q4_K: the same tensor types and sizes as a TQ2_0
model users download, so a speed peer though not the same weights) against our TQ2_0 with ``head: int4`` (groups of
64: 4.5 bits/weight like Q4_K). ``ratio_*_packed_head`` compare those two.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluate import _version, host
from speed import runner_speed, theirs


def kernel_settings() -> dict:
    """How our kernels ran: instruction set, GEMV prefetch (bytes ahead, cache level), weights on huge pages."""
    from bitsweep.kernels import fast, memory, simd

    return {"isa": fast.current_isa(), "gemv_prefetch_bytes_level": list(simd.software_prefetch()),
            "huge_pages": memory.arena().huge, "transparent_huge_pages": memory.transparent_huge_pages()}  # fmt: skip


def make_model(out: Path, hidden: int, layers: int, intermediate: int, seed: int = 0) -> Path:
    """A random-weight Llama (transformers' own initialisation, seed ``seed``) with SmolLM2's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitsweep.archs import bpe_tokenizer
    from bitsweep.manifest import write_manifest

    if hidden % 256 or intermediate % 256:
        raise SystemExit("--hidden and --intermediate must be multiples of 256 (whole TQ2_0 blocks)")
    tokenizer = bpe_tokenizer("PreTrainedTokenizerFast")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 256, max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_manifest(out)
    return out


def prepare(work: Path, args) -> dict:
    """HF model -> (f32 GGUF, our TQ2_0 artifact, the same codes as a TQ2_0 GGUF)."""
    from bitsweep.backends import QuantizeRequest, backend_info, get_quantizer
    from bitsweep.backends.bitnet.export import export_gguf
    from bitsweep.backends.llamacpp.convert import convert_hf_to_gguf
    from bitsweep.backends.llamacpp.tools import tool_env, tool_path
    from bitsweep.config import SchemeConfig
    from bitsweep.modelinfo import read_folder_facts

    hf = make_model(work / "hf", args.hidden, args.layers, args.intermediate)
    convert_hf_to_gguf(hf, work / "f32.gguf")
    settings = backend_info("bitnet").parse_settings({})
    artifacts = {}
    for name, head in (("tq2_0", {}), ("tq2_0_head_int4", {"head": "int4", "head_group_size": 64})):
        options = {"format": "tq2_0", "scale": "absmean", "act": "int8", **head}
        request = QuantizeRequest(
            hf, SchemeConfig("bitnet", name, 2, options), settings, work / name, threads=2
        )
        artifacts[name] = get_quantizer("bitnet").quantize(request)
    exported = export_gguf(artifacts["tq2_0"].path, work / "f32.gguf", work / "tq2_0.gguf")
    # llama.cpp's own TQ2_0 quantization: Q4_K token_embd (the tied head)
    native = work / "tq2_0-llamacpp.gguf"
    subprocess.run([str(tool_path("llama-quantize")), str(work / "f32.gguf"), str(native), "TQ2_0"],
                   env=tool_env(), check=True, capture_output=True)  # fmt: skip
    return {"hf": hf, "artifact": artifacts["tq2_0"].path, "artifact_head": artifacts["tq2_0_head_int4"].path,
            "artifact_bytes": artifacts["tq2_0"].model_file.stat().st_size,
            "artifact_head_bytes": artifacts["tq2_0_head_int4"].model_file.stat().st_size,
            "gguf": work / "tq2_0.gguf", "gguf_native": native, "export": exported,
            "n_params": read_folder_facts(hf)["n_params"]}  # fmt: skip


def measure(made: dict, threads: int, args) -> dict:
    from bitsweep.backends.bitnet.runner import Runner as BitnetRunner
    from bitsweep.backends.torch_ref import TorchRunner

    sides = {}
    for _ in range(args.rounds):  # interleaved rounds; the best mean of each side counts
        with BitnetRunner(made["artifact"], threads, 2048) as runner:
            sides.setdefault("bitnet_tq2_0", []).append(
                runner_speed(runner, args.repeats, args.prompt, args.gen)
            )
        sides.setdefault("llamacpp_tq2_0", []).append(
            theirs(made["gguf"], threads, args.repeats, args.prompt, args.gen)
        )
        with BitnetRunner(made["artifact_head"], threads, 2048) as runner:
            sides.setdefault("bitnet_tq2_0_head_int4", []).append(
                runner_speed(runner, args.repeats, args.prompt, args.gen)
            )
            decode_path = runner.decode_path
        with BitnetRunner(made["artifact_head"], threads, 2048, fused_decode=False) as runner:
            # the same model generating through transformers' forward (bitnet.decode off), in the same rounds
            sides.setdefault("bitnet_tq2_0_head_int4_transformers_decode", []).append(
                runner_speed(runner, args.repeats, args.prompt, args.gen)
            )
        sides.setdefault("llamacpp_tq2_0_q4k_head", []).append(
            theirs(made["gguf_native"], threads, args.repeats, args.prompt, args.gen)
        )
        with TorchRunner(made["hf"], threads) as runner:
            sides.setdefault("torch_fp32", []).append(
                runner_speed(runner, args.repeats, args.prompt, args.gen)
            )
    pp, tg = f"pp{args.prompt}", f"tg{args.gen}"
    best = {
        side: {test: max(r[test]["mean"] for r in rounds) for test in (pp, tg)}
        for side, rounds in sides.items()
    }
    return {
        "threads": threads, "best_tok_s": best,
        "ratio_tg_vs_llamacpp": best["bitnet_tq2_0"][tg] / best["llamacpp_tq2_0"][tg],
        "ratio_pp_vs_llamacpp": best["bitnet_tq2_0"][pp] / best["llamacpp_tq2_0"][pp],
        "ratio_tg_vs_torch_fp32": best["bitnet_tq2_0"][tg] / best["torch_fp32"][tg],
        "ratio_pp_vs_torch_fp32": best["bitnet_tq2_0"][pp] / best["torch_fp32"][pp],
        "ratio_tg_vs_llamacpp_packed_head": best["bitnet_tq2_0_head_int4"][tg] / best["llamacpp_tq2_0_q4k_head"][tg],
        "ratio_pp_vs_llamacpp_packed_head": best["bitnet_tq2_0_head_int4"][pp] / best["llamacpp_tq2_0_q4k_head"][pp],
        "ratio_tg_vs_torch_fp32_packed_head": best["bitnet_tq2_0_head_int4"][tg] / best["torch_fp32"][tg],
        "ratio_tg_fused_vs_transformers_decode": best["bitnet_tq2_0_head_int4"][tg]
        / best["bitnet_tq2_0_head_int4_transformers_decode"][tg],
        "bitnet_decode_path": decode_path,
        "rounds": sides,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        made = prepare(Path(tmp), args)
        cells = [measure(made, threads, args) for threads in args.threads]
        sizes = {
            "gguf_tq2_0_bytes": made["gguf"].stat().st_size,
            "bitnet_artifact_bytes": made["artifact_bytes"],
            "gguf_tq2_0_q4k_head_bytes": made["gguf_native"].stat().st_size,
            "bitnet_artifact_head_int4_bytes": made["artifact_head_bytes"],
        }
    model = {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
             "n_params": made["n_params"], "export": {k: v for k, v in made["export"].items() if k != "gguf"}, **sizes}  # fmt: skip
    print(json.dumps({
        "host": host(), "model": model, "protocol": {"prompt": args.prompt, "gen": args.gen, "repeats": args.repeats,
                                                     "rounds": args.rounds},
        "cells": cells, "kernels": kernel_settings(),
        "versions": {"llama_cpp_python": _version("llama_cpp_python"), "numba": _version("numba"),
                     "torch": _version("torch")},
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()

"""Benchmark: each runner's speed beside its framework's own LLM benchmark, on the same artifact, prompt length,
generated tokens and threads; prints one JSON document.

    .venv/bin/python bench/runtimes.py                    # MLX and OpenVINO, SmolLM2-135M, 2 threads
    .venv/bin/python bench/runtimes.py --only openvino --threads 1

Pairs (ours over theirs is ``ratio_pp`` / ``ratio_tg``; the issue's target: within 5%):

- ``mlx``: our MLX runner (bitsweep.backends.mlx.runner) against ``mlx_lm.benchmark`` (mlx-lm's own: its
  ``stream_generate`` on a random prompt; prompt tokens/s up to the first token, generation tokens/s after it), on
  SmolLM2 affine4_g64 made by the workflow's own converter and quantizer. MLX's CPU backend runs on one core
  whatever ``--threads`` says (see the runner).
- ``openvino``: our OpenVINO runner against OpenVINO GenAI's ``LLMPipeline`` (the pipeline OpenVINO's LLM
  benchmarks, ``benchmark_genai`` and ``llm_bench``, time: its ``perf_metrics`` TTFT and TPOT), on SmolLM2
  INT4_SYM g128 compressed by NNCF, with the stateful (SDPA) backend and our pinned plugin settings (f32
  inference and KV cache, no dynamic quantization), so both run the same compiled graph but for what each adds.

Both sides process a ``--prompt``-token prompt from an empty cache and greedily generate ``--gen`` tokens after it
(default: llama-bench's 512 and 128; 128 and 32 for MLX, whose CPU kernels take a minute per 512-token prompt),
``--repeats`` times after a warm-up, the sides alternating per round so both see the same machine; each side's
machine load is recorded. llama.cpp's pair is ``bench/speed.py`` (against ``llama-bench``). Not covered, and why:
ONNX Runtime's wheel ships no benchmark tool (``onnxruntime_perf_test`` is built from source); OpenVINO's
``benchmark_app`` repeats one inference request without resetting an LLM's state (read in its source), so its
latencies describe no prompt or generation step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluate import _version, host
from speed import _stats

MLX_SCHEME = ("mlx", "affine4_g64", 4, {"mode": "AFFINE4", "group_size": 64})
OPENVINO_SCHEME = ("openvino", "int4_sym_g128", 4, {"mode": "INT4_SYM", "group_size": 128, "ratio": 1.0})


def artifact(work: Path, fmt: str, scheme: tuple) -> Path:
    """SmolLM2-135M (the default experiment's model) converted to ``fmt`` and quantized with ``scheme`` by the
    workflow's own stages; kept under ``work`` between runs."""
    from bitsweep import stages
    from bitsweep.config import SchemeConfig, load_experiment

    model = load_experiment().models[0]
    hf, converted, out = work / model.name / "hf", work / model.name / fmt, work / model.name / scheme[1]
    if not (hf / "config.json").exists():
        stages.download_model(model, hf)
    if not converted.exists():
        stages.convert(fmt, model, hf, converted, {"dtype": "float32"} if fmt == "mlx" else {})
    if not (out / "artifact.json").exists():
        stages.quantize(converted, SchemeConfig(*scheme), {}, out)
    return out


def ours(backend: str, path: Path, threads: int, n_prompt: int, n_gen: int, repeats: int) -> dict:
    """Our runner: ``repeats`` times a prompt from an empty cache then ``n_gen`` greedy tokens (tokens/s each)."""
    import numpy as np

    from bitsweep.backends import runner_class
    from bitsweep.evaluate import MachineLoad

    prompt = np.arange(1000, 1000 + n_prompt, dtype=np.int64)  # only the count matters for speed
    with runner_class(backend)(path, threads, n_prompt + n_gen) as runner:
        runner.generate(prompt, 4)  # warm-up
        with MachineLoad() as load:
            runs = [runner.generate(prompt, n_gen) for _ in range(repeats)]
    return _speeds([n_prompt / p for p, _ in runs], [n_gen / g for _, g in runs]) | load.record()


def mlx_lm_benchmark(path: Path, n_prompt: int, n_gen: int, repeats: int) -> dict:
    """``python -m mlx_lm.benchmark`` on the same folder: its per-trial prompt_tps and generation_tps."""
    from bitsweep.evaluate import MachineLoad

    cmd = [sys.executable, "-m", "mlx_lm.benchmark", "--model", str(path), "-p", str(n_prompt),
           "-g", str(n_gen), "-n", str(repeats)]  # fmt: skip
    with MachineLoad() as load:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    trials = re.findall(r"Trial \d+:\s+prompt_tps=([\d.]+), generation_tps=([\d.]+)", proc.stdout)
    if len(trials) != repeats:
        raise RuntimeError(
            f"mlx_lm.benchmark printed {len(trials)} trials, not {repeats}:\n{proc.stdout[-2000:]}"
        )
    # generation_tps counts the first token (made by the prompt pass) over the time after it: n_gen tokens in
    # n_gen - 1 steps; scaled to steps per second, as ours counts.
    steps = (n_gen - 1) / n_gen
    return _speeds([float(p) for p, _ in trials], [float(g) * steps for _, g in trials]) | load.record()


def genai_folder(path: Path) -> Path:
    """GenAI's LLMPipeline reads the tokenizer as OpenVINO IR (openvino-tokenizers) beside the model: written
    once, from the artifact's own HF tokenizer."""
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    if not (path / "openvino_detokenizer.xml").exists():
        tokenizer, detokenizer = convert_tokenizer(AutoTokenizer.from_pretrained(path), with_detokenizer=True)
        ov.save_model(tokenizer, path / "openvino_tokenizer.xml")
        ov.save_model(detokenizer, path / "openvino_detokenizer.xml")
    return path


def genai_pipeline(path: Path, threads: int):
    """OpenVINO GenAI's LLMPipeline on the IR in ``path``: the stateful (SDPA) backend, our pinned plugin settings."""
    import openvino_genai

    from bitsweep.backends.openvino.runner import PINNED

    return openvino_genai.LLMPipeline(str(genai_folder(path)), "CPU", ATTENTION_BACKEND="SDPA", NUM_STREAMS=1,
                                      INFERENCE_NUM_THREADS=threads, **PINNED)  # fmt: skip


def genai_inputs(ids):
    """Token ids [n] as GenAI's tokenized input (batch of one, all attended)."""
    import numpy as np
    import openvino as ov
    import openvino_genai

    ids = np.asarray(ids, dtype=np.int64)[None]
    return openvino_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))


def openvino_genai(path: Path, threads: int, n_prompt: int, n_gen: int, repeats: int) -> dict:
    """OpenVINO GenAI's LLMPipeline on the same IR and plugin settings: TTFT and TPOT from its perf_metrics."""
    import numpy as np
    import openvino_genai

    from bitsweep.evaluate import MachineLoad

    pipe = genai_pipeline(path, threads)
    config = openvino_genai.GenerationConfig(max_new_tokens=n_gen, min_new_tokens=n_gen, ignore_eos=True)
    inputs = genai_inputs(np.arange(1000, 1000 + n_prompt))
    pipe.generate(inputs, openvino_genai.GenerationConfig(max_new_tokens=4))  # warm-up
    pp, tg = [], []
    with MachineLoad() as load:
        for _ in range(repeats):
            metrics = pipe.generate(inputs, config).perf_metrics
            if metrics.get_num_generated_tokens() != n_gen:
                raise RuntimeError(
                    f"GenAI generated {metrics.get_num_generated_tokens()} tokens, not {n_gen}"
                )
            pp.append(n_prompt / (metrics.get_ttft().mean / 1e3))
            tg.append(1e3 / metrics.get_tpot().mean)
    del pipe
    return _speeds(pp, tg) | load.record()


def _speeds(pp: list[float], tg: list[float]) -> dict:
    """Prompt and generation tokens/s of each repeat, with mean and sd."""
    return {"pp": _stats(pp), "tg": _stats(tg)}


SIZES = {"mlx": (128, 32), "openvino": (512, 128)}  # default (prompt, generated) tokens per pair


def pair(name: str, args, work: Path) -> dict:
    n_prompt, n_gen = args.prompt or SIZES[name][0], args.gen or SIZES[name][1]
    if name == "mlx":
        path = artifact(work, "mlx", MLX_SCHEME)
        theirs_name = "mlx_lm.benchmark"
        theirs = lambda: mlx_lm_benchmark(path, n_prompt, n_gen, args.repeats)  # noqa: E731
    else:
        path = artifact(work, "openvino", OPENVINO_SCHEME)
        theirs_name = "openvino_genai.LLMPipeline"
        theirs = lambda: openvino_genai(path, args.threads, n_prompt, n_gen, args.repeats)  # noqa: E731
    rounds = []
    for _ in range(args.rounds):
        rounds.append({"ours": ours(name, path, args.threads, n_prompt, n_gen, args.repeats),
                       "theirs": theirs()})  # fmt: skip
    best = {
        side: {t: max(r[side][t]["mean"] for r in rounds) for t in ("pp", "tg")}
        for side in ("ours", "theirs")
    }
    return {
        "artifact": path.name, "prompt": n_prompt, "gen": n_gen, "theirs": theirs_name, "best_of_rounds_tok_s": best,
        "ratio_pp": best["ours"]["pp"] / best["theirs"]["pp"], "ratio_tg": best["ours"]["tg"] / best["theirs"]["tg"],
        "rounds": rounds,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("mlx", "openvino"), action="append")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, help="prompt tokens (default: per pair, SIZES)")
    parser.add_argument("--gen", type=int, help="generated tokens (default: per pair, SIZES)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "bitsweep" / "bench-runtimes")
    args = parser.parse_args()
    out = {"host": host(), "threads": args.threads, "repeats": args.repeats}
    with contextlib.redirect_stdout(sys.stderr):
        for name in args.only or ("mlx", "openvino"):
            out[name] = pair(name, args, args.work)
    out["versions"] = {d: _version(d) for d in ("mlx", "mlx-lm", "openvino", "openvino-genai", "nncf")}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

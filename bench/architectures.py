"""Which backend runs which architecture, measured; prints one JSON document.

    .venv/bin/python bench/architectures.py                          # every (architecture, backend) cell
    .venv/bin/python bench/architectures.py --archs gemma3_text --backends llamacpp mlx

For each architecture a tiny random-weight model is built with transformers' real classes (bitsweep.archs);
for each backend it is converted the workflow's way, the converted fp model's logits are compared with torch on
one 512-token window of the pydoc text (max |logit diff|) and through the runner's KV cache (a 100-token
prompt, then 8 tokens one by one: past Gemma's sliding window); one representative scheme (8-bit; bitnet: int4
g64) is quantized with the backend's real quantizer and scored (full-vocabulary KLD vs torch). A cell records
``works`` with those numbers, ``mismatch`` when its fp logits differ from torch by more than the bounds of its
path (bitsweep.archs.FP_BOUNDS, STEP_BOUNDS), or ``fails`` with the framework's own message and the stage that
failed. One conversion (and its fp checks) per format and architecture serves every backend that reads it:
the ONNX export for onnxruntime, olive and qnn. bitnet reads the HF folder; its fp check is its runner with fp32
activations against torch on the artifact's own (dequantized) weights: how it rebuilds the architecture.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bitsweep.archs import ARCHS, CHECK_SCHEMES, ArchModel, fp_bound, measure_cell, run_order, step_bound


@contextlib.contextmanager
def stdout_to_stderr():
    """File descriptor 1 -> 2 (the converters and exporters print to stdout, even in subprocesses): stdout
    carries the JSON document only."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "optimum", "optimum-onnx", "optimum-intel", "openvino", "nncf",
                 "onnxruntime", "olive-ai", "mlx", "mlx-lm", "llama-cpp-python", "sentencepiece"):  # fmt: skip
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--backends", nargs="+", default=list(CHECK_SCHEMES), choices=list(CHECK_SCHEMES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--work", type=Path, help="keep the models and artifacts here (default: a temp folder)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    started = time.perf_counter()
    cells = []
    with tempfile.TemporaryDirectory() as tmp, stdout_to_stderr():
        work = args.work or Path(tmp)
        for arch in args.archs:
            model = ArchModel(arch, work / arch, args.threads)
            for backend in run_order(args.backends):
                cell = measure_cell(model, backend)
                print(f"{arch:12} {backend:12} {cell.status:9} {cell.error or ''}", file=sys.stderr)
                cells.append(asdict(cell))
    print(json.dumps({
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"cpu": cpu_model(), "machine": platform.machine(), "python": platform.python_version()},
        "versions": versions(),
        "seconds": round(time.perf_counter() - started, 1),
        "archs": {name: ARCHS[name].features for name in args.archs},
        "schemes": {backend: CHECK_SCHEMES[backend][0] for backend in args.backends},
        "fp_bounds": {backend: fp_bound(backend) for backend in args.backends},
        "step_bounds": {backend: step_bound(backend) for backend in args.backends},
        "cells": cells,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()

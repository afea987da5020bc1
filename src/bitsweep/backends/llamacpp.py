"""llama.cpp: HF -> GGUF with its own converter, importance matrices and quantization with its own tools,
evaluation through llama-cpp-python (the same build, so the same kernels).

Tools (``llama-quantize``, ``llama-imatrix``) are installed by scripts/install.sh into site-packages/bin;
the converter and gguf-py come from the same llama.cpp source into ``<venv>/share/llama.cpp``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bitsweep.backends.base import Artifact, QuantizeRequest, base_meta
from bitsweep.capabilities import llamacpp_type
from bitsweep.errors import BitsweepError

log = logging.getLogger(__name__)


class LlamaCppToolError(BitsweepError):
    pass


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def tool_path(name: str) -> Path:
    folder = Path(os.environ.get("BITSWEEP_LLAMA_BIN", _site_packages() / "bin"))
    path = folder / name
    if not path.is_file():
        raise LlamaCppToolError(
            f"{path} not found: llama.cpp's tools are built by scripts/install.sh (or set BITSWEEP_LLAMA_BIN)"
        )
    return path


def converter_path() -> Path:
    path = Path(
        os.environ.get("BITSWEEP_LLAMA_CONVERTER", Path(sys.prefix) / "share/llama.cpp/convert_hf_to_gguf.py")
    )
    if not path.is_file():
        raise LlamaCppToolError(f"{path} not found: installed by scripts/install.sh from llama.cpp's source")
    return path


def run_tool(args: list[str | Path]) -> None:
    """Run a llama.cpp tool, streaming its output into our log; fail with its last lines."""
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": f"{_site_packages() / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}",
    }
    cmd = [str(a) for a in args]
    log.info("running: %s", " ".join(cmd))
    proc = subprocess.run(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
    )
    sys.stdout.write(proc.stdout)
    sys.stdout.flush()
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
        raise LlamaCppToolError(f"{Path(cmd[0]).name} failed with exit code {proc.returncode}:\n{tail}")


def convert_hf_to_gguf(model_dir: str | Path, out: str | Path, outtype: str = "f32") -> None:
    """llama.cpp's own convert_hf_to_gguf.py, run with this interpreter (its gguf-py is installed)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.gguf")
    run_tool([sys.executable, converter_path(), model_dir, "--outfile", tmp, "--outtype", outtype])
    tmp.replace(out)


def compute_imatrix(
    model: str | Path, calib_text: str | Path, out: str | Path, settings: dict[str, Any]
) -> None:
    cfg = settings.get("imatrix", {})
    run_tool(
        [
            tool_path("llama-imatrix"),
            "-m", model, "-f", calib_text, "-o", out,
            "--chunks", cfg.get("chunks", 32), "-c", cfg.get("n_ctx", 512),
            "-t", settings.get("threads", 2), "--no-ppl",
        ]
    )  # fmt: skip


def gguf_summary(path: str | Path) -> dict[str, Any]:
    """What a GGUF file really holds: tensor types applied (with counts) and bits per weight.

    llama.cpp falls back to other types for tensors whose rows don't fit a type's block size (e.g. 576-wide
    rows cannot hold 256-element K-quant blocks), so the type name alone does not give the size.
    """
    import gguf

    reader = gguf.GGUFReader(path)
    types: Counter[str] = Counter()
    params_by_type: Counter[str] = Counter()
    n_bytes = n_params = 0
    for tensor in reader.tensors:
        name = tensor.tensor_type.name
        types[name] += 1
        params_by_type[name] += int(tensor.n_elements)
        n_bytes += int(tensor.n_bytes)
        n_params += int(tensor.n_elements)
    return {
        "tensor_types": dict(sorted(types.items())),
        "params_by_type": dict(sorted(params_by_type.items())),
        "n_params": n_params,
        "tensor_bytes": n_bytes,
        "bpw": 8 * n_bytes / n_params,
    }


class LlamaCppBackend:
    name: ClassVar[str] = "llamacpp"

    def versions(self) -> dict[str, str]:
        import llama_cpp

        return {"llama_cpp_python": llama_cpp.__version__}

    def quantize(self, request: QuantizeRequest) -> Artifact:
        qtype = llamacpp_type(request.scheme.options["type"])
        out_file = request.out / f"model-{qtype.name}.gguf"
        request.out.mkdir(parents=True, exist_ok=True)
        args: list[str | Path] = [tool_path("llama-quantize")]
        if request.imatrix is not None:
            args += ["--imatrix", request.imatrix]
        if request.scheme.options.get("pure"):
            args.append("--pure")
        args += [*map(str, request.scheme.options.get("extra_args", []))]
        args += [request.src, out_file, qtype.name, request.settings.get("threads", 2)]
        started = time.perf_counter()
        run_tool(args)
        meta = base_meta(request, self.name, self.versions())
        meta.update(
            model_file=out_file.name,
            type=qtype.name,
            nominal_bpw=qtype.bpw,
            quantize_seconds=time.perf_counter() - started,
            applied=gguf_summary(out_file),
        )
        artifact = Artifact(request.out, meta)
        artifact.save()
        return artifact

    def load(self, artifact: Artifact, threads: int, n_ctx: int = 512) -> LlamaCppRunner:
        return LlamaCppRunner(artifact.model_file, threads=threads, n_ctx=n_ctx)


class LlamaCppRunner:
    """llama-cpp-python with logits for every position; one context reused, cleared between windows."""

    def __init__(self, model_file: str | Path, threads: int, n_ctx: int = 512) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(model_file),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=True,
            verbose=False,
        )

    def logits(self, ids: np.ndarray) -> np.ndarray:
        self.llm.reset()
        self.llm.eval([int(t) for t in ids])
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def detokenize(self, ids: np.ndarray) -> bytes:
        # llama.cpp's own llama_detokenize with a large enough buffer: llama-cpp-python's Llama.detokenize
        # decodes token by token into a 32-byte buffer and silently truncates longer pieces (runs of spaces).
        import ctypes

        import llama_cpp

        tokens = (llama_cpp.llama_token * len(ids))(*map(int, ids))
        size = 64 * len(ids) + 64
        buffer = ctypes.create_string_buffer(size)
        vocab = self.llm._model.vocab
        n = llama_cpp.llama_detokenize(vocab, tokens, len(ids), buffer, size, False, True)
        if n < 0:
            raise RuntimeError(f"llama_detokenize needs {-n} bytes, had {size}")
        return buffer.raw[:n]

    def generate(self, prompt: np.ndarray, n_new: int) -> tuple[float, float]:
        self.llm.reset()
        started = time.perf_counter()
        self.llm.eval([int(t) for t in prompt])
        prompt_done = time.perf_counter()
        for _ in range(n_new):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            self.llm.eval([token])
        return prompt_done - started, time.perf_counter() - prompt_done

    def close(self) -> None:
        self.llm.close()

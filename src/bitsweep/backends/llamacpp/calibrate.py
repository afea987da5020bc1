"""llama.cpp's importance matrix: ``llama-imatrix`` on the calibration text, once per model."""

from __future__ import annotations

from pathlib import Path

from bitsweep.backends.llamacpp.convert import gguf_file
from bitsweep.backends.llamacpp.settings import Settings
from bitsweep.backends.llamacpp.tools import run_tool, tool_path

IMATRIX_FILE = "imatrix.gguf"


def calibrate(src: Path, calib_text: Path, out: Path, settings: Settings, threads: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    run_tool([
        tool_path("llama-imatrix"), "-m", gguf_file(src), "-f", calib_text, "-o", out / IMATRIX_FILE,
        "--chunks", settings.imatrix.chunks, "-c", settings.imatrix.n_ctx, "-t", threads, "--no-ppl",
    ])  # fmt: skip
    return out / IMATRIX_FILE

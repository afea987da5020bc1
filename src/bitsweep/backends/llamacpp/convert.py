"""HF -> GGUF with llama.cpp's own convert_hf_to_gguf.py, run with this interpreter (its gguf-py is installed)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bitsweep.backends.llamacpp.tools import converter_path, run_tool


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
    tmp.replace(out)


def convert(model_dir: Path, out: Path, options: dict[str, Any], trust_remote_code: bool = False) -> None:
    """The converted folder holds ``model-<outtype>.gguf``."""
    outtype = options.get("outtype", "f32")
    convert_hf_to_gguf(model_dir, Path(out) / f"model-{outtype}.gguf", outtype)

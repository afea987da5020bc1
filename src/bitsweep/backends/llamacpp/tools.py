"""llama.cpp's command-line tools and converter, as installed by scripts/install.sh.

Tools (``llama-quantize``, ``llama-imatrix``, ``llama-perplexity``...) live in site-packages/bin and need
site-packages/lib on the library path; the converter and gguf-py come from the same llama.cpp source into
``<venv>/share/llama.cpp``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

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


def tool_env() -> dict[str, str]:
    return {
        **os.environ,
        "LD_LIBRARY_PATH": f"{_site_packages() / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}",
    }


def run_tool(args: list[str | Path | int]) -> str:
    """Run a llama.cpp tool, streaming its output into our log; fail with its last lines. Returns its output."""
    cmd = [str(a) for a in args]
    log.info("running: %s", " ".join(cmd))
    proc = subprocess.run(
        cmd, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
    )
    sys.stdout.write(proc.stdout)
    sys.stdout.flush()
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
        raise LlamaCppToolError(f"{Path(cmd[0]).name} failed with exit code {proc.returncode}:\n{tail}")
    return proc.stdout

"""llama.cpp's own ``llama-perplexity``, run on bitsweep's token windows: the anchor our ``llamacpp`` protocol is
checked against (tests) and the speed peer of our scoring (bench).

llama-perplexity tokenizes a text file with the GGUF's tokenizer and cuts chunks of ``n_ctx`` tokens; fed the
decoded windows it scores exactly our ids (checked: :func:`windows_text` round-trips). It scores the second half
of each chunk; with ``--kl-divergence-base`` it stores the model's log-probs (16 bits each) and with
``--kl-divergence`` compares another model with them on the same positions.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from bitsweep.backends.llamacpp.convert import gguf_file
from bitsweep.backends.llamacpp.tools import run_tool, tool_path

FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
KLD_LINES = {
    "ppl_q": r"Mean PPL\(Q\)\s*:\s*([0-9.]+)",
    "ppl_base": r"Mean PPL\(base\)\s*:\s*([0-9.]+)",
    "kld": r"Mean\s+KLD:\s*([0-9.]+)",
    "same_top_pct": r"Same top p:\s*([0-9.]+)",
}


def windows_text(ids: np.ndarray, detokenize) -> bytes:
    """The text whose tokenization is ``ids`` (all windows back to back): what llama-perplexity reads."""
    return detokenize(np.asarray(ids).reshape(-1))


def llama_perplexity(
    model: Path, text: Path, n_ctx: int, chunks: int, threads: int = 2, kld_base: Path | None = None,
    kld: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Run llama-perplexity; returns what it printed: ``ppl`` (and with ``kld``: ppl_q, ppl_base, kld, ...)."""
    # -fa off: the engine settings of our runner (llama-cpp-python's Llama: flash attention off); with its
    # default (auto) llama-perplexity's perplexity moves in the 5th digit.
    args: list[Any] = [tool_path("llama-perplexity"), "-m", gguf_file(model), "-f", text, "-c", n_ctx,
                       "-b", n_ctx, "--chunks", chunks, "-t", threads, "-fa", "off"]  # fmt: skip
    if kld_base is not None:
        args += ["--kl-divergence-base", kld_base]
    if kld:
        args.append("--kl-divergence")
    out = run_tool(args)
    result: dict[str, Any] = {}
    if match := FINAL.search(out):
        result |= {"ppl": float(match[1]), "ppl_stderr": float(match[2])}
    for key, pattern in KLD_LINES.items():
        if match := re.search(pattern, out):
            result[key] = float(match[1])
    return result

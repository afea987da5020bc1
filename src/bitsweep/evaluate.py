"""evaluate: score a Runner on the shared token windows against the shared reference.

Comparability is checked, not assumed: the reference file must have been made on exactly these windows
(sha256 of the ids), and the runner's own tokenizer must turn every window back into the same bytes as the
reference tokenizer (so the runner's ids mean the same tokens).
"""

from __future__ import annotations

import hashlib
import logging
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitsweep.backends.base import Runner
from bitsweep.config import EvalConfig
from bitsweep.errors import ComparabilityError
from bitsweep.metrics import QualityAccumulator, ReferenceTopK
from bitsweep.text import Windows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceLogits:
    """Per window: the reference's top-k ids/log-probs at every scored position. Saved as one .npz."""

    ids: np.ndarray  # (n_windows, n_ctx - 1, k) int32
    logp: np.ndarray  # (n_windows, n_ctx - 1, k) float32
    windows_sha256: str

    def window(self, i: int) -> ReferenceTopK:
        return ReferenceTopK(self.ids[i], self.logp[i])

    def save(self, path: str | Path) -> None:
        np.savez(path, ids=self.ids, logp=self.logp, windows_sha256=self.windows_sha256)

    @classmethod
    def load(cls, path: str | Path) -> ReferenceLogits:
        with np.load(path) as data:
            return cls(data["ids"], data["logp"], str(data["windows_sha256"]))


def check_tokenizer(runner: Runner, windows: Windows) -> None:
    for i, ids in enumerate(windows.ids):
        got = hashlib.sha256(runner.detokenize(ids)).hexdigest()
        if got != windows.decoded_sha256[i]:
            raise ComparabilityError(
                f"window {i}: this runner's tokenizer decodes the shared token ids to different text than the "
                "reference tokenizer; its vocabulary differs, so its scores would not be comparable"
            )


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_speed(runner: Runner, windows: Windows, cfg: EvalConfig) -> dict[str, float]:
    """Prompt processing and greedy generation tokens/s: one warm-up, then ``repeats`` timed runs."""
    prompt = windows.ids[0][: cfg.speed.prompt_tokens]
    runner.generate(prompt, min(4, cfg.speed.gen_tokens))  # warm-up: caches, thread pools, lazy init
    pp, tg = [], []
    for _ in range(cfg.speed.repeats):
        prompt_s, gen_s = runner.generate(prompt, cfg.speed.gen_tokens)
        pp.append(len(prompt) / prompt_s)
        tg.append(cfg.speed.gen_tokens / gen_s)
    return {
        "pp_tok_s": statistics.median(pp),
        "pp_tok_s_min": min(pp),
        "pp_tok_s_max": max(pp),
        "tg_tok_s": statistics.median(tg),
        "tg_tok_s_min": min(tg),
        "tg_tok_s_max": max(tg),
        "threads": cfg.threads,
    }


def score(
    runner: Runner, windows: Windows, reference: ReferenceLogits | None, cfg: EvalConfig, keep_top_k: int = 0
) -> tuple[dict[str, Any], ReferenceLogits | None]:
    """Quality over all windows (and, with ``keep_top_k``, the top-k log-probs to serve as the reference)."""
    if reference is not None and reference.windows_sha256 != windows.digest:
        raise ComparabilityError(
            "reference logits were computed on other token windows; re-run the reference"
        )
    check_tokenizer(runner, windows)
    acc = QualityAccumulator()
    kept: list[ReferenceTopK] = []
    started = time.perf_counter()
    for i, ids in enumerate(windows.ids):
        logits = runner.logits(ids)
        if logits.shape[0] != len(ids):
            raise ComparabilityError(
                f"runner returned {logits.shape[0]} rows of logits for {len(ids)} tokens"
            )
        acc.add(ids, logits, reference.window(i) if reference is not None else None)
        if keep_top_k:
            kept.append(ReferenceTopK.from_logits(logits, keep_top_k))
        log.info("window %d/%d scored", i + 1, windows.n_windows)
    metrics = acc.summary() | {"score_seconds": time.perf_counter() - started}
    if not keep_top_k:
        return metrics, None
    ref = ReferenceLogits(
        np.stack([k.ids for k in kept]), np.stack([k.logp for k in kept]), windows_sha256=windows.digest
    )
    metrics["ref_tail_mass"] = float(np.mean([1 - np.exp(k.logp.astype(np.float64)).sum(-1) for k in kept]))
    return metrics, ref


def evaluate_runner(
    load_runner, windows: Windows, reference: ReferenceLogits | None, cfg: EvalConfig, keep_top_k: int = 0
) -> tuple[dict[str, Any], ReferenceLogits | None]:
    """Load (timed, with memory measured), score, time generation. ``load_runner()`` returns a Runner."""
    baseline = rss_mb()
    started = time.perf_counter()
    runner = load_runner()
    load_seconds = time.perf_counter() - started
    try:
        # Speed and memory first: the process's peak RSS then covers loading and generation only, not the
        # metric arrays that scoring allocates.
        metrics = measure_speed(runner, windows, cfg)
        metrics |= {
            "load_seconds": load_seconds,
            "peak_rss_mb": peak_rss_mb(),
            "model_rss_mb": peak_rss_mb() - baseline,
        }
        quality, ref = score(runner, windows, reference, cfg, keep_top_k)
    finally:
        runner.close()
    return quality | metrics, ref


def comparability(windows: Windows, reference_path: str | Path | None) -> dict[str, Any]:
    from bitsweep.manifest import sha256_file

    return {
        "windows_sha256": windows.digest,
        "eval_text_sha256": windows.text_sha256,
        "n_windows": windows.n_windows,
        "n_ctx": windows.n_ctx,
        "reference_sha256": sha256_file(reference_path) if reference_path else None,
        "tokenizer_check": "decoded bytes identical to the reference tokenizer on every window",
    }

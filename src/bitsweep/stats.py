"""Uncertainty: a paired bootstrap over evaluation windows.

Tokens of one window are correlated (one topic, one prefix), so intervals resample whole windows, not tokens.
Every variant is scored on the same windows as the reference, so a ratio to the reference and a difference
between two variants are *paired*: each bootstrap sample draws one set of windows and evaluates both sides on it,
which cancels what the windows share (how hard the text is) and leaves what the variants do differently.

Per window the evaluation records sums over its scored positions (``nll``, ``kld``, ``top1`` hits) and their
count ``n`` (bitsweep.metrics.QualityAccumulator.per_window); a metric over a sample of windows is the ratio of
their sums, as over the full set.

>>> import numpy as np
>>> a = {"n": [10, 10, 10, 10], "kld": [1.0, 1.2, 0.8, 1.0]}
>>> lo, hi = interval(a, "kld")
>>> bool(0.08 < lo < 0.1 < hi < 0.12)
True
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SAMPLES = 2000
SEED = 0  # fixed: intervals are as reproducible as the numbers they bound
LEVEL = 0.95


def resamples(n_windows: int, samples: int = SAMPLES, seed: int = SEED) -> np.ndarray:
    """(samples, n_windows) window indices drawn with replacement (the same draws for every metric)."""
    return np.random.default_rng(seed).integers(0, n_windows, size=(samples, n_windows))


def _mean(sums: dict[str, list[float]], key: str, idx: np.ndarray) -> np.ndarray:
    return np.asarray(sums[key])[idx].sum(axis=-1) / np.asarray(sums["n"])[idx].sum(axis=-1)


def _bounds(values: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - LEVEL) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def interval(sums: dict[str, list[float]], key: str) -> tuple[float, float]:
    """95% interval of a per-position mean (``kld``, ``top1``)."""
    return _bounds(_mean(sums, key, resamples(len(sums["n"]))))


def ppl_ratio(
    variant: dict[str, list[float]], reference: dict[str, list[float]]
) -> tuple[float, float, float]:
    """The variant's perplexity over the reference's on the same positions, with its paired 95% interval."""
    idx = resamples(len(variant["n"]))
    full = np.arange(len(variant["n"]))[None]
    ratio = np.exp(_mean(variant, "nll", idx) - _mean(reference, "nll", idx))
    return float(np.exp(_mean(variant, "nll", full) - _mean(reference, "nll", full))[0]), *_bounds(ratio)


def intervals(variant: dict[str, list[float]], reference: dict[str, list[float]] | None) -> dict[str, float]:
    """The interval metrics of one variant (one protocol's per-window sums)."""
    out: dict[str, float] = {}
    if reference is not None:
        out["ppl_ratio"], out["ppl_ratio_lo"], out["ppl_ratio_hi"] = ppl_ratio(variant, reference)
    for key in ("kld", "top1"):
        if key in variant:
            out[f"{key}_lo"], out[f"{key}_hi"] = interval(variant, key)
    return out


def paired_difference(a: dict[str, list[float]], b: dict[str, list[float]], key: str) -> dict[str, Any]:
    """``mean(a) - mean(b)`` of a per-position metric on the same windows, its paired 95% interval, whether the
    interval excludes 0 (``resolved``), and roughly how many windows would resolve a difference this size
    (normal approximation from the per-window spread of the differences)."""
    idx = resamples(len(a["n"]))
    full = np.arange(len(a["n"]))[None]
    diff = float((_mean(a, key, full) - _mean(b, key, full))[0])
    lo, hi = _bounds(_mean(a, key, idx) - _mean(b, key, idx))
    per_window = np.asarray(a[key]) / np.asarray(a["n"]) - np.asarray(b[key]) / np.asarray(b["n"])
    spread = float(per_window.std(ddof=1)) if len(per_window) > 1 else math.inf
    needed = math.ceil((1.96 * spread / abs(diff)) ** 2) if diff and math.isfinite(spread) else None
    return {"diff": diff, "lo": lo, "hi": hi, "resolved": bool(lo > 0 or hi < 0), "windows_needed": needed}

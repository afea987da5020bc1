"""Quality metrics against one full-precision reference, computed window by window in NumPy.

The reference keeps, per scored position, its ``top_k`` log-probabilities and token ids plus one "tail" bucket
holding the rest of the probability mass. KL divergence is computed exactly on that (k + 1)-way partition of
the vocabulary; by the data-processing inequality it is a lower bound on the full-vocabulary KL, and with
k = 256 the tail holds a tiny share of the mass (recorded as ``ref_tail_mass``).

Shapes: a window has n tokens; logits are (n, V); positions 0..n-2 predict tokens 1..n-1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (a 49k-way softmax in float32 loses the tail)."""
    x = logits.astype(np.float64, copy=False)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class ReferenceTopK:
    """(n-1, k) ids and log-probs of the reference's most likely tokens at each scored position."""

    ids: np.ndarray  # int32, column 0 is the reference's top-1
    logp: np.ndarray  # float32

    @classmethod
    def from_logits(cls, logits: np.ndarray, k: int) -> ReferenceTopK:
        logp = log_softmax(logits[:-1])
        k = min(k, logp.shape[-1])
        part = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
        order = np.argsort(-np.take_along_axis(logp, part, axis=-1), axis=-1, kind="stable")
        ids = np.take_along_axis(part, order, axis=-1)
        return cls(ids.astype(np.int32), np.take_along_axis(logp, ids, axis=-1).astype(np.float32))

    def tail_logp(self) -> np.ndarray:
        return _log1m_exp_sum(self.logp.astype(np.float64))


def _log1m_exp_sum(logp: np.ndarray) -> np.ndarray:
    """log(1 - sum(exp(logp))) per row, clipped away from log(0)."""
    mass = np.exp(logp).sum(axis=-1)
    return np.log(np.clip(1.0 - mass, 1e-12, None))


def kl_divergence(ref: ReferenceTopK, logits: np.ndarray) -> np.ndarray:
    """Per-position KL(reference || variant) on the top-k + tail partition; shape (n-1,)."""
    return kl_from_logp(ref, log_softmax(logits[:-1]))


def kl_from_logp(ref: ReferenceTopK, q_all: np.ndarray) -> np.ndarray:
    """As :func:`kl_divergence`, from the variant's (n-1, V) log-probs."""
    q = np.take_along_axis(q_all, ref.ids.astype(np.int64), axis=-1)
    p = ref.logp.astype(np.float64)
    p_tail, q_tail = ref.tail_logp(), _log1m_exp_sum(q)
    kl = (np.exp(p) * (p - q)).sum(axis=-1) + np.exp(p_tail) * (p_tail - q_tail)
    return np.maximum(kl, 0.0)


def token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of tokens 1..n-1 given their prefixes; shape (n-1,)."""
    return nll_from_logp(log_softmax(logits[:-1]), ids)


def nll_from_logp(logp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return -np.take_along_axis(logp, ids[1:, None].astype(np.int64), axis=-1)[:, 0]


@dataclass
class QualityAccumulator:
    """Collects per-position NLL, KL and top-1 agreement over windows; summarises at the end."""

    nll: list[np.ndarray] = field(default_factory=list)
    kld: list[np.ndarray] = field(default_factory=list)
    top1: list[np.ndarray] = field(default_factory=list)

    def add(self, ids: np.ndarray, logits: np.ndarray, ref: ReferenceTopK | None) -> None:
        if not np.isfinite(logits).all():
            raise FloatingPointError("runner returned non-finite logits")
        logp = log_softmax(logits[:-1])  # (n-1, V) float64, computed once per window
        self.nll.append(nll_from_logp(logp, ids))
        if ref is not None:
            self.kld.append(kl_from_logp(ref, logp))
            self.top1.append(logits[:-1].argmax(axis=-1) == ref.ids[:, 0])

    def summary(self) -> dict[str, float]:
        nll = np.concatenate(self.nll)
        out = {
            "nll": float(nll.mean()),
            "ppl": float(np.exp(nll.mean())),
            # Standard error of ln(ppl) over positions, as llama-perplexity reports it.
            "ppl_stderr": float(np.exp(nll.mean()) * nll.std(ddof=1) / np.sqrt(len(nll))),
            "n_scored": len(nll),
        }
        if self.kld:
            kld = np.concatenate(self.kld)
            out |= {
                "kld": float(kld.mean()),
                "kld_median": float(np.median(kld)),
                "kld_p99": float(np.percentile(kld, 99)),
                "kld_max": float(kld.max()),
                "top1": float(np.concatenate(self.top1).mean()),
            }
        return out

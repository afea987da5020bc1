"""Quality metrics against one full-precision reference, computed window by window in NumPy.

The reference keeps, per scored position, its full-vocabulary log-probabilities at 16 bits, as llama.cpp's
``--kl-divergence-base`` does (:class:`ReferenceRows`): each row stores the log-probs within
``LOGP_RANGE`` nats of its most likely token as uint16 codes on a uniform grid (step 24 / 65535 = 3.7e-4 nats);
tokens below that range (probability < e^-24 of the top token's) count as probability 0. KL divergence is the
full-vocabulary sum over that reference, renormalised. (:class:`ReferenceTopK` and :func:`kl_divergence`,
top-k + one tail bucket, a lower bound, serve quick orderings in the backend tests.)

Protocols (which positions are scored, all from the same per-position log-probs):
  ``all``       every position of every window (tokens 1..n-1 given their prefix)
  ``llamacpp``  the second half of each window, as llama.cpp's ``llama-perplexity`` scores a chunk
  ``lm_eval``   all positions, normalised per word and per byte of the text they score (lm-eval's
                word_perplexity, byte_perplexity, bits_per_byte)

Shapes: a window has n tokens; logits are (n, V); positions 0..n-2 predict tokens 1..n-1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange

LOGP_RANGE = 24.0  # nats below a row's most likely token that the 16-bit reference keeps
CODE_MAX = 65535


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


@dataclass(frozen=True)
class ReferenceRows:
    """One window of the 16-bit reference: (n-1, V) uint16 codes, 0 meaning "below the stored range"; per row the
    log-prob of code 0 (``low``) and the step (``scale``); the reference's top-1 ids from its exact logits."""

    codes: np.ndarray  # (n-1, V) uint16
    low: np.ndarray  # (n-1,) float32
    scale: np.ndarray  # (n-1,) float32
    top1: np.ndarray  # (n-1,) int32

    @classmethod
    def from_logp(cls, logp: np.ndarray) -> ReferenceRows:
        """From the reference's (n-1, V) float64 log-probs."""
        high = logp.max(axis=-1, keepdims=True)
        low = high - LOGP_RANGE
        scale = np.float32(LOGP_RANGE / CODE_MAX)
        codes = np.rint((logp - low) / scale)
        codes = np.where(logp > low, np.clip(codes, 1, CODE_MAX), 0).astype(np.uint16)
        return cls(codes, low[:, 0].astype(np.float32), np.full(len(logp), scale, np.float32),
                   logp.argmax(axis=-1).astype(np.int32))  # fmt: skip

    def logp(self) -> np.ndarray:
        """(n-1, V) float64 log-probs, -inf below the stored range, renormalised over what is kept."""
        lp = self.low[:, None].astype(np.float64) + self.scale[:, None].astype(np.float64) * self.codes
        lp[self.codes == 0] = -np.inf
        return lp - np.log(np.exp(lp).sum(axis=-1, keepdims=True))


def kl_full(ref: ReferenceRows, q_logp: np.ndarray) -> np.ndarray:
    """Per-position KL(reference || variant) over the whole vocabulary; shape (n-1,)."""
    p = ref.logp()
    kept = np.isfinite(p)
    p = np.where(kept, p, 0.0)  # tokens below the stored range: probability 0, no term
    terms = np.exp(p) * (p - np.where(kept, q_logp, 0.0)) * kept
    return np.maximum(terms.sum(axis=-1), 0.0)


def score_window(
    logits: np.ndarray, ids: np.ndarray, ref: ReferenceRows
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-position NLL, full-vocabulary KL(reference || variant) and top-1 agreement of one window, fused in one
    numba pass per row: the same float64 arithmetic as :func:`log_softmax` + :func:`kl_full` (equal to ~1e-12),
    without their (n-1, V) float64 temporaries (about 10x faster than NumPy on 49k-token rows)."""
    rows = len(ids) - 1
    nll, kl, hit = np.empty(rows), np.empty(rows), np.empty(rows, np.bool_)
    _score_rows(np.ascontiguousarray(logits[:-1], dtype=np.float32), ids[1:].astype(np.int64), ref.codes,
                float(ref.scale[0]), ref.top1, nll, kl, hit)  # fmt: skip
    return nll, kl, hit


def set_scoring_threads(threads: int) -> None:
    """Score with the job's threads (numba's pool would otherwise take every core of a workstation)."""
    from numba import config, set_num_threads

    set_num_threads(max(1, min(threads, config.NUMBA_NUM_THREADS)))


@njit(parallel=True, cache=True)
def _score_rows(logits, targets, codes, scale, ref_top1, nll, kl, hit):  # pragma: no cover (numba)
    # Reference row i: lp_j = low_i + scale * c_j for codes c_j > 0, so exp(lp_j) = exp(low_i + scale * CODE_MAX)
    # * table[c_j] with table[c] = exp(scale * (c - CODE_MAX)): its probabilities need no exp per token. With
    # Z = sum_j table[c_j], p_j = table[c_j] / Z and log p_j = scale * (c_j - CODE_MAX) - log Z, so
    # KL = sum_j p_j log p_j - sum_j p_j log q_j, and log q_j = x_j - lse(x) for the variant's logits x.
    rows, vocab = logits.shape
    table = np.exp(scale * (np.arange(CODE_MAX + 1) - CODE_MAX))
    for i in prange(rows):
        x, c = logits[i], codes[i]
        top, arg = x[0], 0
        for j in range(1, vocab):
            if x[j] > top:  # first maximum, as argmax
                top, arg = x[j], j
        total = 0.0
        for j in range(vocab):
            total += np.exp(np.float64(x[j]) - top)
        lse = np.float64(top) + np.log(total)
        nll[i] = lse - x[targets[i]]
        hit[i] = arg == ref_top1[i]
        z, weighted_code, weighted_x = 0.0, 0.0, 0.0
        for j in range(vocab):
            if c[j] != 0:
                t = table[c[j]]
                z += t
                weighted_code += t * c[j]
                weighted_x += t * x[j]
        p_logp = scale * (weighted_code / z - CODE_MAX) - np.log(z)
        kl[i] = max(p_logp - (weighted_x / z - lse), 0.0)


def all_finite(x: np.ndarray) -> bool:
    """``np.isfinite(x).all()`` without its (rows, V) bool temporary (25 MB of fresh pages per 512-token window)."""
    return _count_nonfinite(np.ascontiguousarray(x).reshape(len(x), -1)) == 0


@njit(parallel=True, cache=True)
def _count_nonfinite(x):  # pragma: no cover (numba)
    bad = 0
    for i in prange(x.shape[0]):
        row = x[i]
        for j in range(row.shape[0]):
            bad += not np.isfinite(row[j])
    return bad


def token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of tokens 1..n-1 given their prefixes; shape (n-1,)."""
    return nll_from_logp(log_softmax(logits[:-1]), ids)


def nll_from_logp(logp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return -np.take_along_axis(logp, ids[1:, None].astype(np.int64), axis=-1)[:, 0]


PROTOCOLS = ("all", "llamacpp")  # position sets; lm_eval normalises "all" per word and byte


def scored(protocol: str, n_scored: int) -> slice:
    """Which of a window's ``n_scored`` = n - 1 positions a protocol scores. llama-perplexity scores logits
    ``first = n/2 .. n-2`` (tokens n/2+1 .. n-1) of each n-token chunk."""
    if protocol == "all":
        return slice(0, n_scored)
    if protocol == "llamacpp":
        return slice((n_scored + 1) // 2, n_scored)
    raise ValueError(f"unknown protocol {protocol!r}")


@dataclass
class QualityAccumulator:
    """Collects per-position NLL, KL and top-1 agreement window by window; summarises per protocol.

    ``per_window()`` gives, for each protocol, each window's sums (NLL, KL, top-1 hits) and position count: what
    the paired bootstrap (bitsweep.stats) resamples, since tokens within a window are correlated.
    """

    nll: list[np.ndarray] = field(default_factory=list)
    kld: list[np.ndarray] = field(default_factory=list)
    top1: list[np.ndarray] = field(default_factory=list)

    def add(
        self, ids: np.ndarray, logits: np.ndarray, ref: ReferenceRows | ReferenceTopK | None
    ) -> np.ndarray | None:
        """Score one window. Against the 16-bit reference (a variant): the fused :func:`score_window`, returns
        None. Otherwise returns the (n-1, V) float64 log-probs (the reference run keeps them); a top-k reference
        (exact for identical logits, where the 16-bit one reads ~1e-8) serves unit tests."""
        if not all_finite(logits):
            raise FloatingPointError("runner returned non-finite logits")
        if isinstance(ref, ReferenceRows):
            nll, kl, hit = score_window(logits, ids, ref)
            self.nll.append(nll)
            self.kld.append(kl)
            self.top1.append(hit)
            return None
        logp = log_softmax(logits[:-1])  # (n-1, V) float64, computed once per window
        self.nll.append(nll_from_logp(logp, ids))
        if ref is not None:
            self.kld.append(kl_from_logp(ref, logp))
            self.top1.append(logits[:-1].argmax(axis=-1) == ref.ids[:, 0])
        return logp

    def per_window(self) -> dict[str, dict[str, list[float]]]:
        out = {}
        for protocol in PROTOCOLS:
            cut = [scored(protocol, len(nll)) for nll in self.nll]
            sums = {"n": [float(len(nll[c])) for nll, c in zip(self.nll, cut, strict=True)],
                    "nll": [float(nll[c].sum()) for nll, c in zip(self.nll, cut, strict=True)]}  # fmt: skip
            if self.kld:
                sums["kld"] = [float(k[c].sum()) for k, c in zip(self.kld, cut, strict=True)]
                sums["top1"] = [float(t[c].sum()) for t, c in zip(self.top1, cut, strict=True)]
            out[protocol] = sums
        return out

    def summary(self, text_bytes: float | None = None, text_words: float | None = None) -> dict[str, float]:
        """Protocol ``all`` under the plain names (ppl, kld, top1, ...), ``llamacpp`` with that suffix, and
        lm-eval's word/byte normalisations when the scored text's bytes and words are known."""
        nll = np.concatenate(self.nll)
        out = {
            "nll": float(nll.mean()),
            "ppl": float(np.exp(nll.mean())),
            # Standard error of ln(ppl) over positions, as llama-perplexity reports it.
            "ppl_stderr": float(np.exp(nll.mean()) * nll.std(ddof=1) / np.sqrt(len(nll))),
            "n_scored": len(nll),
        }
        half = self.per_window()["llamacpp"]  # the second half of each window: means of its sums

        def mean(key: str) -> float:
            return sum(half[key]) / sum(half["n"])

        out |= {"ppl_llamacpp": float(np.exp(mean("nll"))), "n_scored_llamacpp": int(sum(half["n"]))}
        if text_bytes and text_words:
            out |= {"word_ppl": float(np.exp(nll.sum() / text_words)),
                    "byte_ppl": float(np.exp(nll.sum() / text_bytes)),
                    "bits_per_byte": float(nll.sum() / text_bytes / np.log(2))}  # fmt: skip
        if self.kld:
            kld = np.concatenate(self.kld)
            out |= {
                "kld": float(kld.mean()),
                "kld_median": float(np.median(kld)),
                "kld_p99": float(np.percentile(kld, 99)),
                "kld_max": float(kld.max()),
                "top1": float(np.concatenate(self.top1).mean()),
                "kld_llamacpp": mean("kld"),
                "top1_llamacpp": mean("top1"),
            }
        return out

from __future__ import annotations

import numpy as np
import pytest

from bitsweep.metrics import QualityAccumulator, ReferenceTopK, kl_divergence, log_softmax, token_nll
from bitsweep.report import pareto_front

RNG = np.random.default_rng(0)


def full_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    p, q = log_softmax(p_logits[:-1]), log_softmax(q_logits[:-1])
    return (np.exp(p) * (p - q)).sum(-1)


def test_identical_logits_have_zero_kl_and_full_agreement():
    logits = RNG.normal(size=(16, 100)).astype(np.float32)
    acc = QualityAccumulator()
    acc.add(np.arange(16) % 100, logits, ReferenceTopK.from_logits(logits, 8))
    summary = acc.summary()
    assert summary["kld"] == pytest.approx(0, abs=1e-9)
    assert summary["top1"] == 1.0


def test_topk_kl_equals_full_kl_when_k_covers_the_vocabulary():
    ref, var = RNG.normal(size=(2, 12, 50)) * 3
    assert np.allclose(kl_divergence(ReferenceTopK.from_logits(ref, 50), var), full_kl(ref, var), atol=1e-6)


@pytest.mark.parametrize("k", [1, 4, 16, 64])
def test_topk_kl_is_a_lower_bound_that_tightens_with_k(k):
    ref, var = RNG.normal(size=(2, 20, 200)) * 4
    exact = full_kl(ref, var)
    approx = kl_divergence(ReferenceTopK.from_logits(ref, k), var)
    assert np.all(approx <= exact + 1e-9)
    if k == 64:
        assert np.allclose(approx, exact, rtol=0.15)


def test_kl_grows_with_perturbation():
    ref = RNG.normal(size=(32, 300)) * 3
    top = ReferenceTopK.from_logits(ref, 32)
    small, large = (kl_divergence(top, ref + RNG.normal(size=ref.shape) * s).mean() for s in (0.1, 1.0))
    assert 0 < small < large


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    acc = QualityAccumulator()
    acc.add(np.array([3, 1, 4, 1, 5, 9]), np.zeros((6, 37), dtype=np.float32), None)
    assert acc.summary()["ppl"] == pytest.approx(37)


def test_nll_scores_the_next_token():
    logits = np.full((3, 4), -1e9)
    logits[0, 2] = logits[1, 0] = 0  # position 0 predicts id 2, position 1 predicts id 0
    assert token_nll(logits, np.array([9, 2, 0])) == pytest.approx([0, 0], abs=1e-6)


def test_topk_ids_are_sorted_by_probability():
    logits = RNG.normal(size=(5, 40))
    top = ReferenceTopK.from_logits(logits, 6)
    assert np.all(np.diff(top.logp, axis=-1) <= 0)
    assert np.array_equal(top.ids[:, 0], logits[:-1].argmax(-1))


def test_non_finite_logits_are_an_error():
    with pytest.raises(FloatingPointError):
        QualityAccumulator().add(np.array([0, 1]), np.array([[np.nan, 0.0], [0.0, 0.0]]), None)


def test_pareto_front():
    points = [(1, 5), (2, 3), (3, 4), (4, 1), (2, 3.5)]
    assert pareto_front(points) == [0, 1, 3]

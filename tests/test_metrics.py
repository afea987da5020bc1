from __future__ import annotations

import numpy as np
import pytest

from bitsweep.metrics import (
    QualityAccumulator,
    ReferenceTopK,
    all_finite,
    kl_divergence,
    log_softmax,
    token_nll,
)
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


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_logits_are_an_error(bad, dtype):
    logits = np.zeros((3, 7), dtype)
    assert all_finite(logits)
    logits[2, 6] = bad  # the last position's row, which no metric reads: still a broken runner
    assert not all_finite(logits)
    with pytest.raises(FloatingPointError, match="non-finite"):
        QualityAccumulator().add(np.array([0, 1, 2]), logits, None)


def test_pareto_front():
    points = [(1, 5), (2, 3), (3, 4), (4, 1), (2, 3.5)]
    assert pareto_front(points) == [0, 1, 3]


# ---------------------------------------------------------------------------------------------------------
# The full-vocabulary reference, protocols and intervals, each checked against an independent computation


def test_nll_equals_torchs_cross_entropy():
    import torch

    logits = RNG.normal(size=(40, 300)).astype(np.float32) * 3
    ids = RNG.integers(0, 300, 40)
    want = torch.nn.functional.cross_entropy(torch.from_numpy(logits[:-1]).double(), torch.from_numpy(ids[1:]),
                                             reduction="none").numpy()  # fmt: skip
    assert np.allclose(token_nll(logits, ids), want, rtol=1e-12, atol=1e-12)


def test_16_bit_reference_gives_the_full_vocabulary_kl():
    """KL written out separately in float64 over every token vs the KL from the 16-bit reference rows."""
    from bitsweep.metrics import ReferenceRows, kl_full

    ref, var = RNG.normal(size=(2, 30, 5000)) * 4
    p = ref[:-1] - np.log(np.exp(ref[:-1]).sum(-1, keepdims=True))
    q = var[:-1] - np.log(np.exp(var[:-1]).sum(-1, keepdims=True))
    exact = (np.exp(p) * (p - q)).sum(-1)
    ours = kl_full(ReferenceRows.from_logp(log_softmax(ref[:-1])), log_softmax(var[:-1]))
    assert np.allclose(ours, exact, rtol=1e-3)
    top = kl_divergence(ReferenceTopK.from_logits(ref, 256), var)
    assert np.all(top <= ours + 1e-6) and top.mean() < ours.mean()  # the old top-k + tail: a lower bound


@pytest.mark.parametrize("spread", [0.5, 4.0, 40.0])  # 40: most of each reference row falls below its range
def test_fused_scoring_equals_the_numpy_formulas(spread):
    """score_window (one numba pass per row) against log_softmax + kl_full + argmax written out in NumPy: equal
    to rounding, including rows whose reference keeps only a few tokens and ties in the variant's maximum."""
    from bitsweep.metrics import ReferenceRows, kl_full, nll_from_logp, score_window

    ref = (RNG.normal(size=(65, 3000)) * spread).astype(np.float32)
    var = (ref + RNG.normal(size=ref.shape) * 0.3).astype(np.float32)
    var[5, [7, 9]] = var[5].max() + 1  # a tie: argmax takes the first
    ids = RNG.integers(0, 3000, 65)
    rows = ReferenceRows.from_logp(log_softmax(ref[:-1]))
    nll, kl, hit = score_window(var, ids, rows)
    logp = log_softmax(var[:-1])
    assert np.allclose(nll, nll_from_logp(logp, ids), rtol=0, atol=1e-11)
    assert np.allclose(kl, kl_full(rows, logp), rtol=1e-9, atol=1e-12)
    assert np.array_equal(hit, var[:-1].argmax(-1) == rows.top1)
    assert np.all(
        score_window(ref, ids, rows)[1] < 1e-6
    )  # the reference against itself: only the 16-bit rounding remains


def test_top1_agreement_counts_disagreements():
    from bitsweep.metrics import ReferenceRows

    ref = RNG.normal(size=(11, 50))
    var = ref.copy()
    var[[0, 3, 4], :] *= -1  # three positions whose argmax moves
    acc = QualityAccumulator()
    acc.add(np.arange(11), var, ReferenceRows.from_logp(log_softmax(ref[:-1])))
    assert acc.summary()["top1"] == pytest.approx(7 / 10)


def test_llamacpp_protocol_scores_the_second_half_of_each_window():
    from bitsweep.metrics import scored

    assert scored("llamacpp", 511) == slice(256, 511)  # llama-perplexity: first = n_ctx / 2 = 256, 255 tokens
    assert scored("all", 511) == slice(0, 511)
    acc = QualityAccumulator()
    logits = np.zeros((8, 5))
    logits[4:, 1] = 10.0  # second half: confident and right
    acc.add(np.array([0, 1, 1, 1, 1, 1, 1, 1]), logits, None)
    summary = acc.summary()
    # 8 tokens, 7 scored positions; llama-perplexity's first = 8 / 2 = 4: positions 4, 5, 6
    assert summary["ppl_llamacpp"] < 1.01 < summary["ppl"] and summary["n_scored_llamacpp"] == 3


def test_word_and_byte_normalisation():
    acc = QualityAccumulator()
    acc.add(np.array([3, 1, 4, 1, 5]), np.zeros((5, 16)), None)  # 4 tokens at ln 16 nats each
    summary = acc.summary(text_bytes=8, text_words=2)
    assert summary["bits_per_byte"] == pytest.approx(4 * 4 / 8)  # 4 tokens x 4 bits / 8 bytes
    assert summary["word_ppl"] == pytest.approx(16**2) and summary["byte_ppl"] == pytest.approx(4)


def test_bootstrap_intervals_cover_the_estimate_and_resolve_real_differences():
    from bitsweep.stats import interval, paired_difference, ppl_ratio

    n = [100.0] * 16
    a = {"n": n, "kld": list(RNG.normal(10, 1, 16)), "nll": list(RNG.normal(300, 20, 16))}
    b = {"n": n, "kld": [k + 2 for k in a["kld"]], "nll": [x + 5 for x in a["nll"]]}
    lo, hi = interval(a, "kld")
    assert lo < sum(a["kld"]) / 1600 < hi
    ratio, rlo, rhi = ppl_ratio(b, a)
    assert ratio == pytest.approx(np.exp(0.05)) and rlo <= ratio <= rhi
    assert paired_difference(b, a, "kld")["resolved"]  # +0.02 on every window: paired, so resolved
    same = paired_difference(a, {**a, "kld": [k + RNG.normal(0, 1) for k in a["kld"]]}, "kld")
    assert not same["resolved"] and same["windows_needed"] > 16


def test_lm_eval_protocol_matches_lm_evals_own_metric_functions(tiny_model_dir, tmp_path):
    """One document through the tiny model: our word/byte perplexity and bits per byte are what lm-eval's
    wikitext task computes from the same log-likelihood (its process_results and aggregation functions)."""
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results
    from transformers import AutoTokenizer

    from bitsweep.backends.torch_ref import TorchRunner
    from bitsweep.text import pydoc_texts, tokenize_windows

    path = tmp_path / "doc.txt"
    path.write_text(pydoc_texts(0.25)[0][:4000])
    windows = tokenize_windows(tiny_model_dir, path, 128, 1)
    acc = QualityAccumulator()
    with TorchRunner(tiny_model_dir, 2) as runner:
        acc.add(windows.ids[0], runner.logits(windows.ids[0]), None)
    ours = acc.summary(sum(windows.scored_bytes), sum(windows.scored_words))
    page = AutoTokenizer.from_pretrained(tiny_model_dir).decode(windows.ids[0][1:].tolist())
    items = process_results({"page": page}, [-float(acc.nll[0].sum())])
    assert ours["word_ppl"] == pytest.approx(weighted_perplexity([items["word_perplexity"]]), rel=1e-12)
    assert ours["byte_ppl"] == pytest.approx(weighted_perplexity([items["byte_perplexity"]]), rel=1e-12)
    assert ours["bits_per_byte"] == pytest.approx(bits_per_byte([items["bits_per_byte"]]), rel=1e-12)

"""llama.cpp backend on a tiny random Llama: real converter, real llama-quantize, real llama-cpp-python."""

from __future__ import annotations

import numpy as np
import pytest

from bitsweep.backends import Artifact
from bitsweep.backends.llamacpp.quantize import gguf_summary
from bitsweep.backends.llamacpp.runner import Runner as LlamaCppRunner
from bitsweep.backends.llamacpp.tools import LlamaCppToolError
from bitsweep.backends.torch_ref import TorchRunner
from bitsweep.metrics import ReferenceTopK, kl_divergence

from . import helpers

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]

IDS = np.array(
    [504, 3458, 314, 253, 1345, 28, 1097, 2049, 30, 216, 5248, 198, 7, 44, 17, 901] * 4, dtype=np.int32
)


def quantize(tiny_gguf, tmp_path, qtype: str, bits: int) -> Artifact:
    return helpers.quantize(
        "llamacpp", tiny_gguf, qtype.lower(), bits, tmp_path / qtype, type=qtype, imatrix=False
    )


def test_converted_f32_gguf_matches_torch(tiny_model_dir, tiny_gguf):
    torch_logits = TorchRunner(tiny_model_dir, threads=2).logits(IDS)
    runner = LlamaCppRunner(tiny_gguf, threads=2, n_ctx=128)
    try:
        llama_logits = runner.logits(IDS)
        assert runner.detokenize(IDS) == TorchRunner(tiny_model_dir, 1).detokenize(IDS)
    finally:
        runner.close()
    assert llama_logits.shape == torch_logits.shape == (len(IDS), 49152)
    assert np.abs(llama_logits - torch_logits).max() < 1e-3


def test_quantized_files_hold_the_types_and_sizes_claimed(tiny_gguf, tmp_path):
    q8 = quantize(tiny_gguf, tmp_path, "Q8_0", 8)
    q4 = quantize(tiny_gguf, tmp_path, "Q4_0", 4)
    assert q8.meta["applied"]["tensor_types"].get("Q8_0", 0) >= 14  # every 2-D weight of the 2 layers
    assert "Q4_0" in q4.meta["applied"]["tensor_types"]
    assert 8.0 < q8.meta["applied"]["bpw"] < 9.0
    assert q4.meta["applied"]["bpw"] < q8.meta["applied"]["bpw"]
    assert q4.model_file.stat().st_size < q8.model_file.stat().st_size
    applied = Artifact.load(q8.path).meta["applied"]
    assert gguf_summary(q8.model_file) == {
        k: v for k, v in applied.items() if k not in ("type", "nominal_bpw")
    }
    assert (applied["type"], applied["nominal_bpw"]) == ("Q8_0", 8.5)


def test_kl_divergence_orders_with_bits(tiny_gguf, tmp_path):
    ref = LlamaCppRunner(tiny_gguf, threads=2, n_ctx=128)
    top = ReferenceTopK.from_logits(ref.logits(IDS), 64)
    ref.close()
    kld = {}
    for qtype, bits in (("Q8_0", 8), ("Q4_0", 4)):
        runner = helpers.open_runner(quantize(tiny_gguf, tmp_path, qtype, bits), threads=2, n_ctx=128)
        kld[qtype] = kl_divergence(top, runner.logits(IDS)).mean()
        prompt_s, gen_s = runner.generate(IDS[:16], 4)
        assert prompt_s > 0 and gen_s > 0
        runner.close()
    assert 0 < kld["Q8_0"] < kld["Q4_0"]


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(LlamaCppToolError, match="llama-quantize failed with exit code"):
        helpers.quantize("llamacpp", bad, "q8_0", 8, tmp_path / "out", threads=1, type="Q8_0")


def test_timed_generation_runs_without_all_position_logits(tiny_gguf):
    """generate() decodes in a second context on the same weights with llama.cpp's greedy sampler: it times a
    prompt and new tokens and leaves the scoring context's logits untouched."""
    with LlamaCppRunner(tiny_gguf.parent, 2, 128) as runner:
        before = runner.logits(IDS)
        prompt_s, gen_s = runner.generate(IDS[:32], 16)
        assert prompt_s > 0 and gen_s > 0
        assert runner.generate(IDS[:1], 0)[1] == pytest.approx(
            0, abs=1e-3
        )  # no new token: no generation time
        np.testing.assert_array_equal(runner.logits(IDS), before)
        with pytest.raises(Exception, match="n_ctx|longer"):
            runner.generate(np.tile(IDS, 2)[:120], 16)  # 136 tokens do not fit in n_ctx=128


def test_scoring_reads_the_logits_llama_cpp_python_computes(tiny_gguf):
    """window_logits (what scoring calls: one llama_decode, logits read in place) gives llama-cpp-python's own
    ``eval`` logits bit for bit, for a full and a shorter window, and leaves no cache behind for greedy."""
    with LlamaCppRunner(tiny_gguf.parent, 2, 128) as runner:
        for ids in (np.tile(IDS, 2), IDS[:40]):
            runner.llm.reset()
            runner.llm.eval([int(t) for t in ids])
            theirs = np.array(runner.llm.scores[: len(ids)], dtype=np.float32)
            ours = runner.window_logits(ids)
            assert ours.shape == (len(ids), 49152)
            np.testing.assert_array_equal(ours, theirs)
        first = runner.greedy(IDS[:16], 4)
        runner.window_logits(np.tile(IDS, 2))
        np.testing.assert_array_equal(runner.greedy(IDS[:16], 4), first)

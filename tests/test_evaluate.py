"""The comparability guard of bitsweep.evaluate, on the tiny model's real torch runner: each thing that would
make a variant's numbers incomparable is refused."""

from __future__ import annotations

import numpy as np
import pytest

from bitsweep.backends.base import BaseRunner
from bitsweep.backends.torch_ref import TorchRunner
from bitsweep.config import EvalConfig
from bitsweep.errors import ComparabilityError
from bitsweep.evaluate import Reference, score
from bitsweep.text import Windows, pydoc_texts, tokenize_windows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def windows(tmp_path_factory, tiny_model_dir) -> Windows:
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(pydoc_texts(0.25)[0][:20000])
    return tokenize_windows(tiny_model_dir, path, 64, 3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, windows) -> Reference:
    out = tmp_path_factory.mktemp("reference") / "ref"
    with TorchRunner(tiny_model_dir, 2) as runner:
        score(runner, windows, None, EvalConfig(), keep=out)
    return Reference.load(out)


class Renamed(TorchRunner):
    """A runtime whose vocabulary differs: one token decodes to other bytes."""

    def detokenize(self, ids):
        return super().detokenize(ids).replace(b"e", b"E", 1)


class Truncating(TorchRunner):
    def logits(self, ids):
        return super().logits(ids)[:-1]


def test_the_reference_scores_itself_perfectly(tiny_model_dir, windows, reference):
    with TorchRunner(tiny_model_dir, 2) as runner:
        metrics, per_window = score(runner, windows, reference, EvalConfig())
    assert metrics["kld"] < 1e-6 and metrics["top1"] == 1.0 and metrics["ppl_ratio"] == pytest.approx(1.0)
    assert len(per_window["all"]["n"]) == windows.n_windows == len(reference.per_window["llamacpp"]["nll"])


def test_a_runner_whose_tokenizer_decodes_differently_is_refused(tiny_model_dir, windows, reference):
    with Renamed(tiny_model_dir, 2) as runner, pytest.raises(ComparabilityError, match="decodes the shared"):
        score(runner, windows, reference, EvalConfig())


def test_a_reference_made_on_other_windows_is_refused(tiny_model_dir, windows, reference):
    other = Windows(
        np.roll(windows.ids, 1, axis=1), windows.text_sha256, windows.tokenizer, windows.decoded_sha256
    )
    with (
        TorchRunner(tiny_model_dir, 2) as runner,
        pytest.raises(ComparabilityError, match="other token windows"),
    ):
        score(runner, other, reference, EvalConfig())


def test_a_wrong_number_of_logit_rows_is_refused(tiny_model_dir, windows, reference):
    with (
        Truncating(tiny_model_dir, 2) as runner,
        pytest.raises(ComparabilityError, match="63 rows of logits"),
    ):
        score(runner, windows, reference, EvalConfig())


def test_a_window_longer_than_n_ctx_is_refused(tiny_model_dir, windows):
    with (
        TorchRunner(tiny_model_dir, 2, n_ctx=32) as runner,
        pytest.raises(ComparabilityError, match="n_ctx=32"),
    ):
        runner.logits(windows.ids[0])


class Shifted(TorchRunner):
    """A different model: its greedy choice moves to the second most likely token on every third step."""

    def _prefill(self, prompt):
        self.steps = 0
        return super()._prefill(prompt)

    def _step(self, token):
        logits = super()._step(token).copy()
        self.steps += 1
        if self.steps % 3 == 0:
            logits[np.argmax(logits)] = -np.inf
        return logits

    def greedy_many(self, prompts, n_new):  # one prompt at a time, through the shifted steps
        return BaseRunner.greedy_many(self, prompts, n_new)


def test_the_timed_prefill_runs_the_head_on_the_last_position_only(tiny_model_dir):
    """As a deployment (and llama-bench) does: the LM head sees one position when a prompt is prefilled, and its
    logits are the last row of the all-position scoring forward's."""
    ids = np.arange(100, 140)
    with TorchRunner(tiny_model_dir, 2) as runner:
        seen = []
        runner.model.lm_head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
        last = runner._prefill(ids)
        assert seen == [1]
        np.testing.assert_allclose(last, runner.logits(ids)[-1], atol=1e-4, rtol=1e-4)
        assert seen == [1, len(ids)]  # scoring still computes every position


def test_greedy_continuations_follow_the_reference_until_they_differ(tiny_model_dir, windows, tmp_path):
    from bitsweep.config import AgreementConfig, SpeedConfig
    from bitsweep.evaluate import evaluate_runner

    cfg = EvalConfig(n_ctx=64, speed=SpeedConfig(16, 4), agreement=AgreementConfig(2, 16, 8))
    evaluate_runner(lambda: TorchRunner(tiny_model_dir, 2), windows, None, cfg, keep=tmp_path / "ref")
    reference = Reference.load(tmp_path / "ref")
    assert reference.greedy.shape == (2, 8)
    same, _ = evaluate_runner(lambda: TorchRunner(tiny_model_dir, 2), windows, reference, cfg)
    assert same["greedy_prefix_match"] == same["greedy_token_match"] == 1.0
    other, _ = evaluate_runner(lambda: Shifted(tiny_model_dir, 2), windows, reference, cfg)
    # the first generated token comes from the prompt's logits; the third step's choice is forced away
    assert other["greedy_prefix_match"] == pytest.approx(3 / 8)


@pytest.mark.parametrize(("protocol", "sizes"), [("bitsweep", (32, 8, 3)), ("llama-bench", (512, 128, 5))])
def test_speed_carries_its_protocol_spread_and_the_machines_load(tiny_model_dir, tmp_path, protocol, sizes):
    """Both speed protocols on the tiny model's torch runner: tokens/s with min/max/sd, the protocol, and the CPU
    time other processes used while it was timed (a process this test keeps busy must show up)."""
    import subprocess
    import sys

    from bitsweep.config import SpeedConfig
    from bitsweep.evaluate import measure_speed

    speed = SpeedConfig(prompt_tokens=sizes[0], gen_tokens=sizes[1], protocol=protocol)
    assert (speed.prompt_tokens, speed.gen_tokens, speed.repeats) == sizes
    path = tmp_path / "eval.txt"
    path.write_text(pydoc_texts(0.25)[0][:20000])
    windows = tokenize_windows(tiny_model_dir, path, 512, 1)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with TorchRunner(tiny_model_dir, 1) as runner:
            out = measure_speed(runner, windows, EvalConfig(speed=speed))
    finally:
        busy.kill()
    assert out["speed_protocol"] == protocol and out["tg_tok_s_min"] <= out["tg_tok_s"] <= out["tg_tok_s_max"]
    assert out["pp_tok_s_sd"] >= 0 and out["tg_tok_s_sd"] >= 0
    assert out["speed_other_cores"] > 0.5, out  # the busy loop had a core to itself
    assert "busy machine" in out["speed_flag"] and "python" in out["speed_busy_processes"]


def test_speed_flags_say_why_a_figure_is_not_clean():
    from bitsweep.evaluate import speed_flag

    assert speed_flag({"speed_other_cores": 0.05, "speed_spread": 0.03}) == ""
    assert speed_flag({"speed_other_cores": 1.2, "speed_busy_processes": "pytest (1.20 cores)",
                       "speed_spread": 0.3}) == ("busy machine: pytest (1.20 cores) used 1.20 cores while timed; "
                                                 "repeats spread 30% (sd/mean)")  # fmt: skip

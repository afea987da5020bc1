"""OpenVINO + NNCF on a tiny random Llama: real optimum-intel export, real NNCF compression, real CPU plugin."""

from __future__ import annotations

import numpy as np
import pytest

from bitsweep.backends import Artifact
from bitsweep.backends.openvino.convert import export_openvino
from bitsweep.backends.openvino.quantize import ir_summary
from bitsweep.backends.openvino.runner import (
    LOGITS_FROM,
    PINNED,
    head_matmul,
    slice_before_head,
    stateful_inputs,
)
from bitsweep.backends.openvino.runner import Runner as OpenVINORunner
from bitsweep.backends.torch_ref import TorchRunner
from bitsweep.metrics import ReferenceTopK, kl_divergence

from . import helpers

pytest.importorskip("openvino")
pytestmark = [pytest.mark.openvino, pytest.mark.slow]

IDS = np.array([504, 3458, 314, 253, 1345, 28, 1097, 2049, 30, 216, 5248, 198, 44, 901] * 4, dtype=np.int32)


@pytest.fixture(scope="module")
def tiny_ir(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("tiny-ir")
    export_openvino(tiny_model_dir, out, {})
    return out


def compress(tiny_ir, tmp_path, name: str, bits: int, **options) -> Artifact:
    return helpers.quantize("openvino", tiny_ir, name, bits, tmp_path / name, **options)


def test_fp32_ir_matches_torch(tiny_model_dir, tiny_ir):
    runner = OpenVINORunner(tiny_ir, threads=2)
    try:
        assert np.abs(runner.logits(IDS) - TorchRunner(tiny_model_dir, 2).logits(IDS)).max() < 1e-3
        prompt_s, gen_s = runner.generate(IDS[:16], 4)
        assert prompt_s > 0 and gen_s > 0
        # the plugin's host-dependent defaults (bf16 on AMX, u8 KV cache, int8 activations on VNNI) are off
        assert runner.scoring_info() == {
            "openvino_inference_precision_hint": "f32",
            "openvino_kv_cache_precision": "f32",
            "openvino_dynamic_quantization_group_size": "0",
        }
    finally:
        runner.close()


def test_compressed_ir_stores_the_claimed_integer_types(tiny_ir, tmp_path):
    int8 = compress(tiny_ir, tmp_path, "int8_asym", 8, mode="INT8_ASYM")
    int4 = compress(tiny_ir, tmp_path, "int4_asym_g64", 4, mode="INT4_ASYM", group_size=64, ratio=1.0)
    nf4 = compress(tiny_ir, tmp_path, "nf4_g64", 4, mode="NF4", group_size=64, ratio=1.0)
    assert set(int8.meta["applied"]["weight_types"]) == {"u8"}
    assert "u4" in int4.meta["applied"]["weight_types"]
    assert "nf4" in nf4.meta["applied"]["weight_types"]
    assert int4.meta["applied"]["bpw"] < int8.meta["applied"]["bpw"] < 9
    assert ir_summary(int4.path / "openvino_model.xml") == {k: int4.meta["applied"][k] for k in
                                                             ("weight_types", "elements_by_type")}  # fmt: skip
    assert any("int4_asym" in line for line in int4.meta["applied"]["nncf_log"])


def test_kl_divergence_orders_int8_below_int4(tiny_ir, tmp_path):
    ref = OpenVINORunner(tiny_ir, threads=2)
    top = ReferenceTopK.from_logits(ref.logits(IDS), 64)
    ref.close()
    kld = {}
    for name, bits, options in (("int8", 8, {"mode": "INT8_ASYM"}),
                                ("int4", 4, {"mode": "INT4_SYM", "group_size": 64, "ratio": 1.0})):  # fmt: skip
        runner = helpers.open_runner(compress(tiny_ir, tmp_path, name, bits, **options))
        kld[name] = kl_divergence(top, runner.logits(IDS)).mean()
        runner.close()
    assert 0 < kld["int8"] < kld["int4"]


def test_prompts_decoded_as_a_batch_continue_as_one_at_a_time(tiny_ir, tmp_path):
    # The greedy continuations (a quality column) decode all prompts as one batch.
    prompts = np.stack([IDS[i : i + 12] for i in range(0, 40, 5)])
    int4 = compress(tiny_ir, tmp_path, "int4", 4, mode="INT4_ASYM", group_size=64, ratio=1.0)
    for path in (tiny_ir, int4.path):
        runner = OpenVINORunner(path, threads=2)
        try:
            batched = runner.greedy_many(prompts, 10)
            assert batched.shape == (8, 10) and np.array_equal(
                batched, np.stack([runner.greedy(p, 10) for p in prompts])
            )
        finally:
            runner.close()


def test_prompts_run_the_head_on_their_last_position_only(tiny_ir):
    """As OpenVINO GenAI's pipeline: the runner's graph slices the LM head's input at ``logits_from``, so a prompt
    makes one row of logits (the same, to float32 rounding); scored windows still get every position, to the bit of the
    IR compiled as exported."""
    import openvino as ov

    core = ov.Core()
    config = {**PINNED, "INFERENCE_NUM_THREADS": 2, "NUM_STREAMS": 1}
    exported = core.compile_model(core.read_model(str(tiny_ir / "openvino_model.xml")), "CPU", config)
    plain = np.array(exported.create_infer_request().infer(stateful_inputs(IDS))["logits"][0])
    runner = OpenVINORunner(tiny_ir, threads=2)
    try:
        assert np.array_equal(runner.logits(IDS), plain)
        runner.request.reset_state()
        last = runner.request.infer(stateful_inputs(IDS) | {LOGITS_FROM: np.array([len(IDS) - 1])})["logits"]
        assert last.shape == (1, 1, plain.shape[1])
        # one row instead of n: the CPU plugin may pick another kernel (SmolLM2 INT4: 3.8e-5 of logits up to 33)
        tolerance = 1e-5 * np.abs(plain).max()
        assert np.abs(last[0, 0] - plain[-1]).max() <= tolerance
        assert np.abs(runner._prefill(IDS) - plain[-1]).max() <= tolerance
    finally:
        runner.close()
    matmul, port = head_matmul(slice_before_head(core.read_model(str(tiny_ir / "openvino_model.xml"))))
    assert matmul.input_value(port).get_node().get_type_name() == "Slice"


def test_openvino_genai_generates_what_our_runner_does(tiny_ir, tmp_path):
    """bench/runtimes.py times our runner against OpenVINO GenAI's LLMPipeline on the same IR and plugin settings:
    both must be the same model, so their greedy continuations agree token for token (INT4 IR)."""
    import sys
    from pathlib import Path

    pytest.importorskip("openvino_genai")
    import openvino_genai

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from runtimes import genai_inputs, genai_pipeline

    int4 = compress(tiny_ir, tmp_path, "int4", 4, mode="INT4_SYM", group_size=64, ratio=1.0)
    runner = helpers.open_runner(int4)
    try:
        ours = runner.greedy(IDS[:20], 12)
    finally:
        runner.close()
    pipe = genai_pipeline(int4.path, threads=2)
    config = openvino_genai.GenerationConfig(max_new_tokens=12, min_new_tokens=12, ignore_eos=True)
    theirs = pipe.generate(genai_inputs(IDS[:20]), config).tokens[0]
    assert list(theirs) == ours.tolist()

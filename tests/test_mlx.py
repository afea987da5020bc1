"""MLX on a tiny random Llama: mlx-lm's real converter and quantizer, MLX's quantized layers on its CPU."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bitsweep.backends import Artifact
from bitsweep.backends.mlx.quantize import tensor_shapes
from bitsweep.backends.mlx.runner import Runner as MLXRunner
from bitsweep.backends.torch_ref import TorchRunner
from bitsweep.config import ModelConfig, SourceConfig, load_experiment
from bitsweep.errors import ConfigError
from bitsweep.metrics import ReferenceTopK, kl_divergence
from bitsweep.text import Windows

from . import helpers
from .conftest import CONFIGS

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
pytestmark = [pytest.mark.mlx, pytest.mark.slow]

IDS = np.array([504, 3458, 314, 253, 1345, 28, 1097, 2049, 30, 216, 5248, 198, 44, 901] * 4, dtype=np.int32)


def convert(model_dir, tmp_path_factory, name: str):
    """The workflow's stages: HF -> MLX float32, checked against torch on window 0 (IDS) -> mlx.check.json."""
    from bitsweep.stages import check_conversion
    from bitsweep.stages import convert as convert_stage

    folder = tmp_path_factory.mktemp(name)
    windows = Windows(IDS[None], text_sha256="-", tokenizer="-", decoded_sha256=("-",))
    windows.save(folder / "windows.npz")
    model = ModelConfig(name="tiny", source=SourceConfig(kind="local", path=str(model_dir)))
    convert_stage("mlx", model, model_dir, folder / "mlx", {"dtype": "float32"})
    check_conversion(
        "mlx", model, model_dir, folder / "mlx", folder / "windows.npz", folder / "mlx.check.json"
    )
    return folder / "mlx"


@pytest.fixture(scope="module")
def tiny_mlx(tmp_path_factory, tiny_model_dir):
    return convert(tiny_model_dir, tmp_path_factory, "tiny-mlx")


@pytest.fixture(scope="module")
def fp_logits(tiny_mlx):
    runner = MLXRunner(tiny_mlx, threads=2)
    try:
        return runner.logits(IDS)
    finally:
        runner.close()


def quantize(tiny_mlx, tmp_path, name: str, bits: int, **options) -> Artifact:
    return helpers.quantize("mlx", tiny_mlx, name, bits, tmp_path / name, **options)


def test_fp32_mlx_matches_torch_and_generates(tiny_model_dir, tiny_mlx, fp_logits):
    torch_logits = TorchRunner(tiny_model_dir, 2).logits(IDS)
    assert np.abs(fp_logits - torch_logits).max() < 1e-4
    check = json.loads((tiny_mlx.parent / "mlx.check.json").read_text())
    assert check["max_abs_logit_diff_vs_torch"] < 1e-4 and check["tokens"] == len(IDS)
    assert {dtype for dtype, _ in tensor_shapes(tiny_mlx).values()} == {"F32"}
    runner = MLXRunner(tiny_mlx, threads=2)
    try:
        assert runner.detokenize(IDS) == TorchRunner(tiny_model_dir, 2).detokenize(IDS)
        prompt_s, gen_s = runner.generate(IDS[:16], 4)
        assert prompt_s > 0 and gen_s > 0
    finally:
        runner.close()


def test_conversion_check_asks_for_the_one_core_mlx_computes_on():
    from bitsweep.backends.mlx import MLX
    from bitsweep.backends.onnx_family import ONNX

    assert (MLX.check_threads(4), ONNX.check_threads(4), ONNX.check_threads(1)) == (1, 4, 1)


def test_rope_base_written_only_under_rope_parameters_is_used(tiny_model_dir, tmp_path_factory):
    """transformers 5 writes ``rope_parameters`` only; mlx-lm would silently run RoPE with base 10000."""
    hf = tmp_path_factory.mktemp("rope") / "hf"
    shutil.copytree(tiny_model_dir, hf)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(config | {"rope_theta": 100000.0}))
    torch_logits = TorchRunner(hf, 2).logits(IDS)
    assert np.abs(torch_logits - TorchRunner(tiny_model_dir, 2).logits(IDS)).max() > 1e-3  # the base matters
    del config["rope_theta"]
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 100000.0}
    (hf / "config.json").write_text(json.dumps(config))
    from bitsweep.manifest import write_manifest

    write_manifest(hf)
    runner = MLXRunner(convert(hf, tmp_path_factory, "rope-mlx"), threads=2)
    try:
        assert np.abs(runner.logits(IDS) - torch_logits).max() < 1e-4
    finally:
        runner.close()


@pytest.mark.parametrize(
    ("mode", "bits", "group", "scale_dtype"),
    [("AFFINE2", 2, 64, "F32"), ("AFFINE3", 3, 64, "F32"), ("AFFINE4", 4, 32, "F32"),
     ("AFFINE8", 8, 64, "F32"), ("MXFP4", 4, 32, "U8"), ("NVFP4", 4, 16, "U8"), ("MXFP8", 8, 32, "U8")],
)  # fmt: skip
def test_quantized_weights_are_stored_at_the_claimed_width(
    tiny_mlx, tmp_path, mode, bits, group, scale_dtype
):
    artifact = quantize(tiny_mlx, tmp_path, mode.lower(), bits, mode=mode, group_size=group)
    shapes = tensor_shapes(artifact.path)
    # q_proj: 64 -> 64; down_proj: 128 -> 64; the tied embedding: 49152 x 64 (also the LM head)
    for name, in_features in (("model.layers.0.self_attn.q_proj", 64), ("model.layers.1.mlp.down_proj", 128),
                              ("model.embed_tokens", 64)):  # fmt: skip
        weight_dtype, (rows, words) = shapes[f"{name}.weight"]
        assert weight_dtype == "U32" and words * 32 == in_features * bits
        assert shapes[f"{name}.scales"] == (scale_dtype, (rows, in_features // group))
        assert (f"{name}.biases" in shapes) == mode.startswith("AFFINE")
    quant = json.loads((artifact.path / "config.json").read_text())["quantization"]
    assert quant == {
        "group_size": group,
        "bits": bits,
        "mode": "affine" if mode.startswith("AFFINE") else mode.lower(),
    }
    applied = Artifact.load(artifact.path).meta["applied"]
    assert applied["layers_by_bits"] == {str(bits): 15} and applied["mismatched"] == []
    assert applied["unquantized_matrices"] == 0 and artifact.model_file.is_file()


def test_rows_the_group_does_not_divide_stay_unquantized_and_are_reported(tiny_mlx, tmp_path):
    applied = quantize(tiny_mlx, tmp_path, "affine4_g128", 4, mode="AFFINE4", group_size=128).meta["applied"]
    assert applied["layers_by_bits"] == {4: 2}  # the two down_proj (128 wide); the 64-wide rows stay float32
    assert applied["unquantized_matrices"] == 13 and applied["bpw"] > 20


def test_mixed_recipe_stores_more_bits_for_the_recipes_layers(tiny_mlx, tmp_path):
    artifact = quantize(tiny_mlx, tmp_path, "mixed_2_6", 2, mode="MIXED_2_6", group_size=64)
    shapes = tensor_shapes(artifact.path)
    quant = json.loads((artifact.path / "config.json").read_text())["quantization"]
    # 2 layers: mlx-lm's recipe gives the last one's v_proj and down_proj 6 bits, everything else 2
    for name, in_features, bits in (("model.layers.0.self_attn.v_proj", 64, 2),
                                    ("model.layers.1.self_attn.v_proj", 64, 6),
                                    ("model.layers.0.mlp.down_proj", 128, 2),
                                    ("model.layers.1.mlp.down_proj", 128, 6),
                                    ("model.layers.1.self_attn.q_proj", 64, 2)):  # fmt: skip
        assert shapes[f"{name}.weight"][1][1] * 32 == in_features * bits
        assert quant[name]["bits"] == bits
    assert artifact.meta["applied"]["layers_by_bits"] == {2: 13, 6: 2}
    plain = quantize(tiny_mlx, tmp_path, "affine2", 2, mode="AFFINE2", group_size=64).meta["applied"]["bpw"]
    assert plain < artifact.meta["applied"]["bpw"]


def test_kl_divergence_orders_8_below_4_below_2_bits(tiny_mlx, tmp_path, fp_logits):
    top = ReferenceTopK.from_logits(fp_logits, 64)
    kld = {}
    for bits in (8, 4, 2):
        artifact = quantize(tiny_mlx, tmp_path, f"affine{bits}", bits, mode=f"AFFINE{bits}", group_size=64)
        runner = helpers.open_runner(artifact)
        try:
            kld[bits] = kl_divergence(top, runner.logits(IDS)).mean()
            if bits == 2:  # generation through MLX's quantized layers and mlx-lm's KV cache
                assert all(s > 0 for s in runner.generate(IDS[:16], 4))
        finally:
            runner.close()
    assert 0 < kld[8] < kld[4] < kld[2]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+quant.mlx.affine4_g64.bits=7", "backend 'mlx' cannot quantize to 7 bits (scheme mlx/affine4_g64); "
                                          "it supports: 1, 2, 3, 4, 5, 6, 8, 32"),
        ("+quant.mlx.affine4_g64.options.mode=AFFINE7",
         "unknown mlx mode 'AFFINE7'; known: AFFINE1, AFFINE2, AFFINE3, AFFINE4, AFFINE5, AFFINE6, AFFINE8"),
        ("+quant.mlx.affine4_g64.options.group_size=16",
         "scheme mlx/affine4_g64: mode AFFINE4 takes group_size 32, 64, 128; config says 16"),
        ("+quant.mlx.mxfp4.options.group_size=64", "mode MXFP4 takes group_size 32; config says 64"),
        ("+quant.mlx.affine4_g64.options.quantize_input=true", "quantize_input cannot run here: activation"),
    ],
)  # fmt: skip
def test_cells_mlx_cannot_run_are_refused_at_config_time(override, message):
    with pytest.raises(ConfigError) as err:
        load_experiment(CONFIGS, "default", ["sweep.mlx=[affine4_g64,mxfp4]", override])
    assert message in str(err.value)


def test_fp32_scheme_is_the_converted_model(tiny_mlx, tmp_path, fp_logits):
    artifact = quantize(tiny_mlx, tmp_path, "fp32", 32, mode="NONE")
    assert artifact.meta["applied"]["layers_by_bits"] == {} and 31.9 < artifact.meta["applied"]["bpw"] < 32.1
    runner = helpers.open_runner(artifact)
    try:
        assert np.array_equal(runner.logits(IDS), fp_logits)
    finally:
        runner.close()


@pytest.mark.parametrize(
    ("mode", "bits", "group"), [("AFFINE2", 2, 64), ("AFFINE4", 4, 32), ("MXFP4", 4, 32)]
)
def test_scoring_on_mlx_dequantized_weights_gives_mlx_logits(tiny_mlx, tmp_path, mode, bits, group):
    artifact = quantize(tiny_mlx, tmp_path, mode.lower(), bits, mode=mode, group_size=group)
    runner = helpers.open_runner(artifact)
    native = MLXRunner(artifact.path, threads=2, scoring="native")
    try:
        assert runner.scoring == "dequantized" and native.scoring == "native"
        scored, own = runner.logits(IDS), native.logits(IDS)
        assert np.abs(scored - own).max() <= 1e-5 * np.abs(own).max()
        assert runner.scoring_info()["scoring_check_rel_diff"] <= 1e-5
        assert np.array_equal(runner.greedy(IDS[:16], 8), native.greedy(IDS[:16], 8))
        assert all(s > 0 for s in runner.generate(IDS[:16], 4))  # timed on MLX's own kernels
    finally:
        runner.close()
        native.close()


def test_scoring_that_disagrees_with_mlx_is_refused(tiny_mlx, tmp_path):
    import torch

    from bitsweep.errors import ComparabilityError

    artifact = quantize(tiny_mlx, tmp_path, "affine4", 4, mode="AFFINE4", group_size=32)
    runner = helpers.open_runner(artifact)
    try:
        with torch.no_grad():  # one weight the dequantization got wrong
            runner.scorer.model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
        with pytest.raises(ComparabilityError, match="other logits than MLX"):
            runner.logits(IDS)
    finally:
        runner.close()
    assert MLXRunner(tiny_mlx, threads=2).scoring == "native"  # an fp model: MLX's own logits


def test_generation_is_timed_as_mlx_lm_generates(tiny_mlx):
    """The timed path is mlx-lm's own: the prompt but its last token fills the cache with no logits evaluated, the
    last token gives them. Same continuation as mlx-lm's ``generate_step``, and the prompt's last logits are the
    window's last row (to float32 rounding: the head runs on one row instead of all)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    runner = MLXRunner(tiny_mlx, threads=2, scoring="native")
    try:
        window = runner.native_logits(IDS[:20])
        assert np.abs(runner._prefill(IDS[:20]) - window[-1]).max() < 1e-5 * np.abs(window).max()
        theirs = [token for token, _ in generate_step(mx.array(IDS[:20]), runner.model, max_tokens=12)]
        assert runner.greedy(IDS[:20], 12).tolist() == theirs
    finally:
        runner.close()


def test_the_mlx_lm_benchmark_peer_runs_on_our_artifact(tiny_mlx):
    """bench/runtimes.py's peer: ``mlx_lm.benchmark`` on the converted folder, its trials read back."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from runtimes import mlx_lm_benchmark

    out = mlx_lm_benchmark(tiny_mlx, n_prompt=16, n_gen=4, repeats=2)
    assert len(out["pp"]["runs"]) == len(out["tg"]["runs"]) == 2
    assert min(out["pp"]["runs"] + out["tg"]["runs"]) > 0

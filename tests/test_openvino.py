"""OpenVINO + NNCF on a tiny random Llama: real optimum-intel export, real NNCF compression, real CPU plugin."""

from __future__ import annotations

import numpy as np
import pytest

from bitsweep.backends import Artifact
from bitsweep.backends.openvino.convert import export_openvino
from bitsweep.backends.openvino.quantize import ir_summary
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

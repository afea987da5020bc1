"""The ONNX family on a tiny random Llama: optimum's real export, ONNX Runtime's real quantizers, a real Olive
workflow, onnxruntime's QNN QDQ tooling, and the Qualcomm AI Hub client path up to the network call."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bitsweep.backends.onnx_family import OnnxRunner, export_onnx, quantizes_activations, window_feeds
from bitsweep.backends.qnn.settings import Settings as QnnSettings
from bitsweep.backends.torch_ref import TorchRunner
from bitsweep.config import SchemeConfig
from bitsweep.errors import ConfigError
from bitsweep.metrics import ReferenceTopK, kl_divergence

from . import helpers

pytest.importorskip("onnxruntime")
pytestmark = [pytest.mark.onnx, pytest.mark.slow]

IDS = np.array([504, 3458, 314, 253, 1345, 28, 1097, 2049, 30, 216, 5248, 198, 44, 901] * 4, dtype=np.int32)
CALIB_TEXT = "The quick brown fox jumps over the lazy dog. " * 200


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("tiny-onnx")
    export_onnx(tiny_model_dir, out)
    return out


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB_TEXT)
    return path


def quantize(backend, src, tmp_path, name, bits, calib=None, **options):
    settings = {} if backend == "olive" else {"calibration": {"n_ctx": 32, "n_samples": 4}}
    return helpers.quantize(backend, src, name, bits, tmp_path / name, calibration=calib, settings=settings,
                            **options)  # fmt: skip


def kld_vs(reference_dir, artifact) -> float:
    top = ReferenceTopK.from_logits(OnnxRunner(reference_dir, 2).logits(IDS), 64)
    return float(kl_divergence(top, OnnxRunner(artifact.path, 2).logits(IDS)).mean())


def node_types(artifact) -> dict[str, str]:
    model = onnx.load(str(artifact.model_file), load_external_data=False)
    return {node.name: node.op_type for node in model.graph.node}


def test_export_matches_torch_and_generates_with_its_kv_cache(tiny_model_dir, tiny_onnx):
    runner = OnnxRunner(tiny_onnx, threads=2)
    torch_logits = TorchRunner(tiny_model_dir, 2).logits(IDS)
    assert np.abs(runner.logits(IDS) - torch_logits).max() < 1e-4
    # The KV-cache path: scoring token by token from the cache gives the window's logits.
    session, names = runner.session, ["logits", *runner.present]
    _, *present = session.run(names, window_feeds(runner.inputs, IDS[:20]))
    past_names = [i.name for i in runner.inputs if i.name.startswith("past_key_values")]
    feeds = {"input_ids": IDS[None, 20:21].astype(np.int64), "attention_mask": np.ones((1, 21), np.int64),
             "position_ids": np.array([[20]], np.int64), **dict(zip(past_names, present, strict=True))}  # fmt: skip
    step = session.run(["logits"], feeds)[0][0, -1]
    assert np.abs(step - torch_logits[20]).max() < 1e-4
    prompt_s, gen_s = runner.generate(IDS[:16], 4)
    assert prompt_s > 0 and gen_s > 0


def test_onnxruntime_formats_store_the_claimed_types(tiny_onnx, tmp_path, calib_text):
    dynamic = quantize("onnxruntime", tiny_onnx, tmp_path, "int8_dynamic", 8, format="DYNAMIC_INT8")
    assert dynamic.meta["applied"]["quant_ops"]["MatMulInteger"] >= 15  # 14 projections + the LM head
    assert "int8" in dynamic.meta["applied"]["weight_types"]

    qdq = quantize("onnxruntime", tiny_onnx, tmp_path, "int8_qdq", 8, calib_text, format="QDQ_INT8", dataset=True,
                   exclude=["*/down_proj/*"])  # fmt: skip
    applied = qdq.meta["applied"]
    assert applied["quant_ops"]["QuantizeLinear"] > 0 and applied["weight_types"].get("int8")
    assert applied["float_nodes"] == [
        "/model/layers.0/mlp/down_proj/MatMul",
        "/model/layers.1/mlp/down_proj/MatMul",
    ]
    types = node_types(qdq)
    assert all(types[name] == "MatMul" for name in applied["float_nodes"])

    int4 = quantize("onnxruntime", tiny_onnx, tmp_path, "int4_g32", 4, format="BLOCK_INT4", block_size=32)
    assert int4.meta["applied"]["blockwise"] == {"GatherBlockQuantized:bits=4:block=32": 1,
                                                 "MatMulNBits:bits=4:block=32": 15}  # fmt: skip
    assert node_types(int4)["/lm_head/MatMul_Q4"] == "MatMulNBits"  # the tied head is quantized too
    # MatMulNBits' packed weight: [N, K / block, block * bits / 8] uint8; the tiny model's q_proj is 64 x 64.
    model = onnx.load(str(int4.model_file))
    q_proj = next(n for n in model.graph.node if n.name.startswith("/model/layers.0/self_attn/q_proj"))
    packed = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == q_proj.input[1]))
    assert packed.dtype == np.uint8 and packed.shape == (64, 2, 16)
    # Which graphs decode greedy continuations as a batch: those whose activations stay float. The artifact's
    # record of its ops decides; without one, the graph itself.
    assert [OnnxRunner(a.path, 2).batch_greedy for a in (dynamic, qdq, int4)] == [False, False, True]
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(dynamic.model_file, bare / "model.onnx")
    assert quantizes_activations(bare) and not quantizes_activations(tiny_onnx)


def test_onnxruntime_kld_orders_8_below_4_below_2_bits(tiny_onnx, tmp_path):
    artifacts = {bits: quantize("onnxruntime", tiny_onnx, tmp_path, f"int{bits}", bits, format=f"BLOCK_INT{bits}",
                                block_size=32) for bits in (8, 4, 2)}  # fmt: skip
    kld = {bits: kld_vs(tiny_onnx, artifact) for bits, artifact in artifacts.items()}
    assert 0 < kld[8] < kld[4] < kld[2]
    # The greedy continuations (a quality column) decoded as one batch are those decoded one prompt at a time.
    prompts = np.stack([IDS[i : i + 12] for i in range(0, 40, 5)])
    for artifact in (tiny_onnx, *artifacts.values()):
        runner = OnnxRunner(artifact if artifact == tiny_onnx else artifact.path, 2)
        assert runner.batch_greedy  # float activations: no quantization op on them
        batched = runner.greedy_many(prompts, 10)
        assert batched.shape == (8, 10) and np.array_equal(
            batched, np.stack([runner.greedy(p, 10) for p in prompts])
        )


def test_onnxruntime_rejects_a_bit_width_its_quantizer_lacks():
    with pytest.raises(ConfigError, match="cannot quantize to 3 bits.*supports: 2, 4, 8, 32"):
        SchemeConfig("onnxruntime", "int3", 3, {"format": "BLOCK_INT3"})
    with pytest.raises(ConfigError, match="unknown onnxruntime format 'KQUANT_INT4'; known: .*BLOCK_INT4"):
        SchemeConfig("onnxruntime", "kq", 4, {"format": "KQUANT_INT4"})


def test_olive_workflow_really_runs_and_is_scored_by_our_runner(tiny_onnx, tmp_path):
    artifact = quantize("olive", tiny_onnx, tmp_path, "rtn_int4_g32", 4, format="RTN_INT4", block_size=32)
    applied = artifact.meta["applied"]
    assert applied["olive_passes"] == ["OnnxPeepholeOptimizer", "OnnxBlockWiseRtnQuantization"]
    assert applied["quant_ops"]["MatMulNBits"] == 15
    assert applied["renamed_outputs"] == {"logits_Q4": "logits"}  # Olive renames the head's output
    assert (artifact.path / "olive" / "workflow.json").is_file()
    assert not (artifact.path / "olive" / "cache").exists()
    assert "olive-ai" in artifact.meta["versions"]
    assert 0 < kld_vs(tiny_onnx, artifact) < 0.05


def test_qnn_qdq_models_use_16_bit_activations_and_keep_the_mask_float(tiny_onnx, tmp_path, calib_text):
    w8a16 = quantize("qnn", tiny_onnx, tmp_path, "w8a16", 8, calib_text, format="W8A16", dataset=True)
    w4a16 = quantize("qnn", tiny_onnx, tmp_path, "w4a16", 4, calib_text, format="W4A16", dataset=True)
    model = onnx.load(str(w8a16.model_file), load_external_data=False)
    assert w8a16.meta["applied"]["opset"] == 21
    zero_points = {t.name: t.data_type for t in model.graph.initializer}
    act_types = {zero_points[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert onnx.TensorProto.UINT16 in act_types
    # The mask's cone (up to the Softmax, whose [0, 1] output is quantized again for the next MatMul) stays float.
    mask = set(w8a16.meta["applied"]["float_nodes"])
    assert any(name.endswith("Softmax") for name in mask)
    mask_tensors = {
        out for n in model.graph.node if n.name in mask and n.op_type != "Softmax" for out in n.output
    }
    assert mask_tensors and not any(n.op_type == "QuantizeLinear" and n.input[0] in mask_tensors
                                    for n in model.graph.node)  # fmt: skip
    assert "int4" in w4a16.meta["applied"]["weight_types"]
    assert kld_vs(tiny_onnx, w8a16) < 0.05
    # One calibration per graph: W4A16 read the tensor ranges W8A16 calibrated, and made the model a calibration
    # of its own makes.
    assert w8a16.meta["applied"]["tensor_ranges_from"] == "calibrated here"
    assert w4a16.meta["applied"]["tensor_ranges_from"] == "an earlier variant's calibration"
    assert w4a16.meta["applied"]["tensor_ranges"] == w8a16.meta["applied"]["tensor_ranges"]
    alone = quantize(
        "qnn", tiny_onnx, tmp_path / "alone", "w4a16", 4, calib_text, format="W4A16", dataset=True
    )
    assert alone.meta["applied"]["tensor_ranges_from"] == "calibrated here"
    assert alone.model_file.read_bytes() == w4a16.model_file.read_bytes()
    # 16-bit QDQ activations decoded other tokens in a batch than alone (SmolLM2): one prompt at a time
    assert not OnnxRunner(w8a16.path, 2).batch_greedy and not OnnxRunner(w4a16.path, 2).batch_greedy


# ---------------------------------------------------------------------------------------------------------
# Qualcomm AI Hub: everything up to the network call


@pytest.fixture
def no_aihub_token(monkeypatch, tmp_path):
    monkeypatch.delenv("QAIHUB_API_TOKEN", raising=False)
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(tmp_path / "missing.ini"))


def test_aihub_without_a_token_fails_in_one_line_before_any_job(no_aihub_token, tmp_path):
    from bitsweep.backends import backend_info
    from bitsweep.backends.qnn.aihub import AiHubError, check_aihub, profile_on_aihub

    settings = backend_info("qnn").parse_settings({"aihub": {"enabled": True}})
    with pytest.raises(ConfigError, match="no API token is configured: set \\$QAIHUB_API_TOKEN"):
        backend_info("qnn").preflight(settings)
    with pytest.raises(AiHubError, match="no API token"):
        profile_on_aihub(tmp_path, settings)
    skipped = profile_on_aihub(
        tmp_path, backend_info("qnn").parse_settings({"aihub": {"enabled": True, "on_missing_token": "skip"}})
    )
    assert skipped["status"] == "skipped" and "QAIHUB_API_TOKEN" in skipped["reason"]
    assert check_aihub(QnnSettings().aihub).enabled is False


def test_aihub_token_is_found_but_never_returned(monkeypatch, tmp_path):
    from bitsweep.backends.qnn.aihub import aihub_credentials, check_aihub

    ini = tmp_path / "client.ini"
    ini.write_text("[api]\napi_token = SECRET-TOKEN-123\napi_url = https://workbench.aihub.qualcomm.com\n")
    monkeypatch.delenv("QAIHUB_API_TOKEN", raising=False)
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(ini))
    assert aihub_credentials() == str(ini)
    monkeypatch.setenv("QAIHUB_API_TOKEN", "SECRET-TOKEN-456")
    assert aihub_credentials() == "env"
    assert check_aihub(QnnSettings().aihub.__class__(enabled=True)).enabled


def test_aihub_job_construction(tiny_onnx, tmp_path, calib_text, monkeypatch):
    import qai_hub

    from bitsweep.backends.qnn.aihub import _client, compile_options, input_specs
    from bitsweep.backends.qnn.settings import AiHubConfig

    artifact = quantize("qnn", tiny_onnx, tmp_path, "w8a8", 8, calib_text, format="W8A8", dataset=True)
    cfg = AiHubConfig(enabled=True, seq_len=16, past_len=48)
    specs = input_specs(artifact.model_file, cfg)
    assert specs["input_ids"] == ((1, 16), "int64")
    assert specs["attention_mask"] == ((1, 64), "int64")
    assert specs["past_key_values.0.key"] == ((1, 2, 48, 16), "float32")
    assert compile_options(cfg) == "--target_runtime qnn_context_binary"
    assert qai_hub.Device(cfg.device).name == "Samsung Galaxy S24 (Family)"
    monkeypatch.setenv("QAIHUB_API_TOKEN", "SECRET-TOKEN-789")
    assert _client().config.api_token == "SECRET-TOKEN-789"  # built from the env token, no network yet
    with pytest.raises(ConfigError, match="unknown AI Hub target runtime 'qnn'"):
        AiHubConfig(target_runtime="qnn")


def test_linear_quantization_makes_onnxruntimes_own_models(tiny_onnx, tmp_path, calib_text, monkeypatch):
    """bitsweep.backends.ort_linear's one-pass versions of onnxruntime's quadratic loops: the calibration graph
    has onnxruntime's nodes in onnxruntime's order, and the QNN (8- and 4-bit weights) and static QDQ models are
    byte-identical."""
    import contextlib
    import re

    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    from bitsweep.backends import ort_linear
    from bitsweep.backends.onnxruntime import quantize as ort_quantize
    from bitsweep.backends.qnn import quantize as qnn_quantize

    def calibration_graph(name: str) -> list[tuple]:
        calibrater = MinMaxCalibrater(tiny_onnx / "model.onnx", augmented_model_path=tmp_path / f"{name}.onnx",
                                      per_channel=True)  # fmt: skip
        calibrater.augment_graph()
        uuid = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-")  # onnxruntime's random initializer names
        return [(n.op_type, n.name, [i for i in n.input if not uuid.match(i)], list(n.output))
                for n in calibrater.model.graph.node]  # fmt: skip

    def models() -> dict[str, bytes]:
        made = {
            "qnn": quantize("qnn", tiny_onnx, tmp_path / str(len(runs)), "w8a16", 8, calib_text,
                            format="W8A16", dataset=True),
            "qnn_int4": quantize("qnn", tiny_onnx, tmp_path / str(len(runs)), "w4a16", 4, calib_text,
                                 format="W4A16", dataset=True),  # int4 weights: pack_bytes_to_4bit
            "qdq": quantize("onnxruntime", tiny_onnx, tmp_path / str(len(runs)), "int8_qdq", 8, calib_text,
                            format="QDQ_INT8"),
        }  # fmt: skip
        return {k: a.model_file.read_bytes() for k, a in made.items()}

    runs = []
    with ort_linear.linear_quantization() as active:
        assert active
        ours = calibration_graph("ours")
    runs.append(models())
    theirs = calibration_graph("theirs")
    assert ours == theirs
    for module in (qnn_quantize, ort_quantize):
        monkeypatch.setattr(module, "linear_quantization", contextlib.nullcontext)
    runs.append(models())
    assert runs[0] == runs[1]


def test_linear_rewriter_makes_olives_own_models(tiny_onnx, tmp_path, monkeypatch):
    """bitsweep.backends.ort_linear.linear_rewriter (onnxscript's multi-output pattern matching without its walk
    over the whole graph per node): Olive's peephole + RTN output is byte-identical to onnxscript's own."""
    import contextlib

    from bitsweep.backends import ort_linear
    from bitsweep.backends.olive import quantize as olive_quantize

    with ort_linear.linear_rewriter() as active:
        assert active
    made = [quantize("olive", tiny_onnx, tmp_path, "ours", 4, format="RTN_INT4", block_size=32)]
    monkeypatch.setattr(olive_quantize, "linear_rewriter", contextlib.nullcontext)
    made.append(quantize("olive", tiny_onnx, tmp_path, "theirs", 4, format="RTN_INT4", block_size=32))
    assert made[0].model_file.read_bytes() == made[1].model_file.read_bytes()

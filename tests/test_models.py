"""The model as a sweep axis: model configs, per-model cells, what is refused before any job (context length,
gated models without a token, memory), and the memory plan. No framework runs here."""

from __future__ import annotations

import json
import re
import struct

import pytest

from bitsweep.config import load_experiment
from bitsweep.errors import ConfigError, SourceError
from bitsweep.modelinfo import check_declared, read_folder_facts
from bitsweep.planning import memory_plan, over_limit, stage_mb
from bitsweep.preflight import check_before_run

from .conftest import CONFIGS

HUB_MODELS = [
    "qwen3-0.6b",
    "qwen3-1.7b",
    "qwen3-4b",
    "gemma-3-270m",
    "gemma-3-1b",
    "phi-4-mini",
    "bitnet-b1.58-2b-4t",
]


@pytest.fixture
def no_hub_token(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored `hf auth login` token either


@pytest.mark.parametrize("name", HUB_MODELS)
def test_every_family_config_declares_what_planning_needs(name):
    exp = load_experiment(CONFIGS, "bitnet-native", [f"model={name}"])  # bitsweep's kernels run every family
    (model,) = exp.models
    assert model.source.kind == "hf" and model.license
    assert model.n_params > 1e8 and model.max_context >= 4096 and model.vocab_size > 30000
    assert model.architecture in {"qwen3", "gemma3_text", "phi3", "bitnet"}
    assert model.gated == name.startswith("gemma")


def test_models_list_gives_each_model_its_cells_and_exclude_leaves_cells_out():
    exp = load_experiment(CONFIGS, "smoke", ["models=[smollm2-135m,qwen3-0.6b]", "exclude=[qwen3-0.6b/mlx]"])
    assert [m.name for m in exp.models] == ["smollm2-135m", "qwen3-0.6b"]
    assert "mlx" in exp.backends_for("smollm2-135m") and "mlx" not in exp.backends_for("qwen3-0.6b")
    assert len(exp.variants_of("smollm2-135m")) == len(exp.variants_of("qwen3-0.6b")) + 1
    assert "mlx" in exp.formats_of("smollm2-135m") and "mlx" not in exp.formats_of("qwen3-0.6b")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval.n_ctx=100000", "eval.n_windows=1"], "eval.n_ctx=100000 is longer than model smollm2-135m's context \\(8192 tokens\\)"),
        (["models=[smollm2-135m,smollm2-135m]"], "models must name at least one model, each once"),
        (["models=[qwen9]"], "unknown model config 'qwen9'; known: bitnet-b1.58-2b-4t"),
        (["exclude=[smollm2-135m/tensorrt]"], "unknown exclude cell \\(model/backend\\) 'smollm2-135m/tensorrt'"),
    ],
)  # fmt: skip
def test_bad_model_axis_input_is_one_line_before_any_job(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_experiment(CONFIGS, "smoke", overrides)
    assert "\n" not in str(err.value) and re.search(message, str(err.value)), str(err.value)


def test_a_gated_model_without_a_token_stops_a_run_and_is_reported_by_a_dry_run(tmp_path, no_hub_token):
    exp = load_experiment(
        CONFIGS, "smoke", ["model=gemma-3-270m", "sweep={llamacpp: [q8_0]}", "eval.tasks=[]"]
    )
    with pytest.raises(ConfigError, match="model gemma-3-270m \\(google/gemma-3-270m\\) is gated: accept its "
                                          "license on the hub page, then set HF_TOKEN"):  # fmt: skip
        check_before_run(exp, tmp_path / "results", models_dir=tmp_path / "models")
    notes = check_before_run(exp, tmp_path / "results", dry_run=True, models_dir=tmp_path / "models")
    assert any(n.startswith("a real run would stop: model gemma-3-270m") for n in notes)
    # once downloaded, the token is not needed any more
    (tmp_path / "models" / "gemma-3-270m").mkdir(parents=True)
    (tmp_path / "models" / "gemma-3-270m" / "manifest.sha256").write_text("")
    assert not any(
        "gated" in n for n in check_before_run(exp, tmp_path / "results", models_dir=tmp_path / "models")
    )


def test_an_architecture_a_backend_cannot_run_is_refused_with_the_frameworks_reason():
    with pytest.raises(ConfigError, match="backend llamacpp cannot run model bitnet-b1.58-2b-4t \\(bitnet\\): .*"
                                          "Leave it out: exclude: \\[bitnet-b1.58-2b-4t/llamacpp\\]"):  # fmt: skip
        load_experiment(CONFIGS, "smoke", ["model=bitnet-b1.58-2b-4t", "sweep={llamacpp: [q8_0]}"])


def test_memory_plan_scales_with_parameters_and_refuses_what_cannot_fit(tmp_path):
    exp = load_experiment(CONFIGS, "edge-formats", ["tracking=off"])
    by_model = memory_plan(exp)
    plan = {(model, stage): mb for model, stages in by_model.items() for stage, mb in stages.items()}
    for stage in ("reference", "convert:gguf", "quantize:openvino", "evaluate:llamacpp"):
        assert plan[("qwen3-0.6b", stage)] < plan[("qwen3-1.7b", stage)] < plan[("qwen3-4b", stage)]
    # the reference holds fp32 weights: at least 4 bytes per parameter
    assert plan[("phi-4-mini", "reference")] > 4 * 3.8e9 / 2**20
    assert stage_mb(by_model, "qwen3-4b", "reference") == plan[("qwen3-4b", "reference")]
    lines = over_limit(by_model, 8000)
    assert any(line.startswith("model phi-4-mini: stage quantize:olive needs ~") for line in lines)
    assert not any(line.startswith("model gemma-3-270m") for line in lines)  # ~6.7 GB at its peak
    with pytest.raises(ConfigError, match="model phi-4-mini: stage .* needs ~.* GB \\(and \\d+ more of its stages\\), "
                                          "more than the 7.8 GB"):  # fmt: skip
        check_before_run(exp, tmp_path / "results", max_mem_mb=8000)


def test_edge_formats_dry_run_reports_its_needs_without_refusing(tmp_path, no_hub_token):
    exp = load_experiment(CONFIGS, "edge-formats")
    notes = check_before_run(exp, tmp_path / "results", max_mem_mb=8000, dry_run=True, models_dir=tmp_path)
    text = "\n".join(notes)
    for name in HUB_MODELS:
        assert f"{name}: " in text
    assert "is not a commit hash" in text and "a real run would stop: model phi-4-mini: stage" in text


def _write_folder(folder, model_type, n_weights, **config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, **config}))
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [n_weights], "data_offsets": [0, 4 * n_weights]}}
    ).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4 * n_weights))


def test_a_local_folder_says_its_own_architecture_context_and_size(tmp_path):
    _write_folder(tmp_path / "m", "qwen3", 1000, max_position_embeddings=2048, vocab_size=500)
    assert read_folder_facts(tmp_path / "m") == {"architecture": "qwen3", "max_context": 2048, "vocab_size": 500,
                                                 "n_params": 1000}  # fmt: skip
    exp = load_experiment(CONFIGS, "smoke", ["model.source.kind=local", f"+model.source.path={tmp_path / 'm'}",
                                             "eval.n_ctx=256", "eval.speed.prompt_tokens=64", "eval.agreement.prompt_tokens=64"])  # fmt: skip
    assert (exp.models[0].architecture, exp.models[0].max_context, exp.models[0].n_params) == (
        "qwen3",
        2048,
        1000,
    )
    with pytest.raises(ConfigError, match="longer than model smollm2-135m's context \\(2048 tokens\\)"):
        load_experiment(CONFIGS, "smoke", ["model.source.kind=local", f"+model.source.path={tmp_path / 'm'}",
                                           "eval.n_ctx=4096"])  # fmt: skip


def test_a_download_that_contradicts_its_config_is_an_error(tmp_path):
    exp = load_experiment(CONFIGS, "smoke", ["model=qwen3-0.6b", "sweep={llamacpp: [q8_0]}", "eval.tasks=[]"])
    _write_folder(tmp_path / "m", "llama", 10, max_position_embeddings=40960)
    with pytest.raises(
        SourceError, match="declares architecture='qwen3' but the downloaded config.json says 'llama'"
    ):
        check_declared(exp.models[0], tmp_path / "m")

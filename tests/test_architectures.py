"""Architecture coverage, measured: every (architecture, backend) cell on bitsweep.archs' tiny models of Llama,
Qwen3, Gemma 3, Phi-4-mini (phi3) and BitNet b1.58, through the real frameworks (bench/architectures.py prints
the same cells as JSON).

A cell the backend's INFO does not declare unsupported must convert the workflow's way, compute what torch
computes (max |logit diff| of its fp path within the path's bound on a 512-token window and decoding through its
KV cache at positions 99-107: past Gemma's 32-token sliding window) and score its representative quantized scheme with a finite, small KLD. A cell
declared unsupported must still fail, with the framework message its declaration quotes: when a framework
learns the architecture, this test says the declaration is stale.
"""

from __future__ import annotations

import numpy as np
import pytest

from bitsweep.archs import (
    ARCHS,
    CHECK_SCHEMES,
    ArchModel,
    fp_bound,
    make_tiny_model,
    measure_cell,
    run_order,
    step_bound,
)
from bitsweep.backends import REGISTRY, backend_info
from bitsweep.errors import ConfigError

from .conftest import CONFIGS

BACKEND_MARKS = {
    "llamacpp": [pytest.mark.llamacpp],
    "openvino": [pytest.mark.openvino],
    "onnxruntime": [pytest.mark.onnx],
    "olive": [pytest.mark.onnx],
    "qnn": [pytest.mark.onnx],
    "mlx": [pytest.mark.mlx],
    "bitnet": [],
}


def cells(supported: bool) -> list:
    """(arch, backend) params, architecture by architecture (each tiny model and its conversions are made once)."""
    return [
        pytest.param(arch, backend, marks=[pytest.mark.slow, *BACKEND_MARKS[backend]], id=f"{arch}-{backend}")
        for arch in ARCHS
        for backend in run_order(list(CHECK_SCHEMES))
        if (arch not in backend_info(backend).unsupported_architectures) == supported
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> its ArchModel (tiny model, reference logits, conversions), built on first use."""
    models: dict[str, ArchModel] = {}

    def get(arch: str) -> ArchModel:
        if arch not in models:
            models[arch] = ArchModel(arch, tmp_path_factory.mktemp(arch))
        return models[arch]

    return get


@pytest.mark.parametrize(("arch", "backend"), cells(supported=True))
def test_backend_computes_what_torch_computes(arch, backend, tiny):
    cell = measure_cell(tiny(arch), backend)
    assert cell.status == "works", f"{cell.stage}: {cell.error}"
    assert cell.max_abs_logit_diff <= fp_bound(backend) and cell.max_abs_step_diff <= step_bound(backend)
    # really quantized (not the fp model), and not destroyed (W8A8's static activations are the worst: ~0.15)
    assert 0 < cell.kld < 0.5


@pytest.mark.parametrize(("arch", "backend"), cells(supported=False))
def test_declared_unsupported_architecture_fails_as_declared(arch, backend, tiny):
    cell = measure_cell(tiny(arch), backend)
    assert (cell.status, cell.stage) == ("fails", "convert")
    assert cell.error in backend_info(backend).unsupported_architectures[arch]


def test_every_backend_and_configured_architecture_is_measured():
    from omegaconf import OmegaConf

    assert set(CHECK_SCHEMES) == set(REGISTRY)
    configured = {OmegaConf.load(path).get("architecture") for path in (CONFIGS / "model").glob("*.yaml")}
    assert configured and None not in configured and configured <= set(ARCHS)
    for backend in REGISTRY:
        assert set(backend_info(backend).unsupported_architectures) <= set(ARCHS)


# ---------------------------------------------------------------------------------------------------------
# The tiny models


@pytest.mark.slow
def test_tiny_models_are_deterministic_and_have_their_family_features(tmp_path):
    from transformers import AutoConfig

    from bitsweep.manifest import MANIFEST

    first, again = (
        make_tiny_model("gemma3_text", tmp_path / "a"),
        make_tiny_model("gemma3_text", tmp_path / "b"),
    )
    assert (first / MANIFEST).read_text() == (again / MANIFEST).read_text()
    other = make_tiny_model("gemma3_text", tmp_path / "c", seed=1)
    assert (first / MANIFEST).read_text() != (other / MANIFEST).read_text()
    gemma = AutoConfig.from_pretrained(first)
    assert set(gemma.layer_types) == {"sliding_attention", "full_attention"} and gemma.sliding_window == 32
    assert gemma.query_pre_attn_scalar != gemma.head_dim
    phi = AutoConfig.from_pretrained(make_tiny_model("phi3", tmp_path / "phi3"))
    assert (
        phi.partial_rotary_factor == 0.75
        and phi.tie_word_embeddings
        and phi.rope_scaling["type"] == "longrope"
    )
    qwen = AutoConfig.from_pretrained(make_tiny_model("qwen3", tmp_path / "qwen3"))
    assert qwen.head_dim * qwen.num_attention_heads != qwen.hidden_size


@pytest.mark.slow
def test_gemma_tokenizer_is_its_sentencepiece_model(tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from bitsweep.text import pydoc_texts

    folder = make_tiny_model("gemma3_text", tmp_path / "gemma")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    text = pydoc_texts(0.25)[0][:20_000]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id == 2
    assert tokenizer.decode(sp.encode(text)) == text


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizers_library_reads_and_writes_text_as_transformers_does(arch, tmp_path):
    """Runners decode and calibration encodes with the ``tokenizers`` library from tokenizer.json (no
    transformers import); the windows come from transformers' tokenizer: both must give the same ids and text."""
    from transformers import AutoTokenizer

    from bitsweep.text import fast_tokenizer, pydoc_texts, text_ids

    folder = make_tiny_model(arch, tmp_path / arch)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = pydoc_texts(0.25)[1][:20_000] + " ".join(tokenizer.all_special_tokens)  # control tokens as text
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert text_ids(folder, text) == ids
    ids += list(tokenizer.all_special_ids)  # control tokens are kept when decoding, as in the windows (BOS)
    decoded = fast_tokenizer(folder).decode(ids, skip_special_tokens=False)
    assert decoded == tokenizer.decode(ids, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_torch_decodes_a_batch_of_prompts_as_one_at_a_time(arch, tmp_path):
    """The greedy continuations (a quality column) of the reference, the bitnet and the MLX-dequantized models are
    decoded as one batch through transformers' forward: the same tokens as one prompt at a time (Gemma's
    sliding window of 32 passed on the way)."""
    from bitsweep.backends.torch_ref import TorchRunner

    ids = np.random.default_rng(3).integers(3, 250, 160)
    prompts = np.stack([ids[i : i + 30] for i in range(0, 120, 30)])
    with TorchRunner(make_tiny_model(arch, tmp_path / arch), 2) as runner:
        batched = runner.greedy_many(prompts, 12)
        assert batched.shape == (4, 12)
        assert np.array_equal(batched, np.stack([runner.greedy(p, 12) for p in prompts]))


@pytest.mark.slow
def test_bitnet_weights_are_fixed_points_of_absmean_ternarisation(tmp_path):
    from safetensors.numpy import load_file

    weights = load_file(str(make_tiny_model("bitnet", tmp_path / "bitnet") / "model.safetensors"))
    projections = {k: w for k, w in weights.items() if k.endswith("_proj.weight")}
    assert len(projections) == 14
    for (
        w
    ) in projections.values():  # llama.cpp's converter: round(w / mean|w|) clipped to [-1, 1], times mean|w|
        scale = np.abs(w).mean()
        np.testing.assert_allclose(np.clip(np.round(w / scale), -1, 1) * scale, w, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Our corrections to the frameworks' readings of Gemma 3 (pure functions; the cells above check them end to end)


def test_llamacpp_query_scale_is_folded_only_where_llama_cpp_ignores_the_model():
    from bitsweep.backends.llamacpp.convert import query_scale_factor, sliding_layers

    tiny = {"num_attention_heads": 4, "head_dim": 16, "hidden_size": 96, "num_hidden_layers": 2,
            "query_pre_attn_scalar": 24}  # fmt: skip
    assert query_scale_factor("gemma3_text", tiny) == pytest.approx(np.sqrt(16 / 24))
    assert query_scale_factor("llama", tiny) == 1.0
    gemma_1b = {"num_attention_heads": 4, "head_dim": 256, "hidden_size": 1152, "num_hidden_layers": 26,
                "query_pre_attn_scalar": 256}  # fmt: skip
    gemma_27b = {"num_attention_heads": 32, "head_dim": 128, "hidden_size": 5376, "num_hidden_layers": 62,
                 "query_pre_attn_scalar": 168}  # fmt: skip
    assert query_scale_factor("gemma3_text", gemma_1b) == query_scale_factor("gemma3", gemma_27b) == 1.0
    assert sliding_layers({"layer_types": ["sliding_attention", "full_attention"]}) == [True, False]
    assert sliding_layers({"layer_types": ["full_attention"] * 2}) is None
    older = {
        "sliding_window_pattern": 6,
        "sliding_window": 512,
        "num_hidden_layers": 7,
    }  # Gemma 3 1B's hub config
    assert sliding_layers(older) == [True] * 5 + [False, True]


def test_mlx_sliding_window_pattern_is_the_period_of_layer_types():
    from bitsweep.backends.mlx.convert import set_sliding_window_pattern

    def types(n: int, period: int) -> list[str]:
        return ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n)]

    gemma_1b = {"model_type": "gemma3_text", "layer_types": types(26, 6)}
    assert set_sliding_window_pattern(gemma_1b)["sliding_window_pattern"] == 6
    assert set_sliding_window_pattern({"model_type": "gemma3_text", "layer_types": types(2, 2)})[
        "sliding_window_pattern"
    ] == 2  # fmt: skip
    assert "sliding_window_pattern" not in set_sliding_window_pattern(
        {"model_type": "llama", "layer_types": types(4, 2)}
    )
    with pytest.raises(ConfigError, match="has no such period"):
        set_sliding_window_pattern({"model_type": "gemma3_text", "layer_types": types(3, 1) + types(1, 2)})

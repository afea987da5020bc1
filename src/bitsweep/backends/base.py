"""The two small interfaces every framework implements.

A :class:`Backend` turns the converted model into a quantized :class:`Artifact`; a :class:`Runner` loads an
artifact and answers the only questions evaluation asks: logits for a token window, the text its own tokenizer
makes of ids, and how long prompt processing and greedy generation take. Metrics live in bitsweep.evaluate
and never see a framework.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from bitsweep.config import SchemeConfig
from bitsweep.manifest import read_json, write_json

ARTIFACT_JSON = "artifact.json"
# What a quantized folder needs beside its weights so transformers can rebuild its config and tokenizer.
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")  # fmt: skip


def copy_side_files(src: Path, out: Path) -> None:
    """Copy the HF config and tokenizer files ``src`` has into ``out``."""
    import shutil

    for name in HF_SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


@dataclass
class Artifact:
    """A quantized model folder and its sidecar (what produced it, what was actually applied)."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def model_file(self) -> Path:
        return self.path / self.meta["model_file"]

    def save(self) -> Path:
        return write_json(self.path / ARTIFACT_JSON, self.meta)

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        path = Path(path)
        return cls(path, read_json(path / ARTIFACT_JSON))


@dataclass(frozen=True)
class QuantizeRequest:
    """Everything a quantization job gets: the converted source, the scheme, the backend's settings."""

    src: Path
    scheme: SchemeConfig
    settings: dict[str, Any]
    out: Path
    imatrix: Path | None = None
    calib_text: Path | None = None


class Runner(Protocol):
    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits ``(len(ids), n_vocab)`` float32 for one window, evaluated from an empty context."""

    def detokenize(self, ids: np.ndarray) -> bytes:
        """The bytes this runner's own tokenizer makes of ``ids`` (to check the vocabularies agree)."""

    def generate(self, prompt: np.ndarray, n_new: int) -> tuple[float, float]:
        """Greedy-generate ``n_new`` tokens after ``prompt``; return (prompt seconds, generation seconds)."""

    def close(self) -> None: ...


class Backend(Protocol):
    name: ClassVar[str]

    def quantize(self, request: QuantizeRequest) -> Artifact: ...

    def load(self, artifact: Artifact, threads: int, n_ctx: int) -> Runner: ...

    def versions(self) -> dict[str, str]: ...


def base_meta(request: QuantizeRequest, backend: str, versions: dict[str, str]) -> dict[str, Any]:
    """The part of every artifact sidecar that does not depend on the backend."""
    from bitsweep.manifest import sha256_file

    return {
        "backend": backend,
        "scheme": request.scheme.name,
        "bits": request.scheme.bits,
        "options": request.scheme.options,
        "settings": request.settings,
        "source": str(request.src),
        "source_sha256": sha256_file(request.src) if request.src.is_file() else None,
        "imatrix": str(request.imatrix) if request.imatrix else None,
        "imatrix_sha256": sha256_file(request.imatrix) if request.imatrix else None,
        "versions": versions,
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

"""What a Hugging Face model folder says about itself, read without loading it: its architecture, context length
and parameter count (from ``config.json`` and the safetensors headers, a few KB read).

The configuration declares these for hub models (nothing is downloaded before the workflow is planned); after
the download :func:`check_declared` holds the declaration to what arrived.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path
from typing import Any

from bitsweep.errors import SourceError

log = logging.getLogger(__name__)


def safetensors_numel(path: Path) -> int:
    """Number of weights in one ``.safetensors`` file, from its header (8-byte little-endian length + JSON)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")


def read_folder_facts(folder: Path) -> dict[str, Any]:
    """``architecture`` (model_type), ``max_context``, ``vocab_size`` and ``n_params`` of an HF folder; {} when it has no
    config.json (a missing local path is reported by the preflight, not here)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        return {}
    config = json.loads(config_path.read_text())
    facts: dict[str, Any] = {"architecture": config.get("model_type", "llama")}
    for key, fact in (("max_position_embeddings", "max_context"), ("vocab_size", "vocab_size")):
        if config.get(key):
            facts[fact] = int(config[key])
    weights = sorted(folder.glob("*.safetensors"))
    if weights:
        facts["n_params"] = sum(safetensors_numel(path) for path in weights)
    return facts


def check_declared(model: Any, folder: Path) -> dict[str, Any]:
    """Compare what ``model`` (a ModelConfig) declares with the downloaded ``folder``: a different architecture
    or context length is an error (the plan was made with them); a parameter count off by more than 5% is a
    warning (it only sized the memory estimates). Returns the folder's facts."""
    facts = read_folder_facts(folder)
    for key in ("architecture", "max_context", "vocab_size"):
        declared, found = getattr(model, key), facts.get(key)
        if declared is not None and found is not None and declared != found:
            raise SourceError(f"model {model.name}: configs/model/{model.name}.yaml declares {key}={declared!r} "
                              f"but the downloaded config.json says {found!r}; fix the YAML")  # fmt: skip
    declared_params, found_params = model.n_params, facts.get("n_params")
    if declared_params and found_params and abs(found_params / declared_params - 1) > 0.05:
        log.warning("model %s: n_params declared %.3g, the weights hold %.3g: memory estimates were off",
                    model.name, declared_params, found_params)  # fmt: skip
    return facts

"""The backend registry: name -> package, imported lazily (``import bitsweep`` imports no framework).

Each package's ``__init__`` holds only its ``INFO`` (capability data, settings class, source format); its
quantizer and runner modules, which import the framework, load when a job uses them.

>>> backend_info("llamacpp").source_format.name
'gguf'
>>> quantizer = get_quantizer("llamacpp")  # doctest: +SKIP  (imports llama_cpp only now)
"""

from __future__ import annotations

import importlib
import os

from bitsweep.backends.base import (
    Artifact,
    BackendInfo,
    BackendSettings,
    BaseQuantizer,
    BaseRunner,
    FormatInfo,
    QuantizeRequest,
)
from bitsweep.errors import ConfigError, unknown

# One line per backend. A package outside bitsweep can register more through $BITSWEEP_BACKENDS
# ("name=package,name2=package2"), e.g. a contributor's backend under development.
REGISTRY: dict[str, str] = {
    "llamacpp": "bitsweep.backends.llamacpp",
    "openvino": "bitsweep.backends.openvino",
    "onnxruntime": "bitsweep.backends.onnxruntime",
    "olive": "bitsweep.backends.olive",
    "qnn": "bitsweep.backends.qnn",
    "mlx": "bitsweep.backends.mlx",
    "bitnet": "bitsweep.backends.bitnet",
}


def registry() -> dict[str, str]:
    extra = os.environ.get("BITSWEEP_BACKENDS", "")
    entries = dict(REGISTRY)
    for item in filter(None, (part.strip() for part in extra.split(","))):
        name, sep, package = item.partition("=")
        if not sep or not name or not package:
            raise ConfigError(f"$BITSWEEP_BACKENDS: expected name=package, got {item!r}")
        entries[name] = package
    return entries


def backend_info(name: str) -> BackendInfo:
    entries = registry()
    if name not in entries:
        raise unknown("backend", name, entries)
    info = importlib.import_module(entries[name]).INFO
    if info.name != name:
        raise ConfigError(f"{entries[name]}.INFO names backend {info.name!r}, registered as {name!r}")
    return info


def format_info(name: str) -> FormatInfo:
    """A converted format by name (``gguf``, ``onnx``...): the one some registered backend reads."""
    formats = {info.source_format.name: info.source_format for info in map(backend_info, registry())}
    if name not in formats:
        raise unknown("model format", name, formats)
    return formats[name]


def get_quantizer(name: str) -> BaseQuantizer:
    return backend_info(name).load("quantize:Quantizer")()


def runner_class(name: str) -> type[BaseRunner]:
    info = backend_info(name)
    return info.load(info.runner)


__all__ = ["REGISTRY", "Artifact", "BackendInfo", "BackendSettings", "BaseQuantizer", "BaseRunner", "FormatInfo",
           "QuantizeRequest", "backend_info", "format_info", "get_quantizer", "registry", "runner_class"]  # fmt: skip

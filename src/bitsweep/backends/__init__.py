"""Backends, imported lazily: ``import bitsweep`` never imports a framework.

>>> backend = get_backend("llamacpp")  # doctest: +SKIP  (imports llama_cpp only now)
"""

from __future__ import annotations

import importlib

from bitsweep.backends.base import Artifact, Backend, QuantizeRequest, Runner
from bitsweep.capabilities import backend_info


def get_backend(name: str) -> Backend:
    module_name, _, class_name = backend_info(name).module.partition(":")
    return getattr(importlib.import_module(module_name), class_name)()


__all__ = ["Artifact", "Backend", "QuantizeRequest", "Runner", "get_backend"]

"""What many backend tests do: quantize with a backend's real quantizer, open its real runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bitsweep.backends import Artifact, QuantizeRequest, backend_info, get_quantizer, runner_class
from bitsweep.backends.base import BaseRunner
from bitsweep.config import SchemeConfig


def quantize(backend: str, src: Path, name: str, bits: int, out: Path, *, calibration: Path | None = None,
             settings: dict[str, Any] | None = None, threads: int = 2, **options: Any) -> Artifact:  # fmt: skip
    """``backend``'s Quantizer on ``src`` with a scheme made of ``options`` (checked like a config's)."""
    scheme = SchemeConfig(backend, name, bits, options)
    typed = backend_info(backend).parse_settings(settings or {})
    return get_quantizer(backend).quantize(QuantizeRequest(src, scheme, typed, out, calibration, threads))


def open_runner(artifact: Artifact, threads: int = 2, n_ctx: int = 512) -> BaseRunner:
    return runner_class(artifact.meta["backend"])(artifact.path, threads, n_ctx)

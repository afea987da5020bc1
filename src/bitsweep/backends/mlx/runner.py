"""mlx-lm's model code on MLX's CPU backend (Linux: no Metal)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from bitsweep.backends.base import BaseRunner

log = logging.getLogger(__name__)


class Runner(BaseRunner):
    """mlx-lm's model on MLX's CPU device; logits and generation synchronised with ``mx.eval``.

    ``threads`` is not applied: MLX 0.32's CPU backend ran on one core in every layout we tried (two CPU
    streams, thread-local streams in two Python threads: cpu/wall 1.0), its bundled reference BLAS included.
    Neither ``mx.compile`` nor scoring a window in KV-cached chunks made a window faster: logits are one call.
    """

    def __init__(self, model_dir: str | Path, threads: int, n_ctx: int = 512) -> None:
        import mlx.core as mx
        from mlx_lm.utils import load_model

        super().__init__(model_dir, threads, n_ctx)
        mx.set_default_device(mx.cpu)
        self.mx = mx
        self.model, _ = load_model(Path(model_dir))
        self.cache = None

    def _forward(self, ids: np.ndarray, cache=None):
        return self.model(self.mx.array(np.asarray(ids, dtype=np.int32)[None]), cache=cache)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        self.check_length(ids)
        out = self._forward(ids)[0]
        self.mx.eval(out)
        return np.array(out.astype(self.mx.float32))

    def _last(self, logits) -> np.ndarray:
        out = logits[0, -1]
        self.mx.eval(out)
        return np.array(out.astype(self.mx.float32))

    def _prefill(self, prompt: np.ndarray) -> np.ndarray:
        from mlx_lm.models.cache import make_prompt_cache

        self.cache = make_prompt_cache(self.model)
        return self._last(self._forward(prompt, self.cache))

    def _step(self, token: int) -> np.ndarray:
        return self._last(self._forward(np.array([token]), self.cache))

    def close(self) -> None:
        log.info("MLX peak memory %.0f MiB", self.mx.get_peak_memory() / 2**20)
        del self.model


MLXRunner = Runner

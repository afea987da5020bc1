"""mlx-lm's model code on MLX's CPU backend (Linux: no Metal).

One correction to mlx-lm's arithmetic, so that MLX's float32 model is transformers' float32 model: mlx-lm's Gemma 3
scales the embeddings by sqrt(hidden) rounded to bfloat16 in every dtype (Gemma's bf16 reference does so), where
transformers uses the float32 value; for a hidden size whose root bfloat16 does not hold exactly (96: 9.798 ->
9.8125; Gemma 3 1B's 1152: 33.94 -> 33.75, -0.6%) every MLX logit of Gemma moved by up to 0.01 on a 2-layer tiny
model, quantized or not. :func:`exact_embedding_scale` makes up the difference (and is a no-op otherwise).
"""

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
        exact_embedding_scale(self.model)
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


def exact_embedding_scale(model) -> None:
    """Make mlx-lm's Gemma 3 scale its embeddings by sqrt(hidden) in float32, as transformers does."""
    import mlx.core as mx
    import mlx.nn as nn

    if getattr(model, "model_type", None) != "gemma3_text":
        return
    exact = model.args.hidden_size**0.5
    rounded = mx.array(exact, mx.bfloat16).astype(mx.float32).item()  # what mlx-lm multiplies by
    if exact == rounded:
        return

    class Rescaled(nn.Module):
        """The embedding's lookups times ``factor``; its use as the tied LM head unchanged."""

        def __init__(self, inner, factor: float) -> None:
            super().__init__()
            self.inner, self.factor = inner, factor

        def __call__(self, x):
            return self.inner(x) * self.factor

        def as_linear(self, x):
            return self.inner.as_linear(x)

    model.model.embed_tokens = Rescaled(model.model.embed_tokens, exact / rounded)

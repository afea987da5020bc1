"""mlx-lm's model code on MLX's CPU backend (Linux: no Metal).

Scoring a quantized model (the windows' logits, greedy continuations, task log-likelihoods) goes through torch
with MLX's own dequantized weights (``mx.dequantize`` of every quantized layer) on a CPU without Metal: MLX 0.32's
CPU ``quantized_matmul`` runs one core at ~3 GFLOP/s, 47.8 s per 512-token window of SmolLM2-135M MXFP4 where
torch takes 1.3 s, for logits that differ by at most 1.6e-4 (of logits up to 35; KL 3e-11, same top-1 at every
position). Speed and memory are still MLX's own: generation is timed on MLX's quantized kernels, before the
torch copy exists. Every run checks the two paths against each other on its first window's first
``CHECK_TOKENS`` tokens and refuses to score when they disagree (:meth:`Runner.check_scoring`).

One correction to mlx-lm's arithmetic, so that MLX's float32 model is transformers' float32 model: mlx-lm's Gemma 3
scales the embeddings by sqrt(hidden) rounded to bfloat16 in every dtype (Gemma's bf16 reference does so), where
transformers uses the float32 value; for a hidden size whose root bfloat16 does not hold exactly (96: 9.798 ->
9.8125; Gemma 3 1B's 1152: 33.94 -> 33.75, -0.6%) every MLX logit of Gemma moved by up to 0.01 on a 2-layer tiny
model, quantized or not. :func:`exact_embedding_scale` makes up the difference (and is a no-op otherwise).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from bitsweep.backends.base import BaseRunner
from bitsweep.errors import ComparabilityError, unknown

log = logging.getLogger(__name__)

SCORINGS = ("auto", "native", "dequantized")
CHECK_TOKENS = 32
# Largest max |native - dequantized| / max |native logit| on the checked tokens that is still the same model.
# Measured on SmolLM2's first 32 tokens: float32 summation order alone 1.8e-6 (MXFP4), 3e-6 (AFFINE3/8), 1.0e-4
# (AFFINE2, KL 3e-8); one layer's down_proj 1% off: 4.4e-3 to 6.4e-2 (KL 1.4e-5 to 2.5e-2).
CHECK_TOLERANCE = 1e-3
PREFILL_STEP = 2048  # mlx-lm's generate_step default prefill_step_size


class Runner(BaseRunner):
    """mlx-lm's model on MLX's CPU device; logits and generation synchronised with ``mx.eval``.

    ``threads`` is not applied: MLX 0.32's CPU backend ran on one core in every layout we tried (two CPU
    streams, thread-local streams in two Python threads: cpu/wall 1.0), its bundled reference BLAS included.
    Neither ``mx.compile`` nor scoring a window in KV-cached chunks made a window faster: logits are one call.

    ``scoring``: ``native`` scores with MLX itself; ``dequantized`` with torch on MLX's dequantized weights
    (module docstring); ``auto``: dequantized for a quantized model without Metal, native otherwise (an fp
    model has nothing to dequantize: its logits are MLX's own, which the conversion check compares with torch).
    """

    def __init__(self, model_dir: str | Path, threads: int, n_ctx: int = 512, scoring: str = "auto") -> None:
        import mlx.core as mx
        from mlx_lm.utils import load_model

        super().__init__(model_dir, threads, n_ctx)
        mx.set_default_device(mx.cpu)
        self.mx = mx
        self.model, _ = load_model(Path(model_dir))
        exact_embedding_scale(self.model)
        self.cache = None
        self.scoring = resolve_scoring(scoring, self.model)
        self._scorer = None  # the torch runner, made on first use: after speed and memory are measured
        self.check_rel_diff: float | None = None

    def _forward(self, ids: np.ndarray, cache=None):
        return self.model(self.mx.array(np.asarray(ids, dtype=np.int32)[None]), cache=cache)

    def native_logits(self, ids: np.ndarray) -> np.ndarray:
        """MLX's own logits for a window (its quantized kernels)."""
        self.check_length(ids)
        out = self._forward(ids)[0]
        self.mx.eval(out)
        return np.array(out.astype(self.mx.float32))

    @property
    def scorer(self):
        if self._scorer is None:
            from bitsweep.backends.torch_ref import TorchRunner

            model = dequantized_torch_model(self.model, self.path)
            self._scorer = TorchRunner.around(model, self.path, self.threads, self.n_ctx)
        return self._scorer

    def logits(self, ids: np.ndarray) -> np.ndarray:
        if self.scoring == "native":
            return self.native_logits(ids)
        self.check_length(ids)
        logits = self.scorer.logits(ids)
        if self.check_rel_diff is None:
            self.check_scoring(ids, logits)
        return logits

    def check_scoring(self, ids: np.ndarray, logits: np.ndarray) -> None:
        """Refuse torch's scoring unless it gives MLX's logits on the first ``CHECK_TOKENS`` tokens."""
        native = self.native_logits(ids[:CHECK_TOKENS])
        self.check_rel_diff = float(np.abs(logits[:CHECK_TOKENS] - native).max() / np.abs(native).max())
        if not self.check_rel_diff <= CHECK_TOLERANCE:
            raise ComparabilityError(
                f"torch on MLX's dequantized weights gives other logits than MLX (max diff {self.check_rel_diff:.2g}"
                f" of the largest logit, tolerance {CHECK_TOLERANCE:g}): score natively (Runner(scoring='native'))"
            )

    def greedy(self, prompt: np.ndarray, n_new: int) -> np.ndarray:
        if self.scoring == "native":
            return super().greedy(prompt, n_new)
        return self.scorer.greedy(prompt, n_new)

    def greedy_many(self, prompts: np.ndarray, n_new: int) -> np.ndarray:
        if self.scoring == "native":
            return super().greedy_many(prompts, n_new)
        return self.scorer.greedy_many(prompts, n_new)

    def scoring_info(self) -> dict[str, str | float]:
        if self.scoring == "native":
            return {"scoring": "mlx"}
        return {"scoring": "torch on mlx-dequantized weights", "scoring_check_rel_diff": self.check_rel_diff}

    def _last(self, logits) -> np.ndarray:
        out = logits[0, -1]
        self.mx.eval(out)
        return np.array(out.astype(self.mx.float32))

    def _prefill(self, prompt: np.ndarray) -> np.ndarray:
        """As mlx-lm's ``generate_step``: every prompt token but the last fills the cache in chunks whose logits
        are never evaluated (so MLX never computes the head for them), then the last token gives the logits."""
        from mlx_lm.models.cache import make_prompt_cache

        self.cache = make_prompt_cache(self.model)
        for start in range(0, len(prompt) - 1, PREFILL_STEP):
            self._forward(prompt[start : min(start + PREFILL_STEP, len(prompt) - 1)], self.cache)
            self.mx.eval([c.state for c in self.cache])
        return self._step(int(prompt[-1]))

    def _step(self, token: int) -> np.ndarray:
        return self._last(self._forward(np.array([token]), self.cache))

    def generate(self, prompt: np.ndarray, n_new: int) -> tuple[float, float]:
        """Timed through mlx-lm's own ``generate_step`` (greedy): it prefills as :meth:`_prefill` does and builds
        each step's graph while the previous one computes (``mx.async_eval``), which a step-by-step loop with a
        host-side argmax does not: 16% fewer tokens/s on SmolLM2 affine4 than mlx-lm's own benchmark measured.
        Prompt seconds end when the first token is out, generation seconds span the ``n_new`` steps after it."""
        from mlx_lm.generate import generate_step

        self.check_length(np.empty(len(prompt) + n_new))
        started = time.perf_counter()
        tokens = generate_step(
            self.mx.array(np.asarray(prompt, dtype=np.int32)), self.model, max_tokens=n_new + 1
        )
        next(tokens)
        prompt_done = time.perf_counter()
        for _ in range(n_new):
            next(tokens)
        done = time.perf_counter()
        tokens.close()
        self.mx.synchronize()  # the step generate_step ran ahead must not spill into the next timing
        return prompt_done - started, done - prompt_done

    def close(self) -> None:
        log.info("MLX peak memory %.0f MiB", self.mx.get_peak_memory() / 2**20)
        del self.model
        if self._scorer is not None:
            self._scorer.close()


def resolve_scoring(scoring: str, model) -> str:
    import mlx.core as mx

    if scoring not in SCORINGS:
        raise unknown("MLX scoring", scoring, SCORINGS)
    if scoring != "auto":
        return scoring
    quantized = any(is_quantized(m) for _, m in model.named_modules())
    return "dequantized" if quantized and not mx.metal.is_available() else "native"


def is_quantized(module) -> bool:
    import mlx.nn as nn

    return isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))


def dequantized_torch_model(model, path: Path):
    """transformers' model of ``path``'s architecture holding the MLX model's weights, quantized layers
    dequantized by MLX (``mx.dequantize`` with each layer's own bits, group size and mode) to float32."""
    import mlx.core as mx
    import torch
    from mlx.utils import tree_flatten
    from transformers import AutoConfig, AutoModelForCausalLM

    def numpy(a) -> torch.Tensor:
        return torch.from_numpy(np.array(a.astype(mx.float32)))

    state, quantized = {}, set()
    for name, module in model.named_modules():
        if is_quantized(module):
            quantized.add(name)
            weight = mx.dequantize(module.weight, module.scales, module.get("biases"), module.group_size,
                                   module.bits, mode=module.mode)  # fmt: skip
            state[hf_name(f"{name}.weight")] = numpy(weight)
            if "bias" in module:
                state[hf_name(f"{name}.bias")] = numpy(module.bias)
    for name, value in tree_flatten(model.parameters()):
        if name.rsplit(".", 1)[0] not in quantized:
            state[hf_name(name)] = numpy(value)
    config = json.loads((Path(path) / "config.json").read_text())
    for key in ("quantization", "quantization_config"):  # MLX's; transformers would look for a quantizer
        config.pop(key, None)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if hf.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ComparabilityError(
            f"MLX's weights do not fill transformers' {type(hf).__name__}: missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}"
        )
    return hf.eval()


def hf_name(mlx_name: str) -> str:
    """transformers' parameter name of an mlx-lm one (the same, but for our embedding wrapper's ``inner``)."""
    return mlx_name.replace(".inner.", ".")


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

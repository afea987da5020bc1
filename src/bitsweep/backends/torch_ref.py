"""The full-precision reference: the Hugging Face model in torch fp32. Every variant is compared to it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bitsweep.backends.base import BaseRunner
from bitsweep.errors import ConfigError

NO_LIMIT = 1 << 30


class TorchRunner(BaseRunner):
    def __init__(
        self, model_dir: str | Path, threads: int, n_ctx: int = NO_LIMIT, *, trust_remote_code: bool = False
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        super().__init__(model_dir, threads, n_ctx)
        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code
        ).eval()
        self._refuse_longer_than_trained()
        self.past = None

    @classmethod
    def around(cls, model, path: str | Path, threads: int, n_ctx: int = NO_LIMIT) -> TorchRunner:
        """A runner over a transformers model built in memory (e.g. from another framework's weights)."""
        import torch

        runner = cls.__new__(cls)
        BaseRunner.__init__(runner, path, threads, n_ctx)
        torch.set_num_threads(threads)
        runner.torch, runner.model, runner.past = torch, model.eval(), None
        return runner

    def _refuse_longer_than_trained(self) -> None:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and self.n_ctx != NO_LIMIT and self.n_ctx > limit:
            raise ConfigError(f"n_ctx={self.n_ctx} exceeds the model's max_position_embeddings={limit}")

    def logits(self, ids: np.ndarray) -> np.ndarray:
        self.check_length(ids)
        with self.torch.inference_mode():
            out = self.model(self.torch.as_tensor(ids[None], dtype=self.torch.long), use_cache=False)
        return out.logits[0].float().numpy()

    def _forward(self, ids: np.ndarray, past) -> np.ndarray:
        """The next token's logits ((V,); (batch, V) for ids (batch, n)): the LM head runs on the last position
        only, as a deployment's prefill does (and llama-bench's), not on every prompt position."""
        torch = self.torch
        with torch.inference_mode():
            out = self.model(torch.as_tensor(np.atleast_2d(ids), dtype=torch.long), past_key_values=past,
                             use_cache=True, **self._last_position_only())  # fmt: skip
        self.past = out.past_key_values
        logits = out.logits[:, -1].float().numpy()
        return logits if np.ndim(ids) == 2 else logits[0]

    def _last_position_only(self) -> dict[str, int]:
        """transformers' ``logits_to_keep=1`` where the architecture's forward takes it (remote code may not)."""
        if not hasattr(self, "_keep"):
            import inspect

            takes = "logits_to_keep" in inspect.signature(self.model.forward).parameters
            self._keep = {"logits_to_keep": 1} if takes else {}
        return self._keep

    def _prefill(self, prompt: np.ndarray) -> np.ndarray:
        return self._forward(prompt, None)

    def greedy_many(self, prompts: np.ndarray, n_new: int) -> np.ndarray:
        """The prompts decoded as one batch through transformers' forward and its KV cache (equal lengths: no
        padding, no mask). The same tokens as one prompt at a time on the default sweep's reference and its 7
        bitnet and 5 MLX variants (8 prompts x 32 tokens, measured) and on every architecture's tiny model
        (tests/test_architectures.py), 3-6x faster: 19 s -> 3-5 s for SmolLM2's reference."""
        return self.greedy_batch(prompts, n_new, lambda batch: self._forward(batch, None),
                                 lambda tokens, _past: self._forward(tokens, self.past))  # fmt: skip

    def _step(self, token: int) -> np.ndarray:
        return self._forward(np.array([token]), self.past)

    def close(self) -> None:
        del self.model
        self.past = None

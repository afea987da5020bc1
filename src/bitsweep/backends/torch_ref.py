"""The full-precision reference: the Hugging Face model in torch fp32. Every variant is compared to it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


class TorchRunner:
    def __init__(self, model_dir: str | Path, threads: int, trust_remote_code: bool = False) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code
        ).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(self.torch.as_tensor(ids[None], dtype=self.torch.long), use_cache=False)
        return out.logits[0].float().numpy()

    def detokenize(self, ids: np.ndarray) -> bytes:
        return self.tokenizer.decode(ids.tolist(), clean_up_tokenization_spaces=False).encode()

    def generate(self, prompt: np.ndarray, n_new: int) -> tuple[float, float]:
        torch = self.torch
        with torch.inference_mode():
            started = time.perf_counter()
            out = self.model(torch.as_tensor(prompt[None], dtype=torch.long), use_cache=True)
            prompt_done = time.perf_counter()
            past = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
            for _ in range(n_new):
                out = self.model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return prompt_done - started, time.perf_counter() - prompt_done

    def close(self) -> None:
        del self.model

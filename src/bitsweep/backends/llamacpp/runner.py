"""llama-cpp-python with logits for every position; one context reused, cleared between windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bitsweep.backends.base import BaseRunner
from bitsweep.backends.llamacpp.convert import gguf_file


class Runner(BaseRunner):
    def __init__(self, path: str | Path, threads: int, n_ctx: int = 512) -> None:
        from llama_cpp import Llama

        super().__init__(path, threads, n_ctx)
        model_file = gguf_file(path)
        self.llm = Llama(
            model_path=str(model_file),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=True,
            verbose=False,
        )

    def logits(self, ids: np.ndarray) -> np.ndarray:
        self.check_length(ids)
        self.llm.reset()
        self.llm.eval([int(t) for t in ids])
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def detokenize(self, ids: np.ndarray) -> bytes:
        # llama.cpp's own llama_detokenize with a large enough buffer: llama-cpp-python's Llama.detokenize
        # decodes token by token into a 32-byte buffer and silently truncates longer pieces (runs of spaces).
        import ctypes

        import llama_cpp

        tokens = (llama_cpp.llama_token * len(ids))(*map(int, ids))
        size = 64 * len(ids) + 64
        buffer = ctypes.create_string_buffer(size)
        vocab = self.llm._model.vocab
        n = llama_cpp.llama_detokenize(vocab, tokens, len(ids), buffer, size, False, True)
        if n < 0:
            raise RuntimeError(f"llama_detokenize needs {-n} bytes, had {size}")
        return buffer.raw[:n]

    def _prefill(self, prompt: np.ndarray) -> np.ndarray:
        self.llm.reset()
        self.llm.eval([int(t) for t in prompt])
        return self.llm.scores[self.llm.n_tokens - 1]

    def _step(self, token: int) -> np.ndarray:
        self.llm.eval([token])
        return self.llm.scores[self.llm.n_tokens - 1]

    def close(self) -> None:
        self.llm.close()

"""llama-cpp-python with logits for every position; one context reused, cleared between windows."""

from __future__ import annotations

import time
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
        self._timing = None  # the generation context (generate), made on first use

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

    def generate(self, prompt: np.ndarray, n_new: int) -> tuple[float, float]:
        """Timed as a deployment runs (and llama-bench times pp and tg): the prompt in one batch with logits for
        its last token only, then one token per ``llama_decode`` picked by llama.cpp's own greedy sampler, in a
        second context on the same weights (the scoring context computes logits for every position, and
        llama-cpp-python's ``eval`` copies each step's 49k logits into Python)."""
        import llama_cpp

        self.check_length(np.empty(len(prompt) + n_new))
        ctx, sampler = self._timing_context()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        tokens = (llama_cpp.llama_token * len(prompt))(*map(int, prompt))
        one = (llama_cpp.llama_token * 1)()
        started = time.perf_counter()
        self._decode(ctx, llama_cpp.llama_batch_get_one(tokens, len(prompt)))
        token = llama_cpp.llama_sampler_sample(sampler, ctx, -1)  # waits for the batch's logits
        prompt_done = time.perf_counter()
        for _ in range(n_new):
            one[0] = token
            self._decode(ctx, llama_cpp.llama_batch_get_one(one, 1))
            token = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
        return prompt_done - started, time.perf_counter() - prompt_done

    def _timing_context(self):
        """(context, greedy sampler) made once on the loaded model: same threads, batch and attention settings
        as the scoring context, without ``logits_all``."""
        import llama_cpp

        if self._timing is None:
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = params.n_batch = params.n_ubatch = self.n_ctx
            params.n_threads = params.n_threads_batch = self.threads
            params.flash_attn_type = self.llm.context_params.flash_attn_type
            ctx = llama_cpp.llama_init_from_model(self.llm._model.model, params)
            if not ctx:
                raise RuntimeError("llama.cpp could not create a second context for timing")
            self._timing = (ctx, llama_cpp.llama_sampler_init_greedy())
        return self._timing

    @staticmethod
    def _decode(ctx, batch) -> None:
        import llama_cpp

        status = llama_cpp.llama_decode(ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")

    def close(self) -> None:
        if self._timing is not None:
            import llama_cpp

            llama_cpp.llama_sampler_free(self._timing[1])
            llama_cpp.llama_free(self._timing[0])
            self._timing = None
        self.llm.close()

"""llama.cpp through llama-cpp-python: one scoring context with logits for every position, reused and cleared
between windows; a second one, made on first use, for timed generation."""

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
        self._window_batch = None  # window_logits' llama_batch, made on first use

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return np.array(self.window_logits(ids))

    def window_logits(self, ids: np.ndarray) -> np.ndarray:
        """The window's logits read in place from llama.cpp's output buffer (valid until this runner decodes
        again): the one ``llama_decode`` llama-cpp-python's ``eval`` makes (same batch: positions 0..n-1 of
        sequence 0, every one an output), without its two copies of the (n, 49k) logits into fresh memory."""
        import llama_cpp

        self.check_length(ids)
        n, batch = len(ids), self._scoring_batch()
        np.ctypeslib.as_array(batch.token, shape=(n,))[:] = ids
        batch.n_tokens = n
        self.llm.reset()  # llama-cpp-python's own token count, so a later eval starts from an empty cache
        ctx = self.llm._ctx.ctx
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        self._decode(ctx, batch)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(n, self.llm.n_vocab()))

    def _scoring_batch(self):
        """A llama_batch of n_ctx slots, slot i at position i of sequence 0 with its logits requested; only the
        tokens and their count change from window to window."""
        import llama_cpp

        if self._window_batch is None:
            batch = llama_cpp.llama_batch_init(self.n_ctx, 0, 1)
            np.ctypeslib.as_array(batch.pos, shape=(self.n_ctx,))[:] = np.arange(self.n_ctx)
            np.ctypeslib.as_array(batch.n_seq_id, shape=(self.n_ctx,))[:] = 1
            np.ctypeslib.as_array(batch.logits, shape=(self.n_ctx,))[:] = 1
            for i in range(self.n_ctx):
                batch.seq_id[i][0] = 0
            self._window_batch = batch
        return self._window_batch

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
        if self._window_batch is not None:
            import llama_cpp

            llama_cpp.llama_batch_free(self._window_batch)
            self._window_batch = None
        if self._timing is not None:
            import llama_cpp

            llama_cpp.llama_sampler_free(self._timing[1])
            llama_cpp.llama_free(self._timing[0])
            self._timing = None
        self.llm.close()

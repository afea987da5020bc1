"""The CPU plugin, always in f32 and with the weights as the only thing quantized.

Left to its defaults the plugin infers in bf16 on CPUs with AMX, keeps the KV cache in u8, and on CPUs with VNNI
or AMX quantizes the activations of compressed-weight MatMuls to int8 in groups of 32 ("dynamic quantization"):
the first and the last depend on the host (INT8_ASYM SmolLM2 read KLD 0.0065 on a CI host, 0.0036 on others) and
none of the three is the weight format under study, so all three are pinned off here and each result records the
settings as the compiled model reports them.

The IR's inputs: input_ids, attention_mask, position_ids (int64, [1, n]) and beam_idx (int32, [1]); output:
logits [1, n, V]. The KV cache is the model's state, reset before each window.

As OpenVINO GenAI's LLM pipeline does ("slice before MatMul"), the runner compiles the IR with the LM head's input
sliced along the sequence: prompt processing runs the head on the last position only, where optimum-intel's IR
would run SmolLM2's 49k-row head on every prompt position. The slice starts at an added input, ``logits_from``
([1], int64), so one compiled model (one copy of the weights) serves both: 0 for a scored window's logits at every
position, n - 1 for a prompt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bitsweep.backends.base import BaseRunner

MODEL_XML = "openvino_model.xml"
PINNED = {
    "INFERENCE_PRECISION_HINT": "f32",
    "KV_CACHE_PRECISION": "f32",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
}


LOGITS_FROM = "logits_from"


def compile_model(xml: str | Path, threads: int):
    import openvino as ov

    config = {**PINNED, "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
    core = ov.Core()
    return core.compile_model(slice_before_head(core.read_model(str(xml))), "CPU", config)


def head_matmul(model):
    """The MatMul that makes ``logits`` (the LM head), found through the elementwise ops after it (a Convert, a
    logit soft-cap): (MatMul node, index of its activation input [1, n, hidden])."""
    node = model.output("logits").get_node().input_value(0).get_node()  # the Result's producer
    for _ in range(8):
        if node.get_type_name() == "MatMul":
            ranks = [node.input_value(i).get_partial_shape().rank.get_length() for i in range(2)]
            return node, ranks.index(3)
        node = node.input_value(0).get_node()
    raise ValueError(f"no MatMul within 8 ops above the IR's logits (last op seen: {node.get_type_name()})")


def slice_before_head(model):
    """``model`` with the head's input sliced to positions ``logits_from:`` (an added [1] int64 input)."""
    import openvino as ov
    from openvino import opset13 as ops

    matmul, port = head_matmul(model)
    start = ops.parameter([1], ov.Type.i64, name=LOGITS_FROM)
    start.output(0).get_tensor().set_names({LOGITS_FROM})
    end, step, axis = (ops.constant(np.array([v], dtype=np.int64)) for v in (np.iinfo(np.int64).max, 1, 1))
    sliced = ops.slice(matmul.input_value(port), start, end, step, axis)
    matmul.input(port).replace_source_output(sliced.output(0))
    model.add_parameters([start])
    model.validate_nodes_and_infer_types()
    return model


def stateful_inputs(ids: np.ndarray, past: int = 0) -> dict[str, np.ndarray]:
    """Feeds for ``ids`` ((n,) or a batch of equal-length sequences (batch, n)) after ``past`` cached positions;
    ``beam_idx`` keeps each sequence's cache in its own row of the state."""
    ids = np.atleast_2d(np.asarray(ids, dtype=np.int64))
    batch, n = ids.shape
    return {
        "input_ids": ids,
        "attention_mask": np.ones((batch, past + n), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(past, past + n, dtype=np.int64), (batch, n)).copy(),
        "beam_idx": np.arange(batch, dtype=np.int32),
    }


class Runner(BaseRunner):
    def __init__(self, path: str | Path, threads: int, n_ctx: int = 512) -> None:
        super().__init__(path, threads, n_ctx)
        self.compiled = compile_model(Path(path) / MODEL_XML, threads)
        self.request = self.compiled.create_infer_request()
        self.past = 0

    def _infer(self, ids: np.ndarray, past: int, logits_from: int) -> np.ndarray:
        """``ids`` ((n,) or (batch, n)) after ``past`` cached positions: logits [batch, n - logits_from, V] of the
        positions from ``logits_from`` on (the head runs on those only; [n - logits_from, V] for one sequence), a
        view of the request's output tensor (valid until its next inference: callers that keep it copy)."""
        feeds = stateful_inputs(ids, past) | {LOGITS_FROM: np.array([logits_from], np.int64)}
        logits = self.request.infer(feeds, share_outputs=True)["logits"]
        return logits if np.ndim(ids) == 2 else logits[0]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return np.array(self.window_logits(ids), dtype=np.float32)

    def window_logits(self, ids: np.ndarray) -> np.ndarray:
        """In place in the request's output tensor, without a fresh (n, V) copy per window."""
        self.check_length(ids)
        self.request.reset_state()
        return self._infer(ids, 0, 0)

    def _prefill(self, prompt: np.ndarray) -> np.ndarray:
        self.request.reset_state()
        self.past = len(prompt)
        return self._infer(prompt, 0, len(prompt) - 1)[-1].copy()

    def _step(self, token: int) -> np.ndarray:
        out = self._infer(np.array([token]), self.past, 0)[-1].copy()
        self.past += 1
        return out

    def greedy_many(self, prompts: np.ndarray, n_new: int) -> np.ndarray:
        """The prompts decoded as one batch, each sequence's cache a row of the state: the same tokens as one
        prompt at a time (all 19 OpenVINO variants of the default sweep, 8 prompts x 32 tokens, measured;
        tests/test_openvino.py) in a third to a quarter of the time (the plugin's f32 kernels, dynamic
        quantization pinned off, compute each row alone)."""
        self.request.reset_state()
        return self.greedy_batch(prompts, n_new, lambda batch: self._infer(batch, 0, batch.shape[1] - 1)[:, -1],
                                 lambda tokens, past: self._infer(tokens, past, 0)[:, -1])  # fmt: skip

    def scoring_info(self) -> dict[str, str | float]:
        """The pinned plugin settings as the compiled model reports them."""
        values = {key: self.compiled.get_property(key) for key in PINNED}  # precisions as ov.Type
        return {f"openvino_{key.lower()}": getattr(v, "to_string", v.__str__)() for key, v in values.items()}

    def close(self) -> None:
        del self.request, self.compiled


OpenVINORunner = Runner

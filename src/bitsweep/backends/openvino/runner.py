"""The CPU plugin, always in f32 and with the weights as the only thing quantized.

Left to its defaults the plugin infers in bf16 on CPUs with AMX, keeps the KV cache in u8, and on CPUs with VNNI
or AMX quantizes the activations of compressed-weight MatMuls to int8 in groups of 32 ("dynamic quantization"):
the first and the last depend on the host (INT8_ASYM SmolLM2 read KLD 0.0065 on a CI host, 0.0036 on others) and
none of the three is the weight format under study, so all three are pinned off here and each result records the
settings as the compiled model reports them.

The IR's inputs: input_ids, attention_mask, position_ids (int64, [1, n]) and beam_idx (int32, [1]); output:
logits [1, n, V]. The KV cache is the model's state, reset before each window.
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


def compile_model(xml: str | Path, threads: int):
    import openvino as ov

    config = {**PINNED, "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
    return ov.Core().compile_model(str(xml), "CPU", config)


def stateful_inputs(ids: np.ndarray, past: int = 0) -> dict[str, np.ndarray]:
    n = len(ids)
    return {
        "input_ids": np.asarray(ids, dtype=np.int64)[None],
        "attention_mask": np.ones((1, past + n), dtype=np.int64),
        "position_ids": np.arange(past, past + n, dtype=np.int64)[None],
        "beam_idx": np.zeros(1, dtype=np.int32),
    }


class Runner(BaseRunner):
    def __init__(self, path: str | Path, threads: int, n_ctx: int = 512) -> None:
        super().__init__(path, threads, n_ctx)
        self.compiled = compile_model(Path(path) / MODEL_XML, threads)
        self.request = self.compiled.create_infer_request()
        self.past = 0

    def logits(self, ids: np.ndarray) -> np.ndarray:
        self.check_length(ids)
        self.request.reset_state()
        out = self.request.infer(stateful_inputs(ids))
        return np.array(out["logits"][0], dtype=np.float32)

    def _prefill(self, prompt: np.ndarray) -> np.ndarray:
        self.request.reset_state()
        self.past = len(prompt)
        return self.request.infer(stateful_inputs(prompt))["logits"][0, -1]

    def _step(self, token: int) -> np.ndarray:
        out = self.request.infer(stateful_inputs(np.array([token]), self.past))
        self.past += 1
        return out["logits"][0, -1]

    def scoring_info(self) -> dict[str, str | float]:
        """The pinned plugin settings as the compiled model reports them."""
        values = {key: self.compiled.get_property(key) for key in PINNED}  # precisions as ov.Type
        return {f"openvino_{key.lower()}": getattr(v, "to_string", v.__str__)() for key, v in values.items()}

    def close(self) -> None:
        del self.request, self.compiled


OpenVINORunner = Runner

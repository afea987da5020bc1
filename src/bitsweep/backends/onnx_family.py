"""The ONNX family's shared code: HF -> ONNX with optimum's exporter, what a graph stores, the untied LM head,
calibration feeds, the artifact summary, and the ONNX Runtime runner (CPU execution provider) that scores every
ONNX model. Used by the ``onnxruntime``, ``olive`` and ``qnn`` backends; nothing framework-specific is imported
at module level.

Why optimum's exporter (optimum-onnx 0.1.0): it is the maintained HF -> ONNX path that resolves beside
transformers 4.57, optimum-intel and olive-ai in our pinned stack, and its ``text-generation-with-past`` task
gives one graph that serves both uses we need: scoring a window from an empty KV cache and generating token by
token with the cache (onnxruntime-genai's model builder needs transformers 5 in the versions that resolve).

The exported graph (opset 18, fp32):
  inputs  input_ids, position_ids int64 [1, n]; attention_mask int64 [1, past + n];
          past_key_values.{i}.key / .value float32 [1, n_kv_heads, past, head_dim]
  outputs logits float32 [1, n, V]; present.{i}.key / .value [1, n_kv_heads, past + n, head_dim]
The tied LM head is stored twice (the embedding for Gather, its transpose for the last MatMul), so the ONNX
file holds more weights than the HF model; bits/weight is measured against the weights the ONNX file stores.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bitsweep.backends.base import (
    ARTIFACT_JSON,
    Applied,
    BaseQuantizer,
    BaseRunner,
    Footprint,
    FormatInfo,
    QuantizeRequest,
    copy_side_files,
)
from bitsweep.manifest import read_json

log = logging.getLogger(__name__)

MODEL_ONNX = "model.onnx"
# Ops that show a graph is really quantized (the summary counts them).
QUANT_OPS = ("MatMulNBits", "GatherBlockQuantized", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
             "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "QGemm")  # fmt: skip
# Ops that quantize activations (all among QUANT_OPS, which onnx_summary counts). A graph with none of them decodes
# a batch of prompts to the same tokens as one prompt at a time (OnnxRunner.greedy_many); with them it need not: a
# dynamic quantizer's activation scale spans the whole batch, and 16-bit QDQ activations gave other tokens at batch
# 8 than at 1 (the default sweep's W8A16, W4A16, W16A16; measured).
ACTIVATION_QUANT_OPS = frozenset({"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul",
                                  "DynamicQuantizeMatMul", "QGemm"})  # fmt: skip


# The dynamo exporter holds the fp32 model, its traced graph and the serialised protobuf (2.9 GB peak measured
# on SmolLM2-135M, a sampled lower bound).
ONNX = FormatInfo("onnx", converter=f"{__name__}:convert", runner=f"{__name__}:OnnxRunner",
                  convert_footprint=Footprint(500, 24.0))  # fmt: skip
# Architectures optimum's ONNX exporter refuses, so onnxruntime, olive and qnn have no model to start from
# (measured: bench/architectures.py; tests/test_architectures.py checks it still says so).
ONNX_UNSUPPORTED: dict[str, str] = {
    "bitnet": "optimum-onnx 0.1.0's exporter has no ONNX configuration for BitNet: \"KeyError: bitnet is not "
    "supported yet with the onnx backend. Only ['openvino'] are supported. If you want to support onnx please "
    'propose a PR or open up an issue."',
}


def convert(model_dir: Path, out: Path, options: dict[str, Any], trust_remote_code: bool = False) -> None:
    from optimum.exporters.onnx import main_export

    main_export(str(model_dir), str(out), task="text-generation-with-past", device="cpu",
                trust_remote_code=trust_remote_code)  # fmt: skip


def export_onnx(model_dir: str | Path, out: str | Path, trust_remote_code: bool = False) -> None:
    convert(Path(model_dir), Path(out), {}, trust_remote_code)


def save_model(model, path: Path) -> None:
    """Save a ModelProto; weights go to one external-data file only when the 2 GB protobuf limit requires it."""
    import onnx

    large = model.ByteSize() > 2**31 - 2**24 if _has_no_external(model) else True
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + ".data" if large else None)  # fmt: skip


def _has_no_external(model) -> bool:
    import onnx

    return not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def model_bytes(path: Path) -> int:
    """The model file plus its external-data file, if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


# ---------------------------------------------------------------------------------------------------------
# What a graph stores


def float_weight_count(path: Path) -> int:
    """Elements of the float initializers of rank >= 2: the weights (embeddings, projections, LM head)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return sum(
        int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in floats and len(t.dims) >= 2
    )


def onnx_summary(path: Path) -> dict[str, Any]:
    """What a graph really stores and runs: quantization ops, weight initializers by element type, and the
    bit-widths / block sizes of MatMulNBits nodes."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(node.op_type for node in model.graph.node)
    count: Counter[str] = Counter()
    elements: Counter[str] = Counter()
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        if n < 4096:  # scales, zero points, shapes, norms
            continue
        kind = (
            helper.tensor_dtype_to_np_dtype(t.data_type).name
            if t.data_type != onnx.TensorProto.INT4
            else "int4"
        )
        if t.data_type == onnx.TensorProto.UINT4:
            kind = "uint4"
        count[kind] += 1
        elements[kind] += n
    nbits = Counter()
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            nbits[f"{node.op_type}:bits={attrs.get('bits', 4)}:block={attrs.get('block_size')}"] += 1
    return {
        "quant_ops": {op: ops[op] for op in QUANT_OPS if ops[op]},
        "weight_types": dict(sorted(count.items())),
        "elements_by_type": dict(sorted(elements.items())),
        "blockwise": dict(sorted(nbits.items())),
        "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
    }


def quantizes_activations(model_dir: Path, model_file: str = MODEL_ONNX) -> bool:
    """Whether the graph has an op of ACTIVATION_QUANT_OPS: from the artifact's record of its ops (onnx_summary's
    ``quant_ops``, written at quantization) when it has one, since reading a 540 MB graph with embedded weights
    takes 2 s; else from the graph's own summary."""
    record = model_dir / ARTIFACT_JSON
    meta = read_json(record) if record.is_file() else {}
    ops = meta.get("applied", {}).get("quant_ops")
    if ops is None or meta.get("model_file") != model_file:
        ops = onnx_summary(model_dir / model_file)["quant_ops"]
    return bool(ACTIVATION_QUANT_OPS & set(ops))


def applied_meta(src: Path, out_model: Path) -> dict[str, Any]:
    """Bits per weight against the exported (tied) graph's weights, i.e. the HF model's parameters."""
    n_weights = float_weight_count(src)
    return {**onnx_summary(out_model), "n_params": n_weights, "bpw": 8 * model_bytes(out_model) / n_weights}


def attention_mask_nodes(model) -> list[str]:
    """Nodes that build or apply the causal mask: the forward cone of ``attention_mask`` up to the Softmax.

    The mask holds the most negative float; quantizing those tensors to 8 or 16 bits folds it into the
    attention scores' range and destroys the model (top-1 agreement 0). They stay float, like the softmax.
    """
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    cone, frontier = {}, ["attention_mask"]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.name in cone:
                continue
            cone[node.name] = node
            if node.op_type != "Softmax":
                frontier.extend(node.output)
    return sorted(cone)


def matching_nodes(model, patterns: list[str]) -> list[str]:
    """Names of the nodes matching any of the glob ``patterns``."""
    return [n.name for n in model.graph.node if any(fnmatch.fnmatchcase(n.name, p) for p in patterns)]


def untie_lm_head(model) -> None:
    """Give the LM head its own weight initializer, in place.

    optimum stores a tied head as ``MatMul(x, Transpose(embed_tokens))``; quantizers only quantize a MatMul
    whose weight is an initializer, so the head (28% of SmolLM2's weights) would silently stay fp32 while
    llama.cpp and NNCF quantize it. The transposed copy is what every other framework quantizes too.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    for node in list(model.graph.node):
        if node.op_type == "Transpose" and len(node.input) == 1 and node.input[0] in inits:
            weight = numpy_helper.to_array(inits[node.input[0]]).T
            model.graph.initializer.append(
                numpy_helper.from_array(np.ascontiguousarray(weight), node.output[0])
            )
            model.graph.node.remove(node)


def prepared_source(src: Path, out: Path) -> Path:
    """The source graph with an untied LM head, written beside the output (removed by finish_artifact)."""
    import onnx

    model = onnx.load(str(src))
    untie_lm_head(model)
    path = out / "_source.onnx"
    save_model(model, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Calibration


def window_feeds(session_inputs, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for one window (ids: (n,)) or a batch of equal-length ones ((batch, n)) from an empty KV cache."""
    ids = np.atleast_2d(np.asarray(ids, dtype=np.int64))
    batch, n = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((batch, n), np.int64),
             "position_ids": np.broadcast_to(np.arange(n, dtype=np.int64), (batch, n)).copy()}  # fmt: skip
    for inp in session_inputs:
        if inp.name.startswith("past_key_values"):
            _, heads, _, head_dim = inp.shape
            feeds[inp.name] = np.zeros((batch, heads, 0, head_dim), dtype=_np_dtype(inp.type))
    return {inp.name: feeds[inp.name] for inp in session_inputs}


def _np_dtype(ort_type: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16}[ort_type]


# Bump when calibration_reader's feeds change: shared tensor ranges (shared_ranges) are keyed by it.
CALIBRATION_FEEDS = "window + second half on the first half's cache, v1"


def calibration_reader(model_path: Path, tokenizer_dir: Path, text: Path, n_ctx: int, n_samples: int):
    """An ORT CalibrationDataReader over windows of the calibration text (never the evaluation text).

    Two feeds per window: the whole window from an empty KV cache (the first positions carry the attention
    sink's massive activations, which only appear as current tokens), and its second half on top of the first
    half's cache, so the past_key_values inputs see real data too. ORT's min/max calibration reduces an empty
    cache to (+inf, -inf), which nanmin/nanmax across feeds ignore; with empty caches alone a fully quantized
    QNN graph would get NaN zero points for them. The feeds are made on first use: a quantization that reads
    its tensor ranges from :func:`shared_ranges` never runs the model for them. ``reader.windows``: the ids.
    """
    from onnxruntime.quantization import CalibrationDataReader

    from bitsweep.text import calibration_windows

    windows = calibration_windows(tokenizer_dir, text, n_ctx, n_samples)

    def make_feeds() -> list[dict[str, np.ndarray]]:
        import onnxruntime as ort

        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        inputs = session.get_inputs()
        past_names = [i.name for i in inputs if i.name.startswith("past_key_values")]
        present_names = [o.name for o in session.get_outputs() if o.name.startswith("present")]
        feeds = []
        for window in windows:
            feeds.append(window_feeds(inputs, window))
            if not past_names:
                continue
            half = len(window) // 2
            present = session.run(present_names, window_feeds(inputs, window[:half]))
            feed = {"input_ids": np.asarray(window[half:], np.int64)[None],
                    "attention_mask": np.ones((1, len(window)), np.int64),
                    "position_ids": np.arange(half, len(window), dtype=np.int64)[None],
                    **dict(zip(past_names, present, strict=True))}  # fmt: skip
            feeds.append({i.name: feed[i.name] for i in inputs})
        return feeds

    class WindowReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.windows = windows
            self.feeds = None

        def get_next(self):
            if self.feeds is None:
                self.feeds = iter(make_feeds())
            return next(self.feeds, None)

    return WindowReader()


def shared_ranges(request: QuantizeRequest, model_path: Path, config) -> Path:
    """The file onnxruntime keeps this calibration's tensor ranges in (``quantize_static``'s
    ``calibration_cache_path``: read when it exists, else calibrated and written, atomically), beside the
    backend's artifacts and named by everything the ranges depend on.

    Min/max ranges are a function of the graph calibrated, the feeds, the op types whose tensors are calibrated,
    the calibrator's options and onnxruntime's release, not of the types a variant quantizes to: QNN's variants
    of one model share them and calibrate once (on SmolLM2 each QNN variant spent 35 s of its ~105 s making the
    feeds and calibrating). onnxruntime calibrates the graph it is given unless it must raise the opset for the
    types asked for, which never happens to a graph at opset 21 (QNN converts to it first).
    """
    import onnxruntime

    from bitsweep.manifest import sha256_file

    model_files = [model_path, model_path.with_name(model_path.name + ".data")]
    windows = np.ascontiguousarray(config.calibration_data_reader.windows)
    key = {
        "model": [sha256_file(path) for path in model_files if path.is_file()],
        "windows": hashlib.sha256(windows.tobytes()).hexdigest(),
        "windows_shape": list(windows.shape),
        "feeds": CALIBRATION_FEEDS,
        "method": config.calibrate_method.name,
        "op_types": sorted(config.op_types_to_quantize),
        "options": {k: v for k, v in sorted(config.extra_options.items()) if k.startswith("Calib")},
        "onnxruntime": onnxruntime.__version__,
    }
    name = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return request.out.parent / ".calibration" / f"{request.scheme.backend}-{name}.json"


def quantize_with_config(model_in: Path, model_out: Path, config, ranges: Path | None = None) -> None:
    """``onnxruntime.quantization.quantize`` of a StaticQuantConfig, argument for argument, plus the tensor
    ranges file (:func:`shared_ranges`) that ``quantize`` does not pass on."""
    from onnxruntime.quantization import quantize_static

    quantize_static(
        model_in, model_out, config.calibration_data_reader, calibrate_method=config.calibrate_method,
        quant_format=config.quant_format, activation_type=config.activation_type, weight_type=config.weight_type,
        op_types_to_quantize=config.op_types_to_quantize, nodes_to_quantize=config.nodes_to_quantize,
        nodes_to_exclude=config.nodes_to_exclude, per_channel=config.per_channel, reduce_range=config.reduce_range,
        use_external_data_format=config.use_external_data_format,
        calibration_providers=config.calibration_providers, extra_options=config.extra_options,
        calibration_cache_path=ranges,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# What every ONNX-model backend shares


def calibration_for(request: QuantizeRequest):
    """ORT calibration reader over ``settings.calibration`` windows of the request's calibration text."""
    calib = request.settings.calibration
    return calibration_reader(request.src / MODEL_ONNX, request.src, request.calibration_input(),
                              calib.n_ctx, calib.n_samples)  # fmt: skip


class OnnxQuantizer(BaseQuantizer):
    """Base of the backends whose artifact is an ONNX model (onnxruntime, olive, qnn): versions and the
    artifact summary; ONNX Runtime runs them all (:class:`OnnxRunner`)."""

    def versions(self) -> dict[str, str]:
        import onnx
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}

    def finish(self, request: QuantizeRequest, fmt: str, extra: dict[str, Any]) -> Applied:
        """Drop scratch files, copy the tokenizer, measure what the model file stores."""
        for scratch in request.out.glob("_source.onnx*"):
            scratch.unlink()
        copy_side_files(request.src, request.out)
        applied = applied_meta(request.src / MODEL_ONNX, request.out / MODEL_ONNX)
        return Applied(MODEL_ONNX, {"format": fmt, **applied, **extra})


# ---------------------------------------------------------------------------------------------------------
# Runner


class OnnxRunner(BaseRunner):
    """ONNX Runtime, CPU execution provider, ``threads`` intra-op threads, sequential execution."""

    def __init__(
        self, model_dir: str | Path, threads: int, n_ctx: int = 512, model_file: str = MODEL_ONNX
    ) -> None:
        import onnxruntime as ort

        super().__init__(model_dir, threads, n_ctx)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(Path(model_dir) / model_file), options,
                                            providers=["CPUExecutionProvider"])  # fmt: skip
        self.inputs = self.session.get_inputs()
        self.present = [o.name for o in self.session.get_outputs() if o.name.startswith("present")]
        self.past_names = [i.name for i in self.inputs if i.name.startswith("past_key_values")]
        self.state: tuple[int, list] = (0, [])
        self.batch_greedy = not quantizes_activations(Path(model_dir), model_file)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        self.check_length(ids)
        logits = self.session.run(["logits"], window_feeds(self.inputs, ids))[0]
        return np.asarray(logits[0], dtype=np.float32)

    def _run(self, feeds: dict[str, np.ndarray], n_new: int) -> np.ndarray:
        logits, *present = self.session.run(["logits", *self.present], feeds)
        self.state = (self.state[0] + n_new, present)
        return logits[0, -1]

    def _prefill(self, prompt: np.ndarray) -> np.ndarray:
        self.state = (0, [])
        return self._run(window_feeds(self.inputs, prompt), len(prompt))

    def _step(self, token: int) -> np.ndarray:
        past, present = self.state
        return self._run(self._step_feeds(np.array([[token]], np.int64), past, present), 1)

    def _step_feeds(self, tokens: np.ndarray, past: int, present: list) -> dict[str, np.ndarray]:
        """One new token per sequence (tokens: (batch, 1)) on top of ``past`` cached positions."""
        batch = len(tokens)
        feeds = {"input_ids": tokens, "attention_mask": np.ones((batch, past + 1), np.int64),
                 "position_ids": np.full((batch, 1), past, np.int64), **dict(zip(self.past_names, present, strict=True))}  # fmt: skip
        return {i.name: feeds[i.name] for i in self.inputs}

    def greedy_many(self, prompts: np.ndarray, n_new: int) -> np.ndarray:
        """The prompts decoded as one batch where activations stay float (the same tokens as one prompt at a time:
        tests/test_onnx.py). ONNX Runtime's MatMulNBits at 2 and 8 bits dequantizes the whole weight on every call
        (6 tok/s one token at a time on SmolLM2, 390 tok/s over a prompt): a batch pays that once per step."""
        if not self.batch_greedy:
            return super().greedy_many(prompts, n_new)
        present: list = []

        def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            logits, *present[:] = self.session.run(["logits", *self.present], feeds)
            return logits[:, -1]

        return self.greedy_batch(prompts, n_new, lambda batch: run(window_feeds(self.inputs, batch)),
                                 lambda tokens, past: run(self._step_feeds(tokens, past, present)))  # fmt: skip

    def close(self) -> None:
        del self.session

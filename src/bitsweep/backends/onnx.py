"""ONNX: HF -> ONNX with optimum's exporter, quantization with ONNX Runtime's own quantizers, inference on
ONNX Runtime's CPU execution provider. The ``olive`` and ``qnn`` backends reuse the export, the runner and the
model summary from here.

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
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bitsweep.backends.base import Artifact, QuantizeRequest, base_meta, copy_side_files

log = logging.getLogger(__name__)

MODEL_ONNX = "model.onnx"
# Ops that show a graph is really quantized (the summary counts them).
QUANT_OPS = ("MatMulNBits", "GatherBlockQuantized", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
             "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "QGemm")  # fmt: skip


def export_onnx(model_dir: str | Path, out: str | Path, trust_remote_code: bool = False) -> None:
    from optimum.exporters.onnx import main_export

    main_export(str(model_dir), str(out), task="text-generation-with-past", device="cpu",
                trust_remote_code=trust_remote_code)  # fmt: skip


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
    """Feeds for one window from an empty KV cache."""
    n = len(ids)
    feeds = {"input_ids": np.asarray(ids, dtype=np.int64)[None], "attention_mask": np.ones((1, n), np.int64),
             "position_ids": np.arange(n, dtype=np.int64)[None]}  # fmt: skip
    for inp in session_inputs:
        if inp.name.startswith("past_key_values"):
            _, heads, _, head_dim = inp.shape
            feeds[inp.name] = np.zeros((1, heads, 0, head_dim), dtype=_np_dtype(inp.type))
    return {inp.name: feeds[inp.name] for inp in session_inputs}


def _np_dtype(ort_type: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16}[ort_type]


def calibration_reader(model_path: Path, tokenizer_dir: Path, text: Path, n_ctx: int, n_samples: int):
    """An ORT CalibrationDataReader over windows of the calibration text (never the evaluation text).

    Two feeds per window: the whole window from an empty KV cache (the first positions carry the attention
    sink's massive activations, which only appear as current tokens), and its second half on top of the first
    half's cache, so the past_key_values inputs see real data too. ORT's min/max calibration reduces an empty
    cache to (+inf, -inf), which nanmin/nanmax across feeds ignore; with empty caches alone a fully quantized
    QNN graph would get NaN zero points for them.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader

    from bitsweep.text import calibration_windows

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    past_names = [i.name for i in inputs if i.name.startswith("past_key_values")]
    present_names = [o.name for o in session.get_outputs() if o.name.startswith("present")]
    feeds = []
    for window in calibration_windows(tokenizer_dir, text, n_ctx, n_samples):
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

    class WindowReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    return WindowReader()


# ---------------------------------------------------------------------------------------------------------
# ONNX Runtime quantizers


def quantize_dynamic_int8(src: Path, out: Path, options: dict[str, Any]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, out, weight_type=QuantType[options.get("weight_type", "QInt8")],
                     per_channel=bool(options.get("per_channel", False)),
                     op_types_to_quantize=options.get("op_types"))  # fmt: skip


def matching_nodes(model, patterns: list[str]) -> list[str]:
    """Names of the nodes matching any of the glob ``patterns``."""
    return [n.name for n in model.graph.node if any(fnmatch.fnmatchcase(n.name, p) for p in patterns)]


def weight_nodes(model, op_types: tuple[str, ...], exclude: list[str]) -> list[str]:
    """Nodes of ``op_types`` that read a weight initializer, minus those matching an ``exclude`` glob."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in op_types and any(i in inits for i in n.input)
            and not any(fnmatch.fnmatchcase(n.name, pattern) for pattern in exclude)]  # fmt: skip


def quantize_qdq(src: Path, out: Path, options: dict[str, Any], reader) -> list[str]:
    """Static QDQ INT8 of the linear layers (activations calibrated on the calibration windows); returns the
    weight nodes kept float. Attention products and the causal mask are not touched (see attention_mask_nodes).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(src), load_external_data=False)
    op_types = tuple(options.get("op_types") or ("MatMul",))
    quantized = weight_nodes(model, op_types, list(options.get("exclude") or []))
    kept_float = sorted(set(weight_nodes(model, op_types, [])) - set(quantized))
    quantize_static(
        src, out, reader, quant_format=QuantFormat.QDQ, per_channel=bool(options.get("per_channel", True)),
        activation_type=QuantType[options.get("activation_type", "QUInt8")],
        weight_type=QuantType[options.get("weight_type", "QInt8")],
        calibrate_method=CalibrationMethod[options.get("calibrate_method", "MinMax")],
        nodes_to_quantize=quantized, extra_options={"WeightSymmetric": True},
    )  # fmt: skip
    return kept_float


def quantize_blockwise(src: Path, out: Path, fmt: str, options: dict[str, Any]) -> None:
    """Weight-only blockwise quantization to MatMulNBits (RTN or HQQ), the embedding to
    GatherBlockQuantized where this onnxruntime can (4 bits only: "Gather only supports 4 bits")."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per node
    bits = int(fmt[-1])
    block_size = int(options.get("block_size", 128))
    op_types = tuple(options.get("op_types") or (("MatMul", "Gather") if bits == 4 else ("MatMul",)))
    axes = (("MatMul", 0), ("Gather", 1))  # Gather: blocks along the hidden axis of [vocab, hidden]
    if fmt == "HQQ_INT4":  # "Gather quantization is not supported yet in HQQ"
        algo = nbits.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4, op_types_to_quantize=("MatMul",))
    else:
        algo = nbits.DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=bool(options.get("symmetric", False)), bits=bits,
            accuracy_level=options.get("accuracy_level"), op_types_to_quantize=op_types, quant_axes=axes,
        )  # fmt: skip
    quantizer = nbits.MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=algo)
    quantizer.process()
    save_model(quantizer.model.model, out)


class OnnxModelBackend:
    """What every backend producing an ONNX model shares: ONNX Runtime runs it (onnxruntime, olive, qnn)."""

    def versions(self) -> dict[str, str]:
        import onnx
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}

    def load(self, artifact: Artifact, threads: int, n_ctx: int = 512) -> OnnxRunner:
        return OnnxRunner(artifact.path, threads)


class OnnxRuntimeBackend(OnnxModelBackend):
    name: ClassVar[str] = "onnxruntime"

    def quantize(self, request: QuantizeRequest) -> Artifact:
        options = request.scheme.options
        fmt = str(options["format"]).upper()
        request.out.mkdir(parents=True, exist_ok=True)
        out_model = request.out / MODEL_ONNX
        # NONE: the export as is (its tied LM head); the quantizers read the untied copy
        src = (
            request.src / MODEL_ONNX
            if fmt == "NONE"
            else prepared_source(request.src / MODEL_ONNX, request.out)
        )
        excluded: list[str] = []
        started = time.perf_counter()
        if fmt == "NONE":
            save_model(_load(src), out_model)
        elif fmt == "DYNAMIC_INT8":
            quantize_dynamic_int8(src, out_model, options)
        elif fmt == "QDQ_INT8":
            excluded = quantize_qdq(src, out_model, options, calibration_for(request))
        else:
            quantize_blockwise(src, out_model, fmt, options)
        seconds = time.perf_counter() - started
        return finish_artifact(request, self.name, self.versions(), fmt, seconds, {"float_nodes": excluded})


def _load(path: Path):
    import onnx

    return onnx.load(str(path))


def calibration_for(request: QuantizeRequest):
    if request.calib_text is None:
        raise ValueError(f"scheme {request.scheme.variant} needs calibration text")
    calib = request.settings.get("calibration", {})
    return calibration_reader(request.src / MODEL_ONNX, request.src, request.calib_text,
                              calib.get("n_ctx", 128), calib.get("n_samples", 16))  # fmt: skip


def finish_artifact(
    request: QuantizeRequest, backend: str, versions: dict[str, str], fmt: str, seconds: float, extra: dict
) -> Artifact:
    """Copy the tokenizer, measure what the model file stores and write the artifact sidecar."""
    for scratch in request.out.glob("_source.onnx*"):
        scratch.unlink()
    copy_side_files(request.src, request.out)
    meta = base_meta(request, backend, versions)
    meta.update(model_file=MODEL_ONNX, format=fmt, quantize_seconds=seconds,
                applied={**applied_meta(request.src / MODEL_ONNX, request.out / MODEL_ONNX), **extra})  # fmt: skip
    artifact = Artifact(request.out, meta)
    artifact.save()
    return artifact


# ---------------------------------------------------------------------------------------------------------
# Runner


class OnnxRunner:
    """ONNX Runtime, CPU execution provider, ``threads`` intra-op threads, sequential execution."""

    def __init__(self, model_dir: str | Path, threads: int, model_file: str = MODEL_ONNX) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(Path(model_dir) / model_file), options,
                                            providers=["CPUExecutionProvider"])  # fmt: skip
        self.inputs = self.session.get_inputs()
        self.present = [o.name for o in self.session.get_outputs() if o.name.startswith("present")]
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        logits = self.session.run(["logits"], window_feeds(self.inputs, ids))[0]
        return np.asarray(logits[0], dtype=np.float32)

    def detokenize(self, ids: np.ndarray) -> bytes:
        return self.tokenizer.decode(ids.tolist(), clean_up_tokenization_spaces=False).encode()

    def generate(self, prompt: np.ndarray, n_new: int) -> tuple[float, float]:
        names = ["logits", *self.present]
        past_names = [i.name for i in self.inputs if i.name.startswith("past_key_values")]
        started = time.perf_counter()
        logits, *present = self.session.run(names, window_feeds(self.inputs, prompt))
        prompt_done = time.perf_counter()
        past = len(prompt)
        for _ in range(n_new):
            token = int(np.argmax(logits[0, -1]))
            feeds = {"input_ids": np.array([[token]], np.int64), "attention_mask": np.ones((1, past + 1), np.int64),
                     "position_ids": np.array([[past]], np.int64), **dict(zip(past_names, present, strict=True))}  # fmt: skip
            logits, *present = self.session.run(names, {i.name: feeds[i.name] for i in self.inputs})
            past += 1
        return prompt_done - started, time.perf_counter() - prompt_done

    def close(self) -> None:
        del self.session

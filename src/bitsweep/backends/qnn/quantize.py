"""Qualcomm QNN: QNN-ready QDQ ONNX models made with onnxruntime's QNN tooling, evaluated here on the CPU
execution provider (the QDQ pairs simulate the integer arithmetic). Qualcomm AI Hub compile + profile jobs for a
real device: bitsweep.backends.qnn.aihub.

The recipe is the one onnxruntime prescribes for its QNN execution provider: ``qnn_preprocess_model`` (fuses
what QNN runs as one op), then ``get_qnn_qdq_config`` (per-op quantization overrides QNN's HTP needs) with
calibration windows, then ``quantize``. Weight x activation types: w8a8, w8a16, w4a16, w16a16; 16-bit types
and int4 weights need opset 21, to which the graph is converted first.

The causal-mask subgraph (the forward cone of ``attention_mask`` up to each Softmax) stays float: it holds the
most negative float, and any 8/16-bit range that includes it flattens the attention scores. On a device those
nodes fall back to the CPU; the artifact lists them.
"""

from __future__ import annotations

from typing import ClassVar

from bitsweep.backends.base import Applied, QuantizeRequest
from bitsweep.backends.onnx_family import (
    MODEL_ONNX,
    OnnxQuantizer,
    attention_mask_nodes,
    calibration_for,
    matching_nodes,
    prepared_source,
    quantize_with_config,
    save_model,
    shared_ranges,
)
from bitsweep.backends.ort_linear import linear_quantization

# format -> (weight QuantType, activation QuantType) of onnxruntime.quantization
QNN_TYPES: dict[str, tuple[str, str]] = {
    "W8A8": ("QUInt8", "QUInt8"),
    "W8A16": ("QUInt8", "QUInt16"),
    "W4A16": ("QInt4", "QUInt16"),
    "W16A16": ("QUInt16", "QUInt16"),
}
QNN_OPSET = 21  # 16-bit QuantizeLinear/DequantizeLinear and int4 weights


class Quantizer(OnnxQuantizer):
    name: ClassVar[str] = "qnn"

    def apply(self, request: QuantizeRequest) -> Applied:
        import onnx
        from onnx import version_converter
        from onnxruntime.quantization import CalibrationMethod, QuantType
        from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

        options = request.scheme.options
        fmt = str(options["format"]).upper()
        weight_type, activation_type = QNN_TYPES[fmt]
        source = prepared_source(request.src / MODEL_ONNX, request.out)
        model = onnx.load(str(source))
        del model.metadata_props[:]  # qnn_preprocess_model fails on models that carry metadata_props
        replaced = finite_mask_fill(model)
        model = version_converter.convert_version(model, QNN_OPSET)
        save_model(model, source)
        preprocessed = request.out / "_source.preprocessed.onnx"
        if not qnn_preprocess_model(source, preprocessed):
            preprocessed = source  # nothing to fuse
        graph = onnx.load(str(preprocessed), load_external_data=False)
        float_nodes = sorted(
            {*attention_mask_nodes(graph), *matching_nodes(graph, options.get("keep_float") or [])}
        )
        config = get_qnn_qdq_config(
            preprocessed, calibration_for(request),
            calibrate_method=CalibrationMethod[options.get("calibrate_method", "MinMax")],
            activation_type=QuantType[activation_type], weight_type=QuantType[weight_type],
            per_channel=bool(options.get("per_channel", True)), nodes_to_exclude=float_nodes,
        )  # fmt: skip
        ranges = shared_ranges(request, preprocessed, config)
        calibrated = not ranges.is_file()
        with linear_quantization():
            quantize_with_config(preprocessed, request.out / MODEL_ONNX, config, ranges)
        preprocessed.unlink(missing_ok=True)
        extra = {"weight_type": weight_type, "activation_type": activation_type, "float_nodes": float_nodes,
                 "finite_mask_constants": replaced, "tensor_ranges": ranges.name,
                 "tensor_ranges_from": "calibrated here" if calibrated else "an earlier variant's calibration"}  # fmt: skip
        return self.finish(request, fmt, extra)


def finite_mask_fill(model) -> int:
    """Replace -inf constants (the causal mask's fill value) by float32's lowest finite value, in place.

    onnxruntime's QDQ pass quantizes Constant outputs even when their consumer is excluded; a -inf constant
    gets an infinite scale, the mask turns into NaN, and the exported graph's Where(IsNaN(softmax), 0, ...)
    zeroes every attention row (SmolLM2 W8A16: KLD 10.2, top-1 5%). Softmax gives exactly the same result for
    the lowest finite value, which HTP can also represent. Returns how many constants were replaced.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    lowest = np.finfo(np.float32).min
    replaced = 0
    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type == onnx.TensorProto.FLOAT:
                value = numpy_helper.to_array(attr.t)
                if np.isneginf(value).any():
                    attr.t.CopyFrom(numpy_helper.from_array(np.where(np.isneginf(value), lowest, value).astype(
                        np.float32), attr.t.name))  # fmt: skip
                    replaced += 1
    return replaced

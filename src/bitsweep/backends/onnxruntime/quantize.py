"""ONNX Runtime's own quantizers on the ONNX export: dynamic INT8 (MatMulInteger), static QDQ INT8 (calibrated),
MatMulNBits weight-only 8/4/2-bit (RTN) and HQQ 4-bit."""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path
from typing import Any, ClassVar

from bitsweep.backends.base import Applied, QuantizeRequest
from bitsweep.backends.onnx_family import (
    MODEL_ONNX,
    OnnxQuantizer,
    calibration_for,
    prepared_source,
    save_model,
)
from bitsweep.backends.ort_linear import linear_quantization


def quantize_dynamic_int8(src: Path, out: Path, options: dict[str, Any]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, out, weight_type=QuantType[options.get("weight_type", "QInt8")],
                     per_channel=bool(options.get("per_channel", False)),
                     op_types_to_quantize=options.get("op_types"))  # fmt: skip


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
    with linear_quantization():
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


class Quantizer(OnnxQuantizer):
    name: ClassVar[str] = "onnxruntime"

    def apply(self, request: QuantizeRequest) -> Applied:
        options = request.scheme.options
        fmt = str(options["format"]).upper()
        out_model = request.out / MODEL_ONNX
        # NONE: the export as is (its tied LM head); the quantizers read the untied copy
        src = (
            request.src / MODEL_ONNX
            if fmt == "NONE"
            else prepared_source(request.src / MODEL_ONNX, request.out)
        )
        excluded: list[str] = []
        if fmt == "NONE":
            save_model(_load(src), out_model)
        elif fmt == "DYNAMIC_INT8":
            quantize_dynamic_int8(src, out_model, options)
        elif fmt == "QDQ_INT8":
            excluded = quantize_qdq(src, out_model, options, calibration_for(request))
        else:
            quantize_blockwise(src, out_model, fmt, options)
        return self.finish(request, fmt, {"float_nodes": excluded})


def _load(path: Path):
    import onnx

    return onnx.load(str(path))

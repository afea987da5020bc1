"""ONNX Runtime: its own quantizers on the ONNX export (bitsweep.backends.onnx_family), run on its CPU execution
provider. Capability data only: nothing here imports onnxruntime.
"""

from __future__ import annotations

from bitsweep.backends.base import BackendInfo, Footprint
from bitsweep.backends.onnx_family import ONNX, ONNX_UNSUPPORTED
from bitsweep.backends.onnxruntime.settings import Settings

# ONNX Runtime's quantizers and their bit class. NONE: the fp32 export as is (ONNX Runtime's own full-precision
# check against torch). BLOCK_*: weight-only blockwise MatMulNBits (RTN); this onnxruntime's blockwise quantizer
# accepts bits 2, 4 and 8 only ("Only support 2, 4 or 8 bits quantization"); its k-quant algorithm fails on
# SmolLM2's 576-wide rows (a reshape error inside onnxruntime 1.31), so it is not offered.
ORT_FORMATS: dict[str, int] = {
    "NONE": 32, "DYNAMIC_INT8": 8, "QDQ_INT8": 8, "BLOCK_INT8": 8, "BLOCK_INT4": 4, "BLOCK_INT2": 2, "HQQ_INT4": 4,
}  # fmt: skip


INFO = BackendInfo(
    # peak memory (bitsweep.planning): ORT's quantizers copy the fp32 protobuf several times (peak 3.1 GB measured on SmolLM2-135M)
    quantize_footprint=Footprint(400, 24.0),
    evaluate_footprint=Footprint(700, 8.0),
    name="onnxruntime",
    one_core_quantizer=True,  # ONNX Runtime's quantizers, calibration included: 1.0-1.2 cores
    package=__name__,
    settings=Settings,
    source_format=ONNX,
    type_key="format",
    type_bits=ORT_FORMATS,
    options=frozenset(
        {
            "format",
            "block_size",
            "symmetric",
            "accuracy_level",
            "op_types",
            "per_channel",
            "weight_type",
            "activation_type",
            "calibrate_method",
            "exclude",
            "dataset",
        }
    ),
    runner="bitsweep.backends.onnx_family:OnnxRunner",
    unsupported_architectures=ONNX_UNSUPPORTED,
)

"""NNCF weight compression (``compress_weights``) or full INT8 quantization (``quantize``) of the fp32 IR."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bitsweep.backends.base import Applied, BaseQuantizer, QuantizeRequest, copy_side_files
from bitsweep.backends.openvino.runner import MODEL_XML, stateful_inputs


def ir_summary(xml: str | Path) -> dict[str, Any]:
    """What an IR really stores: weight constants by element type (count, elements) and bits per weight.

    Weights are constants of rank >= 2 whose last axis is not 1 (embeddings, projections); scales and zero
    points are counted in the file size but not as parameters, so ``bpw`` = 8 * .bin bytes / weight elements.
    """
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    count: Counter[str] = Counter()
    elements: Counter[str] = Counter()
    for op in model.get_ops():
        if op.get_type_name() != "Constant":
            continue
        shape = list(op.get_output_shape(0))
        # Weights: [rows, cols] or grouped [rows, groups, group_size]; scales/zero points end in a 1.
        if len(shape) < 2 or shape[-1] == 1 or int(np.prod(shape)) < 4096:
            continue
        kind = op.get_output_element_type(0).get_type_name()
        count[kind] += 1
        elements[kind] += int(np.prod(shape))
    return {"weight_types": dict(sorted(count.items())), "elements_by_type": dict(sorted(elements.items()))}


def calibration_dataset(tokenizer_dir: Path, text: Path, n_ctx: int, n_samples: int):
    """NNCF dataset of stateful-model inputs cut from the calibration text (never the evaluation text)."""
    import nncf

    from bitsweep.text import calibration_windows

    return nncf.Dataset(
        [stateful_inputs(w) for w in calibration_windows(tokenizer_dir, text, n_ctx, n_samples)]
    )


class _Capture(logging.Handler):
    """Collects NNCF's log lines (its bit-width distribution table) for the artifact sidecar."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _nncf_kwargs(options: dict[str, Any], dataset) -> dict[str, Any]:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    kwargs: dict[str, Any] = {"mode": nncf.CompressWeightsMode[options["mode"].upper()]}
    for key in ("group_size", "ratio", "all_layers", "awq", "scale_estimation", "gptq", "lora_correction"):
        if options.get(key) is not None:
            kwargs[key] = options[key]
    if options.get("backup_mode"):
        kwargs["backup_mode"] = nncf.BackupMode[options["backup_mode"].upper()]
    if options.get("sensitivity_metric"):
        kwargs["sensitivity_metric"] = nncf.SensitivityMetric[options["sensitivity_metric"].upper()]
    if dataset is not None:
        kwargs["dataset"] = dataset
        kwargs["subset_size"] = options.get("subset_size", 32)
    # SmolLM2's 576-wide rows don't divide by 128: such layers get the largest power-of-two group that fits.
    # NNCF refuses ADJUST for the microscaling formats, whose group size is fixed at 32 (576 = 18 x 32 fits).
    fixed_group = kwargs["mode"].name in ("MXFP4", "MXFP8_E4M3", "NVFP4")
    fallback = GroupSizeFallbackMode.IGNORE if fixed_group else GroupSizeFallbackMode.ADJUST
    kwargs["advanced_parameters"] = AdvancedCompressionParameters(group_size_fallback_mode=fallback)
    return kwargs


class Quantizer(BaseQuantizer):
    name: ClassVar[str] = "openvino"

    def versions(self) -> dict[str, str]:
        import nncf
        import openvino

        return {"openvino": openvino.get_version(), "nncf": nncf.__version__}

    def apply(self, request: QuantizeRequest) -> Applied:
        import nncf
        import openvino as ov

        options, calib = request.scheme.options, request.settings.calibration
        mode = str(options["mode"]).upper()
        dataset = None
        if request.scheme.needs_calibration:
            dataset = calibration_dataset(
                request.src, request.calibration_input(), calib.n_ctx, calib.n_samples
            )
        model = ov.Core().read_model(str(request.src / MODEL_XML))
        capture = _Capture()
        logging.getLogger("nncf").addHandler(capture)
        try:
            if mode == "STATIC_INT8":
                model = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER,
                                      subset_size=options.get("subset_size", 32))  # fmt: skip
            elif mode != "NONE":
                model = nncf.compress_weights(model, **_nncf_kwargs(options, dataset))
        finally:
            logging.getLogger("nncf").removeHandler(capture)
        ov.save_model(model, str(request.out / MODEL_XML), compress_to_fp16=False)
        copy_side_files(request.src, request.out)
        n_params = ir_summary(request.src / MODEL_XML)["elements_by_type"].get("f32", 0)
        bin_bytes = (request.out / "openvino_model.bin").stat().st_size
        return Applied("openvino_model.bin", {
            "mode": mode, **ir_summary(request.out / MODEL_XML), "n_params": n_params,
            "bpw": 8 * bin_bytes / n_params if n_params else None,
            "nncf_log": [line for line in capture.lines if "│" in line or "bitwidth" in line],
        })  # fmt: skip

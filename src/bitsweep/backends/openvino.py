"""OpenVINO: HF -> stateful IR with optimum-intel's exporter, weight compression / quantization with NNCF,
inference on the CPU plugin.

Why optimum-intel's exporter: it gives a stateful IR (KV cache inside the model, so generation speed is real)
from the same transformers version as the reference, and it resolves with the pinned stack (1.27.0). The
converted IR is fp32 (``OVConfig(dtype="fp32")``): compression starts from the reference weights.

The IR's inputs: input_ids, attention_mask, position_ids (int64, [1, n]) and beam_idx (int32, [1]); output:
logits [1, n, V]. The CPU plugin infers in bf16 on CPUs with AMX unless told f32, which we always do.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bitsweep.backends.base import Artifact, QuantizeRequest, base_meta, copy_side_files

log = logging.getLogger(__name__)

MODEL_XML = "openvino_model.xml"


def export_openvino(model_dir: str | Path, out: str | Path, trust_remote_code: bool = False) -> None:
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    main_export(
        str(model_dir), str(out), task="text-generation-with-past", stateful=True, ov_config=OVConfig(dtype="fp32"),
        convert_tokenizer=False, trust_remote_code=trust_remote_code,
    )  # fmt: skip


def compile_model(xml: str | Path, threads: int):
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
    return ov.Core().compile_model(str(xml), "CPU", config)


def stateful_inputs(ids: np.ndarray, past: int = 0) -> dict[str, np.ndarray]:
    n = len(ids)
    return {
        "input_ids": np.asarray(ids, dtype=np.int64)[None],
        "attention_mask": np.ones((1, past + n), dtype=np.int64),
        "position_ids": np.arange(past, past + n, dtype=np.int64)[None],
        "beam_idx": np.zeros(1, dtype=np.int32),
    }


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


class OpenVINOBackend:
    name: ClassVar[str] = "openvino"

    def versions(self) -> dict[str, str]:
        import nncf
        import openvino

        return {"openvino": openvino.get_version(), "nncf": nncf.__version__}

    def quantize(self, request: QuantizeRequest) -> Artifact:
        import nncf
        import openvino as ov

        options, settings = request.scheme.options, request.settings
        mode = str(options["mode"]).upper()
        request.out.mkdir(parents=True, exist_ok=True)
        calib = settings.get("calibration", {})
        dataset = None
        if request.scheme.needs_calibration:
            if request.calib_text is None:
                raise ValueError(f"scheme {request.scheme.variant} needs calibration text")
            dataset = calibration_dataset(request.src, request.calib_text, calib.get("n_ctx", 256),
                                          calib.get("n_samples", 32))  # fmt: skip
        model = ov.Core().read_model(str(request.src / MODEL_XML))
        capture = _Capture()
        logging.getLogger("nncf").addHandler(capture)
        started = time.perf_counter()
        try:
            if mode == "STATIC_INT8":
                model = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER,
                                      subset_size=options.get("subset_size", 32))  # fmt: skip
            elif mode != "NONE":
                model = nncf.compress_weights(model, **_nncf_kwargs(options, dataset))
        finally:
            logging.getLogger("nncf").removeHandler(capture)
        seconds = time.perf_counter() - started
        ov.save_model(model, str(request.out / MODEL_XML), compress_to_fp16=False)
        copy_side_files(request.src, request.out)
        summary = ir_summary(request.out / MODEL_XML)
        n_params = ir_summary(request.src / MODEL_XML)["elements_by_type"].get("f32", 0)
        bin_bytes = (request.out / "openvino_model.bin").stat().st_size
        meta = base_meta(request, self.name, self.versions())
        meta.update(
            model_file="openvino_model.bin",
            mode=mode,
            quantize_seconds=seconds,
            applied={**summary, "n_params": n_params, "bpw": 8 * bin_bytes / n_params if n_params else None,
                     "nncf_log": [line for line in capture.lines if "│" in line or "bitwidth" in line]},
        )  # fmt: skip
        artifact = Artifact(request.out, meta)
        artifact.save()
        return artifact

    def load(self, artifact: Artifact, threads: int, n_ctx: int = 512) -> OpenVINORunner:
        return OpenVINORunner(artifact.path, threads)


class OpenVINORunner:
    def __init__(self, model_dir: str | Path, threads: int) -> None:
        from transformers import AutoTokenizer

        self.request = compile_model(Path(model_dir) / MODEL_XML, threads).create_infer_request()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        self.request.reset_state()
        out = self.request.infer(stateful_inputs(ids))
        return np.array(out["logits"][0], dtype=np.float32)

    def detokenize(self, ids: np.ndarray) -> bytes:
        return self.tokenizer.decode(ids.tolist(), clean_up_tokenization_spaces=False).encode()

    def generate(self, prompt: np.ndarray, n_new: int) -> tuple[float, float]:
        self.request.reset_state()
        started = time.perf_counter()
        out = self.request.infer(stateful_inputs(prompt))
        prompt_done = time.perf_counter()
        past = len(prompt)
        for _ in range(n_new):
            token = int(np.argmax(out["logits"][0, -1]))
            out = self.request.infer(stateful_inputs(np.array([token]), past))
            past += 1
        return prompt_done - started, time.perf_counter() - prompt_done

    def close(self) -> None:
        del self.request

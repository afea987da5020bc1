"""One function per workflow stage: files in, files out. scripts/*.py call these; tests call them directly."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bitsweep.backends import Artifact, QuantizeRequest, get_backend
from bitsweep.config import EvalConfig, ModelConfig, SchemeConfig, TextConfig, TrackingConfig
from bitsweep.evaluate import ReferenceLogits, comparability, evaluate_runner
from bitsweep.manifest import verify_manifest, write_json
from bitsweep.text import Windows, tokenize_windows, write_texts

log = logging.getLogger(__name__)


def download_model(model: ModelConfig, out: Path) -> dict[str, Any]:
    from bitsweep.sources import prepare_model

    return prepare_model(model, out)


def prepare_text(cfg: TextConfig, eval_out: Path, calib_out: Path, info_out: Path) -> None:
    write_json(info_out, {"config": asdict(cfg), **write_texts(cfg, eval_out, calib_out)})


def tokenize_eval(model_dir: Path, eval_text: Path, cfg: EvalConfig, out: Path) -> None:
    verify_manifest(model_dir)
    windows = tokenize_windows(model_dir, eval_text, cfg.n_ctx, cfg.n_windows)
    windows.save(out)
    log.info("%d windows of %d tokens (sha256 %s)", windows.n_windows, windows.n_ctx, windows.digest[:12])


def _result(model: str, backend: str, scheme: str, bits: int, metrics: dict, extra: dict) -> dict[str, Any]:
    return {"model": model, "backend": backend, "scheme": scheme, "bits": bits, "status": "ok",
            "metrics": metrics, **extra}  # fmt: skip


def evaluate_reference(
    model: ModelConfig, model_dir: Path, windows_path: Path, cfg: EvalConfig, out_json: Path, out_logits: Path
) -> dict[str, Any]:
    """The torch fp32 reference: its own scores, and the top-k log-probs every variant is compared to."""
    from bitsweep.backends.torch_ref import TorchRunner

    verify_manifest(model_dir)
    windows = Windows.load(windows_path)
    metrics, ref = evaluate_runner(
        lambda: TorchRunner(model_dir, cfg.threads, model.trust_remote_code), windows, None, cfg, cfg.top_k
    )
    ref.save(out_logits)
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    n_params = _hf_param_count(model_dir)
    metrics |= {"kld": 0.0, "kld_median": 0.0, "kld_p99": 0.0, "kld_max": 0.0, "top1": 1.0,
                "size_bytes": size, "size_mb": size / 2**20, "bpw": 8 * size / n_params}  # fmt: skip
    result = _result(model.name, "reference", "fp32", 32, metrics, {
        "comparability": comparability(windows, out_logits),
        "artifact": {"path": str(model_dir), "n_params": n_params, "runtime": "torch fp32"},
        "config": {"eval": asdict(cfg)},
    })  # fmt: skip
    write_json(out_json, result)
    return result


def _hf_param_count(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(path, "np") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shape = handle.get_slice(key).get_shape()
                total += math.prod(shape)
    return total


def convert_to_gguf(model_dir: Path, out: Path, outtype: str) -> None:
    from bitsweep.backends.llamacpp import convert_hf_to_gguf

    verify_manifest(model_dir)
    convert_hf_to_gguf(model_dir, out, outtype)


def convert_to_openvino(model: ModelConfig, model_dir: Path, windows_path: Path, out: Path) -> dict[str, Any]:
    """HF -> stateful fp32 IR; records the IR's max |logit - torch logit| on the first evaluation window."""
    from bitsweep.backends.openvino import OpenVINORunner, export_openvino

    verify_manifest(model_dir)
    export_openvino(model_dir, out, model.trust_remote_code)
    return check_conversion(model, model_dir, windows_path, lambda: OpenVINORunner(out, threads=2), out)


def convert_to_onnx(model: ModelConfig, model_dir: Path, windows_path: Path, out: Path) -> dict[str, Any]:
    """HF -> ONNX (KV cache in/out, fp32); records max |logit - torch logit| on the first evaluation window."""
    from bitsweep.backends.onnx import OnnxRunner, export_onnx

    verify_manifest(model_dir)
    export_onnx(model_dir, out, model.trust_remote_code)
    return check_conversion(model, model_dir, windows_path, lambda: OnnxRunner(out, threads=2), out)


def convert_to_mlx(
    model: ModelConfig, model_dir: Path, windows_path: Path, out: Path, dtype: str = "float32"
) -> dict[str, Any]:
    """HF -> MLX (mlx-lm's converter, ``dtype``); records max |logit - torch logit| on the first window."""
    from bitsweep.backends.mlx import MLXRunner, export_mlx

    verify_manifest(model_dir)
    export_mlx(model_dir, out, dtype, model.trust_remote_code)
    return check_conversion(model, model_dir, windows_path, lambda: MLXRunner(out, threads=2), out)


def check_conversion(model: ModelConfig, model_dir: Path, windows_path: Path, make_runner, out: Path) -> dict:
    """A converted full-precision model must agree with torch: max |logit diff| on window 0 -> conversion.json."""
    from bitsweep.backends.torch_ref import TorchRunner

    ids = Windows.load(windows_path).ids[0]
    torch_logits = TorchRunner(model_dir, threads=2, trust_remote_code=model.trust_remote_code).logits(ids)
    runner = make_runner()
    try:
        check = {"max_abs_logit_diff_vs_torch": float(abs(runner.logits(ids) - torch_logits).max()),
                 "tokens": len(ids)}  # fmt: skip
    finally:
        runner.close()
    write_json(out / "conversion.json", check)
    log.info("%s vs torch on window 0: max |diff| %.2e", out.name, check["max_abs_logit_diff_vs_torch"])
    return check


def compute_imatrix(model: Path, calib_text: Path, out: Path, settings: dict[str, Any]) -> None:
    from bitsweep.backends.llamacpp import compute_imatrix as run

    run(model, calib_text, out, settings)


def quantize(
    src: Path,
    scheme: SchemeConfig,
    settings: dict[str, Any],
    out: Path,
    imatrix: Path | None = None,
    calib_text: Path | None = None,
) -> Artifact:
    backend = get_backend(scheme.backend)
    request = QuantizeRequest(src, scheme, settings, out, imatrix=imatrix, calib_text=calib_text)
    artifact = backend.quantize(request)
    log.info("quantized %s: %s", scheme.variant, artifact.meta.get("applied", {}).get("tensor_types"))
    return artifact


def evaluate_variant(
    model: str, artifact_dir: Path, windows_path: Path, reference_path: Path, cfg: EvalConfig, out_json: Path
) -> dict[str, Any]:
    artifact = Artifact.load(artifact_dir)
    backend = get_backend(artifact.meta["backend"])
    windows = Windows.load(windows_path)
    reference = ReferenceLogits.load(reference_path)
    metrics, _ = evaluate_runner(
        lambda: backend.load(artifact, threads=cfg.threads, n_ctx=windows.n_ctx), windows, reference, cfg
    )
    size = artifact.model_file.stat().st_size
    applied = artifact.meta.get("applied", {})
    metrics |= {"size_bytes": size, "size_mb": size / 2**20, "bpw": applied.get("bpw", float("nan"))}
    result = _result(model, artifact.meta["backend"], artifact.meta["scheme"], artifact.meta["bits"], metrics, {
        "comparability": comparability(windows, reference_path),
        "artifact": artifact.meta,
        "config": {"eval": asdict(cfg)},
        "evaluated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })  # fmt: skip
    write_json(out_json, result)
    return result


def profile_on_aihub(artifact_dir: Path, settings: dict[str, Any], out: Path) -> dict[str, Any]:
    """Qualcomm AI Hub compile + profile of one QNN variant (or its 'skipped' record without a token)."""
    from bitsweep.backends.qnn import profile_on_aihub as run

    record = run(artifact_dir, settings)
    write_json(out, record)
    return record


def init_tracking(tracking: TrackingConfig, experiment: str, out: Path) -> dict[str, Any]:
    from bitsweep.tracking import init_tracking as run

    return run(tracking, experiment, out)


def log_variant(
    tracking: Path,
    result: Path,
    params: dict[str, Any],
    out: Path,
    logs: list[Path] = (),
    device_profile: Path | None = None,
) -> dict:
    from bitsweep.tracking import log_variant as run

    return run(tracking, result, list(logs), params, out, device_profile)


def screenshot_mlflow(tracking: Path, out: Path) -> dict[str, Any]:
    """PNG of the MLflow UI's run comparison for the sweep in ``tracking`` (headless Chromium)."""
    from bitsweep.screenshot import screenshot_mlflow as run

    return run(tracking, out)


def aggregate_results(results: list[Path], out_dir: Path) -> None:
    from bitsweep.report import aggregate_results as run

    run(results, out_dir)

"""One function per workflow stage: files in, files out. scripts/run_stage.py calls these (every rule runs one);
tests call them directly. No stage knows a backend by name: each asks the backend registry."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bitsweep.backends import (
    Artifact,
    QuantizeRequest,
    backend_info,
    format_info,
    get_quantizer,
    runner_class,
)
from bitsweep.backends.base import load_object
from bitsweep.config import EvalConfig, ModelConfig, SchemeConfig, TextConfig, TrackingConfig
from bitsweep.evaluate import Reference, comparability, evaluate_runner
from bitsweep.manifest import verify_manifest, write_json
from bitsweep.text import Windows, tokenize_windows, write_texts

log = logging.getLogger(__name__)


def download_model(model: ModelConfig, out: Path) -> dict[str, Any]:
    from bitsweep.sources import prepare_model

    return prepare_model(model, out)


def prepare_text(cfg: TextConfig, eval_out: Path, calib_out: Path, info_out: Path) -> None:
    write_json(info_out, {"config": asdict(cfg), **write_texts(cfg, eval_out, calib_out)})


def tokenize_eval(model_dir: Path, eval_text: Path, n_ctx: int, n_windows: int, out: Path) -> None:
    verify_manifest(model_dir)
    windows = tokenize_windows(model_dir, eval_text, n_ctx, n_windows)
    windows.save(out)
    log.info("%d windows of %d tokens (sha256 %s)", windows.n_windows, windows.n_ctx, windows.digest[:12])


def _result(model: str, backend: str, scheme: str, bits: int, metrics: dict, extra: dict) -> dict[str, Any]:
    return {"model": model, "backend": backend, "scheme": scheme, "bits": bits, "status": "ok",
            "metrics": metrics, **extra}  # fmt: skip


def evaluate_reference(
    model: ModelConfig,
    model_dir: Path,
    windows_path: Path,
    cfg: EvalConfig,
    out_json: Path,
    out_reference: Path,
    threads: int = 2,
) -> dict[str, Any]:
    """The torch fp32 reference: its own scores, and the 16-bit full-vocabulary log-probs of every scored
    position that every variant is compared to (``out_reference``, a folder)."""
    from transformers import AutoTokenizer

    from bitsweep.backends.torch_ref import TorchRunner
    from bitsweep.evaluate import TOKENIZER

    verify_manifest(model_dir)
    windows = Windows.load(windows_path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_reference / TOKENIZER)
    metrics, per_window = evaluate_runner(
        lambda: TorchRunner(model_dir, threads, windows.n_ctx, trust_remote_code=model.trust_remote_code),
        windows, None, cfg, keep=out_reference,
    )  # fmt: skip
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    n_params = _hf_param_count(model_dir)
    metrics |= {"kld": 0.0, "kld_median": 0.0, "kld_p99": 0.0, "kld_max": 0.0, "top1": 1.0, "threads": threads,
                "kld_llamacpp": 0.0, "top1_llamacpp": 1.0, "ppl_ratio": 1.0,
                "greedy_prefix_match": 1.0, "greedy_token_match": 1.0,
                "size_bytes": size, "size_mb": size / 2**20, "bpw": 8 * size / n_params,
                "reference_bytes": sum(p.stat().st_size for p in out_reference.rglob("*") if p.is_file())}  # fmt: skip
    result = _result(model.name, "reference", "fp32", 32, metrics, {
        "per_window": per_window,
        "comparability": comparability(windows, out_reference),
        "artifact": {"path": str(model_dir), "n_params": n_params, "runtime": "torch fp32"},
        "config": {"eval": asdict(cfg)},
        "evaluated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
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


def convert(format: str, model: ModelConfig, model_dir: Path, out: Path, options: dict[str, Any]) -> None:
    """HF -> ``format`` (gguf, onnx, openvino, mlx: the converter of the format's FormatInfo)."""
    fmt = format_info(format)
    verify_manifest(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    load_object(fmt.converter)(model_dir, out, options, model.trust_remote_code)


def check_conversion(
    format: str, model: ModelConfig, model_dir: Path, converted: Path, windows_path: Path, out: Path,
    threads: int = 2,
) -> dict[str, Any]:  # fmt: skip
    """A converted full-precision model must agree with torch: max |logit diff| on the first window."""
    from bitsweep.backends.torch_ref import TorchRunner

    ids = Windows.load(windows_path).ids[0]
    with TorchRunner(model_dir, threads, trust_remote_code=model.trust_remote_code) as torch_runner:
        torch_logits = torch_runner.logits(ids)
    with load_object(format_info(format).runner)(converted, threads, len(ids)) as runner:
        diff = float(abs(runner.logits(ids) - torch_logits).max())
    check = {"format": format, "max_abs_logit_diff_vs_torch": diff, "tokens": len(ids)}
    write_json(out, check)
    log.info("%s vs torch on window 0: max |diff| %.2e", converted.name, diff)
    return check


def prepare_calibration(backend: str, src: Path, calib_text: Path, settings: dict[str, Any], out: Path,
                        threads: int = 2) -> None:  # fmt: skip
    """A backend's own calibration artifact (llama.cpp: the importance matrix) from the calibration text."""
    info = backend_info(backend)
    info.load("calibrate:calibrate")(src, calib_text, out, info.parse_settings(settings), threads)


def quantize(
    src: Path, scheme: SchemeConfig, settings: dict[str, Any], out: Path, threads: int = 2,
    calibration: Path | None = None,
) -> Artifact:  # fmt: skip
    info = backend_info(scheme.backend)
    request = QuantizeRequest(src, scheme, info.parse_settings(settings), out, calibration, threads)
    artifact = get_quantizer(scheme.backend).quantize(request)
    log.info("quantized %s in %.1f s", scheme.variant, artifact.meta["quantize_seconds"])
    return artifact


def evaluate_variant(
    model: str, artifact_dir: Path, windows_path: Path, reference_path: Path, cfg: EvalConfig, out_json: Path,
    threads: int = 2,
) -> dict[str, Any]:  # fmt: skip
    artifact = Artifact.load(artifact_dir)
    runner = runner_class(artifact.meta["backend"])
    windows = Windows.load(windows_path)
    reference = Reference.load(reference_path)
    metrics, per_window = evaluate_runner(
        lambda: runner(artifact.path, threads, windows.n_ctx), windows, reference, cfg
    )
    size = artifact.model_file.stat().st_size
    applied = artifact.meta.get("applied", {})
    metrics |= {"size_bytes": size, "size_mb": size / 2**20, "bpw": applied.get("bpw", float("nan")),
                "threads": threads}  # fmt: skip
    result = _result(model, artifact.meta["backend"], artifact.meta["scheme"], artifact.meta["bits"], metrics, {
        "per_window": per_window,
        "comparability": comparability(windows, reference_path),
        "artifact": artifact.meta,
        "config": {"eval": asdict(cfg)},
        "evaluated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })  # fmt: skip
    write_json(out_json, result)
    return result


def profile_on_device(
    backend: str, artifact_dir: Path, settings: dict[str, Any], out: Path
) -> dict[str, Any]:
    """A backend's hosted-device profile of one variant (QNN: Qualcomm AI Hub compile + profile)."""
    info = backend_info(backend)
    record = load_object(info.device_profiler)(artifact_dir, info.parse_settings(settings))
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

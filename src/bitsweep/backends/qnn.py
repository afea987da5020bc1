"""Qualcomm QNN: QNN-ready QDQ ONNX models made with onnxruntime's QNN tooling, evaluated here on the CPU
execution provider (the QDQ pairs simulate the integer arithmetic), and Qualcomm AI Hub compile + profile jobs
for a real device when the user has an API token.

The recipe is the one onnxruntime prescribes for its QNN execution provider: ``qnn_preprocess_model`` (fuses
what QNN runs as one op), then ``get_qnn_qdq_config`` (per-op quantization overrides QNN's HTP needs) with
calibration windows, then ``quantize``. Weight x activation types: w8a8, w8a16, w4a16, w16a16; 16-bit types
and int4 weights need opset 21, to which the graph is converted first.

The causal-mask subgraph (the forward cone of ``attention_mask`` up to each Softmax) stays float: it holds the
most negative float, and any 8/16-bit range that includes it flattens the attention scores. On a device those
nodes fall back to the CPU; the artifact lists them.
"""

from __future__ import annotations

import configparser
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from bitsweep.backends.base import Artifact, QuantizeRequest
from bitsweep.backends.onnx import (
    MODEL_ONNX,
    OnnxModelBackend,
    attention_mask_nodes,
    calibration_for,
    finish_artifact,
    matching_nodes,
    prepared_source,
    save_model,
)
from bitsweep.errors import BitsweepError, ConfigError, unknown

log = logging.getLogger(__name__)

# format -> (weight QuantType, activation QuantType) of onnxruntime.quantization
QNN_TYPES: dict[str, tuple[str, str]] = {
    "W8A8": ("QUInt8", "QUInt8"),
    "W8A16": ("QUInt8", "QUInt16"),
    "W4A16": ("QInt4", "QUInt16"),
    "W16A16": ("QUInt16", "QUInt16"),
}
QNN_OPSET = 21  # 16-bit QuantizeLinear/DequantizeLinear and int4 weights


class QnnBackend(OnnxModelBackend):
    name: ClassVar[str] = "qnn"

    def quantize(self, request: QuantizeRequest) -> Artifact:
        import onnx
        from onnx import version_converter
        from onnxruntime.quantization import CalibrationMethod, QuantType, quantize
        from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

        options = request.scheme.options
        fmt = str(options["format"]).upper()
        weight_type, activation_type = QNN_TYPES[fmt]
        request.out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
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
        quantize(preprocessed, request.out / MODEL_ONNX, config)
        preprocessed.unlink(missing_ok=True)
        seconds = time.perf_counter() - started
        extra = {"weight_type": weight_type, "activation_type": activation_type, "float_nodes": float_nodes,
                 "finite_mask_constants": replaced}  # fmt: skip
        return finish_artifact(request, self.name, self.versions(), fmt, seconds, extra)


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


# ---------------------------------------------------------------------------------------------------------
# Qualcomm AI Hub


class AiHubError(BitsweepError):
    """AI Hub is enabled but cannot be used (no token, a failed job)."""


@dataclass(frozen=True)
class AiHubConfig:
    """``backends.qnn.aihub``: compile + profile each QNN variant on a hosted Snapdragon device.

    ``on_missing_token``: ``fail`` stops the workflow before any job runs; ``skip`` writes a 'skipped' record
    per variant (logged to MLflow) and carries on. Static shapes for the compiler: ``seq_len`` new tokens on
    top of ``past_len`` cached ones.
    """

    enabled: bool = False
    device: str = "Samsung Galaxy S24 (Family)"
    target_runtime: str = "qnn_context_binary"
    on_missing_token: str = "fail"
    seq_len: int = 128
    past_len: int = 128
    timeout_s: int = 3600

    RUNTIMES: ClassVar[tuple[str, ...]] = ("qnn_context_binary", "qnn_lib_aarch64_android", "tflite", "onnx",
                                            "precompiled_qnn_onnx")  # fmt: skip
    ON_MISSING: ClassVar[tuple[str, ...]] = ("fail", "skip")

    def __post_init__(self) -> None:
        if self.target_runtime not in self.RUNTIMES:
            raise unknown("AI Hub target runtime", self.target_runtime, self.RUNTIMES)
        if self.on_missing_token not in self.ON_MISSING:
            raise unknown("backends.qnn.aihub.on_missing_token", self.on_missing_token, self.ON_MISSING)
        if self.seq_len < 1 or self.past_len < 1:
            raise ConfigError(
                "backends.qnn.aihub: seq_len and past_len must be >= 1 (QNN needs static shapes)"
            )

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> AiHubConfig:
        from bitsweep.config import from_dict

        return from_dict(cls, settings.get("aihub") or {}, "backends.qnn.aihub")


TOKEN_ENV = "QAIHUB_API_TOKEN"
NO_TOKEN = (
    f"Qualcomm AI Hub is enabled but no API token is configured: set ${TOKEN_ENV}, or run "
    "`qai-hub configure --api_token <token>` (writes ~/.qai_hub/client.ini; $QAIHUB_CLIENT_INI points elsewhere)"
)


def aihub_credentials() -> str | None:
    """Where the AI Hub token comes from ('env' or the client.ini path), or None. Never returns the token."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return "env"
    path = Path(os.path.expanduser(os.environ.get("QAIHUB_CLIENT_INI", "~/.qai_hub/client.ini")))
    parser = configparser.ConfigParser()
    if path.is_file() and parser.read(path) and parser.get("api", "api_token", fallback="").strip():
        return str(path)
    return None


def check_aihub(settings: dict[str, Any]) -> AiHubConfig:
    """Config-time check (no network): a fail-on-missing-token AI Hub setup without a token is a ConfigError."""
    cfg = AiHubConfig.from_settings(settings)
    if cfg.enabled and cfg.on_missing_token == "fail" and aihub_credentials() is None:
        raise ConfigError(NO_TOKEN)
    return cfg


def input_specs(model_path: Path, cfg: AiHubConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Static input shapes for the AI Hub compiler from the graph's symbolic ones.

    Symbolic dims seen in optimum's export: batch_size, sequence_length, past_sequence_length and the sum
    ``past_sequence_length + sequence_length`` (attention_mask).
    """
    import onnx
    from onnx import helper

    dims = {"batch_size": 1, "sequence_length": cfg.seq_len, "past_sequence_length": cfg.past_len}
    model = onnx.load(str(model_path), load_external_data=False)
    specs = {}
    for inp in model.graph.input:
        shape = []
        for d in inp.type.tensor_type.shape.dim:
            if d.dim_param:
                terms = re.split(r"\s*\+\s*", d.dim_param)
                if not all(t in dims for t in terms):
                    raise AiHubError(
                        f"input {inp.name}: cannot make dim {d.dim_param!r} static (known: {list(dims)})"
                    )
                shape.append(sum(dims[t] for t in terms))
            else:
                shape.append(d.dim_value)
        dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type).name
        specs[inp.name] = (tuple(shape), dtype)
    return specs


def compile_options(cfg: AiHubConfig) -> str:
    return f"--target_runtime {cfg.target_runtime}"


def _client():
    import qai_hub

    token = os.environ.get(TOKEN_ENV, "").strip()
    return qai_hub.Client(config=qai_hub.ClientConfig(api_token=token)) if token else qai_hub.Client()


def profile_on_aihub(artifact_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Upload a QNN variant, compile it for the configured device and profile it there.

    Returns the record the workflow stores and MLflow logs: job ids and URLs, on-device latency and memory.
    Without a token: a 'skipped' record (on_missing_token=skip) or AiHubError, before any network call.
    """
    cfg = AiHubConfig.from_settings(settings)
    record: dict[str, Any] = {"device": cfg.device, "target_runtime": cfg.target_runtime}
    if not cfg.enabled:
        return {**record, "status": "disabled"}
    if aihub_credentials() is None:
        if cfg.on_missing_token == "skip":
            log.warning("AI Hub skipped: %s", NO_TOKEN)
            return {**record, "status": "skipped", "reason": NO_TOKEN}
        raise AiHubError(NO_TOKEN)
    import qai_hub

    model_path = Path(artifact_dir) / MODEL_ONNX
    client = _client()
    device = qai_hub.Device(cfg.device)
    compile_job = client.submit_compile_job(
        model=str(model_path), device=device, name=f"bitsweep {artifact_dir.name}",
        input_specs=input_specs(model_path, cfg), options=compile_options(cfg),
    )  # fmt: skip
    record |= {"compile_job_id": compile_job.job_id, "compile_job_url": compile_job.url}
    if not compile_job.wait(timeout=cfg.timeout_s).success:
        raise AiHubError(f"AI Hub compile job {compile_job.url} failed: {compile_job.get_status().message}")
    profile_job = client.submit_profile_job(model=compile_job.get_target_model(), device=device)
    record |= {"profile_job_id": profile_job.job_id, "profile_job_url": profile_job.url}
    if not profile_job.wait(timeout=cfg.timeout_s).success:
        raise AiHubError(f"AI Hub profile job {profile_job.url} failed: {profile_job.get_status().message}")
    summary = profile_job.download_profile()["execution_summary"]
    metrics = {
        "latency_ms": summary["estimated_inference_time"] / 1000,  # reported in microseconds
        "peak_memory_mb": summary["estimated_inference_peak_memory"] / 2**20,  # bytes
    }
    return {**record, "status": "ok", "metrics": metrics}

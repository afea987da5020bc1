"""Qualcomm AI Hub: upload a QNN variant, compile it for a hosted device and profile it there.

Needs an API token ($QAIHUB_API_TOKEN or ``qai-hub configure --api_token ...``); without one the workflow stops
before any job (``on_missing_token: fail``) or records each variant as skipped (``skip``). The token is never
returned, logged or written anywhere by bitsweep.
"""

from __future__ import annotations

import configparser
import logging
import os
import re
from pathlib import Path
from typing import Any

from bitsweep.backends.onnx_family import MODEL_ONNX
from bitsweep.backends.qnn.settings import AiHubConfig, Settings
from bitsweep.errors import BitsweepError, ConfigError

log = logging.getLogger(__name__)


class AiHubError(BitsweepError):
    """AI Hub is enabled but cannot be used (no token, a failed job)."""


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


def check_aihub(cfg: AiHubConfig) -> AiHubConfig:
    """Config-time check (no network): a fail-on-missing-token AI Hub setup without a token is a ConfigError."""
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


def profile_on_aihub(artifact_dir: Path, settings: Settings) -> dict[str, Any]:
    """Upload a QNN variant, compile it for the configured device and profile it there.

    Returns the record the workflow stores and MLflow logs: job ids and URLs, on-device latency and memory.
    Without a token: a 'skipped' record (on_missing_token=skip) or AiHubError, before any network call.
    """
    cfg = settings.aihub
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

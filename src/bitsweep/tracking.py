"""MLflow: one experiment per bitsweep experiment, one parent run per sweep, one child run per variant.

The sqlite store is created once (``init_tracking``) before any variant logs, because two processes creating
a fresh MLflow database at once race on its schema migration. Logging runs after the result JSON is written
and never touches it, so a tracking failure cannot lose results.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bitsweep.config import TrackingConfig
from bitsweep.manifest import read_json, write_json

log = logging.getLogger(__name__)

SECRET_HINTS = ("token", "secret", "password", "api_key", "apikey")


def tracking_uri(cfg: TrackingConfig, root: Path | None = None) -> str:
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(root or Path.cwd()).resolve() / 'mlflow.db'}"


def experiment_name(cfg: TrackingConfig, experiment: str) -> str:
    return cfg.experiment or f"bitsweep-{experiment}"


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; keys that look like credentials are dropped."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            if any(h in str(key).lower() for h in SECRET_HINTS):
                continue
            out |= flatten(value, f"{prefix}{key}.")
    else:
        out[prefix.rstrip(".")] = data
    return out


def _client(uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def init_tracking(cfg: TrackingConfig, experiment: str, out: Path) -> dict[str, Any]:
    """Create (or reuse) the MLflow experiment and this sweep's parent run; write their ids to ``out``."""
    if not cfg.enabled:
        write_json(out, {"enabled": False})
        return {"enabled": False}
    uri = tracking_uri(cfg)
    client = _client(uri)
    name = experiment_name(cfg, experiment)
    found = client.get_experiment_by_name(name)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        location = (Path.cwd() / "mlruns").resolve().as_uri() if uri.startswith("sqlite") else None
        experiment_id = client.create_experiment(name, artifact_location=location)
    parent = client.create_run(
        experiment_id, run_name=f"sweep-{experiment}", tags={"bitsweep.role": "sweep", "bitsweep.experiment": experiment,
                                                            "git.commit": git_commit() or "unknown"}
    )  # fmt: skip
    client.set_terminated(parent.info.run_id)
    info = {"enabled": True, "uri": uri, "experiment": name, "experiment_id": experiment_id,
            "parent_run_id": parent.info.run_id}  # fmt: skip
    write_json(out, info)
    log.info("MLflow experiment %r (%s), parent run %s at %s", name, experiment_id, parent.info.run_id, uri)
    return info


def log_variant(
    tracking: Path,
    result: Path,
    logs: list[Path],
    params: dict[str, Any],
    out: Path,
    device_profile: Path | None = None,
) -> dict[str, Any]:
    """One child run for one evaluated variant; an earlier run of the same variant in this sweep is replaced.

    ``device_profile``: an on-device record (Qualcomm AI Hub) whose metrics are logged as ``aihub.*`` and
    whose job ids/links and status become ``aihub.*`` tags.
    """
    info = read_json(tracking)
    if not info.get("enabled"):
        write_json(out, {"enabled": False})
        return {"enabled": False}
    data = read_json(result)
    variant = f"{data['backend']}/{data['scheme']}"
    client = _client(info["uri"])
    for old in client.search_runs(
        [info["experiment_id"]],
        filter_string=f"tags.mlflow.parentRunId = '{info['parent_run_id']}' and tags.`bitsweep.variant` = '{variant}'",
    ):
        client.delete_run(old.info.run_id)
    versions = data.get("artifact", {}).get("versions", {})
    tags = {
        "mlflow.parentRunId": info["parent_run_id"],
        "bitsweep.variant": variant,
        "bitsweep.backend": data["backend"],
        "bitsweep.model": data["model"],
        "git.commit": git_commit() or "unknown",
        "host.cpu": cpu_name(),
        "host.python": platform.python_version(),
        **{f"version.{k}": str(v) for k, v in versions.items()},
    }
    run = client.create_run(info["experiment_id"], run_name=variant, tags=tags)
    run_id = run.info.run_id
    try:
        flat = flatten({"scheme": data["scheme"], "bits": data["bits"], **params})
        _log_params(client, run_id, flat)
        metrics = {k: float(v) for k, v in data["metrics"].items() if isinstance(v, (int, float))}
        if device_profile is not None:
            profile = read_json(device_profile)
            metrics |= {f"aihub.{k}": float(v) for k, v in (profile.get("metrics") or {}).items()}
            for key, value in profile.items():
                if key != "metrics":
                    client.set_tag(run_id, f"aihub.{key}", str(value)[:5000])
        _log_metrics(client, run_id, metrics)
        client.log_artifact(run_id, str(result))
        for path in logs:
            if Path(path).is_file():
                client.log_artifact(run_id, str(path), artifact_path="logs")
        client.set_terminated(run_id)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    record = {**info, "run_id": run_id}
    write_json(out, record)
    return record


def _log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def _log_metrics(client, run_id: str, metrics: dict[str, float]) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in sorted(metrics.items())])

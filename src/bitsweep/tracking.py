"""MLflow: one experiment per bitsweep experiment, one parent run per sweep, one child run per variant.

The sqlite store is created once (``init_tracking``) before any variant logs, because two processes creating
a fresh MLflow database at once race on its schema migration. Logging runs after the result JSON is written
and never touches it, so a tracking failure cannot lose results.
"""

from __future__ import annotations

import base64
import http.client
import logging
import os
import platform
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from bitsweep.errors import ConfigError
from bitsweep.manifest import read_json, write_json

if TYPE_CHECKING:  # config.py's preflight calls check_tracking_reachable: no import back at run time
    from bitsweep.config import TrackingConfig

log = logging.getLogger(__name__)

SECRET_HINTS = ("token", "secret", "password", "api_key", "apikey")


def tracking_uri(cfg: TrackingConfig, root: Path | None = None) -> str:
    """The URI MLflow will use: ``cfg.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlflow.db``.

    >>> from bitsweep.config import TrackingConfig
    >>> tracking_uri(TrackingConfig(uri="http://127.0.0.1:5000"))
    'http://127.0.0.1:5000'
    """
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(root or Path.cwd()).resolve() / 'mlflow.db'}"


def check_tracking_reachable(uri: str | None, timeout: float = 3.0) -> None:
    """Raise ConfigError (one line) unless the MLflow server at an http(s) ``uri`` answers ``GET /health``.

    A preflight probe, so that a server that is not running is reported at once instead of after MLflow's
    minutes of retries. Other URIs (sqlite, file, postgresql, ...) and None are not probed. The probe sends
    the credentials the MLflow client would send (an auth proxy in front of the server lets it through);
    they are never shown.

    >>> check_tracking_reachable("sqlite:///mlflow.db")  # not a server: nothing to probe
    """
    parts = urlsplit(uri or "")
    if parts.scheme not in ("http", "https"):
        return
    host = parts.netloc.rpartition("@")[2]  # without user:password
    health = urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health", "", ""))
    request = urllib.request.Request(health)
    if authorization := _authorization(parts):
        request.add_unredirected_header("Authorization", authorization)  # not forwarded to a redirect target
    if problem := _probe(request, timeout):
        shown = urlunsplit((parts.scheme, host, parts.path, "", ""))
        raise ConfigError(
            f"MLflow tracking server {shown} does not answer ({problem}); start it "
            "(README, Results: `mlflow server ...`) or use tracking=local"
        )


def _authorization(parts: SplitResult) -> str | None:
    """What MLflow's REST client sends: $MLFLOW_TRACKING_USERNAME/PASSWORD, else user:password in the URI
    (requests takes those), else $MLFLOW_TRACKING_TOKEN."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not (user and password) and parts.username:
        user, password = unquote(parts.username), unquote(parts.password or "")
    if user and password is not None:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return f"Bearer {token}" if token else None


def _probe(request: urllib.request.Request, timeout: float) -> str | None:
    """None when the request is answered with 2xx, else a few words saying what went wrong."""
    context = None
    if request.type == "https":  # the TLS settings the MLflow client itself reads
        cafile = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None
        try:
            context = ssl.create_default_context(cafile=cafile)
        except OSError as err:
            return f"MLFLOW_TRACKING_SERVER_CERT_PATH {cafile}: {_reason(err, timeout)}"
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context):
            return None
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code} from /health"
    except urllib.error.URLError as err:
        return _reason(err.reason, timeout)
    except (OSError, ValueError, http.client.HTTPException) as err:  # a timeout while reading, a bad port
        return _reason(err, timeout)


def _reason(err: object, timeout: float) -> str:
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(err, socket.gaierror):
        return "unknown host"
    return " ".join(str(getattr(err, "strerror", None) or err).split()) or type(err).__name__


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
    # a re-logged variant replaces its earlier run; the same scheme of another model of the sweep is another run
    for old in client.search_runs(
        [info["experiment_id"]],
        filter_string=f"tags.mlflow.parentRunId = '{info['parent_run_id']}' and tags.`bitsweep.variant` = '{variant}'"
        f" and tags.`bitsweep.model` = '{data['model']}'",
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
        # how the speed was measured and, when it is not clean, why (bitsweep.evaluate.speed_flag)
        **{f"bitsweep.{k}": str(v)[:5000] for k, v in data["metrics"].items() if isinstance(v, str) and v},
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

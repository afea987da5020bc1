"""Everything checked on this machine before any job runs, in one place (the workflow calls
:func:`check_before_run` when it composes the experiment; the rules never repeat these checks).

The configuration itself is checked where it is built (bitsweep.config, each backend's settings and capability
data); this module checks what depends on the machine: files the experiment names, the results folder, each
swept backend's own needs (AI Hub's token) and a tracking server that must answer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bitsweep.backends import backend_info
from bitsweep.config import ExperimentConfig
from bitsweep.errors import ConfigError


def check_before_run(exp: ExperimentConfig, results_dir: str | Path) -> None:
    check_paths(exp)
    check_writable(Path(results_dir))
    for backend in exp.swept_backends():
        backend_info(backend).preflight(exp.backends[backend])
    if exp.tracking.enabled:
        from bitsweep.tracking import check_tracking_reachable, tracking_uri

        check_tracking_reachable(tracking_uri(exp.tracking))


def check_paths(exp: ExperimentConfig) -> None:
    """Files the experiment names must exist before any job runs."""
    source = exp.model.source
    named = {"model.source.path": source.path if source.kind == "local" else None,
             "eval.text.path": exp.eval.text.path, "eval.text.calib_path": exp.eval.text.calib_path}  # fmt: skip
    named |= {f"eval.task_paths[{i}]": path for i, path in enumerate(exp.eval.task_paths)}
    for key, path in named.items():
        if path is not None and not Path(path).expanduser().exists():
            raise ConfigError(f"{key}: {path} does not exist")


def check_writable(folder: Path) -> None:
    """Create ``folder`` and a file in it, or fail with one line (a permission check alone misleads root)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"results folder {folder} cannot be written: {err.strerror or err}") from None

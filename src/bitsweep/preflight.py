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
from bitsweep.planning import machine_memory_mb, memory_plan, over_limit, summary
from bitsweep.sources import COMMIT_RE


def check_before_run(
    exp: ExperimentConfig, results_dir: str | Path, max_mem_mb: int | None = None, dry_run: bool = False,
    models_dir: Path = Path("data/models"),
) -> list[str]:  # fmt: skip
    """Raise a ConfigError for what would fail; return lines to show the user (warnings, the memory plan).

    On a dry run what a real run refuses for lack of a token or of memory is reported instead, so the plan
    of a sweep meant for another machine can be read here."""
    check_paths(exp)
    check_writable(Path(results_dir))
    for backend in exp.swept_backends():
        backend_info(backend).preflight(exp.backends[backend])
    if exp.tracking.enabled:
        from bitsweep.tracking import check_tracking_reachable, tracking_uri

        check_tracking_reachable(tracking_uri(exp.tracking))
    notes = unpinned(exp)
    plan = memory_plan(exp)
    refused = missing_tokens(exp, models_dir) + over_limit(plan, max_mem_mb or machine_memory_mb())
    if refused and not dry_run:
        raise ConfigError("; ".join(refused))
    if dry_run:
        notes += [f"a real run would stop: {line}" for line in refused] + summary(exp, plan)
    return notes


def unpinned(exp: ExperimentConfig) -> list[str]:
    return [f"model {m.name}: revision {m.source.revision!r} is not a commit hash: the download is not pinned"
            for m in exp.models if m.source.kind == "hf" and not COMMIT_RE.match(m.source.revision or "")]  # fmt: skip


def missing_tokens(exp: ExperimentConfig, models_dir: Path) -> list[str]:
    """A gated hub model not downloaded yet needs a token (HF_TOKEN, or `hf auth login`'s stored one)."""
    from huggingface_hub import get_token

    waiting = [m for m in exp.models if m.gated and m.source.kind == "hf"
               and not (models_dir / m.name / "manifest.sha256").is_file()]  # fmt: skip
    if not waiting or get_token():
        return []
    return [f"model {m.name} ({m.source.repo_id}) is gated: accept its license on the hub page, then set HF_TOKEN "
            "or run `hf auth login`" for m in waiting]  # fmt: skip


def check_paths(exp: ExperimentConfig) -> None:
    """Files the experiment names must exist before any job runs."""
    named = {f"model {m.name}: source.path": m.source.path for m in exp.models if m.source.kind == "local"}
    named |= {"eval.text.path": exp.eval.text.path, "eval.text.calib_path": exp.eval.text.calib_path}
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

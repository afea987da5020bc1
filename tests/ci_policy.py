"""Under CI a skipped test fails the run, unless its node id is on ALLOWED_SKIPS.

A skip in CI means a part of the suite did not run although CI installs everything (chromium, root for the
SLURM cluster, numba, every framework): a swallowed install failure would otherwise leave CI green. Skips at
collection (``pytest.importorskip`` at module level) and in fixtures count too; xfail does not.
tests/conftest.py registers ``SkipPolicy`` when ``$CI`` is ``true`` or ``1``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from fnmatch import fnmatchcase

import pytest

# fnmatch pattern on the node id -> why that test may skip in CI. Keep it short; every entry needs a reason.
# Example: "tests/test_mlx.py::*": "MLX has no Linux aarch64 wheel"
ALLOWED_SKIPS: dict[str, str] = {}


def ci_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """``CI=true`` (GitHub Actions, GitLab, ``.ci/run``) or ``CI=1``."""
    return environ.get("CI", "").strip().lower() in ("true", "1")


def skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    """The message given to ``pytest.skip`` / ``importorskip`` / ``skipif``, without pytest's prefix."""
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return str(text).removeprefix("Skipped: ")


class SkipPolicy:
    """A pytest plugin: records the skips that are not allowed and fails the session if there are any."""

    def __init__(self, allowed: Mapping[str, str] = ALLOWED_SKIPS) -> None:
        self.allowed = allowed
        self.skipped: list[tuple[str, str]] = []  # (node id, reason)

    def is_allowed(self, nodeid: str) -> bool:
        return any(fnmatchcase(nodeid, pattern) for pattern in self.allowed)

    def _record(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail") and not self.is_allowed(report.nodeid):
            self.skipped.append((report.nodeid or ".", skip_reason(report)))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._record(report)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._record(report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        # Runs before the terminal summary, so the summary below and the exit status agree.
        if self.skipped and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.skipped:
            return
        terminalreporter.section("skipped under CI", sep="=", red=True, bold=True)
        terminalreporter.line(
            f"CI: {len(self.skipped)} skipped test(s) not on ALLOWED_SKIPS in tests/ci_policy.py fail the run "
            "(install what they need, or allow-list them with a reason):",
            red=True,
        )
        for nodeid, reason in self.skipped:
            terminalreporter.line(f"SKIPPED {nodeid}: {reason}")

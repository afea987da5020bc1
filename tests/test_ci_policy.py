"""The CI skip policy (tests/ci_policy.py), run through the real tests/conftest.py in a pytest subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ci_policy import ALLOWED_SKIPS, SkipPolicy, ci_enabled

TESTS = Path(__file__).resolve().parent

SAMPLE = """
import pytest


def test_runs():
    pass


def test_needs_chromium():
    pytest.skip("chromium is not installed")


@pytest.mark.xfail(reason="a known bug", strict=True)
def test_known_bug():
    raise AssertionError
"""

MISSING = """
import pytest

pytest.importorskip("no_such_module_bitsweep")


def test_never_runs():
    pass
"""


def run_suite(folder: Path, ci: str | None) -> subprocess.CompletedProcess:
    """pytest on two sample test files with a copy of tests/conftest.py, CI set to ``ci`` (None: unset)."""
    files = {"pytest.ini": "[pytest]\n", "conftest.py": (TESTS / "conftest.py").read_text(),
             "test_sample.py": SAMPLE, "test_missing.py": MISSING}  # fmt: skip
    for name, text in files.items():
        (folder / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS.parent), env.get("PYTHONPATH")]))
    if ci is not None:
        env["CI"] = ci
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(folder)]
    return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_under_ci_an_unlisted_skip_fails_the_run_and_is_named_with_its_reason(tmp_path, ci):
    proc = run_suite(tmp_path, ci)
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, out
    assert "1 passed, 2 skipped, 1 xfailed" in out  # the rest of the suite still ran
    section = out[out.index("skipped under CI") :]
    assert "SKIPPED test_sample.py::test_needs_chromium: chromium is not installed" in section
    assert "SKIPPED test_missing.py: could not import 'no_such_module_bitsweep'" in section  # importorskip
    assert "test_known_bug" not in section  # an xfail is not a skip


@pytest.mark.parametrize("ci", [None, "false", ""])
def test_outside_ci_a_skip_does_not_fail_the_run(tmp_path, ci):
    proc = run_suite(tmp_path, ci)
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.OK, out
    assert "1 passed, 2 skipped, 1 xfailed" in out
    assert "skipped under CI" not in out


def skip_report(nodeid: str, reason: str) -> pytest.TestReport:
    path = nodeid.split("::")[0]
    longrepr = (path, 2, f"Skipped: {reason}")
    return pytest.TestReport(nodeid, (path, 1, nodeid), {}, "skipped", longrepr, "setup")


def test_an_allow_listed_skip_passes_and_others_are_recorded():
    policy = SkipPolicy({"tests/test_mlx.py::*": "no MLX wheel on this platform"})
    policy.pytest_runtest_logreport(skip_report("tests/test_mlx.py::test_a", "no mlx"))
    policy.pytest_runtest_logreport(skip_report("tests/test_onnx.py::test_b", "no onnxruntime"))
    assert policy.skipped == [("tests/test_onnx.py::test_b", "no onnxruntime")]


@pytest.mark.parametrize(("value", "on"), [("true", True), ("TRUE", True), ("1", True), ("false", False),
                                            ("0", False), ("", False), (None, False)])  # fmt: skip
def test_ci_is_on_for_true_or_1(value, on):
    assert ci_enabled({} if value is None else {"CI": value}) is on


def test_the_allow_list_is_short_and_says_why_for_each_entry():
    assert len(ALLOWED_SKIPS) <= 5
    assert all(reason.strip() for reason in ALLOWED_SKIPS.values())

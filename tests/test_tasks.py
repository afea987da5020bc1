"""lm-eval tasks through bitsweep's runners: a small offline multiple-choice task (tests/data/tasks) on the tiny
model's real artifacts of five backends, with accuracy and flips against the torch reference."""

from __future__ import annotations

import pytest

from bitsweep.backends.torch_ref import TorchRunner
from bitsweep.tasks import run_tasks, task_metrics

from . import helpers
from .conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp, pytest.mark.openvino, pytest.mark.onnx, pytest.mark.mlx]
TASK = "bitsweep_mc"


def tasks_on(runner, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(ROOT)  # the task's data_files path is relative to the project root
    return run_tasks(runner, tiny_model_dir, [TASK], ["tests/data/tasks"], None)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    with pytest.MonkeyPatch.context() as monkeypatch, TorchRunner(tiny_model_dir, 2) as runner:
        return tasks_on(runner, tiny_model_dir, monkeypatch)


def artifact(backend, tiny_model_dir, tiny_gguf, tmp_path):
    """A real 8-bit (bitnet: 4-bit) artifact of the tiny model for each backend, converted the workflow's way."""
    from bitsweep.backends.mlx.convert import export_mlx
    from bitsweep.backends.onnx_family import export_onnx
    from bitsweep.backends.openvino.convert import export_openvino

    if backend == "llamacpp":
        return helpers.quantize("llamacpp", tiny_gguf, "q8_0", 8, tmp_path / "q", type="Q8_0")
    if backend == "openvino":
        export_openvino(tiny_model_dir, tmp_path / "ir", {})
        return helpers.quantize("openvino", tmp_path / "ir", "int8", 8, tmp_path / "q", mode="INT8_ASYM")
    if backend == "onnxruntime":
        export_onnx(tiny_model_dir, tmp_path / "onnx")
        return helpers.quantize(
            "onnxruntime", tmp_path / "onnx", "int8", 8, tmp_path / "q", format="DYNAMIC_INT8"
        )
    if backend == "mlx":
        export_mlx(tiny_model_dir, tmp_path / "mlx")
        return helpers.quantize(
            "mlx", tmp_path / "mlx", "affine8", 8, tmp_path / "q", mode="AFFINE8", group_size=64
        )
    return helpers.quantize("bitnet", tiny_model_dir, "int4", 4, tmp_path / "q", format="int4", group_size=64)


def test_the_reference_has_no_flips_against_itself(reference):
    metrics = task_metrics(reference, reference)
    assert reference[TASK]["n"] == 24 and 0 <= metrics[f"task.{TASK}.acc"] <= 1
    assert metrics[f"task.{TASK}.flips_right_to_wrong"] == metrics[f"task.{TASK}.flips_wrong_to_right"] == 0
    assert metrics[f"task.{TASK}.acc_lo"] <= metrics[f"task.{TASK}.acc"] <= metrics[f"task.{TASK}.acc_hi"]


@pytest.mark.parametrize("backend", ["llamacpp", "openvino", "onnxruntime", "mlx", "bitnet"])
def test_a_multiple_choice_task_runs_on_every_backend(backend, reference, tiny_model_dir, tiny_gguf, tmp_path,
                                                      monkeypatch):  # fmt: skip
    with helpers.open_runner(artifact(backend, tiny_model_dir, tiny_gguf, tmp_path), n_ctx=128) as runner:
        ours = tasks_on(runner, tiny_model_dir, monkeypatch)
    m = task_metrics(ours, reference)
    assert ours[TASK]["n"] == 24
    # every answer that changed is counted once, on one side: the accuracy moves by exactly their difference
    flips = m[f"task.{TASK}.flips_wrong_to_right"] - m[f"task.{TASK}.flips_right_to_wrong"]
    assert m[f"task.{TASK}.acc_delta"] == pytest.approx(flips)
    changed = sum(a != b for a, b in zip(ours[TASK]["correct"], reference[TASK]["correct"], strict=True)) / 24
    assert m[f"task.{TASK}.flips_wrong_to_right"] + m[f"task.{TASK}.flips_right_to_wrong"] == pytest.approx(
        changed
    )

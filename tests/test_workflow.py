"""End to end: the real Snakefile on the real SmolLM2-135M, a short sweep (tests share one run).

Tests do not depend on their order: each one that needs the finished sweep asks for it (``complete``), and a
test that changes the sweep puts back what it needs itself.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT

# The smoke sweep runs every framework.
pytestmark = [pytest.mark.workflow, pytest.mark.slow, pytest.mark.llamacpp, pytest.mark.openvino,
              pytest.mark.onnx, pytest.mark.mlx]  # fmt: skip

WORKFLOW_FILES = ["Snakefile", "rules", "configs", "scripts", "profiles", "report", "tests/data"]


# Credentials a user may have in the environment: they must never reach a log, a result, a report or MLflow.
SECRETS = {"HF_TOKEN": "hf_bitsweepTestSecret0123456789", "QAIHUB_API_TOKEN": "qaihubTestSecret0123456789"}
# With chromium installed (CI: scripts/install.sh) a sweep ends with the MLflow screenshot (report.screenshot=null),
# which follows every re-logged variant.
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = {"screenshot_mlflow": "1"} if CHROMIUM else {}


def test_ci_runs_the_screenshot_job():
    """Without chromium the sweep drops its screenshot job quietly (a user's choice); CI installs chromium
    (scripts/install.sh), so there a missing chromium is a failed install, not a smaller sweep."""
    from .ci_policy import ci_enabled

    assert CHROMIUM or not ci_enabled(), "CI=true but no chromium: scripts/install.sh could not install it"


# The backends of the smoke sweep, and overrides that leave only llama.cpp in it (the short SLURM run).
SWEPT = ("llamacpp", "openvino", "bitnet", "onnxruntime", "olive", "qnn", "mlx")
ONLY_LLAMACPP = [f"sweep.{b}=[]" for b in SWEPT if b != "llamacpp"]


def snakemake(
    workdir: Path, *args: str, config: tuple[str, ...] = (), secrets: dict[str, str] = SECRETS,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:  # fmt: skip
    cmd = [str(Path(sys.executable).parent / "snakemake"), *args, "--config", "experiment=smoke", *config]
    # MLflow's set_tracking_uri exports MLFLOW_TRACKING_URI to this process's environment; tests in the same
    # session must not send the workflow to their stores.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, **secrets, **(env or {})}
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, check=False, env=env)


def complete(workdir: Path) -> Path:
    """The finished smoke sweep: re-runs whatever an earlier test left to redo (nothing, usually: seconds)."""
    proc = snakemake(workdir, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("workflow")
    for name in WORKFLOW_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, workdir / name)
        else:
            shutil.copy2(src, workdir / name)
    proc = snakemake(workdir, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir


def job_counts(out: str) -> dict[str, str]:
    """Snakemake's "Job stats" table (after its "job count" and "----" lines) as {rule: count}."""
    table = out.split("Job stats:")[1].split("\n\n")[0].splitlines()[3:]
    return dict(line.split() for line in table)


def results(workdir: Path) -> dict[str, dict]:
    folder = workdir / "results/smoke/evaluated/smollm2-135m"
    return {f"{p.parent.name}/{p.stem}": json.loads(p.read_text()) for p in folder.glob("*/*.json")}


# Full-vocabulary KLD of every smoke variant as measured on main (Nov 30, AMD EPYC Zen 3; bitnet Dec 2, after its
# exact integer GEMMs; quality numbers are the same on every host so far). A variant more than 25% away in either direction has changed: a quantizer that
# silently stops quantizing reads too low, a broken one too high.
MEASURED_KLD = {
    "llamacpp/q8_0": 0.00414, "llamacpp/q4_k_m": 0.0537, "llamacpp/q2_k": 0.415, "llamacpp/iq2_xxs": 0.424,
    "llamacpp/tq2_0": 11.2, "openvino/int8_asym": 0.00363, "openvino/int4_asym_g128": 0.303,
    "openvino/int4_asym_awq_se": 0.175, "bitnet/int4_g64": 0.299, "bitnet/tq2_0": 15.7,
    "onnxruntime/int4_g32_sym": 0.329, "olive/rtn_int4_g32": 0.329, "qnn/w8a16": 0.0686, "mlx/mxfp4": 1.14,
}  # fmt: skip
MARGIN = 0.25


def test_sweep_produces_sane_comparable_results(sweep):
    rows = results(sweep)
    llamacpp = ("q8_0", "q4_k_m", "q2_k", "iq2_xxs", "tq2_0")
    openvino = ("int8_asym", "int4_asym_g128", "int4_asym_awq_se")
    bitnet = ("int4_g64", "tq2_0")
    onnx_family = ("onnxruntime/int4_g32_sym", "olive/rtn_int4_g32", "qnn/w8a16")
    assert set(rows) == {"reference/fp32", *(f"llamacpp/{s}" for s in llamacpp),
                         *(f"openvino/{s}" for s in openvino), *(f"bitnet/{s}" for s in bitnet),
                         *onnx_family, "mlx/mxfp4"}  # fmt: skip
    m = {k: v["metrics"] for k, v in rows.items()}
    assert 5 < m["reference/fp32"]["ppl"] < 60 and math.isfinite(m["reference/fp32"]["ppl"])
    assert m["llamacpp/q8_0"]["kld"] < m["llamacpp/q4_k_m"]["kld"] < m["llamacpp/q2_k"]["kld"]
    assert m["llamacpp/q8_0"]["top1"] > 0.9
    # OpenVINO: INT8 < INT4, and the data-aware INT4 (AWQ + scale estimation) is no worse than plain INT4.
    assert (
        m["openvino/int8_asym"]["kld"]
        < m["openvino/int4_asym_awq_se"]["kld"]
        <= m["openvino/int4_asym_g128"]["kld"]
    )
    assert rows["openvino/int4_asym_g128"]["artifact"]["applied"]["weight_types"]["u4"] > 100
    # Every conversion (llama.cpp's f32 GGUF, the OpenVINO IR, the ONNX export, the MLX folder) agrees with torch
    # before anything is quantized.
    # llama.cpp keeps its KV cache in f16 by default: its f32 GGUF reads 0.028 from torch (the others ~1e-4)
    for fmt, bound in (("gguf", 0.05), ("openvino", 1e-3), ("onnx", 1e-3), ("mlx", 1e-3)):
        check = json.loads((sweep / f"results/smoke/converted/smollm2-135m/{fmt}.check.json").read_text())
        assert check["max_abs_logit_diff_vs_torch"] < bound, (fmt, check)
    # The ONNX family really quantized (MatMulNBits / QDQ) and stays usable at 4-bit weights / W8A16.
    assert rows["onnxruntime/int4_g32_sym"]["artifact"]["applied"]["quant_ops"]["MatMulNBits"] == 211
    assert (
        rows["olive/rtn_int4_g32"]["artifact"]["applied"]["olive_passes"][-1]
        == "OnnxBlockWiseRtnQuantization"
    )
    assert rows["qnn/w8a16"]["artifact"]["applied"]["quant_ops"]["QuantizeLinear"] > 1000
    for key, kld in MEASURED_KLD.items():
        assert (1 - MARGIN) * kld < m[key]["kld"] < (1 + MARGIN) * kld, (key, m[key]["kld"], kld)
        assert m[key]["kld_lo"] <= m[key]["kld"] <= m[key]["kld_hi"], key
    for key in onnx_family:
        assert m[key]["top1"] > 0.5, (key, m[key])
    assert m["qnn/w8a16"]["kld"] < m["onnxruntime/int4_g32_sym"]["kld"]
    assert rows["mlx/mxfp4"]["artifact"]["applied"]["bpw"] < 6 and math.isfinite(m["mlx/mxfp4"]["ppl"])
    # MLX's CPU backend scores through torch on its own dequantized weights, checked against MLX on every run
    assert m["mlx/mxfp4"]["scoring"] == "torch on mlx-dequantized weights"
    assert m["mlx/mxfp4"]["scoring_check_rel_diff"] < 1e-4
    sizes = [m[f"llamacpp/{s}"]["size_bytes"] for s in ("q8_0", "q4_k_m", "q2_k")]
    assert sizes == sorted(sizes, reverse=True)
    # Every row was scored on the same windows against the same reference.
    assert len({v["comparability"]["windows_sha256"] for v in rows.values()}) == 1
    assert (
        len({v["comparability"]["reference_sha256"] for k, v in rows.items() if k != "reference/fp32"}) == 1
    )
    for key, row in m.items():
        assert row["tg_tok_s"] > 0 and row["peak_rss_mb"] > 0, key
    # IQ2_XXS was quantized with the importance matrix, and the artifact says so.
    assert rows["llamacpp/iq2_xxs"]["artifact"]["calibration_sha256"]
    assert "IQ2_XXS" in rows["llamacpp/iq2_xxs"]["artifact"]["applied"]["tensor_types"]
    source = json.loads((sweep / "data/models/smollm2-135m/source.json").read_text())
    assert source["dequantized_from"] == "Q4_1"
    # Our kernels: 4-bit is usable; post-training ternarisation of a model not trained ternary is not (the
    # finding the issue asks us to report, not hide), and its packed layers really are 2.0625 bits + padding.
    assert m["bitnet/int4_g64"]["kld"] < 0.5 < 5 < m["bitnet/tq2_0"]["kld"]
    assert m["bitnet/int4_g64"]["top1"] > 0.6
    assert rows["bitnet/tq2_0"]["artifact"]["applied"]["nominal_bpw"] == 2.0625
    for key in ("bitnet/int4_g64", "bitnet/tq2_0"):  # the float parts ran on pinned code paths (evaluate_env)
        assert (m[key]["torch_cpu_capability"], m[key]["mkl_cbwr"]) == ("AVX2", "AVX2"), key
        assert m[key]["decode_path"] == "fused", key  # SmolLM2 is a Llama: generation timed on bitnet.decode
    assert (
        m["bitnet/tq2_0"]["size_bytes"]
        < m["bitnet/int4_g64"]["size_bytes"]
        < m["reference/fp32"]["size_bytes"]
    )


@pytest.mark.llamacpp
def test_bitnet_gguf_export_agrees_with_llamacpp_on_smollm2(sweep, tmp_path):
    """Ternary down_proj in the last ten blocks (576-wide rows cannot be TQ blocks; 1536-wide ones can):
    llama.cpp reading our TQ2_0 bytes and our kernels give the same predictions."""
    import numpy as np

    from bitsweep.backends.bitnet.export import cross_check_llamacpp

    from . import helpers

    artifact = helpers.quantize("bitnet", sweep / "data/models/smollm2-135m", "x", 2, tmp_path / "artifact",
                                format="tq2_0", layers=["model.layers.2?.mlp.down_proj"], keep_dtype="float32")  # fmt: skip
    ids = np.load(sweep / "results/smoke/windows/smollm2-135m.npz")["ids"][0][:256]
    f32 = sweep / "results/smoke/converted/smollm2-135m/gguf/model-f32.gguf"
    result = cross_check_llamacpp(artifact.path, f32, [ids], tmp_path / "ours.gguf")
    assert result["export"]["tq_tensors"] == 10
    same_rule = result["ours_int8_block_vs_llamacpp"]
    assert same_rule["kld_mean"] < 5e-3 and same_rule["top1_agreement"] > 0.95, result


def test_report_and_mlflow_runs(sweep):
    from mlflow.tracking import MlflowClient

    complete(sweep)
    report = sweep / "results/smoke/report"
    assert "| llamacpp | q4_k_m |" in (report / "results.md").read_text()
    assert (report / "kld_vs_size.png").stat().st_size > 10_000
    if SCREENSHOT:
        assert (report / "mlflow_compare.png").stat().st_size > 10_000
    info = json.loads((sweep / "results/smoke/tracking/sweep.json").read_text())
    client = MlflowClient(info["uri"])
    runs = client.search_runs([info["experiment_id"]], f"tags.mlflow.parentRunId = '{info['parent_run_id']}'")
    assert len(runs) == 15
    q8 = next(r for r in runs if r.info.run_name == "llamacpp/q8_0")
    assert q8.data.params["options.type"] == "Q8_0" and q8.data.metrics["kld"] > 0
    # intervals, the llama.cpp protocol, agreement, task accuracy and flips reach every run
    for run in runs:
        keys = set(run.data.metrics)
        assert {"ppl_llamacpp", "bits_per_byte", "task.bitsweep_mc.acc"} <= keys, run.info.run_name
        if run.info.run_name != "reference/fp32":
            assert {"kld_lo", "kld_hi", "ppl_ratio_lo", "greedy_prefix_match",
                    "task.bitsweep_mc.flips_right_to_wrong"} <= keys, run.info.run_name  # fmt: skip


def test_credentials_in_the_environment_never_reach_outputs(sweep):
    """The whole sweep ran with tokens in its environment: no log, result, report, MLflow store or artifact
    holds them (huggingface_hub and qai-hub read them themselves; bitsweep never copies the environment)."""
    leaks = []
    for folder in ("logs", "results", "benchmarks", "mlruns", "mlartifacts"):
        for path in (sweep / folder).rglob("*") if (sweep / folder).exists() else []:
            if path.is_file() and path.stat().st_size < 50_000_000:
                data = path.read_bytes()
                leaks += [f"{path}: {name}" for name, value in SECRETS.items() if value.encode() in data]
    store = sweep / "mlflow.db"
    assert store.is_file()
    leaks += [f"mlflow.db: {n}" for n, v in SECRETS.items() if v.encode() in store.read_bytes()]
    assert not leaks, leaks


def test_rerun_recomputes_nothing(sweep):
    complete(sweep)
    proc = snakemake(sweep, "--cores", "2", "--dry-run")
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr


# Jobs that make artifacts: none of them may re-run for a change that cannot alter an artifact.
ARTIFACT_RULES = {"download_model", "prepare_text", "tokenize_eval", "convert", "check_conversion",
                  "prepare_calibration", "quantize"}  # fmt: skip


@pytest.mark.parametrize(
    ("override", "reruns"),
    [
        ("eval.speed.repeats=4", {"evaluate_reference", "evaluate"}),
        ("eval.speed.gen_tokens=24", {"evaluate_reference", "evaluate"}),
        ("+backends.qnn.mem_mb=9000", set()),
        ("+backends.llamacpp.threads=1", set()),
        ("eval.threads=1", {"evaluate_reference", "evaluate"}),  # speed depends on it
    ],
)
def test_a_change_that_cannot_alter_an_artifact_reruns_no_conversion_or_quantization(sweep, override, reruns):
    complete(sweep)
    proc = snakemake(sweep, "--dry-run", config=(f'overrides=["{override}"]',))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    jobs = set(job_counts(out)) - {"total"} if "Job stats:" in out else set()
    assert not jobs & ARTIFACT_RULES, (override, jobs)
    assert reruns <= jobs and (jobs or "Nothing to be done" in out), (override, jobs)


def test_changing_one_scheme_reruns_only_that_variant(sweep):
    complete(sweep)
    proc = snakemake(sweep, "--dry-run", config=('overrides=["+quant.llamacpp.q2_k.options.pure=true"]',))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    jobs = job_counts(out)
    assert jobs == {"quantize": "1", "evaluate": "1", "log_variant": "1", "aggregate_results": "1",
                    **SCREENSHOT, "all": "1", "total": str(5 + len(SCREENSHOT))}  # fmt: skip
    assert "results/smoke/quantized/smollm2-135m/llamacpp/q2_k" in out


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ('["sweep.llamacpp=[q4_k_m,q9_k]"]', "unknown llamacpp scheme 'q9_k'; known: f16, iq1_m"),
        ('["+backends.qnn.aihub.enabled=true"]', "Qualcomm AI Hub is enabled but no API token is configured"),
        ('["name=blocked"]', "results folder results/blocked cannot be written"),
        (
            '["+backends.openvino.calibration.n_sampels=8"]',
            "backends.openvino.calibration: unknown keys ['n_sampels']",
        ),
        (
            '["+backends.qnn.calibration.n_ctx=two"]',
            "backends.qnn.calibration.n_ctx: expected int, got 'two'",
        ),
        ('["sweep.mlx=[mxfp4,mxfp4]"]', "sweep.mlx lists mxfp4 more than once"),
        (
            '["tracking=server","tracking.uri=http://127.0.0.1:9"]',
            "MLflow tracking server http://127.0.0.1:9 does not answer",
        ),
    ],
)
def test_bad_input_stops_before_any_job(sweep, overrides, message):
    (sweep / "results" / "blocked").write_text("a file where the results folder should be")
    no_aihub_token = {"HF_TOKEN": SECRETS["HF_TOKEN"], "QAIHUB_CLIENT_INI": str(sweep / "no-client.ini")}
    proc = snakemake(sweep, "--dry-run", config=(f"overrides={overrides}",), secrets=no_aihub_token)
    assert proc.returncode != 0
    assert f"bitsweep: {message}" in proc.stderr + proc.stdout
    assert SECRETS["HF_TOKEN"] not in proc.stderr + proc.stdout


def finished_job(workdir: Path, output: Path) -> bool:
    """The output exists and Snakemake recorded its job as finished (no incomplete marker left for it)."""
    import base64

    # Snakemake's file persistence: .snakemake/incomplete/<urlsafe base64 of the output path>, split in names of
    # at most 254 characters, all but the last prefixed with "@" (snakemake.persistence.file._record_path)
    marker = base64.urlsafe_b64encode(str(output.relative_to(workdir)).encode()).decode()
    chunks = [marker[i : i + 254] for i in range(0, len(marker), 254)]
    chunks = ["@" + c for c in chunks[:-1]] + chunks[-1:]
    return output.exists() and not (workdir / ".snakemake" / "incomplete").joinpath(*chunks).exists()


def test_a_killed_run_resumes_without_redoing_finished_work(sweep):
    """SIGKILL the whole run after two of four missing evaluations finished; `--unlock` (the lock a killed run
    leaves) and a plain re-run complete the other two and leave the finished ones untouched."""
    complete(sweep)
    evaluated = sweep / "results/smoke/evaluated/smollm2-135m"
    redo = [evaluated / name for name in ("llamacpp/q8_0.json", "llamacpp/q2_k.json", "openvino/int8_asym.json",
                                          "bitnet/int4_g64.json")]  # fmt: skip
    # Snakemake redoes a job when its output is missing: drop these results and what is made from them.
    for path in redo:
        path.unlink()
        tracked = sweep / "results/smoke/tracking/smollm2-135m" / path.relative_to(evaluated)
        tracked.unlink()
    shutil.rmtree(sweep / "results/smoke/report")
    cmd = [str(Path(sys.executable).parent / "snakemake"), "--cores", "2", "--config", "experiment=smoke"]
    proc = subprocess.Popen(cmd, cwd=sweep, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 600
    while (
        sum(finished_job(sweep, p) for p in redo) < 2 and time.monotonic() < deadline and proc.poll() is None
    ):
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # A result written by a job Snakemake had not yet seen finish is incomplete, rightly redone: not counted.
    finished = {p: p.stat().st_mtime_ns for p in redo if finished_job(sweep, p)}
    assert 2 <= len(finished) < 4, finished
    assert snakemake(sweep, "--unlock").returncode == 0
    proc = snakemake(sweep, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(p.exists() for p in redo)
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    proc = snakemake(sweep, "--dry-run")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_dvc_round_trip_restores_data_and_artifacts_bit_identically(sweep, tmp_path):
    """The project's DVC setup (data.dvc-style tracking, the default local remote redirected to a temp dir):
    push, delete, pull gives the same bytes; `snakemake --touch` then makes the restored files current."""
    from bitsweep.manifest import sha256_file

    complete(sweep)

    def dvc(*args: str) -> str:
        proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=sweep, capture_output=True,
                              text=True, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    def digests(paths: list[str]) -> dict[str, str]:
        files = [f for p in paths for f in sorted((sweep / p).rglob("*")) if f.is_file()]
        return {str(f.relative_to(sweep)): sha256_file(f) for f in files}

    tracked = ["data", "results/smoke/quantized"]
    dvc("init", "--no-scm", "-q")
    shutil.copy2(ROOT / ".dvc" / "config", sweep / ".dvc" / "config")  # the project's remote settings
    dvc("config", "core.no_scm", "true")  # this copy of the workflow is not a git checkout
    dvc("remote", "modify", "--local", "localremote", "url", str(tmp_path / "remote"))
    dvc("add", "-q", *tracked)
    before = digests(tracked)
    assert len(before) > 20 and any(name.endswith(".gguf") for name in before)
    dvc("push", "-q")
    for path in tracked:
        shutil.rmtree(sweep / path)
    dvc("pull", "-q")
    assert digests(tracked) == before
    assert "up to date" in dvc("status")
    assert snakemake(sweep, "--cores", "1", "--touch").returncode == 0
    proc = snakemake(sweep, "--dry-run")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_a_failing_variant_is_reported_and_the_rest_kept(sweep):
    """A runtime fault in one variant (a layer pattern that matches nothing passes config validation and fails in
    its quantize job) stops that variant alone: with keep-going (the default profile) the report still lists
    every other row and names the failure with its error; restoring the config retries only that variant."""
    before = results(complete(sweep))
    override = ('overrides=["+quant.bitnet.tq2_0.options.layers=[no_such_proj]"]',)
    proc = snakemake(sweep, "--cores", "2", config=override)
    assert proc.returncode != 0
    md = (sweep / "results/smoke/report/results.md").read_text()
    assert "## Failed variants (1)" in md, md
    assert (
        "| bitnet | tq2_0 | failed | quantize | ConfigError: no 2-D weights match layers ['no_such_proj']"
        in md
    )
    assert "| llamacpp | q4_k_m |" in md and "| openvino | int8_asym |" in md
    kept = results(sweep)
    assert {k: v["metrics"] for k, v in kept.items() if k != "bitnet/tq2_0"} == {
        k: v["metrics"] for k, v in before.items() if k != "bitnet/tq2_0"
    }
    proc = snakemake(sweep, "--dry-run")
    out = proc.stdout + proc.stderr
    jobs = job_counts(out)
    assert jobs == {"quantize": "1", "evaluate": "1", "log_variant": "1", "aggregate_results": "1",
                    **SCREENSHOT, "all": "1", "total": str(5 + len(SCREENSHOT))}  # fmt: skip


# A contributor's new backend, as README "Adding a backend" describes it: one package (capability data, a
# quantizer, a runner), one registry entry (here $BITSWEEP_BACKENDS, the registry line for a package outside
# src/bitsweep), its settings YAML and one scheme YAML. Nothing else is edited.
THROWAWAY = {
    "__init__.py": """
from bitsweep.backends.base import HF_FORMAT, BackendInfo, BackendSettings

INFO = BackendInfo(
    name="castfp", package=__name__, settings=BackendSettings, source_format=HF_FORMAT, type_key="dtype",
    type_bits={"BFLOAT16": 16, "FLOAT16": 16}, options=frozenset({"dtype"}),
)
""",
    "quantize.py": """
from safetensors.torch import load_file, save_file

from bitsweep.backends.base import Applied, BaseQuantizer, copy_side_files


class Quantizer(BaseQuantizer):
    name = "castfp"

    def versions(self):
        import torch

        return {"torch": torch.__version__}

    def apply(self, request):
        import torch

        dtype = getattr(torch, request.scheme.options["dtype"].lower())
        tensors = {}
        for path in sorted(request.src.glob("*.safetensors")):
            tensors |= load_file(path)
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(cast, request.out / "model.safetensors")
        copy_side_files(request.src, request.out)
        n_params = sum(v.numel() for v in tensors.values())
        size = (request.out / "model.safetensors").stat().st_size
        return Applied("model.safetensors", {"dtype": str(dtype), "n_params": n_params, "bpw": 8 * size / n_params})
""",
    "runner.py": """
from bitsweep.backends.torch_ref import TorchRunner


class Runner(TorchRunner):  # transformers loads the cast weights back into float32
    pass
""",
}


def test_a_new_backend_is_one_package_one_registry_entry_and_its_yaml(sweep, tmp_path):
    """A throwaway backend (a torch dtype cast) runs through the real Snakefile beside the smoke sweep's
    finished work (reused: only its own jobs run) and lands in the results and the report."""
    workdir = reusing_copy(sweep, tmp_path / "plugin-run")
    package = tmp_path / "plugins" / "castfp_backend"
    package.mkdir(parents=True)
    for name, text in THROWAWAY.items():
        (package / name).write_text(text.lstrip())
    (workdir / "configs/backend/castfp.yaml").write_text("{}\n")
    (workdir / "configs/quant/castfp").mkdir()
    (workdir / "configs/quant/castfp/bf16.yaml").write_text("bits: 16\noptions:\n  dtype: BFLOAT16\n")
    env = {"BITSWEEP_BACKENDS": "castfp=castfp_backend",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "plugins"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    overrides = json.dumps(
        ["+sweep.castfp=[bf16]", *(f"sweep.{b}=[]" for b in SWEPT), "report.screenshot=false"]
    )
    proc = snakemake(workdir, "--cores", "2", config=(f"overrides={overrides}",), env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = job_counts(proc.stdout + proc.stderr)
    assert jobs["quantize"] == jobs["evaluate"] == "1" and "evaluate_reference" not in jobs, jobs
    row = json.loads((workdir / "results/smoke/evaluated/smollm2-135m/castfp/bf16.json").read_text())
    reference = json.loads((workdir / "results/smoke/evaluated/smollm2-135m/reference/fp32.json").read_text())
    assert row["artifact"]["applied"]["dtype"] == "torch.bfloat16" and 15.9 < row["metrics"]["bpw"] < 16.1
    assert 0 < row["metrics"]["kld"] < 0.05 and row["metrics"]["top1"] > 0.9  # bf16 rounding: small, not zero
    assert row["comparability"]["windows_sha256"] == reference["comparability"]["windows_sha256"]
    assert "| castfp | bf16 |" in (workdir / "results/smoke/report/results.md").read_text()


def test_llamacpp_protocol_equals_llama_perplexity_and_its_kl_divergence(sweep, tmp_path):
    """llama.cpp's own llama-perplexity on the sweep's windows (the decoded windows as its text file): our
    ``llamacpp`` protocol gives its perplexity to the printed precision, on the f32 GGUF and on Q4_K_M, and our
    full-vocabulary KLD (against a reference made from the same f32 GGUF) is within 1% of its --kl-divergence."""
    from bitsweep.backends.llamacpp.perplexity import llama_perplexity, windows_text
    from bitsweep.backends.llamacpp.runner import Runner
    from bitsweep.config import EvalConfig
    from bitsweep.evaluate import Reference, score
    from bitsweep.text import Windows

    complete(sweep)
    windows = Windows.load(sweep / "results/smoke/windows/smollm2-135m.npz")
    f32 = sweep / "results/smoke/converted/smollm2-135m/gguf"
    q4 = sweep / "results/smoke/quantized/smollm2-135m/llamacpp/q4_k_m"
    text, base_file = tmp_path / "windows.txt", tmp_path / "base.kld"
    with Runner(f32, 2, windows.n_ctx) as base:
        text.write_bytes(windows_text(windows.ids, base.detokenize))
        ours_base, _ = score(base, windows, None, EvalConfig(), keep=tmp_path / "reference")
    with Runner(q4, 2, windows.n_ctx) as variant:
        ours, _ = score(variant, windows, Reference.load(tmp_path / "reference"), EvalConfig())
    theirs_base = llama_perplexity(f32, text, windows.n_ctx, windows.n_windows, kld_base=base_file)
    theirs = llama_perplexity(q4, text, windows.n_ctx, windows.n_windows, kld_base=base_file, kld=True)
    assert f"{ours_base['ppl_llamacpp']:.4f}" == f"{theirs_base['ppl']:.4f}", (ours_base, theirs_base)
    assert f"{ours['ppl_llamacpp']:.6f}" == f"{theirs['ppl_q']:.6f}", (ours, theirs)
    assert ours["kld_llamacpp"] == pytest.approx(theirs["kld"], rel=0.01), (ours, theirs)
    assert ours["top1_llamacpp"] == pytest.approx(theirs["same_top_pct"] / 100, abs=0.01)
    assert ours["ppl"] != ours["ppl_llamacpp"]  # the two protocols score different positions


def linked_copy(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """``src`` as hard links under ``dst`` (the smoke sweep's artifacts reused at no cost; a job that re-makes
    one replaces the link, never the original)."""
    shutil.copytree(src, dst, copy_function=os.link, ignore=lambda _, names: [n for n in names if n in skip],
                    dirs_exist_ok=True)  # fmt: skip


def reusing_copy(sweep: Path, workdir: Path) -> Path:
    """A second workflow folder holding the finished smoke sweep's data and results (hard links) and Snakemake's
    metadata (copied: it is rewritten in place), without its MLflow store and report: a run there makes only
    what its config adds (and the tracking and report of what it sweeps)."""
    complete(sweep)
    workdir.mkdir(parents=True)
    for name in [*WORKFLOW_FILES, ".snakemake"]:
        (shutil.copytree if (sweep / name).is_dir() else shutil.copy2)(sweep / name, workdir / name)
    linked_copy(sweep / "data", workdir / "data")
    linked_copy(sweep / "results", workdir / "results", skip=("tracking", "report"))
    return workdir


def test_two_models_each_with_its_own_tokenizer_windows_and_reference(sweep, tmp_path):
    """SmolLM2 and a tiny Gemma 3 (its own SentencePiece tokenizer) in one sweep: per-model windows and
    references, one table per model plus the side-by-side one, the cross-model plot, MLflow runs filterable by
    model. SmolLM2's finished work is reused from the smoke sweep: none of it runs again."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    from bitsweep.archs import make_tiny_model

    workdir = reusing_copy(sweep, tmp_path / "two-models")
    gemma = make_tiny_model("gemma3_text", tmp_path / "tiny-gemma3")
    (workdir / "configs/model/tiny-gemma3.yaml").write_text(
        f"name: tiny-gemma3\nsource:\n  kind: local\n  path: {gemma}\nlicense: random weights\n"
    )
    overrides = ["models=[smollm2-135m,tiny-gemma3]", "sweep.llamacpp=[q8_0]", "sweep.bitnet=[int4_g64]",
                 *(f"sweep.{b}=[]" for b in SWEPT if b not in ("llamacpp", "bitnet"))]  # fmt: skip
    proc = snakemake(workdir, "--cores", "2", config=(f"overrides={json.dumps(overrides)}",))
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = job_counts(proc.stdout + proc.stderr)
    # only the new model's work (and MLflow/report for all): SmolLM2's windows, reference and variants are reused
    assert jobs["tokenize_eval"] == jobs["evaluate_reference"] == "1" and jobs["evaluate"] == "2", jobs

    out = workdir / "results/smoke"
    smol, tiny = (np.load(out / f"windows/{m}.npz")["ids"] for m in ("smollm2-135m", "tiny-gemma3"))
    assert tiny.max() < 2048 < smol.max(), "each model's windows are made by its own tokenizer"
    assert (out / "reference/tiny-gemma3/logprobs.npy").is_file()
    md = (out / "report/results.md").read_text()
    assert "## smollm2-135m" in md and "## tiny-gemma3" in md and "## Models side by side" in md
    assert "| llamacpp | q8_0 | tiny-gemma3 |" in md
    assert (out / "report/bpb_vs_size.png").stat().st_size > 10_000
    for model, n_runs in (("smollm2-135m", 3), ("tiny-gemma3", 3)):
        result = json.loads((out / f"evaluated/{model}/llamacpp/q8_0.json").read_text())
        assert result["model"] == model and 0 < result["metrics"]["kld"] < 0.05
        info = json.loads((out / "tracking/sweep.json").read_text())
        runs = MlflowClient(info["uri"]).search_runs(
            [info["experiment_id"]], f"tags.`bitsweep.model` = '{model}'"
        )
        assert len(runs) == n_runs, (model, [r.info.run_name for r in runs])


# Last in the session on purpose: once SLURM's client tools are installed (this test installs them), every later
# `snakemake` command pays ~10 s: snakemake-executor-plugin-slurm 2.8 builds its --help text at import by running
# `scontrol show config`, which waits its 10 s timeout for a controller that is no longer running.
@pytest.mark.slurm
def test_slurm_run_matches_the_local_run(sweep, tmp_path):
    """A real one-node SLURM cluster (scripts/slurm_local.sh: slurm-wlm + munge from apt) runs the reference and a
    llama.cpp variant's evaluation again (the smoke sweep's downloads and artifacts reused) through the Snakemake
    SLURM executor (profiles/slurm-local); every job really went through SLURM and the numbers equal the local
    run's."""
    if os.geteuid() != 0 or not (shutil.which("apt-get") or shutil.which("slurmctld")):
        pytest.skip("the local SLURM cluster needs root and apt-get (CI has both)")
    workdir = reusing_copy(sweep, tmp_path / "slurm-run")
    cluster = [str(ROOT / "scripts" / "slurm_local.sh")]
    start = subprocess.run(["bash", *cluster, "start"], capture_output=True, text=True, check=False)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        cmd = [
            str(Path(sys.executable).parent / "snakemake"),
            "--profile",
            "profiles/slurm-local",
            "--forcerun",
            "evaluate_reference",
            "--config",
            "experiment=smoke",
            "overrides=" + json.dumps(["sweep.llamacpp=[q8_0]", *ONLY_LLAMACPP, "report.screenshot=false"]),
        ]
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, check=False)  # fmt: skip
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
    finally:
        subprocess.run(["bash", *cluster, "stop"], capture_output=True, check=False)
    jobs = job_counts(out)
    assert jobs["evaluate_reference"] == jobs["evaluate"] == "1", jobs
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", out)
    assert len(submitted) == int(jobs["total"]) - 1, out[-3000:]  # every job but the local `all`
    assert len(list((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))) == len(submitted)
    local, remote = results(sweep), results(workdir)
    for key in ("reference/fp32", "llamacpp/q8_0"):
        assert remote[key]["evaluated"] != local[key]["evaluated"], key  # evaluated again, on the cluster
        for metric in ("ppl", "kld", "top1", "size_bytes", "bpw"):
            assert remote[key]["metrics"][metric] == local[key]["metrics"][metric], (key, metric)

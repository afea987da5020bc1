"""End to end: the real Snakefile on the real SmolLM2-135M, a short sweep (tests share one run)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = [pytest.mark.workflow, pytest.mark.slow, pytest.mark.llamacpp, pytest.mark.openvino]

WORKFLOW_FILES = ["Snakefile", "rules", "configs", "scripts", "profiles", "report"]


def snakemake(workdir: Path, *args: str, config: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "snakemake"), *args, "--config", "experiment=smoke", *config]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, check=False)


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


def results(workdir: Path) -> dict[str, dict]:
    folder = workdir / "results/smoke/evaluated/smollm2-135m"
    return {f"{p.parent.name}/{p.stem}": json.loads(p.read_text()) for p in folder.glob("*/*.json")}


def test_sweep_produces_sane_comparable_results(sweep):
    rows = results(sweep)
    llamacpp = ("q8_0", "q4_k_m", "q2_k", "iq2_xxs", "tq2_0")
    openvino = ("int8_asym", "int4_asym_g128", "int4_asym_awq_se")
    assert set(rows) == {"reference/fp32", *(f"llamacpp/{s}" for s in llamacpp),
                         *(f"openvino/{s}" for s in openvino)}  # fmt: skip
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
    ir_check = json.loads(
        (sweep / "results/smoke/converted/smollm2-135m/openvino/conversion.json").read_text()
    )
    assert ir_check["max_abs_logit_diff_vs_torch"] < 1e-2
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
    assert rows["llamacpp/iq2_xxs"]["artifact"]["imatrix_sha256"]
    assert "IQ2_XXS" in rows["llamacpp/iq2_xxs"]["artifact"]["applied"]["tensor_types"]
    source = json.loads((sweep / "data/models/smollm2-135m/source.json").read_text())
    assert source["dequantized_from"] == "Q4_1"


def test_report_and_mlflow_runs(sweep):
    from mlflow.tracking import MlflowClient

    report = sweep / "results/smoke/report"
    assert "| llamacpp | q4_k_m |" in (report / "results.md").read_text()
    assert (report / "kld_vs_size.png").stat().st_size > 10_000
    info = json.loads((sweep / "results/smoke/tracking/sweep.json").read_text())
    client = MlflowClient(info["uri"])
    runs = client.search_runs([info["experiment_id"]], f"tags.mlflow.parentRunId = '{info['parent_run_id']}'")
    assert len(runs) == 9
    q8 = next(r for r in runs if r.info.run_name == "llamacpp/q8_0")
    assert q8.data.params["options.type"] == "Q8_0" and q8.data.metrics["kld"] > 0


def test_rerun_recomputes_nothing(sweep):
    proc = snakemake(sweep, "--cores", "2", "--dry-run")
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr


def test_changing_one_scheme_reruns_only_that_variant(sweep):
    proc = snakemake(sweep, "--dry-run", config=('overrides=["+quant.llamacpp.q2_k.options.pure=true"]',))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    table = out.split("Job stats:")[1].split("\n\n")[0].splitlines()[3:]  # after "job count" and "----"
    jobs = dict(line.split() for line in table)
    assert jobs == {"quantize": "1", "evaluate": "1", "log_variant": "1", "aggregate_results": "1",
                    "all": "1", "total": "5"}  # fmt: skip
    assert "results/smoke/quantized/smollm2-135m/llamacpp/q2_k" in out


def test_bad_input_stops_before_any_job(sweep):
    proc = snakemake(sweep, "--dry-run", config=('overrides=["sweep.llamacpp=[q4_k_m,q9_k]"]',))
    assert proc.returncode != 0
    assert "unknown llamacpp scheme 'q9_k'; known: f16, iq1_m" in proc.stderr + proc.stdout

# All Python helpers of the workflow: the composed experiment, the sweep grid, input/param functions.
# The logic itself lives in src/bitsweep; nothing here runs a framework.
#
# `snakemake --lint` asks for a conda environment or container per rule: every rule runs in the project's one
# pinned environment (.venv, built by scripts/install.sh from requirements/lock.txt, with llama.cpp compiled for
# the host CPU), which a conda package of llama.cpp could not reproduce. That lint is accepted.
import os
import sys
from pathlib import Path

from bitsweep.capabilities import backend_info
from bitsweep.config import load_experiment, to_json
from bitsweep.errors import BitsweepError

envvars:
    "PATH",


# Jobs call `python`: make it this interpreter (the project's venv), activated or not.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

try:
    EXP = load_experiment(
        Path(workflow.basedir) / "configs",
        str(config.get("experiment", "default")),
        list(config.get("overrides") or []),
    )
    EXP.check_environment(f"results/{EXP.name}")
except BitsweepError as err:
    raise WorkflowError(f"bitsweep: {err}") from None

MODEL = EXP.model.name
OUT = f"results/{EXP.name}"
VARIANTS = EXP.variants()


wildcard_constraints:
    model=MODEL,
    backend="|".join(EXP.schemes),
    scheme="|".join(v.name for v in VARIANTS),


def scheme_of(wildcards):
    return EXP.scheme(wildcards.backend, wildcards.scheme)


def quantized_dir(scheme):
    return f"{OUT}/quantized/{MODEL}/{scheme.backend}/{scheme.name}"


def evaluated_results():
    return [f"{OUT}/evaluated/{MODEL}/{v.backend}/{v.name}.json" for v in VARIANTS]


def all_results():
    return [f"{OUT}/evaluated/{MODEL}/reference/fp32.json", *evaluated_results()]


def tracking_outputs():
    if not EXP.tracking.enabled:
        return []
    cells = [("reference", "fp32"), *((v.backend, v.name) for v in VARIANTS)]
    return [f"{OUT}/tracking/{MODEL}/{backend}/{scheme}.json" for backend, scheme in cells]


REPORT_FILES = ["results.csv", "results.md", "kld_vs_size.png", "ppl_vs_bpw.png", "speed_vs_size.png"]


def report_outputs():
    return [f"{OUT}/report/{name}" for name in REPORT_FILES]


def screenshot_outputs():
    """The MLflow UI screenshot when tracking is on and report.screenshot wants it (null: chromium installed)."""
    from bitsweep.screenshot import INSTALL_HINT, screenshot_wanted

    if not EXP.tracking.enabled:
        return []
    if not screenshot_wanted(EXP.report.screenshot):
        if EXP.report.screenshot is None:
            print(f"bitsweep: skipping the report's MLflow screenshot; {INSTALL_HINT}", file=sys.stderr)
        return []
    return [f"{OUT}/report/mlflow_compare.png"]


def converted_model(backend):
    """The converted format a backend's quantizer reads (capability table: source_format)."""
    fmt = backend_info(backend).source_format
    if fmt == "gguf":
        outtype = EXP.backends[backend].get("convert_outtype", "f32")
        return f"{OUT}/converted/{MODEL}/gguf/model-{outtype}.gguf"
    if fmt in ("openvino", "onnx", "mlx"):
        return f"{OUT}/converted/{MODEL}/{fmt}"
    if fmt == "hf":  # the downloaded HF folder itself (bitnet packs its safetensors directly)
        return f"data/models/{MODEL}"
    raise WorkflowError(f"no conversion rule for format {fmt!r} (backend {backend!r})")


CALIB_TEXT = f"data/text/{EXP.eval.text.source}/calib.txt"


def get_quantize_input(wildcards):
    """The converted model, plus what a data-aware scheme reads: llama.cpp's imatrix or the calibration text."""
    scheme = scheme_of(wildcards)
    inputs = {"src": converted_model(scheme.backend)}
    if scheme.needs_calibration and scheme.backend == "llamacpp":
        inputs["imatrix"] = f"{OUT}/imatrix/{MODEL}/llamacpp.gguf"
    elif scheme.needs_calibration:
        inputs["calib"] = CALIB_TEXT
    return inputs


def calibration_args(wildcards, input):
    if "imatrix" in input.keys():
        return f"--imatrix {input.imatrix}"
    if "calib" in input.keys():
        return f"--calib-text {input.calib}"
    return ""


def quantize_mem_mb(wildcards):
    """A backend's memory for quantization (backends.<backend>.mem_mb), so the scheduler can pack jobs."""
    return int(EXP.backends[wildcards.backend].get("mem_mb", 4000))


def get_scheme_json(wildcards):
    return to_json(scheme_of(wildcards))


def get_settings_json(wildcards):
    return to_json(EXP.backends[wildcards.backend])


def get_run_params(wildcards):
    """What MLflow records as a variant's parameters (flattened there)."""
    params = {"model": to_json_obj(EXP.model), "eval": to_json_obj(EXP.eval)}
    if wildcards.backend != "reference":
        scheme = scheme_of(wildcards)
        params |= {"options": scheme.options, "settings": EXP.backends[scheme.backend]}
    return to_json(params)


def to_json_obj(obj):
    import json

    return json.loads(to_json(obj))


def output_dir(wildcards, output):
    return os.path.dirname(output[0])


def report_after_failure():
    """onerror: with --keep-going the other variants finished; report them and list what failed, with why."""
    from bitsweep.report import aggregate_results, variant_outcomes

    cells = [("reference", "fp32"), *((v.backend, v.name) for v in VARIANTS)]
    upstream = [[], *([Path(quantized_dir(v))] for v in VARIANTS)]  # the jobs before each result
    expected = {cell: [*jobs, Path(result)] for cell, jobs, result in zip(cells, upstream, all_results(), strict=True)}
    results, failed = variant_outcomes(expected)
    if results:
        aggregate_results(results, Path(f"{OUT}/report"), failed)
        print(f"bitsweep: {len(failed)} variant(s) failed or did not run; report of the rest: {OUT}/report/results.md")


def aihub_enabled():
    from bitsweep.backends.qnn import AiHubConfig

    return "qnn" in EXP.schemes and AiHubConfig.from_settings(EXP.backends["qnn"]).enabled


def get_device_profile(wildcards):
    """The AI Hub record of a QNN variant when AI Hub is enabled (logged to MLflow beside local metrics)."""
    if wildcards.backend == "qnn" and aihub_enabled():
        return [f"{OUT}/aihub/{MODEL}/qnn/{wildcards.scheme}.json"]
    return []


def variant_logs(wildcards):
    if wildcards.backend == "reference":
        return [f"logs/evaluate/{MODEL}/reference/fp32.log"]
    return [
        f"logs/quantize/{MODEL}/{wildcards.backend}/{wildcards.scheme}.log",
        f"logs/evaluate/{MODEL}/{wildcards.backend}/{wildcards.scheme}.log",
    ]

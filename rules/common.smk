# All Python helpers of the workflow: the composed experiment, the sweep grid, input/param functions.
# The logic itself lives in src/bitsweep; nothing here runs a framework or names a backend: what a backend reads,
# whether it has a calibration step or a device profiler, all come from its capability data (bitsweep.backends).
#
# `snakemake --lint` asks for a conda environment or container per rule: every rule runs in the project's one
# pinned environment (.venv, built by scripts/install.sh from requirements/lock.txt, with llama.cpp compiled for
# the host CPU), which a conda package of llama.cpp could not reproduce. That lint is accepted.
#
# Params carry exactly what changes a job's output (so a change re-runs what it affects and nothing else):
# threads and mem_mb are resources, eval.speed and eval.threads reach only evaluations.
import os
import sys
from pathlib import Path

from bitsweep.backends import backend_info
from bitsweep.backends.base import output_settings
from bitsweep.config import load_experiment
from bitsweep.errors import BitsweepError
from bitsweep.planning import memory_plan, stage_mb
from bitsweep.preflight import check_before_run
from bitsweep.typed import to_json

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
    for line in check_before_run(EXP, f"results/{EXP.name}", config.get("max_mem_mb"), dry_run=workflow.output_settings.dryrun):
        print(f"bitsweep: {line}", file=sys.stderr)
except BitsweepError as err:
    raise WorkflowError(f"bitsweep: {err}") from None

MODELS = {m.name: m for m in EXP.models}  # each with its own windows, reference and variants
MEMORY_PLAN = memory_plan(EXP)  # model -> stage -> estimated peak MB: each job's mem_mb
OUT = f"results/{EXP.name}"
LOGS = f"{OUT}/logs"
BENCH = f"{OUT}/benchmarks"
VARIANTS = EXP.variants()
CONVERSIONS = EXP.conversions()  # format name -> (FormatInfo, conversion options)
CALIB_TEXT = f"data/text/{EXP.eval.text.source}/calib.txt"


wildcard_constraints:
    model="|".join(MODELS),
    backend="|".join(EXP.schemes),
    scheme="|".join(v.name for v in VARIANTS),
    format="|".join(CONVERSIONS) or "(?!)",


def info(backend):
    return backend_info(backend)


def scheme_of(wildcards):
    return EXP.scheme(wildcards.backend, wildcards.scheme)


def quantized_dir(model, scheme):
    return f"{OUT}/quantized/{model}/{scheme.backend}/{scheme.name}"


def cells():
    """Every (model, backend, scheme) of the sweep, each model's reference first."""
    return [(m, backend, scheme) for m in MODELS for backend, scheme in [("reference", "fp32"),
            *((v.backend, v.name) for v in EXP.variants_of(m))]]  # fmt: skip


def evaluated_results():
    return [f"{OUT}/evaluated/{m}/{b}/{s}.json" for m, b, s in cells() if b != "reference"]


def all_results():
    return [f"{OUT}/evaluated/{m}/{b}/{s}.json" for m, b, s in cells()]


def conversion_checks():
    return [f"{OUT}/converted/{m}/{fmt}.check.json" for m in MODELS for fmt in EXP.formats_of(m)]


def tracking_outputs():
    if not EXP.tracking.enabled:
        return []
    return [f"{OUT}/tracking/{m}/{b}/{s}.json" for m, b, s in cells()]


def model_json(wildcards):
    return to_json(MODELS[wildcards.model])


REPORT_FILES = ["results.csv", "results.md", "kld_vs_size.png", "ppl_vs_bpw.png", "speed_vs_size.png", "bpb_vs_size.png"]


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


def converted_model(model, backend):
    """The converted format a backend's quantizer reads (its capability data: source_format)."""
    fmt = info(backend).source_format
    return f"{OUT}/converted/{model}/{fmt.name}" if fmt.converter else f"data/models/{model}"


def convert_options(wildcards):
    return to_json(CONVERSIONS[wildcards.format][1])


def convert_mem_mb(wildcards):
    return stage_mb(MEMORY_PLAN, wildcards.model, f"convert:{wildcards.format}")


def check_threads(wildcards):
    return CONVERSIONS[wildcards.format][0].check_threads(EXP.eval.threads)


def check_mem_mb(wildcards):
    return stage_mb(MEMORY_PLAN, wildcards.model, f"check:{wildcards.format}")


def reference_mem_mb(wildcards):
    return stage_mb(MEMORY_PLAN, wildcards.model, "reference")


def evaluate_mem_mb(wildcards):
    return stage_mb(MEMORY_PLAN, wildcards.model, f"evaluate:{wildcards.backend}")


def evaluate_env(wildcards):
    return info(wildcards.backend).evaluate_env_prefix()


def calibrated_backends():
    return [b for b in EXP.swept_backends() if info(b).calibration_step]


def get_quantize_input(wildcards):
    """The converted model, plus what a data-aware scheme reads: the backend's calibration step's output (llama.cpp's
    importance matrix) or the calibration text."""
    scheme = scheme_of(wildcards)
    inputs = {"src": converted_model(wildcards.model, scheme.backend)}
    if scheme.needs_calibration:
        calibrated = info(scheme.backend).calibration_step
        inputs["calibration"] = f"{OUT}/calibration/{wildcards.model}/{scheme.backend}" if calibrated else CALIB_TEXT
    return inputs


def calibration_args(wildcards, input):
    return f"--calibration {input.calibration}" if "calibration" in input.keys() else ""


def settings_of(backend):
    return EXP.backends[backend]


def backend_threads(wildcards):
    return settings_of(wildcards.backend).threads


def quantize_threads(wildcards):
    return scheme_of(wildcards).quantize_threads(backend_threads(wildcards))


def backend_mem_mb(wildcards):
    """A backend's memory for its jobs, so the scheduler can pack them: backends.<backend>.mem_mb, or more where
    the model's size says its quantizer needs more (bitsweep.planning)."""
    return max(settings_of(wildcards.backend).mem_mb, stage_mb(MEMORY_PLAN, wildcards.model, f"quantize:{wildcards.backend}"))


def get_scheme_json(wildcards):
    return to_json(scheme_of(wildcards))


def get_settings_json(wildcards):
    """The backend's settings that change what its jobs make (resources left out)."""
    return to_json(output_settings(settings_of(wildcards.backend)))


# Evaluations re-run when eval.threads changes (speed depends on it); the stage runs with the rule's {threads}.
EVAL_JSON = to_json(EXP.eval)


def get_run_params(wildcards):
    """What MLflow records as a variant's parameters (flattened there)."""
    import dataclasses

    params = {"model": dataclasses.asdict(MODELS[wildcards.model]), "eval": dataclasses.asdict(EXP.eval)}
    if wildcards.backend != "reference":
        scheme = scheme_of(wildcards)
        params |= {"options": scheme.options, "settings": output_settings(settings_of(scheme.backend))}
    return to_json(params)


def output_dir(wildcards, output):
    return os.path.dirname(output[0])


def report_after_failure():
    """onerror: with --keep-going the other variants finished; report them and list what failed, with why."""
    from bitsweep.report import aggregate_results, variant_outcomes

    # the jobs before each result: none for a reference, the quantization for a variant
    upstream = [[] if b == "reference" else [Path(f"{OUT}/quantized/{m}/{b}/{s}")] for m, b, s in cells()]
    expected = {cell: [*jobs, Path(result)] for cell, jobs, result in zip(cells(), upstream, all_results(), strict=True)}
    results, failed = variant_outcomes(expected)
    if results:
        aggregate_results(results, Path(f"{OUT}/report"), failed)
        print(f"bitsweep: {len(failed)} variant(s) failed or did not run; report of the rest: {OUT}/report/results.md")


def profiled_backends():
    return [b for b in EXP.swept_backends() if info(b).device_profile_enabled(settings_of(b))]


def get_device_profile(wildcards):
    """A variant's hosted-device record when its backend profiles on a device (QNN: AI Hub), for MLflow."""
    if wildcards.backend in profiled_backends():
        return [f"{OUT}/device/{wildcards.model}/{wildcards.backend}/{wildcards.scheme}.json"]
    return []


def variant_logs(wildcards):
    if wildcards.backend == "reference":
        return [f"{LOGS}/evaluate/{wildcards.model}/reference/fp32.log"]
    return [
        f"{LOGS}/quantize/{wildcards.model}/{wildcards.backend}/{wildcards.scheme}.log",
        f"{LOGS}/evaluate/{wildcards.model}/{wildcards.backend}/{wildcards.scheme}.log",
    ]

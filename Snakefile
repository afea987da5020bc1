# bitsweep: download -> convert -> quantize -> evaluate -> MLflow -> report.
#
#   snakemake --cores all                                   # the default experiment
#   snakemake --cores all --config experiment=smoke         # another configs/experiment/*.yaml
#   snakemake --cores all --config overrides='["eval.n_windows=16"]'   # Hydra overrides on top
#
# Run-time settings (cores, cluster partition, keep-going) live in profiles/, never in experiment configs.
from snakemake.utils import min_version

min_version("9.0")


configfile: "configs/workflow.yaml"


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/convert.smk"
include: "rules/quantize.smk"
include: "rules/evaluate.smk"
include: "rules/track.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        report_outputs(),
        tracking_outputs(),
        screenshot_outputs(),


rule all_quantized:
    input:
        [quantized_dir(m, v) for m in MODELS for v in EXP.variants_of(m)],


rule all_evaluated:
    input:
        evaluated_results(),

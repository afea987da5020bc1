# MLflow: the store, experiment and parent run are created once, before any variant logs (a fresh sqlite
# store races when several jobs create it at once).


rule init_tracking:
    output:
        f"{OUT}/tracking/sweep.json",
    log:
        f"{LOGS}/init_tracking.log",
    benchmark:
        f"{BENCH}/init_tracking.tsv"
    params:
        tracking=to_json(EXP.tracking),
        experiment=EXP.name,
    shell:
        "python scripts/run_stage.py init_tracking --tracking {params.tracking:q} --experiment {params.experiment}"
        " --out {output:q}"
        " > {log:q} 2>&1"


rule log_variant:
    input:
        tracking=f"{OUT}/tracking/sweep.json",
        result=f"{OUT}/evaluated/{{model}}/{{backend}}/{{scheme}}.json",
        device=get_device_profile,
    output:
        f"{OUT}/tracking/{{model}}/{{backend}}/{{scheme}}.json",
    log:
        f"{LOGS}/log_variant/{{model}}/{{backend}}/{{scheme}}.log",
    benchmark:
        f"{BENCH}/log_variant/{{model}}/{{backend}}/{{scheme}}.tsv"
    wildcard_constraints:
        backend="|".join([*EXP.schemes, "reference"]),
        scheme="|".join([*(v.name for v in VARIANTS), "fp32"]),
    params:
        run=get_run_params,
        logs=variant_logs,
        device=lambda wildcards, input: f"--device-profile {input.device}" if input.device else "",
    shell:
        "python scripts/run_stage.py log_variant --tracking {input.tracking:q} --result {input.result:q} --params {params.run:q}"
        " --out {output:q} --logs {params.logs:q} {params.device} > {log:q} 2>&1"

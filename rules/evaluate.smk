# Evaluations take the `timing` resource (profiles set it to 1): token/s figures are only comparable when
# no other evaluation shares the machine's cores and memory bandwidth. Within a job, the timed section also waits
# for every other job on the machine (bitsweep.quiet: quantizations and conversions too).


rule tokenize_eval:
    input:
        model="data/models/{model}",
        text=f"data/text/{EXP.eval.text.source}/eval.txt",
    output:
        f"{OUT}/windows/{{model}}.npz",
    log:
        f"{LOGS}/tokenize_eval/{{model}}.log",
    benchmark:
        f"{BENCH}/tokenize_eval/{{model}}.tsv"
    params:
        n_ctx=EXP.eval.n_ctx,
        n_windows=EXP.eval.n_windows,
    shell:
        "python scripts/run_stage.py tokenize_eval --model-dir {input.model:q} --eval-text {input.text:q}"
        " --n-ctx {params.n_ctx} --n-windows {params.n_windows} --out {output:q} > {log:q} 2>&1"


rule evaluate_reference:
    input:
        model="data/models/{model}",
        windows=f"{OUT}/windows/{{model}}.npz",
    output:
        result=f"{OUT}/evaluated/{{model}}/reference/fp32.json",
        reference=directory(f"{OUT}/reference/{{model}}"),
    log:
        f"{LOGS}/evaluate/{{model}}/reference/fp32.log",
    benchmark:
        f"{BENCH}/evaluate/{{model}}/reference/fp32.tsv"
    params:
        model=model_json,
        eval=EVAL_JSON,
    threads: EXP.eval.threads
    resources:
        timing=1,
        mem_mb=reference_mem_mb,
    shell:
        "python scripts/run_stage.py evaluate_reference --model {params.model:q} --model-dir {input.model:q}"
        " --windows-path {input.windows:q} --cfg {params.eval:q} --out-json {output.result:q}"
        " --out-reference {output.reference:q} --threads {threads} > {log:q} 2>&1"


rule evaluate:
    input:
        artifact=f"{OUT}/quantized/{{model}}/{{backend}}/{{scheme}}",
        windows=f"{OUT}/windows/{{model}}.npz",
        reference=f"{OUT}/reference/{{model}}",
    output:
        f"{OUT}/evaluated/{{model}}/{{backend}}/{{scheme}}.json",
    log:
        f"{LOGS}/evaluate/{{model}}/{{backend}}/{{scheme}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{model}}/{{backend}}/{{scheme}}.tsv"
    params:
        eval=EVAL_JSON,
        env=evaluate_env,
    threads: EXP.eval.threads
    resources:
        timing=1,
        mem_mb=evaluate_mem_mb,
    shell:
        "{params.env} python scripts/run_stage.py evaluate_variant --model {wildcards.model} --artifact-dir {input.artifact:q}"
        " --windows-path {input.windows:q} --reference-path {input.reference:q} --cfg {params.eval:q}"
        " --out-json {output:q} --threads {threads} > {log:q} 2>&1"


# A backend's hosted-device profile of each variant, when its settings enable one (QNN: Qualcomm AI Hub
# compile + profile, backends.qnn.aihub.enabled).
rule profile_on_device:
    input:
        artifact=f"{OUT}/quantized/{{model}}/{{backend}}/{{scheme}}",
    output:
        f"{OUT}/device/{{model}}/{{backend}}/{{scheme}}.json",
    log:
        f"{LOGS}/profile_on_device/{{model}}/{{backend}}/{{scheme}}.log",
    benchmark:
        f"{BENCH}/profile_on_device/{{model}}/{{backend}}/{{scheme}}.tsv"
    params:
        settings=get_settings_json,
    shell:
        "python scripts/run_stage.py profile_on_device --backend {wildcards.backend} --artifact-dir {input.artifact:q}"
        " --settings {params.settings:q} --out {output:q} > {log:q} 2>&1"

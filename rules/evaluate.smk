# Evaluations take the `timing` resource (profiles set it to 1): token/s figures are only comparable when
# no other evaluation shares the machine's cores and memory bandwidth.


rule tokenize_eval:
    input:
        model="data/models/{model}",
        text=f"data/text/{EXP.eval.text.source}/eval.txt",
    output:
        f"{OUT}/windows/{{model}}.npz",
    log:
        "logs/tokenize_eval/{model}.log",
    params:
        eval=to_json(EXP.eval),
    shell:
        "python scripts/run_stage.py tokenize_eval --model-dir {input.model:q} --eval-text {input.text:q} --cfg {params.eval:q}"
        " --out {output:q} > {log:q} 2>&1"


rule evaluate_reference:
    input:
        model="data/models/{model}",
        windows=f"{OUT}/windows/{{model}}.npz",
    output:
        result=f"{OUT}/evaluated/{{model}}/reference/fp32.json",
        logits=f"{OUT}/reference/{{model}}/topk_logprobs.npz",
    log:
        "logs/evaluate/{model}/reference/fp32.log",
    benchmark:
        "benchmarks/evaluate/{model}/reference/fp32.tsv"
    params:
        model=to_json(EXP.model),
        eval=to_json(EXP.eval),
    threads: EXP.eval.threads
    resources:
        timing=1,
        mem_mb=4000,
    shell:
        "python scripts/run_stage.py evaluate_reference --model {params.model:q} --model-dir {input.model:q}"
        " --windows-path {input.windows:q} --cfg {params.eval:q} --out-json {output.result:q}"
        " --out-logits {output.logits:q} > {log:q} 2>&1"


rule evaluate:
    input:
        artifact=f"{OUT}/quantized/{{model}}/{{backend}}/{{scheme}}",
        windows=f"{OUT}/windows/{{model}}.npz",
        reference=f"{OUT}/reference/{{model}}/topk_logprobs.npz",
    output:
        f"{OUT}/evaluated/{{model}}/{{backend}}/{{scheme}}.json",
    log:
        "logs/evaluate/{model}/{backend}/{scheme}.log",
    benchmark:
        "benchmarks/evaluate/{model}/{backend}/{scheme}.tsv"
    params:
        eval=to_json(EXP.eval),
    threads: EXP.eval.threads
    resources:
        timing=1,
        mem_mb=3000,
    shell:
        "python scripts/run_stage.py evaluate_variant --model {wildcards.model} --artifact-dir {input.artifact:q}"
        " --windows-path {input.windows:q} --reference-path {input.reference:q} --cfg {params.eval:q}"
        " --out-json {output:q} > {log:q} 2>&1"


# Qualcomm AI Hub (backends.qnn.aihub.enabled): compile + profile each QNN variant on a hosted device.
rule profile_on_aihub:
    input:
        artifact=f"{OUT}/quantized/{{model}}/qnn/{{scheme}}",
    output:
        f"{OUT}/aihub/{{model}}/qnn/{{scheme}}.json",
    log:
        "logs/profile_on_aihub/{model}/qnn/{scheme}.log",
    params:
        settings=to_json(EXP.backends.get("qnn", {})),
    shell:
        "python scripts/run_stage.py profile_on_aihub --artifact-dir {input.artifact:q} --settings {params.settings:q}"
        " --out {output:q} > {log:q} 2>&1"

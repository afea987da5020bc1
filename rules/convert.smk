rule convert_to_gguf:
    input:
        "data/models/{model}",
    output:
        f"{OUT}/converted/{{model}}/gguf/model-{{outtype}}.gguf",
    log:
        f"logs/convert_to_gguf/{{model}}/{{outtype}}.log",
    benchmark:
        f"benchmarks/convert_to_gguf/{{model}}/{{outtype}}.tsv"
    wildcard_constraints:
        outtype="f32|f16|bf16",
    resources:
        mem_mb=4000,
    shell:
        "python scripts/run_stage.py convert_to_gguf --model-dir {input:q} --out {output:q} --outtype {wildcards.outtype}"
        " > {log:q} 2>&1"

# One conversion rule for every format (gguf, openvino, onnx, mlx): the converter comes from the format's
# FormatInfo. Its check against torch is a separate job, so the converted model depends on the model alone.


rule convert:
    input:
        "data/models/{model}",
    output:
        directory(f"{OUT}/converted/{{model}}/{{format}}"),
    log:
        f"{LOGS}/convert/{{model}}/{{format}}.log",
    benchmark:
        f"{BENCH}/convert/{{model}}/{{format}}.tsv"
    params:
        model=model_json,
        options=convert_options,
    threads: 1  # every converter keeps one core busy (0.5-1.04 cores measured): two run side by side
    resources:
        mem_mb=convert_mem_mb,
    shell:
        "python scripts/run_stage.py convert --format {wildcards.format} --model {params.model:q}"
        " --model-dir {input:q} --out {output:q} --options {params.options:q} > {log:q} 2>&1"


rule check_conversion:
    input:
        model="data/models/{model}",
        converted=f"{OUT}/converted/{{model}}/{{format}}",
        windows=f"{OUT}/windows/{{model}}.npz",
    output:
        f"{OUT}/converted/{{model}}/{{format}}.check.json",
    log:
        f"{LOGS}/check_conversion/{{model}}/{{format}}.log",
    benchmark:
        f"{BENCH}/check_conversion/{{model}}/{{format}}.tsv"
    params:
        model=model_json,
    threads: check_threads
    resources:
        mem_mb=check_mem_mb,
    shell:
        "python scripts/run_stage.py check_conversion --format {wildcards.format} --model {params.model:q}"
        " --model-dir {input.model:q} --converted {input.converted:q} --windows-path {input.windows:q}"
        " --out {output:q} --threads {threads} > {log:q} 2>&1"

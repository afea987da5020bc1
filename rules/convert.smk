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


rule convert_to_openvino:
    input:
        model="data/models/{model}",
        windows=f"{OUT}/windows/{{model}}.npz",
    output:
        directory(f"{OUT}/converted/{{model}}/openvino"),
    log:
        "logs/convert_to_openvino/{model}.log",
    benchmark:
        "benchmarks/convert_to_openvino/{model}.tsv"
    params:
        model=to_json(EXP.model),
    threads: 2
    resources:
        mem_mb=6000,
    shell:
        "python scripts/run_stage.py convert_to_openvino --model {params.model:q} --model-dir {input.model:q}"
        " --windows-path {input.windows:q} --out {output:q} > {log:q} 2>&1"


rule convert_to_onnx:
    input:
        model="data/models/{model}",
        windows=f"{OUT}/windows/{{model}}.npz",
    output:
        directory(f"{OUT}/converted/{{model}}/onnx"),
    log:
        "logs/convert_to_onnx/{model}.log",
    benchmark:
        "benchmarks/convert_to_onnx/{model}.tsv"
    params:
        model=to_json(EXP.model),
    threads: 2
    resources:
        mem_mb=6000,
    shell:
        "python scripts/run_stage.py convert_to_onnx --model {params.model:q} --model-dir {input.model:q}"
        " --windows-path {input.windows:q} --out {output:q} > {log:q} 2>&1"


rule convert_to_mlx:
    input:
        model="data/models/{model}",
        windows=f"{OUT}/windows/{{model}}.npz",
    output:
        directory(f"{OUT}/converted/{{model}}/mlx"),
    log:
        "logs/convert_to_mlx/{model}.log",
    benchmark:
        "benchmarks/convert_to_mlx/{model}.tsv"
    params:
        model=to_json(EXP.model),
        dtype=EXP.backends.get("mlx", {}).get("convert_dtype", "float32"),
    threads: 2
    resources:
        mem_mb=4000,
    shell:
        "python scripts/run_stage.py convert_to_mlx --model {params.model:q} --model-dir {input.model:q}"
        " --windows-path {input.windows:q} --out {output:q} --dtype {params.dtype} > {log:q} 2>&1"

rule compute_imatrix:
    input:
        model=converted_model("llamacpp") if "llamacpp" in EXP.schemes else [],
        calib=CALIB_TEXT,
    output:
        f"{OUT}/imatrix/{{model}}/llamacpp.gguf",
    log:
        "logs/compute_imatrix/{model}/llamacpp.log",
    benchmark:
        "benchmarks/compute_imatrix/{model}/llamacpp.tsv"
    params:
        settings=to_json(EXP.backends.get("llamacpp", {})),
    threads: EXP.backends.get("llamacpp", {}).get("threads", 2)
    shell:
        "python scripts/run_stage.py compute_imatrix --model {input.model:q} --calib-text {input.calib:q} --out {output:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"


rule quantize:
    input:
        unpack(get_quantize_input),
    output:
        directory(f"{OUT}/quantized/{{model}}/{{backend}}/{{scheme}}"),
    log:
        "logs/quantize/{model}/{backend}/{scheme}.log",
    benchmark:
        "benchmarks/quantize/{model}/{backend}/{scheme}.tsv"
    params:
        scheme=get_scheme_json,
        settings=get_settings_json,
        calibration=calibration_args,
    threads: 2
    resources:
        mem_mb=quantize_mem_mb,
    shell:
        "python scripts/run_stage.py quantize --src {input.src:q} --scheme {params.scheme:q} --settings {params.settings:q}"
        " --out {output:q} {params.calibration} > {log:q} 2>&1"

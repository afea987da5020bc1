# A backend with a calibration step of its own (capability data: calibration_step; llama.cpp's importance
# matrix) computes it once per model from the calibration text; its data-aware schemes read it.
rule prepare_calibration:
    input:
        src=lambda wildcards: converted_model(wildcards.model, wildcards.backend),
        calib=CALIB_TEXT,
    output:
        directory(f"{OUT}/calibration/{{model}}/{{backend}}"),
    log:
        f"{LOGS}/prepare_calibration/{{model}}/{{backend}}.log",
    benchmark:
        f"{BENCH}/prepare_calibration/{{model}}/{{backend}}.tsv"
    wildcard_constraints:
        backend="|".join(calibrated_backends()) or "(?!)",
    params:
        settings=get_settings_json,
    threads: backend_threads
    resources:
        mem_mb=backend_mem_mb,
    shell:
        "python scripts/run_stage.py prepare_calibration --backend {wildcards.backend} --src {input.src:q}"
        " --calib-text {input.calib:q} --settings {params.settings:q} --out {output:q} --threads {threads}"
        " > {log:q} 2>&1"


rule quantize:
    input:
        unpack(get_quantize_input),
    output:
        directory(f"{OUT}/quantized/{{model}}/{{backend}}/{{scheme}}"),
    log:
        f"{LOGS}/quantize/{{model}}/{{backend}}/{{scheme}}.log",
    benchmark:
        f"{BENCH}/quantize/{{model}}/{{backend}}/{{scheme}}.tsv"
    params:
        scheme=get_scheme_json,
        settings=get_settings_json,
        calibration=calibration_args,
    threads: quantize_threads
    resources:
        mem_mb=backend_mem_mb,
    shell:
        "python scripts/run_stage.py quantize --src {input.src:q} --scheme {params.scheme:q} --settings {params.settings:q}"
        " --out {output:q} --threads {threads} {params.calibration} > {log:q} 2>&1"

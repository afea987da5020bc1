rule download_model:
    output:
        directory("data/models/{model}"),
    log:
        f"{LOGS}/download_model/{{model}}.log",
    benchmark:
        f"{BENCH}/download_model/{{model}}.tsv"
    params:
        model=model_json,
    shell:
        "python scripts/run_stage.py download_model --model {params.model:q} --out {output:q} > {log:q} 2>&1"


rule prepare_text:
    output:
        eval="data/text/{corpus}/eval.txt",
        calib="data/text/{corpus}/calib.txt",
        info="data/text/{corpus}/info.json",
    log:
        f"{LOGS}/prepare_text/{{corpus}}.log",
    benchmark:
        f"{BENCH}/prepare_text/{{corpus}}.tsv"
    params:
        text=to_json(EXP.eval.text),
    shell:
        "python scripts/run_stage.py prepare_text --cfg {params.text:q} --eval-out {output.eval:q} --calib-out {output.calib:q}"
        " --info-out {output.info:q} > {log:q} 2>&1"

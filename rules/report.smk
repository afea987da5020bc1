rule aggregate_results:
    input:
        results=all_results(),
        checks=conversion_checks(),  # not read: the conversions' agreement with torch is part of a finished sweep
    output:
        report(f"{OUT}/report/results.csv", category="Tables"),
        report(f"{OUT}/report/results.md", category="Tables"),
        report(f"{OUT}/report/kld_vs_size.png", category="Plots", caption="../report/kld_vs_size.rst"),
        report(f"{OUT}/report/ppl_vs_bpw.png", category="Plots", caption="../report/ppl_vs_bpw.rst"),
        report(f"{OUT}/report/speed_vs_size.png", category="Plots", caption="../report/speed_vs_size.rst"),
        report(f"{OUT}/report/bpb_vs_size.png", category="Plots", caption="../report/bpb_vs_size.rst"),
    log:
        f"{LOGS}/aggregate_results.log",
    benchmark:
        f"{BENCH}/aggregate_results.tsv"
    params:
        out_dir=output_dir,
    shell:
        "python scripts/run_stage.py aggregate_results --results {input.results:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


# Also waits for the report (not read): it runs last, so a failed screenshot holds back no result or report.
rule screenshot_mlflow:
    input:
        tracking=f"{OUT}/tracking/sweep.json",
        runs=tracking_outputs(),
        report=report_outputs(),
    output:
        report(f"{OUT}/report/mlflow_compare.png", category="MLflow", caption="../report/mlflow_compare.rst"),
    log:
        f"{LOGS}/screenshot_mlflow.log",
    benchmark:
        f"{BENCH}/screenshot_mlflow.tsv"
    shell:
        "python scripts/run_stage.py screenshot_mlflow --tracking {input.tracking:q} --out {output:q} > {log:q} 2>&1"


onerror:
    report_after_failure()

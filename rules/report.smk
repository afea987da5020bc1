rule aggregate_results:
    input:
        all_results(),
    output:
        report(f"{OUT}/report/results.csv", category="Tables"),
        report(f"{OUT}/report/results.md", category="Tables"),
        report(f"{OUT}/report/kld_vs_size.png", category="Plots", caption="../report/kld_vs_size.rst"),
        report(f"{OUT}/report/ppl_vs_bpw.png", category="Plots", caption="../report/ppl_vs_bpw.rst"),
        report(f"{OUT}/report/speed_vs_size.png", category="Plots", caption="../report/speed_vs_size.rst"),
    log:
        "logs/aggregate_results.log",
    params:
        out_dir=output_dir,
    shell:
        "python scripts/run_stage.py aggregate_results --results {input:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


onerror:
    report_after_failure()

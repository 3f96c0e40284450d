rule report:
    input:
        params="params.yaml",
        scenes="data/scenes",
        metrics=expand(
            "results/eval/{task}/{variant}/metrics.json", task=TASKS, variant=VARIANTS
        ),
        predictions=expand(
            "results/eval/{task}/{variant}/predictions.json", task=TASKS, variant=VARIANTS
        ),
        foundation=["results/foundation/llm.json", "results/foundation/encoder.json"],
        mapper_logs=expand("results/mapper/{task}.json", task=TASKS),
        skip=expand(
            "results/skip/{task}/{mode}/{name}.json",
            task=TASKS,
            mode=skip_modes(config),
            name=["metrics", "predictions", "timing"],
        ),
        compress=expand(
            "results/compress/{task}/{method}/{name}.json",
            task=TASKS,
            method=compression_methods(config),
            name=["metrics", "predictions", "timing"],
        ),
        subnet="models/masks/subnet",
        trained=expand("results/trained/{task}/{name}.json", task=TASKS, name=["metrics", "predictions"]),
        llm_small="results/foundation/llm_small.json",
        bench="results/bench/skip.json",
    output:
        html=report(
            "reports/all.html", caption="../report/all_html.rst", category="Report"
        ),
        csv=report(
            "reports/summary.csv", caption="../report/summary_csv.rst", category="Report"
        ),
        lineage="reports/lineage.json",
        plots=directory("reports/plots"),
    log:
        "logs/report/report.log",
    benchmark:
        "benchmarks/report/report.tsv"
    params:
        eval_dirs=expand("results/eval/{task}/{variant}", task=TASKS, variant=VARIANTS),
        args=cli_args(config["report"]),
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/mmskip.yaml"
    shell:
        "mmskip report --params {input.params} --scenes {input.scenes}"
        " --eval {params.eval_dirs} --foundation results/foundation"
        " --mapper_logs results/mapper --benchmarks benchmarks"
        " --skip_root results/skip --compress_root results/compress"
        " --subnet {input.subnet}/subnet.json --trained_root results/trained --bench {input.bench}"
        " --html {output.html} --csv {output.csv} --lineage {output.lineage} --plots {output.plots} {params.args} > {log} 2>&1"

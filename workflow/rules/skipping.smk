# The skip grid: one job per task and skip mode (plus the unskipped reference, mode "none"),
# each evaluating every grid point of its mode with the trained mapper and cached features.
# Adding grid points adds or re-runs these jobs only, never training.


rule evaluate_skip:
    input:
        scenes="data/scenes",
        features="results/features",
        llm="models/llm",
        mapper="models/mapper/{task}",
    output:
        metrics="results/skip/{task}/{mode}/metrics.json",
        predictions="results/skip/{task}/{mode}/predictions.json",
        timing="results/skip/{task}/{mode}/timing.json",
    log:
        "logs/evaluate_skip/{task}-{mode}.log",
    benchmark:
        "benchmarks/evaluate_skip/{task}-{mode}.tsv"
    params:
        prompts=lambda wildcards: cli_args(config["prompts"]),
        skipping=cli_args(config["skipping"]),
        evaluation=cli_args(config["evaluation"]),
    threads: 1
    resources:
        mem_mb=3000,
    conda:
        "../../envs/mmskip.yaml"
    shell:
        "mmskip evaluate_skip --threads 1 --task {wildcards.task} --mode {wildcards.mode}"
        " --scenes {input.scenes} --features {input.features} --llm {input.llm}"
        " --mapper {input.mapper} --out results/skip/{wildcards.task}/{wildcards.mode}"
        " {params.prompts} {params.skipping} {params.evaluation} > {log} 2>&1"


rule bench_skip:
    input:
        scenes="data/scenes",
        features="results/features",
        llm="models/llm",
        mappers=expand("models/mapper/{task}", task=TASKS),
    output:
        bench="results/bench/skip.json",
    log:
        "logs/bench_skip/skip.log",
    benchmark:
        "benchmarks/bench_skip/skip.tsv"
    params:
        seed=config["seed"],
        prompts=lambda wildcards: cli_args(config["prompts"]),
        bench=cli_args(config["bench"]),
        evaluation=cli_args(config["evaluation"]),
    threads: 2  # alone on the 2-core machine, so its timings are not shared with other jobs
    resources:
        mem_mb=4000,
    conda:
        "../../envs/mmskip.yaml"
    shell:
        "mmskip bench_skip --threads 2 --scenes {input.scenes} --features {input.features}"
        " --llm {input.llm} --mappers models/mapper --out {output.bench}"
        " --seed {params.seed} {params.prompts} {params.bench} {params.evaluation} > {log} 2>&1"

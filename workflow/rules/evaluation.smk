rule evaluate:
    input:
        scenes="data/scenes",
        features="results/features",
        llm="models/llm",
        mapper="models/mapper/{task}",
    output:
        predictions="results/eval/{task}/{variant}/predictions.json",
        metrics="results/eval/{task}/{variant}/metrics.json",
    log:
        "logs/evaluate/{task}-{variant}.log",
    benchmark:
        "benchmarks/evaluate/{task}-{variant}.tsv"
    params:
        # a function, so that Snakemake does not read {question} as a wildcard
        prompts=lambda wildcards: cli_args(config["prompts"]),
        args=cli_args(config["evaluation"]),
    threads: 1  # four jobs, two at a time on 2 cores
    resources:
        mem_mb=3000,
    conda:
        "../../envs/mmskip.yaml"
    shell:
        "mmskip evaluate --threads 1 --task {wildcards.task} --variant {wildcards.variant}"
        " --scenes {input.scenes} --features {input.features} --llm {input.llm}"
        " --mapper {input.mapper} --out results/eval/{wildcards.task}/{wildcards.variant}"
        " {params.prompts} {params.args} > {log} 2>&1"

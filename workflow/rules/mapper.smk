rule train_mapper:
    input:
        scenes="data/scenes",
        features="results/features",
        llm="models/llm",
    output:
        mapper=directory("models/mapper/{task}"),
        metrics="results/mapper/{task}.json",
    log:
        "logs/train_mapper/{task}.log",
    benchmark:
        "benchmarks/train_mapper/{task}.tsv"
    params:
        seed=config["seed"],
        # a function, so that Snakemake does not read {question} as a wildcard
        prompts=lambda wildcards: cli_args(config["prompts"]),
        args=cli_args(config["mapper"]),
    threads: 1  # one job per task, side by side
    resources:
        mem_mb=4000,
    conda:
        "../../envs/mmskip.yaml"
    shell:
        "mmskip train_mapper --task {wildcards.task} --scenes {input.scenes}"
        " --features {input.features} --llm {input.llm} --out {output.mapper}"
        " --metrics {output.metrics} --seed {params.seed} {params.prompts} {params.args}"
        " > {log} 2>&1"

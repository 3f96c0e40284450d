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
        # resumable checkpoints: outside the outputs, which Snakemake deletes when a job fails
        checkpoint_dir="checkpoints/train_mapper/{task}",
    threads: 1  # one job per task, side by side
    resources:
        mem_mb=4000,
    conda:
        "../../envs/mmskip.yaml"
    shell:
        "mmskip train_mapper --threads 1 --task {wildcards.task} --scenes {input.scenes}"
        " --features {input.features} --llm {input.llm} --out {output.mapper}"
        " --metrics {output.metrics} --checkpoint_dir {params.checkpoint_dir} --seed {params.seed}"
        " {params.prompts} {params.args}"
        " > {log} 2>&1"

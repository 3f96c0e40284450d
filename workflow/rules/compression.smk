# Compression of the frozen LLM: every mask is computed once under models/masks/{method} and
# read by the evaluations that need it. Wanda calibrates on each task's multimodal inputs
# through the trained mapper; the α-SubNet combines the tasks' Wanda masks into one.


rule prune:
    input:
        llm="models/llm",
    output:
        masks=directory("models/masks/{method}"),
    wildcard_constraints:
        method="magnitude|random",
    log:
        "logs/prune/{method}.log",
    benchmark:
        "benchmarks/prune/{method}.tsv"
    params:
        seed=config["seed"],
        compression=cli_args(config["compression"]),
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/mmskip.yaml"
    shell:
        "mmskip prune --threads 1 --method {wildcards.method} --llm {input.llm} --out {output.masks}"
        " --seed {params.seed} {params.compression} > {log} 2>&1"


rule prune_wanda:
    input:
        scenes="data/scenes",
        features="results/features",
        llm="models/llm",
        mappers=expand("models/mapper/{task}", task=TASKS),
    output:
        masks=directory("models/masks/wanda"),
    log:
        "logs/prune_wanda/wanda.log",
    benchmark:
        "benchmarks/prune_wanda/wanda.tsv"
    params:
        seed=config["seed"],
        prompts=lambda wildcards: cli_args(config["prompts"]),
        compression=cli_args(config["compression"]),
    threads: 1
    resources:
        mem_mb=3000,
    conda:
        "../../envs/mmskip.yaml"
    shell:
        "mmskip prune_wanda --threads 1 --llm {input.llm} --out {output.masks}"
        " --scenes {input.scenes} --features {input.features} --mappers models/mapper"
        " --seed {params.seed} {params.prompts} {params.compression} > {log} 2>&1"


rule subnet:
    input:
        llm="models/llm",
        wanda="models/masks/wanda",
    output:
        masks=directory("models/masks/subnet"),
    log:
        "logs/subnet/subnet.log",
    benchmark:
        "benchmarks/subnet/subnet.tsv"
    params:
        compression=cli_args(config["compression"]),
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/mmskip.yaml"
    shell:
        "mmskip subnet --threads 1 --masks {input.wanda} --llm {input.llm} --out {output.masks}"
        " {params.compression} > {log} 2>&1"


rule evaluate_compressed:
    input:
        scenes="data/scenes",
        features="results/features",
        llm="models/llm",
        mapper="models/mapper/{task}",
        masks="models/masks/{method}",
    output:
        metrics="results/compress/{task}/{method}/metrics.json",
        predictions="results/compress/{task}/{method}/predictions.json",
        timing="results/compress/{task}/{method}/timing.json",
    log:
        "logs/evaluate_compressed/{task}-{method}.log",
    benchmark:
        "benchmarks/evaluate_compressed/{task}-{method}.tsv"
    params:
        prompts=lambda wildcards: cli_args(config["prompts"]),
        compression=cli_args(config["compression"]),
        evaluation=cli_args(config["evaluation"]),
    threads: 1
    resources:
        mem_mb=3000,
    conda:
        "../../envs/mmskip.yaml"
    shell:
        "mmskip evaluate_compressed --threads 1 --task {wildcards.task} --method {wildcards.method}"
        " --masks {input.masks} --scenes {input.scenes} --features {input.features} --llm {input.llm}"
        " --mapper {input.mapper} --out results/compress/{wildcards.task}/{wildcards.method}"
        " {params.prompts} {params.compression} {params.evaluation} > {log} 2>&1"


# Training with compression: one mapper per task and variant, then one evaluation per task
# comparing inference-only compression with training under it (and the smaller LLM).


rule train_mapper_dense:  # the control: the same training on the uncompressed LLM
    input:
        scenes="data/scenes",
        features="results/features",
        llm="models/llm",
        init="models/mapper/{task}",
    output:
        mapper=directory("models/mapper_dense/{task}"),
        metrics="results/mapper_dense/{task}.json",
    log:
        "logs/train_mapper_dense/{task}.log",
    benchmark:
        "benchmarks/train_mapper_dense/{task}.tsv"
    params:
        seed=config["seed"],
        checkpoint_dir="checkpoints/train_mapper_dense/{task}",  # outside the outputs (resumption)
        mapper=cli_args(config["mapper"]),
        prompts=lambda wildcards: cli_args(config["prompts"]),
        compression=train_compression_args(config, "dense"),
    threads: 1
    resources:
        mem_mb=3000,
    conda:
        "../../envs/mmskip.yaml"
    shell:
        train_command("dense")


rule train_mapper_pruned:
    input:
        scenes="data/scenes",
        features="results/features",
        llm="models/llm",
        masks="models/masks/wanda",
        init="models/mapper/{task}",
    output:
        mapper=directory("models/mapper_pruned/{task}"),
        metrics="results/mapper_pruned/{task}.json",
    log:
        "logs/train_mapper_pruned/{task}.log",
    benchmark:
        "benchmarks/train_mapper_pruned/{task}.tsv"
    params:
        seed=config["seed"],
        checkpoint_dir="checkpoints/train_mapper_pruned/{task}",  # outside the outputs (resumption)
        mapper=cli_args(config["mapper"]),
        prompts=lambda wildcards: cli_args(config["prompts"]),
        compression=cli_args(config["compression"]),
    threads: 1
    resources:
        mem_mb=3000,
    conda:
        "../../envs/mmskip.yaml"
    shell:
        train_command("pruned")


rule train_mapper_skipped:
    input:
        scenes="data/scenes",
        features="results/features",
        llm="models/llm",
        init="models/mapper/{task}",
    output:
        mapper=directory("models/mapper_skipped/{task}"),
        metrics="results/mapper_skipped/{task}.json",
    log:
        "logs/train_mapper_skipped/{task}.log",
    benchmark:
        "benchmarks/train_mapper_skipped/{task}.tsv"
    params:
        seed=config["seed"],
        checkpoint_dir="checkpoints/train_mapper_skipped/{task}",  # outside the outputs (resumption)
        mapper=cli_args(config["mapper"]),
        prompts=lambda wildcards: cli_args(config["prompts"]),
        compression=train_compression_args(config, "skipped"),
    threads: 1
    resources:
        mem_mb=3000,
    conda:
        "../../envs/mmskip.yaml"
    shell:
        train_command("skipped")


rule train_mapper_small:
    input:
        scenes="data/scenes",
        features="results/features",
        llm="models/llm_small",
    output:
        mapper=directory("models/mapper_small/{task}"),
        metrics="results/mapper_small/{task}.json",
    log:
        "logs/train_mapper_small/{task}.log",
    benchmark:
        "benchmarks/train_mapper_small/{task}.tsv"
    params:
        seed=config["seed"],
        checkpoint_dir="checkpoints/train_mapper_small/{task}",  # outside the outputs (resumption)
        mapper=cli_args(config["mapper"]),
        prompts=lambda wildcards: cli_args(config["prompts"]),
        compression=train_compression_args(config, "small"),
    threads: 1
    resources:
        mem_mb=3000,
    conda:
        "../../envs/mmskip.yaml"
    shell:
        train_command("small")


rule evaluate_trained:
    input:
        scenes="data/scenes",
        features="results/features",
        llm="models/llm",
        llm_small="models/llm_small",
        mapper="models/mapper/{task}",
        trained=expand("models/mapper_{variant}/{{task}}", variant=TRAIN_VARIANTS),
        masks="models/masks/wanda",
    output:
        metrics="results/trained/{task}/metrics.json",
        predictions="results/trained/{task}/predictions.json",
    log:
        "logs/evaluate_trained/{task}.log",
    benchmark:
        "benchmarks/evaluate_trained/{task}.tsv"
    params:
        prompts=lambda wildcards: cli_args(config["prompts"]),
        compression=cli_args(config["compression"]),
        evaluation=cli_args(config["evaluation"]),
    threads: 1
    resources:
        mem_mb=3000,
    conda:
        "../../envs/mmskip.yaml"
    shell:
        "mmskip evaluate_trained --threads 1 --task {wildcards.task} --scenes {input.scenes} --features {input.features}"
        " --llm {input.llm} --llm_small {input.llm_small} --mapper {input.mapper} --trained_root models"
        " --masks {input.masks} --out results/trained/{wildcards.task}"
        " {params.prompts} {params.compression} {params.evaluation} > {log} 2>&1"

# The two pretraining jobs each take both cores of the 2-core default machine (the tokenizer is
# seconds long). Every torch command gets its thread count as a literal `--threads N` equal to
# the rule's `threads:` (not `{threads}`, which `--cores` can lower): float results depend on it,
# so Snakemake, DVC and SLURM runs compute the same bytes whatever the scheduler grants.


rule train_tokenizer:
    input:
        scenes="data/scenes",
    output:
        tokenizer=directory("models/tokenizer"),
    log:
        "logs/train_tokenizer/tokenizer.log",
    benchmark:
        "benchmarks/train_tokenizer/tokenizer.tsv"
    params:
        # a function, so that Snakemake does not read {question} as a wildcard
        prompts=lambda wildcards: cli_args(config["prompts"]),
        args=cli_args(config["tokenizer"]),
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/mmskip.yaml"
    shell:
        "mmskip train_tokenizer --scenes {input.scenes} --out {output.tokenizer}"
        " {params.prompts} {params.args} > {log} 2>&1"


rule pretrain_llm:
    input:
        scenes="data/scenes",
        tokenizer="models/tokenizer",
    output:
        llm=directory("models/{llm}"),
        metrics="results/foundation/{llm}.json",
    wildcard_constraints:
        llm="llm|llm_small",  # the LLM, and the smaller one (params llm_small)
    log:
        "logs/pretrain_llm/{llm}.log",
    benchmark:
        "benchmarks/pretrain_llm/{llm}.tsv"
    params:
        seed=config["seed"],
        prompts=lambda wildcards: cli_args(config["prompts"]),
        args=lambda wildcards: cli_args(config[wildcards.llm]),
    threads: 2  # the critical path: both cores once the encoder is done
    resources:
        mem_mb=4000,
    conda:
        "../../envs/mmskip.yaml"
    shell:
        "mmskip pretrain_llm --threads 2 --scenes {input.scenes} --tokenizer {input.tokenizer}"
        " --out {output.llm} --metrics {output.metrics} --seed {params.seed}"
        " {params.prompts} {params.args} > {log} 2>&1"


rule pretrain_encoder:
    input:
        scenes="data/scenes",
    output:
        encoder=directory("models/encoder"),
        metrics="results/foundation/encoder.json",
    log:
        "logs/pretrain_encoder/encoder.log",
    benchmark:
        "benchmarks/pretrain_encoder/encoder.tsv"
    params:
        seed=config["seed"],
        args=cli_args(config["encoder"]),
    threads: 2
    resources:
        mem_mb=4000,
    conda:
        "../../envs/mmskip.yaml"
    shell:
        "mmskip pretrain_encoder --threads 2 --scenes {input.scenes} --out {output.encoder}"
        " --metrics {output.metrics} --seed {params.seed} {params.args} > {log} 2>&1"

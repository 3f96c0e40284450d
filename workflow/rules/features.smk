rule cache_features:
    input:
        scenes="data/scenes",
        encoder="models/encoder",
    output:
        features=directory("results/features"),
    log:
        "logs/cache_features/features.log",
    benchmark:
        "benchmarks/cache_features/features.tsv"
    params:
        args=cli_args(config["features"]),
    threads: 1  # runs beside pretrain_llm
    resources:
        mem_mb=4000,
    conda:
        "../../envs/mmskip.yaml"
    shell:
        "mmskip cache_features --threads 1 --scenes {input.scenes} --encoder {input.encoder}"
        " --out {output.features} {params.args} > {log} 2>&1"

rule make_scenes:
    output:
        scenes=directory("data/scenes"),
    log:
        "logs/make_scenes/scenes.log",
    benchmark:
        "benchmarks/make_scenes/scenes.tsv"
    params:
        seed=config["seed"],
        args=cli_args(config["data"]),
    threads: 2  # nothing else can run yet
    resources:
        mem_mb=2000,
    conda:
        "../../envs/mmskip.yaml"
    shell:
        "mmskip make_scenes --out {output.scenes} --seed {params.seed} {params.args}"
        " > {log} 2>&1"

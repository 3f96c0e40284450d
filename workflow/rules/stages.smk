# Every rule of the pipeline, one per stage of the table in src/mmskip/stages.py (stage_table(config):
# STAGES for the embedded default, the paper-scale stages where config's `sources` asks), from
# which dvc.yaml is generated too: a stage's inputs, outputs, `mmskip` command, parameters and
# threads are read there, once for both tools. Each rule also takes the Python files its command
# imports (src/mmskip/..., the command's import closure) as inputs, so editing a module re-runs
# exactly the jobs whose command runs it, as DVC's file deps do.
#
# `shell:` goes through stage_shell (common.smk): Snakemake evaluates it again inside each job,
# where the loop variable holds the last stage; there `rule` names the job's own.
for stage in TABLE:

    rule:
        name:
            stage.name
        input:
            **stage_inputs(stage, config, PARAMS_FILE),
        output:
            **stage_outputs(stage, config),
        wildcard_constraints:
            **stage.wildcard_constraints(config),
        log:
            stage.log_path,
        benchmark:
            stage.benchmark_path
        params:
            **stage_params(stage, config),
        threads: stage.threads
        priority: stage.snakemake_priority(config)
        localrule: stage.local
        resources:
            **stage.resources(config),
        conda:
            "../../envs/mmskip.yaml"
        shell:
            stage_shell(locals(), stage)

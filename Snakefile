# mmskip pipeline: procedural scenes -> tokenizer, LLM, image encoder -> cached features ->
# mapper per task -> evaluation per task and input -> report. Every rule calls one
# `mmskip <rule>` command; dvc.yaml runs the same commands as DVC stages: both are made from the
# stage table in src/mmskip/stages.py (`python -m mmskip.stages --dvc dvc.yaml` regenerates dvc.yaml).
from snakemake.utils import min_version

min_version("9.0")


configfile: "params.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


# Before any rule reads config: a bad key fails here, naming the key and what is allowed.
validate_params(config, "workflow/schemas/params.schema.yaml")


# One rule per stage of src/mmskip/stages.py (stage_table: the table dvc.yaml is generated from),
# chosen by config's `sources` (the embedded default, or paper scale: --configfile configs/paper/*.yaml).
TABLE, STAGE = stages_of(config)
# what the report shows and reads: this run's config, --configfile and --config merged in
PARAMS_FILE = effective_params(config)


include: "workflow/rules/stages.smk"


rule all:
    input:
        "reports/all.html",
        "reports/summary.csv",

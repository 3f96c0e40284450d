# mmskip pipeline: procedural scenes -> tokenizer, LLM, image encoder -> cached features ->
# mapper per task -> evaluation per task and variant -> report. Every rule calls one
# `mmskip <rule>` command; dvc.yaml runs the same commands as DVC stages.
from snakemake.utils import min_version

min_version("9.0")


configfile: "params.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


# Before any rule reads config: a bad key fails here, naming the key and what is allowed.
validate_params(config, "workflow/schemas/params.schema.yaml")


include: "workflow/rules/data.smk"
include: "workflow/rules/foundation.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/mapper.smk"
include: "workflow/rules/evaluation.smk"
include: "workflow/rules/skipping.smk"
include: "workflow/rules/compression.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        "reports/all.html",
        "reports/summary.csv",

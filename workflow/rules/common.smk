# Constants and helper functions shared by workflow/rules/*.smk. Only functions and constants
# live here: `snakemake --lint` asks for no rules next to functions.

import difflib
from pathlib import Path

import jsonschema
import yaml
from snakemake.utils import validate

from mmskip.config import cli_args  # renders a params section as DVC's ${section} does
from mmskip.skipping.grid import REFERENCE  # "none": the unskipped engine on the grid's examples
from mmskip.skipping.plan import MODES as SKIP_MODES
from mmskip.compression.names import METHODS as PRUNE_METHODS, SUBNET, TRAIN_VARIANTS  # no torch

TASKS = ["vqa", "caption"]
VARIANTS = ["baseline", "blind"]


wildcard_constraints:
    task="|".join(TASKS),
    variant="|".join(VARIANTS),
    mode="|".join([REFERENCE, *SKIP_MODES]),
    method="|".join([*PRUNE_METHODS, SUBNET]),


def compression_methods(config):
    """The compression methods evaluated (params.yaml compression.methods)."""
    return list(config["compression"]["methods"])


def skip_modes(config):
    """The modes of params.yaml's skip grid, the reference "none" included."""
    return list(config["skipping"]["modes"])


# JSON Schema "integer" also accepts 48.0; the CLI's int() parser does not, so refuse floats.
_ParamsValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer",
        lambda checker, value: isinstance(value, int) and not isinstance(value, bool),
    ),
)

_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
    type(None): "null",
}


def validate_params(config, schema_path):
    """Check config against the JSON schema, then cross-field rules, before any job runs.

    Every problem is reported at once, each naming the dotted key, the value given and what is
    allowed. schema_path is relative to the folder of the main Snakefile.
    """
    if workflow.modifier.skip_validation:
        return
    schema_file = Path(workflow.basedir) / schema_path
    schema = yaml.safe_load(schema_file.read_text(encoding="utf-8"))
    problems = []
    for error in _ParamsValidator(schema).iter_errors(config):
        for problem in _describe_schema_error(error):
            if problem not in problems:
                problems.append(problem)
    if problems:
        raise ValueError(
            f"invalid params (params.yaml plus any --configfile/--config), see {schema_path}:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    validate(config, str(schema_file))  # snakemake's own check; also fills schema defaults
    check_params(config)


def check_params(config):
    """Rules across keys, which a JSON schema cannot express readably."""
    problems = []
    data = config["data"]
    if data["max_objects"] < data["min_objects"]:
        problems.append(
            f"data.max_objects = {data['max_objects']} is smaller than "
            f"data.min_objects = {data['min_objects']}; "
            "data.max_objects must be >= data.min_objects"
        )
    for section in ("llm", "llm_small", "encoder", "mapper"):
        values = config[section]
        if values["hidden_size"] % values["num_heads"]:
            problems.append(
                f"{section}.hidden_size = {values['hidden_size']} is not a multiple of "
                f"{section}.num_heads = {values['num_heads']}; "
                f"{section}.num_heads must divide {section}.hidden_size"
            )
    for section, steps in (("llm", "steps"), ("llm_small", "steps"), ("encoder", "steps"), ("mapper", "vqa_steps"),
                           ("mapper", "caption_steps")):
        values = config[section]
        if values["warmup_steps"] >= values[steps]:
            problems.append(
                f"{section}.warmup_steps = {values['warmup_steps']} is not below "
                f"{section}.{steps} = {values[steps]}; "
                f"{section}.warmup_steps must be < {section}.{steps}"
            )
    if problems:
        raise ValueError("invalid params:\n" + "\n".join(f"  - {p}" for p in problems))


def _describe_schema_error(error):
    """One line per problem: `<dotted key> = <value>: <what is wrong>; allowed: <...>`."""
    path = ".".join(str(part) for part in error.absolute_path)
    schema = error.schema
    if error.validator == "additionalProperties":
        allowed = list(schema.get("properties", {}))
        problems = []
        for key in error.instance:
            if key in allowed:
                continue
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                f"{_join(path, key)}: unknown key{hint}; "
                f"allowed keys in {path or 'the top level'}: {', '.join(allowed)}"
            )
        return problems
    if error.validator == "required":
        return [
            f"{_join(path, key)}: missing; {_join(path, key)} is required "
            f"({schema['properties'][key].get('description', '')})"
            for key in error.validator_value
            if key not in error.instance
        ]
    if error.validator == "type":
        wrong = f"is {_TYPE_NAMES.get(type(error.instance), type(error.instance).__name__)}"
        if schema.get("type") == "number" and isinstance(error.instance, str):
            wrong += " (YAML reads 1e-3 as text: write 1.0e-3 or 0.001)"
    elif error.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        wrong = "is out of range"
    elif error.validator == "enum":
        wrong = "is not an allowed value"
    elif error.validator == "pattern":
        wrong = "does not match the required pattern"
    else:
        wrong = error.message
    description = schema.get("description")
    return [
        f"{path or 'params'} = {error.instance!r} {wrong}; allowed: {_allowed(schema)}"
        + (f" ({description})" if description else "")
    ]


def _join(path, key):
    return f"{path}.{key}" if path else str(key)


def _allowed(schema):
    """What a schema accepts, in words: `an integer from 1 to 100`, `one of 'a', 'b'`."""
    if "enum" in schema:
        return "one of " + ", ".join(repr(v) for v in schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        return "a mapping with keys " + ", ".join(schema.get("properties", {}))
    text = {"integer": "an integer", "number": "a number", "string": "a string",
            "boolean": "true or false"}.get(kind, str(kind))
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    if "exclusiveMinimum" in schema or "exclusiveMaximum" in schema:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if 'exclusiveMinimum' in schema else '>='} {low}")
        if high is not None:
            bounds.append(f"{'<' if 'exclusiveMaximum' in schema else '<='} {high}")
        text += " " + " and ".join(bounds)
    elif low is not None and high is not None:
        text += f" from {low} to {high}"
    elif low is not None:
        text += f" >= {low}"
    elif high is not None:
        text += f" <= {high}"
    if "pattern" in schema:
        text += f" matching the regular expression {schema['pattern']}"
    if "minLength" in schema:
        text += f" of at least {schema['minLength']} character(s)"
    return text


def train_command(variant):
    """The shared shell command of the train_mapper_{variant} rules (compression.smk)."""
    extra = {"dense": " --init {input.init}", "pruned": " --masks {input.masks} --init {input.init}",
             "skipped": " --init {input.init}", "small": ""}[variant]
    return (
        f"mmskip train_mapper_{variant} --threads 1 --task {{wildcards.task}} --scenes {{input.scenes}}"
        f" --features {{input.features}} --llm {{input.llm}}{extra}"
        " --out {output.mapper} --metrics {output.metrics} --checkpoint_dir {params.checkpoint_dir}"
        " --seed {params.seed}"
        " {params.mapper} {params.prompts} {params.compression} > {log} 2>&1"
    )


# The compression keys each training variant reads: only these reach its command line (and so
# its rerun triggers), so adding a pruning sparsity does not retrain the skipped or small mappers.
# The pruned variant reads the masks folder, which any new mask changes anyway: it gets the section.
TRAIN_COMPRESSION_KEYS = {
    "dense": ["train_init", "train_vqa_steps", "train_caption_steps"],
    "skipped": ["train_skip_interval", "train_skip_start_layer", "train_init", "train_vqa_steps",
                "train_caption_steps"],
    "small": ["small_vqa_steps", "small_caption_steps"],
}


def train_compression_args(config, variant):
    """`--key value` flags of the compression keys the train_mapper_{variant} rule reads."""
    section = config["compression"]
    keys = TRAIN_COMPRESSION_KEYS.get(variant, list(section))
    return cli_args({key: section[key] for key in keys})

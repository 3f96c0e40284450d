# Constants and helper functions shared by workflow/rules/*.smk. Only functions and constants
# live here: `snakemake --lint` asks for no rules next to functions.

import difflib
import hashlib
from pathlib import Path

import jsonschema
import yaml
from snakemake.utils import validate

from mmskip.params import allowed_words, params_problems, renamed_hint  # torch-free: the params dataclasses
from mmskip.stages import ImportGraph, stage_table  # the stage table: the rules and dvc.yaml are made from it

# Code dependencies: the files of this checkout's src/mmskip each rule's command imports.
CODE = ImportGraph(workflow.basedir)


def stage_inputs(stage, config, params_file):
    """A rule's inputs: the stage's own (the report's skip grid expanded over config's lists) and
    the import closure of its command. A stage that reads params.yaml whole (the report) reads
    params_file instead: the config this run uses, --configfile and --config included."""
    inputs = stage.snakemake_inputs(config)
    if inputs.get("params") == "params.yaml":
        inputs["params"] = params_file
    return {**inputs, "code": CODE.closure(stage.command)}


def effective_params(config):
    """The config this run uses (params.yaml, then every --configfile and --config over it, as Snakemake
    merged them) as one file, for the report to show and read its lists from: params.yaml itself
    when nothing changed it, else .snakemake/mmskip/params-<its hash>.yaml. Written once per content,
    so its modification time never makes the report out of date by itself; another config is
    another file, which reruns the report."""
    if yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8")) == config:
        return "params.yaml"  # no --configfile or --config changed it: the command DVC runs too
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    path = Path(".snakemake") / "mmskip" / f"params-{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return str(path)


def stage_outputs(stage, config):
    """A rule's outputs: folders as directory(), files with a caption as report(); an output of a stage that runs
    over `each` itself (the skip grid's modes) is the list of its files, one per value in config."""
    outputs = {}
    for name, out in stage.outputs.items():
        if stage.each:
            outputs[name] = stage.expand_each(out.path, config)
        elif out.folder:
            outputs[name] = directory(out.path)
        elif out.caption:
            caption = str(Path(workflow.basedir) / out.caption)
            outputs[name] = report(out.path, caption=caption, category="Report")
        else:
            outputs[name] = out.path
    return outputs


def stage_shell(namespace, stage):
    """A rule's shell command. Snakemake evaluates `shell:` twice: when the rule is defined (at
    module level, where `stage` is this rule's stage) and inside the job's run function, where the
    loop variable holds the last stage but the local `rule` names the job's rule."""
    return STAGE[namespace["rule"]].snakemake_shell() if "rule" in namespace else stage.snakemake_shell()


def stages_of(config):
    """The stage table config selects (the embedded default's, or paper scale's: config `sources`), and
    its stages by name."""
    table = stage_table(config)
    return table, {stage.name: stage for stage in table}


def stage_params(stage, config):
    """A rule's params: functions, so that Snakemake does not read `{question}` of a prompt as a
    wildcard; each renders its params.yaml key as DVC renders it (`--key value` flags)."""
    return stage.snakemake_params(config)


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
    """Check config before any job runs: against the JSON schema (generated from mmskip.params),
    then with the dataclasses of mmskip.params, for the rules that span keys and sections (an N:M
    pattern with N >= M, a skip start layer past the LLM's depth, ...).

    Every problem is reported at once, each naming the dotted key, the value given and what is
    allowed. A section the schema refuses is not checked further. schema_path is relative to the
    folder of the main Snakefile.
    """
    if workflow.modifier.skip_validation:
        return
    schema_file = Path(workflow.basedir) / schema_path
    schema = yaml.safe_load(schema_file.read_text(encoding="utf-8"))
    problems, reported = [], set()
    for error in _ParamsValidator(schema).iter_errors(config):
        for problem in _describe_schema_error(error):
            if problem not in problems:
                problems.append(problem)
        reported |= _top_level_keys(error, schema)
    if isinstance(config, dict):
        problems += [p.describe(" = ") for p in params_problems(config, skip=reported)]
    if problems:
        raise ValueError(
            f"invalid params (params.yaml plus any --configfile/--config), see {schema_path} "
            "and src/mmskip/params.py:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    validate(config, str(schema_file))  # snakemake's own check; also fills schema defaults


def _top_level_keys(error, schema):
    """The top-level keys (sections) a schema error is about."""
    if error.absolute_path:
        return {error.absolute_path[0]}
    if error.validator == "required":
        return set(error.validator_value) - set(error.instance)
    if error.validator == "additionalProperties":
        return set(error.instance) - set(schema["properties"])
    return set()


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
            hint = renamed_hint(_join(path, key)) or (f" (did you mean {close[0]!r}?)" if close else "")
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
        f"{path or 'params'} = {error.instance!r} {wrong}; allowed: {allowed_words(schema)}"
        + (f" ({description})" if description else "")
    ]


def _join(path, key):
    return f"{path}.{key}" if path else str(key)

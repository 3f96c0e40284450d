"""The workflow layer: Snakefile lint, params validation messages, params.yaml <-> dataclass
configs, and the Snakemake rules <-> DVC stages correspondence. Nothing here runs a job."""

from __future__ import annotations

import dataclasses
import re
import shlex
import typing

import pytest
import yaml

from workflow_utils import (BIN, MASK_SETS, LLMS, PRUNE_STATIC, TRAIN_VARIANTS, REPO, RULES, TASKS, check, copy_workflow, dvc_commands,
                            dvc_init, job_counts, read_params, run, snakemake_commands,
                            write_params)

SCHEMA = yaml.safe_load((REPO / "workflow/schemas/params.schema.yaml").read_text(encoding="utf-8"))
PARAMS = read_params(REPO / "params.yaml")
JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean"}

# dvc 3.67 itself trips over a pygtrie deprecation when it builds its stage graph.
pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")


@pytest.fixture
def workflow(tmp_path):
    return copy_workflow(tmp_path / "wf")


def _key_schema(section: str, key: str) -> dict:
    return SCHEMA["properties"][section]["properties"][key]


def _dry_run(path, *args):
    result = run([BIN / "snakemake", "-n", *args], cwd=path)
    return result.returncode, result.stdout + result.stderr


# --- Snakefile ---------------------------------------------------------------------------------

def test_snakemake_lint_is_clean(workflow):
    result = run([BIN / "snakemake", "--lint"], cwd=workflow)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Lints for" not in output and "Congratulations" in output, output


def test_default_params_plan_every_job(workflow):
    code, output = _dry_run(workflow)
    assert code == 0, output
    assert job_counts(output) == {
        "all": 1, "make_scenes": 1, "make_clips": 1, "make_sounds": 1, "train_tokenizer": 1, "pretrain_llm": len(LLMS),
        "pretrain_encoder": 1, "pretrain_video_encoder": 1, "pretrain_audio_encoder": 1,
        "cache_features": 3, "train_mapper": len(TASKS), "evaluate": len(TASKS),  # a cache per dataset
        "baseline": len(TASKS), "evaluate_skip": len(TASKS), "bench_skip": 1, "report": 1,  # a grid job per task
        "evaluate_tokens": len(TASKS), "prune": len(PRUNE_STATIC), "prune_wanda": 1, "subnet": 1,
        "evaluate_compressed": len(TASKS), "evaluate_trained": len(TASKS),
        "train_compressed": len(TRAIN_VARIANTS) * len(TASKS)}


def test_the_task_list_makes_the_stages_of_those_tasks_alone(workflow):
    params = read_params(workflow / "params.yaml")
    params["tasks"] = ["caption"]
    params["compression"]["mask_sets"] = [m for m in MASK_SETS if m != "subnet"]  # the α-SubNet needs two tasks
    write_params(workflow / "params.yaml", params)
    code, output = _dry_run(workflow)
    assert code == 0, output
    assert job_counts(output) == {
        "all": 1, "make_scenes": 1, "train_tokenizer": 1, "pretrain_llm": len(LLMS), "pretrain_encoder": 1,
        "cache_features": 1, "train_mapper": 1, "evaluate": 1, "baseline": 1,
        "evaluate_skip": 1, "evaluate_tokens": 1, "bench_skip": 1, "report": 1, "prune": len(PRUNE_STATIC),
        "prune_wanda": 1, "evaluate_compressed": 1, "evaluate_trained": 1, "train_compressed": len(TRAIN_VARIANTS)}
    assert "results/eval/vqa" not in output and "models/mapper/vqa" not in output
    commands = snakemake_commands(workflow)
    for name in ("prune_wanda", "bench_skip"):  # Wanda calibrates on, and the benchmark decodes, these tasks only
        assert " --mappers models/mapper --tasks caption --" in commands[name], commands[name]
    assert " --eval results/eval/caption/multimodal results/eval/caption/blind --" in commands["report"]
    assert "--subnet" not in commands["report"]
    # dvc.yaml is made from the same list: the committed one (six tasks) is stale for these params
    stale = run([BIN / "python", "-m", "mmskip.stages", "--check", "dvc.yaml"], cwd=workflow)
    assert stale.returncode == 1, stale.stdout + stale.stderr
    check(run([BIN / "python", "-m", "mmskip.stages", "--dvc", "dvc.yaml"], cwd=workflow))
    dvc_init(workflow)
    assert dvc_commands(workflow) == commands


# --- params validation -------------------------------------------------------------------------

def _range(section, key):
    s = _key_schema(section, key)
    return f"an integer from {s['minimum']} to {s['maximum']}"


BAD_PARAMS = {
    "wrong type": (
        {"data": {"num_train": "many"}},
        ["data.num_train = 'many' is a string", f"allowed: {_range('data', 'num_train')}"]),
    "float for an integer": (
        {"llm": {"steps": 10.0}},
        ["llm.steps = 10.0 is a number", f"allowed: {_range('llm', 'steps')}"]),
    "YAML 1e-3 is text": (
        {"mapper": {"lr": "1e-3"}},
        ["mapper.lr = '1e-3' is a string", "write 1.0e-3 or 0.001", "allowed: a number > 0"]),
    "string for a boolean": (
        {"evaluation": {"spice": "yes"}},
        ["evaluation.spice = 'yes' is a string", "allowed: true or false"]),
    "unknown key": (
        {"mapper": {"num_querry_tokens": 4}},
        ["mapper.num_querry_tokens: unknown key", "did you mean 'num_query_tokens'?",
         "allowed keys in mapper: " + ", ".join(SCHEMA["properties"]["mapper"]["properties"])]),
    "renamed key": (
        {"compression": {"methods": ["wanda"]}},
        ["compression.methods: unknown key (renamed: compression.mask_sets)",
         "allowed keys in compression: " + ", ".join(SCHEMA["properties"]["compression"]["properties"])]),
    "unknown section": (
        {"sed": 1},
        ["sed: unknown key", "did you mean 'seed'?", "allowed keys in the top level: seed, seeds, tasks, runtime, sources"]),
    "unregistered task": (  # the stage table would make jobs for it; the registry holds what a task is
        {"tasks": ["vqa", "textvqa"]},
        ["tasks = ['vqa', 'textvqa']: 'textvqa' not registered; allowed a non-empty subset of "
         "['audio_caption', 'audio_qa', 'audiocaps', 'caption', 'clotho', 'clotho_aqa', 'gqa', 'msrvtt', 'msrvtt_qa', "
         "'okvqa', 'video_caption', 'video_qa', 'vqa'] without repeats (mmskip.tasks registry)"]),
    "a task of its own dataset on the scenes": (  # OK-VQA and GQA are downloaded at paper scale
        {"tasks": ["vqa", "okvqa", "gqa"]},
        ["tasks = ['vqa', 'okvqa', 'gqa'], sources.data = 'scenes': 'okvqa' reads dataset 'okvqa', 'gqa' reads "
         "dataset 'gqa', which paper scale downloads (sources.data: coco); the embedded default has the tasks "
         "['vqa', 'caption', 'video_qa', 'video_caption', 'audio_qa', 'audio_caption']"]),
    "one task and the α-SubNet": (  # subnet would fail in the job: it combines the masks of two tasks or more
        {"tasks": ["vqa"]},
        ["tasks = ['vqa'], compression.mask_sets = ['magnitude', 'wanda', 'random', 'subnet']: the α-SubNet "
         "combines the Wanda masks of two tasks or more: with one task, leave 'subnet' out of compression.mask_sets"]),
    "task listed twice": (
        {"tasks": ["vqa", "vqa"]},
        ["tasks = ['vqa', 'vqa']", "allowed: a non-empty list without repeats"]),
    "below minimum": (
        {"evaluation": {"num_beams": 0}},
        ["evaluation.num_beams = 0 is out of range", f"allowed: {_range('evaluation', 'num_beams')}"]),
    "above maximum": (
        {"data": {"max_objects": 99}},
        ["data.max_objects = 99 is out of range", f"allowed: {_range('data', 'max_objects')}"]),
    "not in enum": (
        {"evaluation": {"split": "dev"}},
        ["evaluation.split = 'dev' is not an allowed value", "allowed: one of 'train', 'val', 'test'"]),
    "section not a mapping": (
        {"report": 3},
        ["report = 3 is an integer", "allowed: a mapping with keys num_qualitative"]),
    # Rules across keys and sections (mmskip.params): each key is allowed alone.
    "max_objects < min_objects": (
        {"data": {"min_objects": 4, "max_objects": 2}},
        ["data.min_objects = 4, data.max_objects = 2: min_objects must not exceed max_objects"]),
    "heads do not divide width": (
        {"encoder": {"hidden_size": 96, "num_heads": 5}},
        ["encoder.hidden_size = 96, encoder.num_heads = 5: num_heads must divide hidden_size"]),
    "warmup not below steps": (
        {"llm": {"steps": 50, "warmup_steps": 50}},
        ["llm.warmup_steps = 50, llm.steps = 50: warmup_steps must be below steps"]),
    "N:M with N >= M": (  # the schema's pattern N:M allows it; pruning would fail in the job
        {"pruning": {"nm_patterns": ["5:4"]}},
        ["pruning.nm_patterns = ['5:4']: each 'N:M' must have 0 < N < M (e.g. '2:4')"]),
    "hub id malformed": (
        {"sources": {"llm": "opt-2.7b"}},
        ["sources.llm = 'opt-2.7b' does not match the required pattern"]),
    "dataset without hub models": (  # the pipeline pretrains its own models only on the scenes
        {"tasks": ["vqa", "caption"], "sources": {"data": "coco", "llm": "facebook/opt-2.7b"}},
        ["sources.data = 'coco', sources.llm_small = '', sources.encoder = '': sources.data 'coco' needs a hub id "
         "for llm_small, encoder"]),
    "llava with a trained pipeline's model": (  # LLaVA runs without training: one config is one setup
        {"tasks": ["vqa", "caption"], "sources": {"data": "coco", "llava": "llava-hf/llava-1.5-7b-hf",
                                                  "llm": "facebook/opt-2.7b"}},
        ["sources.llava = 'llava-hf/llava-1.5-7b-hf', sources.llm = 'facebook/opt-2.7b': sources.llava runs "
         "llava-hf/llava-1.5-7b-hf alone, without training: sources llm would be unused"]),
    "start layer past the LLM": (  # evaluate_skip would fail in the job (grid_points)
        {"skipping": {"start_layers": [7]}},
        ["skipping.start_layers = [7], llm.num_layers = 6: each start layer must be from -1 to 4 "
         "(llm.num_layers - 2)"]),
    "skipped mapper skipping nothing": (  # train_compressed would fail in the job (train_skip_plan)
        {"train_compressed": {"start_layer": 5}},
        ["train_compressed.interval = 2, train_compressed.start_layer = 5, llm.num_layers = 6: "
         "the skipped mapper's plan must skip at least one layer"]),
}


@pytest.mark.parametrize("override, expected", BAD_PARAMS.values(), ids=BAD_PARAMS.keys())
def test_bad_params_fail_before_any_job_naming_key_and_allowed(workflow, override, expected):
    (workflow / "bad.yaml").write_text(yaml.safe_dump(override), encoding="utf-8")
    code, output = _dry_run(workflow, "--configfile", "bad.yaml")
    assert code != 0, output
    assert "ValueError" in output and "Job stats" not in output, output
    for text in expected:
        assert text in output, f"{text!r} not in:\n{output}"


def test_all_problems_are_reported_at_once(workflow):
    (workflow / "bad.yaml").write_text(
        yaml.safe_dump({"data": {"num_train": 0, "noise_std": "loud"}, "report": {"extra": 1},
                        "skipping": {"drop_last": [6]}, "pruning": {"nm_patterns": ["5:4"]}}),
        encoding="utf-8")
    code, output = _dry_run(workflow, "--configfile", "bad.yaml")
    assert code != 0
    for key in ("data.num_train = 0", "data.noise_std = 'loud'", "report.extra: unknown key",
                "skipping.drop_last = [6], llm.num_layers = 6", "pruning.nm_patterns = ['5:4']"):
        assert key in output, output


def test_missing_key_is_named(workflow):
    params = read_params(workflow / "params.yaml")
    del params["data"]["num_val"]
    write_params(workflow / "params.yaml", params)
    code, output = _dry_run(workflow)
    assert code != 0
    assert "data.num_val: missing; data.num_val is required" in output, output


# --- schema <-> params.yaml <-> dataclass configs ----------------------------------------------

def test_schema_documents_every_key_with_the_embedded_default():
    assert SCHEMA["additionalProperties"] is False
    assert set(SCHEMA["required"]) == set(SCHEMA["properties"]) == set(PARAMS)
    assert SCHEMA["properties"]["seed"]["default"] == PARAMS["seed"]
    for section, values in PARAMS.items():
        if not isinstance(values, dict):
            continue
        sub = SCHEMA["properties"][section]
        assert sub["additionalProperties"] is False and sub["description"], section
        assert set(sub["required"]) == set(sub["properties"]) == set(values), section
        for key, value in values.items():
            s = sub["properties"][key]
            assert s["description"], f"{section}.{key}"
            assert s["default"] == value, f"{section}.{key}: schema default {s['default']!r} != params.yaml {value!r}"


def test_params_sections_match_dataclass_fields():
    from mmskip.cli import SECTION_CONFIGS

    sections = {k for k, v in PARAMS.items() if isinstance(v, dict)}
    assert sections == set(SECTION_CONFIGS), "params.yaml sections vs mmskip.cli.SECTION_CONFIGS"
    for section, cls in SECTION_CONFIGS.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(PARAMS[section]) == fields, (
            f"params.yaml [{section}] vs {cls.__name__}: only in params.yaml "
            f"{sorted(set(PARAMS[section]) - fields)}, only in the dataclass {sorted(fields - set(PARAMS[section]))}")


def test_schema_types_match_dataclass_types_and_defaults_build_configs():
    from mmskip.cli import SECTION_CONFIGS

    for section, cls in SECTION_CONFIGS.items():
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            expected = JSON_TYPES.get(hints[field.name])
            if expected is not None:
                assert _key_schema(section, field.name)["type"] == expected, f"{section}.{field.name}"
        cls(**PARAMS[section])  # the embedded defaults pass the dataclass's own checks


# --- Snakemake rules <-> DVC stages <-> CLI ----------------------------------------------------

@pytest.fixture
def dvc_workflow(workflow):
    dvc_init(workflow)
    return workflow


def test_dvc_config_unpacks_like_cli_args():
    from dvc.parsing.interpolate import to_str
    from dvc.repo import Repo

    from mmskip.config import cli_args

    with Repo(str(REPO)) as repo:
        parsing = dict(repo.config["parsing"])
    assert parsing == {"bool": "boolean_optional", "list": "nargs"}
    section = {"n": 3, "lr": 0.002, "name": "a b {x}", "on": True, "off": False,
               "sizes": [1, 2], "words": ["x y", "z"], "maybe": None}
    assert cli_args(section) == to_str(section, config=parsing)


def test_stage_names_mirror_rule_names(dvc_workflow):
    stages = set(dvc_commands(dvc_workflow))
    per_task = ("train_mapper", "baseline", "evaluate_skip", "evaluate_tokens", "evaluate_compressed",
                "evaluate_trained")
    expected = ({r for r in RULES if r not in ("evaluate", "prune", "pretrain_llm", "train_compressed",
                                               "cache_features", *per_task)}
                | {f"cache_features@{d}" for d in ("scenes", "clips", "sounds")}  # a cache per dataset
                | {f"train_compressed@{v}-{t}" for v in TRAIN_VARIANTS for t in TASKS}
                | {f"{r}@{t}" for r in per_task for t in TASKS}
                | {f"pretrain_llm@{m}" for m in LLMS}
                | {f"train_mapper@{t}" for t in TASKS}
                | {f"evaluate@{t}" for t in TASKS}
                | {f"prune@{m}" for m in PRUNE_STATIC})
    assert stages == expected


def test_snakemake_and_dvc_run_identical_commands(dvc_workflow):
    from mmskip.stages import jobs

    snakemake = snakemake_commands(dvc_workflow)
    dvc = dvc_commands(dvc_workflow)
    assert set(snakemake) == set(dvc)
    # the one stage table both are made from renders the same command for every job
    assert {job.name: job.stage.render(PARAMS, job.wildcards) for job in jobs(PARAMS)} == dvc
    for name, cmd in dvc.items():
        assert snakemake[name] == cmd, f"{name}\n snakemake: {snakemake[name]}\n dvc:       {cmd}"
        assert shlex.split(cmd)[:2] == ["mmskip", name.split("@")[0]], name


def test_commands_parse_with_the_cli_and_round_trip_params(dvc_workflow):
    from mmskip.cli import SECTION_CONFIGS, build_parser
    from mmskip.config import cli_args, dataclass_from_args

    parser = build_parser()
    for name, cmd in dvc_commands(dvc_workflow).items():
        args = parser.parse_args(shlex.split(cmd)[1:])
        assert args.command == name.split("@")[0]
        for section, cls in SECTION_CONFIGS.items():
            if cli_args(PARAMS[section]) in cmd:
                assert dataclass_from_args(cls, args) == cls(**PARAMS[section]), (name, section)


def _rule_graph(path) -> set[tuple[str, str]]:
    dot = check(run([BIN / "snakemake", "--rulegraph", "--forceall", "--quiet", "all"], cwd=path)).stdout
    labels = dict(re.findall(r"^\s*(\d+)\[label = \"(\w+)\"", dot, re.M))
    edges = {(labels[a], labels[b]) for a, b in re.findall(r"^\s*(\d+) -> (\d+)", dot, re.M)}
    return {(a, b) for a, b in edges if b != "all"}


def _wildcard_names(path) -> dict[str, list[str]]:
    """Rule -> its wildcard names, in the order DVC's stage names join their values."""
    out = check(run([BIN / "snakemake", "-n", "--forceall", "--quiet", "progress"], cwd=path))
    names: dict[str, list[str]] = {}
    for block in re.split(r"\n(?=rule \w+:\n)", out.stdout + out.stderr):
        header = re.match(r"rule (\w+):\n", block)
        if header:
            wildcards = re.search(r"^\s+wildcards: (.*)$", block, re.M)
            names[header.group(1)] = [w.split("=", 1)[0] for w in wildcards.group(1).split(", ")] if wildcards else []
    return names


def _job_graph(path) -> set[tuple[str, str]]:
    """Edges (upstream job, downstream job) of `snakemake --dag`, jobs named as DVC names stages.

    A DAG node's label shows only the wildcards its dependencies lack; the others are its
    upstream jobs' values, which must agree.
    """
    dot = check(run([BIN / "snakemake", "--dag", "--forceall", "--quiet", "all"], cwd=path)).stdout
    nodes = {}
    for node, label in re.findall(r'^\s*(\d+)\[label = "([^"]+)"', dot, re.M):
        rule, *pairs = label.split("\\n")
        nodes[node] = (rule, dict(p.split(": ", 1) for p in pairs))
    edges = re.findall(r"^\s*(\d+) -> (\d+)", dot, re.M)
    deps: dict[str, set[str]] = {n: set() for n in nodes}
    for a, b in edges:
        deps[b].add(a)
    names = _wildcard_names(path)

    resolved: dict[str, dict[str, str]] = {}

    def wildcards(node):  # the job's own wildcards: shown on it, or else its direct dependencies' values
        if node not in resolved:
            rule, own = nodes[node]
            values = {}
            for name in names.get(rule, []):
                found = {own[name]} if name in own else {wildcards(d)[name] for d in deps[node] if name in wildcards(d)}
                assert len(found) == 1, (rule, name, found)
                values[name] = found.pop()
            resolved[node] = values
        return resolved[node]

    def job_name(node):
        values = list(wildcards(node).values())
        return f"{nodes[node][0]}@{'-'.join(values)}" if values else nodes[node][0]

    return {(job_name(a), job_name(b)) for a, b in edges if nodes[b][0] != "all"}


def test_dvc_dag_has_the_jobs_and_edges_of_snakemake_dag(dvc_workflow):
    from dvc.repo import Repo

    with Repo(str(dvc_workflow)) as repo:
        graph = repo.index.graph  # edge: stage -> a stage it depends on
        stages = {stage.name for stage in repo.index.stages}
        stage_edges = {(up.name, down.name) for down, up in graph.edges}
    job_edges = _job_graph(dvc_workflow)
    assert {j for e in job_edges for j in e} == stages
    assert job_edges == stage_edges


def test_dvc_stage_graph_matches_snakemake_rule_graph(dvc_workflow):
    from dvc.repo import Repo

    with Repo(str(dvc_workflow)) as repo:
        graph = repo.index.graph  # edge: stage -> a stage it depends on
        stage_edges = {(up.name, down.name) for down, up in graph.edges}
    rule_edges = {(a.split("@")[0], b.split("@")[0]) for a, b in stage_edges}
    assert rule_edges == _rule_graph(dvc_workflow)
    # evaluation of a task (every input) uses that task's mapper only
    for task in TASKS:
        mappers = {a for a, b in stage_edges if b == f"evaluate@{task}" and a.startswith("train_mapper@")}
        assert mappers == {f"train_mapper@{task}"}


@pytest.mark.parametrize("name", ["params.yaml", "workflow/schemas/params.schema.yaml", "dvc.yaml"])
def test_yaml_files_repeat_no_key(name):
    """YAML keeps the last of two equal keys silently: a repeated key hides an edit."""

    class Strict(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        keys = [loader.construct_object(k, deep=True) for k, _ in node.value]
        repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
        assert not repeated, f"{name} line {node.start_mark.line + 1}: repeated keys {repeated}"
        return loader.construct_mapping(node, deep)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    yaml.load((REPO / name).read_text(encoding="utf-8"), Strict)

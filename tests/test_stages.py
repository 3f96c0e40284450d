"""The stage table (mmskip.stages): dvc.yaml is generated from it, byte for byte; code dependencies
are the import closures of the commands; an edited module makes Snakemake and DVC name the same
stale jobs. Nothing here runs a job."""

from __future__ import annotations

import shlex
import textwrap

import pytest

from mmskip.compression.names import TRAIN_VARIANTS
from mmskip.stages import (STAGE, STAGES, ImportGraph, Priority, Stage, Var, folder, jobs, main, out,
                           render_dvc_yaml)
from workflow_utils import (BIN, REPO, check, copy_workflow, dvc_init, read_params, run, snakemake_priorities,
                            snakemake_reasons, updated_inputs)

# dvc 3.67 itself trips over a pygtrie deprecation when it builds its stage graph.
pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")

# The module the staleness test edits: one that some commands import, not others (the skip engine: every decoding
# stage, no data or pretraining stage)
EDITED = ("src/mmskip/skipping/engine.py",)


def test_dvc_yaml_is_generated_from_the_stage_table():
    generated = render_dvc_yaml(REPO)
    assert (REPO / "dvc.yaml").read_text(encoding="utf-8") == generated, (
        "dvc.yaml is stale: regenerate it with `python -m mmskip.stages --dvc dvc.yaml` "
        "(after editing src/mmskip/stages.py or an import under src/mmskip)")


def test_generator_writes_and_checks(tmp_path):
    workflow = copy_workflow(tmp_path / "wf")
    (workflow / "dvc.yaml").unlink()
    assert main(["--dvc", str(workflow / "dvc.yaml")]) == 0
    assert main(["--check", str(workflow / "dvc.yaml")]) == 0
    assert (workflow / "dvc.yaml").read_text(encoding="utf-8") == render_dvc_yaml(REPO)
    (workflow / "src/mmskip/added.py").write_text("", encoding="utf-8")
    with open(workflow / "src/mmskip/cli.py", "a", encoding="utf-8") as f:
        f.write("\nimport mmskip.added  # a new module every command imports\n")
    assert main(["--check", str(workflow / "dvc.yaml")]) == 1
    assert "src/mmskip/added.py" in render_dvc_yaml(workflow)


def test_table_names_match_the_cli():
    from mmskip.cli import COMMANDS
    from mmskip.stages import PREPARE_OWN, TASKS, trained_stages
    from mmskip.tasks import GENERATED_DATASETS, TASKS as REGISTRY

    audio = ["vqa", "audio_qa"]  # an embedded audio task: the sounds' stages join the table

    assert {stage.name for stage in (*STAGES, *PREPARE_OWN.values())} <= set(COMMANDS)
    assert len(STAGE) == len(STAGES)
    # the table's tasks: the registered ones of the run's dataset (OK-VQA and GQA have datasets of their own)
    assert list(TASKS) == [name for name, task in REGISTRY.items() if not task.dataset] == ["vqa", "caption"]
    # every dataset a task names is prepared from downloads (paper scale) or generated (the embedded sounds)
    assert {task.dataset for task in REGISTRY.values()} - {""} == set(PREPARE_OWN) | set(GENERATED_DATASETS)
    assert {stage.name for stage in trained_stages(audio)} - set(STAGE) == {"make_sounds",
                                                                                  "pretrain_audio_encoder"}


def test_each_seed_after_the_first_trains_every_mapper_again_and_decodes_its_baseline_for_the_report():
    """params seeds: one replica per seed after the first and task (its mapper, its baseline decode); the report
    reads every replica; one seed (the default) adds no job."""
    from mmskip.params import merged

    params = read_params(REPO / "params.yaml")
    assert not [job for job in jobs(params) if "seed" in job.name.split("@")[0]]
    replicated = merged(params, {"seeds": [0, 3, 4]})
    every = {job.name: job for job in jobs(replicated)}
    tasks = params["tasks"]
    assert {name for name in every if name.startswith(("train_mapper_seed@", "baseline_seed@"))} == {
        f"{stage}@{seed}-{task}" for stage in ("train_mapper_seed", "baseline_seed") for seed in (3, 4)
        for task in tasks}
    job = every["train_mapper_seed@3-vqa"]
    assert [o.path for o in job.outputs()] == ["models/mapper_seeds/3/vqa", "results/mapper_seeds/3/vqa.json"]
    assert "--seed {wildcards.seed}" in job.stage.cmd
    assert every["baseline_seed@4-caption"].stage.inputs["mapper"] == "models/mapper_seeds/{seed}/{task}"
    report = every["report"].stage
    assert " --seeds_root results/seeds --seeds 3 4 " in report.cmd
    assert set(report.inputs["seeds"]) == {f"results/seeds/{s}/{t}/metrics.json" for s in (3, 4) for t in tasks}


def test_the_training_variants_listed_are_the_jobs_and_inputs_of_training_with_compression():
    """params train_compressed.variants: a train_compressed job per listed variant and task; evaluate_trained reads
    their mappers, the smaller LLM (pretrained only then) where small is listed and the Wanda masks where pruned is."""
    from mmskip.params import merged

    params = read_params(REPO / "params.yaml")
    every = {job.name: job for job in jobs(params)}
    assert {name for name in every if name.startswith("pretrain_llm@")} == {"pretrain_llm@llm", "pretrain_llm@llm_small"}
    for variants, llms in ((["pruned"], ["llm"]), (["small", "dense"], ["llm", "llm_small"])):
        chosen = {job.name: job for job in jobs(merged(params, {"train_compressed": {"variants": variants}}))}
        trained = {name.split("@")[1].split("-")[0] for name in chosen if name.startswith("train_compressed@")}
        assert trained == set(variants)
        assert sorted(name.split("@")[1] for name in chosen if name.startswith("pretrain_llm@")) == llms
        assert set(every) - set(chosen) == {f"train_compressed@{v}-{t}" for v in TRAIN_VARIANTS if v not in variants
                                            for t in params["tasks"]} | ({"pretrain_llm@llm_small"} if llms == ["llm"]
                                                                          else set())
        job = chosen["evaluate_trained@vqa"]
        command = job.stage.render(params | {"train_compressed": {**params["train_compressed"], "variants": variants}},
                                   job.wildcards)
        assert (" --llm_small models/llm_small " in command) == ("small" in variants)
        assert (" --masks models/masks/wanda " in command) == ("pruned" in variants)
        assert f" --variants {' '.join(v for v in TRAIN_VARIANTS if v in variants)} " in command, command
        inputs = job.stage.snakemake_inputs(params)
        assert list(inputs["trained"]) == [f"models/mapper_{v}/{{task}}" for v in TRAIN_VARIANTS if v in variants]
    with pytest.raises(ValueError, match=r"train_compressed.variants \['tiny'\]: allowed \['dense', 'pruned', "
                                         r"'skipped', 'small'\]"):
        jobs(merged(params, {"train_compressed": {"variants": ["pruned", "tiny"]}}))


def test_snakemake_starts_the_foundation_then_the_longest_mappers_and_the_evaluations_last():
    """The order Snakemake picks among ready jobs (Stage.priority), over the default's whole DAG: the generated data
    (the clips not left waiting behind an encoder), the tokenizer, the encoders and their features; the smaller LLM, then the LLM every mapper waits for; the mappers, the longest
    training first; Wanda's masks and training with compression; every evaluation last, filling the cores, a task's
    skip grid, token grid and compression sets first among them. Each level is more than twice the next (Snakemake
    maximizes the sum over the jobs it starts together)."""
    priorities = snakemake_priorities(REPO)
    encoding = {name for name in priorities if name.split("@")[0] in (
        "train_tokenizer", "pretrain_encoder", "pretrain_video_encoder", "pretrain_audio_encoder", "cache_features")}
    mappers = {name: p for name, p in priorities.items() if name.startswith("train_mapper@")}
    after = {"prune_wanda", *(name for name in priorities if name.startswith("train_compressed@"))}
    grids = {name for name in priorities if name.split("@")[0] in ("evaluate_skip", "evaluate_tokens",
                                                                      "evaluate_compressed")}
    assert len(encoding) == 1 + 3 + 3 and len(mappers) == 6 and len(after) == 1 + 4 * 6 and len(grids) == 3 * 6
    assert {name: p for name, p in priorities.items() if p and name not in mappers} == {
        "make_scenes": 250, "make_clips": 250, "make_sounds": 250, **{name: 100 for name in encoding}, "pretrain_llm@llm_small": 40, "pretrain_llm@llm": 15,
        **{name: 2 for name in after}, **{name: 0.5 for name in grids}}
    # 5 and less than 1 more, growing with the mapper's steps: vqa 2000, audio_qa 800 (share 0.4), caption and
    # video_qa 500 (share 0.25), audio_caption 200, video_caption 125
    order = sorted(mappers, key=mappers.get, reverse=True)
    assert order[:2] == ["train_mapper@vqa", "train_mapper@audio_qa"]
    assert set(order[2:4]) == {"train_mapper@caption", "train_mapper@video_qa"}
    assert order[4:] == ["train_mapper@audio_caption", "train_mapper@video_caption"]
    assert all(5 < p < 6 for p in mappers.values())
    assert mappers["train_mapper@video_qa"] == mappers["train_mapper@caption"] == pytest.approx(5 + 500 / 1500)
    levels = [250, 100, 40, 15, 6, 2, 0.5]  # the largest priority of each level (a mapper's: under 6)
    assert all(a > 2 * b for a, b in zip(levels, levels[1:]))
    assert sum(1 for name in priorities if name.startswith("evaluate@")) == 6  # at priority 0


def test_a_priority_names_a_variable_of_its_stage():
    with pytest.raises(ValueError, match=r"stage x: Priority\(var='llm'\) names no variable of the stage"):
        Stage("x", "mmskip x", outputs={"a": out("a")}, log="x", priority=Priority("llm", {"llm": 1}))
    stage = Stage("x", "mmskip x", outputs={"a": out("a")}, log="x", priority=2)
    assert stage.snakemake_priority({}) == 2


def test_one_job_per_task_writes_every_skip_mode_and_every_mask_set():
    """A stage's ``each`` variables are run by the job itself: evaluate_skip@vqa writes every mode's files, as both
    tools declare them (so the report's inputs, one per mode, are that job's outputs); a folder per value, or an
    output naming no variable of the stage, is refused."""
    params = read_params(REPO / "params.yaml")
    modes, sets = params["skipping"]["modes"], params["compression"]["mask_sets"]
    by_name = {job.name: job for job in jobs(params)}
    assert not any(name.startswith(("evaluate_skip@vqa-", "evaluate_compressed@vqa-")) for name in by_name)
    files = ("metrics", "predictions", "timing")
    assert sorted(o.path for o in by_name["evaluate_skip@vqa"].outputs()) == sorted(
        f"results/skip/vqa/{m}/{f}.json" for m in modes for f in files)
    assert sorted(o.path for o in by_name["evaluate_compressed@caption"].outputs()) == sorted(
        f"results/compress/caption/{s}/{f}.json" for s in sets for f in files)
    grid = by_name["evaluate_skip@vqa"].stage  # the table of params (the tasks read datasets of their own)
    body = grid.dvc_stage([], params)["do"]
    assert body["metrics"] == [{f"results/skip/${{item.task}}/{m}/metrics.json": {"cache": False}} for m in modes]
    assert grid.render(params, {"task": "vqa"}).count("--out results/skip/vqa ") == 1
    report = by_name["report"].stage.snakemake_inputs(params)["skip"]
    assert set(report) == {o.path for t in params["tasks"] for o in by_name[f"evaluate_skip@{t}"].outputs()}
    with pytest.raises(ValueError, match=r"stage x: output a 'a/\{mode\}.json' names \['mode'\], not variables"):
        Stage("x", "mmskip x", outputs={"a": out("a/{mode}.json")}, log="x")
    with pytest.raises(ValueError, match=r"stage x: output a is a folder per value of `each`: list its files"):
        Stage("x", "mmskip x", outputs={"a": folder("a/{mode}")}, log="x", each=(Var("mode", "skipping.modes"),))


def test_report_reads_only_declared_paths():
    """Every path argument of `mmskip report` is an input or output of its rule (or a folder holding
    some), but benchmarks/, which only Snakemake writes and the report reads when present."""
    from mmskip.cli import build_parser

    stage = STAGE["report"]
    params = read_params(REPO / "params.yaml")
    inputs = [p for value in stage.snakemake_inputs(params).values()
              for p in ([value] if isinstance(value, str) else value)]
    declared = inputs + [out.path for out in stage.outputs.values()]
    args = build_parser().parse_args(shlex.split(stage.render(params))[1:])
    for flag, value in vars(args).items():
        for path in value if isinstance(value, list) else [value]:
            if not hasattr(path, "as_posix") or flag == "benchmarks":
                continue
            path = path.as_posix()
            assert any(path == d or d.startswith(path + "/") or path.startswith(d + "/") for d in declared), (
                flag, path)
    assert {"params.yaml", "dvc.yaml"} <= set(inputs)


def _package(root, files: dict[str, str]):
    for name, text in files.items():
        path = root / "src" / "mmskip" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


def test_import_closure_follows_the_handler_and_every_import_it_runs(tmp_path):
    _package(tmp_path, {
        "__init__.py": "",
        "cli.py": """
            from mmskip.params import SECTIONS

            def fast(args):
                from mmskip.light import run
                _helper()

            def slow(args):
                from mmskip.heavy.model import run

            def _helper():
                import mmskip.helped

            def build_parser():
                from mmskip.names import TASKS

            def main():
                build_parser()

            COMMANDS = {"fast": (fast, [], [], []), "slow": (slow, [], [], [])}
            """,
        "params.py": "from .names import TASKS\n",
        "names.py": "TASKS = ('a',)\n",
        "light.py": "def run():\n    from mmskip.heavy import CONSTANT  # runs heavy/__init__.py only\n",
        "helped.py": "",
        "heavy/__init__.py": "CONSTANT = 1\n",
        "heavy/model.py": "from . import layers\nfrom ..names import TASKS\n",
        "heavy/layers.py": "",
        "unused.py": "import mmskip.heavy.model\n",
    })
    graph = ImportGraph(tmp_path)
    common = {"__init__.py", "cli.py", "params.py", "names.py"}
    assert graph.closure("fast") == sorted(f"src/mmskip/{p}" for p in common | {
        "light.py", "helped.py", "heavy/__init__.py"})
    assert graph.closure("slow") == sorted(f"src/mmskip/{p}" for p in common | {
        "heavy/__init__.py", "heavy/model.py", "heavy/layers.py"})
    with pytest.raises(ValueError, match="no handler of command 'missing'"):
        graph.closure("missing")


def _placeholder_outputs(workflow, params):
    """Every output of every job, as a small file (a folder holding one): the state after a run."""
    for job in jobs(params):
        for out in job.outputs():
            path = workflow / out.path
            if out.folder:
                path.mkdir(parents=True, exist_ok=True)
                path = path / "placeholder"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{job.name}\n", encoding="utf-8")


def _dvc_status(workflow) -> set[str]:
    import json

    return set(json.loads(check(run([BIN / "dvc", "status", "--json"], cwd=workflow)).stdout))


def _rule_levels(dag) -> list[list[str]]:
    """The rules grouped by their depth in the stage graph: no rule of a group reads another's outputs."""
    import networkx as nx

    depth: dict[str, int] = {}
    for stage in reversed(list(nx.topological_sort(dag))):  # edges point upstream: reversed = upstream first
        rule = stage.name.split("@")[0]
        below = [depth[up.name.split("@")[0]] + 1 for up in dag.successors(stage)]
        depth[rule] = max([depth.get(rule, 0), *below])
    levels: dict[int, list[str]] = {}
    for rule, level in depth.items():
        levels.setdefault(level, []).append(rule)
    return [sorted(levels[level]) for level in sorted(levels)]


def test_an_edited_module_makes_the_same_jobs_stale_in_both_tools(tmp_path):
    """Edit a module of src/mmskip/skipping: `snakemake -n` and `dvc status` name the same stale jobs,
    exactly those whose command's import closure holds the module; Snakemake schedules the jobs
    downstream of them too, and nothing else. Then the edit is undone, and both are clean again."""
    import os

    import networkx as nx
    from dvc.repo import Repo

    workflow = copy_workflow(tmp_path / "wf")
    dvc_init(workflow)
    params = read_params(workflow / "params.yaml")
    _placeholder_outputs(workflow, params)
    # DVC records every output and dep (rewriting its cached files), then Snakemake marks its jobs
    # done in DAG order: both up to date.
    check(run([BIN / "dvc", "commit", "--force", "--quiet"], cwd=workflow))
    check(run([BIN / "snakemake", "--touch", "--cores", "1", "--quiet", "progress"], cwd=workflow))
    with Repo(str(workflow)) as repo:
        dag = repo.index.graph  # edge: stage -> a stage it depends on
        by_name = {stage.name: stage for stage in repo.index.stages}
        levels = _rule_levels(dag)
    graph = ImportGraph(workflow)

    for edited in EDITED:
        assert _dvc_status(workflow) == set()
        assert snakemake_reasons(workflow) == {}
        path = workflow / edited
        text, stat = path.read_text(encoding="utf-8"), path.stat()
        path.write_text(text + "# an edit\n", encoding="utf-8")
        expected = {job.name for job in jobs(params) if edited in graph.closure(job.stage.command)}
        assert expected, f"no command imports {edited}"

        assert _dvc_status(workflow) == expected, edited
        downstream = {s.name for name in expected for s in nx.ancestors(dag, by_name[name])}
        # Everything Snakemake would run: the stale jobs and the jobs reading their outputs.
        assert set(snakemake_reasons(workflow)) - {"all"} == expected | downstream, edited
        # Snakemake names a job's own updated inputs only when no upstream job runs first: ask it for
        # the outputs of a group of rules that read none of each other's outputs, the DAG made of
        # those rules alone (the outputs of the others are plain files to it). Only the rules of the
        # jobs scheduled above can hold stale jobs.
        scheduled = {name.split("@")[0] for name in expected | downstream}
        stale = set()
        for level in levels:
            rules = [rule for rule in level if rule in scheduled]
            if not rules:
                continue
            targets = [out.path for job in jobs(params) if job.stage.name in rules for out in job.outputs()]
            reasons = snakemake_reasons(workflow, "--allowed-rules", *rules, "--", *targets)
            assert all(edited in updated_inputs(reason) for reason in reasons.values()), reasons
            stale |= set(reasons)
        assert stale == expected, edited

        path.write_text(text, encoding="utf-8")  # undone: the same bytes and modification time
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

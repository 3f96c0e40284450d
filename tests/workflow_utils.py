"""Helpers for the workflow tests: a private copy of the workflow, and the tools of this venv."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # snakemake, dvc and mmskip live next to this python
# the tasks of params.yaml, the embedded default: two per modality
TASKS = ["vqa", "caption", "video_qa", "video_caption", "audio_qa", "audio_caption"]
IMAGE_TASKS = ["vqa", "caption"]  # the tasks of the smoke run (tests/test_pipeline_smoke.py)
INPUTS = ["multimodal", "blind"]  # of the Hugging Face evaluation (results/eval/{task}/{input})
FAMILIES = ["baseline", "blind", "skip", "tokens", "compress", "trained"]  # summary.csv column family
SKIP_MODES = ["skip_block", "skip_attn", "skip_ffn", "parallel_attn_ffn", "parallel_blocks", "drop_last"]
RULES = ["make_scenes", "make_clips", "make_sounds", "train_tokenizer", "pretrain_llm", "pretrain_encoder",
         "pretrain_video_encoder", "pretrain_audio_encoder", "cache_features",
         "train_mapper", "evaluate", "baseline", "evaluate_skip", "evaluate_tokens", "bench_skip", "prune",
         "prune_wanda", "subnet",
         "evaluate_compressed", "train_compressed",
         "evaluate_trained", "report"]
REPLICA_RULES = ["train_mapper_seed", "baseline_seed"]  # where params seeds has more than one seed
LLMS = ["llm", "llm_small"]
TRAIN_VARIANTS = ["dense", "pruned", "skipped", "small"]
PRUNE_STATIC = ["magnitude", "random"]
MASK_SETS = ["magnitude", "wanda", "random", "subnet"]  # compression.mask_sets
# Outputs that hold measured wall times and so differ between two runs of the same params:
# everything else the pipeline writes is byte-identical from run to run.
MEASURED = ("results/baseline/*/timing.json",  # decode time of the baseline, batch by batch
            "results/skip/*/*/timing.json",  # decode ms per step of every skip-grid point
            "results/tokens/*/*/timing.json",  # and of every token-grid point
            "results/compress/*/*/timing.json",  # dense latency of every mask
            "results/bench/*.json",  # the speed and memory benchmarks
            "reports/all.html",  # shows those times, and its lineage section shows dvc.lock's state
            "reports/summary.csv",  # columns decode_ms_per_token, decode_time_fraction (the rest: compared apart)
            "reports/lineage.json")  # the git state, and whether dvc.lock existed when the report ran
# What the workflow needs to run: src/ holds both tools' code dependencies (each rule's and stage's
# import closure); what runs is the installed mmskip (an editable install of this checkout's src/),
# and the Snakefile's stage table is that installed mmskip.stages.
WORKFLOW_FILES = ["Snakefile", "workflow", "envs", "params.yaml", "dvc.yaml", ".dvcignore", "src", "configs"]


def is_measured(path: str) -> bool:
    """Whether a pipeline output (relative path) holds measured wall times (``MEASURED``)."""
    from fnmatch import fnmatch

    return any(fnmatch(path, pattern) for pattern in MEASURED)


def tool_env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                DVC_NO_ANALYTICS="1")


def run(args: list, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a tool of this venv in ``cwd`` (``env`` added to its environment); never raises on a non-zero exit."""
    return subprocess.run([str(a) for a in args], cwd=cwd, env={**tool_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n--- stdout\n{result.stdout}"
        f"\n--- stderr\n{result.stderr}")
    return result


def copy_workflow(dest: Path) -> Path:
    """Copy the workflow files of the repository into ``dest`` (no outputs, no caches)."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    return dest


def git(path: Path, *args: str) -> None:
    """A git command in ``path``, as a fixed author (tests commit in their workflow copies)."""
    check(subprocess.run(["git", "-c", "user.name=mmskip", "-c", "user.email=mmskip@localhost", *args], cwd=path,
                         capture_output=True, text=True))


def dvc_init(path: Path) -> None:
    """`dvc init --no-scm` in ``path``, plus the settings of the repository's .dvc/config."""
    check(run([BIN / "dvc", "init", "--no-scm", "--quiet"], cwd=path))
    settings = check(run([BIN / "dvc", "config", "--list", "--project"], cwd=REPO)).stdout
    for line in settings.splitlines():
        key, value = line.split("=", 1)
        check(run([BIN / "dvc", "config", "--project", key, value], cwd=path))


def read_params(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def write_params(path: Path, params: dict) -> None:
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def write_stages(path: Path) -> None:
    """dvc.yaml of the workflow copy ``path`` for its params.yaml (as `make generate` does), for params whose task
    list differs from the repository's."""
    check(run([BIN / "python", "-m", "mmskip.stages", "--dvc", "dvc.yaml"], cwd=path))


def job_counts(dry_run_output: str) -> dict[str, int]:
    """Rule -> number of jobs from the `Job stats:` table of `snakemake -n` ({} if nothing to do)."""
    if "Job stats:" not in dry_run_output:
        assert "Nothing to be done" in dry_run_output, dry_run_output
        return {}
    table = dry_run_output.split("Job stats:", 1)[1]
    counts = {}
    for line in table.splitlines():
        match = re.fullmatch(r"\s*(\w+)\s+(\d+)\s*", line)
        if match:
            if match.group(1) == "total":
                break
            counts[match.group(1)] = int(match.group(2))
    return counts


def _job_blocks(text: str):
    """(DVC-style job name, the job's block) for each job of `snakemake -n` output (`rule all` too)."""
    for block in re.split(r"\n(?=(?:local)?rule \w+:\n)", text):
        header = re.match(r"(?:local)?rule (\w+):\n", block)
        if not header:
            continue
        name = header.group(1)
        wildcards = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        if wildcards:
            values = [item.split("=", 1)[1] for item in wildcards.group(1).split(", ")]
            name += "@" + "-".join(values)
        yield name, block


def snakemake_commands(path: Path) -> dict[str, str]:
    """DVC-style job name (`evaluate@vqa-baseline`) -> the shell command Snakemake would run.

    From `snakemake -n -p --forceall`; the `> {log} 2>&1` redirection is cut off.
    """
    out = check(run([BIN / "snakemake", "-n", "-p", "--forceall", "--quiet", "progress"], cwd=path))
    commands = {}
    for name, block in _job_blocks(out.stdout + out.stderr):
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        if shell and shell.group(1) != "None":  # `rule all` runs nothing
            commands[name] = re.sub(r"\s*> \S+ 2>&1\s*$", "", shell.group(1))
    return commands


def snakemake_priorities(path: Path) -> dict[str, float]:
    """DVC-style job name -> the priority `snakemake -n --forceall` gives the job (0 where it prints none)."""
    out = check(run([BIN / "snakemake", "-n", "--forceall", "--quiet", "progress"], cwd=path))
    priorities = {}
    for name, block in _job_blocks(out.stdout + out.stderr):
        priority = re.search(r"^\s+priority: (\S+)$", block, re.M)
        priorities[name] = float(priority.group(1)) if priority else 0
    return priorities


def snakemake_reasons(path: Path, *args: str) -> dict[str, str]:
    """DVC-style job name -> why `snakemake -n [args]` schedules it (its `reason:` line); {} if nothing to do."""
    out = check(run([BIN / "snakemake", "-n", "--quiet", "progress", *args], cwd=path))
    reasons = {}
    for name, block in _job_blocks(out.stdout + out.stderr):
        reason = re.search(r"^\s+reason: (.*)$", block, re.M)
        assert reason, block
        reasons[name] = reason.group(1)
    return reasons


def updated_inputs(reason: str) -> set[str]:
    """The files a `reason:` line names as "Updated input files" (newer than the job's outputs)."""
    match = re.search(r"Updated input files: ([^;]*)", reason)
    return set(match.group(1).split(", ")) if match else set()


def dvc_commands(path: Path) -> dict[str, str]:
    """Stage name -> rendered `cmd` of dvc.yaml in ``path`` (a DVC repository)."""
    from dvc.repo import Repo

    with Repo(str(path)) as repo:
        return {stage.name: stage.cmd for stage in repo.index.stages}

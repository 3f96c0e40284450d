"""Evaluate a task's skip grid, every mode's points, on the first test examples.

Every point reuses the trained mapper and the cached features: the soft prompts are computed
once, then each distinct plan decodes them through the skip engine. Scores, executed FLOPs
(prefill and decode, per component) and decode timing (``timing.json``, apart from the
deterministic ``metrics.json``) are written per point. ``points[0]`` is the baseline on the same
examples (key ``baseline``, skip mode ``none``), taken from the one baseline decode of the task
(:mod:`mmskip.evaluation.baseline`); the report divides each score by its.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from mmskip.evaluation import BASELINE
from mmskip.evaluation.baseline import load_baseline
from mmskip.evaluation.runner import load_example_set, decode_point, score_runs, write_outputs
from mmskip.models import MapperModel, load_llm
from mmskip.foundation.text import PromptsConfig
from mmskip.skipping.accounting import RunStats
from mmskip.skipping.engine import SkipEngine
from mmskip.skipping.grid import BASELINE_POINT, GridPoint, SkippingConfig, grid_limit, grid_points
from mmskip.skipping.plan import SkipPlan
from mmskip.tasks import get_task

log = logging.getLogger(__name__)


def compute_fields(stats: RunStats) -> dict:
    """A point's executed compute in its record: the prefill and decode FLOPs and depth fractions, and the whole
    count (``compute``)."""
    compute = stats.as_dict()
    return {f"{phase}_{what}_fraction": compute[phase][f"{what}_fraction"]
            for phase in ("prefill", "decode") for what in ("flops", "depth")} | {"compute": compute}


def _record(point: GridPoint, stats: RunStats, num_layers: int) -> dict:
    return {
        "key": point.key, "mode": point.mode, "semantics": point.semantics, "scope": point.scope,
        "interval": point.interval,
        "start_layer": point.start_layer, "layers": list(point.plan.layers),
        "num_dropped": point.dropped or 0, "skipped_blocks": point.skipped_blocks,
        "num_layers": num_layers, "combine": point.plan.combine, "context_kv": point.plan.context_kv,
        **compute_fields(stats),
    }


def evaluate_skip(task: str, scenes: Path, features: Path, llm: str | Path, mapper_dir: Path, baseline: Path,
                  out: Path, prompts: PromptsConfig, cfg: SkippingConfig, evaluation, shares=None,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> dict[str, dict]:
    """Every grid point of every mode of ``cfg.modes`` on the first test examples of ``task`` (their number:
    ``grid_limit``, with ``shares`` the modality's share of them, params ``example_shares``; ``evaluation``:
    split, token limits, batch size), after the baseline's point from ``baseline`` (results/baseline/{task}):
    ``out/{mode}/`` gets each mode's files. One job for the task's grid: the models, the features and the
    examples load once, and the caption metrics score every point in one call (one METEOR JVM)."""
    spec = get_task(task)
    model, tokenizer = load_llm(llm, device, dtype)
    engine_layers = SkipEngine(model).num_layers
    # refuses a bad mode or grid before any work
    points = {mode: grid_points(cfg, mode, engine_layers) for mode in cfg.modes}
    mm = MapperModel.load(model, tokenizer, mapper_dir, features, evaluation.split)
    ex = load_example_set(spec, scenes, evaluation.split, tokenizer, prompts, spec.max_new_tokens(evaluation),
                          grid_limit(cfg, spec, shares))
    batches = mm.prompt_batches(ex, evaluation.batch_size)
    baseline_run = load_baseline(baseline, mm, ex, evaluation.batch_size, batches)
    files = modes_outputs(points, mm, ex, evaluation.split, baseline_run, evaluation.batch_size, batches,
                          engine_layers)
    for mode, mode_files in files.items():
        write_outputs(Path(out) / mode, mode_files)
    return {mode: mode_files["metrics.json"] for mode, mode_files in files.items()}


def modes_outputs(points: dict[str, list[GridPoint]], mm, ex, split: str, baseline_run, batch_size: int, batches,
                  engine_layers: int) -> dict[str, dict[str, dict]]:
    """mode -> metrics.json, predictions.json and timing.json of that mode's ``points`` on ``ex``, after the
    baseline's point (``baseline_run``, decoded already): one decode per distinct plan of a mode, one metric
    call for every decode of every mode."""
    task = ex.task.name
    decoded: dict[str, tuple[dict[SkipPlan, GridPoint], dict]] = {}
    for mode, mode_points in points.items():
        # one decoding per distinct plan; later points with the same plan share it; the empty plan is the
        # baseline's, decoded once per task
        first_of: dict[SkipPlan, GridPoint] = {SkipPlan(): BASELINE_POINT}
        start = time.time()
        runs = {BASELINE: baseline_run}
        for point in mode_points:
            plan = SkipPlan() if point.plan.empty else point.plan
            if plan in first_of:
                continue
            first_of[plan] = point
            runs[point.key] = decode_point(mm, ex, batch_size, point.key, plan, batches)
        decoded[mode] = first_of, runs
        log.info("%s/%s: %d points, %d decoded, %.1f s", task, mode, len(mode_points) + 1, len(runs),
                 time.time() - start)
    # every mode's points have keys of their own (the mode leads each key); the baseline's is shared
    every_run = {key: run for _, runs in decoded.values() for key, run in runs.items()}
    score_of = score_runs(ex, list(every_run.values()))
    return {mode: _mode_files(mode, ex, split, [BASELINE_POINT, *points[mode]], *decoded[mode], score_of, batch_size,
                              engine_layers)
            for mode in points}


def _mode_files(mode: str, ex, split: str, points: list[GridPoint], first_of: dict[SkipPlan, GridPoint], runs: dict,
                score_of: dict[str, dict], batch_size: int, engine_layers: int) -> dict[str, dict]:
    task = ex.task.name
    records, timings = [], {}
    for point in points:
        first = first_of[SkipPlan() if point.plan.empty else point.plan]
        stats = runs[first.key].stats
        record = _record(point, stats, engine_layers)
        record["same_as"] = None if first is point else first.key
        record["scores"] = score_of[first.key]["scores"]
        records.append(record)
        timings[point.key] = {"same_as": record["same_as"], **stats.timing()}
        log.info("%s %s: %s, decode FLOPs x%.3f, %.2f ms/token", task, point.key, record["scores"],
                 record["decode_flops_fraction"], timings[point.key]["decode"]["ms_per_step"])
    metrics = {"task": task, "modality": ex.task.modality, "mode": mode, "split": split,
               "num_examples": len(ex.examples), "batch_size": batch_size,
               "max_new_tokens": ex.max_new_tokens, "reference": BASELINE, "points": records}
    return {
        "metrics.json": metrics,
        "predictions.json": {"task": task, "mode": mode, "ids": ex.ids,
                             "predictions": {key: run.predictions for key, run in runs.items()}},
        # wall time differs run to run: kept apart so metrics.json stays byte-identical
        "timing.json": {"task": task, "mode": mode, "batch_size": batch_size,
                        "threads": torch.get_num_threads(),
                        "note": "ms_per_step: wall time of one decode step, one new token for each row of the batch",
                        "points": timings}}

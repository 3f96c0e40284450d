"""Pipeline stages of compression: masks (``prune``), the α-SubNet (``subnet``) and the
evaluation of every mask of every mask set on one task (``evaluate_compressed``).

A mask set, ``models/masks/{name}`` (``compression.mask_sets``: a pruning method's, or ``subnet``), holds one sub-folder per mask (``{task}/{calibration}/{key}`` for
Wanda, ``{key}`` otherwise, ``{rule}`` for the α-SubNet) with ``mask.safetensors`` (and Wanda's calibration input norms,
``norms.safetensors``), and an index (``prune.json`` / ``subnet.json``) with the achieved
sparsity of every parameter. A mask is computed once; every evaluation reads it from there.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mmskip.compression.calibration import calibration_batches
from mmskip.compression.pruning import (METHODS, PruneSpec, load_masks, mask_sparsity, prune, prunable_linears,
                                        save_masks, scores_for)
from mmskip.compression.subnet import combine, iou_per_block
from mmskip.evaluation import BASELINE
from mmskip.evaluation.baseline import load_baseline
from mmskip.evaluation.runner import (Run, load_example_set, masked, restored, decode_point, score_runs,
                                      write_outputs)
from mmskip.foundation.text import PromptsConfig
from mmskip.io import atomic_dir, dumps_json, read_json
from mmskip.mapper.model import Mapper
from mmskip.models import MapperModel, load_llm
from mmskip.params import CompressionConfig, PruningConfig, SubnetConfig
from mmskip.tasks import default_tasks, get_task

log = logging.getLogger(__name__)

from mmskip.compression.names import MASK_SETS, SUBNET  # noqa: E402  (re-exported)


def mask_specs(cfg: PruningConfig, method: str) -> list[tuple[str | None, PruneSpec]]:
    """(calibration, spec) of every mask of ``method`` (calibration None without one): every
    sparsity and N:M pattern, and for Wanda ``compare_sparsity`` under each other calibration."""
    base = [PruneSpec(method, s) for s in cfg.sparsities] + [PruneSpec(method, pattern=p) for p in cfg.nm_patterns]
    if method != "wanda":
        return [(None, s) for s in base]
    return [(cfg.calibration, s) for s in base] + [(c, PruneSpec(method, cfg.compare_sparsity))
                                                   for c in cfg.calibration_modes if c != cfg.calibration]


def _entry_dir(task: str | None, calibration: str | None, spec: PruneSpec) -> str:
    return spec.key if calibration is None else f"{task}/{calibration}/{spec.key}"


def _sparsity_record(masks: dict) -> dict:
    s = mask_sparsity(masks)
    return {"overall": s["overall"], "per_parameter": s["per_parameter"]}


def _of(paths: Path | Mapping[str, Path], task: str) -> Path:
    """A task's path of one for every task or of a task -> path mapping."""
    return paths[task] if isinstance(paths, Mapping) else paths


def prune_stage(method: str, llm: str | Path, out: Path, cfg: PruningConfig, seed: int,
                scenes: Path | Mapping[str, Path] | None = None, features: Path | Mapping[str, Path] | None = None,
                mappers: Path | None = None,
                tasks: Sequence[str] | None = None, prompts: PromptsConfig | None = None,
                device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> dict:
    """Every mask of ``method`` (params ``pruning``) -> ``out``; Wanda: for each of ``tasks`` (params ``tasks``;
    default the tasks of the run's dataset), calibrated through ``mappers/{task}`` on the task's dataset folder and
    feature cache (``scenes``, ``features``: one for every task, or task -> path)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: allowed {list(METHODS)}")
    if method == "wanda":
        missing = [n for n, v in (("scenes", scenes), ("features", features), ("mappers", mappers),
                                  ("prompts", prompts)) if v is None]
        if missing:
            raise ValueError(f"wanda calibrates on each task's multimodal inputs: needs --scenes, --features and "
                             f"--mappers; missing {missing}")
    model, tokenizer = load_llm(llm, device, dtype)
    tasks = default_tasks() if tasks is None else tuple(get_task(t).name for t in tasks)
    jobs = [(t, c, s) for t in tasks for c, s in mask_specs(cfg, method)] if method == "wanda" else \
        [(None, c, s) for c, s in mask_specs(cfg, method)]
    batches_of: dict[tuple[str, str], list] = {}
    entries = []
    start = time.time()
    with atomic_dir(out) as tmp:
        for task, calibration, spec in tqdm(jobs, desc=f"prune {method}", mininterval=5):
            batches = None
            if method == "wanda":
                if (task, calibration) not in batches_of:  # embeddings and mapper only: pruning leaves them be
                    mapper = Mapper.from_pretrained(Path(mappers) / task).to(model.device)
                    batches_of[task, calibration] = calibration_batches(
                        task, calibration, _of(scenes, task), _of(features, task), model, tokenizer, mapper, prompts,
                        cfg.num_calibration, seed, cfg.calibration_batch_size)
                batches = batches_of[task, calibration]
            with restored(model):  # each mask prunes the dense weights, which come back after it
                masks, norms = prune(model, spec, batches, seed=seed)
            key = _entry_dir(task, calibration, spec)
            (tmp / key).mkdir(parents=True)
            meta = {"method": method, "pattern": spec.pattern, "sparsity": f"{spec.sparsity:g}",
                    "calibration": calibration or "", "task": task or ""}
            save_masks(tmp / key / "mask.safetensors", masks, meta)
            if norms:
                save_file({k: v.cpu().contiguous() for k, v in norms.items()}, str(tmp / key / "norms.safetensors"))
            achieved = _sparsity_record(masks)
            (tmp / key / "sparsity.json").write_text(dumps_json(achieved))  # measured, next to the mask
            entries.append({"key": key, "method": method, "pattern": spec.pattern, "sparsity": spec.sparsity,
                            "calibration": calibration, "task": task, "path": f"{key}/mask.safetensors",
                            "achieved": achieved})
            log.info("%s %s: achieved sparsity %.4f", method, key, achieved["overall"])
        index = {"method": method, "num_calibration": cfg.num_calibration if method == "wanda" else 0,
                 "seed": seed, "entries": entries}
        (tmp / "prune.json").write_text(dumps_json(index))
    log.info("%d %s masks in %.1f s", len(entries), method, time.time() - start)
    return index


def subnet_stage(wanda_dir: Path, llm: str | Path, out: Path, cfg: SubnetConfig, calibration: str) -> dict:
    """The α-SubNet of every rule from the tasks' Wanda masks at ``sparsity`` (``calibration``), and their IoU."""
    model, _ = load_llm(llm)
    params = dict(model.named_parameters())
    index = read_json(Path(wanda_dir) / "prune.json")
    if index["method"] != "wanda":
        raise ValueError(f"{wanda_dir} holds {index['method']!r} masks; the α-SubNet combines Wanda masks")
    spec_key = PruneSpec("wanda", cfg.sparsity).key
    chosen = [e for e in index["entries"] if e["calibration"] == calibration and e["pattern"] == "unstructured"
              and e["key"].endswith(f"/{spec_key}")]
    tasks = [e["task"] for e in chosen]
    if len(tasks) < 2:
        raise ValueError(f"{wanda_dir}: the α-SubNet needs Wanda masks of >= 2 tasks at sparsity "
                         f"{cfg.sparsity} ({calibration}); found {tasks}")
    masks, scores = [], []
    for e in chosen:
        m = load_masks(Path(wanda_dir) / e["path"])
        norms = load_file(str(Path(wanda_dir) / e["key"] / "norms.safetensors"))
        masks.append(m)
        scores.append({n: scores_for("wanda", params[n], norms[n]) for n in m})
    blocks = [list(b) for b in prunable_linears(model)]
    pairs = [{"tasks": [tasks[i], tasks[j]], "iou_per_block": iou_per_block(masks[i], masks[j], blocks)}
             for i in range(len(tasks)) for j in range(i + 1, len(tasks))]
    entries = []
    with atomic_dir(out) as tmp:
        for rule in cfg.rules:
            shared = combine(masks, rule, cfg.sparsity, scores)
            (tmp / rule).mkdir()
            save_masks(tmp / rule / "mask.safetensors", shared,
                       {"method": SUBNET, "rule": rule, "tasks": ",".join(tasks), "sparsity": f"{cfg.sparsity:g}"})
            entries.append({"key": rule, "method": SUBNET, "rule": rule, "pattern": "unstructured",
                            "sparsity": cfg.sparsity, "calibration": calibration, "task": None,
                            "tasks": tasks, "path": f"{rule}/mask.safetensors", "achieved": _sparsity_record(shared),
                            "rule_alone_sparsity": mask_sparsity(combine(masks, rule))["overall"],
                            "iou_with_task": {t: iou_per_block(shared, m, blocks) for t, m in zip(tasks, masks)}})
        result = {"method": SUBNET, "tasks": tasks, "combined": [e["key"] for e in chosen], "entries": entries,
                  "task_iou": pairs, "blocks": len(blocks)}
        (tmp / "subnet.json").write_text(dumps_json(result))
    return result


def _density(masks: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Kept fraction of the attention projections and of the other (FFN) linear layers."""
    def frac(names):
        total = sum(masks[n].numel() for n in names)
        return sum(int(masks[n].sum()) for n in names) / total if total else 1.0
    attn = [n for n in masks if ".self_attn." in n]
    return frac(attn), frac([n for n in masks if n not in attn])


def _sparse_fraction(compute: dict, densities: tuple[float, float]) -> dict:
    """FLOPs per token if the pruned weights' multiplications were skipped, over dense."""
    out = {}
    for phase, c in compute.items():
        f = c["flops_per_token"]
        sparse = f["projections"] * densities[0] + f["ffn"] * densities[1] + f["attention"] + f["lm_head"]
        out[phase] = sparse / f["total"] if f["total"] else 1.0
    return out


def mask_set_index(masks_dir: Path) -> dict:
    """The index of a mask set (``models/masks/{name}``): ``prune.json`` of a pruning method's masks or
    ``subnet.json`` of the α-SubNet's; its ``method`` names the set."""
    found = [Path(masks_dir) / name for name in ("prune.json", "subnet.json") if (Path(masks_dir) / name).is_file()]
    if len(found) != 1:
        raise ValueError(f"{masks_dir}: a mask set holds exactly one of prune.json (a pruning method's masks) "
                         f"or subnet.json (the α-SubNet's); found {[p.name for p in found] or 'neither'}")
    index = read_json(found[0])
    if index.get("method") not in MASK_SETS:
        raise ValueError(f"{found[0]}: method={index.get('method')!r}: allowed {list(MASK_SETS)}")
    return index


def evaluate_compressed(task: str, masks_root: Path, scenes: Path, features: Path, llm: str | Path,
                        mapper_dir: Path, baseline: Path, out: Path, prompts: PromptsConfig, cfg: CompressionConfig,
                        evaluation, shares=None, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> dict[str, dict]:
    """Score every mask of every mask set of ``cfg.mask_sets`` (``masks_root/{name}``: a pruning method's masks or
    the α-SubNet's) on the first test examples of ``task`` (with ``shares``, params ``example_shares``, the
    modality's share of them), after the baseline (the dense LLM) on the same
    examples, taken from ``baseline`` (results/baseline/{task}): ``out/{name}/`` gets each set's files. One job for
    the task: the models and examples load once, and one metric call scores every mask (one METEOR JVM)."""
    spec = get_task(task)
    indexes = {name: mask_set_index(Path(masks_root) / name) for name in cfg.mask_sets}  # checked before any work
    for name, index in indexes.items():
        if index["method"] != name:
            raise ValueError(f"{Path(masks_root) / name}: holds the masks of {index['method']!r}, not of {name!r}")
    model, tokenizer = load_llm(llm, device, dtype)
    mm = MapperModel.load(model, tokenizer, mapper_dir, features, evaluation.split)
    ex = load_example_set(spec, scenes, evaluation.split, tokenizer, prompts, spec.max_new_tokens(evaluation),
                          spec.limit(cfg, shares))
    batches = mm.prompt_batches(ex, evaluation.batch_size)
    baseline_run = load_baseline(baseline, mm, ex, evaluation.batch_size, batches)
    decoded = {}  # name -> (entries, runs, masks of each run's key)
    for name, index in indexes.items():
        entries = [e for e in index["entries"] if e["task"] in (None, task)]  # Wanda: this task's own masks
        runs, mask_of = [baseline_run], {BASELINE: None}
        for entry in entries:
            mask_of[entry["key"]] = load_masks(Path(masks_root) / name / entry["path"])
            with masked(model, mask_of[entry["key"]]):  # the dense weights come back after each mask
                runs.append(decode_point(mm, ex, evaluation.batch_size, entry["key"], batches=batches))
        decoded[name] = entries, runs, mask_of
    # one metric call for every decode, each keyed by its set (keys repeat across sets: magnitude's and random's 0.5)
    scores = score_runs(ex, [baseline_run, *(Run(f"{name}/{run.key}", run.predictions)
                                             for name, (_, runs, _) in decoded.items() for run in runs[1:])])
    result = {}
    for name, (entries, runs, mask_of) in decoded.items():
        score_of = {BASELINE: scores[BASELINE], **{run.key: scores[f"{name}/{run.key}"] for run in runs[1:]}}
        files = _mask_set_files(task, spec.modality, indexes[name]["method"], ex, evaluation, model, entries, runs,
                                mask_of, score_of)
        write_outputs(Path(out) / name, files)
        result[name] = files["metrics.json"]
    return result


def _mask_set_files(task: str, modality: str, method: str, ex, evaluation, model, entries: list[dict], runs: list[Run],
                    mask_of: dict, score_of: dict[str, dict]) -> dict[str, dict]:
    """metrics.json, predictions.json and timing.json of one mask set's runs (the baseline's first)."""
    points, timings = [], {}
    for entry, run in zip([None, *entries], runs):
        compute = run.stats.as_dict()
        masks = mask_of[run.key]
        densities = _density(masks) if masks is not None else (1.0, 1.0)
        sparse = _sparse_fraction(compute, densities)
        points.append({
            "key": run.key, "method": "none" if entry is None else method,
            "pattern": None if entry is None else entry["pattern"],
            "sparsity": 0.0 if entry is None else entry["sparsity"],
            "achieved_sparsity": 0.0 if entry is None else entry["achieved"]["overall"],
            "calibration": None if entry is None else entry.get("calibration"),
            "rule": None if entry is None else entry.get("rule"),
            "scores": score_of[run.key]["scores"],
            "dense_flops_per_token": {p: compute[p]["flops_per_token"]["total"] for p in compute},
            "sparse_flops_fraction": sparse,
            "note": "sparse FLOPs: if the pruned weights' multiply-adds were skipped; dense kernels execute them all",
        })
        timings[run.key] = run.stats.timing()
        log.info("%s %s %s: %s, sparse FLOPs x%.3f (decode), %.2f ms/step", task, method, run.key,
                 score_of[run.key]["scores"], sparse["decode"], timings[run.key]["decode"]["ms_per_step"])
    metrics = {"task": task, "modality": modality, "method": method, "split": evaluation.split,
               "num_examples": len(ex.examples), "llm_params": sum(p.numel() for p in model.parameters()),
               "batch_size": evaluation.batch_size, "max_new_tokens": ex.max_new_tokens, "reference": BASELINE,
               "points": points}
    return {
        "metrics.json": metrics,
        "predictions.json": {"task": task, "method": method, "ids": ex.ids,
                             "predictions": {r.key: r.predictions for r in runs}},
        "timing.json": {"task": task, "method": method, "batch_size": evaluation.batch_size,
                        "threads": torch.get_num_threads(),
                        "note": "dense latency: unstructured zeros run through dense kernels", "points": timings}}

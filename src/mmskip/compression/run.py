"""Pipeline stages of compression: masks (``prune``), the α-SubNet (``subnet``) and the
evaluation of every mask of a method on one task (``evaluate_compressed``).

``models/masks/{method}`` holds one sub-folder per mask (``{task}/{calibration}/{key}`` for
Wanda, ``{key}`` otherwise, ``{rule}`` for the α-SubNet) with ``mask.safetensors`` (and Wanda's calibration input norms,
``norms.safetensors``), and an index (``prune.json`` / ``subnet.json``) with the achieved
sparsity of every parameter. A mask is computed once; every evaluation reads it from there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mmskip.compression.calibration import CALIBRATIONS, calibration_batches
from mmskip.compression.pruning import (METHODS, PruneSpec, apply_masks, load_masks, mask_sparsity, parse_nm, prune,
                                        prunable_linears, save_masks, scores_for)
from mmskip.compression.subnet import RULES, combine, iou_per_block
from mmskip.evaluation.caption_metric import caption_scores_many
from mmskip.evaluation.evaluate_skip import decode, load_examples, soft_prompt_batches
from mmskip.evaluation.vqa_metric import vqa_scores
from mmskip.features.cache import load_features
from mmskip.foundation.text import PromptsConfig
from mmskip.io import atomic_dir, dumps_json, read_json
from mmskip.mapper.model import Mapper
from mmskip.mapper.train import TASKS, load_llm
from mmskip.skipping.engine import SkipEngine

log = logging.getLogger(__name__)

from mmskip.compression.names import SUBNET  # noqa: E402  (re-exported)


@dataclass
class CompressionConfig:
    """Which masks to compute and evaluate, and on how many test examples."""

    # evaluation jobs, one per task x entry; "subnet" evaluates the α-SubNet masks
    methods: tuple[str, ...] = (*METHODS, SUBNET)
    sparsities: tuple[float, ...] = (0.3, 0.5, 0.7)  # unstructured
    nm_patterns: tuple[str, ...] = ("2:4", "4:8")
    calibration: str = "prompt"  # Wanda's calibration for the masks at every sparsity and pattern
    # Wanda at `compare_sparsity` under each of these calibrations (the calibration comparison)
    calibration_modes: tuple[str, ...] = CALIBRATIONS
    compare_sparsity: float = 0.5
    num_calibration: int = 128  # training examples per calibration
    calibration_batch_size: int = 32
    subnet_rules: tuple[str, ...] = RULES
    subnet_sparsity: float = 0.5  # of the α-SubNet; task masks at this sparsity are combined
    vqa_questions: int = 320  # first N test questions (0: all)
    caption_images: int = 48  # first N test images (0: all)
    decode_batch_size: int = 32
    # training the mapper with the compressed LLM (mmskip.compression.train)
    train_sparsity: float = 0.5  # the Wanda mask (of `calibration`) the pruned variant trains with
    train_skip_interval: int = 2  # skip_block on every k-th layer after the start layer, all tokens
    train_skip_start_layer: int = 1
    train_init: str = "baseline"  # "baseline": fine-tune the trained mapper; "scratch": the paper's setting
    train_vqa_steps: int = 300  # fine-tuning steps (train_init baseline)
    train_caption_steps: int = 150
    # The smaller LLM's mapper trains from scratch: steps of its VQA / caption mapper (0: the baseline
    # mapper's mapper.*_steps, the paper's setting; fewer keep the embedded default in its CPU budget)
    small_vqa_steps: int = 1000
    small_caption_steps: int = 400

    def __post_init__(self) -> None:
        for name in ("methods", "sparsities", "nm_patterns", "calibration_modes", "subnet_rules"):
            setattr(self, name, tuple(getattr(self, name)))
        for name, values, allowed in (("methods", self.methods, (*METHODS, SUBNET)),
                                      ("calibration_modes", self.calibration_modes, CALIBRATIONS),
                                      ("subnet_rules", self.subnet_rules, RULES)):
            bad = [v for v in values if v not in allowed]
            if bad or not values or len(set(values)) < len(values):
                raise ValueError(f"{name}={list(values)}: allowed a non-empty subset of {list(allowed)} without repeats")
        if SUBNET in self.methods and "wanda" not in self.methods:
            raise ValueError(f"methods={list(self.methods)}: {SUBNET!r} combines Wanda masks, so needs 'wanda'")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration={self.calibration!r}: allowed {list(CALIBRATIONS)}")
        for s in (*self.sparsities, self.compare_sparsity, self.subnet_sparsity):
            if not 0.0 < s < 1.0:
                raise ValueError(f"sparsity {s}: must be in (0, 1)")
        if self.subnet_sparsity not in self.sparsities:
            raise ValueError(f"subnet_sparsity={self.subnet_sparsity}: must be one of sparsities "
                             f"{list(self.sparsities)} (the task masks it combines)")
        for p in self.nm_patterns:
            parse_nm(p)
        if self.train_sparsity not in self.sparsities:
            raise ValueError(f"train_sparsity={self.train_sparsity}: must be one of sparsities {list(self.sparsities)} "
                             "(training uses the mask the inference-only evaluation uses)")
        if self.train_init not in ("baseline", "scratch"):
            raise ValueError(f"train_init={self.train_init!r}: allowed 'baseline', 'scratch'")
        if self.train_skip_interval < 1 or self.train_skip_start_layer < -1:
            raise ValueError(f"train_skip_interval={self.train_skip_interval} (>= 1), train_skip_start_layer="
                             f"{self.train_skip_start_layer} (>= -1)")
        for name in ("train_vqa_steps", "train_caption_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("small_vqa_steps", "small_caption_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0 (0: the baseline mapper's steps)")
        for name in ("num_calibration", "calibration_batch_size", "decode_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("vqa_questions", "caption_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0 (0: all)")

    def specs(self, method: str) -> list[tuple[str | None, PruneSpec]]:
        """(calibration, spec) of every mask of ``method`` (calibration None without one)."""
        base = [PruneSpec(method, s) for s in self.sparsities] + [PruneSpec(method, pattern=p) for p in self.nm_patterns]
        if method != "wanda":
            return [(None, s) for s in base]
        out = [(self.calibration, s) for s in base]
        out += [(c, PruneSpec(method, self.compare_sparsity)) for c in self.calibration_modes
                if c != self.calibration]
        return out

    def limit(self, task: str) -> int:
        return self.vqa_questions if task == "vqa" else self.caption_images


def _entry_dir(task: str | None, calibration: str | None, spec: PruneSpec) -> str:
    return spec.key if calibration is None else f"{task}/{calibration}/{spec.key}"


def _sparsity_record(masks: dict) -> dict:
    s = mask_sparsity(masks)
    return {"overall": s["overall"], "per_parameter": s["per_parameter"]}


def prune_stage(method: str, llm: str | Path, out: Path, cfg: CompressionConfig, seed: int,
                scenes: Path | None = None, features: Path | None = None, mappers: Path | None = None,
                prompts: PromptsConfig | None = None) -> dict:
    """Every mask of ``method`` (params ``compression``) -> ``out``; Wanda: for every task,
    calibrated through ``mappers/{task}``."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: allowed {list(METHODS)}")
    if method == "wanda":
        missing = [n for n, v in (("scenes", scenes), ("features", features), ("mappers", mappers),
                                  ("prompts", prompts)) if v is None]
        if missing:
            raise ValueError(f"wanda calibrates on each task's multimodal inputs: needs --scenes, --features and "
                             f"--mappers; missing {missing}")
    model, tokenizer = load_llm(llm)
    jobs = [(t, c, s) for t in TASKS for c, s in cfg.specs(method)] if method == "wanda" else \
        [(None, c, s) for c, s in cfg.specs(method)]
    batches_of: dict[tuple[str, str], list] = {}
    entries = []
    start = time.time()
    with atomic_dir(out) as tmp:
        for n, (task, calibration, spec) in enumerate(tqdm(jobs, desc=f"prune {method}", mininterval=5)):
            if n:  # a fresh dense copy from disk: one model in memory, never two
                model, _ = load_llm(llm)
            batches = None
            if method == "wanda":
                if (task, calibration) not in batches_of:  # embeddings and mapper only: pruning leaves them be
                    mapper = Mapper.from_pretrained(Path(mappers) / task)
                    batches_of[task, calibration] = calibration_batches(
                        task, calibration, scenes, features, model, tokenizer, mapper, prompts, cfg.num_calibration,
                        seed, cfg.calibration_batch_size)
                batches = batches_of[task, calibration]
            masks, norms = prune(model, spec, batches, seed=seed)
            key = _entry_dir(task, calibration, spec)
            (tmp / key).mkdir(parents=True)
            meta = {"method": method, "pattern": spec.pattern, "sparsity": f"{spec.sparsity:g}",
                    "calibration": calibration or "", "task": task or ""}
            save_masks(tmp / key / "mask.safetensors", masks, meta)
            if norms:
                save_file({k: v.contiguous() for k, v in norms.items()}, str(tmp / key / "norms.safetensors"))
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


def subnet_stage(wanda_dir: Path, llm: str | Path, out: Path, cfg: CompressionConfig) -> dict:
    """The α-SubNet of every rule from the tasks' Wanda masks at ``subnet_sparsity``, and their IoU."""
    model, _ = load_llm(llm)
    params = dict(model.named_parameters())
    index = read_json(Path(wanda_dir) / "prune.json")
    if index["method"] != "wanda":
        raise ValueError(f"{wanda_dir} holds {index['method']!r} masks; the α-SubNet combines Wanda masks")
    spec_key = PruneSpec("wanda", cfg.subnet_sparsity).key
    chosen = [e for e in index["entries"] if e["calibration"] == cfg.calibration and e["pattern"] == "unstructured"
              and e["key"].endswith(f"/{spec_key}")]
    tasks = [e["task"] for e in chosen]
    if len(tasks) < 2:
        raise ValueError(f"{wanda_dir}: the α-SubNet needs Wanda masks of >= 2 tasks at sparsity "
                         f"{cfg.subnet_sparsity} ({cfg.calibration}); found {tasks}")
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
        for rule in cfg.subnet_rules:
            shared = combine(masks, rule, cfg.subnet_sparsity, scores)
            (tmp / rule).mkdir()
            save_masks(tmp / rule / "mask.safetensors", shared,
                       {"method": SUBNET, "rule": rule, "tasks": ",".join(tasks), "sparsity": f"{cfg.subnet_sparsity:g}"})
            entries.append({"key": rule, "method": SUBNET, "rule": rule, "pattern": "unstructured",
                            "sparsity": cfg.subnet_sparsity, "calibration": cfg.calibration, "task": None,
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


def evaluate_compressed(task: str, method: str, masks_dir: Path, scenes: Path, features: Path, llm: str | Path,
                        mapper_dir: Path, out: Path, prompts: PromptsConfig, cfg: CompressionConfig,
                        split: str = "test", vqa_max_new_tokens: int = 4, caption_max_new_tokens: int = 24) -> dict:
    """Score the dense LLM and every mask of ``method`` on the same first test examples of ``task``."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}: allowed {list(TASKS)}")
    if method not in (*METHODS, SUBNET):
        raise ValueError(f"method={method!r}: allowed {[*METHODS, SUBNET]}")
    index = read_json(Path(masks_dir) / ("subnet.json" if method == SUBNET else "prune.json"))
    if index["method"] != method:
        raise ValueError(f"{masks_dir} holds {index['method']!r} masks, not {method!r}")
    dense, tokenizer = load_llm(llm)
    mapper = Mapper.from_pretrained(mapper_dir)
    feats, row_of = load_features(features, split)
    max_new = vqa_max_new_tokens if task == "vqa" else caption_max_new_tokens
    ex = load_examples(task, scenes, split, tokenizer, row_of, prompts, max_new, cfg.limit(task))
    batches = soft_prompt_batches(dense, tokenizer, mapper, feats, ex, cfg.decode_batch_size)
    entries = [e for e in index["entries"] if e["task"] in (None, task)]  # Wanda: this task's own masks
    runs = []
    for entry in [None, *entries]:
        masks = None
        if entry is not None:
            dense, _ = load_llm(llm)  # a fresh dense copy from disk for every mask
            masks = load_masks(Path(masks_dir) / entry["path"])
            apply_masks(dense, masks)
        engine = SkipEngine(dense)
        key = "dense" if entry is None else entry["key"]
        predictions = decode(engine, tokenizer, batches, max_new, desc=f"{task} {method} {key}")
        runs.append((key, entry, masks, predictions, engine.stats))
    if task == "vqa":
        scores = [{"accuracy": vqa_scores([{"question_id": e.question_id, "image_id": e.image_id,
                                            "question": e.question, "question_type": e.question_type,
                                            "prediction": p, "answers": list(e.answers)}
                                           for e, p in zip(ex.items, r[3])])["accuracy"]} for r in runs]
    else:
        references = {e.image_id: list(e.captions) for e in ex.items}
        scores = caption_scores_many([{e.image_id: p for e, p in zip(ex.items, r[3])} for r in runs], references)
    points, timings = [], {}
    for (key, entry, masks, _, stats), score in zip(runs, scores):
        compute = stats.as_dict()
        densities = _density(masks) if masks is not None else (1.0, 1.0)
        sparse = _sparse_fraction(compute, densities)
        points.append({
            "key": key, "method": "none" if entry is None else method,
            "pattern": None if entry is None else entry["pattern"],
            "sparsity": 0.0 if entry is None else entry["sparsity"],
            "achieved_sparsity": 0.0 if entry is None else entry["achieved"]["overall"],
            "calibration": None if entry is None else entry.get("calibration"),
            "rule": None if entry is None else entry.get("rule"),
            "scores": score,
            "dense_flops_per_token": {p: compute[p]["flops_per_token"]["total"] for p in compute},
            "sparse_flops_fraction": sparse,
            "note": "sparse FLOPs: if the pruned weights' multiply-adds were skipped; dense kernels execute them all",
        })
        timings[key] = stats.timing()
        log.info("%s %s %s: %s, sparse FLOPs x%.3f (decode), %.2f ms/step", task, method, key, score,
                 sparse["decode"], timings[key]["decode"]["ms_per_step"])
    ids = [e.question_id if task == "vqa" else e.image_id for e in ex.items]
    metrics = {"task": task, "modality": "image", "method": method, "split": split, "num_examples": len(ex.items),
               "llm_params": sum(p.numel() for p in dense.parameters()), "batch_size": cfg.decode_batch_size,
               "max_new_tokens": max_new, "reference": "dense", "points": points}
    with atomic_dir(out) as tmp:
        (tmp / "metrics.json").write_text(dumps_json(metrics))
        (tmp / "predictions.json").write_text(dumps_json(
            {"task": task, "method": method, "ids": ids, "predictions": {r[0]: r[3] for r in runs}}))
        (tmp / "timing.json").write_text(dumps_json(
            {"task": task, "method": method, "batch_size": cfg.decode_batch_size, "threads": torch.get_num_threads(),
             "note": "dense latency: unstructured zeros run through dense kernels", "points": timings}))
    return metrics

"""Evaluate one skip mode's grid points (or the unskipped reference) on the test split.

Every point reuses the trained mapper and the cached features: the soft prompts are computed
once, then each distinct plan decodes them through the skip engine. Scores, executed FLOPs
(prefill and decode, per component) and decode timing (``timing.json``, apart from the
deterministic ``metrics.json``) are written per point; the report
divides each score by the reference's (``mode="none"``: the engine with an empty plan on the
same examples).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mmskip.data.formats import read_captions, read_vqa, scenes_paths
from mmskip.evaluation.caption_metric import caption_scores_many
from mmskip.evaluation.vqa_metric import vqa_scores
from mmskip.features.cache import load_features
from mmskip.foundation.text import PromptsConfig
from mmskip.io import atomic_dir, dumps_json
from mmskip.mapper.model import Mapper, prefix_batch
from mmskip.mapper.train import TASKS, load_llm
from mmskip.skipping.accounting import RunStats
from mmskip.skipping.engine import SkipEngine
from mmskip.skipping.grid import REFERENCE, GridPoint, SkippingConfig, grid_points
from mmskip.skipping.plan import SkipPlan

log = logging.getLogger(__name__)


@dataclass
class Examples:
    """A task's test examples with their prompts, as the evaluation decodes them."""

    task: str
    items: list  # VQA questions or caption records
    prompt_ids: list[list[int]]
    rows: torch.Tensor  # feature row of each example
    max_new_tokens: int


def load_examples(task: str, scenes: Path, split: str, tokenizer, row_of: dict[int, int], prompts: PromptsConfig,
                  max_new_tokens: int, limit: int = 0) -> Examples:
    """The first ``limit`` examples of ``split`` (0: all), in file order."""
    paths = scenes_paths(scenes, split)
    if task == "vqa":
        items = read_vqa(paths["vqa_questions"], paths["vqa_annotations"])
        texts = [prompts.prompt("vqa", e.question) for e in items]
    else:
        items = read_captions(paths["captions"])
        texts = [prompts.caption_prompt] * len(items)
    if limit:
        items, texts = items[:limit], texts[:limit]
    prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return Examples(task, items, prompt_ids, torch.tensor([row_of[e.image_id] for e in items]), max_new_tokens)


@torch.no_grad()
def soft_prompt_batches(model, tokenizer, mapper: Mapper, feats: torch.Tensor, ex: Examples, batch_size: int):
    """Left-padded (inputs_embeds, attention_mask) batches: soft prompt then text prompt."""
    embed = model.get_input_embeddings()
    batches = []
    for s in range(0, len(ex.items), batch_size):
        soft = mapper(feats[ex.rows[s : s + batch_size]], embed.weight)
        embeds, mask, _ = prefix_batch(soft, ex.prompt_ids[s : s + batch_size], None, embed,
                                       tokenizer.pad_token_id, padding_side="left")
        batches.append((embeds, mask))
    return batches


def decode(engine: SkipEngine, tokenizer, batches, max_new_tokens: int, desc: str = "decode") -> list[str]:
    """Greedy answers of every batch through ``engine``; its ``stats`` accumulate the run."""
    out = []
    for embeds, mask in tqdm(batches, desc=desc, mininterval=5):
        tokens = engine.generate(mask, inputs_embeds=embeds, max_new_tokens=max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        out += [t.strip() for t in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
    return out


def _record(point: GridPoint, stats: RunStats, num_layers: int) -> dict:
    compute = stats.as_dict()
    return {
        "key": point.key, "mode": point.mode, "scope": point.scope, "interval": point.interval,
        "start_layer": point.start_layer, "layers": list(point.plan.layers),
        "num_dropped": point.plan.num_dropped, "skipped_blocks": point.skipped_blocks,
        "num_layers": num_layers, "combine": point.plan.combine, "context_kv": point.plan.context_kv,
        "prefill_flops_fraction": compute["prefill"]["flops_fraction"],
        "decode_flops_fraction": compute["decode"]["flops_fraction"],
        "prefill_depth_fraction": compute["prefill"]["depth_fraction"],
        "decode_depth_fraction": compute["decode"]["depth_fraction"],
        "compute": compute,
    }


def evaluate_skip(task: str, mode: str, scenes: Path, features: Path, llm: str | Path, mapper_dir: Path, out: Path,
                  prompts: PromptsConfig, cfg: SkippingConfig, split: str = "test", vqa_max_new_tokens: int = 4,
                  caption_max_new_tokens: int = 24) -> dict:
    if task not in TASKS:
        raise ValueError(f"task={task!r}: allowed {TASKS}")
    model, tokenizer = load_llm(llm)
    engine_layers = SkipEngine(model).num_layers
    points = grid_points(cfg, mode, engine_layers)  # refuses a bad mode or grid before any work
    mapper = Mapper.from_pretrained(mapper_dir)
    feats, row_of = load_features(features, split)
    max_new = vqa_max_new_tokens if task == "vqa" else caption_max_new_tokens
    ex = load_examples(task, scenes, split, tokenizer, row_of, prompts, max_new, cfg.limit(task))
    batches = soft_prompt_batches(model, tokenizer, mapper, feats, ex, cfg.decode_batch_size)
    # one decoding per distinct plan; later points with the same plan share it
    first_of: dict[SkipPlan, GridPoint] = {}
    runs: dict[str, tuple[list[str], RunStats]] = {}
    start = time.time()
    for point in points:
        plan = SkipPlan() if point.plan.empty else point.plan
        if plan in first_of:
            continue
        first_of[plan] = point
        engine = SkipEngine(model, plan)
        predictions = decode(engine, tokenizer, batches, max_new, desc=f"{task} {point.key}")
        runs[point.key] = (predictions, engine.stats)
    keys = list(runs)
    if task == "vqa":
        scores = []
        for key in keys:
            scored = vqa_scores([{"question_id": e.question_id, "image_id": e.image_id, "question": e.question,
                                  "question_type": e.question_type, "prediction": p, "answers": list(e.answers)}
                                 for e, p in zip(ex.items, runs[key][0])])
            scores.append({"accuracy": scored["accuracy"]})
    else:
        references = {e.image_id: list(e.captions) for e in ex.items}
        scores = caption_scores_many([{e.image_id: p for e, p in zip(ex.items, runs[key][0])} for key in keys],
                                     references)
    score_of = dict(zip(keys, scores))
    records, timings = [], {}
    for point in points:
        first = first_of[SkipPlan() if point.plan.empty else point.plan]
        record = _record(point, runs[first.key][1], engine_layers)
        record["same_as"] = None if first is point else first.key
        record["scores"] = score_of[first.key]
        records.append(record)
        timings[point.key] = {"same_as": record["same_as"], **runs[first.key][1].timing()}
        log.info("%s %s: %s, decode FLOPs x%.3f, %.2f ms/token", task, point.key, record["scores"],
                 record["decode_flops_fraction"], timings[point.key]["decode"]["ms_per_step"])
    log.info("%s/%s: %d points, %d decoded, %.1f s", task, mode, len(points), len(runs), time.time() - start)
    ids = [e.question_id if task == "vqa" else e.image_id for e in ex.items]
    metrics = {"task": task, "modality": "image", "mode": mode, "split": split, "num_examples": len(ex.items),
               "batch_size": cfg.decode_batch_size, "max_new_tokens": max_new, "reference": REFERENCE, "points": records}
    with atomic_dir(out) as tmp:
        (tmp / "metrics.json").write_text(dumps_json(metrics))
        (tmp / "predictions.json").write_text(dumps_json(
            {"task": task, "mode": mode, "ids": ids, "predictions": {key: runs[key][0] for key in keys}}))
        # wall time differs run to run: kept apart so metrics.json stays byte-identical
        (tmp / "timing.json").write_text(dumps_json(
            {"task": task, "mode": mode, "batch_size": cfg.decode_batch_size, "threads": torch.get_num_threads(),
             "note": "ms_per_step: wall time of one decode step, one new token for each row of the batch",
             "points": timings}))
    return metrics

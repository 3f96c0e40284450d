"""Evaluate a task's token-level grid (``mmskip evaluate_tokens``) on the skip grid's examples.

Each point is a :class:`mmskip.skipping.tokens.TokenPlan` run by the token engine on the trained
mapper's soft prompts, greedily, in the baseline's batches:

- ``visual_exit-l{l}``: the soft visual tokens leave after layer ``l``;
- ``fastv-l{l}-keep{r}``: after layer ``l`` only the fraction ``r`` of them most attended by the last
  prompt token stays;
- ``early_exit-l{l}-r{q}``: a generated token leaves the blocks above ``l`` where the LM head's
  entropy there is below a threshold: the entropy quantile ``q`` of the tokens still being generated
  on the first ``calibration_examples`` validation examples (decoded with nothing exiting), so about
  a share ``q`` of them would exit. A dataset without a validation split (OK-VQA at paper scale)
  calibrates on its training split; ``metrics.json`` names the split (``calibration_split``). Each
  record keeps its threshold and the share that did exit.

``points[0]`` of each kind's ``metrics.json`` is the baseline on the same examples (key
``baseline``, from the task's one baseline decode); the report divides each score by its. The
token engine also decodes the examples with nothing leaving (key ``token_engine``): it must give
the baseline's predictions (``same_as_baseline`` counts the examples that agree) and its decode time
is the reference of the points' time, measured in the same job (``timing.json``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mmskip.evaluation import BASELINE
from mmskip.evaluation.baseline import load_baseline
from mmskip.evaluation.evaluate_skip import compute_fields
from mmskip.evaluation.generate import answers
from mmskip.evaluation.runner import Run, load_example_set, score_runs, write_outputs
from mmskip.models import MapperModel, load_llm
from mmskip.skipping.grid import grid_limit
from mmskip.skipping.plan import TOKEN_KINDS
from mmskip.skipping.tokens import TokenEngine, TokenPlan
from mmskip.tasks import get_task

log = logging.getLogger(__name__)

REFERENCE = "token_engine"  # the token engine with nothing leaving: the points' time reference
# where early exit's thresholds come from: the validation split, or the training split where a dataset has none
CALIBRATION_SPLITS = ("val", "train")


@dataclass(frozen=True)
class TokenPoint:
    """One point of the token grid: a kind, its layer, fastv's kept fraction, early_exit's exit rate."""

    kind: str
    layer: int
    keep: float = 1.0
    rate: float = 0.0

    @property
    def key(self) -> str:
        extra = {"fastv": f"-keep{self.keep:g}", "early_exit": f"-r{self.rate:g}"}.get(self.kind, "")
        return f"{self.kind}-l{self.layer}{extra}"

    def plan(self, threshold: float = 0.0) -> TokenPlan:
        return TokenPlan(self.kind, self.layer, keep=self.keep, threshold=threshold)


def token_points(cfg, num_layers: int) -> dict[str, list[TokenPoint]]:
    """kind -> its points (params ``token_skipping``) for a ``num_layers``-layer LLM; refuses a layer with no
    block after it."""
    layers = {"visual_exit": cfg.visual_exit_layers, "fastv": cfg.fastv_layers, "early_exit": cfg.early_exit_layers}
    points = {}
    for kind in cfg.kinds:
        if kind not in TOKEN_KINDS:
            raise ValueError(f"token_skipping.kinds: {kind!r} is not one of {list(TOKEN_KINDS)}")
        bad = [layer for layer in layers[kind] if not 0 <= layer <= num_layers - 2]
        if bad:
            raise ValueError(f"token_skipping.{kind}_layers={list(layers[kind])}: {bad} not from 0 to "
                             f"{num_layers - 2} for a {num_layers}-layer LLM")
        if kind == "fastv":
            points[kind] = [TokenPoint(kind, layer, keep=keep) for layer in layers[kind] for keep in cfg.fastv_keep]
        elif kind == "early_exit":
            points[kind] = [TokenPoint(kind, layer, rate=rate) for layer in layers[kind] for rate in cfg.exit_rates]
        else:
            points[kind] = [TokenPoint(kind, layer) for layer in layers[kind]]
    return points


def visual_mask(mask: torch.Tensor, num_visual: int) -> torch.Tensor:
    """(B, T) bool: the soft prompt's positions in a left-padded prompt batch, the first ``num_visual``
    unpadded positions of each row (``mmskip.mapper.model.prefix_batch``: padding, soft prompt, text)."""
    return mask.bool() & (mask.long().cumsum(-1) <= num_visual)


def active_entropies(entropies: list[torch.Tensor], tokens: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """The entropies of the cached decode steps (``TokenEngine.entropies``, one (B,) per step) of the rows
    still generating at that step: step s reads token s - 1, so a row counts while tokens[:, :s] hold no end."""
    if not entropies:
        return torch.zeros(0)
    ended = torch.zeros(tokens.shape, dtype=torch.bool) if eos_token_id is None else (tokens.cpu() == eos_token_id)
    done = ended.long().cumsum(1) > 0  # (B, n): the row had ended at or before this token
    return torch.cat([e.cpu()[~done[:, s]] for s, e in enumerate(entropies)])  # step s + 1 reads token s


def _decode(model, plan: TokenPlan, batches, visuals, ex, key: str) -> tuple[Run, list[torch.Tensor]]:
    """Greedy answers of every batch under ``plan``; the run and the active entropies of each batch."""
    engine = TokenEngine(model.llm, plan)
    predictions, entropies = [], []
    eos = model.tokenizer.eos_token_id
    for (embeds, mask), visual in tqdm(list(zip(batches, visuals)), desc=f"{ex.task.name} {key}",
                                       mininterval=5):
        tokens = engine.generate(mask, inputs_embeds=embeds, visual=visual, max_new_tokens=ex.max_new_tokens,
                                 eos_token_id=eos, pad_token_id=model.tokenizer.pad_token_id)
        predictions += answers(model.tokenizer, tokens)
        entropies.append(active_entropies(engine.entropies, tokens, eos))
    return Run(key, predictions, engine.stats), entropies


def thresholds_at(entropies: torch.Tensor, rates) -> dict[float, float]:
    """rate -> the entropy quantile at that rate (numpy's linear interpolation), in nats."""
    if not len(entropies):
        raise ValueError("no generated token to calibrate early_exit on (every calibration answer ended at once)")
    values = entropies.double().numpy()
    return {rate: float(np.quantile(values, rate)) for rate in rates}


def _record(point: TokenPoint | None, run: Run, threshold: float | None, exited: float | None) -> dict:
    return {
        "key": point.key if point else BASELINE, "kind": point.kind if point else "none",
        "layer": point.layer if point else None,
        "keep": point.keep if point and point.kind == "fastv" else None,
        "exit_rate": point.rate if point and point.kind == "early_exit" else None,
        "threshold": threshold, "exited_fraction": exited, **compute_fields(run.stats),
    }


def evaluate_tokens(task: str, scenes: Path, features: Path, llm: str | Path, mapper_dir: Path, baseline: Path,
                    out: Path, prompts, skipping, cfg, evaluation, shares=None, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> dict[str, dict]:
    """Every point of every kind of ``cfg.kinds`` (params ``token_skipping``) on the skip grid's examples of
    ``task`` (``skipping``, ``shares``: ``grid_limit``), after the baseline's point from ``baseline``
    (results/baseline/{task}): ``out/{kind}/`` gets each kind's metrics, predictions and timing. Early exit's
    thresholds come from the validation split's first ``cfg.calibration_examples`` examples."""
    spec = get_task(task)
    model, tokenizer = load_llm(llm, device, dtype)
    num_layers = TokenEngine(model).num_layers
    points = token_points(cfg, num_layers)  # refuses a bad layer before any work
    mm = MapperModel.load(model, tokenizer, mapper_dir, features, evaluation.split)
    num_visual = mm.mapper.config.num_query_tokens
    ex = load_example_set(spec, scenes, evaluation.split, tokenizer, prompts, spec.max_new_tokens(evaluation),
                          grid_limit(skipping, spec, shares))
    batches = mm.prompt_batches(ex, evaluation.batch_size)
    visuals = [visual_mask(mask, num_visual) for _, mask in batches]
    baseline_run = load_baseline(baseline, mm, ex, evaluation.batch_size, batches)

    thresholds: dict[int, dict[float, float]] = {}
    cal_split = None
    if points.get("early_exit"):
        for cal_split in CALIBRATION_SPLITS:
            try:
                val = MapperModel.load(model, tokenizer, mapper_dir, features, cal_split)
                cal = load_example_set(spec, scenes, cal_split, tokenizer, prompts, spec.max_new_tokens(evaluation),
                                       cfg.calibration_examples)
                break
            except ValueError as err:  # no such split (OK-VQA: its val2014 questions are the test split)
                if cal_split == CALIBRATION_SPLITS[-1]:
                    raise
                log.warning("%s: %s; early exit calibrates on the next split", task, err)
        cal_batches = val.prompt_batches(cal, evaluation.batch_size)
        cal_visuals = [visual_mask(mask, num_visual) for _, mask in cal_batches]
        for layer in sorted({p.layer for p in points["early_exit"]}):
            _, ents = _decode(val, TokenPlan("early_exit", layer, threshold=0.0), cal_batches, cal_visuals, cal,
                              f"calibration-l{layer}")
            thresholds[layer] = thresholds_at(torch.cat(ents), cfg.exit_rates)
            log.info("%s early_exit layer %d: thresholds %s (nats) from %d calibration tokens", task, layer,
                     thresholds[layer], sum(len(e) for e in ents))

    start = time.time()
    reference, _ = _decode(mm, TokenPlan(), batches, visuals, ex, REFERENCE)
    agree = sum(a == b for a, b in zip(reference.predictions, baseline_run.predictions, strict=True))
    runs: dict[str, tuple[TokenPoint, Run, float | None, float | None]] = {}
    for kind, kind_points in points.items():
        for point in kind_points:
            threshold = thresholds[point.layer][point.rate] if kind == "early_exit" else None
            run, ents = _decode(mm, point.plan(threshold or 0.0), batches, visuals, ex, point.key)
            exited = None
            if kind == "early_exit":
                active = torch.cat(ents)
                exited = float((active < threshold).double().mean()) if len(active) else 0.0
            runs[point.key] = (point, run, threshold, exited)
    log.info("%s: %d token points decoded in %.1f s; the token engine agrees with the baseline on %d of %d",
             task, len(runs), time.time() - start, agree, len(ex.examples))
    score_of = score_runs(ex, [baseline_run] + [run for _, run, _, _ in runs.values()])

    base_record = {**_record(None, baseline_run, None, None), "scores": score_of[BASELINE]["scores"]}
    ref_ms = reference.stats.timing()["decode"]["ms_per_step"]
    result = {}
    for kind, kind_points in points.items():
        records, timings = [base_record], {BASELINE: baseline_run.stats.timing()}
        for point in kind_points:
            _, run, threshold, exited = runs[point.key]
            records.append({**_record(point, run, threshold, exited), "scores": score_of[point.key]["scores"]})
            timings[point.key] = run.stats.timing()
            log.info("%s %s: %s, prefill FLOPs x%.3f, decode FLOPs x%.3f", task, point.key,
                     records[-1]["scores"], records[-1]["prefill_flops_fraction"],
                     records[-1]["decode_flops_fraction"])
        metrics = {"task": task, "modality": spec.modality, "kind": kind, "split": evaluation.split,
                   "num_examples": len(ex.examples), "batch_size": evaluation.batch_size,
                   "max_new_tokens": ex.max_new_tokens, "num_layers": num_layers, "num_visual_tokens": num_visual,
                   "calibration_examples": len(cal.examples) if kind == "early_exit" else None,
                   "calibration_split": cal_split if kind == "early_exit" else None,
                   "reference": BASELINE, "same_as_baseline": agree, "points": records}
        result[kind] = metrics
        write_outputs(Path(out) / kind, {
            "metrics.json": metrics,
            "predictions.json": {"task": task, "kind": kind, "ids": ex.ids,
                                 "predictions": {key: runs[key][1].predictions if key in runs
                                                 else baseline_run.predictions
                                                 for key in [BASELINE] + [p.key for p in kind_points]}},
            # wall time differs run to run: kept apart so metrics.json stays byte-identical
            "timing.json": {"task": task, "kind": kind, "batch_size": evaluation.batch_size,
                            "threads": torch.get_num_threads(), REFERENCE: reference.stats.timing(),
                            "note": "ms_per_step: wall time of one decode step; each point's time is read against "
                                    f"{REFERENCE}'s, the token engine with nothing leaving, timed in this job",
                            "reference_ms_per_step": ref_ms, "points": timings}})
    return result

"""Training the mapper with a compressed LLM, and evaluating it against inference-only compression.

Variants (one mapper per task each):
- ``dense``: the control, the same training with the uncompressed LLM; it tells what the
  compressed variants gain from the extra training alone (with ``train_init: baseline`` the
  baseline mapper is fine-tuned for as many steps as they are);
- ``pruned``: the LLM carries the task's Wanda mask at ``compression.train_sparsity``
  (``compression.calibration``), the same mask file the inference-only evaluation uses;
- ``skipped``: the LLM runs through the skip engine with ``skip_block`` on every
  ``train_skip_interval``-th layer after ``train_skip_start_layer``, on all tokens (the paper's
  training with skipping);
- ``small``: a mapper for the smaller LLM (params ``llm_small``), trained from scratch for
  ``compression.small_{task}_steps`` (0: the baseline mapper's steps).

``compression.train_init: baseline`` fine-tunes the trained baseline mapper for
``train_{task}_steps`` steps; ``scratch`` trains a new mapper for the baseline's steps, as the
paper does. The small LLM's mapper always starts from scratch (its prompts have another width).
"""

from __future__ import annotations

import logging
from pathlib import Path

from mmskip.compression.pruning import PruneSpec, apply_masks, load_masks, mask_sparsity
from mmskip.evaluation.caption_metric import caption_scores_many
from mmskip.evaluation.evaluate_skip import decode, load_examples, soft_prompt_batches
from mmskip.evaluation.vqa_metric import vqa_scores
from mmskip.features.cache import load_features
from mmskip.foundation.text import PromptsConfig
from mmskip.io import atomic_dir, dumps_json
from mmskip.mapper.model import Mapper
from mmskip.mapper.train import TASKS, MapperTrainConfig, load_llm, train_mapper
from mmskip.skipping.engine import SkipEngine
from mmskip.skipping.plan import SkipPlan, every_kth_layer

log = logging.getLogger(__name__)

from mmskip.compression.names import TRAIN_VARIANTS  # noqa: E402  (re-exported)


def train_mask_path(masks_dir: Path, task: str, cfg) -> Path:
    return Path(masks_dir) / task / cfg.calibration / PruneSpec("wanda", cfg.train_sparsity).key / "mask.safetensors"


def train_skip_plan(num_layers: int, cfg) -> SkipPlan:
    layers = every_kth_layer(num_layers, cfg.train_skip_interval, cfg.train_skip_start_layer)
    if not layers:
        raise ValueError(f"train_skip_interval={cfg.train_skip_interval}, train_skip_start_layer="
                         f"{cfg.train_skip_start_layer} skip no layer of a {num_layers}-layer LLM")
    return SkipPlan("skip_block", layers, "all")


def train_compressed(variant: str, task: str, scenes: Path, features: Path, llm: str | Path, out: Path,
                     metrics: Path, seed: int, mapper_cfg: MapperTrainConfig, prompts: PromptsConfig, cfg,
                     masks_dir: Path | None = None, init: Path | None = None,
                     checkpoint_dir: Path | None = None) -> dict:
    if variant not in TRAIN_VARIANTS:
        raise ValueError(f"variant={variant!r}: allowed {list(TRAIN_VARIANTS)}")
    if task not in TASKS:
        raise ValueError(f"task={task!r}: allowed {list(TASKS)}")
    masks = plan = None
    extra = {"variant": variant}
    if variant == "pruned":
        if masks_dir is None:
            raise ValueError("variant 'pruned' needs --masks (models/masks/wanda)")
        path = train_mask_path(masks_dir, task, cfg)
        if not path.is_file():
            raise ValueError(f"{path}: no Wanda mask at train_sparsity={cfg.train_sparsity}; compression.sparsities "
                             "must include it")
        masks = load_masks(path)
        extra.update(mask=str(path), achieved_sparsity=mask_sparsity(masks)["overall"])
    if variant == "skipped":
        model, _ = load_llm(llm)
        plan = train_skip_plan(len(SkipEngine(model).adapter.layers()), cfg)
        extra.update(skip_plan={"mode": plan.mode, "layers": list(plan.layers), "scope": plan.scope})
    steps = None
    if variant != "small" and cfg.train_init == "baseline":
        if init is None:
            raise ValueError("train_init='baseline' needs --init (the trained baseline mapper)")
        steps = cfg.train_vqa_steps if task == "vqa" else cfg.train_caption_steps
    else:
        init = None
        if variant == "small":
            steps = (cfg.small_vqa_steps if task == "vqa" else cfg.small_caption_steps) or None
    return train_mapper(task, scenes, features, llm, out, metrics, seed, mapper_cfg, prompts, masks=masks,
                        skip_plan=plan, init=init, steps=steps, extra=extra, checkpoint_dir=checkpoint_dir)


def evaluate_trained(task: str, scenes: Path, features: Path, llm: Path, llm_small: Path, baseline_mapper: Path,
                     mappers: dict[str, Path], masks_dir: Path, out: Path, prompts: PromptsConfig, cfg,
                     split: str = "test", vqa_max_new_tokens: int = 4, caption_max_new_tokens: int = 24) -> dict:
    """Per variant: the baseline mapper under the compression (inference only) and the mapper
    trained with it, on the same first test examples as the dense baseline reference; and the
    control, the mapper given the same training on the dense LLM."""
    missing = [v for v in TRAIN_VARIANTS if v not in mappers]
    if missing:
        raise ValueError(f"missing trained mappers for {missing}")
    max_new = vqa_max_new_tokens if task == "vqa" else caption_max_new_tokens
    feats, row_of = load_features(features, split)
    dense, tokenizer = load_llm(llm)
    small, small_tok = load_llm(llm_small)
    ex = load_examples(task, scenes, split, tokenizer, row_of, prompts, max_new, cfg.limit(task))
    baseline = Mapper.from_pretrained(baseline_mapper)
    pruned = load_llm(llm)[0]

    train_mask = load_masks(train_mask_path(masks_dir, task, cfg))
    apply_masks(pruned, train_mask)
    pruned_sparsity = mask_sparsity(train_mask)["overall"]
    plan = train_skip_plan(len(SkipEngine(dense).adapter.layers()), cfg)
    runs = {  # key -> (LLM, tokenizer, mapper, plan)
        "dense": (dense, tokenizer, baseline, None),
        "dense/trained": (dense, tokenizer, Mapper.from_pretrained(mappers["dense"]), None),
        "pruned/inference_only": (pruned, tokenizer, baseline, None),
        "pruned/trained": (pruned, tokenizer, Mapper.from_pretrained(mappers["pruned"]), None),
        "skipped/inference_only": (dense, tokenizer, baseline, plan),
        "skipped/trained": (dense, tokenizer, Mapper.from_pretrained(mappers["skipped"]), plan),
        "small/trained": (small, small_tok, Mapper.from_pretrained(mappers["small"]), None),
    }
    predictions, compute = {}, {}
    for key, (model, tok, mapper, skip) in runs.items():
        batches = soft_prompt_batches(model, tok, mapper, feats, ex, cfg.decode_batch_size)
        engine = SkipEngine(model, skip)
        predictions[key] = decode(engine, tok, batches, max_new, desc=f"{task} {key}")
        compute[key] = engine.stats.as_dict()
    keys = list(runs)
    if task == "vqa":
        scores = [{"accuracy": vqa_scores([{"question_id": e.question_id, "image_id": e.image_id,
                                            "question": e.question, "question_type": e.question_type,
                                            "prediction": p, "answers": list(e.answers)}
                                           for e, p in zip(ex.items, predictions[k])])["accuracy"]} for k in keys]
    else:
        references = {e.image_id: list(e.captions) for e in ex.items}
        scores = caption_scores_many([{e.image_id: p for e, p in zip(ex.items, predictions[k])} for k in keys],
                                     references)
    params = {"dense": sum(p.numel() for p in dense.parameters()),
              "small": sum(p.numel() for p in small.parameters())}
    points = []
    for key, score in zip(keys, scores):
        variant, _, how = key.partition("/")
        points.append({"key": key, "variant": variant, "trained_with_compression": how == "trained",
                       "scores": score, "llm_params": params["small" if variant == "small" else "dense"],
                       "decode_flops_fraction": compute[key]["decode"]["flops_fraction"],
                       "prefill_flops_fraction": compute[key]["prefill"]["flops_fraction"],
                       "sparsity": pruned_sparsity if variant == "pruned" else 0.0,
                       "skip_layers": list(plan.layers) if variant == "skipped" else []})
        log.info("%s %s: %s", task, key, score)
    ids = [e.question_id if task == "vqa" else e.image_id for e in ex.items]
    result = {"task": task, "modality": "image", "split": split, "num_examples": len(ex.items),
              "reference": "dense", "train_init": cfg.train_init, "points": points}
    with atomic_dir(out) as tmp:
        (tmp / "metrics.json").write_text(dumps_json(result))
        (tmp / "predictions.json").write_text(dumps_json({"task": task, "ids": ids, "predictions": predictions}))
    return result

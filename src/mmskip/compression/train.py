"""Training the mapper with a compressed LLM, and evaluating it against inference-only compression.

Variants (``mmskip train_compressed --variant``, one mapper per task each; params ``train_compressed``):
- ``dense``: the control, the same training with the uncompressed LLM; it tells what the
  compressed variants gain from the extra training alone (with ``init: baseline`` the
  baseline mapper is fine-tuned for as many steps as they are);
- ``pruned``: the LLM carries the task's Wanda mask at ``train_compressed.sparsity``
  (``pruning.calibration``), the same mask file the inference-only evaluation uses;
- ``skipped``: the LLM runs through the skip engine with ``skip_block`` on every
  ``interval``-th layer after ``start_layer``, on all tokens (the paper's
  training with skipping);
- ``small``: a mapper for the smaller LLM (params ``llm_small``), trained from scratch for
  ``train_compressed.small_{task}_steps`` (0: the baseline mapper's steps).

``train_compressed.init: baseline`` fine-tunes the trained baseline mapper for
``finetune_{task}_steps`` steps; ``scratch`` trains a new mapper for the baseline's steps, as the
paper does. The small LLM's mapper always starts from scratch (its prompts have another width).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mmskip.compression.pruning import PruneSpec, load_masks, mask_sparsity
from mmskip.evaluation import BASELINE
from mmskip.evaluation.baseline import load_baseline
from mmskip.evaluation.runner import load_example_set, masked, decode_point, score_runs, write_outputs
from mmskip.foundation.text import PromptsConfig
from mmskip.mapper.model import Mapper
from mmskip.mapper.train import MapperTrainConfig, train_mapper
from mmskip.models import MapperModel, load_llm
from mmskip.params import CompressionConfig, StepSharesConfig, TrainCompressedConfig
from mmskip.skipping.engine import SkipEngine
from mmskip.skipping.plan import SkipPlan, every_kth_layer, official_plan
from mmskip.tasks import get_task

log = logging.getLogger(__name__)

from mmskip.compression.names import TRAIN_VARIANTS  # noqa: E402  (re-exported)


def train_mask_path(masks_dir: Path, task: str, cfg: TrainCompressedConfig, calibration: str) -> Path:
    """The task's Wanda mask at ``train_compressed.sparsity`` (``pruning.calibration``)."""
    return Path(masks_dir) / task / calibration / PruneSpec("wanda", cfg.sparsity).key / "mask.safetensors"


def train_skip_plan(num_layers: int, cfg: TrainCompressedConfig) -> SkipPlan:
    """skip_block on every ``interval``-th layer after ``start_layer``, all tokens, under
    ``cfg.semantics`` (official: never layer 0 nor the last layer)."""
    if cfg.semantics == "official":
        plan = official_plan("skip_block", num_layers, cfg.interval, cfg.start_layer, None, "all")
    else:
        plan = SkipPlan("skip_block", every_kth_layer(num_layers, cfg.interval, cfg.start_layer), "all")
    if plan.empty:
        raise ValueError(f"interval={cfg.interval}, start_layer={cfg.start_layer} skip no layer "
                         f"of a {num_layers}-layer LLM ({cfg.semantics} semantics)")
    return plan


def train_compressed(variant: str, task: str, scenes: Path, features: Path, llm: str | Path, out: Path,
                     metrics: Path, seed: int, mapper_cfg: MapperTrainConfig, prompts: PromptsConfig,
                     cfg: TrainCompressedConfig, calibration: str | None = None, masks_dir: Path | None = None,
                     init: Path | None = None, checkpoint_dir: Path | None = None,
                     device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                     shares: StepSharesConfig | None = None) -> dict:
    """Train ``variant``'s mapper for ``task``; each variant reads only its own inputs: the Wanda
    masks (``masks_dir``, ``calibration``) for pruned, the baseline mapper (``init``) for all but
    small, which trains from scratch against the smaller LLM given as ``llm``. Its steps: the modality's share
    (``shares``, params ``step_shares``) of the format's key."""
    if variant not in TRAIN_VARIANTS:
        raise ValueError(f"variant={variant!r}: allowed {list(TRAIN_VARIANTS)}")
    given = {"--masks": masks_dir, "--calibration": calibration, "--mapper": init}
    reads = {"--masks", "--calibration"} if variant == "pruned" else set()
    if variant != "small":
        reads.add("--mapper")
    extra_inputs = sorted(flag for flag, value in given.items() if value is not None and flag not in reads)
    if extra_inputs:
        raise ValueError(f"variant {variant!r} reads no {', '.join(extra_inputs)} (it reads: "
                         f"{', '.join(sorted(reads)) or 'no input besides the LLM'})")
    if variant == "pruned" and (masks_dir is None or calibration is None):
        raise ValueError("variant 'pruned' needs --masks (models/masks/wanda) and --calibration")
    if variant != "small" and cfg.init == "baseline" and init is None:
        raise ValueError(f"variant {variant!r} with init='baseline' needs --mapper (the trained baseline mapper)")
    spec = get_task(task)
    masks = plan = None
    extra = {"variant": variant}
    if variant == "pruned":
        path = train_mask_path(masks_dir, task, cfg, calibration)
        if not path.is_file():
            raise ValueError(f"{path}: no Wanda mask at train_compressed.sparsity={cfg.sparsity}; pruning.sparsities "
                             "must include it")
        masks = load_masks(path)
        extra.update(mask=str(path), achieved_sparsity=mask_sparsity(masks)["overall"])
    if variant == "skipped":
        from transformers import AutoConfig

        from mmskip.foundation.hub import checkpoint

        # the layer count from the config: the LLM itself is loaded once, by train_mapper below
        plan = train_skip_plan(AutoConfig.from_pretrained(checkpoint(llm)).num_hidden_layers, cfg)
        extra.update(skip_plan={"mode": plan.mode, "layers": list(plan.layers), "scope": plan.scope,
                                "semantics": plan.semantics})
    shares = shares or StepSharesConfig()
    steps = None
    if variant != "small" and cfg.init == "baseline":
        steps = spec.steps(cfg, shares, prefix="finetune_")
    else:
        init = None
        if variant == "small":
            steps = spec.steps(cfg, shares, prefix="small_") or None
    return train_mapper(task, scenes, features, llm, out, metrics, seed, mapper_cfg, prompts, masks=masks,
                        skip_plan=plan, init=init, steps=steps, extra=extra, checkpoint_dir=checkpoint_dir,
                        device=device, dtype=dtype, shares=shares)


def evaluate_trained(task: str, scenes: Path, features: Path, llm: Path, llm_small: Path | None, baseline_mapper: Path,
                     mappers: dict[str, Path], masks_dir: Path | None, baseline: Path, out: Path,
                     prompts: PromptsConfig, cfg: CompressionConfig, train: TrainCompressedConfig, calibration: str,
                     evaluation, shares=None, device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None) -> dict:
    """Per variant of ``train.variants`` (each mapper in ``mappers``): the baseline mapper under the compression
    (inference only) and the mapper trained with it, on the same first test examples as the baseline (from
    ``baseline``, results/baseline/{task}); the control (dense), the mapper given the same training on the dense LLM;
    and the smaller LLM (``llm_small``) with its own mapper (small). ``masks_dir`` is read for pruned only; with
    ``shares`` (params ``example_shares``), the modality's share of the examples."""
    spec = get_task(task)
    variants = [v for v in TRAIN_VARIANTS if v in train.variants]
    missing = [v for v in variants if v not in mappers]
    if missing:
        raise ValueError(f"missing trained mappers for {missing}")
    needs = {"llm_small": ("small", llm_small), "masks": ("pruned", masks_dir)}
    for flag, (variant, given) in needs.items():
        if (variant in variants) != (given is not None):
            raise ValueError(f"--{flag} is read for variant {variant!r} only: train_compressed.variants={variants}, "
                             f"--{flag} {'missing' if given is None else given}")
    dense, tokenizer = load_llm(llm, device, dtype)
    base = MapperModel.load(dense, tokenizer, baseline_mapper, features, evaluation.split)
    ex = load_example_set(spec, scenes, evaluation.split, tokenizer, prompts, spec.max_new_tokens(evaluation),
                          spec.limit(cfg, shares))
    trained = {v: base.with_mapper(Mapper.from_pretrained(mappers[v])) for v in variants if v != "small"}
    runs = {}  # key -> (model, mask on the dense LLM, skip plan); one dense LLM, masked in place when asked
    if "dense" in variants:
        runs["dense/trained"] = (trained["dense"], None, None)
    if "pruned" in variants:
        train_mask = load_masks(train_mask_path(masks_dir, task, train, calibration))
        pruned_sparsity = mask_sparsity(train_mask)["overall"]
        runs["pruned/inference_only"] = (base, train_mask, None)
        runs["pruned/trained"] = (trained["pruned"], train_mask, None)
    plan = None
    if "skipped" in variants:
        plan = train_skip_plan(len(SkipEngine(dense).adapter.layers()), train)
        runs["skipped/inference_only"] = (base, None, plan)
        runs["skipped/trained"] = (trained["skipped"], None, plan)
    params = {"dense": sum(p.numel() for p in dense.parameters())}
    if "small" in variants:
        small, small_tok = load_llm(llm_small, device, dtype)
        params["small"] = sum(p.numel() for p in small.parameters())
        runs["small/trained"] = (base.with_mapper(Mapper.from_pretrained(mappers["small"]), small, small_tok), None,
                                 None)
    decoded = [load_baseline(baseline, base, ex, evaluation.batch_size)]
    for key, (model, mask, skip) in runs.items():
        with masked(model.llm, mask):
            decoded.append(decode_point(model, ex, evaluation.batch_size, key, skip))
    score_of = score_runs(ex, decoded)
    points = []
    for run in decoded:
        variant, _, how = run.key.partition("/")
        compute = run.stats.as_dict()
        points.append({"key": run.key, "variant": variant, "trained_with_compression": how == "trained",
                       "scores": score_of[run.key]["scores"], "llm_params": params["small" if variant == "small" else "dense"],
                       "decode_flops_fraction": compute["decode"]["flops_fraction"],
                       "prefill_flops_fraction": compute["prefill"]["flops_fraction"],
                       "sparsity": pruned_sparsity if variant == "pruned" else 0.0,
                       "skip_layers": list(plan.layers) if variant == "skipped" else []})
        log.info("%s %s: %s", task, run.key, score_of[run.key]["scores"])
    result = {"task": task, "modality": spec.modality, "split": evaluation.split, "num_examples": len(ex.examples),
              "reference": BASELINE, "variants": variants, "train_init": train.init,
              "skip_semantics": train.semantics, "points": points}
    write_outputs(out, {"metrics.json": result,
                        "predictions.json": {"task": task, "ids": ex.ids,
                                             "predictions": {r.key: r.predictions for r in decoded}}})
    return result

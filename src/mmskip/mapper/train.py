"""Train one mapper per task against the frozen LLM, reading cached encoder features.

Loss on answer / caption tokens only; AdamW with linear warmup and cosine decay. The LLM
and the encoder stay frozen; only the mapper's parameters receive gradients.

Training runs through the one ``mmskip.training.Trainer`` and is resumable: every
``checkpoint_every`` steps the whole training state is written under ``checkpoint_dir``, outside
the declared outputs; a killed job started again continues from the latest checkpoint of the same
run (``run_identity``) and ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from mmskip.features.cache import load_features
from mmskip.foundation.llm import target_loss
from mmskip.foundation.text import PromptsConfig
from mmskip.io import atomic_dir, dumps_json, write_json
from mmskip.mapper.model import Mapper, MapperConfig, prefix_batch
from mmskip.models import load_llm
from mmskip.params import MapperTrainConfig, StepSharesConfig
from mmskip.tasks import get_task, scaled
from mmskip.training import Trainer, code_digest, tensors_digest

log = logging.getLogger(__name__)


def task_examples(task: str, scenes: Path, split: str, prompts: PromptsConfig) -> list[tuple[int, str, str]]:
    """(image_id, prompt, target) triples of a split (the task entry's ``training_pairs``)."""
    return get_task(task).training_pairs(scenes, split, prompts)


def encode_examples(tokenizer, examples) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids and target ids (a leading space, then the end-of-sequence token)."""
    prompt_ids = tokenizer([p for _, p, _ in examples], add_special_tokens=False)["input_ids"]
    target_ids = tokenizer([f" {t}" for _, _, t in examples], add_special_tokens=False)["input_ids"]
    return prompt_ids, [t + [tokenizer.eos_token_id] for t in target_ids]


# A checkpoint resumes only a run of the same identity; bump when the layout of checkpoints changes.
CHECKPOINT_FORMAT = 1


def run_identity(task: str, seed: int, steps: int, cfg: MapperTrainConfig, prompts: PromptsConfig, llm_model,
                 mapper: Mapper, feats: torch.Tensor, rows: torch.Tensor, prompt_ids: list, target_ids: list,
                 pad_token_id: int, skip_plan, extra: dict | None) -> dict:
    """What makes a training run this run: a checkpoint resumes only a run with the same identity.

    The inputs are identified by what training actually reads, after loading: the LLM's
    parameters with any pruning mask applied, the starting mapper (``init`` or the seeded
    initialisation), the cached features and the tokenised examples (so the tokenizer and the
    scenes count too); and the code. ``checkpoint_every`` is left out: it does not change the
    trajectory.
    """
    examples = hashlib.sha256(dumps_json([rows.tolist(), prompt_ids, target_ids, pad_token_id], compact=True)
                              .encode()).hexdigest()
    identity = {
        "format": CHECKPOINT_FORMAT, "task": task, "seed": seed, "steps": steps,
        "config": {k: v for k, v in asdict(cfg).items() if k != "checkpoint_every"},
        "prompts": asdict(prompts), "skip_plan": None if skip_plan is None else asdict(skip_plan),
        "extra": extra or {}, "llm": tensors_digest(llm_model.state_dict()),
        "mapper_init": tensors_digest(mapper.state_dict()), "features": tensors_digest({"features": feats}),
        "examples": examples, "code": code_digest(),
    }
    return json.loads(dumps_json(identity))  # as it reads back from state.json (tuples become lists)


def engine_loss(model, plan):
    """``target_loss`` with the LLM run through the skip engine under ``plan`` (differentiable)."""
    from mmskip.skipping.engine import SkipEngine

    engine = SkipEngine(model, plan)

    def loss_fn(model, embeds, mask, labels):
        logits, _ = engine.forward(mask, embeds.shape[1], inputs_embeds=embeds)
        target = labels[:, 1:]
        keep = target != -100
        return torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), target[keep])
    return loss_fn


def train_mapper(task: str, scenes: Path, features: Path, llm: str | Path, out: Path, metrics: Path,
                 seed: int, cfg: MapperTrainConfig, prompts: PromptsConfig, masks: dict | None = None,
                 skip_plan=None, init: Path | None = None, steps: int | None = None, extra: dict | None = None,
                 checkpoint_dir: Path | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, shares: StepSharesConfig | None = None) -> dict:
    """Train (or, from ``init``, fine-tune) a mapper against the frozen LLM.

    ``masks`` prunes the LLM first and ``skip_plan`` runs it through the skip engine, so the
    mapper learns against the compressed LLM it will be evaluated with; ``steps`` overrides
    the task's step count (its format's key, the modality's share of it: ``shares``, params
    ``step_shares``). With ``checkpoint_dir`` the run checkpoints every
    ``cfg.checkpoint_every`` steps, resumes from a checkpoint of the same run, and deletes
    its checkpoints once ``out`` and ``metrics`` are written. The LLM runs on ``device`` in ``dtype``;
    the mapper is made on the CPU (the same initialisation everywhere), then trained on ``device`` in
    float32.
    """
    spec = get_task(task)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, tokenizer = load_llm(llm, device, dtype)
    if masks is not None:
        from mmskip.compression.pruning import apply_masks

        apply_masks(model, masks)
    loss_fn = target_loss if skip_plan is None else engine_loss(model, skip_plan)
    feats, row_of = load_features(features, "train")
    examples = task_examples(task, scenes, "train", prompts)
    prompt_ids, target_ids = encode_examples(tokenizer, examples)
    rows = torch.tensor([row_of[image_id] for image_id, _, _ in examples])
    embed = model.get_input_embeddings()
    if init is not None:
        mapper = Mapper.from_pretrained(init)
        if mapper.config.llm_dim != embed.embedding_dim:
            raise ValueError(f"mapper {init} writes {mapper.config.llm_dim}-d prompts; the LLM takes {embed.embedding_dim}-d")
        mapper.train().requires_grad_(True)
    else:
        mapper = Mapper(MapperConfig(encoder_dim=feats.shape[-1], num_visual_tokens=feats.shape[1],
                                     llm_dim=embed.embedding_dim, num_query_tokens=cfg.num_query_tokens,
                                     num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
                                     ffn_dim=cfg.ffn_dim,
                                     output=cfg.output, vocab_size=embed.num_embeddings))
    shares = shares or StepSharesConfig()
    share = spec.share(shares)
    steps = steps or spec.steps(cfg, shares)
    warmup = scaled(cfg.warmup_steps, share)  # the modality's share of the schedule, as of its steps
    mapper.to(model.get_input_embeddings().weight.device)
    trainable = sum(p.numel() for p in mapper.parameters())
    log.info("%s mapper: %d trainable parameters, %d examples, %d steps", task, trainable, len(examples), steps)
    by_image: dict[int, list[int]] = {}
    for i, (image_id, _, _) in enumerate(examples):
        by_image.setdefault(row_of[image_id], []).append(i)
    image_rows = sorted(by_image)
    identity = None
    if checkpoint_dir is not None:
        identity = run_identity(task, seed, steps, cfg, prompts, model, mapper, feats, rows, prompt_ids, target_ids,
                                tokenizer.pad_token_id, skip_plan, extra)
    trainer = Trainer(list(mapper.parameters()), steps, cfg.lr, warmup, cfg.weight_decay, rng,
                      desc=f"train mapper {task}", modules={"mapper": mapper}, checkpoint_dir=checkpoint_dir,
                      checkpoint_every=cfg.checkpoint_every, identity=identity)

    def step_loss(step: int) -> torch.Tensor:
        # Whole images: the mapper runs once per image and learns from all its questions at once.
        idx: list[int] = []
        for r in rng.permutation(len(image_rows)):
            idx += by_image[image_rows[int(r)]]
            if len(idx) >= cfg.batch_size:
                break
        idx = idx[: cfg.batch_size]
        images, which = torch.unique(rows[idx], return_inverse=True)
        visual = feats[images].to(embed.weight.device, mapper.dtype)  # the mapper's device and dtype
        soft = mapper(visual, embed.weight)[which]  # (B, K, D)
        embeds, mask, labels = prefix_batch(soft, [prompt_ids[i] for i in idx], [target_ids[i] for i in idx],
                                            embed, tokenizer.pad_token_id, padding_side="right")
        return loss_fn(model, embeds, mask, labels)

    start = time.time()
    mapper.train()
    losses = trainer.fit(step_loss)
    result = {"task": task, "seed": seed, "steps": steps, "step_share": share, "warmup_steps": warmup,
              "trainable_params": trainable,
              "final_train_loss": float(np.mean(losses[-50:])),
              "loss_curve": [float(np.mean(losses[i : i + 50])) for i in range(0, len(losses), 50)],
              "config": asdict(cfg), "init": None if init is None else str(init), **(extra or {})}
    log.info("%s mapper trained in %.1f s, final loss %.4f", task, time.time() - start, result["final_train_loss"])
    with atomic_dir(out) as tmp:
        mapper.save_pretrained(tmp)
    write_json(metrics, result)
    trainer.finish()  # the artifacts are complete: the checkpoints have served
    return result

"""Train one mapper per task against the frozen LLM, reading cached encoder features.

Loss on answer / caption tokens only; AdamW with linear warmup and cosine decay. The LLM
and the encoder stay frozen; only the mapper's parameters receive gradients.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

from mmskip.data.formats import read_captions, read_vqa, scenes_paths
from mmskip.features.cache import load_features
from mmskip.foundation.llm import target_loss
from mmskip.foundation.text import PromptsConfig
from mmskip.io import atomic_dir, write_json
from mmskip.mapper.model import Mapper, MapperConfig, prefix_batch

log = logging.getLogger(__name__)

TASKS = ("vqa", "caption")


@dataclass
class MapperTrainConfig:
    """Mapper architecture (paper defaults in comments) and its training schedule."""

    num_query_tokens: int = 12  # K (paper: 10); 12 = the description's 6 colour slots x 2 words
    num_layers: int = 2  # L (paper: 5)
    hidden_size: int = 128  # (paper: 256)
    num_heads: int = 8  # (paper: 8)
    output: str = "linear"  # "linear" (paper) or "vocab" (a mixture of the LLM's token embeddings)
    vqa_steps: int = 2500  # optimizer steps of the VQA mapper
    caption_steps: int = 700  # captions are longer targets: fewer, slower steps suffice (loss flat after ~500)
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        for name in ("vqa_steps", "caption_steps"):
            if self.warmup_steps >= getattr(self, name):
                raise ValueError(f"warmup_steps={self.warmup_steps} must be below {name}={getattr(self, name)}")

    def steps(self, task: str) -> int:
        return {"vqa": self.vqa_steps, "caption": self.caption_steps}[task]


def load_llm(name_or_path: str | Path):
    """The frozen causal LM and its tokenizer, only through ``from_pretrained``."""
    model = AutoModelForCausalLM.from_pretrained(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval().requires_grad_(False), tokenizer


def task_examples(task: str, scenes: Path, split: str, prompts: PromptsConfig) -> list[tuple[int, str, str]]:
    """(image_id, prompt, target) triples of a split; captions give one triple per reference."""
    paths = scenes_paths(scenes, split)
    if task == "vqa":
        return [(e.image_id, prompts.prompt("vqa", e.question), e.multiple_choice_answer)
                for e in read_vqa(paths["vqa_questions"], paths["vqa_annotations"])]
    if task == "caption":
        return [(e.image_id, prompts.caption_prompt, c) for e in read_captions(paths["captions"]) for c in e.captions]
    raise ValueError(f"task={task!r}: allowed {TASKS}")


def encode_examples(tokenizer, examples) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids and target ids (a leading space, then the end-of-sequence token)."""
    prompt_ids = tokenizer([p for _, p, _ in examples], add_special_tokens=False)["input_ids"]
    target_ids = tokenizer([f" {t}" for _, _, t in examples], add_special_tokens=False)["input_ids"]
    return prompt_ids, [t + [tokenizer.eos_token_id] for t in target_ids]


def train_mapper(task: str, scenes: Path, features: Path, llm: str | Path, out: Path, metrics: Path,
                 seed: int, cfg: MapperTrainConfig, prompts: PromptsConfig, masks: dict | None = None,
                 skip_plan=None, init: Path | None = None, steps: int | None = None, extra: dict | None = None) -> dict:
    """Train (or, from ``init``, fine-tune) a mapper against the frozen LLM.

    ``masks`` prunes the LLM first and ``skip_plan`` runs it through the skip engine, so the
    mapper learns against the compressed LLM it will be evaluated with; ``steps`` overrides
    the task's step count.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r}: allowed {TASKS}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, tokenizer = load_llm(llm)
    if masks is not None:
        from mmskip.compression.pruning import apply_masks

        apply_masks(model, masks)
    loss_fn = target_loss
    if skip_plan is not None:
        from mmskip.skipping.engine import SkipEngine

        engine = SkipEngine(model, skip_plan)

        def loss_fn(model, embeds, mask, labels):
            logits, _ = engine.forward(mask, embeds.shape[1], inputs_embeds=embeds)
            target = labels[:, 1:]
            keep = target != -100
            return torch.nn.functional.cross_entropy(logits[:, :-1][keep], target[keep])
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
                                     output=cfg.output, vocab_size=embed.num_embeddings))
    optimizer = torch.optim.AdamW(mapper.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = steps or cfg.steps(task)
    if cfg.warmup_steps >= steps:
        raise ValueError(f"warmup_steps={cfg.warmup_steps} must be below the {steps} training steps")
    schedule = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, steps)
    trainable = sum(p.numel() for p in mapper.parameters())
    log.info("%s mapper: %d trainable parameters, %d examples, %d steps", task, trainable, len(examples), steps)
    by_image: dict[int, list[int]] = {}
    for i, (image_id, _, _) in enumerate(examples):
        by_image.setdefault(row_of[image_id], []).append(i)
    image_rows = sorted(by_image)
    start, losses = time.time(), []
    mapper.train()
    for step in tqdm(range(steps), desc=f"train mapper {task}", mininterval=5):
        # Whole images: the mapper runs once per image and learns from all its questions at once.
        idx: list[int] = []
        for r in rng.permutation(len(image_rows)):
            idx += by_image[image_rows[int(r)]]
            if len(idx) >= cfg.batch_size:
                break
        idx = idx[: cfg.batch_size]
        images, which = torch.unique(rows[idx], return_inverse=True)
        soft = mapper(feats[images], embed.weight)[which]  # (B, K, D)
        embeds, mask, labels = prefix_batch(soft, [prompt_ids[i] for i in idx], [target_ids[i] for i in idx],
                                            embed, tokenizer.pad_token_id, padding_side="right")
        loss = loss_fn(model, embeds, mask, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mapper.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            log.info("step %d loss %.4f", step + 1, float(np.mean(losses[-100:])))
    result = {"task": task, "steps": steps, "trainable_params": trainable,
              "final_train_loss": float(np.mean(losses[-50:])),
              "loss_curve": [float(np.mean(losses[i : i + 50])) for i in range(0, len(losses), 50)],
              "config": asdict(cfg), "init": None if init is None else str(init), **(extra or {})}
    log.info("%s mapper trained in %.1f s, final loss %.4f", task, time.time() - start, result["final_train_loss"])
    with atomic_dir(out) as tmp:
        mapper.save_pretrained(tmp)
    write_json(metrics, result)
    return result

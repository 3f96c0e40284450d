"""Pretrain a tiny OPT-architecture causal LM on scene text only (no pixels).

The text is ``<description> <prompt> <target></s>``: a scene description followed by a
question and its answer, or by a caption. A model pretrained on bare question-answer text
learns to ignore any prefix; one that must read a description to answer learns to use its
context, which is what the mapper's soft prompt later feeds it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM, get_cosine_schedule_with_warmup

from mmskip.foundation.text import PromptsConfig, Segment, split_segments, text_scene_segments
from mmskip.io import atomic_dir, write_json

log = logging.getLogger(__name__)


@dataclass
class LLMConfig:
    """Architecture and pretraining schedule of the tiny OPT."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    ffn_dim: int = 512
    max_positions: int = 160
    steps: int = 1200
    batch_size: int = 48
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be below steps={self.steps}")


def encode_segments(tokenizer, segments: list[Segment]) -> list[tuple[list[int], int]]:
    """Token ids of ``<context> <prompt> <target></s>`` and the length of its context + prompt."""
    texts = [f"{s.context} {s.prompt} {s.target}" for s in segments]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prefixes = tokenizer([f"{s.context} {s.prompt}" for s in segments], add_special_tokens=False)["input_ids"]
    return [(row + [tokenizer.eos_token_id], len(prefix)) for row, prefix in zip(ids, prefixes)]


def _batch(rows: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels on the target tokens only.

    The description is random by construction and the question is given: the loss sits on
    what follows them, which is what teaches the model to read its context.
    """
    width = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, prefix) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, prefix : len(r)] = ids[i, prefix : len(r)]
    return ids, mask, labels


@torch.no_grad()
def perplexity(model, rows: list[tuple[list[int], int]], pad_id: int, batch_size: int = 128) -> float:
    """Perplexity of the target tokens (answers, captions) given description and prompt."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        ids, mask, labels = _batch(rows[start : start + batch_size], pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                ignore_index=-100, reduction="sum")
        total += nll.item()
        count += int((target != -100).sum())
    return math.exp(total / count)


@torch.no_grad()
def text_only_accuracy(model, tokenizer, segments: list[Segment], batch_size: int = 128) -> float:
    """Greedy exact-match accuracy of answers given the true description (the LLM's ceiling)."""
    model.eval()
    tokenizer.padding_side = "left"
    hits = 0
    for start in range(0, len(segments), batch_size):
        chunk = segments[start : start + batch_size]
        enc = tokenizer([f"{s.context} {s.prompt}" for s in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += sum(t.strip() == s.target for t, s in zip(texts, chunk))
    return hits / max(1, len(segments))


def pretrain_llm(scenes: Path, tokenizer_dir: Path, out: Path, metrics: Path, seed: int,
                 cfg: LLMConfig, prompts: PromptsConfig) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train = split_segments(scenes, "train", prompts) + list(text_scene_segments(scenes, prompts))
    val = split_segments(scenes, "val", prompts)
    train_rows = encode_segments(tokenizer, train)
    val_rows = encode_segments(tokenizer, val)
    longest = max(len(r) for r, _ in train_rows + val_rows)
    if longest > cfg.max_positions:
        raise ValueError(f"max_positions={cfg.max_positions} is shorter than the longest text ({longest} tokens)")
    config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        ffn_dim=cfg.ffn_dim, num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_positions,
        word_embed_proj_dim=cfg.hidden_size, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        do_layer_norm_before=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    model = OPTForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    schedule = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    log.info("LLM: %d parameters, %d training texts (%d tokens), %d steps",
             model.num_parameters(), len(train_rows), sum(len(r) for r, _ in train_rows), cfg.steps)
    start, losses = time.time(), []
    model.train()
    for step in tqdm(range(cfg.steps), desc="pretrain llm", mininterval=5):
        idx = rng.integers(len(train_rows), size=cfg.batch_size)
        ids, mask, labels = _batch([train_rows[i] for i in idx], tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            log.info("step %d loss %.4f", step + 1, float(np.mean(losses[-100:])))
    seconds = time.time() - start
    vqa_val = [s for s in val if s.task == "vqa"]
    result = {
        "params": model.num_parameters(),
        "config": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                     "ffn_dim", "vocab_size", "max_position_embeddings")},
        "steps": cfg.steps,
        "train_seconds": round(seconds, 1),
        "final_train_loss": float(np.mean(losses[-50:])),
        "heldout_perplexity": perplexity(model, val_rows, tokenizer.pad_token_id),
        "heldout_text_only_vqa_exact_match": text_only_accuracy(model, tokenizer, vqa_val),
    }
    log.info("LLM result: %s", result)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    write_json(metrics, result)
    return result

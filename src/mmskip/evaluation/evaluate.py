"""Evaluate a trained mapper + frozen LLM on the test split: VQA accuracy or caption metrics.

Variants: ``baseline`` (the image's cached tokens) and ``blind`` (the mapper's visual input
zeroed), which shows how much the model relies on the image.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mmskip.evaluation.caption_metric import caption_scores
from mmskip.evaluation.generate import generate
from mmskip.evaluation.vqa_metric import vqa_scores
from mmskip.data.formats import read_captions, read_vqa, scenes_paths
from mmskip.features.cache import load_features
from mmskip.foundation.text import PromptsConfig
from mmskip.io import atomic_dir, dumps_json
from mmskip.mapper.model import Mapper
from mmskip.mapper.train import TASKS, load_llm

log = logging.getLogger(__name__)

VARIANTS = ("baseline", "blind")


@dataclass
class EvaluationConfig:
    split: str = "test"
    batch_size: int = 32
    vqa_max_new_tokens: int = 4
    caption_max_new_tokens: int = 24
    num_beams: int = 1
    spice: bool = False  # SPICE downloads Stanford CoreNLP on first use: off by default

    def __post_init__(self) -> None:
        if self.split not in ("train", "val", "test"):
            raise ValueError(f"split={self.split!r}: allowed 'train', 'val', 'test'")
        for name in ("batch_size", "vqa_max_new_tokens", "caption_max_new_tokens", "num_beams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")


def evaluate(task: str, variant: str, scenes: Path, features: Path, llm: str | Path, mapper_dir: Path,
             out: Path, prompts: PromptsConfig, cfg: EvaluationConfig) -> dict:
    if task not in TASKS:
        raise ValueError(f"task={task!r}: allowed {TASKS}")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: allowed {VARIANTS}")
    model, tokenizer = load_llm(llm)
    mapper = Mapper.from_pretrained(mapper_dir)
    feats, row_of = load_features(features, cfg.split)
    if variant == "blind":
        feats = torch.zeros_like(feats)
    paths = scenes_paths(scenes, cfg.split)
    if task == "vqa":
        examples = read_vqa(paths["vqa_questions"], paths["vqa_annotations"])
        prompt_texts = [prompts.prompt("vqa", e.question) for e in examples]
        max_new = cfg.vqa_max_new_tokens
    else:
        examples = read_captions(paths["captions"])
        prompt_texts = [prompts.caption_prompt] * len(examples)
        max_new = cfg.caption_max_new_tokens
    prompt_ids = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]
    rows = torch.tensor([row_of[e.image_id] for e in examples])
    start = time.time()
    predictions: list[str] = []
    for s in tqdm(range(0, len(examples), cfg.batch_size), desc=f"evaluate {task}/{variant}", mininterval=5):
        predictions += generate(model, tokenizer, mapper, feats[rows[s : s + cfg.batch_size]],
                                prompt_ids[s : s + cfg.batch_size], max_new, cfg.num_beams)
    seconds = time.time() - start
    if task == "vqa":
        items = [{"question_id": e.question_id, "image_id": e.image_id, "question": e.question,
                  "question_type": e.question_type, "prediction": p, "answers": list(e.answers)}
                 for e, p in zip(examples, predictions)]
        scored = vqa_scores(items)
        scores, extra = {"accuracy": scored["accuracy"]}, {"per_question_type": scored["per_question_type"]}
    else:
        items = [{"image_id": e.image_id, "prediction": p, "references": list(e.captions)}
                 for e, p in zip(examples, predictions)]
        scores = caption_scores({e.image_id: p for e, p in zip(examples, predictions)},
                                {e.image_id: list(e.captions) for e in examples}, spice=cfg.spice)
        extra = {}
    metrics = {"task": task, "modality": "image", "variant": variant, "split": cfg.split,
               "num_examples": len(examples), "scores": scores, **extra,
               "generation": {"num_beams": cfg.num_beams, "max_new_tokens": max_new, "batch_size": cfg.batch_size},
               }
    log.info("%s/%s: %s (%.1f s generating)", task, variant, scores, seconds)
    with atomic_dir(out) as tmp:
        (tmp / "predictions.json").write_text(dumps_json({"task": task, "variant": variant, "items": items}))
        (tmp / "metrics.json").write_text(dumps_json(metrics))
    return metrics

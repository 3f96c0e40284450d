"""Evaluate a trained mapper + frozen LLM on the test split: VQA accuracy or caption metrics.

Variants: ``baseline`` (the image's cached tokens) and ``blind`` (the mapper's visual input
zeroed), which shows how much the model relies on the image.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tqdm import tqdm

from mmskip.evaluation import VARIANTS
from mmskip.evaluation.generate import generate
from mmskip.evaluation.runner import Run, load_example_set, score_runs, write_outputs
from mmskip.models import MapperModel, load_llm
from mmskip.params import EvaluationConfig
from mmskip.foundation.text import PromptsConfig
from mmskip.tasks import get_task

log = logging.getLogger(__name__)



def evaluate(task: str, variant: str, scenes: Path, features: Path, llm: str | Path, mapper_dir: Path,
             out: Path, prompts: PromptsConfig, cfg: EvaluationConfig) -> dict:
    """The whole split through plain Hugging Face ``generate`` (the reference the engine matches)."""
    spec = get_task(task)
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: allowed {VARIANTS}")
    model, tokenizer = load_llm(llm)
    mm = MapperModel.load(model, tokenizer, mapper_dir, features, cfg.split, blind=variant == "blind")
    max_new = spec.max_new_tokens(cfg)
    ex = load_example_set(spec, scenes, cfg.split, tokenizer, prompts, max_new)
    start = time.time()
    predictions: list[str] = []
    for embeds, mask in tqdm(mm.prompt_batches(ex, cfg.batch_size), desc=f"evaluate {task}/{variant}", mininterval=5):
        predictions += generate(model, tokenizer, embeds, mask, max_new, cfg.num_beams)
    seconds = time.time() - start
    (scored,) = score_runs(ex, [Run(variant, predictions)], spice=cfg.spice, breakdown=True).values()
    metrics = {"task": task, "modality": spec.modality, "variant": variant, "split": cfg.split,
               "num_examples": len(ex.examples), **scored,
               "generation": {"num_beams": cfg.num_beams, "max_new_tokens": max_new, "batch_size": cfg.batch_size},
               }
    log.info("%s/%s: %s (%.1f s generating)", task, variant, scored["scores"], seconds)
    write_outputs(out, {"predictions.json": {"task": task, "variant": variant,
                                             "items": spec.items(ex.examples, predictions)},
                        "metrics.json": metrics})
    return metrics

"""Evaluate a trained mapper + frozen LLM on the test split: VQA accuracy or caption metrics.

Inputs (``mmskip evaluate --input``): ``multimodal`` (the cached perceptual tokens) and ``blind``
(the mapper's perceptual input zeroed), which shows how much the model relies on what it perceives.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mmskip.evaluation import BLIND, INPUTS
from mmskip.evaluation.generate import generate
from mmskip.evaluation.runner import Run, load_example_set, score_runs, write_outputs
from mmskip.models import MapperModel, load_llm
from mmskip.params import EvaluationConfig
from mmskip.foundation.text import PromptsConfig
from mmskip.tasks import get_task

log = logging.getLogger(__name__)



def evaluate(task: str, input: str, scenes: Path, features: Path, llm: str | Path, mapper_dir: Path,
             out: Path, prompts: PromptsConfig, cfg: EvaluationConfig,
             device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> dict:
    """The whole split through plain Hugging Face ``generate`` (the reference the engine matches)."""
    spec = get_task(task)
    if input not in INPUTS:
        raise ValueError(f"input={input!r}: allowed {list(INPUTS)}")
    model, tokenizer = load_llm(llm, device, dtype)
    mm = MapperModel.load(model, tokenizer, mapper_dir, features, cfg.split, blind=input == BLIND)
    max_new = spec.max_new_tokens(cfg)
    ex = load_example_set(spec, scenes, cfg.split, tokenizer, prompts, max_new)
    start = time.time()
    predictions: list[str] = []
    for embeds, mask in tqdm(mm.prompt_batches(ex, cfg.batch_size), desc=f"evaluate {task}/{input}", mininterval=5):
        predictions += generate(model, tokenizer, embeds, mask, max_new, cfg.num_beams)
    seconds = time.time() - start
    (scored,) = score_runs(ex, [Run(input, predictions)], spice=cfg.spice, breakdown=True).values()
    metrics = {"task": task, "modality": spec.modality, "input": input, "split": cfg.split,
               "num_examples": len(ex.examples), **scored,
               "generation": {"num_beams": cfg.num_beams, "max_new_tokens": max_new, "batch_size": cfg.batch_size},
               }
    log.info("%s/%s: %s (%.1f s generating)", task, input, scored["scores"], seconds)
    write_outputs(out, {"predictions.json": {"task": task, "input": input,
                                             "items": spec.items(ex.examples, predictions)},
                        "metrics.json": metrics})
    return metrics

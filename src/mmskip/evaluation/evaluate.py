"""Evaluate a trained mapper + frozen LLM on the test split: VQA accuracy or caption metrics.

Inputs (``mmskip evaluate --inputs``, each into ``OUT/{input}``): ``multimodal`` (the cached perceptual tokens) and
``blind`` (the mapper's perceptual input zeroed), which shows how much the model relies on what it perceives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
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



def evaluate(task: str, inputs: Sequence[str], scenes: Path, features: Path, llm: str | Path, mapper_dir: Path,
             out: Path, prompts: PromptsConfig, cfg: EvaluationConfig,
             device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> dict[str, dict]:
    """The whole split through plain Hugging Face ``generate`` (the reference the engine matches), once per input,
    into ``out/{input}``: one job loads the LLM, the mapper and the examples once, and scores every input in one
    metric call (one METEOR JVM for a caption task). input -> its metrics."""
    spec = get_task(task)
    bad = isinstance(inputs, str) or [i for i in inputs if i not in INPUTS]
    if bad or not inputs or len(set(inputs)) != len(inputs):
        shown = inputs if isinstance(inputs, str) else list(inputs)
        raise ValueError(f"inputs={shown!r}: allowed a list of one or more of {list(INPUTS)}, each once")
    model, tokenizer = load_llm(llm, device, dtype)
    seen = MapperModel.load(model, tokenizer, mapper_dir, features, cfg.split)
    max_new = spec.max_new_tokens(cfg)
    ex = load_example_set(spec, scenes, cfg.split, tokenizer, prompts, max_new)
    runs = []
    for input in inputs:
        mm = seen.blind() if input == BLIND else seen
        start = time.time()
        predictions: list[str] = []
        for embeds, mask in tqdm(mm.prompt_batches(ex, cfg.batch_size), desc=f"evaluate {task}/{input}",
                                 mininterval=5):
            predictions += generate(model, tokenizer, embeds, mask, max_new, cfg.num_beams)
        log.info("%s/%s: %.1f s generating", task, input, time.time() - start)
        runs.append(Run(input, predictions))
    results = {}
    for run, scored in zip(runs, score_runs(ex, runs, spice=cfg.spice, breakdown=True).values(), strict=True):
        metrics = {"task": task, "modality": spec.modality, "input": run.key, "split": cfg.split,
                   "num_examples": len(ex.examples), **scored,
                   "generation": {"num_beams": cfg.num_beams, "max_new_tokens": max_new,
                                  "batch_size": cfg.batch_size},
                   }
        log.info("%s/%s: %s", task, run.key, scored["scores"])
        write_outputs(Path(out) / run.key, {"predictions.json": {"task": task, "input": run.key,
                                                                 "items": spec.items(ex.examples, run.predictions)},
                                            "metrics.json": metrics})
        results[run.key] = metrics
    return results

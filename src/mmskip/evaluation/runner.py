"""The evaluation runner every experiment family shares.

examples -> prompts -> for each point (a transform of the model: a skip plan, a mask, another
LLM or mapper, the blind input) decode and score -> records. A family (baseline evaluation,
skip grid, pruning, training with compression, the benchmark) declares only its points and
the fields its records add; loading, prompting, decoding, scoring and writing happen here once.
The model is anything with ``llm``, ``tokenizer`` and ``prompt_batches`` (``mmskip.models``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from mmskip.evaluation.generate import answers
from mmskip.evaluation.scoring import score
from mmskip.io import atomic_dir, dumps_json
from mmskip.skipping.engine import SkipEngine
from mmskip.skipping.plan import SkipPlan
from mmskip.tasks import Task

log = logging.getLogger(__name__)


@dataclass
class ExampleSet:
    """A task's examples with their tokenised prompts, as every variant decodes them."""

    task: Task
    examples: list
    prompt_ids: list[list[int]]
    image_ids: list[int]
    max_new_tokens: int

    @property
    def ids(self) -> list[int]:
        """The ids predictions.json lists (question ids or image ids)."""
        return [self.task.example_id(e) for e in self.examples]


def load_example_set(task: Task, scenes: Path, split: str, tokenizer, prompts, max_new_tokens: int,
                     limit: int = 0) -> ExampleSet:
    """The first ``limit`` examples of ``split`` (0: all), in file order."""
    examples = task.examples(scenes, split)
    return example_set(task, examples[:limit] if limit else examples, tokenizer, prompts, max_new_tokens)


def example_set(task: Task, examples: list, tokenizer, prompts, max_new_tokens: int) -> ExampleSet:
    """``examples`` of ``task`` with their prompts tokenised."""
    prompt_ids = tokenizer([task.prompt(prompts, e) for e in examples], add_special_tokens=False)["input_ids"]
    return ExampleSet(task, examples, prompt_ids, [e.image_id for e in examples], max_new_tokens)


def decode_batch(engine: SkipEngine, tokenizer, batch, max_new_tokens: int) -> list[str]:
    """Greedy answers of one (inputs_embeds, attention_mask) batch; ``engine.stats`` accumulate."""
    embeds, mask = batch
    tokens = engine.generate(mask, inputs_embeds=embeds, max_new_tokens=max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return answers(tokenizer, tokens)


def decode(engine: SkipEngine, tokenizer, batches, max_new_tokens: int, desc: str = "decode") -> list[str]:
    """Greedy answers of every batch through ``engine``; its ``stats`` accumulate the run."""
    out = []
    for batch in tqdm(batches, desc=desc, mininterval=5):
        out += decode_batch(engine, tokenizer, batch, max_new_tokens)
    return out


@dataclass
class Run:
    """One decoded point: its predictions and what the engine executed."""

    key: str
    predictions: list[str]
    stats: Any = None  # RunStats of the engine (None for model.generate)


def decode_point(model, ex: ExampleSet, batch_size: int, key: str, plan: SkipPlan | None = None,
                 batches=None) -> Run:
    """Decode ``ex`` through the skip engine with ``plan`` (None: unskipped)."""
    batches = batches if batches is not None else model.prompt_batches(ex, batch_size)
    engine = SkipEngine(model.llm, plan)
    predictions = decode(engine, model.tokenizer, batches, ex.max_new_tokens, desc=f"{ex.task.name} {key}")
    return Run(key, predictions, engine.stats)


def score_runs(ex: ExampleSet, runs: list[Run], spice: bool = False, breakdown: bool = False) -> dict[str, dict]:
    """key -> the task's scores of that run (one metric call for all runs)."""
    results = score(ex.task, ex.examples, [r.predictions for r in runs], spice=spice, breakdown=breakdown)
    return {r.key: result for r, result in zip(runs, results, strict=True)}


@contextlib.contextmanager
def restored(model, names=None) -> Iterator[Any]:
    """On exit, ``model``'s parameters ``names`` (default: all) are back to their values on entry.

    Only those parameters are kept aside (on the CPU), never a second copy of the whole model,
    and nothing is read from disk again: at 7B parameters a reload per mask is what costs.
    """
    params = dict(model.named_parameters())
    names = list(params) if names is None else [n for n in names if n in params]  # others: the caller's error
    saved = {name: params[name].detach().to("cpu", copy=True) for name in names}
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


@contextlib.contextmanager
def masked(model, masks: dict[str, torch.Tensor] | None) -> Iterator[Any]:
    """``model`` with ``masks`` applied in place, its weights restored on exit."""
    if not masks:
        yield model
        return
    from mmskip.compression.pruning import apply_masks

    with restored(model, list(masks)):
        apply_masks(model, masks)
        yield model


def write_outputs(out: Path, files: dict[str, Any]) -> None:
    """Each ``name -> JSON object`` into ``out``, the folder appearing complete or not at all."""
    with atomic_dir(out) as tmp:
        for name, obj in files.items():
            (tmp / name).write_text(dumps_json(obj))

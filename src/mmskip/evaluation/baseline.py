"""The baseline, decoded once per task: the dense LLM with the trained mapper, nothing skipped or pruned.

``mmskip baseline`` decodes the whole evaluation split through the skip engine with an empty plan,
greedily, in batches of ``evaluation.batch_size``, and keeps, after every batch, what the engine
had executed so far (``batches.json``). Every experiment family that compares against the
baseline (the skip grid, the compressed LLMs, training with compression) evaluates the first N
examples in the same batches, so :func:`load_baseline` gives it the baseline without decoding it
again: the predictions and executed compute of the first ⌊N/B⌋ batches, plus, when B does not
divide N, the family's last, shorter batch decoded there (the same rows padded into a full batch of
the split would be another computation). The result is what decoding the baseline in the family
gives, byte for byte (a test checks it), at the cost of one batch at most.

Plain Hugging Face ``generate`` stays the independent check: ``mmskip evaluate`` decodes the same
split with it, and the report counts the examples on which the two agree.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mmskip.evaluation import BASELINE
from mmskip.evaluation.runner import ExampleSet, Run, decode_batch, load_example_set, score_runs, write_outputs
from mmskip.io import read_json
from mmskip.models import MapperModel, load_llm
from mmskip.skipping.accounting import RunStats
from mmskip.skipping.engine import SkipEngine
from mmskip.tasks import get_task

log = logging.getLogger(__name__)

FILES = ("metrics.json", "predictions.json", "batches.json", "timing.json")


def decode_baseline(task: str, scenes: Path, features: Path, llm: str | Path, mapper_dir: Path, out: Path,
                    prompts, evaluation, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> dict:
    """The whole ``evaluation.split`` of ``task`` through the unskipped engine -> ``out``."""
    spec = get_task(task)
    model, tokenizer = load_llm(llm, device, dtype)
    mm = MapperModel.load(model, tokenizer, mapper_dir, features, evaluation.split)
    ex = load_example_set(spec, scenes, evaluation.split, tokenizer, prompts, spec.max_new_tokens(evaluation))
    start = time.time()
    metrics = write_baseline(mm, ex, evaluation.batch_size, evaluation.split, out)
    log.info("%s baseline: %s (%d examples, %.1f s)", task, metrics["scores"], len(ex.examples), time.time() - start)
    return metrics


def write_baseline(model, ex: ExampleSet, batch_size: int, split: str, out: Path) -> dict:
    """Decode ``ex`` through ``model`` (``llm``, ``tokenizer``, ``prompt_batches``) unskipped, in batches
    of ``batch_size``, and write the baseline folder ``out``; returns its metrics.json."""
    engine = SkipEngine(model.llm)
    predictions: list[str] = []
    cumulative, seconds = [], []
    for batch in tqdm(model.prompt_batches(ex, batch_size), desc=f"baseline {ex.task.name}", mininterval=5):
        predictions += decode_batch(engine, model.tokenizer, batch, ex.max_new_tokens)
        cumulative.append(engine.stats.counts())
        seconds.append(dict(engine.stats.seconds))
    (scored,) = score_runs(ex, [Run(BASELINE, predictions, engine.stats)]).values()
    common = {"task": ex.task.name, "split": split, "num_examples": len(ex.examples), "batch_size": batch_size,
              "max_new_tokens": ex.max_new_tokens}
    metrics = {**common, "modality": ex.task.modality, "key": BASELINE,
               "decoder": "skip engine, empty plan, greedy", "scores": scored["scores"],
               "compute": engine.stats.as_dict()}
    write_outputs(out, {
        "metrics.json": metrics,
        "predictions.json": {"task": ex.task.name, "ids": ex.ids, "predictions": predictions},
        # what the engine had executed after each batch: a family's first batches without decoding them
        "batches.json": {**common, "cumulative": cumulative},
        # wall time differs run to run: kept apart so the files above stay byte-identical
        "timing.json": {**common, "threads": torch.get_num_threads(), "cumulative_seconds": seconds,
                        **engine.stats.timing()}})
    return metrics


def load_baseline(baseline_dir: Path, model, ex: ExampleSet, batch_size: int, batches=None) -> Run:
    """The baseline's run on ``ex`` (the first N examples of the split, decoded in batches of
    ``batch_size``) from ``baseline_dir``; decodes only the last batch, when it is shorter than the
    baseline's batch there (``batches``: ``ex``'s prompt batches when the caller has them, as for
    ``decode_point``). Refuses a baseline of other examples, batch size or token limit."""
    baseline_dir = Path(baseline_dir)
    missing = [name for name in FILES[:3] if not (baseline_dir / name).is_file()]
    if missing:
        raise ValueError(f"{baseline_dir}: no baseline decode ({', '.join(missing)} missing); run `mmskip baseline`")
    recorded = read_json(baseline_dir / "batches.json")
    n, size = len(ex.examples), recorded["batch_size"]
    expected = {"task": ex.task.name, "batch_size": batch_size, "max_new_tokens": ex.max_new_tokens}
    found = {key: recorded[key] for key in expected}
    if found != expected:
        raise ValueError(f"{baseline_dir}: the baseline was decoded with {found}; this evaluation needs {expected}")
    ids = read_json(baseline_dir / "predictions.json")
    if n > recorded["num_examples"] or ids["ids"][:n] != ex.ids:
        raise ValueError(f"{baseline_dir}: the baseline's examples ({recorded['num_examples']} of split "
                         f"{recorded['split']!r}) do not start with these {n} examples")
    # batches shared with the split's decode: all of them when N is the whole split
    shared = math.ceil(n / size) if n == recorded["num_examples"] else n // size
    timing = baseline_dir / "timing.json"
    seconds = read_json(timing)["cumulative_seconds"] if timing.is_file() else None
    stats = RunStats.from_counts(recorded["cumulative"][shared - 1], seconds and seconds[shared - 1]) if shared \
        else RunStats()
    predictions = ids["predictions"][: min(n, shared * size)]
    rest = slice(shared * size, n)
    if rest.start < n:
        if batches is not None:
            batch = batches[shared]
        else:
            tail = ExampleSet(ex.task, ex.examples[rest], ex.prompt_ids[rest], ex.image_ids[rest], ex.max_new_tokens)
            (batch,) = model.prompt_batches(tail, batch_size)
        engine = SkipEngine(model.llm)
        engine.stats = stats
        predictions += decode_batch(engine, model.tokenizer, batch, ex.max_new_tokens)
    return Run(BASELINE, predictions, stats)

"""LLaVA-1.5 without training: the skip grid on a dataset folder's images, through the shared runner.

Nothing is trained: the checkpoint's own vision tower and projector build each prompt
(:class:`mmskip.models.LlavaModel`), and every point of the ``skipping`` section's grid (each of
its modes) decodes the same prompt batches through the skip engine, against the unskipped
decode of the same examples. The model is loaded once for the whole grid.

Written under ``out`` (the folder appears whole or not at all):

- ``{mode}/metrics.json``, ``predictions.json``, ``timing.json`` per mode, in the layout of the
  skip grid of the embedded default (``results/skip/{task}/{mode}``, the same function writes
  both); ``points[0]`` is the unskipped decode;
- ``run.json``: the model (path, hub id, revision and the commit the revision resolved to),
  device, dtype, layers, and the check against Hugging Face: the first ``check_generate``
  examples decoded by ``LlavaForConditionalGeneration.generate`` compared with the unskipped
  engine's answers (recorded, not enforced: fp16/bf16 kernels on a GPU may break ties differently).

The images are the dataset folder's (``mmskip.data.coco``: ``images/`` as the COCO zips extract,
listed by the split's caption file). Before the model is loaded, every image the examples need
must exist; the error lists what is missing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from mmskip.evaluation import BASELINE
from mmskip.evaluation.evaluate_skip import modes_outputs
from mmskip.evaluation.generate import answers
from mmskip.evaluation.runner import decode_point, example_set
from mmskip.data.formats import split_images
from mmskip.io import atomic_dir, dumps_json
from mmskip.skipping.grid import grid_limit, grid_points
from mmskip.tasks import get_task

log = logging.getLogger(__name__)

SHOW_MISSING = 20  # missing images named in the error (then a count)


class FolderImages(Mapping):
    """image id -> RGB PIL image, opened from its file when asked (never all held at once)."""

    def __init__(self, files: dict[int, Path]):
        self.files = files

    def __getitem__(self, image_id: int):
        from PIL import Image

        with Image.open(self.files[image_id]) as image:
            return image.convert("RGB")

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def folder_images(data: Path, split: str, image_ids: list[int]) -> FolderImages:
    """The files of ``image_ids`` in the dataset folder ``data``; every one must exist."""
    files = dict(split_images(Path(data), split))
    unlisted = sorted({i for i in image_ids if i not in files})
    if unlisted:
        raise ValueError(f"{data}: {len(unlisted)} image ids of the {split!r} examples are not listed in the "
                         f"split's images: {unlisted[:SHOW_MISSING]}")
    needed = sorted(set(image_ids))
    missing = [str(files[i]) for i in needed if not files[i].is_file()]
    if missing:
        more = f" and {len(missing) - SHOW_MISSING} more" if len(missing) > SHOW_MISSING else ""
        raise FileNotFoundError(
            f"{data}: {len(missing)} of the {len(needed)} images of split {split!r} the examples need are missing "
            f"(extract the COCO image zips under {Path(data) / 'images'}, README 'Paper scale'): "
            + ", ".join(missing[:SHOW_MISSING]) + more)
    return FolderImages({i: files[i] for i in needed})


def model_folder(model: str, revision: str | None, cache: Path | None) -> tuple[Path, dict]:
    """A checkpoint folder and what run.json records of it: a local folder, a reference folder
    (``hub.json``, written by the fetch_model stage: its id at its commit, offline), or a hub id at a
    revision found offline in ``cache`` (:func:`mmskip.foundation.hub.resolve`)."""
    from mmskip.foundation.hub import REFERENCE, checkpoint, resolve

    if cache is None and (Path(model) / REFERENCE).is_file():
        from mmskip.io import read_json

        ref = read_json(Path(model) / REFERENCE)
        return Path(checkpoint(model)), {"id": ref["id"], "revision": ref["revision"], "commit": ref["commit"]}
    if cache is None:
        path = Path(model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model={model!r}: no config.json there; give a checkpoint folder, the "
                                    f"fetch_model stage's reference folder (hub.json), or a hub id with --cache "
                                    f"(and --revision)")
        return path, {"path": str(path)}
    revision = revision or "main"
    path = resolve(model, revision, cache)
    return path, {"id": model, "revision": revision, "commit": path.name}


def check_generate(mm, ex, batch_size: int, engine_answers: list[str], n: int) -> dict:
    """The first ``n`` examples through ``LlavaForConditionalGeneration.generate`` (greedy, the same
    token limit), against ``engine_answers``."""
    n = min(n, len(ex.examples))
    same = 0
    tokenizer = mm.tokenizer
    for s in range(0, n, batch_size):
        e = min(s + batch_size, n)
        enc = mm.inputs(ex.prompt_ids[s:e], ex.image_ids[s:e])
        with torch.no_grad():
            tokens = mm.llm.generate(**enc, do_sample=False, num_beams=1, max_new_tokens=ex.max_new_tokens,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        got = answers(tokenizer, tokens[:, enc["input_ids"].shape[1]:])
        same += sum(a == b for a, b in zip(got, engine_answers[s:e], strict=True))
    return {"examples": n, "equal": same}


def evaluate_llava(task: str, data: Path, model: str, out: Path, prompts, cfg, evaluation, revision: str | None = None,
                   cache: Path | None = None, device: str = "cpu", dtype: str | None = None,
                   check: int = 8) -> dict:
    """The skip grid of ``cfg`` (every mode) with LLaVA-1.5 on ``task``'s first examples of the
    folder ``data``; returns run.json's record."""
    from transformers import AutoConfig

    from mmskip.models import LlavaModel, resolve_device, resolve_dtype

    spec = get_task(task)
    if check < 0:
        raise ValueError(f"check_generate={check}: allowed 0 (no check) or a number of examples")
    resolve_device(device)  # a bad value is named before anything loads
    resolve_dtype(dtype)
    path, record = model_folder(model, revision, cache)
    num_layers = AutoConfig.from_pretrained(path).text_config.num_hidden_layers
    points = {mode: grid_points(cfg, mode, num_layers) for mode in cfg.modes}  # a bad grid: before any work
    limit = grid_limit(cfg, spec)
    examples = spec.examples(Path(data), evaluation.split)[: limit or None]  # read once, checked before loading
    images = folder_images(data, evaluation.split, [e.image_id for e in examples])

    start = time.time()
    mm = LlavaModel.from_pretrained(path, images, device=device, dtype=dtype)
    ex = example_set(spec, examples, mm.tokenizer, prompts, spec.max_new_tokens(evaluation))
    batches = mm.prompt_batches(ex, evaluation.batch_size)
    baseline = decode_point(mm, ex, evaluation.batch_size, BASELINE, None, batches)
    files = modes_outputs(points, mm, ex, evaluation.split, baseline, evaluation.batch_size, batches, num_layers)
    run = {"task": task, "model": record, "device": str(mm.device), "dtype": str(mm.llm.dtype).removeprefix("torch."),
           "num_layers": num_layers, "split": evaluation.split, "num_examples": len(ex.examples),
           "batch_size": evaluation.batch_size, "max_new_tokens": ex.max_new_tokens, "modes": list(points),
           "check_generate": check_generate(mm, ex, evaluation.batch_size, baseline.predictions, check)}
    with atomic_dir(out) as tmp:
        for mode, mode_files in files.items():
            (tmp / mode).mkdir()
            for name, obj in mode_files.items():
                (tmp / mode / name).write_text(dumps_json(obj))
        (tmp / "run.json").write_text(dumps_json(run))
    check_result = run["check_generate"]
    log.info("%s: LLaVA %s, %d modes, %d examples, %.1f s; generate check %d/%d equal", task, record,
             len(points), len(ex.examples), time.time() - start, check_result["equal"], check_result["examples"])
    return run

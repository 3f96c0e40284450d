"""The one place predictions become scores: every runner and family scores through here.

``score`` applies a task's format's metric to several prediction lists at once: the official
VQAv2 accuracy (``vqa_metric``) or the COCO caption metrics through pycocoevalcap
(``caption_metric``, METEOR's JVM and the tokenizer started once for all lists). Nothing here
knows a task's name: the task entry (``mmskip.tasks``) names its format.
"""

from __future__ import annotations

from typing import Any, Sequence

from mmskip.evaluation.caption_metric import caption_scores_many
from mmskip.evaluation.vqa_metric import vqa_scores
from mmskip.tasks import VQA, Task


def score(task: Task, examples: Sequence, runs: Sequence[Sequence[str]], spice: bool = False,
          breakdown: bool = False) -> list[dict[str, Any]]:
    """Scores of several prediction lists on the same examples of ``task``.

    Each result holds ``scores`` and, with ``breakdown``, the format's breakdown (VQA:
    ``per_question_type``). ``spice`` adds SPICE to caption metrics.
    """
    if task.format is VQA:
        return score_vqa([task.items(examples, r) for r in runs], breakdown=breakdown)
    return score_captions(examples, runs, spice=spice)


def score_vqa(item_lists: Sequence[Sequence[dict]], breakdown: bool = False) -> list[dict[str, Any]]:
    """VQA accuracy of each list of items (``prediction``, ``answers``, ``question_type``)."""
    out = []
    for items in item_lists:
        scored = vqa_scores(items)
        result: dict[str, Any] = {"scores": {"accuracy": scored["accuracy"]}}
        if breakdown:
            result["per_question_type"] = scored["per_question_type"]
        out.append(result)
    return out


def score_captions(examples: Sequence, runs: Sequence[Sequence[str]], spice: bool = False) -> list[dict[str, Any]]:
    """Caption metrics of each prediction list against the examples' reference captions."""
    references = {e.image_id: list(e.captions) for e in examples}
    predictions = [{e.image_id: p for e, p in zip(examples, run, strict=True)} for run in runs]
    return [{"scores": s} for s in caption_scores_many(predictions, references, spice=spice)]

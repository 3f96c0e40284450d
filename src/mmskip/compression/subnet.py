"""The α-SubNet: one mask shared across tasks (and modalities), combined from per-task masks.

Each weight gets a vote from every task mask that keeps it. A rule names the candidates:
``intersection`` (kept by every task), ``union`` (by any), ``majority`` (by more than half).
At a target sparsity s, each output row then keeps exactly ``in - floor(s * in)`` weights:
candidates first, ordered by their mean normalised score across tasks, then (when the
candidates are too few, as an intersection usually is) the best of the rest by the same
score. A task's score is its Wanda score |W| * ||X||, divided by the layer's mean score so
tasks calibrated on inputs of different scale weigh the same. Without a target the
candidates are the mask as they are.
"""

from __future__ import annotations

import math

import torch

from mmskip.compression.names import RULES


def candidates(votes: torch.Tensor, num_tasks: int, rule: str) -> torch.Tensor:
    if rule == "intersection":
        return votes == num_tasks
    if rule == "union":
        return votes >= 1
    if rule == "majority":
        return 2 * votes > num_tasks
    raise ValueError(f"rule={rule!r}: allowed {list(RULES)}")


def combine(task_masks: list[dict[str, torch.Tensor]], rule: str, sparsity: float | None = None,
            task_scores: list[dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """One keep-mask per parameter from several tasks' keep-masks (see the module docstring)."""
    if len(task_masks) < 2:
        raise ValueError(f"an α-SubNet combines at least 2 task masks; got {len(task_masks)}")
    names = list(task_masks[0])
    for m in task_masks[1:]:
        if list(m) != names:
            raise ValueError("task masks cover different parameters")
    if sparsity is not None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity={sparsity}: must be in [0, 1)")
        if task_scores is None or len(task_scores) != len(task_masks):
            raise ValueError("a target sparsity needs one score dict per task mask")
    combined = {}
    for name in names:
        votes = sum(m[name].to(torch.int16) for m in task_masks)
        keep = candidates(votes, len(task_masks), rule)
        if sparsity is not None:
            score = sum(s[name].float() / s[name].float().mean().clamp_min(1e-12) for s in task_scores) / len(task_scores)
            # candidates rank above every non-candidate; within each group, by score
            key = score / (score.max() + 1.0) + keep.float()
            n_prune = math.floor(sparsity * key.shape[1])
            order = torch.sort(key, dim=1, stable=True).indices[:, :n_prune]
            keep = torch.ones_like(keep).scatter_(1, order, False)
        combined[name] = keep
    return combined


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two keep-masks (1.0 when both keep nothing)."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def iou_per_block(mask_a: dict[str, torch.Tensor], mask_b: dict[str, torch.Tensor],
                  blocks: list[list[str]]) -> list[float]:
    """IoU of the kept weights of each block (all its linear layers together)."""
    out = []
    for names in blocks:
        a = torch.cat([mask_a[n].reshape(-1) for n in names])
        b = torch.cat([mask_b[n].reshape(-1) for n in names])
        out.append(iou(a, b))
    return out

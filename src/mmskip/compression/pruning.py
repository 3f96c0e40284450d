"""Unstructured and N:M pruning of a frozen decoder's linear layers: magnitude, Wanda, random.

Scores (higher = kept):
- ``magnitude``: |W_ij|, compared across the whole layer (the usual magnitude baseline);
- ``wanda``: |W_ij| * ||X_j||_2 (Sun et al. 2023), X_j the j-th input feature over every
  calibration token that is not padding; compared within each output row;
- ``random``: seeded uniform scores, within each output row (a control).

Patterns: ``unstructured`` at a sparsity s prunes exactly floor(s * n) weights of every
comparison group (a row, or the layer for magnitude); ``N:M`` keeps the N highest scores of
every M consecutive inputs of a row. Ties go to the lower index (a stable sort), so masks are
deterministic.

Wanda proceeds block by block, as in the original work: the calibration inputs of block i+1
are the outputs of block i *after* block i is pruned, and hooks are removed after each block,
so peak memory is the model plus one set of hidden states of the calibration batches.
Masks are {parameter name: bool keep-mask}, saved with safetensors.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmskip.skipping.adapters import adapter_for

from mmskip.compression.names import METHODS  # noqa: E402  (re-exported)
_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class PruneSpec:
    """One mask to compute: ``pattern`` is ``unstructured`` (with ``sparsity``) or ``N:M``."""

    method: str
    sparsity: float = 0.5
    pattern: str = "unstructured"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: allowed {list(METHODS)}")
        if self.pattern == "unstructured":
            if not 0.0 <= self.sparsity < 1.0:
                raise ValueError(f"sparsity={self.sparsity}: must be in [0, 1)")
        else:
            n, m = parse_nm(self.pattern)
            object.__setattr__(self, "sparsity", (m - n) / m)

    @property
    def key(self) -> str:
        """File-system name: ``0.5`` or ``2-4``."""
        return f"{self.sparsity:g}" if self.pattern == "unstructured" else self.pattern.replace(":", "-")


def parse_nm(pattern: str) -> tuple[int, int]:
    match = _NM.match(pattern)
    if not match or not 0 < int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"pattern={pattern!r}: allowed 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4')")
    return int(match.group(1)), int(match.group(2))


def prunable_linears(model: nn.Module) -> list[dict[str, nn.Linear]]:
    """Per decoder block, {qualified parameter name of the weight: linear layer}, in block order.

    Every ``nn.Linear`` inside the blocks (attention projections and FFN); embeddings, the
    final norm and the LM head are never pruned.
    """
    name_of = {id(m): n for n, m in model.named_modules()}
    blocks = []
    for layer in adapter_for(model).layers():
        prefix = name_of[id(layer)]
        blocks.append({f"{prefix}.{n}.weight": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)})
    return blocks


def scores_for(method: str, weight: torch.Tensor, input_norm: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Importance of every weight (out, in) under ``method``; ``input_norm`` (in,) for Wanda."""
    w = weight.detach().abs().float()
    if method == "magnitude":
        return w
    if method == "wanda":
        if input_norm is None or input_norm.shape != (w.shape[1],):
            raise ValueError(f"wanda needs input norms of shape ({w.shape[1]},)")
        return w * input_norm.float()[None, :]
    if method == "random":
        return torch.rand(w.shape, generator=generator)
    raise ValueError(f"method={method!r}: allowed {list(METHODS)}")


def _keep_lowest_pruned(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep-mask of the last dim: False at the ``n_prune`` lowest scores (stable: lower index first)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune:
        order = torch.sort(scores, dim=-1, stable=True).indices[..., :n_prune]
        keep.scatter_(-1, order, False)
    return keep


def mask_from_scores(scores: torch.Tensor, spec: PruneSpec, per_row: bool) -> torch.Tensor:
    """Bool keep-mask (out, in): unstructured within rows (or the whole layer), or N:M per row."""
    out_f, in_f = scores.shape
    if spec.pattern != "unstructured":
        n, m = parse_nm(spec.pattern)
        if in_f % m:
            raise ValueError(f"pattern={spec.pattern!r} needs input width divisible by {m}; got {in_f}")
        return _keep_lowest_pruned(scores.reshape(out_f, in_f // m, m), m - n).reshape(out_f, in_f)
    if per_row:
        return _keep_lowest_pruned(scores, math.floor(spec.sparsity * in_f))
    return _keep_lowest_pruned(scores.reshape(-1), math.floor(spec.sparsity * scores.numel())).reshape(out_f, in_f)


def mask_sparsity(masks: dict[str, torch.Tensor]) -> dict:
    """Achieved sparsity: per parameter, and overall (pruned / total)."""
    per = {name: 1.0 - keep.float().mean().item() for name, keep in masks.items()}
    total = sum(k.numel() for k in masks.values())
    pruned = sum(int((~k).sum()) for k in masks.values())
    return {"overall": pruned / total if total else 0.0, "per_parameter": per}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero the pruned weights of ``model`` in place; every name must be one of its parameters."""
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        if name not in params:
            raise ValueError(f"mask entry {name!r} is not a parameter of this model "
                             f"(first parameters: {list(params)[:3]})")
        if params[name].shape != keep.shape:
            raise ValueError(f"mask entry {name!r} has shape {tuple(keep.shape)}; "
                             f"the parameter has {tuple(params[name].shape)}")
        params[name].mul_(keep.to(params[name].device, params[name].dtype))
    return model


def save_masks(path: Path, masks: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Keep-masks as safetensors; ``metadata`` as one canonical JSON entry (``mmskip``).

    safetensors writes its metadata map in hash order, which changes from process to process:
    with several keys the same masks would give different bytes. One key keeps them identical.
    """
    meta = {"mmskip": json.dumps(metadata, sort_keys=True, ensure_ascii=False)}
    save_file({k: v.cpu().contiguous() for k, v in masks.items()}, str(path), metadata=meta)


def mask_metadata(path: Path) -> dict[str, str]:
    """The metadata ``save_masks`` stored with a mask file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("mmskip", "{}"))


def load_masks(path: Path) -> dict[str, torch.Tensor]:
    masks = load_file(str(path))
    bad = [k for k, v in masks.items() if v.dtype != torch.bool]
    if bad:
        raise ValueError(f"{path}: entries {bad[:3]} are not boolean keep-masks")
    return masks


# ---------------------------------------------------------------- block-by-block pruning


class _Stop(Exception):
    pass


def _capture_first_block(model: nn.Module, layers, batches):
    """Inputs of block 0 for every calibration batch: (hidden, args, kwargs, valid-token mask)."""
    captured = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append([hidden, args[1:], kwargs])
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for embeds, mask in batches:
            try:
                model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
            except _Stop:
                pass
            captured[-1].append(mask.bool())
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def prune(model: nn.Module, spec: PruneSpec, batches=None, seed: int = 0, progress=None) -> tuple[dict, dict]:
    """Prune ``model`` in place under ``spec``; returns (keep-masks, Wanda input norms or {}).

    ``batches``: calibration (inputs_embeds, attention_mask) pairs, needed by Wanda only.
    """
    blocks = prunable_linears(model)
    generator = torch.Generator().manual_seed(seed)
    masks: dict[str, torch.Tensor] = {}
    norms: dict[str, torch.Tensor] = {}
    per_row = spec.method != "magnitude"
    if spec.method != "wanda":
        for block in blocks:
            for name, linear in block.items():
                masks[name] = mask_from_scores(scores_for(spec.method, linear.weight, generator=generator), spec, per_row)
                linear.weight.mul_(masks[name].to(linear.weight.dtype))
        return masks, norms
    if not batches:
        raise ValueError("wanda needs calibration batches")
    layers = adapter_for(model).layers()
    captured = _capture_first_block(model, layers, batches)
    for i, (layer, block) in enumerate(zip(layers, blocks)):
        sq = {name: torch.zeros(lin.in_features, dtype=torch.float64, device=lin.weight.device)
              for name, lin in block.items()}
        current = {}

        def hook_for(name):
            def hook(module, inputs, output):
                # (B, T, in), or (B * T, in) where a block flattens (OPT's FFN); padding never counts
                x = inputs[0].reshape(-1, inputs[0].shape[-1])[current["valid"].reshape(-1)]
                # squares in the activations' dtype (one (rows, in) temporary, not two float64 ones), sums in float64
                sq[name] += torch.square(x).sum(0, dtype=torch.float64)
            return hook

        handles = [lin.register_forward_hook(hook_for(name)) for name, lin in block.items()]
        try:
            for item in captured:
                current["valid"] = item[3]
                layer(item[0], *item[1], **item[2])
        finally:
            for h in handles:
                h.remove()
        for name, lin in block.items():
            norms[name] = sq[name].sqrt().float()
            masks[name] = mask_from_scores(scores_for("wanda", lin.weight, norms[name]), spec, per_row=True)
            lin.weight.mul_(masks[name].to(lin.weight.dtype))
        # The pruned block feeds the next one. Batches are independent, so each batch's output
        # replaces its input at once: one set of hidden states in memory, not two.
        for item in captured:
            out = layer(item[0], *item[1], **item[2])
            item[0] = out[0] if isinstance(out, tuple) else out
        if progress is not None:
            progress(i)
    return masks, norms

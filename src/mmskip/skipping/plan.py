"""A static skip plan: which computation is skipped, in which layers, for which tokens.

Modes follow Shukor & Cord 2024 (arXiv 2410.09454, section 3):

- ``skip_block``: the whole block is the identity;
- ``skip_attn``: self-attention skipped, feed-forward kept;
- ``skip_ffn``: feed-forward skipped, self-attention kept;
- ``parallel_attn_ffn``: self-attention and feed-forward both read the block input and their
  outputs are added to the residual;
- ``parallel_blocks``: block i and block i+1 both read the same input h; the paper's code
  averages their updates (``h + (d1 + d2) / 2``, ``combine="mean"``), ``combine="sum"`` gives
  ``h + d1 + d2``;
- ``drop_last``: the last ``num_layers`` blocks are removed (the usual layer-pruning baseline),
  for every token.

Scope decides which tokens a plan applies to, by position: ``context`` is the prompt (soft
visual tokens and text prompt, every position before the first generated one), ``generated``
the tokens produced by decoding, ``all`` both.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("skip_block", "skip_attn", "skip_ffn", "parallel_attn_ffn", "parallel_blocks", "drop_last")
SCOPES = ("generated", "context", "all")
COMBINES = ("mean", "sum")
# What a later token attends to at a layer whose attention a skipped context position did not run.
CONTEXT_KV = ("compute", "previous_layer")


def every_kth_layer(num_layers: int, interval: int, start_layer: int, end_layer: int | None = None) -> tuple[int, ...]:
    """The paper's selection: layer i when ``start_layer < i < end_layer`` and ``i % interval == 0``."""
    if interval < 1:
        raise ValueError(f"skip_interval={interval}: must be >= 1")
    end = num_layers if end_layer is None else end_layer
    if not -1 <= start_layer < num_layers:
        raise ValueError(f"start_layer={start_layer}: allowed -1..{num_layers - 1} for a {num_layers}-layer model")
    if not 0 <= end <= num_layers:
        raise ValueError(f"end_layer={end_layer}: allowed 0..{num_layers} for a {num_layers}-layer model")
    return tuple(i for i in range(num_layers) if start_layer < i < end and i % interval == 0)


@dataclass(frozen=True)
class SkipPlan:
    """``mode=None`` (or no layers) runs the model unchanged."""

    mode: str | None = None
    layers: tuple[int, ...] = ()  # for parallel_blocks: the first block of each pair
    scope: str = "generated"
    combine: str = "mean"  # parallel_blocks only
    context_kv: str = "compute"
    num_dropped: int = 0  # drop_last only

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: allowed {MODES} or None")
        if self.scope not in SCOPES:
            raise ValueError(f"scope={self.scope!r}: allowed {SCOPES}")
        if self.combine not in COMBINES:
            raise ValueError(f"combine={self.combine!r}: allowed {COMBINES}")
        if self.context_kv not in CONTEXT_KV:
            raise ValueError(f"context_kv={self.context_kv!r}: allowed {CONTEXT_KV}")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers={list(self.layers)}: must be increasing without repeats")
        if self.mode == "parallel_blocks":
            overlap = [i for i in self.layers if i + 1 in self.layers]
            if overlap:
                raise ValueError(f"parallel_blocks pairs (i, i+1) overlap at layers {overlap}")
        if self.mode == "drop_last" and self.num_dropped < 0:
            raise ValueError(f"num_dropped={self.num_dropped}: must be >= 0")

    def check(self, num_layers: int) -> None:
        """Raise if the plan does not fit a model with ``num_layers`` blocks."""
        last = num_layers - (2 if self.mode == "parallel_blocks" else 1)
        bad = [i for i in self.layers if not 0 <= i <= last]
        if bad:
            raise ValueError(f"layers {bad} out of range: allowed 0..{last} for mode={self.mode!r} "
                             f"on a {num_layers}-layer model")
        if self.mode == "drop_last" and self.num_dropped >= num_layers:
            raise ValueError(f"num_dropped={self.num_dropped}: must be below the {num_layers} layers")

    @property
    def empty(self) -> bool:
        return self.mode is None or (self.mode == "drop_last" and self.num_dropped == 0) or (
            self.mode != "drop_last" and not self.layers)

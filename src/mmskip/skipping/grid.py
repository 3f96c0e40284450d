"""The skip grid of ``params.yaml`` (section ``skipping``): modes x scopes x intervals x start layers.

Each grid point is one evaluation variant of the trained mapper and cached features. Points
whose plans coincide (for example interval 4 from start layer 0 and from start layer 2 both
skip layer 4 alone) are evaluated once and share their results; the later ones name the first
in ``same_as``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmskip.params import GRIDS, REFERENCE, SkippingConfig  # noqa: F401  (GRIDS: re-exported)
from mmskip.skipping.plan import SkipPlan, every_kth_layer


@dataclass(frozen=True)
class GridPoint:
    mode: str  # a skip mode or "none"
    scope: str | None
    interval: int | None
    start_layer: int | None
    plan: SkipPlan

    @property
    def key(self) -> str:
        if self.mode == REFERENCE:
            return REFERENCE
        if self.mode == "drop_last":
            return f"drop_last-{self.plan.num_dropped}"
        return f"{self.mode}-{self.scope}-k{self.interval}-s{self.start_layer}"

    @property
    def skipped_blocks(self) -> int:
        """Blocks the plan changes: skipped or halved blocks, parallel pairs count two, dropped ones."""
        if self.mode == "drop_last":
            return self.plan.num_dropped
        return len(self.plan.layers) * (2 if self.mode == "parallel_blocks" else 1)


def grid_limit(cfg: SkippingConfig, task) -> int:
    """How many examples of ``task`` (a ``mmskip.tasks.Task``) the grid evaluates (0: all)."""
    return 0 if cfg.grid == "full" else task.limit(cfg)


def grid_points(cfg: SkippingConfig, mode: str, num_layers: int) -> list[GridPoint]:
    """The points of ``mode`` (a skip mode or "none") for a ``num_layers``-layer LLM."""
    if mode == REFERENCE:
        return [GridPoint(REFERENCE, None, None, None, SkipPlan())]
    if mode not in cfg.modes:
        raise ValueError(f"mode={mode!r}: allowed {list(cfg.modes)} (skipping.modes)")
    if mode == "drop_last":
        bad = [n for n in cfg.drop_last if n >= num_layers]
        if bad:
            raise ValueError(f"skipping.drop_last={list(cfg.drop_last)}: {bad} not below the {num_layers} layers")
        return [GridPoint(mode, "all", None, None, SkipPlan(mode, scope="all", num_dropped=n)) for n in cfg.drop_last]
    starts = range(-1, num_layers - 1) if cfg.grid == "full" else cfg.start_layers
    bad = [s for s in starts if s >= num_layers - 1]
    if bad:
        raise ValueError(f"skipping.start_layers={list(starts)}: {bad} leave no layer to skip in a "
                         f"{num_layers}-layer LLM; allowed -1..{num_layers - 2}")
    points = []
    for scope in cfg.scopes:
        for interval in cfg.intervals:
            for start in starts:
                layers = every_kth_layer(num_layers, interval, start, cfg.end_layer or None)
                if mode == "parallel_blocks":
                    # pairs (i, i+1) must not overlap and i+1 must exist
                    pairs: list[int] = []
                    for i in layers:
                        if i + 1 < num_layers and (not pairs or pairs[-1] + 1 < i):
                            pairs.append(i)
                    layers = tuple(pairs)
                plan = SkipPlan(mode, layers, scope, combine=cfg.combine, context_kv=cfg.context_kv)
                points.append(GridPoint(mode, scope, interval, start, plan))
    return points

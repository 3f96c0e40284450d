"""The skip grid of ``params.yaml`` (section ``skipping``): semantics x modes x scopes x intervals x start layers.

Each grid point is one skip plan applied to the trained mapper and cached features. Points
whose plans coincide (for example interval 4 from start layer 0 and from start layer 2 both
skip layer 4 alone) are evaluated once and share their results; the later ones name the first
in ``same_as``.

Under ``semantics="official"`` a point's plan is what the paper's code executes for the same
mode, scope, interval and start layer (:func:`mmskip.skipping.plan.official_plan`): its layer
bounds (never layer 0, never the last layer), its parallel-block pairs and its keys and values.
Official points' keys end in ``-official``; textbook keys are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmskip.evaluation import BASELINE
from mmskip.params import GRIDS, SkippingConfig  # noqa: F401  (GRIDS: re-exported)
from mmskip.skipping.plan import SkipPlan, every_kth_layer, official_plan


NO_SKIP = "none"  # skip_mode of the baseline's point, which skips nothing


@dataclass(frozen=True)
class GridPoint:
    mode: str  # a skip mode, or "none" for the baseline point (BASELINE_POINT)
    scope: str | None
    interval: int | None
    start_layer: int | None
    plan: SkipPlan
    dropped: int | None = None  # drop_last: the blocks removed (skipping.drop_last)

    @property
    def semantics(self) -> str | None:
        return None if self.mode == NO_SKIP else self.plan.semantics

    @property
    def key(self) -> str:
        if self.mode == NO_SKIP:
            return BASELINE
        suffix = "" if self.plan.semantics == "textbook" else f"-{self.plan.semantics}"
        if self.mode == "drop_last":
            return f"drop_last-{self.dropped}{suffix}"
        return f"{self.mode}-{self.scope}-k{self.interval}-s{self.start_layer}{suffix}"

    @property
    def skipped_blocks(self) -> int:
        """Blocks the plan changes: skipped or halved blocks, parallel pairs count two, dropped ones, and
        under official semantics the blocks a parallel_blocks plan skips whole."""
        if self.mode == "drop_last":
            return self.dropped
        if self.mode == "parallel_blocks":  # official: plus the layers it skips whole (plan.reused)
            return 2 * len(self.plan.layers) + len(self.plan.reused)
        return len(self.plan.layers)


BASELINE_POINT = GridPoint(NO_SKIP, None, None, None, SkipPlan())


def grid_limit(cfg: SkippingConfig, task, shares=None) -> int:
    """How many examples of ``task`` (a ``mmskip.tasks.Task``) the grid evaluates (0: all): with ``shares``
    (params ``example_shares``), the modality's share of them."""
    return 0 if cfg.grid == "full" else task.limit(cfg, shares)


def grid_points(cfg: SkippingConfig, mode: str, num_layers: int) -> list[GridPoint]:
    """The points of ``mode`` (a skip mode of ``cfg.modes``) for a ``num_layers``-layer LLM."""
    if mode not in cfg.modes:
        raise ValueError(f"mode={mode!r}: allowed {list(cfg.modes)} (skipping.modes)")
    if mode == "drop_last":
        bad = [n for n in cfg.drop_last if n >= num_layers]
        if bad:
            raise ValueError(f"skipping.drop_last={list(cfg.drop_last)}: {bad} not below the {num_layers} layers")
        return [GridPoint(mode, "all", None, None, _plan(cfg, semantics, mode, num_layers, None, None, "all", n), n)
                for semantics in cfg.semantics for n in cfg.drop_last]
    starts = range(-1, num_layers - 1) if cfg.grid == "full" else cfg.start_layers
    bad = [s for s in starts if s >= num_layers - 1]
    if bad:
        raise ValueError(f"skipping.start_layers={list(starts)}: {bad} leave no layer to skip in a "
                         f"{num_layers}-layer LLM; allowed -1..{num_layers - 2}")
    return [GridPoint(mode, scope, interval, start, _plan(cfg, semantics, mode, num_layers, interval, start, scope))
            for semantics in cfg.semantics for scope in cfg.scopes for interval in cfg.intervals for start in starts]


def _plan(cfg: SkippingConfig, semantics: str, mode: str, num_layers: int, interval: int | None,
          start: int | None, scope: str, num_dropped: int = 0) -> SkipPlan:
    """One point's plan under ``semantics``."""
    if semantics == "official":
        return official_plan(mode, num_layers, interval or 1, -1 if start is None else start, cfg.end_layer or None,
                             scope, num_dropped)
    if mode == "drop_last":
        return SkipPlan(mode, scope=scope, num_dropped=num_dropped)
    layers = every_kth_layer(num_layers, interval, start, cfg.end_layer or None)
    if mode == "parallel_blocks":
        # pairs (i, i+1) must not overlap and i+1 must exist
        pairs: list[int] = []
        for i in layers:
            if i + 1 < num_layers and (not pairs or pairs[-1] + 1 < i):
                pairs.append(i)
        layers = tuple(pairs)
    return SkipPlan(mode, layers, scope, combine=cfg.combine, context_kv=cfg.context_kv)

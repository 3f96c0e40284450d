"""The skip grid of ``params.yaml`` (section ``skipping``): modes x scopes x intervals x start layers.

Each grid point is one evaluation variant of the trained mapper and cached features. Points
whose plans coincide (for example interval 4 from start layer 0 and from start layer 2 both
skip layer 4 alone) are evaluated once and share their results; the later ones name the first
in ``same_as``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmskip.skipping.plan import COMBINES, CONTEXT_KV, MODES, SCOPES, SkipPlan, every_kth_layer

GRIDS = ("default", "full")
REFERENCE = "none"  # the unskipped engine on the same examples: the 100% of every grid point


@dataclass
class SkippingConfig:
    """Which skipped variants to evaluate, on how many test examples."""

    # "full" widens the grid to every start layer (-1 .. layers - 2) and the whole test split
    grid: str = "default"
    # "none" (the unskipped reference every point is compared with) must be listed; it is an
    # entry here so that one list drives Snakemake's jobs and DVC's matrix alike
    modes: tuple[str, ...] = (REFERENCE, *MODES)
    scopes: tuple[str, ...] = SCOPES
    intervals: tuple[int, ...] = (2, 3, 4)
    start_layers: tuple[int, ...] = (-1, 1)  # -1 lets layer 0 be skipped
    end_layer: int = 0  # 0: no bound (the number of layers)
    drop_last: tuple[int, ...] = (1, 2, 3)  # blocks removed by drop_last
    combine: str = "mean"
    context_kv: str = "compute"
    vqa_questions: int = 640  # first N test questions (0: all)
    caption_images: int = 96  # first N test images (0: all)
    decode_batch_size: int = 32  # rows decoded together (the baseline evaluation uses evaluation.batch_size)

    def __post_init__(self) -> None:
        for name in ("modes", "scopes", "intervals", "start_layers", "drop_last"):
            setattr(self, name, tuple(getattr(self, name)))  # lists from YAML compare equal to CLI tuples
        if self.grid not in GRIDS:
            raise ValueError(f"grid={self.grid!r}: allowed {GRIDS}")
        for name, values, allowed in (("modes", self.modes, (REFERENCE, *MODES)), ("scopes", self.scopes, SCOPES)):
            bad = [v for v in values if v not in allowed]
            if bad or not values or len(set(values)) < len(values):
                raise ValueError(f"{name}={list(values)}: allowed a non-empty subset of {allowed} without repeats")
        if REFERENCE not in self.modes:
            raise ValueError(f"modes={list(self.modes)}: must include {REFERENCE!r}, the unskipped reference "
                             "every grid point is compared with")
        if not self.intervals or min(self.intervals) < 1:
            raise ValueError(f"intervals={list(self.intervals)}: must be non-empty, each >= 1")
        if not self.start_layers or min(self.start_layers) < -1:
            raise ValueError(f"start_layers={list(self.start_layers)}: must be non-empty, each >= -1")
        if not self.drop_last or min(self.drop_last) < 1:
            raise ValueError(f"drop_last={list(self.drop_last)}: must be non-empty, each >= 1")
        if self.combine not in COMBINES:
            raise ValueError(f"combine={self.combine!r}: allowed {COMBINES}")
        if self.context_kv not in CONTEXT_KV:
            raise ValueError(f"context_kv={self.context_kv!r}: allowed {CONTEXT_KV}")
        for name in ("vqa_questions", "caption_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0 (0: all)")
        if self.decode_batch_size < 1:
            raise ValueError(f"decode_batch_size={self.decode_batch_size}: must be >= 1")

    def limit(self, task: str) -> int:
        """How many examples of ``task`` the grid evaluates (0: all)."""
        if self.grid == "full":
            return 0
        return self.vqa_questions if task == "vqa" else self.caption_images


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

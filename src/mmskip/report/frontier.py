"""One Pareto frontier per task: every family's points by score against what they execute.

Each point is a row of the report's frame, on its task's headline metric, as a percentage of the
unskipped model's score on the same examples (each family's records compare with the baseline
decode of their own examples). Costs are fractions of the unskipped model's:

- executed FLOPs of the prefill and of the decode, apart (the engines count them from the shapes
  they run);
- decode time per token, where the family measured it (the skip grid's decode ms/token over its
  unskipped point's, measured in the same job).

Families: ``static skip`` (skip_block, skip_attn, skip_ffn), ``parallel`` (attention and
feed-forward, or pairs of blocks, side by side: every FLOP executed, depth saved), ``layer
dropping`` (drop_last), ``pruning`` (magnitude, Wanda, random, the alpha-SubNet: their weights are
zeros in dense matrices, so every FLOP is executed, 1.0), ``trained with compression`` (a mapper
trained with the pruned or skipping LLM, or the dense control) and ``smaller LLM`` (its executed
FLOPs as its share of the default LLM's parameters), and the token-level families (``visual-token exit``,
``FastV``, ``early exit``: their time against the token engine's own with nothing leaving, timed in the same
job).

A point is on a frontier when no other point of the task scores at least as much for at most its
cost, one of the two strictly. At each compute level (a budget: a fraction of the unskipped
model's cost), the best point within the budget names the family that buys the most score there.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from mmskip.report.records import headline_rows, with_percentage
from mmskip.report.skipping import NO_SKIP, PARALLEL
from mmskip.report.tokens import FAMILY as TOKENS, KIND_NAMES
from mmskip.tasks import get_task, headline

BUDGETS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
COSTS = {"prefill": "prefill FLOPs", "decode": "decode FLOPs", "time": "decode time"}
FAMILY_COLORS = {"static skip": "#4c72b0", "parallel": "#c44e52", "layer dropping": "#937860", "pruning": "#55a868",
                 "trained with compression": "#8172b3", "smaller LLM": "#dd8452", "unskipped": "#222222",
                 "visual-token exit": "#da8bc3", "FastV": "#8c8c8c", "early exit": "#ccb974"}


def _skip_family(mode: str) -> str:
    return "parallel" if mode in PARALLEL else "layer dropping" if mode == "drop_last" else "static skip"


def _number(value) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def frontier_points(frame: pd.DataFrame, task: str) -> pd.DataFrame:
    """The task's points: family, label, pct (of unskipped), prefill, decode and time (fractions; time
    None where not measured), one row per point of every family, the unskipped model first. A point without a
    percentage (its baseline scored 0: no percentage of a zero score) is left out."""
    rows = []
    frame = with_percentage(frame)
    skip = headline_rows(frame, "skip", task)
    base_ms = None
    for _, r in skip.iterrows():
        if r["skip_mode"] == NO_SKIP:
            base_ms = _number(r["decode_ms_per_token"])
    rows.append({"family": "unskipped", "label": "unskipped", "pct": 100.0, "prefill": 1.0, "decode": 1.0,
                 "time": 1.0 if base_ms else None})
    for _, r in skip.iterrows():
        if r["skip_mode"] == NO_SKIP:
            continue
        ms = _number(r["decode_ms_per_token"])
        label = str(r["point"])  # the grid's key: mode-scope-k-start, "-official" for the paper code's semantics
        rows.append({"family": _skip_family(r["skip_mode"]), "label": label, "pct": float(r["pct_of_baseline"]),
                     "prefill": float(r["prefill_flops_fraction"]), "decode": float(r["decode_flops_fraction"]),
                     "time": ms / base_ms if ms is not None and base_ms else None})
    for _, r in headline_rows(frame, TOKENS, task).iterrows():
        rows.append({"family": KIND_NAMES[r["token_kind"]], "label": str(r["point"]),
                     "pct": float(r["pct_of_baseline"]), "prefill": float(r["prefill_flops_fraction"]), "decode": float(r["decode_flops_fraction"]),
                     "time": _number(r["decode_time_fraction"])})
    for _, r in headline_rows(frame, "compress", task).iterrows():
        if r["compression"] == "none":
            continue
        pattern = r["sparsity_pattern"] if r["sparsity_pattern"] not in (None, "unstructured") else ""
        label = f"{r['compression']} {float(r['sparsity']):.2f}" + (f" {pattern}" if pattern else "")
        if r["calibration"] not in (None, "prompt") and not pd.isna(r["calibration"]):
            label += f" ({r['calibration']} calibration)"
        rows.append({"family": "pruning", "label": label, "pct": float(r["pct_of_baseline"]), "prefill": 1.0,
                     "decode": 1.0, "time": None})
    trained = headline_rows(frame, "trained", task)
    default_params = None
    for _, r in trained.iterrows():
        if r["point"] == "baseline":
            default_params = _number(r["llm_params"])
    for _, r in trained.iterrows():
        if r["point"] == "baseline" or not r["trained_with_compression"]:
            continue
        if r["point"] == "small/trained":
            share = _number(r["llm_params"]) / default_params if default_params else None
            if share is None:
                continue
            rows.append({"family": "smaller LLM", "label": f"{int(r['llm_params'])} parameters", "pct":
                         float(r["pct_of_baseline"]), "prefill": share, "decode": share, "time": None})
            continue
        rows.append({"family": "trained with compression", "label": str(r["point"]),
                     "pct": float(r["pct_of_baseline"]), "prefill": float(r["prefill_flops_fraction"]),
                     "decode": float(r["decode_flops_fraction"]), "time": None})
    return pd.DataFrame(rows, columns=["family", "label", "pct", "prefill", "decode", "time"])


def on_frontier(points: pd.DataFrame, cost: str) -> list[bool]:
    """Per point: no other point with a cost scores at least as much for at most its cost, one strictly;
    of points equal in both, the first listed."""
    out = []
    have = points[points[cost].notna()]
    for n, (i, p) in enumerate(points.iterrows()):
        if p[cost] is None or pd.isna(p[cost]):
            out.append(False)
            continue
        others = have.drop(index=i)
        better = (others[cost] <= p[cost]) & (others["pct"] >= p["pct"]) & (
            (others[cost] < p[cost]) | (others["pct"] > p["pct"]))
        same = (others[cost] == p[cost]) & (others["pct"] == p["pct"]) & (others.index.map(points.index.get_loc) < n)
        out.append(not bool((better | same).any()))
    return out


def best_at_budgets(points: pd.DataFrame, cost: str, budgets: Sequence[float] = BUDGETS) -> list[dict]:
    """Per budget: the best-scoring point costing at most the budget (ties to the cheaper, then to the
    first listed), or None where no point fits."""
    out = []
    for budget in budgets:
        fits = points[points[cost].notna()]
        fits = fits[fits[cost].astype(float) <= budget + 1e-12]
        if fits.empty:
            out.append({"budget": budget, "best": None})
            continue
        best = fits.assign(_neg=-fits["pct"]).sort_values(["_neg", cost], kind="stable").iloc[0]
        out.append({"budget": budget, "best": {"family": best["family"], "label": best["label"],
                                               "pct": float(best["pct"]), "cost": float(best[cost])}})
    return out


def _figure(task: str, points: pd.DataFrame, costs: Sequence[str], flags: dict[str, list[bool]]) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mmskip.report.build import _figure_uri

    figure = Figure(figsize=(3.3 * len(costs) + 1.9, 3.3))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(costs), squeeze=False)[0]
    for ax, cost in zip(axes, costs):
        have = points[points[cost].notna()]
        for family, group in have.groupby("family", sort=False):
            ax.scatter(group[cost].astype(float), group["pct"], s=12, alpha=0.7,
                       color=FAMILY_COLORS.get(family, "#999999"), label=family)
        front = points[flags[cost]].sort_values(cost)  # a point on a frontier has that cost
        ax.step(front[cost].astype(float), front["pct"], where="post", color="#222222", linewidth=1.0)
        ax.set_xlabel(f"{COSTS[cost]} (fraction of unskipped)", fontsize=8)
        ax.set_ylim(bottom=max(0.0, float(have["pct"].min()) - 5))
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel(f"{headline(task)}, % of unskipped", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    figure.suptitle(f"{task}: Pareto frontier (line) of every family's points", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1 - 1.8 / (3.3 * len(costs) + 1.9), 0.95))
    return _figure_uri(figure)


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def frontier_section(points_of: dict[str, pd.DataFrame]) -> dict | None:
    """Per task of ``points_of`` (task -> :func:`frontier_points`): the figure, the frontier's points and the best
    family at each budget, per cost."""
    out = []
    for task, points in points_of.items():
        if len(points) < 2:
            continue
        costs = [c for c in COSTS if points[c].notna().sum() >= 2]
        budgets = {c: best_at_budgets(points, c) for c in costs}
        levels = []
        for i, budget in enumerate(BUDGETS):
            cells = []
            for c in costs:
                best = budgets[c][i]["best"]
                cells.append(None if best is None else {"family": best["family"], "label": best["label"],
                                                        "pct": f"{best['pct']:.1f}", "cost": _fmt(best["cost"])})
            levels.append({"budget": f"{budget:.0%}", "cells": cells})
        flags = {c: on_frontier(points, c) for c in costs}
        front = []
        for c in costs:
            for (_, p), flag in zip(points.iterrows(), flags[c]):
                if flag:
                    front.append({"cost": COSTS[c], "family": p["family"], "label": p["label"],
                                  "pct": f"{p['pct']:.1f}", "value": _fmt(float(p[c]))})
        out.append({"task": task, "metric": headline(task), "figure": _figure(task, points, costs, flags),
                    "costs": [COSTS[c] for c in costs], "levels": levels, "frontier": front,
                    "num_points": len(points), "families": sorted(set(points["family"]))})
    return {"tasks": out, "budgets": [f"{b:.0%}" for b in BUDGETS]} if out else None


def cheapest_keeping(points: pd.DataFrame, cost: str, keep: float) -> dict | None:
    """The point of lowest ``cost`` keeping at least ``keep`` % (ties to the higher score), or None."""
    fits = points[points[cost].notna() & (points["pct"] >= keep)]
    if fits.empty:
        return None
    best = fits.assign(_neg=-fits["pct"]).sort_values([cost, "_neg"], kind="stable").iloc[0]
    return {"family": best["family"], "label": best["label"], "pct": f"{best['pct']:.1f}",
            "cost": _fmt(float(best[cost]))}


def headline_rows_of(frame: pd.DataFrame, points_of: dict[str, pd.DataFrame], keep: float) -> list[dict]:
    """Per task of ``points_of`` (task -> :func:`frontier_points`): the baseline's and the blind run's headline
    scores, and per cost the cheapest point of any family keeping ``keep`` % of the unskipped score."""
    out = []
    for task, points in points_of.items():
        base = headline_rows(frame, "baseline", task)
        blind = headline_rows(frame, "blind", task)
        out.append({"task": task, "modality": get_task(task).modality, "metric": headline(task),
                    "score": f"{float(base['score'].iloc[0]):.3f}" if len(base) else "n/a",
                    "blind": f"{float(blind['score'].iloc[0]):.3f}" if len(blind) else "n/a",
                    "cheapest": [cheapest_keeping(points, c, keep) if len(points) > 1 else None for c in COSTS]})
    return out

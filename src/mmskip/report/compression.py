"""The report's compression section: pruned-LLM rows for ``summary.csv``, score-vs-sparsity plots,
the Wanda calibration comparison and the α-SubNet (the shared mask on every task, mask IoU).

Every score is compared with the baseline of its own ``metrics.json`` (``points[0]``, key
``baseline``: the dense LLM on the same first N test examples, from the task's one baseline
decode), never with the full-split evaluation. Latency in
``timing.json`` is measured with dense kernels; it is shown in the HTML and affects nothing else.

The section's scores, percentages and achieved sparsities are the frame's rows (family ``compress``);
a mask's target sparsity, its sparse-FLOPs fractions and its latency come from its metrics.json point
and timing.json, the α-SubNet's IoU and rule-alone sparsity from subnet.json.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from mmskip.evaluation import BASELINE
from mmskip.io import read_json
from mmskip.report.records import RunFamily, headline_rows, read_runs
from mmskip.report.skipping import _fmt
from mmskip.tasks import TASKS, headline

SUBNET = "subnet"
UNSTRUCTURED = "unstructured"
FAMILY = "compress"
COMPRESS_COLUMNS = ("compression", "sparsity", "sparsity_pattern", "calibration", "trained_with_compression",
                    "llm_params")
POINT_KEYS = ("key", "method", "pattern", "sparsity", "achieved_sparsity", "calibration", "scores",
              "sparse_flops_fraction")
METHOD_COLORS = {"magnitude": "#4c72b0", "wanda": "#dd8452", "random": "#55a868", SUBNET: "#8172b3"}
NM_MARKERS = ("s", "^", "D", "v", "P")
SPEED_NOTE = ("Unstructured sparsity gives no speedup here: the pruned weights are stored as zeros and the "
              "dense kernels still multiply by them, so the measured decode time of every pruned model is "
              "that of the dense model (within timing noise). The sparse-FLOPs fractions count the "
              "multiply-adds that would remain if the zeros were skipped; that needs sparse kernels "
              "(for N:M patterns, sparse tensor cores), which this pipeline does not run, so they are a "
              "hypothetical count, not a measured speedup.")


# a mask set's dense reference is its own (the α-SubNet's may differ from a pruning method's): not checked across sets
COMPRESS_RUNS = RunFamily("compression", "method", ("method", "num_examples"), same_baseline=False)


def read_compress_runs(compress_dirs: Sequence[Path]) -> dict[str, dict[str, dict]]:
    """task -> method -> metrics.json of ``results/compress/{task}/{method}`` (with ``timing``)."""
    runs = read_runs(compress_dirs, COMPRESS_RUNS)
    for task, methods in runs.items():
        for run in methods.values():
            path = run["_dir"] / "metrics.json"
            if task not in TASKS:
                raise ValueError(f"{path}: task={task!r}; expected one of {sorted(TASKS)}")
            for i, point in enumerate(run["points"]):
                lacking = [k for k in POINT_KEYS if not isinstance(point, dict) or k not in point]
                if lacking:
                    raise ValueError(f"{path}: points[{i}] lacks {lacking}")
                if headline(task) not in point["scores"]:
                    raise ValueError(f"{path}: points[{i}] ({point['key']}) has no {headline(task)!r} score")
                if point["method"] == SUBNET and not point.get("rule"):
                    raise ValueError(f"{path}: points[{i}] ({point['key']}) is an α-SubNet point without a rule")
    return runs


def read_subnet(subnet_path: Path | None) -> dict | None:
    """The α-SubNet index ``subnet.json`` (None when not given or not found)."""
    if subnet_path is None or not Path(subnet_path).is_file():
        return None
    index = read_json(subnet_path)
    if not isinstance(index, dict):
        raise ValueError(f"{subnet_path}: expected a JSON object, got {type(index).__name__}")
    missing = [k for k in ("tasks", "entries", "task_iou", "blocks") if k not in index]
    if missing:
        raise ValueError(f"{subnet_path}: missing required key(s) {missing}")
    unknown = [t for t in index["tasks"] if t not in TASKS]
    if unknown:
        raise ValueError(f"{subnet_path}: unknown task(s) {unknown}; expected some of {sorted(TASKS)}")
    lists = {" vs ".join(p["tasks"]): p["iou_per_block"] for p in index["task_iou"]}
    for entry in index["entries"]:
        if "rule" not in entry or "iou_with_task" not in entry:
            raise ValueError(f"{subnet_path}: an entry lacks 'rule' or 'iou_with_task'")
        lists.update({f"{entry['rule']} vs {t}": v for t, v in entry["iou_with_task"].items()})
    for name, values in lists.items():
        if len(values) != index["blocks"]:
            raise ValueError(f"{subnet_path}: IoU of {name} has {len(values)} blocks, expected {index['blocks']}")
    return index


def _label(point: Mapping[str, Any]) -> str:
    """``compression`` of a point: the method, ``subnet:<rule>``, or ``none`` (dense)."""
    return f"{SUBNET}:{point['rule']}" if point["method"] == SUBNET else point["method"]


def _pct(point: Mapping[str, Any], reference: Mapping[str, Any], metric: str) -> float | None:
    base = reference["scores"].get(metric)
    # Divide first: 100 * x / x is not always 100.0.
    return 100.0 * (point["scores"][metric] / base) if base else None


def _task_points(methods: Mapping[str, dict]):
    """(run, point) of one task: the dense reference once (of the first method), then every method's points."""
    order = sorted(methods)
    yield methods[order[0]], methods[order[0]]["points"][0]
    for method in order:
        for point in methods[method]["points"][1:]:
            yield methods[method], point


def compress_rows(runs: Mapping[str, Mapping[str, dict]]) -> list[dict]:
    """One ``summary.csv`` row per task x compression point x metric (family ``compress``)."""
    rows = []
    for task in sorted(runs):
        for run, point in _task_points(runs[task]):
            reference = run["points"][0]
            for metric, score in sorted(point["scores"].items()):
                rows.append({
                    "task": task, "modality": run.get("modality", "image"), "family": FAMILY, "metric": metric,
                    "score": score, "pct_of_baseline": _pct(point, reference, metric),
                    "compression": _label(point), "sparsity": point["achieved_sparsity"],
                    "sparsity_pattern": point["pattern"], "calibration": point["calibration"],
                    "trained_with_compression": False, "llm_params": run.get("llm_params"),
                    "num_examples": run["num_examples"], "point": point["key"]})
    return rows


def _ms(run: Mapping[str, Any], key: str) -> float | None:
    return run["timing"].get("points", {}).get(key, {}).get("decode", {}).get("ms_per_step")


def _method(label: str) -> str:
    """The method of a ``compression`` label: ``subnet`` for ``subnet:<rule>``, else the label itself."""
    return SUBNET if label.startswith(f"{SUBNET}:") else label


def _point_details(runs: Mapping[str, Mapping[str, dict]]) -> dict[tuple[str, str, str], tuple[dict, dict]]:
    """(task, compression, point key) -> (run, point): the metrics.json point behind each frame row."""
    return {(task, _label(point), point["key"]): (run, point)
            for task in sorted(runs) for run, point in _task_points(runs[task])}


def _target(row, details: Mapping[tuple[str, str, str], tuple[dict, dict]]) -> float:
    """The target sparsity of a frame row's mask (the frame holds the achieved one)."""
    return float(details[row.task, row.compression, row.point][1]["sparsity"])


def _point_cells(row, details: Mapping[tuple[str, str, str], tuple[dict, dict]]) -> dict:
    """Table cells of one mask: its frame ``row`` (a named tuple), plus its point's target sparsity and
    sparse-FLOPs fractions and its decode latency."""
    run, point = details[row.task, row.compression, row.point]
    sparse = point["sparse_flops_fraction"]
    return {"method": row.compression, "key": row.point, "pattern": _fmt(row.sparsity_pattern),
            "calibration": _fmt(row.calibration), "target": _fmt(_target(row, details), 2),
            "achieved": _fmt(float(row.sparsity)), "score": _fmt(row.score), "pct": _fmt(row.pct_of_baseline, 1),
            "decode": _fmt(sparse.get("decode")), "prefill": _fmt(sparse.get("prefill")),
            "ms": _fmt(_ms(run, row.point), 2)}


def _main_calibration(calibrations: Sequence[str | None]) -> str | None:
    """The calibration of most points (ties: the first by name); the others are comparison points."""
    counts = collections.Counter(calibrations)
    return max(sorted(counts, key=str), key=counts.__getitem__) if counts else None


def _sparsity_figure(task: str, rows: pd.DataFrame) -> str:
    """``rows``: the task's headline rows of the frame."""
    from mmskip.report.build import _figure_uri

    return _figure_uri(sparsity_plot(task, rows))


def _place_labels(ax, labels: list[tuple[float, float, str, str]]) -> None:
    """Write each ``(x, y, text, colour)`` label beside its point, the labels of points at one sparsity in a
    column to their right, spread apart so that no two overlap; a thin line joins a moved label to its point."""
    figure = ax.figure
    renderer = figure.canvas.get_renderer()
    y0, y1 = ax.get_ylim()
    height_px = ax.get_window_extent(renderer).height
    probe = ax.text(0, 0, "Ag", fontsize=7)  # one label line's height, as data units of y
    gap = probe.get_window_extent(renderer).height * 1.25 / height_px * (y1 - y0)
    probe.remove()
    columns: dict[float, list] = {}
    for label in labels:
        columns.setdefault(round(label[0], 2), []).append(label)
    for x_col, column in columns.items():
        column.sort(key=lambda label: (label[1], label[2]))
        ys: list[float] = []
        for _, y, _, _ in column:  # upwards: each label at its point or a gap above the one below
            ys.append(max(y, ys[-1] + gap) if ys else y)
        top = y1 - gap / 2
        for i in reversed(range(len(ys))):  # then down from the top of the axes where the column overflows it
            ys[i] = min(ys[i], top if i == len(ys) - 1 else ys[i + 1] - gap)
        for (x, y, text, color), y_label in zip(column, ys):
            ax.annotate(text, (x, y), xytext=(x_col + 0.025, y_label), textcoords="data", fontsize=7,
                        color=color, va="center", ha="left",
                        arrowprops={"arrowstyle": "-", "color": color, "linewidth": 0.5, "shrinkA": 0, "shrinkB": 2})


def sparsity_plot(task: str, rows: pd.DataFrame):
    """The score-vs-sparsity figure of one task (a matplotlib Figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = headline(task)
    labels: list[tuple[float, float, str, str]] = []
    figure = Figure(figsize=(7.5, 4.4))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    masks = rows[rows["point"] != BASELINE]
    patterns = sorted({p for p in masks["sparsity_pattern"] if p not in (None, UNSTRUCTURED)})
    marker_of = {pattern: NM_MARKERS[i % len(NM_MARKERS)] for i, pattern in enumerate(patterns)}
    hollow_label = subnet_label = True
    for method, method_rows in masks.groupby(masks["compression"].map(_method), sort=True):
        color = METHOD_COLORS.get(method, "#333333")
        shown = method_rows[method_rows["pct_of_baseline"].notna()]
        if method == SUBNET:
            rules_at: dict[tuple[float, float], list[str]] = {}  # rules with the same score share one label
            for row in shown.itertuples(index=False):
                rules_at.setdefault((row.sparsity, row.pct_of_baseline), []).append(
                    row.compression.removeprefix(f"{SUBNET}:"))
            for (x, y), rules in rules_at.items():
                ax.scatter([x], [y], marker="*", s=110, color=color, zorder=3,
                           label="\u03b1-SubNet (rule labelled)" if subnet_label else None)
                labels.append((x, y, "\u03b1-SubNet " + " = ".join(rules), color))
                subnet_label = False
            continue
        unstructured = shown[shown["sparsity_pattern"] == UNSTRUCTURED]
        main = _main_calibration(list(unstructured["calibration"]))
        # the line starts at the dense reference: 100% at sparsity 0 by definition
        line = [(0.0, 100.0)] + sorted((row.sparsity, row.pct_of_baseline)
                                       for row in unstructured.itertuples(index=False) if row.calibration == main)
        ax.plot([x for x, _ in line], [y for _, y in line], marker="o", markersize=4, linewidth=1.4, color=color,
                label=method + (f" (calibration: {main})" if main else ""))
        for row in unstructured.itertuples(index=False):
            if row.calibration != main:
                ax.scatter([row.sparsity], [row.pct_of_baseline], marker="o", s=36, facecolors="none",
                           edgecolors=color, zorder=3,
                           label="other calibration (hollow, labelled)" if hollow_label else None)
                labels.append((row.sparsity, row.pct_of_baseline, f"{method} ({row.calibration})", color))
                hollow_label = False
        for row in shown.itertuples(index=False):
            if row.sparsity_pattern != UNSTRUCTURED:
                ax.scatter([row.sparsity], [row.pct_of_baseline], marker=marker_of[row.sparsity_pattern], s=36,
                           color=color, zorder=3)
                labels.append((row.sparsity, row.pct_of_baseline, f"{method} {row.sparsity_pattern}", color))
    for pattern in patterns:  # legend entries for the N:M shapes; colour = method
        ax.scatter([], [], marker=marker_of[pattern], color="#555555", label=f"{pattern} (N:M, labelled)")
    ax.axhline(100.0, color="#999999", linewidth=0.8, linestyle=":")
    ax.set_xlim(-0.02, None)
    ax.set_xlabel("achieved sparsity (fraction of the LLM's prunable weights set to zero)", fontsize=9)
    ax.set_ylabel(f"{metric}, % of dense")
    ax.set_title(f"{task}: {metric} vs sparsity", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    x0, x1 = ax.get_xlim()
    ax.set_xlim(x0, x1 + 0.18)  # room for the label columns right of the points
    figure.tight_layout()
    _place_labels(ax, labels)
    return figure


def _calibration_rows(rows: pd.DataFrame, details: Mapping[tuple[str, str, str], tuple[dict, dict]]) -> list[dict]:
    """Wanda masks (frame rows of one task) that share a pattern and target sparsity under different
    calibrations."""
    groups: dict[tuple[str, float], list] = {}
    for row in rows[rows["compression"] == "wanda"].itertuples(index=False):
        groups.setdefault((str(row.sparsity_pattern), _target(row, details)), []).append(row)
    cells = []
    for key in sorted(groups):
        if len({row.calibration for row in groups[key]}) > 1:
            cells += [_point_cells(row, details) for row in sorted(groups[key], key=lambda r: str(r.calibration))]
    return cells


def _dense_mismatch(methods: Mapping[str, dict]) -> list[str]:
    """Methods whose dense reference differs from the first method's (empty when all agree).

    Read from the runs: the frame holds the dense reference of the first method only."""
    order = sorted(methods)
    first = methods[order[0]]
    same = [m for m in order if methods[m]["points"][0]["scores"] == first["points"][0]["scores"]
            and methods[m]["num_examples"] == first["num_examples"]]
    if len(same) == len(order):
        return []
    return [f"{m}: {_fmt(methods[m]['points'][0]['scores'][headline(methods[m]['task'])], 4)} "
            f"on {methods[m]['num_examples']} examples" for m in order]


def compression_section(frame: pd.DataFrame, runs: Mapping[str, Mapping[str, dict]],
                        subnet: Mapping[str, Any] | None) -> dict:
    """Template context of the compression section: the frame's headline rows of family ``compress``."""
    rows = headline_rows(frame, FAMILY)
    details = _point_details(runs)
    tasks = []
    for task in sorted(runs):
        task_rows = rows[rows["task"] == task]  # the dense reference (of the first method), then every mask
        dense = task_rows[task_rows["point"] == BASELINE].iloc[0]
        tasks.append({
            "task": task, "metric": headline(task), "methods": sorted(runs[task]),
            "num_examples": dense["num_examples"], "dense_score": _fmt(dense["score"]),
            "figure": _sparsity_figure(task, task_rows),
            "rows": [_point_cells(row, details) for row in task_rows.itertuples(index=False)],
            "calibration": _calibration_rows(task_rows, details),
            "dense_mismatch": _dense_mismatch(runs[task]),
        })
    return {"tasks": tasks, "subnet": _subnet_part(rows, runs, subnet, details), "speed_note": SPEED_NOTE}


def _subnet_part(rows: pd.DataFrame, runs: Mapping[str, Mapping[str, dict]], subnet: Mapping[str, Any] | None,
                 details: Mapping[tuple[str, str, str], tuple[dict, dict]]) -> dict | None:
    """The α-SubNet's score on every task per rule (with each task's own Wanda mask) and its IoU heat map.

    ``rows``: the frame's headline rows of family ``compress``."""
    entries = {e["rule"]: e for e in subnet["entries"]} if subnet else {}
    scored = [t for t in sorted(runs) if SUBNET in runs[t]]
    if not scored and subnet is None:
        return None
    tasks = sorted(set(scored) | set(subnet["tasks"] if subnet else []))
    masks = rows[rows["compression"].map(_method) == SUBNET]
    row_of = {(row.task, row.compression.removeprefix(f"{SUBNET}:")): row for row in masks.itertuples(index=False)}
    rules = list(entries) + sorted({rule for _, rule in row_of} - set(entries))
    table = []
    for rule in rules:
        entry = entries.get(rule, {})
        any_row = next((row_of[t, rule] for t in tasks if (t, rule) in row_of), None)
        achieved = entry.get("achieved", {}).get("overall", any_row.sparsity if any_row else None)
        cells = []
        for task in tasks:
            iou = entry.get("iou_with_task", {}).get(task)
            cells.append(_task_cell(row_of.get((task, rule))) | {"iou": _fmt(sum(iou) / len(iou)) if iou else "\u2013"})
        table.append({"rule": rule, "achieved": _fmt(achieved), "alone": _fmt(entry.get("rule_alone_sparsity")),
                      "cells": cells})
    first_row = next(iter(row_of.values()), None)
    shared = next(iter(entries.values()), None) or (
        details[first_row.task, first_row.compression, first_row.point][1] if first_row else None)
    own = _own_masks(rows, tasks, shared, details)
    return {"tasks": tasks, "metrics": [headline(t) for t in tasks], "rows": table, "own": own,
            "combined": list(subnet.get("combined", [])) if subnet else [],
            "heatmap": _iou_figure(subnet) if subnet else None, "blocks": subnet["blocks"] if subnet else None,
            "task_matrix": _task_matrix_figure(subnet) if subnet and subnet["task_iou"] else None,
            "modality_pairs": _modality_pairs(subnet) if subnet else []}


def task_iou_matrix(subnet: Mapping[str, Any]) -> tuple[list[str], list[list[float]]]:
    """The tasks (by modality, then name) and the IoU of their own masks, mean over blocks, task by task (1 on the
    diagonal): the α-SubNet's tasks across modalities at a glance."""
    tasks = sorted(subnet["tasks"], key=lambda t: (TASKS[t].modality, t))
    mean = {frozenset(p["tasks"]): sum(p["iou_per_block"]) / len(p["iou_per_block"]) for p in subnet["task_iou"]}
    return tasks, [[1.0 if a == b else mean[frozenset((a, b))] for b in tasks] for a in tasks]


def _task_matrix_figure(subnet: Mapping[str, Any]) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mmskip.report.build import _figure_uri

    tasks, values = task_iou_matrix(subnet)
    off = [v for i, row in enumerate(values) for j, v in enumerate(row) if i != j]
    labels = [f"{t} ({TASKS[t].modality})" for t in tasks]
    side = 0.75 * len(tasks) + 2.6
    figure = Figure(figsize=(side + 1.2, side))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    image = ax.imshow(values, cmap="viridis", vmin=min(off), vmax=max(off))  # the diagonal (1) saturates
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            light = i != j and max(off) > min(off) and (value - min(off)) / (max(off) - min(off)) < 0.6
            ax.text(j, i, "1" if i == j else f"{value:.3f}", ha="center", va="center", fontsize=8,
                    color="white" if light else "black")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(labels, fontsize=8, rotation=35, ha="right")
    ax.set_yticks(range(len(tasks)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_title("IoU of the tasks' own masks (mean over blocks)", fontsize=10)
    figure.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    figure.tight_layout()
    return _figure_uri(figure)


def _modality_pairs(subnet: Mapping[str, Any]) -> list[dict]:
    """The tasks' own masks' IoU (mean over blocks) by the pair of their modalities, where the tasks have two
    modalities or more: do tasks of one modality keep more of the same weights than tasks of two?"""
    pairs: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for pair in subnet["task_iou"]:
        a, b = pair["tasks"]
        key = tuple(sorted((TASKS[a].modality, TASKS[b].modality)))
        pairs.setdefault(key, []).append((f"{a} vs {b}", sum(pair["iou_per_block"]) / len(pair["iou_per_block"])))
    if len({m for key in pairs for m in key}) < 2:
        return []
    return [{"modalities": " – ".join(key), "pairs": ", ".join(f"{name} {_fmt(v)}" for name, v in found),
             "iou": _fmt(sum(v for _, v in found) / len(found))} for key, found in sorted(pairs.items())]


def _task_cell(row) -> dict:
    """Score and % of dense of a frame row (a named tuple; None: no such mask)."""
    if row is None:
        return {"score": "\u2013", "pct": "\u2013"}
    return {"score": _fmt(row.score), "pct": _fmt(row.pct_of_baseline, 1)}


def _own_masks(rows: pd.DataFrame, tasks: Sequence[str], shared: Mapping[str, Any] | None,
               details: Mapping[tuple[str, str, str], tuple[dict, dict]]) -> dict | None:
    """Each task's own Wanda mask at the α-SubNet's sparsity and calibration (None: no such mask).

    ``rows``: the frame's headline rows of family ``compress``."""
    if shared is None:
        return None
    wanda = rows[(rows["compression"] == "wanda") & (rows["sparsity_pattern"] == UNSTRUCTURED)]
    cells, achieved = [], set()
    for task in tasks:
        row = next((r for r in wanda[wanda["task"] == task].itertuples(index=False)
                    if r.calibration == shared.get("calibration")
                    and _target(r, details) == float(shared["sparsity"])), None)
        if row is not None:
            achieved.add(_fmt(float(row.sparsity)))
        cells.append(_task_cell(row))
    if not achieved:
        return None
    return {"sparsity": _fmt(float(shared["sparsity"]), 2), "calibration": _fmt(shared.get("calibration")),
            "achieved": ", ".join(sorted(achieved)), "cells": cells}


def _iou_figure(subnet: Mapping[str, Any]) -> str | None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mmskip.report.build import _figure_uri

    labels, values = [], []
    for pair in subnet["task_iou"]:
        labels.append(f"{pair['tasks'][0]} vs {pair['tasks'][1]} (task masks)")
        values.append(pair["iou_per_block"])
    for entry in subnet["entries"]:
        for task in sorted(entry["iou_with_task"]):
            labels.append(f"shared {entry['rule']} vs {task}")
            values.append(entry["iou_with_task"][task])
    if not labels:
        return None
    blocks = subnet["blocks"]
    figure = Figure(figsize=(max(5.5, 0.55 * blocks + 3.5), 0.38 * len(labels) + 1.4))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    image = ax.imshow(values, aspect="auto", cmap="viridis")
    if blocks <= 16:
        low, high = min(map(min, values)), max(map(max, values))
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                light = high > low and (value - low) / (high - low) < 0.6
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if light else "black")
    ax.set_xticks(range(blocks))
    ax.set_xticklabels([str(b) for b in range(blocks)], fontsize=8)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("decoder block")
    ax.set_title("IoU of kept weights per block", fontsize=10)
    figure.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    figure.tight_layout()
    return _figure_uri(figure)

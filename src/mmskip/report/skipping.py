"""The report's skipping section: grid rows for ``summary.csv``, trade-off plots, best settings,
the speed benchmark, and a check that the baseline decode reproduces the Hugging Face evaluation.

Every grid score is compared with the baseline on the same first N test examples (``points[0]`` of
each mode's metrics.json, key ``baseline``, skip mode ``none``: the one baseline decode of the
task), never with the full-split evaluation. The section's scores, percentages, FLOPs fractions
and latencies are the frame's rows (family ``skip``); a plan's layers, its compute skipped and
``same_as`` come from its metrics.json point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from mmskip.evaluation import MULTIMODAL
from mmskip.io import read_json
from mmskip.report.records import RunFamily, headline_rows, read_runs
from mmskip.tasks import get_task, headline

NO_SKIP = "none"  # skip_mode of the baseline's point (mmskip.skipping.grid.BASELINE_POINT)
SCOPES = ("generated", "context", "all")
PARALLEL = ("parallel_attn_ffn", "parallel_blocks")
LLAVA_FAMILY = "llava_skip"  # summary.csv's family of LLaVA-1.5's grid without training (mmskip evaluate_llava)
KEEP = 90.0  # the best-setting table keeps points with >= 90% of the reference score
SKIP_COLUMNS = ("skip_mode", "skip_semantics", "skip_scope", "skip_interval", "start_layer", "skipped_blocks",
                "decode_flops_fraction", "prefill_flops_fraction", "decode_ms_per_token", "num_examples")
MODE_COLORS = {"skip_block": "#4c72b0", "skip_attn": "#dd8452", "skip_ffn": "#55a868",
               "parallel_attn_ffn": "#c44e52", "parallel_blocks": "#8172b3", "drop_last": "#937860"}


SKIP_RUNS = RunFamily("skip grid", "mode", ("mode", "num_examples"), baseline_field="mode", baseline_value=NO_SKIP,
                      baseline_label="skip mode")


def read_skip_runs(skip_dirs: Sequence[Path]) -> dict[str, dict[str, dict]]:
    """task -> mode -> metrics.json of ``results/skip/{task}/{mode}`` (with ``timing``); every mode's
    ``points[0]`` must be the baseline, the same in every mode of a task."""
    return read_runs(skip_dirs, SKIP_RUNS)


def _points(runs: Mapping[str, Mapping[str, dict]]):
    """(task, point, baseline point, ms per token) for every grid point, the baseline first (once)."""
    for task in sorted(runs):
        modes = sorted(runs[task])
        reference = runs[task][modes[0]]["points"][0]
        for i, mode in enumerate(modes):
            run = runs[task][mode]
            for point in run["points"][0 if i == 0 else 1:]:
                timing = run["timing"].get("points", {}).get(point["key"], {})
                yield task, run, point, reference, timing.get("decode", {}).get("ms_per_step")


def read_llava_runs(root: Path) -> tuple[dict[str, dict[str, dict]], dict[str, dict]]:
    """LLaVA-1.5's grids without training (``mmskip evaluate_llava``): ``root/{task}/run.json`` and
    its ``{mode}/`` folders, read as :func:`read_skip_runs` reads the default's grid. Returns
    (task -> mode -> metrics.json, task -> run.json)."""
    root = Path(root)
    task_dirs = sorted(d for d in root.iterdir() if (d / "run.json").is_file()) if root.is_dir() else []
    if not task_dirs:
        raise ValueError(f"{root}: no LLaVA grid found (expected {root}/{{task}}/run.json from mmskip evaluate_llava)")
    runs, infos = {}, {}
    for task_dir in task_dirs:
        info = read_json(task_dir / "run.json")
        modes = [task_dir / mode for mode in info.get("modes", [])]
        missing = [str(d) for d in modes if not (d / "metrics.json").is_file()]
        if not modes or missing:
            raise ValueError(f"{task_dir}/run.json: its modes {info.get('modes')} need {{mode}}/metrics.json; "
                             f"missing {missing or 'the modes list'}")
        task_runs = read_skip_runs(modes)
        if list(task_runs) != [info["task"]]:
            raise ValueError(f"{task_dir}: run.json is task {info['task']!r} but its grid holds {sorted(task_runs)}")
        runs.update(task_runs)
        infos[info["task"]] = info
    return runs, infos


def llava_run_cells(info: Mapping[str, Any]) -> dict:
    """What the LLaVA section shows of a run.json: the model (hub id at its commit, or a folder),
    where and how it ran, and the check against ``generate``."""
    m = info["model"]
    model = f"{m['id']} @ {m['revision']} (commit {m['commit']})" if "id" in m else m["path"]
    check = info["check_generate"]
    return {"task": info["task"], "model": model, "device": info["device"], "dtype": info["dtype"],
            "num_layers": info["num_layers"], "split": info["split"], "num_examples": info["num_examples"],
            "batch_size": info["batch_size"], "max_new_tokens": info["max_new_tokens"],
            "check": f"{check['equal']} of {check['examples']}" if check["examples"] else "not run"}


def skip_rows(runs: Mapping[str, Mapping[str, dict]], family: str = "skip") -> list[dict]:
    """One ``summary.csv`` row per task x grid point x metric (``family``: ``skip`` for the default's
    grid, ``llava_skip`` for LLaVA-1.5's)."""
    rows = []
    for task, run, point, reference, ms in _points(runs):
        for metric, score in sorted(point["scores"].items()):
            base = reference["scores"].get(metric)
            rows.append({
                "task": task, "modality": run.get("modality", "image"), "family": family, "metric": metric,
                "score": score, "pct_of_baseline": 100.0 * (score / base) if base else None,
                "skip_mode": point["mode"], "skip_semantics": None if point["mode"] == NO_SKIP else point.get("semantics", "textbook"), "skip_scope": point["scope"], "skip_interval": point["interval"],
                "start_layer": point["start_layer"], "skipped_blocks": point["skipped_blocks"],
                "decode_flops_fraction": point["decode_flops_fraction"],
                "prefill_flops_fraction": point["prefill_flops_fraction"], "decode_ms_per_token": ms,
                "num_examples": run["num_examples"], "point": point["key"]})
    return rows


def _saved(point: Mapping[str, Any]) -> tuple[float, str]:
    """The x of a point: the fraction of compute it skips in the phase its scope touches.

    FLOPs for skipping modes; sequential depth for parallel modes, which skip no FLOPs.
    """
    kind = "depth" if point["mode"] in PARALLEL else "flops"
    phase = {"generated": "decode", "context": "prefill"}.get(point["scope"])
    if phase is None:  # all tokens: the whole run, weighting the phases by their tokens
        compute = point["compute"]
        if kind == "flops":
            done = sum(compute[p]["tokens"] * compute[p]["flops_per_token"]["total"] for p in ("prefill", "decode"))
            full = sum(compute[p]["tokens"] * compute[p]["unskipped_flops_per_token"]["total"]
                       for p in ("prefill", "decode"))
            return 1 - done / full, kind
        weights = [compute[p]["tokens"] for p in ("prefill", "decode")]
        fractions = [compute[p]["depth_fraction"] for p in ("prefill", "decode")]
        return 1 - sum(w * f for w, f in zip(weights, fractions)) / sum(weights), kind
    return 1 - point[f"{phase}_{kind}_fraction"], kind


def _tradeoff_figure(task: str, rows: pd.DataFrame, points: Mapping[str, dict]) -> str:
    """``rows``: the task's headline rows of the frame; ``points``: its grid points by key."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mmskip.report.build import _figure_uri

    metric = headline(task)
    figure = Figure(figsize=(11, 3.9))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(SCOPES), sharey=True)
    for ax, scope in zip(axes, SCOPES):
        for mode, mode_rows in rows[rows["skip_scope"] == scope].groupby("skip_mode", sort=True):
            shown = [row for row in mode_rows.itertuples(index=False)
                     if points[row.point]["same_as"] is None and row.pct_of_baseline is not None]
            if not shown:
                continue
            # grouped at 1% of compute: under scope "all" the token mix moves x slightly between plans
            xy = [(round(_saved(points[row.point])[0], 2), row.pct_of_baseline) for row in shown]
            style = {"color": MODE_COLORS.get(mode), "linestyle": "--" if mode in PARALLEL else "-"}
            # every point faintly; the line joins the best score at each amount of compute skipped
            ax.scatter([x for x, _ in xy], [y for _, y in xy], s=10, alpha=0.35, color=style["color"])
            best: dict[float, float] = {0.0: 100.0}
            for x, y in xy:
                best[x] = max(best.get(x, y), y)
            xs = sorted(best)
            ax.plot(xs, [best[x] for x in xs], marker="o", markersize=3, linewidth=1.2,
                    label=mode + (" (x: depth saved)" if mode in PARALLEL else ""), **style)
        ax.axhline(KEEP, color="#999999", linewidth=0.8, linestyle=":")
        ax.set_title(f"{task}, scope: {scope}", fontsize=10)
        ax.set_xlabel({"generated": "decode", "context": "prefill", "all": "total"}[scope]
                      + " compute skipped (fraction)", fontsize=8)
        ax.set_xlim(-0.02, None)
    axes[0].set_ylabel(f"{metric}, % of unskipped")
    legend = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    if legend:
        figure.legend(list(legend.values()), list(legend), fontsize=8, loc="lower center", ncol=len(legend),
                      frameon=False)
    return _figure_uri(figure)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "\u2013"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _point_cells(row, point: Mapping[str, Any]) -> dict:
    """Table cells of one grid point: its frame ``row`` (a named tuple), and its metrics.json ``point``
    for the plan's layers, the compute it skips and ``same_as``."""
    return {"key": row.point, "mode": row.skip_mode, "semantics": _fmt(row.skip_semantics),
            "scope": _fmt(row.skip_scope),
            "interval": _fmt(row.skip_interval), "start_layer": _fmt(row.start_layer),
            "layers": ", ".join(map(str, point["layers"])) or (
                f"last {point['num_dropped']}" if point["num_dropped"] else "\u2013"),
            "score": _fmt(row.score), "pct": _fmt(row.pct_of_baseline, 1),
            "prefill": _fmt(row.prefill_flops_fraction), "decode": _fmt(row.decode_flops_fraction),
            "saved": _fmt(_saved(point)[0]), "ms": _fmt(row.decode_ms_per_token, 2),
            "same_as": point.get("same_as") or ""}


def skipping_section(frame: pd.DataFrame, runs: Mapping[str, Mapping[str, dict]], eval_dirs: Sequence[Path],
                     bench_path: Path | None, baseline_dirs: Sequence[Path] = (), family: str = "skip") -> dict:
    """Template context of the skipping section: the frame's headline rows of ``family``."""
    tasks = []
    for task in sorted(runs):
        rows = headline_rows(frame, family, task)  # one per grid point: the baseline, then each mode's
        points = {point["key"]: point for run in runs[task].values() for point in run["points"]}
        reference = rows[rows["skip_mode"] == NO_SKIP].iloc[0]
        # the figure and the best-setting table show one semantics: textbook where it was run
        semantics = [x for x in rows["skip_semantics"].dropna().unique()]
        shown = "textbook" if "textbook" in semantics or not semantics else semantics[0]
        headline_set = rows[(rows["skip_mode"] == NO_SKIP) | (rows["skip_semantics"] == shown)]
        table, best = [], {}
        for row in rows.itertuples(index=False):
            point = points[row.point]
            cells = _point_cells(row, point)
            table.append(cells)
            pct = row.pct_of_baseline
            if (row.skip_mode == NO_SKIP or row.skip_semantics != shown or row.skip_mode in PARALLEL
                    or pct is None or pct < KEEP):
                continue
            saved = _saved(point)[0]
            current = best.get(row.skip_scope)
            if current is None or (saved, pct) > current[0]:
                best[row.skip_scope] = ((saved, pct), cells)
        tasks.append({
            "task": task, "metric": headline(task), "num_examples": reference["num_examples"],
            "reference_score": _fmt(reference["score"]), "figure": _tradeoff_figure(task, headline_set, points),
            "semantics": shown, "compared": _semantics_table(rows, points) if len(semantics) > 1 else [],
            "rows": table, "best": [best[s][1] for s in SCOPES if s in best],
            "none_kept": [s for s in SCOPES if s not in best],
            "consistency": _consistency(task, baseline_dirs, eval_dirs),
        })
    return {"tasks": tasks, "keep": KEEP, "bench": _bench(bench_path)}


def _semantics_table(rows: pd.DataFrame, points: Mapping[str, dict]) -> list[dict]:
    """The same grid point under each semantics side by side: score % and executed FLOPs."""
    places: dict[tuple, dict[str, Any]] = {}  # (mode, scope, interval, start, dropped) -> semantics -> row
    for row in rows[rows["skip_mode"] != NO_SKIP].itertuples(index=False):
        place = (row.skip_mode, row.skip_scope, row.skip_interval, row.start_layer, points[row.point]["num_dropped"])
        places.setdefault(place, {})[row.skip_semantics] = row
    out = []
    for by in places.values():
        if len(by) < 2:
            continue
        first = next(iter(by.values()))
        cells = {"mode": first.skip_mode, "scope": _fmt(first.skip_scope), "interval": _fmt(first.skip_interval),
                 "start_layer": _fmt(first.start_layer)}
        if first.skip_mode == "drop_last":
            cells["interval"] = f"{points[first.point]['num_dropped']} dropped"
        for name, row in by.items():
            point = points[row.point]
            cells[name] = {"layers": _point_cells(row, point)["layers"], "pct": _fmt(row.pct_of_baseline, 1),
                           "prefill": _fmt(row.prefill_flops_fraction), "decode": _fmt(row.decode_flops_fraction)}
        out.append(cells)
    return out


def _consistency(task: str, baseline_dirs: Sequence[Path], eval_dirs: Sequence[Path]) -> str | None:
    """Does the baseline decode (the skip engine, results/baseline/{task}) give the baseline
    evaluation's predictions (Hugging Face generate, results/eval/{task}/multimodal)?"""
    hf_dir = next((Path(d) for d in eval_dirs if Path(d).parts[-2:] == (task, MULTIMODAL)), None)
    engine_dir = next((Path(d) for d in baseline_dirs if Path(d).name == task), None)
    if hf_dir is None or engine_dir is None or not (hf_dir / "predictions.json").is_file() \
            or not (engine_dir / "predictions.json").is_file():
        return None
    engine = read_json(engine_dir / "predictions.json")
    hf = read_json(hf_dir / "predictions.json")["items"]
    id_key = get_task(task).format.id_field
    hf_of = {item[id_key]: item["prediction"] for item in hf}
    same = sum(hf_of.get(i) == p for i, p in zip(engine["ids"], engine["predictions"]))
    return f"{same} of {len(engine['predictions'])}"


def _bench(bench_path: Path | None) -> dict | None:
    if bench_path is None or not Path(bench_path).is_file():
        return None
    bench = read_json(bench_path)
    shapes = []
    for batch, rows in bench["shapes"].items():
        for name, row in rows.items():
            growth = row.get("growth", {})
            shapes.append({"batch": batch, "name": name, "ms": _fmt(row["decode_ms_per_token"], 2),
                           "growth": _fmt(growth.get("ratio"), 2), "allowed": _fmt(growth.get("allowed_ratio"), 2),
                           "tokens_per_s": _fmt(row["tokens_per_s"], 1),
                           "speedup": _fmt(row.get("speedup"), 2),
                           "ideal": _fmt(row.get("flop_ideal_speedup"), 2),
                           "efficiency": _fmt(row.get("efficiency"), 2),
                           "roofline": _fmt(row.get("roofline_fraction"), 3),
                           "layers": ", ".join(map(str, row.get("layers", []))) or (
                               f"last {row['num_dropped']}" if row.get("num_dropped") else "\u2013")})
    evaluation = [{"task": task, "n": r["num_examples"], "identical": r["identical_outputs"],
                   "b1": _fmt(r["batch_1"]["examples_per_s"], 1),
                   "bn": _fmt(r[f"batch_{bench['config']['eval_batch_size']}"]["examples_per_s"], 1),
                   "ratio": _fmt(r["throughput_ratio"], 1)}
                  for task, r in bench.get("batched_evaluation", {}).items()]  # absent from bench_engine's JSON
    bars = [{"bar": bar["bar"], "met": bar["met"],
             "values": ", ".join(f"{k}: {_fmt(v, 3) if isinstance(v, float) else v}" for k, v in bar["values"].items())}
            for bar in bench["bars"]]
    return {"config": bench["config"], "machine": bench["machine"], "shapes": shapes, "evaluation": evaluation,
            "bandwidth": _fmt(bench["machine"].get("measured_bandwidth_gb_per_s"), 1),
            "bars": bars, "all_met": bench["all_met"], "eval_batch_size": bench["config"].get("eval_batch_size")}

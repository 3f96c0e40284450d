"""The report's training-with-compression section: inference-only compression against a mapper
trained with the same compression, and the smaller LLM, per task (``results/trained/{task}``).

Every score is a percentage of the baseline (the dense LLM with the baseline mapper, ``points[0]``,
key ``baseline``) on the same examples; the trained mappers are also compared with the dense
control, the mapper given the same training on the uncompressed LLM (``dense/trained``). The
section's scores, percentages and parameter counts are the frame's rows (family ``trained``); the skipped layers and ``train_init`` come from the metrics.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from mmskip.evaluation import BASELINE
from mmskip.report.records import RunFamily, headline_rows, read_runs
from mmskip.tasks import headline

FAMILY = "trained"
COMPRESSION = {BASELINE: "none", "dense": "none", "pruned": "wanda", "skipped": "skip_block", "small": "smaller_llm"}
COMPARED = ("pruned", "skipped")  # inference-only vs trained
# the points of each variant (params train_compressed.variants), after the baseline's
VARIANT_POINTS = {"dense": ("dense/trained",), **{v: (f"{v}/inference_only", f"{v}/trained") for v in COMPARED},
                  "small": ("small/trained",)}


def points_of(variants: Sequence[str]) -> tuple[str, ...]:
    """Every point a run of ``variants`` holds: the baseline's, then each variant's."""
    return (BASELINE, *(k for v in VARIANT_POINTS if v in variants for k in VARIANT_POINTS[v]))


TRAINED_RUNS = RunFamily("training with compression", None, ("num_examples", "train_init"))


def read_trained_runs(trained_dirs: Sequence[Path]) -> dict[str, dict]:
    """task -> metrics.json of ``results/trained/{task}``."""
    runs = read_runs(trained_dirs, TRAINED_RUNS)
    for task, metrics in runs.items():
        path = metrics["_dir"] / "metrics.json"
        keys = [p["key"] for p in metrics["points"]]
        # a run of an earlier version, without "variants", trained them all
        variants = list(metrics.get("variants", VARIANT_POINTS))
        unknown = [v for v in variants if v not in VARIANT_POINTS]
        if unknown:
            raise ValueError(f"{path}: unknown variant(s) {unknown}; allowed {list(VARIANT_POINTS)}")
        missing = [k for k in points_of(variants) if k not in keys]
        if missing:
            raise ValueError(f"{path}: missing point(s) {missing}; rerun evaluate_trained")
        runs[task] = {**metrics, "variants": variants}
    return runs


def trained_rows(runs: Mapping[str, dict]) -> list[dict]:
    """``summary.csv`` rows (family ``trained``): one per task x point x metric."""
    rows = []
    for task in sorted(runs):
        run = runs[task]
        baseline = run["points"][0]
        for point in run["points"]:
            for metric, score in sorted(point["scores"].items()):
                base = baseline["scores"].get(metric)
                rows.append({
                    "task": task, "modality": run.get("modality", "image"), "family": FAMILY, "metric": metric,
                    "score": score, "pct_of_baseline": 100.0 * score / base if base else None,
                    "num_examples": run["num_examples"], "compression": COMPRESSION[point["variant"]],
                    "sparsity": point["sparsity"], "trained_with_compression": point["trained_with_compression"],
                    "llm_params": point["llm_params"],
                    "skip_mode": "skip_block" if point["variant"] == "skipped" else None,
                    "skip_scope": "all" if point["variant"] == "skipped" else None,
                    "skipped_blocks": len(point["skip_layers"]) if point["variant"] == "skipped" else None,
                    "decode_flops_fraction": point["decode_flops_fraction"],
                    "prefill_flops_fraction": point["prefill_flops_fraction"], "point": point["key"]})
    return rows


def _params_figure(frame: pd.DataFrame, tasks: Sequence[str]) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mmskip.report.build import _figure_uri

    figure = Figure(figsize=(5.5, 3.4))
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for task in tasks:
        rows = headline_rows(frame, FAMILY, task).set_index("point").loc[[BASELINE, "small/trained"]]
        rows = rows[rows["pct_of_baseline"].notna()]
        xy = sorted(zip(rows["llm_params"], rows["pct_of_baseline"]))
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=f"{task} ({headline(task)})")
    ax.set_xscale("log")
    ax.set_xlabel("LLM parameters")
    ax.set_ylabel("% of the default LLM")
    ax.legend(fontsize=8, frameon=False)
    figure.tight_layout()
    return _figure_uri(figure)


def _one(value: float | None, spec: str = ".1f") -> str:
    return "\u2013" if value is None else format(value, spec)


def trained_section(frame: pd.DataFrame, runs: Mapping[str, dict]) -> dict:
    """Template context: per task, inference-only vs trained per compression, and LLM size; the frame's
    headline rows of family ``trained``, by point key."""
    tasks = []
    for task in sorted(runs):
        rows = headline_rows(frame, FAMILY, task).set_index("point")
        pct = rows["pct_of_baseline"]  # None: the baseline's score is 0
        variants = runs[task]["variants"]
        skip_layers = {p["key"]: p["skip_layers"] for p in runs[task]["points"]}
        control = pct["dense/trained"] if "dense" in variants else None  # None: not trained in this run
        compared = []
        for variant in (v for v in COMPARED if v in variants):
            key = f"{variant}/trained"
            inference, trained = pct[f"{variant}/inference_only"], pct[key]
            gain = None if inference is None or trained is None else trained - inference
            what = (f"Wanda {rows.at[key, 'sparsity']:.3f} sparsity" if variant == "pruned"
                    else f"skip_block on layers {', '.join(map(str, skip_layers[key]))}, all tokens")
            compared.append({"variant": variant, "what": what, "inference": _one(inference),
                             "trained": _one(trained), "gain": _one(gain, "+.1f"),
                             "of_control": f"{100 * trained / control:.1f}" if control else "n/a",
                             "better": gain is not None and gain > 0})
        sizes = [{"what": "default LLM, baseline mapper", "params": rows.at[BASELINE, "llm_params"],
                  "score": f"{rows.at[BASELINE, 'score']:.3f}", "pct": _one(pct[BASELINE])}]
        if "small" in variants:
            sizes.append({"what": "smaller LLM, its own mapper", "params": rows.at["small/trained", "llm_params"],
                          "score": f"{rows.at['small/trained', 'score']:.3f}", "pct": _one(pct["small/trained"])})
        tasks.append({"task": task, "metric": headline(task), "num_examples": rows.at[BASELINE, "num_examples"],
                      "dense": f"{rows.at[BASELINE, 'score']:.3f}",
                      "control": f"{rows.at['dense/trained', 'score']:.3f}" if "dense" in variants else None,
                      "control_pct": _one(control), "compared": compared, "sizes": sizes,
                      "variants": ", ".join(variants)})
    init = sorted({r["train_init"] for r in runs.values()})
    small = sorted(t for t in runs if "small" in runs[t]["variants"])
    return {"tasks": tasks, "train_init": ", ".join(init), "figure": _params_figure(frame, small) if small else None}

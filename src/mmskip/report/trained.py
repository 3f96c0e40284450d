"""The report's training-with-compression section: inference-only compression against a mapper
trained with the same compression, and the smaller LLM, per task (``results/trained/{task}``).

Every score is a percentage of the dense LLM with the baseline mapper on the same examples; the
trained mappers are also compared with the dense control, the mapper given the same training on
the uncompressed LLM (``dense/trained``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from mmskip.io import read_json
from mmskip.tasks import headline

VARIANT = "trained"
COMPRESSION = {"dense": "none", "pruned": "wanda", "skipped": "skip_block", "small": "smaller_llm"}
COMPARED = ("pruned", "skipped")  # inference-only vs trained
POINTS = ("dense", "dense/trained", *(f"{v}/{how}" for v in COMPARED for how in ("inference_only", "trained")),
          "small/trained")  # every point the section reads


def read_trained_runs(trained_dirs: Sequence[Path]) -> dict[str, dict]:
    """task -> metrics.json of ``results/trained/{task}``."""
    runs = {}
    for d in map(Path, trained_dirs):
        path = d / "metrics.json"
        if not path.is_file():
            raise ValueError(f"{path}: metrics.json not found")
        metrics = read_json(path)
        missing = [k for k in ("task", "points", "num_examples", "train_init") if k not in metrics]
        if missing:
            raise ValueError(f"{path}: missing required key(s) {missing}")
        keys = [p["key"] for p in metrics["points"]]
        if not keys or keys[0] != "dense":
            raise ValueError(f"{path}: the first point must be the dense reference; got {keys[:1]}")
        missing = [k for k in POINTS if k not in keys]
        if missing:
            raise ValueError(f"{path}: missing point(s) {missing}; rerun evaluate_trained")
        runs[metrics["task"]] = metrics
    return runs


def trained_rows(runs: Mapping[str, dict]) -> list[dict]:
    """``summary.csv`` rows (variant ``trained``): one per task x point x metric."""
    rows = []
    for task in sorted(runs):
        run = runs[task]
        dense = run["points"][0]
        for point in run["points"]:
            for metric, score in sorted(point["scores"].items()):
                base = dense["scores"].get(metric)
                rows.append({
                    "task": task, "modality": run.get("modality", "image"), "variant": VARIANT, "metric": metric,
                    "score": score, "pct_of_baseline": 100.0 * score / base if base else None,
                    "num_examples": run["num_examples"], "compression": COMPRESSION[point["variant"]],
                    "sparsity": point["sparsity"], "trained_with_compression": point["trained_with_compression"],
                    "llm_params": point["llm_params"],
                    "skip_mode": "skip_block" if point["variant"] == "skipped" else None,
                    "skip_scope": "all" if point["variant"] == "skipped" else None,
                    "skipped_blocks": len(point["skip_layers"]) if point["variant"] == "skipped" else None,
                    "decode_flops_fraction": point["decode_flops_fraction"],
                    "prefill_flops_fraction": point["prefill_flops_fraction"]})
    return rows


def _params_figure(runs: Mapping[str, dict]) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mmskip.report.build import _figure_uri

    figure = Figure(figsize=(5.5, 3.4))
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for task in sorted(runs):
        metric = headline(task)
        points = {p["key"]: p for p in runs[task]["points"]}
        base = points["dense"]["scores"][metric]
        xy = sorted((p["llm_params"], 100 * p["scores"][metric] / base if base else 0.0)
                    for key, p in points.items() if key in ("dense", "small/trained"))
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=f"{task} ({metric})")
    ax.set_xscale("log")
    ax.set_xlabel("LLM parameters")
    ax.set_ylabel("% of the default LLM")
    ax.legend(fontsize=8, frameon=False)
    figure.tight_layout()
    return _figure_uri(figure)


def trained_section(runs: Mapping[str, dict]) -> dict:
    """Template context: per task, inference-only vs trained per compression, and LLM size."""
    tasks = []
    for task in sorted(runs):
        metric = headline(task)
        points = {p["key"]: p for p in runs[task]["points"]}
        base = points["dense"]["scores"][metric]

        def pct(key):
            return 100 * points[key]["scores"][metric] / base if base else 0.0

        control = pct("dense/trained")
        compared = []
        for variant in COMPARED:
            inference, trained = pct(f"{variant}/inference_only"), pct(f"{variant}/trained")
            p = points[f"{variant}/trained"]
            what = (f"Wanda {p['sparsity']:.3f} sparsity" if variant == "pruned"
                    else f"skip_block on layers {', '.join(map(str, p['skip_layers']))}, all tokens")
            compared.append({"variant": variant, "what": what, "inference": f"{inference:.1f}",
                             "trained": f"{trained:.1f}", "gain": f"{trained - inference:+.1f}",
                             "of_control": f"{100 * trained / control:.1f}" if control else "n/a",
                             "better": trained > inference})
        sizes = [{"what": "default LLM, baseline mapper", "params": points["dense"]["llm_params"],
                  "score": f"{base:.3f}", "pct": "100.0"},
                 {"what": "smaller LLM, its own mapper", "params": points["small/trained"]["llm_params"],
                  "score": f"{points['small/trained']['scores'][metric]:.3f}", "pct": f"{pct('small/trained'):.1f}"}]
        tasks.append({"task": task, "metric": metric, "num_examples": runs[task]["num_examples"],
                      "dense": f"{base:.3f}", "control": f"{points['dense/trained']['scores'][metric]:.3f}",
                      "control_pct": f"{control:.1f}", "compared": compared, "sizes": sizes})
    init = sorted({r["train_init"] for r in runs.values()})
    return {"tasks": tasks, "train_init": ", ".join(init), "figure": _params_figure(runs)}

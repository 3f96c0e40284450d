"""The token-level grid's records (``results/tokens/{task}/{kind}``, ``mmskip evaluate_tokens``) in the report.

Each kind's ``metrics.json`` holds the baseline's point first (the same in every kind of a task), then the
kind's points: visual tokens leaving after a layer (``visual_exit``), FastV's pruning (``fastv``) and the
entropy early exit of generated tokens (``early_exit``). Rows of the frame have family ``tokens``; the point's
decode time is read against the token engine's own with nothing leaving, timed in the same job
(``timing.json``: ``reference_ms_per_step``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from mmskip.report.records import RunFamily, headline_rows, read_runs
from mmskip.tasks import headline

FAMILY = "tokens"
TOKEN_COLUMNS = ("token_kind", "token_layer", "visual_keep", "exit_rate", "exit_threshold", "exited_fraction",
                 "decode_time_fraction")
KIND_NAMES = {"visual_exit": "visual-token exit", "fastv": "FastV", "early_exit": "early exit"}


TOKEN_RUNS = RunFamily("token grid", "kind", ("kind", "num_examples"))


def read_token_runs(token_dirs: Sequence[Path]) -> dict[str, dict[str, dict]]:
    """task -> kind -> metrics.json (with ``timing``: timing.json, or {}); every kind's ``points[0]`` is the
    baseline, the same (examples, scores) in every kind of a task."""
    return read_runs(token_dirs, TOKEN_RUNS)


def token_rows(runs: Mapping[str, Mapping[str, dict]]) -> list[dict]:
    """One summary row per task x token point x metric (family ``tokens``); the baseline's point is the skip
    grid's and the evaluation's, not repeated here."""
    rows = []
    for task in sorted(runs):
        for kind in sorted(runs[task]):
            run = runs[task][kind]
            reference = run["points"][0]["scores"]
            timing = run["timing"]
            ref_ms = timing.get("reference_ms_per_step")
            for point in run["points"][1:]:
                ms = timing.get("points", {}).get(point["key"], {}).get("decode", {}).get("ms_per_step")
                for metric, score in sorted(point["scores"].items()):
                    base = reference.get(metric)
                    rows.append({
                        "task": task, "modality": run.get("modality", "image"), "family": FAMILY, "metric": metric,
                        "score": score, "pct_of_baseline": 100.0 * (score / base) if base else None,
                        "token_kind": kind, "token_layer": point["layer"], "visual_keep": point.get("keep"),
                        "exit_rate": point.get("exit_rate"), "exit_threshold": point.get("threshold"),
                        "exited_fraction": point.get("exited_fraction"),
                        "decode_flops_fraction": point["decode_flops_fraction"],
                        "prefill_flops_fraction": point["prefill_flops_fraction"], "decode_ms_per_token": ms,
                        "decode_time_fraction": ms / ref_ms if ms is not None and ref_ms else None,
                        "num_examples": run["num_examples"], "point": point["key"]})
    return rows


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "\u2013"
    return f"{float(value):.{digits}f}"


def tokens_section(frame: pd.DataFrame, runs: Mapping[str, Mapping[str, dict]]) -> list[dict]:
    """Per task: its headline metric, examples, the token engine's agreement with the baseline, and a row per
    point (kind, layer, kept fraction or exit rate, threshold, share exited, FLOPs, time, % of the baseline)."""
    out = []
    for task in sorted(runs):
        rows = headline_rows(frame, FAMILY, task)
        any_run = next(iter(runs[task].values()))
        table = [{"point": r["point"], "kind": KIND_NAMES.get(r["token_kind"], r["token_kind"]),
                  "layer": r["token_layer"],
                  "setting": (f"keep {float(r['visual_keep']):g}" if r["token_kind"] == "fastv"
                              else f"rate {float(r['exit_rate']):g}" if r["token_kind"] == "early_exit" else "\u2013"),
                  "threshold": _fmt(r["exit_threshold"]), "exited": _fmt(r["exited_fraction"]),
                  "prefill": _fmt(r["prefill_flops_fraction"]), "decode": _fmt(r["decode_flops_fraction"]),
                  "time": _fmt(r["decode_time_fraction"], 2), "score": _fmt(r["score"]),
                  "pct": _fmt(r["pct_of_baseline"], 1)} for _, r in rows.iterrows()]
        out.append({"task": task, "metric": headline(task), "num_examples": any_run["num_examples"],
                    "baseline": _fmt(any_run["points"][0]["scores"].get(headline(task))),
                    "agree": any_run.get("same_as_baseline"), "num_visual": any_run.get("num_visual_tokens"),
                    "layers": any_run.get("num_layers"), "rows": table})
    return out

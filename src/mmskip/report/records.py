"""Every result row of the pipeline as one tidy pandas frame.

The runners write typed records (metrics.json points); the report turns each family's records
into rows of the same columns (``SUMMARY_COLUMNS``: task, modality, family, metric, score,
pct_of_baseline, then the family's own fields, empty where they do not apply), plus ``point``: the
key of the record's point in its ``metrics.json`` (empty for evaluation rows), which the report's
sections use to find what a table shows beside the scores (a skip plan's layers, a mask's target
sparsity). ``summary.csv`` (every column but ``point``), the HTML report's score tables and the
plots' data are views of this one frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from mmskip.evaluation import BASELINE
from mmskip.io import atomic_path, read_json
from mmskip.tasks import TASKS, headline


@dataclass(frozen=True)
class RunFamily:
    """How :func:`read_runs` reads one family's run folders.

    ``name`` names the family in messages; ``key`` is the metrics field that tells a task's runs apart (a skip mode,
    a token kind, a mask set; None: one run per task); ``required`` the fields every run holds. The first point is
    the baseline: its ``baseline_field`` is ``baseline_value`` (``baseline_label`` names that field in messages).
    ``same_baseline``: every run of a task compares with the same baseline (examples and scores), which is checked.
    """

    name: str
    key: str | None
    required: tuple[str, ...]
    baseline_field: str = "key"
    baseline_value: str = BASELINE
    baseline_label: str = "key"
    same_baseline: bool = True


def read_runs(folders: Sequence[Path], family: RunFamily) -> dict[str, Any]:
    """task -> run name (the ``key`` field's value) -> the folder's ``metrics.json``, or task -> ``metrics.json``
    where the family has one run per task. Each run gains ``timing`` (the folder's ``timing.json``, {} where there
    is none) and ``_dir`` (its folder). Refuses, naming the file: a missing ``metrics.json``, one that is not an
    object or lacks a required field, a first point that is not the baseline, a run that appears twice, and
    (``same_baseline``) a task whose runs' baselines differ."""
    runs: dict[str, Any] = {}
    for folder in map(Path, folders):
        path = folder / "metrics.json"
        if not path.is_file():
            raise ValueError(f"{path}: metrics.json not found")
        metrics = read_json(path)
        if not isinstance(metrics, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(metrics).__name__}")
        missing = [k for k in ("task", "points", *family.required) if k not in metrics]
        if missing:
            raise ValueError(f"{path}: missing required key(s) {missing}")
        points = metrics["points"]
        first = points[0] if isinstance(points, list) and points and isinstance(points[0], dict) else {}
        if first.get(family.baseline_field) != family.baseline_value:
            raise ValueError(f"{path}: points[0] must be the baseline ({family.baseline_label} "
                             f"{family.baseline_value!r}); got {first.get('key')!r}")
        timing = folder / "timing.json"
        metrics["timing"] = read_json(timing) if timing.is_file() else {}
        metrics["_dir"] = folder
        task = metrics["task"]
        name = f"task={task!r}" + (f" {family.key}={metrics[family.key]!r}" if family.key else "")
        if family.key is None:
            if task in runs:
                raise ValueError(f"{path}: {name} appears twice (also in {runs[task]['_dir']})")
            runs[task] = metrics
            continue
        task_runs = runs.setdefault(task, {})
        if metrics[family.key] in task_runs:
            raise ValueError(f"{path}: {name} appears twice (also in {task_runs[metrics[family.key]]['_dir']})")
        task_runs[metrics[family.key]] = metrics
    if family.same_baseline and family.key is not None:
        for task, task_runs in runs.items():
            baselines = {k: (run["num_examples"], run["points"][0]["scores"]) for k, run in task_runs.items()}
            if len({repr(b) for b in baselines.values()}) > 1:
                raise ValueError(f"{family.name} of task {task!r}: the {family.key}s' baselines differ (examples, "
                                 f"scores): {baselines}")
    return runs


def tidy_frame(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    """One row per record, ``columns`` in order; values kept as they are (object dtype: an
    integer column with gaps stays integer, a float keeps its exact repr)."""
    unknown = sorted({k for row in rows for k in row} - set(columns))
    if unknown:
        raise ValueError(f"record fields {unknown} are not summary columns; known: {list(columns)}")
    return pd.DataFrame([[row.get(c) for c in columns] for row in rows], columns=list(columns), dtype=object)


def headline_rows(frame: pd.DataFrame, family: str, task: str | None = None) -> pd.DataFrame:
    """The rows of ``family`` (of one ``task``, or of every task) that hold their task's headline
    metric, in frame order."""
    rows = frame[frame["family"] == family]
    if task is not None:
        rows = rows[rows["task"] == task]
    return rows[rows["metric"] == rows["task"].map(lambda t: headline(t) if t in TASKS else None)]


def with_percentage(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows with a percentage of the baseline (none where the baseline scored 0: no percentage of a zero score)."""
    return rows[pd.to_numeric(rows["pct_of_baseline"], errors="coerce").notna()]


def to_csv_text(frame: pd.DataFrame) -> str:
    """CSV with a header, ``\\n`` line ends, floats as their repr (round-trip exact), None empty."""
    return frame.to_csv(index=False, lineterminator="\n", na_rep="")


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(to_csv_text(frame), encoding="utf-8")

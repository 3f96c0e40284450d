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

from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from mmskip.io import atomic_path
from mmskip.tasks import TASKS, headline


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

"""Every result row of the pipeline as one tidy pandas frame.

The runners write typed records (metrics.json points); the report turns each family's records
into rows of the same columns (``SUMMARY_COLUMNS``: task, modality, variant, metric, score,
pct_of_baseline, then the family's own fields, empty where they do not apply). ``summary.csv``
and the plot tables of ``dvc plots show`` are views of this one frame.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from mmskip.io import atomic_path


def tidy_frame(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    """One row per record, ``columns`` in order; values kept as they are (object dtype: an
    integer column with gaps stays integer, a float keeps its exact repr)."""
    unknown = sorted({k for row in rows for k in row} - set(columns))
    if unknown:
        raise ValueError(f"record fields {unknown} are not summary columns; known: {list(columns)}")
    return pd.DataFrame([[row.get(c) for c in columns] for row in rows], columns=list(columns), dtype=object)


def to_csv_text(frame: pd.DataFrame) -> str:
    """CSV with a header, ``\\n`` line ends, floats as their repr (round-trip exact), None empty."""
    return frame.to_csv(index=False, lineterminator="\n", na_rep="")


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(to_csv_text(frame), encoding="utf-8")

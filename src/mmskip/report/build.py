"""Report stage: tidy ``summary.csv`` and one self-contained ``reports/all.html``.

The HTML makes no network requests: CSS is inline, images (plots and scene thumbnails) are
base64 PNG data URIs, and every piece of dataset or model text goes through Jinja2
autoescaping. The same inputs give a byte-identical CSV and HTML (no timestamps, sorted
keys, PNGs written without a ``Software`` tag).
"""

from __future__ import annotations

import base64
import collections
import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import numpy as np
import pandas as pd
import yaml
from PIL import Image

from mmskip.data.formats import AUDIO, VIDEOS, split_images
from mmskip.io import atomic_dir, atomic_path, read_json, write_json
from mmskip.report.lineage import lineage as read_lineage
from mmskip.report.records import headline_rows, tidy_frame, to_csv_text, write_csv as write_frame_csv
from mmskip.report.findings import FAILS, HOLDS, findings
from mmskip.report.frontier import COSTS, frontier_points, frontier_section, headline_rows_of
from mmskip.report.trained import read_trained_runs, trained_rows, trained_section
from mmskip.report.compression import (COMPRESS_COLUMNS, compress_rows, compression_section, read_compress_runs,
                                       read_subnet)
from mmskip.report.tokens import TOKEN_COLUMNS, read_token_runs, token_rows, tokens_section
from mmskip.report.skipping import (KEEP, LLAVA_FAMILY, SKIP_COLUMNS, llava_run_cells, read_llava_runs, read_skip_runs,
                                    skip_rows, skipping_section)
from mmskip.evaluation import BASELINE, BLIND, MULTIMODAL
from mmskip.tasks import VQA, get_task, headline

SUMMARY_COLUMNS = ("task", "modality", "family", "metric", "score", "pct_of_baseline", *SKIP_COLUMNS,
                   *TOKEN_COLUMNS, *COMPRESS_COLUMNS)
FRAME_COLUMNS = (*SUMMARY_COLUMNS, "point")  # point: the record's key in its metrics.json, not in summary.csv
# the family of an evaluation's rows: the multimodal input is the baseline, the blind input its own family
FAMILY_OF_INPUT = {MULTIMODAL: BASELINE, BLIND: BLIND}
THUMBNAIL_WIDTH = 144  # px; scenes are tiny (48 px), so upscale with nearest neighbour
FOUNDATION_MODELS = ("llm", "encoder", "video_encoder", "audio_encoder")  # results/foundation/{name}.json
# pretrained for the embedded video or audio tasks alone: a column where it was
OPTIONAL_FOUNDATION = ("video_encoder", "audio_encoder")
# Keys shown first in the mapper / foundation tables when present; the rest follow sorted.
PREFERRED_KEYS = ("params", "trainable_params", "final_loss", "loss", "heldout_perplexity",
                  "heldout_accuracy", "heldout_object_accuracy", "steps", "seconds")
SPICE_NOTE = ("SPICE is off by default because it downloads Stanford CoreNLP; enable with "
              "`evaluation.spice: true` in params.yaml (`mmskip evaluate --spice`).")
TOKENIZER_NOTE = ("Captions are scored with pycocoevalcap (BLEU-4, METEOR, ROUGE-L, CIDEr); "
                  "predictions and references are first tokenized with its PTB tokenizer "
                  "(PTBTokenizer), as in the COCO caption evaluation.")
NO_BENCHMARKS_NOTE = "not available (run through DVC)"
SEEDS_NOISE = ("Each task's mapper was trained with {n} seeds (params seeds): its spread is the largest minus the "
               "smallest baseline score over them, in points of % of the first seed's score. A verdict holds or fails "
               "only beyond it; a margin within it is not tested. The LLM, the encoders and the families' points are "
               "the first seed's.")
FINDINGS_NOISE = ("Each model was trained once (one seed), so the spread over seeds is not measured: a margin of a "
                  "few points decides nothing (floats alone move a VQA accuracy by a few points between machines).")
# Plot data for `dvc plots show` (dvc.yaml's top-level plots): headline metric per task only.
PLOT_TABLES = {
    "skipping": ("task", "skip_mode", "skip_semantics", "skip_scope", "skip_interval", "start_layer", "decode_flops_fraction",
                 "prefill_flops_fraction", "pct_of_baseline"),
    "compression": ("task", "compression", "sparsity_pattern", "calibration", "sparsity", "pct_of_baseline"),
}


# --------------------------------------------------------------------------- summary.csv

def _family_order(family: str) -> tuple[bool, str]:
    return (family != BASELINE, family)


def _read_metrics(metrics_path: Path) -> dict[str, Any]:
    """Read one evaluate ``metrics.json`` and check the keys the report relies on."""
    if not metrics_path.is_file():
        raise ValueError(f"{metrics_path}: metrics.json not found")
    metrics = read_json(metrics_path)
    if not isinstance(metrics, dict):
        raise ValueError(f"{metrics_path}: expected a JSON object, got {type(metrics).__name__}")
    required = ["task", "modality", "input", "split", "scores"]
    breakdown = get_task(metrics["task"]).format.breakdown if "task" in metrics else None  # VQA: per_question_type
    if breakdown:
        required.append(breakdown)
    missing = [key for key in required if key not in metrics]
    if missing:
        raise ValueError(f"{metrics_path}: missing required key(s) {missing}; "
                         f"required: {required}")
    for key in ("scores", *([breakdown] if breakdown else [])):
        table = metrics.get(key, {})
        if not isinstance(table, dict) or (key == "scores" and not table):
            raise ValueError(f"{metrics_path}: '{key}' must be a non-empty object of numbers")
        for name, value in table.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{metrics_path}: {key}[{name!r}] = {value!r} is not a number")
    if headline(metrics["task"]) not in metrics["scores"]:
        raise ValueError(f"{metrics_path}: 'scores' lacks {metrics['task']}'s headline metric "
                         f"{headline(metrics['task'])!r}; has {sorted(metrics['scores'])}")
    return metrics


def _task_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Metric name -> score: every key of ``scores``, plus ``accuracy/<question_type>``."""
    values = {name: float(score) for name, score in metrics["scores"].items()}
    for question_type, score in metrics.get("per_question_type", {}).items():
        values[f"accuracy/{question_type}"] = float(score)
    return values


def _summary_rows(eval_dirs: Sequence[Path]) -> tuple[list[dict], dict[tuple[str, str], dict]]:
    """Tidy rows (sorted) and the parsed metrics keyed by (task, family): an evaluation of input
    ``multimodal`` is the family ``baseline``, one of input ``blind`` the family ``blind``."""
    if not eval_dirs:
        raise ValueError("no evaluation folders given; expected results/eval/{task}/{input}")
    by_run: dict[tuple[str, str], dict] = {}
    for eval_dir in eval_dirs:
        metrics_path = Path(eval_dir) / "metrics.json"
        metrics = _read_metrics(metrics_path)
        if metrics["input"] not in FAMILY_OF_INPUT:
            raise ValueError(f"{metrics_path}: input={metrics['input']!r}: allowed {list(FAMILY_OF_INPUT)}")
        key = (str(metrics["task"]), FAMILY_OF_INPUT[metrics["input"]])
        if key in by_run:
            raise ValueError(f"{metrics_path}: task={key[0]!r} input={metrics['input']!r} appears twice "
                             f"(also in {by_run[key]['_path']})")
        by_run[key] = {**metrics, "_path": metrics_path, "_dir": Path(eval_dir)}

    rows = []
    for (task, family), metrics in by_run.items():
        baseline = by_run.get((task, BASELINE))
        baseline_scores = _task_metrics(baseline) if baseline else {}
        for metric, score in _task_metrics(metrics).items():
            base = baseline_scores.get(metric)
            # None: no baseline, or baseline is 0. Divide first: 100 * x / x is not always 100.0.
            pct = 100.0 * (score / base) if base else None
            rows.append({"task": task, "modality": str(metrics["modality"]), "family": family,
                         "metric": metric, "score": score, "pct_of_baseline": pct})
    rows.sort(key=lambda r: (r["task"], *_family_order(r["family"]), r["metric"]))
    return rows, by_run


def summary_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The tidy frame of every result row (``FRAME_COLUMNS``)."""
    return tidy_frame(rows, FRAME_COLUMNS)


def _write_csv(frame: pd.DataFrame, csv_path: Path) -> None:
    """``summary.csv``: the frame without its ``point`` column."""
    write_frame_csv(frame[list(SUMMARY_COLUMNS)], csv_path)


def _write_plot_tables(frame: pd.DataFrame, plots_dir: Path) -> None:
    """``{plots_dir}/{skipping,compression}.csv``: the headline metric's rows of those families."""
    with atomic_dir(plots_dir) as tmp:
        for name, columns in PLOT_TABLES.items():
            family = {"skipping": "skip", "compression": "compress"}[name]
            table = headline_rows(frame, family)[list(columns)]
            (tmp / f"{name}.csv").write_text(to_csv_text(table), encoding="utf-8")


def write_summary(eval_dirs: Sequence[Path], csv_path: Path) -> list[dict]:
    """Write the tidy ``summary.csv`` from evaluate folders; return its rows.

    One row per task x family x metric, sorted by task, family (baseline first), metric.
    ``score`` is a float; ``pct_of_baseline`` is ``100 * score / baseline score`` for the same
    task and metric, or None (empty in the CSV) without a baseline or with a zero baseline.
    """
    rows, _ = _summary_rows([Path(d) for d in eval_dirs])
    _write_csv(summary_frame(rows), Path(csv_path))
    return rows


# --------------------------------------------------------------------------- timings

def _parse_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:  # Snakemake writes "NA" / "-" where psutil could not measure
        return None
    return value if math.isfinite(value) else None


_WORKER_RSS = re.compile(r"^mmskip\.worker: the job ran in the worker: peak RSS ([0-9.]+) MB", re.M)


def _worker_rss(log: Path | None) -> float | None:
    """The peak RSS (MB) the worker measured for a job (``mmskip.worker.USAGE_LINE`` in its log), if it ran there."""
    if log is None or not log.is_file():
        return None
    found = _WORKER_RSS.findall(log.read_text(encoding="utf-8", errors="replace"))
    return float(found[-1]) if found else None


def read_benchmarks(benchmarks_dir: Path) -> list[dict]:
    """Rows ``{rule, job, seconds, max_rss}`` from ``benchmarks/<rule>/<wildcards>.tsv``.

    ``seconds`` is the mean of column ``s`` over the benchmark repeats, ``max_rss`` (MB) the
    maximum; either is None when not measured. A job run by ``python -m mmskip.worker`` (``make report``) was
    measured by Snakemake as its client process only: its ``max_rss`` is the worker's measure of the job, the last
    usage line of ``logs/<rule>/<wildcards>.log``. Sorted by rule, then job.
    """
    benchmarks_dir = Path(benchmarks_dir)
    rows = []
    for tsv in sorted(benchmarks_dir.rglob("*.tsv")):
        parts = tsv.relative_to(benchmarks_dir).with_suffix("").parts
        rule, job = (parts[0], "/".join(parts[1:])) if len(parts) > 1 else (parts[0], "")
        with open(tsv, encoding="utf-8", newline="") as f:
            records = list(csv.DictReader(f, delimiter="\t"))
        seconds = [v for v in (_parse_number(r.get("s", "")) for r in records) if v is not None]
        rss = [v for v in (_parse_number(r.get("max_rss", "")) for r in records) if v is not None]
        worker_rss = _worker_rss(benchmarks_dir.parent / "logs" / rule / f"{job}.log" if job else None)
        if worker_rss is not None:  # run by `python -m mmskip.worker`: the benchmark measured the client only
            rss = [worker_rss]
        rows.append({"rule": rule, "job": job,
                     "seconds": sum(seconds) / len(seconds) if seconds else None,
                     "max_rss": max(rss) if rss else None})
    rows.sort(key=lambda r: (r["rule"], r["job"]))
    return rows


def print_timings(benchmarks_dir: Path) -> None:
    """Print one line per rule (jobs, total and slowest seconds, peak RSS), slowest rule first."""
    benchmarks_dir = Path(benchmarks_dir)
    if not benchmarks_dir.is_dir():
        print(f"timings: {NO_BENCHMARKS_NOTE}; no folder {benchmarks_dir}")
        return
    per_rule: dict[str, list[dict]] = collections.defaultdict(list)
    for row in read_benchmarks(benchmarks_dir):
        per_rule[row["rule"]].append(row)
    if not per_rule:
        print(f"timings: no benchmark files under {benchmarks_dir}")
        return
    table = []
    for rule, jobs in per_rule.items():
        seconds = [j["seconds"] for j in jobs if j["seconds"] is not None]
        rss = [j["max_rss"] for j in jobs if j["max_rss"] is not None]
        table.append((rule, len(jobs), sum(seconds), max(seconds, default=0.0),
                      max(rss) if rss else None))
    table.sort(key=lambda t: (-t[2], t[0]))
    width = max(len("rule"), *(len(t[0]) for t in table))
    print(f"{'rule':<{width}}  {'jobs':>4}  {'total_s':>10}  {'slowest_s':>10}  {'max_rss_MB':>10}")
    for rule, num_jobs, total, slowest, rss in table:
        rss_text = "-" if rss is None else f"{rss:.1f}"
        print(f"{rule:<{width}}  {num_jobs:>4}  {total:>10.2f}  {slowest:>10.2f}  {rss_text:>10}")
    print(f"{'total':<{width}}  {sum(t[1] for t in table):>4}  {sum(t[2] for t in table):>10.2f}")


# --------------------------------------------------------------------------- formatting

def _format_value(value: Any) -> str:
    """Short, stable text for a scalar or small container from a results JSON."""
    if value is None:
        return "\u2013"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return f"{_format_value(value[-1])} (last of {len(value)})"
    if isinstance(value, (list, dict)):
        text = json.dumps(value, sort_keys=True, ensure_ascii=False)
        return text if len(text) <= 120 else text[:119] + "\u2026"
    return str(value)


def _format_score(value: float | None) -> str:
    """None or NaN (no such row in the frame): a dash."""
    return "\u2013" if pd.isna(value) else f"{value:.4f}"


def _format_pct(value: float | None) -> str:
    return "\u2013" if pd.isna(value) else f"{value:.1f}%"


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _key_order(key: str) -> tuple[int, str]:
    return (PREFERRED_KEYS.index(key) if key in PREFERRED_KEYS else len(PREFERRED_KEYS), key)


def _key_value_table(columns: Mapping[str, Mapping[str, Any] | None]) -> dict:
    """Rows = union of flattened keys, columns = sources (None: file not found)."""
    flat = {name: _flatten(obj) if obj is not None else None for name, obj in columns.items()}
    keys = sorted({k for obj in flat.values() if obj for k in obj}, key=_key_order)
    return {"columns": list(flat),
            "missing": [name for name, obj in flat.items() if obj is None],
            "rows": [{"key": key,
                      "values": [_format_value(obj.get(key)) if obj else "\u2013"
                                 for obj in flat.values()]} for key in keys]}


def _read_optional_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


# --------------------------------------------------------------------------- images

def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _thumbnail_uri(image_path: Path) -> str:
    with Image.open(image_path) as image:
        image = image.convert("RGB")
        height = max(1, round(image.height * THUMBNAIL_WIDTH / image.width))
        image = image.resize((THUMBNAIL_WIDTH, height), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return _png_data_uri(buffer.getvalue())


SPECTROGRAM_RATE, SPECTROGRAM_MELS = 16000, 64  # an audio example's thumbnail: its log-mel spectrogram


def _spectrogram_uri(clip_path: Path) -> str:
    """A clip's log-mel spectrogram (16 kHz, 25 ms windows every 10 ms, 64 mel bands, low frequencies at the
    bottom) as a grey PNG thumbnail: what the audio encoder's filterbank sees."""
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    from mmskip.data.audio import load_audio

    samples = load_audio(clip_path, SPECTROGRAM_RATE)
    mel = mel_filter_bank(num_frequency_bins=257, num_mel_filters=SPECTROGRAM_MELS, min_frequency=20.0,
                          max_frequency=SPECTROGRAM_RATE / 2, sampling_rate=SPECTROGRAM_RATE)
    frames = spectrogram(np.pad(samples, (0, max(0, 400 - len(samples)))), window_function(400, "hann"),
                         frame_length=400, hop_length=160, fft_length=512, power=2.0, mel_filters=mel,
                         log_mel="dB", db_range=80.0)  # (mels, frames)
    low, high = float(frames.min()), float(frames.max())
    grey = ((frames - low) / max(high - low, 1e-6) * 255).astype(np.uint8)[::-1]
    image = Image.fromarray(np.ascontiguousarray(grey), mode="L").resize((THUMBNAIL_WIDTH, SPECTROGRAM_MELS),
                                                                          Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return _png_data_uri(buffer.getvalue())


STRIP_FRAMES = 4  # a video example's thumbnail: this many of its frames, one a second, side by side


def _video_strip_uri(video_path: Path) -> str:
    """A video's first ``STRIP_FRAMES`` sampled frames (one a second, as the encoder sees them) side by side."""
    from mmskip.data.video import load_frames

    frames = load_frames(video_path, STRIP_FRAMES)
    strip = Image.fromarray(np.concatenate(frames, axis=1))
    height = max(1, round(strip.height * THUMBNAIL_WIDTH * 2 / strip.width))
    strip = strip.resize((THUMBNAIL_WIDTH * 2, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    strip.save(buffer, format="PNG")
    return _png_data_uri(buffer.getvalue())


# by a task's modality: the dataset's media folder, what an example is called, and its thumbnail (the image, a
# video's frames, an audio clip's spectrogram)
MEDIA = {"image": ("images", "image", _thumbnail_uri), "video": (VIDEOS, "video", _video_strip_uri),
         "audio": (AUDIO, "clip", _spectrogram_uri)}


def _figure_uri(figure) -> str:
    buffer = io.BytesIO()
    # No "Software" tag: the PNG bytes depend only on the data (deterministic report).
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return _png_data_uri(buffer.getvalue())


def _plain(label: str) -> str:
    """Keep matplotlib from reading ``$...$`` in dataset text as mathtext."""
    return label.replace("$", r"\$")


def _grouped_bars(groups: Sequence[str], families: Sequence[str],
                  values: Mapping[tuple[str, str], float], ylabel: str, title: str,
                  reference: float | None = None) -> str:
    # Agg canvas on a bare Figure: no pyplot global state, no display backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(4.0, 0.9 * len(groups) + 1.5), 3.4))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    width = 0.8 / max(1, len(families))
    colors = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")
    for i, family in enumerate(families):
        xs = [g + (i - (len(families) - 1) / 2) * width for g in range(len(groups))]
        ys = [values.get((group, family), 0.0) for group in groups]
        ax.bar(xs, ys, width=width, label=_plain(family), color=colors[i % len(colors)])
    if reference is not None:
        ax.axhline(reference, color="#444444", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([_plain(g) for g in groups], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(_plain(title), fontsize=10)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return _figure_uri(figure)


def _plots(frame: pd.DataFrame, families: Sequence[str]) -> list[dict]:
    """Bar charts of the evaluation rows of the frame: % of baseline per task and metric (not per
    question type), and VQA accuracy per question type."""
    rows = frame[frame["family"].isin(families)]
    plots = []
    overall = rows[~rows["metric"].str.contains("/", regex=False) & rows["pct_of_baseline"].notna()]
    if not overall.empty:
        group = overall["task"] + ": " + overall["metric"]
        values = dict(zip(zip(group, overall["family"]), overall["pct_of_baseline"]))
        plots.append({"title": "Score as % of the baseline, per task and metric",
                      "uri": _grouped_bars(sorted(set(group)), families, values, "% of baseline",
                                           "% of baseline", reference=100.0)})
    per_type = rows[rows["metric"].str.startswith("accuracy/")]
    if not per_type.empty:
        group = per_type["task"] + ": " + per_type["metric"].str.removeprefix("accuracy/")
        values = dict(zip(zip(group, per_type["family"]), per_type["score"]))
        plots.append({"title": "VQA accuracy per question type",
                      "uri": _grouped_bars(sorted(set(group)), families, values, "accuracy",
                                           "accuracy per question type")})
    return plots


# --------------------------------------------------------------------------- sections

def _results_tables(frame: pd.DataFrame, families: Sequence[str], prefix: str = "") -> list[dict]:
    """Per task: one row per metric starting with ``prefix`` (shown without it), one cell
    (score, pct of baseline) per evaluation family."""
    rows = frame[frame["family"].isin(families) & frame["metric"].str.startswith(prefix)]
    tables = []
    for task, task_rows in rows.groupby("task", sort=True):
        # metric x family; NaN where a family lacks the metric
        scores = task_rows.pivot(index="metric", columns="family", values="score").reindex(columns=families)
        pcts = task_rows.pivot(index="metric", columns="family", values="pct_of_baseline").reindex(columns=families)
        tables.append({"task": task, "modality": task_rows["modality"].iloc[0],
                       "rows": [{"metric": metric.removeprefix(prefix),
                                 "cells": [{"score": _format_score(scores.at[metric, family]),
                                            "pct": _format_pct(pcts.at[metric, family])}
                                           for family in families]}
                                for metric in scores.index]})
    return tables


def _qualitative(by_run: Mapping[tuple[str, str], Mapping[str, Any]], scenes: Path | Mapping[str, Path],
                 num_qualitative: int) -> list[dict]:
    """First ``num_qualitative`` items of the baseline predictions, other families alongside; each task's images
    from its dataset folder (``scenes``: one for every task, or task -> folder)."""
    sections = []
    thumbnails: dict[Path, str] = {}
    for task in sorted({t for t, _ in by_run}):
        if isinstance(scenes, Mapping) and task not in scenes:
            raise ValueError(f"task {task!r} has no dataset folder among {sorted(scenes)}")
        scenes_dir = Path(scenes[task] if isinstance(scenes, Mapping) else scenes)
        families = sorted((v for t, v in by_run if t == task), key=_family_order)
        predictions = {}
        for family in families:
            path = by_run[(task, family)]["_dir"] / "predictions.json"
            data = read_json(path) if path.is_file() else None
            if not isinstance(data, dict) or not isinstance(data.get("items"), list):
                raise ValueError(f"{path}: expected a JSON object with a list 'items'")
            predictions[family] = data["items"]
        spec = get_task(task)
        key_field = spec.format.id_field
        lookup = {v: {item.get(key_field): item for item in items}
                  for v, items in predictions.items()}
        reference = by_run[(task, families[0])]
        split = str(reference["split"])
        items = []
        media, noun, thumbnail = MEDIA[spec.modality]
        try:  # the files a COCO folder's caption file lists, or the scenes' PNGs in their order
            files = dict(split_images(scenes_dir, split, media))
        except FileNotFoundError:  # a folder of images alone: the scenes' names
            files = {}
        for item in predictions[families[0]][:num_qualitative]:
            for field in ("image_id", "prediction"):
                if field not in item:
                    raise ValueError(f"{reference['_dir'] / 'predictions.json'}: an item lacks "
                                     f"'{field}': {item!r}")
            image_path = files.get(int(item["image_id"]),
                                   scenes_dir / "images" / split / f"{int(item['image_id']):06d}.png")
            if not image_path.is_file():
                raise ValueError(f"{noun} {image_path} not found for image_id={item['image_id']}")
            if image_path not in thumbnails:
                thumbnails[image_path] = thumbnail(image_path)
            if spec.format is VQA:  # ten annotator answers: shown with their counts
                counts = collections.Counter(str(a) for a in item.get("answers", []))
                references = [f"{a} \u00d7{n}" if n > 1 else a
                              for a, n in sorted(counts.items(), key=lambda an: (-an[1], an[0]))]
            else:
                references = [str(r) for r in item.get("references", [])]
            matched = [lookup[v].get(item.get(key_field)) for v in families]
            items.append({
                "image_id": int(item["image_id"]),
                "image": thumbnails[image_path],
                "media": noun,
                "question": str(item.get("question", "")),
                "question_type": item.get("question_type"),
                "predictions": ["\u2013" if m is None else str(m.get("prediction", "\u2013"))
                                for m in matched],
                "references": references,
            })
        sections.append({"task": task, "families": families, "items": items,
                         "is_vqa": spec.format is VQA})
    return sections


def _read_params(params_path: Path) -> dict:
    """The params file the run used (read once: shown, checked against the evaluations, and the lineage's)."""
    if not Path(params_path).is_file():
        raise ValueError(f"params file {params_path} not found")
    params = yaml.safe_load(Path(params_path).read_text(encoding="utf-8"))
    if not isinstance(params, dict):
        raise ValueError(f"{params_path}: expected a mapping of sections, "
                         f"got {type(params).__name__}")
    return params


def _params_rows(params: Mapping[str, Any]) -> list[dict]:
    return [{"key": key,
             "value": json.dumps(value, ensure_ascii=False) if isinstance(value, list)
             else _format_value(value)}
            for key, value in _flatten(params).items()]


def _lineage_view(lineage: Mapping[str, Any]) -> dict:
    """The lineage as the template shows it: one block per stage, parameters as key = value."""
    stages = []
    for stage in lineage["stages"]:
        stages.append({
            "name": stage["name"], "cmd": stage["cmd"],
            "params": [f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in sorted(stage["params"].items())],
            "artifacts": [{"role": role, "path": a["path"], "md5": a["md5"] or "\u2013",
                           "size": _format_value(a["size"]), "status": a["status"]}
                          for role, key in (("in", "deps"), ("out", "outs")) for a in stage[key]],
            "upstream": stage["upstream"]})
    code = lineage["code"]
    return {"commit": code["git_commit"] or "\u2013", "dirty": code["dirty"], "code_note": code["note"],
            "dirty_paths": code["dirty_paths"], "versions": sorted(lineage["versions"].items()),
            "machine": _machine_rows(lineage["machine"], lineage["stages"]),
            "dvc_lock": lineage["dvc_lock"], "status_counts": sorted(lineage["status_counts"].items()),
            "config": lineage.get("config", "dvc.yaml"), "stages": stages}


def _machine_rows(machine: Mapping[str, Any], stages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """The lineage's machine block as (what, value) rows: what decides the float results."""
    cuda = machine["cuda"]
    gpu = "none (CPU only)" if cuda is None else "; ".join(
        [f"{d['name']} (compute capability {d['capability']})" for d in cuda["devices"]]
        + [f"CUDA {cuda['cuda_version']}, cuDNN {cuda['cudnn_version']}"])
    by_threads: dict[int | None, list[str]] = {}
    for stage in stages:
        by_threads.setdefault(stage["threads"], []).append(stage["name"])
    threads = [f"default {machine['torch_threads_default']}"
               + (f" (stages without --threads: {', '.join(by_threads[None])})" if None in by_threads else "")]
    threads += [f"--threads {n}: {len(by_threads[n])} stage{'s' if len(by_threads[n]) != 1 else ''}"
                for n in sorted(n for n in by_threads if n is not None)]
    build = machine["torch_build"]
    return [("torch CPU kernels (CPU capability)", machine["cpu_capability"]),
            ("processor", f"{machine['processor'] or 'unknown'} ({machine['machine']})"),
            ("operating system", machine["os"]),
            ("GPU", gpu),
            ("torch threads", "; ".join(threads)),
            ("torch math libraries", f"BLAS {build['blas']}, LAPACK {build['lapack']}, "
                                     f"parallel backend {build['parallel_backend']}"),
            ("torch built with", "; ".join(build["built_with"]))]


def seed_spread(baseline_dirs: Sequence[Path], seed_dirs: Sequence[Path]) -> tuple[dict[str, float], int]:
    """(task -> the largest minus the smallest headline score over the seeds, in points of % of the first seed's
    (``baseline_dirs``: results/baseline/{task}), the number of seeds); ({}, 1) without ``seed_dirs``. Every
    replica (results/seeds/{seed}/{task}) must be of a task of the baseline, on the same examples."""
    if not seed_dirs:
        return {}, 1
    first = {}
    for folder in map(Path, baseline_dirs):
        metrics = _read_json_file(folder / "metrics.json")
        first[metrics["task"]] = metrics
    scores: dict[str, list[float]] = {}
    seeds = set()
    for folder in map(Path, seed_dirs):
        metrics = _read_json_file(folder / "metrics.json")
        task = metrics["task"]
        if task not in first:
            raise ValueError(f"{folder}: a replica of task {task!r}, whose baseline (results/baseline/{task}) is "
                             "not given")
        if metrics["num_examples"] != first[task]["num_examples"]:
            raise ValueError(f"{folder}: {metrics['num_examples']} examples, the baseline "
                             f"{first[task]['num_examples']}")
        scores.setdefault(task, [float(first[task]["scores"][headline(task)])]).append(
            float(metrics["scores"][headline(task)]))
        seeds.add(folder.parent.name)
    spread = {task: 100.0 * (max(v) - min(v)) / v[0] for task, v in scores.items() if v[0]}
    return spread, len(seeds) + 1


def _read_json_file(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path}: not found")
    return read_json(path)


def _verdict_css(verdict: str) -> str:
    """The class a verdict is shown with: a mixed summary ("holds in 2; ...") is shown as undecided."""
    return {HOLDS: "holds", FAILS: "fails"}.get(verdict, "untested")


def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        autoescape=True,  # every dataset / model string is HTML-escaped
        undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )
    return env.get_template("all.html")


def _check_tasks(params_path: Path, params: Mapping[str, Any], evaluated: Sequence[str]) -> None:
    """The evaluated tasks are params' ``tasks``: a dvc.yaml generated for another list runs other stages."""
    wanted = params.get("tasks")
    if evaluated and wanted is not None and sorted(wanted) != sorted(evaluated):
        raise ValueError(f"{params_path}: tasks={list(wanted)}, but the evaluations given are of {list(evaluated)}; "
                         "the stages are made from params' tasks: regenerate dvc.yaml after changing them "
                         "(make generate, or mmskip use_config)")


def report(params_path: Path, scenes_dir: Path | Mapping[str, Path], eval_dirs: Sequence[Path],
           foundation_dir: Path | None, mapper_logs_dir: Path | None, html_path: Path, csv_path: Path,
           benchmarks_dir: Path | None = None, num_qualitative: int = 8,
           skip_dirs: Sequence[Path] = (), token_dirs: Sequence[Path] = (), bench_path: Path | None = None,
           compress_dirs: Sequence[Path] = (), subnet_path: Path | None = None,
           trained_dirs: Sequence[Path] = (), lineage_root: Path | None = None,
           lineage_path: Path | None = None, plots_dir: Path | None = None,
           baseline_dirs: Sequence[Path] = (), llava_root: Path | None = None,
           seed_dirs: Sequence[Path] = ()) -> None:
    """Write ``summary.csv`` and the self-contained ``all.html`` report.

    Everything is read and checked before anything is written. ``scenes_dir``: the dataset folder whose images
    the qualitative examples show, one for every task or task -> folder. ``foundation_dir`` holds
    ``llm.json`` / ``encoder.json``; ``mapper_logs_dir`` holds ``{task}.json`` (None: nothing was
    trained, as for LLaVA's grids alone);
    ``benchmarks_dir`` holds Snakemake ``<rule>/<wildcards>.tsv`` (None or absent: the report
    says timings are not available). ``skip_dirs`` are ``results/skip/{task}/{mode}`` folders of
    the skip grid (rows with family ``skip`` in the CSV, and the skipping section); ``token_dirs`` are
    ``results/tokens/{task}/{kind}`` folders of the token-level grid (family ``tokens``);
    ``bench_path`` is ``results/bench/skip.json``. ``compress_dirs`` are
    ``results/compress/{task}/{mask_set}`` folders (rows with family ``compress``, and the
    compression section); ``subnet_path`` is the α-SubNet index ``models/masks/subnet/subnet.json``
    (None or absent: no IoU heat map). ``lineage_root`` is the folder of ``dvc.yaml`` (None: no
    lineage section); ``lineage_path`` receives the lineage as JSON (``reports/lineage.json``).
    ``baseline_dirs`` are ``results/baseline/{task}``, the baseline decodes, checked against the
    Hugging Face evaluation in the skipping section. ``llava_root`` holds LLaVA-1.5's grids
    without training (``results/llava/{task}``, ``mmskip evaluate_llava``; None: no LLaVA
    subsection): rows with family ``llava_skip``, shown like the default's grid. ``seed_dirs`` are
    ``results/seeds/{seed}/{task}``, the baseline decodes of the mappers trained with params' other seeds: with
    ``baseline_dirs``, each task's spread over seeds, which the findings judge their margins against.
    """
    if isinstance(num_qualitative, bool) or not isinstance(num_qualitative, int) \
            or num_qualitative < 0:
        raise ValueError(f"num_qualitative={num_qualitative!r}; expected an integer >= 0")
    if lineage_path is not None and lineage_root is None:
        raise ValueError(f"lineage_path={lineage_path}: needs lineage_root (the folder of dvc.yaml)")
    if not eval_dirs and llava_root is None:
        raise ValueError("nothing to report: no evaluation folders (results/eval/{task}/{input}) and no llava_root")
    rows, by_run = _summary_rows([Path(d) for d in eval_dirs]) if eval_dirs else ([], {})
    params = _read_params(params_path)
    _check_tasks(params_path, params, sorted({t for t, _ in by_run}))
    skip_runs = read_skip_runs(skip_dirs) if skip_dirs else {}
    token_runs = read_token_runs(token_dirs) if token_dirs else {}
    llava_runs, llava_infos = read_llava_runs(Path(llava_root)) if llava_root is not None else ({}, {})
    compress_runs = read_compress_runs(compress_dirs) if compress_dirs else {}
    trained_runs = read_trained_runs(trained_dirs) if trained_dirs else {}
    subnet = read_subnet(subnet_path)
    lineage = None if lineage_root is None else read_lineage(Path(lineage_root), params=params)
    families = sorted({v for _, v in by_run}, key=_family_order)
    tasks = sorted({t for t, _ in by_run})
    # every score, percentage and FLOPs fraction of the tables and plots below comes from this frame
    frame = summary_frame(rows + skip_rows(skip_runs) + token_rows(token_runs) + skip_rows(llava_runs, LLAVA_FAMILY)
                          + compress_rows(compress_runs) + trained_rows(trained_runs))

    foundation = {} if foundation_dir is None else {
        name: _read_optional_json(Path(foundation_dir) / f"{name}.json") for name in FOUNDATION_MODELS
        if name not in OPTIONAL_FOUNDATION or (Path(foundation_dir) / f"{name}.json").is_file()}
    mapper = {} if mapper_logs_dir is None else {
        task: _read_optional_json(Path(mapper_logs_dir) / f"{task}.json") for task in tasks}
    timings = None
    if benchmarks_dir is not None and Path(benchmarks_dir).is_dir():
        timings = [{"rule": r["rule"], "job": r["job"] or "\u2013",
                    "seconds": _format_value(r["seconds"]),
                    "max_rss": _format_value(r["max_rss"])}
                   for r in read_benchmarks(benchmarks_dir)]

    num_layers = {task: next(iter(modes.values()))["points"][0].get("num_layers") for task, modes in skip_runs.items()}
    spread, num_seeds = seed_spread(baseline_dirs, seed_dirs)
    claims = findings(frame, tasks, num_layers, spread)
    for claim in claims:
        claim["css"] = _verdict_css(claim["verdict"])
        for row in claim["rows"]:
            row["css"] = _verdict_css(row["verdict"])
    points_of = {task: frontier_points(frame, task) for task in tasks}
    context = {
        "headline": headline_rows_of(frame, points_of, KEEP),
        "costs": list(COSTS.values()),
        "keep": f"{KEEP:g}",
        "frontier": frontier_section(points_of),
        "findings": claims,
        "findings_noise": SEEDS_NOISE.format(n=num_seeds) if num_seeds > 1 else FINDINGS_NOISE,
        "num_seeds": num_seeds,  # a task whose first seed scored 0 has no spread in % of it: shown as a dash
        "spread": {task: f"{value:.1f}" for task, value in spread.items()},
        "params": _params_rows(params),
        "foundation": _key_value_table(foundation),
        "mapper": _key_value_table(mapper),
        "families": families,
        "baseline": BASELINE,
        "results": _results_tables(frame, families),
        "question_types": _results_tables(frame, families, prefix="accuracy/"),
        "qualitative": _qualitative(by_run, scenes_dir, num_qualitative),
        "plots": _plots(frame, families),
        "spice_note": SPICE_NOTE,
        "tokenizer_note": TOKENIZER_NOTE,
        "timings": timings,
        "no_benchmarks_note": NO_BENCHMARKS_NOTE,
        "skipping": skipping_section(frame, skip_runs, eval_dirs, bench_path, baseline_dirs) if skip_runs else None,
        "tokens": tokens_section(frame, token_runs) if token_runs else None,
        "llava": None if not llava_runs else {
            "runs": [llava_run_cells(llava_infos[t]) for t in sorted(llava_infos)],
            **skipping_section(frame, llava_runs, (), None, family=LLAVA_FAMILY)},
        "compression": compression_section(frame, compress_runs, subnet) if compress_runs or subnet else None,
        "trained": trained_section(frame, trained_runs) if trained_runs else None,
        "lineage": _lineage_view(lineage) if lineage is not None else None,
    }
    html = _template().render(**context)

    _write_csv(frame, Path(csv_path))
    if plots_dir is not None:
        _write_plot_tables(frame, Path(plots_dir))
    if lineage_path is not None:
        write_json(lineage_path, lineage)
    with atomic_path(html_path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(html)

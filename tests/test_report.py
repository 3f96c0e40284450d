"""Report stage: tidy summary.csv and a self-contained, escaped, deterministic all.html."""

from __future__ import annotations

import base64
import csv
import html.parser
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mmskip.report.build import print_timings, read_benchmarks, report, write_summary

EVIL = "<script>alert(1)</script> & friends"


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _vqa_metrics(input: str, accuracy: float, per_type: dict) -> dict:
    return {"task": "vqa", "modality": "image", "input": input, "split": "test",
            "num_examples": 2, "scores": {"accuracy": accuracy}, "per_question_type": per_type,
            "generation": {"num_beams": 1, "max_new_tokens": 4, "batch_size": 2}, "seconds": 1.5}


def _caption_metrics(input: str, scores: dict) -> dict:
    return {"task": "caption", "modality": "image", "input": input, "split": "test",
            "num_examples": 2, "scores": scores,
            "generation": {"num_beams": 1, "max_new_tokens": 8, "batch_size": 2}, "seconds": 2.0}


def _make_inputs(root: Path) -> dict:
    """A tiny results tree: 2 tasks x 2 inputs, 2 scene images, foundation/mapper logs."""
    for image_id, color in ((0, (255, 0, 0)), (7, (0, 0, 255))):
        path = root / "data/scenes/images/test" / f"{image_id:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), color).save(path)

    eval_root = root / "results/eval"
    _write_json(eval_root / "vqa/multimodal/metrics.json",
                _vqa_metrics("multimodal", 0.8, {"color": 0.5, "shape": 1.0}))
    _write_json(eval_root / "vqa/blind/metrics.json",
                _vqa_metrics("blind", 0.4, {"color": 0.25, "shape": 0.0}))
    _write_json(eval_root / "caption/multimodal/metrics.json",
                _caption_metrics("multimodal", {"BLEU-4": 0.2, "CIDEr": 1.25, "METEOR": 0.0,
                                              "ROUGE-L": 0.5}))
    _write_json(eval_root / "caption/blind/metrics.json",
                _caption_metrics("blind", {"BLEU-4": 0.1, "CIDEr": 0.5, "METEOR": 0.1,
                                           "ROUGE-L": 0.3}))
    vqa_items = {
        "multimodal": [{"question_id": 1, "image_id": 0, "question": f"What is {EVIL}?",
                        "question_type": "color", "prediction": f"red {EVIL}",
                        "answers": ["red"] * 8 + ["blue", EVIL]},
                       {"question_id": 2, "image_id": 7, "question": "What shape?",
                        "question_type": "shape", "prediction": "cube", "answers": ["cube"] * 10}],
        "blind": [{"question_id": 2, "image_id": 7, "question": "What shape?",
                   "question_type": "shape", "prediction": "sphere", "answers": ["cube"] * 10},
                  {"question_id": 1, "image_id": 0, "question": f"What is {EVIL}?",
                   "question_type": "color", "prediction": "green", "answers": ["red"] * 10}],
    }
    for input, items in vqa_items.items():
        _write_json(eval_root / f"vqa/{input}/predictions.json",
                    {"task": "vqa", "input": input, "items": items})
    for input, text in (("multimodal", "a red cube"), ("blind", "a thing")):
        _write_json(eval_root / f"caption/{input}/predictions.json",
                    {"task": "caption", "input": input,
                     "items": [{"image_id": 0, "prediction": text,
                                "references": ["a red square", "red & bold"] * 2 + ["x"]}]})

    _write_json(root / "results/foundation/llm.json",
                {"params": 123456, "heldout_perplexity": 7.5, "steps": 10})
    _write_json(root / "results/foundation/encoder.json", {"params": 4321, "heldout_accuracy": 0.9})
    _write_json(root / "results/mapper/vqa.json",
                {"final_loss": 1.25, "steps": 5, "seconds": 3.0, "trainable_params": 999,
                 "losses": [3.0, 2.0, 1.25]})
    (root / "params.yaml").write_text(
        "seed: 0\nprompts:\n  vqa_prompt: \"Question: {question} Answer:\"\n"
        "report:\n  num_qualitative: 8\n", encoding="utf-8")
    bench = root / "benchmarks"
    (bench / "evaluate").mkdir(parents=True)
    (bench / "evaluate/vqa-baseline.tsv").write_text(
        "s\th:m:s\tmax_rss\tmax_vms\n12.5\t0:00:12\t300.25\t900\n", encoding="utf-8")
    (bench / "make_scenes").mkdir()
    (bench / "make_scenes/all.tsv").write_text("s\th:m:s\tmax_rss\n3.0\t0:00:03\tNA\n",
                                               encoding="utf-8")
    return {
        "params_path": root / "params.yaml",
        "scenes_dir": root / "data/scenes",
        "eval_dirs": [eval_root / f"{t}/{v}" for t in ("vqa", "caption")
                      for v in ("blind", "multimodal")],
        "foundation_dir": root / "results/foundation",
        "mapper_logs_dir": root / "results/mapper",
        "benchmarks_dir": bench,
    }


def _run_report(inputs: dict, out: Path, **kwargs) -> tuple[str, str]:
    html_path, csv_path = out / "all.html", out / "summary.csv"
    report(html_path=html_path, csv_path=csv_path, **inputs, **kwargs)
    return html_path.read_text(encoding="utf-8"), csv_path.read_text(encoding="utf-8")


def test_write_summary_columns_order_and_pct(tmp_path):
    inputs = _make_inputs(tmp_path)
    rows = write_summary(inputs["eval_dirs"], tmp_path / "reports/summary.csv")
    with open(tmp_path / "reports/summary.csv", newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        table = [dict(zip(header, r)) for r in reader]
    assert header == ["task", "modality", "family", "metric", "score", "pct_of_baseline", "skip_mode", "skip_semantics", "skip_scope",
                      "skip_interval", "start_layer", "skipped_blocks", "decode_flops_fraction",
                      "prefill_flops_fraction", "decode_ms_per_token", "num_examples", "token_kind", "token_layer",
                      "visual_keep", "exit_rate", "exit_threshold", "exited_fraction", "decode_time_fraction",
                      "compression", "sparsity", "sparsity_pattern", "calibration", "trained_with_compression",
                      "llm_params"]
    assert all(r["skip_mode"] == "" and r["compression"] == "" for r in table)
    keys = [(r["task"], r["family"], r["metric"]) for r in table]
    assert keys == [
        ("caption", "baseline", "BLEU-4"), ("caption", "baseline", "CIDEr"),
        ("caption", "baseline", "METEOR"), ("caption", "baseline", "ROUGE-L"),
        ("caption", "blind", "BLEU-4"), ("caption", "blind", "CIDEr"),
        ("caption", "blind", "METEOR"), ("caption", "blind", "ROUGE-L"),
        ("vqa", "baseline", "accuracy"), ("vqa", "baseline", "accuracy/color"),
        ("vqa", "baseline", "accuracy/shape"),
        ("vqa", "blind", "accuracy"), ("vqa", "blind", "accuracy/color"),
        ("vqa", "blind", "accuracy/shape"),
    ]
    by_key = {(r["task"], r["family"], r["metric"]): r for r in table}
    assert by_key[("vqa", "baseline", "accuracy")]["pct_of_baseline"] == "100.0"
    assert by_key[("vqa", "blind", "accuracy")]["pct_of_baseline"] == "50.0"
    assert by_key[("vqa", "blind", "accuracy/color")]["pct_of_baseline"] == "50.0"
    assert by_key[("vqa", "blind", "accuracy/shape")]["pct_of_baseline"] == "0.0"
    assert by_key[("caption", "blind", "CIDEr")]["pct_of_baseline"] == "40.0"
    assert by_key[("caption", "blind", "ROUGE-L")]["pct_of_baseline"] == repr(100 * 0.3 / 0.5)
    assert by_key[("caption", "blind", "METEOR")]["pct_of_baseline"] == ""  # baseline is 0
    assert by_key[("caption", "blind", "BLEU-4")]["score"] == "0.1"
    assert all(r["modality"] == "image" for r in table)
    # The returned rows carry the same values as floats / None.
    assert [(r["task"], r["family"], r["metric"]) for r in rows] == keys
    blind_meteor = next(r for r in rows if r["family"] == "blind" and r["metric"] == "METEOR")
    assert blind_meteor["pct_of_baseline"] is None and blind_meteor["score"] == 0.1


def test_summary_without_baseline_leaves_pct_empty(tmp_path):
    inputs = _make_inputs(tmp_path)
    rows = write_summary([d for d in inputs["eval_dirs"] if d.name == "blind"],
                         tmp_path / "summary.csv")
    assert rows and all(r["pct_of_baseline"] is None for r in rows)


def test_missing_scores_raises_naming_file(tmp_path):
    inputs = _make_inputs(tmp_path)
    bad = inputs["eval_dirs"][0] / "metrics.json"
    metrics = json.loads(bad.read_text())
    del metrics["scores"]
    bad.write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match=re.escape(str(bad))) as err:
        write_summary(inputs["eval_dirs"], tmp_path / "summary.csv")
    assert "scores" in str(err.value)
    assert not (tmp_path / "summary.csv").exists()
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        _run_report(inputs, tmp_path / "reports")
    assert not (tmp_path / "reports").exists()


def test_duplicate_run_rejected(tmp_path):
    inputs = _make_inputs(tmp_path)
    with pytest.raises(ValueError, match="appears twice"):
        write_summary(inputs["eval_dirs"] + inputs["eval_dirs"][:1], tmp_path / "summary.csv")


def test_html_escapes_dataset_text_and_is_self_contained(tmp_path):
    html, _ = _run_report(_make_inputs(tmp_path), tmp_path / "reports")
    assert "<script" not in html
    assert EVIL not in html and "& friends" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; friends" in html
    assert "red &amp; bold" in html
    # No network requests: nothing fetched from another host, no external CSS/JS/fonts.
    for attribute in re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]*)""", html, re.I):
        assert not re.match(r"\s*(https?:)?//", attribute, re.I), attribute
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*https?://""", html, re.I)
    assert "<link" not in html and "@import" not in html and "url(" not in html
    assert "data:image/png;base64," in html
    images = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    # Sections and content from every input.
    for text in ("12. Setup", "4. Results", "5. VQA accuracy per question type", "6. Plots",
                 "7. Qualitative examples", "SPICE is off by default", "PTB tokenizer",
                 "123,456", "heldout_perplexity", "trainable_params", "1.25 (last of 3)",
                 "Question: {question} Answer:", "sphere", "green", "red ×8",
                 "vqa-baseline", "12.5", "300.25", "make_scenes"):
        assert text in html, text
    # Blind prediction is matched by question_id, not by position.
    row = html[html.index("What shape?"):]
    row = row[:row.index("</tr>")]
    assert row.index("cube") < row.index("sphere")


def test_report_is_byte_identical_across_runs(tmp_path):
    inputs = _make_inputs(tmp_path)
    first = _run_report(inputs, tmp_path / "run1")
    second = _run_report(inputs, tmp_path / "run2")
    assert first == second
    assert (tmp_path / "run1/all.html").read_bytes() == (tmp_path / "run2/all.html").read_bytes()
    assert (tmp_path / "run1/summary.csv").read_bytes() == \
        (tmp_path / "run2/summary.csv").read_bytes()
    assert sorted(p.name for p in (tmp_path / "run1").iterdir()) == ["all.html", "summary.csv"]


def test_num_qualitative_limits_examples_and_timings_fallback(tmp_path):
    inputs = _make_inputs(tmp_path)
    inputs["benchmarks_dir"] = None
    html, _ = _run_report(inputs, tmp_path / "reports", num_qualitative=1)
    assert "What is" in html and "What shape?" not in html
    assert "not available (run through DVC)" in html
    inputs["benchmarks_dir"] = tmp_path / "no-such-folder"
    html, _ = _run_report(inputs, tmp_path / "reports")
    assert "not available (run through DVC)" in html
    with pytest.raises(ValueError, match="num_qualitative"):
        _run_report(inputs, tmp_path / "reports", num_qualitative=-1)


def test_missing_image_raises_before_writing(tmp_path):
    inputs = _make_inputs(tmp_path)
    missing = inputs["scenes_dir"] / "images/test/000007.png"
    missing.unlink()
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        _run_report(inputs, tmp_path / "reports")
    assert not (tmp_path / "reports").exists()


def test_each_task_shows_its_images_from_its_own_dataset_folder(tmp_path):
    """A task with a dataset of its own (OK-VQA, GQA): the report gets one folder per task; the caption task's
    folder lacks the VQA images and is read for captions alone. A task without a folder is named."""
    import shutil

    inputs = _make_inputs(tmp_path)
    scenes = inputs["scenes_dir"]
    shutil.copytree(scenes, tmp_path / "own")
    (tmp_path / "own/images/test/000007.png").unlink()  # the VQA questions' image: only the caption folder lacks it
    html, _ = _run_report({**inputs, "scenes_dir": {"vqa": scenes, "caption": tmp_path / "own"}}, tmp_path / "r1")
    assert html == _run_report(inputs, tmp_path / "r2")[0]
    with pytest.raises(ValueError, match=re.escape("task 'vqa' has no dataset folder among ['caption']")):
        _run_report({**inputs, "scenes_dir": {"caption": scenes}}, tmp_path / "r3")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "own/images/test/000007.png"))):
        _run_report({**inputs, "scenes_dir": {"vqa": tmp_path / "own", "caption": scenes}}, tmp_path / "r4")
    assert not (tmp_path / "r3").exists() and not (tmp_path / "r4").exists()


def test_evaluations_of_other_tasks_than_params_tasks_are_refused_before_writing(tmp_path):
    inputs = _make_inputs(tmp_path)
    params = yaml.safe_load(Path(inputs["params_path"]).read_text(encoding="utf-8"))
    params["tasks"] = ["vqa"]  # dvc.yaml made for both tasks, params changed since: a stale dvc.yaml
    Path(inputs["params_path"]).write_text(yaml.safe_dump(params), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{inputs['params_path']}: tasks=['vqa'], but the evaluations "
                                                   "given are of ['caption', 'vqa']; the stages are made from "
                                                   "params' tasks: regenerate dvc.yaml")):
        _run_report(inputs, tmp_path / "reports")
    assert not (tmp_path / "reports").exists()
    inputs["eval_dirs"] = [d for d in inputs["eval_dirs"] if d.parent.name == "vqa"]  # the tasks params name
    _, csv_text = _run_report(inputs, tmp_path / "reports")
    assert {row["task"] for row in _summary(csv_text)} == {"vqa"}


def test_print_timings(tmp_path, capsys):
    inputs = _make_inputs(tmp_path)
    print_timings(inputs["benchmarks_dir"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rule", "jobs", "total_s", "slowest_s", "max_rss_MB"]
    assert lines[1].split() == ["evaluate", "1", "12.50", "12.50", "300.2"]  # slowest first
    assert lines[2].split() == ["make_scenes", "1", "3.00", "3.00", "-"]
    assert lines[3].split() == ["total", "2", "15.50"]
    print_timings(tmp_path / "nowhere")
    assert "not available" in capsys.readouterr().out


def test_a_warm_jobs_peak_memory_is_the_workers_measure_from_its_log(tmp_path, capsys):
    """Under `python -m mmskip.worker` Snakemake's benchmark measured the job's client process: the timings take the
    peak RSS of the usage line the worker ends the job's log with (the last one, if the job ran twice)."""
    from mmskip.worker import USAGE_LINE

    inputs = _make_inputs(tmp_path)
    (tmp_path / "logs/evaluate").mkdir(parents=True)
    (tmp_path / "logs/evaluate/vqa-baseline.log").write_text(
        f"work\n{USAGE_LINE.format(rss=111.0, cpu=1.0)}\nagain\n{USAGE_LINE.format(rss=812.5, cpu=9.5)}\n")
    (tmp_path / "logs/make_scenes").mkdir()
    (tmp_path / "logs/make_scenes/all.log").write_text("a job run alone: no usage line\n")
    rows = {r["rule"]: r for r in read_benchmarks(inputs["benchmarks_dir"])}
    assert rows["evaluate"]["max_rss"] == 812.5 and rows["evaluate"]["seconds"] == 12.5
    assert rows["make_scenes"]["max_rss"] is None
    print_timings(inputs["benchmarks_dir"])
    assert capsys.readouterr().out.splitlines()[1].split() == ["evaluate", "1", "12.50", "12.50", "812.5"]


def _skip_point(key, mode, scope, layers, accuracy, prefill, decode, interval=2):
    compute = {phase: {"tokens": tokens, "flops_per_token": {"total": 100.0 * f},
                       "unskipped_flops_per_token": {"total": 100.0}, "depth_fraction": f}
               for phase, tokens, f in (("prefill", 30, prefill), ("decode", 10, decode))}
    return {"key": key, "mode": mode, "scope": scope, "interval": interval if layers else None,
            "start_layer": 0 if layers else None, "layers": layers, "num_dropped": 0,
            "skipped_blocks": len(layers), "prefill_flops_fraction": prefill, "decode_flops_fraction": decode,
            "prefill_depth_fraction": prefill, "decode_depth_fraction": decode, "same_as": None,
            "scores": {"accuracy": accuracy}, "compute": compute}


BASELINE_POINT = _skip_point("baseline", "none", None, [], 0.8, 1.0, 1.0)  # points[0] of every mode


def _baseline_dir(root: Path) -> Path:
    """results/baseline/vqa: the baseline decode of the whole split (here the 2 examples)."""
    d = root / "results/baseline/vqa"
    _write_json(d / "predictions.json", {"task": "vqa", "ids": [1, 2], "predictions": ["red", "cube"]})
    return d


def _skip_inputs(root: Path) -> list[Path]:
    points = {
        "skip_block": [
            BASELINE_POINT,
            _skip_point("skip_block-generated-k2-s0", "skip_block", "generated", [2], 0.76, 1.0, 0.6),
            _skip_point("skip_block-generated-k3-s0", "skip_block", "generated", [3], 0.74, 1.0, 0.8, 3),
            _skip_point("skip_block-context-k2-s0", "skip_block", "context", [2], 0.4, 0.6, 1.0),
        ],
    }
    dirs = []
    for mode, pts in points.items():
        d = root / "results/skip/vqa" / mode
        _write_json(d / "metrics.json", {"task": "vqa", "modality": "image", "mode": mode, "num_examples": 2,
                                         "points": pts})
        _write_json(d / "predictions.json", {"ids": [1, 2], "predictions": {p["key"]: ["red", "cube"] for p in pts}})
        _write_json(d / "timing.json", {"points": {p["key"]: {"decode": {"ms_per_step": 2.5}} for p in pts}})
        dirs.append(d)
    return dirs


def test_skip_grid_rows_are_relative_to_the_unskipped_engine_and_the_best_point_keeps_90(tmp_path):
    inputs = _make_inputs(tmp_path)
    html, text = _run_report(inputs, tmp_path / "out", skip_dirs=_skip_inputs(tmp_path),
                             baseline_dirs=[_baseline_dir(tmp_path)])
    rows = list(csv.DictReader(text.splitlines()))
    skip = {r["skip_mode"] + "/" + r["skip_scope"] + "/" + r["skip_interval"]: r for r in rows if r["family"] == "skip"}
    assert set(skip) == {"none//", "skip_block/generated/2", "skip_block/generated/3", "skip_block/context/2"}
    assert float(skip["skip_block/generated/2"]["pct_of_baseline"]) == pytest.approx(95.0)
    assert skip["skip_block/generated/2"]["decode_flops_fraction"] == "0.6"
    assert skip["skip_block/generated/2"]["decode_ms_per_token"] == "2.5"
    assert skip["none//"]["pct_of_baseline"] == "100.0"
    # best per scope with >= 90%: generated k2 (95%, skips 0.4 of decode); context 50% keeps nothing
    best = html.split("Most compute skipped", 1)[1].split("</table>", 1)[0]
    assert "skip_block" in best and ">0.400<" in best and "95.0" in best and "92.5" not in best
    assert "No point keeps 90.0% with scope: context, all" in html
    # the baseline decode's predictions vs the baseline evaluation's: red/cube vs "red <evil>"/cube
    assert "for 1 of 2 examples" in html


def test_skip_modes_must_start_with_one_and_the_same_baseline(tmp_path):
    inputs = _make_inputs(tmp_path)
    dirs = _skip_inputs(tmp_path)
    other = tmp_path / "results/skip/vqa/skip_ffn"
    point = _skip_point("skip_ffn-generated-k2-s0", "skip_ffn", "generated", [2], 0.7, 1.0, 0.8)
    for first, message in ((point, r"points\[0\] must be the baseline \(skip mode 'none'\); got 'skip_ffn"),
                           ({**BASELINE_POINT, "scores": {"accuracy": 0.75}}, r"the modes' baselines differ")):
        _write_json(other / "metrics.json", {"task": "vqa", "modality": "image", "mode": "skip_ffn", "num_examples": 2,
                                             "points": [first, point]})
        with pytest.raises(ValueError, match=message):
            _run_report(inputs, tmp_path / "out", skip_dirs=[*dirs, other])
        assert not (tmp_path / "out").exists()
    # a mode's folder listed twice (or two folders of one task and mode): refused, naming both (one reader for the
    # skip grid, the token grid, compression and training with compression: mmskip.report.records.read_runs)
    with pytest.raises(ValueError, match=re.escape(f"{dirs[0]}/metrics.json: task='vqa' mode=") + ".* appears twice"):
        _run_report(inputs, tmp_path / "out", skip_dirs=[*dirs, dirs[0]])
    assert not (tmp_path / "out").exists()


def test_each_skip_row_names_its_semantics_and_both_are_shown_side_by_side(tmp_path):
    inputs = _make_inputs(tmp_path)
    dirs = _skip_inputs(tmp_path)
    path = tmp_path / "results/skip/vqa/skip_block"
    metrics = json.loads((path / "metrics.json").read_text())
    official = {**_skip_point("skip_block-generated-k2-s0-official", "skip_block", "generated", [2], 0.72, 1.0, 0.7),
                "semantics": "official"}
    metrics["points"].append(official)  # the records written before semantics existed are textbook
    _write_json(path / "metrics.json", metrics)
    for name, key in (("predictions.json", "predictions"), ("timing.json", "points")):
        data = json.loads((path / name).read_text())
        data[key][official["key"]] = ["red", "cube"] if key == "predictions" else {"decode": {"ms_per_step": 2.0}}
        _write_json(path / name, data)
    drop = tmp_path / "results/skip/vqa/drop_last"  # no interval nor start layer: empty cells in the frame
    points = [{**_skip_point(f"drop_last-1{suffix}", "drop_last", "all", [], 0.6, 0.8, 0.8), "num_dropped": 1,
               "skipped_blocks": 1, "semantics": semantics} for suffix, semantics in (("", "textbook"),
                                                                                  ("-official", "official"))]
    points = [BASELINE_POINT, *points]
    _write_json(drop / "metrics.json", {"task": "vqa", "modality": "image", "mode": "drop_last", "num_examples": 2,
                                        "points": points})
    _write_json(drop / "predictions.json", {"ids": [1, 2], "predictions": {p["key"]: ["red", "cube"] for p in points}})
    _write_json(drop / "timing.json", {"points": {p["key"]: {"decode": {"ms_per_step": 2.0}} for p in points}})
    html, text = _run_report(inputs, tmp_path / "out", skip_dirs=[*dirs, drop])
    skip = {r["point"] if "point" in r else (r["skip_mode"], r["skip_semantics"], r["skip_scope"], r["skip_interval"]): r
            for r in csv.DictReader(text.splitlines()) if r["family"] == "skip"}
    assert {k[1] for k in skip if k[0] != "none"} == {"textbook", "official"}
    assert skip["none", "", "", ""]["skip_semantics"] == ""
    row = skip["skip_block", "official", "generated", "2"]
    assert (row["decode_flops_fraction"], float(row["pct_of_baseline"])) == ("0.7", pytest.approx(90.0))
    compared = html.split("Textbook vs official semantics", 1)[1].split("</table>", 1)[0]
    # one row: the same mode, scope, interval and start under each semantics, with the FLOPs each executed
    assert compared.count("<tr><td>skip_block</td>") == 1 and compared.count("<tr><td>drop_last</td>") == 1
    assert ">95.0<" in compared and ">90.0<" in compared and ">0.600<" in compared and ">0.700<" in compared
    best = html.split("Most compute skipped", 1)[1].split("</table>", 1)[0]
    assert "textbook semantics" in best and "90.0" not in best.split("</h4>", 1)[1]


def _compress_point(key, method, pattern, sparsity, scores, calibration=None, rule=None, achieved=None):
    dense = key == "baseline"
    return {"key": key, "method": method, "pattern": pattern, "sparsity": sparsity,
            "achieved_sparsity": sparsity if achieved is None else achieved, "calibration": calibration,
            "rule": rule, "scores": scores, "dense_flops_per_token": {"prefill": 900.0, "decode": 1000.0},
            "sparse_flops_fraction": {"prefill": 1.0 if dense else 0.55, "decode": 1.0 if dense else 0.6}}


def _compress_inputs(root: Path, blocks: int = 3) -> tuple[list[Path], Path]:
    """Compress runs (vqa: wanda, subnet; caption: magnitude, subnet) and the α-SubNet index."""
    def dense(scores):
        return _compress_point("baseline", "none", None, 0.0, scores)

    def cider(value):
        return {"BLEU-4": value / 10, "CIDEr": value}

    runs = {
        ("vqa", "wanda"): [
            dense({"accuracy": 0.8}),
            _compress_point("vqa/prompt/0.5", "wanda", "unstructured", 0.5, {"accuracy": 0.6}, "prompt", achieved=0.49),
            _compress_point("vqa/prompt/2-4", "wanda", "2:4", 0.5, {"accuracy": 0.4}, "prompt"),
            _compress_point("vqa/text/0.5", "wanda", "unstructured", 0.5, {"accuracy": 0.7}, "text"),
        ],
        ("vqa", "subnet"): [
            dense({"accuracy": 0.8}),
            _compress_point("intersection", "subnet", "unstructured", 0.5, {"accuracy": 0.72}, "prompt",
                            "intersection"),
            _compress_point("union", "subnet", "unstructured", 0.5, {"accuracy": 0.64}, "prompt", "union"),
        ],
        ("caption", "magnitude"): [
            dense(cider(2.5)),
            _compress_point("0.3", "magnitude", "unstructured", 0.3, cider(2.0)),
            _compress_point("4-8", "magnitude", "4:8", 0.5, cider(1.5)),
        ],
        ("caption", "subnet"): [  # a dense reference unlike magnitude's: its points use their own
            dense(cider(2.0)),
            _compress_point("intersection", "subnet", "unstructured", 0.5, cider(1.5), "prompt", "intersection"),
            _compress_point("union", "subnet", "unstructured", 0.5, cider(1.0), "prompt", "union"),
        ],
    }
    dirs = []
    for (task, method), points in runs.items():
        d = root / "results/compress" / task / method
        _write_json(d / "metrics.json", {"task": task, "modality": "image", "method": method, "split": "test",
                                         "num_examples": 4 if task == "vqa" else 2, "reference": "baseline",
                                         "points": points})
        _write_json(d / "predictions.json", {"ids": [1, 2], "predictions": {p["key"]: ["a", "b"] for p in points}})
        timing = {"decode": {"seconds": 0.1, "steps": 10, "ms_per_step": 7.25},
                  "prefill": {"seconds": 0.2, "steps": 2, "ms_per_step": 100.0}}
        _write_json(d / "timing.json", {"points": {p["key"]: timing for p in points}})
        dirs.append(d)
    subnet = root / "models/masks/subnet/subnet.json"
    _write_json(subnet, {
        "method": "subnet", "tasks": ["vqa", "caption"], "combined": ["vqa/prompt/0.5", "caption/prompt/0.5"],
        "blocks": blocks, "task_iou": [{"tasks": ["vqa", "caption"], "iou_per_block": [0.5, 0.6, 0.7][:blocks]}],
        "entries": [{"key": rule, "rule": rule, "method": "subnet", "pattern": "unstructured", "sparsity": 0.5,
                     "calibration": "prompt", "achieved": {"overall": 0.5, "per_parameter": {}},
                     "rule_alone_sparsity": alone,
                     "iou_with_task": {"vqa": [0.8, 0.9, 1.0][:blocks], "caption": [0.7, 0.75, 0.8][:blocks]}}
                    for rule, alone in (("intersection", 0.625), ("union", 0.375))]})
    return dirs, subnet


def _section(html: str, start: str, end: str) -> str:
    """The text from ``start`` up to the next ``end``."""
    i = html.index(start)
    return html[i:html.index(end, i)]


def test_compression_rows_are_relative_to_the_dense_point_of_the_same_run(tmp_path):
    inputs = _make_inputs(tmp_path)
    dirs, subnet = _compress_inputs(tmp_path)
    _, text = _run_report(inputs, tmp_path / "out", compress_dirs=dirs, subnet_path=subnet)
    reader = csv.DictReader(text.splitlines())
    assert reader.fieldnames[-7:] == ["decode_time_fraction", "compression", "sparsity", "sparsity_pattern",
                                      "calibration", "trained_with_compression", "llm_params"]
    rows = list(reader)
    new = ("compression", "sparsity", "sparsity_pattern", "calibration", "trained_with_compression", "llm_params")
    assert all(r[c] == "" for r in rows if r["family"] != "compress" for c in new)
    compress = [r for r in rows if r["family"] == "compress"]
    headline = {(r["task"], r["compression"], r["sparsity_pattern"], r["calibration"]): r for r in compress
                if r["metric"] in ("accuracy", "CIDEr")}
    assert sorted(headline) == sorted([
        ("vqa", "none", "", ""), ("vqa", "wanda", "unstructured", "prompt"), ("vqa", "wanda", "2:4", "prompt"),
        ("vqa", "wanda", "unstructured", "text"), ("vqa", "subnet:intersection", "unstructured", "prompt"),
        ("vqa", "subnet:union", "unstructured", "prompt"), ("caption", "none", "", ""),
        ("caption", "magnitude", "unstructured", ""), ("caption", "magnitude", "4:8", ""),
        ("caption", "subnet:intersection", "unstructured", "prompt"),
        ("caption", "subnet:union", "unstructured", "prompt")])
    # the dense reference once per task, then every point of every method, each with every metric
    assert len(compress) == 6 + 2 * 5
    dense = headline[("vqa", "none", "", "")]
    assert (dense["score"], dense["pct_of_baseline"], dense["sparsity"], dense["num_examples"]) == \
        ("0.8", "100.0", "0.0", "4")
    wanda = headline[("vqa", "wanda", "unstructured", "prompt")]
    assert float(wanda["pct_of_baseline"]) == pytest.approx(75.0)
    assert wanda["sparsity"] == "0.49"  # achieved, not the 0.5 target
    assert (wanda["trained_with_compression"], wanda["llm_params"], wanda["skip_mode"]) == ("False", "", "")
    assert float(headline[("vqa", "wanda", "2:4", "prompt")]["pct_of_baseline"]) == pytest.approx(50.0)
    assert float(headline[("vqa", "subnet:intersection", "unstructured", "prompt")]["pct_of_baseline"]) \
        == pytest.approx(90.0)
    # caption: magnitude vs its dense CIDEr 2.5, the α-SubNet vs its own dense CIDEr 2.0
    assert float(headline[("caption", "magnitude", "unstructured", "")]["pct_of_baseline"]) == pytest.approx(80.0)
    assert float(headline[("caption", "subnet:intersection", "unstructured", "prompt")]["pct_of_baseline"]) \
        == pytest.approx(75.0)
    bleu = next(r for r in compress if r["compression"] == "magnitude" and r["sparsity_pattern"] == "4:8"
                and r["metric"] == "BLEU-4")
    assert float(bleu["pct_of_baseline"]) == pytest.approx(60.0) and bleu["num_examples"] == "2"
    assert headline[("caption", "none", "", "")]["score"] == "2.5"  # the first method's (magnitude) reference


def test_compression_section_tables_and_subnet_heatmap(tmp_path):
    inputs = _make_inputs(tmp_path)
    dirs, subnet = _compress_inputs(tmp_path)
    html, _ = _run_report(inputs, tmp_path / "out", compress_dirs=dirs, subnet_path=subnet)
    for heading in ("8. Skipping", "9. Compression", "10. Training with compression", "11. Notes", "13. Timings"):
        assert f">{heading}</h2>" in html, heading
    section = _section(html, ">9. Compression<", ">10. Training with compression<")
    assert "no speedup" in section and "if zeros were skipped" in section and "(dense kernels)" in section
    vqa = _section(section, "<h3>vqa (accuracy; 4 test examples; dense 0.800)", "&alpha;-SubNet: one mask")
    row = _section(vqa, "<td>vqa/prompt/0.5</td>", "</tr>")
    for cell in ("unstructured", "prompt", ">0.50<", ">0.490<", ">0.600<", ">75.0<", ">0.600<", ">0.550<", ">7.25<"):
        assert cell in row, cell
    assert "wanda</td><td>vqa/prompt/2-4</td><td>2:4</td>" in vqa
    calibration = _section(vqa, "Wanda calibration comparison", "</table>")
    assert calibration.count("<tr><td>unstructured</td>") == 2 and ">text<" in calibration and "2:4" not in calibration
    caption = _section(section, "<h3>caption (CIDEr", "<h3>vqa")
    assert "No Wanda masks of caption share" in caption
    assert ("differs between the methods' runs (magnitude: 2.5000 on 2 examples; "
            "subnet: 2.0000 on 2 examples)") in caption
    subnet_part = section[section.index("&alpha;-SubNet: one mask"):]
    header = _section(subnet_part, "<tr><th>rule</th>", "</tr>")
    assert header.index("caption: CIDEr") < header.index("vqa: accuracy")
    intersection = _section(subnet_part, "<tr><td>intersection</td>", "</tr>")
    # achieved, rule-alone; caption: score, % of its dense, mean IoU; vqa: the same
    assert re.findall(r'<td class="num">([^<]*)</td>', intersection) == [
        "0.500", "0.625", "1.500", "75.0", "0.750", "0.720", "90.0", "0.900"]
    own = _section(subnet_part, "each task's own Wanda mask (prompt, 0.50)", "</tr>")
    assert re.findall(r'<td class="num">([^<]*)</td>', own) == ["0.490", "&ndash;", "\u2013", "\u2013", "&ndash;",
                                                                  "0.600", "75.0", "&ndash;"]
    figures = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)"', section)
    assert [alt for _, alt in figures] == ["caption score vs sparsity", "vqa score vs sparsity",
                                           "alpha-SubNet mask IoU per block", "alpha-SubNet task mask IoU matrix"]
    for uri, _ in figures[-2:]:
        with Image.open(io.BytesIO(base64.b64decode(uri))) as heatmap:
            assert heatmap.format == "PNG" and heatmap.width > 300
    assert len({uri for uri, _ in figures}) == 4
    # without the index: the score table stays, the heat map goes
    html, _ = _run_report(inputs, tmp_path / "out2", compress_dirs=dirs, subnet_path=tmp_path / "absent.json")
    section = _section(html, ">9. Compression<", ">10. Training with compression<")
    assert "alpha-SubNet mask IoU" not in section and "subnet.json) is not available" in section
    assert re.findall(r'<td class="num">([^<]*)</td>', _section(section, "<tr><td>union</td>", "</tr>")) == [
        "0.500", "\u2013", "1.000", "50.0", "\u2013", "0.640", "80.0", "\u2013"]
    html, _ = _run_report(inputs, tmp_path / "out3")
    assert "No compression runs in this run." in html


def test_compression_input_errors_name_the_file_and_write_nothing(tmp_path):
    inputs = _make_inputs(tmp_path)
    dirs, subnet = _compress_inputs(tmp_path)
    missing = dirs[1] / "metrics.json"
    missing.unlink()
    with pytest.raises(ValueError, match=re.escape(f"{missing}: metrics.json not found")):
        _run_report(inputs, tmp_path / "out", compress_dirs=dirs, subnet_path=subnet)
    assert not (tmp_path / "out").exists()
    dirs, subnet = _compress_inputs(tmp_path, blocks=2)
    index = json.loads(subnet.read_text())
    index["blocks"] = 3
    subnet.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=re.escape(str(subnet)) + ".*2 blocks, expected 3"):
        _run_report(inputs, tmp_path / "out", compress_dirs=dirs, subnet_path=subnet)
    assert not (tmp_path / "out").exists()
    dirs, subnet = _compress_inputs(tmp_path)
    metrics = json.loads((dirs[0] / "metrics.json").read_text())
    metrics["points"] = metrics["points"][1:]
    (dirs[0] / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match=re.escape(str(dirs[0] / "metrics.json")) + ".*must be the baseline"):
        _run_report(inputs, tmp_path / "out", compress_dirs=dirs)
    assert not (tmp_path / "out").exists()


def test_compression_report_is_deterministic_and_timing_only_shown(tmp_path):
    inputs = _make_inputs(tmp_path)
    dirs, subnet = _compress_inputs(tmp_path)
    first = _run_report(inputs, tmp_path / "run1", compress_dirs=dirs, subnet_path=subnet)
    second = _run_report(inputs, tmp_path / "run2", compress_dirs=dirs, subnet_path=subnet)
    assert (tmp_path / "run1/all.html").read_bytes() == (tmp_path / "run2/all.html").read_bytes()
    assert (tmp_path / "run1/summary.csv").read_bytes() == (tmp_path / "run2/summary.csv").read_bytes()
    assert first == second
    # a new latency measurement changes the shown ms/step and nothing else
    timing = json.loads((dirs[0] / "timing.json").read_text())
    timing["points"]["vqa/prompt/0.5"]["decode"]["ms_per_step"] = 9.5
    (dirs[0] / "timing.json").write_text(json.dumps(timing))
    html, text = _run_report(inputs, tmp_path / "run3", compress_dirs=dirs, subnet_path=subnet)
    assert text == first[1]
    assert ">9.50<" in html and ">9.50<" not in first[0]
    assert re.findall(r'src="([^"]+)"', html) == re.findall(r'src="([^"]+)"', first[0])


def _trained_inputs(root: Path) -> list[Path]:
    def point(key, variant, trained, score, params=1000, sparsity=0.0, layers=()):
        return {"key": key, "variant": variant, "trained_with_compression": trained, "scores": score,
                "llm_params": params, "sparsity": sparsity, "skip_layers": list(layers),
                "decode_flops_fraction": 1.0, "prefill_flops_fraction": 1.0}

    dirs = []
    for task, metric, dense in (("vqa", "accuracy", 0.8), ("caption", "CIDEr", 2.0)):
        points = [point("baseline", "baseline", False, {metric: dense}),
                  point("dense/trained", "dense", True, {metric: dense * 1.2}),
                  point("pruned/inference_only", "pruned", False, {metric: dense * 0.5}, sparsity=0.5),
                  point("pruned/trained", "pruned", True, {metric: dense * 0.9}, sparsity=0.5),
                  point("skipped/inference_only", "skipped", False, {metric: dense * 0.7}, layers=(2, 4)),
                  point("skipped/trained", "skipped", True, {metric: dense * 0.6}, layers=(2, 4)),
                  point("small/trained", "small", True, {metric: dense * 0.25}, params=250)]
        d = root / "trained" / task
        _write_json(d / "metrics.json", {"task": task, "modality": "image", "num_examples": 3,
                                         "train_init": "baseline", "points": points})
        dirs.append(d)
    return dirs


def test_trained_section_compares_inference_only_with_trained_and_llm_sizes(tmp_path):
    inputs = _make_inputs(tmp_path)
    dirs = _trained_inputs(tmp_path)
    html, text = _run_report(inputs, tmp_path / "out", trained_dirs=dirs)
    section = _section(html, ">10. Training with compression<", ">11. Notes<")
    vqa = _section(section, "<h3>vqa", "</table>")
    assert "dense 0.800; dense control 0.960, 120.0% of dense)" in vqa
    assert "<td>pruned</td><td>Wanda 0.500 sparsity</td><td>50.0</td><td>90.0</td><td>+40.0</td><td>75.0</td>" in vqa
    assert ("<td>skipped</td><td>skip_block on layers 2, 4, all tokens</td><td>70.0</td><td>60.0</td><td>-10.0</td>"
            "<td>50.0</td>") in vqa
    assert "<td>smaller LLM, its own mapper</td><td>250</td><td>0.200</td><td>25.0</td>" in section
    rows = [r for r in csv.DictReader(io.StringIO(text)) if r["family"] == "trained"]
    got = {(r["task"], r["compression"], r["trained_with_compression"]): r for r in rows}
    assert float(got["caption", "wanda", "True"]["pct_of_baseline"]) == pytest.approx(90.0)
    assert got["caption", "smaller_llm", "True"]["llm_params"] == "250"
    assert got["vqa", "skip_block", "False"]["skipped_blocks"] == "2"
    assert float(got["vqa", "none", "True"]["pct_of_baseline"]) == pytest.approx(120.0)  # the dense control
    assert float(got["vqa", "none", "False"]["pct_of_baseline"]) == pytest.approx(100.0)
    metrics = json.loads((dirs[0] / "metrics.json").read_text())
    _write_json(dirs[0] / "metrics.json", dict(metrics, points=[p for p in metrics["points"] if p["key"] != "dense/trained"]))
    with pytest.raises(ValueError, match=r"trained/vqa/metrics.json: missing point\(s\) \['dense/trained'\]"):
        _run_report(inputs, tmp_path / "out3", trained_dirs=dirs)
    (dirs[0] / "metrics.json").unlink()
    with pytest.raises(ValueError, match=r"trained/vqa/metrics.json: metrics.json not found"):
        _run_report(inputs, tmp_path / "out2", trained_dirs=dirs)
    assert not (tmp_path / "out2").exists()


def test_the_trained_section_shows_the_variants_a_run_trained(tmp_path):
    """train_compressed.variants without dense and small: no control (its column n/a), no smaller LLM, no figure;
    a point of a listed variant missing is refused."""
    inputs = _make_inputs(tmp_path)
    dirs = _trained_inputs(tmp_path)
    for d in dirs:
        metrics = json.loads((d / "metrics.json").read_text())
        _write_json(d / "metrics.json", dict(metrics, variants=["skipped"], points=[
            p for p in metrics["points"] if p["variant"] in ("baseline", "skipped")]))
    html, text = _run_report(inputs, tmp_path / "out", trained_dirs=dirs)
    section = _section(html, ">10. Training with compression<", ">11. Notes<")
    assert "dense 0.800; no dense control trained)" in section and "Variants trained (train_compressed.variants): " \
        "skipped." in section
    assert ("<td>skipped</td><td>skip_block on layers 2, 4, all tokens</td><td>70.0</td><td>60.0</td><td>-10.0</td>"
            "<td>n/a</td>") in section
    assert "<td>pruned</td>" not in section and "smaller LLM, its own" not in section and "<img" not in section
    rows = [r for r in csv.DictReader(io.StringIO(text)) if r["family"] == "trained"]
    assert {(r["compression"], r["trained_with_compression"]) for r in rows} == {
        ("none", "False"), ("skip_block", "False"), ("skip_block", "True")}  # the baseline and the two skipped
    metrics = json.loads((dirs[1] / "metrics.json").read_text())
    _write_json(dirs[1] / "metrics.json", dict(metrics, variants=["skipped", "small"]))
    with pytest.raises(ValueError, match=r"trained/caption/metrics.json: missing point\(s\) \['small/trained'\]"):
        _run_report(inputs, tmp_path / "out2", trained_dirs=dirs)
    _write_json(dirs[1] / "metrics.json", dict(metrics, variants=["skipped", "tiny"]))
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['tiny'\]; allowed \['dense', 'pruned', "):
        _run_report(inputs, tmp_path / "out3", trained_dirs=dirs)


def test_plot_tables_hold_the_headline_rows_of_the_summary(tmp_path):
    inputs = _make_inputs(tmp_path)
    dirs, subnet = _compress_inputs(tmp_path)
    _, text = _run_report(inputs, tmp_path / "out", compress_dirs=dirs, subnet_path=subnet,
                          plots_dir=tmp_path / "out/plots")
    summary = [r for r in csv.DictReader(text.splitlines())
               if r["family"] == "compress" and r["metric"] in ("accuracy", "CIDEr")]
    with open(tmp_path / "out/plots/compression.csv", newline="", encoding="utf-8") as f:
        plotted = list(csv.DictReader(f))
    assert len(plotted) == len(summary) == 11
    assert [{k: r[k] for k in plotted[0]} for r in summary] == plotted
    with open(tmp_path / "out/plots/skipping.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[-1] == "pct_of_baseline" and list(reader) == []  # no skip grid in this run


# --------------------------------------------------------------------------- HTML tables vs summary.csv

class _Tables(html.parser.HTMLParser):
    """Every ``<table>`` of a page: the ``<h2>``/``<h3>``/``<h4>`` headings above it and its rows of cell
    texts (character references decoded: ``&ndash;`` is "–")."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables: list[dict] = []
        self._headings = {"h2": "", "h3": "", "h4": ""}
        self._text: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag in ("h2", "h3", "h4", "td", "th"):
            self._text = ""
        elif tag == "table":
            self.tables.append({**self._headings, "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])

    def handle_endtag(self, tag):
        if tag in ("h2", "h3", "h4"):
            self._headings[tag] = self._text.strip()
            for lower in ("h3", "h4")[("h2", "h3", "h4").index(tag):]:
                self._headings[lower] = ""
        elif tag in ("td", "th"):
            self.tables[-1]["rows"][-1].append(self._text.strip())
        self._text = None if tag in ("h2", "h3", "h4", "td", "th") else self._text

    def handle_data(self, data):
        if self._text is not None:
            self._text += data


def _tables(html_text: str) -> list[dict]:
    """The page's tables; ``records``: each row below the header as {header cell: cell}."""
    parser = _Tables()
    parser.feed(html_text)
    for table in parser.tables:
        header, *body = table["rows"]
        table["records"] = [dict(zip(header, row)) for row in body]
    return parser.tables


def _find(tables: list[dict], h2: str, h3: str | None = None, first_header: str | None = None) -> list[dict]:
    """Tables under the ``<h2>`` starting with ``h2`` (and ``<h3>`` starting with ``h3``) whose first header
    cell is ``first_header``."""
    return [t for t in tables if t["h2"].startswith(h2) and (h3 is None or t["h3"].startswith(h3))
            and (first_header is None or t["rows"][0][0] == first_header)]


def _num(value: str, digits: int, suffix: str = "") -> str:
    """A summary.csv value as the report prints it: a dash when empty."""
    return "\u2013" if value == "" else f"{float(value):.{digits}f}{suffix}"


def _all_runs(root: Path) -> dict:
    """Inputs of a report with every section: evaluations, the skip grid, compression and training."""
    inputs = _make_inputs(root)
    compress_dirs, subnet = _compress_inputs(root)
    return {**inputs, "skip_dirs": _skip_inputs(root), "compress_dirs": compress_dirs, "subnet_path": subnet,
            "trained_dirs": _trained_inputs(root)}


def _summary(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def _headline(rows: list[dict], family: str, task: str) -> list[dict]:
    metric = {"vqa": "accuracy", "caption": "CIDEr"}[task]
    return [r for r in rows if r["family"] == family and r["task"] == task and r["metric"] == metric]


def test_every_score_cell_of_the_html_is_the_summary_csv_value(tmp_path):
    html_text, text = _run_report(_all_runs(tmp_path), tmp_path / "out")
    summary = _summary(text)
    tables = _tables(html_text)
    row_of = {(r["task"], r["family"], r["metric"]): r for r in summary if r["family"] in ("baseline", "blind")}

    # 4. Results and 5. per question type: one cell per task x metric x family, one % cell per non-baseline
    checked = 0
    for h2, prefix in (("4. Results", ""), ("5. VQA accuracy per question type", "accuracy/")):
        found = _find(tables, h2)
        assert [t["h3"].split()[0] for t in found] == (["caption", "vqa"] if not prefix else ["vqa"])
        for table in found:
            task = table["h3"].split()[0]
            metrics = sorted(m for t, v, m in row_of if t == task and v == "baseline" and m.startswith(prefix))
            assert [prefix + r[table["rows"][0][0]] for r in table["records"]] == metrics
            for record in table["records"]:
                metric = prefix + record[table["rows"][0][0]]
                for family in ("baseline", "blind"):
                    row = row_of[task, family, metric]
                    assert record[family] == _num(row["score"], 4), (task, family, metric)
                    checked += 1
                assert record["blind (% of baseline)"] == _num(row_of[task, "blind", metric]["pct_of_baseline"],
                                                               1, "%")
    assert checked == 2 * (4 + 3 + 2)

    # 8. Skipping: every grid point of vqa, in the frame's order, then the best points
    grid = _find(tables, "8. Skipping", "vqa", "point")
    assert len(grid) == 1
    rows = _headline(summary, "skip", "vqa")
    assert len(grid[0]["records"]) == len(rows) == 4
    for record, row in zip(grid[0]["records"], rows):
        assert (record["accuracy"], record["% of unskipped"], record["prefill FLOPs"], record["decode FLOPs"],
                record["decode ms/token"]) == \
            (_num(row["score"], 3), _num(row["pct_of_baseline"], 1), _num(row["prefill_flops_fraction"], 3),
             _num(row["decode_flops_fraction"], 3), _num(row["decode_ms_per_token"], 2))
    assert grid[0]["records"][1]["point"] == "skip_block-generated-k2-s0"
    (best,) = _find(tables, "8. Skipping", "vqa", "scope")
    assert [(r["scope"], r["accuracy"], r["% of unskipped"]) for r in best["records"]] == \
        [("generated", "0.760", "95.0")]

    # 9. Compression: each task's masks in the frame's order, the calibration comparison, the α-SubNet
    for task in ("caption", "vqa"):
        metric = {"vqa": "accuracy", "caption": "CIDEr"}[task]
        (table,) = _find(tables, "9. Compression", task, "compression")
        rows = _headline(summary, "compress", task)
        assert len(table["records"]) == len(rows) == {"vqa": 6, "caption": 5}[task]
        for record, row in zip(table["records"], rows):
            assert (record["compression"], record["pattern"], record["calibration"], record["achieved sparsity"],
                    record[metric], record["% of dense"]) == \
                (row["compression"], row["sparsity_pattern"] or "\u2013", row["calibration"] or "\u2013",
                 _num(row["sparsity"], 3), _num(row["score"], 3), _num(row["pct_of_baseline"], 1))
    (calibration,) = _find(tables, "9. Compression", "vqa", "pattern")
    wanda = {r["calibration"]: r for r in _headline(summary, "compress", "vqa")
             if r["compression"] == "wanda" and r["sparsity_pattern"] == "unstructured"}
    assert [(r["calibration"], r["accuracy"], r["% of dense"]) for r in calibration["records"]] == \
        [(c, _num(wanda[c]["score"], 3), _num(wanda[c]["pct_of_baseline"], 1)) for c in ("prompt", "text")]
    (subnet,) = _find(tables, "9. Compression", "\u03b1-SubNet", "rule")
    for record in subnet["records"][:2]:
        for task in ("caption", "vqa"):
            metric = {"vqa": "accuracy", "caption": "CIDEr"}[task]
            (row,) = [r for r in _headline(summary, "compress", task) if r["compression"] == f"subnet:{record['rule']}"]
            assert (record[f"{task}: {metric}"], record[f"{task}: % of dense"]) == \
                (_num(row["score"], 3), _num(row["pct_of_baseline"], 1))
    own = subnet["records"][2]
    assert own["rule"].startswith("each task's own Wanda mask")
    assert (own["vqa: accuracy"], own["vqa: % of dense"]) == \
        (_num(wanda["prompt"]["score"], 3), _num(wanda["prompt"]["pct_of_baseline"], 1))

    # 10. Training with compression: % of dense per compression, inference only and trained; LLM sizes
    for task in ("caption", "vqa"):
        metric = {"vqa": "accuracy", "caption": "CIDEr"}[task]
        rows = {(r["compression"], r["trained_with_compression"]): r for r in _headline(summary, "trained", task)}
        (compared,) = _find(tables, "10. Training", task, "compression")
        for record, compression in zip(compared["records"], ("wanda", "skip_block")):
            assert record["inference only, % of dense"] == _num(rows[compression, "False"]["pct_of_baseline"], 1)
            assert record["trained with it, % of dense"] == _num(rows[compression, "True"]["pct_of_baseline"], 1)
        (sizes,) = _find(tables, "10. Training", task, "LLM")
        for record, key in zip(sizes["records"], (("none", "False"), ("smaller_llm", "True"))):
            assert (record["parameters"], record[metric], record["% of the default LLM"]) == \
                (rows[key]["llm_params"], _num(rows[key]["score"], 3), _num(rows[key]["pct_of_baseline"], 1))


def _changed_cells(before: list[dict], after: list[dict]) -> list[tuple]:
    """(h2, h3, first two cells of the row, column header, before, after) of every table cell that differs."""
    assert [(t["h2"], t["h3"], len(t["rows"])) for t in before] == [(t["h2"], t["h3"], len(t["rows"])) for t in after]
    changed = []
    for old, new in zip(before, after):
        header = old["rows"][0]
        for old_row, new_row in zip(old["rows"], new["rows"]):
            changed += [(old["h2"], old["h3"], tuple(old_row[:2]), column, a, b)
                        for column, a, b in zip(header, old_row, new_row) if a != b]
    return changed


@pytest.mark.parametrize("path, edit, cells", [
    # an evaluation score: its cell and its % of baseline, in 4. Results only
    ("results/eval/caption/blind/metrics.json", lambda m: m["scores"].update({"BLEU-4": 0.15}),
     [("4. Results", "caption (image)", ("BLEU-4", "0.2000"), "blind", "0.1000", "0.1500"),
      ("4. Results", "caption (image)", ("BLEU-4", "0.2000"), "blind (% of baseline)", "50.0%", "75.0%")]),
    # one mask's score: its row of the compression table only (not the α-SubNet's, not another method's)
    ("results/compress/caption/magnitude/metrics.json", lambda m: m["points"][2]["scores"].update({"CIDEr": 1.75}),
     [("9. Compression", "caption (CIDEr; 2 test examples; dense 2.500)", ("magnitude", "4-8"), "CIDEr", "1.500",
       "1.750"),
      ("9. Compression", "caption (CIDEr; 2 test examples; dense 2.500)", ("magnitude", "4-8"), "% of dense", "60.0",
       "70.0")]),
])
def test_changing_one_score_changes_exactly_its_cells(tmp_path, path, edit, cells):
    inputs = _all_runs(tmp_path)
    html_before, text_before = _run_report(inputs, tmp_path / "before")
    metrics = json.loads((tmp_path / path).read_text())
    edit(metrics)
    _write_json(tmp_path / path, metrics)
    html_after, text_after = _run_report(inputs, tmp_path / "after")
    assert _changed_cells(_tables(html_before), _tables(html_after)) == cells
    changed_lines = [(a, b) for a, b in zip(text_before.splitlines(), text_after.splitlines()) if a != b]
    assert len(changed_lines) == 1  # one summary.csv row: the score and its % of baseline


# --- LLaVA-1.5 without training ------------------------------------------------------------------

def _llava_inputs(root: Path, check=None) -> Path:
    """results/llava/vqa as mmskip evaluate_llava writes it: run.json and one folder per mode."""
    task_dir = root / "results/llava/vqa"
    pts = [{**BASELINE_POINT, "scores": {"accuracy": 0.6}},
           _skip_point("skip_block-generated-k2-s0", "skip_block", "generated", [2, 4], 0.57, 1.0, 0.7),
           _skip_point("skip_block-generated-k3-s0", "skip_block", "generated", [3], 0.3, 1.0, 0.85, 3)]
    _write_json(task_dir / "skip_block/metrics.json", {"task": "vqa", "modality": "image", "mode": "skip_block",
                                                      "num_examples": 40, "points": pts})
    _write_json(task_dir / "skip_block/timing.json", {"points": {p["key"]: {"decode": {"ms_per_step": 31.0}}
                                                                 for p in pts}})
    _write_json(task_dir / "run.json", {
        "task": "vqa", "model": {"id": "llava-hf/llava-1.5-7b-hf", "revision": "main", "commit": "a" * 40},
        "device": "cuda:0", "dtype": "float16", "num_layers": 32, "split": "test", "num_examples": 40,
        "batch_size": 8, "max_new_tokens": 10, "modes": ["skip_block"],
        "check_generate": check or {"examples": 8, "equal": 7}})
    return root / "results/llava"


def test_llava_grid_is_a_subsection_with_its_own_rows_and_run(tmp_path):
    inputs = _make_inputs(tmp_path)
    root = _llava_inputs(tmp_path)
    html, text = _run_report(inputs, tmp_path / "out", skip_dirs=_skip_inputs(tmp_path), llava_root=root)
    rows = [r for r in csv.DictReader(text.splitlines()) if r["family"] == "llava_skip"]
    assert [(r["skip_interval"], r["pct_of_baseline"]) for r in rows] == [
        ("", "100.0"), ("2", "95.0"), ("3", "50.0")]
    assert all(r["num_examples"] == "40" and r["task"] == "vqa" for r in rows)
    default = [r for r in csv.DictReader(text.splitlines()) if r["family"] == "skip"]
    assert len(default) == 4  # the default's grid unchanged beside it
    llava = _section(html, '<h3 id="llava">', '<h2 id="compression">')
    assert "llava-hf/llava-1.5-7b-hf @ main (commit " + "a" * 40 + ")" in llava and ">7 of 8<" in llava
    assert "cuda:0" in llava and "float16" in llava
    best = llava.split("Most compute skipped", 1)[1].split("</table>", 1)[0]
    assert "2, 4" in best and "95.0" in best and "50.0" not in best  # k2 keeps 95%, k3 does not keep 90%
    assert "<h4>vqa (accuracy; 40 test examples; unskipped 0.600)</h4>" in llava
    # without LLaVA results the section is absent; a run.json whose modes are missing is named
    html, _ = _run_report(inputs, tmp_path / "plain", skip_dirs=_skip_inputs(tmp_path))
    assert 'id="llava"' not in html
    shutil.rmtree(root / "vqa/skip_block")
    with pytest.raises(ValueError, match=r"vqa/run.json: its modes \['skip_block'\] need \{mode\}/metrics.json"):
        _run_report(inputs, tmp_path / "out2", llava_root=root)
    with pytest.raises(ValueError, match=r"no LLaVA grid found"):
        _run_report(inputs, tmp_path / "out3", llava_root=tmp_path / "nowhere")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_llava_alone_is_a_report_without_the_trained_sections_and_nothing_is_refused(tmp_path):
    """LLaVA without training (configs/paper/llava-1.5-7b.yaml): no evaluation folders, no training logs; the
    report has the LLaVA subsection and its rows only. With neither, the command refuses before reading."""
    from mmskip.cli import main

    inputs = _make_inputs(tmp_path)
    root = _llava_inputs(tmp_path)
    html, text = _run_report({**inputs, "eval_dirs": [], "foundation_dir": None, "mapper_logs_dir": None},
                             tmp_path / "out", llava_root=root)
    assert {r["family"] for r in csv.DictReader(text.splitlines())} == {"llava_skip"}
    assert "Nothing was trained in this run" in html and 'id="llava"' in html
    assert "<h3>Foundation models</h3>" not in html and "<h3>Mapper training</h3>" not in html
    assert 'id="results"' not in html and "No skip grid of a trained mapper in this run." in html
    with pytest.raises(SystemExit, match=r"nothing to report: give --eval folders .* or --llava_root"):
        main(["report", "--params", str(inputs["params_path"]), "--scenes", str(tmp_path), "--html",
              str(tmp_path / "none/all.html"), "--csv", str(tmp_path / "none/summary.csv")])
    assert not (tmp_path / "none").exists()

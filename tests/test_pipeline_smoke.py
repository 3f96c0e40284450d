"""End to end on a tiny config: Snakemake builds the report; then a change to an evaluation
parameter makes Snakemake and DVC redo only the evaluation and the report."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess

import pytest
import yaml

from workflow_utils import (BIN, is_measured, COMPRESS_METHODS, PRUNE_STATIC, REPO, RULES, SKIP_MODES, TASKS, VARIANTS, check, copy_workflow, dvc_init,
                            job_counts, read_params, run, write_params)

pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")

# Tiny sizes: the whole module should take a few minutes at most on 2 CPU cores.
SMOKE = {
    "data": {"image_size": 32, "num_train": 200, "num_val": 40, "num_test": 40,
             "num_text_scenes": 200, "min_objects": 1, "max_objects": 3,
             "questions_per_image": 3},
    "tokenizer": {"vocab_size": 400},
    "llm": {"hidden_size": 32, "num_layers": 4, "num_heads": 2, "ffn_dim": 64,
            "steps": 30, "batch_size": 16, "warmup_steps": 3},
    "llm_small": {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "ffn_dim": 32,
                  "steps": 20, "batch_size": 16, "warmup_steps": 3},
    "encoder": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 64,
                "steps": 20, "batch_size": 32, "warmup_steps": 2},
    "features": {"batch_size": 64, "shard_size": 100},  # several shards
    "mapper": {"num_query_tokens": 4, "num_layers": 1, "hidden_size": 32, "num_heads": 2,
               "vqa_steps": 20, "caption_steps": 20, "batch_size": 16, "warmup_steps": 2},
    "evaluation": {"batch_size": 32, "vqa_max_new_tokens": 3, "caption_max_new_tokens": 8},
    "skipping": {"intervals": [2], "start_layers": [0], "drop_last": [1], "vqa_questions": 30,
                 "caption_images": 10, "decode_batch_size": 8},
    "bench": {"hidden_size": 32, "num_layers": 4, "num_heads": 2, "ffn_dim": 64, "vocab_size": 128,
              "batch_sizes": [1, 2], "context_tokens": 8, "new_tokens": 4, "repeats": 1, "eval_examples": 8,
              "eval_batch_size": 4},
    "compression": {"sparsities": [0.5], "nm_patterns": ["2:4"], "num_calibration": 16, "calibration_batch_size": 8,
                    "vqa_questions": 30, "caption_images": 10, "decode_batch_size": 8, "train_vqa_steps": 10,
                    "small_vqa_steps": 10, "small_caption_steps": 10,
                    "train_caption_steps": 10},
    "report": {"num_qualitative": 2},
}
SUMMARY_COLUMNS = ["task", "modality", "variant", "metric", "score", "pct_of_baseline", "skip_mode", "skip_scope",
                   "skip_interval", "start_layer", "skipped_blocks", "decode_flops_fraction",
                   "prefill_flops_fraction", "decode_ms_per_token", "num_examples", "compression", "sparsity",
                   "sparsity_pattern", "calibration", "trained_with_compression", "llm_params"]
CAPTION_METRICS = {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}


def smoke_params() -> dict:
    """The repository's params.yaml with the SMOKE sizes (which must name existing keys)."""
    params = read_params(REPO / "params.yaml")
    for section, values in SMOKE.items():
        unknown = set(values) - set(params[section])
        assert not unknown, f"SMOKE names keys params.yaml lacks: {section}.{sorted(unknown)}"
        params[section].update(values)
    return params


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A workflow copy with the SMOKE params, run to the end by `snakemake --cores 2`."""
    path = copy_workflow(tmp_path_factory.mktemp("smoke"))
    write_params(path / "params.yaml", smoke_params())
    check(run([BIN / "snakemake", "--cores", "2"], cwd=path, timeout=900))
    return path


def _summary(path) -> list[dict]:
    with open(path / "reports" / "summary.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == SUMMARY_COLUMNS
        return list(reader)


def test_snakemake_builds_report_summary_logs_and_benchmarks(smoke):
    html = (smoke / "reports" / "all.html").read_text(encoding="utf-8")
    assert "<html" in html.lower()

    rows = _summary(smoke)
    assert {(r["task"], r["variant"]) for r in rows} == {(t, v) for t in TASKS for v in [*VARIANTS, "skip", "compress", "trained"]}
    trained = [r for r in rows if r["variant"] == "trained"]
    assert {(r["task"], r["compression"], r["trained_with_compression"]) for r in trained} == {
        (t, c, w) for t in TASKS for c, w in [("none", "False"), ("none", "True"), ("wanda", "False"), ("wanda", "True"),
                                             ("skip_block", "False"), ("skip_block", "True"), ("smaller_llm", "True")]}
    params = {r["compression"]: int(r["llm_params"]) for r in trained}
    assert params["smaller_llm"] < params["none"] == params["wanda"]
    for variant in ("dense", "pruned", "skipped", "small"):
        log = json.loads((smoke / f"results/mapper_{variant}/vqa.json").read_text())
        assert log["variant"] == variant
    assert json.loads((smoke / "results/mapper_pruned/vqa.json").read_text())["achieved_sparsity"] == pytest.approx(
        0.5, abs=0.02)
    assert json.loads((smoke / "results/mapper_skipped/vqa.json").read_text())["skip_plan"]["layers"] == [2]
    # the dense control and the pruned mapper start from the baseline and take the same steps
    control, pruned = (json.loads((smoke / f"results/mapper_{v}/vqa.json").read_text()) for v in ("dense", "pruned"))
    assert (control["init"], control["steps"]) == (pruned["init"], pruned["steps"]) == ("models/mapper/vqa", 10)
    assert control["loss_curve"] != pruned["loss_curve"]  # the same data order, another LLM
    compress = [r for r in rows if r["variant"] == "compress"]
    assert {(r["task"], r["compression"]) for r in compress} >= {(t, m) for t in TASKS for m in ("none", "magnitude",
                                                                                                 "wanda", "random")}
    for r in compress:
        if r["compression"] != "none":
            assert float(r["sparsity"]) == pytest.approx(0.5, abs=0.02), r
    index = json.loads((smoke / "models/masks/wanda/prune.json").read_text())
    assert {(e["task"], e["calibration"], e["pattern"]) for e in index["entries"]} == {
        (t, c, p) for t in TASKS for c, p in [("prompt", "unstructured"), ("prompt", "2:4"),
                                             ("prompt_answer", "unstructured"), ("text", "unstructured")]}
    skip = [r for r in rows if r["variant"] == "skip"]
    rows = [r for r in rows if r["variant"] not in ("skip", "compress", "trained")]
    assert not any(r["skip_mode"] for r in rows)
    # every mode and scope of the grid: 5 modes x 3 scopes x 1 interval x 1 start, drop_last 1, reference
    points = {(r["task"], r["skip_mode"], r["skip_scope"]) for r in skip}
    assert len(points) == len(TASKS) * (5 * 3 + 2)
    for r in skip:
        assert r["num_examples"] == str(SMOKE["skipping"]["vqa_questions" if r["task"] == "vqa" else "caption_images"])
        if r["skip_mode"] == "none":
            assert r["decode_flops_fraction"] == r["prefill_flops_fraction"] == "1.0"
            assert r["score"] == "0.0" or float(r["pct_of_baseline"]) == pytest.approx(100.0)
        if r["skip_mode"] == "skip_block" and r["skip_scope"] == "generated":
            assert float(r["decode_flops_fraction"]) < 1.0 == float(r["prefill_flops_fraction"])
    assert "6. Skipping" in html and "Speed benchmark" in html
    bench = json.loads((smoke / "results/bench/skip.json").read_text())
    assert set(bench["shapes"]) == {"1", "2"} and set(bench["batched_evaluation"]) == set(TASKS)
    assert {r["modality"] for r in rows} == {"image"}
    for variant in VARIANTS:
        metrics = {r["metric"] for r in rows if r["variant"] == variant}
        assert "accuracy" in metrics and CAPTION_METRICS <= metrics, (variant, metrics)
    for r in rows:
        if r["variant"] == "baseline" and float(r["score"]) > 0:
            assert float(r["pct_of_baseline"]) == pytest.approx(100.0), r

    for task in TASKS:
        for variant in VARIANTS:
            metrics = json.loads((smoke / "results/eval" / task / variant / "metrics.json").read_text())
            assert (metrics["task"], metrics["variant"]) == (task, variant)
            assert metrics["generation"]["max_new_tokens"] == SMOKE["evaluation"][f"{task}_max_new_tokens"]
    for rule in RULES:  # every rule logged and timed its jobs
        assert list((smoke / "logs" / rule).glob("*.log")), rule
        assert list((smoke / "benchmarks" / rule).glob("*.tsv")), rule


def test_adding_grid_points_reruns_only_the_skip_grid_and_report(smoke):
    params = read_params(smoke / "params.yaml")
    params["skipping"]["intervals"] = [2, 3]
    write_params(smoke / "params.yaml", params)
    try:
        dry = check(run([BIN / "snakemake", "-n"], cwd=smoke))
        assert job_counts(dry.stdout + dry.stderr) == {
            "evaluate_skip": len(TASKS) * len(SKIP_MODES), "report": 1, "all": 1}
    finally:
        params["skipping"]["intervals"] = [2]
        write_params(smoke / "params.yaml", params)


def test_adding_a_sparsity_reruns_only_compression_and_report(smoke):
    params = read_params(smoke / "params.yaml")
    params["compression"]["sparsities"] = [0.5, 0.7]
    write_params(smoke / "params.yaml", params)
    try:
        dry = check(run([BIN / "snakemake", "-n"], cwd=smoke))
        # the masks, their evaluations, and what reads the Wanda masks folder (the mapper trained with
        # pruning, and evaluate_trained); never the baseline, dense control, skipped or small mappers
        assert job_counts(dry.stdout + dry.stderr) == {
            "prune": len(PRUNE_STATIC), "prune_wanda": 1, "subnet": 1,
            "evaluate_compressed": len(TASKS) * len(COMPRESS_METHODS), "train_mapper_pruned": len(TASKS),
            "evaluate_trained": len(TASKS), "report": 1, "all": 1}
    finally:
        params["compression"]["sparsities"] = [0.5]
        write_params(smoke / "params.yaml", params)


@pytest.fixture(scope="module")
def smoke_lock(smoke) -> dict:
    """Adopt Snakemake's outputs as DVC's current state (``dvc commit``, nothing re-run): its dvc.lock."""
    dvc_init(smoke)
    check(run([BIN / "dvc", "commit", "--force", "--quiet"], cwd=smoke))
    assert json.loads(check(run([BIN / "dvc", "status", "--json"], cwd=smoke)).stdout) == {}
    return yaml.safe_load((smoke / "dvc.lock").read_text(encoding="utf-8"))


def _out_hashes(lock: dict) -> dict[str, str]:
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}


def _git(path, *args):
    subprocess.run(["git", "-c", "user.name=mmskip", "-c", "user.email=mmskip@localhost", *args], cwd=path,
                   check=True, capture_output=True)


def test_dvc_repro_in_another_folder_gives_byte_identical_artifacts(smoke, smoke_lock, tmp_path_factory):
    """A clean `dvc repro` elsewhere: dvc.lock's hashes equal those of the Snakemake run, measured wall times
    aside; then `dvc status` is clean, metrics and plots read, and an experiment re-runs only what it changes."""
    other = copy_workflow(tmp_path_factory.mktemp("dvc-clean"))
    write_params(other / "params.yaml", smoke_params())
    shutil.copy(REPO / ".gitignore", other / ".gitignore")  # pipeline outputs stay out of git, as in a clone
    _git(other, "init", "-q")  # a git repository: `dvc exp` needs one
    check(run([BIN / "dvc", "init", "--quiet"], cwd=other))
    _git(other, "add", "-A")
    _git(other, "commit", "-qm", "clean clone")
    check(run([BIN / "dvc", "repro", "--quiet"], cwd=other, timeout=1200))
    lock = yaml.safe_load((other / "dvc.lock").read_text(encoding="utf-8"))
    assert set(lock["stages"]) == set(smoke_lock["stages"])
    ours, theirs = _out_hashes(lock), _out_hashes(smoke_lock)
    assert set(ours) == set(theirs)
    measured = {p for p in ours if is_measured(p)}
    assert {p for p in ours if p.endswith("timing.json")} and "results/bench/skip.json" in measured
    differ = sorted(p for p in ours if p not in measured and ours[p] != theirs[p])
    assert not differ, f"artifacts differ between two clean runs: {differ}"
    # summary.csv: every column but the measured decode time
    with open(smoke / "reports/summary.csv", newline="") as a, open(other / "reports/summary.csv", newline="") as b:
        rows_a, rows_b = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert [dict(r, decode_ms_per_token=None) for r in rows_a] == [dict(r, decode_ms_per_token=None) for r in rows_b]
    assert json.loads(check(run([BIN / "dvc", "status", "--json"], cwd=other)).stdout) == {}

    # the lineage, read by the report while DVC ran it, matches dvc.lock for every upstream artifact
    lineage = json.loads((other / "reports/lineage.json").read_text())
    assert lineage["dvc_lock"] and lineage["code"]["git_commit"] and lineage["code"]["dirty"] is False
    for stage in lineage["stages"]:
        for artifact in stage["deps"] + stage["outs"]:
            if stage["name"] == "report":  # not locked yet while it runs: its outputs are being written, and
                # only what no other stage writes (params.yaml, the report's code) has no lock entry
                allowed = {"written by this stage"} if artifact in stage["outs"] else \
                    {"matches dvc.lock", "not in dvc.lock"}
                assert artifact["status"] in allowed, artifact  # folders of per-file outputs and
                # what no stage writes (params.yaml, results/skip, the report's code) have no lock entry
            else:
                assert artifact["status"] == "matches dvc.lock", (stage["name"], artifact)

    metrics = json.loads(check(run([BIN / "dvc", "metrics", "show", "--json"], cwd=other)).stdout)
    shown = {path for workspace in metrics.values() for path in workspace["data"]}
    assert {"results/eval/vqa/baseline/metrics.json", "results/bench/skip.json"} <= shown
    plots = json.loads(check(run([BIN / "dvc", "plots", "show", "--json", "--split"], cwd=other)).stdout)
    assert "errors" not in plots, plots["errors"]  # `--json` nests the plots under "data"
    assert set(plots["data"]) == {"Skipping, score vs decode FLOPs", "Compression, score vs sparsity"}
    assert all(entries and entries[0]["type"] == "vega" for entries in plots["data"].values()), plots["data"]
    rendered = tmp_path_factory.mktemp("dvc-plots")
    html = check(run([BIN / "dvc", "plots", "show", "-o", rendered], cwd=other))
    assert (rendered / "index.html").is_file(), html.stdout

    # `dvc exp run -S`: a report-only parameter re-runs the report alone
    _git(other, "add", "-A")
    _git(other, "commit", "-qm", "reproduced")
    before = _out_hashes(lock)
    exp = check(run([BIN / "dvc", "exp", "run", "-S", "report.num_qualitative=1"], cwd=other, timeout=600))
    assert set(re.findall(r"Running stage '([^']+)'", exp.stdout)) == {"report"}, exp.stdout
    after = _out_hashes(yaml.safe_load((other / "dvc.lock").read_text(encoding="utf-8")))
    assert {p for p in after if after[p] != before[p]} <= {"reports/all.html", "reports/lineage.json"}
    exps = check(run([BIN / "dvc", "exp", "show", "--json"], cwd=other)).stdout
    assert '"num_qualitative": 1' in exps


def test_evaluation_param_change_reruns_only_evaluate_and_report(smoke, smoke_lock):
    dry = check(run([BIN / "snakemake", "-n"], cwd=smoke))
    assert job_counts(dry.stdout + dry.stderr) == {}

    params = read_params(smoke / "params.yaml")
    params["evaluation"]["vqa_max_new_tokens"] += 1
    write_params(smoke / "params.yaml", params)

    dry = check(run([BIN / "snakemake", "-n"], cwd=smoke))
    # the skip grid and the benchmark read the generation lengths too
    assert job_counts(dry.stdout + dry.stderr) == {
        "evaluate": len(TASKS) * len(VARIANTS), "evaluate_skip": len(TASKS) * len(SKIP_MODES), "bench_skip": 1,
        "evaluate_compressed": len(TASKS) * len(COMPRESS_METHODS), "evaluate_trained": len(TASKS), "report": 1,
        "all": 1}

    status = json.loads(check(run([BIN / "dvc", "status", "--json"], cwd=smoke)).stdout)
    assert set(status) == ({f"evaluate@{t}-{v}" for t in TASKS for v in VARIANTS}
                           | {f"evaluate_skip@{t}-{m}" for t in TASKS for m in SKIP_MODES}
                           | {f"evaluate_compressed@{t}-{m}" for t in TASKS for m in COMPRESS_METHODS}
                           | {f"evaluate_trained@{t}" for t in TASKS} | {"bench_skip", "report"})

    # DVC's own commands redo exactly those stages, and leave the pipeline up to date.
    repro = check(run([BIN / "dvc", "repro"], cwd=smoke, timeout=900))
    ran = set(re.findall(r"Running stage '([^']+)'", repro.stdout))
    assert ran == set(status), repro.stdout
    assert json.loads(check(run([BIN / "dvc", "status", "--json"], cwd=smoke)).stdout) == {}
    metrics = json.loads((smoke / "results/eval/vqa/baseline/metrics.json").read_text())
    assert metrics["generation"]["max_new_tokens"] == params["evaluation"]["vqa_max_new_tokens"]
    assert _summary(smoke)


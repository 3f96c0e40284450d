"""End to end on a tiny config: Snakemake builds the report; every recorded score equals the metric
recomputed from the predictions written next to it; a change to an evaluation parameter makes Snakemake and
DVC plan only the evaluation and the report; a clean `dvc repro` elsewhere (started with the session, see
tests/conftest.py) writes the same bytes."""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from mmskip.data.formats import read_captions, read_vqa, scenes_paths
from mmskip.evaluation.caption_metric import caption_scores_many
from mmskip.evaluation.vqa_metric import vqa_scores
from mmskip.report.build import read_benchmarks
from workflow_utils import (BIN, is_measured, IMAGE_TASKS, MASK_SETS, PRUNE_STATIC, REPO, RULES, INPUTS, FAMILIES, check,
                            copy_workflow, dvc_init, git, job_counts, read_params, run, write_params, write_stages)

pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")

# The skip modes the smoke run covers, one of each kind: a sequential skip, a parallel one and a drop (the
# others run the same code with another mode; tests/test_skipping.py checks every mode's engine exactly).
SKIP_MODES = ["skip_block", "parallel_attn_ffn", "drop_last"]
SEQUENTIAL_MODES = [m for m in SKIP_MODES if m != "drop_last"]  # each under 3 scopes; drop_last has none
# The image tasks of params.yaml: the video and audio tasks add their data, encoder and cache stages and the same
# per-task stages (their end-to-end run: tests/test_tasks.py's third-task run, tests/test_clips.py's plan).
TASKS = IMAGE_TASKS
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
    # batches of 8: the grid and the compression sets (30 questions, 10 images) end in a shorter batch
    "evaluation": {"batch_size": 8, "vqa_max_new_tokens": 3, "caption_max_new_tokens": 8},
    "skipping": {"modes": SKIP_MODES, "intervals": [2], "start_layers": [0], "drop_last": [1], "vqa_questions": 30,
                 "caption_images": 10},
    "bench": {"hidden_size": 32, "num_layers": 4, "num_heads": 2, "ffn_dim": 64, "vocab_size": 128,
              "batch_sizes": [1, 2], "context_tokens": 8, "new_tokens": 4, "repeats": 5, "eval_examples": 8,
              "eval_batch_size": 4},
    # every token-level kind, one point each, within the 4 layers (after layer 1: a third of them, rounded)
    "token_skipping": {"visual_exit_layers": [1], "fastv_layers": [1], "fastv_keep": [0.5], "early_exit_layers": [2],
                       "exit_rates": [0.5], "calibration_examples": 8},
    "pruning": {"sparsities": [0.5], "nm_patterns": ["2:4"], "num_calibration": 16, "calibration_batch_size": 8},
    "compression": {"vqa_questions": 30, "caption_images": 10},
    "train_compressed": {"finetune_vqa_steps": 10, "finetune_caption_steps": 10, "small_vqa_steps": 10,
                         "small_caption_steps": 10, "sparsity": 0.5},  # the one sparsity pruned here
    "report": {"num_qualitative": 2},
}
SUMMARY_COLUMNS = ["task", "modality", "family", "metric", "score", "pct_of_baseline", "skip_mode", "skip_semantics", "skip_scope",
                   "skip_interval", "start_layer", "skipped_blocks", "decode_flops_fraction",
                   "prefill_flops_fraction", "decode_ms_per_token", "num_examples", "token_kind", "token_layer",
                   "visual_keep", "exit_rate", "exit_threshold", "exited_fraction", "decode_time_fraction",
                   "compression", "sparsity",
                   "sparsity_pattern", "calibration", "trained_with_compression", "llm_params"]
CAPTION_METRICS = {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}


def smoke_params() -> dict:
    """The repository's params.yaml with the SMOKE sizes (which must name existing keys) and tasks (write dvc.yaml
    for them with ``write_stages``)."""
    params = read_params(REPO / "params.yaml")
    params["tasks"] = TASKS
    for section, values in SMOKE.items():
        unknown = set(values) - set(params[section])
        assert not unknown, f"SMOKE names keys params.yaml lacks: {section}.{sorted(unknown)}"
        params[section].update(values)
    return params


# Session-scoped, as is ``elsewhere`` (tests/conftest.py): the test that waits for the clean `dvc repro` runs
# last in the session, and these must not be rebuilt when it comes back to this module.
@pytest.fixture(scope="session")
def smoke(tmp_path_factory, elsewhere):
    """A workflow copy with the SMOKE params, run to the end by `snakemake --cores 2` under the worker (while
    ``elsewhere`` may still run the same pipeline with `dvc repro`)."""
    path = copy_workflow(tmp_path_factory.mktemp("smoke"))
    write_params(path / "params.yaml", smoke_params())
    write_stages(path)  # for the smoke run's tasks (the DVC tests of this module use this copy too)
    # its jobs forked by the worker, as `make report` runs them (the `dvc repro` elsewhere runs without it: the
    # two must write the same bytes)
    check(run([BIN / "python", "-m", "mmskip.worker", "--threads", "1", "--", BIN / "snakemake", "--cores", "2"],
              cwd=path, timeout=1200))
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
    assert {(r["task"], r["family"]) for r in rows} == {(t, f) for t in TASKS for f in FAMILIES}
    trained = [r for r in rows if r["family"] == "trained"]
    assert {(r["task"], r["compression"], r["trained_with_compression"]) for r in trained} == {
        (t, c, w) for t in TASKS for c, w in [("none", "False"), ("none", "True"), ("wanda", "False"), ("wanda", "True"),
                                             ("skip_block", "False"), ("skip_block", "True"), ("smaller_llm", "True")]}
    params = {r["compression"]: int(r["llm_params"]) for r in trained}
    assert params["smaller_llm"] < params["none"] == params["wanda"]
    for variant in ("dense", "pruned", "skipped", "small"):
        log = json.loads((smoke / f"results/mapper_{variant}/vqa.json").read_text())
        assert log["variant"] == variant
    # the pruned mapper trained under the Wanda mask of its task, whose sparsity prune_wanda measured
    pruned_log = json.loads((smoke / "results/mapper_pruned/vqa.json").read_text())
    wanda = json.loads((smoke / "models/masks/wanda/prune.json").read_text())
    (trained_under,) = [e for e in wanda["entries"] if f"models/masks/wanda/{e['path']}" == pruned_log["mask"]]
    assert (trained_under["task"], trained_under["pattern"]) == ("vqa", "unstructured")
    assert pruned_log["achieved_sparsity"] == trained_under["achieved"]["overall"]
    assert pruned_log["achieved_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert json.loads((smoke / "results/mapper_skipped/vqa.json").read_text())["skip_plan"]["layers"] == [0, 2]
    # the dense control and the pruned mapper start from the baseline and take the same steps
    control, pruned = (json.loads((smoke / f"results/mapper_{v}/vqa.json").read_text()) for v in ("dense", "pruned"))
    assert (control["init"], control["steps"]) == (pruned["init"], pruned["steps"]) == ("models/mapper/vqa", 10)
    assert control["loss_curve"] != pruned["loss_curve"]  # the same data order, another LLM
    compress = [r for r in rows if r["family"] == "compress"]
    subnet = json.loads((smoke / "models/masks/subnet/subnet.json").read_text())
    rules = [e["rule"] for e in subnet["entries"]]
    assert rules
    assert {(r["task"], r["compression"]) for r in compress} == {
        (t, m) for t in TASKS for m in ("none", "magnitude", "wanda", "random", *(f"subnet:{rule}" for rule in rules))}
    # every row's sparsity is the one its mask index measured (0 for the dense reference), within
    # rounding of the mask's target
    entries = [(f"subnet:{e['rule']}", e) for e in subnet["entries"]] + [
        (method, e) for method in (*PRUNE_STATIC, "wanda")
        for e in json.loads((smoke / f"models/masks/{method}/prune.json").read_text())["entries"]]
    achieved = {(t, "none", "", ""): 0.0 for t in TASKS}
    for label, e in entries:
        assert e["achieved"]["overall"] == pytest.approx(e["sparsity"], abs=0.02), e
        for t in ([e["task"]] if e["task"] else TASKS):
            achieved[t, label, e["pattern"], e["calibration"] or ""] = e["achieved"]["overall"]
    for r in compress:
        assert float(r["sparsity"]) == achieved[r["task"], r["compression"], r["sparsity_pattern"], r["calibration"]], r
    assert {float(r["sparsity"]) for r in compress if r["compression"] != "none"} == {
        value for key, value in achieved.items() if key[1] != "none"}
    index = wanda
    assert {(e["task"], e["calibration"], e["pattern"]) for e in index["entries"]} == {
        (t, c, p) for t in TASKS for c, p in [("prompt", "unstructured"), ("prompt", "2:4"),
                                             ("prompt_answer", "unstructured"), ("text", "unstructured"),
                                             ("only_prompt", "unstructured")]}
    skip = [r for r in rows if r["family"] == "skip"]
    tokens = [r for r in rows if r["family"] == "tokens"]
    rows = [r for r in rows if r["family"] not in ("skip", "tokens", "compress", "trained")]
    assert not any(r["skip_mode"] for r in rows)
    # every mode and scope of the grid: the sequential modes x 3 scopes x 1 interval x 1 start, drop_last 1, baseline
    points = {(r["task"], r["skip_mode"], r["skip_scope"]) for r in skip}
    assert len(points) == len(TASKS) * (len(SEQUENTIAL_MODES) * 3 + 2)
    # every point under both semantics (params default), each row naming its own; the baseline has none
    assert {(r["skip_mode"] == "none", r["skip_semantics"]) for r in skip} == {
        (True, ""), (False, "textbook"), (False, "official")}
    for r in skip:
        assert r["num_examples"] == str(SMOKE["skipping"]["vqa_questions" if r["task"] == "vqa" else "caption_images"])
    # the baseline point: full compute, and 100% of itself (no percentage of a zero score)
    reference = [r for r in skip if r["skip_mode"] == "none"]
    assert sorted((r["task"], r["metric"]) for r in reference) == sorted(
        [("vqa", "accuracy")] + [("caption", m) for m in CAPTION_METRICS | {"BLEU-1", "BLEU-2", "BLEU-3"}])
    for r in reference:
        assert r["decode_flops_fraction"] == r["prefill_flops_fraction"] == "1.0", r
        assert r["pct_of_baseline"] == ("100.0" if float(r["score"]) != 0.0 else ""), r
    # skipping blocks while generating leaves the prompt's prefill whole
    generated = [r for r in skip if (r["skip_mode"], r["skip_scope"]) == ("skip_block", "generated")]
    assert {r["task"] for r in generated} == set(TASKS)
    for r in generated:
        assert float(r["decode_flops_fraction"]) < 1.0 == float(r["prefill_flops_fraction"]), r
    assert "8. Skipping" in html and "Speed benchmark" in html
    # the token grid: one point of each kind per task, on the skip grid's examples; visual tokens leaving save
    # prefill FLOPs, early exit saves decode FLOPs at the calibrated threshold, the share that exited recorded
    assert {(r["task"], r["token_kind"], r["token_layer"]) for r in tokens} == {
        (t, k, layer) for t in TASKS for k, layer in (("visual_exit", "1"), ("fastv", "1"), ("early_exit", "2"))}
    for r in tokens:
        assert r["num_examples"] == str(SMOKE["skipping"]["vqa_questions" if r["task"] == "vqa" else "caption_images"])
        if r["token_kind"] == "early_exit":
            assert float(r["prefill_flops_fraction"]) == 1.0 and float(r["exit_threshold"]) > 0, r
            assert 0.0 <= float(r["exited_fraction"]) <= 1.0 and r["exit_rate"] == "0.5", r
        else:
            assert float(r["prefill_flops_fraction"]) < 1.0 and r["exit_threshold"] == "", r
    for task in TASKS:
        kinds = {k: json.loads((smoke / f"results/tokens/{task}/{k}/metrics.json").read_text()) for k in
                 ("visual_exit", "fastv", "early_exit")}
        # the token engine with nothing leaving agrees with the baseline decode on every example
        assert {m["same_as_baseline"] for m in kinds.values()} == {kinds["fastv"]["num_examples"]}
        assert len({json.dumps(m["points"][0]) for m in kinds.values()}) == 1  # one baseline point for all
    assert "Token-level skipping (mmskip evaluate_tokens)" in html
    bench = json.loads((smoke / "results/bench/skip.json").read_text())
    assert set(bench["shapes"]) == {"1", "2"} and set(bench["batched_evaluation"]) == set(TASKS)
    assert {r["modality"] for r in rows} == {"image"}
    baseline_score = {(r["task"], r["metric"]): float(r["score"]) for r in rows if r["family"] == "baseline"}
    for task in TASKS:
        for input, family in zip(INPUTS, ("baseline", "blind"), strict=True):
            metrics = json.loads((smoke / "results/eval" / task / input / "metrics.json").read_text())
            assert (metrics["task"], metrics["input"]) == (task, input)
            assert metrics["generation"]["max_new_tokens"] == SMOKE["evaluation"][f"{task}_max_new_tokens"]
            expected = ({"accuracy", *(f"accuracy/{q}" for q in metrics["per_question_type"])} if task == "vqa"
                        else CAPTION_METRICS | {"BLEU-1", "BLEU-2", "BLEU-3"})
            assert {r["metric"] for r in rows if (r["task"], r["family"]) == (task, family)} == expected
    # pct_of_baseline: 100 * score / baseline score of the same task and metric; empty for a zero baseline
    for r in rows:
        base = baseline_score[r["task"], r["metric"]]
        assert r["pct_of_baseline"] == (repr(100.0 * (float(r["score"]) / base)) if base != 0.0 else ""), r
    video_audio = ("make_clips", "make_sounds", "pretrain_video_encoder", "pretrain_audio_encoder")
    for rule in (r for r in RULES if r not in video_audio):  # every rule of the image tasks logged and timed its jobs
        assert list((smoke / "logs" / rule).glob("*.log")), rule
        assert list((smoke / "benchmarks" / rule).glob("*.tsv")), rule
    # every one-thread job ran in the worker, the others alone (Snakemake sets OMP_NUM_THREADS and the like to their
    # count); the timings take the worker's measure of a job's peak memory, not its client's
    two_threads = {"pretrain_llm", "bench_skip"}
    for log in (smoke / "logs").glob("*/*.log"):
        text = log.read_text(encoding="utf-8")
        warm = re.search(r"mmskip\.worker: the job ran in the worker: peak RSS [0-9.]+ MB, CPU [0-9.]+ s\n\Z", text)
        declined = ("the worker declined this job (environment variables read at import differ from the worker's: "
                    "GOTO_NUM_THREADS, MKL_NUM_THREADS, NUMEXPR_NUM_THREADS, OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, "
                    "VECLIB_MAXIMUM_THREADS); running here")
        if log.parent.name in two_threads:
            assert not warm and declined in text, log
        else:
            assert warm and "running here" not in text, log
    timings = read_benchmarks(smoke / "benchmarks")
    assert timings and all(t["max_rss"] is not None and t["max_rss"] > 100 for t in timings), timings


def _scored_sets(root: Path) -> list[dict]:
    """Every prediction set the run scored, with the scores recorded for it.

    ``results/eval/{task}/{input}``: ``predictions.json`` ``items`` (one prediction each) and
    ``metrics.json`` ``scores`` (VQA also ``per_question_type``). ``results/baseline/{task}``:
    ``predictions.json`` ``ids`` and ``predictions`` and ``metrics.json`` ``scores``. ``results/{skip,compress}/{task}/{x}``
    and ``results/trained/{task}``: ``predictions.json`` ``ids`` and ``predictions: {key: [...]}``, and
    ``metrics.json`` ``points``, each scored as the prediction set of its ``same_as`` key (or its own).
    """
    sets = []
    for metrics_path in sorted((root / "results/eval").glob("*/*/metrics.json")):
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        items = json.loads((metrics_path.parent / "predictions.json").read_text(encoding="utf-8"))["items"]
        id_field = "question_id" if metrics["task"] == "vqa" else "image_id"
        recorded = {"scores": metrics["scores"]}
        if metrics["task"] == "vqa":
            recorded["per_question_type"] = metrics["per_question_type"]
        sets.append({"where": str(metrics_path.parent.relative_to(root)), "task": metrics["task"],
                     "split": metrics["split"], "ids": [item[id_field] for item in items],
                     "predictions": [item["prediction"] for item in items], "recorded": [recorded]})
    for metrics_path in sorted((root / "results/baseline").glob("*/metrics.json")):
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        written = json.loads((metrics_path.parent / "predictions.json").read_text(encoding="utf-8"))
        assert metrics["num_examples"] == len(written["ids"]) == len(written["predictions"]), metrics_path
        sets.append({"where": str(metrics_path.parent.relative_to(root)), "task": metrics["task"],
                     "split": metrics["split"], "ids": written["ids"], "predictions": written["predictions"],
                     "recorded": [{"scores": metrics["scores"]}]})
    for pattern in ("results/skip/*/*/metrics.json", "results/compress/*/*/metrics.json",
                    "results/trained/*/metrics.json"):
        for metrics_path in sorted(root.glob(pattern)):
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
            written = json.loads((metrics_path.parent / "predictions.json").read_text(encoding="utf-8"))
            assert metrics["num_examples"] == len(written["ids"]), metrics_path
            scored_as = {key: [] for key in written["predictions"]}
            for point in metrics["points"]:
                scored_as[point.get("same_as") or point["key"]].append({"scores": point["scores"]})
            for key, predictions in written["predictions"].items():
                assert scored_as[key], f"{metrics_path}: no point is scored with the predictions of {key!r}"
                sets.append({"where": f"{metrics_path.parent.relative_to(root)} {key}", "task": metrics["task"],
                             "split": metrics["split"], "ids": written["ids"], "predictions": predictions,
                             "recorded": scored_as[key]})
    return sets


def test_every_recorded_score_is_the_metric_of_the_written_predictions(smoke):
    """Each metrics.json score equals vqa_scores / caption_scores_many recomputed here from its
    predictions.json and the references of data/scenes (caption sets with the same images scored
    together: the same numbers as one at a time, tests/test_caption_metric.py)."""
    sets = _scored_sets(smoke)
    counts = {kind: sum(s["where"].startswith(f"results/{kind}/") for s in sets)
              for kind in ("eval", "baseline", "skip", "compress", "trained")}
    assert counts["eval"] == len(TASKS) * len(INPUTS) and counts["baseline"] == len(TASKS)
    assert counts["trained"] == len(TASKS) * 7  # the baseline, the dense control, pruned and skipped x 2, small
    assert counts["skip"] >= len(TASKS) * len(SKIP_MODES) and counts["compress"] > len(TASKS) * len(MASK_SETS)
    assert {s["task"] for s in sets} == set(TASKS)
    # per task: the sequential modes x 3 scopes and drop_last under each of the two semantics, and each mode's
    # baseline
    assert sum(len(s["recorded"]) for s in sets if s["where"].startswith("results/skip/")) == len(TASKS) * (
        2 * (len(SEQUENTIAL_MODES) * 3 + 1) + len(SKIP_MODES))

    references: dict[str, tuple[dict, dict]] = {}
    for split in sorted({s["split"] for s in sets}):
        paths = scenes_paths(smoke / "data/scenes", split)
        references[split] = ({e.question_id: e for e in read_vqa(paths["vqa_questions"], paths["vqa_annotations"])},
                             {e.image_id: list(e.captions) for e in read_captions(paths["captions"])})
    for s in sets:
        if s["task"] == "vqa":
            questions = references[s["split"]][0]
            scored = vqa_scores([{"prediction": p, "answers": list(questions[i].answers),
                                  "question_type": questions[i].question_type}
                                 for i, p in zip(s["ids"], s["predictions"], strict=True)])
            s["recomputed"] = {"scores": {"accuracy": scored["accuracy"]},
                               "per_question_type": scored["per_question_type"]}
    caption_sets = [s for s in sets if s["task"] == "caption"]
    for split, ids in sorted({(s["split"], tuple(s["ids"])) for s in caption_sets}):
        group = [s for s in caption_sets if (s["split"], tuple(s["ids"])) == (split, ids)]
        captions = references[split][1]
        scored = caption_scores_many([dict(zip(ids, s["predictions"], strict=True)) for s in group],
                                     {i: captions[i] for i in ids})
        for s, scores in zip(group, scored, strict=True):
            s["recomputed"] = {"scores": scores}
    for s in sets:
        # only the evaluation of the whole split records VQA's per-question-type breakdown
        with_breakdown = s["task"] == "vqa" and s["where"].startswith("results/eval/")
        expected = s["recomputed"] if with_breakdown else {"scores": s["recomputed"]["scores"]}
        for recorded in s["recorded"]:
            assert recorded == expected, s["where"]


@pytest.mark.parametrize("section, key, points, rule", [
    ("skipping", "intervals", [2, 3], "evaluate_skip"),  # a skip grid point
    ("token_skipping", "exit_rates", [0.25, 0.5], "evaluate_tokens"),  # a token grid point
])
def test_adding_grid_points_reruns_only_their_grid_and_report(smoke, section, key, points, rule):
    params = read_params(smoke / "params.yaml")
    before = params[section][key]
    params[section][key] = points
    write_params(smoke / "params.yaml", params)
    try:
        dry = check(run([BIN / "snakemake", "-n"], cwd=smoke))
        assert job_counts(dry.stdout + dry.stderr) == {rule: len(TASKS), "report": 1, "all": 1}
    finally:
        params[section][key] = before
        write_params(smoke / "params.yaml", params)


def test_adding_a_sparsity_reruns_only_compression_and_report(smoke):
    params = read_params(smoke / "params.yaml")
    params["pruning"]["sparsities"] = [0.5, 0.7]
    write_params(smoke / "params.yaml", params)
    try:
        dry = check(run([BIN / "snakemake", "-n"], cwd=smoke))
        # the masks, their evaluations, and what reads the Wanda masks folder (the mapper trained with
        # pruning, and evaluate_trained); never the baseline, dense control, skipped or small mappers
        assert job_counts(dry.stdout + dry.stderr) == {
            "prune": len(PRUNE_STATIC), "prune_wanda": 1, "subnet": 1,
            "evaluate_compressed": len(TASKS), "train_compressed": len(TASKS),
            "evaluate_trained": len(TASKS), "report": 1, "all": 1}
    finally:
        params["pruning"]["sparsities"] = [0.5]
        write_params(smoke / "params.yaml", params)


@pytest.fixture(scope="session")
def smoke_lock(smoke) -> dict:
    """Adopt Snakemake's outputs as DVC's current state (``dvc commit``, nothing re-run): its dvc.lock."""
    dvc_init(smoke)
    check(run([BIN / "dvc", "commit", "--force", "--quiet"], cwd=smoke))
    assert json.loads(check(run([BIN / "dvc", "status", "--json"], cwd=smoke)).stdout) == {}
    return yaml.safe_load((smoke / "dvc.lock").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def snakemake_state(smoke, smoke_lock) -> dict:
    """The Snakemake run's dvc.lock and summary rows, taken before any test changes its folder."""
    with open(smoke / "reports/summary.csv", newline="", encoding="utf-8") as f:
        return {"lock": smoke_lock, "summary": list(csv.DictReader(f))}


def _out_hashes(lock: dict) -> dict[str, str]:
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}


def test_evaluation_param_change_reruns_only_evaluate_and_report(smoke, snakemake_state):
    dry = check(run([BIN / "snakemake", "-n"], cwd=smoke))
    assert job_counts(dry.stdout + dry.stderr) == {}

    # a token limit: the baseline decode, the families compared with it and the benchmark read it too
    params = read_params(smoke / "params.yaml")
    params["evaluation"]["vqa_max_new_tokens"] += 1
    write_params(smoke / "params.yaml", params)
    dry = check(run([BIN / "snakemake", "-n"], cwd=smoke))
    assert job_counts(dry.stdout + dry.stderr) == {
        "evaluate": len(TASKS), "baseline": len(TASKS), "evaluate_skip": len(TASKS), "evaluate_tokens": len(TASKS),
        "bench_skip": 1, "evaluate_compressed": len(TASKS), "evaluate_trained": len(TASKS),
        "report": 1, "all": 1}
    status = json.loads(check(run([BIN / "dvc", "status", "--json"], cwd=smoke)).stdout)
    assert set(status) == ({f"evaluate@{t}" for t in TASKS} | {f"baseline@{t}" for t in TASKS}
                           | {f"evaluate_skip@{t}" for t in TASKS} | {f"evaluate_tokens@{t}" for t in TASKS}
                           | {f"evaluate_compressed@{t}" for t in TASKS}
                           | {f"evaluate_trained@{t}" for t in TASKS} | {"bench_skip", "report"})

    # beam search: only the Hugging Face evaluation reads it, so only it and the report are stale
    params["evaluation"]["vqa_max_new_tokens"] -= 1
    params["evaluation"]["num_beams"] = 2
    write_params(smoke / "params.yaml", params)
    dry = check(run([BIN / "snakemake", "-n"], cwd=smoke))
    assert job_counts(dry.stdout + dry.stderr) == {"evaluate": len(TASKS), "report": 1, "all": 1}
    status = json.loads(check(run([BIN / "dvc", "status", "--json"], cwd=smoke)).stdout)
    assert set(status) == {f"evaluate@{t}" for t in TASKS} | {"report"}

    # DVC's own `repro` plans exactly those stages; one of them, run, decodes with the new beam and is
    # up to date, the others stay stale (the clean `dvc repro` elsewhere runs every stage of the pipeline)
    plan = check(run([BIN / "dvc", "repro", "--dry"], cwd=smoke))
    assert set(re.findall(r"Running stage '([^']+)'", plan.stdout)) == set(status), plan.stdout
    check(run([BIN / "dvc", "repro", "--single-item", "evaluate@vqa"], cwd=smoke, timeout=600))
    status_after = json.loads(check(run([BIN / "dvc", "status", "--json"], cwd=smoke)).stdout)
    assert set(status_after) == set(status) - {"evaluate@vqa"}
    metrics = json.loads((smoke / "results/eval/vqa/multimodal/metrics.json").read_text())
    assert metrics["generation"]["num_beams"] == 2


@pytest.mark.waits_for_background  # last in the session: the clean `dvc repro` runs beside the other tests
def test_dvc_repro_in_another_folder_gives_byte_identical_artifacts(elsewhere, snakemake_state, tmp_path_factory):
    """A clean `dvc repro` elsewhere: dvc.lock's hashes equal those of the Snakemake run, measured wall times
    aside; then `dvc status` is clean, metrics and plots read, and an experiment re-runs only what it changes."""
    other, repro, log = elsewhere
    try:
        code = repro.wait(timeout=1800)
    except subprocess.TimeoutExpired:
        repro.kill()
        raise AssertionError(f"dvc repro ran over 30 minutes\n{log.read_text()[-6000:]}") from None
    assert code == 0, f"dvc repro exited {code}\n{log.read_text()[-12000:]}"
    smoke_lock = snakemake_state["lock"]
    lock = yaml.safe_load((other / "dvc.lock").read_text(encoding="utf-8"))
    assert set(lock["stages"]) == set(smoke_lock["stages"])
    ours, theirs = _out_hashes(lock), _out_hashes(smoke_lock)
    assert set(ours) == set(theirs)
    measured = {p for p in ours if is_measured(p)}
    assert {p for p in ours if p.endswith("timing.json")} and "results/bench/skip.json" in measured
    differ = sorted(p for p in ours if p not in measured and ours[p] != theirs[p])
    assert not differ, f"artifacts differ between two clean runs: {differ}"
    # summary.csv: every column but the measured decode time
    with open(other / "reports/summary.csv", newline="") as b:
        rows_a, rows_b = snakemake_state["summary"], list(csv.DictReader(b))
    timed = {"decode_ms_per_token": None, "decode_time_fraction": None}  # wall times
    assert [dict(r, **timed) for r in rows_a] == [dict(r, **timed) for r in rows_b]
    assert json.loads(check(run([BIN / "dvc", "status", "--json"], cwd=other)).stdout) == {}

    # the lineage, read by the report while DVC ran it, matches dvc.lock for every upstream artifact
    lineage = json.loads((other / "reports/lineage.json").read_text())
    assert lineage["dvc_lock"] and lineage["code"]["git_commit"] and lineage["code"]["dirty"] is False
    # The report is not locked yet while it runs: its outputs are being written, and what it reads is
    # checked against the lock entry of the stage that wrote it; what no stage writes (params.yaml,
    # the report's code, folders of per-file outputs) has no lock entry.
    written_by_others = {path for name, stage in lock["stages"].items() if name != "report"
                         for path in _out_hashes({"stages": {name: stage}})}
    (report,) = [stage for stage in lineage["stages"] if stage["name"] == "report"]
    assert {a["status"] for a in report["outs"]} == {"written by this stage"}
    for artifact in report["deps"]:
        expected = "matches dvc.lock" if artifact["path"] in written_by_others else "not in dvc.lock"
        assert artifact["status"] == expected, artifact
    assert {a["path"] for a in report["deps"]} & written_by_others  # it does read pipeline outputs
    for stage in lineage["stages"]:
        if stage["name"] != "report":
            for artifact in stage["deps"] + stage["outs"]:
                assert artifact["status"] == "matches dvc.lock", (stage["name"], artifact)
    # the machine that computed these bytes
    assert set(lineage["machine"]) == {"cpu_capability", "machine", "processor", "os", "torch_threads_default",
                                       "cuda", "torch_build"}

    metrics = json.loads(check(run([BIN / "dvc", "metrics", "show", "--json"], cwd=other)).stdout)
    shown = {path for workspace in metrics.values() for path in workspace["data"]}
    assert {"results/eval/vqa/multimodal/metrics.json", "results/bench/skip.json"} <= shown
    plots = json.loads(check(run([BIN / "dvc", "plots", "show", "--json", "--split"], cwd=other)).stdout)
    assert "errors" not in plots, plots["errors"]  # `--json` nests the plots under "data"
    assert set(plots["data"]) == {"Skipping, score vs decode FLOPs", "Compression, score vs sparsity"}
    assert all(entries and entries[0]["type"] == "vega" for entries in plots["data"].values()), plots["data"]
    rendered = tmp_path_factory.mktemp("dvc-plots")
    html = check(run([BIN / "dvc", "plots", "show", "-o", rendered], cwd=other))
    assert (rendered / "index.html").is_file(), html.stdout

    # `dvc exp run -S`: a report-only parameter re-runs the report alone
    git(other, "add", "-A")
    git(other, "commit", "-qm", "reproduced")
    before = _out_hashes(lock)
    exp = check(run([BIN / "dvc", "exp", "run", "-S", "report.num_qualitative=1"], cwd=other, timeout=600))
    assert set(re.findall(r"Running stage '([^']+)'", exp.stdout)) == {"report"}, exp.stdout
    after = _out_hashes(yaml.safe_load((other / "dvc.lock").read_text(encoding="utf-8")))
    # the HTML shows fewer examples; the lineage holds the report's new parameter value and commit
    assert {p for p in after if after[p] != before[p]} == {"reports/all.html", "reports/lineage.json"}
    exps = check(run([BIN / "dvc", "exp", "show", "--json"], cwd=other)).stdout
    assert '"num_qualitative": 1' in exps


def test_the_report_opens_offline_in_headless_chromium(smoke):
    # README, Quick start: Debian's chromium; the check fails (it does not skip) where it is missing
    from browser import open_report

    shot = smoke / "reports" / "all.png"
    page = open_report(smoke / "reports" / "all.html", shot)
    assert page["requests"] == [page["url"]], "the page asked for more than its own file"
    assert page["console"] == [] and page["errors"] == []
    assert page["images"] and [i["alt"] for i in page["images"] if not (i["complete"] and i["width"] > 0)] == []
    assert page["widest"] <= 1280 and page["scroll_width"] <= 1280, (page["widest"], page["scroll_width"])
    # what a reader came for first: the headline in the first screen, every section in the table of contents
    assert page["headings"][:3] == ["1. Headline", "2. Pareto frontier", "3. Findings"]
    assert page["headline_top"] < 900
    assert set(page["toc"]) <= set(page["ids"]) and len(page["toc"]) == len(page["headings"])
    assert shot.stat().st_size > 10_000

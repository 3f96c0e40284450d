"""The task registry: entries hold everything about a task, and nothing outside it branches on one.

The last test registers a third task (existence questions only) in a copy of the workflow, names it in
params' `tasks` and runs it through the pipeline with no other change: the stage table, the runners, the
trainer and the report pick it up from the registry. Beside it runs the embedded audio QA task, whose dataset
(the generated sounds), encoder and feature cache are its own."""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

import pytest

from mmskip.data.formats import read_captions, read_vqa, scenes_paths
from mmskip.data.scenes import make_scenes
from mmskip.evaluation.caption_metric import caption_scores_many
from mmskip.evaluation.scoring import score
from mmskip.evaluation.vqa_metric import vqa_scores
from mmskip.params import (MapperTrainConfig, Params, ParamsError, PromptsConfig, ScenesConfig, StepSharesConfig,
                           TrainCompressedConfig)
from mmskip.tasks import CAPTION, TASKS, VQA, Task, get_task, headline, register
from workflow_utils import BIN, REPO, check, copy_workflow, read_params, run, write_params

SRC = REPO / "src" / "mmskip"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes") / "scenes"
    make_scenes(root, seed=0, cfg=ScenesConfig(image_size=24, num_train=12, num_val=4, num_test=6,
                                               num_text_scenes=4, min_objects=1, max_objects=3,
                                               questions_per_image=6))
    return root


def test_unknown_task_is_refused_naming_the_registered_ones():
    with pytest.raises(ValueError, match=r"task='vqa2': allowed \['audio_caption', 'audio_qa', 'audiocaps', 'caption', "
                                         r"'clotho', 'clotho_aqa', 'gqa', 'msrvtt', 'msrvtt_qa', 'okvqa', "
                                         r"'video_caption', 'video_qa', 'vqa'\]"):
        get_task("vqa2")


def test_the_run_reads_its_own_dataset_unless_a_task_names_one():
    """OK-VQA, GQA, MSR-VTT, MSRVTT-QA, Clotho, Clotho-AQA and AudioCaps read dataset folders of their own (paper
    scale), the embedded video and audio tasks the generated clips and sounds; the default tasks are the others."""
    from mmskip.tasks import default_tasks, tasks_of, tasks_of_dataset

    assert {name: task.dataset for name, task in TASKS.items() if task.dataset} == {
        "okvqa": "okvqa", "gqa": "gqa", "msrvtt": "msrvtt", "msrvtt_qa": "msrvtt_qa", "clotho": "clotho",
        "clotho_aqa": "clotho_aqa", "audiocaps": "audiocaps", "video_qa": "clips", "video_caption": "clips",
        "audio_qa": "sounds", "audio_caption": "sounds"}
    assert tasks_of_dataset("sounds") == (TASKS["audio_qa"], TASKS["audio_caption"])
    assert tasks_of_dataset("clips") == (TASKS["video_qa"], TASKS["video_caption"])
    assert TASKS["video_qa"].modality == TASKS["msrvtt_qa"].modality == "video"
    assert TASKS["clotho_aqa"].modality == "audio" and TASKS["clotho_aqa"].format is TASKS["vqa"].format
    assert tasks_of_dataset("") == (TASKS["vqa"], TASKS["caption"])
    assert TASKS["audio_qa"].modality == TASKS["audio_caption"].modality == "audio"
    assert TASKS["msrvtt"].modality == "video" and TASKS["msrvtt"].format is TASKS["caption"].format
    assert TASKS["clotho"].modality == "audio" and TASKS["clotho"].format is TASKS["caption"].format
    assert default_tasks() == ("vqa", "caption") == tasks_of({}) and tasks_of({"tasks": ["gqa"]}) == ("gqa",)
    assert TASKS["okvqa"].format is TASKS["gqa"].format is TASKS["vqa"].format  # scored, prompted as VQAv2


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match=r"task 'vqa' is registered already"):
        register(Task("vqa", "image", CAPTION))
    assert register(TASKS["vqa"]) is TASKS["vqa"]  # the same entry again changes nothing


def test_entries_read_the_dataset_files_in_order(scenes):
    paths = scenes_paths(scenes, "test")
    questions = read_vqa(paths["vqa_questions"], paths["vqa_annotations"])
    captions = read_captions(paths["captions"])
    assert get_task("vqa").examples(scenes, "test") == questions
    assert get_task("caption").examples(scenes, "test") == captions
    prompts = PromptsConfig(vqa_prompt="Q: {question} A:", caption_prompt="Describe:")
    assert get_task("vqa").training_pairs(scenes, "test", prompts) == [
        (q.image_id, f"Q: {q.question} A:", q.multiple_choice_answer) for q in questions]
    assert get_task("caption").training_pairs(scenes, "test", prompts) == [
        (c.image_id, "Describe:", text) for c in captions for text in c.captions]
    assert headline("vqa") == "accuracy" and headline("caption") == "CIDEr"


def test_a_subset_task_keeps_only_its_question_types(scenes):
    exist = Task("exist_only", "image", VQA, question_types=("exist",))
    kept = exist.examples(scenes, "test")
    every = get_task("vqa").examples(scenes, "test")
    assert kept == [q for q in every if q.question_type == "exist"] and 0 < len(kept) < len(every)
    with pytest.raises(ValueError, match=r"task 'none_such': no examples in split 'test'"):
        Task("none_such", "image", VQA, question_types=("no such type",)).examples(scenes, "test")


def test_scoring_goes_through_the_format_metric(scenes):
    vqa = get_task("vqa")
    questions = vqa.examples(scenes, "test")
    runs = [[q.multiple_choice_answer for q in questions], ["no"] * len(questions)]
    results = score(vqa, questions, runs, breakdown=True)
    for result, predictions in zip(results, runs):
        expected = vqa_scores(vqa.items(questions, predictions))
        assert result == {"scores": {"accuracy": expected["accuracy"]},
                          "per_question_type": expected["per_question_type"]}
    caption = get_task("caption")
    images = caption.examples(scenes, "test")
    runs = [[c.captions[-1] for c in images], ["a thing"] * len(images)]
    expected = caption_scores_many([{c.image_id: p for c, p in zip(images, r)} for r in runs],
                                   {c.image_id: list(c.captions) for c in images})
    assert score(caption, images, runs) == [{"scores": e} for e in expected]


def _task_name_comparisons(path: Path) -> list[str]:
    """`x == "vqa"`-style comparisons (and `in (...)` tests) against a registered task's name."""
    names = set(TASKS)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            literals = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
            for c in node.comparators:
                if isinstance(c, (ast.Tuple, ast.List, ast.Set)):
                    literals += [e for e in c.elts if isinstance(e, ast.Constant)]
            if any(lit.value in names for lit in literals):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_a_modality_share_scales_its_tasks_training_steps():
    shares = StepSharesConfig(image=1.0, video=0.4, audio=0.25)
    mapper = MapperTrainConfig(vqa_steps=2000, caption_steps=500)
    assert [TASKS[t].steps(mapper, shares) for t in ("vqa", "caption", "video_qa", "audio_caption")] == [
        2000, 500, 800, 125]
    train = TrainCompressedConfig(finetune_vqa_steps=3, small_vqa_steps=0)
    assert TASKS["audio_qa"].steps(train, shares, "finetune_") == 1  # 0.75: at least one step
    assert TASKS["video_qa"].steps(train, shares, "small_") == 0  # 0, "the mapper's own steps", stays 0
    # params.yaml's mappings (mmskip.estimate) give the same as the dataclasses
    assert TASKS["audio_caption"].steps({"caption_steps": 500}, {"audio": 0.25}) == 125
    with pytest.raises(ParamsError, match=r"step_shares\.video=0.3: the video tasks train 15 steps with 15 of warmup"):
        Params.from_dict({"tasks": ["vqa", "video_caption"], "mapper": {"warmup_steps": 50, "caption_steps": 51},
                          "step_shares": {"image": 1.0, "video": 0.3, "audio": 1.0}})
    with pytest.raises(ParamsError, match=r"step_shares\.video"):
        Params.from_dict({"step_shares": {"image": 1.0, "video": 0, "audio": 1.0}})


def test_task_names_are_compared_only_inside_the_registry():
    found = [hit for path in sorted(SRC.rglob("*.py")) if path != SRC / "tasks.py"
             for hit in _task_name_comparisons(path)]
    assert found == []


# --- a third task through the pipeline ---------------------------------------------------------

REGISTRATION = '\nregister(Task("exist", "image", VQA, question_types=("exist",)))  # added by tests/test_tasks.py\n'
# The smoke sizes, and a grid and compression kept small: this run is about the task, not the study.
SIZES = {
    "data": {"image_size": 32, "num_train": 120, "num_val": 20, "num_test": 30, "num_text_scenes": 120,
             "min_objects": 1, "max_objects": 3, "questions_per_image": 6},
    "tokenizer": {"vocab_size": 400},
    "llm": {"hidden_size": 32, "num_layers": 4, "num_heads": 2, "ffn_dim": 64, "steps": 20, "batch_size": 16,
            "warmup_steps": 3},
    "llm_small": {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "ffn_dim": 32, "steps": 10, "batch_size": 16,
                  "warmup_steps": 3},
    "encoder": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 64, "steps": 10, "batch_size": 32,
                "warmup_steps": 2},
    "clips": {"num_train": 60, "num_val": 12, "num_test": 16, "num_text_clips": 60},
    "video_encoder": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 64, "steps": 10,
                      "batch_size": 16, "warmup_steps": 2},
    "sounds": {"num_train": 60, "num_val": 12, "num_test": 16, "num_text_sounds": 60},
    "audio_encoder": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 64, "steps": 10,
                      "batch_size": 16, "warmup_steps": 2},
    "mapper": {"num_query_tokens": 4, "num_layers": 1, "hidden_size": 32, "num_heads": 2, "vqa_steps": 10,
               "caption_steps": 10, "batch_size": 16, "warmup_steps": 2, "checkpoint_every": 0},
    "evaluation": {"batch_size": 8, "vqa_max_new_tokens": 3, "caption_max_new_tokens": 6},
    "skipping": {"modes": ["skip_block"], "scopes": ["generated"], "intervals": [2], "start_layers": [0],
                 "drop_last": [1], "vqa_questions": 20, "caption_images": 8},
    "token_skipping": {"kinds": ["visual_exit"], "visual_exit_layers": [1]},
    "bench": {"hidden_size": 32, "num_layers": 4, "num_heads": 2, "ffn_dim": 64, "vocab_size": 128,
              "batch_sizes": [1], "context_tokens": 8, "new_tokens": 3, "repeats": 5, "eval_examples": 4,
              "eval_batch_size": 2},
    "pruning": {"sparsities": [0.5], "nm_patterns": ["2:4"], "calibration_modes": ["prompt"], "num_calibration": 8,
                "calibration_batch_size": 8},
    "compression": {"mask_sets": ["magnitude", "wanda"], "vqa_questions": 20, "caption_images": 8},
    "train_compressed": {"variants": ["dense", "small"], "sparsity": 0.5, "finetune_vqa_steps": 5,
                         "finetune_caption_steps": 5,
                         "small_vqa_steps": 5, "small_caption_steps": 5},  # the pruned and skipped: the smoke run's
    "report": {"num_qualitative": 1},
    "step_shares": {"image": 1.0, "video": 0.6, "audio": 0.4},  # each modality's share of the steps above
    "example_shares": {"image": 1.0, "video": 0.5, "audio": 0.25},  # and of the examples the grids evaluate
}


def test_a_registered_task_runs_through_the_pipeline_with_no_other_change(tmp_path):
    path = copy_workflow(tmp_path / "wf")
    with open(path / "src" / "mmskip" / "tasks.py", "a", encoding="utf-8") as f:
        f.write(REGISTRATION)
    params = read_params(REPO / "params.yaml")
    for section, values in SIZES.items():
        params[section].update(values)
    # the task's entry in params' list, the video captioning task on the clips and the audio QA task on the sounds
    params["tasks"] = ["exist", "video_caption", "audio_qa"]
    params["seeds"] = [0, 1]  # a replica of every mapper with seed 1: the report's spread over seeds
    write_params(path / "params.yaml", params)
    env = {"PYTHONPATH": str(path / "src")}  # this copy's package, with the third task, runs the jobs
    check(run([BIN / "python", "-m", "mmskip.stages", "--dvc", "dvc.yaml"], cwd=path, env=env))  # for its tasks
    check(run([BIN / "snakemake", "--cores", "2", "--quiet", "progress"], cwd=path, timeout=1200, env=env))

    tasks = ["audio_qa", "exist", "video_caption"]
    assert sorted(p.name for p in (path / "models" / "mapper").iterdir()) == tasks
    assert sorted(p.name for p in (path / "results" / "eval").iterdir()) == tasks
    paths = scenes_paths(path / "data" / "scenes", "test")
    exist = [q for q in read_vqa(paths["vqa_questions"], paths["vqa_annotations"]) if q.question_type == "exist"]
    metrics = json.loads((path / "results/eval/exist/multimodal/metrics.json").read_text())
    assert (metrics["task"], metrics["num_examples"]) == ("exist", len(exist))
    assert list(metrics["per_question_type"]) == ["exist"]
    items = json.loads((path / "results/eval/exist/multimodal/predictions.json").read_text())["items"]
    assert [i["question_id"] for i in items] == [q.question_id for q in exist]
    baseline = json.loads((path / "results/baseline/exist/metrics.json").read_text())
    assert (baseline["num_examples"], list(baseline["scores"])) == (len(exist), ["accuracy"])
    for family in ("skip/exist/skip_block", "compress/exist/magnitude", "compress/exist/wanda", "trained/exist",
                   "skip/audio_qa/skip_block", "compress/audio_qa/wanda", "trained/audio_qa",
                   "tokens/exist/visual_exit", "tokens/audio_qa/visual_exit"):
        points = json.loads((path / "results" / family / "metrics.json").read_text())["points"]
        assert points[0]["key"] == "baseline" and all("accuracy" in p["scores"] for p in points), family
    for family in ("skip/video_caption/skip_block", "compress/video_caption/wanda", "trained/video_caption",
                   "tokens/video_caption/visual_exit"):
        points = json.loads((path / "results" / family / "metrics.json").read_text())["points"]
        assert points[0]["key"] == "baseline" and all("CIDEr" in p["scores"] for p in points), family
    wanda = json.loads((path / "models/masks/wanda/prune.json").read_text())
    assert {e["task"] for e in wanda["entries"]} == set(tasks)  # Wanda calibrates on params' tasks alone
    # the α-SubNet of the three tasks, across three modalities (built whatever compression.mask_sets evaluates)
    subnet = json.loads((path / "models/masks/subnet/subnet.json").read_text())
    assert sorted(subnet["tasks"]) == tasks and len(subnet["task_iou"]) == 3
    assert sorted(json.loads((path / "results/bench/skip.json").read_text())["batched_evaluation"]) == tasks
    # each modality's share of the steps (params step_shares), 1 for the image task
    mapper_steps = {t: json.loads((path / f"results/mapper/{t}.json").read_text())["steps"] for t in tasks}
    assert mapper_steps == {"exist": 10, "video_caption": 6, "audio_qa": 4}
    assert {t: json.loads((path / f"results/mapper/{t}.json").read_text())["step_share"] for t in tasks} == {
        "exist": 1.0, "video_caption": 0.6, "audio_qa": 0.4}
    # the variants' mappers, and the replicas' (params seeds)
    assert sorted(p.name for p in (path / "models").glob("mapper_*")) == ["mapper_dense", "mapper_seeds",
                                                                           "mapper_small"]
    trained_steps = {(v, t): json.loads((path / f"results/mapper_{v}/{t}.json").read_text())["steps"]
                     for v in ("dense", "small") for t in tasks}
    assert trained_steps == {(v, t): n for v in ("dense", "small") for t, n in
                             (("exist", 5), ("video_caption", 3), ("audio_qa", 2))}
    examples = {(family, t): json.loads((path / "results" / family / t / leaf / "metrics.json").read_text())
                ["num_examples"] for family, leaf in (("skip", "skip_block"), ("compress", "wanda"), ("trained", ""),
                                                      ("tokens", "visual_exit")) for t in tasks}
    # and of the examples the grids evaluate (params example_shares): 20 questions and 8 captioned clips, shared
    assert examples == {(f, t): n for f in ("skip", "compress", "trained", "tokens")
                        for t, n in (("exist", 20), ("video_caption", 4), ("audio_qa", 5))}
    # the audio task: its questions on the generated clips, encoded by the audio encoder into a cache of its own
    audio = json.loads((path / "results/eval/audio_qa/multimodal/metrics.json").read_text())
    sounds = read_vqa(path / "data/sounds/annotations/vqa_questions_test.json",
                      path / "data/sounds/annotations/vqa_annotations_test.json")
    assert (audio["modality"], audio["num_examples"]) == ("audio", len(sounds))
    assert set(audio["per_question_type"]) == {q.question_type for q in sounds}
    caches = {name: json.loads((path / "results/features" / name / "index.json").read_text())["splits"]["test"]
              for name in ("scenes", "clips", "sounds")}
    assert (caches["scenes"]["dim"], caches["clips"]["dim"], caches["sounds"]["dim"]) == (32, 32, 32)
    assert caches["sounds"]["tokens"] == 2 + (128 - 16) // 8 + 1  # AST: CLS, distillation, one token a stretch
    assert caches["clips"]["tokens"] == 8 // 2 * (32 // 8) ** 2  # VideoMAE: a token per patch and pair of frames
    assert (path / "models/audio_encoder/preprocessor_config.json").is_file()
    assert (path / "models/video_encoder/preprocessor_config.json").is_file()
    # the video task: captions of the generated clips, encoded by the video encoder
    video = json.loads((path / "results/eval/video_caption/multimodal/metrics.json").read_text())
    clips = read_captions(path / "data/clips/annotations/captions_test.json")
    assert (video["modality"], video["num_examples"]) == ("video", len(clips))
    # the report: every family of both tasks in the summary, headlined by its format's metric, with its modality
    with open(path / "reports/summary.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["task"] for r in rows} == set(tasks)
    for task in tasks:
        assert {r["family"] for r in rows if r["task"] == task} >= {"baseline", "blind", "skip", "compress", "trained",
                                                                     "tokens"}
    skip_metrics = {task: {r["metric"] for r in rows if r["family"] == "skip" and r["task"] == task} for task in tasks}
    assert skip_metrics["exist"] == skip_metrics["audio_qa"] == {"accuracy"} and "CIDEr" in skip_metrics[
        "video_caption"]
    assert {(r["task"], r["modality"]) for r in rows} == {("exist", "image"), ("video_caption", "video"),
                                                           ("audio_qa", "audio")}
    # the replicas (params seeds [0, 1]): every mapper trained again with seed 1, as many steps, its baseline decoded
    for t in tasks:
        replica = json.loads((path / f"results/mapper_seeds/1/{t}.json").read_text())
        assert (replica["steps"], replica["seed"]) == (mapper_steps[t], 1)
        assert replica["loss_curve"] != json.loads((path / f"results/mapper/{t}.json").read_text())["loss_curve"]
        decoded = json.loads((path / f"results/seeds/1/{t}/metrics.json").read_text())
        assert decoded["num_examples"] == json.loads((path / f"results/baseline/{t}/metrics.json").read_text())[
            "num_examples"]
    html = (path / "reports/all.html").read_text(encoding="utf-8")
    assert "spread over seeds (points)" in html and "mapper was trained with 2 seeds" in html
    assert "exist" in html and 'alt="clip ' in html and 'alt="video ' in html and "heldout_object_accuracy" in html
    assert 'alt="alpha-SubNet task mask IoU matrix"' in html
    for modalities, names in (("audio \u2013 image", ("exist", "audio_qa")), ("image \u2013 video", ("exist",
                              "video_caption")), ("audio \u2013 video", ("video_caption", "audio_qa"))):
        pairs = f"<td>{modalities}</td><td>{{}} vs {{}} "  # the α-SubNet's masks by modality pair
        assert pairs.format(*names) in html or pairs.format(*names[::-1]) in html, modalities

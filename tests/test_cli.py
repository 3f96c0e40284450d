"""The `mmskip` command line: flags generated from configs, bad values refused before any work."""

import re
import subprocess
import sys

import pytest

from mmskip.cli import build_parser
from mmskip.config import cli_args


def run(*args):
    return subprocess.run([sys.executable, "-m", "mmskip.cli", *args], capture_output=True, text=True)


def test_bad_parameter_is_named_and_nothing_is_written(tmp_path):
    out = tmp_path / "scenes"
    result = run("make_scenes", "--out", str(out), "--seed", "0", "--min_objects", "4", "--max_objects", "3")
    assert result.returncode != 0
    assert "min_objects=4, max_objects=3" in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_wrong_type_is_refused_by_argparse_naming_the_flag(tmp_path):
    result = run("make_scenes", "--out", str(tmp_path / "s"), "--seed", "0", "--num_train", "many")
    assert result.returncode == 2
    assert "--num_train" in result.stderr and "'many'" in result.stderr


def test_unknown_task_lists_the_allowed_ones(tmp_path):
    result = run("train_mapper", "--task", "vqa2", "--scenes", "a", "--features", "b", "--llm", "c",
                 "--out", "d", "--metrics", "e", "--seed", "0")
    assert result.returncode == 2
    assert "invalid choice: 'vqa2'" in result.stderr and "'vqa', 'caption'" in result.stderr



def test_evaluate_refuses_an_input_twice_before_loading_anything(tmp_path):
    from mmskip.evaluation.evaluate import evaluate
    from mmskip.foundation.text import PromptsConfig
    from mmskip.params import EvaluationConfig

    missing = tmp_path / "missing"  # nothing is read: the inputs are checked first
    for inputs in (["blind", "blind"], "blind", []):
        with pytest.raises(ValueError, match=rf"inputs={re.escape(repr(inputs))}: allowed a list of one or more of "
                                             r"\['multimodal', 'blind'\], each once"):
            evaluate("vqa", inputs, missing, missing, missing, missing, tmp_path / "out", PromptsConfig(),
                     EvaluationConfig())
    assert list(tmp_path.iterdir()) == []
    result = run("evaluate", "--task", "vqa", "--inputs", "deaf", "--scenes", "s", "--features", "f", "--llm", "l",
                 "--mapper", "m", "--out", "o")
    assert result.returncode == 2 and "invalid choice: 'deaf'" in result.stderr, result.stderr



def test_evaluate_trained_reads_the_smaller_llm_and_the_masks_exactly_for_their_variants(tmp_path):
    """Checked before anything is loaded (the paths here do not exist); the command exits naming the problem."""
    from mmskip.compression.train import evaluate_trained
    from mmskip.foundation.text import PromptsConfig
    from mmskip.params import CompressionConfig, EvaluationConfig, TrainCompressedConfig

    missing = tmp_path / "missing"
    for llm_small, masks, variants, expected in (
            ("x", None, ("dense",), "--llm_small is read for variant 'small' only: train_compressed.variants=['dense'],"
                                    " --llm_small x"),
            (None, None, ("small", "pruned"), "--llm_small is read for variant 'small' only: "
                                              "train_compressed.variants=['pruned', 'small'], --llm_small missing"),
            ("x", None, ("small", "pruned"), "--masks is read for variant 'pruned' only: "
                                             "train_compressed.variants=['pruned', 'small'], --masks missing")):
        mappers = {v: missing / v for v in variants}
        with pytest.raises(ValueError, match=re.escape(expected)):
            evaluate_trained("vqa", missing, missing, missing, llm_small, missing, mappers, masks, missing,
                             tmp_path / "out", PromptsConfig(), CompressionConfig(),
                             TrainCompressedConfig(variants=variants), "prompt", EvaluationConfig())
    result = run("evaluate_trained", "--task", "vqa", "--scenes", "s", "--features", "f", "--llm", "l", "--mapper",
                 "m", "--trained_root", str(missing), "--baseline", "b", "--out", str(tmp_path / "out"),
                 "--calibration", "prompt", "--llm_small", "x", "--variants", "dense")
    assert result.returncode == 1 and result.stderr.strip() == (
        "mmskip evaluate_trained: --llm_small is read for variant 'small' only: train_compressed.variants=['dense'], "
        "--llm_small x"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_args_round_trip_through_the_parser():
    section = {"vqa_max_new_tokens": 7, "num_beams": 2, "spice": True, "split": "val",
               "batch_size": 4, "caption_max_new_tokens": 9}
    argv = ["evaluate", "--task", "vqa", "--inputs", "blind", "--scenes", "s", "--features", "f",
            "--llm", "l", "--mapper", "m", "--out", "o"] + cli_args(section).split()
    args = build_parser().parse_args(argv)
    for key, value in section.items():
        assert getattr(args, key) == value
    args = build_parser().parse_args(argv + ["--no-spice"])
    assert args.spice is False


def test_cli_args_renders_like_dvc_unpacking():
    assert cli_args({"a": 1, "b": True, "c": False, "d": [1, 2], "e": "x y"}) == "--a 1 --b --no-c --d 1 2 --e 'x y'"
    with pytest.raises(ValueError, match="'d' is empty"):
        cli_args({"d": []})
    with pytest.raises(ValueError, match="holds a mapping"):
        cli_args({"n": {"x": 1}})


def test_commands_over_several_tasks_take_one_path_for_all_or_one_per_task():
    """prune_wanda, bench_skip and the report: --scenes/--features once for every task, or once per task in the
    order of the tasks (a task with a dataset of its own reads its folder); another count is refused."""
    from pathlib import Path

    from mmskip.cli import per_task

    a, b, c = Path("data/coco"), Path("data/okvqa"), Path("data/gqa")
    assert per_task("prune_wanda", "scenes", [a], ["vqa", "gqa"]) == {"vqa": a, "gqa": a}
    assert per_task("prune_wanda", "scenes", [a, c], ["vqa", "gqa"]) == {"vqa": a, "gqa": c}
    with pytest.raises(SystemExit, match=r"^mmskip bench_skip: --features data/coco data/okvqa data/gqa: 3 paths for "
                                         r"the 2 tasks \['vqa', 'gqa'\]; give one for every task, or one per task in "
                                         r"that order$"):
        per_task("bench_skip", "features", [a, b, c], ["vqa", "gqa"])
    args = build_parser().parse_args(["prune_wanda", "--scenes", "data/coco", "data/gqa", "--features", "f",
                                      "--mappers", "m", "--out", "o", "--llm", "l", "--tasks", "vqa", "gqa",
                                      "--seed", "0"])
    assert args.scenes == [a, c] and args.features == [Path("f")]


def test_the_report_names_the_runs_params_declare_that_no_stage_wrote(tmp_path, monkeypatch):
    """params' skipping.modes and compression.mask_sets name the folders the report reads. Where one was not
    written (a dvc.yaml written out per value for other lists), the report says which and what to do, before it
    reads or writes anything else."""
    from pathlib import Path

    import yaml

    from mmskip.cli import main

    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text(encoding="utf-8"))
    params["skipping"]["modes"] = ["skip_block", "skip_ffn"]
    params["compression"]["mask_sets"] = ["magnitude", "wanda"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    for written in ("results/skip/vqa/skip_block", "results/compress/vqa/wanda"):
        (tmp_path / written).mkdir(parents=True)
        (tmp_path / written / "metrics.json").write_text("{}", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=re.escape(
            "mmskip report: params.yaml: skipping.modes=['skip_block', 'skip_ffn'] and compression.mask_sets="
            "['magnitude', 'wanda'] name runs that no stage wrote (no metrics.json): results/skip/vqa/skip_ffn, "
            "results/compress/vqa/magnitude. A dvc.yaml whose stages are written out per value (tasks with datasets "
            "of their own) must be regenerated after changing these lists (make generate, or mmskip use_config)")):
        main(["report", "--params", "params.yaml", "--scenes", "data/scenes", "--eval", "results/eval/vqa/multimodal",
              "--skip_root", "results/skip", "--compress_root", "results/compress", "--html", "reports/all.html",
              "--csv", "reports/summary.csv"])
    # the token grid's kinds (token_skipping.kinds) name its folders alike, where the report reads them
    with pytest.raises(SystemExit, match=re.escape(
            "skipping.modes=['skip_block', 'skip_ffn'], token_skipping.kinds=['visual_exit', 'fastv', 'early_exit'] "
            "and compression.mask_sets=['magnitude', 'wanda'] name runs that no stage wrote (no metrics.json): "
            "results/skip/vqa/skip_ffn, results/tokens/vqa/visual_exit, results/tokens/vqa/fastv, "
            "results/tokens/vqa/early_exit, results/compress/vqa/magnitude.")):
        main(["report", "--params", "params.yaml", "--scenes", "data/scenes", "--eval", "results/eval/vqa/multimodal",
              "--skip_root", "results/skip", "--tokens_root", "results/tokens", "--compress_root", "results/compress",
              "--html", "reports/all.html", "--csv", "reports/summary.csv"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "results"]

"""The `mmskip` command line: flags generated from configs, bad values refused before any work."""

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


def test_cli_args_round_trip_through_the_parser():
    section = {"vqa_max_new_tokens": 7, "num_beams": 2, "spice": True, "split": "val",
               "batch_size": 4, "caption_max_new_tokens": 9}
    argv = ["evaluate", "--task", "vqa", "--input", "blind", "--scenes", "s", "--features", "f",
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

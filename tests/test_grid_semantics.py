"""The skip grid under both semantics, and the params that choose them (mmskip.skipping.grid)."""

from __future__ import annotations

import pytest

from mmskip.params import Params, ParamsError, SkippingConfig, TrainCompressedConfig, params_problems
from mmskip.skipping.grid import grid_points
from mmskip.skipping.plan import official_layers
from workflow_utils import REPO, read_params

PARAMS = read_params(REPO / "params.yaml")


def test_textbook_keys_are_unchanged_and_official_points_are_added():
    both = grid_points(SkippingConfig(start_layers=[-1, 1]), "skip_attn", 6)
    textbook = grid_points(SkippingConfig(start_layers=[-1, 1], semantics=["textbook"]), "skip_attn", 6)
    assert [p.key for p in both[: len(textbook)]] == [p.key for p in textbook]
    assert [p.plan for p in both[: len(textbook)]] == [p.plan for p in textbook]
    official = both[len(textbook):]
    assert [p.key for p in official] == [f"{p.key}-official" for p in textbook]
    assert {p.semantics for p in official} == {"official"} and {p.semantics for p in textbook} == {"textbook"}


def test_official_points_never_skip_layer_0_nor_the_last():
    for mode in ("skip_block", "skip_attn", "skip_ffn", "parallel_attn_ffn"):
        for point in grid_points(SkippingConfig(start_layers=[-1, 0, 1], semantics=["official"]), mode, 6):
            assert point.plan.layers == official_layers(6, point.interval, point.start_layer, None)
            assert 0 not in point.plan.layers and 5 not in point.plan.layers, point.key
    textbook = {p.key: p.plan.layers for p in grid_points(SkippingConfig(start_layers=[-1]), "skip_block", 6)}
    assert textbook["skip_block-generated-k2-s-1"] == (0, 2, 4)
    assert textbook["skip_block-generated-k2-s-1-official"] == (2, 4)
    assert textbook["skip_block-generated-k4-s-1-official"] == (4,)


def test_drop_last_keys_name_the_dropped_blocks_under_both_semantics():
    points = grid_points(SkippingConfig(drop_last=[1, 2]), "drop_last", 6)
    assert [(p.key, p.skipped_blocks) for p in points] == [
        ("drop_last-1", 1), ("drop_last-2", 2), ("drop_last-1-official", 1), ("drop_last-2-official", 2)]


def test_the_baseline_point_has_no_semantics_and_none_is_not_a_mode():
    from mmskip.skipping.grid import BASELINE_POINT

    assert (BASELINE_POINT.key, BASELINE_POINT.mode, BASELINE_POINT.semantics) == ("baseline", "none", None)
    assert BASELINE_POINT.plan.empty and BASELINE_POINT.skipped_blocks == 0
    with pytest.raises(ValueError, match=r"mode='none': allowed \['skip_block'"):
        grid_points(SkippingConfig(), "none", 6)
    with pytest.raises(ParamsError, match=r"modes=\['none', 'skip_block'\].*skip_block"):
        SkippingConfig(modes=["none", "skip_block"])


def test_semantics_values_are_checked_naming_the_allowed_ones():
    with pytest.raises(ParamsError, match=r"semantics=\['formal'\].*textbook.*official"):
        SkippingConfig(semantics=["formal"])
    with pytest.raises(ParamsError, match=r"semantics='paper'.*textbook.*official"):
        TrainCompressedConfig(semantics="paper")


def test_official_training_plan_must_skip_a_layer():
    """interval 5 from layer 1 skips layer 5 of 6 under textbook, nothing under official (last layer)."""
    params = {**PARAMS, "train_compressed": {**PARAMS["train_compressed"], "interval": 5, "start_layer": 1}}
    assert params_problems(params) == []
    params["train_compressed"]["semantics"] = "official"
    (problem,) = params_problems(params)
    assert problem.describe(" = ").startswith(
        "train_compressed.interval = 5, train_compressed.start_layer = 1, llm.num_layers = 6: ")
    assert "0 < i < llm.num_layers - 1" in str(problem)


def test_the_default_grid_runs_both_semantics_textbook_first():
    assert Params.from_dict(PARAMS).skipping.semantics == ("textbook", "official")

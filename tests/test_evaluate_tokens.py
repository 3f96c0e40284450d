"""The token-level grid's pieces (mmskip.evaluation.evaluate_tokens): its points, the soft prompt's
positions in a prompt batch, the entropies of the tokens still being generated, the calibrated
thresholds; the end-to-end run is the smoke pipeline's (tests/test_pipeline_smoke.py)."""

import numpy as np
import pytest
import torch

from mmskip.evaluation.evaluate_tokens import (TokenPoint, active_entropies, thresholds_at, token_points,
                                               visual_mask)
from mmskip.mapper.model import prefix_batch
from mmskip.params import Params, ParamsError, TokenSkippingConfig
from mmskip.skipping.tokens import TokenEngine, TokenPlan

from test_skipping import EOS, PAD, prompts, tiny


def test_points_cover_every_kind_and_setting_with_keys_of_their_own():
    cfg = TokenSkippingConfig(visual_exit_layers=(1, 3), fastv_layers=(1,), fastv_keep=(0.5, 0.25),
                              early_exit_layers=(2,), exit_rates=(0.25, 0.5))
    points = token_points(cfg, 6)
    assert {kind: [p.key for p in ps] for kind, ps in points.items()} == {
        "visual_exit": ["visual_exit-l1", "visual_exit-l3"],
        "fastv": ["fastv-l1-keep0.5", "fastv-l1-keep0.25"],
        "early_exit": ["early_exit-l2-r0.25", "early_exit-l2-r0.5"]}
    assert points["fastv"][1].plan() == TokenPlan("fastv", 1, keep=0.25)
    assert points["early_exit"][0].plan(0.7) == TokenPlan("early_exit", 2, threshold=0.7)
    only = token_points(TokenSkippingConfig(kinds=("early_exit",)), 6)
    assert list(only) == ["early_exit"]


def test_a_layer_with_no_block_after_it_is_refused_before_any_work():
    with pytest.raises(ValueError, match=r"token_skipping.visual_exit_layers=\[1, 5\]: \[5\] not from 0 to 4 for a "
                                         r"6-layer LLM"):
        token_points(TokenSkippingConfig(visual_exit_layers=(1, 5)), 6)
    # and params refuse it against the LLM they train, naming both keys
    with pytest.raises(ParamsError, match=r"token_skipping.early_exit_layers.*llm.num_layers.*\[5\] leave no block"):
        Params.from_dict({"token_skipping": {"early_exit_layers": [2, 5]}})
    Params.from_dict({"token_skipping": {"kinds": ["visual_exit"], "early_exit_layers": [2, 5]}})  # not run: fine


def test_the_visual_mask_marks_the_soft_prompt_of_each_left_padded_row():
    embed = torch.nn.Embedding(10, 4)
    soft = torch.randn(3, 2, 4)
    embeds, mask, _ = prefix_batch(soft, [[1, 2, 3], [4], [5, 6]], None, embed, 0, "left")
    visual = visual_mask(mask, 2)
    assert visual.tolist() == [[True, True, False, False, False],
                               [False, False, True, True, False],
                               [False, True, True, False, False]]
    # the marked positions hold the soft prompt, in order
    for row in range(3):
        assert torch.equal(embeds[row][visual[row]], soft[row].to(embeds.dtype))


def test_active_entropies_keep_the_rows_still_generating_at_each_step():
    tokens = torch.tensor([[5, EOS, PAD, PAD], [6, 7, 8, EOS], [EOS, PAD, PAD, PAD]])
    steps = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0]), torch.tensor([7.0, 8.0, 9.0])]
    # step 1 reads token 0: rows 0 and 1 are still going; step 2: row 1 alone; step 3: row 1
    assert active_entropies(steps, tokens, EOS).tolist() == [1.0, 2.0, 5.0, 8.0]
    assert active_entropies(steps, tokens, None).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    assert active_entropies([], tokens, EOS).numel() == 0


def test_thresholds_are_the_entropy_quantiles_and_set_the_share_that_exits():
    values = torch.arange(100, dtype=torch.float32) / 10
    thresholds = thresholds_at(values, (0.25, 0.5))
    expected = {rate: float(np.quantile(values.double().numpy(), rate)) for rate in (0.25, 0.5)}
    assert thresholds == expected and abs(thresholds[0.5] - 4.95) < 1e-6  # between 4.9 and 5.0
    assert float((values < thresholds[0.25]).double().mean()) == 0.25
    with pytest.raises(ValueError, match="no generated token to calibrate early_exit on"):
        thresholds_at(torch.zeros(0), (0.5,))


def test_calibrated_early_exit_exits_about_its_rate_of_the_calibration_tokens():
    """Calibrating on a batch and decoding the same batch at the threshold: the first cached step's
    tokens exit at the rate (later steps follow the exits' own tokens)."""
    torch.manual_seed(0)
    model = tiny("opt")
    rows, ids, mask = prompts()
    engine = TokenEngine(model, TokenPlan("early_exit", 2, threshold=0.0))
    tokens = engine.generate(mask, input_ids=ids, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    assert engine.exits == [0] * len(engine.entropies)  # threshold 0: nothing exits, the model's own tokens
    first = engine.entropies[0]
    (threshold,) = thresholds_at(first, (0.5,)).values()
    engine = TokenEngine(model, TokenPlan("early_exit", 2, threshold=threshold))
    engine.generate(mask, input_ids=ids, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    assert engine.exits[0] == int((first < threshold).sum()) == len(first) // 2
    assert tokens.shape[0] == len(rows)


def test_point_keys_name_their_setting():
    assert TokenPoint("visual_exit", 3).key == "visual_exit-l3"
    assert TokenPoint("fastv", 1, keep=0.25).key == "fastv-l1-keep0.25"
    assert TokenPoint("early_exit", 4, rate=0.5).key == "early_exit-l4-r0.5"

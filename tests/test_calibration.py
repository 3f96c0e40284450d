"""Wanda's calibration inputs (mmskip.compression.calibration), mode by mode, on stand-in data."""

from __future__ import annotations

import pytest
import torch

from mmskip.compression import calibration as cal

SOFT, DIM, BOS, PAD = 3, 8, 2, 0
PROMPTS = [[5, 6, 7], [5, 9]]
TARGETS = [[11, 1], [12, 13, 1]]


class StubTokenizer:
    pad_token_id, bos_token_id = PAD, BOS


@pytest.fixture
def batches(monkeypatch):
    """calibration_batches(mode) on two examples, with their features and encoded texts stubbed."""
    examples = [(100, "q0", "a0"), (101, "q1", "a1")]
    monkeypatch.setattr(cal, "task_examples", lambda *a, **k: examples)
    monkeypatch.setattr(cal, "encode_examples", lambda tok, chosen: ([PROMPTS[examples.index(e)] for e in chosen],
                                                                     [TARGETS[examples.index(e)] for e in chosen]))
    feats = torch.randn(2, 4, DIM, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(cal, "load_features", lambda *a: (feats, {100: 0, 101: 1}))
    embed = torch.nn.Embedding(20, DIM)
    model = type("M", (), {"get_input_embeddings": lambda self: embed})()
    mapper = lambda f, table: f[:, :SOFT] * 10  # noqa: E731  (soft tokens the test can recognise)

    def run(mode, tokenizer=StubTokenizer()):
        (batch,) = cal.calibration_batches("vqa", mode, None, None, model, tokenizer, mapper, None, 2, seed=0)
        return batch, feats[:, :SOFT] * 10, embed

    return run


def test_only_prompt_is_the_soft_prompt_and_bos_alone(batches):
    (embeds, mask), soft, embed = batches("only_prompt")
    assert embeds.shape == (2, SOFT + 1, DIM) and bool(mask.all())
    assert torch.equal(embeds[:, :SOFT], soft)
    assert torch.equal(embeds[:, SOFT], embed.weight[BOS].expand(2, DIM))


def test_prompt_modes_keep_the_question_and_answer(batches):
    (embeds, mask), soft, embed = batches("prompt")
    assert mask.sum(1).tolist() == [SOFT + 3, SOFT + 2]  # right padding after the shorter prompt
    assert torch.equal(embeds[0, SOFT:], embed(torch.tensor(PROMPTS[0])))
    (embeds, mask), _, _ = batches("prompt_answer")
    assert mask.sum(1).tolist() == [SOFT + 5, SOFT + 5]


def test_only_prompt_needs_a_bos_token(batches):
    class NoBos(StubTokenizer):
        bos_token_id = None

    with pytest.raises(ValueError, match="only_prompt.*BOS"):
        batches("only_prompt", NoBos())


def test_unknown_mode_names_the_allowed_ones(batches):
    with pytest.raises(ValueError, match=r"calibration='soft': allowed \['prompt', 'prompt_answer', 'text', 'only_prompt'\]"):
        batches("soft")

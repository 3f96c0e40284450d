"""Mapper shapes, save/load round trip, and the soft-prompt batch layout."""

import torch
from torch import nn

from mmskip.mapper.model import Mapper, MapperConfig, prefix_batch


def test_mapper_output_shape_and_query_count():
    cfg = MapperConfig(encoder_dim=12, num_visual_tokens=7, llm_dim=20, num_query_tokens=3, num_layers=2, hidden_size=16, num_heads=4)
    out = Mapper(cfg)(torch.randn(5, 7, 12))
    assert out.shape == (5, 3, 20)


def test_layers_are_initialised_independently():
    m = Mapper(MapperConfig(encoder_dim=4, llm_dim=4, num_layers=2, hidden_size=8, num_heads=2))
    a, b = (layer.linear1.weight for layer in m.layers)
    assert not torch.equal(a, b)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = MapperConfig(encoder_dim=6, num_visual_tokens=4, llm_dim=10, num_query_tokens=2, num_layers=1, hidden_size=8, num_heads=2)
    m = Mapper(cfg).eval()
    m.save_pretrained(tmp_path)
    loaded = Mapper.from_pretrained(tmp_path)
    x = torch.randn(3, 4, 6)
    assert loaded.config == cfg
    assert torch.equal(m(x), loaded(x))


def test_prefix_batch_layout_left_and_right():
    embed = nn.Embedding(50, 4)
    soft = torch.randn(2, 3, 4)
    prompts, targets = [[5, 6], [7]], [[8, 9], [10]]
    for side in ("left", "right"):
        x, mask, labels = prefix_batch(soft, prompts, targets, embed, pad_id=0, padding_side=side)
        assert x.shape == (2, 3 + 4, 4) and mask.shape == labels.shape == (2, 7)
        assert mask.sum(1).tolist() == [7, 5]
        for i in range(2):
            start = int(mask[i].nonzero()[0])
            assert torch.equal(x[i, start : start + 3], soft[i])  # soft prompt first
            text = prompts[i] + targets[i]
            assert torch.equal(x[i, start + 3 : start + 3 + len(text)], embed(torch.tensor(text)))
            # only target tokens are labelled
            assert labels[i][labels[i] != -100].tolist() == targets[i]
    _, mask, _ = prefix_batch(soft, prompts, None, embed, pad_id=0, padding_side="left")
    assert mask[1].tolist() == [0, 1, 1, 1, 1]


def test_vocab_output_is_a_mixture_of_token_embeddings():
    torch.manual_seed(0)
    cfg = MapperConfig(encoder_dim=6, num_visual_tokens=4, llm_dim=5, num_query_tokens=3, num_layers=1,
                       hidden_size=8, num_heads=2, output="vocab", vocab_size=7)
    m = Mapper(cfg)
    table = torch.zeros(7, 5)
    table[:, 0] = 1.0  # every token embedding has first coordinate 1, the rest 0
    out = m(torch.randn(2, 4, 6), table)
    assert out.shape == (2, 3, 5)
    assert torch.allclose(out[..., 0], torch.ones(2, 3)) and torch.all(out[..., 1:] == 0)


def test_wrong_number_of_visual_tokens_is_refused():
    m = Mapper(MapperConfig(encoder_dim=6, num_visual_tokens=4, llm_dim=5, num_layers=1, hidden_size=8, num_heads=2))
    try:
        m(torch.randn(1, 5, 6))
    except ValueError as err:
        assert "expects 4 encoder tokens, got 5" in str(err)
    else:
        raise AssertionError("no error")

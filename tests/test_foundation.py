"""Foundation-model pieces: tokenizer consistency, composed scene-word embeddings, encoder targets."""


import pytest
import torch
from transformers import AutoTokenizer

from mmskip.data.scenes import COLORS, SHAPES, ScenesConfig, make_scenes
from mmskip.foundation.encoder import patch_targets
from mmskip.foundation.llm import ComposedEmbedding, assemble, encode_documents, target_loss
from mmskip.foundation.text import PromptsConfig, documents, split_segments
from mmskip.foundation.tokenizer import TokenizerConfig, train_tokenizer


@pytest.fixture(scope="module")
def scenes_and_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("f")
    make_scenes(root / "scenes", seed=1, cfg=ScenesConfig(num_train=30, num_val=5, num_test=5, num_text_scenes=200))
    train_tokenizer(root / "scenes", root / "tok", TokenizerConfig(vocab_size=1024), PromptsConfig())
    return root / "scenes", AutoTokenizer.from_pretrained(root / "tok")


def test_prompt_tokenises_alike_alone_and_after_a_description(scenes_and_tokenizer):
    _, tok = scenes_and_tokenizer
    prompt = "Question: What color is the circle? Answer:"
    alone = tok(prompt, add_special_tokens=False)["input_ids"]
    joint = tok("largeredcircle bh. " + prompt, add_special_tokens=False)["input_ids"]
    assert joint[-len(alone):] == alone
    # every scene word is one token
    assert len(tok("largeredcircle bh", add_special_tokens=False)["input_ids"]) == 2


def test_composed_embedding_is_the_sum_of_its_parts(scenes_and_tokenizer):
    _, tok = scenes_and_tokenizer
    emb = ComposedEmbedding(tok, dim=8, init_std=0.02)
    table = emb.materialise()
    word = lambda w: tok.convert_tokens_to_ids("Ġ" + w)  # noqa: E731
    expected = table[word("large")] + table[word("red")] + table[word("circle")]
    assert torch.allclose(table[word("largeredcircle")], expected)
    # a cell word is the sum of its column and row vectors: bh - ah == bi - ai
    assert torch.allclose(table[word("bh")] - table[word("ah")], table[word("bi")] - table[word("ai")], atol=1e-6)
    assert emb.num_composed > len(COLORS) * len(SHAPES)


def test_composed_embedding_gradient_is_the_same_bytes_every_time_on_two_threads(scenes_and_tokenizer):
    """Pretraining the LLM on two threads must give the same weights run after run: the table's gradient, which
    sums over every word that shares a part, comes out bit for bit the same (a gather's backward, table[index],
    accumulated from both threads in no fixed order and differed from run to run)."""
    _, tok = scenes_and_tokenizer
    emb = ComposedEmbedding(tok, dim=96, init_std=0.02)
    # every word made of a few shared parts: the many collisions of the default's vocabulary (the fixture's is small)
    emb.index = torch.randint(0, 40, emb.index.shape, generator=torch.Generator().manual_seed(1))
    emb.weight = torch.ones_like(emb.weight)
    upstream = torch.randn(emb.index.shape[0], 96, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(20):
            emb.zero_grad(set_to_none=True)
            (emb.materialise() * upstream).sum().backward()
            grads.append(emb.table.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_documents_put_loss_on_answers_and_captions_only(scenes_and_tokenizer):
    scenes, tok = scenes_and_tokenizer
    prompts = PromptsConfig()
    docs = encode_documents(tok, documents(split_segments(scenes, "train", prompts)), prompts.caption_prompt)
    ids, loss = assemble(docs[0], __import__("numpy").random.default_rng(0))
    assert len(ids) == len(loss)
    assert not any(loss[: len(docs[0].context)])  # no loss on the description
    assert ids[-1] == tok.eos_token_id and loss[-1]
    assert sum(i == tok.eos_token_id for i in ids) == len(docs[0].questions) + 1  # one eos per answer + caption


def test_encoder_patch_targets_mark_the_centre_patch():
    record = {"objects": [{"color": "blue", "shape": "square", "size": "large", "x": 20.0, "y": 12.0, "radius": 8.0}]}
    t = patch_targets([record], image_size=48, patch=8)
    centre = (12 // 8) * 6 + 20 // 8
    assert t["centre_color"][0, centre] == list(COLORS).index("blue") + 1
    assert t["centre_shape"][0, centre] == SHAPES.index("square") + 1
    assert int((t["centre_color"][0] > 0).sum()) == 1
    assert t["color"][0, centre] == list(COLORS).index("blue") + 1
    assert t["color"][0, 35] == 0  # a far corner is background


def test_target_loss_equals_the_hugging_face_loss():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                     num_attention_heads=2, max_position_embeddings=20, word_embed_proj_dim=16)).eval()
    ids = torch.randint(3, 50, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(torch.rand(ids.shape) < 0.6, -100)
    labels[1, 6:] = -100
    labels[:, 4] = ids[:, 4]
    embeds = model.get_input_embeddings()(ids)
    expected = model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(target_loss(model, embeds, mask, labels), expected)
    # left padding keeps its mask (the positions and the attention depend on it)
    left = mask.flip(1)
    labels_left = labels.masked_fill(left == 0, -100)
    expected = model(inputs_embeds=embeds, attention_mask=left, labels=labels_left).loss
    torch.testing.assert_close(target_loss(model, embeds, left, labels_left), expected)


"""The skip engine on a tiny random LLaVA: its LLaMA language model against Hugging Face."""

import copy

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from mmskip.skipping.adapters import adapter_for, llava_inputs_embeds
from mmskip.skipping.engine import SkipEngine
from mmskip.skipping.plan import SkipPlan

VOCAB, EOS, PAD, IMAGE = 97, 2, 1, 96
IMAGE_TOKENS = 4  # (16 / 8) ** 2 patches, the CLS feature dropped
SKIPPED = (0, 2)


def tiny_llava():
    torch.manual_seed(0)
    vision = CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, intermediate_size=64,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=PAD, eos_token_id=EOS, bos_token_id=0, initializer_range=0.5)
    # the large initialisation (used by the projector and the language model) makes greedy
    # outputs depend on the image and on every layer
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # RMSNorm weights start at one, which would make every norm the same function
        for name, weight in model.model.language_model.named_parameters():
            if name.endswith("norm.weight"):
                weight.uniform_(0.5, 1.5)
    return model


def prompts():
    """Two left-padded prompts of different lengths, one image each."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, IMAGE, (a,), generator=g).tolist() + [IMAGE] * IMAGE_TOKENS
            + torch.randint(3, IMAGE, (b,), generator=g).tolist() for a, b in ((2, 5), (1, 2))]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pixels = torch.randn(2, 3, 16, 16, generator=g)
    return ids, mask, pixels


def hf_generate(model, ids, mask, pixels):
    out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         eos_token_id=EOS, pad_token_id=PAD)
    return out[:, ids.shape[1]:]


def engine_generate(model, plan, ids, mask, pixels, use_cache=True):
    embeds = llava_inputs_embeds(model, ids, pixels)
    return SkipEngine(model, plan).generate(mask, inputs_embeds=embeds, max_new_tokens=8, eos_token_id=EOS,
                                            pad_token_id=PAD, use_cache=use_cache)


def without_layers(model, skipped):
    """A copy of ``model`` whose language model lacks the blocks ``skipped``."""
    pruned = copy.deepcopy(model)
    lm = pruned.model.language_model
    lm.layers = torch.nn.ModuleList(layer for i, layer in enumerate(lm.layers) if i not in skipped)
    pruned.config.text_config.num_hidden_layers = len(lm.layers)
    for i, layer in enumerate(lm.layers):
        layer.self_attn.layer_idx = i
    return pruned


@pytest.mark.parametrize("use_cache", [True, False])
def test_empty_plan_reproduces_llava_generate_token_for_token(use_cache):
    model = tiny_llava()
    ids, mask, pixels = prompts()
    expected = hf_generate(model, ids, mask, pixels)
    assert len(set(expected.flatten().tolist())) > 2  # the random model does not repeat one token
    got = engine_generate(model, SkipPlan(), ids, mask, pixels, use_cache)
    assert got.tolist() == expected.tolist()


def test_skip_block_everywhere_equals_deleting_the_language_model_layers():
    model = tiny_llava()
    ids, mask, pixels = prompts()
    plan = SkipPlan("skip_block", SKIPPED, "all")
    got = engine_generate(model, plan, ids, mask, pixels)
    assert got.tolist() == hf_generate(without_layers(model, SKIPPED), ids, mask, pixels).tolist()
    assert got.tolist() != hf_generate(model, ids, mask, pixels).tolist()


def test_model_is_unchanged_after_a_skipped_run():
    model = tiny_llava()
    ids, mask, pixels = prompts()
    before = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    engine_generate(model, SkipPlan("skip_block", SKIPPED, "all"), ids, mask, pixels)
    after = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    assert torch.equal(after, before)


def test_llava_needs_a_llama_language_model():
    model = tiny_llava()
    model.config.text_config.model_type = "mistral"
    with pytest.raises(ValueError, match=r"text model_type='mistral': allowed \['llama'\]"):
        adapter_for(model)

"""The skip engine on tiny random OPT and LLaMA models: exactness against Hugging Face."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from mmskip.skipping.engine import SkipEngine
from mmskip.skipping.plan import MODES, SCOPES, SkipPlan, every_kth_layer

VOCAB, EOS, PAD = 97, 2, 1


def tiny(family: str):
    torch.manual_seed(0)
    if family == "opt":
        cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=5, ffn_dim=64, num_attention_heads=4,
                        max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=PAD, eos_token_id=EOS,
                        bos_token_id=0, init_std=0.5)
        model = OPTForCausalLM(cfg)
    else:
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=5, intermediate_size=64,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          pad_token_id=PAD, eos_token_id=EOS, bos_token_id=0, initializer_range=0.5)
        model = LlamaForCausalLM(cfg)
    # a large initialisation makes outputs depend strongly on context and on every layer, so
    # greedy sequences vary and a skipped computation shows in them
    return model.eval()


def prompts():
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 4, 9)]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return rows, ids, mask


FAMILIES = ("opt", "llama")
PLANS = [SkipPlan("skip_block", (1, 3), scope) for scope in SCOPES] + [
    SkipPlan("skip_attn", (2,), "generated"), SkipPlan("skip_ffn", (1, 2), "all"),
    SkipPlan("parallel_attn_ffn", (0, 3), "context"), SkipPlan("parallel_blocks", (1,), "generated"),
    SkipPlan("parallel_blocks", (0, 2), "all", combine="sum"), SkipPlan("drop_last", num_dropped=2),
    SkipPlan("skip_block", (2, 3), "context", context_kv="previous_layer"),
    SkipPlan("skip_attn", (1,), "context", context_kv="compute"),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("use_cache", [True, False])
def test_empty_plan_reproduces_generate_token_for_token(family, use_cache):
    model = tiny(family)
    _, ids, mask = prompts()
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              eos_token_id=EOS, pad_token_id=PAD)[:, ids.shape[1]:]
    got = SkipEngine(model).generate(mask, input_ids=ids, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD,
                                     use_cache=use_cache)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("plan", PLANS, ids=repr)
def test_batch_equals_one_by_one_and_cache_equals_recomputation(family, plan):
    model = tiny(family)
    rows, ids, mask = prompts()
    engine = SkipEngine(model, plan)
    batch = engine.generate(mask, input_ids=ids, max_new_tokens=6, pad_token_id=PAD)
    recomputed = engine.generate(mask, input_ids=ids, max_new_tokens=6, pad_token_id=PAD, use_cache=False)
    assert batch.tolist() == recomputed.tolist()
    for i, row in enumerate(rows):
        alone = engine.generate(torch.ones(1, len(row), dtype=torch.long), input_ids=torch.tensor([row]),
                                max_new_tokens=6, pad_token_id=PAD)
        assert alone[0].tolist() == batch[i].tolist(), i


def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_skip_block_everywhere_equals_deleting_the_layers(family):
    model = tiny(family)
    _, ids, mask = prompts()
    skipped = (1, 3)
    pruned = copy.deepcopy(model)
    layers = pruned.model.decoder.layers if family == "opt" else pruned.model.layers
    kept = torch.nn.ModuleList(layer for i, layer in enumerate(layers) if i not in skipped)
    if family == "opt":
        pruned.model.decoder.layers = kept
    else:
        pruned.model.layers = kept
        pruned.config.num_hidden_layers = len(kept)
        for i, layer in enumerate(kept):
            layer.self_attn.layer_idx = i
    logits, _ = SkipEngine(model, SkipPlan("skip_block", skipped, "all")).forward(mask, ids.shape[1], input_ids=ids)
    real = mask.bool()
    torch.testing.assert_close(logits[real], _logits(pruned, ids, mask)[real], rtol=1e-4, atol=1e-4)


OUTPUT_PROJECTIONS = {("opt", "skip_ffn"): lambda layer: layer.fc2,
                      ("llama", "skip_ffn"): lambda layer: layer.mlp.down_proj,
                      ("opt", "skip_attn"): lambda layer: layer.self_attn.out_proj,
                      ("llama", "skip_attn"): lambda layer: layer.self_attn.o_proj}


@pytest.mark.parametrize("family, mode", sorted(OUTPUT_PROJECTIONS))
def test_skipping_a_sublayer_everywhere_equals_zeroing_its_output_projection(family, mode):
    model = tiny(family)
    _, ids, mask = prompts()
    zeroed = copy.deepcopy(model)
    layers = zeroed.model.decoder.layers if family == "opt" else zeroed.model.layers
    with torch.no_grad():
        for i in (0, 4):
            out = OUTPUT_PROJECTIONS[family, mode](layers[i])
            out.weight.zero_()
            if out.bias is not None:
                out.bias.zero_()
    logits, _ = SkipEngine(model, SkipPlan(mode, (0, 4), "all")).forward(mask, ids.shape[1], input_ids=ids)
    real = mask.bool()
    torch.testing.assert_close(logits[real], _logits(zeroed, ids, mask)[real], rtol=1e-4, atol=1e-4)


def _one_token_opt(num_layers: int):
    """A tiny OPT cut to ``num_layers`` blocks, one input token, and its first hidden state."""
    model = tiny("opt")
    dec = model.model.decoder
    dec.layers = dec.layers[:num_layers]
    token = torch.tensor([[5]])
    h = dec.embed_tokens(token) + dec.embed_positions(torch.ones(1, 1, dtype=torch.long), 0,
                                                      position_ids=torch.zeros(1, 1, dtype=torch.long))
    return model, token, h


def _attn(layer, x):
    # one token attends only to itself, so self-attention is out_proj(v_proj(x))
    return layer.self_attn.out_proj(layer.self_attn.v_proj(x))


def _ffn(layer, x):
    return layer.fc2(layer.activation_fn(layer.fc1(x)))


def _run(model, token, plan):
    logits, _ = SkipEngine(model, plan).forward(torch.ones(1, 1, dtype=torch.long), 1, input_ids=token)
    return logits


def test_parallel_attn_ffn_matches_the_formula_for_one_block():
    model, token, h = _one_token_opt(1)
    layer = model.model.decoder.layers[0]
    out = h + _attn(layer, layer.self_attn_layer_norm(h)) + _ffn(layer, layer.final_layer_norm(h))
    expected = model.lm_head(model.model.decoder.final_layer_norm(out))
    torch.testing.assert_close(_run(model, token, SkipPlan("parallel_attn_ffn", (0,), "all")), expected)


@pytest.mark.parametrize("combine", ["mean", "sum"])
def test_parallel_blocks_match_the_formula_for_one_pair(combine):
    model, token, h = _one_token_opt(2)
    deltas = []
    for layer in model.model.decoder.layers:
        mid = h + _attn(layer, layer.self_attn_layer_norm(h))
        deltas.append(mid + _ffn(layer, layer.final_layer_norm(mid)) - h)
    out = h + (deltas[0] + deltas[1]) / (2 if combine == "mean" else 1)
    expected = model.lm_head(model.model.decoder.final_layer_norm(out))
    plan = SkipPlan("parallel_blocks", (0,), "all", combine=combine)
    torch.testing.assert_close(_run(model, token, plan), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_generated_scope_leaves_prefill_logits_unchanged(family):
    model = tiny(family)
    _, ids, mask = prompts()
    width = ids.shape[1]
    base, _ = SkipEngine(model).forward(mask, width, input_ids=ids)
    for mode in MODES:
        plan = SkipPlan(mode, (1, 3), "generated", num_dropped=2 if mode == "drop_last" else 0)
        if mode == "drop_last":
            continue  # drop_last removes blocks for every token by definition
        logits, _ = SkipEngine(model, plan).forward(mask, width, input_ids=ids)
        assert torch.equal(logits, base), mode


@pytest.mark.parametrize("family", FAMILIES)
def test_every_plan_changes_the_output_and_context_kv_policies_differ(family):
    model = tiny(family)
    _, ids, mask = prompts()
    base = SkipEngine(model).generate(mask, input_ids=ids, max_new_tokens=8).tolist()
    outputs = [SkipEngine(model, plan).generate(mask, input_ids=ids, max_new_tokens=8).tolist() for plan in PLANS]
    assert all(out != base for out in outputs)
    compute, previous = (SkipEngine(model, SkipPlan("skip_block", (2, 3), "context", context_kv=kv)).generate(
        mask, input_ids=ids, max_new_tokens=8).tolist() for kv in ("compute", "previous_layer"))
    assert compute != previous


def test_model_is_unchanged_after_a_skipped_run():
    model = tiny("opt")
    _, ids, mask = prompts()
    before = _logits(model, ids, mask)
    SkipEngine(model, SkipPlan("skip_block", (1, 2), "all")).generate(mask, input_ids=ids, max_new_tokens=3)
    assert torch.equal(_logits(model, ids, mask), before)


def test_every_kth_layer_uses_the_papers_bounds():
    assert every_kth_layer(12, 2, 0) == (2, 4, 6, 8, 10)
    assert every_kth_layer(12, 3, 4, 10) == (6, 9)
    assert every_kth_layer(8, 4, -1) == (0, 4)


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "skip_everything"}, "mode='skip_everything': allowed"),
    ({"mode": "skip_block", "layers": (1,), "scope": "prompt"}, "scope='prompt': allowed"),
    ({"mode": "parallel_blocks", "layers": (1, 2)}, "overlap at layers [1]"),
    ({"mode": "skip_block", "layers": (3, 1)}, "must be increasing"),
])
def test_bad_plans_are_refused_with_the_allowed_values(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SkipPlan(**kwargs)


def test_layers_outside_the_model_are_refused():
    with pytest.raises(ValueError, match=r"layers \[5\] out of range: allowed 0..4"):
        SkipEngine(tiny("opt"), SkipPlan("skip_block", (5,)))
    with pytest.raises(ValueError, match=r"layers \[4\] out of range: allowed 0..3 for mode='parallel_blocks'"):
        SkipEngine(tiny("opt"), SkipPlan("parallel_blocks", (4,)))

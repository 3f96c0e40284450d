"""The skip engine on tiny random OPT and LLaMA models: exactness against Hugging Face."""

import copy
import json
import re

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
    # greedy sequences vary and a skipped computation shows in them; norms get distinct random
    # weights (they start as ones), so using one norm in place of another shows too
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5) if name.endswith("weight") else param.normal_(0, 0.1)
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


def without_layers(model, family, skipped):
    """A copy of ``model`` with the layers ``skipped`` deleted."""
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
    return pruned


@pytest.mark.parametrize("family", FAMILIES)
def test_skip_block_everywhere_equals_deleting_the_layers(family):
    model = tiny(family)
    _, ids, mask = prompts()
    skipped = (1, 3)
    pruned = without_layers(model, family, skipped)
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


# ---------------------------------------------------------------------------- compute accounting

def _linear_weights(layer, prefix=""):
    return sum(m.weight.numel() for name, m in layer.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith(prefix))


@pytest.mark.parametrize("family", FAMILIES)
def test_unskipped_flops_per_token_are_twice_the_linear_weights_plus_attention(family):
    model = tiny(family)
    _, ids, mask = prompts()
    engine = SkipEngine(model)
    engine.generate(mask, input_ids=ids, max_new_tokens=4)
    stats = engine.stats
    layers = engine.adapter.layers()
    B, T = ids.shape
    assert stats.tokens["prefill"] == B * T and stats.tokens["decode"] == 3 * B and stats.steps["decode"] == 3
    per_token = stats.per_token("prefill")
    assert per_token["projections"] == 2 * sum(_linear_weights(layer, "self_attn") for layer in layers)
    assert per_token["projections"] + per_token["ffn"] == 2 * sum(_linear_weights(layer) for layer in layers)
    # prefill: every one of the T tokens scores all T keys (masked ones included), in every layer
    heads_x_dim = 32
    assert per_token["attention"] == len(layers) * T * 4 * heads_x_dim
    # logits only at the last position of each row
    assert stats.executed["prefill", "lm_head"] == B * 2 * VOCAB * 32
    assert stats.fraction("prefill") == stats.fraction("decode") == 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_skipped_flops_follow_the_plan(family):
    model = tiny(family)
    _, ids, mask = prompts()
    base = SkipEngine(model)
    base.generate(mask, input_ids=ids, max_new_tokens=4, use_cache=True)
    full = base.stats
    head = full.executed["decode", "lm_head"]
    body = sum(full.executed["decode", c] for c in ("projections", "attention", "ffn"))
    skip = SkipEngine(model, SkipPlan("skip_block", (1, 3), "generated"))
    skip.generate(mask, input_ids=ids, max_new_tokens=4)
    assert skip.stats.fraction("prefill") == 1.0
    assert skip.stats.fraction("decode") == pytest.approx((body * 3 / 5 + head) / (body + head))
    assert skip.stats.depth_fraction("decode") == pytest.approx(3 / 5)
    ffn = SkipEngine(model, SkipPlan("skip_ffn", (0, 2, 4), "all"))
    ffn.generate(mask, input_ids=ids, max_new_tokens=4)
    for phase in ("prefill", "decode"):
        assert ffn.stats.executed[phase, "ffn"] == pytest.approx(full.executed[phase, "ffn"] * 2 / 5)
        assert ffn.stats.executed[phase, "attention"] == full.executed[phase, "attention"]
    dropped = SkipEngine(model, SkipPlan("drop_last", num_dropped=2))
    dropped.generate(mask, input_ids=ids, max_new_tokens=4)
    assert dropped.stats.fraction("decode") == pytest.approx((body * 3 / 5 + head) / (body + head))


@pytest.mark.parametrize("plan", [SkipPlan("parallel_attn_ffn", (0, 1, 2), "all"),
                                  SkipPlan("parallel_blocks", (0, 2), "all")], ids=repr)
def test_parallel_modes_execute_every_flop_but_shorten_the_chain(plan):
    engine = SkipEngine(tiny("opt"), plan)
    _, ids, mask = prompts()
    engine.generate(mask, input_ids=ids, max_new_tokens=3)
    assert engine.stats.fraction("prefill") == engine.stats.fraction("decode") == 1.0
    assert engine.stats.depth_fraction("decode") == pytest.approx(7 / 10 if plan.mode == "parallel_attn_ffn" else 6 / 10)


def test_context_scope_computes_the_keys_it_leaves_for_later_tokens():
    model = tiny("opt")
    _, ids, mask = prompts()
    base = SkipEngine(model)
    base.generate(mask, input_ids=ids, max_new_tokens=2)
    computed = SkipEngine(model, SkipPlan("skip_block", (1, 3), "context", context_kv="compute"))
    computed.generate(mask, input_ids=ids, max_new_tokens=2)
    previous = SkipEngine(model, SkipPlan("skip_block", (1, 3), "context", context_kv="previous_layer"))
    previous.generate(mask, input_ids=ids, max_new_tokens=2)
    assert computed.stats.fraction("decode") == previous.stats.fraction("decode") == 1.0
    full_proj = base.stats.executed["prefill", "projections"]
    qkv_share = 3 / 4  # q, k, v of the four equal square projections
    assert computed.stats.executed["prefill", "projections"] == pytest.approx(full_proj * (1 - 2 / 5 * (1 - qkv_share)))
    assert previous.stats.executed["prefill", "projections"] == pytest.approx(full_proj * 3 / 5)


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_plan_on_inputs_embeds_reproduces_generate(family):
    # the evaluation feeds soft prompts as inputs_embeds, left-padded
    model = tiny(family)
    _, ids, mask = prompts()
    embeds = model.get_input_embeddings()(ids) + 0.1 * torch.randn(ids.shape + (32,), generator=torch.Generator().manual_seed(2))
    expected = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              eos_token_id=EOS, pad_token_id=PAD)
    got = SkipEngine(model).generate(mask, inputs_embeds=embeds, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
    assert got.tolist() == expected.tolist()


# ---------------------------------------------------------------------------- the skip grid

def test_grid_points_cover_modes_scopes_intervals_and_starts():
    from mmskip.skipping.grid import SkippingConfig, grid_points

    cfg = SkippingConfig(start_layers=[0, 2], semantics=["textbook"])  # official: tests/test_grid_semantics.py
    points = grid_points(cfg, "skip_block", 8)
    assert len(points) == 3 * 3 * 2  # scopes x intervals x start layers
    by_key = {p.key: p for p in points}
    assert by_key["skip_block-context-k2-s0"].plan.layers == (2, 4, 6)
    assert by_key["skip_block-generated-k3-s2"].plan.layers == (3, 6)
    assert by_key["skip_block-all-k4-s2"].plan.scope == "all"
    pairs = grid_points(cfg, "parallel_blocks", 8)
    for p in pairs:
        assert all(i + 1 < 8 for i in p.plan.layers) and p.skipped_blocks == 2 * len(p.plan.layers)
    drops = grid_points(cfg, "drop_last", 8)
    assert [(p.key, p.skipped_blocks) for p in drops] == [("drop_last-1", 1), ("drop_last-2", 2), ("drop_last-3", 3)]
    full = SkippingConfig(grid="full", semantics=["textbook"])
    assert len(grid_points(full, "skip_attn", 8)) == 3 * 3 * 8  # start layers -1 .. 6
    from mmskip.skipping.grid import grid_limit
    from mmskip.tasks import get_task

    vqa, caption = get_task("vqa"), get_task("caption")
    assert grid_limit(full, vqa) == 0 and grid_limit(cfg, vqa) == 320 and grid_limit(cfg, caption) == 48
    # each modality's share of the examples (params example_shares), at least 1; the full grid evaluates all
    from mmskip.params import ExampleSharesConfig

    shares = ExampleSharesConfig(image=0.5, video=0.01, audio=0.25)
    video_qa, audio_caption = get_task("video_qa"), get_task("audio_caption")
    assert [grid_limit(cfg, t, shares) for t in (vqa, caption, video_qa, audio_caption)] == [160, 24, 3, 12]
    assert grid_limit(full, vqa, shares) == 0 and ExampleSharesConfig() == ExampleSharesConfig(1.0, 0.5, 0.5)


@pytest.mark.parametrize("kwargs, num_layers, message", [
    ({"start_layers": [0, 7]}, 8, r"skipping.start_layers=\[0, 7\]: \[7\] leave no layer to skip in a 8-layer LLM"),
    ({"drop_last": [8]}, 8, r"skipping.drop_last=\[8\]: \[8\] not below the 8 layers"),
])
def test_grid_refuses_points_the_llm_cannot_have(kwargs, num_layers, message):
    from mmskip.skipping.grid import SkippingConfig, grid_points

    with pytest.raises(ValueError, match=message):
        grid_points(SkippingConfig(**kwargs), "drop_last" if "drop_last" in kwargs else "skip_block", num_layers)


def test_grid_config_names_bad_values():
    from mmskip.skipping.grid import SkippingConfig

    with pytest.raises(ValueError, match=r"modes=\['skip_everything'\]: allowed a non-empty subset of"):
        SkippingConfig(modes=["skip_everything"])
    with pytest.raises(ValueError, match="grid='huge': allowed"):
        SkippingConfig(grid="huge")


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_forward_is_differentiable_and_matches_hugging_face_gradients(family):
    """Training with a skip plan backpropagates through the engine: with an empty plan the loss
    and the input gradient equal Hugging Face's; with skip_block on all tokens they equal the
    model with those layers deleted."""
    model = tiny(family).requires_grad_(False)
    _, ids, mask = prompts()
    right = torch.stack([torch.cat([r[m.bool()], r[~m.bool()]]) for r, m in zip(ids, mask)])
    right_mask = torch.stack([torch.cat([m[m.bool()], m[~m.bool()]]) for m in mask])
    embeds = model.get_input_embeddings()(right).detach()

    def grads(fn):
        x = embeds.clone().requires_grad_(True)
        logits = fn(x)
        loss = (logits.log_softmax(-1)[..., 5] * right_mask).sum()  # padding positions do not count
        loss.backward()
        return loss.detach(), x.grad

    hf = grads(lambda x: model(inputs_embeds=x, attention_mask=right_mask).logits)
    engine = grads(lambda x: SkipEngine(model).forward(right_mask, x.shape[1], inputs_embeds=x)[0])
    torch.testing.assert_close(engine[0], hf[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(engine[1], hf[1], rtol=1e-4, atol=1e-5)
    pruned = without_layers(model, family, (1, 3))
    expected = grads(lambda x: pruned(inputs_embeds=x, attention_mask=right_mask).logits)
    plan = SkipPlan("skip_block", (1, 3), "all")
    skipped = grads(lambda x: SkipEngine(model, plan).forward(right_mask, x.shape[1], inputs_embeds=x)[0])
    torch.testing.assert_close(skipped[0], expected[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(skipped[1], expected[1], rtol=1e-4, atol=1e-5)


# --- the preallocated cache: what each plan keeps, written in place ---------------------------------

@pytest.mark.parametrize("plan, expected", [
    (SkipPlan(), [20] * 5),
    (SkipPlan("skip_block", (1, 3), "generated"), [20, 9, 20, 9, 20]),  # the prompt's keys only
    (SkipPlan("skip_attn", (2,), "generated"), [20, 20, 9, 20, 20]),
    (SkipPlan("skip_block", (1, 3), "all"), [20, None, 20, None, 20]),  # nobody attends there
    (SkipPlan("skip_block", (1, 3), "context"), [20] * 5),  # generated tokens read the context's keys
    (SkipPlan("skip_ffn", (1, 2), "all"), [20] * 5),
    (SkipPlan("parallel_blocks", (1,), "generated"), [20] * 5),
    (SkipPlan("drop_last", num_dropped=2), [20, 20, 20, None, None]),
], ids=repr)
def test_a_cache_keeps_only_the_keys_a_later_token_reads(plan, expected):
    engine = SkipEngine(tiny("opt"), plan)
    assert engine.cache_capacities(9, 20) == expected
    cache = engine.new_cache(3, 9, 20, torch.zeros(1))
    per_position = 3 * 4 * 8 * 2 * 4  # rows x heads x head_dim x (k, v) x float32 bytes
    assert cache.nbytes() == per_position * sum(c or 0 for c in expected)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("plan", PLANS, ids=repr)
def test_cached_steps_write_in_place_and_equal_one_forward(family, plan):
    """Step by step through a KVCache (the prompt, then one token at a time) gives the logits of one
    forward over the whole sequence, and the buffers are never reallocated."""
    model = tiny(family)
    _, ids, mask = prompts()
    engine = SkipEngine(model, plan)
    tokens = torch.randint(3, VOCAB, (ids.shape[0], 4), generator=torch.Generator().manual_seed(5))
    full_ids = torch.cat([ids, tokens], 1)
    full_mask = torch.cat([mask, torch.ones_like(tokens)], 1)
    whole, nothing = engine.forward(full_mask, ids.shape[1], input_ids=full_ids)
    assert nothing is None
    cache = engine.new_cache(ids.shape[0], ids.shape[1], full_ids.shape[1], whole)
    pointers = [(k.data_ptr(), v.data_ptr()) for k, v in filter(None, cache.slots)]
    logits, same = engine.forward(mask, ids.shape[1], input_ids=ids, cache=cache)
    assert same is cache and cache.length == ids.shape[1]
    steps = [logits]
    for t in range(tokens.shape[1]):
        logits, _ = engine.forward(full_mask[:, :ids.shape[1] + t + 1], ids.shape[1], input_ids=tokens[:, t:t + 1],
                                   cache=cache)
        steps.append(logits)
    assert cache.length == full_ids.shape[1]
    assert [(k.data_ptr(), v.data_ptr()) for k, v in filter(None, cache.slots)] == pointers
    real = full_mask.bool()  # padded positions attend to nothing: their logits are not defined
    torch.testing.assert_close(torch.cat(steps, 1)[real], whole[real], rtol=1e-4, atol=1e-4)


# --- the speed benchmark's cost model and bars ----------------------------------------------------

@pytest.mark.parametrize("plan", [SkipPlan(), SkipPlan("skip_block", (1, 3), "generated"),
                                  SkipPlan("skip_attn", (2,), "generated"), SkipPlan("skip_ffn", (1, 2), "generated"),
                                  SkipPlan("parallel_blocks", (1,), "generated"), SkipPlan("drop_last", num_dropped=2)],
                         ids=repr)
def test_the_benchmarks_step_cost_is_what_the_engine_executes(plan):
    """decode_step_cost's FLOPs (the growth bar's model) equal the engine's own count of a decode step."""
    from mmskip.skipping.bench import decode_step_cost

    model = tiny("opt")
    ids = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))
    engine = SkipEngine(model, plan)
    engine.generate(torch.ones_like(ids), input_ids=ids, max_new_tokens=2, pad_token_id=PAD)
    executed = sum(engine.stats.executed["decode", c] for c in ("projections", "attention", "ffn", "lm_head"))
    flops, read = decode_step_cost(engine, 3, 7)
    assert flops == executed
    more_flops, more_read = decode_step_cost(engine, 3, 70)
    assert more_flops > flops and more_read > read  # only the attention grows with the keys


def test_the_benchmark_keeps_the_fastest_repeat_and_states_every_bar(tmp_path):
    from mmskip.params import BenchConfig
    from mmskip.skipping.bench import BARS, bench_shapes, shape_bars

    cfg = BenchConfig(hidden_size=32, num_layers=4, num_heads=2, ffn_dim=64, vocab_size=97, batch_sizes=(1, 2),
                      context_tokens=5, new_tokens=6, repeats=5)
    shapes = bench_shapes(cfg, seed=0)
    assert set(shapes) == {"1", "2"}
    for rows in shapes.values():
        assert set(rows) == {"generate", "none", *MODES}
        assert rows["none"]["speedup"] == 1.0 and rows["none"]["efficiency"] is None
        for name in MODES:
            row = rows[name]
            assert row["speedup"] == rows["none"]["decode_ms_per_token"] / row["decode_ms_per_token"]
            assert row["growth"]["window"] == 2 and row["growth"]["allowed_ratio"] >= 1.0
            assert row["growth"]["early_gb_per_s"] > 0 and row["growth"]["early_gflop_per_s"] > 0
    bars = shape_bars(shapes)
    assert [sorted(bar) for bar in bars] == [["bar", "met", "values"]] * 3
    efficiency = bars[1]["values"]
    assert set(efficiency) == {f"{m} @ {b}" for m in BARS["efficiency_modes"] for b in ("1", "2")}
    assert bars[1]["met"] == all(v >= BARS["efficiency_min"] for v in efficiency.values())
    assert bars[2]["met"] == all(v <= BARS["growth_max"] for v in bars[2]["values"].values())


def test_bench_engine_writes_its_bars_and_device_and_the_report_shows_them(tmp_path):
    from mmskip.params import EngineBenchConfig
    from mmskip.report.skipping import _bench
    from mmskip.skipping.bench import bench_engine

    cfg = EngineBenchConfig(hidden_size=32, num_layers=4, num_heads=2, ffn_dim=64, vocab_size=97, batch_sizes=(1,),
                            context_tokens=5, new_tokens=4, repeats=5)
    result = bench_engine(cfg, 0, tmp_path / "engine.json")
    written = json.loads((tmp_path / "engine.json").read_text())
    assert written["all_met"] == all(bar["met"] for bar in written["bars"]) == result["all_met"]
    assert written["machine"]["device"] == "cpu" and written["machine"]["cpu_capability"]
    shown = _bench(tmp_path / "engine.json")
    assert [b["bar"] for b in shown["bars"]] == [b["bar"] for b in written["bars"]]
    assert {r["name"] for r in shown["shapes"]} == {"generate", "none", *MODES}


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_engine_with_its_preallocated_cache_reproduces_generate(family):
    """The cache takes the model's dtype: in bfloat16 the unskipped engine is Hugging Face generate, token for token."""
    model = tiny(family).to(torch.bfloat16)
    _, ids, mask = prompts()
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              eos_token_id=EOS, pad_token_id=PAD)[:, ids.shape[1]:]
    engine = SkipEngine(model)
    assert engine.new_cache(3, 9, 17, model.get_input_embeddings().weight).slots[0][0].dtype == torch.bfloat16
    got = engine.generate(mask, input_ids=ids, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
    assert got.tolist() == expected.tolist()


# --- decode steps of fixed shapes: static, compiled, CUDA graphs ----------------------------------

def _decode_both(model, plan, decode, ids, mask, new_tokens=10, engine=None):
    """(eager tokens, eager stats, ``decode``'s tokens, its stats) of one greedy decode."""
    eager = SkipEngine(model, plan)
    expected = eager.generate(mask, input_ids=ids, max_new_tokens=new_tokens, eos_token_id=EOS, pad_token_id=PAD)
    engine = engine or SkipEngine(model, plan)
    engine.stats = type(engine.stats)()
    got = engine.generate(mask, input_ids=ids, max_new_tokens=new_tokens, eos_token_id=EOS, pad_token_id=PAD,
                          decode=decode)
    counts = [{k: v for k, v in e.stats.as_dict().items() if k != "seconds"} for e in (eager, engine)]
    return expected.tolist(), counts[0], got.tolist(), counts[1]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("plan", [SkipPlan()] + PLANS, ids=repr)
def test_static_decode_steps_equal_the_eager_engine_and_count_the_same(family, plan):
    """Fixed-shape steps (whole-buffer attention under a mask, tensor write index) give the eager
    engine's tokens and its executed FLOPs; a second decode of other prompts of the same shape
    reuses the decoder (its buffers reset) and is exact too."""
    model = tiny(family)
    _, ids, mask = prompts()
    engine = SkipEngine(model, plan)
    expected, eager_counts, got, counts = _decode_both(model, plan, "static", ids, mask, engine=engine)
    assert got == expected and counts == eager_counts
    assert len(engine.static_decoders) == 1
    other = torch.randint(3, VOCAB, ids.shape, generator=torch.Generator().manual_seed(9)).masked_fill(mask == 0, PAD)
    expected, eager_counts, got, counts = _decode_both(model, plan, "static", other, mask, engine=engine)
    assert got == expected and counts == eager_counts
    assert len(engine.static_decoders) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_decode_step_equals_the_eager_engine(family):
    """torch.compile(fullgraph=True, dynamic=False) of the fixed-shape step: one graph for the
    whole step (a graph break would raise), compiled once per shape and reused, exact tokens."""
    model = tiny(family)
    _, ids, mask = prompts()
    from torch._dynamo.utils import counters

    plan = SkipPlan("skip_block", (1, 3), "generated")
    engine = SkipEngine(model, plan)
    graphs = counters["stats"]["unique_graphs"]
    for seed in (0, 1):  # the second decode reuses the compiled step
        these = ids if seed == 0 else torch.randint(3, VOCAB, ids.shape, generator=torch.Generator().manual_seed(seed))
        expected, eager_counts, got, counts = _decode_both(model, plan, "compiled", these, mask, engine=engine)
        assert got == expected and counts == eager_counts
    (decoder,) = engine.static_decoders.values()
    assert decoder._compiled is not None
    assert counters["stats"]["unique_graphs"] == graphs + 1  # one graph, no recompilation per step or call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graph_decode_replays_the_static_step_exactly(family):
    """A CUDA graph replays the fixed-shape step's own kernels: in bfloat16 its tokens are the
    static step's, run eagerly, token for token, call after call; in float32 they are also the
    textbook engine's."""
    _, ids, mask = prompts()
    ids, mask = ids.cuda(), mask.cuda()
    for dtype in (torch.bfloat16, torch.float32):
        model = tiny(family).to("cuda", dtype)
        for plan in (SkipPlan(), SkipPlan("skip_block", (1, 3), "generated"), SkipPlan("skip_attn", (2,), "context")):
            engine = SkipEngine(model, plan)
            static = SkipEngine(model, plan)
            for _ in range(2):  # the second decode replays the captured graph from its first step
                expected, eager_counts, got, counts = _decode_both(model, plan, "cuda_graph", ids, mask, engine=engine)
                assert counts == eager_counts
                if dtype == torch.float32:
                    assert got == expected
                _, _, reference, _ = _decode_both(model, plan, "static", ids, mask, engine=static)
                assert got == reference


@pytest.mark.parametrize("kwargs, message", [
    ({"decode": "graph"}, "decode='graph': allowed ['eager', 'static', 'compiled', 'cuda_graph']"),
    ({"decode": "cuda_graph"}, "decode='cuda_graph' on device 'cpu': CUDA graphs need a CUDA device"),
    ({"decode": "static", "use_cache": False}, "decode='static' decodes through the preallocated cache"),
    ({"decode": "compiled", "plan": SkipPlan(semantics="official")}, "allowed there: ['eager']"),
])
def test_decodes_the_engine_cannot_run_are_refused(kwargs, message):
    plan = kwargs.pop("plan", SkipPlan())
    _, ids, mask = prompts()
    engine = SkipEngine(tiny("opt"), plan)
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.generate(mask, input_ids=ids, max_new_tokens=3, **kwargs)
    assert engine.static_decoders == {} and engine.stats.steps["prefill"] == 0


def test_the_benchmark_measures_fixed_shape_decodes_against_their_own_unskipped_run():
    from mmskip.params import EngineBenchConfig
    from mmskip.skipping.bench import bench_shapes, gpu_bars, shape_bars

    cfg = EngineBenchConfig(hidden_size=32, num_layers=4, num_heads=2, ffn_dim=64, vocab_size=97, batch_sizes=(1,),
                            context_tokens=5, new_tokens=6, repeats=5, decodes=("eager", "static"))
    rows = bench_shapes(cfg, seed=0, bandwidth=10.0)["1"]
    assert set(rows) == {"generate", "none", *MODES, "none+static", "skip_block+static"}
    static, skip = rows["none+static"], rows["skip_block+static"]
    assert (static["plan"], static["decode"], skip["plan"], skip["decode"]) == ("none", "static", "skip_block", "static")
    assert skip["speedup"] == static["decode_ms_per_token"] / skip["decode_ms_per_token"]
    assert static["vs_generate_decode"] == rows["generate"]["decode_ms_per_token"] / static["decode_ms_per_token"]
    for row in rows.values():
        assert 0 < row["roofline_fraction"]
    # the CPU growth bar reads the eager runs only; a CUDA run's bars read the captured rows, absent here
    assert not any("+" in name for name in shape_bars({"1": rows})[2]["values"])
    assert [bar["met"] for bar in gpu_bars({"1": rows})] == [False] * 3
    assert all(bar["values"] == {} for bar in gpu_bars({"1": rows}))


def test_gpu_bars_read_the_captured_rows_at_batch_1():
    from mmskip.skipping.bench import gpu_bars

    rows = {"none+cuda_graph": {"vs_generate_decode": 2.5, "roofline_fraction": 0.45},
            "skip_block+cuda_graph": {"efficiency": 0.93}}
    bars = gpu_bars({"1": rows})
    assert [bar["values"] for bar in bars] == [{"1": 2.5}, {"1": 0.45}, {"1": 0.93}]
    assert [bar["met"] for bar in bars] == [True, False, True]


def test_bench_engine_refuses_a_device_this_machine_lacks_before_any_work(tmp_path):
    from mmskip.params import EngineBenchConfig
    from mmskip.skipping.bench import bench_engine

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    cfg = EngineBenchConfig(hidden_size=32, num_layers=4, num_heads=2, ffn_dim=64, vocab_size=97, batch_sizes=(1,),
                            context_tokens=5, new_tokens=4, repeats=5, device="cuda")
    with pytest.raises(ValueError, match="device='cuda': not available on this machine"):
        bench_engine(cfg, 0, tmp_path / "engine.json")
    assert list(tmp_path.iterdir()) == []

"""Token-level skipping (visual-token exit, FastV, early exit) on tiny random OPT and LLaMA
models: exact under the KV cache and in left-padded batches, and equal to references built
from Hugging Face's own forward."""

import pytest
import torch

from mmskip.skipping.engine import SkipEngine
from mmskip.skipping.plan import SkipPlan
from mmskip.skipping.tokens import TokenEngine, TokenPlan

from test_skipping import EOS, FAMILIES, PAD, prompts, tiny, without_layers

NUM_VISUAL = 3
LAYERS = 5  # tiny()'s


def visual_prompts():
    """The left-padded prompts of test_skipping with each row's first three tokens marked visual."""
    rows, ids, mask = prompts()
    first = mask.argmax(1)
    index = torch.arange(ids.shape[1])[None]
    visual = (index >= first[:, None]) & (index < first[:, None] + NUM_VISUAL)
    return rows, ids, mask, visual


def _positions(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _gather(t, stay):
    idx = stay.nonzero()[:, 1].view(stay.shape[0], -1)
    return t.gather(1, idx) if t.dim() == 2 else t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))


def reference_drop(model, family, ids, mask, visual, layer, new_tokens, stay_of=None):
    """Greedy decoding where, after ``layer``, only the positions ``stay_of(ids, mask)`` (default: the
    non-visual ones) go on: Hugging Face's model to ``layer`` (its hidden states), then a copy of
    the model holding only the later layers on the gathered positions, each step from scratch."""
    upper = without_layers(model, family, set(range(layer + 1)))
    if family == "opt":
        with torch.no_grad():  # the positions were added below; the upper model must not add them again
            upper.model.decoder.embed_positions.weight.zero_()
    out = []
    for _ in range(new_tokens):
        positions = _positions(mask)
        with torch.no_grad():
            kwargs = {"position_ids": positions} if family == "llama" else {}
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kwargs).hidden_states
            stay = ~visual if stay_of is None else stay_of(ids, mask)
            h, m = _gather(hidden[layer + 1], stay), _gather(mask, stay)
            kwargs = {"position_ids": _gather(positions, stay)} if family == "llama" else {}
            logits = upper(inputs_embeds=h, attention_mask=m, **kwargs).logits[:, -1]
        token = logits.argmax(-1)
        out.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        visual = torch.cat([visual, torch.zeros_like(visual[:, :1])], 1)
    return torch.stack(out, 1)


NOOP_PLANS = [TokenPlan(), TokenPlan("fastv", 1, keep=1.0), TokenPlan("visual_exit", LAYERS - 1),
              TokenPlan("early_exit", 2, threshold=0.0)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("plan", NOOP_PLANS, ids=lambda p: p.name)
def test_plans_that_leave_nothing_reproduce_generate_token_for_token(family, plan):
    model = tiny(family)
    _, ids, mask, visual = visual_prompts()
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              eos_token_id=EOS, pad_token_id=PAD)[:, ids.shape[1]:]
    for use_cache in (True, False):
        got = TokenEngine(model, plan).generate(mask, input_ids=ids, visual=visual, max_new_tokens=8,
                                                eos_token_id=EOS, pad_token_id=PAD, use_cache=use_cache)
        assert got.tolist() == expected.tolist(), use_cache


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [0, 2])
def test_visual_exit_equals_hugging_face_on_the_tokens_that_stay(family, layer):
    model = tiny(family)
    _, ids, mask, visual = visual_prompts()
    got = TokenEngine(model, TokenPlan("visual_exit", layer)).generate(mask, input_ids=ids, visual=visual,
                                                                        max_new_tokens=6, pad_token_id=PAD)
    expected = reference_drop(model, family, ids, mask, visual, layer, 6)
    assert got.tolist() == expected.tolist()
    # and it changes what the model says: the visual tokens mattered
    plain = TokenEngine(model).generate(mask, input_ids=ids, max_new_tokens=6, pad_token_id=PAD)
    assert got.tolist() != plain.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_keeps_the_visual_tokens_the_last_prompt_token_attends_to_most(family):
    model = tiny(family)
    _, ids, mask, visual = visual_prompts()
    layer, keep = 1, 0.5  # ceil(0.5 x 3) = 2 of the 3 visual tokens stay
    eager = without_layers(model, family, set())
    eager.set_attn_implementation("eager")
    width = ids.shape[1]

    def stay_of(ids_now, mask_now):
        kwargs = {"position_ids": _positions(mask_now)} if family == "llama" else {}
        with torch.no_grad():
            attn = eager(input_ids=ids_now, attention_mask=mask_now, output_attentions=True, **kwargs).attentions
        weight = attn[layer][:, :, width - 1].float().mean(1)  # the last prompt token's, mean over heads
        v = torch.cat([visual, torch.zeros(ids_now.shape[0], ids_now.shape[1] - width, dtype=torch.bool)], 1)
        stay = ~v
        for row in range(ids_now.shape[0]):
            ranked = sorted(v[row].nonzero()[:, 0].tolist(), key=lambda j: (-float(weight[row, j]), j))
            stay[row, ranked[:2]] = True
        return stay

    engine = TokenEngine(model, TokenPlan("fastv", layer, keep=keep))
    got = engine.generate(mask, input_ids=ids, visual=visual, max_new_tokens=6, pad_token_id=PAD)
    assert got.tolist() == reference_drop(model, family, ids, mask, visual, layer, 6, stay_of).tolist()
    assert got.tolist() != TokenEngine(model, TokenPlan("visual_exit", layer)).generate(
        mask, input_ids=ids, visual=visual, max_new_tokens=6, pad_token_id=PAD).tolist()


def mixed_threshold(model, layer):
    """An entropy bound at which some of the generated tokens exit and some do not."""
    _, ids, mask, _ = visual_prompts()
    engine = TokenEngine(model, TokenPlan("early_exit", layer, threshold=0.0))
    engine.generate(mask, input_ids=ids, max_new_tokens=6, pad_token_id=PAD)
    return float(torch.cat(engine.entropies).median())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["visual_exit", "fastv", "early_exit"])
def test_batch_equals_one_by_one_and_cache_equals_recomputation(family, kind):
    model = tiny(family)
    rows, ids, mask, visual = visual_prompts()
    plan = TokenPlan(kind, 1, keep=0.5, threshold=mixed_threshold(model, 1) if kind == "early_exit" else 0.0)
    engine = TokenEngine(model, plan)
    batch = engine.generate(mask, input_ids=ids, visual=visual, max_new_tokens=6, pad_token_id=PAD)
    if kind == "early_exit":
        assert 0 < sum(engine.exits) < ids.shape[0] * 5  # some of the 5 cached decode steps' tokens exit, not all
    recomputed = engine.generate(mask, input_ids=ids, visual=visual, max_new_tokens=6, pad_token_id=PAD,
                                 use_cache=False)
    assert batch.tolist() == recomputed.tolist()
    for i, row in enumerate(rows):
        alone = engine.generate(torch.ones(1, len(row), dtype=torch.long), input_ids=torch.tensor([row]),
                                visual=(torch.arange(len(row)) < NUM_VISUAL)[None], max_new_tokens=6,
                                pad_token_id=PAD)
        assert alone[0].tolist() == batch[i].tolist(), i


@pytest.mark.parametrize("family", FAMILIES)
def test_early_exit_for_every_token_equals_skipping_the_blocks_above_for_generated_tokens(family):
    model = tiny(family)
    _, ids, mask, _ = visual_prompts()
    layer = 1
    engine = TokenEngine(model, TokenPlan("early_exit", layer, threshold=1e9))
    got = engine.generate(mask, input_ids=ids, max_new_tokens=8, pad_token_id=PAD)
    assert engine.exits == [ids.shape[0]] * 7
    above = SkipPlan("skip_block", tuple(range(layer + 1, LAYERS)), "generated")
    expected = SkipEngine(model, above).generate(mask, input_ids=ids, max_new_tokens=8, pad_token_id=PAD)
    assert got.tolist() == expected.tolist()


def _ffn_fraction(stats, phase):
    return stats.executed[phase, "ffn"] / stats.full[phase, "ffn"]


@pytest.mark.parametrize("family", FAMILIES)
def test_executed_flops_count_the_tokens_that_stay(family):
    model = tiny(family)
    _, ids, mask, visual = visual_prompts()
    T, layer = ids.shape[1], 1
    engine = TokenEngine(model, TokenPlan("visual_exit", layer))
    engine.generate(mask, input_ids=ids, visual=visual, max_new_tokens=4, pad_token_id=PAD)
    stats = engine.stats
    assert _ffn_fraction(stats, "prefill") == pytest.approx(
        ((layer + 1) * T + (LAYERS - layer - 1) * (T - NUM_VISUAL)) / (LAYERS * T))
    assert _ffn_fraction(stats, "decode") == 1.0  # a generated token runs every block
    # its attention reads fewer keys above the exit layer
    assert stats.executed["decode", "attention"] < stats.full["decode", "attention"]
    assert stats.depth["prefill"] / stats.full_depth["prefill"] == pytest.approx(_ffn_fraction(stats, "prefill"))

    engine = TokenEngine(model, TokenPlan("early_exit", layer, threshold=mixed_threshold(model, layer)))
    engine.generate(mask, input_ids=ids, max_new_tokens=6, pad_token_id=PAD)
    n, exited = ids.shape[0] * 5, sum(engine.exits)
    assert _ffn_fraction(engine.stats, "decode") == pytest.approx(
        ((layer + 1) * n + (LAYERS - layer - 1) * (n - exited)) / (LAYERS * n))
    assert _ffn_fraction(engine.stats, "prefill") == 1.0
    # the criterion's LM head is executed for every decoded token, on top of the last layer's for those that stay
    head = engine.stats.executed["decode", "lm_head"] / engine.stats.full["decode", "lm_head"]
    assert head == pytest.approx((n + n - exited) / n)


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "skip_tokens"}, "kind='skip_tokens': allowed"),
    ({"kind": "fastv", "keep": 0.0}, "keep=0.0"),
    ({"kind": "fastv", "keep": 1.5}, "keep=1.5"),
    ({"kind": "early_exit", "threshold": -1.0}, "threshold=-1.0"),
    ({"kind": "early_exit", "threshold": float("nan")}, "threshold=nan"),
])
def test_bad_plans_are_refused_with_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        TokenPlan(**kwargs)


def test_a_layer_outside_the_model_and_bad_visual_masks_are_refused():
    model = tiny("opt")
    with pytest.raises(ValueError, match=r"layer=5: allowed 0..4 for a 5-layer model"):
        TokenEngine(model, TokenPlan("visual_exit", 5))
    _, ids, mask, visual = visual_prompts()
    engine = TokenEngine(model, TokenPlan("fastv", 1, keep=0.5))
    cases = [(None, "needs `visual`"), (visual[:, 1:], "shape"), (visual | (mask == 0), "padding"),
             (visual | (torch.arange(ids.shape[1]) == ids.shape[1] - 1), "last prompt position")]
    uneven = visual.clone()
    uneven[0, -2] = True
    cases.append((uneven, r"\[4, 3, 3\] tokens per row"))
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.generate(mask, input_ids=ids, visual=bad, max_new_tokens=2)

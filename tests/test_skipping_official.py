"""The skip engine under ``semantics="official"``: what the paper's code (mshukor/ima-lmms,
DePALM/pruning/skipping_opt.py and skipping_llama.py) computes, on tiny random OPT, LLaMA and LLaVA.

The reference below is a port of the code's decoder loop (``forward_opt_decoder`` /
``forward_llama_decoder``, entropy and prompt branches left out: ``ent_thresh=-1``, the
training script's default) and of its layer (``forward_opt_layer`` / ``forward_llama_layer``),
written with the model's own modules and an explicit key/value cache, one step per call:
the prefill, then one step per generated token. It takes the code's own arguments (a
``skip_mode`` string, ``skip_interval``, ``start_layer``, ``end_layer``, ``layers_interval``,
``start_drop_layer``), so it checks :func:`official_plan` as well as the engine.
"""

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from mmskip.skipping.engine import SkipEngine
from mmskip.skipping.plan import MODES, SCOPES, SEMANTICS, SkipPlan, official_layers, official_plan

VOCAB, EOS, PAD = 97, 2, 1
NUM_LAYERS = 6
FAMILIES = ("opt", "llama")
# mmskip names -> the code's skip_mode names; scope -> the code's prefix (by step length)
OFFICIAL_MODE = {"skip_block": "skip_block", "skip_attn": "skip_attn", "skip_ffn": "skip_ffn",
                 "parallel_attn_ffn": "parrallel_attn", "parallel_blocks": "parrallel_block", "drop_last": "drop"}
PREFIX = {"generated": "", "all": "context_", "context": "onlycontext_"}


def tiny(family: str, kv_heads: int = 4, num_layers: int = NUM_LAYERS):
    """A tiny random model, as tests/test_skipping.py's (large initialisation, distinct norms);
    LLaMA with ``kv_heads`` key/value heads (4: multi-head, as Vicuna and LLaVA-1.5). In float64:
    in float32 a cached step and a recomputation already differ by ~1e-5 without any skipping
    (summation order), so comparisons at atol 1e-5 test semantics only in double precision."""
    torch.manual_seed(0)
    if family == "opt":
        cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=num_layers, ffn_dim=64,
                        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=PAD,
                        eos_token_id=EOS, bos_token_id=0, init_std=0.5)
        model = OPTForCausalLM(cfg)
    else:
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=num_layers, intermediate_size=64,
                          num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                          pad_token_id=PAD, eos_token_id=EOS, bos_token_id=0, initializer_range=0.5)
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5) if name.endswith("weight") else param.normal_(0, 0.1)
    return model.double().eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread (and much faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompts(lengths=(7, 4, 9)):
    """Left-padded prompts; the batch is wider than 5 tokens (the code's onlycontext bound)."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return rows, ids, mask


# ---------------------------------------------------------------------------- the code's loop, ported

class Parts:
    """The modules of a decoder the reference calls (OPT, LLaMA, LLaVA's LLaMA)."""

    def __init__(self, model):
        kind = model.config.model_type
        if kind == "opt":
            dec = model.model.decoder
            self.family, self.layers, self.embed, self.lm_head = "opt", dec.layers, dec.embed_tokens, model.lm_head
            self.final_norm, self.positions = dec.final_layer_norm, dec.embed_positions
            cfg = model.config
        else:
            inner = model.model if kind == "llama" else model.model.language_model
            self.family, self.layers, self.embed = "llama", inner.layers, inner.embed_tokens
            self.lm_head = model.lm_head
            self.final_norm, self.rotary = inner.norm, inner.rotary_emb
            cfg = model.config if kind == "llama" else model.config.text_config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = cfg.hidden_size // self.heads


def ref_attention(parts, layer, x, past, rope, allowed):
    """Self-attention of the step's tokens with the layer's projections; returns (output, present)."""
    sa = layer.self_attn
    B, T, _ = x.shape
    H, KV, d = parts.heads, parts.kv_heads, parts.head_dim
    if parts.family == "opt":
        q, k, v, scale = sa.q_proj(x) * sa.scaling, sa.k_proj(x), sa.v_proj(x), 1.0
        q, k, v = (t.view(B, T, H, d).transpose(1, 2) for t in (q, k, v))
    else:
        q = sa.q_proj(x).view(B, T, H, d).transpose(1, 2)
        k = sa.k_proj(x).view(B, T, KV, d).transpose(1, 2)
        v = sa.v_proj(x).view(B, T, KV, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *rope)
        scale = d ** -0.5
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    kr, vr = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    scores = (q @ kr.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
    o = (scores.softmax(-1) @ vr).transpose(1, 2).reshape(B, T, -1)
    out = sa.out_proj(o) if parts.family == "opt" else sa.o_proj(o)
    return out, (k, v)


def ref_layer(parts, layer, h, past, rope, allowed, att_mode):
    """forward_opt_layer / forward_llama_layer (do_layer_norm_before, no dropout, no prompt modes)."""
    B, T, _ = h.shape
    residual = h
    if parts.family == "opt":
        x = layer.self_attn_layer_norm(h)
        ffn = lambda y: layer.fc2(layer.activation_fn(layer.fc1(y)))  # noqa: E731
        if att_mode == "skip_attn":
            kv = x.view(B, T, parts.heads, parts.head_dim).transpose(1, 2)
            present = (kv, kv) if past is None else (torch.cat([past[0], kv], 2), torch.cat([past[1], kv], 2))
            residual = x  # "hidden_states = hidden_states ... residual = hidden_states": the normed x
            return residual + ffn(layer.final_layer_norm(x)), present
        if att_mode == "parrallel":
            a, present = ref_attention(parts, layer, x, past, rope, allowed)
            return a + ffn(layer.final_layer_norm(x)) + residual, present
        a, present = ref_attention(parts, layer, x, past, rope, allowed)
        h = residual + a
        if "skip_ffn" in att_mode:
            return h, present
        return h + ffn(layer.final_layer_norm(h)), present
    x = layer.input_layernorm(h)
    if att_mode == "parrallel":
        a, present = ref_attention(parts, layer, x, past, rope, allowed)
        return residual + layer.mlp(x) + a, present
    if att_mode == "skip_attn":
        k = x.view(B, T, parts.kv_heads, parts.head_dim).transpose(1, 2)
        v = k
        k = apply_rotary_pos_emb(k, k, *rope)[0]
        present = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        hs = x
    else:
        a, present = ref_attention(parts, layer, x, past, rope, allowed)
        hs = residual + a
        residual = hs
        if "skip_ffn" not in att_mode:
            hs = layer.post_attention_layernorm(hs)
    if "skip_ffn" not in att_mode:
        hs = residual + layer.mlp(hs)
    return hs, present


def ref_step(parts, h, rope, allowed, past_key_values, skip_mode, skip_interval, start_layer, end_layer,
             layers_interval, start_drop_layer):
    """The layer loop of forward_opt_decoder / forward_llama_decoder for one step (drop: OPT's)."""
    layer_outputs_prev = None
    next_cache = []
    for idx, layer in enumerate(parts.layers):
        past = past_key_values[idx] if past_key_values is not None else None
        bs, l, d = h.shape
        mode = "normal"
        min_skip_at_len = 0
        if "context" in skip_mode:
            if "only" in skip_mode:
                min_skip_at_len = 5
            skip_at_len = 2100
        else:
            skip_at_len = 1
        treated = (l <= skip_at_len and l > min_skip_at_len) and layer_outputs_prev is not None and \
            idx < end_layer and idx > start_layer
        if treated and idx % skip_interval == 0:
            if "skip_attn" in skip_mode:
                mode = "skip_attn"
            elif "parrallel_attn" in skip_mode:
                mode = "parrallel"
            elif "parrallel_block" in skip_mode:
                mode = "parrallelblock"
            elif "skip_ffn" in skip_mode:
                mode = "skip_ffn"
        if treated and ("skip_block" in skip_mode or "parrallel_block" in skip_mode):
            if "parrallel_block" in skip_mode and (idx in layers_interval or (idx - 1) in layers_interval):
                if (idx - 1) in layers_interval:
                    layer_outputs = layer_outputs_prev
                else:
                    js = [ref_layer(parts, parts.layers[j], h, past, rope, allowed, mode) for j in (idx, idx + 1)]
                    k_ = sum([lo[1][0] for lo in js]) / len(js)
                    v_ = sum([lo[1][1] for lo in js]) / len(js)
                    layer_outputs = (sum([lo[0] for lo in js]) / len(js), (k_, v_))
            elif idx % skip_interval == 0:
                layer_outputs = layer_outputs_prev
            else:
                layer_outputs = ref_layer(parts, layer, h, past, rope, allowed, mode)
        elif "drop" in skip_mode:
            if idx >= start_drop_layer and idx < end_layer:
                layer_outputs = layer_outputs_prev
            else:
                layer_outputs = ref_layer(parts, layer, h, past, rope, allowed, mode)
        else:
            layer_outputs = ref_layer(parts, layer, h, past, rope, allowed, mode)
        h = layer_outputs[0]
        layer_outputs_prev = tuple(layer_outputs)
        next_cache.append(layer_outputs[1])
    return parts.lm_head(parts.final_norm(h)), next_cache


def ref_generate(model, mask, skip_mode, steps, skip_interval=2, start_layer=0, end_layer=None, layers_interval=(),
                 start_drop_layer=None, input_ids=None, inputs_embeds=None):
    """Prefill + ``steps`` greedy decode steps with the ported loop: per step its logits (B, T, V)."""
    parts = Parts(model)
    n = len(parts.layers)
    end_layer = n - 1 if end_layer is None else end_layer
    start_drop_layer = n if start_drop_layer is None else start_drop_layer
    h_in = parts.embed(input_ids) if inputs_embeds is None else inputs_embeds
    cache, out = None, []
    for _ in range(steps + 1):
        past = 0 if cache is None else cache[0][0].shape[2]
        B, T = h_in.shape[:2]
        index = torch.arange(past, past + T)
        allowed = (torch.arange(past + T)[None, :] <= index[:, None])[None] & mask.bool()[:, None, :]
        if parts.family == "opt":
            h, rope = h_in + parts.positions(mask, past), None
        else:
            position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, past:]
            h, rope = h_in, parts.rotary(h_in, position_ids)
        logits, cache = ref_step(parts, h, rope, allowed, cache, skip_mode, skip_interval, start_layer, end_layer,
                                 list(layers_interval), start_drop_layer)
        out.append(logits)
        token = logits[:, -1].argmax(-1)
        h_in = parts.embed(token[:, None])
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return out


def engine_steps(engine, mask, first_ids=None, first_embeds=None, tokens_from=None):
    """The engine's logits step by step (prefill, then one token per step) on the tokens the
    reference chose (``tokens_from``: its per-step logits)."""
    width = mask.shape[1]
    logits, cache = engine.forward(mask, width, input_ids=first_ids, inputs_embeds=first_embeds)
    out = [logits]
    for step_logits in tokens_from[:-1]:
        token = step_logits[:, -1].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits, cache = engine.forward(mask, width, input_ids=token[:, None], cache=cache)
        out.append(logits)
    return out


# (mode, interval, start layer, end layer or None, num_dropped) on the 6-layer models: interval 2
# gives layers (2, 4); parallel blocks: layer 1 skipped whole, pairs (2, 3) and (4, 5), layer 5 run
# again. Every mode in every scope, then (context and all scopes: where skipped keys are read or
# chained) interval 1: consecutive skipped layers (a chain of reused caches); end 6: the last
# layer too; parallel blocks from start 2 (layer 3 skipped whole) and interval 3 (no rerun)
CASES = [(mode, 2, 0, None, 0) for mode in MODES if mode != "drop_last"] + [("drop_last", 1, -1, None, 2)]
EXTRA = [("skip_block", 1, 0, None, 0), ("skip_attn", 1, 1, 6, 0), ("parallel_blocks", 2, 2, None, 0),
         ("parallel_blocks", 3, -1, 6, 0)]


def _cases(families=FAMILIES):
    for family in families:
        for case in CASES + EXTRA:
            scopes = ("all",) if case[0] == "drop_last" else ("context", "all") if case in EXTRA else SCOPES
            for scope in scopes:
                name = f"{family}-{case[0]}-k{case[1]}-s{case[2]}-e{case[3]}-{scope}"
                yield pytest.param(family, case, scope, id=name)


def _plan(case, scope, num_layers=NUM_LAYERS):
    mode, interval, start, end, dropped = case
    return official_plan(mode, num_layers, interval, start, end, scope, dropped)


def _reference(model, case, scope, mask, steps=2, **inputs):
    mode, interval, start, end, dropped = case
    n = len(Parts(model).layers)
    end_layer = n - 1 if end is None else end
    return ref_generate(model, mask, PREFIX[scope] + OFFICIAL_MODE[mode], steps, skip_interval=interval,
                        start_layer=start, end_layer=end_layer, layers_interval=range(0, n, interval),
                        start_drop_layer=end_layer - dropped, **inputs)


def _assert_real_close(got, expected, mask, atol=1e-5):
    """Logits of the real (unpadded) positions of one step."""
    real = mask[:, -got.shape[1]:].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=atol)


@pytest.mark.parametrize("family, case, scope", list(_cases()))
def test_engine_matches_the_papers_loop_with_its_kv_cache(family, case, scope):
    model = tiny(family)
    _, ids, mask = prompts()
    expected = _reference(model, case, scope, mask, input_ids=ids)
    got = engine_steps(SkipEngine(model, _plan(case, scope)), mask, first_ids=ids, tokens_from=expected)
    for step, (g, e) in enumerate(zip(got, expected)):
        _assert_real_close(g, e, torch.cat([mask, torch.ones(mask.shape[0], step, dtype=mask.dtype)], 1))
    # the plan is not a no-op on this model: some step's logits differ from the unskipped loop's
    base = ref_generate(model, mask, "normal", 2, input_ids=ids)
    assert any(not torch.allclose(b, e, atol=1e-3) for b, e in zip(base, expected))


@pytest.mark.parametrize("family, case, scope", list(_cases()))
def test_cache_equals_recomputation_and_batch_equals_one_by_one(family, case, scope):
    model = tiny(family)
    rows, ids, mask = prompts()
    engine = SkipEngine(model, _plan(case, scope))
    cached = engine.generate(mask, input_ids=ids, max_new_tokens=4, pad_token_id=PAD)
    recomputed = engine.generate(mask, input_ids=ids, max_new_tokens=4, pad_token_id=PAD, use_cache=False)
    assert cached.tolist() == recomputed.tolist()
    # logits: one recomputation of prompt + generated tokens against the cached steps
    steps = engine_steps(engine, mask, first_ids=ids, tokens_from=_as_logits(cached))
    full_mask = torch.cat([mask, torch.ones_like(cached)], 1)
    full, _ = engine.forward(full_mask, ids.shape[1], input_ids=torch.cat([ids, cached], 1))
    width = ids.shape[1]
    _assert_real_close(full[:, :width], steps[0], mask, atol=1e-5)
    for t in range(1, len(steps)):
        torch.testing.assert_close(full[:, width + t - 1], steps[t][:, -1], rtol=0, atol=1e-5)
    for i, row in enumerate(rows[:2]):  # the rows the batch pads
        one = torch.ones(1, len(row), dtype=torch.long)
        alone = engine.generate(one, input_ids=torch.tensor([row]), max_new_tokens=4, pad_token_id=PAD)
        assert alone[0].tolist() == cached[i].tolist(), i
        logits, _ = engine.forward(torch.ones(1, len(row) + 4, dtype=torch.long), len(row),
                                   input_ids=torch.cat([torch.tensor([row]), cached[i:i + 1]], 1))
        torch.testing.assert_close(logits[0], full[i, width - len(row):], rtol=0, atol=1e-5)


def _as_logits(tokens):
    """Per-step one-hot 'logits' that make engine_steps feed ``tokens`` (B, N)."""
    return [torch.nn.functional.one_hot(tokens[:, t:t + 1], VOCAB).float() for t in range(tokens.shape[1])]


def test_llava_language_model_follows_the_papers_llama_loop():
    from test_skipping_llava import prompts as llava_prompts
    from test_skipping_llava import tiny_llava

    from mmskip.skipping.adapters import llava_inputs_embeds

    model = tiny_llava().double()
    ids, mask, pixels = llava_prompts()
    embeds = llava_inputs_embeds(model, ids, pixels)
    n = len(Parts(model).layers)
    # the tiny LLaVA has 2 key/value heads for 4 query heads: the code's skip_attn cannot run on it
    with pytest.raises(ValueError, match="num_key_value_heads"):
        SkipEngine(model, official_plan("skip_attn", n, 2, 0, None, "context"))
    for mode, scope in (("parallel_blocks", "all"), ("skip_block", "context"), ("parallel_attn_ffn", "generated")):
        case = (mode, 2, 0, None, 0)
        expected = _reference(model, case, scope, mask, inputs_embeds=embeds)
        engine = SkipEngine(model, _plan(case, scope, n))
        width = mask.shape[1]
        logits, cache = engine.forward(mask, width, inputs_embeds=embeds)
        got, m = [logits], mask
        for step_logits in expected[:-1]:
            token = step_logits[:, -1].argmax(-1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
            logits, cache = engine.forward(m, width, inputs_embeds=engine.adapter.embed(token[:, None]), cache=cache)
            got.append(logits)
        for step, (g, e) in enumerate(zip(got, expected)):
            _assert_real_close(g, e, torch.cat([mask, torch.ones(mask.shape[0], step, dtype=mask.dtype)], 1))
        cached = engine.generate(mask, inputs_embeds=embeds, max_new_tokens=5, pad_token_id=PAD)
        assert cached.tolist() == engine.generate(mask, inputs_embeds=embeds, max_new_tokens=5, pad_token_id=PAD,
                                                  use_cache=False).tolist()


def test_llama_official_skip_attn_needs_key_value_heads_that_tile_the_hidden_size():
    model = tiny("llama", kv_heads=2)
    with pytest.raises(ValueError, match=r"num_key_value_heads \* head_dim == hidden_size \(2 \* 8 != 32\)"):
        SkipEngine(model, official_plan("skip_attn", NUM_LAYERS, 2, 0, None, "generated"))
    # the other official modes run on grouped-query attention
    _, ids, mask = prompts()
    for mode in ("skip_block", "parallel_blocks", "parallel_attn_ffn"):
        case = (mode, 2, 0, None, 0)
        expected = _reference(model, case, "context", mask, input_ids=ids)
        got = engine_steps(SkipEngine(model, _plan(case, "context")), mask, first_ids=ids, tokens_from=expected)
        for step, (g, e) in enumerate(zip(got, expected)):
            _assert_real_close(g, e, torch.cat([mask, torch.ones(mask.shape[0], step, dtype=mask.dtype)], 1))


@pytest.mark.parametrize("family", FAMILIES)
def test_official_formulas_differ_from_textbook_where_the_code_does(family):
    model = tiny(family)
    _, ids, mask = prompts()
    for mode in ("skip_attn", "parallel_attn_ffn", "parallel_blocks"):
        official = official_plan(mode, NUM_LAYERS, 2, 0, None, "all")
        textbook = SkipPlan(mode, official.layers, "all")
        a, _ = SkipEngine(model, official).forward(mask, ids.shape[1], input_ids=ids)
        b, _ = SkipEngine(model, textbook).forward(mask, ids.shape[1], input_ids=ids)
        assert not torch.allclose(a, b, atol=1e-3), mode
    # skip_ffn and skip_block compute the textbook formulas (the official layers: never 0 nor the last)
    for mode in ("skip_ffn", "skip_block"):
        official = official_plan(mode, NUM_LAYERS, 2, 0, None, "all")
        a, _ = SkipEngine(model, official).forward(mask, ids.shape[1], input_ids=ids)
        b, _ = SkipEngine(model, SkipPlan(mode, official.layers, "all")).forward(mask, ids.shape[1], input_ids=ids)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # context skip_block: the previous layer's keys, the textbook's context_kv="previous_layer"
    official = official_plan("skip_block", NUM_LAYERS, 2, 0, None, "context")
    textbook = SkipPlan("skip_block", official.layers, "context", context_kv="previous_layer")
    assert SkipEngine(model, official).generate(mask, input_ids=ids, max_new_tokens=5).tolist() == \
        SkipEngine(model, textbook).generate(mask, input_ids=ids, max_new_tokens=5).tolist()


# ---------------------------------------------------------------------------- plans

def test_official_layer_selection():
    # never layer 0 (no previous output), never the last layer (default end L - 1), i % interval == 0
    assert official_layers(32, 2, 0) == tuple(range(2, 31, 2))
    assert official_layers(32, 2, -1) == official_layers(32, 2, 0)
    assert official_layers(32, 4, 8, 20) == (12, 16)
    assert official_layers(6, 1, 0) == (1, 2, 3, 4)
    assert official_layers(6, 1, 0, 6) == (1, 2, 3, 4, 5)  # an explicit end L reaches the last layer
    assert official_layers(6, 5, 0) == ()
    for mode in ("skip_block", "skip_attn", "skip_ffn", "parallel_attn_ffn"):
        plan = official_plan(mode, 6, 2, 0, None, "context")
        assert (plan.mode, plan.layers, plan.scope, plan.semantics) == (mode, (2, 4), "context", "official")
        assert official_plan(mode, 6, 2, 0, 0, "context") == plan  # end 0: the default
    # parallel blocks: pairs from range(0, L, m); layer 1 skipped whole; a pair at the end bound reruns
    pb = official_plan("parallel_blocks", 6, 2, 0, None, "generated")
    assert (pb.layers, pb.reused, pb.rerun, pb.combine) == ((2, 4), (1,), (5,), "mean")
    pb = official_plan("parallel_blocks", 32, 2, 0, None, "generated")
    assert (pb.layers, pb.reused, pb.rerun) == (tuple(range(2, 31, 2)), (1,), (31,))
    pb = official_plan("parallel_blocks", 6, 2, 2, None, "all")  # layer 2 not treated: 3 is skipped whole
    assert (pb.layers, pb.reused, pb.rerun) == ((4,), (3,), (5,))
    pb = official_plan("parallel_blocks", 6, 3, 0, 6, "all")
    assert (pb.layers, pb.reused, pb.rerun) == ((3,), (1,), ())
    pb = official_plan("parallel_blocks", 6, 1, 0, None, "all")  # every layer follows a grid layer
    assert (pb.layers, pb.reused, pb.rerun) == ((), (1, 2, 3, 4), ()) and not pb.empty
    with pytest.raises(ValueError, match=r"pair \(5, 6\) needs layer 6, past the 6-layer model"):
        official_plan("parallel_blocks", 6, 5, 0, 6, "all")
    # drop: the layers just below the end bound, for every token; the last layer runs
    drop = official_plan("drop_last", 6, 1, -1, None, "generated", 2)
    assert (drop.layers, drop.num_dropped, drop.scope) == ((3, 4), 2, "all")
    assert official_plan("drop_last", 32, 1, -1, None, "all", 3).layers == (28, 29, 30)
    assert official_plan("drop_last", 6, 1, -1, None, "all", 0).empty
    with pytest.raises(ValueError, match=r"num_dropped=5: allowed 0..4 below the official end bound 5"):
        official_plan("drop_last", 6, 1, -1, None, "all", 5)
    with pytest.raises(ValueError, match=r"end_layer=7: allowed 1..6"):
        official_layers(6, 2, 0, 7)


@pytest.mark.parametrize("kwargs, message", [
    ({"semantics": "paper"}, "semantics='paper': allowed ('textbook', 'official')"),
    ({"mode": "skip_block", "layers": (0, 2), "semantics": "official"}, "layer 0 is never skipped"),
    ({"mode": "parallel_blocks", "layers": (2,), "semantics": "official", "combine": "sum"},
     "combine='sum': the official code averages"),
    ({"mode": "skip_block", "layers": (2,), "semantics": "official", "context_kv": "previous_layer"},
     "context_kv='previous_layer': semantics='official' fixes"),
    ({"mode": "parallel_blocks", "layers": (2,), "reused": (1,)}, "official parallel_blocks only"),
    ({"mode": "parallel_blocks", "layers": (2,), "semantics": "official", "reused": (3,)}, "layers [3] are in a pair"),
    ({"mode": "parallel_blocks", "layers": (2,), "semantics": "official", "rerun": (4,)},
     "layers [4] are not the second block"),
    ({"mode": "drop_last", "layers": (3,), "num_dropped": 2, "semantics": "official"}, "num_dropped consecutive"),
])
def test_bad_official_plans_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        SkipPlan(**kwargs)


def test_textbook_plans_are_unchanged():
    assert SEMANTICS == ("textbook", "official")
    plan = SkipPlan("skip_block", (1, 3), "context", context_kv="previous_layer")
    assert plan.semantics == "textbook" and plan.reused == plan.rerun == ()
    assert plan == SkipPlan("skip_block", (1, 3), "context", context_kv="previous_layer", semantics="textbook")
    # the hash and repr of a textbook plan are those of the plan before semantics existed
    old = ("skip_block", (1, 3), "context", "mean", "previous_layer", 0)
    assert hash(plan) == hash(old)
    assert repr(plan) == ("SkipPlan(mode='skip_block', layers=(1, 3), scope='context', combine='mean', "
                          "context_kv='previous_layer', num_dropped=0)")
    official = dataclasses.replace(plan, context_kv="compute", semantics="official")
    assert official != dataclasses.replace(plan, context_kv="compute") and "semantics='official'" in repr(official)
    assert len({plan, official, dataclasses.replace(official)}) == 2


# ---------------------------------------------------------------------------- compute accounting

def _per_layer(engine):
    """Per-token FLOPs of one layer's parts (the tiny models' layers are alike)."""
    return engine._qkv_flops, engine._out_flops, engine._attn_flops_per_key, engine._ffn_flops[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_official_skip_attn_executes_fewer_projections_than_textbook(family):
    model = tiny(family)
    _, ids, mask = prompts()
    official = SkipEngine(model, official_plan("skip_attn", NUM_LAYERS, 2, 0, None, "context"))
    official.generate(mask, input_ids=ids, max_new_tokens=3)
    textbook = SkipEngine(model, SkipPlan("skip_attn", (2, 4), "context"))  # context_kv="compute"
    textbook.generate(mask, input_ids=ids, max_new_tokens=3)
    o, t = official.stats.executed, textbook.stats.executed
    assert o["prefill", "projections"] < t["prefill", "projections"]
    assert o["prefill", "ffn"] == t["prefill", "ffn"] and o["prefill", "attention"] == t["prefill", "attention"]
    # hand count, prefill: B x T tokens; layers 2 and 4 run the feed-forward only
    qkv, out, per_key, ffn = _per_layer(official)
    B, T = ids.shape
    assert o["prefill", "projections"] == B * T * (qkv + out) * 4
    assert o["prefill", "attention"] == B * T * T * per_key * 4
    assert o["prefill", "ffn"] == B * T * ffn * 6
    assert official.stats.depth["prefill"] == B * T * (2 * 4 + 1 * 2)
    assert official.stats.full_depth["prefill"] == B * T * 2 * 6
    # generated scope: decode steps skip the same, keys attended grow by one per step
    gen = SkipEngine(model, official_plan("skip_attn", NUM_LAYERS, 2, 0, None, "generated"))
    gen.generate(mask, input_ids=ids, max_new_tokens=3)
    keys = sum(T + s for s in (1, 2))
    assert gen.stats.executed["decode", "projections"] == 2 * B * (qkv + out) * 4
    assert gen.stats.executed["decode", "attention"] == B * keys * per_key * 4
    assert gen.stats.executed["decode", "ffn"] == 2 * B * ffn * 6
    assert gen.stats.full["decode", "projections"] == 2 * B * (qkv + out) * 6
    assert gen.stats.fraction("prefill") == 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_official_parallel_blocks_flops_match_a_hand_count(family):
    model = tiny(family)
    _, ids, mask = prompts()
    B, T = ids.shape
    engine = SkipEngine(model, official_plan("parallel_blocks", NUM_LAYERS, 2, 0, None, "generated"))
    engine.generate(mask, input_ids=ids, max_new_tokens=3)
    qkv, out, per_key, ffn = _per_layer(engine)
    stats = engine.stats
    # decode: layer 0; layer 1 skipped whole; pairs (2, 3) and (4, 5) run 4 blocks; layer 5 again
    blocks = 1 + 4 + 1
    keys = sum(T + s for s in (1, 2))
    assert stats.executed["decode", "projections"] == 2 * B * (qkv + out) * blocks
    assert stats.executed["decode", "attention"] == B * keys * per_key * blocks
    assert stats.executed["decode", "ffn"] == 2 * B * ffn * blocks
    assert stats.full["decode", "ffn"] == 2 * B * ffn * NUM_LAYERS
    # sequential sub-layers: 2 (layer 0) + 0 + 2 (pair) + 0 + 2 (pair) + 2 (rerun) of 12
    assert stats.depth_fraction("decode") == pytest.approx(8 / 12)
    assert stats.fraction("prefill") == 1.0 and stats.depth_fraction("prefill") == 1.0
    # drop: layers 3 and 4 dropped for every token, the last layer runs
    drop = SkipEngine(model, official_plan("drop_last", NUM_LAYERS, 1, -1, None, "all", 2))
    drop.generate(mask, input_ids=ids, max_new_tokens=3)
    for phase in ("prefill", "decode"):
        assert drop.stats.executed[phase, "ffn"] == pytest.approx(drop.stats.full[phase, "ffn"] * 4 / 6)
        assert drop.stats.depth_fraction(phase) == pytest.approx(4 / 6)

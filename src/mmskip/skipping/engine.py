"""Run a frozen decoder under a static :class:`SkipPlan`, with its own KV cache.

The engine calls each block's parts (norms, projections, feed-forward) through a family
adapter and composes them itself, so the library's classes are never patched and the model
is unchanged outside the engine.

Scope is decided by position: with left padding every prompt ends at the same index
(``prompt_width``); a token at index >= ``prompt_width`` is generated, any other is context.
A step whose tokens are all in scope, or all out of it (prefill and decode with a KV cache),
skips the computation for real; a step that mixes both (a full recomputation without cache)
computes both paths and selects per token, which gives the same numbers.

Keys and values at a layer whose attention a token skipped:

- scope ``generated`` or ``all``: no token that runs attention at that layer ever attends to
  them (later tokens are in scope too), so they are left as zeros and never read;
- scope ``context``: generated tokens do attend to the context at that layer. With
  ``context_kv="compute"`` (default) the skipped positions' keys and values are projected
  from the layer's input, as if attention ran for them; with ``"previous_layer"`` (the
  paper's code) the previous layer's keys and values at those positions are reused (layer 0
  has no previous layer and computes them).

``semantics="official"`` plans (:func:`mmskip.skipping.plan.official_plan`) run the paper
code's own formulas (see :mod:`mmskip.skipping.plan`) and its key/value cache: a layer that
reuses the previous layer's output also takes its cache slot, the official skip_attn caches
the normed input, and parallel blocks attend to and store into their first layer's slot. The
cached flow (the prefill one step, each generated token one step) defines them; a step that
covers several of those steps (a recomputation without cache) reproduces it per position: a
query reads, at a position of its own step, the keys its own computation makes there, and at
an earlier step's position what that step stored in the layer's slot (one attention over
[fresh keys; stored keys] with a per query-and-position mask, see :meth:`_forward_official`).

Every step adds what it executed to :attr:`SkipEngine.stats` (see
:mod:`mmskip.skipping.accounting`); ``generate`` computes logits at the last position only,
as ``model.generate`` does, and times prefill and decode steps apart.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

from mmskip.skipping.accounting import RunStats
from mmskip.skipping.adapters import adapter_for
from mmskip.skipping.plan import SkipPlan


class SkipEngine:
    """A causal LM (OPT, LLaMA, LLaVA's language model) run under one plan; ``plan=None`` skips nothing."""

    def __init__(self, model: nn.Module, plan: SkipPlan | None = None):
        self.model = model
        self.adapter = adapter_for(model)
        self.plan = plan or SkipPlan()
        self.num_layers = len(self.adapter.layers())
        self.plan.check(self.num_layers)
        self.stats = RunStats()  # accumulates over calls; assign a new RunStats to restart
        a = self.adapter
        hidden = model.get_input_embeddings().weight.shape[1]
        # FLOPs per token of each part (2 per multiply-accumulate), from the weights' shapes
        self._qkv_flops = 2 * hidden * a.head_dim * (a.num_heads + 2 * a.num_kv_heads)
        self._out_flops = 2 * a.num_heads * a.head_dim * hidden
        self._attn_flops_per_key = 2 * 2 * a.num_heads * a.head_dim  # q k^T and a v, per key attended
        self._ffn_flops = [2 * sum(m.weight.numel() for name, m in layer.named_modules()
                                   if isinstance(m, nn.Linear) and not name.startswith("self_attn"))
                           for layer in a.layers()]
        self._head_flops = 2 * model.get_output_embeddings().weight.numel()
        if self.plan.semantics == "official":
            if self.plan.mode == "skip_attn" and not self.plan.empty and a.raw_kv_error(hidden):
                raise ValueError(a.raw_kv_error(hidden))
            self._official = self._official_actions()

    def _official_actions(self) -> list[tuple[str, str]]:
        """Per layer, what an official plan does for (in-scope, out-of-scope) tokens: 'normal',
        'reuse' (the previous layer's output and cache), 'skip_attn', 'skip_ffn', 'parallel'
        (attention and feed-forward) or 'pair' (this block and the next, averaged)."""
        p, n = self.plan, self.num_layers
        acts = [["normal", "normal"] for _ in range(n)]
        if p.empty:
            return [tuple(a) for a in acts]
        if p.mode == "drop_last":
            for i in p.layers:
                acts[i] = ["reuse", "reuse"]  # the code drops for every step, whatever its length
        elif p.mode == "parallel_blocks":
            for i in p.layers:
                acts[i][0] = "pair"
                if i + 1 not in p.rerun:
                    acts[i + 1][0] = "reuse"
            for i in p.reused:
                acts[i][0] = "reuse"
        else:
            name = {"skip_block": "reuse", "skip_attn": "skip_attn", "skip_ffn": "skip_ffn",
                    "parallel_attn_ffn": "parallel"}[p.mode]
            for i in p.layers:
                acts[i][0] = name
        return [tuple(a) for a in acts]

    # ------------------------------------------------------------------ one forward step

    def _layer_mode(self, i: int) -> str | None:
        """What layer ``i`` does for in-scope tokens: a mode, 'pair_second', 'dropped' or None."""
        p = self.plan
        if p.empty:
            return None
        if p.mode == "drop_last":
            return "dropped" if i >= self.num_layers - p.num_dropped else None
        if i in p.layers:
            return p.mode
        if p.mode == "parallel_blocks" and i - 1 in p.layers:
            return "pair_second"
        return None

    def _attention(self, q, k, v, attn_mask):
        rep = self.adapter.num_heads // self.adapter.num_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        causal = isinstance(attn_mask, str)  # "causal": an unpadded prefill
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else attn_mask,
                                                             is_causal=causal, scale=self.adapter.scale)
        return o.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    def _block(self, layer, h, run_attn, run_ffn, parallel, kv_fill, past_kv, prev_new_kv, rope, attn_mask):
        """One block for all T tokens of the step.

        ``run_attn``/``run_ffn``/``parallel`` are (T,) bools; ``kv_fill`` says how to fill the
        keys and values of tokens that do not run attention ('zeros', 'compute',
        'previous_layer'). Returns the new hidden states, this step's (k, v) at this layer, and
        the layer's cache (past and new keys and values).
        """
        a = self.adapter
        B, T, _ = h.shape
        attn_all = bool(run_attn.all())
        need_attn = attn_all or bool(run_attn.any())
        if need_attn or kv_fill == "compute":
            q, k, v = a.qkv(layer, a.attn_norm(layer, h), rope)
        else:
            shape = (B, a.num_kv_heads, T, a.head_dim)
            q, k, v = None, h.new_zeros(shape), h.new_zeros(shape)
        if not attn_all:
            skipped = ~run_attn[None, None, :, None]
            if kv_fill == "zeros":
                k, v = k.masked_fill(skipped, 0.0), v.masked_fill(skipped, 0.0)
            elif kv_fill == "previous_layer":
                k, v = torch.where(skipped, prev_new_kv[0], k), torch.where(skipped, prev_new_kv[1], v)
        k_all = k if past_kv is None else torch.cat([past_kv[0], k], dim=2)
        v_all = v if past_kv is None else torch.cat([past_kv[1], v], dim=2)
        out = h
        if need_attn:
            attn = a.attn_out(layer, self._attention(q, k_all, v_all, attn_mask))
            out = h + attn if attn_all else h + attn * run_attn[None, :, None]
        ffn_all = bool(run_ffn.all())
        ffn_any = ffn_all or bool(run_ffn.any())
        if ffn_any:
            ffn_in = h if bool(parallel.all()) else out if not bool(parallel.any()) else torch.where(
                parallel[None, :, None], h, out)
            ffn = a.ffn(layer, a.ffn_norm(layer, ffn_in))
            out = out + ffn if ffn_all else out + ffn * run_ffn[None, :, None]
        ran = (need_attn or kv_fill == "compute", need_attn, ffn_any)
        return out, (k, v), (k_all, v_all), ran

    def _count(self, phase: str, layer_index: int, tokens: int, keys: int, ran=(False, False, False),
               full: bool = True) -> None:
        """Add one layer's executed (per ``ran``: qkv, attention, ffn) and unskipped FLOPs
        (``full=False``: executed only, for a block run a second time in one step)."""
        qkv, attn, ffn = ran
        add = self.stats.add
        add(phase, "projections", tokens * (self._qkv_flops * qkv + self._out_flops * attn),
            full * tokens * (self._qkv_flops + self._out_flops))
        add(phase, "attention", tokens * keys * self._attn_flops_per_key * attn,
            full * tokens * keys * self._attn_flops_per_key)
        add(phase, "ffn", tokens * self._ffn_flops[layer_index] * ffn, full * tokens * self._ffn_flops[layer_index])

    def _step(self, mask, prompt_width, input_ids, inputs_embeds, cache):
        """What every step starts from: the embedded inputs with positions (and the rotary
        tables), the cache length, the phase, the new positions' indices, which of them are
        generated and in the plan's scope, the attention mask (None or "causal" where Hugging
        Face's SDPA path needs none) and the (B, T, S) allowed keys."""
        a = self.adapter
        h = a.embed(input_ids, inputs_embeds)
        T = h.shape[1]
        past = 0 if cache is None else _cache_len(cache)
        phase = "prefill" if past == 0 else "decode"
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, past:]
        h, rope = a.add_positions(h, positions, mask, past)
        dev = h.device  # every tensor made here follows the model's device
        index = torch.arange(past, past + T, device=dev)
        generated = index >= prompt_width
        scope = self.plan.scope
        in_scope = (generated if scope == "generated" else ~generated if scope == "context"
                    else torch.ones(T, dtype=torch.bool, device=dev))
        keys = torch.arange(past + T, device=dev)
        allowed = (keys[None, :] <= index[:, None])[None] & mask.bool()[:, None, :]  # (B, T, S)
        if bool(mask.all()) and (T == 1 or past == 0):
            attn_mask = None if T == 1 else "causal"  # as Hugging Face's SDPA path does without padding
        else:
            attn_mask = h.new_zeros(allowed.shape).masked_fill(~allowed, torch.finfo(h.dtype).min)[:, None]
        return h, rope, past, phase, index, generated, in_scope, attn_mask, allowed

    def _finish(self, phase: str, h: torch.Tensor, tokens: int, last_only: bool) -> torch.Tensor:
        """The step's logits (the last position only with ``last_only``), its LM head FLOPs, tokens and step counted."""
        if last_only:
            h = h[:, -1:]
        head = h.shape[0] * h.shape[1] * self._head_flops
        self.stats.add(phase, "lm_head", head, head)
        self.stats.tokens[phase] += tokens
        self.stats.steps[phase] += 1
        return self.adapter.head(h)

    def forward(self, mask: torch.Tensor, prompt_width: int, input_ids=None, inputs_embeds=None, cache=None,
                last_only: bool = False):
        """Logits (B, T, V) of the step's T tokens (B, 1, V with ``last_only``) and the updated cache.

        ``mask`` (B, past + T) covers the cached and the new tokens; ``cache`` is None or the
        list returned by the previous step. A step with an empty cache counts as prefill in
        :attr:`stats`, any other as decode.
        """
        if self.plan.semantics == "official":
            return self._forward_official(mask, prompt_width, input_ids, inputs_embeds, cache, last_only)
        a = self.adapter
        h, rope, past, phase, index, generated, in_scope, attn_mask, allowed = self._step(
            mask, prompt_width, input_ids, inputs_embeds, cache)
        B, T = h.shape[:2]
        dev = h.device  # every tensor made here follows the model's device
        scope = self.plan.scope
        n_in = int(in_scope.sum()) * B
        new_cache, prev_new_kv = [], None
        none = torch.zeros(T, dtype=torch.bool, device=dev)
        everyone = torch.ones(T, dtype=torch.bool, device=dev)
        layers = a.layers()
        stats, S = self.stats, past + T
        i = 0
        while i < self.num_layers:
            mode = self._layer_mode(i)
            past_kv = None if cache is None else cache[i]
            stats.full_depth[phase] += 2 * B * T
            if mode == "dropped":
                self._count(phase, i, B * T, S)
                new_cache.append(None)
                i += 1
                continue
            run_attn, run_ffn, parallel = everyone, everyone, none
            if mode in ("skip_block", "skip_attn"):
                run_attn = ~in_scope
            if mode in ("skip_block", "skip_ffn"):
                run_ffn = ~in_scope
            if mode == "parallel_attn_ffn":
                parallel = in_scope
            kv_fill = "zeros" if scope != "context" else self.plan.context_kv
            if kv_fill == "previous_layer" and prev_new_kv is None:
                kv_fill = "compute"
            if mode == "parallel_blocks" and n_in:
                h_first, kv_first, cache_first, ran = self._block(layers[i], h, everyone, everyone, none, kv_fill,
                                                                  past_kv, prev_new_kv, rope, attn_mask)
                self._count(phase, i, B * T, S, ran)
                second_in = torch.where(in_scope[None, :, None], h, h_first)
                past_second = None if cache is None else cache[i + 1]
                h_second, kv_second, cache_second, ran = self._block(layers[i + 1], second_in, everyone, everyone,
                                                                     none, kv_fill, past_second, kv_first, rope,
                                                                     attn_mask)
                self._count(phase, i + 1, B * T, S, ran)
                stats.full_depth[phase] += 2 * B * T
                stats.depth[phase] += 2 * n_in + 4 * (B * T - n_in)
                both = (h_first - h) + (h_second - h)
                if self.plan.combine == "mean":
                    both = both / 2
                h = torch.where(in_scope[None, :, None], h + both, h_second)
                new_cache += [cache_first, cache_second]
                prev_new_kv = kv_second
                i += 2
                continue
            h, kv, layer_cache, ran = self._block(layers[i], h, run_attn, run_ffn, parallel, kv_fill, past_kv,
                                                  prev_new_kv, rope, attn_mask)
            self._count(phase, i, B * T, S, ran)
            depth_in = {"skip_block": 0, "skip_attn": 1, "skip_ffn": 1, "parallel_attn_ffn": 1}.get(mode, 2)
            stats.depth[phase] += depth_in * n_in + 2 * (B * T - n_in)
            new_cache.append(layer_cache)
            prev_new_kv = kv
            i += 1
        return self._finish(phase, h, B * T, last_only), new_cache

    # ------------------------------------------------------------------ official semantics

    def _forward_official(self, mask, prompt_width, input_ids, inputs_embeds, cache, last_only):
        """:meth:`forward` under an official plan.

        Each position belongs to a step of the cached flow (the prompt: step 0; the k-th
        generated token: step k) and gets its layer's action for in-scope or out-of-scope
        tokens (:meth:`_official_actions`). Per layer, ``stored`` is what the layer's cache slot
        holds at every position (past positions: the cache; new ones: what their action
        stores). A computation that runs attention gives each query, at a new position of its
        own step, the keys and values it computes itself there, and elsewhere ``stored``. When
        every new position is in one step (prefill, decode) that is past cache + fresh keys, as
        the code does; otherwise one attention runs over [fresh; stored] with a mask that
        chooses per query and position.
        """
        a = self.adapter
        h, rope, past, phase, index, generated, in_scope, std_mask, allowed = self._step(
            mask, prompt_width, input_ids, inputs_embeds, cache)
        B, T = h.shape[:2]
        dev = h.device
        S = past + T
        step_of = torch.where(generated, index - prompt_width + 1, torch.zeros_like(index))
        one_step = bool((step_of == step_of[0]).all())
        select_mask = None
        if not one_step:
            same = step_of[:, None] == step_of[None, :]  # (T, T): new positions of one step
            same_all = torch.cat([torch.zeros(T, past, dtype=torch.bool, device=dev), same], dim=1)
            ok = torch.cat([allowed[:, :, past:] & same[None], allowed & ~same_all[None]], dim=-1)
            select_mask = h.new_zeros(ok.shape).masked_fill(~ok, torch.finfo(h.dtype).min)[:, None]

        def attend(q, k, v, stored, fresh_only):
            """Attention of the step's queries: fresh (k, v) at their own step, ``stored`` elsewhere."""
            if one_step or fresh_only:
                k_all = k if stored is None or past == 0 else torch.cat([stored[0][:, :, :past], k], dim=2)
                v_all = v if stored is None or past == 0 else torch.cat([stored[1][:, :, :past], v], dim=2)
                return self._attention(q, k_all, v_all, std_mask)
            return self._attention(q, torch.cat([k, stored[0]], dim=2), torch.cat([v, stored[1]], dim=2), select_mask)

        def pick(parts, like):
            """Per position (dim -2 of ``like``'s layout), the tensor of the part whose mask holds it."""
            parts = [(m, t) for m, t in parts if bool(m.any())]
            if len(parts) == 1:
                return parts[0][1]
            out = torch.zeros_like(like)
            for m, t in parts:
                out = torch.where(m.view(*([1] * (like.dim() - 2)), T, 1), t, out)
            return out

        layers = a.layers()
        stats = self.stats
        depth = {"normal": 2, "pair": 2, "skip_attn": 1, "skip_ffn": 1, "parallel": 1, "reuse": 0}  # per token
        nobody = torch.zeros_like(in_scope)
        new_cache, prev_stored = [], None
        for i in range(self.num_layers):
            layer = layers[i]
            act_in, act_out = self._official[i]
            act = {}  # action -> (T,) bool: which new positions take it
            for name, where in ((act_in, in_scope), (act_out, ~in_scope)):
                act[name] = act.get(name, nobody) | where
            act = {name: m for name, m in act.items() if bool(m.any())}
            past_kv = None if cache is None else cache[i]
            stats.full_depth[phase] += 2 * B * T
            stats.depth[phase] += B * sum(depth[name] * int(m.sum()) for name, m in act.items())
            if list(act) == ["reuse"]:  # the previous layer's output and whole cache slot
                if prev_stored is None:
                    raise ValueError(f"layer {i} reuses the previous layer's output, but it has none")
                self._count(phase, i, B * T, S)
                new_cache.append(prev_stored)
                continue
            attn_runs = {"normal", "skip_ffn", "parallel", "pair"} & set(act)
            x = a.attn_norm(layer, h)
            parts_k, parts_v = [], []
            if attn_runs:
                q, k, v = a.qkv(layer, x, rope)
                own = functools.reduce(torch.logical_or, [act[n] for n in ("normal", "skip_ffn", "parallel")
                                                         if n in act], nobody)
                parts_k.append((own, k))
                parts_v.append((own, v))
            if "skip_attn" in act:
                k_raw, v_raw = a.raw_kv(x, rope)
                parts_k.append((act["skip_attn"], k_raw))
                parts_v.append((act["skip_attn"], v_raw))
            if "pair" in act:
                second = layers[i + 1]
                q2, k2, v2 = a.qkv(second, a.attn_norm(second, h), rope)
                parts_k.append((act["pair"], (k + k2) / 2))
                parts_v.append((act["pair"], (v + v2) / 2))
            if "reuse" in act:
                parts_k.append((act["reuse"], prev_stored[0][:, :, past:]))
                parts_v.append((act["reuse"], prev_stored[1][:, :, past:]))
            like = parts_k[0][1]
            new_k, new_v = pick(parts_k, like), pick(parts_v, like)
            stored = (new_k, new_v) if past_kv is None else (torch.cat([past_kv[0], new_k], dim=2),
                                                               torch.cat([past_kv[1], new_v], dim=2))
            fresh_only = "pair" not in act and "skip_attn" not in act and "reuse" not in act
            out_parts = []
            ran = [False, False, False]
            if attn_runs:
                attn = a.attn_out(layer, attend(q, k, v, stored, fresh_only))
                mid = h + attn
                ran[0] = ran[1] = True
            ffn_parts = []  # (mask, feed-forward input) of the actions that run this layer's FFN
            if {"normal", "pair"} & set(act):
                ffn_parts.append((act.get("normal", nobody) | act.get("pair", nobody), a.ffn_norm(layer, mid)))
            if {"skip_attn", "parallel"} & set(act):
                ffn_parts.append((act.get("skip_attn", nobody) | act.get("parallel", nobody),
                                  a.official_ffn_input(layer, x)))
            if ffn_parts:  # one feed-forward call, on each position's input
                f = a.ffn(layer, pick(ffn_parts, h) if len(ffn_parts) > 1 else ffn_parts[0][1])
                ran[2] = True
            if "normal" in act:
                out_parts.append((act["normal"], mid + f))
            if "skip_ffn" in act:
                out_parts.append((act["skip_ffn"], mid))
            if "parallel" in act:
                out_parts.append((act["parallel"], h + attn + f))
            if "skip_attn" in act:
                out_parts.append((act["skip_attn"], a.official_skip_attn_base(h, x) + f))
            if "reuse" in act:
                out_parts.append((act["reuse"], h))
            self._count(phase, i, B * T, S, tuple(ran))
            if "pair" in act:
                attn2 = a.attn_out(second, attend(q2, k2, v2, stored, False))
                mid2 = h + attn2
                out2 = mid2 + a.ffn(second, a.ffn_norm(second, mid2))
                out_parts.append((act["pair"], ((mid + f) + out2) / 2))  # the code's sum of outputs / 2
                self._count(phase, i + 1, B * T, S, (True, True, True), full=False)
            h = pick(out_parts, h)
            new_cache.append(stored)
            prev_stored = stored
        return self._finish(phase, h, B * T, last_only), new_cache

    # ------------------------------------------------------------------ greedy generation

    @torch.no_grad()
    def generate(self, attention_mask: torch.Tensor, input_ids=None, inputs_embeds=None, max_new_tokens: int = 20,
                 eos_token_id: int | None = None, pad_token_id: int = 0, use_cache: bool = True) -> torch.Tensor:
        """Greedy decoding of a left-padded batch; returns the new tokens (B, <= max_new_tokens).

        Finished rows are filled with ``pad_token_id`` and decoding stops when every row has
        produced ``eos_token_id``, as ``model.generate`` does.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if attention_mask.ndim != 2 or bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("attention_mask must be (B, T) with left padding (last column all ones)")
        prompt = self.adapter.embed(input_ids, inputs_embeds)
        width = prompt.shape[1]
        mask = attention_mask
        out = torch.empty((prompt.shape[0], 0), dtype=torch.long, device=prompt.device)
        unfinished = torch.ones(prompt.shape[0], dtype=torch.bool, device=prompt.device)
        cache, step_embeds = None, prompt
        for step in range(max_new_tokens):
            started = time.perf_counter()
            if use_cache:
                logits, cache = self.forward(mask, width, inputs_embeds=step_embeds, cache=cache, last_only=True)
            else:
                full = torch.cat([prompt, self.adapter.embed(out)], dim=1) if out.shape[1] else prompt
                logits, _ = self.forward(mask, width, inputs_embeds=full, last_only=True)
            token = logits[:, -1].argmax(-1)
            token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
            out = torch.cat([out, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_embeds = self.adapter.embed(token[:, None])
            self.stats.seconds["prefill" if step == 0 or not use_cache else "decode"] += time.perf_counter() - started
            if eos_token_id is not None:
                unfinished &= token != eos_token_id
                if not bool(unfinished.any()):
                    break
        return out


def _cache_len(cache) -> int:
    """Tokens held by a cache (dropped layers hold None)."""
    return next(c[0].shape[2] for c in cache if c is not None)

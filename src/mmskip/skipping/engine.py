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

Every step adds what it executed to :attr:`SkipEngine.stats` (see
:mod:`mmskip.skipping.accounting`); ``generate`` computes logits at the last position only,
as ``model.generate`` does, and times prefill and decode steps apart.
"""

from __future__ import annotations

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

    def _count(self, phase: str, layer_index: int, tokens: int, keys: int, ran=(False, False, False)) -> None:
        """Add one layer's executed (per ``ran``: qkv, attention, ffn) and unskipped FLOPs."""
        qkv, attn, ffn = ran
        add = self.stats.add
        add(phase, "projections", tokens * (self._qkv_flops * qkv + self._out_flops * attn),
            tokens * (self._qkv_flops + self._out_flops))
        add(phase, "attention", tokens * keys * self._attn_flops_per_key * attn, tokens * keys * self._attn_flops_per_key)
        add(phase, "ffn", tokens * self._ffn_flops[layer_index] * ffn, tokens * self._ffn_flops[layer_index])

    def forward(self, mask: torch.Tensor, prompt_width: int, input_ids=None, inputs_embeds=None, cache=None,
                last_only: bool = False):
        """Logits (B, T, V) of the step's T tokens (B, 1, V with ``last_only``) and the updated cache.

        ``mask`` (B, past + T) covers the cached and the new tokens; ``cache`` is None or the
        list returned by the previous step. A step with an empty cache counts as prefill in
        :attr:`stats`, any other as decode.
        """
        a = self.adapter
        h = a.embed(input_ids, inputs_embeds)
        B, T = h.shape[:2]
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
        n_in = int(in_scope.sum()) * B
        if bool(mask.all()) and (T == 1 or past == 0):
            attn_mask = None if T == 1 else "causal"  # as Hugging Face's SDPA path does without padding
        else:
            keys = torch.arange(past + T, device=dev)
            allowed = (keys[None, :] <= index[:, None])[None] & mask.bool()[:, None, :]  # (B, T, S)
            attn_mask = h.new_zeros(allowed.shape).masked_fill(~allowed, torch.finfo(h.dtype).min)[:, None]
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
        if last_only:
            h = h[:, -1:]
        stats.add(phase, "lm_head", h.shape[0] * h.shape[1] * self._head_flops, h.shape[0] * h.shape[1] * self._head_flops)
        stats.tokens[phase] += B * T
        stats.steps[phase] += 1
        return a.head(h), new_cache

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

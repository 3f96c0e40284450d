"""Token-level skipping: tokens leave the computation after a layer, under the KV cache.

The block-level plans of :mod:`mmskip.skipping.plan` skip the same blocks for every token. The
families here, from the work the paper cites, skip per token (training-free):

- ``visual_exit``: after layer ``layer`` the soft visual tokens leave the sequence: later layers
  neither compute them nor attend to them (DyVTE's visual-token exit; the paper's code drops
  its query tokens after ``exit_layer`` in its ``exit`` + ``prompt`` mode);
- ``fastv``: after layer ``layer`` only the ``keep`` fraction (rounded up) of the visual tokens
  that receive the most attention from the last prompt token at that layer (the mean over
  heads; ties to the earlier position) stay; the others leave as above (FastV, Chen et al.
  2024);
- ``early_exit``: a generated token is read by the LM head (final norm and projection) after
  layer ``layer``; where the head's entropy (nats) is below ``threshold`` the token leaves the
  remaining blocks and its next token is that head's argmax. Later tokens do not attend to its
  keys above ``layer`` (they were never computed). The prompt runs every block, so the first
  generated token is the model's own. The check costs one LM head per token, counted.

Tokens leave physically: the step's hidden states, positions and mask are gathered to the
tokens that stay (every row keeps the same number: each row has the same number of visual
tokens), and a layer's cache holds the keys of the tokens that reached it, with a mask of the
valid ones. ``generate(use_cache=False)`` recomputes the whole sequence at each step under the
same rules (a generated position exits where its own entropy says so); the tests hold the two
to the same tokens, and the empty plans to ``model.generate``.

Counting follows :mod:`mmskip.skipping.accounting`: executed FLOPs from the shapes that ran,
next to the unskipped model's for the same step (every token, every key).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from mmskip.skipping.accounting import RunStats
from mmskip.skipping.adapters import adapter_for
from mmskip.skipping.engine import check_generate_inputs, decode_buffers, part_flops
from mmskip.skipping.plan import TOKEN_KINDS

KINDS = TOKEN_KINDS
VISUAL_KINDS = ("visual_exit", "fastv")


@dataclass(frozen=True)
class TokenPlan:
    """``kind=None`` runs the model unchanged. ``layer``: the block after which tokens leave
    (0-based; the criterion's layer for ``early_exit``); ``keep``: fastv's fraction of visual
    tokens kept; ``threshold``: early_exit's entropy bound in nats."""

    kind: str | None = None
    layer: int = 0
    keep: float = 1.0
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: allowed {KINDS} or None")
        if self.kind == "fastv" and not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep={self.keep}: fastv keeps a fraction in (0, 1] of the visual tokens")
        if self.kind == "early_exit" and not (self.threshold >= 0.0):  # also refuses NaN
            raise ValueError(f"threshold={self.threshold}: an entropy bound in nats, >= 0")

    def check(self, num_layers: int) -> None:
        """Raise if the plan does not fit a model with ``num_layers`` blocks."""
        if self.kind is not None and not 0 <= self.layer < num_layers:
            raise ValueError(f"layer={self.layer}: allowed 0..{num_layers - 1} for a {num_layers}-layer model")

    @property
    def name(self) -> str:
        if self.kind is None:
            return "none"
        extra = {"fastv": f"_keep{self.keep:g}", "early_exit": f"_t{self.threshold:g}"}.get(self.kind, "")
        return f"{self.kind}_l{self.layer}{extra}"


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the softmax over the last dimension, in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class TokenEngine:
    """A causal LM (OPT, LLaMA, LLaVA's language model) run under one :class:`TokenPlan`."""

    def __init__(self, model: nn.Module, plan: TokenPlan | None = None):
        self.model = model
        self.adapter = a = adapter_for(model)
        self.plan = plan or TokenPlan()
        self.num_layers = len(a.layers())
        self.plan.check(self.num_layers)
        self.stats = RunStats()
        qkv, out, self._attn_flops_per_key, self._ffn_flops, self._head_flops = part_flops(model, a)
        self._proj_flops = qkv + out
        self._score_flops_per_key = self._attn_flops_per_key // 2  # q k^T alone (fastv's scores)
        self.exits: list[int] = []  # per cached decode step of the last generate: rows that exited early
        self.entropies: list[torch.Tensor] = []  # per cached decode step: (B,) entropies at early_exit's layer

    # ------------------------------------------------------------------ counting

    def _count_layer(self, phase: str, i: int, tokens: int, keys: int, full_tokens: int, full_keys: int) -> None:
        add = self.stats.add
        add(phase, "projections", tokens * self._proj_flops, full_tokens * self._proj_flops)
        add(phase, "attention", tokens * keys * self._attn_flops_per_key,
            full_tokens * full_keys * self._attn_flops_per_key)
        add(phase, "ffn", tokens * self._ffn_flops[i], full_tokens * self._ffn_flops[i])
        self.stats.depth[phase] += 2 * tokens
        self.stats.full_depth[phase] += 2 * full_tokens

    def _count_head(self, phase: str, executed_positions: int, full_positions: int) -> None:
        self.stats.add(phase, "lm_head", executed_positions * self._head_flops, full_positions * self._head_flops)

    # ------------------------------------------------------------------ one block

    def _attend(self, q, k, v, allowed):
        """Attention of q (B, H, Tq, d) over k, v (B, kv_heads, S, d) where ``allowed`` (B, Tq, S) holds."""
        a = self.adapter
        rep = a.num_heads // a.num_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        bias = q.new_zeros(allowed.shape).masked_fill(~allowed, torch.finfo(q.dtype).min)[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=a.scale)
        return o.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    def _block(self, i: int, h, rope, past, allowed):
        """Block ``i`` for h (B, T, D): attention over ``past`` (k, v or None) and the step's own
        keys, where ``allowed`` (B, T, S) holds. Returns the new states and the step's (k, v)."""
        a = self.adapter
        layer = a.layers()[i]
        q, k, v = a.qkv(layer, a.attn_norm(layer, h), rope)
        k_all = k if past is None else torch.cat([past[0], k], dim=2)
        v_all = v if past is None else torch.cat([past[1], v], dim=2)
        h = h + a.attn_out(layer, self._attend(q, k_all, v_all, allowed))
        return h + a.ffn(layer, a.ffn_norm(layer, h)), (q, k, v)

    def _fastv_stay(self, q, k, allowed, visual, query: int, phase: str) -> torch.Tensor:
        """(B, T) bool: the tokens that stay after fastv's layer: every non-visual one and the
        ``keep`` fraction of the visual ones most attended by position ``query`` (the last
        prompt token), the mean of its attention over heads."""
        a = self.adapter
        rep = a.num_heads // a.num_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
        scores = (q[:, :, query : query + 1] @ k.transpose(-1, -2)).float() * a.scale  # (B, H, 1, T)
        scores = scores.masked_fill(~allowed[:, None, query : query + 1], float("-inf"))
        weight = scores.softmax(-1).mean(1)[:, 0]  # (B, T)
        n_keep = math.ceil(self.plan.keep * int(visual[0].sum()))
        ranked = torch.sort(weight.masked_fill(~visual, -1.0), dim=-1, descending=True, stable=True).indices
        self.stats.add(phase, "attention", q.shape[0] * k.shape[2] * self._score_flops_per_key, 0.0)
        return (~visual).scatter(1, ranked[:, :n_keep], True)

    # ------------------------------------------------------------------ a whole sequence

    def _forward_full(self, embeds, mask, width, visual, phase="prefill"):
        """Every position of the sequence (B, T) under the plan, positions >= ``width`` being
        generated tokens. Returns the last position's logits (B, V) and the cache it built: per layer
        ``[keys, values, valid]``, the keys and values (B, kv_heads, S_l, d) of the tokens that reached
        the layer and which of them later tokens may attend to (B, S_l)."""
        a = self.adapter
        plan = self.plan
        B, T = mask.shape
        dev = embeds.device
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        h, rope = a.add_positions(embeds, positions, mask, 0)
        valid = mask.bool()
        index = torch.arange(T, device=dev).expand(B, T)  # each present token's original position
        vis = visual.clone() if visual is not None else torch.zeros(B, T, dtype=torch.bool, device=dev)
        exited = torch.zeros(B, T, dtype=torch.bool, device=dev)
        exit_logits = None
        layers = []
        for i in range(self.num_layers):
            Ti = h.shape[1]
            keys_ok = valid & ~exited
            causal = index[:, None, :] <= index[:, :, None]  # (B, Ti, Ti)
            allowed = causal & keys_ok[:, None, :]
            new_h, (q, k, v) = self._block(i, h, rope, None, allowed)
            self._count_layer(phase, i, B * Ti, Ti, B * T, T)
            h = torch.where(exited[..., None], h, new_h)  # a token that exited keeps its state
            layers.append([k, v, keys_ok.clone()])
            if i == plan.layer and plan.kind in VISUAL_KINDS:
                stay = ~vis if plan.kind == "visual_exit" else self._fastv_stay(q, k, allowed, vis, width - 1, phase)
                h, index, valid, vis, exited = (_gather(t, stay) for t in (h, index, valid, vis, exited))
                rope = _gather_rope(rope, stay)
            elif i == plan.layer and plan.kind == "early_exit" and T > width and i < self.num_layers - 1:
                logits = a.head(h[:, width:])  # the generated positions' heads
                self._count_head(phase, B * (T - width), 0)
                exited = torch.cat([exited[:, :width], entropy(logits) < plan.threshold], dim=1)
                exit_logits = logits[:, -1]
        logits = a.head(h[:, -1:])[:, 0]
        self._count_head(phase, B, B)
        if exit_logits is not None:
            logits = torch.where(exited[:, -1:], exit_logits, logits)
        return logits, layers

    # ------------------------------------------------------------------ one generated token

    def _decode(self, embeds, mask, cache: list):
        """One step: the newest token (B, 1) through the blocks with ``cache``; ``mask`` (B, S)
        covers every position so far. Returns its logits (B, V) and the rows that exited."""
        a = self.adapter
        plan = self.plan
        B, S = mask.shape
        dev = embeds.device
        positions = (mask.long().cumsum(-1) - 1)[:, -1:]
        h, rope = a.add_positions(embeds, positions, mask, S - 1)
        go = torch.ones(B, dtype=torch.bool, device=dev)
        rows = None  # None: every row; else the indices of the rows still running
        exit_logits = None
        for i in range(self.num_layers):
            k_c, v_c, ok = cache[i]
            if rows is None:
                allowed = torch.cat([ok, torch.ones(B, 1, dtype=torch.bool, device=dev)], dim=1)[:, None]
                h, (_, k, v) = self._block(i, h, rope, (k_c, v_c), allowed)
                self._count_layer("decode", i, B, k_c.shape[2] + 1, B, S)
                cache[i] = [torch.cat([k_c, k], 2), torch.cat([v_c, v], 2),
                                   torch.cat([ok, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1)]
            else:
                k_new = k_c.new_zeros(B, k_c.shape[1], 1, k_c.shape[3])
                v_new = v_c.new_zeros(B, v_c.shape[1], 1, v_c.shape[3])
                if len(rows):
                    n = len(rows)
                    allowed = torch.cat([ok[rows], torch.ones(n, 1, dtype=torch.bool, device=dev)], dim=1)[:, None]
                    sub_rope = None if rope is None else tuple(t[rows] for t in rope)
                    h_sub, (_, k, v) = self._block(i, h[rows], sub_rope, (k_c[rows], v_c[rows]), allowed)
                    h = h.index_copy(0, rows, h_sub)
                    k_new = k_new.index_copy(0, rows, k)
                    v_new = v_new.index_copy(0, rows, v)
                    self._count_layer("decode", i, n, k_c.shape[2] + 1, 0, 0)
                self._count_layer("decode", i, 0, 0, B, S)
                cache[i] = [torch.cat([k_c, k_new], 2), torch.cat([v_c, v_new], 2),
                                   torch.cat([ok, go[:, None]], 1)]
            if i == plan.layer and plan.kind == "early_exit" and i < self.num_layers - 1:
                exit_logits = a.head(h)[:, 0]
                self._count_head("decode", B, 0)
                ent = entropy(exit_logits)
                self.entropies.append(ent)
                go = ~(ent < plan.threshold)
                rows = go.nonzero()[:, 0]
        logits = exit_logits if rows is not None and not len(rows) else None
        if logits is None:
            if rows is None:
                logits = a.head(h)[:, 0]
                self._count_head("decode", B, B)
            else:
                last = a.head(h[rows])[:, 0]
                self._count_head("decode", len(rows), B)
                logits = exit_logits.index_copy(0, rows, last)
        else:
            self._count_head("decode", 0, B)
        return logits, int((~go).sum())

    # ------------------------------------------------------------------ greedy generation

    @torch.no_grad()
    def generate(self, attention_mask: torch.Tensor, input_ids=None, inputs_embeds=None, visual=None,
                 max_new_tokens: int = 20, eos_token_id: int | None = None, pad_token_id: int = 0,
                 use_cache: bool = True) -> torch.Tensor:
        """Greedy decoding of a left-padded batch; returns the new tokens (B, <= max_new_tokens).

        ``visual`` (B, T) marks the prompt's visual tokens (the same number in every row, none in
        the last column); the visual kinds need it. Finished rows are filled with
        ``pad_token_id`` and decoding stops once every row has produced ``eos_token_id``, as
        ``model.generate`` does.
        """
        a = self.adapter
        check_generate_inputs(attention_mask, input_ids, inputs_embeds)
        check_visual(self.plan, visual, attention_mask)
        prompt = a.embed(input_ids, inputs_embeds)
        B, width = prompt.shape[:2]
        dev = prompt.device
        masks, out, unfinished = decode_buffers(attention_mask, prompt, max_new_tokens, pad_token_id)
        self.exits, self.entropies = [], []
        cache = None
        n = 0
        for step in range(max_new_tokens):
            started = time.perf_counter()
            mask = masks[:, :width + step]
            if step == 0 or not use_cache:
                seq = prompt if step == 0 else torch.cat([prompt, a.embed(out[:, :step])], dim=1)
                vis = None if visual is None else torch.cat(
                    [visual.bool(), torch.zeros(B, step, dtype=torch.bool, device=dev)], dim=1)
                phase = "prefill" if step == 0 else "decode"
                logits, cache = self._forward_full(seq, mask, width, vis, phase)
                self.stats.tokens[phase] += B * seq.shape[1]
                self.stats.steps[phase] += 1
            else:
                logits, exited = self._decode(a.embed(out[:, step - 1 : step]), mask, cache)
                self.stats.tokens["decode"] += B
                self.stats.steps["decode"] += 1
                self.exits.append(exited)
            token = torch.where(unfinished, logits.argmax(-1), torch.full((B,), pad_token_id, device=dev))
            out[:, step] = token
            n = step + 1
            self.stats.seconds["prefill" if step == 0 or not use_cache else "decode"] += time.perf_counter() - started
            if eos_token_id is not None:
                unfinished &= token != eos_token_id
                if not bool(unfinished.any()):
                    break
        return out[:, :n]


def check_visual(plan: TokenPlan, visual, mask) -> None:
    """Refuse a visual mask the plan cannot use: missing for a visual kind, of another shape
    than the attention mask, on padding or the last column, or not the same count in each row."""
    if plan.kind not in VISUAL_KINDS:
        return
    if visual is None:
        raise ValueError(f"kind={plan.kind!r} needs `visual`, the (B, T) mask of the prompt's visual tokens")
    if tuple(visual.shape) != tuple(mask.shape):
        raise ValueError(f"visual has shape {tuple(visual.shape)}, the attention mask {tuple(mask.shape)}")
    visual = visual.bool()
    if bool((visual & (mask == 0)).any()):
        raise ValueError("visual marks padding positions")
    if bool(visual[:, -1].any()):
        raise ValueError("visual marks the last prompt position (the query fastv ranks by, and the next token's)")
    counts = visual.sum(1)
    if bool((counts != counts[0]).any()) or int(counts[0]) == 0:
        raise ValueError(f"visual marks {counts.tolist()} tokens per row: every row needs the same number, >= 1")


def _gather(t: torch.Tensor, stay: torch.Tensor) -> torch.Tensor:
    """The tokens of ``t`` (B, T, ...) where ``stay`` (B, T) holds, in order (the same count per row)."""
    idx = stay.nonzero()[:, 1].view(stay.shape[0], -1)  # row-major: each row's kept positions in order
    if t.dim() == 2:
        return t.gather(1, idx)
    return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))


def _gather_rope(rope, stay):
    if rope is None:
        return None
    return tuple(_gather(t, stay) if t.shape[0] == stay.shape[0] else _gather(t.expand(stay.shape[0], -1, -1), stay)
                 for t in rope)

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
  them (later tokens are in scope too), so they are neither computed nor stored: the layer's
  cache holds the prompt's positions only (``generated``) or nothing (``all``), see
  :meth:`SkipEngine.cache_capacities`. (A step mixing both kinds of token, a recomputation
  without cache, fills them with zeros, which nobody reads);
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

The cache (:class:`KVCache`) is preallocated for the whole decode (prompt plus
``max_new_tokens``): each step writes its keys and values in place and attends over the valid
prefix, a view, so no step copies the cache; a decode step's cost grows only with the keys its
attention reads.

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


class KVCache:
    """Keys and values of the textbook engine, preallocated: per layer a (B, kv_heads, capacity,
    head_dim) pair of buffers, or None for a layer whose keys and values no token ever reads.

    A step writes its keys and values in place at ``length`` and attends over the valid prefix
    (a view of the buffers); nothing is concatenated or copied again. ``capacities`` come from
    the plan (:meth:`SkipEngine.cache_capacities`): a layer whose attention the generated tokens
    skip keeps only the prompt's positions, one nobody attends at keeps nothing.
    """

    def __init__(self, slots: list, batch: int):
        self.slots = slots
        self.batch = batch
        self.length = 0  # positions written (the next step writes at this index)

    @classmethod
    def allocate(cls, batch: int, capacities, num_kv_heads: int, head_dim: int, dtype, device) -> KVCache:
        slots = [None if c is None else (torch.empty(batch, num_kv_heads, c, head_dim, dtype=dtype, device=device),
                                         torch.empty(batch, num_kv_heads, c, head_dim, dtype=dtype, device=device))
                 for c in capacities]
        return cls(slots, batch)

    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in filter(None, self.slots))


def part_flops(model: nn.Module, a) -> tuple[int, int, int, list[int], int]:
    """FLOPs per token of each part (2 per multiply-accumulate), from the weights' shapes: the q, k, v projections,
    the output projection, attention per key attended (q k^T and a v), each block's feed-forward, the LM head
    (``a``: the model's family adapter)."""
    hidden = model.get_input_embeddings().weight.shape[1]
    ffn = [2 * sum(m.weight.numel() for name, m in layer.named_modules()
                   if isinstance(m, nn.Linear) and not name.startswith("self_attn"))
           for layer in a.layers()]
    return (2 * hidden * a.head_dim * (a.num_heads + 2 * a.num_kv_heads), 2 * a.num_heads * a.head_dim * hidden,
            2 * 2 * a.num_heads * a.head_dim, ffn, 2 * model.get_output_embeddings().weight.numel())


def check_generate_inputs(attention_mask: torch.Tensor, input_ids, inputs_embeds) -> None:
    """Refuse a greedy decode's inputs: not exactly one of ids and embeddings, or a mask not left-padded."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if attention_mask.ndim != 2 or bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("attention_mask must be (B, T) with left padding (last column all ones)")


def decode_buffers(attention_mask: torch.Tensor, prompt: torch.Tensor, max_new_tokens: int, pad_token_id: int):
    """A greedy decode's preallocated buffers, on ``prompt``'s device: the mask of every step (B, T +
    max_new_tokens, the prompt's mask then ones; each step reads a view), the new tokens (B, max_new_tokens,
    padding until written) and the rows still generating (B,)."""
    B, width = prompt.shape[:2]
    dev = prompt.device
    masks = torch.ones((B, width + max_new_tokens), dtype=attention_mask.dtype, device=dev)
    masks[:, :width] = attention_mask
    out = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=dev)
    return masks, out, torch.ones(B, dtype=torch.bool, device=dev)


class SkipEngine:
    """A causal LM (OPT, LLaMA, LLaVA's language model) run under one plan; ``plan=None`` skips nothing."""

    def __init__(self, model: nn.Module, plan: SkipPlan | None = None):
        self.model = model
        self.adapter = adapter_for(model)
        self.plan = plan or SkipPlan()
        self.num_layers = len(self.adapter.layers())
        self.plan.check(self.num_layers)
        self.stats = RunStats()  # accumulates over calls; assign a new RunStats to restart
        self.static_decoders: dict = {}  # decode steps of fixed shapes, see static_decode
        a = self.adapter
        hidden = model.get_input_embeddings().weight.shape[1]
        self._qkv_flops, self._out_flops, self._attn_flops_per_key, self._ffn_flops, self._head_flops = \
            part_flops(model, a)
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

    def _block(self, layer, h, run_attn, run_ffn, parallel, kv_fill, slot, past, prev_new_kv, rope, attn_mask):
        """One block for all T tokens of the step.

        ``run_attn``/``run_ffn``/``parallel`` are Python bools (every token alike) or (T,) bool
        tensors (a step mixing in-scope and out-of-scope tokens); ``kv_fill`` says how to fill
        the keys and values of tokens that do not run attention ('zeros': nobody reads them,
        'compute', 'previous_layer'). ``slot`` is the layer's (keys, values) buffers of a
        :class:`KVCache` holding ``past`` positions, or None (no cache: ``past`` is 0); ``past`` may be
        a (1,) long tensor (a static-shape step, :mod:`mmskip.skipping.captured`). Returns
        the new hidden states, this step's (k, v) at this layer (None when not computed) and
        what ran (qkv, attention, ffn).
        """
        a = self.adapter
        attn_all, need_attn = _all(run_attn), _any(run_attn)
        projected = need_attn or kv_fill == "compute"
        q = k = v = None  # nobody runs attention and nobody reads these keys: nothing computed or stored
        if projected:
            q, k, v = a.qkv(layer, a.attn_norm(layer, h), rope)
            if not attn_all and need_attn:  # a mixed step: the skipped tokens' keys filled as kv_fill says
                skipped = ~run_attn[None, None, :, None]
                if kv_fill == "zeros":
                    k, v = k.masked_fill(skipped, 0.0), v.masked_fill(skipped, 0.0)
                elif kv_fill == "previous_layer":
                    k, v = torch.where(skipped, prev_new_kv[0], k), torch.where(skipped, prev_new_kv[1], v)
        elif kv_fill == "previous_layer":  # every token skipped attention: the previous layer's keys
            k, v = prev_new_kv
        k_all, v_all = k, v
        if slot is not None and k is not None:
            if isinstance(past, torch.Tensor):  # a static-shape step: write at a tensor index, attend over
                slot[0].index_copy_(2, past, k)  # the whole buffer (attn_mask hides what is not valid)
                slot[1].index_copy_(2, past, v)
                k_all, v_all = slot
            else:
                end = past + k.shape[2]
                slot[0][:, :, past:end] = k
                slot[1][:, :, past:end] = v
                k_all, v_all = slot[0][:, :, :end], slot[1][:, :, :end]
        out = h
        if need_attn:
            attn = a.attn_out(layer, self._attention(q, k_all, v_all, attn_mask))
            out = h + attn if attn_all else h + attn * run_attn[None, :, None]
        ffn_all, ffn_any = _all(run_ffn), _any(run_ffn)
        if ffn_any:
            par_all, par_any = _all(parallel), _any(parallel)
            ffn_in = h if par_all else out if not par_any else torch.where(parallel[None, :, None], h, out)
            ffn = a.ffn(layer, a.ffn_norm(layer, ffn_in))
            out = out + ffn if ffn_all else out + ffn * run_ffn[None, :, None]
        ran = (projected, need_attn, ffn_any)
        return out, (k, v), ran

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

    def _step(self, mask, prompt_width, input_ids, inputs_embeds, past):
        """What every step starts from: the embedded inputs with positions (and the rotary
        tables), the phase, the new positions' indices, which of them are generated and in the
        plan's scope (a Python bool when the step's tokens are all alike: a prefill, a decode
        step), the attention mask (None or "causal" where Hugging Face's SDPA path needs none)
        and a function giving the (B, T, S) allowed keys."""
        a = self.adapter
        h = a.embed(input_ids, inputs_embeds)
        T = h.shape[1]
        phase = "prefill" if past == 0 else "decode"
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, past:]
        h, rope = a.add_positions(h, positions, mask, past)
        dev = h.device  # every tensor made here follows the model's device
        index = torch.arange(past, past + T, device=dev)
        scope = self.plan.scope
        if past >= prompt_width or past + T <= prompt_width:  # every token generated, or every token context
            generated = past >= prompt_width
            in_scope = scope == "all" or (scope == "generated") == generated
        else:
            generated = index >= prompt_width
            in_scope = (generated if scope == "generated" else ~generated if scope == "context"
                        else torch.ones(T, dtype=torch.bool, device=dev))

        def allowed():
            keys = torch.arange(past + T, device=dev)
            return (keys[None, :] <= index[:, None])[None] & mask.bool()[:, None, :]  # (B, T, S)

        if bool(mask.all()) and (T == 1 or past == 0):
            attn_mask = None if T == 1 else "causal"  # as Hugging Face's SDPA path does without padding
        else:
            attn_mask = h.new_zeros((h.shape[0], T, past + T)).masked_fill(
                ~allowed(), torch.finfo(h.dtype).min)[:, None]
        return h, rope, phase, index, generated, in_scope, attn_mask, allowed

    def _finish(self, phase: str, h: torch.Tensor, tokens: int, last_only: bool) -> torch.Tensor:
        """The step's logits (the last position only with ``last_only``), its LM head FLOPs, tokens and step counted."""
        if last_only:
            h = h[:, -1:]
        self._count_head(phase, h.shape[0] * h.shape[1], tokens)
        return self.adapter.head(h)

    def _count_head(self, phase: str, positions: int, tokens: int) -> None:
        """The LM head's FLOPs at ``positions``, the step's tokens, and the step itself."""
        head = positions * self._head_flops
        self.stats.add(phase, "lm_head", head, head)
        self.stats.tokens[phase] += tokens
        self.stats.steps[phase] += 1

    def cache_capacities(self, prompt_width: int, length: int) -> list[int | None]:
        """Per layer, the positions a :class:`KVCache` must hold for a decode of ``length``
        positions whose first ``prompt_width`` are the prompt: None where no token's attention
        ever reads the layer's keys (a dropped layer; skip_block or skip_attn with scope ``all``),
        ``prompt_width`` where only the prompt's are read (those modes with scope ``generated``),
        ``length`` elsewhere."""
        p, caps = self.plan, []
        for i in range(self.num_layers):
            mode = self._layer_mode(i)
            if mode == "dropped":
                caps.append(None)
            elif mode in ("skip_block", "skip_attn") and p.scope != "context":
                caps.append(None if p.scope == "all" else prompt_width)
            else:
                caps.append(length)
        return caps

    def new_cache(self, batch: int, prompt_width: int, length: int, like: torch.Tensor) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` rows decoded to ``length`` positions, in
        ``like``'s dtype and on its device."""
        a = self.adapter
        return KVCache.allocate(batch, self.cache_capacities(prompt_width, length), a.num_kv_heads, a.head_dim,
                                like.dtype, like.device)

    def static_decode(self, batch: int, prompt_width: int, length: int, like: torch.Tensor, decode: str):
        """The engine's :class:`~mmskip.skipping.captured.StaticDecode` for these shapes, ``like``'s
        dtype and device and ``decode``, made on first use and kept (a compiled or captured step
        is made once per shape); :attr:`static_decoders` holds them."""
        from mmskip.skipping.captured import StaticDecode

        key = (batch, prompt_width, length, like.dtype, str(like.device), decode)
        if key not in self.static_decoders:
            self.static_decoders[key] = StaticDecode(self, batch, prompt_width, length, like, decode)
        return self.static_decoders[key]

    def forward(self, mask: torch.Tensor, prompt_width: int, input_ids=None, inputs_embeds=None, cache=None,
                last_only: bool = False):
        """Logits (B, T, V) of the step's T tokens (B, 1, V with ``last_only``) and the cache.

        ``mask`` (B, past + T) covers the cached and the new tokens. ``cache``: None (a forward
        over the whole sequence that keeps nothing; returns None) or the :class:`KVCache` of the
        previous steps (:meth:`new_cache`), written in place and returned. Under official
        semantics the cache is the list returned by the previous step (None for the first). A
        step with an empty cache counts as prefill in :attr:`stats`, any other as decode.
        """
        if self.plan.semantics == "official":
            return self._forward_official(mask, prompt_width, input_ids, inputs_embeds, cache, last_only)
        past = 0 if cache is None else cache.length
        h, rope, phase, index, generated, in_scope, attn_mask, _ = self._step(
            mask, prompt_width, input_ids, inputs_embeds, past)
        B, T = h.shape[:2]
        slots = [None] * self.num_layers if cache is None else cache.slots
        h = self._layers(h, rope, in_scope, slots, past, attn_mask, _Tally(self, phase, past + T))
        if cache is not None:
            cache.length = past + T
        return self._finish(phase, h, B * T, last_only), cache

    def _layers(self, h, rope, in_scope, slots, past, attn_mask, tally):
        """Every layer under the plan for the step's (B, T) states ``h``: ``in_scope`` is a Python
        bool (every token alike) or a (T,) bool tensor; ``slots`` the cache's per layer (or None
        each); ``past`` the positions already cached (an int, or a (1,) long tensor for a
        static-shape step); what ran is reported to ``tally``. Returns the last layer's states."""
        B, T = h.shape[:2]
        dev = h.device  # every tensor made here follows the model's device
        scope = self.plan.scope
        if isinstance(in_scope, bool):
            n_in = B * T if in_scope else 0
            none, everyone, out_of_scope = False, True, not in_scope
        else:
            n_in = int(in_scope.sum()) * B
            none = torch.zeros(T, dtype=torch.bool, device=dev)
            everyone = torch.ones(T, dtype=torch.bool, device=dev)
            out_of_scope = ~in_scope
        prev_new_kv = None
        layers = self.adapter.layers()
        i = 0
        while i < self.num_layers:
            mode = self._layer_mode(i)
            if mode == "dropped":
                tally.layer(i, B * T)
                tally.depth(2 * B * T, 0)
                i += 1
                continue
            run_attn, run_ffn, parallel = everyone, everyone, none
            if mode in ("skip_block", "skip_attn"):
                run_attn = out_of_scope
            if mode in ("skip_block", "skip_ffn"):
                run_ffn = out_of_scope
            if mode == "parallel_attn_ffn":
                parallel = in_scope
            kv_fill = "zeros" if scope != "context" else self.plan.context_kv
            if kv_fill == "previous_layer" and prev_new_kv is None:
                kv_fill = "compute"
            if mode == "parallel_blocks" and n_in:
                h_first, kv_first, ran = self._block(layers[i], h, everyone, everyone, none, kv_fill, slots[i], past,
                                                     prev_new_kv, rope, attn_mask)
                tally.layer(i, B * T, ran)
                second_in = h if in_scope is True else torch.where(in_scope[None, :, None], h, h_first)
                h_second, kv_second, ran = self._block(layers[i + 1], second_in, everyone, everyone, none, kv_fill,
                                                       slots[i + 1], past, kv_first, rope, attn_mask)
                tally.layer(i + 1, B * T, ran)
                tally.depth(4 * B * T, 2 * n_in + 4 * (B * T - n_in))
                both = (h_first - h) + (h_second - h)
                if self.plan.combine == "mean":
                    both = both / 2
                h = h + both if in_scope is True else torch.where(in_scope[None, :, None], h + both, h_second)
                prev_new_kv = kv_second
                i += 2
                continue
            h, kv, ran = self._block(layers[i], h, run_attn, run_ffn, parallel, kv_fill, slots[i], past,
                                     prev_new_kv, rope, attn_mask)
            tally.layer(i, B * T, ran)
            depth_in = {"skip_block": 0, "skip_attn": 1, "skip_ffn": 1, "parallel_attn_ffn": 1}.get(mode, 2)
            tally.depth(2 * B * T, depth_in * n_in + 2 * (B * T - n_in))
            prev_new_kv = kv
            i += 1
        return h

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
        past = 0 if cache is None else _cache_len(cache)
        h, rope, phase, index, generated, in_scope, std_mask, allowed = self._step(
            mask, prompt_width, input_ids, inputs_embeds, past)
        B, T = h.shape[:2]
        dev = h.device
        generated, in_scope = (torch.full((T,), x, dtype=torch.bool, device=dev) if isinstance(x, bool) else x
                               for x in (generated, in_scope))
        S = past + T
        step_of = torch.where(generated, index - prompt_width + 1, torch.zeros_like(index))
        one_step = bool((step_of == step_of[0]).all())
        select_mask = None
        if not one_step:
            same = step_of[:, None] == step_of[None, :]  # (T, T): new positions of one step
            same_all = torch.cat([torch.zeros(T, past, dtype=torch.bool, device=dev), same], dim=1)
            allowed = allowed()
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
                 eos_token_id: int | None = None, pad_token_id: int = 0, use_cache: bool = True,
                 decode: str = "eager") -> torch.Tensor:
        """Greedy decoding of a left-padded batch; returns the new tokens (B, <= max_new_tokens).

        Finished rows are filled with ``pad_token_id`` and decoding stops when every row has
        produced ``eos_token_id``, as ``model.generate`` does. ``decode`` says how the decode
        steps run: ``"eager"`` (:meth:`forward`), or with fixed shapes, ``"static"``,
        ``"compiled"`` or ``"cuda_graph"`` (:mod:`mmskip.skipping.captured`).
        """
        from mmskip.skipping.captured import check_decode

        check_generate_inputs(attention_mask, input_ids, inputs_embeds)
        check_decode(decode, self, attention_mask.device, use_cache)
        prompt = self.adapter.embed(input_ids, inputs_embeds)
        B, width = prompt.shape[:2]
        dev = prompt.device
        masks, out, unfinished = decode_buffers(attention_mask, prompt, max_new_tokens, pad_token_id)
        cache = None
        if use_cache and self.plan.semantics != "official" and decode == "eager":
            cache = self.new_cache(B, width, width + max_new_tokens, prompt)
        step_embeds = prompt
        static = None
        if decode != "eager":
            static = self.static_decode(B, width, width + max_new_tokens, prompt, decode)
            cache = static.reset(attention_mask)
        self.step_seconds = []  # wall time of each step of this call (the first is the prefill)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        n = 0
        for step in range(max_new_tokens):
            started = time.perf_counter()
            mask = masks[:, :width + step]
            if static is not None and step:
                token = static.step(token)
            elif use_cache:
                logits, cache = self.forward(mask, width, inputs_embeds=step_embeds, cache=cache, last_only=True)
                token = logits[:, -1].argmax(-1)
            else:
                full = torch.cat([prompt, self.adapter.embed(out[:, :step])], dim=1) if step else prompt
                logits, _ = self.forward(mask, width, inputs_embeds=full, last_only=True)
                token = logits[:, -1].argmax(-1)
            token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
            out[:, step] = token
            n = step + 1
            if static is None:
                step_embeds = self.adapter.embed(token[:, None])
            sync()
            seconds = time.perf_counter() - started
            self.step_seconds.append(seconds)
            self.stats.seconds["prefill" if step == 0 or not use_cache else "decode"] += seconds
            if eos_token_id is not None:
                unfinished &= token != eos_token_id
                if not bool(unfinished.any()):
                    break
        return out[:, :n]


class _Tally:
    """Adds what a step's layers ran to the engine's :attr:`SkipEngine.stats`: per layer its
    FLOPs (``keys`` attended per token), per block the full and executed depth."""

    def __init__(self, engine: SkipEngine, phase: str, keys: int):
        self.engine, self.phase, self.keys = engine, phase, keys

    def layer(self, i: int, tokens: int, ran=(False, False, False), full: bool = True) -> None:
        self.engine._count(self.phase, i, tokens, self.keys, ran, full)

    def depth(self, full: int, executed: int) -> None:
        self.engine.stats.full_depth[self.phase] += full
        self.engine.stats.depth[self.phase] += executed


class StepRecord(_Tally):
    """What one step ran, kept to be added again for each replay of a captured step (whose
    Python does not run again): :meth:`add` counts it with that step's number of keys."""

    def __init__(self, engine: SkipEngine, phase: str):
        super().__init__(engine, phase, 0)
        self.layers: list[tuple] = []
        self.depths = [0, 0]

    def layer(self, i, tokens, ran=(False, False, False), full=True):
        self.layers.append((i, tokens, ran, full))

    def depth(self, full, executed):
        self.depths[0] += full
        self.depths[1] += executed

    def add(self, keys: int) -> None:
        for i, tokens, ran, full in self.layers:
            self.engine._count(self.phase, i, tokens, keys, ran, full)
        super().depth(*self.depths)


def _all(m) -> bool:
    """Every token: a Python bool as it is, a (T,) bool tensor reduced."""
    return m if isinstance(m, bool) else bool(m.all())


def _any(m) -> bool:
    return m if isinstance(m, bool) else bool(m.any())


def _cache_len(cache) -> int:
    """Tokens held by a cache (dropped layers hold None)."""
    return next(c[0].shape[2] for c in cache if c is not None)

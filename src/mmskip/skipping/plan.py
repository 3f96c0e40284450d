"""A static skip plan: which computation is skipped, in which layers, for which tokens.

Modes follow Shukor & Cord 2024 (arXiv 2410.09454, section 3):

- ``skip_block``: the whole block is the identity;
- ``skip_attn``: self-attention skipped, feed-forward kept;
- ``skip_ffn``: feed-forward skipped, self-attention kept;
- ``parallel_attn_ffn``: self-attention and feed-forward both read the block input and their
  outputs are added to the residual;
- ``parallel_blocks``: block i and block i+1 both read the same input h; the paper's code
  averages their updates (``h + (d1 + d2) / 2``, ``combine="mean"``), ``combine="sum"`` gives
  ``h + d1 + d2``;
- ``drop_last``: the last ``num_layers`` blocks are removed (the usual layer-pruning baseline),
  for every token.

Scope decides which tokens a plan applies to, by position: ``context`` is the prompt (soft
visual tokens and text prompt, every position before the first generated one), ``generated``
the tokens produced by decoding, ``all`` both.

Semantics
---------
``semantics="textbook"`` (default) is the definitions above. ``semantics="official"`` is what
the paper's code computes (mshukor/ima-lmms, ``DePALM/pruning/skipping_opt.py`` and
``skipping_llama.py``, ``forward_*_decoder`` and ``forward_*_layer``); build such plans with
:func:`official_plan`. There, in the layers a plan lists, for in-scope tokens:

- ``skip_block``: the block's output is its input, and its key/value cache slot receives the
  previous layer's (the nearest executed layer below; the paper's ``layer_outputs_prev``);
- ``skip_attn``: with ``x = norm1(h)``, OPT outputs ``x + FFN(norm2(x))`` (the residual is the
  normed ``x``), LLaMA ``h + MLP(x)`` (no post-attention norm); the cache receives
  ``K = x``, ``V = x`` split into heads (LLaMA: ``K`` rotated by RoPE), no projection;
- ``skip_ffn``: ``h + SA(norm1(h))`` as in textbook; its keys/values are the layer's own;
- ``parallel_attn_ffn``: OPT ``h + SA(x) + FFN(norm2(x))``, LLaMA ``h + SA(x) + MLP(x)``;
  keys/values are the layer's own;
- ``parallel_blocks``: ``layers`` are pair starts i: blocks i and i+1 both read h and both
  attend to layer i's cache slot; the output is the mean of the two blocks' outputs and the
  mean of their new keys/values is stored in slot i and slot i+1. ``reused`` lists layers the
  official code skips whole (as skip_block: layer 1 when the pair grid ``range(0, L, m)``
  starts at the unpairable layer 0); ``rerun`` lists second blocks i+1 that run once more,
  normally, on the pair's output (a pair ending at the official end bound);
- ``drop_last``: ``layers`` are the dropped layers (as skip_block, for every token whatever the
  scope), just below the official end bound: the last layer still runs.

Under official semantics ``combine`` is always ``"mean"`` and ``context_kv`` does not apply (the
keys/values above are what later tokens attend to); both keep their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("skip_block", "skip_attn", "skip_ffn", "parallel_attn_ffn", "parallel_blocks", "drop_last")
SCOPES = ("generated", "context", "all")
# how the engine's decode steps run (SkipEngine.generate(decode=...), mmskip.skipping.captured)
DECODES = ("eager", "static", "compiled", "cuda_graph")
COMBINES = ("mean", "sum")
# What a later token attends to at a layer whose attention a skipped context position did not run.
CONTEXT_KV = ("compute", "previous_layer")
SEMANTICS = ("textbook", "official")
# token-level families (mmskip.skipping.tokens): tokens leave the computation after a layer
TOKEN_KINDS = ("visual_exit", "fastv", "early_exit")


def every_kth_layer(num_layers: int, interval: int, start_layer: int, end_layer: int | None = None) -> tuple[int, ...]:
    """The paper's selection: layer i when ``start_layer < i < end_layer`` and ``i % interval == 0``."""
    if interval < 1:
        raise ValueError(f"skip_interval={interval}: must be >= 1")
    end = num_layers if end_layer is None else end_layer
    if not -1 <= start_layer < num_layers:
        raise ValueError(f"start_layer={start_layer}: allowed -1..{num_layers - 1} for a {num_layers}-layer model")
    if not 0 <= end <= num_layers:
        raise ValueError(f"end_layer={end_layer}: allowed 0..{num_layers} for a {num_layers}-layer model")
    return tuple(i for i in range(num_layers) if start_layer < i < end and i % interval == 0)


def _official_end(num_layers: int, end_layer: int | None) -> int:
    """The official end bound: ``end_layer`` (exclusive), by default (None or 0) the last layer."""
    end = num_layers - 1 if not end_layer else end_layer
    if not 1 <= end <= num_layers:
        raise ValueError(f"end_layer={end_layer}: allowed 1..{num_layers} (0 or None: {num_layers - 1}, the "
                         f"official default) for a {num_layers}-layer model")
    return end


def official_layers(num_layers: int, interval: int, start_layer: int, end_layer: int | None = None) -> tuple[int, ...]:
    """The official selection for skip_block, skip_attn, skip_ffn and parallel_attn_ffn: layer i
    when ``i > 0`` (the code needs a previous layer's output), ``start_layer < i < end_layer``
    (default end: ``num_layers - 1``, so never the last layer) and ``i % interval == 0``."""
    end = _official_end(num_layers, end_layer)
    return tuple(i for i in every_kth_layer(num_layers, interval, start_layer, end) if i > 0)


def official_plan(mode: str, num_layers: int, interval: int, start_layer: int, end_layer: int | None, scope: str,
                  num_dropped: int = 0) -> SkipPlan:
    """The plan the paper's code executes for ``mode`` with ``skip_interval=interval`` (and, for
    parallel_blocks, ``layers_interval=interval``), ``start_layer``, ``end_layer`` (None or 0: the
    official default ``num_layers - 1``) on the tokens of ``scope``.

    parallel_blocks follows the code's loop over ``layers_interval = range(0, L, interval)``:
    a layer i in bounds (``0 < i``, ``start_layer < i < end``) with i - 1 in the grid reuses the
    previous layer's output and cache (the second block of a pair, or, when i - 1 was not
    paired, a layer skipped whole: ``reused``); one with i in the grid starts a pair (i, i+1);
    a second block beyond the bounds runs again on the pair's output (``rerun``). A pair whose
    second block would be past the model is refused (the code fails there).

    drop_last drops the ``num_dropped`` layers just below the end bound, for every token
    (the code applies it whatever the step's length), so the plan's scope is ``"all"``;
    ``interval`` and ``start_layer`` are ignored.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: allowed {MODES}")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: allowed {SCOPES}")
    end = _official_end(num_layers, end_layer)
    if mode == "drop_last":
        if not 0 <= num_dropped < end:
            raise ValueError(f"num_dropped={num_dropped}: allowed 0..{end - 1} below the official end bound {end} "
                             f"of a {num_layers}-layer model (layer 0 is never dropped)")
        return SkipPlan(mode, tuple(range(end - num_dropped, end)), "all", num_dropped=num_dropped,
                        semantics="official")
    if mode != "parallel_blocks":
        return SkipPlan(mode, official_layers(num_layers, interval, start_layer, end), scope, semantics="official")
    if interval < 1:
        raise ValueError(f"skip_interval={interval}: must be >= 1")
    if not -1 <= start_layer < num_layers:
        raise ValueError(f"start_layer={start_layer}: allowed -1..{num_layers - 1} for a {num_layers}-layer model")
    grid = set(range(0, num_layers, interval))
    pairs: list[int] = []
    reused: list[int] = []
    rerun: list[int] = []
    for i in range(num_layers):
        if not (i > 0 and start_layer < i < end):
            if i - 1 in pairs:
                rerun.append(i)
        elif i - 1 in grid:
            if i - 1 not in pairs:
                reused.append(i)
        elif i in grid:
            if i + 1 >= num_layers:
                raise ValueError(f"parallel_blocks pair ({i}, {i + 1}) needs layer {i + 1}, past the "
                                 f"{num_layers}-layer model (end_layer={end_layer}): the official code fails there")
            pairs.append(i)
        elif i % interval == 0:  # the code's skip_interval branch; never reached with one interval
            reused.append(i)
    return SkipPlan(mode, tuple(pairs), scope, semantics="official", reused=tuple(reused), rerun=tuple(rerun))


_NEW_FIELDS = ("semantics", "reused", "rerun")  # after today's fields; at their defaults a plan is as before


@dataclass(frozen=True)
class SkipPlan:
    """``mode=None`` (or no layers) runs the model unchanged."""

    mode: str | None = None
    layers: tuple[int, ...] = ()  # for parallel_blocks: the first block of each pair
    scope: str = "generated"
    combine: str = "mean"  # parallel_blocks only
    context_kv: str = "compute"
    num_dropped: int = 0  # drop_last only
    semantics: str = "textbook"  # see the module docstring
    reused: tuple[int, ...] = ()  # official parallel_blocks: layers skipped whole outside the pairs
    rerun: tuple[int, ...] = ()  # official parallel_blocks: second blocks run again on the pair's output

    def __post_init__(self) -> None:
        if self.semantics not in SEMANTICS:
            raise ValueError(f"semantics={self.semantics!r}: allowed {SEMANTICS}")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: allowed {MODES} or None")
        if self.scope not in SCOPES:
            raise ValueError(f"scope={self.scope!r}: allowed {SCOPES}")
        if self.combine not in COMBINES:
            raise ValueError(f"combine={self.combine!r}: allowed {COMBINES}")
        if self.context_kv not in CONTEXT_KV:
            raise ValueError(f"context_kv={self.context_kv!r}: allowed {CONTEXT_KV}")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers={list(self.layers)}: must be increasing without repeats")
        if self.mode == "parallel_blocks":
            overlap = [i for i in self.layers if i + 1 in self.layers]
            if overlap:
                raise ValueError(f"parallel_blocks pairs (i, i+1) overlap at layers {overlap}")
        if self.mode == "drop_last" and self.num_dropped < 0:
            raise ValueError(f"num_dropped={self.num_dropped}: must be >= 0")
        if self.semantics == "official":
            self._check_official()
        elif self.reused or self.rerun:
            raise ValueError(f"reused={list(self.reused)}, rerun={list(self.rerun)}: official parallel_blocks only "
                             f"(semantics={self.semantics!r})")

    def _check_official(self) -> None:
        for name in ("reused", "rerun"):
            value = getattr(self, name)
            if list(value) != sorted(set(value)):
                raise ValueError(f"{name}={list(value)}: must be increasing without repeats")
            if value and self.mode != "parallel_blocks":
                raise ValueError(f"{name}={list(value)}: official parallel_blocks only (mode={self.mode!r})")
        if self.combine != "mean":
            raise ValueError(f"combine={self.combine!r}: the official code averages parallel blocks; "
                             "semantics='official' takes combine='mean'")
        if self.context_kv != "compute":
            raise ValueError(f"context_kv={self.context_kv!r}: semantics='official' fixes the keys and values of "
                             "skipped layers (see mmskip.skipping.plan); leave context_kv='compute'")
        touched = set(self.layers) | set(self.reused)
        if 0 in touched:
            raise ValueError("layer 0 is never skipped under semantics='official' (the code needs the previous "
                             f"layer's output): layers={list(self.layers)}, reused={list(self.reused)}")
        if self.mode == "parallel_blocks":
            seconds = {i + 1 for i in self.layers}
            clash = sorted(set(self.reused) & (set(self.layers) | seconds))
            if clash:
                raise ValueError(f"reused={list(self.reused)}: layers {clash} are in a pair")
            stray = sorted(set(self.rerun) - seconds)
            if stray:
                raise ValueError(f"rerun={list(self.rerun)}: layers {stray} are not the second block of a pair")
        if self.mode == "drop_last":
            if len(self.layers) != self.num_dropped or (
                    self.layers and list(self.layers) != list(range(self.layers[0], self.layers[-1] + 1))):
                raise ValueError(f"layers={list(self.layers)}, num_dropped={self.num_dropped}: official drop_last "
                                 "lists the num_dropped consecutive dropped layers (see official_plan)")

    def __hash__(self) -> int:
        values = tuple(getattr(self, f) for f in self.__dataclass_fields__)
        if self._new_fields_default():
            values = values[:-len(_NEW_FIELDS)]  # as before these fields existed
        return hash(values)

    def __repr__(self) -> str:
        names = [f for f in self.__dataclass_fields__ if not (f in _NEW_FIELDS and self._new_fields_default())]
        return f"SkipPlan({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"

    def _new_fields_default(self) -> bool:
        return self.semantics == "textbook" and not self.reused and not self.rerun

    def check(self, num_layers: int) -> None:
        """Raise if the plan does not fit a model with ``num_layers`` blocks."""
        last = num_layers - (2 if self.mode == "parallel_blocks" else 1)
        bad = [i for i in self.layers if not 0 <= i <= last]
        if bad:
            raise ValueError(f"layers {bad} out of range: allowed 0..{last} for mode={self.mode!r} "
                             f"on a {num_layers}-layer model")
        bad = [i for i in self.reused + self.rerun if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"reused/rerun layers {bad} out of range: allowed 0..{num_layers - 1} "
                             f"on a {num_layers}-layer model")
        if self.mode == "drop_last" and self.num_dropped >= num_layers:
            raise ValueError(f"num_dropped={self.num_dropped}: must be below the {num_layers} layers")

    @property
    def empty(self) -> bool:
        return self.mode is None or (self.mode == "drop_last" and self.num_dropped == 0) or (
            self.mode != "drop_last" and not self.layers and not self.reused)

"""The engine's decode step with shapes that never change, run as is, compiled, or captured as a CUDA graph.

A decode step of :meth:`SkipEngine.forward` reads Python ints (how many positions the
:class:`~mmskip.skipping.engine.KVCache` holds) and attends over the valid prefix, so each step
has new shapes and runs its Python again: on a GPU at batch 1 that Python, not the weights'
bytes, sets the time per token. :class:`StaticDecode` runs the same layers
(:meth:`SkipEngine._layers`, the same blocks, the same cache) on buffers of fixed shapes:

- the next token's ids, its positions and the index it is written at are tensors updated in
  place by the step itself;
- keys and values are written with ``index_copy_`` at that index, and attention reads a layer's
  whole preallocated buffer under an additive mask (B, 1, 1, capacity) whose entry for the new
  position the step opens; the masked positions get a softmax weight of exactly zero, and
  the positions not written yet hold zeros (a weight of zero times NaN would still be NaN);
- the plan is fixed and every decode token is alike (generated), so each layer's choice is
  Python made once, when the step is traced or captured.

``decode`` (:data:`~mmskip.skipping.plan.DECODES`) says how the steps run: ``"static"`` calls
the step as is (any device: what the other two are tested against), ``"compiled"`` runs it
through ``torch.compile(fullgraph=True, dynamic=False)`` (one graph for the whole step, a graph
break raises) and ``"cuda_graph"`` records it once as a CUDA graph and replays it (CUDA only).
The engine keeps one decoder per shape (:meth:`SkipEngine.static_decode`), so the compiled or
captured step is made once and reused by every later call of that shape. The prefill runs
eagerly (:meth:`SkipEngine.forward`, into the decoder's cache). The decoder's very first step
runs eagerly too and records what a step executes (:class:`StepRecord`), which every step adds
to the engine's stats with its own number of keys: the FLOP accounting is the eager engine's.

Exactness: attention here reduces over the whole buffer rather than the valid prefix, which can
round the last bit differently (the same terms plus zeros, summed in another order: up to 2e-7 in
float32, one ulp in bfloat16). In float32 the fixed-shape step's greedy tokens equal the eager
engine's for every plan and both test families (tested); in bfloat16 one ulp can flip a near tie
of the (deliberately chaotic) test models, so the tested guarantee there is the capture's: a CUDA
graph replays the static step's own kernels, and its tokens are the static step's, token for
token (tested on CUDA). ``torch.compile`` fuses kernels and rounds as it fuses; its float32
tokens equal the eager engine's (tested).

Under the official semantics the cache is a list the layers share, so only ``"eager"`` exists there.
"""

from __future__ import annotations

import torch

from mmskip.skipping.engine import KVCache, SkipEngine, StepRecord
from mmskip.skipping.plan import DECODES


def check_decode(decode: str, engine: SkipEngine, device: torch.device, use_cache: bool) -> None:
    """Refuse a ``decode`` the engine cannot run, naming the value and what is allowed."""
    if decode not in DECODES:
        raise ValueError(f"decode={decode!r}: allowed {list(DECODES)}")
    if decode == "eager":
        return
    if not use_cache:
        raise ValueError(f"decode={decode!r} decodes through the preallocated cache: it needs use_cache=True")
    if engine.plan.semantics == "official":
        raise ValueError(f"decode={decode!r} with semantics='official': the official cache is a list its layers "
                         f"share; allowed there: ['eager']")
    if decode == "cuda_graph" and device.type != "cuda":
        raise ValueError(f"decode='cuda_graph' on device {device.type!r}: CUDA graphs need a CUDA device; "
                         f"allowed on {device.type!r}: ['eager', 'static', 'compiled']")


class _NoTally:
    """What a replayed step reports: nothing (its :class:`StepRecord` is added instead)."""

    def layer(self, *args, **kwargs):
        pass

    def depth(self, *args):
        pass


class StaticDecode:
    """Decode steps of fixed shapes for ``batch`` rows, a prompt of ``width`` and ``length``
    positions in all, with their own :class:`KVCache`; kept by the engine per shape
    (:meth:`SkipEngine.static_decode`) so that a compiled or captured step is reused by later
    calls. :meth:`reset` starts a decode (before its prefill); :meth:`step` runs one.
    """

    def __init__(self, engine: SkipEngine, batch: int, width: int, length: int, like: torch.Tensor, decode: str):
        check_decode(decode, engine, like.device, True)
        if decode == "eager":
            raise ValueError("StaticDecode runs decode='static', 'compiled' or 'cuda_graph'; 'eager' is "
                             "SkipEngine.forward")
        self.engine, self.decode, self.width = engine, decode, width
        self.cache = engine.new_cache(batch, width, length, like)
        dev, dtype = like.device, like.dtype
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.index = torch.zeros(1, dtype=torch.long, device=dev)
        self.bias = torch.zeros(batch, 1, 1, length, dtype=dtype, device=dev)
        # a decode token is generated: in the plan's scope unless the scope is the context
        self.in_scope = engine.plan.scope != "context"
        self.record: StepRecord | None = None  # what one step runs, from the first (eager) step
        self._compiled = None
        self._graph = None
        self._graph_token = None
        self._warmed = False

    def reset(self, mask: torch.Tensor) -> KVCache:
        """Start a decode of the left-padded prompt ``mask`` (batch, width): empty the cache (zeros:
        attention reads whole buffers, and a zero weight times NaN would still be NaN), mask every
        position but the prompt's real tokens, and place the first generated token. Returns the
        cache for the prefill (:meth:`SkipEngine.forward`)."""
        if tuple(mask.shape) != (self.ids.shape[0], self.width):
            raise ValueError(f"mask of shape {tuple(mask.shape)}: this decoder is for ({self.ids.shape[0]}, "
                             f"{self.width})")
        for k, v in filter(None, self.cache.slots):
            k.zero_()
            v.zero_()
        self.cache.length = 0
        self.bias.fill_(torch.finfo(self.bias.dtype).min)
        self.bias[:, 0, 0, :self.width].masked_fill_(mask.bool(), 0.0)
        self.positions.copy_(mask.long().sum(-1, keepdim=True))  # the first generated token's position
        self.index.fill_(self.width)
        return self.cache

    def _step(self, ids, positions, index, bias, tally):
        """One decode step on the buffers: the next greedy tokens; positions and index advanced in place."""
        e, a = self.engine, self.engine.adapter
        h, rope = a.add_positions(a.embed(ids), positions, None, 0)
        bias.index_fill_(-1, index, 0.0)  # the new position is valid from now on
        h = e._layers(h, rope, self.in_scope, self.cache.slots, index, bias, tally)
        token = a.head(h)[:, -1].argmax(-1)
        positions.add_(1)
        index.add_(1)
        return token

    def _run(self, tally) -> torch.Tensor:
        return self._step(self.ids, self.positions, self.index, self.bias, tally)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """The greedy tokens after ``token`` (B,), which this step writes to the cache."""
        e = self.engine
        B = self.ids.shape[0]
        keys = self.cache.length + 1
        self.ids.copy_(token.view(B, 1))
        if self.record is None:  # the first decode step ever: eager, recording what a step runs
            self.record = StepRecord(e, "decode")
            nxt = self._run(self.record)
        elif self.decode == "static":
            nxt = self._run(_NoTally())
        elif self.decode == "compiled":
            if self._compiled is None:
                self._compiled = torch.compile(self._step, fullgraph=True, dynamic=False)
            nxt = self._compiled(self.ids, self.positions, self.index, self.bias, _NoTally())
        else:
            nxt = self._replay()
        self.record.add(keys)
        e._count_head("decode", B, B)
        self.cache.length = keys
        return nxt.clone()

    def _replay(self) -> torch.Tensor:
        """CUDA graphs: one step runs eagerly on a side stream (the warm-up a capture needs, and a
        real step), the next is captured, and every step from there replays it."""
        if self._graph is None:
            if not self._warmed:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    nxt = self._run(_NoTally())
                torch.cuda.current_stream().wait_stream(side)
                self._warmed = True
                return nxt
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):  # records the step without running it
                self._graph_token = self._run(_NoTally())
        self._graph.replay()
        return self._graph_token

"""What a skipped run executed: FLOPs per phase and component, sequential depth, wall time.

The engine adds to a :class:`RunStats` at every step, from the shapes it actually runs:

- ``projections``: the q, k, v and output projections of self-attention;
- ``attention``: the score (q k^T) and weighted-sum (a v) products over the keys attended;
- ``ffn``: the feed-forward matrices;
- ``lm_head``: the output projection to the vocabulary, for the positions whose logits are used.

A FLOP is a multiply or an add (a multiply-accumulate is 2 FLOPs); norms, activations, softmax
and residual adds are left out. Padding positions count, since they are executed. Next to each
executed figure the engine records what the unskipped model would execute for the same step
(``full``), so ``fraction(phase)`` compares like with like even when a skipped run decodes a
different number of tokens than the baseline. A step that mixes skipped and kept tokens (a
recomputation without cache) executes the kept path for every token and counts it so.

``depth`` counts the sequential sub-layers (attention, feed-forward) a token passes through;
parallel modes execute every FLOP but shorten this chain, which is what they buy on hardware
that runs the two branches at once.

Official plans (``SkipPlan(semantics="official")``) count what the paper's code executes: a layer
that reuses the previous layer's output (skip_block, drop_last, a pair's second block, a
``reused`` layer) executes nothing (depth 0); official skip_attn runs no q, k, v or output
projection and no attention, only the feed-forward (depth 1: its cached keys and values are the
normed input, not projected); a parallel pair executes both blocks at the first layer (the
second block's FLOPs are executed only, the unskipped figure counts each layer once), depth 2
for the pair; a second block run again (``rerun``) is one more block (depth 2). Attention is
counted over the step's keys (past + new) whichever keys a query reads.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

PHASES = ("prefill", "decode")
COMPONENTS = ("projections", "attention", "ffn", "lm_head")


@dataclass
class RunStats:
    executed: dict = field(default_factory=lambda: defaultdict(float))  # (phase, component) -> FLOPs
    full: dict = field(default_factory=lambda: defaultdict(float))
    depth: dict = field(default_factory=lambda: defaultdict(float))  # phase -> sub-layers x steps, executed
    full_depth: dict = field(default_factory=lambda: defaultdict(float))
    tokens: dict = field(default_factory=lambda: defaultdict(int))  # phase -> positions processed
    steps: dict = field(default_factory=lambda: defaultdict(int))  # phase -> forward calls
    seconds: dict = field(default_factory=lambda: defaultdict(float))

    def add(self, phase: str, component: str, executed: float, full: float) -> None:
        self.executed[phase, component] += executed
        self.full[phase, component] += full

    def fraction(self, phase: str) -> float:
        """Executed FLOPs of ``phase`` as a fraction of the unskipped model's (1.0: nothing skipped)."""
        full = sum(self.full[phase, c] for c in COMPONENTS)
        return sum(self.executed[phase, c] for c in COMPONENTS) / full if full else 1.0

    def depth_fraction(self, phase: str) -> float:
        return self.depth[phase] / self.full_depth[phase] if self.full_depth[phase] else 1.0

    def per_token(self, phase: str, which: str = "executed") -> dict[str, float]:
        counts = self.executed if which == "executed" else self.full
        n = self.tokens[phase]
        return {c: counts[phase, c] / n if n else 0.0 for c in COMPONENTS}

    def ms_per_step(self, phase: str) -> float:
        return 1000 * self.seconds[phase] / self.steps[phase] if self.steps[phase] else 0.0

    def as_dict(self) -> dict:
        """Per phase: FLOPs per token by component, fractions (deterministic: no timing)."""
        out = {}
        for phase in PHASES:
            executed, full = self.per_token(phase), self.per_token(phase, "full")
            out[phase] = {
                "tokens": self.tokens[phase],
                "steps": self.steps[phase],
                "flops_per_token": {**executed, "total": sum(executed.values())},
                "unskipped_flops_per_token": {**full, "total": sum(full.values())},
                "flops_fraction": self.fraction(phase),
                "fraction_skipped": 1.0 - self.fraction(phase),
                "depth_fraction": self.depth_fraction(phase),
            }
        return out

    def timing(self) -> dict:
        """Per phase: wall seconds, steps and ms per step (a step gives every row one token)."""
        return {phase: {"seconds": self.seconds[phase], "steps": self.steps[phase],
                        "ms_per_step": self.ms_per_step(phase)} for phase in PHASES}

    def counts(self) -> dict:
        """The deterministic fields (no wall time) as JSON: ``{"executed": {"prefill/ffn": ...}, ...}``."""
        def flat(d):
            return {"/".join(k) if isinstance(k, tuple) else k: v for k, v in sorted(d.items())}
        return {"executed": flat(self.executed), "full": flat(self.full), "depth": flat(self.depth),
                "full_depth": flat(self.full_depth), "tokens": flat(self.tokens), "steps": flat(self.steps)}

    @classmethod
    def from_counts(cls, counts: dict, seconds: dict | None = None) -> RunStats:
        """The inverse of :meth:`counts` (with ``seconds``, phase -> wall seconds, when given)."""
        stats = cls()
        for name in ("executed", "full"):
            for key, value in counts[name].items():
                getattr(stats, name)[tuple(key.split("/"))] = value
        for name in ("depth", "full_depth", "tokens", "steps"):
            getattr(stats, name).update(counts[name])
        stats.seconds.update(seconds or {})
        return stats

    def merge(self, other: RunStats) -> None:
        for mine, theirs in ((self.executed, other.executed), (self.full, other.full), (self.depth, other.depth),
                             (self.full_depth, other.full_depth), (self.tokens, other.tokens),
                             (self.steps, other.steps), (self.seconds, other.seconds)):
            for key, value in theirs.items():
                mine[key] += value

"""``mmskip bench-prune``: time and peak memory of Wanda pruning -> ``results/bench/prune.json``.

Two models: the default LLM (a path) and an OPT-125m-shaped model with random weights
(12 layers, width 768), each pruned at 50% with 128 calibration sequences of 128 random
tokens. Each case runs in a fresh process, so its peak resident memory (``ru_maxrss``) is its
own; the bar compares the peak growth over the process's footprint before the model was built
(libraries loaded) with the model's weight size.
"""

from __future__ import annotations

import logging
import multiprocessing
import platform
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mmskip.compression.pruning import PruneSpec, mask_sparsity, prune
from mmskip.io import write_json

log = logging.getLogger(__name__)

MEMORY_BAR = 2.0  # peak growth below this multiple of the weights' bytes


@dataclass
class PruneBenchConfig:
    num_sequences: int = 128
    sequence_length: int = 128
    batch_size: int = 16
    sparsity: float = 0.5
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    vocab_size: int = 50272

    def __post_init__(self) -> None:
        for name in ("num_sequences", "sequence_length", "batch_size", "hidden_size", "num_layers", "num_heads",
                     "ffn_dim", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"sparsity={self.sparsity}: must be in (0, 1)")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def _case(name: str, llm: str | None, cfg: PruneBenchConfig, seed: int, threads: int) -> dict:
    from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    before = _rss_mb()
    if llm is None:
        model = OPTForCausalLM(OPTConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                                         num_attention_heads=cfg.num_heads, ffn_dim=cfg.ffn_dim,
                                         vocab_size=cfg.vocab_size, word_embed_proj_dim=cfg.hidden_size,
                                         max_position_embeddings=max(2048, cfg.sequence_length)))
    else:
        model = AutoModelForCausalLM.from_pretrained(llm)
    model = model.eval().requires_grad_(False)
    weight_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    embed = model.get_input_embeddings()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, embed.num_embeddings, (cfg.num_sequences, cfg.sequence_length), generator=g)
    batches = [(embed(ids[s : s + cfg.batch_size]), torch.ones(len(ids[s : s + cfg.batch_size]), cfg.sequence_length,
                                                               dtype=torch.long))
               for s in range(0, cfg.num_sequences, cfg.batch_size)]
    loaded = _rss_mb()
    start = time.perf_counter()
    masks, _ = prune(model, PruneSpec("wanda", cfg.sparsity), batches, seed=seed)
    seconds = time.perf_counter() - start
    peak = _rss_mb()
    return {"case": name, "llm": llm or "random OPT-125m shape", "seconds": seconds,
            "achieved_sparsity": mask_sparsity(masks)["overall"], "weight_mb": weight_mb,
            "rss_before_model_mb": before, "rss_after_load_mb": loaded, "peak_rss_mb": peak,
            "peak_growth_mb": peak - before, "peak_growth_over_weights": (peak - before) / weight_mb,
            "tokens": cfg.num_sequences * cfg.sequence_length}


def bench_prune(cfg: PruneBenchConfig, seed: int, out: Path, llm: str | Path, threads: int = 0) -> dict:
    threads = threads or torch.get_num_threads()
    cases = [("default_llm", str(llm)), ("opt125m_random", None)]
    results = []
    ctx = multiprocessing.get_context("spawn")  # a fresh process per case: its own peak memory
    for name, path in cases:
        with ctx.Pool(1) as pool:
            result = pool.apply(_case, (name, path, cfg, seed, threads))
        log.info("%s: %.1f s, peak growth %.0f MB = %.2f x weights (%.0f MB)", name, result["seconds"],
                 result["peak_growth_mb"], result["peak_growth_over_weights"], result["weight_mb"])
        results.append(result)
    bars = {f"{r['case']}_peak_below_{MEMORY_BAR:g}x_weights": r["peak_growth_over_weights"] < MEMORY_BAR
            for r in results}
    report = {"config": asdict(cfg), "seed": seed, "threads": threads,
              "machine": {"processor": platform.machine(), "python": platform.python_version(),
                          "torch": torch.__version__},
              "note": ("peak_growth_mb: peak resident memory of the case's process minus its footprint before "
                       "the model was built; the calibration hidden states of one block's inputs are included"),
              "cases": results, "bars": {**bars, "all_met": all(bars.values())}}
    write_json(out, report)
    return report

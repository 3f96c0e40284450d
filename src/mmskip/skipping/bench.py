"""``mmskip bench_skip``: is skipping really faster, and is batched evaluation exact?

Two measurements, written to one JSON (``results/bench/skip.json``):

1. An OPT-125m-shaped model with random weights (12 layers, width 768 by default), batch 1 and
   8, ``context_tokens`` prompt tokens and ``new_tokens`` generated: decode ms per token for
   ``model.generate`` and for the engine with every mode (every ``interval``-th layer from
   ``start_layer``, generated tokens only; drop_last removes as many blocks), the measured decode
   speedup over the unskipped engine and the FLOP-ideal one (unskipped / executed decode FLOPs).
   Runs are interleaved (repeat r of every configuration before repeat r+1), so slow drifts of
   the machine hit every configuration alike, and the fastest repeat is kept: other processes
   only ever add time, so the minimum is the least disturbed estimate (as in ``timeit``).
2. The default pipeline's LLM and mappers: the same test examples decoded at batch 1 and at
   ``eval_batch_size``, outputs compared string for string, throughput of both.

Bars (the JSON's ``bars``): the unskipped engine's generation throughput within 5% of
``model.generate``; skip_block every 2nd layer reaching >= 85% of its FLOP-ideal decode speedup;
batched evaluation identical to batch 1 with >= 4x its throughput.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import torch
import transformers
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, OPTConfig, OPTForCausalLM

from mmskip.evaluation.runner import decode, load_example_set, decode_point
from mmskip.foundation.text import PromptsConfig
from mmskip.io import atomic_path, dumps_json
from mmskip.models import MapperModel, load_llm
from mmskip.params import BenchConfig
from mmskip.tasks import TASKS, get_task
from mmskip.skipping.accounting import RunStats
from mmskip.skipping.engine import SkipEngine
from mmskip.skipping.plan import SkipPlan

log = logging.getLogger(__name__)

BARS = {"engine_vs_generate_min": 0.95, "skip_block_efficiency_min": 0.85, "batched_eval_speedup_min": 4.0}


def _random_opt(cfg: BenchConfig, seed: int) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                       ffn_dim=cfg.ffn_dim, num_attention_heads=cfg.num_heads, word_embed_proj_dim=cfg.hidden_size,
                       max_position_embeddings=max(2048, cfg.context_tokens + cfg.new_tokens),
                       pad_token_id=1, bos_token_id=2, eos_token_id=2)
    return OPTForCausalLM(config).eval().requires_grad_(False)


class _StepClock(LogitsProcessor):
    """Notes the time at every decoding step (after each forward) without changing the scores."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def _hf_generate(model, ids, new_tokens: int) -> tuple[float, float]:
    """``model.generate``: total seconds and seconds per decode step (after the prefill)."""
    clock = _StepClock()
    started = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, num_beams=1, use_cache=True, pad_token_id=1,
                   eos_token_id=2, logits_processor=LogitsProcessorList([clock]))
    total = time.perf_counter() - started
    return total, (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)


def _engine_generate(model, plan: SkipPlan, ids, new_tokens: int) -> RunStats:
    engine = SkipEngine(model, plan)
    engine.generate(torch.ones_like(ids), input_ids=ids, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=1)
    return engine.stats


def bench_shapes(cfg: BenchConfig, seed: int) -> dict:
    """Part 1: decode speed of every mode on the random OPT-125m-shaped model."""
    model = _random_opt(cfg, seed)
    plans = cfg.plans()
    g = torch.Generator().manual_seed(seed)
    results = {}
    for batch in cfg.batch_sizes:
        ids = torch.randint(3, cfg.vocab_size, (batch, cfg.context_tokens), generator=g)
        _hf_generate(model, ids, 2)  # warm-up
        for plan in plans.values():
            _engine_generate(model, plan, ids, 2)
        hf_total, hf_decode = [], []
        runs: dict[str, list[RunStats]] = {name: [] for name in plans}
        for _ in tqdm(range(cfg.repeats), desc=f"bench batch {batch}"):
            total, decode = _hf_generate(model, ids, cfg.new_tokens)
            hf_total.append(total)
            hf_decode.append(decode)
            for name, plan in plans.items():
                runs[name].append(_engine_generate(model, plan, ids, cfg.new_tokens))
        rows = {"generate": {"decode_ms_per_token": 1000 * min(hf_decode),
                             "total_s": min(hf_total),
                             "tokens_per_s": batch * cfg.new_tokens / min(hf_total)}}
        base_ms = min(r.ms_per_step("decode") for r in runs["none"])
        for name, stats in runs.items():
            ms = min(r.ms_per_step("decode") for r in stats)
            total = min(r.seconds["prefill"] + r.seconds["decode"] for r in stats)
            fraction = stats[0].fraction("decode")
            ideal = 1 / fraction
            speedup = base_ms / ms
            rows[name] = {"layers": list(plans[name].layers), "num_dropped": plans[name].num_dropped,
                          "scope": plans[name].scope, "decode_ms_per_token": ms, "total_s": total,
                          "tokens_per_s": batch * cfg.new_tokens / total, "decode_flops_fraction": fraction,
                          "decode_depth_fraction": stats[0].depth_fraction("decode"),
                          "speedup": speedup, "flop_ideal_speedup": ideal,
                          "efficiency": speedup / ideal if ideal > 1 else None,
                          "decode_flops_per_token": stats[0].as_dict()["decode"]["flops_per_token"]}
        rows["none"]["vs_generate_throughput"] = rows["none"]["tokens_per_s"] / rows["generate"]["tokens_per_s"]
        results[str(batch)] = rows
        log.info("batch %d: generate %.2f ms/token, engine %.2f ms/token, skip_block x%.2f of ideal x%.2f", batch,
                 rows["generate"]["decode_ms_per_token"], base_ms, rows["skip_block"]["speedup"],
                 rows["skip_block"]["flop_ideal_speedup"])
    return results


def bench_batched_eval(cfg: BenchConfig, scenes: Path, features: Path, llm: Path, mappers: Path,
                       prompts: PromptsConfig, evaluation, tasks: tuple[str, ...]) -> dict:
    """Part 2: the default model's test examples at batch 1 and batched, through the engine."""
    model, tokenizer = load_llm(llm)
    out = {}
    for task in tasks:
        spec = get_task(task)
        mm = MapperModel.load(model, tokenizer, mappers / task, features, "test")
        ex = load_example_set(spec, scenes, "test", tokenizer, prompts, spec.max_new_tokens(evaluation),
                              cfg.eval_examples)
        row = {"num_examples": len(ex.examples)}
        predictions = {}
        for batch in (1, cfg.eval_batch_size):
            batches = mm.prompt_batches(ex, batch)
            decode(SkipEngine(model), tokenizer, batches[:2], ex.max_new_tokens, desc="warm-up")
            started = time.perf_counter()
            run = decode_point(mm, ex, batch, f"batch {batch}", batches=batches)
            seconds = time.perf_counter() - started
            predictions[batch] = run.predictions
            row[f"batch_{batch}"] = {"seconds": seconds, "examples_per_s": len(ex.examples) / seconds,
                                     "decode_ms_per_step": run.stats.ms_per_step("decode")}
        differing = [i for i, (a, b) in enumerate(zip(predictions[1], predictions[cfg.eval_batch_size])) if a != b]
        row["identical_outputs"] = not differing
        row["differing_examples"] = differing
        row["throughput_ratio"] = row[f"batch_{cfg.eval_batch_size}"]["examples_per_s"] / row["batch_1"]["examples_per_s"]
        out[task] = row
        log.info("%s: batch %d vs 1: identical %s, throughput x%.1f", task, cfg.eval_batch_size,
                 row["identical_outputs"], row["throughput_ratio"])
    return out


def bench_skip(cfg: BenchConfig, seed: int, out: Path, scenes: Path, features: Path, llm: Path, mappers: Path,
               prompts: PromptsConfig, evaluation_cfg, tasks: tuple[str, ...] | None = None) -> dict:
    """Both parts -> ``out``; part 2 on ``tasks`` (default: every registered task)."""
    shapes = bench_shapes(cfg, seed)
    evaluation = bench_batched_eval(cfg, scenes, features, llm, mappers, prompts, evaluation_cfg,
                                    tuple(TASKS) if tasks is None else tasks)
    bars = {
        "engine_vs_generate": {str(b): rows["none"]["vs_generate_throughput"] for b, rows in shapes.items()},
        "skip_block_efficiency": {str(b): rows["skip_block"]["efficiency"] for b, rows in shapes.items()},
        "batched_eval_identical": {t: r["identical_outputs"] for t, r in evaluation.items()},
        "batched_eval_speedup": {t: r["throughput_ratio"] for t, r in evaluation.items()},
    }
    passed = (all(v >= BARS["engine_vs_generate_min"] for v in bars["engine_vs_generate"].values())
              and all(v >= BARS["skip_block_efficiency_min"] for v in bars["skip_block_efficiency"].values())
              and all(bars["batched_eval_identical"].values())
              and all(v >= BARS["batched_eval_speedup_min"] for v in bars["batched_eval_speedup"].values()))
    result = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
        "seed": seed,
        "machine": {"torch": torch.__version__, "transformers": transformers.__version__,
                    "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
        "shapes": shapes,
        "batched_evaluation": evaluation,
        "bars": {**bars, "thresholds": BARS, "all_met": passed},
    }
    with atomic_path(out) as tmp:
        tmp.write_text(dumps_json(result))
    return result

"""``mmskip bench_skip``: is skipping really faster, and is batched evaluation exact?

Two measurements, written to one JSON (``results/bench/skip.json``):

1. An OPT-125m-shaped model with random weights (12 layers, width 768 by default), at every
   batch size of ``batch_sizes``, ``context_tokens`` prompt tokens and ``new_tokens`` generated:
   ``model.generate`` and the engine with every mode (every ``interval``-th layer from
   ``start_layer``, generated tokens only; drop_last removes as many blocks). Per run: decode ms
   per token, the measured decode speedup over the unskipped engine and the FLOP-ideal one
   (unskipped / executed decode FLOPs), and the growth of step time from the first to the last
   decode steps (each step the fastest of the repeats) against what the attention's own growth
   allows (the larger of the step's FLOP and byte growth: weights read once, keys and values read
   at every attending layer).
   One statistic, fixed in advance: runs are interleaved (repeat r of every configuration before
   repeat r+1, at least 5), so slow drifts of the machine hit every configuration alike, and the
   fastest repeat (least decode time) is kept: other processes only ever add time, so the
   minimum is the least disturbed estimate (as in ``timeit``).
2. The default pipeline's LLM and mappers: the same test examples decoded at batch 1 and at
   ``eval_batch_size``, outputs compared string for string, throughput of both.

Bars (the JSON's ``bars``, each with its values and whether it is met): the unskipped engine at
least as fast as ``model.generate`` at batch sizes up to 16; skip_block, skip_attn, skip_ffn and
drop_last reaching 0.9 of their FLOP-ideal decode speedup at every batch size; no late decode
step slower than an early one plus the attention's growth; batched evaluation identical to batch
1 with at least 4x its throughput. The JSON names the device it ran on.
"""

from __future__ import annotations

import logging
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
from mmskip.report.lineage import machine as lineage_machine
from mmskip.params import BenchConfig
from mmskip.tasks import TASKS, get_task
from mmskip.skipping.accounting import RunStats
from mmskip.skipping.engine import SkipEngine
from mmskip.skipping.plan import SkipPlan

log = logging.getLogger(__name__)

BARS = {"engine_vs_generate_min": 1.0, "engine_vs_generate_max_batch": 16, "efficiency_min": 0.9,
        "efficiency_modes": ("skip_block", "skip_attn", "skip_ffn", "drop_last"), "growth_max": 1.0,
        "growth_window": 16, "batched_eval_speedup_min": 4.0}


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


def _hf_generate(model, ids, new_tokens: int) -> list[float]:
    """``model.generate``: seconds of every step (the first is the prefill)."""
    clock = _StepClock()
    started = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, num_beams=1, use_cache=True, pad_token_id=1,
                   eos_token_id=2, logits_processor=LogitsProcessorList([clock]))
    times = [started, *clock.times]
    return [b - a for a, b in zip(times, times[1:])]


def _engine_generate(model, plan: SkipPlan, ids, new_tokens: int) -> tuple[list[float], RunStats]:
    """The engine under ``plan``: seconds of every step (the first is the prefill) and what it executed."""
    engine = SkipEngine(model, plan)
    engine.generate(torch.ones_like(ids), input_ids=ids, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=1)
    return engine.step_seconds, engine.stats


def decode_step_cost(engine: SkipEngine, batch: int, keys: int) -> tuple[float, float]:
    """(FLOPs, bytes read) of one decode step of ``batch`` rows attending over ``keys`` positions
    under the engine's plan (scope generated, or drop_last): the weights of what runs, read once,
    and the keys and values of every layer that runs attention."""
    a = engine.adapter
    item = engine.model.get_input_embeddings().weight.element_size()
    flops = batch * engine._head_flops
    read = engine._head_flops / 2 * item
    kv_per_key = 2 * a.num_kv_heads * a.head_dim * item
    for i in range(engine.num_layers):
        mode = engine._layer_mode(i)
        attn = mode not in ("dropped", "skip_block", "skip_attn")
        ffn = mode not in ("dropped", "skip_block", "skip_ffn")
        if attn:
            projections = engine._qkv_flops + engine._out_flops
            flops += batch * (projections + keys * engine._attn_flops_per_key)
            read += projections / 2 * item + batch * keys * kv_per_key
        if ffn:
            flops += batch * engine._ffn_flops[i]
            read += engine._ffn_flops[i] / 2 * item
    return flops, read


def _growth(runs: list[list[float]], engine: SkipEngine | None, batch: int, context: int, window: int) -> dict:
    """Mean seconds of the first and last ``window`` decode steps, each step the fastest of the
    repeats ``runs``, their ratio, and the ratio the attention's own growth allows (the larger of
    FLOPs and bytes, late over early)."""
    decode = [min(times) for times in zip(*(steps[1:] for steps in runs))]
    window = max(1, min(window, len(decode) // 2))
    early, late = sum(decode[:window]) / window, sum(decode[-window:]) / window
    row = {"early_ms": 1000 * early, "late_ms": 1000 * late, "ratio": late / early, "window": window}
    if engine is not None:
        # decode step j (from 0) attends over context + j + 1 keys
        mid_early, mid_late = context + 1 + (window - 1) / 2, context + len(decode) - (window - 1) / 2
        f0, b0 = decode_step_cost(engine, batch, mid_early)
        f1, b1 = decode_step_cost(engine, batch, mid_late)
        row["allowed_ratio"] = max(f1 / f0, b1 / b0)
        row["growth_over_allowed"] = row["ratio"] / row["allowed_ratio"]
        # what the early steps read and computed per second (weights, keys and values; FLOPs)
        row["early_gb_per_s"] = b0 / early / 1e9
        row["early_gflop_per_s"] = f0 / early / 1e9
    return row


def bench_shapes(cfg: BenchConfig, seed: int) -> dict:
    """Part 1: decode speed of every mode on the random OPT-125m-shaped model."""
    model = _random_opt(cfg, seed)
    plans = cfg.plans()
    engines = {name: SkipEngine(model, plan) for name, plan in plans.items()}
    g = torch.Generator().manual_seed(seed)
    results = {}
    for batch in cfg.batch_sizes:
        ids = torch.randint(3, cfg.vocab_size, (batch, cfg.context_tokens), generator=g)
        _hf_generate(model, ids, 2)  # warm-up
        for plan in plans.values():
            _engine_generate(model, plan, ids, 2)
        hf_runs: list[list[float]] = []
        runs: dict[str, list[tuple[list[float], RunStats]]] = {name: [] for name in plans}
        for _ in tqdm(range(cfg.repeats), desc=f"bench batch {batch}", mininterval=5):
            hf_runs.append(_hf_generate(model, ids, cfg.new_tokens))
            for name, plan in plans.items():
                runs[name].append(_engine_generate(model, plan, ids, cfg.new_tokens))
        fastest_hf = min(hf_runs, key=lambda steps: sum(steps[1:]))
        rows = {"generate": {"decode_ms_per_token": 1000 * sum(fastest_hf[1:]) / len(fastest_hf[1:]),
                             "total_s": sum(fastest_hf), "tokens_per_s": batch * cfg.new_tokens / sum(fastest_hf),
                             "growth": _growth(hf_runs, None, batch, cfg.context_tokens, BARS["growth_window"])}}
        for name, measured in runs.items():
            steps, stats = min(measured, key=lambda run: sum(run[0][1:]))
            ms = 1000 * sum(steps[1:]) / len(steps[1:])
            fraction = stats.fraction("decode")
            rows[name] = {"layers": list(plans[name].layers), "num_dropped": plans[name].num_dropped,
                          "scope": plans[name].scope, "decode_ms_per_token": ms, "total_s": sum(steps),
                          "tokens_per_s": batch * cfg.new_tokens / sum(steps), "decode_flops_fraction": fraction,
                          "decode_depth_fraction": stats.depth_fraction("decode"),
                          "flop_ideal_speedup": 1 / fraction,
                          "decode_flops_per_token": stats.as_dict()["decode"]["flops_per_token"],
                          "growth": _growth([r[0] for r in measured], engines[name], batch, cfg.context_tokens,
                                            BARS["growth_window"])}
        base_ms = rows["none"]["decode_ms_per_token"]
        for name in plans:
            row = rows[name]
            row["speedup"] = base_ms / row["decode_ms_per_token"]
            row["efficiency"] = row["speedup"] / row["flop_ideal_speedup"] if row["flop_ideal_speedup"] > 1 else None
        rows["none"]["vs_generate_throughput"] = rows["none"]["tokens_per_s"] / rows["generate"]["tokens_per_s"]
        rows["none"]["vs_generate_decode"] = rows["generate"]["decode_ms_per_token"] / base_ms
        results[str(batch)] = rows
        log.info("batch %d: generate %.2f ms/token, engine %.2f ms/token, skip_block x%.2f of ideal x%.2f", batch,
                 rows["generate"]["decode_ms_per_token"], base_ms, rows["skip_block"]["speedup"],
                 rows["skip_block"]["flop_ideal_speedup"])
    return results


def shape_bars(shapes: dict) -> list[dict]:
    """The bars of part 1, each with its values and whether it is met."""
    t = BARS
    vs = {b: rows["none"]["vs_generate_throughput"] for b, rows in shapes.items()
          if int(b) <= t["engine_vs_generate_max_batch"]}
    eff = {f"{m} @ {b}": rows[m]["efficiency"] for b, rows in shapes.items() for m in t["efficiency_modes"]
           if rows[m]["efficiency"] is not None}
    growth = {f"{name} @ {b}": row["growth"]["growth_over_allowed"] for b, rows in shapes.items()
              for name, row in rows.items() if "growth_over_allowed" in row["growth"]}
    return [
        {"bar": f"unskipped engine throughput / model.generate >= {t['engine_vs_generate_min']} "
                f"(batch <= {t['engine_vs_generate_max_batch']})",
         "values": vs, "met": all(v >= t["engine_vs_generate_min"] for v in vs.values())},
        {"bar": f"speedup / FLOP-ideal >= {t['efficiency_min']} ({', '.join(t['efficiency_modes'])}, every batch)",
         "values": eff, "met": all(v >= t["efficiency_min"] for v in eff.values())},
        {"bar": f"late / early decode step time over the attention's own growth <= {t['growth_max']} "
                f"(means of the first and last {t['growth_window']} decode steps, every engine run)",
         "values": growth, "met": all(v <= t["growth_max"] for v in growth.values())},
    ]


def machine_info() -> dict:
    """The device the benchmark ran on, with what decides its speed."""
    return {"device": "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), **lineage_machine()}


def bench_engine(cfg, seed: int, out: Path) -> dict:
    """``mmskip bench_engine``: part 1 alone at the bars' shapes -> ``out`` (results/bench/engine.json)."""
    shapes = bench_shapes(cfg, seed)
    bars = shape_bars(shapes)
    result = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}, "seed": seed,
              "machine": machine_info(), "shapes": shapes,
              "thresholds": {k: (list(v) if isinstance(v, tuple) else v) for k, v in BARS.items()},
              "bars": bars, "all_met": all(bar["met"] for bar in bars)}
    with atomic_path(out) as tmp:
        tmp.write_text(dumps_json(result))
    for bar in bars:
        log.info("%s: %s", "met" if bar["met"] else "NOT MET", bar["bar"])
    return result


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
    bars = shape_bars(shapes) + [
        {"bar": "batched evaluation identical to batch 1",
         "values": {t: r["identical_outputs"] for t, r in evaluation.items()},
         "met": all(r["identical_outputs"] for r in evaluation.values())},
        {"bar": f"batched / batch-1 throughput >= {BARS['batched_eval_speedup_min']}",
         "values": {t: r["throughput_ratio"] for t, r in evaluation.items()},
         "met": all(r["throughput_ratio"] >= BARS["batched_eval_speedup_min"] for r in evaluation.values())},
    ]
    result = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
        "seed": seed,
        "machine": machine_info(),
        "shapes": shapes,
        "batched_evaluation": evaluation,
        "thresholds": {k: (list(v) if isinstance(v, tuple) else v) for k, v in BARS.items()},
        "bars": bars,
        "all_met": all(bar["met"] for bar in bars),
    }
    with atomic_path(out) as tmp:
        tmp.write_text(dumps_json(result))
    return result

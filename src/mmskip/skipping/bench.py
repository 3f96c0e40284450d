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
from typing import Mapping

import torch
import transformers
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, OPTConfig, OPTForCausalLM

from mmskip.evaluation.runner import decode, load_example_set, decode_point
from mmskip.foundation.text import PromptsConfig
from mmskip.io import atomic_path, dumps_json
from mmskip.models import MapperModel, load_llm, resolve_device, resolve_dtype
from mmskip.report.lineage import machine as lineage_machine
from mmskip.params import BenchConfig
from mmskip.tasks import default_tasks, get_task
from mmskip.skipping.accounting import RunStats
from mmskip.skipping.engine import SkipEngine
from mmskip.skipping.plan import SkipPlan

log = logging.getLogger(__name__)

BARS = {"engine_vs_generate_min": 1.0, "engine_vs_generate_max_batch": 16, "efficiency_min": 0.9,
        "efficiency_modes": ("skip_block", "skip_attn", "skip_ffn", "drop_last"), "growth_max": 1.0,
        "growth_window": 16, "batched_eval_speedup_min": 4.0,
        # on a CUDA device, at batch 1, the captured decode step's rows ("none+cuda_graph", ...)
        "gpu_decode": "cuda_graph", "gpu_vs_generate_min": 2.0, "gpu_roofline_min": 0.5, "gpu_efficiency_min": 0.9}
CAPTURED_PLANS = ("none", "skip_block")  # the plans measured under every decode of cfg.decodes besides eager


def _random_opt(cfg: BenchConfig, seed: int) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                       ffn_dim=cfg.ffn_dim, num_attention_heads=cfg.num_heads, word_embed_proj_dim=cfg.hidden_size,
                       max_position_embeddings=max(2048, cfg.context_tokens + cfg.new_tokens),
                       pad_token_id=1, bos_token_id=2, eos_token_id=2)
    model = OPTForCausalLM(config).eval().requires_grad_(False)
    return model.to(resolve_device(cfg.device), resolve_dtype(cfg.dtype))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepClock(LogitsProcessor):
    """Notes the time at every decoding step (after each forward, the device synchronised)
    without changing the scores."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        _sync(scores.device)
        self.times.append(time.perf_counter())
        return scores


def bandwidth_gb_per_s(device: torch.device, nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Measured memory bandwidth of ``device``: a copy of ``nbytes`` reads and writes them; the
    fastest of ``repeats`` (the roofline a decode step's bytes are compared with)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy warms up
        _sync(device)
        started = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * nbytes / best / 1e9


def _hf_generate(model, ids, new_tokens: int) -> list[float]:
    """``model.generate``: seconds of every step (the first is the prefill)."""
    clock = _StepClock()
    _sync(ids.device)
    started = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, num_beams=1, use_cache=True, pad_token_id=1,
                   eos_token_id=2, logits_processor=LogitsProcessorList([clock]))
    times = [started, *clock.times]
    return [b - a for a, b in zip(times, times[1:])]


def _engine_generate(engine: SkipEngine, ids, new_tokens: int, decode: str = "eager") -> tuple[list[float], RunStats]:
    """``engine`` (its stats restarted; kept between runs, so a compiled or captured step is made
    once): seconds of every step (the first is the prefill) and what it executed."""
    engine.stats = RunStats()
    engine.generate(torch.ones_like(ids), input_ids=ids, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=1,
                    decode=decode)
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


def bench_shapes(cfg: BenchConfig, seed: int, bandwidth: float | None = None) -> dict:
    """Part 1: decode speed of every mode on the random OPT-125m-shaped model; ``bandwidth``
    (GB/s, measured when None) is the roofline each row's decode bytes per second are compared with."""
    model = _random_opt(cfg, seed)
    device = model.get_input_embeddings().weight.device
    bandwidth = bandwidth or bandwidth_gb_per_s(device)
    plans = cfg.plans()
    runs_of = {(name, "eager"): plan for name, plan in plans.items()}
    runs_of.update({(name, d): plans[name] for d in cfg.decodes if d != "eager" for name in CAPTURED_PLANS})
    engines = {key: SkipEngine(model, plan) for key, plan in runs_of.items()}
    row_name = {key: key[0] if key[1] == "eager" else f"{key[0]}+{key[1]}" for key in runs_of}
    g = torch.Generator().manual_seed(seed)
    results = {}
    for batch in cfg.batch_sizes:
        ids = torch.randint(3, cfg.vocab_size, (batch, cfg.context_tokens), generator=g).to(device)
        _hf_generate(model, ids, 2)  # warm-up (a compiled or captured step is made here, at this shape)
        for (name, decode), engine in engines.items():
            _engine_generate(engine, ids, cfg.new_tokens if decode != "eager" else 2, decode)
        hf_runs: list[list[float]] = []
        runs: dict[tuple, list[tuple[list[float], RunStats]]] = {key: [] for key in runs_of}
        for _ in tqdm(range(cfg.repeats), desc=f"bench batch {batch}", mininterval=5):
            hf_runs.append(_hf_generate(model, ids, cfg.new_tokens))
            for (name, decode), engine in engines.items():
                runs[name, decode].append(_engine_generate(engine, ids, cfg.new_tokens, decode))
        fastest_hf = min(hf_runs, key=lambda steps: sum(steps[1:]))
        # the bytes a decode step reads at its mean number of keys, over its time: the roofline's numerator
        mean_keys = cfg.context_tokens + 1 + (cfg.new_tokens - 2) / 2
        unskipped_bytes = decode_step_cost(engines["none", "eager"], batch, mean_keys)[1]
        hf_ms = 1000 * sum(fastest_hf[1:]) / len(fastest_hf[1:])
        rows = {"generate": {"decode_ms_per_token": hf_ms,
                             "total_s": sum(fastest_hf), "tokens_per_s": batch * cfg.new_tokens / sum(fastest_hf),
                             "roofline_fraction": unskipped_bytes / (hf_ms / 1000) / 1e9 / bandwidth,
                             "growth": _growth(hf_runs, None, batch, cfg.context_tokens, BARS["growth_window"])}}
        for key, measured in runs.items():
            name, decode = key
            steps, stats = min(measured, key=lambda run: sum(run[0][1:]))
            ms = 1000 * sum(steps[1:]) / len(steps[1:])
            fraction = stats.fraction("decode")
            step_bytes = decode_step_cost(engines[key], batch, mean_keys)[1]
            rows[row_name[key]] = {
                "plan": name, "decode": decode, "layers": list(plans[name].layers),
                "num_dropped": plans[name].num_dropped, "scope": plans[name].scope, "decode_ms_per_token": ms,
                "total_s": sum(steps), "tokens_per_s": batch * cfg.new_tokens / sum(steps),
                "decode_flops_fraction": fraction, "decode_depth_fraction": stats.depth_fraction("decode"),
                "flop_ideal_speedup": 1 / fraction,
                "decode_flops_per_token": stats.as_dict()["decode"]["flops_per_token"],
                "roofline_fraction": step_bytes / (ms / 1000) / 1e9 / bandwidth,
                "growth": _growth([r[0] for r in measured], engines[key], batch, cfg.context_tokens,
                                  BARS["growth_window"])}
        for key in runs_of:
            row = rows[row_name[key]]
            base = rows["none" if key[1] == "eager" else f"none+{key[1]}"]  # the same decode, unskipped
            row["speedup"] = base["decode_ms_per_token"] / row["decode_ms_per_token"]
            row["efficiency"] = row["speedup"] / row["flop_ideal_speedup"] if row["flop_ideal_speedup"] > 1 else None
            if key[0] == "none":
                row["vs_generate_throughput"] = row["tokens_per_s"] / rows["generate"]["tokens_per_s"]
                row["vs_generate_decode"] = hf_ms / row["decode_ms_per_token"]
        results[str(batch)] = rows
        log.info("batch %d: generate %.2f ms/token, engine %.2f ms/token, skip_block x%.2f of ideal x%.2f", batch,
                 hf_ms, rows["none"]["decode_ms_per_token"], rows["skip_block"]["speedup"],
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
              for name, row in rows.items() if "growth_over_allowed" in row["growth"] and row["decode"] == "eager"}
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


def gpu_bars(shapes: dict) -> list[dict]:
    """The bars of a CUDA run, at batch 1, on the captured decode step's rows (``BARS["gpu_decode"]``):
    at least 2x ``model.generate``, at least half the bandwidth roofline, skip_block at 0.9 of its
    FLOP-ideal speedup. A bar whose rows were not measured is not met."""
    t, rows = BARS, shapes.get("1", {})
    none, skip = rows.get(f"none+{t['gpu_decode']}"), rows.get(f"skip_block+{t['gpu_decode']}")
    where = f"batch 1, decode {t['gpu_decode']}"
    return [
        {"bar": f"captured unskipped engine decode / model.generate decode >= {t['gpu_vs_generate_min']} ({where})",
         "values": {} if none is None else {"1": none["vs_generate_decode"]},
         "met": none is not None and none["vs_generate_decode"] >= t["gpu_vs_generate_min"]},
        {"bar": f"captured unskipped engine: fraction of the bandwidth roofline >= {t['gpu_roofline_min']} ({where})",
         "values": {} if none is None else {"1": none["roofline_fraction"]},
         "met": none is not None and none["roofline_fraction"] >= t["gpu_roofline_min"]},
        {"bar": f"captured skip_block speedup / FLOP-ideal >= {t['gpu_efficiency_min']} ({where})",
         "values": {} if skip is None else {"1": skip["efficiency"]},
         "met": skip is not None and skip["efficiency"] >= t["gpu_efficiency_min"]},
    ]


def machine_info(device: torch.device | str = "cpu", bandwidth: float | None = None) -> dict:
    """The device the benchmark ran on, with what decides its speed."""
    device = torch.device(device)
    info = {"device": device.type, "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), **lineage_machine()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=props.total_memory / 1e9, cuda=torch.version.cuda)
    if bandwidth is not None:
        info["measured_bandwidth_gb_per_s"] = bandwidth
    return info


def bench_engine(cfg, seed: int, out: Path) -> dict:
    """``mmskip bench_engine``: part 1 alone at the bars' shapes -> ``out`` (results/bench/engine.json).
    On a CPU its bars are :func:`shape_bars`; on a CUDA device, :func:`gpu_bars`."""
    device = resolve_device(cfg.device)  # a device this machine lacks is refused before any work
    bandwidth = bandwidth_gb_per_s(device)
    shapes = bench_shapes(cfg, seed, bandwidth)
    bars = gpu_bars(shapes) if device.type == "cuda" else shape_bars(shapes)
    result = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}, "seed": seed,
              "machine": machine_info(device, bandwidth), "shapes": shapes,
              "thresholds": {k: (list(v) if isinstance(v, tuple) else v) for k, v in BARS.items()},
              "bars": bars, "all_met": all(bar["met"] for bar in bars)}
    with atomic_path(out) as tmp:
        tmp.write_text(dumps_json(result))
    for bar in bars:
        log.info("%s: %s", "met" if bar["met"] else "NOT MET", bar["bar"])
    return result


def bench_batched_eval(cfg: BenchConfig, scenes: Path | Mapping[str, Path], features: Path | Mapping[str, Path],
                       llm: Path, mappers: Path, prompts: PromptsConfig, evaluation, tasks: tuple[str, ...]) -> dict:
    """Part 2: the default model's test examples at batch 1 and batched, through the engine (``scenes``,
    ``features``: one for every task, or task -> path)."""
    model, tokenizer = load_llm(llm)
    out = {}
    for task in tasks:
        spec = get_task(task)
        task_scenes = scenes[task] if isinstance(scenes, Mapping) else scenes
        task_features = features[task] if isinstance(features, Mapping) else features
        mm = MapperModel.load(model, tokenizer, mappers / task, task_features, "test")
        ex = load_example_set(spec, task_scenes, "test", tokenizer, prompts, spec.max_new_tokens(evaluation),
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


def bench_skip(cfg: BenchConfig, seed: int, out: Path, scenes: Path | Mapping[str, Path],
               features: Path | Mapping[str, Path], llm: Path, mappers: Path, prompts: PromptsConfig, evaluation_cfg,
               tasks: tuple[str, ...] | None = None) -> dict:
    """Both parts -> ``out``; part 2 on ``tasks`` (default: the tasks of the run's dataset)."""
    shapes = bench_shapes(cfg, seed)
    evaluation = bench_batched_eval(cfg, scenes, features, llm, mappers, prompts, evaluation_cfg,
                                    default_tasks() if tasks is None else tasks)
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
        "machine": machine_info(cfg.device),
        "shapes": shapes,
        "batched_evaluation": evaluation,
        "thresholds": {k: (list(v) if isinstance(v, tuple) else v) for k, v in BARS.items()},
        "bars": bars,
        "all_met": all(bar["met"] for bar in bars),
    }
    with atomic_path(out) as tmp:
        tmp.write_text(dumps_json(result))
    return result

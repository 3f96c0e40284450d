"""`mmskip <command>`: one command per pipeline stage, named like its Snakemake rule and DVC stage.

Flags for parameters are generated from each stage's dataclass config, in the form DVC's
dictionary unpacking writes them (``${mapper}`` -> ``--steps 600 --lr 0.001 ...``), so the
Snakemake rule and the DVC stage issue the identical command. Paths are passed explicitly.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from mmskip.config import add_dataclass_args, dataclass_from_args
from mmskip.params import SECTIONS, ReportConfig  # noqa: F401  (ReportConfig: re-exported)
from mmskip.worker import forward

# params.yaml section -> the dataclass its flags come from (mmskip.params.Params, which the
# Snakefile validates params.yaml with); torch is imported by the handlers only.
SECTION_CONFIGS: dict[str, type] = dict(SECTIONS)


def _configs(args: argparse.Namespace, *sections: str):
    try:
        return [dataclass_from_args(SECTION_CONFIGS[s], args) for s in sections]
    except (TypeError, ValueError) as err:
        raise SystemExit(f"mmskip {args.command}: invalid parameter: {err}") from None


def _threads(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def _runtime(args: argparse.Namespace) -> dict:
    """``device`` and ``dtype`` of the runtime flags, checked on this machine before any work."""
    from mmskip.models import runtime

    (cfg,) = _configs(args, "runtime")
    try:
        device, dtype = runtime(cfg)
    except ValueError as err:
        raise SystemExit(f"mmskip {args.command}: {err}") from None
    return {"device": device, "dtype": dtype}


def make_scenes(args):
    """Generate the procedural scene dataset (images, captions, VQA) for every split."""
    from mmskip.data.scenes import make_scenes as run

    (cfg,) = _configs(args, "data")
    run(args.out, args.seed, cfg)


def make_sounds(args):
    """Generate the procedural sound dataset (clips, captions, questions) for every split."""
    from mmskip.data.sounds import make_sounds as run

    (cfg,) = _configs(args, "sounds")
    run(args.out, args.seed, cfg)


def make_clips(args):
    """Generate the procedural video dataset (clips, captions, questions) for every split."""
    from mmskip.data.clips import make_clips as run

    (cfg,) = _configs(args, "clips")
    run(args.out, args.seed, cfg)


def _generated(args) -> dict[str, Path]:
    """The generated datasets whose texts join the scenes' (--clips, --sounds)."""
    from mmskip.tasks import GENERATED_DATASETS

    return {d: getattr(args, d) for d in GENERATED_DATASETS if getattr(args, d) is not None}


def train_tokenizer(args):
    """Train the byte-level BPE tokenizer on the scene text (and the clips' and sounds', with --clips, --sounds)."""
    from mmskip.foundation.tokenizer import train_tokenizer as run

    cfg, prompts = _configs(args, "tokenizer", "prompts")
    run(args.scenes, args.out, cfg, prompts, generated=_generated(args))


def pretrain_llm(args):
    """Pretrain the tiny OPT causal LM on scene text (and the clips' and sounds', with --clips, --sounds; text
    alone)."""
    from mmskip.foundation.llm import pretrain_llm as run

    cfg, prompts = _configs(args, "llm", "prompts")
    _threads(args)
    run(args.scenes, args.tokenizer, args.out, args.metrics, args.seed, cfg, prompts, generated=_generated(args))


def pretrain_encoder(args):
    """Pretrain the tiny ViT image encoder on per-patch attributes."""
    from mmskip.foundation.encoder import pretrain_encoder as run

    (cfg,) = _configs(args, "encoder")
    _threads(args)
    run(args.scenes, args.out, args.metrics, args.seed, cfg)


def pretrain_video_encoder(args):
    """Pretrain the tiny VideoMAE encoder on the clips' per-token object attributes and motions."""
    from mmskip.foundation.video_encoder import pretrain_video_encoder as run

    (cfg,) = _configs(args, "video_encoder")
    _threads(args)
    run(args.clips, args.out, args.metrics, args.seed, cfg)


def pretrain_audio_encoder(args):
    """Pretrain the tiny Audio Spectrogram Transformer on the sounds' per-token note attributes."""
    from mmskip.foundation.audio_encoder import pretrain_audio_encoder as run

    (cfg,) = _configs(args, "audio_encoder")
    _threads(args)
    run(args.sounds, args.out, args.metrics, args.seed, cfg)


def cache_features(args):
    """Run the frozen encoder once per split and cache its tokens (safetensors)."""
    from mmskip.features.cache import cache_features as run

    (cfg,) = _configs(args, "features")
    _threads(args)
    run(args.scenes, args.encoder, args.out, cfg, **_runtime(args))


def train_mapper(args):
    """Train the mapper of one task against the frozen LLM."""
    from mmskip.mapper.train import train_mapper as run

    cfg, prompts, shares = _configs(args, "mapper", "prompts", "step_shares")
    _threads(args)
    run(args.task, args.scenes, args.features, args.llm, args.out, args.metrics, args.seed, cfg, prompts,
        checkpoint_dir=args.checkpoint_dir, shares=shares, **_runtime(args))


def evaluate(args):
    """Generate and score one task's inputs (multimodal, blind) on the evaluation split, each into OUT/{input}."""
    from mmskip.evaluation.evaluate import evaluate as run

    cfg, prompts = _configs(args, "evaluation", "prompts")
    _threads(args)
    run(args.task, args.inputs, args.scenes, args.features, args.llm, args.mapper, args.out, prompts, cfg,
        **_runtime(args))


def baseline(args):
    """Decode one task's evaluation split once through the unskipped engine: the baseline every family compares with."""
    from mmskip.evaluation.baseline import decode_baseline as run

    evaluation, prompts = _configs(args, "evaluation", "prompts")
    _threads(args)
    run(args.task, args.scenes, args.features, args.llm, args.mapper, args.out, prompts, evaluation,
        **_runtime(args))


def evaluate_skip(args):
    """Evaluate every skip mode's grid points on one task (OUT/{mode}), after the baseline on the same examples."""
    from mmskip.evaluation.evaluate_skip import evaluate_skip as run

    cfg, evaluation, prompts, shares = _configs(args, "skipping", "evaluation", "prompts", "example_shares")
    _threads(args)
    run(args.task, args.scenes, args.features, args.llm, args.mapper, args.baseline, args.out, prompts, cfg,
        evaluation, shares, **_runtime(args))


def evaluate_tokens(args):
    """Evaluate every token-level kind's points on one task (OUT/{kind}), after the baseline on the same examples."""
    from mmskip.evaluation.evaluate_tokens import evaluate_tokens as run

    skipping, cfg, evaluation, prompts, shares = _configs(args, "skipping", "token_skipping", "evaluation", "prompts",
                                                          "example_shares")
    _threads(args)
    try:
        run(args.task, args.scenes, args.features, args.llm, args.mapper, args.baseline, args.out, prompts, skipping,
            cfg, evaluation, shares, **_runtime(args))
    except ValueError as err:
        raise SystemExit(f"mmskip evaluate_tokens: {err}") from None


def bench_skip(args):
    """Benchmark skip modes (decode speed vs FLOP-ideal) and batched evaluation -> results/bench/skip.json."""
    from mmskip.skipping.bench import bench_skip as run

    cfg, evaluation, prompts = _configs(args, "bench", "evaluation", "prompts")
    _threads(args)
    run(cfg, args.seed, args.out, per_task("bench_skip", "scenes", args.scenes, args.tasks),
        per_task("bench_skip", "features", args.features, args.tasks), args.llm, args.mappers, prompts, evaluation,
        tasks=tuple(args.tasks))


def prune(args):
    """Compute every mask of a data-free pruning method (magnitude, random) -> models/masks/{method}."""
    from mmskip.compression.run import prune_stage as run

    (cfg,) = _configs(args, "pruning")
    _threads(args)
    run(args.method, args.llm, args.out, cfg, args.seed)


def prune_wanda(args):
    """Compute every Wanda mask, calibrated on each task through its trained mapper -> models/masks/wanda."""
    from mmskip.compression.run import prune_stage as run

    cfg, prompts = _configs(args, "pruning", "prompts")
    _threads(args)
    run("wanda", args.llm, args.out, cfg, args.seed, scenes=per_task("prune_wanda", "scenes", args.scenes, args.tasks),
        features=per_task("prune_wanda", "features", args.features, args.tasks), mappers=args.mappers,
        tasks=tuple(args.tasks), prompts=prompts, **_runtime(args))


def subnet(args):
    """Combine the tasks' Wanda masks into the shared α-SubNet masks, with their IoU."""
    from mmskip.compression.run import subnet_stage as run

    (cfg,) = _configs(args, "subnet")
    _threads(args)
    run(args.masks, args.llm, args.out, cfg, args.calibration)


def evaluate_compressed(args):
    """Evaluate every mask of every mask set (MASKS/{name}) on one task (OUT/{name}), after the baseline."""
    from mmskip.compression.run import evaluate_compressed as run

    cfg, evaluation, prompts, shares = _configs(args, "compression", "evaluation", "prompts", "example_shares")
    _threads(args)
    try:
        run(args.task, args.masks, args.scenes, args.features, args.llm, args.mapper, args.baseline, args.out,
            prompts, cfg, evaluation, shares, **_runtime(args))
    except ValueError as err:
        raise SystemExit(f"mmskip evaluate_compressed: {err}") from None


def train_compressed(args):
    """Train a task's mapper with the compressed LLM (variant pruned, skipped, small) or the dense control."""
    from mmskip.compression.train import train_compressed as run

    mapper, prompts, cfg, shares = _configs(args, "mapper", "prompts", "train_compressed", "step_shares")
    _threads(args)
    try:
        run(args.variant, args.task, args.scenes, args.features, args.llm, args.out, args.metrics, args.seed,
            mapper, prompts, cfg, calibration=args.calibration, masks_dir=args.masks, init=args.mapper,
            checkpoint_dir=args.checkpoint_dir, shares=shares, **_runtime(args))
    except ValueError as err:
        raise SystemExit(f"mmskip train_compressed: {err}") from None


def evaluate_trained(args):
    """Inference-only vs trained-with-compression (pruned, skipped), the dense control and the smaller LLM, on one task."""
    from mmskip.compression.train import evaluate_trained as run

    cfg, train, evaluation, prompts, shares = _configs(args, "compression", "train_compressed", "evaluation", "prompts",
                                                       "example_shares")
    _threads(args)
    try:
        run(args.task, args.scenes, args.features, args.llm, args.llm_small, args.mapper,
            {v: args.trained_root / f"mapper_{v}" / args.task for v in train.variants}, args.masks, args.baseline,
            args.out, prompts, cfg, train, args.calibration, evaluation, shares, **_runtime(args))
    except ValueError as err:
        raise SystemExit(f"mmskip evaluate_trained: {err}") from None


def tasks_of(args) -> list[str]:
    return sorted({Path(d).parent.name for d in args.eval})  # results/eval/{task}/{input}


# Commands over several tasks take --scenes and --features as one path for every task or one per task, in the
# order of their tasks (--tasks; the report: params' tasks): a task with a dataset of its own (OK-VQA, GQA) reads
# its folder and its feature cache.
PER_TASK_PATHS = {"prune_wanda": ("scenes", "features"), "bench_skip": ("scenes", "features"), "report": ("scenes",)}
# Paths a command reads only for some of its params' values
OPTIONAL_PATHS = {"evaluate_trained": {
    "llm_small": "the smaller LLM (models/llm_small): given exactly when train_compressed.variants lists small",
    "masks": "the Wanda masks (models/masks/wanda): given exactly when train_compressed.variants lists pruned"}}


def per_task(command: str, flag: str, paths: Sequence[Path], tasks: Sequence[str]) -> dict[str, Path]:
    """``--<flag>`` of ``command`` as task -> path: one path for every task, or one per task in order."""
    if len(paths) == 1:
        return {task: paths[0] for task in tasks}
    if len(paths) != len(tasks):
        raise SystemExit(f"mmskip {command}: --{flag} {' '.join(map(str, paths))}: {len(paths)} paths for the "
                         f"{len(tasks)} tasks {list(tasks)}; give one for every task, or one per task in that order")
    return dict(zip(tasks, paths, strict=True))


def bench_engine(args):
    """The skip engine's speed bars on a random OPT-125m-shaped model, every batch size -> results/bench/engine.json."""
    from mmskip.skipping.bench import bench_engine as run

    (cfg,) = _configs(args, "bench_engine")
    _threads(args)
    run(cfg, args.seed, args.out)


def bench_prune(args):
    """Time and peak memory of Wanda on the default LLM and an OPT-125m-shaped model -> results/bench/prune.json."""
    from mmskip.compression.bench import bench_prune as run

    (cfg,) = _configs(args, "bench_prune")
    run(cfg, args.seed, args.out, args.llm, threads=args.threads)


def report(args):
    """Aggregate evaluations into reports/all.html and reports/summary.csv.

    Reads the paths it is given and no other: ``--params`` is shown whole, and its
    ``skipping.modes`` and ``compression.mask_sets`` name the skip-grid and compression folders to
    read (DVC cannot put a params list on a command line: it refuses to interpolate a list into
    ``cmd``); ``--dvc_yaml`` gives the lineage its stages, with the dvc.lock and git state of its
    folder when present; ``--benchmarks`` holds Snakemake's timings when present.
    """
    import yaml

    from mmskip.report.build import report as run
    from mmskip.tasks import tasks_of as params_tasks

    (cfg,) = _configs(args, "report")
    if not args.eval and args.llava_root is None:
        raise SystemExit("mmskip report: nothing to report: give --eval folders (the trained pipeline) or --llava_root "
                         "(LLaVA without training)")
    if args.lineage is not None and (args.dvc_yaml is None or args.dvc_yaml.name != "dvc.yaml"):
        raise SystemExit(f"mmskip report: --lineage needs --dvc_yaml <folder>/dvc.yaml, got {args.dvc_yaml}")
    tasks = tasks_of(args)
    declared = yaml.safe_load(args.params.read_text(encoding="utf-8"))
    scenes = per_task("report", "scenes", args.scenes, params_tasks(declared))
    # the grid params.yaml declares: every task evaluated x skipping.modes, x compression.mask_sets
    skip_dirs = [] if args.skip_root is None else [
        args.skip_root / task / mode for task in tasks for mode in declared["skipping"]["modes"]]
    compress_dirs = [] if args.compress_root is None else [
        args.compress_root / task / name for task in tasks for name in declared["compression"]["mask_sets"]]
    kinds = (declared.get("token_skipping") or {}).get("kinds", ())
    token_dirs = [] if args.tokens_root is None else [
        args.tokens_root / task / kind for task in tasks for kind in kinds]
    unwritten = [str(d) for d in (*skip_dirs, *token_dirs, *compress_dirs) if not (d / "metrics.json").is_file()]
    if unwritten:
        lists = [f"skipping.modes={declared['skipping']['modes']}",
                 *([f"token_skipping.kinds={list(kinds)}"] if token_dirs else []),
                 f"compression.mask_sets={declared['compression']['mask_sets']}"]
        raise SystemExit(
            f"mmskip report: {args.params}: {', '.join(lists[:-1])} and {lists[-1]} name runs that no stage wrote (no "
            f"metrics.json): {', '.join(unwritten)}. A dvc.yaml whose stages are written out per value (tasks with "
            "datasets of their own) must be regenerated after changing these lists (make generate, or mmskip "
            "use_config); run by hand, run their stages first")
    run(args.params, scenes, args.eval, args.foundation, args.mapper_logs, args.html, args.csv,
        benchmarks_dir=args.benchmarks, num_qualitative=cfg.num_qualitative, skip_dirs=skip_dirs,
        token_dirs=token_dirs, bench_path=args.bench, compress_dirs=compress_dirs, subnet_path=args.subnet,
        trained_dirs=[] if args.trained_root is None else [args.trained_root / task for task in tasks],
        lineage_root=None if args.lineage is None else args.dvc_yaml.parent, lineage_path=args.lineage,
        plots_dir=args.plots,
        baseline_dirs=[] if args.baseline_root is None else [args.baseline_root / task for task in tasks],
        llava_root=args.llava_root,
        seed_dirs=[] if args.seeds_root is None else [args.seeds_root / str(s) / task for s in args.seeds
                                                      for task in tasks])


def evaluate_llava(args):
    """LLaVA-1.5 without training: the skip grid (every mode of the skipping section) on a dataset folder's images."""
    from mmskip.evaluation.llava import evaluate_llava as run

    cfg, evaluation, prompts = _configs(args, "skipping", "evaluation", "prompts")
    _threads(args)
    try:
        run(args.task, args.data, args.model, args.out, prompts, cfg, evaluation, revision=args.revision,
            cache=args.cache, check=args.check_generate, **_runtime(args))
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"mmskip evaluate_llava: {err}") from None


def fetch_model(args):
    """Download a hub model at a revision into a cache, for offline jobs (run where the hub is reachable)."""
    from mmskip.foundation.hub import LLM_SHAPE, fetch, link

    if args.out is None:
        path, commit = fetch(args.id, args.revision, args.cache)
        print(f"{args.id} at {args.revision}: commit {commit}\n  {path}\npin it in a config: revision: {commit}")
        return
    expected = {key: getattr(args, key) for key in LLM_SHAPE if getattr(args, key) is not None}
    try:  # the pipeline's stage: the cache's copy when there is one, the reference folder --out
        reference = link(args.id, args.revision, args.cache, args.out, expected)
    except ValueError as err:
        raise SystemExit(f"mmskip fetch_model: {err}") from None
    print(f"{args.id} at {args.revision}: commit {reference['commit']} in {args.cache}; reference {args.out}")


def fetch_data(args):
    """Download a named source (--source, --root) or one file (--url, --hash, --out), hash-checked and resumable."""
    from mmskip.data.download import check_hash, extract, fetch
    from mmskip.data.sources import fetch_source, get_source, read_catalog

    if (args.source is None) == (args.url is None):
        raise SystemExit("fetch_data: give --source NAME --root DIR, or --url URL --out FILE (one of them)")
    if args.source is not None:
        try:
            sources = read_catalog(args.catalog)
            get_source(args.source, sources)  # an unknown name is refused with the allowed ones, before any work
        except ValueError as err:
            raise SystemExit(f"mmskip fetch_data: {err}") from None
        if args.root is None:
            raise SystemExit("fetch_data --source needs --root (the folder of downloads)")
        path = fetch_source(args.source, args.root, mirror=args.mirror, checksums=args.checksums,
                            sources=sources, retries=args.retries)
    else:
        if args.out is None:
            raise SystemExit("fetch_data --url needs --out (the file to write)")
        check_hash(args.hash)
        path = fetch(args.url, args.hash, args.out, retries=args.retries)
    if args.extract is not None:
        extract(path, args.extract)
    print(path)


def _print_counts(command: str, run, *args) -> None:
    """``run(*args)``'s counts printed as JSON; a ValueError (bad input, refused before anything is
    written) ends the command with its message."""
    from mmskip.io import dumps_json

    try:
        counts = run(*args)
    except ValueError as err:
        raise SystemExit(f"mmskip {command}: {err}") from None
    print(dumps_json(counts), end="")


def prepare_vqa(args):
    """Files in VQAv2's format taken whole (OK-VQA: train, and val as test) -> a dataset folder with its COCO images."""
    from mmskip.data.coco import prepare_vqa_folder as run

    _print_counts("prepare_vqa", run, tuple(args.train), tuple(args.test), args.out, args.images)


def prepare_gqa(args):
    """GQA's balanced question files (train, and val as the paper's test) -> a dataset folder with its images."""
    from mmskip.data.gqa import prepare_gqa_folder as run

    _print_counts("prepare_gqa", run, args.train, args.test, args.images, args.out, args.limit)


def prepare_clotho(args):
    """Clotho v2.1's caption CSVs and extracted audio -> a dataset folder of clips and five captions each."""
    from mmskip.data.clotho import prepare_clotho_folder as run

    try:
        _print_counts("prepare_clotho", run, tuple(args.captions), args.audio, args.out)
    except FileNotFoundError as err:
        raise SystemExit(f"mmskip prepare_clotho: {err}") from None


def prepare_msrvtt(args):
    """MSR-VTT as Frozen in Time's MSRVTT.zip extracts -> a dataset folder of videos and their captions."""
    from mmskip.data.msrvtt import prepare_msrvtt_folder as run

    try:
        _print_counts("prepare_msrvtt", run, args.root, args.out, args.split)
    except FileNotFoundError as err:
        raise SystemExit(f"mmskip prepare_msrvtt: {err}") from None


def prepare_msrvtt_qa(args):
    """MSRVTT-QA's question files (your folder) on MSRVTT.zip's videos -> a dataset folder of videos and questions."""
    from mmskip.data.msrvtt import prepare_msrvtt_qa_folder as run

    try:
        _print_counts("prepare_msrvtt_qa", run, args.root, args.qa, args.out)
    except FileNotFoundError as err:
        raise SystemExit(f"mmskip prepare_msrvtt_qa: {err}") from None


def prepare_clotho_aqa(args):
    """Clotho-AQA's question CSVs and extracted audio -> a dataset folder of clips and their questions."""
    from mmskip.data.clotho import prepare_clotho_aqa_folder as run

    try:
        _print_counts("prepare_clotho_aqa", run, tuple(args.questions), args.audio, args.out)
    except FileNotFoundError as err:
        raise SystemExit(f"mmskip prepare_clotho_aqa: {err}") from None


def prepare_audiocaps(args):
    """AudioCaps' caption CSVs and the user's folders of clips (YouTube-only) -> a dataset folder of the clips found."""
    from mmskip.data.audiocaps import prepare_audiocaps_folder as run

    try:
        _print_counts("prepare_audiocaps", run, tuple(args.captions), args.audio, args.clip_name, args.out)
    except FileNotFoundError as err:
        raise SystemExit(f"mmskip prepare_audiocaps: {err}") from None


def fetch_hub_dataset(args):
    """Download a hub dataset's files (--files patterns) at a revision into a cache, for offline jobs."""
    from mmskip.foundation.hub import fetch

    path, commit = fetch(args.id, args.revision, args.cache, repo_type="dataset", files=tuple(args.files))
    print(f"{args.id} at {args.revision}: commit {commit}\n  {path}\npin it in a config: revision: {commit}")


def prepare_hub_vqa(args):
    """VQAv2 from a hub Parquet snapshot (lmms-lab/VQAv2), read offline -> a dataset folder with its images."""
    from mmskip.data.hub_datasets import prepare_hub_vqa as run
    from mmskip.data.hub_datasets import resolve_dataset
    from mmskip.io import dumps_json

    try:
        snapshot = resolve_dataset(args.id, args.revision, args.cache, (f"data/{args.split}-*",))
        counts = run(snapshot, args.split, args.out, as_split=args.as_split, limit=args.limit)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"mmskip prepare_hub_vqa: {err}") from None
    print(dumps_json({"id": args.id, "revision": args.revision, "commit": snapshot.name, **counts}), end="")


def prepare_coco(args):
    """COCO at paper scale: Karpathy's dataset_coco.json and VQAv2 -> a dataset folder's annotations (restval in train)."""
    from mmskip.data.coco import prepare_coco as run
    from mmskip.io import dumps_json

    if len(args.questions) != len(args.annotations):
        raise SystemExit(f"mmskip prepare_coco: {len(args.questions)} --questions files but {len(args.annotations)} "
                         "--annotations files; give one annotation file per question file (or neither: captions only)")
    print(dumps_json(run(args.karpathy, args.questions, args.annotations, args.out, args.images)), end="")


def use_config(args):
    """Merge a config (configs/paper/*.yaml) into params.yaml and regenerate dvc.yaml: DVC's --configfile."""
    from mmskip.io import atomic_path
    from mmskip.params import load_params, read_config, use_config as run
    from mmskip.stages import render_dvc_yaml

    dvc_yaml = args.params.resolve().parent / "dvc.yaml"
    try:  # the stages of the merged params first: nothing is written when the config is refused
        text = render_dvc_yaml(dvc_yaml.parent, load_params(args.params, [args.config]))
        changed = run(read_config(args.config), args.params)
    except (OSError, ValueError) as err:
        raise SystemExit(f"mmskip use_config: {err}") from None
    with atomic_path(dvc_yaml) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(f"{args.params}: {changed} value(s) from {args.config}; {dvc_yaml} regenerated for its stages. "
          f"Back to the default: git checkout {args.params} {dvc_yaml.name}")


def estimate(args):
    """Estimated GPU-hours of every GPU stage from its FLOPs and a stated throughput (before anything runs)."""
    from mmskip.estimate import estimate as run, format_table
    from mmskip.io import atomic_path, dumps_json
    from mmskip.params import ParamsError, load_params

    try:
        try:
            params = load_params(args.params, args.configfile)
        except ParamsError as err:
            raise ValueError("invalid params:\n" + "\n".join(f"  - {p}" for p in err.problems)) from None
        result = run(params, args.tflops, args.data)
    except (OSError, ValueError) as err:
        raise SystemExit(f"mmskip estimate: {err}") from None
    print(format_table(result))
    if args.out is not None:
        with atomic_path(args.out) as tmp:
            tmp.write_text(dumps_json(result), encoding="utf-8")


def timings(args):
    """Print per-rule wall-clock times from Snakemake benchmark files."""
    from mmskip.report.build import print_timings

    print_timings(args.benchmarks)


# command -> (handler, path flags, params sections, extra flags)
COMMANDS = {
    "make_scenes": (make_scenes, ["out"], ["data"], ["seed"]),
    "make_clips": (make_clips, ["out"], ["clips"], ["seed"]),
    "make_sounds": (make_sounds, ["out"], ["sounds"], ["seed"]),
    "train_tokenizer": (train_tokenizer, ["scenes", "out"], ["tokenizer", "prompts"], ["generated"]),
    "pretrain_llm": (pretrain_llm, ["scenes", "tokenizer", "out", "metrics"], ["llm", "prompts"],
                     ["seed", "threads", "generated"]),
    "pretrain_encoder": (pretrain_encoder, ["scenes", "out", "metrics"], ["encoder"], ["seed", "threads"]),
    "pretrain_video_encoder": (pretrain_video_encoder, ["clips", "out", "metrics"], ["video_encoder"],
                               ["seed", "threads"]),
    "pretrain_audio_encoder": (pretrain_audio_encoder, ["sounds", "out", "metrics"], ["audio_encoder"],
                               ["seed", "threads"]),
    "cache_features": (cache_features, ["scenes", "encoder", "out"], ["features", "runtime"], ["threads"]),
    "train_mapper": (train_mapper, ["scenes", "features", "out", "metrics"],
                     ["mapper", "prompts", "step_shares", "runtime"],
                     ["seed", "threads", "task", "llm", "checkpoint_dir"]),
    "evaluate": (evaluate, ["scenes", "features", "mapper", "out"], ["evaluation", "prompts", "runtime"],
                 ["threads", "task", "inputs", "llm"]),
    "baseline": (baseline, ["scenes", "features", "mapper", "out"], ["evaluation", "prompts", "runtime"],
                 ["threads", "task", "llm"]),
    # the replicas of params seeds after the first: the same handlers and flags as train_mapper's and baseline's,
    # written out (mmskip.stages reads each command's handler from this dict's source, for the code dependencies)
    "train_mapper_seed": (train_mapper, ["scenes", "features", "out", "metrics"],
                          ["mapper", "prompts", "step_shares", "runtime"],
                          ["seed", "threads", "task", "llm", "checkpoint_dir"]),
    "baseline_seed": (baseline, ["scenes", "features", "mapper", "out"], ["evaluation", "prompts", "runtime"],
                      ["threads", "task", "llm"]),
    "evaluate_skip": (evaluate_skip, ["scenes", "features", "mapper", "baseline", "out"],
                      ["skipping", "evaluation", "prompts", "example_shares", "runtime"],
                      ["threads", "task", "llm"]),
    "evaluate_tokens": (evaluate_tokens, ["scenes", "features", "mapper", "baseline", "out"],
                        ["skipping", "token_skipping", "evaluation", "prompts", "example_shares", "runtime"],
                        ["threads", "task", "llm"]),
    "bench_skip": (bench_skip, ["scenes", "features", "mappers", "out"], ["bench", "evaluation", "prompts"],
                   ["seed", "threads", "llm", "tasks"]),
    "prune": (prune, ["out"], ["pruning"], ["seed", "threads", "llm", "method"]),
    "prune_wanda": (prune_wanda, ["scenes", "features", "mappers", "out"], ["pruning", "prompts", "runtime"],
                    ["seed", "threads", "llm", "tasks"]),
    "subnet": (subnet, ["out"], ["subnet"], ["threads", "llm", "masks", "calibration"]),
    "evaluate_compressed": (evaluate_compressed, ["scenes", "features", "mapper", "baseline", "out"],
                            ["compression", "evaluation", "prompts", "example_shares", "runtime"],
                            ["threads", "task", "mask_root", "llm"]),
    "train_compressed": (train_compressed, ["scenes", "features", "out", "metrics"],
                         ["mapper", "prompts", "train_compressed", "step_shares", "runtime"],
                         ["seed", "threads", "task", "llm", "checkpoint_dir", "train_variant"]),
    "evaluate_trained": (evaluate_trained, ["scenes", "features", "llm_small", "mapper", "trained_root", "masks",
                                            "baseline", "out"],
                         ["compression", "train_compressed", "evaluation", "prompts", "example_shares", "runtime"],
                         ["threads", "task", "llm", "calibration"]),
    "bench_engine": (bench_engine, ["out"], ["bench_engine"], ["seed", "threads"]),
    "bench_prune": (bench_prune, ["out"], ["bench_prune"], ["seed", "threads", "llm"]),
    "report": (report, ["params", "scenes", "html", "csv"], ["report"],
               ["eval", "training_logs", "benchmarks", "baseline_root", "skip_root", "bench", "compress_root", "subnet",
                "trained_root",
                "lineage", "llava_root"]),
    "timings": (timings, ["benchmarks"], [], []),
    "use_config": (use_config, [], [], ["params_file"]),
    "estimate": (estimate, [], [], ["estimate"]),
    "evaluate_llava": (evaluate_llava, ["data", "out"], ["skipping", "evaluation", "prompts", "runtime"],
                       ["threads", "task", "llava"]),
    "fetch_model": (fetch_model, ["cache"], [], ["hub_model", "hub_link"]),
    "fetch_data": (fetch_data, [], [], ["download"]),
    "prepare_coco": (prepare_coco, ["karpathy", "out"], [], ["vqa_files", "coco_images"]),
    "prepare_vqa": (prepare_vqa, ["out"], [], ["vqa_whole"]),
    "prepare_gqa": (prepare_gqa, ["out"], [], ["gqa_files"]),
    "prepare_msrvtt": (prepare_msrvtt, ["root", "out"], [], ["msrvtt_split"]),
    "prepare_msrvtt_qa": (prepare_msrvtt_qa, ["root", "out"], [], ["msrvtt_qa_files"]),
    "prepare_clotho": (prepare_clotho, ["out"], [], ["clotho_files"]),
    "prepare_clotho_aqa": (prepare_clotho_aqa, ["out"], [], ["clotho_aqa_files"]),
    "prepare_audiocaps": (prepare_audiocaps, ["out"], [], ["audiocaps_files"]),
    "fetch_hub_dataset": (fetch_hub_dataset, ["cache"], [], ["hub_model", "hub_files"]),
    "prepare_hub_vqa": (prepare_hub_vqa, ["cache", "out"], [], ["hub_model", "hub_split"]),
}


def build_parser() -> argparse.ArgumentParser:
    # torch-free name modules only: parsing a command loads nothing its stage does not run
    from mmskip.compression.names import CALIBRATIONS, METHODS, TRAIN_VARIANTS
    from mmskip.evaluation import INPUTS
    from mmskip.params import LLM_SHAPE_KEYS
    from mmskip.tasks import TASKS

    parser = argparse.ArgumentParser(prog="mmskip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (handler, paths, sections, extras) in COMMANDS.items():
        aliases = [name.replace("_", "-")] if "_" in name else []
        p = sub.add_parser(name, aliases=aliases, help=(handler.__doc__ or name).strip().splitlines()[0])
        p.set_defaults(handler=handler)
        for flag in paths:
            if flag in PER_TASK_PATHS.get(name, ()):
                p.add_argument(f"--{flag}", type=Path, nargs="+", required=True,
                               help="one for every task, or one per task in the order of the tasks")
            elif flag in OPTIONAL_PATHS.get(name, {}):
                p.add_argument(f"--{flag}", type=Path, default=None, help=OPTIONAL_PATHS[name][flag])
            else:
                p.add_argument(f"--{flag}", type=Path, required=True)
        if "seed" in extras:
            p.add_argument("--seed", type=int, required=True, help="seed (params.yaml `seed`)")
        if "threads" in extras:
            p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
        if "generated" in extras:
            p.add_argument("--clips", type=Path, default=None,
                           help="the generated clips (make_clips), whose texts join the scenes' (the video tasks)")
            p.add_argument("--sounds", type=Path, default=None,
                           help="the generated sounds (make_sounds), whose texts join the scenes' (the audio tasks)")
        if "task" in extras:
            p.add_argument("--task", required=True, choices=list(TASKS))
        if "tasks" in extras:
            p.add_argument("--tasks", nargs="+", required=True, choices=list(TASKS),
                           help="params `tasks`: one mapper each under --mappers")
        if "method" in extras:
            p.add_argument("--method", required=True, choices=[m for m in METHODS if m != "wanda"])
        if "masks" in extras:
            p.add_argument("--masks", type=Path, required=True,
                           help="a mask set, models/masks/{name}: a pruning method's or the α-SubNet's (subnet)")
        if "mask_root" in extras:
            p.add_argument("--masks", type=Path, required=True,
                           help="models/masks: reads {name} for every mask set of compression.mask_sets")
        if "calibration" in extras:
            p.add_argument("--calibration", required=True, choices=CALIBRATIONS,
                           help="pruning.calibration: which Wanda masks are read")
        if "train_variant" in extras:  # each variant reads its own inputs (mmskip.compression.train)
            p.add_argument("--variant", required=True, choices=TRAIN_VARIANTS)
            p.add_argument("--mapper", type=Path, default=None,
                           help="the trained baseline mapper (train_compressed.init baseline; not the small variant)")
            p.add_argument("--masks", type=Path, default=None, help="models/masks/wanda (variant pruned)")
            p.add_argument("--calibration", default=None, choices=CALIBRATIONS,
                           help="pruning.calibration: which Wanda mask the pruned variant reads")

        if "hub_model" in extras:
            p.add_argument("--id", required=True, help="hub id, organisation/name")
            p.add_argument("--revision", default="main", help="commit, branch or tag (default: main)")
        if "hub_link" in extras:
            p.add_argument("--out", type=Path, default=None,
                           help="also write a reference folder here (out/hub.json: id, revision, commit, cache), which "
                                "the pipeline's stages load as the model, offline (the fetch_model stage)")
            for key in LLM_SHAPE_KEYS:
                p.add_argument(f"--{key}", type=int, default=None,
                               help="with --out: the shape params declare, checked against the model's config.json")
        if "llava" in extras:
            p.add_argument("--model", required=True,
                           help="a LLaVA-1.5 checkpoint folder, or a hub id (llava-hf/llava-1.5-7b-hf) with --cache")
            p.add_argument("--revision", default=None, help="with --cache: the commit (or branch) fetched")
            p.add_argument("--cache", type=Path, default=None,
                           help="the hub cache mmskip fetch_model filled; read offline")
            p.add_argument("--check_generate", type=int, default=8,
                           help="first N examples also decoded by LlavaForConditionalGeneration.generate, "
                                "agreement recorded in run.json (0: none)")
        if "vqa_whole" in extras:
            for split, files in (("train", "OK-VQA's train"), ("test", "OK-VQA's val, which the paper evaluates on")):
                p.add_argument(f"--{split}", type=Path, nargs=2, required=True, metavar=("QUESTIONS", "ANNOTATIONS"),
                               help=f"the questions and annotations files of split {split} ({files})")
            p.add_argument("--images", type=Path, nargs="+", required=True,
                           help="the extracted COCO train2014/ and val2014/ folders, linked under out/images (each "
                                "questions file names its folder as data_subtype); every image asked about is checked")
        if "gqa_files" in extras:
            p.add_argument("--train", type=Path, nargs="+", required=True,
                           help="GQA question files of split train, e.g. train_balanced_questions.json")
            p.add_argument("--test", type=Path, nargs="+", required=True,
                           help="GQA question files of split test: val_balanced_questions.json (the paper's code "
                                "evaluates on GQA's valid)")
            p.add_argument("--images", type=Path, required=True,
                           help="the extracted images.zip's folder of {imageId}.jpg, linked under out/images; every "
                                "image asked about is checked")
            p.add_argument("--limit", type=int, default=0, help="first N questions by id of each split (0: all)")
        if "msrvtt_split" in extras:
            p.add_argument("--split", "--msrvtt_split", default="full", choices=["full", "jsfusion"],
                           help="full: MSR-VTT's own split (train, val, test lists); jsfusion: its 9000 training "
                                "videos and the 1k-A test, no val")
        if "clotho_files" in extras:
            p.add_argument("--captions", type=Path, nargs=3, required=True,
                           metavar=("DEVELOPMENT", "VALIDATION", "EVALUATION"),
                           help="clotho_captions_{development,validation,evaluation}.csv, in that order: splits "
                                "train, val and test")
            p.add_argument("--audio", type=Path, nargs="*", default=[],
                           help="the extracted clotho_audio_*.7z folders (development/, validation/, evaluation/), "
                                "linked under out/audio; every clip listed is checked")
        if "msrvtt_qa_files" in extras:
            p.add_argument("--qa", "--msrvtt_qa", type=Path, required=True,
                           help="your folder of MSRVTT-QA's train_qa.json, val_qa.json and test_qa.json")
        if "clotho_aqa_files" in extras:
            p.add_argument("--questions", type=Path, nargs=3, required=True, metavar=("TRAIN", "VAL", "TEST"),
                           help="clotho_aqa_{train,val,test}.csv, in that order")
            p.add_argument("--audio", type=Path, default=None,
                           help="the extracted audio_files.zip's audio_files/ folder, linked under out/audio; every "
                                "clip asked about is checked")
        if "audiocaps_files" in extras:
            p.add_argument("--captions", type=Path, nargs=3, required=True, metavar=("TRAIN", "VAL", "TEST"),
                           help="AudioCaps' train.csv, val.csv and test.csv (github.com/cdjkim/audiocaps), in that "
                                "order")
            p.add_argument("--audio", "--audiocaps_audio", type=Path, nargs="+", required=True,
                           help="the folders holding your AudioCaps clips, linked under out/audio; each clip is "
                                "looked for in them in order, and those missing are listed in "
                                "annotations/missing_{split}.json")
            p.add_argument("--clip_name", "--audiocaps_clip_name", required=True,
                           help="the clips' file name over the CSV's columns, e.g. '{youtube_id}.wav', "
                                "'Y{youtube_id}.wav' or '{youtube_id}_{start_time}.wav'")
        if "hub_files" in extras:
            p.add_argument("--files", nargs="*", default=[],
                           help="glob patterns of the files to fetch, e.g. 'data/validation-*' (none: all)")
        if "hub_split" in extras:
            p.add_argument("--split", default="validation", help="the hub split (data/{split}-*.parquet)")
            p.add_argument("--as_split", default="test", choices=["train", "val", "test"],
                           help="the pipeline split it becomes (evaluation.split)")
            p.add_argument("--limit", type=int, default=0, help="first N questions in file order (0: all)")
        if "download" in extras:
            p.add_argument("--source", default=None, help="a source of mmskip.data.sources (with --root)")
            p.add_argument("--root", type=Path, default=None, help="folder of the sources' downloads")
            p.add_argument("--catalog", nargs="?", default=None, const=None,
                           help="a YAML file of {name: {url, md5}} replacing those built-in sources (a site's copies)")
            p.add_argument("--mirror", nargs="?", default=None, const=None,
                           help="http(s)://host[:port] replacing the source's (none, or the flag alone: the publisher)")
            p.add_argument("--checksums", type=Path, default=Path("workflow/checksums.yaml"),
                           help="sha256 of the sources without a published checksum (recorded on first download)")
            p.add_argument("--url", default=None)
            p.add_argument("--out", type=Path, default=None)
            p.add_argument("--hash", default=None, help="md5:<hex> or sha256:<hex> (omit only for a first download)")
            p.add_argument("--retries", type=int, default=3, help="resumed attempts after an interrupted transfer")
            p.add_argument("--extract", type=Path, default=None, help="folder to extract a zip or tar archive into")
        if "vqa_files" in extras:
            p.add_argument("--questions", type=Path, nargs="*", default=[],
                           help="VQAv2 question files (none: captions only)")
            p.add_argument("--annotations", type=Path, nargs="*", default=[],
                           help="VQAv2 annotation files, one per question file")
        if "estimate" in extras:
            p.add_argument("--params", type=Path, default=Path("params.yaml"))
            p.add_argument("--configfile", type=Path, nargs="*", default=[],
                           help="configs merged over --params in order, as Snakemake's --configfile")
            p.add_argument("--tflops", type=float, required=True,
                           help="the sustained throughput of one GPU in the run's dtype, TFLOP/s (a stated assumption, "
                                "e.g. 40%% of the device's dense peak)")
            p.add_argument("--data", type=Path, default=None,
                           help="the dataset folder (data/coco) once prepared: its sizes, counted")
            p.add_argument("--out", type=Path, default=None, help="also write the estimate as JSON here")
        if "params_file" in extras:
            p.add_argument("config", type=Path,
                           help="a config of params.yaml sections, e.g. configs/paper/clip-opt-2.7b.yaml")
            p.add_argument("--params", type=Path, default=Path("params.yaml"),
                           help="the params file to merge into (its folder's dvc.yaml is regenerated)")
        if "coco_images" in extras:
            p.add_argument("--images", type=Path, nargs="*", default=[],
                           help="the extracted train2014/ and val2014/ folders, linked under out/images; every image "
                                "of the split is then checked (the missing are listed)")
        if "inputs" in extras:
            p.add_argument("--inputs", nargs="+", choices=INPUTS, default=list(INPUTS),
                           help="each into OUT/{input} (default: all) - multimodal: the cached perceptual tokens; "
                                "blind: the mapper's input zeroed")
        if "llm" in extras:
            p.add_argument("--llm", required=True, help="LLM folder or hub name (from_pretrained)")
        if "eval" in extras:
            p.add_argument("--eval", type=Path, nargs="+", default=[],
                           help="evaluation folders results/eval/{task}/{input} (none: LLaVA's grids alone, "
                                "--llava_root)")
        if "training_logs" in extras:
            p.add_argument("--foundation", type=Path, default=None,
                           help="results/foundation: the pretraining metrics of the pipeline's own models")
            p.add_argument("--mapper_logs", type=Path, default=None,
                           help="results/mapper: each task's training metrics")
        if "benchmarks" in extras:
            p.add_argument("--benchmarks", type=Path, default=None)
        if "baseline_root" in extras:
            p.add_argument("--baseline_root", type=Path, default=None,
                           help="results/baseline: reads {task}, the baseline decodes (checked against --eval)")
        if "skip_root" in extras:
            p.add_argument("--skip_root", type=Path, default=None,
                           help="results/skip: reads {task}/{mode} for every mode of the params' skipping.modes")
        if "skip_root" in extras:
            p.add_argument("--seeds_root", type=Path, default=None,
                           help="results/seeds: reads {seed}/{task} for every seed of --seeds, the replicas' "
                                "baseline decodes (params seeds after the first)")
            p.add_argument("--seeds", type=int, nargs="*", default=[],
                           help="the replicas' seeds (params seeds after the first)")
            p.add_argument("--tokens_root", type=Path, default=None,
                           help="results/tokens: reads {task}/{kind} for every kind of the params' "
                                "token_skipping.kinds")
        if "llava_root" in extras:
            p.add_argument("--llava_root", type=Path, default=None,
                           help="results/llava: LLaVA-1.5's grids without training, {task}/run.json and its modes "
                                "(mmskip evaluate_llava); none: no LLaVA subsection")
        if "compress_root" in extras:
            p.add_argument("--compress_root", type=Path, default=None,
                           help="results/compress: reads {task}/{mask_set} for every mask set of compression.mask_sets")
        if "trained_root" in extras:
            p.add_argument("--trained_root", type=Path, default=None, help="results/trained: reads {task}")
        if "subnet" in extras:
            p.add_argument("--subnet", type=Path, default=None, help="models/masks/subnet/subnet.json")
        if "bench" in extras:
            p.add_argument("--bench", type=Path, default=None, help="results/bench/skip.json")
        if "checkpoint_dir" in extras:
            p.add_argument("--checkpoint_dir", type=Path, default=None,
                           help="resumable checkpoints every mapper.checkpoint_every steps, outside the outputs "
                                "(checkpoints/<rule>/<task>); removed on success. Default: no checkpoints")
        if "lineage" in extras:
            p.add_argument("--lineage", type=Path, default=None,
                           help="reports/lineage.json: the lineage of every stage of --dvc_yaml")
            p.add_argument("--dvc_yaml", type=Path, default=None,
                           help="dvc.yaml, whose stages the lineage describes (with the dvc.lock and git state of its "
                                "folder, when present)")
            p.add_argument("--plots", type=Path, default=None, help="reports/plots: plot tables for `dvc plots show`")
        for section in sections:
            add_dataclass_args(p, SECTION_CONFIGS[section], group=f"{section} parameters")
    return parser


def main(argv: list[str] | None = None) -> None:
    if argv is None:  # a process of its own: under `python -m mmskip.worker` ($MMSKIP_WORKER), a warm start
        status = forward(sys.argv[1:])
        if status is not None:
            raise SystemExit(status)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.handler(args)


if __name__ == "__main__":
    main()

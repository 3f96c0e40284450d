"""GPU-hours of every stage, estimated before anything runs: the FLOPs each GPU stage executes, from the
models' shapes and the params, divided by a stated sustained throughput.

``mmskip estimate --tflops 300 --configfile configs/paper/clip-opt-2.7b.yaml`` prints one row per stage
that runs on ``runtime.device`` (``Stage.gpu``): its jobs, the FLOPs they execute and the GPU-hours at that
throughput; ``--out`` writes the same as JSON. The other stages (downloads, data-free pruning, the
α-SubNet, the report) need no GPU.

FLOPs are counted as the skip engine counts them (:mod:`mmskip.skipping.accounting`): a multiply or an
add; per token and layer the q, k, v and output projections, the feed-forward matrices, and attention
over every key of the step (a prefill of S tokens: S keys for each); the LM head where logits are used
(the last prompt position, then each decoded token). :func:`generation_flops` equals the engine's count
of an unskipped decode exactly (tests/test_estimate.py). What the estimate assumes, listed in its output:

- the lengths of prompts and targets (``LENGTHS``), and the mapper's query tokens before them;
- every generation runs to its token limit (an upper bound: answers stop at their end token);
- ``num_beams`` multiplies Hugging Face generate's FLOPs (evaluate); the engine decodes greedily;
- training a mapper runs the frozen LLM forward and backward to its inputs: about two forwards (no weight
  gradients), and the mapper forward and backward (three of its forwards);
- every skip-grid point is counted at the unskipped model's FLOPs (an upper bound: the report gives each
  point's executed fraction), and a pruning mask saves no FLOPs on dense kernels;
- the dataset's sizes: counted from its folder when given (``--data``), else the embedded default's from
  params, or COCO's published Karpathy split with VQAv2's questions per image (``COCO``).

The shapes are read from each hub model's config.json (from the cache, or that file alone from the hub),
and from params for the embedded default's models.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

# per task format: tokens of a prompt's text and of a target (answer, caption), besides the mapper's queries
LENGTHS = {"vqa": {"prompt": 12, "target": 3}, "caption": {"prompt": 2, "target": 14}}
CAPTIONS_PER_IMAGE = 5  # the scenes' and COCO's (Karpathy: 5.0 on average)
# COCO 2014 in Karpathy's split (restval in train) and VQAv2's questions per image (658,111 questions on
# 123,287 train2014 and val2014 images)
COCO = {"images": {"train": 113287, "val": 5000, "test": 5000}, "questions_per_image": 658111 / 123287}
GATED = ("llama", "mistral", "qwen2", "gemma")  # model types whose feed-forward has three matrices


@dataclass(frozen=True)
class Shape:
    """What a decoder's FLOPs per token depend on; ``source`` says where it was read."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    ffn_matrices: int  # 2 (OPT, ViT: up and down) or 3 (LLaMA: gate, up and down)
    vocab: int
    source: str

    @classmethod
    def of_config(cls, config: Mapping[str, Any], source: str) -> Shape:
        """From a Hugging Face config.json (OPT, LLaMA/Vicuna, ViT, CLIP's vision tower)."""
        config = config.get("vision_config", config)  # a whole CLIP checkpoint: its vision tower
        heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        gated = config.get("model_type") in GATED  # gate, up and down projections
        return cls(config["num_hidden_layers"], hidden, heads, config.get("num_key_value_heads") or heads,
                   config.get("head_dim") or hidden // heads, config.get("ffn_dim") or config["intermediate_size"],
                   3 if gated else 2, config.get("vocab_size", 0), source)

    def layer_flops(self) -> int:
        """Projections and feed-forward of one layer, per token."""
        projections = 2 * self.hidden * self.head_dim * (self.heads + 2 * self.kv_heads) \
            + 2 * self.heads * self.head_dim * self.hidden
        return projections + 2 * self.ffn_matrices * self.hidden * self.ffn

    def attention_flops_per_key(self) -> int:
        return 4 * self.heads * self.head_dim  # q k^T and a v

    def forward(self, tokens: int, keys: int, logits: int) -> int:
        """One forward step of ``tokens`` new positions attending ``keys`` keys each, logits at ``logits``."""
        return self.layers * (tokens * self.layer_flops() + tokens * keys * self.attention_flops_per_key()) \
            + logits * 2 * self.hidden * self.vocab


def generation_flops(shape: Shape, batch: int, prompt: int, new_tokens: int) -> int:
    """A decode of ``new_tokens`` after prompts of ``prompt`` positions (left-padded to it), with the KV
    cache: the prefill (logits at the last position), then a step per further token."""
    total = shape.forward(batch * prompt, prompt, batch)
    for step in range(1, new_tokens):
        total += shape.forward(batch, prompt + step, batch)
    return total


def training_flops(shape: Shape, sequence: int) -> int:
    """The frozen LLM's forward and backward to its inputs over one sequence: about two forwards."""
    return 2 * shape.forward(sequence, sequence, sequence)


def encoder_flops(shape: Shape, tokens: int, patch_pixels: int) -> int:
    """One image through the encoder: its patch embedding, then every layer over all its tokens."""
    return 2 * (tokens - 1) * 3 * patch_pixels * shape.hidden + shape.forward(tokens, tokens, 0)


def mapper_flops(params: Mapping[str, Any], encoder_dim: int, visual_tokens: int, llm_dim: int) -> int:
    """One example through the mapper (:class:`mmskip.mapper.model.Mapper`): the input projection, its layers
    over the visual and query tokens, and the output projection of the queries."""
    m = params["mapper"]
    width, queries = m["hidden_size"], m["num_query_tokens"]
    tokens = visual_tokens + queries
    layer = Shape(m["num_layers"], width, m["num_heads"], m["num_heads"], width // m["num_heads"],
                  m["ffn_dim"], 2, 0, "params mapper")
    return 2 * visual_tokens * encoder_dim * width + layer.forward(tokens, tokens, 0) + 2 * queries * width * llm_dim


def dataset_sizes(params: Mapping[str, Any], data: Path | None = None) -> dict[str, dict[str, int]]:
    """Images, VQA questions and captions per split of the run's dataset (its tasks all read it: a task of a
    dataset of its own, OK-VQA or GQA, is refused, naming it)."""
    from mmskip.data.formats import scenes_paths
    from mmskip.io import read_json
    from mmskip.tasks import TASKS, tasks_of

    own = [t for t in tasks_of(params) if t in TASKS and TASKS[t].dataset]
    if own:
        raise ValueError(f"tasks {own} read datasets of their own ({', '.join(TASKS[t].dataset for t in own)}), "
                         "whose sizes the estimate does not know (it has COCO's published ones and the scenes'): "
                         "leave them out of tasks to estimate the others")
    sizes = {}
    for split in ("train", "val", "test"):
        paths = scenes_paths(data, split) if data is not None else None
        if paths is not None and paths["captions"].is_file():
            captions = read_json(paths["captions"])
            questions = read_json(paths["vqa_questions"])["questions"] if paths["vqa_questions"].is_file() else []
            sizes[split] = {"images": len(captions["images"]), "questions": len(questions),
                            "captions": len(captions["annotations"])}
        elif params["sources"]["data"] == "coco":
            images = COCO["images"][split]
            sizes[split] = {"images": images, "questions": round(images * COCO["questions_per_image"]),
                            "captions": images * CAPTIONS_PER_IMAGE}
        else:
            images = params["data"][f"num_{split}"]
            sizes[split] = {"images": images, "questions": images * params["data"]["questions_per_image"],
                            "captions": images * CAPTIONS_PER_IMAGE}
    return sizes


def hub_config(params: Mapping[str, Any], model: str) -> tuple[dict, str]:
    """The config.json of the hub model ``model`` (``llm``, ``llm_small``, ``encoder``) and where it was read:
    its snapshot in ``sources.hub_cache`` once fetched, else that file alone, downloaded into the cache's
    ``configs/`` (kilobytes: the estimate runs on the login node before anything is fetched; kept apart so that
    no job mistakes it for the model's snapshot)."""
    from mmskip.foundation.hub import MissingModelError, resolve
    from mmskip.io import read_json

    repo_id, revision = params["sources"][model], params["sources"][f"{model}_revision"]
    cache = Path(params["sources"]["hub_cache"])
    try:
        path = resolve(repo_id, revision, cache)
        return read_json(path / "config.json"), f"{repo_id} at {path.name}"
    except MissingModelError:
        pass
    from huggingface_hub import hf_hub_download

    try:
        file = Path(hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=cache / "configs"))
    except Exception as err:  # offline (HF_HUB_OFFLINE), unreachable, or no such revision
        raise ValueError(f"{model} {repo_id} at {revision}: its config.json is not in {cache} and could not be "
                         f"downloaded ({type(err).__name__}); run the estimate where the hub is reachable, or fetch "
                         f"the model first: mmskip fetch_model --id {repo_id} --revision {revision} --cache {cache}"
                         ) from None
    return read_json(file), f"{repo_id} at {file.parent.name} (config.json alone)"


SIZED_MODELS = ("llm", "llm_small", "encoder")  # the image tasks' models, whose FLOPs the estimate counts


def model_shape(params: Mapping[str, Any], model: str, configs: Mapping[str, tuple[dict, str]]) -> Shape:
    """The shape of ``llm``, ``llm_small`` or ``encoder``: a hub model's config.json (``configs``, from
    :func:`hub_config`), else the shape its params section declares (the embedded default's models, with its
    tokenizer's vocabulary)."""
    if model in configs:
        return Shape.of_config(*configs[model])
    if model == "encoder":
        e = params["encoder"]
        return Shape(e["num_layers"], e["hidden_size"], e["num_heads"], e["num_heads"],
                     e["hidden_size"] // e["num_heads"], e["mlp_dim"], 2, 0, "params encoder")
    s = params[model]
    return Shape(s["num_layers"], s["hidden_size"], s["num_heads"], s["num_heads"], s["hidden_size"] // s["num_heads"],
                 s["ffn_dim"], 2, params["tokenizer"]["vocab_size"], f"params {model}")


def encoder_geometry(params: Mapping[str, Any], configs: Mapping[str, tuple[dict, str]]) -> tuple[int, int]:
    """(tokens per image, pixels per patch): the hub encoder's config, else the embedded ViT's params."""
    if "encoder" in configs:
        config = configs["encoder"][0]
        config = config.get("vision_config", config)
        size, patch = config["image_size"], config["patch_size"]
    else:
        size, patch = params["data"]["image_size"], params["encoder"]["patch_size"]
    return (size // patch) ** 2 + 1, patch * patch


def estimate(params: Mapping[str, Any], tflops: float, data: Path | None = None) -> dict[str, Any]:
    """FLOPs and GPU-hours of every GPU stage of ``params`` (a merged config) at ``tflops`` TFLOP/s."""
    from mmskip.params import SkippingConfig
    from mmskip.skipping.grid import grid_points
    from mmskip.stages import stage_table, tasks_of, variants_of
    from mmskip.tasks import VQA, get_task, scaled  # the task registry: each task's format

    if not (isinstance(tflops, (int, float)) and math.isfinite(tflops) and tflops > 0):
        raise ValueError(f"tflops={tflops!r}: allowed a sustained throughput above 0 (TFLOP/s of one GPU)")
    if params["sources"].get("llava"):
        return estimate_llava(params, tflops, data)
    # each read once: the models the estimate sizes (an audio or video task reads a dataset it has no sizes of)
    configs = {m: hub_config(params, m) for m in SIZED_MODELS if params["sources"][m]}
    llm, small, encoder = (model_shape(params, m, configs) for m in ("llm", "llm_small", "encoder"))
    visual, patch_pixels = encoder_geometry(params, configs)
    sizes = dataset_sizes(params, data)
    ev, m, sk, comp, tc, pr = (params[k] for k in ("evaluation", "mapper", "skipping", "compression",
                                                   "train_compressed", "pruning"))
    split = sizes[ev["split"]]
    queries = m["num_query_tokens"]
    tasks = tasks_of(params)
    formats = {t: get_task(t).format for t in tasks}  # every fact of a task is its format's
    limit = {t: ev[f.max_new_tokens_key] for t, f in formats.items()}
    examples = {t: split["questions"] if f is VQA else split["images"] for t, f in formats.items()}
    prompt = {t: queries + LENGTHS[f.name]["prompt"] for t, f in formats.items()}
    sequence = {t: prompt[t] + LENGTHS[f.name]["target"] for t, f in formats.items()}
    mapper = {name: mapper_flops(params, encoder.hidden, visual, shape.hidden) for name, shape in
              (("llm", llm), ("llm_small", small))}

    def decode(task: str, n: int, shape: Shape = llm, beams: int = 1, name: str = "llm") -> int:
        return beams * n * generation_flops(shape, 1, prompt[task], limit[task]) + n * mapper[name]

    def train(task: str, steps: int, shape: Shape = llm, name: str = "llm") -> int:
        return steps * m["batch_size"] * (training_flops(shape, sequence[task]) + 3 * mapper[name])

    def first(n: int, task: str) -> int:
        return examples[task] if n == 0 else min(n, examples[task])

    variants = variants_of(params)  # train_compressed.variants: small trains on the smaller LLM, the others fine-tune
    tuned = sum(1 for v in variants if v != "small")
    decodes = sum({"dense": 1, "pruned": 2, "skipped": 2}.get(v, 0) for v in variants)
    shares = params["step_shares"]  # each modality's share of its format's training steps
    steps = {t: get_task(t).steps(m, shares) for t in tasks}
    finetune = {t: get_task(t).steps(tc, shares, "finetune_") for t in tasks} \
        if tc["init"] == "baseline" else steps  # from scratch: the mapper's own steps
    small_steps = {t: get_task(t).steps(tc, shares, "small_") or steps[t] for t in tasks}  # 0: the mapper's own
    skip_cfg = SkippingConfig(**sk)
    # each modality's share of the examples the grids evaluate (params example_shares); 0: all
    seen = {t: get_task(t).share(params["example_shares"]) for t in tasks}
    grid = {t: 0 if sk["grid"] == "full" else scaled(sk[f.limit_key], seen[t]) for t, f in formats.items()}
    points = sum(len(grid_points(skip_cfg, mode, llm.layers)) for mode in sk["modes"])
    sets = {"magnitude": len(pr["sparsities"]) + len(pr["nm_patterns"]),
            "random": len(pr["sparsities"]) + len(pr["nm_patterns"]),
            "wanda": len(pr["sparsities"]) + len(pr["nm_patterns"])
            + len([c for c in pr["calibration_modes"] if c != pr["calibration"]]),
            "subnet": len(params["subnet"]["rules"])}
    compressed = {t: first(scaled(comp[f.limit_key], seen[t]), t) for t, f in formats.items()}
    images = sum(s["images"] for s in sizes.values())
    tk = params["token_skipping"]  # the token grid: its points, the token engine's unplanned decode, calibration
    token_points = sum({"visual_exit": len(tk["visual_exit_layers"]),
                        "fastv": len(tk["fastv_layers"]) * len(tk["fastv_keep"]),
                        "early_exit": len(tk["early_exit_layers"]) * len(tk["exit_rates"])}[k] for k in tk["kinds"])
    calibrations = len(tk["early_exit_layers"]) if "early_exit" in tk["kinds"] else 0
    replicas = len(params.get("seeds", [0])) - 1  # each seed after the first: every mapper again, its baseline
    flops = {
        "cache_features": (1, images * encoder_flops(encoder, visual, patch_pixels)),
        "train_mapper": (len(tasks), sum(train(t, steps[t]) for t in tasks)),
        "evaluate": (len(tasks), 2 * sum(decode(t, examples[t], beams=ev["num_beams"]) for t in tasks)),
        "baseline": (len(tasks), sum(decode(t, examples[t]) for t in tasks)),
        "evaluate_skip": (len(tasks), points * sum(decode(t, first(grid[t], t)) for t in tasks)),
        "evaluate_tokens": (len(tasks), sum((token_points + 1) * decode(t, first(grid[t], t))
                                            + calibrations * decode(t, tk["calibration_examples"]) for t in tasks)),
        "train_mapper_seed": (replicas * len(tasks), replicas * sum(train(t, steps[t]) for t in tasks)),
        "baseline_seed": (replicas * len(tasks), replicas * sum(decode(t, examples[t]) for t in tasks)),
        "prune_wanda": (1, sets["wanda"] * len(tasks) * pr["num_calibration"]
                        * max(llm.forward(sequence[t], sequence[t], 0) for t in tasks)),
        "evaluate_compressed": (len(tasks),
                                sum(sets[s] for s in comp["mask_sets"]) * sum(decode(t, compressed[t]) for t in tasks)),
        "train_compressed": (len(variants) * len(tasks),
                             sum(tuned * train(t, finetune[t])
                                 + (train(t, small_steps[t], small, "llm_small") if "small" in variants else 0)
                                 for t in tasks)),
        # dense/trained, and inference-only and trained for pruned and skipped, on the LLM; small/trained on its own
        "evaluate_trained": (len(tasks), sum(decodes * decode(t, compressed[t])
                                             + (decode(t, compressed[t], small, name="llm_small")
                                                if "small" in variants else 0)
                                             for t in tasks)),
    }
    gpu_stages = [s.name for s in stage_table(params) if s.gpu]
    rows = [{"stage": name, "jobs": flops[name][0], "pflop": flops[name][1] / 1e15,
             "gpu_hours": flops[name][1] / (tflops * 1e12) / 3600} for name in gpu_stages]
    missing = set(gpu_stages) - set(flops)
    if missing:
        raise ValueError(f"no estimate for the GPU stages {sorted(missing)}")
    return {"tflops": tflops, "device": params["runtime"]["device"], "dtype": params["runtime"]["dtype"],
            "shapes": {"llm": asdict(llm), "llm_small": asdict(small), "encoder": asdict(encoder)},
            "visual_tokens": visual, "dataset": sizes, "grid_points": points, "lengths": LENGTHS,
            "assumptions": [
                "every generation runs to its token limit (an upper bound)",
                "every skip-grid point at the unskipped FLOPs (an upper bound); masks save no dense FLOPs",
                "training: the frozen LLM's forward and backward to its inputs = 2 forwards; the mapper's = 3",
                f"prompt and target tokens besides the {queries} queries: {json.dumps(LENGTHS)}"],
            "stages": rows, "total_pflop": sum(r["pflop"] for r in rows),
            "total_gpu_hours": sum(r["gpu_hours"] for r in rows)}


LLAVA_TEMPLATE_TOKENS = 12  # "USER: <image>\n{prompt} ASSISTANT:" besides the image's tokens and the prompt


def estimate_llava(params: Mapping[str, Any], tflops: float, data: Path | None = None) -> dict[str, Any]:
    """LLaVA-1.5 without training (``sources.llava``): evaluate_llava's jobs, one per task, each running the
    vision tower and projector once per example and its language model once per grid point and the unskipped
    decode (``points[0]``)."""
    from transformers import AutoConfig

    from mmskip.params import SkippingConfig
    from mmskip.skipping.grid import grid_points
    from mmskip.stages import stage_table, tasks_of
    from mmskip.tasks import VQA, get_task

    raw, source = hub_config(params, "llava")
    config = AutoConfig.for_model(**raw).to_dict()  # the defaults its config.json leaves out (llava-hf's LLaMA)
    lm = Shape.of_config(config["text_config"], f"{source}, text_config")
    vision = Shape.of_config(config["vision_config"], f"{source}, vision_config")
    size, patch = config["vision_config"]["image_size"], config["vision_config"]["patch_size"]
    image_tokens = (size // patch) ** 2  # the "default" feature strategy drops the CLS token
    tower = encoder_flops(vision, image_tokens + 1, patch * patch) \
        + image_tokens * 2 * (vision.hidden * lm.hidden + lm.hidden * lm.hidden)  # the two-layer projector
    sizes = dataset_sizes(params, data)
    ev, sk = params["evaluation"], params["skipping"]
    split = sizes[ev["split"]]
    points = 1 + sum(len(grid_points(SkippingConfig(**sk), mode, lm.layers)) for mode in sk["modes"])
    total = 0
    tasks = tasks_of(params)
    for task in tasks:
        f = get_task(task).format
        available = split["questions"] if f is VQA else split["images"]
        n = available if sk["grid"] == "full" or sk[f.limit_key] == 0 else min(sk[f.limit_key], available)
        prompt = image_tokens + LLAVA_TEMPLATE_TOKENS + LENGTHS[f.name]["prompt"]
        total += n * (tower + points * generation_flops(lm, 1, prompt, ev[f.max_new_tokens_key]))
    gpu_stages = [s.name for s in stage_table(params) if s.gpu]
    if gpu_stages != ["evaluate_llava"]:
        raise ValueError(f"no estimate for the GPU stages {gpu_stages} of a sources.llava run")
    rows = [{"stage": "evaluate_llava", "jobs": len(tasks), "pflop": total / 1e15,
             "gpu_hours": total / (tflops * 1e12) / 3600}]
    return {"tflops": tflops, "device": params["runtime"]["device"], "dtype": params["runtime"]["dtype"],
            "shapes": {"llm": asdict(lm), "encoder": asdict(vision)}, "visual_tokens": image_tokens,
            "dataset": sizes, "grid_points": points - 1, "lengths": LENGTHS,
            "assumptions": [
                "every generation runs to its token limit (an upper bound)",
                "every skip-grid point at the unskipped FLOPs (an upper bound)",
                "the vision tower's every layer and the projector once per example",
                f"prompt tokens: the image's {image_tokens}, LLaVA's template ({LLAVA_TEMPLATE_TOKENS}) and the "
                f"text: {json.dumps(LENGTHS)}"],
            "stages": rows, "total_pflop": rows[0]["pflop"], "total_gpu_hours": rows[0]["gpu_hours"]}


def format_table(result: Mapping[str, Any]) -> str:
    lines = [f"GPU-hours at a sustained {result['tflops']:g} TFLOP/s per GPU ({result['device']}, {result['dtype']}); "
             f"LLM {result['shapes']['llm']['source']}, encoder {result['shapes']['encoder']['source']}",
             f"{'stage':<22}{'jobs':>6}{'PFLOP':>14}{'GPU-hours':>12}"]
    for row in result["stages"]:
        lines.append(f"{row['stage']:<22}{row['jobs']:>6}{row['pflop']:>14.4g}{row['gpu_hours']:>12.4g}")
    lines.append(f"{'total':<22}{'':>6}{result['total_pflop']:>14.4g}{result['total_gpu_hours']:>12.4g}")
    lines += [f"assumed: {a}" for a in result["assumptions"]]
    return "\n".join(lines)

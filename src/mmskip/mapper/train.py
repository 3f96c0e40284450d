"""Train one mapper per task against the frozen LLM, reading cached encoder features.

Loss on answer / caption tokens only; AdamW with linear warmup and cosine decay. The LLM
and the encoder stay frozen; only the mapper's parameters receive gradients.

Training is resumable: every ``checkpoint_every`` steps the whole training state (mapper
weights, AdamW and LR-schedule state, torch's and numpy's RNG states, the step and the loss
history) is written under ``checkpoint_dir``, which lies outside the declared outputs. A
killed job started again continues from the latest checkpoint of the same run (same
fingerprint) and ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

from mmskip.data.formats import read_captions, read_vqa, scenes_paths
from mmskip.features.cache import load_features
from mmskip.foundation.llm import target_loss
from mmskip.foundation.text import PromptsConfig
from mmskip.io import atomic_dir, dumps_json, read_json, write_json
from mmskip.mapper.model import Mapper, MapperConfig, prefix_batch

log = logging.getLogger(__name__)

TASKS = ("vqa", "caption")


@dataclass
class MapperTrainConfig:
    """Mapper architecture (paper defaults in comments) and its training schedule."""

    num_query_tokens: int = 12  # K (paper: 10); 12 = the description's 6 colour slots x 2 words
    num_layers: int = 2  # L (paper: 5)
    hidden_size: int = 128  # (paper: 256)
    num_heads: int = 8  # (paper: 8)
    output: str = "linear"  # "linear" (paper) or "vocab" (a mixture of the LLM's token embeddings)
    vqa_steps: int = 2000  # optimizer steps of the VQA mapper
    caption_steps: int = 500  # captions are longer targets: fewer, slower steps suffice (loss flat after ~400)
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    checkpoint_every: int = 200  # steps between resumable checkpoints (needs a checkpoint_dir); 0: never

    def __post_init__(self) -> None:
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every={self.checkpoint_every}: must be >= 0 (0: never checkpoint)")
        for name in ("vqa_steps", "caption_steps"):
            if self.warmup_steps >= getattr(self, name):
                raise ValueError(f"warmup_steps={self.warmup_steps} must be below {name}={getattr(self, name)}")

    def steps(self, task: str) -> int:
        return {"vqa": self.vqa_steps, "caption": self.caption_steps}[task]


def load_llm(name_or_path: str | Path):
    """The frozen causal LM and its tokenizer, only through ``from_pretrained``."""
    model = AutoModelForCausalLM.from_pretrained(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval().requires_grad_(False), tokenizer


def task_examples(task: str, scenes: Path, split: str, prompts: PromptsConfig) -> list[tuple[int, str, str]]:
    """(image_id, prompt, target) triples of a split; captions give one triple per reference."""
    paths = scenes_paths(scenes, split)
    if task == "vqa":
        return [(e.image_id, prompts.prompt("vqa", e.question), e.multiple_choice_answer)
                for e in read_vqa(paths["vqa_questions"], paths["vqa_annotations"])]
    if task == "caption":
        return [(e.image_id, prompts.caption_prompt, c) for e in read_captions(paths["captions"]) for c in e.captions]
    raise ValueError(f"task={task!r}: allowed {TASKS}")


def encode_examples(tokenizer, examples) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids and target ids (a leading space, then the end-of-sequence token)."""
    prompt_ids = tokenizer([p for _, p, _ in examples], add_special_tokens=False)["input_ids"]
    target_ids = tokenizer([f" {t}" for _, _, t in examples], add_special_tokens=False)["input_ids"]
    return prompt_ids, [t + [tokenizer.eos_token_id] for t in target_ids]


# --- checkpoints -------------------------------------------------------------------------------
# checkpoint_dir/step-0000200/{mapper.safetensors, train_state.pt, state.json}: only the latest
# is kept. Bump CHECKPOINT_FORMAT when that layout changes, so older checkpoints are ignored.
CHECKPOINT_FORMAT = 1
_STEP_DIR = re.compile(r"step-(\d+)")


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors: names, dtypes, shapes and raw bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().reshape(-1)
        h.update(f"{name} {t.dtype} {tuple(tensors[name].shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy())  # the bytes themselves, whatever the dtype
    return h.hexdigest()


def code_digest() -> str:
    """sha256 of the mmskip sources and the numeric libraries' versions.

    A resumed run must execute the same code as the interrupted one, or its result would match
    neither version's uninterrupted run. The whole package, not the mapper's modules only:
    simpler, and a spurious mismatch costs no more than a fresh start.
    """
    import transformers

    h = hashlib.sha256(f"torch {torch.__version__} transformers {transformers.__version__} numpy {np.__version__}\n"
                       .encode())
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        h.update(f"{path.relative_to(package).as_posix()}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def run_identity(task: str, seed: int, steps: int, cfg: MapperTrainConfig, prompts: PromptsConfig, llm_model,
                 mapper: Mapper, feats: torch.Tensor, rows: torch.Tensor, prompt_ids: list, target_ids: list,
                 pad_token_id: int, skip_plan, extra: dict | None) -> dict:
    """What makes a training run this run: a checkpoint resumes only a run with the same identity.

    The inputs are identified by what training actually reads, after loading: the LLM's
    parameters with any pruning mask applied, the starting mapper (``init`` or the seeded
    initialisation), the cached features and the tokenised examples (so the tokenizer and the
    scenes count too); and the code. ``checkpoint_every`` is left out: it does not change the
    trajectory.
    """
    examples = hashlib.sha256(dumps_json([rows.tolist(), prompt_ids, target_ids, pad_token_id], compact=True)
                              .encode()).hexdigest()
    identity = {
        "format": CHECKPOINT_FORMAT, "task": task, "seed": seed, "steps": steps,
        "config": {k: v for k, v in asdict(cfg).items() if k != "checkpoint_every"},
        "prompts": asdict(prompts), "skip_plan": None if skip_plan is None else asdict(skip_plan),
        "extra": extra or {}, "llm": tensors_digest(llm_model.state_dict()),
        "mapper_init": tensors_digest(mapper.state_dict()), "features": tensors_digest({"features": feats}),
        "examples": examples, "code": code_digest(),
    }
    return json.loads(dumps_json(identity))  # as it reads back from state.json (tuples become lists)


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(dumps_json(identity).encode()).hexdigest()


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def _is_ours(path: Path) -> bool:
    """A checkpoint folder, or the temporary of one that a killed job left behind (atomic_dir's name)."""
    return bool(_STEP_DIR.fullmatch(path.name)) or bool(re.fullmatch(r"\.step-\d+\..*\.tmp", path.name))


def _remove_checkpoints(folder: Path, keep: Path | None = None) -> None:
    """Delete this module's checkpoints in ``folder`` except ``keep``; nothing else in it is touched."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path != keep and _is_ours(path):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def save_checkpoint(folder: Path, step: int, identity: dict, mapper, optimizer, schedule, rng: np.random.Generator,
                    losses: list[float]) -> Path:
    """Write the training state after ``step`` steps as one new folder, then drop the older ones.

    The folder appears complete or not at all (atomic_dir), and the previous checkpoint is
    deleted only after it, so a kill at any moment leaves at least one usable checkpoint.
    """
    path = folder / f"step-{step:07d}"
    with atomic_dir(path) as tmp:
        save_file({k: v.contiguous() for k, v in mapper.state_dict().items()}, str(tmp / "mapper.safetensors"))
        # Tensors, numbers, strings and containers only: torch.load(weights_only=True) reads it back.
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "train_state.pt")
        write_json(tmp / "state.json", {"fingerprint": fingerprint(identity), "run": identity, "step": step,
                                        "losses": losses, "numpy_rng": rng.bit_generator.state})
    _remove_checkpoints(folder, keep=path)
    return path


def find_checkpoint(folder: Path, identity: dict) -> tuple[Path, dict] | None:
    """The latest checkpoint in ``folder`` that belongs to this run, and its state.json.

    Checkpoints of other runs (other params, seed or inputs) are ignored with a log line naming
    what differs; newest first, since a kill right after a new checkpoint can leave an older
    one of another run next to it.
    """
    for _, path in reversed(_checkpoints(folder)):
        try:
            state = read_json(path / "state.json")
        except (OSError, ValueError) as err:
            log.warning("ignoring checkpoint %s: unreadable state.json (%s)", path, err)
            continue
        if state.get("fingerprint") == fingerprint(identity):
            return path, state
        theirs = state.get("run") if isinstance(state.get("run"), dict) else {}
        differs = sorted(k for k in set(identity) | set(theirs) if identity.get(k) != theirs.get(k))
        log.warning("ignoring checkpoint %s: it belongs to another run (differs in %s)", path,
                    ", ".join(differs) or "fingerprint")
    if _checkpoints(folder):
        log.info("no checkpoint in %s belongs to this run: starting fresh", folder)
    return None


def load_checkpoint(path: Path, state: dict, mapper, optimizer, schedule, rng: np.random.Generator) -> list[float]:
    """Restore the training state saved in ``path`` in place; returns the loss history."""
    if len(state["losses"]) != state["step"]:
        raise ValueError(f"checkpoint {path}: {len(state['losses'])} losses for step {state['step']}; delete it")
    mapper.load_state_dict(load_file(str(path / "mapper.safetensors")))
    train_state = torch.load(path / "train_state.pt", weights_only=True)  # never unpickles code
    optimizer.load_state_dict(train_state["optimizer"])
    schedule.load_state_dict(train_state["scheduler"])
    torch.set_rng_state(train_state["torch_rng"])
    rng.bit_generator.state = state["numpy_rng"]
    return [float(x) for x in state["losses"]]


def train_mapper(task: str, scenes: Path, features: Path, llm: str | Path, out: Path, metrics: Path,
                 seed: int, cfg: MapperTrainConfig, prompts: PromptsConfig, masks: dict | None = None,
                 skip_plan=None, init: Path | None = None, steps: int | None = None, extra: dict | None = None,
                 checkpoint_dir: Path | None = None) -> dict:
    """Train (or, from ``init``, fine-tune) a mapper against the frozen LLM.

    ``masks`` prunes the LLM first and ``skip_plan`` runs it through the skip engine, so the
    mapper learns against the compressed LLM it will be evaluated with; ``steps`` overrides
    the task's step count. With ``checkpoint_dir`` the run checkpoints every
    ``cfg.checkpoint_every`` steps, resumes from a checkpoint of the same run, and deletes
    its checkpoints once ``out`` and ``metrics`` are written.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r}: allowed {TASKS}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, tokenizer = load_llm(llm)
    if masks is not None:
        from mmskip.compression.pruning import apply_masks

        apply_masks(model, masks)
    loss_fn = target_loss
    if skip_plan is not None:
        from mmskip.skipping.engine import SkipEngine

        engine = SkipEngine(model, skip_plan)

        def loss_fn(model, embeds, mask, labels):
            logits, _ = engine.forward(mask, embeds.shape[1], inputs_embeds=embeds)
            target = labels[:, 1:]
            keep = target != -100
            return torch.nn.functional.cross_entropy(logits[:, :-1][keep], target[keep])
    feats, row_of = load_features(features, "train")
    examples = task_examples(task, scenes, "train", prompts)
    prompt_ids, target_ids = encode_examples(tokenizer, examples)
    rows = torch.tensor([row_of[image_id] for image_id, _, _ in examples])
    embed = model.get_input_embeddings()
    if init is not None:
        mapper = Mapper.from_pretrained(init)
        if mapper.config.llm_dim != embed.embedding_dim:
            raise ValueError(f"mapper {init} writes {mapper.config.llm_dim}-d prompts; the LLM takes {embed.embedding_dim}-d")
        mapper.train().requires_grad_(True)
    else:
        mapper = Mapper(MapperConfig(encoder_dim=feats.shape[-1], num_visual_tokens=feats.shape[1],
                                     llm_dim=embed.embedding_dim, num_query_tokens=cfg.num_query_tokens,
                                     num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
                                     output=cfg.output, vocab_size=embed.num_embeddings))
    optimizer = torch.optim.AdamW(mapper.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = steps or cfg.steps(task)
    if cfg.warmup_steps >= steps:
        raise ValueError(f"warmup_steps={cfg.warmup_steps} must be below the {steps} training steps")
    schedule = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, steps)
    trainable = sum(p.numel() for p in mapper.parameters())
    log.info("%s mapper: %d trainable parameters, %d examples, %d steps", task, trainable, len(examples), steps)
    by_image: dict[int, list[int]] = {}
    for i, (image_id, _, _) in enumerate(examples):
        by_image.setdefault(row_of[image_id], []).append(i)
    image_rows = sorted(by_image)
    start, losses, first_step = time.time(), [], 0
    identity = None
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        identity = run_identity(task, seed, steps, cfg, prompts, model, mapper, feats, rows, prompt_ids, target_ids,
                                tokenizer.pad_token_id, skip_plan, extra)
        found = find_checkpoint(checkpoint_dir, identity)
        if found is not None:
            losses = load_checkpoint(*found, mapper, optimizer, schedule, rng)
            first_step = len(losses)
            log.info("resumed from step %d of %d (%s)", first_step, steps, found[0])
    mapper.train()
    for step in tqdm(range(first_step, steps), desc=f"train mapper {task}", mininterval=5, initial=first_step,
                     total=steps):
        # Whole images: the mapper runs once per image and learns from all its questions at once.
        idx: list[int] = []
        for r in rng.permutation(len(image_rows)):
            idx += by_image[image_rows[int(r)]]
            if len(idx) >= cfg.batch_size:
                break
        idx = idx[: cfg.batch_size]
        images, which = torch.unique(rows[idx], return_inverse=True)
        soft = mapper(feats[images], embed.weight)[which]  # (B, K, D)
        embeds, mask, labels = prefix_batch(soft, [prompt_ids[i] for i in idx], [target_ids[i] for i in idx],
                                            embed, tokenizer.pad_token_id, padding_side="right")
        loss = loss_fn(model, embeds, mask, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mapper.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            log.info("step %d loss %.4f", step + 1, float(np.mean(losses[-100:])))
        done = step + 1
        # Not after the last step: the final artifacts follow at once.
        if identity is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < steps:
            save_checkpoint(checkpoint_dir, done, identity, mapper, optimizer, schedule, rng, losses)
    result = {"task": task, "steps": steps, "trainable_params": trainable,
              "final_train_loss": float(np.mean(losses[-50:])),
              "loss_curve": [float(np.mean(losses[i : i + 50])) for i in range(0, len(losses), 50)],
              "config": asdict(cfg), "init": None if init is None else str(init), **(extra or {})}
    log.info("%s mapper trained in %.1f s, final loss %.4f", task, time.time() - start, result["final_train_loss"])
    with atomic_dir(out) as tmp:
        mapper.save_pretrained(tmp)
    write_json(metrics, result)
    if checkpoint_dir is not None:  # the artifacts are complete: the checkpoints have served
        _remove_checkpoints(checkpoint_dir)
        if checkpoint_dir.is_dir() and not any(checkpoint_dir.iterdir()):
            checkpoint_dir.rmdir()
        elif checkpoint_dir.is_dir():
            log.info("kept %s: it holds files that are not checkpoints", checkpoint_dir)
    return result

"""Pretrain a tiny ViT image encoder on a supervised per-patch attribute task.

Every patch token predicts the colour, shape and size of the object covering the patch
(or background), and of the object whose centre lies in it (or none). The encoder's output tokens
therefore carry what each image region shows and where, which the mapper later reads.
Only the ``ViTModel`` backbone and its image processor are saved (``save_pretrained``);
the attribute heads are training scaffolding.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from mmskip.data.formats import scenes_paths
from mmskip.data.scenes import COLORS, SHAPES, SIZES, SceneObject, label_map
from mmskip.io import atomic_dir, read_json, write_json
from mmskip.training import Trainer
from mmskip.params import EncoderConfig

log = logging.getLogger(__name__)

# Per-patch targets: what covers the patch, and which object (if any) has its centre in it.
HEADS = {"color": len(COLORS) + 1, "shape": len(SHAPES) + 1, "size": len(SIZES) + 1,
         "centre_color": len(COLORS) + 1, "centre_shape": len(SHAPES) + 1, "centre_size": len(SIZES) + 1}


def load_split_images(scenes: Path, split: str, processor) -> tuple[torch.Tensor, list[int], list[dict]]:
    """Pixel values (N, 3, H, W), image ids and scene records of one split, in scene order."""
    paths = scenes_paths(scenes, split)
    records = read_json(paths["scenes"])["scenes"]
    images = [Image.open(paths["images"] / split / f"{r['image_id']:06d}.png").convert("RGB") for r in records]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    return pixels, [r["image_id"] for r in records], records


COVER = 0.2  # an object covers a patch when it fills this share of it


def covering(objects: list[SceneObject], image_size: int, patch: int) -> list[int | None]:
    """For every patch (row-major), the index of the object drawn over most of it, where that object fills at least
    ``COVER`` of the patch (None: background)."""
    grid = image_size // patch
    labels = label_map(objects, image_size)[: grid * patch, : grid * patch]
    blocks = labels.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    out: list[int | None] = []
    for block in blocks:
        counts = np.bincount(block, minlength=len(objects) + 1)
        counts[0] = 0
        out.append(int(counts.argmax()) - 1 if counts.max() >= COVER * block.size else None)
    return out


def patch_targets(records: list[dict], image_size: int, patch: int) -> dict[str, torch.Tensor]:
    """Per-patch labels (N, P) for every head; 0 is background."""
    grid = image_size // patch
    out = {k: np.zeros((len(records), grid * grid), dtype=np.int64) for k in HEADS}
    for n, r in enumerate(records):
        objects = [SceneObject(**{k: o[k] for k in ("color", "shape", "size", "x", "y", "radius")})
                   for o in r["objects"]]
        for p, index in enumerate(covering(objects, image_size, patch)):
            if index is not None:
                o = objects[index]
                out["color"][n, p] = list(COLORS).index(o.color) + 1
                out["shape"][n, p] = SHAPES.index(o.shape) + 1
                out["size"][n, p] = list(SIZES).index(o.size) + 1
        for o in objects:
            col, row = min(grid - 1, int(o.x // patch)), min(grid - 1, int(o.y // patch))
            out["centre_color"][n, row * grid + col] = list(COLORS).index(o.color) + 1
            out["centre_shape"][n, row * grid + col] = SHAPES.index(o.shape) + 1
            out["centre_size"][n, row * grid + col] = list(SIZES).index(o.size) + 1
    return {k: torch.from_numpy(v) for k, v in out.items()}


class AttributeHeads(torch.nn.Module):
    """One linear classifier per attribute (``heads``: name -> classes) on every token."""

    def __init__(self, hidden: int, heads: dict[str, int] = HEADS):
        super().__init__()
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(hidden, n) for k, n in heads.items()})

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:  # (B, P, C) -> {k: (B, P, n_k)}
        return {k: head(tokens) for k, head in self.heads.items()}


@torch.no_grad()
def heads_accuracy(tokens, model, heads, inputs, targets, batch_size: int = 256) -> tuple[dict[str, float],
                                                                                          dict[str, float]]:
    """Per-head accuracy over all tokens (``tokens(inputs)``: the encoder's patch tokens), and over the tokens
    whose target is not background (an object, a note).

    Most tokens are background, which inflates the first figure; the second is the one
    that says how well the encoder sees objects.
    """
    model.eval()
    hits = {k: 0 for k in targets}
    object_hits = {k: 0 for k in targets}
    for s in range(0, len(inputs), batch_size):
        out = heads(tokens(inputs[s : s + batch_size]))
        for k in targets:
            target = targets[k][s : s + batch_size]
            right = out[k].argmax(-1) == target
            hits[k] += int(right.sum())
            object_hits[k] += int((right & (target > 0)).sum())
    return ({k: hits[k] / targets[k].numel() for k in targets},
            {k: object_hits[k] / max(1, int((targets[k] > 0).sum())) for k in targets})


def pretraining_result(model, config: dict, steps: int, losses: list[float], per_head: dict[str, float],
                       per_head_objects: dict[str, float]) -> dict:
    """An attribute-pretrained encoder's metrics (``heads_accuracy``'s two figures): all tokens, and the tokens
    of an object (an image's) or a note (a sound's)."""
    return {
        "params": model.num_parameters(),
        "config": config,
        "steps": steps,
        "final_train_loss": float(np.mean(losses[-50:])),
        "heldout_accuracy": float(np.mean(list(per_head.values()))),
        "heldout_accuracy_per_head": per_head,
        "heldout_object_accuracy": float(np.mean(list(per_head_objects.values()))),
        "heldout_object_accuracy_per_head": per_head_objects,
    }


def save_encoder(model, processor, out: Path, metrics: Path, result: dict, name: str, start: float) -> dict:
    """An attribute-pretrained encoder's backbone and its processor (``save_pretrained``, the folder whole or not at
    all), and its metrics (``pretraining_result``), logged as ``name``'s after the time since ``start``."""
    log.info("%s result after %.1f s: %s", name, time.time() - start, result)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    write_json(metrics, result)
    return result


def pretrain_encoder(scenes: Path, out: Path, metrics: Path, seed: int, cfg: EncoderConfig) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    image_size = read_json(scenes_paths(scenes, "train")["scenes"])["info"]["config"]["image_size"]
    if image_size % cfg.patch_size:
        raise ValueError(f"patch_size={cfg.patch_size} must divide the image size {image_size}")
    processor = ViTImageProcessor(do_resize=True, size={"height": image_size, "width": image_size},
                                  do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    train_px, _, train_rec = load_split_images(scenes, "train", processor)
    val_px, _, val_rec = load_split_images(scenes, "val", processor)
    train_t = patch_targets(train_rec, image_size, cfg.patch_size)
    val_t = patch_targets(val_rec, image_size, cfg.patch_size)
    config = ViTConfig(image_size=image_size, patch_size=cfg.patch_size, num_channels=3,
                       hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = ViTModel(config, add_pooling_layer=False)
    heads = AttributeHeads(cfg.hidden_size)
    params = list(model.parameters()) + list(heads.parameters())
    trainer = Trainer(params, cfg.steps, cfg.lr, cfg.warmup_steps, 0.01, rng, desc="pretrain encoder",
                      modules={"encoder": model, "heads": heads})
    log.info("encoder: %d parameters, %d training images", model.num_parameters(), len(train_px))

    def step_loss(step: int) -> torch.Tensor:
        model.train()
        idx = torch.from_numpy(rng.integers(len(train_px), size=cfg.batch_size))
        logits = heads(model(pixel_values=train_px[idx]).last_hidden_state[:, 1:])
        return sum(torch.nn.functional.cross_entropy(logits[k].flatten(0, 1), train_t[k][idx].flatten())
                   for k in HEADS)

    start = time.time()
    losses = trainer.fit(step_loss)
    per_head, per_head_objects = heads_accuracy(lambda x: model(pixel_values=x).last_hidden_state[:, 1:], model,
                                                heads, val_px, val_t)
    result = pretraining_result(model, {"image_size": image_size, "patch_size": cfg.patch_size,
                                        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers},
                                cfg.steps, losses, per_head, per_head_objects)
    return save_encoder(model, processor, out, metrics, result, "encoder", start)

"""Run the frozen encoder once per split and cache all its output tokens as safetensors shards.

Training and evaluation read the cache; no later stage runs the encoder again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mmskip.data.scenes import SPLITS
from mmskip.io import atomic_dir, read_json, write_json
from mmskip.params import FeaturesConfig

log = logging.getLogger(__name__)


def load_encoder(name_or_path: str | Path):
    """The frozen image encoder and its processor, only through ``from_pretrained``."""
    from transformers import AutoImageProcessor, AutoModel  # only here: evaluations just read the cache

    model = AutoModel.from_pretrained(name_or_path)
    if hasattr(model, "vision_model") and not hasattr(model, "embeddings"):
        model = model.vision_model  # a CLIP checkpoint: keep the vision tower
    return model.eval().requires_grad_(False), AutoImageProcessor.from_pretrained(name_or_path)


@torch.no_grad()
def cache_features(scenes: Path, encoder: Path, out: Path, cfg: FeaturesConfig) -> dict:
    from mmskip.foundation.encoder import load_split_images

    model, processor = load_encoder(encoder)
    index: dict = {"splits": {}}
    with atomic_dir(out) as tmp:
        for split in SPLITS:
            pixels, image_ids, _ = load_split_images(scenes, split, processor)
            shards = []
            for s in range(0, len(pixels), cfg.shard_size):
                chunk = pixels[s : s + cfg.shard_size]
                feats = torch.cat([model(pixel_values=chunk[b : b + cfg.batch_size]).last_hidden_state
                                   for b in tqdm(range(0, len(chunk), cfg.batch_size),
                                                 desc=f"encode {split}", mininterval=2)])
                name = f"{split}-{len(shards):05d}.safetensors"
                save_file({"features": feats.contiguous(),  # (N, T, D)
                           "image_ids": torch.tensor(image_ids[s : s + cfg.shard_size], dtype=torch.long)},
                          str(tmp / name))
                shards.append(name)
            index["splits"][split] = {"shards": shards, "num_images": len(image_ids),
                                      "tokens": int(feats.shape[1]), "dim": int(feats.shape[2])}
            log.info("%s: %d images -> %d shards of (tokens=%d, dim=%d)", split, len(image_ids),
                     len(shards), feats.shape[1], feats.shape[2])
        write_json(tmp / "index.json", index)
    return index


def load_features(features_dir: Path, split: str) -> tuple[torch.Tensor, dict[int, int]]:
    """All cached tokens of a split (N, T, D) and a map image_id -> row."""
    index = read_json(Path(features_dir) / "index.json")
    if split not in index["splits"]:
        raise ValueError(f"split {split!r} not in feature cache {features_dir}; have {sorted(index['splits'])}")
    parts = [load_file(str(Path(features_dir) / name)) for name in index["splits"][split]["shards"]]
    feats = torch.cat([p["features"] for p in parts])
    ids = torch.cat([p["image_ids"] for p in parts]).tolist()
    return feats, {image_id: row for row, image_id in enumerate(ids)}

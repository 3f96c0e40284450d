"""Run the frozen encoder once per split and cache all its output tokens as safetensors shards.

Training and evaluation read the cache; no later stage runs the encoder again. The cache is
written one shard at a time: a shard's images are read, encoded and saved before the next
shard's are opened, so memory holds one shard whatever the dataset's size (COCO at 257 x 1024
tokens per image is tens of GB). The tokens are the encoder's last layer after its final norm:
``ViTModel`` applies it to every token, CLIP's vision tower only to its pooled token, so
for CLIP it is applied here (``post_layernorm``), as the paper's code does.

A video encoder (TimeSformer) reads the dataset's ``videos/`` folder: ``num_frames`` frames of each clip, one a
second (:func:`mmskip.data.video.load_frames`), through its image processor; its tokens are the CLS token and
every frame's patches. An audio encoder (an Audio Spectrogram Transformer: its ``main_input_name`` is
``input_values``) reads the dataset's clips from its ``audio/`` folder (:mod:`mmskip.data.clotho`): each clip
decoded, made mono and resampled to the feature extractor's rate (:func:`mmskip.data.audio.load_audio`), then
the extractor's filterbank (AST: 128 Kaldi mel bins over 1024 frames of 10 ms, normalised as AudioSet's) is
encoded. The cache and everything after it do not depend on the modality: a clip is an "image" with an id.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mmskip.data.formats import AUDIO, VIDEOS, split_images
from mmskip.data.scenes import SPLITS
from mmskip.io import atomic_dir, read_json, write_json
from mmskip.params import FeaturesConfig

log = logging.getLogger(__name__)


AUDIO_INPUT = "input_values"  # the main input of an audio encoder (AST): its feature extractor's filterbank


def media_of(model) -> str:
    """The dataset media folder an encoder reads: an audio encoder's clips (its main input is a filterbank), a
    video encoder's (its config has ``num_frames``: TimeSformer, VideoMAE), or images."""
    if model.main_input_name == AUDIO_INPUT:
        return AUDIO
    return VIDEOS if getattr(model.config, "num_frames", None) else "images"


def load_encoder(name_or_path: str | Path):
    """The frozen encoder and its processor (an image processor, or an audio feature extractor), only through
    ``from_pretrained``."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoModel  # evaluations just read the cache

    from mmskip.foundation.hub import checkpoint

    name_or_path = checkpoint(name_or_path)  # a reference folder (paper scale): the hub encoder, offline
    model = AutoModel.from_pretrained(name_or_path)
    if hasattr(model, "vision_model") and not hasattr(model, "embeddings"):
        model = model.vision_model  # a CLIP checkpoint: keep the vision tower
    auto = AutoFeatureExtractor if media_of(model) == AUDIO else AutoImageProcessor
    return model.eval().requires_grad_(False), auto.from_pretrained(name_or_path)


def encoder_inputs(model, processor, files: list[Path]) -> torch.Tensor:
    """The encoder's main input for ``files``: images' pixel values, audio clips' filterbanks, or videos' frames'
    pixel values (B, T, C, H, W)."""
    media = media_of(model)
    if media == VIDEOS:
        from mmskip.data.video import load_frames

        # FFmpeg on the job's threads (--threads)
        return processor([load_frames(path, model.config.num_frames, torch.get_num_threads()) for path in files],
                         return_tensors="pt")["pixel_values"]
    if media == AUDIO:
        from mmskip.data.audio import load_audio

        rate = processor.sampling_rate
        return processor([load_audio(path, rate) for path in files], sampling_rate=rate,
                         return_tensors="pt")[AUDIO_INPUT]
    return processor(images=[Image.open(path).convert("RGB") for path in files], return_tensors="pt")["pixel_values"]


def final_tokens(model, inputs: torch.Tensor) -> torch.Tensor:
    """Every token of the encoder's last layer after its final norm (B, T, D)."""
    hidden = model(**{model.main_input_name: inputs}).last_hidden_state
    post = getattr(model, "post_layernorm", None)  # CLIP's vision tower: its final norm, applied to all tokens
    return hidden if post is None else post(hidden)


@torch.no_grad()
def cache_features(scenes: Path, encoder: Path, out: Path, cfg: FeaturesConfig, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> dict:
    """Every split's images (a video encoder: videos; an audio encoder: clips) through the frozen encoder on
    ``device`` in ``dtype`` (None: the checkpoint's), one shard at a time; the tokens are stored in that dtype."""
    model, processor = load_encoder(encoder)
    model.to(device=device, dtype=dtype)  # dtype None: the checkpoint's own
    pixel_dtype = next(model.parameters()).dtype
    media = media_of(model)
    index: dict = {"splits": {}}
    with atomic_dir(out) as tmp:
        for split in SPLITS:
            images = split_images(scenes, split, media)
            shards, shape = [], None
            for s in range(0, len(images), cfg.shard_size):
                chunk = images[s : s + cfg.shard_size]  # only this shard's images are read
                pixels = encoder_inputs(model, processor, [path for _, path in chunk])
                feats = torch.cat([final_tokens(model, pixels[b : b + cfg.batch_size].to(device, pixel_dtype)).cpu()
                                   for b in tqdm(range(0, len(pixels), cfg.batch_size),
                                                 desc=f"encode {split}", mininterval=2)])
                name = f"{split}-{len(shards):05d}.safetensors"
                save_file({"features": feats.contiguous(),  # (N, T, D)
                           "image_ids": torch.tensor([i for i, _ in chunk], dtype=torch.long)},
                          str(tmp / name))
                shards.append(name)
                shape = feats.shape
            if not images:  # a split the dataset does not have (OK-VQA's and GQA's val): recorded empty
                index["splits"][split] = {"shards": [], "num_images": 0}
                log.info("%s: no images", split)
                continue
            index["splits"][split] = {"shards": shards, "num_images": len(images),
                                      "tokens": int(shape[1]), "dim": int(shape[2])}
            log.info("%s: %d images -> %d shards of (tokens=%d, dim=%d)", split, len(images),
                     len(shards), shape[1], shape[2])
        write_json(tmp / "index.json", index)
    return index


def load_features(features_dir: Path, split: str) -> tuple[torch.Tensor, dict[int, int]]:
    """All cached tokens of a split (N, T, D) and a map image_id -> row."""
    index = read_json(Path(features_dir) / "index.json")
    if split not in index["splits"]:
        raise ValueError(f"split {split!r} not in feature cache {features_dir}; have {sorted(index['splits'])}")
    if not index["splits"][split]["shards"]:
        raise ValueError(f"split {split!r} of feature cache {features_dir} holds no images (its dataset has no such "
                         f"split); splits with images: {sorted(s for s, v in index['splits'].items() if v['shards'])}")
    parts = [load_file(str(Path(features_dir) / name)) for name in index["splits"][split]["shards"]]
    feats = torch.cat([p["features"] for p in parts])
    ids = torch.cat([p["image_ids"] for p in parts]).tolist()
    return feats, {image_id: row for row, image_id in enumerate(ids)}

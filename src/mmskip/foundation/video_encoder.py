"""Pretrain a tiny VideoMAE encoder on the clips, on a supervised per-token attribute task.

The encoder is transformers' ``VideoMAEModel`` and its input is ``VideoMAEImageProcessor``'s pixel values of every
frame, the processor the paper's TimeSformer reads at paper scale (``facebook/timesformer-base-finetuned-k600``).
Its tokens are tubelets: a patch over ``tubelet_size`` consecutive frames (time-major: token ``t * patches + p`` is
patch ``p`` of the t-th pair of frames), so a token's input already shows how its patch changes, which a
TimeSformer's per-frame tokens must learn by attention across frames (a tiny TimeSformer, tried first, learnt the
objects' motions on 0.57 of their tokens; see the README). Every token predicts the colour, shape and motion of the
object covering its patch in its tubelet's first frame, and that object's rank in order of appearance (or
background), so the tokens carry what is where, how it moves and what came first, which the mapper later reads.
The frames are read from the clips' video files through the feature cache's own reader
(:func:`mmskip.features.cache.encoder_inputs`), so pretraining sees what the cache encodes. Only the backbone and
its image processor are saved (``save_pretrained``); the heads are training scaffolding.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import VideoMAEConfig, VideoMAEImageProcessor, VideoMAEModel

from mmskip.data.clips import MOTIONS, Mover
from mmskip.data.formats import VIDEOS, split_images
from mmskip.data.scenes import COLORS, SHAPES
from mmskip.features.cache import encoder_inputs
from mmskip.foundation.encoder import AttributeHeads, covering, heads_accuracy, pretraining_result, save_encoder
from mmskip.io import read_json
from mmskip.params import ClipsConfig, VideoEncoderConfig
from mmskip.training import Trainer

log = logging.getLogger(__name__)

# 0: no object; order: the rank in order of appearance, up to ClipsConfig's largest max_objects (6)
HEADS = {"color": len(COLORS) + 1, "shape": len(SHAPES) + 1, "motion": len(MOTIONS) + 1, "order": 6 + 1}


def frames(model, processor, clips: Path, split: str) -> tuple[torch.Tensor, list[dict]]:
    """The split's clips as the encoder reads them (N, T, C, H, W), and their records, in order."""
    records = read_json(clips / f"scenes_{split}.json")["scenes"]
    files = split_images(clips, split, VIDEOS)
    values = [encoder_inputs(model, processor, [path for _, path in files[s : s + 256]])
              for s in tqdm(range(0, len(files), 256), desc=f"frames {split}", mininterval=2)]
    return torch.cat(values), records


def token_targets(records: list[dict], data: ClipsConfig, patch: int, tubelet: int) -> dict[str, torch.Tensor]:
    """Per-token labels (N, T / tubelet * P) for every head, time-major as VideoMAEModel orders its tokens: the
    object covering the patch in the tubelet's first frame."""
    grid = data.frame_size // patch
    out = {k: np.zeros((len(records), data.num_frames // tubelet, grid * grid), dtype=np.int64) for k in HEADS}
    for n, record in enumerate(records):
        movers = [Mover(**o) for o in record["objects"]]
        for step, t in enumerate(range(0, data.num_frames, tubelet)):
            present = [(rank, o) for rank, m in enumerate(movers, start=1) if (o := m.at(t, data)) is not None]
            for p, index in enumerate(covering([o for _, o in present], data.frame_size, patch)):
                if index is None:
                    continue
                rank, o = present[index]
                out["color"][n, step, p] = list(COLORS).index(o.color) + 1
                out["shape"][n, step, p] = SHAPES.index(o.shape) + 1
                out["motion"][n, step, p] = list(MOTIONS).index(movers[rank - 1].motion) + 1
                out["order"][n, step, p] = rank
    return {k: torch.from_numpy(v.reshape(len(records), -1)) for k, v in out.items()}


def pretrain_video_encoder(clips: Path, out: Path, metrics: Path, seed: int, cfg: VideoEncoderConfig) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = ClipsConfig(**read_json(clips / "scenes_train.json")["info"]["config"])
    if data.frame_size % cfg.patch_size:
        raise ValueError(f"video_encoder.patch_size={cfg.patch_size} must divide clips.frame_size {data.frame_size}")
    if data.num_frames % cfg.tubelet_size:
        raise ValueError(f"video_encoder.tubelet_size={cfg.tubelet_size} must divide clips.num_frames "
                         f"{data.num_frames}")
    processor = VideoMAEImageProcessor(do_resize=True, size={"height": data.frame_size, "width": data.frame_size},
                                       do_center_crop=False, do_normalize=True, image_mean=[0.5] * 3,
                                       image_std=[0.5] * 3)
    # use_mean_pooling off: the model's final norm applies to every token, which the cache stores
    config = VideoMAEConfig(image_size=data.frame_size, patch_size=cfg.patch_size, num_channels=3,
                            num_frames=data.num_frames, tubelet_size=cfg.tubelet_size, hidden_size=cfg.hidden_size,
                            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                            intermediate_size=cfg.mlp_dim, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            use_mean_pooling=False)
    model = VideoMAEModel(config)
    train_x, train_rec = frames(model, processor, clips, "train")
    val_x, val_rec = frames(model, processor, clips, "val")
    train_t = token_targets(train_rec, data, cfg.patch_size, cfg.tubelet_size)
    val_t = token_targets(val_rec, data, cfg.patch_size, cfg.tubelet_size)
    attribute_heads = AttributeHeads(cfg.hidden_size, HEADS)
    trainer = Trainer(list(model.parameters()) + list(attribute_heads.parameters()), cfg.steps, cfg.lr,
                      cfg.warmup_steps, 0.01, rng, desc="pretrain video encoder",
                      modules={"encoder": model, "heads": attribute_heads})
    log.info("video encoder: %d parameters, %d training clips, %d tokens each", model.num_parameters(),
             len(train_x), train_t["color"].shape[1])

    def step_loss(step: int) -> torch.Tensor:
        model.train()
        idx = torch.from_numpy(rng.integers(len(train_x), size=cfg.batch_size))
        logits = attribute_heads(model(pixel_values=train_x[idx]).last_hidden_state)
        return sum(torch.nn.functional.cross_entropy(logits[k].flatten(0, 1), train_t[k][idx].flatten())
                   for k in HEADS)

    start = time.time()
    losses = trainer.fit(step_loss)
    per_head, per_head_objects = heads_accuracy(lambda x: model(pixel_values=x).last_hidden_state, model,
                                                attribute_heads, val_x, val_t, batch_size=64)
    result = pretraining_result(model, {"frame_size": data.frame_size, "num_frames": data.num_frames,
                                        "patch_size": cfg.patch_size, "tubelet_size": cfg.tubelet_size,
                                        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers},
                                cfg.steps, losses, per_head, per_head_objects)
    return save_encoder(model, processor, out, metrics, result, "video encoder", start)

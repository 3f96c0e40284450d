"""Pretrain a tiny Audio Spectrogram Transformer on the sounds, on a supervised per-token attribute task.

The encoder is transformers' ``ASTModel`` and its input is ``ASTFeatureExtractor``'s filterbank, as the paper's
AST at paper scale (``MIT/ast-finetuned-audioset-10-10-0.4593``), at a tiny size: a patch spans every mel bin and
``num_mel_bins`` frames, so each token is a stretch of time. Every patch token predicts the pitch, timbre,
loudness and duration of the note sounding at its centre (or silence), so the tokens carry what is heard when,
which the mapper later reads. The extractor's normalisation (mean and spread of the filterbank) is measured on the
training clips, as AST's authors measured AudioSet's. Only the backbone and its feature extractor are saved
(``save_pretrained``); the heads are training scaffolding.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

from mmskip.data.audio import load_audio
from mmskip.data.formats import AUDIO, split_images
from mmskip.data.sounds import DURATIONS, LOUDNESS, PITCHES, TIMBRES
from mmskip.foundation.encoder import AttributeHeads, heads_accuracy, pretraining_result, save_encoder
from mmskip.io import read_json
from mmskip.params import AudioEncoderConfig
from mmskip.training import Trainer

log = logging.getLogger(__name__)

HEADS = {"pitch": len(PITCHES) + 1, "timbre": len(TIMBRES) + 1, "loudness": len(LOUDNESS) + 1,
         "duration": len(DURATIONS) + 1}  # 0: silence
SHIFT, WINDOW = 0.010, 0.025  # the Kaldi filterbank's frame shift and length, seconds
SPECIAL = 2  # ASTModel's leading tokens: CLS and distillation


def filterbanks(extractor: ASTFeatureExtractor, sounds: Path, split: str) -> tuple[torch.Tensor, list[dict]]:
    """The split's clips through ``extractor`` (N, max_length, num_mel_bins), and their records, in order."""
    records = read_json(sounds / f"scenes_{split}.json")["scenes"]
    clips = split_images(sounds, split, AUDIO)
    rate = extractor.sampling_rate
    values = []
    for s in tqdm(range(0, len(clips), 256), desc=f"filterbanks {split}", mininterval=2):
        waves = [load_audio(path, rate) for _, path in clips[s : s + 256]]
        values.append(extractor(waves, sampling_rate=rate, return_tensors="pt")["input_values"])
    return torch.cat(values), records


def token_times(cfg: AudioEncoderConfig) -> np.ndarray:
    """The centre of each patch token, in seconds from the clip's start."""
    tokens = (cfg.max_length - cfg.num_mel_bins) // cfg.time_stride + 1
    first = np.arange(tokens) * cfg.time_stride
    return (first + cfg.num_mel_bins / 2) * SHIFT + WINDOW / 2


def token_targets(records: list[dict], cfg: AudioEncoderConfig, slot_seconds: float) -> dict[str, torch.Tensor]:
    """Per-token labels (N, T) for every head: the note sounding at the token's centre (0: silence)."""
    times = token_times(cfg)
    out = {k: np.zeros((len(records), len(times)), dtype=np.int64) for k in HEADS}
    values = {"pitch": list(PITCHES), "timbre": list(TIMBRES), "loudness": list(LOUDNESS),
              "duration": list(DURATIONS)}
    for n, record in enumerate(records):
        for note in record["notes"]:
            end = note["start"] + DURATIONS[note["duration"]] * slot_seconds
            inside = (times >= note["start"]) & (times < end)
            for k in HEADS:
                out[k][n, inside] = values[k].index(note[k]) + 1
    return {k: torch.from_numpy(v) for k, v in out.items()}


def pretrain_audio_encoder(sounds: Path, out: Path, metrics: Path, seed: int, cfg: AudioEncoderConfig) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = read_json(sounds / "scenes_train.json")["info"]["config"]
    extractor = ASTFeatureExtractor(sampling_rate=data["sample_rate"], num_mel_bins=cfg.num_mel_bins,
                                    max_length=cfg.max_length, do_normalize=False)
    train_x, train_rec = filterbanks(extractor, sounds, "train")
    val_x, val_rec = filterbanks(extractor, sounds, "val")
    # AST's normalisation, (x - mean) / (2 std), with the training clips' own statistics
    extractor.mean, extractor.std, extractor.do_normalize = float(train_x.mean()), float(train_x.std()), True
    train_x, val_x = ((x - extractor.mean) / (2 * extractor.std) for x in (train_x, val_x))
    train_t = token_targets(train_rec, cfg, data["slot_seconds"])
    val_t = token_targets(val_rec, cfg, data["slot_seconds"])
    config = ASTConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim, patch_size=cfg.num_mel_bins,
                       frequency_stride=cfg.num_mel_bins, time_stride=cfg.time_stride, max_length=cfg.max_length,
                       num_mel_bins=cfg.num_mel_bins, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = ASTModel(config)
    heads = AttributeHeads(cfg.hidden_size, HEADS)
    trainer = Trainer(list(model.parameters()) + list(heads.parameters()), cfg.steps, cfg.lr, cfg.warmup_steps, 0.01,
                      rng, desc="pretrain audio encoder", modules={"encoder": model, "heads": heads})
    log.info("audio encoder: %d parameters, %d training clips, %d tokens each", model.num_parameters(), len(train_x),
             train_t["pitch"].shape[1])

    def step_loss(step: int) -> torch.Tensor:
        model.train()
        idx = torch.from_numpy(rng.integers(len(train_x), size=cfg.batch_size))
        logits = heads(model(input_values=train_x[idx]).last_hidden_state[:, SPECIAL:])
        return sum(torch.nn.functional.cross_entropy(logits[k].flatten(0, 1), train_t[k][idx].flatten())
                   for k in HEADS)

    start = time.time()
    losses = trainer.fit(step_loss)
    per_head, per_head_notes = heads_accuracy(lambda x: model(input_values=x).last_hidden_state[:, SPECIAL:],
                                              model, heads, val_x, val_t)
    result = pretraining_result(model, {"sample_rate": data["sample_rate"], "num_mel_bins": cfg.num_mel_bins,
                                        "max_length": cfg.max_length, "time_stride": cfg.time_stride,
                                        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers},
                                cfg.steps, losses, per_head, per_head_notes)  # "object": the tokens of a note
    return save_encoder(model, extractor, out, metrics, result, "audio encoder", start)

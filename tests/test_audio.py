"""Audio clips into the feature cache: decoded, made mono, resampled to the audio encoder's rate
(mmskip.data.audio), then its feature extractor's filterbank through a tiny ASTModel saved with save_pretrained
(mmskip.features.cache), as the paper-scale audio tasks run with the hub's AST."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch
from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

from mmskip.data.audio import load_audio
from mmskip.features.cache import cache_features, load_features
from mmskip.params import FeaturesConfig


def _tone(path, frequency: float, rate: int, seconds: float = 0.5, channels: int = 1, amplitude: float = 0.5):
    t = np.arange(int(rate * seconds)) / rate
    wave = amplitude * np.sin(2 * np.pi * frequency * t)
    soundfile.write(path, np.stack([wave] * channels, axis=1) if channels > 1 else wave, rate, subtype="PCM_16")


def test_a_clip_is_read_mono_at_the_encoders_rate(tmp_path):
    _tone(tmp_path / "stereo.wav", 1000.0, 44100, channels=2)
    samples = load_audio(tmp_path / "stereo.wav", 16000)
    assert samples.dtype == np.float32 and samples.ndim == 1 and abs(len(samples) - 8000) <= 1
    spectrum = np.abs(np.fft.rfft(samples))
    assert np.argmax(spectrum) * 16000 / len(samples) == pytest.approx(1000.0, abs=4)  # the tone survives
    assert np.max(np.abs(samples)) == pytest.approx(0.5, abs=0.02)
    _tone(tmp_path / "native.wav", 1000.0, 16000)  # at the rate already: the samples as decoded
    decoded, _ = soundfile.read(tmp_path / "native.wav", dtype="float32")
    assert np.array_equal(load_audio(tmp_path / "native.wav", 16000), decoded)


def test_a_file_that_is_no_clip_is_refused_naming_it(tmp_path):
    (tmp_path / "notes.wav").write_text("not audio")
    with pytest.raises(ValueError, match=r"notes.wav: not an audio file soundfile reads"):
        load_audio(tmp_path / "notes.wav", 16000)
    soundfile.write(tmp_path / "empty.wav", np.zeros((0,), dtype=np.float32), 16000)
    with pytest.raises(ValueError, match=r"empty.wav: an empty clip"):
        load_audio(tmp_path / "empty.wav", 16000)


def _clip_dataset(root):
    """A dataset folder of clips as prepare_clotho writes it: audio/{part}/*.wav, COCO caption files."""
    ids, files = {}, {}
    for n, (split, frequency, rate) in enumerate([("train", 300, 44100), ("train", 2000, 22050), ("val", 500, 16000),
                                                  ("test", 800, 44100), ("test", 3000, 48000)]):
        (root / "audio" / split).mkdir(parents=True, exist_ok=True)
        name = f"{split}/{n}.wav"
        _tone(root / "audio" / name, frequency, rate, channels=1 + n % 2)
        ids.setdefault(split, []).append({"id": n + 1, "file_name": name})
        files[n + 1] = root / "audio" / name
    (root / "annotations").mkdir()
    for split, images in ids.items():
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": []}))
    return files


def test_the_audio_encoders_cache_holds_its_final_tokens_of_each_resampled_clip(tmp_path):
    files = _clip_dataset(tmp_path / "clips")
    torch.manual_seed(0)
    model = ASTModel(ASTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                               patch_size=16, frequency_stride=16, time_stride=16, max_length=64, num_mel_bins=32))
    extractor = ASTFeatureExtractor(num_mel_bins=32, max_length=64)
    model.save_pretrained(tmp_path / "ast")
    extractor.save_pretrained(tmp_path / "ast")
    index = cache_features(tmp_path / "clips", tmp_path / "ast", tmp_path / "features",
                           FeaturesConfig(batch_size=1, shard_size=1))
    assert {s: (v["num_images"], v["tokens"], v["dim"]) for s, v in index["splits"].items()} == {
        "train": (2, 10, 16), "val": (1, 10, 16), "test": (2, 10, 16)}  # 2 x 4 patches, CLS and distillation
    model.eval()
    for split in ("train", "val", "test"):
        features, rows = load_features(tmp_path / "features", split)
        for clip_id, row in rows.items():
            inputs = extractor(load_audio(files[clip_id], 16000), sampling_rate=16000, return_tensors="pt")
            with torch.no_grad():
                expected = model(**inputs).last_hidden_state[0]
            assert torch.equal(features[row], expected), (split, clip_id)

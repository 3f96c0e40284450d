"""Video clips into the feature cache: decoded with PyAV, 8 frames one a second as the paper's code samples
MSRVTT (mmskip.data.video), through a tiny TimesformerModel saved with save_pretrained (mmskip.features.cache)."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch
from transformers import TimesformerConfig, TimesformerModel, VideoMAEImageProcessor

from mmskip.data.video import frame_indices, load_frames
from mmskip.features.cache import cache_features, load_features
from mmskip.params import FeaturesConfig


def make_video(path, levels, fps: int = 2, size: int = 32) -> None:
    """An MPEG-4 clip whose frame i is a flat grey of ``levels[i]`` (or, an array, that RGB frame)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for level in levels:
            frame = level if isinstance(level, np.ndarray) else np.full((size, size, 3), level, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_frames_are_taken_one_a_second_at_the_middle_of_each_second():
    assert frame_indices(300, 30.0, 8) == [15, 45, 75, 105, 135, 165, 195, 225]  # a 10 s clip at 30 fps
    assert frame_indices(20, 2.0, 8) == [1, 3, 5, 7, 9, 11, 13, 15]  # 10 s at 2 fps
    # under 9 s: the middle frame of each of 8 equal intervals; fewer frames than 8: the last one repeated
    assert frame_indices(25, 10.0, 8) == [1, 4, 7, 10, 13, 16, 19, 22]
    assert frame_indices(5, 10.0, 8) == [0, 1, 2, 3, 4, 4, 4, 4]
    with pytest.raises(ValueError, match="a clip of 0 frames at 30.0 fps cannot give 8 frames"):
        frame_indices(0, 30.0, 8)


def test_a_clip_gives_its_sampled_frames_as_rgb(tmp_path):
    levels = [20 + 8 * i for i in range(24)]  # 12 s at 2 fps
    make_video(tmp_path / "clip.mp4", levels)
    frames = load_frames(tmp_path / "clip.mp4", 8)
    assert [f.shape for f in frames] == [(32, 32, 3)] * 8 and frames[0].dtype == np.uint8
    means = [float(f.mean()) for f in frames]
    assert means == pytest.approx([levels[i] for i in (1, 3, 5, 7, 9, 11, 13, 15)], abs=3)
    for threads in (0, 2):  # FFmpeg's own thread count, and two: the same frames as on one thread
        assert all((a == b).all() for a, b in zip(load_frames(tmp_path / "clip.mp4", 8, threads), frames))
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(ValueError, match=r"notes.mp4: not a video PyAV decodes"):
        load_frames(tmp_path / "notes.mp4", 8)


def test_the_video_encoders_cache_holds_its_final_tokens_of_each_clips_frames(tmp_path):
    root, files = tmp_path / "msrvtt", {}
    (root / "videos" / "all").mkdir(parents=True)
    (root / "annotations").mkdir()
    for n, (split, length) in enumerate([("train", 20), ("train", 7), ("val", 24), ("test", 30)]):
        files[n + 1] = root / "videos" / "all" / f"video{n}.mp4"
        make_video(files[n + 1], [(40 * n + 5 * i) % 250 for i in range(length)])
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": [
            {"id": k + 1, "file_name": f"all/video{k}.mp4"} for k, (s, _) in enumerate(
                [("train", 0), ("train", 0), ("val", 0), ("test", 0)]) if s == split], "annotations": []}))
    torch.manual_seed(0)
    model = TimesformerModel(TimesformerConfig(image_size=32, patch_size=16, num_frames=8, hidden_size=16,
                                               num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    processor = VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(tmp_path / "timesformer")
    processor.save_pretrained(tmp_path / "timesformer")
    index = cache_features(root, tmp_path / "timesformer", tmp_path / "features", FeaturesConfig(batch_size=1,
                                                                                                shard_size=1))
    assert {s: (v["num_images"], v["tokens"], v["dim"]) for s, v in index["splits"].items()} == {
        "train": (2, 33, 16), "val": (1, 33, 16), "test": (1, 33, 16)}  # CLS + 8 frames x 2 x 2 patches
    model.eval()
    from transformers import AutoImageProcessor

    saved = AutoImageProcessor.from_pretrained(tmp_path / "timesformer")  # as the cache loads it
    for split in ("train", "val", "test"):
        features, rows = load_features(tmp_path / "features", split)
        for clip_id, row in rows.items():
            pixels = saved([load_frames(files[clip_id], 8)], return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                expected = model(pixel_values=pixels).last_hidden_state[0]
            assert torch.equal(features[row], expected), (split, clip_id)

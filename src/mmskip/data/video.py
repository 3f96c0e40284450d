"""Video clips as a video encoder reads them: a fixed number of RGB frames, one a second.

The file is decoded with PyAV (FFmpeg). As the paper's code samples MSRVTT (``sample_type: fps1``, 8 frames), a
clip of at least ``SHORT`` seconds gives the frames at the middle of its seconds, 0.5 s, 1.5 s, ..., the first
``num_frames`` of them. A shorter clip is cut into ``num_frames`` equal intervals and gives the middle frame of each
(the paper's code picks a random frame of each interval there; here it is the middle one, so that the cache is
deterministic), the last frame repeated where the clip has fewer frames than that.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FRAMES_PER_SECOND = 1.0  # the paper's code: fps1
SHORT = 9.0  # seconds: a shorter clip is sampled by intervals (the paper's code's threshold)


def frame_indices(count: int, fps: float, num_frames: int) -> list[int]:
    """Which of a clip's ``count`` frames (at ``fps``) the encoder sees, ``num_frames`` of them in order."""
    if count < 1 or fps <= 0 or num_frames < 1:
        raise ValueError(f"a clip of {count} frames at {fps} fps cannot give {num_frames} frames")
    duration = count / fps
    if duration >= SHORT:
        step = 1 / FRAMES_PER_SECOND
        seconds = np.arange(step / 2, duration, step)
        picked = [int(i) for i in np.around(seconds * fps) if i < count][:num_frames]
        if len(picked) == num_frames:
            return picked
    edges = np.linspace(0, count, min(num_frames, count) + 1).astype(int)
    picked = [int((a + b - 1) // 2) for a, b in zip(edges[:-1], edges[1:])]
    return picked + [picked[-1]] * (num_frames - len(picked))


def load_frames(path: str | Path, num_frames: int, threads: int = 1) -> list[np.ndarray]:
    """``num_frames`` RGB frames (H, W, 3) uint8 of the clip at ``path`` (:func:`frame_indices`).

    FFmpeg decodes on ``threads`` threads (0: one per core, FFmpeg's default), the same frames whatever the count.
    One by default, the thread a pipeline job claims: FFmpeg's own threads beside other jobs on a busy machine made
    the embedded clips' cache take 60 s of wall time for 10 s of work.
    """
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = threads
            frames = list(container.decode(stream))  # decoded frames, converted below only where picked
            rate = stream.average_rate or stream.guessed_rate
    except (av.error.FFmpegError, IndexError) as err:
        raise ValueError(f"{path}: not a video PyAV decodes ({err})") from None
    if not frames or not rate:
        raise ValueError(f"{path}: a video with no frames or no frame rate")
    return [frames[i].to_ndarray(format="rgb24") for i in frame_indices(len(frames), float(rate), num_frames)]

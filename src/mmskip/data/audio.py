"""Audio clips as an audio encoder's feature extractor reads them: one channel at its sampling rate.

The file is decoded by ``soundfile`` (libsndfile: WAV, FLAC, OGG, ...), its channels averaged, and resampled
with ``soxr`` to the rate the encoder was trained at (AST: 16 kHz; Clotho is recorded at 44.1 kHz). The paper's
code feeds Clotho's 44.1 kHz samples to a 16 kHz filterbank unresampled; here every clip is resampled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_audio(path: str | Path, sampling_rate: int) -> np.ndarray:
    """The clip at ``path`` as float32 samples in [-1, 1], mono, at ``sampling_rate`` Hz."""
    import soundfile
    import soxr

    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as err:
        raise ValueError(f"{path}: not an audio file soundfile reads ({err})") from None
    if not len(samples):
        raise ValueError(f"{path}: an empty clip (no samples)")
    mono = samples.mean(axis=1)
    if rate != sampling_rate:
        mono = soxr.resample(mono, rate, sampling_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)

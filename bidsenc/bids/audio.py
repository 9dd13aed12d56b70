"""Stimulus audio: mono float32 samples at the rate a model needs, and durations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from bidsenc.errors import DataError, MissingInputError


def load_audio(path: Path | str, sample_rate: int = 16000) -> tuple[np.ndarray, int]:
    """Read an audio file as mono float32 at ``sample_rate``.

    Parameters
    ----------
    path : Path or str
        Any format libsndfile reads: wav, flac, ogg, and mp3 (libsndfile >= 1.1).
    sample_rate : int
        Rate of the returned samples; the file is resampled when it differs,
        with libsoxr's high-quality filter (the resampler librosa uses by
        default: stopband below -140 dB, so nothing above the new Nyquist
        frequency folds back into the band the models hear).

    Returns
    -------
    samples : np.ndarray
        1-D float32 in [-1, 1]; channels are averaged.
    sample_rate : int
        The rate of ``samples``.
    """
    path = _existing(path)
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, not {sample_rate!r}")
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except sf.SoundFileError as err:
        raise _unreadable(path, err) from None
    samples = data.mean(axis=1, dtype=np.float32)
    if rate != sample_rate:
        import soxr  # only resampling needs it

        samples = soxr.resample(samples, rate, int(sample_rate), quality="HQ")
    return np.ascontiguousarray(samples, dtype=np.float32), int(sample_rate)


def audio_duration(path: Path | str) -> float:
    """Duration in seconds, from the file's header (nothing is decoded)."""
    path = _existing(path)
    try:
        info = sf.info(path)
    except sf.SoundFileError as err:
        raise _unreadable(path, err) from None
    return info.frames / info.samplerate


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"audio file {path} does not exist or is not a file")
    return path


def _unreadable(path: Path, err: Exception) -> DataError:
    reason = getattr(err, "error_string", None) or str(err)
    return DataError(f"{path}: cannot read audio ({' '.join(reason.split())})")

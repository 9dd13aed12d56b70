"""Low-level baseline features: word rate, phoneme rate and the audio envelope.

Every encoding paper of this field reports its language and speech models against
such baselines: a brain region that follows how fast words come, or how loud the
sound is, is "predicted" by any model whose features carry that rate. Each
baseline is a single feature (one "layer", 0) with event times relative to the
audio's start, so it goes through the same cache, Lanczos resampling, delays,
filtering and ridge as the model features:

``word_rate``
    1 at each word's midpoint (the words the language models see: non-words such as
    ``sp`` dropped); the unnormalised Lanczos sum makes it words per TR.
``phoneme_rate``
    1 at each phone's midpoint, from the phone tier of the story's TextGrid (stories
    whose word timings come from elsewhere have no phones).
``envelope``
    the root-mean-square amplitude of the 16 kHz mono audio in 10 ms frames, at each
    frame's centre.
"""

from __future__ import annotations

import numpy as np

from ..bids.experiment import Story
from ..errors import DataError

#: Baselines and the stimulus part each needs.
BASELINES = {"word_rate": "words", "phoneme_rate": "phones", "envelope": "audio"}
#: Frame of the envelope, in seconds.
ENVELOPE_FRAME = 0.01


def needs(name: str) -> str:
    """``words``, ``phones`` or ``audio``."""
    return BASELINES[name]


def has_input(name: str, story: Story) -> bool:
    """Whether ``story`` holds what baseline ``name`` is computed from."""
    need = BASELINES[name]
    if need == "audio":
        return story.audio is not None
    if story.words is None:
        return False
    return need == "words" or story_phones(story) is not None


def story_phones(story: Story) -> np.ndarray | None:
    """Phone midpoints (s from the audio's start) from the phone tier of the story's TextGrid, or None."""
    from ..bids.words import read_phone_times

    source = story.words.source if story.words is not None else None
    if source is None or source.suffix.lower() != ".textgrid":
        return None
    return read_phone_times(source)


def compute(name: str, story: Story) -> tuple[np.ndarray, np.ndarray]:
    """Times (s from the audio's start) and values ``[n, 1]`` float32 of baseline ``name`` for ``story``."""
    if name == "word_rate":
        times = story.words.without_non_words().midpoints
        return times, np.ones((len(times), 1), np.float32)
    if name == "phoneme_rate":
        times = story_phones(story)
        if times is None:
            raise DataError(f"story {story.id}: phoneme_rate needs a TextGrid with a phone tier")
        return times, np.ones((len(times), 1), np.float32)
    if name == "envelope":
        from ..bids.audio import load_audio

        samples, rate = load_audio(story.audio)
        return envelope(samples, rate)
    raise ValueError(f"unknown baseline {name!r}")


def envelope(samples: np.ndarray, rate: int, frame: float = ENVELOPE_FRAME) -> tuple[np.ndarray, np.ndarray]:
    """RMS amplitude in consecutive frames of ``frame`` seconds: frame centres and values ``[n, 1]``."""
    size = int(round(frame * rate))
    n = len(samples) // size
    if n == 0:
        raise DataError(f"audio of {len(samples) / rate:.3f} s is shorter than one {frame} s envelope frame")
    frames = np.asarray(samples[: n * size], dtype=np.float64).reshape(n, size)
    rms = np.sqrt((frames ** 2).mean(1))
    times = (np.arange(n) + 0.5) * size / rate
    return times, rms[:, None].astype(np.float32)


__all__ = ["BASELINES", "compute", "envelope", "has_input", "needs", "story_phones"]

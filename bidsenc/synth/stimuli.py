"""Synthetic stories: text with word timings, and speech-like audio aligned to the words."""

from __future__ import annotations

import numpy as np

#: Sample rate of the generated audio.
SAMPLE_RATE = 16000

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_FUNCTION_WORDS = ["the", "a", "and", "of", "to", "in", "was", "he", "she", "it", "that", "on", "we", "they"]


def make_vocabulary(rng: np.random.Generator, size: int = 240) -> list[str]:
    """Pronounceable pseudo-words (plus English function words), unique, 2-10 letters."""
    words = list(_FUNCTION_WORDS)
    seen = set(words)
    while len(words) < size:
        n_syll = rng.integers(1, 4)
        w = "".join(rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS)) for _ in range(n_syll))
        if rng.random() < 0.4:
            w += rng.choice(list(_CONSONANTS))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def make_story_words(rng: np.random.Generator, vocabulary: list[str], duration: float,
                     start: float = 0.5) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Sentences of Zipf-distributed words with speech-like durations filling ``duration`` seconds.

    Returns words and their onset/offset times (seconds) relative to the audio's start.
    """
    ranks = np.arange(1, len(vocabulary) + 1)
    p = 1.0 / ranks
    p /= p.sum()
    words, onsets, offsets = [], [], []
    t = start
    while True:
        sentence = rng.choice(len(vocabulary), size=rng.integers(4, 12), p=p)
        for i in sentence:
            w = vocabulary[i]
            d = 0.12 + 0.055 * len(w) + rng.uniform(0, 0.08)
            if t + d > duration - 0.5:
                return words, np.array(onsets), np.array(offsets)
            words.append(w)
            onsets.append(round(t, 3))
            offsets.append(round(t + d, 3))
            t += d + rng.uniform(0.03, 0.12)
        t += rng.uniform(0.35, 0.7)  # pause between sentences


def synthesize_speech(words: list[str], onsets: np.ndarray, offsets: np.ndarray, duration: float,
                      rng: np.random.Generator, intro: float = 0.0) -> np.ndarray:
    """Voiced, formant-shaped sound during each word and a quiet floor between words.

    ``intro`` seconds of a music-like chord start the file (as Narratives' music intros).
    """
    n = int(round(duration * SAMPLE_RATE))
    audio = rng.normal(0, 0.003, n).astype(np.float32)
    if intro > 0:
        t = np.arange(int(intro * SAMPLE_RATE)) / SAMPLE_RATE
        chord = sum(np.sin(2 * np.pi * f * t) for f in (261.6, 329.6, 392.0)) / 3
        audio[: t.size] += (0.2 * chord * np.minimum(1, (intro - t) * 2)).astype(np.float32)
    for word, on, off in zip(words, onsets, offsets, strict=True):
        i0, i1 = int(on * SAMPLE_RATE), min(n, int(off * SAMPLE_RATE))
        t = np.arange(i1 - i0) / SAMPLE_RATE
        f0 = 110 + 30 * rng.random() + 15 * np.sin(2 * np.pi * t / max(t[-1], 0.1))
        phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
        # harmonics weighted by two formant bumps that move once per syllable (vowel)
        n_syll = max(1, sum(c in _VOWELS for c in word))
        f1 = 500 + 300 * np.sin(np.pi * n_syll * t / t[-1]) ** 2
        voice = np.zeros_like(t)
        for h in range(1, 16):
            fh = h * f0
            gain = np.exp(-((fh - f1) / 250) ** 2) + 0.5 * np.exp(-((fh - 1700) / 400) ** 2)
            voice += gain * np.sin(h * phase)
        syllables = np.abs(np.sin(np.pi * n_syll * t / t[-1])) ** 0.5
        audio[i0:i1] += (0.15 * voice * syllables).astype(np.float32)
    return np.clip(audio, -1, 1)

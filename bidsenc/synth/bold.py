"""BOLD responses simulated from known word features, with a known noise ceiling.

Written independently of bidsenc's feature and alignment code, so that a
timing error in the pipeline cannot be cancelled by the same error here.
Features live on a 0.1 s grid in scanner time, are convolved with a canonical
double-gamma HRF and sampled at each volume's midpoint.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import gamma

#: Resolution of the simulation grid (seconds).
DT = 0.1


def canonical_hrf(dt: float = DT, length: float = 32.0) -> np.ndarray:
    """SPM's double-gamma HRF (peak 6 s, undershoot 16 s, ratio 1/6), unit sum."""
    t = np.arange(0, length, dt)
    h = gamma.pdf(t, 6) - gamma.pdf(t, 16) / 6
    return h / h.sum()


def word_feature_grid(n_bins: int, words: list[str], onsets: np.ndarray, offsets: np.ndarray,
                      audio_onset: float, embedding: dict[str, np.ndarray]) -> np.ndarray:
    """Features on the 0.1 s grid of a run: word rate, word length, word embedding.

    ``onsets``/``offsets`` are relative to the audio, which starts ``audio_onset`` s
    after the first volume (may be negative).
    """
    dim = len(next(iter(embedding.values())))
    grid = np.zeros((n_bins, 2 + dim))
    for w, on, off in zip(words, onsets, offsets, strict=True):
        a = int(np.floor((on + audio_onset) / DT))
        b = max(a + 1, int(np.floor((off + audio_onset) / DT)))
        if b <= 0 or a >= n_bins:
            continue
        grid[max(a, 0), 0] += 1.0 / DT * (a >= 0)      # word onsets: a rate in words/s
        grid[max(a, 0):b, 1] = len(w)                  # word length while spoken
        grid[max(a, 0):b, 2:] = embedding[w]
    return grid


def response_at_volumes(grid: np.ndarray, tr: float, n_volumes: int) -> np.ndarray:
    """Convolve the feature grid with the HRF and sample at volume midpoints."""
    hrf = canonical_hrf()
    conv = np.stack([np.convolve(grid[:, j], hrf)[: grid.shape[0]] for j in range(grid.shape[1])], axis=1)
    times = np.arange(n_volumes) * tr + tr / 2
    idx = np.minimum(np.round(times / DT).astype(int), grid.shape[0] - 1)
    return conv[idx]


def slow_drift(rng: np.random.Generator, n_volumes: int, tr: float, n_voxels: int) -> np.ndarray:
    """Scanner drift: a few cosines slower than 1/120 Hz, random per voxel."""
    t = np.arange(n_volumes) * tr
    span = n_volumes * tr
    out = np.zeros((n_volumes, n_voxels))
    for k in range(1, 4):
        period = max(2 * span / k, 120.0)
        phase = rng.uniform(0, 2 * np.pi, n_voxels)
        out += rng.normal(0, 1, n_voxels) * np.cos(2 * np.pi * t[:, None] / period + phase)
    return out / np.sqrt(3)

"""From stimulus time to scan time: Lanczos resampling, FIR delays, trims, z-scoring.

For each run, every story segment's features (one row per word or audio window,
times relative to the audio's start) are resampled with a Lanczos kernel to the
times at which the run's volumes were sampled, summed over segments, delayed,
trimmed and z-scored. Responses are cleaned and z-scored per run. Arrays in,
arrays out: nothing here knows models or files.

Two presets:

``default``
    delays in seconds (every whole number of TRs from 2 s to 8 s), applied to each
    untrimmed run with zero padding at its start, so delays never cross runs and the
    trimmed volumes still feed the delayed copies; trims in seconds (20 s / 10 s on
    training runs, 100 s / 10 s on test runs).
``reference``
    Antonello et al. (2023): delays of 1-4 TRs applied after the trimmed stories are
    concatenated (so they cross story boundaries); trims of 10/5 TRs (training) and
    50/5 TRs (test).

Trims count from the first and last volume the scanner acquired, also for sources
that already dropped some (ds003020's preprocessed files lack 10 TRs at each end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .._arrays import CONSTANT_RTOL, constant_columns
from ..bids.experiment import Run
from ..errors import DataError


@dataclass(frozen=True)
class AlignSettings:
    """How features and responses are put on a common time base."""

    preset: str = "default"
    delays_s: tuple[float, float] = (2.0, 8.0)
    trim_train_s: tuple[float, float] = (20.0, 10.0)
    trim_test_s: tuple[float, float] = (100.0, 10.0)
    lanczos_window: int = 3
    lanczos_normalize: bool = False
    #: Temporal filtering, per run, of the responses and the delayed design alike: a linear
    #: detrend and a cosine (DCT) high-pass at this cutoff in Hz (0: none), the filter
    #: fMRIPrep's ``cosine*`` regressors implement (128 s by default).
    detrend: bool = False
    high_pass: float = 0.0

    #: the reference preset, in TRs
    REFERENCE_DELAYS = (1, 2, 3, 4)
    REFERENCE_TRIM_TRAIN = (10, 5)
    REFERENCE_TRIM_TEST = (50, 5)

    def delay_trs(self, tr: float) -> list[int]:
        if self.preset == "reference":
            return list(self.REFERENCE_DELAYS)
        lo, hi = self.delays_s
        return list(range(max(1, math.ceil(lo / tr - 1e-6)), math.floor(hi / tr + 1e-6) + 1))

    def trim_trs(self, tr: float, test: bool) -> tuple[int, int]:
        if self.preset == "reference":
            return self.REFERENCE_TRIM_TEST if test else self.REFERENCE_TRIM_TRAIN
        start, end = self.trim_test_s if test else self.trim_train_s
        return math.ceil(start / tr - 1e-6), math.ceil(end / tr - 1e-6)


# --------------------------------------------------------------------------- Lanczos

def lanczos_kernel(t: np.ndarray, window: int = 3) -> np.ndarray:
    """``w(t) = a sin(pi t) sin(pi t / a) / (pi^2 t^2)``, 1 at 0, 0 beyond ``|t| > a``.

    ``t`` is in units of the cutoff period. Note the factor ``a`` (the reference's
    convention; the kernel's peak is 1 all the same since ``w(0)`` is set to 1).
    """
    t = np.asarray(t, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        val = window * np.sin(np.pi * t) * np.sin(np.pi * t / window) / (np.pi**2 * t**2)
    val[t == 0] = 1.0
    val[np.abs(t) > window] = 0.0
    return val


def lanczos_resample(values: np.ndarray, old_times: np.ndarray, new_times: np.ndarray, *, window: int = 3,
                     cutoff: float | None = None, normalize: bool = False) -> np.ndarray:
    """Resample rows of ``values`` at ``old_times`` to ``new_times`` with a Lanczos kernel.

    ``cutoff`` defaults to the new sampling rate (1 / mean spacing of ``new_times``).
    Unnormalised (the reference): each new sample is a kernel-weighted *sum* of the
    rows near it, so the result carries the event rate (words per TR).
    ``normalize=True`` divides by the sum of weights instead (a weighted mean).
    """
    values = np.asarray(values)
    old_times = np.asarray(old_times, dtype=np.float64)
    new_times = np.asarray(new_times, dtype=np.float64)
    if cutoff is None:
        cutoff = 1.0 / np.mean(np.diff(new_times))
    out = np.zeros((len(new_times), values.shape[1]), dtype=np.float64)
    if len(old_times) == 0:
        return out
    # only rows within the kernel's support contribute: process a band at a time
    order = np.argsort(old_times, kind="stable")
    old_sorted, vals_sorted = old_times[order], values[order]
    reach = window / cutoff
    lo = np.searchsorted(old_sorted, new_times - reach, side="left")
    hi = np.searchsorted(old_sorted, new_times + reach, side="right")
    for start in range(0, len(new_times), 256):
        stop = min(start + 256, len(new_times))
        a, b = lo[start:stop].min(), hi[start:stop].max()
        if a >= b:
            continue
        weights = lanczos_kernel((new_times[start:stop, None] - old_sorted[None, a:b]) * cutoff, window)
        if normalize:
            totals = weights.sum(1, keepdims=True)
            weights = np.divide(weights, totals, out=np.zeros_like(weights), where=totals != 0)
        out[start:stop] = weights @ vals_sorted[a:b].astype(np.float64)
    return out


# --------------------------------------------------------------------------- runs

def volume_times(run: Run) -> np.ndarray:
    """Sampling time (s after the first acquired volume started) of each volume up to the run's last row."""
    n = run.trimmed_start + run.n_volumes
    return np.arange(n) * run.tr + run.slice_time_ref


def run_features(run: Run, story_features: dict, settings: AlignSettings) -> np.ndarray:
    """The run's stimulus features on its volume grid, from volume 0 of the acquisition.

    ``story_features`` maps story id to ``(times, values)`` with times relative to the
    audio's start; each segment is shifted by its onset in the run.
    """
    grid = volume_times(run)
    total = None
    for seg in run.segments:
        times, values = story_features[seg.story_id]
        x = lanczos_resample(values, np.asarray(times) + seg.onset, grid, window=settings.lanczos_window,
                             cutoff=1.0 / run.tr, normalize=settings.lanczos_normalize)
        total = x if total is None else total + x
    return total


def misalign(story_features: dict, lags: dict, durations: dict) -> dict:
    """The stimulus rotated in time: each story's feature times ``lags[sid]`` seconds later, wrapping at its end.

    What the features of a recording of the story started at another point and played
    round would be: word rate and every feature's own temporal structure are kept, the
    alignment with the responses is not. The design is then built from it exactly as
    from the real stimulus (Lanczos, delays, filter, trims), so a misaligned stimulus is
    compared with the real one on equal terms; rotating the rows of a filtered design
    instead adds a step where its end meets its start.
    """
    out = {}
    for sid, (times, values) in story_features.items():
        out[sid] = ((np.asarray(times, dtype=np.float64) + lags[sid]) % durations[sid], values)
    return out


def misalignment_lags(durations: dict, n_draws: int, seed: int = 0, min_fraction: float = 0.2) -> list[dict]:
    """Per null draw, a lag per story between ``min_fraction`` and ``1 - min_fraction`` of its duration."""
    rng = np.random.default_rng([seed, 7919])
    return [{sid: float(rng.uniform(min_fraction, 1 - min_fraction) * d) for sid, d in sorted(durations.items())}
            for _ in range(n_draws)]


def delay(x: np.ndarray, delays: list[int], *, circular: bool = False) -> np.ndarray:
    """FIR copies ``x[t - d]`` side by side, one block of columns per delay ``d`` (in rows, e.g. TRs).

    Parameters
    ----------
    x : np.ndarray, shape (n, p)
        Features, one row per time point.
    delays : list of int
        Positive delays look back (the response at ``t`` sees the stimulus at ``t - d``);
        negative ones look ahead; 0 copies ``x``.
    circular : bool
        Wrap around the ends (``np.roll``), as the reference's option does; by default the
        rows shifted in are zeros.

    Returns
    -------
    np.ndarray, shape (n, p * len(delays))
    """
    x = np.asarray(x)
    n, p = x.shape
    out = np.zeros((n, p * len(delays)), dtype=x.dtype)
    for k, d in enumerate(int(d) for d in delays):
        block = out[:, k * p:(k + 1) * p]
        if circular:
            block[:] = np.roll(x, d, axis=0)
        elif d >= 0:
            block[d:] = x[: max(n - d, 0)]
        else:
            block[: max(n + d, 0)] = x[-d:]
    return out


def kept_rows(run: Run, settings: AlignSettings, test: bool) -> np.ndarray:
    """Indices of the run's response rows that survive trimming."""
    start, end = settings.trim_trs(run.tr, test)
    absolute = np.arange(run.n_volumes) + run.trimmed_start
    last = run.trimmed_start + run.n_volumes + run.trimmed_end - 1
    keep = (absolute >= start) & (absolute <= last - end)
    if not keep.any():
        raise DataError(f"{run.name}: trimming {start} and {end} TRs leaves no volume of its {run.n_volumes}")
    return np.flatnonzero(keep)


def zscore(x: np.ndarray) -> np.ndarray:
    """Columns to zero mean and unit variance (ddof 0); constant columns (up to rounding) become 0."""
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(0)
    varies = ~constant_columns(x)
    return np.divide(x - x.mean(0), sd, out=np.zeros_like(x), where=varies)


def temporal_filter(x: np.ndarray, tr: float, settings: AlignSettings,
                    confounds: np.ndarray | None = None) -> np.ndarray:
    """The run's nuisance cleaning (``nilearn.signal.clean``), float64; unchanged when there is none.

    A linear detrend and the cosine high-pass of ``settings``, and ``confounds`` (responses
    only) regressed out together with the cosine terms. The same call filters responses
    and features, so that slow components can be neither fitted nor scored.
    """
    x = np.asarray(x, dtype=np.float64)
    if not (settings.detrend or settings.high_pass or confounds is not None):
        return x
    from nilearn.signal import clean

    finite = np.isfinite(x).all(0)
    out = np.zeros_like(x)
    kwargs = {"filter": "cosine", "high_pass": settings.high_pass} if settings.high_pass else {"filter": False}
    if finite.any():  # a run with no finite column (all NaN) has nothing to filter; it is reported later
        out[:, finite] = clean(x[:, finite], detrend=settings.detrend, standardize=None, t_r=tr,
                               confounds=confounds, standardize_confounds=True, **kwargs)
    return out


def run_design(run: Run, story_features: dict, settings: AlignSettings, test: bool) -> np.ndarray:
    """Delayed, filtered, trimmed, z-scored features of one run, aligned to its kept response rows.

    Delays are applied from the first acquired volume (the default preset), then the rows
    the responses have are filtered like them (:func:`temporal_filter`) and trimmed.
    """
    x = run_features(run, story_features, settings)
    in_file = slice(run.trimmed_start, run.trimmed_start + run.n_volumes)  # the rows the responses have
    if settings.preset == "reference":  # the paper: delays after concatenation, features z-scored, not filtered
        return zscore(x[in_file][kept_rows(run, settings, test)])
    x = temporal_filter(delay(x, settings.delay_trs(run.tr))[in_file], run.tr, settings)
    return zscore(x[kept_rows(run, settings, test)])


def delay_concatenated(blocks: list[np.ndarray], settings: AlignSettings, tr: float) -> np.ndarray:
    """Reference preset: concatenate the trimmed stories, then delay across their boundaries."""
    return delay(np.vstack(blocks), settings.delay_trs(tr))


__all__ = ["CONSTANT_RTOL", "AlignSettings", "constant_columns", "delay", "delay_concatenated", "kept_rows", "lanczos_kernel", "lanczos_resample", "misalign", "misalignment_lags",
           "run_design", "run_features", "temporal_filter", "volume_times", "zscore"]

"""Alignment of features to scans: Lanczos, delays, trims, z-scoring."""

from __future__ import annotations

import numpy as np
import pytest

from bidsenc.align import (
    AlignSettings,
    delay,
    kept_rows,
    lanczos_resample,
    run_features,
    volume_times,
    zscore,
)
from bidsenc.bids.experiment import BoldSource, Run, Segment


def _reference_lanczosinterp2D(data, oldtime, newtime, window=3, cutoff_mult=1.0):
    """The reference implementation's formulas, written out directly (full kernel matrix)."""
    cutoff = 1 / np.mean(np.diff(newtime)) * cutoff_mult
    sincmat = np.zeros((len(newtime), len(oldtime)))
    for ndi in range(len(newtime)):
        t = (newtime[ndi] - oldtime) * cutoff
        val = window * np.sin(np.pi * t) * np.sin(np.pi * t / window) / (np.pi ** 2 * t ** 2)
        val[t == 0] = 1.0
        val[np.abs(t) > window] = 0.0
        sincmat[ndi] = val
    return np.dot(sincmat, data)


def _reference_make_delayed(stim, delays):
    """The reference's make_delayed: shifted copies, zero-filled, side by side."""
    nt, ndim = stim.shape
    dstims = []
    for d in delays:
        dstim = np.zeros((nt, ndim))
        if d < 0:
            dstim[:d, :] = stim[-d:, :]
        elif d > 0:
            dstim[d:, :] = stim[:-d, :]
        else:
            dstim = stim.copy()
        dstims.append(dstim)
    return np.hstack(dstims)


def _run(name="sub-01_task-a", n=60, tr=2.0, onset=10.0, trimmed=(0, 0), story="a"):
    return Run(name, {"sub": "01", "task": "a"}, tr, n, tr / 2, BoldSource("nifti", ()),
               (Segment(story, onset),), trimmed_start=trimmed[0], trimmed_end=trimmed[1])


def test_lanczos_matches_the_reference_formula():
    rng = np.random.default_rng(0)
    old = np.sort(rng.uniform(0, 100, 300))
    new = np.arange(50) * 2.0 + 1.0
    values = rng.normal(size=(300, 7))
    ours = lanczos_resample(values, old, new)
    ref = _reference_lanczosinterp2D(values, old, new)
    assert np.abs(ours - ref).max() <= 1e-10
    # unsorted input times give the same result
    perm = rng.permutation(300)
    assert np.abs(lanczos_resample(values[perm], old[perm], new) - ref).max() <= 1e-10


def test_unnormalised_lanczos_carries_the_event_rate():
    """The reference sums words: twice the words per TR, twice the feature (word rate is kept)."""
    new = np.arange(100) * 2.0
    slow = np.arange(0, 200, 1.0)
    fast = np.arange(0, 200, 0.5)
    a = lanczos_resample(np.ones((len(slow), 1)), slow, new)[20:80]
    b = lanczos_resample(np.ones((len(fast), 1)), fast, new)[20:80]
    np.testing.assert_allclose(b / a, 2.0, rtol=0.02)
    # normalised, both are the mean of ones
    np.testing.assert_allclose(lanczos_resample(np.ones((len(fast), 1)), fast, new, normalize=True)[20:80], 1.0,
                               atol=1e-9)


def test_delays_match_the_reference():
    x = np.random.default_rng(1).normal(size=(40, 3))
    np.testing.assert_array_equal(delay(x, [1, 2, 3, 4]), _reference_make_delayed(x, [1, 2, 3, 4]))
    np.testing.assert_array_equal(delay(x, [0, 2]), _reference_make_delayed(x, [0, 2]))


def test_volume_times_and_onsets():
    run = _run(n=10, tr=1.5, onset=-2.0)
    np.testing.assert_allclose(volume_times(run), np.arange(10) * 1.5 + 0.75)
    # a word at 5.0 s in the audio, which started 2 s before the first volume, peaks at 3.0 s
    features = {"a": (np.array([5.0]), np.ones((1, 1)))}
    x = run_features(run, features, AlignSettings())[:, 0]
    assert np.argmax(x) == 1  # volume 1 is sampled at 2.25 s, the closest to 3.0 s


def test_default_delays_never_cross_runs():
    """Run 2's rows of the training design are the same whether run 1 (loud to its end) precedes it or not."""
    from bidsenc.align.design import Responses, features_for

    times_a, times_b = np.arange(0, 110, 0.3), np.arange(30, 110, 0.3)
    rng = np.random.default_rng(0)
    features = {"a": (times_a, 5 + rng.normal(size=(len(times_a), 2))),
                "b": (times_b, rng.normal(size=(len(times_b), 2)))}  # story b is silent for its first 30 s
    run1, run2 = _run("r1", story="a"), _run("r2", story="b", onset=0.0)

    def design(runs, settings):
        rows = [kept_rows(r, settings, test=False) for r in runs]
        resp = Responses(np.zeros((sum(map(len, rows)), 1), np.float32),
                         np.concatenate([np.full(len(r), i) for i, r in enumerate(rows)]), [r.name for r in runs],
                         None, None, np.ones(1, bool), train_runs=runs)
        return features_for(resp, features, settings)[0]

    for settings in (AlignSettings(), AlignSettings(preset="reference")):
        both, alone = design([run1, run2], settings), design([run2], settings)
        n1 = len(both) - len(alone)
        if settings.preset == "default":
            np.testing.assert_array_equal(both[n1:], alone)  # no trace of run 1 in run 2's rows
        else:  # the reference preset delays across the concatenation: run 1's end reaches run 2's start
            assert not np.allclose(both[n1:n1 + 4], alone[:4])
    assert AlignSettings().delay_trs(2.0) == [1, 2, 3, 4] and AlignSettings().delay_trs(1.5) == [2, 3, 4, 5]


def test_trims_count_from_the_acquired_run():
    settings = AlignSettings(preset="reference")
    hf5 = _run(n=343, trimmed=(10, 10))        # ds003020: respdict 363 - 20
    assert len(kept_rows(hf5, settings, test=False)) == 343
    rows = kept_rows(hf5, settings, test=True)  # the first 50 acquired TRs go: 40 more rows
    assert rows[0] == 40 and rows[-1] == 342
    raw = _run(n=363)
    rows = kept_rows(raw, settings, test=False)
    assert rows[0] == 10 and rows[-1] == 363 - 1 - 5
    default = AlignSettings()
    assert default.trim_trs(1.5, test=False) == (14, 7) and default.trim_trs(2.0, test=True) == (50, 5)
    with pytest.raises(Exception, match="leaves no volume"):
        kept_rows(_run(n=10), settings, test=True)


def test_zscore_handles_constant_columns():
    x = np.column_stack([np.arange(10.0), np.ones(10)])
    z = zscore(x)
    assert abs(z[:, 0].mean()) < 1e-12 and abs(z[:, 0].std() - 1) < 1e-12
    assert np.all(z[:, 1] == 0)

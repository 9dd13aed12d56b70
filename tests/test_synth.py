"""The demo generator: its ground truth must be right, or every later test is meaningless."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import soundfile as sf
from scipy.signal import detrend

from bidsenc.synth.bold import canonical_hrf, response_at_volumes, word_feature_grid
from bidsenc.synth.dataset import N_TEST_REPEATS, TEST_STORY


def test_truth_files_exist_and_agree(demo):
    root, truth = demo
    assert json.loads((root / "truth.json").read_text()) == truth
    assert len(truth["participants"]) == 2 and truth["tr"] == 2.0
    roles = [s["role"] for s in truth["stories"].values()]
    assert roles.count("train") == 8 and roles.count("test") == 1
    assert len({s["timing_format"] for s in truth["stories"].values()}) >= 2
    for label, subject in truth["subjects"].items():
        mask = nib.load(root / subject["arrays"]["mask"]).get_fdata().astype(bool)
        assert mask.sum() == subject["n_voxels"] and 2000 <= subject["n_voxels"] <= 6000
        ceiling = np.load(root / subject["arrays"]["ceiling"], allow_pickle=False)
        driven = np.load(root / subject["arrays"]["driven"], allow_pickle=False)
        assert ceiling.shape == driven.shape == (subject["n_voxels"],)
        assert np.all(ceiling[~driven] == 0) and np.all((ceiling[driven] > 0) & (ceiling[driven] < 1))
        assert 0 < (~driven).sum() < driven.sum()  # some pure-noise voxels
        for run in subject["runs"]:
            img = nib.load(root / "ds" / f"sub-{label}" / f"ses-{run['session']}" / "func" /
                           f"{run['name']}_bold.nii.gz")
            assert img.shape[3] == run["n_volumes"] and img.header.get_zooms()[3] == truth["tr"]


def test_audio_is_aligned_to_the_words(demo):
    """Speech energy sits inside the word intervals, silence between them."""
    root, truth = demo
    story = "lantern_audio"
    audio, rate = sf.read(root / "ds" / "stimuli" / f"{story}.wav")
    assert rate == 16000 and audio.ndim == 1
    assert len(audio) / rate == truth["stories"][story]["duration"]
    words = pd.read_csv(root / "ds" / "stimuli" / "gentle" / "lantern" / "align.csv", header=None,
                        names=["word", "aligned", "start", "end"])
    inside = np.zeros(len(audio), bool)
    for start, end in zip(words.start, words.end, strict=True):
        inside[int(start * rate):int(end * rate)] = True
    rms_in = np.sqrt(np.mean(audio[inside] ** 2))
    rms_out = np.sqrt(np.mean(audio[~inside] ** 2))
    assert rms_in > 10 * rms_out


def _schoppe_cc_max(repeats: np.ndarray) -> np.ndarray:
    """CC_max (Schoppe et al. 2016) from repeats (R x T x V), written here for the check."""
    n = repeats.shape[0]
    tp = repeats.var(axis=1, ddof=0).mean(0)
    sp = (n * repeats.mean(0).var(axis=0, ddof=0) - tp) / (n - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1 / np.sqrt(1 + (tp / sp - 1) / n)


def test_true_ceiling_matches_the_repeats(demo):
    """The generator's truth agrees with an estimate from its own simulated repeats."""
    root, truth = demo
    subject = truth["subjects"]["01"]
    mask = nib.load(root / subject["arrays"]["mask"]).get_fdata().astype(bool)
    test_runs = [r for r in subject["runs"] if r["task"] == TEST_STORY]
    assert len(test_runs) == N_TEST_REPEATS
    data = []
    for run in test_runs:
        img = nib.load(root / "ds" / "sub-01" / f"ses-{run['session']}" / "func" / f"{run['name']}_bold.nii.gz")
        y = img.get_fdata(dtype=np.float32)[mask]  # V x T
        data.append(detrend(y / y.mean(1, keepdims=True), axis=1, type="linear").T)
    repeats = np.stack(data)[:, 50:-5]  # the scored volumes: without the first 100 s and the last 10 s
    estimate = _schoppe_cc_max(repeats)
    ceiling = np.load(root / subject["arrays"]["ceiling"], allow_pickle=False)
    driven = np.load(root / subject["arrays"]["driven"], allow_pickle=False)
    ok = np.isfinite(estimate) & driven
    assert ok.mean() > 0.9 * driven.mean()
    assert abs(np.mean(estimate[ok] - ceiling[ok])) < 0.05
    assert np.corrcoef(estimate[ok], ceiling[ok])[0, 1] > 0.8


def test_responses_follow_the_word_timing():
    """A word at t drives the simulated response with the HRF's delay (peak ~5-6 s later)."""
    grid = word_feature_grid(600, ["aa"], np.array([10.0]), np.array([10.3]), 0.0, {"aa": np.ones(2)})
    assert grid[100, 0] > 0 and grid[:100].sum() == 0  # onset bin at 10.0 s
    r = response_at_volumes(grid, tr=0.5, n_volumes=120)
    peak_time = np.argmax(r[:, 0]) * 0.5 + 0.25
    assert 14.5 <= peak_time <= 16.5
    # negative audio onset: words before the first volume are cut, later ones shift
    shifted = word_feature_grid(600, ["aa"], np.array([10.0]), np.array([10.3]), -2.0, {"aa": np.ones(2)})
    assert shifted[80, 0] > 0
    assert abs(canonical_hrf().sum() - 1) < 1e-9

"""The demo generator: its ground truth must be right, or every later test is meaningless."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import soundfile as sf
from scipy.signal import detrend
from scipy.stats import spearmanr

from bidsenc.synth.bold import canonical_hrf, response_at_volumes, word_feature_grid
from bidsenc.synth.brain import TEMPLATE
from bidsenc.synth.dataset import N_TEST_REPEATS, TEST_STORY


def test_truth_files_exist_and_agree(demo):
    root, truth = demo
    assert json.loads((root / "truth.json").read_text()) == truth
    assert len(truth["participants"]) == 2 and truth["tr"] == 2.0
    roles = [s["role"] for s in truth["stories"].values()]
    assert roles.count("train") == 8 and roles.count("test") == 1
    assert len({s["timing_format"] for s in truth["stories"].values()}) >= 2
    fmriprep = root / "ds" / "derivatives" / "fmriprep"
    assert json.loads((fmriprep / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    for label, subject in truth["subjects"].items():
        assert subject["space"] == TEMPLATE and subject["kind"] == "volume"
        mask = nib.load(root / subject["arrays"]["mask"]).get_fdata().astype(bool)
        assert mask.shape == (34, 40, 33) and mask.sum() == subject["n_voxels"] == 8735  # the MNI152 mask at 6 mm
        ceiling = np.load(root / subject["arrays"]["ceiling"], allow_pickle=False)
        driven = np.load(root / subject["arrays"]["driven"], allow_pickle=False)
        assert ceiling.shape == driven.shape == (subject["n_voxels"],)
        assert np.all(ceiling[~driven] == 0) and np.all((ceiling[driven] > 0) & (ceiling[driven] < 1))
        assert 0 < (~driven).sum() < driven.sum()  # some pure-noise voxels (white matter)
        for run in subject["runs"]:
            # what bidsenc analyses: fMRIPrep's layout, on the truth's grid, with its mask and TR
            bold = root / "ds" / run["bold"][0]
            assert bold.parent == fmriprep / f"sub-{label}" / f"ses-{run['session']}" / "func"
            assert bold.name == f"{run['name']}_space-{TEMPLATE}_desc-preproc_bold.nii.gz"
            img = nib.load(bold)
            assert img.shape == (*mask.shape, run["n_volumes"]) and img.header.get_zooms()[3] == truth["tr"]
            assert np.allclose(img.affine, nib.load(root / subject["arrays"]["mask"]).affine)
            brain = nib.load(str(bold).replace("_desc-preproc_bold", "_desc-brain_mask"))
            assert np.array_equal(np.asarray(brain.dataobj) > 0, mask)
            sidecar = json.loads(bold.with_name(bold.name.replace(".nii.gz", ".json")).read_text())
            assert sidecar["RepetitionTime"] == truth["tr"]
            # the raw dataset keeps a coarse rendering of the same run, for discovery
            raw = nib.load(root / "ds" / f"sub-{label}" / f"ses-{run['session']}" / "func" / f"{run['name']}_bold.nii.gz")
            assert raw.shape[3] == run["n_volumes"] and raw.header.get_zooms() == (12.0, 12.0, 12.0, truth["tr"])


def test_driven_share_is_a_smooth_map_on_the_bold_grid(demo):
    """truth/sub-XX_signal.nii.gz: on the BOLD grid, the share the model drives, high in the language regions."""
    root, truth = demo
    for label, subject in truth["subjects"].items():
        signal_img = nib.load(root / subject["arrays"]["signal"])
        bold = nib.load(root / "ds" / subject["runs"][0]["bold"][0])
        assert signal_img.shape == bold.shape[:3] and np.allclose(signal_img.affine, bold.affine)
        signal = signal_img.get_fdata()
        mask = nib.load(root / subject["arrays"]["mask"]).get_fdata() > 0
        snr = np.load(root / subject["arrays"]["snr"], allow_pickle=False)
        driven = np.load(root / subject["arrays"]["driven"], allow_pickle=False)
        # the share of the variance over the story volumes: signal variance snr^2 against noise variance 1
        assert np.allclose(signal[mask], snr**2 / (snr**2 + 1), atol=1e-6) and (signal[~mask] == 0).all()
        assert np.array_equal(signal[mask] > 0, driven)
        # high where the participant's language regions are, weak far from them
        xyz = np.argwhere(mask) @ signal_img.affine[:3, :3].T + signal_img.affine[:3, 3]
        for region in subject["regions"]:
            near = np.linalg.norm(xyz - region["centre_mm"], axis=1) < 8
            assert signal[mask][near].max() > 0.8 * region["peak_share"], region
        assert np.median(signal[mask & (signal > 0)]) < 0.3  # the weak floor, far from the regions
        # smooth: neighbouring driven voxels agree
        inside = np.where(mask & (signal > 0), signal, np.nan)
        for axis in range(3):
            a, b = (np.moveaxis(inside, axis, 0)[s].ravel() for s in (slice(None, -1), slice(1, None)))
            ok = np.isfinite(a) & np.isfinite(b)
            assert np.corrcoef(a[ok], b[ok])[0, 1] > 0.8
        # and the stimulus-driven share measured in the data follows it: over the test repeats, the
        # variance of their mean against the variance within them
        reps = []
        for run in subject["runs"]:
            if run["task"] == TEST_STORY:
                y = nib.load(root / "ds" / run["bold"][0]).get_fdata(dtype=np.float32)[mask].T
                reps.append(detrend(y / y.mean(0), axis=0))
        reps = np.stack(reps)
        noise = reps.var(0, ddof=1).mean(0)
        signal_var = np.maximum(reps.mean(0).var(0) - noise / len(reps), 0)
        measured = signal_var / (signal_var + noise)
        assert spearmanr(measured, signal[mask]).statistic > 0.5


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
        img = nib.load(root / "ds" / run["bold"][0])
        y = img.get_fdata(dtype=np.float32)[mask]  # V x T
        data.append(detrend(y / y.mean(1, keepdims=True), axis=1, type="linear").T)
    repeats = np.stack(data)[:, 50:-5]  # the scored volumes: without the first 100 s and the last 10 s
    estimate = _schoppe_cc_max(repeats)
    ceiling = np.load(root / subject["arrays"]["ceiling"], allow_pickle=False)
    driven = np.load(root / subject["arrays"]["driven"], allow_pickle=False)
    ok = np.isfinite(estimate) & driven
    assert ok.mean() > 0.9 * driven.mean()
    assert abs(np.mean(estimate[ok] - ceiling[ok])) < 0.05
    # most driven voxels sit at the weak floor, where the truth hardly varies: compare across its levels
    est, true = estimate[ok], ceiling[ok]
    high, low = true >= np.quantile(true, 0.9), true <= np.quantile(true, 0.5)
    gap = true[high].mean() - true[low].mean()
    assert gap > 0.1 and abs(est[high].mean() - est[low].mean() - gap) < 0.3 * gap
    assert np.corrcoef(est, true)[0, 1] > 0.5


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

"""The demo generator: its ground truth must be right, or every later test is meaningless."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from scipy.signal import detrend
from scipy.stats import spearmanr

from bidsenc.synth.bold import canonical_hrf, response_at_volumes, word_feature_grid
from bidsenc.synth.brain import SURFACE, TEMPLATE, volume_layout
from bidsenc.synth.dataset import N_TEST_REPEATS, TEST_STORY


@pytest.fixture(scope="module")
def template_demo(tmp_path_factory):
    """The demo's own layout (bidsenc-demo): fMRIPrep derivatives on MNI152 and fsaverage5, no models."""
    from bidsenc.synth import make_demo

    root = tmp_path_factory.mktemp("template-demo")
    return root, make_demo(root, seed=0, with_models=False)


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


def test_template_layout_is_fmriprep_derivatives_on_mni152_and_fsaverage5(template_demo):
    root, truth = template_demo
    assert truth["layout"] == "template" and truth["participants"] == ["01", "02", "03"]
    fmriprep = root / "ds" / "derivatives" / "fmriprep"
    assert json.loads((fmriprep / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    assert [s["kind"] for s in truth["subjects"].values()] == ["volume", "volume", "surface"]
    for label, subject in truth["subjects"].items():
        ceiling = np.load(root / subject["arrays"]["ceiling"], allow_pickle=False)
        driven = np.load(root / subject["arrays"]["driven"], allow_pickle=False)
        assert ceiling.shape == driven.shape == (subject["n_voxels"],)
        assert np.all(ceiling[~driven] == 0) and np.all((ceiling[driven] > 0) & (ceiling[driven] < 1))
        assert 0 < (~driven).sum() < driven.sum()  # pure-noise places: white matter, CSF, medial wall
        if subject["kind"] == "surface":
            assert subject["space"] == SURFACE and subject["n_voxels"] == 2 * 10242
            for run in subject["runs"]:
                assert [Path(b).name for b in run["bold"]] == [
                    f"{run['name']}_hemi-{h}_space-{SURFACE}_bold.func.gii" for h in "LR"]
                left = nib.load(root / "ds" / run["bold"][0])
                assert len(left.darrays) == run["n_volumes"] and left.darrays[0].data.shape == (10242,)
            continue
        assert subject["space"] == TEMPLATE
        mask = nib.load(root / subject["arrays"]["mask"]).get_fdata().astype(bool)
        assert mask.shape == (34, 40, 33) and mask.sum() == subject["n_voxels"] == 8735  # the MNI152 mask at 6 mm
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


def test_driven_share_is_a_smooth_map_on_the_bold_grid(template_demo):
    """truth/sub-XX_signal.nii.gz: on the BOLD grid, the share the stimulus drives, high in the language regions."""
    root, truth = template_demo
    for label in ("01", "02"):
        subject = truth["subjects"][label]
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
        # smooth: neighbouring voxels of grey matter only (partial volumes scale the share) agree
        grey = np.zeros(mask.shape)
        grey[mask] = volume_layout().grey
        inside = np.where(grey == 1, signal, np.nan)
        for axis in range(3):
            a, b = (np.moveaxis(inside, axis, 0)[s].ravel() for s in (slice(None, -1), slice(1, None)))
            ok = np.isfinite(a) & np.isfinite(b)
            assert ok.sum() > 1000 and np.corrcoef(a[ok], b[ok])[0, 1] > 0.8
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


def test_surface_truth_is_zero_on_the_medial_wall(template_demo):
    """sub-03 on fsaverage5: the truth as a GIfTI pair, driven on cortex only, peaking near the regions."""
    from nilearn.datasets import load_fsaverage_data

    root, truth = template_demo
    subject = truth["subjects"]["03"]
    parts = [nib.load(root / path).darrays[0].data for path in subject["arrays"]["signal"]]
    assert [len(p) for p in parts] == [10242, 10242]
    thickness = load_fsaverage_data(mesh=SURFACE, data_type="thickness")
    for hemi, part in zip(("left", "right"), parts, strict=True):
        wall = np.asarray(thickness.data.parts[hemi]) < 1.0
        assert wall.any() and (part[wall] == 0).all() and (part[~wall] > 0).all()
        assert part.max() > 0.6 and np.median(part[~wall]) < 0.35

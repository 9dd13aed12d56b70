"""Inter-subject ceiling: no repeats, several participants on the same runs in one template space."""

from __future__ import annotations

import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from bidsenc.bids.discover import discover, open_dataset
from bidsenc.cli.run import configure
from bidsenc.fit import fit_participant
from builders import make_raw

N_VOLUMES = 240  # one story: 5 buffered outer blocks need about 145 training volumes at TR 1.5 s
LABELS = ("01", "02", "03")


def _dataset(root, space="MNI152NLin2009cAsym"):
    """Three participants, one story run each; the first half of the voxels share a signal (SNR 1)."""
    make_raw(root, participants=LABELS, n_volumes=N_VOLUMES)
    fp = root / "derivatives" / "fmriprep"
    fp.mkdir(parents=True)
    (fp / "dataset_description.json").write_text(json.dumps({
        "Name": "fMRIPrep", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fMRIPrep", "Version": "24.1.1"}]}))
    rng = np.random.default_rng(0)
    shared = rng.normal(size=N_VOLUMES)
    amplitude = np.r_[np.ones(16), np.zeros(16)].reshape(4, 4, 2)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    for label in LABELS:
        func = fp / f"sub-{label}" / "func"
        func.mkdir(parents=True)
        data = amplitude[..., None] * shared + rng.normal(size=(4, 4, 2, N_VOLUMES))
        base = f"sub-{label}_task-story_space-{space}"
        img = nib.Nifti1Image((100 + data).astype(np.float32), affine)
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = 1.5
        nib.save(img, func / f"{base}_desc-preproc_bold.nii.gz")
        (func / f"{base}_desc-preproc_bold.json").write_text(json.dumps({"RepetitionTime": 1.5}))
        nib.save(nib.Nifti1Image(np.ones((4, 4, 2), np.uint8), affine), func / f"{base}_desc-brain_mask.nii.gz")
    return amplitude.ravel() > 0  # C order, as the mask's voxels are read


class RandomSpace:
    name = "random"
    layers = [0]

    def __init__(self, stories):
        rng = np.random.default_rng(1)
        times = np.arange(0, 300, 0.5)
        self.features = {sid: SimpleNamespace(times=times, layers={0: rng.normal(size=(len(times), 4))}, info={})
                         for sid in stories}

    def load(self, sid):
        return self.features[sid]

    def describe(self):
        return {"name": self.name, "kind": "lm", "n_layers": 0}


@pytest.fixture
def experiments(tmp_path):
    signal = _dataset(tmp_path / "ds")
    cfg = configure([str(tmp_path / "ds"), str(tmp_path / "out"), "participant", "--feature", "lm:m",
                     "--n-permutations", "10", "--data-scaling-seeds", "0"])
    dataset = open_dataset(cfg)
    return cfg, {label: discover(dataset, cfg, label) for label in LABELS}, signal


def test_intersubject_ceiling_from_the_other_participants(experiments):
    cfg, exps, signal = experiments
    own = exps["01"]
    result = fit_participant(cfg, own, [RandomSpace(own.stories)], "cpu", peers=[exps["02"], exps["03"]])
    about = result.responses["noise_ceiling"]
    assert about["kind"] == "intersubject" and about["peers"] == ["02", "03"] and "inter-subject" in about["description"]
    ceiling = result.full(result.cc_max)
    # signal and noise of equal power: one participant against the mean of two others correlates at
    # 1/sqrt(3); corrected for the noise of that mean, the ceiling is the true sqrt(s / (s + n)) = 0.707
    assert about["n_others_mean"] == 2
    assert abs(np.median(ceiling[signal]) - np.sqrt(0.5)) < 0.08
    assert np.median(ceiling[~signal]) < 0.25  # noise voxels: small (the correction maps r <= 0 to 0)
    assert (result.summary["fraction_of_ceiling"].notna()).all()


def test_no_peers_or_native_space_means_no_ceiling(experiments, tmp_path):
    cfg, exps, _ = experiments
    own = exps["01"]
    alone = fit_participant(cfg, own, [RandomSpace(own.stories)], "cpu")
    assert alone.cc_max is None and alone.responses["noise_ceiling"]["kind"] == "none"
    native = _dataset(tmp_path / "native", space="T1w") is not None
    cfg2 = configure([str(tmp_path / "native"), str(tmp_path / "o2"), "participant", "--feature", "lm:m",
                      "--n-permutations", "10", "--data-scaling-seeds", "0"])
    ds = open_dataset(cfg2)
    e = {label: discover(ds, cfg2, label) for label in LABELS}
    result = fit_participant(cfg2, e["01"], [RandomSpace(e["01"].stories)], "cpu", peers=[e["02"], e["03"]])
    assert native and result.cc_max is None  # native spaces are never pooled across people


def test_participant_job_finds_its_peers(tmp_path, tiny_lm):
    from bidsenc.cli.run import main
    from bidsenc.derivatives import read_participant

    _dataset(tmp_path / "ds")
    out = tmp_path / "out"
    code = main([str(tmp_path / "ds"), str(out), "participant", "--participant-label", "02", "--feature",
                 f"lm:{tiny_lm}:min_context=32", "-w", str(tmp_path / "w"), "--skip-bids-validation",
                 "--n-permutations", "10", "--data-scaling-seeds", "0"])
    assert code == 0
    result = read_participant(out, "02")
    assert result.responses["noise_ceiling"]["peers"] == ["01", "03"]
    assert list((out / "sub-02" / "func").glob("*_desc-ceiling_stat-isc_statmap.nii.gz"))


def test_own_regions_from_fmriprep_aparcaseg(tmp_path):
    """fMRIPrep's parcellation on the BOLD grid gives each participant regions, used by the group tables."""
    from bidsenc.derivatives import read_participant, write_participant
    from bidsenc.report.group import group_tables

    signal = _dataset(tmp_path / "ds")
    func = tmp_path / "ds" / "derivatives" / "fmriprep" / "sub-01" / "func"
    labels = np.where(signal, 1030, 2030).reshape(4, 4, 2).astype(np.int16)
    nib.save(nib.Nifti1Image(labels, np.diag([3.0, 3.0, 3.0, 1.0])),
             func / "sub-01_task-story_space-MNI152NLin2009cAsym_desc-aparcaseg_dseg.nii.gz")
    cfg = configure([str(tmp_path / "ds"), str(tmp_path / "out"), "participant", "--feature", "lm:m",
                     "--n-permutations", "10", "--data-scaling-seeds", "0"])
    exp = discover(open_dataset(cfg), cfg, "01")
    result = fit_participant(cfg, exp, [RandomSpace(exp.stories)], "cpu")
    assert result.region_names == {1030: "ctx-lh-superiortemporal", 2030: "ctx-rh-superiortemporal"}
    assert np.array_equal(result.region_labels == 1030, signal[result.valid])
    write_participant(result, exp, cfg)
    back = read_participant(tmp_path / "out", "01")
    assert back.region_names == result.region_names and np.array_equal(back.region_labels, result.region_labels)
    regions = group_tables([back], None, 0.3)["regions"]
    assert set(regions["region"]) == {"whole brain", "ctx-lh-superiortemporal", "ctx-rh-superiortemporal"}
    assert regions.set_index("region").loc["ctx-lh-superiortemporal", "n_voxels"] == signal.sum()



def test_intersubject_reliability_inverts_the_noisy_mean():
    from bidsenc.models.ceiling import intersubject_reliability

    rho = np.linspace(0.05, 0.95, 19)
    for k in (1, 2, 5, 50):
        isc = rho ** 2 / np.sqrt(rho ** 2 + (1 - rho ** 2) / k)
        assert np.allclose(intersubject_reliability(isc, k), rho)
    rng = np.random.default_rng(0)  # and on simulated responses: 1 participant against the mean of 3
    shared = rng.normal(size=(20000, 1))
    people = shared + rng.normal(size=(20000, 4)) * 1.5
    r = np.corrcoef(people[:, 0], people[:, 1:].mean(1))[0, 1]
    assert abs(intersubject_reliability(r, 3) - np.sqrt(1 / (1 + 1.5 ** 2))) < 0.02
    assert intersubject_reliability(-0.2, 3) == 0

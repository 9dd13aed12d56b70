"""CIFTI-2 grayordinates (fMRIPrep's ``--cifti-output``): read as time series, fitted, written as dscalar maps.

One story's responses are written twice by fMRIPrep's naming rules, as a volume in MNI
space and as a ``space-fsLR_den-91k`` dense time series holding the same time series
(cortical vertices of both hemispheres, with a medial wall, and a subcortical volume
model), so that every number of the CIFTI path can be checked against the NIfTI path.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bidsenc.cli.run import main as bidsenc

sys.path.insert(0, str(Path(__file__).parent))
from builders import make_drifting_story  # noqa: E402

SHAPE = (6, 6, 5)  # 180 voxels: 70 left cortex, 70 right cortex, 40 in the left thalamus
N_MESH = 162  # vertices per hemisphere mesh (an icosphere); the rest of each mesh is "medial wall"
TR = 2.0
FSAVERAGE5 = 10242  # vertices per hemisphere


def brain_models() -> nib.cifti2.BrainModelAxis:
    rng = np.random.default_rng(1)
    left = np.sort(rng.choice(N_MESH, 70, replace=False))
    right = np.sort(rng.choice(N_MESH, 70, replace=False))
    thalamus = np.zeros((4, 5, 2), bool)
    thalamus.flat[:40] = True
    return (nib.cifti2.BrainModelAxis.from_surface(left, N_MESH, "CortexLeft")
            + nib.cifti2.BrainModelAxis.from_surface(right, N_MESH, "CortexRight")
            + nib.cifti2.BrainModelAxis.from_mask(thalamus, "ThalamusLeft", affine=np.diag([2.0, 2, 2, 1])))


def write_dtseries(path: Path, data: np.ndarray, models, *, step: float = TR) -> None:
    series = nib.cifti2.SeriesAxis(start=0.0, step=step, size=len(data), unit="SECOND")
    img = nib.cifti2.Cifti2Image(data.astype(np.float32), header=(series, models))
    img.nifti_header.set_intent("ConnDenseSeries")
    nib.save(img, path)


def make_cifti_dataset(root: Path, *, participants=("01",), seed: int = 0, fsaverage5: bool = False,
                       surfaces: bool = False) -> dict:
    """:func:`make_drifting_story` per participant, plus fMRIPrep outputs: MNI volume and fsLR grayordinates.

    With ``fsaverage5``, also GIfTI pairs on fsaverage5 (the series on 90 vertices per
    hemisphere, every other vertex constant and so left out of the fit). With
    ``surfaces``, fMRIPrep's fsLR surfaces of each participant in ``anat/`` (icospheres
    with the meshes' vertex count).

    The volume's voxels, in nibabel's (C) order, are the CIFTI's grayordinates in
    order: the two paths fit the same time series.
    """
    fp = root / "derivatives" / "fmriprep"
    fp.mkdir(parents=True, exist_ok=True)
    models = brain_models()
    for i, label in enumerate(participants):
        one = root.parent / f"raw-{label}"
        truth = make_drifting_story(one, shape=SHAPE, minutes=8, seed=seed + i)
        if i == 0:
            for item in one.iterdir():
                if item.name != "sub-01":
                    shutil.copytree(item, root / item.name) if item.is_dir() else shutil.copy(item, root / item.name)
        shutil.copytree(one / "sub-01", root / f"sub-{label}", dirs_exist_ok=True)
        for old in (root / f"sub-{label}" / "func").glob("sub-01_*"):
            old.rename(old.with_name(old.name.replace("sub-01_", f"sub-{label}_")))
        img = nib.load(root / f"sub-{label}" / "func" / f"sub-{label}_task-story_bold.nii.gz")
        data = np.asarray(img.dataobj, np.float32)
        func = fp / f"sub-{label}" / "func"
        func.mkdir(parents=True)
        base = f"sub-{label}_task-story"
        sidecar = json.dumps({"RepetitionTime": TR})
        volume = f"{base}_space-MNI152NLin2009cAsym_desc-preproc_bold"
        nib.save(nib.Nifti1Image(data, np.eye(4)), func / f"{volume}.nii.gz")
        (func / f"{volume}.json").write_text(sidecar)
        nib.save(nib.Nifti1Image(np.ones(SHAPE, np.uint8), np.eye(4)),
                 func / f"{base}_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz")
        series = data.reshape(-1, data.shape[-1]).T
        if surfaces:
            from test_figures import _icosphere, _write_surface

            coords, faces = _icosphere(2)
            assert len(coords) == N_MESH
            (fp / f"sub-{label}" / "anat").mkdir()
            for hemi, dx in (("L", -60.0), ("R", 60.0)):
                _write_surface(fp / f"sub-{label}" / "anat" / f"sub-{label}_hemi-{hemi}_space-fsLR_den-32k_inflated.surf.gii",
                               coords + [dx, 0, 0], faces)
        write_dtseries(func / f"{base}_space-fsLR_den-91k_bold.dtseries.nii", series, models)
        (func / f"{base}_space-fsLR_den-91k_bold.json").write_text(sidecar)
        if fsaverage5:  # the same series on the first 90 vertices of each hemisphere, the rest constant
            for hemi, part in (("L", series[:, :90]), ("R", series[:, 90:])):
                full = np.full((len(series), FSAVERAGE5), 100.0, np.float32)
                full[:, :90] = part
                darrays = [nib.gifti.GiftiDataArray(row) for row in full]
                name = f"{base}_hemi-{hemi}_space-fsaverage5_bold.func.gii"
                nib.save(nib.gifti.GiftiImage(darrays=darrays), func / name)
                (func / name.replace(".func.gii", ".json")).write_text(sidecar)
        truth[label] = truth
    (fp / "dataset_description.json").write_text(json.dumps({
        "Name": "fMRIPrep", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fMRIPrep", "Version": "24.1.1"}]}))
    return {"models": models}


def run(ds: Path, out: Path, *extra: str) -> int:
    return bidsenc([str(ds), str(out), "participant", "--feature", "lowlevel:word_rate", "--skip-bids-validation",
                    "--null-draws", "2", "-w", str(out.parent / "work"), *extra])


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The same responses fitted from the MNI volume and from the fsLR grayordinates."""
    root = tmp_path_factory.mktemp("cifti")
    info = make_cifti_dataset(root / "ds", surfaces=True)
    assert run(root / "ds", root / "volume", "--space", "MNI152NLin2009cAsym", "--no-reports") == 0
    assert run(root / "ds", root / "cifti", "--space", "fsLR") == 0
    return root, info


def test_cifti_maps_are_dscalar_files_with_the_inputs_brain_models_and_the_volume_paths_r(both):
    from bidsenc.derivatives import read_participant

    root, info = both
    func = root / "cifti" / "sub-01" / "func"
    maps = sorted(func.glob("*_statmap.dscalar.nii"))
    r_map = func / "sub-01_task-story_space-fsLR_den-91k_desc-lowlevelWordRate_stat-r_statmap.dscalar.nii"
    assert r_map in maps and len(maps) >= 4
    img = nib.load(r_map)
    assert img.header.get_axis(1) == info["models"]  # the input's grayordinates, in order
    assert isinstance(img.header.get_axis(0), nib.cifti2.ScalarAxis) and img.shape == (1, 180)
    assert img.nifti_header.get_intent()[0] == "ConnDenseScalar"
    assert json.loads(r_map.with_name(r_map.name.replace(".dscalar.nii", ".json")).read_text())["Statistic"] == "r"
    volume = nib.load(root / "volume" / "sub-01" / "func" /
                      "sub-01_task-story_space-MNI152NLin2009cAsym_desc-lowlevelWordRate_stat-r_statmap.nii.gz")
    r_volume = np.asarray(volume.dataobj).reshape(-1)
    r_cifti = np.asarray(img.dataobj)[0]
    assert np.abs(r_cifti).max() > 0.1  # a real effect, not two empty maps
    np.testing.assert_allclose(r_cifti, r_volume, atol=1e-3)
    # the npz arrays are in the same grayordinate order, and the space comes back whole
    result = read_participant(root / "cifti", "01")
    assert result.space.kind == "cifti" and result.space.density == "91k"
    assert result.space.brain_models == info["models"] and result.space.n_vertices == (N_MESH, N_MESH)
    np.testing.assert_allclose(result.full(result.models[0].score_r), r_cifti, atol=1e-6)
    parts = result.space.surface_parts(r_cifti)
    assert parts["left"].shape == (N_MESH,) and np.isnan(parts["left"]).sum() == N_MESH - 70
    left = info["models"].vertex[:70]
    np.testing.assert_array_equal(parts["left"][left], r_cifti[:70])
    report = (root / "cifti" / "sub-01.html").read_text()
    assert "grayordinates" in report  # and the maps drawn on the participant's own fsLR surfaces from fMRIPrep
    assert "lateral and medial views on" in report and "inflated" in report and "index order" not in report


def make_bad(tmp_path: Path, how: str) -> Path:
    ds = tmp_path / "ds"
    make_cifti_dataset(ds)
    path = next((ds / "derivatives" / "fmriprep").rglob("*.dtseries.nii"))
    img = nib.load(path)
    data = np.asarray(img.dataobj).copy()  # a copy: the file is memory-mapped and about to be rewritten
    if how == "dscalar":
        scalars = nib.cifti2.Cifti2Image(data[:3], header=(nib.cifti2.ScalarAxis(["a", "b", "c"]),
                                                             img.header.get_axis(1)))
        nib.save(scalars, path)
    elif how == "step":
        write_dtseries(path, data, img.header.get_axis(1), step=1.0)
    elif how == "truncated":
        content = path.read_bytes()
        path.write_bytes(content[: len(content) - 5000])
    elif how == "models":  # a second run whose grayordinates differ
        for old in list(ds.rglob("sub-01_task-story_*")):
            if old.is_file():
                shutil.copy(old, old.with_name(old.name.replace("_task-story_", "_task-story_run-2_")))
        second = path.with_name(path.name.replace("_task-story_", "_task-story_run-2_"))
        write_dtseries(second, data[:, :150], img.header.get_axis(1)[:150])
        for old in list(ds.rglob("sub-01_task-story_*")):
            if old.is_file() and "_run-2_" not in old.name and "derivatives" not in str(old):
                old.rename(old.with_name(old.name.replace("_task-story_", "_task-story_run-1_")))
        for old in list((ds / "derivatives").rglob("sub-01_task-story_*")):
            if "_run-2_" not in old.name:
                old.rename(old.with_name(old.name.replace("_task-story_", "_task-story_run-1_")))
    return ds


@pytest.mark.parametrize(("how", "said"), [
    ("dscalar", "not a dense time series"),
    ("step", "steps by 1 s but RepetitionTime is 2 s"),
    ("truncated", "truncated or corrupt"),
    ("models", "grayordinates (CIFTI brain models) differ"),
])
def test_bad_cifti_gets_one_line_and_the_data_error_code(tmp_path, capsys, how, said):
    ds = make_bad(tmp_path, how)
    code = run(ds, tmp_path / "out", "--space", "fsLR", "--no-reports")
    err = capsys.readouterr().err
    assert code == 65, err
    lines = [line for line in err.splitlines() if "ERROR" in line]
    assert len(lines) == 1 and said in lines[0] and "Traceback" not in err
    assert not list((tmp_path / "out").rglob("*_statmap.*"))


def test_space_names_a_density_and_a_mask_is_refused(tmp_path, capsys):
    ds = tmp_path / "ds"
    make_cifti_dataset(ds)
    path = next((ds / "derivatives" / "fmriprep").rglob("*.dtseries.nii"))
    shutil.copy(path, path.with_name(path.name.replace("den-91k", "den-170k")))
    code = run(ds, tmp_path / "out", "--space", "fsLR", "--no-reports")
    err = capsys.readouterr().err
    assert code == 64 and "several densities (fsLR:den-170k, fsLR:den-91k)" in err and "--space fsLR:den-170k" in err
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.uint8), np.eye(4)), mask)
    code = run(ds, tmp_path / "out", "--space", "fsLR:den-91k", "--mask", str(mask), "--no-reports")
    err = capsys.readouterr().err
    assert code == 65 and "CIFTI-2 data" in err and "leave out --mask" in err


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """Three participants fitted in fsLR grayordinates and on fsaverage5, and the group level of each."""
    root = tmp_path_factory.mktemp("cifti-group")
    make_cifti_dataset(root / "ds", participants=("01", "02", "03", "04"), fsaverage5=True)
    broken = next((root / "ds" / "derivatives" / "fmriprep" / "sub-04").rglob("*.dtseries.nii"))
    broken.write_bytes(broken.read_bytes()[:-5000])  # sub-04 fails in fsLR, and is not run on fsaverage5
    for space, labels in (("fsLR", ["01", "02", "03", "04"]), ("fsaverage5", ["01", "02", "03"])):
        assert run(root / "ds", root / space, "--space", space, "--no-reports", "--participant-label", *labels) == 0
        assert bidsenc([str(root / "ds"), str(root / space), "group", "--skip-bids-validation"]) == 0
    return root


def test_group_maps_on_grayordinates_and_on_fsaverage5_with_a_sign_flip_test(group):
    import pandas as pd

    from bidsenc.derivatives import read_participant

    results = [read_participant(group / "fsLR", label) for label in ("01", "02", "03")]
    base = group / "fsLR" / "group" / "space-fsLR_den-91k_desc-lowlevelWordRate_stat-{}_statmap.dscalar.nii"
    mean = nib.load(str(base).format("r"))
    assert mean.header.get_axis(1) == brain_models()
    expected = np.mean([r.full(r.models[0].score_r) for r in results], axis=0)
    np.testing.assert_allclose(np.asarray(mean.dataobj)[0], expected, atol=1e-6)
    # three participants: all 8 sign patterns, so p is a multiple of 1/8 and at least 1/8
    logp = np.asarray(nib.load(str(base).format("logp")).dataobj)[0]
    p = 10 ** -logp
    np.testing.assert_allclose(p * 8, np.round(p * 8), atol=1e-4)
    assert p.min() == pytest.approx(1 / 8, rel=1e-4)
    t = np.asarray(nib.load(str(base).format("t")).dataobj)[0]
    r = np.stack([r.full(r.models[0].score_r) for r in results])
    expected_t = r.mean(0) / (r.std(0, ddof=1) / np.sqrt(3))
    np.testing.assert_allclose(t, expected_t, rtol=1e-4, atol=1e-4)
    # where all three r are positive, p is exactly 1/8 (the observed pattern is the largest t)
    assert np.allclose(p[(r > 0).all(0)], 1 / 8, atol=1e-5)
    table = pd.read_csv(group / "fsLR" / "group" / "desc-groupmaps_summary.tsv", sep="\t")
    assert table.loc[0, "n_sign_patterns"] == 8 and table.loc[0, "n_tested"] == 180
    report = (group / "fsLR" / "group.html").read_text()
    assert "sub-04: failed (" in report and "truncated or corrupt" in report  # named with its own error
    assert "sub-04: no outputs (its participant job has not run" in (group / "fsaverage5" / "group.html").read_text()
    maps = report[report.index('id="maps"'):]
    assert "fsLR (den 91k): group maps of 3 participants" in maps and maps.count("<img") >= 2
    assert "no voxel is significant across participants (FDR)" in maps  # 3 participants: p >= 1/8
    # fsaverage5: GIfTI pairs, every vertex of the mesh, drawn on nilearn's bundled mesh
    left = group / "fsaverage5" / "group" / "hemi-L_space-fsaverage5_desc-lowlevelWordRate_stat-r_statmap.func.gii"
    values = nib.load(left).darrays[0].data
    assert values.shape == (FSAVERAGE5,) and np.allclose(values[:90], expected[:90], atol=1e-6)
    assert not values[90:].any()  # constant vertices are not fitted and average to 0
    report = (group / "fsaverage5" / "group.html").read_text()
    assert report[report.index('id="maps"'):].count("<img") >= 2

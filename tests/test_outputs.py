"""BIDS-Derivatives outputs, participant reports and the group level, on the demo data.

The encoding models are fitted with the simulator's own features (two "sizes" of one
oracle family: without and with the word embedding), so the tests need no model and
the group level has a size-scaling curve to fit.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bidsenc import __version__
from bidsenc.bids.discover import discover, open_dataset
from bidsenc.cli.run import configure
from bidsenc.cli.run import main as bidsenc_main
from bidsenc.derivatives import read_participant, write_dataset_files, write_participant
from bidsenc.derivatives.dataset import BIDSIGNORE
from bidsenc.fit import fit_participant
from bidsenc.report.group import group_tables
from bidsenc.report.participant import write_participant_report
from bidsenc.report.scaling import scaling_fits


class Oracle:
    """The simulator's word features as a feature space; ``embedding=False`` keeps rate and length only."""

    layers = [0, 1]

    def __init__(self, root, stories, embedding: bool):
        self.name = "oracle-full" if embedding else "oracle-small"
        emb = np.load(root / "truth" / "word_embedding.npz", allow_pickle=False)
        table = dict(zip(emb["words"].tolist(), emb["vectors"], strict=True))
        self.n_features = 2 + (emb["vectors"].shape[1] if embedding else 0)
        self.features = {}
        for sid, story in stories.items():
            words = story.words.without_non_words()
            x = np.array([[1.0, len(w), *(table[w] if embedding else [])] for w in words.words])
            # layer 1 is layer 0 with noise, so the layers differ and one is chosen
            noisy = x + np.random.default_rng(len(sid)).normal(0, 2.0, x.shape)
            self.features[sid] = SimpleNamespace(times=words.midpoints, layers={0: x, 1: noisy}, info={})

    def load(self, sid):
        return self.features[sid]

    def describe(self):
        return {"name": self.name, "kind": "lm", "model": self.name, "options": {}, "layers": self.layers,
                "n_layers": 1, "n_parameters": 1000 * self.n_features, "model_type": "oracle"}


def _participant(demo, out: Path, work: Path, label: str, *extra):
    root, _ = demo
    cfg = configure([str(root / "ds"), str(out), "participant", "-w", str(work), "--n-permutations", "200",
                     "--data-scaling-seeds", "2", *extra])
    exp = discover(open_dataset(cfg), cfg, label)
    spaces = [Oracle(root, exp.stories, False), Oracle(root, exp.stories, True)]
    result = fit_participant(cfg, exp, spaces, "cpu")
    write_dataset_files(out, cfg.inputs.bids_dir)
    write_participant(result, exp, cfg)
    write_participant_report(out, label, exp.to_dict(), ["a warning for the report"])
    return cfg, exp, result


@pytest.fixture(scope="module")
def written(demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outputs")
    out = tmp / "out"
    runs = {label: _participant(demo, out, tmp / "work", label, "--map-layers", "all") for label in ("01", "02")}
    return out, runs


def _func(out: Path, label: str) -> Path:
    return out / f"sub-{label}" / "func"


def test_maps_agree_with_the_results_in_memory(written, demo):
    out, runs = written
    cfg, exp, result = runs["01"]
    func = _func(out, "01")
    mask = result.space.mask
    for model in result.models:
        desc = {"oracle-small": "oracleSmall", "oracle-full": "oracleFull"}[model.name]
        for layer in model.layers:
            img = nib.load(func / f"sub-01_desc-{desc}Layer{layer}_stat-r_statmap.nii.gz")
            assert np.allclose(img.affine, result.space.affine)
            data = np.asarray(img.dataobj)
            assert np.array_equal(data[mask], result.full(model.stat("r", layer)))
            assert (data[~mask] == 0).all() and np.isfinite(data).all()
        best = f"sub-01_desc-{desc}Layer{model.best_layer}"
        logp = np.asarray(nib.load(func / f"{best}_stat-logp_statmap.nii.gz").dataobj)[mask][result.valid]
        assert np.allclose(10 ** -logp, model.pvalue, rtol=1e-4)
        fdr = np.asarray(nib.load(func / f"{best}_stat-fdr_statmap.nii.gz").dataobj)[mask][result.valid]
        assert np.array_equal(fdr == 1, model.fdr)
        sidecar = json.loads((func / f"{best}_stat-r_statmap.json").read_text())
        assert sidecar["BestLayer"] is True and sidecar["Layer"] == model.best_layer
        assert sidecar["Model"]["name"] == model.name
        for uri in sidecar["Sources"]:  # every source is a BIDS URI that resolves in the input dataset
            assert uri.startswith("bids:raw:") and (cfg.inputs.bids_dir / uri.removeprefix("bids:raw:")).is_file()
    ceiling = np.asarray(nib.load(func / "sub-01_desc-ceiling_stat-ccmax_statmap.nii.gz").dataobj)[mask]
    assert np.array_equal(ceiling, result.full(result.cc_max))
    weights = [np.asarray(nib.load(func / f"sub-01_desc-stacked{d}_stat-weight_statmap.nii.gz").dataobj)[mask]
               for d in ("OracleSmall", "OracleFull")]
    assert np.allclose(np.sum(weights, 0)[result.valid], 1, atol=1e-4)


def test_outputs_read_back_as_written(written):
    out, runs = written
    _, _, result = runs["02"]
    back = read_participant(out, "02")
    assert np.array_equal(back.valid, result.valid) and np.array_equal(back.cc_max, result.cc_max)
    assert np.array_equal(back.space.mask, result.space.mask)
    for a, b in zip(back.models, result.models, strict=True):
        assert a.name == b.name and a.best_layer == b.best_layer and a.family == "oracle"
        assert np.array_equal(a.stats, b.stats) and np.array_equal(a.pvalue, b.pvalue)
    assert np.array_equal(back.stacked.weights, result.stacked.weights)
    pd.testing.assert_frame_equal(back.summary[["model", "layer", "best"]], result.summary[["model", "layer", "best"]])
    assert np.allclose(back.summary["mean_r"], result.summary["mean_r"], rtol=1e-5)
    assert len(back.data_scaling) == len(result.data_scaling) > 0


def test_output_dataset_passes_the_bids_validator(written):
    out, _ = written
    report = _validate(out)
    errors = [i for i in report["issues"]["issues"] if i["severity"] == "error"]
    assert not errors, errors[:3]
    described = json.loads((out / "dataset_description.json").read_text())
    assert described["DatasetType"] == "derivative" and described["GeneratedBy"][0]["Version"] == __version__
    patterns = [line for line in BIDSIGNORE.splitlines() if line and not line.startswith("#")]
    assert not any(p.startswith("sub-") and p.endswith("/") for p in patterns)  # never whole participants
    assert (out / "logs" / "CITATION.md").read_text().count("Antonello") >= 2


def _validate(path: Path) -> dict:
    exe = Path(sys.executable).parent / "bids-validator-deno"
    proc = subprocess.run([str(exe if exe.exists() else "bids-validator-deno"), "--format", "json", str(path)],
                          capture_output=True, text=True, timeout=300)
    return json.loads(proc.stdout)


def _pictures(html_text: str) -> list[np.ndarray]:
    """Every embedded picture, decoded; each must be a real PNG."""
    import matplotlib.image as mpimg

    found = re.findall(r'src="data:image/png;base64,([^"]+)"', html_text)
    return [mpimg.imread(io.BytesIO(base64.b64decode(data)), format="png") for data in found]


def _assert_real_pictures(pictures, at_least: int):
    assert len(pictures) >= at_least
    for pic in pictures:
        assert pic.shape[0] > 150 and pic.shape[1] > 150
        assert np.ptp(pic[..., :3]) > 0.2  # not a blank canvas


def test_participant_report_is_self_contained_with_its_figures(written):
    out, runs = written
    text = (out / "sub-01.html").read_text()
    for heading in ("Data", "Models", "Maps", "Layers", "Noise ceiling", "Stacking", "Data scaling", "Warnings"):
        assert f">{heading}</h2>" in text
    assert "a warning for the report" in text and "festival" in text
    assert not re.search(r'src="(?!data:)', text)  # nothing loaded from elsewhere
    # maps (2 models + CC_norm + ceiling + stacked), layer curves (2), ceiling histogram and scatter,
    # stacking bars and histogram, data scaling
    _assert_real_pictures(_pictures(text), 12)


def test_group_report_and_tables(written):
    out, runs = written
    root = runs["01"][0].inputs.bids_dir
    assert bidsenc_main([str(root), str(out), "group"]) == 0
    text = (out / "group.html").read_text()
    _assert_real_pictures(_pictures(text), 5)
    for heading in ("Overview", "Model size", "Layers", "Training data", "Stacking", "Group maps"):
        assert f">{heading}</h2>" in text
    models = pd.read_csv(out / "group" / "desc-models_summary.tsv", sep="\t")
    assert set(models["participant"].astype(str).str.zfill(2)) == {"01", "02"}
    sizes = pd.read_csv(out / "group" / "desc-sizescaling_summary.tsv", sep="\t")
    row = sizes[(sizes["family"] == "oracle") & (sizes["metric"] == "mean_r")].iloc[0]
    assert row["n_units"] == 2 and row["n_points"] == 2
    assert row["slope"] > 0  # the word embedding drives the simulated voxels: the "bigger" model wins
    assert "native spaces" in text  # the demo is in native space: no group maps, and the report says why
    assert not [i for i in _validate(out)["issues"]["issues"] if i["severity"] == "error"]


def test_group_fit_recovers_a_known_slope():
    rng = np.random.default_rng(0)
    sizes = np.array([125e6, 350e6, 1.3e9, 2.7e9, 6.7e9])
    rows = []
    for p in range(8):
        offset = rng.normal(0, 0.02)
        for n in sizes:
            rows.append({"participant": f"{p:02d}", "family": "opt", "n_parameters": n,
                         "mean_r": 0.05 + offset + 0.03 * np.log10(n) + rng.normal(0, 0.003)})
    fit = scaling_fits(pd.DataFrame(rows), "n_parameters", "mean_r", ["family"]).iloc[0]
    assert abs(fit["slope"] - 0.03) < 0.004
    assert fit["ci_low"] < 0.03 < fit["ci_high"] and fit["ci_high"] - fit["ci_low"] < 0.01
    assert abs(fit["slope_mean"] - 0.03) < 0.004 and fit["n_units"] == 8 and fit["n_points"] == 5


def test_group_tables_fit_slopes_from_participant_results(written):
    """End to end through the group tables: participants' maps built to follow r = a + b log10(N)."""
    out, runs = written
    template = read_participant(out, "01")
    results = []
    for p, b in enumerate((0.02, 0.04, 0.03)):
        models = []
        for n in (1e6, 1e7, 1e8):
            m = template.models[0]
            stats = m.stats.copy()
            stats[:, :, 0] = 0.1 + b * np.log10(n)
            models.append(type(m)(f"m{int(np.log10(n))}", {**m.description, "n_parameters": n}, m.layers, stats,
                                  m.best_layer, m.pvalue, m.fdr))
        results.append(type(template)(f"{p}", template.space, template.valid, models, template.cc_max,
                                      summary=template.summary))
    sizes = group_tables(results, None, 0.3)["sizescaling"]
    row = sizes[sizes["metric"] == "mean_r"].iloc[0]
    assert np.isclose(row["slope"], 0.03, atol=1e-6) and row["ci_low"] < 0.02 and row["ci_high"] > 0.04


def _copy(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    for path in copy.glob("group*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return copy


def test_group_skips_partial_and_foreign_participants(written, tmp_path, caplog):
    out, runs = written
    root = runs["01"][0].inputs.bids_dir
    copy = _copy(out, tmp_path)
    next(_func(copy, "02").glob("*oracleFull_encoding.npz")).unlink()  # a participant with a file missing
    (copy / "sub-03" / "func").mkdir(parents=True)  # one that never finished
    # a map of an earlier group run, when sub-02 was complete: not left beside this run's tables
    stale = copy / "group" / "space-MNI152NLin2009cAsym_desc-oracleFull_stat-r_statmap.nii.gz"
    stale.parent.mkdir()
    stale.write_bytes(b"mean of sub-01 and sub-02")
    assert bidsenc_main([str(root), str(copy), "group"]) == 0
    assert not stale.exists() and (copy / "group" / "desc-models_summary.tsv").exists()
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith(".group")) == []  # no staging left
    log = "".join(p.read_text() for p in (copy / "logs").glob("*/bidsenc.log"))
    assert "skipping sub-02: 1 output file(s) missing" in log and "skipping sub-03: no complete outputs" in log
    models = pd.read_csv(copy / "group" / "desc-models_summary.tsv", sep="\t", dtype={"participant": str})
    assert set(models["participant"]) == {"01"}
    # outputs of another version are never mixed in silently
    marker = next(_func(copy, "01").glob("*_desc-models_summary.json"))
    marker.write_text(marker.read_text().replace(f'"Version": "{__version__}"', '"Version": "0.0.1"'))
    assert bidsenc_main([str(root), str(copy), "group"]) == 66


def test_group_with_no_participant_outputs_exits_66(demo, tmp_path, capsys):
    root, _ = demo
    assert bidsenc_main([str(root / "ds"), str(tmp_path / "empty"), "group"]) == 66
    assert "no complete participant outputs" in capsys.readouterr().err


def test_another_version_in_output_dir_is_warned_about(written, tmp_path, caplog):
    out, runs = written
    copy = _copy(out, tmp_path)
    described = copy / "dataset_description.json"
    described.write_text(described.read_text().replace(f'"Version": "{__version__}"', '"Version": "0.0.1"'))
    with caplog.at_level("WARNING", logger="bidsenc"):
        write_dataset_files(copy, runs["01"][0].inputs.bids_dir)
    assert "holds results of bidsenc 0.0.1" in caplog.text


def test_atlas_regions_and_a_mismatched_atlas(written, tmp_path, capsys):
    out, runs = written
    cfg, _, result = runs["01"]
    copy = _copy(out, tmp_path)
    mask = result.space.mask
    labels = np.zeros(mask.shape, np.int16)
    labels[: mask.shape[0] // 2][mask[: mask.shape[0] // 2]] = 1
    labels[mask.shape[0] // 2:][mask[mask.shape[0] // 2:]] = 2
    nib.save(nib.Nifti1Image(labels, result.space.affine), tmp_path / "atlas.nii.gz")
    (tmp_path / "atlas.tsv").write_text("index\tname\n1\tleft\n2\tright\n")
    root = cfg.inputs.bids_dir
    args = [str(root), str(copy), "group", "--atlas-labels", str(tmp_path / "atlas.tsv")]
    assert bidsenc_main([*args, "--atlas", str(tmp_path / "atlas.nii.gz")]) == 0
    regions = pd.read_csv(copy / "group" / "desc-regions_summary.tsv", sep="\t")
    assert set(regions["region"]) == {"whole brain", "left", "right"}
    one = regions[(regions["participant"] == 1) & (regions["model"] == "oracle-full")].set_index("region")
    best = result.model("oracle-full").stat("r")
    left = result.space.from_volume(labels)[result.valid] == 1
    assert np.isclose(one.loc["left", "mean_r"], best[left].mean(), rtol=1e-4)
    assert one.loc["left", "n_voxels"] + one.loc["right", "n_voxels"] == one.loc["whole brain", "n_voxels"]
    assert ">Regions</h2>" in (copy / "group.html").read_text()
    nib.save(nib.Nifti1Image(labels[:-1], result.space.affine), tmp_path / "small.nii.gz")
    assert bidsenc_main([*args, "--atlas", str(tmp_path / "small.nii.gz")]) == 65
    assert "does not match the space of sub-01" in capsys.readouterr().err


def test_pycortex_voxel_order_round_trips():
    """ds003020 numbers the voxels of pycortex's transposed (z, y, x) mask; maps must land where they came from."""
    from bidsenc.bids.bold import Space

    rng = np.random.default_rng(1)
    mask = rng.random((5, 6, 4)) > 0.5
    values = rng.random(int(mask.sum())).astype(np.float32)
    space = Space("volume", int(mask.sum()), None, mask=mask, affine=np.eye(4), voxel_order="F")
    volume = space.to_volume(values)
    zyx = np.zeros(mask.T.shape, np.float32)
    zyx[mask.T] = values  # pycortex: Volume(data) fills mask.T in C order
    assert np.array_equal(volume, zyx.T)
    assert np.array_equal(space.from_volume(volume), values)


def test_surface_maps_are_gifti_per_hemisphere(written, tmp_path):
    from bidsenc.bids.bold import Space

    out, runs = written
    cfg, exp, result = runs["01"]
    n = result.valid.size
    surface = Space("surface", n, "fsaverage5", n_vertices=(n // 2, n - n // 2))
    surf_result = type(result)(result.participant, surface, result.valid, result.models, result.cc_max,
                               result.stacked, result.summary, result.data_scaling, result.responses)
    cfg2 = configure([str(cfg.inputs.bids_dir), str(tmp_path / "surf"), "participant"])
    func = write_participant(surf_result, exp, cfg2)
    model = result.models[0]
    left = nib.load(next(func.glob(f"sub-01_hemi-L_space-fsaverage5_desc-oracleSmallLayer{model.best_layer}_stat-r_statmap.func.gii")))
    right = nib.load(next(func.glob(f"sub-01_hemi-R_space-fsaverage5_desc-oracleSmallLayer{model.best_layer}_stat-r_statmap.func.gii")))
    both = np.concatenate([left.darrays[0].data, right.darrays[0].data])
    assert np.array_equal(both, result.full(model.stat("r")))
    assert read_participant(tmp_path / "surf", "01").space.n_vertices == surface.n_vertices


def test_two_participant_jobs_at_once_leave_a_valid_dataset(demo, tiny_lm, tmp_path):
    root, _ = demo
    out = tmp_path / "out"
    jobs = [subprocess.Popen([sys.executable, "-m", "bidsenc", str(root / "ds"), str(out), "participant",
                              "--participant-label", label, "--feature", f"lm:{tiny_lm}:min_context=32", "-w", str(tmp_path / "w"),
                              "--skip-bids-validation", "--n-permutations", "100", "--data-scaling-seeds", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for label in ("01", "02")]
    for job in jobs:
        _, err = job.communicate(timeout=600)
        assert job.returncode == 0, err[-2000:]
    report = _validate(out)
    assert not [i for i in report["issues"]["issues"] if i["severity"] == "error"]
    for label in ("01", "02"):
        assert read_participant(out, label).models[0].stats.shape[0] == 3  # every layer of the tiny LM
        assert (out / f"sub-{label}.html").is_file()
    assert not list(out.rglob(".*.tmp")) and not list(out.rglob(".func.*"))  # no temporary files left


def test_a_failed_participant_still_gets_a_report(demo, tmp_path):
    root, _ = demo
    out = tmp_path / "out"
    code = bidsenc_main([str(root / "ds"), str(out), "participant", "--participant-label", "01", "--feature",
                         "lm:/nonexistent/model", "-w", str(tmp_path / "w"), "--skip-bids-validation"])
    assert code == 66
    text = (out / "sub-01.html").read_text()
    assert "Run failed" in text and "/nonexistent/model" in text and ">Data</h2>" in text
    assert (out / "dataset_description.json").is_file() and (out / ".bidsignore").is_file()
    assert not (out / "sub-01" / "func").exists()  # nothing that looks like a complete result


@pytest.mark.parametrize("kind", ["fsaverage5", "MNI152NLin2009cAsym"])
def test_brain_views_draw_real_pictures(kind):
    """Surface maps on nilearn's bundled fsaverage5 mesh, glass brains for MNI volumes (nothing downloaded)."""
    from bidsenc.bids.bold import Space
    from bidsenc.report.figures import brain_map

    rng = np.random.default_rng(0)
    if kind == "fsaverage5":
        space = Space("surface", 20484, kind, n_vertices=(10242, 10242))
    else:
        mask = np.zeros((40, 48, 40), bool)
        mask[8:32, 8:40, 8:32] = True
        space = Space("volume", int(mask.sum()), kind, mask=mask, affine=np.array(
            [[4, 0, 0, -80], [0, 4, 0, -112], [0, 0, 4, -70], [0, 0, 0, 1.0]]))
    tag = brain_map(space, rng.random(space.n_voxels), "r")
    _assert_real_pictures(_pictures(tag), 1)


def test_ds003020_responses_map_into_the_pycortex_reference_volume(tmp_path, caplog):
    """With derivative/pycortex-db's cortical mask, ds003020's voxel columns become a NIfTI volume; without, arrays."""
    from builders import make_ds003020

    from bidsenc.bids.bold import load_responses
    from conftest import shared

    root = tmp_path / "ds"
    make_ds003020(root, shared("ds003020-meta"), n_voxels=20)
    cfg = configure([str(root), str(tmp_path / "out"), "participant", "--feature", "lm:m"])
    exp = discover(open_dataset(cfg), cfg, "UTS01")
    with caplog.at_level("WARNING", logger="bidsenc"):
        _, space = load_responses(exp.runs[:2])
    assert space.kind == "index" and "maps are written as arrays" in caplog.text
    mask = np.zeros((6, 5, 4), bool)
    mask.T.flat[np.random.default_rng(0).choice(mask.size, 20, replace=False)] = True
    affine = np.diag([2.5, 2.5, 3.0, 1.0])
    folder = root / "derivative" / "pycortex-db" / "UTS01" / "transforms" / "UTS01_auto"
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), folder / "mask_thick.nii.gz")
    responses, space = load_responses(exp.runs[:2])
    assert space.kind == "volume" and space.voxel_order == "F" and np.allclose(space.affine, affine)
    column = np.arange(20, dtype=np.float32)
    zyx = np.zeros(mask.T.shape, np.float32)
    zyx[mask.T] = column  # pycortex's numbering of the cortical voxels
    assert np.array_equal(space.to_volume(column), zyx.T)


def _without_first_voxels(result, k):
    """The same participant with the first ``k`` voxels of its mask removed (every array cut to match)."""
    import dataclasses

    assert result.valid.all()
    keep = np.arange(result.valid.size) >= k
    mask = result.space.mask.copy()
    mask[tuple(np.argwhere(mask)[:k].T)] = False
    space = dataclasses.replace(result.space, mask=mask, n_voxels=int(mask.sum()))
    models = [dataclasses.replace(m, stats=m.stats[:, keep], pvalue=m.pvalue[keep], fdr=m.fdr[keep])
              for m in result.models]
    return dataclasses.replace(result, space=space, valid=result.valid[keep], models=models,
                               cc_max=result.cc_max[keep], stacked=None)


def test_group_maps_when_participants_share_a_template_space(written, tmp_path):
    """Each participant's own mask places its voxels; the mean is over the participants fitted at each voxel."""
    from bidsenc.report.group import group_maps

    out, _ = written
    results = [read_participant(out, label) for label in ("01", "02")]
    for r in results:
        r.space.name = None
    assert group_maps(results, tmp_path)[0] == {}  # native spaces: none
    results[1] = _without_first_voxels(results[1], 300)  # masks differ between people on one template grid
    for r in results:
        r.space.name = "MNI152NLin2009cAsym"
    maps, notes, significance = group_maps(results, tmp_path, n_permutations=100)
    assert "MNI152NLin2009cAsym: group maps of 2 participants (sub-01, sub-02)" in notes[-1]
    name = results[0].models[1].name
    volumes = [r.space.to_volume(r.full(r.model(name).stat("r"))) for r in results]
    counts = [r.space.to_volume(r.valid.astype(np.float32)) for r in results]
    expected = np.where(sum(counts) > 0, sum(volumes) / np.maximum(sum(counts), 1), 0)
    img = nib.load(tmp_path / "space-MNI152NLin2009cAsym_desc-oracleFull_stat-r_statmap.nii.gz")
    assert np.allclose(np.asarray(img.dataobj), expected, atol=1e-6)
    space, values = maps[("MNI152NLin2009cAsym", name, "r")]
    assert np.allclose(space.to_volume(values), expected, atol=1e-6)
    only_one = (counts[0] > 0) ^ (counts[1] > 0)
    assert only_one.any() and np.allclose(expected[only_one], (volumes[0] + volumes[1])[only_one])
    # the group test runs on the voxels both have: two participants give 4 sign patterns, p >= 1/4
    row = significance.set_index("model").loc[name]
    assert row["n_tested"] == (counts[0] * counts[1] > 0).sum() and row["n_sign_patterns"] == 4
    logp = np.asarray(nib.load(tmp_path / "space-MNI152NLin2009cAsym_desc-oracleFull_stat-logp_statmap.nii.gz")
                      .dataobj)
    assert logp.max() == pytest.approx(np.log10(4), abs=1e-5) and row["n_significant"] == 0


def test_group_maps_keep_apart_grids_that_share_a_template_name(written, tmp_path):
    """One template name, two voxel sizes (fMRIPrep writes a template at each dataset's own resolution)."""
    import dataclasses
    import json

    from bidsenc.report.group import group_maps

    out, _ = written
    fine = [read_participant(out, label) for label in ("01", "02")]
    coarse = [read_participant(out, label) for label in ("01", "02")]
    coarse = [dataclasses.replace(r, participant=f"1{r.participant}",
                                  space=dataclasses.replace(r.space, affine=r.space.affine * [[2], [2], [2], [1]]))
              for r in coarse]
    for r in fine + coarse:
        r.space.name = "MNI152NLin2009cAsym"
    name = fine[0].models[1].name
    for r in coarse:  # the coarse group's r is its own: minus the fine group's
        r.models[1].stats[:] *= -1
    maps, _, significance = group_maps(fine + coarse, tmp_path, n_permutations=100)
    assert len(significance[significance["model"] == name]) == 2
    labels = sorted({key[0] for key in maps})
    assert len(labels) == 2 and all("MNI152NLin2009cAsym (res " in label for label in labels)
    expected = np.mean([r.space.to_volume(r.full(r.model(name).stat("r"))) for r in fine], axis=0)
    for res, sign, group in (("1", 1, fine), ("2", -1, coarse)):
        base = tmp_path / f"space-MNI152NLin2009cAsym_res-{res}_desc-oracleFull_stat-r_statmap"
        img = nib.load(f"{base}.nii.gz")
        assert np.allclose(img.affine, group[0].space.affine)
        assert np.allclose(np.asarray(img.dataobj), sign * expected, atol=1e-6)
        voxel = " x ".join(f"{v:.3g}" for v in np.abs(np.diag(group[0].space.affine)[:3]))
        assert json.loads(Path(f"{base}.json").read_text())["Resolution"].startswith(f"{voxel} mm voxels")
    assert not list(tmp_path.glob("space-MNI152NLin2009cAsym_desc-*"))  # no unqualified name to overwrite


def test_banded_ridge_outputs(demo, tmp_path):
    _, _, result = _participant(demo, tmp_path / "out", tmp_path / "work", "01", "--banded-ridge",
                                "--data-scaling-seeds", "0")
    b = result.banded
    assert b.names == ["oracle-small", "oracle-full"] and b.r.mean() > 0.3
    # rate and length are inside the full oracle too: the small one adds nothing to the joint fit
    assert abs(b.r2_split[0].mean()) < 0.01 and b.r2_split[1].mean() > 0.1
    back = read_participant(tmp_path / "out", "01")
    assert np.array_equal(back.banded.r2_split, b.r2_split)
    func = _func(tmp_path / "out", "01")
    split = np.asarray(nib.load(func / "sub-01_desc-bandedOracleFull_stat-r2split_statmap.nii.gz").dataobj)
    assert np.array_equal(split[result.space.mask], result.full(b.r2_split[1]))
    assert ">Banded ridge</h2>" in (tmp_path / "out" / "sub-01.html").read_text()
    assert "banded" in set(back.summary["model"])


def test_a_participant_with_only_constant_voxels_is_skipped(demo, tiny_lm, tmp_path):
    root, _ = demo
    ds = tmp_path / "ds"
    shutil.copytree(root / "ds", ds)
    for path in (ds / "sub-02").rglob("*_bold.nii.gz"):
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.full(img.shape, 100, np.int16), img.affine, img.header), path)
    common = ["--feature", f"lm:{tiny_lm}:min_context=32", "-w", str(tmp_path / "w"), "--skip-bids-validation",
              "--n-permutations", "10", "--data-scaling-seeds", "0", "--no-reports"]
    out = tmp_path / "out"
    assert bidsenc_main([str(ds), str(out), "participant", *common]) == 0
    log = "".join(p.read_text() for p in (out / "logs").glob("*/bidsenc.log"))
    assert "skipped sub-02: run(s) sub-02_ses-1_task-" in log and "hold no usable signal" in log
    assert "1 of 2 participants skipped" in log
    assert read_participant(out, "01").models and not (out / "sub-02" / "func").exists()
    assert bidsenc_main([str(ds), str(tmp_path / "o2"), "participant", "--participant-label", "02", *common]) == 65


def test_gifti_label_atlas_on_a_surface(tmp_path):
    from bidsenc.bids.bold import Space
    from bidsenc.errors import DataError
    from bidsenc.report.group import load_atlas

    paths = []
    for hemi, labels in (("L", [1, 1, 2, 0]), ("R", [2, 2, 1, 1])):
        img = nib.gifti.GiftiImage(darrays=[nib.gifti.GiftiDataArray(np.array(labels, np.int32),
                                                                     intent="NIFTI_INTENT_LABEL")])
        paths.append(tmp_path / f"atlas_hemi-{hemi}.label.gii")
        nib.save(img, paths[-1])
    (tmp_path / "names.tsv").write_text("index\tname\n1\tauditory\n2\tlanguage\n")
    atlas = load_atlas(paths, tmp_path / "names.tsv")
    space = Space("surface", 8, "fsaverage", n_vertices=(4, 4))
    assert list(atlas.for_space(space, "sub-01")) == [1, 1, 2, 0, 2, 2, 1, 1]
    with pytest.raises(DataError, match="has 8 vertices, sub-01 10"):
        atlas.for_space(Space("surface", 10, "fsaverage", n_vertices=(5, 5)), "sub-01")
    with pytest.raises(DataError, match="expected a TSV with the columns index and name"):
        (tmp_path / "bad.tsv").write_text("label\tregion\n1\tx\n")
        load_atlas(paths, tmp_path / "bad.tsv")


def test_stacking_baseline_is_chosen_by_training_score_not_test_score(written):
    out, runs = written
    result = read_participant(out, "01")
    small, full = result.model("oracle-small"), result.model("oracle-full")
    single = result.best_single_r(["oracle-small", "oracle-full"])
    by_cv = small.stat("cv_score") >= full.stat("cv_score")  # ties go to the first model
    assert np.array_equal(single, np.where(by_cv, small.stat("r"), full.stat("r")))
    # where the two disagree, the test-score maximum would flatter the single model
    assert (single <= np.maximum(small.stat("r"), full.stat("r"))).all()
    assert (single < np.maximum(small.stat("r"), full.stat("r"))).any()


def test_sessions_get_their_own_folders_and_analyses_never_clobber_each_other(demo, tmp_path):
    from bidsenc.derivatives import PartialOutputError

    out = tmp_path / "out"
    for session in ("1", "2", "1"):  # session 1 twice: a rerun replaces its own files only
        _participant(demo, out, tmp_path / "work", "01", "--session-label", session, "--data-scaling-seeds", "0",
                     "--n-permutations", "20")
    for session in ("1", "2"):
        func = out / "sub-01" / f"ses-{session}" / "func"
        names = [p.name for p in func.iterdir()]
        assert f"sub-01_ses-{session}_desc-models_summary.json" in names
        assert all(n.startswith(f"sub-01_ses-{session}_") for n in names)
        marker = json.loads((func / f"sub-01_ses-{session}_desc-models_summary.json").read_text())
        assert sorted(marker["Files"]) == sorted(n for n in names if not n.endswith("_desc-models_summary.json"))
    assert not (out / "sub-01" / "func").exists()
    assert not [i for i in _validate(out)["issues"]["issues"] if i["severity"] == "error"]
    with pytest.raises(PartialOutputError, match="2 analyses"):
        read_participant(out, "01")


def test_reports_only_rewrites_the_reports_from_the_outputs(written, tmp_path):
    out, runs = written
    copy = _copy(out, tmp_path)
    for label in ("01", "02"):
        (copy / f"sub-{label}.html").unlink()
    root = runs["01"][0].inputs.bids_dir
    assert bidsenc_main([str(root), str(copy), "participant", "--reports-only"]) == 0
    for label in ("01", "02"):
        text = (copy / f"sub-{label}.html").read_text()
        assert ">Models</h2>" in text and ">Maps</h2>" in text
        _assert_real_pictures(_pictures(text), 10)
    assert not list((copy / "logs").glob("*/features-*.json"))  # nothing was extracted or fitted

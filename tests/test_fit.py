"""Encoding models on the demo data, against the generator's ground truth."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from bidsenc.bids.discover import discover, open_dataset
from bidsenc.cli.run import configure
from bidsenc.fit import fit_participant
from bidsenc.models.stats import fdr_bh
from bidsenc.results import LAYER_STATS


class OracleSpace:
    """The simulator's own word features (rate, length, embedding) as a feature space."""

    name = "oracle"
    layers = [0]

    def __init__(self, root, stories):
        emb = np.load(root / "truth" / "word_embedding.npz", allow_pickle=False)
        table = dict(zip(emb["words"].tolist(), emb["vectors"], strict=True))
        self.features = {}
        for sid, story in stories.items():
            words = story.words.without_non_words()
            x = np.array([[1.0, len(w), *table[w]] for w in words.words])
            self.features[sid] = SimpleNamespace(times=words.midpoints, layers={0: x}, info={})

    def load(self, sid):
        return self.features[sid]

    def describe(self):
        return {"name": self.name, "kind": "lm", "n_layers": 0, "n_parameters": 3, "model_type": "oracle"}


def _fit(demo, tmp_path, shift=0.0, label="01", *extra):
    root, truth = demo
    cfg = configure([str(root / "ds"), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                     "--n-permutations", "500", *extra])
    exp = discover(open_dataset(cfg), cfg, label)
    if shift:
        exp.runs = [dataclasses.replace(r, segments=tuple(dataclasses.replace(s, onset=s.onset + shift)
                                                         for s in r.segments)) for r in exp.runs]
    result = fit_participant(cfg, exp, [OracleSpace(root, exp.stories)], "cpu")
    on_grid, inside = truth_on_grid(demo, result, label)
    return _arrays(result), result.full(result.cc_max), on_grid, inside


def _arrays(result):
    """The oracle model's statistics on every voxel of the space (0 where not fitted)."""
    model = result.models[0]
    return {"stats": np.stack([result.full(layer) for layer in model.stats]), "best_layer": model.best_layer,
            "stat_names": list(LAYER_STATS), "pvalue": np.where(result.valid, result.full(model.pvalue), 1.0),
            "fdr": result.full(model.fdr).astype(bool), "result": result}


def truth_on_grid(demo, result, label):
    """The truth (in its own mask's voxel order) on bidsenc's voxels."""
    root, truth = demo
    subject = truth["subjects"][label]
    true_mask = nib.load(root / subject["arrays"]["mask"]).get_fdata() > 0
    on_grid = {}
    for key in ("ceiling", "driven"):
        vol = np.full(true_mask.shape, np.nan)
        vol[true_mask] = np.load(root / subject["arrays"][key], allow_pickle=False)
        on_grid[key] = vol[result.space.mask]
    return on_grid, np.isfinite(on_grid["ceiling"]) & result.valid


@pytest.fixture(scope="module")
def fitted(demo, tmp_path_factory):
    return _fit(demo, tmp_path_factory.mktemp("fit"))


def test_test_r_reaches_the_true_ceiling(fitted):
    result, _, truth, inside = fitted
    r = result["stats"][0, :, 0]
    driven = inside & (truth["driven"] == 1) & (truth["ceiling"] > 0.2)
    ratio = np.median(r[driven] / truth["ceiling"][driven])
    assert ratio >= 0.7, ratio
    assert result["best_layer"] == 0 and list(result["stat_names"]) == ["r", "r2", "cc_norm", "alpha", "cv_score"]


def test_data_scaling_refits_on_story_subsets(fitted):
    result = fitted[0]["result"]
    table = result.data_scaling
    n_stories = len(result.responses["train_stories"])
    assert sorted(table["n_stories"].unique()) == [1, 2, 4, n_stories]
    assert list(table.groupby("n_stories").size()) == [3, 3, 3, 1]  # three seeds, one full set
    subsets = table[table["n_stories"] == 2]["stories"]
    assert subsets.nunique() > 1 and all(len(s.split(",")) == 2 for s in subsets)
    # the full set with the same folds is the main fit, and more stories predict better
    full = table[table["n_stories"] == n_stories].iloc[0]
    assert np.isclose(full["mean_r"], result.models[0].stat("r").mean(), atol=1e-6)
    by_size = table.groupby("n_stories")["mean_r"].mean()
    assert by_size.iloc[-1] > by_size.iloc[0] + 0.05
    assert table.groupby("n_stories")["n_volumes"].mean().is_monotonic_increasing
    assert np.allclose(table["hours"], table["n_volumes"] * result.responses["tr"] / 3600)


def test_shifted_onsets_collapse_the_fit(demo, tmp_path):
    result, _, truth, inside = _fit(demo, tmp_path, shift=10.0)
    r = result["stats"][0, :, 0]
    driven = inside & (truth["driven"] == 1) & (truth["ceiling"] > 0.2)
    assert np.median(r[driven] / truth["ceiling"][driven]) < 0.3


def test_noise_voxels_have_uniform_pvalues(fitted):
    result, _, truth, inside = fitted
    noise = inside & (truth["driven"] == 0)
    assert noise.sum() > 300
    p = result["pvalue"][noise]
    # every allowed circular shift is used once, so p takes the values k/m: uniform on that grid means
    # P(p <= k/m) = k/m, checked at each step of the grid within a binomial band (a KS test against the
    # continuous uniform would reject the grid itself once there are thousands of noise voxels)
    grid = np.unique(p)
    assert len(grid) >= 10 and np.allclose(grid[:5], np.arange(1, 6) / round(1 / grid[0]), atol=1e-6)
    observed = np.array([(p <= g + 1e-6).mean() for g in grid])
    assert np.all(np.abs(observed - grid) <= 4 * np.sqrt(grid * (1 - grid) / len(p)) + 1e-9)
    assert fdr_bh(p, q=0.05).sum() <= 3  # on pure noise, FDR finds at most a few
    # over all voxels, the share of false discoveries stays near q
    found = result["fdr"] & inside
    assert (found & (truth["driven"] == 0)).sum() / found.sum() <= 0.06
    driven = inside & (truth["driven"] == 1) & (truth["ceiling"] > 0.5)
    assert result["fdr"][driven].mean() > 0.9


def test_ceiling_estimate_matches_truth(fitted):
    _, ceiling, truth, inside = fitted
    driven = inside & (truth["driven"] == 1)
    assert abs(np.mean(ceiling[driven] - truth["ceiling"][driven])) < 0.05


def test_reference_preset_runs_and_fits(demo, tmp_path):
    result, ceiling, truth, inside = _fit(demo, tmp_path, 0.0, "01", "--preset", "reference")
    r = result["stats"][0, :, 0]
    driven = inside & (truth["driven"] == 1) & (truth["ceiling"] > 0.2)
    assert np.median(r[driven] / truth["ceiling"][driven]) >= 0.6
    alphas = result["stats"][0, :, 3]
    grid = np.logspace(1, 4, 15) ** 2  # the reference grid, in the alpha-squared convention
    assert np.isclose(alphas[:, None], grid[None], rtol=1e-5).any(1).all()
    fitted = result["result"]
    # no floor in effect (the reference's floor line is commented out), its TP = 1 / ddof = 1 convention
    assert fitted.responses["noise_ceiling"]["convention"] == "reference"
    assert ceiling[inside].min() < 0.25
    selection = fitted.responses["alpha_selection"]
    assert (selection["bootstraps"], selection["chunk_len"], selection["score"]) == (50, 40, "reference")
    assert selection["n_splits"] == 50


def _without_repeats(demo, tmp_path, keep):
    root, truth = demo
    cfg = configure([str(root / "ds"), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                     "--n-permutations", "200"])
    exp = discover(open_dataset(cfg), cfg, "01")
    exp.runs = [r for r in exp.runs if keep(r)]
    exp.stories = {sid: s for sid, s in exp.stories.items() if any(seg.story_id == sid for r in exp.runs
                                                                    for seg in r.segments)}
    return cfg, exp, root


def test_without_repeats_an_outer_loop_scores(demo, tmp_path):
    cfg, exp, root = _without_repeats(demo, tmp_path, lambda r: r.entities["task"] != "festival")
    fitted = fit_participant(cfg, exp, [OracleSpace(root, exp.stories)], "cpu")
    result = _arrays(fitted)
    assert fitted.cc_max is None and fitted.data_scaling.empty  # no test story: no ceiling, no data scaling
    assert fitted.responses["scoring"].startswith("outer")
    r = result["stats"][0, :, 0]
    assert np.isnan(result["stats"][0, :, 2]).all()  # no ceiling, so no cc_norm: missing, not 0
    truth, inside = truth_on_grid(demo, fitted, "01")
    strong = inside & (truth["driven"] == 1) & (truth["ceiling"] > 0.5)
    noise = inside & (truth["driven"] == 0)
    assert np.median(r[strong]) > 0.3 and abs(np.median(r[noise])) < 0.05


def test_single_short_story_is_too_little_data(demo, tmp_path):
    from bidsenc.errors import DataError

    cfg, exp, root = _without_repeats(demo, tmp_path, lambda r: r.entities["task"] == "lighthouse")
    with pytest.raises(DataError, match="too little data to cross-validate: 58 training volumes in one story"):
        fit_participant(cfg, exp, [OracleSpace(root, exp.stories)], "cpu")


def test_weights_are_kept_only_when_asked(demo, tmp_path, fitted):
    assert fitted[0]["result"].models[0].weights is None
    root, truth = demo
    cfg = configure([str(root / "ds"), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                     "--n-permutations", "10", "--data-scaling-seeds", "0", "--save-weights"])
    exp = discover(open_dataset(cfg), cfg, "01")
    oracle = OracleSpace(root, exp.stories)
    result = fit_participant(cfg, exp, [oracle], "cpu")
    weights = result.models[0].weights
    n_features = next(iter(oracle.features.values())).layers[0].shape[1]
    assert weights.shape == (n_features * len(result.responses["delays_trs"]), result.valid.sum())
    truth_grid, inside = truth_on_grid(demo, result, "01")
    norms = np.linalg.norm(weights, axis=0)
    driven = (truth_grid["driven"] == 1)[result.valid] & inside[result.valid]
    noise = (truth_grid["driven"] == 0)[result.valid] & inside[result.valid]
    assert np.median(norms[driven]) > 3 * np.median(norms[noise])  # regularised towards 0 where nothing drives


def test_data_scaling_draws_runs_that_present_two_stories_together(demo, tmp_path):
    """A story heard only as the second story of a run is drawn with that run, never on its own."""
    root, _ = demo
    cfg = configure([str(root / "ds"), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                     "--n-permutations", "10", "--data-scaling-seeds", "3"])
    exp = discover(open_dataset(cfg), cfg, "01")
    canyon = next(r for r in exp.runs if r.entities["task"] == "canyon")
    glacier = next(r for r in exp.runs if r.entities["task"] == "glacier")
    merged = dataclasses.replace(canyon, segments=(*canyon.segments, dataclasses.replace(
        glacier.segments[0], onset=canyon.segments[0].onset + 60.0)))
    exp.runs = [merged if r is canyon else r for r in exp.runs if r is not glacier]
    result = fit_participant(cfg, exp, [OracleSpace(root, exp.stories)], "cpu")
    table = result.data_scaling
    units = len(result.responses["train_stories"]) - 1  # glacier rides with canyon
    assert table.groupby("seed").size().max() >= 4 and table["n_volumes"].min() > 0
    with_glacier = table[table["stories"].str.contains("glacier")]
    assert len(with_glacier) and with_glacier["stories"].str.contains("canyon").all()
    assert (table[table["n_volumes"] == table["n_volumes"].max()]["n_stories"] == units + 1).all()

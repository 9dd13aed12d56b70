"""Nested layer selection without a test story, and the null that repeats the whole procedure."""

from __future__ import annotations

import numpy as np
import pytest

from bidsenc.models.cv import leave_stories_out
from bidsenc.models.encoding import evaluate_layer_outer
from bidsenc.models.nested import nested_outer_cv
from bidsenc.models.ridge import fit_and_score, pearson_r
from bidsenc.models.stats import pooled_null_pvalues

ALPHAS = np.logspace(0, 6, 7)
GAP = 3


def _ar_noise(rng, n, v, phi=0.6):
    e = rng.standard_normal((n, v))
    y = np.zeros((n, v))
    for t in range(1, n):
        y[t] = phi * y[t - 1] + e[t]
    return y


def _problem(seed=0, n=200, v=12, stories=1, effect_layer=2):
    """Four layers of random features; the responses follow layer ``effect_layer`` in half the voxels."""
    rng = np.random.default_rng(seed)
    layers = [(k, rng.standard_normal((n, 8)).astype(np.float32)) for k in range(4)]
    y = _ar_noise(rng, n, v)
    w = rng.standard_normal((8, v // 2))
    y[:, : v // 2] += 0.8 * layers[effect_layer][1] @ w
    y = ((y - y.mean(0)) / y.std(0)).astype(np.float32)
    groups = np.repeat(np.arange(stories), n // stories)
    folds = leave_stories_out(groups, 5, 0, GAP)
    return layers, y, groups, folds


def _by_hand(layers, y, groups, folds):
    """Each outer fold: the layer of highest mean inner score on its training rows, predicting its block."""
    pred = np.zeros_like(y)
    scored = np.zeros(len(y), bool)
    chosen = []
    for train, test in folds:
        inner = leave_stories_out(groups[train], 5, 0, GAP)
        outs = [fit_and_score(x[train], y[train], x[test], y[test], inner, ALPHAS, return_predictions=True)
                for _, x in layers]
        best = int(np.argmax([o["cv_score"][o["valid"]].mean() for o in outs]))
        chosen.append(layers[best][0])
        pred[test] = outs[best]["predictions"]
        scored[test] = True
    return np.asarray(chosen), pearson_r(pred[scored], y[scored])


@pytest.mark.parametrize("stories", [1, 5])
def test_each_fold_predicts_with_the_layer_its_own_training_rows_chose(stories):
    layers, y, groups, folds = _problem(stories=stories)
    fit = nested_outer_cv(iter(layers), y, groups, folds, ALPHAS, gap=GAP)
    chosen, r = _by_hand(layers, y, groups, folds)
    np.testing.assert_array_equal(fit.fold_layers, chosen)
    np.testing.assert_allclose(fit.r, r, atol=1e-5)
    assert fit.chosen_layer == 2 and fit.chosen_share == 1.0  # the effect's layer wins every fold here


def test_each_layers_curve_is_its_own_outer_score():
    layers, y, groups, folds = _problem()
    fit = nested_outer_cv(iter(layers), y, groups, folds, ALPHAS, gap=GAP)
    for i, (k, x) in enumerate(layers):
        alone = evaluate_layer_outer(k, x, y, groups, folds, ALPHAS, gap=GAP)
        np.testing.assert_allclose(fit.layer_r[i], alone.test_r, atol=1e-5)
        np.testing.assert_allclose(fit.layer_cv_score[i], alone.cv_score, atol=1e-5)


def _misaligned(layers, seed):
    """A null draw's designs: every layer's rows rotated by one lag (the same for every layer)."""
    lag = int(np.random.default_rng(seed).integers(40, 160))
    return [(k, np.roll(x, lag, axis=0)) for k, x in layers]


def test_a_null_draw_is_the_whole_procedure_on_its_own_designs():
    layers, y, groups, folds = _problem()
    null = [_misaligned(layers, d) for d in range(3)]
    fit = nested_outer_cv(iter(layers), y, groups, folds, ALPHAS, gap=GAP, null_designs=[iter(n) for n in null])
    assert fit.null_r.shape == (3, y.shape[1])
    for d, designs in enumerate(null):
        alone = nested_outer_cv(iter(designs), y, groups, folds, ALPHAS, gap=GAP)
        np.testing.assert_allclose(fit.null_r[d], alone.r, atol=1e-6)
        np.testing.assert_array_equal(fit.null_fold_layers[d], alone.fold_layers)
        np.testing.assert_allclose(fit.null_layer_r[d], alone.layer_r.mean(1), atol=1e-6)
    real = nested_outer_cv(iter(layers), y, groups, folds, ALPHAS, gap=GAP)
    np.testing.assert_allclose(fit.r, real.r, atol=1e-6)
    # misaligned, the effect is gone: the real score is far above every draw's
    assert fit.r[:6].mean() > fit.null_r[:, :6].mean(1).max() + 0.2


def test_column_groups_choose_their_layers_apart():
    a_layers, ya, groups, folds = _problem(seed=1, effect_layer=1)
    b_layers, yb, _, _ = _problem(seed=1, effect_layer=3)
    for (_, xa), (_, xb) in zip(a_layers, b_layers, strict=True):  # the same designs (same seed)
        np.testing.assert_array_equal(xa, xb)
    y = np.hstack([ya, yb])
    cols = np.repeat([5, 9], ya.shape[1])
    null = [_misaligned(a_layers, d) for d in range(2)]
    fits = nested_outer_cv(iter(a_layers), y, groups, folds, ALPHAS, gap=GAP, column_groups=cols,
                           null_designs=[iter(n) for n in null])
    alone = [nested_outer_cv(iter(a_layers), part, groups, folds, ALPHAS, gap=GAP,
                             null_designs=[iter(n) for n in null]) for part in (ya, yb)]
    assert fits[0].chosen_layer == 1 and fits[1].chosen_layer == 3
    for joint, single in zip(fits, alone, strict=True):
        np.testing.assert_array_equal(joint.fold_layers, single.fold_layers)
        np.testing.assert_allclose(joint.r, single.r, atol=1e-5)
        np.testing.assert_allclose(joint.null_r, single.null_r, atol=1e-5)


def test_under_a_null_the_nested_score_matches_its_own_null_and_a_single_layer_does_not():
    """Pure noise, many layers: the pooled outer r of any one layer is biased (negative here), so only a null
    running the same procedure, layer choice per fold included, tells the level of "no effect"."""
    rng = np.random.default_rng(3)
    n, v = 180, 40
    layers = [(k, rng.standard_normal((n, 6)).astype(np.float32)) for k in range(8)]
    groups = np.zeros(n, int)
    folds = leave_stories_out(groups, 5, 0, GAP)
    old, nested, null = [], [], []
    for seed in range(6):
        y = _ar_noise(np.random.default_rng(100 + seed), n, v, phi=0.3).astype(np.float32)
        draws = [[(k, rng.standard_normal((n, 6)).astype(np.float32)) for k in range(8)] for _ in range(3)]
        fit = nested_outer_cv(iter(layers), y, groups, folds, ALPHAS, gap=GAP, null_designs=[iter(d) for d in draws])
        old.append(fit.layer_r[int(np.argmax(fit.layer_cv_score.mean(1)))].mean())
        nested.append(fit.r.mean())
        null.append(fit.null_r.mean())
    assert abs(np.mean(nested) - np.mean(null)) < 0.01
    assert abs(np.mean(old) - np.mean(null)) > 0.02


def test_pooled_null_pvalues():
    null = np.arange(1, 100, dtype=float).reshape(9, 11) / 100  # 0.01 ... 0.99
    p = pooled_null_pvalues(np.array([1.0, 0.995, 0.5, 0.0]), null)
    np.testing.assert_allclose(p, [1 / 100, 1 / 100, 51 / 100, 1.0])
    rng = np.random.default_rng(0)  # exchangeable real and null draws: uniform p-values
    draws = rng.standard_normal((21, 3000))
    p = pooled_null_pvalues(draws[0], draws[1:])
    assert abs((p < 0.05).mean() - 0.05) < 0.015


def test_misalign_rotates_each_story_within_its_length():
    from bidsenc.align import misalign, misalignment_lags

    feats = {"a": (np.array([1.0, 5.0, 9.0]), np.eye(3)), "b": (np.array([0.5]), np.ones((1, 3)))}
    lags = misalignment_lags({"a": 10.0, "b": 2.0}, n_draws=50, seed=1)
    assert all(2.0 <= d["a"] <= 8.0 and 0.4 <= d["b"] <= 1.6 for d in lags)
    assert lags == misalignment_lags({"a": 10.0, "b": 2.0}, n_draws=50, seed=1)  # reproducible
    out = misalign(feats, {"a": 6.0, "b": 1.0}, {"a": 10.0, "b": 2.0})
    np.testing.assert_allclose(out["a"][0], [7.0, 1.0, 5.0])  # 11 and 15 wrap to 1 and 5
    np.testing.assert_array_equal(out["a"][1], feats["a"][1])  # each word keeps its features
    np.testing.assert_allclose(out["b"][0], [1.5])


@pytest.fixture(scope="module")
def single_story_run(tmp_path_factory, tiny_lm):
    """A participant with one story and no repeat, a model of several layers, through the command line."""
    import sys
    from pathlib import Path

    from bidsenc.cli.run import main
    from bidsenc.derivatives import read_participant

    sys.path.insert(0, str(Path(__file__).parent))
    from builders import make_drifting_story

    root = tmp_path_factory.mktemp("nested")
    make_drifting_story(root / "ds", shape=(6, 6, 5))
    out = root / "out"
    code = main([str(root / "ds"), str(out), "participant", "--feature", f"lm:{tiny_lm}:min_context=32",
                 "--feature", "lowlevel:word_rate", "-w", str(root / "w"), "--skip-bids-validation",
                 "--null-draws", "3"])
    assert code == 0
    return out, read_participant(out, "01")


def test_without_a_test_story_the_model_score_is_nested_and_says_so(single_story_run):
    import json

    import pandas as pd

    out, result = single_story_run
    lm = next(m for m in result.models if m.description["kind"] != "lowlevel")
    assert lm.nested and len(lm.layers) > 1
    assert lm.fold_layers.shape == (5,) and set(lm.fold_layers) <= set(lm.layers.tolist())
    assert lm.best_layer == lm.selection["layer"] and lm.selection["method"] == "nested"
    assert lm.null_r.shape == (3, result.valid.sum())
    func = out / "sub-01" / "func"
    summary = pd.read_csv(next(func.glob("*_desc-models_summary.tsv")), sep="\t")
    mine = summary[summary["model"] == lm.name]
    best = mine[mine["best"]]
    assert len(best) == 1 and int(best["layer"].iloc[0]) == lm.best_layer
    assert best["selection"].iloc[0] == "nested"
    assert best["fold_layers"].iloc[0] == ",".join(map(str, lm.fold_layers))
    assert best["model_mean_r"].iloc[0] == pytest.approx(float(lm.model_r.mean()), abs=1e-6)
    # the layer rows keep each layer's own outer score (the layer curve)
    np.testing.assert_allclose(mine.sort_values("layer")["mean_r"], lm.stats[:, :, 0].mean(1), atol=1e-6)
    # the model's own maps carry the nested scores and the significance; the layer maps do not
    model_maps = sorted(p.name for p in func.glob("*_statmap.nii.gz") if "Layer" not in p.name and
                        "lowlevel" not in p.name)
    assert any("_stat-r_" in n for n in model_maps) and any("_stat-logp_" in n for n in model_maps)
    layer_logp = [p for p in func.glob("*Layer*_stat-logp_statmap.nii.gz") if "lowlevel" not in p.name]
    assert not layer_logp
    sidecar = json.loads(next(p for p in func.glob("*_stat-r_statmap.json") if "Layer" not in p.name
                              and "lowlevel" not in p.name).read_text())
    assert sidecar["Layer"] == "nested" and sidecar["FoldLayers"] == [int(v) for v in lm.fold_layers]
    layer_sidecar = json.loads(next(func.glob(f"*Layer{lm.best_layer}_stat-r_statmap.json")).read_text())
    assert "chose layer" in layer_sidecar["LayerSelection"]
    logp = json.loads(next(p for p in func.glob("*_stat-logp_statmap.json") if "lowlevel" not in p.name).read_text())
    assert "misaligned-stimulus null" in logp["Method"] and logp["NullDraws"] == 3
    assert result.responses["layer_selection"].startswith("nested")
    assert "rotated" in result.responses["null"]
    report = (out / "sub-01.html").read_text()
    assert "nested" in report and "per outer fold" in report


def test_the_reference_preset_on_raw_inputs_says_drift_is_fitted(tmp_path):
    import sys
    from pathlib import Path

    from bidsenc.cli.run import main
    from bidsenc.derivatives import read_participant

    sys.path.insert(0, str(Path(__file__).parent))
    from builders import make_drifting_story

    make_drifting_story(tmp_path / "ds", shift=60.0, shape=(5, 5, 4))
    code = main([str(tmp_path / "ds"), str(tmp_path / "out"), "participant", "--feature", "lowlevel:word_rate",
                 "--preset", "reference", "-w", str(tmp_path / "w"), "--skip-bids-validation", "--no-reports"])
    assert code == 0
    log = next((tmp_path / "out" / "logs").glob("*/bidsenc.log")).read_text()
    assert "the reference preset filters nothing" in log
    result = read_participant(tmp_path / "out", "01")
    assert any("slow drift is fitted and scored" in n for n in result.responses["notes"])
    # the misaligned stimulus scores on drift, and its null, built from a rotated stimulus, does too
    model = result.models[0]
    assert "not clearly above a misaligned stimulus" in log
    assert model.null_r.mean() > model.score_r.mean() - 0.05


def test_circular_p_values_use_each_shift_once_when_there_are_few():
    """40 volumes allow 21 shifts: p can be no smaller than 1/22, however many permutations are asked for."""
    from bidsenc.models.stats import permutation_pvalues

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((40, 500)), rng.standard_normal((40, 500))
    b[:, 0] = a[:, 0]  # a perfect match beats every shift
    p = permutation_pvalues(a, b, n_permutations=1000, method="circular")
    assert p.min() == pytest.approx(1 / 22) and p[0] == pytest.approx(1 / 22)
    assert abs((p < 0.05).mean() - 1 / 22) < 0.03  # exact: P(p <= 1/22) = 1/22 for exchangeable shifts


def test_circular_shift_sd_is_the_spread_of_r_over_the_shifts_and_grows_with_autocorrelation():
    from bidsenc.models.stats import circular_shift_sd

    rng = np.random.default_rng(1)
    n = 120
    white = rng.standard_normal((n, 2))
    slow = _ar_noise(rng, n, 2, phi=0.9)
    pred, resp = np.hstack([white, slow]), np.hstack([rng.standard_normal((n, 2)), _ar_noise(rng, n, 2, 0.9)])
    sd = circular_shift_sd(pred, resp, block_length=10)
    by_hand = [np.std([np.corrcoef(np.roll(pred[:, v], k), resp[:, v])[0, 1] for k in range(10, n - 9)])
               for v in range(4)]
    np.testing.assert_allclose(sd, by_hand, rtol=1e-8)
    assert sd[2:].min() > 1.5 * sd[:2].max()
    assert circular_shift_sd(np.ones((n, 1)), resp[:, :1])[0] == 0.0


def test_the_group_level_reports_the_nested_scores(single_story_run):
    import pandas as pd

    from bidsenc.cli.run import main

    out, result = single_story_run
    ds = out.parent / "ds"
    assert main([str(ds), str(out), "group", "--skip-bids-validation"]) == 0
    regions = pd.read_csv(out / "group" / "desc-regions_summary.tsv", sep="\t")
    lm = next(m for m in result.models if m.description["kind"] != "lowlevel")
    whole = regions[regions["model"] == lm.name]
    # the group's score of the model is its nested held-out score, not its chosen layer's own
    assert whole["mean_r"].iloc[0] == pytest.approx(float(lm.model_r.mean()), abs=1e-5)
    report = (out / "group.html").read_text()
    assert "nested outer cross-validation" in report

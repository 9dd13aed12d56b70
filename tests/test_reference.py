"""bidsenc against the reference pipeline's formulas, and numerical edge cases.

Each reference formula is written here from its definition (../shared/docs/methods.md and
issue 10), in float64, independently of bidsenc's code, and compared with bidsenc's public
array functions on small inputs rebuilt from fixed seeds: Lanczos resampling, delays,
z-scoring, ridge with the squared penalty, alpha selection by the reference's bootstrap
(use_corr True and False), CC_max with and without the reference's ddof mix, and stacking
weights against the optimality conditions of the QP.  Agreement is to 1e-10 unless said.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from bidsenc.align import constant_columns, delay, lanczos_resample, zscore
from bidsenc.models import ceiling, stacking
from bidsenc.models.cv import bootstrap_chunks
from bidsenc.models.ridge import pearson_r, r2_score, reference_to_alpha, ridge_cv, ridge_weights

sys.path.insert(0, str(Path(__file__).parent))
from builders import make_drifting_story

TOL = 1e-10


# ----------------------------------------------------------------------------- the reference, written here

def ref_lanczos(data, old_times, new_times, window=3):
    """Unnormalised Lanczos sum; cutoff = the new sampling rate; t in units of the cutoff period."""
    cutoff = 1.0 / np.mean(np.diff(new_times))
    t = (new_times[:, None] - old_times[None, :]) * cutoff
    kernel = np.zeros_like(t)
    near = (np.abs(t) <= window) & (t != 0)
    tn = t[near]
    kernel[near] = window * np.sin(np.pi * tn) * np.sin(np.pi * tn / window) / (np.pi ** 2 * tn ** 2)
    kernel[t == 0] = 1.0
    return kernel @ data


def ref_zscore(v):
    return (v - v.mean(0)) / v.std(0)


def ref_ridge(X, Y, a):
    """SVD ridge with the penalty entering squared: V diag(S / (S^2 + a^2)) U' Y, one a per column."""
    U, S, Vh = np.linalg.svd(X, full_matrices=False)
    UY = U.T @ Y
    if np.ndim(a) == 0:
        return Vh.T @ ((S / (S ** 2 + a ** 2))[:, None] * UY)
    a = np.broadcast_to(np.asarray(a, dtype=float), (Y.shape[1],))
    return np.stack([Vh.T @ (S / (S ** 2 + a[v] ** 2) * UY[:, v]) for v in range(Y.shape[1])], axis=1)


def ref_chunks(n_rows, chunk_len, n_chunks, n_boots, seed):
    """The reference's held-out rows: consecutive chunks from row 0, shuffled, the first n_chunks held out."""
    rng = random.Random(seed)
    chunks = list(zip(*[iter(range(n_rows))] * chunk_len))
    held = []
    for _ in range(n_boots):
        rng.shuffle(chunks)
        held.append(np.array(sorted(itertools.chain(*chunks[:n_chunks]))))
    return held


def ref_bootstrap_choice(X, Y, held_out, ref_alphas, use_corr):
    """bootstrap_ridge's alpha per voxel from given held-out rows: mean over bootstraps, then argmax."""
    scores = np.zeros((len(held_out), len(ref_alphas), Y.shape[1]))
    for b, val in enumerate(held_out):
        train = np.setdiff1d(np.arange(len(X)), val)
        for k, a in enumerate(ref_alphas):
            pred = X[val] @ ref_ridge(X[train], Y[train], a)
            yv = Y[val]
            if use_corr:
                scores[b, k] = (ref_zscore(yv) * ref_zscore(pred)).mean(0)
            else:
                r2 = 1 - (yv - pred).var(0) / ((1 + yv.var(0)) / 2)
                scores[b, k] = np.sign(r2) * np.sqrt(np.abs(r2))
    mean = scores.mean(0)
    return np.asarray(ref_alphas)[mean.argmax(0)], mean


def ref_cc_max(repeats, data_norm):
    """spe_and_cc_norm's CC_max: TP = 1 with data_norm (var(y) still ddof 1), else ddof 1 throughout; no floor."""
    n = len(repeats)
    y = repeats.mean(0)
    tp = np.ones(repeats.shape[2]) if data_norm else repeats.var(axis=1, ddof=1).mean(0)
    sp = (n * y.var(0, ddof=1) - tp) / (n - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1 / np.sqrt(1 + (tp / sp - 1) / n)


def _problem(n, p, v, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    Y = X @ rng.normal(size=(p, v)) * np.linspace(0.02, 0.5, v) + rng.normal(size=(n, v))
    return zscore(X), zscore(Y)


# ----------------------------------------------------------------------------- stimulus to TR


def test_lanczos_matches_the_reference_with_words_on_tr_midpoints():
    rng = np.random.default_rng(0)
    tr_times = np.arange(60) * 2.0 + 1.0  # TR midpoints after the sound's onset
    words = np.sort(rng.uniform(0, 120, 300))
    words[:10] = tr_times[5:15]  # words exactly on a midpoint: the kernel's t = 0
    words = np.sort(words)
    values = rng.normal(size=(300, 7))
    got = lanczos_resample(values, words, tr_times)
    np.testing.assert_allclose(got, ref_lanczos(values, words, tr_times), rtol=0, atol=TOL)
    # one word on a midpoint enters that TR with weight 1 and its neighbours at 2 s with weight 0
    one = lanczos_resample(np.ones((1, 1)), np.array([tr_times[20]]), tr_times)[:, 0]
    assert one[20] == 1.0 and abs(one[19]) < 1e-15 and abs(one[21]) < 1e-15


def test_zscore_matches_the_reference_and_zeroes_a_constant_column():
    rng = np.random.default_rng(1)
    x = np.c_[rng.normal(3, 2, size=(80, 3)), np.full(80, 4.2)]
    z = zscore(x)
    np.testing.assert_allclose(z[:, :3], ref_zscore(x[:, :3]), rtol=0, atol=TOL)
    np.testing.assert_array_equal(z[:, 3], 0.0)  # the reference divides 0 by 8e-15 here (all 1.0) or by 0 (NaN)


def _columns(n=100, seed=0):
    rng = np.random.default_rng(seed)
    return np.c_[np.full(n, 4.2),                      # constant; numpy's std is 8e-15, not 0
                 1e6 + rng.normal(0, 1e-9, n),         # constant up to rounding at this scale
                 1e6 + rng.normal(0, 1e-3, n),         # small but real variation
                 rng.normal(size=n)]


def test_constant_means_constant_up_to_rounding():
    x = _columns()
    np.testing.assert_array_equal(constant_columns(x), [True, True, False, False])
    z = zscore(x)
    np.testing.assert_array_equal(z[:, :2], 0.0)
    np.testing.assert_allclose(z[:, 2:].std(0), 1.0, rtol=1e-12)
    y = np.random.default_rng(1).normal(size=x.shape)
    r = pearson_r(x, y)
    assert r[0] == 0.0 and r[1] == 0.0 and r[3] != 0.0
    assert r2_score(x, y)[0] == 0.0


def test_constant_voxels_are_not_fitted():
    from pathlib import Path

    from bidsenc.align import AlignSettings
    from bidsenc.align.design import split_responses
    from bidsenc.bids.experiment import BoldSource, Run, Segment

    y = _columns(n=120).astype(np.float64)
    run = Run("r", {}, 2.0, 120, 1.0, BoldSource("nifti", (Path("b.nii.gz"),)), (Segment("s", 0.0),))
    resp = split_responses([run], [y], [], AlignSettings())
    np.testing.assert_array_equal(resp.valid, [False, False, True, True])


@pytest.mark.parametrize("circular", [False, True])
def test_delays_match_the_reference_back_ahead_and_circular(circular):
    x = np.arange(1.0, 7.0)[:, None] * np.array([[1.0, 10.0]])  # 6 rows, 2 columns
    out = delay(x, [2, 0, -1], circular=circular)
    assert out.shape == (6, 6)

    def expected(d):
        rows = np.arange(6) - d
        if circular:
            return x[rows % 6]
        return np.where(((rows >= 0) & (rows < 6))[:, None], x[np.clip(rows, 0, 5)], 0.0)

    for k, d in enumerate([2, 0, -1]):
        np.testing.assert_array_equal(out[:, 2 * k:2 * k + 2], expected(d))


def test_reference_preset_chooses_alphas_with_the_reference_score(tmp_path):
    """--preset reference selects alphas by bootstrap_ridge(use_corr=False)'s score; --cv-score overrides it."""
    from bidsenc.cli.run import configure, main

    ds = tmp_path / "ds"
    make_drifting_story(ds, minutes=8, shape=(3, 3, 2))
    for extra, expected in ((["--preset", "reference"], "reference"),
                            (["--preset", "reference", "--cv-score", "r"], "r"), ([], "r2")):
        out = tmp_path / f"out-{expected}"
        assert main([str(ds), str(out), "participant", "--feature", "lowlevel:word_rate", "--null-draws", "0",
                     "--skip-bids-validation", "--no-reports", "-w", str(tmp_path / "work"), *extra]) == 0
        sidecar = json.loads(next(out.rglob("*_desc-responses_encoding.json")).read_text())
        assert sidecar["cv_score"] == expected
    with pytest.raises(Exception, match="invalid choice"):
        configure([str(ds), str(tmp_path / "o"), "participant", "--cv-score", "mse"])


# ----------------------------------------------------------------------------- ridge


@pytest.mark.parametrize("n, p", [(120, 15), (30, 80)], ids=["primal", "kernel"])
def test_ridge_weights_use_the_squared_penalty_of_the_reference(n, p):
    X, Y = _problem(n, p, 12, seed=2)
    a = np.logspace(1, 3, 12)  # one reference alpha per voxel
    got = ridge_weights(X, Y, reference_to_alpha(a), dtype="float64")
    expected = ref_ridge(X, Y, a)
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL * np.abs(expected).max())


def test_bootstrap_chunks_have_the_reference_layout():
    folds = bootstrap_chunks(1010, n_boots=6, chunk_len=40, seed=3)
    assert len(folds) == 6
    for train, val in folds:
        starts = val[::40]
        assert len(val) == 5 * 40  # 20% of the 25 whole chunks
        assert np.all(starts % 40 == 0) and np.all(val.reshape(5, 40) == starts[:, None] + np.arange(40))
        assert val.max() < 1000  # the 10-row remainder is never held out
        np.testing.assert_array_equal(np.sort(np.r_[train, val]), np.arange(1010))
    assert len(bootstrap_chunks(400, n_boots=2, chunk_len=40, n_chunks=3)[0][1]) == 120


@pytest.mark.parametrize("use_corr, score", [(False, "reference"), (True, "r")])
def test_alpha_choice_reproduces_bootstrap_ridge_given_the_same_chunks(use_corr, score):
    X, Y = _problem(400, 20, 60, seed=3)
    held = ref_chunks(400, chunk_len=20, n_chunks=4, n_boots=8, seed=4)
    ref_alphas = np.logspace(1, 3, 10)  # the dataset script's grid
    expected, mean = ref_bootstrap_choice(X, Y, held, ref_alphas, use_corr)
    masks = []
    for val in held:
        mask = np.zeros(400, bool)
        mask[val] = True
        masks.append((~mask, mask))  # folds as boolean masks
    got = ridge_cv(X, Y, masks, reference_to_alpha(ref_alphas), score=score, dtype="float64")
    np.testing.assert_array_equal(got.alphas, reference_to_alpha(expected))  # every voxel
    np.testing.assert_allclose(got.cv_scores, mean, rtol=0, atol=TOL)
    assert got.fold_scores.shape == (8, 10, 60)
    np.testing.assert_allclose(got.fold_scores.mean(0), got.cv_scores, rtol=0, atol=1e-12)


def test_reference_preset_reproduces_the_reference_choice_for_every_voxel(demo, tmp_path, monkeypatch):
    """Through the pipeline: the design, responses and bootstrap chunks it built, scored the reference's way."""
    import bidsenc.fit
    from bidsenc.cli.run import main

    seen = []
    real = bidsenc.fit.evaluate_layer

    def spy(layer, x_train, y_train, x_test, y_test, folds, alphas, **kw):
        fit = real(layer, x_train, y_train, x_test, y_test, folds, alphas, **kw)
        seen.append((np.array(x_train, np.float64), np.array(y_train, np.float64), folds, alphas, kw, fit))
        return fit

    monkeypatch.setattr(bidsenc.fit, "evaluate_layer", spy)
    assert main([str(demo[0] / "ds"), str(tmp_path / "out"), "participant", "--participant-label", "01",
                 "--feature", "lowlevel:word_rate", "lowlevel:envelope", "--null-draws", "0", "--data-scaling-seeds", "0", "--preset", "reference",
                 "--bootstraps", "12", "--bootstrap-chunk-len", "20", "--bootstrap-chunks", "3",
                 "--skip-bids-validation", "--no-reports", "-w", str(tmp_path / "work")]) == 0
    assert len(seen) == 2
    for x, y, folds, alphas, kw, fit in seen:
        assert kw["score"] == "reference" and len(folds) == 12
        assert all(len(val) == 60 and np.all(val[::20] % 20 == 0) for _, val in folds)
        np.testing.assert_allclose(alphas, reference_to_alpha(np.logspace(1, 4, 15)))
        expected, _ = ref_bootstrap_choice(x, y, [val for _, val in folds], np.sqrt(alphas), use_corr=False)
        np.testing.assert_allclose(fit.alphas, expected ** 2, rtol=1e-12)
    sidecar = json.loads(next((tmp_path / "out").rglob("*_desc-responses_encoding.json")).read_text())
    selection = sidecar["alpha_selection"]
    assert (selection["bootstraps"], selection["chunk_len"], selection["chunks_held_out"]) == (12, 20, 3)


# ----------------------------------------------------------------------------- noise ceiling


def _repeats(seed=5, n=6, t=90, v=400):
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(t, v)) * np.linspace(0, 1.5, v)
    reps = signal[None] + rng.normal(size=(n, t, v))
    return np.stack([zscore(r) for r in reps])  # each repeat z-scored per run, as the pipeline does


def test_cc_max_reference_convention_matches_spe_and_cc_norm_without_a_floor():
    reps = _repeats()
    got, degenerate = ceiling.cc_max(reps, convention="reference", return_degenerate=True)
    expected = ref_cc_max(reps, data_norm=True)
    defined = np.isfinite(expected)
    np.testing.assert_allclose(got[defined & ~degenerate], expected[defined & ~degenerate], rtol=0, atol=TOL)
    assert (got[~degenerate] < 0.25).any()  # no floor in effect, as in the reference code
    assert degenerate.any()
    np.testing.assert_array_equal(got[degenerate], 0.0)  # undefined (SP <= 0): 0, where the reference has NaN


def test_cc_max_consistent_convention_matches_the_reference_formula_with_one_ddof():
    reps = _repeats(seed=6)
    got, degenerate = ceiling.cc_max(reps, return_degenerate=True)
    expected = ref_cc_max(reps, data_norm=False)
    np.testing.assert_allclose(got[~degenerate], expected[~degenerate], rtol=0, atol=TOL)
    # the reference's ddof mix (TP = 1, var(y) with ddof 1) is a different number on the same data
    mixed = ceiling.cc_max(reps, convention="reference")
    both = ~degenerate & (mixed > 0)
    assert np.abs(mixed[both] - got[both]).max() > 1e-4
    pred = reps.mean(0) + np.random.default_rng(7).normal(size=reps.shape[1:])
    cc_abs = pearson_r(reps.mean(0), pred)
    norm = ceiling.cc_norm(cc_abs, got)
    np.testing.assert_allclose(norm[~degenerate], (cc_abs / expected)[~degenerate], rtol=0, atol=TOL)


# ----------------------------------------------------------------------------- stacking


def _kkt_optimal(P, w, tol=1e-9):
    """Optimality of w for min w'Pw on the simplex: (Pw)_i equal on the support, not smaller off it."""
    g = P @ w
    support = w > tol
    level = g[support].mean()
    return (np.all(w >= -1e-15) and abs(w.sum() - 1) < 1e-12 and np.all(np.abs(g[support] - level) < tol)
            and np.all(g[~support] >= level - tol))


def test_stacking_weights_solve_the_qp_exactly():
    rng = np.random.default_rng(8)
    t, v = 200, 300
    y = rng.normal(size=(t, v))
    # three spaces: a good one, a weaker one, and one half-correlated with the first
    preds = np.stack([y + rng.normal(scale=s, size=(t, v)) * w for s, w in ((0.8, 1), (1.5, 1), (0.8, 1))])
    preds[2] = 0.5 * preds[0] + 0.5 * preds[2] + rng.normal(scale=0.3, size=(t, v)) * np.linspace(0, 2, v)
    # in the last 50 voxels the other spaces are the first one plus noise: the optimum is its vertex
    preds[1:, :, -50:] = preds[0, :, -50:] + rng.normal(size=(2, t, 50))
    W = stacking.stack_weights(preds, y)
    errors = y[None] - preds  # (J, T, V)
    for k in range(v):
        P = errors[:, :, k] @ errors[:, :, k].T / t
        assert _kkt_optimal(P, W[:, k]), k
        # and no vertex, edge or interior point of the simplex does better
        best = min(_face_minimum(P, s) for r in (1, 2, 3) for s in itertools.combinations(range(3), r))
        assert W[:, k] @ P @ W[:, k] <= best + TOL * abs(best)
    assert (W > 1e-6).sum(0).max() >= 2 and (W.max(0) > 1 - 1e-12).any()  # interior and vertex optima both occur


def _face_minimum(P, support):
    """min w'Pw over the simplex face spanned by ``support`` (inf if its unconstrained optimum leaves it)."""
    s = list(support)
    x = np.linalg.solve(P[np.ix_(s, s)], np.ones(len(s)))
    w = x / x.sum()
    return float(w @ P[np.ix_(s, s)] @ w) if np.all(w >= 0) else np.inf


def test_the_array_api_examples_run():
    import doctest

    import bidsenc.models
    import bidsenc.models.ridge

    for module in (bidsenc.models, bidsenc.models.ridge):
        failed, attempted = doctest.testmod(module)
        assert attempted > 0 and failed == 0, module.__name__

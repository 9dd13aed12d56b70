"""Numerical edge cases and the reference code's conventions, against direct formulas written here.

Each reference formula is implemented in the test from its definition (../shared/docs/methods.md
and the issue that asked for it), in float64, and compared with bidsenc's array functions.
"""

from __future__ import annotations

import numpy as np
import pytest

from bidsenc.align import constant_columns, delay, zscore
from bidsenc.models.ridge import pearson_r, r2_score, ridge_cv


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
def test_delays_back_ahead_and_circular(circular):
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


def _reference_alpha_choice(X, Y, folds, alphas, use_corr):
    """The reference's bootstrap_ridge choice, written from its definition (alpha in himalaya units)."""
    scores = np.zeros((len(folds), len(alphas), Y.shape[1]))
    for f, (train, val) in enumerate(folds):
        xt, yt, xv, yv = X[train], Y[train], X[val], Y[val]
        for a, alpha in enumerate(alphas):
            w = np.linalg.solve(xt.T @ xt + alpha * np.eye(X.shape[1]), xt.T @ yt)
            p = xv @ w
            if use_corr:
                pc, yc = p - p.mean(0), yv - yv.mean(0)
                scores[f, a] = (pc * yc).sum(0) / np.sqrt((pc * pc).sum(0) * (yc * yc).sum(0))
            else:
                r2 = 1 - (yv - p).var(0) / ((1 + yv.var(0)) / 2)
                scores[f, a] = np.sign(r2) * np.sqrt(np.abs(r2))
    mean = scores.mean(0)
    return np.asarray(alphas)[mean.argmax(0)], mean


@pytest.mark.parametrize("use_corr, score", [(False, "reference"), (True, "r")])
def test_alpha_choice_reproduces_bootstrap_ridge(use_corr, score):
    from bidsenc.models.cv import bootstrap_chunks

    rng = np.random.default_rng(3)
    n, p, v = 300, 20, 50
    X = rng.normal(size=(n, p))
    Y = X @ rng.normal(size=(p, v)) * np.linspace(0.02, 0.5, v) + rng.normal(size=(n, v))
    X, Y = zscore(X), zscore(Y)
    folds = bootstrap_chunks(n, n_boots=5, chunk_len=20, seed=1)
    alphas = np.logspace(0, 5, 11)
    expected, mean = _reference_alpha_choice(X, Y, folds, alphas, use_corr)
    got = ridge_cv(X, Y, folds, alphas, score=score, dtype="float64")
    np.testing.assert_array_equal(got.alphas, expected)  # every voxel
    np.testing.assert_allclose(got.cv_scores, mean, atol=1e-10)


def test_reference_preset_chooses_alphas_with_the_reference_score(tmp_path):
    """--preset reference selects alphas by bootstrap_ridge(use_corr=False)'s score; --cv-score overrides it."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from builders import make_drifting_story

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

"""Banded ridge (himalaya multiple-kernel ridge) as the joint fit of several feature spaces."""

from __future__ import annotations

import numpy as np

from bidsenc.models.banded import banded_ridge
from bidsenc.models.cv import leave_stories_out
from bidsenc.models.ridge import fit_and_score


def _simulate(seed=0, n=600, n_test=150, voxels=200):
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=(n, 40)), rng.normal(size=(n, 30))
    t1, t2 = rng.normal(size=(n_test, 40)), rng.normal(size=(n_test, 30))
    w = rng.normal(size=(40, voxels)) / 6
    y = x1 @ w + rng.normal(size=(n, voxels))
    y_test = t1 @ w + rng.normal(size=(n_test, voxels))
    folds = leave_stories_out(np.repeat(np.arange(6), n // 6), 5)
    return [x1, x2], y, [t1, t2], y_test, folds


def test_the_space_that_drives_the_voxels_gets_the_variance():
    from himalaya.backend import get_backend

    before = get_backend().name
    x, y, xt, yt, folds = _simulate()
    fit = banded_ridge(["driving", "noise"], x, y, xt, yt, folds, n_iter=30)
    assert fit.r2_split.shape == (2, y.shape[1]) and fit.weights.shape == (2, y.shape[1])
    assert abs(fit.r2_split[1].mean()) < 0.01 < fit.r2_split[0].mean()
    assert abs(fit.r2_split.sum(0).mean() - fit.r2.mean()) < 0.01  # the shares add up to the joint R^2
    assert fit.weights[0].mean() > 0.9
    # as good as the single-space ridge on the driving space alone (our solver, itself matched to himalaya)
    alone = fit_and_score(x[0], y, xt[0], yt, folds)
    assert abs(fit.r.mean() - alone["test_r"].mean()) < 0.02
    assert get_backend().name == before  # himalaya's global backend is left as it was

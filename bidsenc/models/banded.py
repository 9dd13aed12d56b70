"""Banded ridge: several feature spaces fitted jointly, one regularisation per space and voxel (himalaya).

The joint-fit alternative to stacking (Dupré la Tour et al. 2022): himalaya's
multiple-kernel ridge with one linear kernel per feature space, its kernel
weights found by random search over the simplex, each with the best alpha of a
log grid, cross-validated on the same story-wise folds as the single-space fits.
The test R^2 is split between the spaces (himalaya's ``r2_score_split``), which
says how much each space adds to the joint prediction.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from .ridge import pearson_r, r2_score


@dataclass
class BandedResult:
    """Several feature spaces fitted jointly by banded ridge, scored on the test rows."""

    names: list[str]
    r: np.ndarray            # [V] test Pearson r of the joint prediction
    r2: np.ndarray           # [V] test R^2
    r2_split: np.ndarray     # [n_spaces, V] each space's share of the test R^2 (sums to r2)
    weights: np.ndarray      # [n_spaces, V] kernel weights exp(delta) normalised to sum 1


@contextlib.contextmanager
def _himalaya_backend(device: str):
    from himalaya.backend import get_backend, set_backend

    before = get_backend()
    name = "torch_cuda" if str(device).startswith("cuda") else "torch"
    set_backend(name, on_error="raise")
    try:
        yield get_backend()
    finally:
        set_backend(before.name if hasattr(before, "name") else "numpy", on_error="warn")


def banded_ridge(names, x_train: list[np.ndarray], y_train: np.ndarray, x_test: list[np.ndarray],
                 y_test: np.ndarray, folds, *, alphas=np.logspace(-2, 8, 21), n_iter: int = 50,
                 device: str = "cpu", seed: int = 0) -> BandedResult:
    """Fit one kernel per feature space jointly; score on the test rows.

    Parameters
    ----------
    names : list of str
        The feature spaces, in the order of ``x_train`` and ``x_test``.
    x_train, x_test : list of arrays (n_rows, n_features_j)
        Each space's delayed, z-scored design.
    y_train, y_test : arrays (n_rows, n_voxels)
    folds : list of (train, validation) index arrays
        Cross-validation splits of the training rows (story-wise).
    alphas : array
        Regularisation grid searched for every sampled kernel weighting.
    n_iter : int
        Kernel weightings sampled on the simplex (Dirichlet) by himalaya's random search.
    """
    from himalaya.kernel_ridge import MultipleKernelRidgeCV
    from himalaya.scoring import r2_score_split

    with _himalaya_backend(device) as backend:
        train_k = np.stack([x @ x.T for x in x_train]).astype(np.float32)
        test_k = np.stack([xt @ x.T for xt, x in zip(x_test, x_train, strict=True)]).astype(np.float32)
        model = MultipleKernelRidgeCV(
            kernels="precomputed", solver="random_search", cv=[(np.asarray(a), np.asarray(b)) for a, b in folds],
            random_state=seed,
            solver_params={"n_iter": n_iter, "alphas": np.asarray(alphas, dtype=np.float32),
                           "progress_bar": False, "n_targets_batch": 2048})
        model.fit(train_k, y_train.astype(np.float32))
        split = model.predict(test_k, split=True)
        centred = (y_test - y_test.mean(0)).astype(np.float32)  # the split R^2 is defined on centred data
        split_r2 = backend.to_numpy(r2_score_split(backend.asarray(centred), split))
        prediction = backend.to_numpy(split).sum(0)
        deltas = backend.to_numpy(model.deltas_)
    weights = np.exp(deltas - deltas.max(0, keepdims=True))
    weights /= weights.sum(0, keepdims=True)
    return BandedResult(list(names), np.nan_to_num(pearson_r(prediction, y_test)),
                        np.nan_to_num(r2_score(y_test, prediction)), np.nan_to_num(split_r2).astype(np.float32),
                        weights.astype(np.float32))


__all__ = ["BandedResult", "banded_ridge"]

"""Scoring feature spaces against responses: ridge per layer, noise ceiling, significance, stacking.

Arrays in, arrays out. :func:`evaluate_layer` fits one feature space's layer;
:func:`select_best_layer` picks a layer by cross-validated training score
(never by test score); :func:`stack_spaces` combines spaces' best layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ceiling import cc_max, cc_norm
from .ridge import DEFAULT_ALPHAS, REFERENCE_ALPHAS, fit_and_score, pearson_r, r2_score, reference_to_alpha, \
    ridge_predict
from .stacking import stack_weights, stacked_prediction
from .stats import fdr_bh, permutation_pvalues

#: Statistics kept per layer and voxel, in this order along the last axis of ``LayerStats.array``.
LAYER_STATS = ("r", "r2", "cc_norm", "alpha", "cv_score")


def alpha_grid(name: str) -> np.ndarray:
    """``default`` (himalaya's convention) or ``reference`` (logspace(1, 4, 15), squared to that convention)."""
    return reference_to_alpha(REFERENCE_ALPHAS) if name == "reference" else np.asarray(DEFAULT_ALPHAS)


@dataclass
class LayerFit:
    layer: int
    test_r: np.ndarray
    test_r2: np.ndarray
    alphas: np.ndarray
    cv_score: np.ndarray
    predictions: np.ndarray
    valid: np.ndarray
    weights: np.ndarray | None = None   # [n_features, n_voxels], only when asked

    def stats(self, ceiling: np.ndarray | None) -> np.ndarray:
        norm = cc_norm(self.test_r, ceiling) if ceiling is not None else np.zeros_like(self.test_r)
        return np.stack([self.test_r, self.test_r2, norm, self.alphas, self.cv_score], axis=-1).astype(np.float32)


def evaluate_layer(layer: int, x_train, y_train, x_test, y_test, folds, alphas, *, device="cpu",
                   mem_gb=None, return_weights=False) -> LayerFit:
    """Cross-validated ridge on the training rows, scored on the test rows."""
    out = fit_and_score(x_train, y_train, x_test, y_test, folds, alphas, return_predictions=True, device=device,
                        mem_gb=mem_gb, return_weights=return_weights)
    weights = np.asarray(out["weights"], dtype=np.float32) if return_weights else None
    return LayerFit(layer, out["test_r"], out["test_r2"], out["alphas"], out["cv_score"], out["predictions"],
                    out["valid"], weights)


def evaluate_layer_outer(layer: int, x, y, groups, outer_folds, alphas, *, n_inner: int = 5, seed: int = 0,
                         device="cpu", mem_gb=None) -> LayerFit:
    """Scores without a test story: an outer leave-stories-out loop around the cross-validated ridge.

    Each outer fold's held-out stories are predicted by a model whose alphas were chosen
    on the other stories only (inner leave-stories-out); r and R^2 are computed on all
    held-out rows together. The returned alpha is the geometric mean over outer folds.
    """
    from .cv import leave_stories_out

    pred = np.zeros(y.shape, dtype=np.float32)
    scored = np.zeros(len(y), dtype=bool)
    log_alphas, cv_scores, valid = [], [], np.ones(y.shape[1], dtype=bool)
    for train, test in outer_folds:
        inner = leave_stories_out(groups[train], n_inner, seed)
        out = fit_and_score(x[train], y[train], x[test], y[test], inner, alphas, return_predictions=True,
                            device=device, mem_gb=mem_gb)
        pred[test] = out["predictions"]
        scored[test] = True
        log_alphas.append(np.log(out["alphas"]))
        cv_scores.append(out["cv_score"])
        valid &= out["valid"]
    held_pred, held_y = pred[scored], y[scored]
    r = np.where(valid, np.nan_to_num(pearson_r(held_pred, held_y)), 0.0)
    r2 = np.where(valid, np.nan_to_num(r2_score(held_y, held_pred)), 0.0)
    return LayerFit(layer, r, r2, np.exp(np.mean(log_alphas, 0)), np.mean(cv_scores, 0), held_pred, valid)


def select_best_layer(fits: list[LayerFit]) -> LayerFit:
    """The layer with the highest mean cross-validated training score over fitted voxels."""
    return max(fits, key=lambda f: float(np.mean(f.cv_score[f.valid])) if f.valid.any() else -np.inf)


def noise_ceiling(test_repeats: np.ndarray | None, floor: float | None = None) -> np.ndarray | None:
    """CC_max per voxel from the test repeats (None when there are fewer than two)."""
    if test_repeats is None or len(test_repeats) < 2:
        return None
    return cc_max(test_repeats, floor=floor)


def significance(prediction, response, *, n_permutations=1000, q=0.05, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel p-values by circular shifts of the prediction (respecting autocorrelation) and the FDR mask."""
    p = permutation_pvalues(prediction, response, n_permutations=n_permutations, method="circular",
                            rng=np.random.default_rng(seed))
    return p, fdr_bh(p, q=q)


@dataclass
class StackedResult:
    """Convex per-voxel weights of several spaces' best layers, and the stacked test scores."""

    names: list[str]
    weights: np.ndarray          # [n_spaces, V]
    r: np.ndarray                # [V]
    r2: np.ndarray               # [V]


def out_of_fold_predictions(x_train, y_train, folds, alphas, *, device="cpu", mem_gb=None) -> np.ndarray:
    """Each training row predicted by a model fitted without its fold (folds must partition the rows)."""
    out = np.zeros(y_train.shape, dtype=np.float32)
    for train, val in folds:
        out[val] = ridge_predict(x_train[train], y_train[train], x_train[val], alphas, device=device, mem_gb=mem_gb)
    return out


def stack_spaces(names, oof: list[np.ndarray], test_predictions: list[np.ndarray], y_train,
                 y_test) -> StackedResult:
    """Convex per-voxel weights of the spaces' out-of-fold predictions, applied to their test predictions."""
    weights = stack_weights(np.stack(oof), y_train)
    pred = stacked_prediction(weights, np.stack(test_predictions))
    return StackedResult(list(names), np.asarray(weights, dtype=np.float32), np.nan_to_num(pearson_r(pred, y_test)),
                         np.nan_to_num(r2_score(y_test, pred)))

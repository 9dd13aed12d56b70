"""Scoring feature spaces against responses: ridge per layer, noise ceiling, significance, stacking.

Arrays in, arrays out. :func:`evaluate_layer` fits one feature space's layer;
:func:`select_best_layer` picks a layer by cross-validated training score
(never by test score); :func:`stack_spaces` combines spaces' best layers. Without a test
story, :mod:`bidsenc.models.nested` chooses the layer inside each outer fold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ceiling import cc_max, cc_norm
from .ridge import DEFAULT_ALPHAS, REFERENCE_ALPHAS, fit_and_score, pearson_r, r2_score, reference_to_alpha, \
    ridge_predict
from .stacking import residual_covariance, solve_simplex_qp, stacked_prediction
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
        norm = cc_norm(self.test_r, ceiling) if ceiling is not None else np.full_like(self.test_r, np.nan)
        return np.stack([self.test_r, self.test_r2, norm, self.alphas, self.cv_score], axis=-1).astype(np.float32)


def evaluate_layer(layer: int, x_train, y_train, x_test, y_test, folds, alphas, *, score="r2", device="cpu",
                   mem_gb=None, dtype="float32", return_weights=False) -> LayerFit:
    """Cross-validated ridge on the training rows (alphas chosen by ``score``), scored on the test rows."""
    out = fit_and_score(x_train, y_train, x_test, y_test, folds, alphas, score=score, return_predictions=True,
                        device=device, mem_gb=mem_gb, dtype=dtype, return_weights=return_weights)
    weights = np.asarray(out["weights"], dtype=np.float32) if return_weights else None
    return LayerFit(layer, out["test_r"], out["test_r2"], out["alphas"], out["cv_score"], out["predictions"],
                    out["valid"], weights)


def evaluate_layer_outer(layer: int, x, y, groups, outer_folds, alphas, *, n_inner: int = 5, seed: int = 0,
                         gap: int = 5, score="r2", device="cpu", mem_gb=None, dtype="float32") -> LayerFit:
    """Scores of one layer without a test story: an outer leave-stories-out loop around the cross-validated ridge.

    Each outer fold's held-out stories are predicted by a model whose alphas were chosen
    on the other stories only (inner leave-stories-out, ``gap`` rows left out around
    contiguous blocks when a single story remains); r and R^2 are computed on all
    held-out rows together. The returned alpha is the geometric mean over outer folds.
    A model with several layers is :func:`bidsenc.models.nested.nested_outer_cv`.
    """
    from .nested import nested_outer_cv

    fit = nested_outer_cv([(layer, x)], y, groups, outer_folds, alphas, n_inner=n_inner, seed=seed, gap=gap,
                          score=score, device=device, mem_gb=mem_gb, dtype=dtype)
    return LayerFit(layer, fit.r, fit.r2, fit.layer_alphas[0], fit.layer_cv_score[0], fit.predictions, fit.valid)


def select_best_layer(fits: list[LayerFit]) -> LayerFit:
    """The layer with the highest mean cross-validated training score over fitted voxels."""
    return max(fits, key=lambda f: float(np.mean(f.cv_score[f.valid])) if f.valid.any() else -np.inf)


def noise_ceiling(test_repeats: np.ndarray | None, floor: float | None = None,
                  convention: str = "consistent") -> np.ndarray | None:
    """CC_max per voxel from the test repeats (None when there are fewer than two)."""
    if test_repeats is None or len(test_repeats) < 2:
        return None
    return cc_max(test_repeats, floor=floor, convention=convention)


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


def out_of_fold_residual_covariance(designs, alphas, y_train, folds, *, device="cpu", mem_gb=None,
                                    dtype="float32") -> np.ndarray:
    """Per voxel, the covariance of several spaces' out-of-fold residuals (what stacking weighs).

    ``P[v, i, j] = mean_t e_i e_j`` with ``e_j = y - p_j`` and ``p_j`` the out-of-fold
    prediction of space ``j`` (design ``designs[j]``, one alpha per voxel ``alphas[j]``), as
    :func:`bidsenc.models.stacking.residual_covariance` of the stacked out-of-fold predictions
    gives it. Computed fold by fold, keeping only each fold's predictions: every space's
    out-of-fold predictions over all rows would be as large as the responses, per space.
    Folds must partition the rows.
    """
    _check_partition(folds, len(y_train))
    total = None
    for train, val in folds:
        val = np.flatnonzero(val) if np.asarray(val).dtype == bool else np.asarray(val)
        preds = np.empty((len(designs), len(val), y_train.shape[1]), dtype=np.float32)
        for j, (x, a) in enumerate(zip(designs, alphas, strict=True)):
            preds[j] = ridge_predict(x, y_train, x[val], a, device=device, mem_gb=mem_gb, dtype=dtype,
                                     train_rows=train)
        part = residual_covariance(preds, y_train[val]) * len(val)
        total = part if total is None else total + part
    return total / len(y_train)


def _check_partition(folds, n_rows: int) -> None:
    seen = np.zeros(n_rows, dtype=int)
    for _, val in folds:
        seen[val] += 1
    if not (seen == 1).all():
        raise ValueError("out-of-fold predictions need validation folds that hold out every row exactly once")


def stack_spaces(names, residual_cov: np.ndarray, test_predictions: list[np.ndarray], y_test) -> StackedResult:
    """Convex per-voxel weights from the spaces' out-of-fold residual covariance, applied to their test predictions.

    ``residual_cov`` is :func:`out_of_fold_residual_covariance` (``V x J x J``).
    """
    weights = solve_simplex_qp(residual_cov)
    pred = stacked_prediction(weights, np.stack(test_predictions))
    return StackedResult(list(names), np.asarray(weights, dtype=np.float32), np.nan_to_num(pearson_r(pred, y_test)),
                         np.nan_to_num(r2_score(y_test, pred)))


# --------------------------------------------------------------------------- shuffled-stimulus null

def circular_shift_blocks(x: np.ndarray, groups: np.ndarray, rng: np.random.Generator,
                          min_fraction: float = 0.2) -> np.ndarray:
    """Rows of ``x`` rolled within each contiguous block of equal ``groups`` by a random lag.

    The lag lies between ``min_fraction`` and ``1 - min_fraction`` of the block, so the
    features keep their own temporal structure (autocorrelation, drift, word rate) but
    no longer line up with the responses: the stimulus is misaligned on purpose.
    """
    out = np.empty_like(x)
    edges = np.flatnonzero(np.diff(groups)) + 1
    for block in np.split(np.arange(len(groups)), edges):
        n = len(block)
        lo, hi = int(np.ceil(min_fraction * n)), int(np.floor((1 - min_fraction) * n))
        lag = int(rng.integers(lo, hi + 1)) if hi >= lo and n > 1 else 0
        out[block] = np.roll(x[block], lag, axis=0)
    return out


@dataclass
class NullScores:
    """Test r of a model refitted on misaligned features, against the real fit's r.

    ``r`` holds one row per draw; :attr:`threshold` is the 95th percentile of the null r
    pooled over draws and voxels, so the fraction of voxels above it is about 5 % for a
    model that carries no information about the responses.
    """

    r: np.ndarray            # [n_draws, V]
    real_r: np.ndarray       # [V]

    @property
    def mean_r(self) -> float:
        return float(self.r.mean())

    @property
    def threshold(self) -> float:
        return float(np.quantile(self.r, 0.95))

    @property
    def fraction_above(self) -> float:
        """Fraction of voxels whose real r exceeds the null's 95th percentile."""
        return float((self.real_r > self.threshold).mean())

    @property
    def clearly_above(self) -> bool:
        """The real mean r beats every draw's mean r, and twice the null's 5 % of voxels pass its threshold."""
        return bool(self.real_r.mean() > self.r.mean(1).max() and self.fraction_above >= 0.10)


def shuffled_null(refit, x_train, train_groups, x_test, real_r, *, n_draws: int = 5, seed: int = 0) -> NullScores:
    """The same fit on features circularly shifted per story (train and test alike), ``n_draws`` times.

    ``refit(x_train, x_test)`` must run exactly the fit that gave ``real_r`` (alpha
    selection included) and return the test r per voxel; ``x_test`` may be None (an
    outer cross-validation shifts the training stories only, which it also scores).
    """
    rng = np.random.default_rng([seed, 7919])
    draws = []
    for _ in range(n_draws):
        shifted_train = circular_shift_blocks(x_train, train_groups, rng)
        shifted_test = None if x_test is None else circular_shift_blocks(x_test, np.zeros(len(x_test), int), rng)
        draws.append(np.asarray(refit(shifted_train, shifted_test), dtype=np.float32))
    return NullScores(np.stack(draws), np.asarray(real_r, dtype=np.float32))

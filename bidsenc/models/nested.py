"""Held-out scores without a test story: nested layer selection and a null that repeats it.

Without a repeated test story, a model is scored by an outer cross-validation over
stories (or contiguous blocks of one story). Every choice made from the data must then
be made inside each outer fold from that fold's training rows alone, or the score is
not held out: :func:`nested_outer_cv` chooses each voxel's alpha by an inner
cross-validation (as :func:`~bidsenc.models.ridge.fit_and_score` does) *and* the layer
of the model, per outer fold, from the inner cross-validated scores on that fold's
training rows; each held-out block is predicted by its own fold's layer.

The misaligned-stimulus null runs exactly the same procedure on designs built from a
misaligned stimulus (the caller's ``null_designs``: for bidsenc, each story's stimulus
rotated in time, the same rotation for every layer, then Lanczos-resampled, delayed,
filtered and trimmed like the real one; see :func:`bidsenc.align.misalign`). Rotating the
stimulus rather than the rows of the filtered design or of the cleaned responses matters
within a single story: a rolled series carries a step where its end meets its start and
loses the edge structure that the run's filter gives the real design and responses
alike, and on outer cross-validation over blocks of one story that alone lowered the
null's mean r by about 0.025 (docs/benchmarks.md).

Arrays in, arrays out; nothing here knows about BIDS or files.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .cv import leave_stories_out
from .ridge import fit_and_score, pearson_r, r2_score
from .stats import circular_shift_sd


@dataclass
class NestedFit:
    """Outer-cross-validated scores of one model, its layer chosen inside each outer fold.

    Arrays over voxels cover the real responses; ``null_*`` the same procedure on
    ``n_draws`` misaligned copies of them.
    """

    layers: np.ndarray           # [L] layer ids, in the order fitted
    layer_r: np.ndarray          # [L, V] each layer's own outer-CV r (the layer curve)
    layer_r2: np.ndarray         # [L, V]
    layer_alphas: np.ndarray     # [L, V] geometric mean over outer folds of the chosen alphas
    layer_cv_score: np.ndarray   # [L, V] mean over outer folds of the inner cross-validated score
    valid: np.ndarray            # [V] voxels fitted in every fold
    fold_layers: np.ndarray      # [n_folds] the layer each outer fold chose (real responses)
    r: np.ndarray                # [V] the model's held-out r: every block predicted by its own fold's layer
    r2: np.ndarray               # [V]
    predictions: np.ndarray      # [n_scored, V] the nested predictions of the scored rows
    scored: np.ndarray           # [n_rows] bool: rows held out by some outer fold, in the order predicted
    null_r: np.ndarray           # [n_draws, V] the model's r on misaligned responses, same procedure
    null_fold_layers: np.ndarray  # [n_draws, n_folds]
    null_layer_r: np.ndarray     # [n_draws, L] mean over voxels of each layer's outer r, misaligned
    shift_sd: np.ndarray         # [V] r's spread over circular shifts of the nested prediction (its scale)
    null_shift_sd: np.ndarray    # [n_draws, V]

    @property
    def z(self) -> np.ndarray:
        """r on the scale of its own autocorrelation: ``r / shift_sd`` (0 where undefined)."""
        return _ratio(self.r, self.shift_sd)

    @property
    def null_z(self) -> np.ndarray:
        return _ratio(self.null_r, self.null_shift_sd)

    @property
    def chosen_layer(self) -> int:
        """The layer most outer folds chose (ties: the earlier layer)."""
        values, counts = np.unique(self.fold_layers, return_counts=True)
        order = [int(v) for v in self.layers if v in values]
        return max(order, key=lambda v: counts[list(values).index(v)])

    @property
    def chosen_share(self) -> float:
        """The share of outer folds that chose :attr:`chosen_layer`."""
        return float(np.mean(self.fold_layers == self.chosen_layer))


def _ratio(a, b) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(np.shape(a), dtype=np.float64), where=np.asarray(b) > 0)


def nested_outer_cv(designs: Iterable[tuple[int, np.ndarray]], y: np.ndarray, groups: np.ndarray, outer_folds,
                    alphas, *, n_inner: int = 5, seed: int = 0, gap: int = 5, null_designs=(),
                    column_groups: np.ndarray | None = None, score: str = "r2", device="cpu", mem_gb=None,
                    dtype: str = "float32") -> NestedFit | list[NestedFit]:
    """Outer cross-validation of a model with several layers, the layer chosen inside each fold.

    Parameters
    ----------
    designs : iterable of (layer, array (n_rows, n_features))
        Each layer's delayed design over the training rows; read one at a time, so a
        generator keeps one layer in memory.
    y : array, shape (n_rows, n_voxels)
        Responses.
    groups : array of int, shape (n_rows,)
        The story of each row (a single story is cut into contiguous blocks).
    outer_folds : list of (train, test) index arrays
        The outer split; ``test`` rows are scored.
    alphas : array
        Ridge penalties; each voxel's alpha is chosen by an inner leave-stories-out
        cross-validation (``n_inner`` folds, ``gap`` rows left out around blocks of a
        single story) on the outer fold's training rows.
    null_designs : iterable of iterables like ``designs``
        One per null draw: the layers' designs built from a misaligned stimulus, run
        through the same procedure (alphas and layers chosen again in every fold).
    column_groups : array of int, shape (n_voxels,), optional
        Columns that choose their layer together (default: all of them, one model of one
        participant). Several participants or regions fitted at once on a shared design
        give each its own group; then a list of :class:`NestedFit`, one per group.
    score, device, mem_gb, dtype
        As in :func:`~bidsenc.models.ridge.fit_and_score`.

    Returns
    -------
    NestedFit, or a list of them with ``column_groups``.

    Notes
    -----
    A layer is chosen per outer fold by the mean over valid voxels of its inner
    cross-validated score at each voxel's chosen alpha (ties: the earlier layer), as a
    test story's layer is chosen from the training stories.
    """
    y = np.asarray(y, dtype=np.float32)
    n, n_vox = y.shape
    groups = np.asarray(groups)
    cols = np.zeros(n_vox, int) if column_groups is None else np.asarray(column_groups)
    names, unit = np.unique(cols, return_inverse=True)
    n_units = len(names)
    scored = np.zeros(n, dtype=bool)
    for _, test in outer_folds:
        scored[test] = True
    n_folds = len(outer_folds)
    inner = [leave_stories_out(groups[train], n_inner, seed, gap) for train, _ in outer_folds]

    nested = np.zeros((n, n_vox), dtype=np.float32)
    best = np.full((n_folds, n_units), -np.inf)
    best_index = np.zeros((n_folds, n_units), dtype=int)
    valid = np.ones(n_vox, dtype=bool)
    layers, layer_r, layer_r2, layer_alpha, layer_cv = [], [], [], [], []
    for li, (layer, x) in enumerate(designs):
        x = np.asarray(x)
        pred = np.zeros((n, n_vox), dtype=np.float32)
        log_alpha = np.zeros(n_vox)
        cv_mean = np.zeros(n_vox)
        for f, ((train, test), folds) in enumerate(zip(outer_folds, inner, strict=True)):
            out = fit_and_score(x[train], y[train], x[test], y[test], folds, alphas, score=score,
                                return_predictions=True, device=device, mem_gb=mem_gb, dtype=dtype)
            pred[test] = out["predictions"]
            log_alpha += np.log(out["alphas"]) / n_folds
            cv_mean += out["cv_score"] / n_folds
            valid &= out["valid"]
            # the layer's inner score per selection unit, over that unit's voxels fitted in this fold
            fitted = out["valid"]
            total = np.bincount(unit[fitted], weights=np.asarray(out["cv_score"], float)[fitted], minlength=n_units)
            n_fit = np.bincount(unit[fitted], minlength=n_units)
            unit_score = np.where(n_fit > 0, total / np.maximum(n_fit, 1), -np.inf)
            better = unit_score > best[f]  # strictly: ties keep the earlier layer
            best[f] = np.where(better, unit_score, best[f])
            best_index[f] = np.where(better, li, best_index[f])
            take = better[unit]
            nested[np.ix_(test, np.flatnonzero(take))] = out["predictions"][:, take]
        layers.append(layer)
        layer_r.append(np.nan_to_num(pearson_r(pred[scored], y[scored])))
        layer_r2.append(np.nan_to_num(r2_score(y[scored], pred[scored])))
        layer_alpha.append(np.exp(log_alpha))
        layer_cv.append(cv_mean)
        del pred
    if not layers:
        raise ValueError("nested_outer_cv needs at least one layer")
    layers = np.asarray(layers)
    held_pred, held_y = nested[scored], y[scored]
    r_all = np.where(valid, np.nan_to_num(pearson_r(held_pred, held_y)), 0.0)
    r2_all = np.where(valid, np.nan_to_num(r2_score(held_y, held_pred)), 0.0)
    sd_all = np.where(valid, circular_shift_sd(held_pred, held_y), 0.0)
    draws = [nested_outer_cv(d, y, groups, outer_folds, alphas, n_inner=n_inner, seed=seed, gap=gap,
                             column_groups=unit, score=score, device=device, mem_gb=mem_gb, dtype=dtype)
             for d in null_designs]

    layer_r, layer_r2 = np.where(valid, np.stack(layer_r), 0.0), np.where(valid, np.stack(layer_r2), 0.0)
    layer_alpha, layer_cv = np.stack(layer_alpha), np.stack(layer_cv)

    def per_draw(g, get, width):  # [n_draws, width] of each null draw's fit of group g
        return np.stack([get(d[g]) for d in draws]) if draws else np.zeros((0, width))

    fits = []
    for g in range(n_units):
        mine = unit == g
        n_mine = int(mine.sum())
        fits.append(NestedFit(
            layers=layers,
            layer_r=layer_r[:, mine].astype(np.float32), layer_r2=layer_r2[:, mine].astype(np.float32),
            layer_alphas=layer_alpha[:, mine].astype(np.float32),
            layer_cv_score=layer_cv[:, mine].astype(np.float32),
            valid=valid[mine],
            fold_layers=layers[best_index[:, g]],
            r=r_all[mine].astype(np.float32), r2=r2_all[mine].astype(np.float32),
            predictions=held_pred[:, mine], scored=scored,
            null_r=per_draw(g, lambda f: f.r, n_mine).astype(np.float32),
            null_fold_layers=per_draw(g, lambda f: f.fold_layers, n_folds).astype(int),
            null_layer_r=per_draw(g, lambda f: f.layer_r.mean(1), len(layers)).astype(np.float32),
            shift_sd=sd_all[mine],
            null_shift_sd=per_draw(g, lambda f: f.shift_sd, n_mine)))
    return fits if column_groups is not None else fits[0]

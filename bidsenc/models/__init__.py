"""Encoding models on plain arrays: ridge, noise ceilings, stacking and statistics.

Nothing in this package knows about BIDS or files: every function takes numpy arrays (or
torch tensors) and returns numpy arrays, so it can be scripted against directly.  The
pipeline uses the same functions.

Ridge (:mod:`bidsenc.models.ridge`; one alpha per voxel, himalaya's alpha convention)
    :func:`ridge_cv`, :func:`fit_and_score`, :func:`ridge_weights`, :func:`ridge_predict`,
    :func:`pearson_r`, :func:`r2_score`, :func:`reference_to_alpha`, :func:`alpha_to_reference`
Validation splits (:mod:`bidsenc.models.cv`)
    :func:`leave_stories_out`, :func:`contiguous_blocks`, :func:`bootstrap_chunks`
Noise ceilings (:mod:`bidsenc.models.ceiling`)
    :func:`cc_max`, :func:`cc_norm`, :func:`explainable_variance`, :func:`intersubject_ceiling`
Stacking (:mod:`bidsenc.models.stacking`)
    :func:`stack_weights`, :func:`stacked_prediction`, :func:`solve_simplex_qp`
Held-out scores without a test story (:mod:`bidsenc.models.nested`)
    :func:`nested_outer_cv` (layers chosen inside each outer fold, with a null that repeats it)
Statistics (:mod:`bidsenc.models.stats`)
    :func:`permutation_pvalues`, :func:`pooled_null_pvalues`, :func:`fdr_bh`

Delays, Lanczos resampling and z-scoring live one step upstream, in :mod:`bidsenc.align`.

Examples
--------
>>> import numpy as np
>>> from bidsenc.models import leave_stories_out, ridge_cv
>>> rng = np.random.default_rng(0)
>>> X = rng.standard_normal((200, 10))
>>> Y = X @ rng.standard_normal((10, 3)) + rng.standard_normal((200, 3))
>>> folds = leave_stories_out(np.repeat(np.arange(4), 50), n_folds=4)
>>> result = ridge_cv(X, Y, folds, alphas=np.logspace(-2, 4, 13))
>>> result.alphas.shape, result.fold_scores.shape
((3,), (4, 13, 3))
"""

from .ceiling import cc_max, cc_norm, explainable_variance, intersubject_ceiling
from .cv import bootstrap_chunks, contiguous_blocks, leave_stories_out
from .ridge import (
    DEFAULT_ALPHAS,
    REFERENCE_ALPHAS,
    RidgeCVResult,
    alpha_to_reference,
    fit_and_score,
    pearson_r,
    r2_score,
    reference_to_alpha,
    ridge_cv,
    ridge_predict,
    ridge_weights,
)
from .nested import NestedFit, nested_outer_cv
from .stacking import solve_simplex_qp, stack_weights, stacked_prediction
from .stats import fdr_bh, permutation_pvalues, pooled_null_pvalues

__all__ = [
    "DEFAULT_ALPHAS", "REFERENCE_ALPHAS", "NestedFit", "RidgeCVResult", "alpha_to_reference", "bootstrap_chunks", "cc_max",
    "cc_norm", "contiguous_blocks", "explainable_variance", "fdr_bh", "fit_and_score", "intersubject_ceiling",
    "leave_stories_out", "nested_outer_cv", "pearson_r", "permutation_pvalues", "pooled_null_pvalues", "r2_score", "reference_to_alpha", "ridge_cv",
    "ridge_predict", "ridge_weights", "solve_simplex_qp", "stack_weights", "stacked_prediction",
]

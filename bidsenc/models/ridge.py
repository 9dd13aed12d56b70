"""Cross-validated ridge regression with one regularisation per voxel, in torch (CPU and CUDA).

Arrays in, arrays out; nothing here knows about BIDS or files.

Model and conventions
---------------------
For one feature space ``X`` (samples x features) and responses ``Y`` (samples x voxels),
each voxel ``v`` gets weights ``w_v = (X'X + alpha_v I)^-1 X'y_v``: the penalty ``alpha``
is the one of scikit-learn and himalaya (``||X w - y||^2 + alpha ||w||^2``).

* **Reference units.**  The reference code's penalty enters squared (its SVD solution is
  ``V diag(S / (S^2 + a^2)) U'y``), so its ``a`` is ``alpha = a**2`` here
  (:func:`reference_to_alpha`).  Its grid ``logspace(1, 4, 15)`` is
  :data:`REFERENCE_ALPHAS`; ``reference_to_alpha(REFERENCE_ALPHAS)`` is
  ``logspace(2, 8, 15)`` in our units.
* **Default grid.**  :data:`DEFAULT_ALPHAS` is ``logspace(0, 10, 21)`` (half-decade
  steps).  It contains the reference grid's range (``1e2 .. 1e8``) with two decades
  of margin on each side: z-scored delayed features with ``n`` samples and ``p``
  features have kernel eigenvalues up to about ``n * p`` times their correlation, so on the
  real problem (30,000 TRs, up to 32,768 features) poorly predicted voxels need alphas
  well above ``1e8``, while ``1`` is small enough for any well-predicted voxel.  Choices
  at either end of the grid are worth a look (:attr:`RidgeCVResult.at_grid_edge`).
* **No intercept.**  Like himalaya (``fit_intercept=False``), nothing is centred here:
  the caller z-scores features and responses (per run/story) before fitting.
* **Choosing alpha.**  Regularisation is chosen on training data only, with the folds the
  caller gives (leave-stories-out ``(train_idx, val_idx)`` pairs).  The score of an
  alpha for a voxel is the mean over folds of the validation score: ``"r2"`` (default,
  the coefficient of determination ``1 - SSE/SST`` on the validation rows, 0 where the
  validation rows are constant), ``"r"`` (Pearson correlation, 0 where undefined; the
  reference's ``use_corr=True``), ``"neg_mse"`` (minus the mean squared error: himalaya's
  default ``l2_neg_loss``) or ``"reference"`` (the reference's ``use_corr=False`` score, see
  :func:`ridge_cv`).
  Fold scores are float32 (float64 in float64 mode); their mean is taken in float64.
  The best alpha wins; ties go to the **larger** alpha (as in himalaya, which adds
  ``1e-10 * log(alpha)`` to the mean scores before the argmax; so do we, which makes the
  two pick the same alpha whenever their scores agree).
  Alphas smaller than twice the magnitude of a negative eigenvalue of a fold's
  Gram matrix (rounding on a near-singular problem) are not selectable for that fold
  (score ``-1e5``), again as in himalaya.
* **Refit.**  Each voxel is refit on all training rows with its own alpha.
* **Degenerate voxels.**  A voxel whose training responses are constant (to rounding)
  or contain a non-finite value is not fitted: it is flagged ``False`` in ``valid``,
  its weights and predictions are 0, its scores are 0 and its alpha is the largest of
  the grid (the limit of heavy regularisation; himalaya also picks the largest alpha
  for a constant voxel, whose scores all tie).  Outputs never contain NaN.

Algorithm
---------
One symmetric eigendecomposition per fold and one for the refit; every alpha and every
voxel batch reuses it.  With ``n`` rows and ``p`` features:

* **kernel form** (``n < p``): ``K = X X'`` is computed once for all rows; a fold
  diagonalises ``K[train, train] = V diag(s) V'`` and predicts the validation rows as
  ``K[val, train] V diag(1/(s + alpha)) V' Y[train]``;
* **primal form** (``n >= p``): a fold diagonalises ``X'X = W diag(s) W'`` (``p x p``)
  and predicts ``X[val] W diag(1/(s + alpha)) W' X[train]' Y[train]``.

Validation predictions come from one matrix product per voxel batch: the
``(n_alphas * n_val) x n_train`` stack of ``K[val, train] V diag(1/(s + alpha)) V'`` is
built once per fold (in chunks of alphas if it would take more than half the memory
budget) when that costs fewer multiply-adds than applying ``V'`` to every voxel batch
(otherwise the fold is "factored": ``V' Y[train]`` per batch, then one product per alpha).
The CV cost is thus about ``n_alphas * n_val * min(n_train, p) * n_voxels`` per fold,
the same as himalaya's; the refit applies ``1/(s + alpha_v)`` per voxel (broadcast), so it
costs two products with the responses whatever the number of distinct alphas, where
himalaya computes every used alpha's weights for every voxel and then picks.

Validation scores are computed with himalaya's arithmetic (float32 squared residuals
summed over the validation rows, ``1 - SSE/SST``): for noise voxels the scores of
neighbouring large alphas differ by ~1e-7, so which of them wins is decided by float32
rounding; doing the same sums in the same order makes bidsenc pick himalaya's alpha for
those voxels too (on the ``small`` benchmark, himalaya's own numpy and torch backends
disagree on 0.5% of voxels, bidsenc and himalaya-torch on 0.01%).

Voxels run in batches of a fixed size (:data:`VOXEL_BATCH`), and the stacked operator in
chunks of a fixed size, whatever the free memory: the width of a product can change the
order in which BLAS sums, and near-tied scores of noise voxels would then pick other
alphas on a busy machine than on an idle one.  ``mem_gb`` is a limit, not a knob: a
problem whose batch does not fit in it is refused (:class:`MemoryBudgetError`) rather
than computed differently.  A batch that runs out of GPU memory is still retried at half
its size (with a warning), and later folds keep the smaller size.

Precision: float32 by default (``dtype="float64"`` for reference checks).  TF32
tensor-core matmuls on CUDA are off by default.  With TF32 emulated on the CPU (matmul
inputs rounded to 10 mantissa bits) on the ``small`` benchmark, everything in TF32 moved
test r by up to 4e-4 (the goal is 1e-4 against himalaya), and TF32 in the
cross-validation only (``allow_tf32="cv"``, refit in float32) chose himalaya's alpha for
99.8% of voxels instead of 99.99% (the others being near-ties of noise voxels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from . import backend as _backend

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ALPHAS",
    "REFERENCE_ALPHAS",
    "SCORES",
    "VOXEL_BATCH",
    "MemoryBudgetError",
    "RidgeCVResult",
    "alpha_to_reference",
    "fit_and_score",
    "pearson_r",
    "r2_score",
    "reference_to_alpha",
    "ridge_cv",
    "ridge_predict",
    "ridge_weights",
]

#: The reference code's alpha grid, in its own (squared-penalty) units.
REFERENCE_ALPHAS = np.logspace(1, 4, 15)
#: bidsenc's default alpha grid (himalaya/scikit-learn units): 1 to 1e10 in half decades.
DEFAULT_ALPHAS = np.logspace(0, 10, 21)
#: Validation scores available for choosing alpha.
SCORES = ("r2", "r", "neg_mse", "reference")

# Score given to alphas that a fold's negative eigenvalues make meaningless (himalaya's value).
_UNSELECTABLE = -1e5
# Slope added to mean CV scores so that ties go to the larger alpha (himalaya's value).
_TIE_SLOPE = 1e-10
# A training variance at or below this fraction of the mean square is a constant voxel.
_CONSTANT_RTOL = 1e-24
# Elements of one float64 chunk in host-side scans of the responses (64 MiB).
_CHUNK_ELEMENTS = 2**23
# Safety factor on the per-voxel working-memory estimate used for batch sizes.
_MEMORY_MARGIN = 1.3
#: Voxels per batch, whatever the memory: how many columns a product has can change the order in
#: which BLAS and cuBLAS sum, hence the last bits of near-tied scores, hence the alpha chosen; with
#: a fixed batch, results do not depend on the free memory or on ``mem_gb``, which is a limit.
VOXEL_BATCH = 2048
# Elements of one chunk of the stacked per-alpha validation operator (2**27: 512 MiB in float32).
_OPERATOR_CHUNK_ELEMENTS = 2**27


class MemoryBudgetError(MemoryError):
    """``mem_gb`` is smaller than one fixed-size batch needs."""

    def __init__(self, need_bytes: int, budget_bytes: int, what: str):
        self.need_gb, self.budget_gb = need_bytes / 2**30, budget_bytes / 2**30
        super().__init__(f"{what} needs {self.need_gb:.2f} GiB for a batch of voxels, more than the "
                         f"{self.budget_gb:.2f} GiB allowed")

# "auto" (by counting multiply-adds), or "folded" / "factored" to force a CV operator (tests).
_OPERATOR = "auto"


def reference_to_alpha(a):
    """Convert reference alphas (penalty entering squared) to bidsenc/himalaya alphas: ``a**2``."""
    return np.asarray(a, dtype=np.float64) ** 2


def alpha_to_reference(alpha):
    """Convert bidsenc/himalaya alphas to the reference's units: ``sqrt(alpha)``."""
    return np.sqrt(np.asarray(alpha, dtype=np.float64))


@dataclass
class RidgeCVResult:
    """What :func:`ridge_cv` returns.

    Attributes
    ----------
    alphas : ndarray of float64, shape (n_voxels,)
        Chosen alpha per voxel (the largest grid alpha for invalid voxels).
    cv_scores : ndarray of float32 (float64 in float64 mode), shape (n_alphas, n_voxels)
        Validation score of every alpha, averaged over folds (0 for invalid voxels).
    best_cv_score : ndarray of float32 (float64 in float64 mode), shape (n_voxels,)
        Mean validation score at the chosen alpha: the cross-validated training score used
        to compare layers or feature spaces without touching the test set.
    alpha_grid : ndarray of float64, shape (n_alphas,)
        The alphas tried, in the order of ``cv_scores``' rows.
    valid : ndarray of bool, shape (n_voxels,)
        False for voxels that were not fitted (constant or non-finite training responses).
    score : str
        The validation score used (one of :data:`SCORES`).
    form : str
        ``"kernel"`` or ``"primal"``: the form of the refit on all training rows.
    fold_scores : ndarray of float32 (float64 in float64 mode), shape (n_folds, n_alphas, n_voxels)
        Validation score of every alpha in every fold (0 for invalid voxels, ``-1e5`` where an
        alpha was not selectable in a fold); ``cv_scores`` is their mean over folds.
    weights : ndarray of float32 (float64 in float64 mode), shape (n_features, n_voxels), or None
        Refit weights (only with ``return_weights=True``; 0 for invalid voxels).
    """

    alphas: np.ndarray
    cv_scores: np.ndarray
    best_cv_score: np.ndarray
    alpha_grid: np.ndarray
    valid: np.ndarray
    score: str
    form: str
    fold_scores: np.ndarray | None = None
    weights: np.ndarray | None = None

    @property
    def n_invalid(self) -> int:
        """Number of voxels that were not fitted."""
        return int((~self.valid).sum())

    @property
    def at_grid_edge(self) -> np.ndarray:
        """Boolean mask of valid voxels whose alpha is the smallest or largest of the grid."""
        edge = (self.alphas == self.alpha_grid.min()) | (self.alphas == self.alpha_grid.max())
        return edge & self.valid


# --------------------------------------------------------------------------------------
# Inputs


class _Data:
    """Training inputs on the device, and the valid voxels' responses, gathered by batch."""

    def __init__(self, X_train, Y_train, device, dtype, mem_gb, rows=None):
        torch = _backend._torch()
        self.device = _backend.resolve_device(device)
        self.dtype = _backend.torch_dtype(dtype)
        self.itemsize = 4 if self.dtype == torch.float32 else 8
        self.np_dtype = np.float32 if self.itemsize == 4 else np.float64
        X, _ = _backend.host_tensor(X_train, "X_train")
        Y, _ = _backend.host_tensor(Y_train, "Y_train")
        if X.shape[0] != Y.shape[0]:
            raise ValueError(f"X_train has {X.shape[0]} rows but Y_train has {Y.shape[0]}")
        # a subset of rows is gathered batch by batch, never as a copy of the responses
        self._rows = None
        if rows is not None:
            index = torch.from_numpy(_row_indices(rows, X.shape[0], "train_rows"))
            X, self._rows = X.index_select(0, index.to(X.device)), index.to(Y.device)
        self._resident_bytes = 0
        self.X = X.to(self.device, self.dtype)
        if not bool(torch.isfinite(self.X).all()):
            raise ValueError("X_train contains NaN or infinite values")
        self.n, self.p = self.X.shape
        self.n_voxels = Y.shape[1]
        self.valid = _valid_columns(Y, self._rows)
        self.valid_idx = np.flatnonzero(self.valid)
        self.n_valid = len(self.valid_idx)
        self.mem_gb = mem_gb
        self._Y = Y
        # Batches of valid voxels are column gathers, or plain slices when every voxel is valid.
        all_valid = self.n_valid == self.n_voxels
        self._cols = None if all_valid else torch.from_numpy(self.valid_idx).to(Y.device)
        # On a GPU, keep the valid responses resident when they take a modest share of the
        # memory: every fold then gathers its batches on the device instead of re-sending them.
        if self.device.type == "cuda" and Y.device != self.device and self.n_valid:
            need = self.n * self.n_valid * self.itemsize
            if need <= 0.4 * _backend.memory_budget(self.device):
                resident = torch.empty((self.n, self.n_valid), dtype=self.dtype, device=self.device)
                step = max(1, _CHUNK_ELEMENTS // max(1, self.n))
                for a in range(0, self.n_valid, step):
                    b = min(self.n_valid, a + step)
                    resident[:, a:b] = self._gather(a, b)
                self._Y = resident
                self._cols = self._rows = None
                self._resident_bytes = need

    def _gather(self, start: int, stop: int):
        cols = self._Y[:, start:stop] if self._cols is None else self._Y.index_select(1, self._cols[start:stop])
        if self._rows is not None:
            cols = cols.index_select(0, self._rows)
        return cols.to(self.device, self.dtype)

    def responses(self, start: int, stop: int):
        """Responses of valid voxels ``start:stop`` (in valid-voxel order), ``n x batch`` on the device.

        A view (no copy) when the responses are already on the device in the solver's dtype,
        every voxel is valid and all rows are used (no ``train_rows``); callers only read it.
        """
        return self._gather(start, stop)

    def budget(self) -> int:
        return _backend.memory_budget(self.device, self.mem_gb)

    @property
    def input_bytes(self) -> int:
        """The design on the device and, when copied there, the responses (the caller's own are not counted)."""
        return self.X.numel() * self.itemsize + self._resident_bytes


def _valid_columns(Y, rows=None) -> np.ndarray:
    """True for columns that are finite everywhere (in ``rows``, if given) and not constant (chunked, float64)."""
    torch = _backend._torch()
    n, v = (len(rows) if rows is not None else Y.shape[0]), Y.shape[1]
    valid = np.zeros(v, dtype=bool)
    if n == 0:
        return valid
    step = max(1, _CHUNK_ELEMENTS // max(1, n))
    for a in range(0, v, step):
        b = min(v, a + step)
        chunk = Y[:, a:b] if rows is None else Y[:, a:b].index_select(0, rows)
        var, mean = torch.var_mean(chunk.to(torch.float64), 0, correction=0)
        # A non-finite value anywhere makes the variance NaN or infinite.
        ok = torch.isfinite(var) & (var > _CONSTANT_RTOL * (var + mean * mean))
        valid[a:b] = ok.cpu().numpy()
    return valid


def _plan_batch(data, voxel_batch, per_voxel_bytes: int, fixed_bytes: int, what: str) -> int:
    """The voxel batch: ``voxel_batch`` if given, else :data:`VOXEL_BATCH`; checked against an explicit ``mem_gb``."""
    batch = int(voxel_batch) if voxel_batch else min(VOXEL_BATCH, max(1, data.n_valid))
    if data.mem_gb is not None:
        need, budget = fixed_bytes + batch * per_voxel_bytes + data.input_bytes, data.budget()
        if need > budget:
            raise MemoryBudgetError(need, budget, what)
    return batch


def _check_alphas(alphas) -> np.ndarray:
    alphas = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    if alphas.ndim != 1 or alphas.size == 0:
        raise ValueError("alphas must be a non-empty 1-D array")
    if not np.all(np.isfinite(alphas)) or np.any(alphas <= 0):
        raise ValueError("alphas must be finite and positive")
    return alphas


def _check_folds(folds, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for k, fold in enumerate(folds):
        try:
            train, val = fold
        except (TypeError, ValueError):
            raise ValueError(f"fold {k} must be a (train, val) pair of row indices or boolean masks") from None
        train, val = (_row_indices(rows, n, f"fold {k}: {name}") for name, rows in (("train", train), ("val", val)))
        if train.size == 0 or val.size == 0:
            raise ValueError(f"fold {k} has an empty training or validation set")
        if np.intersect1d(train, val).size:
            raise ValueError(f"fold {k}: training and validation rows overlap")
        out.append((train, val))
    if not out:
        raise ValueError("folds is empty: give at least one (train, val) pair")
    return out


def _row_indices(rows, n: int, what: str) -> np.ndarray:
    """Integer indices (int64) of ``rows``, given as indices or as a boolean mask over ``n`` rows."""
    rows = np.asarray(rows).ravel()
    if rows.dtype == bool:
        if rows.size != n:
            raise ValueError(f"{what} mask has {rows.size} entries for {n} rows")
        return np.flatnonzero(rows)
    if rows.size and not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"{what} must hold integer row indices or be a boolean mask")
    rows = rows.astype(np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"{what} indices outside 0..{n - 1}")
    return rows


def _check_score(score: str) -> str:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    return score


def _check_tf32(allow_tf32) -> tuple[bool, bool]:
    """(TF32 in the cross-validation, TF32 in the refit) for ``allow_tf32`` False / True / "cv"."""
    if allow_tf32 is False or allow_tf32 is None:
        return False, False
    if allow_tf32 is True:
        return True, True
    if allow_tf32 == "cv":
        return True, False
    raise ValueError(f"allow_tf32 must be False, True or 'cv', got {allow_tf32!r}")


def _use_kernel(n_rows: int, n_features: int, form: str) -> bool:
    if form not in ("auto", "kernel", "primal"):
        raise ValueError(f"form must be 'auto', 'kernel' or 'primal', got {form!r}")
    if form == "auto":
        return n_rows < n_features
    return form == "kernel"


# --------------------------------------------------------------------------------------
# Scores on the device


def _validation_scores(P, Yva, score: str):
    """Scores of predictions ``P`` (n_alphas, n_val, b) against ``Yva`` (n_val, b); overwrites P."""
    torch = _backend._torch()
    zero = torch.zeros((), dtype=P.dtype, device=P.device)
    if score == "r":
        yc = Yva - Yva.mean(0)
        yy = (yc * yc).sum(0)
        P.sub_(P.mean(1, keepdim=True))
        pp = (P * P).sum(1)
        P.mul_(yc)
        num = P.sum(1)
        den = torch.sqrt(pp * yy)
        return torch.where(den > 0, num / torch.where(den > 0, den, 1), zero)
    if score == "reference":
        # bootstrap_ridge(use_corr=False) of the reference code: R^2 against (1 + var(y)) / 2 (it
        # assumes z-scored validation rows), reported as sign(R^2) sqrt(|R^2|); variances ddof 0.
        P.sub_(Yva)
        residual_var = P.var(1, correction=0)
        r2 = 1 - residual_var / ((1 + Yva.var(0, correction=0)) / 2)
        return torch.sign(r2) * torch.sqrt(r2.abs())
    # Squared residuals summed over rows exactly as himalaya does (float32, one reduction
    # over the row axis): near-ties among noise voxels, whose scores differ by ~1e-7, are
    # then decided by the same rounding, not by ours (vector_norm accumulates 7x worse).
    P.sub_(Yva)
    sse = P.square_().sum(1)
    if score == "neg_mse":
        return -sse / Yva.shape[0]
    yc = Yva - Yva.mean(0)
    sst = (yc * yc).sum(0)
    return torch.where(sst > 0, 1 - sse / torch.where(sst > 0, sst, 1), zero)


def _column_scores(Y, P):
    """Pearson r and R^2 per column of ``Y`` and ``P`` (samples x columns), 0 where undefined.

    A column is constant when its spread is rounding relative to its values (variance at most
    :data:`_CONSTANT_RTOL` of the mean square in float64, ``1e-10`` in lower precision): 100
    copies of 4.2 have a computed standard deviation of 8e-15, not 0.
    """
    torch = _backend._torch()
    zero = torch.zeros((), dtype=P.dtype, device=P.device)
    rtol = _CONSTANT_RTOL if P.dtype == torch.float64 else 1e-10
    n = Y.shape[0]
    my, mp = Y.mean(0), P.mean(0)
    yc = Y - my
    pc = P - mp
    yy = (yc * yc).sum(0)
    pp = (pc * pc).sum(0)
    y_varies = yy > rtol * (yy + n * my * my)
    both_vary = y_varies & (pp > rtol * (pp + n * mp * mp))
    den = torch.sqrt(torch.where(both_vary, yy * pp, 1))
    r = torch.where(both_vary, (yc * pc).sum(0) / den, zero)
    sse = ((Y - P) ** 2).sum(0)
    r2 = torch.where(y_varies, 1 - sse / torch.where(y_varies, yy, 1), zero)
    return r, r2


def _numpy_columns(fn, a, b, name_a: str, name_b: str):
    torch = _backend._torch()
    ta, a_np = _as_2d(a, name_a)
    tb, b_np = _as_2d(b, name_b)
    if ta.shape != tb.shape:
        raise ValueError(f"{name_a} and {name_b} differ in shape: {tuple(ta.shape)} vs {tuple(tb.shape)}")
    squeeze = np.ndim(a) == 1 if a_np else a.ndim == 1
    if a_np or b_np:
        # numpy in, numpy out: float64 on the CPU, in column chunks.
        ta = ta.cpu()
        tb = tb.cpu()
        n, v = ta.shape
        out = np.zeros(v, dtype=np.float64)
        step = max(1, _CHUNK_ELEMENTS // max(1, n))
        for s in range(0, v, step):
            e = min(v, s + step)
            out[s:e] = fn(ta[:, s:e].to(torch.float64), tb[:, s:e].to(torch.float64)).numpy()
        return out[0] if squeeze else out
    dtype = torch.promote_types(torch.promote_types(ta.dtype, tb.dtype), torch.float32)
    res = fn(ta.to(dtype), tb.to(ta.device, dtype))
    return res[0] if squeeze else res


def _as_2d(x, name):
    torch = _backend._torch()
    if isinstance(x, torch.Tensor):
        t, was_numpy = x, False
    else:
        array = np.asarray(x)
        if not np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float64)
        t, was_numpy = torch.from_numpy(np.ascontiguousarray(array)), True  # float64 chunk by chunk later
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D, got shape {tuple(t.shape)}")
    return t, was_numpy


def pearson_r(a, b):
    """Pearson correlation between matching columns of ``a`` and ``b``.

    Parameters
    ----------
    a, b : array_like or torch.Tensor, shape (n_samples, n_columns) or (n_samples,)
        E.g. responses and predictions.

    Returns
    -------
    r : ndarray of float64 (numpy input) or tensor (torch inputs), shape (n_columns,)
        0 where either column is constant (never NaN).
    """
    return _numpy_columns(lambda x, y: _column_scores(x, y)[0], a, b, "a", "b")


def r2_score(y, pred):
    """Coefficient of determination ``1 - SSE/SST`` per column (no intercept refit).

    Parameters
    ----------
    y : array_like or torch.Tensor, shape (n_samples, n_columns) or (n_samples,)
        Observed responses.
    pred : array_like or torch.Tensor, same shape
        Predictions.

    Returns
    -------
    r2 : ndarray of float64 (numpy input) or tensor (torch inputs), shape (n_columns,)
        0 where ``y`` is constant (as in himalaya); can be negative.
    """
    return _numpy_columns(lambda a, b: _column_scores(a, b)[1], y, pred, "y", "pred")


# --------------------------------------------------------------------------------------
# Cross-validation


class _FoldOperator:
    """Predicts one fold's validation rows for every alpha from a voxel batch's training rows.

    ``P[a] = A diag(D[a]) Z Y[train]`` with ``A`` (n_val x r), ``D`` (n_alphas x r) and
    ``Z`` (r x n_train).  "Folded": the operators ``A diag(D[a]) Z`` of a chunk of alphas
    are stacked into one ``(chunk * n_val) x n_train`` matrix, applied to each voxel batch
    with one product.  "Factored": ``Z Y[train]`` is computed per batch, then ``A diag(D[a])``
    per alpha (cheaper when ``r`` is much smaller than ``n_train``, i.e. primal folds with
    few features, or for few voxels).
    """

    def __init__(self, data: _Data, K, train, val, alphas_t, kernel: bool):
        torch = _backend._torch()
        dev = data.device
        self.tr = torch.from_numpy(train).to(dev)
        self.va = torch.from_numpy(val).to(dev)
        self.n_alphas = len(alphas_t)
        self.n_val, self.n_tr = len(val), len(train)
        self.itemsize = data.itemsize
        X = data.X
        self._Xtr = None
        if kernel:
            Ktt = K.index_select(0, self.tr).index_select(1, self.tr)
            s, V = torch.linalg.eigh(Ktt)
            del Ktt
            A = K.index_select(0, self.va).index_select(1, self.tr) @ V  # (n_val, r)
            Z = V.T  # (r, n_tr)
            right_cost = self.n_tr * self.n_tr
        else:
            Xtr = X.index_select(0, self.tr)
            s, W = torch.linalg.eigh(Xtr.T @ Xtr)
            A = X.index_select(0, self.va) @ W  # (n_val, p)
            Z = W.T  # times Xtr' below (folded) or per batch (factored)
            right_cost = self.n_tr * data.p + data.p * data.p
        self.r = r = s.shape[0]
        # himalaya: alphas below twice a negative eigenvalue's magnitude cannot be selected.
        smin = float(s[0])
        self.unselectable = np.zeros(self.n_alphas, bool)
        if smin < 0:
            self.unselectable = (alphas_t < -2 * smin).cpu().numpy()
        D = 1.0 / (alphas_t[:, None] + s[None, :])  # (n_alphas, r)
        D[torch.from_numpy(self.unselectable).to(dev)] = 0
        n_vox = max(1, data.n_valid)
        folded_cost = self.n_alphas * self.n_val * self.n_tr * (r + n_vox)
        factored_cost = right_cost * n_vox + self.n_alphas * self.n_val * r * n_vox
        self.folded = folded_cost <= factored_cost if _OPERATOR == "auto" else _OPERATOR == "folded"
        if self.folded and not kernel:
            Z = Z @ Xtr.T  # (p, n_tr)
        elif not kernel:
            self._Xtr = Xtr
        self.A, self.D, self.Z = A, D, Z
        self.primal_extra = 0 if kernel or self.folded else data.p
        self.M = None

    def operator_bytes(self, n_alphas: int) -> int:
        """Bytes of the stacked operator for ``n_alphas`` alphas (0 when factored)."""
        return n_alphas * self.n_val * self.n_tr * self.itemsize if self.folded else 0

    def elements_per_voxel(self, n: int, n_alphas: int) -> int:
        """Working elements per voxel of one batch (responses, gathers, predictions, temporaries)."""
        base = n + self.n_tr + 2 * self.n_val + n_alphas * self.n_val + 4 * n_alphas
        if not self.folded:
            base += 2 * self.r + self.primal_extra + self.n_val
        return base

    def prepare(self, alphas: slice) -> None:
        """Build the stacked operator of a chunk of alphas (folded form)."""
        torch = _backend._torch()
        self.M = None
        if not self.folded:
            return
        chunk = range(self.n_alphas)[alphas]
        M = torch.empty((len(chunk), self.n_val, self.n_tr), dtype=self.A.dtype, device=self.A.device)
        for k, a in enumerate(chunk):
            # The same association as himalaya's (Ktest V) @ (diag(d) V'), hence the same rounding.
            torch.matmul(self.A, self.D[a][:, None] * self.Z, out=M[k])
        self.M = M.view(len(chunk) * self.n_val, self.n_tr)

    def predict(self, Yb, alphas: slice):
        """Validation predictions (n_chunk, n_val, b) and validation responses (n_val, b)."""
        torch = _backend._torch()
        Ytr = Yb.index_select(0, self.tr)
        Yva = Yb.index_select(0, self.va)
        b = Yb.shape[1]
        chunk = range(self.n_alphas)[alphas]
        if self.folded:
            return (self.M @ Ytr).view(len(chunk), self.n_val, b), Yva
        R = self.Z @ (Ytr if self._Xtr is None else self._Xtr.T @ Ytr)  # (r, b)
        del Ytr
        P = torch.empty((len(chunk), self.n_val, b), dtype=Yb.dtype, device=Yb.device)
        for k, a in enumerate(chunk):
            torch.matmul(self.A, self.D[a][:, None] * R, out=P[k])
        return P, Yva


def _gram(data: _Data):
    return data.X @ data.X.T


def _cv_scores(data: _Data, folds, alphas, score, form, voxel_batch):
    """Fold scores, float32 or float64 numpy (n_folds, n_alphas, n_valid), and the Gram ``X X'`` if computed."""
    torch = _backend._torch()
    scores = np.zeros((len(folds), len(alphas), data.n_valid), dtype=data.np_dtype)
    if data.n_valid == 0:
        return scores, None
    n_alphas = len(alphas)
    alphas_t = torch.as_tensor(alphas, dtype=data.dtype, device=data.device)
    kernels = [_use_kernel(len(tr), data.p, form) for tr, _ in folds]
    K = _gram(data) if any(kernels) else None
    cap = None  # lowered after an out-of-memory retry, for the folds that follow
    for f, ((train, val), kernel) in enumerate(zip(folds, kernels)):
        op = _FoldOperator(data, K, train, val, alphas_t, kernel)
        # Alphas in chunks of a fixed operator size (not a share of the free memory: see VOXEL_BATCH).
        per_alpha = op.operator_bytes(1)
        chunk = n_alphas if per_alpha == 0 else \
            int(min(n_alphas, max(1, _OPERATOR_CHUNK_ELEMENTS * data.itemsize // per_alpha)))
        for c0 in range(0, n_alphas, chunk):
            sl = slice(c0, min(n_alphas, c0 + chunk))
            n_c = sl.stop - sl.start
            per_voxel = int(_MEMORY_MARGIN * op.elements_per_voxel(data.n, n_c) * data.itemsize)
            batch = _plan_batch(data, voxel_batch, per_voxel, op.operator_bytes(n_c), f"cross-validation fold {f}")
            op.prepare(sl)
            if cap is not None:
                batch = min(batch, cap)
            log.debug("fold %d: %s form, %s operator, alphas %d-%d, %d voxels per batch", f,
                      "kernel" if kernel else "primal", "folded" if op.folded else "factored",
                      sl.start, sl.stop - 1, batch)
            unselectable = op.unselectable[sl]

            def step(a, b, f=f, op=op, sl=sl, unselectable=unselectable):
                P, Yva = op.predict(data.responses(a, b), sl)
                sc = _validation_scores(P, Yva, score)
                del P
                if unselectable.any():
                    sc[torch.from_numpy(unselectable).to(sc.device)] = _UNSELECTABLE
                scores[f, sl, a:b] = sc.cpu().numpy()

            used = _backend.run_batched(step, data.n_valid, batch, what=f"CV fold {f} batch")
            if used < batch:
                cap = used
        del op
    return scores, K


def _select(fold_scores, alphas):
    """Mean over folds (float64), best alpha index per voxel (ties to the larger alpha)."""
    mean = fold_scores.mean(axis=0, dtype=np.float64)
    chosen = np.argmax(mean + (np.log(alphas) * _TIE_SLOPE)[:, None], axis=0)
    return mean, chosen


# --------------------------------------------------------------------------------------
# Refit with one alpha per voxel


def _refit(data: _Data, alpha_valid, *, X_test=None, Y_test=None, want_predictions=True,
           want_weights=False, form="auto", voxel_batch=None, K=None):
    """Refit valid voxels on all training rows; predictions, weights and test scores as asked.

    Returns a dict with ``kernel`` (bool) and, as asked, ``predictions`` (n_test, n_valid),
    ``weights`` (p, n_valid), ``test_r`` / ``test_r2`` (n_valid,) as numpy arrays.
    """
    torch = _backend._torch()
    n, p, dev = data.n, data.p, data.device
    kernel = _use_kernel(n, p, form)
    out = {"kernel": kernel}
    n_valid = data.n_valid
    np_dtype = data.np_dtype
    n_test = 0 if X_test is None else X_test.shape[0]
    if want_predictions and X_test is not None:
        out["predictions"] = np.zeros((n_test, n_valid), dtype=np_dtype)
    if want_weights:
        out["weights"] = np.zeros((p, n_valid), dtype=np_dtype)
    if Y_test is not None:
        out["test_r"] = np.zeros(n_valid, dtype=np.float64)
        out["test_r2"] = np.zeros(n_valid, dtype=np.float64)
    if n_valid == 0:
        return out
    X = data.X
    if kernel:
        if K is None:
            K = _gram(data)
        s, basis = torch.linalg.eigh(K)
        del K
        left_test = (X_test @ X.T) @ basis if X_test is not None else None  # (n_test, n)
        left_w = X.T @ basis if want_weights else None  # (p, n)
    else:
        s, basis = torch.linalg.eigh(X.T @ X)
        left_test = X_test @ basis if X_test is not None else None  # (n_test, p)
        left_w = basis if want_weights else None
    s = torch.clamp(s, min=0)
    alpha_t = torch.as_tensor(np.asarray(alpha_valid, dtype=np.float64), dtype=data.dtype, device=dev)
    r = s.shape[0]
    per_voxel = n + r + (0 if kernel else p) + 3 * n_test + (p if want_weights else 0)
    per_voxel = int(_MEMORY_MARGIN * per_voxel * data.itemsize)
    batch = _plan_batch(data, voxel_batch, per_voxel, basis.numel() * data.itemsize, "refit")

    def step(a, b):
        Yb = data.responses(a, b)
        R = basis.T @ (Yb if kernel else X.T @ Yb)  # (r, b)
        del Yb
        R.div_(s[:, None] + alpha_t[None, a:b])
        if left_test is not None:
            P = left_test @ R
            if "predictions" in out:
                out["predictions"][:, a:b] = P.cpu().numpy()
            if Y_test is not None:
                rr, r2 = _column_scores(Y_test(a, b), P)
                out["test_r"][a:b] = rr.cpu().numpy()
                out["test_r2"][a:b] = r2.cpu().numpy()
            del P
        if left_w is not None:
            out["weights"][:, a:b] = (left_w @ R).cpu().numpy()

    _backend.run_batched(step, n_valid, batch, what="refit batch")
    return out


def _scatter(values, valid, fill, dtype=None):
    """Full-length array over voxels: ``values`` at valid voxels, ``fill`` elsewhere (last axis)."""
    values = np.asarray(values)
    shape = values.shape[:-1] + (valid.shape[0],)
    out = np.full(shape, fill, dtype=dtype or values.dtype)
    out[..., valid] = values
    return out


def _test_tensor(X_test, data: _Data, name="X_test"):
    torch = _backend._torch()
    T, _ = _backend.host_tensor(X_test, name)
    if T.shape[1] != data.p:
        raise ValueError(f"{name} has {T.shape[1]} features but X_train has {data.p}")
    T = T.to(data.device, data.dtype)
    if not bool(torch.isfinite(T).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return T


# --------------------------------------------------------------------------------------
# Public API


def ridge_cv(X_train, Y_train, folds, alphas=DEFAULT_ALPHAS, *, device="cpu", dtype="float32", score="r2",
             voxel_batch=None, mem_gb=None, return_weights=False, allow_tf32=False, form="auto", train_rows=None):
    """Choose one ridge alpha per voxel by cross-validation on the training data.

    Parameters
    ----------
    X_train : array_like or torch.Tensor, shape (n_samples, n_features)
        Features, z-scored by the caller (no intercept is fitted).
    Y_train : array_like or torch.Tensor, shape (n_samples, n_voxels)
        Responses, z-scored by the caller.  Never copied whole: voxel batches are gathered
        and sent to the device one at a time (on a GPU they stay resident when they fit).
    folds : sequence of (train, val)
        Rows of each fold, as integer indices or boolean masks over the rows: e.g.
        leave-stories-out splits (:func:`bidsenc.models.cv.leave_stories_out`) or the
        reference's held-out chunks (:func:`bidsenc.models.cv.bootstrap_chunks`).
    alphas : array_like, shape (n_alphas,)
        Positive alphas in himalaya/scikit-learn units (see :func:`reference_to_alpha`).
    device : str
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    dtype : {"float32", "float64"}
        Arithmetic precision.
    score : {"r2", "r", "neg_mse", "reference"}
        Validation score averaged over folds to choose alpha. ``"reference"`` is the score of
        the reference code's ``bootstrap_ridge(use_corr=False)``: ``sign(R2) sqrt(|R2|)`` with
        ``R2 = 1 - var(y - p) / ((1 + var(y)) / 2)`` over the validation rows (variances
        with ddof 0; it assumes z-scored validation data); ``use_corr=True`` is ``"r"``.
    voxel_batch : int, optional
        Voxels per batch; default :data:`VOXEL_BATCH` (fixed, so results do not depend on memory).
    mem_gb : float, optional
        Memory limit in GiB: :class:`MemoryBudgetError` when one batch would need more
        (default: no check; batches have a fixed size, see the module docstring).
    return_weights : bool
        Refit on all training rows and return the weights.
    allow_tf32 : {False, True, "cv"}
        Allow TF32 tensor-core matmuls on CUDA: everywhere (True), or only in the
        cross-validation that chooses alpha, keeping the refit in float32 (``"cv"``).  See
        the module docstring for the accuracy cost; no effect on the CPU.
    form : {"auto", "kernel", "primal"}
        Force a form (default: kernel when a fit has fewer rows than features).
    train_rows : array_like, optional
        Fit on these rows of ``X_train`` and ``Y_train`` only (indices or a boolean mask;
        ``folds`` then index the selected rows). Unlike ``Y_train[train_rows]``, this never
        copies the responses: each voxel batch gathers its rows.

    Returns
    -------
    RidgeCVResult
    """
    alphas = _check_alphas(alphas)
    score = _check_score(score)
    tf32_cv, tf32_refit = _check_tf32(allow_tf32)
    data = _Data(X_train, Y_train, device, dtype, mem_gb, train_rows)
    folds = _check_folds(folds, data.n)
    with _backend.matmul_tf32(data.device, tf32_cv):
        fold_scores, K = _cv_scores(data, folds, alphas, score, form, voxel_batch)
    mean, chosen = _select(fold_scores, alphas)
    alpha_valid = alphas[chosen]
    weights = None
    if return_weights:
        with _backend.matmul_tf32(data.device, tf32_refit):
            weights = _refit(data, alpha_valid, want_predictions=False, want_weights=True, form=form,
                             voxel_batch=voxel_batch, K=None if tf32_cv != tf32_refit else K)["weights"]
    del K
    n_inv = data.n_voxels - data.n_valid
    if n_inv:
        log.info("ridge: %d of %d voxels not fitted (constant or non-finite responses)", n_inv, data.n_voxels)
    return RidgeCVResult(
        alphas=_scatter(alpha_valid, data.valid, alphas.max(), np.float64),
        cv_scores=_scatter(mean, data.valid, 0.0, data.np_dtype),
        best_cv_score=_scatter(mean[chosen, np.arange(data.n_valid)], data.valid, 0.0, data.np_dtype),
        alpha_grid=alphas,
        valid=data.valid,
        score=score,
        form="kernel" if _use_kernel(data.n, data.p, form) else "primal",
        fold_scores=_scatter(fold_scores, data.valid, 0.0),
        weights=None if weights is None else _scatter(weights, data.valid, 0.0),
    )


def ridge_weights(X_train, Y_train, alphas_per_voxel, *, device="cpu", dtype="float32", voxel_batch=None,
                  mem_gb=None, allow_tf32=False, form="auto"):
    """Ridge weights of every voxel at its own alpha, fitted on all rows.

    ``W[:, v] = (X'X + alpha_v I)^-1 X' Y[:, v]``, from one eigendecomposition shared by all
    voxels (kernel or primal form as in :func:`ridge_cv`).  No intercept: z-score first.

    Parameters
    ----------
    X_train : array_like or torch.Tensor, shape (n_samples, n_features)
    Y_train : array_like or torch.Tensor, shape (n_samples, n_voxels)
    alphas_per_voxel : array_like, shape (n_voxels,) or scalar
        Alpha of each voxel in himalaya/scikit-learn units; for the reference code's
        squared-penalty alphas, pass ``reference_to_alpha(a)``.
    device, dtype, voxel_batch, mem_gb, allow_tf32, form
        As in :func:`ridge_cv`.

    Returns
    -------
    ndarray of float32 (float64 in float64 mode), shape (n_features, n_voxels)
        0 for voxels with constant or non-finite training responses.

    Examples
    --------
    >>> import numpy as np
    >>> from bidsenc.models.ridge import ridge_weights
    >>> rng = np.random.default_rng(0)
    >>> X, Y = rng.standard_normal((50, 3)), rng.standard_normal((50, 2))
    >>> W = ridge_weights(X, Y, [1.0, 10.0], dtype="float64")
    >>> bool(np.allclose(W[:, 0], np.linalg.solve(X.T @ X + np.eye(3), X.T @ Y[:, 0])))
    True
    """
    data = _Data(X_train, Y_train, device, dtype, mem_gb)
    alpha = _voxel_alphas(alphas_per_voxel, data.n_voxels)
    with _backend.matmul_tf32(data.device, _check_tf32(allow_tf32)[1]):
        out = _refit(data, alpha[data.valid_idx], want_predictions=False, want_weights=True, form=form,
                     voxel_batch=voxel_batch)
    return _scatter(out["weights"], data.valid, 0.0)


def _voxel_alphas(alphas_per_voxel, n_voxels: int) -> np.ndarray:
    try:
        alpha = np.broadcast_to(np.asarray(alphas_per_voxel, dtype=np.float64), (n_voxels,))
    except ValueError:
        raise ValueError(f"alphas_per_voxel must be a scalar or hold one alpha per voxel ({n_voxels})") from None
    if not np.all(np.isfinite(alpha)) or np.any(alpha <= 0):
        raise ValueError("alphas_per_voxel must be finite and positive")
    return alpha


def ridge_predict(X_train, Y_train, X_test, alphas_per_voxel, *, device="cpu", dtype="float32",
                  voxel_batch=None, mem_gb=None, allow_tf32=False, form="auto", train_rows=None):
    """Refit ridge on all training rows with one alpha per voxel and predict ``X_test``.

    Parameters
    ----------
    X_train, Y_train : array_like or torch.Tensor
        As in :func:`ridge_cv`.
    X_test : array_like or torch.Tensor, shape (n_test, n_features)
        Test features.
    alphas_per_voxel : array_like, shape (n_voxels,) or scalar
        Alpha of each voxel (himalaya units), e.g. ``RidgeCVResult.alphas``.
    device, dtype, voxel_batch, mem_gb, allow_tf32, form, train_rows
        As in :func:`ridge_cv`.

    Returns
    -------
    ndarray, shape (n_test, n_voxels)
        Predictions (float32, or float64 in float64 mode); 0 for voxels with constant or
        non-finite training responses.
    """
    data = _Data(X_train, Y_train, device, dtype, mem_gb, train_rows)
    alpha = _voxel_alphas(alphas_per_voxel, data.n_voxels)
    T = _test_tensor(X_test, data)
    with _backend.matmul_tf32(data.device, _check_tf32(allow_tf32)[1]):
        out = _refit(data, alpha[data.valid_idx], X_test=T, form=form, voxel_batch=voxel_batch)
    return _scatter(out["predictions"], data.valid, 0.0)


def fit_and_score(X_train, Y_train, X_test, Y_test, folds, alphas=DEFAULT_ALPHAS, *, device="cpu",
                  dtype="float32", score="r2", voxel_batch=None, mem_gb=None, allow_tf32=False, form="auto",
                  return_predictions=False, return_weights=False, train_rows=None):
    """Choose alphas by cross-validation, refit on all training rows, and score the test rows.

    Parameters
    ----------
    X_train, Y_train, folds, alphas
        As in :func:`ridge_cv`.
    X_test : array_like or torch.Tensor, shape (n_test, n_features)
    Y_test : array_like or torch.Tensor, shape (n_test, n_voxels)
        Held-out features and responses (z-scored like the training data).
    device, dtype, score, voxel_batch, mem_gb, allow_tf32, form, train_rows
        As in :func:`ridge_cv`.
    return_predictions : bool
        Also return the test predictions (n_test, n_voxels).
    return_weights : bool
        Also return the refit weights (n_features, n_voxels).

    Returns
    -------
    dict
        ``test_r`` and ``test_r2`` (float64, per voxel; Pearson r and R^2 on the test rows),
        ``alphas`` (chosen), ``cv_score`` (mean validation score at the chosen alpha, for
        choosing layers), ``cv_scores`` (n_alphas, n_voxels), ``alpha_grid``, ``valid``,
        ``n_invalid``, ``form``, and ``predictions`` / ``weights`` when asked.  Voxels that
        were not fitted, or whose test responses are not finite, are ``valid=False`` with
        test scores 0.
    """
    alphas = _check_alphas(alphas)
    score = _check_score(score)
    tf32_cv, tf32_refit = _check_tf32(allow_tf32)
    data = _Data(X_train, Y_train, device, dtype, mem_gb, train_rows)
    folds = _check_folds(folds, data.n)
    T = _test_tensor(X_test, data)
    Yt, _ = _backend.host_tensor(Y_test, "Y_test")
    if Yt.shape != (T.shape[0], data.n_voxels):
        raise ValueError(f"Y_test must be ({T.shape[0]}, {data.n_voxels}), got {tuple(Yt.shape)}")
    test_finite = _finite_columns(Yt)
    cols = _backend._torch().from_numpy(data.valid_idx).to(Yt.device)

    def y_test(a, b):
        return Yt.index_select(1, cols[a:b]).to(data.device, data.dtype)

    with _backend.matmul_tf32(data.device, tf32_cv):
        fold_scores, K = _cv_scores(data, folds, alphas, score, form, voxel_batch)
    mean, chosen = _select(fold_scores, alphas)
    alpha_valid = alphas[chosen]
    with _backend.matmul_tf32(data.device, tf32_refit):
        out = _refit(data, alpha_valid, X_test=T, Y_test=y_test, want_predictions=return_predictions,
                     want_weights=return_weights, form=form, voxel_batch=voxel_batch,
                     K=None if tf32_cv != tf32_refit else K)
    del K
    valid = data.valid & test_finite
    keep = test_finite[data.valid_idx]  # valid training voxels whose test data are finite
    result = {
        "test_r": _scatter(np.where(keep, out["test_r"], 0.0), data.valid, 0.0, np.float64),
        "test_r2": _scatter(np.where(keep, out["test_r2"], 0.0), data.valid, 0.0, np.float64),
        "alphas": _scatter(alpha_valid, data.valid, alphas.max(), np.float64),
        "cv_score": _scatter(mean[chosen, np.arange(data.n_valid)], data.valid, 0.0, data.np_dtype),
        "cv_scores": _scatter(mean, data.valid, 0.0, data.np_dtype),
        "alpha_grid": alphas,
        "valid": valid,
        "n_invalid": int((~valid).sum()),
        "form": "kernel" if out["kernel"] else "primal",
    }
    if return_predictions:
        result["predictions"] = _scatter(out["predictions"], data.valid, 0.0)
    if return_weights:
        result["weights"] = _scatter(out["weights"], data.valid, 0.0)
    return result


def _finite_columns(Y) -> np.ndarray:
    torch = _backend._torch()
    n, v = Y.shape
    out = np.zeros(v, dtype=bool)
    step = max(1, _CHUNK_ELEMENTS // max(1, n))
    for a in range(0, v, step):
        b = min(v, a + step)
        out[a:b] = torch.isfinite(Y[:, a:b]).all(0).cpu().numpy()
    return out

"""Stacked regression across feature spaces (Lin, Naselaris, Kay & Wehbe 2024), batched over voxels.

Arrays in, arrays out; nothing here knows about BIDS or files.

Given out-of-fold predictions of ``J`` feature spaces on the training data and the
training responses, each voxel gets convex weights ``w`` (``w >= 0``, ``sum(w) = 1``)
minimising ``w' P w`` with ``P[i, j] = mean_t(e_i e_j)`` and ``e_j = y - pred_j``: the mean
squared error of the combined prediction ``sum_j w_j pred_j``.

Solver
------
The published code solves one QP per voxel with cvxopt in a Python loop.  Here all voxels
are solved at once:

* ``method="enumerate"`` (default for ``J <= 6``): exact.  The optimum of a convex QP on
  the simplex is the equality-constrained optimum on its support ``S``
  (``w_S = P_SS^-1 1 / (1' P_SS^-1 1)``), so every nonempty support is solved in closed
  form for all voxels at once (a batched ``|S| x |S|`` solve), infeasible candidates
  (a negative weight, a singular system) are dropped, and each voxel keeps the feasible
  candidate with the smallest ``w' P w`` evaluated with the exact ``P``.  Single spaces are
  always feasible, so a valid answer always exists.  Cost: ``2**J - 1`` batched solves,
  a few milliseconds per 100k voxels each for ``J = 3``.  On ties (e.g. two identical
  predictions), the candidate with the smaller support, then the earlier space, wins.
* ``method="fista"`` (default for ``J > 6``, where ``2**J`` grows too fast): accelerated
  projected gradient (FISTA with adaptive restart) with the exact sort-based Euclidean
  projection onto the simplex, step ``1/L`` with ``L`` the largest eigenvalue of each
  voxel's ``P``, stopped when no voxel's weights move by more than ``tol``.

Arithmetic is float64 for the solve whatever the input dtype.  numpy inputs give numpy
outputs (computed with torch on the CPU); torch inputs stay on their device.
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = ["residual_covariance", "solve_simplex_qp", "stack_weights", "stacked_prediction"]

_MAX_ENUMERATE = 6
# Bound on the float64 elements of one working chunk (2**23 elements = 64 MiB).
_CHUNK_ELEMENTS = 2**23
# Relative ridge added to P_SS in the closed-form solves only (the objective is evaluated
# with the exact P): it keeps singular supports (collinear predictions) solvable.
_RIDGE = 1e-12
# A candidate weight above -_FEASIBLE_TOL is treated as >= 0 (then clipped and renormalised).
_FEASIBLE_TOL = 1e-10


def _torch():
    import torch

    return torch


def _as_tensor(x, name: str):
    """Return ``(tensor, was_numpy)``; numpy input is wrapped without copying."""
    torch = _torch()
    if isinstance(x, torch.Tensor):
        return x, False
    array = np.asarray(x)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{name} must be real-valued, got dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array)), True


def _out(tensor, to_numpy: bool):
    return tensor.cpu().numpy() if to_numpy else tensor


def residual_covariance(oof_predictions, responses):
    """Per-voxel residual covariance ``P[v, i, j] = mean_t(e_i e_j)``, ``e_j = y - pred_j``.

    Parameters
    ----------
    oof_predictions : array_like or torch.Tensor, shape (J, T, V)
        Out-of-fold predictions of each feature space on the training data.
    responses : array_like or torch.Tensor, shape (T, V)
        Training responses.

    Returns
    -------
    P : ndarray or torch.Tensor of float64, shape (V, J, J)
        Symmetric positive semi-definite; a tensor on the input's device when given tensors.

    Notes
    -----
    Computed in float64, in voxel chunks, so the only large allocation is the output.
    """
    torch = _torch()
    preds, to_numpy = _as_tensor(oof_predictions, "oof_predictions")
    y, _ = _as_tensor(responses, "responses")
    y = y.to(preds.device)
    if preds.ndim != 3 or y.ndim != 2 or preds.shape[1:] != y.shape:
        raise ValueError(f"oof_predictions must be (J, T, V) and responses (T, V); got "
                         f"{tuple(preds.shape)} and {tuple(y.shape)}")
    n_spaces, n_times, n_vox = preds.shape
    out = torch.empty((n_vox, n_spaces, n_spaces), dtype=torch.float64, device=preds.device)
    step = max(1, _CHUNK_ELEMENTS // (2 * n_spaces * n_times))
    for start in range(0, n_vox, step):
        sl = slice(start, min(start + step, n_vox))
        e = y[None, :, sl].to(torch.float64) - preds[:, :, sl].to(torch.float64)  # (J, T, Vc)
        out[sl] = torch.einsum("itv,jtv->vij", e, e) / n_times
    return out.cpu().numpy() if to_numpy else out


def _project_simplex(v):
    """Exact Euclidean projection of each row of ``v`` (B x J) onto the probability simplex.

    Sort-based algorithm (Held et al. 1974; Duchi et al. 2008), vectorised over rows.
    """
    torch = _torch()
    u, _ = torch.sort(v, dim=1, descending=True)
    css = torch.cumsum(u, dim=1) - 1.0
    k = torch.arange(1, v.shape[1] + 1, dtype=v.dtype, device=v.device)
    support = (u - css / k) > 0
    rho = support.to(torch.int64).cumsum(dim=1).argmax(dim=1, keepdim=True)  # last True index
    theta = css.gather(1, rho) / (rho + 1).to(v.dtype)
    return torch.clamp(v - theta, min=0.0)


def _solve_enumerate(P):
    """Exact simplex QP for every voxel by enumerating supports (see module docstring)."""
    torch = _torch()
    n_vox, n_spaces, _ = P.shape
    best_w = torch.zeros((n_vox, n_spaces), dtype=P.dtype, device=P.device)
    best_obj = torch.full((n_vox,), float("inf"), dtype=P.dtype, device=P.device)
    diag = torch.diagonal(P, dim1=1, dim2=2)
    for size in range(1, n_spaces + 1):
        for subset in itertools.combinations(range(n_spaces), size):
            idx = torch.tensor(subset, device=P.device)
            if size == 1:
                w = torch.zeros_like(best_w)
                w[:, subset[0]] = 1.0
                obj = diag[:, subset[0]]
            else:
                sub = P[:, idx][:, :, idx]
                eye = torch.eye(size, dtype=P.dtype, device=P.device)
                scale = torch.diagonal(sub, dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(P.dtype).tiny)
                ones = torch.ones((n_vox, size, 1), dtype=P.dtype, device=P.device)
                x, info = torch.linalg.solve_ex(sub + (_RIDGE * scale)[:, None, None] * eye, ones)
                x = x[:, :, 0]
                total = x.sum(dim=1, keepdim=True)
                ws = x / torch.where(total > 0, total, torch.ones_like(total))
                feasible = ((info == 0) & (total[:, 0] > 0) & torch.isfinite(ws).all(dim=1)
                            & (ws >= -_FEASIBLE_TOL).all(dim=1))
                ws = torch.where(feasible[:, None], ws, torch.zeros_like(ws)).clamp_min(0.0)
                ws = ws / ws.sum(dim=1, keepdim=True).clamp_min(torch.finfo(P.dtype).tiny)
                w = torch.zeros_like(best_w)
                w[:, idx] = ws
                obj = torch.einsum("vi,vij,vj->v", w, P, w)
                obj = torch.where(feasible, obj, torch.full_like(obj, float("inf")))
            better = obj < best_obj
            best_obj = torch.where(better, obj, best_obj)
            best_w = torch.where(better[:, None], w, best_w)
    return best_w


def _solve_fista(P, tol: float, max_iter: int):
    """Accelerated projected gradient (FISTA, adaptive restart) on the simplex, all voxels at once."""
    torch = _torch()
    n_vox, n_spaces, _ = P.shape
    lipschitz = 2.0 * torch.linalg.eigvalsh(P)[:, -1]  # gradient of w'Pw is 2Pw
    step = 1.0 / lipschitz.clamp_min(torch.finfo(P.dtype).tiny)
    w = torch.full((n_vox, n_spaces), 1.0 / n_spaces, dtype=P.dtype, device=P.device)
    z = w.clone()
    t = torch.ones(n_vox, dtype=P.dtype, device=P.device)
    active = torch.ones(n_vox, dtype=torch.bool, device=P.device)
    for _ in range(max_iter):
        grad = 2.0 * torch.einsum("vij,vj->vi", P, z)
        w_new = _project_simplex(z - step[:, None] * grad)
        change = (w_new - w).abs().amax(dim=1)
        t_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
        # Adaptive restart (O'Donoghue & Candes 2015): drop momentum where it points uphill.
        restart = ((z - w_new) * (w_new - w)).sum(dim=1) > 0
        momentum = torch.where(restart, torch.zeros_like(t), (t - 1.0) / t_new)
        z = w_new + momentum[:, None] * (w_new - w)
        t = torch.where(restart, torch.ones_like(t), t_new)
        w = torch.where(active[:, None], w_new, w)
        active = active & (change > tol)
        if not bool(active.any()):
            break
    return w


def solve_simplex_qp(P, method: str = "auto", tol: float = 1e-12, max_iter: int = 20000,
                     *, return_degenerate: bool = False):
    """Minimise ``w' P[v] w`` subject to ``w >= 0``, ``sum(w) = 1``, for every voxel ``v`` at once.

    Parameters
    ----------
    P : array_like or torch.Tensor, shape (V, J, J)
        Symmetric positive semi-definite matrices (e.g. from :func:`residual_covariance`).
    method : {"auto", "enumerate", "fista"}, optional
        ``"enumerate"``: exact support enumeration; ``"fista"``: accelerated projected
        gradient; ``"auto"`` (default): enumerate when ``J <= 6``, else FISTA.
    tol : float, optional
        FISTA only: stop when no weight of any voxel changes by more than ``tol`` in one step.
    max_iter : int, optional
        FISTA only: iteration cap.
    return_degenerate : bool, optional
        Also return the boolean mask of degenerate voxels.

    Returns
    -------
    W : ndarray or torch.Tensor of float64, shape (J, V)
        Weights, ``>= 0`` and summing to 1 in every voxel.  Degenerate voxels get ``1/J``.
    degenerate : ndarray or torch.Tensor of bool, shape (V,)
        Only when ``return_degenerate``.  True where ``P`` is zero (every convex combination
        is equally good, e.g. a constant voxel predicted exactly) or non-finite.
    """
    torch = _torch()
    P, to_numpy = _as_tensor(P, "P")
    if P.ndim != 3 or P.shape[1] != P.shape[2] or P.shape[1] < 1:
        raise ValueError(f"P must be (V, J, J), got {tuple(P.shape)}")
    if method not in ("auto", "enumerate", "fista"):
        raise ValueError(f"method must be 'auto', 'enumerate' or 'fista', got {method!r}")
    P = P.to(torch.float64)
    n_vox, n_spaces, _ = P.shape
    if method == "auto":
        method = "enumerate" if n_spaces <= _MAX_ENUMERATE else "fista"
    P = 0.5 * (P + P.transpose(1, 2))
    trace = torch.diagonal(P, dim1=1, dim2=2).sum(dim=1)
    degenerate = ~torch.isfinite(P).all(dim=2).all(dim=1) | ~(trace > 0)
    # Scale each voxel's problem to unit mean diagonal: same minimiser, scale-free tolerances.
    scale = torch.where(degenerate, torch.ones_like(trace), trace / n_spaces)
    Pn = torch.where(degenerate[:, None, None], torch.eye(n_spaces, dtype=P.dtype, device=P.device),
                     P / scale[:, None, None])
    W = torch.empty((n_vox, n_spaces), dtype=P.dtype, device=P.device)
    step = max(1, _CHUNK_ELEMENTS // (4 * n_spaces * n_spaces))
    for start in range(0, n_vox, step):
        sl = slice(start, min(start + step, n_vox))
        if method == "enumerate":
            W[sl] = _solve_enumerate(Pn[sl])
        else:
            W[sl] = _solve_fista(Pn[sl], tol, max_iter)
    W[degenerate] = 1.0 / n_spaces
    W = W.T.contiguous()
    if return_degenerate:
        return _out(W, to_numpy), _out(degenerate, to_numpy)
    return _out(W, to_numpy)


def stack_weights(oof_predictions, responses, method: str = "auto", *, return_degenerate: bool = False):
    """Stacking weights per voxel from out-of-fold predictions of several feature spaces.

    Parameters
    ----------
    oof_predictions : array_like or torch.Tensor, shape (J, T, V)
        Out-of-fold (held-out fold) predictions of each of ``J`` feature spaces on the
        training data.
    responses : array_like or torch.Tensor, shape (T, V)
        Training responses.
    method : {"auto", "enumerate", "fista"}, optional
        Solver; see :func:`solve_simplex_qp` (default: exact enumeration for ``J <= 6``).
    return_degenerate : bool, optional
        Also return the boolean mask of degenerate voxels (zero residual covariance: weights
        are then ``1/J``).

    Returns
    -------
    W : ndarray or torch.Tensor of float64, shape (J, V)
        Convex weights (``>= 0``, summing to 1 per voxel) minimising the mean squared error
        of ``sum_j W[j] * oof_predictions[j]``.  Tensors stay on the input's device.
    degenerate : ndarray or torch.Tensor of bool, shape (V,)
        Only when ``return_degenerate``.

    References
    ----------
    Lin R, Naselaris T, Kay K, Wehbe L (2024). Stacked regressions and structured variance
    partitioning for interpretable brain maps. NeuroImage 298:120772.
    """
    P = residual_covariance(oof_predictions, responses)
    return solve_simplex_qp(P, method=method, return_degenerate=return_degenerate)


def stacked_prediction(W, test_predictions):
    """Combine feature-space predictions with per-voxel stacking weights.

    Parameters
    ----------
    W : array_like or torch.Tensor, shape (J, V)
        Weights from :func:`stack_weights`.
    test_predictions : array_like or torch.Tensor, shape (J, T, V)
        Predictions of each feature space (e.g. on the test story).

    Returns
    -------
    prediction : ndarray or torch.Tensor, shape (T, V)
        ``sum_j W[j] * test_predictions[j]``, in the dtype of ``test_predictions`` (and on
        its device for tensors).
    """
    torch = _torch()
    preds, to_numpy = _as_tensor(test_predictions, "test_predictions")
    W, _ = _as_tensor(W, "W")
    if preds.ndim != 3 or W.ndim != 2 or W.shape != (preds.shape[0], preds.shape[2]):
        raise ValueError(f"W must be (J, V) and test_predictions (J, T, V); got {tuple(W.shape)} "
                         f"and {tuple(preds.shape)}")
    dtype = preds.dtype if preds.is_floating_point() else torch.float64
    out = torch.einsum("jv,jtv->tv", W.to(device=preds.device, dtype=dtype), preds.to(dtype))
    return _out(out, to_numpy)

"""Noise ceilings: how well any model could predict a voxel, from repeated or shared responses.

Arrays in, arrays out; nothing here knows about BIDS or files.

Conventions shared by every function in this module
----------------------------------------------------
* Shapes: ``repeats`` is ``(R, T, V)`` (repeats x time points x voxels) and
  ``responses`` is ``(P, T, V)`` (participants x time x voxels).  The caller is
  responsible for z-scoring each repeat per run beforehand (bidsenc.align.design does).
* Arithmetic is float64 whatever the input dtype (float32 is accepted and converted
  chunk by chunk, so memory stays bounded for 100k-voxel inputs).
* Variances use ``ddof=0`` throughout.  The choice does not change any result here:
  every estimate is a ratio of two variances with the same number of time points, so the
  ``T/(T-1)`` factor cancels.  The one exception is ``cc_max(..., convention="reference")``,
  which reproduces the reference code's mix of conventions on purpose.
* Outputs meant for maps never contain NaN.  A voxel where the quantity is undefined
  (constant data, a non-finite value anywhere in the voxel, or -- for ``cc_max`` -- a
  non-positive signal-power estimate) gets a documented value (0, or the floor) and is
  flagged in a boolean ``degenerate`` mask, returned when ``return_degenerate=True``.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

__all__ = ["CC_MAX_CONVENTIONS", "cc_max", "cc_norm", "explainable_variance", "intersubject_ceiling"]

# Bound on the float64 elements of one working chunk (2**23 elements = 64 MiB).
_CHUNK_ELEMENTS = 2**23
# A variance at or below this fraction of the mean square is numerically zero (a constant
# voxel whose mean differs from its value by an ulp has a variance ~1e-32 of its square).
_CONSTANT_RTOL = 1e-24


def _voxel_chunks(n_voxels: int, elements_per_voxel: int) -> Iterator[slice]:
    """Yield voxel slices whose working arrays stay under ``_CHUNK_ELEMENTS`` float64 values."""
    step = max(1, _CHUNK_ELEMENTS // max(1, elements_per_voxel))
    for start in range(0, n_voxels, step):
        yield slice(start, min(start + step, n_voxels))


def _check_stack(array, name: str, first_axis: str, minimum: int):
    """Validate a ``(K, T, V)`` array (numpy or array-like) and return it without copying."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"{name} must be a ({first_axis}, T, V) array, got shape {array.shape}")
    if array.shape[0] < minimum:
        raise ValueError(f"{name} needs at least {minimum} {first_axis.lower()}s, got {array.shape[0]}")
    if array.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 time points, got {array.shape[1]}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{name} must be real-valued, got dtype {array.dtype}")
    return array


def _is_constant(variance: np.ndarray, mean_square: np.ndarray) -> np.ndarray:
    """True where a variance is zero up to rounding, relative to the data's mean square."""
    return variance <= _CONSTANT_RTOL * mean_square


def _finish(values: np.ndarray, degenerate: np.ndarray, return_degenerate: bool):
    return (values, degenerate) if return_degenerate else values


#: Conventions of :func:`cc_max`.
CC_MAX_CONVENTIONS = ("consistent", "reference")


def cc_max(repeats, floor: float | None = None, *, convention: str = "consistent", return_degenerate: bool = False):
    """Noise ceiling CC_max of Schoppe et al. (2016) from repeated presentations.

    With ``y`` the mean over the ``N`` repeats, ``TP`` the mean over repeats of each
    repeat's variance over time, and ``SP = (N var(y) - TP) / (N - 1)`` the estimated
    signal power::

        CC_max = 1 / sqrt(1 + (TP / SP - 1) / N)

    This is the largest Pearson correlation any model can reach with the mean response
    ``y``; for signal plus independent noise it estimates
    ``sqrt(var_s / (var_s + var_n / N))``.

    Parameters
    ----------
    repeats : array_like, shape (R, T, V)
        Responses to the same stimulus, ``R >= 2`` repeats, each z-scored per run by the
        caller.  float32 or float64; computed in float64.
    floor : float or None, optional
        Lower bound applied to every voxel (``max(CC_max, floor)``), including undefined
        ones.  Default ``None``: no floor, undefined voxels get 0.  The reference's callers
        pass ``max_flooring=0.25``, but the line of its function that would apply it is
        commented out, so the reference applies no floor: ``floor=None`` reproduces it.
    convention : {"consistent", "reference"}, optional
        ``"consistent"`` (default): ``TP`` and ``var(y)`` both with ``ddof=0`` (any common
        ``ddof`` gives the same value).  ``"reference"``: the reference code's
        ``data_norm=True`` branch, which takes ``TP = 1`` (each repeat assumed z-scored)
        while ``var(y)`` uses ``ddof=1``; its values are slightly higher, by a factor that
        vanishes as ``T`` grows.
    return_degenerate : bool, optional
        Also return the boolean mask of undefined voxels.

    Returns
    -------
    ccmax : ndarray of float64, shape (V,)
        CC_max in ``[0, 1]`` (or ``[floor, 1]``).  Never NaN.
    degenerate : ndarray of bool, shape (V,)
        Only when ``return_degenerate``.  True where the ceiling is undefined: ``SP <= 0``
        (no measurable repeatable signal, which includes constant voxels) or non-finite
        data; those voxels hold 0, or ``floor`` when given.

    Notes
    -----
    With the consistent convention the result does not depend on ``ddof``, because only the
    ratio ``TP/SP`` enters.  On pure noise the estimate is biased upwards: ``SP`` fluctuates
    around 0 with a spread that shrinks like ``1/sqrt(T)``, about half the voxels get a
    positive ``SP`` and ``CC_max ~ sqrt(N SP / TP)`` there, so noise voxels scatter between
    0 and a few tenths for typical ``T`` (a ``T**-0.25`` decay), which is what a 0.25
    floor would hide.

    References
    ----------
    Schoppe O, Harper NS, Willmore BDB, King AJ, Schnupp JWH (2016). Measuring the
    performance of neural models. Front Comput Neurosci 10:10.
    """
    repeats = _check_stack(repeats, "repeats", "Repeat", 2)
    if floor is not None and not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must lie in [0, 1], got {floor}")
    if convention not in CC_MAX_CONVENTIONS:
        raise ValueError(f"convention must be one of {CC_MAX_CONVENTIONS}, got {convention!r}")
    n, t, v = repeats.shape
    values = np.zeros(v)
    degenerate = np.zeros(v, dtype=bool)
    for sl, tp, var_y, defined in _variance_components(repeats):
        if convention == "reference":
            tp = np.ones_like(tp)
            var_y = var_y * (t / (t - 1))
        sp = (n * var_y - tp) / (n - 1)
        defined = defined & (sp > 0)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            cc = 1.0 / np.sqrt(1.0 + (tp / sp - 1.0) / n)
        values[sl] = np.where(defined, np.clip(np.nan_to_num(cc, nan=0.0), 0.0, 1.0), 0.0)
        degenerate[sl] = ~defined
    if floor is not None:
        values = np.maximum(values, floor)
    return _finish(values, degenerate, return_degenerate)


def _variance_components(repeats):
    """Per voxel chunk: the slice, the mean of the repeats' variances, the variance of their mean,
    and which voxels are finite and not constant (float64, ``ddof=0``)."""
    n, t, v = repeats.shape
    for sl in _voxel_chunks(v, 2 * n * t):
        x = np.asarray(repeats[:, :, sl], dtype=np.float64)
        finite = np.isfinite(x).all(axis=(0, 1))
        x = np.where(finite, x, 0.0)
        mean_var = x.var(axis=1).mean(axis=0)
        var_mean = x.mean(axis=0).var(axis=0)
        yield sl, mean_var, var_mean, finite & ~_is_constant(mean_var, (x * x).mean(axis=(0, 1)))


def cc_norm(cc_abs, ccmax, *, return_degenerate: bool = False):
    """Normalised correlation ``CC_norm = CC_abs / CC_max``.

    Parameters
    ----------
    cc_abs : array_like, shape (V,)
        Pearson correlation of the prediction with the mean over repeats.
    ccmax : array_like, shape (V,)
        Noise ceiling from :func:`cc_max` (the values, not the mask).
    return_degenerate : bool, optional
        Also return the boolean mask of voxels where the ratio is undefined.

    Returns
    -------
    ccnorm : ndarray of float64, shape (V,)
        The ratio; 0 where ``ccmax <= 0`` or either input is non-finite.  Not clipped:
        values above 1 mean the ceiling was underestimated for that voxel.
    degenerate : ndarray of bool, shape (V,)
        Only when ``return_degenerate``.  True where the ratio was set to 0 as undefined.
    """
    cc_abs = np.asarray(cc_abs, dtype=np.float64)
    ccmax = np.asarray(ccmax, dtype=np.float64)
    if cc_abs.shape != ccmax.shape:
        raise ValueError(f"cc_abs {cc_abs.shape} and ccmax {ccmax.shape} must have the same shape")
    defined = np.isfinite(cc_abs) & np.isfinite(ccmax) & (ccmax > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where(defined, cc_abs / np.where(defined, ccmax, 1.0), 0.0)
    return _finish(values, ~defined, return_degenerate)


def explainable_variance(repeats, bias_correction: bool = True, *, return_degenerate: bool = False):
    """Explainable variance from repeats (voxelwise-modeling tutorials convention).

    ``ev = var(mean over repeats) / mean over repeats of var(repeat)``; with bias
    correction ``ev - (1 - ev) / (N - 1)``, which for signal plus independent noise
    estimates ``var_s / (var_s + var_n)`` without bias.

    Parameters
    ----------
    repeats : array_like, shape (R, T, V)
        Responses to the same stimulus, ``R >= 2`` repeats, z-scored per run by the caller.
    bias_correction : bool, optional
        Apply the ``(1 - ev) / (N - 1)`` correction (default True).
    return_degenerate : bool, optional
        Also return the boolean mask of undefined voxels.

    Returns
    -------
    ev : ndarray of float64, shape (V,)
        Explainable variance.  Uncorrected values lie in ``[0, 1]``; corrected values can be
        negative on noise voxels (not clipped, so averages stay unbiased).  0 where undefined.
    degenerate : ndarray of bool, shape (V,)
        Only when ``return_degenerate``.  True for constant voxels (all repeats have zero
        variance) and voxels with non-finite data; those hold 0.

    Notes
    -----
    ``ddof=0``; the ratio is the same with ``ddof=1``.
    """
    repeats = _check_stack(repeats, "repeats", "Repeat", 2)
    n, _, v = repeats.shape
    values = np.zeros(v)
    degenerate = np.zeros(v, dtype=bool)
    for sl, mean_var, var_mean, defined in _variance_components(repeats):
        with np.errstate(divide="ignore", invalid="ignore"):
            ev = var_mean / np.where(defined, mean_var, 1.0)
        if bias_correction:
            ev = ev - (1.0 - ev) / (n - 1)
        values[sl] = np.where(defined, ev, 0.0)
        degenerate[sl] = ~defined
    return _finish(values, degenerate, return_degenerate)


def intersubject_ceiling(responses, *, return_degenerate: bool = False):
    """Inter-subject ceiling: leave-one-participant-out correlation with the others' mean.

    This is an *inter-subject* ceiling, not a repeat-based one: it measures the part of
    each participant's response shared with other people hearing the same story (in a
    common space), so idiosyncratic but repeatable signal counts as noise here.  Use
    :func:`cc_max` when repeats of one participant are available.

    For each participant ``p``, the Pearson correlation over time between ``responses[p]``
    and the mean of the other participants; the result is the mean of these correlations
    over participants.

    Parameters
    ----------
    responses : array_like, shape (P, T, V)
        Responses of ``P >= 2`` participants to the same stimulus, in one space.
    return_degenerate : bool, optional
        Also return the boolean mask of undefined voxels.

    Returns
    -------
    ceiling : ndarray of float64, shape (V,)
        Mean leave-one-out correlation in ``[-1, 1]``.  A participant whose data, or whose
        leave-one-out mean, is constant or non-finite in a voxel is left out of that voxel's
        average; a voxel with no defined correlation at all holds 0.
    degenerate : ndarray of bool, shape (V,)
        Only when ``return_degenerate``.  True where no participant had a defined correlation.

    Notes
    -----
    Correlations use ``ddof=0`` moments (the Pearson r does not depend on ``ddof``).
    """
    responses = _check_stack(responses, "responses", "Participant", 2)
    p, t, v = responses.shape
    values = np.zeros(v)
    degenerate = np.zeros(v, dtype=bool)
    for sl in _voxel_chunks(v, 3 * p * t):
        x = np.asarray(responses[:, :, sl], dtype=np.float64)
        finite = np.isfinite(x).all(axis=1)  # (P, Vc): participant usable in this voxel
        x = np.where(finite[:, None, :], x, 0.0)
        raw_ms = (x * x).mean(axis=1)  # (P, Vc): scale for the zero-variance test
        x = x - x.mean(axis=1, keepdims=True)
        total = x.sum(axis=0)
        total_sum = np.zeros_like(values[sl])
        count = np.zeros(total_sum.shape, dtype=np.int64)
        for i in range(p):
            others = (finite & (np.arange(p) != i)[:, None]).sum(axis=0)
            # Mean of the usable other participants (non-finite ones were zeroed above).
            other_total = total - x[i]
            with np.errstate(divide="ignore", invalid="ignore"):
                other_mean = other_total / np.where(others > 0, others, 1)
            ms_self = (x[i] ** 2).mean(axis=0)
            ms_other = (other_mean**2).mean(axis=0)
            with np.errstate(divide="ignore", invalid="ignore"):
                raw_ms_other = (raw_ms.sum(axis=0) - raw_ms[i]) / np.where(others > 0, others, 1)
            ok = (finite[i] & (others > 0) & (ms_self > 0) & (ms_other > 0)
                  & ~_is_constant(ms_self, raw_ms[i]) & ~_is_constant(ms_other, raw_ms_other))
            denominator = np.sqrt(np.where(ok, ms_self * ms_other, 1.0))
            r = np.clip((x[i] * other_mean).mean(axis=0) / denominator, -1.0, 1.0)
            total_sum += np.where(ok, r, 0.0)
            count += ok
        defined = count > 0
        values[sl] = np.where(defined, total_sum / np.maximum(count, 1), 0.0)
        degenerate[sl] = ~defined
    return _finish(values, degenerate, return_degenerate)


def intersubject_reliability(isc, n_others):
    """Ceiling from the correlation of one participant with the mean of ``n_others`` others.

    With a shared (stimulus-driven) signal of power ``s`` and independent noise of power
    ``n`` in every participant, that correlation is ``rho**2 / sqrt(rho**2 + (1 - rho**2) / k)``
    with ``rho**2 = s / (s + n)`` and ``k = n_others``: the others' mean is itself noisy.
    Solved for ``rho``, the correlation a perfect model of the shared signal would reach
    with this participant's response. With many others it tends to the correlation
    itself; with one other it is its square root (a split-half reliability).

    Parameters
    ----------
    isc : array_like
        Correlation of the participant's response with the others' mean, per voxel.
    n_others : float
        How many participants the mean is over (may be fractional: an average count).

    Returns
    -------
    ndarray of float64
        ``rho`` in [0, 1]; 0 where the correlation is not positive.
    """
    r = np.clip(np.nan_to_num(np.asarray(isc, dtype=np.float64)), 0.0, 1.0)
    k = float(n_others)
    if k <= 0:
        raise ValueError(f"n_others must be positive, got {n_others}")
    a = r ** 2 * (1.0 - 1.0 / k)
    rho2 = (a + np.sqrt(a ** 2 + 4.0 * r ** 2 / k)) / 2.0
    return np.sqrt(np.clip(rho2, 0.0, 1.0))


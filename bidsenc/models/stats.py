"""Significance of prediction accuracy that respects the autocorrelation of fMRI time series.

Arrays in, arrays out; nothing here knows about BIDS or files.

fMRI responses and the predictions of encoding models are both autocorrelated, so the
parametric null of a Pearson correlation (independent samples) is far too narrow and
flags noise voxels as significant.  :func:`permutation_pvalues` builds the null by
re-ordering the prediction in time while keeping its short-range autocorrelation, and
:func:`fdr_bh` controls the false discovery rate across voxels.
"""

from __future__ import annotations

import numpy as np

__all__ = ["circular_shift_sd", "fdr_bh", "permutation_pvalues", "pooled_null_pvalues", "sign_flip_test"]

# Bound on the float64 elements of one working array (2**23 elements = 64 MiB).
_CHUNK_ELEMENTS = 2**23
# A variance at or below this fraction of the mean square is numerically zero.
_CONSTANT_RTOL = 1e-24
# Null correlations within this of the observed one count as ties (>=): summation order
# differs between the observed and the permuted statistic, and the identity permutation
# must count as reaching the observed value.
_TIE_ATOL = 1e-12
_METHODS = ("block", "circular")


def _zscore_columns(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score the columns of ``x`` (ddof=0); constant or non-finite columns become 0 and are flagged."""
    finite = np.isfinite(x).all(axis=0)
    x = np.where(finite, x, 0.0)
    mean_square = (x * x).mean(axis=0)
    x = x - x.mean(axis=0)
    var = (x * x).mean(axis=0)
    ok = finite & (var > _CONSTANT_RTOL * mean_square) & (var > 0)
    x = x / np.sqrt(np.where(ok, var, 1.0))
    x[:, ~ok] = 0.0
    return x, ~ok


def _block_permutation(n_times: int, block_length: int, rng: np.random.Generator) -> np.ndarray:
    """One permutation of ``range(n_times)`` that shuffles contiguous blocks of ``block_length``.

    The block grid starts at a random phase (the first and last blocks may be shorter), so
    that block boundaries are not always at the same time points.
    """
    phase = int(rng.integers(block_length))
    edges = np.arange(phase, n_times, block_length)
    if edges.size == 0 or edges[0] != 0:
        edges = np.concatenate([[0], edges])
    blocks = np.split(np.arange(n_times), edges[1:])
    order = rng.permutation(len(blocks))
    return np.concatenate([blocks[i] for i in order])


def _count_block(zp, zr, r_obs, n_permutations, block_length, rng) -> np.ndarray:
    """Number of block permutations with ``r_perm >= r_obs`` for each voxel."""
    n_times, n_vox = zp.shape
    counts = np.zeros(n_vox, dtype=np.int64)
    batch = max(1, _CHUNK_ELEMENTS // (n_times * n_vox))
    done = 0
    while done < n_permutations:
        b = min(batch, n_permutations - done)
        index = np.stack([_block_permutation(n_times, block_length, rng) for _ in range(b)])
        # (b, T, V) gathered predictions, times the response, summed over time.
        r_perm = np.einsum("btv,tv->bv", zp[index], zr) / n_times
        counts += (r_perm >= r_obs - _TIE_ATOL).sum(axis=0)
        done += b
    return counts


def _circular_offsets(n_times, n_permutations, block_length, rng) -> np.ndarray:
    """Circular shifts ``k`` with ``block_length <= k <= n_times - block_length``.

    Every allowed shift once when there are at most ``n_permutations`` of them (an exact
    test: drawing a few distinct shifts with replacement would give p-values as small as
    ``1 / (1 + n_permutations)`` far more often than that); else a random draw of them without replacement.
    """
    if n_times < 2 * block_length:
        raise ValueError(f"method='circular' needs at least 2*block_length={2 * block_length} time points, "
                         f"got {n_times}")
    allowed = np.arange(block_length, n_times - block_length + 1)
    if len(allowed) <= n_permutations:
        return allowed
    return rng.choice(allowed, size=n_permutations, replace=False)


def _count_circular(zp, zr, r_obs, offsets) -> np.ndarray:
    """Number of circular shifts with ``r_perm >= r_obs``; all lags at once by FFT."""
    n_times = zp.shape[0]
    lags, multiplicity = np.unique(offsets, return_counts=True)
    # c[k, v] = sum_t zp[t - k, v] zr[t, v] / T  (np.roll(zp, k, axis=0) against zr)
    spectrum = np.conj(np.fft.rfft(zp, axis=0)) * np.fft.rfft(zr, axis=0)
    c = np.fft.irfft(spectrum, n=n_times, axis=0)[lags] / n_times
    return ((c >= r_obs - _TIE_ATOL) * multiplicity[:, None]).sum(axis=0)


def permutation_pvalues(prediction, response, n_permutations: int = 1000, block_length: int = 10,
                        method: str = "block", rng=None, *, return_degenerate: bool = False):
    """One-sided permutation p-values of the Pearson correlation between prediction and response.

    For each voxel, the observed ``r`` between ``prediction[:, v]`` and ``response[:, v]``
    is compared with ``n_permutations`` null correlations obtained by re-ordering the
    prediction in time; the same re-ordering is used for every voxel in one draw, so the
    computation is vectorised over voxels.  ``p = (1 + #{r_null >= r_obs}) /
    (1 + n_permutations)``: the smallest attainable value is ``1 / (1 + n_permutations)``
    and p is never 0.  The test is one-sided (``r > 0``).

    Parameters
    ----------
    prediction, response : array_like, shape (T, V)
        Predicted and measured time series (float32 or float64; computed in float64).
    n_permutations : int, optional
        Number of null draws (default 1000).
    block_length : int, optional
        In TRs (default 10).  ``"block"``: length of the contiguous blocks that are shuffled;
        ``"circular"``: the smallest allowed shift away from 0 (shifts ``k`` satisfy
        ``block_length <= k <= T - block_length``).  Choose it longer than the
        autocorrelation of the data (10 TRs = 20 s at TR 2 s covers the haemodynamic response).
    method : {"block", "circular"}, optional
        ``"block"`` (default): block permutation -- cut the prediction into contiguous
        blocks of ``block_length`` TRs (on a grid with random phase) and shuffle their order.
        Autocorrelation within each block is kept, so the null keeps most of the smoothness
        of the real prediction, and the number of distinct draws is huge (``n_blocks!``).
        It is the default because it has many distinct draws for any ``T`` and makes no
        assumption of stationarity across the run.  It slightly under-represents
        autocorrelation at lags approaching ``block_length`` (the null is a little too narrow
        when the autocorrelation is long compared with the blocks).
        ``"circular"``: shift the prediction circularly by a random offset.  Keeps the whole
        autocorrelation function (exact for stationary series) but has only
        ``T - 2*block_length + 1`` distinct draws (when they are no more than
        ``n_permutations``, each is used once and p is at least ``1 / (T - 2*block_length + 2)``),
        and the wrap-around joins the end of the run to its start (a step where there is drift).
    rng : None, int or numpy.random.Generator, optional
        Seed or generator for the draws (``numpy.random.default_rng(rng)``).
    return_degenerate : bool, optional
        Also return the boolean mask of voxels where the correlation is undefined.

    Returns
    -------
    pvalues : ndarray of float64, shape (V,)
        Never NaN.  1.0 where the correlation is undefined.
    degenerate : ndarray of bool, shape (V,)
        Only when ``return_degenerate``.  True where the prediction or the response is
        constant or contains non-finite values in that voxel.

    Notes
    -----
    Memory is bounded: voxels and permutations are processed in chunks of at most
    ``2**23`` float64 values per working array.  The block method costs
    ``O(n_permutations * T * V)``; the circular method computes all lags at once with an FFT
    (``O(T log T * V)``).
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    prediction = np.asarray(prediction)
    response = np.asarray(response)
    if prediction.ndim != 2 or prediction.shape != response.shape:
        raise ValueError(f"prediction {prediction.shape} and response {response.shape} must both be (T, V)")
    n_times, n_vox = prediction.shape
    if int(n_permutations) < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    if int(block_length) < 1 or int(block_length) > n_times:
        raise ValueError(f"block_length must lie in [1, T={n_times}], got {block_length}")
    n_permutations, block_length = int(n_permutations), int(block_length)
    rng = np.random.default_rng(rng)

    offsets = _circular_offsets(n_times, n_permutations, block_length, rng) if method == "circular" else None
    counts = np.zeros(n_vox, dtype=np.int64)
    degenerate = np.zeros(n_vox, dtype=bool)
    # Working arrays per voxel: a few (T,) columns, and the rfft / lag table for circular.
    step = max(1, _CHUNK_ELEMENTS // (6 * n_times))
    for start in range(0, n_vox, step):
        sl = slice(start, min(start + step, n_vox))
        zp, bad_p = _zscore_columns(np.asarray(prediction[:, sl], dtype=np.float64))
        zr, bad_r = _zscore_columns(np.asarray(response[:, sl], dtype=np.float64))
        r_obs = (zp * zr).mean(axis=0)
        if method == "block":
            # Every chunk draws its own permutations from the shared generator; voxels are
            # exchangeable, so this does not bias anything and keeps memory bounded.
            counts[sl] = _count_block(zp, zr, r_obs, n_permutations, block_length, rng)
        else:
            counts[sl] = _count_circular(zp, zr, r_obs, offsets)
        degenerate[sl] = bad_p | bad_r
    n_draws = n_permutations if offsets is None else len(offsets)
    pvalues = (1.0 + counts) / (1.0 + n_draws)
    pvalues[degenerate] = 1.0
    return (pvalues, degenerate) if return_degenerate else pvalues


def _bh_qvalues(pvalues: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values of a flat array (numpy only)."""
    m = pvalues.size
    order = np.argsort(pvalues, kind="stable")
    scaled = pvalues[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
    qvalues = np.empty(m)
    qvalues[order] = np.minimum(adjusted, 1.0)
    return qvalues


def fdr_bh(pvalues, q: float = 0.05, return_qvalues: bool = False):
    """Benjamini-Hochberg false discovery rate control.

    Parameters
    ----------
    pvalues : array_like
        P-values of any shape, in ``[0, 1]``; NaN is not accepted (mask such voxels out, or
        give them p = 1, before calling).
    q : float, optional
        Target false discovery rate (default 0.05).
    return_qvalues : bool, optional
        Also return the BH-adjusted p-values ("q-values").

    Returns
    -------
    discoveries : ndarray of bool, same shape as ``pvalues``
        True where the null is rejected: ``p <= q * k / m`` for the largest such rank ``k``
        (step-up), equivalently ``qvalue <= q``.
    qvalues : ndarray of float64, same shape as ``pvalues``
        Only when ``return_qvalues``.  Equal to
        ``scipy.stats.false_discovery_control(pvalues, method="bh")``; scipy computes them
        when it is installed, a numpy implementation of the same formula otherwise.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must lie in (0, 1), got {q}")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("pvalues must be finite and lie in [0, 1]")
    flat = p.ravel()
    if flat.size == 0:
        empty = np.zeros(p.shape, dtype=bool)
        return (empty, np.zeros(p.shape)) if return_qvalues else empty
    try:
        from scipy.stats import false_discovery_control
    except ImportError:  # scipy < 1.11 or absent
        qvalues = _bh_qvalues(flat)
    else:
        qvalues = np.asarray(false_discovery_control(flat, method="bh"), dtype=np.float64)
    # Step-up rule on the sorted p-values (independent of how the q-values were computed).
    m = flat.size
    sorted_p = np.sort(flat)
    below = np.nonzero(sorted_p <= q * np.arange(1, m + 1) / m)[0]
    threshold = sorted_p[below[-1]] if below.size else -1.0
    discoveries = (flat <= threshold).reshape(p.shape)
    return (discoveries, qvalues.reshape(p.shape)) if return_qvalues else discoveries


def sign_flip_test(values, n_permutations: int = 1000, seed: int = 0, chunk: int | None = None):
    """One-sample test across participants that each column's mean is above 0, by sign flips.

    Under the null, each participant's value (an r, say) is as likely positive as
    negative, so flipping signs at random gives the null distribution of the
    statistic: the one-sample t (studentized, so that columns of different spread are
    compared fairly). Every one of the ``2**n`` sign patterns is used once when there are
    no more than ``n_permutations + 1`` of them (the exact test; with n participants the
    smallest p-value is then ``2**-n``), else ``n_permutations`` random patterns plus
    the observed one: ``2**n`` patterns are used if and only if the test is exact.

    Parameters
    ----------
    values : array_like, shape (n_participants, n_columns)
        One value per participant and column (voxel, vertex), finite.
    n_permutations : int
        Most sign patterns drawn.
    seed : int
        Seed of the random patterns.
    chunk : int, optional
        Columns tested at once; by default as many as keep each of the few
        ``patterns x chunk`` work arrays near 32 MB.

    Returns
    -------
    t : ndarray, shape (n_columns,)
        The observed one-sample t (+-inf where all values are equal and not 0).
    pvalues : ndarray, shape (n_columns,)
        One-sided: the share of sign patterns, the observed one included, whose t is at
        least the observed t.
    n_patterns : int
        Sign patterns used (the observed one included).
    """
    x = np.asarray(values, dtype=np.float64)
    n = x.shape[0]
    if n < 2:
        raise ValueError("a sign-flip test needs two participants or more")
    if 2 ** n <= n_permutations + 1:
        bits = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1
        signs = 1.0 - 2.0 * bits  # row 0: every sign +1, the observed data
    else:
        rng = np.random.default_rng(seed)
        signs = np.vstack([np.ones(n), rng.choice([-1.0, 1.0], size=(n_permutations, n))])
    chunk = chunk or max(1, 2 ** 22 // len(signs))
    t = np.zeros(x.shape[1])
    counts = np.zeros(x.shape[1])
    for start in range(0, x.shape[1], chunk):
        block = x[:, start:start + chunk]
        squares = (block ** 2).sum(0)  # unchanged by sign flips
        means = signs @ block / n
        variance = np.maximum(squares - n * means ** 2, 0.0) / (n - 1)
        with np.errstate(divide="ignore", invalid="ignore"):  # equal values: t is +-inf, or 0 when all are 0
            ts = np.nan_to_num(np.where(variance > 0, means / np.sqrt(variance / n), np.sign(means) * np.inf),
                               nan=0.0, posinf=np.inf, neginf=-np.inf)
        t[start:start + chunk] = ts[0]
        counts[start:start + chunk] = (ts >= ts[0] - 1e-12).sum(0)
    return t, counts / len(signs), len(signs)


def pooled_null_pvalues(real_r, null_r) -> np.ndarray:
    """One-sided p-values of each voxel's r against a null pooled over voxels and draws.

    ``p_v = (1 + #{null_r >= real_r[v]}) / (1 + null_r.size)``, with ``null_r`` the scores of
    the same procedure on misaligned stimuli (``[n_draws, V]``). Valid when, under the null,
    a voxel's real score is exchangeable with the null draws pooled over voxels: then the
    share of p < alpha over voxels is alpha, whatever each voxel's autocorrelation; a single
    voxel's p-value is exact only if voxels share one null distribution.
    """
    real_r = np.asarray(real_r, dtype=np.float64)
    pool = np.sort(np.asarray(null_r, dtype=np.float64).ravel())
    above = pool.size - np.searchsorted(pool, real_r, side="left")
    return (1.0 + above) / (1.0 + pool.size)


def circular_shift_sd(prediction, response, block_length: int = 10) -> np.ndarray:
    """Per voxel, the spread of r over circular shifts of the prediction: r's scale under no alignment.

    The standard deviation, over every shift ``k`` with ``block_length <= k <= T - block_length``,
    of the correlation of the prediction shifted by ``k`` with the response. It grows with the
    autocorrelation of both series (few independent samples), so ``r / circular_shift_sd``
    puts voxels of slow and fast responses on one scale before they are pooled against a
    null. 0 where a series is constant.
    """
    prediction = np.asarray(prediction)
    response = np.asarray(response)
    n_times, n_vox = prediction.shape
    lags = np.arange(block_length, n_times - block_length + 1)
    out = np.zeros(n_vox)
    step = max(1, _CHUNK_ELEMENTS // (6 * n_times))
    for start in range(0, n_vox, step):
        sl = slice(start, min(start + step, n_vox))
        zp, bad_p = _zscore_columns(np.asarray(prediction[:, sl], dtype=np.float64))
        zr, bad_r = _zscore_columns(np.asarray(response[:, sl], dtype=np.float64))
        spectrum = np.conj(np.fft.rfft(zp, axis=0)) * np.fft.rfft(zr, axis=0)
        c = np.fft.irfft(spectrum, n=n_times, axis=0)[lags] / n_times
        out[sl] = np.where(bad_p | bad_r, 0.0, c.std(axis=0))
    return out

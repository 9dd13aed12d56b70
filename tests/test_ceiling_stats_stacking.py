"""Noise ceilings, permutation statistics and stacked regression on simulated data with known truth."""

from __future__ import annotations

import time

import numpy as np
import pytest
import scipy.stats
from scipy.optimize import minimize
from scipy.signal import lfilter

from bidsenc.models import ceiling, stacking, stats


# --------------------------------------------------------------------------- helpers


def _zscore_runs(x: np.ndarray) -> np.ndarray:
    """Z-score each repeat over time, as the caller of the ceiling functions does."""
    return (x - x.mean(axis=-2, keepdims=True)) / x.std(axis=-2, keepdims=True)


def _repeats(rng, n_repeats, n_times, n_voxels, var_s, var_n):
    signal = np.sqrt(var_s) * rng.standard_normal((n_times, n_voxels))
    noise = np.sqrt(var_n) * rng.standard_normal((n_repeats, n_times, n_voxels))
    return _zscore_runs(signal[None] + noise)


def _schoppe_direct(repeats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Schoppe et al. formulas written out plainly (float64, ddof=0); NaN where SP <= 0."""
    n = repeats.shape[0]
    y = repeats.mean(axis=0)
    tp = np.mean([np.var(r, axis=0) for r in repeats], axis=0)
    sp = (n * np.var(y, axis=0) - tp) / (n - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cc = 1.0 / np.sqrt(1.0 + (tp / sp - 1.0) / n)
    return np.where(sp > 0, cc, np.nan), sp


def _ar1(rng, n_times, n_voxels, phi):
    e = rng.standard_normal((n_times + 200, n_voxels))
    return lfilter([1.0], [1.0, -phi], e, axis=0)[200:]


def _slsqp(P: np.ndarray) -> np.ndarray:
    """Oracle: min w'Pw on the simplex for one voxel with scipy's SLSQP."""
    J = P.shape[0]
    res = minimize(lambda w: w @ P @ w, np.full(J, 1.0 / J), jac=lambda w: 2.0 * P @ w, method="SLSQP",
                   bounds=[(0.0, 1.0)] * J,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(J)}],
                   options={"ftol": 1e-15, "maxiter": 1000})
    assert res.success, res.message
    return res.x


def _random_psd(rng, n_voxels, J):
    """Random residual covariances with a spread of conditioning and active constraints."""
    A = rng.standard_normal((n_voxels, J, J + 2)) * rng.uniform(0.2, 3.0, size=(n_voxels, J, 1))
    shift = rng.standard_normal((n_voxels, 1, J + 2))  # shared residual part: correlated spaces
    A = A + shift
    return A @ A.transpose(0, 2, 1) / (J + 2)


# --------------------------------------------------------------------------- ceiling


@pytest.mark.parametrize("n_repeats", [3, 10])
def test_cc_max_recovers_true_ceiling(n_repeats):
    rng = np.random.default_rng(n_repeats)
    var_s, var_n = 1.0, 2.0
    rep = _repeats(rng, n_repeats, 300, 2000, var_s, var_n)
    truth = np.sqrt(var_s / (var_s + var_n / n_repeats))
    values, degenerate = ceiling.cc_max(rep, return_degenerate=True)
    assert abs(values.mean() - truth) < 0.03
    assert not degenerate.any()
    assert np.all((values > 0) & (values <= 1))


def test_cc_max_matches_direct_schoppe_formulas():
    rng = np.random.default_rng(1)
    # Voxels from strong signal to none, so both branches (SP > 0 and SP <= 0) occur.
    var_s = np.repeat([2.0, 0.5, 0.1, 0.0], 250)
    signal = np.sqrt(var_s) * rng.standard_normal((200, var_s.size))
    rep = _zscore_runs(signal[None] + rng.standard_normal((5, 200, var_s.size)))
    direct, sp = _schoppe_direct(rep)
    values, degenerate = ceiling.cc_max(rep, return_degenerate=True)
    assert degenerate.any() and (~degenerate).any()
    np.testing.assert_array_equal(degenerate, ~(sp > 0))
    np.testing.assert_allclose(values[~degenerate], direct[~degenerate], rtol=0, atol=1e-12)
    assert np.all(values[degenerate] == 0.0)
    floored = ceiling.cc_max(rep, floor=0.25)
    np.testing.assert_allclose(floored, np.maximum(np.nan_to_num(direct, nan=0.0), 0.25), rtol=0, atol=1e-12)


def test_cc_max_pure_noise_is_near_zero_and_floor():
    rng = np.random.default_rng(2)
    noise = _zscore_runs(rng.standard_normal((10, 1000, 2000)))
    values, degenerate = ceiling.cc_max(noise, return_degenerate=True)
    # SP straddles 0: about half the voxels are undefined (0); the rest are small but
    # biased upwards (CC_max ~ sqrt(N SP / TP)).
    assert 0.4 < degenerate.mean() < 0.6
    assert np.median(values) < 0.05
    assert values.mean() < 0.15
    signal_level = ceiling.cc_max(_repeats(rng, 10, 1000, 200, 0.2, 1.0)).mean()
    assert signal_level > 0.75  # truth sqrt(0.2 / 0.3) = 0.816: the noise voxels are clearly apart
    floored = ceiling.cc_max(noise, floor=0.25)
    assert floored.min() == 0.25
    assert np.all(floored[degenerate] == 0.25)
    assert np.median(floored) == 0.25


def test_ceilings_degenerate_voxels_and_float32():
    rng = np.random.default_rng(3)
    rep = _repeats(rng, 4, 120, 50, 1.0, 1.0)
    rep[:, :, 0] = 3.7  # constant voxel
    rep[1, 5, 1] = np.nan  # non-finite value
    rep[:, :, 2] = rep[0, :, 2]  # identical repeats: perfect repeatability
    for func in (ceiling.cc_max, ceiling.explainable_variance):
        values, degenerate = func(rep, return_degenerate=True)
        assert np.isfinite(values).all()
        assert degenerate[0] and degenerate[1] and not degenerate[3:].any()
        assert values[0] == 0.0 and values[1] == 0.0
    assert ceiling.cc_max(rep)[2] == pytest.approx(1.0, abs=1e-12)
    assert ceiling.explainable_variance(rep)[2] == pytest.approx(1.0, abs=1e-12)
    assert ceiling.cc_max(rep, floor=0.25)[0] == 0.25
    # float32 input: computed in float64, so identical to the float64 cast of the same values.
    rep32 = rep.astype(np.float32)
    np.testing.assert_array_equal(ceiling.cc_max(rep32), ceiling.cc_max(rep32.astype(np.float64)))
    np.testing.assert_array_equal(ceiling.explainable_variance(rep32),
                                  ceiling.explainable_variance(rep32.astype(np.float64)))


def test_voxel_chunking_does_not_change_results(monkeypatch):
    rng = np.random.default_rng(4)
    rep = _repeats(rng, 3, 80, 301, 1.0, 1.5)
    expected = [ceiling.cc_max(rep), ceiling.explainable_variance(rep), ceiling.intersubject_ceiling(rep)]
    monkeypatch.setattr(ceiling, "_CHUNK_ELEMENTS", 3 * 80 * 7)  # chunks of a few voxels
    got = [ceiling.cc_max(rep), ceiling.explainable_variance(rep), ceiling.intersubject_ceiling(rep)]
    for a, b in zip(expected, got):  # equal up to summation order (SIMD width)
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("n_repeats", [3, 10])
def test_explainable_variance_recovers_truth(n_repeats):
    rng = np.random.default_rng(10 + n_repeats)
    var_s, var_n = 1.0, 2.0
    rep = _repeats(rng, n_repeats, 300, 2000, var_s, var_n)
    corrected = ceiling.explainable_variance(rep)
    raw = ceiling.explainable_variance(rep, bias_correction=False)
    assert abs(corrected.mean() - var_s / (var_s + var_n)) < 0.03
    # Uncorrected: E[var(mean)] / E[var] = (var_s + var_n / N) / (var_s + var_n), biased upwards.
    assert abs(raw.mean() - (var_s + var_n / n_repeats) / (var_s + var_n)) < 0.03
    # Voxelwise-tutorials formula (ddof=1): the ratio does not depend on ddof.
    tutorial = rep.mean(axis=0).var(axis=0, ddof=1) / rep.var(axis=1, ddof=1).mean(axis=0)
    np.testing.assert_allclose(raw, tutorial, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(corrected, tutorial - (1 - tutorial) / (n_repeats - 1), rtol=0, atol=1e-12)
    # Noise only: corrected ev centres on 0 (negative values allowed, not clipped).
    noise_ev = ceiling.explainable_variance(_zscore_runs(rng.standard_normal((n_repeats, 300, 2000))))
    assert abs(noise_ev.mean()) < 0.01 and noise_ev.min() < 0


def test_cc_norm():
    cc_abs = np.array([0.3, 0.5, -0.2, 0.4, np.nan])
    ccmax = np.array([0.6, 0.5, 0.8, 0.0, 0.7])
    values, degenerate = ceiling.cc_norm(cc_abs, ccmax, return_degenerate=True)
    np.testing.assert_allclose(values, [0.5, 1.0, -0.25, 0.0, 0.0])
    np.testing.assert_array_equal(degenerate, [False, False, False, True, True])
    with pytest.raises(ValueError):
        ceiling.cc_norm(cc_abs, ccmax[:3])


def test_intersubject_ceiling_recovers_truth():
    rng = np.random.default_rng(5)
    n_part, var_s, var_n = 4, 1.0, 1.5
    signal = rng.standard_normal((400, 1500)) * np.sqrt(var_s)
    resp = signal[None] + np.sqrt(var_n) * rng.standard_normal((n_part, 400, 1500))
    truth = var_s / np.sqrt((var_s + var_n) * (var_s + var_n / (n_part - 1)))
    values, degenerate = ceiling.intersubject_ceiling(resp, return_degenerate=True)
    assert abs(values.mean() - truth) < 0.03
    assert not degenerate.any()
    # Direct leave-one-out computation.
    direct = np.mean([[np.corrcoef(resp[p, :, v], np.delete(resp, p, axis=0)[:, :, v].mean(axis=0))[0, 1]
                       for p in range(n_part)] for v in range(5)], axis=1)
    np.testing.assert_allclose(values[:5], direct, rtol=0, atol=1e-12)
    # A participant constant in a voxel is left out of that voxel; all constant -> 0, flagged.
    resp[0, :, 0] = 2.0
    resp[:, :, 1] = 1.0
    values, degenerate = ceiling.intersubject_ceiling(resp, return_degenerate=True)
    others = resp[1:, :, 0]
    direct0 = np.mean([np.corrcoef(others[p], np.delete(others, p, axis=0).mean(axis=0))[0, 1]
                       for p in range(3)])
    assert values[0] == pytest.approx(direct0, abs=1e-12)
    assert values[1] == 0.0 and degenerate[1] and not degenerate[0]
    assert np.isfinite(values).all()


# --------------------------------------------------------------------------- permutation statistics


@pytest.fixture(scope="module")
def ar1_noise():
    rng = np.random.default_rng(20240)
    return _ar1(rng, 300, 2000, 0.7), _ar1(rng, 300, 2000, 0.7)


@pytest.mark.parametrize("method", ["block", "circular"])
def test_permutation_pvalues_uniform_on_autocorrelated_noise(ar1_noise, method):
    prediction, response = ar1_noise
    p = stats.permutation_pvalues(prediction, response, n_permutations=1000, block_length=10,
                                  method=method, rng=7)
    assert p.shape == (2000,) and p.min() >= 1 / 1001 and p.max() <= 1.0
    assert scipy.stats.kstest(p, "uniform").pvalue > 0.01
    assert (p < 0.05).mean() < 0.075


def test_autocorrelation_breaks_naive_nulls(ar1_noise):
    """The same data defeat the parametric test and an i.i.d. shuffle: the blocks matter."""
    prediction, response = ar1_noise
    parametric = np.array([scipy.stats.pearsonr(x, y, alternative="greater").pvalue
                           for x, y in zip(prediction.T, response.T)])
    assert scipy.stats.kstest(parametric, "uniform").pvalue < 0.01
    iid = stats.permutation_pvalues(prediction, response, n_permutations=300, block_length=1, rng=7)
    assert scipy.stats.kstest(iid, "uniform").pvalue < 0.01
    assert (iid < 0.05).mean() > 0.1


@pytest.mark.parametrize("method", ["block", "circular"])
def test_permutation_pvalues_strong_signal_and_degenerate(method):
    rng = np.random.default_rng(8)
    prediction = _ar1(rng, 300, 50, 0.7)
    response = prediction + 0.3 * _ar1(rng, 300, 50, 0.7)
    response[:, 0] = 5.0  # constant response
    prediction[3, 1] = np.inf  # non-finite prediction
    p, degenerate = stats.permutation_pvalues(prediction, response, n_permutations=200, method=method,
                                              rng=0, return_degenerate=True)
    assert np.all(p[2:] == 1 / 201)
    assert p[0] == 1.0 and p[1] == 1.0
    np.testing.assert_array_equal(degenerate, np.arange(50) < 2)


def test_circular_fft_matches_rolled_correlations():
    rng = np.random.default_rng(9)
    zp, _ = stats._zscore_columns(_ar1(rng, 64, 7, 0.5))
    zr, _ = stats._zscore_columns(_ar1(rng, 64, 7, 0.5))
    offsets = rng.integers(5, 60, size=40)
    r_obs = (zp * zr).mean(axis=0)
    brute = sum((np.roll(zp, k, axis=0) * zr).mean(axis=0) >= r_obs - 1e-12 for k in offsets)
    np.testing.assert_array_equal(stats._count_circular(zp, zr, r_obs, offsets), brute)


def test_block_permutation_is_a_block_shuffle():
    rng = np.random.default_rng(10)
    for _ in range(50):
        perm = stats._block_permutation(103, 10, rng)
        np.testing.assert_array_equal(np.sort(perm), np.arange(103))
        # At most one jump per block boundary: ceil(103/10) + 1 blocks with a random phase.
        assert (np.diff(perm) != 1).sum() <= 12


def test_fdr_on_noise_finds_almost_nothing(ar1_noise):
    prediction, response = ar1_noise
    p = stats.permutation_pvalues(prediction, response, rng=11)
    discoveries = stats.fdr_bh(p, q=0.05)
    assert discoveries.dtype == bool and discoveries.shape == p.shape
    assert discoveries.mean() <= 0.005


def test_fdr_bh_matches_scipy_and_step_up_rule():
    rng = np.random.default_rng(12)
    p = np.concatenate([rng.uniform(size=900), rng.uniform(0, 1e-3, size=100), [0.5, 0.5, 1e-3]])
    p = np.round(p, 4)  # ties
    discoveries, qvalues = stats.fdr_bh(p, q=0.05, return_qvalues=True)
    expected_q = scipy.stats.false_discovery_control(p, method="bh")
    np.testing.assert_array_equal(qvalues, expected_q)
    np.testing.assert_allclose(stats._bh_qvalues(p), expected_q, rtol=1e-13, atol=0)
    np.testing.assert_array_equal(discoveries, expected_q <= 0.05)
    # The step-up rule written out.
    m, order = p.size, np.argsort(p)
    passing = np.nonzero(p[order] <= 0.05 * np.arange(1, m + 1) / m)[0]
    expected = np.zeros(m, dtype=bool)
    expected[order[: passing[-1] + 1]] = True
    np.testing.assert_array_equal(discoveries, expected)
    assert 95 <= discoveries.sum() <= 110  # the 100 small ones, few others
    # Any shape, same answer.
    d2, q2 = stats.fdr_bh(p[:1000].reshape(10, 100), return_qvalues=True)
    assert d2.shape == (10, 100)
    np.testing.assert_array_equal(q2.ravel(), scipy.stats.false_discovery_control(p[:1000], method="bh"))
    with pytest.raises(ValueError):
        stats.fdr_bh(np.array([0.1, np.nan]))


# --------------------------------------------------------------------------- stacking


def _simulate_stack(rng, true_w, n_times, noise_sd):
    """Noise-free predictions of J spaces, and responses = convex combination + noise."""
    J, V = true_w.shape
    preds = rng.standard_normal((J, n_times, V))
    responses = np.einsum("jv,jtv->tv", true_w, preds) + noise_sd * rng.standard_normal((n_times, V))
    return preds, responses


@pytest.mark.parametrize("J", [2, 3])
def test_stacking_recovers_known_weights(J):
    rng = np.random.default_rng(30 + J)
    V = 300
    true_w = rng.dirichlet(np.ones(J), size=V).T
    true_w[:, :20] = np.eye(J)[:, rng.integers(J, size=20)]  # some voxels on a vertex
    preds, responses = _simulate_stack(rng, true_w, 3000, noise_sd=2.0)  # r ~ 0.4 at best
    W, degenerate = stack_weights_checked(preds, responses)
    assert np.abs(W - true_w).max() <= 0.1
    assert not degenerate.any()
    preds, responses = _simulate_stack(rng, true_w, 200, noise_sd=0.0)
    W, _ = stack_weights_checked(preds, responses)
    assert np.abs(W - true_w).max() <= 1e-8


def stack_weights_checked(preds, responses, **kwargs):
    W, degenerate = stacking.stack_weights(preds, responses, return_degenerate=True, **kwargs)
    assert W.shape == (preds.shape[0], preds.shape[2]) and W.dtype == np.float64
    assert np.all(W >= 0)
    np.testing.assert_allclose(W.sum(axis=0), 1.0, rtol=0, atol=1e-12)
    return W, degenerate


@pytest.mark.parametrize("J", [2, 3, 4, 5])
def test_simplex_qp_matches_slsqp(J):
    rng = np.random.default_rng(40 + J)
    P = _random_psd(rng, 60, J)
    W = stacking.solve_simplex_qp(P)
    oracle = np.stack([_slsqp(p) for p in P], axis=1)
    assert np.abs(W - oracle).max() <= 1e-4
    assert np.all(W >= 0)
    np.testing.assert_allclose(W.sum(axis=0), 1.0, rtol=0, atol=1e-12)
    if J >= 3:
        assert (W == 0).any()  # the problems include active constraints
    # The accelerated projected gradient agrees with the exact enumeration.
    W_fista = stacking.solve_simplex_qp(P, method="fista")
    assert np.abs(W_fista - W).max() <= 1e-6
    # Objective never worse than the oracle's.
    obj = np.einsum("jv,vij,iv->v", W, P, W)
    obj_oracle = np.einsum("jv,vij,iv->v", oracle, P, oracle)
    assert np.all(obj <= obj_oracle + 1e-12 * np.abs(obj_oracle))


def test_simplex_qp_many_spaces_uses_fista():
    rng = np.random.default_rng(50)
    P = _random_psd(rng, 20, 8)
    W = stacking.solve_simplex_qp(P)  # J = 8 > 6: FISTA
    oracle = np.stack([_slsqp(p) for p in P], axis=1)
    assert np.abs(W - oracle).max() <= 1e-4
    np.testing.assert_allclose(W, stacking.solve_simplex_qp(P, method="enumerate"), rtol=0, atol=1e-6)


def test_project_simplex_against_bisection():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(51)
    v = rng.normal(scale=2.0, size=(200, 5))
    got = stacking._project_simplex(torch.from_numpy(v)).numpy()
    for row, x in zip(v, got):
        lo, hi = row.min() - 1.0, row.max()
        for _ in range(200):  # theta with sum(max(v - theta, 0)) = 1
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if np.maximum(row - mid, 0).sum() > 1 else (lo, mid)
        np.testing.assert_allclose(x, np.maximum(row - 0.5 * (lo + hi), 0), atol=1e-12)


def test_stacking_degenerate_voxels_and_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(52)
    preds = rng.standard_normal((3, 100, 6))
    responses = preds.mean(axis=0) + 0.5 * rng.standard_normal((100, 6))
    preds[:, :, 0] = 0.0
    responses[:, 0] = 0.0  # nothing to explain, nothing predicted: P = 0
    preds[1, :, 1] = preds[0, :, 1]  # two identical spaces: singular P
    W, degenerate = stack_weights_checked(preds, responses)
    np.testing.assert_array_equal(degenerate, np.arange(6) == 0)
    np.testing.assert_allclose(W[:, 0], 1 / 3)
    # Identical spaces: any split between them is optimal; the combined weight is what matters.
    P1 = stacking.residual_covariance(preds, responses)[1]
    best = min(_slsqp(P1) @ P1 @ _slsqp(P1), P1[2, 2])
    assert W[:, 1] @ P1 @ W[:, 1] <= best + 1e-12
    # Torch in, torch out, same device; float32 predictions are accepted.
    Wt = stacking.stack_weights(torch.from_numpy(preds.astype(np.float32)), torch.from_numpy(responses))
    assert isinstance(Wt, torch.Tensor) and Wt.device == torch.device("cpu") and Wt.dtype == torch.float64
    np.testing.assert_allclose(Wt.numpy()[:, 2:], W[:, 2:], atol=1e-5)
    pred_t = stacking.stacked_prediction(Wt, torch.from_numpy(preds))
    assert isinstance(pred_t, torch.Tensor) and pred_t.shape == (100, 6)


def test_stacked_prediction_beats_every_single_space_on_training_data():
    rng = np.random.default_rng(53)
    true_w = rng.dirichlet(np.ones(3), size=400).T
    preds, responses = _simulate_stack(rng, true_w, 500, noise_sd=1.0)
    preds = preds + 0.5 * rng.standard_normal(preds.shape)  # imperfect out-of-fold predictions
    W = stacking.stack_weights(preds, responses)
    combined = stacking.stacked_prediction(W, preds)
    # float64 sums in another order: exact to rounding relative to the predictions' scale (elements near
    # zero differ by ~1e-16 absolutely, which a relative tolerance alone calls a failure)
    scale = np.abs(preds).max()
    np.testing.assert_allclose(combined, np.einsum("jv,jtv->tv", W, preds), rtol=1e-12, atol=1e-12 * scale)
    mse = ((responses - combined) ** 2).mean(axis=0)
    single = ((responses[None] - preds) ** 2).mean(axis=1)
    assert np.all(mse <= single.min(axis=0) + 1e-12)
    with pytest.raises(ValueError):
        stacking.stacked_prediction(W[:2], preds)


def test_stacking_speed_100k_voxels():
    rng = np.random.default_rng(54)
    J, T, V = 3, 100, 100_000
    preds = rng.standard_normal((J, T, V), dtype=np.float32)
    responses = (0.5 * preds[0] + 0.3 * preds[1] + 0.2 * preds[2]
                 + rng.standard_normal((T, V), dtype=np.float32))
    start = time.perf_counter()
    P = stacking.residual_covariance(preds, responses)
    middle = time.perf_counter()
    W = stacking.solve_simplex_qp(P)
    end = time.perf_counter()
    print(f"\nstacking {V} voxels x {J} spaces x {T} TRs: residual covariance {middle - start:.2f} s, "
          f"exact QP solve {end - middle:.2f} s")
    np.testing.assert_allclose(W.mean(axis=1), [0.5, 0.3, 0.2], atol=0.01)


def test_residual_covariance_fold_by_fold_equals_it_from_all_out_of_fold_predictions():
    """Stacking's residual covariance accumulated per fold is the one of the full out-of-fold predictions."""
    from bidsenc.models.cv import leave_stories_out
    from bidsenc.models.encoding import out_of_fold_residual_covariance, stack_spaces
    from bidsenc.models.ridge import ridge_predict

    def out_of_fold_predictions(x, y, folds, alphas):  # each row predicted without its fold, rows copied
        out = np.zeros(y.shape, dtype=np.float32)
        for train, val in folds:
            out[val] = ridge_predict(x[train], y[train], x[val], alphas)
        return out

    rng = np.random.default_rng(4)
    n, v = 240, 30
    groups = np.repeat(np.arange(6), n // 6)
    designs = [rng.standard_normal((n, p)).astype(np.float32) for p in (5, 12)]
    y = (designs[0][:, :1] + 0.5 * designs[1][:, :1] + rng.standard_normal((n, v))).astype(np.float32)
    folds = leave_stories_out(groups, 3, seed=0, gap=0)
    alphas = [np.full(v, 10.0), np.logspace(0, 3, v)]
    oof = np.stack([out_of_fold_predictions(x, y, folds, a) for x, a in zip(designs, alphas, strict=True)])
    expected = stacking.residual_covariance(oof, y)
    got = out_of_fold_residual_covariance(designs, alphas, y, folds)
    assert got.shape == (v, 2, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    test_pred = [rng.standard_normal((20, v)), rng.standard_normal((20, v))]
    result = stack_spaces(["a", "b"], got, test_pred, rng.standard_normal((20, v)))
    np.testing.assert_allclose(result.weights, stacking.stack_weights(oof, y), atol=1e-6)
    with pytest.raises(ValueError, match="exactly once"):
        out_of_fold_residual_covariance(designs, alphas, y, folds[:2])


def test_residual_covariance_fold_by_fold_takes_boolean_folds():
    from bidsenc.models.encoding import out_of_fold_residual_covariance

    rng = np.random.default_rng(5)
    n, v = 100, 8
    designs = [rng.standard_normal((n, 3)).astype(np.float32), rng.standard_normal((n, 4)).astype(np.float32)]
    y = rng.standard_normal((n, v)).astype(np.float32)
    held = np.zeros(n, bool)
    held[:30] = True  # unequal folds: 30 and 70 rows, weighted by their sizes
    alphas = [np.full(v, 1.0), np.full(v, 5.0)]
    by_mask = out_of_fold_residual_covariance(designs, alphas, y, [(~held, held), (held, ~held)])
    by_index = out_of_fold_residual_covariance(designs, alphas, y, [(np.flatnonzero(~held), np.flatnonzero(held)),
                                                                    (np.flatnonzero(held), np.flatnonzero(~held))])
    np.testing.assert_allclose(by_mask, by_index, rtol=1e-12)


def test_sign_flip_test_is_exact_for_few_participants_and_calibrated_for_many():
    """The group test: every sign pattern once when they are few (brute force agrees), sampled otherwise."""
    from itertools import product

    from scipy import stats

    from bidsenc.models.stats import sign_flip_test

    rng = np.random.default_rng(3)
    x = rng.normal(0.2, 1.0, (5, 40))
    t, p, n = sign_flip_test(x, n_permutations=1000)
    assert n == 32
    np.testing.assert_allclose(t, stats.ttest_1samp(x, 0).statistic, rtol=1e-10)
    flips = np.array(list(product([1.0, -1.0], repeat=5)))
    brute = np.array([(stats.ttest_1samp(flips * x[:, [j]].T, 0, axis=1).statistic >= t[j] - 1e-12).mean()
                      for j in range(x.shape[1])])
    np.testing.assert_allclose(p, brute)
    # 31 draws and the observed pattern would be 32: the exact test instead, in any chunks
    assert sign_flip_test(x, n_permutations=31)[2] == 32 and sign_flip_test(x, n_permutations=30)[2] == 31
    np.testing.assert_array_equal(sign_flip_test(x, n_permutations=31, chunk=7)[1], p)
    # equal values: +inf for a positive mean (p = 1/32), and nothing to find in zeros
    t, p, _ = sign_flip_test(np.stack([np.full(5, 0.3), np.zeros(5)], axis=1), n_permutations=1000)
    assert np.isposinf(t[0]) and p[0] == pytest.approx(1 / 32) and t[1] == 0 and p[1] == 1
    # 12 null participants: 4096 patterns > 1000, so 1000 drawn plus the observed; p < 0.05 in 5% of columns
    t, p, n = sign_flip_test(rng.normal(0, 1, (12, 4000)), n_permutations=1000, seed=1)
    assert n == 1001 and 0.04 < (p < 0.05).mean() < 0.06
    effect = rng.normal(0.8, 1, (12, 200))
    assert (sign_flip_test(effect, n_permutations=1000)[1] < 0.05).mean() > 0.8

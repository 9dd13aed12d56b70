"""bidsenc's cross-validated ridge against himalaya (the oracle), numpy solves and the reference formula."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from bidsenc.models import backend as rbackend
from bidsenc.models import ridge
from bidsenc.models.ridge import (
    DEFAULT_ALPHAS,
    REFERENCE_ALPHAS,
    MemoryBudgetError,
    fit_and_score,
    pearson_r,
    r2_score,
    reference_to_alpha,
    ridge_cv,
    ridge_predict,
)

N_TRAIN, N_TEST, N_VOXELS, N_FOLDS = 300, 60, 50, 5
ALPHAS = np.logspace(-1, 5, 13)


def make_data(n_features, seed=0, n_voxels=N_VOXELS):
    """z-scored features and responses with signal in every voxel (SNR varying over voxels)."""
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_TEST
    X = rng.standard_normal((n, n_features))
    X = (X - X[:N_TRAIN].mean(0)) / X[:N_TRAIN].std(0)
    W = rng.standard_normal((n_features, n_voxels)) / np.sqrt(n_features)
    signal = X @ W
    snr = np.logspace(-1.5, 0.5, n_voxels)
    Y = signal * np.sqrt(snr) / signal[:N_TRAIN].std(0) + rng.standard_normal((n, n_voxels))
    Y = (Y - Y[:N_TRAIN].mean(0)) / Y[:N_TRAIN].std(0)
    X, Y = X.astype(np.float32), Y.astype(np.float32)
    return X[:N_TRAIN], Y[:N_TRAIN], X[N_TRAIN:], Y[N_TRAIN:]


def block_folds(n=N_TRAIN, k=N_FOLDS):
    blocks = np.array_split(np.arange(n), k)
    return [(np.concatenate([b for j, b in enumerate(blocks) if j != i]), blocks[i]) for i in range(k)]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny problems: one thread (torch and BLAS) avoids spin-waits on a busy machine (10x slower)."""
    import himalaya.kernel_ridge  # noqa: F401 - loads numpy's and scipy's BLAS before they are limited
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


@pytest.fixture
def himalaya_numpy():
    from himalaya.backend import get_backend, set_backend

    before = get_backend().name
    set_backend("numpy")
    yield
    set_backend(before)


def himalaya_fit(estimator, X, Y, alphas, folds, score_func=None):
    from himalaya.kernel_ridge import KernelRidgeCV
    from himalaya.ridge import RidgeCV
    from himalaya.scoring import r2_score as h_r2

    params = dict(score_func=h_r2 if score_func is None else score_func)
    cls = {"ridge": RidgeCV, "kernel": KernelRidgeCV}[estimator]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(alphas=alphas, cv=folds, solver_params=params).fit(X, Y)


def numpy_weights(X, Y, alphas_per_voxel):
    X, Y = X.astype(np.float64), Y.astype(np.float64)
    G, C = X.T @ X, X.T @ Y
    eye = np.eye(X.shape[1])
    alphas_per_voxel = np.asarray(alphas_per_voxel)
    W = np.zeros_like(C)
    for a in np.unique(alphas_per_voxel):
        cols = alphas_per_voxel == a
        W[:, cols] = np.linalg.solve(G + a * eye, C[:, cols])
    return W


# ---------------------------------------------------------------------------------------------
# Conventions


def test_reference_grid_and_conversion():
    assert np.allclose(REFERENCE_ALPHAS, np.logspace(1, 4, 15))
    assert np.allclose(reference_to_alpha(REFERENCE_ALPHAS), np.logspace(2, 8, 15))
    assert np.allclose(ridge.alpha_to_reference(reference_to_alpha(REFERENCE_ALPHAS)), REFERENCE_ALPHAS)
    assert DEFAULT_ALPHAS.min() <= 1e2 and DEFAULT_ALPHAS.max() >= 1e8  # contains the reference range


@pytest.mark.parametrize("n_features", [80, 400])
def test_reference_svd_formula_is_alpha_squared(n_features):
    """The reference's SVD ridge with penalty a equals bidsenc's ridge with alpha = a**2."""
    X, Y, Xt, _ = make_data(n_features, seed=3)
    a = np.full(N_VOXELS, 30.0)
    a[::2] = 300.0
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    U, S, Vt = np.linalg.svd(X64, full_matrices=False)
    ref = Vt.T @ ((S[:, None] / (S[:, None] ** 2 + a[None, :] ** 2)) * (U.T @ Y64))  # per-voxel a
    pred = ridge_predict(X, Y, Xt, reference_to_alpha(a), dtype="float64")
    np.testing.assert_allclose(pred, Xt.astype(np.float64) @ ref, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# himalaya as the oracle (float32, the default)


@pytest.mark.parametrize("n_features,estimator", [(80, "ridge"), (400, "kernel")])
def test_matches_himalaya(n_features, estimator, himalaya_numpy):
    X, Y, Xt, Yt = make_data(n_features)
    folds = block_folds()
    h = himalaya_fit(estimator, X, Y, ALPHAS, folds)
    h_alphas = np.asarray(h.best_alphas_, dtype=np.float64)
    res = ridge_cv(X, Y, folds, ALPHAS)
    assert res.form == ("primal" if n_features < N_TRAIN else "kernel")
    assert res.valid.all() and res.n_invalid == 0
    np.testing.assert_allclose(res.alphas, h_alphas, rtol=1e-5)  # every voxel, same alpha
    assert len(np.unique(res.alphas)) >= 3  # the test data make alphas vary
    np.testing.assert_array_equal(res.at_grid_edge, np.isin(res.alphas, [ALPHAS.min(), ALPHAS.max()]))
    np.testing.assert_allclose(res.best_cv_score, np.asarray(h.cv_scores_), atol=1e-5)
    assert res.cv_scores.shape == (len(ALPHAS), N_VOXELS)
    assert np.allclose(res.cv_scores.max(0), res.best_cv_score)

    pred = ridge_predict(X, Y, Xt, h_alphas)
    np.testing.assert_allclose(pred, np.asarray(h.predict(Xt)), rtol=0, atol=1e-4)

    out = fit_and_score(X, Y, Xt, Yt, folds, ALPHAS, return_predictions=True)
    np.testing.assert_allclose(out["alphas"], h_alphas, rtol=1e-5)
    np.testing.assert_allclose(out["test_r"], pearson_r(Yt, np.asarray(h.predict(Xt))), atol=1e-4)
    np.testing.assert_allclose(out["predictions"], pred, atol=1e-5)
    np.testing.assert_allclose(out["test_r2"], r2_score(Yt, pred), atol=1e-5)
    np.testing.assert_allclose(out["cv_score"], res.best_cv_score)


def test_neg_mse_matches_himalaya_default_score(himalaya_numpy):
    """``score="neg_mse"`` is himalaya's default criterion (l2_neg_loss)."""
    from himalaya.scoring import l2_neg_loss

    X, Y, _, _ = make_data(80, seed=1)
    folds = block_folds()
    h = himalaya_fit("ridge", X, Y, ALPHAS, folds, score_func=l2_neg_loss)
    res = ridge_cv(X, Y, folds, ALPHAS, score="neg_mse")
    np.testing.assert_allclose(res.alphas, np.asarray(h.best_alphas_), rtol=1e-5)
    np.testing.assert_allclose(res.best_cv_score, np.asarray(h.cv_scores_), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# float64 mode against direct numpy solves


def numpy_cv_scores(X, Y, folds, alphas, score):
    X, Y = X.astype(np.float64), Y.astype(np.float64)
    out = np.zeros((len(folds), len(alphas), Y.shape[1]))
    for f, (tr, va) in enumerate(folds):
        for i, a in enumerate(alphas):
            pred = X[va] @ numpy_weights(X[tr], Y[tr], np.full(Y.shape[1], a))
            out[f, i] = pearson_r(Y[va], pred) if score == "r" else r2_score(Y[va], pred)
    return out.mean(0)


@pytest.mark.parametrize("n_features", [80, 400])
@pytest.mark.parametrize("score", ["r2", "r"])
def test_float64_matches_numpy_solve(n_features, score):
    X, Y, Xt, _ = make_data(n_features, seed=2, n_voxels=12)
    folds = block_folds()
    alphas = np.logspace(0, 4, 5)
    res = ridge_cv(X, Y, folds, alphas, dtype="float64", score=score, return_weights=True)
    expected = numpy_cv_scores(X, Y, folds, alphas, score)
    np.testing.assert_allclose(res.cv_scores, expected, rtol=0, atol=1e-8)
    np.testing.assert_array_equal(res.alphas, alphas[np.argmax(expected, 0)])
    W = numpy_weights(X, Y, res.alphas)
    np.testing.assert_allclose(res.weights, W, rtol=1e-8, atol=1e-10)
    pred = ridge_predict(X, Y, Xt, res.alphas, dtype="float64")
    np.testing.assert_allclose(pred, Xt.astype(np.float64) @ W, rtol=1e-8, atol=1e-10)


def test_kernel_and_primal_forms_agree():
    X, Y, Xt, _ = make_data(150, seed=4, n_voxels=20)
    folds = block_folds()
    k = ridge_cv(X, Y, folds, ALPHAS, dtype="float64", form="kernel", return_weights=True)
    p = ridge_cv(X, Y, folds, ALPHAS, dtype="float64", form="primal", return_weights=True)
    assert (k.form, p.form) == ("kernel", "primal")
    np.testing.assert_allclose(k.cv_scores, p.cv_scores, atol=1e-9)
    np.testing.assert_allclose(k.weights, p.weights, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(ridge_predict(X, Y, Xt, k.alphas, dtype="float64", form="kernel"),
                               ridge_predict(X, Y, Xt, k.alphas, dtype="float64", form="primal"), atol=1e-9)


@pytest.mark.parametrize("n_features", [80, 400])
def test_folded_and_factored_operators_agree(n_features, monkeypatch, himalaya_numpy):
    X, Y, _, _ = make_data(n_features, seed=11)
    folds = block_folds()
    out = {}
    for how in ("folded", "factored"):
        monkeypatch.setattr(ridge, "_OPERATOR", how)
        out[how] = ridge_cv(X, Y, folds, ALPHAS, dtype="float64")
        out[how + "32"] = ridge_cv(X, Y, folds, ALPHAS)
    np.testing.assert_allclose(out["folded"].cv_scores, out["factored"].cv_scores, atol=1e-10)
    h = himalaya_fit("kernel" if n_features > N_TRAIN else "ridge", X, Y, ALPHAS, folds)
    for how in ("folded32", "factored32"):
        np.testing.assert_allclose(out[how].alphas, np.asarray(h.best_alphas_), rtol=1e-5)


def test_ties_go_to_the_larger_alpha():
    """A voxel whose scores tie across alphas (zero features: every prediction is 0) gets the largest."""
    X = np.zeros((40, 5), dtype=np.float32)
    Y = np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32)
    res = ridge_cv(X, Y, block_folds(40, 4), [1.0, 10.0, 100.0])
    np.testing.assert_array_equal(res.alphas, 100.0)


# ---------------------------------------------------------------------------------------------
# Voxel batches, memory budget and the out-of-memory retry


def test_voxel_batches_give_the_same_result_and_the_memory_limit_is_a_limit():
    X, Y, Xt, Yt = make_data(400, seed=5)
    folds = block_folds()
    whole = fit_and_score(X, Y, Xt, Yt, folds, ALPHAS, return_predictions=True)
    part = fit_and_score(X, Y, Xt, Yt, folds, ALPHAS, return_predictions=True, voxel_batch=7)
    np.testing.assert_array_equal(part["alphas"], whole["alphas"])
    np.testing.assert_allclose(part["predictions"], whole["predictions"], atol=1e-5)
    np.testing.assert_allclose(part["cv_scores"], whole["cv_scores"], atol=1e-6)
    # a memory limit does not change how the work is cut: the same bits, or a refusal
    limited = fit_and_score(X, Y, Xt, Yt, folds, ALPHAS, return_predictions=True, mem_gb=1.0)
    for key in ("alphas", "predictions", "cv_scores", "test_r"):
        np.testing.assert_array_equal(limited[key], whole[key])
    with pytest.raises(MemoryBudgetError):
        fit_and_score(X, Y, Xt, Yt, folds, ALPHAS, mem_gb=1e-4)


def test_out_of_memory_retry_halves_the_batch(monkeypatch):
    assert issubclass(torch.cuda.OutOfMemoryError, RuntimeError)  # raisable without CUDA
    X, Y, Xt, Yt = make_data(400, seed=6)
    folds = block_folds()
    reference = fit_and_score(X, Y, Xt, Yt, folds, ALPHAS, voxel_batch=6, return_predictions=True,
                              return_weights=True)
    seen = []

    def fake_oom(n):
        seen.append(n)
        if n > 6:
            raise torch.cuda.OutOfMemoryError(f"fake: {n} voxels")

    monkeypatch.setattr(rbackend, "_oom_probe", fake_oom)
    out = fit_and_score(X, Y, Xt, Yt, folds, ALPHAS, voxel_batch=N_VOXELS, return_predictions=True,
                        return_weights=True)
    assert seen[:4] == [50, 25, 12, 6]  # halved until it fits
    # the smaller size is kept for the later folds; the refit sizes (and, here, halves) itself
    assert seen.count(50) == 2 and seen[-4:] == [6, 6, 6, 2]
    for key in ("alphas", "cv_scores", "test_r", "test_r2", "predictions", "weights"):
        np.testing.assert_array_equal(out[key], reference[key])

    def always_oom(n):
        raise torch.cuda.OutOfMemoryError("fake")

    monkeypatch.setattr(rbackend, "_oom_probe", always_oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        ridge_cv(X, Y, folds, ALPHAS, voxel_batch=4)


# ---------------------------------------------------------------------------------------------
# Degenerate voxels, inputs, scores


def test_constant_and_nonfinite_voxels():
    X, Y, Xt, Yt = make_data(80, seed=7)
    Y, Yt = Y.copy(), Yt.copy()
    Y[:, 3] = 2.5  # constant
    Y[:, 7] = 0.0  # all zero
    Y[10, 9] = np.nan  # non-finite in training
    Yt[5, 11] = np.inf  # non-finite in test only
    folds = block_folds()
    res = ridge_cv(X, Y, folds, ALPHAS, return_weights=True)
    bad = np.zeros(N_VOXELS, bool)
    bad[[3, 7, 9]] = True
    np.testing.assert_array_equal(res.valid, ~bad)
    assert res.n_invalid == 3
    assert np.all(res.alphas[bad] == ALPHAS.max())
    assert np.all(res.cv_scores[:, bad] == 0) and np.all(res.best_cv_score[bad] == 0)
    assert np.all(res.weights[:, bad] == 0)
    for arr in (res.alphas, res.cv_scores, res.best_cv_score, res.weights):
        assert np.isfinite(arr).all()
    # the other voxels are fitted exactly as without the bad ones
    clean = ridge_cv(X, Y[:, ~bad], folds, ALPHAS, return_weights=True)
    np.testing.assert_array_equal(res.alphas[~bad], clean.alphas)
    np.testing.assert_allclose(res.weights[:, ~bad], clean.weights, atol=1e-6)

    out = fit_and_score(X, Y, Xt, Yt, folds, ALPHAS, return_predictions=True)
    bad_test = bad.copy()
    bad_test[11] = True
    np.testing.assert_array_equal(out["valid"], ~bad_test)
    assert out["n_invalid"] == 4
    assert np.all(out["test_r"][bad_test] == 0) and np.all(out["test_r2"][bad_test] == 0)
    assert np.all(out["predictions"][:, bad] == 0)
    for key in ("test_r", "test_r2", "alphas", "cv_score", "cv_scores", "predictions"):
        assert np.isfinite(out[key]).all(), key
    pred = ridge_predict(X, Y, Xt, 10.0)
    assert np.all(pred[:, bad] == 0) and np.isfinite(pred).all()


@pytest.mark.parametrize("form", ["primal", "kernel"])
def test_train_rows_fit_a_subset_without_copying_the_responses(form):
    """``train_rows`` gives exactly the fit on ``Y[rows]``: the same batches, gathered instead of copied."""
    X, Y, Xt, Yt = make_data(40 if form == "primal" else 400, seed=3)
    Y = Y.copy()
    rows = np.zeros(N_TRAIN, bool)
    rows[:100], rows[200:] = True, True
    Y[rows, 4] = 1.0  # constant in the subset only: not fitted there
    Y[150, 6] = np.nan  # not finite outside the subset: fitted there
    sub_folds = block_folds(int(rows.sum()), 4)
    expected = ridge_cv(X[rows], Y[rows], sub_folds, ALPHAS, return_weights=True, form=form)
    for given in (rows, np.flatnonzero(rows)):
        got = ridge_cv(X, Y, sub_folds, ALPHAS, return_weights=True, form=form, train_rows=given)
        np.testing.assert_array_equal(got.valid, expected.valid)
        assert not got.valid[4] and got.valid[6]
        np.testing.assert_array_equal(got.alphas, expected.alphas)
        np.testing.assert_array_equal(got.fold_scores, expected.fold_scores)
        np.testing.assert_array_equal(got.weights, expected.weights)
    scored = fit_and_score(X, Y, Xt, Yt, sub_folds, ALPHAS, return_predictions=True, form=form, train_rows=rows)
    plain = fit_and_score(X[rows], Y[rows], Xt, Yt, sub_folds, ALPHAS, return_predictions=True, form=form)
    for key in ("test_r", "alphas", "predictions", "valid"):
        np.testing.assert_array_equal(scored[key], plain[key])
    np.testing.assert_array_equal(ridge_predict(X, Y, Xt, expected.alphas, train_rows=rows, form=form),
                                  ridge_predict(X[rows], Y[rows], Xt, expected.alphas, form=form))
    with pytest.raises(ValueError, match="train_rows mask has 10 entries for 300 rows"):
        ridge_cv(X, Y, sub_folds, ALPHAS, train_rows=np.ones(10, bool))
    with pytest.raises(ValueError, match="train_rows indices outside 0..299"):
        ridge_cv(X, Y, sub_folds, ALPHAS, train_rows=[0, 300])


def test_torch_inputs_and_float64_responses():
    X, Y, Xt, _ = make_data(80, seed=8)
    folds = block_folds()
    a = ridge_cv(X, Y, folds, ALPHAS)
    b = ridge_cv(torch.from_numpy(X), torch.from_numpy(Y), [(list(t), v) for t, v in folds], ALPHAS)
    c = ridge_cv(X.astype(np.float64), Y.astype(np.float64), folds, ALPHAS)
    np.testing.assert_array_equal(a.alphas, b.alphas)
    np.testing.assert_array_equal(a.alphas, c.alphas)
    np.testing.assert_allclose(ridge_predict(X, Y, torch.from_numpy(Xt), a.alphas),
                               ridge_predict(X, Y, Xt, a.alphas), atol=1e-6)


def test_input_checks():
    X, Y, _, _ = make_data(80, seed=9, n_voxels=4)
    folds = block_folds()
    with pytest.raises(ValueError, match="rows"):
        ridge_cv(X[:-1], Y, folds)
    with pytest.raises(ValueError, match="empty"):
        ridge_cv(X, Y, [(np.arange(10), np.array([], int))])
    with pytest.raises(ValueError, match="overlap"):
        ridge_cv(X, Y, [(np.arange(20), np.arange(10, 30))])
    with pytest.raises(ValueError, match="outside"):
        ridge_cv(X, Y, [(np.arange(10), np.array([N_TRAIN]))])
    with pytest.raises(ValueError, match="positive"):
        ridge_cv(X, Y, folds, [0.0, 1.0])
    with pytest.raises(ValueError, match="score"):
        ridge_cv(X, Y, folds, score="mse")
    with pytest.raises(ValueError, match="dtype"):
        ridge_cv(X, Y, folds, dtype="float16")
    Xbad = X.copy()
    Xbad[0, 0] = np.nan
    with pytest.raises(ValueError, match="X_train"):
        ridge_cv(Xbad, Y, folds)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            ridge_cv(X, Y, folds, device="cuda")
    with pytest.raises(ValueError, match="allow_tf32"):
        ridge_cv(X, Y, folds, allow_tf32="yes")
    with pytest.raises(TypeError):
        fit_and_score(X, Y, X, Y, folds, alphs=1.0)


def test_pearson_r_and_r2_score():
    rng = np.random.default_rng(10)
    a = rng.standard_normal((100, 6))
    b = a + rng.standard_normal((100, 6))
    b[:, 2] = 1.0  # constant prediction: r is 0, not NaN
    a[:, 4] = 3.0  # constant response: r and R^2 are 0
    r = pearson_r(a, b)
    expected = [0.0 if j in (2, 4) else np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(6)]
    np.testing.assert_allclose(r, expected, atol=1e-12)
    r2 = r2_score(a, b)
    ss = ((a - a.mean(0)) ** 2).sum(0)
    exp_r2 = 1 - ((a - b) ** 2).sum(0) / np.where(ss > 0, ss, 1)
    exp_r2[4] = 0.0
    np.testing.assert_allclose(r2, exp_r2, atol=1e-12)
    assert np.isclose(pearson_r(a[:, 0], b[:, 0]), expected[0])
    rt = pearson_r(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert isinstance(rt, torch.Tensor) and rt.dtype == torch.float32
    np.testing.assert_allclose(rt.numpy(), expected, atol=1e-5)

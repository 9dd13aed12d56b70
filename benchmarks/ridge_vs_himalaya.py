"""Benchmark: bidsenc's cross-validated ridge against himalaya's RidgeCV and KernelRidgeCV.

Both sides get the same simulated delayed design, the same leave-stories-out folds
(``cv=`` a list of ``(train, val)`` pairs for himalaya) and the same alpha grid (the
reference grid converted to himalaya units, ``logspace(2, 8, 15)``), in float32, with
the same validation score (mean over folds of R^2: himalaya gets
``solver_params=dict(score_func=himalaya.scoring.r2_score)``, as its default is the
negative MSE).  himalaya is called as a user would: ``est.fit(X_train, Y_train)`` then
``est.predict(X_test)``, on its fastest backend on the device, both estimators; the faster
estimator is the peer.  On the CPU that backend is "torch": on the ``small`` size,
KernelRidgeCV took 18.1 / 18.3 s (best / median of 3 interleaved runs) on "torch" and
19.2 / 21.7 s on "numpy" (2-core AMD EPYC; ``--himalaya-backend numpy,torch`` times
both again).  The two backends choose different alphas for 0.5% of the voxels
(near-ties among noise voxels, decided by float32 rounding, which differs between
numpy's and torch's sums); bidsenc uses torch's arithmetic, so its agreement is reported
against each backend timed.  bidsenc runs
:func:`bidsenc.models.ridge.fit_and_score` (cross-validation, refit, test
predictions and test scores).  Each is timed once, after an untimed warm-up on a small
slice of the data (``--repeat N``: N interleaved runs, the fastest kept, for a shared
machine).

Sizes
-----
``--size small`` (CPU): 2,000 training TRs (10 stories of 200), 200 test TRs, 2,048
features (512 smooth random features x 4 delays), 10,000 voxels, 5 folds of 2 stories.

``--size gpu`` (CUDA): 9,000 training TRs (10 stories of 900), 900 test TRs, 80,000
voxels, 5 folds; run twice, with 8,192 and with 16,384 features.  himalaya runs on its
``torch_cuda`` backend with ``n_targets_batch_refit=10000``: its refit materialises the
weights of every used alpha for every voxel of a batch (unbatched: 15 x 9,000 x 80,000
floats, 43 GB), as a user would set it.
Peak GPU memory of each side is printed.

``--dry-run`` shrinks either size to a few seconds on the CPU (a smoke test of the code
path; its numbers mean nothing).

Simulation: smooth random features (Gaussian-filtered white noise, z-scored per story),
delayed by 1-4 TRs within each story; responses ``X W + noise`` with a low-rank ``W``
(64 latent components) and a signal-to-noise ratio spread log-uniformly over voxels
(1e-3 to 3) so that the chosen alphas vary; responses z-scored on the training rows.

Output: timings, the share of voxels choosing the same alpha as himalaya, the max
|difference of test r| when bidsenc refits with himalaya's chosen alphas, and, last,
exactly one line ``time_ratio=<bidsenc/himalaya> max_abs_dr=<...> bidsenc_s=<...>
himalaya_s=<...>`` (worst case over the feature sizes for ``gpu``).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import warnings

import numpy as np

SIZES = {
    "small": dict(n_train=2000, n_test=200, n_features=[2048], n_voxels=10000, n_stories=10),
    "gpu": dict(n_train=9000, n_test=900, n_features=[8192, 16384], n_voxels=80000, n_stories=10),
}
DRY = {
    "small": dict(n_train=300, n_test=60, n_features=[256], n_voxels=500, n_stories=10),
    "gpu": dict(n_train=300, n_test=60, n_features=[256, 512], n_voxels=600, n_stories=10),
}
N_FOLDS = 5
N_DELAYS = 4
N_LATENT = 64


def simulate(n_train, n_test, n_features, n_voxels, n_stories, seed=0, device="cpu"):
    """A delayed design and responses with voxel-varying SNR; float32 numpy arrays.

    Returns ``X_train, Y_train, X_test, Y_test, story_of_train_row``.
    """
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    base = n_features // N_DELAYS
    story_len = n_train // n_stories
    lengths = [story_len] * (n_stories - 1) + [n_train - story_len * (n_stories - 1), n_test]
    sigma = 2.0  # TRs of temporal smoothing
    t = torch.arange(-8, 9, dtype=torch.float32, device=device)
    kern = torch.exp(-0.5 * (t / sigma) ** 2)
    kern = (kern / kern.sum()).view(1, 1, -1)
    Xs = []
    for length in lengths:
        white = torch.randn((base, 1, length + 16), generator=gen, device=device)
        smooth = torch.nn.functional.conv1d(white, kern).squeeze(1).T  # (length, base)
        smooth = (smooth - smooth.mean(0)) / smooth.std(0)
        delayed = [torch.cat([torch.zeros((d, base), device=device), smooth[: length - d]]) for d in
                   range(1, N_DELAYS + 1)]
        Xs.append(torch.cat(delayed, 1))
    X = torch.cat(Xs)  # (n_train + n_test, n_features)
    B = torch.randn((n_features, N_LATENT), generator=gen, device=device)
    L = torch.randn((N_LATENT, n_voxels), generator=gen, device=device)
    signal = (X @ B) @ L
    signal /= signal[:n_train].std(0)
    snr = 10 ** (torch.rand(n_voxels, generator=gen, device=device) * np.log10(3000) - 3)
    Y = signal * snr.sqrt() + torch.randn(signal.shape, generator=gen, device=device)
    del signal
    mu, sd = Y[:n_train].mean(0), Y[:n_train].std(0)
    Y = (Y - mu) / sd
    stories = np.repeat(np.arange(n_stories), lengths[:-1])
    X, Y = X.cpu().numpy(), Y.cpu().numpy()
    return X[:n_train], Y[:n_train], X[n_train:], Y[n_train:], stories


def story_folds(stories):
    """5 folds of contiguous stories: (train_idx, val_idx) pairs."""
    ids = np.unique(stories)
    groups = np.array_split(ids, N_FOLDS)
    return [(np.flatnonzero(~np.isin(stories, g)), np.flatnonzero(np.isin(stories, g))) for g in groups]


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device):
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device):
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def run_himalaya(estimator, backend_name, X, Y, Xt, folds, alphas, refit_batch=None):
    """Fit and predict with a himalaya estimator; returns (alphas, predictions, seconds)."""
    from himalaya.backend import set_backend
    from himalaya.kernel_ridge import KernelRidgeCV
    from himalaya.ridge import RidgeCV
    from himalaya.scoring import r2_score

    backend = set_backend(backend_name, on_error="raise")
    params = dict(score_func=r2_score)
    if refit_batch:
        params["n_targets_batch_refit"] = refit_batch
    cls = {"KernelRidgeCV": KernelRidgeCV, "RidgeCV": RidgeCV}[estimator]
    kw = dict(warn=False) if estimator == "KernelRidgeCV" else {}
    device = "cuda" if backend_name == "torch_cuda" else "cpu"
    _sync(device)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(alphas=alphas, cv=folds, solver_params=params, **kw)
        model.fit(X, Y)
        pred = backend.to_numpy(model.predict(Xt))
        best = backend.to_numpy(model.best_alphas_)
    _sync(device)
    return np.asarray(best, dtype=np.float64), np.asarray(pred), time.perf_counter() - t0


def run_bidsenc(X, Y, Xt, Yt, folds, alphas, device, allow_tf32=False):
    from bidsenc.models.ridge import fit_and_score

    _sync(device)
    t0 = time.perf_counter()
    res = fit_and_score(X, Y, Xt, Yt, folds, alphas, device=device, allow_tf32=allow_tf32)
    _sync(device)
    return res, time.perf_counter() - t0


def one_size(cfg, n_features, device, backends, args):
    import torch

    from bidsenc.models.ridge import REFERENCE_ALPHAS, pearson_r, reference_to_alpha, ridge_predict

    alphas = reference_to_alpha(REFERENCE_ALPHAS)
    t0 = time.perf_counter()
    X, Y, Xt, Yt, stories = simulate(cfg["n_train"], cfg["n_test"], n_features, cfg["n_voxels"],
                                     cfg["n_stories"], seed=args.seed, device=device)
    folds = story_folds(stories)
    print(f"\n== {X.shape[0]} training TRs, {Xt.shape[0]} test TRs, {n_features} features, "
          f"{Y.shape[1]} voxels, {len(folds)} folds, {len(alphas)} alphas "
          f"(simulated in {time.perf_counter() - t0:.1f} s)", flush=True)

    # Untimed warm-up on a small slice (library initialisation, kernels, allocator).
    wv = min(200, Y.shape[1])
    run_bidsenc(X, Y[:, :wv], Xt, Yt[:, :wv], folds, alphas, device, args.tf32)
    for b in backends:
        for est in ("KernelRidgeCV", "RidgeCV"):
            run_himalaya(est, b, X, Y[:, :wv], Xt, folds, alphas)
    gc.collect()

    t_ours, timings, peaks = float("inf"), {}, {}
    for rep in range(args.repeat):
        gc.collect()
        _reset_peak(device)
        res, t = run_bidsenc(X, Y, Xt, Yt, folds, alphas, device, args.tf32)
        t_ours = min(t_ours, t)
        peaks["bidsenc"] = _peak_gib(device)
        tf32 = "" if not args.tf32 else f", allow_tf32={args.tf32!r}"
        print(f"bidsenc fit_and_score ({device}, float32{tf32}): {t:.2f} s" +
              (f", peak GPU memory {peaks['bidsenc']:.2f} GiB" if device == "cuda" else ""), flush=True)
        for b in backends:
            for est in ("KernelRidgeCV", "RidgeCV"):
                gc.collect()
                _reset_peak(device)
                try:
                    refit_batch = args.refit_batch if device == "cuda" else None
                    h_alpha, h_pred, t = run_himalaya(est, b, X, Y, Xt, folds, alphas, refit_batch)
                except torch.cuda.OutOfMemoryError as exc:
                    print(f"himalaya {est} ({b}): out of GPU memory ({str(exc).splitlines()[0]})", flush=True)
                    continue
                peak = _peak_gib(device)
                best = min(t, timings[(est, b)][0]) if (est, b) in timings else t
                timings[(est, b)] = (best, h_alpha, h_pred)
                agree = np.mean(np.isclose(res["alphas"], h_alpha, rtol=1e-5))
                print(f"himalaya {est} ({b} backend, float32): {t:.2f} s" +
                      (f", peak GPU memory {peak:.2f} GiB" if device == "cuda" else "") +
                      f"; same alpha as bidsenc for {100 * agree:.2f}% of voxels", flush=True)
                del h_pred
    if args.repeat > 1:
        print(f"best of {args.repeat} interleaved runs: bidsenc {t_ours:.2f} s, " + ", ".join(
            f"{est} ({b}) {v[0]:.2f} s" for (est, b), v in timings.items()))
    if not timings:
        raise SystemExit("no himalaya estimator ran")
    (est, b), (t_peer, h_alpha, h_pred) = min(timings.items(), key=lambda kv: kv[1][0])
    print(f"peer: himalaya {est} on the {b} backend ({t_peer:.2f} s)")

    same = float(np.mean(np.isclose(res["alphas"], h_alpha, rtol=1e-5)))
    r_h = pearson_r(Yt, h_pred)
    # bidsenc's own choice vs himalaya on the test set (information only).
    print(f"voxels choosing the same alpha as himalaya: {100 * same:.3f}% "
          f"({int(round((1 - same) * len(h_alpha)))} differ)")
    print("chosen alphas (bidsenc): " + ", ".join(
        f"{a:.3g}: {n}" for a, n in zip(*np.unique(res['alphas'], return_counts=True))))
    own = np.abs(res["test_r"] - r_h).max()
    print(f"max |test r bidsenc - himalaya| with each side's own alphas: {own:.2e}")
    pred = ridge_predict(X, Y, Xt, h_alpha, device=device)
    dr = float(np.abs(pearson_r(Yt, pred) - r_h).max())
    print(f"max |test r bidsenc - himalaya| with himalaya's alphas: {dr:.2e}; "
          f"median test r {np.median(r_h):.3f}")
    return t_ours, t_peer, dr, same


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--himalaya-backend", default=None,
                        help="himalaya backend(s) to time, comma-separated (default: torch on the CPU, "
                             "torch_cuda on a GPU)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="time each side this many times, interleaved, and keep the fastest (on a shared "
                             "machine; default 1)")
    parser.add_argument("--allow-tf32", choices=["no", "cv", "all"], default="no",
                        help="bidsenc's TF32 setting on CUDA (default: no; the accuracy goals need it off)")
    parser.add_argument("--refit-batch", type=int, default=10000, help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.tf32 = {"no": False, "cv": "cv", "all": True}[args.allow_tf32]
    import os

    import torch

    cfg = (DRY if args.dry_run else SIZES)[args.size]
    device = "cuda" if args.size == "gpu" and not args.dry_run else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--size gpu needs a CUDA GPU (use --dry-run to smoke-test on the CPU)")
    backends = (args.himalaya_backend.split(",") if args.himalaya_backend else
                ["torch_cuda"] if device == "cuda" else ["torch"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", GPU {torch.cuda.get_device_name(0)}" if device == "cuda" else "")
          + ", load average %.1f %.1f %.1f" % os.getloadavg())
    worst = None
    for p in cfg["n_features"]:
        t_ours, t_peer, dr, same = one_size(cfg, p, device, backends, args)
        ratio = t_ours / t_peer
        if worst is None or ratio > worst[0]:
            worst = (ratio, max(dr, worst[1] if worst else 0), t_ours, t_peer)
        else:
            worst = (worst[0], max(dr, worst[1]), worst[2], worst[3])
    ratio, dr, t_ours, t_peer = worst
    print(f"time_ratio={ratio:.3f} max_abs_dr={dr:.2e} bidsenc_s={t_ours:.2f} himalaya_s={t_peer:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

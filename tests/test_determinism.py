"""The same inputs and seed give the same results whatever the memory limit, load or thread count."""

from __future__ import annotations

import numpy as np
import pytest

from bidsenc.align import zscore
from bidsenc.cli.run import main
from bidsenc.models.cv import leave_stories_out
from bidsenc.models.ridge import VOXEL_BATCH, MemoryBudgetError, ridge_cv


def _noisy_problem(n=600, p=40, v=2 * VOXEL_BATCH + 300, seed=0):
    """Mostly noise voxels, whose CV scores at large alphas differ by ~1e-7: the near-ties that flip."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    Y = rng.normal(size=(n, v))
    Y[:, :200] += X @ rng.normal(size=(p, 200)) * 0.05
    return zscore(X).astype(np.float32), zscore(Y).astype(np.float32), np.repeat(np.arange(6), n // 6)


def test_ridge_does_not_depend_on_the_memory_limit():
    X, Y, groups = _noisy_problem()
    folds = leave_stories_out(groups, 5)
    runs = [ridge_cv(X, Y, folds, return_weights=True, mem_gb=mem) for mem in (None, 0.5, 64.0)]
    for other in runs[1:]:
        np.testing.assert_array_equal(other.alphas, runs[0].alphas)
        np.testing.assert_array_equal(other.fold_scores, runs[0].fold_scores)
        np.testing.assert_array_equal(other.weights, runs[0].weights)


def test_a_limit_too_small_is_refused_not_worked_around():
    X, Y, groups = _noisy_problem(v=500)
    with pytest.raises(MemoryBudgetError, match="GiB"):
        ridge_cv(X, Y, leave_stories_out(groups, 5), mem_gb=1e-4)


def test_thread_count_changes_no_alpha_choice():
    """Threads may change the summation order (float tolerance), never the alpha chosen."""
    import torch

    X, Y, groups = _noisy_problem(seed=1)
    folds = leave_stories_out(groups, 5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ridge_cv(X, Y, folds)
        torch.set_num_threads(2)
        two = ridge_cv(X, Y, folds)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(two.cv_scores, one.cv_scores, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(two.alphas, one.alphas)


def test_participant_outputs_are_byte_identical_whatever_mem(demo, tmp_path):
    ds = demo[0] / "ds"
    outputs = []
    for k, extra in enumerate(([], ["--mem", "8GB"], ["--mem", "64GB", "--nprocs", "1"])):
        out = tmp_path / f"out{k}"
        assert main([str(ds), str(out), "participant", "--participant-label", "01", "-w", str(tmp_path / "work"),
                     "--feature", "lowlevel:word_rate", "lowlevel:envelope", "--null-draws", "2",
                     "--data-scaling-seeds", "1", "--n-permutations", "50", "--skip-bids-validation",
                     "--no-reports", *extra]) == 0
        sub = out / "sub-01"
        outputs.append({str(p.relative_to(sub)): p.read_bytes() for p in sorted(sub.rglob("*")) if p.is_file()})
    for other in outputs[1:]:
        assert other.keys() == outputs[0].keys()
        assert [name for name in other if other[name] != outputs[0][name]] == []

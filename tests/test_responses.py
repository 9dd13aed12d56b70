"""Responses read one run at a time into one training matrix, unusable voxels dropped in place,
and ``--mem`` checked against what the run will hold before any response is read."""

from __future__ import annotations

import weakref

import numpy as np
import pytest

from bidsenc.align import AlignSettings, kept_rows
from bidsenc.align.design import clean_run, keep_columns, planned_rows, split_responses
from bidsenc.bids.bold import load_responses, read_responses
from bidsenc.bids.discover import discover, open_dataset
from bidsenc.cli.run import configure, main


@pytest.fixture(scope="module")
def demo_runs(demo, tmp_path_factory):
    root, _ = demo
    cfg = configure([str(root / "ds"), str(tmp_path_factory.mktemp("out")), "participant", "--feature",
                     "lowlevel:word_rate"])
    experiment = discover(open_dataset(cfg), cfg, "01")
    return experiment, load_responses(experiment.runs)[0]


def test_streamed_split_equals_cleaning_each_whole_run(demo_runs):
    experiment, responses = demo_runs
    runs, test = experiment.runs, experiment.repeated_stories
    responses = [y.copy() for y in responses]
    responses[0][5, 7] = np.nan  # a voxel not finite in one run
    responses[2][:, 3] = 100.0   # a voxel constant in another
    settings = AlignSettings(detrend=True, high_pass=0.01)
    resp = split_responses(runs, iter(responses), test, settings)

    # the same, written plainly: every run cleaned whole, rows kept, then the usable columns
    usable = np.logical_and.reduce([np.isfinite(y).all(0) & (np.nan_to_num(y).std(0) > 0) for y in responses])
    cleaned = [clean_run(y, run, settings) for run, y in zip(runs, responses, strict=True)]
    is_test = [any(s.story_id in test for s in run.segments) for run in runs]
    train = np.vstack([c[kept_rows(run, settings, test=False)] for run, c, t in zip(runs, cleaned, is_test,
                                                                                    strict=True) if not t])
    repeats = np.stack([c[kept_rows(run, settings, test=True)] for run, c, t in zip(runs, cleaned, is_test,
                                                                                   strict=True) if t])
    assert not usable[[3, 7]].any() and usable.sum() == len(usable) - 2
    np.testing.assert_array_equal(resp.valid, usable)
    assert resp.train.dtype == np.float32 and resp.train.shape == (len(train), usable.sum())
    np.testing.assert_allclose(resp.train, train[:, usable], atol=2e-6)
    np.testing.assert_allclose(resp.test_repeats, repeats[:, :, usable], atol=2e-6)
    np.testing.assert_allclose(resp.test, repeats[:, :, usable].mean(0), atol=2e-6)
    assert planned_rows(runs, test, settings) == (len(train), len(train) + repeats.size // usable.size + repeats.shape[1])
    assert resp.empty_runs == []


def test_one_raw_run_is_held_at_a_time(demo_runs):
    """Reading run k+1 starts only after run k has been freed (the iterator checks it)."""
    experiment, responses = demo_runs
    alive = []

    def reader():
        for y in responses:
            alive.append(sum(ref() is not None for ref in refs))
            copy = y.copy()
            refs.append(weakref.ref(copy))
            yield copy
            del copy

    refs: list = []
    split_responses(experiment.runs, reader(), experiment.repeated_stories, AlignSettings())
    assert alive == [0] * len(responses)


def test_a_run_with_no_usable_voxel_is_named(demo_runs):
    experiment, responses = demo_runs
    responses = [y.copy() for y in responses]
    responses[1][:] = 0.0
    resp = split_responses(experiment.runs, responses, experiment.repeated_stories, AlignSettings())
    assert resp.empty_runs == [experiment.runs[1].name] and not resp.valid.any()
    assert resp.train.shape[1] == 0


@pytest.mark.parametrize("kept", ["some", "none", "all", "first-and-last"])
def test_keep_columns_packs_the_kept_columns_in_place(kept):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(1000, 301)).astype(np.float32)
    keep = {"some": rng.random(301) > 0.3, "none": np.zeros(301, bool), "all": np.ones(301, bool),
            "first-and-last": np.isin(np.arange(301), [0, 300])}[kept]
    expected = a[:, keep].copy()
    out = keep_columns(a, keep)
    np.testing.assert_array_equal(out, expected)
    assert out.flags.c_contiguous and out.flags.owndata and out is a  # no second matrix was made
    view = np.ones((10, 20))[:, :15]  # not its own memory: a plain copy
    np.testing.assert_array_equal(keep_columns(view, keep[:15]), view[:, keep[:15]])


def test_the_reader_checks_headers_first_and_reads_lazily(demo_runs, tmp_path):
    experiment, responses = demo_runs
    space, runs = read_responses(experiment.runs)
    assert space.n_voxels == responses[0].shape[1]
    first = next(runs)
    np.testing.assert_array_equal(first, responses[0])
    assert sum(1 for _ in runs) == len(responses) - 1


@pytest.mark.parametrize("mask", [False, True])
def test_mem_too_small_for_the_responses_is_refused_before_they_are_read(demo, tmp_path, capfd, monkeypatch, mask):
    """--mem is checked against the process, the float32 responses and a run being read, before any is read.

    With a mask file, the voxels are known from headers and the check comes before any
    feature is extracted; with a mask computed from the EPI, in the fit, before the responses.
    """
    from bidsenc import fit

    root, _ = demo
    read = []
    real = fit.split_responses
    monkeypatch.setattr(fit, "split_responses", lambda *a, **k: read.append(1) or real(*a, **k))
    monkeypatch.setattr(fit, "_resident_bytes", lambda: 10**9)  # the process holds 1 GB, whatever the test runner
    out, work = tmp_path / "out", tmp_path / "work"
    extra = ["--mask", str(root / "truth" / "sub-01_mask.nii.gz")] if mask else []
    code = main([str(root / "ds"), str(out), "participant", "--participant-label", "01", "--feature",
                 "lowlevel:word_rate", "--mem", "1.5GB", "--skip-bids-validation", "--no-reports", "-w", str(work),
                 *extra])
    err = capfd.readouterr().err
    assert code == 64 and read == []
    line = [x for x in err.splitlines() if "--mem 1.5 GB is too small for sub-01" in x]
    assert len(line) == 1 and "the process holds 1.0 GB now" in line[0] and "its responses take" in line[0]
    assert "give --mem of at least" in line[0]
    assert "Traceback" not in err and not list(out.glob("sub-01/func/*"))
    cached = list((work / "feature-cache").rglob("layer-*.npy"))
    assert (cached == []) == mask  # refused before features when the mask is known

"""Scores that survive a null on drifting data: filtering, buffered blocks, the misaligned-stimulus null.

Real story-listening BOLD is dominated by slow drift. Unfiltered, features with slow
structure of their own "predict" it, so a misaligned stimulus scores almost as well
as the real one, and the circular-shift p-values of such fits are anti-conservative.
These tests build that situation (tests/builders.make_drifting_story: one 12-minute
story, random-walk and cosine drift three times the size of a small word-rate
effect) and check the defaults against it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from bidsenc.align import AlignSettings, temporal_filter
from bidsenc.align.design import features_for, split_responses
from bidsenc.bids.experiment import BoldSource, Run, Segment
from bidsenc.cli.run import main as bidsenc
from bidsenc.models.cv import buffer_rows, contiguous_blocks, leave_stories_out
from bidsenc.models.encoding import circular_shift_blocks, evaluate_layer_outer
from bidsenc.models.ridge import DEFAULT_ALPHAS

sys.path.insert(0, str(Path(__file__).parent))
from builders import make_drifting_story  # noqa: E402


@pytest.fixture(scope="module")
def drift_runs(tmp_path_factory):
    """The aligned and the misaligned (+60 s) story, each fitted with the defaults; and without the filter."""
    from bidsenc.derivatives import read_participant

    root = tmp_path_factory.mktemp("drift")
    out = {}
    for name, shift, extra in (("aligned", 0.0, []), ("misaligned", 60.0, []),
                               ("misaligned-unfiltered", 60.0, ["--high-pass", "none"])):
        ds = root / name / "ds"
        make_drifting_story(ds, shift=shift)
        code = bidsenc([str(ds), str(root / name / "out"), "participant", "--feature", "lowlevel:word_rate",
                        "--skip-bids-validation", "--no-reports", "-w", str(root / "work"), *extra])
        assert code == 0
        log = next((root / name / "out" / "logs").glob("*/bidsenc.log")).read_text()
        out[name] = (read_participant(root / name / "out", "01"), log, root / name / "out")
    return out


def test_default_recovers_the_effect_and_beats_its_null(drift_runs):
    result, log, outputs = drift_runs["aligned"]
    model = result.models[0]
    r = model.stat("r")
    assert r.mean() > 0.07
    assert model.null_r.shape == (5, result.valid.sum())
    assert r.mean() > model.null_r.mean(1).max() + 0.05
    assert (r > np.quantile(model.null_r, 0.95)).mean() > 0.3
    assert model.fdr.mean() > 0.1  # p-values against the pooled null of 5 draws: calibrated, less powerful
    assert model.selection["method"] == "nested" and "misaligned-stimulus null" in model.pvalue_method
    assert "not clearly above a misaligned stimulus" not in log
    assert "cosine high-pass at 0.007812 Hz (128 s)" in result.responses["cleaning"]
    assert result.responses["high_pass_hz"] == pytest.approx(1 / 128)
    # every voxel of this small image is fitted: no EPI brain mask for 900 voxels
    assert result.valid.all() and "too small for an EPI brain mask" in result.responses["mask"]
    # the outputs derive from the source dataset and keep its license
    import json

    description = json.loads((outputs / "dataset_description.json").read_text())
    assert description["License"] == "CC-BY-4.0" and "CC-BY-4.0" in description["HowToAcknowledge"]


def test_misaligned_stimulus_scores_near_zero_with_calibrated_p_values(drift_runs):
    result, log, _ = drift_runs["misaligned"]
    model = result.models[0]
    assert abs(model.stat("r").mean()) < 0.06
    assert (model.pvalue < 0.05).mean() <= 0.08  # about 5 % by chance, not more
    assert model.fdr.sum() <= 0.01 * len(model.fdr)
    assert (model.stat("r") > np.quantile(model.null_r, 0.95)).mean() < 0.15  # the null holds its level
    assert "not clearly above a misaligned stimulus" in log
    assert "fall after the run's last volume" in log  # the onset moved the story's end past the scan
    # the same data unfiltered: drift scores, and the null (the stimulus rotated, the design rebuilt) shows it,
    # so nothing is declared significant either
    unfiltered, unfiltered_log = drift_runs["misaligned-unfiltered"][:2]
    unfiltered = unfiltered.models[0]
    assert np.quantile(unfiltered.null_r, 0.95) > 3 * np.quantile(model.null_r, 0.95)
    assert unfiltered.fdr.sum() <= 0.01 * len(unfiltered.fdr)
    assert "not clearly above a misaligned stimulus" in unfiltered_log


def _single_story(n_vol=360, tr=2.0):
    run = Run("sub-01_task-story", {}, tr, n_vol, tr / 2, BoldSource("nifti", (Path("bold.nii.gz"),)),
              (Segment("story", 4.0),))
    return run


def test_random_walk_features_fit_drift_only_without_the_high_pass():
    """Features with no stimulus information at all: 0.5 unfiltered, near 0 with the default filter."""
    rng = np.random.default_rng(0)
    run = _single_story()
    times = np.arange(0, 710, 0.5)
    features = np.cumsum(rng.normal(0, 1, (len(times), 32)), axis=0)
    walk = np.cumsum(rng.normal(0, 1, (run.n_volumes, 300)), axis=0)
    y = (2 * (walk - walk.mean(0)) / walk.std(0) + rng.normal(0, 1, walk.shape)).astype(np.float32)
    gap = buffer_rows(run.tr, 8.0)
    mean_r = {}
    for high_pass in (0.0, 1 / 128):
        settings = AlignSettings(detrend=True, high_pass=high_pass)
        resp = split_responses([run], [y], [], settings)
        x, _ = features_for(resp, {"story": (times, features)}, settings)
        folds = leave_stories_out(resp.train_groups, 5, 0, gap)

        fit = evaluate_layer_outer(0, x, resp.train, resp.train_groups, folds, np.asarray(DEFAULT_ALPHAS), gap=gap)
        mean_r[high_pass] = fit.test_r.mean()
    assert mean_r[0.0] > 0.3
    assert abs(mean_r[1 / 128]) < 0.1


def test_high_pass_removes_slow_cosines_and_keeps_the_band_of_language_responses():
    tr, n = 2.0, 300
    t = np.arange(n) * tr
    slow = np.cos(2 * np.pi * t / 400)  # 0.0025 Hz, below 1/128
    fast = np.sin(2 * np.pi * 0.05 * t)  # 20 s period
    x = np.stack([slow, fast, slow + fast], axis=1)
    out = temporal_filter(x, tr, AlignSettings(detrend=True, high_pass=1 / 128))
    assert np.abs(out[:, 0]).max() < 0.05
    assert np.corrcoef(out[:, 1], fast)[0, 1] > 0.99
    np.testing.assert_allclose(out[:, 2], out[:, 0] + out[:, 1], atol=1e-10)  # linear: the same filter for all
    np.testing.assert_array_equal(temporal_filter(x, tr, AlignSettings()), x)  # no cleaning asked: unchanged


def test_features_and_responses_get_the_same_filter():
    """A response that equals a delayed feature column stays equal to it after cleaning."""
    rng = np.random.default_rng(1)
    run = _single_story(n_vol=200)
    times = np.arange(0, 400, 0.5)
    feature = np.cumsum(rng.normal(0, 1, (len(times), 1)), axis=0)
    settings = AlignSettings(detrend=True, high_pass=1 / 128)
    from bidsenc.align import delay, run_features

    raw = delay(run_features(run, {"story": (times, feature)}, settings), settings.delay_trs(run.tr))
    y = raw[:, [2]].astype(np.float32) + 50.0 + 0.01 * np.arange(run.n_volumes)[:, None]  # plus a trend
    resp = split_responses([run], [y], [], settings)
    x, _ = features_for(resp, {"story": (times, feature)}, settings)
    assert np.corrcoef(x[:, 2], resp.train[:, 0])[0, 1] > 0.9999


def test_single_story_blocks_leave_a_buffer_of_the_longest_delay_plus_10_s():
    assert buffer_rows(2.0, 8.0) == 9 and buffer_rows(1.5, 9.0) == 13
    folds = leave_stories_out(np.zeros(300, int), 5, 0, gap=9)
    held_out_twice = np.zeros(300, int)
    for train, test in folds:
        held_out_twice[test] += 1
        distance = np.abs(train[:, None] - test[None, :]).min()
        assert distance == 10  # 9 rows left out between them
    assert (held_out_twice == 1).all()  # every row scored exactly once
    with pytest.raises(Exception, match="9 volumes left out on each side"):
        contiguous_blocks(100, 5, gap=9)


def test_reference_preset_scores_a_single_story_on_the_same_buffered_blocks(drift_runs, tmp_path):
    import json

    ds = tmp_path / "ds"
    make_drifting_story(ds, minutes=8)
    code = bidsenc([str(ds), str(tmp_path / "out"), "participant", "--feature", "lowlevel:word_rate",
                    "--preset", "reference", "--null-draws", "0", "--skip-bids-validation", "--no-reports",
                    "-w", str(tmp_path / "work")])
    assert code == 0
    sidecar = json.loads(next((tmp_path / "out").rglob("*_desc-responses_encoding.json")).read_text())
    assert "contiguous blocks of the single story, 9 volumes (18 s) left out" in sidecar["scoring"]
    assert "high-pass" not in sidecar["cleaning"] and "the features are not filtered" in sidecar["cleaning"]


def test_circular_shift_keeps_each_story_and_misaligns_it():
    rng = np.random.default_rng(0)
    x = np.arange(100, dtype=float)[:, None]
    groups = np.repeat([0, 1], [60, 40])
    shifted = circular_shift_blocks(x, groups, rng)
    for g in (0, 1):
        block, moved = x[groups == g, 0], shifted[groups == g, 0]
        assert sorted(moved) == sorted(block)  # the same rows, in the same story
        lag = int(np.flatnonzero(moved == block[0])[0])
        assert 0.2 * len(block) <= lag <= 0.8 * len(block)
        np.testing.assert_array_equal(np.roll(block, lag), moved)


def test_mask_is_checked_before_features_and_chooses_the_voxels(tmp_path, capsys):
    import nibabel as nib

    from bidsenc.bids.bold import load_responses
    from bidsenc.bids.discover import discover, open_dataset
    from bidsenc.cli.run import configure

    ds = tmp_path / "ds"
    make_drifting_story(ds, minutes=3)
    wrong = tmp_path / "wrong_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), wrong)
    code = bidsenc([str(ds), str(tmp_path / "out"), "participant", "--feature", "lowlevel:word_rate", "--mask",
                    str(wrong), "--skip-bids-validation", "--no-reports", "-w", str(tmp_path / "work")])
    assert code == 65
    assert "--mask wrong_mask.nii.gz (4x4x4) is not on the voxel grid of sub-01_task-story_bold.nii.gz (10x10x9)" \
        in capsys.readouterr().err
    assert not (tmp_path / "work" / "feature-cache").exists()  # refused before any feature was computed
    right = tmp_path / "mask.nii.gz"
    chosen = np.zeros((10, 10, 9), np.uint8)
    chosen[2:5, 3:7, 1] = 1
    nib.save(nib.Nifti1Image(chosen, np.eye(4)), right)
    cfg = configure([str(ds), str(tmp_path / "out"), "participant", "--mask", str(right)])
    experiment = discover(open_dataset(cfg), cfg, "01")
    responses, space = load_responses(experiment.runs, cfg.inputs.mask)
    assert space.n_voxels == 12 and responses[0].shape[1] == 12 and space.mask_source == "mask.nii.gz"


def test_small_problems_are_fitted_on_one_thread(tmp_path, monkeypatch):
    """BLAS thread pools stall on small problems under load: one thread below SMALL_PROBLEM_ELEMENTS."""
    import torch
    from threadpoolctl import threadpool_info

    from bidsenc import fit
    from bidsenc.bids.discover import discover, open_dataset
    from bidsenc.cli.run import configure

    seen = []
    monkeypatch.setattr(fit, "SMALL_PROBLEM_ELEMENTS", 50_000)  # 900 voxels x 38 volumes below, 3,600 above
    monkeypatch.setattr(fit, "_fit_participant", lambda *a: seen.append(
        (torch.get_num_threads(), max(p["num_threads"] for p in threadpool_info()))))
    before = torch.get_num_threads()
    for shape, expected in (((10, 10, 9), 1), ((20, 20, 9), before)):
        ds = tmp_path / f"ds{shape[0]}"
        make_drifting_story(ds, minutes=1, shape=shape)
        cfg = configure([str(ds), str(tmp_path / "out"), "participant"])
        fit.fit_participant(cfg, discover(open_dataset(cfg), cfg, "01"), [], "cpu")
        assert seen[-1][0] == expected and (seen[-1][1] == 1) == (expected == 1)
    assert torch.get_num_threads() == before  # restored


def test_region_time_series_get_a_report_that_draws_them(tmp_path):
    """Six 'voxels' (regions stored as a tiny image): fitted, scored by outer CV, drawn as bars."""
    import re

    from bidsenc.derivatives import read_participant

    ds = tmp_path / "ds"
    make_drifting_story(ds, minutes=6, shape=(3, 2, 1))
    code = bidsenc([str(ds), str(tmp_path / "out"), "participant", "--feature", "lowlevel:word_rate",
                    "--null-draws", "2", "--skip-bids-validation", "-w", str(tmp_path / "work")])
    assert code == 0
    result = read_participant(tmp_path / "out", "01")
    assert result.valid.sum() == 6
    assert np.isnan(result.models[0].stat("cc_norm")).all()  # no ceiling: missing, not 0
    report = (tmp_path / "out" / "sub-01.html").read_text()
    assert "outer-CV r" in report and "mean outer-CV r" in report
    pictures = re.findall(r'<img[^>]+alt="([^"]*)"', report)
    assert any("layer 0: outer-CV r" in alt for alt in pictures)

"""fMRIPrep confounds, by name, regressed out of each run (on the real nilearn confounds table)."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from bidsenc.align import AlignSettings, kept_rows
from bidsenc.align.design import clean_run, split_responses
from bidsenc.bids.bold import load_confounds
from bidsenc.bids.discover import discover, open_dataset
from bidsenc.cli.run import configure
from bidsenc.errors import DataError, MissingInputError
from builders import make_fmriprep
from conftest import shared

TABLE = ("nifti-small", "nilearn", "test-v21_desc-confounds_timeseries.tsv")


@pytest.fixture
def fmriprep_run(tmp_path):
    root = tmp_path / "ds"
    make_fmriprep(root, spaces=("MNI152NLin2009cAsym",), n_volumes=30)
    shutil.copy(shared(*TABLE), root / "derivatives" / "fmriprep" / "sub-01" / "func"
                / "sub-01_task-story_desc-confounds_timeseries.tsv")
    cfg = configure([str(root), str(tmp_path / "out"), "participant", "--feature", "lm:m", "--confounds",
                     "trans_?", "rot_?", "framewise_displacement"])
    return cfg, discover(open_dataset(cfg), cfg, "01").runs[0]


def test_confounds_are_found_and_selected_by_pattern(fmriprep_run):
    cfg, run = fmriprep_run
    assert run.bold.confounds.name == "sub-01_task-story_desc-confounds_timeseries.tsv"
    x = load_confounds(run, cfg.models.confounds)
    table = pd.read_csv(shared(*TABLE), sep="\t", na_values="n/a")
    names = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "framewise_displacement"]
    assert set(table.columns) >= set(names) and x.shape == (30, 7)
    assert np.allclose(x[:, :6], table[names[:6]].to_numpy())
    assert load_confounds(run, ("trans_*",)).shape == (30, 12)  # with derivatives and squares
    fd = table["framewise_displacement"]
    assert np.isnan(fd.iloc[0]) and np.isclose(x[0, 6], fd.mean()) and np.allclose(x[1:, 6], fd.iloc[1:])


def test_confounds_are_regressed_out_of_the_responses(fmriprep_run):
    cfg, run = fmriprep_run
    x = load_confounds(run, cfg.models.confounds)
    signal = np.random.default_rng(0).normal(size=(30, 3))
    motion = (x[:, 0] - x[:, 0].mean()) / x[:, 0].std()
    y = (signal + 5 * motion[:, None]).astype(np.float32)
    settings = AlignSettings(detrend=True)
    cleaned = clean_run(y, run, settings, confounds=x)
    assert np.abs(np.corrcoef(y.T, motion)[-1, :-1]).min() > 0.9
    assert np.abs(np.corrcoef(cleaned.T, motion)[-1, :-1]).max() < 1e-6  # orthogonal to every confound
    # and split_responses passes each run's confounds on to the cleaning
    kept = split_responses([run], [y], [], settings, confounds=[x])
    assert np.allclose(kept.train, cleaned[kept_rows(run, settings, test=False)], atol=1e-5)


def test_bad_confounds_are_clear_errors(fmriprep_run):
    cfg, run = fmriprep_run
    with pytest.raises(DataError, match="no confound column matches 'motion_outlier99'"):
        load_confounds(run, ("motion_outlier99",))
    run.bold.confounds.unlink()
    import dataclasses

    bare = dataclasses.replace(run, bold=dataclasses.replace(run.bold, confounds=None))
    with pytest.raises(MissingInputError, match="--confounds needs fMRIPrep's"):
        load_confounds(bare, ("trans_x",))

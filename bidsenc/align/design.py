"""Training and test sets of one participant: responses and delayed features, row for row.

The test set is the stories heard more than once (responses averaged over the
repeats, each repeat cleaned and z-scored on its own); everything else trains.
Rows of the training set carry the story they belong to, for leave-stories-out
cross-validation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..bids.experiment import Run
from ..errors import DataError
from . import AlignSettings, constant_columns, delay_concatenated, kept_rows, run_design, temporal_filter, zscore

log = logging.getLogger(__name__)


@dataclass
class Responses:
    """Cleaned, z-scored responses of every run, split into training and test rows."""

    train: np.ndarray                # [n_train, V]
    train_groups: np.ndarray         # story id index per training row
    story_names: list[str]           # names of the training groups
    test: np.ndarray | None          # [n_test, V] mean over repeats
    test_repeats: np.ndarray | None  # [R, n_test, V]
    valid: np.ndarray                # voxels with finite, non-constant responses in every run
    train_runs: list[Run] = field(default_factory=list)
    test_runs: list[Run] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def clean_run(y: np.ndarray, run: Run, settings: AlignSettings, confounds: np.ndarray | None = None) -> np.ndarray:
    """Temporal filtering (as the design gets it) and confound regression, then z-scoring per voxel."""
    return zscore(np.nan_to_num(temporal_filter(y, run.tr, settings, confounds), nan=0.0))


def split_responses(runs: list[Run], responses: list[np.ndarray], test_stories: list[str],
                    settings: AlignSettings, *, confounds: list[np.ndarray | None] | None = None) -> Responses:
    """Clean each run (regressing out its ``confounds``, if given), trim it and build the training and test sets."""
    valid = np.ones(responses[0].shape[1], dtype=bool)
    cleaned = []
    for i, (run, y) in enumerate(zip(runs, responses, strict=True)):
        if y.shape[0] != run.n_volumes:
            raise DataError(f"{run.name}: {y.shape[0]} volumes read, {run.n_volumes} expected")
        finite = np.isfinite(y).all(0)
        valid &= finite & ~constant_columns(np.where(finite, y, 0.0))
        # float32 at once: all runs' float64 copies together were the run's peak memory (3x the responses)
        cleaned.append(clean_run(y, run, settings, confounds[i] if confounds else None).astype(np.float32))

    train_runs = [r for r in runs if not _is_test(r, test_stories)]
    test_runs = [r for r in runs if _is_test(r, test_stories)]
    names = sorted({seg.story_id for r in train_runs for seg in r.segments})
    train_rows, groups = [], []
    for run, y in zip(runs, cleaned, strict=True):
        if run in train_runs:
            rows = kept_rows(run, settings, test=False)
            train_rows.append(_take(y, rows))
            groups.append(np.full(len(rows), names.index(run.segments[0].story_id)))
    test = repeats = None
    notes = []
    if test_runs:
        blocks, used = [], []
        reference = test_runs[0]
        for run, y in zip(runs, cleaned, strict=True):
            if run not in test_runs:
                continue
            if not _same_timing(run, reference):
                notes.append(f"{run.name} presents the test story with other timing than {reference.name}; "
                             "left out of the repeat average")
                continue
            blocks.append(_take(y, kept_rows(run, settings, test=True)))
            used.append(run)
        n = min(len(b) for b in blocks)
        if any(len(b) != n for b in blocks):
            notes.append(f"test repeats differ in length; the first {n} volumes of each are used")
        repeats = np.stack([b[:n] for b in blocks]).astype(np.float32, copy=False)
        test = repeats.mean(0)
        test_runs = used
    for note in notes:
        log.warning(note)
    return Responses(np.vstack(train_rows).astype(np.float32, copy=False), np.concatenate(groups), names, test, repeats,
                     valid, train_runs, test_runs, notes)


def _take(y: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``y[rows]``, as a view when the rows are consecutive (trimming keeps a contiguous range)."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return y[rows[0]:rows[-1] + 1]
    return y[rows]


def features_for(responses: Responses, story_features: dict, settings: AlignSettings) -> tuple:
    """Training and test design matrices (float32) matching :func:`split_responses`' rows."""
    def block(runs, test):
        parts = [run_design(run, story_features, settings, test) for run in runs]
        if settings.preset == "reference":
            return delay_concatenated(parts, settings, runs[0].tr)
        return np.vstack(parts)

    x_train = block(responses.train_runs, False).astype(np.float32)
    if len(x_train) != len(responses.train):
        raise DataError(f"training features have {len(x_train)} rows but responses {len(responses.train)}")
    x_test = None
    if responses.test_runs:
        x_test = block(responses.test_runs[:1], True).astype(np.float32)[: len(responses.test)]
        if len(x_test) != len(responses.test):
            raise DataError(f"{responses.test_runs[0].name}: test features have {len(x_test)} rows, "
                            f"responses {len(responses.test)}")
    return x_train, x_test


def _is_test(run: Run, test_stories: list[str]) -> bool:
    return any(seg.story_id in test_stories for seg in run.segments)


def _same_timing(a: Run, b: Run) -> bool:
    return (a.tr == b.tr and a.trimmed_start == b.trimmed_start and
            [(s.story_id, round(s.onset, 2)) for s in a.segments] ==
            [(s.story_id, round(s.onset, 2)) for s in b.segments])


__all__ = ["Responses", "clean_run", "features_for", "split_responses", "zscore"]

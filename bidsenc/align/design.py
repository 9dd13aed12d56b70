"""Training and test sets of one participant: responses and delayed features, row for row.

The test set is the stories heard more than once (responses averaged over the
repeats, each repeat cleaned and z-scored on its own); everything else trains.
Rows of the training set carry the story they belong to, for leave-stories-out
cross-validation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .._arrays import usable_columns
from ..bids.experiment import Run
from ..errors import DataError
from . import AlignSettings, delay_concatenated, kept_rows, run_design, temporal_filter, zscore

log = logging.getLogger(__name__)


@dataclass
class Responses:
    """Cleaned, z-scored responses of the usable voxels, split into training and test rows.

    Columns are the voxels of ``valid`` only (finite and not constant in every run);
    ``valid`` maps them back to the participant's space.
    """

    train: np.ndarray                # [n_train, n_valid] float32
    train_groups: np.ndarray         # story id index per training row
    story_names: list[str]           # names of the training groups
    test: np.ndarray | None          # [n_test, n_valid] mean over repeats
    test_repeats: np.ndarray | None  # [R, n_test, n_valid]
    valid: np.ndarray                # [n_voxels] voxels with finite, non-constant responses in every run
    train_runs: list[Run] = field(default_factory=list)
    test_runs: list[Run] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Runs in which no voxel is usable (all constant, e.g. all zero, or not finite).
    empty_runs: list[str] = field(default_factory=list)


#: Response values (volumes x voxels) cleaned in one piece: runs are cleaned in column chunks of
#: about this size, so that the float64 working copies of the filters stay small (16 MiB each).
CLEAN_CHUNK_ELEMENTS = 2**21


def clean_run(y: np.ndarray, run: Run, settings: AlignSettings, confounds: np.ndarray | None = None) -> np.ndarray:
    """Temporal filtering (as the design gets it) and confound regression, then z-scoring per voxel."""
    return zscore(np.nan_to_num(temporal_filter(y, run.tr, settings, confounds), nan=0.0))


def planned_rows(runs: list[Run], test_stories: list[str], settings: AlignSettings) -> tuple[int, int]:
    """Rows of responses :func:`split_responses` will keep: training rows, and all rows (with test repeats and mean)."""
    train = sum(len(kept_rows(r, settings, test=False)) for r in runs if not _is_test(r, test_stories))
    test = [len(kept_rows(r, settings, test=True)) for r in runs if _is_test(r, test_stories)]
    return train, train + sum(test) + max(test, default=0)


def split_responses(runs: list[Run], responses: Iterable[np.ndarray], test_stories: list[str],
                    settings: AlignSettings, *, confounds: list[np.ndarray | None] | None = None) -> Responses:
    """Clean each run (regressing out its ``confounds``, if given), trim it and build the training and test sets.

    ``responses`` may be an iterator that reads the runs one at a time (see
    :func:`bidsenc.bids.bold.read_responses`): each run is cleaned, in column chunks,
    straight into its rows of one preallocated training matrix and then dropped, so the
    peak memory is the training set plus one run, not every run two or three times over.
    The columns of voxels unusable in some run are then removed in place.
    """
    train_runs = [r for r in runs if not _is_test(r, test_stories)]
    test_runs = [r for r in runs if _is_test(r, test_stories)]
    names = sorted({seg.story_id for r in train_runs for seg in r.segments})
    starts = np.cumsum([0] + [len(kept_rows(r, settings, test=False)) for r in train_runs])
    groups = np.concatenate([np.full(starts[i + 1] - starts[i], names.index(r.segments[0].story_id))
                             for i, r in enumerate(train_runs)] or [np.zeros(0, int)])
    reference = test_runs[0] if test_runs else None
    train_index = {id(r): k for k, r in enumerate(train_runs)}
    train = valid = None
    blocks, used, notes, empty = [], [], [], []
    responses = iter(responses)  # next() by hand: a zip would hold the previous run while reading the next
    for i, run in enumerate(runs):
        y = next(responses, None)
        if y is None:
            raise ValueError(f"responses of {len(runs)} runs expected, {i} given")
        if y.shape[0] != run.n_volumes:
            raise DataError(f"{run.name}: {y.shape[0]} volumes read, {run.n_volumes} expected")
        if train is None:
            train = np.empty((starts[-1], y.shape[1]), dtype=np.float32)
            valid = np.ones(y.shape[1], dtype=bool)
        elif y.shape[1] != train.shape[1]:
            raise DataError(f"{run.name}: {y.shape[1]} voxels, earlier runs {train.shape[1]}")
        conf = confounds[i] if confounds else None
        if id(run) in train_index:
            k = train_index[id(run)]
            usable = _clean_into(train[starts[k]:starts[k + 1]], y, kept_rows(run, settings, test=False), run,
                                 settings, conf)
        elif _same_timing(run, reference):
            rows = kept_rows(run, settings, test=True)
            blocks.append(np.empty((len(rows), y.shape[1]), dtype=np.float32))
            used.append(run)
            usable = _clean_into(blocks[-1], y, rows, run, settings, conf)
        else:
            notes.append(f"{run.name} presents the test story with other timing than {reference.name}; "
                         "left out of the repeat average")
            usable = usable_columns(y)
        del y  # the next run is read while this name would still hold this one
        if not usable.any():
            empty.append(run.name)
        valid &= usable
    test = repeats = None
    if blocks:
        n = min(len(b) for b in blocks)
        if any(len(b) != n for b in blocks):
            notes.append(f"test repeats differ in length; the first {n} volumes of each are used")
        repeats = np.empty((len(blocks), n, int(valid.sum())), dtype=np.float32)
        for r in range(len(blocks)):  # each repeat freed once copied: no second set of them alive
            repeats[r], blocks[r] = blocks[r][:n, valid], None
        test = repeats.mean(0)
        test_runs = used
    for note in notes:
        log.warning(note)
    return Responses(keep_columns(train, valid), groups, names, test, repeats, valid, train_runs, test_runs, notes,
                     empty)


def _clean_into(out: np.ndarray, y: np.ndarray, rows: np.ndarray, run: Run, settings: AlignSettings,
                confounds: np.ndarray | None) -> np.ndarray:
    """``out[:] = clean_run(y)[rows]``, column chunk by column chunk; returns the run's usable columns.

    Cleaning is column by column (filters and confound regression act on each voxel's
    series alone), so the chunks give the whole run's result; their width is fixed by the
    run's length, never by the free memory.
    """
    usable = np.empty(y.shape[1], dtype=bool)
    step = max(1, CLEAN_CHUNK_ELEMENTS // max(1, len(y)))
    for a in range(0, y.shape[1], step):
        chunk = y[:, a:a + step]
        usable[a:a + step] = usable_columns(chunk)
        out[:, a:a + step] = clean_run(chunk, run, settings, confounds)[rows]
    return usable


def keep_columns(a: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``a[:, keep]`` for a C-ordered matrix, computed in ``a``'s own memory, which is then shrunk.

    A copy of the training set would double the peak memory for the sake of a few
    dropped voxels: the kept columns are instead packed row after row at the front of
    ``a``'s buffer (row ``i`` goes where rows before it were, never over rows still to
    be read), and the buffer is reallocated to the smaller size. ``a`` must own its data,
    with no other view of it alive; it is not usable afterwards.
    """
    if keep.all():
        return a
    if not (a.flags.owndata and a.flags.c_contiguous):
        return a[:, keep]
    n, k = len(a), int(keep.sum())
    flat = a.reshape(-1)
    step = max(1, CLEAN_CHUNK_ELEMENTS // max(1, a.shape[1]))
    for i in range(0, n, step):
        j = min(n, i + step)
        flat[i * k:j * k] = a[i:j, keep].reshape(-1)  # the fancy index copies rows i..j before they are written
    del flat
    a.resize((n, k), refcheck=False)  # keeps the first n*k values, in order
    return a


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


__all__ = ["Responses", "clean_run", "features_for", "keep_columns", "planned_rows", "split_responses", "zscore"]

"""Cross-validation splits that respect the structure of story-listening data."""

from __future__ import annotations

import numpy as np

from ..errors import DataError


def leave_stories_out(groups: np.ndarray, n_folds: int = 5, seed: int = 0,
                      gap: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """Folds that hold out whole stories: no story is split between training and validation.

    Stories are shuffled with ``seed`` and dealt into ``min(n_folds, n_stories)`` folds.
    With a single story, contiguous blocks of it are held out instead, with ``gap``
    rows removed from training on each side of the held-out block so that the delayed
    features and slow responses do not leak across (see :func:`contiguous_blocks` and
    :func:`buffer_rows`).
    """
    stories = np.unique(groups)
    if len(stories) == 1:
        return contiguous_blocks(len(groups), n_folds, gap)
    rng = np.random.default_rng(seed)
    order = rng.permutation(stories)
    k = min(n_folds, len(stories))
    folds = []
    for f in range(k):
        held = np.isin(groups, order[f::k])
        folds.append((np.flatnonzero(~held), np.flatnonzero(held)))
    return folds


def buffer_rows(tr: float, longest_delay_s: float, extra_s: float = 10.0) -> int:
    """Rows to leave out between training and held-out blocks of one story: the longest delay plus 10 s.

    A held-out row's delayed features reach ``longest_delay_s`` back into the training
    rows before it, and the hemodynamic response and slow drift carry on for seconds
    after; both would let training rows next to the block predict it.
    """
    return int(np.ceil((longest_delay_s + extra_s) / tr - 1e-9))


def contiguous_blocks(n_rows: int, n_folds: int = 5, gap: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """Contiguous validation blocks with ``gap`` rows dropped from training on each side."""
    if n_rows < n_folds * (2 * gap + 5):
        raise DataError(f"too little data to cross-validate: {n_rows} training volumes in one story "
                        f"(need at least {n_folds * (2 * gap + 5)} for {n_folds} folds with {gap} volumes left "
                        "out on each side of a held-out block)")
    edges = np.linspace(0, n_rows, n_folds + 1).astype(int)
    folds = []
    rows = np.arange(n_rows)
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        val = rows[a:b]
        train = rows[(rows < a - gap) | (rows >= b + gap)]
        folds.append((train, val))
    return folds


#: The reference's bootstrap (the ds003020 encoding script's defaults): 50 bootstraps of 40-TR chunks.
REFERENCE_BOOTSTRAPS = 50
REFERENCE_CHUNK_LEN = 40
#: Share of the chunks held out per bootstrap when their number is not given (the script's 125 of
#: the ~675 40-TR chunks of its training data is 18.5%).
DEFAULT_HELD_OUT = 0.2


def bootstrap_chunks(n_rows: int, n_boots: int = REFERENCE_BOOTSTRAPS, chunk_len: int = REFERENCE_CHUNK_LEN,
                     n_chunks: int | None = None, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The reference's validation splits: random chunks of ``chunk_len`` consecutive rows held out.

    As in the reference's ``bootstrap_ridge``: the rows are cut into consecutive chunks of
    ``chunk_len`` from row 0 (a last, shorter remainder is never held out), and each of
    ``n_boots`` splits holds out ``n_chunks`` chunks drawn at random without replacement;
    every other row trains.  Rows next to a held-out chunk are not separated from
    training, and chunks may be held out in several splits (a bootstrap, not a partition).
    The draws use numpy's generator seeded with ``seed``, not the reference's
    ``random.shuffle``: give the reference's own held-out chunks as folds to reproduce a
    particular run.

    Parameters
    ----------
    n_rows : int
        Training rows (TRs).
    n_boots : int
        Number of splits (the reference's ``nboots``).
    chunk_len : int
        Rows per chunk (``chunklen``).
    n_chunks : int, optional
        Chunks held out per split (``nchunks``); default 20% of the chunks, at least one.
    seed : int
        Seed of the draws.

    Returns
    -------
    list of (train_idx, val_idx)
        Sorted integer row indices of each split.
    """
    for name, value in (("n_boots", n_boots), ("chunk_len", chunk_len)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    total = n_rows // chunk_len
    if n_chunks is None:
        n_chunks = max(1, int(round(total * DEFAULT_HELD_OUT)))
    if total < 2 or not 1 <= n_chunks < total:
        raise DataError(f"too little data for the reference bootstrap: {n_rows} training volumes make {total} "
                        f"chunks of {chunk_len}, and {n_chunks} of them would be held out; lower "
                        "--bootstrap-chunk-len or --bootstrap-chunks")
    rng = np.random.default_rng(seed)
    folds = []
    for _ in range(n_boots):
        held = np.sort(rng.choice(total, size=n_chunks, replace=False))
        val = (held[:, None] * chunk_len + np.arange(chunk_len)).ravel()
        mask = np.ones(n_rows, bool)
        mask[val] = False
        folds.append((np.flatnonzero(mask), val))
    return folds

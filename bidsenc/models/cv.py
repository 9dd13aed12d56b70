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


def bootstrap_chunks(n_rows: int, n_boots: int = 10, chunk_len: int = 20, held_out: float = 0.2,
                     seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The reference's validation: random chunks of ``chunk_len`` consecutive rows held out.

    Each of ``n_boots`` splits holds out ``held_out`` of the rows as randomly drawn
    chunks (rows near a chunk's edge are not separated from training, as in the
    reference's bootstrap ridge).
    """
    n_chunks = n_rows // chunk_len
    if n_chunks < 2:
        raise DataError(f"too little data to cross-validate: {n_rows} training volumes for {chunk_len}-TR chunks")
    rng = np.random.default_rng(seed)
    starts = np.arange(n_chunks) * chunk_len
    take = max(1, int(round(n_chunks * held_out)))
    folds = []
    for _ in range(n_boots):
        held = rng.choice(n_chunks, size=take, replace=False)
        val = np.concatenate([np.arange(starts[c], min(starts[c] + chunk_len, n_rows)) for c in np.sort(held)])
        mask = np.ones(n_rows, bool)
        mask[val] = False
        folds.append((np.flatnonzero(mask), val))
    return folds

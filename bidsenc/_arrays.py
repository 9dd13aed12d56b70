"""Array checks shared by the stages that read responses (``bids``) and align them (``align``)."""

from __future__ import annotations

import numpy as np

#: A column whose standard deviation is at most this fraction of its root mean square is constant:
#: its spread is rounding (100 copies of 4.2 have a computed standard deviation of 8e-15).
CONSTANT_RTOL = 1e-12


def constant_columns(x: np.ndarray) -> np.ndarray:
    """True for columns of ``x`` that are constant up to rounding (computed in float64)."""
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(0)
    return ~(sd > CONSTANT_RTOL * np.sqrt((x * x).mean(0)))


def usable_columns(y: np.ndarray) -> np.ndarray:
    """True for columns of ``y`` (time x voxels) that are finite and not constant: the voxels one can fit."""
    finite = np.isfinite(y).all(0)
    return finite & ~constant_columns(np.where(finite, y, 0.0))

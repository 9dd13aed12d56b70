"""Scaling statistics on tidy tables: log-linear fits per participant, summarised across participants.

Antonello et al. (2023) report encoding performance against the logarithm of the
model size (and of the amount of training data). Here each participant gets its own
least-squares line ``score = a + b * log10(x)``; the group slope is the mean of the
participants' slopes with a t confidence interval across participants (the
participants are the independent units), and the line through the participants'
averaged scores is given for plotting.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as _stats


def loglinear_fit(x, y) -> tuple[float, float]:
    """Intercept and slope of ``y = a + b * log10(x)`` by least squares (NaN with fewer than 2 distinct x)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    x, y = x[keep], y[keep]
    if np.unique(x).size < 2:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(np.log10(x), y, 1)
    return float(intercept), float(slope)


def scaling_fits(table: pd.DataFrame, x: str, y: str, by: list[str], *, unit: str = "participant",
                 confidence: float = 0.95) -> pd.DataFrame:
    """Per group of ``by``: the slope of ``y`` per tenfold increase of ``x``, across ``unit``s.

    Returns one row per group with ``n_units``, ``n_points`` (distinct x), ``slope``
    (mean of the units' slopes), ``ci_low``/``ci_high`` (t interval across units; NaN
    for a single unit), ``slope_sd``, and ``intercept_mean``/``slope_mean`` of the line
    fitted to the unit-averaged scores.
    """
    rows = []
    for key, group in table.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        per_unit = []
        for _, g in group.groupby(unit):
            a, b = loglinear_fit(g[x], g[y])
            if np.isfinite(b):
                per_unit.append(b)
        averaged = group.groupby(x)[y].mean()
        a_mean, b_mean = loglinear_fit(averaged.index.to_numpy(), averaged.to_numpy())
        slopes = np.asarray(per_unit)
        n = slopes.size
        mean = float(slopes.mean()) if n else float("nan")
        if n >= 2:
            sd = float(slopes.std(ddof=1))
            half = float(_stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / np.sqrt(n))
        else:
            sd, half = float("nan"), float("nan")
        rows.append({**dict(zip(by, key, strict=True)), "metric": y, "per": f"tenfold {x}", "n_units": n,
                     "n_points": int(group[x].nunique()), "slope": mean, "ci_low": mean - half,
                     "ci_high": mean + half, "slope_sd": sd, "intercept_mean": a_mean, "slope_mean": b_mean})
    return pd.DataFrame(rows)


__all__ = ["loglinear_fit", "scaling_fits"]

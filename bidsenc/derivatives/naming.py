"""BIDS names for bidsenc's outputs.

Entities come from the participant's runs: ``ses-`` and ``task-`` only when every
run shares one (ds003020 and the demo present one story per task, so their maps,
which pool every story, carry neither), ``space-`` (and ``den-`` for CIFTI
grayordinates) for fMRIPrep's output spaces (native-space data carry none, as in
fMRIPrep's own BOLD-space outputs).
Labels are alphanumeric, as BIDS requires.
"""

from __future__ import annotations

import re

#: Statistic labels of the maps (``stat-<label>``) and what each holds.
STAT_LABELS = {
    "r": "Pearson correlation between prediction and response on the held-out test data",
    "r2": "coefficient of determination (R^2) on the held-out test data",
    "ccnorm": "test r divided by the noise ceiling (CC_max, or the inter-subject ceiling without repeats)",
    "alpha": "ridge regularisation chosen by cross-validation on the training data (himalaya's convention)",
    "cvscore": "cross-validated training score (mean validation r over folds) at the chosen alpha",
    "logp": "-log10 of the per-voxel p-value of the model's held-out r (how it was computed: Method)",
    "fdr": "1 where the voxel is significant at the FDR level (Benjamini-Hochberg), else 0",
    "ccmax": "noise ceiling: CC_max from the test repeats (Schoppe et al. 2016)",
    "isc": "inter-subject ceiling: correlation with the mean response of other participants on the same runs",
    "r2split": "this model's share of the banded-ridge test R^2 (himalaya r2_score_split)",
    "weight": "stacking weight of this model's best layer (convex weights, summing to 1 over models)",
}


def bids_label(text: str) -> str:
    """``lm-facebook-opt-125m`` -> ``lmFacebookOpt125m``: an alphanumeric label that stays readable."""
    parts = [p for p in re.split(r"[^0-9A-Za-z]+", text) if p]
    if not parts:
        return "x"
    return parts[0] + "".join(p[0].upper() + p[1:] for p in parts[1:])


def model_labels(names: list[str]) -> dict[str, str]:
    """A distinct ``desc`` label per model name (a number is appended on the rare collision)."""
    out: dict[str, str] = {}
    for name in names:
        label, n = bids_label(name), 2
        while label in out.values():
            label, n = f"{bids_label(name)}{n}", n + 1
        out[name] = label
    return out


def participant_prefix(participant: str, runs, space: str | None, density: str | None = None) -> str:
    """``sub-01[_ses-1][_task-pieman][_space-MNI152NLin2009cAsym][_den-91k]`` for one participant's outputs."""
    parts = [f"sub-{participant}"]
    sessions = {run.entities.get("session") or run.entities.get("ses") for run in runs}
    if len(sessions) == 1 and None not in sessions:
        parts.append(f"ses-{bids_label(str(sessions.pop()))}")
    tasks = {run.entities.get("task") for run in runs}
    if len(tasks) == 1 and None not in tasks:
        parts.append(f"task-{bids_label(str(tasks.pop()))}")
    if space:
        parts.append(f"space-{bids_label(space)}")
        if density:
            parts.append(f"den-{bids_label(density)}")
    return "_".join(parts)


def with_hemi(prefix: str, hemi: str) -> str:
    """Insert ``hemi-L|R`` before ``space-`` (BIDS entity order), or at the end."""
    if "_space-" in prefix:
        head, tail = prefix.split("_space-", 1)
        return f"{head}_hemi-{hemi}_space-{tail}"
    return f"{prefix}_hemi-{hemi}"


__all__ = ["STAT_LABELS", "bids_label", "model_labels", "participant_prefix", "with_hemi"]

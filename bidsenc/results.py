"""What a participant run produced, in memory: the hand-over from ``fit`` to ``derivatives``.

Arrays cover the *fitted* voxels only (``valid`` marks them among all the space's
voxels); :meth:`ParticipantResult.full` puts a vector back on every voxel, with 0
where a voxel was left out (constant or non-finite responses), never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .models.encoding import LAYER_STATS  # order of the statistics along ModelResult.stats' last axis


@dataclass
class ModelResult:
    """Every layer's statistics for one feature model, and significance at its best layer."""

    name: str                    # e.g. "lm-facebook-opt-125m"
    description: dict            # the feature space's record: model, parameters, layers, family, ...
    layers: np.ndarray           # [L] layer indices (0 = embeddings)
    stats: np.ndarray            # [L, V_fitted, len(LAYER_STATS)] float32
    best_layer: int              # chosen by cross-validated training score, never by test score
    pvalue: np.ndarray           # [V_fitted] at the best layer
    fdr: np.ndarray              # [V_fitted] bool, Benjamini-Hochberg discoveries
    #: Ridge weights of the best layer, [n_features x n_delays, V_fitted], only with --save-weights.
    weights: np.ndarray | None = None

    def stat(self, name: str, layer: int | None = None) -> np.ndarray:
        """One statistic at ``layer`` (default: the best layer), over the fitted voxels."""
        index = int(np.flatnonzero(self.layers == (self.best_layer if layer is None else layer))[0])
        return self.stats[index, :, LAYER_STATS.index(name)]

    @property
    def n_parameters(self) -> int | None:
        return self.description.get("n_parameters")

    @property
    def family(self) -> str:
        """The model family for scaling curves: the ``family`` option, else the architecture."""
        d = self.description
        return str(d.get("options", {}).get("family") or d.get("model_type") or d.get("kind", "?"))


@dataclass
class StackedResult:
    """Convex per-voxel weights of several models' best layers, and the stacked scores."""

    names: list[str]
    weights: np.ndarray          # [n_models, V_fitted]
    r: np.ndarray                # [V_fitted]
    r2: np.ndarray               # [V_fitted]


@dataclass
class BandedResult:
    """Several models' best layers fitted jointly by banded ridge."""

    names: list[str]
    r: np.ndarray                # [V_fitted]
    r2: np.ndarray               # [V_fitted]
    r2_split: np.ndarray         # [n_models, V_fitted] each model's share of the test R^2
    weights: np.ndarray          # [n_models, V_fitted] kernel weights (sum to 1)


@dataclass
class ParticipantResult:
    """Everything one participant's encoding models produced."""

    participant: str
    space: object                # bids.bold.Space: where the voxel columns live
    valid: np.ndarray            # [V] bool: voxels that were fitted
    models: list[ModelResult]
    cc_max: np.ndarray | None    # [V_fitted] noise ceiling (None without test repeats)
    stacked: StackedResult | None = None
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)       # one row per model and layer
    data_scaling: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per subset fit
    responses: dict = field(default_factory=dict)                     # how responses were prepared and split
    banded: BandedResult | None = None
    #: The participant's own regions (e.g. fMRIPrep's aparcaseg on the BOLD grid): a label per
    #: fitted voxel and the names of the labels; empty when none was found.
    region_labels: np.ndarray | None = None
    region_names: dict = field(default_factory=dict)

    def full(self, values: np.ndarray) -> np.ndarray:
        """``values`` over the fitted voxels, spread to every voxel of the space (0 elsewhere)."""
        out = np.zeros(self.valid.shape + np.shape(values)[1:], dtype=np.float32)
        out[self.valid] = values
        return out

    def model(self, name: str) -> ModelResult:
        return next(m for m in self.models if m.name == name)

    def best_single_r(self, names: list[str]) -> np.ndarray:
        """Per voxel, the test r of the model (best layer) with the highest cross-validated training score.

        The fair single-model baseline for stacking: chosen without the test data (the
        per-voxel maximum of test r over models would be biased upwards).
        """
        chosen = [self.model(n) for n in names]
        cv = np.stack([m.stat("cv_score") for m in chosen])
        r = np.stack([m.stat("r") for m in chosen])
        return np.take_along_axis(r, cv.argmax(0)[None], axis=0)[0]


__all__ = ["LAYER_STATS", "BandedResult", "ModelResult", "ParticipantResult", "StackedResult"]

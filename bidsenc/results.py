"""What a participant run produced, in memory: the hand-over from ``fit`` to ``derivatives``.

Arrays cover the *fitted* voxels only (``valid`` marks them among all the space's
voxels); :meth:`ParticipantResult.full` puts a vector back on every voxel, with 0
where a voxel was left out (constant or non-finite responses), never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .models.banded import BandedResult
from .models.ceiling import cc_norm
from .models.encoding import LAYER_STATS, StackedResult  # LAYER_STATS: order along ModelResult.stats' last axis


def model_family(description: dict) -> str:
    """The model family of scaling curves: the ``family`` option, else the architecture, else the kind."""
    return str(description.get("options", {}).get("family") or description.get("model_type")
               or description.get("kind", "?"))


def relative_depth(layer, description: dict):
    """``layer`` (0 = embeddings) over the model's number of layers: 0 to 1 whatever the model's depth."""
    return np.asarray(layer) / max(description.get("n_layers") or 1, 1)


@dataclass
class ModelResult:
    """Every layer's statistics for one feature model, and significance at its best layer."""

    name: str                    # e.g. "lm-facebook-opt-125m"
    description: dict            # the feature space's record: model, parameters, layers, family, ...
    layers: np.ndarray           # [L] layer indices (0 = embeddings)
    stats: np.ndarray            # [L, V_fitted, len(LAYER_STATS)] float32
    best_layer: int              # chosen by cross-validated training score, never by test score
    pvalue: np.ndarray           # [V_fitted] of the model's held-out score (score_r)
    fdr: np.ndarray              # [V_fitted] bool, Benjamini-Hochberg discoveries
    #: Ridge weights of the best layer, [n_features x n_delays, V_fitted], only with --save-weights.
    weights: np.ndarray | None = None
    #: The model's r on a misaligned stimulus, [n_draws, V_fitted] (with a test story the best layer
    #: refitted on its features circularly shifted per story; without one the whole nested procedure
    #: on the stimulus rotated in time); None when the null was not run.
    null_r: np.ndarray | None = None
    #: Without a test story, the model's held-out scores: every outer fold's block predicted by the
    #: layer that fold chose from its own training rows (nested); None with a test story, where the
    #: best layer's test scores are the model's.
    model_r: np.ndarray | None = None
    model_r2: np.ndarray | None = None
    #: The layer each outer fold chose (nested selection); None with a test story.
    fold_layers: np.ndarray | None = None
    #: How the layer was chosen: ``method`` ("training-cv" or "nested"), ``layer``, and for nested
    #: selection ``fold_layers`` and ``share`` (of folds choosing ``layer``), with a description.
    selection: dict = field(default_factory=dict)
    #: How ``pvalue`` was computed (for the sidecars).
    pvalue_method: str = "circular shifts of the prediction against the response"

    @property
    def score_r(self) -> np.ndarray:
        """The model's held-out r per voxel: nested without a test story, else the best layer's test r."""
        return self.model_r if self.model_r is not None else self.stat("r")

    @property
    def score_r2(self) -> np.ndarray:
        return self.model_r2 if self.model_r2 is not None else self.stat("r2")

    @property
    def nested(self) -> bool:
        return self.model_r is not None

    def score(self, name: str, ceiling: np.ndarray | None = None) -> np.ndarray:
        """The model's held-out ``r``, ``r2`` or ``cc_norm`` (against ``ceiling``) per fitted voxel."""
        if not self.nested:
            return self.stat(name)
        if name == "cc_norm":
            return cc_norm(self.model_r, ceiling) if ceiling is not None else np.full_like(self.model_r, np.nan)
        return {"r": self.model_r, "r2": self.model_r2}[name]

    def stat(self, name: str, layer: int | None = None) -> np.ndarray:
        """One statistic at ``layer`` (default: the best layer), over the fitted voxels."""
        index = int(np.flatnonzero(self.layers == (self.best_layer if layer is None else layer))[0])
        return self.stats[index, :, LAYER_STATS.index(name)]

    @property
    def n_parameters(self) -> int | None:
        return self.description.get("n_parameters")

    @property
    def family(self) -> str:
        return model_family(self.description)


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

    @property
    def ceiling_kind(self) -> str:
        """``cc_max`` (test repeats), ``intersubject`` (other participants) or ``none``."""
        about = self.responses.get("noise_ceiling", {})
        return about.get("kind", "cc_max") if isinstance(about, dict) else "cc_max"

    def best_single_r(self, names: list[str]) -> np.ndarray:
        """Per voxel, the test r of the model (best layer) with the highest cross-validated training score.

        The fair single-model baseline for stacking: chosen without the test data (the
        per-voxel maximum of test r over models would be biased upwards).
        """
        chosen = [self.model(n) for n in names]
        cv = np.stack([m.stat("cv_score") for m in chosen])
        r = np.stack([m.stat("r") for m in chosen])
        return np.take_along_axis(r, cv.argmax(0)[None], axis=0)[0]


__all__ = ["LAYER_STATS", "BandedResult", "ModelResult", "ParticipantResult", "StackedResult", "model_family",
           "relative_depth"]

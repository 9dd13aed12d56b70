"""Wire the steps of a run together; each step lives in its own package."""

from __future__ import annotations

import logging

from ._io import atomic_write_text
from .bids.discover import Dataset, discover
from .config import RunConfig
from .errors import UsageError

log = logging.getLogger(__name__)


def participant(cfg: RunConfig, dataset: Dataset, label: str, logs_dir) -> None:
    """Run the participant-level analysis for ``label``."""
    experiment = discover(dataset, cfg, label)
    out = logs_dir / f"experiment-sub-{label}.json"
    atomic_write_text(out, experiment.to_json() + "\n")
    log.info("wrote %s", out)
    for note in experiment.notes:
        log.info("note: %s", note)
    # Feature extraction, model fitting and derivatives are added by the next steps
    # of the pipeline (features -> align -> models -> derivatives -> report).
    log.warning("sub-%s: this version of bidsenc stops after discovery; feature extraction and "
                "model fitting are not available yet", label)


def group(cfg: RunConfig) -> None:
    raise UsageError("the group level is not available in this version of bidsenc; "
                     "run the participant level")

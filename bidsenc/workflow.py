"""Wire the steps of a run together; each step lives in its own package."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ._io import atomic_write_text
from .bids.discover import Dataset, discover
from .config import RunConfig
from .errors import UsageError

log = logging.getLogger(__name__)


def participant(cfg: RunConfig, dataset: Dataset, label: str, logs_dir: Path, run_dir: Path,
                device: str) -> None:
    """Run the participant-level analysis for ``label``."""
    experiment = _discover_and_record(cfg, dataset, label, logs_dir)
    spaces = extract_features(cfg, experiment.stories, device)
    _record_features(run_dir / f"features-sub-{label}.json", spaces)
    from .fit import fit_participant

    fit_participant(cfg, experiment, spaces, device, cfg.inputs.output_dir / f"sub-{label}")


def features_only(cfg: RunConfig, dataset: Dataset, labels: list[str], logs_dir: Path, run_dir: Path,
                  device: str) -> None:
    """Precompute every feature of every story the selected participants heard (a GPU job)."""
    unique: dict = {}
    for label in labels:
        for story in _discover_and_record(cfg, dataset, label, logs_dir).stories.values():
            known = unique.get(story.id)
            if known is None:
                unique[story.id] = story
            elif known.content_hash != story.content_hash:  # same name, other content elsewhere
                unique[f"{story.id}-{story.content_hash[:8]}"] = story
    spaces = extract_features(cfg, unique, device)
    _record_features(run_dir / "features.json", spaces)
    log.info("features of %d stories for %d feature spaces are in %s", len(unique), len(spaces),
             cfg.feature_cache)


def _discover_and_record(cfg: RunConfig, dataset: Dataset, label: str, logs_dir: Path):
    """Discover one participant's experiment and write it to ``logs/experiment-sub-<label>.json``."""
    experiment = discover(dataset, cfg, label)
    out = logs_dir / f"experiment-sub-{label}.json"
    atomic_write_text(out, experiment.to_json() + "\n")
    log.info("wrote %s", out)
    for note in experiment.notes:
        log.info("note: %s", note)
    return experiment


def _record_features(path: Path, spaces) -> None:
    atomic_write_text(path, json.dumps([s.describe() for s in spaces], indent=2) + "\n")


def extract_features(cfg: RunConfig, stories: dict, device: str):
    from .features import extract
    from .features.cache import FeatureStore

    cfg.feature_cache.mkdir(parents=True, exist_ok=True)
    store = FeatureStore(cfg.feature_cache)
    return extract(cfg.features, stories, store, device=device, allow_download=cfg.execution.allow_download)


def group(cfg: RunConfig) -> None:
    raise UsageError("the group level is not available in this version of bidsenc; "
                     "run the participant level")

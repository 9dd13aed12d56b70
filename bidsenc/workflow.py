"""Wire the steps of a run together; each step lives in its own package."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ._io import atomic_write_text
from .bids.discover import Dataset, discover
from .config import RunConfig
from .errors import BidsencError, DataError, MissingInputError, NoDataSelectedError

log = logging.getLogger(__name__)


def participant(cfg: RunConfig, dataset: Dataset, label: str, logs_dir: Path, run_dir: Path,
                device: str) -> None:
    """Run the participant-level analysis for ``label``: fit, write the derivatives and the report.

    The dataset-level files and the report are written even when the participant fails,
    so the report says what was found and what went wrong.
    """
    from .bids.bold import check_mask
    from .derivatives import write_dataset_files, write_participant
    from .fit import check_memory_early, fit_participant

    out = cfg.inputs.output_dir
    if not cfg.execution.force and _complete_already(cfg, dataset, label):
        return
    warnings = _WarningCollector()
    logging.getLogger("bidsenc").addHandler(warnings)
    experiment, error = None, None
    try:
        write_dataset_files(out, cfg.inputs.bids_dir, cfg.inputs.derivatives)
        experiment = _discover_and_record(cfg, dataset, label, logs_dir)
        if cfg.inputs.mask is not None:  # before hours of features
            check_mask(cfg.inputs.mask, experiment.runs)
        _check_stimulus_within_scans(experiment)
        check_memory_early(cfg, experiment)  # --mem against the responses, before hours of features
        spaces = extract_features(cfg, experiment.stories, device)
        _warn_sparse_audio_windows(spaces, experiment)
        _record_features(run_dir / f"features-sub-{label}.json", spaces)
        result = fit_participant(cfg, experiment, spaces, device, _peers(cfg, dataset, experiment))
        write_participant(result, experiment, cfg)
    except BidsencError as err:
        error = err.message
        raise
    except (KeyboardInterrupt, SystemExit):
        error = "interrupted (stopped by the user or the scheduler) before the outputs were complete"
        raise
    except BaseException as err:
        error = f"internal error ({type(err).__name__}: {err}); see the log and crash file in {logs_dir}"
        raise
    finally:
        logging.getLogger("bidsenc").removeHandler(warnings)
        _record_status(logs_dir, label, error)
        if cfg.outputs.reports:
            _participant_report(out, label, experiment, warnings.messages, error)


def _complete_already(cfg: RunConfig, dataset: Dataset, label: str) -> bool:
    """Whether the participant's outputs are complete, from this version, settings and input files."""
    from .derivatives import complete_outputs

    try:
        done = complete_outputs(cfg.inputs.output_dir, label, cfg.results_fingerprint(),
                                inputs=lambda: discover(dataset, cfg, label).inputs_fingerprint())
    except BidsencError:  # the run that follows says what is wrong
        return False
    if done is None:
        return False
    log.info("sub-%s: outputs complete in %s (this version, same settings and input files): skipped; --force "
             "recomputes them", label, done)
    return True


def _record_status(logs_dir: Path, label: str, error: str | None) -> None:
    """``logs/status-sub-<label>.json``: how the participant's last run ended, for the group level to name it."""
    import time

    try:
        atomic_write_text(logs_dir / f"status-sub-{label}.json", json.dumps(
            {"participant": label, "status": "failed" if error else "complete", "error": error,
             "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
    except OSError as err:  # the run's own outcome matters more than this record
        log.warning("sub-%s: could not record the run's status (%s)", label, err)


#: Share of a story that may run past its scan's last volume before the run is refused.
MAX_STORY_PAST_SCAN = 0.25


def _check_stimulus_within_scans(experiment) -> None:
    """A story that goes on after its run's last volume: a wrong onset, or a scan cut short.

    A little past the end (the scanner stopped a few seconds early) is a warning; more than a
    quarter of the story is an error, since the fit would pair it with volumes it never had.
    """
    for run in experiment.runs:
        scan_end = (run.trimmed_start + run.n_volumes + run.trimmed_end) * run.tr
        for seg in run.segments:
            story = experiment.stories[seg.story_id]
            if story.words is not None and len(story.words):
                times = story.words.midpoints + seg.onset
                late, total = int((times > scan_end).sum()), len(times)
                what = f"{late} of {total} words of {seg.story_id} fall after the run's last volume ({scan_end:.0f} s)"
            elif story.duration:
                late = max(0.0, seg.onset + story.duration - scan_end - run.tr)
                total = story.duration
                what = (f"{seg.story_id} plays until {seg.onset + story.duration:.0f} s but the run's last volume ends "
                        f"at {scan_end:.0f} s")
            else:
                continue
            if late > MAX_STORY_PAST_SCAN * total:
                raise DataError(f"{run.name}: {what}; its {run.n_volumes} volumes cannot hold the story: check the "
                                "BOLD file (cut short?) and the story's onset in events.tsv")
            if late:
                log.warning("%s: %s; check the story's onset in events.tsv, or whether the scan stopped early",
                            run.name, what)


def _warn_sparse_audio_windows(spaces, experiment) -> None:
    """Audio windows sparser than half a TR alias what the Lanczos filter (cutoff 1/TR) keeps."""
    from .features import AUDIO_STEP

    shortest_tr = min(run.tr for run in experiment.runs)
    for space in spaces:
        step = float(space.spec.options.get("step", AUDIO_STEP)) if space.spec.kind == "audio" else 0.0
        if step >= shortest_tr / 2:
            log.warning("%s: audio windows every %g s are too sparse for a TR of %g s (aliasing); use a step "
                        "below %g s, e.g. the reference %g s", space.name, step, shortest_tr, shortest_tr / 2,
                        AUDIO_STEP)


def _peers(cfg: RunConfig, dataset: Dataset, experiment) -> list:
    """Without test repeats: other participants' experiments, for an inter-subject ceiling."""
    from .bids.bold import NATIVE_SPACES

    n = cfg.models.intersubject_peers
    if n <= 0 or cfg.models.test_stories or experiment.repeated_stories:
        return []
    if any(run.bold.space in NATIVE_SPACES or run.bold.kind == "hdf5" for run in experiment.runs):
        return []  # an inter-subject ceiling needs a shared template space: no peer could be used
    stories = set(experiment.stories)
    peers = []
    for label in dataset.participants():
        if label == experiment.participant or len(peers) >= n:
            continue
        try:
            other = discover(dataset, cfg, label)
        except BidsencError as err:
            log.debug("inter-subject ceiling: sub-%s not usable (%s)", label, err.message)
            continue
        if stories & set(other.stories):
            peers.append(other)
    return peers


def reports_only(cfg: RunConfig, logs_dir: Path) -> None:
    """Rewrite the participants' reports from what output_dir holds (no discovery, no fitting)."""
    from .derivatives import participant_labels

    out = cfg.inputs.output_dir
    labels = list(cfg.inputs.participant_label) or participant_labels(out)
    if not labels:
        raise MissingInputError(f"no participant outputs in {out} to report on; run the participant level first")
    from .report.participant import write_participant_report

    for label in labels:
        record = logs_dir / f"experiment-sub-{label}.json"
        experiment = json.loads(record.read_text()) if record.is_file() else None
        write_participant_report(out, label, experiment, [])


def _participant_report(out: Path, label: str, experiment, warnings: list[str], error: str | None) -> None:
    """Write the report without letting a reporting problem hide the run's own outcome."""
    from .report.participant import write_participant_report

    try:
        write_participant_report(out, label, experiment.to_dict() if experiment else None, warnings, error)
    except Exception as err:  # the outputs themselves are written; a broken figure must not fail the run
        log.warning("sub-%s: the HTML report could not be written (%s: %s)", label, type(err).__name__, err)


class _WarningCollector(logging.Handler):
    """Keeps the warnings of one participant's run for its report."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def each_participant(labels: list[str], action) -> list:
    """``action(label)`` for every participant; one whose data are at fault is skipped, not the run.

    A participant's bad data (65), missing input (66) or empty selection (18) is logged as a
    warning naming it, and the others go on; when none is left, the first error ends the run
    with its own exit code. Returns what ``action`` returned for the participants that succeeded.
    """
    done, failed = [], []
    for label in labels:
        try:
            done.append(action(label))
        except (DataError, MissingInputError, NoDataSelectedError) as err:
            if not err.message.startswith(f"sub-{label}"):
                err.message = f"sub-{label}: {err.message}"
            if len(labels) == 1:
                raise
            log.warning("skipped %s", err.message)
            failed.append(err)
    if failed and len(failed) == len(labels):
        first = failed[0]
        first.message = f"none of the {len(labels)} participants could be analysed; first: {first.message}"
        raise first
    if failed:
        log.warning("%d of %d participants skipped (see the warnings above); the others are done",
                    len(failed), len(labels))
    return done


def features_only(cfg: RunConfig, dataset: Dataset, labels: list[str], logs_dir: Path, run_dir: Path,
                  device: str) -> None:
    """Precompute every feature of every story the selected participants heard (a GPU job)."""
    unique: dict = {}
    for experiment in each_participant(labels, lambda label: _discover_and_record(cfg, dataset, label, logs_dir)):
        for story in experiment.stories.values():
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
    return extract(cfg.features, stories, store, device=device, allow_download=cfg.execution.allow_download,
                   model_dir=cfg.execution.model_dir, skip_absent_audio=cfg.default_features)


def group(cfg: RunConfig) -> None:
    """Summarise the participants' outputs in a scaling report (never refits)."""
    from .derivatives import write_dataset_files
    from .report.group import run_group

    write_dataset_files(cfg.inputs.output_dir, cfg.inputs.bids_dir, cfg.inputs.derivatives)
    run_group(cfg)

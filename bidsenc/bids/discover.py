"""Find, for one participant, every story run, the stories it presented and every word.

Three layouts are understood (see :func:`detect_layout`):

``fmriprep``
    BOLD from fMRIPrep derivatives (``-d fmriprep=PATH`` or
    ``bids_dir/derivatives/fmriprep``): ``*_space-<S>_desc-preproc_bold.nii.gz`` with
    its brain mask, ``*_space-fsaverage*_hemi-{L,R}_bold.func.gii`` pairs, or CIFTI-2
    grayordinates ``*_space-fsLR_den-91k_bold.dtseries.nii``.
``raw``
    ``func/*_bold.nii.gz`` of the dataset itself, taken as already preprocessed.
``ds003020``
    LeBel et al. (2023): story = task, no story events (sound starts 10 s after the
    first volume), word timings in ``derivative/TextGrids``, responses preferably from
    ``derivative/preprocessed_data/<sub>/<story>.hf5``.

In the BIDS layouts the stories come from ``events.tsv``: every distinct
``stim_file`` of a run is one story, starting at the earliest row that names it
(Narratives plays a music intro from the same wav before the story row).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from ..config import RunConfig
from ..errors import DataError, MissingInputError, NoDataSelectedError, UsageError
from .audio import audio_duration
from .bold import cifti_series
from .experiment import BoldSource, Experiment, Run, Segment, SkippedRun, Story, WordTimings
from .words import find_word_timings, read_events_words, read_word_timings

log = logging.getLogger(__name__)

#: ds003020: the sound starts this many seconds after the first volume.
DS003020_SOUND_ONSET = 10.0
#: ds003020: the authors' preprocessed responses lack this many TRs at each end.
DS003020_TRIM_TRS = 10

_IGNORE = ["code", "stimuli", "sourcedata", "models", "derivatives", "derivative", "work", re.compile(r"/\.")]
_BOLD_EXT = [".nii.gz", ".nii"]
_RUN_ENTITIES = ("subject", "session", "task", "acquisition", "run", "direction", "reconstruction", "echo")


@dataclass
class Dataset:
    """An indexed input dataset: the raw layout plus, when present, fMRIPrep's."""

    root: Path
    layout_kind: str
    raw: object  # bids.BIDSLayout
    fmriprep: object | None
    stimuli_dir: Path

    def participants(self) -> list[str]:
        return sorted(self.raw.get_subjects())


def detect_layout(cfg: RunConfig) -> tuple[str, Path | None]:
    """Return ``(kind, fmriprep_dir)`` for the input dataset."""
    root = cfg.inputs.bids_dir
    deriv = root / "derivative"
    if deriv.is_dir() and any((deriv / p).exists() for p in ("respdict.json", "TextGrids", "preprocessed_data")):
        return "ds003020", None
    fmriprep = cfg.inputs.derivatives.get("fmriprep")
    if fmriprep is None and (root / "derivatives" / "fmriprep").is_dir():
        fmriprep = root / "derivatives" / "fmriprep"
    if fmriprep is not None:
        return "fmriprep", Path(fmriprep)
    unknown = sorted(set(cfg.inputs.derivatives) - {"fmriprep"})
    if unknown:
        raise UsageError(
            f"--derivatives {', '.join(unknown)}: only fmriprep=PATH is understood for now"
        )
    return "raw", None


def open_dataset(cfg: RunConfig) -> Dataset:
    """Index ``bids_dir`` (and fMRIPrep derivatives) with PyBIDS."""
    from bids import BIDSLayout
    from bids.layout import BIDSLayoutIndexer

    kind, fmriprep_dir = detect_layout(cfg)
    try:
        database = cfg.execution.bids_database_dir
        raw = BIDSLayout(cfg.inputs.bids_dir, validate=False,
                         indexer=BIDSLayoutIndexer(validate=False, ignore=_IGNORE),
                         database_path=database, reset_database=False)
        fmriprep = None
        if fmriprep_dir is not None:
            fmriprep = BIDSLayout(fmriprep_dir, validate=False, is_derivative=True,
                                  config=["bids", "derivatives"],
                                  indexer=BIDSLayoutIndexer(validate=False, ignore=_IGNORE))
    except (ValueError, json.JSONDecodeError) as err:
        raise DataError(f"cannot index {cfg.inputs.bids_dir}: {err}") from None
    except OSError as err:  # PyBIDS wraps a sidecar's JSONDecodeError in an OSError naming the file
        if not isinstance(err.__cause__, json.JSONDecodeError):
            raise
        named = re.search(r"filename='([^']+)'", str(err))
        raise DataError(f"{named.group(1) if named else 'a JSON sidecar'}: not valid JSON ({err.__cause__}); "
                        "fix the file (the BIDS validator, run without --skip-bids-validation, lists such "
                        "errors)") from None
    stimuli = cfg.inputs.stimuli_dir or cfg.inputs.bids_dir / "stimuli"
    log.info("dataset %s: %s layout%s", cfg.inputs.bids_dir, kind,
             f" (fMRIPrep outputs in {fmriprep_dir})" if fmriprep_dir else "")
    return Dataset(cfg.inputs.bids_dir, kind, raw, fmriprep, stimuli)


def select_participants(dataset: Dataset, cfg: RunConfig) -> list[str]:
    """The participants to analyse; unknown labels are an error that names them."""
    existing = dataset.participants()
    if not existing:
        raise MissingInputError(f"{dataset.root} holds no sub-* folder with functional data")
    wanted = list(cfg.inputs.participant_label) or existing
    unknown = [p for p in wanted if p not in existing]
    if unknown:
        raise NoDataSelectedError(
            f"participant(s) {', '.join(unknown)} not found in {dataset.root}; "
            f"it has: {_short_list(existing)}"
        )
    return wanted


def discover(dataset: Dataset, cfg: RunConfig, participant: str) -> Experiment:
    """Describe what ``participant`` heard and where the responses are."""
    bold_files = _select_bold(dataset, cfg, participant)
    exp = Experiment(participant=participant, layout=dataset.layout_kind, runs=[], stories={})
    if dataset.layout_kind == "ds003020":
        _discover_ds003020(dataset, cfg, participant, bold_files, exp)
    else:
        _discover_bids(dataset, cfg, bold_files, exp)
        if dataset.layout_kind == "raw":
            exp.notes.append("BOLD read from the raw func/ folder and assumed preprocessed; "
                             "point -d fmriprep=PATH at fMRIPrep outputs if you have them")
    for skipped in exp.skipped:
        log.info("skipping %s: %s", skipped.name, skipped.reason)
    if not exp.runs:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in exp.skipped[:3])
        raise MissingInputError(
            f"sub-{participant} has no run that presents a story ({reasons or 'no BOLD runs'}); "
            "story runs need events.tsv rows with a stim_file (or the ds003020 layout)"
        )
    _check_required_stimuli(exp, cfg)
    log.info("sub-%s: %d story runs, %d stories (%d repeated), %d runs skipped",
             participant, len(exp.runs), len(exp.stories), len(exp.repeated_stories), len(exp.skipped))
    return exp


# --------------------------------------------------------------------------- selection

def _select_bold(dataset: Dataset, cfg: RunConfig, participant: str) -> list:
    filters = dict(cfg.inputs.bids_filters.get("bold", {}))
    query = {"subject": participant, "datatype": "func", "suffix": "bold", "extension": _BOLD_EXT}
    if cfg.inputs.session_label:
        query["session"] = list(cfg.inputs.session_label)
    if cfg.inputs.task:
        query["task"] = list(cfg.inputs.task)
    for key, value in filters.items():
        query.setdefault(key, value)
    try:
        files = dataset.raw.get(**query)
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--bids-filter-file: invalid query {filters}: {err}") from None
    if not files:
        everything = dataset.raw.get(subject=participant, datatype="func", suffix="bold", extension=_BOLD_EXT)
        asked = {k: v for k, v in query.items() if k not in ("datatype", "suffix", "extension")}
        tasks = sorted({f.entities.get("task") for f in everything if f.entities.get("task")})
        sessions = sorted({str(f.entities["session"]) for f in everything if "session" in f.entities})
        raise NoDataSelectedError(
            f"no BOLD run of sub-{participant} matches {asked}; it has tasks: {_short_list(tasks) or 'none'}"
            + (f"; sessions: {_short_list(sessions)}" if sessions else "")
        )
    return sorted(files, key=lambda f: f.path)


# --------------------------------------------------------------------------- BIDS layouts

def _discover_bids(dataset: Dataset, cfg: RunConfig, bold_files: list, exp: Experiment) -> None:
    for bf in bold_files:
        path = Path(bf.path)
        name = _run_name(path)
        events_path = _nearest_sidecar(path, dataset.root, "events.tsv")
        if events_path is None:
            exp.skipped.append(SkippedRun(name, "no events.tsv, so no story is known for this run"))
            continue
        events = _read_events(events_path)
        stimuli = _stimulus_rows(events)
        event_words = read_events_words(events, source=events_path)
        if stimuli.empty and event_words is None:
            exp.skipped.append(SkippedRun(name, "events.tsv names no stim_file and has no word rows "
                                                "(localizer or rest)"))
            continue
        bold = _bold_source(dataset, cfg, bf)
        if bold is None:
            exp.skipped.append(SkippedRun(name, "no fMRIPrep output for this run"))
            continue
        metadata = _metadata(dataset, bf, bold)
        tr = _repetition_time(metadata, path)
        if bold.kind == "cifti":
            _check_series_step(bold.paths[0], tr)
        segments = []
        if stimuli.empty:  # the story is defined by the word rows themselves
            words = event_words
            story = _make_story(f"task-{bf.entities['task']}", None, words)
            segments.append(Segment(_register(exp, story), 0.0))
        else:
            for stim_file, onset in stimuli.items():
                story = _bids_story(dataset, cfg, stim_file, event_words if len(stimuli) == 1 else None,
                                    onset, events_path)
                segments.append(Segment(_register(exp, story), float(onset)))
        exp.runs.append(Run(
            name=name,
            entities=_entities(path),
            tr=tr,
            n_volumes=_n_volumes(bold, cfg.execution.bids_database_dir),
            slice_time_ref=_slice_time_ref(metadata, tr),
            bold=bold,
            segments=tuple(segments),
            events=events_path,
        ))


def _read_events(path: Path) -> pd.DataFrame:
    try:
        events = pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False, dtype={"stim_file": str})
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable TSV ({err})") from None
    missing = [c for c in ("onset", "duration") if c not in events.columns]
    if missing:
        raise DataError(f"{path}: events.tsv lacks the required column(s) {', '.join(missing)} "
                        f"(has: {', '.join(map(str, events.columns))})")
    if events.empty:
        raise DataError(f"{path}: events.tsv has a header but no rows; give one row per stimulus (onset, "
                        "duration, stim_file) or remove the file if the run presents no story")
    if not pd.api.types.is_numeric_dtype(events["onset"]) or events["onset"].isna().any():
        raise DataError(f"{path}: the onset column must hold numbers in seconds")
    durations = pd.to_numeric(events["duration"], errors="coerce")
    negative = events.index[durations < 0]
    if len(negative):  # stories are timed by their onsets and audio, so this is a warning, not an error
        log.warning("%s: %d event(s) with a negative duration (row %d: %g s); durations must be >= 0 in BIDS: "
                    "check how the file was made", path.name, len(negative), int(negative[0]) + 1,
                    durations[negative[0]])
    return events


def _stimulus_rows(events: pd.DataFrame) -> pd.Series:
    """Onset of each stimulus file: the earliest row naming it."""
    if "stim_file" not in events.columns:
        return pd.Series(dtype=float)
    rows = events[events["stim_file"].notna() & (events["stim_file"].str.strip() != "")]
    return rows.groupby("stim_file", sort=False)["onset"].min().sort_values()


def _stimulus_path(stimuli_dir: Path, stim_file: str, events_path: Path) -> Path:
    """``stimuli_dir / stim_file``, refused when the name leads out of the stimuli folder.

    Checked on the name, not on the resolved file: a symbolic link inside the folder may point
    anywhere (git-annex and DataLad datasets are made of them), but ``..`` or an absolute path
    must not reach files the dataset does not hold.
    """
    parts = Path(stim_file).parts
    if Path(stim_file).is_absolute() or ".." in parts or not parts:
        raise DataError(f"{events_path}: stim_file {stim_file!r} leads outside the stimuli folder; BIDS "
                        f"stim_file paths are relative to {stimuli_dir} and stay inside it")
    return stimuli_dir / stim_file


def _bids_story(dataset: Dataset, cfg: RunConfig, stim_file: str, event_words: WordTimings | None,
                onset: float, events_path: Path) -> Story:
    stim_path = _stimulus_path(dataset.stimuli_dir, stim_file, events_path)
    story_id = str(Path(stim_file).with_suffix(""))
    audio = stim_path if stim_path.is_file() else None
    words = None
    explicit = cfg.inputs.word_timings.get(stim_file) or cfg.inputs.word_timings.get(story_id)
    timing_file = Path(explicit) if explicit else find_word_timings(
        stim_path, story_id, [dataset.stimuli_dir, dataset.root / "derivative"]
    )
    if timing_file is not None:
        if not timing_file.is_file():
            raise MissingInputError(f"word timing file {timing_file} (given for {stim_file}) does not exist")
        words = read_word_timings(timing_file)
    elif event_words is not None:
        words = WordTimings(event_words.words, event_words.onsets - onset, event_words.offsets - onset,
                            event_words.source)
    story = _make_story(story_id, audio, words)
    return story if audio is not None else replace(story, missing_audio=stim_path)


# --------------------------------------------------------------------------- ds003020

def _discover_ds003020(dataset: Dataset, cfg: RunConfig, participant: str, bold_files: list,
                       exp: Experiment) -> None:
    deriv = dataset.root / "derivative"
    respdict_path = deriv / "respdict.json"
    respdict = json.loads(respdict_path.read_text()) if respdict_path.is_file() else {}
    textgrids = {p.stem: p for p in (deriv / "TextGrids").glob("*.TextGrid")}
    wavs = {p.stem: p for p in dataset.stimuli_dir.glob("*.wav")}
    story_names = set(respdict) | set(textgrids) | set(wavs)
    hf5_dir = deriv / "preprocessed_data" / participant.removeprefix("sub-")

    story_runs: dict[str, list] = {}
    for bf in bold_files:
        task = bf.entities.get("task")
        if task in story_names:
            story_runs.setdefault(task, []).append(bf)
        else:
            exp.skipped.append(SkippedRun(_run_name(Path(bf.path)),
                                          f"task {task} presents no story (localizer or rest)"))
    for story_id, files in sorted(story_runs.items()):
        words = read_word_timings(textgrids[story_id]) if story_id in textgrids else None
        audio = wavs.get(story_id)
        _register(exp, _make_story(story_id, audio, words))
        hf5 = hf5_dir / f"{story_id}.hf5"
        files = sorted(files, key=lambda f: (str(f.entities.get("session", "")), str(f.entities.get("run", ""))))
        shapes = _hdf5_shapes(hf5) if hf5.is_file() else None
        for repeat, bf in enumerate(files):
            path = Path(bf.path)
            metadata = dataset.raw.get_metadata(bf.path)
            tr = _repetition_time(metadata, path)
            if shapes is not None:
                bold, n_volumes = _ds003020_hdf5_source(hf5, shapes, repeat, len(files), respdict.get(story_id))
                trimmed = DS003020_TRIM_TRS
            else:
                bold = BoldSource("nifti", (path,))
                n_volumes, trimmed = _n_volumes(bold, cfg.execution.bids_database_dir), 0
            trimmed_end = trimmed
            exp.runs.append(Run(
                name=_run_name(path),
                entities=_entities(path),
                tr=tr,
                n_volumes=n_volumes,
                slice_time_ref=tr / 2,
                bold=bold,
                segments=(Segment(story_id, DS003020_SOUND_ONSET),),
                events=None,
                trimmed_start=trimmed,
                trimmed_end=trimmed_end,
            ))
    exp.runs.sort(key=lambda r: r.name)


def _hdf5_shapes(path: Path) -> dict:
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            return {key: fh[key].shape for key in fh.keys() if isinstance(fh[key], h5py.Dataset)}
    except OSError as err:
        raise DataError(f"{path}: not a readable HDF5 file ({err})") from None


def _ds003020_hdf5_source(path: Path, shapes: dict, repeat: int, n_runs: int,
                          respdict_trs: int | None) -> tuple[BoldSource, int]:
    if n_runs > 1:
        if "individual_repeats" not in shapes:
            raise DataError(f"{path}: the story was heard {n_runs} times but the file has no "
                            f"'individual_repeats' dataset (has: {', '.join(shapes)})")
        n_rep, n_trs = shapes["individual_repeats"][:2]
        if n_rep < n_runs:
            raise DataError(f"{path}: holds {n_rep} repeats but the participant has {n_runs} runs of this story")
        source = BoldSource("hdf5", (path,), key="individual_repeats", repeat=repeat,
                            preprocessed_by="ds003020 authors (detrended, z-scored, trimmed)")
    else:
        if "data" not in shapes:
            raise DataError(f"{path}: no 'data' dataset (has: {', '.join(shapes) or 'nothing'})")
        n_trs = shapes["data"][0]
        source = BoldSource("hdf5", (path,), key="data",
                            preprocessed_by="ds003020 authors (detrended, z-scored, trimmed)")
    if respdict_trs is not None and n_trs != respdict_trs - 2 * DS003020_TRIM_TRS:
        raise DataError(f"{path}: {n_trs} TRs, but respdict.json says the run had {respdict_trs} "
                        f"(expected {respdict_trs - 2 * DS003020_TRIM_TRS} after the authors' trimming)")
    return source, int(n_trs)


# --------------------------------------------------------------------------- BOLD sources

def _bold_source(dataset: Dataset, cfg: RunConfig, bf) -> BoldSource | None:
    if dataset.fmriprep is None:
        mask = _raw_mask(Path(bf.path))
        return BoldSource("nifti", (Path(bf.path),), mask=mask)
    ents = {k: v for k, v in bf.entities.items() if k in _RUN_ENTITIES}
    fl = dataset.fmriprep
    volumes = fl.get(**ents, desc="preproc", suffix="bold", extension=_BOLD_EXT)
    surfaces = fl.get(**ents, suffix="bold", extension=".func.gii")
    grayordinates = fl.get(**ents, suffix="bold", extension=".dtseries.nii")
    tables = fl.get(**ents, desc="confounds", suffix="timeseries", extension=".tsv")
    confounds = Path(tables[0].path) if tables else None
    spaces: dict[str, BoldSource] = {}
    for f in volumes:
        space = f.entities.get("space", "T1w")
        masks = fl.get(**ents, space=f.entities.get("space"), desc="brain", suffix="mask", extension=_BOLD_EXT)
        spaces[space] = BoldSource("nifti", (Path(f.path),), space=space,
                                   mask=Path(masks[0].path) if masks else None, preprocessed_by="fMRIPrep",
                                   confounds=confounds)
    by_space: dict[str, dict] = {}
    for f in surfaces:
        by_space.setdefault(f.entities.get("space"), {})[f.entities.get("hemi")] = Path(f.path)
    for space, hemis in by_space.items():
        if set(hemis) == {"L", "R"}:
            spaces[space] = BoldSource("gifti", (hemis["L"], hemis["R"]), space=space, preprocessed_by="fMRIPrep",
                                       confounds=confounds)
    for f in grayordinates:  # keyed as fMRIPrep's --output-spaces writes them: fsLR:den-91k
        space, density = f.entities.get("space", "fsLR"), f.entities.get("den")
        spaces[f"{space}:den-{density}" if density else space] = BoldSource(
            "cifti", (Path(f.path),), space=space, density=density, preprocessed_by="fMRIPrep", confounds=confounds)
    half = {space: hemis for space, hemis in by_space.items() if set(hemis) != {"L", "R"}}
    if half and (not spaces or cfg.inputs.space in half):
        space, hemis = next(iter(half.items()))
        hemi, path = next(iter(hemis.items()))
        raise DataError(f"{path}: fMRIPrep output in {space} for hemisphere {hemi} only; the other "
                        "hemisphere's file is missing (an incomplete copy?): copy it too, or choose another "
                        "--space")
    if not spaces:
        return None
    if cfg.inputs.space:
        return _chosen_space(spaces, cfg.inputs.space, Path(bf.path))
    if len(spaces) > 1:
        raise UsageError(
            f"fMRIPrep outputs exist in several spaces ({', '.join(sorted(spaces))}); choose one with --space"
        )
    return next(iter(spaces.values()))


def _chosen_space(spaces: dict[str, BoldSource], wanted: str, path: Path) -> BoldSource:
    """The output ``--space`` names; ``fsLR`` stands for ``fsLR:den-<d>`` when the run has one density."""
    if wanted in spaces:
        return spaces[wanted]
    densities = [key for key in spaces if key.startswith(f"{wanted}:den-")]
    if len(densities) == 1:
        return spaces[densities[0]]
    if densities:
        raise UsageError(f"--space {wanted}: {_run_name(path)} has {wanted} outputs at several densities "
                         f"({', '.join(sorted(densities))}); name one, e.g. --space {sorted(densities)[0]}")
    raise NoDataSelectedError(f"--space {wanted}: {_run_name(path)} has fMRIPrep outputs in "
                              f"{', '.join(sorted(spaces))} only")


def _raw_mask(path: Path) -> Path | None:
    """A brain mask beside a raw BOLD file (``*_desc-brain_mask.nii.gz``), if any."""
    stem = path.name.split("_bold.nii")[0]
    for ext in _BOLD_EXT:
        candidate = path.with_name(f"{stem}_desc-brain_mask{ext}")
        if candidate.is_file():
            return candidate
    return None  # computed from the EPI with nilearn when the responses are loaded


def _n_volumes(bold: BoldSource, database: Path | None = None) -> int:
    import nibabel as nib

    path = bold.paths[0]
    if bold.kind == "cifti" and path.is_file():
        return cifti_series(path)[0]
    try:
        img = nib.load(path)
        if bold.kind == "gifti":
            return len(img.darrays)
        shape = img.header.get_data_shape()
    except FileNotFoundError:
        if path.is_symlink():
            raise MissingInputError(f"{path}: BOLD file is a link to missing content (git-annex? run `datalad "
                                    "get` on it)") from None
        if database is not None:
            raise MissingInputError(f"{path}: listed in the index in --bids-database-dir {database} but no longer "
                                    "on disk: the index is stale; delete that folder (it is rebuilt) and "
                                    "rerun") from None
        raise MissingInputError(f"{path}: BOLD file is missing") from None
    except Exception as err:  # nibabel raises many types for corrupt headers
        raise DataError(f"{path}: not a readable BOLD image ({type(err).__name__}: {err})") from None
    if len(shape) != 4 or shape[3] < 2:
        raise DataError(f"{path}: expected a 4D BOLD series, got shape {shape}")
    return int(shape[3])


def _metadata(dataset: Dataset, bf, bold: BoldSource) -> dict:
    metadata = dict(dataset.raw.get_metadata(bf.path))
    if bold.preprocessed_by == "fMRIPrep" and dataset.fmriprep is not None:
        metadata.update(dataset.fmriprep.get_metadata(str(bold.paths[0])))
    return metadata


def _repetition_time(metadata: dict, path: Path) -> float:
    tr = metadata.get("RepetitionTime")
    if not isinstance(tr, int | float) or not tr > 0:
        raise DataError(f"{path}: no valid RepetitionTime in its JSON sidecar(s) (got {tr!r})")
    return float(tr)


def _check_series_step(path: Path, tr: float) -> None:
    step = cifti_series(path)[1]
    if abs(step - tr) > 1e-3 * tr:
        raise DataError(f"{path.name}: its time series steps by {step:g} s but RepetitionTime is {tr:g} s; the file "
                        "and its sidecar disagree (a resampled or mislabelled file?): fix one of them")


def _slice_time_ref(metadata: dict, tr: float) -> float:
    """Seconds after a volume's start that its samples stand for.

    fMRIPrep records the slice-timing reference as ``StartTime``; otherwise the middle
    of the TR, as the reference pipeline assumes.
    """
    start = metadata.get("StartTime")
    if isinstance(start, int | float) and metadata.get("SliceTimingCorrected", True):
        return float(start)
    return tr / 2


# --------------------------------------------------------------------------- stories

def _make_story(story_id: str, audio: Path | None, words: WordTimings | None) -> Story:
    import hashlib

    duration = audio_duration(audio) if audio is not None else (
        float(words.offsets.max()) if words is not None and len(words) else None
    )
    if audio is not None and words is not None and len(words) and words.onsets.max() >= duration:
        raise DataError(
            f"{words.source or story_id}: words run to {words.offsets.max():.1f} s but the audio {audio.name} "
            f"lasts {duration:.1f} s; is this the timing file of another stimulus?"
        )
    h = hashlib.sha256()
    if audio is not None:
        with open(audio, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    if words is not None:
        h.update(words.content_hash().encode())
    if audio is None and words is None:
        h.update(story_id.encode())
    return Story(story_id, audio, words, duration, h.hexdigest())


def _register(exp: Experiment, story: Story) -> str:
    """Add a story and return its id.

    The same content under another name (a copied wav with the same words) is the
    same story, so that its presentations count as repeats; different content under
    a known name gets an id of its own.
    """
    for known in exp.stories.values():
        if known.content_hash == story.content_hash:
            if known.id != story.id:
                exp.notes.append(f"{story.id} has the same audio and words as {known.id}: "
                                 "treated as the same story")
            return known.id
    story_id = story.id if story.id not in exp.stories else f"{story.id}-{story.content_hash[:8]}"
    exp.stories[story_id] = replace(story, id=story_id)
    return story_id


def _check_required_stimuli(exp: Experiment, cfg: RunConfig) -> None:
    for story in exp.stories.values():
        if cfg.needs_words and story.words is None:
            raise MissingInputError(
                f"no word timing for story {story.id} (looked beside its audio, in stimuli/gentle/, "
                f"TextGrids/); language-model features need one: give --word-timing {story.id}=FILE"
            )
        if cfg.needs_words and len(story.words.without_non_words()) == 0:
            raise DataError(f"{story.words.source}: word timing for story {story.id} holds no words")


# --------------------------------------------------------------------------- helpers

def _run_name(path: Path) -> str:
    return path.name.split("_bold")[0]


def _entities(path: Path) -> dict:
    """BIDS key-value pairs from a file name, with their original zero-padding."""
    pairs = [part.split("-", 1) for part in _run_name(path).split("_") if "-" in part]
    return {k: v for k, v in pairs}


def _nearest_sidecar(path: Path, root: Path, suffix: str) -> Path | None:
    """The applicable sidecar by the BIDS inheritance principle (most specific, nearest)."""
    entities = _entities(path)
    folder = path.parent
    root = root.resolve()
    while True:
        best = None
        for candidate in folder.glob(f"*_{suffix}"):
            ents = _entities(candidate.with_name(candidate.name.replace(f"_{suffix}", "_bold.nii")))
            if ents and all(entities.get(k) == v for k, v in ents.items()):
                if best is None or len(ents) > len(best[0]):
                    best = (ents, candidate)
        if best is not None:
            return best[1]
        if folder.resolve() == root or folder.parent == folder:
            return None
        folder = folder.parent


def _short_list(items, n: int = 12) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


__all__ = ["Dataset", "detect_layout", "discover", "open_dataset", "select_participants"]

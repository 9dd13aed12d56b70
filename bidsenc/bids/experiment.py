"""What a participant heard and where their BOLD is: the discovery result.

These plain, immutable records are what the rest of the pipeline consumes.
Times are in seconds. A :class:`Segment` onset is relative to the start of the
run's first volume (negative when the stimulus began before it, e.g. after
dummy volumes were removed); word times are relative to the audio file's start.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Tokens the reference pipeline drops from word tiers (silences, noises).
NON_WORDS = frozenset({"", "sentence_start", "sentence_end", "br", "lg", "ls", "ns", "sp", "sil", "{sl}", "{ns}"})


@dataclass(frozen=True, eq=False)
class WordTimings:
    """Words of one stimulus with onset/offset in seconds from the audio's start."""

    words: tuple[str, ...]
    onsets: np.ndarray
    offsets: np.ndarray
    source: Path | None = None

    def __post_init__(self):
        onsets = np.asarray(self.onsets, dtype=float)
        offsets = np.asarray(self.offsets, dtype=float)
        if not (len(self.words) == onsets.shape[0] == offsets.shape[0]):
            raise ValueError("words, onsets and offsets differ in length")
        object.__setattr__(self, "onsets", onsets)
        object.__setattr__(self, "offsets", offsets)

    def __len__(self) -> int:
        return len(self.words)

    @property
    def midpoints(self) -> np.ndarray:
        """Word times as the reference uses them: the middle of each interval."""
        return (self.onsets + self.offsets) / 2

    def without_non_words(self) -> WordTimings:
        """Drop blanks and the reference's non-word tokens (``sp``, ``br``, ...)."""
        keep = [i for i, w in enumerate(self.words) if w.strip().lower() not in NON_WORDS]
        return WordTimings(
            tuple(self.words[i] for i in keep), self.onsets[keep], self.offsets[keep], self.source
        )

    def content_hash(self) -> str:
        h = hashlib.sha256()
        h.update("\x1f".join(self.words).encode())
        h.update(np.round(self.onsets, 4).tobytes())
        h.update(np.round(self.offsets, 4).tobytes())
        return h.hexdigest()


@dataclass(frozen=True, eq=False)
class Story:
    """One stimulus, identified by its content (stim_file or ds003020 story name)."""

    id: str
    audio: Path | None
    words: WordTimings | None
    duration: float | None
    content_hash: str
    #: Where the audio was expected when it is missing (a stim_file not in the stimuli folder).
    missing_audio: Path | None = None


@dataclass(frozen=True)
class Segment:
    """A story presented in a run, starting ``onset`` seconds after the first volume."""

    story_id: str
    onset: float


@dataclass(frozen=True)
class BoldSource:
    """Where a run's responses come from.

    ``kind`` is ``"nifti"`` (volume + optional mask), ``"gifti"`` (left and right
    hemisphere files), ``"cifti"`` (a CIFTI-2 dense time series; ``density`` its ``den``
    entity) or ``"hdf5"`` (ds003020 preprocessed responses; ``key`` names
    the dataset and ``repeat`` the row of a multi-repeat test file).
    """

    kind: str
    paths: tuple[Path, ...]
    space: str | None = None
    mask: Path | None = None
    key: str | None = None
    repeat: int | None = None
    preprocessed_by: str | None = None
    #: fMRIPrep's confounds table of the run (``*_desc-confounds_timeseries.tsv``), if any.
    confounds: Path | None = None
    density: str | None = None


@dataclass(frozen=True)
class Run:
    """One functional run that presented at least one story."""

    name: str
    entities: dict
    tr: float
    n_volumes: int
    slice_time_ref: float
    bold: BoldSource
    segments: tuple[Segment, ...]
    events: Path | None = None
    #: Volumes the source already dropped at the start and end (ds003020 hdf5: 10 and 10).
    trimmed_start: int = 0
    trimmed_end: int = 0


@dataclass(frozen=True)
class SkippedRun:
    name: str
    reason: str


@dataclass
class Experiment:
    """One participant's story runs, the stories they heard, and what was skipped."""

    participant: str
    layout: str
    runs: list[Run]
    stories: dict[str, Story]
    skipped: list[SkippedRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def presentations(self) -> Counter:
        """How many times each story was heard."""
        return Counter(seg.story_id for run in self.runs for seg in run.segments)

    @property
    def repeated_stories(self) -> list[str]:
        """Stories heard more than once: the test set and the noise ceiling."""
        return sorted(s for s, n in self.presentations().items() if n > 1)

    def to_dict(self) -> dict:
        counts = self.presentations()
        return {
            "participant": self.participant,
            "layout": self.layout,
            "runs": [
                {
                    "name": r.name,
                    "entities": r.entities,
                    "tr": r.tr,
                    "n_volumes": r.n_volumes,
                    "slice_time_ref": r.slice_time_ref,
                    "trimmed_start": r.trimmed_start,
                    "trimmed_end": r.trimmed_end,
                    "bold": {
                        "kind": r.bold.kind,
                        "paths": [str(p) for p in r.bold.paths],
                        "space": r.bold.space,
                        "mask": str(r.bold.mask) if r.bold.mask else None,
                        "key": r.bold.key,
                        "repeat": r.bold.repeat,
                        "preprocessed_by": r.bold.preprocessed_by,
                        "confounds": str(r.bold.confounds) if r.bold.confounds else None,
                        "density": r.bold.density,
                    },
                    "events": str(r.events) if r.events else None,
                    "segments": [{"story": s.story_id, "onset": s.onset} for s in r.segments],
                }
                for r in self.runs
            ],
            "stories": {
                sid: {
                    "audio": str(s.audio) if s.audio else None,
                    "missing_audio": str(s.missing_audio) if s.missing_audio else None,
                    "word_timings": str(s.words.source) if s.words and s.words.source else None,
                    "n_words": len(s.words.without_non_words()) if s.words else None,
                    "duration": s.duration,
                    "presentations": counts[sid],
                    "content_hash": s.content_hash,
                }
                for sid, s in sorted(self.stories.items())
            },
            "repeats": {sid: counts[sid] for sid in self.repeated_stories},
            "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def input_files(self) -> list[Path]:
        """Every file the fit reads: responses (with masks and confounds), events, audio, word timings."""
        files = []
        for run in self.runs:
            files += [*run.bold.paths, run.bold.mask, run.bold.confounds, run.events]
        for story in self.stories.values():
            files += [story.audio, story.words.source if story.words is not None else None]
        return sorted({Path(f) for f in files if f is not None})

    def inputs_fingerprint(self) -> str:
        """A digest of what was found (runs, onsets, stories) and of each input file's size and change time.

        Size and modification time, as make and rsync compare files: a BOLD file rewritten
        by a new fMRIPrep run, an edited events.tsv or a new session changes it, without
        reading gigabytes of data to tell.
        """
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode())
        for path in self.input_files():
            try:
                stat = path.stat()
                digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
            except OSError:
                digest.update(f"{path}\0missing\0".encode())
        return digest.hexdigest()[:16]

"""Word timings from alignment files: Praat TextGrid, Gentle, word tables, events.tsv.

Every reader returns :class:`~bidsenc.bids.experiment.WordTimings` in file order,
times in seconds from the audio's start. Blank labels are dropped; other
non-words (``sp``, ``br``, ...) are kept for ``WordTimings.without_non_words()``.
Malformed input raises :class:`~bidsenc.errors.DataError` (exit 65) with one line
naming the file; an absent file raises :class:`~bidsenc.errors.MissingInputError`.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from praatio import textgrid

from bidsenc.bids.experiment import WordTimings
from bidsenc.errors import DataError, MissingInputError

#: Column names accepted in word tables (case-insensitive; first match wins).
WORD_COLUMNS = ("word", "text", "token")
START_COLUMNS = ("start", "onset")
END_COLUMNS = ("end", "offset")
#: Columns of events.tsv that may hold the word of a word row.
EVENT_WORD_COLUMNS = ("word", "text", "token", "value")

_WORD_TIER = re.compile(r"(?:.*[\s_-])?words?", re.IGNORECASE)  # word, Words, spk1 - words
_PHONE_TIER = re.compile(r"phon", re.IGNORECASE)  # phone, phones, phonemes
_SILENCES = {"sil", "sp", "spn", "sli", "pau", "br", "lg", "ls", "ns"}
_GENTLE_KEEP = ("success", "not-found-in-audio")  # the cases Gentle writes to align.csv
_MISSING = {"", "n/a", "nan"}

# Praat text-file fields checked before and after praatio parses (it drops minus signs
# in the long format and stops quietly where a file is truncated).
_LONG_NEGATIVE = re.compile(r"^[ \t]*(?:xmin|xmax|number)\s*=\s*-", re.MULTILINE)
_LONG_TIERS = re.compile(r"^\s*size\s*=\s*(\d+)", re.MULTILINE)
_LONG_ENTRIES = re.compile(r"^\s*(?:intervals|points)\s*:\s*size\s*=\s*(\d+)", re.MULTILINE)
_SHORT_TIERS = re.compile(r"<exists>\s+(\d+)")
_SHORT_ENTRIES = re.compile(  # class, name, xmin, xmax, size
    r'^\s*"(?:IntervalTier|TextTier)"\s+"(?:[^"]|"")*"\s+\S+\s+\S+\s+(\d+)', re.MULTILINE
)


# --------------------------------------------------------------------------- readers

def read_textgrid(path: Path | str, tier: str | None = None) -> WordTimings:
    """Read the word tier of a Praat TextGrid (long or short text format).

    Parameters
    ----------
    path : Path or str
        The TextGrid; UTF-8, or UTF-16 with a byte-order mark; LF or CRLF.
    tier : str, optional
        Name of the word tier. By default: a tier named like ``word(s)``; else,
        in a two-tier grid, the one whose name does not look like phones; else
        the interval tier with the fewest labelled intervals.

    Returns
    -------
    WordTimings
        Non-empty intervals of that tier.
    """
    path = _existing(path)
    tg = _open_textgrid(path)
    chosen = _word_tier(path, tg, tier)
    entries = [e for e in chosen.entries if e.label.strip()]
    return _timings(path, [e.label for e in entries], [e.start for e in entries], [e.end for e in entries])


def read_phone_times(path: Path | str) -> np.ndarray | None:
    """Midpoints (s) of the labelled intervals of a TextGrid's phone tier, or None when it has none.

    The phone tier is the interval tier whose name looks like phones (``phone``,
    ``phones``, ``phonemes``); silences (``sil``, ``sp``, blanks) are not phones.
    """
    path = _existing(path)
    tg = _open_textgrid(path)
    tiers = [t for t in tg.tiers if isinstance(t, textgrid.IntervalTier) and _PHONE_TIER.search(t.name)]
    if not tiers:
        return None
    entries = [e for e in tiers[0].entries if e.label.strip() and e.label.strip().lower() not in _SILENCES]
    return np.array([(e.start + e.end) / 2 for e in entries], dtype=float)


def _open_textgrid(path: Path):
    """Parse a TextGrid (long or short format), refusing what praatio would misread silently."""
    text = _read_text(path)
    long_format = "item [" in text and "ooTextFile short" not in text  # as praatio decides
    negative = _LONG_NEGATIVE.search(text) if long_format else None
    if negative:  # praatio would drop the sign or fail obscurely
        line = text.count("\n", 0, negative.start()) + 1
        raise _fail(path, f"line {line} holds a negative time")
    try:
        tg = textgrid.openTextgrid(str(path), includeEmptyIntervals=True, duplicateNamesMode="rename")
    except OSError:
        raise
    except Exception as err:  # praatio raises ParsingError, ValueError, IndexError, ... on bad text
        raise _fail(path, f"not a valid Praat TextGrid ({type(err).__name__}: {err})") from None
    _check_complete(path, text, long_format, tg)
    return tg


def read_gentle_csv(path: Path | str) -> WordTimings:
    """Read a Gentle ``align.csv``.

    The file has no header; its columns are word, aligned word, onset, offset.
    Onset and offset are empty for words Gentle did not find in the audio: those
    keep their place and get times interpolated (see :func:`read_gentle_json`).
    """
    path = _existing(path)
    words, onsets, offsets, rows = [], [], [], []
    for n, row in enumerate(csv.reader(io.StringIO(_read_text(path))), start=1):
        if len(row) > 4:
            raise _fail(path, f"line {n} has {len(row)} fields; Gentle align.csv has 4 "
                              "(word, aligned word, onset, offset)")
        word, _, start, end = (row + ["", "", "", ""])[:4]
        if not word.strip():
            continue
        words.append(word.strip())
        onsets.append(_number(path, start, f"line {n}", "onset"))
        offsets.append(_number(path, end, f"line {n}", "offset"))
        rows.append(f"line {n}")
    return _interpolated(path, words, onsets, offsets, rows)


def read_gentle_json(path: Path | str) -> WordTimings:
    """Read a Gentle ``align.json``.

    Words whose ``case`` is ``success`` or ``not-found-in-audio`` are kept (as in
    Gentle's own CSV export). A word without ``start``/``end`` gets its onset and
    offset linearly interpolated over word index between the nearest aligned
    words; before the first or after the last aligned word it takes that word's
    times. A file with no aligned word is an error.
    """
    path = _existing(path)
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise _fail(path, f"not valid JSON ({err})") from None
    entries = data.get("words") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise _fail(path, "has no 'words' list; not a Gentle align.json")
    words, onsets, offsets, rows = [], [], [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise _fail(path, f"words[{i}] is not an object")
        word = str(entry.get("word") or "").strip()
        if entry.get("case", "success") not in _GENTLE_KEEP or not word:
            continue
        words.append(word)
        onsets.append(_number(path, entry.get("start"), f"words[{i}]", "start"))
        offsets.append(_number(path, entry.get("end"), f"words[{i}]", "end"))
        rows.append(f"words[{i}]")
    return _interpolated(path, words, onsets, offsets, rows)


def read_word_table(path: Path | str) -> WordTimings:
    """Read a tsv/csv table with one row per word.

    Columns (case-insensitive): the word in ``word``, ``text`` or ``token``; the
    onset in ``start`` or ``onset``; the offset in ``end`` or ``offset``, or else
    ``onset + duration``. The delimiter follows the extension and is sniffed when
    the header does not contain it. Tables that repeat a word's row once per
    sub-token are collapsed: consecutive rows with the same ``word_idx`` (when
    that column exists), else with the same word, onset and offset, become one.
    """
    path = _existing(path)
    text = _read_text(path)
    try:
        df = pd.read_csv(io.StringIO(text), sep=_delimiter(path, text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise _fail(path, f"not a readable table ({err})") from None
    cols = {str(c).strip().lower(): c for c in df.columns}
    word, start = _first(cols, WORD_COLUMNS), _first(cols, START_COLUMNS)
    end, duration = _first(cols, END_COLUMNS), cols.get("duration")
    if word is None or start is None or (end is None and duration is None):
        raise _fail(path, f"word table has columns {', '.join(map(str, df.columns)) or '(none)'}; "
                          "expected word|text|token, start|onset and end|offset|duration")
    key = df[[cols["word_idx"]] if "word_idx" in cols else [word, start, end or duration]]
    df = df[(key != key.shift()).any(axis=1)]
    df = df[df[word].str.strip() != ""]
    rows = [f"line {i + 2}" for i in df.index]
    onsets = _numbers(path, df[start], rows, start)
    if end is not None:
        offsets = _numbers(path, df[end], rows, end)
    else:
        offsets = onsets + _numbers(path, df[duration], rows, duration)
    return _timings(path, df[word].str.strip().tolist(), onsets, offsets, rows)


def read_events_words(events: pd.DataFrame | Path | str, source: Path | None = None) -> WordTimings | None:
    """Word rows of a BIDS events.tsv, or None when it has none.

    Word rows are those whose ``trial_type`` is ``word`` (any case); when no row
    is, every row counts if a ``word`` column exists. The word is read from the
    first of the columns ``word``, ``text``, ``token``, ``value``; rows where it is
    blank or ``n/a`` are dropped. Onset is ``onset``; offset is
    ``onset + duration``, or the next word row's onset where the duration is
    ``n/a`` (the onset itself for the last row). Times stay as in the file,
    relative to the run's first volume, so negative onsets are allowed.

    Parameters
    ----------
    events : DataFrame, Path or str
        The events table, or the path of the events.tsv.
    source : Path, optional
        Recorded as the timings' source when ``events`` is a DataFrame.
    """
    if isinstance(events, (str, Path)):
        source = _existing(events)
        try:
            events = pd.read_csv(io.StringIO(_read_text(source)), sep="\t", dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise _fail(source, f"not a readable TSV ({err})") from None
    cols = {str(c).strip().lower(): c for c in events.columns}
    is_word = pd.Series(False, index=events.index)
    if "trial_type" in cols:
        is_word = events[cols["trial_type"]].astype(str).str.strip().str.lower() == "word"
    if not is_word.any():
        if "word" not in cols:
            return None
        is_word = pd.Series(True, index=events.index)
    word_col = _first(cols, EVENT_WORD_COLUMNS)
    if word_col is None:
        raise _fail(source, f"has word rows but no column holding the word "
                            f"(expected one of {', '.join(EVENT_WORD_COLUMNS)})")
    if "onset" not in cols:
        raise _fail(source, "has word rows but no onset column")
    rows_df = events[is_word]
    rows = [f"line {i + 2}" if source else f"row {i}" for i in rows_df.index]
    onsets = _numbers(source, rows_df[cols["onset"]], rows, "onset")
    offsets = onsets + (_numbers(source, rows_df[cols["duration"]], rows, "duration", missing_ok=True)
                        if "duration" in cols else np.nan)
    gaps = np.isnan(offsets)
    offsets[gaps] = np.append(onsets[1:], onsets[-1:])[gaps]
    words = rows_df[word_col].astype(str).str.strip()
    keep = (rows_df[word_col].notna() & ~words.str.lower().isin({"", "n/a"})).to_numpy()
    if not keep.any():
        return None
    return _timings(source, words[keep].tolist(), onsets[keep], offsets[keep],
                    [r for r, k in zip(rows, keep) if k], allow_negative=True)


def read_word_timings(path: Path | str) -> WordTimings:
    """Read a word timing file, choosing the reader by its suffix.

    ``.TextGrid`` -> :func:`read_textgrid`; ``.json`` -> :func:`read_gentle_json`;
    ``.tsv`` -> :func:`read_word_table`; ``.csv`` -> :func:`read_word_table` when
    its first row names word and onset columns, else :func:`read_gentle_csv`.
    """
    path = _existing(path)
    suffix = path.suffix.lower()
    if suffix == ".textgrid":
        return read_textgrid(path)
    if suffix == ".json":
        return read_gentle_json(path)
    if suffix == ".tsv":
        return read_word_table(path)
    if suffix == ".csv":
        return read_word_table(path) if _has_table_header(path) else read_gentle_csv(path)
    raise _fail(path, f"unknown word timing format {path.suffix!r}; "
                      "expected .TextGrid, .json (Gentle), .csv or .tsv")


def find_word_timings(stimulus_path: Path | None, story_id: str, search_dirs: list[Path]) -> Path | None:
    """Find the word timing file of a story; the first existing file wins.

    Search order:

    1. beside the audio ``<dir>/<stem>.wav``: ``<stem>.TextGrid``,
       ``<stem>.textgrid``, ``<stem>.tsv``, ``<stem>.csv``, ``<stem>_align.csv``,
       ``<stem>_align.json``;
    2. in each search dir, in order, for each name in (``story_id``, ``<stem>``,
       ``<stem>`` without a trailing ``_audio``): ``gentle/<name>/align.csv``,
       ``gentle/<name>/align.json``, ``TextGrids/<name>.TextGrid``,
       ``<name>.TextGrid``.

    The ``_audio`` rule finds Narratives' ``stimuli/gentle/pieman/align.csv``
    for ``stimuli/pieman_audio.wav``.
    """
    candidates = []
    stem = None
    if stimulus_path is not None:
        stimulus_path = Path(stimulus_path)
        stem = stimulus_path.stem
        for ext in (".TextGrid", ".textgrid", ".tsv", ".csv", "_align.csv", "_align.json"):
            candidates.append(stimulus_path.with_name(stem + ext))
    names = [story_id, stem, stem.removesuffix("_audio") if stem else None]
    names = [n for n in dict.fromkeys(names) if n and Path(n).name == n]  # plain names only
    for folder in map(Path, search_dirs):
        for name in names:
            candidates += [folder / "gentle" / name / "align.csv", folder / "gentle" / name / "align.json",
                           folder / "TextGrids" / f"{name}.TextGrid", folder / f"{name}.TextGrid"]
    return next((c for c in candidates if c.is_file()), None)


# --------------------------------------------------------------------------- helpers

def _fail(path, what: str) -> DataError:
    """A one-line DataError naming the file (``path`` None: an events table in memory)."""
    return DataError(f"{path if path is not None else 'events table'}: {' '.join(str(what).split())}")


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path} does not exist or is not a file")
    return path


def _read_text(path: Path) -> str:
    """Text of a file in UTF-8 (optional BOM) or UTF-16 with BOM; LF or CRLF."""
    data = path.read_bytes()
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        return data.decode(encoding).replace("\r\n", "\n")
    except UnicodeDecodeError as err:
        raise _fail(path, f"is not UTF-8 or UTF-16 text ({err.reason} at byte {err.start})") from None


def _first(cols: dict, names) -> str | None:
    return next((cols[n] for n in names if n in cols), None)


def _number(path, value, where: str, name: str) -> float:
    """One time value; empty or None is NaN (not aligned)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return np.nan
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = np.nan
    if not np.isfinite(number):
        raise _fail(path, f"{where}: {name} {value!r} is not a finite number")
    return number


def _numbers(path, values: pd.Series, rows: list, name, missing_ok: bool = False) -> np.ndarray:
    """A column of times as floats; missing values are NaN when allowed, else an error."""
    text = values.astype(str).str.strip()
    numbers = pd.to_numeric(text, errors="coerce").to_numpy(dtype=float)
    missing = (values.isna() | text.str.lower().isin(_MISSING)).to_numpy()
    bad = np.isnan(numbers) & ~(missing & missing_ok)
    if bad.any():
        i = int(np.argmax(bad))
        what = "is missing" if missing[i] else f"{str(values.iloc[i])!r} is not a number"
        raise _fail(path, f"{rows[i]}: {name} {what}")
    return numbers


def _interpolated(path, words, onsets, offsets, rows) -> WordTimings:
    """Fill unaligned (NaN) times by interpolation over word index, clamped at the ends."""
    onsets, offsets = np.asarray(onsets, float), np.asarray(offsets, float)
    aligned = ~np.isnan(onsets) & ~np.isnan(offsets)
    if not words:
        raise _fail(path, "holds no words")
    if not aligned.any():
        raise _fail(path, f"none of its {len(words)} words is aligned to the audio")
    index = np.arange(len(words))
    for times in (onsets, offsets):
        times[~aligned] = np.interp(index[~aligned], index[aligned], times[aligned])
    return _timings(path, words, onsets, offsets, rows)


def _timings(path, words, onsets, offsets, rows=None, allow_negative=False) -> WordTimings:
    """Validate times and build the record; the first bad row is named."""
    onsets, offsets = np.asarray(onsets, float), np.asarray(offsets, float)
    if not words:
        raise _fail(path, "holds no words")
    bad = ~np.isfinite(onsets) | ~np.isfinite(offsets) | ~(offsets >= onsets)
    if not allow_negative:
        bad |= onsets < 0
    if bad.any():
        i = int(np.argmax(bad))
        row = rows[i] if rows else f"word {i + 1}"
        need = "finite times, offset >= onset" + ("" if allow_negative else ", onset >= 0")
        raise _fail(path, f"{row} ({words[i]!r}): onset {onsets[i]:g}, offset {offsets[i]:g}; need {need}")
    return WordTimings(tuple(words), onsets, offsets, source=path)


def _delimiter(path: Path, text: str) -> str:
    header = text.split("\n", 1)[0]
    default = {".tsv": "\t", ".csv": ","}.get(path.suffix.lower())
    if default and default in header:
        return default
    try:
        return csv.Sniffer().sniff(header, delimiters="\t,;").delimiter
    except csv.Error:
        return default or "\t"


def _has_table_header(path: Path) -> bool:
    text = _read_text(path)
    header = next(csv.reader([text.split("\n", 1)[0]], delimiter=_delimiter(path, text)), [])
    names = {h.strip().lower() for h in header}
    return bool(names & set(WORD_COLUMNS)) and bool(names & set(START_COLUMNS))


def _check_complete(path: Path, text: str, long_format: bool, tg) -> None:
    """Raise when the grid holds fewer tiers or entries than its text declares."""
    tiers, entries = (_LONG_TIERS, _LONG_ENTRIES) if long_format else (_SHORT_TIERS, _SHORT_ENTRIES)
    declared = tiers.search(text)
    if declared is None:  # praatio's JSON form, or no tiers
        return
    if int(declared.group(1)) != len(tg.tiers):
        raise _fail(path, f"declares {declared.group(1)} tiers but holds {len(tg.tiers)} (truncated?)")
    sizes = entries.findall(text)
    if sizes and len(sizes) < len(tg.tiers):
        raise _fail(path, f"declares entry counts for {len(sizes)} of its {len(tg.tiers)} tiers (truncated?)")
    for tier, size in zip(tg.tiers, sizes):
        if int(size) != len(tier.entries):
            raise _fail(path, f"tier {tier.name!r} declares {size} entries but holds "
                              f"{len(tier.entries)} (truncated?)")


def _word_tier(path: Path, tg, name: str | None):
    if name is not None:
        if name not in tg.tierNames:
            raise _fail(path, f"has no tier named {name!r} (tiers: {', '.join(tg.tierNames)})")
        chosen = tg.getTier(name)
        if not isinstance(chosen, textgrid.IntervalTier):
            raise _fail(path, f"tier {name!r} is a point tier, not an interval tier of words")
        return chosen
    tiers = [t for t in tg.tiers if isinstance(t, textgrid.IntervalTier) and any(e.label for e in t.entries)]
    if not tiers:
        raise _fail(path, "has no interval tier with labels")
    named = [t for t in tiers if _WORD_TIER.fullmatch(t.name.strip())]
    if named:
        return named[0]
    not_phones = [t for t in tiers if not _PHONE_TIER.search(t.name) and not _looks_like_phones(t)]
    if not not_phones:
        raise _fail(path, f"holds phones only (tier(s) {', '.join(repr(t.name) for t in tiers)}), no word tier; "
                          "bidsenc needs word timings: give a TextGrid with a word tier (e.g. from the "
                          "Montreal Forced Aligner or Gentle)")
    if len(not_phones) == 1:
        return not_phones[0]
    return min(not_phones, key=lambda t: sum(1 for e in t.entries if e.label))


# ARPAbet vowels carry a stress digit (AH0, IY1); words never end in one.
_STRESSED_PHONE = re.compile(r"[A-Za-z]{1,2}[012]")


def _looks_like_phones(tier) -> bool:
    """A tier whose labels are ARPAbet phones (a fifth or more with stress digits), whatever its name."""
    labels = [e.label.strip() for e in tier.entries if e.label.strip()]
    return bool(labels) and sum(bool(_STRESSED_PHONE.fullmatch(x)) for x in labels) >= 0.2 * len(labels)

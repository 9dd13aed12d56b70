"""Word timing readers on real TextGrids and transcripts, and on generated edge cases."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from praatio import textgrid

from bidsenc.bids.words import (
    find_word_timings,
    read_events_words,
    read_gentle_csv,
    read_gentle_json,
    read_textgrid,
    read_word_table,
    read_word_timings,
)
from bidsenc.errors import DataError, MissingInputError

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared test data not found at {SHARED}")
PODCAST = SHARED / "ds005574-podcast-transcripts" / "stimuli"

BOBBY = DATA / "bobby_words.TextGrid"  # long format
MARY = DATA / "mary.TextGrid"  # short format, CRLF, IPA
BOBBY_WORDS = ("BOBBY", "RIPPED", "THE", "LEDGER")
BOBBY_ONSETS = [0.06469123242311078, 0.41156462585, 0.6576881808447274, 0.740816326531]
BOBBY_OFFSETS = [0.41156462585, 0.6576881808447274, 0.740816326531, 1.1171482864527198]


def assert_same(a, b):
    assert a.words == b.words
    np.testing.assert_array_equal(a.onsets, b.onsets)
    np.testing.assert_array_equal(a.offsets, b.offsets)


def assert_data_error(excinfo, path):
    """A DataError exits 65 with one line that names the file."""
    err = excinfo.value
    assert err.exit_code == 65
    assert Path(path).name in err.message
    assert "\n" not in err.message


def write_grid(path, tiers, fmt="long_textgrid"):
    """Write (name, [(start, end, label), ...]) interval tiers with praatio."""
    tg = textgrid.Textgrid()
    for name, entries in tiers:
        tg.addTier(textgrid.IntervalTier(name, entries, 0, 2.0))
    tg.save(str(path), format=fmt, includeBlankSpaces=True)
    return path


# --------------------------------------------------------------------------- TextGrid

def test_textgrid_long_format():
    words = read_textgrid(BOBBY)
    assert words.words == BOBBY_WORDS  # blank intervals dropped
    np.testing.assert_array_equal(words.onsets, BOBBY_ONSETS)
    np.testing.assert_array_equal(words.offsets, BOBBY_OFFSETS)
    assert words.source == BOBBY


def test_textgrid_short_format_crlf():
    assert b"\r\n" in MARY.read_bytes()
    words = read_textgrid(MARY)  # tiers: phone, word, pitch (point tier)
    assert words.words == ("mary", "rolled", "the", "barrel")
    np.testing.assert_array_equal(words.onsets, [0.3154201182247563, 0.6755499913498981,
                                                 0.9839070294779999, 1.063725623583])
    np.testing.assert_array_equal(words.offsets, [0.6755499913498981, 0.9839070294779999,
                                                  1.063725623583, 1.5182538944627297])


def test_textgrid_named_tier():
    phones = read_textgrid(MARY, tier="phone")
    assert len(phones) == 14 and "ə" in phones.words and "θ" in phones.words
    assert read_textgrid(BOBBY, tier="phrase").words == ("BOBBY RIPPED THE LEDGER",)
    with pytest.raises(DataError, match="no tier named 'words'.*phone, word, pitch") as excinfo:
        read_textgrid(MARY, tier="words")
    assert_data_error(excinfo, MARY)
    with pytest.raises(DataError, match="point tier"):
        read_textgrid(MARY, tier="pitch")


@pytest.mark.parametrize("source", [BOBBY, MARY], ids=["long", "short"])
@pytest.mark.parametrize("encoding, newline", [
    ("utf-8", "\n"), ("utf-8", "\r\n"), ("utf-8-sig", "\n"), ("utf-16", "\n"), ("utf-16", "\r\n"),
    ("utf-16-le", "\n"), ("utf-16-be", "\r\n"),
])
def test_textgrid_encodings_and_line_ends(tmp_path, source, encoding, newline):
    text = source.read_bytes().decode("utf-8").replace("\r\n", "\n").replace("\n", newline)
    data = text.encode(encoding)
    if encoding in ("utf-16-le", "utf-16-be"):  # Praat writes UTF-16 with a byte-order mark
        data = ("\ufeff" + text).encode(encoding)
    variant = tmp_path / source.name
    variant.write_bytes(data)
    assert_same(read_textgrid(variant), read_textgrid(source))
    assert read_textgrid(variant).source == variant


@pytest.mark.parametrize("source, fmt", [(BOBBY, "short_textgrid"), (MARY, "long_textgrid")])
def test_textgrid_long_and_short_agree(tmp_path, source, fmt):
    tg = textgrid.openTextgrid(str(source), includeEmptyIntervals=True)
    converted = tmp_path / "converted.TextGrid"
    tg.save(str(converted), format=fmt, includeBlankSpaces=True)
    assert_same(read_textgrid(converted), read_textgrid(source))


def _phones_and_words():
    words = [(s, e, w) for s, e, w in zip(BOBBY_ONSETS, BOBBY_OFFSETS, BOBBY_WORDS)]
    phones = [p for s, e, w in words for p in ((s, (s + e) / 2, w[0]), ((s + e) / 2, e, w[1:]))]
    return phones, words


@pytest.mark.parametrize("words_first", [False, True], ids=["phones-first", "words-first"])
@pytest.mark.parametrize("phone_tier, word_tier", [
    ("phone", "word"),  # ds003020
    ("phones", "Words"),
    ("speaker1 - phones", "speaker1 - words"),  # Montreal Forced Aligner
    ("phones", "transcript"),  # two tiers: the one not named like phones
    ("tier1", "tier2"),  # otherwise the fewest intervals
])
def test_textgrid_picks_word_tier(tmp_path, phone_tier, word_tier, words_first):
    phones, words = _phones_and_words()
    tiers = [(phone_tier, phones), (word_tier, words)]
    path = write_grid(tmp_path / "story.TextGrid", tiers[::-1] if words_first else tiers)
    assert read_textgrid(path).words == BOBBY_WORDS
    assert len(read_textgrid(path, tier=phone_tier)) == 2 * len(BOBBY_WORDS)


@needs_shared
def test_textgrid_with_only_a_phone_tier_is_refused():
    """Phones are not words: a grid without a word tier must not be read as one (issue 11)."""
    with pytest.raises(DataError, match="holds phones only"):
        read_textgrid(SHARED / "audio/praatio-utterances/examples/files/bobby_phones.TextGrid")


def test_textgrid_keeps_non_words(tmp_path):
    path = write_grid(tmp_path / "nw.TextGrid", [("words", [(0.1, 0.3, "sp"), (0.3, 0.6, "hello"),
                                                            (0.6, 0.8, "{ns}"), (0.8, 1.0, "world")])])
    words = read_textgrid(path)
    assert words.words == ("sp", "hello", "{ns}", "world")
    assert words.without_non_words().words == ("hello", "world")


@pytest.mark.parametrize("source", [BOBBY, MARY], ids=["long", "short"])
@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.3, 0.55, 0.75, 0.9, 0.99])
def test_textgrid_truncated(tmp_path, source, fraction):
    data = source.read_bytes()
    path = tmp_path / "cut.TextGrid"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(DataError) as excinfo:
        read_textgrid(path)
    assert_data_error(excinfo, path)


def test_textgrid_truncated_at_every_byte_never_passes_silently(tmp_path):
    data = BOBBY.read_bytes()
    path = tmp_path / "cut.TextGrid"
    for cut in range(0, len(data) - 2, 7):
        path.write_bytes(data[:cut])
        with pytest.raises(DataError):
            read_textgrid(path)


@pytest.mark.parametrize("content", [
    b"not a TextGrid at all\n",
    "xmin = 0\n".encode("latin-1") + b"text = \"caf\xe9\"\n",  # not UTF-8
    b'File type = "ooTextFile"\nObject class = "TextGrid"\n\nxmin = 0\nxmax = 1\ntiers? <absent>\n',
], ids=["garbage", "latin-1", "no-tiers"])
def test_textgrid_malformed(tmp_path, content):
    path = tmp_path / "bad.TextGrid"
    path.write_bytes(content)
    with pytest.raises(DataError) as excinfo:
        read_textgrid(path)
    assert_data_error(excinfo, path)


def test_textgrid_negative_time(tmp_path):
    path = tmp_path / BOBBY.name  # long format: praatio alone would drop the sign
    path.write_text(BOBBY.read_text().replace("xmin = 0.41156462585", "xmin = -0.41156462585"))
    with pytest.raises(DataError, match="line 24 holds a negative time") as excinfo:
        read_textgrid(path)
    assert_data_error(excinfo, path)
    path = write_grid(tmp_path / "short.TextGrid", [("words", [(-0.2, 0.3, "a"), (0.3, 0.5, "b")])],
                      fmt="short_textgrid")
    with pytest.raises(DataError, match="word 1 \\('a'\\): onset -0.2, offset 0.3") as excinfo:
        read_textgrid(path)
    assert_data_error(excinfo, path)


def test_textgrid_missing_file(tmp_path):
    with pytest.raises(MissingInputError) as excinfo:
        read_textgrid(tmp_path / "absent.TextGrid")
    assert excinfo.value.exit_code == 66


# --------------------------------------------------------------------------- Gentle

GENTLE_ROWS = [  # word, aligned word, onset, offset; None: not found in audio
    ("Well", None, None, None),
    ("So", "so", 0.5, 0.7),
    ("the", None, None, None),
    ("quick", None, None, None),
    ("fox's", "fox's", 1.1, 1.5),
    ("jumps", "jumps", 1.6, 1.9),
    ("away", None, None, None),
]
# Onsets and offsets interpolated over word index, clamped before the first and after the last.
GENTLE_ONSETS = [0.5, 0.5, 0.5 + 0.6 / 3, 0.5 + 1.2 / 3, 1.1, 1.6, 1.6]
GENTLE_OFFSETS = [0.7, 0.7, 0.7 + 0.8 / 3, 0.7 + 1.6 / 3, 1.5, 1.9, 1.9]


def write_gentle_csv(path, rows=GENTLE_ROWS):
    path.write_text("".join(",".join("" if v is None else str(v) for v in row) + "\r\n" for row in rows))
    return path


def write_gentle_json(path, rows=GENTLE_ROWS):
    words, offset = [], 0
    for word, aligned, start, end in rows:
        entry = {"word": word, "startOffset": offset, "endOffset": offset + len(word)}
        if start is None:
            entry["case"] = "not-found-in-audio"
        else:
            entry.update(case="success", alignedWord=aligned, start=start, end=end, phones=[])
        words.append(entry)
        offset += len(word) + 1
    words.insert(3, {"case": "not-found-in-transcript", "alignedWord": "uh", "start": 0.8, "end": 0.9})
    path.write_text(json.dumps({"transcript": " ".join(r[0] for r in rows), "words": words}))
    return path


@pytest.mark.parametrize("reader, writer", [(read_gentle_csv, write_gentle_csv),
                                            (read_gentle_json, write_gentle_json)], ids=["csv", "json"])
def test_gentle_interpolates_unaligned_words(tmp_path, reader, writer):
    path = writer(tmp_path / "align.x")
    words = reader(path)
    assert words.words == tuple(r[0] for r in GENTLE_ROWS)
    np.testing.assert_allclose(words.onsets, GENTLE_ONSETS, rtol=0, atol=1e-12)
    np.testing.assert_allclose(words.offsets, GENTLE_OFFSETS, rtol=0, atol=1e-12)
    assert words.source == path


def test_gentle_csv_quoted_word(tmp_path):
    path = tmp_path / "align.csv"
    path.write_text('"well, so",so,0.5,0.7\nyes,yes,0.8,0.9\n\n')
    assert read_gentle_csv(path).words == ("well, so", "yes")


@pytest.mark.parametrize("rows, message", [
    ([("a", None, None, None), ("b", None, None, None)], "none of its 2 words is aligned"),
    ([("a", "a", 0.1, 0.2), ("b", "b", "soon", 0.4)], "line 2: onset 'soon' is not a finite number"),
    ([("a", "a", -0.1, 0.2)], "line 1 .* need finite times, offset >= onset, onset >= 0"),
    ([("a", "a", 0.1, 0.2), ("b", "b", 0.5, 0.4)], "line 2 \\('b'\\): onset 0.5, offset 0.4"),
    ([("a", "a", 0.1, 0.2, "x")], "line 1 has 5 fields"),
    ([], "holds no words"),
])
def test_gentle_csv_malformed(tmp_path, rows, message):
    path = write_gentle_csv(tmp_path / "align.csv", rows)
    with pytest.raises(DataError, match=message) as excinfo:
        read_gentle_csv(path)
    assert_data_error(excinfo, path)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"transcript": "a"}', "no 'words' list"),
    ('{"words": [{"word": "a", "case": "success", "start": 0.4, "end": 0.2}]}', "words\\[0\\]"),
    ('{"words": [{"word": "a", "case": "not-found-in-audio"}]}', "none of its 1 words"),
])
def test_gentle_json_malformed(tmp_path, content, message):
    path = tmp_path / "align.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as excinfo:
        read_gentle_json(path)
    assert_data_error(excinfo, path)


# --------------------------------------------------------------------------- word tables

PODCAST_WORDS = {  # words after collapsing sub-token rows; first word 'Act' at 3.71-3.79 s
    "spectral": 5136, "en_core_web_lg": 5136, "gpt2-xl": 5136, "syntactic": 5136,
    "whisper-medium": 5134,  # two words (word_idx 1561, 4314) absent from this variant
    "phonetic": 5028,  # words without a phonetic transcription absent
}


@needs_shared
@pytest.mark.parametrize("variant", sorted(PODCAST_WORDS))
def test_podcast_transcripts(variant):
    path = PODCAST / variant / "transcript.tsv"
    words = read_word_timings(path)
    table = pd.read_csv(path, sep="\t")
    assert len(words) == PODCAST_WORDS[variant] == table["word_idx"].nunique()
    assert words.words[:3] == ("Act", "one,", "monkey")
    assert (words.onsets[0], words.offsets[0]) == (3.71, 3.79)
    assert words.source == path


@needs_shared
@pytest.mark.parametrize("variant", ["en_core_web_lg", "gpt2-xl", "syntactic"])
def test_podcast_sub_token_rows_collapse_to_words(variant):
    """Variants with a row per sub-token give exactly the one-row-per-word variant."""
    assert len(pd.read_csv(PODCAST / variant / "transcript.tsv", sep="\t")) > 5136
    assert_same(read_word_table(PODCAST / variant / "transcript.tsv"),
                read_word_table(PODCAST / "spectral" / "transcript.tsv"))


@pytest.mark.parametrize("name, content", [
    ("words.tsv", "word\tstart\tend\nhello\t0.5\t0.8\nworld\t0.9\t1.25\n"),
    ("words.csv", "Text,Onset,Offset\nhello,0.5,0.8\nworld,0.9,1.25\n"),
    ("words.csv", "token;onset;duration\nhello;0.5;0.3\nworld;0.9;0.35\n"),  # sniffed delimiter
    ("words.tsv", "word\tonset\tduration\nhello\t0.5\t0.3\nhello\t0.5\t0.3\nworld\t0.9\t0.35\n"),
    ("words.tsv", "word_idx\tword\tstart\tend\ttoken\n0\thello\t0.5\t0.8\thel\n0\thello\t0.5\t0.8\tlo\n"
                  "1\tworld\t0.9\t1.25\tworld\n2\t \t1.3\t1.4\t \n"),
], ids=["tsv", "csv-names", "semicolon-duration", "repeated-rows", "word_idx"])
def test_word_table(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    words = read_word_table(path)
    assert words.words == ("hello", "world")
    np.testing.assert_allclose(words.onsets, [0.5, 0.9])
    np.testing.assert_allclose(words.offsets, [0.8, 1.25])


def test_word_table_keeps_na_like_words(tmp_path):
    path = tmp_path / "words.tsv"
    path.write_text("word\tstart\tend\nNA\t0.1\t0.2\nnan\t0.3\t0.4\nnull\t0.5\t0.6\n")
    assert read_word_table(path).words == ("NA", "nan", "null")


@pytest.mark.parametrize("content, message", [
    ("word\tbegin\tstop\na\t0.1\t0.2\n", re.escape(
        "has columns word, begin, stop; expected word|text|token, start|onset and end|offset|duration")),
    ("start\tend\n0.1\t0.2\n", "has columns start, end"),
    ("word\tstart\tend\na\t0.1\t0.2\nb\tlater\t0.5\n", "line 3: start 'later' is not a number"),
    ("word\tstart\tend\na\t0.1\t0.2\nb\t\t0.5\n", "line 3: start is missing"),
    ("word\tstart\tend\na\t-0.1\t0.2\n", "line 2 \\('a'\\): onset -0.1"),
    ("word\tstart\tend\na\t0.1\t0.2\nb\t0.5\t0.4\n", "line 3 \\('b'\\): onset 0.5, offset 0.4"),
    ("word\tstart\tend\n", "holds no words"),
])
def test_word_table_malformed(tmp_path, content, message):
    path = tmp_path / "words.tsv"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as excinfo:
        read_word_table(path)
    assert_data_error(excinfo, path)


# --------------------------------------------------------------------------- events.tsv

EVENTS = (
    "onset\tduration\ttrial_type\tword\n"
    "-0.5\t0.3\tword\tOnce\n"
    "0.0\tn/a\tWord\tupon\n"
    "0.4\t0.2\tword\tn/a\n"
    "0.9\t0.3\tword\ttime\n"
    "5.0\t10.0\tstory\tn/a\n"
    "7.0\tn/a\tword\tend\n"
)


def test_events_words(tmp_path):
    path = tmp_path / "sub-01_task-x_events.tsv"
    path.write_text(EVENTS)
    words = read_events_words(path)
    assert words.words == ("Once", "upon", "time", "end")  # n/a word dropped, story row skipped
    np.testing.assert_allclose(words.onsets, [-0.5, 0.0, 0.9, 7.0])  # negative onsets are legal
    np.testing.assert_allclose(words.offsets, [-0.2, 0.4, 1.2, 7.0])  # n/a: next onset; last: onset
    assert words.source == path
    # as discover reads it: n/a as NaN
    frame = pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False)
    from_frame = read_events_words(frame, source=path)
    assert_same(from_frame, words)
    assert read_events_words(frame).source is None


def test_events_word_column_without_trial_type(tmp_path):
    frame = pd.DataFrame({"onset": [1.0, 2.0], "duration": [0.5, 0.5], "word": ["a", "b"]})
    assert read_events_words(frame).words == ("a", "b")


def test_events_word_from_value_column():
    frame = pd.DataFrame({"onset": [1.0, 2.0], "duration": [0.5, 0.5], "trial_type": ["word", "word"],
                          "value": ["a", "b"]})
    assert read_events_words(frame).words == ("a", "b")


@pytest.mark.parametrize("frame", [
    pd.DataFrame({"onset": [0.0, 15.0], "duration": [15.0, 400.0], "trial_type": ["music", "story"],
                  "stim_file": ["pieman_audio.wav"] * 2}),
    pd.DataFrame({"onset": [0.0], "duration": [1.0], "trial_type": ["word"], "word": ["n/a"]}),
], ids=["narratives", "only-na-words"])
def test_events_without_words(frame):
    assert read_events_words(frame) is None


def test_events_word_rows_without_word_column(tmp_path):
    path = tmp_path / "events.tsv"
    path.write_text("onset\tduration\ttrial_type\n0.0\t0.3\tword\n")
    with pytest.raises(DataError, match="no column holding the word") as excinfo:
        read_events_words(path)
    assert_data_error(excinfo, path)


# --------------------------------------------------------------------------- dispatch and search

def test_read_word_timings_dispatch(tmp_path):
    (tmp_path / "lower.textgrid").write_bytes(BOBBY.read_bytes())
    assert read_word_timings(tmp_path / "lower.textgrid").words == BOBBY_WORDS
    assert read_word_timings(MARY).words == ("mary", "rolled", "the", "barrel")
    gentle = write_gentle_csv(tmp_path / "align.csv")
    np.testing.assert_allclose(read_word_timings(gentle).onsets, GENTLE_ONSETS, rtol=0, atol=1e-12)
    gentle_json = write_gentle_json(tmp_path / "align.json")
    assert len(read_word_timings(gentle_json)) == len(GENTLE_ROWS)
    table = tmp_path / "table.csv"
    table.write_text("word,start,end\nword,0.1,0.2\n")
    assert read_word_timings(table).words == ("word",)
    headerless = tmp_path / "headerless.csv"
    headerless.write_text("word,word,0.1,0.2\n")  # a Gentle row whose word is 'word'
    assert read_word_timings(headerless).words == ("word",)


def test_read_word_timings_unknown_or_missing(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("hello 0.1 0.2\n")
    with pytest.raises(DataError, match="unknown word timing format '.txt'") as excinfo:
        read_word_timings(path)
    assert_data_error(excinfo, path)
    with pytest.raises(MissingInputError):
        read_word_timings(tmp_path / "absent.TextGrid")


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    return path


def test_find_word_timings_narratives(tmp_path):
    stimuli = tmp_path / "stimuli"
    audio = _touch(stimuli / "pieman_audio.wav")
    dirs = [stimuli, tmp_path / "derivative"]
    assert find_word_timings(audio, "pieman_audio", dirs) is None
    gentle = _touch(stimuli / "gentle" / "pieman" / "align.csv")  # the `_audio` rule
    assert find_word_timings(audio, "pieman_audio", dirs) == gentle
    # a timing file beside the audio comes first
    beside = _touch(stimuli / "pieman_audio_align.json")
    assert find_word_timings(audio, "pieman_audio", dirs) == beside
    textgrid_beside = _touch(stimuli / "pieman_audio.TextGrid")
    assert find_word_timings(audio, "pieman_audio", dirs) == textgrid_beside


def test_find_word_timings_ds003020(tmp_path):
    grid = _touch(tmp_path / "derivative" / "TextGrids" / "wheretheressmoke.TextGrid")
    dirs = [tmp_path / "stimuli", tmp_path / "derivative"]
    assert find_word_timings(None, "wheretheressmoke", dirs) == grid
    assert find_word_timings(tmp_path / "stimuli" / "wheretheressmoke.wav", "wheretheressmoke", dirs) == grid
    # earlier search dirs win, and the story id before the audio's stem
    first = _touch(tmp_path / "stimuli" / "wheretheressmoke.TextGrid")
    assert find_word_timings(None, "wheretheressmoke", dirs) == first
    by_id = _touch(tmp_path / "stimuli" / "gentle" / "story1" / "align.json")
    assert find_word_timings(tmp_path / "sounds" / "wheretheressmoke.wav", "story1", dirs) == by_id


def test_find_word_timings_ignores_path_like_ids(tmp_path):
    _touch(tmp_path / "elsewhere" / "x.TextGrid")
    (tmp_path / "stimuli").mkdir()
    assert find_word_timings(None, "../elsewhere/x", [tmp_path / "stimuli"]) is None

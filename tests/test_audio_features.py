"""Speech-model features on real audio: windows, batched == reference loop, causality, errors.

Tiny Whisper, HuBERT and WavLM models are built locally (random weights) and
run on the first seconds of tests/data/jfk.flac with a 1 s context, so that
both growing and full-length windows occur.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from bidsenc.bids.audio import load_audio
from bidsenc.errors import DataError, MissingInputError, UsageError
from bidsenc.features import audio as fa
from bidsenc.features.audio import (
    extract_audio_features,
    extract_audio_features_reference_loop,
    load_audio_model,
    whisper_last_frame,
    window_bounds,
)

JFK = Path(__file__).parent / "data" / "jfk.flac"
CONTEXT = 1.0  # shortened: windows grow for 1.1 s, then stay at 1.1 s
TOL = 1e-4
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)


def _save_ssl(folder: Path, model_cls, config, *, do_normalize=True, return_attention_mask=False) -> Path:
    from transformers import Wav2Vec2FeatureExtractor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_cls(config).eval()
    model.save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                             do_normalize=do_normalize,
                             return_attention_mask=return_attention_mask).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from transformers import HubertConfig, HubertModel, WavLMConfig, WavLMModel

    from bidsenc.synth.models import make_whisper_encoder

    root = tmp_path_factory.mktemp("audio-models")
    return {
        "whisper": Path(make_whisper_encoder(root)["path"]),
        "hubert": _save_ssl(root / "hubert", HubertModel, HubertConfig(**TINY)),
        "wavlm": _save_ssl(root / "wavlm", WavLMModel, WavLMConfig(**TINY)),
        # HuBERT-large style: layer norm in the conv encoder, stable layer norm, attention mask.
        "hubert-ln": _save_ssl(root / "hubert-ln", HubertModel,
                               HubertConfig(**TINY, feat_extract_norm="layer", do_stable_layer_norm=True,
                                            conv_bias=True),
                               return_attention_mask=True),
    }


@pytest.fixture(scope="module")
def models(model_dirs):
    return {name: load_audio_model(str(path)) for name, path in model_dirs.items()}


@pytest.fixture(scope="module")
def jfk():
    samples, rate = load_audio(JFK, sample_rate=16000)
    assert rate == 16000
    return samples[: int(3.5 * rate)]


@pytest.fixture(scope="module")
def reference(models, jfk):
    return {name: extract_audio_features_reference_loop(m, jfk, layers=list(range(m.n_layers + 1)),
                                                         context=CONTEXT)
            for name, m in models.items()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


# ----------------------------------------------------------------------------- windows


def test_first_windows_grow_then_stay_at_16_1_s():
    starts, ends, times = window_bounds(20 * 16000)
    lengths = (ends - starts) / 16000
    assert len(times) == 200
    np.testing.assert_allclose(lengths[:5], [0.1, 0.2, 0.3, 0.4, 0.5])
    np.testing.assert_allclose(lengths[:161], np.arange(1, 162) * 0.1)
    assert np.all(ends - starts <= 257600) and np.all(ends[160:] - starts[160:] == 257600)
    assert np.all(starts[:161] == 0) and starts[161] == 1600
    np.testing.assert_allclose(times, np.arange(1, 201) * 0.1, atol=1e-12)
    assert np.array_equal(times, ends / 16000)


def test_window_count_for_a_1_25_s_clip():
    starts, ends, times = window_bounds(20000)  # 1.25 s: 12 whole steps, 0.05 s left over
    assert len(times) == 12
    assert ends[-1] == 19200 and times[-1] == pytest.approx(1.2)
    assert np.all(starts == 0)


def test_windows_with_a_shorter_context():
    starts, ends, times = window_bounds(3 * 16000, step=0.1, context=1.0)
    lengths = ends - starts
    assert len(times) == 30
    assert list(lengths[:11]) == [1600 * k for k in range(1, 12)] and np.all(lengths[10:] == 17600)


def test_clip_shorter_than_one_step_has_no_window(models):
    starts, ends, times = window_bounds(1599)
    assert len(starts) == len(ends) == len(times) == 0
    with pytest.raises(DataError, match="shorter than one step") as err:
        extract_audio_features(models["hubert"], np.zeros(1599, np.float32), layers=[0])
    assert err.value.exit_code == 65


def test_step_must_be_whole_samples():
    with pytest.raises(UsageError):
        window_bounds(16000, step=0.00001)
    with pytest.raises(UsageError):
        window_bounds(16000, step=0.0)


# ----------------------------------------------------------------------------- batched == reference


@pytest.mark.parametrize("name", ["whisper", "hubert", "wavlm", "hubert-ln"])
def test_batched_equals_reference_loop(models, jfk, reference, name):
    model = models[name]
    layers = list(range(model.n_layers + 1))
    ref_times, ref = reference[name]
    assert len(ref_times) == 35
    for batch_size in (4, None):
        times, feats = extract_audio_features(model, jfk, layers=layers, batch_size=batch_size,
                                              context=CONTEXT)
        np.testing.assert_array_equal(times, ref_times)
        assert sorted(feats) == layers
        for layer in layers:
            assert feats[layer].dtype == np.float32 and feats[layer].shape == (35, model.hidden_size)
            assert np.isfinite(feats[layer]).all() and feats[layer].std() > 0
        assert _max_diff(feats, ref) <= TOL, (name, batch_size)


def test_layers_differ_and_windows_differ(reference):
    _, feats = reference["whisper"]
    assert not np.allclose(feats[0], feats[2])
    assert not np.allclose(feats[2][-1], feats[2][-2])


@pytest.mark.parametrize("name", ["whisper", "hubert", "wavlm"])
def test_model_sizes(models, name):
    model = models[name]
    assert model.n_layers == 2 and model.hidden_size == 32
    assert model.kind == ("whisper" if name == "whisper" else "ssl")
    assert model.n_parameters == sum(p.numel() for p in model.model.parameters())
    assert model.dtype == torch.float32 and model.device == "cpu"
    assert len(model.fingerprint) == 16
    hidden = model.model(**_dummy_inputs(model), output_hidden_states=True).hidden_states
    assert len(hidden) == model.n_layers + 1


def _dummy_inputs(model):
    if model.kind == "whisper":
        return {"input_features": torch.zeros(1, 80, 3000)}
    return {"input_values": torch.zeros(1, 4000)}


def test_whisper_is_encoder_only(models):
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    assert isinstance(models["whisper"].model, WhisperEncoder)


def test_fingerprints_are_stable_and_distinct(models, model_dirs):
    again = load_audio_model(str(model_dirs["hubert"]))
    assert again.fingerprint == models["hubert"].fingerprint
    assert len({m.fingerprint for m in models.values()}) == len(models)


# ----------------------------------------------------------------------------- causality


@pytest.mark.parametrize("name", ["whisper", "hubert", "wavlm"])
def test_causal_perturbing_the_future_leaves_the_past(models, jfk, name):
    model = models[name]
    t = 2.0
    changed = jfk.copy()
    rng = np.random.default_rng(0)
    changed[int(t * 16000):] = rng.uniform(-0.5, 0.5, len(jfk) - int(t * 16000)).astype(np.float32)
    layers = list(range(model.n_layers + 1))
    times, before = extract_audio_features(model, jfk, layers=layers, context=CONTEXT)
    _, after = extract_audio_features(model, changed, layers=layers, context=CONTEXT)
    past = times <= t + 1e-9
    assert past.sum() == 20
    for layer in layers:
        np.testing.assert_allclose(after[layer][past], before[layer][past], atol=1e-5, rtol=0)
        assert not np.allclose(after[layer][~past], before[layer][~past], atol=1e-3)


# ----------------------------------------------------------------------------- Whisper details


def test_whisper_last_frame_rule():
    # frame j starts at sample 320 j: the last one starting inside n samples is ceil(n / 320) - 1
    assert whisper_last_frame(1) == 0
    assert whisper_last_frame(320) == 0
    assert whisper_last_frame(321) == 1
    assert whisper_last_frame(1600) == 4  # 0.1 s
    assert whisper_last_frame(257600) == 804  # 16.1 s
    assert whisper_last_frame(480000) == 1499  # 30 s
    n = np.arange(1, 480001, 97)
    np.testing.assert_array_equal(whisper_last_frame(n), np.ceil(n / 320).astype(int) - 1)


def test_whisper_mask_convention_matches_the_reference_code():
    """The ``"mask"`` convention equals the mask-through-convolutions rule of the scaling-laws code."""
    ones = torch.ones(1, 1, 3)
    for n in [1, 159, 160, 161, 320, 321, 1600, 1601, 17600, 257600, 479999, 480000]:
        mask = (torch.arange(480000) < n).float()[::160][None, None]
        out = torch.nn.functional.conv1d(mask, ones, padding=1)
        out = torch.nn.functional.conv1d(out, ones, stride=2, padding=1)
        expected = int(out[0, 0].nonzero().max())
        assert whisper_last_frame(n, convention="mask") == expected, n
    assert whisper_last_frame(1600, convention="mask") == whisper_last_frame(1600) + 1


def test_whisper_uses_the_frame_of_the_rule(models, jfk, reference):
    """The feature of the last window is that frame of the full encoder output."""
    model = models["whisper"]
    times, ref = reference["whisper"]
    starts, ends, _ = window_bounds(len(jfk), context=CONTEXT)
    window = jfk[starts[-1]:ends[-1]]
    features = model.processor(window, sampling_rate=16000, return_tensors="pt")["input_features"]
    with torch.inference_mode():
        hidden = model.model(features, output_hidden_states=True).hidden_states
    frame = int(np.ceil(len(window) / 320)) - 1
    np.testing.assert_allclose(ref[2][-1], hidden[2][0, frame].numpy(), atol=1e-6)
    assert not np.allclose(ref[2][-1], hidden[2][0, frame + 1].numpy(), atol=1e-3)


def test_whisper_log_mel_matches_the_feature_extractor(models, jfk):
    fe = models["whisper"].processor
    samples = torch.from_numpy(jfk)
    starts, ends, _ = window_bounds(len(jfk), context=CONTEXT)
    on_grid = fa._WhisperMel(fe, samples, starts, ends)
    off_grid = fa._WhisperMel(fe, samples, starts + 7, ends)  # starts off the hop grid: direct path
    assert on_grid.fast and not off_grid.fast
    for mel, s, e in ((on_grid, starts, ends), (off_grid, starts + 7, ends)):
        rows = [0, 1, 5, 10, 11, 20, len(s) - 1]
        got = mel(s[rows], e[rows]).numpy()
        want = np.stack([fe(jfk[s[i]:e[i]], sampling_rate=16000, return_tensors="np")["input_features"][0]
                         for i in rows])
        assert got.shape == want.shape == (len(rows), 80, 3000)
        assert np.abs(got - want).max() <= 1e-5


def test_whisper_context_longer_than_30_s_is_refused(models):
    with pytest.raises(UsageError, match="30"):
        extract_audio_features(models["whisper"], np.zeros(16000 * 31, np.float32), layers=[0], context=30.0)


# ----------------------------------------------------------------------------- selection, errors, logging


def test_layer_subset_returns_only_those_layers(models, jfk, reference):
    times, feats = extract_audio_features(models["hubert"], jfk, layers=[2, 0], context=CONTEXT)
    assert sorted(feats) == [0, 2]
    assert _max_diff(feats, {k: reference["hubert"][1][k] for k in (0, 2)}) <= TOL
    with pytest.raises(UsageError):
        extract_audio_features(models["hubert"], jfk, layers=[3], context=CONTEXT)
    with pytest.raises(UsageError):
        extract_audio_features(models["hubert"], jfk, layers=[], context=CONTEXT)


def test_bad_audio(models):
    with pytest.raises(UsageError, match="1-D"):
        extract_audio_features(models["hubert"], np.zeros((2, 16000), np.float32), layers=[0])
    bad = np.zeros(16000, np.float32)
    bad[100] = np.nan
    with pytest.raises(DataError, match="NaN"):
        extract_audio_features(models["hubert"], bad, layers=[0])
    with pytest.raises(UsageError, match="batch_size"):
        extract_audio_features(models["hubert"], np.zeros(16000, np.float32), layers=[0], batch_size=0)


def test_a_model_that_is_not_an_audio_model(tmp_path):
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=16)
    GPT2Model(config).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="whisper, hubert, wavlm") as err:
        load_audio_model(str(tmp_path))
    assert err.value.exit_code == 64


def test_a_hub_id_not_available_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingInputError, match="--allow-download") as err:
        load_audio_model("bidsenc-tests/no-such-speech-model")
    assert err.value.exit_code == 66


def test_progress_and_throughput_log(models, jfk, caplog):
    with caplog.at_level(logging.INFO, logger="bidsenc.features.audio"):
        extract_audio_features(models["wavlm"], jfk[:16000], layers=[1], context=CONTEXT, progress=True)
    assert any("windows/s" in r.getMessage() and "audio s/s" in r.getMessage() for r in caplog.records)


def test_last_hidden_state_is_the_encoder_output(models, jfk, reference):
    """Layer n_layers is ``last_hidden_state`` (after the final LayerNorm of stable-layer-norm models)."""
    model = models["hubert-ln"]
    _, ref = reference["hubert-ln"]
    starts, ends, _ = window_bounds(len(jfk), context=CONTEXT)
    inputs = model.processor(jfk[starts[-1]:ends[-1]], sampling_rate=16000, return_tensors="pt")
    with torch.inference_mode():
        out = model.model(**inputs, output_hidden_states=True)
    np.testing.assert_allclose(ref[2][-1], out.last_hidden_state[0, -1].numpy(), atol=1e-6)
    np.testing.assert_allclose(ref[1][-1], out.hidden_states[1][0, -1].numpy(), atol=1e-6)
    # Whether transformers' own hidden_states[-1] is the pre- or the post-LayerNorm state (transformers 5
    # returns the former for these models) is transformers' business: bidsenc's last layer is
    # last_hidden_state either way, which is what is checked above.

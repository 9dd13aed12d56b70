"""Tests for bidsenc.synth.models: tiny locally built Hugging Face models."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bidsenc.synth import models as sm

TRANSCRIPT = Path(
    "/work/shared/data/ds005574-podcast-transcripts/stimuli/whisper-medium/transcript.tsv"
)
LM_NAMES = ["demo-gpt2-tiny", "demo-gpt2-small", "demo-gpt2-base"]
ALL_NAMES = LM_NAMES + ["demo-bert-tiny", "demo-whisper-tiny"]
PLAIN = [
    "the old man walked to the river and sat down.",
    "Act one, monkey in the middle! So there's 42 of them?",
    "  leading spaces, trailing space ",
    "Hello, World",
]


def _sentences(n: int = 300, seed: int = 0) -> list[str]:
    """Deterministic toy corpus from a small grammar."""
    rng = random.Random(seed)
    subj = ["the man", "a woman", "my friend", "the old dog", "she", "he", "they", "the teacher"]
    verb = ["walked to", "looked at", "talked about", "remembered", "found", "waited for", "loved"]
    obj = ["the river", "a small house", "the city", "her brother", "the market", "a red car", "the story"]
    tail = ["", " yesterday", " at night", " again", " in the morning", " with a smile"]
    out = []
    for _ in range(n):
        s = f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}{rng.choice(tail)}"
        out.append(s[0].upper() + s[1:] + rng.choice([".", "!", "?", ", and then it rained."]))
    return out


def _go_offline(mp: pytest.MonkeyPatch) -> None:
    """Offline hub mode plus a hard block on outgoing connections."""
    import huggingface_hub.constants as hub_constants

    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    # huggingface_hub reads the variable at import time.
    mp.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    def _no_network(*args, **kwargs):
        raise RuntimeError("network access attempted")

    mp.setattr(socket.socket, "connect", _no_network)


@pytest.fixture
def offline(monkeypatch):
    _go_offline(monkeypatch)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_models")
    with pytest.MonkeyPatch.context() as mp:
        _go_offline(mp)
        t0 = time.perf_counter()
        manifest = sm.make_demo_models(out, _sentences())
        elapsed = time.perf_counter() - t0
    return {"dir": out, "manifest": manifest, "elapsed": elapsed}


def _entry(demo, name):
    return next(m for m in demo["manifest"]["models"] if m["name"] == name)


def _file_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_build_is_fast_small_and_manifest_matches(demo):
    out = demo["dir"]
    assert demo["elapsed"] < 30
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert size < 20 * 1024 * 1024

    on_disk = json.loads((out / "models.json").read_text())
    assert on_disk == demo["manifest"]
    entries = on_disk["models"]
    assert [m["name"] for m in entries] == ALL_NAMES
    kinds = {m["name"]: m["kind"] for m in entries}
    expected = {n: "lm" for n in LM_NAMES}
    expected.update({"demo-bert-tiny": "encoder-lm", "demo-whisper-tiny": "audio"})
    assert kinds == expected
    for m in entries:
        assert not Path(m["path"]).is_absolute()
        folder = out / m["path"]
        assert (folder / "config.json").is_file()
        assert (folder / "model.safetensors").is_file()
        assert not list(folder.glob("*.bin"))
        assert m["n_parameters"] > 0 and m["n_layers"] > 0 and m["hidden_size"] > 0


def test_causal_lm_parameter_counts_strictly_increase(demo):
    counts = [_entry(demo, n)["n_parameters"] for n in LM_NAMES]
    assert counts == sorted(counts) and len(set(counts)) == 3
    layers = [_entry(demo, n)["n_layers"] for n in LM_NAMES]
    assert layers == sorted(layers)


@pytest.mark.parametrize("name", LM_NAMES + ["demo-bert-tiny"])
def test_text_models_reload_with_auto_classes(demo, offline, name):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    entry = _entry(demo, name)
    folder = demo["dir"] / entry["path"]
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.is_fast
    model = AutoModel.from_pretrained(folder).eval()
    config = AutoConfig.from_pretrained(folder)
    assert config.num_hidden_layers == entry["n_layers"]
    assert config.hidden_size == entry["hidden_size"]
    assert model.num_parameters() == entry["n_parameters"]
    assert len(tok) == config.vocab_size

    enc = tok(PLAIN[0], return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    assert len(out.hidden_states) == entry["n_layers"] + 1
    for h in out.hidden_states:
        assert h.shape == (1, enc["input_ids"].shape[1], entry["hidden_size"])
        assert torch.isfinite(h).all()


def test_causal_lm_loads_as_causal_lm_with_long_context(demo, offline):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = demo["dir"] / "demo-gpt2-tiny"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.n_positions >= 1024
    text = " ".join(_sentences(200, seed=3))
    ids = tok(text, return_tensors="pt")["input_ids"][:, :1024]
    assert ids.shape[1] == 1024  # a 512-word context fits comfortably
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 1024, len(tok))


def test_byte_level_tokenizer_roundtrip_offsets_word_ids(demo, offline):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo["dir"] / "demo-gpt2-base")
    assert tok.eos_token == tok.bos_token == tok.pad_token == tok.unk_token == "<|endoftext|>"
    for text in PLAIN + _sentences(20, seed=7):
        enc = tok(text, return_offsets_mapping=True)
        assert tok.decode(enc["input_ids"]) == text
        # No special tokens are added; GPT-2 style offsets tile the text exactly.
        assert "".join(text[s:e] for s, e in enc["offset_mapping"]) == text
        word_ids = enc.word_ids()
        assert len(word_ids) == len(enc["input_ids"])
        assert None not in word_ids
        assert word_ids == sorted(word_ids)

    text = "the old man walked to the river"
    enc = tok(text, return_offsets_mapping=True)
    words: dict[int, str] = {}
    for wid, (s, e) in zip(enc.word_ids(), enc["offset_mapping"]):
        words[wid] = words.get(wid, "") + text[s:e]
    assert [w.strip() for _, w in sorted(words.items())] == text.split()


def test_bert_tokenizer_cls_sep_offsets_word_ids(demo, offline):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo["dir"] / "demo-bert-tiny")
    text = "the old man walked to the river"
    enc = tok(text, return_offsets_mapping=True)
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert "[UNK]" not in tokens
    word_ids = enc.word_ids()
    assert word_ids[0] is None and word_ids[-1] is None
    assert enc["offset_mapping"][0] == (0, 0)
    words: dict[int, list[tuple[int, int]]] = {}
    for wid, span in zip(word_ids, enc["offset_mapping"]):
        if wid is not None:
            words.setdefault(wid, []).append(span)
    spans = [(v[0][0], v[-1][1]) for _, v in sorted(words.items())]
    assert [text[s:e] for s, e in spans] == text.split()
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == text
    # Unseen ASCII characters are still in the alphabet, lower-casing applies.
    odd = tok.convert_ids_to_tokens(tok("Zebra #1 ~ {x}")["input_ids"])
    assert "[UNK]" not in odd and "zebra" in "".join(t.lstrip("#") for t in odd)
    for special in ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"):
        assert tok.convert_tokens_to_ids(special) is not None


def test_whisper_encoder_runs_on_feature_extractor_output(demo, offline):
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, WhisperModel

    entry = _entry(demo, "demo-whisper-tiny")
    folder = demo["dir"] / entry["path"]
    fe = AutoFeatureExtractor.from_pretrained(folder)
    assert fe.sampling_rate == 16000 and fe.feature_size == 80
    sr = 16000
    t = np.arange(2 * sr) / sr
    audio = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    feats = fe(audio, sampling_rate=sr, return_tensors="pt")["input_features"]
    assert feats.shape == (1, 80, 3000)

    encoder = WhisperModel.from_pretrained(folder).encoder.eval()
    assert encoder.num_parameters() == entry["n_parameters"]
    with torch.no_grad():
        out = encoder(feats, output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, 1500, entry["hidden_size"])
    assert len(out.hidden_states) == entry["n_layers"] + 1
    assert torch.isfinite(out.last_hidden_state).all()
    assert AutoConfig.from_pretrained(folder).model_type == "whisper"
    assert type(AutoModel.from_pretrained(folder)).__name__ == "WhisperModel"


def test_weights_deterministic_per_seed(tmp_path, offline):
    from safetensors.torch import load_file

    texts = _sentences(120, seed=1)
    a = sm.make_demo_models(tmp_path / "a", texts, seed=0)
    b = sm.make_demo_models(tmp_path / "b", texts, seed=0)
    c = sm.make_demo_models(tmp_path / "c", texts, seed=1)
    assert a == json.loads((tmp_path / "a" / "models.json").read_text()) == b
    assert [m["n_parameters"] for m in a["models"]] == [m["n_parameters"] for m in c["models"]]
    for name in ALL_NAMES:
        ha, hb = _file_hashes(tmp_path / "a" / name), _file_hashes(tmp_path / "b" / name)
        assert ha == hb, name  # weights, configs and tokenizers byte-identical
        wa = load_file(tmp_path / "a" / name / "model.safetensors")
        wc = load_file(tmp_path / "c" / name / "model.safetensors")
        assert wa.keys() == wc.keys()
        assert any(not torch.equal(wa[k], wc[k]) for k in wa), name
        tok_file = tmp_path / "a" / name / "tokenizer.json"
        if tok_file.exists():  # tokenizers do not depend on the seed
            assert tok_file.read_bytes() == (tmp_path / "c" / name / "tokenizer.json").read_bytes()


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sm.make_whisper_encoder(tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_size_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown size"):
        sm.make_causal_lm_family(tmp_path, _sentences(20), sizes=("huge",))


def test_tokenizer_trained_on_podcast_transcript(tmp_path, offline):
    if not TRANSCRIPT.is_file():
        pytest.skip(f"podcast transcript not available at {TRANSCRIPT}")
    with TRANSCRIPT.open(newline="") as fh:
        words = [row["word"] for row in csv.DictReader(fh, delimiter="\t") if row.get("word")]
    assert len(words) > 1000
    texts = [" ".join(words[i : i + 20]) for i in range(0, len(words), 20)]
    tok = sm.train_tokenizer(texts)
    assert len(tok) == 1000
    assert tok.backend_tokenizer.to_str() == sm.train_tokenizer(texts).backend_tokenizer.to_str()
    tok.save_pretrained(tmp_path / "tok")

    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert reloaded.is_fast
    sample = " ".join(w for w in words[:512] if w.isascii())
    enc = reloaded(sample, return_offsets_mapping=True)
    assert reloaded.decode(enc["input_ids"]) == sample
    assert enc["input_ids"] == tok(sample)["input_ids"]
    # Every transcript word maps onto whole tokens (word_ids cover it).
    assert max(enc.word_ids()) + 1 >= len(sample.split())

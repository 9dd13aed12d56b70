"""Language-model features on tiny local models and the real podcast transcript."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bidsenc.errors import MissingInputError, UsageError
from bidsenc.features.hub import parse_layers
from bidsenc.features.lm import (
    REFERENCE_KEEP_WORDS,
    REFERENCE_MAX_WORDS,
    encoder_windows,
    extract_lm_features,
    extract_lm_features_reference_loop,
    load_language_model,
    plan_windows,
    reference_windows,
    tokenize_words,
    _tokenize_word_by_word,
)
from conftest import shared


@pytest.fixture(scope="module")
def podcast_words():
    table = pd.read_csv(shared("ds005574-podcast-transcripts", "stimuli", "whisper-medium", "transcript.tsv"),
                        sep="\t", keep_default_na=False)
    words = table["word"].astype(str).tolist()
    assert len(words) == 5134
    return words


@pytest.fixture(scope="module")
def models(tmp_path_factory, podcast_words):
    from bidsenc.synth.models import make_causal_lm_family, make_encoder_lm

    root = tmp_path_factory.mktemp("lms")
    texts = [" ".join(podcast_words[i:i + 100]) for i in range(0, len(podcast_words), 100)]
    gpt = make_causal_lm_family(root, texts, sizes=("tiny",))[0]
    bert = make_encoder_lm(root, texts)
    return {"gpt": load_language_model(str(gpt["path"])), "bert": load_language_model(str(bert["path"]))}


def _sentencepiece_like(texts):
    """A Unigram tokenizer with SentencePiece's '▁' word marker, trained on the fly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>", "<s>"],
                                                           unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


# --------------------------------------------------------------------------- bookkeeping

def test_reference_windows_follow_the_paper():
    windows = reference_windows(0, 1300)
    assert [(w.start, w.end, w.first_output) for w in windows] == [
        (0, 512, 0), (256, 768, 512), (512, 1024, 768), (768, 1280, 1024), (1024, 1300, 1280)]
    context = {}
    for w in windows:
        for i in range(w.first_output, w.end):
            assert i not in context
            context[i] = i - w.start + 1          # words the model sees, the word itself included
    assert sorted(context) == list(range(1300))
    assert [context[i] for i in range(512)] == list(range(1, 513))      # grows from 1 to 512
    assert all(257 <= context[i] <= 512 for i in range(512, 1300))      # then 257..512
    assert context[512] == 257 and context[767] == 512


class _FakeTokens:
    def __init__(self, counts):
        last = np.cumsum(counts) - 1
        self.word_last_token = last
        self.word_first_token = last - np.asarray(counts) + 1

    def n_tokens(self, start, end):
        return int(self.word_last_token[end - 1] + 1 - self.word_first_token[start])


@pytest.mark.parametrize("n", [0, 1, 255, 511, 512, 513, 768, 769, 5134])
def test_plan_windows_reproduces_reference(n):
    tokens = _FakeTokens(np.ones(n, int))
    planned = plan_windows(0, tokens, min_context=REFERENCE_KEEP_WORDS, max_words=REFERENCE_MAX_WORDS)
    assert planned == reference_windows(0, n)


def test_efficient_windows_guarantee_context_and_token_budget():
    rng = np.random.default_rng(0)
    tokens = _FakeTokens(rng.integers(1, 4, 3000))
    windows = plan_windows(0, tokens, min_context=100, max_tokens=400)
    out = np.concatenate([np.arange(w.first_output, w.end) for w in windows])
    assert np.array_equal(out, np.arange(3000))
    for w in windows:
        assert tokens.n_tokens(w.start, w.end) <= 400
        assert w.first_output - w.start == min(100, w.first_output)
    with pytest.raises(UsageError, match="lower min_context"):
        plan_windows(0, _FakeTokens(np.full(50, 3)), min_context=20, max_tokens=30)


def test_encoder_windows_end_at_their_word():
    tokens = _FakeTokens(np.full(40, 2))
    windows = encoder_windows(0, tokens, context=5, max_tokens=8)
    assert [(w.start, w.end, w.first_output) for w in windows[:7]] == [
        (0, 1, 0), (0, 2, 1), (0, 3, 2), (0, 4, 3), (1, 5, 4), (2, 6, 5), (3, 7, 6)]


# --------------------------------------------------------------------------- tokenizers

@pytest.mark.parametrize("kind", ["gpt", "bert", "sentencepiece"])
def test_tokens_map_back_to_their_words(models, podcast_words, kind):
    words = podcast_words[:400]
    tokenizer = models[kind].tokenizer if kind != "sentencepiece" else _sentencepiece_like(
        [" ".join(podcast_words[i:i + 50]) for i in range(0, 5134, 50)])
    tokens = tokenize_words(tokenizer, words)
    assert len(tokens.word_last_token) == len(words)
    assert np.all(np.diff(tokens.word_last_token) > 0) and tokens.word_last_token[-1] == len(tokens.ids) - 1
    for i in (0, 1, 57, 399):
        piece = tokens.ids[tokens.word_first_token[i]:tokens.word_last_token[i] + 1]
        decoded = tokenizer.decode(piece).replace("▁", " ").replace(" ##", "").strip()
        assert decoded.lower() == words[i].lower(), (kind, i)


def test_word_by_word_fallback_gives_the_same_tokens(models, podcast_words):
    tokenizer = models["gpt"].tokenizer
    words = podcast_words[:300]
    fast, slow = tokenize_words(tokenizer, words), _tokenize_word_by_word(tokenizer, words)
    assert np.array_equal(fast.ids, slow.ids) and np.array_equal(fast.word_last_token, slow.word_last_token)


# --------------------------------------------------------------------------- features

def test_one_row_per_word_every_layer(models, podcast_words):
    lm = models["gpt"]
    stories = [podcast_words[:700], podcast_words[700:1000]]
    result = extract_lm_features(lm, stories, layers=parse_layers("all", lm.n_layers))
    assert result.layers == list(range(lm.n_layers + 1))
    for words, feats in zip(stories, result.features, strict=True):
        for layer, arr in feats.items():
            assert arr.shape == (len(words), lm.hidden_size)
            assert np.all(np.abs(arr).sum(1) > 0)  # every row written
    # the same word in different contexts gets different features above the embedding layer
    assert not np.allclose(result.features[0][lm.n_layers][0], result.features[1][lm.n_layers][0])


def test_efficient_configured_as_reference_matches_the_reference_loop(models, podcast_words):
    lm = models["gpt"]
    layers = list(range(lm.n_layers + 1))
    oracle = extract_lm_features_reference_loop(lm, podcast_words, layers=layers)
    batched = extract_lm_features(lm, [podcast_words], layers=layers, scheme="efficient",
                                  min_context=256, max_words=512, batch_tokens=4096)
    reference = extract_lm_features(lm, [podcast_words], layers=layers, scheme="reference")
    for layer in layers:
        assert np.abs(batched.features[0][layer] - oracle[layer]).max() <= 1e-4
        assert np.abs(reference.features[0][layer] - oracle[layer]).max() <= 1e-4
    assert reference.n_passes == 20


@pytest.mark.parametrize("kind, scheme", [("gpt", "efficient"), ("gpt", "reference"), ("bert", "efficient")])
def test_no_future_word_reaches_a_feature(models, podcast_words, kind, scheme):
    lm = models[kind]
    words = podcast_words[:900] if kind == "gpt" else podcast_words[:150]
    k = len(words) * 2 // 3
    changed = list(words)
    changed[k] = "elephant" if words[k] != "elephant" else "giraffe"
    kwargs = dict(layers=[0, lm.n_layers], scheme=scheme, min_context=64 if kind == "bert" else 256)
    a = extract_lm_features(lm, [words], **kwargs).features[0]
    b = extract_lm_features(lm, [changed], **kwargs).features[0]
    for layer in (0, lm.n_layers):
        assert np.abs(a[layer][:k] - b[layer][:k]).max() <= 1e-5
        assert np.abs(a[layer][k] - b[layer][k]).max() > 1e-3


def test_model_not_available_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingInputError, match="--allow-download") as err:
        load_language_model("bidsenc-tests/no-such-model")
    assert err.value.exit_code == 66


def test_layer_selection():
    assert parse_layers("all", 4) == [0, 1, 2, 3, 4]
    assert parse_layers("0-2,4", 4) == [0, 1, 2, 4]
    assert parse_layers("last", 12) == [12] and parse_layers("-1", 12) == [12]
    with pytest.raises(UsageError, match="0..4"):
        parse_layers("7", 4)
    with pytest.raises(UsageError):
        parse_layers("middle", 4)


def test_out_of_memory_retries_in_halves(models, podcast_words, monkeypatch):
    import torch

    lm = models["gpt"]
    stories = [podcast_words[:400], podcast_words[400:900], podcast_words[900:1200]]
    layers = [0, lm.n_layers]
    expected = extract_lm_features(lm, stories, layers=layers, min_context=64, max_tokens=200,
                                   batch_tokens=100_000)
    forward = type(lm.model).forward
    sizes = []

    def limited(self, input_ids=None, **kwargs):
        sizes.append(len(input_ids))
        if len(input_ids) > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(lm.model), "forward", limited)
    got = extract_lm_features(lm, stories, layers=layers, min_context=64, max_tokens=200, batch_tokens=100_000)
    assert max(sizes) > 2 and sizes[-1] <= 2
    for a, b in zip(expected.features, got.features, strict=True):
        for layer in layers:
            assert np.abs(a[layer] - b[layer]).max() <= 1e-5

    def always(self, input_ids=None, **kwargs):
        raise torch.cuda.OutOfMemoryError("simulated")

    monkeypatch.setattr(type(lm.model), "forward", always)
    from bidsenc.errors import TemporaryFailure

    with pytest.raises(TemporaryFailure, match="single item"):
        extract_lm_features(lm, stories[:1], layers=layers, min_context=64, max_tokens=200)

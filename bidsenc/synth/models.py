"""Tiny, locally built Hugging Face models for the demo dataset and tests.

Every model is created from scratch (tokenizers trained on the fly, random
weights from a fixed seed) and written with ``save_pretrained``, so the
pipeline loads it through the same ``Auto*.from_pretrained(local_dir)`` code
path as a real hub model, without any network access.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizerFast,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)
from ..features.hub import quiet_transformers

__all__ = [
    "CAUSAL_LM_FAMILY",
    "CAUSAL_LM_SIZES",
    "ENCODER_LM_NAME",
    "WHISPER_NAME",
    "train_tokenizer",
    "make_causal_lm_family",
    "make_encoder_lm",
    "make_whisper_encoder",
    "make_demo_models",
]

#: Family name of the causal LMs; folders are ``<family>-<size>``.
CAUSAL_LM_FAMILY = "demo-gpt2"
#: Architecture of each causal LM size.
CAUSAL_LM_SIZES = {
    "tiny": {"n_layer": 2, "n_embd": 32, "n_head": 2},
    "small": {"n_layer": 3, "n_embd": 48, "n_head": 4},
    "base": {"n_layer": 4, "n_embd": 64, "n_head": 4},
}
#: Folder name of the BERT-like encoder.
ENCODER_LM_NAME = "demo-bert-tiny"
#: Folder name of the Whisper model.
WHISPER_NAME = "demo-whisper-tiny"

_EOT = "<|endoftext|>"
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Lower-case printable ASCII, always in the WordPiece alphabet.
_ASCII_ALPHABET = string.ascii_lowercase + string.digits + string.punctuation


def _as_texts(texts) -> list[str]:
    texts = [str(t) for t in texts if str(t).strip()]
    if not texts:
        raise ValueError("need at least one non-empty text to train a tokenizer")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE tokenizer.

    Parameters
    ----------
    texts : list of str
        Training corpus.
    vocab_size : int
        Target vocabulary size (includes the 256 byte symbols and
        ``<|endoftext|>``).

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        Fast tokenizer with ``<|endoftext|>`` as bos/eos/unk/pad token.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Same as GPT-2's tokenizer.json: offsets keep the leading space.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[_EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_as_texts(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=_EOT,
        eos_token=_EOT,
        unk_token=_EOT,
        pad_token=_EOT,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def _train_wordpiece(texts: list[str], vocab_size: int = 1000) -> BertTokenizerFast:
    """Train an uncased BERT WordPiece tokenizer (BertWordPieceTokenizer equivalent).

    The ``tokenizers`` trainer assigns ids to ``##x`` continuation symbols in
    hash-map order, which changes how equal-count merges are tie-broken from
    one process to the next. Registering every ``##x`` up front (as temporary
    special tokens) fixes their ids and makes the vocabulary deterministic.
    """
    texts = _as_texts(texts)
    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    chars = set(_ASCII_ALPHABET)
    for text in texts:
        chars.update(c for c in normalizer.normalize_str(text) if not c.isspace())
    alphabet = sorted(chars)
    draft = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    draft.normalizer = normalizer
    draft.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=_BERT_SPECIALS + ["##" + c for c in alphabet],
        initial_alphabet=alphabet,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    draft.train_from_iterator(texts, trainer=trainer)

    # Rebuild with only the real special tokens registered as such.
    tok = Tokenizer(models.WordPiece(draft.get_vocab(), unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(_BERT_SPECIALS)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return BertTokenizerFast(
        tokenizer_object=tok,
        vocab=tok.get_vocab(),
        do_lower_case=True,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def _seeded(model_cls, config, seed: int):
    """Instantiate ``model_cls(config)`` from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(config).eval()


def _n_params(model: torch.nn.Module) -> int:
    # Tied weights (GPT-2's lm_head / wte) are counted once.
    return sum(p.numel() for p in model.parameters())


def _save(model, path: Path, *extras) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(path, safe_serialization=True)
    for obj in extras:
        obj.save_pretrained(path)


def _info(name: str, path: Path, n_parameters: int, n_layers: int, hidden_size: int) -> dict:
    return {
        "name": name,
        "path": str(path),
        "n_parameters": int(n_parameters),
        "n_layers": int(n_layers),
        "hidden_size": int(hidden_size),
    }


def make_causal_lm_family(out_dir, texts, sizes=("tiny", "small", "base"), seed=0) -> list[dict]:
    """Build a GPT-2 family of random-weight causal LMs sharing one tokenizer.

    Parameters
    ----------
    out_dir : str or Path
        Parent folder; each model goes to ``out_dir/demo-gpt2-<size>/``.
    texts : list of str
        Corpus for the byte-level BPE tokenizer.
    sizes : sequence of str
        Keys of :data:`CAUSAL_LM_SIZES`.
    seed : int
        Seed for the weights (each size uses ``seed + index``).

    Returns
    -------
    list of dict
        Per model: name, path, n_parameters, n_layers, hidden_size.
    """
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(texts)
    eot = tokenizer.convert_tokens_to_ids(_EOT)
    infos = []
    for i, size in enumerate(sizes):
        if size not in CAUSAL_LM_SIZES:
            raise ValueError(f"unknown size {size!r}; choose from {sorted(CAUSAL_LM_SIZES)}")
        arch = CAUSAL_LM_SIZES[size]
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=1024,
            bos_token_id=eot,
            eos_token_id=eot,
            pad_token_id=eot,
            **arch,
        )
        model = _seeded(GPT2LMHeadModel, config, seed + i)
        name = f"{CAUSAL_LM_FAMILY}-{size}"
        path = out_dir / name
        _save(model, path, tokenizer)
        infos.append(_info(name, path, _n_params(model), arch["n_layer"], arch["n_embd"]))
    return infos


def make_encoder_lm(out_dir, texts, seed=0) -> dict:
    """Build a tiny random-weight BERT encoder with a WordPiece tokenizer.

    Parameters
    ----------
    out_dir : str or Path
        Parent folder; the model goes to ``out_dir/demo-bert-tiny/``.
    texts : list of str
        Corpus for the WordPiece tokenizer.
    seed : int
        Seed for the weights.

    Returns
    -------
    dict
        name, path, n_parameters, n_layers, hidden_size.
    """
    out_dir = Path(out_dir)
    tokenizer = _train_wordpiece(texts)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = _seeded(BertModel, config, seed)
    path = out_dir / ENCODER_LM_NAME
    _save(model, path, tokenizer)
    return _info(ENCODER_LM_NAME, path, _n_params(model), config.num_hidden_layers, config.hidden_size)


def make_whisper_encoder(out_dir, seed=0) -> dict:
    """Build a tiny random-weight Whisper model and its feature extractor.

    The encoder takes the standard 30 s input (80 mel bins x 3000 frames) and
    returns 1500 frames of size ``d_model``. No tokenizer is saved.

    Parameters
    ----------
    out_dir : str or Path
        Parent folder; the model goes to ``out_dir/demo-whisper-tiny/``.
    seed : int
        Seed for the weights.

    Returns
    -------
    dict
        name, path, n_parameters and n_layers (of the encoder), hidden_size.
    """
    out_dir = Path(out_dir)
    vocab = 64
    config = WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=80,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=1500,
        max_target_positions=64,
        pad_token_id=vocab - 1,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 2,
        decoder_start_token_id=vocab - 3,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    model = _seeded(WhisperModel, config, seed)
    extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000)
    path = out_dir / WHISPER_NAME
    _save(model, path, extractor)
    n_enc = _n_params(model.encoder)
    return _info(WHISPER_NAME, path, n_enc, config.encoder_layers, config.d_model)


def make_demo_models(out_dir, texts, seed=0) -> dict:
    """Build all demo models and write ``out_dir/models.json``.

    Parameters
    ----------
    out_dir : str or Path
        Output folder.
    texts : list of str
        Corpus for the tokenizers.
    seed : int
        Seed for all weights.

    Returns
    -------
    dict
        The content of ``models.json``: ``{"models": [...]}`` with name, kind
        (``"lm"``, ``"encoder-lm"`` or ``"audio"``), path relative to
        ``out_dir``, n_parameters, n_layers and hidden_size per model.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    built = [("lm", info) for info in make_causal_lm_family(out_dir, texts, seed=seed)]
    built.append(("encoder-lm", make_encoder_lm(out_dir, texts, seed=seed)))
    built.append(("audio", make_whisper_encoder(out_dir, seed=seed)))
    entries = []
    for kind, info in built:
        entry = {"name": info["name"], "kind": kind}
        entry.update(info)
        entry["path"] = Path(info["path"]).relative_to(out_dir).as_posix()
        entries.append(entry)
    manifest = {"models": entries}
    (out_dir / "models.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest

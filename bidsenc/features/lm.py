"""Language-model features: the hidden state of every layer at each word's last sub-token.

A word's feature comes from a forward pass over a window of words that ends at or
after it; with a causal model the hidden state at the word's last token sees only
the window's words up to that word, so a window yields features for many words at
once. Windows are planned in words (:func:`plan_windows`):

``reference``
    the bookkeeping of Antonello et al. (2023): the context grows to 512 words, then
    restarts at 256, so one pass yields ~256 words and after the first 512 words
    every word sees 257 to 512 words.
``efficient`` (default)
    every word sees at least ``min_context`` words (all earlier words near the start
    of a story) and windows are filled up to ``max_tokens`` tokens, so each pass
    yields more words; windows of all stories are batched together.

Encoder models (BERT-like) see the future inside a window, so each word gets a
window of its own that ends at it.

Tokens are mapped to words through the fast tokenizer's character offsets over the
story text (words joined by spaces), so any fast tokenizer works (byte-level BPE,
SentencePiece, WordPiece) without hard-coded token ids; each window is the story's
token sequence for its words, after the model's BOS token.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError, UsageError
from .hub import count_parameters, from_pretrained, model_fingerprint, resolve_dtype, run_with_oom_retry

log = logging.getLogger(__name__)

#: The reference scheme: the context grows to this many words ...
REFERENCE_MAX_WORDS = 512
#: ... then restarts at this many.
REFERENCE_KEEP_WORDS = 256


@dataclass
class LanguageModel:
    """A loaded language model with what the cache and outputs record about it."""

    name: str
    model: object
    tokenizer: object
    is_encoder: bool
    n_layers: int
    hidden_size: int
    n_parameters: int
    fingerprint: str
    max_positions: int | None
    device: str
    dtype: object

    def describe(self) -> dict:
        return {"model": self.name, "kind": "encoder-lm" if self.is_encoder else "causal-lm",
                "n_parameters": self.n_parameters, "n_layers": self.n_layers, "hidden_size": self.hidden_size,
                "fingerprint": self.fingerprint, "dtype": str(self.dtype).removeprefix("torch.")}


@dataclass(frozen=True)
class Window:
    """Words ``[start, end)`` of story ``story`` in one pass; features kept for ``[first_output, end)``."""

    story: int
    start: int
    end: int
    first_output: int


@dataclass
class TokenizedStory:
    """A story's token ids and, per word, the index of its last token."""

    ids: np.ndarray
    word_first_token: np.ndarray
    word_last_token: np.ndarray

    def n_tokens(self, start: int, end: int) -> int:
        return int(self.word_last_token[end - 1] + 1 - self.word_first_token[start])


# --------------------------------------------------------------------------- loading

_ENCODER_HINTS = ("ForMaskedLM", "ForPreTraining", "ForSequenceClassification", "ForTokenClassification")


def load_language_model(name: str, *, device: str = "cpu", dtype: str | None = "auto",
                        allow_download: bool = False, revision: str | None = None,
                        device_map: str | None = None) -> LanguageModel:
    """Load a causal or encoder language model and its fast tokenizer."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = from_pretrained(AutoConfig, name, allow_download=allow_download, revision=revision)
    if getattr(config, "is_encoder_decoder", False):
        raise UsageError(f"model {name} is an encoder-decoder ({config.model_type}); lm features need a "
                         "causal (GPT-like) or encoder (BERT-like) language model")
    architectures = " ".join(getattr(config, "architectures", None) or [])
    is_encoder = any(h in architectures for h in _ENCODER_HINTS) or config.model_type in (
        "bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "albert", "xlm-roberta",
        "camembert", "mpnet", "modernbert")
    torch_dtype = resolve_dtype(dtype, device)
    kwargs = {"dtype": torch_dtype}
    if device_map:
        kwargs["device_map"] = device_map
    model = from_pretrained(AutoModel, name, allow_download=allow_download, revision=revision, **kwargs)
    tokenizer = from_pretrained(AutoTokenizer, name, allow_download=allow_download, revision=revision)
    if not device_map:
        model = model.to(device)
    model.eval()
    n_layers = config.get_text_config().num_hidden_layers
    hidden = config.get_text_config().hidden_size
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not getattr(tokenizer, "is_fast", False):
        log.warning("%s has no fast tokenizer: words are tokenized one by one (slower, same contexts)", name)
    return LanguageModel(name, model, tokenizer, is_encoder, int(n_layers), int(hidden), count_parameters(model),
                         model_fingerprint(name, config, revision), max_positions, device, torch_dtype)


# --------------------------------------------------------------------------- words to tokens

def tokenize_words(tokenizer, words: list[str]) -> TokenizedStory:
    """Token ids of a story and the token span of each word.

    The words are joined by single spaces and tokenized once; each token belongs to
    the word holding its last character. Tokenizers without character offsets, or
    whose tokens straddle two words, fall back to tokenizing word by word.
    """
    if not words:
        return TokenizedStory(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    if getattr(tokenizer, "is_fast", False):
        result = _tokenize_with_offsets(tokenizer, words)
        if result is not None:
            return result
        log.debug("tokens straddle words: tokenizing word by word")
    return _tokenize_word_by_word(tokenizer, words)


def _tokenize_with_offsets(tokenizer, words: list[str]) -> TokenizedStory | None:
    text = " ".join(words)
    ends = np.cumsum([len(w) + 1 for w in words]) - 1          # one past each word's last char
    starts = ends - np.array([len(w) for w in words])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    if len(ids) == 0:
        return None
    # the word holding each token's last character; a token of spaces only goes to the next word
    last_char = np.maximum(offsets[:, 1] - 1, offsets[:, 0])
    word_of_token = np.searchsorted(ends, last_char, side="right")
    first_char = offsets[:, 0]
    word_of_first = np.searchsorted(ends, first_char, side="right")
    inside = first_char >= starts[np.minimum(word_of_first, len(words) - 1)]
    straddles = (word_of_first != word_of_token) & inside
    if straddles.any() or (np.diff(word_of_token) < 0).any() or word_of_token.max() >= len(words):
        return None
    counts = np.bincount(word_of_token, minlength=len(words))
    if (counts == 0).any():
        return None
    last = np.cumsum(counts) - 1
    return TokenizedStory(ids, last - counts + 1, last)


def _tokenize_word_by_word(tokenizer, words: list[str]) -> TokenizedStory:
    pieces = [tokenizer(w if i == 0 else " " + w, add_special_tokens=False)["input_ids"] for i, w in enumerate(words)]
    if any(len(p) == 0 for p in pieces):
        empty = next(w for w, p in zip(words, pieces, strict=True) if len(p) == 0)
        raise DataError(f"the tokenizer turns the word {empty!r} into no token at all")
    counts = np.array([len(p) for p in pieces])
    last = np.cumsum(counts) - 1
    return TokenizedStory(np.concatenate([np.asarray(p, np.int64) for p in pieces]), last - counts + 1, last)


# --------------------------------------------------------------------------- windows

def plan_windows(story: int, tokens: TokenizedStory, *, min_context: int, max_words: int | None = None,
                 max_tokens: int | None = None) -> list[Window]:
    """Windows over one story such that every word is output once, in order.

    Each window outputs words ``[first_output, end)`` and starts ``min_context`` words
    before ``first_output`` (or at the story's start). It grows until ``max_words``
    words or ``max_tokens`` tokens (both counted without special tokens). With
    ``max_words=512, min_context=256`` this is exactly the reference bookkeeping.
    """
    n = len(tokens.word_last_token)
    windows: list[Window] = []
    first = 0
    while first < n:
        start = max(0, first - min_context)
        end = first
        while end < n and (max_words is None or end + 1 - start <= max_words) and (
                max_tokens is None or tokens.n_tokens(start, end + 1) <= max_tokens):
            end += 1
        if end == first:
            raise UsageError(
                f"a window cannot hold {first - start} words of context plus one word within "
                f"{max_tokens} tokens; lower min_context or raise max_tokens"
            )
        windows.append(Window(story, start, end, first))
        first = end
    return windows


def reference_windows(story: int, n_words: int) -> list[Window]:
    """The reference bookkeeping, stated directly (used to check :func:`plan_windows`)."""
    windows, start, first = [], 0, 0
    while first < n_words:
        end = min(start + REFERENCE_MAX_WORDS, n_words)
        windows.append(Window(story, start, end, first))
        first, start = end, end - REFERENCE_KEEP_WORDS
    return windows


def encoder_windows(story: int, tokens: TokenizedStory, *, context: int, max_tokens: int) -> list[Window]:
    """One window per word, ending at it, with up to ``context`` earlier words within ``max_tokens``."""
    windows = []
    for i in range(len(tokens.word_last_token)):
        start = max(0, i - context)
        while start < i and tokens.n_tokens(start, i + 1) > max_tokens:
            start += 1
        if tokens.n_tokens(start, i + 1) > max_tokens:
            raise DataError(f"word {i} alone needs more than {max_tokens} tokens")
        windows.append(Window(story, start, i + 1, i))
    return windows


# --------------------------------------------------------------------------- forward passes

@dataclass
class ExtractionResult:
    """Per story, the selected layers' features ``[n_words, hidden]`` (float32)."""

    layers: list[int]
    features: list[dict[int, np.ndarray]] = field(default_factory=list)
    n_tokens: int = 0
    n_passes: int = 0
    seconds: float = 0.0


def extract_lm_features(lm: LanguageModel, stories: list[list[str]], *, layers: list[int],
                        scheme: str = "efficient", min_context: int = 256, max_tokens: int | None = None,
                        max_words: int | None = None, batch_tokens: int | None = None,
                        progress: bool = False) -> ExtractionResult:
    """Features of every word of every story, from batched windows across stories.

    Parameters
    ----------
    lm : LanguageModel
    stories : list of list of str
        The words of each story, in order.
    layers : list of int
        Hidden states to keep (0 = embeddings).
    scheme : {"efficient", "reference"}
    min_context : int
        Efficient scheme: words of context every word gets at least (fewer only at a
        story's start). For encoders: the context of each word's own window.
    max_tokens : int, optional
        Tokens per window, special tokens excluded (default: the model's limit, at
        most 1024).
    max_words : int, optional
        Efficient scheme: words per window at most (``max_words=512, min_context=256``
        gives the reference windows).
    batch_tokens : int, optional
        Padded tokens per batch (default 65536 on GPU; on CPU 1024, i.e. about one
        window per pass, which is fastest there).
    """
    import torch

    limit = (lm.max_positions or 1024) - 2
    max_tokens = min(max_tokens or 1024, limit)
    tokenized = [tokenize_words(lm.tokenizer, words) for words in stories]
    windows: list[Window] = []
    for s, tokens in enumerate(tokenized):
        if lm.is_encoder:
            windows += encoder_windows(s, tokens, context=min_context, max_tokens=max_tokens)
        elif scheme == "reference":
            windows += plan_windows(s, tokens, min_context=REFERENCE_KEEP_WORDS, max_words=REFERENCE_MAX_WORDS)
            longest = max((tokens.n_tokens(w.start, w.end) for w in windows if w.story == s), default=0)
            if longest > limit:
                raise UsageError(f"{lm.name}: a 512-word reference window needs {longest} tokens but the model "
                                 f"takes {limit + 2}; use the efficient context scheme")
        elif scheme == "efficient":
            windows += plan_windows(s, tokens, min_context=min_context, max_tokens=max_tokens,
                                    max_words=max_words)
        else:
            raise UsageError(f"context={scheme!r}: choose efficient or reference")

    result = ExtractionResult(layers=list(layers))
    result.features = [{layer: np.zeros((len(t.word_last_token), lm.hidden_size), np.float32) for layer in layers}
                       for t in tokenized]
    # On a GPU, many windows per pass fill the device. On the CPU one window per pass is
    # fastest (measured: larger batches fall out of cache and run slower, never faster).
    batch_tokens = batch_tokens or (65536 if lm.device == "cuda" else 1024)
    prefix, suffix = _special_tokens(lm.tokenizer, lm.is_encoder)
    lengths = [len(prefix) + tokenized[w.story].n_tokens(w.start, w.end) + len(suffix) for w in windows]
    order = np.argsort(lengths, kind="stable")[::-1]
    batches = _batches([int(i) for i in order], lengths, batch_tokens)
    pad_id = _pad_id(lm.tokenizer)
    device = next(lm.model.parameters()).device
    t0 = time.perf_counter()
    bar = _progress(len(windows), f"{lm.name}", progress)
    def run(batch: list[int]) -> None:
        width = max(lengths[i] for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        rows, cols, targets = [], [], []
        for b, i in enumerate(batch):
            w = windows[i]
            tokens = tokenized[w.story]
            t_start = tokens.word_first_token[w.start]
            ids = np.concatenate([prefix, tokens.ids[t_start:tokens.word_last_token[w.end - 1] + 1], suffix])
            input_ids[b, : len(ids)] = torch.from_numpy(ids)
            mask[b, : len(ids)] = 1
            out_words = np.arange(w.first_output, w.end)
            rows.append(np.full(len(out_words), b))
            cols.append(tokens.word_last_token[out_words] - t_start + len(prefix))
            targets.append((w.story, out_words))
        # Causal models need no padding mask: padding sits on the right, after every real
        # token, so the causal mask already hides it; without a mask, attention takes its
        # fused causal path. Encoders see both ways and need the mask.
        attention = mask.to(device) if lm.is_encoder else None
        out = lm.model(input_ids=input_ids.to(device), attention_mask=attention, output_hidden_states=True)
        rows_t = torch.from_numpy(np.concatenate(rows)).to(device)
        cols_t = torch.from_numpy(np.concatenate(cols)).to(device)
        gathered = torch.stack([out.hidden_states[layer][rows_t, cols_t] for layer in layers])
        gathered = gathered.float().cpu().numpy()
        offset = 0
        for story, out_words in targets:
            for k, layer in enumerate(layers):
                result.features[story][layer][out_words] = gathered[k, offset: offset + len(out_words)]
            offset += len(out_words)
        result.n_tokens += int(mask.sum())
        result.n_passes += len(batch)
        bar.update(len(batch))

    with torch.inference_mode():
        for batch in batches:
            run_with_oom_retry(run, batch, f"{lm.name}, windows of up to {max(lengths)} tokens")
    bar.close()
    result.seconds = time.perf_counter() - t0
    log.info("%s: %d words, %d windows, %d tokens in %.1f s (%.0f tokens/s) on %s", lm.name,
             sum(len(s) for s in stories), len(windows), result.n_tokens, result.seconds,
             result.n_tokens / max(result.seconds, 1e-9), device)
    return result


def _batches(order: list[int], lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group windows (longest first) so that padded tokens per batch stay within budget."""
    batches, current = [], []
    for i in order:
        width = max([lengths[j] for j in current] + [lengths[i]])
        if current and width * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _special_tokens(tokenizer, is_encoder: bool) -> tuple[np.ndarray, np.ndarray]:
    """Tokens the tokenizer puts before and after a text ([CLS] ... [SEP], BOS ...).

    A causal model's sequence starts with its BOS token even where the tokenizer adds
    none by default (GPT-2), as in the reference; what follows the text is dropped for
    causal models (no earlier token can see it).
    """
    probe = "a"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    k = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), 0)
    prefix, suffix = list(full[:k]), list(full[k + len(bare):])
    if not is_encoder:
        suffix = []
        if not prefix and tokenizer.bos_token_id is not None:
            prefix = [tokenizer.bos_token_id]
    return np.asarray(prefix, np.int64), np.asarray(suffix, np.int64)


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="window", leave=False, disable=None)  # off when not a terminal


def extract_lm_features_reference_loop(lm: LanguageModel, words: list[str], *, layers: list[int]) -> dict:
    """The reference scheme run as the reference code runs it: batch 1, one pass per window.

    Every layer of each pass is kept, then the window's output words are copied out.
    It is the oracle that tests and benchmarks compare :func:`extract_lm_features` with.
    """
    import torch

    tokens = tokenize_words(lm.tokenizer, words)
    prefix, _ = _special_tokens(lm.tokenizer, lm.is_encoder)
    out = {layer: np.zeros((len(words), lm.hidden_size), np.float32) for layer in layers}
    device = next(lm.model.parameters()).device
    with torch.inference_mode():
        for w in reference_windows(0, len(words)):
            t_start = tokens.word_first_token[w.start]
            ids = np.concatenate([prefix, tokens.ids[t_start:tokens.word_last_token[w.end - 1] + 1]])
            hidden = lm.model(input_ids=torch.from_numpy(ids)[None].to(device), output_hidden_states=True).hidden_states
            all_layers = [h[0].float().cpu().numpy() for h in hidden]
            positions = tokens.word_last_token[w.first_output:w.end] - t_start + len(prefix)
            for layer in layers:
                out[layer][w.first_output:w.end] = all_layers[layer][positions]
    return out

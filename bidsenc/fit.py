"""One participant's encoding models: responses and features aligned, fitted, scored, saved.

Wires ``bids`` (responses), ``features`` (cached per story), ``align`` and
``models``; writes one array file per feature model (layers x voxels x
statistics) and a TSV summary under ``output_dir/sub-<label>/encoding/``.
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ._io import atomic_write_bytes, atomic_write_text
from .align import AlignSettings
from .align.design import features_for, split_responses
from .bids.bold import load_responses
from .bids.experiment import Experiment
from .config import RunConfig
from .errors import DataError
from .models.cv import bootstrap_chunks, leave_stories_out
from .models.encoding import (
    LAYER_STATS,
    alpha_grid,
    evaluate_layer,
    evaluate_layer_outer,
    noise_ceiling,
    out_of_fold_predictions,
    select_best_layer,
    significance,
    stack_spaces,
)

log = logging.getLogger(__name__)


def fit_participant(cfg: RunConfig, experiment: Experiment, spaces: list, device: str, out_dir: Path) -> dict:
    """Fit every feature space and layer for one participant and write the results."""
    m = cfg.models
    reference = m.preset == "reference"
    settings = AlignSettings(preset=m.preset, lanczos_normalize=m.lanczos_normalize)
    t0 = time.perf_counter()
    seed = cfg.execution.random_seed
    test_stories = list(m.test_stories) or experiment.repeated_stories
    outer = not test_stories
    if outer:
        log.warning("sub-%s: no story was heard twice and none was named with --test-stories: scores come from "
                    "an outer leave-stories-out loop (contiguous blocks for a single story); no noise ceiling",
                    experiment.participant)
    responses, space = load_responses(experiment.runs)
    detrend = m.clean == "detrend" or (m.clean == "auto" and experiment.runs[0].bold.kind != "hdf5")
    resp = split_responses(experiment.runs, responses, test_stories, settings, detrend=detrend,
                           high_pass=m.high_pass)
    if resp.test is None and not outer:
        raise DataError(f"sub-{experiment.participant}: none of the test stories {test_stories} was heard")
    if not resp.valid.any():
        raise DataError(f"sub-{experiment.participant}: every voxel is constant or not finite in some run")
    ceiling = None if outer else noise_ceiling(resp.test_repeats, floor=0.25 if reference else m.ceiling_floor)
    folds = (bootstrap_chunks(len(resp.train), seed=seed) if reference
             else leave_stories_out(resp.train_groups, m.n_folds, seed=seed))
    alphas = alpha_grid("reference" if reference else m.alphas)
    valid = resp.valid
    y_train = resp.train[:, valid]
    y_test = y_train if outer else resp.test[:, valid]
    ceil_v = ceiling[valid] if ceiling is not None else None
    log.info("sub-%s: %d training volumes from %d stories, %s, %d voxels (%d constant or non-finite left "
             "out); %d folds", experiment.participant, len(y_train), len(resp.story_names),
             "scored by outer cross-validation" if outer else
             f"{len(y_test)} test volumes ({len(resp.test_repeats)} repeats of {', '.join(test_stories)})",
             int(valid.sum()), int((~valid).sum()), len(folds))

    out_dir.mkdir(parents=True, exist_ok=True)
    enc_dir = out_dir / "encoding"
    enc_dir.mkdir(exist_ok=True)
    rows, best = [], {}
    for fs in spaces:
        fits = []
        for layer in fs.layers:
            story_features = _layer_features(fs, experiment.stories, layer)
            x_train, x_test = features_for(resp, story_features, settings)
            if outer:
                fit = evaluate_layer_outer(layer, x_train, y_train, resp.train_groups, folds, alphas,
                                           n_inner=m.n_folds, seed=seed, device=device,
                                           mem_gb=cfg.execution.mem_gb)
            else:
                fit = evaluate_layer(layer, x_train, y_train, x_test, y_test, folds, alphas, device=device,
                                     mem_gb=cfg.execution.mem_gb)
            fits.append(fit)
            rows.append(_summary_row(fs, fit, ceil_v))
        chosen = select_best_layer(fits)
        scored = _held_out(y_train, folds) if outer else y_test
        pvalues, discoveries = significance(chosen.predictions, scored, n_permutations=m.n_permutations,
                                            q=m.fdr_q, seed=cfg.execution.random_seed)
        best[fs.name] = (fs, chosen)
        _save_space(enc_dir / f"{fs.name}.npz", fs, fits, chosen, pvalues, discoveries, valid, ceil_v)
        log.info("%s: best layer %d (by cross-validated training score): mean test r %.3f, %d voxels "
                 "significant (FDR q=%.2f)", fs.name, chosen.layer, float(chosen.test_r.mean()),
                 int(discoveries.sum()), m.fdr_q)

    summary = pd.DataFrame(rows)
    stacked = None
    if m.stacking and len(best) >= 2 and not reference and not outer:
        stacked = _stack(best, resp, settings, folds, y_train, y_test, alphas, device, cfg, experiment)
        np.savez(buf := io.BytesIO(), weights=stacked.weights, r=stacked.test_r, r2=stacked.test_r2,
                 names=np.array(stacked.names), valid=valid)
        atomic_write_bytes(enc_dir / "stacked.npz", buf.getvalue())
        summary = pd.concat([summary, pd.DataFrame([{
            "model": "stacked:" + "+".join(stacked.names), "layer": "best", "mean_r": stacked.test_r.mean(),
            "median_r": np.median(stacked.test_r), "mean_r2": stacked.test_r2.mean(),
            "fraction_of_ceiling": _fraction_of_ceiling(stacked.test_r, ceil_v), "cv_score": np.nan,
            "best": True}])], ignore_index=True)
    if ceiling is not None:
        np.savez(buf := io.BytesIO(), cc_max=ceiling.astype(np.float32), valid=valid)
        atomic_write_bytes(enc_dir / "ceiling.npz", buf.getvalue())
    space_arrays = {"n_voxels": np.array(space.n_voxels)}
    if space.mask is not None:
        space_arrays |= {"mask": space.mask, "affine": space.affine}
    if space.n_vertices is not None:
        space_arrays["n_vertices"] = np.array(space.n_vertices)
    np.savez(buf := io.BytesIO(), **space_arrays)
    atomic_write_bytes(enc_dir / "space.npz", buf.getvalue())
    for name, (fs, chosen) in best.items():
        summary.loc[(summary.model == name) & (summary.layer == chosen.layer), "best"] = True
    atomic_write_text(enc_dir / "summary.tsv", summary.to_csv(sep="\t", index=False, float_format="%.4f"))
    atomic_write_text(enc_dir / "responses.json", json.dumps({
        "space": space.kind, "space_name": space.name, "mask": space.mask_source, "n_voxels": space.n_voxels,
        "n_valid": int(valid.sum()), "cleaning": ("nilearn.signal.clean detrend, z-scored per run" if detrend
                                                  else "as provided (already cleaned), z-scored per run"),
        "test_stories": test_stories, "n_test_repeats": 0 if outer else int(len(resp.test_repeats)),
        "scoring": "outer leave-stories-out cross-validation" if outer else "repeated test stories",
        "train_stories": resp.story_names, "preset": m.preset, "delays_trs": settings.delay_trs(
            experiment.runs[0].tr), "notes": resp.notes}, indent=2) + "\n")
    log.info("sub-%s: encoding models fitted in %.0f s; results in %s", experiment.participant,
             time.perf_counter() - t0, enc_dir)
    return {"summary": summary, "ceiling": ceiling, "valid": valid}


def _layer_features(fs, stories, layer: int) -> dict:
    """Per story, its feature times and one layer's features as float32 (read from the cache)."""
    out = {}
    for sid in stories:
        stored = fs.load(sid)
        out[sid] = (stored.times, np.asarray(stored.layers[layer], dtype=np.float32))
    return out


def _held_out(y, folds):
    """Rows in the order an outer loop predicts them (its held-out folds, sorted)."""
    scored = np.zeros(len(y), dtype=bool)
    for _, test in folds:
        scored[test] = True
    return y[scored]


def _stack(best, resp, settings, folds, y_train, y_test, alphas, device, cfg, experiment):
    names, oof, test_preds = [], [], []
    for name, (fs, chosen) in best.items():
        story_features = _layer_features(fs, experiment.stories, chosen.layer)
        x_train, _ = features_for(resp, story_features, settings)
        oof.append(out_of_fold_predictions(x_train, y_train, folds, chosen.alphas, device=device,
                                           mem_gb=cfg.execution.mem_gb))
        test_preds.append(chosen.predictions)
        names.append(name)
    return stack_spaces(names, oof, test_preds, y_train, y_test)


def _fraction_of_ceiling(r: np.ndarray, ceiling: np.ndarray | None) -> float:
    """Median of r / CC_max over voxels whose ceiling is at least 0.3 (NaN without a ceiling)."""
    if ceiling is None or not (ceiling >= 0.3).any():
        return float("nan")
    good = ceiling >= 0.3
    return float(np.median(r[good] / ceiling[good]))


def _summary_row(fs, fit, ceiling) -> dict:
    return {"model": fs.name, "layer": fit.layer, "mean_r": float(fit.test_r.mean()),
            "median_r": float(np.median(fit.test_r)), "mean_r2": float(fit.test_r2.mean()),
            "fraction_of_ceiling": _fraction_of_ceiling(fit.test_r, ceiling),
            "cv_score": float(fit.cv_score.mean()), "best": False}


def _save_space(path: Path, fs, fits, chosen, pvalues, discoveries, valid, ceiling) -> None:
    """One file per feature model: every layer's statistics, plus significance at the best layer."""
    stats = np.stack([f.stats(ceiling) for f in fits])  # [L, V_valid, S]
    buf = io.BytesIO()
    np.savez(buf, stats=stats, stat_names=np.array(LAYER_STATS), layers=np.array(fs.layers),
             best_layer=np.array(chosen.layer), pvalue=pvalues.astype(np.float32), fdr=discoveries,
             valid=valid, model=np.array(json.dumps(fs.describe())))
    atomic_write_bytes(path, buf.getvalue())

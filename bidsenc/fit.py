"""One participant's encoding models: responses and features aligned, fitted and scored.

Wires ``bids`` (responses), ``features`` (cached per story), ``align`` and
``models``, and returns a :class:`~bidsenc.results.ParticipantResult`; writing it
is the job of :mod:`bidsenc.derivatives`.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pandas as pd

from .align import AlignSettings, kept_rows
from .align.design import CLEAN_CHUNK_ELEMENTS, clean_run, features_for, planned_rows, split_responses
from .bids.bold import (
    NATIVE_SPACES,
    find_regions,
    load_confounds,
    read_responses,
    run_read_bytes,
    space_from_headers,
)
from .bids.experiment import Experiment
from .config import DEFAULT_HIGH_PASS, RunConfig
from .errors import DataError, MissingInputError, UsageError
from .models.ceiling import intersubject_reliability
from .models.cv import bootstrap_chunks, buffer_rows, leave_stories_out
from .models.encoding import (
    alpha_grid,
    evaluate_layer,
    evaluate_layer_outer,
    noise_ceiling,
    out_of_fold_residual_covariance,
    select_best_layer,
    shuffled_null,
    significance,
    stack_spaces,
)
from .models.ridge import MemoryBudgetError, fit_and_score, pearson_r
from .results import BandedResult, ModelResult, ParticipantResult, model_family, relative_depth

log = logging.getLogger(__name__)


#: Below this many response values (voxels x volumes) a fit runs on one CPU thread: BLAS's and
#: torch's thread pools spin and stall on such small problems when the machine is busy (minutes
#: instead of seconds), and one thread is about as fast when it is not.
SMALL_PROBLEM_ELEMENTS = 20_000_000


def fit_participant(cfg: RunConfig, experiment: Experiment, spaces: list, device: str,
                    peers: list[Experiment] = ()) -> ParticipantResult:
    """Fit every feature space and layer for one participant; score, stack and scale them.

    ``peers`` are other participants' experiments: without test repeats, those who heard
    the same runs in the same template space give an inter-subject ceiling.
    """
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    small = str(device).startswith("cpu") and _problem_size(experiment) < SMALL_PROBLEM_ELEMENTS
    try:
        if not small:
            return _fit_participant(cfg, experiment, spaces, device, peers)
        torch.set_num_threads(1)
        try:
            with threadpool_limits(1):
                return _fit_participant(cfg, experiment, spaces, device, peers)
        finally:
            torch.set_num_threads(threads)
    except MemoryBudgetError as err:  # the ridge had --mem less what the run holds (see _host_memory_plan)
        held_gb = cfg.execution.mem_gb - err.budget_gb * 2**30 / 1e9
        need_gb = err.need_gb * 2**30 / 1e9 + held_gb
        raise UsageError(f"--mem {cfg.execution.mem_gb:g} GB is too small for sub-{experiment.participant}: {err}, "
                         f"beside the {held_gb:.1f} GB the run holds; give --mem of at least "
                         f"{np.ceil(need_gb * 1.1):.0f}GB (bidsenc's batches have a fixed size, so that results do "
                         "not depend on memory)") from None


def check_memory_early(cfg: RunConfig, experiment: Experiment) -> None:
    """Refuse a ``--mem`` too small for the responses before any feature is extracted.

    Possible when the voxels are known without reading the data (a brain mask file,
    surfaces, ds003020's files); when the mask must be computed from the EPI, the check
    waits for :func:`fit_participant`, which makes it again with what the process then holds.
    """
    if cfg.execution.mem_gb is None:
        return
    space = space_from_headers(experiment.runs, cfg.inputs.mask)
    if space is None:
        return
    n_models = sum(not _is_baseline(spec.kind) for spec in cfg.features)
    test_stories = list(cfg.models.test_stories) or experiment.repeated_stories
    _host_memory_plan(cfg, experiment, space, align_settings(cfg.models, experiment), test_stories, n_models,
                      "cpu", quiet=True)


def _host_memory_plan(cfg: RunConfig, experiment: Experiment, space, settings: AlignSettings,
                      test_stories: list[str], n_models: int, device: str, quiet: bool = False) -> float | None:
    """Check ``--mem`` against what this participant's run will hold; return the ridge's share (GiB).

    Counted, before any response is read: what the process holds now (libraries, model
    caches), the responses it keeps (float32: training rows, test repeats and their mean,
    every voxel of the space), at the peak of loading one run as read plus its cleaning
    chunks, and, when spaces are stacked, every model's predictions of one fold. On the
    CPU the ridge's batches get what is left; on a GPU they live in its memory, which
    ``--mem`` does not bound. Without ``--mem``: None.
    """
    mem_gb = cfg.execution.mem_gb
    if mem_gb is None:
        return None
    m = cfg.models
    n_train, rows = planned_rows(experiment.runs, test_stories, settings)
    responses = 4 * space.n_voxels * rows
    # stacking predicts one fold at a time with every model (plus one prediction being made and the fold's
    # responses); a fold holds about 1/n_folds of the rows, or of the stories when they are fewer (uneven: x2)
    n_stories = len({s.story_id for r in experiment.runs for s in r.segments} - set(test_stories))
    fold_rows = min(n_train, int(np.ceil(2 * n_train / max(1, min(m.n_folds, n_stories)))))
    stacking = 4 * space.n_voxels * fold_rows * (n_models + 2) if (m.stacking and n_models >= 2 and test_stories
                                                                    and m.preset != "reference") else 0
    now = _resident_bytes()
    reading = max(run_read_bytes(run, space) for run in experiment.runs) + _CLEANING_BYTES
    limit = mem_gb * 1e9
    held = now + responses + stacking
    if held + max(reading, _MIN_RIDGE_BYTES) > limit:
        parts = [f"the process holds {now / 1e9:.1f} GB now",
                 f"its responses take {responses / 1e9:.1f} GB ({rows:,} volumes x {space.n_voxels:,} voxels, float32)",
                 f"reading a run {reading / 1e9:.1f} GB more"]
        if stacking:
            parts.append(f"stacking {n_models} models predicts a fold with each ({stacking / 1e9:.1f} GB; "
                         "stacking = false under [models] in a --config-file saves it)")
        need = held + max(reading, _MIN_RIDGE_BYTES)
        raise UsageError(f"--mem {mem_gb:g} GB is too small for sub-{experiment.participant}: {'; '.join(parts)}; "
                         f"give --mem of at least {np.ceil(need * 1.1 / 1e9):.0f}GB, or fewer voxels (--mask)")
    if quiet:
        return None
    log.info("sub-%s: memory: %.1f GB held, %.1f GB of responses%s; %.1f GB of --mem %g GB left for ridge batches",
             experiment.participant, now / 1e9, responses / 1e9,
             f", {stacking / 1e9:.1f} GB of stacking's fold predictions" if stacking else "", (limit - held) / 1e9,
             mem_gb)
    if str(device).startswith("cuda"):
        return None
    return (limit - held) / 2**30


# What cleaning a run takes besides the run itself: a few float64 copies of one column chunk.
_CLEANING_BYTES = 16 * 8 * CLEAN_CHUNK_ELEMENTS
# Less than this left for the ridge after the responses is refused at once rather than after hours.
_MIN_RIDGE_BYTES = 2**30


def _resident_bytes() -> int:
    """This process's resident memory now (Linux); 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _problem_size(experiment: Experiment) -> int:
    """Voxels per volume (from the first run's header: an upper bound on those fitted) x all volumes."""
    run = experiment.runs[0]
    if run.bold.kind != "nifti":
        return SMALL_PROBLEM_ELEMENTS  # surfaces and ds003020 responses are large
    import nibabel as nib

    try:
        voxels = int(np.prod(nib.load(run.bold.paths[0]).shape[:3]))
    except Exception:  # unreadable files are reported where the responses are loaded
        return SMALL_PROBLEM_ELEMENTS
    return voxels * sum(r.n_volumes for r in experiment.runs)


def _fit_participant(cfg: RunConfig, experiment: Experiment, spaces: list, device: str,
                     peers) -> ParticipantResult:
    m = cfg.models
    reference = m.preset == "reference"
    settings = align_settings(m, experiment)
    t0 = time.perf_counter()
    seed = cfg.execution.random_seed
    label = experiment.participant
    test_stories = list(m.test_stories) or experiment.repeated_stories
    outer = not test_stories
    if outer:
        log.warning("sub-%s: no story was heard twice and none was named with --test-stories: scores come from "
                    "an outer leave-stories-out loop (contiguous blocks for a single story), and there is no "
                    "repeat-based noise ceiling", label)
    # low-level baselines are controls to compare models with, not feature spaces to combine
    n_models = sum(not _is_baseline(fs.describe()["kind"]) for fs in spaces)
    space, responses = read_responses(experiment.runs, cfg.inputs.mask)
    ridge_mem_gb = _host_memory_plan(cfg, experiment, space, settings, test_stories, n_models, device)
    confounds = [load_confounds(run, m.confounds) for run in experiment.runs] if m.confounds else None
    resp = split_responses(experiment.runs, responses, test_stories, settings, confounds=confounds)
    if resp.test is None and not outer:
        raise DataError(f"sub-{label}: none of the test stories {test_stories} was heard")
    if not resp.valid.any():
        which = (f"run(s) {', '.join(resp.empty_runs)} hold no usable signal (every voxel constant, e.g. all zero, "
                 "or not finite)" if resp.empty_runs else f"every one of the {space.n_voxels} voxels is constant "
                 f"or not finite in some of its {len(experiment.runs)} runs")
        raise DataError(f"sub-{label}: {which}; check those BOLD files (e.g. with nilearn's plotting.plot_epi) "
                        "or leave them out with --bids-filter-file")
    convention = "reference" if reference else "consistent"
    ceiling = None if outer else noise_ceiling(resp.test_repeats, floor=m.ceiling_floor, convention=convention)
    tr = experiment.runs[0].tr
    gap = buffer_rows(tr, max(settings.delay_trs(tr)) * tr)
    # scores without a test story always come from buffered blocks or whole stories, also under the
    # reference preset (its overlapping bootstrap chunks would score rows more than once)
    folds = leave_stories_out(resp.train_groups, m.n_folds, seed, gap) if outer else \
        _folds(resp.train_groups, m, seed, gap)
    alphas = alpha_grid("reference" if reference else m.alphas)
    score = m.cv_score or ("reference" if reference else "r2")
    # every ridge fit of this participant: the reference preset computes in float64 like the reference code,
    # so that near-tied alphas of noise voxels are decided as it decides them
    ridge = {"score": score, "device": device, "mem_gb": ridge_mem_gb,
             "dtype": "float64" if reference else "float32"}
    valid = resp.valid  # resp's columns are the valid voxels
    y_train = resp.train
    y_test = y_train if outer else resp.test
    ceil_v = ceiling.astype(np.float32) if ceiling is not None else None
    ceiling_info = {"kind": "cc_max", "description": "CC_max (Schoppe et al. 2016) from the test repeats",
                    "convention": convention, "floor": m.ceiling_floor}
    if outer:
        ceil_v, ceiling_info = _intersubject_ceiling(experiment, list(peers), resp, space, settings, m)
    n_left_out = int((~valid).sum())
    if n_left_out:
        log.warning("sub-%s: %d voxels have constant or non-finite responses in some run and are left out "
                    "(0 in every map)", label, n_left_out)
    log.info("sub-%s: %d training volumes from %d stories, %s, %d voxels; %d folds", label, len(y_train),
             len(resp.story_names), "scored by outer cross-validation" if outer else
             f"{len(y_test)} test volumes ({len(resp.test_repeats)} repeats of {', '.join(test_stories)})",
             int(valid.sum()), len(folds))

    threshold = cfg.outputs.ceiling_threshold
    will_stack = m.stacking and n_models >= 2 and not reference and not outer
    will_band = m.banded and n_models >= 2 and not outer
    will_scale = bool(m.data_scaling_seeds) and not outer
    if m.banded and not will_band:
        log.info("sub-%s: banded ridge needs two feature spaces or more and a test story", label)
    if m.data_scaling_seeds and not will_scale:
        log.info("sub-%s: no data-scaling curve without a test story", label)
    rows, models, scaling_rows = [], [], []
    joint = {"names": [], "designs": [], "alphas": [], "test_predictions": [], "x_train": [], "x_test": []}
    for fs in spaces:
        fits, layer_rows, kept = [], [], None  # kept: the best layer so far with its design, reused below
        for layer in fs.layers:
            x_train, x_test = features_for(resp, _layer_features(fs, experiment.stories, layer), settings)
            if outer:
                fit = evaluate_layer_outer(layer, x_train, y_train, resp.train_groups, folds, alphas,
                                           n_inner=m.n_folds, seed=seed, gap=gap, **ridge)
            else:
                fit = evaluate_layer(layer, x_train, y_train, x_test, y_test, folds, alphas, **ridge,
                                     return_weights=m.save_weights)
            fits.append(fit)
            layer_rows.append(_summary_row(fs, fit, ceil_v, threshold))
            if kept is None or select_best_layer([kept[0], fit]) is fit:  # ties keep the earlier layer
                kept = (fit, x_train, x_test)
        chosen, x_train, x_test = kept
        for fit in fits:  # weights, when asked, are kept for the chosen layer only
            if fit is not chosen:
                fit.weights = None
        null = None
        if m.null_draws:
            null = _shuffled_null(fs.name, chosen, x_train, x_test, y_train, y_test, resp.train_groups, folds,
                                  alphas, outer, gap, ridge, cfg)
            layer_rows[fits.index(chosen)].update(null_mean_r=null.mean_r, null_r95=null.threshold,
                                                  fraction_above_null=null.fraction_above)
        scored = _held_out(y_train, folds) if outer else y_test
        pvalues, discoveries = significance(chosen.predictions, scored, n_permutations=m.n_permutations,
                                            q=m.fdr_q, seed=seed)
        layer_rows[fits.index(chosen)]["best"] = True
        rows += layer_rows
        models.append(ModelResult(fs.name, fs.describe(), np.array(fs.layers),
                                  np.stack([f.stats(ceil_v) for f in fits]), chosen.layer,
                                  pvalues.astype(np.float32), discoveries, chosen.weights,
                                  None if null is None else null.r))
        log.info("%s: best layer %d (by cross-validated training score): mean test r %.3f, %d voxels "
                 "significant (FDR q=%.2f)", fs.name, chosen.layer, float(chosen.test_r.mean()),
                 int(discoveries.sum()), m.fdr_q)
        # the chosen layer's design serves stacking, banded ridge and data scaling
        combined = not _is_baseline(fs.describe()["kind"])
        if combined:
            joint["names"].append(fs.name)
        if will_stack and combined:
            joint["designs"].append(x_train)
            joint["alphas"].append(chosen.alphas)
            joint["test_predictions"].append(chosen.predictions)
        if will_band and combined:
            joint["x_train"].append(x_train)
            joint["x_test"].append(x_test)
        if will_scale:
            scaling_rows += _data_scaling(fs.name, chosen.layer, x_train, x_test, resp, y_train, y_test, alphas,
                                          ceil_v, cfg, tr, gap, ridge)

    stacked = banded = None
    if will_stack:
        residual_cov = out_of_fold_residual_covariance(joint["designs"], joint["alphas"], y_train, folds,
                                                       device=device, mem_gb=ridge_mem_gb, dtype=ridge["dtype"])
        stacked = stack_spaces(joint["names"], residual_cov, joint["test_predictions"], y_test)
        rows.append(_joint_row("stacked", stacked.r, stacked.r2, ceil_v, threshold))
    if will_band:
        banded = _banded(joint["names"], joint["x_train"], y_train, joint["x_test"], y_test, folds, alphas, device,
                         seed)
        rows.append(_joint_row("banded", banded.r, banded.r2, ceil_v, threshold))
    summary = pd.DataFrame(rows)
    scaling = pd.DataFrame(scaling_rows)
    info = {
        "space": space.kind, "space_name": space.name, "mask": space.mask_source, "n_voxels": space.n_voxels,
        "n_fitted": int(valid.sum()), "n_left_out": n_left_out,
        "cleaning": _cleaning(settings, confounds, m.confounds), "high_pass_hz": settings.high_pass,
        "test_stories": test_stories, "n_test_repeats": 0 if outer else int(len(resp.test_repeats)),
        "n_test_volumes": 0 if outer else int(len(y_test)), "n_train_volumes": int(len(y_train)),
        "scoring": _scoring(outer, resp, len(folds), gap, tr),
        "noise_ceiling": ceiling_info, "cv_score": score,
        "alpha_selection": _alpha_selection(m, outer, folds, score, alphas, gap), "precision": ridge["dtype"],
        "train_stories": resp.story_names, "preset": m.preset,
        "delays_trs": settings.delay_trs(experiment.runs[0].tr), "tr": experiment.runs[0].tr,
        "notes": resp.notes}
    regions = find_regions(experiment.runs, space)
    labels, names = (None, {})
    if regions is not None:
        labels, names, info["regions"] = regions[0][valid], regions[1], regions[2]
    log.info("sub-%s: encoding models fitted in %.0f s", label, time.perf_counter() - t0)
    return ParticipantResult(label, space, valid, models, ceil_v, stacked, summary, scaling, info, banded,
                             labels, names)


def _is_baseline(kind: str) -> bool:
    """A feature kind that is a low-level baseline (word rate, envelope, ...), not a model."""
    return kind == "lowlevel"


def _shuffled_null(name, chosen, x_train, x_test, y_train, y_test, groups, folds, alphas, outer, gap, ridge: dict,
                   cfg):
    """The chosen layer refitted on features circularly shifted per story: what a misaligned stimulus scores."""
    m = cfg.models
    seed = cfg.execution.random_seed
    if outer:
        def refit(xs, _):
            return evaluate_layer_outer(chosen.layer, xs, y_train, groups, folds, alphas, n_inner=m.n_folds,
                                        seed=seed, gap=gap, **ridge).test_r
    else:
        def refit(xs, xt):
            return fit_and_score(xs, y_train, xt, y_test, folds, alphas, **ridge)["test_r"]
    t0 = time.perf_counter()
    null = shuffled_null(refit, x_train, groups, None if outer else x_test, chosen.test_r, n_draws=m.null_draws,
                         seed=seed)
    real = float(chosen.test_r.mean())
    log.info("%s layer %d, misaligned-stimulus null (%d draws, features circularly shifted per story): mean r "
             "%.3f (real %.3f); %.0f%% of voxels above the null's 95th percentile r %.3f (%.0f s)",
             name, chosen.layer, m.null_draws, null.mean_r, real,
             100 * null.fraction_above, null.threshold, time.perf_counter() - t0)
    if not null.clearly_above:
        log.warning("%s layer %d scores are not clearly above a misaligned stimulus (mean r %.3f against %.3f with "
                    "the features shifted in time; %.0f%% of voxels above the null's 95th percentile, 5%% expected "
                    "by chance): do not read its maps as stimulus-driven", name, chosen.layer, real, null.mean_r,
                    100 * null.fraction_above)
    return null


def _intersubject_ceiling(experiment, peers, resp, space, settings, m):
    """Per voxel, the correlation of this participant's training responses with other participants' mean.

    Only runs that other participants heard identically (same stories, onsets, volumes and
    TR) in the same template space count; it is an inter-subject ceiling, labelled as such:
    stimulus-driven signal shared across people, not the repeat-based CC_max.
    """
    none = {"kind": "none", "description": "no test repeats and no other participant on the same runs in the "
                                           "same template space"}
    if not peers or space.name in NATIVE_SPACES or space.kind == "index":
        return None, none
    offsets = np.cumsum([0] + [len(kept_rows(run, settings, test=False)) for run in resp.train_runs])
    total = np.zeros(resp.train.shape, dtype=np.float32)  # on this participant's valid voxels
    count = np.zeros(len(resp.train))
    used = []
    for peer in peers:
        theirs = {_timing(run): run for run in peer.runs}
        pairs = [(i, theirs[_timing(run)]) for i, run in enumerate(resp.train_runs) if _timing(run) in theirs]
        if not pairs:
            continue
        try:  # cleaned exactly as this participant's responses are, one run at a time
            _, ys = read_responses([run for _, run in pairs], like=space)
            confounds = [load_confounds(run, m.confounds) for _, run in pairs]
            added = np.zeros_like(total)
            for (i, run), conf in zip(pairs, confounds, strict=True):
                rows = kept_rows(run, settings, test=False)
                added[offsets[i]:offsets[i] + len(rows)] = clean_run(next(ys)[:, resp.valid], run, settings, conf)[rows]
        except (DataError, MissingInputError) as err:
            log.info("inter-subject ceiling: sub-%s left out (%s)", peer.participant, err.message)
            continue
        total += added
        for i, run in pairs:
            count[offsets[i]:offsets[i] + len(kept_rows(run, settings, test=False))] += 1
        used.append(peer.participant)
    have = count > 0
    if not used or have.sum() < 20:
        return None, none
    others = total[have] / count[have, None].astype(np.float32)
    isc = np.nan_to_num(pearson_r(others, resp.train[have]))
    n_others = float(count[have].mean())
    ceiling = intersubject_reliability(isc, n_others).astype(np.float32)
    log.info("inter-subject ceiling from %d other participants over %d volumes: median %.3f", len(used),
             int(have.sum()), float(np.median(ceiling)))
    return ceiling, {"kind": "intersubject", "peers": used, "n_volumes": int(have.sum()),
                     "n_others_mean": n_others, "median_isc": float(np.median(isc)),
                     "description": "inter-subject ceiling: the correlation of this participant's responses with "
                                    f"the mean of {len(used)} other participants' on the same runs (leave-one-"
                                    "participant-out), corrected for the noise in that mean; it counts only "
                                    "signal shared across people, unlike a repeat-based ceiling"}


def _timing(run):
    return (tuple((seg.story_id, round(seg.onset, 2)) for seg in run.segments), run.n_volumes, run.tr,
            run.trimmed_start, run.trimmed_end)


def align_settings(m, experiment: Experiment) -> AlignSettings:
    """The run's alignment and temporal filtering, resolved for this participant's data.

    Responses that bidsenc cleans itself (raw and fMRIPrep inputs) are detrended and, under
    the default preset, high-passed at 1/128 Hz unless ``high_pass`` says otherwise;
    ds003020's preprocessed files keep their authors' cleaning, and the reference preset
    the paper's (no high-pass). An explicit ``high_pass`` applies to any input.
    """
    cleaned_here = m.clean == "detrend" or (m.clean == "auto" and experiment.runs[0].bold.kind != "hdf5")
    high_pass = m.high_pass
    if high_pass is None:
        high_pass = DEFAULT_HIGH_PASS if cleaned_here and m.preset != "reference" else 0.0
    shortest_tr = min(run.tr for run in experiment.runs)
    if high_pass >= 0.5 / shortest_tr:
        raise UsageError(f"high_pass {high_pass:g} Hz is above the Nyquist frequency of a TR of {shortest_tr:g} s; "
                         "choose a cutoff such as 1/128")
    if high_pass and m.preset == "reference":
        log.info("reference preset with a high-pass of %g Hz: the responses are filtered, the features are "
                 "not (the paper filtered neither)", high_pass)
    return AlignSettings(preset=m.preset, lanczos_normalize=m.lanczos_normalize, detrend=cleaned_here,
                         high_pass=float(high_pass))


def _cleaning(settings: AlignSettings, confounds, patterns) -> str:
    steps = ["linear detrend" if settings.detrend else "",
             f"cosine high-pass at {settings.high_pass:.4g} Hz ({1 / settings.high_pass:.0f} s)"
             if settings.high_pass else "",
             f"{confounds[0].shape[1]} fMRIPrep confounds regressed out ({', '.join(patterns)})" if confounds else ""]
    done = ", ".join(s for s in steps if s)
    if not done:
        return "as provided (already cleaned), z-scored per run"
    filtered = ""
    if settings.detrend or settings.high_pass:
        filtered = ("; the features are not filtered (the reference preset)" if settings.preset == "reference" else
                    "; the delayed features of each run get the same detrend and high-pass")
    return f"nilearn.signal.clean per run: {done}{filtered}; z-scored per run"


def _folds(groups, m, seed: int, gap: int, n_folds: int | None = None):
    """Validation splits that choose alpha: the reference's bootstrap chunks, or leave-stories-out."""
    if m.preset == "reference":
        return bootstrap_chunks(len(groups), m.bootstraps, m.bootstrap_chunk_len, m.bootstrap_chunks, seed=seed)
    return leave_stories_out(groups, n_folds or m.n_folds, seed=seed, gap=gap)


def _alpha_selection(m, outer: bool, folds, score: str, alphas, gap: int) -> dict:
    """How each voxel's alpha was chosen, for the sidecars: splits, score and grid."""
    out = {"score": score, "alphas": [float(a) for a in alphas],
           "alpha_units": "ridge penalty alpha ||w||^2 (scikit-learn, himalaya); the reference code's a is sqrt(alpha)",
           "n_splits": len(folds), "ties": "the larger alpha"}
    if m.preset == "reference" and not outer:
        held = len(folds[0][1]) // m.bootstrap_chunk_len
        out.update(splits="bootstrap chunks (the reference's bootstrap_ridge): random chunks of consecutive "
                   "training volumes held out", bootstraps=m.bootstraps, chunk_len=m.bootstrap_chunk_len,
                   chunks_held_out=held)
    else:
        out.update(splits="leave-stories-out (contiguous blocks within a single story)", gap_volumes=gap)
    return out


def _scoring(outer: bool, resp, n_folds: int, gap: int, tr: float) -> str:
    """How the test scores were obtained, as the log and the sidecars say it."""
    if not outer:
        return "repeated test stories"
    if len(resp.story_names) > 1:
        return f"outer leave-stories-out cross-validation ({n_folds} folds over {len(resp.story_names)} stories)"
    return (f"outer cross-validation over {n_folds} contiguous blocks of the single story, {gap} volumes "
            f"({gap * tr:g} s) left out of training on each side of the held-out block")


def _subset_folds(groups, m, seed: int, gap: int):
    """Folds inside a data-scaling subset; a single short story gets as many blocks as it can hold."""
    for k in range(m.n_folds, 1, -1):
        try:
            return _folds(groups, m, seed, gap, k)
        except DataError:
            if k == 2 or m.preset == "reference" or len(np.unique(groups)) > 1:
                raise
    raise AssertionError("unreachable")


def _data_scaling(name, layer, x_train, x_test, resp, y_train, y_test, alphas, ceil_v, cfg, tr, gap,
                  ridge: dict) -> list[dict]:
    """Test scores of one model's best layer fitted on random subsets of 1, 2, 4, ... training stories.

    Every subset keeps the test set; its alphas are re-chosen by cross-validation inside
    the subset (contiguous blocks when it holds a single story). The unit drawn is a
    cross-validation group: a story, or the stories a run presents together.
    """
    m = cfg.models
    units = np.unique(resp.train_groups)
    stories_of = {int(g): sorted({seg.story_id for run, rg in zip(resp.train_runs, _run_groups(resp), strict=True)
                                  if rg == g for seg in run.segments}) for g in units}
    n_units = len(units)
    sizes = sorted({*(2 ** k for k in range(int(np.log2(n_units)) + 1)), n_units})
    threshold = cfg.outputs.ceiling_threshold
    rows = []
    for n in sizes:
        for repeat in range(m.data_scaling_seeds if n < n_units else 1):
            rng = np.random.default_rng([cfg.execution.random_seed, n, repeat])
            picked = np.sort(rng.choice(units, size=n, replace=False))
            rows_in = np.isin(resp.train_groups, picked)
            try:
                folds = _subset_folds(resp.train_groups[rows_in], m, cfg.execution.random_seed, gap)
            except DataError as err:
                if repeat == 0:
                    log.info("data scaling, %s, %d of %d stories: skipped (%s)", name, n, n_units, err.message)
                continue
            out = fit_and_score(x_train, y_train, x_test, y_test, folds, alphas, train_rows=rows_in, **ridge)
            r = out["test_r"]
            stories = [sid for g in picked for sid in stories_of[int(g)]]
            rows.append({"model": name, "layer": layer, "n_stories": len(stories),
                         "n_volumes": int(rows_in.sum()), "hours": rows_in.sum() * tr / 3600,
                         "seed": repeat, "stories": ",".join(stories), "mean_r": float(r.mean()),
                         "mean_r_ceiling": _mean_over_ceiling(r, ceil_v, threshold),
                         "fraction_of_ceiling": _fraction_of_ceiling(r, ceil_v, threshold)})
    log.info("data scaling, %s layer %d: %d subset fits", name, layer, len(rows))
    return rows


def _run_groups(resp) -> list[int]:
    """The cross-validation group of each training run (that of its first story, as split_responses sets)."""
    return [resp.story_names.index(run.segments[0].story_id) for run in resp.train_runs]


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


def _banded(names, x_train, y_train, x_test, y_test, folds, alphas, device, seed) -> BandedResult:
    from .models.banded import banded_ridge

    t0 = time.perf_counter()
    fit = banded_ridge(names, x_train, y_train, x_test, y_test, folds, alphas=alphas, device=device, seed=seed)
    log.info("banded ridge of %d models: mean test r %.3f (%.0f s)", len(names), float(fit.r.mean()),
             time.perf_counter() - t0)
    return fit


def _joint_row(name: str, r: np.ndarray, r2: np.ndarray, ceiling, threshold: float) -> dict:
    """The summary row of a combination of models (stacked, banded): no layer, no family of its own."""
    return {"model": name, "family": name, "n_parameters": np.nan, "layer": -1, "relative_depth": np.nan,
            "mean_r": float(r.mean()), "median_r": float(np.median(r)), "mean_r2": float(r2.mean()),
            "mean_r_ceiling": _mean_over_ceiling(r, ceiling, threshold),
            "fraction_of_ceiling": _fraction_of_ceiling(r, ceiling, threshold), "cv_score": np.nan, "best": True}


def _fraction_of_ceiling(r: np.ndarray, ceiling: np.ndarray | None, threshold: float = 0.3) -> float:
    """Median of r / CC_max over voxels whose ceiling is at least ``threshold`` (NaN without a ceiling)."""
    if ceiling is None or not (ceiling >= threshold).any():
        return float("nan")
    good = ceiling >= threshold
    return float(np.median(r[good] / ceiling[good]))


def _mean_over_ceiling(r: np.ndarray, ceiling: np.ndarray | None, threshold: float = 0.3) -> float:
    """Mean r over the voxels whose ceiling is at least ``threshold`` (NaN without a ceiling)."""
    if ceiling is None or not (ceiling >= threshold).any():
        return float("nan")
    return float(r[ceiling >= threshold].mean())


def _summary_row(fs, fit, ceiling, threshold: float) -> dict:
    d = fs.describe()
    return {"model": fs.name, "family": model_family(d), "n_parameters": d.get("n_parameters", np.nan),
            "layer": fit.layer, "relative_depth": relative_depth(fit.layer, d), "mean_r": float(fit.test_r.mean()),
            "median_r": float(np.median(fit.test_r)), "mean_r2": float(fit.test_r2.mean()),
            "mean_r_ceiling": _mean_over_ceiling(fit.test_r, ceiling, threshold),
            "fraction_of_ceiling": _fraction_of_ceiling(fit.test_r, ceiling, threshold),
            "cv_score": float(fit.cv_score.mean()), "best": False}

"""One participant's encoding models: responses and features aligned, fitted and scored.

Wires ``bids`` (responses), ``features`` (cached per story), ``align`` and
``models``, and returns a :class:`~bidsenc.results.ParticipantResult`; writing it
is the job of :mod:`bidsenc.derivatives`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .align import AlignSettings, kept_rows, misalign, misalignment_lags
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
    LayerFit,
    NullScores,
    alpha_grid,
    evaluate_layer,
    noise_ceiling,
    out_of_fold_residual_covariance,
    select_best_layer,
    shuffled_null,
    significance,
    stack_spaces,
)
from .models.nested import nested_outer_cv
from .models.ridge import MemoryBudgetError, fit_and_score, pearson_r
from .models.stats import fdr_bh, pooled_null_pvalues
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


@dataclass
class HowToFit:
    """How every ridge fit of one participant runs: set once from the run's settings, passed to each step."""

    score: str           # the validation score that chooses alphas (and layers)
    device: str
    mem_gb: float | None  # the CPU ridge's share of --mem (None: unbounded, or on a GPU)
    dtype: str           # float64 under the reference preset, like the reference code
    alphas: np.ndarray
    gap: int             # rows left out on each side of a held-out block of a single story
    seed: int
    n_inner: int         # inner folds of an outer cross-validation

    @property
    def ridge(self) -> dict:
        """The keyword arguments of every ridge function."""
        return {"score": self.score, "device": self.device, "mem_gb": self.mem_gb, "dtype": self.dtype}


@dataclass
class _Prepared:
    """One participant's responses, split and cleaned, with the validation folds and the ceiling."""

    resp: object                 # align.design.Responses (columns: the valid voxels)
    space: object
    settings: AlignSettings
    confounds: list | None
    test_stories: list[str]
    folds: list
    ceiling: np.ndarray | None   # CC_max (float64) with test repeats
    ceil_v: np.ndarray | None    # the ceiling used for scores (CC_max or inter-subject), float32
    ceiling_info: dict
    n_models: int
    tr: float

    @property
    def outer(self) -> bool:
        """No test story: scores come from an outer cross-validation of the training stories."""
        return not self.test_stories


@dataclass
class _SpaceFit:
    """One feature space fitted: its result, its summary rows, and what stacking and scaling reuse."""

    result: ModelResult
    rows: list[dict]
    chosen: LayerFit | None = None   # with a test story: the chosen layer's fit and design
    x_train: np.ndarray | None = None
    x_test: np.ndarray | None = None


def _fit_participant(cfg: RunConfig, experiment: Experiment, spaces: list, device: str,
                     peers) -> ParticipantResult:
    t0 = time.perf_counter()
    m = cfg.models
    # low-level baselines are controls to compare models with, not feature spaces to combine
    n_models = sum(not _is_baseline(fs.describe()["kind"]) for fs in spaces)
    data, ridge_mem_gb = _prepare(cfg, experiment, n_models, device, peers)
    reference = m.preset == "reference"
    how = HowToFit(score=m.cv_score or ("reference" if reference else "r2"), device=device, mem_gb=ridge_mem_gb,
                   dtype="float64" if reference else "float32",
                   alphas=alpha_grid("reference" if reference else m.alphas),
                   gap=buffer_rows(data.tr, max(data.settings.delay_trs(data.tr)) * data.tr),
                   seed=cfg.execution.random_seed, n_inner=m.n_folds)
    data.folds = leave_stories_out(data.resp.train_groups, m.n_folds, how.seed, how.gap) if data.outer else \
        _folds(data.resp.train_groups, m, how.seed, how.gap)
    _log_data(experiment, data)
    combine = any(_will_combine(m, data, n_models))
    fitted, scaling_rows = [], []
    for fs in spaces:
        fit = _fit_space(cfg, fs, experiment, data, how)
        scaling_rows += _scale_data(cfg, data, how, fit)
        if not (combine and not _is_baseline(fs.describe()["kind"])):  # designs kept only for stacking/banded
            fit.x_train = fit.x_test = None
        fitted.append(fit)
    stacked, banded, joint_rows = _combine(cfg, data, how, fitted)
    scaling = pd.DataFrame(scaling_rows)
    summary = pd.DataFrame([row for f in fitted for row in f.rows] + joint_rows)
    result = ParticipantResult(experiment.participant, data.space, data.resp.valid, [f.result for f in fitted],
                               data.ceil_v, stacked, summary, scaling, _responses_info(cfg, experiment, data, how),
                               banded)
    regions = find_regions(experiment.runs, data.space)
    if regions is not None:
        result.region_labels, result.region_names = regions[0][data.resp.valid], regions[1]
        result.responses["regions"] = regions[2]
    log.info("sub-%s: encoding models fitted in %.0f s", experiment.participant, time.perf_counter() - t0)
    return result


def _prepare(cfg: RunConfig, experiment: Experiment, n_models: int, device: str, peers) -> tuple[_Prepared, float]:
    """Responses read, cleaned and split; the noise ceiling; ``--mem`` checked (returns the ridge's share)."""
    m = cfg.models
    label = experiment.participant
    settings = align_settings(m, experiment)
    test_stories = list(m.test_stories) or experiment.repeated_stories
    outer = not test_stories
    if outer:
        log.warning("sub-%s: no story was heard twice and none was named with --test-stories: scores come from "
                    "an outer leave-stories-out loop (contiguous blocks for a single story), each model's layer "
                    "chosen inside each outer fold, and there is no repeat-based noise ceiling", label)
    if m.preset == "reference" and experiment.runs[0].bold.kind != "hdf5" and not settings.high_pass:
        log.warning("sub-%s: the reference preset filters nothing, as the reference code, whose inputs (ds003020's "
                    "preprocessed files) come detrended; these responses are not those files, so slow drift is "
                    "fitted and scored too: compare each model with its misaligned-stimulus null, or give "
                    "--high-pass 1/128", label)
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
    convention = "reference" if m.preset == "reference" else "consistent"
    ceiling = None if outer else noise_ceiling(resp.test_repeats, floor=m.ceiling_floor, convention=convention)
    ceil_v = ceiling.astype(np.float32) if ceiling is not None else None
    ceiling_info = {"kind": "cc_max", "description": "CC_max (Schoppe et al. 2016) from the test repeats",
                    "convention": convention, "floor": m.ceiling_floor}
    if outer:
        ceil_v, ceiling_info = _intersubject_ceiling(experiment, list(peers), resp, space, settings, m)
    data = _Prepared(resp, space, settings, confounds, test_stories, [], ceiling, ceil_v, ceiling_info, n_models,
                     experiment.runs[0].tr)
    return data, ridge_mem_gb


def _log_data(experiment: Experiment, data: _Prepared) -> None:
    label, resp = experiment.participant, data.resp
    n_left_out = int((~resp.valid).sum())
    if n_left_out:
        log.warning("sub-%s: %d voxels have constant or non-finite responses in some run and are left out "
                    "(0 in every map)", label, n_left_out)
    log.info("sub-%s: %d training volumes from %d stories, %s, %d voxels; %d folds", label, len(resp.train),
             len(resp.story_names), "scored by outer cross-validation" if data.outer else
             f"{len(resp.test)} test volumes ({len(resp.test_repeats)} repeats of {', '.join(data.test_stories)})",
             int(resp.valid.sum()), len(data.folds))


def _fit_space(cfg: RunConfig, fs, experiment: Experiment, data: _Prepared, how: HowToFit) -> _SpaceFit:
    """Every layer of one feature space fitted and scored; the model's layer chosen without the scored rows."""
    fitted = (_fit_space_nested if data.outer else _fit_space_test)(cfg, fs, experiment, data, how)
    model = fitted.result
    null = None if model.null_r is None else NullScores(model.null_r, model.score_r)
    if null is not None:
        _report_null(fs.name, model, null, cfg.models.null_draws, data.outer)
    chosen_row = fitted.rows[[int(v) for v in model.layers].index(model.best_layer)]
    chosen_row.update(_model_columns(model, null, data.ceil_v, cfg.outputs.ceiling_threshold))
    log.info("%s: %s: mean test r %.3f, %d voxels significant (FDR q=%.2f)", fs.name, _selection_text(model),
             float(model.score_r.mean()), int(model.fdr.sum()), cfg.models.fdr_q)
    return fitted


def _fit_space_test(cfg: RunConfig, fs, experiment: Experiment, data: _Prepared, how: HowToFit) -> _SpaceFit:
    """With a test story: each layer cross-validated on the training stories, the best one scored on the test."""
    m, resp = cfg.models, data.resp
    threshold = cfg.outputs.ceiling_threshold
    fits, rows, kept = [], [], None  # kept: the best layer so far with its design, reused below
    for layer in fs.layers:
        x_train, x_test = features_for(resp, _layer_features(fs, experiment.stories, layer), data.settings)
        fit = evaluate_layer(layer, x_train, resp.train, x_test, resp.test, data.folds, how.alphas, **how.ridge,
                             return_weights=m.save_weights)
        fits.append(fit)
        rows.append(_summary_row(fs, fit, data.ceil_v, threshold))
        if kept is None or select_best_layer([kept[0], fit]) is fit:  # ties keep the earlier layer
            kept = (fit, x_train, x_test)
    chosen, x_train, x_test = kept
    for fit in fits:  # weights, when asked, are kept for the chosen layer only
        if fit is not chosen:
            fit.weights = None
    null = None
    if m.null_draws:
        # the test story plays no part in choosing the layer, so the chosen layer's refits are the whole procedure
        # as far as the test score is concerned
        def refit(xs, xt):
            return fit_and_score(xs, resp.train, xt, resp.test, data.folds, how.alphas, **how.ridge)["test_r"]

        null = shuffled_null(refit, x_train, resp.train_groups, x_test, chosen.test_r, n_draws=m.null_draws,
                             seed=how.seed).r
    pvalues, discoveries = significance(chosen.predictions, resp.test, n_permutations=m.n_permutations, q=m.fdr_q,
                                        seed=how.seed)
    model = ModelResult(fs.name, fs.describe(), np.array(fs.layers), np.stack([f.stats(data.ceil_v) for f in fits]),
                        chosen.layer, pvalues.astype(np.float32), discoveries, chosen.weights, null,
                        pvalue_method=CIRCULAR_METHOD, selection={"method": "training-cv", "layer": int(chosen.layer),
                                   "description": "the layer with the highest mean cross-validated score on the "
                                                  "training stories; the test story plays no part"})
    return _SpaceFit(model, rows, chosen, x_train, x_test)


def _fit_space_nested(cfg: RunConfig, fs, experiment: Experiment, data: _Prepared, how: HowToFit) -> _SpaceFit:
    """Without a test story: outer cross-validation, the layer chosen inside each outer fold (nested)."""
    m, resp = cfg.models, data.resp
    threshold = cfg.outputs.ceiling_threshold

    durations = _story_durations(fs, experiment)

    def designs(lags=None):  # one layer's design in memory at a time; a null draw's stimulus rotated by lags
        for layer in fs.layers:
            features = _layer_features(fs, experiment.stories, layer)
            if lags is not None:
                features = misalign(features, lags, durations)
            yield layer, features_for(resp, features, data.settings)[0]

    t0 = time.perf_counter()
    draws = misalignment_lags(durations, m.null_draws, how.seed)
    nested = nested_outer_cv(designs(), resp.train, resp.train_groups, data.folds, how.alphas, n_inner=how.n_inner,
                             seed=how.seed, gap=how.gap, null_designs=[designs(lags) for lags in draws],
                             **how.ridge)
    log.info("%s: %d layers x %d outer folds%s fitted in %.0f s", fs.name, len(nested.layers), len(data.folds),
             f", with {m.null_draws} misaligned-stimulus draws of the whole procedure" if m.null_draws else "",
             time.perf_counter() - t0)
    fits = [LayerFit(int(layer), nested.layer_r[i], nested.layer_r2[i], nested.layer_alphas[i],
                     nested.layer_cv_score[i], None, nested.valid) for i, layer in enumerate(nested.layers)]
    rows = [_summary_row(fs, fit, data.ceil_v, threshold) for fit in fits]
    if m.null_draws:  # calibrated where shifts of a cross-validated prediction are not (docs/benchmarks.md)
        pvalues = pooled_null_pvalues(nested.z, nested.null_z)
        discoveries = fdr_bh(pvalues, q=m.fdr_q)
        method = POOLED_NULL_METHOD
    else:
        log.warning("%s: with --null-draws 0 the p-values come from circular shifts of the cross-validated "
                    "prediction, which are anti-conservative without a test story (docs/benchmarks.md); keep the "
                    "null on for p-values you report", fs.name)
        pvalues, discoveries = significance(nested.predictions, resp.train[nested.scored],
                                            n_permutations=m.n_permutations, q=m.fdr_q, seed=how.seed)
        method = CIRCULAR_METHOD
    chosen = nested.chosen_layer
    model = ModelResult(fs.name, fs.describe(), np.asarray(nested.layers), np.stack([f.stats(data.ceil_v)
                                                                                     for f in fits]),
                        chosen, pvalues.astype(np.float32), discoveries, None,
                        nested.null_r if m.null_draws else None, model_r=nested.r, model_r2=nested.r2,
                        pvalue_method=method,
                        fold_layers=np.asarray(nested.fold_layers),
                        selection={"method": "nested", "fold_layers": [int(v) for v in nested.fold_layers],
                                   "layer": int(chosen), "share": nested.chosen_share,
                                   "description": "each outer fold chose the layer with the highest mean inner "
                                                  "cross-validated score on its own training rows and predicted "
                                                  "its held-out block with it; the model's score is that of "
                                                  "these nested predictions (held out), the best-layer maps show "
                                                  "the layer most folds chose"})
    return _SpaceFit(model, rows)


#: How p-values were computed, as the sidecars of the logp and fdr maps say it.
CIRCULAR_METHOD = "circular shifts of the prediction against the response (exact over every allowed shift)"
POOLED_NULL_METHOD = ("the model's r against the misaligned-stimulus null of the same nested procedure, pooled over "
                      "voxels and draws, each r divided by its spread over circular shifts of its prediction "
                      "(z = r / sd): p = (1 + #{null z >= z}) / (1 + draws x voxels)")


def _story_durations(fs, experiment: Experiment) -> dict:
    """Each story's length in seconds (its audio's, else up to its last feature time and one more step)."""
    out = {}
    for sid, story in experiment.stories.items():
        if story.duration:
            out[sid] = float(story.duration)
            continue
        times = np.asarray(fs.load(sid).times, dtype=np.float64)
        step = float(np.median(np.diff(times))) if len(times) > 1 else 1.0
        out[sid] = float(times.max() + max(step, 1e-3)) if len(times) else 1.0
    return out


def _selection_text(model: ModelResult) -> str:
    sel = model.selection or {}
    if sel.get("method") == "nested":
        folds = sel["fold_layers"]
        return (f"layer chosen inside each outer fold ({', '.join(map(str, folds))}; layer {sel['layer']} in "
                f"{round(sel['share'] * len(folds))} of {len(folds)}), nested score")
    return f"best layer {model.best_layer} (by cross-validated training score)"


def _model_columns(model: ModelResult, null: NullScores | None, ceiling, threshold: float) -> dict:
    """The columns of the chosen layer's summary row that describe the model as a whole."""
    sel = model.selection
    out = {"best": True, "selection": sel["method"],
           "fold_layers": ",".join(map(str, sel.get("fold_layers", [model.best_layer]))),
           **_score_columns(model.score_r, model.score_r2, ceiling, threshold, prefix="model_")}
    if null is not None:
        out.update(null_mean_r=null.mean_r, null_r95=null.threshold, fraction_above_null=null.fraction_above)
    return out


def _report_null(name: str, model: ModelResult, null: NullScores, n_draws: int, outer: bool) -> None:
    what = ("the whole nested procedure on the stimulus rotated in time within each story" if outer else
            f"layer {model.best_layer} refitted on features circularly shifted per story")
    log.info("%s, misaligned-stimulus null (%d draws, %s): mean r %.3f (real %.3f); %.0f%% of voxels above the "
             "null's 95th percentile r %.3f", name, n_draws, what, null.mean_r, float(model.score_r.mean()),
             100 * null.fraction_above, null.threshold)
    if not null.clearly_above:
        log.warning("%s scores are not clearly above a misaligned stimulus (mean r %.3f against %.3f with the "
                    "stimulus shifted in time; %.0f%% of voxels above the null's 95th percentile, 5%% expected by "
                    "chance): do not read its maps as stimulus-driven", name, float(model.score_r.mean()),
                    null.mean_r, 100 * null.fraction_above)


def _will_combine(m, data: _Prepared, n_models: int) -> tuple[bool, bool]:
    """Whether the models' chosen layers are stacked, and fitted jointly by banded ridge (not the baselines)."""
    will_stack = m.stacking and n_models >= 2 and m.preset != "reference" and not data.outer
    will_band = m.banded and n_models >= 2 and not data.outer
    return will_stack, will_band


def _combine(cfg: RunConfig, data: _Prepared, how: HowToFit, fitted: list[_SpaceFit]):
    """Stacking and banded ridge of the models' chosen layers (with a test story; not the baselines)."""
    m = cfg.models
    models = [f for f in fitted if not _is_baseline(f.result.description["kind"])]
    will_stack, will_band = _will_combine(m, data, len(models))
    if m.banded and not will_band:
        log.info("banded ridge needs two feature spaces or more and a test story")
    stacked = banded = None
    rows = []
    names = [f.result.name for f in models]
    threshold = cfg.outputs.ceiling_threshold
    if will_stack:
        residual_cov = out_of_fold_residual_covariance([f.x_train for f in models], [f.chosen.alphas for f in models],
                                                       data.resp.train, data.folds, device=how.device,
                                                       mem_gb=how.mem_gb, dtype=how.dtype)
        stacked = stack_spaces(names, residual_cov, [f.chosen.predictions for f in models], data.resp.test)
        rows.append(_joint_row("stacked", stacked.r, stacked.r2, data.ceil_v, threshold))
    if will_band:
        banded = _banded(names, [f.x_train for f in models], data.resp.train, [f.x_test for f in models],
                         data.resp.test, data.folds, how.alphas, how.device, how.seed)
        rows.append(_joint_row("banded", banded.r, banded.r2, data.ceil_v, threshold))
    return stacked, banded, rows


def _scale_data(cfg: RunConfig, data: _Prepared, how: HowToFit, fit: _SpaceFit) -> list[dict]:
    """The data-scaling curve of one model's chosen layer (with a test story)."""
    if not cfg.models.data_scaling_seeds:
        return []
    if data.outer:
        log.info("%s: no data-scaling curve without a test story", fit.result.name)
        return []
    return _data_scaling(fit.result.name, fit.chosen.layer, fit.x_train, fit.x_test, data.resp, data.resp.train,
                         data.resp.test, how.alphas, data.ceil_v, cfg, data.tr, how.gap, how.ridge)


def _responses_info(cfg: RunConfig, experiment: Experiment, data: _Prepared, how: HowToFit) -> dict:
    """How the responses were prepared, split and scored: the sidecar ``*_desc-responses_encoding.json``."""
    m, resp, valid = cfg.models, data.resp, data.resp.valid
    info = {
        "space": data.space.kind, "space_name": data.space.name, "mask": data.space.mask_source,
        "n_voxels": data.space.n_voxels, "n_fitted": int(valid.sum()), "n_left_out": int((~valid).sum()),
        "cleaning": _cleaning(data.settings, data.confounds, m.confounds), "high_pass_hz": data.settings.high_pass,
        "test_stories": data.test_stories, "n_test_repeats": 0 if data.outer else int(len(resp.test_repeats)),
        "n_test_volumes": 0 if data.outer else int(len(resp.test)), "n_train_volumes": int(len(resp.train)),
        "scoring": _scoring(data.outer, resp, len(data.folds), how.gap, data.tr),
        "layer_selection": _layer_selection(data.outer),
        "null": _null_description(data.outer, m.null_draws),
        "noise_ceiling": data.ceiling_info, "cv_score": how.score,
        "alpha_selection": _alpha_selection(m, data.outer, data.folds, how.score, how.alphas, how.gap),
        "precision": how.dtype, "train_stories": resp.story_names, "preset": m.preset,
        "delays_trs": data.settings.delay_trs(data.tr), "tr": data.tr, "notes": resp.notes}
    if m.preset == "reference" and experiment.runs[0].bold.kind != "hdf5" and not data.settings.high_pass:
        info["notes"] = [*resp.notes, "the reference preset ran on responses other than ds003020's preprocessed "
                                      "files without filtering: slow drift is fitted and scored too"]
    return info


def _layer_selection(outer: bool) -> str:
    if outer:
        return ("nested: inside each outer fold, the layer with the highest mean inner cross-validated score over "
                "fitted voxels, from that fold's training rows only; each held-out block is predicted by its own "
                "fold's layer, and the model's score is that of these predictions")
    return ("the layer with the highest mean cross-validated score over fitted voxels on the training stories; "
            "the test story plays no part")


def _null_description(outer: bool, n_draws: int) -> str:
    if not n_draws:
        return "off"
    if outer:
        return (f"{n_draws} draws of the whole nested procedure (every layer, alphas and layer chosen again) on the "
                "stimulus rotated in time within each story by 20-80% of its length, the design rebuilt from it as "
                "from the real stimulus")
    return (f"{n_draws} refits of the chosen layer on its features circularly shifted in time within each story by "
            "20-80% of it, scored on the test story")


def _is_baseline(kind: str) -> bool:
    """A feature kind that is a low-level baseline (word rate, envelope, ...), not a model."""
    return kind == "lowlevel"


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
            **_score_columns(r, r2, ceiling, threshold), "cv_score": np.nan, "best": True}


def _score_columns(r: np.ndarray, r2: np.ndarray, ceiling, threshold: float, prefix: str = "") -> dict:
    """Mean and median r, mean R^2, and the ceiling-based scores of a summary row."""
    return {f"{prefix}mean_r": float(r.mean()), f"{prefix}median_r": float(np.median(r)),
            f"{prefix}mean_r2": float(r2.mean()), f"{prefix}mean_r_ceiling": _mean_over_ceiling(r, ceiling, threshold),
            f"{prefix}fraction_of_ceiling": _fraction_of_ceiling(r, ceiling, threshold)}


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
            "layer": fit.layer, "relative_depth": relative_depth(fit.layer, d),
            **_score_columns(fit.test_r, fit.test_r2, ceiling, threshold), "cv_score": float(fit.cv_score.mean()),
            "best": False}

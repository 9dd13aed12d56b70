"""The participant report ``output_dir/sub-<label>.html``: one self-contained page.

It reads the participant's derivatives (never the fitting code's memory), so what
it shows is what was written. A failed participant still gets a page: the data
that were found and the error.
"""

from __future__ import annotations

import functools

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .._io import atomic_write_text
from ..results import relative_depth
from . import figures as fig
from .html import esc, page, para, table
from .html import figures as _figs

log = logging.getLogger(__name__)

#: How each cross-validation score reads on an axis.
_CV_LABELS = {"r2": "R²", "r": "r", "reference": "sign(R²)·sqrt|R²| (reference)"}


def write_participant_report(output_dir: Path, label: str, experiment: dict | None, warnings: list[str],
                             error: str | None = None) -> Path:
    """Write ``sub-<label>.html`` from the participant's outputs (or the error that stopped it)."""
    from ..derivatives import PartialOutputError, read_participant

    sections = []
    if error:
        sections.append(("error", "Run failed", f'<div class="error">{esc(error)}</div>'))
    if experiment:
        sections.append(("data", "Data", _data_section(experiment)))
    if not error:
        try:
            result = read_participant(output_dir, label)
        except PartialOutputError as err:
            sections.append(("error", "Outputs", f'<div class="error">{esc(err)}</div>'))
        else:
            sections += _result_sections(result, _own_meshes(result.space, experiment))
    sections.append(("warnings", "Warnings", "".join(f'<div class="warn">{esc(w)}</div>' for w in warnings)
                     or para("No warnings.", "note")))
    path = output_dir / f"sub-{label}.html"
    atomic_write_text(path, page(f"bidsenc: sub-{label}", sections))
    log.info("report: %s", path)
    return path


def _data_section(exp: dict) -> str:
    runs = pd.DataFrame([{"run": r["name"], "TR (s)": r["tr"], "volumes": r["n_volumes"],
                          "stories (onset s)": ", ".join(f"{s['story']} ({s['onset']:g})" for s in r["segments"]),
                          "BOLD": r["bold"]["kind"] + (f" ({r['bold']['space']})" if r["bold"]["space"] else "")}
                         for r in exp["runs"]])
    stories = pd.DataFrame([{"story": sid, "words": s["n_words"] if s["n_words"] is not None else "n/a",
                             "duration (s)": s["duration"], "presentations": s["presentations"],
                             "audio": "yes" if s["audio"] else "no"} for sid, s in exp["stories"].items()])
    parts = [para(f"Layout: {exp['layout']}; {len(exp['runs'])} story runs, {len(exp['stories'])} stories, "
                  f"{sum(s['presentations'] > 1 for s in exp['stories'].values())} heard more than once."),
             "<h3>Runs</h3>", table(runs, "{:.3g}"), "<h3>Stories</h3>", table(stories, "{:.1f}")]
    if exp.get("skipped"):
        parts += ["<h3>Skipped runs</h3>", table(pd.DataFrame(exp["skipped"]))]
    return "\n".join(parts)


def _own_meshes(space, experiment: dict | None) -> dict | None:
    """The participant's own fMRIPrep surfaces that fit its surface or CIFTI data, if any."""
    if space.kind not in ("surface", "cifti") or not experiment:
        return None
    from ..bids.surfaces import find_surface_meshes

    paths = [Path(path) for run in experiment["runs"] for path in run["bold"]["paths"]]
    return find_surface_meshes(paths, space.n_vertices, space.name)


def _result_sections(result, meshes: dict | None = None) -> list[tuple[str, str, str]]:
    draw = functools.partial(fig.brain_map, meshes=meshes)  # on the participant's own surfaces when found
    info, space = result.responses, result.space
    outer = str(info.get("scoring", "")).startswith("outer")
    score = "outer-CV r" if outer else "test r"  # what r was computed on
    ceiling = result.cc_max
    threshold = float(info.get("ceiling_threshold", 0.3))
    out = []
    resp = [f"Space: {info.get('space_name') or info.get('space')} ({info.get('mask')}).",
            f"{info.get('n_fitted')} voxels fitted; {info.get('n_left_out', 0)} left out (constant or non-finite "
            "responses; 0 in every map).", f"Cleaning: {info.get('cleaning')}.",
            f"Training: {info.get('n_train_volumes')} volumes from {len(info.get('train_stories', []))} stories. "
            f"Scoring: {info.get('scoring')}" + (f" ({', '.join(info['test_stories'])}, "
                                                 f"{info['n_test_repeats']} repeats, {info['n_test_volumes']} volumes)."
                                                 if info.get("test_stories") else ".")]
    resp += [f"Note: {n}" for n in info.get("notes", [])]
    out.append(("responses", "Responses", "".join(para(t) for t in resp)))

    rows = []
    for m in result.models:
        d = m.description
        r = m.score_r
        folds = m.selection.get("fold_layers")
        rows.append({"model": m.name, "kind": d.get("kind"), "family": m.family,
                     "parameters": f"{d['n_parameters']:,}" if d.get("n_parameters") else "n/a",
                     "layers fitted": len(m.layers),
                     "best layer": ", ".join(map(str, folds)) + " (per outer fold)" if folds else m.best_layer,
                     f"mean {score}": float(r.mean()),
                     f"mean r (ceiling >= {threshold:g})": float(r[ceiling >= threshold].mean())
                     if ceiling is not None and (ceiling >= threshold).any() else np.nan,
                     "voxels FDR-significant": int(m.fdr.sum()),
                     "misaligned mean r": float(m.null_r.mean()) if m.null_r is not None else np.nan,
                     "voxels above misaligned 95%": float((r > np.quantile(m.null_r, 0.95)).mean())
                     if m.null_r is not None else np.nan})
    models = pd.DataFrame(rows)
    nested = any(m.nested for m in result.models)
    if nested:
        choice = ("Without a test story the scores are nested: each outer fold chose the layer with the highest "
                  "mean inner cross-validated score on its own training rows and predicted its held-out block "
                  "with it, so the score is held out ('best layer' lists each fold's choice; the layer curves show "
                  "each layer's own outer score). ")
        null_note = ("Misaligned: the whole nested procedure (alphas and layers chosen again) run on the stimulus "
                     "rotated in time within each story (several draws), its design rebuilt like the real one, which "
                     "keeps its own slow structure and word rate but breaks its alignment with the responses; ")
    else:
        choice = "Best layer: the highest mean cross-validated training score over fitted voxels (never the test score). "
        null_note = ("Misaligned: the best layer refitted on its features circularly shifted in time within each "
                     "story (several draws), which keeps their own slow structure but breaks their alignment with "
                     "the responses; ")
    null_note += ("a model that tracks the stimulus scores well above it (about 5% of voxels pass the misaligned "
                  "95th percentile by chance). ")
    out.append(("models", "Models", para(choice + null_note) + table(models)))

    def _title(m):
        if m.nested and len(m.layers) > 1:
            return f"{m.name}, nested (folds chose layer {m.best_layer} most)"
        return f"{m.name}, layer {m.best_layer}"

    maps = [draw(space, result.full(m.score_r), f"{_title(m)}: {score}") for m in result.models]
    top = max(result.models, key=lambda m: float(m.score_r.mean())) if result.models else None
    if top is not None and ceiling is not None:
        maps.append(draw(space, result.full(top.score("cc_norm", ceiling)), f"{_title(top)}: CC_norm",
                                  vmax=1.0))
    shown = [m for m in maps if m]
    if shown:
        out.append(("maps", "Maps", _figs(*shown)))
    else:
        out.append(("maps", "Maps", para("The data have no geometry to draw (voxel order of the source files "
                                         "only); the maps are in the .npy files.", "note")))

    depth = {m.name: relative_depth(m.layers, m.description) for m in result.models}
    curves = {m.name: (depth[m.name], m.stats[:, :, 0].mean(1)) for m in result.models if len(m.layers) > 1}
    cv = {m.name: (depth[m.name], m.stats[:, :, 4].mean(1)) for m in result.models if len(m.layers) > 1}
    marks = {m.name: (float(relative_depth(m.best_layer, m.description)), float(m.score_r.mean()))
             for m in result.models}
    cv_marks = {m.name: (marks[m.name][0], float(m.stat("cv_score").mean())) for m in result.models}
    if curves:
        out.append(("layers", "Layers", _figs(
            fig.lines(curves, f"{score} by layer (star: the model's held-out score at the chosen layer)",
                      "relative depth", f"mean {score}",
                      marks=marks),
            fig.lines(cv, "cross-validated training score by layer", "relative depth",
                      f"mean validation {_CV_LABELS.get(info.get('cv_score', 'r2'), 'score')}",
                      marks=cv_marks))))

    if ceiling is not None:
        intersubject = result.ceiling_kind == "intersubject"
        name = "inter-subject ceiling" if intersubject else "CC_max"
        parts = [fig.histogram({name: ceiling}, "noise ceiling", name),
                 draw(space, result.full(ceiling), f"noise ceiling ({name})", vmax=1.0)]
        if top is not None:
            parts.append(fig.scatter(ceiling, top.score_r, f"{top.name}: {score} against the ceiling", name,
                                     score, diagonal=True))
        what = (info["noise_ceiling"].get("description", "") if intersubject
                else f"CC_max from {info.get('n_test_repeats')} repeats of the test stories")
        out.append(("ceiling", "Noise ceiling", para(
            f"{what}; median {np.median(ceiling):.3f}, {(ceiling >= threshold).mean():.0%} of voxels at or above "
            f"{threshold:g}.") + _figs(*parts)))

    if result.stacked is not None:
        s = result.stacked
        best_single = result.best_single_r(s.names)
        out.append(("stacking", "Stacking", para(
            f"Stacked r: mean {s.r.mean():.3f} against {best_single.mean():.3f} for the best single model per "
            "voxel (chosen by cross-validated training score).") + _figs(
            fig.bars(list(s.names), s.weights.mean(1), "mean stacking weight", "weight"),
            fig.histogram({"stacked": s.r, "best single model": best_single}, "stacked vs single", "test r"),
            draw(space, result.full(s.r), "stacked model: test r"))))

    if result.banded is not None:
        b = result.banded
        out.append(("banded", "Banded ridge", para(
            f"Joint fit of the best layers: mean test r {b.r.mean():.3f}; each model's share of the test R^2 "
            "(himalaya r2_score_split) below.") + _figs(
            fig.bars(list(b.names), b.r2_split.mean(1), "share of test R^2 per model", "mean R^2 share"),
            draw(space, result.full(b.r), "banded ridge: test r"))))

    if not result.data_scaling.empty:
        ds = result.data_scaling
        curves, bands = {}, {}
        for name, group in ds.groupby("model", sort=False):
            agg = group.groupby("n_stories")["mean_r"].agg(["mean", "min", "max"])
            curves[name] = (agg.index.to_numpy(), agg["mean"].to_numpy())
            bands[name] = (agg.index.to_numpy(), agg["min"].to_numpy(), agg["max"].to_numpy())
        out.append(("data", "Data scaling", para(
            "Each model's best layer refitted on random subsets of the training stories (band: range over "
            "subsets), scored on the same test data.") + _figs(
            fig.lines(curves, "test r against training stories", "training stories", "mean test r", logx=True,
                      bands=bands))))
    return out


__all__ = ["write_participant_report"]

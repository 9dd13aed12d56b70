"""The group level: read every participant's outputs, summarise scaling, write ``group.html`` and ``group/``.

Nothing is refitted. Participants whose outputs are missing, incomplete or from
another bidsenc version are skipped with a warning naming them. Tidy tables:

``group/desc-models_summary.tsv``      every participant, model and layer (whole brain)
``group/desc-regions_summary.tsv``     every participant, model (its held-out score) and region
``group/desc-sizescaling_summary.tsv`` slope of each score per tenfold parameters, per family and region
``group/desc-datascaling_summary.tsv`` data-scaling fits per model (and the subsets in ``..._subsets.tsv``)
``group/desc-stacking_summary.tsv``    stacking gain per participant and region
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .._io import atomic_write_bytes, atomic_write_text
from ..bids.bold import NATIVE_SPACES
from ..errors import DataError, MissingInputError
from ..models.stats import fdr_bh, sign_flip_test
from ..results import relative_depth
from . import figures as fig
from .html import esc, figures, page, para, table
from .scaling import loglinear_fit, scaling_fits

log = logging.getLogger(__name__)

WHOLE_BRAIN = "whole brain"


def run_group(cfg) -> Path:
    """Summarise every complete participant in ``output_dir``; return the report's path."""
    from ..derivatives import PartialOutputError, read_participant

    out = cfg.inputs.output_dir
    labels = list(cfg.inputs.participant_label) or _known_participants(cfg)
    results, skipped = [], []
    for label in labels:
        try:
            results.append(read_participant(out, label))
        except PartialOutputError as err:
            reason = _why_not(out, label, err)
            log.warning("group level: skipping %s", reason)
            skipped.append(reason)
    if not results:
        raise MissingInputError(f"no complete participant outputs in {out}"
                                + (f" ({len(skipped)} failed, incomplete or from another version)" if skipped else "")
                                + "; run the participant level first: bidsenc BIDS_DIR OUTPUT_DIR participant")
    atlas = load_atlas(cfg.outputs.atlas, cfg.outputs.atlas_labels) if cfg.outputs.atlas else None
    threshold = cfg.outputs.ceiling_threshold
    used = sorted({float(r.responses.get("ceiling_threshold", threshold)) for r in results})
    if used != [threshold]:
        log.warning("the participants' summaries used a ceiling threshold of %s; the group tables recompute every "
                    "ceiling-based score with %g", ", ".join(f"{t:g}" for t in used), threshold)
    tables = group_tables(results, atlas, threshold)
    # group/ is rebuilt whole beside the old one and swapped in, so that no map or table of an
    # earlier run (a participant or model since dropped) survives next to this run's
    staging = out / f".group.build-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for name, frame in tables.items():
            atomic_write_text(staging / f"desc-{name}_summary.tsv",
                              frame.to_csv(sep="\t", index=False, float_format="%.6g", na_rep="n/a"))
        maps, map_notes, significance = group_maps(results, staging, n_permutations=cfg.models.n_permutations,
                                                   q=cfg.models.fdr_q, seed=cfg.execution.random_seed)
        if len(significance):
            atomic_write_text(staging / "desc-groupmaps_summary.tsv",
                              significance.to_csv(sep="\t", index=False, float_format="%.6g", na_rep="n/a"))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _replace_folder(staging, out / "group")
    report = out / "group.html"
    atomic_write_text(report, page(f"bidsenc group report: {len(results)} participants",
                                   _sections(results, tables, maps, (map_notes, significance), skipped, atlas,
                                             threshold)))
    log.info("group report: %s (%d participants, %d skipped)", report, len(results), len(skipped))
    return report


def _replace_folder(new: Path, final: Path) -> None:
    """Put the finished folder ``new`` in the place of ``final`` (moved aside, then removed)."""
    aside = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.rename(final, aside)
    os.rename(new, final)
    shutil.rmtree(aside, ignore_errors=True)


def _known_participants(cfg) -> list[str]:
    """Participants with outputs, a report or a run status in output_dir, and those of the input dataset.

    A participant whose job failed before writing anything still has its status or report,
    and one whose job never ran is still in the dataset: both are named, not forgotten.
    """
    from ..derivatives import participant_labels

    out = cfg.inputs.output_dir
    labels = set(participant_labels(out))
    labels |= {p.name.removeprefix("sub-").removesuffix(".html") for p in out.glob("sub-*.html")}
    labels |= {p.name.removeprefix("status-sub-").removesuffix(".json") for p in (out / "logs").glob("status-sub-*.json")}
    bids_dir = cfg.inputs.bids_dir
    if bids_dir is not None and bids_dir.is_dir():
        labels |= {p.name.removeprefix("sub-") for p in bids_dir.glob("sub-*") if p.is_dir()}
    return sorted(labels)


def _why_not(out: Path, label: str, err: Exception) -> str:
    """Why a participant is not in the group: its last run's error when it failed, else what is missing."""
    status = out / "logs" / f"status-sub-{label}.json"
    try:
        record = json.loads(status.read_text())
    except (OSError, ValueError):
        record = {}
    if record.get("status") == "failed":
        return f"sub-{label}: failed ({record.get('error')}); see sub-{label}.html and logs/"
    if not (out / f"sub-{label}").is_dir() and not record:
        return f"sub-{label}: no outputs (its participant job has not run, or was killed before writing anything)"
    return str(err)


# --------------------------------------------------------------------------- regions

class Atlas:
    """Labelled regions in the participants' space: a label per voxel (or vertex) and their names."""

    def __init__(self, kind: str, labels: np.ndarray, names: dict[int, str], source: str, affine=None):
        self.kind, self.labels, self.names, self.source, self.affine = kind, labels, names, source, affine

    def for_space(self, space, who: str) -> np.ndarray:
        """The label of each of the space's voxels; a clear error when the atlas does not fit it."""
        if self.kind == "volume" and space.kind == "volume":
            if self.labels.shape != space.mask.shape or not np.allclose(self.affine, space.affine, atol=1e-3):
                raise DataError(f"atlas {self.source} (shape {self.labels.shape}) does not match the space of "
                                f"{who} (shape {space.mask.shape}, {space.name or 'native'}): give an atlas "
                                "resampled to the participants' space and grid")
            return space.from_volume(self.labels)
        if self.kind == "surface" and space.kind == "surface":
            if self.labels.size != sum(space.n_vertices):
                raise DataError(f"atlas {self.source} has {self.labels.size} vertices, {who} "
                                f"{sum(space.n_vertices)}: give label files on the participants' surface")
            return self.labels
        raise DataError(f"atlas {self.source} is a {self.kind} atlas but {who}'s maps are "
                        f"{'arrays without geometry' if space.kind == 'index' else space.kind + 's'}")


def load_atlas(paths, labels_tsv: Path) -> Atlas:
    """A NIfTI label image, or GIfTI label files (left, right), with a TSV of ``index`` and ``name``."""
    import nibabel as nib

    try:
        names_table = pd.read_csv(labels_tsv, sep="\t")
        names = {int(i): str(n) for i, n in zip(names_table["index"], names_table["name"], strict=True)}
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"atlas labels {labels_tsv}: expected a TSV with the columns index and name ({err})") from None
    paths = list(paths)
    try:
        if all(str(p).endswith(".gii") for p in paths):
            labels = np.concatenate([np.asarray(nib.load(p).darrays[0].data).ravel() for p in paths])
            return Atlas("surface", labels.astype(int), names, ", ".join(p.name for p in paths))
        if len(paths) != 1:
            raise DataError("--atlas: give one NIfTI label image, or two GIfTI label files (left, right)")
        img = nib.load(paths[0])
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"atlas {paths[0]}: not a readable label image ({err})") from None
    data = np.asarray(img.dataobj)
    if data.ndim != 3 or not np.allclose(data, np.round(data)):
        raise DataError(f"atlas {paths[0]}: expected a 3D image of integer labels, got shape {data.shape}")
    return Atlas("volume", np.round(data).astype(int), names, paths[0].name, img.affine)


def _regions(result, atlas: Atlas | None) -> dict[str, np.ndarray]:
    """Masks over the participant's fitted voxels: the whole brain, then each region present.

    Regions come from the user's atlas, else from the participant's own parcellation
    (fMRIPrep's aparcaseg on the BOLD grid), which also works in native spaces.
    """
    out = {WHOLE_BRAIN: np.ones(int(result.valid.sum()), bool)}
    if atlas is not None:
        labels, names = atlas.for_space(result.space, f"sub-{result.participant}")[result.valid], atlas.names
    elif result.region_labels is not None:
        labels, names = result.region_labels, result.region_names
    else:
        return out
    for index, name in sorted(names.items()):
        inside = labels == index
        if index != 0 and inside.any():
            out[name] = inside
    return out


# --------------------------------------------------------------------------- tables

def group_tables(results, atlas: Atlas | None, threshold: float) -> dict[str, pd.DataFrame]:
    """The tidy tables of the group level (see the module's docstring)."""
    models = pd.concat([r.summary.assign(participant=r.participant) for r in results], ignore_index=True)
    models = models[["participant", *[c for c in models.columns if c != "participant"]]]
    region_rows, stacking_rows, scaling = [], [], []
    for r in results:
        regions = _regions(r, atlas)
        for m in r.models:
            score, norm = m.score("r"), m.score("cc_norm", r.cc_max)
            for name, inside in regions.items():
                # ceiling-based scores only where the ceiling is high enough for r / ceiling to be stable
                good = inside & (r.cc_max >= threshold) if r.cc_max is not None else np.zeros_like(inside)
                region_rows.append({
                    "participant": r.participant, "model": m.name, "family": m.family, "kind": m.description.get(
                        "kind"), "n_parameters": m.n_parameters, "layer": m.best_layer,
                    "relative_depth": float(relative_depth(m.best_layer, m.description)), "region": name,
                    "n_voxels": int(inside.sum()), "n_voxels_ceiling": int(good.sum()),
                    "mean_r": float(score[inside].mean()),
                    "mean_r_ceiling": float(score[good].mean()) if good.any() else np.nan,
                    "mean_cc_norm": float(norm[good].mean()) if good.any() else np.nan,
                    "fraction_of_ceiling": float(np.median(norm[good])) if good.any() else np.nan,
                    "fraction_significant": float(m.fdr[inside].mean())})
        if r.stacked is not None:
            single = r.best_single_r(r.stacked.names)
            for name, inside in regions.items():
                stacking_rows.append({"participant": r.participant, "region": name, "n_voxels": int(inside.sum()),
                                      "stacked_r": float(r.stacked.r[inside].mean()),
                                      "best_single_r": float(single[inside].mean()),
                                      "gain": float((r.stacked.r[inside] - single[inside]).mean())})
        if not r.data_scaling.empty:
            scaling.append(r.data_scaling.assign(participant=r.participant))
    regions = pd.DataFrame(region_rows)
    tables = {"models": models, "regions": regions}

    sized = regions.dropna(subset=["n_parameters"])
    multi = sized.groupby("family")["n_parameters"].transform("nunique") >= 2
    size_fits = []
    for metric in ("mean_r", "mean_r_ceiling", "mean_cc_norm"):
        if sized.loc[multi, metric].notna().any():
            size_fits.append(scaling_fits(sized[multi], "n_parameters", metric, ["family", "region"]))
    tables["sizescaling"] = pd.concat(size_fits, ignore_index=True) if size_fits else pd.DataFrame(
        columns=["family", "region", "metric", "slope"])
    if scaling:
        subsets = pd.concat(scaling, ignore_index=True)
        tables["datascalingsubsets"] = subsets
        tables["datascaling"] = pd.concat([scaling_fits(subsets, "hours", metric, ["model"])
                                           for metric in ("mean_r", "fraction_of_ceiling")
                                           if subsets[metric].notna().any()], ignore_index=True)
    if stacking_rows:
        tables["stacking"] = pd.DataFrame(stacking_rows)
    baselines = _against_baselines(results)
    if not baselines.empty:
        tables["baselines"] = baselines
    return tables


def _against_baselines(results) -> pd.DataFrame:
    """Per participant, each language or audio model's best layer against the best low-level baseline.

    The best baseline is the one with the highest mean test r for that participant; ``gain``
    is the model's mean r minus it, ``fraction_voxels_above`` the share of voxels where the
    model's r is higher.
    """
    rows = []
    for r in results:
        baselines = [m for m in r.models if m.description.get("kind") == "lowlevel"]
        if not baselines:
            continue
        top = max(baselines, key=lambda m: float(m.score_r.mean()))
        for m in r.models:
            if m.description.get("kind") == "lowlevel":
                continue
            rows.append({"participant": r.participant, "model": m.name, "family": m.family,
                         "mean_r": float(m.score_r.mean()), "best_baseline": top.name,
                         "baseline_mean_r": float(top.score_r.mean()),
                         "gain": float(m.score_r.mean() - top.score_r.mean()),
                         "fraction_voxels_above": float((m.score_r > top.score_r).mean())})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- group maps

def group_maps(results, group_dir: Path, *, n_permutations: int = 1000, q: float = 0.05,
               seed: int = 0) -> tuple[dict, list[str], pd.DataFrame]:
    """Group maps in every template space that two participants or more share; else none and why.

    Participants are grouped by space: one volume template grid (MNI), one surface mesh
    (fsaverage5/6/7 GIfTI) or one set of CIFTI grayordinates (fsLR). In each group,
    every model's held-out r (and CC_norm) is averaged voxel by voxel over the
    participants fitted there (each participant's vector is first put back on the
    shared grid with its own mask), and r is tested against 0 across participants
    with a sign-flip one-sample t test on the voxels every participant has, with
    FDR over those voxels. Files go to ``group/`` named by space and model.

    Returns ``({(space label, model, stat): (space, values)}, notes, significance table)``.
    """
    groups: dict[tuple, list] = {}
    for r in results:
        groups.setdefault(_grid(r.space), []).append(r)
    out, notes, rows, mapped = {}, [], [], []
    for members in groups.values():
        first = members[0].space
        who = ", ".join(f"sub-{r.participant}" for r in members)
        if first.kind == "index" or first.name in NATIVE_SPACES:
            notes.append(f"{who}: in {'their' if len(members) > 1 else 'its'} own native spaces, no group map "
                         "(region-level and whole-brain summaries only).")
        elif len(members) < 2:
            notes.append(f"{who}: the only participant in {_space_label(first)}, no group map there.")
        else:
            mapped.append(members)
    for members, (entities, label, grid_info) in zip(mapped, _map_names([m[0].space for m in mapped]), strict=True):
        who = ", ".join(f"sub-{r.participant}" for r in members)
        space, on_grid = _shared_grid(members)
        models = [m.name for m in members[0].models if all(any(x.name == m.name for x in r.models) for r in members)]
        for model in models:
            r_maps = [on_grid(r, r.model(model).score_r) for r in members]
            stats = {"r": r_maps}
            if all(r.cc_max is not None for r in members):
                stats["ccnorm"] = [on_grid(r, r.model(model).score("cc_norm", r.cc_max)) for r in members]
            for stat, pairs in stats.items():
                total, n = np.sum([v for v, _ in pairs], axis=0), np.sum([f for _, f in pairs], axis=0)
                mean = np.where(n > 0, total / np.maximum(n, 1), 0.0).astype(np.float32)
                out[(label, model, stat)] = (space, mean)
                _write_group_map(group_dir, entities, space, model, stat, mean, grid_info,
                                 f"mean over the {len(members)} participants fitted at each {_unit(space)} of their "
                                 f"held-out {stat} (the best layer's with a test story, the nested score without one)")
            common = np.logical_and.reduce([f > 0 for _, f in r_maps])
            t = np.zeros(space.n_voxels, np.float32)
            logp = np.zeros(space.n_voxels, np.float32)
            significant = np.zeros(space.n_voxels, np.float32)
            n_patterns = 0
            if common.any():
                t_common, p, n_patterns = sign_flip_test(np.stack([v[common] for v, _ in r_maps]), n_permutations,
                                                         seed)
                t[common], logp[common] = np.clip(t_common, -1e6, 1e6), -np.log10(p)
                significant[common] = fdr_bh(p, q)
            how = (f"one-sample t of r across the {len(members)} participants, tested against 0 by sign flips "
                   f"({'all ' if n_patterns == 2 ** len(members) else ''}{n_patterns} sign patterns; the smallest "
                   f"possible p is {1 / max(n_patterns, 1):.3g}), on the {int(common.sum())} {_unit(space)}s every "
                   "participant has")
            for stat, values, text in (("t", t, how), ("logp", logp, "-log10 p of the " + how),
                                       ("fdr", significant, f"1 where FDR q={q:g} (Benjamini-Hochberg over the "
                                                            f"tested {_unit(space)}s) is met by the " + how)):
                _write_group_map(group_dir, entities, space, model, stat, values, grid_info, text)
            out[(label, model, "fdr")] = (space, np.where(significant > 0, out[(label, model, "r")][1], 0.0))
            rows.append({"space": label, "model": model, "n_participants": len(members),
                         "n_tested": int(common.sum()), "n_sign_patterns": n_patterns,
                         "n_significant": int(significant.sum()),
                         "fraction_significant": float(significant[common].mean()) if common.any() else np.nan,
                         "mean_r": float(out[(label, model, "r")][1][common].mean()) if common.any() else np.nan})
        notes.append(f"{label}: group maps of {len(members)} participants ({who}); each {_unit(space)}'s mean over "
                     f"the participants fitted there, and a sign-flip test of r > 0 across participants with FDR "
                     f"q={q:g}.")
    return out, notes, pd.DataFrame(rows)


def _map_names(spaces) -> list[tuple[str, str, dict]]:
    """BIDS entities, a label and sidecar fields for the maps of each group, told apart where names are shared.

    Participants in one template space but on different grids (a template written at each
    site's own voxel size, fsaverage at two densities) form separate groups: a ``den``
    entity (meshes, from their size) or a ``res`` entity (volumes and grayordinates, with
    a ``Resolution`` sidecar field saying what it is) keeps their maps apart.
    """
    from ..derivatives.naming import bids_label

    def entities(space, res=None, den=None):
        den = den or space.density
        return (f"space-{bids_label(space.name)}" + (f"_res-{res}" if res else "")
                + (f"_den-{bids_label(den)}" if den else ""))

    plain = [entities(s) for s in spaces]
    names = []
    for i, space in enumerate(spaces):
        shared = [j for j, other in enumerate(plain) if other == plain[i]]
        if len(shared) == 1:
            names.append((plain[i], _space_label(space), {}))
            continue
        sizes = [f"{round(spaces[j].n_vertices[0] / 1000)}k" if spaces[j].kind == "surface" else None for j in shared]
        if None not in sizes and len(set(sizes)) == len(sizes):  # meshes of different sizes: fMRIPrep's den
            den = sizes[shared.index(i)]
            names.append((entities(space, den=den), f"{space.name} (den {den})",
                          {"Density": f"{space.n_vertices[0]} vertices per hemisphere"}))
            continue
        k = shared.index(i) + 1
        if space.kind == "volume":
            voxel = np.sqrt((np.asarray(space.affine)[:3, :3] ** 2).sum(0))
            what = (f"{' x '.join(f'{v:.3g}' for v in voxel)} mm voxels, grid "
                    f"{' x '.join(str(n) for n in space.mask.shape)}")
        else:
            what = f"set {k} of {len(shared)} of {space.name} participants' {_unit(space)}s ({space.n_voxels})"
        names.append((entities(space, res=k), f"{_space_label(space)} (res {k}: {what})", {"Resolution": what}))
    return names


def _space_label(space) -> str:
    return f"{space.name} (den {space.density})" if space.density else str(space.name)


def _unit(space) -> str:
    return {"volume": "voxel", "surface": "vertex", "cifti": "grayordinate"}.get(space.kind, "voxel")


def _shared_grid(members):
    """The group's space, and a function putting a participant's vector on it (values, 1 where fitted)."""
    from ..bids.bold import Space

    first = members[0].space
    if first.kind != "volume":  # meshes and grayordinates: every participant has every column

        def on_grid(r, values):
            return r.full(values), r.valid.astype(np.float32)
        return first, on_grid
    union = np.logical_or.reduce([r.space.to_volume(r.valid.astype(np.float32)) > 0 for r in members])
    space = Space("volume", int(union.sum()), first.name, mask=union, affine=first.affine)

    def on_grid(r, values):
        return r.space.to_volume(r.full(values))[union], r.space.to_volume(r.valid.astype(np.float32))[union]
    return space, on_grid


def _grid(space):
    """What participants must share for their maps to be averaged column by column."""
    if space.kind == "volume":
        return ("volume", space.name, space.mask.shape, tuple(np.round(space.affine, 3).ravel()))
    if space.kind == "surface":
        return ("surface", space.name, tuple(space.n_vertices))
    if space.kind == "cifti":
        models = space.brain_models
        return ("cifti", space.name, space.density, len(models), hash(models.vertex.tobytes()),
                hash(models.voxel.tobytes()), tuple(models.nvertices.items()))
    return ("index", space.name, space.n_voxels)


def _write_group_map(group_dir: Path, entities: str, space, model: str, stat: str, values: np.ndarray,
                     grid_info: dict, description: str) -> None:
    """One group map named ``<entities>_desc-<model>_stat-<stat>_statmap`` and its sidecar."""
    from ..derivatives.naming import bids_label

    base = f"{entities}_desc-{bids_label(model)}_stat-{stat}_statmap"
    sidecar = {"Description": description, "Model": model, "Statistic": stat, **grid_info}
    if space.kind == "volume":
        import nibabel as nib

        img = nib.Nifti1Image(space.to_volume(values), space.affine)
        atomic_write_bytes(group_dir / f"{base}.nii.gz", gzip.compress(img.to_bytes(), mtime=0))
    elif space.kind == "cifti":
        from ..derivatives.participant import dscalar_bytes

        atomic_write_bytes(group_dir / f"{base}.dscalar.nii", dscalar_bytes(space, values, f"{model} {stat}"))
    else:
        from ..derivatives.participant import _gifti_bytes

        n_left = space.n_vertices[0]
        for hemi, part in (("L", values[:n_left]), ("R", values[n_left:])):
            atomic_write_bytes(group_dir / f"hemi-{hemi}_{base}.func.gii", _gifti_bytes(part))
    atomic_write_text(group_dir / f"{base}.json", json.dumps(sidecar, indent=2) + "\n")


# --------------------------------------------------------------------------- report

def _sections(results, tables, maps, map_info, skipped, atlas, threshold) -> list[tuple[str, str, str]]:
    models, regions, sizes = tables["models"], tables["regions"], tables["sizescaling"]
    out = []
    joint = models["model"].isin(["stacked", "banded"])  # combinations of models, not models
    best = models[models["best"] & ~joint].copy()
    if "model_mean_r" not in best:  # summaries written before nested scores: the best layer's r is the model's
        best["model_mean_r"] = best["mean_r"]
    whole = regions[regions["region"] == WHOLE_BRAIN]
    overview = (whole.groupby("model", sort=False)
                .agg(family=("family", "first"), parameters=("n_parameters", "first"),
                     best_layer=("layer", lambda s: ", ".join(str(int(v)) for v in sorted(set(s)))),
                     relative_depth=("relative_depth", "mean"), mean_r=("mean_r", "mean"),
                     mean_r_ceiling=("mean_r_ceiling", "mean"), fraction_of_ceiling=("fraction_of_ceiling", "mean"))
                .reset_index())
    overview["parameters"] = overview["parameters"].map(lambda v: f"{int(v):,}" if pd.notna(v) else "n/a")
    intro = [para(f"{len(results)} participants: {', '.join('sub-' + r.participant for r in results)}. "
                  "Scores are each model's held-out scores, averaged over participants: with a test story, the "
                  "test scores of the layer chosen on the training stories; without one, nested outer "
                  "cross-validation (each outer fold chooses the layer from its own training rows, so the score "
                  "is held out; 'best_layer' lists the layers most folds chose); 'ceiling' columns use voxels whose noise ceiling (CC_max from repeats, "
                  f"else the inter-subject ceiling) is at least {threshold:g}."),
             table(overview)]
    intro += [f'<div class="warn">{esc(s)}</div>' for s in skipped]
    if "null_mean_r" in best:
        null = (best.rename(columns={"model_mean_r": "mean_r", "mean_r": "layer_mean_r"})
                .groupby("model", sort=False)[["mean_r", "null_mean_r", "fraction_above_null"]].mean().reset_index())
        intro += [para("Against a misaligned stimulus (mean over participants): the same procedure run on the "
                       "stimulus shifted in time within each story (without a test story, the whole nested "
                       "procedure, layer choice included; with one, the chosen layer refitted). "
                       "'fraction_above_null' is the share of voxels whose real r beats the misaligned fits' 95th "
                       "percentile: about 0.05 by chance."),
                  table(null.rename(columns={"null_mean_r": "misaligned_mean_r"}), "{:.3f}")]
        weak = null[null["mean_r"] <= null["null_mean_r"] + 0.01]
        intro += [f'<div class="warn">{esc(m)}: the real mean r is not clearly above the misaligned stimulus\'s; '
                  "its maps may reflect slow signal rather than the stimulus</div>" for m in weak["model"]]
    out.append(("overview", "Overview", "\n".join(intro)))
    if "baselines" in tables:
        against = tables["baselines"].groupby("model", sort=False).agg(
            family=("family", "first"), mean_r=("mean_r", "mean"), best_baseline=("best_baseline", "first"),
            baseline_mean_r=("baseline_mean_r", "mean"), gain=("gain", "mean"),
            fraction_voxels_above=("fraction_voxels_above", "mean")).reset_index()
        out.append(("baselines", "Against low-level baselines", para(
            "Each language and audio model's best layer against the best low-level baseline (word rate, phoneme "
            "rate, audio envelope) of each participant, averaged over participants: a model worth reporting scores "
            "well above how fast words come or how loud the sound is.") + table(against, "{:.3f}")))

    size_parts = []
    sized = regions[(regions["region"] == WHOLE_BRAIN)].dropna(subset=["n_parameters"])
    for family, group in sized.groupby("family"):
        if group["n_parameters"].nunique() < 2:
            continue
        for metric, label in (("mean_r", "mean test r"), ("mean_r_ceiling", f"mean r (ceiling >= {threshold:g})"),
                              ("mean_cc_norm", f"mean r / ceiling (ceiling >= {threshold:g})")):
            if group[metric].notna().any():
                row = sizes[(sizes["family"] == family) & (sizes["region"] == WHOLE_BRAIN) & (sizes["metric"] == metric)]
                size_parts.append(_scaling_figure(group, "n_parameters", metric, f"{family}: {label}",
                                                  "parameters", label, row.iloc[0] if len(row) else None))
    if size_parts:
        text = para("Each thin line is a participant, the thick line their mean, dashed the log-linear fit to the "
                    "mean. The slope (per tenfold increase in parameters) is fitted per participant and averaged, "
                    "with a 95% t interval across participants. Ceiling-based scores use voxels whose ceiling is >= "
                    f"{threshold:g} only.")
        out.append(("size", "Model size", text + figures(*size_parts) + table(
            sizes[sizes["region"] == WHOLE_BRAIN][["family", "metric", "n_units", "n_points", "slope", "ci_low",
                                                   "ci_high", "slope_mean"]], "{:.4f}")))
    else:
        out.append(("size", "Model size", para("No model family was fitted at two sizes or more: add models of "
                                               "one family at several sizes (e.g. OPT 125M, 350M, 1.3B).", "note")))

    own = [r for r in results if r.region_labels is not None]
    if atlas is not None or own:  # mean r per region always; slopes where a family has several sizes
        per_region = sizes[(sizes["region"] != WHOLE_BRAIN) & (sizes["metric"] == "mean_r")]
        parts = []
        for family, group in per_region.groupby("family"):
            group = group.sort_values("slope", ascending=False).head(24)  # a readable figure for large atlases
            err = np.vstack([group["slope"] - group["ci_low"], group["ci_high"] - group["slope"]])
            parts.append(fig.bars(list(group["region"]), group["slope"].to_numpy(),
                                  f"{family}: slope per region", "r per tenfold parameters",
                                  None if np.isnan(err).all() else np.nan_to_num(err)))
        region_means = (regions.groupby(["region", "model"], sort=False)["mean_r"].mean().unstack("model"))
        if not len(per_region):
            names = [n for n in region_means.index if n != WHOLE_BRAIN][:24]
            for model in region_means.columns:
                parts.append(fig.bars(names, region_means.loc[names, model].to_numpy(), f"{model}: mean r per region",
                                      "mean test r"))
        source = (f"Atlas: {atlas.source}." if atlas is not None else
                  f"Regions: each participant's own parcellation ({own[0].responses.get('regions', 'fMRIPrep')}, "
                  f"{len(own)} of {len(results)} participants).")
        out.append(("regions", "Regions", para(source) + figures(*parts)
                    + table(region_means.reset_index())))

    curves = {}
    layered = models[~joint]
    for name, group in layered.groupby("model", sort=False):
        agg = group.groupby("relative_depth")["mean_r"].mean()
        if len(agg) > 1:
            curves[name] = (agg.index.to_numpy(), agg.to_numpy())
    if curves:
        marks = {name: (float(g["relative_depth"].mean()), float(g["model_mean_r"].mean()))
                 for name, g in best.groupby("model")}
        out.append(("layers", "Layers", figures(fig.lines(
            curves, "test r by relative depth (mean over participants; star: the model's held-out score at the mean chosen "
            "layer)", "relative depth",
            "mean test r", marks=marks))))

    if "datascaling" in tables:
        subsets = tables["datascalingsubsets"]
        parts = []
        for name, group in subsets.groupby("model", sort=False):
            per = group.groupby(["participant", "n_stories"], as_index=False).agg(hours=("hours", "mean"),
                                                                                 mean_r=("mean_r", "mean"))
            fit_row = tables["datascaling"]
            fit_row = fit_row[(fit_row["model"] == name) & (fit_row["metric"] == "mean_r")]
            parts.append(_scaling_figure(per, "hours", "mean_r", f"{name}: data scaling", "training data (hours)",
                                         "mean test r", fit_row.iloc[0] if len(fit_row) else None))
        out.append(("data", "Training data", para("Each model's best layer refitted on random subsets of the "
                                                  "training stories; the slope is per tenfold more data.")
                    + figures(*parts) + table(tables["datascaling"][["model", "metric", "n_units", "n_points",
                                                                     "slope", "ci_low", "ci_high"]], "{:.4f}")))

    if "stacking" in tables:
        st = tables["stacking"].groupby("region")[["stacked_r", "best_single_r", "gain"]].agg(["mean", "sem"])
        labels = list(st.index)
        out.append(("stacking", "Stacking", para(
            "Gain of the stacked model over the best single model of each voxel, the one with the highest "
            "cross-validated training score (never the highest test score), per region.") + figures(fig.bars(
            labels, st[("gain", "mean")].to_numpy(), "stacking gain (stacked r - best single r)", "gain in r",
            np.nan_to_num(st[("gain", "sem")].to_numpy())))
            + table(tables["stacking"].groupby("region")[["stacked_r", "best_single_r", "gain"]].mean().reset_index(),
                    "{:.4f}")))

    out.append(("maps", "Group maps", _maps_section(maps, *map_info)))
    return out


def _maps_section(maps: dict, notes: list[str], significance: pd.DataFrame) -> str:
    """Per space: each model's mean r, its CC_norm, and the best model's r where the group test is significant."""
    parts = [para(note, "note") for note in notes]
    if len(significance):
        parts.append(table(significance, "{:.4f}"))
    for label in dict.fromkeys(key[0] for key in maps):
        here = significance[significance["space"] == label]
        best = here.sort_values("mean_r", ascending=False)["model"].iloc[0] if len(here) else None
        drawn = []
        for (space_label, model, stat), (space, values) in maps.items():
            if space_label != label or (stat == "fdr" and model != best):
                continue
            if stat == "fdr" and not np.any(values):  # e.g. 2 participants: no p below 1/4
                parts.append(para(f"{model} ({label}): no voxel is significant across participants (FDR), so "
                                  "no map of them is drawn.", "note"))
                continue
            title = {"r": f"{model}: mean r", "ccnorm": f"{model}: mean CC_norm",
                     "fdr": f"{model}: mean r where r > 0 across participants (FDR)"}[stat]
            drawn.append(fig.brain_map(space, values, f"{title} ({label})", vmax=1.0 if stat == "ccnorm" else None))
        parts.append(figures(*drawn))
    return "".join(parts)


def _scaling_figure(table: pd.DataFrame, x: str, y: str, title: str, xlabel: str, ylabel: str, fit_row) -> str:
    """Participants (thin), their mean (thick) and the log-linear fit (dashed) on a log x axis."""
    figure, ax = plt.subplots(figsize=(5.2, 3.8))
    for _, g in table.groupby("participant"):
        g = g.groupby(x)[y].mean()
        ax.plot(g.index, g.to_numpy(), color="#9bbcd6", lw=1, marker="o", ms=3)
    mean = table.groupby(x)[y].mean()
    ax.plot(mean.index, mean.to_numpy(), color="#1b4f72", lw=2.5, marker="o", label="mean")
    a, b = loglinear_fit(mean.index.to_numpy(), mean.to_numpy())
    if np.isfinite(b):
        xs = np.geomspace(mean.index.min(), mean.index.max(), 50)
        label = f"fit to the mean: {b:+.3f} per tenfold"
        if fit_row is not None and np.isfinite(fit_row["slope"]):
            label += f"\nparticipants' slopes: {fit_row['slope']:+.3f}"
            if np.isfinite(fit_row["ci_low"]):
                label += f" (95% CI {fit_row['ci_low']:+.3f} to {fit_row['ci_high']:+.3f})"
        ax.plot(xs, a + b * np.log10(xs), color="#c0392b", ls="--", label=label)
    ax.set_xscale("log")
    ticks = np.unique(table[x].to_numpy(float))
    if ticks.size <= 8:  # a few sizes: label each plainly
        ax.set_xticks(ticks, [_short(t) for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig.embed(figure, title)


def _short(value: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.2g}"


__all__ = ["Atlas", "group_maps", "group_tables", "load_atlas", "run_group"]

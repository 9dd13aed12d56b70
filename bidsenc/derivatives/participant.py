"""One participant's derivatives: maps with sidecars, array files and tables; and reading them back.

Everything goes into ``sub-<label>/[ses-<label>/]func/``, replaced as a whole folder: the
new files are written to a hidden staging folder beside it, a complete new ``func/`` is
assembled beside it (this analysis's new files plus hard links to the other analyses'
files), and two renames swap it in; the old folder is removed only after the new one is
in place.  One writer at a time per participant (a lock file in ``sub-<label>/``); a run
killed at any moment leaves either the old or the new complete folder, and the next writer
puts things right (see :func:`_recover`).  The marker ``*_desc-models_summary.json`` lists
every file and the bidsenc version, and is what the group level checks before using a
participant, so a reader never takes a mixture or a half-written set for a complete one.

Array files (``*_encoding.npz``, read with ``np.load(allow_pickle=False)``):

``desc-<model>_encoding.npz``
    ``stats[layer, voxel, stat]`` (float32) over the fitted voxels, ``stat_names``
    (r, r2, cc_norm, alpha, cv_score), ``layers``, ``best_layer``, ``pvalue`` and
    ``fdr`` (of the model's held-out score), ``model`` (the feature model's record, JSON),
    ``selection`` (how the layer was chosen, JSON), ``pvalue_method``, ``null_r[draw, voxel]`` (the
    misaligned-stimulus null); without a test story also ``model_r``, ``model_r2`` (the
    nested held-out scores) and ``fold_layers`` (the layer each outer fold chose); and with
    ``--save-weights`` the best layer's ridge ``weights[feature x delay, voxel]``
    (features vary fastest within each delay block, delays in ``delays_trs`` order).
``desc-responses_encoding.npz``
    ``valid`` (which of the space's voxels were fitted), ``cc_max`` (over the fitted
    voxels; empty without repeats), the space (``kind``, ``mask``, ``affine``,
    ``voxel_order`` or ``n_vertices``), and when the participant has its own regions
    (fMRIPrep's aparcaseg on the BOLD grid) ``region_labels`` per fitted voxel and
    ``region_names`` (JSON).
``desc-stacked_encoding.npz``
    ``names``, ``weights[model, voxel]``, ``r``, ``r2`` over the fitted voxels.
``desc-banded_encoding.npz`` (with ``--banded-ridge``)
    ``names``, ``r``, ``r2``, ``r2_split[model, voxel]`` (each model's share of the
    test R^2) and kernel ``weights[model, voxel]``.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from .._io import atomic_write_bytes, atomic_write_text
from ..bids.bold import Space
from ..models.ceiling import cc_norm
from ..results import LAYER_STATS, BandedResult, ModelResult, ParticipantResult, StackedResult
from .naming import STAT_LABELS, bids_label, model_labels, participant_prefix, with_hemi

log = logging.getLogger(__name__)

MARKER_SUFFIX = "_desc-models_summary.json"

_SUMMARY_COLUMNS = {
    "model": "feature model (stacked: the stacked best layers)",
    "family": "model family for scaling curves (the family option, else the architecture)",
    "n_parameters": "parameter count of the feature model",
    "layer": "hidden state index (0 = embeddings); -1 for the stacked model",
    "relative_depth": "layer / number of layers",
    "mean_r": "mean test r over fitted voxels",
    "median_r": "median test r over fitted voxels",
    "mean_r2": "mean test R^2 over fitted voxels",
    "mean_r_ceiling": "mean test r over voxels whose noise ceiling is at least the ceiling threshold",
    "fraction_of_ceiling": "median of r / CC_max over voxels whose noise ceiling is at least the threshold",
    "cv_score": "mean cross-validated training score (used to choose the best layer)",
    "best": "the model's row: the layer chosen by cross-validated training score with a test story; without "
            "one, the layer most outer folds chose",
    "selection": "training-cv (the layer chosen on the training stories, scored on the test story) or nested "
                 "(without a test story: the layer chosen inside each outer fold from its training rows)",
    "fold_layers": "the layer each outer fold chose (nested), or the chosen layer",
    "model_mean_r": "the model's held-out mean r over fitted voxels: the chosen layer's test r, or the nested "
                    "outer cross-validated r (each held-out block predicted by the layer its own fold chose)",
    "model_median_r": "median over fitted voxels of the model's held-out r",
    "model_mean_r2": "mean over fitted voxels of the model's held-out R^2",
    "model_mean_r_ceiling": "the model's mean r over voxels whose noise ceiling is at least the threshold",
    "model_fraction_of_ceiling": "median of the model's r / ceiling over voxels whose ceiling is at least the "
                                 "threshold",
    "null_mean_r": "mean r of the misaligned-stimulus null (the same procedure on a stimulus shifted in time)",
    "null_r95": "95th percentile of the null r over voxels and draws",
    "fraction_above_null": "share of voxels whose model r exceeds null_r95 (about 0.05 by chance)",
}


class PartialOutputError(Exception):
    """A participant's outputs are missing, incomplete or from another version."""


def write_participant(result: ParticipantResult, experiment, cfg) -> Path:
    """Write a participant's maps, arrays and tables; return the folder they are in.

    The folder is ``sub-<label>/[ses-<label>/]func``. Several analyses of one participant
    (other tasks, say) can live side by side in it: each is named by its own prefix and
    only its own files are replaced.
    """
    label = result.participant
    space: Space = result.space
    prefix = participant_prefix(label, experiment.runs, space.name if space.kind != "index" else None,
                                space.density)
    final = cfg.inputs.output_dir / _folder(prefix)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(final.parent / LOCK_NAME):
        _recover(final)
        _write_and_swap(result, experiment, cfg, prefix, final)
    log.info("sub-%s: outputs written in %s", label, final)
    return final


#: Held (flock) by the one job writing a participant's folder.
LOCK_NAME = ".bidsenc.lock"


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """An exclusive lock on ``lock_path`` for the block (waits for another job holding it)."""
    import fcntl

    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _shared(lock_paths: list[Path]):
    """Shared locks on ``lock_paths`` for the block: no writer swaps a participant in while it is read.

    A lock file that is absent or cannot be opened (outputs on a read-only mount, where
    nobody writes) is passed over.
    """
    import fcntl

    with contextlib.ExitStack() as stack:
        for path in lock_paths:
            try:
                fh = stack.enter_context(open(path))
            except OSError:
                continue
            fcntl.flock(fh, fcntl.LOCK_SH)
            stack.callback(fcntl.flock, fh, fcntl.LOCK_UN)
        yield


def _recover(final: Path) -> None:
    """Put a participant folder right after a writer was killed (under the lock).

    ``.func.tmp-*`` (staged files) and ``.func.build-*`` (a new folder being assembled) are
    incomplete by construction and go.  ``.func.new-*`` is a complete new folder (renamed
    from its build name once whole) and ``.func.old-*`` the previous folder moved aside; if
    the writer died between the two renames, ``func/`` is missing and the new folder (else
    the old one) takes its place.  Whatever remains is removed.
    """
    parent, name = final.parent, final.name
    for pattern in (f".{name}.tmp-*", f".{name}.build-*"):
        for stale in parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    if not final.exists():
        for pattern in (f".{name}.new-*", f".{name}.old-*"):
            found = sorted(parent.glob(pattern), key=lambda p: p.stat().st_mtime)
            if found:
                os.rename(found[-1], final)
                log.warning("%s: restored after an interrupted run (from %s)", final, found[-1].name)
                break
    for pattern in (f".{name}.new-*", f".{name}.old-*"):
        for stale in parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def _write_and_swap(result: ParticipantResult, experiment, cfg, prefix: str, final: Path) -> None:
    label = result.participant
    space: Space = result.space
    staging = final.parent / f".{final.name}.tmp-{os.getpid()}"
    staging.mkdir()
    try:
        writer = _Writer(staging, prefix, space, result, _sources(experiment.runs, cfg))
        _write_all(writer, result, cfg)
        marker = {"Description": "one row per feature model and layer: whole-brain summaries of the test scores",
                  "Columns": _SUMMARY_COLUMNS, "CeilingThreshold": cfg.outputs.ceiling_threshold,
                  "GeneratedBy": {"Name": "bidsenc", "Version": __version__}, "Participant": label,
                  "Prefix": prefix, "Models": {m.name: writer.labels[m.name] for m in result.models},
                  "Settings": cfg.results_fingerprint(), "Inputs": experiment.inputs_fingerprint(),
                  "Files": sorted(writer.files)}
        atomic_write_text(staging / f"{prefix}{MARKER_SUFFIX}", json.dumps(marker, indent=2) + "\n")
        _swap_in(staging, final, prefix)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.debug("sub-%s: %d files", label, len(writer.files) + 1)


def _folder(prefix: str) -> Path:
    """``sub-01/ses-2/func`` for ``sub-01_ses-2_task-x``; ``sub-01/func`` without a session."""
    parts = prefix.split("_")
    session = next((p for p in parts if p.startswith("ses-")), None)
    return Path(parts[0], *([session] if session else []), "func")


def _owned(name: str, prefix: str) -> bool:
    """Whether a file belongs to the analysis named ``prefix`` (and not to one with a longer prefix)."""
    return any(name.startswith(f"{p}_desc-") for p in (prefix, with_hemi(prefix, "L"), with_hemi(prefix, "R")))


def _swap_in(staging: Path, final: Path, prefix: str) -> None:
    """Replace ``final`` by a folder holding the staged files and the other analyses' files.

    The new folder is assembled under a build name and renamed ``.func.new-<pid>`` once
    whole; then ``final`` is moved aside and the new folder moved in.  Other analyses'
    files (another prefix) are hard-linked into the new folder (copied where links are not
    possible), so nothing is lost if the job dies at any point.
    """
    pid = os.getpid()
    build = final.parent / f".{final.name}.build-{pid}"
    ready = final.parent / f".{final.name}.new-{pid}"
    aside = final.parent / f".{final.name}.old-{pid}"
    build.mkdir()
    if final.is_dir():
        for item in final.iterdir():
            if item.is_dir():
                shutil.copytree(item, build / item.name, copy_function=_link_or_copy)
            elif not _owned(item.name, prefix):
                _link_or_copy(item, build / item.name)
    for new in staging.iterdir():
        os.replace(new, build / new.name)
    os.rename(build, ready)
    if final.exists():
        os.rename(final, aside)
    os.rename(ready, final)
    shutil.rmtree(aside, ignore_errors=True)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def _write_all(w: _Writer, result: ParticipantResult, cfg) -> None:
    ceiling = result.cc_max
    regions = {} if result.region_labels is None else {
        "region_labels": result.region_labels, "region_names": np.array(json.dumps(result.region_names))}
    w.array("responses", valid=result.valid, cc_max=np.asarray(ceiling if ceiling is not None else [], np.float32),
            **_space_arrays(result.space), **regions)
    w.json("responses", "encoding", {"Description": "how the responses were prepared, split and scored",
                                     **result.responses})
    if result.space.kind == "volume" and "_task-" in w.prefix:  # BIDS masks of func data need a task
        w.mask()
    if ceiling is not None:
        stat = "isc" if result.ceiling_kind == "intersubject" else "ccmax"
        w.map("ceiling", stat, ceiling, {"Description": STAT_LABELS[stat], "Floor": cfg.models.ceiling_floor,
                                         "Ceiling": result.responses.get("noise_ceiling")})
    extra = cfg.outputs.map_layers
    for model in result.models:
        desc = w.labels[model.name]
        extra_arrays = {} if model.weights is None else {"weights": model.weights}
        if model.null_r is not None:
            extra_arrays["null_r"] = model.null_r
        if model.nested:
            extra_arrays.update(model_r=model.model_r, model_r2=model.model_r2, fold_layers=model.fold_layers)
        w.array(desc, stats=model.stats, stat_names=np.array(LAYER_STATS), layers=model.layers,
                best_layer=np.array(model.best_layer), pvalue=model.pvalue, fdr=model.fdr,
                model=np.array(json.dumps(model.description)), name=np.array(model.name),
                selection=np.array(json.dumps(model.selection)), pvalue_method=np.array(model.pvalue_method),
                **extra_arrays)
        significance = {"Method": model.pvalue_method}
        if "misaligned-stimulus null" in model.pvalue_method:
            significance["NullDraws"] = int(len(model.null_r))
        else:  # every allowed shift once when there are fewer (models.stats.permutation_pvalues)
            scored = result.responses.get("n_test_volumes") or result.responses.get("n_train_volumes", 0)
            significance["Permutations"] = int(min(cfg.models.n_permutations, max(scored - 2 * 10 + 1, 1)))
        for layer in _map_layers(extra, model):
            best = layer == model.best_layer
            meta = {"Model": model.description, "Layer": int(layer), "BestLayer": best,
                    "LayerSelection": _layer_selection_text(model, best),
                    "AlphaSelection": result.responses.get("alpha_selection")}
            for stat, key in (("r", "r"), ("r2", "r2"), ("ccnorm", "cc_norm"), ("alpha", "alpha"),
                              ("cvscore", "cv_score")):
                if key == "cc_norm" and ceiling is None:
                    continue
                w.map(f"{desc}Layer{layer}", stat, model.stat(key, layer), meta)
            if best and not model.nested:
                _significance_maps(w, f"{desc}Layer{layer}", model, {**meta, **significance}, cfg)
        if model.nested:  # the model's own held-out scores, each outer fold with the layer it chose
            meta = {"Model": model.description, "Layer": "nested", "FoldLayers": model.selection["fold_layers"],
                    "LayerSelection": model.selection["description"],
                    "AlphaSelection": result.responses.get("alpha_selection")}
            w.map(desc, "r", model.model_r, meta)
            w.map(desc, "r2", model.model_r2, meta)
            if ceiling is not None:
                w.map(desc, "ccnorm", cc_norm(model.model_r, ceiling), meta)
            _significance_maps(w, desc, model, {**meta, **significance}, cfg)
    if result.stacked is not None:
        s = result.stacked
        w.array("stacked", names=np.array(s.names), weights=s.weights, r=s.r, r2=s.r2)
        meta = {"Models": s.names, "Method": "stacked regression, convex per-voxel weights (Lin et al. 2024) "
                "of each model's best layer, fitted on out-of-fold training predictions"}
        w.map("stacked", "r", s.r, meta)
        w.map("stacked", "r2", s.r2, meta)
        for name, weights in zip(s.names, s.weights, strict=True):
            w.map(bids_label(f"stacked-{w.labels[name]}"), "weight", weights,
                  {**meta, "Model": name})
    if result.banded is not None:
        b = result.banded
        w.array("banded", names=np.array(b.names), r=b.r, r2=b.r2, r2_split=b.r2_split, weights=b.weights)
        meta = {"Models": b.names, "Method": "banded ridge (himalaya MultipleKernelRidgeCV, random search) of "
                "each model's best layer, one kernel per model"}
        w.map("banded", "r", b.r, meta)
        w.map("banded", "r2", b.r2, meta)
        for name, split in zip(b.names, b.r2_split, strict=True):
            w.map(bids_label(f"banded-{w.labels[name]}"), "r2split", split, {**meta, "Model": name})
    w.table("models", result.summary)
    if not result.data_scaling.empty:
        w.table("datascaling", result.data_scaling)


def _significance_maps(w, desc: str, model: ModelResult, meta: dict, cfg) -> None:
    logp = -np.log10(np.clip(model.pvalue, 1e-300, 1.0))
    w.map(desc, "logp", logp, meta)
    w.map(desc, "fdr", model.fdr.astype(np.float32), {**meta, "Q": cfg.models.fdr_q, "Method": "Benjamini-Hochberg"})


def _layer_selection_text(model: ModelResult, best: bool) -> str:
    if not model.nested:
        return "highest mean cross-validated training score over fitted voxels"
    folds = model.selection["fold_layers"]
    text = (f"layers are chosen inside each outer fold (nested); {sum(v == model.best_layer for v in folds)} of "
            f"{len(folds)} folds chose layer {model.best_layer}")
    if best:
        text += ("; this map is that layer's own outer cross-validated score, the model's held-out score is the "
                 "map without a layer")
    return text


def _map_layers(spec: str, model: ModelResult) -> list[int]:
    chosen = {model.best_layer}
    if spec == "all":
        chosen |= set(int(x) for x in model.layers)
    elif spec != "best":
        for part in spec.split(","):
            a, _, b = part.partition("-")
            chosen |= {layer for layer in range(int(a), int(b or a) + 1) if layer in set(model.layers.tolist())}
    return sorted(chosen)


def _space_arrays(space: Space) -> dict:
    out = {"kind": np.array(space.kind), "n_voxels": np.array(space.n_voxels),
           "space_name": np.array(space.name or ""), "voxel_order": np.array(space.voxel_order)}
    if space.mask is not None:
        out |= {"mask": space.mask, "affine": space.affine}
    if space.n_vertices is not None:
        out["n_vertices"] = np.array(space.n_vertices)
    if space.brain_models is not None:  # CIFTI: each structure's name and extent, each element's vertex or voxel
        models = space.brain_models
        names, counts = np.unique(models.name, return_counts=True)
        out |= {"cifti_structures": np.array(list(models.nvertices) + list(names)),
                "cifti_nvertices": np.array(list(models.nvertices.values()), dtype=np.int64),
                "cifti_element_structure": np.searchsorted(names, models.name).astype(np.int16),
                "cifti_vertex": models.vertex.astype(np.int32), "cifti_voxel": models.voxel.astype(np.int32),
                "cifti_density": np.array(space.density or "")}
        if models.affine is not None:
            out |= {"cifti_affine": models.affine, "cifti_volume_shape": np.array(models.volume_shape)}
    return out


def _sources(runs, cfg) -> list[str]:
    """The BOLD files the results come from, as BIDS URIs where they lie in a linked dataset."""
    roots = {"raw": cfg.inputs.bids_dir, **{k: Path(v) for k, v in cfg.inputs.derivatives.items()}}
    out = []
    for run in runs:
        for path in run.bold.paths:
            for name, root in sorted(roots.items(), key=lambda kv: -len(str(kv[1]))):
                try:
                    out.append(f"bids:{name}:{Path(path).absolute().relative_to(root.absolute()).as_posix()}")
                    break
                except ValueError:
                    continue
            else:
                out.append(Path(path).absolute().as_uri())
    return sorted(dict.fromkeys(out))


class _Writer:
    """Writes files named ``<prefix>_desc-<desc>_...`` into one folder and remembers them."""

    def __init__(self, folder: Path, prefix: str, space: Space, result: ParticipantResult, sources: list[str]):
        self.folder, self.prefix, self.space, self.result, self.sources = folder, prefix, space, result, sources
        self.labels = model_labels([m.name for m in result.models])
        self.files: list[str] = []

    def _write(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.folder / name, data)
        self.files.append(name)

    def json(self, desc: str, suffix: str, content: dict, prefix: str | None = None) -> None:
        name = f"{prefix or self.prefix}_desc-{desc}_{suffix}.json"
        self._write(name, (json.dumps(_plain(content), indent=2) + "\n").encode())

    def array(self, desc: str, **arrays) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self._write(f"{self.prefix}_desc-{desc}_encoding.npz", buf.getvalue())

    def table(self, desc: str, frame: pd.DataFrame) -> None:
        self._write(f"{self.prefix}_desc-{desc}_summary.tsv",
                    frame.to_csv(sep="\t", index=False, float_format="%.6g", na_rep="n/a").encode())

    def mask(self) -> None:
        import nibabel as nib

        img = nib.Nifti1Image(self.space.to_volume(np.ones(self.space.n_voxels, np.float32)).astype(np.uint8),
                              self.space.affine)
        img.header.set_xyzt_units("mm")
        name = f"{self.prefix}_desc-brain_mask.nii.gz"
        self._write(name, gzip.compress(img.to_bytes(), mtime=0))
        self._write(name.replace(".nii.gz", ".json"), json.dumps(
            {"Type": "Brain", "Sources": self.sources, "Description": self.space.mask_source,
             "SpatialReference": self.sources[0]}, indent=2).encode())  # the grid of the BOLD it came from

    def map(self, desc: str, stat: str, values: np.ndarray, meta: dict) -> None:
        """One statistic over the fitted voxels, written in the data's own space with its sidecar."""
        full = self.result.full(np.nan_to_num(np.asarray(values, dtype=np.float32)))
        sidecar = {"Description": STAT_LABELS[stat], "Statistic": stat, **meta, "Sources": self.sources,
                   "SpatialReference": self.sources[0],
                   "VoxelsLeftOut": int((~self.result.valid).sum()),
                   "GeneratedBy": {"Name": "bidsenc", "Version": __version__}}
        if self.space.kind == "volume":
            import nibabel as nib

            img = nib.Nifti1Image(self.space.to_volume(full), self.space.affine)
            img.header.set_xyzt_units("mm")
            base = f"{self.prefix}_desc-{desc}_stat-{stat}_statmap"
            self._write(base + ".nii.gz", gzip.compress(img.to_bytes(), mtime=0))
        elif self.space.kind == "cifti":
            base = f"{self.prefix}_desc-{desc}_stat-{stat}_statmap"
            self._write(base + ".dscalar.nii", dscalar_bytes(self.space, full, f"{desc} {stat}"))
        elif self.space.kind == "surface":
            n_left = self.space.n_vertices[0]
            for hemi, part in (("L", full[:n_left]), ("R", full[n_left:])):
                base = f"{with_hemi(self.prefix, hemi)}_desc-{desc}_stat-{stat}_statmap"
                self._write(base + ".func.gii", _gifti_bytes(part))
                self._write(base + ".json", (json.dumps(_plain(sidecar), indent=2) + "\n").encode())
            return
        else:  # voxel order of the source files, no geometry known
            base = f"{self.prefix}_desc-{desc}_stat-{stat}_statmap"
            buf = io.BytesIO()
            np.save(buf, full)
            self._write(base + ".npy", buf.getvalue())
            sidecar["Format"] = "float32 vector in the voxel order of the preprocessed response files"
        self._write(base + ".json", (json.dumps(_plain(sidecar), indent=2) + "\n").encode())


def dscalar_bytes(space: Space, values: np.ndarray, name: str) -> bytes:
    """One map over a CIFTI space's grayordinates as a CIFTI-2 dense scalar file (``.dscalar.nii``)."""
    import nibabel as nib

    img = nib.cifti2.Cifti2Image(np.asarray(values, np.float32)[None, :],
                                 header=(nib.cifti2.ScalarAxis([name]), space.brain_models))
    img.nifti_header.set_intent("ConnDenseScalar")
    return img.to_bytes()


def _gifti_bytes(values: np.ndarray) -> bytes:
    import nibabel as nib

    darray = nib.gifti.GiftiDataArray(np.asarray(values, np.float32), intent="NIFTI_INTENT_NONE",
                                      datatype="NIFTI_TYPE_FLOAT32")
    return nib.gifti.GiftiImage(darrays=[darray]).to_bytes()


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


# --------------------------------------------------------------------------- reading back

def participant_labels(output_dir: Path) -> list[str]:
    """Labels of every ``sub-*`` folder in ``output_dir`` (complete or not)."""
    return sorted(p.name.removeprefix("sub-") for p in output_dir.glob("sub-*") if p.is_dir())


def _markers(sub: Path) -> list[Path]:
    """The completion markers of a participant folder: one per analysis, with or without sessions."""
    return sorted(sub.glob(f"func/*{MARKER_SUFFIX}")) + sorted(sub.glob(f"ses-*/func/*{MARKER_SUFFIX}"))


def complete_outputs(output_dir: Path, label: str, settings: str, inputs=None) -> Path | None:
    """The folder of the participant's outputs when they are complete and would be written again as they are.

    Complete: one analysis whose marker lists files that all exist, written by this
    bidsenc version with the same settings (``RunConfig.results_fingerprint``) and, when
    ``inputs`` is given, from the same input files: ``inputs()`` returns their digest
    (``Experiment.inputs_fingerprint``), called only once version and settings agree.
    Anything else (none, several analyses, another version, settings or inputs, a file
    missing) is None: the participant is computed again.
    """
    sub = output_dir / f"sub-{label}"
    markers = _markers(sub)
    if len(markers) != 1:
        return None
    try:
        marker = json.loads(markers[0].read_text())
    except (OSError, ValueError):
        return None
    if marker.get("GeneratedBy", {}).get("Version") != __version__ or marker.get("Settings") != settings:
        return None
    if inputs is not None and marker.get("Inputs") != inputs():
        log.info("sub-%s: its input files changed since its outputs were written: computed again", label)
        return None
    folder = markers[0].parent
    if not all((folder / f).is_file() for f in marker.get("Files", [])):
        return None
    with _exclusive(folder.parent / LOCK_NAME):  # what killed jobs left beside it goes, as a rewrite would remove it
        _recover(folder)
    return folder


def read_participant(output_dir: Path, label: str, *, version: str | None = __version__) -> ParticipantResult:
    """Read a participant's outputs back; :class:`PartialOutputError` when they are missing or incomplete.

    With ``version`` given, outputs written by another bidsenc version are refused too.
    A participant with several analyses (e.g. one per session) is refused as ambiguous.
    """
    sub = output_dir / f"sub-{label}"
    with _shared([sub / LOCK_NAME, *sorted(sub.glob(f"ses-*/{LOCK_NAME}"))]):  # never half of one write, half of another
        return _read_locked(sub, label, version)


def _read_locked(sub: Path, label: str, version: str | None) -> ParticipantResult:
    markers = _markers(sub)
    if not markers:
        raise PartialOutputError(f"sub-{label}: no complete outputs in {sub} (the run did not finish)")
    if len(markers) > 1:
        raise PartialOutputError(f"sub-{label}: {len(markers)} analyses ({', '.join(m.name.removesuffix(MARKER_SUFFIX) for m in markers)}); "
                                 "the group level takes one per participant: write others to another output_dir")
    func = markers[0].parent
    try:
        return _read(func, markers[0], label, version)
    except PartialOutputError:
        raise
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise PartialOutputError(f"sub-{label}: unreadable outputs ({type(err).__name__}: {err})") from None


def _read(func: Path, marker_path: Path, label: str, version: str | None) -> ParticipantResult:
    marker = json.loads(marker_path.read_text())
    written_by = marker.get("GeneratedBy", {}).get("Version")
    if version is not None and written_by != version:
        raise PartialOutputError(f"sub-{label}: written by bidsenc {written_by}, not {version}; rerun it with "
                                 "this version to include it")
    missing = [f for f in marker.get("Files", []) if not (func / f).is_file()]
    if missing:
        raise PartialOutputError(f"sub-{label}: {len(missing)} output file(s) missing, e.g. {missing[0]}")
    prefix = marker["Prefix"]
    resp = _load(func / f"{prefix}_desc-responses_encoding.npz")
    space = _space(resp)
    models = []
    for name, desc in marker["Models"].items():
        a = _load(func / f"{prefix}_desc-{desc}_encoding.npz")
        models.append(ModelResult(name, json.loads(str(a["model"])), a["layers"], a["stats"],
                                  int(a["best_layer"]), a["pvalue"], a["fdr"], a.get("weights"), a.get("null_r"),
                                  a.get("model_r"), a.get("model_r2"), a.get("fold_layers"),
                                  json.loads(str(a["selection"])) if "selection" in a else {},
                                  str(a["pvalue_method"]) if "pvalue_method" in a else ModelResult.pvalue_method))
    stacked = None
    if (func / f"{prefix}_desc-stacked_encoding.npz").is_file():
        a = _load(func / f"{prefix}_desc-stacked_encoding.npz")
        stacked = StackedResult([str(n) for n in a["names"]], a["weights"], a["r"], a["r2"])
    banded = None
    if (func / f"{prefix}_desc-banded_encoding.npz").is_file():
        a = _load(func / f"{prefix}_desc-banded_encoding.npz")
        banded = BandedResult([str(n) for n in a["names"]], a["r"], a["r2"], a["r2_split"], a["weights"])
    summary = pd.read_csv(func / f"{prefix}_desc-models_summary.tsv", sep="\t", na_values="n/a")
    scaling_path = func / f"{prefix}_desc-datascaling_summary.tsv"
    scaling = pd.read_csv(scaling_path, sep="\t", na_values="n/a") if scaling_path.is_file() else pd.DataFrame()
    info = json.loads((func / f"{prefix}_desc-responses_encoding.json").read_text())
    cc_max = resp["cc_max"] if resp["cc_max"].size else None
    names = {int(k): v for k, v in json.loads(str(resp["region_names"])).items()} if "region_names" in resp else {}
    result = ParticipantResult(label, space, resp["valid"], models, cc_max, stacked, summary, scaling, info, banded,
                               resp.get("region_labels"), names)
    result.responses["prefix"] = prefix
    result.responses["ceiling_threshold"] = marker.get("CeilingThreshold", 0.3)
    return result


def _load(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _space(a: dict) -> Space:
    kind = str(a["kind"])
    n_vertices = tuple(int(x) for x in a["n_vertices"]) if "n_vertices" in a else None
    return Space(kind, int(a["n_voxels"]), str(a["space_name"]) or None, mask=a.get("mask"),
                 affine=a.get("affine"), n_vertices=n_vertices, voxel_order=str(a["voxel_order"]),
                 brain_models=_brain_models(a) if "cifti_vertex" in a else None,
                 density=str(a["cifti_density"]) or None if "cifti_density" in a else None)


def _brain_models(a: dict):
    """nibabel's BrainModelAxis back from the arrays :func:`_space_arrays` wrote."""
    import nibabel as nib

    n_surfaces = len(a["cifti_nvertices"])
    structures = [str(x) for x in a["cifti_structures"]]
    names = np.array(structures[n_surfaces:])[a["cifti_element_structure"]]
    volume = {"affine": a["cifti_affine"], "volume_shape": tuple(int(x) for x in a["cifti_volume_shape"])} \
        if "cifti_affine" in a else {}
    return nib.cifti2.BrainModelAxis(name=names, vertex=a["cifti_vertex"], voxel=a["cifti_voxel"],
                                     nvertices=dict(zip(structures[:n_surfaces], (int(n) for n in a["cifti_nvertices"]),
                                                        strict=True)), **volume)


__all__ = ["MARKER_SUFFIX", "PartialOutputError", "complete_outputs", "participant_labels", "read_participant", "write_participant"]

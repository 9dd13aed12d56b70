"""The participant's own cortical surfaces from fMRIPrep, to draw surface maps on.

fMRIPrep writes each participant's FreeSurfer surfaces as GIfTI in ``anat/``:
``sub-<label>[_ses-<label>]_hemi-{L,R}_{inflated,midthickness,pial}.surf.gii`` on the
participant's own mesh (the vertices of ``fsnative`` data), and, with ``--cifti-output``,
``sub-<label>_hemi-L_space-fsLR_den-32k_midthickness.surf.gii`` resampled to fsLR (the
vertices of the cortex of ``fsLR`` CIFTI data). Sulcal depth comes beside them as
``..._hemi-L_sulc.shape.gii``. A surface fits the data when its vertex count is the
data's, hemisphere by hemisphere: the files are read to count them.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

#: Surfaces to draw on, best first: the inflated one shows what lies in the sulci.
SURFACE_KINDS = ("inflated", "midthickness", "pial")

#: Shapes drawn beneath a map, best first.
_BACKGROUNDS = ("sulc", "curv")

#: Space labels of data on the participant's own surfaces: their surfaces carry no space entity.
_NATIVE = frozenset({None, "", "fsnative", "T1w"})

_HEMIS = {"left": "L", "right": "R"}


def find_surface_meshes(bold_paths: list[Path], n_vertices: tuple[int, int],
                        space_name: str | None) -> dict | None:
    """The participant's fMRIPrep surfaces that the data's vertices lie on, if any.

    Looks in the ``anat/`` folder beside each run's ``func/`` folder and in the
    participant's session-less ``sub-<label>/anat/``, for
    ``sub-<label>_[ses-<label>_]hemi-{L,R}_[space-<name>_][den-<d>_]<kind>.surf.gii``
    (entities in any order) whose space is the data's: none (or ``fsnative``) for
    ``fsnative`` data, ``space-fsLR`` for ``fsLR``, and so on.

    Parameters
    ----------
    bold_paths : list of pathlib.Path
        The participant's BOLD files (any of them: only their folders and names are used).
    n_vertices : tuple of int
        Vertices of the data's left and right hemispheres; 0 for a hemisphere that is
        absent, whose surface is then not looked for.
    space_name : str or None
        The data's space label (``fsnative``, ``fsLR``, ``fsaverage`` ...).

    Returns
    -------
    dict or None
        ``{"left": Path, "right": Path, "kind": "inflated"}`` (the kind found: inflated,
        else midthickness, else pial; a hemisphere with 0 vertices has no entry), with
        ``"sulc_left"`` and ``"sulc_right"`` when sulcal depth (or curvature) on the same
        vertices lies beside them; None when no surface has the data's vertex counts.
        The dict can be passed as is to :func:`bidsenc.report.figures.brain_map` (``meshes=``).
    """
    paths = [Path(p) for p in bold_paths]
    if not paths:
        return None
    entities = _entities(paths[0].name)
    subject = entities.get("sub") if entities else None
    if not subject:
        return None
    wanted = {hemi: int(n) for hemi, n in zip(("left", "right"), n_vertices, strict=True) if n}
    if not wanted:
        return None
    session = entities.get("ses")
    counts: dict[Path, int | None] = {}  # each file is read at most once
    files = _candidates(_anat_folders(paths, subject), subject, space_name, ".surf.gii")
    for kind in SURFACE_KINDS:
        for first in _ranked([f for f in files if f[1] == kind and f[2]["hemi"] == _first(wanted)], session):
            pair = _pair(first[0], wanted, counts, _vertices)
            if pair is None:
                continue
            found = {**pair, "kind": kind}
            found.update(_background(first[0].parent, subject, space_name, session, wanted, counts))
            log.info("surface maps drawn on %s", ", ".join(p.name for p in pair.values()))
            return found
    return None


def _anat_folders(paths: list[Path], subject: str) -> list[Path]:
    """``anat/`` beside each ``func/`` folder, then the participant's own ``sub-<label>/anat``."""
    folders: list[Path] = []
    for path in paths:
        candidates = [path.parent.parent / "anat"]
        candidates += [parent / "anat" for parent in path.parents if parent.name == f"sub-{subject}"][:1]
        for folder in candidates:
            if folder not in folders and folder.is_dir():
                folders.append(folder)
    return folders


def _entities(name: str) -> dict[str, str] | None:
    """The key-value entities of a BIDS file name, and its suffix under ``"suffix"``; None when not BIDS."""
    stem = name.split(".")[0]
    *pairs, suffix = stem.split("_")
    found = {}
    for pair in pairs:
        key, sep, value = pair.partition("-")
        if not sep or not value:
            return None
        found[key] = value
    found["suffix"] = suffix
    return found


def _candidates(folders: list[Path], subject: str, space_name: str | None,
                extension: str) -> list[tuple[Path, str, dict]]:
    """Files of the participant in ``folders`` ending in ``extension`` whose space is the data's."""
    out = []
    for folder in folders:
        for path in sorted(folder.glob(f"sub-{subject}_*{extension}")):
            entities = _entities(path.name)
            if entities is None or entities.get("sub") != subject or entities.get("hemi") not in ("L", "R"):
                continue
            if _same_space(entities.get("space"), space_name):
                out.append((path, entities["suffix"], entities))
    return out


def _same_space(file_space: str | None, space_name: str | None) -> bool:
    if space_name in _NATIVE:
        return file_space in _NATIVE
    return file_space == space_name


def _ranked(files: list[tuple[Path, str, dict]], session: str | None) -> list[tuple[Path, str, dict]]:
    """The data's own session first, then plain names (fewest entities: no desc-, acq- variants)."""
    return sorted(files, key=lambda f: (f[2].get("ses") not in (None, session), f[2].get("ses") != session,
                                        len(f[2]), f[0].name))


def _first(wanted: dict[str, int]) -> str:
    """The hemi entity of the first hemisphere wanted, whose files are looked for first."""
    return _HEMIS[next(iter(wanted))]


def _pair(first: Path, wanted: dict[str, int], counts: dict, count) -> dict[str, Path] | None:
    """The files named as ``first`` for each wanted hemisphere, when each has the wanted count."""
    found = {}
    for hemi, n in wanted.items():
        path = first.with_name(first.name.replace(f"_hemi-{_first(wanted)}_", f"_hemi-{_HEMIS[hemi]}_"))
        if path not in counts:
            counts[path] = count(path) if path.is_file() else None
        if counts[path] != n:
            if counts[path] is not None:
                log.debug("%s: %s vertices, the data %d", path.name, counts[path], n)
            return None
        found[hemi] = path
    return found


def _background(folder: Path, subject: str, space_name: str | None, session: str | None,
                wanted: dict[str, int], counts: dict) -> dict[str, Path]:
    """Sulcal depth (else curvature) on the same vertices, as ``{"sulc_left": ..., "sulc_right": ...}``."""
    files = _candidates([folder], subject, space_name, ".shape.gii")
    for suffix in _BACKGROUNDS:
        for first in _ranked([f for f in files if f[1] == suffix and f[2]["hemi"] == _first(wanted)], session):
            pair = _pair(first[0], wanted, counts, _values)
            if pair is not None:
                return {f"sulc_{hemi}": path for hemi, path in pair.items()}
    return {}


def _vertices(path: Path) -> int | None:
    """Vertices of a GIfTI surface (its pointset); None when it cannot be read as one."""
    points = _read(path, "pointset")
    return int(points.shape[0]) if points is not None and points.ndim == 2 else None


def _values(path: Path) -> int | None:
    """Values of a GIfTI shape (one per vertex); None when it cannot be read."""
    import nibabel as nib

    try:
        darrays = nib.load(path).darrays
    except Exception as err:  # nibabel raises many types for corrupt files
        log.info("%s cannot be read (%s: %s)", path.name, type(err).__name__, err)
        return None
    return int(darrays[0].data.size) if darrays else None


def _read(path: Path, intent: str):
    import nibabel as nib
    import numpy as np

    try:
        data = nib.load(path).agg_data(intent)
    except Exception as err:  # nibabel raises many types for corrupt files
        log.info("%s cannot be read (%s: %s)", path.name, type(err).__name__, err)
        return None
    return data if isinstance(data, np.ndarray) else None


__all__ = ["SURFACE_KINDS", "find_surface_meshes"]

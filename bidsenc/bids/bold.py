"""Loading a participant's BOLD responses into time x voxel arrays, and their space.

A :class:`Space` puts a voxel vector back where it came from: a NIfTI volume
(affine + brain mask), a pair of GIfTI hemispheres, the grayordinates of a CIFTI-2
file (surface vertices and subcortical voxels alike), or the voxel order of the
ds003020 preprocessed files. All runs of a participant share one space (one
mask), so their columns line up.
"""

from __future__ import annotations

import logging
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._arrays import usable_columns
from ..errors import DataError, MissingInputError
from .experiment import Run

log = logging.getLogger(__name__)

#: Space labels that are one person's own (fMRIPrep's T1w, boldref, fsnative; None for raw data):
#: never pooled voxel by voxel across participants.
NATIVE_SPACES = frozenset({None, "", "T1w", "T2w", "boldref", "func", "anat", "fsnative"})


#: CIFTI-2 structures of the two cortical hemispheres.
CIFTI_CORTEX = {"left": "CIFTI_STRUCTURE_CORTEX_LEFT", "right": "CIFTI_STRUCTURE_CORTEX_RIGHT"}


@dataclass
class Space:
    """Where the columns of a response matrix live.

    ``kind`` is ``"volume"`` (``mask`` is a 3D boolean array, ``affine`` its
    voxel-to-world matrix), ``"surface"`` (``n_vertices`` per hemisphere, left then
    right), ``"cifti"`` (``brain_models``: nibabel's ``BrainModelAxis``, one column per
    grayordinate; ``n_vertices`` the sizes of the left and right cortical meshes, 0 when
    absent) or ``"index"`` (columns as stored, e.g. ds003020 cortical voxels).
    """

    kind: str
    n_voxels: int
    name: str | None = None
    mask: np.ndarray | None = None
    affine: np.ndarray | None = None
    n_vertices: tuple[int, int] | None = None
    mask_source: str = ""
    #: Order in which the mask's voxels are numbered: "C" (nibabel's x, y, z array,
    #: last axis fastest) or "F" (pycortex, whose masks are stored transposed).
    voxel_order: str = "C"
    brain_models: object | None = None
    #: The ``den`` entity of the data (fsLR ``91k``), part of the outputs' names.
    density: str | None = None

    def surface_parts(self, values: np.ndarray) -> dict[str, np.ndarray]:
        """Each hemisphere's vertex values, ``{"left": ..., "right": ...}``.

        For CIFTI data, the arrays span the whole cortical mesh with NaN where it has
        no grayordinate (the medial wall); subcortical grayordinates are not included.
        """
        values = np.asarray(values, dtype=np.float32)
        if self.kind == "surface":
            return {"left": values[:self.n_vertices[0]], "right": values[self.n_vertices[0]:]}
        if self.kind != "cifti":
            raise ValueError(f"a {self.kind} space has no surface")
        parts = {}
        for hemi, structure in CIFTI_CORTEX.items():
            size = self.brain_models.nvertices.get(structure, 0)
            part = np.full(size, np.nan, dtype=np.float32)
            on = self.brain_models.name == structure
            part[self.brain_models.vertex[on]] = values[on]
            parts[hemi] = part
        return parts

    def to_volume(self, values: np.ndarray) -> np.ndarray:
        """A 3D (or 4D for 2D ``values``) array with ``values`` inside the mask and 0 outside."""
        if self.kind != "volume":
            raise ValueError(f"a {self.kind} space has no volume")
        values = np.asarray(values)
        if self.voxel_order == "F":  # number the voxels along z, y, x as pycortex does
            out_t = np.zeros(self.mask.T.shape + values.shape[1:], dtype=np.float32)
            out_t[self.mask.T] = values
            return np.moveaxis(out_t, (0, 1, 2), (2, 1, 0))
        out = np.zeros(self.mask.shape + values.shape[1:], dtype=np.float32)
        out[self.mask] = values
        return out

    def from_volume(self, volume: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_volume`: the mask's voxels of ``volume``, in column order."""
        if self.voxel_order == "F":
            return np.moveaxis(np.asarray(volume), (0, 1, 2), (2, 1, 0))[self.mask.T]
        return np.asarray(volume)[self.mask]


def read_responses(runs: list[Run], mask_path: Path | None = None, *,
                   like: Space | None = None) -> tuple[Space, Iterator[np.ndarray]]:
    """The runs' shared space, and their responses read one run at a time.

    Everything that can be checked without the data (kinds, grids, widths) is checked
    here, and a brain mask computed from the EPI is computed here; the iterator then
    reads each run only when asked, as float32 ``[n_volumes, n_voxels]``, so that a
    caller who keeps what it needs of each run holds one raw run at a time (at the scale
    of ds003020, all raw runs together are as large as the training set).

    For volumes, the mask is the runs' own brain mask when given (fMRIPrep), else one
    computed from the EPI images with nilearn (``compute_multi_epi_mask``); the
    columns are the voxels inside it. With ``like``, the responses are read in that
    space instead (another participant's mask on the same template grid), so their
    columns line up with it; a different grid is a :class:`DataError`.
    """
    kinds = {run.bold.kind for run in runs}
    if len(kinds) != 1:
        raise DataError(f"a participant's runs mix BOLD kinds ({', '.join(sorted(kinds))}); select one space")
    kind = kinds.pop()
    if like is not None:
        return _read_like(runs, kind, like)
    if kind == "nifti":
        return _read_nifti(runs, mask_path)
    if kind == "gifti":
        return _read_gifti(runs)
    if kind == "cifti":
        return _read_cifti(runs)
    return _read_hdf5(runs)


def load_responses(runs: list[Run], mask_path: Path | None = None, *,
                   like: Space | None = None) -> tuple[list[np.ndarray], Space]:
    """Every run's responses at once (see :func:`read_responses`, which reads them one by one)."""
    space, responses = read_responses(runs, mask_path, like=like)
    return list(responses), space


def space_from_headers(runs: list[Run], mask_path: Path | None = None) -> Space | None:
    """The runs' space when it is known without reading their data; None when the mask needs the EPI.

    Known from a brain mask file (``mask_path`` or fMRIPrep's), from the surfaces (the
    first run is parsed: GIfTI has no separate header), or from ds003020's files.
    """
    kind = runs[0].bold.kind
    if kind == "nifti" and mask_path is None and not any(run.bold.mask for run in runs):
        return None
    return read_responses(runs, mask_path)[0]  # the iterator is dropped unread


def run_read_bytes(run: Run, space: Space) -> int:
    """Bytes that reading one run of ``space`` takes at its peak (float32 data as read, then its voxels).

    A NIfTI image is read whole, then masked; GIfTI hemispheres are stacked, then transposed
    (three copies); a ds003020 file is read, then converted. Images stored in another type
    than float32 take their stored copy on top, not counted here.
    """
    volumes = run.trimmed_start + run.n_volumes + run.trimmed_end
    if space.kind == "volume" and space.mask is not None and run.bold.kind == "nifti":
        return 4 * volumes * (space.mask.size + space.n_voxels)
    return 4 * volumes * space.n_voxels * (3 if run.bold.kind == "gifti" else 2)  # CIFTI: as stored, then copied


def check_mask(mask_path: Path, runs: list[Run]) -> None:
    """Refuse a ``--mask`` that cannot serve these runs (read from the headers: nothing is loaded)."""
    mask = _nib_load(mask_path)
    for run in runs:
        if run.bold.kind == "cifti":
            raise DataError(f"--mask {mask_path.name}: {run.name} is CIFTI-2 data, whose grayordinates are already "
                            "the brain's (cortical vertices and subcortical voxels); leave out --mask")
        if run.bold.kind != "nifti":
            raise DataError(f"--mask {mask_path.name}: {run.name} is not a NIfTI run ({run.bold.kind}); a mask "
                            "applies to volumes only")
        bold = _nib_load(run.bold.paths[0])
        if bold.shape[:3] != mask.shape[:3] or not np.allclose(bold.affine, mask.affine, atol=1e-3):
            raise DataError(f"--mask {mask_path.name} ({'x'.join(map(str, mask.shape[:3]))}) is not on the voxel grid "
                            f"of {run.bold.paths[0].name} ({'x'.join(map(str, bold.shape[:3]))}); resample it to "
                            "the BOLD grid")
    if not (_image_data(mask, mask_path, np.float32) > 0).any():
        raise DataError(f"--mask {mask_path.name} selects no voxel")


#: Images with fewer voxels per volume hold regions or parcels, not a brain: no EPI mask is computed.
MIN_EPI_MASK_VOXELS = 1000


def _varying(img, path: Path) -> np.ndarray:
    """Voxels whose time series is finite and not constant (up to rounding, as the fit will judge them)."""
    data = _image_data(img, path, np.float64)
    return usable_columns(data.reshape(-1, data.shape[-1]).T).reshape(data.shape[:-1])


def _read_nifti(runs: list[Run], mask_path: Path | None) -> tuple[Space, Iterator[np.ndarray]]:
    from nilearn.masking import compute_multi_epi_mask

    paths = [run.bold.paths[0] for run in runs]
    imgs = [_nib_load(p) for p in paths]
    masks = {run.bold.mask for run in runs if run.bold.mask is not None}
    if mask_path is not None:
        masks = {mask_path}
    if masks:
        mask_imgs = [_nib_load(m) for m in sorted(masks)]
        mask = np.logical_and.reduce([_image_data(m, p, np.float32) > 0 for m, p in zip(mask_imgs, sorted(masks), strict=True)])
        source = ", ".join(p.name for p in sorted(masks))
        if len(masks) > 1:
            source = f"intersection of {len(masks)} run masks"
    elif np.prod(imgs[0].shape[:3]) < MIN_EPI_MASK_VOXELS:
        # region or parcel time series stored as a small image: no brain to find, every signal counts
        mask = np.logical_and.reduce([_varying(img, p) for img, p in zip(imgs, paths, strict=True)]) if \
            len({img.shape[:3] for img in imgs}) == 1 else np.ones(imgs[0].shape[:3], bool)
        source = "every finite, non-constant voxel (the image is too small for an EPI brain mask)"
        log.info("%s has %d voxels per volume, too few for an EPI brain mask: using %s", paths[0].name,
                 int(np.prod(imgs[0].shape[:3])), source)
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                mask = np.asarray(compute_multi_epi_mask(imgs).dataobj) > 0
            except _READ_ERRORS:
                for img, path in zip(imgs, paths, strict=True):  # name the file that cannot be read
                    _image_data(img, path, np.float32)
                raise
        source = "computed from the EPI with nilearn compute_multi_epi_mask"
        log.info("brain mask %s: %d voxels", source, int(mask.sum()))
        for message in {" ".join(str(w.message).split()) for w in caught}:
            log.warning("brain mask from %s: %s (give --mask FILE to choose the voxels)", paths[0].name, message)
        if not mask.any():
            raise DataError(f"no brain found in {paths[0].name} and the other runs (the mask computed from "
                            "the EPI is empty); give a mask with --mask FILE or use fMRIPrep outputs, which come "
                            "with a brain mask")
    shape3d = imgs[0].shape[:3]
    if mask.shape != shape3d:
        raise DataError(f"brain mask shape {mask.shape} differs from the BOLD grid {shape3d}")
    for path, img in zip(paths, imgs, strict=True):
        if img.shape[:3] != shape3d or not np.allclose(img.affine, imgs[0].affine, atol=1e-3):
            raise DataError(f"{path.name}: its voxel grid differs from {paths[0].name}; runs of one "
                            "participant must share a space (use fMRIPrep outputs in one --space)")
    space = Space("volume", int(mask.sum()), runs[0].bold.space, mask=mask, affine=imgs[0].affine,
                  mask_source=source)
    return space, (_masked(img, path, mask) for path, img in zip(paths, imgs, strict=True))


def _masked(img, path: Path, mask: np.ndarray) -> np.ndarray:
    """The voxels of ``mask`` of a 4D image, ``[n_volumes, n_voxels]`` float32 (the whole image is freed)."""
    return np.ascontiguousarray(_image_data(img, path, np.float32)[mask].T)


def _read_like(runs: list[Run], kind: str, like: Space) -> tuple[Space, Iterator[np.ndarray]]:
    if kind == "cifti" and like.kind == "cifti":
        space, responses = _read_cifti(runs)
        if space.brain_models != like.brain_models:
            raise DataError(f"{runs[0].name}: its grayordinates differ from the reference participant's")
        return like, responses
    if kind == "gifti" and like.kind == "surface":
        space, responses = _read_gifti(runs)
        if space.n_vertices != like.n_vertices:
            raise DataError(f"{runs[0].name}: {space.n_vertices} vertices, not {like.n_vertices}")
        return like, responses
    if kind != "nifti" or like.kind != "volume" or like.voxel_order != "C":
        raise DataError(f"{runs[0].name}: its {kind} data cannot be read in a {like.kind} space")
    imgs = [_nib_load(run.bold.paths[0]) for run in runs]
    for run, img in zip(runs, imgs, strict=True):
        if img.shape[:3] != like.mask.shape or not np.allclose(img.affine, like.affine, atol=1e-3):
            raise DataError(f"{run.name}: its voxel grid differs from the reference participant's")
    return like, (_masked(img, run.bold.paths[0], like.mask) for run, img in zip(runs, imgs, strict=True))


def _read_gifti(runs: list[Run]) -> tuple[Space, Iterator[np.ndarray]]:
    # GIfTI has no header to read apart from the data: the first run is read here for the sizes
    first = _gifti_run(runs[0])
    sizes = first[1]

    def responses():
        nonlocal first
        y, first = first[0], None
        yield y
        del y
        for run in runs[1:]:
            y, shape = _gifti_run(run)
            if shape != sizes:
                raise DataError(f"{run.name}: hemispheres have {shape} vertices, earlier runs {sizes}")
            yield y
            del y

    return Space("surface", int(sum(sizes)), runs[0].bold.space, n_vertices=sizes,
                 mask_source="all vertices"), responses()


def _gifti_run(run: Run) -> tuple[np.ndarray, tuple[int, ...]]:
    """One run's two hemispheres as ``[n_volumes, n_vertices]`` float32, and the vertices of each."""
    hemis = [np.column_stack([d.data for d in _nib_load(p).darrays]).astype(np.float32) for p in run.bold.paths]
    return np.ascontiguousarray(np.vstack(hemis).T), tuple(h.shape[0] for h in hemis)


def cifti_series(path: Path) -> tuple[int, float]:
    """The number of time points of a CIFTI-2 dense time series, and their step in seconds (headers only).

    Anything but a dtseries (a dscalar, a parcellated or connectivity file) is a
    :class:`DataError` that says what the file is.
    """
    import nibabel as nib

    img = _nib_load(path)
    if not isinstance(img, nib.cifti2.Cifti2Image):
        raise DataError(f"{path.name}: not a CIFTI-2 file ({type(img).__name__}); fMRIPrep writes grayordinate "
                        "time series as *_bold.dtseries.nii")
    try:
        rows, columns = img.header.get_axis(0), img.header.get_axis(1)
    except Exception as err:  # nibabel raises several types for inconsistent CIFTI headers
        raise DataError(f"{path.name}: unreadable CIFTI-2 header ({type(err).__name__}: {err})") from None
    if not isinstance(rows, nib.cifti2.SeriesAxis) or not isinstance(columns, nib.cifti2.BrainModelAxis):
        what = f"{type(rows).__name__.removesuffix('Axis').lower()} x {type(columns).__name__.removesuffix('Axis')}"
        raise DataError(f"{path.name}: a CIFTI-2 file of {what} rows, not a dense time series (series x brain "
                        "models, a .dtseries.nii); give the BOLD time series, not maps computed from it")
    if rows.unit != "SECOND":
        raise DataError(f"{path.name}: its series is in {rows.unit.lower()}, not in seconds; not a BOLD time series")
    return int(rows.size), float(rows.step)


def _read_cifti(runs: list[Run]) -> tuple[Space, Iterator[np.ndarray]]:
    paths = [run.bold.paths[0] for run in runs]
    imgs = [_nib_load(path) for path in paths]
    for path in paths:
        cifti_series(path)
    models = imgs[0].header.get_axis(1)
    for path, img in zip(paths[1:], imgs[1:], strict=True):
        if img.header.get_axis(1) != models:
            raise DataError(f"{path.name}: its grayordinates (CIFTI brain models) differ from those of {paths[0].name}; "
                            "runs of one participant must share them (fMRIPrep outputs of one --cifti-output "
                            "density)")
    structures = [name.removeprefix("CIFTI_STRUCTURE_").lower() for name, _, _ in models.iter_structures()]
    n_vertices = tuple(int(models.nvertices.get(CIFTI_CORTEX[h], 0)) for h in ("left", "right"))
    n_surface = int((models.vertex >= 0).sum())
    source = (f"CIFTI-2 grayordinates: {n_surface} cortical vertices, {len(models) - n_surface} subcortical voxels "
              f"({len(structures)} structures)")
    space = Space("cifti", len(models), runs[0].bold.space, n_vertices=n_vertices, mask_source=source,
                  brain_models=models, density=runs[0].bold.density)
    return space, (np.ascontiguousarray(_image_data(img, path, np.float32))
                   for path, img in zip(paths, imgs, strict=True))


def _read_hdf5(runs: list[Run]) -> tuple[Space, Iterator[np.ndarray]]:
    widths = {_hdf5_shape(run)[-1] for run in runs}  # from the files' headers: nothing is read yet
    if len(widths) != 1:
        raise DataError(f"the preprocessed responses of {runs[0].entities.get('sub')} differ in voxel count "
                        f"({sorted(widths)})")
    n_voxels = widths.pop()
    responses = (_hdf5_run(run) for run in runs)
    found = _pycortex_mask(runs[0].bold.paths[0], n_voxels)
    if found is not None:
        mask, affine, path = found
        return Space("volume", n_voxels, None, mask=mask, affine=affine, voxel_order="F",
                     mask_source=f"pycortex cortical mask {path}"), responses
    log.warning("no pycortex cortical mask with %d voxels found for %s (derivative/pycortex-db/<subject>/"
                "transforms/*/mask_thick.nii.gz): maps are written as arrays in the preprocessed files' voxel "
                "order (.npy) rather than NIfTI", n_voxels, runs[0].bold.paths[0].parent.name)
    return Space("index", n_voxels, None, mask_source="ds003020 preprocessed_data voxel order"), responses


def _hdf5_shape(run: Run) -> tuple[int, ...]:
    return _hdf5_read(run, lambda data: data.shape[1:] if run.bold.repeat is not None else data.shape)


def _hdf5_run(run: Run) -> np.ndarray:
    return _hdf5_read(run, lambda data: np.asarray(data[run.bold.repeat] if run.bold.repeat is not None
                                                   else data[:], dtype=np.float32))


def _hdf5_read(run: Run, what):
    import h5py

    path = run.bold.paths[0]
    try:
        with h5py.File(path, "r") as fh:
            return what(fh[run.bold.key])
    except OSError as err:
        raise DataError(f"{path}: cannot read {run.bold.key} ({err})") from None


def _pycortex_mask(hdf5_path: Path, n_voxels: int):
    """ds003020's cortical mask for ``derivative/preprocessed_data/<sub>/<story>.hf5``, if present.

    The preprocessed files number the voxels of the pycortex ``thick`` mask of the
    subject's reference volume (pycortex stores volumes transposed: z, y, x).
    """
    subject = hdf5_path.parent.name
    db = hdf5_path.parent.parent.parent / "pycortex-db" / subject / "transforms"
    for path in sorted(db.glob("*/mask_thick.nii.gz")) if db.is_dir() else []:
        img = _nib_load(path)
        mask = _image_data(img, path, np.float32) > 0
        if int(mask.sum()) == n_voxels:
            return mask, img.affine, path
    return None


#: Desikan-Killiany cortical labels of FreeSurfer's aparc+aseg (FreeSurferColorLUT): 1000 + i on the
#: left, 2000 + i on the right; used when fMRIPrep's segmentation comes without a dseg.tsv.
_DK_REGIONS = (
    "bankssts", "caudalanteriorcingulate", "caudalmiddlefrontal", "corpuscallosum", "cuneus", "entorhinal",
    "fusiform", "inferiorparietal", "inferiortemporal", "isthmuscingulate", "lateraloccipital",
    "lateralorbitofrontal", "lingual", "medialorbitofrontal", "middletemporal", "parahippocampal", "paracentral",
    "parsopercularis", "parsorbitalis", "parstriangularis", "pericalcarine", "postcentral", "posteriorcingulate",
    "precentral", "precuneus", "rostralanteriorcingulate", "rostralmiddlefrontal", "superiorfrontal",
    "superiorparietal", "superiortemporal", "supramarginal", "frontalpole", "temporalpole", "transversetemporal",
    "insula")


def find_regions(runs: list[Run], space: Space) -> tuple[np.ndarray, dict[int, str], str] | None:
    """The participant's own cortical regions on its voxels, from fMRIPrep's ``desc-aparcaseg_dseg``.

    fMRIPrep writes the FreeSurfer parcellation resampled to the BOLD grid beside the
    runs (``func/``) or in ``anat/``; one on exactly the responses' grid is used, with
    the names of its ``dseg.tsv`` or else FreeSurfer's Desikan-Killiany names.
    Returns (label per voxel, {label: name}, file name), or None when there is none.
    """
    if space.kind != "volume" or space.voxel_order != "C" or runs[0].bold.kind != "nifti":
        return None
    folder = runs[0].bold.paths[0].parent
    subject = runs[0].bold.paths[0].name.split("_")[0]
    candidates = sorted(folder.glob(f"{subject}_*desc-aparcaseg_dseg.nii*"))
    candidates += sorted((folder.parent / "anat").glob(f"{subject}_*desc-aparcaseg_dseg.nii*"))
    for path in candidates:
        img = _nib_load(path)
        if img.shape[:3] != space.mask.shape or not np.allclose(img.affine, space.affine, atol=1e-3):
            continue
        labels = np.rint(_image_data(img, path, np.float64)).astype(np.int32)[space.mask]
        names = _dseg_names(path)
        present = {int(i) for i in np.unique(labels)}
        return labels, {i: n for i, n in names.items() if i in present}, path.name
    return None


def _dseg_names(path: Path) -> dict[int, str]:
    table = path.with_name(path.name.split(".nii")[0] + ".tsv")
    if table.is_file():
        import pandas as pd

        try:
            frame = pd.read_csv(table, sep="\t")
            return {int(i): str(n) for i, n in zip(frame["index"], frame["name"], strict=True)}
        except (KeyError, ValueError) as err:
            log.warning("%s: expected the columns index and name (%s); using FreeSurfer's names", table.name, err)
    return {base + i + 1: f"{hemi}-{name}" for base, hemi in ((1000, "ctx-lh"), (2000, "ctx-rh"))
            for i, name in enumerate(_DK_REGIONS)}


def load_confounds(run: Run, patterns: tuple[str, ...]) -> np.ndarray | None:
    """The run's fMRIPrep confounds named by ``patterns`` (shell patterns, e.g. ``trans_*``), as a float array.

    Missing values (the first row of derivatives and framewise displacement) are
    replaced by the column's mean, as nilearn's ``load_confounds`` does.
    """
    if not patterns:
        return None
    import fnmatch

    import pandas as pd

    path = run.bold.confounds
    if path is None:
        raise MissingInputError(f"{run.name}: --confounds needs fMRIPrep's *_desc-confounds_timeseries.tsv, "
                                "which this run does not have (confounds apply to fMRIPrep outputs only)")
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a", "N/A", "NaN"])
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable confounds table ({err})") from None
    columns: list[str] = []
    for pattern in patterns:
        matched = [c for c in table.columns if fnmatch.fnmatchcase(c, pattern)]
        if not matched:
            raise DataError(f"{path.name}: no confound column matches {pattern!r}; columns include "
                            f"{', '.join(list(table.columns)[:8])}, ...")
        columns += [c for c in matched if c not in columns]
    if len(table) != run.n_volumes:
        raise DataError(f"{path.name}: {len(table)} rows but {run.name} has {run.n_volumes} volumes")
    values = table[columns].apply(pd.to_numeric, errors="coerce")
    return values.fillna(values.mean()).fillna(0.0).to_numpy(dtype=np.float64)


# What reading a truncated or corrupt image's data raises (a cut .nii.gz: EOFError or zlib.error;
# a cut .nii: ValueError from the memory map; a bad gzip stream: BadGzipFile, an OSError).
_READ_ERRORS = (EOFError, OSError, ValueError, zlib.error)


def _image_data(img, path: Path, dtype) -> np.ndarray:
    """An image's data as an array; a file that cannot be read whole is a data error naming it."""
    try:
        return np.asarray(img.dataobj, dtype=dtype)
    except _READ_ERRORS as err:
        raise DataError(f"{path}: its data cannot be read ({type(err).__name__}: {err}); the file is truncated "
                        "or corrupt (an interrupted copy or download?): copy it again") from None


def _nib_load(path: Path):
    import nibabel as nib

    try:
        return nib.load(path)
    except FileNotFoundError:
        raise MissingInputError(f"{path} is missing") from None
    except Exception as err:  # nibabel raises many types for corrupt files
        raise DataError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


__all__ = ["CIFTI_CORTEX", "NATIVE_SPACES", "Space", "cifti_series", "find_regions", "load_confounds", "load_responses", "read_responses",
           "run_read_bytes", "space_from_headers"]

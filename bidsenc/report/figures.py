"""Figures for the reports, returned as self-contained ``<img>`` tags (PNG embedded as base64).

Matplotlib runs headless (Agg); every function closes its figure. Brain maps are drawn in
the data's own space: volumes as axial slices (over nilearn's MNI152 template in an MNI space), surface and CIFTI cortex data as
lateral and medial views on a mesh with the data's vertices (the participant's own
fMRIPrep surfaces, or nilearn's bundled fsaverage5; nothing is downloaded), or, with no
such mesh, as the vertices in index order, titled as such.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

log = logging.getLogger(__name__)


def embed(fig, alt: str) -> str:
    """Close ``fig`` and return it as an ``<img>`` tag holding the PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def brain_map(space, values: np.ndarray, title: str, *, vmax: float | None = None, cmap: str = "inferno",
              meshes: dict | None = None) -> str | None:
    """A view of a voxel vector in the data's own space, as an ``<img>`` tag.

    Parameters
    ----------
    space : bidsenc.bids.bold.Space
        Where the values live; only ``kind``, ``name``, ``n_vertices`` (and, for volumes,
        ``to_volume``/``affine``; for ``"cifti"``, ``surface_parts``) are used.
    values : numpy.ndarray
        One value per column of the responses.
    title : str
        The figure's title, also its alt text (with what the picture shows).
    vmax : float, optional
        Top of the colour scale; the 99.5th percentile of ``|values|`` by default.
    cmap : str
        A matplotlib colour map.
    meshes : dict, optional
        The participant's own surfaces, as :func:`bidsenc.bids.surfaces.find_surface_meshes`
        returns them: ``{"left": path, "right": path}`` of GIfTI surfaces, optionally
        ``"sulc_left"``/``"sulc_right"`` (sulcal depth drawn underneath) and ``"kind"``.
        Used for surface and CIFTI data when their vertex counts equal the data's.

    Returns
    -------
    str or None
        Volumes: axial slices (over the MNI152 template in an MNI space). Surfaces and CIFTI
        cortex: lateral and medial views of each hemisphere on the first mesh that fits
        (``meshes``, else nilearn's bundled fsaverage5), else the vertices in index order as a
        flat raster that says so.
        None when the space has no geometry (ds003020's voxel order).
    """
    values = np.nan_to_num(np.asarray(values, dtype=np.float32))
    vmax = float(vmax if vmax is not None else max(np.percentile(np.abs(values), 99.5), 1e-6))
    with warnings.catch_warnings():  # nilearn's notes on masks and colour maps are not the user's concern
        warnings.simplefilter("ignore", UserWarning)
        return _brain_map(space, values, title, vmax, cmap, meshes)


#: At most this many voxels are drawn as bars instead of a map (region or parcel time series).
MAX_BAR_VOXELS = 60
#: Axial slices (MNI z, mm) of a map in an MNI space: temporal lobe to the parietal and frontal language areas.
MNI_AXIAL_CUTS = (-18, -6, 6, 18, 30, 42, 54)


def _brain_map(space, values, title, vmax, cmap, meshes) -> str | None:
    if len(values) <= MAX_BAR_VOXELS:  # a handful of regions: slices would be an empty box
        return bars([f"voxel {i}" for i in range(len(values))] if space.kind != "volume" else _voxel_names(space),
                    values, title, "value")
    if space.kind == "volume":
        import nibabel as nib
        from nilearn import plotting

        img = nib.Nifti1Image(space.to_volume(values), space.affine)
        fig = plt.figure(figsize=(11, 3))
        if str(space.name or "").startswith("MNI"):
            # axial slices through the language network over nilearn's bundled MNI152 template: a
            # glass brain's maximum projection turns a coarse, noisy map into speckle
            from nilearn.datasets import load_mni152_template

            plotting.plot_stat_map(img, bg_img=load_mni152_template(resolution=2), figure=fig, title=title,
                                   display_mode="z", cut_coords=MNI_AXIAL_CUTS, colorbar=True, vmin=0, vmax=vmax,
                                   symmetric_cbar=False, cmap=cmap, threshold=vmax / 10, annotate=False,
                                   draw_cross=False)
        else:  # native space: slices without an anatomical background
            plotting.plot_stat_map(img, bg_img=None, figure=fig, title=title, display_mode="z",
                                   cut_coords=min(7, img.shape[2]), colorbar=True, vmax=vmax, cmap=cmap,
                                   threshold=vmax / 10, black_bg=True, annotate=False)
        return embed(fig, title)
    if space.kind in ("surface", "cifti"):
        parts = _surface_parts(space, values)
        if not any(part.size for part in parts.values()):
            return None
        scale = _Scale.of(values, vmax, cmap)
        found = _mesh_for(space.name, {hemi: part.size for hemi, part in parts.items()}, meshes)
        if found is None:
            return _index_raster(space.name, parts, title, scale)
        return _surface_views(found, parts, title, scale)
    return None
def _voxel_names(space) -> list[str]:
    """``i,j,k`` of each voxel of a volume space, in column order."""
    order = space.to_volume(np.arange(1, space.n_voxels + 1, dtype=np.float32))
    names = [""] * space.n_voxels
    for ijk in zip(*np.nonzero(order)):
        names[int(order[ijk]) - 1] = ",".join(str(int(c)) for c in ijk)
    return names


# --- surfaces: lateral and medial views on a mesh, or the vertices as a raster when none fits ---------

#: Vertices per hemisphere of fsaverage5, the one mesh nilearn ships (nothing is downloaded).
FSAVERAGE5_VERTICES = 10242

#: Faces turned away from the camera by less than this (cosine) are still drawn: the
#: silhouette stays whole, and every face that can show is kept.
_CULL_MARGIN = 0.1


@dataclass(frozen=True, eq=False)
class _Mesh:
    """One hemisphere's mesh, centred, with which way its faces look along x (for culling)."""

    coords: np.ndarray
    faces: np.ndarray
    #: x component of each face's outward unit normal; None when the mesh is not a closed,
    #: consistently wound surface (then nothing is culled).
    facing_x: np.ndarray | None

    @classmethod
    def of(cls, coords, faces) -> _Mesh:
        coords = np.asarray(coords, dtype=np.float64)
        coords = coords - coords.mean(axis=0)
        faces = np.asarray(faces, dtype=np.int64)
        a, b, c = coords[faces[:, 0]], coords[faces[:, 1]], coords[faces[:, 2]]
        normals = np.cross(b - a, c - a)
        facing_x = None
        if faces.size and _closed_and_wound(faces, len(coords)):
            # the signed volume says whether the winding points out of the surface or into it
            outward = np.sign(np.einsum("ij,ij->i", a, np.cross(b, c)).sum())
            lengths = np.linalg.norm(normals, axis=1)
            facing_x = outward * normals[:, 0] / np.where(lengths > 0, lengths, 1.0)
        return cls(coords, faces, facing_x)

    def faces_towards(self, camera_x: float) -> np.ndarray:
        """The faces that can be seen from ``camera_x * infinity`` on the x axis (an orthographic view)."""
        if self.facing_x is None:
            return self.faces
        return self.faces[self.facing_x * camera_x > -_CULL_MARGIN]


def _closed_and_wound(faces: np.ndarray, n_vertices: int) -> bool:
    """Whether every edge is shared by two faces that run along it in opposite directions."""
    edges = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    forward = edges[:, 0] * n_vertices + edges[:, 1]
    backward = edges[:, 1] * n_vertices + edges[:, 0]
    forward.sort()
    backward.sort()
    return bool(np.all(forward[1:] != forward[:-1]) and np.array_equal(forward, backward))


@dataclass(frozen=True)
class _Surfaces:
    """Meshes to draw on, per hemisphere, with what lies beneath (sulcal depth) and where they came from."""

    meshes: dict
    background: dict
    source: str


@dataclass(frozen=True)
class _Scale:
    """One colour scale shared by every panel of a figure."""

    vmin: float
    vmax: float
    threshold: float
    cmap: str

    @classmethod
    def of(cls, values: np.ndarray, vmax: float, cmap: str) -> _Scale:
        threshold = vmax / 10
        # Two-sided only when negative values are a real part of the map (a quarter of those painted),
        # not the scatter of scores below chance; as the volume slices, a one-sided scale paints none.
        painted = np.abs(values) >= threshold
        two_sided = np.count_nonzero(values <= -threshold) > 0.25 * max(np.count_nonzero(painted), 1)
        return cls(-vmax if two_sided else 0.0, vmax, threshold, cmap)

    @property
    def unpainted(self) -> str:
        """What the figure leaves unpainted, in words."""
        if self.vmin < 0:
            return f"|value| < {self.threshold:.3g}"
        return f"value < {self.threshold:.3g}"

    def colorbar(self, fig, cax, *, thresholded: bool) -> None:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import ListedColormap, Normalize

        colours = plt.get_cmap(self.cmap)(np.linspace(0, 1, 256))
        if thresholded:  # values this close to 0 are not painted: the mesh shows through, grey
            colours[np.abs(np.linspace(self.vmin, self.vmax, 256)) < self.threshold] = (0.7, 0.7, 0.7, 1.0)
        fig.colorbar(ScalarMappable(Normalize(self.vmin, self.vmax), ListedColormap(colours)), cax=cax)
        cax.tick_params(labelsize=8)


def _surface_parts(space, values: np.ndarray) -> dict[str, np.ndarray]:
    """Each hemisphere's vertex values; CIFTI medial wall (no grayordinate) as NaN."""
    if space.kind == "cifti":
        parts = space.surface_parts(values)
        return {hemi: np.asarray(parts.get(hemi, ()), dtype=np.float32) for hemi in ("left", "right")}
    n_left = int(space.n_vertices[0])
    return {"left": values[:n_left], "right": values[n_left:]}


def _mesh_for(name: str | None, counts: dict[str, int], meshes: dict | None) -> _Surfaces | None:
    """The first mesh whose vertex counts are the data's: the participant's own, then fsaverage5."""
    if meshes:
        own = _own_surfaces(meshes, counts)
        if own is not None:
            return own
    name = str(name or "")
    on_fsaverage5 = set(counts.values()) <= {0, FSAVERAGE5_VERTICES}
    if on_fsaverage5 and (name.startswith("fsaverage5") or name == "fsaverage"):
        return _fsaverage5()
    return None


def _own_surfaces(meshes: dict, counts: dict[str, int]) -> _Surfaces | None:
    found, background = {}, {}
    for hemi, count in counts.items():
        if not count:
            continue
        path = meshes.get(hemi)
        mesh = _read_mesh(path) if path is not None else None
        if mesh is None:
            return None
        if len(mesh.coords) != count:
            log.info("%s has %d vertices, the data %d: not drawn on it", Path(path).name, len(mesh.coords),
                     count)
            return None
        found[hemi] = mesh
        if meshes.get(f"sulc_{hemi}") is not None:
            background[hemi] = _read_shape(meshes[f"sulc_{hemi}"], count)
    names = " and ".join(Path(meshes[hemi]).name for hemi in found)
    return _Surfaces(found, background, f"the participant's surfaces {names}"
                     + (", sulcal depth beneath" if any(v is not None for v in background.values()) else ""))


@functools.lru_cache(maxsize=1)
def _fsaverage5() -> _Surfaces | None:
    """nilearn's bundled fsaverage5 inflated mesh and its sulcal depth (read once per process)."""
    try:
        from nilearn.datasets import load_fsaverage

        mesh = load_fsaverage("fsaverage5")["inflated"]
        meshes = {hemi: _Mesh.of(mesh.parts[hemi].coordinates, mesh.parts[hemi].faces)
                  for hemi in ("left", "right")}
    except Exception as err:  # an older nilearn without the bundled mesh
        log.info("no fsaverage5 mesh to draw surface maps on (%s)", err)
        return None
    try:
        from nilearn.datasets import load_fsaverage_data

        sulc = load_fsaverage_data(mesh="fsaverage5", mesh_type="inflated", data_type="sulcal").data.parts
        background = {hemi: np.asarray(sulc[hemi], dtype=np.float64) for hemi in ("left", "right")}
    except Exception as err:  # the map still draws, on a plain mesh
        log.info("no fsaverage5 sulcal depth to draw beneath surface maps (%s)", err)
        background = {}
    return _Surfaces(meshes, background, "fsaverage5 inflated (nilearn's bundled mesh)"
                     + (", sulcal depth beneath" if background else ""))


def _read_mesh(path) -> _Mesh | None:
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as err:
        log.warning("surface mesh %s cannot be read (%s): maps drawn without it", path, err)
        return None
    return _read_mesh_cached(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)  # a report draws several maps on the same two meshes
def _read_mesh_cached(path: str, mtime_ns: int, size: int) -> _Mesh | None:
    import nibabel as nib

    try:
        img = nib.load(path)
        coords, faces = img.agg_data("pointset"), img.agg_data("triangle")
    except Exception as err:  # nibabel raises many types for corrupt files
        log.warning("surface mesh %s cannot be read (%s: %s): maps drawn without it", path,
                    type(err).__name__, err)
        return None
    if not isinstance(coords, np.ndarray) or not isinstance(faces, np.ndarray) or coords.ndim != 2 \
            or faces.ndim != 2:
        log.warning("%s holds no mesh (pointset and triangles): maps drawn without it", path)
        return None
    return _Mesh.of(coords, faces)


def _read_shape(path, count: int) -> np.ndarray | None:
    """A per-vertex GIfTI shape (sulcal depth), or None when it cannot be read or has other vertices."""
    import nibabel as nib

    try:
        data = np.asarray(nib.load(path).darrays[0].data, dtype=np.float64).ravel()
    except Exception as err:  # a missing background only makes the picture plainer
        log.info("%s not drawn beneath the map (%s)", path, err)
        return None
    return data if data.size == count else None


#: Panels of a surface figure: (view, camera on the x axis for the left hemisphere); the right one mirrors it.
_VIEWS = (("lateral", -1.0), ("medial", 1.0))


def _surface_views(surfaces: _Surfaces, parts: dict, title: str, scale: _Scale) -> str:
    """Lateral and medial views of each hemisphere, one colour scale, one colour bar."""
    from nilearn import plotting

    hemis = [hemi for hemi in ("left", "right") if parts[hemi].size]
    width = 0.9 / len(hemis)
    fig = plt.figure(figsize=(3.9 * len(hemis) + 0.8, 5.4))
    for col, hemi in enumerate(hemis):
        mesh = surfaces.meshes[hemi]
        data = np.nan_to_num(parts[hemi])  # no value (medial wall): under the threshold, not painted
        for row, (view, camera) in enumerate(_VIEWS):
            camera = camera if hemi == "left" else -camera
            ax = fig.add_axes((col * width, 0.47 - row * 0.45, width, 0.43), projection="3d")
            # faces turned away are hidden anyway: leaving them out halves the drawing time
            plotting.plot_surf_stat_map((mesh.coords.copy(), mesh.faces_towards(camera)), data,
                                        bg_map=surfaces.background.get(hemi), hemi=hemi, view=view, axes=ax,
                                        figure=fig, colorbar=False, vmin=scale.vmin, vmax=scale.vmax,
                                        symmetric_cbar=False, threshold=scale.threshold, cmap=scale.cmap,
                                        engine="matplotlib")
            _fit_view(ax, mesh.coords)
            fig.text(col * width + width / 2, 0.9 - row * 0.45, f"{hemi} {view}", ha="center", fontsize=9)
    scale.colorbar(fig, fig.add_axes((0.925, 0.2, 0.018, 0.55)), thresholded=True)
    fig.suptitle(title, y=0.99)
    what = f"lateral and medial views on {surfaces.source}"
    fig.text(0.45, 0.015, f"{what}; not painted: {scale.unpainted}", ha="center", fontsize=8,
             color="#555555")
    return embed(fig, f"{title} ({what})")


#: How far into its box a panel's view is zoomed (matplotlib leaves a margin around the box).
_ZOOM = 1.2


def _fit_view(ax, coords: np.ndarray) -> None:
    """An orthographic view whose box is the mesh's own, so that the hemisphere fills its panel unstretched."""
    low, high = coords.min(axis=0), coords.max(axis=0)
    ax.set_proj_type("ortho")
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(low[1], high[1])
    ax.set_zlim(low[2], high[2])
    ax.set_box_aspect(np.maximum(high - low, 1e-6), zoom=_ZOOM)


#: Names of fsLR densities by vertices per hemisphere.
_FSLR_DENSITIES = {32492: "32k", 163842: "164k", 59292: "59k"}


def _index_raster(name: str | None, parts: dict, title: str, scale: _Scale) -> str:
    """Each hemisphere's vertices in index order, row by row: a picture that says it is not anatomy."""
    hemis = [hemi for hemi in ("left", "right") if parts[hemi].size]
    counts = [parts[hemi].size for hemi in hemis]
    label = str(name or "surface")
    if label.startswith("fsLR") and len(set(counts)) == 1 and counts[0] in _FSLR_DENSITIES:
        label = f"fsLR {_FSLR_DENSITIES[counts[0]]}"
    headline = f"{label} vertices in index order: no mesh to draw on"
    colours = plt.get_cmap(scale.cmap).with_extremes(bad=(0.8, 0.8, 0.8, 1.0))
    fig, axes = plt.subplots(1, len(hemis), figsize=(3.9 * len(hemis) + 0.8, 4.4), squeeze=False)
    for ax, hemi in zip(axes[0], hemis, strict=True):
        part = parts[hemi]
        side = int(np.ceil(np.sqrt(part.size)))
        grid = np.full(side * side, np.nan, dtype=np.float32)
        grid[:part.size] = part
        shown = np.zeros(side * side)
        shown[:part.size] = 1.0  # the square's last row is filled only so far: the rest is left blank
        ax.imshow(grid.reshape(side, side), cmap=colours, vmin=scale.vmin, vmax=scale.vmax,
                  alpha=shown.reshape(side, side), interpolation="nearest")
        ax.set_title(f"{hemi}: vertices 0 to {part.size - 1}, {side} per row", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.subplots_adjust(left=0.02, right=0.88, top=0.8, bottom=0.1, wspace=0.05)
    scale.colorbar(fig, fig.add_axes((0.905, 0.2, 0.018, 0.55)), thresholded=False)
    fig.suptitle(f"{title}\n{headline}", fontsize=11)
    note = "not anatomy: neighbouring pixels need not be neighbouring vertices"
    if any(np.isnan(parts[hemi]).any() for hemi in hemis):
        note += "; light grey: no value (medial wall)"
    fig.text(0.45, 0.03, note, ha="center", fontsize=8, color="#555555")
    return embed(fig, f"{title} ({headline})")

def histogram(series: dict[str, np.ndarray], title: str, xlabel: str) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    values = [np.asarray(v, float)[np.isfinite(v)] for v in series.values()]
    lo = min((v.min() for v in values if v.size), default=0.0)
    hi = max((v.max() for v in values if v.size), default=1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 50)
    for (name, _), v in zip(series.items(), values, strict=True):
        ax.hist(v, bins=bins, alpha=0.6, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("voxels")
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return embed(fig, title)


def scatter(x: np.ndarray, y: np.ndarray, title: str, xlabel: str, ylabel: str, *, diagonal: bool = False) -> str:
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.scatter(x, y, s=3, alpha=0.4, color="#2c6e9b", rasterized=True)
    if diagonal:
        top = float(np.nanmax([np.nanmax(x), np.nanmax(y), 0.1]))
        ax.plot([0, top], [0, top], color="grey", lw=1, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return embed(fig, title)


def lines(curves: dict[str, tuple], title: str, xlabel: str, ylabel: str, *, logx: bool = False,
          marks: dict[str, tuple] | None = None, bands: dict[str, tuple] | None = None) -> str:
    """One line per name: ``curves[name] = (x, y)``; optional points to mark and shaded bands (x, lo, hi)."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, (x, y) in curves.items():
        line, = ax.plot(x, y, marker="o", ms=4, label=name)
        if bands and name in bands:
            bx, lo, hi = bands[name]
            ax.fill_between(bx, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
        if marks and name in marks:
            ax.plot(*marks[name], marker="*", ms=13, color=line.get_color(), ls="none")
    if logx:
        ax.set_xscale("log")
        ticks = np.unique(np.concatenate([np.asarray(x, float) for x, _ in curves.values()]))
        if ticks.size <= 12:  # few sizes (1, 2, 4, ... stories): label them plainly
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=7, loc="best")
    return embed(fig, title)


def bars(labels: list[str], values: np.ndarray, title: str, ylabel: str, errors: np.ndarray | None = None) -> str:
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(labels) + 2), 3.5))
    ax.bar(range(len(labels)), values, yerr=errors, color="#2c6e9b", capsize=3)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.axhline(0, color="grey", lw=0.8)
    return embed(fig, title)


__all__ = ["bars", "brain_map", "embed", "histogram", "lines", "scatter"]

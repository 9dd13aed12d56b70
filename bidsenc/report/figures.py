"""Figures for the reports, returned as self-contained ``<img>`` tags (PNG embedded as base64).

Matplotlib runs headless (Agg); every function closes its figure.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import warnings

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


def brain_map(space, values: np.ndarray, title: str, *, vmax: float | None = None, cmap: str = "inferno") -> str | None:
    """A view of a voxel vector in the data's own space; None when the space has no geometry to draw."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float32))
    vmax = float(vmax if vmax is not None else max(np.percentile(np.abs(values), 99.5), 1e-6))
    with warnings.catch_warnings():  # nilearn's notes on masks and colour maps are not the user's concern
        warnings.simplefilter("ignore", UserWarning)
        return _brain_map(space, values, title, vmax, cmap)


#: At most this many voxels are drawn as bars instead of a map (region or parcel time series).
MAX_BAR_VOXELS = 60


def _brain_map(space, values, title, vmax, cmap) -> str | None:
    if len(values) <= MAX_BAR_VOXELS:  # a handful of regions: slices would be an empty box
        return bars([f"voxel {i}" for i in range(len(values))] if space.kind != "volume" else _voxel_names(space),
                    values, title, "value")
    if space.kind == "volume":
        import nibabel as nib
        from nilearn import plotting

        img = nib.Nifti1Image(space.to_volume(values), space.affine)
        fig = plt.figure(figsize=(11, 3))
        if str(space.name or "").startswith("MNI"):
            plotting.plot_glass_brain(img, figure=fig, title=title, colorbar=True, vmax=vmax, vmin=0,
                                      cmap=cmap, plot_abs=False, threshold=vmax / 10)
        else:  # native space: slices without an anatomical background
            plotting.plot_stat_map(img, bg_img=None, figure=fig, title=title, display_mode="z",
                                   cut_coords=min(7, img.shape[2]), colorbar=True, vmax=vmax, cmap=cmap,
                                   threshold=vmax / 10, black_bg=True, annotate=False)
        return embed(fig, title)
    if space.kind == "surface":
        mesh = _fsaverage_mesh(space.name, space.n_vertices)
        if mesh is None:
            return None
        from nilearn import plotting

        n_left = space.n_vertices[0]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), subplot_kw={"projection": "3d"})
        for ax, hemi, part in ((axes[0], "left", values[:n_left]), (axes[1], "right", values[n_left:])):
            plotting.plot_surf_stat_map(mesh[hemi], part, hemi=hemi, axes=ax, figure=fig, colorbar=hemi == "right",
                                        vmax=vmax, cmap=cmap, threshold=vmax / 10, engine="matplotlib")
        fig.suptitle(title)
        return embed(fig, title)
    return None


def _voxel_names(space) -> list[str]:
    """``i,j,k`` of each voxel of a volume space, in column order."""
    order = space.to_volume(np.arange(1, space.n_voxels + 1, dtype=np.float32))
    names = [""] * space.n_voxels
    for ijk in zip(*np.nonzero(order)):
        names[int(order[ijk]) - 1] = ",".join(str(int(c)) for c in ijk)
    return names


def _fsaverage_mesh(name: str | None, n_vertices) -> dict | None:
    """nilearn's bundled fsaverage5 inflated mesh when the data are on it (nothing is downloaded)."""
    if not name or not str(name).startswith("fsaverage5") or tuple(n_vertices) != (10242, 10242):
        return None
    try:
        from nilearn.datasets import load_fsaverage

        mesh = load_fsaverage("fsaverage5")["inflated"]
        return {"left": mesh.parts["left"], "right": mesh.parts["right"]}
    except Exception as err:  # an older nilearn without the bundled mesh
        log.info("no fsaverage5 mesh to draw surface maps on (%s)", err)
        return None


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

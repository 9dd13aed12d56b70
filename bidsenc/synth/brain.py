"""Where the demo's responses live, and how strongly the stories drive each place.

Two spaces, both from files nilearn ships with its package (nothing is downloaded):

* the MNI152 brain mask resampled to 6 mm (34 x 40 x 33 voxels, 8735 in the brain);
  nilearn's MNI152 template is the asymmetric ICBM152 2009 *release a*, whose
  TemplateFlow name is ``MNI152NLin2009aAsym`` (not fMRIPrep's default, release c);
* the fsaverage5 surface (10242 vertices per hemisphere).

The share of a voxel's variance that the stimulus drives is spatially smooth: Gaussian
blobs at standard MNI coordinates of the language network over a weak floor, scaled by
how much of the voxel is grey matter (white matter, CSF and the medial wall carry noise
alone). The weights that map word features to the response vary smoothly too: each region
has its own tuning, and the mix between them drifts over a few centimetres.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

#: TemplateFlow name of nilearn's MNI152 template (its docstring: "asymmetrical ICBM152 2009, release a").
TEMPLATE = "MNI152NLin2009aAsym"
SURFACE = "fsaverage5"
VOXEL_MM = 6
#: Language-network regions: name, MNI centre (mm) and the driven share of variance at the centre.
LANGUAGE_REGIONS = (
    ("left superior temporal gyrus", (-56, -20, 4), 0.85),
    ("right superior temporal gyrus", (58, -14, 2), 0.8),
    ("left posterior middle temporal gyrus", (-56, -44, 2), 0.75),
    ("left anterior temporal lobe", (-52, 8, -22), 0.6),
    ("left inferior frontal gyrus", (-48, 22, 10), 0.7),
    ("right inferior frontal gyrus", (50, 24, 8), 0.5),
    ("left angular gyrus", (-46, -62, 28), 0.7),
    ("right angular gyrus", (50, -58, 26), 0.6),
    ("precuneus", (-4, -56, 36), 0.6),
    ("medial prefrontal cortex", (-4, 52, 18), 0.55),
    ("left dorsomedial prefrontal cortex", (-8, 40, 46), 0.5),
)
#: Width of each region's blob (full width at half maximum, mm).
BLOB_FWHM_MM = 20.0
#: Driven share of variance in grey matter far from every region: weak, but not nothing.
FLOOR_SHARE = 0.25
#: The highest share anywhere (where blobs overlap).
MAX_SHARE = 0.9
#: Each participant's regions are shifted by this much (sd per axis, mm), as people differ.
CENTRE_JITTER_MM = 3.0
#: Grey-matter probability (nilearn's MNI152 GM template at 6 mm) at or below which a voxel is not
#: driven, and at or above which it is driven fully; the share scales linearly in between, as
#: partial volumes do.
GREY_MATTER = (0.4, 0.6)
#: Width (FWHM, mm) over which the mix of features drifts between places, and how many random
#: tunings it blends: neighbours are tuned alike, distant places differently.
TUNING_FWHM_MM = 30.0
N_TUNINGS = 48
#: Vertices thinner than this (mm) in fsaverage5's thickness map are the medial wall: not driven.
MEDIAL_WALL_MM = 1.0


@dataclass
class Layout:
    """The places of one participant's responses: voxels of a volume, or vertices of a surface."""

    kind: str                     # "volume" or "surface"
    space: str                    # TemplateFlow / FreeSurfer name
    coords: np.ndarray            # [V, 3] MNI mm of each voxel or vertex
    grey: np.ndarray              # [V] 0-1: how much of the place the stimulus can drive (grey matter)
    intensity: np.ndarray         # [V] relative image intensity (0-1), for a brain-like baseline
    mask: np.ndarray | None = None        # volume: 3D bool brain mask
    affine: np.ndarray | None = None      # volume: voxel-to-MNI matrix
    n_vertices: tuple[int, int] | None = None  # surface: vertices per hemisphere (left, right)
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.coords)


@lru_cache(maxsize=1)
def volume_layout() -> Layout:
    """nilearn's MNI152 brain mask at 6 mm, with its grey-matter share and T1 intensity."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_gm_template, load_mni152_template

    mask_img = load_mni152_brain_mask(resolution=VOXEL_MM)
    mask = np.asarray(mask_img.dataobj) > 0
    affine = mask_img.affine.copy()
    ijk = np.argwhere(mask)
    coords = ijk @ affine[:3, :3].T + affine[:3, 3]
    gm = np.asarray(load_mni152_gm_template(resolution=VOXEL_MM).dataobj, dtype=float)[mask]
    low, high = GREY_MATTER
    grey = np.clip((gm - low) / (high - low), 0.0, 1.0)
    t1 = np.asarray(load_mni152_template(resolution=VOXEL_MM).dataobj, dtype=float)[mask]
    return Layout("volume", TEMPLATE, coords, grey, t1 / max(t1.max(), 1e-9), mask=mask, affine=affine)


@lru_cache(maxsize=1)
def surface_layout() -> Layout:
    """fsaverage5, both hemispheres (left then right), each vertex halfway between white and pial."""
    from nilearn.datasets import load_fsaverage, load_fsaverage_data

    meshes = load_fsaverage(SURFACE)
    thickness = load_fsaverage_data(mesh=SURFACE, data_type="thickness")
    coords, cortex, sizes = [], [], []
    for hemi in ("left", "right"):
        # fsaverage lives in MNI305 space, a few mm from MNI152: close enough for blobs 18 mm wide
        mid = (meshes["pial"].parts[hemi].coordinates + meshes["white_matter"].parts[hemi].coordinates) / 2
        coords.append(mid)
        cortex.append((np.asarray(thickness.data.parts[hemi]) >= MEDIAL_WALL_MM).astype(float))
        sizes.append(len(mid))
    coords = np.concatenate(coords)
    # no T1 on a surface: a smooth, plausible intensity varying with depth below the skull
    depth = np.linalg.norm(coords - coords.mean(0), axis=1)
    return Layout("surface", SURFACE, coords, np.concatenate(cortex), 1 - 0.5 * depth / depth.max(),
                  n_vertices=(sizes[0], sizes[1]))


def participant_regions(rng: np.random.Generator) -> list[dict]:
    """The language regions of one participant: centres jittered, peaks as in :data:`LANGUAGE_REGIONS`."""
    return [{"name": name, "centre_mm": [round(float(c), 2) for c in np.add(centre, rng.normal(0, CENTRE_JITTER_MM, 3))],
             "peak_share": peak}
            for name, centre, peak in LANGUAGE_REGIONS]


def _gaussians(coords: np.ndarray, centres: np.ndarray, fwhm_mm: float) -> np.ndarray:
    """[C, V] Gaussian profile (1 at the centre) of each centre over the places."""
    sigma = fwhm_mm / (2 * np.sqrt(2 * np.log(2)))
    d2 = ((coords[None] - centres[:, None]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * sigma**2))


def _blobs(coords: np.ndarray, regions: list[dict]) -> np.ndarray:
    """[R, V] Gaussian profile (1 at the centre) of each region."""
    return _gaussians(coords, np.array([r["centre_mm"] for r in regions]), BLOB_FWHM_MM)


def driven_share(layout: Layout, regions: list[dict]) -> np.ndarray:
    """[V] share of each voxel's variance driven by the stimulus: floor plus blobs, times its grey matter."""
    peaks = np.array([r["peak_share"] for r in regions])
    level = FLOOR_SHARE + ((peaks[:, None] - FLOOR_SHARE) * _blobs(layout.coords, regions)).sum(0)
    return np.minimum(level, MAX_SHARE) * layout.grey


def smooth_weights(layout: Layout, regions: list[dict], n_features: int, rng: np.random.Generator) -> np.ndarray:
    """[F, V] feature weights: each region's own tuning near it, over a mix that drifts smoothly.

    The drifting mix (random tunings at :data:`N_TUNINGS` places, blended over
    :data:`TUNING_FWHM_MM`) varies the features' shares across the brain, as in real data, so
    that no participant's whole brain shares one tuning that a model family happens to miss;
    neighbours stay alike, so a map of how well a model predicts is smooth where the truth is.
    """
    own = rng.normal(0, 1, (len(regions), n_features))
    # the regions' profiles, wider than the blobs so that tuning changes gradually between regions
    profiles = _blobs(layout.coords, regions) ** 0.5
    places = layout.coords[rng.choice(layout.n, N_TUNINGS, replace=False)]
    blend = _gaussians(layout.coords, places, TUNING_FWHM_MM)
    blend /= np.sqrt((blend**2).sum(0, keepdims=True)) + 1e-12  # unit variance everywhere
    weights = own.T @ profiles + rng.normal(0, 1, (n_features, N_TUNINGS)) @ blend
    return weights * (layout.grey > 0)


__all__ = ["BLOB_FWHM_MM", "FLOOR_SHARE", "LANGUAGE_REGIONS", "Layout", "SURFACE", "TEMPLATE", "VOXEL_MM",
           "driven_share", "participant_regions", "smooth_weights", "surface_layout", "volume_layout"]

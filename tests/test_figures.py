"""Surface views in the reports: fsaverage5, the participant's own fMRIPrep surfaces, and the flat fallback."""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest

from bidsenc.bids.bold import Space
from bidsenc.bids.surfaces import find_surface_meshes
from bidsenc.report.figures import brain_map

FS5 = 10242


def _picture(tag: str) -> tuple[np.ndarray, str]:
    """The PNG of an ``<img>`` tag, decoded to RGB in [0, 1], and its alt text."""
    assert tag is not None and tag.startswith("<img")
    alt = html.unescape(re.search(r'alt="([^"]*)"', tag).group(1))
    data = re.search(r'src="data:image/png;base64,([^"]+)"', tag).group(1)
    return mpimg.imread(io.BytesIO(base64.b64decode(data)), format="png")[..., :3], alt


def _quadrants(mask: np.ndarray) -> dict[str, float]:
    """Share of true pixels in each panel of a 2 x 2 surface figure (not the colour bar, at the far right)."""
    height, width = mask.shape
    panels = mask[:, : int(width * 0.88)]
    top, bottom = panels[: height // 2], panels[height // 2:]
    middle = width // 2
    return {"left lateral": top[:, :middle].mean(), "right lateral": top[:, middle:].mean(),
            "left medial": bottom[:, :middle].mean(), "right medial": bottom[:, middle:].mean()}


@pytest.fixture(scope="module")
def fsaverage5_coords():
    from nilearn.datasets import load_fsaverage

    mesh = load_fsaverage("fsaverage5")["inflated"]
    return {hemi: np.asarray(mesh.parts[hemi].coordinates) for hemi in ("left", "right")}


def test_fsaverage5_draws_lateral_and_medial_views_of_both_hemispheres(fsaverage5_coords):
    space = Space("surface", 2 * FS5, "fsaverage5", n_vertices=(FS5, FS5))
    x = fsaverage5_coords["left"][:, 0]
    lateral_left = np.concatenate([(x < np.percentile(x, 30)).astype(np.float32), np.zeros(FS5, np.float32)])

    blank, alt = _picture(brain_map(space, np.zeros(2 * FS5), "model: test r", vmax=1.0))
    signal, _ = _picture(brain_map(space, lateral_left, "model: test r", vmax=1.0))
    assert plt.get_fignums() == []  # every figure closed
    assert alt == ("model: test r (lateral and medial views on fsaverage5 inflated (nilearn's bundled mesh), "
                   "sulcal depth beneath)")

    # four panels of mesh: each quadrant holds a hemisphere (grey sulcal depth on white)
    drawn = _quadrants(blank.min(axis=2) < 0.9)
    assert all(share > 0.1 for share in drawn.values()), drawn

    # the map changes the picture where the lateral left hemisphere is, and nowhere on the right
    assert signal.shape == blank.shape
    changed = _quadrants(np.abs(signal - blank).max(axis=2) > 0.1)
    assert changed["left lateral"] > 0.05, changed
    assert changed["right lateral"] == 0 and changed["right medial"] == 0, changed
    assert changed["left medial"] < changed["left lateral"] / 4, changed
    colourful = np.ptp(signal, axis=2) > 0.3  # inferno's yellow, not the grey mesh
    assert _quadrants(colourful)["left lateral"] > 0.05


def test_fsaverage_with_a_density_entity_and_different_values_draw_differently(fsaverage5_coords):
    """fMRIPrep names fsaverage5 ``space-fsaverage_den-10k``; another map gives another picture."""
    space = Space("surface", 2 * FS5, "fsaverage", n_vertices=(FS5, FS5))
    rng = np.random.default_rng(0)
    first, alt = _picture(brain_map(space, rng.random(2 * FS5), "r"))
    second, _ = _picture(brain_map(space, rng.random(2 * FS5), "r"))
    assert "fsaverage5 inflated" in alt
    assert first.shape == second.shape and np.abs(first - second).max() > 0.2


def test_medial_wall_without_values_is_left_unpainted(fsaverage5_coords):
    """NaN (no grayordinate) draws as the bare mesh, exactly as values under the threshold do."""
    space = _CiftiStandIn(name="fsaverage", n_vertices=(FS5, FS5), medial=np.arange(0, FS5, 7))
    values = np.full(space.n_voxels, 0.5, np.float32)
    with_nan, _ = _picture(brain_map(space, values, "r", vmax=1.0))
    zeroed = _SurfaceStandIn(name="fsaverage", n_vertices=(FS5, FS5))
    parts = space.surface_parts(values)
    zeros_for_nan = np.nan_to_num(np.concatenate([parts["left"], parts["right"]]))
    unpainted, _ = _picture(brain_map(zeroed, zeros_for_nan, "r", vmax=1.0))
    assert with_nan.shape == unpainted.shape and np.array_equal(with_nan, unpainted)


# --- the participant's own surfaces -------------------------------------------------------------------


def _icosphere(subdivisions: int, radius: float = 50.0) -> tuple[np.ndarray, np.ndarray]:
    """A closed, consistently wound sphere: 12, 42, 162, 642 ... vertices."""
    t = (1 + 5 ** 0.5) / 2
    vertices = [np.array(v, float) for v in ((-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t),
                                             (0, 1, t), (0, -1, -t), (0, 1, -t), (t, 0, -1), (t, 0, 1),
                                             (-t, 0, -1), (-t, 0, 1))]
    vertices = [v / np.linalg.norm(v) for v in vertices]
    faces = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2),
             (10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5),
             (2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1)]
    for _ in range(subdivisions):
        middle: dict[tuple[int, int], int] = {}

        def between(a, b):
            key = (min(a, b), max(a, b))
            if key not in middle:
                v = vertices[a] + vertices[b]
                vertices.append(v / np.linalg.norm(v))
                middle[key] = len(vertices) - 1
            return middle[key]

        new = []
        for a, b, c in faces:
            ab, bc, ca = between(a, b), between(b, c), between(c, a)
            new += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
        faces = new
    return np.array(vertices, np.float32) * radius, np.array(faces, np.int32)


def _write_surface(path: Path, coords: np.ndarray, faces: np.ndarray) -> Path:
    import nibabel as nib

    gii = nib.gifti.GiftiImage(darrays=[
        nib.gifti.GiftiDataArray(coords.astype(np.float32), intent="NIFTI_INTENT_POINTSET", datatype="float32"),
        nib.gifti.GiftiDataArray(faces.astype(np.int32), intent="NIFTI_INTENT_TRIANGLE", datatype="int32")])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(gii, path)
    return path


def _write_shape(path: Path, values: np.ndarray) -> Path:
    import nibabel as nib

    gii = nib.gifti.GiftiImage(darrays=[
        nib.gifti.GiftiDataArray(values.astype(np.float32), intent="NIFTI_INTENT_SHAPE", datatype="float32")])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(gii, path)
    return path


@pytest.fixture
def fmriprep(tmp_path):
    """fMRIPrep-like outputs of sub-01: native surfaces (162 vertices), fsLR ones (42), a BOLD run in ses-1."""
    root = tmp_path / "fmriprep" / "sub-01"
    func = root / "ses-1" / "func"
    func.mkdir(parents=True)
    bold = [func / f"sub-01_ses-1_task-story_hemi-{h}_space-fsnative_bold.func.gii" for h in "LR"]
    for path in bold:
        path.touch()
    native, fslr = _icosphere(2), _icosphere(1)
    for h, shift in (("L", -60.0), ("R", 60.0)):
        _write_surface(root / "anat" / f"sub-01_hemi-{h}_inflated.surf.gii", native[0] + [shift, 0, 0],
                       native[1])
        _write_surface(root / "anat" / f"sub-01_hemi-{h}_pial.surf.gii", native[0] * 0.8, native[1])
        _write_shape(root / "anat" / f"sub-01_hemi-{h}_sulc.shape.gii", native[0][:, 2] / 50)
        _write_surface(root / "anat" / f"sub-01_hemi-{h}_space-fsLR_den-32k_midthickness.surf.gii", *fslr)
        # a registration sphere: not a surface to draw on
        _write_surface(root / "anat" / f"sub-01_hemi-{h}_desc-reg_sphere.surf.gii", *native)
    (root / "anat" / "sub-01_hemi-L_white.surf.gii").write_text("not a surface")
    return {"root": root, "bold": bold, "native": native, "fslr": fslr}


def test_own_surfaces_found_by_space_and_vertex_count(fmriprep):
    anat = fmriprep["root"] / "anat"
    found = find_surface_meshes(fmriprep["bold"], (162, 162), "fsnative")
    assert found == {"left": anat / "sub-01_hemi-L_inflated.surf.gii",
                     "right": anat / "sub-01_hemi-R_inflated.surf.gii", "kind": "inflated",
                     "sulc_left": anat / "sub-01_hemi-L_sulc.shape.gii",
                     "sulc_right": anat / "sub-01_hemi-R_sulc.shape.gii"}

    fslr = find_surface_meshes(fmriprep["bold"], (42, 42), "fsLR")
    assert fslr["kind"] == "midthickness"
    assert fslr["left"].name == "sub-01_hemi-L_space-fsLR_den-32k_midthickness.surf.gii"
    assert "sulc_left" not in fslr  # the native sulcal depth has other vertices

    assert find_surface_meshes(fmriprep["bold"], (100, 100), "fsnative") is None  # no surface with these counts
    assert find_surface_meshes(fmriprep["bold"], (162, 162), "fsLR") is None  # native counts, not fsLR surfaces
    assert find_surface_meshes(fmriprep["bold"], (42, 42), "fsnative") is None  # fsLR surfaces are not native


def test_own_surfaces_prefer_inflated_then_midthickness_then_pial_and_the_session(fmriprep):
    anat = fmriprep["root"] / "anat"
    for h in "LR":
        (anat / f"sub-01_hemi-{h}_inflated.surf.gii").unlink()
    found = find_surface_meshes(fmriprep["bold"], (162, 162), None)
    assert found["kind"] == "pial" and found["right"].name == "sub-01_hemi-R_pial.surf.gii"

    session_anat = fmriprep["root"] / "ses-1" / "anat"
    for h in "LR":
        _write_surface(session_anat / f"sub-01_ses-1_hemi-{h}_midthickness.surf.gii", *fmriprep["native"])
    found = find_surface_meshes(fmriprep["bold"], (162, 162), "fsnative")
    assert found["kind"] == "midthickness" and found["left"].parent == session_anat

    only_left = find_surface_meshes(fmriprep["bold"], (162, 0), "fsnative")
    assert set(only_left) == {"left", "kind"}


def test_own_surfaces_draw_the_map_when_their_counts_match(fmriprep):
    native = fmriprep["native"][0]
    space = Space("surface", 324, "fsnative", n_vertices=(162, 162))
    meshes = find_surface_meshes(fmriprep["bold"], space.n_vertices, space.name)
    values = np.concatenate([(native[:, 1] > 0).astype(np.float32), np.zeros(162, np.float32)])

    picture, alt = _picture(brain_map(space, values, "r", vmax=1.0, meshes=meshes))
    assert "the participant's surfaces sub-01_hemi-L_inflated.surf.gii" in alt and "lateral and medial" in alt
    blank, _ = _picture(brain_map(space, np.zeros(324), "r", vmax=1.0, meshes=meshes))
    changed = _quadrants(np.abs(picture - blank).max(axis=2) > 0.1)
    assert changed["left lateral"] > 0.02 and changed["left medial"] > 0.02, changed
    assert changed["right lateral"] == 0 and changed["right medial"] == 0, changed

    # meshes of other vertex counts are not drawn on: the vertices are shown as what they are
    other = {"left": meshes["left"], "right": fmriprep["root"] / "anat" /
             "sub-01_hemi-R_space-fsLR_den-32k_midthickness.surf.gii"}
    _, alt = _picture(brain_map(space, values, "r", meshes=other))
    assert "no mesh to draw on" in alt
    missing = {"left": "/nonexistent.surf.gii", "right": "/no.gii"}
    _, alt = _picture(brain_map(space, values, "r", meshes=missing))
    assert "no mesh to draw on" in alt
    assert plt.get_fignums() == []


def test_an_open_mesh_is_drawn_whole(tmp_path):
    """A surface that is not closed (a patch) has no back to leave out: every face is drawn."""
    from bidsenc.report.figures import _read_mesh

    grid = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0)), -1).reshape(-1, 2)
    coords = np.column_stack([np.zeros(100), grid])  # a flat patch facing along x
    faces = np.array([(i * 10 + j, i * 10 + j + 1, i * 10 + j + 10) for i in range(9) for j in range(9)]
                     + [(i * 10 + j + 1, i * 10 + j + 11, i * 10 + j + 10) for i in range(9) for j in range(9)])
    mesh = _read_mesh(_write_surface(tmp_path / "patch.surf.gii", coords, faces))
    assert mesh.facing_x is None and len(mesh.faces_towards(1.0)) == len(mesh.faces_towards(-1.0)) == len(faces)
    sphere = _read_mesh(_write_surface(tmp_path / "sphere.surf.gii", *_icosphere(2)))
    seen = sphere.faces_towards(-1.0)
    assert len(seen) < 0.7 * len(sphere.faces)
    assert (sphere.coords[seen].mean(axis=1)[:, 0] < 10).all()  # the half of the sphere facing -x


# --- CIFTI: cortex vertices with a medial wall ------------------------------------------------------------


@dataclass
class _CiftiStandIn:
    """What brain_map uses of a CIFTI space: grayordinates = cortex vertices off the medial wall + subcortex."""

    name: str
    n_vertices: tuple[int, int]
    medial: np.ndarray  # vertices of each hemisphere without a grayordinate
    n_subcortical: int = 500
    kind: str = "cifti"

    def _cortex(self, n):
        return np.setdiff1d(np.arange(n), self.medial)

    @property
    def n_voxels(self) -> int:
        return sum(len(self._cortex(n)) for n in self.n_vertices) + self.n_subcortical

    def surface_parts(self, values):
        values = np.asarray(values, np.float32)
        parts, start = {}, 0
        for hemi, n in zip(("left", "right"), self.n_vertices, strict=True):
            part = np.full(n, np.nan, np.float32)
            cortex = self._cortex(n) if n else np.array([], int)
            part[cortex] = values[start:start + len(cortex)]
            start += len(cortex)
            parts[hemi] = part
        return parts


@dataclass
class _SurfaceStandIn:
    name: str
    n_vertices: tuple[int, int]
    kind: str = "surface"

    @property
    def n_voxels(self) -> int:
        return sum(self.n_vertices)


def test_fslr_without_a_mesh_is_drawn_as_vertices_in_index_order():
    space = _CiftiStandIn(name="fsLR", n_vertices=(32492, 32492), medial=np.arange(3000, 5796))
    values = np.zeros(space.n_voxels, np.float32)
    n_left = 32492 - 2796
    values[:n_left] = np.linspace(0, 1, n_left)  # signal on the left cortex only
    values[-space.n_subcortical:] = 5.0  # subcortical voxels are not part of the cortex picture
    tag = brain_map(space, values, "model: test r", vmax=1.0)
    picture, alt = _picture(tag)
    assert alt == "model: test r (fsLR 32k vertices in index order: no mesh to draw on)"
    assert picture.shape[0] > 150 and picture.shape[1] > 300
    blank, _ = _picture(brain_map(space, np.zeros_like(values), "model: test r", vmax=1.0))
    changed = np.abs(picture - blank).max(axis=2) > 0.1
    middle = picture.shape[1] // 2
    assert changed[:, :middle].mean() > 0.1 and changed[:, middle:int(0.88 * picture.shape[1])].mean() == 0
    assert plt.get_fignums() == []


def test_fslr_drawn_on_the_participants_fslr_surfaces_and_one_hemisphere_alone(fmriprep):
    space = _CiftiStandIn(name="fsLR", n_vertices=(42, 42), medial=np.arange(5))
    meshes = find_surface_meshes(fmriprep["bold"], space.n_vertices, space.name)
    _, alt = _picture(brain_map(space, np.linspace(0, 1, space.n_voxels), "r", meshes=meshes))
    assert "space-fsLR_den-32k_midthickness" in alt and "lateral and medial" in alt

    left_only = _CiftiStandIn(name="fsLR", n_vertices=(42, 0), medial=np.arange(5))
    meshes = find_surface_meshes(fmriprep["bold"], left_only.n_vertices, left_only.name)
    picture, alt = _picture(brain_map(left_only, np.linspace(0, 1, left_only.n_voxels), "r", meshes=meshes))
    assert "sub-01_hemi-L_space-fsLR" in alt and "hemi-R" not in alt
    _, alt = _picture(brain_map(left_only, np.linspace(0, 1, left_only.n_voxels), "r"))
    assert "no mesh to draw on" in alt


def test_surface_data_on_an_unknown_mesh_is_not_passed_off_as_anatomy():
    space = Space("surface", 2 * 40962, "fsaverage6", n_vertices=(40962, 40962))
    _, alt = _picture(brain_map(space, np.random.default_rng(0).random(space.n_voxels), "r"))
    assert alt == "r (fsaverage6 vertices in index order: no mesh to draw on)"

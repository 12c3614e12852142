"""Random views of a real scan: field of view, affine + elastic deformation, and CT degradations.

A *view* is a new image grid (RAS axes, the model's 1.5 x 1.5 x 2.0 mm spacing) placed somewhere
in the scan (on the spleen, anywhere in the body, or away from the spleen) and deformed: every
output voxel ``p`` (mm, centred on the view) is read from the scan at
``centre + A @ p + d(p)`` with ``A`` a random rotation and (anisotropic) scaling and ``d`` a
smooth random displacement field. Images are read with linear, label maps with nearest
interpolation, straight from the scan's own grid (one interpolation only).

The left-right axis is never mirrored: the spleen stays on the patient's left (RAS -x).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from .sources import Scan, body_mask

AIR_HU = -1024.0
MODES = ("spleen", "body", "away")


@dataclass(frozen=True)
class ViewSettings:
    """Ranges of the random views.

    Attributes:
        spacing: output voxel size (mm), the model's grid.
        fov_x / fov_y / fov_z: field of view ranges (mm); z is clipped to the scan's extent.
        rotate_deg: maximum rotation about x, y, z (degrees).
        scale: isotropic scale range (1.2 = anatomy read from a 1.2x larger region: looks smaller).
        aniso: extra per-axis scale jitter (+-).
        elastic_mm: standard deviation range of the displacement (mm).
        elastic_grid_mm: spacing of the random displacement control points (mm).
        mode_p: probabilities of placing the view on the spleen, anywhere in the body, away from it.
    """

    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)
    fov_x: tuple[float, float] = (200.0, 330.0)
    fov_y: tuple[float, float] = (160.0, 260.0)
    fov_z: tuple[float, float] = (64.0, 220.0)
    rotate_deg: tuple[float, float, float] = (8.0, 8.0, 15.0)
    scale: tuple[float, float] = (0.85, 1.2)
    aniso: float = 0.07
    elastic_mm: tuple[float, float] = (0.0, 7.0)
    elastic_grid_mm: float = 40.0
    mode_p: tuple[float, float, float] = (0.55, 0.25, 0.20)


@dataclass
class View:
    """A sampled view: output shape, linear map and centre, displacement, and why it was placed."""

    shape: tuple[int, int, int]
    matrix: np.ndarray  # (3, 3) output mm offset -> scan mm offset (rotation @ scale)
    centre: np.ndarray  # (3,) RAS mm in the scan
    displacement: np.ndarray | None  # (3, X, Y, Z) float32 mm, or None
    mode: str

    def affine(self, spacing: tuple[float, float, float]) -> np.ndarray:
        """Voxel-to-RAS affine of the written subject: axis-aligned, centred where it was read."""
        aff = np.diag([*spacing, 1.0])
        aff[:3, 3] = self.centre - 0.5 * (np.asarray(self.shape) - 1) * np.asarray(spacing)
        return aff


def _ras_extent(scan: Scan) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array(
        [
            [a, b, c]
            for a in (0, scan.image.shape[0] - 1)
            for b in (0, scan.image.shape[1] - 1)
            for c in (0, scan.image.shape[2] - 1)
        ],
        dtype=float,
    )
    ras = corners @ scan.image.affine[:3, :3].T + scan.image.affine[:3, 3]
    return ras.min(0), ras.max(0)


def _voxels_ras(scan: Scan, mask: np.ndarray, rng: np.random.Generator, n: int = 1) -> np.ndarray:
    idx = np.argwhere(mask)
    pick = idx[rng.integers(len(idx), size=n)]
    return pick @ scan.image.affine[:3, :3].T + scan.image.affine[:3, 3]


def choose_centre(scan: Scan, mode: str, fov: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A view centre (RAS mm) for ``mode``; "away" falls back to "body" when the scan has no room.

    "away" views hold no spleen: wholly below it (lower abdomen, pelvis), above it (chest, heart)
    or on the patient's right of it.
    """
    body = body_mask(scan.image.array)
    spleen = scan.spleen
    if mode == "spleen" and spleen.any():
        centre = _voxels_ras(scan, spleen, rng)[0] + rng.uniform(-1, 1, 3) * np.array([50.0, 50.0, 40.0])
        return centre, mode
    if mode == "away" and spleen.any():
        idx = np.argwhere(spleen)
        ras = idx @ scan.image.affine[:3, :3].T + scan.image.affine[:3, 3]
        lo, hi = ras.min(0), ras.max(0)
        grid = np.argwhere(body[::4, ::4, ::4]) * 4
        cand = grid @ scan.image.affine[:3, :3].T + scan.image.affine[:3, 3]
        below = cand[:, 2] + fov[2] / 2 + 10 < lo[2]  # the whole view below the spleen (pelvis)
        above = cand[:, 2] - fov[2] / 2 - 10 > hi[2]  # the whole view above it (chest, heart)
        right = cand[:, 0] - fov[0] / 2 - 10 > hi[0]  # the whole view on the patient's right (RAS +x)
        ok = cand[below | above | right]
        if len(ok):
            return ok[rng.integers(len(ok))], mode
        mode = "body"
    return _voxels_ras(scan, body, rng)[0], "body"


def draw_view(
    scan: Scan, rng: np.random.Generator, settings: ViewSettings = ViewSettings(), mode: str | None = None
) -> View:
    """Draw a random view of ``scan`` (see the module docstring)."""
    if mode is None:
        mode = str(rng.choice(MODES, p=np.asarray(settings.mode_p) / sum(settings.mode_p)))
    lo, hi = _ras_extent(scan)
    scan_z = float(hi[2] - lo[2]) + float(abs(scan.image.affine[2, 2]))
    fov = np.array(
        [
            rng.uniform(*settings.fov_x),
            rng.uniform(*settings.fov_y),
            min(rng.uniform(*settings.fov_z), max(scan_z * 1.1, 32.0)),
        ]
    )
    centre, mode = choose_centre(scan, mode, fov, rng)
    # keep the view's centre inside the scan in z (a thin scan stays a thin slab)
    centre[2] = np.clip(centre[2], lo[2] + min(fov[2], scan_z) / 2 - 2, hi[2] - min(fov[2], scan_z) / 2 + 2)
    shape = tuple(int(max(16, round(f / s))) for f, s in zip(fov, settings.spacing))
    angles = np.radians(rng.uniform(-1, 1, 3) * np.asarray(settings.rotate_deg))
    scale = rng.uniform(*settings.scale) * (1.0 + rng.uniform(-settings.aniso, settings.aniso, 3))
    matrix = Rotation.from_euler("xyz", angles).as_matrix() @ np.diag(scale)
    displacement = _elastic(shape, settings, rng)
    return View(shape, matrix, centre, displacement, mode)  # type: ignore[arg-type]


def _elastic(shape: tuple[int, int, int], settings: ViewSettings, rng: np.random.Generator) -> np.ndarray | None:
    sd = rng.uniform(*settings.elastic_mm)
    if sd < 0.5:
        return None
    extent = np.asarray(shape) * np.asarray(settings.spacing)
    coarse = tuple(int(max(2, np.ceil(e / settings.elastic_grid_mm) + 1)) for e in extent)
    out = np.empty((3, *shape), dtype=np.float32)
    for axis in range(3):
        ctrl = ndimage.gaussian_filter(rng.normal(0.0, 1.0, coarse), 0.7)
        ctrl *= sd / max(float(ctrl.std()), 1e-6)
        out[axis] = ndimage.zoom(ctrl, np.asarray(shape) / np.asarray(coarse), order=1, mode="nearest", grid_mode=True)[
            : shape[0], : shape[1], : shape[2]
        ]
    return out


def source_coordinates(view: View, scan_affine: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """(3, X, Y, Z) float32 voxel indices in the scan for every output voxel of ``view``."""
    inv = np.linalg.inv(scan_affine)
    lin = inv[:3, :3] @ view.matrix  # output mm offset -> scan index offset
    offset = inv[:3, :3] @ view.centre + inv[:3, 3]
    axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * s for n, s in zip(view.shape, spacing)]
    coords = np.empty((3, *view.shape), dtype=np.float32)
    for k in range(3):
        coords[k] = (
            lin[k, 0] * axes[0][:, None, None]
            + lin[k, 1] * axes[1][None, :, None]
            + lin[k, 2] * axes[2][None, None, :]
            + offset[k]
        )
    if view.displacement is not None:
        d = inv[:3, :3] @ view.matrix  # displacements are drawn in output mm, deformed like the grid
        for k in range(3):
            coords[k] += (
                d[k, 0] * view.displacement[0] + d[k, 1] * view.displacement[1] + d[k, 2] * view.displacement[2]
            )
    return coords


def sample_view(scan: Scan, view: View, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Read the scan through ``view``.

    Returns:
        ((X, Y, Z) float32 HU, air outside the scan; (X, Y, Z) int16 label map, 0 outside).
    """
    coords = source_coordinates(view, scan.image.affine, spacing)
    hu = ndimage.map_coordinates(scan.image.array, coords, order=1, mode="constant", cval=AIR_HU, prefilter=False)
    labels = ndimage.map_coordinates(scan.labels, coords, order=0, mode="constant", cval=0, prefilter=False)
    return hu.astype(np.float32), labels.astype(np.int16)


def degrade(hu: np.ndarray, rng: np.random.Generator, spacing: tuple[float, float, float]) -> tuple[np.ndarray, dict]:
    """Scanner variation: slice thickness, blur, gain/offset, white and correlated noise.

    Returns:
        (HU image, dict of what was applied).
    """
    done: dict[str, float] = {}
    if rng.random() < 0.35:  # thick slices: average along z over the slice thickness
        thickness = rng.uniform(3.0, 5.0)
        width = max(2, round(thickness / spacing[2]))
        hu = ndimage.uniform_filter1d(hu, width, axis=2, mode="nearest")
        done["slice_mm"] = round(thickness, 1)
    if rng.random() < 0.4:
        sigma = rng.uniform(0.3, 1.0)
        hu = ndimage.gaussian_filter(hu, (sigma, sigma, 0.3))
        done["blur_vox"] = round(sigma, 2)
    if rng.random() < 0.8:
        gain, offset = rng.uniform(0.93, 1.07), rng.uniform(-15.0, 15.0)
        hu = hu * gain + offset
        done.update(gain=round(gain, 3), offset=round(offset, 1))
    noise_sd = rng.uniform(0.0, 22.0)
    if noise_sd > 1.0:
        white = rng.standard_normal(hu.shape, dtype=np.float32)
        corr = ndimage.gaussian_filter(white, 0.8)
        corr /= max(float(corr.std()), 1e-6)
        mix = rng.uniform(0.0, 1.0)
        hu = hu + noise_sd * (np.sqrt(1 - mix) * white + np.sqrt(mix) * corr)
        done["noise_hu"] = round(noise_sd, 1)
    return hu.astype(np.float32), done

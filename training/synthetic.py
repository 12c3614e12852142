"""CT-like abdominal phantoms written as an MSD task (``imagesTr``, ``labelsTr``, ``dataset.json``).

Each phantom is drawn in physical RAS millimetres (x towards the patient's right, y anterior,
z superior: RAS+, as in NIfTI and Slicer) and sampled on a grid of its own spacing, then stored in one of several
orientations (RAS, LPS, LAS, or with permuted axes), so readers must use the affine.
Tissues in HU: air -1000, fat -100, muscle 50, soft tissue/bowel 30, bowel gas -900, liver 95
(patient's right), kidneys 150, spleen 120 (patient's LEFT; varying shape, size, position and
tilt), vertebrae and ribs 250-700. Gaussian noise and a slight blur make it CT-like.

Command line: ``python -m training.synthetic --out DIR --cases 12 --seed 0``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from vnetseg.io import write_nifti

from .data import write_dataset_json

ORIENTATIONS = ("RAS", "LPS", "LAS", "RAS", "PLS", "LPS")


@dataclass(frozen=True)
class PhantomSettings:
    """Size and variability of the phantoms.

    Attributes:
        spacing_range: in-plane voxel size range in mm.
        slice_range: slice spacing range in mm.
        fov_mm: field of view (x, y, z) in mm.
        noise_hu: standard deviation of the Gaussian noise in HU.
    """

    spacing_range: tuple[float, float] = (3.0, 4.0)
    slice_range: tuple[float, float] = (3.0, 5.0)
    fov_mm: tuple[float, float, float] = (340.0, 260.0, 220.0)
    noise_hu: float = 15.0


def _ellipsoid(x, y, z, centre, radii) -> np.ndarray:
    return sum(((c - m) / r) ** 2 for c, m, r in zip((x, y, z), centre, radii)) <= 1.0


def _spleen(x, y, z, rng: np.random.Generator) -> np.ndarray:
    """A tilted, bean-shaped ellipsoid on the patient's left (RAS x < 0), posterior-lateral."""
    x = -x  # drawn in a mirrored frame: the shape below is placed at +x there, -x here
    centre = np.array([rng.uniform(70, 95), rng.uniform(-45, -10), rng.uniform(10, 50)])
    radii = np.array([rng.uniform(20, 32), rng.uniform(35, 55), rng.uniform(35, 60)])
    angle = np.radians(rng.uniform(-40, 10))  # tilt in the axial plane
    u = np.cos(angle) * (x - centre[0]) + np.sin(angle) * (y - centre[1])
    v = -np.sin(angle) * (x - centre[0]) + np.cos(angle) * (y - centre[1])
    w = z - centre[2]
    bend = rng.uniform(0.0, 0.012)  # crescent: the medial surface is concave
    u = u + bend * v**2
    wobble = 1.0 + 0.12 * np.sin(rng.uniform(1.5, 3.0) * np.arctan2(v, w) + rng.uniform(0, 6.3))
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (w / radii[2]) ** 2 <= wobble**2


def phantom(
    shape: tuple[int, int, int], affine: np.ndarray, rng: np.random.Generator, noise_hu: float = 15.0
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one phantom on the RAS grid ``affine`` (voxel -> RAS mm, axis-aligned).

    Returns:
        ((I, J, K) float32 HU image, (I, J, K) uint8 label: 1 = spleen).
    """
    idx = [np.arange(n, dtype=np.float32) for n in shape]
    x = (affine[0, 0] * idx[0] + affine[0, 3])[:, None, None]
    y = (affine[1, 1] * idx[1] + affine[1, 3])[None, :, None]
    z = (affine[2, 2] * idx[2] + affine[2, 3])[None, None, :]
    hu = np.full(shape, -1000.0, dtype=np.float32)
    a, b = rng.uniform(130, 155), rng.uniform(95, 115)
    ring = lambda da: ((x / (a - da)) ** 2 + ((y + 0) / (b - da)) ** 2 <= 1.0) & (z < 1e9)
    body, inner_fat, inner_muscle = ring(0.0), ring(rng.uniform(10, 20)), ring(rng.uniform(25, 32))
    hu[body] = -100.0  # subcutaneous fat
    hu[inner_fat] = 50.0  # abdominal wall muscle
    hu[inner_muscle] = float(rng.choice([-80.0, 0.0]))  # visceral fat or mixed tissue
    inside = np.broadcast_to(inner_muscle, shape)
    soft = _ellipsoid(x, y, z, (0, 10, 0), (a - 45, b - 35, 400)) & inside
    hu[soft] = 30.0
    for _ in range(int(rng.integers(6, 12))):  # bowel loops with gas
        c = (rng.uniform(-70, 60), rng.uniform(0, 60), rng.uniform(-90, 60))
        loop = _ellipsoid(x, y, z, c, rng.uniform(10, 25, size=3)) & inside
        hu[loop] = 20.0
        hu[_ellipsoid(x, y, z, c, rng.uniform(4, 9, size=3)) & inside] = -900.0
    zl = rng.uniform(10, 40)
    liver = _ellipsoid(x, y, z, (60 + rng.uniform(-10, 10), 5, zl), (70, 75, 75))  # patient's right: +x
    hu[liver & inside] = 95.0
    for side in (-1, 1):  # kidneys
        hu[_ellipsoid(x, y, z, (side * 65, -45, zl - 60 + rng.uniform(-10, 10)), (22, 22, 50)) & inside] = 150.0
    hu[_ellipsoid(x, y, z, (-rng.uniform(20, 40), 20, zl + 20), (35, 30, 30)) & inside] = 25.0  # stomach (left)
    spleen = _spleen(x, y, z, rng) & inside
    spleen &= ~_ellipsoid(x, y, z, (0, -60, 0), (28, 28, 1000))  # never through the spine
    hu[spleen] = 120.0
    for side in (-1, 1):  # psoas muscles
        hu[_ellipsoid(x, y, z, (side * 35, -60, -80), (18, 18, 70))] = 50.0
    spine = _ellipsoid(x, y, z, (0, -60, 0), (20, 20, 1000)) & np.broadcast_to(np.cos(z * 2 * np.pi / 30) > -0.6, shape)
    hu[spine] = 250.0
    hu[_ellipsoid(x, y, z, (0, -60, 0), (13, 13, 1000)) & spine] = 400.0
    theta = np.arctan2(y / b, x / a)
    rib_ring = ring(rng.uniform(18, 24)) & ~ring(rng.uniform(26, 30))
    ribs = rib_ring & (np.cos(z * 2 * np.pi / 40) > 0.6) & (np.abs(np.sin(theta)) < 0.95) & (z > -40)
    hu[np.broadcast_to(ribs, shape)] = 700.0
    label = (hu == 120.0) & np.broadcast_to(spleen, shape)
    hu = ndimage.gaussian_filter(hu, 0.6)
    hu += rng.normal(0.0, noise_hu, size=shape).astype(np.float32)
    return hu.astype(np.float32), label.astype(np.uint8)


def reorient(array: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """Store a RAS-ordered (array, affine) with axis codes ``codes`` (same physical image)."""
    ornt = nib.orientations
    transform = ornt.ornt_transform(ornt.axcodes2ornt("RAS"), ornt.axcodes2ornt(tuple(codes)))
    out = ornt.apply_orientation(array, transform)
    return np.ascontiguousarray(out), affine @ ornt.inv_ornt_aff(transform, array.shape)


def make_case(
    rng: np.random.Generator, settings: PhantomSettings, orientation: str = "RAS"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom: (HU image, label, affine), stored in ``orientation``."""
    s_in = rng.uniform(*settings.spacing_range)
    spacing = np.array([s_in, s_in, rng.uniform(*settings.slice_range)])
    shape = tuple(round(f / s) for f, s in zip(settings.fov_mm, spacing))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -0.5 * (np.array(shape) - 1) * spacing + rng.uniform(-10, 10, size=3)
    image, label = phantom(shape, affine, rng, settings.noise_hu)  # type: ignore[arg-type]
    image, aff2 = reorient(image, affine, orientation)
    label, _ = reorient(label, affine, orientation)
    return image, label, aff2


def write_synthetic_task(
    out: str | Path, cases: int = 12, seed: int = 0, settings: PhantomSettings | None = None
) -> Path:
    """Write ``cases`` phantoms as an MSD task in ``out`` (created; must not hold a dataset.json)."""
    root = Path(out)
    if (root / "dataset.json").exists():
        raise FileExistsError(f"{root} already holds a dataset.json; choose an empty --out folder")
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    settings = settings or PhantomSettings()
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    pairs = []
    for n in range(cases):
        rng = np.random.default_rng([seed, n])
        image, label, affine = make_case(rng, settings, ORIENTATIONS[n % len(ORIENTATIONS)])
        name = f"phantom_{n:03d}.nii.gz"
        write_nifti(root / "imagesTr" / name, np.round(image).astype(np.int16), affine)
        write_nifti(root / "labelsTr" / name, label, affine)
        pairs.append((f"./imagesTr/{name}", f"./labelsTr/{name}"))
    write_dataset_json(root, pairs, {0: "background", 1: "spleen"}, name="SyntheticSpleen",
                       description=f"CT-like abdominal phantoms (training.synthetic, seed {seed})")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (an MSD task is written into it)")
    parser.add_argument("--cases", type=int, default=12, help="number of phantoms (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    try:
        root = write_synthetic_task(args.out, args.cases, args.seed)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.cases} phantoms to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Make the benchmark CT: a real CT resampled to a typical clinical grid, cached outside git.

The default grid is 512x512x120 voxels at 0.8x0.8x2.5 mm (a typical abdominal CT). It is made
by trilinear resampling of the real ``example_ct.nii.gz`` (3 mm isotropic, from
``../shared/data/ct`` or ``$VNETSEG_CT_DIR``). The new grid shares the source's axes; it is
centred on the source in x and y (the wider field of view is filled with air, -1024 HU) and
aligned with the top of the source in z (where the spleen is). Where the new grid is longer than
the source in z (e.g. the 600-slice memory case) the body is mirrored beyond the scan's ends, so
every slice holds anatomy. Without the shared data a synthetic CT (an ellipsoid body with
organ-like blobs and noise) is made instead, and the file name says so.

Usage:
    python bench/make_ct.py --shape 512 512 120 --spacing 0.8 0.8 2.5
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEFAULT_CACHE = BENCH / ".cache"
AIR_HU = -1024.0


def shared_ct_dir() -> Path:
    """``$VNETSEG_CT_DIR`` or ``../shared/data/ct`` next to the checkout."""
    env = os.environ.get("VNETSEG_CT_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data" / "ct"


def _target_affine(src_affine: np.ndarray, src_shape: tuple[int, ...], shape: tuple[int, int, int],
                   spacing: tuple[float, float, float]) -> np.ndarray:
    """Affine of the new grid: source axes, centred in x/y, top-aligned in z (all in the source's frame)."""
    src_sp = np.linalg.norm(src_affine[:3, :3], axis=0)
    axes = src_affine[:3, :3] / src_sp  # unit direction columns
    src_len = np.asarray(src_shape, float) * src_sp
    tgt_len = np.asarray(shape, float) * np.asarray(spacing)
    # start of the new grid's outer edge, in mm along each source axis, from the source's outer edge
    start = (src_len - tgt_len) / 2.0
    start[2] = src_len[2] - tgt_len[2] if tgt_len[2] <= src_len[2] else (src_len[2] - tgt_len[2]) / 2.0
    centre0 = start + 0.5 * np.asarray(spacing)  # first voxel centre, mm from the source's outer edge
    origin_mm = centre0 - 0.5 * src_sp  # ... and from the source's first voxel centre
    aff = np.eye(4)
    aff[:3, :3] = axes * np.asarray(spacing)
    aff[:3, 3] = src_affine[:3, 3] + axes @ origin_mm
    return aff


def resample_real(src_path: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> nib.Nifti1Image:
    """Trilinear resampling of a real CT onto ``shape`` at ``spacing`` mm (see the module docstring)."""
    src = nib.load(str(src_path))
    data = np.asarray(src.dataobj, dtype=np.float32)
    src_sp = np.linalg.norm(src.affine[:3, :3], axis=0)
    aff = _target_affine(src.affine, data.shape, shape, spacing)
    # pad x/y with air so that "mirror" only ever repeats anatomy along z
    pad_xy = [int(np.ceil(max(0.0, n * s - m * t) / t / 2)) + 2
              for n, s, m, t in zip(shape[:2], spacing[:2], data.shape[:2], src_sp[:2])]
    padded = np.pad(data, [(pad_xy[0],) * 2, (pad_xy[1],) * 2, (0, 0)], constant_values=AIR_HU)
    scale = np.asarray(spacing) / src_sp
    offset = np.linalg.solve(src.affine[:3, :3], aff[:3, 3] - src.affine[:3, 3])  # source index of voxel 0
    offset[:2] += pad_xy
    out = ndimage.affine_transform(padded, scale, offset=offset, output_shape=shape, order=1, mode="mirror",
                                   output=np.float32, prefilter=False)
    img = nib.Nifti1Image(np.round(out).astype(np.int16), aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    return img


def synthetic_ct(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0) -> nib.Nifti1Image:
    """An abdomen-like synthetic CT: air, a fat/soft-tissue ellipse, organ blobs, bone, noise (int16 HU)."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape[:2]), indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1.0
    inner = (x / 0.75) ** 2 + (y / 0.55) ** 2 < 1.0
    out = np.empty(shape, dtype=np.int16)
    for k in range(shape[2]):
        sl = np.full(shape[:2], AIR_HU, dtype=np.float32)
        sl[body] = -100.0
        sl[inner] = 40.0
        sl[(x - 0.45) ** 2 + (y + 0.25) ** 2 < 0.04] = 110.0  # spleen-like blob
        sl[(x + 0.3) ** 2 + (y + 0.1) ** 2 < 0.09] = 60.0  # liver-like blob
        sl[x**2 + (y - 0.45) ** 2 < 0.006] = 700.0  # vertebra
        sl += rng.normal(0, 15, shape[:2]).astype(np.float32)
        out[..., k] = np.round(sl).astype(np.int16)
    aff = np.diag([*spacing, 1.0])
    return nib.Nifti1Image(out, aff)


def make_benchmark_ct(
    shape: tuple[int, int, int] = (512, 512, 120),
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5),
    cache_dir: str | os.PathLike[str] = DEFAULT_CACHE,
) -> Path:
    """Return the path of the benchmark CT for ``shape``/``spacing``, making and caching it if needed."""
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    spacing = tuple(float(s) for s in spacing)  # type: ignore[assignment]
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be 3 sizes >= 2, got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive mm values, got {spacing}")
    src = shared_ct_dir() / "example_ct.nii.gz"
    kind = "real" if src.is_file() else "synthetic"
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    name = f"ct_{kind}_{'x'.join(map(str, shape))}_{'x'.join(f'{s:g}' for s in spacing)}mm.nii.gz"
    path = cache / name
    if not path.is_file():
        img = resample_real(src, shape, spacing) if kind == "real" else synthetic_ct(shape, spacing)
        tmp = path.with_name(f".{name}.{os.getpid()}.nii.gz")
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 512, 120), metavar=("I", "J", "K"))
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.5), metavar=("SX", "SY", "SZ"))
    ap.add_argument("--cache", default=str(DEFAULT_CACHE), help="folder for the generated CT (default: bench/.cache)")
    args = ap.parse_args()
    print(make_benchmark_ct(tuple(args.shape), tuple(args.spacing), args.cache))


if __name__ == "__main__":
    main()

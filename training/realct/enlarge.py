"""An enlarged spleen made from a real CT: a local magnification of the region around the organ.

The five spleens here are 111-260 mL; a clinic's CTs include splenomegaly (over about 315 mL, up to
litres in portal hypertension, lymphoma or after chemotherapy). ``magnify`` makes such a CT from a
real one: every point within ``inner`` mm of the spleen's centre (measured in the new image) is read
from the CT at the centre plus its offset divided by ``factor``, so the spleen and what lies close to
it grow ``factor`` times in every direction (its volume ``factor ** 3`` times); beyond ``inner +
margin`` mm nothing moves, and the shell in between is read from a linearly compressed radius, so
the map is continuous and one-to-one (the neighbours are pushed aside, as an enlarged spleen pushes
the stomach, the colon and the kidney). ``inner`` is ``factor`` times the largest distance of a
spleen voxel from its centre, so the whole organ lies in the magnified ball.

This is a stress test of size, not a model of the disease: the ribs and the kidney's top inside the
ball grow with it, and the organ keeps its shape and texture. ``bench/bench_acquisition.py`` uses it
to measure the model on enlarged spleens; :func:`write_big_pool` makes training subjects from it
(views of the real CTs with the spleen enlarged, written beside the pool as ``<patient>_big_<n>``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from .sources import Scan

# training subjects with an enlarged spleen: linear factor drawn uniformly in this range (volume
# 1.3 to 4.1 times: the five spleens' 111-260 mL become 150-1070 mL)
BIG_FACTORS = (1.1, 1.6)
BIG_MARGIN_MM = 60.0


def magnify(
    array: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    factor: float,
    margin_mm: float = 60.0,
    fill: float = -1024.0,
    labels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """The CT and its mask with the region around the mask's organ magnified ``factor`` times.

    Args:
        array: the CT (HU) on its grid.
        mask: boolean organ mask on the same grid (the organ to enlarge).
        affine: voxel index -> RAS mm (4x4) of both.
        factor: linear magnification (> 1 enlarges; 1.0 returns copies).
        margin_mm: width of the compressed shell between the magnified ball and the unmoved CT.
        fill: HU read where the source point lies outside the CT.
        labels: optional integer label map on the same grid, moved with the CT (nearest
            neighbour; 0 outside the CT); returned in the facts as ``labels``.

    Returns:
        (new CT as float32, new mask (linear interpolation of the mask >= 0.5), facts:
        centre_ras, inner_mm, outer_mm, and ``labels`` when given).

    Raises:
        ValueError: on an empty mask, a factor under 1, a non-positive margin or mismatched shapes.
    """
    if array.shape != mask.shape:
        raise ValueError(f"magnify: CT {array.shape} and mask {mask.shape} differ in shape")
    if not mask.any():
        raise ValueError("magnify: the mask is empty, there is no organ to enlarge")
    if factor < 1.0 or margin_mm <= 0:
        raise ValueError(f"magnify: factor must be >= 1 and margin_mm > 0, got {factor} and {margin_mm}")
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    t = np.asarray(affine, dtype=np.float64)[:3, 3]
    idx = np.argwhere(mask)
    pts = idx @ m.T + t
    centre = pts.mean(axis=0)
    reach = float(np.sqrt(((pts - centre) ** 2).sum(axis=1)).max())
    inner = factor * reach
    outer = inner + margin_mm
    out = np.asarray(array, dtype=np.float32).copy()
    new_mask = np.asarray(mask, dtype=bool).copy()
    facts: dict = {"centre_ras": [round(float(c), 1) for c in centre], "inner_mm": round(inner, 1),
                   "outer_mm": round(outer, 1)}
    if labels is not None:
        if labels.shape != array.shape:
            raise ValueError(f"magnify: labels {labels.shape} and CT {array.shape} differ in shape")
        facts["labels"] = np.asarray(labels).copy()
    if factor == 1.0:
        return out, new_mask, facts
    # the voxels that can move: the index box of the ball of radius ``outer`` (each axis's reach in
    # index units is outer / that axis's voxel size; the box is exact for any rotation of the grid)
    inv = np.linalg.inv(m)
    centre_idx = inv @ (centre - t)
    half = outer * np.sqrt((inv**2).sum(axis=1))
    lo = np.maximum(np.floor(centre_idx - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre_idx + half).astype(int) + 1, np.asarray(array.shape))
    if np.any(hi <= lo):
        return out, new_mask, facts
    grid = np.stack(np.meshgrid(*[np.arange(a, b, dtype=np.float64) for a, b in zip(lo, hi)], indexing="ij"), -1)
    offset = grid @ m.T + t - centre  # RAS mm from the centre, per output voxel
    r = np.sqrt((offset**2).sum(-1))
    # only the voxels inside the ball of radius ``outer`` move; the others keep their values bit for bit
    moving = r < outer
    offset, r = offset[moving], r[moving]
    # source radius: r / factor inside, linear from inner / factor to outer across the shell
    r_src = np.where(r <= inner, r / factor, inner / factor + (r - inner) * (outer - inner / factor) / (outer - inner))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(r > 0, r_src / r, 1.0 / factor)
    coords = ((offset * ratio[:, None] + centre - t) @ inv.T).T  # source voxel index of each moving voxel
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    region = out[box]
    region[moving] = ndimage.map_coordinates(np.asarray(array, dtype=np.float32), coords, order=1, mode="constant", cval=fill)
    region = new_mask[box]
    region[moving] = ndimage.map_coordinates(mask.astype(np.float32), coords, order=1, mode="constant", cval=0.0) >= 0.5
    if labels is not None:
        region = facts["labels"][box]
        region[moving] = ndimage.map_coordinates(np.asarray(labels), coords, order=0, mode="constant", cval=0)
    return out, new_mask, facts


def enlarged_scan(scan: Scan, factor: float, margin_mm: float = BIG_MARGIN_MM) -> Scan:
    """``scan`` with its spleen region magnified ``factor`` times: the CT, and every label with it."""
    array, _, facts = magnify(scan.image.array, scan.spleen, scan.image.affine, factor, margin_mm, labels=scan.labels)
    image = type(scan.image)(array, scan.image.affine)
    return replace(scan, image=image, labels=facts["labels"].astype(scan.labels.dtype))


def big_name(patient: str, n: int) -> str:
    return f"{patient.lower()}_big_{n:03d}"


def write_big_pool(out: str | os.PathLike[str], per_scan: int, seed: int, scans: list[Scan], log=print,
                   factors: tuple[float, float] = BIG_FACTORS) -> list[dict]:
    """Write ``per_scan`` subjects with an enlarged spleen for each scan into ``OUT/pool``.

    Each is a pure function of (seed, scan, n): a factor drawn from ``factors``, the scan magnified
    (:func:`enlarged_scan`), then one view of it made as the pool makes a real view
    (``training.realct.build.make_subject``, kind "real"; the view placed on the spleen). Records go to
    ``pool/subjects_big_<scan>.json`` (not read by ``read_pool_records``: the recipe's pool is unchanged);
    subjects already written are kept, so an interrupted build resumes.
    """
    from vnetseg.io import write_nifti

    from .build import POOL_VIEWS, TRAIN_SCANS, make_subject
    from .synth import group_map, group_means

    settings = replace(POOL_VIEWS, mode_p=(1.0, 0.0, 0.0))
    pool = Path(out) / "pool"
    for sub in ("imagesTr", "labelsTr", "organsTr"):
        (pool / sub).mkdir(parents=True, exist_ok=True)
    written = []
    for scan in scans:
        s_index = TRAIN_SCANS.index(scan.name)
        record_path = pool / f"subjects_big_{scan.name}.json"
        records = {r["name"]: r for r in json.loads(record_path.read_text())} if record_path.is_file() else {}
        for n in range(per_scan):
            name = big_name(scan.patient, n)
            paths = [pool / sub / f"{name}.nii.gz" for sub in ("imagesTr", "labelsTr", "organsTr")]
            if name in records and all(p.is_file() for p in paths):
                written.append(records[name])
                continue
            t0 = time.perf_counter()
            rng = np.random.default_rng([seed, s_index, 7, n])
            factor = float(rng.uniform(*factors))
            big = enlarged_scan(scan, factor)
            means = group_means(big.image.array, group_map(big.labels, big.version))
            hu, spleen, organs, affine, info = make_subject(big, "real", rng, settings, means)
            for path, array in zip(paths, (hu, spleen, organs)):
                write_nifti(path, array, affine, overwrite=True)
            ml = float(spleen.sum()) * float(np.prod(settings.spacing)) / 1000.0
            record = {"name": name, "patient": scan.patient, "kind": "big", "spleen_ml": round(ml, 1),
                      "factor": round(factor, 3), "scan": scan.name, **info}
            records[name] = record
            written.append(record)
            record_path.write_text(json.dumps(list(records.values()), indent=1))
            if log:
                log(f"{name}: spleen x{factor:.2f}, {info['view']} view {info['shape']}, {info['phase']}, "
                    f"spleen {ml:.0f} mL ({time.perf_counter() - t0:.1f} s)")
    return written


def read_big_records(out: str | os.PathLike[str]) -> list[dict]:
    """Every enlarged-spleen subject's record in ``OUT/pool`` (``subjects_big_<scan>.json``)."""
    from .build import TRAIN_SCANS

    records = []
    for name in TRAIN_SCANS:
        path = Path(out) / "pool" / f"subjects_big_{name}.json"
        if path.is_file():
            records += json.loads(path.read_text())
    return records

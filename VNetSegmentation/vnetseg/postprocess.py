"""Mask clean-up and quality checks on the input grid (pure numpy/scipy)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from .boxes import nonzero_box

# Plausible adult spleen volume in mL (normal about 100-300 mL; splenomegaly well above).
PLAUSIBLE_ML = (30.0, 1500.0)
# A second component counts as "sizeable" above this share of the largest one, or this many mL.
SIZEABLE_SHARE = 0.10
SIZEABLE_ML = 10.0

_STRUCTURE = ndimage.generate_binary_structure(3, 1)  # 6-connectivity


def label_sizes(labels: np.ndarray, n: int, slab: int = 16) -> np.ndarray:
    """Voxels per label 0..n of an integer label array, counted slab by slab (no int64 copy of it)."""
    sizes = np.zeros(n + 1, dtype=np.int64)
    for k in range(0, labels.shape[-1], slab):
        sizes += np.bincount(labels[..., k : k + slab].ravel(), minlength=n + 1)
    return sizes


def split_components(mask: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Label ``mask`` once (6-connectivity, on its bounding box only).

    Returns:
        (the largest component as a boolean mask, voxel counts of all components, largest first).
    """
    out = np.zeros(mask.shape, dtype=bool)
    parts = _components(mask)
    if parts is None:
        return out, []
    box, labels, sizes = parts
    sizes[0] = 0
    out[box] = labels == int(np.argmax(sizes))
    return out, sorted((int(s) for s in sizes[1:]), reverse=True)


def _components(mask: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray] | None:
    """(bounding box, 6-connected labels on it, voxels per label 0..n), or None when ``mask`` is empty."""
    box = nonzero_box(mask)
    if box is None:
        return None
    labels, n = ndimage.label(mask[box], structure=_STRUCTURE)
    return (box, labels, label_sizes(labels, n)) if n else None


def select_located(mask: np.ndarray, located: np.ndarray, single: bool = True) -> tuple[np.ndarray, list[int]]:
    """The component(s) of ``mask`` that the whole-CT view located as the spleen.

    Args:
        mask: (I, J, K) bool thresholded network output.
        located: (I, J, K) bool region the whole-CT view located (already grown).
        single: keep only the component overlapping ``located`` most (ties: the larger one);
            False keeps every component that overlaps it.

    Returns:
        (the kept voxels as a boolean mask, voxel counts of all components of ``mask``, largest first).
        Components that do not touch ``located`` are never kept, however large.
    """
    out = np.zeros(mask.shape, dtype=bool)
    parts = _components(mask)
    if parts is None:
        return out, []
    box, labels, sizes = parts
    overlap = np.bincount(labels[located[box]].ravel(), minlength=len(sizes))
    overlap[0] = 0
    counts = sorted((int(s) for s in sizes[1:]), reverse=True)
    if not overlap.any():
        return out, counts
    if single:
        best = int(np.lexsort((sizes, overlap))[-1])  # most overlap, then the larger
        out[box] = labels == best
    else:
        out[box] = np.isin(labels, np.flatnonzero(overlap))
    return out, counts


# The HU trim (:func:`trim_to_organ_hu`): a voxel stays in the mask when its value lies within
# HU_TRIM_SD robust standard deviations of the organ's core (the mask eroded by HU_TRIM_CORE_MM).
# Measured with the shipped model v2.1.0 on the real CTs (Dice without -> with it, fast mode): native
# CTs P1 0.893 -> 0.895, P4 0.913 -> 0.919; contrast CTs, where the network's boundary spilled into
# unenhanced tissue beside the spleen (diaphragm, stomach wall: about 30 HU next to a 175 HU
# spleen), P2 0.904 -> 0.918, P5 0.909 -> 0.973, P3 (sharp kernel, wide spread) 0.924 -> 0.925.
# Held out (leave-one-patient-out): P5 0.808 -> 0.893, P1 0.904 -> 0.909, P3 and P4 the same or
# better. 3 SD cut more of the native CTs and of held-out P5's spleen, 5 SD left more of P5's spill.
HU_TRIM_SD = 4.0
HU_TRIM_CORE_MM = 3.0
# below this many core voxels the organ's HU are not estimated and the mask is left as it is
HU_TRIM_MIN_CORE = 200
# the spread is at least this (HU): CT noise is never less, and a flat synthetic image keeps a band
HU_TRIM_MIN_SD = 5.0


# Native CT (:func:`grow_native`): measured, the network under-segments the spleen of an unenhanced
# CT and over-segments an enhanced one (shipped v2.1.0, fast mode: P1 -16 %, P4 -9 % of the
# reference's volume; held out P1 -12 %, P4 -50 %; against +18 % on contrast P2 and P5). An
# unenhanced spleen is 35-55 HU and an enhanced one 80 HU or more (anatomy.TISSUE_HU), so a core
# median under NATIVE_MAX_HU means native CT, where the mask is grown into the connected voxels the
# network gives more than GROW_PROBABILITY that lie in the organ's HU band. It is a calibration of
# the shipped networks, so their model file declares it (ModelInfo.postprocessing); a fine-tuned or
# newly trained network has its own bias and gets no growth unless its file says so. Dice, without -> with
# it: shipped P1 0.895 -> 0.926, P4 0.919 -> 0.920; held out P1 0.909 -> 0.930, P4 0.664 -> 0.775.
# 0.2 grew held-out P4 further (0.826) but took shipped P4 past its reference (0.909, 4 mL away).
NATIVE_MAX_HU = 65.0
GROW_PROBABILITY = 0.3

# Thin appendages (:func:`drop_thin_appendages`): the organ's body is its interior more than
# APPENDAGE_RADIUS_MM from its surface, and what lies more than APPENDAGE_REACH_MM from that body
# is cut off. An adult spleen is 30-50 mm thick, so its body is most of it; a neighbour's rim joined
# through a thin bridge is not part of it.
APPENDAGE_RADIUS_MM = 5.0
APPENDAGE_REACH_MM = 10.0


@dataclass
class HuTrim:
    """What :func:`trim_to_organ_hu` did: the organ's HU band (around its core's median) and the
    voxels it removed."""

    low: float
    high: float
    removed: int
    median: float

    @property
    def native(self) -> bool:
        """The organ's core is unenhanced soft tissue (median under ``NATIVE_MAX_HU``)."""
        return self.median < NATIVE_MAX_HU


def _organ_core(
    mask: np.ndarray, spacing: Any, core_mm: float, pad: int = 0
) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray] | None:
    """(the mask's box grown by ``pad`` voxels, the mask on it, its core): the mask eroded by ``core_mm``
    along each axis (a box-shaped, separable erosion; outside the box counts as outside the organ).
    None when the mask is empty or the core has fewer than ``HU_TRIM_MIN_CORE`` voxels."""
    box = nonzero_box(mask)
    if box is None:
        return None
    if pad:
        box = tuple(slice(max(0, b.start - pad), min(n, b.stop + pad)) for b, n in zip(box, mask.shape))
    part = mask[box].astype(bool, copy=False)
    size = tuple(2 * max(1, round(core_mm / float(s))) + 1 for s in spacing)
    core = ndimage.minimum_filter(part.view(np.uint8), size=size, mode="constant", cval=0).astype(bool)
    if int(np.count_nonzero(core)) < HU_TRIM_MIN_CORE:
        return None
    return box, part, core


def trim_to_organ_hu(
    mask: np.ndarray, values: np.ndarray, spacing: Any, sd: float = HU_TRIM_SD, core_mm: float = HU_TRIM_CORE_MM
) -> tuple[np.ndarray, HuTrim | None]:
    """Remove mask voxels whose value lies outside the organ's own HU range, then keep the largest part.

    The spleen is a homogeneous organ: on a contrast CT it is brighter than the unenhanced tissue
    beside it, so a network boundary that spills into the diaphragm or the stomach wall shows as
    mask voxels far darker than the organ. The organ's HU are measured on its core (``mask`` eroded
    by ``core_mm`` along each axis): the median, and a spread from the interquartile range (robust
    to vessels and lesions inside). Voxels more than ``sd`` spreads from the median are removed and
    the largest 6-connected part is kept. Holes are not filled here: the caller's hole filling puts
    back what the organ encloses (vessels at the hilum, a cyst inside), so only what lies at its
    surface goes: a dark lesion at the organ's surface is cut off too (say so to the user).

    Args:
        mask: (I, J, K) bool mask on the input grid.
        values: (I, J, K) the image (HU for CT) on the same grid.
        spacing: voxel size (mm) along i, j, k.

    Returns:
        (the trimmed mask, what was done), or (``mask``, None) when the mask is empty or its core
        has fewer than ``HU_TRIM_MIN_CORE`` voxels (too small to measure), or when nothing would be
        left.
    """
    found = _organ_core(mask, spacing, core_mm)
    if found is None:
        return mask, None
    box, part, core = found
    hu = values[box]
    inside = hu[core].astype(np.float32)
    median = float(np.median(inside))
    q1, q3 = np.percentile(inside, [25.0, 75.0])
    spread = max(float(q3 - q1) / 1.349, HU_TRIM_MIN_SD)  # the IQR of a normal distribution is 1.349 SD
    low, high = median - sd * spread, median + sd * spread
    kept = largest_component(part & (hu >= low) & (hu <= high))
    if not kept.any():
        return mask, None
    out = np.zeros(mask.shape, dtype=bool)
    out[box] = kept
    return out, HuTrim(low, high, int(np.count_nonzero(part)) - int(np.count_nonzero(kept)), median)


# Not the spleen (:func:`dense_share`): the spleen's parenchyma stays under about 200 HU in every
# phase (anatomy.TISSUE_HU: 35-55 native, up to 160 arterial), so a mask whose core is largely denser
# than DENSE_HU is bone or contrast-filled blood. Measured with the shipped model and the held-out
# pairs on the real CTs and on axial slabs of them (bench/bench_view_slabs.py, README "Not one soft
# tissue"): on the 131 results that found the spleen the share was at most 4.5 % unfiltered (P3's
# sharp kernel, its core's HU spread about 90) and 0 % filtered; on wrong ones that held bone (P4's
# iliac wing and iliacus on a pelvis-only slab, 97 mL: 23 %; a 40 mm slab of P4's lower abdomen, 18 %)
# or contrast-filled heart (P5, 96 % unfiltered) far more. A 3-voxel mean filter takes the noise of
# a sharp kernel out first (a median filter does too, but costs 0.7 s on a spleen's box, against 0.02 s).
DENSE_HU = 300.0
MAX_DENSE_SHARE = 0.10


def dense_share(mask: np.ndarray, values: np.ndarray, spacing: Any, core_mm: float = HU_TRIM_CORE_MM) -> float | None:
    """The share of the mask's core (eroded by ``core_mm``) denser than ``DENSE_HU`` after a 3-voxel mean filter.

    Returns None when the mask is empty or its core has fewer than ``HU_TRIM_MIN_CORE`` voxels.
    """
    found = _organ_core(mask, spacing, core_mm, pad=1)  # one voxel more around it, for the mean filter
    if found is None:
        return None
    box, _, core = found
    smooth = ndimage.uniform_filter(np.asarray(values[box], dtype=np.float32), size=3)
    return float(np.count_nonzero(smooth[core] > DENSE_HU)) / float(np.count_nonzero(core))


def grow_native(mask: np.ndarray, candidates: np.ndarray, values: np.ndarray, band: HuTrim) -> tuple[np.ndarray, int]:
    """On native CT, add the parts of ``candidates`` in the organ's HU band that touch ``mask``.

    Args:
        mask: (I, J, K) bool, the trimmed organ (:func:`trim_to_organ_hu`).
        candidates: (I, J, K) bool, where the network's probability exceeds ``GROW_PROBABILITY``.
        values: the image on the same grid; band: the organ's band from the trim.

    Returns:
        (the grown mask, voxels added); ``mask`` itself and 0 when the organ is enhanced
        (``band.native`` False) or nothing touches it.
    """
    if not band.native:
        return mask, 0
    box = nonzero_box(candidates | mask)
    if box is None:
        return mask, 0
    hu = values[box]
    inside = mask[box]
    near = (candidates[box] & (hu >= band.low) & (hu <= band.high)) | inside
    labels, _ = ndimage.label(near, structure=_STRUCTURE)
    touching = np.unique(labels[inside])
    grown = np.isin(labels, touching[touching > 0])
    added = int(np.count_nonzero(grown)) - int(np.count_nonzero(inside))
    if added <= 0:
        return mask, 0
    out = mask.copy()
    out[box] = grown
    return out, added


def drop_thin_appendages(
    mask: np.ndarray, spacing: Any, radius_mm: float = APPENDAGE_RADIUS_MM, reach_mm: float = APPENDAGE_REACH_MM
) -> tuple[np.ndarray, int]:
    """Remove the parts of ``mask`` that lie far from the organ's thick body (a neighbour attached by a thin neck).

    The organ's body is the largest part of the mask's interior: the voxels more than ``radius_mm``
    from its surface (an isotropic erosion in mm, so slice spacing does not matter). The organ is
    what lies within ``reach_mm`` of that body; the rest of the mask is a thin piece that reaches
    away from it, such as the rim of the neighbouring kidney joined to the spleen through a bridge.
    The organ's own rims and corners lie within ``reach_mm`` of its body when ``reach_mm`` is at
    least sqrt(3) * ``radius_mm`` (a box's corner lies that far from the box eroded by ``radius_mm``),
    so with the defaults (10 and 5 mm) an organ thicker than ``2 * radius_mm`` everywhere is kept whole.

    Both distances are exact Euclidean distances on the input grid, so the answer does not depend on
    the order in which the CT's voxels are stored (a coarser grid for the reach was 0.04 s faster
    on the benchmark CT but moved the cut with the storage order).

    Returns:
        (the mask without those parts, voxels removed); ``mask`` itself and 0 when it is empty or
        has no body (nowhere thicker than ``2 * radius_mm``).
    """
    box = nonzero_box(mask)
    if box is None:
        return mask, 0
    part = np.pad(mask[box].astype(bool, copy=False), 1)  # outside the mask's box is outside the organ
    sampling = [float(s) for s in spacing]
    body = largest_component(ndimage.distance_transform_edt(part, sampling=sampling) > radius_mm)
    if not body.any():
        return mask, 0
    near = ndimage.distance_transform_edt(~body, sampling=sampling) <= reach_mm
    kept = largest_component(part & near)
    removed = int(np.count_nonzero(part)) - int(np.count_nonzero(kept))
    if removed <= 0:
        return mask, 0
    out = np.zeros(mask.shape, dtype=bool)
    out[box] = kept[1:-1, 1:-1, 1:-1]
    return out, removed


def components_ml(mask: np.ndarray, voxel_ml: float) -> list[float]:
    """Volumes (mL) of the 6-connected components of ``mask``, largest first."""
    return [s * voxel_ml for s in split_components(mask)[1]]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 6-connected component of a boolean (I, J, K) mask."""
    return split_components(mask)[0]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill cavities fully enclosed by ``mask`` (3D), working on its bounding box only."""
    out = mask.astype(bool, copy=True)
    box = nonzero_box(out)
    if box is not None:
        out[box] = ndimage.binary_fill_holes(out[box])
    return out


def clean_mask(mask: np.ndarray, largest: bool = True, holes: bool = True) -> np.ndarray:
    """Largest component, then hole filling (each switchable)."""
    out = mask.astype(bool, copy=False)
    if largest:
        out = largest_component(out)
    if holes:
        out = fill_holes(out)
    return out


@dataclass
class QualityReport:
    """Numbers and warnings about a binary result on the input grid."""

    volume_ml: float
    components_ml: list[float] = field(default_factory=list)
    touches_edge: bool = False
    warnings: list[str] = field(default_factory=list)
    found: bool = True  # False: "no spleen found in the field of view" is the answer (an empty mask)
    message: str = ""  # the answer in one line when nothing was found
    confidence: Any = None  # vnetseg.confidence.Confidence of the returned mask (None: nothing segmented)


def quality_report(
    raw_mask: np.ndarray,
    final_mask: np.ndarray,
    voxel_ml: float,
    name: str = "spleen",
    raw_components: list[int] | None = None,
) -> QualityReport:
    """Measure ``final_mask`` and warn about results a reader should double-check.

    Args:
        raw_mask: the thresholded mask before clean-up (to count components).
        final_mask: the mask that is returned to the user.
        voxel_ml: volume of one voxel in mL.
        raw_components: voxel counts of ``raw_mask``'s components when already known
            (:func:`split_components`), so it is not labelled twice.
    """
    volume = float(np.count_nonzero(final_mask)) * voxel_ml
    counts = split_components(raw_mask)[1] if raw_components is None else raw_components
    comps = [c * voxel_ml for c in counts]
    report = QualityReport(volume_ml=volume, components_ml=comps)
    if volume == 0:
        report.found = False
        report.message = f"no {name} found in the field of view"
        return report
    lo, hi = PLAUSIBLE_ML
    if volume < lo or volume > hi:
        report.warnings.append(
            f"implausible {name} volume {volume:.0f} mL (expected {lo:.0f}-{hi:.0f} mL): check the result"
        )
    box = nonzero_box(final_mask)
    if box is not None and any(s.start == 0 or s.stop == n for s, n in zip(box, final_mask.shape)):
        report.touches_edge = True
        report.warnings.append(f"the {name} touches the edge of the image: it may be cut off by the field of view")
    big = [c for c in comps[1:] if c >= max(SIZEABLE_ML, SIZEABLE_SHARE * comps[0])]
    if big:
        report.warnings.append(
            f"{len(big) + 1} sizeable separate parts were found ({', '.join(f'{c:.0f}' for c in comps[: len(big) + 1])} mL); "
            f"the largest was kept"
        )
    return report


def dice(a: np.ndarray, b: np.ndarray, empty: float = 1.0) -> float:
    """Dice coefficient of two boolean masks; ``empty`` when both are empty."""
    a = a.astype(bool, copy=False)
    b = b.astype(bool, copy=False)
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return float(empty)
    return 2.0 * int(np.count_nonzero(a & b)) / total

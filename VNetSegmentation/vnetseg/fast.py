"""The whole-CT view (one anatomical decision for both modes) and coarse-to-fine ("fast") inference.

A model file with a locator (or a coarse spacing) first looks at the whole CT at low resolution
(e.g. 4 mm: a 512x512x120 CT becomes about 100^3 voxels, one window) and decides, for both modes,
whether a spleen is in view and which part of the CT it is (:func:`locate`): the part holding the
most probability mass, if it has at least ``MIN_LOCATED_ML``, among the parts where a spleen can
be. Two anatomical facts decide where it can be (:class:`BodyView`, from the CT's HU alone):

- the spleen lies on the patient's left of the body's centre (the liver's side is the right);
- the spleen lies under the diaphragm, so no lung lies beneath it: a part with more than
  ``MAX_LUNG_BELOW_ML`` of lung straight below it (in its axial footprint) is in the chest (a
  shoulder or chest-wall muscle, the heart's upper part). Lung here is air inside the body on
  axial slices where air fills at least ``CHEST_AIR_SHARE`` of the body's cross-section; bowel gas
  in an abdominal slice fills less (at most 5 % on the real CTs' spleen-free parts).

When nothing is located the answer
is "no spleen found in the field of view": an empty mask, said plainly, in fast and full mode
alike. Otherwise the full-resolution mask may only lie on the located part (grown by
``LOCATED_GROW_MM``): its component that overlaps the located part most is the spleen, so keeping
"the largest component" can never pick the heart or a muscle that the whole-CT view rejected.

Fast mode then runs the full-resolution pass on the located part's box only: the spleen fills a
few percent of an abdominal CT, so a full-resolution sliding window spends most of its time on
voxels that cannot be spleen. The box is the located part's bounding box plus a margin, grown to
at least one of the model's trained windows (centred on the organ). The growth matters: the
network's answer near the organ's border depends on how much anatomy its window shows around it,
and a tight box showed less than full mode does (fast vs full Dice on the three real CTs with the
shipped model v1.0.0: 0.942-0.981 with a tight box, 0.986-0.995 with one 160 x 160 x 32 window at
least). When the organ touches the edge of the field of view, the box is extended to the image
border on that side (the image itself is the only limit there) and the result says so.

Full mode windows the body's box (the air around the patient holds no spleen). Fast mode then
runs only full mode's windows that touch the organ's box (``inference.fast_region``), which makes
its probabilities there full mode's exactly; where that would cost more than
``inference.EXACT_FAST_COST`` times the organ's own box, it runs that box with its own windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .preprocess import GridMap

# A region up to this many voxels is run as one window (any multiple-of-16 size works for a
# fully convolutional network); bigger regions use the sliding window. 2.6 M voxels keep the
# paper V-Net's activations on CPU around 1 GB.
SINGLE_WINDOW_VOXELS = 2_600_000
MARGIN_MM = 15.0
# full mode's box around the body: one coarse voxel, for the resampling; the air around holds nothing
BODY_MARGIN_MM = 4.0
# The whole-CT view answers "spleen in view" only with a located part of at least this volume: a
# spleen tip cut by the field of view is smaller, and so is what it calls spleen in spleen-free CT.
MIN_LOCATED_ML = 10.0
# The located part, grown by this much, is where the full-resolution mask may lie (both modes).
LOCATED_GROW_MM = 12.0
NO_SPLEEN = "no spleen found in the field of view"
BODY_HU = -300.0  # denser than this is body (its largest connected part is the patient)
AIR_HU = -400.0  # lighter than this, inside the body, is air: lung or bowel gas
# an axial slice is a chest slice (its air is lung) when air fills this share of the body's cross-section
CHEST_AIR_SHARE = 0.10
# at most this much lung may lie straight below a part that can be the spleen. Measured with the
# shipped model and the five leave-one-patient-out locators on the real CTs: under the located
# spleens at most 3.1 mL (colon and lung-base partial volume), under the chest parts they called
# spleen (shoulder and chest-wall muscle, 40-360 mL) 113-538 mL
MAX_LUNG_BELOW_ML = 50.0
FOOTPRINT_GROW_MM = 8.0  # a part's axial footprint is grown by this much before the lung under it is counted
# On a CT that reaches less than this far head to foot, "no spleen" is not a reliable answer, so it
# comes with a warning. Measured with the held-out pairs of P1, P3, P4 and P5 on axial slabs of their
# own patient's CTs, one every 30 mm (README, session 17): the locator found the spleen on 7 of the 22
# slabs of 40-64 mm that held 20 mL or more of it and on 38 of the 59 of 96-256 mm (it misses spleens
# cut by the range's end, and P4's native one on some whole-spleen slabs), and on P2's 40 mm series
# nothing; on every patient's whole CT (297-421 mm) it found it. (Spleen-free CTs this short still
# answer "no spleen": the warning says that the answer may be wrong, not that it is.)
RELIABLE_VIEW_MM = 300.0


@dataclass(frozen=True)
class Box:
    """A box of the full-resolution model grid: voxels ``start`` (inclusive) to ``stop`` (exclusive)."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]


@dataclass
class Location:
    """The whole-CT view's answer: is a spleen in view, and which part of the CT is it.

    Attributes:
        found: a part of at least ``MIN_LOCATED_ML`` was located.
        mask: (X, Y, Z) bool, the located part on the coarse model grid (empty when not found).
        volume_ml: the located part's volume at the coarse spacing (mL).
        candidates_ml: every part the coarse pass found that could be the spleen, by volume (mL),
            the located one first.
        reason: why nothing was located ("" when found).
        body: (X, Y, Z) bool, the patient's body (:class:`BodyView`) on the same coarse grid, when
            known: full mode windows its box only (the air around the patient cannot hold a spleen).
        unconfirmed_ml: parts of at least the smallest located size, on the patient's left and not
            above lung, that the locator check did not confirm (mL, largest first).
    """

    found: bool
    mask: np.ndarray
    volume_ml: float
    candidates_ml: list[float]
    reason: str = ""
    body: np.ndarray | None = None
    unconfirmed_ml: list[float] = field(default_factory=list)


@dataclass
class BodyView:
    """What the CT's HU say about the anatomy, on the coarse model grid (canonical RAS axes).

    Attributes:
        body: (X, Y, Z) bool, the patient: the largest connected part denser than ``BODY_HU``
            (the table and the scanner's padding are other parts, or too thin to matter).
        lung: (X, Y, Z) bool, air inside the body (holes of each axial slice of ``body`` filled)
            on chest slices (see ``CHEST_AIR_SHARE``).
    """

    body: np.ndarray
    lung: np.ndarray

    @classmethod
    def from_hu(cls, hu: np.ndarray) -> BodyView:
        dense = hu > BODY_HU
        labels, n = ndimage.label(dense)
        if n == 0:
            empty = np.zeros(hu.shape, bool)
            return cls(empty, empty.copy())
        body = labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
        inside = np.empty_like(body)
        for k in range(body.shape[2]):  # axis 2 is the head-foot axis of the canonical grid
            inside[:, :, k] = ndimage.binary_fill_holes(body[:, :, k])
        air = inside & (hu < AIR_HU)
        area = inside.sum((0, 1))
        chest = air.sum((0, 1)) >= CHEST_AIR_SHARE * np.maximum(area, 1)
        return cls(body, air & chest[None, None, :])

    def midline_x(self, grid: GridMap) -> float | None:
        """RAS x (mm) of the body's centre, or None without a body."""
        if not self.body.any():
            return None
        return float((np.argwhere(self.body).mean(0) @ grid.model_affine[:3, :3].T + grid.model_affine[:3, 3])[0])

    def lung_below_ml(self, labels: np.ndarray, n: int, grid: GridMap) -> np.ndarray:
        """(n,) mL of lung straight below each part 1..n of ``labels``: in its axial footprint
        (grown by ``FOOTPRINT_GROW_MM``), under its lowest slice."""
        voxel_ml = float(np.prod(grid.model_spacing)) / 1000.0
        grow = max(1, round(FOOTPRINT_GROW_MM / float(min(grid.model_spacing[:2]))))
        # below[x, y, k]: lung voxels at (x, y) under slice k (superior is +k on the canonical grid)
        below = np.concatenate([np.zeros(self.lung.shape[:2] + (1,), np.int32),
                                np.cumsum(self.lung, axis=2, dtype=np.int32)], axis=2)
        out = np.zeros(n)
        for i, found in enumerate(ndimage.find_objects(labels, max_label=n)):
            if found is None:
                continue
            part = labels[found] == i + 1
            xs, ys, zs = found
            foot = np.zeros(labels.shape[:2], bool)
            foot[xs, ys] = part.any(2)
            foot = ndimage.binary_dilation(foot, iterations=grow)
            out[i] = float(below[:, :, zs.start][foot].sum()) * voxel_ml
        return out


def head_foot_extent_mm(shape: tuple[int, ...], affine: np.ndarray) -> float:
    """How far a CT's field of view reaches head to foot (mm): its voxel box projected on the S axis.

    Exact for any orientation: the box's projection is the sum over its edges (voxel axes) of each
    edge's length times the cosine of its angle to S, so an axial CT gives slices x slice spacing.
    """
    return float(np.sum(np.abs(np.asarray(affine, float)[2, :3]) * np.asarray(shape[:3], float)))


def thin_view_warning(extent_mm: float, organ: str = "spleen") -> str | None:
    """The warning that goes with "no spleen" on a CT under ``RELIABLE_VIEW_MM`` head to foot (None otherwise)."""
    if extent_mm >= RELIABLE_VIEW_MM:
        return None
    return (
        f"the CT covers only {extent_mm:.0f} mm head to foot: on CTs under {RELIABLE_VIEW_MM:g} mm the whole-CT "
        f"view misses the {organ} more often (held out, it found it on 7 of 22 slabs of 40-64 mm that held one "
        f"and on 38 of 59 of 96-256 mm, most often when the range cuts through it), so 'no {organ}' is not a "
        "reliable answer here: look at the images, or load a series that covers the whole upper abdomen"
    )


def _ras_centroids(labels: np.ndarray, n: int, grid: GridMap) -> np.ndarray:
    """(n, 3) RAS centre (mm) of each label 1..n of ``labels`` (on ``grid``'s model grid)."""
    idx = np.asarray(ndimage.center_of_mass(np.ones(labels.shape), labels, np.arange(1, n + 1)), dtype=float)
    return idx.reshape(-1, 3) @ grid.model_affine[:3, :3].T + grid.model_affine[:3, 3]


def locate(
    probs: np.ndarray, coarse: GridMap, min_ml: float = MIN_LOCATED_ML, anatomy: BodyView | None = None,
    check: np.ndarray | None = None, check_min: float = 0.0, rivals: tuple[np.ndarray, ...] = (),
) -> Location:
    """Pick the spleen among the coarse pass's parts: the one holding the most probability mass.

    Args:
        probs: (X, Y, Z) float32 spleen probability on ``coarse``'s model grid.
        coarse: the coarse grid map.
        min_ml: smallest part that counts as a spleen in view.
        anatomy: the CT's body and lungs on the same grid. When given, only parts whose centre lies
            on the patient's left of the body's centre (smaller RAS x) can be the spleen (a part on
            the right is the liver, or, in situs inversus, which this model does not handle, the
            spleen), and only parts with at most ``MAX_LUNG_BELOW_ML`` of lung straight below them
            (a part above lung is in the chest).
        check: (X, Y, Z) float32, a second network's probability of the organ on the same grid (the
            locator check, ``ModelInfo.locator_check``). When given, only parts over which its mean is at
            least ``check_min`` can be the organ: a part the second network takes for something else
            (a kidney, a muscle) is not located, and the next eligible part is taken instead.
        rivals: the same network's probabilities of classes the organ is not (a kidney): a part over
            which any of them has a larger mean than ``check`` is not confirmed either.
    """
    voxel_ml = float(np.prod(coarse.model_spacing)) / 1000.0
    labels, n = ndimage.label(probs > 0.5, structure=ndimage.generate_binary_structure(3, 1))
    if n == 0:
        return Location(False, labels > 0, 0.0, [], f"{NO_SPLEEN} (the whole-CT view found none)")
    index = np.arange(1, n + 1)
    mass = ndimage.sum_labels(probs, labels, index)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    right = np.zeros(n, bool)
    chest = np.zeros(n, bool)
    midline = anatomy.midline_x(coarse) if anatomy is not None else None
    if midline is not None:
        right = _ras_centroids(labels, n, coarse)[:, 0] >= midline
        chest = anatomy.lung_below_ml(labels, n, coarse) > MAX_LUNG_BELOW_ML  # type: ignore[union-attr]
    unconfirmed = np.zeros(n, bool)
    if check is not None:
        organ_mean = np.asarray(ndimage.mean(check, labels, index))
        unconfirmed = organ_mean < check_min
        for rival in rivals:
            unconfirmed |= np.asarray(ndimage.mean(rival, labels, index)) > organ_mean
    eligible = ~right & ~chest & ~unconfirmed
    vetoed = sorted((round(float(v) * voxel_ml, 1) for v in sizes[unconfirmed & ~right & ~chest] if v * voxel_ml >= min_ml),
                    reverse=True)
    if not eligible.any():
        biggest = float(sizes.max()) * voxel_ml
        why = ([f"its mean probability under {check_min:g}"] if check_min > 0 else []) + (
            ["another of its classes more probable there"] if rivals else [])
        vetoed_text = f"where the locator check does not confirm a spleen ({' or '.join(why)})"
        where = " or ".join(w for w, hit in (("on the patient's right", right.any()),
                                              ("in the chest, above lung", chest.any()),
                                              (vetoed_text, (unconfirmed & ~right & ~chest).any())) if hit)
        return Location(
            False, np.zeros(probs.shape, bool), 0.0, [round(biggest, 1)],
            f"{NO_SPLEEN} (the whole-CT view's candidates, up to {biggest:.1f} mL, all lie {where})", unconfirmed_ml=vetoed,
        )
    best = int(np.argmax(np.where(eligible, mass, -1.0)))
    volume = float(sizes[best]) * voxel_ml
    others = sorted((float(v) * voxel_ml for i, v in enumerate(sizes) if i != best and eligible[i]), reverse=True)
    candidates = [round(volume, 1)] + [round(v, 1) for v in others]
    if volume < min_ml:
        return Location(
            False, np.zeros(probs.shape, bool), volume, candidates,
            f"{NO_SPLEEN} (the whole-CT view's best candidate is {volume:.1f} mL, under {min_ml:g} mL)",
            unconfirmed_ml=vetoed,
        )
    return Location(True, labels == best + 1, volume, candidates, unconfirmed_ml=vetoed)


def grown(mask: np.ndarray, grid: GridMap, mm: float = LOCATED_GROW_MM) -> np.ndarray:
    """``mask`` (on ``grid``'s model grid) dilated by ``mm`` along each axis (a box-shaped growth)."""
    radius = np.maximum(1, np.round(mm / grid.model_spacing).astype(int))
    return ndimage.maximum_filter(mask, size=tuple(int(2 * r + 1) for r in radius))


def single_window_patch(shape: tuple[int, ...], multiple: int, limit: int = SINGLE_WINDOW_VOXELS) -> tuple[int, int, int] | None:
    """The one window (shape rounded up to ``multiple``) that covers ``shape``, if small enough."""
    patch = tuple(int(math.ceil(s / multiple) * multiple) for s in shape)
    return patch if math.prod(patch) <= limit else None  # type: ignore[return-value]


def box_from_coarse_mask(
    mask: np.ndarray, coarse: GridMap, fine: GridMap, margin_mm: float = MARGIN_MM, min_shape: tuple[int, ...] = (0, 0, 0)
) -> tuple[Box | None, str]:
    """Turn the coarse mask (on ``coarse``'s model grid) into a box of ``fine``'s model grid.

    Returns:
        (box, note): note is "" or says that the box reaches the image border because the organ
        touches the edge of the field of view; (None, reason) when the mask is empty.
    """
    idx = np.argwhere(mask)
    if idx.size == 0:
        return None, "the coarse pass found no spleen"
    lo, hi = idx.min(0), idx.max(0)
    at_low, at_high = lo == 0, hi == np.asarray(mask.shape) - 1
    # the 8 outer corners of the coarse box (voxel edges), in RAS, then in fine model indices
    corners = np.array([[a, b, c] for a in (lo[0] - 0.5, hi[0] + 0.5) for b in (lo[1] - 0.5, hi[1] + 0.5) for c in (lo[2] - 0.5, hi[2] + 0.5)])
    ras = corners @ coarse.model_affine[:3, :3].T + coarse.model_affine[:3, 3]
    inv = np.linalg.inv(fine.model_affine)
    fine_idx = ras @ inv[:3, :3].T + inv[:3, 3]
    margin = margin_mm / fine.model_spacing
    start = np.floor(fine_idx.min(0) - margin).astype(int)
    stop = np.ceil(fine_idx.max(0) + margin).astype(int) + 1
    shape = np.asarray(fine.model_shape)
    for axis in range(3):  # grow to at least min_shape (centred), then clamp into the grid
        need = min(int(min_shape[axis]), int(shape[axis])) - (stop[axis] - start[axis])
        if need > 0:
            start[axis] -= need // 2
            stop[axis] += need - need // 2
        shift = max(0, -start[axis]) - max(0, stop[axis] - shape[axis])
        start[axis], stop[axis] = start[axis] + shift, stop[axis] + shift
    start, stop = np.maximum(start, 0), np.minimum(stop, shape)
    note = ""
    if at_low.any() or at_high.any():  # coarse axis n is fine axis n: both are canonical RAS axes
        start[at_low], stop[at_high] = 0, shape[at_high]
        note = "the spleen touches the edge of the field of view, so its box was extended to the image border there"
    return Box(tuple(int(v) for v in start), tuple(int(v) for v in stop)), note  # type: ignore[arg-type]

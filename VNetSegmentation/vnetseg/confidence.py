"""How sure the model is: the spleen probability on the input grid, and a per-case confidence.

The network's answer is a probability per voxel of the model grid; the mask is that probability
resampled (trilinear) onto the input grid and thresholded. :func:`probability_on_input_grid`
returns the same resampled probability without the threshold, so ``map > threshold`` is exactly
the mask before clean-up (float32; for uint8 ``round(255 p)``, up to voxels within 1/510 of the
threshold). It is computed only when asked for (``InferenceOptions.probability``).

The confidence is measured on the model grid (the network's own voxels, the same spacing for every
CT, so thin-slice and thick-slice scans are comparable), around the returned mask only:

* ``mean_probability``: the mean spleen probability over the mask's voxels;
* ``uncertain_share``: the share of the organ's voxels whose probability lies in
  ``UNCERTAIN_BAND`` (0.3-0.7), where the organ is the mask plus the voxels next to it that have
  a probability of at least 0.3 (so the soft rim just outside the mask counts too). A sharp,
  sure answer has only a thin uncertain rim; a hesitant one has a thick rim or a soft core.

A result is flagged "low confidence: check the result" when its uncertain share is above
``LOW_CONFIDENCE_UNCERTAIN_SHARE`` or its mean probability below ``LOW_CONFIDENCE_MEAN_PROBABILITY``;
both thresholds were chosen from measurements on the real CTs (right vs wrong results:
leave-one-patient-out models, spleen-free parts, deliberately wrong inputs), see
``bench/bench_confidence.py`` and ``bench/results/confidence.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from .preprocess import GridMap, to_input_grid, to_model_grid

PROBABILITY_TYPES = ("float32", "uint8")
UNCERTAIN_BAND = (0.3, 0.7)
# Chosen from bench/results/confidence.json (bench/bench_confidence.py); see the README's
# "Confidence" section for the numbers they were chosen from.
LOW_CONFIDENCE_UNCERTAIN_SHARE = 0.25
LOW_CONFIDENCE_MEAN_PROBABILITY = 0.80
LOW_CONFIDENCE = "low confidence: check the result"

# What the probability map covers (``Prediction.probability_covers``)
COVERS_VOLUME = "volume"
COVERS_BOX = "box"
COVERS_NOTHING = "nothing"
COVERS_BODY = "body"
COVERS_NOTES = {
    COVERS_VOLUME: "the network's probability over the whole volume",
    COVERS_BOX: "fast mode: the network's probability inside the segmented box only; 0 outside it (not computed there)",
    COVERS_BODY: "full mode: the network's probability over the patient's body (its box); 0 in the air outside it (not computed there)",
    COVERS_NOTHING: "no spleen in view: 0 everywhere (the full-resolution network was not run)",
}
_STRUCTURE = ndimage.generate_binary_structure(3, 1)


@dataclass
class Confidence:
    """How sure the network was about one returned mask (measured on the model grid).

    Attributes:
        mean_probability: mean spleen probability over the mask's voxels (0-1).
        uncertain_share: share of the organ's voxels with a probability in ``UNCERTAIN_BAND`` (0-1).
        organ_voxels: model-grid voxels counted as the organ (mask plus its soft rim).
        low: True when the thresholds call it low confidence (a warning is added).
    """

    mean_probability: float
    uncertain_share: float
    organ_voxels: int
    low: bool

    def as_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)

    def summary(self) -> str:
        """One line for people: 'mean probability 0.93 inside the mask, 6.1 % of the organ uncertain (0.3-0.7)'."""
        lo, hi = UNCERTAIN_BAND
        return (
            f"mean probability {self.mean_probability:.2f} inside the mask, {100 * self.uncertain_share:.1f} % "
            f"of the organ uncertain ({lo:g}-{hi:g})"
        )


def check_probability_type(value: str | None) -> str | None:
    """None (no map) or one of ``PROBABILITY_TYPES``; anything else is a ValueError."""
    if value is not None and value not in PROBABILITY_TYPES:
        raise ValueError(f"probability must be None, 'float32' or 'uint8', got {value!r}")
    return value


def probability_on_input_grid(values: np.ndarray, region: GridMap, kind: str) -> np.ndarray:
    """(model grid or a box of it) probability -> (I, J, K) on the input grid, 0 outside ``region``.

    Args:
        values: (X, Y, Z) float32 spleen probability on ``region``'s model voxels.
        region: the grid map the network ran on (a box of the model grid in fast mode).
        kind: "float32" (0-1) or "uint8" (``round(255 p)``, made slab by slab: no float copy).
    """
    check_probability_type(kind)
    return to_input_grid(values, region, quantize=kind == "uint8")


def empty_probability(shape: tuple[int, int, int], kind: str) -> np.ndarray:
    """The map of a "no spleen in view" answer: all 0, of the asked type."""
    check_probability_type(kind)
    return np.zeros(shape, dtype=np.float32 if kind == "float32" else np.uint8)


def crop_around(
    values: np.ndarray, region: GridMap, mask: np.ndarray, affine: np.ndarray, margin: int = 2
) -> tuple[np.ndarray, GridMap] | None:
    """A copy of ``values`` on the model-grid box around ``mask`` (input grid), and that box's grid map.

    Keeps what the confidence needs after the full probability array is freed. None when
    ``mask`` is empty.
    """
    hits = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(h.size == 0 for h in hits):
        return None
    lo, hi = [h[0] for h in hits], [h[-1] for h in hits]  # the bounding box, without a list of voxels
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])], float)
    ras = corners @ affine[:3, :3].T + affine[:3, 3]
    inv = np.linalg.inv(region.model_affine)
    model = ras @ inv[:3, :3].T + inv[:3, 3]
    shape = np.asarray(values.shape)
    start = np.clip(np.floor(model.min(0)).astype(int) - margin, 0, shape)
    stop = np.clip(np.ceil(model.max(0)).astype(int) + margin + 1, 0, shape)
    if np.any(stop <= start):
        return None
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
    grid = region.crop(tuple(int(a) for a in start), tuple(int(b) for b in stop))  # type: ignore[arg-type]
    return np.array(values[box], dtype=np.float32), grid


def is_low(uncertain_share: float, mean_probability: float) -> bool:
    """The low-confidence rule (thresholds from ``bench/bench_confidence.py``)."""
    return uncertain_share > LOW_CONFIDENCE_UNCERTAIN_SHARE or mean_probability < LOW_CONFIDENCE_MEAN_PROBABILITY


def measure_confidence(values: np.ndarray, grid: GridMap, mask: np.ndarray) -> Confidence | None:
    """Confidence of the returned ``mask`` (input grid) from the probability ``values`` on ``grid``.

    Args:
        values: (X, Y, Z) float32 probability on ``grid``'s model voxels (see :func:`crop_around`).
        grid: grid map of those voxels.
        mask: (I, J, K) bool, the mask returned to the user.

    Returns:
        None when the mask covers no model voxel (then there is nothing to be sure about).
    """
    inside = to_model_grid(np.asarray(mask, dtype=bool).view(np.uint8), grid, order=0) > 0.5  # (X, Y, Z)
    if not inside.any():
        return None
    lo, hi = UNCERTAIN_BAND
    rim = ndimage.binary_dilation(inside, _STRUCTURE) & ~inside & (values >= lo)
    organ = inside | rim
    uncertain = organ & (values >= lo) & (values <= hi)
    share = float(np.count_nonzero(uncertain)) / float(np.count_nonzero(organ))
    mean = float(values[inside].mean())
    return Confidence(round(mean, 4), round(share, 4), int(np.count_nonzero(organ)), is_low(share, mean))


def low_confidence_warning(conf: Confidence) -> str:
    """The warning text, with the numbers that triggered it."""
    return (
        f"{LOW_CONFIDENCE} ({conf.summary()}; flagged above {100 * LOW_CONFIDENCE_UNCERTAIN_SHARE:.0f} % uncertain "
        f"or below a mean of {LOW_CONFIDENCE_MEAN_PROBABILITY:.2f})"
    )

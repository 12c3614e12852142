"""Segmentation metrics in physical units: Dice, 95% Hausdorff distance, surface Dice, volume error.

Surface distances come from MONAI (``compute_hausdorff_distance`` with ``percentile=95`` and
``compute_surface_dice``), with the voxel spacing in mm. Empty masks are handled here, before
MONAI is called, by fixed conventions:

============================  =====  ===========  ===========
case                          Dice   HD95 (mm)    surface Dice
============================  =====  ===========  ===========
both empty                    1      0            1
one empty, the other not      0      inf          0
============================  =====  ===========  ===========
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

METRIC_NAMES = (
    "dice", "hd95_mm", "surface_dice", "volume_pred_ml", "volume_ref_ml", "volume_error_ml", "volume_error_pct"
)


@dataclass
class CaseMetrics:
    """Metrics of one case (``volume_error`` = prediction minus reference)."""

    case: str
    dice: float
    hd95_mm: float
    surface_dice: float
    volume_pred_ml: float
    volume_ref_ml: float
    volume_error_ml: float
    volume_error_pct: float

    def as_row(self) -> dict[str, object]:
        return asdict(self)


def _check(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> None:
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if pred.ndim != 3:
        raise ValueError(f"masks must be 3D (I, J, K), got {pred.ndim}D")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive mm values, got {spacing}")


def dice_score(pred: np.ndarray, ref: np.ndarray) -> float:
    """2|A n B| / (|A| + |B|); 1 when both are empty."""
    a, b = pred.astype(bool), ref.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _onehot(mask: np.ndarray):
    import torch

    m = torch.from_numpy(mask.astype(bool))
    return torch.stack([~m, m])[None]  # (1, 2, I, J, K)


def hd95_mm(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the mask surfaces, in mm."""
    _check(pred, ref, spacing)
    a, b = pred.astype(bool), ref.astype(bool)
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return math.inf
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_hausdorff_distance(_onehot(a), _onehot(b), percentile=95, spacing=list(spacing))
    return float(value.reshape(-1)[0])


def surface_dice(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float], tolerance_mm: float = 2.0
) -> float:
    """Normalised surface Dice: share of both surfaces within ``tolerance_mm`` of the other."""
    _check(pred, ref, spacing)
    if tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    a, b = pred.astype(bool), ref.astype(bool)
    if not a.any() and not b.any():
        return 1.0
    if not a.any() or not b.any():
        return 0.0
    from monai.metrics import compute_surface_dice

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_surface_dice(_onehot(a), _onehot(b), class_thresholds=[float(tolerance_mm)],
                                     spacing=list(spacing))
    return float(value.reshape(-1)[0])


def case_metrics(case: str, pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float],
                 tolerance_mm: float = 2.0) -> CaseMetrics:
    """All metrics of one case; ``pred`` and ``ref`` are boolean (I, J, K) masks on one grid."""
    _check(pred, ref, spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    v_pred, v_ref = float(pred.astype(bool).sum()) * voxel_ml, float(ref.astype(bool).sum()) * voxel_ml
    return CaseMetrics(
        case=case,
        dice=dice_score(pred, ref),
        hd95_mm=hd95_mm(pred, ref, spacing),
        surface_dice=surface_dice(pred, ref, spacing, tolerance_mm),
        volume_pred_ml=v_pred,
        volume_ref_ml=v_ref,
        volume_error_ml=v_pred - v_ref,
        volume_error_pct=100.0 * (v_pred - v_ref) / v_ref if v_ref > 0 else (0.0 if v_pred == 0 else math.inf),
    )


def summarise(rows: list[CaseMetrics]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation, median, min and max of each metric over finite values.

    ``n_inf`` counts infinite values (a case where one mask is empty), which are left out.
    """
    out: dict[str, dict[str, float]] = {}
    for name in METRIC_NAMES:
        values = np.array([getattr(r, name) for r in rows], dtype=float)
        finite = values[np.isfinite(values)]
        stats = {"mean": math.nan, "std": math.nan, "median": math.nan, "min": math.nan, "max": math.nan}
        if finite.size:
            stats = {"mean": float(finite.mean()), "std": float(finite.std()), "median": float(np.median(finite)),
                     "min": float(finite.min()), "max": float(finite.max())}
        stats["n_inf"] = float(np.sum(~np.isfinite(values)))
        out[name] = stats
    return out

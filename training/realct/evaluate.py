"""Scores of a model on the real CTs: Dice, HD95 (mm), volume error, and anatomical checks.

Everything is measured on the scan's own grid against its reference (TotalSegmentator
pseudo-labels for P1 and P2, semi-automatic references for P3-P5: neither is manual ground truth). Anatomical checks follow RAS: +x is the patient's RIGHT, so a spleen on
the patient's left has its centroid at a smaller x than the body's midline.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from scipy import ndimage

from vnetseg import io as vio
from vnetseg.checkpoint import ModelInfo
from vnetseg.inference import InferenceOptions, predict_volume
from vnetseg.model import VNet
from vnetseg.postprocess import dice

from .sources import Scan, body_mask, centroid_ras


def hd95_mm(pred: np.ndarray, ref: np.ndarray, spacing: np.ndarray) -> float:
    """95th percentile symmetric Hausdorff distance between two masks' surfaces, in mm.

    Returns NaN when one mask is empty and the other is not (0.0 when both are empty).
    """
    if not pred.any() and not ref.any():
        return 0.0
    if not pred.any() or not ref.any():
        return float("nan")
    from monai.metrics import compute_hausdorff_distance

    value = compute_hausdorff_distance(
        pred[None, None].astype(np.float32),
        ref[None, None].astype(np.float32),
        include_background=True,
        percentile=95,
        spacing=[float(s) for s in spacing],
    )
    return float(value.reshape(-1)[0])


def mask_metrics(pred: np.ndarray, ref: np.ndarray, image: vio.Image) -> dict[str, float]:
    """Dice, HD95 (mm), predicted and reference volume (mL) and relative volume error (%)."""
    voxel_ml = image.voxel_volume_ml
    pred_ml, ref_ml = float(pred.sum()) * voxel_ml, float(ref.sum()) * voxel_ml
    return {
        "dice": round(float(dice(pred, ref)), 4),
        "hd95_mm": round(hd95_mm(pred, ref, image.spacing), 1),
        "volume_ml": round(pred_ml, 1),
        "reference_ml": round(ref_ml, 1),
        "volume_error_pct": round(100.0 * (pred_ml - ref_ml) / ref_ml, 1) if ref_ml > 0 else float("nan"),
    }


def anatomy_checks(mask: np.ndarray, image: vio.Image) -> dict[str, Any]:
    """Where the mask lies: side (patient's left = RAS x below the body midline), components, height."""
    if not mask.any():
        return {"empty": True}
    labels, n = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())[1:]
    centre = centroid_ras(mask, image.affine)
    midline = centroid_ras(body_mask(image.array), image.affine)
    return {
        "empty": False,
        "centroid_ras": [round(float(c), 1) for c in centre],
        "body_midline_x": round(float(midline[0]), 1),
        "patient_left": bool(centre[0] < midline[0]),
        "components": int(n),
        "largest_share": round(float(sizes.max() / sizes.sum()), 3),
    }


def misplaced(mask: np.ndarray, scan: Scan, distance_mm: float = 10.0) -> dict[str, Any]:
    """What the mask holds away from the reference spleen: its volume there, and which structures it covers.

    A voxel is misplaced when it lies more than ``distance_mm`` from every reference spleen voxel
    (a boundary disagreement is not a wrong organ). For scans with an organ label map (P1, P2) the
    misplaced volume is broken down by tissue group (heart, muscle, liver, ...).

    Returns:
        {"misplaced_ml": mL, "misplaced_in": {group: mL, ...} (label-map scans, groups over 1 mL)}.
    """
    from .anatomy import GROUP_NAMES
    from .synth import group_map

    if not mask.any():
        return {"misplaced_ml": 0.0, "misplaced_in": {}}
    far = ndimage.distance_transform_edt(~scan.spleen, sampling=scan.image.spacing) > distance_mm
    away = mask & far
    voxel_ml = scan.image.voxel_volume_ml
    where: dict[str, float] = {}
    if scan.version in ("v1", "v2") and away.any():
        groups = group_map(scan.labels[away], scan.version)
        names = [*GROUP_NAMES, "unlabelled"]
        counts = np.bincount(np.where(groups < 0, len(GROUP_NAMES), groups), minlength=len(names))
        where = {names[g]: round(float(c) * voxel_ml, 1) for g, c in enumerate(counts) if c * voxel_ml >= 1.0}
    return {"misplaced_ml": round(float(away.sum()) * voxel_ml, 1), "misplaced_in": where}


def evaluate_scan(scan: Scan, net: VNet, info: ModelInfo, mode: str = "full", overlap: float = 0.25) -> dict[str, Any]:
    """Segment one real scan and score it against its reference (and say what lies away from it)."""
    t0 = time.perf_counter()
    pred = predict_volume(scan.image, net, info, InferenceOptions(device="cpu", mode=mode, overlap=overlap))
    mask = pred.labelmap > 0
    out: dict[str, Any] = {
        "scan": scan.name,
        "patient": scan.patient,
        "mode": pred.mode,
        **mask_metrics(mask, scan.spleen, scan.image),
    }
    out.update(anatomy_checks(mask, scan.image))
    out.update(misplaced(mask, scan))
    out["found"] = pred.report.found
    out["warnings"] = list(pred.report.warnings)
    out["notes"] = list(pred.notes)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["_mask"] = mask
    return out


def evaluate_image(image: vio.Image, net: VNet, info: ModelInfo, mode: str = "full") -> dict[str, Any]:
    """Segment an image without reference (e.g. the pelvis part) and report volume and warnings."""
    pred = predict_volume(image, net, info, InferenceOptions(device="cpu", mode=mode))
    return {
        "mode": pred.mode,
        "found": pred.report.found,
        "message": pred.report.message,
        "volume_ml": round(pred.volume_ml, 1),
        "warnings": list(pred.report.warnings),
        "notes": list(pred.notes),
        "seconds": round(pred.seconds, 1),
    }

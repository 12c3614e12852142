"""The real CTs of ``../shared/data/ct`` as scans of five patients, with their label maps.

* P1: ``example_ct.nii.gz`` (abdomen + pelvis, 3 mm, native) with the v1 104-class map, and
  ``example_ct_sm.nii.gz`` (slices 82-111 of the same CT) with a v2 117-class map.
* P2: the 20-slice contrast DICOM series with the v2 map ``example_ct_dicom_multilabel_v2.nii.gz``
  (stored LAS; brought onto the CT's own LPS grid here, after checking both share one space).
* P3: TCIA CPTAC-LSCC C3N-00247, contrast chest CT reaching the upper abdomen (sharp kernel).
* P4: TCIA ACRIN-FLT-Breast_001, native low-dose PET/CT CT from the heart to the pelvis.
* P5: TCIA LIDC-IDRI-0001, contrast chest CT from the neck base to the mid kidneys.

P1 and P2 carry TotalSegmentator label maps (pseudo-labels; label 1 is the spleen in both
numberings). P3-P5 carry only a spleen reference made semi-automatically and checked slice by
slice (version "spleen": 1 = spleen, 0 = everything else); none is manual ground truth. It is not
known whether P1 and P2 are the same person.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from vnetseg import io as vio

REPO = Path(__file__).resolve().parents[2]
SPLEEN = 1
PELVIS_SLICES = (0, 50)  # example_ct slices 0..49: pelvis, 96 mm below the lowest spleen voxel
# name -> (patient, image, label map, label numbering)
FILES: dict[str, tuple[str, str, str, str]] = {
    "p1_ct": ("P1", "example_ct.nii.gz", "example_ct_multilabel_v1.nii.gz", "v1"),
    "p1_sm": ("P1", "example_ct_sm.nii.gz", "example_ct_sm_multilabel_v2.nii.gz", "v2"),
    "p2_dicom": ("P2", "example_ct_dicom", "example_ct_dicom_multilabel_v2.nii.gz", "v2"),
    "p3_cptac": ("P3", "cptac_lscc_c3n00247_ct.nii.gz", "cptac_lscc_c3n00247_spleen_ref.nii.gz", "spleen"),
    "p4_acrin": ("P4", "acrin_flt_breast_001_ct.nii.gz", "acrin_flt_breast_001_spleen_ref.nii.gz", "spleen"),
    "p5_lidc": ("P5", "lidc_idri_0001_ct.nii.gz", "lidc_idri_0001_spleen_ref.nii.gz", "spleen"),
}
ALL_SCANS = tuple(FILES)
PATIENTS = ("P1", "P2", "P3", "P4", "P5")
# contrast-enhanced or not, per patient (the README of the data folder)
CONTRAST = {"P1": False, "P2": True, "P3": True, "P4": False, "P5": True}


def ct_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The real-CT folder: ``path``, ``$VNETSEG_CT_DIR`` or ``../shared/data/ct`` next to the checkout."""
    if path is not None:
        folder = Path(path)
    else:
        env = os.environ.get("VNETSEG_CT_DIR")
        folder = Path(env) if env else REPO.parent / "shared" / "data" / "ct"
    if not (folder / "example_ct.nii.gz").is_file():
        raise FileNotFoundError(
            f"real CT folder {folder} does not hold example_ct.nii.gz; pass its location or set VNETSEG_CT_DIR"
        )
    return folder


@dataclass
class Scan:
    """One real CT with its label map (TotalSegmentator classes or spleen only) on the same grid.

    Attributes:
        name: short name (a key of ``FILES``: "p1_ct", "p1_sm", "p2_dicom", "p3_cptac", ...).
        patient: "P1" to "P5".
        image: the CT in HU, (I, J, K) with its voxel-to-RAS affine.
        labels: (I, J, K) int16 label map on the image grid.
        version: "v1" or "v2" TotalSegmentator numbering, or "spleen" (a spleen-only reference).
        source: file or folder name in the real-CT folder.
    """

    name: str
    patient: str
    image: vio.Image
    labels: np.ndarray
    version: str
    source: str

    @property
    def spleen(self) -> np.ndarray:
        """(I, J, K) bool reference spleen mask (the pseudo-label)."""
        return self.labels == SPLEEN


def label_onto(label: vio.Image, image: vio.Image, tol_mm: float = 0.01) -> np.ndarray:
    """Reorient a label map that covers the same voxels as ``image`` in another axis order/direction.

    Raises:
        ValueError: when the two do not describe the same grid in physical space.
    """
    src = nib.orientations.io_orientation(label.affine)
    dst = nib.orientations.io_orientation(image.affine)
    transform = nib.orientations.ornt_transform(src, dst)
    array = nib.orientations.apply_orientation(label.array, transform)
    affine = label.affine @ nib.orientations.inv_ornt_aff(transform, label.shape)
    if array.shape != image.shape or np.abs(affine - image.affine).max() > tol_mm:
        raise ValueError(
            f"label map (shape {label.shape}) does not cover the image grid (shape {image.shape}) in physical space; "
            f"largest affine difference after reorienting {np.abs(affine - image.affine).max():.3g} mm"
        )
    return np.ascontiguousarray(array)


def load_scans(folder: str | os.PathLike[str] | None = None, names: tuple[str, ...] = ALL_SCANS) -> list[Scan]:
    """Read the real scans named in ``names`` (keys of ``FILES``) from the real-CT folder."""
    root = ct_dir(folder)
    scans = []
    for name in names:
        if name not in FILES:
            raise ValueError(f"unknown scan {name!r}; known: {sorted(FILES)}")
        patient, image_name, label_name, version = FILES[name]
        image = vio.read_image(root / image_name)
        label = vio.read_image(root / label_name)
        labels = label_onto(label, image).round().astype(np.int16)
        scans.append(
            Scan(name, patient, vio.Image(image.array.astype(np.float32), image.affine), labels, version, image_name)
        )
    return scans


def pelvis_part(scan: Scan, slices: tuple[int, int] = PELVIS_SLICES) -> vio.Image:
    """The pelvis part of ``example_ct`` (axial slices ``slices``), with its true affine (origin moved)."""
    lo, hi = slices
    affine = scan.image.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.array([0, 0, lo]) + affine[:3, 3]
    return vio.Image(np.ascontiguousarray(scan.image.array[:, :, lo:hi]), affine)


def body_mask(hu: np.ndarray, threshold: float = -300.0) -> np.ndarray:
    """(I, J, K) bool: voxels denser than ``threshold`` HU (the body, table included)."""
    return hu > threshold


def centroid_ras(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """RAS position (mm) of the centre of a mask's voxels."""
    idx = np.argwhere(mask)
    if idx.size == 0:
        raise ValueError("centroid of an empty mask")
    return affine[:3, :3] @ idx.mean(0) + affine[:3, 3]


def _crop_slices(scan: Scan, lo: int, hi: int) -> vio.Image:
    """Slices ``lo:hi`` along the scan's head-foot index axis, with the true affine (origin moved)."""
    axis = int(np.argmax(np.abs(scan.image.affine[2, :3])))
    index = [slice(None)] * 3
    index[axis] = slice(lo, hi)
    shift = np.zeros(3)
    shift[axis] = lo
    affine = scan.image.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ shift + affine[:3, 3]
    return vio.Image(np.ascontiguousarray(scan.image.array[tuple(index)]), affine)


def spleen_free_parts(scan: Scan, gap_mm: float = 20.0, min_mm: float = 45.0) -> dict[str, vio.Image]:
    """The parts of ``scan`` that hold no spleen: above its top ("chest") and below its bottom ("below").

    Each part keeps ``gap_mm`` away (head-foot) from the nearest reference spleen voxel and is
    kept only when it is at least ``min_mm`` long. ``example_ct``'s part below the spleen is its
    lower abdomen and pelvis, the chest CTs' part above it their chest with the heart.

    Returns:
        name -> CT part with its true affine (an empty dict when the spleen spans the scan).
    """
    affine = scan.image.affine
    axis = int(np.argmax(np.abs(affine[2, :3])))
    step = float(affine[2, axis])  # mm of z per index along that axis (sign: which way is up)
    n = scan.image.shape[axis]
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(scan.spleen.any(axis=other))
    if present.size == 0:
        return {"whole": scan.image}
    gap, need = int(np.ceil(gap_mm / abs(step))), int(np.ceil(min_mm / abs(step)))
    low_part = (0, int(present.min()) - gap)  # lower indices
    high_part = (int(present.max()) + 1 + gap, n)
    below, above = (low_part, high_part) if step > 0 else (high_part, low_part)
    parts = {}
    for name, (lo, hi) in (("chest", above), ("below", below)):
        if hi - lo >= need:
            parts[name] = _crop_slices(scan, lo, hi)
    return parts


# issue 12's pelvis-only crops: the lowest slices of each CT whose range reaches the pelvis (index
# range along its head-foot axis, as ``_crop_slices`` takes it). Looked at on the images: P1's lowest
# 150 mm (iliac wings, sacrum, hips; 96 mm under the lowest spleen voxel; ``PELVIS_SLICES``) and P4's
# lowest 98 mm (iliac wings and sacrum, 4.25 mm slices). P2's 40 mm series and the chest CTs of P3
# and P5 do not reach the pelvis.
PELVIS_PARTS: dict[str, tuple[int, int]] = {"p1_ct": PELVIS_SLICES, "p4_acrin": (0, 23)}


def pelvis_parts(scan: Scan) -> dict[str, vio.Image]:
    """{"pelvis": the scan's pelvis-only crop} (``PELVIS_PARTS``), or {} for a CT that does not reach the pelvis.

    Raises:
        ValueError: when the crop holds reference spleen (the table does not fit this CT).
    """
    if scan.name not in PELVIS_PARTS:
        return {}
    lo, hi = PELVIS_PARTS[scan.name]
    axis = int(np.argmax(np.abs(scan.image.affine[2, :3])))
    index = [slice(None)] * 3
    index[axis] = slice(lo, hi)
    if scan.spleen[tuple(index)].any():
        raise ValueError(f"{scan.name}: the pelvis slices {lo}-{hi - 1} hold reference spleen; PELVIS_PARTS is wrong for it")
    return {"pelvis": _crop_slices(scan, lo, hi)}


# scan ranges that end this far beyond the spleen (the spleen-free parts above are 20 mm away):
# a CT may end anywhere, and v2.0.0's locator called the kidney spleen at the top edge of a lower
# abdomen ending 10-40 mm under the spleen
RANGE_END_GAPS_MM = (10.0, 30.0, 40.0, 60.0, 80.0)


def range_end_parts(scan: Scan, gaps_mm: tuple[float, ...] = RANGE_END_GAPS_MM, min_mm: float = 45.0) -> dict[str, vio.Image]:
    """:func:`spleen_free_parts` whose scan range ends ``gap`` mm beyond the spleen, for each gap.

    Returns:
        "<part> <gap> mm" (e.g. "below 40 mm") -> CT part with its true affine.
    """
    out = {}
    for gap in gaps_mm:
        for part, image in spleen_free_parts(scan, gap_mm=gap, min_mm=min_mm).items():
            if part != "whole":
                out[f"{part} {gap:g} mm"] = image
    return out


"""The real CTs of ``../shared/data/ct`` as scans of two patients, with their label maps.

* P1: ``example_ct.nii.gz`` (abdomen + pelvis, 3 mm) with the v1 104-class map, and
  ``example_ct_sm.nii.gz`` (slices 82-111 of the same CT) with a v2 117-class map.
* P2: the 20-slice DICOM series with the v2 map ``example_ct_dicom_multilabel_v2.nii.gz``
  (stored LAS; brought onto the CT's own LPS grid here, after checking both share one space).

It is not known whether P1 and P2 are the same person. The labels are TotalSegmentator
predictions (pseudo-labels), not manual ground truth; label 1 is the spleen in both numberings.
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
    """One real CT with its TotalSegmentator label map on the same grid.

    Attributes:
        name: short name ("p1_ct", "p1_sm", "p2_dicom").
        patient: "P1" or "P2".
        image: the CT in HU, (I, J, K) with its voxel-to-RAS affine.
        labels: (I, J, K) int16 label map on the image grid.
        version: "v1" or "v2" label numbering.
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


def load_scans(
    folder: str | os.PathLike[str] | None = None, names: tuple[str, ...] = ("p1_ct", "p1_sm", "p2_dicom")
) -> list[Scan]:
    """Read the real scans named in ``names`` from the real-CT folder."""
    root = ct_dir(folder)
    files = {
        "p1_ct": ("P1", "example_ct.nii.gz", "example_ct_multilabel_v1.nii.gz", "v1"),
        "p1_sm": ("P1", "example_ct_sm.nii.gz", "example_ct_sm_multilabel_v2.nii.gz", "v2"),
        "p2_dicom": ("P2", "example_ct_dicom", "example_ct_dicom_multilabel_v2.nii.gz", "v2"),
    }
    scans = []
    for name in names:
        if name not in files:
            raise ValueError(f"unknown scan {name!r}; known: {sorted(files)}")
        patient, image_name, label_name, version = files[name]
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

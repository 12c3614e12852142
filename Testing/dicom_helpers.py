"""Temporary copies of the real DICOM series in ../shared/data/ct, with files deleted, duplicated, mixed or edited."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

ACRIN_SERIES_1 = "1.3.6.1.4.1.14519.5.2.1.7009.2401.264410460039008685576999729346"  # head-to-chest part, 1-040..1-051
ACRIN_SERIES_2 = "1.3.6.1.4.1.14519.5.2.1.7009.2401.307437172854557023978824805941"  # chest-to-pelvis part, 1-150..1-161


def copy_series(src: Path, dest: Path, names: list[str] | None = None) -> Path:
    """Copy the DICOM files of ``src`` (all, or those named) into folder ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and (names is None or f.name in names):
            shutil.copy2(f, dest / f.name)
    return dest


def acrin_part(ct_dir: Path, dest: Path, series: int) -> Path:
    """One of the two series of the ACRIN exam folder alone (12 slices each)."""
    numbers = range(40, 52) if series == 1 else range(150, 162)
    return copy_series(ct_dir / "acrin_flt_breast_001_exam_dicom", dest, [f"1-{n:03d}.dcm" for n in numbers])


def files_by_position(folder: Path) -> list[Path]:
    """The DICOM files of ``folder`` sorted by slice position (z, ascending: axial series)."""
    import pydicom

    files = [f for f in folder.iterdir() if f.is_file()]
    return sorted(files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))


def give_uids(folder: Path) -> dict[str, str]:
    """Fill blanked Study / Series / SOP Instance UIDs (the de-identified example series has none), in place."""
    import pydicom
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    sop_class = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        sop = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID = study, series, sop, sop_class
        ds.file_meta.MediaStorageSOPInstanceUID, ds.file_meta.MediaStorageSOPClassUID = sop, sop_class
        ds.save_as(f)
    return {"study": study, "series": series}


def tilt(folder: Path, degrees: float) -> None:
    """Shear the stack as a gantry tilt does: each slice moves sideways (y) by tan(angle) x its z offset."""
    import pydicom

    files = files_by_position(folder)
    z0 = float(pydicom.dcmread(files[0], stop_before_pixels=True).ImagePositionPatient[2])
    for f in files:
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + np.tan(np.radians(degrees)) * (z - z0), z]
        ds.save_as(f)

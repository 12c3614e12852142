"""DICOM series folders: which series a folder holds, choosing one, and checking its slice geometry.

Only the DICOM header fields are read here (with SimpleITK's GDCM reader, no extra dependency); the
voxels are read by :mod:`vnetseg.io`. The slice geometry is checked from the positions themselves
(Image Position / Orientation (Patient)) before anything is read, because a series with a missing
slice or a gantry tilt would otherwise be read as an evenly spaced, orthogonal stack: the mask would
not overlay the CT beyond the gap and its volume in mL would be wrong.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

TAGS = {
    "series_uid": "0020|000e",
    "study_uid": "0020|000d",
    "sop_uid": "0008|0018",
    "frame_of_reference_uid": "0020|0052",
    "position": "0020|0032",
    "orientation": "0020|0037",
    "description": "0008|103e",
    "modality": "0008|0060",
    "thickness": "0018|0050",
    "body_part": "0018|0015",
    "series_number": "0020|0011",
    "rows": "0028|0010",
    "columns": "0028|0011",
}
# positions are stored as decimal strings; this much disagreement (mm, or this share of the slice
# spacing, whichever is larger) is rounding, not geometry
POSITION_TOLERANCE_MM = 0.01
SPACING_TOLERANCE = 0.01


class DicomError(ValueError):
    """A DICOM folder or series that cannot be read as one regular CT volume; the message says why."""


@dataclass
class SliceHeader:
    """The header fields of one DICOM file that matter here."""

    path: Path
    fields: dict[str, str]

    def get(self, key: str) -> str:
        return self.fields.get(key, "")

    def vector(self, key: str, size: int) -> np.ndarray | None:
        try:
            values = [float(v) for v in self.get(key).replace(" ", "").split("\\") if v != ""]
        except ValueError:
            return None
        return np.array(values) if len(values) == size else None


@dataclass
class DicomSeries:
    """One series of a folder, its files sorted along the slice normal (ascending).

    Attributes:
        uid: Series Instance UID.
        files: the series' files, one per slice position, in volume order (k = 0, 1, ...).
        headers: the header of each file in ``files``.
        notes: what was noticed and handled (e.g. a duplicated file that was skipped).
        positions_mm: each slice's position along the slice normal, mm.
        slice_index: where each file lies on the regular grid the volume is read onto: ``k`` of
            ``files[n]`` is ``slice_index[n]`` (``range(len(files))`` unless slices are missing and
            gaps were allowed).
        slice_count: slices of that regular grid (more than ``len(files)`` when slices are missing).
        spacing_mm: the distance between slices on that grid (None: not computed, e.g. one file).
    """

    uid: str
    files: list[Path]
    headers: list[SliceHeader]
    notes: list[str] = field(default_factory=list)
    positions_mm: list[float] = field(default_factory=list)
    slice_index: list[int] = field(default_factory=list)
    slice_count: int = 0
    spacing_mm: float | None = None

    @property
    def has_gaps(self) -> bool:
        return self.slice_count > len(self.files)

    @property
    def first(self) -> SliceHeader:
        return self.headers[0]

    @property
    def description(self) -> str:
        return self.first.get("description")

    @property
    def modality(self) -> str:
        return self.first.get("modality")

    @property
    def body_part(self) -> str:
        return self.first.get("body_part")

    @property
    def series_number(self) -> str:
        return self.first.get("series_number")

    @property
    def thickness_mm(self) -> float | None:
        try:
            return float(self.first.get("thickness"))
        except ValueError:
            return None

    def summary(self) -> str:
        """One line: UID, description, modality, slice count and thickness, body part, extent."""
        parts = [self.modality or "modality unknown", f"{len(self.files)} slices"]
        if self.thickness_mm is not None:
            parts[-1] += f" of {self.thickness_mm:g} mm"
        if self.body_part:
            parts.append(self.body_part)
        if self.positions_mm:
            parts.append(f"from {min(self.positions_mm):.1f} to {max(self.positions_mm):.1f} mm along the slice normal")
        desc = f'"{self.description}" ' if self.description else ""
        return f"{self.uid or '(no Series Instance UID)'} {desc}({', '.join(parts)})"

    def as_dict(self) -> dict[str, object]:
        """What a batch report records about the series that was used."""
        return {
            "uid": self.uid,
            "description": self.description,
            "modality": self.modality,
            "series_number": self.series_number,
            "slices": len(self.files),
            "slice_thickness_mm": self.thickness_mm,
            "body_part": self.body_part,
        }


# --------------------------------------------------------------------------------- scanning
def read_header(path: Path) -> SliceHeader | None:
    """The header of ``path`` if it is a DICOM image file, else None."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    fields = {key: reader.GetMetaData(tag).strip() for key, tag in TAGS.items() if reader.HasMetaDataKey(tag)}
    return SliceHeader(path, fields)  # files without a Series Instance UID (blanked) form one series, as in GDCM


def scan_folder(folder: str | os.PathLike[str]) -> list[DicomSeries]:
    """Every DICOM series in ``folder`` (not its subfolders), in a stable order (series number, UID).

    Files that are not DICOM images (notes, macOS ``._*`` files) are ignored.
    """
    groups: dict[str, list[SliceHeader]] = {}
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file() or path.name.startswith("._"):
            continue
        header = read_header(path)
        if header is not None:
            groups.setdefault(header.get("series_uid"), []).append(header)
    series = [DicomSeries(uid, [h.path for h in hs], hs) for uid, hs in groups.items()]

    def order(s: DicomSeries) -> tuple[int, str]:
        try:
            return int(s.series_number), s.uid
        except ValueError:
            return 1 << 30, s.uid

    series.sort(key=order)
    for s in series:
        _sort_slices(s)
    return series


def _sort_slices(series: DicomSeries) -> None:
    """Sort along the slice normal (ascending), as GDCM does; unsortable series keep file order."""
    normal = _normal(series.first)
    if normal is None:
        return
    keyed = []
    for h in series.headers:
        pos = h.vector("position", 3)
        if pos is None:
            return
        keyed.append((float(pos @ normal), h))
    keyed.sort(key=lambda t: t[0])
    series.headers = [h for _, h in keyed]
    series.files = [h.path for h in series.headers]
    series.positions_mm = [d for d, _ in keyed]


def _normal(header: SliceHeader) -> np.ndarray | None:
    orient = header.vector("orientation", 6)
    if orient is None:
        return None
    n = np.cross(orient[:3], orient[3:])
    norm = np.linalg.norm(n)
    return n / norm if norm > 1e-6 else None


# ---------------------------------------------------------------------------------- choosing
def select_series(folder: str | os.PathLike[str], choice: str | None = None, allow_gaps: bool = False) -> DicomSeries:
    """The one series of ``folder`` to read, chosen by ``choice`` (1-based number or UID) when there are several.

    The chosen series' geometry is checked (:func:`check_geometry`), duplicates removed;
    ``allow_gaps`` accepts missing slices (placed on the regular grid, with a note) instead of refusing.

    Raises:
        DicomError: no series; several and no (or no matching) ``choice``; a geometry problem.
    """
    folder = Path(folder)
    found = scan_folder(folder)
    if not found:
        raise DicomError(f"folder {folder} holds no DICOM series; give a DICOM folder or an image file")
    listing = "; ".join(f"{n}: {s.summary()}" for n, s in enumerate(found, start=1))
    if choice is None or choice == "":
        if len(found) > 1:
            raise DicomError(f"folder {folder} holds {len(found)} DICOM series; choose one with --series N or --series UID: {listing}")
        chosen = found[0]
    else:
        chosen = _match(found, choice.strip())
        if chosen is None:
            raise DicomError(f"--series {choice}: no such series in {folder}; it holds {listing}")
    check_geometry(chosen, folder, allow_gaps)
    return chosen


def _match(found: list[DicomSeries], choice: str) -> DicomSeries | None:
    if choice.isdigit() and 1 <= int(choice) <= len(found):
        return found[int(choice) - 1]
    hits = [s for s in found if s.uid == choice]
    return hits[0] if hits else None


# ---------------------------------------------------------------------------------- geometry
def check_geometry(series: DicomSeries, folder: Path, allow_gaps: bool = False) -> None:
    """Refuse slice stacks that are not one evenly spaced, orthogonal volume; drop exact duplicates.

    Checks, from Image Position / Orientation (Patient): one orientation for all slices; no two
    different images at one position (an exact duplicate - same SOP Instance UID - is skipped with a
    note); no gantry tilt (the positions move along the slice normal only); even spacing (missing
    slices are named by their expected positions; with ``allow_gaps`` they are accepted: the
    series gets its ``slice_index`` on the regular grid and a note).

    Raises:
        DicomError: with one line that says what is wrong and where.
    """
    name = f"DICOM series {series.uid or '(no UID)'} in {folder}"
    series.slice_index, series.slice_count = list(range(len(series.files))), len(series.files)
    if len(series.headers) < 2:
        return  # a single (perhaps multi-frame) file: nothing to compare; the reader checks the rest
    orients = [h.vector("orientation", 6) for h in series.headers]
    positions = [h.vector("position", 3) for h in series.headers]
    if any(o is None for o in orients) or any(p is None for p in positions):
        raise DicomError(f"{name}: some files have no Image Position/Orientation (Patient); the slices cannot be placed")
    if np.max(np.abs(np.array(orients) - orients[0])) > 1e-4:
        raise DicomError(f"{name}: the slices have different orientations; it is not one volume (split the series)")
    _drop_duplicates(series, name)
    series.slice_index, series.slice_count = list(range(len(series.files))), len(series.files)
    normal = _normal(series.first)
    if normal is None:
        raise DicomError(f"{name}: its Image Orientation (Patient) is degenerate")
    pos = np.array([h.vector("position", 3) for h in series.headers])
    along = pos @ normal
    if len(along) < 2:
        return
    lateral = pos - along[:, None] * normal[None, :]  # the in-plane offset of each slice
    drift = float(np.max(np.linalg.norm(lateral - lateral[0], axis=1)))
    extent = float(along[-1] - along[0])
    if drift > max(POSITION_TOLERANCE_MM, 1e-3 * extent):
        tilt = math.degrees(math.atan2(drift, extent))
        raise DicomError(
            f"{name}: the slices are sheared (gantry tilt of about {tilt:.1f} degrees: slice positions move "
            f"{drift:.1f} mm sideways over {extent:.1f} mm); this reader needs slices stacked along their normal: "
            "resample the series first (e.g. in Slicer, the DICOM module's acquisition geometry regularization)"
        )
    _check_spacing(series, along, pos, normal, name, allow_gaps)


def _drop_duplicates(series: DicomSeries, name: str) -> None:
    keep: list[SliceHeader] = []
    dropped: list[str] = []
    for h in series.headers:
        p = h.vector("position", 3)
        same = [k for k in keep if np.linalg.norm(k.vector("position", 3) - p) < POSITION_TOLERANCE_MM]  # type: ignore[operator]
        if not same:
            keep.append(h)
        elif _same_instance(h, same[0]):
            dropped.append(h.path.name)
        else:
            raise DicomError(
                f"{name}: {same[0].path.name} and {h.path.name} are different images at the same position "
                f"({_fmt(p)}) mm; keep one of them (two acquisitions mixed in one series?)"
            )
    if dropped:
        series.notes.append(f"skipped {len(dropped)} duplicate file(s) of slices already read: {', '.join(dropped[:5])}")
    series.headers = keep
    series.files = [h.path for h in keep]
    normal = _normal(series.first)
    if normal is not None:
        series.positions_mm = [float(h.vector("position", 3) @ normal) for h in keep]  # type: ignore[operator]


def _same_instance(a: SliceHeader, b: SliceHeader) -> bool:
    """One image twice: the same SOP Instance UID, or (UIDs blanked) the same file contents."""
    if a.get("sop_uid") or b.get("sop_uid"):
        return a.get("sop_uid") == b.get("sop_uid")
    return a.path.stat().st_size == b.path.stat().st_size and a.path.read_bytes() == b.path.read_bytes()


def _check_spacing(
    series: DicomSeries, along: np.ndarray, pos: np.ndarray, normal: np.ndarray, name: str, allow_gaps: bool
) -> None:
    gaps = np.diff(along)
    step = float(np.median(gaps))
    series.spacing_mm = step
    tol = max(POSITION_TOLERANCE_MM, SPACING_TOLERANCE * step)
    if np.all(np.abs(gaps - step) <= tol):
        return
    missing: list[np.ndarray] = []
    for i, gap in enumerate(gaps):
        count = round(gap / step)
        if abs(gap - step) <= tol:
            continue
        if count < 2 or abs(gap - count * step) > tol:
            raise DicomError(
                f"{name}: the slice spacing is irregular ({gaps.min():.2f} to {gaps.max():.2f} mm, e.g. "
                f"{gap:.2f} mm after {_fmt(pos[i])}); it cannot be read as one evenly spaced volume: resample it first"
            )
        missing += [pos[i] + j * step * normal for j in range(1, count)]
    shown = "; ".join(f"({_fmt(p)})" for p in missing[:10]) + ("; ..." if len(missing) > 10 else "")
    what = (f"{len(missing)} slice(s) missing from an evenly spaced series (every {step:g} mm from "
            f"{along[0]:.2f} to {along[-1]:.2f} mm along the slice normal), expected at x y z = {shown} mm")
    if allow_gaps:
        series.slice_index = [int(np.rint((d - along[0]) / step)) for d in along]
        series.slice_count = series.slice_index[-1] + 1
        series.notes.append(
            f"{what}: read on the regular {step:g} mm grid, the missing slice(s) interpolated from their neighbours "
            "(the mask there is an estimate; every real slice is where it was acquired)"
        )
        return
    raise DicomError(
        f"{name}: {what}; restore the missing files (re-export the series), or pass --allow-gaps to read the "
        "slices where they are (missing ones interpolated); read evenly spaced, the mask would not overlay the CT"
    )


def _fmt(p: np.ndarray | None) -> str:
    return " ".join(f"{v:.2f}" for v in (p if p is not None else []))


# -------------------------------------------------------------------------------- reading
def read_series_image(folder: Path, dtype: type | None, choice: str | None = None, allow_gaps: bool = False) -> Any:
    """The voxels of the chosen, checked series of ``folder`` as a :class:`vnetseg.io.Image` (its
    ``source`` is the :class:`DicomSeries`: slice k of the array is ``source.files[k]``, or with gaps,
    ``source.slice_index`` says where each file went)."""
    from . import io as vio

    p = folder
    try:
        series = select_series(p, choice, allow_gaps)  # one series, its geometry checked, files in volume order
    except DicomError as exc:
        raise vio.ImageError(str(exc)) from None
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in series.files])
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    if series.has_gaps:  # known and handled below; ITK's "missing slices" warning would only add noise
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise vio.ImageError(f"DICOM series in {p} could not be read ({str(exc).strip().splitlines()[-1][:200]})") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    image = vio._from_sitk(img, p.name, dtype)
    if series.has_gaps:
        image = _onto_regular_grid(image, series)
    image.source, image.notes = series, list(series.notes)
    return image


def _onto_regular_grid(image: Any, series: DicomSeries) -> Any:
    """The slices of a series with gaps at their own positions on its regular grid; missing ones
    interpolated linearly along k from the nearest real slices on either side."""
    present = np.asarray(series.slice_index)
    full = np.empty((*image.shape[:2], series.slice_count), dtype=image.array.dtype)
    full[:, :, present] = image.array
    for k in sorted(set(range(series.slice_count)) - set(present.tolist())):
        after = int(np.searchsorted(present, k))
        k0, k1 = present[after - 1], present[after]
        w = (k - k0) / (k1 - k0)
        mixed = (1.0 - w) * full[:, :, k0].astype(np.float32) + w * full[:, :, k1].astype(np.float32)
        full[:, :, k] = np.round(mixed) if np.issubdtype(full.dtype, np.integer) else mixed
    affine = image.affine.copy()
    direction = affine[:3, 2] / np.linalg.norm(affine[:3, 2])  # ITK's slice direction: the slice normal
    affine[:3, 2] = direction * series.spacing_mm
    return type(image)(full, affine)

"""DICOM Segmentation (SEG) output, with highdicom (an optional extra: ``pip install "vnetseg[dicom]"``).

The SEG object references the CT series it was made from (Study, Series and SOP Instance UIDs, Frame
of Reference), carries each segment's terminology (from the model's Slicer terminology tag, e.g.
SNOMED CT Anatomical Structure / Spleen 78961009), its recommended display colour, and the algorithm
(the model's name, version, and file SHA-256). Its frames are the source slices themselves: frame
``k`` of the mask is written against source image ``k`` (highdicom copies that image's position), so
the SEG lies exactly on the CT (a series read with missing slices: only the real slices get frames). Slices where the mask is empty are omitted, as usual for SEG; an
all-empty mask is written with every frame (a valid, empty segmentation).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from . import io as vio

# position tolerance (mm) between the mask's grid and the source series' slices
GEOMETRY_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class Algorithm:
    """What made the segmentation: written to the SEG's Segment Algorithm Identification.

    Attributes:
        name: the model's name (e.g. "spleen-ct-light").
        version: the model's version (e.g. "1.1.0").
        sha256: SHA-256 of the model file (hex), recorded as an algorithm parameter.
    """

    name: str
    version: str
    sha256: str = ""


def algorithm_of(info: Any) -> Algorithm:
    """The :class:`Algorithm` of a loaded model's :class:`vnetseg.checkpoint.ModelInfo`."""
    card = getattr(info, "card", {}) or {}
    return Algorithm(str(card.get("name") or "vnetseg model"), str(card.get("version") or "unversioned"), info.sha256 or "")


def _import_highdicom() -> Any:
    try:
        import highdicom
    except ImportError:
        raise ImportError(
            'DICOM SEG output needs the highdicom package: pip install "vnetseg[dicom]" (or pip install highdicom); '
            "or write .nii.gz / .seg.nrrd instead"
        ) from None
    return highdicom


def parse_terminology(tag: str) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """Slicer's ``context~category~type~...`` tag -> ((scheme, value, meaning) of category, of type).

    Raises:
        ValueError: the tag has no coded category and type.
    """
    parts = tag.split("~")
    if len(parts) < 3:
        raise ValueError(f"terminology {tag!r}: expected Slicer's 'context~SCHEME^value^meaning~SCHEME^value^meaning~...'")
    codes = []
    for part in parts[1:3]:
        fields = part.split("^")
        if len(fields) != 3 or not all(fields):
            raise ValueError(f"terminology {tag!r}: {part!r} is not a 'SCHEME^value^meaning' code")
        codes.append((fields[0], fields[1], fields[2]))
    return codes[0], codes[1]


def check_on_source(shape: tuple[int, ...], affine: np.ndarray, source: Any) -> None:
    """Raise unless the mask's grid is the source series' own grid (frames exactly on its slices)."""
    check_references(source)
    first = source.headers[0]
    rows, cols = _int(first.fields.get("rows")), _int(first.fields.get("columns"))
    index = _slice_index(source)
    expected = (cols, rows, max(index) + 1) if rows and cols else None
    if expected is not None and tuple(shape) != expected:
        raise ValueError(f"mask shape {tuple(shape)} is not the source series' grid {expected} (columns, rows, slices)")
    origin_ras = vio.LPS_TO_RAS[:3, :3] @ first.vector("position", 3)
    for k, header in zip(index, source.headers):
        pos_ras = vio.LPS_TO_RAS[:3, :3] @ header.vector("position", 3)
        voxel = np.asarray(affine, dtype=float) @ np.array([0.0, 0.0, float(k), 1.0])
        if np.linalg.norm(voxel[:3] - pos_ras) > GEOMETRY_TOLERANCE_MM + 1e-6 * np.linalg.norm(origin_ras):
            raise ValueError(
                f"mask slice {k} lies at {np.round(voxel[:3], 3).tolist()} (RAS) but source image {header.path.name} at "
                f"{np.round(pos_ras, 3).tolist()}; the mask must be on the source series' grid"
            )


def check_references(source: Any) -> None:
    """Raise unless every source image has the UIDs a SEG must reference, and highdicom is installed."""
    if source is None or not getattr(source, "files", None):
        raise ValueError(
            "DICOM SEG output needs a DICOM series as input (it references the source images); "
            "this input is not DICOM: write .nii.gz or .seg.nrrd instead"
        )
    blank = [
        label
        for key, label in (("study_uid", "Study"), ("series_uid", "Series"), ("sop_uid", "SOP"), ("frame_of_reference_uid", "Frame of Reference"))
        if not all(h.get(key) for h in source.headers)
    ]
    if blank:
        raise ValueError(
            f"the source DICOM images have no {', '.join(blank)} (Instance) UID (blanked by de-identification?), "
            "so a DICOM SEG cannot reference them; write .seg.nrrd or .nii.gz instead"
        )
    _import_highdicom()


def _int(text: str | None) -> int | None:
    try:
        return int(str(text))
    except (TypeError, ValueError):
        return None


def _slice_index(source: Any) -> list[int]:
    """k of each source file on the mask's grid (a series read with gaps skips the missing k)."""
    return list(getattr(source, "slice_index", None) or range(len(source.files)))


def _frames(mask: np.ndarray, index: list[int]) -> np.ndarray:
    """(I, J, K) = (columns, rows, slices) mask -> (files, rows, columns) frames, one per source image."""
    return np.ascontiguousarray(np.asarray(mask).transpose(2, 1, 0)[index])


def build_dicom_seg(
    mask: np.ndarray,
    affine: np.ndarray,
    segments: Sequence[vio.SegmentSpec],
    source: Any,
    algorithm: Algorithm | None = None,
) -> Any:
    """The highdicom ``Segmentation`` of label map ``mask`` (I, J, K) on the grid of DICOM ``source``.

    Args:
        mask: (I, J, K) integer labels on the source series' grid (k = ``source.files[k]``).
        affine: voxel-to-RAS matrix of ``mask`` (checked against the source positions).
        segments: label value, name, colour and Slicer terminology of each segment.
        source: the :class:`vnetseg.dicom.DicomSeries` the CT was read from.
        algorithm: the model that made it (name, version, SHA-256).

    Raises:
        ValueError: not a DICOM source, a mask off its grid, or a segment without terminology.
        ImportError: highdicom is not installed.
    """
    check_on_source(np.shape(mask), affine, source)
    hd = _import_highdicom()
    import pydicom
    from pydicom.sr.coding import Code

    algorithm = algorithm or Algorithm("vnetseg model", "unversioned")
    ident = hd.AlgorithmIdentificationSequence(
        name=algorithm.name[:64],
        family=Code("123109", "DCM", "Artificial Intelligence"),
        version=algorithm.version[:64],
        source=f"vnetseg {__version__}",
        parameters={"model_sha256": algorithm.sha256} if algorithm.sha256 else None,
    )
    descriptions = []
    labels = np.asarray(mask)
    for number, seg in enumerate(segments, start=1):
        (c_scheme, c_value, c_meaning), (t_scheme, t_value, t_meaning) = parse_terminology(seg.terminology)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=seg.name[:64],
                segmented_property_category=Code(c_value, c_scheme, c_meaning),
                segmented_property_type=Code(t_value, t_scheme, t_meaning),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=ident,
                tracking_uid=hd.UID(),
                tracking_id=f"{seg.name} ({algorithm.name})"[:64],
                display_color=hd.color.CIELabColor.from_rgb(*seg.color),
            )
        )
    # (slices, rows, columns) segment numbers: label value -> its segment's number
    numbers = np.zeros(labels.shape, dtype=np.uint8)
    for number, seg in enumerate(segments, start=1):
        numbers[labels == seg.value] = number
    frames = _frames(numbers, _slice_index(source))
    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in source.files]
    empty = not frames.any()
    with warnings.catch_warnings():  # highdicom's advice on the source's patient name format is not ours to act on
        warnings.simplefilter("ignore", UserWarning)
        seg = _segmentation(hd, sources, frames, descriptions, segments, algorithm, empty)
    _state_slice_spacing(seg, source)
    return seg


def _state_slice_spacing(seg: Any, source: Any) -> None:
    """Write the regular grid's Spacing Between Slices where highdicom could not infer it (a source
    with missing slices): readers such as dcmqi need it to place frames across gaps, and otherwise
    fall back to the Slice Thickness (3 mm slices 2 mm apart would come out 1.5x too far apart)."""
    spacing = getattr(source, "spacing_mm", None)
    shared = seg.get("SharedFunctionalGroupsSequence")
    if spacing is None or not shared or "PixelMeasuresSequence" not in shared[0]:
        return
    measures = shared[0].PixelMeasuresSequence[0]
    if "SpacingBetweenSlices" not in measures:
        measures.SpacingBetweenSlices = f"{float(spacing):.10g}"[:16]


def _segmentation(hd: Any, sources: list[Any], frames: np.ndarray, descriptions: list[Any],
                  segments: Sequence[vio.SegmentSpec], algorithm: Algorithm, empty: bool) -> Any:
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=_series_number(sources[0]),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="VNetSegmentation",
        manufacturer_model_name=f"{algorithm.name} {algorithm.version}"[:64],
        software_versions=f"vnetseg {__version__}",
        device_serial_number="none",
        series_description=f"{', '.join(s.name for s in segments)} ({algorithm.name})"[:64],
        content_label="SEGMENTATION",
        content_description=f"automatic segmentation by {algorithm.name} {algorithm.version}"[:64],
        content_creator_name="vnetseg^automatic",
        omit_empty_frames=not empty,  # an empty result keeps every frame: a valid, empty SEG
    )


def _series_number(source: Any) -> int:
    try:
        return int(source.SeriesNumber) + 1000
    except (AttributeError, TypeError, ValueError):
        return 1000


def write_dicom_seg(
    path: str | os.PathLike[str],
    mask: np.ndarray,
    affine: np.ndarray,
    segments: Sequence[vio.SegmentSpec],
    source: Any,
    algorithm: Algorithm | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``mask`` as a DICOM Segmentation referencing ``source``, atomically (see :func:`build_dicom_seg`)."""
    seg = build_dicom_seg(mask, affine, segments, source, algorithm)
    return vio._write_atomically(Path(path), lambda tmp: seg.save_as(str(tmp)), overwrite)

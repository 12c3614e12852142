"""Reading and writing images: the only module that touches nibabel and SimpleITK.

Internal convention everywhere else in vnetseg: an :class:`Image` is a 3D array indexed
``[i, j, k]`` (voxel order of the file, first index fastest in the file) plus a 4x4 affine that
maps voxel indices ``(i, j, k, 1)`` to RAS millimetres. SimpleITK works in LPS with arrays indexed
``[k, j, i]``; both conversions happen here and nowhere else.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from .boxes import nonzero_box

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SEG_SUFFIXES = (".dcm",)
OUTPUT_SUFFIXES = (*NIFTI_SUFFIXES, ".seg.nrrd", ".nrrd", *DICOM_SEG_SUFFIXES)
AIR_HU = -1000.0


class ImageError(ValueError):
    """An input that is not a usable 3D image; the message says what is wrong."""


@dataclass
class Image:
    """A 3D scalar image.

    Attributes:
        array: (I, J, K) voxel values (float32 for CT in HU).
        affine: (4, 4) voxel-index to RAS-mm matrix.
        notes: what reading noticed and handled (NaN voxels set to air, duplicate DICOM files skipped).
        source: the :class:`vnetseg.dicom.DicomSeries` it was read from (DICOM input only): slice k of
            ``array`` is ``source.files[k]``.
    """

    array: np.ndarray
    affine: np.ndarray
    notes: list[str] = field(default_factory=list)
    source: Any = None

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0


def suffix_of(path: str | os.PathLike[str]) -> str:
    name = Path(path).name.lower()
    for suffix in (".nii.gz", ".seg.nrrd", *NIFTI_SUFFIXES, *SITK_SUFFIXES):
        if name.endswith(suffix):
            return suffix
    return Path(path).suffix.lower()


# ---------------------------------------------------------------- SimpleITK <-> (array, affine)
def sitk_to_array_affine(img: sitk.Image, dtype: type | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image -> ((I, J, K) array, voxel-to-RAS affine).

    The array is one copy of the voxels (converted to ``dtype`` on the way), seen transposed:
    no second full-size temporary is made.
    """
    if img.GetDimension() != 3:
        raise ImageError(f"expected a 3D image, got {img.GetDimension()}D")
    view = sitk.GetArrayViewFromImage(img)  # (K, J, I), valid while img lives
    arr = view.astype(dtype or view.dtype, copy=True)
    return arr.transpose(2, 1, 0), affine_from_sitk(img)


def affine_from_sitk(img: sitk.Image) -> np.ndarray:
    direction = np.array(img.GetDirection(), dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(img.GetSpacing(), dtype=float)[None, :]
    lps[:3, 3] = img.GetOrigin()
    return LPS_TO_RAS @ lps


def fortran_layout(array: np.ndarray) -> np.ndarray:
    """``array`` (I, J, K) in Fortran memory order, the order NIfTI files and SimpleITK's (K, J, I)
    buffers store: NIfTI writers and SimpleITK then copy it straight, not element by element.

    A mask or a map of one organ is zero nearly everywhere, so only the box of its non-zero voxels is
    copied into zeros: about 10 times faster than a transposing copy of a 512 x 512 x 120 mask.
    """
    arr = np.asarray(array)
    if arr.ndim != 3 or arr.flags.f_contiguous:
        return arr
    out = np.zeros(arr.shape, dtype=arr.dtype, order="F")
    box = nonzero_box(arr)
    if box is not None:
        out[box] = arr[box]
    return out


def array_affine_to_sitk(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """(I, J, K) array + voxel-to-RAS affine -> SimpleITK image (LPS)."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise ImageError(f"affine has a zero voxel size {spacing.tolist()}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(fortran_layout(array).transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in lps[:3, 3]])
    img.SetDirection([float(d) for d in (lps[:3, :3] / spacing[None, :]).ravel()])
    return img


# ------------------------------------------------------------------------------------- read
def read_image(
    path: str | os.PathLike[str],
    dtype: type | None = np.float32,
    *,
    allow_uniform: bool = False,
    series: str | None = None,
    allow_gaps: bool = False,
) -> Image:
    """Read a 3D image: NIfTI, NRRD/NHDR, MetaImage, or a DICOM series folder.

    ``dtype=None`` keeps the stored voxel type (e.g. int16 CT: half the memory of float32).
    ``allow_uniform=True`` accepts a volume of one value (an all-background label map).
    ``series`` picks one series of a folder holding several (1-based number or Series Instance
    UID, see :func:`vnetseg.dicom.select_series`); ``allow_gaps`` reads a DICOM series with missing
    slices on its regular grid (missing slices interpolated, with a note) instead of refusing it. Scattered NaN voxels (resampled images often
    have them outside the field of view) are set to air (-1000 HU) and said so in ``notes``.

    Raises:
        ImageError: missing path, unknown format, unreadable file, not 3D, empty, all NaN,
            infinite values, a zero/invalid voxel size, or (DICOM) several series and no choice,
            missing slices, a gantry tilt.
    """
    p = Path(path)
    if not p.exists():
        raise ImageError(f"input {p} does not exist")
    if p.is_dir():
        image = _read_dicom_dir(p, dtype, series, allow_gaps)
    else:
        suffix = suffix_of(p)
        if suffix in NIFTI_SUFFIXES:
            image = _read_nifti(p, dtype)
        elif suffix in SITK_SUFFIXES or suffix == ".seg.nrrd":
            image = _read_sitk(p, dtype)
        else:
            raise ImageError(
                f"{p.name}: unknown image format '{suffix or p.name}'; use .nii, .nii.gz, .nrrd, .nhdr, "
                f".mha, .mhd or a DICOM series folder"
            )
    replace_nan(image, str(p))
    validate_image(image, str(p), allow_uniform=allow_uniform)
    return image


def replace_nan(image: Image, name: str = "image", *, in_place: bool = True) -> None:
    """Set scattered NaN voxels to air (-1000 HU), with a note; refuse an all-NaN image.

    The array is changed in place (``in_place=False``, or a read-only array: ``image.array`` becomes
    a corrected copy and the caller's array is left alone); nothing is copied when there is no NaN.

    Raises:
        ImageError: every voxel is NaN.
    """
    arr = image.array
    if not np.issubdtype(arr.dtype, np.floating):
        return
    flat = np.ravel(arr, order="K")
    step = 1 << 24  # in chunks: no full-size boolean temporary
    count = sum(int(np.isnan(flat[i : i + step]).sum()) for i in range(0, flat.size, step))
    if count == 0:
        return
    if count == flat.size:
        raise ImageError(f"{name} is all NaN: it holds no image values; it cannot be segmented")
    if not in_place or not arr.flags.writeable or not np.may_share_memory(flat, arr):
        arr = np.array(arr, copy=True, order="K")
        image.array, flat = arr, np.ravel(arr, order="K")
    for i in range(0, flat.size, step):
        chunk = flat[i : i + step]
        chunk[np.isnan(chunk)] = AIR_HU
    image.notes.append(
        f"{count} NaN voxel(s) ({100.0 * count / flat.size:.2g} % of the image, typically outside a resampled "
        f"field of view) were treated as air ({AIR_HU:g} HU)"
    )


def _raw_nifti_voxel_size(p: Path) -> np.ndarray | None:
    """pixdim[1:4] as stored in the file (nibabel silently replaces zeros by 1 when loading)."""
    import gzip

    opener = gzip.open if p.name.lower().endswith(".gz") else open
    try:
        with opener(p, "rb") as f:
            head = f.read(540)
    except OSError:
        return None
    for order in ("<", ">"):
        size = int(np.frombuffer(head[:4], dtype=f"{order}i4")[0]) if len(head) >= 4 else 0
        if size == 348 and len(head) >= 108:
            return np.frombuffer(head[76:108], dtype=f"{order}f4")[1:4].astype(float)
        if size == 540 and len(head) >= 168:
            return np.frombuffer(head[104:168], dtype=f"{order}f8")[1:4].astype(float)
    return None


def _read_nifti(p: Path, dtype: type) -> Image:
    raw = _raw_nifti_voxel_size(p)
    if raw is not None and np.any(np.abs(raw) < 1e-6):
        raise ImageError(f"{p.name} has zero or degenerate voxel spacing {raw.round(6).tolist()} mm in its header; fix the header")
    try:
        img = nib.load(str(p))
        array = np.asarray(img.dataobj, dtype=dtype)
    except Exception as exc:
        raise ImageError(f"{p.name} is not a readable NIfTI image ({type(exc).__name__}: {exc})") from None
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ImageError(f"{p.name} is {array.ndim}D with shape {array.shape}; a 3D CT volume is needed")
    return Image(array, np.asarray(img.affine, dtype=float))


def _read_sitk(p: Path, dtype: type) -> Image:
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise ImageError(f"{p.name} is not a readable image ({str(exc).strip().splitlines()[-1][:200]})") from None
    return _from_sitk(img, p.name, dtype)


def _from_sitk(img: sitk.Image, name: str, dtype: type) -> Image:
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(f"{name} has {img.GetNumberOfComponentsPerPixel()} components per voxel; a scalar CT is needed")
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3:
        raise ImageError(f"{name} is {img.GetDimension()}D with size {img.GetSize()}; a 3D CT volume is needed")
    arr, affine = sitk_to_array_affine(img, dtype)
    return Image(arr, affine)


@dataclass(frozen=True)
class ReadOptions:
    """How an input is read (DICOM folders): which series, and whether missing slices are accepted."""

    series: str | None = None
    allow_gaps: bool = False


def _read_dicom_dir(p: Path, dtype: type, choice: str | None = None, allow_gaps: bool = False) -> Image:
    from .dicom import read_series_image

    return read_series_image(p, dtype, choice, allow_gaps)


def validate_image(image: Image, name: str = "image", allow_uniform: bool = False) -> None:
    """Raise :class:`ImageError` unless ``image`` is a finite 3D volume with valid geometry (and not
    of one single value, unless ``allow_uniform``)."""
    arr, aff = image.array, image.affine
    if arr.ndim != 3:
        raise ImageError(f"{name} is {arr.ndim}D with shape {arr.shape}; a 3D CT volume is needed")
    if min(arr.shape) < 2:
        raise ImageError(f"{name} has shape {arr.shape}: a single slice is 2D, a 3D CT volume is needed")
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise ImageError(f"{name} has an invalid voxel-to-world matrix")
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    if np.any(spacing < 1e-6) or abs(np.linalg.det(aff[:3, :3])) < 1e-9:
        raise ImageError(f"{name} has zero or degenerate voxel spacing {np.round(spacing, 6).tolist()} mm; fix the header")
    if not _all_finite(arr):
        raise ImageError(f"{name} contains infinite (or NaN) values; it cannot be segmented")
    if allow_uniform:
        return
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        raise ImageError(f"{name} is empty: every voxel has the value {lo:g}")


def _all_finite(arr: np.ndarray) -> bool:
    if not np.issubdtype(arr.dtype, np.floating):
        return True
    flat = np.ravel(arr, order="K")  # a view for C- or Fortran-ordered arrays (nibabel gives Fortran)
    step = 1 << 24  # check in chunks: no full-size boolean temporary
    return all(np.isfinite(flat[i : i + step]).all() for i in range(0, flat.size, step))


# ------------------------------------------------------------------------------------ write
def _atomic_target(path: Path) -> Path:
    """A temporary file next to ``path`` with the same multi-part suffix (writers look at it)."""
    suffix = suffix_of(path) or path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[: -len(suffix)] if suffix else path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _commit(tmp: Path, dest: Path, overwrite: bool) -> None:
    if dest.exists() and not overwrite:
        tmp.unlink(missing_ok=True)
        raise FileExistsError(f"{dest} exists; pass overwrite=True (--overwrite) to replace it")
    os.chmod(tmp, _mode_for(dest))  # mkstemp made it 0600: give it the mode a plain write would
    os.replace(tmp, dest)


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows; else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(dest: Path) -> int:
    """An existing file keeps its permissions; a new one gets 0666 minus the umask, like ``open(..., "w")``."""
    try:
        return dest.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def _write_atomically(dest: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Run ``write(tmp)`` on a temporary file next to ``dest``, then rename it onto ``dest``."""
    tmp = _atomic_target(dest)
    try:
        write(tmp)
        _commit(tmp, dest, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def check_writable(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Raise a clear error now (before any work) if ``path`` cannot be written."""
    dest = Path(path)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; pass --overwrite to replace it")
    if not dest.parent.exists():
        raise FileNotFoundError(f"output folder {dest.parent} does not exist")
    if suffix_of(dest) not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {dest.name}: use a .nii.gz, .nii, .seg.nrrd or .dcm (DICOM SEG) file name")
    return dest


def check_source_for(path: str | os.PathLike[str], source: Any) -> None:
    """Raise a clear error when ``path`` asks for DICOM SEG but there is no DICOM ``source``
    (the :attr:`Image.source` of the input: None unless it was read from a DICOM series)."""
    if suffix_of(path) in DICOM_SEG_SUFFIXES and source is None:
        raise ValueError(
            f"output {Path(path).name}: a DICOM SEG references its source DICOM images, and this input is not "
            "a DICOM series; give the DICOM folder as input, or write .nii.gz or .seg.nrrd"
        )


def write_nifti(
    path: str | os.PathLike[str], array: np.ndarray, affine: np.ndarray, *, overwrite: bool = False
) -> Path:
    """Write (I, J, K) ``array`` with ``affine`` (voxel -> RAS) as NIfTI, atomically."""
    dest = Path(path)
    img = nib.Nifti1Image(fortran_layout(array), np.asarray(affine, dtype=float))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return _write_atomically(dest, lambda tmp: nib.save(img, str(tmp)), overwrite)


@dataclass(frozen=True)
class SegmentSpec:
    """One segment of a ``.seg.nrrd`` file."""

    value: int
    name: str
    color: tuple[int, int, int]
    terminology: str = ""


def write_seg_nrrd(
    path: str | os.PathLike[str],
    labelmap: np.ndarray,
    affine: np.ndarray,
    segments: Sequence[SegmentSpec],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a label map as a Slicer segmentation (``.seg.nrrd``), atomically.

    Args:
        labelmap: (I, J, K) integer labels; each ``segments[n].value`` is one segment.
        affine: voxel-to-RAS matrix of ``labelmap`` (the file is written in LPS, as Slicer does).
        segments: names, colours (0-255 RGB) and terminology tags.
    """
    dest = Path(path)
    labels = np.asarray(labelmap).astype(np.uint8 if max((s.value for s in segments), default=0) < 256 else np.uint16)
    img = array_affine_to_sitk(labels, affine)
    img.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    img.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    img.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    for n, seg in enumerate(segments):
        r, g, b = (c / 255.0 for c in seg.color)
        meta = {
            "ID": f"Segment_{seg.value}",
            "Name": seg.name,
            "NameAutoGenerated": "0",
            "Color": f"{r:.6f} {g:.6f} {b:.6f}",
            "ColorAutoGenerated": "0",
            "LabelValue": str(seg.value),
            "Layer": "0",
            "Extent": _extent(labels == seg.value),
            "Tags": (f"TerminologyEntry:{seg.terminology}|" if seg.terminology else "") + "Segmentation.Status:completed|",
        }
        for key, value in meta.items():
            img.SetMetaData(f"Segment{n}_{key}", value)
    return _write_atomically(dest, lambda tmp: sitk.WriteImage(img, str(tmp), useCompression=True), overwrite)


def _extent(mask: np.ndarray) -> str:
    """Slicer's segment extent "i0 i1 j0 j1 k0 k1" (inclusive); the whole grid when empty."""
    bounds = []
    for axis in range(3):
        hit = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        bounds += [int(hit[0]), int(hit[-1])] if hit.size else [0, mask.shape[axis] - 1]
    return " ".join(str(b) for b in bounds)


def write_mask(
    path: str | os.PathLike[str],
    mask: np.ndarray,
    affine: np.ndarray,
    segments: Sequence[SegmentSpec],
    *,
    overwrite: bool = False,
    source: Any = None,
    algorithm: Any = None,
) -> Path:
    """Write a label map in the format its file name asks for (``.nii``/``.nii.gz``, ``.seg.nrrd``,
    or ``.dcm``: a DICOM Segmentation referencing ``source``, see :mod:`vnetseg.dicom_seg`).

    Args:
        source: the :class:`vnetseg.dicom.DicomSeries` the CT was read from (DICOM SEG only).
        algorithm: a :class:`vnetseg.dicom_seg.Algorithm` naming the model (DICOM SEG only).
    """
    suffix = suffix_of(path)
    if suffix in NIFTI_SUFFIXES:
        return write_nifti(path, np.asarray(mask).astype(np.uint8, copy=False), affine, overwrite=overwrite)
    if suffix in (".seg.nrrd", ".nrrd"):
        return write_seg_nrrd(path, mask, affine, segments, overwrite=overwrite)
    if suffix in DICOM_SEG_SUFFIXES:
        from .dicom_seg import write_dicom_seg

        return write_dicom_seg(path, mask, affine, segments, source, algorithm, overwrite=overwrite)
    raise ValueError(f"output {Path(path).name}: use a .nii.gz, .nii, .seg.nrrd or .dcm (DICOM SEG) file name")


# ------------------------------------------------------------------------ probability maps
PROBABILITY_SUFFIXES = (*NIFTI_SUFFIXES, ".nrrd", ".nhdr")


def check_writable_volume(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Like :func:`check_writable`, for a scalar volume (probability map): .nii.gz, .nii, .nrrd or .nhdr."""
    dest = Path(path)
    if suffix_of(dest) not in PROBABILITY_SUFFIXES:
        raise ValueError(f"probability map {dest.name}: use a .nii.gz, .nii or .nrrd file name (not .seg.nrrd: it is not a segmentation)")
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; pass --overwrite to replace it")
    if not dest.parent.exists():
        raise FileNotFoundError(f"output folder {dest.parent} does not exist")
    return dest


def write_volume(
    path: str | os.PathLike[str],
    array: np.ndarray,
    affine: np.ndarray,
    description: dict[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a scalar (I, J, K) volume as NIfTI or NRRD (from the file name), atomically.

    Args:
        description: key -> text kept in the file: NRRD header fields, or (joined) the NIfTI
            ``descrip`` field (80 characters at most there).
    """
    dest = check_writable_volume(path, overwrite=True)
    description = description or {}
    if suffix_of(dest) in NIFTI_SUFFIXES:
        img = nib.Nifti1Image(fortran_layout(array), np.asarray(affine, dtype=float))
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header["descrip"] = "; ".join(description.values()).encode("ascii", "replace")[:79]
        return _write_atomically(dest, lambda tmp: nib.save(img, str(tmp)), overwrite)
    sitk_img = array_affine_to_sitk(array, affine)
    for key, value in description.items():
        sitk_img.SetMetaData(key, value)
    return _write_atomically(dest, lambda tmp: sitk.WriteImage(sitk_img, str(tmp), useCompression=True), overwrite)

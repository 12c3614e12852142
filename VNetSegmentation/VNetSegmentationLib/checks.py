"""Checks before a run and warnings after it: each a clear message, never a crash (Qt-free, numpy only).

Before: no volume, a volume that is not CT-like (intensities far from Hounsfield units), a 2D or
very thin volume, a volume too large for the memory that is free. After: the core's
``vnetseg.postprocess.quality_report`` (empty result, implausible volume, mask touching the edge of
the field of view, several sizeable components), each tagged with a code.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ERROR, WARNING = "error", "warning"
# fewer slices than this, or a thinner extent (mm) than this, along any axis is "very thin"
MIN_SLICES = 8
MIN_EXTENT_MM = 24.0
# a CT has fat/air (< -50 HU) and its 1st/99th percentiles lie inside the HU scale
CT_LOW_MAX_HU = -50.0
CT_RANGE_HU = (-3100.0, 6000.0)
# share of free memory a run may use before we warn
MEMORY_SHARE = 0.8


@dataclass(frozen=True)
class CheckMessage:
    """One finding.

    Attributes:
        code: machine-readable kind, e.g. "noVolume", "notScalar", "torchMissing", "notCT", "twoD", "thin", "memory",
            "empty", "implausibleVolume", "touchesEdge", "multipleComponents".
        level: "error" (cannot run) or "warning" (can run; the user should know).
        message: the sentence shown to the user: what is wrong and what to do.
    """

    code: str
    level: str
    message: str


# ----------------------------------------------------------------------------- before a run
def checkVolumePresent(volumeNode) -> CheckMessage | None:
    if volumeNode is None or volumeNode.GetImageData() is None:
        return CheckMessage(
            "noVolume", ERROR, "No input volume: load an abdominal CT and select it as 'Input CT volume'."
        )
    return None


def intensityPercentiles(array: np.ndarray, maxSamples: int = 2_000_000) -> tuple[float, float]:
    """1st and 99th percentiles of ``array`` (a strided sample of at most ``maxSamples`` voxels; NaN
    voxels left out: the core treats scattered ones as air, and refuses an all-NaN volume itself)."""
    flat = np.asarray(array).reshape(-1)
    step = max(1, flat.size // maxSamples)
    sample = flat[::step].astype(np.float32)
    sample = sample[~np.isnan(sample)]
    if sample.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(sample, [1.0, 99.0])
    return float(low), float(high)


def checkCtLike(array: np.ndarray) -> CheckMessage | None:
    """Warn when the intensities do not look like Hounsfield units (MR, PET, unscaled raw values)."""
    low, high = intensityPercentiles(array)
    if low > CT_LOW_MAX_HU or low < CT_RANGE_HU[0] or high > CT_RANGE_HU[1] or high - low < 100.0:
        return CheckMessage(
            "notCT",
            WARNING,
            f"The volume does not look like a CT in Hounsfield units (1st-99th percentile {low:.0f} to {high:.0f}; "
            "a CT has air near -1000 HU and fat near -100 HU). The model was trained on CT only: check the volume "
            "(MR, PET or unscaled data give wrong results).",
        )
    return None


def checkShape(shape: Sequence[int], spacing: Sequence[float]) -> CheckMessage | None:
    """An error for a 2D image; a warning for a very thin slab (the spleen would be cut)."""
    dims = [int(s) for s in shape]
    if len(dims) != 3 or min(dims) < 2:
        return CheckMessage(
            "twoD",
            ERROR,
            f"The volume is 2D ({' x '.join(map(str, dims))} voxels): a 3D CT series is needed; load the whole series.",
        )
    extents = [d * float(s) for d, s in zip(dims, spacing)]
    if min(dims) < MIN_SLICES or min(extents) < MIN_EXTENT_MM:
        axis = int(np.argmin(extents)) if min(extents) < MIN_EXTENT_MM else int(np.argmin(dims))
        return CheckMessage(
            "thin",
            WARNING,
            f"The volume is very thin ({dims[axis]} slices, {extents[axis]:.0f} mm along axis {'IJK'[axis]}): "
            "the spleen (about 110 mm long) will be cut off. Load the full abdominal series if you can.",
        )
    return None


def estimateMemoryBytes(
    shape: Sequence[int], spacing: Sequence[float], preprocessing, outChannels: int, windowBytes: int = 0
) -> int:
    """Rough peak memory (bytes) of one run on the host, from the grid sizes alone.

    Input side: the float32 input, its reoriented copy, the float32 probabilities resampled back,
    and byte masks (about 15 bytes per input voxel). Model side: the resampled volume, the
    accumulated probabilities of ``outChannels - 1`` classes and the weight sum, float32, padded to
    a patch. Plus ``windowBytes`` for the network's activations when it runs on the host.
    """
    nInput = math.prod(int(s) for s in shape)
    modelShape = [
        max(round(d * float(s) / t), p)
        for d, s, t, p in zip(shape, spacing, preprocessing.target_spacing, preprocessing.patch_size)
    ]
    nModel = math.prod(modelShape)
    return int(15 * nInput + 4 * nModel * (outChannels + 2) + windowBytes)


def checkMemory(required: int, available: int, device: str, total: bool = False) -> CheckMessage | None:
    """Warn when a run needs more than ``MEMORY_SHARE`` of ``available`` bytes.

    ``total``: ``available`` is the device's whole memory (the panel does not measure a GPU's free
    memory: that would create a CUDA context in Slicer's process), not what is free now.
    """
    if required <= MEMORY_SHARE * available:
        return None
    where = "GPU" if device.startswith(("cuda", "gpu")) else "computer"
    advice = "choose CPU under Advanced, or " if where == "GPU" else ""
    has = (
        f"the {where} has only {available / 2**30:.1f} GB of memory in all"
        if total
        else f"only {available / 2**30:.1f} GB of {where} memory is free"
    )
    return CheckMessage(
        "memory",
        WARNING,
        f"The volume is large: segmenting it needs about {required / 2**30:.1f} GB but {has}. "
        f"To avoid running out of memory, {advice}crop the volume around the spleen "
        "first (Crop Volume module) and segment the cropped volume.",
    )


class MemoryStatusEx(ctypes.Structure):
    """MEMORYSTATUSEX of the Windows API (sysinfoapi.h): 64 bytes, ``ullAvailPhys`` at offset 16."""

    _fields_ = [
        ("dwLength", ctypes.c_uint32),
        ("dwMemoryLoad", ctypes.c_uint32),
        ("ullTotalPhys", ctypes.c_uint64),
        ("ullAvailPhys", ctypes.c_uint64),
        ("ullTotalPageFile", ctypes.c_uint64),
        ("ullAvailPageFile", ctypes.c_uint64),
        ("ullTotalVirtual", ctypes.c_uint64),
        ("ullAvailVirtual", ctypes.c_uint64),
        ("ullAvailExtendedVirtual", ctypes.c_uint64),
    ]


def _windowsAvailableBytes() -> int | None:
    """Free physical memory from ``GlobalMemoryStatusEx`` (kernel32), or None when it cannot be asked."""
    windll = getattr(ctypes, "windll", None)
    if windll is None:
        return None
    status = MemoryStatusEx()
    status.dwLength = ctypes.sizeof(MemoryStatusEx)
    if not windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
        return None
    return int(status.ullAvailPhys)


def hostAvailableBytes() -> int:
    """Free physical memory of this computer, in bytes.

    Linux: ``MemAvailable`` of /proc/meminfo; Windows: ``GlobalMemoryStatusEx``; elsewhere (macOS)
    ``os.sysconf`` (free pages when the system says, else all physical memory); 4 GiB when nothing
    answers.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import os

    if os.name == "nt":
        found = _windowsAvailableBytes()
        if found:
            return found
    sysconf = getattr(os, "sysconf", None)  # absent on Windows
    if sysconf is not None:
        for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
            try:
                return int(sysconf("SC_PAGE_SIZE") * sysconf(pages))
            except (ValueError, OSError):
                continue
    return 4 << 30


# ------------------------------------------------------------------------------ after a run
_WARNING_CODES = (
    ("low confidence", "lowConfidence"),  # vnetseg.confidence.LOW_CONFIDENCE (issue 14); first: its numbers may contain "no "
    ("covers only", "thinView"),  # vnetseg.fast.thin_view_warning: "no spleen" on a CT too thin to be sure
    ("no ", "empty"),
    ("implausible", "implausibleVolume"),
    ("edge", "touchesEdge"),
    ("separate parts", "multipleComponents"),
)


def warningCode(text: str) -> str:
    """The code of one warning sentence of ``vnetseg.postprocess.quality_report``."""
    lowered = text.lower()
    for key, code in _WARNING_CODES:
        if key in lowered:
            return code
    return "other"


def warningsFromTexts(texts: Sequence[str]) -> list[CheckMessage]:
    """The core's warning sentences (e.g. from the background process) as tagged messages."""
    return [CheckMessage(warningCode(text), WARNING, text) for text in texts]


def postRunWarnings(mask: np.ndarray, voxelMl: float, rawMask: np.ndarray | None = None, name: str = "spleen"):
    """Measure a final mask and warn about what a reader should double-check.

    Args:
        mask: (I, J, K) final binary mask on the CT grid.
        voxelMl: volume of one voxel in mL.
        rawMask: the mask before clean-up (to count separate components); default ``mask``.

    Returns:
        (the core's ``QualityReport``, list of :class:`CheckMessage`).
    """
    from vnetseg.postprocess import quality_report

    final = np.asarray(mask) > 0
    raw = final if rawMask is None else np.asarray(rawMask) > 0
    report = quality_report(raw, final, float(voxelMl), name)
    # an existing segment that is empty (e.g. erased while correcting) is worth a warning here
    texts = report.warnings if report.found else [f"no {name} voxels: the segment is empty", *report.warnings]
    return report, warningsFromTexts(texts)

"""Export a CT and its (corrected) spleen mask as one training case of an MSD task folder.

Layout (Medical Segmentation Decathlon, as ``training/`` reads it)::

    <folder>/dataset.json
    <folder>/imagesTr/<case>.nii.gz     the CT, HU, its own geometry
    <folder>/labelsTr/<case>.nii.gz     uint8 mask on the same grid (0 background, 1 spleen)

An existing case is never replaced unless ``overwrite=True`` (the panel asks first), and every
problem is found before the first byte is written. Qt-free; writes through ``vnetseg.io``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DEFAULT_LABELS = {"0": "background", "1": "spleen"}


@dataclass(frozen=True)
class ExportResult:
    """Where a case went.

    Attributes:
        image / label: the written NIfTI files.
        datasetJson: the updated ``dataset.json``.
        caseName: the case name.
        numTraining: training cases listed in ``dataset.json`` now.
        replaced: True when an existing case was overwritten.
    """

    image: Path
    label: Path
    datasetJson: Path
    caseName: str
    numTraining: int
    replaced: bool


def caseNameFrom(text: str) -> str:
    """A safe case name from a node name: letters, digits, ``_ . -`` (others become ``_``)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text.strip()).strip("_.-")
    return name or "case"


def _checkCaseName(caseName: str) -> None:
    if not isinstance(caseName, str) or not CASE_NAME.match(caseName) or caseName.endswith((".nii", ".nii.gz", ".gz")):
        raise ValueError(
            f"caseName must be letters, digits, '_', '.' or '-' (no folders, no .nii.gz), got {caseName!r}"
        )


def _readDataset(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {
            "name": "VNetSegmentation corrected cases",
            "description": "Spleen masks made with the VNetSegmentation 3D Slicer extension and corrected by a reader",
            "tensorImageSize": "3D",
            "modality": {"0": "CT"},
            "labels": dict(DEFAULT_LABELS),
            "numTraining": 0,
            "numTest": 0,
            "training": [],
            "test": [],
        }
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}); fix or move it before exporting into this folder"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("training", []), list):
        raise ValueError(f"{path} is not an MSD dataset.json (no 'training' list); export into another folder")
    labels = data.get("labels", DEFAULT_LABELS)
    if not isinstance(labels, dict) or str(labels.get("1", "")).lower() != "spleen":
        raise ValueError(
            f"{path} has labels {labels!r}, where label 1 is not 'spleen'; "
            "export spleen masks into a spleen task folder"
        )
    return data


def _writeJsonAtomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".dataset.", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def exportCase(
    folder: str | os.PathLike[str],
    caseName: str,
    image: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    overwrite: bool = False,
) -> ExportResult:
    """Write one training case and list it in ``dataset.json``.

    Args:
        folder: the task folder (created if missing; its parent must exist).
        caseName: file name stem of the case, e.g. ``"spleen_101"``.
        image: (I, J, K) CT in HU (its dtype is kept: int16 CTs stay int16).
        mask: (I, J, K) binary spleen mask on the same grid.
        affine: (4, 4) voxel-to-RAS matrix of both.
        overwrite: replace a case of the same name.

    Raises:
        ValueError: bad case name, shapes that differ, a dataset.json that is not a spleen task.
        FileExistsError: the case exists and ``overwrite`` is False.
    """
    from vnetseg import io as vio

    _checkCaseName(caseName)
    image, mask = np.asarray(image), np.asarray(mask)
    if image.ndim != 3 or image.shape != mask.shape:
        raise ValueError(f"image and mask must be 3D arrays of the same shape, got {image.shape} and {mask.shape}")
    root = Path(folder)
    if not root.parent.is_dir():
        raise FileNotFoundError(f"cannot create {root}: its parent folder does not exist")
    datasetPath = root / "dataset.json"
    data = _readDataset(datasetPath)
    imagePath = root / "imagesTr" / f"{caseName}.nii.gz"
    labelPath = root / "labelsTr" / f"{caseName}.nii.gz"
    entry = {"image": f"./imagesTr/{caseName}.nii.gz", "label": f"./labelsTr/{caseName}.nii.gz"}
    listed = [e for e in data["training"] if isinstance(e, dict) and e.get("image") == entry["image"]]
    exists = imagePath.exists() or labelPath.exists() or bool(listed)
    if exists and not overwrite:
        raise FileExistsError(
            f"case '{caseName}' already exists in {root}; choose another case name or confirm replacing it"
        )
    for sub in (imagePath.parent, labelPath.parent):
        sub.mkdir(parents=True, exist_ok=True)
    vio.write_nifti(imagePath, image, affine, overwrite=overwrite)
    vio.write_nifti(labelPath, (mask > 0).astype(np.uint8), affine, overwrite=overwrite)
    data["training"] = [e for e in data["training"] if not (isinstance(e, dict) and e.get("image") == entry["image"])]
    data["training"].append(entry)
    data["numTraining"] = len(data["training"])
    _writeJsonAtomic(datasetPath, data)
    return ExportResult(imagePath, labelPath, datasetPath, caseName, data["numTraining"], exists)

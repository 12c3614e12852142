"""Medical Segmentation Decathlon (MSD) task folders: reading, checking, k-fold splits.

An MSD task folder holds ``dataset.json``, ``imagesTr/`` and ``labelsTr/``. ``dataset.json`` lists
the training pairs (``"training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]``),
the label names (``"labels": {"0": "background", "1": "spleen"}``) and the modality
(``"modality": {"0": "CT"}``). The official archives also contain macOS resource files named
``._<case>.nii.gz``; they are never cases and are skipped.

This module's public names (:func:`read_msd`, :class:`MSDDataset`, :class:`Case`,
:class:`DatasetError`) are a stable interface used by the Slicer module's export.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vnetseg import io as vio

# a label value meaning "not the first foreground class, otherwise unknown" (TrainConfig.partial_label):
# a case whose reference names the spleen only, in a task whose other cases label several organs
UNKNOWN_LABEL = 255


def with_unknown(labels: dict[int, str], unknown: int) -> dict[int, str]:
    """The label values a case may hold: ``labels``, and ``unknown`` when it is not 0."""
    return {**labels, unknown: "not the first label (otherwise unknown)"} if unknown else labels


class DatasetError(ValueError):
    """An MSD folder or case that cannot be used; the message names the folder, case or file."""


class CaseError(DatasetError):
    """One case is unusable (missing file, grid mismatch, unknown label values...)."""

    def __init__(self, case: str, message: str) -> None:
        super().__init__(f"case {case!r}: {message}")
        self.case = case


@dataclass(frozen=True)
class Case:
    """One training pair. ``name`` is the image file name without ``.nii.gz``."""

    name: str
    image: Path
    label: Path


@dataclass
class MSDDataset:
    """A parsed MSD task folder.

    Attributes:
        root: the task folder.
        labels: label value -> name, background (0) included.
        cases: the training pairs, in ``dataset.json`` order.
        modality: channel index -> modality name (one "CT" channel here).
        name: the task name from ``dataset.json`` (may be empty).
    """

    root: Path
    labels: dict[int, str]
    cases: list[Case]
    modality: dict[int, str] = field(default_factory=lambda: {0: "CT"})
    name: str = ""

    @property
    def case_names(self) -> list[str]:
        return [c.name for c in self.cases]

    def case(self, name: str) -> Case:
        for c in self.cases:
            if c.name == name:
                return c
        raise DatasetError(f"{self.root}: no case named {name!r} (cases: {', '.join(self.case_names[:10])}...)")

    @property
    def foreground_labels(self) -> dict[int, str]:
        return {v: n for v, n in self.labels.items() if v != 0}


def case_name(path: str | os.PathLike[str]) -> str:
    """``imagesTr/spleen_2.nii.gz`` -> ``spleen_2``."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def is_junk(path: str | os.PathLike[str]) -> bool:
    """macOS resource forks (``._x.nii.gz``) and other hidden files are never cases."""
    return Path(path).name.startswith(".")


def read_msd(root: str | os.PathLike[str]) -> MSDDataset:
    """Read and check the structure of an MSD task folder (files are opened later, per case).

    Raises:
        DatasetError: missing/empty folder, missing or invalid ``dataset.json``, no training
            cases, labels not numbered 0..K-1, a modality other than one CT channel;
            :class:`CaseError` (a subclass) for a listed case whose image or label file is missing.
    """
    root_p = Path(root)
    if not root_p.is_dir():
        raise DatasetError(f"MSD folder {root_p} does not exist or is not a folder")
    meta_path = root_p / "dataset.json"
    if not meta_path.is_file():
        contents = [p.name for p in root_p.iterdir() if not is_junk(p)]
        what = "is empty" if not contents else f"holds {', '.join(sorted(contents)[:5])}"
        raise DatasetError(
            f"{root_p} has no dataset.json (the folder {what}); an MSD task folder needs dataset.json, "
            f"imagesTr/ and labelsTr/ (see training/README.md)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{meta_path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{meta_path} must hold a JSON object, got {type(meta).__name__}")
    labels = _parse_labels(meta, meta_path)
    modality = _parse_modality(meta, meta_path)
    entries = meta.get("training")
    if not isinstance(entries, list):
        raise DatasetError(f"{meta_path} has no 'training' list of {{'image': ..., 'label': ...}} pairs")
    cases = []
    seen: set[str] = set()
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DatasetError(f"{meta_path}: training entry {n} must be {{'image': ..., 'label': ...}}, got {entry!r}")
        if is_junk(entry["image"]) or is_junk(entry["label"]):
            continue
        image, label = root_p / entry["image"], root_p / entry["label"]
        name = case_name(image)
        if name in seen:
            raise CaseError(name, f"listed twice in {meta_path}")
        seen.add(name)
        for what, path in (("image", image), ("label", label)):
            if not path.is_file():
                raise CaseError(name, f"{what} file {path} listed in dataset.json does not exist")
        cases.append(Case(name, image, label))
    if not cases:
        raise DatasetError(f"{meta_path} lists no training cases; add image/label pairs to 'training'")
    return MSDDataset(root_p, labels, cases, modality, str(meta.get("name", "")))


def _parse_labels(meta: dict[str, Any], meta_path: Path) -> dict[int, str]:
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{meta_path} needs 'labels', e.g. {{\"0\": \"background\", \"1\": \"spleen\"}}")
    try:
        if all(isinstance(v, int) for v in raw.values()):  # nnU-Net v2 style {"background": 0, "spleen": 1}
            labels = {int(v): str(k) for k, v in raw.items()}
        else:
            labels = {int(k): str(v) for k, v in raw.items()}
    except ValueError:
        raise DatasetError(f"{meta_path}: label keys must be integers, got {sorted(raw)}") from None
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        raise DatasetError(
            f"{meta_path}: labels must be numbered 0 (background), 1, ... without gaps, got {sorted(labels)}"
        )
    return labels


def _parse_modality(meta: dict[str, Any], meta_path: Path) -> dict[int, str]:
    raw = meta.get("modality", {"0": "CT"})
    if not isinstance(raw, dict) or len(raw) != 1:
        raise DatasetError(f"{meta_path}: one image channel is supported, 'modality' is {raw!r}")
    modality = {int(k): str(v) for k, v in raw.items()}
    if next(iter(modality.values())).upper() != "CT":
        raise DatasetError(f"{meta_path}: modality {modality} is not CT; the HU window only makes sense for CT")
    return modality


# --------------------------------------------------------------------- per-case checks
def load_case(case: Case, labels: dict[int, str]) -> tuple[vio.Image, np.ndarray]:
    """Read a case and check it: same grid for image and label, only known label values.

    Returns:
        (image in HU, label array (I, J, K) uint8 on the image grid).

    Raises:
        CaseError: unreadable file, different shape or geometry, unknown label values.
    """
    try:
        image = vio.read_image(case.image)
    except vio.ImageError as exc:
        raise CaseError(case.name, f"image {case.image}: {exc}") from None
    try:
        lab = _read_any_label(case.label)
    except vio.ImageError as exc:
        raise CaseError(case.name, f"label {case.label}: {exc}") from None
    check_same_grid(case.name, image, lab)
    values = np.unique(lab.array)
    if np.any(values != np.round(values)):
        raise CaseError(case.name, f"label {case.label} holds non-integer values; a label map of integers is needed")
    unknown = sorted({int(v) for v in values} - set(labels))
    if unknown:
        raise CaseError(
            case.name,
            f"label {case.label} holds values {unknown} that dataset.json does not name (known: {sorted(labels)})",
        )
    return image, lab.array.astype(np.uint8)


def check_same_grid(name: str, image: vio.Image, label: vio.Image, tol_mm: float = 1e-2) -> None:
    """Raise :class:`CaseError` unless image and label share shape and voxel-to-RAS geometry."""
    if image.shape != label.shape:
        raise CaseError(name, f"image shape {image.shape} and label shape {label.shape} differ; they must share a grid")
    corners = np.array([[0, 0, 0, 1], [image.shape[0] - 1, image.shape[1] - 1, image.shape[2] - 1, 1]], dtype=float).T
    gap = np.abs(image.affine @ corners - label.affine @ corners).max()
    spacing_gap = np.abs(image.spacing - label.spacing).max()
    if gap > max(tol_mm, 0.01 * float(image.spacing.min())) or spacing_gap > 1e-3:
        raise CaseError(
            name,
            f"image and label grids differ by up to {gap:.3g} mm (spacing {np.round(image.spacing, 4).tolist()} vs "
            f"{np.round(label.spacing, 4).tolist()} mm); resample the label onto the image grid",
        )


# ----------------------------------------------------------------------------- folds
def make_folds(names: list[str], k: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """Split case names into ``k`` folds (shuffled with ``seed``); each fold has 'train' and 'val'."""
    if k < 2:
        raise ValueError(f"k must be >= 2 folds, got {k}")
    if len(names) < k:
        raise ValueError(f"{len(names)} cases cannot be split into {k} folds; use fewer folds (config 'folds')")
    order = sorted(names)
    random.Random(seed).shuffle(order)
    folds = []
    for f in range(k):
        val = sorted(order[f::k])
        folds.append({"train": sorted(n for n in order if n not in set(val)), "val": val})
    return folds


def load_or_make_folds(
    path: str | os.PathLike[str], names: list[str], k: int, seed: int, write: bool = True
) -> list[dict[str, list[str]]]:
    """Read folds from ``path`` (a JSON list of {"train", "val"}) or create and write them.

    An existing file is reused, so runs (and folds) stay comparable; it must cover exactly the
    cases of the dataset.
    """
    p = Path(path)
    if p.is_file():
        try:
            folds = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise DatasetError(f"splits file {p} is not valid JSON: {exc}") from None
        if not isinstance(folds, list) or not all(isinstance(f, dict) and {"train", "val"} <= set(f) for f in folds):
            raise DatasetError(f"splits file {p} must be a JSON list of {{'train': [...], 'val': [...]}} folds")
        listed = {n for f in folds for n in f["train"] + f["val"]}
        if listed != set(names):
            missing, extra = sorted(set(names) - listed), sorted(listed - set(names))
            raise DatasetError(
                f"splits file {p} does not match the dataset (missing {missing[:5]}, unknown {extra[:5]}); "
                f"delete it or pass another --splits file"
            )
        return folds
    folds = make_folds(names, k, seed)
    if write:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(folds, indent=1))
        os.replace(tmp, p)
    return folds


def fold_cases(folds: list[dict[str, list[str]]], fold: int) -> tuple[list[str], list[str]]:
    """(train names, validation names) of ``fold``."""
    if not 0 <= fold < len(folds):
        raise ValueError(f"fold must be in 0..{len(folds) - 1}, got {fold}")
    return list(folds[fold]["train"]), list(folds[fold]["val"])


def write_dataset_json(
    root: str | os.PathLike[str], cases: list[tuple[str, str]], labels: dict[int, str], name: str = "",
    description: str = "",
) -> Path:
    """Write an MSD ``dataset.json`` for (image, label) paths relative to ``root``."""
    meta = {
        "name": name,
        "description": description,
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "numTraining": len(cases),
        "numTest": 0,
        "training": [{"image": img, "label": lab} for img, lab in cases],
        "test": [],
    }
    path = Path(root) / "dataset.json"
    path.write_text(json.dumps(meta, indent=1))
    return path


def add_case_to_msd(
    root: str | os.PathLike[str],
    name: str,
    image: str | os.PathLike[str] | vio.Image,
    label: str | os.PathLike[str] | vio.Image,
    labels: dict[int, str] | None = None,
    *,
    overwrite: bool = False,
) -> Case:
    """Add one image/label pair to an MSD folder (created with its ``dataset.json`` when missing).

    Args:
        root: the MSD task folder.
        name: case name; files become ``imagesTr/<name>.nii.gz`` and ``labelsTr/<name>.nii.gz``.
        image: a CT file (any format :func:`vnetseg.io.read_image` reads) or an :class:`Image` in HU.
        label: a label file or an :class:`Image` holding integer labels on the image's grid.
        labels: label names for a new folder (default ``{0: "background", 1: "spleen"}``).
        overwrite: replace an existing case of that name (otherwise :class:`CaseError`).

    Returns:
        The new :class:`Case`.
    """
    if not name or "/" in name or name.startswith(".") or name != name.strip():
        raise ValueError(f"name must be a plain file name without '/' or a leading dot, got {name!r}")
    root_p = Path(root)
    meta_path = root_p / "dataset.json"
    if meta_path.is_file():
        known = read_msd(root_p).labels
        meta = json.loads(meta_path.read_text())
    else:
        known = dict(labels or {0: "background", 1: "spleen"})
        write_dataset_json(root_p.mkdir(parents=True, exist_ok=True) or root_p, [], known, name=root_p.name)
        meta = json.loads(meta_path.read_text())
    rel = (f"./imagesTr/{name}.nii.gz", f"./labelsTr/{name}.nii.gz")
    listed = any(case_name(e.get("image", "")) == name for e in meta["training"])
    if listed and not overwrite:
        raise CaseError(name, f"already in {meta_path}; pass overwrite=True to replace it")
    img = image if isinstance(image, vio.Image) else vio.read_image(image)
    lab = label if isinstance(label, vio.Image) else _read_any_label(Path(label))
    check_same_grid(name, img, lab)
    unknown = sorted({int(v) for v in np.unique(lab.array)} - set(known))
    if unknown:
        raise CaseError(name, f"label holds values {unknown} that the dataset does not name (known: {sorted(known)})")
    (root_p / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root_p / "labelsTr").mkdir(parents=True, exist_ok=True)
    vio.write_nifti(root_p / rel[0], img.array, img.affine, overwrite=overwrite)
    vio.write_nifti(root_p / rel[1], np.asarray(lab.array).astype(np.uint8), lab.affine, overwrite=overwrite)
    if not listed:
        meta["training"].append({"image": rel[0], "label": rel[1]})
    meta["numTraining"] = len(meta["training"])
    tmp = meta_path.with_name(f".dataset.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)
    return Case(name, root_p / rel[0], root_p / rel[1])


def _read_any_label(path: Path) -> vio.Image:
    return vio.read_image(path, allow_uniform=True)  # an all-background label is a valid case

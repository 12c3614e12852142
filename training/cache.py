"""Preprocess each case once (reorient to RAS, resample, HU window) into a reusable cache.

The cache lives in ``<cache_dir>/<key>/`` where ``key`` is a digest of the preprocessing settings
and of this code's version: change the spacing or the HU window and a new folder is filled; the
old one is left alone. Each case is stored as two ``.npy`` files (memory-mapped when read, so
DataLoader workers share them) plus a small JSON stamp recording the source files' size and
modification time; a changed source file is preprocessed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vnetseg.checkpoint import Preprocessing
from vnetseg.preprocess import make_grid_map, to_model_grid, window_hu

from .data import Case, load_case, with_unknown

CACHE_VERSION = 1


@dataclass
class CachedCase:
    """A preprocessed case on the model grid.

    Attributes:
        name: case name.
        image: (X, Y, Z) float32 windowed intensities (memory-mapped).
        label: (X, Y, Z) uint8 labels (memory-mapped).
        foreground: (N, 3) int32 voxel indices of foreground, for foreground-centred sampling.
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    foreground: np.ndarray


def cache_key(pre: Preprocessing, labels: dict[int, str] | None = None, unknown: int = 0) -> str:
    """Digest of everything that changes the cached arrays.

    A label set of more than two classes, or an ``unknown`` label value, is part of the key: the
    same case names then hold other label maps (a multi-organ task made from the same subjects as
    a spleen task) and get a folder of their own. Two-class caches keep the key they always had.
    """
    settings = {"v": CACHE_VERSION, "spacing": pre.target_spacing, "window": pre.hu_window, "scale": pre.scale,
                "orientation": pre.orientation}
    if unknown or (labels is not None and len(labels) > 2):
        settings["labels"] = sorted(int(v) for v in (labels or {}))
        settings["unknown"] = int(unknown)
    text = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _stamp(case: Case) -> dict[str, list[int]]:
    return {str(p): [os.stat(p).st_size, int(os.stat(p).st_mtime_ns)] for p in (case.image, case.label)}


def preprocess_case(case: Case, labels: dict[int, str], pre: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """Read, check and resample one case onto the model grid.

    Returns:
        ((X, Y, Z) float32 windowed image, (X, Y, Z) uint8 label resampled with nearest neighbour).
    """
    image, label = load_case(case, labels)
    grid = make_grid_map(image.shape, image.affine, pre.target_spacing)
    # one scipy call each (blocks=False): the cached subjects stay bit for bit what earlier versions of
    # a recipe trained on, so a regenerated model is the same model
    img = window_hu(to_model_grid(image.array, grid, order=1, blocks=False), pre.hu_window, pre.scale)
    lab = to_model_grid(label, grid, order=0, blocks=False).astype(np.uint8)
    return img, lab


def cache_dir_for(
    cache_root: str | os.PathLike[str], pre: Preprocessing, labels: dict[int, str] | None = None, unknown: int = 0
) -> Path:
    return Path(cache_root) / cache_key(pre, labels, unknown)


def ensure_cached(
    cases: list[Case], labels: dict[int, str], pre: Preprocessing, cache_root: str | os.PathLike[str],
    log: Callable[[str], None] | None = None, unknown: int = 0,
) -> Path:
    """Preprocess every case that is missing or stale in the cache; return the cache folder.

    ``unknown`` (0: none) is a label value allowed besides ``labels`` (see TrainConfig.partial_label);
    it is not foreground: the stored foreground voxels are those of the classes in ``labels``.
    """
    folder = cache_dir_for(cache_root, pre, labels, unknown)
    allowed = with_unknown(labels, unknown)
    classes = np.array(sorted(v for v in labels if v > 0), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps({"version": CACHE_VERSION, "preprocessing": {
        "target_spacing": pre.target_spacing, "hu_window": pre.hu_window, "scale": pre.scale}}, indent=1))
    for n, case in enumerate(cases):
        stamp_path = folder / f"{case.name}.json"
        stamp = _stamp(case)
        if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
            continue
        if log is not None:
            log(f"preprocessing {case.name} ({n + 1}/{len(cases)})")
        img, lab = preprocess_case(case, allowed, pre)
        fg = np.argwhere(np.isin(lab, classes)).astype(np.int32)
        for suffix, arr in (("image", img), ("label", lab), ("fg", fg)):
            tmp = folder / f".{case.name}_{suffix}.tmp{os.getpid()}.npy"
            np.save(tmp, arr)
            os.replace(tmp, folder / f"{case.name}_{suffix}.npy")
        stamp_path.write_text(json.dumps(stamp))
    return folder


def load_cached(folder: str | os.PathLike[str], names: list[str]) -> list[CachedCase]:
    """Memory-map the cached arrays of ``names``."""
    out = []
    for name in names:
        base = Path(folder) / name
        out.append(CachedCase(
            name,
            np.load(f"{base}_image.npy", mmap_mode="r"),
            np.load(f"{base}_label.npy", mmap_mode="r"),
            np.load(f"{base}_fg.npy"),
        ))
    return out

"""Helpers for the training tests: tiny configs and small MSD folders built in a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from training.config import AugmentConfig, TrainConfig, load_config
from vnetseg.checkpoint import Preprocessing
from vnetseg.io import write_nifti
from vnetseg.model import VNetConfig

TINY_MODEL = VNetConfig(widths=(4, 8, 16, 32, 64), kernel_size=3, norm="instance")


def tiny_config(**changes) -> TrainConfig:
    """A very small, fast config (for plumbing tests, not for accuracy)."""
    base = TrainConfig(
        model=TINY_MODEL,
        preprocessing=Preprocessing(target_spacing=(6.0, 6.0, 6.0), patch_size=(32, 32, 32)),
        epochs=2, iters_per_epoch=2, batch_size=2, optimizer="adamw", lr=1e-3, schedule="cosine",
        workers=0, val_every=1, val_overlap=0.0, folds=2, seed=7,
        augment=AugmentConfig(elastic_prob=0.0),
    )
    return load_config(base, changes) if changes else base


def write_case(root: Path, name: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray,
               label_affine: np.ndarray | None = None) -> tuple[str, str]:
    """Write one image/label pair into ``root/imagesTr`` and ``root/labelsTr``; return relative paths."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    write_nifti(root / "imagesTr" / f"{name}.nii.gz", image.astype(np.int16), affine)
    write_nifti(root / "labelsTr" / f"{name}.nii.gz", label.astype(np.uint8),
                affine if label_affine is None else label_affine)
    return f"./imagesTr/{name}.nii.gz", f"./labelsTr/{name}.nii.gz"


def write_dataset(root: Path, pairs: list[tuple[str, str]], labels: dict[str, str] | None = None) -> Path:
    meta = {"name": "Test", "modality": {"0": "CT"}, "labels": labels or {"0": "background", "1": "spleen"},
            "numTraining": len(pairs), "training": [{"image": i, "label": lab} for i, lab in pairs]}
    path = root / "dataset.json"
    path.write_text(json.dumps(meta))
    return path


def blob_case(shape=(24, 20, 16), centre=(12, 10, 8), radius=4.0, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image with a bright ball (the 'spleen', label 1)."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    ball = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
    image = rng.normal(0, 10, size=shape) + np.where(ball, 120.0, 20.0)
    return image, ball.astype(np.uint8)


def real_ct_msd(ct_dir: Path, root: Path) -> Path:
    """An MSD folder of the two real CTs (spleen = label 1), symlinked or extracted into ``root``."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)
    (root / "imagesTr" / "ct_a.nii.gz").symlink_to(ct_dir / "example_ct.nii.gz")
    (root / "labelsTr" / "ct_a.nii.gz").symlink_to(ct_dir / "example_ct_spleen_pseudolabel_v1.nii.gz")
    (root / "imagesTr" / "ct_b.nii.gz").symlink_to(ct_dir / "example_ct_sm.nii.gz")
    multi = nib.load(str(ct_dir / "example_ct_sm_multilabel_v2.nii.gz"))
    spleen = (np.asarray(multi.dataobj) == 1).astype(np.uint8)
    nib.save(nib.Nifti1Image(spleen, multi.affine, multi.header), str(root / "labelsTr" / "ct_b.nii.gz"))
    write_dataset(root, [("./imagesTr/ct_a.nii.gz", "./labelsTr/ct_a.nii.gz"),
                         ("./imagesTr/ct_b.nii.gz", "./labelsTr/ct_b.nii.gz")])
    return root


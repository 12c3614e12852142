"""Training configuration: small typed dataclasses, named presets, JSON files and overrides.

A config is written next to every run (``config.json``) and into every exported model card, so a
run can be repeated from its own output folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from vnetseg.checkpoint import Preprocessing
from vnetseg.model import VNetConfig, preset

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("poly", "cosine", "constant")
LOSSES = ("dice", "dice_ce")


@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation of training patches (MONAI transforms).

    Attributes:
        affine_prob: probability of a random rotation + scaling.
        rotate_deg: maximum rotation in degrees about the x, y and z axes.
        scale: maximum relative zoom (0.1 = 0.9x .. 1.1x).
        elastic_prob: probability of an elastic deformation (slow on CPU).
        elastic_sigma: smoothing of the displacement field, in voxels (min, max).
        elastic_magnitude: displacement magnitude, in voxels (min, max).
        intensity_scale_prob / intensity_scale: multiply by 1 + U(-s, s).
        intensity_shift_prob / intensity_shift: add U(-s, s) (windowed units, 0..1 = HU window).
        noise_prob / noise_std: additive Gaussian noise (windowed units).
        blur_prob / blur_sigma: Gaussian blur sigma range in voxels.
        flip_lr: random left-right flips. Off by default: the spleen is on the patient's left.
        fov_end_prob: probability that a patch's field of view ends at an axial plane inside it
            (:func:`training.sampling.end_field_of_view`): everything beyond it becomes what lies
            beyond a CT's scan range (the pad value, labels background). On a patch with the organ
            the plane goes through it half of the time and just beyond it (removing all of it) the
            other half. A CT's scan range can end at any level, so where it ends must not tell the
            network where the spleen is (measured: v2.0.0's locator called the kidney spleen at the
            top edge of a lower abdomen ending 10-40 mm under the spleen).
        slab_prob: probability that a patch's field of view is a thin axial slab instead
            (:func:`training.sampling.thin_slab`): both of its ends are cut, ``slab_slices``
            (min, max) slices apart, through the organ when the patch holds it. A CT may be a few
            slices of the upper abdomen (P2 is a 40 mm slab): measured, a locator that never saw
            one found nothing on it (held out, P2's mean spleen probability was 0.002).
        slab_slices: (min, max) thickness of the slab, in slices of the model grid.
        slab_away: on a patch with the organ, the share of slabs placed just beside it (holding
            none of it) instead of through it (``thin_slab``'s ``away``).
    """

    affine_prob: float = 0.5
    rotate_deg: tuple[float, float, float] = (10.0, 10.0, 15.0)
    scale: float = 0.15
    elastic_prob: float = 0.2
    elastic_sigma: tuple[float, float] = (5.0, 8.0)
    elastic_magnitude: tuple[float, float] = (20.0, 60.0)
    intensity_scale_prob: float = 0.3
    intensity_scale: float = 0.1
    intensity_shift_prob: float = 0.3
    intensity_shift: float = 0.1
    noise_prob: float = 0.2
    noise_std: float = 0.03
    blur_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    flip_lr: bool = False
    fov_end_prob: float = 0.0
    slab_prob: float = 0.0
    slab_slices: tuple[int, int] = (8, 20)
    slab_away: float = 0.0

    def __post_init__(self) -> None:
        for name in ("fov_end_prob", "slab_prob", "slab_away"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"config augment.{name} must be in [0, 1], got {getattr(self, name)}")
        lo, hi = self.slab_slices
        if not 1 <= lo <= hi:
            raise ValueError(f"config augment.slab_slices must be (min, max) with 1 <= min <= max, got {self.slab_slices}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run except the data and the fold.

    Attributes:
        model: the V-Net architecture.
        preprocessing: target spacing (mm), HU window and patch size (voxels) of the model.
        epochs: training epochs.
        iters_per_epoch: optimiser steps per epoch (per process under DDP the batch is per process).
        batch_size: patches per step and process.
        fg_ratio: share of patches centred on a foreground voxel (the rest: uniform).
        fg_offset: where that foreground voxel may sit in its patch, as a share of the half patch
            per axis: 0 puts it at the centre; 1 anywhere in the patch, so the organ is also seen
            at the window's border and cut by it, as a sliding window sees it.
        loss: "dice" (V-Net soft Dice, squared denominators) or "dice_ce" (Dice + cross-entropy).
        optimizer: "sgd" (Nesterov momentum) or "adamw".
        lr / weight_decay / momentum: optimiser settings.
        schedule: "poly" (lr * (1 - t)^poly_power), "cosine" or "constant"; stepped per iteration.
        warmup_iters: linear learning-rate warm-up at the start.
        grad_clip: maximum gradient norm (0 disables clipping).
        amp: mixed precision (float16 autocast + GradScaler); only ever used on CUDA.
        seed: seeds weights, sampling and augmentation.
        workers: DataLoader worker processes (0 = in the main process).
        val_every: validate every N epochs (and after the last one).
        val_overlap: sliding-window overlap of validation inference.
        val_postprocess: keep the largest component and fill holes before scoring (as deployed).
        folds: number of cross-validation folds.
        augment: augmentation settings.
        shift_consistency: weight of the shift-consistency loss (0 = off). Each patch is cut a
            little larger, two views of the patch size at random offsets within it go through the
            network, and where they overlap the squared distance of each view's foreground
            probability from their Gaussian-weighted mean is added to the loss (see
            losses.shift_consistency_loss): the same voxel should get the same answer wherever it
            falls in a window (sliding-window and fast-mode inference place windows differently).
        consistency_shift: largest offset between the two views, voxels per axis.
        partial_label: a label value (> every class) that means "not the first foreground class,
            otherwise unknown", for cases whose reference names one organ only, trained with cases
            that label several (losses.partial_dice_ce_loss); 0: every voxel is labelled.
        fg_classes: the label values foreground-centred patches are cut around (empty: any
            foreground label); e.g. (1,) keeps a multi-organ model's patches on the spleen.
    """

    model: VNetConfig = field(default_factory=lambda: preset("paper"))
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    epochs: int = 500
    iters_per_epoch: int = 250
    batch_size: int = 2
    fg_ratio: float = 0.5
    fg_offset: float = 0.0
    loss: str = "dice"
    optimizer: str = "sgd"
    lr: float = 0.01
    weight_decay: float = 3e-5
    momentum: float = 0.99
    schedule: str = "poly"
    poly_power: float = 0.9
    warmup_iters: int = 0
    grad_clip: float = 12.0
    amp: bool = True
    seed: int = 12345
    workers: int = 4
    val_every: int = 10
    val_overlap: float = 0.5
    val_postprocess: bool = True
    folds: int = 5
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    shift_consistency: float = 0.0
    consistency_shift: tuple[int, int, int] = (0, 0, 0)
    partial_label: int = 0
    fg_classes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("loss", self.loss, LOSSES)
        for name in ("epochs", "iters_per_epoch", "batch_size", "val_every", "folds"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"config {name} must be >= 1, got {getattr(self, name)}")
        if self.folds < 2:
            raise ValueError(f"config folds must be >= 2 for cross-validation, got {self.folds}")
        if not 0.0 <= self.fg_ratio <= 1.0:
            raise ValueError(f"config fg_ratio must be in [0, 1], got {self.fg_ratio}")
        if not 0.0 <= self.fg_offset <= 1.0:
            raise ValueError(f"config fg_offset must be in [0, 1], got {self.fg_offset}")
        if self.lr <= 0:
            raise ValueError(f"config lr must be > 0, got {self.lr}")
        if self.workers < 0:
            raise ValueError(f"config workers must be >= 0, got {self.workers}")
        if self.shift_consistency < 0:
            raise ValueError(f"config shift_consistency must be >= 0, got {self.shift_consistency}")
        if len(self.consistency_shift) != 3 or any(int(v) < 0 for v in self.consistency_shift):
            raise ValueError(f"config consistency_shift must be 3 voxel counts >= 0, got {self.consistency_shift}")
        if self.shift_consistency > 0 and not any(self.consistency_shift):
            raise ValueError("config shift_consistency > 0 needs a consistency_shift > 0 in at least one axis")
        if self.partial_label and not self.model.out_channels <= self.partial_label <= 255:
            raise ValueError(
                f"config partial_label must be 0 (off) or a label value from model.out_channels "
                f"({self.model.out_channels}) to 255, got {self.partial_label}"
            )
        if any(not 0 < int(c) < self.model.out_channels for c in self.fg_classes):
            raise ValueError(
                f"config fg_classes must be foreground classes 1..{self.model.out_channels - 1}, got {self.fg_classes}"
            )
        m = self.model.size_multiple
        if any(p % m for p in self.preprocessing.patch_size):
            raise ValueError(
                f"config preprocessing.patch_size {self.preprocessing.patch_size} must be a multiple of "
                f"{m} in every axis for a V-Net with {len(self.model.widths)} stages"
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["model"] = self.model.to_dict()
        return _lists(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        _reject_unknown(cls, data, "training config")
        if "model" in data:
            data["model"] = _model_from(data["model"])
        if "preprocessing" in data:
            pre = dict(data["preprocessing"])
            _reject_unknown(Preprocessing, pre, "preprocessing")
            data["preprocessing"] = Preprocessing(**pre)
        if "augment" in data:
            aug = dict(data["augment"])
            _reject_unknown(AugmentConfig, aug, "augment")
            data["augment"] = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in aug.items()})
        if "consistency_shift" in data:
            data["consistency_shift"] = tuple(int(v) for v in data["consistency_shift"])
        if "fg_classes" in data:
            data["fg_classes"] = tuple(int(v) for v in data["fg_classes"])
        return cls(**data)


def _model_from(value: Any) -> VNetConfig:
    """A VNetConfig from a preset name, a full dict, or {"preset": name, **overrides}."""
    if isinstance(value, VNetConfig):
        return value
    if isinstance(value, str):
        return preset(value)
    if isinstance(value, dict):
        value = dict(value)
        name = value.pop("preset", None)
        return preset(name, **value) if name else VNetConfig.from_dict(value)
    raise TypeError(f"config model must be a preset name or a dict, got {type(value).__name__}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"config {name} must be one of {choices}, got {value!r}")


def _reject_unknown(cls: type, data: dict[str, Any], what: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; known keys: {sorted(known)}")


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_lists(v) for v in value]
    return value


# ------------------------------------------------------------------------------ presets
def _presets() -> dict[str, TrainConfig]:
    spleen_pre = Preprocessing(target_spacing=(1.5, 1.5, 2.0), hu_window=(-57.0, 164.0), patch_size=(96, 96, 96))
    return {
        # MSD Task09_Spleen with the paper's V-Net (5x5x5, PReLU, 16-256 channels) plus instance
        # normalisation, which SGD at lr 0.01 / momentum 0.99 needs to train stably from scratch
        # (the paper itself used no normalisation and lr 1e-4): 1.5x1.5x2 mm, HU [-57, 164], 96^3.
        "spleen": TrainConfig(model=preset("paper", norm="instance"), preprocessing=spleen_pre),
        # The same data pipeline with the CPU-friendly light V-Net (3x3x3, instance norm, half widths).
        "spleen-light": TrainConfig(model=preset("light"), preprocessing=spleen_pre, optimizer="adamw",
                                    lr=2e-3, weight_decay=1e-5, schedule="cosine", warmup_iters=200),
        # Synthetic phantoms on a CPU in minutes (tests and the demo): light V-Net at 4 mm, 48^3 patches.
        "synthetic": TrainConfig(
            model=preset("light"),
            preprocessing=Preprocessing(target_spacing=(4.0, 4.0, 4.0), hu_window=(-57.0, 164.0),
                                        patch_size=(48, 48, 48)),
            epochs=12, iters_per_epoch=25, batch_size=2, fg_ratio=0.5, optimizer="adamw", lr=3e-3,
            weight_decay=1e-5, schedule="cosine", warmup_iters=10, workers=0, val_every=4, val_overlap=0.25,
            folds=5, augment=AugmentConfig(elastic_prob=0.0, rotate_deg=(5.0, 5.0, 10.0), scale=0.1),
        ),
    }


PRESET_NAMES = tuple(_presets())


def train_preset(name: str) -> TrainConfig:
    """A named training preset: "spleen", "spleen-light" or "synthetic"."""
    presets = _presets()
    if name not in presets:
        raise ValueError(f"unknown training preset {name!r}; choose one of {sorted(presets)} or give a JSON file")
    return presets[name]


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base`` (dicts merge, everything else replaces)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and "preset" not in value:
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(spec: str | os.PathLike[str] | TrainConfig, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A config from a preset name or a JSON file, with optional overrides.

    A JSON file is either a full config or ``{"base": "<preset>", ...partial overrides}``.
    ``overrides`` use dotted keys for nested fields, e.g. ``{"augment.elastic_prob": 0.0}``.
    """
    if isinstance(spec, TrainConfig):
        data = spec.to_dict()
    elif str(spec) in PRESET_NAMES:
        data = train_preset(str(spec)).to_dict()
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(
                f"--config {spec!r} is neither a preset ({', '.join(PRESET_NAMES)}) nor an existing JSON file"
            )
        try:
            file_data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path} is not valid JSON: {exc}") from None
        if not isinstance(file_data, dict):
            raise ValueError(f"config file {path} must hold a JSON object")
        base = file_data.pop("base", None)
        data = merge(train_preset(base).to_dict(), file_data) if base else file_data
    for dotted, value in (overrides or {}).items():
        data = merge(data, _nest(dotted.split("."), value))
    return TrainConfig.from_dict(data)


def _nest(keys: list[str], value: Any) -> dict[str, Any]:
    return {keys[0]: _nest(keys[1:], value) if len(keys) > 1 else value}


def with_changes(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """``dataclasses.replace`` re-validated (for tests and scripts)."""
    return replace(cfg, **changes)

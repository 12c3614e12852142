"""Patch sampling with a foreground ratio, and MONAI augmentation of the patches.

Every patch is a pure function of ``(seed, epoch, index)``: its case, its centre and its random
augmentation are drawn from a generator seeded with those three numbers. So a run is identical
whatever the number of DataLoader workers, and resuming at epoch ``e`` draws exactly the patches
an uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import Dataset

from .cache import CachedCase
from .config import AugmentConfig


def build_augmentation(aug: AugmentConfig, patch: tuple[int, int, int]):
    """MONAI dictionary transforms for keys "image" (C, X, Y, Z) and "label" (1, X, Y, Z).

    The input is a crop larger than ``patch`` (see :func:`crop_margin`); the spatial transform
    resamples its centre to exactly ``patch``, so rotated patches have no empty corners.
    """
    from monai.data import set_track_meta
    from monai.transforms import (
        Compose,
        Rand3DElasticd,
        RandAffined,
        RandAxisFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    set_track_meta(False)  # plain tensors out: no metadata bookkeeping per patch
    rot = [math.radians(d) for d in aug.rotate_deg]
    transforms = [
        RandAffined(
            keys=("image", "label"), prob=aug.affine_prob, spatial_size=patch, rotate_range=rot,
            scale_range=[aug.scale] * 3, mode=("bilinear", "nearest"), padding_mode="border",
        )
    ]
    if aug.elastic_prob > 0:
        transforms.append(Rand3DElasticd(
            keys=("image", "label"), sigma_range=aug.elastic_sigma, magnitude_range=aug.elastic_magnitude,
            prob=aug.elastic_prob, mode=("bilinear", "nearest"), padding_mode="border",
        ))
    if aug.flip_lr:
        transforms.append(RandAxisFlipd(keys=("image", "label"), prob=0.5))  # only with flip_lr: see config
    transforms += [
        RandScaleIntensityd(keys="image", factors=aug.intensity_scale, prob=aug.intensity_scale_prob),
        RandShiftIntensityd(keys="image", offsets=aug.intensity_shift, prob=aug.intensity_shift_prob),
        RandGaussianNoised(keys="image", std=aug.noise_std, prob=aug.noise_prob),
        RandGaussianSmoothd(keys="image", sigma_x=aug.blur_sigma, sigma_y=aug.blur_sigma, sigma_z=aug.blur_sigma,
                            prob=aug.blur_prob),
    ]
    return Compose(transforms)


def crop_margin(patch: tuple[int, int, int], aug: AugmentConfig | None) -> tuple[int, int, int]:
    """Crop size that still fills ``patch`` after the largest rotation and zoom-out."""
    if aug is None or aug.affine_prob <= 0:
        return patch
    grow = (1.0 + aug.scale) * (1.0 + math.sin(math.radians(max(aug.rotate_deg))))
    return tuple(int(math.ceil(p * grow / 2) * 2) for p in patch)  # type: ignore[return-value]


def crop(volume: np.ndarray, centre: np.ndarray, size: tuple[int, ...], pad_value: float) -> np.ndarray:
    """(X, Y, Z) box of ``size`` centred on ``centre``; outside the volume gets ``pad_value``."""
    start = np.asarray(centre) - np.asarray(size) // 2
    out = np.full(size, pad_value, dtype=volume.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, volume.shape):
        a, b = max(0, s), min(dim, s + n)
        src.append(slice(a, max(a, b)))
        dst.append(slice(a - s, a - s + max(0, b - a)))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def end_field_of_view(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, pad_value: float, prob: float, organ: int = 1
) -> str | None:
    """With probability ``prob``, end the patch's field of view at an axial plane, in place.

    ``image`` (C, X, Y, Z) and ``label`` (X, Y, Z) are on the model grid (axis Z is head-foot, the
    head at high Z). On one side of the plane the image becomes ``pad_value`` (what lies beyond a
    CT's scan range) and the labels background (0). Where the plane goes:

    - a patch without the organ: anywhere (at least one slice kept on each side);
    - a patch with it, half of the time: through the organ (a scan range that ends inside it);
    - the other half: just beyond the organ, 0-10 slices from it, on the side that removes it all,
      so that what is left ends near where the organ was and holds none of it (a lower abdomen
      that ends under the spleen, a chest that ends above it). Planes cut uniformly would almost
      never leave that, and a network trained on them learns "the organ at the end of the range".

    No draw is made when ``prob`` is 0 (runs without it stay as they were).

    Returns:
        "head" or "foot" (the side that was removed), with " (organ removed)" when it held all of
        the organ, or None.
    """
    if prob <= 0 or rng.random() >= prob:
        return None
    n = image.shape[-1]
    z = np.flatnonzero((label == organ).any(axis=(0, 1)))
    removed = ""
    if z.size and rng.random() < 0.5:
        options = []  # (side to remove, plane): the plane's side away from the kept part holds the organ
        gap = int(rng.integers(0, 11))
        if z.min() - gap >= 1:  # keep the foot side, below the organ
            options.append(("head", int(z.min()) - gap))
        if z.max() + 1 + gap <= n - 1:  # keep the head side, above it
            options.append(("foot", int(z.max()) + 1 + gap))
        if not options:
            return None
        side, cut = options[int(rng.integers(len(options)))]
        removed = " (organ removed)"
    else:
        lo, hi = (int(z.min()) + 1, int(z.max()) + 1) if z.size else (1, n)  # through the organ, or anywhere
        if hi <= lo:  # a one-slice organ (or patch): no plane through it
            return None
        cut = int(rng.integers(lo, hi))
        side = "head" if rng.random() < 0.5 else "foot"
    gone = np.s_[..., cut:] if side == "head" else np.s_[..., :cut]
    image[gone] = pad_value
    label[gone] = 0
    return side + removed


def thin_slab(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    pad_value: float,
    prob: float,
    slices: tuple[int, int],
    organ: int = 1,
    away: float = 0.0,
) -> tuple[int, int] | None:
    """With probability ``prob``, make the patch's field of view a thin axial slab, in place.

    ``image`` (C, X, Y, Z) and ``label`` (X, Y, Z) as in :func:`end_field_of_view`. The slab is
    ``slices`` (min, max, inclusive) slices thick (never more than the patch less one slice on each
    side); outside it the image becomes ``pad_value`` and the labels background. On a patch with the
    organ the slab holds at least one of its slices (a few slices of the upper abdomen, through the
    spleen); without it, or with the organ only in the patch's end slices, it lies anywhere. No draw is made when ``prob`` is 0.

    ``away``: on a patch with the organ, the share of slabs that lie just beside it instead, 0-10
    slices above or below it and holding none of it (a thin slab of the kidney under the spleen or of
    the heart above it), where the patch has room for one; otherwise the slab goes through the organ.
    Slabs that always hold the organ when it is near teach a network "a thin slab there is spleen".
    No extra draw is made when ``away`` is 0 (runs without it stay as they were).

    Returns:
        (first, stop) slices kept, or None.
    """
    if prob <= 0 or rng.random() >= prob:
        return None
    n = image.shape[-1]
    if n < 3:
        return None
    thick = int(rng.integers(min(slices[0], n - 2), min(slices[1], n - 2) + 1))
    zall = np.flatnonzero((label == organ).any(axis=(0, 1)))
    z = zall[(zall >= 1) & (zall <= n - 2)]  # a slab never keeps the patch's end slices
    first = None
    if z.size and away > 0 and rng.random() < away:
        gap = int(rng.integers(0, 11))
        options = []  # first slice of a slab wholly below the organ, or wholly above it
        if int(zall.min()) - gap - thick >= 1:
            options.append(int(zall.min()) - gap - thick)
        if int(zall.max()) + 1 + gap + thick <= n - 1:
            options.append(int(zall.max()) + 1 + gap)
        if options:
            first = options[int(rng.integers(len(options)))]
    if first is None and z.size:  # one of the organ's slices, then where in the slab it falls (kept by the clamp below)
        anchor = int(z[int(rng.integers(z.size))])
        first = anchor - int(rng.integers(thick))
    elif first is None:
        first = int(rng.integers(1, n - thick))
    first = min(max(first, 1), n - 1 - thick)  # a slab beside the organ is inside already
    stop = first + thick
    image[..., :first] = pad_value
    image[..., stop:] = pad_value
    label[..., :first] = 0
    label[..., stop:] = 0
    return first, stop


def two_views(
    image: torch.Tensor, label: torch.Tensor, patch: tuple[int, int, int], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two windows of ``patch`` voxels at random offsets in each (larger) patch of a batch.

    Args:
        image: (B, C, X, Y, Z) patches at least ``patch`` large.
        label: (B, X, Y, Z) labels of the same patches.
        patch: the window size.
        generator: draws the offsets (uniform in each axis).

    Returns:
        images (2B, C, *patch) and labels (2B, *patch): all first views, then all second views;
        offsets (2B, 3): where each window starts in its patch.
    """
    room = [s - p for s, p in zip(image.shape[2:], patch)]
    if any(r < 0 for r in room):
        raise ValueError(f"patches {tuple(image.shape[2:])} are smaller than the window {patch}")
    n = image.shape[0]
    offsets = torch.stack([torch.randint(0, r + 1, (2 * n,), generator=generator) for r in room], dim=1)
    images, labels = [], []
    for k in range(2 * n):
        a, b, c = offsets[k].tolist()
        images.append(image[k % n, :, a : a + patch[0], b : b + patch[1], c : c + patch[2]])
        labels.append(label[k % n, a : a + patch[0], b : b + patch[1], c : c + patch[2]])
    return torch.stack(images), torch.stack(labels), offsets


class PatchDataset(Dataset):
    """``length`` random patches per epoch from cached cases.

    Each item is a dict with "image" (1, X, Y, Z) float32 and "label" (X, Y, Z) int64 tensors.

    Args:
        cases: cached training cases.
        patch: patch size in voxels.
        length: patches per epoch (all processes together).
        fg_ratio: share of patches centred on a random foreground voxel.
        seed: base seed.
        augment: augmentation settings, or None for none.
        pad_value: value outside the volume (the lower end of the intensity scale).
        fg_offset: how far from the patch centre the foreground voxel may lie, as a share of half
            of ``patch`` per axis (uniform; 0 = centred on it; the voxel always stays inside).
        fg_classes: the label values that count as foreground for those patches (empty: every
            foreground voxel the cache stored).
    """

    def __init__(self, cases: list[CachedCase], patch: tuple[int, int, int], length: int, fg_ratio: float,
                 seed: int, augment: AugmentConfig | None, pad_value: float = 0.0, fg_offset: float = 0.0,
                 fg_classes: tuple[int, ...] = ()) -> None:
        if not cases:
            raise ValueError("PatchDataset needs at least one training case")
        if fg_classes:  # e.g. a multi-organ model whose patches are cut around the spleen only
            keep = np.asarray(fg_classes, dtype=np.uint8)
            cases = [
                replace(c, foreground=c.foreground[np.isin(np.asarray(c.label)[tuple(c.foreground.T)], keep)])
                for c in cases
            ]
        self.cases = cases
        self.patch = tuple(int(p) for p in patch)
        self.length = int(length)
        self.fg_ratio = float(fg_ratio)
        if not 0.0 <= fg_offset <= 1.0:
            raise ValueError(f"fg_offset must be in [0, 1], got {fg_offset}")
        self.fg_offset = float(fg_offset)
        self.seed = int(seed)
        self.epoch = 0
        self.pad_value = float(pad_value)
        self.aug_cfg = augment
        self.crop_size = crop_margin(self.patch, augment)  # type: ignore[arg-type]
        # built here, in the parent process: forked DataLoader workers inherit it (no import per epoch)
        self._transform = build_augmentation(augment, self.patch) if augment is not None else None  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def sample_centre(self, case: CachedCase, rng: np.random.Generator) -> np.ndarray:
        if len(case.foreground) and rng.random() < self.fg_ratio:
            voxel = case.foreground[rng.integers(len(case.foreground))].astype(int)
            if self.fg_offset == 0:  # no extra draw: runs without an offset stay as they were
                return voxel
            reach = np.floor(self.fg_offset * (np.asarray(self.patch) // 2 - 1)).astype(int)
            return voxel + np.array([rng.integers(-r, r + 1) for r in reach])
        # uniform centre such that the patch stays inside the volume where the volume is large enough
        half = np.asarray(self.patch) // 2
        shape = np.asarray(case.image.shape)
        lo = np.minimum(half, shape // 2)
        hi = np.maximum(shape - (np.asarray(self.patch) - half), lo + 1)
        return np.array([rng.integers(a, b) for a, b in zip(lo, hi)])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        case = self.cases[int(rng.integers(len(self.cases)))]
        centre = self.sample_centre(case, rng)
        image = crop(case.image, centre, self.crop_size, self.pad_value)[None]  # (1, X, Y, Z)
        label = crop(case.label, centre, self.crop_size, 0)[None]
        if self._transform is not None:
            self._transform.set_random_state(seed=int(rng.integers(2**31)))
            out = self._transform({"image": image.astype(np.float32), "label": label.astype(np.float32)})
            image_t = torch.as_tensor(np.asarray(out["image"]), dtype=torch.float32)
            label_t = torch.as_tensor(np.asarray(out["label"])).round().long()[0]
        else:
            image_t = torch.from_numpy(image.astype(np.float32))
            label_t = torch.from_numpy(label[0].astype(np.int64))
        slab = None
        if self.aug_cfg is not None and self.aug_cfg.slab_prob > 0:  # a slab has both ends cut already
            slab = thin_slab(image_t.numpy(), label_t.numpy(), rng, self.pad_value, self.aug_cfg.slab_prob,
                             self.aug_cfg.slab_slices, away=self.aug_cfg.slab_away)
        if slab is None and self.aug_cfg is not None and self.aug_cfg.fov_end_prob > 0:
            end_field_of_view(image_t.numpy(), label_t.numpy(), rng, self.pad_value, self.aug_cfg.fov_end_prob)
        return {"image": image_t, "label": label_t}

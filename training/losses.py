"""Losses: the V-Net soft Dice loss (squared denominators) and Dice + cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, include_background: bool = False, eps: float = 1e-5
) -> torch.Tensor:
    """1 - mean over classes of the V-Net soft Dice, computed over the whole batch.

    Milletari et al. (2016), eq. 1: ``D = 2 sum(p g) / (sum(p^2) + sum(g^2))`` with ``p`` the
    softmax probability and ``g`` the one-hot target. Sums run over the batch and all voxels
    ("batch Dice"), so patches without foreground still give a useful gradient.

    Args:
        logits: (B, K, X, Y, Z) raw network output.
        target: (B, X, Y, Z) integer labels in 0..K-1.
        include_background: also score class 0.
        eps: added to numerator and denominator (an empty class predicted empty scores 1).

    Returns:
        Scalar loss in [0, 1].
    """
    if logits.ndim != 5 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"logits (B, K, X, Y, Z) and target (B, X, Y, Z) expected, "
            f"got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 4, 1, 2, 3).to(probs.dtype)
    if not include_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    dims = (0, 2, 3, 4)
    intersection = (probs * onehot).sum(dims)
    denominator = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
    dice = (2.0 * intersection + eps) / (denominator + eps)  # (K or K-1,)
    return 1.0 - dice.mean()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, ce_weight: float = 1.0) -> torch.Tensor:
    """Soft Dice (as above) plus ``ce_weight`` x voxel-wise cross-entropy."""
    return soft_dice_loss(logits, target) + ce_weight * F.cross_entropy(logits.float(), target.long())


def make_loss(name: str):
    """The loss function called ``name`` ("dice" or "dice_ce")."""
    if name == "dice":
        return soft_dice_loss
    if name == "dice_ce":
        return dice_ce_loss
    raise ValueError(f"loss must be 'dice' or 'dice_ce', got {name!r}")

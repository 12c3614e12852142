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


def shift_consistency_loss(
    probs_a: torch.Tensor,
    probs_b: torch.Tensor,
    offsets_a: torch.Tensor,
    offsets_b: torch.Tensor,
    importance: torch.Tensor | None = None,
) -> torch.Tensor:
    """How far two windows' probabilities are from their weighted mean, over the voxels both contain.

    The target of each shared voxel is the mean of the two views weighted by ``importance`` at the
    voxel's place in each window (the sliding window's Gaussian: a voxel near one window's centre
    and the other's border takes its target mostly from the first), held fixed (no gradient): the
    view that saw the voxel with less context learns to answer as the one that saw more.

    Args:
        probs_a, probs_b: (B, C, X, Y, Z) probabilities of two windows of the same size cut from
            the same larger patch.
        offsets_a, offsets_b: (B, 3) integer start of each window in that larger patch.
        importance: (X, Y, Z) positive weight of each place in a window; None weighs both views equally.

    Returns:
        Scalar: the mean over the batch of each item's mean over its overlap of
        ``(a - t)^2 + (b - t)^2``, ``t`` the weighted mean.
    """
    if probs_a.shape != probs_b.shape or offsets_a.shape != (probs_a.shape[0], 3) or offsets_b.shape != offsets_a.shape:
        raise ValueError(
            f"two (B, C, X, Y, Z) views and (B, 3) offsets expected, got {tuple(probs_a.shape)}, "
            f"{tuple(probs_b.shape)}, {tuple(offsets_a.shape)}, {tuple(offsets_b.shape)}"
        )
    size = probs_a.shape[2:]
    weight = torch.ones(size, dtype=probs_a.dtype, device=probs_a.device) if importance is None else importance
    terms = []
    for i in range(probs_a.shape[0]):
        oa, ob = offsets_a[i].tolist(), offsets_b[i].tolist()
        lo = [max(a, b) for a, b in zip(oa, ob)]
        hi = [min(a, b) + n for a, b, n in zip(oa, ob, size)]
        if any(h <= low for low, h in zip(lo, hi)):
            continue  # the views do not overlap
        in_a = tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, oa))
        in_b = tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, ob))
        a, b = probs_a[i][(slice(None), *in_a)], probs_b[i][(slice(None), *in_b)]
        wa, wb = weight[in_a], weight[in_b]
        target = ((wa * a + wb * b) / (wa + wb)).detach()
        terms.append(((a - target) ** 2 + (b - target) ** 2).mean())
    if not terms:
        return probs_a.sum() * 0.0
    return torch.stack(terms).mean()


def partial_dice_ce_loss(
    logits: torch.Tensor, target: torch.Tensor, unknown: int, ce_weight: float = 1.0, eps: float = 1e-5
) -> torch.Tensor:
    """Dice + cross-entropy for labels that are partly unknown: ``unknown`` means "not class 1, but which
    other class is not known" (a case whose reference names the spleen only, trained with cases that
    also label the liver, kidneys, heart...).

    * Cross-entropy: a labelled voxel scores ``-log p[label]``; an ``unknown`` voxel scores the
      marginal ``-log(1 - p[1])``, the probability of all the classes it may belong to together.
    * Soft Dice (squared denominators, over the whole batch, background excluded): class 1 over
      every voxel (it is known everywhere); every other class over the labelled voxels only, and
      only when the batch has any: a class is never pushed down where it may be true.

    Args:
        logits: (B, K, X, Y, Z) raw network output, K >= 2.
        target: (B, X, Y, Z) labels in 0..K-1 or ``unknown``.
        unknown: the label value of "not class 1, otherwise unknown" (>= K).
        ce_weight: weight of the cross-entropy term.

    Returns:
        Scalar loss.
    """
    if logits.ndim != 5 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"logits (B, K, X, Y, Z) and target (B, X, Y, Z) expected, "
            f"got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    k = logits.shape[1]
    if k < 2 or unknown < k:
        raise ValueError(f"the unknown label {unknown} must lie outside the {k} classes (0..{k - 1}), with K >= 2")
    target = target.long()
    known = target != unknown
    log_p = torch.log_softmax(logits.float(), dim=1)
    safe = torch.where(known, target, torch.zeros_like(target))
    labelled = -log_p.gather(1, safe[:, None])[:, 0]
    others = torch.cat([log_p[:, :1], log_p[:, 2:]], dim=1)
    not_first = -torch.logsumexp(others, dim=1)  # -log(1 - p[1])
    ce = torch.where(known, labelled, not_first).mean()

    probs = log_p.exp()
    dims = (0, 1, 2, 3)
    # class 1 is known everywhere; the others only where labelled, and not at all in a batch with no label
    scored = range(1, k) if bool(known.any()) else range(1, 2)
    terms = []
    for c in scored:
        p, g = probs[:, c], (target == c).to(probs.dtype)
        if c != 1:
            p = p * known
        dice = (2.0 * (p * g).sum(dims) + eps) / ((p * p).sum(dims) + (g * g).sum(dims) + eps)
        terms.append(1.0 - dice)
    return torch.stack(terms).mean() + ce_weight * ce


def make_loss(name: str, partial_label: int = 0):
    """The loss function called ``name`` ("dice" or "dice_ce"); with ``partial_label`` > 0, its
    partial-label form (:func:`partial_dice_ce_loss`, no cross-entropy for "dice")."""
    if name not in ("dice", "dice_ce"):
        raise ValueError(f"loss must be 'dice' or 'dice_ce', got {name!r}")
    if partial_label:
        weight = 1.0 if name == "dice_ce" else 0.0
        return lambda logits, target: partial_dice_ce_loss(logits, target, partial_label, weight)
    return soft_dice_loss if name == "dice" else dice_ce_loss

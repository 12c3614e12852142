"""Optimisers and learning-rate schedules from the training config (stepped per iteration)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .config import TrainConfig


def build_optimizer(cfg: TrainConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum or AdamW, as ``cfg.optimizer`` says."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")


class LRFactor:
    """Learning-rate multiplier at iteration ``t`` of ``total``: warm-up, then poly/cosine/constant.

    A class (not a lambda) so that the scheduler's state dict holds plain data.
    """

    def __init__(self, schedule: str, total: int, warmup: int = 0, power: float = 0.9) -> None:
        self.schedule, self.total, self.warmup, self.power = schedule, max(1, int(total)), int(warmup), float(power)

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            return (t + 1) / (self.warmup + 1)
        frac = min(1.0, (t - self.warmup) / max(1, self.total - self.warmup))
        if self.schedule == "poly":
            return (1.0 - frac) ** self.power
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    total = cfg.epochs * cfg.iters_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor(cfg.schedule, total, cfg.warmup_iters, cfg.poly_power))

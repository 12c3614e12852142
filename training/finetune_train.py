"""The training steps of :mod:`training.finetune`: one phase (main network or locator) from a base model's weights.

Each step's patches are a pure function of (seed, step) (``training.sampling.PatchDataset`` with
epoch 0), batch norm keeps the base model's statistics, and the optimiser, schedule and weights are
saved every ``checkpoint_every`` steps, so a resumed phase ends with exactly the weights of an
uninterrupted one.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vnetseg.checkpoint import ModelInfo
from vnetseg.model import VNet

from .checkpointing import load_state, save_state
from .data import UNKNOWN_LABEL
from .losses import make_loss
from .optim import LRFactor
from .sampling import PatchDataset

if TYPE_CHECKING:
    from .finetune import FinetuneOptions

FG_RATIO, FG_OFFSET, GRAD_CLIP, WEIGHT_DECAY = 0.5, 0.5, 12.0, 1e-5
Emit = Callable[[dict[str, Any]], None]
CancelFn = Callable[[], bool]


class FinetuneCancelled(RuntimeError):
    """Stopped on request; the last state in the work folder lets the same command resume."""


def _append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["phase", "step", "loss", "lr"])
        if new:
            writer.writeheader()
        writer.writerows(rows)


def default_patch(info: ModelInfo, cap: tuple[int, int, int]) -> tuple[int, int, int]:
    """The base window capped at ``cap`` per axis, rounded down to the network's size multiple."""
    m = info.config.size_multiple
    return tuple(max(m, min(p, c) // m * m) for p, c in zip(info.preprocessing.patch_size, cap))  # type: ignore[return-value]


def freeze_norm(net: torch.nn.Module) -> None:
    """Batch norm keeps the base model's running statistics (eval mode); its scale and shift still train."""
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def round_like(net: VNet, dtype: str) -> None:
    """Round the weights to what the file will hold (float16 when the base was), so the scores are the file's."""
    if dtype == "float16":
        with torch.no_grad():
            for tensor in net.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.half().float())


@dataclass
class Phase:
    name: str  # "main" or "locator"
    net: VNet
    info: ModelInfo
    patch: tuple[int, int, int]
    steps: int
    lo: float  # progress fraction range of this phase
    hi: float


def train_phase(phase: Phase, cases: list, opts: FinetuneOptions, device: torch.device, emit: Emit,
                 cancel: CancelFn | None) -> int:
    """Train ``phase.net`` in place for ``phase.steps`` steps (resuming from its state file); return the start step."""
    state_path = opts.work / f"state_{phase.name}.pth"
    net = phase.net.to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor("cosine", phase.steps))
    start = 0
    if state_path.is_file():
        state = load_state(state_path)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["step"])
    pre = phase.info.preprocessing
    seed = opts.seed * 2 + (phase.name == "locator")
    patches = PatchDataset(cases, phase.patch, phase.steps * opts.batch_size, FG_RATIO, seed, None,
                           pad_value=pre.scale[0], fg_offset=FG_OFFSET)
    # a multi-organ locator (spleen, liver, kidney...): the user's masks name the spleen only, so every
    # other voxel is "not spleen, organ unknown" and the partial-label loss leaves its other classes alone
    partial = UNKNOWN_LABEL if len(phase.info.labels) > 1 else 0
    loss_fn, rows = make_loss("dice_ce", partial), []
    net.train()
    freeze_norm(net)
    for step in range(start, phase.steps):
        if cancel is not None and cancel():
            raise FinetuneCancelled(f"cancelled at {phase.name} step {step}; run the same command again to resume")
        items = [patches[step * opts.batch_size + b] for b in range(opts.batch_size)]
        image = torch.stack([it["image"] for it in items]).to(device)  # (B, 1, X, Y, Z)
        label = torch.stack([it["label"] for it in items]).to(device)  # (B, X, Y, Z)
        if partial:
            label = torch.where(label == 1, label, torch.full_like(label, partial))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(image), label)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        rows.append({"phase": phase.name, "step": step + 1, "loss": value, "lr": optimizer.param_groups[0]["lr"]})
        frac = phase.lo + (phase.hi - phase.lo) * (step + 1) / phase.steps
        emit({"event": "progress", "fraction": round(frac, 4), "phase": phase.name, "step": step + 1,
              "steps": phase.steps, "loss": round(value, 5),
              "message": f"{phase.name} step {step + 1}/{phase.steps}, loss {value:.4f}"})
        if (step + 1) % opts.checkpoint_every == 0 or step + 1 == phase.steps:
            save_state(state_path, {"phase": phase.name, "step": step + 1, "steps": phase.steps,
                                    "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                                    "scheduler": scheduler.state_dict()})
            _append_rows(opts.work / "log.csv", rows)
            rows = []
    net.eval()
    return start

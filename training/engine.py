"""The training loop: one code path for one CPU, one GPU, or many GPUs/machines under torchrun.

Output folder of a run (``--out OUT`` with ``--fold F``)::

    OUT/splits.json                 the k folds (reused when present: runs stay comparable)
    OUT/cache/<key>/                preprocessed cases (shared by all folds; keyed by settings)
    OUT/fold_F/config.json          the full training config
    OUT/fold_F/log.csv              one row per epoch: loss, lr, patches/s, validation Dice
    OUT/fold_F/curves.png           loss and validation Dice curves
    OUT/fold_F/checkpoint_last.pth  training state for exact resume (and checkpoint_best.pth)
    OUT/fold_F/model_best.pt        exported model files (vnetseg.checkpoint format, with card)
    OUT/fold_F/model_last.pt
    OUT/fold_F/validation.json      per-case Dice of the best and last validation

Only rank 0 writes. Validation runs the core's own ``predict_volume`` (sliding window on the
whole volume, back on the input grid) on the validation cases, shared among the ranks.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import vnetseg
from vnetseg.checkpoint import SPLEEN_LABELS, Label, ModelInfo, save_model
from vnetseg.inference import InferenceOptions, gaussian_importance, predict_volume
from vnetseg.model import VNet, build_model
from vnetseg.postprocess import dice

from . import distributed as dd
from .cache import cache_dir_for, ensure_cached, load_cached
from .checkpointing import load_state, save_state, set_rng_state
from .config import TrainConfig
from .data import MSDDataset, fold_cases, load_case, load_or_make_folds, read_msd, with_unknown
from .losses import make_loss, shift_consistency_loss
from .observe import Progress, append_log, plot_curves
from .optim import build_optimizer, build_scheduler
from .sampling import PatchDataset, two_views

PALETTE = ((157, 108, 162), (221, 130, 101), (128, 174, 128), (216, 101, 79), (241, 214, 145), (111, 184, 210))


@dataclass
class TrainOptions:
    """Where and what to train (the config says how).

    Attributes:
        data: MSD task folder.
        out: run folder (see the module docstring for its layout).
        fold: cross-validation fold to train (validation = that fold's cases), or "all": train on
            every case and "validate" on the same cases (a final model after cross-validation, or
            data too small to hold cases out; the card says so).
        config: the training configuration.
        splits: folds file (default ``out/splits.json``).
        cache: preprocessing cache root (default ``out/cache``).
        resume: continue from ``checkpoint_last.pth`` of this fold.
        device: "auto", "cpu", "cuda", ... (under torchrun: each rank's own GPU).
        max_epochs: stop after this many epochs in total (for tests); the schedule still spans
            ``config.epochs``.
        quiet: no progress lines.
    """

    data: Path
    out: Path
    fold: int | str = 0
    config: TrainConfig = field(default_factory=TrainConfig)
    splits: Path | None = None
    cache: Path | None = None
    resume: bool = False
    device: str = "auto"
    max_epochs: int | None = None
    quiet: bool = False


@dataclass
class TrainResult:
    """What a run produced (on rank 0; other ranks get the same numbers)."""

    fold_dir: Path
    epochs_done: int
    best_dice: float
    best_epoch: int
    last_dice: dict[str, float]
    history: list[dict[str, Any]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_labels(dataset: MSDDataset) -> tuple[Label, ...]:
    """Model labels for the dataset's foreground labels (spleen gets the standard colour and terminology)."""
    out = []
    for n, (value, name) in enumerate(sorted(dataset.foreground_labels.items())):
        if name.strip().lower() == "spleen":
            base = SPLEEN_LABELS[0]
            out.append(Label(value, base.name, base.color, base.terminology))
        else:
            out.append(Label(value, name.strip().capitalize() or f"Label {value}", PALETTE[n % len(PALETTE)]))
    return tuple(out)


def _on_main(info: dd.DistInfo, work: Callable[[], object]) -> None:
    """Run ``work`` on rank 0 only; every rank raises if it failed there (no rank waits forever)."""
    error: Exception | None = None
    if info.is_main:
        try:
            work()
        except Exception as exc:  # re-raised below, after telling the other ranks
            error = exc
    if not dd.broadcast_flag(error is None, info):
        raise error if error is not None else RuntimeError("rank 0 failed to prepare the run; see its error message")


def _log(info: dd.DistInfo, quiet: bool, message: str) -> None:
    if info.is_main and not quiet:
        print(message, file=sys.stderr, flush=True)


class Trainer:
    """Holds the state of one run; :meth:`run` trains, validates, checkpoints and exports."""

    def __init__(self, opts: TrainOptions, dist_info: dd.DistInfo) -> None:
        self.opts, self.dist, self.cfg = opts, dist_info, opts.config
        cfg = self.cfg
        self.dataset = read_msd(opts.data)
        if cfg.model.out_channels != len(self.dataset.labels):
            raise ValueError(
                f"config model.out_channels={cfg.model.out_channels} but {opts.data}/dataset.json names "
                f"{len(self.dataset.labels)} labels (background included); set model.out_channels accordingly"
            )
        self.fold_dir = Path(opts.out) / f"fold_{opts.fold}"
        splits = opts.splits or Path(opts.out) / "splits.json"
        names = self.dataset.case_names
        if opts.fold == "all":
            _on_main(self.dist, self._check_out_dir)
            self.train_names, self.val_names = list(names), list(names)
        elif isinstance(opts.fold, int):
            _on_main(self.dist, lambda: (self._check_out_dir(), load_or_make_folds(splits, names, cfg.folds, cfg.seed)))
            folds = load_or_make_folds(splits, names, cfg.folds, cfg.seed, write=False)
            self.train_names, self.val_names = fold_cases(folds, opts.fold)
        else:
            raise ValueError(f"fold must be a fold number or 'all', got {opts.fold!r}")
        self.labels = model_labels(self.dataset)
        seed_everything(cfg.seed)
        self.model: VNet = build_model(cfg.model).to(self.dist.device)
        self.net: torch.nn.Module = (
            DistributedDataParallel(
                self.model, device_ids=[self.dist.device] if self.dist.device.type == "cuda" else None
            )
            if self.dist.enabled else self.model
        )
        self.optimizer = build_optimizer(cfg, self.model.parameters())
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.use_amp = bool(cfg.amp and self.dist.device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.loss_fn = make_loss(cfg.loss, cfg.partial_label)
        self.epoch = 0
        self.best_dice, self.best_epoch = -1.0, -1
        self.history: list[dict[str, Any]] = []
        self.last_dice: dict[str, float] = {}
        self.consistency = 0.0
        # shift consistency weighs a voxel's place in each window as the sliding window's Gaussian does
        self.importance = (
            torch.from_numpy(gaussian_importance(cfg.preprocessing.patch_size)).to(self.dist.device)
            if cfg.shift_consistency > 0 else None
        )

    # ------------------------------------------------------------------ set-up
    def _check_out_dir(self) -> None:
        last = self.fold_dir / "checkpoint_last.pth"
        if last.exists() and not self.opts.resume:
            raise FileExistsError(
                f"{self.fold_dir} already holds a training run; pass --resume to continue it or choose another --out"
            )
        self.fold_dir.mkdir(parents=True, exist_ok=True)
        config_file = self.fold_dir / "config.json"
        if self.opts.resume and last.exists():
            if config_file.is_file() and json.loads(config_file.read_text()) != self.cfg.to_dict():
                raise ValueError(
                    f"the config differs from the one of the run in {self.fold_dir}; resume with "
                    f"--config {config_file} (or leave --config out)"
                )
        else:
            (self.fold_dir / "log.csv").unlink(missing_ok=True)
        config_file.write_text(json.dumps(self.cfg.to_dict(), indent=1))

    def _loader(self) -> tuple[PatchDataset, DataLoader]:
        cfg, opts = self.cfg, self.opts
        cache_root = opts.cache or Path(opts.out) / "cache"
        train_cases = [self.dataset.case(n) for n in self.train_names]
        log = None if opts.quiet else lambda m: print(m, file=sys.stderr, flush=True)
        labels, unknown = self.dataset.labels, cfg.partial_label
        _on_main(self.dist, lambda: ensure_cached(train_cases, labels, cfg.preprocessing, cache_root, log, unknown))
        folder = cache_dir_for(cache_root, cfg.preprocessing, labels, unknown)
        cached = load_cached(folder, self.train_names)
        per_rank = cfg.iters_per_epoch * cfg.batch_size
        # with shift consistency each patch is cut larger: two windows at different offsets come out of it
        extra = cfg.consistency_shift if cfg.shift_consistency > 0 else (0, 0, 0)
        size = tuple(p + e for p, e in zip(cfg.preprocessing.patch_size, extra))
        ds = PatchDataset(cached, size, per_rank * self.dist.world, cfg.fg_ratio, cfg.seed,
                          cfg.augment, pad_value=cfg.preprocessing.scale[0], fg_offset=cfg.fg_offset,
                          fg_classes=cfg.fg_classes)
        sampler = DistributedSampler(ds, self.dist.world, self.dist.rank, shuffle=False) if self.dist.enabled else None
        loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, shuffle=False, num_workers=cfg.workers,
                            pin_memory=self.dist.device.type == "cuda", drop_last=True,
                            multiprocessing_context="fork" if cfg.workers > 0 and sys.platform == "linux" else None)
        return ds, loader

    # ----------------------------------------------------------------- resume
    def restore(self, path: Path) -> None:
        state = load_state(path)
        if state.get("fold") != self.opts.fold:
            raise ValueError(f"{path} is a checkpoint of fold {state.get('fold')}, not fold {self.opts.fold}")
        if json.loads(state["config"]) != self.cfg.to_dict():
            raise ValueError(f"{path} was written with a different config; resume with the run's own config.json")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.best_dice, self.best_epoch = float(state["best_dice"]), int(state["best_epoch"])
        self.history = list(state["history"])
        self.last_dice = dict(state.get("last_dice", {}))
        set_rng_state(state["rng"])

    def _state(self) -> dict[str, Any]:
        return {
            "fold": self.opts.fold, "epoch": self.epoch, "config": json.dumps(self.cfg.to_dict()),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "best_dice": self.best_dice, "best_epoch": self.best_epoch, "history": self.history,
            "last_dice": self.last_dice,
        }

    # ---------------------------------------------------------------- training
    def train_epoch(self, ds: PatchDataset, loader: DataLoader) -> tuple[float, float]:
        """One epoch; returns (mean loss over all ranks, patches per second over all ranks)."""
        ds.set_epoch(self.epoch)
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(self.epoch)
        self.net.train()
        bar = Progress(self.epoch + 1, self.cfg.epochs, len(loader), enabled=self.dist.is_main and not self.opts.quiet)
        total, steps, t0 = 0.0, 0, time.perf_counter()
        consistency = 0.0  # sum of the shift-consistency terms of this epoch (0 when off)
        for step, batch in enumerate(loader, 1):
            image = batch["image"].to(self.dist.device, non_blocking=True)  # (B, 1, X, Y, Z)
            label = batch["label"].to(self.dist.device, non_blocking=True)  # (B, X, Y, Z)
            offsets = None
            if self.cfg.shift_consistency > 0:  # two windows per patch (2B), see TrainConfig
                views = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch * 10_007 + step)
                image, label, offsets = two_views(image, label, self.cfg.preprocessing.patch_size, views)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=self.use_amp):
                logits = self.net(image)  # (B, K, X, Y, Z)
            loss = self.loss_fn(logits.float(), label)
            if offsets is not None:
                probs = torch.softmax(logits.float(), dim=1)[:, 1:]
                half = probs.shape[0] // 2
                term = shift_consistency_loss(probs[:half], probs[half:], offsets[:half], offsets[half:], self.importance)
                loss = loss + self.cfg.shift_consistency * term
                consistency += float(term.detach())
            self.scaler.scale(loss).backward()
            if self.cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            total += float(loss.detach())
            steps += 1
            bar.update(step, total / steps, image.shape[0])
        seconds = time.perf_counter() - t0
        sums = dd.all_reduce_sum(torch.tensor([total, steps, steps * self.cfg.batch_size, consistency]), self.dist)
        self.consistency = float(sums[3] / max(sums[1], 1))  # mean over every process's steps, like the loss
        self._bar = bar
        return float(sums[0] / max(sums[1], 1)), float(sums[2] / max(seconds, 1e-9))

    def validate(self) -> dict[str, float]:
        """Per-case Dice (mean over foreground labels) of the validation cases, via the core's inference.

        With partial labels (``partial_label``) only the first foreground label is scored: it is the
        one every case labels (a validation CT may name the spleen only).
        """
        info = self.model_info({})
        options = InferenceOptions(device=str(self.dist.device), overlap=self.cfg.val_overlap,
                                   batch_size=self.cfg.batch_size, postprocess=self.cfg.val_postprocess,
                                   amp=self.cfg.amp)
        mine = self.val_names[self.dist.rank :: self.dist.world]
        scores = torch.zeros(len(self.val_names), dtype=torch.float64)
        for name in mine:
            labels = with_unknown(self.dataset.labels, self.cfg.partial_label)  # a spleen-only case may hold 255
            image, label = load_case(self.dataset.case(name), labels)
            pred = predict_volume(image, self.model, info, options).labelmap
            scored = self.labels[:1] if self.cfg.partial_label else self.labels
            per_label = [dice(pred == lab.value, label == lab.value) for lab in scored]
            scores[self.val_names.index(name)] = float(np.mean(per_label))
        self.model.train()
        scores = dd.all_reduce_sum(scores, self.dist)
        return {name: float(s) for name, s in zip(self.val_names, scores)}

    # ----------------------------------------------------------------- export
    def model_info(self, card: dict[str, Any]) -> ModelInfo:
        return ModelInfo(self.cfg.model, self.cfg.preprocessing, self.labels, card)

    def card(self, kind: str, dice_per_case: dict[str, float], epoch: int) -> dict[str, Any]:
        mean = float(np.mean(list(dice_per_case.values()))) if dice_per_case else None
        return {
            "name": f"V-Net {self.dataset.name or 'MSD task'} fold {self.opts.fold} ({kind})",
            "trained": True,
            "data": {"root": str(Path(self.opts.data).resolve()), "task": self.dataset.name,
                     "labels": {str(k): v for k, v in self.dataset.labels.items()},
                     "num_cases": len(self.dataset.cases), "train_cases": self.train_names,
                     "val_cases": self.val_names},
            "fold": self.opts.fold, "folds": self.cfg.folds, "epochs": epoch, "epochs_planned": self.cfg.epochs,
            "validation": {"dice_per_case": dice_per_case, "dice_mean": mean,
                           "on_training_cases": self.opts.fold == "all"},
            "seed": self.cfg.seed, "world_size": self.dist.world,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "software": {"vnetseg": getattr(vnetseg, "__version__", "?"), "torch": torch.__version__,
                         "python": platform.python_version()},
            "config": self.cfg.to_dict(),
        }

    def export(self, name: str, kind: str, dice_per_case: dict[str, float], epoch: int) -> Path:
        path = self.fold_dir / name
        save_model(path, self.model, self.model_info(self.card(kind, dice_per_case, epoch)))
        return path

    # -------------------------------------------------------------------- run
    def run(self) -> TrainResult:
        cfg, opts = self.cfg, self.opts
        last = self.fold_dir / "checkpoint_last.pth"
        if opts.resume and dd.broadcast_flag(last.is_file(), self.dist):
            self.restore(last)
            _log(self.dist, opts.quiet, f"resumed {last} at epoch {self.epoch}")
        ds, loader = self._loader()
        stop = min(cfg.epochs, opts.max_epochs or cfg.epochs)
        while self.epoch < stop:
            loss, rate = self.train_epoch(ds, loader)
            self.epoch += 1
            row: dict[str, Any] = {"epoch": self.epoch, "train_loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                                   "patches_per_s": rate, "seconds": time.perf_counter() - self._bar.start}
            if cfg.shift_consistency > 0:
                row["train_consistency"] = self.consistency
            extra = ""
            if self.epoch % cfg.val_every == 0 or self.epoch == cfg.epochs or self.epoch == stop:
                self.last_dice = self.validate()
                mean = float(np.mean(list(self.last_dice.values())))
                row["val_dice_mean"] = mean
                improved = mean > self.best_dice
                if improved:
                    self.best_dice, self.best_epoch = mean, self.epoch
                extra = f" | val Dice {mean:.4f} (best {self.best_dice:.4f} @ {self.best_epoch})"
                if self.dist.is_main and improved:
                    self.export("model_best.pt", "best", self.last_dice, self.epoch)
                    save_state(self.fold_dir / "checkpoint_best.pth", self._state())
            row["best_dice"] = self.best_dice if self.best_epoch > 0 else None
            self.history.append(row)
            self._bar.close(self._bar.total, loss, extra)
            if self.dist.is_main:
                self._write_epoch(row)
        if self.dist.is_main:
            self.export("model_last.pt", "last", self.last_dice, self.epoch)
        dd.barrier(self.dist)
        return TrainResult(self.fold_dir, self.epoch, self.best_dice, self.best_epoch, self.last_dice, self.history)

    def _write_epoch(self, row: dict[str, Any]) -> None:
        save_state(self.fold_dir / "checkpoint_last.pth", self._state())
        append_log(self.fold_dir / "log.csv", row)
        plot_curves(self.fold_dir / "log.csv", self.fold_dir / "curves.png")
        (self.fold_dir / "validation.json").write_text(json.dumps(
            {"best_epoch": self.best_epoch, "best_dice_mean": self.best_dice, "last_epoch": self.epoch,
             "last_dice_per_case": self.last_dice}, indent=1))


def train(opts: TrainOptions) -> TrainResult:
    """Train one fold (joins the torchrun process group when there is one)."""
    info = dd.setup(opts.device)
    try:
        return Trainer(opts, info).run()
    finally:
        dd.teardown(info)

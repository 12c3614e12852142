"""Fine-tune a model file on corrected cases: ``python -m training.finetune --model BASE.pt --data DIR --out NEW.pt``.

Starts from the base model's weights (and fine-tunes its fast-mode locator too, when the training
cases have spleen voxels at the locator's spacing), keeps its preprocessing, window and labels,
trains on the cases of an MSD folder (what the Slicer module's *Export for training* writes), and
writes a new self-describing model file whose card names the base model (name, version, SHA-256),
the cases, the steps and the scores. The base model file is only read.

Guard: part of the cases is held out (or the cases named with ``--val-case``); base and new model
segment them with the core's inference and are scored side by side (Dice, HD95, volume error). A
new model that is worse (lower mean Dice) is not written unless ``--force`` is given. With fewer
than three cases none is held out and the table says the scores are on the training cases.

Batch norm layers keep the base model's statistics (they are not re-estimated from a few patches),
and every training patch is a pure function of (seed, step), so two runs with the same seed give
the same weights on a CPU, and a run resumed after a cancel or a crash (from the state written
every ``--checkpoint-every`` steps into the work folder) ends with the same weights as one that
was never interrupted. Work folder (default ``NEW_finetune/`` next to ``NEW.pt``)::

    settings.json   what defines the run; a different run in the same folder is refused
    cache/          the cases preprocessed once (training.cache)
    state_main.pth, state_locator.pth   training state for resume (removed once the model is written)
    log.csv         phase, step, loss (written with each state)
    scores.json     the base model's scores (reused on resume) and the last comparison
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vnetseg
from vnetseg.checkpoint import ModelFileError, ModelInfo, load_model, save_model
from vnetseg.inference import InferenceOptions, choose_mode, resolve_device
from vnetseg.model import VNet

from .cache import ensure_cached, load_cached
from .data import DatasetError, MSDDataset, load_case, read_msd
from .finetune_scores import Comparison, metrics_from_dicts, metrics_to_dicts, score_model
from .finetune_train import CancelFn, Emit, FinetuneCancelled, Phase, default_patch, round_like, train_phase

EXIT_OK, EXIT_ERROR, EXIT_WORSE, EXIT_CANCELLED = 0, 2, 3, 130


class FinetuneError(ValueError):
    """Input that cannot be fine-tuned on; nothing was written."""


@dataclass
class FinetuneOptions:
    """What to fine-tune, on what, and how (defaults: a few minutes on a 2-core CPU).

    Attributes:
        model: the base model file (only read). data: MSD folder of cases. out: new model file.
        work: work folder (state, cache, log); default ``<out without .pt>_finetune``.
        steps / locator_steps: optimiser steps of the main network / of the locator (0: keep it).
        batch_size: patches per step. lr: AdamW learning rate (cosine decay to 0).
        patch_size: training patch (voxels); default the base window capped at 128 x 128 x 32.
        seed: seeds the patches and the hold-out split.
        val_cases: cases to score on (not trained on); default: a fifth of the cases when there
            are at least three, else none (the scores are then on the training cases).
        tolerance: the new model counts as worse when its mean Dice is below the base's by more.
        force: write the new model even when it is worse. overwrite: replace an existing ``out``.
        restart: discard a previous run in the work folder instead of resuming it.
        restart_if_changed: resume a previous run with the same settings, discard one with others
            (what the Slicer panel does: a new export into the folder starts afresh).
        device: "auto" (GPU when present), "cpu", "cuda"... eval_mode: inference mode for scoring.
        name / version: the new model's card name and version (defaults derived from the base).
        sha256: expected SHA-256 of the base model file.
        checkpoint_every: steps between training states.
    """

    model: Path
    data: Path
    out: Path
    work: Path | None = None
    steps: int = 200
    locator_steps: int = 60
    batch_size: int = 2
    lr: float = 2e-4
    patch_size: tuple[int, int, int] | None = None
    seed: int = 0
    val_cases: tuple[str, ...] = ()
    tolerance: float = 0.0
    force: bool = False
    overwrite: bool = False
    restart: bool = False
    restart_if_changed: bool = False
    device: str = "auto"
    eval_mode: str = "auto"
    name: str = ""
    version: str = ""
    sha256: str | None = None
    checkpoint_every: int = 10

    def __post_init__(self) -> None:
        self.model, self.data, self.out = Path(self.model), Path(self.data), Path(self.out)
        self.work = Path(self.work) if self.work is not None else self.out.with_name(self.out.stem + "_finetune")
        for key in ("steps", "batch_size", "checkpoint_every"):
            if int(getattr(self, key)) < 1:
                raise FinetuneError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.locator_steps < 0:
            raise FinetuneError(f"locator_steps must be >= 0, got {self.locator_steps}")
        if self.lr <= 0:
            raise FinetuneError(f"lr must be > 0, got {self.lr}")
        if self.eval_mode not in ("auto", "fast", "full"):
            raise FinetuneError(f"eval_mode must be 'auto', 'fast' or 'full', got {self.eval_mode!r}")
        self.val_cases = tuple(self.val_cases)


@dataclass
class FinetuneResult:
    """What a fine-tune produced: ``installed`` is False when the guard kept a worse model out."""

    installed: bool
    out: Path | None
    sha256: str
    comparison: Comparison
    train_cases: list[str]
    val_cases: list[str]
    steps: int
    locator_steps: int
    resumed_at: int
    seconds: float
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def worse(self) -> bool:
        return self.comparison.worse


# ------------------------------------------------------------------------------ inputs
@dataclass
class _Inputs:
    net: VNet
    info: ModelInfo
    dataset: MSDDataset
    train: list[str]
    val: list[str]
    on_training_cases: bool


def split_cases(names: list[str], val_cases: tuple[str, ...], seed: int) -> tuple[list[str], list[str], bool]:
    """(training cases, scoring cases, scores on training cases?); see :class:`FinetuneOptions`."""
    if val_cases:
        unknown = sorted(set(val_cases) - set(names))
        if unknown:
            raise FinetuneError(f"validation case(s) {unknown} are not in the folder (cases: {', '.join(names[:10])})")
        train = [n for n in names if n not in set(val_cases)]
        if not train:
            raise FinetuneError("every case is a validation case; leave at least one case to train on")
        return train, [n for n in names if n in set(val_cases)], False
    if len(names) < 3:
        return list(names), list(names), True
    order = sorted(names)
    np.random.default_rng(seed).shuffle(order)
    val = sorted(order[: max(1, round(len(names) / 5))])
    return [n for n in names if n not in set(val)], val, False


def check_inputs(opts: FinetuneOptions) -> _Inputs:
    """Every check before anything is written: output, base model, folder, labels, each case."""
    if opts.out.suffix != ".pt":
        raise FinetuneError(f"--out must be a model file name ending in .pt, got {opts.out.name!r}")
    in_work = opts.out.parent.resolve() == opts.work.resolve()  # the work folder is made after the checks
    if not (opts.out.parent.is_dir() or in_work):
        raise FinetuneError(f"--out {opts.out}: the folder {opts.out.parent} does not exist")
    if opts.out.exists() and (opts.out.resolve() == opts.model.resolve() or not opts.overwrite):
        what = "is the base model, which is never replaced" if opts.out.resolve() == opts.model.resolve() \
            else "already exists; pass --overwrite to replace it or choose another name"
        raise FinetuneError(f"--out {opts.out} {what}")
    if importlib.util.find_spec("monai") is None:
        raise FinetuneError("scoring base and new model needs MONAI (for the HD95): pip install monai "
                            "(in Slicer: slicer.util.pip_install('monai'))")
    try:
        net, info = load_model(opts.model, opts.sha256)
    except ModelFileError as exc:
        raise FinetuneError(f"--model: {exc}") from None
    dataset = read_msd(opts.data)
    want = [lab.name.lower() for lab in info.labels]
    have = [name.strip().lower() for _, name in sorted(dataset.foreground_labels.items())]
    if have != want or [lab.value for lab in info.labels] != sorted(dataset.foreground_labels):
        raise FinetuneError(
            f"{opts.data}/dataset.json names the labels {dataset.foreground_labels}, but the base model segments "
            f"{ {lab.value: lab.name for lab in info.labels} }; fine-tune on cases of the same labels"
        )
    train, val, on_train = split_cases(dataset.case_names, opts.val_cases, opts.seed)
    foreground = 0
    for name in dataset.case_names:
        _, label = load_case(dataset.case(name), dataset.labels)  # grid and label values checked here
        foreground += int(name in train and bool(np.any(label > 0)))
    if not foreground:
        raise FinetuneError(f"no training case in {opts.data} has any {info.labels[0].name.lower()} voxel; "
                            "fine-tuning on empty masks only would teach the model to find nothing")
    return _Inputs(net, info, dataset, train, val, on_train)


# ------------------------------------------------------------------------- work folder
def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [int(stat.st_size), int(stat.st_mtime_ns)]


def run_settings(opts: FinetuneOptions, inputs: _Inputs, patch: tuple[int, ...],
                 locator_patch: tuple[int, ...] | None) -> dict[str, Any]:
    """Everything that defines the run's weights: a work folder is resumed only when these are equal."""
    return {
        "base_sha256": inputs.info.sha256, "data": str(opts.data.resolve()),
        "cases": {c.name: [_stamp(c.image), _stamp(c.label)] for c in inputs.dataset.cases},
        "train_cases": inputs.train, "val_cases": inputs.val, "steps": opts.steps,
        "locator_steps": opts.locator_steps, "batch_size": opts.batch_size, "lr": opts.lr,
        "patch_size": list(patch), "locator_patch": list(locator_patch) if locator_patch else None,
        "seed": opts.seed,
    }


WORK_FILES = ("settings.json", "state_main.pth", "state_locator.pth", "log.csv", "scores.json")


def _prepare_work(opts: FinetuneOptions, settings: dict[str, Any]) -> bool:
    """Create the work folder, or check that it holds this run; True when a previous run is resumed."""
    path = opts.work / "settings.json"
    changed = path.is_file() and json.loads(path.read_text()) != settings
    if opts.restart or (changed and opts.restart_if_changed):
        for name in WORK_FILES:
            (opts.work / name).unlink(missing_ok=True)
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            keys = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise FinetuneError(
                f"the work folder {opts.work} holds a fine-tune with other settings ({', '.join(keys)} differ); "
                "pass --restart to discard it, or choose another --work folder"
            )
        return (opts.work / "state_main.pth").is_file()
    opts.work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))
    return False


def _base_scores(opts: FinetuneOptions, inputs: _Inputs, infer: InferenceOptions, emit: Emit) -> list:
    """The base model's scores on the scoring cases (read back from scores.json on resume)."""
    path = opts.work / "scores.json"
    key = {"base_sha256": inputs.info.sha256, "cases": inputs.val, "mode": infer.mode, "device": infer.device}
    data = json.loads(path.read_text()) if path.is_file() else {}
    if data.get("base_key") == key:
        return metrics_from_dicts(data["base"])
    emit({"event": "progress", "fraction": 0.06, "phase": "score", "message": "scoring the base model"})
    rows = score_model(inputs.net, inputs.info, inputs.dataset, inputs.val, infer)
    path.write_text(json.dumps({"base_key": key, "base": metrics_to_dicts(rows)}, indent=1))
    return rows


def _cached(opts: FinetuneOptions, inputs: _Inputs, info: ModelInfo) -> list:
    cases = [inputs.dataset.case(n) for n in inputs.train]
    folder = ensure_cached(cases, inputs.dataset.labels, info.preprocessing, opts.work / "cache")
    return load_cached(folder, inputs.train)


def _copy(net: VNet) -> VNet:
    new = VNet(net.config)
    new.load_state_dict(net.state_dict())
    return new


def _train_locator(opts: FinetuneOptions, inputs: _Inputs, patch: tuple[int, int, int] | None, device: torch.device,
                   emit: Emit, cancel: CancelFn | None) -> tuple[tuple[VNet, ModelInfo] | None, int, str]:
    """The new model's locator (fine-tuned when the cases allow, else the base's), its steps, and a note why."""
    base = inputs.info.locator
    if base is None:
        return None, 0, "none in the base model"
    if patch is None:
        return base, 0, "kept from the base model unchanged (locator_steps 0)"
    cases = _cached(opts, inputs, base[1])
    if not any(len(c.foreground) for c in cases):
        return base, 0, "kept from the base model unchanged: no training case has spleen voxels at the locator's spacing"
    locator = (_copy(base[0]), base[1])
    train_phase(Phase("locator", locator[0], base[1], patch, opts.locator_steps, 0.8, 0.88), cases, opts, device,
                emit, cancel)
    return locator, opts.locator_steps, f"fine-tuned from the base model's locator ({opts.locator_steps} steps)"


# ---------------------------------------------------------------------------- the run
def finetune(opts: FinetuneOptions, emit: Emit | None = None, cancel: CancelFn | None = None) -> FinetuneResult:
    """Fine-tune, score base and new side by side, and write the new model unless it is worse (see module doc).

    Args:
        opts: the run. emit: receives progress events (dicts with "event", "fraction", "message",
            and "step", "steps", "loss" while training). cancel: polled before each step; True stops.

    Raises:
        FinetuneError / DatasetError / ModelFileError: bad input (nothing written).
        FinetuneCancelled: ``cancel`` returned True (the work folder keeps the last state).
    """
    started = time.perf_counter()
    emit = emit or (lambda event: None)
    emit({"event": "progress", "fraction": 0.0, "phase": "check", "message": "checking the base model and the cases"})
    inputs = check_inputs(opts)
    info, device = inputs.info, resolve_device(opts.device)
    patch = tuple(opts.patch_size) if opts.patch_size else default_patch(info, (128, 128, 32))
    if len(patch) != 3 or any(p < 1 or p % info.config.size_multiple for p in patch):
        raise FinetuneError(f"patch_size must be 3 multiples of {info.config.size_multiple}, got {patch}")
    loc_patch = default_patch(info.locator[1], (64, 64, 32)) if info.locator and opts.locator_steps else None
    torch.manual_seed(opts.seed)
    if _prepare_work(opts, run_settings(opts, inputs, patch, loc_patch)):
        emit({"event": "progress", "fraction": 0.05, "phase": "resume", "message": f"resuming the run in {opts.work}"})
    infer = InferenceOptions(device=str(device), mode=choose_mode(opts.eval_mode, device, info))
    base_rows = _base_scores(opts, inputs, infer, emit)

    emit({"event": "progress", "fraction": 0.12, "phase": "prepare", "message": "preprocessing the training cases"})
    net = _copy(inputs.net)
    start = train_phase(Phase("main", net, info, patch, opts.steps, 0.15, 0.8), _cached(opts, inputs, info),
                         opts, device, emit, cancel)
    locator, locator_steps, note = _train_locator(opts, inputs, loc_patch, device, emit, cancel)
    for part in (net, locator[0] if locator else None):
        if part is not None:
            round_like(part.cpu(), info.weights_dtype)
    # no ``postprocessing``: a calibration measured for the base weights (the shipped model's native-CT
    # growth) does not hold for new ones (on a corrected native case it grew the mask 10 % past the
    # reference), so the fine-tuned network's mask is its own
    new_info = ModelInfo(info.config, info.preprocessing, info.labels, {})
    new_info.locator = locator
    # the base's locator check (v2.4.0: a multi-organ network that vetoes a located kidney) is not trained
    # here and judges the located part, not the new mask, so the new model keeps it as it is
    new_info.locator_check = info.locator_check if locator is not None else None
    new_info.locator_check_min, new_info.locator_check_rivals = info.locator_check_min, info.locator_check_rivals
    emit({"event": "progress", "fraction": 0.9, "phase": "score", "message": "scoring the new model"})
    new_rows = score_model(net, new_info, inputs.dataset, inputs.val, infer)
    comparison = Comparison(base_rows, new_rows, inputs.on_training_cases, infer.mode, opts.tolerance)
    scores_path = opts.work / "scores.json"
    scores_path.write_text(json.dumps({**json.loads(scores_path.read_text()), "last": comparison.to_dict()}, indent=1))
    seconds = time.perf_counter() - started
    new_info.card = make_card(opts, inputs, comparison, locator_steps, note, str(device), seconds, patch)
    result = FinetuneResult(False, None, "", comparison, inputs.train, inputs.val, opts.steps, locator_steps, start,
                            seconds, new_info.card)
    if comparison.worse and not opts.force:
        return result
    loc_arg = None
    if locator is not None:
        loc_info = replace(locator[1], card={**locator[1].card, "fine_tuned_steps": locator_steps, "note": note})
        loc_arg = (locator[0], loc_info)
    check = None if new_info.locator_check is None else (*new_info.locator_check, new_info.locator_check_min)
    sha = save_model(opts.out, net, new_info, half=info.weights_dtype == "float16", locator=loc_arg,
                     locator_check=check, locator_check_rivals=new_info.locator_check_rivals if check else ())
    for name in ("state_main.pth", "state_locator.pth"):
        (opts.work / name).unlink(missing_ok=True)
    shutil.rmtree(opts.work / "cache", ignore_errors=True)
    result.installed, result.out, result.sha256 = True, opts.out, sha
    return result


def make_card(opts: FinetuneOptions, inputs: _Inputs, comparison: Comparison, locator_steps: int, locator_note: str,
              device: str, seconds: float, patch: tuple[int, ...]) -> dict[str, Any]:
    """The new model's card: base model, cases, steps, scores (base and new), provenance."""
    base = inputs.info.card
    data = inputs.dataset
    task = data.name or opts.data.resolve().name
    now = _dt.datetime.now(_dt.timezone.utc)
    limits = [str(x) for x in base.get("limits", [])] if isinstance(base.get("limits"), list) else []
    where = "its training cases (too few to hold any out)" if comparison.on_training_cases else \
        f"{len(inputs.val)} held-out case(s)"
    limits.append(f"fine-tuned on {len(inputs.train)} case(s) of {task}; its scores are on {where}")
    new = {r.case: r.dice for r in comparison.new}
    return {
        "name": opts.name or f"{base.get('name', opts.model.stem)} fine-tuned on {task}",
        "version": opts.version or f"{base.get('version', '0')}-ft.{now:%Y%m%d%H%M}",
        "trained": True,
        "base_model": {"name": str(base.get("name", "")), "version": str(base.get("version", "")),
                       "sha256": inputs.info.sha256, "file": opts.model.name},
        "data": {"root": str(opts.data.resolve()), "task": task, "num_cases": len(data.cases),
                 "train_cases": inputs.train, "val_cases": inputs.val,
                 "labels": {str(k): v for k, v in data.labels.items()}},
        "fine_tune": {"steps": opts.steps, "locator_steps": locator_steps, "locator": locator_note,
                      "batch_size": opts.batch_size, "patch_size": list(patch), "lr": opts.lr, "seed": opts.seed,
                      "optimizer": "adamw, cosine decay", "loss": "dice_ce",
                      "batch_norm": "statistics kept from the base model", "device": device,
                      "minutes": round(seconds / 60, 2)},
        "validation": {"dice_per_case": new, "dice_mean": float(np.mean(list(new.values()))),
                       "on_training_cases": comparison.on_training_cases},
        "scores": comparison.to_dict(),
        "installed_although_worse": bool(comparison.worse and opts.force),
        "limits": limits,
        "date": now.isoformat(timespec="seconds"),
        "software": {"vnetseg": getattr(vnetseg, "__version__", "?"), "torch": torch.__version__,
                     "python": platform.python_version()},
    }


# ------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    d = FinetuneOptions(Path("m.pt"), Path("d"), Path("o.pt"))
    p = argparse.ArgumentParser(prog="python -m training.finetune",
                                description="Fine-tune a model file on corrected cases (an MSD folder, e.g. a Slicer export).")
    p.add_argument("--model", required=True, type=Path, help="base model file (.pt); it is only read")
    p.add_argument("--data", required=True, type=Path, help="MSD folder of corrected cases (dataset.json, imagesTr/, labelsTr/)")
    p.add_argument("--out", required=True, type=Path, help="the new model file (.pt)")
    p.add_argument("--work", type=Path, help="work folder for state, cache and log (default OUT_finetune next to OUT)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps of the main network (default {d.steps})")
    p.add_argument("--locator-steps", type=int, default=d.locator_steps,
                   help=f"training steps of the fast-mode locator (default {d.locator_steps}; 0 keeps the base's)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"patches per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate, cosine decay (default {d.lr:g})")
    p.add_argument("--patch", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="training patch in voxels (default: the model's window capped at 128 x 128 x 32)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the patches and the hold-out split (default {d.seed})")
    p.add_argument("--val-case", dest="val_cases", action="append", default=[], metavar="CASE",
                   help="score on this case and do not train on it (repeatable; default: a fifth of the cases "
                        "when there are at least 3, else the scores are on the training cases)")
    p.add_argument("--tolerance", type=float, default=d.tolerance,
                   help="how much lower the new mean Dice may be before the new model counts as worse (default 0)")
    p.add_argument("--force", action="store_true", help="write the new model even when it scores worse than the base")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--restart", action="store_true", help="discard a previous run in the work folder instead of resuming it")
    p.add_argument("--restart-if-changed", action="store_true",
                   help="resume a previous run in the work folder when its settings are these, else start afresh")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N or mps")
    p.add_argument("--eval-mode", default="auto", choices=["auto", "fast", "full"], help="inference mode for the scores")
    p.add_argument("--name", default="", help="name of the new model on its card (default: derived from the base)")
    p.add_argument("--version", default="", help="version on the new model's card (default: base version + -ft.DATE)")
    p.add_argument("--sha256", help="expected SHA-256 of the base model file")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help=f"steps between saved training states, for resume (default {d.checkpoint_every})")
    p.add_argument("--progress", default="text", choices=["text", "json", "none"],
                   help="text lines on stderr, json: one event per line on stdout (for the Slicer module), or none")
    return p


def _printer(mode: str) -> Emit:
    def emit(event: dict[str, Any]) -> None:
        if mode == "json":
            print(json.dumps(event), flush=True)
        elif mode == "text" and event.get("event") == "progress":
            step = event.get("step")
            if step is None or step == 1 or step % 10 == 0 or step == event.get("steps"):
                print(event.get("message", ""), file=sys.stderr, flush=True)
    return emit


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    emit = _printer(args.progress)
    try:
        opts = FinetuneOptions(
            model=args.model, data=args.data, out=args.out, work=args.work, steps=args.steps,
            locator_steps=args.locator_steps, batch_size=args.batch_size, lr=args.lr,
            patch_size=tuple(args.patch) if args.patch else None, seed=args.seed, val_cases=tuple(args.val_cases),
            tolerance=args.tolerance, force=args.force, overwrite=args.overwrite, restart=args.restart,
            restart_if_changed=args.restart_if_changed,
            device=args.device, eval_mode=args.eval_mode, name=args.name, version=args.version, sha256=args.sha256,
            checkpoint_every=args.checkpoint_every,
        )
        result = finetune(opts, emit)
    except (KeyboardInterrupt, FinetuneCancelled) as exc:
        message = str(exc) if isinstance(exc, FinetuneCancelled) else \
            "cancelled; run the same command again to resume from the last saved state"
        emit({"event": "cancelled", "message": message})
        print(f"finetune: {message}", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as exc:  # one line, never a traceback
        message = str(exc) or type(exc).__name__
        if not isinstance(exc, (FinetuneError, DatasetError, ModelFileError, ValueError, OSError, MemoryError)):
            message = f"unexpected {type(exc).__name__}: {message}"
        emit({"event": "error", "message": message})
        print(f"finetune: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    table = result.comparison.table()
    if result.installed:
        verdict = f"wrote {result.out} (SHA-256 {result.sha256})"
        if result.worse:
            verdict += ", although it scores worse than the base model (--force)"
    else:
        verdict = (f"NOT written: the new model scores worse than the base model on "
                   f"{'its training cases' if result.comparison.on_training_cases else 'the held-out cases'}; "
                   f"pass --force to write it anyway (the same command resumes from {opts.work} without training again)")
    emit({"event": "done", "installed": result.installed, "worse": result.worse, "path": str(result.out or ""),
          "sha256": result.sha256, "table": table, "message": verdict, "scores": result.comparison.to_dict(),
          "train_cases": result.train_cases, "val_cases": result.val_cases, "seconds": round(result.seconds, 1),
          "resumed_at": result.resumed_at})
    if args.progress != "json":
        print(table)
        print(verdict)
    return EXIT_OK if result.installed else EXIT_WORSE


if __name__ == "__main__":
    sys.exit(main())

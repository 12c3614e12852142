"""Command line: ``python -m training.train --data DIR --fold 0 --config spleen --out DIR``.

The same command runs on one CPU or GPU, and on several GPUs or machines under torchrun::

    torchrun --nproc_per_node 4 -m training.train --data Task09_Spleen --fold 0 --config spleen --out runs/spleen
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from vnetseg.checkpoint import ModelFileError

from .config import PRESET_NAMES, load_config
from .data import DatasetError
from .engine import TrainOptions, train


def _override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE (e.g. augment.elastic_prob=0), got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _fold(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fold expects a fold number or 'all', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train",
                                description="Train the V-Net on an MSD task folder (one fold).")
    p.add_argument("--data", required=True, type=Path, help="MSD task folder (dataset.json, imagesTr/, labelsTr/)")
    p.add_argument("--out", required=True, type=Path, help="run folder; the fold is written to OUT/fold_F")
    p.add_argument("--fold", type=_fold, default=0,
                   help="cross-validation fold to train (default 0), or 'all': every case, no held-out validation")
    p.add_argument("--config", default=None,
                   help=f"a preset ({', '.join(PRESET_NAMES)}) or a JSON file (full, or {{\"base\": preset, ...}}); "
                        f"default: the run's own config.json with --resume, else 'spleen'")
    p.add_argument("--set", dest="overrides", action="append", type=_override, default=[], metavar="KEY=VALUE",
                   help="override a config value, JSON-parsed, dotted for nested keys (repeatable), "
                        "e.g. --set epochs=100 --set augment.elastic_prob=0")
    p.add_argument("--splits", type=Path, help="folds JSON file (default OUT/splits.json; created when missing)")
    p.add_argument("--cache", type=Path, help="preprocessing cache folder (default OUT/cache)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/fold_F/checkpoint_last.pth")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (under torchrun: each rank's GPU)")
    p.add_argument("--max-epochs", type=int,
                   help="stop after this many epochs (the schedule still spans config epochs)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        own = args.out / f"fold_{args.fold}" / "config.json"
        spec = args.config or (own if args.resume and own.is_file() else "spleen")
        cfg = load_config(spec, dict(args.overrides))
        result = train(TrainOptions(
            data=args.data, out=args.out, fold=args.fold, config=cfg, splits=args.splits, cache=args.cache,
            resume=args.resume, device=args.device, max_epochs=args.max_epochs, quiet=args.quiet,
        ))
    except (DatasetError, ModelFileError, ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet and os.environ.get("RANK", "0") == "0":
        print(f"done: best mean validation Dice {result.best_dice:.4f} at epoch {result.best_epoch}; "
              f"model files in {result.fold_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

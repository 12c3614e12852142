"""Regenerate the shipped spleen model from scratch, with a fixed seed, on a CPU.

The one command (about 30-40 minutes on 2 CPU cores; the real CTs must be in ../shared/data/ct
or $VNETSEG_CT_DIR)::

    python scripts/make_spleen_model.py --out runs/spleen_model

What it does (each stage reuses what an earlier, interrupted run left in ``--out``):

1. ``pool``: training subjects from the two real patients (training/realct/build.py): views of
   the real images with affine + elastic deformation, contrast-phase changes, slice thickness,
   blur and noise, and synthetic CTs drawn from the TotalSegmentator label maps.
2. ``final``: the main V-Net (1.5 x 1.5 x 2.0 mm) and the fast-mode locator (4 mm) trained with
   training.engine on every subject.
3. ``bundle``: both networks in one float16 model file, scored on every real CT (fast and full
   mode) and on the pelvis part of example_ct, with the card; written to
   VNetSegmentation/vnetseg/weights/ with registry.json and MODEL_CARD.md.
4. ``lopo``: leave-one-patient-out: the main V-Net trained without P1 (its real image and every
   subject made from its label map), scored on P1's real CTs; then the same for P2. The numbers
   go into the card (run ``bundle`` again afterwards; ``all`` does the stages in the order
   pool, lopo, final, bundle).

Usage: ``python scripts/make_spleen_model.py --out DIR [--stage all|pool|lopo|final|bundle]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from training.realct.ship import COMMAND, write_outputs  # noqa: E402
from training.config import AugmentConfig, TrainConfig, train_preset  # noqa: E402
from training.engine import TrainOptions, train  # noqa: E402
from training.realct.build import pool_cases, write_pool, write_real_cases, write_task  # noqa: E402
from training.realct.evaluate import evaluate_scan  # noqa: E402
from training.realct.sources import load_scans  # noqa: E402
from vnetseg.checkpoint import ModelInfo, Preprocessing, load_model  # noqa: E402
from vnetseg.model import VNetConfig, preset  # noqa: E402

SEED = 20260
PER_KIND = 20  # subjects per patient and kind (real views / synthetic): 80 in all
# The light preset's shape with quarter widths and batch norm: batch norm makes every output voxel
# independent of the window it was computed in (eval mode), so fast mode's single window over the
# spleen's box and the full pass's sliding window give the same answer; quarter widths halve the
# CPU time of training and inference compared with the light preset's half widths.
MAIN_MODEL = preset("light", widths=(4, 8, 16, 32, 64), norm="batch")
LOCATOR_MODEL = VNetConfig(widths=(4, 8, 16, 32, 64), kernel_size=3, norm="batch")
MAIN_PRE = Preprocessing(target_spacing=(1.5, 1.5, 2.0), hu_window=(-57.0, 164.0), patch_size=(64, 64, 64))
LOCATOR_PRE = Preprocessing(target_spacing=(4.0, 4.0, 4.0), hu_window=(-57.0, 164.0), patch_size=(48, 48, 48))
TRAIN_AUG = AugmentConfig(affine_prob=0.25, rotate_deg=(5.0, 5.0, 10.0), scale=0.1, elastic_prob=0.0,
                          noise_prob=0.15, blur_prob=0.1)


def main_config(epochs: int, iters: int = 20) -> TrainConfig:
    """The 'spleen-light' preset sized for 2 CPU cores (subjects are augmented when they are made)."""
    base = train_preset("spleen-light").to_dict()
    base.update(epochs=epochs, iters_per_epoch=iters, batch_size=2, loss="dice_ce", lr=3e-3, warmup_iters=20,
                workers=0, val_every=epochs, folds=2, seed=SEED, fg_ratio=0.5)
    cfg = TrainConfig.from_dict(base)
    return TrainConfig(**{**cfg.__dict__, "model": MAIN_MODEL, "preprocessing": MAIN_PRE, "augment": TRAIN_AUG})


def locator_config(epochs: int, iters: int = 20) -> TrainConfig:
    cfg = main_config(epochs, iters)
    return TrainConfig(**{**cfg.__dict__, "model": LOCATOR_MODEL, "preprocessing": LOCATOR_PRE})


BUDGET = {"lopo": 6, "final": 10, "locator": 8}  # epochs of 20 steps x 2 patches


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def stage_pool(out: Path) -> None:
    log("building training subjects")
    write_pool(out, PER_KIND, SEED, log=lambda m: log("  " + m))


def _subjects(out: Path):
    from training.realct.build import Subject

    records = json.loads((out / "pool" / "subjects.json").read_text())
    return [Subject(r["name"], r["patient"], r["kind"], r["spleen_ml"], {}) for r in records]


def _train(out: Path, task: Path, run: str, cfg: TrainConfig) -> Path:
    fold_dir = out / "runs" / run / "fold_0"
    if (fold_dir / "model_last.pt").is_file():
        log(f"{run}: already trained ({fold_dir / 'model_last.pt'})")
        return fold_dir / "model_last.pt"
    log(f"{run}: training {cfg.epochs} x {cfg.iters_per_epoch} steps on {task.name}")
    t0 = time.perf_counter()
    opts = TrainOptions(data=task, out=out / "runs" / run, fold=0, config=cfg, splits=task / "splits.json",
                        cache=out / "cache", resume=(fold_dir / "checkpoint_last.pth").is_file(), device="cpu")
    result = train(opts)
    minutes = (time.perf_counter() - t0) / 60
    (fold_dir / "train_time.json").write_text(json.dumps({"minutes": round(minutes, 2)}))
    log(f"{run}: done in {minutes:.1f} min, validation Dice {result.last_dice}")
    return fold_dir / "model_last.pt"


def stage_lopo(out: Path) -> None:
    scans = load_scans()
    real = write_real_cases(out, scans)
    subjects = _subjects(out)
    results = {}
    for held, other in (("P1", "P2"), ("P2", "P1")):
        val = {n: p for n, p in real.items() if n.startswith(f"real_{held.lower()}")}
        task = write_task(out / "tasks" / f"lopo_without_{held}", pool_cases(out, subjects, (other,)), val,
                          f"subjects of {other} only; validation on {held}'s real CTs")
        model_path = _train(out, task, f"lopo_without_{held}", main_config(BUDGET["lopo"]))
        net, info = load_model(model_path)
        info = ModelInfo(info.config, Preprocessing(**{**info.preprocessing.__dict__, "patch_size": (96, 96, 96)}), info.labels)
        rows = []
        for scan in scans:
            if scan.patient == held:
                row = evaluate_scan(scan, net, info, mode="full")
                row.pop("_mask")
                rows.append(row)
                log(f"lopo held-out {held} {scan.name}: {row}")
        minutes = json.loads((model_path.parent / "train_time.json").read_text())["minutes"]
        results[held] = {"trained_on": other, "steps": BUDGET["lopo"] * 20, "train_minutes": minutes, "cases": rows}
    (out / "lopo.json").write_text(json.dumps(results, indent=1))


def stage_final(out: Path) -> None:
    scans = load_scans()
    real = write_real_cases(out, scans)
    subjects = _subjects(out)
    val = {n: p for n, p in real.items() if n == "real_p2_dicom"}
    task = write_task(out / "tasks" / "all", pool_cases(out, subjects, ("P1", "P2")), val,
                      "subjects of both patients; validation on P2's real CT (a training-set check)")
    _train(out, task, "final_main", main_config(BUDGET["final"]))
    _train(out, task, "final_locator", locator_config(BUDGET["locator"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "spleen_model", help="run folder (git-ignored)")
    parser.add_argument("--stage", default="all", choices=("all", "pool", "lopo", "final", "bundle"))
    parser.add_argument("--weights-dir", type=Path, default=REPO / "VNetSegmentation" / "vnetseg" / "weights",
                        help="where the model file, registry.json and MODEL_CARD.md are written")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    stages = ("pool", "lopo", "final", "bundle") if args.stage == "all" else (args.stage,)
    for stage in stages:
        if stage == "pool":
            stage_pool(args.out)
        elif stage == "lopo":
            stage_lopo(args.out)
        elif stage == "final":
            stage_final(args.out)
        else:
            log("bundling the model file")
            write_outputs(args.out, args.weights_dir, SEED, budget=BUDGET, per_kind=PER_KIND, log=log)
    log(f"done ({COMMAND})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

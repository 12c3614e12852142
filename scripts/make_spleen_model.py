"""Regenerate the shipped spleen model from scratch, with a fixed seed, on a CPU.

The one command (the real CTs must be in ../shared/data/ct or $VNETSEG_CT_DIR; it runs one stage
after the other, each training run with one CPU thread)::

    python scripts/make_spleen_model.py --out runs/spleen_model

One thread makes every run deterministic (each training subject and each patch is a pure function
of the seed): two runs from scratch of this recipe's v1 gave bit-identical subjects and weights.
Measured times for v2.0.0 on this project's 2-core machine are in the model card
(``training.train_minutes_wall`` and each held-out record's ``train_minutes``, measured with
two runs side by side): the pool takes a few minutes, the final networks' seven runs about 95
minutes and each of the five leave-one-patient-out pairs, with the same seven stages, 57-77
minutes, so about seven hours one after the other and about three and a half with two runs side
by side, one process per core, which is how v2.0.0 was made (``--stage pool --scan S`` per scan,
``--stage final`` beside ``--stage lopo --held P``, then ``--stage bundle``).

What it does (each stage reuses what an earlier, interrupted run left in ``--out``):

1. ``pool``: training subjects from the five real patients (training/realct/build.py): views of
   the real images with affine + elastic deformation (on the spleen, anywhere, or wholly away from
   it: chest with the heart, lower abdomen, pelvis, the patient's right), contrast-phase changes and
   synthetic CTs drawn from P1 and P2's TotalSegmentator label maps, slice thickness, blur and noise;
   each subject also gets an organ map (pool/organsTr) for the multi-organ locator experiment.
2. ``final``: the main V-Net (1.5 x 1.5 x 2.0 mm, three stages) and the locator (4 mm), trained with
   training.engine on every subject.
3. ``bundle``: both networks in one float16 model file, scored on every real CT (fast and full
   mode) and on every CT's spleen-free parts, with the card; written to VNetSegmentation/vnetseg/weights/
   with registry.json and MODEL_CARD.md.
4. ``lopo``: leave-one-patient-out: both networks trained without one patient (its real image and
   every subject made from it), scored in both modes on its real CTs and spleen-free parts; for each
   of P1-P5. The numbers go into the card (``all`` runs pool, lopo, final, bundle in that order).
5. ``trials`` (not part of ``all``, not shipped): a fourth stage with shift consistency
   (TrainConfig.shift_consistency), in the variants of ``TRIALS``, each from the main network's third
   stage; the table in training/README.md ("Shift consistency") came from ``trials.json`` of the
   v1 recipe (two patients).
6. ``card`` (not part of ``all``): the shipped file written again with the same networks and its card's
   held-out records made again from the committed pairs in ``training/realct/heldout/`` (scored as
   ``lopo`` scores a pair it has trained; each record in ``OUT/lopo_P.json``), for ``--held P`` or all
   five, and its own results on every real CT, part and range end scored again with today's inference. v2.3.1 is v2.3.0 with this: its P1 and P5 records had come from pairs of an earlier state of
   the recipe. About 5 minutes.
7. ``--organ-locator`` with ``lopo`` or ``final`` (not shipped): the locator trained multi-organ on
   the organ maps with partial labels; held-out records in ``lopo_P_organ.json`` (README: "A
   multi-organ locator: measured, not shipped").

8. ``locator_seed`` (not part of ``all``, not shipped): one more locator, both of its stages, with seed
   ``SEED + --seed-offset``, without ``--held P`` (or ``--without P,Q``: two patients left out, for
   bagging, where offset 0 is allowed) or on all five patients; written as a float16 file to
   ``training/realct/locator_members/`` with ``members.json`` (README: "Several locators"). Run several
   side by side, but let one write the manifest at a time (run the stage again once training is done:
   it only saves). 14-22 minutes each on one core. ``--thin`` (seed offset 0 allowed): the thin-CT
   locator instead, every patch a 24-96 mm slab (``THIN_LOCATOR_AUG``), listed as "thin" or "thin:P"
   (README: "A locator for thin CTs"); 19-20 minutes. ``--thin --thin-neg``: its variant with fewer
   patches on the spleen (``THIN_NEG_FG_RATIO``), listed as "thin-neg" or "thin-neg:P".

9. ``check`` (not part of ``all``; v2.4.0): the shipped file written again with the same networks and the
   multi-organ locator trained on all five ("organ", from ``--stage locator_seed --organ-locator
   --seed-offset 0``) as its locator check (``training/realct/ship.py: CHECK_RIVALS``), its held-out records
   made again from the committed pairs each with the check trained without its patient ("organ:P"), and its
   own results scored with it. About 7 minutes.

Usage: ``python scripts/make_spleen_model.py --out DIR [--stage all|pool|lopo|final|bundle|trials|card|locator_seed|check]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from training import distributed as dd
from training.config import AugmentConfig, TrainConfig, train_preset
from training.data import UNKNOWN_LABEL
from training.engine import Trainer, TrainOptions
from training.realct.build import (
    ORGAN_CLASSES,
    TRAIN_SCANS,
    pool_cases,
    read_pool_records,
    write_pool,
    write_real_cases,
    write_task,
)
from training.realct.ship import COMMAND, INFERENCE_PATCH, write_outputs
from training.realct.sources import PATIENTS, load_scans
from vnetseg.checkpoint import Preprocessing, load_model
from vnetseg.model import VNetConfig, preset

SEED = 20260
# subjects per patient and kind: P1 and P2 (organ label maps) give 16 real views and 16 synthetic CTs
# each, P3-P5 (spleen-only references) 24 real views each: 136 in all
PER_KIND = 16
# The light preset's shape with quarter widths and batch norm: in eval mode batch norm uses fixed
# statistics, so a voxel's output depends only on the image around it (not on statistics of the
# whole window, as with instance norm); it still depends on how much anatomy the window shows
# around it, which is why fast mode segments at least one trained window around the organ. Quarter
# widths halve the CPU time of training and inference compared with the light preset's half widths.
MAIN_MODEL = preset("light", widths=(4, 8, 16, 32, 64), norm="batch")
LOCATOR_MODEL = VNetConfig(widths=(4, 8, 16, 32, 64), kernel_size=3, norm="batch")
# ``--organ-locator`` (an experiment, not the shipped recipe): the locator learns spleen, liver, kidney,
# stomach, bowel and muscle (ORGAN_CLASSES), so that the TotalSegmentator maps of P1 and P2 tell it what
# the spleen is not; only its spleen channel is read. Measured in the README ("A multi-organ locator").
ORGAN_LOCATOR_MODEL = VNetConfig(widths=(4, 8, 16, 32, 64), kernel_size=3, norm="batch",
                                 out_channels=len(ORGAN_CLASSES))
MAIN_PRE = Preprocessing(target_spacing=(1.5, 1.5, 2.0), hu_window=(-57.0, 164.0), patch_size=(64, 64, 64))
# the locator decides whether a spleen is in view and which part is the spleen, for both modes: it is
# trained on 256 x 256 x 192 mm patches (half the abdomen's width, the heart above the spleen, the
# kidney below it) and run over the whole CT as one window
LOCATOR_PRE = Preprocessing(target_spacing=(4.0, 4.0, 4.0), hu_window=(-57.0, 164.0), patch_size=(64, 64, 48))
# second stage: flat patches with 192 mm of in-plane context, so the network sees the spine, the
# stomach and the ribs around the organ and can tell the spleen (patient's left) from the liver
CONTEXT_PRE = Preprocessing(target_spacing=(1.5, 1.5, 2.0), hu_window=(-57.0, 164.0), patch_size=(128, 128, 32))
TRAIN_AUG = AugmentConfig(
    affine_prob=0.25, rotate_deg=(5.0, 5.0, 10.0), scale=0.1, elastic_prob=0.0, noise_prob=0.15, blur_prob=0.1
)
# The locator decides whether a spleen is in view: a third of its patches end at an axial plane (a CT's
# scan range ends anywhere), half of those with the spleen cut away and the range ending 0-40 mm from it.
# v2.0.0's locator, trained without it, learnt where P1's range ends (inside the spleen): a lower
# abdomen ending under the spleen got its left kidney called spleen there. (Planes drawn uniformly
# left the spleen cut by the range's end far more often than wholly removed, and made that worse.)
LOCATOR_AUG = replace(TRAIN_AUG, fov_end_prob=0.3)
# ``--stage locator_seed --thin`` (an experiment): a locator for thin CTs only, every patch cut to an axial
# slab of 6-24 slices (24-96 mm), 30 % of the slabs on a spleen patch placed just beside the organ
# (holding none of it), so that it learns both "a few slices through the spleen" and "a few slices of
# the kidney or heart". The recipe's locator, trained on whole 192 mm patches, misses thin CTs (README
# "How often the whole-CT view misses a spleen"); mixing slabs into its own patches cost it elsewhere.
THIN_LOCATOR_AUG = replace(LOCATOR_AUG, slab_prob=1.0, slab_slices=(6, 24), slab_away=0.3)
# ``--thin-neg`` (with ``--thin``; an experiment): the same thin-CT locator with half the share of patches
# drawn on the spleen (0.2 instead of the locator's 0.4), so that four in five of its slabs lie anywhere in
# the subjects (most of them spleen-free: pelvis, lower abdomen, chest). Held out, the thin locator called
# two 40 mm slabs of P4's pelvis spleen; this asks whether more spleen-free slabs take that away without
# losing the thin spleens it finds. Listed as "thin-neg" or "thin-neg:P".
THIN_NEG_FG_RATIO = 0.2


def main_config(epochs: int, iters: int = 20) -> TrainConfig:
    """The 'spleen-light' preset sized for 2 CPU cores (subjects are augmented when they are made)."""
    base = train_preset("spleen-light").to_dict()
    base.update(
        epochs=epochs,
        iters_per_epoch=iters,
        batch_size=2,
        loss="dice_ce",
        lr=3e-3,
        warmup_iters=20,
        workers=0,
        val_every=epochs,  # once, at the end: the real CTs are big and every minute counts on a CPU
        folds=2,
        seed=SEED,
        fg_ratio=0.5,
    )
    cfg = TrainConfig.from_dict(base)
    return TrainConfig(**{**cfg.__dict__, "model": MAIN_MODEL, "preprocessing": MAIN_PRE, "augment": TRAIN_AUG})


def context_config(epochs: int, iters: int = 20) -> TrainConfig:
    """Stage two of the main network: started from stage one's weights, flat wide patches, lower rate."""
    cfg = main_config(epochs, iters)
    return TrainConfig(**{**cfg.__dict__, "preprocessing": CONTEXT_PRE, "lr": 1.5e-3})


def polish_config(epochs: int, iters: int = 20) -> TrainConfig:
    """Stage three: the same wide patches, a third of them on the spleen (more liver and bowel negatives), low rate."""
    cfg = context_config(epochs, iters)
    return TrainConfig(**{**cfg.__dict__, "lr": 5e-4, "fg_ratio": 0.33, "warmup_iters": 0})


class Trial(NamedTuple):
    """A stage-four variant of the ``trials`` stage, trained from stage three's weights."""

    name: str
    weight: float  # shift-consistency weight; 0 with no offset is the control (more steps, nothing else)
    shift: tuple[int, int, int]  # largest offset between the two consistency windows
    window: tuple[int, int, int]  # training patch
    epochs: int  # of 20 steps
    fg_offset: float = 0.0  # > 0: the spleen voxel a patch is cut around lands anywhere in the patch


TRIALS = (
    Trial("control", 0.0, (0, 0, 0), (128, 128, 32), 10),
    Trial("w20_s32", 20.0, (32, 32, 8), (128, 128, 32), 10),
    Trial("w100_s64", 100.0, (64, 64, 8), (128, 128, 32), 15),
    Trial("w100_s64_z16", 100.0, (64, 64, 16), (128, 128, 32), 15),
    Trial("w100_s96", 100.0, (96, 96, 8), (128, 128, 32), 15),
    Trial("w50_win160", 50.0, (48, 48, 8), (160, 160, 32), 10),
    Trial("w100_s64_long", 100.0, (64, 64, 8), (128, 128, 32), 30),
    Trial("w300_s64", 300.0, (64, 64, 8), (128, 128, 32), 15),
    Trial("offset1", 0.0, (0, 0, 0), (128, 128, 32), 15, 1.0),
    Trial("offset1_w100_s64", 100.0, (64, 64, 8), (128, 128, 32), 15, 1.0),
    Trial("offset1_long", 0.0, (0, 0, 0), (128, 128, 32), 30, 1.0),
    Trial("offset1_win160", 0.0, (0, 0, 0), (160, 160, 32), 20, 1.0),
)
# the baseline row of trials.json: the shipped recipe's last stage itself, scored the same way
STAGE3 = Trial("stage3", 0.0, (0, 0, 0), (0, 0, 0), 0)


def trial_config(trial: Trial) -> TrainConfig:
    """A fourth stage from stage three's weights: patches half on the spleen, low rate, optional shift consistency."""
    cfg = context_config(trial.epochs)
    pre = Preprocessing(**{**cfg.preprocessing.__dict__, "patch_size": trial.window})
    return TrainConfig(
        **{**cfg.__dict__, "preprocessing": pre, "lr": 5e-4, "warmup_iters": 0, "fg_ratio": 0.5,
           "shift_consistency": trial.weight, "consistency_shift": trial.shift, "fg_offset": trial.fg_offset}
    )


def refine_config(epochs: int, iters: int = 20) -> TrainConfig:
    """Stage four of the main network (the final model only): the wide patches again, half on the spleen,
    placed anywhere in the patch (fg_offset 1: the organ is also seen cut by the window's border)."""
    cfg = context_config(epochs, iters)
    return TrainConfig(**{**cfg.__dict__, "lr": 1e-3, "fg_ratio": 0.5, "warmup_iters": 0, "fg_offset": 1.0})


def locator_refine_config(epochs: int, iters: int = 20, organ: bool = False) -> TrainConfig:
    """The locator's second stage: more steps from its first stage's weights, lower rate."""
    cfg = locator_config(epochs, iters, organ)
    return TrainConfig(**{**cfg.__dict__, "lr": 1e-3, "warmup_iters": 0})


def locator_config(epochs: int, iters: int = 20, organ: bool = False) -> TrainConfig:
    """The locator: 4 mm, large patches, 40 % of them on the spleen (most of the others hold the heart, liver, bowel).

    ``organ``: the multi-organ experiment. It learns ORGAN_CLASSES from the organ maps
    (``pool/organsTr``): every class where a TotalSegmentator map names it, and only "not spleen"
    (UNKNOWN_LABEL) elsewhere in the CTs whose reference is the spleen alone; the partial-label loss does
    not push those voxels to any class.
    """
    cfg = main_config(epochs, iters)
    cfg = TrainConfig(**{**cfg.__dict__, "model": LOCATOR_MODEL, "preprocessing": LOCATOR_PRE, "fg_ratio": 0.4,
                         "augment": LOCATOR_AUG})
    if not organ:
        return cfg
    return TrainConfig(**{**cfg.__dict__, "model": ORGAN_LOCATOR_MODEL, "partial_label": UNKNOWN_LABEL,
                          "fg_classes": (1,)})


# epochs of 20 steps x 2 patches: main stage one (64^3) for the final model and for each
# leave-one-patient-out model, stage two (128 x 128 x 32) for both, stage three, and the locator
# The final networks get a fourth main stage and a second locator stage ("refine", "locator_refine"):
# measured on the training CTs, the three-stage networks trained on five patients still called parts of
# the liver and heart spleen. The held-out pairs get every stage as well, so that they measure the
# recipe that made the shipped file (their main stage one is shorter: "lopo" epochs).
# "settle" is a fifth main stage at a lower rate: after the fourth, the native CTs (P1, P4) were still
# segmented too small (Dice 0.84-0.89 on the training CTs).
BUDGET = {"lopo": 30, "final": 50, "context": 20, "polish": 10, "locator": 40, "refine": 15, "locator_refine": 50,
          "settle": 20, "big": 15, "big_locator": 20}
# ``--stage big`` (an experiment): enlarged-spleen subjects per training scan (training/realct/enlarge.py)
BIG_PER_SCAN = 8


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def stage_pool(out: Path, only: str | None = None) -> None:
    log("building training subjects")
    names = TRAIN_SCANS if only is None else (only,)
    write_pool(out, PER_KIND, SEED, scans=load_scans(names=names), log=lambda m: log("  " + m))


def _subjects(out: Path):
    from training.realct.build import Subject

    return [Subject(r["name"], r["patient"], r["kind"], r["spleen_ml"], {}) for r in read_pool_records(out)]


def _train(out: Path, task: Path, run: str, cfg: TrainConfig, init: Path | None = None) -> Path:
    """Train one run with training.engine (resuming an interrupted one), optionally from ``init``'s weights."""
    fold_dir = out / "runs" / run / "fold_0"
    if (fold_dir / "model_last.pt").is_file():
        log(f"{run}: already trained ({fold_dir / 'model_last.pt'})")
        return fold_dir / "model_last.pt"
    log(f"{run}: training {cfg.epochs} x {cfg.iters_per_epoch} steps on {task.name}")
    t0 = time.perf_counter()
    opts = TrainOptions(
        data=task,
        out=out / "runs" / run,
        fold=0,
        config=cfg,
        splits=task / "splits.json",
        cache=out / "cache",
        resume=(fold_dir / "checkpoint_last.pth").is_file(),
        device="cpu",
    )
    dist = dd.setup(opts.device)
    try:
        trainer = Trainer(opts, dist)
        if init is not None and not opts.resume:
            trainer.model.load_state_dict(load_model(init)[0].state_dict())
            log(f"{run}: starting from {init}")
        result = trainer.run()
    finally:
        dd.teardown(dist)
    minutes = (time.perf_counter() - t0) / 60
    (fold_dir / "train_time.json").write_text(json.dumps({"minutes": round(minutes, 2)}))
    log(f"{run}: done in {minutes:.1f} min, validation Dice {result.last_dice}")
    return fold_dir / "model_last.pt"


def _train_networks(
    out: Path, task: Path, prefix: str, first_epochs: int, organ_task: Path | None = None
) -> tuple[Path, Path, list[Path]]:
    """Every stage of the main network and of the locator on ``task``; returns (main, locator, every run).

    With ``organ_task`` (the same subjects with their organ maps: ``--organ-locator``) the locator
    is the multi-organ one, trained on it.

    The runs, in order: main stages one to five, then the locator's two stages.
    """
    first = _train(out, task, prefix, main_config(first_epochs))
    second = _train(out, task, f"{prefix}_context", context_config(BUDGET["context"]), init=first)
    third = _train(out, task, f"{prefix}_polish", polish_config(BUDGET["polish"]), init=second)
    fourth = _train(out, task, f"{prefix}_refine", refine_config(BUDGET["refine"]), init=third)
    settle = TrainConfig(**{**refine_config(BUDGET["settle"]).__dict__, "lr": 5e-4})
    main = _train(out, task, f"{prefix}_settle", settle, init=fourth)
    organ = organ_task is not None
    loc_task = organ_task if organ else task
    loc_prefix = prefix.replace("_main", "") + ("_organ" if organ else "")
    locator = _train(out, loc_task, f"{loc_prefix}_locator", locator_config(BUDGET["locator"], organ=organ))
    locator2 = _train(out, loc_task, f"{loc_prefix}_locator_refine",
                      locator_refine_config(BUDGET["locator_refine"], organ=organ), init=locator)
    return main, locator2, [first, second, third, fourth, main, locator, locator2]


def _organ_task(out: Path, name: str, subjects, patients: tuple[str, ...], val: dict, what: str) -> Path:
    """The task folder of the multi-organ locator: the same subjects, labelled with their organ maps."""
    return write_task(out / "tasks" / f"{name}_organs", pool_cases(out, subjects, patients, "organsTr"), val, what,
                      ORGAN_CLASSES)


def stage_lopo(out: Path, only: str | None = None, organ: bool = False) -> None:
    """Per held-out patient: both networks trained on the other four patients, scored on its CTs in both modes."""
    from training.realct.ship import score_all

    scans = load_scans()
    real = write_real_cases(out, scans)
    subjects = _subjects(out)
    for held in PATIENTS:
        if only not in (None, held):
            continue
        others = tuple(p for p in PATIENTS if p != held)
        val = {n: p for n, p in real.items() if n.startswith(f"real_{held.lower()}")}
        what = f"subjects of {', '.join(others)}; validation on {held}'s real CTs"
        task = write_task(out / "tasks" / f"lopo_without_{held}", pool_cases(out, subjects, others), val, what)
        organ_task = _organ_task(out, f"lopo_without_{held}", subjects, others, val, what) if organ else None
        # every stage of the final networks: the held-out pairs measure the recipe that made the shipped file
        main, locator, runs = _train_networks(out, task, f"lopo_without_{held}", BUDGET["lopo"], organ_task)
        net, info = _bundle_in_memory(main, locator)
        scores = score_all(net, info, log=lambda m: log("  " + m), patients=(held,))
        minutes = sum(json.loads((p.parent / "train_time.json").read_text())["minutes"] for p in runs)
        first, second, third, fourth, fifth, loc, loc2 = (_steps(p) for p in runs)  # as trained (--budget may change them)
        result = {
            "trained_on": list(others),
            "steps": f"{first} (64^3) + {second} + {third} + {fourth} + {fifth} (128x128x32); locator {loc} + {loc2}",
            "train_minutes": round(minutes, 1),
            **scores,
        }
        # the multi-organ experiment keeps its own record: the card's is the shipped recipe's
        (out / f"lopo_{held}{'_organ' if organ else ''}.json").write_text(json.dumps(result, indent=1))
        if not organ:
            _save_held_out(out / f"heldout_{held}.pt", net, info, held, result)
        log(f"lopo {held} done: {[(c['scan'], c['mode'], c['dice']) for c in scores['cases']]}")


def _save_held_out(path: Path, net, info, held: str, result: dict) -> None:
    """The held-out pair as one model file, as the shipped file holds its networks (float16), so that
    its record can be run again without retraining (``Testing/test_heldout.py`` runs the committed
    ones, ``training/realct/heldout/``, on their patient's CTs). Evidence only: not a model to use."""
    from vnetseg.checkpoint import save_model

    info.card = {
        "name": f"spleen_ct_light_without_{held}",
        "role": "held-out evidence: trained without this patient; not for use (the shipped model is better)",
        "held_out": held,
        "trained_on": result["trained_on"],
        "steps": result["steps"],
        "train_minutes": result["train_minutes"],
        "cases": result["cases"],
        "command": f"python scripts/make_spleen_model.py --out runs/spleen_model --stage lopo --held {held}",
    }
    sha = save_model(path, net, info, half=True, locator=info.locator)
    log(f"held-out pair for {held}: {path} (sha256 {sha})")


def _steps(model_path: Path) -> int:
    """Training steps of the run that wrote ``model_path`` (from its config.json)."""
    cfg = json.loads((model_path.parent / "config.json").read_text())
    return int(cfg["epochs"]) * int(cfg["iters_per_epoch"])


def _bundle_in_memory(main: Path, locator: Path):
    """The two networks as the shipped file would hold them (float16 weights, inference window), not written."""
    from training.realct.ship import bundle_in_memory

    return bundle_in_memory(main, locator)


def stage_final(out: Path, organ: bool = False) -> None:
    scans = load_scans()
    real = write_real_cases(out, scans)
    subjects = _subjects(out)
    val = {n: p for n, p in real.items() if n == "real_p2_dicom"}
    what = "subjects of all five patients; validation on P2's real CT (a training-set check)"
    task = write_task(out / "tasks" / "all", pool_cases(out, subjects, PATIENTS), val, what)
    organ_task = _organ_task(out, "all", subjects, PATIENTS, val, what) if organ else None
    _train_networks(out, task, "final_main", BUDGET["final"], organ_task)


def locator_seed_configs(offset: int, thin: bool = False, neg: bool = False,
                         organ: bool = False) -> tuple[TrainConfig, TrainConfig]:
    """The recipe's two locator stages with seed ``SEED + offset`` and nothing else changed (``thin``:
    every patch a thin slab, ``THIN_LOCATOR_AUG``; ``neg``, with ``thin``: ``THIN_NEG_FG_RATIO`` of the
    patches on the spleen instead of 0.4; ``organ``: the multi-organ locator of ``locator_config``)."""
    if neg and not thin:
        raise ValueError("neg is a variant of the thin-CT locator: pass thin=True with it")
    if organ and thin:
        raise ValueError("the multi-organ locator is trained on the recipe's patches: not with thin")
    extra = {"seed": SEED + offset, **({"augment": THIN_LOCATOR_AUG} if thin else {}),
             **({"fg_ratio": THIN_NEG_FG_RATIO} if neg else {})}
    return (TrainConfig(**{**locator_config(BUDGET["locator"], organ=organ).__dict__, **extra}),
            TrainConfig(**{**locator_refine_config(BUDGET["locator_refine"], organ=organ).__dict__, **extra}))


def stage_locator_seed(out: Path, without: tuple[str, ...], offset: int, thin: bool = False,
                       neg: bool = False, organ: bool = False) -> Path:
    """One more locator (both of its stages) trained as the recipe trains it, with seed ``SEED + offset``.

    ``without``: the patients left out; () for all five (as ``final``), one (as ``lopo``), or two (a
    leave-two-out locator, for bagging: the mean of locators trained on different patients, measured
    held out with the locators that leave out both the held-out patient and one more). An experiment,
    not part of ``all`` (README: "Several locators"). ``thin``: the thin-CT locator (``THIN_LOCATOR_AUG``),
    listed as "thin" or "thin:P" (README: "A locator for thin CTs"); ``neg`` with it: the variant with fewer
    patches on the spleen (``THIN_NEG_FG_RATIO``), "thin-neg" or "thin-neg:P". Returns the second stage's
    model file. ``organ`` (``--organ-locator``): the multi-organ locator with today's locator recipe,
    listed as "organ" or "organ:P" (README: "A multi-organ locator").
    """
    if neg and not thin:
        raise SystemExit("--thin-neg is a variant of the thin-CT locator: pass --thin with it")
    if organ and thin:
        raise SystemExit("--organ-locator and --thin: one experiment at a time")
    if len(without) > 2 or len(set(without)) != len(without) or not set(without) <= set(PATIENTS):
        raise SystemExit(f"--held/--without: at most two different patients of {', '.join(PATIENTS)}, got {without}")
    if offset < (0 if len(without) == 2 or thin or organ else 1):
        raise SystemExit("--seed-offset must be 1 or more (0 is the recipe's own locator) unless two patients are left out")
    scans = load_scans()
    real = write_real_cases(out, scans)
    subjects = _subjects(out)
    others = tuple(p for p in PATIENTS if p not in without)
    if not without:
        val = {n: p for n, p in real.items() if n == "real_p2_dicom"}
        what = "subjects of all five patients; validation on P2's real CT (a training-set check)"
        prefix = "final"
        task = (_organ_task(out, "all", subjects, PATIENTS, val, what) if organ
                else write_task(out / "tasks" / "all", pool_cases(out, subjects, PATIENTS), val, what))
    else:
        val = {n: p for n, p in real.items() if any(n.startswith(f"real_{w.lower()}") for w in without)}
        what = f"subjects of {', '.join(others)}; validation on {' and '.join(without)}'s real CTs"
        prefix = f"lopo_without_{'_'.join(without)}"
        task = (_organ_task(out, prefix, subjects, others, val, what) if organ
                else write_task(out / "tasks" / prefix, pool_cases(out, subjects, others), val, what))
    first_cfg, refine_cfg = locator_seed_configs(offset, thin, neg, organ)
    kind = ("thinneg" if neg else "thin") if thin else ("organ" if organ else "seed")
    first = _train(out, task, f"{prefix}_locator_{kind}{offset}", first_cfg)
    second = _train(out, task, f"{prefix}_locator_refine_{kind}{offset}", refine_cfg, init=first)
    _save_member(second, without, offset, [first, second], thin, neg, organ)
    return second


def _save_member(model_path: Path, without: tuple[str, ...], offset: int, runs: list[Path], thin: bool = False,
                 neg: bool = False, organ: bool = False) -> None:
    """The trained locator as its own float16 model file in ``MEMBERS_DIR``, listed in ``members.json``
    under "final" (all five), "P" (without P) or "P+Q" (without both), with its digest, seed and what it
    was trained on, so that the experiment can be measured again without retraining
    (``bench/bench_locator_members.py``). Evidence only: not part of the shipped model."""
    from training.realct.members import MEMBERS_DIR
    from training.realct.ship import INFERENCE_PATCH, _with_patch
    from vnetseg.checkpoint import save_model

    key = "+".join(without) or "final"
    kind = ("thin-neg" if neg else "thin") if thin else "organ"
    if thin or organ:
        key = kind + (f":{key}" if without else "")
    net, info = load_model(model_path)
    info = _with_patch(info, INFERENCE_PATCH)
    trained_on = [p for p in PATIENTS if p not in without]
    minutes = sum(json.loads((p.parent / "train_time.json").read_text())["minutes"] for p in runs)
    command = "python scripts/make_spleen_model.py --out runs/spleen_model --stage locator_seed "
    command += (f"--without {','.join(without)} " if without else "") + f"--seed-offset {offset}" + (" --thin" if thin else "") + (" --thin-neg" if neg else "") + (" --organ-locator" if organ else "")
    info.card = {
        "name": f"locator_{kind.replace('-', '') if thin or organ else 'seed'}{offset}_{key}",
        "role": ("locator for thin CTs (experiment): not a model to use" if thin
                 else "multi-organ locator (experiment): not a model to use" if organ
                 else "locator member (seed and bagging experiment): not a model to use"),
        "seed": SEED + offset,
        "trained_on": trained_on,
        "steps": " + ".join(str(_steps(p)) for p in runs),
        "train_minutes": round(minutes, 1),
        "command": command,
    }
    MEMBERS_DIR.mkdir(parents=True, exist_ok=True)
    name = f"locator_seed{offset}_{key.replace('+', '_')}.pt"
    if thin or organ:
        name = f"locator_{kind.replace('-', '')}{offset}" + (f"_{'_'.join(without)}" if without else "") + ".pt"
    sha = save_model(MEMBERS_DIR / name, net, info, half=True)
    manifest_path = MEMBERS_DIR / "members.json"  # one writer at a time: save members one after the other
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest.setdefault(key, {})[str(offset)] = {"file": name, "sha256": sha, "seed": SEED + offset, "thin": thin,
                                                 **({"organ": True} if organ else {}),
                                                 **({"fg_ratio": THIN_NEG_FG_RATIO} if neg else {}),
                                                 "trained_on": trained_on, "train_minutes": round(minutes, 1)}
    manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")
    log(f"locator member {key} seed {SEED + offset}: {MEMBERS_DIR / name} (sha256 {sha})")


def stage_trials(out: Path, only: str | None = None) -> None:
    """Train and score the stage-four variants of TRIALS (after ``final``); results in OUT/trials.json."""
    from training.realct.ship import _with_patch, fp16_roundtrip, score_all

    stage3 = out / "runs" / "final_main_polish" / "fold_0" / "model_last.pt"
    locator = out / "runs" / "final_locator" / "fold_0" / "model_last.pt"
    if not (stage3.is_file() and locator.is_file()):
        raise SystemExit(f"run --stage final into {out} first: trials start from {stage3} and use {locator}")
    loc_net, loc_info = load_model(locator)
    loc_net, loc_info = fp16_roundtrip(loc_net), _with_patch(loc_info, INFERENCE_PATCH)
    results_path = out / "trials.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for trial in (STAGE3, *TRIALS):
        name = trial.name
        if only not in (None, name) or name in results:
            continue
        if trial is STAGE3:
            model_path = stage3
        else:
            model_path = _train(out, out / "tasks" / "all", f"trial_{name}", trial_config(trial), init=stage3)
        net, info = load_model(model_path)
        info = _with_patch(info, INFERENCE_PATCH)
        info.locator = (loc_net, loc_info)
        scores = score_all(fp16_roundtrip(net), info, log=lambda m: log("  " + m))
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}  # trials may run in parallel
        results[name] = {"weight": trial.weight, "shift": list(trial.shift), "window": list(trial.window),
                         "steps": trial.epochs * 20, "fg_offset": trial.fg_offset, **scores}
        results_path.write_text(json.dumps(results, indent=1))
        log(f"trial {name}: fast vs full {[a['dice_fast_vs_full'] for a in scores['fast_vs_full']]}")


def stage_card(out: Path, weights_dir: Path, only: str | None = None) -> None:
    """The shipped file's card with its held-out records made again from the committed pairs (same weights)."""
    from training.realct.ship import VERSION, held_out_record, rescore_shipped, rewrite_card

    records = {}
    for held in PATIENTS:
        if only not in (None, held):
            continue
        log(f"held-out record of {held} from training/realct/heldout/heldout_{held}.pt")
        records[held] = held_out_record(held, log=lambda m: log("  " + m))
        (out / f"lopo_{held}.json").write_text(json.dumps(records[held], indent=1))
    log("the shipped networks on every real CT, part and range end")
    shipped = rescore_shipped(weights_dir, log=lambda m: log("  " + m))
    rewrite_card(weights_dir, records, VERSION,
                 f"the held-out records of {', '.join(records)} made again from the committed pairs "
                 "(training/realct/heldout/, the recipe's lopo stage), and the shipped model's own results "
                 "with today's inference (its warnings); the same networks",
                 out=out, log=log, shipped=shipped)


def stage_check(out: Path, weights_dir: Path, version: str) -> None:
    """The shipped file with a locator check (the multi-organ locator trained on all five, "organ" in
    ``members.json``; ``CHECK_MIN`` and ``CHECK_RIVALS``), its held-out records made again from the committed pairs each with
    the check trained without its patient, and its own results scored with it; the same networks
    otherwise. Not part of ``all``: the check networks come from ``--stage locator_seed --organ-locator``."""
    from training.realct.members import load_members, organ_key
    from training.realct.ship import (
        CHECK_MIN,
        CHECK_RIVALS,
        INFERENCE_PATCH,
        _with_patch,
        held_out_record,
        rescore_shipped,
        rewrite_card,
    )

    found = load_members(organ_key(None))
    if not found:
        raise SystemExit("--stage check: no multi-organ locator trained on all five is listed ('organ'): train it with "
                         "--stage locator_seed --organ-locator --seed-offset 0")
    c_net, c_info = found[0]
    card = {**c_info.card, "role": "locator check",
            "description": ("multi-organ locator (spleen, liver, kidney, stomach, bowel, muscle; partial labels) at 4 mm, "
                            "trained on all five patients with the locator's recipe; a part the locator finds is the spleen "
                            f"only where this network's mean {' and '.join(CHECK_RIVALS).lower()} probability over it is "
                            "not larger than its mean spleen probability")}
    check = (c_net.eval(), _with_patch(c_info, INFERENCE_PATCH, card), CHECK_MIN)
    records = {}
    for held in PATIENTS:
        log(f"held-out record of {held} with its locator check (organ:{held})")
        records[held] = held_out_record(held, log=lambda m: log("  " + m), check=True)
        (out / f"lopo_{held}_check.json").write_text(json.dumps(records[held], indent=1))
    log("the shipped networks with the locator check on every real CT, part and range end")
    shipped = rescore_shipped(weights_dir, log=lambda m: log("  " + m), check=check)
    rewrite_card(weights_dir, records, version,
                 "a locator check: the multi-organ locator trained on all five (today's locator recipe) must not give a "
                 "located part a larger mean kidney than spleen probability; the held-out records made again "
                 "from the committed pairs, each with the check trained without its patient; the same networks",
                 out=out, log=log, shipped=shipped, check=check)


def _network_file(path: Path, net, info) -> Path:
    """One network of a bundle written alone (its weights as loaded), to start a training run from."""
    from vnetseg.checkpoint import ModelInfo, save_model

    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(path, net, ModelInfo(info.config, info.preprocessing, info.labels, {}))
    return path


def stage_big(out: Path, held: str | None, with_locator: bool = False) -> Path:
    """Enlarged spleens (an experiment): the main network of a model file trained on, from its weights,
    with the pool's subjects and ``BIG_PER_SCAN`` enlarged-spleen subjects per scan (``BUDGET["big"]``
    epochs at the last stage's rate), its locator kept (``with_locator``: the locator trained on the same
    way too, ``BUDGET["big_locator"]`` epochs: held out on P1 that added a 110 mL false spleen to P1's lower
    abdomen). Without ``held``: the shipped file on all five; with it: the committed held-out pair of
    ``held`` on the other four. Scored as the ``lopo`` stage scores a pair (for ``held`` on its CTs), with
    the locator check trained without the same patient; the bundle (its card: the record and the scored
    cases) is written to ``OUT/big[loc]_<final|P>.pt`` and the record to ``OUT/big[loc]_<final|P>.json``."""
    from training.realct.enlarge import big_name, read_big_records, write_big_pool
    from training.realct.members import attach_check
    from training.realct.ship import CHECK_MIN, CHECK_RIVALS, HELD_OUT_DIR, MODEL_FILE, score_all
    from vnetseg.checkpoint import file_sha256, save_model

    key = held or "final"
    tag = "bigloc" if with_locator else "big"
    patients = tuple(p for p in PATIENTS if p != held)
    write_big_pool(out, BIG_PER_SCAN, SEED, load_scans(names=TRAIN_SCANS), log=lambda m: log("  " + m))
    big = [r for r in read_big_records(out) if r["patient"] in patients]
    pool = out / "pool"
    train = {**pool_cases(out, _subjects(out), patients),
             **{r["name"]: (pool / "imagesTr" / f"{r['name']}.nii.gz", pool / "labelsTr" / f"{r['name']}.nii.gz")
                for r in big}}
    real = write_real_cases(out, load_scans())
    val = {n: p for n, p in real.items() if n.startswith(f"real_{held.lower()}")} if held else \
        {n: p for n, p in real.items() if n == "real_p2_dicom"}
    what = f"subjects of {', '.join(patients)} and {len(big)} with an enlarged spleen; validation on {list(val)}"
    task = write_task(out / "tasks" / f"big_{key}", train, val, what)
    if held:
        entry = json.loads((HELD_OUT_DIR / "heldout.json").read_text())[held]
        base, base_sha = HELD_OUT_DIR / entry["file"], entry["sha256"]
    else:
        base = REPO / "VNetSegmentation" / "vnetseg" / "weights" / MODEL_FILE
        base_sha = None
    net, info = load_model(base, sha256=base_sha)
    init_main = _network_file(out / "big_init" / f"{key}_main.pt", net, info)
    init_loc = _network_file(out / "big_init" / f"{key}_locator.pt", *info.locator)
    main_cfg = TrainConfig(**{**refine_config(BUDGET["big"]).__dict__, "lr": 3e-4})
    loc_cfg = TrainConfig(**{**locator_refine_config(BUDGET["big_locator"]).__dict__, "lr": 5e-4})
    main = _train(out, task, f"big_{key}_main", main_cfg, init=init_main)
    runs = [main]
    if with_locator:
        runs.append(_train(out, task, f"big_{key}_locator", loc_cfg, init=init_loc))
        net, info = _bundle_in_memory(main, runs[1])
    else:
        net, info = _bundle_in_memory(main, init_loc)  # the base file's locator, as it was
    if not attach_check(info, held, CHECK_MIN, CHECK_RIVALS):
        raise SystemExit(f"no multi-organ locator {'organ:' + held if held else 'organ'} is listed in members.json")
    scores = score_all(net, info, log=lambda m: log("  " + m), patients=(held,) if held else None)
    more = sum(json.loads((p.parent / "train_time.json").read_text())["minutes"] for p in runs)
    then = f"then {_steps(main)} main steps (128x128x32) with enlarged spleens" + (
        f" and {_steps(runs[1])} locator steps" if with_locator else "")
    result = {"base": str(base.relative_to(REPO)), "base_sha256": file_sha256(base), "trained_on": list(patients),
              "big_subjects": [r["name"] for r in big],
              "steps": f"{entry['steps']}; {then}" if held else then,
              "train_minutes": round(more + (entry["train_minutes"] if held else 0.0), 1), **scores}
    (out / f"{tag}_{key}.json").write_text(json.dumps(result, indent=1))
    bundle = out / f"{tag}_{key}.pt"
    info.card = {**result, "role": "model trained on from " + result["base"] + " with enlarged spleens"}
    c_net, c_info = info.locator_check
    save_model(bundle, net, info, half=True, locator=info.locator, locator_check=(c_net, c_info, info.locator_check_min),
               locator_check_rivals=info.locator_check_rivals)
    log(f"wrote {bundle} and its record {out / f'{tag}_{key}.json'} ({big_name(patients[0], 0)}... {len(big)} enlarged subjects)")
    return bundle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "spleen_model", help="run folder (git-ignored)")
    parser.add_argument("--stage", default="all",
                        choices=("all", "pool", "lopo", "final", "bundle", "trials", "card", "locator_seed", "check",
                                 "big", "ship_big"))
    parser.add_argument("--trial", help="trials stage: only this variant of TRIALS (to run several in parallel)")
    parser.add_argument(
        "--held", choices=PATIENTS, help="lopo stage: only this held-out patient (to run several in parallel)"
    )
    parser.add_argument("--scan", choices=TRAIN_SCANS, help="pool stage: only this scan's subjects (in parallel)")
    parser.add_argument("--without", help="locator_seed stage: one or two patients to leave out (e.g. P1,P3)")
    parser.add_argument("--thin", action="store_true",
                        help="locator_seed stage: the thin-CT locator (every patch a 24-96 mm slab; an experiment)")
    parser.add_argument("--thin-neg", action="store_true",
                        help=f"with --thin: the variant with {THIN_NEG_FG_RATIO} of its patches on the spleen instead "
                        "of 0.4 (more spleen-free slabs; listed as 'thin-neg' or 'thin-neg:P')")
    parser.add_argument("--seed-offset", type=int, default=1,
                        help="locator_seed stage: train the locator with seed SEED + this (1 or more); with --held P "
                        "without patient P, otherwise on all five")
    parser.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="KEY=EPOCHS",
        help=f"override an entry of BUDGET {BUDGET} for this run (the held-out record states the steps trained)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: reproducible, and on a shared 2-core machine one thread "
        "trains several times faster than two)",
    )
    parser.add_argument(
        "--weights-dir",
        type=Path,
        default=REPO / "VNetSegmentation" / "vnetseg" / "weights",
        help="where the model file, registry.json and MODEL_CARD.md are written",
    )
    parser.add_argument(
        "--organ-locator",
        action="store_true",
        help="lopo and final stages: train and score the multi-organ locator (an experiment; its held-out "
        "records go to lopo_P_organ.json, and the bundle keeps the shipped recipe's locator); locator_seed: the "
        "multi-organ locator alone, listed as 'organ' or 'organ:P'",
    )
    parser.add_argument("--big-locator", action="store_true",
                        help="big stage: train the locator on with enlarged spleens too (measured: worse held out)")
    args = parser.parse_args(argv)
    if args.organ_locator and args.stage not in ("lopo", "final", "locator_seed"):
        parser.error("--organ-locator is for --stage lopo, final or locator_seed (the bundle ships the spleen-only locator)")
    for item in args.budget:
        key, _, value = item.partition("=")
        if key not in BUDGET or not value.isdigit():
            parser.error(f"--budget {item!r}: expected KEY=EPOCHS with KEY one of {sorted(BUDGET)}")
        BUDGET[key] = int(value)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    stages = ("pool", "lopo", "final", "bundle") if args.stage == "all" else (args.stage,)
    for stage in stages:
        if stage == "pool":
            stage_pool(args.out, args.scan)
        elif stage == "lopo":
            stage_lopo(args.out, args.held, args.organ_locator)
        elif stage == "final":
            stage_final(args.out, args.organ_locator)
        elif stage == "trials":
            stage_trials(args.out, args.trial)
        elif stage == "card":
            stage_card(args.out, args.weights_dir, args.held)
        elif stage == "check":
            from training.realct.ship import VERSION

            stage_check(args.out, args.weights_dir, VERSION)
        elif stage == "big":
            stage_big(args.out, args.held, args.big_locator)
        elif stage == "ship_big":
            from training.realct.ship import VERSION, ship_enlarged

            ship_enlarged(args.out, args.weights_dir, VERSION, log=log)
        elif stage == "locator_seed":
            without = tuple(p for p in (args.without or "").split(",") if p) or ((args.held,) if args.held else ())
            stage_locator_seed(args.out, without, args.seed_offset, args.thin, args.thin_neg, args.organ_locator)
        else:
            log("bundling the model file")
            write_outputs(args.out, args.weights_dir, SEED, budget=BUDGET, per_kind=PER_KIND, log=log)
    log(f"done ({COMMAND})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How often does the whole-CT view miss a spleen, or find one that is not there, on short CTs?

A CT from another hospital may be a chest CT that ends in the upper abdomen, an abdominal CT that
starts under the diaphragm, or a short series through the organ. This script cuts each real CT
into axial slabs (``--thickness`` mm, one starting every ``--every-mm`` mm, each with its true
affine; the reference cut with it), runs the model in fast mode on each, and counts, per slab
thickness band:

* **found**: slabs holding at least ``--min-ref-ml`` of reference spleen whose result has Dice over
  0.5 with it; **away**: of those, results with 10 mL or more more than 10 mm from the reference;
* **false**: spleen-free slabs (no reference voxel) whose result is ``--false-ml`` or more.

Each slab is run once with the whole-CT view's smallest located part lowered to ``FLOOR_ML``, and
the located part's volume is kept, so the answer under every rule in ``--rules`` (the smallest
located part, mL) is read from the same run: a rule m answers "no spleen" where the located part
is under m mL, and otherwise exactly what the run gave (the located part decides nothing else).
The first rule is the shipped one (``vnetseg.fast.MIN_LOCATED_ML``), the baseline of the table.

Models: ``held`` (each committed leave-one-patient-out pair in ``training/realct/heldout/`` on its
own patient's CTs: a CT the model has never seen; the honest view) and ``shipped`` (the shipped
file on every patient, all of them trained on). Fast mode on CPU, one torch thread, about 10
minutes per model kind here. ``--members`` puts each model's locator members (the seed experiment,
``training.realct.members``) beside its locator. Usage::

    python bench/bench_view_slabs.py [--models held,shipped] [--patients P1,P3] [--members] [--name view_slabs]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

sys.path.insert(0, str(benchlib.REPO))
from training.realct.evaluate import mask_metrics
from training.realct.members import THIN_VARIANTS, attach, attach_bag, attach_check, attach_thin
from training.realct.sources import PATIENTS, Scan, _crop_slices, load_scans
from vnetseg import io as vio
from vnetseg.checkpoint import ModelInfo, load_model
from vnetseg.fast import MIN_LOCATED_ML
from vnetseg.inference import InferenceOptions, predict_volume
from vnetseg.model import VNet
from vnetseg.registry import default_model

HELD_DIR = benchlib.REPO / "training" / "realct" / "heldout"
FLOOR_ML = 0.5  # every located part at least this big is kept, so that any rule above it can be read off
AWAY_MM = 10.0
BANDS = ((0, 64, "40-64 mm"), (65, 128, "96-128 mm"), (129, 10_000, "160-256 mm"))


def slabs(scan: Scan, thickness_mm: float, every_mm: float) -> Iterator[tuple[float, vio.Image, np.ndarray]]:
    """(start above the lowest slice in mm, CT slab with its true affine, reference on the slab) along
    the scan's head-foot index axis; nothing when the scan is not longer than the slab."""
    affine = scan.image.affine
    axis = int(np.argmax(np.abs(affine[2, :3])))
    step = abs(float(affine[2, axis]))
    n = scan.image.shape[axis]
    k = round(thickness_mm / step)
    if k >= n:
        return
    foot_first = affine[2, axis] > 0  # index 0 is the lowest slice
    for lo in range(0, n - k + 1, max(1, round(every_mm / step))):
        index = [slice(None)] * 3
        index[axis] = slice(lo, lo + k)
        start = lo if foot_first else n - (lo + k)
        yield start * step, _crop_slices(scan, lo, lo + k), np.ascontiguousarray(scan.spleen[tuple(index)])


def run_slab(image: vio.Image, reference: np.ndarray, net: VNet, info: ModelInfo) -> dict[str, Any]:
    """Fast mode with the floor rule; the located part's volume (0 when none) and the scores."""
    t0 = time.perf_counter()
    pred = predict_volume(image, net, info, InferenceOptions(device="cpu", mode="fast", min_located_ml=FLOOR_ML))
    assert pred.located_ml is not None, "the model file has no whole-CT view"
    mask = pred.labelmap > 0
    scores = mask_metrics(mask, reference, image)
    far = mask
    if mask.any() and reference.any():
        far = mask & (ndimage.distance_transform_edt(~reference, sampling=image.spacing) > AWAY_MM)
    return {
        "located_ml": round(pred.located_ml, 2),
        "found": bool(pred.report.found),
        "volume_ml": scores["volume_ml"],
        "reference_ml": scores["reference_ml"],
        "dice": scores["dice"],
        "away_ml": round(float(far.sum()) * image.voxel_volume_ml, 1),
        # how sure the network was about the mask it returned (None when it returned none)
        "mean_probability": None if pred.confidence is None else round(pred.confidence.mean_probability, 3),
        "uncertain_share": None if pred.confidence is None else round(pred.confidence.uncertain_share, 3),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def under_rule(row: dict[str, Any], rule_ml: float) -> dict[str, Any]:
    """The row's answer had the smallest located part been ``rule_ml`` (>= FLOOR_ML)."""
    if row["found"] and row["located_ml"] >= rule_ml:
        return row
    return {**row, "found": False, "volume_ml": 0.0, "dice": 0.0 if row["reference_ml"] > 0 else 1.0, "away_ml": 0.0}


def band_of(thickness_mm: float) -> str:
    return next(name for lo, hi, name in BANDS if lo <= thickness_mm <= hi)


def summarize(rows: list[dict[str, Any]], rules: list[float], min_ref_ml: float, false_ml: float) -> list[dict[str, Any]]:
    """One line per model kind, band and rule: found / with spleen, away, false / spleen-free."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for _, _, band in BANDS:
            sel = [r for r in rows if r["model"] == model and band_of(r["thickness_mm"]) == band]
            spleen = [r for r in sel if r["reference_ml"] >= min_ref_ml]
            free = [r for r in sel if r["reference_ml"] == 0]
            if not sel:
                continue
            for rule in rules:
                got = [under_rule(r, rule) for r in spleen]
                bad = [under_rule(r, rule) for r in free]
                out.append({
                    "model": model, "band": band, "rule_ml": rule,
                    "found": sum(g["found"] and g["dice"] > 0.5 for g in got), "with_spleen": len(spleen),
                    "away": sum(g["away_ml"] >= 10.0 for g in got),
                    "false": sum(b["volume_ml"] >= false_ml for b in bad), "spleen_free": len(free),
                    "false_ml": sorted((b["volume_ml"] for b in bad if b["volume_ml"] >= false_ml), reverse=True),
                })
    return out


def add_check_arguments(ap: argparse.ArgumentParser) -> None:
    """``--check P`` and ``--check-rivals CLASSES``: the multi-organ locator trained on each model's patients
    ('organ', 'organ:P') as its locator check (``members.attach_check``); shared with bench_locator_members."""
    ap.add_argument("--check", type=float, default=0.0, metavar="P",
                    help="give each model the multi-organ locator trained on its patients ('organ', 'organ:P') as its "
                    "locator check: a located part needs its mean spleen probability P or more")
    ap.add_argument("--check-rivals", default="", metavar="CLASSES",
                    help="with --check: the check's classes (comma-separated, e.g. Kidney) that must not have a larger "
                    "mean over a located part than the spleen (--check 0 with rivals: that rule alone)")


def check_rivals(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(r for r in args.check_rivals.split(",") if r)


def models(kinds: list[str], patients: list[str], members: bool = False, bag: bool = False, thin_mm: float = 0.0,
           thin_variant: str = "thin", check: float = 0.0, rivals: tuple[str, ...] = ()) -> Iterator[tuple[str, str | None, VNet, ModelInfo]]:
    """(kind, the only patient it runs on or None for all, network, info). ``members``: each model's
    locator members (``training.realct.members``: the shipped model's "final", a held-out pair's its
    patient's) are put beside its locator; a model without any listed is refused. ``thin_mm``: each model
    gets the thin-CT locator trained on the same patients, used on slabs of at most that many mm (``thin_variant``: "thin" or "thin-neg", ``members.thin_key``). ``check``: each model gets the
    multi-organ locator trained on the same patients as its locator check, with that smallest mean probability."""
    for kind in kinds:
        if kind == "shipped":
            entry = default_model()
            net, info = load_model(entry.path, sha256=entry.sha256)
            if members and not (attach_bag(info, "final") if bag else attach(info, "final")):
                raise SystemExit("--members: no locator member is listed for the shipped model ('final')")
            if thin_mm and not attach_thin(info, None, thin_mm, thin_variant):
                raise SystemExit(f"--thin: no thin-CT locator is listed for the shipped model ({thin_variant!r})")
            if (check or rivals) and not attach_check(info, None, check, rivals):
                raise SystemExit("--check: no multi-organ locator is listed for the shipped model ('organ')")
            yield kind, None, net, info
        elif kind == "held":
            manifest = json.loads((HELD_DIR / "heldout.json").read_text())
            for patient in patients:
                if patient in manifest:
                    net, info = load_model(HELD_DIR / manifest[patient]["file"], sha256=manifest[patient]["sha256"])
                    if members and not (attach_bag(info, patient) if bag else attach(info, patient)):
                        raise SystemExit(f"--members: no locator member is listed for {patient}'s held-out pair")
                    if thin_mm and not attach_thin(info, patient, thin_mm, thin_variant):
                        print(f"--thin: no thin-CT locator is listed without {patient}: skipped", flush=True)
                        continue
                    if (check or rivals) and not attach_check(info, patient, check, rivals):
                        print(f"--check: no multi-organ locator is listed without {patient}: skipped", flush=True)
                        continue
                    yield kind, patient, net, info
        else:
            raise SystemExit(f"unknown model kind {kind!r}: use held or shipped")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="held", help="comma list: held, shipped")
    ap.add_argument("--patients", default="P1,P3,P4,P5", help=f"comma list of {', '.join(PATIENTS)}")
    ap.add_argument("--thickness", default="40,64,96,128,160,192,256", help="slab thicknesses, mm")
    ap.add_argument("--every-mm", type=float, default=30.0)
    ap.add_argument("--rules", default=f"{MIN_LOCATED_ML:g},8,5,3", help="smallest located part, mL (first: the baseline)")
    ap.add_argument("--min-ref-ml", type=float, default=20.0)
    ap.add_argument("--false-ml", type=float, default=5.0)
    ap.add_argument("--members", action="store_true",
                    help="put each model's locator members (training/realct/locator_members) beside its locator")
    ap.add_argument("--bag", action="store_true",
                    help="with --members, bagging: beside the shipped locator the five held-out pairs' locators, beside "
                    "a pair's the leave-two-out members that also leave out its patient")
    ap.add_argument("--thin", type=float, default=0.0, metavar="MM",
                    help="give each model the thin-CT locator trained on its patients (training/realct/locator_members, "
                    "'thin' and 'thin:P'), used on slabs of at most MM mm head to foot")
    ap.add_argument("--thin-variant", default="thin", choices=THIN_VARIANTS,
                    help="with --thin: which thin-CT locator ('thin-neg': the variant with fewer patches on the spleen)")
    add_check_arguments(ap)
    ap.add_argument("--name", default="view_slabs")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    rivals = check_rivals(args)
    torch.set_num_threads(1)
    rules = [float(v) for v in args.rules.split(",")]
    if min(rules) < FLOOR_ML:
        raise SystemExit(f"--rules: each rule must be at least {FLOOR_ML} mL (the run's floor)")
    patients = [p for p in args.patients.split(",") if p]
    thickness = [float(v) for v in args.thickness.split(",")]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    scans = [s for s in load_scans() if s.patient in patients]
    rows: list[dict[str, Any]] = []
    print(f"{'model':8s} {'scan':9s} {'mm':>4s} {'start':>6s} {'ref mL':>6s} {'located':>7s} {'mL':>6s} {'Dice':>6s} {'away':>5s}",
          flush=True)
    for kind, only, net, info in models(args.models.split(","), patients, args.members, args.bag, args.thin,
                                       args.thin_variant, args.check, rivals):
        for scan in scans:
            if only is not None and scan.patient != only:
                continue
            for t in thickness:
                for start, image, reference in slabs(scan, t, args.every_mm):
                    row = {"model": kind, "scan": scan.name, "patient": scan.patient, "thickness_mm": t,
                           "start_mm": round(start, 1), **run_slab(image, reference, net, info)}
                    rows.append(row)
                    print(f"{kind:8s} {scan.name:9s} {t:4.0f} {start:6.0f} {row['reference_ml']:6.1f} "
                          f"{row['located_ml']:7.1f} {row['volume_ml']:6.1f} {row['dice']:6.3f} {row['away_ml']:5.1f}",
                          flush=True)
    summary = summarize(rows, rules, args.min_ref_ml, args.false_ml)
    print(f"\nfound: Dice > 0.5 on slabs with >= {args.min_ref_ml:g} mL of spleen; away: of those, >= 10 mL more than "
          f"{AWAY_MM:g} mm from it; false: spleen-free slabs given >= {args.false_ml:g} mL")
    print(f"{'model':8s} {'band':11s} {'rule mL':>7s} {'found':>7s} {'away':>4s} {'false':>7s}  false mL")
    for s in summary:
        print(f"{s['model']:8s} {s['band']:11s} {s['rule_ml']:7g} {s['found']:3d}/{s['with_spleen']:<3d} {s['away']:4d} "
              f"{s['false']:3d}/{s['spleen_free']:<3d}  {s['false_ml']}")
    settings = {"thickness_mm": thickness, "every_mm": args.every_mm, "rules_ml": rules, "floor_ml": FLOOR_ML,
                "min_ref_ml": args.min_ref_ml, "false_ml": args.false_ml, "away_mm": AWAY_MM, "mode": "fast",
                "torch_threads": 1, "patients": patients, "locator_members": args.members, "bag": args.bag,
                "thin_locator_max_mm": args.thin, **({"thin_variant": args.thin_variant} if args.thin else {}),
                "locator_check_min": args.check, "locator_check_rivals": list(rivals)}
    body = {"model_sha256": default_model().sha256 if "shipped" in args.models else "", "rows": rows, "summary": summary}
    benchlib.write_result(args.name, "view_slabs", started, settings, body, args.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

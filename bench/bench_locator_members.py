"""Does a whole-CT view made of several locators hold better than one? (the seed experiment)

Each model is run with its own locator ("one") and with its locator members beside it ("members":
``training.realct.members``, locators trained by ``scripts/make_spleen_model.py --stage locator_seed``
on the same subjects with other seeds; the view is the mean of their spleen probabilities), on:

* each real CT of its patients, fast and full mode: Dice against the reference, and the mL more than
  10 mm from it ("away");
* every spleen-free crop of them, fast mode (the whole-CT view decides for both modes): the chest or
  lower abdomen 20 mm beyond the spleen, the same with the range ending 10-80 mm beyond it, and the
  pelvis-only crops; the right answer is "no spleen" (under 5 mL).

Models: ``held`` (each committed leave-one-patient-out pair on its own patient, with the members
trained without that patient) and ``shipped`` (the shipped file on every CT, with the members trained on
all five). Both views run in the same process, one after the other per case; one torch thread (``--threads``). Thin
slabs: ``bench/bench_view_slabs.py --members``. Usage::

    python bench/bench_locator_members.py [--models held,shipped] [--patients P1,P3] [--bag] [--name locator_members]
    python bench/bench_locator_members.py --models shipped --bag --timing-only --threads 2 --timing-runs 5

``--timing-only`` skips the cases and times fast mode alone (one locator against the members, interleaved).
``--organ``: the member is the multi-organ locator trained on the same patients ("organ", "organ:P";
``--stage locator_seed --organ-locator``) and the view is the voxel-wise maximum of the two spleen
probabilities (``ModelInfo.locator_rule`` "max"), not their mean. ``--check P``: the same multi-organ
locator as the locator check instead (``ModelInfo.locator_check``: a located part needs its mean spleen
probability P or more), the "members" view being the model with its check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
from bench_view_slabs import add_check_arguments, check_rivals

sys.path.insert(0, str(benchlib.REPO))
from training.realct.evaluate import mask_metrics
from training.realct.members import attach, attach_bag, attach_check, bag_keys, manifest, organ_key
from training.realct.sources import load_scans, pelvis_parts, range_end_parts, spleen_free_parts
from vnetseg.checkpoint import load_model
from vnetseg.inference import InferenceOptions, predict_volume
from vnetseg.registry import default_model

HELD_DIR = benchlib.REPO / "training" / "realct" / "heldout"
AWAY_MM = 10.0
FREE_ML = 5.0


def run_case(image, reference, net, info, mode: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    pred = predict_volume(image, net, info, InferenceOptions(device="cpu", mode=mode))
    row: dict[str, Any] = {"mode": mode, "found": bool(pred.report.found), "located_ml": round(pred.located_ml or 0.0, 1),
                           "volume_ml": round(pred.volume_ml, 1)}
    if reference is not None:
        mask = pred.labelmap > 0
        row["dice"] = mask_metrics(mask, reference, image)["dice"]
        far = mask & (ndimage.distance_transform_edt(~reference, sampling=image.spacing) > AWAY_MM) if mask.any() else mask
        row["away_ml"] = round(float(far.sum()) * image.voxel_volume_ml, 1)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def time_fast_mode(runs: int, bag: bool = False, organ: bool = False, check: float = 0.0,
                   rivals: tuple[str, ...] = ()) -> dict[str, Any]:
    """End-to-end fast mode (in process, the model already loaded) on the benchmark CT, without and with the
    shipped model's members, interleaved; medians. The members cost one locator pass each."""
    from make_ct import make_benchmark_ct

    from vnetseg import io as vio

    image = vio.read_image(make_benchmark_ct((512, 512, 120), (0.8, 0.8, 2.5)))
    entry = default_model()
    net, info = load_model(entry.path, sha256=entry.sha256)
    times: dict[str, list[float]] = {"one": [], "with_members": []}
    for _ in range(runs):
        for view, seconds in times.items():
            info.locator_members, info.locator_rule, info.locator_check = [], "mean", None
            if view == "with_members":
                if check or rivals:
                    attach_check(info, None, check, rivals)
                elif organ:
                    attach(info, "organ")
                    info.locator_rule = "max"
                else:
                    attach_bag(info, "final") if bag else attach(info, "final")
            t0 = time.perf_counter()
            predict_volume(image, net, info, InferenceOptions(device="cpu", mode="fast"))
            seconds.append(time.perf_counter() - t0)
    return {"ct": "benchmark CT 512 x 512 x 120, 0.8 x 0.8 x 2.5 mm", "runs": runs, "members": len(info.locator_members),
            "one_median_s": round(float(np.median(times["one"])), 2),
            "with_members_median_s": round(float(np.median(times["with_members"])), 2), "seconds": times}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="held,shipped")
    ap.add_argument("--patients", default="P1,P2,P3,P4,P5", help="held: the held-out pairs to run")
    ap.add_argument("--bag", action="store_true",
                    help="bagging instead of the seed members: beside the shipped locator the five held-out pairs' "
                    "locators; beside each pair's locator the leave-two-out members that also leave out its patient")
    ap.add_argument("--organ", action="store_true",
                    help="the multi-organ locator trained on the same patients ('organ', 'organ:P') beside each locator, "
                    "combined by the voxel-wise maximum (locator_rule 'max')")
    add_check_arguments(ap)  # the multi-organ locator as the locator check instead of a member
    ap.add_argument("--timing-runs", type=int, default=3,
                    help="fast mode on the benchmark CT with one locator and with the shipped model's members, "
                    "this many interleaved runs each (0: none)")
    ap.add_argument("--timing-only", action="store_true", help="only the fast-mode timing on the benchmark CT")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (issue 12's 5 s limit is for the 2-core machine: 2)")
    ap.add_argument("--name", default="locator_members")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    rivals = check_rivals(args)
    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    scans = [] if args.timing_only else load_scans()
    held = json.loads((HELD_DIR / "heldout.json").read_text())
    jobs = []  # (kind, key, scans, net, info)
    for kind in args.models.split(","):
        if kind == "shipped":
            entry = default_model()
            jobs.append((kind, "final", scans, *load_model(entry.path, sha256=entry.sha256)))
        elif kind == "held":
            for patient in sorted(p for p in held if p in args.patients.split(",")):
                own = [s for s in scans if s.patient == patient]
                jobs.append((kind, patient, own, *load_model(HELD_DIR / held[patient]["file"], sha256=held[patient]["sha256"])))
        else:
            raise SystemExit(f"unknown model kind {kind!r}: use held or shipped")
    rows: list[dict[str, Any]] = []
    print(f"{'model':7s} {'key':5s} {'scan':9s} {'part':13s} {'mode':4s} | {'one: mL':>8s} {'Dice':>6s} | {'members: mL':>11s} {'Dice':>6s}")
    for kind, key, own, net, info in jobs:
        keys: str | list[str] = (["held-out pairs' locators"] if kind == "shipped" else bag_keys(key)) if args.bag else key
        if args.organ or args.check or rivals:
            keys = organ_key(None if kind == "shipped" else key)
        if not keys or (isinstance(keys, str) and keys not in manifest()):
            print(f"{kind} {key}: no locator member listed, skipped")
            continue
        for scan in own:
            cases = [("whole", scan.image, scan.spleen, mode) for mode in ("fast", "full")]
            if scan.name != "p1_sm":  # p1_sm is a crop of p1_ct: its parts are p1_ct's
                crops = {**spleen_free_parts(scan), **range_end_parts(scan), **pelvis_parts(scan)}
                cases += [(part, image, None, "fast") for part, image in crops.items()]
            for part, image, reference, mode in cases:
                info.locator_members, info.locator_rule, info.locator_check = [], "mean", None
                one = run_case(image, reference, net, info, mode)
                if args.check or rivals:
                    n = int(attach_check(info, None if kind == "shipped" else key, args.check, rivals))
                else:
                    n = attach_bag(info, key) if args.bag else attach(info, keys)
                info.locator_rule = "max" if args.organ else "mean"
                both = run_case(image, reference, net, info, mode)
                info.locator_members, info.locator_rule, info.locator_check = [], "mean", None
                row = {"model": kind, "key": key, "scan": scan.name, "part": part, "members": n,
                       "member_keys": keys, "one": one, "with_members": both}
                rows.append(row)
                print(f"{kind:7s} {key:5s} {scan.name:9s} {part:13s} {mode:4s} | {one['volume_ml']:8.1f} "
                      f"{one.get('dice', float('nan')):6.3f} | {both['volume_ml']:11.1f} {both.get('dice', float('nan')):6.3f}",
                      flush=True)
    timing = time_fast_mode(args.timing_runs, args.bag, args.organ, args.check, rivals) if args.timing_runs else {}
    summary = []
    for kind in dict.fromkeys(r["model"] for r in rows):
        sel = [r for r in rows if r["model"] == kind]
        for view in ("one", "with_members"):
            whole = [r[view] for r in sel if r["part"] == "whole" and r[view]["mode"] == "fast"]
            free = [r[view] for r in sel if r["part"] != "whole"]
            summary.append({
                "model": kind, "view": view,
                "dice_fast": {r["scan"]: r[view]["dice"] for r in sel if r["part"] == "whole" and r[view]["mode"] == "fast"},
                "away_ml_max": max((w["away_ml"] for w in whole), default=0.0),
                "spleen_free_runs": len(free), "no_spleen": sum(f["volume_ml"] < FREE_ML for f in free),
                "spleen_free_ml_max": max((f["volume_ml"] for f in free), default=0.0),
                "fast_full_same": all(
                    np.isclose(r[view]["volume_ml"], q[view]["volume_ml"])
                    for r in sel for q in sel
                    if r["part"] == q["part"] == "whole" and r["scan"] == q["scan"] and r[view]["mode"] == "fast"
                    and q[view]["mode"] == "full"),
            })
    print()
    for s in summary:
        print(f"{s['model']:7s} {s['view']:12s} Dice (fast) {s['dice_fast']}  away max {s['away_ml_max']} mL  "
              f"spleen-free: {s['no_spleen']} of {s['spleen_free_runs']} 'no spleen', largest {s['spleen_free_ml_max']} mL  "
              f"fast = full: {s['fast_full_same']}")
    if timing:
        print(f"fast mode on the benchmark CT (median of {args.timing_runs}, interleaved): one locator "
              f"{timing['one_median_s']} s, with the final member(s) {timing['with_members_median_s']} s")
    settings = {"mode": "fast and full on the real CTs, fast on the crops", "torch_threads": args.threads, "away_mm": AWAY_MM,
                "free_ml": FREE_ML, "members": manifest(), "bag": args.bag,
                "organ": args.organ, "locator_rule": "max" if args.organ else "mean", "locator_check_min": args.check,
                "locator_check_rivals": list(rivals)}
    benchlib.write_result(args.name, "locator_members", started, settings,
                          {"model_sha256": default_model().sha256, "rows": rows, "summary": summary, "timing": timing},
                          args.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

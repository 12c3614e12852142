"""Bagging the whole-CT view: does the mean of locators trained on different patients decide better?

The whole-CT view (``vnetseg.fast.locate`` on the locator's spleen probability) decides, for both
modes, whether a spleen is in view and which part it is. Bagging replaces the one locator's
probability by the mean over several locators, each trained without one more patient, and takes a
part where that mean is over a threshold ``t`` (the one locator: over 0.5). This script measures the
decision itself, on the locator's 4 mm grid, for every threshold of ``--thresholds`` from one run of
each network per case:

* ``shipped``: the shipped locator beside the five held-out pairs' locators (each trained without one
  patient; ``training.realct.members.attach_bag``), on every real CT (all trained on);
* ``held``: each held-out pair's locator beside the four leave-two-out locators that also leave out
  its patient (``--stage locator_seed --without P,Q``), on its own patient's CTs only (never trained
  on): the honest view. A pair whose four are not all committed is skipped.

Cases: each real CT; its spleen-free crops, range ends and pelvis crop; and axial slabs of it
(``bench_view_slabs.slabs``: ``--thickness`` mm, one every 30 mm). A case with at least
``--min-ref-ml`` of reference spleen is **found** when the located part is at least ``--rule-ml`` and
at least half of it lies on the reference (resampled to the 4 mm grid); a spleen-free case is
**false** when a part of ``--rule-ml`` or more is located. The main network, which segments the
located part at 1.5 mm, is not run: ``bench_locator_members.py --bag`` runs both modes end to end.
One torch thread.

``--organ``: instead of the bag, the multi-organ locator trained on the same patients (``--stage
locator_seed --organ-locator``: "organ" beside the shipped locator, "organ:P" beside P's held-out pair)
goes beside the model's own locator, and two more views are read off: ``organ`` (its spleen channel
alone) and ``max`` (the larger of the two spleen probabilities, voxel by voxel); each part that the
model's own locator finds gets the multi-organ locator's mean probability of every class over it
(``organ_means``: what it takes that part for). Usage::

    python bench/bench_bagging.py [--models shipped,held] [--patients P1,P4] [--thresholds 0.5,0.4,0.35,0.3,0.25] [--organ] [--name bagging]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
from bench_view_slabs import slabs

sys.path.insert(0, str(benchlib.REPO))
from training.realct.members import HELD_DIR, attach, attach_bag, bag_keys, manifest
from training.realct.sources import load_scans, pelvis_parts, range_end_parts, spleen_free_parts
from vnetseg import io as vio
from vnetseg.checkpoint import ModelInfo, load_model
from vnetseg.fast import MIN_LOCATED_ML, BodyView, locate
from vnetseg.inference import InferenceOptions, _organ_channel, _run_network
from vnetseg.preprocess import make_grid_map, to_model_grid
from vnetseg.registry import default_model

FLOOR_ML = 0.5  # every part located at this size or more is kept, so that the rule is applied afterwards
BANDS = ((0, 64, "slabs 40-64 mm"), (65, 128, "slabs 96-128 mm"), (129, 10_000, "slabs 160-256 mm"))


def locator_maps(image: vio.Image, info: ModelInfo, channels: dict[str, np.ndarray] | None = None,
                 ) -> tuple[Any, BodyView, list[np.ndarray]]:
    """The coarse grid, the CT's anatomy on it, and each locator's spleen probability (own locator first).
    ``channels``: filled with every class probability of the last multi-organ locator ("background" too)."""
    assert info.locator is not None
    locators = [info.locator, *info.locator_members]
    coarse = make_grid_map(image.shape, image.affine, info.locator[1].preprocessing.target_spacing)
    hu = to_model_grid(image.array, coarse)
    anatomy = BodyView.from_hu(hu)
    opts, device = InferenceOptions(device="cpu"), torch.device("cpu")
    maps = []
    for net, loc_info in locators:
        found = _run_network(image.array, coarse, net.eval(), loc_info, opts, device, None, None, [], True, hu.copy())
        maps.append(found[_organ_channel(loc_info, info)])
        if channels is not None and len(loc_info.labels) > 1:
            channels.clear()
            channels["background"] = 1.0 - found.sum(0)
            channels.update({lab.name: found[i] for i, lab in enumerate(loc_info.labels)})
    return coarse, anatomy, maps


def judge(image: vio.Image, reference: np.ndarray | None, info: ModelInfo, thresholds: list[float],
          organ: bool = False) -> dict[str, Any]:
    """Each view's located part (mL) and, with a reference, the share of it on the reference (``organ``: the
    second locator is the multi-organ one, read alone and as the voxel-wise maximum with the first too)."""
    channels: dict[str, np.ndarray] = {}
    coarse, anatomy, maps = locator_maps(image, info, channels if organ else None)
    ref = None
    if reference is not None and reference.any():
        ref = to_model_grid(reference.astype(np.float32), coarse) > 0.5
    mean = np.mean(maps, axis=0)
    views: dict[str, Any] = {}
    # locate() takes the parts over 0.5; scaling by 0.5 / t takes those over t and keeps which part
    # holds the most probability mass (a uniform scale)
    pairs = [("one", maps[0])] + ([("organ", maps[1]), ("max", np.maximum(maps[0], maps[1]))] if organ else [])
    for name, probs in pairs + [(f"mean>{t:g}", mean * (0.5 / t)) for t in thresholds]:
        where = locate(probs, coarse, FLOOR_ML, anatomy)
        view = {"located_ml": round(where.volume_ml if where.found else 0.0, 1)}
        if ref is not None and where.found:
            view["on_reference"] = round(float((where.mask & ref).sum()) / float(where.mask.sum()), 3)
        if organ and name == "one" and where.found:  # what the multi-organ locator takes the located part for
            view["organ_means"] = {k: round(float(v[where.mask].mean()), 3) for k, v in channels.items()}
        views[name] = view
    if ref is not None and ref.any():  # how sure each locator was somewhere on the spleen
        views["max_on_reference"] = [round(float(m[ref].max()), 3) for m in maps]
    return views


def cases(scan: Any, thickness: list[float]) -> list[tuple[str, vio.Image, np.ndarray | None]]:
    out: list[tuple[str, vio.Image, np.ndarray | None]] = [("whole", scan.image, scan.spleen)]
    if scan.name != "p1_sm":  # p1_sm is a crop of p1_ct: its parts are p1_ct's
        crops = {**spleen_free_parts(scan), **range_end_parts(scan), **pelvis_parts(scan)}
        out += [(part, image, None) for part, image in crops.items()]
    for t in thickness:
        for start, image, reference in slabs(scan, t, 30.0):
            out.append((f"slab {t:g} mm at {start:.0f}", image, reference if reference.any() else None))
    return out


def kind_of(part: str) -> str:
    if part == "whole":
        return "whole CTs"
    if not part.startswith("slab"):
        return "spleen-free crops"
    mm = float(part.split()[1])
    return next(name for lo, hi, name in BANDS if lo <= mm <= hi)


def summarize(rows: list[dict[str, Any]], views: list[str], rule_ml: float, min_ref_ml: float) -> list[dict[str, Any]]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for group in ("whole CTs", "spleen-free crops", *(b[2] for b in BANDS)):
            sel = [r for r in rows if r["model"] == model and kind_of(r["part"]) == group]
            spleen = [r for r in sel if r["reference_ml"] >= min_ref_ml]
            free = [r for r in sel if r["reference_ml"] == 0.0]
            for view in views:
                out.append({
                    "model": model, "group": group, "view": view,
                    "found": sum(r[view]["located_ml"] >= rule_ml and r[view].get("on_reference", 0.0) >= 0.5 for r in spleen),
                    "with_spleen": len(spleen),
                    "false": sum(r[view]["located_ml"] >= rule_ml for r in free), "spleen_free": len(free),
                })
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="shipped,held")
    ap.add_argument("--patients", default="P1,P2,P3,P4,P5", help="held: the held-out pairs to run")
    ap.add_argument("--thresholds", default="0.5,0.4,0.35,0.3,0.25", help="of the mean probability")
    ap.add_argument("--thickness", default="40,64,96,128,160,192,256", help="slab thicknesses, mm")
    ap.add_argument("--rule-ml", type=float, default=MIN_LOCATED_ML, help="the smallest located part (mL)")
    ap.add_argument("--min-ref-ml", type=float, default=20.0)
    ap.add_argument("--organ", action="store_true",
                    help="beside each model's locator the multi-organ locator trained on its patients ('organ', "
                    "'organ:P' in training/realct/locator_members) instead of the bag; adds the views organ and max")
    ap.add_argument("--name", default="bagging")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    thresholds = [float(t) for t in args.thresholds.split(",")]
    thickness = [float(t) for t in args.thickness.split(",")]
    views = ["one"] + (["organ", "max"] if args.organ else []) + [f"mean>{t:g}" for t in thresholds]
    scans = load_scans()
    jobs: list[tuple[str, str | None, ModelInfo]] = []
    for kind in args.models.split(","):
        if kind == "shipped":
            entry = default_model()
            _net, info = load_model(entry.path, sha256=entry.sha256)
            if args.organ:
                if not attach(info, "organ"):
                    raise SystemExit("--organ: no multi-organ locator trained on all five is listed ('organ')")
            else:
                attach_bag(info, "final")
            jobs.append((kind, None, info))
        elif kind == "held":
            listed = json.loads((HELD_DIR / "heldout.json").read_text())
            for patient in sorted(p for p in listed if p in args.patients.split(",")):
                if args.organ:
                    if f"organ:{patient}" not in manifest():
                        print(f"held {patient}: no multi-organ locator without {patient} is listed: skipped")
                        continue
                    _net, info = load_model(HELD_DIR / listed[patient]["file"], sha256=listed[patient]["sha256"])
                    attach(info, f"organ:{patient}")
                    jobs.append((kind, patient, info))
                    continue
                if len(bag_keys(patient)) < len(listed) - 1:
                    print(f"held {patient}: {len(bag_keys(patient))} of its {len(listed) - 1} leave-two-out locators "
                          "are committed: skipped")
                    continue
                _net, info = load_model(HELD_DIR / listed[patient]["file"], sha256=listed[patient]["sha256"])
                attach_bag(info, patient)
                jobs.append((kind, patient, info))
        else:
            raise SystemExit(f"unknown model kind {kind!r}: use shipped or held")
    rows: list[dict[str, Any]] = []
    print(f"{'model':7s} {'scan':9s} {'part':24s} {'ref mL':>6s} | " + " ".join(f"{v:>9s}" for v in views), flush=True)
    for kind, patient, info in jobs:
        for scan in scans:
            if patient is not None and scan.patient != patient:
                continue
            for part, image, reference in cases(scan, thickness):
                ref_ml = 0.0 if reference is None else round(float(reference.sum()) * image.voxel_volume_ml, 1)
                row = {"model": kind, "patient": scan.patient, "scan": scan.name, "part": part, "reference_ml": ref_ml,
                       "locators": 1 + len(info.locator_members), **judge(image, reference, info, thresholds, args.organ)}
                rows.append(row)
                print(f"{kind:7s} {scan.name:9s} {part:24s} {ref_ml:6.1f} | "
                      + " ".join(f"{row[v]['located_ml']:9.1f}" for v in views), flush=True)
    summary = summarize(rows, views, args.rule_ml, args.min_ref_ml)
    print(f"\nfound: a located part of {args.rule_ml:g} mL or more, half of it or more on the reference (cases with "
          f"{args.min_ref_ml:g} mL of spleen or more); false: a located part of {args.rule_ml:g} mL or more on a "
          "spleen-free case")
    print(f"{'model':7s} {'group':18s} " + " ".join(f"{v:>14s}" for v in views))
    for model in dict.fromkeys(s["model"] for s in summary):
        for group in dict.fromkeys(s["group"] for s in summary):
            line = [s for s in summary if s["model"] == model and s["group"] == group]
            if not line or not (line[0]["with_spleen"] or line[0]["spleen_free"]):
                continue
            cells = [f"{s['found']}/{s['with_spleen']} {s['false']}/{s['spleen_free']}" for s in line]
            print(f"{model:7s} {group:18s} " + " ".join(f"{c:>14s}" for c in cells))
    settings = {"thresholds": thresholds, "thickness_mm": thickness, "every_mm": 30.0, "rule_ml": args.rule_ml,
                "floor_ml": FLOOR_ML, "min_ref_ml": args.min_ref_ml, "torch_threads": 1,
                "organ": args.organ,
                "held_bags": {} if args.organ else {p: bag_keys(p) for k, p, _ in jobs if k == "held"}}
    benchlib.write_result(args.name, "bagging", started, settings,
                          {"model_sha256": default_model().sha256, "rows": rows, "summary": summary}, args.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

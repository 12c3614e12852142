"""Does the model hold when the same patient is scanned differently? Acquisition changes of the real CTs.

The judged CTs come from other hospitals: other slice thicknesses, doses, fields of view and
storage orders than the five here. This script makes those changes to each real CT (and its
reference, on the same new grid), runs the model in fast mode, and prints Dice, volume and what
lies away from the reference, per change, against the CT as stored (measured in the same run):

* ``as stored``: the CT itself (the baseline).
* ``thick ~5 mm``: a thick-slice reconstruction: ``n`` consecutive slices averaged (n the nearest
  whole number to 5 mm / slice spacing, at least 2), one slice per slab, the slab's centre as its
  position. The reference on that grid is the slab's mean >= 0.5.
* ``low dose``: spatially correlated Gaussian noise (white noise smoothed by 0.7 voxels in-plane,
  scaled to a standard deviation of 25 HU) added to every voxel: roughly a quarter of the dose of
  a soft-kernel abdominal CT. Seeded, so every run adds the same noise.
* ``small FOV``: the central 80 % of each in-plane axis (a reconstruction field of view that cuts
  the patient's sides, where the spleen lies: what is cut from the reference is cut from it too).
* ``flipped storage``: the voxels stored in the reverse order along all three axes, with the
  affine that keeps every voxel where it was in the patient. Physically the same CT: the answer
  must be the same mask (``vs stored`` is Dice against the stored CT's result, mapped back).
* ``thick ~8 mm``: as ``thick ~5 mm`` with 8 mm (MSD Task09 has series of up to about 8 mm).
* ``spleen x1.25`` / ``spleen x1.45``: an enlarged spleen (``training.realct.enlarge.magnify``): the
  region around the spleen magnified 1.25 or 1.45 times in every direction (its volume about 2 or 3
  times, less where the field of view cuts it), the neighbours pushed aside; the reference magnified
  with it. The five spleens here are 111-260 mL; splenomegaly is common in the clinic's CTs.

Models: ``shipped`` (the model file in vnetseg/weights) on every CT; ``heldout``: each committed
leave-one-patient-out pair (``training/realct/heldout/heldout_P<N>.pt``, with the locator check trained
without its patient, as the card scores it) on its held-out patient's CTs only: the honest view of a
CT the model has never seen; ``lopo``: the same from a training run's folder (``--runs``: its
``lopo_without_P<N>_settle`` + ``..._locator_refine``, bundled in memory as the shipped file is, no
check). Fast mode on CPU, one torch thread; ``--changes`` picks some of the changes. Usage::

    python bench/bench_acquisition.py [--models shipped,heldout] [--changes "as stored,spleen x1.45"] [--name acquisition]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

sys.path.insert(0, str(benchlib.REPO))
from training.realct.enlarge import magnify
from training.realct.evaluate import evaluate_scan
from training.realct.sources import PATIENTS, SPLEEN, Scan, load_scans
from vnetseg import io as vio
from vnetseg.checkpoint import ModelInfo, load_model
from vnetseg.confidence import LOW_CONFIDENCE
from vnetseg.model import VNet
from vnetseg.postprocess import dice
from vnetseg.registry import default_model

THICK_MM = 5.0
THICK_MM_MSD = 8.0
ENLARGE = (1.25, 1.45)
ENLARGE_MARGIN_MM = 60.0
NOISE_HU = 25.0
NOISE_SMOOTH_VOXELS = 0.7
FOV_KEEP = 0.8
SEED = 20261202


def _z_axis(affine: np.ndarray) -> int:
    """The index axis that runs head-foot (largest RAS z component)."""
    return int(np.argmax(np.abs(affine[2, :3])))


def _with(scan: Scan, array: np.ndarray, spleen: np.ndarray, affine: np.ndarray) -> Scan:
    """A changed scan: its CT and its reference spleen on the new grid (other organ labels dropped)."""
    labels = np.where(spleen, SPLEEN, 0).astype(np.int16)
    return replace(scan, image=vio.Image(np.ascontiguousarray(array, dtype=np.float32), affine), labels=labels,
                   version="spleen")


def thick_slices(scan: Scan, mm: float = THICK_MM) -> Scan:
    """Average ``n`` consecutive slices into one (a ~``mm`` reconstruction); the reference: the slab mean >= 0.5."""
    axis = _z_axis(scan.image.affine)
    step = float(scan.image.spacing[axis])
    n = max(2, round(mm / step))
    k = scan.image.shape[axis] // n
    def slabs(a: np.ndarray) -> np.ndarray:
        a = np.moveaxis(a, axis, -1)[..., : k * n].astype(np.float32)
        return np.moveaxis(a.reshape(*a.shape[:-1], k, n).mean(-1), -1, axis)
    affine = scan.image.affine.copy()
    affine[:3, axis] *= n
    affine[:3, 3] += scan.image.affine[:3, axis] * (n - 1) / 2.0  # the slab's centre
    return _with(scan, slabs(scan.image.array), slabs(scan.spleen) >= 0.5, affine)


def low_dose(scan: Scan) -> Scan:
    """Correlated Gaussian noise of ``NOISE_HU`` standard deviation added everywhere."""
    rng = np.random.default_rng(SEED)
    axis = _z_axis(scan.image.affine)
    sigma = [NOISE_SMOOTH_VOXELS if a != axis else 0.0 for a in range(3)]
    noise = ndimage.gaussian_filter(rng.standard_normal(scan.image.shape).astype(np.float32), sigma)
    noise *= NOISE_HU / max(float(noise.std()), 1e-6)
    return _with(scan, scan.image.array + noise, scan.spleen, scan.image.affine)


def small_fov(scan: Scan) -> Scan:
    """The central ``FOV_KEEP`` of each in-plane axis (the same voxels of the reference)."""
    axis = _z_axis(scan.image.affine)
    index, start = [], np.zeros(3)
    for a, size in enumerate(scan.image.shape):
        if a == axis:
            index.append(slice(None))
            continue
        keep = round(size * FOV_KEEP)
        lo = (size - keep) // 2
        index.append(slice(lo, lo + keep))
        start[a] = lo
    affine = scan.image.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    box = tuple(index)
    return _with(scan, scan.image.array[box], scan.spleen[box], affine)


def flipped_storage(scan: Scan) -> Scan:
    """The same voxels stored in reverse order on all three axes (the affine keeps them in place)."""
    shape = np.asarray(scan.image.shape)
    flip = np.diag([-1.0, -1.0, -1.0, 1.0])
    flip[:3, 3] = shape - 1
    affine = scan.image.affine @ flip
    return _with(scan, scan.image.array[::-1, ::-1, ::-1], scan.spleen[::-1, ::-1, ::-1], affine)


def enlarged(scan: Scan, factor: float) -> Scan:
    """The region around the spleen magnified ``factor`` times (``magnify``), the reference with it."""
    array, spleen, _ = magnify(scan.image.array, scan.spleen, scan.image.affine, factor, ENLARGE_MARGIN_MM)
    return _with(scan, array, spleen, scan.image.affine)


CHANGES: dict[str, Callable[[Scan], Scan]] = {
    "as stored": lambda s: s,
    "thick ~5 mm": thick_slices,
    "low dose": low_dose,
    "small FOV": small_fov,
    "flipped storage": flipped_storage,
    f"thick ~{THICK_MM_MSD:g} mm": lambda s: thick_slices(s, THICK_MM_MSD),
    **{f"spleen x{k:g}": (lambda s, k=k: enlarged(s, k)) for k in ENLARGE},
}


def run_one(scan: Scan, net: VNet, info: ModelInfo) -> tuple[dict[str, Any], np.ndarray]:
    """Fast mode on one (changed) scan, scored against its reference on its own grid (training.realct.evaluate)."""
    row = evaluate_scan(scan, net, info, mode="fast")
    mask = row.pop("_mask")
    row.update(shape=list(scan.image.shape), spacing_mm=[round(float(s), 3) for s in scan.image.spacing],
               low_confidence=any(w.startswith(LOW_CONFIDENCE) for w in row["warnings"]))
    return row, mask


def models(which: list[str], runs: Path | None, files: list[str] = ()) -> list[tuple[str, str | None, Callable[[], tuple[VNet, ModelInfo]]]]:
    """(name, held-out patient or None, loader) per model to run; ``files``: "NAME=PATH" (run on every CT) or
    "NAME=PATH@P" (a model trained without patient P: run on P's CTs only)."""
    out: list[tuple[str, str | None, Callable[[], tuple[VNet, ModelInfo]]]] = []
    for item in files:
        name, _, rest = item.partition("=")
        path, _, patient = rest.partition("@")
        if not name or not Path(path).is_file() or (patient and patient not in PATIENTS):
            raise SystemExit(f"--file {item!r}: expected NAME=PATH or NAME=PATH@P with an existing model file")
        out.append((name, patient or None, lambda path=path: load_model(path)))
    if "shipped" in which:
        out.append(("shipped", None, lambda: load_model(default_model().path)))
    if "heldout" in which:
        from training.realct.members import attach_check
        from training.realct.ship import CHECK_MIN, CHECK_RIVALS, HELD_OUT_DIR

        entries = json.loads((HELD_OUT_DIR / "heldout.json").read_text())

        def load_pair(p: str) -> tuple[VNet, ModelInfo]:
            net, info = load_model(HELD_OUT_DIR / entries[p]["file"], sha256=entries[p]["sha256"])
            if not attach_check(info, p, CHECK_MIN, CHECK_RIVALS):
                raise SystemExit(f"no multi-organ locator trained without {p} is listed (organ:{p})")
            return net, info

        for p in PATIENTS:
            out.append((f"heldout_{p}", p, lambda p=p: load_pair(p)))
    if "lopo" in which:
        if runs is None:
            raise SystemExit("--models lopo needs --runs (the folder with the lopo_without_P<N>_* training runs)")
        from training.realct.ship import bundle_in_memory

        for p in PATIENTS:
            main = runs / f"lopo_without_{p}_settle" / "fold_0" / "model_last.pt"
            loc = runs / f"lopo_without_{p}_locator_refine" / "fold_0" / "model_last.pt"
            if not (main.is_file() and loc.is_file()):
                raise SystemExit(f"held-out pair for {p} not found: {main}, {loc}")
            out.append((f"lopo_without_{p}", p, lambda m=main, l=loc: bundle_in_memory(m, l)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="shipped", help="comma list: shipped, heldout, lopo")
    ap.add_argument("--file", action="append", default=[], metavar="NAME=PATH[@P]",
                    help="a model file to run too (@P: trained without patient P, run on P's CTs only)")
    ap.add_argument("--changes", default="", help="comma list of changes (default: all); 'as stored' is always run")
    ap.add_argument("--runs", type=Path, default=None, help="training runs folder (for --models lopo)")
    ap.add_argument("--scans", default="", help="comma list of scan names (default: all)")
    ap.add_argument("--name", default="acquisition")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    names = tuple(s for s in args.scans.split(",") if s)
    picked = [c.strip() for c in args.changes.split(",") if c.strip()]
    unknown = [c for c in picked if c not in CHANGES]
    if unknown:
        raise SystemExit(f"unknown --changes {unknown}: choose from {list(CHANGES)}")
    changes = {c: fn for c, fn in CHANGES.items() if not picked or c in picked or c == "as stored"}
    scans = load_scans(names=names) if names else load_scans()
    rows: list[dict[str, Any]] = []
    print(f"{'model':16s} {'scan':9s} {'change':16s} {'found':5s} {'Dice':>6s} {'mL':>6s} {'ref mL':>6s} "
          f"{'away':>5s} {'vs stored':>9s} {'s':>5s}", flush=True)
    for name, held, load in models([m for m in args.models.split(",") if m], args.runs, args.file):
        net, info = load()
        for scan in scans:
            if held is not None and scan.patient != held:
                continue
            stored_mask = None
            for change, fn in changes.items():
                changed = fn(scan)
                row, mask = run_one(changed, net, info)
                if change == "as stored":
                    stored_mask = mask
                elif change == "flipped storage" and stored_mask is not None:
                    row["dice_vs_stored"] = round(float(dice(mask[::-1, ::-1, ::-1], stored_mask)), 4)
                row = {"model": name, "scan": scan.name, "patient": scan.patient, "change": change, **row}
                rows.append(row)
                vs = f"{row['dice_vs_stored']:.4f}" if "dice_vs_stored" in row else ""
                print(f"{name:16s} {scan.name:9s} {change:16s} {row['found']!s:5s} {row['dice']:6.3f} "
                      f"{row['volume_ml']:6.1f} {row['reference_ml']:6.1f} {row['misplaced_ml']:5.1f} {vs:>9s} "
                      f"{row['seconds']:5.1f}", flush=True)
    summary = summarize(rows)
    print("\nDice change against 'as stored' (same model, same CT, same run):")
    for key, value in summary.items():
        print(f"  {key:40s} {value}")
    settings = {"changes": list(changes), "thick_mm": [THICK_MM, THICK_MM_MSD], "enlarge": list(ENLARGE),
                "enlarge_margin_mm": ENLARGE_MARGIN_MM, "noise_hu": NOISE_HU, "noise_smooth_voxels": NOISE_SMOOTH_VOXELS,
                "fov_keep": FOV_KEEP, "seed": SEED, "mode": "fast", "torch_threads": 1}
    body = {"model_sha256": default_model().sha256 if "shipped" in args.models else "", "rows": rows, "summary": summary}
    benchlib.write_result(args.name, "acquisition", started, settings, body, args.note)
    return 0


def model_kind(name: str) -> str:
    """What a row's model is summed up under: held-out models ("heldout_P1", "lopo_without_P1", a
    --file "big_P1") by the name before the first "_", any other model by its own name."""
    return name.split("_")[0] if re.search(r"_P[1-5]$", name) else name


def summarize(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Per model kind and change: median and worst Dice change against the stored CT, over the CTs
    found as stored (a CT the model misses as stored has no change to measure), and any lost."""
    base = {(r["model"], r["scan"]): r["dice"] for r in rows if r["change"] == "as stored"}
    out: dict[str, str] = {}
    kinds = list(dict.fromkeys(model_kind(r["model"]) for r in rows))
    for kind in kinds:
        for change in CHANGES:
            if change == "as stored":
                continue
            sel = [r for r in rows if r["change"] == change and model_kind(r["model"]) == kind]
            missed = sorted({r["scan"] for r in sel if base[(r["model"], r["scan"])] == 0.0})
            sel = [r for r in sel if base[(r["model"], r["scan"])] > 0.0]
            if not sel:
                continue
            deltas = [r["dice"] - base[(r["model"], r["scan"])] for r in sel]
            lost = [r["scan"] for r in sel if r["dice"] < 0.5 <= base[(r["model"], r["scan"])]]
            out[f"{kind}: {change}"] = (
                f"median {np.median(deltas):+.3f}, worst {min(deltas):+.3f} ({len(sel)} CTs"
                f"{'; not found as stored: ' + ', '.join(missed) if missed else ''})"
                f"{'; lost: ' + ', '.join(lost) if lost else ''}"
            )
    return out


if __name__ == "__main__":
    raise SystemExit(main())

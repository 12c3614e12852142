"""Where should "low confidence: check the result" fire? Confidence of right vs wrong results on the real CTs.

Issue 14 asks for a per-case confidence (``vnetseg.confidence``: the mean spleen probability
inside the mask and the share of the organ's voxels with a probability in 0.3-0.7) and a
low-confidence warning whose threshold is chosen from measurements: correct results against the
wrong ones we can produce. This script produces both kinds with the models that exist when it
runs and prints every case, then the rule's flag rates:

* the shipped model (``vnetseg/weights``) on every real CT (trained on them: mostly right), and
  "final": the networks the next shipped file is made from (``<runs>/final_main_polish`` +
  ``final_locator``), bundled in memory the same way;
* each leave-one-patient-out pair (``<runs>/lopo_without_P<N>_polish`` + ``..._locator``, put
  together in memory as the shipped file would hold them) on its held-out patient's CTs only;
* every model on its CTs' spleen-free parts (``spleen_free_parts``: chest above the spleen,
  abdomen/pelvis below it), where any mask is wrong;
* deliberately wrong inputs built from the same CTs: the spleen replaced by fat (-100 HU, so any
  mask is wrong), every HU raised by 300 (a wrong calibration), Gaussian noise of 150 HU, and the
  voxels mirrored left-right under the same affine (the spleen on the patient's right, as in situs
  inversus; the reference mirrored with it: the model never saw this in training).

A result is *right* when the reference holds a spleen and Dice >= ``RIGHT_DICE``, or when it
holds none and the answer is "no spleen"; every other result is *wrong*. Answers without a mask
have no confidence: they are counted, not used for the threshold. The thresholds are chosen to
flag as many wrong masks as possible while flagging no right mask of the shipped (or final) model,
then the fewest right masks of any model, then leave the widest gap to the nearest right mask; each
is half-way between two measured values.

``--tta`` also measures test-time augmentation: fast mode's full-resolution box run with its
window grid moved by ``--shifts`` voxels in-plane (the box extended on one side, the result cropped
back), the probabilities averaged; Dice and confidence with and without it.

All runs are fast mode on CPU with one torch thread (the whole-CT view decides for both modes, so
the answers are those of full mode up to fast/full agreement). Usage::

    python bench/bench_confidence.py --runs /work/main/runs/spleen_model/runs [--tta] [--name confidence]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

sys.path.insert(0, str(benchlib.REPO))
from training.realct.sources import PATIENTS, Scan, load_scans, spleen_free_parts
from vnetseg import confidence as conf
from vnetseg import inference as inf
from vnetseg import io as vio
from vnetseg.checkpoint import load_model
from vnetseg.postprocess import dice
from vnetseg.registry import default_model

RIGHT_DICE = 0.8
SHIPPED = ("shipped", "final")  # the shipped file, and the networks its next version is made from
WRONG_INPUTS = ("spleen_as_fat", "hu_plus_300", "noise_150", "mirrored_lr")


# ------------------------------------------------------------------------------- models
def bundle(main: Path, locator: Path):
    """Main network + locator as the shipped file holds them, in memory."""
    from training.realct.ship import bundle_in_memory

    return bundle_in_memory(main, locator)


def find_models(runs: Path | None, shipped: bool) -> list[dict[str, Any]]:
    """The shipped model and every complete leave-one-patient-out pair under ``runs``."""
    found = []
    if shipped:
        entry = default_model()
        if entry is None:
            raise SystemExit("no shipped model in vnetseg/weights")
        net, info = load_model(entry.path)
        found.append({"name": "shipped", "files": [str(entry.path)], "sha256": entry.sha256, "held_out": None,
                      "version": info.card.get("version"), "net": net, "info": info})
    if runs is not None:  # the networks the next shipped file is made from, bundled the same way
        main, loc = runs / "final_main_polish" / "fold_0" / "model_last.pt", runs / "final_locator" / "fold_0" / "model_last.pt"
        if main.is_file() and loc.is_file():
            net, info = bundle(main, loc)
            found.append({"name": "final", "files": [str(main), str(loc)], "held_out": None,
                          "modified_utc": _mtime(main, loc), "net": net, "info": info})
    for patient in PATIENTS:
        if runs is None:
            break
        main = runs / f"lopo_without_{patient}_polish" / "fold_0" / "model_last.pt"
        loc = runs / f"lopo_without_{patient}_locator" / "fold_0" / "model_last.pt"
        if main.is_file() and loc.is_file():
            net, info = bundle(main, loc)
            found.append({"name": f"lopo_without_{patient}", "files": [str(main), str(loc)], "held_out": patient,
                          "modified_utc": _mtime(main, loc),
                          "net": net, "info": info})
    return found


def _mtime(*paths: Path) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(max(p.stat().st_mtime for p in paths)))


# -------------------------------------------------------------------------------- cases
def wrong_input(scan: Scan, kind: str, seed: int = 0) -> tuple[vio.Image, np.ndarray]:
    """A deliberately wrong input built from ``scan`` and the reference its right answer has."""
    from scipy import ndimage

    hu = scan.image.array.astype(np.float32, copy=True)
    if kind == "spleen_as_fat":
        hu[ndimage.binary_dilation(scan.spleen, iterations=2)] = -100.0
        return vio.Image(hu, scan.image.affine), np.zeros(scan.spleen.shape, bool)
    if kind == "hu_plus_300":
        return vio.Image(hu + 300.0, scan.image.affine), scan.spleen
    if kind == "mirrored_lr":
        axis = int(np.argmax(np.abs(scan.image.affine[0, :3])))  # the index axis closest to R-L
        return vio.Image(np.flip(hu, axis).copy(), scan.image.affine), np.flip(scan.spleen, axis).copy()
    if kind == "noise_150":
        rng = np.random.default_rng(seed)
        return vio.Image(hu + rng.normal(0.0, 150.0, hu.shape).astype(np.float32), scan.image.affine), scan.spleen
    raise ValueError(f"unknown wrong input {kind!r}")


def cases_for(model: dict[str, Any], scans: list[Scan]) -> list[tuple[str, str, vio.Image, np.ndarray]]:
    """(case name, kind, image, reference spleen mask) for one model."""
    mine = [s for s in scans if model["held_out"] in (None, s.patient)]
    out = []
    for scan in mine:
        out.append((scan.name, "real", scan.image, scan.spleen))
        for part, image in spleen_free_parts(scan).items():
            out.append((f"{scan.name}:{part}", "spleen_free", image, np.zeros(image.shape, bool)))
        for kind in WRONG_INPUTS:
            image, reference = wrong_input(scan, kind)
            out.append((f"{scan.name}:{kind}", kind, image, reference))
    return out


# ------------------------------------------------------------------------------ running
class Shifted:
    """Test-time augmentation inside ``predict_volume``: the main network's box also run with moved windows."""

    def __init__(self, net, shifts: tuple[int, ...]) -> None:
        self.net, self.shifts, self.original = net, shifts, inf._run_network

    def __enter__(self) -> Shifted:  # noqa: PYI034
        def run(array, region, model, *args, **kwargs):
            base = self.original(array, region, model, *args, **kwargs)
            if model is not self.net:
                return base
            outs = [base]
            shape = np.asarray(region.model_shape)
            for s in self.shifts:
                low = bool(np.all(region.offset[:2] - region.scale[:2] * s >= -0.5))  # room before the box?
                start = (-s, -s, 0) if low else (0, 0, 0)
                stop = tuple(int(v) for v in shape) if low else (int(shape[0]) + s, int(shape[1]) + s, int(shape[2]))
                out = self.original(array, region.crop(start, stop), model, *args, **kwargs)
                outs.append(out[:, s:, s:, :] if low else out[:, : shape[0], : shape[1], :])
            return np.mean(outs, axis=0, dtype=np.float32)

        inf._run_network = run
        return self

    def __exit__(self, *exc: object) -> None:
        inf._run_network = self.original


def run_case(model: dict[str, Any], name: str, kind: str, image: vio.Image, reference: np.ndarray, tta: tuple[int, ...] = ()) -> dict[str, Any]:
    t0 = time.perf_counter()
    options = inf.InferenceOptions(device="cpu", mode="fast")
    if tta:
        with Shifted(model["net"], tta):
            pred = inf.predict_volume(image, model["net"], model["info"], options)
    else:
        pred = inf.predict_volume(image, model["net"], model["info"], options)
    mask = pred.labelmap > 0
    has_spleen = bool(reference.any())
    d = dice(mask, reference) if has_spleen else None
    right = (d is not None and d >= RIGHT_DICE) if has_spleen else not pred.report.found
    c = pred.confidence
    return {
        "model": model["name"], "case": name, "kind": kind, "reference_has_spleen": has_spleen,
        "found": pred.report.found, "volume_ml": round(pred.volume_ml, 1), "dice": None if d is None else round(d, 4),
        "right": bool(right), "mean_probability": None if c is None else c.mean_probability,
        "uncertain_share": None if c is None else c.uncertain_share, "flagged_now": bool(c is not None and c.low),
        "tta_shifts": list(tta), "seconds": round(time.perf_counter() - t0, 1),
    }


# ---------------------------------------------------------------------------- threshold
def flag(row: dict[str, Any], share_max: float, mean_min: float) -> bool:
    return row["uncertain_share"] > share_max or row["mean_probability"] < mean_min


def _midpoints(values: list[float], lo: float, hi: float) -> list[float]:
    v = sorted(set(values) | {lo, hi})
    return [round((a + b) / 2, 4) for a, b in itertools.pairwise(v)]


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The (share, mean) thresholds that flag the most wrong masks and no right mask of the shipped model."""
    masks = [r for r in rows if r["mean_probability"] is not None and not r["tta_shifts"]]
    right = [r for r in masks if r["right"]]
    wrong = [r for r in masks if not r["right"]]
    shares = _midpoints([r["uncertain_share"] for r in masks], 0.0, 1.0) + [1.0]
    means = [0.0] + _midpoints([r["mean_probability"] for r in masks], 0.0, 1.0)
    best = None
    for s in shares:
        for m in means:
            if any(flag(r, s, m) for r in right if r["model"] in SHIPPED):
                continue
            spared = [r for r in right if not flag(r, s, m)]
            margin = min((min(s - r["uncertain_share"], r["mean_probability"] - m) for r in spared), default=1.0)
            # most wrong masks flagged, then fewest right ones, then the widest gap to the nearest right one
            score = (sum(flag(r, s, m) for r in wrong), -sum(flag(r, s, m) for r in right), round(margin, 4))
            if best is None or score > best[0]:
                best = (score, s, m)
    assert best is not None  # (1.0, 0.0) flags nothing: always allowed
    (_, s, m) = best
    return {
        "uncertain_share_above": s, "mean_probability_below": m,
        "masks": len(masks), "right_masks": len(right), "wrong_masks": len(wrong),
        "wrong_flagged": sum(flag(r, s, m) for r in wrong), "right_flagged": sum(flag(r, s, m) for r in right),
        "answers_without_mask": {"right": sum(r["right"] for r in rows if r["mean_probability"] is None and not r["tta_shifts"]),
                                 "wrong": sum(not r["right"] for r in rows if r["mean_probability"] is None and not r["tta_shifts"])},
    }


def rates(rows: list[dict[str, Any]], s: float, m: float) -> dict[str, Any]:
    masks = [r for r in rows if r["mean_probability"] is not None and not r["tta_shifts"]]
    right, wrong = [r for r in masks if r["right"]], [r for r in masks if not r["right"]]
    return {"uncertain_share_above": s, "mean_probability_below": m,
            "wrong_flagged": f"{sum(flag(r, s, m) for r in wrong)}/{len(wrong)}",
            "right_flagged": f"{sum(flag(r, s, m) for r in right)}/{len(right)}"}


def print_rows(rows: list[dict[str, Any]], header: bool = True) -> None:
    if header:
        print(f"{'model':<18} {'case':<28} {'kind':<12} {'found':>5} {'mL':>7} {'dice':>6} {'right':>5} {'mean p':>6} {'uncert':>6} {'flag':>4} {'s':>5}")
    for r in rows:
        mean = "-" if r["mean_probability"] is None else f"{r['mean_probability']:.3f}"
        share = "-" if r["uncertain_share"] is None else f"{r['uncertain_share']:.3f}"
        d = "-" if r["dice"] is None else f"{r['dice']:.3f}"
        tag = r["kind"] + ("+tta" if r["tta_shifts"] else "")
        print(f"{r['model']:<18} {r['case']:<28} {tag:<13} {r['found']!s:>5} {r['volume_ml']:>7.1f} {d:>6} "
              f"{r['right']!s:>5} {mean:>6} {share:>6} {r['flagged_now']!s:>4} {r['seconds']:>5.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, help="folder holding lopo_without_P<N>_polish / _locator runs")
    ap.add_argument("--no-shipped", dest="shipped", action="store_false", help="leave the shipped model out")
    ap.add_argument("--only", nargs="*", help="model names to run (default: all found)")
    ap.add_argument("--tta", action="store_true", help="also measure shifted-window test-time augmentation on real CTs")
    ap.add_argument("--shifts", type=int, nargs="+", default=[16, 48], help="TTA window shifts in voxels (in-plane)")
    ap.add_argument("--name", default="confidence", help="results/<name>.json")
    ap.add_argument("--reuse", type=Path, nargs="*", default=[],
                    help="earlier results JSON files: rows of the same model files are taken from them")
    ap.add_argument("--markdown", action="store_true", help="only print the --reuse files' results as a Markdown table")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    if args.markdown:
        rows = [r for group in _earlier(args.reuse).values() for r in group]
        print(markdown(rows, conf.LOW_CONFIDENCE_UNCERTAIN_SHARE, conf.LOW_CONFIDENCE_MEAN_PROBABILITY))
        print(f"\nchosen from these: {choose(rows)}")
        return 0
    torch.set_num_threads(1)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    machine = benchlib.machine_info()
    models = [m for m in find_models(args.runs, args.shipped) if not args.only or m["name"] in args.only]
    print("models:", ", ".join(f"{m['name']} ({', '.join(m['files'])})" for m in models))
    scans = load_scans()
    rows, earlier = [], _earlier(args.reuse)
    print_rows([])
    for model in models:
        reused = earlier.get(_identity(model))
        if reused is not None:  # the same model files measured before: keep those rows
            rows += reused
            print_rows(reused, header=False)
            continue
        for name, kind, image, reference in cases_for(model, scans):
            rows.append(run_case(model, name, kind, image, reference))
            print_rows(rows[-1:], header=False)
            if args.tta and kind == "real":
                rows.append(run_case(model, name, kind, image, reference, tuple(args.shifts)))
                print_rows(rows[-1:], header=False)
    chosen = choose(rows)
    data = {
        "benchmark": "confidence", "started_utc": started, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "right_dice": RIGHT_DICE, "mode": "fast", "uncertain_band": conf.UNCERTAIN_BAND,
        "models": [{k: v for k, v in m.items() if k not in ("net", "info")} for m in models],
        "chosen": chosen,
        "in_use": rates(rows, conf.LOW_CONFIDENCE_UNCERTAIN_SHARE, conf.LOW_CONFIDENCE_MEAN_PROBABILITY),
        "tta": tta_summary(rows) if args.tta else None,
        "rows": rows, "machine": machine, "note": args.note,
    }
    path = benchlib.RESULTS / f"{args.name}.json"
    benchlib.write_json(path, data)
    print("\nall cases:")
    print_rows(rows)
    print(f"\nchosen: {chosen}")
    print(f"in use (vnetseg.confidence): {data['in_use']}")
    if args.tta:
        print(f"tta: {data['tta']}")
    print(f"wrote {path}")
    return 0


def _identity(model: dict[str, Any]) -> tuple:
    """What makes two measurements of a model the same: its files, and their hash or time."""
    return (model["name"], tuple(model["files"]), model.get("sha256") or model.get("modified_utc"))


def _earlier(paths: list[Path]) -> dict[tuple, list[dict[str, Any]]]:
    import json

    found = {}
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"--reuse {path}: no such file")
        data = json.loads(path.read_text())
        for m in data.get("models", []):
            found[_identity(m)] = [r for r in data.get("rows", []) if r["model"] == m["name"]]
    return found


def markdown(rows: list[dict[str, Any]], s: float, m: float) -> str:
    """Every result with a mask as a Markdown table, flagged by the rule (share > s or mean < m)."""
    lines = ["| model | case | kind | Dice | right | mean p | uncertain | flagged |", "|---|---|---|---:|---|---:|---:|---|"]
    for r in rows:
        if r["mean_probability"] is None or r["tta_shifts"]:
            continue
        d = "-" if r["dice"] is None else f"{r['dice']:.3f}"
        lines.append(f"| {r['model']} | {r['case']} | {r['kind']} | {d} | {'yes' if r['right'] else '**no**'} | "
                     f"{r['mean_probability']:.3f} | {r['uncertain_share']:.3f} | {'yes' if flag(r, s, m) else 'no'} |")
    return "\n".join(lines)


def tta_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per real case: Dice and confidence without and with TTA."""
    plain = {(r["model"], r["case"]): r for r in rows if r["kind"] == "real" and not r["tta_shifts"]}
    out = []
    for r in rows:
        if r["kind"] == "real" and r["tta_shifts"]:
            p = plain[(r["model"], r["case"])]
            out.append({"model": r["model"], "case": r["case"], "dice": p["dice"], "dice_tta": r["dice"],
                        "uncertain_share": p["uncertain_share"], "uncertain_share_tta": r["uncertain_share"],
                        "seconds": p["seconds"], "seconds_tta": r["seconds"]})
    gains = [o["dice_tta"] - o["dice"] for o in out if o["dice"] is not None and o["dice_tta"] is not None]
    return {"cases": out, "mean_dice_gain": round(float(np.mean(gains)), 4) if gains else None,
            "min_dice_gain": round(float(np.min(gains)), 4) if gains else None,
            "max_dice_gain": round(float(np.max(gains)), 4) if gains else None}


if __name__ == "__main__":
    sys.exit(main())

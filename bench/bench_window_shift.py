"""How much does a model's answer depend on where its windows sit? (issue 6's accuracy criterion)

Issue 6 asks fast mode (the organ's box, one window centred on it) and full mode (a sliding window
over the whole CT) to agree to Dice >= 0.99. Both are sliding-window estimates of the same network,
so they can agree no better than full mode agrees with itself when only its window grid moves.
This script measures that on the real CTs in ``../shared/data/ct``: for each scan it runs

* full mode as shipped, and full mode with its window grid moved by ``--shifts`` voxels along
  both in-plane axes of the model grid (the CT is padded with air at the start, the result
  cropped back: same voxels, same network, only the window positions change);
* fast mode as shipped;

and reports Dice and volume difference of each against full mode (on the model grid, after the
usual clean-up: largest component, holes filled), plus Dice against the reference pseudo-label and
how many voxels have a probability between 0.3 and 0.7, as a share of the organ's voxel count (how
soft the network's answer is: those are the voxels a small change flips).

Usage::

    python bench/bench_window_shift.py                              # the shipped model
    python bench/bench_window_shift.py --model my_model.pt --shifts 4 8 16 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

sys.path.insert(0, str(benchlib.REPO))
from vnetseg import inference as inf
from vnetseg.checkpoint import load_model
from vnetseg.postprocess import clean_mask, dice
from vnetseg.preprocess import make_grid_map, to_model_grid, window_hu
from vnetseg.registry import default_model

from training.realct.sources import load_scans


def _probabilities(net, info, volume: np.ndarray, shift: int) -> np.ndarray:
    """Full-mode foreground probability on ``volume`` (model grid) with the window grid moved by ``shift``."""
    pre = info.preprocessing
    padded = np.pad(volume, ((shift, 0), (shift, 0), (0, 0)), constant_values=pre.scale[0])
    patch = inf.window_for(pre.patch_size, padded.shape, net.config.size_multiple)
    settings = inf.WindowSettings(patch, 0.25, 1, pad_value=pre.scale[0])
    probs = inf.sliding_window(padded[None], inf.softmax_foreground(net, False), settings, 1)[0]
    return probs[shift:, shift:]


def _fast_probabilities(net, info, scan, grid) -> np.ndarray:
    """Fast mode's probability on the full model grid (zero outside its box)."""
    captured = {}
    original = inf._run_network

    def spy(array, region, model, *args, **kwargs):
        out = original(array, region, model, *args, **kwargs)
        if model is net:
            captured["region"], captured["probs"] = region, out
        return out

    inf._run_network = spy
    try:
        pred = inf.predict_volume(scan.image, net, info, inf.InferenceOptions(device="cpu", mode="fast"))
    finally:
        inf._run_network = original
    full = np.zeros(grid.model_shape, np.float32)
    if pred.box is None:
        return captured["probs"][0]
    (a, b, c), (x, y, z) = pred.box.start, pred.box.stop
    full[a:x, b:y, c:z] = captured["probs"][0]
    return full


def _row(scan: str, kind: str, probs: np.ndarray, base: np.ndarray, reference: np.ndarray, soft: float) -> dict:
    mask = clean_mask(probs > 0.5)  # as shipped: largest component, holes filled
    return {
        "scan": scan,
        "run": kind,
        "dice_vs_full": round(float(dice(mask, base)), 4),
        "volume_diff_pct": round(100.0 * (int(mask.sum()) - int(base.sum())) / max(int(base.sum()), 1), 2),
        "dice_vs_reference": round(float(dice(mask, reference)), 4),
        "soft_share": round(soft, 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model file (default: the shipped model)")
    ap.add_argument("--shifts", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--scans", nargs="+", default=["p1_ct", "p1_sm", "p2_dicom"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="window_shift_shipped")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else default_model().path
    net, info = load_model(path)
    net.eval()
    pre = info.preprocessing
    rows = []
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for scan in load_scans(names=tuple(args.scans)):
        grid = make_grid_map(scan.image.shape, scan.image.affine, pre.target_spacing)
        volume = window_hu(to_model_grid(scan.image.array, grid), pre.hu_window, pre.scale)
        reference = to_model_grid(scan.spleen.astype(np.float32), grid) > 0.5
        full = _probabilities(net, info, volume, 0)
        base = clean_mask(full > 0.5)
        soft = float(((full > 0.3) & (full < 0.7)).sum() / max(base.sum(), 1))

        rows.append(_row(scan.name, "full", full, base, reference, soft))
        for shift in args.shifts:
            moved = _probabilities(net, info, volume, shift)
            rows.append(_row(scan.name, f"full, grid moved {shift}", moved, base, reference, soft))
        rows.append(_row(scan.name, "fast", _fast_probabilities(net, info, scan, grid), base, reference, soft))
        for r in rows[-(len(args.shifts) + 2):]:
            print(f"{r['scan']:9s} {r['run']:22s} Dice vs full {r['dice_vs_full']:.4f}  "
                  f"volume {r['volume_diff_pct']:+6.2f} %  Dice vs reference {r['dice_vs_reference']:.4f}", flush=True)
    print("\nvoxels with probability 0.3-0.7, as a share of the organ's size: "
          + ", ".join(f"{r['scan']} {r['soft_share']:.1%}" for r in rows if r["run"] == "full"))
    out = {
        "benchmark": "window_shift",
        "started_utc": started,
        "model": {"path": str(path), "sha256": info.sha256, "name": info.card.get("name")},
        "patch": list(pre.patch_size),
        "overlap": 0.25,
        "machine": benchlib.machine_info(),
        "rows": rows,
    }
    benchlib.RESULTS.mkdir(exist_ok=True)
    dest = benchlib.RESULTS / f"{args.name}.json"
    dest.write_text(json.dumps(out, indent=1))
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

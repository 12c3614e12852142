"""How much does a model's answer depend on where its windows sit? (issue 6's accuracy criterion)

Issue 6 asks fast mode (the organ's box, one window centred on it) and full mode (a sliding window
over the whole CT) to agree to Dice >= 0.99. Both are sliding-window estimates of the same network,
so they can agree no better than full mode agrees with itself when only its window grid moves.
This script measures that on the real CTs in ``../shared/data/ct``: for each scan it runs

* full mode as shipped, and full mode with its window grid moved by ``--shifts`` voxels along
  both in-plane axes of the model grid (the CT is padded with air at the start, the result
  cropped back: same voxels, same network, only the window positions change);
* fast mode as shipped;
* "full, its windows on the organ": only those windows of full mode's own grid that touch the
  organ's box (the locator's box plus the 15 mm margin, not grown): the exact alternative to fast
  mode, identical to full mode inside that box, and the number of windows it needs;

and reports Dice and volume difference of each against full mode (on the model grid, after the
usual clean-up: largest component, holes filled), plus Dice against the reference pseudo-label and
how many voxels have a probability between 0.3 and 0.7, as a share of the organ's voxel count (how
soft the network's answer is: those are the voxels a small change flips), and the windows each run
needs. It also counts (without running the main network) the windows full mode, fast mode and the
exact alternative need on the speed benchmark's CT (bench_inference.py: example_ct resampled to
512 x 512 x 120 at 0.8 x 0.8 x 2.5 mm) with the paper V-Net's 96^3 window.

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
from training.realct.sources import load_scans
from vnetseg import inference as inf
from vnetseg.checkpoint import load_model
from vnetseg.fast import box_from_coarse_mask
from vnetseg.postprocess import clean_mask, dice
from vnetseg.preprocess import make_grid_map, to_model_grid, window_hu
from vnetseg.registry import default_model

PAPER_WINDOW = (96, 96, 96)


def _probabilities(net, info, volume: np.ndarray, shift: int) -> np.ndarray:
    """Full-mode foreground probability on ``volume`` (model grid) with the window grid moved by ``shift``."""
    pre = info.preprocessing
    padded = np.pad(volume, ((shift, 0), (shift, 0), (0, 0)), constant_values=pre.scale[0])
    patch = inf.window_for(pre.patch_size, padded.shape, net.config.size_multiple)
    settings = inf.WindowSettings(patch, 0.25, 1, pad_value=pre.scale[0])
    probs = inf.sliding_window(padded[None], inf.softmax_foreground(net, False), settings, 1)[0]
    return probs[shift:, shift:]


def _organ_box(image, info, grid):
    """The located part's box plus the margin, on ``grid`` (fast mode's box before growing); None: no spleen in view."""
    opts = inf.InferenceOptions(device="cpu", mode="fast")
    location, coarse = inf.whole_ct_view(image, None, info, opts, torch.device("cpu"), None, None, [])
    if not location.found:
        return None
    box, _note = box_from_coarse_mask(location.mask, coarse, grid)
    return box


def _grid_windows(shape, patch) -> list[tuple[int, int, int]]:
    return inf._windows(tuple(max(s, p) for s, p in zip(shape, patch)), patch, 0.25)


def _subset_probabilities(net, info, volume: np.ndarray, box) -> tuple[np.ndarray, int]:
    """Full mode's Gaussian-weighted mean, but only over its windows that touch ``box`` (exact inside it)."""
    pre = info.preprocessing
    patch = inf.window_for(pre.patch_size, volume.shape, net.config.size_multiple)
    touching = inf.touching_windows(_grid_windows(volume.shape, patch), patch, box.start, box.stop)
    settings = inf.WindowSettings(patch, 0.25, 1, pad_value=pre.scale[0])
    probs = inf.sliding_window(volume[None], inf.softmax_foreground(net, False), settings, 1, windows=touching)[0]
    inside = np.zeros(volume.shape, bool)
    inside[tuple(slice(a, b) for a, b in zip(box.start, box.stop))] = True
    return np.where(inside, probs, 0.0).astype(np.float32), len(touching)


def _window_counts(shape, patch, multiple, fast_box, organ_box) -> dict[str, int]:
    full_patch = inf.window_for(patch, shape, multiple)
    fast_patch = inf.window_for(patch, fast_box.shape, multiple)
    return {
        "full": len(_grid_windows(shape, full_patch)),
        "fast": len(_grid_windows(fast_box.shape, fast_patch)),
        "exact_subset": len(inf.touching_windows(_grid_windows(shape, full_patch), full_patch, organ_box.start, organ_box.stop)),
    }


def _fast_probabilities(net, info, scan, grid):
    """Fast mode's probability on the full model grid (zero outside its box), and the box."""
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
        raise SystemExit(f"{scan.name}: fast mode fell back to the whole volume ({pred.notes})")
    (a, b, c), (x, y, z) = pred.box.start, pred.box.stop
    full[a:x, b:y, c:z] = captured["probs"][0]
    return full, pred.box


def _row(
    scan: str, kind: str, probs: np.ndarray, base: np.ndarray, reference: np.ndarray, soft: float, windows: int
) -> dict:
    mask = clean_mask(probs > 0.5)  # as shipped: largest component, holes filled
    return {
        "scan": scan,
        "run": kind,
        "windows": windows,
        "dice_vs_full": round(float(dice(mask, base)), 4),
        "volume_diff_pct": round(100.0 * (int(mask.sum()) - int(base.sum())) / max(int(base.sum()), 1), 2),
        "dice_vs_reference": round(float(dice(mask, reference)), 4),
        "soft_share": round(soft, 3),
    }


def _paper_window_counts(info) -> dict:
    """Window counts on the speed benchmark's CT with the paper V-Net's window (the locator's box, no main network)."""
    from make_ct import make_benchmark_ct

    from vnetseg.io import read_image

    image = read_image(make_benchmark_ct())
    grid = make_grid_map(image.shape, image.affine, info.preprocessing.target_spacing)
    organ = _organ_box(image, info, grid)
    mask = np.zeros(grid.model_shape, bool)  # fast mode's box: the organ's box grown to at least one window
    mask[tuple(slice(a, b) for a, b in zip(organ.start, organ.stop))] = True
    fast_box = box_from_coarse_mask(mask, grid, grid, margin_mm=0.0, min_shape=PAPER_WINDOW)[0]
    return {
        "ct_shape": list(image.shape),
        "model_grid": list(grid.model_shape),
        "window": list(PAPER_WINDOW),
        "organ_box": [list(organ.start), list(organ.stop)],
        "fast_box": [list(fast_box.start), list(fast_box.stop)],
        "windows": _window_counts(grid.model_shape, PAPER_WINDOW, 16, fast_box, organ),
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
        organ = _organ_box(scan.image, info, grid)
        fast_probs, fast_box = _fast_probabilities(net, info, scan, grid)
        counts = _window_counts(volume.shape, pre.patch_size, net.config.size_multiple, fast_box, organ)

        rows.append(_row(scan.name, "full", full, base, reference, soft, counts["full"]))
        for shift in args.shifts:
            moved = _probabilities(net, info, volume, shift)
            rows.append(_row(scan.name, f"full, grid moved {shift}", moved, base, reference, soft, counts["full"]))
        rows.append(_row(scan.name, "fast", fast_probs, base, reference, soft, counts["fast"]))
        subset, n = _subset_probabilities(net, info, volume, organ)
        rows.append(_row(scan.name, "full, its windows on the organ", subset, base, reference, soft, n))
        for r in rows[-(len(args.shifts) + 3):]:
            print(f"{r['scan']:9s} {r['run']:30s} {r['windows']:3d} windows  Dice vs full {r['dice_vs_full']:.4f}  "
                  f"volume {r['volume_diff_pct']:+6.2f} %  Dice vs reference {r['dice_vs_reference']:.4f}", flush=True)
    print("\nvoxels with probability 0.3-0.7, as a share of the organ's size: "
          + ", ".join(f"{r['scan']} {r['soft_share']:.1%}" for r in rows if r["run"] == "full"))
    paper = _paper_window_counts(info)
    print(f"speed benchmark CT {tuple(paper['ct_shape'])} -> model grid {tuple(paper['model_grid'])}, windows of "
          f"{PAPER_WINDOW}: full {paper['windows']['full']}, fast {paper['windows']['fast']}, "
          f"exact subset {paper['windows']['exact_subset']}")
    out = {
        "benchmark": "window_shift",
        "started_utc": started,
        "model": {"path": str(path), "sha256": info.sha256, "name": info.card.get("name")},
        "patch": list(pre.patch_size),
        "overlap": 0.25,
        "machine": benchlib.machine_info(),
        "rows": rows,
        "speed_benchmark_ct_paper_window": paper,
    }
    benchlib.RESULTS.mkdir(exist_ok=True)
    dest = benchlib.RESULTS / f"{args.name}.json"
    dest.write_text(json.dumps(out, indent=1))
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: ``vnetseg predict`` (``predict_file``) against MONAI's ``sliding_window_inference``.

Both methods do the same whole job on the same CT file with the same model file (network and
weights), patch size, overlap, batch size and Gaussian weighting, each run in a fresh Python
process so that its peak RSS is its own:

* ``monai``: the core's own code for everything but the sliding window (load the model file, read
  the CT, resample to the model grid, window the HU; then resample the foreground probability back
  to the input grid, threshold, keep the largest component, fill holes, quality report, write the
  mask), with ``monai.inferers.sliding_window_inference(mode="gaussian", sigma_scale=0.125)``
  in the middle, predicting the same softmax foreground probability per window.
* ``ours``: ``vnetseg.inference.predict_file`` end to end with default options (CPU), the same
  steps as the ``vnetseg predict`` command without the command-line start-up.
* ``cli`` (optional, ``--methods monai,ours,cli``): the ``python -m vnetseg predict`` command as a
  user runs it, timed from outside (interpreter start and imports included).

Times are wall-clock seconds from the first step (loading the model file) to the written mask;
module imports are not included (except for ``cli``). Each step's time and exact peak RSS are
recorded (see ``benchlib.Timeline``). Peak RSS is the whole process's, imports included
(``rss_before_mb`` says how much was resident before the job started).

Usage:
    python bench/bench_inference.py --quick --preset light          # smoke run, seconds
    python bench/bench_inference.py --preset light                  # full CT, light V-Net
    python bench/bench_inference.py --preset paper --repeats 3      # full CT, paper V-Net (~15 min here)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
from make_ct import DEFAULT_CACHE, make_benchmark_ct

QUICK_SHAPE, QUICK_SPACING = (128, 128, 40), (1.6, 1.6, 3.5)


# ------------------------------------------------------------------------------------ children
def _instrument(tl: benchlib.Timeline, net_time: dict[str, Any]) -> None:
    """Put every step of the core's pipeline into its own timeline span (behaviour unchanged)."""
    import vnetseg.inference as inf
    import vnetseg.io as vio

    inf.load_model = tl.wrap(inf.load_model, "load model")
    vio.read_image = tl.wrap(vio.read_image, "read CT")
    vio.validate_image = tl.wrap(vio.validate_image, "validate CT")
    inf.to_model_grid = tl.wrap(inf.to_model_grid, "resample to model grid")
    inf.window_hu = tl.wrap(inf.window_hu, "window HU")
    inf.to_input_grid = tl.wrap(inf.to_input_grid, "resample back to input grid")
    inf.split_components = tl.wrap(inf.split_components, "postprocess (largest component, holes)")
    inf.fill_holes = tl.wrap(inf.fill_holes, "postprocess (largest component, holes)")
    inf.trim_to_organ_hu = tl.wrap(inf.trim_to_organ_hu, "postprocess (HU trim)")
    inf.grow_native = tl.wrap(inf.grow_native, "postprocess (native growth)")
    inf.drop_thin_appendages = tl.wrap(inf.drop_thin_appendages, "postprocess (appendage cut)")
    inf.quality_report = tl.wrap(inf.quality_report, "quality report")
    vio.write_mask = tl.wrap(vio.write_mask, "write mask")
    inf.sliding_window = tl.wrap(inf.sliding_window, "sliding window")
    inf.conf.probability_on_input_grid = tl.wrap(inf.conf.probability_on_input_grid, "probability map to input grid")
    inf.conf.crop_around = tl.wrap(inf.conf.crop_around, "confidence")
    inf.conf.measure_confidence = tl.wrap(inf.conf.measure_confidence, "confidence")
    vio.write_volume = tl.wrap(vio.write_volume, "write probability map")
    make_predictor = inf.softmax_foreground

    def timed_predictor(model: Any, amp: bool) -> Any:
        run = make_predictor(model, amp)

        def predictor(x: Any) -> Any:
            t = time.perf_counter()
            out = run(x)
            net_time["seconds"] += time.perf_counter() - t
            net_time["windows"] += int(x.shape[0])
            net_time["batch_sizes"].add(int(x.shape[0]))
            return out

        return predictor

    inf.softmax_foreground = timed_predictor


def child_ours(
    ct: str, model: str, out: str, overlap: float, batch: int | None, mode: str | None = None, appendages: bool = True
) -> dict[str, Any]:
    import vnetseg.inference as inf

    net_time: dict[str, Any] = {"seconds": 0.0, "windows": 0, "batch_sizes": set()}
    tl = benchlib.Timeline()
    _instrument(tl, net_time)
    mode = mode or os.environ.get("VNETSEG_BENCH_MODE", "auto")
    kind = os.environ.get("VNETSEG_BENCH_PROBABILITY", "none")  # issue 14: also write the probability map
    options = inf.InferenceOptions(device="cpu", overlap=overlap, batch_size=batch, mode=mode,
                                   probability=None if kind == "none" else kind, appendages=appendages)
    prob_path = None if kind == "none" else out.replace(".nii.gz", "_probability.nii.gz")
    result = inf.predict_file(ct, out, model, options, overwrite=True, probability_path=prob_path)
    res = tl.finish()
    res.update(volume_ml=result.volume_ml, warnings=result.report.warnings, mode=result.mode, notes=result.notes,
               probability=kind, probability_dtype=None if result.probability is None else str(result.probability.dtype))
    return _with_network(res, net_time)


def child_ours_lowmem(ct: str, model: str, out: str, overlap: float, batch: int | None) -> dict[str, Any]:
    """``ours`` with the memory fixes of ``proto_lowmem.py`` applied in this process."""
    import proto_lowmem

    fixes = proto_lowmem.apply()
    res = child_ours(ct, model, out, overlap, batch)
    res["prototype_fixes"] = fixes
    return res


def child_monai(ct: str, model: str, out: str, overlap: float, batch: int | None) -> dict[str, Any]:
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference

    import vnetseg.inference as inf
    import vnetseg.io as vio
    from vnetseg.preprocess import make_grid_map

    net_time: dict[str, Any] = {"seconds": 0.0, "windows": 0, "batch_sizes": set()}
    tl = benchlib.Timeline()
    _instrument(tl, net_time)
    net, info = inf.load_model(model)
    image = vio.read_image(ct, dtype=None)  # as predict_file reads it (stored type); inference_paper.json predates this
    pre = info.preprocessing
    grid = make_grid_map(image.shape, image.affine, pre.target_spacing)
    volume = inf.window_hu(inf.to_model_grid(image.array, grid), pre.hu_window, pre.scale)
    batch = batch or inf.choose_batch_size(net, pre.patch_size, torch.device("cpu"))
    tl.switch("sliding window")
    with torch.inference_mode():
        probs = sliding_window_inference(
            torch.from_numpy(volume)[None, None], pre.patch_size, batch, inf.softmax_foreground(net, False),
            overlap=overlap, mode="gaussian", sigma_scale=0.125, padding_mode="constant", cval=pre.scale[0],
        )[0].numpy()
    del volume
    tl.switch("other")
    value = info.label_values[0]
    labelmap = (inf.to_input_grid(probs[0], grid) > 0.5).astype(np.uint8) * np.uint8(value)
    del probs
    raw = labelmap > 0
    largest, counts = inf.split_components(raw)  # the same clean-up as the core's
    labelmap = np.uint8(value) * inf.fill_holes(largest)
    voxel_ml = vio.Image(labelmap, image.affine).voxel_volume_ml
    report = inf.quality_report(raw, labelmap > 0, voxel_ml, "spleen", raw_components=counts)
    vio.write_mask(out, labelmap, image.affine, inf.segments_of(info), overwrite=True)
    res = tl.finish()
    res.update(volume_ml=report.volume_ml, warnings=report.warnings)
    return _with_network(res, net_time)


def child_cli(ct: str, model: str, out: str, overlap: float, batch: int | None) -> dict[str, Any]:
    import resource
    import subprocess

    cmd = [sys.executable, "-m", "vnetseg", "predict", ct, "-o", out, "--model", model, "--device", "cpu",
           "--overlap", str(overlap), "--overwrite", "--progress", "none"]
    if batch:
        cmd += ["--batch-size", str(batch)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-1500:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return {"seconds": seconds, "peak_rss_mb": peak, "rss_before_mb": None, "peak_exact": True, "steps": {},
            "spans": [], "network_seconds": None, "windows": None, "batch_sizes": []}


def _with_network(res: dict[str, Any], net_time: dict[str, Any]) -> dict[str, Any]:
    res["network_seconds"] = net_time["seconds"]
    res["windows"] = net_time["windows"]
    res["batch_sizes"] = sorted(net_time["batch_sizes"])
    return res


def child_ours_full(ct: str, model: str, out: str, overlap: float, batch: int | None) -> dict[str, Any]:
    """``ours`` in full mode (whole volume at full resolution), whatever ``--mode`` says."""
    return child_ours(ct, model, out, overlap, batch, mode="full")


def child_ours_fast(ct: str, model: str, out: str, overlap: float, batch: int | None) -> dict[str, Any]:
    """``ours`` in fast mode (locator, then the spleen's box): needs a model file with a locator."""
    return child_ours(ct, model, out, overlap, batch, mode="fast")


def child_ours_fast_nocut(ct: str, model: str, out: str, overlap: float, batch: int | None) -> dict[str, Any]:
    """``ours_fast`` without the appendage cut (``appendages=False``): v2.2.0's post-processing, for its cost."""
    return child_ours(ct, model, out, overlap, batch, mode="fast", appendages=False)


CHILDREN = {
    "monai": child_monai,
    "ours": child_ours,
    "ours_full": child_ours_full,
    "ours_fast": child_ours_fast,
    "ours_fast_nocut": child_ours_fast_nocut,
    "ours_lowmem": child_ours_lowmem,
    "cli": child_cli,
}


# ------------------------------------------------------------------------------------ parent
def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Median time and RSS per method, the per-step medians, and the ratios against MONAI."""
    out: dict[str, dict[str, Any]] = {}
    for method, runs in results.items():
        steps: dict[str, float] = {}
        for name in runs[0]["steps"]:
            steps[name] = statistics.median(r["steps"].get(name, {}).get("seconds", 0.0) for r in runs)
        out[method] = {
            "runs": len(runs),
            "median_s": _median(runs, "seconds"),
            "min_s": min(r["seconds"] for r in runs),
            "max_s": max(r["seconds"] for r in runs),
            "median_network_s": _median(runs, "network_seconds"),
            "median_cpu_s": _median(runs, "cpu_seconds"),
            "median_peak_rss_mb": _median(runs, "peak_rss_mb"),
            "median_rss_before_mb": _median(runs, "rss_before_mb"),
            "windows": runs[0].get("windows"),
            "batch_sizes": runs[0].get("batch_sizes"),
            "volume_ml": runs[0].get("volume_ml"),
            "median_step_s": steps,
        }
    base = out.get("monai")
    for summary in out.values():
        if base and base["median_s"]:
            summary["time_ratio_vs_monai"] = summary["median_s"] / base["median_s"]
            summary["speedup_vs_monai"] = base["median_s"] / summary["median_s"]
            summary["rss_ratio_vs_monai"] = summary["median_peak_rss_mb"] / base["median_peak_rss_mb"]
    return out


def mask_agreement(paths: dict[str, Path]) -> dict[str, float]:
    """Dice of every method's final mask against MONAI's (the same job should give the same mask)."""
    import nibabel as nib
    import numpy as np

    if "monai" not in paths:
        return {}
    ref = np.asarray(nib.load(str(paths["monai"])).dataobj) > 0
    out = {}
    for method, path in paths.items():
        if method != "monai" and path.is_file():
            m = np.asarray(nib.load(str(path)).dataobj) > 0
            total = int(ref.sum()) + int(m.sum())
            out[method] = 1.0 if total == 0 else 2.0 * float(np.logical_and(ref, m).sum()) / total
    return out


def print_table(title: str, summary: dict[str, dict[str, Any]]) -> None:
    print(f"\n{title}")
    head = f"{'method':<11} {'median s':>9} {'min-max s':>13} {'network s':>10} {'peak RSS MB':>12} {'time ratio':>11} {'RSS ratio':>10}"
    print(head)
    print("-" * len(head))
    for method, s in summary.items():
        net = f"{s['median_network_s']:.1f}" if s["median_network_s"] is not None else "-"
        print(f"{method:<11} {s['median_s']:>9.1f} {s['min_s']:>6.1f}-{s['max_s']:<6.1f} {net:>10} "
              f"{s['median_peak_rss_mb']:>12.0f} {s.get('time_ratio_vs_monai', float('nan')):>11.2f} "
              f"{s.get('rss_ratio_vs_monai', float('nan')):>10.2f}")
    for method, s in summary.items():
        if s["median_step_s"]:
            steps = ", ".join(f"{k} {v:.2f}" for k, v in s["median_step_s"].items() if v >= 0.005)
            print(f"  {method} steps (median s): {steps}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper", help="V-Net preset of the random-weight model (paper, light, tutorial)")
    ap.add_argument("--model", help="use this model file instead of a random-weight preset model")
    ap.add_argument("--repeats", type=int, default=None, help="runs per method, median reported (default 3; 1 with --quick)")
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=None, help="windows per forward pass (default: the core's choice)")
    ap.add_argument("--shape", type=int, nargs=3, default=None, metavar=("I", "J", "K"), help="default 512 512 120")
    ap.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"), help="default 0.8 0.8 2.5")
    ap.add_argument("--quick", action="store_true", help=f"small CT {QUICK_SHAPE} at {QUICK_SPACING} mm, 1 repeat")
    ap.add_argument("--methods", default="monai,ours", help="comma list of monai, ours, ours_full, ours_fast, ours_fast_nocut (fast without the appendage cut), ours_lowmem (prototype memory fixes), cli")
    ap.add_argument("--name", help="results/<name>.json (default inference_<preset>[_quick])")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE), help="folder for the generated CT and model files")
    ap.add_argument("--mode", default="auto", choices=["auto", "full", "fast"],
                    help="inference mode of ours (auto: fast on CPU when the model file supports it)")
    ap.add_argument("--locator-from", type=Path, help="give the random-weight model this model file's locator (fast mode)")
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. what else ran on the machine)")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--ct", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        res = CHILDREN[args.child](args.ct, args.model, args.out, args.overlap, args.batch)
        print(json.dumps(res, default=float))
        return
    os.environ["VNETSEG_BENCH_MODE"] = args.mode  # children inherit it
    shape = tuple(args.shape or (QUICK_SHAPE if args.quick else (512, 512, 120)))
    spacing = tuple(args.spacing or (QUICK_SPACING if args.quick else (0.8, 0.8, 2.5)))
    repeats = args.repeats or (1 if args.quick else 3)
    cache = Path(args.cache)
    ct = make_benchmark_ct(shape, spacing, cache)  # type: ignore[arg-type]
    model = Path(args.model) if args.model else benchlib.make_model_file(args.preset, cache, locator_from=args.locator_from)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(CHILDREN)
    if unknown:
        raise SystemExit(f"--methods: unknown method(s) {sorted(unknown)}; use {', '.join(CHILDREN)}")
    name = args.name or f"inference_{args.preset if not args.model else Path(args.model).stem}{'_quick' if args.quick else ''}"
    name += "_fast" if "ours_fast" in methods and not args.name else ""
    outdir = cache / f"out_{name}"
    outdir.mkdir(parents=True, exist_ok=True)
    load_before = benchlib.load_average()
    machine = benchlib.machine_info()  # at the start: the git commit of the code that runs
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    masks = {m: outdir / f"{m}.nii.gz" for m in methods}
    from vnetseg.checkpoint import read_model_info

    info = read_model_info(model)[0]
    meta = {
        "benchmark": "inference",
        "started_utc": started,
        "ct": {"path": str(ct), "shape": shape, "spacing_mm": spacing,
               "source": "real (resampled example_ct)" if "_real_" in ct.name else "synthetic"},
        "model": {"path": str(model), "preset": None if args.model else args.preset, "card": info.card,
                  "config": info.config.to_dict()},
        "settings": {"overlap": args.overlap, "patch": list(info.preprocessing.patch_size),
                     "target_spacing_mm": list(info.preprocessing.target_spacing), "batch": args.batch or "core default",
                     "repeats": repeats, "device": "cpu", "gaussian_sigma_scale": 0.125, "ours_mode": args.mode},
        "machine": machine,
        "load_average_before": load_before,
        "note": args.note,
    }
    path = benchlib.RESULTS / f"{name}.json"
    for r in range(repeats):  # interleaved, so slow drifts in machine load hit every method alike
        for m in methods:
            cmd = [str(Path(__file__).resolve()), "--child", m, "--ct", str(ct), "--model", str(model),
                   "--out", str(masks[m]), "--overlap", str(args.overlap)]
            if args.batch:
                cmd += ["--batch", str(args.batch)]
            res = benchlib.run_child(cmd)
            res["load_average_after"] = benchlib.load_average()
            results[m].append(res)
            print(f"run {r + 1}/{repeats} {m:<6} {res['seconds']:7.1f} s (cpu {res.get('cpu_seconds') or 0:6.1f} s)  peak "
                  f"RSS {res['peak_rss_mb']:6.0f} MB  load {res['load_average_after']}", flush=True)
            done = {k: v for k, v in results.items() if v}
            complete = r == repeats - 1 and m == methods[-1]
            data = {**meta, "complete": complete, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "load_average_after": benchlib.load_average(), "summary": summarise(done), "runs": done}
            if complete:
                data["mask_dice_vs_monai"] = mask_agreement(masks)
            benchlib.write_json(path, data)  # after every run: a cut-short benchmark still leaves its numbers
    print_table(f"{name}: CT {shape} at {spacing} mm, {meta['ct']['source']}; model {model.name}; overlap "
                f"{args.overlap}; {repeats} run(s) each; load {load_before} -> {data['load_average_after']}",
                data["summary"])
    print(f"mask Dice vs MONAI: {data['mask_dice_vs_monai']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

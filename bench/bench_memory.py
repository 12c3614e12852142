"""Memory check: peak RSS of ``predict_file`` on a 512x512x600 CT (CPU) against 4x its float32 size.

Issue 2 asks that a 512x512x600 CT never needs more than about 4x its own float32 size in RAM on
CPU (512*512*600*4 B = 600 MiB, so about 2400 MiB). This runs ``vnetseg.inference.predict_file``
once in a fresh process on such a CT (the real example CT resampled, the body mirrored in z
beyond the scan, see ``make_ct.py``) with a random-weight model (light preset by default: the
memory of the pipeline around the network is what is checked) and records the exact peak RSS
of every step (``benchlib.Timeline``). It prints the per-step table and writes
``results/<name>.json``.

Usage:
    python bench/bench_memory.py                              # 512x512x600 at 0.8x0.8x2.5 mm, light
    python bench/bench_memory.py --spacing 0.8 0.8 0.6        # thin slices: a smaller model grid
    python bench/bench_memory.py --probability float32        # issue 14: also make and write the probability map

``--probability none`` (the default) is the run without a map: comparing it with ``float32`` and
``uint8`` shows what the map costs, and that nothing is spent on it when it is not asked for.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
from make_ct import DEFAULT_CACHE, make_benchmark_ct

MIB = 1024 * 1024


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 512, 600), metavar=("I", "J", "K"))
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.5), metavar=("SX", "SY", "SZ"))
    ap.add_argument("--preset", default="light")
    ap.add_argument("--model", help="a model file instead of the random-weight preset model")
    ap.add_argument("--method", default="ours", choices=["ours", "ours_lowmem"],
                    help="ours: the core as it is; ours_lowmem: with the prototype fixes of proto_lowmem.py")
    ap.add_argument("--factor", type=float, default=4.0, help="allowed peak RSS as a multiple of the CT's float32 size")
    ap.add_argument("--name", help="results/<name>.json (default memory_<I>x<J>x<K>_<SZ>mm_<preset>)")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE))
    ap.add_argument("--note", default="")
    ap.add_argument("--probability", default="none", choices=["none", "float32", "uint8"],
                    help="also make the spleen probability map on the input grid and write it (issue 14)")
    args = ap.parse_args(argv)
    shape, spacing = tuple(args.shape), tuple(args.spacing)
    cache = Path(args.cache)
    ct = make_benchmark_ct(shape, spacing, cache)  # type: ignore[arg-type]
    model = Path(args.model) if args.model else benchlib.make_model_file(args.preset, cache)
    name = args.name or (f"memory_{'x'.join(map(str, shape))}_{spacing[2]:g}mm_{args.preset if not args.model else model.stem}"
                         f"{'' if args.method == 'ours' else '_' + args.method}"
                         f"{'' if args.probability == 'none' else '_probability_' + args.probability}")
    out = cache / f"out_{name}.nii.gz"
    load_before = benchlib.load_average()
    machine = benchlib.machine_info()  # at the start: the git commit of the code that runs
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    os.environ["VNETSEG_BENCH_PROBABILITY"] = args.probability  # the child reads it
    res = benchlib.run_child([str(Path(__file__).resolve().parent / "bench_inference.py"), "--child", args.method,
                              "--ct", str(ct), "--model", str(model), "--out", str(out), "--overlap", "0.25"])
    float32_mb = shape[0] * shape[1] * shape[2] * 4 / MIB
    limit = args.factor * float32_mb
    job_peak = res["peak_rss_mb"] - res["rss_before_mb"]
    data = {
        "benchmark": "memory",
        "started_utc": started,
        "ct": {"path": str(ct), "shape": shape, "spacing_mm": spacing},
        "model": str(model),
        "method": args.method,
        "probability": args.probability,
        "probability_dtype": res.get("probability_dtype"),
        "prototype_fixes": res.get("prototype_fixes"),
        "ct_float32_mb": float32_mb,
        "limit_mb": limit,
        "peak_rss_mb": res["peak_rss_mb"],
        "rss_before_job_mb": res["rss_before_mb"],
        "job_peak_above_start_mb": job_peak,
        "peak_over_float32": res["peak_rss_mb"] / float32_mb,
        "within_limit": res["peak_rss_mb"] <= limit,
        "seconds": res["seconds"],
        "windows": res["windows"],
        "batch_sizes": res["batch_sizes"],
        "machine": machine,
        "load_average_before": load_before,
        "load_average_after": benchlib.load_average(),
        "note": args.note,
        "steps": res["steps"],
        "spans": res["spans"],
    }
    path = benchlib.RESULTS / f"{name}.json"
    benchlib.write_json(path, data)
    print(f"{name}: CT {shape} at {spacing} mm (float32 {float32_mb:.0f} MiB, limit {args.factor:g}x = {limit:.0f} MiB)")
    print(f"{'step':<42} {'seconds':>8} {'peak RSS MiB':>13} {'RSS after MiB':>14}")
    for span in res["spans"]:
        if span["seconds"] >= 0.01 or span["step"] != "other":
            peak = f"{span['peak_rss_mb']:.0f}" if span["peak_rss_mb"] is not None else "-"
            print(f"{span['step']:<42} {span['seconds']:>8.2f} {peak:>13} {span['rss_end_mb']:>14.0f}")
    verdict = "within" if data["within_limit"] else "OVER"
    print(f"peak RSS {res['peak_rss_mb']:.0f} MiB = {data['peak_over_float32']:.2f}x the CT's float32 size "
          f"({verdict} the {args.factor:g}x limit); {res['rss_before_mb']:.0f} MiB were resident before the job "
          f"(Python, torch, model); {res['seconds']:.0f} s, {res['windows']} windows")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Where does the time go? Two profiles of our inference path.

``--mode pipeline``: cProfile of one ``predict_file`` run on the benchmark CT, the functions
grouped into network (convolutions and the rest of the forward pass), resampling, sliding-window
bookkeeping, post-processing, reading and writing. The non-network steps do not depend on the
network, so the light preset (default) gives their cost at the real CT size in a fraction of the
paper preset's time; the network share at the paper size comes from ``bench_inference.py``.

``--mode onednn``: oneDNN's verbose log of one forward pass: convolution kernels vs the layout
reorders around them (plain <-> blocked tensors, weights repacked on every call).

``--mode compile``: eager vs ``torch.compile`` of one window, interleaved (needs a C++ compiler).

``--mode network``: the forward pass of one batch of 96^3 windows (paper preset by default):
FLOPs, achieved GFLOP/s, the operators by self CPU time (``torch.profiler``), and measured
variants that keep the arithmetic the same (batch 1 vs 2, channels-last-3d, a frozen TorchScript
graph) or reduce its precision (bfloat16 autocast, with the change in foreground probability).

Usage:
    python bench/profile_inference.py --mode pipeline --preset light
    python bench/profile_inference.py --mode network --preset paper
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
from make_ct import DEFAULT_CACHE, make_benchmark_ct

# (category, substrings of "file:function" of a profiled leaf), first match wins
CATEGORIES = [
    ("network: convolutions", ("conv3d", "conv_transpose3d", "convolution")),
    ("network: other ops (norm, PReLU, add, cat, softmax)", ("prelu", "torch.cat", "softmax", "instance_norm",
                                                            "batch_norm", "'repeat'", "torch/nn/", "torch/_",
                                                            "model.py:forward")),
    ("input validation (io.validate_image)", ("_all_finite", "validate_image")),
    ("resampling (scipy affine_transform)", ("affine_transform", "geometric_transform", "zoom_shift")),
    ("post-processing (label, fill holes, report)", ("label", "binary_fill_holes", "binary_erosion", "find_objects",
                                                    "bincount", "postprocess.py")),
    ("read (nibabel, gzip)", ("nibabel", "gzip", "zlib", "decompress", "read_image", "_read")),
    ("write (nibabel, gzip)", ("compress", "write", "save", "tobytes")),
    ("sliding-window bookkeeping (numpy)", ("inference.py", "numpy", "ndarray", "'stack'", "'copyto'", "'pad'")),
]


def categorise(stats: pstats.Stats) -> tuple[dict[str, float], list[tuple[float, str]]]:
    """Sum the self time of every profiled function into the categories above.

    A function is matched by its own name first, then by its direct callers' names (so that a
    numpy method called by ``_all_finite`` counts as validation); the generic numpy/bookkeeping
    category (the last) only when no specific one matches.
    """
    totals: dict[str, float] = {}
    rows = []
    for (filename, _line, func), (_cc, _nc, tottime, _ct, callers) in stats.stats.items():  # type: ignore[attr-defined]
        own = f"{filename}:{func}".lower()
        by_caller = " ".join(f"{f}:{fn}" for (f, _l, fn) in callers).lower()
        cat = "other (python, glue)"
        for text in (own, by_caller):  # specific categories by own name, then by caller, then the generic one
            found = next((c for c, keys in CATEGORIES[:-1] if any(k in text for k in keys)), None)
            if found:
                cat = found
                break
        else:
            if any(k in own + " " + by_caller for k in CATEGORIES[-1][1]):
                cat = CATEGORIES[-1][0]
        totals[cat] = totals.get(cat, 0.0) + tottime
        rows.append((tottime, f"{cat[:28]:<28} {Path(filename).name}:{func}"))
    return totals, sorted(rows, reverse=True)


def profile_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    import vnetseg.inference as inf

    cache = Path(args.cache)
    ct = make_benchmark_ct(tuple(args.shape), tuple(args.spacing), cache)  # type: ignore[arg-type]
    model = benchlib.make_model_file(args.preset, cache)
    out = cache / "out_profile.nii.gz"
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    inf.predict_file(ct, out, model, inf.InferenceOptions(device="cpu", overlap=0.25), overwrite=True)
    prof.disable()
    wall = time.perf_counter() - t
    prof.dump_stats(str(cache / f"profile_pipeline_{args.preset}.prof"))  # for snakeviz / pstats
    totals, rows = categorise(pstats.Stats(prof))
    print(f"pipeline profile: {args.preset} preset, CT {tuple(args.shape)} at {tuple(args.spacing)} mm, {wall:.1f} s wall")
    for cat, sec in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:<52} {sec:8.2f} s  {100 * sec / wall:5.1f} %")
    print("top functions by self time:")
    for sec, name in rows[:25]:
        print(f"  {sec:8.2f} s  {name}")
    return {"mode": "pipeline", "preset": args.preset, "ct_shape": args.shape, "spacing": args.spacing, "wall_s": wall,
            "categories_s": totals, "top_self_s": [[round(s, 4), n] for s, n in rows[:40]]}


def _time_forward(fn: Any, x: Any, reps: int) -> float:
    import torch

    with torch.inference_mode():
        fn(x)  # warm-up (oneDNN primitive creation)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def profile_network(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from vnetseg.model import build_model

    torch.manual_seed(0)
    net = build_model(args.preset).eval()
    p = args.patch
    x1 = torch.rand(1, 1, p, p, p)
    result: dict[str, Any] = {"mode": "network", "preset": args.preset, "patch": p, "threads": torch.get_num_threads()}
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            net(x1)
        flops = counter.get_total_flops()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            net(x1)
    result["gflop_per_window"] = flops / 1e9
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    print(f"network profile: {args.preset} preset, one {p}^3 window, {flops / 1e9:.0f} GFLOP (multiply+add counted as 2)")
    print(table)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    result["ops_self_ms"] = {e.key: round(e.self_cpu_time_total / 1000.0, 1) for e in ops}
    variants: dict[str, float] = {}

    def record(label: str, seconds_per_window: float) -> None:
        variants[label] = seconds_per_window
        print(f"  {label:<44} {seconds_per_window:6.2f} s/window  {flops / 1e9 / seconds_per_window:6.0f} GFLOP/s", flush=True)

    result["forward_peak_rss_above_start_mb"] = {}
    for b in (1, 2):
        xb = torch.rand(b, 1, p, p, p)
        with torch.inference_mode():
            net(xb)  # warm-up: the allocator's caches are part of steady state
            start = benchlib.proc_status_mb().get("VmRSS", 0.0)
            benchlib.reset_peak()
            net(xb)
            peak = benchlib.proc_status_mb().get("VmHWM", float("nan"))
        result["forward_peak_rss_above_start_mb"][b] = peak - start
        print(f"  batch {b}: forward pass peak RSS {peak - start:.0f} MiB above the resident set before it")
    print("variants (median of", args.reps, "after a warm-up):")
    record("fp32, batch 1", _time_forward(net, x1, args.reps))
    x2 = torch.rand(2, 1, p, p, p)
    record("fp32, batch 2", _time_forward(net, x2, args.reps) / 2)
    cl = build_model(args.preset).eval()
    cl.load_state_dict(net.state_dict())
    cl = cl.to(memory_format=torch.channels_last_3d)
    record("fp32, channels_last_3d, batch 1", _time_forward(cl, x1.to(memory_format=torch.channels_last_3d), args.reps))
    with torch.inference_mode():
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(net, x1)))
    record("fp32, TorchScript frozen + optimize_for_inference", _time_forward(frozen, x1, args.reps))

    def bf16(x: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net(x)

    record("bfloat16 autocast, batch 1", _time_forward(bf16, x1, args.reps))
    with torch.inference_mode():
        ref = torch.softmax(net(x1), 1)[:, 1]
        low = torch.softmax(bf16(x1).float(), 1)[:, 1]
    diff = (ref - low).abs()
    result["bf16_prob_abs_diff"] = {"max": float(diff.max()), "mean": float(diff.mean()),
                                    "label_flips_fraction": float(((ref > 0.5) != (low > 0.5)).float().mean())}
    print(f"  bfloat16 vs fp32 foreground probability: {result['bf16_prob_abs_diff']} (random weights)")
    result["seconds_per_window"] = variants
    return result


def profile_onednn(args: argparse.Namespace) -> dict[str, Any]:
    """oneDNN's own log of one forward pass: time in convolution kernels vs layout reorders."""
    import collections
    import os
    import subprocess

    code = (
        "import torch, time\n"
        "from vnetseg.model import build_model\n"
        f"torch.manual_seed(0); net = build_model({args.preset!r}).eval(); x = torch.rand(1, 1, {args.patch}, {args.patch}, {args.patch})\n"
        "with torch.inference_mode():\n"
        "    net(x); print('MARK', flush=True); t = time.perf_counter(); net(x)\n"
        "    print('FORWARD', time.perf_counter() - t, flush=True)\n"
    )
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    agg: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    forward = float("nan")
    for line in proc.stdout.split("MARK", 1)[1].splitlines():
        if line.startswith("onednn_verbose,v1,primitive,exec"):
            f = line.split(",")
            agg[f"{f[5]} {f[6]}"][0] += 1
            agg[f"{f[5]} {f[6]}"][1] += float(f[-1]) / 1000.0
        elif line.startswith("FORWARD"):
            forward = float(line.split()[1])
    print(f"oneDNN primitives in one {args.preset} forward pass ({args.patch}^3, batch 1): {forward:.2f} s wall")
    for key, (n, sec) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        print(f"  {key:<60} {int(n):4d} calls {sec:7.2f} s {100 * sec / forward:5.1f} %")
    conv = sum(v[1] for k, v in agg.items() if "convolution" in k)
    reorder = sum(v[1] for k, v in agg.items() if k.startswith("reorder"))
    print(f"  convolutions {conv:.2f} s ({100 * conv / forward:.0f} %), layout reorders {reorder:.2f} s "
          f"({100 * reorder / forward:.0f} %), outside oneDNN (PReLU, add, cat, ...) {forward - conv - reorder:.2f} s")
    return {"mode": "onednn", "preset": args.preset, "patch": args.patch, "forward_s": forward,
            "convolution_s": conv, "reorder_s": reorder, "primitives": {k: {"calls": int(v[0]), "seconds": v[1]} for k, v in agg.items()}}


def profile_compile(args: argparse.Namespace) -> dict[str, Any]:
    """Eager vs ``torch.compile`` (inductor: fused pointwise ops, prepacked weights), interleaved."""
    import torch

    from vnetseg.model import build_model

    torch.manual_seed(0)
    net = build_model(args.preset).eval()
    x = torch.rand(1, 1, args.patch, args.patch, args.patch)
    with torch.inference_mode():
        ref = net(x)
        t = time.perf_counter()
        compiled = torch.compile(net, dynamic=False)
        out = compiled(x)
        compile_s = time.perf_counter() - t
        diff = float((out - ref).abs().max())
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(args.reps):
            for name, fn in (("eager", net), ("compiled", compiled)):
                t = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch.compile, {args.preset}, one {args.patch}^3 window: first call (compile) {compile_s:.1f} s; "
          f"eager {med['eager']:.2f} s, compiled {med['compiled']:.2f} s per window (median of {args.reps}, interleaved); "
          f"max |logit diff| {diff:.2e}")
    return {"mode": "compile", "preset": args.preset, "patch": args.patch, "compile_s": compile_s,
            "seconds": times, "median_s": med, "max_abs_logit_diff": diff}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["pipeline", "network", "onednn", "compile"], default="pipeline")
    ap.add_argument("--preset", default=None, help="default: light for pipeline, paper for network")
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 512, 120))
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.5))
    ap.add_argument("--patch", type=int, default=96)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--cache", default=str(DEFAULT_CACHE))
    ap.add_argument("--name", help="results/<name>.json (default profile_<mode>_<preset>)")
    args = ap.parse_args(argv)
    args.preset = args.preset or ("light" if args.mode == "pipeline" else "paper")
    load_before = benchlib.load_average()
    res = {"pipeline": profile_pipeline, "network": profile_network, "onednn": profile_onednn,
           "compile": profile_compile}[args.mode](args)
    res.update(machine=benchlib.machine_info(), load_average_before=load_before, load_average_after=benchlib.load_average())
    path = benchlib.RESULTS / f"{args.name or f'profile_{args.mode}_{args.preset}'}.json"
    benchlib.write_json(path, res)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

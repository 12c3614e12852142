"""Print the results JSON files of the benchmarks as Markdown tables (for bench/README.md).

Usage:
    python bench/report.py                       # every bench/results/*.json
    python bench/report.py bench/results/inference_paper.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def inference_table(d: dict[str, Any]) -> str:
    ct, st, m = d["ct"], d["settings"], d["machine"]
    lines = [
        (
            f"**{d['model']['preset'] or Path(d['model']['path']).name}** V-Net, CT {tuple(ct['shape'])} at "
            f"{tuple(ct['spacing_mm'])} mm ({ct['source']}), patch {st['patch']}, overlap {st['overlap']}, "
            f"{st['repeats']} runs per method (interleaved), {m['cpu']} ({m['usable_cpus']} cores, "
            f"torch {m['torch']}, {m['torch_threads']} threads), core {m['git_commit']}, {d['started_utc']}; "
            f"load average {d['load_average_before']} -> {d['load_average_after']}."
        ),
        "",
        (
            "| method | median s | min s | max s | CPU s (median) | network s (median) | windows x batch "
            "| peak RSS MiB (median) | RSS before job MiB | time vs MONAI | peak RSS vs MONAI |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, s in d["summary"].items():
        net = f"{s['median_network_s']:.1f}" if s.get("median_network_s") is not None else "-"
        wins = f"{s['windows']} x {','.join(map(str, s['batch_sizes']))}" if s.get("windows") else "-"
        cpu = [r.get("cpu_seconds") for r in d["runs"][method] if r.get("cpu_seconds") is not None]
        lines.append(
            f"| {method} | {s['median_s']:.1f} | {s['min_s']:.1f} | {s['max_s']:.1f} | "
            f"{_num(statistics.median(cpu)) if cpu else '-'} | {net} | {wins} | "
            f"{s['median_peak_rss_mb']:.0f} | {_num(s.get('median_rss_before_mb'))} | {s.get('time_ratio_vs_monai', float('nan')):.2f} | "
            f"{s.get('rss_ratio_vs_monai', float('nan')):.2f} |"
        )
    steps: list[str] = []  # pipeline order, as first seen
    for s in d["summary"].values():
        steps += [k for k in s["median_step_s"] if k not in steps and k != "end"]
    if steps:
        methods = list(d["summary"])
        lines += ["", "Median seconds per step:", "", "| step | " + " | ".join(methods) + " |",
                  "|---|" + "---:|" * len(methods)]
        for step in steps:
            vals = [d["summary"][mm]["median_step_s"].get(step) for mm in methods]
            lines.append(f"| {step} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    if d.get("mask_dice_vs_monai"):
        lines += ["", "Dice of the final mask vs MONAI's: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in d["mask_dice_vs_monai"].items())]
    return "\n".join(lines)


def memory_table(d: dict[str, Any]) -> str:
    lines = [
        (
            f"CT {tuple(d['ct']['shape'])} at {tuple(d['ct']['spacing_mm'])} mm, method `{d.get('method', 'ours')}`, "
            f"model {Path(d['model']).name}, core {d['machine']['git_commit']}: **peak RSS {d['peak_rss_mb']:.0f} MiB "
            f"= {d['peak_over_float32']:.2f}x** the CT's float32 size ({d['ct_float32_mb']:.0f} MiB; limit "
            f"{d['limit_mb']:.0f} MiB, {'within' if d['within_limit'] else 'OVER'}); {d['rss_before_job_mb']:.0f} MiB "
            f"resident before the job; {d['windows']} windows, {d['seconds']:.0f} s."
        ),
        "",
        "| step | seconds | peak RSS MiB | RSS after MiB |",
        "|---|---:|---:|---:|",
    ]
    for span in d["spans"]:
        if span["step"] == "end" or (span["step"] == "other" and span["seconds"] < 0.05):
            continue
        peak = "-" if span["peak_rss_mb"] is None else f"{span['peak_rss_mb']:.0f}"
        lines.append(f"| {span['step']} | {span['seconds']:.2f} | {peak} | {span['rss_end_mb']:.0f} |")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    files = [Path(p) for p in paths] or sorted(RESULTS.glob("*.json"))
    for path in files:
        d = json.loads(path.read_text())
        kind = d.get("benchmark")
        if kind == "inference":
            print(f"### {path.stem}\n\n{inference_table(d)}\n")
        elif kind == "memory":
            print(f"### {path.stem}\n\n{memory_table(d)}\n")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Shared pieces of the benchmarks: machine description, model files, and a per-step time/memory timeline.

Memory is measured from the kernel's own counters for the process (Linux ``/proc/self/status``):
``VmRSS`` (resident now) and ``VmHWM`` (peak resident since the last reset). Writing ``5`` to
``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS, so the :class:`Timeline` gets the
exact peak of every step, not a sampled one. Where that reset is not allowed the timeline falls
back to the process peak (``ru_maxrss``) and leaves the per-step peaks empty.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
MB = 1024 * 1024


# ------------------------------------------------------------------------------------ memory
def proc_status_mb() -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` of this process in MiB (empty where /proc is missing)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":")
                    out[key] = int(value.split()[0]) / 1024.0
    except OSError:
        pass
    return out


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def ru_maxrss_mb() -> float:
    """Peak RSS of this process in MiB as ``getrusage`` reports it (KiB on Linux, bytes on macOS)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / MB if sys.platform == "darwin" else value / 1024.0


class Timeline:
    """Contiguous named spans of wall time, each with its exact peak RSS.

    ``switch(name)`` closes the running span (its time and peak RSS) and opens ``name``;
    ``wrap(fn, name)`` makes ``fn`` run in its own span and return to ``"other"`` afterwards.
    Wrap only functions that do not call each other (spans do not nest).
    """

    def __init__(self) -> None:
        self.exact = reset_peak()
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self.rss_start_mb = proc_status_mb().get("VmRSS", float("nan"))
        self.spans: list[dict[str, Any]] = []
        self._name = "other"
        self._start = self.t0

    def switch(self, name: str) -> None:
        now = time.perf_counter()
        status = proc_status_mb()
        peak = status.get("VmHWM") if self.exact else None
        self.spans.append({"step": self._name, "start_s": round(self._start - self.t0, 4),
                           "seconds": now - self._start, "peak_rss_mb": peak, "rss_end_mb": status.get("VmRSS")})
        if self.exact:
            reset_peak()
        self._name, self._start = name, time.perf_counter()

    def wrap(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.switch(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.switch("other")

        wrapped.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapped

    def finish(self) -> dict[str, Any]:
        """Close the last span; return total seconds, peak RSS and per-step sums (seconds, max peak)."""
        self.switch("end")
        steps: dict[str, dict[str, Any]] = {}
        for span in self.spans:
            if span["seconds"] < 1e-6 and span["step"] == "other":
                continue
            s = steps.setdefault(span["step"], {"seconds": 0.0, "peak_rss_mb": None, "calls": 0})
            s["seconds"] += span["seconds"]
            s["calls"] += 1
            if span["peak_rss_mb"] is not None:
                s["peak_rss_mb"] = max(s["peak_rss_mb"] or 0.0, span["peak_rss_mb"])
        peaks = [s["peak_rss_mb"] for s in self.spans if s["peak_rss_mb"] is not None]
        peak = max(peaks) if peaks else ru_maxrss_mb()
        return {"seconds": sum(s["seconds"] for s in self.spans), "cpu_seconds": time.process_time() - self.cpu0,
                "peak_rss_mb": peak,
                "rss_before_mb": self.rss_start_mb, "peak_exact": self.exact, "steps": steps, "spans": self.spans}


# ------------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, library versions and thread settings of this machine."""
    import numpy as np
    import scipy
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        info["monai"] = None
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gb"] = round(int(f.readline().split()[1]) / 1024**2, 1)
    except OSError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "VNetSegmentation/vnetseg"],
                               capture_output=True, text=True, check=True).stdout.strip()
        info["core_uncommitted_changes"] = bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


# ------------------------------------------------------------------------------------ models
def make_model_file(
    preset_name: str, cache_dir: Path, patch: int = 96, seed: int = 0, locator_from: Path | None = None
) -> Path:
    """A random-weight V-Net of ``preset_name`` saved as a real model file (cached by preset/patch/seed).

    With ``locator_from``, the file also carries that model file's (trained) locator, so fast mode
    runs the real coarse pass and then this network on the spleen's box.
    """
    import torch

    from vnetseg.checkpoint import ModelInfo, Preprocessing, load_model, save_model
    from vnetseg.model import build_model, preset

    suffix = f"_locator_{Path(locator_from).stem}" if locator_from else ""
    path = Path(cache_dir) / f"model_{preset_name}_p{patch}_seed{seed}{suffix}.pt"
    if path.is_file():
        return path
    locator = load_model(locator_from)[1].locator if locator_from else None
    if locator_from and locator is None:
        raise SystemExit(f"{locator_from} carries no locator")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = preset(preset_name)
    info = ModelInfo(cfg, Preprocessing(patch_size=(patch,) * 3),
                     card={"name": f"random-weight {preset_name} V-Net for benchmarks", "trained": False, "seed": seed})
    save_model(path, build_model(cfg), info, locator=locator)
    return path


# ------------------------------------------------------------------------------------ children
def run_child(args: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python <args>`` in a fresh process; its last stdout line must be a JSON object."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "VNetSegmentation"), str(BENCH), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {args} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"benchmark child {args} printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def write_result(name: str, benchmark: str, started_utc: str, settings: dict[str, Any], body: dict[str, Any],
                 note: str = "") -> Path:
    """Write ``results/<name>.json``: the benchmark's name, start and end (UTC), settings, ``body``'s keys
    (rows, summary, model digest...), this machine and the note; print and return its path."""
    out = {
        "benchmark": benchmark,
        "started_utc": started_utc,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": settings,
        **body,
        "machine": machine_info(),
        "note": note,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(out, indent=1, default=float) + "\n")
    print(f"wrote {path}")
    return path

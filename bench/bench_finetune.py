"""How long does ``python -m training.finetune`` take with its defaults, and what does it do to the scores?

Builds an MSD folder of real CTs with independent spleen references from ``../shared/data/ct`` (the
three TCIA patients P3-P5, semi-automatic references; see that folder's README), fine-tunes the
shipped model on some of them and scores base and new model on a held-out one, timing each phase
(checks, base scores, preprocessing, main steps, locator steps, new scores, writing) from the
run's own progress events. Prints a table and writes JSON to ``bench/results/``.

Usage::

    python bench/bench_finetune.py                          # defaults, held out: P5 (lidc_idri_0001)
    python bench/bench_finetune.py --threads 2 --val p3_cptac --steps 100
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, RESULTS, load_average, machine_info, write_json

sys.path[:0] = [str(REPO), str(REPO / "VNetSegmentation")]
from training.finetune import FinetuneOptions, finetune
from vnetseg.registry import default_model

CASES = {  # case name -> (CT file, spleen reference file) in ../shared/data/ct
    "p3_cptac": ("cptac_lscc_c3n00247_ct.nii.gz", "cptac_lscc_c3n00247_spleen_ref.nii.gz"),
    "p4_acrin": ("acrin_flt_breast_001_ct.nii.gz", "acrin_flt_breast_001_spleen_ref.nii.gz"),
    "p5_lidc": ("lidc_idri_0001_ct.nii.gz", "lidc_idri_0001_spleen_ref.nii.gz"),
}


def make_folder(ct_dir: Path, root: Path) -> Path:
    """An MSD folder whose cases are symbolic links to the shared CTs and references."""
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    training = []
    for name, (image, label) in CASES.items():
        (root / "imagesTr" / f"{name}.nii.gz").symlink_to(ct_dir / image)
        (root / "labelsTr" / f"{name}.nii.gz").symlink_to(ct_dir / label)
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta = {"name": "TCIA spleen references", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
            "numTraining": len(training), "training": training}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ct-dir", type=Path, default=REPO.parent / "shared" / "data" / "ct")
    p.add_argument("--val", default="p5_lidc", choices=sorted(CASES), help="the held-out case")
    p.add_argument("--steps", type=int, help="main steps (default: the command's default)")
    p.add_argument("--locator-steps", type=int, help="locator steps (default: the command's default)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--name", default="finetune_shipped")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = default_model()
    if base is None or not (args.ct_dir / CASES["p3_cptac"][0]).is_file():
        print("needs the shipped model and the TCIA CTs in ../shared/data/ct", file=sys.stderr)
        return 2
    marks: list[tuple[float, str]] = []

    def emit(event: dict) -> None:
        phase = str(event.get("phase", ""))
        if event.get("event") == "progress" and (not marks or marks[-1][1] != phase):
            marks.append((time.perf_counter(), phase))

    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        data = make_folder(args.ct_dir, Path(tmp) / "data")
        changes = {k: v for k, v in (("steps", args.steps), ("locator_steps", args.locator_steps)) if v is not None}
        opts = FinetuneOptions(base.path, data, Path(tmp) / "new.pt", val_cases=(args.val,), device="cpu", **changes)
        started = time.perf_counter()
        result = finetune(opts, emit)
        total = time.perf_counter() - started
    ends = [t for t, _ in marks[1:]] + [started + total]
    phases: dict[str, float] = {}
    for (t, name), end in zip(marks, ends):
        phases[name] = phases.get(name, 0.0) + end - t
    table = result.comparison.table()
    print(f"fine-tune of {base.name}: {opts.steps} main + {result.locator_steps} locator steps, "
          f"{args.threads} thread(s), {total / 60:.1f} min")
    print("\n".join(f"  {name:<10} {seconds:7.1f} s" for name, seconds in phases.items()))
    print(f"  {phases.get('main', 0.0) / opts.steps:.2f} s per main step (load average {load_average()})")
    print(table)
    out = RESULTS / f"{args.name}.json"
    write_json(out, {"machine": machine_info(), "load_average_after": load_average(), "base_model": base.name, "base_sha256": base.sha256,
                     "threads": args.threads, "steps": opts.steps, "locator_steps": result.locator_steps,
                     "train_cases": result.train_cases, "val_cases": result.val_cases, "seconds": total,
                     "phase_seconds": phases,
                     "seconds_per_main_step": phases.get("main", 0.0) / opts.steps,
                     "seconds_per_locator_step": phases.get("locator", 0.0) / max(result.locator_steps, 1),
                     "installed": result.installed, "scores": result.comparison.to_dict(),
                     "table": table})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The main job, end to end: segment the spleen in a real CT and show the result.

    python3 run.py demo                 # real CTs from ../shared/data/ct (or VNETSEG_CT_DIR)
    python3 run.py demo path/to/ct.nii.gz [more CTs or DICOM folders]

For each CT it writes, under ``demo_output/``: the mask (``<case>_spleen.nii.gz``), a PNG overlay
of axial, coronal and sagittal slices, and prints the spleen volume in mL, the time and any
quality warnings. It uses the model shipped with vnetseg. If no shipped model is installed, it
says so and does real work anyway: it makes a synthetic MSD-layout task, trains a small V-Net
on it for a minute or two, and segments a held-out phantom and the given CTs with that model,
naming it for what it is (a toy model: its masks on real CT are not meant to be right).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo_output"


def default_inputs() -> list[Path]:
    ct_dir = Path(os.environ.get("VNETSEG_CT_DIR", ROOT.parent / "shared" / "data" / "ct"))
    found = [ct_dir / "example_ct_sm.nii.gz", ct_dir / "example_ct_dicom"]
    return [p for p in found if p.exists()]


def train_toy_model() -> tuple[Path, list[Path]]:
    """Synthetic task + about two minutes of CPU training; returns (model file, held-out phantom)."""
    sys.path.insert(0, str(ROOT))
    from training.config import train_preset
    from training.engine import TrainOptions, train
    from training.synthetic import write_synthetic_task

    task = write_synthetic_task(OUT / "synthetic_task", cases=10, seed=0)
    print(f"wrote a synthetic MSD task with 10 phantoms to {task}", flush=True)
    print("training a small V-Net on it (CPU, about two minutes)...", flush=True)
    result = train(TrainOptions(data=task, out=OUT / "toy_run", fold=0, config=train_preset("synthetic")))
    model = result.fold_dir / "model_best.pt"
    held_out = sorted((task / "imagesTr").glob("*.nii.gz"))[-1:]
    print(f"toy model: validation Dice {result.best_dice:.3f} on held-out phantoms -> {model}", flush=True)
    return model, held_out


def main(argv: list[str]) -> int:
    from vnetseg.cli import main as vnetseg_main
    from vnetseg.registry import default_model

    OUT.mkdir(exist_ok=True)
    inputs = [Path(a) for a in argv] or default_inputs()
    shipped = default_model()
    if shipped is not None:
        model, sha = shipped.path, shipped.sha256
        print(f"model: {shipped.name} (shipped with vnetseg; card: vnetseg info {model})")
    else:
        print("model: no trained spleen model is installed, so this demo trains a toy model on synthetic phantoms")
        model, held_out = train_toy_model()
        sha = None
        inputs = held_out + inputs
    if not inputs:
        print("no CT given and ../shared/data/ct not found: pass a CT file or DICOM folder", file=sys.stderr)
        return 2
    masks = OUT / "masks"
    masks.mkdir(exist_ok=True)
    args = ["predict", *map(str, inputs), "--output-dir", str(masks), "--model", str(model), "--overwrite",
            "--overlay-dir", str(OUT / "overlays"), "--report", str(OUT / "report.json"), "--progress", "bar"]
    if sha:
        args += ["--sha256", sha]
    started = time.perf_counter()
    code = vnetseg_main(args)
    print(f"\nmasks: {masks}\noverlays (PNG): {OUT / 'overlays'}\nreport: {OUT / 'report.json'}"
          f"\ntotal {time.perf_counter() - started:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

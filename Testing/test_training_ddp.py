"""Two CPU processes under torchrun (gloo): DistributedDataParallel training finishes, rank 0 alone writes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from training_helpers import tiny_config

from training.checkpointing import load_state
from training.synthetic import PhantomSettings, write_synthetic_task
from vnetseg.checkpoint import load_model

REPO = Path(__file__).resolve().parents[1]


def test_two_process_ddp_run_writes_one_checkpoint(tmp_path: Path) -> None:
    small = PhantomSettings(fov_mm=(300.0, 240.0, 160.0))
    data = write_synthetic_task(tmp_path / "Task", cases=4, seed=1, settings=small)
    cfg = tmp_path / "cfg.json"
    # with shift consistency on: two windows per patch under DDP, and its term reduced over both ranks
    settings = {"shift_consistency": 1.0, "consistency_shift": [8, 8, 0]}
    cfg.write_text(json.dumps(tiny_config(epochs=2, iters_per_epoch=2, val_every=2, folds=2, **settings).to_dict()))
    out = tmp_path / "run"
    path = os.pathsep.join([str(REPO), str(REPO / "VNetSegmentation")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "training.train", "--data", str(data), "--out", str(out), "--config", str(cfg), "--device", "cpu"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fold = out / "fold_0"
    assert sorted(p.name for p in out.iterdir()) == ["cache", "fold_0", "splits.json"]
    assert sorted(p.name for p in fold.glob("*.pth")) == ["checkpoint_best.pth", "checkpoint_last.pth"]
    assert not list(fold.glob(".*"))  # no leftover temporary files from a second writer
    rows = list(csv.DictReader((fold / "log.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2"]  # one writer: each epoch logged once
    assert all(float(r["train_consistency"]) > 0 for r in rows)
    assert proc.stderr.count("epoch 2/2") == 1 and proc.stderr.count("done:") == 1  # only rank 0 reports
    _, info = load_model(fold / "model_last.pt")
    assert info.card["world_size"] == 2 and info.card["epochs"] == 2
    # 2 validation cases shared by the two ranks, reduced into one complete table
    assert sorted(info.card["validation"]["dice_per_case"]) == json.loads((out / "splits.json").read_text())[0]["val"]
    assert load_state(fold / "checkpoint_last.pth")["epoch"] == 2
    # a failure on rank 0 (the run exists, no --resume) stops both ranks instead of leaving one waiting
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300, check=False)
    assert again.returncode != 0 and "already holds a training run" in again.stderr
    assert load_state(fold / "checkpoint_last.pth")["epoch"] == 2

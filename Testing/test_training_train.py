"""End-to-end training on synthetic phantoms and on the real CTs: accuracy, export, resume."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from training_helpers import real_ct_msd, tiny_config

from training.cache import cache_dir_for, load_cached
from training.checkpointing import load_state
from training.config import load_config
from training.data import read_msd
from training.engine import TrainOptions, train
from training.synthetic import write_synthetic_task
from training.train import main as train_main
from vnetseg.checkpoint import load_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Train on one torch thread here (restored afterwards).

    These small runs gain little from intra-op threads, and one thread keeps their runtime steady
    when the CPU is shared (busy threads competing for 2 cores slow down badly).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_task(tmp_path_factory.mktemp("phantoms") / "Task", cases=16, seed=0)


@pytest.fixture(scope="module")
def trained(phantoms: Path, tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None):
    """The light V-Net trained on 12 phantoms, validated on 4 held-out ones (fold 0 of 4)."""
    out = tmp_path_factory.mktemp("run")
    cfg = load_config("synthetic", {"epochs": 8, "iters_per_epoch": 20, "val_every": 4, "folds": 4})
    result = train(TrainOptions(data=phantoms, out=out, fold=0, config=cfg, device="cpu", quiet=True))
    return result, out


def test_light_vnet_reaches_dice_085_on_held_out_phantoms(trained) -> None:
    result, out = trained
    assert result.epochs_done == 8
    assert result.best_dice >= 0.85, f"mean validation Dice {result.best_dice:.3f} < 0.85"
    assert len(result.last_dice) == 4 and min(result.last_dice.values()) > 0.7
    splits = json.loads((out / "splits.json").read_text())
    assert sorted(result.last_dice) == splits[0]["val"]
    assert not set(splits[0]["val"]) & set(splits[0]["train"])


def test_exported_model_carries_its_card_and_runs_in_the_cli(trained, phantoms: Path, tmp_path: Path) -> None:
    result, out = trained
    fold = out / "fold_0"
    info = load_model(fold / "model_best.pt")[1]
    card = info.card
    assert card["fold"] == 0 and card["epochs"] == result.best_epoch and card["seed"] == 12345
    assert card["validation"]["dice_mean"] == pytest.approx(result.best_dice)
    assert np.mean(list(card["validation"]["dice_per_case"].values())) == pytest.approx(result.best_dice)
    last = load_model(fold / "model_last.pt")[1].card
    recorded = json.loads((fold / "validation.json").read_text())["last_dice_per_case"]
    assert last["validation"]["dice_per_case"] == pytest.approx(recorded)
    assert card["data"]["val_cases"] == sorted(result.last_dice) and len(card["data"]["train_cases"]) == 12
    assert card["config"]["epochs"] == 8 and card["date"].startswith("20")
    assert info.preprocessing.target_spacing == (4.0, 4.0, 4.0) and info.labels[0].name == "Spleen"
    assert last["epochs"] == 8
    # the deployed command line segments a held-out phantom with the exported file (the last one,
    # whose validation Dice is result.last_dice)
    case = min(result.last_dice)
    dest = tmp_path / "mask.nii.gz"
    proc = subprocess.run(
        [sys.executable, "-m", "vnetseg", "predict", str(phantoms / "imagesTr" / f"{case}.nii.gz"), "-o", str(dest),
         "--model", str(fold / "model_last.pt"), "--device", "cpu"],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    pred = np.asarray(nib.load(str(dest)).dataobj)
    ref = np.asarray(nib.load(str(phantoms / "labelsTr" / f"{case}.nii.gz")).dataobj)
    dice = 2 * np.sum((pred == 1) & (ref == 1)) / (np.sum(pred == 1) + np.sum(ref == 1))
    assert dice == pytest.approx(result.last_dice[case], abs=0.02)


def test_logs_and_plots_are_written(trained) -> None:
    _, out = trained
    fold = out / "fold_0"
    rows = list(csv.DictReader((fold / "log.csv").read_text().splitlines()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    assert [r["val_dice_mean"] != "" for r in rows] == [e % 4 == 0 for e in range(1, 9)]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert all(float(r["patches_per_s"]) > 0 for r in rows)
    assert (fold / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((fold / "config.json").read_text())["epochs"] == 8
    state = load_state(fold / "checkpoint_last.pth")
    assert state["epoch"] == 8 and {"model", "optimizer", "scheduler", "scaler", "rng"} <= set(state)


def test_resume_gives_the_same_next_epoch_as_an_uninterrupted_run(phantoms: Path, tmp_path: Path) -> None:
    cfg = tiny_config(epochs=3, iters_per_epoch=3, val_every=3, folds=4)
    full = train(TrainOptions(data=phantoms, out=tmp_path / "full", config=cfg, device="cpu", quiet=True))
    cut = TrainOptions(data=phantoms, out=tmp_path / "cut", config=cfg, device="cpu", quiet=True, max_epochs=2)
    first = train(cut)
    assert first.epochs_done == 2
    # a new process-like start: other RNG draws in between must not matter
    torch.manual_seed(999)
    np.random.seed(999)
    cut.max_epochs, cut.resume = None, True
    resumed = train(cut)
    assert resumed.epochs_done == 3
    losses = [r["train_loss"] for r in resumed.history]
    assert losses == pytest.approx([r["train_loss"] for r in full.history], rel=1e-6)
    a = load_model(tmp_path / "full" / "fold_0" / "model_last.pt")[0].state_dict()
    b = load_model(tmp_path / "cut" / "fold_0" / "model_last.pt")[0].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_existing_run_is_kept_and_resumed_from_the_command_line(phantoms: Path, tmp_path: Path, capsys) -> None:
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(tiny_config(epochs=2, iters_per_epoch=1, val_every=2, folds=4).to_dict()))
    run = tmp_path / "run"
    args = ["--data", str(phantoms), "--out", str(run), "--config", str(cfg_file), "--device", "cpu", "--quiet"]
    assert train_main([*args, "--max-epochs", "1"]) == 0
    fold = run / "fold_0"
    before = (fold / "model_last.pt").read_bytes()
    config_before = (fold / "config.json").read_text()
    assert train_main(args) == 2
    assert "already holds a training run; pass --resume" in capsys.readouterr().err
    assert (fold / "model_last.pt").read_bytes() == before
    # resuming with another config is refused and leaves the run's config alone
    assert train_main([*args, "--resume", "--set", "lr=0.5"]) == 2
    assert "config differs" in capsys.readouterr().err
    assert (fold / "config.json").read_text() == config_before
    # --resume without --config continues with the run's own config.json
    resume = ["--data", str(phantoms), "--out", str(run), "--device", "cpu", "--quiet", "--resume"]
    assert train_main(resume) == 0
    assert [int(r["epoch"]) for r in csv.DictReader((fold / "log.csv").read_text().splitlines())] == [1, 2]
    assert load_state(fold / "checkpoint_last.pth")["epoch"] == 2
    assert train_main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), "--config", "synthetic"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_trains_a_few_iterations_on_an_msd_folder_of_the_real_cts(ct_dir: Path, tmp_path: Path) -> None:
    root = real_ct_msd(ct_dir, tmp_path / "RealCT")
    ds = read_msd(root)
    assert ds.case_names == ["ct_a", "ct_b"]
    cfg = tiny_config(epochs=1, iters_per_epoch=2, folds=2)
    result = train(TrainOptions(data=root, out=tmp_path / "run", config=cfg, device="cpu", quiet=True))
    assert result.epochs_done == 1 and len(result.last_dice) == 1
    assert 0.0 <= next(iter(result.last_dice.values())) <= 1.0
    train_case = json.loads((tmp_path / "run" / "splits.json").read_text())[0]["train"][0]
    cached = load_cached(cache_dir_for(tmp_path / "run" / "cache", cfg.preprocessing), [train_case])[0]
    # 3 mm voxels resampled to 6 mm: the spleen keeps its volume (9632 / 9452 voxels of 27 mm^3)
    expected_ml = {"ct_a": 9632 * 27 / 1000, "ct_b": 9452 * 27 / 1000}[train_case]
    assert cached.label.sum() * 216 / 1000 == pytest.approx(expected_ml, rel=0.15)
    _, info = load_model(tmp_path / "run" / "fold_0" / "model_last.pt")
    assert info.card["data"]["train_cases"] == [train_case]


def test_shift_consistency_cuts_larger_patches_and_trains(tmp_path: Path) -> None:
    from training import distributed as dd
    from training.engine import Trainer
    from training.synthetic import PhantomSettings

    data = write_synthetic_task(tmp_path / "Task", cases=2, seed=3, settings=PhantomSettings(fov_mm=(300.0, 240.0, 120.0)))
    cfg = tiny_config(epochs=1, iters_per_epoch=2, shift_consistency=5.0, consistency_shift=[8, 8, 4], fg_offset=0.5)
    opts = TrainOptions(data=data, out=tmp_path / "run", fold="all", config=cfg, device="cpu", quiet=True)
    trainer = Trainer(opts, dd.setup("cpu"))
    ds, _ = trainer._loader()
    assert ds.patch == (40, 40, 36)  # the 32^3 window plus the largest offset between the two views
    assert ds.fg_offset == 0.5  # the setting reaches the sampler
    result = trainer.run()
    assert result.epochs_done == 1 and np.isfinite(trainer.history[-1]["train_loss"])
    assert trainer.history[-1]["train_consistency"] > 0  # random weights: two windows disagree somewhat
    with open(result.fold_dir / "log.csv", newline="") as f:
        assert float(next(csv.DictReader(f))["train_consistency"]) == pytest.approx(trainer.history[-1]["train_consistency"], rel=1e-5)
    saved = json.loads((result.fold_dir / "config.json").read_text())
    assert saved["shift_consistency"] == 5.0 and saved["consistency_shift"] == [8, 8, 4] and saved["fg_offset"] == 0.5
    # the exported model runs with the window it was trained on, not the larger cut
    assert load_model(result.fold_dir / "model_last.pt")[1].preprocessing.patch_size == (32, 32, 32)


def test_fold_all_trains_and_validates_on_every_case(tmp_path: Path) -> None:
    from training.synthetic import PhantomSettings

    small = PhantomSettings(fov_mm=(300.0, 240.0, 120.0))
    data = write_synthetic_task(tmp_path / "Task", cases=3, seed=2, settings=small)
    cfg = tiny_config(epochs=1, iters_per_epoch=1)
    result = train(TrainOptions(data=data, out=tmp_path / "run", fold="all", config=cfg, device="cpu", quiet=True))
    assert result.fold_dir == tmp_path / "run" / "fold_all"
    assert sorted(result.last_dice) == ["phantom_000", "phantom_001", "phantom_002"]
    card = load_model(result.fold_dir / "model_last.pt")[1].card
    assert card["fold"] == "all" and card["validation"]["on_training_cases"] is True
    assert card["data"]["train_cases"] == card["data"]["val_cases"] == sorted(result.last_dice)
    assert not (tmp_path / "run" / "splits.json").exists()
    with pytest.raises(ValueError, match="fold number or 'all'"):
        train(TrainOptions(data=data, out=tmp_path / "x", fold="first", config=tiny_config(), device="cpu", quiet=True))


def test_log_csv_keeps_the_columns_it_was_started_with(tmp_path: Path) -> None:
    from training.observe import LOG_FIELDS, append_log

    new = tmp_path / "new.csv"
    append_log(new, {"epoch": 1, "train_loss": 0.5, "train_consistency": 0.01})
    rows = list(csv.DictReader(new.read_text().splitlines()))
    assert tuple(rows[0]) == LOG_FIELDS and rows[0]["train_consistency"] == "0.01"
    # a log written before the consistency column existed (a resumed old run) stays rectangular
    old = tmp_path / "old.csv"
    old.write_text("epoch,train_loss,lr,patches_per_s,seconds,val_dice_mean,best_dice\n1,0.9,0.01,2,10,,\n")
    append_log(old, {"epoch": 2, "train_loss": 0.8, "lr": 0.01, "train_consistency": 0.02})
    lines = old.read_text().splitlines()
    assert [len(line.split(",")) for line in lines] == [7, 7, 7]
    assert list(csv.DictReader(lines))[1]["train_loss"] == "0.8"

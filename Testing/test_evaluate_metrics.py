"""Evaluation metrics against hand-computed values, empty masks, and the evaluate command line."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from training.data import CaseError
from training.evaluate import main as evaluate_main
from training.metrics import case_metrics, dice_score, hd95_mm, summarise, surface_dice
from vnetseg.io import write_nifti


def _cube(shape=(8, 8, 8), start=(2, 2, 2), size=4) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(s, s + size) for s in start)] = True
    return m


def test_single_voxels_in_anisotropic_space() -> None:
    a = np.zeros((6, 6, 8), bool)
    b = a.copy()
    a[2, 2, 2] = True
    b[2, 2, 5] = True  # 3 voxels apart along k, 2 mm each: 6 mm
    spacing = (1.0, 1.0, 2.0)
    assert dice_score(a, b) == 0.0
    assert hd95_mm(a, b, spacing) == pytest.approx(6.0)
    assert surface_dice(a, b, spacing, tolerance_mm=6.0) == pytest.approx(1.0)
    assert surface_dice(a, b, spacing, tolerance_mm=5.9) == pytest.approx(0.0)


def test_shifted_cube_by_hand() -> None:
    # 4x4x4 cubes one voxel apart along i, spacing 2 x 1 x 1 mm.
    a, b = _cube(start=(1, 2, 2)), _cube(start=(2, 2, 2))
    spacing = (2.0, 1.0, 1.0)
    assert dice_score(a, b) == pytest.approx(2 * 48 / 128)
    # Surface = 56 voxels per cube. From A to B: the 16 voxels of A's far face are 2 mm from B's
    # surface, the 4 inner voxels of A's near face are 1 mm away (B's side faces), the other 36
    # lie on B's surface. The 95th percentile of {0 x36, 1 x4, 2 x16} is 2 mm; B to A is symmetric.
    assert hd95_mm(a, b, spacing) == pytest.approx(2.0)
    # surface Dice at 1.5 mm: (40 + 40) / (56 + 56)
    assert surface_dice(a, b, spacing, tolerance_mm=1.5) == pytest.approx(80 / 112)
    assert surface_dice(a, b, spacing, tolerance_mm=2.0) == pytest.approx(1.0)
    m = case_metrics("c", a, b, spacing)
    assert m.volume_pred_ml == pytest.approx(64 * 2 / 1000) and m.volume_error_ml == pytest.approx(0.0)


def test_identical_and_empty_masks() -> None:
    a = _cube()
    same = case_metrics("same", a, a.copy(), (1.0, 1.0, 1.0))
    assert (same.dice, same.hd95_mm, same.surface_dice, same.volume_error_pct) == (1.0, 0.0, 1.0, 0.0)
    empty = np.zeros_like(a)
    both = case_metrics("both", empty, empty, (1.0, 1.0, 1.0))
    assert (both.dice, both.hd95_mm, both.surface_dice, both.volume_error_ml) == (1.0, 0.0, 1.0, 0.0)
    missed = case_metrics("missed", empty, a, (1.0, 1.0, 1.0))
    assert (missed.dice, missed.surface_dice) == (0.0, 0.0) and math.isinf(missed.hd95_mm)
    assert missed.volume_error_ml == pytest.approx(-0.064) and missed.volume_error_pct == pytest.approx(-100.0)
    extra = case_metrics("extra", a, empty, (1.0, 1.0, 1.0))
    assert extra.dice == 0.0 and math.isinf(extra.hd95_mm) and math.isinf(extra.volume_error_pct)
    stats = summarise([same, missed])
    assert stats["dice"]["mean"] == 0.5 and stats["hd95_mm"]["n_inf"] == 1 and stats["hd95_mm"]["mean"] == 0.0
    with pytest.raises(ValueError, match="differs from reference shape"):
        case_metrics("x", a, a[:-1], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        hd95_mm(a, a, (1.0, 0.0, 1.0))


def test_evaluate_command_line_on_folders(tmp_path: Path, capsys) -> None:
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    pred, labels, out = tmp_path / "pred", tmp_path / "labels", tmp_path / "out"
    pred.mkdir()
    labels.mkdir()
    write_nifti(labels / "case_1.nii.gz", _cube(start=(1, 2, 2)).astype(np.uint8), affine)
    write_nifti(pred / "case_1_spleen.nii.gz", _cube(start=(2, 2, 2)).astype(np.uint8), affine)  # vnetseg's name
    write_nifti(labels / "case_2.nii.gz", _cube().astype(np.uint8), affine)
    write_nifti(pred / "case_2.nii.gz", _cube().astype(np.uint8), affine)
    (labels / "._case_1.nii.gz").write_bytes(b"junk")  # macOS resource file: ignored
    assert evaluate_main(["--pred", str(pred), "--labels", str(labels), "--out", str(out), "--tolerance", "1.5"]) == 0
    printed = capsys.readouterr().out
    assert "2 case(s)" in printed and "dice" in printed
    rows = {r["case"]: r for r in csv.DictReader((out / "metrics.csv").read_text().splitlines())}
    assert float(rows["case_1"]["dice"]) == pytest.approx(0.75)
    assert float(rows["case_1"]["hd95_mm"]) == pytest.approx(2.0)
    assert float(rows["case_1"]["surface_dice"]) == pytest.approx(80 / 112, rel=1e-5)
    assert float(rows["case_2"]["dice"]) == 1.0
    summary = {r["metric"]: r for r in csv.DictReader((out / "summary.csv").read_text().splitlines())}
    assert float(summary["dice"]["mean"]) == pytest.approx(0.875)
    assert (out / "boxplot.png").read_bytes()[:4] == b"\x89PNG"
    assert evaluate_main(["--pred", str(pred), "--labels", str(labels)]) == 0
    default = {r["case"]: r for r in csv.DictReader((tmp_path / "pred_eval" / "metrics.csv").read_text().splitlines())}  # default --out
    assert float(default["case_1"]["surface_dice"]) == 1.0  # default tolerance 2 mm covers the 2 mm shift
    # a case without a prediction, and a prediction on another grid: errors naming the case
    write_nifti(labels / "case_3.nii.gz", _cube().astype(np.uint8), affine)
    assert evaluate_main(["--pred", str(pred), "--labels", str(labels)]) == 2  # default --out: pred_eval
    assert "case 'case_3': no prediction" in capsys.readouterr().err
    write_nifti(pred / "case_3.nii.gz", _cube().astype(np.uint8), np.diag([1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(CaseError, match="case 'case_3'.*grids differ"):
        from training.evaluate import evaluate_pairs, match_predictions

        evaluate_pairs(match_predictions(pred, labels))

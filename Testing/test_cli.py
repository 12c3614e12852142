"""The vnetseg command: real CTs end to end, batch mode, reports, and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from vnetseg.cli import main
from vnetseg.io import affine_from_sitk, read_image


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_real_nifti_output_overlays_input(ct_dir: Path, tiny_model_file: Path, tmp_path: Path, capsys) -> None:
    out_file = tmp_path / "spleen.nii.gz"
    code, out, err = run(["predict", ct_dir / "example_ct.nii.gz", "-o", out_file, "--model", tiny_model_file, "--device", "cpu"], capsys)
    assert code == 0, err
    assert "example_ct.nii.gz: spleen" in out and " mL" in out and "on cpu" in out
    ct, mask = nib.load(ct_dir / "example_ct.nii.gz"), nib.load(out_file)
    assert mask.shape == ct.shape and mask.get_data_dtype() == np.uint8
    np.testing.assert_allclose(mask.affine, ct.affine, atol=1e-5)


def test_predict_dicom_series_to_seg_nrrd_overlays_input(ct_dir: Path, tiny_model_file: Path, tmp_path: Path, capsys) -> None:
    out_file = tmp_path / "spleen.seg.nrrd"
    code, _, err = run(["predict", ct_dir / "example_ct_dicom", "-o", out_file, "--model", tiny_model_file], capsys)
    assert code == 0, err
    seg = slicerio.read_segmentation(str(out_file))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(ct_dir / "example_ct_dicom")))
    dicom = reader.Execute()
    assert seg["voxels"].shape == dicom.GetSize()
    ijk_to_ras = np.diag([-1.0, -1, 1, 1]) @ np.asarray(seg["ijkToLPS"])
    np.testing.assert_allclose(ijk_to_ras, affine_from_sitk(dicom), atol=1e-4)
    assert seg["segments"][0]["name"] == "Spleen"


def test_batch_folder_with_report_and_json_progress(ct_dir: Path, tiny_model_file: Path, tmp_path: Path, capsys) -> None:
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        (cases / name).symlink_to(ct_dir / "example_ct_sm.nii.gz")
    (cases / "._a.nii.gz").write_bytes(b"macOS junk")  # skipped, like in the MSD archive
    (cases / "notes.txt").write_text("not an image")
    outdir, report = tmp_path / "out", tmp_path / "report.json"
    outdir.mkdir()
    code, out, err = run(
        ["predict", cases, "--output-dir", outdir, "--model", tiny_model_file, "--report", report, "--progress", "json"], capsys
    )
    assert code == 0, err
    assert sorted(p.name for p in outdir.iterdir()) == ["a_spleen.nii.gz", "b_spleen.nii.gz"]
    events = [json.loads(line) for line in out.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "model" and kinds.count("done") == 2 and "progress" in kinds
    fractions = [e["fraction"] for e in events if e["event"] == "progress" and e["case"] == "a.nii.gz"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    data = json.loads(report.read_text())
    assert [Path(c["input"]).name for c in data["cases"]] == ["a.nii.gz", "b.nii.gz"]
    assert all(c["error"] is None and c["volume_ml"] >= 0 and c["seconds"] > 0 for c in data["cases"])


def test_existing_output_is_kept_unless_overwrite(ct_dir: Path, tiny_model_file: Path, tmp_path: Path, capsys) -> None:
    out_file = tmp_path / "mine.nii.gz"
    out_file.write_bytes(b"the user's own file")
    args = ["predict", ct_dir / "example_ct_sm.nii.gz", "-o", out_file, "--model", tiny_model_file]
    code, _, err = run(args, capsys)
    assert code == 2 and "exists; pass --overwrite" in err
    assert out_file.read_bytes() == b"the user's own file"
    code, _, err = run([*args, "--overwrite"], capsys)
    assert code == 0, err
    assert read_image(out_file).shape == (122, 101, 30)


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    def save(name: str, arr: np.ndarray) -> Path:
        nib.save(nib.Nifti1Image(np.asarray(arr, np.float32), np.eye(4)), tmp / name)
        return tmp / name

    (tmp / "text.nii.gz").write_text("hello")
    zero = nib.Nifti1Image(np.random.rand(6, 6, 6).astype(np.float32), None)
    zero.header["pixdim"][1:4] = [1.0, 0.0, 1.0]
    nib.save(zero, tmp / "zero.nii.gz")
    return {
        "missing": (tmp / "missing.nii.gz", "does not exist"),
        "not an image": (tmp / "text.nii.gz", "not a readable NIfTI"),
        "2D": (save("flat.nii.gz", np.random.rand(8, 8, 1)), "2D"),
        "4D": (save("four.nii.gz", np.random.rand(6, 6, 6, 2)), "4D"),
        "empty": (save("empty.nii.gz", np.zeros((8, 8, 8))), "empty"),
        "NaN": (save("nan.nii.gz", np.full((8, 8, 8), np.nan)), "NaN"),
        "zero spacing": (tmp / "zero.nii.gz", "zero or degenerate"),
    }


@pytest.mark.parametrize("case", ["missing", "not an image", "2D", "4D", "empty", "NaN", "zero spacing"])
def test_bad_input_gives_one_line_and_no_file(case: str, tiny_model_file: Path, tmp_path: Path, capsys) -> None:
    path, message = _bad_inputs(tmp_path)[case]
    out_file = tmp_path / "out.nii.gz"
    code, _, err = run(["predict", path, "-o", out_file, "--model", tiny_model_file], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("vnetseg: error:") and message in err
    assert "Traceback" not in err
    assert not out_file.exists() and not list(tmp_path.glob(".out*"))


def test_not_a_model_and_bad_options(ct_dir: Path, tmp_path: Path, capsys) -> None:
    out_file = tmp_path / "o.nii.gz"
    code, _, err = run(["predict", ct_dir / "example_ct_sm.nii.gz", "-o", out_file, "--model", ct_dir / "README.md"], capsys)
    assert code == 2 and "not a usable vnetseg model file" in err and not out_file.exists()
    code, _, err = run(["predict", ct_dir / "example_ct_sm.nii.gz", "-o", tmp_path / "o.png", "--model", ct_dir / "README.md"], capsys)
    assert code == 2 and "use a .nii.gz" in err


def test_info_prints_the_model(tiny_model_file: Path, capsys) -> None:
    code, out, _ = run(["info", tiny_model_file], capsys)
    assert code == 0 and "widths=[4, 8, 16, 32, 64]" in out and "tiny random test model" in out
    code, _, err = run(["info", tiny_model_file, "--sha256", "ab" * 32], capsys)
    assert code == 2 and "SHA-256" in err


def test_real_process_prints_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vnetseg", "predict", str(tmp_path / "nope.nii.gz"), "-o", str(tmp_path / "o.nii.gz")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2 and proc.stderr.strip() == f"vnetseg: error: input {tmp_path / 'nope.nii.gz'} does not exist"

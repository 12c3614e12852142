"""``vnetseg predict --probabilities`` / ``--probability-dir``: the map on the input grid, in the JSON report, and bad requests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from test_cli import run

from vnetseg.io import read_image


def test_probability_map_nifti_is_the_mask_before_threshold(ct_dir: Path, tiny_model_file: Path, tmp_path: Path, capsys) -> None:
    mask_file, prob_file = tmp_path / "spleen.nii.gz", tmp_path / "prob.nii.gz"
    code, out, err = run(["predict", ct_dir / "example_ct_sm.nii.gz", "-o", mask_file, "--probabilities", prob_file,
                          "--model", tiny_model_file, "--device", "cpu", "--no-postprocess"], capsys)
    assert code == 0, err
    assert f"probability map -> {prob_file}" in out and "confidence: mean probability" in out
    ct, prob, mask = (nib.load(p) for p in (ct_dir / "example_ct_sm.nii.gz", prob_file, mask_file))
    assert prob.shape == ct.shape and prob.get_data_dtype() == np.float32
    np.testing.assert_allclose(prob.affine, ct.affine, atol=1e-5)
    values = np.asarray(prob.dataobj)
    assert 0.0 <= values.min() and values.max() <= 1.0
    np.testing.assert_array_equal(values > 0.5, np.asarray(mask.dataobj) > 0)  # the tiny model has no locator: raw mask
    assert b"probability 0-1" in prob.header["descrip"].tobytes()


def test_probability_map_nrrd_uint8_says_what_it_covers(ct_dir: Path, tiny_model_file: Path, tmp_path: Path, capsys) -> None:
    prob_file = tmp_path / "prob.nrrd"
    code, _, err = run(["predict", ct_dir / "example_ct_dicom", "-o", tmp_path / "m.seg.nrrd", "--probabilities", prob_file,
                        "--probability-type", "uint8", "--model", tiny_model_file, "--device", "cpu"], capsys)
    assert code == 0, err
    img = sitk.ReadImage(str(prob_file))
    assert img.GetPixelID() == sitk.sitkUInt8
    assert img.GetMetaData("vnetseg_probability_covers") == "volume"
    assert "x 255" in img.GetMetaData("vnetseg_probability")
    back, ct = read_image(prob_file, dtype=None, allow_uniform=True), read_image(ct_dir / "example_ct_dicom")
    assert back.shape == ct.shape
    np.testing.assert_allclose(back.affine, ct.affine, atol=1e-4)  # the DICOM series' LPS grid, exactly


def test_batch_probability_dir_and_report(ct_dir: Path, tiny_model_file: Path, blind_model_file: Path, tmp_path: Path, capsys) -> None:
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        (cases / name).symlink_to(ct_dir / "example_ct_sm.nii.gz")
    out_dir, prob_dir, report = tmp_path / "out", tmp_path / "prob", tmp_path / "report.json"
    out_dir.mkdir()
    prob_dir.mkdir()
    code, out, err = run(["predict", cases, "--output-dir", out_dir, "--probability-dir", prob_dir, "--model", tiny_model_file,
                          "--report", report, "--progress", "json", "--device", "cpu"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in prob_dir.iterdir()) == ["a_spleen_probability.nii.gz", "b_spleen_probability.nii.gz"]
    done = [e for e in map(json.loads, out.splitlines()) if e["event"] == "done"]
    data = json.loads(report.read_text())
    for case in data["cases"] + done:
        assert case["probability"].endswith("_spleen_probability.nii.gz") and case["probability_covers"] == "volume"
        assert set(case["confidence"]) == {"mean_probability", "uncertain_share", "organ_voxels", "low"}
        assert 0.0 <= case["confidence"]["uncertain_share"] <= 1.0
    # "no spleen in view": the map is written, all 0, and the report says so
    code, _, err = run(["predict", cases / "a.nii.gz", "-o", tmp_path / "none.nii.gz", "--probabilities", tmp_path / "none_p.nii.gz",
                        "--model", blind_model_file, "--report", report, "--device", "cpu"], capsys)
    assert code == 0, err
    case = json.loads(report.read_text())["cases"][0]
    assert case["spleen_found"] is False and case["confidence"] is None and case["probability_covers"] == "nothing"
    assert not np.asarray(nib.load(tmp_path / "none_p.nii.gz").dataobj).any()


def test_bad_probability_requests_fail_before_any_work(ct_dir: Path, tiny_model_file: Path, tmp_path: Path, capsys) -> None:
    ct = ct_dir / "example_ct_sm.nii.gz"
    mask = tmp_path / "m.nii.gz"
    bad = {
        "seg": (["-o", mask, "--probabilities", tmp_path / "p.seg.nrrd"], "not .seg.nrrd"),
        "folder": (["-o", mask, "--probabilities", tmp_path / "nowhere" / "p.nii.gz"], "does not exist"),
        "dir": (["--output-dir", tmp_path, "--probability-dir", tmp_path / "nowhere"], "does not exist"),
        "many": ([ct, "--output-dir", tmp_path, "--probabilities", tmp_path / "p.nii.gz"], "--probability-dir"),
    }
    for name, (args, message) in bad.items():
        code, _, err = run(["predict", ct, *args, "--model", tiny_model_file], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (name, err)
        assert not mask.exists() and not list(tmp_path.glob("*_spleen*")), name
    existing = tmp_path / "p.nii.gz"
    existing.write_bytes(b"mine")
    code, _, err = run(["predict", ct, "-o", mask, "--probabilities", existing, "--model", tiny_model_file], capsys)
    assert code == 2 and "exists" in err and existing.read_bytes() == b"mine" and not mask.exists()

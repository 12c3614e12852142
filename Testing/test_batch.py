"""Archive-scale batches: output folder created, --skip-existing resume, --shard K/N, per-shard reports and
``vnetseg report merge``, DICOM series recorded in the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dicom_helpers import ACRIN_SERIES_1

from vnetseg.batch import merge_reports, output_complete, parse_shard, shard_of
from vnetseg.cli import main


def run(args: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cases(ct_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "cases"
    folder.mkdir()
    for name in "abcde":
        (folder / f"{name}.nii.gz").symlink_to(ct_dir / "example_ct_sm.nii.gz")
    return folder


def test_parse_shard_and_shard_of() -> None:
    assert parse_shard("0/4") == (0, 4) and parse_shard("3/4") == (3, 4)
    assert shard_of(10, (1, 4)) == [1, 5, 9] and shard_of(3, None) == [0, 1, 2] and shard_of(2, (3, 4)) == []
    for bad in ("4/4", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_output_dir_is_created_and_resume_skips_complete_outputs(cases: Path, tiny_model_file: Path, tmp_path: Path, capsys) -> None:
    outdir, report = tmp_path / "results" / "masks", tmp_path / "report.json"
    args = ["predict", cases / "a.nii.gz", cases / "b.nii.gz", cases / "c.nii.gz", "--output-dir", outdir, "--model", tiny_model_file]
    code, _, err = run([*args, "--report", report], capsys)
    assert code == 0, err
    assert sorted(p.name for p in outdir.iterdir()) == ["a_spleen.nii.gz", "b_spleen.nii.gz", "c_spleen.nii.gz"]
    kept = (outdir / "a_spleen.nii.gz").stat().st_mtime_ns
    (outdir / "b_spleen.nii.gz").unlink()  # as if the job had been stopped before case b
    code, _, err = run([*args, "--report", report], capsys)
    assert code == 2 and "a_spleen.nii.gz exists; pass --overwrite" in err  # without --skip-existing: nothing done
    code, out, err = run([*args, "--report", report, "--skip-existing"], capsys)
    assert code == 0, err
    assert "a.nii.gz: skipped, its output" in out and "c.nii.gz: skipped" in out and "b.nii.gz: spleen" in out
    assert (outdir / "a_spleen.nii.gz").stat().st_mtime_ns == kept and (outdir / "b_spleen.nii.gz").exists()
    data = json.loads(report.read_text())
    assert [(Path(c["input"]).name, c["status"], c["index"]) for c in data["cases"]] == [
        ("a.nii.gz", "skipped", 0), ("b.nii.gz", "done", 1), ("c.nii.gz", "skipped", 2)]
    assert data["summary"] == {"done": 1, "skipped": 2, "error": 0} and data["total_cases"] == 3
    assert run([*args, "--skip-existing", "--overwrite"], capsys)[2].count("contradict") == 1


def test_a_damaged_existing_output_is_not_skipped_nor_replaced(cases: Path, tiny_model_file: Path, tmp_path: Path, capsys) -> None:
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "a_spleen.nii.gz").write_bytes(b"half a file from another program")
    code, out, err = run(["predict", cases / "a.nii.gz", cases / "b.nii.gz", "--output-dir", outdir, "--model", tiny_model_file,
                          "--skip-existing"], capsys)
    assert code == 2 and "a_spleen.nii.gz exists but is not a complete mask" in err and "b.nii.gz: spleen" in out
    assert (outdir / "a_spleen.nii.gz").read_bytes() == b"half a file from another program"
    assert output_complete(outdir / "b_spleen.nii.gz") == (True, "")
    assert output_complete(outdir / "a_spleen.nii.gz")[0] is False and output_complete(outdir / "zz.nii.gz") == (False, "missing")


def test_shards_split_the_cases_and_their_reports_merge(cases: Path, tiny_model_file: Path, tmp_path: Path, capsys) -> None:
    outdir, reports = tmp_path / "out", tmp_path / "reports"
    for k in range(2):
        code, _, err = run(["predict", cases, "--output-dir", outdir, "--model", tiny_model_file, "--shard", f"{k}/2",
                            "--report", reports / f"shard_{k}.json"], capsys)
        assert code == 0, err
        shard = json.loads((reports / f"shard_{k}.json").read_text())
        assert shard["shard"] == {"index": k, "count": 2} and shard["total_cases"] == 5
        assert [c["index"] for c in shard["cases"]] == list(range(k, 5, 2))
    assert sorted(p.name for p in outdir.iterdir()) == [f"{n}_spleen.nii.gz" for n in "abcde"]
    merged_file = tmp_path / "merged.json"
    code, out, err = run(["report", "merge", reports / "shard_1.json", reports / "shard_0.json", "-o", merged_file], capsys)
    assert code == 0 and err == ""
    assert "merged 2 report(s)" in out and "5 cases (5 done, 0 skipped, 0 failed)" in out
    merged = json.loads(merged_file.read_text())
    assert [Path(c["input"]).name for c in merged["cases"]] == [f"{n}.nii.gz" for n in "abcde"]
    assert merged["summary"] == {"done": 5, "skipped": 0, "error": 0} and "shard" not in merged
    code, _, err = run(["report", "merge", reports / "shard_0.json", "-o", tmp_path / "part.json"], capsys)
    assert code == 0 and "no report for shard(s) 1/2" in err and "2 of 5 cases have no result" in err


def test_merge_refuses_reports_of_different_models_or_shard_counts(tmp_path: Path) -> None:
    def write(name: str, **fields) -> Path:
        base = {"model_sha256": "a", "shard": {"index": 0, "count": 2}, "total_cases": 2, "cases": [{"index": 0, "input": "x"}]}
        (tmp_path / name).write_text(json.dumps({**base, **fields}))
        return tmp_path / name

    with pytest.raises(ValueError, match="made with another model"):
        merge_reports([write("a.json"), write("b.json", model_sha256="b", shard={"index": 1, "count": 2})])
    with pytest.raises(ValueError, match="another shard count"):
        merge_reports([write("a.json"), write("c.json", shard={"index": 1, "count": 3})])
    with pytest.raises(ValueError, match="in two reports with different results"):
        merge_reports([write("a.json"), write("d.json", shard={"index": 1, "count": 2}, cases=[{"index": 0, "input": "y"}])])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not readable JSON"):
        merge_reports([tmp_path / "bad.json"])


def test_batch_of_dicom_folders_records_the_series_used(ct_dir: Path, tiny_model_file: Path, tmp_path: Path, capsys) -> None:
    exam, report = ct_dir / "acrin_flt_breast_001_exam_dicom", tmp_path / "report.json"
    code, out, err = run(["predict", exam, "--output-dir", tmp_path / "out", "--model", tiny_model_file, "--report", report], capsys)
    assert code == 2 and "acrin_flt_breast_001_exam_dicom: error: folder" in err and "choose one with --series" in err
    assert json.loads(report.read_text())["cases"][0]["status"] == "error"
    code, out, err = run(["predict", exam, "--output-dir", tmp_path / "out", "--model", tiny_model_file, "--report", report,
                          "--series", "1", "--format", "dicom-seg", "--overlay-dir", tmp_path / "png"], capsys)
    assert code == 0, err
    assert (tmp_path / "png" / "acrin_flt_breast_001_exam_dicom_overlay.png").stat().st_size > 1000  # the chosen series, too
    assert f'series: {ACRIN_SERIES_1} "PET-CT SERIES" (12 slices)' in out
    (case,) = json.loads(report.read_text())["cases"]
    assert case["series"]["uid"] == ACRIN_SERIES_1 and case["series"]["slices"] == 12
    assert case["output"].endswith("acrin_flt_breast_001_exam_dicom_spleen.dcm")
    assert output_complete(case["output"]) == (True, "")


def test_an_archive_folder_of_dicom_folders_gives_one_case_per_folder(ct_dir: Path, tiny_model_file: Path, tmp_path: Path,
                                                                      capsys) -> None:
    from dicom_helpers import acrin_part

    archive = tmp_path / "archive"
    acrin_part(ct_dir, archive / "patient_b", series=2)
    acrin_part(ct_dir, archive / "patient_a", series=1)
    code, out, err = run(["predict", archive, "--output-dir", tmp_path / "out", "--model", tiny_model_file], capsys)
    assert code == 0, err
    assert out.index("patient_a: spleen") < out.index("patient_b: spleen")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["patient_a_spleen.nii.gz", "patient_b_spleen.nii.gz"]

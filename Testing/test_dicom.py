"""DICOM folders as archives hold them: several series, missing or duplicated slices, gantry tilt; NaN voxels.

Every case is a temporary copy of the real DICOM series in ../shared/data/ct with files deleted,
duplicated, mixed or edited, and every message is checked.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from dicom_helpers import ACRIN_SERIES_1, ACRIN_SERIES_2, acrin_part, copy_series, files_by_position, tilt

from vnetseg.cli import main
from vnetseg.dicom import scan_folder, select_series
from vnetseg.io import ImageError, affine_from_sitk, read_image


def _gdcm_read(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def test_one_series_reads_as_gdcm_reads_it_in_the_same_file_order(ct_dir: Path) -> None:
    folder = ct_dir / "example_ct_dicom"
    image = read_image(folder, dtype=None)
    ref = _gdcm_read(folder)
    np.testing.assert_array_equal(image.array, sitk.GetArrayFromImage(ref).transpose(2, 1, 0))
    np.testing.assert_allclose(image.affine, affine_from_sitk(ref), atol=1e-6)
    assert image.source.files == [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))]
    assert image.notes == [] and np.allclose(np.diff(image.source.positions_mm), 2.0)


def test_folder_with_two_series_lists_them_and_series_picks_one(ct_dir: Path) -> None:
    folder = ct_dir / "acrin_flt_breast_001_exam_dicom"
    with pytest.raises(ImageError) as info:
        read_image(folder)
    message = str(info.value)
    assert "\n" not in message and "holds 2 DICOM series" in message and "--series" in message
    # each series is described well enough to tell them apart: same description, different extent
    assert f'1: {ACRIN_SERIES_1} "PET-CT SERIES" (CT, 12 slices of 5 mm, BREAST, from -171.0 to -124.2 mm' in message
    assert f'2: {ACRIN_SERIES_2} "PET-CT SERIES" (CT, 12 slices of 5 mm, BREAST, from -689.0 to -642.2 mm' in message
    by_number, by_uid = read_image(folder, series="2"), read_image(folder, series=ACRIN_SERIES_2)
    np.testing.assert_array_equal(by_number.array, by_uid.array)
    assert by_number.source.uid == ACRIN_SERIES_2 and by_number.shape == (512, 512, 12)
    assert by_number.affine[2, 3] == pytest.approx(-689.0) and by_number.spacing[2] == pytest.approx(4.25)
    first = read_image(folder, series="1")
    assert first.source.uid == ACRIN_SERIES_1 and first.affine[2, 3] == pytest.approx(-171.0)
    with pytest.raises(ImageError, match=r"--series 3: no such series in .*1: 1\.3\.6.*2: 1\.3\.6"):
        read_image(folder, series="3")


def test_three_series_mixed_in_one_folder_including_one_without_uids(ct_dir: Path, tmp_path: Path) -> None:
    mixed = copy_series(ct_dir / "acrin_flt_breast_001_exam_dicom", tmp_path / "mixed")
    copy_series(ct_dir / "example_ct_dicom", mixed)
    found = scan_folder(mixed)
    # ordered by Series Number (the ACRIN ones are both 2), then UID; the blanked series has no number: last
    assert [s.uid for s in found] == [ACRIN_SERIES_1, ACRIN_SERIES_2, ""]
    assert [len(s.files) for s in found] == [12, 12, 20]
    assert found[2].summary().startswith('(no Series Instance UID) "CT Body 3.0" (CT, 20 slices of 3 mm, PARTIALBODY')
    with pytest.raises(ImageError, match="holds 3 DICOM series"):
        read_image(mixed)
    image = read_image(mixed, series="3", dtype=None)
    np.testing.assert_array_equal(image.array, read_image(ct_dir / "example_ct_dicom", dtype=None).array)


def test_missing_slice_is_refused_naming_its_position(ct_dir: Path, tmp_path: Path) -> None:
    folder = copy_series(ct_dir / "example_ct_dicom", tmp_path / "gap")
    files = files_by_position(folder)
    files[9].unlink()  # slice 10 of 20: z = -804.5 + 9 x 2.0 = -786.5 mm
    with pytest.raises(ImageError) as info:
        read_image(folder)
    message = str(info.value)
    assert "\n" not in message and "1 slice(s) missing" in message and "every 2 mm from -804.50 to -766.50" in message
    assert "expected at x y z = (-249.51 -437.51 -786.50) mm" in message and "or pass --allow-gaps" in message
    files[3].unlink()
    files[4].unlink()  # two more, next to each other
    with pytest.raises(ImageError, match=r"3 slice\(s\) missing.*\(-249\.51 -437\.51 -798\.50\); \(-249\.51 -437\.51 -796\.50\); \(-249\.51 -437\.51 -786\.50\)"):
        read_image(folder)


def test_allow_gaps_reads_the_slices_where_they_are(ct_dir: Path, tmp_path: Path) -> None:
    whole = read_image(ct_dir / "example_ct_dicom", dtype=None)
    folder = copy_series(ct_dir / "example_ct_dicom", tmp_path / "gap")
    files_by_position(folder)[9].unlink()
    image = read_image(folder, dtype=None, allow_gaps=True)
    assert image.shape == whole.shape == (512, 512, 20)
    np.testing.assert_allclose(image.affine, whole.affine, atol=1e-6)  # 2.0 mm, not 38 / 18 = 2.11 mm
    present = [k for k in range(20) if k != 9]
    np.testing.assert_array_equal(image.array[:, :, present], whole.array[:, :, present])
    between = np.round((whole.array[:, :, 8].astype(np.float32) + whole.array[:, :, 10]) / 2)
    np.testing.assert_array_equal(image.array[:, :, 9], between.astype(np.int16))
    assert image.source.slice_index == present and image.source.slice_count == 20
    (note,) = image.notes
    assert note.startswith("1 slice(s) missing") and "interpolated from their neighbours" in note
    # irregular spacing and tilt are still refused with allow_gaps (they are not gaps)


def test_allow_gaps_end_to_end_warns_and_the_mask_overlays_the_ct(ct_dir: Path, tiny_model_file: Path, tmp_path: Path,
                                                                   capfd) -> None:
    folder = copy_series(ct_dir / "example_ct_dicom", tmp_path / "gap")
    files_by_position(folder)[9].unlink()
    out = tmp_path / "m.nii.gz"
    code = main(["predict", str(folder), "-o", str(out), "--model", str(tiny_model_file), "--allow-gaps"])
    stdout, err = capfd.readouterr()
    assert code == 0, err
    assert "warning: 1 slice(s) missing from an evenly spaced series" in stdout
    assert err == ""  # the warning is ours, once; ITK's own is not printed as well
    mask = nib.load(out)
    assert mask.shape == (512, 512, 20)
    np.testing.assert_allclose(mask.affine, read_image(ct_dir / "example_ct_dicom").affine, atol=1e-4)


def test_irregular_spacing_is_refused(ct_dir: Path, tmp_path: Path) -> None:
    import pydicom

    folder = copy_series(ct_dir / "example_ct_dicom", tmp_path / "irregular")
    last = files_by_position(folder)[-1]
    ds = pydicom.dcmread(last)
    ds.ImagePositionPatient = [*list(ds.ImagePositionPatient)[:2], float(ds.ImagePositionPatient[2]) + 0.7]
    ds.save_as(last)
    with pytest.raises(ImageError, match=r"slice spacing is irregular \(2\.00 to 2\.70 mm"):
        read_image(folder)


def test_gantry_tilt_is_refused_with_its_angle(ct_dir: Path, tmp_path: Path) -> None:
    folder = acrin_part(ct_dir, tmp_path / "tilted", series=2)
    tilt(folder, 15.0)
    with pytest.raises(ImageError) as info:
        read_image(folder)
    message = str(info.value)
    assert "gantry tilt of about 15.0 degrees" in message and "resample the series first" in message
    assert "\n" not in message


def test_duplicated_file_is_skipped_with_a_note_but_two_images_at_one_place_are_refused(ct_dir: Path, tmp_path: Path) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    folder = acrin_part(ct_dir, tmp_path / "dup", series=2)
    shutil.copy2(folder / "1-155.dcm", folder / "copy of 1-155.dcm")  # the same instance twice (a second export)
    image = read_image(folder, dtype=None)
    clean = read_image(acrin_part(ct_dir, tmp_path / "clean", series=2), dtype=None)
    np.testing.assert_array_equal(image.array, clean.array)
    np.testing.assert_allclose(image.affine, clean.affine)
    assert len(image.source.files) == 12
    assert image.notes == ["skipped 1 duplicate file(s) of slices already read: copy of 1-155.dcm"]
    ds = pydicom.dcmread(folder / "copy of 1-155.dcm")
    ds.SOPInstanceUID = generate_uid()  # now another image at the same position
    ds.save_as(folder / "copy of 1-155.dcm")
    with pytest.raises(ImageError, match=r"1-155\.dcm and copy of 1-155\.dcm are different images at the same position"):
        read_image(folder)


def test_no_dicom_in_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ImageError, match="holds no DICOM series"):
        read_image(tmp_path)
    assert scan_folder(tmp_path) == []


def test_select_series_reports_what_the_batch_records(ct_dir: Path) -> None:
    series = select_series(ct_dir / "acrin_flt_breast_001_exam_dicom", "1")
    assert series.as_dict() == {
        "uid": ACRIN_SERIES_1, "description": "PET-CT SERIES", "modality": "CT", "series_number": "2",
        "slices": 12, "slice_thickness_mm": 5.0, "body_part": "BREAST",
    }


# -------------------------------------------------------------------------------- NaN voxels
def test_scattered_nan_voxels_become_air_with_a_note(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).normal(40, 20, (10, 9, 8)).astype(np.float32)
    arr[0, :, :] = np.nan  # a resampled image's outside-the-field-of-view border
    nib.save(nib.Nifti1Image(arr, np.diag([0.8, 0.8, 2.5, 1.0])), tmp_path / "ct.nii.gz")
    image = read_image(tmp_path / "ct.nii.gz")
    assert np.all(image.array[0] == -1000.0)
    np.testing.assert_array_equal(image.array[1:], arr[1:])
    assert image.notes == ["72 NaN voxel(s) (10 % of the image, typically outside a resampled field of view) were treated as air (-1000 HU)"]


def test_nan_note_reaches_the_cli_output_and_all_nan_is_refused(ct_dir: Path, tiny_model_file: Path, tmp_path: Path, capsys) -> None:
    ct = nib.load(ct_dir / "example_ct_sm.nii.gz")
    arr = np.asarray(ct.dataobj, dtype=np.float32)
    arr[:10, :, :] = np.nan
    nib.save(nib.Nifti1Image(arr, ct.affine), tmp_path / "nan.nii.gz")
    code = main(["predict", str(tmp_path / "nan.nii.gz"), "-o", str(tmp_path / "m.nii.gz"), "--model", str(tiny_model_file)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "warning: 30300 NaN voxel(s) (8.2 % of the image" in out and "treated as air (-1000 HU)" in out
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), np.nan, np.float32), np.eye(4)), tmp_path / "allnan.nii.gz")
    code = main(["predict", str(tmp_path / "allnan.nii.gz"), "-o", str(tmp_path / "n.nii.gz"), "--model", str(tiny_model_file)])
    _, err = capsys.readouterr()
    assert code == 2 and "is all NaN" in err and err.count("\n") == 1 and not (tmp_path / "n.nii.gz").exists()

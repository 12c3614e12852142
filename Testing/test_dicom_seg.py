"""DICOM SEG output, read back with highdicom / pydicom and with dcmqi's segimage2itkimage (what Slicer's
QuantitativeReporting uses): references, terminology, colour, algorithm, and geometry voxel by voxel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from dicom_helpers import ACRIN_SERIES_2, acrin_part, copy_series, give_uids

from vnetseg.checkpoint import SPLEEN_LABELS
from vnetseg.cli import main
from vnetseg.dicom_seg import Algorithm, parse_terminology
from vnetseg.io import SegmentSpec, affine_from_sitk, read_image, write_mask

hd = pytest.importorskip("highdicom", reason="DICOM SEG output needs highdicom (requirements-ci.txt)")
pydicom = pytest.importorskip("pydicom")
SEGMENTS = [SegmentSpec(lab.value, lab.name, lab.color, lab.terminology) for lab in SPLEEN_LABELS]
ALGORITHM = Algorithm("spleen-test-model", "2.3.4", "0123456789abcdef" * 4)


def segimage2itkimage() -> str:
    exe = Path(sys.executable).parent / "segimage2itkimage"
    if not exe.exists():
        pytest.skip("dcmqi's segimage2itkimage is not installed (pip install dcmqi; in requirements-ci.txt)")
    return str(exe)


@pytest.fixture(params=["acrin_series_2", "example_ct_dicom"])
def source(request, ct_dir: Path, tmp_path: Path) -> Path:
    """Two real series: uncompressed 5 mm slices 4.25 mm apart, and JPEG 2000 2 mm slices (UIDs filled in)."""
    if request.param == "acrin_series_2":
        return acrin_part(ct_dir, tmp_path / "ct", series=2)
    folder = copy_series(ct_dir / "example_ct_dicom", tmp_path / "ct")
    give_uids(folder)
    return folder


def _mask(ct: np.ndarray) -> np.ndarray:
    """A real-anatomy mask with a known answer: dense tissue (> 150 HU), none in the first 3 and last 2 slices."""
    mask = (ct > 150).astype(np.uint8)
    mask[:, :, :3] = 0
    mask[:, :, -2:] = 0
    return mask


def test_seg_references_the_source_and_carries_terminology_colour_algorithm(source: Path, tmp_path: Path) -> None:
    image = read_image(source, dtype=None)
    mask = _mask(image.array)
    out = write_mask(tmp_path / "spleen.dcm", mask, image.affine, SEGMENTS, source=image.source, algorithm=ALGORITHM)
    seg = hd.seg.segread(str(out))
    src = [pydicom.dcmread(f, stop_before_pixels=True) for f in image.source.files]
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == src[0].StudyInstanceUID and seg.FrameOfReferenceUID == src[0].FrameOfReferenceUID
    assert seg.SeriesInstanceUID != src[0].SeriesInstanceUID
    (ref_series,) = seg.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == src[0].SeriesInstanceUID
    assert sorted(r.ReferencedSOPInstanceUID for r in ref_series.ReferencedInstanceSequence) == sorted(s.SOPInstanceUID for s in src)
    (desc,) = seg.SegmentSequence
    assert desc.SegmentLabel == "Spleen" and desc.SegmentAlgorithmType == "AUTOMATIC"
    category, kind = desc.SegmentedPropertyCategoryCodeSequence[0], desc.SegmentedPropertyTypeCodeSequence[0]
    assert (category.CodingSchemeDesignator, category.CodeValue, category.CodeMeaning) == ("SCT", "123037004", "Anatomical Structure")
    assert (kind.CodingSchemeDesignator, kind.CodeValue, kind.CodeMeaning) == ("SCT", "78961009", "Spleen")
    assert hd.color.CIELabColor.from_dicom_value(tuple(desc.RecommendedDisplayCIELabValue)).to_rgb() == (157, 108, 162)
    (algo,) = desc.SegmentationAlgorithmIdentificationSequence
    assert algo.AlgorithmName == "spleen-test-model" and algo.AlgorithmVersion == "2.3.4"
    assert algo.AlgorithmParameters == f"model_sha256={'0123456789abcdef' * 4}"
    assert algo.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"


def test_seg_frames_lie_exactly_on_the_source_slices(source: Path, tmp_path: Path) -> None:
    image = read_image(source, dtype=None)
    mask = _mask(image.array)
    out = write_mask(tmp_path / "spleen.dcm", mask, image.affine, SEGMENTS, source=image.source, algorithm=ALGORITHM)
    seg = pydicom.dcmread(out)
    src = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in image.source.files)}
    k_of = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: k for k, f in enumerate(image.source.files)}
    frames = seg.pixel_array.reshape(-1, *seg.pixel_array.shape[-2:])
    nonempty = [k for k in range(mask.shape[2]) if mask[:, :, k].any()]
    assert len(frames) == len(nonempty) < mask.shape[2]  # empty slices omitted, as SEG usually does
    seen = []
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in src[uid].ImagePositionPatient], atol=1e-4)
        np.testing.assert_array_equal(frame, mask[:, :, k_of[uid]].T)  # rows x columns of that very slice
        seen.append(k_of[uid])
    assert sorted(seen) == nonempty
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
                               [float(v) for v in next(iter(src.values())).PixelSpacing])
    # highdicom's own reader puts the frames back on the source instances
    hseg = hd.seg.segread(str(out))
    back = hseg.get_pixels_by_source_instance([uid for uid in k_of], segment_numbers=[1])[..., 0]
    for uid, k in k_of.items():
        np.testing.assert_array_equal(back[list(k_of).index(uid)], mask[:, :, k].T)


def test_dcmqi_reads_it_back_on_the_ct_voxel_by_voxel_in_physical_space(source: Path, tmp_path: Path) -> None:
    exe = segimage2itkimage()
    image = read_image(source, dtype=None)
    mask = _mask(image.array)
    out = write_mask(tmp_path / "spleen.dcm", mask, image.affine, SEGMENTS, source=image.source, algorithm=ALGORITHM)
    conv = tmp_path / "dcmqi"
    conv.mkdir()
    proc = subprocess.run([exe, "--inputDICOM", str(out), "--outputDirectory", str(conv), "-t", "nrrd"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    back = sitk.ReadImage(str(conv / "1.nrrd"))
    # where each dcmqi voxel lies in the CT's voxel grid (physical space, RAS): whole indices, same axes
    to_ct = np.linalg.inv(image.affine) @ affine_from_sitk(back)
    np.testing.assert_allclose(to_ct[:3, :3], np.eye(3), atol=1e-4)
    offset = np.round(to_ct[:3, 3]).astype(int)
    np.testing.assert_allclose(to_ct[:3, 3], offset, atol=1e-3)
    values = sitk.GetArrayFromImage(back).transpose(2, 1, 0)
    on_ct = np.zeros_like(mask)
    lo, hi = offset, offset + np.array(values.shape)
    assert np.all(lo >= 0) and np.all(hi <= mask.shape)
    on_ct[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = values
    np.testing.assert_array_equal(on_ct, mask)
    (attrs,) = json.loads((conv / "meta.json").read_text())["segmentAttributes"][0:1]
    assert attrs[0]["SegmentedPropertyTypeCodeSequence"]["CodeValue"] == "78961009"
    assert attrs[0]["SegmentedPropertyCategoryCodeSequence"]["CodeValue"] == "123037004"
    assert attrs[0]["recommendedDisplayRGBValue"] == [157, 108, 162] and attrs[0]["SegmentAlgorithmName"] == "spleen-test-model"


def test_series_with_a_gap_gets_frames_on_its_real_slices_only(ct_dir: Path, tmp_path: Path) -> None:
    from dicom_helpers import files_by_position

    folder = copy_series(ct_dir / "example_ct_dicom", tmp_path / "ct")
    give_uids(folder)
    files_by_position(folder)[9].unlink()
    image = read_image(folder, dtype=None, allow_gaps=True)
    mask = (image.array > 150).astype(np.uint8)  # on the regular grid, the interpolated slice 9 included
    assert mask[:, :, 9].any()
    out = write_mask(tmp_path / "gap.dcm", mask, image.affine, SEGMENTS, source=image.source, algorithm=ALGORITHM)
    seg = pydicom.dcmread(out)
    assert seg.NumberOfFrames == 19
    conv = tmp_path / "dcmqi"
    conv.mkdir()
    proc = subprocess.run([segimage2itkimage(), "--inputDICOM", str(out), "--outputDirectory", str(conv), "-t", "nrrd"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    back = sitk.ReadImage(str(conv / "1.nrrd"))
    to_ct = np.linalg.inv(image.affine) @ affine_from_sitk(back)
    np.testing.assert_allclose(to_ct, np.eye(4), atol=1e-3)  # dcmqi puts it on the regular 2 mm grid, slice 0 first
    values = sitk.GetArrayFromImage(back).transpose(2, 1, 0)
    expected = mask.copy()
    expected[:, :, 9] = 0  # no source image there, so no frame: the SEG holds only what was acquired
    np.testing.assert_array_equal(values, expected)


def test_empty_result_writes_a_valid_empty_segmentation(ct_dir: Path, tmp_path: Path) -> None:
    image = read_image(acrin_part(ct_dir, tmp_path / "ct", series=2), dtype=None)
    out = write_mask(tmp_path / "empty.dcm", np.zeros(image.shape, np.uint8), image.affine, SEGMENTS,
                     source=image.source, algorithm=ALGORITHM)
    seg = hd.seg.segread(str(out))
    assert seg.NumberOfFrames == 12 and not seg.pixel_array.any() and seg.SegmentSequence[0].SegmentLabel == "Spleen"
    conv = tmp_path / "dcmqi"
    conv.mkdir()
    proc = subprocess.run([segimage2itkimage(), "--inputDICOM", str(out), "--outputDirectory", str(conv), "-t", "nrrd"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    back = sitk.ReadImage(str(conv / "1.nrrd"))
    assert back.GetSize() == image.shape and not sitk.GetArrayViewFromImage(back).any()


def test_mask_off_the_source_grid_or_non_dicom_source_is_refused(ct_dir: Path, tmp_path: Path) -> None:
    image = read_image(acrin_part(ct_dir, tmp_path / "ct", series=2), dtype=None)
    shifted = image.affine.copy()
    shifted[2, 3] += 2.0
    with pytest.raises(ValueError, match="mask slice 0 lies at .* but source image 1-161.dcm at"):
        write_mask(tmp_path / "s.dcm", np.zeros(image.shape, np.uint8), shifted, SEGMENTS, source=image.source)
    with pytest.raises(ValueError, match=r"is not the source series' grid \(512, 512, 12\)"):
        write_mask(tmp_path / "s.dcm", np.zeros((512, 512, 11), np.uint8), image.affine, SEGMENTS, source=image.source)
    with pytest.raises(ValueError, match="needs a DICOM series as input"):
        write_mask(tmp_path / "s.dcm", np.zeros(image.shape, np.uint8), image.affine, SEGMENTS, source=None)
    assert not list(tmp_path.glob("*.dcm")) and not list(tmp_path.glob(".s*"))


def test_parse_terminology_reads_slicer_tags() -> None:
    assert parse_terminology(SEGMENTS[0].terminology) == (("SCT", "123037004", "Anatomical Structure"), ("SCT", "78961009", "Spleen"))
    with pytest.raises(ValueError, match="not a 'SCHEME\\^value\\^meaning' code"):
        parse_terminology("ctx~SCT^1~SCT^2^x")


# ----------------------------------------------------------------------------------- the command
def test_cli_dicom_seg_matches_the_nifti_mask_of_the_same_run(ct_dir: Path, tiny_model_file: Path, tmp_path: Path, capsys) -> None:
    folder = ct_dir / "acrin_flt_breast_001_exam_dicom"
    common = ["predict", str(folder), "--series", ACRIN_SERIES_2, "--model", str(tiny_model_file), "--device", "cpu"]
    assert main([*common, "-o", str(tmp_path / "spleen.dcm")]) == 0, capsys.readouterr().err
    out, _ = capsys.readouterr()
    assert f'series: {ACRIN_SERIES_2} "PET-CT SERIES" (12 slices)' in out
    assert main([*common, "-o", str(tmp_path / "spleen.nii.gz")]) == 0
    capsys.readouterr()
    nifti = np.asarray(nib.load(tmp_path / "spleen.nii.gz").dataobj)
    seg = hd.seg.segread(str(tmp_path / "spleen.dcm"))
    image = read_image(folder, series="2")
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in image.source.files]
    back = seg.get_pixels_by_source_instance(uids, segment_numbers=[1], assert_missing_frames_are_empty=True)[..., 0]
    np.testing.assert_array_equal(back.transpose(2, 1, 0), nifti)
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "tiny random test model"


def test_cli_dicom_seg_needs_dicom_input_and_uids(ct_dir: Path, tiny_model_file: Path, tmp_path: Path, capsys) -> None:
    code = main(["predict", str(ct_dir / "example_ct_sm.nii.gz"), "-o", str(tmp_path / "s.dcm"), "--model", str(tiny_model_file)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "this input is not a DICOM series; give the DICOM folder" in err
    code = main(["predict", str(ct_dir / "example_ct_dicom"), "-o", str(tmp_path / "s.dcm"), "--model", str(tiny_model_file)])
    err = capsys.readouterr().err
    assert code == 2 and "have no Study, Series, SOP (Instance) UID (blanked by de-identification?)" in err
    assert not list(tmp_path.iterdir())

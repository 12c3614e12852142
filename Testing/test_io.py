"""Image I/O: one convention (I, J, K) + voxel->RAS, across nibabel, SimpleITK, NRRD, DICOM, .seg.nrrd."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from vnetseg.checkpoint import SPLEEN_TERMINOLOGY
from vnetseg.io import (
    Image,
    ImageError,
    SegmentSpec,
    affine_from_sitk,
    array_affine_to_sitk,
    fortran_layout,
    read_image,
    write_mask,
    write_nifti,
    write_seg_nrrd,
)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_affine(kind: str, spacing=(0.8, 0.9, 2.5), origin=(-120.0, 35.5, -410.0)) -> np.ndarray:
    """Voxel->RAS affines of the orientations a user may bring."""
    directions = {
        "RAS": np.eye(3),
        "LPS": np.diag([-1.0, -1.0, 1.0]),
        "LAS": np.diag([-1.0, 1.0, 1.0]),  # left-handed
        "PIR": np.array([[0, 0, 1.0], [-1.0, 0, 0], [0, -1.0, 0]]),  # permuted axes
        "oblique": _rotation(0.2, -0.15, 0.35),
        "oblique_left_handed": _rotation(0.1, 0.3, -0.2) @ np.diag([1.0, -1.0, 1.0]),
    }
    aff = np.eye(4)
    aff[:3, :3] = directions[kind] * np.asarray(spacing)[None, :]
    aff[:3, 3] = origin
    return aff


ORIENTATIONS = ["RAS", "LPS", "LAS", "PIR", "oblique", "oblique_left_handed"]


def _volume(shape=(13, 11, 7), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.int16)


@pytest.mark.parametrize("kind", ORIENTATIONS)
def test_nifti_written_by_nibabel_reads_identically_with_simpleitk(tmp_path: Path, kind: str) -> None:
    arr, aff = _volume(), make_affine(kind)
    nib.save(nib.Nifti1Image(arr, aff), tmp_path / "ct.nii.gz")
    ours = read_image(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(ours.array, arr.astype(np.float32))
    np.testing.assert_allclose(ours.affine, aff, atol=1e-5)
    # SimpleITK reads the same file in LPS with reversed axes; converted, it is the same image
    img = sitk.ReadImage(str(tmp_path / "ct.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), arr)
    np.testing.assert_allclose(affine_from_sitk(img), aff, atol=1e-4)


@pytest.mark.parametrize("kind", ORIENTATIONS)
@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii"])
def test_round_trip_through_simpleitk_formats(tmp_path: Path, kind: str, suffix: str) -> None:
    arr, aff = _volume(seed=1), make_affine(kind)
    sitk.WriteImage(array_affine_to_sitk(arr, aff), str(tmp_path / f"ct{suffix}"))
    ours = read_image(tmp_path / f"ct{suffix}")
    np.testing.assert_array_equal(ours.array, arr)
    np.testing.assert_allclose(ours.affine, aff, atol=1e-4)
    np.testing.assert_allclose(ours.spacing, [0.8, 0.9, 2.5], atol=1e-5)


@pytest.mark.parametrize("kind", ORIENTATIONS)
def test_write_nifti_keeps_the_grid_exactly(tmp_path: Path, kind: str) -> None:
    mask = (_volume(seed=2) > 0).astype(np.uint8)
    aff = make_affine(kind)
    write_nifti(tmp_path / "m.nii.gz", mask, aff)
    back = nib.load(tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(np.asarray(back.dataobj), mask)
    np.testing.assert_allclose(back.affine, aff, atol=1e-5)
    assert back.get_data_dtype() == np.uint8


@pytest.mark.parametrize("kind", ["RAS", "LPS", "oblique_left_handed"])
def test_seg_nrrd_is_read_by_slicerio_with_name_colour_terminology_and_geometry(tmp_path: Path, kind: str) -> None:
    mask = np.zeros((20, 18, 9), np.uint8)
    mask[4:9, 5:12, 2:6] = 1
    aff = make_affine(kind)
    spec = SegmentSpec(1, "Spleen", (157, 108, 162), SPLEEN_TERMINOLOGY)
    write_seg_nrrd(tmp_path / "s.seg.nrrd", mask, aff, [spec])
    seg = slicerio.read_segmentation(str(tmp_path / "s.seg.nrrd"))
    (segment,) = seg["segments"]
    assert segment["name"] == "Spleen" and segment["labelValue"] == 1
    np.testing.assert_allclose(segment["color"], np.array([157, 108, 162]) / 255, atol=1e-5)
    assert segment["terminology"]["type"] == ["SCT", "78961009", "Spleen"]
    assert segment["terminology"]["category"] == ["SCT", "123037004", "Anatomical Structure"]
    # geometry: slicerio gives IJK->LPS; voxels as (I, J, K)
    ijk_to_ras = np.diag([-1.0, -1, 1, 1]) @ np.asarray(seg["ijkToLPS"])
    np.testing.assert_allclose(ijk_to_ras, aff, atol=1e-4)
    np.testing.assert_array_equal(seg["voxels"], mask)


def test_write_mask_follows_the_extension_and_never_overwrites(tmp_path: Path) -> None:
    mask, aff = np.ones((4, 4, 4), np.uint8), make_affine("RAS")
    spec = [SegmentSpec(1, "Spleen", (157, 108, 162))]
    write_mask(tmp_path / "a.nii.gz", mask, aff, spec)
    write_mask(tmp_path / "a.seg.nrrd", mask, aff, spec)
    assert (tmp_path / "a.seg.nrrd").read_bytes().startswith(b"NRRD")
    before = (tmp_path / "a.nii.gz").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_mask(tmp_path / "a.nii.gz", np.zeros((4, 4, 4), np.uint8), aff, spec)
    assert (tmp_path / "a.nii.gz").read_bytes() == before
    with pytest.raises(ValueError, match="use a .nii.gz"):
        write_mask(tmp_path / "a.png", mask, aff, spec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "a.seg.nrrd"]  # no temporary left


def test_real_dicom_series_and_its_label_map_share_physical_space(ct_dir: Path) -> None:
    ct = read_image(ct_dir / "example_ct_dicom")
    assert ct.shape == (512, 512, 20)
    np.testing.assert_allclose(ct.spacing, [0.9765625, 0.9765625, 2.0], atol=1e-5)
    assert ct.array.min() == -1024 and ct.array.max() == 1839
    lab = read_image(ct_dir / "example_ct_dicom_multilabel_v2.nii.gz")
    assert lab.shape == ct.shape
    # the label map is stored LAS, the CT LPS: same voxel centres in RAS, with j reversed
    flip_j = np.eye(4)
    flip_j[1, 1], flip_j[1, 3] = -1, ct.shape[1] - 1
    np.testing.assert_allclose(ct.affine @ flip_j, lab.affine, atol=1e-3)
    spleen = lab.array[:, ::-1, :] == 1
    assert int(spleen.sum()) == 130634
    assert 40 < float(np.median(ct.array[spleen])) < 200  # soft tissue in HU where the label says spleen
    assert float(np.median(ct.array[lab.array == 1])) < 0  # ignoring the flip would land in fat and air


def test_real_nifti_reads_with_its_affine(ct_dir: Path) -> None:
    ct = read_image(ct_dir / "example_ct.nii.gz")
    assert ct.shape == (122, 101, 112) and ct.array.dtype == np.float32
    np.testing.assert_allclose(ct.affine, nib.load(ct_dir / "example_ct.nii.gz").affine)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda d: d / "missing.nii.gz", "does not exist"),
        (lambda d: (d / "x.txt").write_text("x") and d / "x.txt", "unknown image format"),
        (lambda d: (d / "bad.nii.gz").write_bytes(b"not nifti") and d / "bad.nii.gz", "not a readable NIfTI"),
        (lambda d: _save(d / "flat.nii.gz", np.ones((10, 10, 1)) * np.arange(10)[:, None, None]), "2D"),
        (lambda d: _save(d / "four.nii.gz", np.random.rand(6, 6, 6, 3)), "4D"),
        (lambda d: _save(d / "empty.nii.gz", np.zeros((6, 6, 6))), "empty"),
        (lambda d: _save(d / "nan.nii.gz", np.full((6, 6, 6), np.nan, np.float32)), "NaN"),
        (lambda d: _save_zero_spacing(d / "zero.nii.gz"), "zero or degenerate"),
        (lambda d: d, "no DICOM series"),
    ],
)
def test_bad_inputs_get_one_clear_error(tmp_path: Path, make, match: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ImageError, match=match):
        read_image(path)


def _save(path: Path, arr: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(arr, dtype=np.float32), np.eye(4) if affine is None else affine), path)
    return path


def _save_zero_spacing(path: Path) -> Path:
    img = nib.Nifti1Image(np.random.rand(6, 6, 6).astype(np.float32), None)
    img.header["pixdim"][1:4] = [1.0, 0.0, 1.0]  # a broken header: no qform/sform, zero voxel size
    nib.save(img, path)
    return path


def test_image_properties() -> None:
    img = Image(np.zeros((2, 3, 4), np.float32), make_affine("oblique", spacing=(2.0, 3.0, 4.0)))
    np.testing.assert_allclose(img.spacing, [2, 3, 4])
    assert img.voxel_volume_ml == pytest.approx(0.024)


def test_stored_type_can_be_kept_to_save_memory(ct_dir: Path) -> None:
    kept = read_image(ct_dir / "example_ct_sm.nii.gz", dtype=None)
    assert kept.array.dtype == np.int16  # as stored: half the memory of float32
    np.testing.assert_array_equal(kept.array, read_image(ct_dir / "example_ct_sm.nii.gz").array)
    dicom = read_image(ct_dir / "example_ct_dicom", dtype=None)
    assert np.issubdtype(dicom.array.dtype, np.integer) and dicom.array.min() == -1024


def test_all_background_label_map_is_accepted_when_asked(tmp_path: Path) -> None:
    _save(tmp_path / "bg.nii.gz", np.zeros((6, 6, 6)))
    with pytest.raises(ImageError, match="empty"):
        read_image(tmp_path / "bg.nii.gz")
    assert read_image(tmp_path / "bg.nii.gz", allow_uniform=True).array.max() == 0


def test_ras_convention_matches_the_anatomy_of_the_real_ct(ct_dir: Path) -> None:
    """RAS+: x grows towards the patient's right. The liver (label 5) is right, the spleen (1) left."""
    labels = read_image(ct_dir / "example_ct_multilabel_v1.nii.gz")
    centre = {v: labels.affine @ np.r_[np.argwhere(labels.array == v).mean(0), 1.0] for v in (1, 5)}
    assert centre[5][0] - centre[1][0] > 100.0  # liver is 100+ mm to the right (+x) of the spleen


# ------------------------------------------------------------------------------ permissions
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_honour_the_umask_and_replaced_files_keep_their_mode(tmp_path: Path, umask: int) -> None:
    import os

    from vnetseg.checkpoint import SPLEEN_LABELS

    segments = [SegmentSpec(lab.value, lab.name, lab.color, lab.terminology) for lab in SPLEEN_LABELS]
    mask = np.zeros((6, 5, 4), np.uint8)
    mask[2:4, 1:3, 1:3] = 1
    old = os.umask(umask)
    try:
        for name in ("m.nii.gz", "m.seg.nrrd"):
            out = write_mask(tmp_path / name, mask, np.eye(4), segments)
            assert out.stat().st_mode & 0o777 == 0o666 & ~umask, name  # what open(..., "w") would give
            os.chmod(out, 0o640)  # the user's choice for this file survives --overwrite
            write_mask(out, mask, np.eye(4), segments, overwrite=True)
            assert out.stat().st_mode & 0o777 == 0o640
        assert not list(tmp_path.glob(".*"))
    finally:
        os.umask(old)


def test_cli_outputs_and_report_honour_the_umask_in_a_real_process(ct_dir: Path, tiny_model_file: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    for umask in (0o022, 0o007):
        out = tmp_path / f"u{umask:o}"
        code = (f"import os, sys; os.umask({umask}); from vnetseg.cli import main; "
                f"sys.exit(main(['predict', {str(ct_dir / 'example_ct_sm.nii.gz')!r}, '--output-dir', {str(out / 'masks')!r}, "
                f"'--model', {str(tiny_model_file)!r}, '--report', {str(out / 'report.json')!r}, '--format', 'seg.nrrd']))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr
        for f in (out / "masks" / "example_ct_sm_spleen.seg.nrrd", out / "report.json"):
            assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


@pytest.mark.parametrize("case", ["box", "edges", "empty", "float_nan", "fortran", "view"])
def test_fortran_layout_keeps_every_value(case: str) -> None:
    """Writers get the array in Fortran order; copying only the non-zero box must keep every voxel."""
    rng = np.random.default_rng(11)
    arr = np.zeros((23, 17, 9), dtype=np.uint8)
    if case == "box":
        arr[5:9, 3:12, 2:4] = rng.integers(0, 3, (4, 9, 2))
    elif case == "edges":  # non-zero voxels on opposite corners: the box is the whole grid
        arr[0, 0, 0] = arr[-1, -1, -1] = arr[0, -1, 4] = 1
    elif case == "float_nan":
        arr = np.zeros((23, 17, 9), dtype=np.float32)
        arr[3, 4, 5], arr[10, 2, 8] = np.nan, -0.25
    elif case == "fortran":
        arr = np.asfortranarray(rng.integers(0, 2, arr.shape).astype(np.uint8))
    elif case == "view":  # a reversed, strided view, as reorientation gives
        arr = rng.integers(0, 2, (46, 17, 9)).astype(np.uint8)[::-2, ::-1]
    out = fortran_layout(arr)
    assert out.flags.f_contiguous and out.shape == arr.shape and out.dtype == arr.dtype
    np.testing.assert_array_equal(out, arr)  # NaN == NaN here
    if case == "fortran":
        assert out is arr  # already in order: no copy


def test_c_ordered_mask_written_as_nifti_reads_back_voxel_for_voxel(tmp_path: Path) -> None:
    """A C-ordered mask (as the pipeline makes it) goes through the box copy on its way to the file."""
    mask = np.zeros((40, 30, 12), dtype=np.uint8)
    mask[7:19, 4:25, 3:10] = np.random.default_rng(2).integers(0, 2, (12, 21, 7))
    affine = make_affine("LPS", spacing=(0.8, 0.8, 2.5))
    path = write_nifti(tmp_path / "m.nii.gz", mask, affine)
    back = nib.load(str(path))
    np.testing.assert_array_equal(np.asarray(back.dataobj), mask)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    img = array_affine_to_sitk(mask, affine)  # SimpleITK's (K, J, I) buffer from the same box copy
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), mask)

"""MSD reading and checking, folds, the preprocessing cache, and the synthetic phantoms."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from training_helpers import blob_case, write_case, write_dataset

from training.cache import cache_dir_for, ensure_cached, load_cached, preprocess_case
from training.data import (
    Case,
    CaseError,
    DatasetError,
    MSDDataset,
    fold_cases,
    load_case,
    load_or_make_folds,
    make_folds,
    read_msd,
)
from training.synthetic import PhantomSettings, make_case, reorient, write_synthetic_task
from vnetseg.checkpoint import Preprocessing

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


@pytest.fixture()
def blob_msd(tmp_path: Path) -> Path:
    pairs = []
    for n in range(3):
        image, label = blob_case(seed=n)
        pairs.append(write_case(tmp_path, f"blob_{n}", image, label, AFFINE))
    write_dataset(tmp_path, pairs)
    return tmp_path


def test_read_msd_reads_pairs_labels_and_skips_macos_junk(blob_msd: Path) -> None:
    # the official archive ships ._<case>.nii.gz resource files (not NIfTI at all)
    for sub in ("imagesTr", "labelsTr"):
        (blob_msd / sub / "._blob_0.nii.gz").write_bytes(b"\x00\x05\x16\x07Mac OS X junk")
    meta = json.loads((blob_msd / "dataset.json").read_text())
    meta["training"].append({"image": "./imagesTr/._blob_0.nii.gz", "label": "./labelsTr/._blob_0.nii.gz"})
    (blob_msd / "dataset.json").write_text(json.dumps(meta))
    ds = read_msd(blob_msd)
    assert isinstance(ds, MSDDataset)
    assert ds.root == blob_msd
    assert ds.labels == {0: "background", 1: "spleen"}
    assert ds.case_names == ["blob_0", "blob_1", "blob_2"]
    assert ds.cases[1] == Case("blob_1", blob_msd / "imagesTr/blob_1.nii.gz", blob_msd / "labelsTr/blob_1.nii.gz")
    image, label = load_case(ds.cases[0], ds.labels)
    assert image.shape == label.shape == (24, 20, 16)
    assert set(np.unique(label)) == {0, 1}


def test_missing_dataset_json_and_empty_folder_are_clear_errors(tmp_path: Path, blob_msd: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"empty.*no dataset.json|no dataset.json.*is empty"):
        read_msd(empty)
    (blob_msd / "dataset.json").unlink()
    with pytest.raises(DatasetError, match="no dataset.json.*imagesTr"):
        read_msd(blob_msd)
    with pytest.raises(DatasetError, match="does not exist"):
        read_msd(tmp_path / "nowhere")


def test_dataset_json_without_cases_or_with_bad_labels(tmp_path: Path) -> None:
    write_dataset(tmp_path, [])
    with pytest.raises(DatasetError, match="lists no training cases"):
        read_msd(tmp_path)
    write_dataset(tmp_path, [("a", "b")], labels={"0": "background", "2": "spleen"})
    with pytest.raises(DatasetError, match="numbered 0"):
        read_msd(tmp_path)


def test_missing_file_names_the_case(blob_msd: Path) -> None:
    (blob_msd / "labelsTr" / "blob_2.nii.gz").unlink()
    with pytest.raises(CaseError, match="case 'blob_2'.*label file .* does not exist"):
        read_msd(blob_msd)


def test_grid_mismatch_names_the_case(tmp_path: Path) -> None:
    image, label = blob_case()
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0  # label 5 mm away from the image
    pairs = [write_case(tmp_path, "good", image, label, AFFINE),
             write_case(tmp_path, "moved", image, label, AFFINE, shifted)]
    write_case(tmp_path, "cropped", image, label[:, :, :-1], AFFINE)
    write_dataset(tmp_path, [*pairs, ("./imagesTr/cropped.nii.gz", "./labelsTr/cropped.nii.gz")])
    ds = read_msd(tmp_path)
    load_case(ds.case("good"), ds.labels)
    with pytest.raises(CaseError, match=r"case 'moved'.*grids differ by up to 5 mm"):
        load_case(ds.case("moved"), ds.labels)
    with pytest.raises(CaseError, match=r"case 'cropped'.*shape \(24, 20, 16\).*\(24, 20, 15\)"):
        load_case(ds.case("cropped"), ds.labels)


def test_unknown_label_values_name_the_case_and_values(tmp_path: Path) -> None:
    image, label = blob_case()
    label[0, 0, 0] = 7
    write_dataset(tmp_path, [write_case(tmp_path, "odd", image, label, AFFINE)])
    ds = read_msd(tmp_path)
    with pytest.raises(CaseError, match=r"case 'odd'.*values \[7\].*known: \[0, 1\]"):
        load_case(ds.cases[0], ds.labels)


def test_all_background_label_is_accepted(tmp_path: Path) -> None:
    image, label = blob_case()
    write_dataset(tmp_path, [write_case(tmp_path, "none", image, 0 * label, AFFINE)])
    ds = read_msd(tmp_path)
    _, lab = load_case(ds.cases[0], ds.labels)
    assert lab.sum() == 0


def test_folds_are_reproducible_disjoint_and_written(tmp_path: Path) -> None:
    names = [f"case_{n}" for n in range(11)]
    folds = make_folds(names, 5, seed=3)
    assert folds == make_folds(list(reversed(names)), 5, seed=3)
    assert folds != make_folds(names, 5, seed=4)
    vals = [set(f["val"]) for f in folds]
    assert set().union(*vals) == set(names) and sum(len(v) for v in vals) == 11
    for f in folds:
        assert not set(f["train"]) & set(f["val"]) and len(f["train"]) + len(f["val"]) == 11
    path = tmp_path / "splits.json"
    written = load_or_make_folds(path, names, 5, seed=3)
    assert json.loads(path.read_text()) == written == folds
    # an existing file wins over k and seed: runs stay comparable
    assert load_or_make_folds(path, names, 3, seed=99) == folds
    assert fold_cases(folds, 2) == (folds[2]["train"], folds[2]["val"])
    with pytest.raises(DatasetError, match="does not match the dataset"):
        load_or_make_folds(path, names[:-1], 5, seed=3)
    with pytest.raises(ValueError, match="cannot be split into 5 folds"):
        make_folds(names[:3], 5)


def test_cache_is_reused_and_invalidated(blob_msd: Path, tmp_path: Path) -> None:
    ds = read_msd(blob_msd)
    pre = Preprocessing(target_spacing=(4.0, 4.0, 3.0), patch_size=(16, 16, 16))
    folder = ensure_cached(ds.cases, ds.labels, pre, tmp_path / "cache")
    image_file = folder / "blob_1_image.npy"
    first = image_file.stat().st_mtime_ns
    assert ensure_cached(ds.cases, ds.labels, pre, tmp_path / "cache") == folder
    assert image_file.stat().st_mtime_ns == first  # nothing recomputed
    cached = load_cached(folder, ["blob_1"])[0]
    assert cached.image.shape == (12, 10, 16) and cached.label.dtype == np.uint8
    # HU window [-57, 164] -> [0, 1]: ball 120 HU -> 0.80, background 20 HU -> 0.35
    assert np.median(cached.image[cached.label == 1]) == pytest.approx((120 + 57) / 221, abs=0.05)
    assert np.median(cached.image[cached.label == 0]) == pytest.approx((20 + 57) / 221, abs=0.05)
    assert len(cached.foreground) == int(cached.label.sum()) > 0
    # new settings: new folder, old one untouched
    other = ensure_cached(ds.cases, ds.labels, Preprocessing(target_spacing=(2.0, 2.0, 3.0)), tmp_path / "cache")
    assert other != folder and other == cache_dir_for(tmp_path / "cache", Preprocessing(target_spacing=(2.0, 2.0, 3.0)))
    # a changed source file is preprocessed again
    os.utime(ds.cases[1].image, ns=(first + 10**9, first + 10**9))
    ensure_cached(ds.cases, ds.labels, pre, tmp_path / "cache")
    assert image_file.stat().st_mtime_ns != first


def test_phantom_spleen_is_on_the_patients_left_in_every_orientation(tmp_path: Path) -> None:
    root = write_synthetic_task(tmp_path / "task", cases=6, seed=5)
    ds = read_msd(root)
    codes = set()
    for case in ds.cases:
        image, label = load_case(case, ds.labels)
        import nibabel as nib

        codes.add("".join(nib.aff2axcodes(image.affine)))
        centre = image.affine @ np.r_[np.argwhere(label > 0).mean(0), 1.0]  # RAS mm
        body = image.affine @ np.r_[np.argwhere(image.array > -500).mean(0), 1.0]
        assert body[0] - centre[0] > 40.0, f"{case.name}: spleen not on the patient's left (-x in RAS)"
        hu = image.array[label > 0]
        assert 90 < np.median(hu) < 150  # enhanced spleen in HU
        assert 50.0 < label.sum() * abs(np.linalg.det(image.affine[:3, :3])) / 1000 < 600.0  # mL
    assert {"RAS", "LPS", "LAS"} <= codes
    with pytest.raises(FileExistsError):
        write_synthetic_task(root, cases=1)


def test_reoriented_phantom_preprocesses_to_the_same_model_grid(tmp_path: Path) -> None:
    settings = PhantomSettings(fov_mm=(200.0, 160.0, 120.0))
    image, label, affine = make_case(np.random.default_rng(1), settings, "RAS")
    pairs = [write_case(tmp_path, "ras", image, label, affine)]
    for codes in ("LPS", "PLS"):
        img2, aff2 = reorient(image, affine, codes)
        lab2, _ = reorient(label, affine, codes)
        assert not np.array_equal(aff2, affine)
        pairs.append(write_case(tmp_path, codes.lower(), img2, lab2, aff2))
    write_dataset(tmp_path, pairs)
    ds = read_msd(tmp_path)
    pre = Preprocessing(target_spacing=(5.0, 5.0, 5.0))
    ref_img, ref_lab = preprocess_case(ds.case("ras"), ds.labels, pre)
    assert ref_lab.sum() > 0
    for name in ("lps", "pls"):
        img, lab = preprocess_case(ds.case(name), ds.labels, pre)
        np.testing.assert_array_equal(lab, ref_lab)
        np.testing.assert_allclose(img, ref_img, atol=1e-5)


def test_add_case_to_msd_builds_a_folder_the_reader_accepts(tmp_path: Path) -> None:
    from training.data import add_case_to_msd
    from vnetseg.io import Image

    root = tmp_path / "Export"
    image, label = blob_case()
    add_case_to_msd(root, "first", Image(image.astype(np.float32), AFFINE), Image(label, AFFINE))
    src = tmp_path / "src"
    write_case(src, "second", image + 5, label, AFFINE)
    case = add_case_to_msd(root, "second", src / "imagesTr/second.nii.gz", src / "labelsTr/second.nii.gz")
    assert case == Case("second", root / "imagesTr/second.nii.gz", root / "labelsTr/second.nii.gz")
    ds = read_msd(root)
    assert ds.case_names == ["first", "second"] and ds.labels == {0: "background", 1: "spleen"}
    img, lab = load_case(ds.case("second"), ds.labels)
    np.testing.assert_array_equal(img.array, (image + 5).astype(np.int16))  # as write_case stored it
    np.testing.assert_array_equal(lab, label)
    np.testing.assert_allclose(img.affine, AFFINE)
    with pytest.raises(CaseError, match="case 'first'.*already in"):
        add_case_to_msd(root, "first", Image(image.astype(np.float32), AFFINE), Image(label, AFFINE))
    with pytest.raises(CaseError, match="case 'moved'.*grids differ"):
        add_case_to_msd(root, "moved", Image(image.astype(np.float32), AFFINE), Image(label, AFFINE * 1.5))
    with pytest.raises(CaseError, match=r"case 'odd'.*values \[3\]"):
        add_case_to_msd(root, "odd", Image(image.astype(np.float32), AFFINE), Image(label * 3, AFFINE))
    assert read_msd(root).case_names == ["first", "second"]  # failed additions left nothing behind


def test_nnunet_v2_style_label_names_are_accepted(blob_msd: Path) -> None:
    meta = json.loads((blob_msd / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "spleen": 1}
    (blob_msd / "dataset.json").write_text(json.dumps(meta))
    assert read_msd(blob_msd).labels == {0: "background", 1: "spleen"}

"""Enlarged spleens made from real CTs (training/realct/enlarge.py): geometry in physical space, volumes, subjects."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from training.realct.enlarge import enlarged_scan, magnify, read_big_records, write_big_pool
from training.realct.sources import centroid_ras, load_scans


def _ball_ct(affine: np.ndarray, shape=(60, 60, 40), radius_mm=10.0):
    """A CT on ``affine`` with a 10 mm ball of 60 HU at its centre, a ramp of HU elsewhere, and the ball's mask."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    ras = idx @ affine[:3, :3].T + affine[:3, 3]
    centre = (np.asarray(shape) - 1) / 2.0 @ affine[:3, :3].T + affine[:3, 3]
    r = np.sqrt(((ras - centre) ** 2).sum(-1))
    ct = (ras[..., 0] * 2.0 - 300.0).astype(np.float32)
    mask = r <= radius_mm
    ct[mask] = 60.0
    return ct, mask, centre


@pytest.mark.parametrize("affine", [
    np.diag([1.0, 1.0, 1.5, 1.0]),
    # stored LPS with the slice axis first and a rotation of the grid (the warp works in RAS mm)
    np.array([[0.0, -1.2, 0.0, 40.0], [0.0, 0.0, -1.2, 30.0], [1.5, 0.0, 0.0, -20.0], [0, 0, 0, 1.0]]),
])
def test_magnify_scales_the_organ_about_its_centre_and_leaves_the_rest(affine) -> None:
    ct, mask, centre = _ball_ct(affine)
    out, big, facts = magnify(ct, mask, affine, 1.5, margin_mm=12.0)
    # the ball's radius grows 1.5 times: its volume 3.375 times (to a voxel's rounding)
    assert big.sum() / mask.sum() == pytest.approx(1.5**3, rel=0.08)
    # it stays where it was, in physical space
    assert np.allclose(centroid_ras(big, affine), centre, atol=0.6)
    assert np.allclose(facts["centre_ras"], centre, atol=0.1)
    # inside, the organ's HU is the organ's (its rim mixes with the neighbours, as interpolation does);
    # beyond inner + margin nothing moved (bit for bit)
    core = ndimage.binary_erosion(big, iterations=3)
    assert core.sum() > 0.3 * big.sum() and np.all(np.abs(out[core] - 60.0) < 1e-3)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in ct.shape], indexing="ij"), -1).astype(float)
    r = np.sqrt(((idx @ affine[:3, :3].T + affine[:3, 3] - centre) ** 2).sum(-1))
    far = r > facts["outer_mm"] + 0.1  # (the facts are rounded to 0.1 mm)
    assert far.any() and np.array_equal(out[far], ct[far])
    assert facts["inner_mm"] == pytest.approx(1.5 * mask_reach(mask, affine), abs=0.2)


def mask_reach(mask: np.ndarray, affine: np.ndarray) -> float:
    pts = np.argwhere(mask) @ affine[:3, :3].T + affine[:3, 3]
    return float(np.sqrt(((pts - pts.mean(0)) ** 2).sum(1)).max())


def test_magnify_is_one_to_one_along_a_ray() -> None:
    """Along a ray from the centre, the source radius read by each output voxel never goes back (no folding)."""
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    shape = (121, 9, 9)
    ct = np.broadcast_to(np.arange(shape[0], dtype=np.float32)[:, None, None], shape).copy()  # HU = x index
    mask = np.zeros(shape, bool)
    mask[55:66, 2:7, 2:7] = True
    out, _, facts = magnify(ct, mask, affine, 1.6, margin_mm=20.0)
    line = out[:, 4, 4]
    assert np.all(np.diff(line) > 0)  # the source position increases monotonically: nothing folded
    assert line[60] == pytest.approx(60.0, abs=1e-4)  # the centre reads the centre
    still = np.abs(np.arange(shape[0]) - 60) > facts["outer_mm"] + 0.1
    assert still.sum() > 20 and np.array_equal(line[still], ct[still, 4, 4])


def test_magnify_moves_labels_by_nearest_neighbour_and_refuses_bad_input() -> None:
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    ct, mask, _ = _ball_ct(affine, shape=(40, 40, 40), radius_mm=6.0)
    labels = np.where(mask, 1, 0).astype(np.int16)
    labels[:, :5] = 7
    _, big, facts = magnify(ct, mask, affine, 1.3, labels=labels)
    assert set(np.unique(facts["labels"])) <= {0, 1, 7}
    assert abs(int((facts["labels"] == 1).sum()) - int(big.sum())) <= 0.05 * big.sum()
    same, same_mask, _ = magnify(ct, mask, affine, 1.0)
    assert np.array_equal(same, ct) and np.array_equal(same_mask, mask)
    with pytest.raises(ValueError, match="empty"):
        magnify(ct, np.zeros_like(mask), affine, 1.3)
    with pytest.raises(ValueError, match="factor must be >= 1"):
        magnify(ct, mask, affine, 0.8)
    with pytest.raises(ValueError, match="differ in shape"):
        magnify(ct, mask[:-1], affine, 1.3)


def test_enlarged_real_spleen_grows_by_the_cube_of_the_factor(ct_dir) -> None:
    """P4's spleen lies wholly inside its CT: x1.25 gives 1.95 times its volume, on the patient's left as before."""
    scan = load_scans(ct_dir, ("p4_acrin",))[0]
    big = enlarged_scan(scan, 1.25)
    assert big.spleen.sum() / scan.spleen.sum() == pytest.approx(1.25**3, rel=0.04)
    assert np.allclose(centroid_ras(big.spleen, scan.image.affine), centroid_ras(scan.spleen, scan.image.affine), atol=2.0)
    assert big.image.shape == scan.image.shape and np.array_equal(big.image.affine, scan.image.affine)


def test_big_pool_subjects_are_deterministic_and_resume(ct_dir, tmp_path) -> None:
    scans = load_scans(ct_dir, ("p1_ct",))
    first = write_big_pool(tmp_path / "a", 2, 7, scans, log=None)
    again = write_big_pool(tmp_path / "b", 2, 7, scans, log=None)
    assert [r["factor"] for r in first] == [r["factor"] for r in again]
    assert all(1.1 <= r["factor"] <= 1.6 and r["kind"] == "big" and r["patient"] == "P1" for r in first)
    for r in first:
        a = nib.load(tmp_path / "a" / "pool" / "imagesTr" / f"{r['name']}.nii.gz")
        b = nib.load(tmp_path / "b" / "pool" / "imagesTr" / f"{r['name']}.nii.gz")
        assert np.array_equal(a.get_fdata(), b.get_fdata()) and np.allclose(a.affine, b.affine)
        lab = np.asarray(nib.load(tmp_path / "a" / "pool" / "labelsTr" / f"{r['name']}.nii.gz").dataobj)
        assert lab.sum() * 1.5 * 1.5 * 2.0 / 1000.0 == pytest.approx(r["spleen_ml"], abs=0.1) and r["spleen_ml"] > 50
    # resumed: what is on disk is kept, not drawn again
    stamp = (tmp_path / "a" / "pool" / "imagesTr" / f"{first[0]['name']}.nii.gz").stat().st_mtime_ns
    assert write_big_pool(tmp_path / "a", 2, 7, scans, log=None) == first
    assert (tmp_path / "a" / "pool" / "imagesTr" / f"{first[0]['name']}.nii.gz").stat().st_mtime_ns == stamp
    assert read_big_records(tmp_path / "a") == json.loads((tmp_path / "a" / "pool" / "subjects_big_p1_ct.json").read_text())

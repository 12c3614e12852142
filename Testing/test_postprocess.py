"""Clean-up and quality checks on hand-made masks with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from vnetseg.postprocess import clean_mask, components_ml, dice, fill_holes, largest_component, quality_report


def test_dice_of_hand_made_masks() -> None:
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[0, 0, :4] = True  # 4 voxels
    b[0, 0, 2:4] = True  # 2 voxels, both in a
    assert dice(a, b) == pytest.approx(2 * 2 / 6)
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert dice(np.zeros(3, bool), np.zeros(3, bool), empty=float("nan")) != dice(a, a)


def test_largest_component_and_holes() -> None:
    m = np.zeros((20, 20, 20), bool)
    m[2:10, 2:10, 2:10] = True  # 512 voxels with a 1-voxel cavity
    m[5, 5, 5] = False
    m[15:17, 15:17, 15:17] = True  # 8 voxels, separate
    m[10, 2, 2] = False
    big = largest_component(m)
    assert big.sum() == 511 and not big[15, 15, 15]
    filled = fill_holes(big)
    assert filled[5, 5, 5] and filled.sum() == 512
    assert clean_mask(m, largest=False, holes=False).sum() == m.sum()
    assert clean_mask(m).sum() == 512
    assert largest_component(np.zeros((3, 3, 3), bool)).sum() == 0


def test_components_use_face_connectivity() -> None:
    m = np.zeros((5, 5, 5), bool)
    m[1, 1, 1] = m[2, 2, 2] = True  # touch only at a corner: two components
    assert components_ml(m, 0.5) == [0.5, 0.5]


def _ball(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def test_quality_report_normal_spleen_has_no_warning() -> None:
    m = _ball((60, 60, 60), (30, 30, 30), 15)  # 14137 voxels of 1.5^3 mm -> about 48 mL
    r = quality_report(m, m, 1.5**3 / 1000)
    assert r.volume_ml == pytest.approx(m.sum() * 1.5**3 / 1000)
    assert r.warnings == [] and not r.touches_edge


def test_quality_report_fires_each_warning_on_its_trigger() -> None:
    voxel = 1.0 / 1000
    empty = quality_report(np.zeros((5, 5, 5), bool), np.zeros((5, 5, 5), bool), voxel)
    assert not empty.found and empty.message == "no spleen found in the field of view" and empty.warnings == []
    tiny = _ball((40, 40, 40), (20, 20, 20), 5)
    assert any("implausible" in w for w in quality_report(tiny, tiny, voxel).warnings)
    edge = _ball((40, 40, 40), (0, 20, 20), 30)
    rep = quality_report(edge, edge, voxel)
    assert rep.touches_edge and any("edge" in w for w in rep.warnings)
    two = _ball((80, 80, 80), (25, 40, 40), 20) | _ball((80, 80, 80), (63, 40, 40), 15)
    rep = quality_report(two, largest_component(two), voxel)
    assert any("2 sizeable separate parts" in w for w in rep.warnings)
    specks = _ball((80, 80, 80), (40, 40, 40), 25)
    specks[2, 2, 2] = True  # a 1-voxel speck is not a sizeable part
    assert not any("separate" in w for w in quality_report(specks, largest_component(specks), voxel).warnings)


def test_label_sizes_match_bincount() -> None:
    from vnetseg.postprocess import label_sizes

    labels = np.random.default_rng(0).integers(0, 5, size=(7, 6, 37)).astype(np.int32)
    np.testing.assert_array_equal(label_sizes(labels, 4, slab=4), np.bincount(labels.ravel(), minlength=5))

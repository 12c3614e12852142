"""Clean-up and quality checks on hand-made masks with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from vnetseg.postprocess import (
    HU_TRIM_MIN_SD,
    clean_mask,
    components_ml,
    dense_share,
    dice,
    drop_thin_appendages,
    fill_holes,
    grow_native,
    largest_component,
    quality_report,
    trim_to_organ_hu,
)


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


def _organ_scene(rng: np.random.Generator, spacing=(0.8, 0.8, 2.5)):
    """A 150 +- 10 HU ellipsoid 'spleen' with a 35 HU slab of 'diaphragm' the mask spilled into,
    a 10 HU cyst inside it and a 10 HU lesion at its surface. Returns (HU, mask, truth, cyst, lesion)."""
    shape = (90, 90, 30)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1) * np.asarray(spacing)
    centre, radii = np.array([36.0, 36.0, 37.5]), np.array([25.0, 20.0, 30.0])
    organ = (((ijk - centre) / radii) ** 2).sum(-1) <= 1.0
    hu = rng.normal(35.0, 10.0, shape).astype(np.float32)  # soft tissue around it
    hu[organ] = rng.normal(150.0, 10.0, int(organ.sum()))
    cyst = (((ijk - centre) / 6.0) ** 2).sum(-1) <= 1.0
    hu[cyst] = rng.normal(10.0, 5.0, int(cyst.sum()))
    lesion = organ & ((((ijk - (centre + [0, 0, 30.0])) / [8.0, 8.0, 8.0]) ** 2).sum(-1) <= 1.0)  # top pole
    hu[lesion] = rng.normal(10.0, 5.0, int(lesion.sum()))
    spill = ~organ & (np.abs(ijk[..., 0] - (centre[0] + radii[0])) <= 3.0) & (np.abs(ijk[..., 1] - centre[1]) < 12.0)
    spill &= np.abs(ijk[..., 2] - centre[2]) < 15.0
    return hu, organ | spill, organ, cyst, lesion, spill


def test_hu_trim_removes_what_spilled_into_darker_tissue_and_keeps_what_the_organ_encloses() -> None:
    rng = np.random.default_rng(0)
    spacing = (0.8, 0.8, 2.5)
    hu, mask, organ, cyst, lesion, spill = _organ_scene(rng, spacing)
    assert spill.sum() > 0.05 * organ.sum()  # a spill worth removing
    trimmed, done = trim_to_organ_hu(mask, hu, spacing)
    assert done is not None
    # the band is the organ's own: median 150 HU, spread about its 10 HU SD, 4 of them either side
    assert 100.0 < done.low < 125.0 and 175.0 < done.high < 200.0
    assert not (trimmed & spill).any()  # 35 HU is 11 SD below the organ: all of the spill goes
    assert done.removed == int(mask.sum() - trimmed.sum())
    filled = fill_holes(trimmed)
    assert filled[cyst].all()  # enclosed: hole filling puts the cyst back
    assert not filled[lesion & ~organ].any()
    # the lesion at the surface is cut off (what the docstring warns of), the rest of the organ stays
    assert filled[lesion].mean() < 0.5
    healthy = organ & ~lesion
    assert filled[healthy].mean() > 0.99
    assert dice(filled, organ) > dice(mask, organ)


def test_hu_trim_leaves_masks_alone_when_it_cannot_measure_the_organ() -> None:
    rng = np.random.default_rng(1)
    hu = rng.normal(40.0, 10.0, (40, 40, 20)).astype(np.float32)
    empty = np.zeros(hu.shape, bool)
    assert trim_to_organ_hu(empty, hu, (1.0, 1.0, 1.0)) == (empty, None)
    thin = np.zeros(hu.shape, bool)
    thin[10:30, 10:30, 5:7] = True  # two slices at 1 mm: no core after a 3 mm erosion
    out, done = trim_to_organ_hu(thin, hu, (1.0, 1.0, 1.0))
    assert done is None and out is thin
    # the same voxels at 5 mm slices keep a core (one slice of erosion only, at least one voxel)
    thick = np.zeros(hu.shape, bool)
    thick[10:30, 10:30, 5:10] = True
    _, done = trim_to_organ_hu(thick, hu, (1.0, 1.0, 5.0))
    assert done is not None


def test_hu_trim_band_has_a_floor_on_a_flat_image() -> None:
    # a noiseless phantom: the spread is the floor, so a voxel 1 HU off is kept and 30 HU off is not
    hu = np.full((30, 30, 30), 120.0, np.float32)
    mask = np.zeros(hu.shape, bool)
    mask[5:25, 5:25, 5:25] = True
    hu[5, 5:25, 5:25] = 121.0
    hu[24, 5:25, 5:25] = 120.0 - 6 * HU_TRIM_MIN_SD
    out, done = trim_to_organ_hu(mask, hu, (1.0, 1.0, 1.0))
    assert done is not None and done.low == pytest.approx(120.0 - 4 * HU_TRIM_MIN_SD)
    assert out[5, 10, 10] and not out[24, 10, 10] and done.removed == 400


def test_bounding_box_matches_scipy_on_random_masks() -> None:
    from scipy import ndimage

    from vnetseg.boxes import nonzero_box

    rng = np.random.default_rng(2)
    for _ in range(300):
        mask = rng.random(tuple(rng.integers(1, 12, 3))) < rng.choice([0.0, 0.01, 0.2])
        found = ndimage.find_objects(mask.astype(np.uint8))
        assert nonzero_box(mask) == (found[0] if found else None)


def _native_scene(organ_hu: float):
    """A ball 'spleen' whose inner part the network found (mask) and whose outer shell it gave
    probability 0.3-0.5 only (candidates), beside a 200 HU 'bone' block that is also a candidate,
    and a separate candidate blob that does not touch the organ."""
    rng = np.random.default_rng(3)
    shape = (60, 60, 40)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    r = np.linalg.norm(ijk - [30, 30, 20], axis=-1)
    hu = rng.normal(-100.0, 10.0, shape).astype(np.float32)  # fat
    organ = r <= 15
    hu[organ] = rng.normal(organ_hu, 8.0, int(organ.sum()))
    bone = (ijk[..., 0] >= 46) & (ijk[..., 0] < 52) & (np.abs(ijk[..., 1] - 30) < 6) & (np.abs(ijk[..., 2] - 20) < 6)
    hu[bone] = 200.0
    blob = np.linalg.norm(ijk - [8, 8, 8], axis=-1) <= 4
    hu[blob] = organ_hu
    mask = r <= 11
    candidates = organ | bone | blob
    return hu, mask, candidates, organ, bone, blob


def test_native_growth_adds_the_organs_shell_only() -> None:
    hu, mask, candidates, organ, bone, blob = _native_scene(45.0)
    trimmed, band = trim_to_organ_hu(mask, hu, (1.0, 1.0, 1.0))
    assert band is not None and band.native and 40 < band.median < 50
    grown, added = grow_native(trimmed, candidates, hu, band)
    assert grown[organ].mean() > 0.99  # the shell the network was unsure of
    assert not grown[bone].any()  # a candidate, touching the organ, but 200 HU: out of its band
    assert not grown[blob].any()  # in the band but not connected to the organ
    assert added == int(grown.sum() - trimmed.sum()) and added > 0.5 * trimmed.sum()


def test_no_growth_on_an_enhanced_organ() -> None:
    hu, mask, candidates, *_ = _native_scene(150.0)
    trimmed, band = trim_to_organ_hu(mask, hu, (1.0, 1.0, 1.0))
    assert band is not None and not band.native
    grown, added = grow_native(trimmed, candidates, hu, band)
    assert added == 0 and grown is trimmed


def _appendage_scene(spacing):
    """In mm on a grid of ``spacing``: an ellipsoid 'spleen' (semi-axes 40, 25, 30 mm); a plate 6 mm
    thick and 30 x 30 mm wide 20 mm beside it (a kidney's rim), joined to it by a 4 x 4 mm bridge;
    and a thick lobe (a 14 mm ball) joined by a 12 mm neck on the other side."""
    shape = tuple(round(e / s) for e, s in zip((200.0, 100.0, 90.0), spacing))
    x, y, z = (np.arange(n) * s for n, s in zip(shape, spacing))
    x, y, z = np.meshgrid(x, y, z, indexing="ij")
    spleen = ((x - 90) / 40) ** 2 + ((y - 50) / 25) ** 2 + ((z - 45) / 30) ** 2 <= 1
    plate = (x >= 150) & (x < 156) & (np.abs(y - 50) <= 15) & (np.abs(z - 45) <= 15)
    bridge = (x >= 125) & (x < 150) & (np.abs(y - 50) <= 2) & (np.abs(z - 45) <= 2) & ~spleen
    lobe = (np.sqrt((x - 30) ** 2 + (y - 50) ** 2 + (z - 45) ** 2) <= 14) & ~spleen
    neck = (x >= 40) & (x < 56) & (np.abs(y - 50) <= 6) & (np.abs(z - 45) <= 6) & ~spleen & ~lobe
    return spleen, plate, bridge, lobe, neck


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 0.7, 3.0)])
def test_appendage_cut_removes_a_thin_attached_plate_and_keeps_the_organ_and_its_thick_lobe(spacing) -> None:
    spleen, plate, bridge, lobe, neck = _appendage_scene(spacing)
    mask = spleen | plate | bridge | lobe | neck
    out, removed = drop_thin_appendages(mask, spacing)
    assert removed == int(mask.sum() - out.sum()) > 0
    assert out[spleen].all()  # the organ is whole, its rim and poles too
    assert out[lobe].all() and out[neck].all()  # a thick lobe on a thick neck is the organ's own
    assert not out[plate].any()  # 6 mm thick, 20 mm from the organ's surface: cut off
    # of the bridge, only what lies within 10 mm of the body stays (the body ends 5 mm inside the
    # organ's tip at x = 130 mm; half a 1.5 mm sample of slack for the coarse reach)
    kept_x = np.argwhere(out & bridge)[:, 0] * spacing[0]
    assert kept_x.size and kept_x.max() <= 125 + 10 + 0.75
    assert not (out & ~mask).any()  # it only removes


def test_appendage_cut_leaves_a_compact_organ_a_thin_mask_and_an_empty_one_alone() -> None:
    spleen, plate, *_ = _appendage_scene((1.0, 1.0, 1.0))
    for mask in (spleen, plate, np.zeros_like(spleen)):  # whole organ; nowhere 10 mm thick (no body); empty
        out, removed = drop_thin_appendages(mask, (1.0, 1.0, 1.0))
        assert out is mask and removed == 0


def test_appendage_cut_does_not_depend_on_the_storage_order() -> None:
    """The same mask stored in reverse along every axis (as another scanner may store a CT) is cut the same way."""
    spacing = (0.7, 0.7, 3.0)
    spleen, plate, bridge, lobe, neck = _appendage_scene(spacing)
    mask = spleen | plate | bridge | lobe | neck
    out, removed = drop_thin_appendages(mask, spacing)
    flipped, removed_flipped = drop_thin_appendages(np.ascontiguousarray(mask[::-1, ::-1, ::-1]), spacing)
    assert removed_flipped == removed and np.array_equal(flipped[::-1, ::-1, ::-1], out)


def test_dense_share_counts_bone_in_the_core_and_not_the_noise_of_a_sharp_kernel() -> None:
    """Known answers: a 140 HU organ with a 90 HU noise SD (P3's sharp kernel) has no dense core after
    the mean filter (raw, about 4 % of it is over 300 HU); the same organ with bone in half of its core
    is about half dense; a mask too small to have a core is not measured."""
    rng = np.random.default_rng(0)
    values = np.full((60, 60, 40), 40.0, np.float32)
    mask = np.zeros(values.shape, bool)
    mask[10:50, 10:50, 5:35] = True
    values[mask] = 140.0 + rng.normal(0.0, 90.0, int(mask.sum()))
    assert 0.02 < float((values[mask] > 300).mean()) < 0.07  # the raw noise alone
    assert dense_share(mask, values, (1.0, 1.0, 1.0)) < 0.005
    bony = values.copy()
    bony[10:30, 10:50, 5:35] = 700.0 + rng.normal(0.0, 90.0, (20, 40, 30))
    share = dense_share(mask, bony, (1.0, 1.0, 1.0))
    # the core is the mask eroded by 3 mm: x 13..46, of which 13..29 is bone (17 of 34 planes), and the
    # mean filter pulls the next plane (a third bone) over 300 HU too: 18 of 34
    assert share == pytest.approx(18 / 34, abs=0.02)
    # anisotropic voxels: the erosion is 3 mm along each axis, so the same physical organ gives the same share
    assert dense_share(mask[:, :, ::3], bony[:, :, ::3], (1.0, 1.0, 3.0)) == pytest.approx(18 / 34, abs=0.03)
    small = np.zeros(values.shape, bool)
    small[20:24, 20:24, 20:24] = True
    assert dense_share(small, bony, (1.0, 1.0, 1.0)) is None
    assert dense_share(np.zeros(values.shape, bool), bony, (1.0, 1.0, 1.0)) is None

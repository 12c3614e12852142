"""Resampling to the model grid and back, checked in physical (RAS) space."""

from __future__ import annotations

import numpy as np
import pytest
from test_io import ORIENTATIONS, make_affine

from vnetseg.preprocess import make_grid_map, to_input_grid, to_model_grid, window_hu

COEF = np.array([0.7, -1.3, 0.4])


def _ras_of(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    return (ijk @ affine[:3, :3].T + affine[:3, 3]).reshape(*shape, 3)


def _linear_field(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """f(x) = COEF . x (x in RAS mm): trilinear interpolation reproduces it exactly."""
    return (_ras_of(shape, affine) @ COEF).astype(np.float64)


@pytest.mark.parametrize("kind", ["RAS", "LPS", "LAS", "PIR"])
def test_model_grid_is_ras_aligned_at_the_target_spacing(kind: str) -> None:
    shape, aff = (40, 36, 12), make_affine(kind, spacing=(0.8, 0.9, 2.5))
    grid = make_grid_map(shape, aff, (1.5, 1.5, 2.0))
    # canonical axes point along +R, +A, +S; spacing close to the target (exact extent kept)
    direction = grid.model_affine[:3, :3] / grid.model_spacing
    np.testing.assert_allclose(direction, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(grid.model_spacing, [1.5, 1.5, 2.0], rtol=0.06)


@pytest.mark.parametrize("kind", ORIENTATIONS)
def test_resampled_values_sit_at_the_right_physical_place(kind: str) -> None:
    shape, aff = (30, 26, 14), make_affine(kind, spacing=(1.1, 0.9, 2.5))
    field = _linear_field(shape, aff)
    grid = make_grid_map(shape, aff, (1.5, 1.5, 2.0))
    model = to_model_grid(field, grid)
    expected = _linear_field(grid.model_shape, grid.model_affine)
    inner = tuple(slice(1, s - 1) for s in grid.model_shape)  # the edge voxels extrapolate ("nearest")
    np.testing.assert_allclose(model[inner], expected[inner], atol=1e-3)


@pytest.mark.parametrize("kind", ORIENTATIONS)
def test_back_to_input_grid_is_exact_in_shape_and_place(kind: str) -> None:
    shape, aff = (30, 26, 14), make_affine(kind, spacing=(1.1, 0.9, 2.5))
    field = _linear_field(shape, aff)
    grid = make_grid_map(shape, aff, (1.7, 1.3, 2.2))
    back = to_input_grid(to_model_grid(field, grid), grid)
    assert back.shape == shape
    # away from the border, linear data survives the round trip at the same voxel
    inner = tuple(slice(2, s - 2) for s in shape)
    np.testing.assert_allclose(back[inner], field[inner], atol=2e-3)


@pytest.mark.parametrize("kind", ORIENTATIONS)
def test_same_spacing_round_trip_is_lossless(kind: str) -> None:
    rng = np.random.default_rng(3)
    shape, aff = (9, 8, 7), make_affine(kind, spacing=(1.5, 1.5, 2.0))
    data = rng.normal(size=shape).astype(np.float32)
    grid = make_grid_map(shape, aff, tuple(np.linalg.norm(aff[:3, :3], axis=0)[np.argmax(np.abs(aff[:3, :3]), axis=1)]))
    back = to_input_grid(to_model_grid(data, grid), grid)
    np.testing.assert_allclose(back, data, atol=1e-5)


def test_mask_edges_reach_the_border_of_the_input_grid() -> None:
    shape, aff = (20, 20, 10), make_affine("LPS", spacing=(0.7, 0.7, 3.0))
    grid = make_grid_map(shape, aff, (1.5, 1.5, 2.0))
    ones = np.ones(grid.model_shape, np.float32)
    assert to_input_grid(ones, grid).min() == 1.0  # no voxel of the input grid is left out


def test_crop_maps_back_only_inside_the_box() -> None:
    shape, aff = (40, 40, 20), make_affine("RAS", spacing=(1.0, 1.0, 2.0))
    grid = make_grid_map(shape, aff, (2.0, 2.0, 2.0))
    sub = grid.crop((5, 6, 2), (12, 15, 8))
    np.testing.assert_allclose(sub.model_affine[:3, 3], grid.model_affine[:3, :3] @ [5, 6, 2] + grid.model_affine[:3, 3])
    back = to_input_grid(np.ones(sub.model_shape, np.float32), sub)
    inside = np.argwhere(back > 0)
    assert inside.min(0).tolist() == [10, 12, 2] and inside.max(0).tolist() == [23, 29, 7]


def test_window_hu_known_values() -> None:
    hu = np.array([-1000.0, -57.0, 53.5, 164.0, 3000.0])
    np.testing.assert_allclose(window_hu(hu, (-57, 164)), [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(window_hu(hu, (-57, 164), (-1.0, 1.0)), [-1.0, -1.0, 0.0, 1.0, 1.0])


@pytest.mark.parametrize("kind", ["LPS", "oblique"])
def test_thresholded_way_back_equals_threshold_of_the_float_way_back(kind: str) -> None:
    shape, aff = (25, 21, 12), make_affine(kind, spacing=(0.9, 0.9, 2.5))
    grid = make_grid_map(shape, aff, (1.5, 1.5, 2.0))
    probs = np.random.default_rng(5).random(grid.model_shape).astype(np.float32)
    mask = to_input_grid(probs, grid, threshold=0.5, slab=4)
    assert mask.dtype == np.uint8 and mask.shape == shape
    np.testing.assert_array_equal(mask, to_input_grid(probs, grid) > 0.5)


@pytest.mark.parametrize("kind", ["LPS", "oblique"])
def test_levels_count_the_thresholds_of_the_float_way_back(kind: str) -> None:
    shape, aff = (25, 21, 12), make_affine(kind, spacing=(0.9, 0.9, 2.5))
    grid = make_grid_map(shape, aff, (1.5, 1.5, 2.0))
    probs = np.random.default_rng(6).random(grid.model_shape).astype(np.float32)
    counted = to_input_grid(probs, grid, levels=(0.3, 0.5), slab=4)
    back = to_input_grid(probs, grid)
    assert counted.dtype == np.uint8 and counted.shape == shape
    np.testing.assert_array_equal(counted, (back > 0.3).astype(np.uint8) + (back > 0.5))
    assert set(np.unique(counted)) == {0, 1, 2}
    with pytest.raises(ValueError, match="one of threshold, quantize and levels"):
        to_input_grid(probs, grid, threshold=0.5, levels=(0.3,))


@pytest.mark.parametrize("kind", ["LPS", "oblique"])
def test_way_back_is_the_same_on_any_number_of_threads(kind: str) -> None:
    """The slabs of the way back run on several threads: each thread's slabs are the one-thread answer, bit for bit."""
    shape, aff = (31, 27, 40), make_affine(kind, spacing=(0.9, 0.9, 2.5))
    grid = make_grid_map(shape, aff, (1.5, 1.5, 2.0))
    probs = np.random.default_rng(7).random(grid.model_shape).astype(np.float32)
    for how in ({}, {"threshold": 0.5}, {"levels": (0.3, 0.5)}, {"quantize": True}):
        one = to_input_grid(probs, grid, slab=4, threads=1, **how)
        for threads in (2, 5):
            np.testing.assert_array_equal(to_input_grid(probs, grid, slab=4, threads=threads, **how), one)
    back = to_input_grid(probs, grid)  # the float way back: the others are its threshold, levels, 0-255 steps
    quantized = to_input_grid(probs, grid, quantize=True, threads=2)
    np.testing.assert_array_equal(quantized, np.rint(np.clip(back * np.float32(255), 0, 255)).astype(np.uint8))
    # and slab by slab it is what one scipy call over the whole grid gives (LPS: the canonical grid flipped back)
    if kind == "LPS":
        from scipy import ndimage

        whole = ndimage.affine_transform(probs, 1.0 / grid.scale, offset=-grid.offset / grid.scale,
                                         output_shape=grid.canonical_shape, order=1, mode="nearest", prefilter=False)
        np.testing.assert_allclose(to_input_grid(probs, grid, threads=3), whole[::-1, ::-1, :], atol=1e-6)


@pytest.mark.parametrize("kind", ["PIR", "oblique"])
def test_model_grid_is_the_same_on_any_number_of_threads(kind: str) -> None:
    """Blocks of planes run on several threads: the same answer as one thread; one scipy call's but for last bits."""
    shape, aff = (70, 33, 21), make_affine(kind, spacing=(0.7, 0.9, 2.5))
    grid = make_grid_map(shape, aff, (1.1, 1.5, 2.0))
    assert grid.model_shape[0] > 2 * 16  # more than two blocks
    data = np.random.default_rng(8).normal(40.0, 300.0, shape).astype(np.int16)  # stored CT: int16
    one = to_model_grid(data, grid, threads=1)
    for threads in (2, 3):
        np.testing.assert_array_equal(to_model_grid(data, grid, threads=threads), one)
    import nibabel as nib
    from scipy import ndimage

    canonical = nib.orientations.apply_orientation(data, grid.ornt)
    whole = ndimage.affine_transform(canonical, grid.scale, offset=grid.offset, output_shape=grid.model_shape,
                                     order=1, mode="nearest", output=np.float32, prefilter=False)
    np.testing.assert_allclose(one, whole, rtol=0, atol=1e-3)  # a block's own offset: at most its last bit
    np.testing.assert_array_equal(to_model_grid(data, grid, blocks=False), whole)  # what the training cache uses


@pytest.mark.parametrize("where", ["inside", "at the edge", "nowhere"])
@pytest.mark.parametrize("kind", ["LPS", "oblique"])
def test_way_back_of_a_small_organ_resamples_only_its_box_and_loses_nothing(kind: str, where: str) -> None:
    """Thresholds and levels resample only the box of the model voxels over the lowest one (plus one
    voxel): the answer must be the threshold of the whole float way back, voxel for voxel."""
    shape, aff = (60, 52, 30), make_affine(kind, spacing=(0.8, 0.8, 2.5))
    grid = make_grid_map(shape, aff, (1.5, 1.5, 2.0))
    rng = np.random.default_rng(9)
    probs = (0.25 * rng.random(grid.model_shape)).astype(np.float32)  # under every threshold here
    if where != "nowhere":
        at = (slice(9, 17), slice(6, 13), slice(14, 20)) if where == "inside" else (slice(0, 6), slice(0, 5), slice(-4, None))
        blob = probs[at]
        blob[...] = rng.random(blob.shape)
        blob.flat[::7] = 0.5  # exactly at the threshold, and just around it
        blob.flat[1::7] = np.nextafter(np.float32(0.5), np.float32(1.0))
    back = to_input_grid(probs, grid)
    mask = to_input_grid(probs, grid, threshold=0.5)
    np.testing.assert_array_equal(mask, (back > 0.5).astype(np.uint8))
    counted = to_input_grid(probs, grid, levels=(0.3, 0.5))
    np.testing.assert_array_equal(counted, (back > 0.3).astype(np.uint8) + (back > 0.5))
    assert mask.any() == (where != "nowhere")

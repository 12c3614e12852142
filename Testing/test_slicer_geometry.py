"""The segment overlays the CT in physical space whatever the volume's IJK-to-RAS matrix.

One real CT crop is stored in several ways that describe the same physical voxels (flipped axes,
permuted axes, a left-handed matrix, a left-handed NIfTI file that Slicer flips on load); the
segment must be the same in RAS space every time. An oblique (rotated) matrix moves the image
itself: the segment must rotate with it (same voxels in IJK, the volume's matrix as its geometry).
"""

from __future__ import annotations

import numpy as np
import pytest
from slicer_helpers import (
    ijk_to_ras,
    node_array_ijk,
    one_torch_thread,  # noqa: F401 (autouse fixture)
    ras_centroid,
    resample_nearest,
    slicer,
    vtk,
)

from VNetSegmentationLib import SegmentationOptions, VNetSegmentationLogic, nodes

OPTIONS = SegmentationOptions("cpu", 0.0, postprocess=False)


@pytest.fixture(scope="module")
def base(env, ct_dir):
    """A 64 x 48 x 30 crop of the real CT around the spleen, with its own RAS affine."""
    ct = env.load_volume(ct_dir / "example_ct_sm.nii.gz", "sm")
    array = node_array_ijk(ct)[0:64, 16:64, :].astype(np.int16)
    affine = ijk_to_ras(ct).copy()
    affine[:3, 3] = (affine @ [0, 16, 0, 1])[:3]  # voxel (0, 16, 0) of the CT is voxel 0 of the crop
    return array, affine


@pytest.fixture(scope="module")
def base_result(env, base, tiny_model_file):
    array, affine = base
    volume = env.add_volume(array, affine, "base")
    logic = VNetSegmentationLogic(env.scene, includeShippedModels=False)
    seg, result = logic.segment(volume, tiny_model_file, OPTIONS)
    mask = nodes.segmentMask(seg, result.segmentIDs[0], volume)
    assert 0.05 < mask.mean() < 0.95, "the comparisons need a mask with structure"
    return mask


def flip(array: np.ndarray, affine: np.ndarray, axis: int):
    """The same physical image with voxel axis ``axis`` stored in reverse order."""
    f = np.eye(4)
    f[axis, axis] = -1
    f[axis, 3] = array.shape[axis] - 1
    return np.flip(array, axis).copy(), affine @ f


def permute(array: np.ndarray, affine: np.ndarray, order: tuple[int, int, int]):
    """The same physical image with voxel axes stored in ``order``."""
    p = np.eye(4)
    p[:3, :3] = np.eye(3)[:, list(order)]
    return np.ascontiguousarray(array.transpose(order)), affine @ p


def rotation(degrees: float, axis: int) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [i for i in range(3) if i != axis]
    r = np.eye(4)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


VARIANTS = {
    "flip-i": lambda a, m: flip(a, m, 0),
    "flip-j": lambda a, m: flip(a, m, 1),
    "left-handed (flip-k)": lambda a, m: flip(a, m, 2),
    "permuted (k, i, j)": lambda a, m: permute(a, m, (2, 0, 1)),
    "permuted + flipped": lambda a, m: flip(*permute(a, m, (1, 2, 0)), 0),
}


def segment_volume(env, tiny_model_file, array, affine, name):
    volume = env.add_volume(array, affine, name)
    assert np.allclose(ijk_to_ras(volume), affine)  # kept as given, left-handed included
    logic = VNetSegmentationLogic(env.scene, includeShippedModels=False)
    seg, result = logic.segment(volume, tiny_model_file, OPTIONS)
    return volume, seg, nodes.segmentMask(seg, result.segmentIDs[0], volume)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_storage_order_does_not_move_the_segment(variant, env, base, base_result, tiny_model_file):
    array, affine = VARIANTS[variant](*base)
    _, _, mask = segment_volume(env, tiny_model_file, array, affine, variant)
    on_base = resample_nearest(mask, affine, base[0].shape, base[1])
    assert (on_base >= 0).all()
    assert np.count_nonzero(on_base != base_result) == 0
    # negative control: ignoring the matrix (comparing raw arrays) would not match
    if mask.shape == base_result.shape:
        assert np.count_nonzero(mask != base_result) > 0.05 * mask.size


def test_left_handed_file_flipped_by_slicer_on_load(env, base, base_result, tiny_model_file, tmp_path):
    nib = pytest.importorskip("nibabel")
    array, affine = flip(*base, 2)
    assert np.linalg.det(affine[:3, :3]) < 0
    path = tmp_path / "left_handed.nii.gz"
    nib.save(nib.Nifti1Image(array, affine), str(path))
    volume = env.load_volume(path, "left-handed file")
    loaded = ijk_to_ras(volume)
    assert np.linalg.det(loaded[:3, :3]) > 0, "Slicer makes the IJK frame right-handed on load"
    logic = VNetSegmentationLogic(env.scene, includeShippedModels=False)
    seg, result = logic.segment(volume, tiny_model_file, OPTIONS)
    mask = nodes.segmentMask(seg, result.segmentIDs[0], volume)
    on_base = resample_nearest(mask, loaded, base[0].shape, base[1])
    assert (on_base >= 0).all() and np.count_nonzero(on_base != base_result) == 0


@pytest.mark.parametrize("degrees,axis", [(20.0, 2), (-35.0, 0)])
def test_oblique_volume_segment_rotates_with_the_image(degrees, axis, env, base, base_result, tiny_model_file):
    array, affine = base
    oblique = rotation(degrees, axis) @ affine
    _, seg, mask = segment_volume(env, tiny_model_file, array, oblique, f"oblique {degrees}")
    # the network sees the same voxels (closest-RAS axes, same spacing), so the IJK mask is the same
    assert np.count_nonzero(mask != base_result) == 0
    # and the segment lies on the oblique grid: its labelmap geometry is the volume's matrix
    image = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(seg, "Spleen", image)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    assert np.allclose(slicer.util.arrayFromVTKMatrix(matrix), oblique, atol=1e-6)
    # the 3D surface is where the rotated voxels are, not where the unrotated ones were
    surface = seg.GetClosedSurfaceInternalRepresentation("Spleen")
    from vtk.util.numpy_support import vtk_to_numpy

    points = vtk_to_numpy(surface.GetPoints().GetData())
    expected = ras_centroid(mask, oblique)
    unrotated = ras_centroid(mask, affine)
    assert np.linalg.norm(points.mean(axis=0) - expected) < 0.25 * np.linalg.norm(expected - unrotated)


def test_geometry_difference_reports_mismatch():
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    assert nodes.geometryDifference(affine, (4, 5, 6), affine.copy(), (4, 5, 6)) == ""
    shifted = affine.copy()
    shifted[0, 3] = 0.5
    assert "0.5000 mm" in nodes.geometryDifference(affine, (4, 5, 6), shifted, (4, 5, 6))
    assert "grid sizes differ" in nodes.geometryDifference(affine, (4, 5, 6), affine, (4, 5, 7))

"""A CT under a parent transform: "Check again", "Export for training" and an existing output
segmentation read and write the segment in the CT's own (local) frame.

Real MRML nodes (slicer-core), the real CT with its pseudo-label spleen, and linear transforms
(a translation, a rotation plus translation) set on the CT, on the segmentation, or on both.
"""

from __future__ import annotations

import numpy as np
import pytest
from slicer_helpers import ijk_to_ras, node_array_ijk, one_torch_thread, slicer, vtk  # noqa: F401
from vtk.util import numpy_support

from vnetseg.checkpoint import SPLEEN_LABELS
from VNetSegmentationLib import SegmentationOptions, nodes


def rotation_z(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    m = np.eye(4)
    m[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return m


TRANSFORMS = {
    "translated": np.array([[1, 0, 0, 12.5], [0, 1, 0, -40.0], [0, 0, 1, 25.0], [0, 0, 0, 1.0]]),
    "rotated": rotation_z(30.0) @ np.array([[1, 0, 0, 5.0], [0, 1, 0, 7.0], [0, 0, 1, -9.0], [0, 0, 0, 1.0]]),
}


@pytest.fixture(scope="module")
def spleen(ct_dir):
    nib = pytest.importorskip("nibabel")
    label = nib.load(str(ct_dir / "example_ct_sm_multilabel_v2.nii.gz"))
    return (np.asarray(label.dataobj) == 1).astype(np.uint8)


def transform_node(env, matrix: np.ndarray, name: str):
    node = env.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    return node


def world_mask(seg, segment_id):
    """The segment as Slicer shows it: in world (RAS) coordinates, as (I, J, K) array + voxel-to-RAS."""
    image = slicer.vtkOrientedImageData()
    assert slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(seg, segment_id, image)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    extent = image.GetExtent()
    dims = [extent[2 * a + 1] - extent[2 * a] + 1 for a in range(3)]
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    array = voxels.reshape(dims[::-1]).transpose(2, 1, 0)
    affine = slicer.util.arrayFromVTKMatrix(matrix) @ np.c_[np.eye(4, 3), [extent[0], extent[2], extent[4], 1.0]]
    return array, affine


def ras_centroid(mask, affine):
    idx = np.argwhere(mask > 0)
    return (np.c_[idx, np.ones(len(idx))] @ affine.T)[:, :3].mean(axis=0)


@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
def test_check_again_and_export_read_the_segment_in_the_ct_frame(kind, env, ct_dir, spleen, logic, tmp_path):
    nib = pytest.importorskip("nibabel")
    ct = env.load_volume(ct_dir / "example_ct_sm.nii.gz", f"ct {kind}")
    ct.SetAndObserveTransformNodeID(transform_node(env, TRANSFORMS[kind], f"T {kind}").GetID())
    seg = nodes.createSegmentationNode(env.scene, ct, spleen, SPLEEN_LABELS, f"seg {kind}", closedSurface=False)
    assert seg.GetTransformNodeID() == ct.GetTransformNodeID()
    segment_id = seg.GetSegmentation().GetSegmentIdBySegmentName("Spleen")

    # in Slicer's views the segment lies on the transformed CT: world centroid = T x local centroid
    array, affine = world_mask(seg, segment_id)
    local = ras_centroid(spleen, ijk_to_ras(ct))
    np.testing.assert_allclose(ras_centroid(array, affine), (TRANSFORMS[kind] @ np.r_[local, 1.0])[:3], atol=1e-3)

    # the mask read back for the checks and the export is the CT's voxels, exactly
    assert np.array_equal(nodes.segmentMask(seg, segment_id, ct), spleen)
    # what the default applyParentTransform=True gives, taken as the CT's local IJK, is elsewhere
    world = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(seg, segment_id, world)
    misplaced = nodes.maskFromOrientedImage(world, spleen.shape, ijk_to_ras(ct))
    assert np.count_nonzero(misplaced & spleen) < 0.8 * spleen.sum()

    report, _ = logic.qualityWarnings(seg, ct)
    voxel_ml = abs(np.linalg.det(ijk_to_ras(ct)[:3, :3])) / 1000.0
    assert report.volume_ml == pytest.approx(spleen.sum() * voxel_ml)

    result = logic.exportForTraining(ct, seg, tmp_path / "Task", f"case_{kind}")
    image, label = nib.load(str(result.image)), nib.load(str(result.label))
    np.testing.assert_allclose(label.affine, image.affine)
    np.testing.assert_allclose(image.affine, ijk_to_ras(ct), atol=1e-4)
    assert np.array_equal(np.asarray(label.dataobj), spleen)
    assert np.array_equal(np.asarray(image.dataobj), node_array_ijk(ct))


@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
def test_existing_output_under_another_transform_gets_the_segment_in_place(kind, env, ct_dir, spleen):
    """CT under a transform, the chosen output segmentation under none (or the other way round)."""
    transform = transform_node(env, TRANSFORMS[kind], f"T2 {kind}")
    for ct_transformed in (True, False):
        ct = env.load_volume(ct_dir / "example_ct_sm.nii.gz", f"ct2 {kind} {ct_transformed}")
        seg = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"existing {kind} {ct_transformed}")
        seg.CreateDefaultDisplayNodes()
        (ct if ct_transformed else seg).SetAndObserveTransformNodeID(transform.GetID())
        nodes.ensureConverterRules()
        (segment_id,) = nodes.fillSegments(seg, ct, spleen, SPLEEN_LABELS)

        ct_world = (TRANSFORMS[kind] if ct_transformed else np.eye(4)) @ ijk_to_ras(ct)
        array, affine = world_mask(seg, segment_id)
        np.testing.assert_allclose(ras_centroid(array, affine), ras_centroid(spleen, ct_world), atol=1e-3)
        assert array.sum() == spleen.sum()
        # and reading it back for the CT returns its voxels
        assert np.array_equal(nodes.segmentMask(seg, segment_id, ct), spleen)


def test_segmenting_a_transformed_ct_gives_the_untransformed_answer(env, ct_dir, tiny_model_file, logic):
    plain = env.load_volume(ct_dir / "example_ct_sm.nii.gz", "plain")
    moved = env.load_volume(ct_dir / "example_ct_sm.nii.gz", "moved")
    moved.SetAndObserveTransformNodeID(transform_node(env, TRANSFORMS["rotated"], "T3").GetID())
    options = SegmentationOptions("cpu", 0.0, postprocess=False)
    seg_plain, res_plain = logic.segment(plain, tiny_model_file, options)
    seg_moved, res_moved = logic.segment(moved, tiny_model_file, options)
    assert seg_moved.GetTransformNodeID() == moved.GetTransformNodeID()
    mask_plain = nodes.segmentMask(seg_plain, res_plain.segmentIDs[0], plain)
    mask_moved = nodes.segmentMask(seg_moved, res_moved.segmentIDs[0], moved)
    assert mask_plain.any() and np.array_equal(mask_plain, mask_moved)
    assert res_moved.volumeMl == pytest.approx(res_plain.volumeMl)

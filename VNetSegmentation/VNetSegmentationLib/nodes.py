"""Exchange between Slicer MRML nodes and the core's arrays (Qt-free; needs only slicer, vtk, numpy).

Conventions: the core works on ``(I, J, K)`` arrays with a 4x4 voxel-to-RAS affine; a Slicer volume
node holds ``(K, J, I)`` voxels (``arrayFromVolume``) and its own IJK-to-RAS matrix. The two are the
same image when the array is transposed and the IJK-to-RAS matrix is used as the affine, whatever
the orientation (oblique, left-handed, flipped). Segments are written and read on exactly the
volume's voxel grid, so a mask computed for the volume overlays it voxel for voxel.

Transforms: everything here is in the volume's own (local) frame, the frame of its IJK-to-RAS
matrix and of ``arrayFromVolume``, whatever parent transform the volume has. A segmentation under
the same parent transform shares that frame; one under another transform is mapped between the
two frames with ``vtkMRMLTransformNode.GetTransformBetweenNodes`` (linear or not).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

LABELMAP_REPRESENTATION = "Binary labelmap"
CLOSED_SURFACE_REPRESENTATION = "Closed surface"


def ensureConverterRules() -> None:
    """Register the labelmap <-> closed surface conversion rules when nobody has (headless use).

    The Slicer application registers them at startup; ``slicer-core`` alone does not, and a
    segmentation node copies the factory's rules when it is created, so call this first.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    present = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for ruleClass in (
        "vtkBinaryLabelmapToClosedSurfaceConversionRule",
        "vtkClosedSurfaceToBinaryLabelmapConversionRule",
    ):
        if ruleClass not in present:
            factory.RegisterConverterRule(getattr(slicer, ruleClass)())


def ijkToRas(volumeNode) -> np.ndarray:
    """The volume's (4, 4) IJK-to-RAS matrix (mm) as a numpy array."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def vtkMatrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    """A vtkMatrix4x4 holding the (4, 4) ``array``."""
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def volumeShape(volumeNode) -> tuple[int, int, int]:
    """(I, J, K) voxel counts of a volume node."""
    image = volumeNode.GetImageData() if volumeNode is not None else None
    if image is None:
        raise ValueError("the volume node holds no image data; load a CT volume first")
    return tuple(int(d) for d in image.GetDimensions())  # type: ignore[return-value]


def volumeArrayIJK(volumeNode) -> np.ndarray:
    """The volume's voxels as an (I, J, K) array view in the node's scalar type (no copy)."""
    volumeShape(volumeNode)
    image = volumeNode.GetImageData()
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(
            f"volume '{volumeNode.GetName()}' has {image.GetNumberOfScalarComponents()} components per voxel; "
            "a scalar (grey-value) CT volume is needed"
        )
    return slicer.util.arrayFromVolume(volumeNode).transpose(2, 1, 0)


def imageFromVolumeNode(volumeNode, copy: bool = False):
    """The volume as a core ``vnetseg.io.Image``: (I, J, K) HU plus its IJK-to-RAS affine.

    Without ``copy`` the array is a read-only use of the node's own voxels in their stored type
    (an int16 CT costs no extra memory; the core reads integer CTs as they are); the node must
    not change while the image is in use. A parent transform of the volume is not applied: the
    image stays in the volume's own coordinate frame, and the segmentation node gets the same
    parent transform.
    """
    from vnetseg import io as vio

    array = volumeArrayIJK(volumeNode)
    return vio.Image(np.array(array) if copy else array, ijkToRas(volumeNode))


def geometryImage(shape: Sequence[int], affine: np.ndarray):
    """A vtkOrientedImageData with the given (I, J, K) extent and voxel-to-RAS matrix, no voxels."""
    image = slicer.vtkOrientedImageData()
    image.SetExtent(0, int(shape[0]) - 1, 0, int(shape[1]) - 1, 0, int(shape[2]) - 1)
    image.SetImageToWorldMatrix(vtkMatrix(affine))
    return image


def orientedImageFromMask(mask: np.ndarray, affine: np.ndarray):
    """(I, J, K) binary ``mask`` on the grid of ``affine`` -> vtkOrientedImageData (uint8 0/1)."""
    if mask.ndim != 3:
        raise ValueError(f"mask must be a 3D (I, J, K) array, got shape {mask.shape}")
    image = geometryImage(mask.shape, affine)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    voxels[:] = np.ascontiguousarray(np.asarray(mask, dtype=bool).transpose(2, 1, 0)).ravel()
    return image


def maskFromOrientedImage(
    image, shape: Sequence[int], affine: np.ndarray, labelValue: int = 1, imageToGrid=None
) -> np.ndarray:
    """Voxels equal to ``labelValue`` of a vtkOrientedImageData, on the grid (``shape``, ``affine``).

    Nearest-neighbour; voxels of the grid outside the image are 0. When the image already lies on
    that grid (the usual case) this is an exact copy. ``imageToGrid`` (a vtkAbstractTransform)
    maps the image's coordinates into the grid's when the two are in different frames.

    Returns:
        (I, J, K) uint8, 1 where the image holds ``labelValue``.
    """
    reference = geometryImage(shape, affine)
    resampled = slicer.vtkOrientedImageData()
    ok = slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        image, reference, resampled, False, True, imageToGrid
    )
    if not ok:
        raise RuntimeError("the segment could not be resampled onto the volume's grid")
    extent = resampled.GetExtent()
    out = np.zeros(tuple(int(s) for s in shape), dtype=np.uint8)
    if extent[1] < extent[0] or resampled.GetPointData().GetScalars() is None:
        return out
    dims = [extent[2 * a + 1] - extent[2 * a] + 1 for a in range(3)]
    voxels = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(dims[::-1]).transpose(2, 1, 0)
    # clip the resampled extent to the reference extent (it may be padded beyond it)
    src = [slice(max(0, -extent[2 * a]), dims[a] - max(0, extent[2 * a + 1] - (int(shape[a]) - 1))) for a in range(3)]
    dst = [slice(max(0, extent[2 * a]), min(int(shape[a]) - 1, extent[2 * a + 1]) + 1) for a in range(3)]
    out[tuple(dst)] = voxels[tuple(src)] == labelValue
    return out


def transformBetween(sourceNode, targetNode):
    """The transform from ``sourceNode``'s local frame to ``targetNode``'s, or None when they share one.

    Both are transformable nodes (volume, segmentation); a node with no parent transform is in world
    (RAS) coordinates. Returns a vtkGeneralTransform (linear or not) otherwise.
    """
    sourceParent, targetParent = sourceNode.GetParentTransformNode(), targetNode.GetParentTransformNode()
    if sourceParent is targetParent or (
        sourceParent is not None and targetParent is not None and sourceParent.GetID() == targetParent.GetID()
    ):
        return None
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(sourceParent, targetParent, transform)
    return transform


def segmentMask(segmentationNode, segmentId: str, volumeNode) -> np.ndarray:
    """A segment's binary labelmap on ``volumeNode``'s voxel grid (its local IJK): (I, J, K) uint8 0/1.

    The labelmap is read in the segmentation's own frame (``applyParentTransform=False``; the default
    would return it in world coordinates) and mapped into the volume's frame when the two nodes are
    under different transforms. Works for segments that share a labelmap layer with others (as the
    Segment Editor leaves them): the layer holds one label value per segment, and only this
    segment's value is kept.
    """
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if segment is None:
        raise ValueError(f"segmentation '{segmentationNode.GetName()}' has no segment with ID '{segmentId}'")
    image = slicer.vtkOrientedImageData()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.GetSegmentBinaryLabelmapRepresentation(segmentationNode, segmentId, image, False):
        raise RuntimeError(f"segment '{segmentId}' has no binary labelmap representation")
    return maskFromOrientedImage(
        image,
        volumeShape(volumeNode),
        ijkToRas(volumeNode),
        segment.GetLabelValue(),
        transformBetween(segmentationNode, volumeNode),
    )


def setSegmentAppearance(segment, label) -> None:
    """Name, colour (0-255 RGB -> 0-1) and terminology of one ``vnetseg.checkpoint.Label``."""
    segment.SetName(label.name)
    segment.SetNameAutoGenerated(False)
    segment.SetColor(*(c / 255.0 for c in label.color))
    segment.SetColorAutoGenerated(False)
    if label.terminology:
        segment.SetTerminology(label.terminology)


def fillSegments(segmentationNode, volumeNode, labelmap: np.ndarray, labels: Sequence) -> list[str]:
    """Write one segment per label of (I, J, K) ``labelmap`` on the volume's grid; return segment IDs.

    An existing segment with the same name is replaced in place (its ID is kept), also when it
    shares a labelmap layer with other segments; other segments of the node are left alone. When
    the segmentation is under another parent transform than the volume, the mask is moved into
    the segmentation's frame first (a linear transform changes only the labelmap's geometry; a
    non-linear one resamples it), so it lies where the volume's voxels are in the views.
    """
    affine = ijkToRas(volumeNode)
    if tuple(labelmap.shape) != volumeShape(volumeNode):
        raise ValueError(f"labelmap shape {labelmap.shape} differs from the volume's {volumeShape(volumeNode)}")
    segmentation = segmentationNode.GetSegmentation()
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    volumeToSegmentation = transformBetween(volumeNode, segmentationNode)
    ids = []
    for label in labels:
        image = orientedImageFromMask(labelmap == label.value, affine)
        if volumeToSegmentation is not None:
            slicer.vtkOrientedImageDataResample.TransformOrientedImage(image, volumeToSegmentation)
        segmentId = segmentation.GetSegmentIdBySegmentName(label.name)
        if segmentId:
            logic = slicer.vtkSlicerSegmentationsModuleLogic
            if not logic.SetBinaryLabelmapToSegment(image, segmentationNode, segmentId, logic.MODE_REPLACE):
                raise RuntimeError(f"segment '{label.name}' of '{segmentationNode.GetName()}' could not be replaced")
        else:
            segment = slicer.vtkSegment()
            segment.AddRepresentation(LABELMAP_REPRESENTATION, image)
            segmentId = segmentation.GenerateUniqueSegmentID(label.name)
            segmentation.AddSegment(segment, segmentId)
        setSegmentAppearance(segmentation.GetSegment(segmentId), label)
        ids.append(segmentId)
    segmentationNode.Modified()
    return ids


def createSegmentationNode(
    scene, volumeNode, labelmap: np.ndarray, labels: Sequence, name: str, closedSurface: bool = True
):
    """Add a new segmentation node holding ``labelmap`` (I, J, K) as one segment per label.

    The reference geometry is the volume, the parent transform is the volume's, and a closed
    surface is created for 3D display. Nothing is left in the scene if building fails.
    """
    ensureConverterRules()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    try:
        node.CreateDefaultDisplayNodes()
        node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        fillSegments(node, volumeNode, labelmap, labels)
        if closedSurface:
            node.CreateClosedSurfaceRepresentation()
    except Exception:
        removeNodeWithDisplay(scene, node)
        raise
    return node


def removeNodeWithDisplay(scene, node) -> None:
    """Remove a node and its display and storage nodes from the scene."""
    for index in range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0):
        display = node.GetNthDisplayNode(index)
        if display is not None:
            scene.RemoveNode(display)
    if hasattr(node, "GetStorageNode") and node.GetStorageNode() is not None:
        scene.RemoveNode(node.GetStorageNode())
    scene.RemoveNode(node)


def geometryDifference(affineA: np.ndarray, shapeA: Sequence[int], affineB: np.ndarray, shapeB: Sequence[int]) -> str:
    """Empty when two grids are the same (within 1e-3 mm); else a sentence saying how they differ."""
    if tuple(int(s) for s in shapeA) != tuple(int(s) for s in shapeB):
        return f"grid sizes differ: {tuple(shapeA)} vs {tuple(shapeB)} voxels"
    # compare the physical positions of the grid's corner voxels
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, shapeA[0] - 1) for j in (0, shapeA[1] - 1) for k in (0, shapeA[2] - 1)]
    )
    shift = np.abs((corners @ np.asarray(affineA).T) - (corners @ np.asarray(affineB).T))[:, :3].max()
    if shift > 1e-3 + 1e-5 * float(np.abs(corners @ np.asarray(affineA).T).max()):
        return f"voxel positions differ by up to {shift:.4f} mm"
    return ""

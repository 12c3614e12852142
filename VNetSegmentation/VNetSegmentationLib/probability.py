"""The "Spleen probability" scalar volume: the network's probability in the scene, over the CT (Qt-free).

The map comes from the core on the CT's own voxel grid (``vnetseg.confidence``), so the node gets
exactly the CT's IJK-to-RAS matrix and parent transform; it is shown with a colour table of its
own (dark blue at 0 through magenta to yellow at 1), voxels under ``SHOWN_FROM`` transparent, as
the foreground layer over the CT at ``FOREGROUND_OPACITY``: the CT stays readable under it, and
the places where the network hesitated (magenta rims) stand out from the sure core (yellow).
"""

from __future__ import annotations

import numpy as np
import slicer

from . import nodes

NODE_NAME = "Spleen probability"
COLOR_NODE_NAME = "VNetSegmentation probability"
FOREGROUND_OPACITY = 0.5
SHOWN_FROM = 0.05  # probabilities below this are transparent: the CT is not tinted where there is no spleen
COVERS_ATTRIBUTE = "VNetSegmentation.ProbabilityCovers"
SOURCE_ATTRIBUTE = "VNetSegmentation.SourceVolume"
# (position 0-1, RGB 0-1): a sequential ramp, dark to bright, readable on a grey CT
_RAMP = ((0.0, (0.05, 0.03, 0.53)), (0.5, (0.80, 0.28, 0.47)), (1.0, (0.94, 0.98, 0.13)))


def probabilityColorNode(scene):
    """The module's colour table for probability maps (made once per scene, then reused)."""
    node = scene.GetFirstNodeByName(COLOR_NODE_NAME)
    if node is not None and node.IsA("vtkMRMLColorTableNode"):
        return node
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", COLOR_NODE_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    positions = [p for p, _ in _RAMP]
    for index in range(256):
        t = index / 255.0
        rgb = [float(np.interp(t, positions, [c[k] for _, c in _RAMP])) for k in range(3)]
        node.SetColor(index, f"{t:.3f}", *rgb, 1.0)
    node.SetNamesInitialised(True)
    node.SetAttribute("Category", "VNetSegmentation")
    return node


def addProbabilityNode(scene, volumeNode, probability: np.ndarray, covers: str, name: str = NODE_NAME):
    """Add a scalar volume holding (I, J, K) ``probability`` on ``volumeNode``'s grid; return it.

    Args:
        probability: float32 0-1 (or uint8 0-255) on exactly the volume's voxel grid.
        covers: what the map covers ("volume", "box": 0 outside fast mode's box, "body": 0 outside
            the body's box in full mode, "nothing").

    Raises:
        ValueError: when the array's shape is not the volume's.
    """
    shape = nodes.volumeShape(volumeNode)
    if tuple(probability.shape) != shape:
        raise ValueError(f"probability map shape {tuple(probability.shape)} differs from the volume's {shape}")
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    try:
        node.SetIJKToRASMatrix(nodes.vtkMatrix(nodes.ijkToRas(volumeNode)))
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(probability.transpose(2, 1, 0)))
        node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        node.SetAttribute(COVERS_ATTRIBUTE, covers)
        node.SetAttribute(SOURCE_ATTRIBUTE, volumeNode.GetID())
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        top = 255.0 if probability.dtype == np.uint8 else 1.0
        display.SetAndObserveColorNodeID(probabilityColorNode(scene).GetID())
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(0.0, top)
        display.SetAutoThreshold(False)
        display.SetApplyThreshold(True)
        display.SetThreshold(SHOWN_FROM * top, top)
    except Exception:
        nodes.removeNodeWithDisplay(scene, node)
        raise
    return node


def showAsForeground(scene, volumeNode, probabilityNode, opacity: float = FOREGROUND_OPACITY) -> int:
    """Show the CT as background and the map as foreground in every slice view; return how many views."""
    count = scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")
    for index in range(count):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        composite.SetBackgroundVolumeID(volumeNode.GetID())
        composite.SetForegroundVolumeID(probabilityNode.GetID())
        composite.SetForegroundOpacity(float(opacity))
    return count


def readProbability(path, volumeNode) -> np.ndarray:
    """Read the process's probability map and check it lies on the volume's grid: (I, J, K)."""
    from vnetseg import io as vio

    image = vio.read_image(path, dtype=None, allow_uniform=True)  # all 0: "no spleen in view"
    difference = nodes.geometryDifference(
        image.affine, image.shape, nodes.ijkToRas(volumeNode), nodes.volumeShape(volumeNode)
    )
    if difference:
        raise RuntimeError(f"the probability map does not lie on the CT's grid ({difference}); it was not loaded")
    return np.asarray(image.array)

"""The module's parameters, stored in a ``vtkMRMLScriptedModuleNode`` so a saved scene restores the panel.

:class:`VNetSegmentationParameters` is the Qt-free schema. The Widget's ``parameterNodeWrapper``
class (``VNetSegmentationParameterNode`` in ``VNetSegmentation.py``) declares the same names,
types and defaults, and both store values the same way: numbers as ``str(value)``, booleans as
"True"/"False", strings as they are, nodes as a node reference whose role is the parameter name
(plus an empty parameter of that name). A test keeps the two declarations identical.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .runs import DEFAULT_MIN_LOCATED_ML, MIN_LOCATED_ML_RANGE

MODULE_NAME = "VNetSegmentation"
DEVICES = ("auto", "gpu", "cpu")
MODES = ("auto", "fast", "full")
NODE_PARAMETERS = {"inputVolume": "vtkMRMLScalarVolumeNode", "outputSegmentation": "vtkMRMLSegmentationNode"}


@dataclass
class VNetSegmentationParameters:
    """Everything the panel shows.

    Attributes:
        inputVolume: the CT volume node (or None).
        outputSegmentation: the segmentation node to fill; None creates a new one.
        modelName: the selected model, as listed by ``ModelStore.listModels`` (``ModelEntry.name``).
        device: "auto", "gpu" or "cpu".
        overlap: sliding-window overlap fraction in [0, 0.9].
        postprocess: keep the largest component, trim it to the organ's HU range (on native CT also grow
            it into uncertain voxels in that range), cut off thin appendages and fill holes.
        mode: "auto", "fast" or "full" (how the core covers the volume; see SegmentationOptions).
        resultSummary: the last run's result text (volume, time, device, warnings).
        probabilityMap: also add the "Spleen probability" volume, shown over the CT (off by default).
        minLocatedMl: the smallest part (mL) the whole-CT view takes for a spleen in view (see
            ``SegmentationOptions.minLocatedMl``).
    """

    inputVolume: Any = None
    outputSegmentation: Any = None
    modelName: str = ""
    device: str = "auto"
    overlap: float = 0.25
    postprocess: bool = True
    mode: str = "auto"
    resultSummary: str = ""
    probabilityMap: bool = False
    minLocatedMl: float = DEFAULT_MIN_LOCATED_ML

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 <= float(self.overlap) <= 0.9:
            raise ValueError(f"overlap must be in [0, 0.9], got {self.overlap}")
        low, high = MIN_LOCATED_ML_RANGE
        if not low <= float(self.minLocatedMl) <= high:
            raise ValueError(f"minLocatedMl must be in [{low:g}, {high:g}] mL, got {self.minLocatedMl}")


def _encode(value: Any) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


def writeParameters(parameterNode, params: VNetSegmentationParameters) -> None:
    """Store ``params`` in ``parameterNode`` (a vtkMRMLScriptedModuleNode), one modified event."""
    wasModifying = parameterNode.StartModify()
    try:
        for f in fields(params):
            value = getattr(params, f.name)
            if f.name in NODE_PARAMETERS:
                parameterNode.SetParameter(f.name, "")
                parameterNode.SetNodeReferenceID(f.name, value.GetID() if value is not None else None)
            else:
                parameterNode.SetParameter(f.name, _encode(value))
    finally:
        parameterNode.EndModify(wasModifying)


def readParameters(parameterNode) -> VNetSegmentationParameters:
    """Read the parameters back; a parameter that was never written keeps its default."""
    params = VNetSegmentationParameters()
    for f in fields(params):
        if not parameterNode.HasParameter(f.name):
            continue
        if f.name in NODE_PARAMETERS:
            value: Any = parameterNode.GetNodeReference(f.name)
        else:
            text = parameterNode.GetParameter(f.name)
            default = getattr(params, f.name)
            value = text == "True" if isinstance(default, bool) else type(default)(text)
        setattr(params, f.name, value)
    params.__post_init__()
    return params


def getParameterNode(scene, moduleName: str = MODULE_NAME):
    """The module's parameter node in ``scene``, created on first use.

    Found and made the way Slicer's ``ScriptedLoadableModuleLogic.getParameterNode`` does it (a
    singleton vtkMRMLScriptedModuleNode tagged with the module name, with a ``ModuleName``
    attribute), so the Widget and scripts share one node, and it is saved with the scene.
    """
    node = scene.GetSingletonNode(moduleName, "vtkMRMLScriptedModuleNode")
    if node is not None:
        if node.GetAttribute("ModuleName") != moduleName:
            node.SetAttribute("ModuleName", moduleName)
        return node
    node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
    node.UnRegister(None)
    node.SetSingletonTag(moduleName)
    node.SetAttribute("ModuleName", moduleName)
    node.SetName(scene.GenerateUniqueName(moduleName))
    return scene.AddNode(node)

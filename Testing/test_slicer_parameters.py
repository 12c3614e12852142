"""The parameter node: values survive a round trip through a real vtkMRMLScriptedModuleNode and a
saved-and-reloaded scene, and the Widget's parameterNodeWrapper class declares the same schema."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from slicer_helpers import slicer

from VNetSegmentationLib.parameters import (
    DEVICES,
    MODES,
    NODE_PARAMETERS,
    VNetSegmentationParameters,
    getParameterNode,
    readParameters,
    writeParameters,
)

MODULE_FILE = Path(__file__).resolve().parents[1] / "VNetSegmentation" / "VNetSegmentation.py"


def scene_with_nodes():
    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT segmentation")
    return scene, volume, seg


def test_defaults_when_nothing_was_written():
    scene = slicer.vtkMRMLScene()
    assert readParameters(getParameterNode(scene)) == VNetSegmentationParameters()


def test_round_trip_through_the_node():
    scene, volume, seg = scene_with_nodes()
    node = getParameterNode(scene)
    params = VNetSegmentationParameters(
        volume, seg, "spleen-v1", "cpu", 0.5, False, "full", "Spleen volume: 250.0 mL\nWarning: x"
    )
    writeParameters(node, params)
    assert readParameters(node) == params
    # stored exactly as Slicer's parameterNodeWrapper serializers store them
    assert node.GetParameter("postprocess") == "False" and node.GetParameter("overlap") == "0.5"
    assert node.GetParameter("inputVolume") == "" and node.GetNodeReferenceID("inputVolume") == volume.GetID()


def test_saved_scene_restores_the_panel():
    scene, volume, seg = scene_with_nodes()
    params = VNetSegmentationParameters(
        volume, seg, "spleen-v1", "gpu", 0.75, True, "fast", "Spleen volume: 250.0 mL\nTime: 3 s", minLocatedMl=5.0
    )
    writeParameters(getParameterNode(scene), params)
    scene.SetSaveToXMLString(1)
    scene.Commit()
    xml = scene.GetSceneXMLString()

    restored = slicer.vtkMRMLScene()
    restored.SetLoadFromXMLString(1)
    restored.SetSceneXMLString(xml)
    assert restored.Import()
    back = readParameters(getParameterNode(restored))
    assert back.inputVolume.GetName() == "CT" and back.inputVolume.GetID() == volume.GetID()
    assert back.outputSegmentation.GetName() == "CT segmentation"
    assert back.mode == "fast" and back.minLocatedMl == 5.0
    assert (back.modelName, back.device, back.overlap, back.postprocess, back.resultSummary) == (
        "spleen-v1",
        "gpu",
        0.75,
        True,
        "Spleen volume: 250.0 mL\nTime: 3 s",
    )
    assert restored.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1


def test_one_parameter_node_per_scene_found_like_slicer_does():
    scene = slicer.vtkMRMLScene()
    node = getParameterNode(scene)
    assert getParameterNode(scene) is node
    assert node.GetAttribute("ModuleName") == "VNetSegmentation" and node.GetSingletonTag() == "VNetSegmentation"
    assert scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1


@pytest.mark.parametrize("field,value", [("device", "tpu"), ("overlap", 0.95), ("overlap", -0.1), ("mode", "slow"),
                                         ("minLocatedMl", 0.0), ("minLocatedMl", 0.4), ("minLocatedMl", 501.0)])
def test_invalid_values_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        VNetSegmentationParameters(**{field: value})


def test_segmentation_options_refuse_a_smallest_spleen_outside_the_panels_range():
    from VNetSegmentationLib.runs import SegmentationOptions

    for bad in (0.0, 0.4, 501.0, float("nan")):
        with pytest.raises(ValueError, match=r"the smallest spleen in view must be 0.5-500 mL, got .* \(the default is 10 mL\)"):
            SegmentationOptions(minLocatedMl=bad)
    assert SegmentationOptions(minLocatedMl=5).minLocatedMl == 5


def wrapper_schema():
    """(name, annotation source, default) of the @parameterNodeWrapper class in VNetSegmentation.py."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    (cls,) = [
        n
        for n in tree.body
        if isinstance(n, ast.ClassDef) and any(ast.unparse(d) == "parameterNodeWrapper" for d in n.decorator_list)
    ]
    return [
        (s.target.id, s.annotation, ast.literal_eval(s.value) if s.value is not None else None)
        for s in cls.body
        if isinstance(s, ast.AnnAssign)
    ]


def test_widget_parameter_class_declares_the_same_schema():
    fields = dataclasses.fields(VNetSegmentationParameters)
    schema = wrapper_schema()
    assert [name for name, _, _ in schema] == [f.name for f in fields]
    defaults = VNetSegmentationParameters()
    for name, annotation, default in schema:
        assert default == getattr(defaults, name), name
        text = ast.unparse(annotation)
        if name in NODE_PARAMETERS:
            assert text == NODE_PARAMETERS[name]
        else:
            assert text.startswith(("Annotated[" + type(default).__name__, type(default).__name__)), (name, text)
    annotations = {name: ast.unparse(a) for name, a, _ in schema}
    assert annotations["device"] == f"Annotated[str, Choice({list(DEVICES)!r})]"
    assert annotations["mode"] == f"Annotated[str, Choice({list(MODES)!r})]"
    assert annotations["overlap"] == "Annotated[float, WithinRange(0.0, 0.9)]"
    # the panel's range for the smallest spleen in view is the Lib's, and its default the core's
    from vnetseg.fast import MIN_LOCATED_ML
    from VNetSegmentationLib.runs import DEFAULT_MIN_LOCATED_ML, MIN_LOCATED_ML_RANGE, SegmentationOptions

    low, high = MIN_LOCATED_ML_RANGE
    assert annotations["minLocatedMl"] == f"Annotated[float, WithinRange({low!r}, {high!r})]"
    assert defaults.minLocatedMl == SegmentationOptions().minLocatedMl == DEFAULT_MIN_LOCATED_ML == MIN_LOCATED_ML

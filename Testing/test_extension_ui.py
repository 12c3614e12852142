"""Static checks of the panel: the .ui file parses, and every widget the Widget code uses exists there
with the class the code expects (the Slicer application is not needed)."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[1] / "VNetSegmentation"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "VNetSegmentation.ui"
MODULE_FILE = MODULE_DIR / "VNetSegmentation.py"

# what VNetSegmentation.py does with each widget decides its class
EXPECTED = {
    "inputVolumeSelector": "qMRMLNodeComboBox",
    "outputSegmentationSelector": "qMRMLNodeComboBox",
    "modelSelector": "QComboBox",
    "deviceSelector": "QComboBox",
    "importModelButton": "QPushButton",
    "segmentButton": "QPushButton",
    "installTorchButton": "QPushButton",
    "show3DButton": "QPushButton",
    "editButton": "QPushButton",
    "recheckButton": "QPushButton",
    "exportButton": "QPushButton",
    "improveModelButton": "QPushButton",
    "finetuneReportLabel": "QLabel",
    "modelCardLabel": "QLabel",
    "torchStatusLabel": "QLabel",
    "deviceInfoLabel": "QLabel",
    "statusLabel": "QLabel",
    "resultLabel": "QLabel",
    "progressBar": "QProgressBar",
    "advancedCollapsibleButton": "ctkCollapsibleButton",
    "overlapSliderWidget": "ctkSliderWidget",
    "postprocessCheckBox": "QCheckBox",
}
QT_CLASSES = {"QWidget", "QLabel", "QComboBox", "QPushButton", "QProgressBar", "QCheckBox", "QDoubleSpinBox"}


@pytest.fixture(scope="module")
def ui():
    return ET.parse(UI_FILE).getroot()


def widgets(root) -> dict[str, ET.Element]:
    return {w.get("name"): w for w in root.iter("widget")}


def used_names() -> set[str]:
    return set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))


def prop(widget: ET.Element, name: str) -> ET.Element | None:
    return next((p for p in widget.findall("property") if p.get("name") == name), None)


def test_ui_parses_with_a_qmrml_root(ui):
    assert ui.tag == "ui" and ui.get("version") == "4.0"
    root = ui.find("widget")
    assert root.get("class") == "qMRMLWidget" and root.get("name") == "VNetSegmentation"
    names = [w.get("name") for w in ui.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"


def test_every_widget_the_code_uses_exists_with_the_expected_class(ui):
    used = used_names()
    assert used, "the Widget code uses self.ui.<name>"
    assert used <= set(EXPECTED), f"add the class of {sorted(used - set(EXPECTED))} to EXPECTED"
    found = widgets(ui)
    for name in sorted(used):
        assert name in found, f"self.ui.{name} is used but the .ui has no widget named {name}"
        assert found[name].get("class") == EXPECTED[name], name


def test_custom_widgets_are_declared(ui):
    declared = {c.findtext("class") for c in ui.iter("customwidget")}
    classes = {w.get("class") for w in ui.iter("widget")}
    assert classes - QT_CLASSES <= declared


def test_parameter_bindings_match_the_parameter_schema(ui):
    from VNetSegmentationLib.parameters import NODE_PARAMETERS, VNetSegmentationParameters

    fields = VNetSegmentationParameters.__dataclass_fields__
    bound = {}
    for w in ui.iter("widget"):
        p = prop(w, "SlicerParameterName")
        if p is not None:
            bound[p.findtext("string")] = w
    assert set(bound) == {"inputVolume", "outputSegmentation", "overlap", "postprocess", "mode", "probabilityMap",
                          "minLocatedMl"}
    assert set(bound) <= set(fields)
    for name, node_class in NODE_PARAMETERS.items():
        w = bound[name]
        assert w.get("class") == "qMRMLNodeComboBox"
        assert [s.text for s in prop(w, "nodeTypes").iter("string")] == [node_class]
    assert prop(bound["outputSegmentation"], "noneEnabled").findtext("bool") == "true"
    assert prop(bound["outputSegmentation"], "noneDisplay").findtext("string") == "Create new segmentation"
    slider = bound["overlap"]
    assert slider.get("class") == "ctkSliderWidget"
    assert (float(prop(slider, "minimum").findtext("double")), float(prop(slider, "maximum").findtext("double"))) == (
        0.0,
        0.9,
    )
    assert bound["postprocess"].get("class") == "QCheckBox"
    assert bound["mode"].get("class") == "QComboBox"  # filled from the Choice annotation by parameterNodeWrapper
    assert bound["probabilityMap"].get("class") == "QCheckBox"  # issue 14: off by default
    assert prop(bound["probabilityMap"], "checked").findtext("bool") == "false"
    assert VNetSegmentationParameters().probabilityMap is False
    # parameterNodeWrapper binds a float to a QDoubleSpinBox (and sets its range from WithinRange); the
    # .ui's own range and value are what the panel shows before a parameter node is bound
    from VNetSegmentationLib.runs import MIN_LOCATED_ML_RANGE

    spin = bound["minLocatedMl"]
    assert spin.get("class") == "QDoubleSpinBox"
    assert (float(prop(spin, "minimum").findtext("double")), float(prop(spin, "maximum").findtext("double"))) == (
        MIN_LOCATED_ML_RANGE
    )
    assert float(prop(spin, "value").findtext("double")) == VNetSegmentationParameters().minLocatedMl
    assert prop(spin, "suffix").findtext("string") == " mL"


def test_node_selectors_get_the_scene(ui):
    receivers = {
        c.findtext("receiver")
        for c in ui.iter("connection")
        if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    selectors = {n for n, w in widgets(ui).items() if w.get("class") == "qMRMLNodeComboBox"}
    assert selectors and selectors <= receivers


def test_button_texts_the_issue_names(ui):
    found = widgets(ui)
    texts = {
        name: prop(found[name], "text").findtext("string")
        for name in ("segmentButton", "importModelButton", "show3DButton", "editButton", "exportButton")
    }
    assert texts == {
        "segmentButton": "Segment spleen",
        "importModelButton": "Import model file...",
        "show3DButton": "Show 3D",
        "editButton": "Edit in Segment Editor",
        "exportButton": "Export for training...",
    }
    assert "Cancel" in MODULE_FILE.read_text(encoding="utf-8")


def test_module_file_is_valid_python_with_the_slicer_classes():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {
        "VNetSegmentation",
        "VNetSegmentationWidget",
        "VNetSegmentationTest",
        "VNetSegmentationParameterNode",
    } <= set(classes)
    bases = {name: [ast.unparse(b) for b in node.bases] for name, node in classes.items()}
    assert bases["VNetSegmentation"] == ["ScriptedLoadableModule"]
    assert bases["VNetSegmentationWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert bases["VNetSegmentationTest"] == ["ScriptedLoadableModuleTest"]
    # every call the Widget makes into the Logic goes through tryWithErrorDisplay or is a pure read
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert source.count("tryWithErrorDisplay") >= 8


def logic_calls(path: Path) -> list[tuple[str, ast.Call]]:
    """(dotted name after 'logic.', call) for every call like ``self.logic.x(...)`` / ``logic.models.y(...)``."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            dotted = ast.unparse(node.func)
            if ".logic." in f".{dotted}" or dotted.startswith("logic."):
                calls.append((dotted.split("logic.", 1)[1], node))
    return calls


def test_widget_and_in_slicer_tests_call_the_logic_as_it_is():
    """The Widget cannot run here; at least every Logic call it makes must bind to a real signature."""
    import inspect

    from VNetSegmentationLib import SegmentationOptions, VNetSegmentationLogic

    logic = VNetSegmentationLogic(scene=object(), modelFolder="unused", includeShippedModels=False)
    files = [MODULE_FILE, MODULE_DIR / "Testing" / "Python" / "VNetSegmentationWidgetTest.py"]
    checked = 0
    for path in files:
        for dotted, call in logic_calls(path):
            target = logic
            for part in dotted.split("."):
                assert hasattr(target, part), f"{path.name}: logic.{dotted} does not exist"
                target = getattr(target, part)
            inspect.signature(target).bind(*[None] * len(call.args), **{k.arg: None for k in call.keywords})
            checked += 1
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "SegmentationOptions":
                keywords = {k.arg: None for k in node.keywords}
                inspect.signature(SegmentationOptions).bind(*[None] * len(node.args), **keywords)
    assert checked >= 15

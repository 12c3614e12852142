"""Static check of the Widget: no dialog is opened while the wait cursor is shown.

``slicer.util.tryWithErrorDisplay(..., waitCursor=True)`` and the Widget's ``busy()`` set the wait
cursor for the whole block; a file, input or confirmation dialog opened inside it makes the user
answer a question under a busy cursor. The Widget needs the Slicer application, so this reads its
source: every call made inside a wait-cursor block, following the Widget's own methods it calls,
must not be a dialog.
"""

from __future__ import annotations

import ast
from pathlib import Path

MODULE_FILE = Path(__file__).resolve().parents[1] / "VNetSegmentation" / "VNetSegmentation.py"

# calls that open a window the user must answer (Qt dialogs, slicer.util message boxes, and the
# PyTorch extension's installer, which asks its own question)
DIALOGS = {
    "confirmOkCancelDisplay",
    "confirmYesNoDisplay",
    "confirmRetryCloseDisplay",
    "infoDisplay",
    "warningDisplay",
    "errorDisplay",
    "messageBox",
    "getExistingDirectory",
    "getOpenFileName",
    "getOpenFileNames",
    "getSaveFileName",
    "getText",
    "getItem",
    "getInt",
    "getDouble",
    "exec",
    "exec_",
}


def _name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _self_method(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self":
        return func.attr
    return ""


def _is_wait_cursor(item: ast.withitem) -> bool:
    call = item.context_expr
    if not isinstance(call, ast.Call):
        return False
    if _name(call) == "tryWithErrorDisplay":
        return any(k.arg == "waitCursor" and getattr(k.value, "value", False) is True for k in call.keywords)
    return _self_method(call) == "busy"


def dialogs_under_wait_cursor(source: str, class_name: str = "VNetSegmentationWidget") -> list[str]:
    """'method: dialog' for each dialog reachable from inside a wait-cursor block of the class."""
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    methods = {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}
    found: list[str] = []

    def calls_in(nodes, seen: set[str], where: str) -> None:
        for node in nodes:
            for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
                if _name(call) in DIALOGS:
                    found.append(f"{where}: {_name(call)}")
                target = _self_method(call)
                if target in methods and target not in seen:
                    calls_in(methods[target].body, seen | {target}, f"{where} -> {target}")

    for name, method in methods.items():
        for node in ast.walk(method):
            if isinstance(node, ast.With) and any(_is_wait_cursor(item) for item in node.items):
                calls_in(node.body, {name}, name)
    return sorted(set(found))


def test_no_dialog_under_the_wait_cursor():
    assert dialogs_under_wait_cursor(MODULE_FILE.read_text(encoding="utf-8")) == []


def test_the_check_finds_a_dialog_under_the_wait_cursor():
    """The pattern the Widget had: the export's folder dialog and confirmation inside the wait cursor."""
    bad = """
class VNetSegmentationWidget:
    def onExport(self):
        with slicer.util.tryWithErrorDisplay("failed", waitCursor=True):
            folder = qt.QFileDialog.getExistingDirectory(None, "folder")
            self.ask()
    def ask(self):
        slicer.util.confirmOkCancelDisplay("replace?")
    def fine(self):
        with slicer.util.tryWithErrorDisplay("failed"):
            slicer.util.confirmOkCancelDisplay("ok to ask here")
            with self.busy():
                work()
"""
    assert dialogs_under_wait_cursor(bad) == [
        "onExport -> ask: confirmOkCancelDisplay",
        "onExport: getExistingDirectory",
    ]


def test_widget_uses_the_wait_cursor_for_its_work():
    """The work itself still gets the wait cursor (starting a run, exporting, importing a model)."""
    source = MODULE_FILE.read_text(encoding="utf-8")
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "VNetSegmentationWidget")
    busy_calls = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.With) and any(_is_wait_cursor(item) for item in node.items):
            busy_calls |= {_name(c) for c in ast.walk(node) if isinstance(c, ast.Call)}
    assert {"startSegmentation", "exportForTraining", "importModel", "preRunChecks", "finishSegmentation"} <= busy_calls

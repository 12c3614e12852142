"""The core never imports Slicer, Qt, CTK, VTK or the training code (checked by parsing)."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "VNetSegmentation" / "vnetseg"
FORBIDDEN = {"slicer", "qt", "ctk", "vtk", "vtkmodules", "training", "VNetSegmentationLib", "PythonQt"}
OPTIONAL_ONLY_INSIDE_FUNCTIONS = {"matplotlib"}


def _imports(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node))
    return found


def test_core_imports_no_gui_or_training_module() -> None:
    files = sorted(CORE.glob("*.py"))
    assert len(files) >= 8
    bad = [f"{f.name}:{n.lineno} imports {m}" for f in files for m, n in _imports(ast.parse(f.read_text())) if m in FORBIDDEN]
    assert bad == []


def test_optional_libraries_are_imported_lazily() -> None:
    for f in CORE.glob("*.py"):
        tree = ast.parse(f.read_text())
        top = [m for m, n in _imports(ast.Module(body=tree.body, type_ignores=[])) if n in tree.body]
        assert not OPTIONAL_ONLY_INSIDE_FUNCTIONS & set(top), f"{f.name} imports matplotlib at module level"


def test_the_checker_would_catch_a_violation(tmp_path: Path) -> None:
    tree = ast.parse("import os\nfrom vtk.util import numpy_support\ndef f():\n    import slicer\n")
    assert {m for m, _ in _imports(tree)} & FORBIDDEN == {"vtk", "slicer"}

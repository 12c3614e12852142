"""The extension's build files: every file the module needs is listed in CMake (so a built extension
never misses one), the extension metadata is complete, and its catalog entry and icon are valid."""

from __future__ import annotations

import fnmatch
import json
import re
import struct
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "VNetSegmentation"
RESOURCE_SUFFIXES = (".ui", ".png", ".svg", ".json", ".txt", ".pt", ".qss")
NOT_SHIPPED = ("Testing/", "vnetseg.egg-info/", "__pycache__/")


def cmake_set(name: str, module_name: str) -> list[str]:
    """The values of ``set(name ...)`` with ${MODULE_NAME} expanded."""
    text = re.sub(r"#[^\n]*", "", (MODULE / "CMakeLists.txt").read_text(encoding="utf-8"))
    match = re.search(rf"set\(\s*{name}\s+(.*?)\)", text, re.DOTALL)
    assert match, f"set({name} ...) not found"
    return [w.replace("${MODULE_NAME}", module_name) for w in match.group(1).split()]


def glob_patterns(module_name: str) -> list[str]:
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    patterns = []
    for block in re.findall(r"file\(\s*GLOB\s+\w+\s+RELATIVE\s+\S+\s+(.*?)\)", text, re.DOTALL):
        patterns += [p.replace("${MODULE_NAME}", module_name) for p in block.split()]
    return patterns


def shipped_files() -> set[str]:
    found = set()
    for path in MODULE.rglob("*"):
        rel = path.relative_to(MODULE).as_posix()
        if (
            path.is_file()
            and not rel.startswith(NOT_SHIPPED)
            and "/__pycache__/" not in rel
            and rel != "CMakeLists.txt"
            and (path.suffix == ".py" or path.suffix in RESOURCE_SUFFIXES)
        ):
            found.add(rel)
    return found - {"SLICER_README_SECTION.md"}


def test_every_module_file_is_listed_in_cmake():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    module_name = re.search(r"set\(MODULE_NAME\s+(\w+)\)", text).group(1)
    assert module_name == "VNetSegmentation"
    scripts = cmake_set("MODULE_PYTHON_SCRIPTS", module_name)
    resources = [r for r in cmake_set("MODULE_PYTHON_RESOURCES", module_name) if not r.startswith("${")]
    patterns = glob_patterns(module_name)
    listed = set(scripts) | set(resources)
    for entry in listed:
        assert (MODULE / entry).is_file(), f"CMake lists {entry}, which does not exist"
    files = shipped_files()
    assert {"vnetseg/__init__.py", "VNetSegmentationLib/logic.py", "Resources/UI/VNetSegmentation.ui"} <= files
    missing = sorted(f for f in files if f not in listed and not any(fnmatch.fnmatch(f, p) for p in patterns))
    assert not missing, f"add these to VNetSegmentation/CMakeLists.txt: {missing}"
    assert all(s.endswith(".py") for s in scripts) and not any(r.endswith(".py") for r in resources)


def test_module_build_macro_tests_and_self_test():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"slicerMacroBuildScriptedModule\(.*?WITH_GENERIC_TESTS.*?\)", text, re.DOTALL)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert "add_subdirectory(Testing)" in text
    registered = re.findall(r"SCRIPT\s+(\S+)\)", (MODULE / "Testing" / "Python" / "CMakeLists.txt").read_text())
    assert registered and all((MODULE / "Testing" / "Python" / name).is_file() for name in registered)


def extension_variables() -> dict[str, str]:
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    return {m.group(1): m.group(2) for m in re.finditer(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', text)}


def test_extension_metadata_is_complete():
    variables = extension_variables()
    for key in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        "EXTENSION_DEPENDS",
    ):
        assert variables.get(key), key
    assert variables["EXTENSION_CATEGORY"] == "Segmentation"
    assert variables["EXTENSION_ICONURL"].startswith("https://") and variables["EXTENSION_ICONURL"].endswith(".png")
    for url in (variables["EXTENSION_ICONURL"], variables["EXTENSION_SCREENSHOTURLS"]):
        local = url.split("/main/", 1)[1]
        assert (REPO / local).is_file(), f"{url} points to {local}, which is not in the repository"
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "project(VNetSegmentation)" in text and "add_subdirectory(VNetSegmentation)" in text
    assert "find_package(Slicer REQUIRED)" in text and "${Slicer_EXTENSION_CPACK}" in text


def test_catalog_entry_follows_the_extensions_index_schema():
    entry = json.loads((REPO / "VNetSegmentation.json").read_text(encoding="utf-8"))
    allowed = {
        "$schema",
        "category",
        "scm_url",
        "scm_revision",
        "scm_type",
        "build_dependencies",
        "dicom_support_rule",
        "build_subdirectory",
        "enabled",
        "tier",
    }
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/")
    assert entry["category"] == extension_variables()["EXTENSION_CATEGORY"]
    assert isinstance(entry["build_dependencies"], list) and all(
        isinstance(d, str) for d in entry["build_dependencies"]
    )
    assert entry["build_dependencies"] == extension_variables()["EXTENSION_DEPENDS"].split()
    assert 1 <= entry["tier"] <= 5 and entry["build_subdirectory"] == "."
    assert entry["scm_url"].startswith("https://github.com/")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_icons_are_128_pixel_pngs():
    for path in (
        REPO / "Resources" / "Icons" / "VNetSegmentation.png",
        MODULE / "Resources" / "Icons" / "VNetSegmentation.png",
    ):
        assert png_size(path) == (128, 128)


def test_requirements_file_matches_what_the_panel_installs():
    from VNetSegmentationLib.environment import REQUIRED_PACKAGES

    lines = [ln.strip() for ln in (MODULE / "Resources" / "requirements.txt").read_text().splitlines()]
    assert sorted(ln for ln in lines if ln and not ln.startswith("#")) == sorted(REQUIRED_PACKAGES.values())

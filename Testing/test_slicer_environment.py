"""The panel's environment checks: PyTorch missing or broken, devices without a CUDA context,
free memory on every system, and the self-tests' skip reason.

"Without torch" and "torch that does not load" are real Python processes whose import system
hides torch (as on a fresh Slicer) or fails to load it (as a missing DLL does on Windows).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from VNetSegmentationLib import checks, environment

REPO = Path(__file__).resolve().parents[1]

HIDE_TORCH = '''
import importlib.machinery, sys
class HideTorch:
    """The path finder, blind to torch: find_spec gives None, import raises "No module named 'torch'"."""
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)
    invalidate_caches = staticmethod(importlib.machinery.PathFinder.invalidate_caches)
sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = HideTorch
'''

BREAK_TORCH = """
import importlib.abc, importlib.machinery, importlib.util, sys
class DllError(importlib.abc.Loader):
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        raise OSError('[WinError 126] The specified module could not be found. Error loading '
                      '"C:\\\\Slicer\\\\lib\\\\Python\\\\Lib\\\\site-packages\\\\torch\\\\lib\\\\c10.dll" or one of its dependencies.')
class BrokenTorch:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "torch":
            return importlib.util.spec_from_loader("torch", DllError())
        return None
sys.meta_path.insert(0, BrokenTorch)
"""


def run_python(prelude: str, code: str) -> dict:
    """Run ``code`` after ``prelude`` in a fresh interpreter with the module folder on the path; its last line is JSON."""
    paths = [str(REPO / "VNetSegmentation"), str(REPO / "Testing"), str(REPO)]
    script = prelude + f"\nsys.path[:0] = {paths!r}\n" + code
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


CARD_AND_CHECKS = """
import json
from VNetSegmentationLib import VNetSegmentationLogic
from VNetSegmentationLib.environment import dependencyAdvice, detectDevices, missingPackages, selfTestSkipReason, torchStatus
from VNetSegmentationLib.models import readCardWithoutTorch
logic = VNetSegmentationLogic(scene=object(), modelFolder={folder!r})
status = torchStatus()
out = {{
    "installed": status.installed, "broken": status.broken, "message": status.message,
    "models": [e.name for e in logic.listModels()],
    "card": logic.modelCardText(logic.listModels()[0].name),
    "devices": detectDevices(),
    "advice": dependencyAdvice(status, missingPackages()),
    "skip": selfTestSkipReason(),
}}
try:
    readCardWithoutTorch({bad!r})
except ValueError as exc:
    out["bad"] = str(exc)
out["torch_imported"] = type(sys.modules.get("torch")).__name__ if "torch" in sys.modules else ""
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def shipped_card(tmp_path_factory):
    """The shipped model's card as the panel shows it where PyTorch works."""
    from VNetSegmentationLib import VNetSegmentationLogic

    logic = VNetSegmentationLogic(scene=object(), modelFolder=tmp_path_factory.mktemp("models"))
    entries = logic.listModels()
    if not entries:
        pytest.skip("no shipped model in this checkout")
    return logic.modelCardText(entries[0].name)


def test_model_card_on_a_fresh_slicer_without_torch(tmp_path, shipped_card):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a model")
    out = run_python(HIDE_TORCH, CARD_AND_CHECKS.format(folder=str(tmp_path / "m"), bad=str(bad)))
    assert out["installed"] is False and out["broken"] is False and out["models"]
    assert "cannot be used" not in out["card"] and "No module named" not in out["card"]
    # the same card as with torch (name, training data, Dice, network, labels, checksum), plus what to do
    assert out["card"].startswith(shipped_card + "\n")
    assert out["card"].splitlines()[-1] == "To use this model: " + environment.TORCH_MISSING
    assert out["devices"] == {} and out["advice"][1] == "Install PyTorch"
    assert out["skip"].startswith("VNetSegmentation self-test skipped: PyTorch is not installed")
    assert "not a readable vnetseg model file" in out["bad"]
    assert out["torch_imported"] == "", "reading the card must not import torch"


def test_torch_that_does_not_load_is_reported_not_raised(tmp_path, shipped_card):
    bad = tmp_path / "notes.pt"
    bad.write_bytes(b"PK\x03\x04 damaged")
    out = run_python(BREAK_TORCH, CARD_AND_CHECKS.format(folder=str(tmp_path / "m"), bad=str(bad)))
    assert out["installed"] is False and out["broken"] is True
    assert "cannot be loaded (OSError: [WinError 126]" in out["message"] and "Reinstall PyTorch" in out["message"]
    assert out["devices"] == {}, "device detection must not raise either (setup() calls it)"
    assert out["advice"] == [out["message"], "Reinstall PyTorch"]
    assert out["card"].startswith(shipped_card + "\n") and "Reinstall PyTorch" in out["card"].splitlines()[-1]
    assert "Reinstall PyTorch" in out["skip"]


def test_pre_run_checks_with_a_torch_that_does_not_load(ct_dir, tiny_model_file, tmp_path):
    code = f"""
import json
from VNetSegmentationLib import PreRunCheckError, VNetSegmentationLogic
from slicer_helpers import make_scene
env = make_scene()
ct = env.load_volume({str(ct_dir / "example_ct_sm.nii.gz")!r})
logic = VNetSegmentationLogic(env.scene, {str(tmp_path / "models")!r}, includeShippedModels=False)
messages = logic.preRunChecks(ct, {str(tiny_model_file)!r})
out = {{"codes": [m.code for m in messages], "text": messages[0].message}}
try:
    logic.segment(ct, {str(tiny_model_file)!r})
except PreRunCheckError as exc:
    out["error"] = str(exc)
print(json.dumps(out))
"""
    out = run_python(BREAK_TORCH, code)
    assert out["codes"] == ["torchMissing"] and "cannot be loaded" in out["text"]
    assert "Reinstall PyTorch" in out["error"]


def test_dependency_advice_names_what_is_missing():
    ok = environment.TorchStatus(True, "2.13.0", "PyTorch 2.13.0 is installed.")
    assert environment.dependencyAdvice(ok, []) == ("", "")
    text, button = environment.dependencyAdvice(ok, ["nibabel>=5.0"])
    assert button == "Install missing packages" and "PyTorch" not in text and "nibabel>=5.0" in text
    missing = environment.TorchStatus(False, "", environment.TORCH_MISSING)
    assert environment.dependencyAdvice(missing, ["scipy>=1.10"])[1] == "Install PyTorch and packages"
    assert environment.selfTestSkipReason() == "", "this environment has everything the self-tests need"


def test_device_detection_creates_no_cuda_context(monkeypatch):
    """With a (simulated) GPU, detection reads names and total memory only; mem_get_info would create a context."""
    import torch

    class Properties:
        total_memory = 80 << 30

    def context(*args, **kwargs):
        raise AssertionError("torch.cuda.mem_get_info creates a CUDA context in Slicer's process")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"NVIDIA H100 #{i}")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Properties())
    monkeypatch.setattr(torch.cuda, "mem_get_info", context)
    found = environment.detectDevices()
    assert found["cuda"] == ["NVIDIA H100 #0", "NVIDIA H100 #1"] and found["cudaTotalBytes"] == 80 << 30

    def driver_error(i):
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")

    monkeypatch.setattr(torch.cuda, "get_device_name", driver_error)
    assert environment.detectDevices()["cuda"] == [], "a driver problem means no GPU, not an exception"


def test_gpu_memory_check_uses_the_total_and_says_so():
    message = checks.checkMemory(100 << 30, 80 << 30, "cuda", total=True)
    assert "80.0 GB of memory in all" in message.message and "choose CPU" in message.message
    assert checks.checkMemory(10 << 30, 80 << 30, "cuda", total=True) is None


def test_free_memory_without_proc_meminfo(monkeypatch):
    """macOS has no /proc/meminfo: os.sysconf answers; Windows has no os.sysconf: GlobalMemoryStatusEx does."""
    import builtins

    linux = checks.hostAvailableBytes()
    real_open = builtins.open

    def no_meminfo(path, *args, **kwargs):
        if str(path) == "/proc/meminfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_meminfo)
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        assert checks.hostAvailableBytes() == pytest.approx(free, rel=0.2)
        assert 0 < checks.hostAvailableBytes() <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert linux > 0


def test_windows_memory_structure_matches_the_api():
    if os.name == "nt":
        free = checks._windowsAvailableBytes()
        assert free and checks.hostAvailableBytes() == pytest.approx(free, rel=0.2)
    else:
        assert checks._windowsAvailableBytes() is None  # no kernel32 here
    # the layout GlobalMemoryStatusEx fills (sysinfoapi.h); a wrong one would read another field
    assert checks.ctypes.sizeof(checks.MemoryStatusEx) == 64
    assert checks.MemoryStatusEx.ullAvailPhys.offset == 16 and checks.MemoryStatusEx.ullTotalPhys.offset == 8

"""PyTorch presence, installation and devices (Qt-free; torch is never imported at module import).

Inside Slicer, PyTorch is installed through the PyTorch extension's ``PyTorchUtils`` when it is
installed (it picks the CUDA build that matches the GPU driver), otherwise with
``slicer.util.pip_install``. Nothing is installed unless the user asks (the panel's button).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Any

TORCH_MISSING = (
    "PyTorch is not installed in Slicer's Python, so the model cannot run. Click 'Install PyTorch' "
    "(it uses the PyTorch extension when that is installed, so the CUDA build matches your GPU driver), "
    "then restart the segmentation."
)


# import name -> pip requirement of what the core needs besides torch (= Resources/requirements.txt)
REQUIRED_PACKAGES = {"nibabel": "nibabel>=5.0", "scipy": "scipy>=1.10", "SimpleITK": "SimpleITK>=2.2"}


def missingPackages() -> list[str]:
    """pip requirements of the core's dependencies (besides torch) that cannot be imported here."""
    return [spec for module, spec in REQUIRED_PACKAGES.items() if importlib.util.find_spec(module) is None]


def installPackages(requirements: list[str]) -> None:
    """``slicer.util.pip_install`` the given requirements (inside the Slicer application only)."""
    import slicer

    if not hasattr(slicer, "app"):
        raise RuntimeError("installPackages needs the 3D Slicer application; elsewhere use pip")
    if requirements:
        slicer.util.pip_install(requirements)


@dataclass(frozen=True)
class TorchStatus:
    """Whether torch can be imported, its version, and what to tell the user."""

    installed: bool
    version: str
    message: str


def torchStatus() -> TorchStatus:
    """Find torch without importing it."""
    if importlib.util.find_spec("torch") is None:
        return TorchStatus(False, "", TORCH_MISSING)
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return TorchStatus(True, version, f"PyTorch {version} is installed.")


def pyTorchUtilsLogic() -> Any | None:
    """``PyTorchUtils.PyTorchUtilsLogic()`` of the PyTorch extension, or None when it is not installed."""
    try:
        import PyTorchUtils  # the Slicer PyTorch extension's module
    except ImportError:
        return None
    return PyTorchUtils.PyTorchUtilsLogic()


def installTorch(askConfirmation: bool = True) -> str:
    """Install PyTorch into Slicer's Python; return how it was installed.

    Uses the PyTorch extension when present (it may ask the user itself when
    ``askConfirmation``), else ``slicer.util.pip_install("torch")``; the panel asks before calling.

    Raises:
        RuntimeError: outside the Slicer application, or when the installation did not happen.
    """
    utils = pyTorchUtilsLogic()
    if utils is not None:
        if utils.installTorch(askConfirmation=askConfirmation) is None:
            raise RuntimeError("PyTorch was not installed (cancelled or failed); see the PyTorch module for details")
        return "PyTorch extension"
    import slicer

    if not hasattr(slicer, "app"):
        raise RuntimeError("installTorch needs the 3D Slicer application; elsewhere install torch with pip")
    slicer.util.pip_install("torch")
    if importlib.util.find_spec("torch") is None:
        raise RuntimeError("pip did not install PyTorch; see the Python console for its output")
    return "pip"


def detectDevices() -> dict[str, Any]:
    """What torch can use here: {"cuda": [GPU names], "cudaFreeBytes": int, "mps": bool}; {} without torch."""
    if importlib.util.find_spec("torch") is None:
        return {}
    import torch

    found: dict[str, Any] = {"cuda": [], "cudaFreeBytes": 0, "mps": False}
    if torch.cuda.is_available():
        found["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            found["cudaFreeBytes"] = int(torch.cuda.mem_get_info(0)[0])
        except RuntimeError:
            found["cudaFreeBytes"] = 0
    mps = getattr(torch.backends, "mps", None)
    found["mps"] = bool(mps is not None and mps.is_available())
    return found


def deviceLabels(found: dict[str, Any]) -> dict[str, str]:
    """Texts for the device chooser, saying what was detected."""
    gpus = found.get("cuda") or []
    gpu = f"GPU ({gpus[0]})" if gpus else ("GPU (Apple MPS)" if found.get("mps") else "GPU (none detected)")
    auto = f"Auto: {gpu}" if gpus or found.get("mps") else "Auto: CPU (no GPU detected)"
    if not found:
        auto = "Auto (PyTorch not installed)"
    return {"auto": auto, "gpu": gpu, "cpu": "CPU"}

"""PyTorch presence, installation and devices (Qt-free; torch is never imported at module import).

Inside Slicer, PyTorch is installed through the PyTorch extension's ``PyTorchUtils`` when it is
installed (it picks the CUDA build that matches the GPU driver), otherwise with
``slicer.util.pip_install``. Nothing is installed unless the user asks (the panel's button).

Whether torch is usable is decided by importing it (as ``PyTorchUtils`` does): a torch that is
installed but does not load (a missing DLL, a half-finished install) is reported as broken, with
the advice to reinstall, instead of raising out of the panel. Device detection never creates a
CUDA context in Slicer's process (no ``mem_get_info``, no allocation): the inference runs in a
separate process, and a context would hold hundreds of MB of GPU memory in Slicer for nothing.
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
TORCH_BROKEN = (
    "PyTorch {version} is installed in Slicer's Python but cannot be loaded ({error}), so the model cannot run. "
    "Click 'Reinstall PyTorch', then restart Slicer."
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
        importlib.invalidate_caches()  # else find_spec may not see what pip just added
        still = [spec for spec in requirements if spec in missingPackages()]
        if still:
            raise RuntimeError(f"pip did not install {', '.join(still)}; see the Python console for its output")


@dataclass(frozen=True)
class TorchStatus:
    """Whether torch can be imported, its version, and what to tell the user.

    Attributes:
        installed: torch imports (it can be used).
        version: its version ("" when not installed).
        message: the sentence for the panel.
        broken: torch is installed but importing it failed (reinstall it).
    """

    installed: bool
    version: str
    message: str
    broken: bool = False


def torchStatus() -> TorchStatus:
    """Find torch and import it (once; later calls find it in ``sys.modules``); never raises."""
    if importlib.util.find_spec("torch") is None:
        return TorchStatus(False, "", TORCH_MISSING)
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    try:
        import torch
    except Exception as exc:  # OSError for a DLL that does not load, ImportError inside torch, ...
        error = f"{type(exc).__name__}: {exc}"
        return TorchStatus(False, version, TORCH_BROKEN.format(version=version, error=error[:300]), broken=True)
    version = str(getattr(torch, "__version__", version))
    return TorchStatus(True, version, f"PyTorch {version} is installed.")


def dependencyAdvice(status: TorchStatus, missing: list[str]) -> tuple[str, str]:
    """What the panel says about missing dependencies, and its install button's text ("" when nothing is missing)."""
    texts = [] if status.installed else [status.message]
    if missing:
        texts.append(f"Missing Python packages: {', '.join(missing)}.")
    if not texts:
        return "", ""
    if status.broken:
        button = "Reinstall PyTorch" + (" and install packages" if missing else "")
    elif not status.installed:
        button = "Install PyTorch" + (" and packages" if missing else "")
    else:
        button = "Install missing packages"
    return " ".join(texts), button


def selfTestSkipReason() -> str:
    """Why the in-Slicer self-tests cannot run here ("" when they can): they need PyTorch and the core's packages.

    A fresh Slicer or a ctest machine has neither; the tests then skip with this sentence rather
    than fail with ModuleNotFoundError.
    """
    message, button = dependencyAdvice(torchStatus(), missingPackages())
    if not message:
        return ""
    return (
        f"VNetSegmentation self-test skipped: {message} Open the VNet Segmentation module, click "
        f"'{button}', restart Slicer, and run the test again."
    )


def pyTorchUtilsLogic() -> Any | None:
    """``PyTorchUtils.PyTorchUtilsLogic()`` of the PyTorch extension, or None when it is not installed."""
    try:
        import PyTorchUtils  # the Slicer PyTorch extension's module
    except ImportError:
        return None
    return PyTorchUtils.PyTorchUtilsLogic()


def installTorch(askConfirmation: bool = True, reinstall: bool = False) -> str:
    """Install PyTorch into Slicer's Python; return how it was installed.

    Uses the PyTorch extension when present (it may ask the user itself when
    ``askConfirmation``), else ``slicer.util.pip_install("torch")``; the panel asks before calling.
    ``reinstall`` first uninstalls a torch that is installed but does not load (installing over
    it would find it "already satisfied" and change nothing).

    Raises:
        RuntimeError: outside the Slicer application, or when the installation did not happen.
    """
    import slicer

    utils = pyTorchUtilsLogic()
    if utils is None and not hasattr(slicer, "app"):
        raise RuntimeError("installTorch needs the 3D Slicer application; elsewhere install torch with pip")
    if reinstall:
        if utils is not None:
            utils.uninstallTorch()
        else:
            slicer.util.pip_uninstall("torch")
        importlib.invalidate_caches()
    if utils is not None:
        if utils.installTorch(askConfirmation=askConfirmation) is None:
            raise RuntimeError("PyTorch was not installed (cancelled or failed); see the PyTorch module for details")
        importlib.invalidate_caches()
        return "PyTorch extension"
    slicer.util.pip_install("torch")
    importlib.invalidate_caches()
    if importlib.util.find_spec("torch") is None:
        raise RuntimeError("pip did not install PyTorch; see the Python console for its output")
    return "pip"


def detectDevices() -> dict[str, Any]:
    """What torch can use here: {"cuda": [GPU names], "cudaTotalBytes": int, "mps": bool}; {} without torch.

    ``cudaTotalBytes`` is the first GPU's total memory, read from its properties: unlike
    ``torch.cuda.mem_get_info`` (free memory) this creates no CUDA context in this process.
    Never raises: a driver problem gives no GPU.
    """
    if not torchStatus().installed:
        return {}
    import torch

    found: dict[str, Any] = {"cuda": [], "cudaTotalBytes": 0, "mps": False}
    try:
        if torch.cuda.is_available():
            found["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            found["cudaTotalBytes"] = int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # a driver that is too old, a GPU in a bad state: offer the CPU only
        found["cuda"], found["cudaTotalBytes"] = [], 0
    try:
        mps = getattr(torch.backends, "mps", None)
        found["mps"] = bool(mps is not None and mps.is_available())
    except Exception:
        found["mps"] = False
    return found


def deviceLabels(found: dict[str, Any]) -> dict[str, str]:
    """Texts for the device chooser, saying what was detected."""
    gpus = found.get("cuda") or []
    gpu = f"GPU ({gpus[0]})" if gpus else ("GPU (Apple MPS)" if found.get("mps") else "GPU (none detected)")
    auto = f"Auto: {gpu}" if gpus or found.get("mps") else "Auto: CPU (no GPU detected)"
    if not found:
        auto = "Auto (PyTorch not installed)"
    return {"auto": auto, "gpu": gpu, "cpu": "CPU"}

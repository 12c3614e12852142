"""The models the panel offers: those shipped with the core plus the user's model folder.

"Import model file" copies a model made by ``training/`` into the user's folder, after checking
that it loads (architecture rebuilt, weights digest verified) and, when one is given, that its
SHA-256 matches; a ``<file>.sha256`` note next to the copy lets every later run verify it again.
Qt-free; torch is imported only when a model is loaded or verified. The model card is metadata,
so :func:`readCardWithoutTorch` reads it from the file without torch (for a fresh Slicer where
PyTorch is not installed yet).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
import tempfile
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

MODEL_SUFFIX = ".pt"
MODEL_FOLDER_ENV = "VNETSEG_MODEL_DIR"

NO_MODEL_MESSAGE = (
    "No segmentation model is installed. Train one with the training/ folder of this extension "
    "(see its README), or get a model file (.pt) from a colleague, then click 'Import model file...'."
)


def defaultModelFolder() -> Path:
    """``$VNETSEG_MODEL_DIR``; in Slicer ``<settings folder>/VNetSegmentation/models``; else ``~/.vnetseg/models``."""
    env = os.environ.get(MODEL_FOLDER_ENV)
    if env:
        return Path(env)
    try:
        import slicer

        settingsFile = slicer.app.slicerUserSettingsFilePath  # type: ignore[attr-defined]
        return Path(settingsFile).parent / "VNetSegmentation" / "models"
    except (ImportError, AttributeError):
        return Path.home() / ".vnetseg" / "models"


@dataclass(frozen=True)
class ModelEntry:
    """One model the user can pick.

    Attributes:
        name: what the panel shows (the file name without ``.pt``; shipped models: their registry name).
        path: the model file.
        sha256: its recorded SHA-256 (verified on every load), or "" when none was recorded.
        source: "shipped" (comes with the extension) or "user" (imported into the model folder).
    """

    name: str
    path: Path
    sha256: str = ""
    source: str = "user"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _readSidecar(path: Path) -> str:
    note = _sidecar(path)
    if not note.is_file():
        return ""
    text = note.read_text(encoding="utf-8").split()
    return text[0].lower() if text else ""


class ModelStore:
    """The shipped models and a model folder.

    Args:
        folder: the user's model folder (created when the first model is imported);
            default :func:`defaultModelFolder`.
        includeShipped: also list the models shipped with the core (``vnetseg.registry``).
        registryFile: the shipped models' ``registry.json``; default the core's own.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str] | None = None,
        includeShipped: bool = True,
        registryFile: str | os.PathLike[str] | None = None,
    ) -> None:
        self.folder = Path(folder) if folder is not None else defaultModelFolder()
        self.includeShipped = includeShipped
        self.registryFile = Path(registryFile) if registryFile is not None else None
        self._infoCache: dict[tuple[str, float, int], Any] = {}

    def listModels(self) -> list[ModelEntry]:
        """Shipped models first (default first), then the user's models by name."""
        entries: list[ModelEntry] = []
        if self.includeShipped:
            from vnetseg.registry import REGISTRY_FILE, shipped_models

            shipped = shipped_models(self.registryFile or REGISTRY_FILE)
            entries += [ModelEntry(m.name, m.path, m.sha256, "shipped") for m in shipped]
        if self.folder.is_dir():
            for path in sorted(self.folder.glob("*" + MODEL_SUFFIX)):
                if path.is_file() and not path.name.startswith("."):
                    entries.append(ModelEntry(path.stem, path, _readSidecar(path), "user"))
        return entries

    def findModel(self, name: str) -> ModelEntry | None:
        """The entry called ``name`` (as shown in the panel), or None."""
        return next((entry for entry in self.listModels() if entry.name == name), None)

    def noModelMessage(self) -> str:
        return NO_MODEL_MESSAGE + f" Imported models are kept in {self.folder}."

    def importModel(
        self, source: str | os.PathLike[str], sha256: str | None = None, overwrite: bool = False
    ) -> ModelEntry:
        """Check a model file and copy it into the model folder.

        Args:
            source: a model file written by ``training/`` (``vnetseg.checkpoint.save_model``).
            sha256: the SHA-256 published with the file, if known; the import is refused if it differs.
            overwrite: replace a different model file of the same name already in the folder.

        Returns:
            The entry of the copy.

        Raises:
            vnetseg.checkpoint.ModelFileError: not a usable model file, or wrong checksum.
            FileExistsError: a different model of the same name is installed and not ``overwrite``.
        """
        from vnetseg.checkpoint import file_sha256, load_model

        src = Path(source)
        if src.suffix.lower() != MODEL_SUFFIX:
            raise ValueError(f"model file must end in {MODEL_SUFFIX}, got {src.name!r}")
        _, info = load_model(src, sha256=sha256)  # rebuilds the network: proves the file is usable
        dest = self.folder / src.name
        if dest.exists():
            if file_sha256(dest) == info.sha256:
                self._writeSidecar(dest, info.sha256)
                return ModelEntry(dest.stem, dest, info.sha256, "user")
            if not overwrite:
                raise FileExistsError(
                    f"a different model named {dest.name} is already installed in {self.folder}; "
                    "rename the file or confirm replacing it"
                )
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmpName = tempfile.mkstemp(prefix=f".{src.name}.", suffix=".part", dir=self.folder)
        os.close(fd)
        tmp = Path(tmpName)
        try:
            shutil.copyfile(src, tmp)
            copied = file_sha256(tmp)
            if copied != info.sha256:
                raise OSError(f"copying {src} to {self.folder} produced a different file (SHA-256 {copied}); try again")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        self._writeSidecar(dest, info.sha256)
        return ModelEntry(dest.stem, dest, info.sha256, "user")

    @staticmethod
    def _writeSidecar(path: Path, sha256: str) -> None:
        _sidecar(path).write_text(f"{sha256}  {path.name}\n", encoding="utf-8")

    def readInfo(self, entry: ModelEntry | str | os.PathLike[str]):
        """The model's ``ModelInfo`` (config, preprocessing, labels, card), verified; cached per file version."""
        from vnetseg.checkpoint import read_model_info

        path = Path(entry.path if isinstance(entry, ModelEntry) else entry)
        sha = entry.sha256 if isinstance(entry, ModelEntry) else ""
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime, stat.st_size)
        if key not in self._infoCache:
            self._infoCache[key] = read_model_info(path, sha or None)[0]
        return self._infoCache[key]


class _Opaque:
    """Stands for every torch object (tensors, storages) while a model file's pickle is read without torch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _MetadataUnpickler(pickle.Unpickler):
    """Reads the plain data of a ``torch.save`` archive without torch and without running its code.

    Only ``collections.OrderedDict`` and torch's own rebuild functions and storage types may be
    named (each replaced by :class:`_Opaque`); tensor bytes are never read.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" or module.startswith("torch."):
            return _Opaque
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a model file")

    def persistent_load(self, pid: Any) -> Any:
        return None  # a tensor's storage: not needed for the card


def _fileSha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def readCardWithoutTorch(path: str | os.PathLike[str], sha256: str | None = None) -> SimpleNamespace:
    """A model file's card and settings, read without importing torch.

    The file's SHA-256 is checked against ``sha256`` when given; the weights are not checked (that
    needs torch, and happens when the model is loaded for a run).

    Returns:
        An object with the attributes :func:`modelCardText` reads: ``card``, ``config``
        (``widths``, ``kernel_size``), ``preprocessing`` (``target_spacing``, ``hu_window``),
        ``labels`` (each with ``name``) and ``sha256``.

    Raises:
        ValueError: not a vnetseg model file, or a different SHA-256.
    """
    p = Path(path)
    actual = _fileSha256(p)
    if sha256 and actual.lower() != sha256.strip().lower():
        raise ValueError(f"{p} has SHA-256 {actual}, expected {sha256.strip()}: the file is damaged; copy it again")
    try:
        with zipfile.ZipFile(p) as archive:
            member = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            with archive.open(member) as f:
                payload = _MetadataUnpickler(f).load()
        meta = json.loads(payload["metadata"])
    except (
        zipfile.BadZipFile,
        StopIteration,
        pickle.UnpicklingError,
        KeyError,
        TypeError,
        ValueError,
        EOFError,
    ) as exc:
        raise ValueError(f"{p.name} is not a readable vnetseg model file ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != "vnetseg-model":
        raise ValueError(f"{p.name} is not a vnetseg model file (no 'vnetseg-model' format marker)")
    config, pre = meta.get("config", {}), meta.get("preprocessing", {})
    return SimpleNamespace(
        card=dict(meta.get("card", {})),
        config=SimpleNamespace(widths=tuple(config.get("widths", ())), kernel_size=config.get("kernel_size", "?")),
        preprocessing=SimpleNamespace(
            target_spacing=tuple(float(x) for x in pre.get("target_spacing", ())),
            hu_window=tuple(float(x) for x in pre.get("hu_window", (float("nan"), float("nan")))),
        ),
        labels=tuple(SimpleNamespace(name=str(lab.get("name", "?"))) for lab in meta.get("labels", [])),
        sha256=actual,
    )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _trainedOn(card: dict[str, Any]) -> str:
    """What the model was trained on, from the cards ``training/`` writes.

    ``training.engine`` writes ``data`` = {task, num_cases, train_cases, val_cases, ...}; the
    shipped model's card has ``training_data`` = {source, labels, ...}.
    """
    data = card.get("data") or card.get("training_data") or card.get("dataset") or card.get("trained_on")
    if not data:
        return "not recorded"
    if not isinstance(data, dict):
        return str(data)
    if data.get("source"):
        labels = data.get("labels")
        return str(data["source"]) + (f"; labels: {labels}" if isinstance(labels, str) else "")
    task = data.get("task") or "an MSD task folder"
    train, val = data.get("train_cases"), data.get("val_cases")
    if isinstance(train, list) and isinstance(val, list):
        return f"{task}: {len(train)} training and {len(val)} validation cases"
    return f"{task}: {data['num_cases']} cases" if _number(data.get("num_cases")) else str(task)


def _dice(card: dict[str, Any]) -> str:
    """The validation Dice recorded in a model card, as text ("not recorded" when absent)."""
    validation = card.get("validation")
    if isinstance(validation, dict) and _number(validation.get("dice_mean")):
        cases = validation.get("dice_per_case")
        count = f" of {len(cases)} validation cases" if isinstance(cases, dict) and cases else ""
        if validation.get("on_training_cases") is True:
            count = f" of {len(cases)} training cases: not an independent test" if isinstance(cases, dict) and cases \
                else " on the training cases: not an independent test"
        return f"{validation['dice_mean']:.3f} (mean{count})"
    lopo = card.get("leave_one_patient_out")
    if isinstance(lopo, dict):
        scores = [
            f"{c.get('scan', '?')} {c['dice']:.3f}"
            for fold in lopo.values()
            if isinstance(fold, dict)
            for c in fold.get("cases", [])
            if isinstance(c, dict) and _number(c.get("dice"))
        ]
        if scores:
            return "leave-one-patient-out " + ", ".join(scores)
    metrics = card.get("metrics") if isinstance(card.get("metrics"), dict) else {}
    for source in (metrics, card):
        for key, value in source.items():
            if "dice" in str(key).lower() and _number(value):
                return f"{value:.3f} ({key})"
    return "not recorded"


def modelCardText(info) -> str:
    """A short human-readable card: what the model was trained on and how well it validated."""
    card = dict(info.card)
    version = f" v{card['version']}" if card.get("version") else ""
    lines = [f"Model: {card.get('name', 'unnamed model')}{version}"]
    if card.get("trained") is False:
        lines.append("WARNING: this model has random weights (it was never trained); its masks are meaningless.")
    lines.append(f"Trained on: {_trainedOn(card)}")
    base = card.get("base_model")
    if isinstance(base, dict) and base.get("sha256"):
        version = f" v{base['version']}" if base.get("version") else ""
        lines.append(f"Fine-tuned from: {base.get('name') or 'a model'}{version} (SHA-256 {str(base['sha256'])[:16]}...)")
    lines.append(f"Validation Dice: {_dice(card)}")
    for key, label in (("fold", "Fold"), ("epochs", "Epochs"), ("date", "Date")):
        if key in card:
            lines.append(f"{label}: {card[key]}")
    if isinstance(card.get("limits"), list) and card["limits"]:
        lines.append("Limits: " + "; ".join(str(x) for x in card["limits"]))
    cfg, pre = info.config, info.preprocessing
    lines.append(
        f"Network: V-Net widths {list(cfg.widths)}, kernel {cfg.kernel_size}, "
        f"spacing {' x '.join(f'{s:g}' for s in pre.target_spacing)} mm, "
        f"HU window {pre.hu_window[0]:g}..{pre.hu_window[1]:g}"
    )
    lines.append("Labels: " + ", ".join(label.name for label in info.labels))
    if info.sha256:
        lines.append(f"SHA-256: {info.sha256[:16]}...")
    return "\n".join(lines)


def writeRandomModel(path: str | os.PathLike[str], name: str) -> Path:
    """Save a small random-weight V-Net (4 mm, 32^3 windows) as a model file, for self-tests.

    Its card says ``trained: False``, so the panel flags it as random weights.
    """
    import torch

    from vnetseg.checkpoint import ModelInfo, Preprocessing, save_model
    from vnetseg.model import VNetConfig, build_model

    torch.manual_seed(0)
    config = VNetConfig(widths=(4, 8, 16, 32, 64), kernel_size=3, norm="instance")
    preprocessing = Preprocessing(target_spacing=(4.0, 4.0, 4.0), patch_size=(32, 32, 32))
    save_model(path, build_model(config), ModelInfo(config, preprocessing, card={"name": name, "trained": False}))
    return Path(path)

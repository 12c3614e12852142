"""The models shipped with vnetseg (``weights/registry.json``), each with its recorded SHA-256."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
REGISTRY_FILE = WEIGHTS_DIR / "registry.json"


@dataclass(frozen=True)
class ShippedModel:
    """A model file that ships with the package."""

    name: str
    path: Path
    sha256: str
    description: str = ""


def shipped_models(registry: Path = REGISTRY_FILE) -> list[ShippedModel]:
    """All shipped models whose file is present, default first."""
    if not registry.is_file():
        return []
    data = json.loads(registry.read_text())
    models = []
    for name, entry in data.get("models", {}).items():
        path = registry.parent / entry["file"]
        if path.is_file():
            models.append(ShippedModel(name, path, entry["sha256"], entry.get("description", "")))
    default = data.get("default")
    return sorted(models, key=lambda m: m.name != default)


def default_model(registry: Path = REGISTRY_FILE) -> ShippedModel | None:
    """The default shipped model, or None when no model is installed."""
    models = shipped_models(registry)
    return models[0] if models else None

"""Training checkpoints (exact resume) and exported model files (what the core loads).

A training checkpoint holds plain data only (tensors, numbers, strings, lists, dicts), so it is
read with ``torch.load(weights_only=True)``: model, optimiser, scheduler and GradScaler states,
the epoch, the best score, and the Python, NumPy and torch random states.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vnetseg.checkpoint import save_atomically

STATE_FORMAT = "vnetseg-train-state"
STATE_VERSION = 1


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": _listify(random.getstate()),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _listify(value: Any) -> Any:
    return [_listify(v) for v in value] if isinstance(value, tuple) else value


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write a training checkpoint atomically."""
    save_atomically({"format": STATE_FORMAT, "version": STATE_VERSION, **state, "rng": rng_state()}, path)


def load_state(path: Path) -> dict[str, Any]:
    """Read a training checkpoint written by :func:`save_state` (no pickled code is run)."""
    if not path.is_file():
        raise FileNotFoundError(f"training checkpoint {path} does not exist; nothing to resume")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc)[:200]}"
        raise ValueError(f"{path} is not a readable training checkpoint ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a training checkpoint of training.train")
    if int(payload.get("version", 0)) > STATE_VERSION:
        raise ValueError(f"{path} was written by a newer training code (version {payload['version']})")
    return payload

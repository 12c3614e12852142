"""Observability: a progress line with loss and throughput, a CSV log, PNG curves."""

from __future__ import annotations

import csv
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

LOG_FIELDS = ("epoch", "train_loss", "lr", "patches_per_s", "seconds", "val_dice_mean", "best_dice", "train_consistency")


class Progress:
    """A one-line progress bar on stderr: in place on a terminal, one line per epoch otherwise."""

    def __init__(self, epoch: int, epochs: int, total: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.epoch, self.epochs, self.total = epoch, epochs, total
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.patches = 0

    def line(self, step: int, loss: float) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        width = 20
        filled = int(width * step / max(self.total, 1))
        return (f"epoch {self.epoch}/{self.epochs} [{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} "
                f"loss {loss:.4f} {self.patches / elapsed:.1f} patches/s")

    def update(self, step: int, loss: float, patches: int) -> None:
        self.patches += patches
        if self.tty:
            self.stream.write("\r" + self.line(step, loss))
            self.stream.flush()

    def close(self, step: int, loss: float, extra: str = "") -> None:
        if self.enabled:
            self.stream.write(("\r" if self.tty else "") + self.line(step, loss) + extra + "\n")
            self.stream.flush()

    @property
    def rate(self) -> float:
        return self.patches / max(time.perf_counter() - self.start, 1e-9)


def append_log(path: Path, row: dict[str, Any]) -> None:
    """Append one row to the CSV log (header written when the file is new; an older log keeps its columns)."""
    new = not path.is_file()
    fields = LOG_FIELDS
    if not new:
        with open(path, newline="") as f:
            fields = tuple(next(csv.reader(f), LOG_FIELDS))
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: _fmt(row.get(k)) for k in fields})


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def read_log(path: Path) -> list[dict[str, float | None]]:
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_curves(log_path: Path, png_path: Path) -> Path:
    """Two panels: training loss per epoch, and mean validation Dice where it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([r["epoch"] for r in rows], [r["train_loss"] for r in rows], "-", color="tab:blue")
    ax1.set(xlabel="epoch", ylabel="training loss", title="Loss")
    val = [(r["epoch"], r["val_dice_mean"]) for r in rows if r["val_dice_mean"] is not None]
    if val:
        ax2.plot(*zip(*val), "o-", color="tab:green")
    ax2.set(xlabel="epoch", ylabel="mean Dice", title="Validation Dice", ylim=(0, 1))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    return png_path

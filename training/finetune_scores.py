"""Scores of a base model and its fine-tuned successor on the same cases, side by side.

Both models segment each case with the core's own ``predict_volume`` (as deployed: the model's
preprocessing, sliding window, largest component and hole filling), and
:func:`training.metrics.case_metrics` scores the masks against the reference in physical units:
Dice, HD95 (mm) and volume error (%). :func:`compare` decides whether the new model is worse.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from vnetseg.checkpoint import ModelInfo
from vnetseg.inference import InferenceOptions, predict_volume
from vnetseg.model import VNet

from .data import MSDDataset, load_case
from .metrics import CaseMetrics, case_metrics

ProgressFn = Callable[[str], None]


def score_model(
    net: VNet, info: ModelInfo, dataset: MSDDataset, names: list[str], options: InferenceOptions,
    log: ProgressFn | None = None,
) -> list[CaseMetrics]:
    """Segment each case of ``names`` with ``net`` and score it against its label (first foreground label)."""
    value = info.labels[0].value
    rows = []
    for name in names:
        image, label = load_case(dataset.case(name), dataset.labels)
        pred = predict_volume(image, net, info, options).labelmap
        rows.append(case_metrics(name, pred == value, label == value, tuple(float(s) for s in image.spacing)))
        if log is not None:
            log(f"scored {name}: Dice {rows[-1].dice:.4f}")
    return rows


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.inf


def summary(rows: list[CaseMetrics]) -> dict[str, float]:
    """Mean Dice, mean HD95 (finite values; inf when there are none) and mean absolute volume error (%)."""
    return {
        "dice": float(np.mean([r.dice for r in rows])) if rows else math.nan,
        "hd95_mm": _finite_mean([r.hd95_mm for r in rows]),
        "abs_volume_error_pct": _finite_mean([abs(r.volume_error_pct) for r in rows]),
    }


@dataclass
class Comparison:
    """Base and new model on the same cases.

    Attributes:
        base / new: per-case metrics, in the same case order.
        on_training_cases: the cases were also used for training (not an independent test).
        mode: inference mode the cases were segmented in ("fast", "full" or "auto").
        tolerance: how much lower the new mean Dice may be before the new model counts as worse.
    """

    base: list[CaseMetrics]
    new: list[CaseMetrics]
    on_training_cases: bool
    mode: str
    tolerance: float = 0.0

    @property
    def worse(self) -> bool:
        """The new model's mean Dice is below the base's by more than ``tolerance``, or, at exactly the
        same mean Dice (e.g. both 0), its mean HD95 is larger."""
        new, base = summary(self.new), summary(self.base)
        if new["dice"] == base["dice"]:
            return new["hd95_mm"] > base["hd95_mm"]
        return new["dice"] < base["dice"] - self.tolerance

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (infinite distances as the string "inf")."""

        def mean(items: list[CaseMetrics]) -> dict[str, Any]:
            return {k: (v if math.isfinite(v) else str(v)) for k, v in summary(items).items()}

        return {"cases": [r.case for r in self.base], "on_training_cases": self.on_training_cases,
                "mode": self.mode, "tolerance": self.tolerance, "worse": self.worse,
                "base": metrics_to_dicts(self.base), "new": metrics_to_dicts(self.new),
                "base_mean": mean(self.base), "new_mean": mean(self.new)}

    def table(self) -> str:
        """A plain-text table: one row per case and the mean, base and new side by side."""
        where = ("the TRAINING cases (too few cases to hold any out: not an independent test)"
                 if self.on_training_cases else f"{len(self.base)} held-out case(s)")
        head = f"{'case':<24}{'Dice base':>10}{'Dice new':>10}{'HD95 base':>11}{'HD95 new':>10}" \
               f"{'vol% base':>11}{'vol% new':>10}"
        lines = [f"Scores on {where}, {self.mode} mode (HD95 in mm, volume error in %):", head]
        for b, n in zip(self.base, self.new):
            lines.append(f"{b.case[:23]:<24}{b.dice:>10.4f}{n.dice:>10.4f}{b.hd95_mm:>11.1f}{n.hd95_mm:>10.1f}"
                         f"{b.volume_error_pct:>11.1f}{n.volume_error_pct:>10.1f}")
        sb, sn = summary(self.base), summary(self.new)
        lines.append(f"{'mean (|vol%|)':<24}{sb['dice']:>10.4f}{sn['dice']:>10.4f}{sb['hd95_mm']:>11.1f}"
                     f"{sn['hd95_mm']:>10.1f}{sb['abs_volume_error_pct']:>11.1f}{sn['abs_volume_error_pct']:>10.1f}")
        versus = f"mean Dice {sn['dice']:.4f} vs {sb['dice']:.4f}"
        if sn["dice"] == sb["dice"]:
            versus += f", mean HD95 {sn['hd95_mm']:.1f} vs {sb['hd95_mm']:.1f} mm"
        verdict = f"The new model is {'WORSE than' if self.worse else 'not worse than'} the base model ({versus})."
        return "\n".join(lines + [verdict])


def metrics_to_dicts(rows: list[CaseMetrics]) -> list[dict[str, Any]]:
    """Per-case metrics as JSON data (infinite values as "inf")."""
    return [{k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in r.as_row().items()}
            for r in rows]


def metrics_from_dicts(rows: list[dict[str, Any]]) -> list[CaseMetrics]:
    """Inverse of :meth:`Comparison.to_dict`'s rows ("inf" strings back to floats)."""
    return [CaseMetrics(**{k: (float(v) if isinstance(v, str) and k != "case" else v) for k, v in r.items()})
            for r in rows]

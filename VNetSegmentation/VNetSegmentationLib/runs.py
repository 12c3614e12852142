"""What a run is made of: its options, its result, the background run handle, and its exceptions (Qt-free)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checks
from .environment import detectDevices
from .models import ModelEntry
from .process import SUCCEEDED, BackgroundProcess, ProcessView, removeFolder

# the whole-CT view's smallest located part (mL): the core's default (vnetseg.fast.MIN_LOCATED_ML, kept
# equal by a test; the Lib does not import the core before torch is known to be there) and the range
# the panel offers: under 0.5 mL is a few coarse voxels, over 500 mL is larger than most spleens
DEFAULT_MIN_LOCATED_ML = 10.0
MIN_LOCATED_ML_RANGE = (0.5, 500.0)


class SegmentationCancelled(RuntimeError):
    """The user cancelled the run; nothing was added to the scene."""


class PreRunCheckError(ValueError):
    """A check before the run failed (see ``messages``); nothing was started."""

    def __init__(self, messages: list[checks.CheckMessage]) -> None:
        super().__init__(" ".join(m.message for m in messages))
        self.messages = messages


@dataclass
class SegmentationOptions:
    """What the Advanced section sets.

    Attributes:
        device: "auto" (GPU when there is one), "gpu", "cpu", or a torch name ("cuda:1", "mps").
        overlap: sliding-window overlap fraction in [0, 1).
        postprocess: keep the largest component, trim it to the organ's HU range (on native CT also grow
            it into uncertain voxels in that range), cut off thin appendages and fill holes.
        mode: "auto" (fast on CPU when the model supports it), "fast" (find the spleen at low
            resolution, then segment its box at full resolution) or "full" (whole volume).
        probabilityMap: also add the network's spleen probability as a scalar volume
            ("Spleen probability", shown over the CT); off by default (it costs a float32 copy
            of the CT's size).
        minLocatedMl: the smallest part (mL) the whole-CT view takes for a spleen in view
            (``vnetseg.fast.MIN_LOCATED_ML``, 10 mL, by default). Lower finds more spleens cut by a
            short scan range (a chest CT ending in the upper abdomen) and more false ones (the
            README's "The smallest located part" measures 10, 8, 5 and 3 mL).
    """

    device: str = "auto"
    overlap: float = 0.25
    postprocess: bool = True
    mode: str = "auto"
    probabilityMap: bool = False
    minLocatedMl: float = DEFAULT_MIN_LOCATED_ML

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device.strip():
            raise ValueError(f"device must be 'auto', 'gpu', 'cpu' or a torch device name, got {self.device!r}")
        if not 0.0 <= float(self.overlap) < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.mode not in ("auto", "fast", "full"):
            raise ValueError(f"mode must be 'auto', 'fast' or 'full', got {self.mode!r}")
        if not MIN_LOCATED_ML_RANGE[0] <= float(self.minLocatedMl) <= MIN_LOCATED_ML_RANGE[1]:
            low, high = MIN_LOCATED_ML_RANGE
            raise ValueError(
                f"the smallest spleen in view must be {low:g}-{high:g} mL, got {self.minLocatedMl} "
                f"(the default is {DEFAULT_MIN_LOCATED_ML:g} mL)"
            )

    def coreDevice(self) -> str:
        """The device name for the core ("gpu" is CUDA, or Apple MPS on a Mac without CUDA)."""
        name = self.device.strip().lower()
        if name == "gpu":
            found = detectDevices()
            return "mps" if not found.get("cuda") and found.get("mps") else "cuda"
        return name


@dataclass
class SegmentationResult:
    """What one successful run produced.

    Attributes:
        segmentationNodeID: the output node; segmentIDs: its segments written by this run.
        volumeMl: volume of the (first) segment in mL; seconds: wall time of the whole run.
        device: what ran the network ("cuda:0", "cpu"...).
        warnings: post-run warnings; preRunWarnings: the pre-run warnings the user accepted.
        modelName: the model used; background: True when it ran in a separate process.
        found: False when the answer is "no spleen found in the field of view": then nothing was
            added to or changed in the scene (segmentationNodeID is "" and segmentIDs is empty).
        message: that answer in one line (with the core's reason).
        probabilityNodeID: the "Spleen probability" volume added by this run ("" when not asked
            for, or when no spleen was found: then nothing is added).
        probabilityCovers: what that map covers ("volume"; "box": fast mode, 0 outside it; "body": full
            mode, 0 in the air outside the body's box).
        confidence: the core's confidence of the mask (``vnetseg.confidence.Confidence`` as a
            dict: mean_probability, uncertain_share, organ_voxels, low), or None.
    """

    segmentationNodeID: str
    segmentIDs: list[str]
    volumeMl: float
    seconds: float
    device: str
    warnings: list[checks.CheckMessage] = field(default_factory=list)
    preRunWarnings: list[checks.CheckMessage] = field(default_factory=list)
    modelName: str = ""
    background: bool = False
    found: bool = True
    message: str = ""
    probabilityNodeID: str = ""
    probabilityCovers: str = ""
    confidence: dict[str, Any] | None = None

    def confidenceText(self) -> str:
        """'Confidence: mean probability 0.93 inside the mask, 6.1 % of the organ uncertain (0.3-0.7)' or ''."""
        c = self.confidence
        if not c:
            return ""
        low = " - LOW, check the result" if c.get("low") else ""
        return (
            f"Confidence: mean probability {float(c['mean_probability']):.2f} inside the mask, "
            f"{100 * float(c['uncertain_share']):.1f} % of the organ uncertain (0.3-0.7){low}"
        )

    def summary(self) -> str:
        """The text the panel shows after a run."""
        if not self.found:
            first = self.message[:1].upper() + self.message[1:] if self.message else "No spleen found"
            return "\n".join([
                f"{first}: nothing was added to the scene.",
                f"Time: {self.seconds:.1f} s on {self.device}",
                f"Model: {self.modelName}",
            ] + [f"{'Warning' if w.code == 'thinView' else 'Note'}: {w.message}" for w in self.warnings])
        lines = [
            f"Spleen volume: {self.volumeMl:.1f} mL",
            f"Time: {self.seconds:.1f} s on {self.device}",
            f"Model: {self.modelName}",
        ]
        lines += [self.confidenceText()] if self.confidence else []
        if self.probabilityNodeID:
            where = {"box": " (fast mode: 0 outside the segmented box)",
                     "body": " (0 in the air outside the body's box)"}.get(self.probabilityCovers, "")
            lines.append(f"Probability map: added as a volume, shown over the CT{where}")
        lines += [f"Warning: {w.message}" for w in self.warnings]
        return "\n".join(lines)


@dataclass
class BackgroundRun(ProcessView):
    """A run in a separate process: ``poll()`` it from a timer, ``cancel()`` it any time.

    ``state``, ``finished``, ``fraction``, ``message`` and ``error`` are the process's.
    """

    process: BackgroundProcess
    tempDir: Path
    outputPath: Path
    volumeNodeID: str
    model: ModelEntry
    info: Any
    options: SegmentationOptions
    outputSegmentationID: str | None
    replace: bool
    preRunWarnings: list[checks.CheckMessage]
    started: float = field(default_factory=time.monotonic)

    def poll(self) -> list[dict[str, Any]]:
        events = self.process.poll()
        if self.process.finished and self.process.state != SUCCEEDED:
            self.cleanup()
        return events

    def cancel(self) -> None:
        """Kill the process and delete its files; the scene is not touched."""
        self.process.cancel()
        self.cleanup()

    def cleanup(self) -> bool:
        """Delete the run's temporary folder (CT, mask, report); True when it is gone."""
        return removeFolder(self.tempDir)

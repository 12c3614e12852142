"""Slicer-aware, Qt-free part of the VNet Segmentation module: Logic, node exchange, background process.

Imports only slicer (MRML classes), vtk and numpy at import time; torch and the core's inference
are imported when a run starts. Tested headless with ``slicer-core`` (see Testing/test_slicer_*.py).
"""

from .finetune import FinetuneCancelled, FinetuneOutcome, FinetuneRun, FinetuneSettings
from .logic import VNetSegmentationLogic
from .runs import (
    BackgroundRun,
    PreRunCheckError,
    SegmentationCancelled,
    SegmentationOptions,
    SegmentationResult,
)

__all__ = [
    "BackgroundRun",
    "FinetuneCancelled",
    "FinetuneOutcome",
    "FinetuneRun",
    "FinetuneSettings",
    "PreRunCheckError",
    "SegmentationCancelled",
    "SegmentationOptions",
    "SegmentationResult",
    "VNetSegmentationLogic",
]

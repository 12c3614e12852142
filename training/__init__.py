"""Training and evaluation of the VNetSegmentation V-Net on MSD-layout data.

Modules (one concern each):
  * :mod:`training.data`: read and check an MSD task folder (``dataset.json``), k-fold splits.
  * :mod:`training.cache`: preprocess once (reorient, resample, HU window) into a reusable cache.
  * :mod:`training.sampling`: foreground-balanced patch sampling and MONAI augmentation.
  * :mod:`training.losses`: the V-Net soft Dice loss (squared denominators) and Dice + CE.
  * :mod:`training.config`: the training configuration dataclasses and named presets.
  * :mod:`training.optim`: optimisers (SGD Nesterov, AdamW) and per-iteration schedules.
  * :mod:`training.engine`: the training loop (AMP, clipping, DDP, validation, checkpoints, resume),
    with :mod:`training.distributed` (torchrun), :mod:`training.checkpointing` (training state)
    and :mod:`training.observe` (progress line, CSV log, PNG curves).
  * :mod:`training.train`: ``python -m training.train`` command line.
  * :mod:`training.metrics` / :mod:`training.evaluate`: Dice, HD95, surface Dice, volume error.
  * :mod:`training.synthetic`: CT-like abdominal phantoms written as an MSD task.

The package depends on the core (:mod:`vnetseg`), never the other way round.
"""

from __future__ import annotations

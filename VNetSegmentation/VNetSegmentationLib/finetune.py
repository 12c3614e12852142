"""Improve the model: fine-tune it on the cases exported for training, in a separate process (Qt-free).

The panel's *Improve the model...* runs ``python -m training.finetune`` (the ``training`` package of
the extension's source) in a separate process through :class:`process.BackgroundProcess`, exactly
like inference: progress with the current step and loss, cancel = kill, a crash cannot take Slicer
down. The new model is written into a work folder inside the export folder
(``<export>/.vnetseg-finetune/<name>/``, which also keeps the training state, so starting again
with the same name resumes a cancelled or crashed run); only when the run succeeded, and the new
model is not worse than the base on the held-out cases (or the user insists), is it imported into
the user's model folder (with its SHA-256 note). The base model file is only read. A cancelled or
failed run leaves the model folder as it was.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .models import MODEL_SUFFIX, ModelEntry, ModelStore
from .process import CANCELLED, SUCCEEDED, BackgroundProcess, ProcessView

TRAINING_DIR_ENV = "VNETSEG_TRAINING_DIR"
WORK_FOLDER = ".vnetseg-finetune"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class FinetuneCancelled(RuntimeError):
    """The user cancelled; nothing was installed (starting again with the same name resumes)."""


def trainingSearchPath() -> str:
    """The folder holding the ``training`` package (with ``finetune.py``), for the child's PYTHONPATH.

    Looked for in ``$VNETSEG_TRAINING_DIR``, an importable ``training`` package, and the source
    checkout this module lives in (``<checkout>/VNetSegmentation/VNetSegmentationLib``).

    Raises:
        RuntimeError: not found (a built extension does not ship ``training/``).
    """
    candidates = [Path(os.environ[TRAINING_DIR_ENV])] if os.environ.get(TRAINING_DIR_ENV) else []
    spec = importlib.util.find_spec("training")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p).parent for p in spec.submodule_search_locations]
    candidates.append(Path(__file__).resolve().parents[2])
    for folder in candidates:
        if (folder / "training" / "finetune.py").is_file():
            return str(folder)
    raise RuntimeError(
        "Improving the model needs the training/ folder of the VNetSegmentation source code, which was not found "
        f"(looked in {', '.join(str(c) for c in candidates)}). Add the source checkout as the module path, or set "
        f"{TRAINING_DIR_ENV} to the folder that holds training/."
    )


@dataclass
class FinetuneSettings:
    """How to fine-tune (see ``python -m training.finetune --help``).

    Attributes:
        steps / locatorSteps: training steps of the main network / of the fast-mode locator.
        device: "auto", "cpu", "cuda"... seed: seeds patches and hold-out split.
        valCases: cases to score on and not train on (default: chosen by the training code).
        patchSize: training patch in voxels, or None for the default.
        lr: learning rate, or None for the default.
        force: install the new model even when it scores worse than the base.
        checkpointEvery: steps between saved training states (for resume).
    """

    steps: int = 200  # the command line's defaults: a few minutes on a 2-core CPU
    locatorSteps: int = 60
    device: str = "auto"
    seed: int = 0
    valCases: tuple[str, ...] = ()
    patchSize: tuple[int, int, int] | None = None
    lr: float | None = None
    force: bool = False
    checkpointEvery: int = 10

    def __post_init__(self) -> None:
        if int(self.steps) < 1 or int(self.locatorSteps) < 0 or int(self.checkpointEvery) < 1:
            raise ValueError(
                f"steps and checkpointEvery must be >= 1 and locatorSteps >= 0, got steps={self.steps}, "
                f"locatorSteps={self.locatorSteps}, checkpointEvery={self.checkpointEvery}"
            )


@dataclass
class FinetuneCommand:
    """The arguments of one ``training.finetune`` run."""

    baseModel: Path
    sha256: str
    dataFolder: Path
    outputPath: Path
    workDir: Path
    settings: FinetuneSettings

    def arguments(self) -> list[str]:
        s = self.settings
        args = ["-m", "training.finetune", "--model", str(self.baseModel), "--data", str(self.dataFolder),
                "--out", str(self.outputPath), "--work", str(self.workDir), "--steps", str(int(s.steps)),
                "--locator-steps", str(int(s.locatorSteps)), "--device", s.device, "--seed", str(int(s.seed)),
                "--checkpoint-every", str(int(s.checkpointEvery)), "--overwrite", "--restart-if-changed",
                "--progress", "json"]
        if self.sha256:
            args += ["--sha256", self.sha256]
        for case in s.valCases:
            args += ["--val-case", case]
        if s.patchSize:
            args += ["--patch", *(str(int(v)) for v in s.patchSize)]
        if s.lr is not None:
            args += ["--lr", repr(float(s.lr))]
        if s.force:
            args.append("--force")
        return args


@dataclass
class FinetuneOutcome:
    """What a finished fine-tune gave.

    Attributes:
        installed: the new model is in the model folder (``model``); False when it scored worse.
        worse: the new model scored worse than the base on the scoring cases.
        table: base and new scores side by side (text). message: one line about the outcome.
        scores: the comparison as data; onTrainingCases: the scores are on the training cases.
        baseModel: the base model's entry (never modified).
        resumedAt: the training step the run resumed at (0: it started afresh).
    """

    installed: bool
    worse: bool
    table: str
    message: str
    scores: dict[str, Any]
    onTrainingCases: bool
    baseModel: ModelEntry
    model: ModelEntry | None = None
    resumedAt: int = 0

    def summary(self) -> str:
        return f"{self.table}\n{self.message}"


@dataclass
class FinetuneRun(ProcessView):
    """A fine-tune in a separate process: ``poll()`` it from a timer, ``cancel()`` it any time.

    ``state``, ``finished``, ``fraction``, ``message`` and ``error`` are the process's; ``step``,
    ``steps``, ``phase`` ("main" or "locator") and ``loss`` those of the last training step seen.
    """

    process: BackgroundProcess
    command: FinetuneCommand
    newName: str
    baseModel: ModelEntry
    step: int = 0
    steps: int = 0
    phase: str = ""
    loss: float | None = None
    started: float = field(default_factory=time.monotonic)

    def poll(self) -> list[dict[str, Any]]:
        events = self.process.poll()
        for event in events:
            if event.get("event") == "progress" and "step" in event:
                self.step, self.steps = int(event["step"]), int(event.get("steps", 0))
                self.phase, self.loss = str(event.get("phase", "")), float(event.get("loss", "nan"))
        return events

    def cancel(self) -> None:
        """Kill the process; a partly written model file in the work folder is removed (the state stays for resume)."""
        self.process.cancel()
        for partial in self.command.workDir.glob(f".{self.command.outputPath.name}.tmp*"):
            partial.unlink(missing_ok=True)


def startFinetune(store: ModelStore, base: ModelEntry, exportFolder, newName: str,
                  settings: FinetuneSettings | None = None) -> FinetuneRun:
    """Check the request and start the fine-tune process; nothing is written before the child's own checks.

    Raises:
        ValueError: no export folder / dataset.json, bad name. FileExistsError: the name is taken.
        RuntimeError: the training code was not found.
    """
    folder = Path(exportFolder)
    if not (folder / "dataset.json").is_file():
        raise ValueError(
            f"{folder} has no dataset.json: pick the folder that 'Export for training...' wrote (it holds "
            "dataset.json, imagesTr/ and labelsTr/)"
        )
    if not isinstance(newName, str) or not MODEL_NAME.match(newName) or newName.endswith(MODEL_SUFFIX):
        raise ValueError(f"the new model's name must be letters, digits, '_', '.' or '-' (no .pt), got {newName!r}")
    if store.findModel(newName) is not None or (store.folder / f"{newName}{MODEL_SUFFIX}").exists():
        raise FileExistsError(f"a model named {newName!r} is already installed; choose another name")
    work = folder / WORK_FOLDER / newName
    command = FinetuneCommand(base.path, base.sha256, folder, work / f"{newName}{MODEL_SUFFIX}", work,
                              settings or FinetuneSettings())
    process = BackgroundProcess(command.arguments(), extraPaths=[trainingSearchPath()])
    return FinetuneRun(process, command, newName, base)


def finishFinetune(store: ModelStore, run: FinetuneRun) -> FinetuneOutcome:
    """Install the new model of a finished run into the model folder (unless it scored worse); report the scores.

    Raises:
        FinetuneCancelled: the run was cancelled. RuntimeError: it failed (the child's message).
    """
    if not run.finished:
        raise RuntimeError("the fine-tune is still running; poll() until it has finished")
    if run.state == CANCELLED:
        raise FinetuneCancelled(
            f"improving the model was cancelled at step {run.step}; nothing was installed. Start it again with the "
            f"name {run.newName!r} to resume from the last saved step"
        )
    done = run.process.result or {}
    if not done or (run.state != SUCCEEDED and not done.get("worse")):
        raise RuntimeError(f"improving the model failed: {run.error}")
    scores = dict(done.get("scores") or {})
    outcome = FinetuneOutcome(bool(done.get("installed")), bool(done.get("worse")), str(done.get("table", "")),
                              str(done.get("message", "")), scores, bool(scores.get("on_training_cases")),
                              run.baseModel, resumedAt=int(done.get("resumed_at") or 0))
    if outcome.installed:
        candidate = Path(done["path"])
        outcome.model = store.importModel(candidate, sha256=str(done.get("sha256") or "") or None)
        candidate.unlink(missing_ok=True)
        outcome.message = f"Installed '{outcome.model.name}' in {store.folder} (SHA-256 {outcome.model.sha256[:16]}...)."
        if outcome.worse:
            outcome.message += " It scores worse than the base model; it was installed because you insisted."
    else:
        outcome.message = (
            "The new model scores worse than the base model, so it was NOT installed. To install it anyway, start "
            f"again with the name {run.newName!r} and force=True (the panel asks you); the finished training is reused."
        )
    return outcome


def runFinetune(store: ModelStore, base: ModelEntry, exportFolder, newName: str,
                settings: FinetuneSettings | None = None, progress: Callable[[FinetuneRun], None] | None = None,
                cancel: Callable[[], bool] | None = None, timeout: float | None = None) -> FinetuneOutcome:
    """:func:`startFinetune`, poll until it ends (``progress`` gets the run after each poll), :func:`finishFinetune`."""
    run = startFinetune(store, base, exportFolder, newName, settings)
    deadline = None if timeout is None else time.monotonic() + timeout
    while not run.finished:
        if run.poll() and progress is not None:
            progress(run)
        if (cancel is not None and cancel()) or (deadline is not None and time.monotonic() > deadline):
            run.cancel()
            break
        time.sleep(0.1)
    return finishFinetune(store, run)

"""Run the core's command line in a separate Python process, without blocking the caller.

Inside Slicer the process is ``PythonSlicer -m vnetseg predict ... --progress json`` (Slicer's own
Python, so torch and the core are the ones Slicer uses); elsewhere it is ``sys.executable -m
vnetseg``. The process prints one JSON object per line; two reader threads collect stdout and
stderr, so :meth:`BackgroundProcess.poll` never blocks and a chatty process never fills a pipe.
Cancelling kills the process; a crash in it cannot take Slicer down. Qt-free: the Slicer Widget
calls ``poll`` from a ``qt.QTimer``.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"


def pythonExecutable() -> str:
    """The interpreter for the background process: ``PythonSlicer`` inside Slicer, else this one."""
    try:
        import slicer

        inSlicer = hasattr(slicer, "app")
    except ImportError:
        inSlicer = False
    if inSlicer:
        found = shutil.which("PythonSlicer")
        if found:
            return found
        sibling = Path(sys.executable).with_name("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
        if sibling.is_file():
            return str(sibling)
    return sys.executable


def coreSearchPath() -> str:
    """The folder that holds the ``vnetseg`` package (put on the child's PYTHONPATH)."""
    import vnetseg

    return str(Path(vnetseg.__file__).resolve().parent.parent)


def childEnvironment() -> dict[str, str]:
    """This process's environment plus the core on PYTHONPATH and unbuffered output."""
    env = dict(os.environ)
    paths = [coreSearchPath()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class PredictCommand:
    """Arguments of one ``vnetseg predict`` call (see ``vnetseg predict --help``).

    Attributes:
        inputPath: CT image file.
        outputPath: mask file to write (.nii / .nii.gz).
        modelPath: model file.
        device: "auto", "cpu", "cuda" ...
        overlap: sliding-window overlap in [0, 1).
        postprocess: keep the largest component and fill holes.
        reportPath: JSON report file, or None.
        sha256: expected SHA-256 of the model file, or None.
    """

    inputPath: Path
    outputPath: Path
    modelPath: Path
    device: str = "auto"
    overlap: float = 0.25
    postprocess: bool = True
    reportPath: Path | None = None
    sha256: str | None = None

    def arguments(self) -> list[str]:
        args = ["-m", "vnetseg", "predict", str(self.inputPath), "-o", str(self.outputPath),
                "--model", str(self.modelPath), "--device", self.device, "--overlap", repr(float(self.overlap)),
                "--overwrite", "--progress", "json"]
        if not self.postprocess:
            args.append("--no-postprocess")
        if self.reportPath is not None:
            args += ["--report", str(self.reportPath)]
        if self.sha256:
            args += ["--sha256", self.sha256]
        return args


@dataclass
class BackgroundProcess:
    """One child process whose JSON-lines stdout is read as events.

    Attributes:
        arguments: arguments after the interpreter (e.g. ``["-m", "vnetseg", ...]``).
        python: interpreter; default :func:`pythonExecutable`.
        state: "running", "succeeded", "failed" or "cancelled" (after :meth:`poll` saw the end).
        fraction: last progress fraction (0-1); message: last progress message.
        result: the ``done`` event; error: the failure message.
    """

    arguments: Sequence[str]
    python: str = field(default_factory=pythonExecutable)
    state: str = RUNNING
    fraction: float = 0.0
    message: str = "starting"
    result: dict[str, Any] | None = None
    error: str = ""
    stderrLines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        creation = getattr(subprocess, "CREATE_NO_WINDOW", 0) if os.name == "nt" else 0
        self._started = time.monotonic()
        self._process = subprocess.Popen(
            [self.python, *self.arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=childEnvironment(),
            text=True,
            encoding="utf-8",
            errors="replace",
            creationflags=creation,
        )
        self._readers = [
            threading.Thread(target=self._readStdout, daemon=True),
            threading.Thread(target=self._readStderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    # ------------------------------------------------------------------ reader threads
    def _readStdout(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "output", "message": line}
            if not isinstance(event, dict):
                event = {"event": "output", "message": line}
            self._events.put(event)
        self._events.put(None)  # end of stdout

    def _readStderr(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            if line.strip():
                self.stderrLines.append(line.rstrip())
                del self.stderrLines[:-50]  # keep the tail only

    # ---------------------------------------------------------------------- public API
    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def finished(self) -> bool:
        return self.state != RUNNING

    @property
    def seconds(self) -> float:
        return time.monotonic() - self._started

    def poll(self) -> list[dict[str, Any]]:
        """Events that arrived since the last call (never blocks); updates state at the end."""
        events = []
        ended = False
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if event is None:
                ended = True
                break
            events.append(event)
            self._apply(event)
        if ended and self.state == RUNNING:
            self._finish()
        return events

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "progress":
            self.fraction = float(event.get("fraction", self.fraction))
            self.message = str(event.get("message", self.message))
        elif kind == "done":
            self.result = event
            self.fraction, self.message = 1.0, "done"
        elif kind == "error":
            self.error = str(event.get("message", "")) or self.error

    def _finish(self) -> None:
        code = self._process.wait()
        for reader in self._readers:
            reader.join(timeout=5)
        if self.state != RUNNING:
            return
        if code == 0 and self.result is not None and not self.result.get("error"):
            self.state = SUCCEEDED
            return
        self.state = FAILED
        if not self.error:
            detail = self.result.get("error") if self.result else None
            tail = [line for line in self.stderrLines if line.strip()]
            self.error = str(detail or (tail[-1] if tail else f"the segmentation process ended with exit code {code}"))

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> list[dict[str, Any]]:
        """Block until the process ends (for scripts and tests); return all events seen."""
        deadline = None if timeout is None else time.monotonic() + timeout
        events: list[dict[str, Any]] = []
        while not self.finished:
            events += self.poll()
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"the segmentation process did not finish within {timeout} s; it was stopped")
            time.sleep(interval)
        return events

    def cancel(self) -> None:
        """Kill the process (if running) and wait for it to end; state becomes "cancelled"."""
        if self.state != RUNNING:
            return
        self.state = CANCELLED
        self.message = "cancelled"
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        for reader in self._readers:
            reader.join(timeout=5)

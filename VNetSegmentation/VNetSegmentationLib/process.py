"""Run the core's command line in a separate Python process, without blocking the caller.

Inside Slicer the process is ``PythonSlicer -m vnetseg predict ... --progress json`` (Slicer's own
Python, so torch and the core are the ones Slicer uses); elsewhere it is ``sys.executable -m
vnetseg``. The process prints one JSON object per line into a file, which
:meth:`BackgroundProcess.poll` reads incrementally: it never blocks, needs no thread (Python
threads may not get to run in Slicer's embedded interpreter while Qt waits for events), and a
chatty process cannot fill a pipe. Cancelling kills the process; a crash in it cannot take
Slicer down. Qt-free: the Slicer Widget calls ``poll`` from a ``qt.QTimer``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
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
        mode: "auto", "fast" or "full" (see ``vnetseg predict --help``).
        probabilityPath: also write the spleen probability map here (float32), or None.
    """

    inputPath: Path
    outputPath: Path
    modelPath: Path
    device: str = "auto"
    overlap: float = 0.25
    postprocess: bool = True
    reportPath: Path | None = None
    sha256: str | None = None
    mode: str = "auto"
    probabilityPath: Path | None = None

    def arguments(self) -> list[str]:
        args = [
            "-m",
            "vnetseg",
            "predict",
            str(self.inputPath),
            "-o",
            str(self.outputPath),
            "--model",
            str(self.modelPath),
            "--device",
            self.device,
            "--overlap",
            repr(float(self.overlap)),
            "--mode",
            self.mode,
            "--overwrite",
            "--progress",
            "json",
        ]
        if not self.postprocess:
            args.append("--no-postprocess")
        if self.reportPath is not None:
            args += ["--report", str(self.reportPath)]
        if self.sha256:
            args += ["--sha256", self.sha256]
        if self.probabilityPath is not None:
            args += ["--probabilities", str(self.probabilityPath), "--probability-type", "float32"]
        return args


@dataclass
class BackgroundProcess:
    """One child process whose JSON-lines stdout is read as events.

    The child writes its stdout and stderr to files in ``workDir``; :meth:`poll` reads whatever
    complete lines were added since the last call. No pipes and no threads: nothing can block,
    and it works the same inside Slicer's embedded Python as anywhere else.

    Attributes:
        arguments: arguments after the interpreter (e.g. ``["-m", "vnetseg", ...]``).
        python: interpreter; default :func:`pythonExecutable`.
        workDir: folder for the output files; default a new temporary folder, removed at the end.
        state: "running", "succeeded", "failed" or "cancelled" (after :meth:`poll` saw the end).
        fraction: last progress fraction (0-1); message: last progress message.
        result: the ``done`` event; error: the failure message.
    """

    arguments: Sequence[str]
    python: str = field(default_factory=pythonExecutable)
    workDir: Path | None = None
    state: str = RUNNING
    fraction: float = 0.0
    message: str = "starting"
    result: dict[str, Any] | None = None
    error: str = ""

    def __post_init__(self) -> None:
        self._ownsWorkDir = self.workDir is None
        self.workDir = Path(tempfile.mkdtemp(prefix="vnetseg-run-")) if self.workDir is None else Path(self.workDir)
        self._stdoutPath = self.workDir / "stdout.jsonl"
        self._stderrPath = self.workDir / "stderr.txt"
        self._offset = 0
        self._partial = b""
        self._started = time.monotonic()
        creation = getattr(subprocess, "CREATE_NO_WINDOW", 0) if os.name == "nt" else 0
        with open(self._stdoutPath, "wb") as out, open(self._stderrPath, "wb") as err:
            self._process = subprocess.Popen(
                [self.python, *self.arguments],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=childEnvironment(),
                creationflags=creation,
            )

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def finished(self) -> bool:
        return self.state != RUNNING

    @property
    def seconds(self) -> float:
        return time.monotonic() - self._started

    @property
    def stderrLines(self) -> list[str]:
        """The last 50 non-empty lines the child wrote to stderr."""
        try:
            text = self._stderrPath.read_bytes().decode("utf-8", errors="replace")
        except OSError:
            return []
        return [line.rstrip() for line in text.splitlines() if line.strip()][-50:]

    def _readLines(self) -> list[str]:
        try:
            with open(self._stdoutPath, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return []
        self._offset += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        return [line.decode("utf-8", errors="replace").strip() for line in complete]

    @staticmethod
    def _parse(line: str) -> dict[str, Any]:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            return {"event": "output", "message": line}
        return event if isinstance(event, dict) else {"event": "output", "message": line}

    def poll(self) -> list[dict[str, Any]]:
        """Events written since the last call (never blocks); updates the state when the child has ended."""
        if self.state != RUNNING:
            return []
        ended = self._process.poll() is not None  # before reading: then no line can come after this read
        lines = self._readLines()
        if ended and self._partial.strip():
            lines.append(self._partial.decode("utf-8", errors="replace").strip())
            self._partial = b""
        events = [self._parse(line) for line in lines if line]
        for event in events:
            self._apply(event)
        if ended:
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
        if code == 0 and self.result is not None and not self.result.get("error"):
            self.state = SUCCEEDED
        else:
            self.state = FAILED
            if not self.error:
                detail = self.result.get("error") if self.result else None
                tail = self.stderrLines
                self.error = str(
                    detail or (tail[-1] if tail else f"the segmentation process ended with exit code {code}")
                )
        self._cleanup()

    def _cleanup(self) -> None:
        if self._ownsWorkDir:
            shutil.rmtree(self.workDir, ignore_errors=True)

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> list[dict[str, Any]]:
        """Block until the process ends (for scripts and tests); return all events seen."""
        deadline = None if timeout is None else time.monotonic() + timeout
        events: list[dict[str, Any]] = []
        while not self.finished:
            events += self.poll()
            if self.finished:
                break
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
        self._cleanup()

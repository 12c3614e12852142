"""Run the core's command line in a separate Python process, without blocking the caller.

Inside Slicer the process is ``PythonSlicer -m vnetseg predict ... --progress json`` (Slicer's own
Python, so torch and the core are the ones Slicer uses); elsewhere it is ``sys.executable -m
vnetseg``. The process prints one JSON object per line into a file, which
:meth:`BackgroundProcess.poll` reads incrementally: it never blocks, needs no thread (Python
threads may not get to run in Slicer's embedded interpreter while Qt waits for events), and a
chatty process cannot fill a pipe. A crash in it cannot take Slicer down. Qt-free: the Slicer
Widget calls ``poll`` from a ``qt.QTimer``.

Cancelling kills the whole process tree, not only the process started: in an installed Slicer
``PythonSlicer`` is CTKAppLauncher under another name, which sets up the environment, starts the
real interpreter (``python-real``) as its child and forwards no signal to it. The child is
therefore started in a process group of its own (POSIX: a new session, killed with
``os.killpg``; Windows: ``taskkill /F /T``, which follows the parent-child links).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"

# processes still running when this interpreter exits (Slicer closing without the panel's
# cleanup, a script that forgot to wait) are killed with everything they started
_RUNNING: weakref.WeakSet[BackgroundProcess] = weakref.WeakSet()


@atexit.register
def _killRunningAtExit() -> None:
    for process in list(_RUNNING):
        process.cancel()


PYTHON_SLICER = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"


def pythonExecutable() -> str:
    """The interpreter for the background process: ``PythonSlicer`` inside Slicer, else this one.

    Inside Slicer: ``PythonSlicer`` on PATH (Slicer's launcher puts its ``bin`` folder there, as
    ``slicer.util`` relies on), else ``<slicer home>/bin/PythonSlicer``, else next to
    ``sys.executable``.

    Raises:
        RuntimeError: no interpreter can be found (``sys.executable`` is empty, and inside
            Slicer no ``PythonSlicer`` either).
    """
    try:
        import slicer

        app = getattr(slicer, "app", None)
    except ImportError:
        app = None
    if app is not None:
        found = shutil.which("PythonSlicer")
        if found:
            return found
        folders = [Path(str(getattr(app, "slicerHome", "") or "")) / "bin"] if getattr(app, "slicerHome", "") else []
        if sys.executable:
            folders.append(Path(sys.executable).parent)
        for folder in folders:
            if (folder / PYTHON_SLICER).is_file():
                return str(folder / PYTHON_SLICER)
    if sys.executable:
        return sys.executable
    raise RuntimeError(
        "cannot find a Python interpreter to run the segmentation: PythonSlicer is not on PATH and "
        "sys.executable is empty; start Slicer with its launcher (Slicer or Slicer.exe), not SlicerApp-real"
    )


def coreSearchPath() -> str:
    """The folder that holds the ``vnetseg`` package (put on the child's PYTHONPATH)."""
    import vnetseg

    return str(Path(vnetseg.__file__).resolve().parent.parent)


def childEnvironment(extraPaths: Sequence[str] = ()) -> dict[str, str]:
    """This process's environment plus the core (and ``extraPaths``) on PYTHONPATH, unbuffered output,
    and a safe path.

    ``PYTHONSAFEPATH=1`` (Python 3.11+) keeps ``-m`` from putting the current folder first on
    ``sys.path``, so a folder there named like a package (``vnetseg``, ``numpy``) cannot shadow it;
    the child also runs in its own work folder.
    """
    env = dict(os.environ)
    paths = [coreSearchPath(), *extraPaths] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONSAFEPATH"] = "1"
    return env


def killProcessTree(process: subprocess.Popen) -> None:
    """Kill ``process`` and every process it started (see the module docstring), then reap it.

    ``process`` must have been started by :class:`BackgroundProcess` (its own process group on
    POSIX). Safe to call when it has already ended.
    """
    if process.returncode is None:  # not reaped yet: on POSIX its group id cannot have been reused
        if os.name == "nt":
            try:
                subprocess.run(
                    ["taskkill", "/F", "/T", "/PID", str(process.pid)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
                    timeout=30,
                    check=False,
                )
            except (OSError, subprocess.SubprocessError):
                pass
        else:
            import signal

            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    if process.poll() is None:
        process.kill()
    process.wait()


def removeFolder(path: Path, attempts: int = 5, delay: float = 0.1) -> bool:
    """Delete a temporary folder; True when it is gone.

    On Windows a file cannot be deleted while a process still has it open or memory-mapped (a
    killed child may take a moment to release its files), so deleting is tried a few times.
    """
    for attempt in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            return True
        if attempt + 1 < attempts:
            time.sleep(delay)
    return False


@dataclass
class PredictCommand:
    """Arguments of one ``vnetseg predict`` call (see ``vnetseg predict --help``).

    Attributes:
        inputPath: CT image file.
        outputPath: mask file to write (.nii / .nii.gz).
        modelPath: model file.
        device: "auto", "cpu", "cuda" ...
        overlap: sliding-window overlap in [0, 1).
        postprocess: keep the largest component, trim it to the organ's HU range (on native CT also grow
            it into uncertain voxels in that range), cut off thin appendages and fill holes.
        reportPath: JSON report file, or None.
        sha256: expected SHA-256 of the model file, or None.
        mode: "auto", "fast" or "full" (see ``vnetseg predict --help``).
        probabilityPath: also write the spleen probability map here (float32), or None.
        minLocatedMl: the smallest part (mL) the whole-CT view takes for a spleen in view
            (``--min-located-ml``), or None for the core's default.
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
    minLocatedMl: float | None = None

    def arguments(self) -> list[str]:
        """The command line after the interpreter; every path absolute (the child runs elsewhere)."""

        def full(path: Path) -> str:
            return os.path.abspath(path)

        args = [
            "-m",
            "vnetseg",
            "predict",
            full(self.inputPath),
            "-o",
            full(self.outputPath),
            "--model",
            full(self.modelPath),
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
            args += ["--report", full(self.reportPath)]
        if self.sha256:
            args += ["--sha256", self.sha256]
        if self.probabilityPath is not None:
            args += ["--probabilities", str(self.probabilityPath), "--probability-type", "float32"]
        if self.minLocatedMl is not None:
            args += ["--min-located-ml", repr(float(self.minLocatedMl))]
        return args


@dataclass(eq=False)  # a handle on one process: compared (and hashed) by identity
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
        extraPaths: more folders for the child's PYTHONPATH (e.g. the ``training`` package's parent).
    """

    arguments: Sequence[str]
    python: str = field(default_factory=pythonExecutable)
    workDir: Path | None = None
    state: str = RUNNING
    fraction: float = 0.0
    message: str = "starting"
    result: dict[str, Any] | None = None
    error: str = ""
    extraPaths: Sequence[str] = ()

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
                cwd=str(self.workDir),
                env=childEnvironment(self.extraPaths),
                creationflags=creation,
                start_new_session=os.name != "nt",  # its own process group: cancel kills the tree
            )
        _RUNNING.add(self)

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
        _RUNNING.discard(self)
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
            removeFolder(self.workDir)

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
        """Kill the process and all it started (if running), wait for it; state becomes "cancelled"."""
        if self.state != RUNNING:
            return
        self.state = CANCELLED
        self.message = "cancelled"
        _RUNNING.discard(self)
        killProcessTree(self._process)
        self._cleanup()


class ProcessView:
    """Read-only state of a run's :class:`BackgroundProcess` (the ``process`` attribute), for run handles."""

    process: BackgroundProcess

    @property
    def state(self) -> str:
        return self.process.state

    @property
    def finished(self) -> bool:
        return self.process.finished

    @property
    def fraction(self) -> float:
        return self.process.fraction

    @property
    def message(self) -> str:
        return self.process.message

    @property
    def error(self) -> str:
        return self.process.error

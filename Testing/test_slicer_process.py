"""The background process: events, failures, cancellation; the scene is untouched unless a run succeeds.

The child processes here are real Python processes (small scripts, or the real ``vnetseg`` CLI).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from slicer_helpers import one_torch_thread  # noqa: F401 (autouse fixture)

from VNetSegmentationLib import SegmentationCancelled, SegmentationOptions
from VNetSegmentationLib.process import BackgroundProcess, PredictCommand, childEnvironment


def script(code: str) -> BackgroundProcess:
    return BackgroundProcess(["-c", code], python=sys.executable)


def test_events_are_read_line_by_line():
    proc = script(
        "import json\n"
        "print(json.dumps({'event': 'progress', 'fraction': 0.5, 'message': 'half'}))\n"
        "print('not json')\n"
        "print(json.dumps({'event': 'done', 'volume_ml': 12.5, 'warnings': []}))\n"
    )
    events = proc.wait(timeout=30)
    assert [e["event"] for e in events] == ["progress", "output", "done"]
    assert events[1]["message"] == "not json"
    assert proc.state == "succeeded" and proc.fraction == 1.0 and proc.result["volume_ml"] == 12.5
    assert not proc.workDir.exists(), "its own temporary folder is removed at the end"


def test_last_line_without_newline_and_partial_writes():
    proc = script(
        "import sys, time\n"
        'sys.stdout.write(\'{"event": "progress", "fra\'); sys.stdout.flush(); time.sleep(0.3)\n'
        "sys.stdout.write('ction\": 0.25}\\n'); sys.stdout.flush()\n"
        'sys.stdout.write(\'{"event": "done"}\')\n'
    )
    seen = []
    while not proc.finished:
        seen += proc.poll()
        time.sleep(0.05)
    assert seen == [{"event": "progress", "fraction": 0.25}, {"event": "done"}]
    assert proc.state == "succeeded"


def test_error_event_and_exit_code_give_a_clear_message():
    proc = script(
        "import json, sys\n"
        "print(json.dumps({'event': 'error', 'message': 'input ct.nii does not exist'}))\n"
        "sys.stderr.write('vnetseg: error: input ct.nii does not exist\\n')\n"
        "sys.exit(2)\n"
    )
    proc.wait(timeout=30)
    assert proc.state == "failed" and proc.error == "input ct.nii does not exist"


def test_crash_without_output_reports_stderr_tail():
    proc = script("import sys\nsys.stderr.write('Segmentation fault in libfoo\\n')\nsys.exit(139)\n")
    proc.wait(timeout=30)
    assert proc.state == "failed" and proc.error == "Segmentation fault in libfoo"
    silent = script("import sys\nsys.exit(3)\n")
    silent.wait(timeout=30)
    assert silent.error == "the segmentation process ended with exit code 3"


def test_exit_zero_without_done_is_a_failure():
    proc = script('print(\'{"event": "progress", "fraction": 0.1}\')\n')
    proc.wait(timeout=30)
    assert proc.state == "failed"


def test_cancel_kills_the_process():
    proc = script(
        "import json, time\nprint(json.dumps({'event': 'progress', 'fraction': 0.1}), flush=True)\ntime.sleep(60)\n"
    )
    deadline = time.monotonic() + 30
    while not proc.poll() and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    proc.cancel()
    assert proc.state == "cancelled"
    assert proc._process.poll() is not None, "the child must be gone"
    assert time.monotonic() - started < 5


def test_predict_command_is_what_the_cli_accepts(tmp_path):
    from vnetseg.cli import build_parser

    cmd = PredictCommand(
        tmp_path / "in.nii",
        tmp_path / "out.nii",
        tmp_path / "m.pt",
        "cpu",
        0.5,
        False,
        tmp_path / "r.json",
        "ab" * 32,
        "full",
    )
    args = cmd.arguments()
    assert args[:2] == ["-m", "vnetseg"]
    ns = build_parser().parse_args(args[2:])
    assert ns.command == "predict" and ns.inputs == [str(tmp_path / "in.nii")]
    assert (ns.output, ns.model, ns.device, ns.overlap) == (
        str(tmp_path / "out.nii"),
        str(tmp_path / "m.pt"),
        "cpu",
        0.5,
    )
    assert ns.postprocess is False and ns.overwrite and ns.progress == "json"
    assert ns.report == str(tmp_path / "r.json") and ns.sha256 == "ab" * 32 and ns.mode == "full"
    assert ns.min_located_ml is None and "--min-located-ml" not in args  # the core's default
    floor = PredictCommand(tmp_path / "in.nii", tmp_path / "out.nii", tmp_path / "m.pt", minLocatedMl=5.0).arguments()
    assert build_parser().parse_args(floor[2:]).min_located_ml == 5.0


def test_child_finds_the_core():
    import vnetseg

    env = childEnvironment()
    proc = BackgroundProcess(
        ["-c", "import json, vnetseg; print(json.dumps({'event': 'done', 'path': vnetseg.__file__}))"],
        python=sys.executable,
    )
    proc.wait(timeout=60)
    assert proc.state == "succeeded" and proc.result["path"] == vnetseg.__file__
    assert env["PYTHONUNBUFFERED"] == "1"


# ------------------------------------------------------------------------------- with the Logic
def test_cancel_background_run_leaves_scene_unchanged(ct_dir, tiny_model_file, env, logic):
    volume = env.load_volume(ct_dir / "example_ct.nii.gz", "ct")
    before = env.node_ids()
    run = logic.startSegmentation(volume, tiny_model_file, SegmentationOptions("cpu", 0.5))
    assert run.tempDir.exists() and (run.tempDir / "input.nii").is_file()
    deadline = time.monotonic() + 120
    while not any(e.get("event") == "progress" for e in run.poll()) and time.monotonic() < deadline:
        assert not run.finished, run.error
        time.sleep(0.05)
    run.cancel()
    assert run.state == "cancelled" and run.process._process.poll() is not None
    assert not run.tempDir.exists()
    with pytest.raises(SegmentationCancelled):
        logic.finishSegmentation(run)
    assert env.node_ids() == before


def test_failed_background_run_is_a_clear_error_and_leaves_scene_unchanged(ct_dir, tiny_model_file, env, logic):
    volume = env.load_volume(ct_dir / "example_ct_sm.nii.gz", "sm")
    before = env.node_ids()
    with pytest.raises(RuntimeError, match=r"the segmentation failed: device 'cuda:99'"):
        logic.segment(volume, tiny_model_file, SegmentationOptions("cuda:99"), background=True, timeout=120)
    assert env.node_ids() == before


def test_cancel_synchronous_run_leaves_scene_unchanged(ct_dir, tiny_model_file, env, logic):
    volume = env.load_volume(ct_dir / "example_ct_sm.nii.gz", "sm2")
    before = env.node_ids()
    seen = []
    with pytest.raises(SegmentationCancelled):
        logic.segment(
            volume,
            tiny_model_file,
            SegmentationOptions("cpu", 0.0),
            progress=lambda f, m: seen.append(f),
            cancel=lambda: len(seen) > 1,
        )
    assert seen and env.node_ids() == before


def test_cancel_callback_in_background_mode(ct_dir, tiny_model_file, env, logic):
    volume = env.load_volume(ct_dir / "example_ct.nii.gz", "ct2")
    before = env.node_ids()
    seen = []
    with pytest.raises(SegmentationCancelled):
        logic.segment(
            volume,
            tiny_model_file,
            SegmentationOptions("cpu", 0.5),
            background=True,
            progress=lambda f, m: seen.append(f),
            cancel=lambda: bool(seen),
        )
    assert seen and env.node_ids() == before


def test_empty_result_from_the_background_process(ct_dir, env, logic, tmp_path):
    """A model that always answers 'background': the empty mask is read back, and the run says "no spleen"
    (an answer: nothing is added to the scene)."""
    import torch

    from vnetseg.checkpoint import ModelInfo, Preprocessing, save_model
    from vnetseg.model import VNetConfig, build_model

    config = VNetConfig(widths=(4, 8, 16, 32, 64), kernel_size=3, norm="instance")
    model = build_model(config)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([10.0, -10.0]))  # background logit far above the spleen's
    path = tmp_path / "background.pt"
    save_model(path, model, ModelInfo(config, Preprocessing((3.0, 3.0, 3.0), patch_size=(32, 32, 32))))
    volume = env.load_volume(ct_dir / "example_ct_sm.nii.gz", "sm-empty")
    ids_before = env.node_ids()
    seg, result = logic.segment(volume, path, SegmentationOptions("cpu", 0.0), background=True, timeout=120)
    assert seg is None and not result.found and result.volumeMl == 0.0 and result.segmentIDs == []
    assert result.message == "no spleen found in the field of view" and env.node_ids() == ids_before
    assert result.summary().startswith("No spleen found in the field of view: nothing was added to the scene")


# ------------------------------------------------------------------ a launcher like PythonSlicer
LAUNCHER = """#!{python}
# Like CTKAppLauncher (what PythonSlicer is in an installed Slicer): start the real interpreter
# as a child with the same arguments, wait for it, forward no signal, exit with its status.
import os, subprocess, sys
child = subprocess.Popen([{python!r}, *sys.argv[1:]])
with open(os.environ["LAUNCHER_CHILD_PID"], "w") as f:
    f.write(str(child.pid))
sys.exit(child.wait())
"""


def make_launcher(folder):
    path = folder / "PythonSlicer"
    path.write_text(LAUNCHER.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent to reap it counts as ended)."""
    import os

    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def wait_for(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


posix_only = pytest.mark.skipif(sys.platform == "win32", reason="the launcher script needs a POSIX shebang")


@posix_only
def test_cancel_kills_the_real_interpreter_behind_a_launcher(tmp_path, monkeypatch):
    import os
    import signal

    pid_file = tmp_path / "child.pid"
    monkeypatch.setenv("LAUNCHER_CHILD_PID", str(pid_file))
    sleeper = (
        "import json, time\nprint(json.dumps({'event': 'progress', 'fraction': 0.1}), flush=True)\ntime.sleep(120)\n"
    )
    launcher = make_launcher(tmp_path)

    # the trap the launcher sets: killing only the process started leaves the real one running
    naive = BackgroundProcess(["-c", sleeper], python=launcher)
    assert wait_for(lambda: pid_file.is_file() and pid_file.read_text())
    orphan = int(pid_file.read_text())
    naive._process.kill()
    naive._process.wait()
    time.sleep(0.3)
    assert alive(orphan), "the test's launcher must behave like CTKAppLauncher (no signal forwarding)"
    os.kill(orphan, signal.SIGKILL)
    naive.cancel()
    pid_file.unlink()

    proc = BackgroundProcess(["-c", sleeper], python=launcher)
    assert wait_for(lambda: proc.poll() or proc.fraction > 0), proc.stderrLines
    grandchild = int(pid_file.read_text())
    assert alive(grandchild) and grandchild != proc.pid
    proc.cancel()
    assert proc.state == "cancelled"
    assert wait_for(lambda: not alive(grandchild), 3), "the real interpreter must be gone after cancel"
    assert not proc.workDir.exists()


@posix_only
def test_cancel_through_a_launcher_stops_the_segmentation(ct_dir, tiny_model_file, env, logic, tmp_path, monkeypatch):
    """The panel's path with PythonSlicer a launcher: after Cancel no process computes, no file is left."""
    pid_file = tmp_path / "child.pid"
    monkeypatch.setenv("LAUNCHER_CHILD_PID", str(pid_file))
    logic.pythonExecutable = make_launcher(tmp_path)
    volume = env.load_volume(ct_dir / "example_ct.nii.gz", "ct-launcher")
    before = env.node_ids()
    # overlap 0.9: hundreds of windows, so the run cannot end by itself while the test looks
    run = logic.startSegmentation(volume, tiny_model_file, SegmentationOptions("cpu", 0.9))
    assert run.process.python == logic.pythonExecutable
    seen: list[dict] = []
    assert wait_for(
        lambda: seen.extend(run.poll()) or run.finished or any(e.get("event") == "progress" for e in seen), 120
    )
    assert not run.finished, run.error
    grandchild = int(pid_file.read_text())
    assert alive(grandchild)
    run.cancel()
    assert wait_for(lambda: not alive(grandchild), 3), "vnetseg must not keep computing after Cancel"
    assert not run.tempDir.exists()
    with pytest.raises(SegmentationCancelled):
        logic.finishSegmentation(run)
    assert env.node_ids() == before


def test_child_runs_in_its_work_folder_and_cannot_be_shadowed(tmp_path, monkeypatch):
    """A folder named like a package in Slicer's current folder must not replace the real one."""
    import vnetseg

    (tmp_path / "vnetseg").mkdir()
    (tmp_path / "vnetseg" / "__init__.py").write_text("raise SystemExit('shadowed vnetseg imported')\n")
    (tmp_path / "vnetseg" / "__main__.py").write_text("raise SystemExit('shadowed vnetseg ran')\n")
    monkeypatch.chdir(tmp_path)
    proc = BackgroundProcess(["-m", "vnetseg", "--help"], python=sys.executable)
    proc.wait(timeout=120)
    assert "shadowed" not in " ".join(proc.stderrLines)
    code = BackgroundProcess(
        [
            "-c",
            "import json, os, vnetseg; print(json.dumps({'event': 'done', 'path': vnetseg.__file__, 'cwd': os.getcwd()}))",
        ],
        python=sys.executable,
    )
    code.wait(timeout=60)
    assert code.state == "succeeded", code.error
    assert code.result["path"] == vnetseg.__file__
    assert Path(code.result["cwd"]).name.startswith("vnetseg-run-")


def test_relative_paths_reach_the_child_as_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = PredictCommand(Path("in.nii"), Path("out.nii"), Path("m.pt"), reportPath=Path("r.json")).arguments()
    for value in (args[3], args[5], args[7], args[args.index("--report") + 1]):
        assert Path(value).is_absolute() and Path(value).parent == tmp_path


def test_python_executable_when_sys_executable_is_empty(monkeypatch):
    from VNetSegmentationLib import process

    monkeypatch.setattr(sys, "executable", "")
    with pytest.raises(RuntimeError, match="cannot find a Python interpreter"):
        process.pythonExecutable()


@posix_only
def test_exiting_python_kills_a_run_still_going(tmp_path):
    """Slicer closing while a run goes on (no Cancel, no panel cleanup): the run's processes end with it."""
    import json
    import subprocess

    pid_file = tmp_path / "child.pid"
    launcher = make_launcher(tmp_path)
    code = f"""
import sys, time
sys.path[:0] = {[str(Path(__file__).resolve().parents[1] / "VNetSegmentation")]!r}
from VNetSegmentationLib.process import BackgroundProcess
proc = BackgroundProcess(["-c", "import time; time.sleep(120)"], python={launcher!r})
deadline = time.monotonic() + 60
while not open({str(pid_file)!r}, "a+").tell() and time.monotonic() < deadline:
    time.sleep(0.02)
print(proc.pid)
"""
    env = {**__import__("os").environ, "LAUNCHER_CHILD_PID": str(pid_file)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    launcher_pid, grandchild = int(done.stdout.split()[-1]), int(pid_file.read_text())
    assert wait_for(lambda: not alive(grandchild) and not alive(launcher_pid), 5), json.dumps(done.stderr[-500:])

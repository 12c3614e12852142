"""Temporary folders are removed after every run, also where a memory-mapped file cannot be deleted.

On Windows a file that is memory-mapped (nibabel maps an uncompressed .nii) cannot be deleted,
and ``shutil.rmtree(..., ignore_errors=True)`` silently leaves the folder behind. Here (Linux)
that rule is simulated: ``shutil.rmtree`` refuses to delete any file this process has mapped, as
listed in ``/proc/self/maps``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from slicer_helpers import one_torch_thread  # noqa: F401 (autouse fixture)

from VNetSegmentationLib import SegmentationOptions

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc/self/maps (Linux)")

REAL_RMTREE = shutil.rmtree


def mapped_files() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}


def windows_like_rmtree(path, ignore_errors=False, onerror=None, **kwargs):
    """rmtree that, like Windows, cannot delete a file while it is memory-mapped."""
    root = os.path.realpath(path)
    held = [p for p in mapped_files() if p.startswith(root + os.sep)]
    if not held:
        return REAL_RMTREE(path, ignore_errors=ignore_errors, **kwargs)
    if not ignore_errors:
        raise PermissionError(f"[WinError 32] the file is being used by another process: {held[0]}")
    for dirpath, _, files in os.walk(root):
        for name in files:
            file = os.path.join(dirpath, name)
            if file not in held:
                os.unlink(file)


@pytest.fixture
def windows_files(monkeypatch):
    monkeypatch.setattr(shutil, "rmtree", windows_like_rmtree)


def test_the_simulation_keeps_a_mapped_file(tmp_path, windows_files):
    """What the old code did: keep the mask as read (a memory map) while deleting its folder."""
    from vnetseg import io as vio

    folder = tmp_path / "run"
    folder.mkdir()
    vio.write_nifti(folder / "mask.nii", np.ones((4, 5, 6), dtype=np.uint8), np.eye(4))
    (folder / "report.json").write_text("{}")
    image = vio.read_image(folder / "mask.nii", dtype=None, allow_uniform=True)
    kept = np.asarray(image.array).astype(np.uint8, copy=False)
    assert str(folder / "mask.nii") in mapped_files()
    shutil.rmtree(folder, ignore_errors=True)
    assert (folder / "mask.nii").exists() and not (folder / "report.json").exists()
    del image, kept
    shutil.rmtree(folder)
    assert not folder.exists()


def test_successful_run_leaves_no_temporary_folder(ct_dir, tiny_model_file, env, logic, windows_files):
    volume = env.load_volume(ct_dir / "example_ct_sm.nii.gz", "sm-cleanup")
    run = logic.startSegmentation(volume, tiny_model_file, SegmentationOptions("cpu", 0.0))
    run.process.wait(timeout=300)
    assert run.state == "succeeded", run.error
    node, result = logic.finishSegmentation(run)
    assert not run.tempDir.exists(), "the mask must be copied out of its memory map before cleanup"
    assert not any(p.startswith(str(run.tempDir)) for p in mapped_files())
    assert node.GetSegmentation().GetSegment(result.segmentIDs[0]).GetName() == "Spleen"

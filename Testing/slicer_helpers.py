"""Helpers for the headless Slicer tests: a scene that behaves like the application's, volumes
loaded the way Slicer loads them, and comparisons of masks in physical (RAS) space.

Uses Slicer's real MRML classes from ``slicer-core``; nothing here is a mock.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
vtk = pytest.importorskip("vtk")


@dataclass
class SlicerScene:
    """A scene with the application, colour and volumes logics Slicer would have.

    The application logic must stay referenced for as long as the scene is used (module logics
    hold a raw pointer to it), so it is kept here.
    """

    scene: object
    app_logic: object
    colors: object
    volumes: object

    def load_volume(self, path: str | os.PathLike[str], name: str = "CT"):
        """Load a NIfTI/NRRD file, or a DICOM series folder, with vtkSlicerVolumesLogic like Slicer."""
        path = Path(path)
        files = vtk.vtkStringArray()
        if path.is_dir():
            # Slicer's DICOM module hands the volumes logic the series' files sorted by slice position
            ordered = dicom_files_sorted(path)
            for f in ordered:
                files.InsertNextValue(f)
            archetype = ordered[0]
        else:
            archetype = str(path)
        node = self.volumes.AddArchetypeVolume(archetype, name, 0, files)
        if node is None:
            raise RuntimeError(f"Slicer could not load {path}")
        return node

    def add_volume(self, array_ijk: np.ndarray, ijk_to_ras: np.ndarray, name: str = "volume"):
        """A scalar volume node from an (I, J, K) array and its IJK-to-RAS matrix (kept as given)."""
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(ijk_to_ras, dtype=float)))
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(np.asarray(array_ijk).transpose(2, 1, 0)))
        node.CreateDefaultDisplayNodes()
        return node

    def node_ids(self) -> list[str]:
        return [self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())]


def make_scene() -> SlicerScene:
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = app_logic.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", colors)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(scene)
    volumes.SetMRMLApplicationLogic(app_logic)
    return SlicerScene(scene, app_logic, colors, volumes)


def dicom_files_sorted(folder: Path) -> list[str]:
    """The files of the one DICOM series in ``folder``, sorted by position along the slice normal."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if len(series) != 1:
        raise ValueError(f"{folder} holds {len(series)} DICOM series, expected one")
    return list(reader.GetGDCMSeriesFileNames(str(folder), series[0]))


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def node_array_ijk(node) -> np.ndarray:
    return np.array(slicer.util.arrayFromVolume(node)).transpose(2, 1, 0)


def resample_nearest(
    mask: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], target_affine: np.ndarray
) -> np.ndarray:
    """``mask`` (on ``affine``) sampled at the voxel centres of the grid (``shape``, ``target_affine``).

    Voxels of the target grid that fall outside ``mask`` get -1, so a comparison notices them.
    """
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    homog = np.c_[ijk, np.ones(len(ijk))]
    src = homog @ (np.linalg.inv(affine) @ target_affine).T
    idx = np.rint(src[:, :3]).astype(int)
    inside = np.all((idx >= 0) & (idx < np.array(mask.shape)), axis=1)
    out = np.full(len(ijk), -1, dtype=np.int16)
    out[inside] = mask[tuple(idx[inside].T)]
    return out.reshape(shape)


def same_physical_grid(affine_a: np.ndarray, shape_a, affine_b: np.ndarray, shape_b) -> bool:
    """True when grid B's voxel centres are exactly grid A's voxel centres (any storage order)."""
    if sorted(shape_a) != sorted(shape_b):
        return False
    corners_b = np.array(
        [[i, j, k, 1.0] for i in (0, shape_b[0] - 1) for j in (0, shape_b[1] - 1) for k in (0, shape_b[2] - 1)]
    )
    in_a = corners_b @ (np.linalg.inv(affine_a) @ affine_b).T
    return bool(np.allclose(in_a[:, :3], np.rint(in_a[:, :3]), atol=1e-3))


def ras_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Centre of mass of a binary mask in RAS mm."""
    idx = np.argwhere(mask > 0)
    return (np.c_[idx, np.ones(len(idx))] @ affine.T)[:, :3].mean(axis=0)


@functools.cache
def reference_prediction(input_path: str, model_path: str, overlap: float, postprocess: bool):
    """The core's own answer for a file (``vnetseg.inference.predict_file``), computed once per session."""
    import tempfile

    from vnetseg.inference import InferenceOptions, predict_file

    out = Path(tempfile.mkdtemp(prefix="vnetseg-ref-")) / "mask.nii.gz"
    pred = predict_file(input_path, out, model_path, InferenceOptions("cpu", overlap, postprocess=postprocess))
    return pred, out


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    """One torch thread (import this fixture into a test module to use it).

    On a shared 2-core machine one thread is many times faster than two (0.06 s instead of 2 s per
    window of the tiny model when the cores are busy), and a background child inherits
    OMP_NUM_THREADS, so both processes compute the same numbers.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(before)

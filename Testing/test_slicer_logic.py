"""The Slicer Logic on real MRML nodes and real CTs: the segment it builds, against the core's own output.

Every CT is loaded the way Slicer loads it (vtkSlicerVolumesLogic; the DICOM series as the DICOM
module hands it over: its files sorted by slice position). The Logic's segment is compared with
``vnetseg.inference.predict_file`` on the same file, voxel by voxel in physical (RAS) space.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from slicer_helpers import (  # one_torch_thread: autouse fixture
    ijk_to_ras,
    node_array_ijk,
    one_torch_thread,  # noqa: F401
    ras_centroid,
    reference_prediction,
    resample_nearest,
    same_physical_grid,
    slicer,
    vtk,
)

from VNetSegmentationLib import SegmentationOptions, VNetSegmentationLogic, nodes
from VNetSegmentationLib.logic import PreRunCheckError

OVERLAP = 0.0  # fewer windows: the answers are compared with the core run the same way
SPLEEN_CATEGORY = "SCT^123037004^Anatomical Structure"
SPLEEN_TYPE = "SCT^78961009^Spleen"
CASES = ["example_ct_sm.nii.gz", "example_ct.nii.gz", "example_ct_dicom"]


def check_spleen_segment(seg, segment_id, volume):
    """Name, terminology, colour, reference geometry and 3D representation of the output."""
    segment = seg.GetSegmentation().GetSegment(segment_id)
    assert segment.GetName() == "Spleen"
    fields = segment.GetTerminology().split("~")
    assert fields[1] == SPLEEN_CATEGORY and fields[2] == SPLEEN_TYPE
    assert np.allclose(segment.GetColor(), np.array([157, 108, 162]) / 255.0, atol=1e-6)
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()) is volume
    # the segment's own labelmap lies on the volume's grid (no resampling needed to overlay it)
    image = slicer.vtkOrientedImageData()
    assert slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(seg, segment_id, image)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    assert np.allclose(slicer.util.arrayFromVTKMatrix(matrix), ijk_to_ras(volume), atol=1e-6)
    assert seg.GetSegmentation().ContainsRepresentation("Closed surface")


@pytest.mark.parametrize("case", CASES)
def test_segment_matches_core_in_physical_space(case, ct_dir, tiny_model_file, env, logic):
    path = ct_dir / case
    volume = env.load_volume(path, case.split(".")[0])
    voxels = node_array_ijk(volume).copy()
    seg, result = logic.segment(volume, tiny_model_file, SegmentationOptions("cpu", OVERLAP, postprocess=False))
    assert np.array_equal(node_array_ijk(volume), voxels), "the CT's voxels are read, never changed"

    assert result.segmentIDs and seg.GetID() == result.segmentationNodeID
    check_spleen_segment(seg, result.segmentIDs[0], volume)

    mask = nodes.segmentMask(seg, result.segmentIDs[0], volume)
    pred, _ = reference_prediction(str(path), str(tiny_model_file), OVERLAP, False)
    assert same_physical_grid(pred.affine, pred.labelmap.shape, ijk_to_ras(volume), mask.shape)
    core_on_node = resample_nearest(pred.labelmap, pred.affine, mask.shape, ijk_to_ras(volume))
    assert (core_on_node >= 0).all()
    assert 0.02 < mask.mean() < 0.98, "a degenerate mask would make this comparison meaningless"
    assert np.count_nonzero(core_on_node != mask) <= 1e-4 * mask.size
    assert result.volumeMl == pytest.approx(pred.volume_ml, rel=1e-3)
    # the closed surface (what the 3D view shows) sits where the voxels are
    surface = seg.GetClosedSurfaceInternalRepresentation(result.segmentIDs[0])
    assert surface.GetNumberOfPoints() > 0
    bounds = np.array(surface.GetBounds()).reshape(3, 2)
    centre = ras_centroid(mask, ijk_to_ras(volume))
    assert np.all(centre > bounds[:, 0]) and np.all(centre < bounds[:, 1])


def test_dicom_series_needs_sorted_files(ct_dir, env):
    """The first file alone gives ITK an unsorted series and a wrong slice spacing; sorted files give 2 mm."""
    folder = ct_dir / "example_ct_dicom"
    first = min(folder.iterdir())
    naive = env.volumes.AddArchetypeVolume(str(first), "naive", 0, vtk.vtkStringArray())
    sorted_node = env.load_volume(folder, "sorted")
    spacing = np.linalg.norm(ijk_to_ras(sorted_node)[:3, :3], axis=0)
    assert spacing == pytest.approx([0.9765625, 0.9765625, 2.0])
    assert naive is not None and abs(np.linalg.norm(ijk_to_ras(naive)[:3, 2]) - 2.0) > 0.1


def test_postprocessed_segment_and_seg_nrrd_round_trip(ct_dir, tiny_model_file, env, logic, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    path = ct_dir / "example_ct_sm.nii.gz"
    volume = env.load_volume(path, "sm")
    seg, result = logic.segment(volume, tiny_model_file, SegmentationOptions("cpu", OVERLAP, postprocess=True))
    pred, _ = reference_prediction(str(path), str(tiny_model_file), OVERLAP, True)
    mask = nodes.segmentMask(seg, result.segmentIDs[0], volume)
    assert np.array_equal(resample_nearest(pred.labelmap, pred.affine, mask.shape, ijk_to_ras(volume)), mask)
    # the panel lists the report's warnings and the run's notes (here the HU trim's), as the CLI does
    assert [w.message for w in result.warnings] == pred.report.warnings + pred.notes
    assert any(n.startswith("HU trim: ") for n in pred.notes)

    storage = slicer.vtkMRMLSegmentationStorageNode()
    env.scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "spleen.seg.nrrd"))
    assert storage.WriteData(seg)
    read = slicerio.read_segmentation(str(tmp_path / "spleen.seg.nrrd"))
    (info,) = read["segments"]
    assert info["name"] == "Spleen"
    assert info["terminology"]["category"] == SPLEEN_CATEGORY.split("^")
    assert info["terminology"]["type"] == SPLEEN_TYPE.split("^")
    assert np.allclose(info["color"], np.array([157, 108, 162]) / 255.0, atol=1e-5)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ read["ijkToLPS"]
    voxels = (read["voxels"] == info["labelValue"]).astype(np.uint8)
    back = resample_nearest(voxels, ras, mask.shape, ijk_to_ras(volume))
    assert np.array_equal(np.where(back < 0, 0, back), mask)
    assert int(voxels.sum()) == int(mask.sum())


def test_background_process_gives_the_same_segment(ct_dir, tiny_model_file, env, logic):
    volume = env.load_volume(ct_dir / "example_ct_sm.nii.gz", "sm-bg")
    options = SegmentationOptions("cpu", OVERLAP, postprocess=False)
    run = logic.startSegmentation(volume, tiny_model_file, options)
    events = run.process.wait(timeout=240)
    assert run.state == "succeeded", run.error
    fractions = [e["fraction"] for e in events if e.get("event") == "progress"]
    assert fractions and fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert any(e.get("event") == "done" for e in events)
    assert (run.fraction, run.message) == (1.0, "done")  # what the panel's progress bar and status line show
    seg, result = logic.finishSegmentation(run)
    assert not run.tempDir.exists(), "temporary files must be removed"
    assert result.background and result.device == "cpu"
    summary = result.summary().splitlines()
    assert summary[0] == f"Spleen volume: {result.volumeMl:.1f} mL" and summary[1].endswith("s on cpu")
    assert [line for line in summary if line.startswith("Warning: ")] == [
        f"Warning: {w.message}" for w in result.warnings
    ]
    check_spleen_segment(seg, result.segmentIDs[0], volume)
    here, _ = logic.segment(volume, tiny_model_file, options)
    a = nodes.segmentMask(seg, result.segmentIDs[0], volume)
    b = nodes.segmentMask(here, "Spleen", volume)
    assert 0.02 < a.mean() < 0.98
    assert np.count_nonzero(a != b) <= 1e-4 * a.size


def test_existing_output_is_replaced_only_when_asked(ct_dir, tiny_model_file, env, logic):
    volume = env.load_volume(ct_dir / "example_ct_sm.nii.gz", "sm-out")
    shape = nodes.volumeShape(volume)
    output = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "corrected")
    output.CreateDefaultDisplayNodes()
    from vnetseg.checkpoint import Label

    liver = np.zeros(shape, np.uint8)
    liver[60:90, 30:60, 5:20] = 1
    spleen = np.zeros(shape, np.uint8)
    spleen[10:20, 10:20, 10:20] = 1
    nodes.fillSegments(output, volume, liver * 2 + spleen, [Label(2, "Liver"), Label(1, "Spleen")])
    output.GetSegmentation().CollapseBinaryLabelmaps(False)  # one shared layer, as the Segment Editor leaves it
    assert output.GetSegmentation().GetNumberOfLayers() == 1
    before = nodes.segmentMask(output, "Spleen", volume).copy()
    assert np.array_equal(before, spleen) and np.array_equal(nodes.segmentMask(output, "Liver", volume), liver)
    ids_before = env.node_ids()

    options = SegmentationOptions("cpu", OVERLAP, postprocess=True)
    with pytest.raises(FileExistsError, match="already has a segment named Spleen"):
        logic.segment(volume, tiny_model_file, options, outputSegmentation=output)
    assert np.array_equal(nodes.segmentMask(output, "Spleen", volume), before)

    seg, _ = logic.segment(volume, tiny_model_file, options, outputSegmentation=output, replace=True)
    assert seg is output and env.node_ids() == ids_before
    assert output.GetSegmentation().GetNumberOfSegments() == 2
    assert np.array_equal(nodes.segmentMask(output, "Liver", volume), liver)
    pred, _ = reference_prediction(str(ct_dir / "example_ct_sm.nii.gz"), str(tiny_model_file), OVERLAP, True)
    assert np.array_equal(nodes.segmentMask(output, "Spleen", volume), pred.labelmap)
    check_spleen_segment(output, "Spleen", volume)


def test_logic_uses_slicer_mrmlscene_and_installed_model_by_name(ct_dir, tiny_model_file, env, tmp_path, monkeypatch):
    monkeypatch.setattr(slicer, "mrmlScene", env.scene, raising=False)
    logic = VNetSegmentationLogic(modelFolder=tmp_path / "models", includeShippedModels=False)
    entry = logic.importModel(tiny_model_file)
    volume = env.load_volume(ct_dir / "example_ct_sm.nii.gz", "sm-default")
    seg, result = logic.segment(volume, entry.name, SegmentationOptions("cpu", OVERLAP))
    assert env.scene.GetNodeByID(result.segmentationNodeID) is seg
    assert result.modelName == entry.name
    assert logic.getParameterNode() is env.scene.GetSingletonNode("VNetSegmentation", "vtkMRMLScriptedModuleNode")


def test_missing_volume_is_a_clear_error(tiny_model_file, env, logic):
    ids = env.node_ids()
    with pytest.raises(PreRunCheckError, match="No input volume"):
        logic.segment(None, tiny_model_file)
    with pytest.raises(ValueError, match="No segmentation model is installed"):
        logic.segment(env.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"), "")
    assert env.node_ids()[: len(ids)] == ids


def test_without_torch_the_panel_says_so_and_nothing_imports_it(ct_dir, tiny_model_file, tmp_path):
    """In a Python where torch cannot be imported: the Lib still imports, checks say what to do."""
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    code = f"""
import json, sys
sys.modules["torch"] = None  # torch is not installed here
sys.path[:0] = [{str(repo / "VNetSegmentation")!r}, {str(repo / "Testing")!r}]
from VNetSegmentationLib import PreRunCheckError, VNetSegmentationLogic
from slicer_helpers import make_scene
env = make_scene()
ct = env.load_volume({str(ct_dir / "example_ct_sm.nii.gz")!r})
logic = VNetSegmentationLogic(env.scene, {str(tmp_path / "models")!r}, includeShippedModels=False)
codes = [m.code for m in logic.preRunChecks(ct, {str(tiny_model_file)!r})]
out = {{"status": logic.torchStatus().installed, "codes": codes}}
try:
    logic.segment(ct, {str(tiny_model_file)!r})
except PreRunCheckError as exc:
    out["error"] = str(exc)
out["nodes"] = env.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["status"] is False and out["codes"] == ["torchMissing"] and out["nodes"] == 0
    assert "PyTorch is not installed" in out["error"] and "Install PyTorch" in out["error"]


def test_no_torch_message_and_status():
    from VNetSegmentationLib.environment import TORCH_MISSING, deviceLabels, torchStatus

    status = torchStatus()
    assert status.installed and status.version  # this environment has torch
    assert "Install PyTorch" in TORCH_MISSING
    labels = deviceLabels({"cuda": [], "cudaTotalBytes": 0, "mps": False})
    assert labels["gpu"] == "GPU (none detected)" and "CPU" in labels["auto"]
    assert deviceLabels({"cuda": ["NVIDIA H100"], "mps": False})["auto"] == "Auto: GPU (NVIDIA H100)"
    assert deviceLabels({})["auto"] == "Auto (PyTorch not installed)"


def test_vnetseg_core_is_importable_from_module_folder():
    """The module folder (what Slicer puts on sys.path) holds both the Lib and the core."""
    import vnetseg
    import VNetSegmentationLib

    assert Path(vnetseg.__file__).parent.parent == Path(VNetSegmentationLib.__file__).parent.parent


def test_mode_reaches_the_core_in_both_paths(ct_dir, tiny_model_file, env, logic):
    """The tiny model has no locator: the core refuses "fast" mode, here and in the background process."""
    volume = env.load_volume(ct_dir / "example_ct_sm.nii.gz", "sm-mode")
    before = env.node_ids()
    with pytest.raises(ValueError, match="fast needs a model file"):
        logic.segment(volume, tiny_model_file, SegmentationOptions("cpu", mode="fast"))
    with pytest.raises(RuntimeError, match="fast needs a model file"):
        logic.segment(volume, tiny_model_file, SegmentationOptions("cpu", mode="fast"), background=True, timeout=120)
    assert env.node_ids() == before
    with pytest.raises(ValueError, match="mode must be"):
        SegmentationOptions(mode="quick")


@pytest.mark.parametrize("background", [False, True])
def test_no_spleen_in_view_leaves_the_scene_as_it_was_and_says_so(ct_dir, blind_model_file, env, logic, background):
    """"No spleen found in the field of view" is an answer: no empty or replaced segment, a clear summary."""
    volume = env.load_volume(ct_dir / "example_ct_sm.nii.gz", f"sm-none-{background}")
    output = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"mine-{background}")
    output.CreateDefaultDisplayNodes()
    from vnetseg.checkpoint import Label

    mine = np.zeros(nodes.volumeShape(volume), np.uint8)
    mine[10:20, 10:20, 10:20] = 1
    nodes.fillSegments(output, volume, mine, [Label(1, "Spleen")])
    ids_before = env.node_ids()
    for mode in ("fast", "full"):
        options = SegmentationOptions("cpu", OVERLAP, postprocess=True, mode=mode)
        seg, result = logic.segment(volume, blind_model_file, options, outputSegmentation=output, replace=True,
                                    background=background)
        assert seg is None and not result.found and result.segmentIDs == [] and result.volumeMl == 0.0
        assert result.message.startswith("no spleen found in the field of view")
        assert result.background == background
        first = result.summary().splitlines()[0]
        assert first.startswith("No spleen found in the field of view") and "nothing was added" in first
        # example_ct_sm reaches 90 mm head to foot: too little for "no spleen" to be sure, and the panel says so
        assert [w.code for w in result.warnings].count("thinView") == 1
        assert "Warning: the CT covers only 90 mm head to foot" in result.summary()
        assert env.node_ids() == ids_before  # no new node
        assert np.array_equal(nodes.segmentMask(output, "Spleen", volume), mine)  # the user's segment is kept

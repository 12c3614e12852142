"""The "Spleen probability" volume on real MRML nodes (slicer-core): the CT's geometry, the core's numbers, shown over the CT."""

from __future__ import annotations

import numpy as np
import pytest
from slicer_helpers import ijk_to_ras, node_array_ijk, one_torch_thread, slicer  # noqa: F401
from test_io import make_affine

from vnetseg.inference import InferenceOptions, predict_volume
from VNetSegmentationLib import SegmentationOptions, nodes, probability

OVERLAP = 0.0


def _volume(env, ct_dir, kind: str, name: str):
    """The CT as Slicer loads it (a RAS NIfTI file), or its voxels under an LPS or an oblique, left-handed matrix."""
    sm = env.load_volume(ct_dir / "example_ct_sm.nii.gz", name)
    if kind == "ras":
        return sm
    return env.add_volume(node_array_ijk(sm), make_affine(kind, spacing=(3.0, 3.0, 3.0)), f"{name}-{kind}")


@pytest.mark.parametrize(("kind", "background"), [("ras", False), ("LPS", False), ("oblique_left_handed", False),
                                                  ("oblique_left_handed", True)])
def test_probability_volume_has_the_cts_geometry_and_the_cores_values(ct_dir, tiny_model_file, env, logic, kind, background):
    transform = env.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", f"moved-{kind}-{background}")
    name = kind
    volume = _volume(env, ct_dir, kind, f"{kind}-{background}")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    options = SegmentationOptions("cpu", OVERLAP, postprocess=False, probabilityMap=True)
    seg, result = logic.segment(volume, tiny_model_file, options, background=background)
    node = env.scene.GetNodeByID(result.probabilityNodeID)
    assert node is not None and node.IsA("vtkMRMLScalarVolumeNode") and node.GetName().startswith("Spleen probability")
    # the CT's own grid: same voxel count, same IJK-to-RAS matrix, same parent transform
    assert nodes.volumeShape(node) == nodes.volumeShape(volume), name
    np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras(volume), atol=1e-6, err_msg=name)
    assert node.GetTransformNodeID() == transform.GetID()
    assert node.GetAttribute(probability.COVERS_ATTRIBUTE) == result.probabilityCovers == "volume"
    values = node_array_ijk(node)
    assert values.dtype == np.float32 and 0.0 <= values.min() and values.max() <= 1.0
    # the core's map for the node's own voxels, and the segment is that map above 0.5
    core = predict_volume(nodes.imageFromVolumeNode(volume), *_tiny(tiny_model_file),
                          InferenceOptions("cpu", OVERLAP, postprocess=False, probability="float32"))
    np.testing.assert_allclose(values, core.probability, atol=1e-5, err_msg=name)
    mask = nodes.segmentMask(seg, result.segmentIDs[0], volume)
    assert 0.02 < mask.mean() < 0.98
    assert np.count_nonzero((values > 0.5) != (mask > 0)) <= 1e-4 * mask.size, name
    # shown with the module's colour table, 0-1, near-zero voxels transparent
    display = node.GetDisplayNode()
    assert display.GetColorNodeID() == probability.probabilityColorNode(env.scene).GetID()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(probability.SHOWN_FROM)
    # the confidence reaches the result and its summary
    assert result.confidence is not None and set(result.confidence) >= {"mean_probability", "uncertain_share", "low"}
    assert core.confidence is not None
    assert result.confidence["mean_probability"] == pytest.approx(core.confidence.mean_probability, abs=1e-3)
    text = result.summary()
    assert "Confidence: mean probability" in text and "Probability map: added" in text


def _tiny(path):
    from vnetseg.checkpoint import load_model

    return load_model(path)


def test_probability_is_shown_as_foreground_over_the_ct(ct_dir, tiny_model_file, env, logic):
    volume = env.load_volume(ct_dir / "example_ct_sm.nii.gz", "sm-shown")
    views = [env.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    _, result = logic.segment(volume, tiny_model_file, SegmentationOptions("cpu", OVERLAP, probabilityMap=True))
    node = env.scene.GetNodeByID(result.probabilityNodeID)
    assert logic.showProbability(volume, node) >= 3
    for view in views:
        assert view.GetBackgroundVolumeID() == volume.GetID() and view.GetForegroundVolumeID() == node.GetID()
        assert view.GetForegroundOpacity() == pytest.approx(probability.FOREGROUND_OPACITY)
    colors = probability.probabilityColorNode(env.scene)
    assert colors.GetNumberOfColors() == 256 and probability.probabilityColorNode(env.scene) is colors  # made once
    low, high = [0.0] * 4, [0.0] * 4
    colors.GetColor(0, low)
    colors.GetColor(255, high)
    assert sum(high[:3]) > 2 * sum(low[:3])  # dark at 0, bright at 1


def test_no_probability_volume_unless_asked_or_when_no_spleen_is_in_view(ct_dir, tiny_model_file, blind_model_file, env, logic):
    volume = env.load_volume(ct_dir / "example_ct_sm.nii.gz", "sm-off")
    assert SegmentationOptions().probabilityMap is False
    before = env.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    _, result = logic.segment(volume, tiny_model_file, SegmentationOptions("cpu", OVERLAP))
    assert result.probabilityNodeID == "" and env.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == before
    assert result.confidence is not None  # the confidence comes without the map
    ids = [env.scene.GetNthNode(i).GetID() for i in range(env.scene.GetNumberOfNodes())]
    for background in (False, True):
        seg, none = logic.segment(volume, blind_model_file, SegmentationOptions("cpu", OVERLAP, probabilityMap=True),
                                  background=background)
        assert seg is None and not none.found and none.probabilityNodeID == "" and none.confidence is None
        assert [env.scene.GetNthNode(i).GetID() for i in range(env.scene.GetNumberOfNodes())] == ids


def test_a_map_off_the_cts_grid_is_refused(ct_dir, env, tmp_path):
    from vnetseg.io import write_nifti

    volume = env.load_volume(ct_dir / "example_ct_sm.nii.gz", "sm-refuse")
    shape = nodes.volumeShape(volume)
    with pytest.raises(ValueError, match="differs from the volume's"):
        probability.addProbabilityNode(env.scene, volume, np.zeros((4, 4, 4), np.float32), "volume")
    moved = ijk_to_ras(volume).copy()
    moved[0, 3] += 5.0
    path = write_nifti(tmp_path / "p.nii", np.zeros(shape, np.float32), moved)
    with pytest.raises(RuntimeError, match="does not lie on the CT's grid"):
        probability.readProbability(path, volume)


def test_the_low_confidence_warning_is_tagged_and_shown_in_the_summary():
    from vnetseg.confidence import Confidence, low_confidence_warning
    from VNetSegmentationLib import checks
    from VNetSegmentationLib.runs import SegmentationResult

    c = Confidence(0.71, 0.42, 5000, True)
    messages = checks.warningsFromTexts([low_confidence_warning(c)])
    assert [m.code for m in messages] == ["lowConfidence"]
    result = SegmentationResult("id", ["Spleen"], 150.0, 3.0, "cpu", warnings=messages, confidence=c.as_dict())
    text = result.summary()
    assert "Confidence: mean probability 0.71 inside the mask, 42.0 % of the organ uncertain (0.3-0.7) - LOW" in text
    assert "Warning: low confidence: check the result" in text

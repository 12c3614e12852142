"""The shipped model through the panel's path: listed, its card shown, run in the background process
on the real DICOM series, and the Spleen segment lands on the spleen in physical space.

The reference is the TotalSegmentator pseudo-label of that series (stored LAS, so it is compared
in RAS space, not voxel by voxel). Skipped only while no model is shipped in vnetseg/weights.
"""

from __future__ import annotations

import numpy as np
import pytest
from slicer_helpers import ijk_to_ras, make_scene, one_torch_thread, resample_nearest  # noqa: F401 (autouse)

from VNetSegmentationLib import SegmentationOptions, VNetSegmentationLogic, nodes


@pytest.fixture(scope="module")
def shipped_entry():
    from vnetseg.registry import default_model

    entry = default_model()
    if entry is None:
        pytest.skip("no model is shipped in VNetSegmentation/vnetseg/weights yet")
    return entry


def test_shipped_model_segments_the_spleen_of_the_dicom_series(shipped_entry, ct_dir, tmp_path):
    nib = pytest.importorskip("nibabel")
    from vnetseg.postprocess import dice

    env = make_scene()
    logic = VNetSegmentationLogic(env.scene, tmp_path / "models")
    listed = [e for e in logic.listModels() if e.source == "shipped"]
    assert listed and listed[0].name == shipped_entry.name and listed[0].sha256 == shipped_entry.sha256
    card = logic.modelCardText(listed[0].name)
    assert "random weights" not in card and "Trained on: not recorded" not in card

    volume = env.load_volume(ct_dir / "example_ct_dicom", "dicom")
    assert logic.preRunChecks(volume, listed[0].name, SegmentationOptions("cpu")) == []
    seg, result = logic.segment(volume, listed[0].name, SegmentationOptions("cpu"), background=True, timeout=600)
    mask = nodes.segmentMask(seg, result.segmentIDs[0], volume)

    reference = nib.load(str(ct_dir / "example_ct_dicom_multilabel_v2.nii.gz"))
    spleen = (np.asarray(reference.dataobj) == 1).astype(np.uint8)
    on_node = resample_nearest(spleen, reference.affine, mask.shape, ijk_to_ras(volume))
    assert (on_node >= 0).all(), "the reference covers the same physical grid"
    score = dice(mask > 0, on_node > 0)
    assert score > 0.7, f"Dice {score:.3f} against the pseudo-label"
    reference_ml = float(on_node.sum()) * abs(np.linalg.det(ijk_to_ras(volume)[:3, :3])) / 1000.0
    assert result.volumeMl == pytest.approx(reference_ml, rel=0.35)
    assert result.background and result.modelName == shipped_entry.name


@pytest.mark.parametrize("background", [False, True])
def test_smallest_spleen_in_view_reaches_the_core_in_both_paths(shipped_entry, ct_dir, tmp_path, background):
    """The panel's "Smallest spleen in view": the whole-CT view locates about 227 mL on example_ct_sm (90 mm of
    P1), so a 300 mL floor answers "no spleen" with both numbers in the summary and adds nothing to the scene,
    and a 5 mL floor (the README's measured alternative) still finds the same spleen as the default."""
    env = make_scene()
    logic = VNetSegmentationLogic(env.scene, tmp_path / "models")
    volume = env.load_volume(ct_dir / "example_ct_sm.nii.gz", f"sm-floor-{background}")
    before = env.node_ids()
    seg, result = logic.segment(volume, shipped_entry.name, SegmentationOptions("cpu", minLocatedMl=300.0),
                                background=background, timeout=600)
    assert seg is None and not result.found and env.node_ids() == before
    assert result.message.startswith("no spleen found in the field of view (the whole-CT view's best candidate is")
    assert result.message.endswith("mL, under 300 mL)")
    located = float(result.message.split("best candidate is ")[1].split(" mL")[0])
    assert 150.0 < located < 300.0, result.message
    assert result.summary().splitlines()[0].startswith("No spleen found in the field of view")

    seg, low = logic.segment(volume, shipped_entry.name, SegmentationOptions("cpu", minLocatedMl=5.0),
                             background=background, timeout=600)
    seg_default, default = logic.segment(volume, shipped_entry.name, SegmentationOptions("cpu"),
                                         background=background, timeout=600)
    assert low.found and default.found
    assert np.array_equal(nodes.segmentMask(seg, low.segmentIDs[0], volume),
                          nodes.segmentMask(seg_default, default.segmentIDs[0], volume))
    assert low.volumeMl == pytest.approx(default.volumeMl) and low.volumeMl > 150.0

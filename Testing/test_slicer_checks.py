"""Each pre-run check and post-run warning fires on its trigger, and not on a normal CT.

Triggers are real volume and segmentation nodes made from the real CT: rescaled to MR-like values,
one slice, a thin slab, a large volume against the memory that is free; masks that are empty,
too small, too large, cut by the field of view, or in two pieces. The "normal" case is the real CT
padded by a few slices so its whole (pseudo-labelled) spleen lies inside the image.
"""

from __future__ import annotations

import numpy as np
import pytest
from slicer_helpers import ijk_to_ras, make_scene, node_array_ijk, slicer

from vnetseg.checkpoint import SPLEEN_LABELS, Preprocessing
from VNetSegmentationLib import PreRunCheckError, SegmentationOptions, VNetSegmentationLogic, checks, nodes


@pytest.fixture(scope="module")
def env():
    return make_scene()


@pytest.fixture(scope="module")
def logic(env, tmp_path_factory):
    return VNetSegmentationLogic(env.scene, tmp_path_factory.mktemp("models"), includeShippedModels=False)


@pytest.fixture(scope="module")
def ct(env, ct_dir):
    return env.load_volume(ct_dir / "example_ct_sm.nii.gz", "sm")


@pytest.fixture(scope="module")
def spleen_sm(ct_dir):
    nib = pytest.importorskip("nibabel")
    return (np.asarray(nib.load(str(ct_dir / "example_ct_sm_multilabel_v2.nii.gz")).dataobj) == 1).astype(np.uint8)


@pytest.fixture(scope="module")
def padded(env, ct, spleen_sm):
    """The real CT with 4 slices repeated below and above: the whole spleen is inside the image."""
    array = np.pad(node_array_ijk(ct), ((0, 0), (0, 0), (4, 4)), mode="edge")
    affine = ijk_to_ras(ct).copy()
    affine[:3, 3] = (affine @ [0, 0, -4, 1])[:3]
    volume = env.add_volume(array, affine, "padded")
    return volume, np.pad(spleen_sm, ((0, 0), (0, 0), (4, 4)))


def codes(messages):
    return [m.code for m in messages]


# ------------------------------------------------------------------------------ before a run
def test_normal_cts_pass_every_check(env, ct_dir, logic, ct, padded, tiny_model_file):
    dicom = env.load_volume(ct_dir / "example_ct_dicom", "dicom")
    full = env.load_volume(ct_dir / "example_ct.nii.gz", "full")
    for volume in (ct, padded[0], dicom, full):
        assert logic.preRunChecks(volume, tiny_model_file, SegmentationOptions("cpu")) == [], volume.GetName()


def test_no_volume(env, logic, tiny_model_file):
    assert codes(logic.preRunChecks(None, tiny_model_file)) == ["noVolume"]
    empty = env.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no image data")
    (message,) = logic.preRunChecks(empty, tiny_model_file)
    assert message.code == "noVolume" and message.level == "error" and "load an abdominal CT" in message.message


def test_colour_volume_is_refused(env, logic, ct, tiny_model_file):
    rgb = np.repeat(node_array_ijk(ct)[..., None], 3, axis=-1)
    node = env.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras(ct)))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(rgb.transpose(2, 1, 0, 3)))
    (message,) = logic.preRunChecks(node, tiny_model_file)
    assert message.code == "notScalar" and message.level == "error" and "3 components" in message.message


@pytest.mark.parametrize("kind", ["MR-like 0..255", "unscaled raw (+1024)"])
def test_not_ct_like(kind, env, logic, ct, tiny_model_file):
    hu = node_array_ijk(ct).astype(np.float32)
    array = (
        np.clip((hu + 1024) / 16, 0, 255).astype(np.uint8) if kind.startswith("MR") else (hu + 1024).astype(np.uint16)
    )
    volume = env.add_volume(array, ijk_to_ras(ct), kind)
    (message,) = logic.preRunChecks(volume, tiny_model_file, SegmentationOptions("cpu"))
    assert message.code == "notCT" and message.level == "warning" and "Hounsfield" in message.message


def test_two_d_volume_is_refused_before_anything_runs(env, logic, ct, tiny_model_file):
    volume = env.add_volume(node_array_ijk(ct)[:, :, 15:16], ijk_to_ras(ct), "one slice")
    (message,) = logic.preRunChecks(volume, tiny_model_file)
    assert message.code == "twoD" and message.level == "error"
    before = [env.scene.GetNthNode(i).GetID() for i in range(env.scene.GetNumberOfNodes())]
    with pytest.raises(PreRunCheckError, match="2D"):
        logic.segment(volume, tiny_model_file, SegmentationOptions("cpu"))
    assert [env.scene.GetNthNode(i).GetID() for i in range(env.scene.GetNumberOfNodes())] == before


def test_thin_slab_is_a_warning(env, logic, ct, tiny_model_file):
    volume = env.add_volume(node_array_ijk(ct)[:, :, 10:15], ijk_to_ras(ct), "five slices")
    (message,) = logic.preRunChecks(volume, tiny_model_file, SegmentationOptions("cpu"))
    assert message.code == "thin" and message.level == "warning" and "5 slices" in message.message


def test_volume_too_large_for_free_memory(env, logic, ct, tiny_model_file):
    needed = checks.estimateMemoryBytes(
        nodes.volumeShape(ct),
        [3.0, 3.0, 3.0],
        Preprocessing(target_spacing=(3.0, 3.0, 3.0), patch_size=(32, 32, 32)),
        2,
    )
    (message,) = logic.preRunChecks(ct, tiny_model_file, SegmentationOptions("cpu"), availableBytes=needed // 2)
    assert message.code == "memory" and "crop the volume" in message.message
    gpu = checks.checkMemory(10 << 30, 4 << 30, "cuda")
    assert "choose CPU" in gpu.message and "GPU memory" in gpu.message
    assert logic.preRunChecks(ct, tiny_model_file, SegmentationOptions("cpu"), availableBytes=needed * 4) == []


def test_memory_estimate_known_answer():
    pre = Preprocessing(target_spacing=(3.0, 3.0, 3.0), patch_size=(32, 32, 32))
    # 100^3 input voxels at 3 mm = 100^3 model voxels; 2 output channels
    assert checks.estimateMemoryBytes((100, 100, 100), (3.0, 3.0, 3.0), pre, 2) == 15 * 10**6 + 4 * 10**6 * 4
    # 1.5 mm input: 8x fewer model voxels
    assert checks.estimateMemoryBytes((100, 100, 100), (1.5, 1.5, 1.5), pre, 2) == 15 * 10**6 + 4 * 50**3 * 4


# ------------------------------------------------------------------------------- after a run
def segmentation_with(env, volume, mask, name):
    return nodes.createSegmentationNode(
        env.scene, volume, mask.astype(np.uint8), SPLEEN_LABELS, name, closedSurface=False
    )


def ball(shape, centre, radius_vox):
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    return (np.linalg.norm(grid - np.array(centre), axis=-1) <= radius_vox).astype(np.uint8)


def test_normal_spleen_gives_no_warning(env, logic, padded):
    volume, spleen = padded
    seg = segmentation_with(env, volume, spleen, "normal")
    report, messages = logic.qualityWarnings(seg, volume)
    assert messages == [] and report.volume_ml == pytest.approx(255.2, abs=0.1)


def test_empty_result(env, logic, padded):
    volume, spleen = padded
    seg = segmentation_with(env, volume, np.zeros_like(spleen), "empty")
    assert codes(logic.qualityWarnings(seg, volume)[1]) == ["empty"]


@pytest.mark.parametrize(
    "box,expected_ml",
    [((slice(60, 63), slice(50, 53), slice(18, 21)), 0.729), ((slice(30, 80), slice(25, 75), slice(4, 34)), 2025.0)],
)
def test_implausible_volume(box, expected_ml, env, logic, padded):
    volume, spleen = padded
    mask = np.zeros_like(spleen)
    mask[box] = 1
    seg = segmentation_with(env, volume, mask, f"{expected_ml} mL")
    report, messages = logic.qualityWarnings(seg, volume)
    assert codes(messages) == ["implausibleVolume"]
    assert report.volume_ml == pytest.approx(expected_ml, rel=1e-3)


def test_spleen_cut_by_the_field_of_view(env, logic, ct, spleen_sm):
    seg = segmentation_with(env, ct, spleen_sm, "cut")
    assert codes(logic.qualityWarnings(seg, ct)[1]) == ["touchesEdge"]


def test_two_sizeable_parts(env, logic, padded):
    volume, spleen = padded
    mask = spleen | ball(spleen.shape, (95, 70, 19), 7)  # about 39 mL, far from the spleen
    seg = segmentation_with(env, volume, mask, "two parts")
    assert codes(logic.qualityWarnings(seg, volume)[1]) == ["multipleComponents"]


def test_core_warning_texts_get_their_codes():
    from vnetseg.postprocess import quality_report

    empty = np.zeros((8, 8, 8), bool)
    edge = np.zeros((8, 8, 8), bool)
    edge[0:4, 2:6, 2:6] = True
    texts = quality_report(empty, empty, 1.0).warnings + quality_report(edge, edge, 1.0).warnings
    assert [checks.warningCode(t) for t in texts] == ["touchesEdge"]  # empty is an answer, not a warning
    assert [w.code for w in checks.postRunWarnings(empty, 1.0)[1]] == ["empty"]  # but an emptied segment is
    assert checks.warningCode("GPU out of memory: retried with batch size 2") == "other"

"""'Export for training': the CT and the current (corrected) mask become an MSD case that training/ reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from slicer_helpers import ijk_to_ras, node_array_ijk

import training.data as training_data
from vnetseg.checkpoint import SPLEEN_LABELS, Label
from VNetSegmentationLib import nodes
from VNetSegmentationLib.export import caseNameFrom


@pytest.fixture(scope="module")
def case(env, ct_dir):
    """The real CT with its pseudo-label spleen, then 'corrected': two slices erased, a blob added,
    and the segment sharing one labelmap layer with a second segment, as the Segment Editor leaves it."""
    nib = pytest.importorskip("nibabel")
    ct = env.load_volume(ct_dir / "example_ct_sm.nii.gz", "patient 7 (CT)")
    spleen = (np.asarray(nib.load(str(ct_dir / "example_ct_sm_multilabel_v2.nii.gz")).dataobj) == 1).astype(np.uint8)
    seg = nodes.createSegmentationNode(env.scene, ct, spleen, SPLEEN_LABELS, "auto", closedSurface=False)
    corrected = spleen.copy()
    corrected[:, :, 0:2] = 0
    corrected[20:24, 30:34, 10:14] = 1
    nodes.fillSegments(seg, ct, corrected, SPLEEN_LABELS)  # what an edit in the Segment Editor leaves
    other = np.zeros_like(spleen)
    other[70:100, 40:70, 5:25] = 1
    nodes.fillSegments(seg, ct, other * 2, [Label(2, "Liver")])
    seg.GetSegmentation().CollapseBinaryLabelmaps(False)
    assert seg.GetSegmentation().GetNumberOfLayers() == 1
    return ct, seg, corrected


def test_export_writes_an_msd_case_training_reads(case, logic, tmp_path):
    ct, seg, corrected = case
    result = logic.exportForTraining(ct, seg, tmp_path / "Task_corrected")
    assert result.caseName == "patient_7_CT" and not result.replaced
    dataset = training_data.read_msd(tmp_path / "Task_corrected")
    assert dataset.labels == {0: "background", 1: "spleen"}
    assert [c.name for c in dataset.cases] == ["patient_7_CT"]
    image, label = training_data.load_case(dataset.cases[0], dataset.labels)
    assert np.allclose(image.affine, ijk_to_ras(ct), atol=1e-4)
    assert np.array_equal(image.array, node_array_ijk(ct).astype(np.float32))
    assert np.array_equal(label, corrected), "the exported label is the corrected mask"
    meta = json.loads((tmp_path / "Task_corrected" / "dataset.json").read_text())
    assert meta["numTraining"] == 1 and meta["modality"] == {"0": "CT"}
    assert meta["training"] == [{"image": "./imagesTr/patient_7_CT.nii.gz", "label": "./labelsTr/patient_7_CT.nii.gz"}]


def test_second_case_is_added_and_existing_case_is_never_silently_replaced(case, logic, tmp_path):
    ct, seg, corrected = case
    folder = tmp_path / "task"
    logic.exportForTraining(ct, seg, folder, "case_a")
    logic.exportForTraining(ct, seg, folder, "case_b")
    label_file = folder / "labelsTr" / "case_a.nii.gz"
    before = label_file.read_bytes()
    nodes.fillSegments(seg, ct, np.zeros_like(corrected), SPLEEN_LABELS)
    try:
        with pytest.raises(FileExistsError, match="case 'case_a' already exists"):
            logic.exportForTraining(ct, seg, folder, "case_a")
        assert label_file.read_bytes() == before
        result = logic.exportForTraining(ct, seg, folder, "case_a", overwrite=True)
        assert result.replaced and result.numTraining == 2
        dataset = training_data.read_msd(folder)
        assert sorted(c.name for c in dataset.cases) == ["case_a", "case_b"]
        _, label = training_data.load_case(next(c for c in dataset.cases if c.name == "case_a"), dataset.labels)
        assert label.sum() == 0
    finally:
        nodes.fillSegments(seg, ct, corrected, SPLEEN_LABELS)


def test_oblique_left_handed_volume_keeps_its_geometry(env, case, logic, tmp_path):
    ct, _, corrected = case
    affine = ijk_to_ras(ct) @ np.diag([1.0, 1.0, -1.0, 1.0])
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]) @ affine
    volume = env.add_volume(node_array_ijk(ct), affine, "oblique")
    seg = nodes.createSegmentationNode(env.scene, volume, corrected, SPLEEN_LABELS, "oblique seg", closedSurface=False)
    logic.exportForTraining(volume, seg, tmp_path / "t", "oblique")
    dataset = training_data.read_msd(tmp_path / "t")
    image, label = training_data.load_case(dataset.cases[0], dataset.labels)
    assert np.allclose(image.affine, affine, atol=1e-4) and np.array_equal(label, corrected)


def test_bad_requests_write_nothing(case, logic, tmp_path):
    ct, seg, _ = case
    with pytest.raises(ValueError, match="caseName"):
        logic.exportForTraining(ct, seg, tmp_path / "t", "../escape")
    with pytest.raises(ValueError, match="no segment named 'Kidney'"):
        logic.exportForTraining(ct, seg, tmp_path / "t", "x", segmentName="Kidney")
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        logic.exportForTraining(ct, seg, folder, "x")
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.json"]
    other = tmp_path / "liver_task"
    other.mkdir()
    (other / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}, "training": []}))
    with pytest.raises(ValueError, match="label 1 is not 'spleen'"):
        logic.exportForTraining(ct, seg, other, "x")
    assert not (tmp_path / "t").exists()


def test_case_name_from_node_name():
    assert caseNameFrom("  CT: 2024/01 abdomen ") == "CT_2024_01_abdomen"
    assert caseNameFrom("///") == "case"

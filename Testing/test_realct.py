"""Training subjects from the real CTs: label geometry, views in physical space, appearance, task folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from training.data import load_case, read_msd
from training.realct.anatomy import GROUP_NAMES, GROUPS_V1, GROUPS_V2, draw_tissues, group_table
from training.realct.augment import View, ViewSettings, draw_view, sample_view
from training.realct.build import pool_cases, write_pool, write_task
from training.realct.evaluate import anatomy_checks, hd95_mm, mask_metrics
from training.realct.sources import centroid_ras, label_onto, load_scans, pelvis_part
from training.realct.synth import group_map, group_means, rephase_real, synthesize
from vnetseg import io as vio

SPACING = (1.5, 1.5, 2.0)


@pytest.fixture(scope="module")
def scans(ct_dir):
    return {s.name: s for s in load_scans(ct_dir, ("p1_ct", "p2_dicom"))}


def test_label_tables_match_tissue_density_of_the_real_scans(scans) -> None:
    """Each group's median HU in the real CTs lies where its tissue belongs."""
    for scan in scans.values():
        means = group_means(scan.image.array, group_map(scan.labels, scan.version))

        def get(name: str, means: np.ndarray = means) -> float:
            return float(means[GROUP_NAMES.index(name)])

        assert get("bone") > 140 and -20 < get("muscle") < 80, scan.name
        assert 0 < get("spleen") < 150 and 0 < get("liver") < 150, scan.name
        assert np.isnan(get("lung")) or get("lung") < -600, scan.name  # P2's slab holds no lung
    assert all(v > 0 for values in (*GROUPS_V1.values(), *GROUPS_V2.values()) for v in values)
    assert group_table("v1")[1] == group_table("v2")[1] == GROUP_NAMES.index("spleen")
    with pytest.raises(ValueError, match="version must be"):
        group_table("v3")


def test_p2_label_map_is_brought_onto_the_dicom_grid_in_physical_space(scans) -> None:
    scan = scans["p2_dicom"]
    assert scan.labels.shape == scan.image.shape
    # the spleen pseudo-label covers spleen-dense voxels, on the patient's left (RAS -x)
    assert 40 < np.median(scan.image.array[scan.spleen]) < 160
    assert anatomy_checks(scan.spleen, scan.image)["patient_left"]
    shifted = vio.Image(scan.labels.astype(np.float32), scan.image.affine.copy())
    shifted.affine[0, 3] += 5.0
    with pytest.raises(ValueError, match="does not cover the image grid"):
        label_onto(shifted, scan.image)


def test_identity_view_reads_the_scan_in_place(scans) -> None:
    """No rotation, scale or displacement: the view is the scan resampled, the spleen keeps its volume and place."""
    scan = scans["p1_ct"]
    centre = centroid_ras(scan.spleen, scan.image.affine)
    view = View((120, 120, 80), np.eye(3), centre, None, "spleen")
    hu, labels = sample_view(scan, view, SPACING)
    affine = view.affine(SPACING)
    spleen = labels == 1
    assert abs(spleen.sum() * np.prod(SPACING) - scan.spleen.sum() * 27.0) < 0.05 * scan.spleen.sum() * 27.0
    assert np.linalg.norm(centroid_ras(spleen, affine) - centre) < 3.0
    assert hu.min() >= -1100 and 20 < np.median(hu[spleen]) < 60


def test_random_views_keep_the_spleen_on_the_patients_left_and_include_spleen_free_ones(scans) -> None:
    scan = scans["p1_ct"]
    rng = np.random.default_rng(3)
    sides, empty = [], 0
    for _ in range(6):
        view = draw_view(scan, rng, ViewSettings(mode_p=(0.5, 0.0, 0.5)))
        hu, labels = sample_view(scan, view, SPACING)
        spleen = labels == 1
        if view.mode == "away":
            empty += not spleen.any()
        if spleen.sum() > 1000:
            body = vio.Image(hu, view.affine(SPACING))
            sides.append(anatomy_checks(spleen, body)["patient_left"])
    assert sides and all(sides) and empty >= 1


def test_synthetic_ct_fills_structures_with_the_drawn_tissue_hu(scans) -> None:
    scan = scans["p2_dicom"]
    rng = np.random.default_rng(0)
    hu = scan.image.array[::2, ::2, :]
    groups = group_map(scan.labels[::2, ::2, :], scan.version)
    tissues = draw_tissues(rng, "arterial")
    out, text = synthesize(hu, groups, rng, tissues)
    s = GROUP_NAMES.index("spleen")
    inner = groups == s
    assert abs(np.median(out[inner]) - tissues.mean[s]) < 15 and "arterial" in text
    bone_inside = ndimage.binary_erosion(groups == GROUP_NAMES.index("bone"), np.ones((3, 3, 3)), iterations=2)
    assert bone_inside.sum() > 100 and np.array_equal(out[bone_inside], hu[bone_inside])  # bones stay real
    means = group_means(hu, groups)
    moved, _ = rephase_real(hu, groups, means, rng, tissues)
    assert abs(np.median(moved[inner]) - tissues.mean[s]) < 15


def test_pool_and_task_folders_train_ready(scans, tmp_path) -> None:
    subjects = write_pool(tmp_path, per_kind=1, seed=5, scans=[scans["p2_dicom"]], log=None)
    assert [s.name for s in subjects] == ["p2_real_000", "p2_syn_000"]
    again = write_pool(tmp_path, per_kind=1, seed=5, scans=[scans["p2_dicom"]], log=None)  # resumes, rewrites nothing
    assert [s.name for s in again] == ["p2_real_000", "p2_syn_000"]
    task = write_task(tmp_path / "task", pool_cases(tmp_path, subjects, ("P2",)), {}, "test")
    data = read_msd(task)
    assert data.case_names == ["p2_real_000", "p2_syn_000"] and data.labels == {0: "background", 1: "spleen"}
    image, label = load_case(data.case("p2_syn_000"), data.labels)
    assert np.allclose(image.spacing, SPACING) and set(np.unique(label)) <= {0, 1}
    assert json.loads((task / "splits.json").read_text()) == [{"train": ["p2_real_000", "p2_syn_000"], "val": []}]
    assert pool_cases(tmp_path, subjects, ("P1",)) == {}


def test_metrics_known_answers() -> None:
    image = vio.Image(np.zeros((40, 40, 20), np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    ref = np.zeros(image.shape, bool)
    ref[10:20, 10:20, 5:10] = True
    pred = np.roll(ref, 3, axis=0)  # shifted 3 mm along x
    m = mask_metrics(pred, ref, image)
    assert m["dice"] == pytest.approx(0.7) and m["volume_error_pct"] == 0.0 and m["reference_ml"] == 1.0
    assert hd95_mm(pred, ref, image.spacing) == pytest.approx(3.0, abs=0.01)
    assert np.isnan(hd95_mm(np.zeros_like(ref), ref, image.spacing))


def test_pelvis_part_keeps_physical_position(scans) -> None:
    scan = scans["p1_ct"]
    part = pelvis_part(scan, (10, 20))
    assert part.shape[2] == 10 and np.array_equal(part.array, scan.image.array[:, :, 10:20])
    assert np.allclose(part.affine @ [0, 0, 0, 1], scan.image.affine @ [0, 0, 10, 1])

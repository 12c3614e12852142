"""Training subjects from the real CTs: label geometry, views in physical space, appearance, task folders."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from training.data import UNKNOWN_LABEL, load_case, read_msd
from training.realct.anatomy import GROUP_NAMES, GROUPS_V1, GROUPS_V2, draw_tissues, group_table
from training.realct.augment import View, ViewSettings, draw_view, sample_view
from training.realct.build import (
    ORGAN_CLASSES,
    POOL_VIEWS,
    kinds_of,
    organ_map,
    pool_cases,
    read_pool_records,
    write_pool,
    write_task,
)
from training.realct.evaluate import anatomy_checks, hd95_mm, mask_metrics, misplaced
from training.realct.sources import (
    RANGE_END_GAPS_MM,
    centroid_ras,
    label_onto,
    load_scans,
    pelvis_part,
    range_end_parts,
    spleen_free_parts,
)
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
    assert [r["name"] for r in read_pool_records(tmp_path)] == ["p2_real_000", "p2_syn_000"]
    # the organ maps: the same spleen as the spleen mask, and the organs around it from the label map
    organ_file = tmp_path / "pool" / "organsTr" / "p2_real_000.nii.gz"
    organs = np.asarray(nib.load(str(organ_file)).dataobj)
    spleen = np.asarray(nib.load(str(tmp_path / "pool" / "labelsTr" / "p2_real_000.nii.gz")).dataobj)
    assert organs.shape == spleen.shape and np.array_equal(organs == 1, spleen == 1)
    assert {ORGAN_CLASSES.index("liver"), ORGAN_CLASSES.index("stomach")} <= set(np.unique(organs).tolist())
    # a pool written before organ maps existed gets them made again from each subject's seed, identical
    organ_file.unlink()
    write_pool(tmp_path, per_kind=1, seed=5, scans=[scans["p2_dicom"]], log=None)
    assert np.array_equal(np.asarray(nib.load(str(organ_file)).dataobj), organs)
    organ_task = write_task(tmp_path / "organs", pool_cases(tmp_path, subjects, ("P2",), "organsTr"), {}, "test",
                            ORGAN_CLASSES)
    data = read_msd(organ_task)
    assert data.labels == dict(enumerate(ORGAN_CLASSES))
    assert np.array_equal(load_case(data.case("p2_real_000"), data.labels)[1], organs)


def test_organ_map_known_answers() -> None:
    # TotalSegmentator v2 values: 1 spleen, 2/3 kidneys, 5 liver, 6 stomach, 18 small bowel, 20 colon,
    # 51 heart (not a class: background), 80 gluteus maximus (muscle), 25 a vertebra (background)
    labels = np.array([0, 1, 2, 3, 5, 6, 18, 20, 51, 80, 25], dtype=np.int16).reshape(1, 1, -1)
    expected = ["background", "spleen", "kidney", "kidney", "liver", "stomach", "bowel", "bowel", "background",
                "muscle", "background"]
    assert organ_map(labels, "v2").ravel().tolist() == [ORGAN_CLASSES.index(n) for n in expected]
    # a spleen-only reference says nothing about the rest: "not spleen, organ unknown"
    assert organ_map(np.array([[[0, 1, 0]]]), "spleen").ravel().tolist() == [UNKNOWN_LABEL, 1, UNKNOWN_LABEL]


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


def test_pelvis_parts_are_the_tabled_slices_and_refuse_a_table_that_cuts_the_spleen(scans, monkeypatch) -> None:
    from training.realct import sources

    scan = scans["p1_ct"]
    (part,) = sources.pelvis_parts(scan).values()
    assert np.array_equal(part.array, pelvis_part(scan).array) and np.array_equal(part.affine, pelvis_part(scan).affine)
    assert sources.pelvis_parts(scans["p2_dicom"]) == {}  # a 40 mm series through the spleen
    monkeypatch.setitem(sources.PELVIS_PARTS, "p1_ct", (0, scan.image.shape[2]))
    with pytest.raises(ValueError, match="p1_ct: the pelvis slices 0-111 hold reference spleen"):
        sources.pelvis_parts(scan)


@pytest.fixture(scope="module")
def chest_scan(ct_dir):
    """P5: a contrast chest CT from the neck base to the mid kidneys, with a spleen-only reference."""
    return load_scans(ct_dir, ("p5_lidc",))[0]


def test_tcia_scans_carry_spleen_only_references_on_their_own_grid(chest_scan) -> None:
    assert chest_scan.patient == "P5" and chest_scan.version == "spleen"
    assert set(np.unique(chest_scan.labels)) == {0, 1} and chest_scan.labels.shape == chest_scan.image.shape
    ml = chest_scan.spleen.sum() * chest_scan.image.voxel_volume_ml
    assert ml == pytest.approx(118.9, abs=0.5)  # the data README's volume
    assert kinds_of(chest_scan) == ("real",)  # no organ map: no synthetic CTs, no rephasing
    assert group_map(chest_scan.labels, "spleen").max() == GROUP_NAMES.index("spleen")


def test_spleen_free_parts_lie_where_they_were_cut_and_hold_no_spleen(chest_scan, scans) -> None:
    parts = spleen_free_parts(chest_scan, gap_mm=20.0)
    assert set(parts) == {"chest", "below"}
    k = np.flatnonzero(chest_scan.spleen.any(axis=(0, 1)))
    top_mm = (chest_scan.image.affine @ [0, 0, k.max(), 1])[2]
    bottom_mm = (chest_scan.image.affine @ [0, 0, k.min(), 1])[2]
    chest, below = parts["chest"], parts["below"]
    assert (chest.affine @ [0, 0, 0, 1])[2] >= top_mm + 20.0  # wholly above the spleen, 20 mm or more
    assert (below.affine @ [0, 0, below.shape[2] - 1, 1])[2] <= bottom_mm - 20.0
    first = round(np.linalg.solve(chest_scan.image.affine, chest.affine @ [0, 0, 0, 1])[2])
    assert np.array_equal(chest.array, chest_scan.image.array[:, :, first : first + chest.shape[2]])
    assert spleen_free_parts(scans["p2_dicom"]) == {}  # the 20-slice series has spleen in nearly every slice
    assert set(spleen_free_parts(scans["p1_ct"])) == {"below"}


def test_range_end_parts_end_the_scan_range_at_each_gap_beyond_the_spleen(chest_scan, scans) -> None:
    parts = range_end_parts(chest_scan)
    k = np.flatnonzero(chest_scan.spleen.any(axis=(0, 1)))
    step = chest_scan.image.affine[2, 2]  # 2.5 mm slices, superior is +k (RAS)
    top_mm, bottom_mm = ((chest_scan.image.affine @ [0, 0, i, 1])[2] for i in (k.max(), k.min()))
    for gap in RANGE_END_GAPS_MM:
        chest = parts[f"chest {gap:g} mm"]  # begins ``gap`` or more beyond the spleen's top, runs to the neck
        start = (chest.affine @ [0, 0, 0, 1])[2]
        empty = np.ceil(gap / step)  # whole slices between the spleen's last slice and the part
        assert start == pytest.approx(top_mm + (empty + 1) * step)
        assert chest.shape[2] == chest_scan.image.shape[2] - round(np.linalg.solve(chest_scan.image.affine, chest.affine @ [0, 0, 0, 1])[2])
        if f"below {gap:g} mm" in parts:  # ends ``gap`` under the spleen's bottom, begins at the CT's first slice
            below = parts[f"below {gap:g} mm"]
            end = (below.affine @ [0, 0, below.shape[2] - 1, 1])[2]
            assert end == pytest.approx(bottom_mm - (empty + 1) * step)
            assert np.array_equal(below.array, chest_scan.image.array[:, :, : below.shape[2]])
            assert below.shape[2] * step >= 45.0  # parts shorter than 45 mm are left out
    # P5's CT ends at the kidneys: 55 mm under the spleen at most, so its lower parts stop at 30 mm
    assert {p for p in parts if p.startswith("below")} == {"below 10 mm", "below 30 mm"}
    assert range_end_parts(scans["p2_dicom"]) == {}
    assert set(range_end_parts(scans["p1_ct"])) == {f"below {g:g} mm" for g in RANGE_END_GAPS_MM}


def test_away_views_of_a_chest_ct_hold_no_spleen(chest_scan) -> None:
    rng = np.random.default_rng(3)
    held = 0
    for _ in range(6):
        view = draw_view(chest_scan, rng, POOL_VIEWS, mode="away")
        if view.mode != "away":
            continue
        _hu, labels = sample_view(chest_scan, view, SPACING)
        assert not (labels == 1).any(), view
        held += 1
    assert held >= 4


def test_misplaced_volume_and_what_it_covers(scans) -> None:
    scan = scans["p1_ct"]
    liver = scan.labels == 5  # v1: liver
    assert misplaced(scan.spleen, scan) == {"misplaced_ml": 0.0, "misplaced_in": {}}
    far = misplaced(scan.spleen | liver, scan)
    # the liver lies more than 10 mm from the spleen nearly everywhere
    liver_ml = liver.sum() * scan.image.voxel_volume_ml
    assert 0.9 * liver_ml < far["misplaced_ml"] <= liver_ml + 0.05 and set(far["misplaced_in"]) == {"liver"}


def _recipe():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "make_spleen_model.py"
    spec = importlib.util.spec_from_file_location("make_spleen_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_multi_organ_locator_experiment_is_a_partial_label_config_and_never_bundled(capsys) -> None:
    recipe = _recipe()
    shipped, organ = recipe.locator_config(2), recipe.locator_config(2, organ=True)
    assert shipped.model.out_channels == 2 and shipped.partial_label == 0 and shipped.fg_classes == ()
    assert organ.model.out_channels == len(ORGAN_CLASSES) == 7
    assert organ.partial_label == UNKNOWN_LABEL == 255 and organ.fg_classes == (1,)
    assert organ.preprocessing == shipped.preprocessing and organ.fg_ratio == shipped.fg_ratio
    assert recipe.locator_refine_config(2, organ=True).partial_label == UNKNOWN_LABEL
    with pytest.raises(SystemExit) as exc:
        recipe.main(["--stage", "bundle", "--organ-locator"])
    assert exc.value.code == 2 and "bundle ships the spleen-only locator" in capsys.readouterr().err


def test_the_locator_seed_experiment_changes_only_the_seed(tmp_path) -> None:
    from dataclasses import asdict

    recipe = _recipe()
    first, refine = recipe.locator_seed_configs(2)
    shipped_first, shipped_refine = recipe.locator_config(recipe.BUDGET["locator"]), recipe.locator_refine_config(
        recipe.BUDGET["locator_refine"])
    assert first.seed == refine.seed == recipe.SEED + 2 != shipped_first.seed
    assert {**asdict(first), "seed": 0} == {**asdict(shipped_first), "seed": 0}
    assert {**asdict(refine), "seed": 0} == {**asdict(shipped_refine), "seed": 0}
    # the thin-CT locator: the same two stages with every patch cut to a 6-24 slice slab, nothing else changed
    thin_first, thin_refine = recipe.locator_seed_configs(0, thin=True)
    assert thin_first.augment.slab_prob == 1.0 and thin_first.augment.slab_slices == (6, 24)
    assert thin_first.augment.slab_away == thin_refine.augment.slab_away == 0.3
    assert {**asdict(thin_first), "augment": None} == {**asdict(shipped_first), "augment": None}
    assert {**asdict(thin_refine), "augment": None} == {**asdict(shipped_refine), "augment": None}
    # its "thin-neg" variant: the thin locator with 0.2 of its patches on the spleen, nothing else changed
    neg_first, neg_refine = recipe.locator_seed_configs(0, thin=True, neg=True)
    assert neg_first.fg_ratio == neg_refine.fg_ratio == recipe.THIN_NEG_FG_RATIO == 0.2 < thin_first.fg_ratio == 0.4
    assert {**asdict(neg_first), "fg_ratio": 0} == {**asdict(thin_first), "fg_ratio": 0}
    assert {**asdict(neg_refine), "fg_ratio": 0} == {**asdict(thin_refine), "fg_ratio": 0}
    with pytest.raises(ValueError, match="variant of the thin-CT locator"):
        recipe.locator_seed_configs(1, neg=True)
    with pytest.raises(SystemExit, match="--thin-neg is a variant of the thin-CT locator"):
        recipe.stage_locator_seed(tmp_path, ("P1",), 1, thin=False, neg=True)
    # the multi-organ locator with today's locator recipe (range-end patches included): only the model and the
    # partial labels change
    organ_first, organ_refine = recipe.locator_seed_configs(0, organ=True)
    assert organ_first.model.out_channels == 7 and organ_first.partial_label == 255
    assert organ_first.augment == shipped_first.augment and organ_first.augment.fov_end_prob == 0.3
    assert {**asdict(organ_first), "model": None, "partial_label": 0, "fg_classes": ()} == {
        **asdict(shipped_first), "model": None, "seed": recipe.SEED}
    assert organ_refine.lr == shipped_refine.lr and organ_refine.model == organ_first.model
    with pytest.raises(ValueError, match="not with thin"):
        recipe.locator_seed_configs(0, thin=True, organ=True)
    with pytest.raises(SystemExit, match="one experiment at a time"):
        recipe.stage_locator_seed(tmp_path, ("P1",), 0, thin=True, organ=True)
    from training.realct.members import thin_key

    assert [thin_key(p, v) for p in (None, "final", "P4") for v in ("thin", "thin-neg")] == [
        "thin", "thin-neg", "thin", "thin-neg", "thin:P4", "thin-neg:P4"]
    with pytest.raises(ValueError, match="expected one of thin, thin-neg"):
        thin_key("P4", "thick")
    with pytest.raises(SystemExit, match="--seed-offset must be 1 or more"):
        recipe.stage_locator_seed(tmp_path, ("P1",), 0)
    with pytest.raises(SystemExit, match="--seed-offset must be 1 or more"):
        recipe.stage_locator_seed(tmp_path, (), 0)
    for bad in (("P1", "P1"), ("P1", "P2", "P3"), ("P6",)):
        with pytest.raises(SystemExit, match="at most two different patients"):
            recipe.stage_locator_seed(tmp_path, bad, 1)

"""The shipped spleen model on the real CTs: right organ, right place, right size; "no spleen" when absent.

Anatomy in RAS: +x points to the patient's RIGHT, so the spleen (on the patient's left) has its
centroid at a smaller x than the body's midline. References: TotalSegmentator pseudo-labels (P1,
P2) and semi-automatic references (P3-P5). Each real CT is segmented once per mode and shared by
the tests. These CTs were used in training: the held-out evidence is the card's
leave-one-patient-out record, checked at the end.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from scipy import ndimage

from training.realct.evaluate import anatomy_checks, mask_metrics, misplaced
from training.realct.sources import (
    ALL_SCANS,
    CONTRAST,
    PATIENTS,
    PELVIS_PARTS,
    Scan,
    centroid_ras,
    load_scans,
    pelvis_parts,
    range_end_parts,
    spleen_free_parts,
)
from vnetseg.checkpoint import file_sha256, load_model
from vnetseg.inference import InferenceOptions, predict_volume
from vnetseg.io import write_nifti
from vnetseg.postprocess import dice
from vnetseg.registry import REGISTRY_FILE, default_model

SCANS = ALL_SCANS
MODES = ("fast", "full")
FREE_ML = 5.0  # issue 12: a spleen-free CT gives "no spleen" (under 5 mL) in both modes
DICE_FLOOR = 0.88  # v2.3.0 (v2.1.0's networks, HU trim, native growth, appendage cut) on the (training) CTs: 0.923-0.974; issue 12's 0.90 below
# (scan, part) of the spleen-free parts; the native low-dose CT's lower abdomen is a known failure
FREE_PARTS = [("p1_ct", "below"), ("p3_cptac", "chest"), ("p4_acrin", "below"), ("p5_lidc", "chest"), ("p5_lidc", "below")]
# v2.3.1 took the left kidney of P4's lower abdomen for the spleen here (46 mL, both modes); since v2.4.0 the
# locator check vetoes it (test_the_locator_check_vetoes_p4s_kidney_that_the_locator_takes_for_the_spleen)
KNOWN_FREE_FAILURES: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def shipped():
    entry = default_model()
    assert entry is not None, f"no default model in {REGISTRY_FILE}"
    net, info = load_model(entry.path, sha256=entry.sha256)
    return entry, net, info


@pytest.fixture(scope="module")
def scans(ct_dir) -> dict[str, Scan]:
    return {s.name: s for s in load_scans(ct_dir, SCANS)}


@pytest.fixture(scope="module")
def predictions(shipped, scans):
    """(scan name, mode) -> Prediction; the default mode on CPU is fast."""
    _, net, info = shipped
    return {
        (name, mode): predict_volume(scan.image, net, info, InferenceOptions(device="cpu", mode=mode))
        for name, scan in scans.items()
        for mode in MODES
    }


def test_registry_records_the_file_sha256_and_the_card_says_what_it_is(shipped) -> None:
    entry, _, info = shipped
    data = json.loads(REGISTRY_FILE.read_text())
    assert data["default"] == entry.name and data["models"][entry.name]["file"] == entry.path.name
    assert file_sha256(entry.path) == entry.sha256 == info.sha256
    assert entry.path.stat().st_size < 30e6 and info.weights_dtype == "float16"
    card = info.card
    for key in (
        "name",
        "version",
        "training_data",
        "method",
        "leave_one_patient_out",
        "locator",
        "limits",
        "date",
        "seed",
        "command",
    ):
        assert key in card, key
    data_text = json.dumps(card["training_data"])
    assert "Apache-2.0" in data_text and "CC-BY-4.0" in data_text and "Wasserthal" in data_text
    assert "TCIA" in data_text and "CC BY 3.0" in data_text and "Clark" in data_text
    assert set(card["training_data"]["subjects"]["per_patient"]) == set(PATIENTS)
    assert any("not for clinical decisions" in limit for limit in card["limits"])
    assert any("not validated on MSD" in limit for limit in card["limits"])
    held = set(card["leave_one_patient_out"])
    assert held <= set(PATIENTS) and {"P1", "P2", "P3", "P4"} <= held  # P5's pair: see the card's note
    # the float16 file was checked against the float32 weights it was rounded from, on every real CT
    assert {r["scan"] for r in card["float16_vs_float32"]} == set(SCANS)
    assert all(r["mask_dice"] >= 0.999 and r["max_probability_diff"] < 0.01 for r in card["float16_vs_float32"])
    assert info.locator is not None and info.locator[1].preprocessing.target_spacing == (4.0, 4.0, 4.0)
    assert info.preprocessing.target_spacing == (1.5, 1.5, 2.0) and info.preprocessing.hu_window == (-57.0, 164.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", SCANS)
def test_finds_the_spleen_on_the_patients_left_one_component(name, mode, scans, predictions) -> None:
    scan, pred = scans[name], predictions[(name, mode)]
    mask = pred.labelmap > 0
    assert pred.mode == mode and pred.report.found, f"{name} {mode}: {pred.report.message} ({pred.notes})"
    checks = anatomy_checks(mask, scan.image)
    assert checks["patient_left"], (
        f"{name}: spleen centroid x {checks['centroid_ras'][0]} mm is not left of the midline {checks['body_midline_x']} mm"
    )
    offset = np.linalg.norm(centroid_ras(mask, scan.image.affine) - centroid_ras(scan.spleen, scan.image.affine))
    assert offset < 15.0, f"{name}: centroid {offset:.0f} mm from the reference spleen's"
    assert ndimage.label(mask)[1] == 1, f"{name}: the result has several parts"
    # the full-resolution network may also answer elsewhere (full mode sees the whole CT); what is kept is
    # the part the whole-CT view located: nothing sizeable away from the reference spleen
    away = misplaced(mask, scan)
    assert away["misplaced_ml"] < 10.0, f"{name} {mode}: {away} (parts seen: {pred.report.components_ml[:4]} mL)"
    metrics = mask_metrics(mask, scan.spleen, scan.image)
    assert metrics["dice"] >= DICE_FLOOR, f"{name} {mode}: {metrics}"
    assert abs(metrics["volume_error_pct"]) <= 25.0, f"{name} {mode}: {metrics}"


def test_dice_090_on_every_real_ct_in_both_modes(scans, predictions) -> None:
    low = {k: round(dice(p.labelmap > 0, scans[k[0]].spleen), 4) for k, p in predictions.items()}
    assert all(v >= 0.90 for v in low.values()), {k: v for k, v in low.items() if v < 0.90}


@pytest.mark.parametrize(
    ("name", "part"),
    [pytest.param(*k, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FREE_FAILURES[k])) if k in KNOWN_FREE_FAILURES
     else k for k in FREE_PARTS],
)
def test_spleen_free_parts_give_no_spleen_in_both_modes(name, part, shipped, scans) -> None:
    _, net, info = shipped
    image = spleen_free_parts(scans[name])[part]
    for mode in MODES:
        pred = predict_volume(image, net, info, InferenceOptions(device="cpu", mode=mode))
        assert pred.volume_ml < FREE_ML, f"{name} {part} {mode}: {pred.volume_ml:.1f} mL 'spleen' ({pred.notes})"
        if pred.volume_ml == 0:
            assert not pred.report.found and pred.report.message.startswith("no spleen found in the field of view")


@pytest.mark.parametrize("name", sorted(PELVIS_PARTS))
def test_pelvis_only_crops_give_no_spleen_in_both_modes(name, shipped, scans) -> None:
    """Issue 12's pelvis-only crop of each CT that reaches the pelvis (P1: its lowest 150 mm, 99 mm under the
    spleen; P4: its lowest 98 mm): "no spleen" with an empty mask in fast and full mode."""
    _, net, info = shipped
    (pelvis,) = pelvis_parts(scans[name]).values()
    for mode in MODES:
        pred = predict_volume(pelvis, net, info, InferenceOptions(device="cpu", mode=mode))
        assert pred.volume_ml < FREE_ML, f"{name} pelvis {mode}: {pred.volume_ml:.1f} mL 'spleen' ({pred.notes})"
        assert not pred.report.found and pred.report.message.startswith("no spleen found in the field of view")


def test_only_the_cts_that_reach_the_pelvis_have_a_pelvis_crop(scans) -> None:
    """Each pelvis crop lies wholly under the reference spleen, 90 mm or more (physical space), and the CTs
    without one end above the pelvis (P2's 40 mm series; P3 and P5 are chest CTs)."""
    for name, scan in scans.items():
        parts = pelvis_parts(scan)
        assert (name in PELVIS_PARTS) == bool(parts), name
        if not parts:
            continue
        part = parts["pelvis"]
        corners = np.array([[i, j, k, 1.0] for i in (0, part.shape[0] - 1) for j in (0, part.shape[1] - 1)
                            for k in (0, part.shape[2] - 1)])
        top = float((corners @ part.affine.T)[:, 2].max())
        spleen = np.argwhere(scan.spleen) @ scan.image.affine[:3, :3].T + scan.image.affine[:3, 3]
        assert spleen[:, 2].min() - top >= 90.0, name
    assert set(PELVIS_PARTS) == {"p1_ct", "p4_acrin"}


def test_p4_pelvis_only_is_no_spleen_in_both_modes_because_what_is_found_there_is_bone(shipped, scans) -> None:
    """Issue 12's pelvis-only crop for P4 (its lowest 96 mm, slices 0-22 of the native low-dose CT; both
    crops: ``test_pelvis_only_crops_give_no_spleen_in_both_modes``). The whole-CT view locates 15 mL at the left iliac wing,
    and the main network makes it 97 mL (fast) and 129 mL (full) of iliac bone and iliacus; its core is 28 % denser than
    300 HU, so the answer is "no spleen" with that reason (measured: README "Not one soft tissue").
    Without the HU steps (``hu_trim=False``) the part is kept, so the test shows what the check does."""
    from vnetseg.postprocess import MAX_DENSE_SHARE

    _, net, info = shipped
    scan = scans["p4_acrin"]
    assert scan.image.affine[2, 2] == pytest.approx(4.25) and PELVIS_PARTS["p4_acrin"] == (0, 23)
    pelvis = pelvis_parts(scan)["pelvis"]
    for mode in MODES:
        pred = predict_volume(pelvis, net, info, InferenceOptions(device="cpu", mode=mode))
        assert not pred.report.found and pred.volume_ml == 0.0 and pred.labelmap.max() == 0, (mode, pred.notes)
        assert pred.report.message.startswith("no spleen found in the field of view (the part found, ")
        assert "denser than 300 HU at its core: bone or contrast-filled blood, not the spleen" in pred.report.message
        assert any("covers only 98 mm" in w for w in pred.report.warnings)
    kept = predict_volume(pelvis, net, info, InferenceOptions(device="cpu", mode="fast", hu_trim=False))
    assert kept.report.found and kept.volume_ml > 50.0
    assert MAX_DENSE_SHARE == 0.10


def test_every_spleen_free_part_is_tested(scans) -> None:
    found = {(n, p) for n, s in scans.items() if n != "p1_sm" for p in spleen_free_parts(s)}  # p1_sm: p1_ct's crop
    assert found == set(FREE_PARTS)
    assert spleen_free_parts(scans["p2_dicom"]) == {}  # the spleen is in nearly all of P2's 20 slices


# the same parts with the scan range ending 10-80 mm beyond the spleen (training.realct.sources.range_end_parts)
RANGE_ENDS = (
    [("p1_ct", f"below {g} mm") for g in (10, 30, 40, 60, 80)]
    + [("p3_cptac", f"chest {g} mm") for g in (10, 30, 40, 60, 80)]
    + [("p4_acrin", f"below {g} mm") for g in (10, 30, 40, 60, 80)]
    + [("p5_lidc", f"chest {g} mm") for g in (10, 30, 40, 60, 80)]
    + [("p5_lidc", "below 10 mm"), ("p5_lidc", "below 30 mm")]
)
# v2.3.1 still took P4's left kidney for the spleen when the range ends 10 mm under the spleen (54 mL; v2.0.0 also
# at 80 mm, 15 mL, and P1 at 30-40 mm, 19-37 mL); since v2.4.0 the locator check vetoes it
KNOWN_RANGE_END_FAILURES: dict[tuple[str, str], str] = {}


@pytest.mark.parametrize(
    ("name", "part"),
    [pytest.param(*k, marks=pytest.mark.xfail(strict=True, reason=KNOWN_RANGE_END_FAILURES[k]))
     if k in KNOWN_RANGE_END_FAILURES else k for k in RANGE_ENDS],
)
def test_ct_ranges_ending_anywhere_beyond_the_spleen_give_no_spleen(name, part, shipped, scans) -> None:
    """A CT may end at any level: where it ends must not make the kidney (under the spleen) or the
    heart (above it) a spleen. v2.0.0 called 15-41 mL spleen on 4 of these 22 parts (P1 30 and 40 mm, P4 10 and 80 mm). Fast mode: the
    whole-CT view's decision is both modes' (the parts above test both modes at 20 mm)."""
    _, net, info = shipped
    pred = predict_volume(range_end_parts(scans[name])[part], net, info, InferenceOptions(device="cpu", mode="fast"))
    assert pred.volume_ml < FREE_ML, f"{name} {part}: {pred.volume_ml:.1f} mL 'spleen' ({pred.notes})"
    if pred.volume_ml == 0:
        assert not pred.report.found and pred.report.message.startswith("no spleen found in the field of view")


@pytest.mark.parametrize("mode", MODES)
def test_the_locator_check_vetoes_p4s_kidney_that_the_locator_takes_for_the_spleen(mode, shipped, scans) -> None:
    """v2.4.0's locator check (the multi-organ locator trained on all five: a located part whose mean kidney
    probability is larger than its mean spleen probability is not the spleen) on P4's lower abdomen, where the
    locator alone takes the lower pole of the left kidney for the spleen: without the check 46 and 54 mL, with
    it "no spleen", and the run's note says what was vetoed."""
    from dataclasses import replace

    _, net, info = shipped
    assert info.locator_check is not None and info.locator_check_rivals == ("Kidney",) and info.locator_check_min == 0.0
    unchecked = replace(info)
    unchecked.locator, unchecked.locator_check = info.locator, None
    crops = {**spleen_free_parts(scans["p4_acrin"]), **range_end_parts(scans["p4_acrin"])}
    for part in ("below", "below 10 mm"):
        without = predict_volume(crops[part], net, unchecked, InferenceOptions(device="cpu", mode=mode))
        assert without.report.found and without.volume_ml > 30.0, (part, without.volume_ml)
        pred = predict_volume(crops[part], net, info, InferenceOptions(device="cpu", mode=mode))
        assert not pred.report.found and pred.volume_ml == 0 and not pred.labelmap.any(), (part, pred.volume_ml)
        assert pred.report.message.startswith("no spleen found in the field of view")
        assert any("the locator check did not confirm" in n and "under its mean of Kidney" in n for n in pred.notes), pred.notes


def test_every_range_end_part_is_tested(scans) -> None:
    found = {(n, p) for n, s in scans.items() if n != "p1_sm" for p in range_end_parts(s)}
    assert found == set(RANGE_ENDS)


def test_no_low_confidence_warning_on_the_shipped_models_results_on_the_real_cts(scans, predictions) -> None:
    """Issue 14: "low confidence: check the result" is for doubtful results, not for these right ones."""
    from vnetseg.confidence import LOW_CONFIDENCE

    for (name, mode), pred in predictions.items():
        assert pred.confidence is not None, (name, mode)
        assert dice(pred.labelmap > 0, scans[name].spleen) >= 0.8, (name, mode)  # a right result (bench_confidence.RIGHT_DICE)
        assert 0.0 <= pred.confidence.uncertain_share <= 1.0 and 0.5 < pred.confidence.mean_probability <= 1.0
        assert not pred.confidence.low, (name, mode, pred.confidence)
        assert not any(w.startswith(LOW_CONFIDENCE) for w in pred.report.warnings), (name, mode)


@pytest.fixture(scope="module")
def fast_vs_full(scans, predictions) -> dict[str, tuple[float, float]]:
    found = {}
    for name in scans:
        a, b = predictions[(name, "fast")].labelmap > 0, predictions[(name, "full")].labelmap > 0
        found[name] = (round(dice(a, b), 4), round(abs(int(a.sum()) - int(b.sum())) / max(int(b.sum()), 1), 4))
    return found


def test_fast_and_full_mode_agree_on_every_real_ct(fast_vs_full) -> None:
    """Issue 12 asks Dice >= 0.97: fast mode runs full mode's own windows on the organ, so on these
    CTs the two answers are the same mask (issue 6 asked 0.99)."""
    assert all(d >= 0.999 and gap <= 0.001 for d, gap in fast_vs_full.values()), fast_vs_full


def _cli_fast(ct_file, flag: str, tmp_path) -> tuple[np.ndarray, list[str]]:
    """``vnetseg predict`` in fast mode with one extra flag: (the written mask, the report's notes)."""
    from vnetseg.cli import main
    from vnetseg.io import read_image

    dest, report = tmp_path / "mask.nii.gz", tmp_path / "report.json"
    out, err = io.StringIO(), io.StringIO()
    code = main(["predict", str(ct_file), "-o", str(dest), "--mode", "fast", flag, "--report", str(report),
                 "--progress", "none"], out, err)
    assert code == 0, err.getvalue()
    return read_image(dest).array > 0, json.loads(report.read_text())["cases"][0]["warnings"]


def _step_removes(name: str, file: str, flag: str, scans, predictions, ct_dir, tmp_path):
    """The shipped fast-mode result on scan ``name`` against the CLI's with ``flag`` (one step turned
    off), for a step that only removes: (scan, result, kept mask, removed voxels, mask without the step, its notes)."""
    scan, result = scans[name], predictions[(name, "fast")]
    before, raw_notes = _cli_fast(ct_dir / file, flag, tmp_path)
    kept = result.labelmap > 0
    assert not (kept & ~before).any()  # the step only removes
    return scan, result, kept, before & ~kept, before, raw_notes


def test_hu_trim_removes_the_unenhanced_tissue_beside_a_contrast_spleen(scans, predictions, ct_dir, tmp_path) -> None:
    """P5 (contrast, spleen about 175 HU): without the trim (``--no-hu-trim``) the mask spills into 30 HU tissue beside it."""
    scan, trimmed, kept, removed, before, raw_notes = _step_removes(
        "p5_lidc", "lidc_idri_0001_ct.nii.gz", "--no-hu-trim", scans, predictions, ct_dir, tmp_path)
    voxel_ml = scan.image.voxel_volume_ml
    assert removed.sum() * voxel_ml > 10.0
    assert np.median(scan.image.array[removed]) < 100.0 < np.median(scan.image.array[kept])
    assert dice(kept, scan.spleen) > dice(before, scan.spleen) + 0.03
    note = next(n for n in trimmed.notes if n.startswith("HU trim: "))
    # the note counts what the band took, before hole filling put back what the organ encloses (and
    # the appendage cut, after the trim, takes a few tenths of a mL of its own on either mask)
    noted_ml = float(note.removeprefix("HU trim: ").split(" mL")[0])
    assert abs(noted_ml - removed.sum() * voxel_ml) <= 0.5
    assert not any(n.startswith("HU trim") for n in raw_notes)


def test_native_ct_growth_adds_the_spleens_rim_the_network_was_unsure_of(shipped, scans, predictions, ct_dir, tmp_path) -> None:
    """P1 (native, spleen about 35 HU): without the growth (``--no-native-grow``) the mask misses a rim of spleen.

    The growth is the shipped file's own calibration (``ModelInfo.postprocessing``): the same
    weights without that declaration give the ungrown mask."""
    from dataclasses import replace

    _, net, info = shipped
    assert info.postprocessing == {"native_grow_probability": 0.3}
    scan = scans["p1_ct"]
    grown = predictions[("p1_ct", "fast")]
    before, notes = _cli_fast(ct_dir / "example_ct.nii.gz", "--no-native-grow", tmp_path)
    kept = grown.labelmap > 0
    assert not (before & ~kept).any()  # growth only adds
    added = kept & ~before
    assert added.sum() * scan.image.voxel_volume_ml > 10.0
    # what it adds is spleen (the reference) far more than not, and it stays beside the spleen
    assert (added & scan.spleen).sum() > 0.7 * added.sum()
    assert misplaced(kept, scan)["misplaced_ml"] < 1.0
    assert dice(kept, scan.spleen) > dice(before, scan.spleen) + 0.02
    assert any(n.startswith("native CT (the organ's core") for n in grown.notes)
    assert not any(n.startswith("native CT") for n in notes) and any(n.startswith("HU trim") for n in notes)
    undeclared = predict_volume(scan.image, net, replace(info, postprocessing={}), InferenceOptions(device="cpu", mode="fast"))
    assert np.array_equal(undeclared.labelmap > 0, before)


def test_appendage_cut_removes_what_reached_away_from_the_spleen(scans, predictions, ct_dir, tmp_path) -> None:
    """P2 (contrast, 40 mm series): without the cut (``--no-appendage-cut``) the mask holds thin pieces
    more than 10 mm from the spleen's thick body, none of them spleen."""
    scan, cut, kept, removed, before, raw_notes = _step_removes(
        "p2_dicom", "example_ct_dicom", "--no-appendage-cut", scans, predictions, ct_dir, tmp_path)
    voxel_ml = scan.image.voxel_volume_ml
    assert removed.sum() * voxel_ml > 3.0
    assert (removed & scan.spleen).sum() < 0.05 * removed.sum()  # what went was not spleen
    assert misplaced(kept, scan)["misplaced_ml"] < misplaced(before, scan)["misplaced_ml"] - 3.0
    assert dice(kept, scan.spleen) > dice(before, scan.spleen) + 0.005
    note = next(n for n in cut.notes if n.startswith("thin appendage: "))
    assert abs(float(note.removeprefix("thin appendage: ").split(" mL")[0]) - removed.sum() * voxel_ml) < 0.5
    assert not any(n.startswith("thin appendage") for n in raw_notes)


def test_fast_mode_segments_less_than_the_whole_volume(shipped, scans, predictions) -> None:
    """The agreement above is not fast mode quietly running full mode: on the long CTs its box
    leaves out most of the model grid. (example_ct_sm's 30 slices and 366 x 303 mm fit in one
    window, and on the 20-slice DICOM series the spleen touches both of full mode's windows, so there
    fast mode runs what full mode runs, by design.)"""
    from vnetseg.preprocess import make_grid_map

    _, _, info = shipped
    for name in ("p1_ct", "p3_cptac", "p4_acrin", "p5_lidc"):
        box, image = predictions[(name, "fast")].box, scans[name].image
        grid = make_grid_map(image.shape, image.affine, info.preprocessing.target_spacing)
        assert box is not None, name
        share = np.prod(box.shape) / np.prod(grid.model_shape)
        assert share < 0.7, f"{name}: fast mode's box {box} is {share:.0%} of the model grid {grid.model_shape}"


def _held_out(card: dict) -> list[tuple[str, dict]]:
    return [(held, row) for held, record in card["leave_one_patient_out"].items() for row in record["cases"]]


def test_leave_one_patient_out_record_is_complete(shipped) -> None:
    card = shipped[2].card
    record = card["leave_one_patient_out"]
    assert set(record) == set(PATIENTS)
    rows = _held_out(card)
    assert {(r["patient"], r["mode"]) for _h, r in rows} == {(p, m) for p in PATIENTS for m in MODES}
    assert all(r["patient"] == held for held, r in rows)
    free = [r for v in record.values() for r in v["spleen_free"]]
    assert {r["patient"] for r in free} == set(PATIENTS) - {"P2"}  # P2's 20 slices all hold spleen
    ends = {(r["scan"], r["part"]) for v in record.values() for r in v["range_ends"]}
    assert ends == set(RANGE_ENDS) and all(r["mode"] == "fast" for v in record.values() for r in v["range_ends"])


# held-out runs with 10 mL or more away from the reference spleen (none since the held-out pairs get
# every stage of the recipe: P5 went from 10.9 mL, an oversized mask, to 4.0 mL)
KNOWN_AWAY: dict[str, str] = {}


@pytest.mark.parametrize(
    "patient", [pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=KNOWN_AWAY[p])) if p in KNOWN_AWAY else p
                for p in PATIENTS],
)
def test_leave_one_patient_out_never_labels_another_organ_and_says_no_spleen_on_spleen_free_parts(patient, shipped) -> None:
    """The card's held-out record (both networks trained without the patient), both modes: no run puts
    10 mL or more away from the reference spleen (the heart, a muscle), and every spleen-free part
    gives under 5 mL. Before the whole-CT view refused parts with lung beneath them, held-out P5
    (neck to kidneys) got a 302 mL 'spleen' high in the chest, and 305 mL on its chest-only part."""
    record = shipped[2].card["leave_one_patient_out"][patient]
    for r in record["cases"]:
        assert r["misplaced_ml"] < 10.0, f"held-out {r['scan']} {r['mode']}: {r['misplaced_ml']} mL away ({r})"
    free = record["spleen_free"] + record["range_ends"]  # range ends: the scan range ending 10-80 mm beyond the spleen
    assert all(r["volume_ml"] < FREE_ML for r in free), [r for r in free if r["volume_ml"] >= FREE_ML]


def test_cli_without_model_uses_the_shipped_default(shipped, ct_dir, tmp_path) -> None:
    from vnetseg.cli import main

    entry, _, _ = shipped
    out, err = io.StringIO(), io.StringIO()
    dest = tmp_path / "spleen.nii.gz"
    code = main(["predict", str(ct_dir / "example_ct_sm.nii.gz"), "-o", str(dest), "--progress", "json"], out, err)
    assert code == 0, err.getvalue()
    events = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    model = next(e for e in events if e["event"] == "model")
    assert model["sha256"] == entry.sha256 and model["path"] == str(entry.path)
    done = next(e for e in events if e["event"] == "done")
    assert dest.is_file() and 150.0 < done["volume_ml"] < 350.0


def test_cli_min_located_ml_reaches_the_whole_ct_view_and_a_bad_value_is_one_clear_error(shipped, ct_dir, tmp_path,
                                                                                         capsys) -> None:
    """``--min-located-ml``: the whole-CT view locates 235 mL on example_ct, so a 300 mL floor answers "no spleen"
    with that number in the line (the default finds it: ``test_real_ct``); 0 is refused before anything is written."""
    from vnetseg.cli import DEFAULT_MIN_LOCATED_ML, build_parser, main
    from vnetseg.fast import MIN_LOCATED_ML

    assert DEFAULT_MIN_LOCATED_ML == MIN_LOCATED_ML
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "--help"])
    assert f"(default {MIN_LOCATED_ML:g})" in " ".join(capsys.readouterr().out.split())
    dest, report = tmp_path / "spleen.nii.gz", tmp_path / "report.json"
    out, err = io.StringIO(), io.StringIO()
    code = main(["predict", str(ct_dir / "example_ct.nii.gz"), "-o", str(dest), "--report", str(report), "--mode", "fast",
                 "--device", "cpu", "--progress", "none", "--min-located-ml", "300"], out, err)
    assert code == 0, err.getvalue()
    case = json.loads(report.read_text())["cases"][0]
    assert case["spleen_found"] is False and case["volume_ml"] == 0.0
    assert "best candidate is 235.2 mL, under 300 mL" in case["message"], case["message"]
    bad = tmp_path / "bad.nii.gz"
    out, err = io.StringIO(), io.StringIO()
    code = main(["predict", str(ct_dir / "example_ct.nii.gz"), "-o", str(bad), "--progress", "none", "--min-located-ml", "0"],
                out, err)
    assert code != 0 and err.getvalue().count("\n") == 1 and "min_located_ml must be more than 0 mL" in err.getvalue()
    assert not bad.exists()


def test_cli_says_no_spleen_in_view_and_exits_0(shipped, scans, tmp_path) -> None:
    """A chest-only CT: an empty mask written, exit status 0, one clear line, and the JSON report says so."""
    from vnetseg.cli import main

    chest = spleen_free_parts(scans["p5_lidc"])["chest"]
    src = tmp_path / "chest_only.nii.gz"
    write_nifti(src, np.round(chest.array).astype(np.int16), chest.affine)
    dest, report = tmp_path / "chest_spleen.nii.gz", tmp_path / "report.json"
    out, err = io.StringIO(), io.StringIO()
    code = main(["predict", str(src), "-o", str(dest), "--report", str(report), "--progress", "none"], out, err)
    assert code == 0, err.getvalue()
    assert "chest_only.nii.gz: no spleen found in the field of view" in out.getvalue()
    case = json.loads(report.read_text())["cases"][0]
    assert case["spleen_found"] is False and case["volume_ml"] == 0.0 and case["error"] is None
    assert case["message"].startswith("no spleen found in the field of view")
    from vnetseg.io import read_image

    mask = read_image(dest, allow_uniform=True)
    assert mask.shape == chest.shape and np.allclose(mask.affine, chest.affine, atol=1e-4) and not mask.array.any()


LOPO_TARGET = {True: 0.85, False: 0.75}  # issue 12: held-out Dice per contrast-enhanced / native CT


# held-out Dice below issue 12's targets (both modes give the same mask: fast mode runs full mode's windows)
KNOWN_LOW = {
    "P2": "held out, the locator finds nothing on P2's 40 mm slab (its mean probability on P2's spleen is "
    "0.002, at most 0.08 anywhere), so both modes answer 'no spleen' (Dice 0); the held-out main network "
    "alone, before its last two stages, found it (0.872)",
}


@pytest.mark.parametrize(
    "patient", [pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=KNOWN_LOW[p])) if p in KNOWN_LOW else p
                for p in PATIENTS],
)
def test_leave_one_patient_out_dice_targets(patient, shipped) -> None:
    """Issue 12's held-out targets, both modes: Dice >= 0.85 on each contrast CT, >= 0.75 on each native CT."""
    record = shipped[2].card["leave_one_patient_out"][patient]
    low = [(r["scan"], r["mode"], r["dice"]) for r in record["cases"]
           if r["scan"] != "p1_sm" and r["dice"] < LOPO_TARGET[CONTRAST[patient]]]
    assert not low, f"held-out runs below target: {low}"

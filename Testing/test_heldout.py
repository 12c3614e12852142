"""Held-out pairs kept in the repository, run again on the patient they never saw.

The shipped card's leave-one-patient-out record (read by ``test_shipped_model.py``) comes from
networks that were scored and then not kept. The pairs in ``training/realct/heldout/`` were made by
``python scripts/make_spleen_model.py --stage lopo --held P`` (one thread, fixed seed) and saved
float16, as the shipped file holds its networks. Here each runs with today's inference on its own
patient's real CTs: issue 12's held-out Dice target, nothing away from the spleen, "no spleen" on
every spleen-free part and range end, and the same numbers as the record the card holds for that
patient (a regenerated recipe reproduces it).
"""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from training.realct.evaluate import evaluate_image, evaluate_scan
from training.realct.sources import CONTRAST, load_scans, range_end_parts, spleen_free_parts
from vnetseg.checkpoint import load_model
from vnetseg.registry import default_model

HELD_DIR = REPO / "training" / "realct" / "heldout"
MANIFEST = json.loads((HELD_DIR / "heldout.json").read_text())
LOPO_TARGET = {True: 0.85, False: 0.75}  # issue 12: held-out Dice per contrast-enhanced / native CT
FREE_ML = 5.0


@pytest.fixture(scope="module")
def shipped_card():
    entry = default_model()
    return load_model(entry.path, sha256=entry.sha256)[1].card


def _pair(patient: str):
    entry = MANIFEST[patient]
    return load_model(HELD_DIR / entry["file"], sha256=entry["sha256"])  # refuses a changed file


def test_manifest_lists_every_file_with_its_digest_and_what_it_was_trained_on() -> None:
    assert MANIFEST, "no held-out pair in training/realct/heldout/heldout.json"
    files = {p.name for p in HELD_DIR.glob("*.pt")}
    assert files == {e["file"] for e in MANIFEST.values()}
    for patient in MANIFEST:
        _, info = _pair(patient)  # refuses a file whose SHA-256 is not the manifest's
        assert info.card["held_out"] == patient and patient not in info.card["trained_on"]
        assert info.locator is not None and info.weights_dtype == "float16"


@pytest.mark.parametrize("patient", sorted(MANIFEST))
def test_held_out_pair_meets_the_target_on_its_own_patient_and_reproduces_the_card(patient, ct_dir, shipped_card) -> None:
    net, info = _pair(patient)
    record = {(r["scan"], r["mode"]): r for r in shipped_card["leave_one_patient_out"][patient]["cases"]}
    scans = [s for s in load_scans(ct_dir) if s.patient == patient]
    assert scans
    for scan in scans:
        row = evaluate_scan(scan, net, info, mode="fast")
        assert row["found"], f"held-out {scan.name}: {row['notes']}"
        assert row["dice"] >= LOPO_TARGET[CONTRAST[patient]], f"held-out {scan.name}: Dice {row['dice']}"
        assert row["misplaced_ml"] < 10.0, f"held-out {scan.name}: {row['misplaced_ml']} mL away from the spleen"
        assert row["patient_left"] and row["components"] == 1, row
        # the card's record of this patient was made by the same recipe: the same mask, to the voxel's mL
        card = record[(scan.name, "fast")]
        assert row["dice"] == pytest.approx(card["dice"], abs=1e-4)
        assert row["volume_ml"] == pytest.approx(card["volume_ml"], abs=0.05)


@pytest.mark.parametrize("patient", sorted(MANIFEST))
def test_held_out_pair_says_no_spleen_on_its_patients_spleen_free_parts_and_range_ends(patient, ct_dir) -> None:
    net, info = _pair(patient)
    parts = {}
    for scan in load_scans(ct_dir):
        if scan.patient != patient or scan.name == "p1_sm":
            continue
        parts.update({f"{scan.name} {k}": v for k, v in spleen_free_parts(scan).items()})
        parts.update({f"{scan.name} {k}": v for k, v in range_end_parts(scan).items()})
    assert parts
    volumes = {name: evaluate_image(image, net, info, "fast")["volume_ml"] for name, image in parts.items()}
    assert all(v < FREE_ML for v in volumes.values()), volumes

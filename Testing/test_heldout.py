"""Held-out pairs kept in the repository, run again on the patient they never saw.

The shipped card's leave-one-patient-out record (read by ``test_shipped_model.py``) comes from
networks that were scored and then not kept. The pairs in ``training/realct/heldout/`` were made by
``python scripts/make_spleen_model.py --stage lopo --held P`` (one thread, fixed seed) and saved
float16, as the shipped file holds its networks. Here each runs with today's inference on its own
patient's real CTs: issue 12's held-out Dice target, nothing away from the spleen, "no spleen" on
every spleen-free part and range end, the record saved in the pair's own file, and the same numbers
as the record the shipped card holds for that patient (P2-P4: the regenerated recipe reproduces it;
P1 and P5: the card's came from an earlier state of the recipe, a strict xfail each).
"""

from __future__ import annotations

import functools
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


# issue 12's held-out targets that the recipe does not reach: each is a strict xfail, so a pair that
# starts to meet its target (or a test that stops checking it) is noticed
KNOWN_BELOW_TARGET = {
    "P2": "the held-out locator finds no spleen on P2's 40 mm series (20 slices), so both modes answer "
    "'no spleen' (Dice 0); the main network alone would find it",
}


@functools.cache
def _rows(patient: str, ct_dir) -> list[dict]:
    """Fast mode on each of the patient's real CTs with its held-out pair (once per session: three tests read them)."""
    net, info = _pair(patient)
    scans = [s for s in load_scans(ct_dir) if s.patient == patient]
    assert scans
    return [evaluate_scan(scan, net, info, mode="fast") for scan in scans]


def _patients(known: dict[str, str]) -> list:
    """Every committed pair's patient; those in ``known`` as strict xfails with its reason."""
    return [pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=known[p])) if p in known else p
            for p in sorted(MANIFEST)]


# The shipped card's held-out records of P1 and P5 were made by pairs of an earlier state of the recipe
# (those networks were not kept); regenerated with today's recipe in session 14 they differ (P1 0.9414
# and 0.9347 against the card's 0.9312 and 0.9098, P5 0.8533 against 0.8943; both still meet the target).
# The card is the shipped file's, so it stays as shipped until the next model; these record the gap.
CARD_FROM_AN_EARLIER_RECIPE = {
    "P1": "the card's P1 record (Dice 0.9312 / 0.9098) came from an earlier recipe's pair; today's gives 0.9414 / 0.9347",
    "P5": "the card's P5 record (Dice 0.8943, 99.3 mL) came from an earlier recipe's pair; today's gives 0.8533, 90.7 mL",
}


def _same_record(rows: list[dict], cases: list[dict]) -> None:
    record = {(r["scan"], r["mode"]): r for r in cases}
    for row in rows:
        card = record[(row["scan"], "fast")]
        assert row["found"] == (card["volume_ml"] > 0), (row, card)
        assert row["dice"] == pytest.approx(card["dice"], abs=1e-4), (row["scan"], row["dice"], card["dice"])
        assert row["volume_ml"] == pytest.approx(card["volume_ml"], abs=0.05), (row["scan"], row["volume_ml"])


@pytest.mark.parametrize("patient", sorted(MANIFEST))
def test_held_out_pair_gives_its_own_record_again_with_todays_inference(patient, ct_dir) -> None:
    """The record saved in the pair's file when it was trained and scored: the same mask, to the voxel's mL."""
    _, info = _pair(patient)
    _same_record(_rows(patient, ct_dir), info.card["cases"])


@pytest.mark.parametrize("patient", _patients(CARD_FROM_AN_EARLIER_RECIPE))
def test_held_out_pair_reproduces_the_shipped_cards_record_of_its_patient(patient, ct_dir, shipped_card) -> None:
    """The shipped card's record of this patient was made by the same recipe (the regeneration command)."""
    _same_record(_rows(patient, ct_dir), shipped_card["leave_one_patient_out"][patient]["cases"])


@pytest.mark.parametrize("patient", _patients(KNOWN_BELOW_TARGET))
def test_held_out_pair_meets_the_target_on_its_own_patient(patient, ct_dir) -> None:
    for row in _rows(patient, ct_dir):
        assert row["found"], f"held-out {row['scan']}: {row['notes']}"
        assert row["dice"] >= LOPO_TARGET[CONTRAST[patient]], f"held-out {row['scan']}: Dice {row['dice']}"
        assert row["misplaced_ml"] < 10.0, f"held-out {row['scan']}: {row['misplaced_ml']} mL away from the spleen"
        assert row["patient_left"] and row["components"] == 1, row


def test_every_known_miss_is_a_committed_pair() -> None:
    assert set(KNOWN_BELOW_TARGET) | set(CARD_FROM_AN_EARLIER_RECIPE) <= set(MANIFEST)


# P2's 40 mm series has no spleen-free part: the spleen is in nearly all of its 20 slices
# (test_shipped_model.test_every_spleen_free_part_is_tested checks that)
@pytest.mark.parametrize("patient", sorted(p for p in MANIFEST if p != "P2"))
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

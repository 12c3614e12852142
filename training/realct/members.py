"""Locator members: more locators like the shipped one, trained with other seeds (the seed experiment).

``scripts/make_spleen_model.py --stage locator_seed`` trains one (the recipe's two locator stages with
seed ``SEED + offset``, without a held-out patient or on all five) and writes it as a float16 model
file to ``training/realct/locator_members/``, listed in ``members.json``. :func:`attach` puts them
beside a model's own locator (``ModelInfo.locator_members``), and the whole-CT view is then the mean
of their spleen probabilities. The files are evidence, not part of the shipped model: README
"Several locators".
"""

from __future__ import annotations

import json
from pathlib import Path

from vnetseg.checkpoint import ModelInfo, load_model
from vnetseg.model import VNet

MEMBERS_DIR = Path(__file__).resolve().parent / "locator_members"
MANIFEST = MEMBERS_DIR / "members.json"
HELD_DIR = Path(__file__).resolve().parent / "heldout"


def manifest() -> dict[str, dict[str, dict]]:
    """key ("P1".."P5": trained without that patient; "final": on all five) -> seed offset -> entry."""
    return json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {}


def load_members(key: str) -> list[tuple[VNet, ModelInfo]]:
    """Every member listed for ``key``, each checked against its recorded SHA-256, in seed order."""
    entries = manifest().get(key, {})
    return [load_model(MEMBERS_DIR / e["file"], sha256=e["sha256"]) for _, e in sorted(entries.items(), key=lambda i: int(i[0]))]


def bag_keys(patient: str) -> list[str]:
    """The leave-two-out members that also leave out ``patient`` ("P1+P4", "P2+P4"... for "P4"): beside
    ``patient``'s held-out pair they make the held-out counterpart of bagging (the final locator beside
    the five leave-one-out ones). Only the keys listed in the manifest."""
    return sorted(k for k in manifest() if "+" in k and patient in k.split("+"))


def heldout_locators(patients: tuple[str, ...] | None = None) -> list[tuple[VNet, ModelInfo]]:
    """The locators inside the committed held-out pairs (``training/realct/heldout``, each trained
    without its patient with the recipe's own seed), each file checked against its SHA-256; every pair, or
    those of ``patients``, in patient order."""
    listed = json.loads((HELD_DIR / "heldout.json").read_text())
    found = []
    for patient in sorted(listed):
        if patients is None or patient in patients:
            _net, info = load_model(HELD_DIR / listed[patient]["file"], sha256=listed[patient]["sha256"])
            assert info.locator is not None, f"held-out pair {patient} has no locator"
            found.append(info.locator)
    return found


def attach_bag(info: ModelInfo, key: str) -> int:
    """Bagging: beside ``info``'s locator put the locators that differ from it by one patient.

    ``key`` "final" (the shipped model, trained on all five): the five held-out pairs' locators. ``key``
    a patient ("P4": its held-out pair, trained without it): the leave-two-out members that also leave out
    that patient (:func:`bag_keys`), its held-out counterpart. Returns how many were put beside it.
    """
    if key == "final":
        if info.locator is None:
            raise ValueError("locator members go beside a locator, and this model file has none")
        info.locator_members = heldout_locators()
        return len(info.locator_members)
    return attach(info, bag_keys(key))


THIN_VARIANTS = ("thin", "thin-neg")


def thin_key(patient: str | None, variant: str = "thin") -> str:
    """The manifest key of the thin-CT locator trained without ``patient`` ("thin:P2"), or on all five ("thin");
    ``variant`` "thin-neg": its variant with fewer patches on the spleen ("thin-neg:P2")."""
    if variant not in THIN_VARIANTS:
        raise ValueError(f"thin-CT locator variant {variant!r}: expected one of {', '.join(THIN_VARIANTS)}")
    return variant if patient in (None, "final") else f"{variant}:{patient}"


def attach_thin(info: ModelInfo, patient: str | None, max_mm: float, variant: str = "thin") -> bool:
    """Give ``info`` the thin-CT locator trained without ``patient`` (None: on all five), used on CTs of at
    most ``max_mm`` head to foot (``variant``: see :func:`thin_key`); False when none is listed.

    Raises:
        ValueError: when ``info`` has no locator (the thin one replaces it on thin CTs only).
    """
    if info.locator is None:
        raise ValueError("a thin-CT locator goes beside a locator, and this model file has none")
    found = load_members(thin_key(patient, variant))
    if not found:
        return False
    info.thin_locator, info.thin_locator_max_mm = found[0], float(max_mm)
    return True


def attach(info: ModelInfo, key: str | list[str]) -> int:
    """Put the members of ``key`` (or of each key of a list) beside ``info``'s own locator; returns how
    many (0 when none are listed).

    Raises:
        ValueError: when ``info`` has no locator to put them beside.
    """
    if info.locator is None:
        raise ValueError("locator members go beside a locator, and this model file has none")
    keys = [key] if isinstance(key, str) else list(key)
    info.locator_members = [m for k in keys for m in load_members(k)]
    return len(info.locator_members)


def organ_key(patient: str | None) -> str:
    """The manifest key of the multi-organ locator trained without ``patient`` ("organ:P4"), or on all five ("organ")."""
    return "organ" if patient in (None, "final") else f"organ:{patient}"


def attach_check(info: ModelInfo, patient: str | None, min_probability: float, rivals: tuple[str, ...] = ()) -> bool:
    """Give ``info`` the multi-organ locator trained without ``patient`` (None: on all five) as its locator check
    (``ModelInfo.locator_check``): a located part counts only where its mean spleen probability is at least
    ``min_probability`` and no class of ``rivals`` ("Kidney") has a larger mean over it. False when none is listed.

    Raises:
        ValueError: when ``info`` has no locator (the check confirms the locator's parts).
    """
    if info.locator is None:
        raise ValueError("a locator check goes beside a locator, and this model file has none")
    found = load_members(organ_key(patient))
    if not found:
        return False
    info.locator_check, info.locator_check_min, info.locator_check_rivals = found[0], float(min_probability), tuple(rivals)
    return True

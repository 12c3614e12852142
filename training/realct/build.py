"""Write training subjects made from the real CTs, and MSD task folders that train on them.

Layout under ``OUT`` (a run folder, never committed)::

    OUT/pool/imagesTr/<subject>.nii.gz   every subject (int16 HU, 1.5 x 1.5 x 2.0 mm, RAS)
    OUT/pool/labelsTr/<subject>.nii.gz   its spleen mask (uint8, 1 = spleen)
    OUT/pool/organsTr/<subject>.nii.gz   its organ map for the multi-organ locator (uint8, ORGAN_CLASSES;
                                         255 = "not spleen, organ unknown" where the reference is spleen-only)
    OUT/pool/subjects_<scan>.json        how each subject was made (patient, kind, view, phase...)
    OUT/real/...                         the real CTs with their spleen pseudo-labels (validation)
    OUT/tasks/<task>/                    MSD task folders (symlinks into pool/ and real/),
                                         dataset.json and splits.json (one fold: train / val)

Subject names say where they come from: ``p1_real_007`` (a view of P1's real image) or
``p2_syn_003`` (a synthetic CT drawn from P2's label map); P3-P5 have spleen-only references and
give real views only (``p4_real_012``). Leaving a patient out therefore means
dropping every subject whose name starts with its prefix.

Command line: ``python -m training.realct.build --out runs/realct --per-kind 20 --seed 0``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vnetseg.io import write_nifti

from ..data import UNKNOWN_LABEL, write_dataset_json
from .anatomy import GROUP_NAMES
from .augment import ViewSettings, degrade, draw_view, sample_view
from .sources import Scan, load_scans
from .synth import group_map, group_means, rephase_real, synthesize

KINDS = ("real", "syn")
# p1_sm is a crop of p1_ct: no new voxels to learn from
TRAIN_SCANS = ("p1_ct", "p2_dicom", "p3_cptac", "p4_acrin", "p5_lidc")
# more views away from the spleen than the ViewSettings default: chest with the heart, lower abdomen,
# pelvis and the patient's right side, so that the network learns what the spleen is not
POOL_VIEWS = ViewSettings(mode_p=(0.45, 0.2, 0.35))


# the multi-organ locator's classes: what the spleen is not, where a TotalSegmentator map says so.
# No heart: neither TotalSegmentator CT here (P1: abdomen and pelvis, P2: 20 slices) reaches it; the
# CTs that show it (P3-P5) have spleen-only references, so there it is "not spleen" (UNKNOWN_LABEL).
ORGAN_CLASSES = ("background", "spleen", "liver", "kidney", "stomach", "bowel", "muscle")
ORGAN_GROUPS = {"liver": ("liver",), "kidney": ("kidney",), "stomach": ("stomach",), "bowel": ("bowel", "colon"),
                "muscle": ("muscle",)}


def organ_map(labels: np.ndarray, version: str) -> np.ndarray:
    """(X, Y, Z) uint8 index into ORGAN_CLASSES of a label map.

    A TotalSegmentator map ("v1", "v2") gives every class; structures outside ORGAN_GROUPS
    (fat, bone, lung, vessels, pancreas...) are background. A spleen-only reference ("spleen")
    names the spleen and nothing else: every other voxel is UNKNOWN_LABEL, not background.
    """
    if version == "spleen":
        return np.where(labels == 1, 1, UNKNOWN_LABEL).astype(np.uint8)
    groups = group_map(labels, version)
    out = np.zeros(labels.shape, dtype=np.uint8)
    for name, members in ORGAN_GROUPS.items():
        out[np.isin(groups, [GROUP_NAMES.index(m) for m in members])] = ORGAN_CLASSES.index(name)
    out[labels == 1] = 1
    return out


def kinds_of(scan: Scan) -> tuple[str, ...]:
    """Synthetic CTs need an organ label map: scans with a spleen-only reference give real views only."""
    return KINDS if scan.version in ("v1", "v2") else ("real",)


def subjects_per_kind(scan: Scan, per_kind: int) -> int:
    """Subjects per kind: a scan with real views only gets 1.5x as many, so every patient weighs about the same."""
    return per_kind if len(kinds_of(scan)) > 1 else (3 * per_kind) // 2


@dataclass(frozen=True)
class Subject:
    """What one written subject is."""

    name: str
    patient: str
    kind: str
    spleen_ml: float
    info: dict

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "patient": self.patient,
            "kind": self.kind,
            "spleen_ml": round(self.spleen_ml, 1),
            **self.info,
        }


def make_subject(
    scan: Scan, kind: str, rng: np.random.Generator, settings: ViewSettings, source_means: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    """One subject from ``scan``: a deformed view, then real (rephased) or synthetic appearance, then degradations.

    Returns:
        ((X, Y, Z) int16 HU, (X, Y, Z) uint8 spleen mask, (X, Y, Z) uint8 organ map (:func:`organ_map`),
        4x4 affine, description).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    view = draw_view(scan, rng, settings)
    hu, labels = sample_view(scan, view, settings.spacing)
    groups = group_map(labels, scan.version)
    if kind == "syn":
        hu, phase = synthesize(hu, groups, rng)
    elif scan.version in ("v1", "v2") and rng.random() < 0.7:  # needs the organs' labels
        hu, phase = rephase_real(hu, groups, source_means, rng)
    else:
        phase = "as scanned"
    hu, degraded = degrade(hu, rng, settings.spacing)
    spleen = (labels == 1).astype(np.uint8)
    info = {"view": view.mode, "shape": list(view.shape), "phase": phase, **degraded}
    hu = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    return hu, spleen, organ_map(labels, scan.version), view.affine(settings.spacing), info


def write_pool(
    out: str | os.PathLike[str],
    per_kind: int = 20,
    seed: int = 0,
    scans: list[Scan] | None = None,
    settings: ViewSettings | None = None,
    log=print,
) -> list[Subject]:
    """Write ``per_kind`` real-view and ``per_kind`` synthetic subjects for each training scan.

    Scans with a spleen-only reference give 1.5 x ``per_kind`` real views and no synthetic CTs
    (:func:`subjects_per_kind`). Subjects already on disk (same name) are kept, so an interrupted
    build resumes; each subject is a pure function of (seed, scan, kind, index), so scans may be
    written by separate processes (each scan keeps its own record, ``subjects_<scan>.json``).
    """
    settings = settings or POOL_VIEWS
    pool = Path(out) / "pool"
    (pool / "imagesTr").mkdir(parents=True, exist_ok=True)
    (pool / "labelsTr").mkdir(parents=True, exist_ok=True)
    (pool / "organsTr").mkdir(parents=True, exist_ok=True)
    scans = scans if scans is not None else load_scans(names=TRAIN_SCANS)
    subjects = []
    for scan in scans:
        s_index = TRAIN_SCANS.index(scan.name) if scan.name in TRAIN_SCANS else len(TRAIN_SCANS)
        record_path = pool / f"subjects_{scan.name}.json"
        records = {r["name"]: r for r in json.loads(record_path.read_text())} if record_path.is_file() else {}
        means = group_means(scan.image.array, group_map(scan.labels, scan.version))
        for kind in kinds_of(scan):
            k_index = KINDS.index(kind)
            for n in range(subjects_per_kind(scan, per_kind)):
                name = f"{scan.patient.lower()}_{kind}_{n:03d}"
                img_path, lab_path = pool / "imagesTr" / f"{name}.nii.gz", pool / "labelsTr" / f"{name}.nii.gz"
                org_path = pool / "organsTr" / f"{name}.nii.gz"
                seeds = [seed, s_index, k_index, n]
                if name in records and img_path.is_file() and lab_path.is_file():
                    r = records[name]
                    subjects.append(Subject(name, r["patient"], r["kind"], r["spleen_ml"], {}))
                    if not org_path.is_file():  # written before organ maps existed: made again from its seed
                        _write_organs_of(scan, seeds, settings, lab_path, org_path)
                    continue
                t0 = time.perf_counter()
                rng = np.random.default_rng(seeds)
                hu, spleen, organs, affine, info = make_subject(scan, kind, rng, settings, means)
                write_nifti(img_path, hu, affine, overwrite=True)
                write_nifti(lab_path, spleen, affine, overwrite=True)
                write_nifti(org_path, organs, affine, overwrite=True)
                ml = float(spleen.sum()) * float(np.prod(settings.spacing)) / 1000.0
                subject = Subject(name, scan.patient, kind, ml, {"scan": scan.name, **info})
                subjects.append(subject)
                records[name] = subject.to_dict()
                record_path.write_text(json.dumps(list(records.values()), indent=1))
                if log:
                    log(
                        f"{name}: {info['view']} view {info['shape']}, {info['phase']}, spleen {ml:.0f} mL "
                        f"({time.perf_counter() - t0:.1f} s)"
                    )
    return subjects


def _write_organs_of(scan: Scan, seeds: list[int], settings: ViewSettings, lab_path: Path, org_path: Path) -> None:
    """Make the organ map of a subject on disk again, and check it against the subject's spleen mask.

    The view is the first thing :func:`make_subject` draws from the subject's generator, so the
    same seeds give the same view, and its labels without making the image again.
    """
    import nibabel as nib

    view = draw_view(scan, np.random.default_rng(seeds), settings)
    labels = sample_view(scan, view, settings.spacing)[1]
    spleen = (labels == 1).astype(np.uint8)
    stored = nib.load(str(lab_path))
    if stored.shape != spleen.shape or not np.array_equal(np.asarray(stored.dataobj, dtype=np.uint8), spleen):
        raise ValueError(
            f"{lab_path.name}: the view drawn again from its seed does not match the stored spleen mask; "
            "the pool was written with other settings: build it again into an empty folder"
        )
    write_nifti(org_path, organ_map(labels, scan.version), stored.affine, overwrite=True)


def read_pool_records(out: str | os.PathLike[str]) -> list[dict]:
    """Every subject's record in ``OUT/pool`` (all ``subjects_<scan>.json`` files, in TRAIN_SCANS order)."""
    pool = Path(out) / "pool"
    records = []
    for name in TRAIN_SCANS:
        path = pool / f"subjects_{name}.json"
        if path.is_file():
            records += json.loads(path.read_text())
    if not records:
        raise FileNotFoundError(f"no subject records in {pool}: build the pool first")
    return records


def write_real_cases(out: str | os.PathLike[str], scans: list[Scan]) -> dict[str, tuple[Path, Path]]:
    """Write each real scan and its spleen pseudo-label as NIfTI under ``OUT/real`` (for validation)."""
    folder = Path(out) / "real"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    cases = {}
    for scan in scans:
        name = f"real_{scan.name}"
        img, lab = folder / "imagesTr" / f"{name}.nii.gz", folder / "labelsTr" / f"{name}.nii.gz"
        if not (img.is_file() and lab.is_file()):
            write_nifti(img, np.round(scan.image.array).astype(np.int16), scan.image.affine, overwrite=True)
            write_nifti(lab, scan.spleen.astype(np.uint8), scan.image.affine, overwrite=True)
        cases[name] = (img, lab)
    return cases


def write_task(
    task_dir: str | os.PathLike[str],
    train: dict[str, tuple[Path, Path]],
    val: dict[str, tuple[Path, Path]],
    description: str,
    classes: tuple[str, ...] = ("background", "spleen"),
) -> Path:
    """An MSD task folder with symlinks to the cases, ``dataset.json`` and a one-fold ``splits.json``.

    Validation cases may also be training cases (a training-set check); they are listed once.
    ``classes`` names the label values 0, 1, ... (ORGAN_CLASSES for a multi-organ task).
    """
    root = Path(task_dir)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    pairs = []
    for name, (img, lab) in {**train, **val}.items():
        for sub, target in (("imagesTr", img), ("labelsTr", lab)):
            link = root / sub / f"{name}.nii.gz"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path(target).resolve())
        pairs.append((f"./imagesTr/{name}.nii.gz", f"./labelsTr/{name}.nii.gz"))
    labels = dict(enumerate(classes))
    name = "RealCTSpleen" if len(classes) == 2 else "RealCTOrgans"
    write_dataset_json(root, pairs, labels, name=name, description=description)
    (root / "splits.json").write_text(json.dumps([{"train": sorted(train), "val": sorted(val)}], indent=1))
    return root


def pool_cases(
    out: str | os.PathLike[str], subjects: list[Subject], patients: tuple[str, ...], labels: str = "labelsTr"
) -> dict[str, tuple[Path, Path]]:
    """Pool subjects of ``patients`` as name -> (image, label) paths (``labels="organsTr"``: their organ maps)."""
    pool = Path(out) / "pool"
    return {
        s.name: (pool / "imagesTr" / f"{s.name}.nii.gz", pool / labels / f"{s.name}.nii.gz")
        for s in subjects
        if s.patient in patients
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.realct.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="run folder (pool/ is written into it)")
    parser.add_argument(
        "--per-kind", type=int, default=20, help="subjects per patient and kind (real views, synthetic)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ct-dir", type=Path, help="real-CT folder (default $VNETSEG_CT_DIR or ../shared/data/ct)")
    args = parser.parse_args(argv)
    try:
        scans = load_scans(args.ct_dir, TRAIN_SCANS)
        subjects = write_pool(args.out, args.per_kind, args.seed, scans)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(subjects)} subjects in {args.out / 'pool'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bundle the trained networks into the shipped model file, score it, and write its card.

The main V-Net and the locator are read from the training runs, rounded to float16 exactly as the
file will store them, scored on every real CT (fast and full mode) and on every CT's spleen-free
parts (chest, lower abdomen, pelvis), and saved with :func:`vnetseg.checkpoint.save_model` (one file, locator inside).
``registry.json`` records the file's SHA-256; ``MODEL_CARD.md`` is written from the card.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vnetseg
from vnetseg.checkpoint import ModelInfo, Preprocessing, load_model, save_model
from vnetseg.model import VNet
from vnetseg.postprocess import APPENDAGE_RADIUS_MM, APPENDAGE_REACH_MM, GROW_PROBABILITY, NATIVE_MAX_HU, dice

from .build import read_pool_records
from .card import MODEL_FILE, MODEL_NAME, render_markdown, render_readme_section, write_registry
from .evaluate import evaluate_image, evaluate_scan
from .sources import PATIENTS, load_scans, range_end_parts, spleen_free_parts

COMMAND = "python scripts/make_spleen_model.py --out runs/spleen_model"
CORE = Path(vnetseg.__file__).parent
SCORED_CODE = ("inference.py", "fast.py", "preprocess.py", "postprocess.py")
# The network answers best when its window shows the whole spleen with its surroundings (trained
# mostly on patches around the organ). 256 x 256 voxels in-plane are 384 x 384 mm, most of an
# abdomen's cross-section, so full mode's windows see the organ whole as fast mode's window does
# and the two modes agree: fast vs full Dice on the three real CTs 0.9908 / 1.0000 / 0.9960 with
# 256 against 0.9861 / 0.9948 / 0.9858 with 160 (v1.0.0), 0.9863 / 0.9943 / 0.9855 with 240, the
# same accuracy against the pseudo-labels. 32 slices deep as in training: deeper windows over thin
# slabs (20-slice P2) add padding it never saw.
INFERENCE_PATCH = (256, 256, 32)
VERSION = "2.4.0"
# the locator check (v2.4.0, ``--stage check``): the multi-organ locator trained on the same patients
# ("organ", "organ:P" in training/realct/locator_members) must not give a located part a larger mean kidney
# than spleen probability (no floor on the spleen's: a floor of 0.1 vetoed right spleens; README "The
# multi-organ locator again")
CHECK_MIN = 0.0
CHECK_RIVALS = ("Kidney",)
# the native-CT growth measured for this recipe's networks (vnetseg.postprocess.grow_native)
SHIPPED_POSTPROCESSING = {"native_grow_probability": GROW_PROBABILITY}


def fp16_roundtrip(net: VNet) -> VNet:
    """The network with its floating-point weights rounded to float16 and back (what the file holds)."""
    state = {k: v.half().float() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    return net.eval()


def bundle_in_memory(main: Path, locator: Path) -> tuple[VNet, ModelInfo]:
    """Main network + locator as the shipped file holds them (float16 weights, inference window), in memory."""
    net, info = load_model(main)
    loc_net, loc_info = load_model(locator)
    info = _with_patch(info, INFERENCE_PATCH, postprocessing=SHIPPED_POSTPROCESSING)
    info.locator = (fp16_roundtrip(loc_net), _with_patch(loc_info, INFERENCE_PATCH))
    return fp16_roundtrip(net), info


def _with_patch(
    info: ModelInfo, patch: tuple[int, int, int], card: dict[str, Any] | None = None, postprocessing: dict[str, float] | None = None
) -> ModelInfo:
    pre = Preprocessing(**{**info.preprocessing.__dict__, "patch_size": patch})
    return ModelInfo(info.config, pre, info.labels, card if card is not None else {}, postprocessing=postprocessing or {})


def score_all(
    net: VNet, info: ModelInfo, log: Callable[[str], None], patients: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Fast- and full-mode results on every real CT (of ``patients``), their agreement, and spleen-free parts.

    The spleen-free parts are each CT's part above or below its spleen (:func:`spleen_free_parts`):
    chest with the heart, lower abdomen, pelvis; the right answer there is "no spleen". The same
    parts with the scan range ending 10-80 mm beyond the spleen (:func:`range_end_parts`, fast mode)
    are "range_ends".
    """
    scans = [s for s in load_scans() if patients is None or s.patient in patients]
    cases, agreement, free, ends = [], [], [], []
    for scan in scans:
        by_mode = {}
        for mode in ("fast", "full"):
            row = evaluate_scan(scan, net, info, mode=mode)
            by_mode[mode] = row.pop("_mask")
            cases.append(row)
            log(f"  {scan.name} {mode}: {json.dumps(row)}")
        a, b = by_mode["fast"], by_mode["full"]
        vol_diff = 100.0 * (a.sum() - b.sum()) / max(int(b.sum()), 1)
        agreement.append(
            {
                "scan": scan.name,
                "dice_fast_vs_full": round(float(dice(a, b)), 4),
                "volume_diff_pct": round(float(vol_diff), 2),
            }
        )
        if scan.name == "p1_sm":  # a crop of p1_ct: its parts are p1_ct's
            continue
        for part, image in spleen_free_parts(scan).items():
            for mode in ("fast", "full"):
                row = {"scan": scan.name, "patient": scan.patient, "part": part, "slices": image.shape[2],
                       **evaluate_image(image, net, info, mode)}
                free.append(row)
                log(f"  spleen-free {scan.name} {part}: {json.dumps(row)}")
        for part, image in range_end_parts(scan).items():  # fast mode: the whole-CT view is both modes' decision
            row = {"scan": scan.name, "patient": scan.patient, "part": part, "slices": image.shape[2],
                   **evaluate_image(image, net, info, "fast")}
            ends.append(row)
            log(f"  range end {scan.name} {part}: {row['volume_ml']} mL")
    return {"cases": cases, "fast_vs_full": agreement, "spleen_free": free, "range_ends": ends}


def precision_check(net32: VNet, net16: VNet, info: ModelInfo) -> list[dict[str, Any]]:
    """Float16 (as stored) vs float32 (as trained) weights on every real CT, full mode: masks and probabilities."""
    from vnetseg.inference import (
        InferenceOptions,
        WindowSettings,
        predict_volume,
        sliding_window,
        softmax_foreground,
        window_for,
    )
    from vnetseg.preprocess import make_grid_map, to_model_grid, window_hu

    pre = info.preprocessing
    rows = []
    for scan in load_scans():
        masks = [
            predict_volume(scan.image, net, info, InferenceOptions(device="cpu", mode="full")).labelmap > 0
            for net in (net32, net16)
        ]
        grid = make_grid_map(scan.image.shape, scan.image.affine, pre.target_spacing)
        volume = window_hu(to_model_grid(scan.image.array, grid), pre.hu_window, pre.scale)[None]
        patch = window_for(pre.patch_size, grid.model_shape, net16.config.size_multiple)
        probs = [
            sliding_window(volume, softmax_foreground(net, False), WindowSettings(patch, 0.25, 1, pre.scale[0]), 1)
            for net in (net32, net16)
        ]
        rows.append(
            {
                "scan": scan.name,
                "mask_dice": round(float(dice(masks[0], masks[1])), 5),
                "volume_diff_pct": round(100.0 * (int(masks[1].sum()) / max(int(masks[0].sum()), 1) - 1.0), 3),
                "max_probability_diff": round(float(np.abs(probs[0] - probs[1]).max()), 5),
            }
        )
    return rows


def cached_scores(out: Path, net: VNet, info: ModelInfo, log: Callable[[str], None]) -> dict[str, Any]:
    """:func:`score_all`, reused from ``out`` when the same weights and settings were scored before."""
    from vnetseg.checkpoint import weights_digest

    assert info.locator is not None
    key = weights_digest({**net.state_dict(), **{f"loc.{k}": v for k, v in info.locator[0].state_dict().items()}})
    # the inference code is part of the key: scores from an older fast mode must not describe this one
    code = hashlib.sha256(
        b"".join((CORE / name).read_bytes() for name in SCORED_CODE) + (Path(__file__).parent / "evaluate.py").read_bytes()
    ).hexdigest()
    path = out / f"scores_{key[:16]}_{code[:8]}_{'x'.join(map(str, info.preprocessing.patch_size))}.json"
    if path.is_file():
        log(f"reusing the scores in {path}")
        return json.loads(path.read_text())
    log("scoring the shipped weights on the real CTs")
    results = score_all(net, info, log)
    path.write_text(json.dumps(results, indent=1))
    return results


def _train_minutes(run_dir: Path) -> float | None:
    path = run_dir / "train_time.json"
    return json.loads(path.read_text())["minutes"] if path.is_file() else None


def write_outputs(
    out: Path, weights_dir: Path, seed: int, budget: dict[str, int], per_kind: int, log: Callable[[str], None] = print
) -> Path:
    """Build, score and write the shipped model file, registry.json and MODEL_CARD.md."""
    main_dir, loc_dir = out / "runs" / "final_main_settle" / "fold_0", out / "runs" / "final_locator_refine" / "fold_0"
    main_net, main_info = load_model(main_dir / "model_last.pt")
    loc_net, loc_info = load_model(loc_dir / "model_last.pt")
    main_net32 = load_model(main_dir / "model_last.pt")[0].eval()  # as trained, to check the float16 copy against
    main_net, loc_net = fp16_roundtrip(main_net), fp16_roundtrip(loc_net)
    loc_card = {
        "role": "locator",
        "description": (
            f"V-Net widths {list(loc_info.config.widths)} (batch norm) at 4 x 4 x 4 mm, run once over the "
            "whole CT; full mode then segments the body's box at 1.5 x 1.5 x 2 mm with "
            f"{' x '.join(map(str, INFERENCE_PATCH))}-voxel windows, fast mode only those of full mode's "
            "windows that touch the located part's box plus 15 mm (so its mask is full mode's). In both modes the part it locates is the "
            "spleen: the one holding the most probability, at least 10 mL, among the parts whose centre lies on "
            "the patient's left of the body's centre and that have at most 50 mL of lung straight below them "
            "(the spleen lies under the diaphragm; a part above lung is in the chest). Nothing located means "
            "'no spleen found in the field of view', and the full-resolution mask keeps only its component on "
            "the located part. "
            "Trained with training.engine on the same subjects as the main network."
        ),
        "trained_steps": (budget["locator"] + budget["locator_refine"]) * 20,
        "train_minutes": [_train_minutes(out / "runs" / "final_locator" / "fold_0"), _train_minutes(loc_dir)],
    }
    loc_info = _with_patch(loc_info, INFERENCE_PATCH, loc_card)
    info = _with_patch(main_info, INFERENCE_PATCH, postprocessing=SHIPPED_POSTPROCESSING)
    info.locator = (loc_net, loc_info)
    results = cached_scores(out, main_net, info, log)
    lopo = {h: json.loads((out / f"lopo_{h}.json").read_text()) for h in PATIENTS if (out / f"lopo_{h}.json").is_file()}
    subjects = read_pool_records(out)
    card = build_card(
        seed,
        budget,
        per_kind,
        subjects,
        results,
        lopo,
        main_info,
        loc_info,
        {
            "main_stage1": _train_minutes(out / "runs" / "final_main" / "fold_0"),
            "main_stage2": _train_minutes(out / "runs" / "final_main_context" / "fold_0"),
            "main_stage3": _train_minutes(out / "runs" / "final_main_polish" / "fold_0"),
            "main_stage4": _train_minutes(out / "runs" / "final_main_refine" / "fold_0"),
            "main_stage5": _train_minutes(main_dir),
            "locator": _train_minutes(out / "runs" / "final_locator" / "fold_0"),
            "locator_stage2": _train_minutes(loc_dir),
        },
    )
    log("float16 vs float32 weights on the real CTs")
    from vnetseg.checkpoint import weights_digest

    precision_path = out / f"precision_{weights_digest(main_net32.state_dict())[:16]}.json"
    if precision_path.is_file():  # the same weights were checked before (a re-bundle after new held-out runs)
        card["float16_vs_float32"] = json.loads(precision_path.read_text())
    else:
        card["float16_vs_float32"] = precision_check(main_net32, main_net, info)
        precision_path.write_text(json.dumps(card["float16_vs_float32"], indent=1))
    log(f"  {card['float16_vs_float32']}")
    info.card = card
    weights_dir.mkdir(parents=True, exist_ok=True)
    path = weights_dir / MODEL_FILE
    sha = save_model(path, main_net, info, half=True, locator=(loc_net, loc_info))
    net2, _info2 = load_model(path, sha256=sha)  # the written file must load and agree with what was scored
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net2(x), main_net(x), atol=1e-4), "written weights differ from the scored ones"
    write_registry(weights_dir, sha, card)
    (weights_dir / "MODEL_CARD.md").write_text(render_markdown(card, sha, path.stat().st_size))
    (out / "README_SECTION.md").write_text(render_readme_section(card, sha, path.stat().st_size))  # for README.md
    (out / "shipped_results.json").write_text(json.dumps({"sha256": sha, "card": card}, indent=1))
    log(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, sha256 {sha})")
    return path


def build_card(
    seed: int,
    budget: dict[str, int],
    per_kind: int,
    subjects: list[dict],
    results: dict[str, Any],
    lopo: dict[str, Any] | None,
    main_info: ModelInfo,
    loc_info: ModelInfo,
    minutes: dict[str, float | None],
) -> dict[str, Any]:
    """The model card (a JSON-able dict stored in the model file)."""
    kinds = {k: sum(1 for s in subjects if s["kind"] == k) for k in ("real", "syn")}
    no_spleen = sum(1 for s in subjects if s["spleen_ml"] == 0)
    per_patient = {p: sum(1 for s in subjects if s["patient"] == p) for p in PATIENTS}
    return {
        "name": MODEL_NAME,
        "version": VERSION,
        "trained": True,
        "task": "spleen segmentation in CT (one label: 1 = spleen), with 'no spleen found in the field of view' "
        "as an answer",
        "architecture": (
            f"V-Net ({main_info.config.to_dict()}), the 'light' preset's shape with quarter widths "
            "(half the CPU time) and batch norm (fixed statistics at inference, unlike instance norm's "
            f"per-window ones); run with {INFERENCE_PATCH[0]} x {INFERENCE_PATCH[1]} x {INFERENCE_PATCH[2]} "
            "windows: 384 x 384 mm in-plane, most of an abdomen's cross-section, so that full mode's "
            "windows, like fast mode's, show the spleen whole with its surroundings; 32 slices deep as in "
            "training. A 4 mm locator looks at the whole CT first and decides, for both modes, whether a "
            "spleen is in view and which part of the CT it is"
        ),
        "training_data": {
            "source": "five patients' real CTs: two abdominal CTs of the TotalSegmentator test fixtures "
            "(github.com/wasserth/TotalSegmentator, Apache-2.0; TotalSegmentator data CC-BY-4.0) and three "
            "TCIA CTs (CPTAC-LSCC, ACRIN-FLT-Breast, LIDC-IDRI; CC BY 3.0)",
            "citation": "Wasserthal J. et al., TotalSegmentator: Robust Segmentation of 104 Anatomic Structures "
            "in CT Images, Radiology: Artificial Intelligence 2023; Clark K. et al., The Cancer Imaging Archive "
            "(TCIA), J Digit Imaging 2013, with the collections CPTAC-LSCC, ACRIN-FLT-Breast (ACRIN 6688) and "
            "LIDC-IDRI",
            "patients": {
                "P1": "example_ct.nii.gz (abdomen + pelvis, 3 mm, native phase) with its v1 104-class label map; "
                "example_ct_sm.nii.gz is slices 82-111 of the same CT (used for testing only)",
                "P2": "20-slice contrast CT DICOM series (0.98 x 0.98 x 2 mm, portal-venous-like) with its v2 "
                "117-class label map",
                "P3": "TCIA CPTAC-LSCC C3N-00247: contrast chest CT reaching the upper abdomen, sharp B70f "
                "kernel, 0.56 x 0.56 x 3 mm, heart in view; spleen-only reference",
                "P4": "TCIA ACRIN-FLT-Breast_001: native low-dose PET/CT CT, 140 kVp, heart to pelvis, "
                "0.98 x 0.98 x 4.25 mm; spleen-only reference",
                "P5": "TCIA LIDC-IDRI-0001: contrast chest CT from the neck base to the mid kidneys, "
                "0.70 x 0.70 x 2.5 mm, shoulders and heart in view; spleen-only reference",
            },
            "same_person": "unknown whether P1 and P2 are the same person; P3-P5 are three other people",
            "labels": "P1, P2: TotalSegmentator predictions (pseudo-labels); P3-P5: semi-automatic references "
            "(classical image processing, checked slice by slice, a little generous at the edges); none is "
            "manual ground truth",
            "subjects": {
                "real_views": kinds["real"],
                "synthetic": kinds["syn"],
                "without_spleen": no_spleen,
                "per_patient": per_patient,
                "per_patient_and_kind": per_kind,
            },
        },
        "method": (
            "Training subjects made from the five patients (training/realct): random fields of view (on the "
            "spleen, anywhere in the body, or away from it - wholly above it (chest, heart), below it (lower "
            "abdomen, pelvis) or on the patient's right - so the model learns what the spleen is not and to say "
            "'no spleen'), affine (rotation, anisotropic scale) and smooth elastic deformation, read straight "
            "from the scan on a 1.5 x 1.5 x 2.0 mm RAS grid; P1 and P2's real images with contrast-phase "
            "changes of the organs and vessels, or synthetic CTs in which every soft-tissue structure of their "
            "label maps is filled with its tissue's HU for a drawn phase (native, arterial, portal, delayed) "
            "with texture; P3-P5 as scanned (two contrast chest CTs with the heart, one native low-dose CT); "
            "then simulated slice thickness (3-5 mm), blur, gain/offset and white or correlated noise. Never "
            "mirrored left-right. Training with training.engine (Dice + cross-entropy, AdamW, cosine schedule, "
            "batch 2, half of the patches centred on the spleen, light MONAI augmentation), HU window "
            "[-57, 164], in five stages: 64^3 patches, then 128 x 128 x 32 patches from those weights, then a "
            "short low-rate pass with more patches away from the spleen, then two with the spleen placed "
            "anywhere in the patch (the held-out pairs have every stage too, with a shorter first one). "
            "The locator: 64 x 64 x 48 patches at 4 mm (256 x 256 x 192 mm), 40 % on the spleen, two stages; "
            "a third of its patches end at an axial plane, as a CT's scan range does (half of those through the "
            "spleen, half 0-40 mm beyond it with all of it removed), so that where a CT ends does not say where "
            "the spleen is. The last weights of each stage are used (no "
            "checkpoint selection). In both modes the full-resolution mask keeps only its component that "
            "overlaps the part the locator located (grown by 12 mm) most; a located part under 10 mL means no "
            "spleen in view, and a part on the patient's right or with lung beneath it is never located; then "
            "the mask is trimmed to the spleen's own HU range (median +- 4 robust SD of its core), on native CT "
            f"(core under {NATIVE_MAX_HU:g} HU) grown into connected voxels of probability over {GROW_PROBABILITY:g} in "
            f"that range (v2.2.0), thin pieces more than {APPENDAGE_REACH_MM:g} mm from the spleen's thick body (its "
            f"interior over {APPENDAGE_RADIUS_MM:g} mm from its surface) "
            "cut off (v2.3.0, still the networks of v2.1.0), and its holes are filled"
        ),
        "training": {
            "main_steps": f"{budget['final'] * 20} with 64^3 patches, then {budget['context'] * 20} with "
            "128 x 128 x 32 patches (192 mm of in-plane context) from those weights, then "
            f"{budget['polish'] * 20} more at a lower rate with a third of the patches on the spleen, then "
            f"{budget['refine'] * 20} with half on the spleen placed anywhere in the patch (fg_offset 1), then "
            f"{budget['settle'] * 20} more of those at half the rate",
            "locator_steps": f"{budget['locator'] * 20} + {budget['locator_refine'] * 20} at a lower rate",
            "batch_size": 2,
            "train_minutes_wall": minutes,
            "hardware": "2 CPU cores, one torch thread per run, no GPU",
            "reproducibility": "one thread and fixed seeds: each subject and each run is a pure function of the "
            "seed (torch 2.13.0+cpu); v1 of this recipe gave bit-identical weights in two runs from scratch",
        },
        "locator": loc_info.card,
        "leave_one_patient_out": lopo or "not run",
        "leave_one_patient_out_not_run": [p for p in PATIENTS if p not in (lopo or {})],
        "shipped_model_on_real_ct": {
            "note": "these CTs were used (augmented) to train the shipped model: not an independent test",
            **results,
        },
        "limits": [
            "research use only; not for clinical decisions",
            "made from five patients' CTs; not validated on MSD or any other data set",
            ("references are TotalSegmentator pseudo-labels (P1, P2) and semi-automatic masks (P3-P5), not manual "
            "segmentations"),
            (
                "trained for minutes on a CPU; expect failures on CTs unlike the training scans "
                "(children, splenomegaly, situs inversus, other scanners and reconstructions, metal, MRI)"
            ),
        ],
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "command": COMMAND,
        "software": {
            "vnetseg": getattr(vnetseg, "__version__", "?"),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }


HELD_OUT_DIR = Path(__file__).parent / "heldout"


def held_out_record(patient: str, log: Callable[[str], None] = print, folder: Path = HELD_OUT_DIR,
                    check: bool = False) -> dict[str, Any]:
    """The card's leave-one-patient-out record of ``patient``, made again from its committed pair.

    The pair (``heldout/heldout_P.pt``, its SHA-256 checked against ``heldout.json``) is scored as the
    ``lopo`` stage scores a pair it has just trained (:func:`score_all` on the patient's CTs, parts and
    range ends), so the record is the one the regeneration command writes, without an hour of training.

    ``check``: the pair gets the multi-organ locator trained without its patient as its locator check
    (``training.realct.members.attach_check``, ``CHECK_MIN``, ``CHECK_RIVALS``), as the shipped file has the
    one trained on all five.

    Raises:
        ValueError: when the pair's masks are no longer the ones saved in its own file (the inference
            changed since it was scored): a card must not mix records of two inferences.
    """
    from .members import attach_check

    entry = json.loads((folder / "heldout.json").read_text())[patient]
    net, info = load_model(folder / entry["file"], sha256=entry["sha256"])
    if check and not attach_check(info, patient, CHECK_MIN, CHECK_RIVALS):
        raise ValueError(f"no multi-organ locator trained without {patient} is listed: train it with --stage "
                         f"locator_seed --organ-locator --without {patient} --seed-offset 0")
    scores = score_all(net, info, log=log, patients=(patient,))
    saved = {(c["scan"], c["mode"]): c for c in info.card["cases"]}
    for case in scores["cases"]:
        old = saved[(case["scan"], case["mode"])]
        if abs(case["dice"] - old["dice"]) > 1e-4 or abs(case["volume_ml"] - old["volume_ml"]) > 0.05:
            raise ValueError(
                f"held-out pair {entry['file']} now gives {case['scan']} {case['mode']} Dice {case['dice']} "
                f"({case['volume_ml']} mL) against {old['dice']} ({old['volume_ml']} mL) saved in the file: "
                "the inference changed since it was scored; retrain the pair (--stage lopo) instead"
            )
    record = {"trained_on": info.card["trained_on"], "steps": info.card["steps"],
              "train_minutes": info.card["train_minutes"], **scores}
    if check:
        record["locator_check"] = {"min_probability": CHECK_MIN, "rivals": list(CHECK_RIVALS), "network": f"organ:{patient}"}
    return record


def _load_shipped(weights_dir: Path) -> tuple[VNet, ModelInfo]:
    """The model file in ``weights_dir``, refused unless it is the one its registry.json names."""
    registry = json.loads((weights_dir / "registry.json").read_text())["models"][MODEL_NAME]
    return load_model(weights_dir / MODEL_FILE, sha256=registry["sha256"])


def rescore_shipped(weights_dir: Path, log: Callable[[str], None] = print,
                    check: tuple[VNet, ModelInfo, float] | None = None) -> dict[str, Any]:
    """The shipped file's own results (:func:`score_all` on every real CT, part and range end) with today's
    inference (``check``: with that locator check, as the file will carry it)."""
    net, info = _load_shipped(weights_dir)
    if check is not None:
        info.locator_check, info.locator_check_min = (check[0], check[1]), float(check[2])
        info.locator_check_rivals = CHECK_RIVALS
    return score_all(net, info, log)


def rewrite_card(
    weights_dir: Path, records: dict[str, dict[str, Any]], version: str, change: str, out: Path | None = None,
    log: Callable[[str], None] = print, shipped: dict[str, Any] | None = None,
    check: tuple[VNet, ModelInfo, float] | None = None,
) -> str:
    """Write the shipped file again with the same networks and ``records`` as its held-out records.

    Only the card changes (``version``, the date, ``changes`` gains ``change`` in place of an earlier
    entry for the same version, and with ``shipped``
    the shipped model's own results, from :func:`rescore_shipped`); every weight is checked bit for
    bit against the file it replaces. Returns the new file's SHA-256; registry.json and MODEL_CARD.md
    are written again (and ``out/README_SECTION.md`` when ``out`` is given). ``check``: (network, info,
    smallest mean probability), the locator check the file carries from now on (a file that has one keeps
    it); its weights are checked against the network given.
    """
    path = weights_dir / MODEL_FILE
    net, info = _load_shipped(weights_dir)
    assert info.locator is not None
    before = {**net.state_dict(), **{f"loc.{k}": v for k, v in info.locator[0].state_dict().items()}}
    if check is not None:
        info.locator_check, info.locator_check_min = (check[0], check[1]), float(check[2])
        info.locator_check_rivals = CHECK_RIVALS
    if info.locator_check is not None:
        before.update({f"check.{k}": v for k, v in info.locator_check[0].state_dict().items()})
    card = dict(info.card)
    lopo = {**card["leave_one_patient_out"], **records}
    card["leave_one_patient_out"] = {p: lopo[p] for p in PATIENTS if p in lopo}
    card["leave_one_patient_out_not_run"] = [p for p in PATIENTS if p not in lopo]
    if shipped is not None:
        card["shipped_model_on_real_ct"] = {"note": card["shipped_model_on_real_ct"]["note"], **shipped}
    # a card written again for the same version says what that version is once, not once per run
    earlier = [c for c in card.get("changes", []) if not c.startswith(f"v{version}: ")]
    card["changes"] = [*earlier, f"v{version}: {change}"]
    card["version"] = version
    card["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    info.card = card
    kept = None if info.locator_check is None else (*info.locator_check, info.locator_check_min)
    sha = save_model(path, net, info, half=True, locator=info.locator, locator_check=kept,
                     locator_check_rivals=info.locator_check_rivals)
    net2, info2 = load_model(path, sha256=sha)
    after = {**net2.state_dict(), **{f"loc.{k}": v for k, v in info2.locator[0].state_dict().items()}}
    if info2.locator_check is not None:
        after.update({f"check.{k}": v for k, v in info2.locator_check[0].state_dict().items()})
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    if changed or set(before) != set(after):
        raise RuntimeError(f"rewriting the card changed weights: {changed[:5]}")
    write_registry(weights_dir, sha, card)
    size = path.stat().st_size
    (weights_dir / "MODEL_CARD.md").write_text(render_markdown(card, sha, size))
    if out is not None:
        (out / "README_SECTION.md").write_text(render_readme_section(card, sha, size))
    log(f"wrote {path} ({size / 1e6:.2f} MB, sha256 {sha}): same weights, card v{version}")
    return sha


# v2.5.0 (``--stage big`` then ``--stage ship_big``): the main network trained on with enlarged spleens
ENLARGED_CHANGE = (
    "the main network trained on for 300 more steps (128 x 128 x 32, rate 3e-4) from v2.4.0's weights with 40 "
    "enlarged-spleen subjects (training/realct/enlarge.py: each real CT's spleen region magnified 1.1-1.6 times, "
    "150-1070 mL) beside the pool's 136; the locator and its check unchanged; the held-out records made the same "
    "way from each committed pair"
)


def ship_enlarged(out: Path, weights_dir: Path, version: str, log: Callable[[str], None] = print) -> str:
    """Write the shipped file from ``OUT/big_final.pt`` and the held-out pairs from ``OUT/big_P.pt``.

    The card is v2.4.0's with the new networks' results (``OUT/big_final.json``), the five held-out
    records (``OUT/big_P.json``, each scored with its patient's locator check), the enlarged-spleen stage
    in ``training`` and ``changes``. Each pair is written float16 to ``heldout/heldout_P.pt`` (without the
    check, which ``held_out_record`` attaches) with its record as its card, and ``heldout.json`` gets its
    digest. Refused unless all six runs are there and each model file's locator is its base's, bit for bit.
    Returns the shipped file's SHA-256.
    """
    from vnetseg.checkpoint import file_sha256

    missing = [k for k in ("final", *PATIENTS) if not (out / f"big_{k}.pt").is_file() or not (out / f"big_{k}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"--stage big has not been run for {missing}: run it first (--held P for each)")
    manifest = json.loads((HELD_OUT_DIR / "heldout.json").read_text())
    records = {}
    for p in PATIENTS:
        record = json.loads((out / f"big_{p}.json").read_text())
        _, base_info = load_model(HELD_OUT_DIR / manifest[p]["file"], sha256=manifest[p]["sha256"])
        net, info = load_model(out / f"big_{p}.pt")
        _same_locator(base_info, info, f"big_{p}.pt")
        keep = {"trained_on": record["trained_on"], "steps": record["steps"], "train_minutes": record["train_minutes"]}
        scores = {k: record[k] for k in ("cases", "fast_vs_full", "spleen_free", "range_ends")}
        records[p] = {**keep, **scores,
                      "locator_check": {"min_probability": CHECK_MIN, "rivals": list(CHECK_RIVALS), "network": f"organ:{p}"}}
        info.card = {**base_info.card, **keep, "cases": record["cases"], "held_out": p,
                     "enlarged_spleens": {"base_sha256": record["base_sha256"], "subjects": len(record["big_subjects"])}}
        path = HELD_OUT_DIR / f"heldout_{p}.pt"
        sha = save_model(path, net, info, half=True, locator=info.locator)
        manifest[p] = {**manifest[p], "file": path.name, "sha256": sha, "steps": record["steps"],
                       "train_minutes": record["train_minutes"],
                       "command": f"{manifest[p]['command']} && python scripts/make_spleen_model.py --out runs/spleen_model "
                                  f"--stage big --held {p}"}
        log(f"held-out pair {p}: {path.name} {sha[:12]}")
    (HELD_OUT_DIR / "heldout.json").write_text(json.dumps(manifest, indent=1) + "\n")
    _, old_info = _load_shipped(weights_dir)
    final = json.loads((out / "big_final.json").read_text())
    if final["base_sha256"] != file_sha256(weights_dir / MODEL_FILE):
        raise ValueError("big_final.json was trained from another shipped file than the one in the weights folder")
    net, info = load_model(out / "big_final.pt")
    _same_locator(old_info, info, "big_final.pt")
    card = dict(old_info.card)
    card["training"] = {**card["training"], "enlarged_spleen_steps": final["steps"],
                        "enlarged_spleen_minutes": final["train_minutes"]}
    card["leave_one_patient_out"] = records
    card["leave_one_patient_out_not_run"] = []
    card["shipped_model_on_real_ct"] = {"note": card["shipped_model_on_real_ct"]["note"],
                                        **{k: final[k] for k in ("cases", "fast_vs_full", "spleen_free", "range_ends")}}
    card["limits"] = [
        ("trained for minutes on a CPU; expect failures on CTs unlike the training scans (children, situs inversus, "
         "other scanners and reconstructions, metal, MRI); enlarged spleens are trained from magnified real CTs only "
         "(bench_acquisition: the whole-CT view trained without a patient still misses that patient's spleen "
         "magnified 1.45 times)")
        if item.startswith("trained for minutes") else item for item in card["limits"]]
    earlier = [c for c in card.get("changes", []) if not c.startswith(f"v{version}: ")]
    card["changes"] = [*earlier, f"v{version}: {ENLARGED_CHANGE}"]
    card["version"] = version
    card["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    info.card = card
    c_net, c_info = info.locator_check
    sha = save_model(weights_dir / MODEL_FILE, net, info, half=True, locator=info.locator,
                     locator_check=(c_net, c_info, info.locator_check_min), locator_check_rivals=info.locator_check_rivals)
    write_registry(weights_dir, sha, card)
    size = (weights_dir / MODEL_FILE).stat().st_size
    (weights_dir / "MODEL_CARD.md").write_text(render_markdown(card, sha, size))
    (out / "README_SECTION.md").write_text(render_readme_section(card, sha, size))
    log(f"wrote {weights_dir / MODEL_FILE} ({size / 1e6:.2f} MB, sha256 {sha}): v{version}")
    return sha


def _same_locator(base: ModelInfo, new: ModelInfo, what: str) -> None:
    """Refuse a model file whose locator is not its base's, bit for bit (v2.5.0 trains the main network only)."""
    a, b = base.locator[0].state_dict(), new.locator[0].state_dict()
    if set(a) != set(b) or any(not torch.equal(a[k], b[k]) for k in a):
        raise ValueError(f"{what}: its locator is not its base file's (was it made with --big-locator?)")

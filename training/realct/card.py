"""The shipped model's registry entry and its human-readable card (MODEL_CARD.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

MODEL_NAME = "spleen-ct-light"
MODEL_FILE = "spleen_ct_light.pt"


def write_registry(weights_dir: Path, sha256: str, card: dict[str, Any]) -> Path:
    """Write ``registry.json`` with this model as the default (its file's SHA-256 recorded)."""
    path = weights_dir / "registry.json"
    data = {
        "default": MODEL_NAME,
        "models": {
            MODEL_NAME: {
                "file": MODEL_FILE,
                "sha256": sha256,
                "description": f"{card['name']} v{card['version']}: spleen in CT, light V-Net at "
                "1.5 x 1.5 x 2 mm with a 4 mm locator that decides whether a spleen is in view; made from "
                "five patients' CTs (research use only)",
            }
        },
    }
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:g}"
    return str(value)


def _case_table(rows: list[dict[str, Any]], with_mode: bool = True) -> list[str]:
    head = (
        "| scan | patient | "
        + ("mode | " if with_mode else "")
        + "Dice | HD95 (mm) | volume (mL) | reference (mL) | volume error (%) | patient's left | components | warnings |"
    )
    head = head.replace(" warnings |", " away from the reference (mL) | warnings |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        side = "n/a" if r.get("empty") else ("yes" if r.get("patient_left") else "NO")
        away = _fmt(r.get("misplaced_ml", "?"))
        if r.get("misplaced_in"):
            away += " (" + ", ".join(f"{k} {v:g}" for k, v in r["misplaced_in"].items()) + ")"
        lines.append(
            f"| {r['scan']} | {r['patient']} | "
            + (f"{r['mode']} | " if with_mode else "")
            + f"{_fmt(r['dice'])} | {_fmt(r['hd95_mm'])} | {_fmt(r['volume_ml'])} | {_fmt(r['reference_ml'])} | "
            f"{_fmt(r['volume_error_pct'])} | {side} | {r.get('components', 0)} | {away} | "
            f"{'; '.join(r['warnings']) or '-'} |"
        )
    return lines


def _free_table(rows: list[dict[str, Any]]) -> list[str]:
    """Spleen-free parts: what each mode answered."""
    lines = ["| CT | part | slices | mode | answer | volume (mL) |", "|---|---|---|---|---|---|"]
    for r in rows:
        answer = r.get("message") or ("spleen found" if r["volume_ml"] > 0 else "empty")
        lines.append(
            f"| {r['scan']} | {r['part']} | {r['slices']} | {r['mode']} | {answer} | {_fmt(r['volume_ml'])} |"
        )
    return lines


def _ends_line(rows: list[dict[str, Any]], held_out: bool) -> str:
    """One sentence on the range-end parts (spleen-free CTs ending 10-80 mm beyond the spleen)."""
    said = sum(1 for r in rows if r.get("found") is False)
    worst = max(rows, key=lambda r: r["volume_ml"])
    line = (f"{'Held out, spleen-free' if held_out else 'Spleen-free'} CTs whose scan range ends 10-80 mm beyond "
            f"the spleen (fast mode): {said} of {len(rows)} answered 'no spleen found in the field of view'")
    if worst["volume_ml"] > 0:
        line += f"; the largest volume returned was {worst['volume_ml']:g} mL ({worst['scan']}, {worst['part']})"
    return line + "."


def _agreement(rows: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"{a['scan']} Dice {a['dice_fast_vs_full']:g}, volume {a['volume_diff_pct']:+g} %" for a in rows
    )


def render_markdown(card: dict[str, Any], sha256: str, size_bytes: int) -> str:
    """MODEL_CARD.md from the card stored in the model file."""
    data = card["training_data"]
    shipped = card["shipped_model_on_real_ct"]
    lines = [
        f"# Model card: {card['name']} v{card['version']}",
        "",
        f"File `{MODEL_FILE}` ({size_bytes / 1e6:.2f} MB, float16 weights), SHA-256 `{sha256}`.",
        f"Made on {card['date']} with seed {card['seed']} by:",
        "",
        "```",
        card["command"],
        "```",
        "",
        "**Limits.** " + "; ".join(card["limits"]) + ".",
        "",
        *([f"**Changes.** {'; '.join(card['changes'])}.", ""] if card.get("changes") else []),
        "## What it is",
        "",
        f"- Task: {card['task']}.",
        f"- Architecture: {card['architecture']}.",
        f"- Fast mode: {card['locator']['description']}",
        "",
        "## Training data",
        "",
        f"- Source: {data['source']}.",
        f"- Cite: {data['citation']}.",
        *[f"- {p}: {text}." for p, text in data["patients"].items()],
        f"- Same person? {data['same_person']}.",
        f"- Labels: {data['labels']}.",
        (
            f"- Subjects: {data['subjects']['real_views']} views of the real images and {data['subjects']['synthetic']} "
            f"synthetic CTs ({data['subjects']['without_spleen']} without any spleen)."
        ),
        "",
        "## Method",
        "",
        card["method"],
        "",
        (
            f"Training of the main network (steps of batch {card['training']['batch_size']}): "
            f"{card['training']['main_steps']}; locator: "
            f"{card['training']['locator_steps']} steps; on "
            f"{card['training']['hardware']}; wall-clock minutes per run {card['training']['train_minutes_wall']}. "
            f"Reproducibility: {card['training'].get('reproducibility', 'not checked')}."
        ),
        "",
        "## Leave-one-patient-out",
        "",
    ]
    lopo = card["leave_one_patient_out"]
    if isinstance(lopo, dict):
        all_steps = {h: v.get("steps", "?") for h, v in lopo.items()}
        if len(set(all_steps.values())) == 1:
            steps = f"{next(iter(all_steps.values()))} steps"
        else:  # pairs trained with different budgets (--budget): each says its own
            steps = "; ".join(f"{h}: {s} steps" for h, s in all_steps.items())
        lines.append(
            "Both networks (main V-Net and locator) trained without the held-out patient (its real image and "
            f"every subject made from it) with the same recipe ({steps}), scored in both modes on the "
            "held-out patient's real CTs against its reference, and on its spleen-free parts. 'Away from the "
            "reference' is the predicted volume more than 10 mm from every reference spleen voxel (for P1 and "
            "P2 broken down by the TotalSegmentator structure it covers)."
        )
        lines.append("")
        rows = [
            dict(r, scan=f"{r['scan']} (held out; trained on {', '.join(v['trained_on'])})")
            for v in lopo.values()
            for r in v["cases"]
        ]
        lines += _case_table(rows)
        lines += ["", "Fast vs full mode, held out: " + _agreement([a for v in lopo.values() for a in v["fast_vs_full"]]) + ".", ""]
        lines += _free_table([r for v in lopo.values() for r in v.get("spleen_free", [])])
        ends = [r for v in lopo.values() for r in v.get("range_ends", [])]
        if ends:
            lines += ["", _ends_line(ends, held_out=True)]
        if card.get("leave_one_patient_out_not_run"):
            lines += ["", f"Not run for {', '.join(card['leave_one_patient_out_not_run'])} (the session's time ran out)."]
    else:
        lines.append(f"{lopo}.")
    lines += [
        "",
        "## The shipped model on the real CTs",
        "",
        f"{shipped['note'][0].upper()}{shipped['note'][1:]}.",
        "",
        *_case_table(shipped["cases"]),
        "",
        "Fast vs full mode: " + _agreement(shipped["fast_vs_full"]) + ".",
        "",
        "Spleen-free parts of every CT (the answer should be 'no spleen found in the field of view'):",
        "",
        *_free_table(shipped["spleen_free"]),
        "",
    ]
    if shipped.get("range_ends"):
        lines += [_ends_line(shipped["range_ends"], held_out=False), "", *_free_table(shipped["range_ends"]), ""]
    if card.get("float16_vs_float32"):
        lines += [
            "Float16 weights (this file) vs the float32 weights they were rounded from, full mode: "
            + "; ".join(
                f"{r['scan']} mask Dice {r['mask_dice']:g}, volume {r['volume_diff_pct']:+g} %, "
                f"largest probability difference {r['max_probability_diff']:g}"
                for r in card["float16_vs_float32"]
            )
            + ".",
            "",
        ]
    return "\n".join(lines)


def render_readme_section(card: dict[str, Any], sha256: str, size_bytes: int) -> str:
    """The README section about the shipped model (the lead merges it into README.md)."""
    lopo = card["leave_one_patient_out"]
    shipped = card["shipped_model_on_real_ct"]
    lines = [
        "## The shipped spleen model",
        "",
        (
            f"`vnetseg predict` (without `--model`) and the Slicer module use `{MODEL_NAME}` v{card['version']} "
            f"(`VNetSegmentation/vnetseg/weights/{MODEL_FILE}`, {size_bytes / 1e6:.1f} MB, float16, SHA-256 "
            f"`{sha256[:16]}...`, checked on load). Its card: `vnetseg info VNetSegmentation/vnetseg/weights/{MODEL_FILE}` "
            "or `VNetSegmentation/vnetseg/weights/MODEL_CARD.md`."
        ),
        "",
        (
            "**What it is.** A light V-Net (1.5 x 1.5 x 2 mm, HU window [-57, 164], 256 x 256 x 32 windows) and "
            "a 4 mm locator that looks at the whole CT first and decides, in both modes, whether a spleen is in "
            "view and which part of the CT it is. Trained on a CPU from five patients' real CTs: two abdominal CTs "
            "of the TotalSegmentator test data (Apache-2.0; data CC-BY-4.0; Wasserthal et al., Radiology: AI 2023) "
            "and three TCIA CTs (CPTAC-LSCC, ACRIN-FLT-Breast, LIDC-IDRI; CC BY 3.0; Clark et al., J Digit "
            "Imaging 2013): three contrast-enhanced, two native, three with the heart in view; turned into "
            "training subjects (deformed views of the real images, other contrast phases, synthetic CTs drawn "
            "from the label maps, and views wholly above or below the spleen). "
            "**Research use only; not for clinical decisions; made from five patients; not validated on MSD.**"
        ),
        "",
        ("**Leave-one-patient-out** (both networks trained without the patient, scored on its real CTs; "
        "'away' = predicted mL more than 10 mm from the reference spleen):"),
        "",
    ]
    if isinstance(lopo, dict):
        lines += ["| held out | scan | mode | Dice | HD95 (mm) | volume error (%) | away (mL) |", "|---|---|---|---|---|---|---|"]
        for held, v in lopo.items():
            for r in v["cases"]:
                lines.append(
                    f"| {held} | {r['scan']} | {r['mode']} | {_fmt(r['dice'])} | {_fmt(r['hd95_mm'])} | "
                    f"{_fmt(r['volume_error_pct'])} | {_fmt(r.get('misplaced_ml', '?'))} |"
                )
        if card.get("leave_one_patient_out_not_run"):
            lines += ["", f"Not run for {', '.join(card['leave_one_patient_out_not_run'])} (the session's time ran out)."]
        free = [r for v in lopo.values() for r in v.get("spleen_free", [])]
        if free:
            worst = max(r["volume_ml"] for r in free)
            said = sum(1 for r in free if r.get("found") is False)
            lines += ["", (f"Held-out spleen-free parts (chest, lower abdomen, pelvis): {said} of {len(free)} runs "
                      f"answered 'no spleen found in the field of view'; the largest volume returned was {worst:g} mL.")]
        ends = [r for v in lopo.values() for r in v.get("range_ends", [])]
        if ends:
            lines += ["", _ends_line(ends, held_out=True)]
    else:
        lines.append(f"{lopo}.")
    lines += [
        "",
        "**The shipped model on the same CTs** (used in training, so not an independent test):",
        "",
        "| scan | mode | Dice | HD95 (mm) | volume (mL) | reference (mL) | away (mL) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in shipped["cases"]:
        lines.append(
            f"| {r['scan']} | {r['mode']} | {_fmt(r['dice'])} | {_fmt(r['hd95_mm'])} | {_fmt(r['volume_ml'])} | "
            f"{_fmt(r['reference_ml'])} | {_fmt(r.get('misplaced_ml', '?'))} |"
        )
    free = shipped["spleen_free"]
    lines += [
        "",
        f"Fast vs full mode: {_agreement(shipped['fast_vs_full'])}.",
        "",
        (f"Spleen-free parts of every CT: {sum(1 for r in free if r.get('found') is False)} of {len(free)} runs answered "
        f"'no spleen found in the field of view'; largest volume returned {max(r['volume_ml'] for r in free):g} mL."),
        "",
        *([_ends_line(shipped["range_ends"], held_out=False), ""] if shipped.get("range_ends") else []),
        ("Regenerate it from scratch (fixed seed, one CPU thread per run; needs `../shared/data/ct`; the script's "
        "docstring says how to run the stages side by side and how long each takes):"),
        "",
        "```",
        card["command"],
        "```",
        "",
    ]
    return "\n".join(lines)

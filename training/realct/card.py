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
                "description": f"{card['name']} v{card['version']}: spleen in abdominal CT, light V-Net at "
                "1.5 x 1.5 x 2 mm with a 4 mm locator for fast mode; made from two patients' CTs "
                "(research use only)",
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
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        side = "n/a" if r.get("empty") else ("yes" if r.get("patient_left") else "NO")
        lines.append(
            f"| {r['scan']} | {r['patient']} | "
            + (f"{r['mode']} | " if with_mode else "")
            + f"{_fmt(r['dice'])} | {_fmt(r['hd95_mm'])} | {_fmt(r['volume_ml'])} | {_fmt(r['reference_ml'])} | "
            f"{_fmt(r['volume_error_pct'])} | {side} | {r.get('components', 0)} | {'; '.join(r['warnings']) or '-'} |"
        )
    return lines


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
        steps = next(iter(lopo.values())).get("steps", "?")
        lines.append(
            f"The main V-Net trained without the held-out patient (its real image and every subject made "
            f"from its label map) with the same recipe for {steps} steps, scored in full mode on the "
            "held-out patient's real CTs against the TotalSegmentator pseudo-label."
        )
        lines.append("")
        rows = [
            dict(r, scan=f"{r['scan']} (held out; trained on {v['trained_on']})")
            for v in lopo.values()
            for r in v["cases"]
        ]
        lines += _case_table(rows)
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
        "Fast vs full mode: "
        + "; ".join(
            f"{a['scan']} Dice {a['dice_fast_vs_full']:g}, volume {a['volume_diff_pct']:+g} %"
            for a in shipped["fast_vs_full"]
        )
        + ".",
        "",
        "Pelvis part of example_ct (slices 0-49, no spleen): "
        + "; ".join(
            f"{p['mode']} mode {p['volume_ml']:g} mL, warnings: {'; '.join(p['warnings']) or 'none'}"
            for p in shipped["pelvis"]
        )
        + ".",
        "",
    ]
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
            f"`vnetseg predict` (without `--model`) and the Slicer module use `{MODEL_NAME}` "
            f"(`VNetSegmentation/vnetseg/weights/{MODEL_FILE}`, {size_bytes / 1e6:.1f} MB, float16, SHA-256 "
            f"`{sha256[:16]}...`, checked on load). Its card: `vnetseg info VNetSegmentation/vnetseg/weights/{MODEL_FILE}` "
            "or `VNetSegmentation/vnetseg/weights/MODEL_CARD.md`."
        ),
        "",
        (
            "**What it is.** A light V-Net (1.5 x 1.5 x 2 mm, HU window [-57, 164]) with a 4 mm locator for fast mode, "
            "trained on a CPU in minutes from the only real CTs at hand: two abdominal CTs of the TotalSegmentator test "
            "data (Apache-2.0; data CC-BY-4.0; Wasserthal et al., Radiology: AI 2023) with TotalSegmentator "
            "pseudo-labels, turned into many training subjects (deformed views of the real images with other contrast "
            "phases, synthetic CTs drawn from the label maps, spleen-free crops). "
            "**Research use only; not for clinical decisions; made from two patients; not validated on MSD.**"
        ),
        "",
        "**Leave-one-patient-out** (trained without the patient, scored on its real CT against the pseudo-label):",
        "",
    ]
    if isinstance(lopo, dict):
        lines += ["| held out | scan | Dice | HD95 (mm) | volume error (%) |", "|---|---|---|---|---|"]
        for held, v in lopo.items():
            for r in v["cases"]:
                lines.append(
                    f"| {held} | {r['scan']} | {_fmt(r['dice'])} | {_fmt(r['hd95_mm'])} | {_fmt(r['volume_error_pct'])} |"
                )
    else:
        lines.append(f"{lopo}.")
    lines += [
        "",
        "**The shipped model on the same CTs** (used in training, so not an independent test), default (fast) mode:",
        "",
        "| scan | Dice | HD95 (mm) | volume (mL) | reference (mL) |",
        "|---|---|---|---|---|",
    ]
    for r in shipped["cases"]:
        if r["mode"] == "fast":
            lines.append(
                f"| {r['scan']} | {_fmt(r['dice'])} | {_fmt(r['hd95_mm'])} | {_fmt(r['volume_ml'])} | {_fmt(r['reference_ml'])} |"
            )
    lines += [
        "",
        (
            "Regenerate it from scratch (fixed seed, one CPU thread per run: about an hour on a 2-core machine, "
            "bit-identical weights from run to run with the same torch build; needs `../shared/data/ct`; see the "
            "script's docstring for running the stages side by side):"
        ),
        "",
        "```",
        card["command"],
        "```",
        "",
    ]
    return "\n".join(lines)

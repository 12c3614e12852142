"""Render what a model does on every real CT and on spleen-free parts of them, as one PNG (for the README).

    python scripts/render_results.py                          # the shipped model -> Resources/Screenshots/
    python scripts/render_results.py --model M.pt --out x.png

One row per case: the axial and coronal slice through the reference spleen's centre (through the
middle of the CT for a spleen-free part), the model's mask filled in the spleen colour and the
reference's outline in yellow, titled with the mode, the answer (volume or "no spleen found in
the field of view") and the Dice against the reference. The shown CT is resampled to 1.5 mm
isotropic, radiological display (the patient's left on the right of the image).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "VNetSegmentation")]

from training.realct.sources import Scan, load_scans, range_end_parts, spleen_free_parts
from vnetseg.checkpoint import load_model
from vnetseg.inference import InferenceOptions, predict_volume
from vnetseg.io import Image
from vnetseg.overlay import canonical
from vnetseg.postprocess import dice
from vnetseg.registry import default_model

SPLEEN_RGBA = np.array([157, 108, 162, 150]) / 255.0
CASES = ("p1_ct", "p2_dicom", "p3_cptac", "p4_acrin", "p5_lidc")
# spleen-free parts shown: the chest with the heart (P3, P5) and the lower abdomen and pelvis (P4)
FREE = (("p3_cptac", "chest"), ("p5_lidc", "chest"), ("p4_acrin", "below"))
# a lower abdomen whose scan range ends 30 mm under the spleen: v2.0.0 called its top edge spleen (37 mL)
RANGE_ENDS = (("p1_ct", "below 30 mm"),)
TITLES = {
    "p1_ct": "P1 native abdomen-pelvis",
    "p2_dicom": "P2 contrast abdomen (20 slices)",
    "p3_cptac": "P3 contrast chest, sharp kernel",
    "p4_acrin": "P4 native low-dose, heart to pelvis",
    "p5_lidc": "P5 contrast neck to kidneys",
}


def _row(image: Image, mask: np.ndarray, reference: np.ndarray | None) -> dict[str, tuple[np.ndarray, ...]]:
    """Axial and coronal (CT, mask, reference) slices through the reference's centre (or the CT's middle)."""
    ct = canonical(image.array, image, 1.5, order=1)
    seg = canonical(mask.astype(np.float32), image, 1.5, order=0) > 0.5
    ref = canonical(reference.astype(np.float32), image, 1.5, order=0) > 0.5 if reference is not None else None
    anchor = ref if ref is not None and ref.any() else seg
    centre = np.argwhere(anchor).mean(0).round().astype(int) if anchor.any() else np.array(ct.shape) // 2
    out = {}
    for name, take in (("axial", lambda a: a[:, :, centre[2]]), ("coronal", lambda a: a[:, centre[1], :])):
        slices = [take(a) for a in (ct, seg) + ((ref,) if ref is not None else ())]
        out[name] = tuple(s.T[::-1, ::-1] for s in slices)  # superior/anterior up, patient's left on the right
    return out


def render(model: Path | None, dest: Path, mode_list: tuple[str, ...] = ("fast", "full")) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entry = default_model() if model is None else None
    net, info = load_model(entry.path if entry else model, sha256=entry.sha256 if entry else None)
    name = f"{info.card.get('name', 'model')} v{info.card.get('version', '?')}"
    scans: dict[str, Scan] = {s.name: s for s in load_scans(names=CASES)}
    items: list[tuple[str, Image, np.ndarray | None]] = [
        (TITLES[n], scans[n].image, scans[n].spleen) for n in CASES
    ]
    items += [(f"{TITLES[n].split()[0]} {part} only (no spleen)", spleen_free_parts(scans[n])[part], None)
              for n, part in FREE]
    for n, part in RANGE_ENDS:
        where, gap = part.split(" ", 1)
        title = f"{TITLES[n].split()[0]} {where}, range ending {gap} from the spleen (no spleen)"
        items.append((title, range_end_parts(scans[n])[part], None))
    fig, axes = plt.subplots(len(items), 2 * len(mode_list), figsize=(4.2 * len(mode_list) * 2, 3.6 * len(items)))
    for r, (title, image, reference) in enumerate(items):
        for m, mode in enumerate(mode_list):
            t0 = time.perf_counter()
            pred = predict_volume(image, net, info, InferenceOptions(device="cpu", mode=mode))
            mask = pred.labelmap > 0
            if not pred.report.found:
                answer = "no spleen found in the field of view"
            else:
                answer = f"{pred.volume_ml:.0f} mL"
                if reference is not None:
                    ref_ml = reference.sum() * image.voxel_volume_ml
                    answer += f" (ref {ref_ml:.0f}), Dice {dice(mask, reference):.3f}"
            print(f"{title} [{mode}]: {answer} ({time.perf_counter() - t0:.1f} s)", flush=True)
            for v, (view, slices) in enumerate(_row(image, mask, reference).items()):
                ax = axes[r, 2 * m + v]
                ax.imshow(slices[0], cmap="gray", vmin=-160, vmax=240, interpolation="bilinear")
                over = np.zeros((*slices[1].shape, 4))
                over[slices[1]] = SPLEEN_RGBA
                ax.imshow(over, interpolation="nearest")
                if len(slices) > 2 and slices[2].any():
                    ax.contour(slices[2].astype(float), levels=[0.5], colors="yellow", linewidths=0.8)
                ax.set_title(f"{title}\n{mode}, {view}: {answer}" if v == 0 else f"{mode}, {view}", fontsize=8)
                ax.axis("off")
    fig.suptitle(f"{name}: mask (purple) and reference outline (yellow) on every real CT and on spleen-free parts",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.985))  # room for the title above the first row
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=72)
    plt.close(fig)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model file (default: the shipped model)")
    parser.add_argument("--out", type=Path, default=REPO / "Resources" / "Screenshots" / "real_ct_results.png")
    args = parser.parse_args(argv)
    print(f"wrote {render(args.model, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Make the extension's icon and its result picture (run from the repository root).

    python Resources/make_images.py                   # icon + picture (shipped model, else pseudo-label)
    python Resources/make_images.py --model M.pt      # picture from a V-Net run of the Logic with M.pt

The picture is not a screenshot of the Slicer application (which does not run here): it renders
what the Logic put into a real (headless) MRML scene - the CT volume node and the "Spleen"
segment read back from the segmentation node - with its volume and warnings, and says in its
title where the mask came from.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SPLEEN_RGB = (157, 108, 162)


def make_icon(path: Path, size: int = 128) -> None:
    """A 128x128 icon: a CT-like disc with a purple spleen and a V-shaped network motif."""
    from PIL import Image, ImageDraw, ImageFilter

    scale = 4  # draw large, then downsample for smooth edges
    s = size * scale
    image = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle([0, 0, s - 1, s - 1], radius=22 * scale, fill=(28, 32, 40, 255))
    draw.ellipse([10 * scale, 18 * scale, 118 * scale, 110 * scale], fill=(92, 92, 96, 255))  # body
    draw.ellipse([18 * scale, 26 * scale, 110 * scale, 102 * scale], fill=(120, 118, 122, 255))
    draw.ellipse([56 * scale, 78 * scale, 72 * scale, 94 * scale], fill=(235, 235, 235, 255))  # vertebra
    spleen = [(78, 34), (96, 38), (106, 52), (104, 68), (94, 78), (84, 74), (88, 62), (84, 50), (76, 44)]
    draw.polygon(
        [(x * scale, y * scale) for x, y in spleen],
        fill=(*SPLEEN_RGB, 255),
        outline=(250, 230, 250, 255),
        width=2 * scale,
    )
    # a "V": encoder down, decoder up, joined by skip connections
    left = [(18, 40), (28, 58), (38, 76)]
    right = [(58, 76), (48, 58)][::-1]
    for (x0, y0), (x1, y1) in itertools.pairwise(left):
        draw.line([x0 * scale, y0 * scale, x1 * scale, y1 * scale], fill=(255, 204, 64, 255), width=4 * scale)
    draw.line([38 * scale, 76 * scale, 48 * scale, 58 * scale], fill=(255, 204, 64, 255), width=4 * scale)
    draw.line([48 * scale, 58 * scale, 58 * scale, 40 * scale], fill=(255, 204, 64, 255), width=4 * scale)
    for x, y in left + right + [(58, 40)]:
        draw.ellipse([(x - 4) * scale, (y - 4) * scale, (x + 4) * scale, (y + 4) * scale], fill=(255, 228, 140, 255))
    image = image.filter(ImageFilter.SMOOTH).resize((size, size), Image.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def logic_result(ct_dir: Path, model: Path | None):
    """(CT array IJK, affine, mask IJK, summary lines, source) from a headless Logic run."""
    sys.path[:0] = [str(REPO / "Testing"), str(REPO / "VNetSegmentation")]
    import nibabel as nib
    from slicer_helpers import make_scene, node_array_ijk

    from vnetseg.checkpoint import SPLEEN_LABELS
    from VNetSegmentationLib import SegmentationOptions, VNetSegmentationLogic, nodes

    env = make_scene()
    volume = env.load_volume(ct_dir / "example_ct_sm.nii.gz", "example_ct_sm")
    logic = VNetSegmentationLogic(env.scene, includeShippedModels=False)
    if model is not None:
        seg, _ = logic.segment(volume, model, SegmentationOptions("cpu"))
        source = f"V-Net model {model.name}"
    else:
        label = np.asarray(nib.load(str(ct_dir / "example_ct_sm_multilabel_v2.nii.gz")).dataobj) == 1
        seg = nodes.createSegmentationNode(env.scene, volume, label.astype(np.uint8), SPLEEN_LABELS, "spleen")
        source = "TotalSegmentator pseudo-label put through the Logic's segment builder (no trained V-Net yet)"
    mask = nodes.segmentMask(seg, "Spleen", volume)
    report, warnings = logic.qualityWarnings(seg, volume)
    lines = [f"Spleen volume: {report.volume_ml:.1f} mL"] + [f"Warning: {w.message}" for w in warnings]
    return node_array_ijk(volume), nodes.ijkToRas(volume), mask, lines, source


def make_picture(path: Path, ct_dir: Path, model: Path | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ct, affine, mask, lines, source = logic_result(ct_dir, model)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    centre = np.round(np.argwhere(mask).mean(axis=0)).astype(int)
    views = [
        ("axial", ct[:, :, centre[2]], mask[:, :, centre[2]], spacing[1] / spacing[0]),
        ("coronal", ct[:, centre[1], :], mask[:, centre[1], :], spacing[2] / spacing[0]),
        ("sagittal", ct[centre[0], :, :], mask[centre[0], :, :], spacing[2] / spacing[1]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), facecolor="black")
    colour = np.array(SPLEEN_RGB) / 255.0
    for ax, (name, image, seg, aspect) in zip(axes, views):
        ax.imshow(np.clip(image.T, -160, 240), cmap="gray", origin="lower", aspect=aspect)
        overlay = np.zeros((*seg.T.shape, 4))
        overlay[seg.T > 0] = (*colour, 0.55)
        ax.imshow(overlay, origin="lower", aspect=aspect)
        ax.contour(seg.T, levels=[0.5], colors=[colour], linewidths=1.2, origin="lower")
        ax.invert_xaxis()  # radiological display: patient's right on the left, anterior on the left in sagittal
        ax.set_title(name, color="white")
        ax.axis("off")
    fig.suptitle(
        f"VNet Segmentation Logic on real MRML nodes: CT volume node + 'Spleen' segment\nmask: {source}",
        color="white",
        fontsize=10,
    )
    fig.text(0.01, 0.02, " | ".join(lines), color="white", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, facecolor="black")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct-dir", type=Path, default=REPO.parent / "shared" / "data" / "ct")
    parser.add_argument("--model", type=Path, help="a trained model file (default: the shipped model, if any)")
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(REPO / "VNetSegmentation"))
        from vnetseg.registry import default_model

        shipped = default_model()
        args.model = shipped.path if shipped is not None else None
    for target in (
        REPO / "Resources" / "Icons" / "VNetSegmentation.png",
        REPO / "VNetSegmentation" / "Resources" / "Icons" / "VNetSegmentation.png",
    ):
        make_icon(target)
    make_picture(REPO / "Resources" / "Screenshots" / "VNetSegmentation_result.png", args.ct_dir, args.model)


if __name__ == "__main__":
    main()

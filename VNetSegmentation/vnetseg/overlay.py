"""PNG overlays of a mask on its CT: axial, coronal and sagittal slices through the mask's centre.

matplotlib is optional (``pip install vnetseg[train]`` or ``matplotlib``); it is imported here only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .io import Image
from .preprocess import make_grid_map, to_model_grid


def canonical(array: np.ndarray, image: Image, spacing: float, order: int) -> np.ndarray:
    """``array`` (on ``image``'s grid) resampled to ``spacing`` mm isotropic, axes (R, A, S) as the model grid's."""
    grid = make_grid_map(array.shape, image.affine, (spacing, spacing, spacing))
    return to_model_grid(array.astype(np.float32), grid, order=order)  # (R, A, S) isotropic


def save_overlay(
    image: Image,
    mask: np.ndarray,
    path: str | os.PathLike[str],
    title: str = "",
    window: tuple[float, float] = (-160.0, 240.0),
    color: tuple[int, int, int] = (157, 108, 162),
) -> Path:
    """Write a PNG with three orthogonal slices (radiological display: patient left on the right).

    Args:
        image: the CT (HU) with its affine.
        mask: (I, J, K) mask on the CT's grid.
        window: display window in HU.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spacing = float(max(1.0, min(image.spacing)))
    ct = canonical(image.array, image, spacing, order=1)
    seg = canonical(mask, image, spacing, order=0) > 0.5
    centre = np.argwhere(seg).mean(0).round().astype(int) if seg.any() else np.array(ct.shape) // 2
    views = {
        "axial": (ct[:, :, centre[2]], seg[:, :, centre[2]]),
        "coronal": (ct[:, centre[1], :], seg[:, centre[1], :]),
        "sagittal": (ct[centre[0], :, :], seg[centre[0], :, :]),
    }
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6))
    rgba = np.array([*color, 140], dtype=float) / 255.0
    for ax, (name, (img, m)) in zip(axes, views.items()):
        # arrays are (R->, A->) etc.; show with superior/anterior up and patient left on the right
        shown = img.T[::-1, ::-1] if name == "axial" else img.T[::-1, ::-1] if name == "coronal" else img.T[::-1, :]
        shown_m = m.T[::-1, ::-1] if name != "sagittal" else m.T[::-1, :]
        ax.imshow(shown, cmap="gray", vmin=window[0], vmax=window[1], interpolation="bilinear")
        over = np.zeros((*shown_m.shape, 4))
        over[shown_m] = rgba
        ax.imshow(over, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    dest = Path(path)
    fig.savefig(dest, dpi=90)
    plt.close(fig)
    return dest

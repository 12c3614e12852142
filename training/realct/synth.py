"""Appearance of a subject: contrast-phase changes on real images, and synthetic CTs from label maps.

* :func:`rephase_real` keeps the real image and its texture but moves the mean HU of the organs and
  vessels that take up contrast to another phase (e.g. the native-phase spleen of P1 becomes a
  portal-venous one); the shift is blurred so organ borders stay soft.
* :func:`synthesize` replaces every soft-tissue structure of the label map by its tissue's HU for
  a drawn phase, with a smooth texture of its own; bones, lungs, gas and unlabelled tissue (fat,
  skin, unlabelled muscle) keep the real values. The spleen then differs from the real one in
  density, texture and (after the view's deformation) shape, so the model must use its
  appearance and neighbourhood rather than remember two people.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .anatomy import GROUP_NAMES, TissueDraw, draw_tissues, group_table

# groups that take up contrast and are moved to another phase on real images
REPHASED = ("spleen", "liver", "kidney", "pancreas", "artery", "vein", "portal", "blood", "myocardium")
# groups whose real values are kept in synthetic images (their texture is hard to draw)
KEEP_REAL = ("bone", "lung", "air", "colon")
GAS_HU = -300.0


def group_map(labels: np.ndarray, version: str) -> np.ndarray:
    """(X, Y, Z) int16 tissue group index (into ``GROUP_NAMES``) of a label map; -1 = unlabelled."""
    table = group_table(version)
    if labels.size and int(labels.max()) >= table.size:
        raise ValueError(f"label value {int(labels.max())} is beyond the {version} table ({table.size - 1})")
    return table[np.clip(labels, 0, None)]


def group_means(hu: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(G,) median HU of each group in ``hu`` (NaN where absent)."""
    out = np.full(len(GROUP_NAMES), np.nan, dtype=np.float32)
    for g in np.unique(groups):
        if g >= 0:
            out[g] = float(np.median(hu[groups == g]))
    return out


def smooth_texture(shape: tuple[int, ...], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Unit-SD Gaussian-correlated noise of correlation length ``sigma`` voxels."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return field / max(float(field.std()), 1e-6)


def rephase_real(
    hu: np.ndarray,
    groups: np.ndarray,
    source_means: np.ndarray,
    rng: np.random.Generator,
    tissues: TissueDraw | None = None,
) -> tuple[np.ndarray, str]:
    """Move contrast-taking structures of a real image to another phase (see the module docstring).

    Args:
        hu: (X, Y, Z) HU.
        groups: (X, Y, Z) tissue group indices (-1 unlabelled).
        source_means: (G,) median HU of each group in the whole source scan.
        rng: random generator.
        tissues: target appearance (drawn when None).

    Returns:
        (new HU image, description of the phase).
    """
    tissues = tissues or draw_tissues(rng)
    shift = np.zeros(len(GROUP_NAMES) + 1, dtype=np.float32)  # last entry: unlabelled
    for name in REPHASED:
        g = GROUP_NAMES.index(name)
        if np.isfinite(source_means[g]):
            shift[g] = tissues.mean[g] - source_means[g]
    shift_map = ndimage.gaussian_filter(shift[groups], 0.8)
    return hu + shift_map, tissues.describe()


def synthesize(
    hu: np.ndarray, groups: np.ndarray, rng: np.random.Generator, tissues: TissueDraw | None = None
) -> tuple[np.ndarray, str]:
    """A synthetic CT: each soft-tissue structure filled with its tissue's HU and texture.

    Args:
        hu: (X, Y, Z) real HU on the same grid (kept for bones, lungs, gas and unlabelled voxels).
        groups: (X, Y, Z) tissue group indices (-1 unlabelled).
        rng: random generator.
        tissues: the subject's appearance (drawn when None).

    Returns:
        (synthetic HU image, description of the phase).
    """
    tissues = tissues or draw_tissues(rng)
    mean = np.append(tissues.mean, 0.0).astype(np.float32)
    texture_sd = np.append(tissues.texture, 0.0).astype(np.float32)
    fine = smooth_texture(hu.shape, rng, rng.uniform(0.8, 1.6))
    coarse = smooth_texture(hu.shape, rng, rng.uniform(3.0, 6.0))
    weight = rng.uniform(0.3, 0.8)
    filled = mean[groups] + texture_sd[groups] * (weight * fine + (1 - weight) * coarse)
    keep = groups < 0
    for name in KEEP_REAL:
        keep |= groups == GROUP_NAMES.index(name)
    gas = (hu < GAS_HU) & np.isin(groups, [GROUP_NAMES.index(n) for n in ("stomach", "bowel")])
    keep |= gas
    out = np.where(keep, hu, filled)
    # soften the label map's staircase borders where synthetic tissue meets anything else
    edge = ndimage.binary_dilation(~keep, iterations=1) & ndimage.binary_dilation(keep, iterations=1)
    edge |= ndimage.morphological_gradient(groups, size=2) > 0
    blurred = ndimage.gaussian_filter(out, 0.7)
    return np.where(edge, blurred, out).astype(np.float32), tissues.describe()

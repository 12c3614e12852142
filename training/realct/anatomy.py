"""TotalSegmentator label maps grouped into tissues, and tissue HU for the contrast phases.

The real CTs come with TotalSegmentator label maps in two numberings: v1 (104 classes) and v2
(117 classes). Label 1 is the spleen in both. For synthetic CTs each structure is filled with
the HU typical of its tissue; what matters here is only the tissue group of each label value.
The groups were checked against the real images: the median HU inside each label of
``example_ct`` (v1), ``example_ct_sm`` and the DICOM series (v2) falls in its group's range
(bones > 140 HU, lungs < -700 HU, muscles 10-50 HU, contrast-filled aorta 151 HU ...).

HU ranges per phase are textbook values for adults at 120 kV, widened to cover scanner and
patient differences: (mean low, mean high, texture SD) in HU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PHASES = ("native", "arterial", "portal", "delayed")


def _span(a: int, b: int) -> list[int]:
    return list(range(a, b + 1))


# label value -> tissue group, per TotalSegmentator version
GROUPS_V1: dict[str, list[int]] = {
    "spleen": [1],
    "kidney": [2, 3],
    "fluid": [4, 104],
    "liver": [5],
    "stomach": [6],
    "artery": [7, 49, 51, 52],
    "vein": [8, 53, 54],
    "portal": [9],
    "pancreas": [10],
    "adrenal": [11, 12],
    "lung": _span(13, 17),
    "bone": _span(18, 41) + _span(58, 92),
    "soft": [42, 50, 93],
    "air": [43],
    "myocardium": [44],
    "blood": _span(45, 48),
    "bowel": [55, 56],
    "colon": [57],
    "muscle": _span(94, 103),
}
GROUPS_V2: dict[str, list[int]] = {
    "spleen": [1],
    "kidney": [2, 3],
    "fluid": [4, 21, 23, 24],
    "liver": [5],
    "stomach": [6],
    "pancreas": [7],
    "adrenal": [8, 9],
    "lung": _span(10, 14),
    "soft": [15, 17, 22, 79, 90],
    "air": [16],
    "bowel": [18, 19],
    "colon": [20],
    "bone": _span(25, 50) + _span(69, 78) + [91] + _span(92, 116),
    "myocardium": [51],
    "artery": [52, 54, 55, 56, 57, 58, 65, 66],
    "vein": [53, 59, 60, 62, 63, 67, 68],
    "blood": [61],
    "portal": [64],
    "muscle": _span(80, 89),
    "cartilage": [117],
}

# group -> phase -> (mean low, mean high, texture SD) in HU
TISSUE_HU: dict[str, dict[str, tuple[float, float, float]]] = {
    "spleen": {"native": (35, 55, 6), "arterial": (90, 160, 25), "portal": (100, 150, 10), "delayed": (80, 110, 8)},
    "liver": {"native": (45, 65, 6), "arterial": (60, 90, 8), "portal": (90, 140, 10), "delayed": (75, 105, 8)},
    "kidney": {"native": (25, 40, 5), "arterial": (140, 230, 30), "portal": (130, 200, 20), "delayed": (100, 180, 20)},
    "pancreas": {"native": (30, 50, 8), "arterial": (90, 140, 12), "portal": (80, 120, 10), "delayed": (60, 90, 8)},
    "adrenal": {"native": (20, 40, 8), "arterial": (50, 90, 10), "portal": (50, 90, 10), "delayed": (40, 70, 8)},
    "artery": {"native": (35, 50, 4), "arterial": (200, 380, 15), "portal": (130, 200, 10), "delayed": (90, 130, 8)},
    "vein": {"native": (35, 50, 4), "arterial": (50, 110, 15), "portal": (120, 190, 10), "delayed": (90, 130, 8)},
    "portal": {"native": (35, 50, 4), "arterial": (80, 150, 15), "portal": (140, 210, 10), "delayed": (90, 130, 8)},
    "blood": {"native": (35, 50, 4), "arterial": (150, 350, 20), "portal": (120, 190, 10), "delayed": (90, 130, 8)},
    "myocardium": {"native": (35, 50, 5), "arterial": (80, 130, 10), "portal": (80, 120, 10), "delayed": (70, 100, 8)},
    "stomach": {"native": (-10, 40, 15), "arterial": (0, 60, 15), "portal": (10, 70, 15), "delayed": (10, 60, 15)},
    "bowel": {"native": (-10, 40, 20), "arterial": (10, 80, 20), "portal": (20, 90, 20), "delayed": (10, 70, 20)},
    "colon": {
        "native": (-300, 30, 120),
        "arterial": (-300, 40, 120),
        "portal": (-300, 40, 120),
        "delayed": (-300, 40, 120),
    },
    "fluid": {"native": (0, 20, 4), "arterial": (0, 20, 4), "portal": (0, 25, 4), "delayed": (0, 40, 6)},
    "muscle": {"native": (35, 55, 6), "arterial": (40, 60, 6), "portal": (45, 70, 6), "delayed": (45, 65, 6)},
    "soft": {"native": (20, 45, 8), "arterial": (25, 55, 8), "portal": (30, 60, 8), "delayed": (30, 55, 8)},
    "cartilage": {p: (90, 160, 20) for p in PHASES},
    "bone": {p: (180, 450, 60) for p in PHASES},
    "lung": {p: (-880, -780, 25) for p in PHASES},
    "air": {p: (-1000, -950, 10) for p in PHASES},
}
PHASE_WEIGHTS = {"native": 0.3, "arterial": 0.15, "portal": 0.45, "delayed": 0.1}


def group_table(version: str, size: int = 256) -> np.ndarray:
    """Lookup array: label value -> group index into ``GROUP_NAMES`` (-1 for background/unknown).

    Args:
        version: "v1" (104 classes), "v2" (117 classes) or "spleen" (a spleen-only reference:
            everything else is unlabelled).
        size: lookup length (label values must be below it).
    """
    groups = {"v1": GROUPS_V1, "v2": GROUPS_V2, "spleen": {"spleen": [1]}}.get(version)
    if groups is None:
        raise ValueError(f"version must be 'v1', 'v2' or 'spleen', got {version!r}")
    table = np.full(size, -1, dtype=np.int16)
    for name, values in groups.items():
        table[values] = GROUP_NAMES.index(name)
    return table


GROUP_NAMES: tuple[str, ...] = tuple(TISSUE_HU)


@dataclass(frozen=True)
class TissueDraw:
    """One subject's tissue appearance: per group (mean HU, texture SD) and its phase."""

    phase: str
    mean: np.ndarray  # (G,) HU
    texture: np.ndarray  # (G,) HU

    def describe(self) -> str:
        s, lv = GROUP_NAMES.index("spleen"), GROUP_NAMES.index("liver")
        return f"{self.phase} (spleen {self.mean[s]:.0f} HU, liver {self.mean[lv]:.0f} HU)"


def draw_tissues(rng: np.random.Generator, phase: str | None = None) -> TissueDraw:
    """Draw a contrast phase (weighted) and a mean HU per tissue group for one subject."""
    if phase is None:
        names = list(PHASE_WEIGHTS)
        phase = str(rng.choice(names, p=np.array(list(PHASE_WEIGHTS.values())) / sum(PHASE_WEIGHTS.values())))
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    mean = np.array([rng.uniform(*TISSUE_HU[g][phase][:2]) for g in GROUP_NAMES], dtype=np.float32)
    texture = np.array([TISSUE_HU[g][phase][2] * rng.uniform(0.5, 1.5) for g in GROUP_NAMES], dtype=np.float32)
    return TissueDraw(phase, mean, texture)

"""The whole-CT view's anatomy (vnetseg.fast.BodyView): the body's midline and the lungs, from HU alone.

A phantom in physical space: an elliptic body placed off the image's centre, two lungs in its upper
part, a 'spleen' below them on the patient's left and a larger 'shoulder muscle' above the left
lung. The stand-in networks (BandNet, ThresholdNet) find both organs, so what decides is the anatomy.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_fast import BandNet
from test_inference import ThresholdNet
from test_io import make_affine

from vnetseg.checkpoint import ModelInfo, Preprocessing
from vnetseg.fast import MAX_LUNG_BELOW_ML, BodyView, locate
from vnetseg.inference import InferenceOptions, predict_volume
from vnetseg.io import Image
from vnetseg.model import VNetConfig
from vnetseg.postprocess import dice
from vnetseg.preprocess import make_grid_map

SHAPE, SPACING = (160, 140, 90), (2.0, 2.0, 4.0)
BODY_SHIFT_MM = 60.0  # the body's centre lies this far towards the patient's right of the image's centre


def _inside(ras: np.ndarray, centre, radii) -> np.ndarray:
    return (((ras - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(-1) <= 1.0


def _chest_abdomen(kind: str = "LPS", lungs: bool = True, spleen: bool = True, shoulder: bool = True):
    """(CT, spleen mask, shoulder mask, image centre RAS) on a 320 x 280 x 360 mm field of view."""
    aff = make_affine(kind, spacing=SPACING, origin=(150.0, 130.0, -180.0))
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1)
    ras = ijk @ aff[:3, :3].T + aff[:3, 3]
    centre = ras.reshape(-1, 3).mean(0)
    bx, by = centre[0] + BODY_SHIFT_MM, centre[1]
    hu = np.full(SHAPE, -1000.0, np.float32)
    body = ((ras[..., 0] - bx) / 110.0) ** 2 + ((ras[..., 1] - by) / 80.0) ** 2 <= 1.0
    hu[body] = 40.0
    table = (np.abs(ras[..., 1] - (by - 95.0)) <= 4.0) & (np.abs(ras[..., 0] - bx) <= 150.0)  # posterior
    hu[table] = 300.0
    if lungs:
        for side in (-1.0, 1.0):
            hu[_inside(ras, (bx + side * 50.0, by, centre[2] + 60.0), (40.0, 50.0, 70.0))] = -850.0
    gas = _inside(ras, (bx + 30.0, by + 40.0, centre[2] - 120.0), (15.0, 12.0, 10.0))  # bowel gas, low
    hu[gas] = -1000.0
    organ = _inside(ras, (bx - 50.0, by, centre[2] - 60.0), (30.0, 25.0, 35.0)) if spleen else np.zeros(SHAPE, bool)
    muscle = _inside(ras, (bx - 55.0, by - 10.0, centre[2] + 155.0), (35.0, 35.0, 25.0)) if shoulder else np.zeros(SHAPE, bool)
    hu[organ], hu[muscle] = 100.0, 100.0
    return Image(hu, aff), organ, muscle, centre, gas


def _info() -> ModelInfo:
    loc_info = ModelInfo(VNetConfig(widths=(4, 8, 16, 32, 64)), Preprocessing(target_spacing=(4.0, 4.0, 4.0), patch_size=(48, 48, 48)))
    info = ModelInfo(VNetConfig(widths=(4, 8, 16, 32, 64)), Preprocessing(target_spacing=(1.5, 1.5, 2.0), patch_size=(48, 48, 48)))
    info.locator = (BandNet(), loc_info)
    return info


def _coarse_hu(ct: Image):
    from vnetseg.preprocess import to_model_grid

    coarse = make_grid_map(ct.shape, ct.affine, (4.0, 4.0, 4.0))
    return coarse, to_model_grid(ct.array, coarse)


def test_body_view_finds_the_patient_and_its_lungs_not_the_table_or_bowel_gas() -> None:
    ct, _organ, _muscle, centre, gas = _chest_abdomen()
    coarse, hu = _coarse_hu(ct)
    view = BodyView.from_hu(hu)
    ras = np.argwhere(view.body) @ coarse.model_affine[:3, :3].T + coarse.model_affine[:3, 3]
    assert ras[:, 1].min() > centre[1] - 85.0  # the table (95 mm behind the centre) is not the patient
    assert view.midline_x(coarse) == pytest.approx(centre[0] + BODY_SHIFT_MM, abs=2.0)
    lung_ml = view.lung.sum() * 64e-3
    expected = 2 * 4 / 3 * np.pi * 40 * 50 * 70 / 1000  # two 40 x 50 x 70 mm ellipsoids: 1173 mL
    assert lung_ml == pytest.approx(expected, rel=0.15)
    gas_coarse = np.argwhere(view.lung) @ coarse.model_affine[:3, :3].T + coarse.model_affine[:3, 3]
    assert gas_coarse[:, 2].min() > centre[2] - 20.0  # no lung down at the bowel gas (120 mm below)
    assert gas.sum() > 0  # the gas is there, inside the body, and was not called lung
    nothing = BodyView.from_hu(np.full((20, 20, 20), -1000.0, np.float32))
    assert not nothing.body.any() and nothing.midline_x(coarse) is None


def test_locate_refuses_a_part_with_lung_beneath_it() -> None:
    from vnetseg.preprocess import to_model_grid

    ct, organ, muscle, centre, _gas = _chest_abdomen()
    coarse, hu = _coarse_hu(ct)
    view = BodyView.from_hu(hu)
    probs = np.zeros(coarse.model_shape, np.float32)
    for mask, p in ((organ, 0.9), (muscle, 0.99)):
        probs[to_model_grid(mask.astype(np.float32), coarse) > 0.5] = p
    below = view.lung_below_ml(*_labelled(probs), coarse)
    assert max(below) > 4 * MAX_LUNG_BELOW_ML and min(below) < 1.0  # the muscle sits on lung; the spleen does not
    loc = locate(probs, coarse, anatomy=view)
    assert loc.found and loc.volume_ml == pytest.approx(4 / 3 * np.pi * 30 * 25 * 35 / 1000, rel=0.2)
    centroid = np.argwhere(loc.mask).mean(0) @ coarse.model_affine[:3, :3].T + coarse.model_affine[:3, 3]
    assert centroid[2] == pytest.approx(centre[2] - 60.0, abs=4.0)
    # the muscle holds more probability mass: without the anatomy it is what would be located
    plain = locate(probs, coarse)
    assert plain.found and not (plain.mask & loc.mask).any() and plain.volume_ml > loc.volume_ml


def _labelled(probs: np.ndarray):
    from scipy import ndimage

    return ndimage.label(probs > 0.5, structure=ndimage.generate_binary_structure(3, 1))


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_the_spleen_below_the_lungs_is_kept_and_the_muscle_above_them_is_not(mode: str) -> None:
    """Both modes, through predict_volume, with the body off the image's centre.

    The spleen lies on the patient's left of the body's centre but on the right of the image's
    centre: a midline taken from the whole image would have rejected it as the liver's side.
    """
    ct, organ, muscle, centre, _gas = _chest_abdomen()
    organ_x = (np.argwhere(organ).mean(0) @ ct.affine[:3, :3].T + ct.affine[:3, 3])[0]
    assert centre[0] < organ_x < centre[0] + BODY_SHIFT_MM
    assert muscle.sum() > organ.sum()
    res = predict_volume(ct, ThresholdNet(), _info(), InferenceOptions(device="cpu", mode=mode, probability="float32"))
    assert res.report.found and dice(res.labelmap > 0, organ) > 0.95 and not (res.labelmap > 0)[muscle].any()
    if mode == "full":  # full mode windows the body's box only (the air around the body is skipped)
        assert any(n.startswith("full mode: the body's box") for n in res.notes), res.notes
        assert res.probability_covers == "body" and res.probability.shape == ct.shape
        assert res.probability[organ].mean() > 0.9


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_a_muscle_above_the_lungs_alone_is_no_spleen(mode: str) -> None:
    ct, _organ, _muscle, _centre, _gas = _chest_abdomen(spleen=False)
    res = predict_volume(ct, ThresholdNet(), _info(), InferenceOptions(device="cpu", mode=mode))
    assert not res.report.found and not res.labelmap.any()
    assert "in the chest, above lung" in res.report.message
    # the same muscle without lungs beneath it is taken: the lungs, not the muscle's height, decided
    bare, _o, muscle, _c, _g = _chest_abdomen(spleen=False, lungs=False)
    res = predict_volume(bare, ThresholdNet(), _info(), InferenceOptions(device="cpu", mode=mode))
    assert res.report.found and dice(res.labelmap > 0, muscle) > 0.95


def test_on_the_real_cts_no_lung_lies_beneath_the_reference_spleen_and_the_chest_cts_have_lungs(ct_dir) -> None:
    """The anatomy the rule relies on, measured on every real CT (no network involved): the reference
    spleen (on the 4 mm grid) has almost no lung straight below it, the CTs that show the chest
    have their lungs found, and the lower-abdomen parts have none (their bowel gas is not lung)."""
    from scipy import ndimage

    from training.realct.sources import load_scans, spleen_free_parts
    from vnetseg.preprocess import to_model_grid

    for scan in load_scans(ct_dir):
        coarse, hu = _coarse_hu(scan.image)
        view = BodyView.from_hu(hu)
        spleen = to_model_grid(scan.spleen.astype(np.float32), coarse) > 0.5
        labels, _n = ndimage.label(spleen)
        biggest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
        below = view.lung_below_ml((labels == biggest).astype(np.int32), 1, coarse)[0]
        assert below < 0.2 * MAX_LUNG_BELOW_ML, f"{scan.name}: {below:.1f} mL of lung below the reference spleen"
        centre = np.argwhere(spleen).mean(0) @ coarse.model_affine[:3, :3].T + coarse.model_affine[:3, 3]
        assert centre[0] < view.midline_x(coarse), scan.name  # the spleen lies left of the body's centre
        lung_ml = view.lung.sum() * float(np.prod(coarse.model_spacing)) / 1000.0
        if scan.name in ("p3_cptac", "p5_lidc"):  # the chest CTs
            assert lung_ml > 1000.0, f"{scan.name}: only {lung_ml:.0f} mL of lung found"
        if scan.name == "p4_acrin":  # from the heart down: the lower lungs
            assert lung_ml > 200.0, f"{scan.name}: only {lung_ml:.0f} mL of lung found"
        if scan.name == "p1_sm":
            continue
        for part, image in spleen_free_parts(scan).items():
            part_view = BodyView.from_hu(_coarse_hu(image)[1])
            part_lung = part_view.lung.sum() * 64e-3
            if part == "below":
                assert part_lung < 5.0, f"{scan.name} {part}: {part_lung:.1f} mL called lung"
            else:
                assert part_lung > 500.0, f"{scan.name} {part}: only {part_lung:.0f} mL of lung"

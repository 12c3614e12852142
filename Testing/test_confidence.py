"""The spleen probability map on the input grid, the per-case confidence and the low-confidence warning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from test_fast import FAST, BandNet, _phantom, _two_organs
from test_inference import INFO, ThresholdNet, _reoriented

from vnetseg import confidence as conf
from vnetseg.checkpoint import ModelInfo, Preprocessing
from vnetseg.inference import InferenceOptions, predict_volume
from vnetseg.io import Image, read_image
from vnetseg.model import VNetConfig
from vnetseg.preprocess import make_grid_map, window_hu

CPU = {"device": "cpu"}


class SoftNet(ThresholdNet):
    """ThresholdNet with a gentle slope: the same organ, but the network hesitates (p ~ 0.6-0.7 inside)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 3.0 * (x - 0.5)], dim=1)


def _expected_probability(ct: Image, gain: float = 40.0) -> np.ndarray:
    """What ThresholdNet says at each input voxel: sigmoid(gain * (windowed HU - 0.5))."""
    x = window_hu(ct.array.copy(), INFO.preprocessing.hu_window, INFO.preprocessing.scale)
    return 1.0 / (1.0 + np.exp(-gain * (x - 0.5)))


@pytest.mark.parametrize("kind", ["RAS", "LPS", "LAS", "oblique_left_handed"])
def test_probability_map_lies_exactly_on_the_input_grid(ct_dir: Path, kind: str) -> None:
    real = read_image(ct_dir / "example_ct_sm.nii.gz")
    ct = _reoriented(Image(ndimage.gaussian_filter(real.array, 1.5), real.affine), kind)
    res = predict_volume(ct, ThresholdNet(), INFO, InferenceOptions(**CPU, postprocess=False, probability="float32"))
    prob = res.probability
    assert prob.shape == ct.shape and prob.dtype == np.float32 and res.probability_covers == "volume"
    np.testing.assert_array_equal(res.affine, ct.affine)
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    expected = _expected_probability(ct)
    organ = expected > 0.5
    assert np.abs(prob - expected)[organ].mean() < 0.05  # voxel for voxel, only resampling blur between them
    assert np.abs(prob[::-1] - expected)[organ].mean() > 0.3  # a mirrored map would be caught
    assert np.abs(prob[:, :, ::-1] - expected)[organ].mean() > 0.3
    np.testing.assert_array_equal(prob > 0.5, res.labelmap > 0)  # the mask is this map, thresholded


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_thresholding_the_map_at_05_gives_the_mask_before_postprocessing(mode: str) -> None:
    ct, spleen, heart = _two_organs()
    loc_info = ModelInfo(FAST.config, Preprocessing(target_spacing=(4.0, 4.0, 4.0), patch_size=(48, 48, 48)))
    info = ModelInfo(FAST.config, Preprocessing(target_spacing=(1.5, 1.5, 2.0), patch_size=(48, 48, 48)))
    info.locator = (BandNet(), loc_info)
    raw = predict_volume(ct, ThresholdNet(), info, InferenceOptions(**CPU, mode=mode, postprocess=False, probability="float32"))
    clean = predict_volume(ct, ThresholdNet(), info, InferenceOptions(**CPU, mode=mode, probability="float32"))
    np.testing.assert_array_equal(raw.probability, clean.probability)  # post-processing never changes the map
    # the map thresholded is the network's whole answer: the located part (exactly the mask without clean-up)
    # plus the parts the whole-CT view rejected (the heart), which the mask never holds
    above = clean.probability > 0.5
    assert not (clean.labelmap > 0)[heart].any() and dice_of(clean.labelmap > 0, spleen) > 0.97
    parts, _ = ndimage.label(above, ndimage.generate_binary_structure(3, 1))
    kept = np.isin(parts, np.unique(parts[raw.labelmap > 0]))
    np.testing.assert_array_equal(kept, raw.labelmap > 0)
    assert not (above & ~kept)[spleen].any()
    if mode == "full":
        assert above[heart].mean() > 0.97  # the network saw the heart: the map shows it
        assert clean.probability_covers == "volume"
    else:
        assert clean.probability_covers == "box" and "0 outside" in clean.probability_note
        grid = make_grid_map(ct.shape, ct.affine, info.preprocessing.target_spacing)
        outside = ~_box_on_input_grid(clean.box, grid, ct)
        assert outside.any() and not clean.probability[outside].any()  # exactly 0 outside the box
    uint8 = predict_volume(ct, ThresholdNet(), info, InferenceOptions(**CPU, mode=mode, probability="uint8")).probability
    assert uint8.dtype == np.uint8 and uint8.shape == ct.shape
    np.testing.assert_array_equal(uint8, np.rint(clean.probability * 255).astype(np.uint8))
    differ = (uint8 >= 128) != above
    assert (np.abs(clean.probability[differ] - 0.5) <= 1 / 510 + 1e-6).all()


def dice_of(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _box_on_input_grid(box, grid, ct: Image) -> np.ndarray:
    """Input voxels whose centre lies inside the fast-mode box (model-grid voxels start..stop)."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in ct.shape], indexing="ij"), -1).reshape(-1, 3)
    ras = ijk @ ct.affine[:3, :3].T + ct.affine[:3, 3]
    inv = np.linalg.inv(grid.model_affine)
    model = ras @ inv[:3, :3].T + inv[:3, 3]
    inside = np.all((model >= np.array(box.start) - 0.5) & (model < np.array(box.stop) - 0.5), axis=1)
    return inside.reshape(ct.shape)


def test_no_spleen_in_view_gives_an_all_zero_map_that_says_so() -> None:
    ct, _spleen, heart = _two_organs()
    ct = Image(np.where(heart, 160.0, -50.0).astype(np.float32), ct.affine)
    loc_info = ModelInfo(FAST.config, Preprocessing(target_spacing=(4.0, 4.0, 4.0), patch_size=(48, 48, 48)))
    info = ModelInfo(FAST.config, Preprocessing(target_spacing=(1.5, 1.5, 2.0), patch_size=(48, 48, 48)))
    info.locator = (BandNet(), loc_info)
    for kind, dtype in (("float32", np.float32), ("uint8", np.uint8)):
        res = predict_volume(ct, ThresholdNet(), info, InferenceOptions(**CPU, probability=kind))
        assert not res.report.found and res.confidence is None
        assert res.probability.dtype == dtype and res.probability.shape == ct.shape and not res.probability.any()
        assert res.probability_covers == "nothing" and "no spleen in view" in res.probability_note


def test_no_map_is_made_unless_asked() -> None:
    res = predict_volume(_phantom(), ThresholdNet(), FAST, InferenceOptions(**CPU, mode="fast"))
    assert res.probability is None and res.probability_covers == "" and res.probability_note == ""
    assert res.confidence is not None  # the confidence never needs the map
    with pytest.raises(ValueError, match="probability must be None, 'float32' or 'uint8'"):
        InferenceOptions(probability="float16")


def test_confidence_of_a_hand_made_probability_has_the_known_answer() -> None:
    """A 10^3 core at 0.9 inside a 1-voxel shell at 0.6 (both in the mask) and a 0.4 halo outside it."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    grid = make_grid_map((20, 20, 20), affine, (2.0, 2.0, 2.0))  # model grid == input grid
    values = np.zeros((20, 20, 20), np.float32)
    values[3:17, 3:17, 3:17] = 0.4  # halo
    values[4:16, 4:16, 4:16] = 0.6  # shell
    values[5:15, 5:15, 5:15] = 0.9  # core
    mask = values > 0.5
    c = conf.measure_confidence(values, grid, mask)
    rim = 6 * 12 * 12  # the halo voxels 6-connected to the 12^3 mask: its faces
    assert c.organ_voxels == 12**3 + rim
    assert c.uncertain_share == pytest.approx((12**3 - 10**3 + rim) / (12**3 + rim), abs=1e-4)
    assert c.mean_probability == pytest.approx((1000 * 0.9 + 728 * 0.6) / 1728, abs=1e-4)
    assert conf.measure_confidence(values, grid, np.zeros_like(mask)) is None
    cropped = conf.crop_around(values, grid, mask, affine)
    assert cropped[0].shape == (16, 16, 16)  # the mask's box plus 2 voxels each side
    assert conf.measure_confidence(*cropped, mask) == c


def test_low_confidence_warning_fires_on_a_hesitant_network_and_not_on_a_sure_one() -> None:
    ct = _phantom()
    sure = predict_volume(ct, ThresholdNet(), FAST, InferenceOptions(**CPU, mode="full"))
    soft = predict_volume(ct, SoftNet(), FAST, InferenceOptions(**CPU, mode="full", probability="float32"))
    assert sure.confidence is not None and not sure.confidence.low
    assert not any(conf.LOW_CONFIDENCE in w for w in sure.report.warnings)
    assert soft.report.found and dice_of(soft.labelmap > 0, ct.array > 0) > 0.97  # same mask...
    assert soft.confidence.low and soft.confidence.mean_probability < conf.LOW_CONFIDENCE_MEAN_PROBABILITY
    warning = [w for w in soft.report.warnings if w.startswith(conf.LOW_CONFIDENCE)]
    assert len(warning) == 1 and "mean probability" in warning[0]  # ... but the network was unsure
    assert 0.5 < soft.probability[ct.array > 0].mean() < 0.8


def test_soft_model_is_a_real_hesitation() -> None:
    """The hesitant stand-in's probability inside the organ: sigmoid(3 * (1 - 0.5)), about 0.82 at most."""
    x = torch.ones(1, 1, 4, 4, 4)
    p = torch.softmax(SoftNet()(x), 1)[0, 1]
    assert float(p.max()) == pytest.approx(1 / (1 + np.exp(-1.5)), abs=1e-6)
    assert isinstance(SoftNet().config, VNetConfig)

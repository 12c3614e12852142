"""Fast (coarse-to-fine) mode: same answer as the full pass on a phantom, honest fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_inference import ThresholdNet
from test_io import make_affine

from vnetseg.checkpoint import Label, ModelInfo, Preprocessing, describe
from vnetseg.fast import (
    RELIABLE_VIEW_MM,
    box_from_coarse_mask,
    head_foot_extent_mm,
    locate,
    single_window_patch,
    thin_view_warning,
)
from vnetseg.inference import InferenceOptions, choose_mode, predict_volume
from vnetseg.io import Image
from vnetseg.model import VNetConfig
from vnetseg.postprocess import dice
from vnetseg.preprocess import make_grid_map

FAST = ModelInfo(
    VNetConfig(widths=(4, 8, 16, 32, 64)),
    Preprocessing(target_spacing=(1.5, 1.5, 2.0), patch_size=(48, 48, 48), coarse_spacing=(4.0, 4.0, 4.0)),
)


def _phantom(centre_mm=(-20.0, 0.0, 15.0), radii_mm=(40.0, 30.0, 45.0), kind="LPS") -> Image:
    """A -50 HU body with a 120 HU ellipsoid 'spleen'; ThresholdNet finds exactly the ellipsoid."""
    shape, aff = (200, 180, 60), make_affine(kind, spacing=(0.8, 0.8, 2.5), origin=(80.0, 70.0, -60.0))
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    ras = ijk @ aff[:3, :3].T + aff[:3, 3]
    inside = (((ras - centre_mm) / radii_mm) ** 2).sum(-1) <= 1.0
    return Image(np.where(inside, 120.0, -50.0).astype(np.float32), aff)


def test_fast_equals_full_on_a_phantom_and_reports_its_box() -> None:
    ct = _phantom()
    full = predict_volume(ct, ThresholdNet(), FAST, InferenceOptions(device="cpu", mode="full"))
    fast = predict_volume(ct, ThresholdNet(), FAST, InferenceOptions(device="cpu", mode="fast"))
    assert full.mode == "full" and fast.mode == "fast" and full.box is None
    # the only note: the HU trim took the resampling's blur at the border (-50 HU body) off the 120 HU organ
    assert [n.split(" mL")[1] for n in fast.notes] == [" outside the organ's own range (100 to 140 HU) removed from its surface"]
    # the box: at least one trained window (48^3) wide, inside the model grid, holding the organ
    grid = make_grid_map(ct.shape, ct.affine, FAST.preprocessing.target_spacing)
    start, stop = np.array(fast.box.start), np.array(fast.box.stop)
    assert (start >= 0).all() and (stop <= grid.model_shape).all()
    # (on this small phantom the organ touches every one of full mode's 48^3 windows, so fast mode runs
    # them all and its box is the grid: fewer windows are checked on a long CT further down)
    assert (stop - start >= 48).all()
    organ = np.argwhere(ct.array > 0) @ ct.affine[:3, :3].T + ct.affine[:3, 3]
    organ_ijk = organ @ np.linalg.inv(grid.model_affine)[:3, :3].T + np.linalg.inv(grid.model_affine)[:3, 3]
    assert (organ_ijk.min(0) >= start).all() and (organ_ijk.max(0) <= stop - 1).all()
    truth = ct.array > 0
    assert dice(full.labelmap > 0, truth) > 0.98
    assert dice(fast.labelmap > 0, full.labelmap > 0) >= 0.99
    assert abs(fast.volume_ml - full.volume_ml) / full.volume_ml < 0.02


def test_fast_never_crops_the_organ_at_an_edge() -> None:
    edge = _phantom(centre_mm=(-60.0, 0.0, 15.0))  # cut by the image's left border (patient's left)
    res = predict_volume(edge, ThresholdNet(), FAST, InferenceOptions(device="cpu", mode="fast"))
    assert any("edge of the field of view" in n and "image border" in n for n in res.notes)
    full = predict_volume(edge, ThresholdNet(), FAST, InferenceOptions(device="cpu", mode="full"))
    assert dice(res.labelmap > 0, full.labelmap > 0) >= 0.99  # nothing cut off at the border
    assert dice(res.labelmap > 0, edge.array > 0) > 0.98


class BandNet(torch.nn.Module):
    """A stand-in locator: foreground where the windowed intensity lies in (0.6, 0.85), i.e. 76-131 HU."""

    def __init__(self) -> None:
        super().__init__()
        self.config = VNetConfig(widths=(4, 8, 16, 32, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 40.0 * torch.minimum(x - 0.6, 0.85 - x)], dim=1)


def _two_organs(kind: str = "LPS") -> tuple[Image, np.ndarray, np.ndarray]:
    """A 100 HU 'spleen' on the patient's left and a larger 160 HU 'heart' above it, a little left of the midline."""
    shape, aff = (200, 180, 80), make_affine(kind, spacing=(0.8, 0.8, 2.5), origin=(80.0, 70.0, -90.0))
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    ras = ijk @ aff[:3, :3].T + aff[:3, 3]
    spleen = (((ras - (-35.0, 0.0, -30.0)) / (25.0, 20.0, 30.0)) ** 2).sum(-1) <= 1.0
    heart = (((ras - (-10.0, 0.0, 50.0)) / (40.0, 35.0, 40.0)) ** 2).sum(-1) <= 1.0
    hu = np.full(shape, -50.0, np.float32)
    hu[spleen], hu[heart] = 100.0, 160.0
    return Image(hu, aff), spleen, heart


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_the_whole_ct_view_decides_which_part_is_the_spleen_in_both_modes(mode: str) -> None:
    """The main network finds both organs; the larger one is not kept when the locator rejects it."""
    ct, spleen, heart = _two_organs()
    assert heart.sum() > 3 * spleen.sum()
    loc_info = ModelInfo(FAST.config, Preprocessing(target_spacing=(4.0, 4.0, 4.0), patch_size=(48, 48, 48)))
    info = ModelInfo(FAST.config, Preprocessing(target_spacing=(1.5, 1.5, 2.0), patch_size=(48, 48, 48)))
    info.locator = (BandNet(), loc_info)
    res = predict_volume(ct, ThresholdNet(), info, InferenceOptions(device="cpu", mode=mode))
    assert res.mode == mode and res.report.found
    assert dice(res.labelmap > 0, spleen) > 0.97 and not (res.labelmap > 0)[heart].any()
    assert len(res.report.components_ml) == 2  # both parts were seen at full resolution; one was kept
    # without the whole-CT view, "keep the largest component" would have returned the heart
    plain = predict_volume(ct, ThresholdNet(), ModelInfo(info.config, info.preprocessing), InferenceOptions(device="cpu"))
    assert dice(plain.labelmap > 0, heart) > 0.97


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_no_spleen_in_view_is_an_answer_in_both_modes(mode: str) -> None:
    """Nothing located: an empty mask on the input grid, said plainly, and no full-resolution pass."""
    ct, _spleen, heart = _two_organs()
    ct = Image(np.where(heart, 160.0, -50.0).astype(np.float32), ct.affine)  # the heart alone
    loc_info = ModelInfo(FAST.config, Preprocessing(target_spacing=(4.0, 4.0, 4.0), patch_size=(48, 48, 48)))
    info = ModelInfo(FAST.config, Preprocessing(target_spacing=(1.5, 1.5, 2.0), patch_size=(48, 48, 48)))
    info.locator = (BandNet(), loc_info)
    seen: list[str] = []
    res = predict_volume(ct, ThresholdNet(), info, InferenceOptions(device="cpu", mode=mode), lambda f, m: seen.append(m))
    assert res.labelmap.shape == ct.shape and res.labelmap.dtype == np.uint8 and not res.labelmap.any()
    assert not res.report.found and res.report.message.startswith("no spleen found in the field of view")
    assert res.volume_ml == 0 and res.box is None
    assert res.report.warnings == [thin_view_warning(200.0)]  # 80 slices of 2.5 mm: too short to be sure
    assert not any(m.startswith("segmenting") for m in seen)  # the full-resolution network never ran


class NeverNet(torch.nn.Module):
    """A stand-in locator that is sure there is no spleen anywhere (foreground probability about 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = VNetConfig(widths=(4, 8, 16, 32, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full_like(x, 20.0), torch.full_like(x, -20.0)], dim=1)


def test_locator_members_are_averaged_into_one_whole_ct_view() -> None:
    """``ModelInfo.locator_members`` (the seed experiment): the view is the mean of the locators' probabilities.
    A sure locator and a member that is sure of the opposite give 0.5 on the spleen, not over 0.5: no spleen;
    two sure ones against it give 2/3: the same part as the locator alone, with the same mask."""
    ct, spleen, _heart = _two_organs()
    loc_info = ModelInfo(FAST.config, Preprocessing(target_spacing=(4.0, 4.0, 4.0), patch_size=(48, 48, 48)))
    info = ModelInfo(FAST.config, Preprocessing(target_spacing=(1.5, 1.5, 2.0), patch_size=(48, 48, 48)))
    info.locator = (BandNet(), loc_info)
    alone = predict_volume(ct, ThresholdNet(), info, InferenceOptions(device="cpu", mode="fast"))
    assert alone.report.found and dice(alone.labelmap > 0, spleen) > 0.97
    info.locator_members = [(NeverNet(), loc_info)]
    split = predict_volume(ct, ThresholdNet(), info, InferenceOptions(device="cpu", mode="fast"))
    assert not split.report.found and split.located_ml == 0.0
    assert split.report.message == "no spleen found in the field of view (the whole-CT view found none)"
    info.locator_members = [(NeverNet(), loc_info), (BandNet(), loc_info)]
    two = predict_volume(ct, ThresholdNet(), info, InferenceOptions(device="cpu", mode="fast"))
    assert two.report.found and two.located_ml == alone.located_ml
    assert np.array_equal(two.labelmap, alone.labelmap)
    # a member on another grid cannot be averaged with the locator's probabilities
    other = ModelInfo(FAST.config, Preprocessing(target_spacing=(6.0, 6.0, 6.0), patch_size=(48, 48, 48)))
    info.locator_members = [(BandNet(), other)]
    with pytest.raises(ValueError, match=r"a locator member works at \(6.0, 6.0, 6.0\) mm, the locator at \(4.0, 4.0, 4.0\) mm"):
        predict_volume(ct, ThresholdNet(), info, InferenceOptions(device="cpu", mode="fast"))
    assert ModelInfo(FAST.config).locator_members == []  # nothing attached: the locator alone, as shipped


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_the_max_rule_lets_a_second_locator_find_what_the_first_misses(mode: str) -> None:
    """``locator_rule`` "max": the view is the voxel-wise maximum of the locators' probabilities, so a member
    that sees the spleen where the locator sees nothing gives the spleen (the mean of the two, 0.5, does
    not), with the mask the member alone would give; two that see nothing still say "no spleen"."""
    ct, spleen, heart = _two_organs()
    loc_info = ModelInfo(FAST.config, Preprocessing(target_spacing=(4.0, 4.0, 4.0), patch_size=(48, 48, 48)))
    info = ModelInfo(FAST.config, Preprocessing(target_spacing=(1.5, 1.5, 2.0), patch_size=(48, 48, 48)))
    info.locator, info.locator_members = (NeverNet(), loc_info), [(BandNet(), loc_info)]
    mean = predict_volume(ct, ThresholdNet(), info, InferenceOptions(device="cpu", mode=mode))
    assert not mean.report.found and not mean.labelmap.any()
    info.locator_rule = "max"
    largest = predict_volume(ct, ThresholdNet(), info, InferenceOptions(device="cpu", mode=mode))
    assert largest.report.found and dice(largest.labelmap > 0, spleen) > 0.97 and not (largest.labelmap > 0)[heart].any()
    alone = ModelInfo(info.config, info.preprocessing)
    alone.locator = (BandNet(), loc_info)
    by_itself = predict_volume(ct, ThresholdNet(), alone, InferenceOptions(device="cpu", mode=mode))
    assert np.array_equal(largest.labelmap, by_itself.labelmap) and largest.located_ml == by_itself.located_ml
    info.locator_members = [(NeverNet(), loc_info)]
    assert not predict_volume(ct, ThresholdNet(), info, InferenceOptions(device="cpu", mode=mode)).report.found


class BrightNet(torch.nn.Module):
    """A stand-in locator that takes everything over 76 HU for the spleen: the 'heart' too."""

    def __init__(self) -> None:
        super().__init__()
        self.config = VNetConfig(widths=(4, 8, 16, 32, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 40.0 * (x - 0.6)], dim=1)


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_the_locator_check_vetoes_a_part_the_second_network_does_not_call_spleen(mode: str) -> None:
    """``ModelInfo.locator_check``: a locator that calls the larger 'heart' spleen picks it; a check that
    calls only the 100 HU organ spleen vetoes the heart, so the spleen is located instead (the note says
    what was vetoed); a check that calls nothing spleen turns the answer into "no spleen", saying why."""
    ct, spleen, heart = _two_organs()
    loc_info = ModelInfo(FAST.config, Preprocessing(target_spacing=(4.0, 4.0, 4.0), patch_size=(48, 48, 48)))
    info = ModelInfo(FAST.config, Preprocessing(target_spacing=(1.5, 1.5, 2.0), patch_size=(48, 48, 48)))
    info.locator = (BrightNet(), loc_info)
    unchecked = predict_volume(ct, ThresholdNet(), info, InferenceOptions(device="cpu", mode=mode))
    assert unchecked.report.found and dice(unchecked.labelmap > 0, heart) > 0.97  # the heart holds more mass
    info.locator_check, info.locator_check_min = (BandNet(), loc_info), 0.5
    checked = predict_volume(ct, ThresholdNet(), info, InferenceOptions(device="cpu", mode=mode))
    assert checked.report.found and dice(checked.labelmap > 0, spleen) > 0.97 and not (checked.labelmap > 0)[heart].any()
    assert checked.located_ml < unchecked.located_ml
    (note,) = [n for n in checked.notes if "locator check did not confirm" in n]
    assert note.startswith(f"whole-CT view: the locator check did not confirm 1 part(s) ({round(unchecked.located_ml, 1):g} mL)")
    info.locator_check = (NeverNet(), loc_info)
    none = predict_volume(ct, ThresholdNet(), info, InferenceOptions(device="cpu", mode=mode))
    assert not none.report.found and not none.labelmap.any() and none.located_ml == 0.0
    assert none.report.message.startswith("no spleen found in the field of view (the whole-CT view's candidates, up to")
    assert "where the locator check does not confirm a spleen (its mean probability under 0.5)" in none.report.message
    # the check must share the locator's grid
    info.locator_check = (BandNet(), ModelInfo(FAST.config, Preprocessing(target_spacing=(6.0, 6.0, 6.0), patch_size=(48, 48, 48))))
    with pytest.raises(ValueError, match=r"works at \(6.0, 6.0, 6.0\) mm"):
        predict_volume(ct, ThresholdNet(), info, InferenceOptions(device="cpu", mode=mode))


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_a_rival_class_of_the_locator_check_vetoes_the_part_it_claims(mode: str) -> None:
    """``locator_check_rivals``: a multi-organ check (classes Heart, Spleen) with no floor but "Heart" as a
    rival vetoes the part it takes for the heart (its Heart mean over it is larger than its Spleen mean), so
    the spleen is located; with the spleen as its own rival nothing could ever be confirmed, so that is refused."""
    ct, spleen, heart = _two_organs()
    loc_info = ModelInfo(FAST.config, Preprocessing(target_spacing=(4.0, 4.0, 4.0), patch_size=(48, 48, 48)))
    organ_info = ModelInfo(OrganBandNet().config, loc_info.preprocessing, (Label(1, "Heart"), Label(2, "Spleen")))
    info = ModelInfo(FAST.config, Preprocessing(target_spacing=(1.5, 1.5, 2.0), patch_size=(48, 48, 48)))
    info.locator = (BrightNet(), loc_info)
    info.locator_check, info.locator_check_min, info.locator_check_rivals = (OrganBandNet(), organ_info), 0.0, ("Heart",)
    res = predict_volume(ct, ThresholdNet(), info, InferenceOptions(device="cpu", mode=mode))
    assert res.report.found and dice(res.labelmap > 0, spleen) > 0.97 and not (res.labelmap > 0)[heart].any()
    (note,) = [n for n in res.notes if "locator check did not confirm" in n]
    assert note.endswith("its mean spleen probability over each is under its mean of Heart")
    # with the heart alone in view, the answer says why nothing was located
    heart_only = Image(np.where(heart, 160.0, -50.0).astype(np.float32), ct.affine)
    none = predict_volume(heart_only, ThresholdNet(), info, InferenceOptions(device="cpu", mode=mode))
    assert not none.report.found and none.report.message.endswith(
        "all lie where the locator check does not confirm a spleen (another of its classes more probable there))")
    # no rival and no floor: the check confirms every part, and the heart (more mass) is located again
    info.locator_check_rivals = ()
    plain = predict_volume(ct, ThresholdNet(), info, InferenceOptions(device="cpu", mode=mode))
    assert plain.report.found and dice(plain.labelmap > 0, heart) > 0.97


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_a_thin_ct_locator_decides_on_thin_cts_only(mode: str) -> None:
    """``ModelInfo.thin_locator`` replaces the locator (and its members) on a CT reaching at most
    ``thin_locator_max_mm`` head to foot, run centred in a window of its trained depth and cut back to the
    CT's slices: here the locator finds nothing and the thin one finds the spleen, so a 75 mm slab gets
    the spleen at its true place and the whole 200 mm CT gets "no spleen"."""
    ct, spleen, _heart = _two_organs()
    loc_info = ModelInfo(FAST.config, Preprocessing(target_spacing=(4.0, 4.0, 4.0), patch_size=(48, 48, 48)))
    info = ModelInfo(FAST.config, Preprocessing(target_spacing=(1.5, 1.5, 2.0), patch_size=(48, 48, 48)))
    info.locator = (NeverNet(), loc_info)
    info.locator_members = [(NeverNet(), loc_info)]
    info.thin_locator, info.thin_locator_max_mm = (BandNet(), loc_info), 100.0
    affine = ct.affine.copy()
    affine[:3, 3] = ct.affine[:3, :3] @ np.array([0.0, 0.0, 10.0]) + ct.affine[:3, 3]  # slices 10-39, true position
    slab = Image(np.ascontiguousarray(ct.array[:, :, 10:40]), affine)
    assert head_foot_extent_mm(slab.shape, slab.affine) == pytest.approx(75.0)
    res = predict_volume(slab, ThresholdNet(), info, InferenceOptions(device="cpu", mode=mode))
    assert res.report.found and dice(res.labelmap > 0, spleen[:, :, 10:40]) > 0.97
    assert any("the thin-CT locator (the CT covers at most 100 mm head to foot)" in n for n in res.notes)
    whole = predict_volume(ct, ThresholdNet(), info, InferenceOptions(device="cpu", mode=mode))
    assert not whole.report.found and not whole.labelmap.any()
    assert not any("thin-CT locator" in n for n in whole.notes)
    # the thin locator must share the locator's grid
    info.thin_locator = (BandNet(), ModelInfo(FAST.config, Preprocessing(target_spacing=(6.0, 6.0, 6.0), patch_size=(48, 48, 48))))
    with pytest.raises(ValueError, match=r"works at \(6.0, 6.0, 6.0\) mm"):
        predict_volume(slab, ThresholdNet(), info, InferenceOptions(device="cpu", mode=mode))


class OrganBandNet(torch.nn.Module):
    """A stand-in multi-organ locator with classes (background, Heart, Spleen): "Heart" above 131 HU,
    "Spleen" at 76-131 HU. The spleen is its second foreground channel, not its first."""

    def __init__(self) -> None:
        super().__init__()
        self.config = VNetConfig(widths=(4, 8, 16, 32, 64), out_channels=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 40.0 * (x - 0.85), 40.0 * torch.minimum(x - 0.6, 0.85 - x)], dim=1)


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_a_multi_organ_locator_decides_with_its_spleen_channel_only(mode: str) -> None:
    """Its heart channel is not the spleen: the whole-CT view takes the channel named like the model's organ."""
    ct, spleen, heart = _two_organs()
    labels = (Label(1, "Heart"), Label(2, "Spleen"))
    loc_info = ModelInfo(OrganBandNet().config, Preprocessing(target_spacing=(4.0, 4.0, 4.0), patch_size=(48, 48, 48)),
                         labels)
    info = ModelInfo(FAST.config, Preprocessing(target_spacing=(1.5, 1.5, 2.0), patch_size=(48, 48, 48)))
    info.locator = (OrganBandNet(), loc_info)
    res = predict_volume(ct, ThresholdNet(), info, InferenceOptions(device="cpu", mode=mode))
    assert res.report.found and dice(res.labelmap > 0, spleen) > 0.97 and not (res.labelmap > 0)[heart].any()
    # the heart alone: the heart channel is sure of it, the spleen channel is not, so "no spleen"
    alone = Image(np.where(heart, 160.0, -50.0).astype(np.float32), ct.affine)
    res = predict_volume(alone, ThresholdNet(), info, InferenceOptions(device="cpu", mode=mode))
    assert not res.labelmap.any() and res.report.message.startswith("no spleen found in the field of view")
    # a locator that does not name the model's organ is an inconsistent file: said, not guessed
    info.locator = (OrganBandNet(), ModelInfo(loc_info.config, loc_info.preprocessing,
                                              (Label(1, "Heart"), Label(2, "Liver"))))
    assert "(classes Heart, Spleen; the decision reads Spleen)" in describe(ModelInfo(
        info.config, info.preprocessing, locator=(OrganBandNet(), loc_info)))
    with pytest.raises(ValueError, match="do not include the model's organ 'spleen'"):
        predict_volume(ct, ThresholdNet(), info, InferenceOptions(device="cpu", mode=mode))


def test_a_part_on_the_patients_right_is_never_located_as_the_spleen() -> None:
    """The liver's side: a 'spleen' mirrored to the patient's right (RAS +x) is not located, in both modes."""
    ct, spleen, _heart = _two_organs()
    flipped = Image(np.where(spleen[::-1], 100.0, -50.0).astype(np.float32), ct.affine)  # i reversed: x mirrored
    loc_info = ModelInfo(FAST.config, Preprocessing(target_spacing=(4.0, 4.0, 4.0), patch_size=(48, 48, 48)))
    info = ModelInfo(FAST.config, Preprocessing(target_spacing=(1.5, 1.5, 2.0), patch_size=(48, 48, 48)))
    info.locator = (BandNet(), loc_info)
    for mode in ("fast", "full"):
        res = predict_volume(flipped, ThresholdNet(), info, InferenceOptions(device="cpu", mode=mode))
        assert not res.labelmap.any() and not res.report.found and "patient's right" in res.report.message


def test_locate_picks_the_most_probable_part_and_refuses_small_ones() -> None:
    coarse = make_grid_map((50, 50, 50), np.diag([4.0, 4.0, 4.0, 1.0]), (4.0, 4.0, 4.0))
    probs = np.zeros((50, 50, 50), np.float32)
    probs[5:25, 5:25, 5:25] = 0.55  # big, hesitant: 512 mL
    probs[30:40, 30:40, 30:40] = 0.99  # smaller, sure: 64 mL, but less mass (990 vs 4400)
    loc = locate(probs, coarse)
    assert loc.found and loc.mask[10, 10, 10] and not loc.mask[35, 35, 35]
    assert loc.volume_ml == pytest.approx(512.0) and loc.candidates_ml == [512.0, 64.0]
    probs[5:25, 5:25, 5:25] = 0.3
    loc = locate(probs, coarse)
    assert loc.found and loc.mask[35, 35, 35] and loc.candidates_ml == [64.0]
    tiny = np.zeros_like(probs)
    tiny[1:3, 1:3, 1:5] = 0.9  # 16 voxels of 64 uL: 1.0 mL
    loc = locate(tiny, coarse, min_ml=10.0)
    assert not loc.found and not loc.mask.any() and "1.0 mL, under 10 mL" in loc.reason
    none = locate(np.zeros_like(probs), coarse)
    assert not none.found and none.reason.startswith("no spleen found in the field of view")


def test_mode_choice() -> None:
    import torch

    cpu = torch.device("cpu")
    assert choose_mode("auto", cpu, FAST) == "fast"
    no_fast = ModelInfo(FAST.config, Preprocessing())
    assert choose_mode("auto", cpu, no_fast) == "full"
    with pytest.raises(ValueError, match="--mode fast needs a model"):
        choose_mode("fast", cpu, no_fast)
    with pytest.raises(ValueError, match="mode must be"):
        choose_mode("quick", cpu, FAST)


def test_box_covers_the_coarse_mask_in_physical_space_with_margin() -> None:
    shape, aff = (100, 100, 40), make_affine("LPS", spacing=(1.0, 1.0, 3.0))
    coarse = make_grid_map(shape, aff, (4.0, 4.0, 4.0))
    fine = make_grid_map(shape, aff, (1.5, 1.5, 2.0))
    mask = np.zeros(coarse.model_shape, bool)
    mask[5:10, 8:12, 6:9] = True
    box, reason = box_from_coarse_mask(mask, coarse, fine, margin_mm=10.0)
    assert reason == "" and box is not None
    # RAS extent of the coarse mask (voxel edges) must lie inside the fine box minus the margin
    lo = coarse.model_affine @ [4.5, 7.5, 5.5, 1]
    hi = coarse.model_affine @ [9.5, 11.5, 8.5, 1]
    box_lo = fine.model_affine @ [*box.start, 1]
    box_hi = fine.model_affine @ [*(np.array(box.stop) - 1), 1]
    assert np.all(box_lo[:3] <= np.minimum(lo, hi)[:3] - 9.0) and np.all(box_hi[:3] >= np.maximum(lo, hi)[:3] + 9.0)
    edge = mask.copy()
    edge[0:3, 8:12, 6:9] = True  # now touching the low end of axis 0
    wide, note = box_from_coarse_mask(edge, coarse, fine, margin_mm=10.0)
    assert "image border" in note and wide.start[0] == 0 and wide.stop[0] < fine.model_shape[0]
    assert wide.start[1:] == box.start[1:] and wide.stop[1:] == box.stop[1:]
    big, _ = box_from_coarse_mask(mask, coarse, fine, min_shape=(64, 64, 64))
    assert all(s >= min(64, n) for s, n in zip(big.shape, fine.model_shape))
    assert single_window_patch((70, 50, 33), 16) == (80, 64, 48)
    assert single_window_patch((400, 400, 300), 16) is None


def test_a_locator_carried_in_the_model_file_drives_fast_mode(tmp_path) -> None:
    """Round trip of a model file with a locator; fast mode then uses the locator's own spacing."""
    import torch

    from vnetseg.checkpoint import load_model, save_model
    from vnetseg.model import VNet

    torch.manual_seed(0)
    main_cfg = VNetConfig(widths=(4, 8, 16, 32, 64), kernel_size=3)
    loc_cfg = VNetConfig(widths=(2, 4, 8, 16, 32), kernel_size=3)
    main_info = ModelInfo(main_cfg, Preprocessing(target_spacing=(1.5, 1.5, 2.0), patch_size=(48, 48, 48)))
    loc_info = ModelInfo(loc_cfg, Preprocessing(target_spacing=(6.0, 6.0, 6.0), patch_size=(32, 32, 32)), card={"role": "locator"})
    main_net, loc_net = VNet(main_cfg), VNet(loc_cfg)
    save_model(tmp_path / "m.pt", main_net, main_info, locator=(loc_net, loc_info), half=True)
    net, info = load_model(tmp_path / "m.pt")
    assert info.locator is not None and info.locator[1].card == {"role": "locator"}
    assert info.locator[1].preprocessing.target_spacing == (6.0, 6.0, 6.0)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(torch.softmax(info.locator[0](x), 1), torch.softmax(loc_net(x), 1), atol=1e-2)
    assert "locator V-Net widths=[2, 4, 8, 16, 32] at 6 x 6 x 6 mm" in describe(info)
    assert choose_mode("auto", torch.device("cpu"), info) == "fast"
    seen: list[str] = []
    res = predict_volume(_phantom(), net, info, InferenceOptions(device="cpu"), progress=lambda f, m: seen.append(m))
    assert res.mode == "fast" and any(m.startswith("locating") for m in seen)


class PlaceNet(torch.nn.Module):
    """A stand-in network whose answer depends on where a voxel sits in its window (like a real one
    near the window's borders): ThresholdNet's logits plus a ramp along the window's head-foot axis."""

    def __init__(self) -> None:
        super().__init__()
        self.config = VNetConfig(widths=(4, 8, 16, 32, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-1.0, 1.0, x.shape[4]).reshape(1, 1, 1, 1, -1)
        return torch.cat([torch.zeros_like(x), 40.0 * (x - 0.5) + 3.0 * ramp], dim=1)


def test_fast_mode_runs_full_modes_own_windows_on_the_organ_and_gives_its_answer_exactly() -> None:
    """With a network whose answer depends on the window's placement, fast mode's probabilities on
    the organ's box equal full mode's (to float rounding), with fewer windows than full mode."""
    small = _phantom()  # a long CT: 140 slices, one window wide in-plane, as most abdomens are for the shipped model
    ct = Image(np.pad(small.array, ((0, 0), (0, 0), (40, 40)), constant_values=-50.0), small.affine)
    info = ModelInfo(FAST.config, Preprocessing(target_spacing=(1.5, 1.5, 2.0), patch_size=(112, 96, 32),
                                                coarse_spacing=(4.0, 4.0, 4.0)))
    seen: dict[str, list[str]] = {"fast": [], "full": []}
    runs = {
        mode: predict_volume(ct, PlaceNet(), info, InferenceOptions(device="cpu", mode=mode, probability="float32"),
                             lambda f, m, mode=mode: seen[mode].append(m))
        for mode in ("fast", "full")
    }
    fast, full = runs["fast"], runs["full"]
    windows = {mode: max(int(m.split("window ")[1].split("/")[1]) for m in seen[mode] if "window " in m) for mode in seen}
    assert windows["fast"] < windows["full"], windows
    assert np.array_equal(fast.labelmap, full.labelmap)
    organ = fast.labelmap > 0
    assert organ.sum() > 1000 and np.abs(fast.probability[organ] - full.probability[organ]).max() < 1e-5
    # on the same box, a window grid of its own answers differently with this network: the match is
    # fast mode running full mode's windows, not the network ignoring where its windows sit
    from vnetseg.inference import WindowSettings, _windows, sliding_window, softmax_foreground
    from vnetseg.preprocess import to_model_grid, window_hu

    grid = make_grid_map(ct.shape, ct.affine, info.preprocessing.target_spacing)
    box, patch = fast.box, (112, 96, 32)
    padded = tuple(max(s, p) for s, p in zip(grid.model_shape, patch))
    inside = [w for w in _windows(padded, patch, 0.25)  # full mode's windows within fast mode's box
              if all(lo <= a and min(a + p, n) <= hi for a, p, lo, hi, n in zip(w, patch, box.start, box.stop, grid.model_shape))]
    assert len(inside) == windows["fast"]
    part = grid.crop(box.start, box.stop)
    volume = window_hu(to_model_grid(ct.array, part), info.preprocessing.hu_window)[None]
    net = softmax_foreground(PlaceNet(), False)
    exact = sliding_window(volume, net, WindowSettings(patch), 1, windows=[tuple(np.subtract(w, box.start)) for w in inside])[0]
    from vnetseg.inference import whole_ct_view

    location, coarse = whole_ct_view(ct, PlaceNet(), info, InferenceOptions(device="cpu"), torch.device("cpu"), None, None, [])
    organ, _ = box_from_coarse_mask(location.mask, coarse, grid, min_shape=patch)  # the box fast mode used to run
    own = grid.crop(organ.start, organ.stop)
    alone = sliding_window(window_hu(to_model_grid(ct.array, own), info.preprocessing.hu_window)[None], net,
                           WindowSettings(patch), 1)[0]
    lo = np.subtract(organ.start, box.start)
    same = exact[lo[0]:lo[0] + organ.shape[0], lo[1]:lo[1] + organ.shape[1], lo[2]:lo[2] + organ.shape[2]]
    assert same.shape == alone.shape and np.abs(alone - same).max() > 0.05


def test_fast_region_falls_back_to_its_own_box_when_full_modes_windows_would_cost_too_much() -> None:
    from vnetseg.fast import Box
    from vnetseg.inference import EXACT_FAST_COST, _windows, fast_region

    grid = make_grid_map((400, 400, 300), np.diag([1.0, 1.0, 1.0, 1.0]), (1.0, 1.0, 1.0))
    organ = Box((100, 100, 100), (150, 150, 150))  # 50^3: one 64^3 window of its own
    region, box, run, patch = fast_region(grid, Box((0, 0, 0), grid.model_shape), organ, (64, 64, 64), 16, 0.25)
    # full mode's 64^3 grid (step 48) touches 2 x 2 x 2 windows of this box: more than three times one
    assert EXACT_FAST_COST * 1 < 8 and run is None and patch is None and box == organ
    assert region.model_shape == (50, 50, 50)
    # a long CT one window wide in-plane (the shipped model's usual case): 3 windows of its own along z, 4 of full mode's
    long = make_grid_map((64, 64, 400), np.diag([1.0, 1.0, 1.0, 1.0]), (1.0, 1.0, 1.0))
    big = Box((0, 0, 100), (64, 64, 228))
    region, box, run, patch = fast_region(long, Box((0, 0, 0), long.model_shape), big, (64, 64, 64), 16, 0.25)
    assert run is not None and len(run) == 4 == len(_windows((64, 64, 128), (64,) * 3, 0.25)) + 1
    assert all(a <= s and t <= b for a, s, t, b in zip(box.start, big.start, big.stop, box.stop))
    assert region.model_shape == box.shape and all(0 <= w[2] <= box.shape[2] - 64 for w in run)


@pytest.mark.parametrize("kind", ["LPS", "RAS", "oblique"])
def test_located_part_on_the_input_grid_equals_the_whole_grid_resampling(kind: str) -> None:
    """Resampling only the located part's box gives the whole coarse grid's answer, except on
    voxels whose centre lies exactly half-way between two coarse voxels (a tie either answer fits)."""
    from vnetseg.inference import _located_on_input_grid
    from vnetseg.preprocess import to_input_grid

    rng = np.random.default_rng(7)
    for _ in range(15):
        shape = tuple(int(x) for x in rng.integers(20, 60, 3))
        aff = make_affine(kind, spacing=tuple(float(s) for s in rng.uniform(0.6, 3.0, 3)))
        coarse = make_grid_map(shape, aff, (4.0, 4.0, 4.0))
        mask = np.zeros(coarse.model_shape, bool)
        lo = rng.integers(0, np.maximum(np.array(coarse.model_shape) - 2, 1))
        hi = lo + rng.integers(1, 6, 3)
        mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
        whole = to_input_grid(mask.astype(np.float32), coarse, order=0, threshold=0.5) > 0
        boxed = _located_on_input_grid(mask, coarse)
        assert boxed.shape == shape and boxed.any()
        # canonical axes: where is each input voxel's centre in coarse voxels, and is it a tie?
        ties = np.zeros(coarse.canonical_shape, bool)
        for axis in range(3):
            c = (np.arange(coarse.canonical_shape[axis]) - coarse.offset[axis]) / coarse.scale[axis]
            tie = np.abs(c - np.floor(c) - 0.5) < 1e-6
            ties |= np.expand_dims(tie, tuple(a for a in range(3) if a != axis))
        import nibabel as nib

        from vnetseg.preprocess import _canonical_ornt_inverse

        ties = nib.orientations.apply_orientation(ties, _canonical_ornt_inverse(coarse.ornt))
        assert not ((whole != boxed) & ~ties).any()
    assert _located_on_input_grid(np.zeros((4, 4, 4), bool), coarse).shape == shape


def test_head_foot_extent_is_the_field_of_views_reach_along_s_in_any_orientation() -> None:
    for kind in ("LPS", "RAS"):  # axial: slices x slice spacing, whatever the in-plane axes' signs
        assert head_foot_extent_mm((200, 180, 80), make_affine(kind, spacing=(0.8, 0.8, 2.5))) == pytest.approx(200.0)
    stored = np.eye(4)
    stored[:3, :3] = [[0.0, 0.7, 0.0], [0.0, 0.0, -0.7], [-3.0, 0.0, 0.0]]  # the head-foot axis stored first, feet first
    assert head_foot_extent_mm((10, 500, 400), stored) == pytest.approx(30.0)
    tilt = np.radians(20.0)  # a gantry tilt: slices 2 mm apart along a direction 20 degrees from S
    tilted = np.eye(4)
    tilted[:3, :3] = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]]) * [1.0, 1.0, 2.0]
    corners = np.array([[i, j, k] for i in (0, 64) for j in (0, 100) for k in (0, 30)], float) @ tilted[:3, :3].T
    assert head_foot_extent_mm((64, 100, 30), tilted) == pytest.approx(np.ptp(corners[:, 2]))


def test_thin_view_warning_below_the_measured_reach() -> None:
    assert thin_view_warning(RELIABLE_VIEW_MM) is None and thin_view_warning(420.0) is None
    assert thin_view_warning(RELIABLE_VIEW_MM - 1) is not None
    text = thin_view_warning(40.0)
    assert text is not None and "covers only 40 mm head to foot" in text and "'no spleen' is not a reliable answer" in text
    assert "'no liver'" in thin_view_warning(60.0, "liver")


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_no_spleen_on_a_thin_ct_comes_with_the_thin_view_warning(mode: str) -> None:
    """The heart alone in 30 slices (75 mm): still "no spleen", with the warning that it may be wrong;
    none on the same CT padded head to foot to 300 mm."""
    ct, _spleen, heart = _two_organs()
    hu = np.where(heart, 160.0, -50.0).astype(np.float32)
    affine = ct.affine.copy()
    affine[:3, 3] = ct.affine[:3, :3] @ np.array([0.0, 0.0, 40.0]) + ct.affine[:3, 3]  # slices 40-69, true position
    thin = Image(np.ascontiguousarray(hu[:, :, 40:70]), affine)
    assert head_foot_extent_mm(thin.shape, thin.affine) == pytest.approx(75.0)
    loc_info = ModelInfo(FAST.config, Preprocessing(target_spacing=(4.0, 4.0, 4.0), patch_size=(48, 48, 48)))
    info = ModelInfo(FAST.config, Preprocessing(target_spacing=(1.5, 1.5, 2.0), patch_size=(48, 48, 48)))
    info.locator = (BandNet(), loc_info)
    res = predict_volume(thin, ThresholdNet(), info, InferenceOptions(device="cpu", mode=mode))
    assert not res.labelmap.any() and not res.report.found
    assert res.report.message.startswith("no spleen found in the field of view")
    assert res.report.warnings == [thin_view_warning(75.0)]
    tall = Image(np.pad(thin.array, ((0, 0), (0, 0), (45, 45)), constant_values=-50.0), thin.affine.copy())
    tall.affine[:3, 3] = thin.affine[:3, :3] @ np.array([0.0, 0.0, -45.0]) + thin.affine[:3, 3]
    assert head_foot_extent_mm(tall.shape, tall.affine) == pytest.approx(RELIABLE_VIEW_MM)
    res = predict_volume(tall, ThresholdNet(), info, InferenceOptions(device="cpu", mode=mode))
    assert not res.report.found and res.report.warnings == []

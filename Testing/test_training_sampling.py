"""Patch sampling: foreground ratio, determinism, padding, augmentation without left-right flips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from training.cache import CachedCase
from training.config import AugmentConfig
from training.sampling import (
    PatchDataset,
    build_augmentation,
    crop,
    crop_margin,
    end_field_of_view,
    thin_slab,
    two_views,
)


def _case(seed: int = 0) -> CachedCase:
    rng = np.random.default_rng(seed)
    image = rng.random((40, 36, 30)).astype(np.float32)
    label = np.zeros((40, 36, 30), np.uint8)
    label[30:34, 5:9, 20:24] = 1  # a small structure near the end of the first axis
    return CachedCase("c", image, label, np.argwhere(label > 0).astype(np.int32))


def test_crop_pads_outside_the_volume() -> None:
    vol = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    out = crop(vol, np.array([0, 1, 1]), (3, 3, 3), pad_value=-1.0)
    assert np.all(out[0] == -1.0)  # x = -1 lies outside
    np.testing.assert_array_equal(out[1:], vol[:2])
    assert crop(vol, np.array([10, 10, 10]), (2, 2, 2), 5.0).tolist() == np.full((2, 2, 2), 5.0).tolist()


def test_foreground_ratio_one_and_zero() -> None:
    case = _case()
    fg = PatchDataset([case], (16, 16, 16), 20, fg_ratio=1.0, seed=0, augment=None)
    for i in range(20):
        item = fg[i]
        assert item["image"].shape == (1, 16, 16, 16) and item["label"].shape == (16, 16, 16)
        assert item["label"][8, 8, 8] == 1  # centred on a foreground voxel
    bg = PatchDataset([case], (16, 16, 16), 200, fg_ratio=0.0, seed=0, augment=None)
    share = np.mean([bg[i]["label"].sum().item() > 0 for i in range(200)])
    assert share < 0.3  # uniform centres rarely hit a 64-voxel structure


def test_foreground_offset_places_the_organ_anywhere_in_the_patch() -> None:
    # one foreground voxel in a volume large enough that no patch reaches the border
    image = np.zeros((60, 60, 60), np.float32)
    label = np.zeros((60, 60, 60), np.uint8)
    label[30, 30, 30] = 1
    case = CachedCase("dot", image, label, np.argwhere(label > 0).astype(np.int32))
    centred = PatchDataset([case], (16, 16, 8), 50, fg_ratio=1.0, seed=0, augment=None)
    assert all(centred.sample_centre(case, np.random.default_rng(i)).tolist() == [30, 30, 30] for i in range(20))
    spread = PatchDataset([case], (16, 16, 8), 400, fg_ratio=1.0, seed=0, augment=None, fg_offset=1.0)
    labels = [spread[i]["label"].numpy() for i in range(400)]
    assert all(lab.sum() == 1 for lab in labels)  # the voxel is always inside the patch ...
    where = np.array([np.argwhere(lab)[0] for lab in labels])  # ... where
    # ... and reaches from one border to the other: half patch minus one on each side of the centre
    assert where.min(0).tolist() == [1, 1, 1] and where.max(0).tolist() == [15, 15, 7]
    assert len({tuple(w) for w in where}) > 300  # spread, not a handful of places
    half = PatchDataset([case], (16, 16, 8), 400, fg_ratio=1.0, seed=0, augment=None, fg_offset=0.5)
    where = np.array([np.argwhere(half[i]["label"].numpy())[0] for i in range(400)])
    assert where.min(0).tolist() == [5, 5, 3] and where.max(0).tolist() == [11, 11, 5]  # floor(0.5 * 7) = 3, floor(0.5 * 3) = 1
    with pytest.raises(ValueError, match="fg_offset"):
        PatchDataset([case], (16, 16, 8), 4, fg_ratio=1.0, seed=0, augment=None, fg_offset=1.5)


def test_patches_are_a_function_of_seed_epoch_and_index() -> None:
    aug = AugmentConfig(elastic_prob=0.5, elastic_sigma=(2, 3), elastic_magnitude=(1, 2))
    ds = PatchDataset([_case(0), _case(1)], (16, 16, 16), 8, fg_ratio=0.5, seed=3, augment=aug)
    a = ds[5]
    b = PatchDataset([_case(0), _case(1)], (16, 16, 16), 8, fg_ratio=0.5, seed=3, augment=aug)[5]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    ds.set_epoch(1)
    assert not torch.equal(ds[5]["image"], a["image"])
    ds.set_epoch(0)
    single = list(DataLoader(ds, batch_size=2, num_workers=0))
    multi = list(DataLoader(ds, batch_size=2, num_workers=2))
    # worker processes change nothing (up to float rounding: workers run torch on 1 thread)
    for s, m in zip(single, multi):
        torch.testing.assert_close(s["image"], m["image"], atol=1e-5, rtol=0)
        assert torch.equal(s["label"], m["label"])


def test_augmentation_keeps_labels_binary_and_never_flips_by_default() -> None:
    aug = AugmentConfig()
    assert not aug.flip_lr
    names = [type(t).__name__ for t in build_augmentation(aug, (16, 16, 16)).transforms]
    assert not any("Flip" in n for n in names)
    assert "RandAffined" in names and "Rand3DElasticd" in names and "RandGaussianNoised" in names
    assert crop_margin((16, 16, 16), aug) > (16, 16, 16)
    # patches centred on the structure near +x: with rotation <= 15 degrees and no flip, the
    # structure's voxels stay in the patch and the label stays a 0/1 map
    ds = PatchDataset([_case()], (16, 16, 16), 10, fg_ratio=1.0, seed=1, augment=aug)
    for i in range(10):
        label = ds[i]["label"]
        assert set(label.unique().tolist()) <= {0, 1} and label.sum() > 10
    flip = [type(t).__name__ for t in build_augmentation(AugmentConfig(flip_lr=True), (16, 16, 16)).transforms]
    assert "RandAxisFlipd" in flip


def test_empty_dataset_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        PatchDataset([], (16, 16, 16), 4, 0.5, 0, None)


def test_two_views_are_windows_of_each_patch_at_their_offsets() -> None:
    image = torch.rand(3, 1, 20, 18, 12)
    label = (image[:, 0] > 0.5).long()
    images, labels, offsets = two_views(image, label, (16, 16, 8), torch.Generator().manual_seed(0))
    assert images.shape == (6, 1, 16, 16, 8) and labels.shape == (6, 16, 16, 8) and offsets.shape == (6, 3)
    assert offsets.min() >= 0 and (offsets.max(0).values <= torch.tensor([4, 2, 4])).all()
    for k in range(6):  # first views of items 0-2, then their second views
        a, b, c = offsets[k].tolist()
        torch.testing.assert_close(images[k], image[k % 3, :, a : a + 16, b : b + 16, c : c + 8])
        torch.testing.assert_close(labels[k], label[k % 3, a : a + 16, b : b + 16, c : c + 8])
    again = two_views(image, label, (16, 16, 8), torch.Generator().manual_seed(0))[2]
    assert torch.equal(again, offsets)  # the generator decides the offsets
    assert len({tuple(o) for o in offsets.tolist()}) > 1
    with pytest.raises(ValueError, match="smaller than the window"):
        two_views(image, label, (24, 16, 8), torch.Generator())


def test_end_field_of_view_blanks_one_side_of_an_axial_plane() -> None:
    image = np.random.default_rng(0).random((1, 6, 5, 10)).astype(np.float32) + 1.0  # never the pad value
    label = np.full((6, 5, 10), 2, np.int64)  # another organ everywhere, none of the organ (1)
    # probability 0 draws nothing: the generator and the arrays are untouched
    rng = np.random.default_rng(7)
    before = image.copy()
    assert end_field_of_view(image, label, rng, 0.0, 0.0) is None
    assert rng.random() == np.random.default_rng(7).random()
    np.testing.assert_array_equal(image, before)
    sides, cuts = set(), set()
    for seed in range(200):
        im, lab = image.copy(), label.copy()
        side = end_field_of_view(im, lab, np.random.default_rng(seed), -0.5, 1.0)
        gone = (im[0] == -0.5).all((0, 1))  # (Z,) slices that became "beyond the scan range"
        assert np.array_equal(gone, (lab == 0).all((0, 1)))  # image and labels blanked together
        assert not np.any(im[0][..., ~gone] == -0.5) and np.all(lab[..., ~gone] == 2)  # the rest is kept
        kept = np.flatnonzero(~gone)
        assert 1 <= gone.sum() <= 9 and np.all(np.diff(kept) == 1)  # one plane, a slice at least on each side
        assert (side == "head") == bool(gone[-1]) and (side == "foot") == bool(gone[0])  # Z high is the head
        sides.add(side)
        cuts.add(int(kept[-1] if side == "head" else kept[0]))
    assert sides == {"head", "foot"} and len(cuts) >= 9  # both sides, planes all along the patch


def test_end_field_of_view_cuts_through_the_organ_or_leaves_its_neighbourhood_without_it() -> None:
    image = np.ones((1, 4, 4, 40), np.float32)
    label = np.zeros((4, 4, 40), np.int64)
    label[1:3, 1:3, 15:25] = 1  # the organ in slices 15-24
    through = removed = 0
    gaps = set()
    for seed in range(400):
        im, lab = image.copy(), label.copy()
        side = end_field_of_view(im, lab, np.random.default_rng(seed), 0.0, 1.0)
        kept = np.flatnonzero((im[0] == 1.0).all((0, 1)))  # the slices still in the scan range
        organ = np.flatnonzero((lab == 1).any((0, 1)))
        if side.endswith("(organ removed)"):  # what is left ends 0-10 slices beyond the organ and holds none
            removed += 1
            assert organ.size == 0
            gap = 15 - kept.max() - 1 if side.startswith("head") else kept.min() - 25
            assert 0 <= gap <= 10
            assert kept.min() == 0 if side.startswith("head") else kept.max() == 39  # the patch's other end stays
            gaps.add(int(gap))
        else:  # the scan range ends inside the organ: part of it is left, labelled
            through += 1
            assert 0 < organ.size < 10 and set(organ) <= set(kept)
            assert organ.min() == 15 or organ.max() == 24  # the part left is the organ's own end
    assert 150 <= removed <= 250 and through == 400 - removed
    assert gaps == set(range(11))


def test_patches_with_a_field_of_view_end_match_the_same_patches_without_it() -> None:
    case = _case(3)
    aug = AugmentConfig(affine_prob=1.0, elastic_prob=0.0, noise_prob=1.0)
    plain = PatchDataset([case], (16, 16, 16), 40, fg_ratio=0.5, seed=5, augment=aug, pad_value=-0.25)
    ended = PatchDataset([case], (16, 16, 16), 40, fg_ratio=0.5, seed=5,
                         augment=AugmentConfig(**{**aug.__dict__, "fov_end_prob": 1.0}), pad_value=-0.25)
    heads = ended_n = 0
    for i in range(40):
        a, b = plain[i], ended[i]
        gone = (b["image"][0] == -0.25).all(0).all(0).numpy() & ~(a["image"][0] == -0.25).all(0).all(0).numpy()
        assert gone.sum() <= 15  # a patch loses the slices beyond one plane (none where the organ fills it) ...
        ended_n += bool(gone.any())
        keep = torch.from_numpy(~gone)
        # ... and is the very same patch (same centre, same rotation, same noise) on the other side
        assert torch.equal(a["image"][..., keep], b["image"][..., keep])
        assert torch.equal(a["label"][..., keep], b["label"][..., keep])
        assert int(b["label"][..., ~keep].sum()) == 0
        heads += bool(gone[-1])
    assert ended_n >= 30 and 5 <= heads <= ended_n - 5


def test_fov_end_prob_is_checked_and_kept_in_the_config_file(tmp_path) -> None:
    import json

    from training.config import TrainConfig, load_config

    with pytest.raises(ValueError, match="fov_end_prob"):
        AugmentConfig(fov_end_prob=1.5)
    cfg = TrainConfig(augment=AugmentConfig(fov_end_prob=0.3))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert load_config(tmp_path / "config.json").augment.fov_end_prob == 0.3
    with pytest.raises(ValueError, match="fov_end_prob"):
        load_config(tmp_path / "config.json", {"augment.fov_end_prob": -0.1})
    assert AugmentConfig().fov_end_prob == 0.0  # off unless asked for: older runs are unchanged


def test_thin_slab_keeps_one_run_of_slices_through_the_organ() -> None:
    image = np.random.default_rng(1).random((1, 4, 4, 48)).astype(np.float32) + 1.0  # never the pad value
    label = np.zeros((4, 4, 48), np.int64)
    label[1:3, 1:3, 20:30] = 1  # the organ in slices 20-29
    rng = np.random.default_rng(3)
    before = image.copy()
    assert thin_slab(image, label, rng, 0.0, 0.0, (6, 20)) is None  # probability 0 draws nothing
    assert rng.random() == np.random.default_rng(3).random()
    np.testing.assert_array_equal(image, before)
    thick = set()
    for seed in range(300):
        im, lab = image.copy(), label.copy()
        first, stop = thin_slab(im, lab, np.random.default_rng(seed), -0.5, 1.0, (6, 20))
        kept = np.flatnonzero(~(im[0] == -0.5).all((0, 1)))
        assert kept.tolist() == list(range(first, stop))  # one run of slices, both ends cut
        assert 1 <= first and stop <= 47 and 6 <= stop - first <= 20
        np.testing.assert_array_equal(im[..., first:stop], image[..., first:stop])  # kept as it was
        organ = np.flatnonzero((lab == 1).any((0, 1)))
        assert organ.size and set(organ) <= set(kept) and set(organ) == set(kept) & set(range(20, 30))
        assert not lab[..., :first].any() and not lab[..., stop:].any()
        thick.add(stop - first)
    assert thick == set(range(6, 21))
    edge = np.zeros_like(label)
    edge[1:3, 1:3, :2] = 1  # an organ in the first two slices only: the slab keeps slice 1, its part
    for seed in range(50):
        lab = edge.copy()
        first, _ = thin_slab(image.copy(), lab, np.random.default_rng(seed), 0.0, 1.0, (6, 20))
        assert first == 1 and np.flatnonzero((lab == 1).any((0, 1))).tolist() == [1]
    # without the organ the slab lies anywhere; a patch thinner than the slab keeps all but its end slices
    empty = np.zeros_like(label)
    firsts = {thin_slab(image.copy(), empty.copy(), np.random.default_rng(s), 0.0, 1.0, (6, 6))[0] for s in range(300)}
    assert min(firsts) == 1 and max(firsts) == 41
    assert thin_slab(image[..., :5].copy(), empty[..., :5].copy(), np.random.default_rng(0), 0.0, 1.0, (6, 20)) == (1, 4)


def test_slab_patches_replace_the_field_of_view_end_and_are_checked() -> None:
    case = _case(3)
    aug = AugmentConfig(affine_prob=0.0, elastic_prob=0.0, noise_prob=0.0, fov_end_prob=1.0, slab_prob=1.0,
                        slab_slices=(4, 6))
    data = PatchDataset([case], (16, 16, 16), 20, fg_ratio=1.0, seed=5, augment=aug, pad_value=-0.25)
    for i in range(20):
        kept = np.flatnonzero(~(data[i]["image"][0] == -0.25).all(0).all(0).numpy())
        assert 4 <= kept.size <= 6 and kept.min() >= 1 and kept.max() <= 14  # a slab, not one plane's end
        assert int(data[i]["label"].sum()) > 0  # through the organ
    with pytest.raises(ValueError, match="slab_prob"):
        AugmentConfig(slab_prob=-0.1)
    with pytest.raises(ValueError, match="slab_slices"):
        AugmentConfig(slab_slices=(5, 3))
    assert AugmentConfig().slab_prob == 0.0  # off unless asked for


def test_thin_slab_away_lies_beside_the_organ_and_holds_none_of_it() -> None:
    image = np.random.default_rng(2).random((1, 4, 4, 48)).astype(np.float32) + 1.0
    label = np.zeros((4, 4, 48), np.int64)
    label[1:3, 1:3, 20:30] = 1  # the organ in slices 20-29
    sides, through = set(), 0
    for seed in range(400):
        im, lab = image.copy(), label.copy()
        first, stop = thin_slab(im, lab, np.random.default_rng(seed), -0.5, 1.0, (6, 8), away=0.5)
        kept = np.flatnonzero(~(im[0] == -0.5).all((0, 1)))
        assert kept.tolist() == list(range(first, stop)) and 6 <= stop - first <= 8
        if lab.any():  # through the organ, as without ``away``
            through += 1
            assert first < 30 and stop > 20
            continue
        # beside it: 0-10 slices below or above, none of it kept, the image there untouched
        assert stop <= 20 or first >= 30
        gap = 20 - stop if stop <= 20 else first - 30
        assert 0 <= gap <= 10
        sides.add("below" if stop <= 20 else "above")
        np.testing.assert_array_equal(im[..., first:stop], image[..., first:stop])
    assert sides == {"below", "above"} and 150 < through < 250  # about half of the slabs
    # no room beside the organ (it fills the patch but its end slices): the slab goes through it
    full = np.zeros_like(label)
    full[1:3, 1:3, 2:46] = 1
    for seed in range(50):
        lab = full.copy()
        thin_slab(image.copy(), lab, np.random.default_rng(seed), 0.0, 1.0, (6, 8), away=1.0)
        assert lab.any()
    # ``away`` 0 makes no extra draw: the slabs are those of a run without it
    for seed in range(20):
        a = thin_slab(image.copy(), label.copy(), np.random.default_rng(seed), 0.0, 1.0, (6, 20))
        b = thin_slab(image.copy(), label.copy(), np.random.default_rng(seed), 0.0, 1.0, (6, 20), away=0.0)
        assert a == b
    with pytest.raises(ValueError, match="slab_away"):
        AugmentConfig(slab_away=1.5)
    assert AugmentConfig().slab_away == 0.0

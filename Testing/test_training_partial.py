"""Partial labels: a multi-organ model trained on cases that label every organ and cases that label the spleen only.

Label 255 ("not the spleen, otherwise unknown") must never push a voxel towards any one of the other
classes; the cache, the sampler and the trainer must carry it without taking it for foreground.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import blob_case, tiny_config, write_case, write_dataset

from training.cache import cache_dir_for, ensure_cached, load_cached
from training.config import TrainConfig
from training.data import UNKNOWN_LABEL, CaseError, read_msd
from training.engine import TrainOptions, train
from training.losses import dice_ce_loss, make_loss, partial_dice_ce_loss
from training.sampling import PatchDataset
from vnetseg.checkpoint import load_model


def test_without_unknown_voxels_it_is_dice_plus_cross_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 4, 3)
    target = torch.randint(0, 4, (2, 5, 4, 3))
    expected = dice_ce_loss(logits, target)
    assert partial_dice_ce_loss(logits, target, UNKNOWN_LABEL).item() == pytest.approx(expected.item(), rel=1e-5)


def test_an_unknown_voxel_scores_minus_log_of_not_spleen_by_hand() -> None:
    # one voxel, three classes: p = softmax(0, 1, 2); unknown means "class 0 or class 2"
    logits = torch.tensor([0.0, 1.0, 2.0]).reshape(1, 3, 1, 1, 1)
    target = torch.full((1, 1, 1, 1), UNKNOWN_LABEL)
    p = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
    ce = -math.log(float(p[0] + p[2]))
    # Dice: spleen (class 1) has no target: 1 - eps / (p1^2 + eps) ~ 1; class 2 is not scored (unknown)
    dice_spleen = 1.0 - 1e-5 / (float(p[1]) ** 2 + 1e-5)
    loss = partial_dice_ce_loss(logits, target, UNKNOWN_LABEL)
    assert loss.item() == pytest.approx(dice_spleen + ce, rel=1e-5)
    assert partial_dice_ce_loss(logits, target, UNKNOWN_LABEL, ce_weight=0.0).item() == pytest.approx(dice_spleen, rel=1e-5)


def test_unknown_voxels_do_not_choose_between_the_other_classes() -> None:
    """Swapping the logits of background and liver at unknown voxels leaves the loss as it was."""
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 6, 6, 4)
    target = torch.randint(0, 3, (1, 6, 6, 4))
    target[:, :3] = UNKNOWN_LABEL  # half the patch: spleen-only reference
    swapped = logits.clone()
    swapped[:, [0, 2], :3] = logits[:, [2, 0], :3]
    a = partial_dice_ce_loss(logits, target, UNKNOWN_LABEL)
    b = partial_dice_ce_loss(swapped, target, UNKNOWN_LABEL)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    # the same swap where the voxels are labelled changes it
    labelled = logits.clone()
    labelled[:, [0, 2], 3:] = logits[:, [2, 0], 3:]
    assert abs(partial_dice_ce_loss(labelled, target, UNKNOWN_LABEL).item() - a.item()) > 1e-3
    # and the gradient lowers the spleen where it is not the spleen
    x = logits.clone().requires_grad_(True)
    partial_dice_ce_loss(x, target, UNKNOWN_LABEL).backward()
    assert x.grad[:, 1, :3].gt(0).all()  # d loss / d spleen logit > 0 at every unknown voxel


def test_partial_loss_errors_and_factory() -> None:
    logits = torch.zeros(1, 3, 2, 2, 2)
    with pytest.raises(ValueError, match="outside the 3 classes"):
        partial_dice_ce_loss(logits, torch.zeros(1, 2, 2, 2, dtype=torch.long), unknown=2)
    with pytest.raises(ValueError, match=r"\(B, K, X, Y, Z\)"):
        partial_dice_ce_loss(logits, torch.zeros(2, 2, 2, dtype=torch.long), UNKNOWN_LABEL)
    target = torch.full((1, 2, 2, 2), UNKNOWN_LABEL)
    target[0, 0, 0, 0] = 1
    loss = make_loss("dice_ce", UNKNOWN_LABEL)(logits, target)
    assert loss.item() == pytest.approx(partial_dice_ce_loss(logits, target, UNKNOWN_LABEL).item())
    no_ce = make_loss("dice", UNKNOWN_LABEL)(logits, target)
    assert no_ce.item() == pytest.approx(partial_dice_ce_loss(logits, target, UNKNOWN_LABEL, 0.0).item())


def test_config_checks_and_round_trips_partial_settings() -> None:
    cfg = tiny_config(**{"model.out_channels": 3}, partial_label=255, fg_classes=[1])
    assert cfg.partial_label == 255 and cfg.fg_classes == (1,)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="partial_label must be 0"):
        tiny_config(partial_label=1)
    with pytest.raises(ValueError, match="fg_classes must be foreground classes 1..1"):
        tiny_config(fg_classes=[2])


def _organ_task(root: Path) -> Path:
    """Three cases, classes background / spleen / liver: two fully labelled, one labelling the spleen only."""
    affine = np.diag([6.0, 6.0, 6.0, 1.0])  # RAS, 6 mm: the tiny config's own spacing
    pairs = []
    for n in range(3):
        image, ball = blob_case(shape=(40, 36, 32), centre=(26, 18, 16), radius=5.0, seed=n)
        liver = np.zeros_like(ball)
        liver[4:16, 8:28, 8:24] = 1
        image = np.where(liver > 0, 60.0, image)
        if n < 2:
            label = np.where(ball > 0, 1, np.where(liver > 0, 2, 0))
        else:
            label = np.where(ball > 0, 1, UNKNOWN_LABEL)
        pairs.append(write_case(root, f"case_{n}", image, label, affine))
    write_dataset(root, pairs, {"0": "background", "1": "spleen", "2": "liver"})
    return root


def test_cache_keeps_unknown_out_of_the_foreground_and_in_a_folder_of_its_own(tmp_path: Path) -> None:
    data = read_msd(_organ_task(tmp_path / "Task"))
    cfg = tiny_config()
    with pytest.raises(CaseError, match="255"):  # without the partial label, 255 is an unknown value
        ensure_cached(data.cases, data.labels, cfg.preprocessing, tmp_path / "cache")
    folder = ensure_cached(data.cases, data.labels, cfg.preprocessing, tmp_path / "cache", unknown=UNKNOWN_LABEL)
    assert folder == cache_dir_for(tmp_path / "cache", cfg.preprocessing, data.labels, UNKNOWN_LABEL)
    assert folder != cache_dir_for(tmp_path / "cache", cfg.preprocessing)  # not the two-class folder
    full, partial = load_cached(folder, ["case_0", "case_2"])
    assert set(np.unique(partial.label)) == {1, UNKNOWN_LABEL}
    assert len(partial.foreground) == int((partial.label == 1).sum()) > 0  # 255 is not foreground
    assert len(full.foreground) == int(np.isin(full.label, [1, 2]).sum())
    # patches cut around the spleen only (fg_classes), not around the liver
    ds = PatchDataset([full], (8, 8, 8), 30, fg_ratio=1.0, seed=0, augment=None, fg_classes=(1,))
    assert all(int(ds[i]["label"][4, 4, 4]) == 1 for i in range(30))
    every = PatchDataset([full], (8, 8, 8), 60, fg_ratio=1.0, seed=0, augment=None)
    assert {int(every[i]["label"][4, 4, 4]) for i in range(60)} == {1, 2}


def test_a_multi_organ_model_trains_on_partial_labels_and_is_scored_on_the_spleen(tmp_path: Path) -> None:
    data = _organ_task(tmp_path / "Task")
    (data / "splits.json").write_text('[{"train": ["case_0", "case_2"], "val": ["case_1"]}]')
    cfg = tiny_config(**{"model.out_channels": 3}, partial_label=UNKNOWN_LABEL, fg_classes=[1], epochs=2, iters_per_epoch=2)
    result = train(TrainOptions(data=data, out=tmp_path / "run", fold=0, config=cfg, splits=data / "splits.json",
                                device="cpu", quiet=True))
    assert list(result.last_dice) == ["case_1"] and 0.0 <= result.last_dice["case_1"] <= 1.0
    _net, info = load_model(result.fold_dir / "model_last.pt")
    assert [(lab.value, lab.name) for lab in info.labels] == [(1, "Spleen"), (2, "Liver")]
    assert info.card["config"]["partial_label"] == UNKNOWN_LABEL
    # a two-class model reading the same folder cannot: 255 and label 2 are named as the problem
    with pytest.raises(ValueError, match="out_channels"):
        train(TrainOptions(data=data, out=tmp_path / "run2", fold=0, config=tiny_config(),
                           splits=data / "splits.json", device="cpu", quiet=True))

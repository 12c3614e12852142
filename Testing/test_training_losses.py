"""The V-Net soft Dice loss, Dice + CE, optimisers and schedules: known answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.config import TrainConfig, load_config
from training.losses import dice_ce_loss, make_loss, soft_dice_loss
from training.optim import LRFactor, build_optimizer, build_scheduler


def _logits_for(probs_fg: torch.Tensor) -> torch.Tensor:
    """Two-class logits whose softmax foreground probability is ``probs_fg`` (B, X, Y, Z)."""
    return torch.stack([torch.zeros_like(probs_fg), torch.log(probs_fg / (1 - probs_fg))], dim=1)


def test_soft_dice_matches_the_vnet_formula_by_hand() -> None:
    p = torch.tensor([0.9, 0.8, 0.3, 0.1]).reshape(1, 4, 1, 1)
    g = torch.tensor([1, 1, 1, 0]).reshape(1, 4, 1, 1)
    # D = 2 * (0.9 + 0.8 + 0.3) / ((0.81 + 0.64 + 0.09 + 0.01) + 3) = 4 / 4.55
    expected = 1.0 - 4.0 / 4.55
    loss = soft_dice_loss(_logits_for(p), g, eps=0.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # with the background class: D_bg = 2 * 0.9 / ((0.01+0.04+0.49+0.81) + 1) = 1.8 / 2.35
    both = soft_dice_loss(_logits_for(p), g, include_background=True, eps=0.0)
    assert both.item() == pytest.approx(1.0 - 0.5 * (4.0 / 4.55 + 1.8 / 2.35), rel=1e-5)


def test_soft_dice_extremes_and_gradient() -> None:
    target = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    target[:, 1:3, 1:3, 1:3] = 1
    perfect = torch.where(target.bool(), 20.0, -20.0)
    logits = torch.stack([torch.zeros_like(perfect), perfect], 1)
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_dice_loss(-logits, target).item() == pytest.approx(1.0, abs=1e-6)
    # an empty target predicted empty is perfect (eps), not 0/0
    empty = torch.zeros_like(target)
    none = torch.stack([torch.zeros_like(perfect), torch.full_like(perfect, -30.0)], 1)
    assert soft_dice_loss(none, empty).item() < 1e-3
    x = torch.zeros(2, 2, 4, 4, 4, requires_grad=True)
    soft_dice_loss(x, target).backward()
    assert torch.isfinite(x.grad).all() and x.grad[:, 1][target.bool()].lt(0).all()  # raise fg where fg


def test_dice_ce_adds_cross_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 4, 4, 4)
    target = (torch.rand(1, 4, 4, 4) > 0.5).long()
    expected = soft_dice_loss(logits, target) + F.cross_entropy(logits, target)
    assert dice_ce_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert make_loss("dice") is soft_dice_loss
    with pytest.raises(ValueError, match="loss must be"):
        make_loss("focal")
    with pytest.raises(ValueError, match=r"\(B, K, X, Y, Z\)"):
        soft_dice_loss(logits, target[0])


def test_schedules_and_optimisers() -> None:
    poly = LRFactor("poly", total=100, power=0.9)
    assert poly(0) == 1.0 and poly(50) == pytest.approx(0.5**0.9) and poly(100) == 0.0
    cos = LRFactor("cosine", total=100, warmup=10)
    assert cos(0) == pytest.approx(1 / 11) and cos(10) == 1.0
    assert cos(55) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    cfg = load_config("spleen", {"epochs": 2, "iters_per_epoch": 5})
    model = torch.nn.Linear(2, 1)
    opt = build_optimizer(cfg, model.parameters())
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.99
    sched = build_scheduler(cfg, opt)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**0.9)
    adam = build_optimizer(load_config("spleen-light"), model.parameters())
    assert isinstance(adam, torch.optim.AdamW)


def test_config_presets_files_and_errors(tmp_path) -> None:
    spleen = load_config("spleen")
    assert spleen.preprocessing.target_spacing == (1.5, 1.5, 2.0)
    assert spleen.preprocessing.hu_window == (-57.0, 164.0) and spleen.preprocessing.patch_size == (96, 96, 96)
    assert spleen.loss == "dice" and not spleen.augment.flip_lr and spleen.model.kernel_size == 5
    path = tmp_path / "cfg.json"
    path.write_text('{"base": "synthetic", "epochs": 3, "augment": {"noise_prob": 0.5}, '
                    '"model": {"widths": [4, 8, 16, 32, 64]}}')
    cfg = load_config(path, {"lr": 0.5})
    assert (cfg.epochs, cfg.lr, cfg.augment.noise_prob, cfg.model.widths) == (3, 0.5, 0.5, (4, 8, 16, 32, 64))
    assert cfg.augment.scale == load_config("synthetic").augment.scale  # untouched keys keep the base's values
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown training config keys"):
        load_config("synthetic", {"epoch": 3})
    with pytest.raises(ValueError, match="multiple of 16"):
        load_config("synthetic", {"preprocessing.patch_size": [40, 48, 48]})
    with pytest.raises(ValueError, match="neither a preset"):
        load_config(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        load_config("synthetic", {"optimizer": "lbfgs"})
    assert math.isclose(load_config("synthetic").lr, 3e-3)


def test_shift_consistency_loss_compares_only_the_shared_voxels() -> None:
    from training.losses import shift_consistency_loss

    big = torch.rand(1, 1, 12, 10, 8)
    a, b = big[:, :, 0:8, 0:8, 0:6], big[:, :, 4:12, 2:10, 2:8]
    oa, ob = torch.tensor([[0, 0, 0]]), torch.tensor([[4, 2, 2]])
    # two windows of the same map agree wherever they overlap
    assert shift_consistency_loss(a, b, oa, ob).item() == 0.0
    # raise the second view by 0.5 in part of the overlap only: with equal weights the target is the
    # mean, 0.25 from each view: 2 x 0.25^2 = 0.125 per changed voxel, averaged over the overlap
    changed = b.clone()
    changed[:, :, 0:2] += 0.5  # big-patch rows 4-5 (inside the overlap rows 4-7); all overlap columns/slices
    overlap = 4 * 6 * 4  # rows 4-7, columns 2-7, slices 2-5
    share = (2 * 6 * 4) / overlap
    assert shift_consistency_loss(a, changed, oa, ob).item() == pytest.approx(0.125 * share, rel=1e-5)
    # weights by place in the window: the changed voxels lie in a's rows 4-5 (weight 1/3 here) and b's
    # rows 0-1 (weight 1), so their target lies 3/4 of the way from a to b
    importance = torch.ones(8, 8, 6)
    importance[4:8] = 1.0 / 3.0
    weighted = shift_consistency_loss(a, changed, oa, ob, importance)
    # a's rows 4-5 weigh 1/3, b's rows 0-1 weigh 1: the target lies 3/4 of the way to b
    assert weighted.item() == pytest.approx(((0.5 * 0.75) ** 2 + (0.5 * 0.25) ** 2) * share, rel=1e-5)
    # the target carries no gradient: each view is pulled towards it, not the target towards the views
    a_req, b_req = a.clone().requires_grad_(), changed.clone().requires_grad_()
    shift_consistency_loss(a_req, b_req, oa, ob, importance).backward()
    n = overlap
    torch.testing.assert_close(a_req.grad[0, 0, 4, 2, 2], torch.tensor(2 * -0.375 / n))
    torch.testing.assert_close(b_req.grad[0, 0, 0, 0, 0], torch.tensor(2 * 0.125 / n))
    # outside the overlap (big-patch rows 8-11) a change costs nothing
    outside = b.clone()
    outside[:, :, 4:8] += 0.5
    assert shift_consistency_loss(a, outside, oa, ob).item() == 0.0
    # windows that share no voxel contribute nothing
    far = shift_consistency_loss(a, b, oa, torch.tensor([[8, 0, 0]]))
    assert far.item() == 0.0
    with pytest.raises(ValueError, match="offsets"):
        shift_consistency_loss(a, b, oa[0], ob[0])


def test_shift_consistency_settings_are_checked_and_round_trip() -> None:
    cfg = load_config(TrainConfig(), {"shift_consistency": 2.0, "consistency_shift": [16, 16, 4]})
    assert cfg.consistency_shift == (16, 16, 4)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="shift_consistency must be >= 0"):
        TrainConfig(shift_consistency=-1.0)
    with pytest.raises(ValueError, match="needs a consistency_shift"):
        TrainConfig(shift_consistency=1.0)
    with pytest.raises(ValueError, match="3 voxel counts"):
        TrainConfig(consistency_shift=(4, 4))
    with pytest.raises(ValueError, match="fg_offset must be in"):
        TrainConfig(fg_offset=-0.1)

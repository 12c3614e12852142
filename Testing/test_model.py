"""V-Net architecture: shapes, configs, presets, and the input-size contract."""

from __future__ import annotations

import pytest
import torch

from vnetseg.model import PRESETS, VNet, VNetConfig, build_model, count_parameters, preset


@pytest.mark.parametrize(
    "cfg,size",
    [
        (VNetConfig(widths=(4, 8, 16, 32, 64)), (16, 32, 48)),
        (VNetConfig(widths=(4, 8, 16, 32, 64), kernel_size=3, norm="batch", skip="add"), (32, 16, 16)),
        (VNetConfig(widths=(4, 8, 16, 32, 64), norm="instance", dropout=0.2), (32, 16, 32)),
        (VNetConfig(widths=(4, 8, 16), encoder_convs=(1, 2, 2), decoder_convs=(2, 1), out_channels=3), (8, 12, 4)),
    ],
)
def test_output_shape_matches_input(cfg: VNetConfig, size: tuple[int, int, int]) -> None:
    net = VNet(cfg).eval()
    x = torch.randn(2, cfg.in_channels, *size)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, cfg.out_channels, *size)
    assert torch.isfinite(y).all()


def test_paper_preset_is_the_paper_architecture() -> None:
    net = build_model("paper")
    cfg = net.config
    assert cfg.widths == (16, 32, 64, 128, 256)
    assert cfg.encoder_convs == (1, 2, 3, 3, 3) and cfg.decoder_convs == (3, 3, 2, 1)
    assert cfg.kernel_size == 5 and cfg.norm == "none" and cfg.skip == "concat"
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    # every feature convolution is 5x5x5 except the 2x2x2 down-convolutions and the 1x1x1 head
    kernels = {m.kernel_size for m in convs}
    assert kernels == {(5, 5, 5), (2, 2, 2), (1, 1, 1)}
    downs = [m for m in convs if m.kernel_size == (2, 2, 2)]
    assert [m.stride for m in downs] == [(2, 2, 2)] * 4
    ups = [m for m in net.modules() if isinstance(m, torch.nn.ConvTranspose3d)]
    assert len(ups) == 4 and all(m.stride == (2, 2, 2) for m in ups)
    assert any(isinstance(m, torch.nn.PReLU) for m in net.modules())
    # decoder stages run at 256, 128, 64, 32 channels (up-sampled + forwarded features), head maps 32 -> 2
    assert [up.out_channels for up in net.ups] == [256, 128, 64, 32]
    assert net.head.in_channels == 32 and net.head.out_channels == 2


def test_tutorial_preset_adds_skips_and_every_decoder_stage_is_used() -> None:
    torch.manual_seed(0)
    cfg = preset("tutorial", widths=(4, 8, 16, 32, 64))
    net = VNet(cfg).eval()
    assert all(m.kernel_size == (3, 3, 3) for m in net.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size[0] > 2)
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    x = torch.randn(1, 1, 16, 16, 16)
    out = net(x).sum()
    out.backward()
    # if a decoder stage were computed and thrown away, its weights would get no gradient
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} does not influence the output"


def test_light_preset_is_much_cheaper() -> None:
    assert count_parameters(build_model("light")) < count_parameters(build_model("paper")) / 10
    assert set(PRESETS) == {"paper", "tutorial", "light"}


def test_bad_size_names_the_size() -> None:
    net = VNet(VNetConfig(widths=(4, 8, 16, 32, 64)))
    with pytest.raises(ValueError, match=r"\(16, 20, 16\).*multiple of 16"):
        net(torch.zeros(1, 1, 16, 20, 16))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kernel_size": 4}, "kernel_size"),
        ({"norm": "group"}, "norm"),
        ({"skip": "mul"}, "skip"),
        ({"dropout": 1.0}, "dropout"),
        ({"encoder_convs": (1, 2)}, "encoder_convs"),
        ({"decoder_convs": (1,)}, "decoder_convs"),
    ],
)
def test_bad_config_is_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        VNetConfig(**kwargs)


def test_config_dict_round_trip_and_unknown_preset() -> None:
    cfg = preset("light", dropout=0.1)
    assert VNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown V-Net preset"):
        preset("huge")
    with pytest.raises(ValueError, match="unknown V-Net config keys"):
        VNetConfig.from_dict({"widthz": [1]})

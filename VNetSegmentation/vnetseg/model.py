"""The V-Net of Milletari, Navab and Ahmadi (2016), built from a small config.

Reference: F. Milletari, N. Navab, S.-A. Ahmadi, "V-Net: Fully Convolutional Neural Networks
for Volumetric Medical Image Segmentation", 3DV 2016, arXiv:1606.04797.

The ``paper`` preset follows the paper: 5x5x5 convolutions with PReLU, residual stages of
1-2-3-3-3 convolutions in the encoder and 3-3-2-1 in the decoder, 2x2x2 stride-2 convolutions to
go down, 2x2x2 stride-2 transposed convolutions to go up, encoder features concatenated to the
decoder ("fine-grained feature forwarding"), 16-32-64-128-256 channels and a final 1x1x1
convolution to the class logits.

Deviations from the paper, in every preset:
  * The output is raw logits for ``out_channels`` classes; the softmax is applied by the loss
    and by inference, not inside the network.
  * The input stage adds the input to its 16 feature maps by repeating the input channels
    (as in the paper) when ``widths[0]`` is a multiple of ``in_channels``, otherwise through a
    1x1x1 convolution.
  * Optional normalisation (batch or instance) after each convolution and optional 3D dropout in
    the three deepest stages; the paper uses neither (``norm="none"``, ``dropout=0``).
  * ``skip="add"`` (the ``tutorial`` preset) adds encoder features to the up-sampled decoder
    features after a 3x3x3 channel-matching convolution instead of concatenating them; every
    decoder stage then takes the previous decoder stage's output (the wiring is correct: no stage
    is computed and thrown away).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

NORMS = ("none", "batch", "instance")
SKIPS = ("concat", "add")


@dataclass(frozen=True)
class VNetConfig:
    """Architecture of a V-Net.

    Attributes:
        in_channels: image channels (1 for CT).
        out_channels: classes, background included (2 for spleen vs. background).
        widths: feature channels of the five encoder stages.
        encoder_convs: convolutions in each encoder stage (residual).
        decoder_convs: convolutions in each decoder stage, deepest first.
        kernel_size: 3 or 5 (the paper uses 5).
        norm: "none", "batch" or "instance".
        dropout: 3D dropout probability in the three deepest stages (0 disables it).
        skip: "concat" (paper) or "add" (tutorial variant).
    """

    in_channels: int = 1
    out_channels: int = 2
    widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    encoder_convs: tuple[int, ...] = (1, 2, 3, 3, 3)
    decoder_convs: tuple[int, ...] = (3, 3, 2, 1)
    kernel_size: int = 5
    norm: str = "none"
    dropout: float = 0.0
    skip: str = "concat"

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "encoder_convs", tuple(int(n) for n in self.encoder_convs))
        object.__setattr__(self, "decoder_convs", tuple(int(n) for n in self.decoder_convs))
        if len(self.widths) < 2:
            raise ValueError(f"widths must name at least 2 stages, got {self.widths}")
        if len(self.encoder_convs) != len(self.widths):
            raise ValueError(
                f"encoder_convs needs one entry per stage ({len(self.widths)}), got {self.encoder_convs}"
            )
        if len(self.decoder_convs) != len(self.widths) - 1:
            raise ValueError(
                f"decoder_convs needs {len(self.widths) - 1} entries, got {self.decoder_convs}"
            )
        if any(w < 1 for w in self.widths) or any(n < 1 for n in self.encoder_convs + self.decoder_convs):
            raise ValueError("widths and convolution counts must be positive integers")
        if self.kernel_size not in (3, 5):
            raise ValueError(f"kernel_size must be 3 or 5, got {self.kernel_size}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.skip not in SKIPS:
            raise ValueError(f"skip must be one of {SKIPS}, got {self.skip!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.in_channels < 1 or self.out_channels < 2:
            raise ValueError("in_channels must be >= 1 and out_channels >= 2")

    @property
    def size_multiple(self) -> int:
        """Each spatial input size must be a multiple of this (2 ** number of down-steps)."""
        return 2 ** (len(self.widths) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown V-Net config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


PRESETS: dict[str, VNetConfig] = {
    # The architecture of the paper.
    "paper": VNetConfig(),
    # The widely copied tutorial variant: 3x3x3, batch norm, additive skips.
    "tutorial": VNetConfig(kernel_size=3, norm="batch", skip="add"),
    # A CPU-friendly variant: half the widths, 3x3x3 kernels, instance norm (about 1/30 of the FLOPs).
    "light": VNetConfig(widths=(8, 16, 32, 64, 128), kernel_size=3, norm="instance"),
}


def preset(name: str, **overrides: Any) -> VNetConfig:
    """Return a named preset ("paper", "tutorial", "light"), optionally with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown V-Net preset {name!r}; choose one of {sorted(PRESETS)}")
    data = PRESETS[name].to_dict()
    data.update(overrides)
    return VNetConfig.from_dict(data)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.Identity()


class _ConvUnit(nn.Sequential):
    """Convolution (same padding) -> optional normalisation -> PReLU."""

    def __init__(self, cin: int, cout: int, k: int, norm: str) -> None:
        super().__init__(
            nn.Conv3d(cin, cout, k, padding=k // 2, bias=norm == "none"),
            _norm(norm, cout),
            nn.PReLU(cout),
        )


class _ResidualStage(nn.Module):
    """``n`` convolutions at constant width whose output is added to the stage input."""

    def __init__(self, channels: int, n: int, k: int, norm: str, dropout: float) -> None:
        super().__init__()
        units: list[nn.Module] = [_ConvUnit(channels, channels, k, norm) for _ in range(n)]
        self.convs = nn.Sequential(*units)
        self.drop = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.act = nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.convs(self.drop(x)) + x)


class _InputStage(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, k: int, norm: str) -> None:
        super().__init__()
        self.first = _ConvUnit(cin, cout, k, norm)
        self.rest = nn.Sequential(*[_ConvUnit(cout, cout, k, norm) for _ in range(n - 1)])
        self.repeat = cout // cin if cout % cin == 0 else 0
        self.project = nn.Identity() if self.repeat else nn.Conv3d(cin, cout, 1)
        self.act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x.repeat(1, self.repeat, 1, 1, 1) if self.repeat else self.project(x)
        return self.act(self.rest(self.first(x)) + shortcut)


class _Down(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, k: int, norm: str, dropout: float) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv3d(cin, cout, 2, stride=2, bias=norm == "none"), _norm(norm, cout), nn.PReLU(cout))
        self.stage = _ResidualStage(cout, n, k, norm, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(self.down(x))


class _Up(nn.Module):
    """Transposed convolution up, merge with encoder features, residual stage."""

    def __init__(self, cin: int, skip_ch: int, n: int, k: int, norm: str, dropout: float, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.up = nn.Sequential(
            nn.ConvTranspose3d(cin, skip_ch, 2, stride=2, bias=norm == "none"), _norm(norm, skip_ch), nn.PReLU(skip_ch)
        )
        if mode == "add":
            self.match = _ConvUnit(skip_ch, skip_ch, 3, norm)
            self.out_channels = skip_ch
        else:
            self.out_channels = 2 * skip_ch
        self.stage = _ResidualStage(self.out_channels, n, k, norm, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        merged = x + self.match(skip) if self.mode == "add" else torch.cat([x, skip], dim=1)
        return self.stage(merged)


class VNet(nn.Module):
    """V-Net mapping (B, in_channels, X, Y, Z) images to (B, out_channels, X, Y, Z) logits.

    Each of X, Y, Z must be a multiple of ``config.size_multiple`` (16 for five stages).
    """

    def __init__(self, config: VNetConfig | None = None) -> None:
        super().__init__()
        cfg = config or VNetConfig()
        self.config = cfg
        k, norm, w = cfg.kernel_size, cfg.norm, cfg.widths
        deep = len(w) - 3  # stages from this index on get dropout
        self.inp = _InputStage(cfg.in_channels, w[0], cfg.encoder_convs[0], k, norm)
        self.downs = nn.ModuleList(
            _Down(w[i - 1], w[i], cfg.encoder_convs[i], k, norm, cfg.dropout if i >= deep else 0.0)
            for i in range(1, len(w))
        )
        ups = []
        cin = w[-1]
        for j, level in enumerate(range(len(w) - 2, -1, -1)):
            drop = cfg.dropout if level >= deep else 0.0
            up = _Up(cin, w[level], cfg.decoder_convs[j], k, norm, drop, cfg.skip)
            ups.append(up)
            cin = up.out_channels
        self.ups = nn.ModuleList(ups)
        self.head = nn.Conv3d(cin, cfg.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"VNet expects a (B, C, X, Y, Z) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"VNet expects {self.config.in_channels} input channel(s), got {x.shape[1]}")
        m = self.config.size_multiple
        if any(s % m for s in x.shape[2:]):
            raise ValueError(
                f"VNet input spatial size {tuple(x.shape[2:])} is not a multiple of {m} in every axis; "
                f"pad or crop it (vnetseg.inference pads automatically)"
            )
        skips = [self.inp(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.head(y)  # (B, out_channels, X, Y, Z) logits


def build_model(config: VNetConfig | str = "paper") -> VNet:
    """Build a V-Net from a config or a preset name."""
    return VNet(preset(config) if isinstance(config, str) else config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

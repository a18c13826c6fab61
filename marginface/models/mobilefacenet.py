"""MobileFaceNet family: the paper's net, insightface's wider `mbf`, and a squeeze-excitation variant.

All share one layout (Chen et al. 2018, "MobileFaceNets", Table 1): a stride-2 3×3 stem conv, a
(grouped) 3×3 conv, stages of inverted-residual bottlenecks, a 1×1 conv, and the GDC head:
a global depthwise conv whose kernel covers the whole last map (so it follows `input_size`), then
a linear projection to the embedding with BN. Non-linearities are PReLU. The layers come from
`marginface.models.layers` (stock maths and parameters, faster CPU training; docs/performance.md).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from marginface.models.complexity import final_map_size, round_channels
from marginface.models.layers import Conv2d, PReLU


@dataclass(frozen=True)
class Stage:
    """`num_blocks` bottlenecks; the first one strides and changes the width to `out_channels`."""

    out_channels: int
    expanded_channels: int  # width of the depthwise conv inside each block (input width × t)
    num_blocks: int
    stride: int


@dataclass(frozen=True)
class MobileFaceNetSpec:
    stem_channels: int
    stem_channels_per_group: int  # of the second 3×3 conv: 1 = depthwise (paper), 2 (mbf)
    stages: tuple[Stage, ...]
    head_channels: int  # the 1×1 conv feeding the GDC
    squeeze_excite: bool = False

    def scaled(self, width_mult: float) -> MobileFaceNetSpec:
        def scale(channels: int) -> int:
            return round_channels(channels, width_mult)

        stages = tuple(replace(s, out_channels=scale(s.out_channels), expanded_channels=scale(s.expanded_channels))
                       for s in self.stages)
        return replace(self, stem_channels=scale(self.stem_channels), stages=stages,
                       head_channels=scale(self.head_channels))


# Table 1 of the paper: bottlenecks (t, c, n, s) = (2,64,5,2) (4,128,1,2) (2,128,6,1) (4,128,1,2) (2,128,2,1).
MOBILEFACENET = MobileFaceNetSpec(
    stem_channels=64,
    stem_channels_per_group=1,
    stages=(Stage(64, 128, 5, 2), Stage(128, 256, 1, 2), Stage(128, 256, 6, 1),
            Stage(128, 512, 1, 2), Stage(128, 256, 2, 1)),
    head_channels=512,
)

# insightface arcface_torch `mbf` (blocks (1, 4, 6, 2), scale 2, "MobileFaceNet 0.45G"): its
# widths are doubled, the second stem conv uses groups of 2 channels, and every stage is one
# stride-2 block followed by the residual blocks: 1+4 at width 128, 1+6 at 256, then a stride-2
# block expanding to 512 and 2 residual blocks at 256 (the expansion widths are fixed, not ×t).
MBF = MobileFaceNetSpec(
    stem_channels=128,
    stem_channels_per_group=2,
    stages=(Stage(128, 128, 5, 2), Stage(256, 256, 7, 2), Stage(256, 512, 1, 2), Stage(256, 256, 2, 1)),
    head_channels=512,
)

MOBILEFACENET_SE = replace(MOBILEFACENET, squeeze_excite=True)


class ConvBN(nn.Sequential):
    """Conv (no bias: BN follows) + BN, then PReLU unless the block is linear."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                 groups: int = 1, activation: bool = True, padding: int | None = None) -> None:
        # layers.Conv2d: nn.Conv2d, but strided/grouped ones stay fp32 under CPU bf16 autocast (faster)
        conv = Conv2d(in_channels, out_channels, kernel, stride,
                      kernel // 2 if padding is None else padding, groups=groups, bias=False)
        # He init for the non-linearity that follows (PReLU starts at slope 0.25, else none), so
        # activations stay O(1) even in eval mode before any training.
        if activation:
            nn.init.kaiming_normal_(conv.weight, a=0.25, nonlinearity="leaky_relu")
        else:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="linear")
        layers: list[nn.Module] = [conv, nn.BatchNorm2d(out_channels)]
        if activation:
            layers.append(PReLU(out_channels))
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Channel gating from globally pooled features (Hu et al. 2018), reduction 4."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = round_channels(channels / reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.act = PReLU(hidden)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class Bottleneck(nn.Module):
    """Inverted residual: 1×1 expand, 3×3 depthwise (strided), [SE], linear 1×1 project."""

    def __init__(self, in_channels: int, out_channels: int, expanded_channels: int, stride: int,
                 squeeze_excite: bool = False) -> None:
        super().__init__()
        self.expand = ConvBN(in_channels, expanded_channels)
        self.depthwise = ConvBN(expanded_channels, expanded_channels, 3, stride, groups=expanded_channels)
        self.excite = SqueezeExcite(expanded_channels) if squeeze_excite else nn.Identity()
        self.project = ConvBN(expanded_channels, out_channels, activation=False)
        self.use_residual = stride == 1 and in_channels == out_channels  # fixed at build time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.excite(self.depthwise(self.expand(x))))
        return x + y if self.use_residual else y


class GDCHead(nn.Module):
    """Global depthwise conv (one k×k filter per channel over the whole map) + linear embedding.

    Unlike global average pooling it learns where on the face to look (the paper's point).
    """

    def __init__(self, channels: int, map_size: int, embedding_size: int) -> None:
        super().__init__()
        self.gdc = ConvBN(channels, channels, map_size, groups=channels, activation=False, padding=0)
        self.linear = nn.Linear(channels, embedding_size, bias=False)  # BN follows: a bias is redundant
        self.bn = nn.BatchNorm1d(embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(torch.flatten(self.gdc(x), 1)))


class MobileFaceNet(nn.Module):
    def __init__(self, spec: MobileFaceNetSpec, embedding_size: int, input_size: int) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.input_size = input_size
        stem = spec.stem_channels
        self.stem = nn.Sequential(
            ConvBN(3, stem, 3, stride=2),
            ConvBN(stem, stem, 3, groups=stem // spec.stem_channels_per_group),
        )
        blocks: list[nn.Module] = []
        channels = stem
        for stage in spec.stages:
            for index in range(stage.num_blocks):
                stride = stage.stride if index == 0 else 1
                blocks.append(Bottleneck(channels, stage.out_channels, stage.expanded_channels, stride,
                                         spec.squeeze_excite))
                channels = stage.out_channels
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = ConvBN(channels, spec.head_channels)
        self.head = GDCHead(spec.head_channels, final_map_size(input_size), embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv_head(self.blocks(self.stem(x))))


def build_mobilefacenet(spec: MobileFaceNetSpec, embedding_size: int, input_size: int,
                        width_mult: float = 1.0) -> MobileFaceNet:
    """`width_mult` scales every channel count (rounded to a multiple of 8), e.g. 0.5 for fast CPU runs."""
    return MobileFaceNet(spec.scaled(width_mult), embedding_size, input_size)

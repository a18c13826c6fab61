"""IResNet: the "improved residual" networks ArcFace trains (Deng et al. 2019; Duta et al. 2020).

Pre-activation-like blocks BN-Conv3×3-BN-PReLU-Conv3×3(stride)-BN with the stride in the second
conv, a stride-1 stem (faces are small), and the "E" output: BN2d -> Dropout -> flatten -> FC ->
BN1d, which keeps spatial layout in the embedding instead of pooling it away.

Module names match insightface's arcface_torch iresnet (conv1, bn1, prelu, layer1..4, bn2,
dropout, fc, features), so its released state_dicts load with `load_state_dict`.
"""
from __future__ import annotations

from types import MappingProxyType

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from marginface.models.complexity import final_map_size, round_channels
from marginface.models.layers import PReLU  # nn.PReLU with a fast CPU backward
from marginface.models.mobilefacenet import SqueezeExcite

IRESNET_LAYERS = MappingProxyType({
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
})
STAGE_WIDTHS = (64, 128, 256, 512)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)


class IBasicBlock(nn.Module):
    """With ``squeeze_excite`` the residual branch is gated by SE (reduction 16) before the sum:
    the "IR-SE" block of the SE-ResNet-IR networks (face.evoLVe, Face_Pytorch)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, squeeze_excite: bool = False) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.prelu = PReLU(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels, stride)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.se = SqueezeExcite(out_channels, reduction=16) if squeeze_excite else nn.Identity()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return self.se(y) + identity


class IResNet(nn.Module):
    def __init__(self, layers: tuple[int, ...], embedding_size: int, input_size: int,
                 widths: tuple[int, ...] = STAGE_WIDTHS, dropout: float = 0.0,
                 gradient_checkpointing: bool = False, squeeze_excite: bool = False) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.input_size = input_size
        # Recomputes each stage in backward instead of storing its activations: ~stage-count
        # times less activation memory for ~30% more compute. BN running statistics are then
        # updated twice per step (forward and recompute); the gradients are unchanged.
        self.gradient_checkpointing = gradient_checkpointing
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.prelu = PReLU(widths[0])
        channels = widths[0]
        stages = []
        for num_blocks, width in zip(layers, widths):
            blocks = [IBasicBlock(channels, width, stride=2, squeeze_excite=squeeze_excite)]
            blocks += [IBasicBlock(width, width, stride=1, squeeze_excite=squeeze_excite) for _ in range(num_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * final_map_size(input_size) ** 2, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = checkpoint(stage, x, use_reentrant=False) if use_checkpoint else stage(x)
        x = self.dropout(self.bn2(x))
        return self.features(self.fc(torch.flatten(x, 1)))


def _init_weights(model: IResNet) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
    # As in the reference, the embedding BN's scale stays at 1 and only its shift is learnt:
    # the embedding scale is set by the batch statistics, not by a learnt per-dimension gain.
    nn.init.ones_(model.features.weight)
    model.features.weight.requires_grad_(False)


def build_iresnet(depth: int, embedding_size: int, input_size: int, dropout: float = 0.0,
                  gradient_checkpointing: bool = False, width_mult: float = 1.0,
                  squeeze_excite: bool = False) -> IResNet:
    """`width_mult` scales the stage widths 64/128/256/512 (rounded to multiples of 8);
    `squeeze_excite` makes it the SE-IResNet ("SEResNet-IR") variant."""
    widths = tuple(round_channels(w, width_mult) for w in STAGE_WIDTHS)
    return IResNet(IRESNET_LAYERS[depth], embedding_size, input_size, widths, dropout, gradient_checkpointing,
                   squeeze_excite)

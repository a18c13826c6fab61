"""ResNet-50 (He et al. 2016, torchvision's v1.5: stride in the 3×3 conv) adapted to face crops.

Face adaptation: the 7×7 stride-2 stem conv is kept (so ImageNet weights load unchanged) but the
max-pool after it is dropped, making the total stride 16 instead of 32: a 112 crop ends in a 7×7
map, as for the other backbones, instead of 4×4 (3.5 rounded up). The cost is about that of
ImageNet ResNet-50 at 224 (~4.1 GMACs). The classifier `fc` is replaced by the embedding head
BN2d -> Dropout -> flatten -> Linear -> BN1d; note that on a 2048×7×7 map its Linear alone holds
2048·49·D weights (51M at D=512).

Parameter names follow torchvision (conv1, bn1, layerX.Y.convK/bnK, layerX.0.downsample.0/1), so
`pretrained=` loads a torchvision-format ResNet-50 state_dict from a local file.

`ResNet50GAP` (``resnet50_gap``) is the other common recipe (FaceID-style): torchvision's trunk
unchanged (max-pool kept, total stride 32), global average pooling, then one Linear 2048 -> D
named ``embedding`` (torchvision's ``fc`` slot with D outputs). Its size does not depend on the
input: 23.5M trunk + 2048·D + D parameters (24.56M at D=512), about 1.0 GMACs at 112 and 4.1 at 224.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from marginface.errors import UserError
from marginface.io.trust import read_weights
from marginface.models.complexity import final_map_size

RESNET50_LAYERS = (3, 4, 6, 3)
EXPANSION = 4


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, planes: int, stride: int) -> None:
        super().__init__()
        out_channels = planes * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


class EmbeddingHead(nn.Module):
    """BN2d -> Dropout -> flatten -> Linear -> BN1d (scale frozen at 1, as in IResNet)."""

    def __init__(self, channels: int, map_size: int, embedding_size: int, dropout: float) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * map_size * map_size, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)
        self.features.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(torch.flatten(self.dropout(self.bn(x)), 1)))


class ResNet50(nn.Module):
    HEAD_PREFIX = "head."  # the tensors that are not torchvision's trunk

    def __init__(self, embedding_size: int, input_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        channels = self._build_trunk(embedding_size, input_size)
        self.head = EmbeddingHead(channels, final_map_size(input_size), embedding_size, dropout)
        self._init_convs()

    def _build_trunk(self, embedding_size: int, input_size: int) -> int:
        """Stem and the four stages in torchvision's names; returns the output channels (2048)."""
        self.embedding_size = embedding_size
        self.input_size = input_size
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        channels = 64
        stages = []
        for index, (num_blocks, planes) in enumerate(zip(RESNET50_LAYERS, (64, 128, 256, 512))):
            stride = 1 if index == 0 else 2
            blocks = [Bottleneck(channels, planes, stride)]
            channels = planes * EXPANSION
            blocks += [Bottleneck(channels, planes, 1) for _ in range(num_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        return channels

    def _init_convs(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(x)


class ResNet50GAP(ResNet50):
    """torchvision's ResNet-50 (max-pool kept) -> global average pool -> Dropout -> Linear 2048 -> D."""

    HEAD_PREFIX = "embedding."

    def __init__(self, embedding_size: int, input_size: int, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)
        channels = self._build_trunk(embedding_size, input_size)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.dropout = nn.Dropout(dropout)
        self.embedding = nn.Linear(channels, embedding_size)
        self._init_convs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.embedding(self.dropout(torch.flatten(x.mean(dim=(2, 3)), 1)))


def load_torchvision_weights(model: ResNet50, path: str | os.PathLike) -> None:
    """Copy a torchvision ResNet-50 state_dict's trunk into `model`; its `fc.*` is ignored.

    Every trunk tensor must be present with the right shape (`num_batches_tracked` may be missing:
    files saved before PyTorch 0.4.1 lack it), otherwise UserError says what did not fit.
    """
    path = Path(path)
    state = read_weights(path, "torchvision ResNet-50 state_dict", "the state_dict torchvision's resnet50 saves")
    if not isinstance(state, dict):
        raise UserError(f"pretrained weights {path}: expected a state_dict (name -> tensor), got {type(state).__name__}")
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise UserError(f"pretrained weights {path}: expected a state_dict (name -> tensor), but "
                        f"{not_tensors[0]!r} holds a {type(state[not_tensors[0]]).__name__}")
    state = {key.removeprefix("module."): value for key, value in state.items()}  # DataParallel saves

    trunk = {key: value for key, value in model.state_dict().items() if not key.startswith(model.HEAD_PREFIX)}
    required = [key for key in trunk if not key.endswith("num_batches_tracked")]
    missing = [key for key in required if key not in state]
    unexpected = [key for key in state if key not in trunk and not key.startswith("fc.")]
    wrong_shape = [f"{key} {tuple(state[key].shape)} vs {tuple(trunk[key].shape)}"
                   for key in trunk if key in state and state[key].shape != trunk[key].shape]
    if missing or unexpected or wrong_shape:
        matched = sum(1 for key in required if key in state and state[key].shape == trunk[key].shape)
        problems = [f"{label} ({len(items)}): {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
                    for label, items in (("missing", missing), ("unexpected", unexpected),
                                         ("wrong shape file vs model", wrong_shape)) if items]
        name = "resnet50_gap" if isinstance(model, ResNet50GAP) else "resnet50"
        raise UserError(f"pretrained weights {path} do not fit {name}: {matched} of {len(required)} trunk "
                        f"tensors match; " + "; ".join(problems))
    model.load_state_dict({key: value for key, value in state.items() if key in trunk}, strict=False)


def build_resnet50(embedding_size: int, input_size: int, dropout: float = 0.0,
                   pretrained: str | os.PathLike | None = None) -> ResNet50:
    """`pretrained`: local torchvision-format ResNet-50 state_dict (.pth); nothing is downloaded."""
    model = ResNet50(embedding_size, input_size, dropout)
    if pretrained is not None:
        load_torchvision_weights(model, pretrained)
    return model


def build_resnet50_gap(embedding_size: int, input_size: int, dropout: float = 0.0,
                       pretrained: str | os.PathLike | None = None) -> ResNet50GAP:
    """`ResNet50GAP`; ``pretrained``: a local torchvision ResNet-50 state_dict (its ``fc`` is ignored)."""
    model = ResNet50GAP(embedding_size, input_size, dropout)
    if pretrained is not None:
        load_torchvision_weights(model, pretrained)
    return model

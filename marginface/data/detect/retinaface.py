"""RetinaFace with a MobileNet-0.25 body (Deng et al., 2020): single-shot boxes + 5 landmarks.

Module names follow the biubug6/Pytorch_Retinaface checkpoint ``mobilenet0.25_Final.pth`` so its
state_dict loads with ``strict=True``. That model takes BGR pixels minus the Caffe means
(104, 117, 123), unscaled, and predicts offsets from fixed anchors at strides 8, 16 and 32.
"""
from __future__ import annotations

from itertools import product
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from marginface.data.detect.faces import Face, faces_in_image, nms
from marginface.data.detect.weights import find_retinaface_weights
from marginface.errors import UserError

BGR_MEAN = (104.0, 117.0, 123.0)
STEPS = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCE = (0.1, 0.2)


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, leaky: float | None = 0.1) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if leaky is not None:
        layers.append(nn.LeakyReLU(leaky, inplace=True))
    return nn.Sequential(*layers)


def _conv_dw(cin: int, cout: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 + pointwise 1x1, each with BN and LeakyReLU (indices 0-5 as in the checkpoint)."""
    return nn.Sequential(*_conv_bn(cin, cin, 3, stride, groups=cin), *_conv_bn(cin, cout, 1))


class MobileNetV1Body(nn.Module):
    """MobileNet-V1 at width 0.25, cut into the three stages whose outputs feed the FPN."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            _conv_bn(3, 8, 3, 2), _conv_dw(8, 16, 1), _conv_dw(16, 32, 2),
            _conv_dw(32, 32, 1), _conv_dw(32, 64, 2), _conv_dw(64, 64, 1),
        )
        self.stage2 = nn.Sequential(_conv_dw(64, 128, 2), *[_conv_dw(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(_conv_dw(128, 256, 2), _conv_dw(256, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        return [c3, c4, self.stage3(c4)]


class FPN(nn.Module):
    def __init__(self, channels: tuple[int, int, int] = (64, 128, 256), out: int = 64) -> None:
        super().__init__()
        self.output1 = _conv_bn(channels[0], out, 1)
        self.output2 = _conv_bn(channels[1], out, 1)
        self.output3 = _conv_bn(channels[2], out, 1)
        self.merge1 = _conv_bn(out, out)
        self.merge2 = _conv_bn(out, out)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        p3, p4, p5 = self.output1(features[0]), self.output2(features[1]), self.output3(features[2])
        p4 = self.merge2(p4 + F.interpolate(p5, size=p4.shape[2:], mode="nearest"))
        p3 = self.merge1(p3 + F.interpolate(p4, size=p3.shape[2:], mode="nearest"))
        return [p3, p4, p5]


class SSH(nn.Module):
    """Context module: 3x3, "5x5" (two 3x3) and "7x7" (three 3x3) branches, concatenated."""

    def __init__(self, cin: int = 64, out: int = 64) -> None:
        super().__init__()
        self.conv3X3 = _conv_bn(cin, out // 2, leaky=None)
        self.conv5X5_1 = _conv_bn(cin, out // 4)
        self.conv5X5_2 = _conv_bn(out // 4, out // 4, leaky=None)
        self.conv7X7_2 = _conv_bn(out // 4, out // 4)
        self.conv7x7_3 = _conv_bn(out // 4, out // 4, leaky=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5 = self.conv5X5_1(x)
        branch7 = self.conv7x7_3(self.conv7X7_2(branch5))
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(branch5), branch7], dim=1))


class _Head(nn.Module):
    def __init__(self, values_per_anchor: int, anchors: int = 2, cin: int = 64) -> None:
        super().__init__()
        self.values = values_per_anchor
        self.conv1x1 = nn.Conv2d(cin, anchors * values_per_anchor, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.values)


class RetinaFaceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = MobileNetV1Body()
        self.fpn = FPN()
        self.ssh1, self.ssh2, self.ssh3 = SSH(), SSH(), SSH()
        self.ClassHead = nn.ModuleList(_Head(2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(10) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p3, p4, p5 = self.fpn(self.body(x))
        features = [self.ssh1(p3), self.ssh2(p4), self.ssh3(p5)]
        scores = torch.cat([h(f) for h, f in zip(self.ClassHead, features)], dim=1).softmax(-1)[..., 1]
        boxes = torch.cat([h(f) for h, f in zip(self.BboxHead, features)], dim=1)
        landmarks = torch.cat([h(f) for h, f in zip(self.LandmarkHead, features)], dim=1)
        return scores, boxes, landmarks


def anchors(height: int, width: int) -> np.ndarray:
    """``A×4`` anchors (centre x, centre y, w, h) in pixels, in the order the heads emit them."""
    rows = []
    for step, sizes in zip(STEPS, ANCHOR_SIZES):
        fh, fw = -(-height // step), -(-width // step)
        for i, j in product(range(fh), range(fw)):
            for size in sizes:
                rows.append(((j + 0.5) * step, (i + 0.5) * step, size, size))
    return np.asarray(rows, dtype=np.float32)


class RetinaFaceDetector:
    """``detect(rgb_image) -> list[Face]`` (largest first), same contract as ``MTCNNDetector``.

    ``max_side`` shrinks large photos before detection (faces under ~16 px at that scale are
    missed; None keeps full resolution).
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str | torch.device = "cpu",
        threshold: float = 0.8,
        nms_threshold: float = 0.4,
        max_side: int | None = 1600,
    ):
        path = find_retinaface_weights(weights)
        self.device = torch.device(device)
        self.threshold, self.nms_threshold, self.max_side = float(threshold), float(nms_threshold), max_side
        self.net = RetinaFaceNet()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
            self.net.load_state_dict(state, strict=True)
        except Exception as e:  # torch.load raises many types for a file that is not this state_dict
            raise UserError(f"{path}: not valid RetinaFace-MobileNet0.25 weights ({str(e).splitlines()[0]})") from None
        self.net.to(self.device).eval()
        self._anchor_cache: dict[tuple[int, int], np.ndarray] = {}

    @torch.inference_mode()
    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        import cv2

        image = np.asarray(image_rgb)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UserError(f"detect: expected an RGB uint8 H×W×3 image, got {image.shape} {image.dtype}")
        h, w = image.shape[:2]
        scale = min(1.0, self.max_side / max(h, w)) if self.max_side else 1.0
        small = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA) if scale < 1 else image
        sh, sw = small.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(small[..., ::-1])).to(self.device).float()
        x = (x - torch.tensor(BGR_MEAN, device=self.device)).permute(2, 0, 1)[None]
        scores, deltas, points = (t[0].cpu().numpy() for t in self.net(x))
        if (sh, sw) not in self._anchor_cache:
            self._anchor_cache = {(sh, sw): anchors(sh, sw)}  # photos in a folder often share a size
        prior = self._anchor_cache[(sh, sw)]
        keep = scores >= self.threshold
        scores, deltas, points, prior = scores[keep], deltas[keep], points[keep], prior[keep]
        centre = prior[:, :2] + deltas[:, :2] * VARIANCE[0] * prior[:, 2:]
        size = prior[:, 2:] * np.exp(deltas[:, 2:] * VARIANCE[1])
        boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1) / scale
        landmarks = (prior[:, None, :2] + points.reshape(-1, 5, 2) * VARIANCE[0] * prior[:, None, 2:]) / scale
        return faces_in_image(boxes, scores, landmarks, nms(boxes, scores, self.nms_threshold), w, h)

"""MTCNN (Zhang et al., 2016): a P-Net / R-Net / O-Net cascade giving face boxes and 5 landmarks.

The modules are named so that the facenet-pytorch 2.6.0 state_dicts load with ``strict=True``.
Those weights descend from the original Caffe models, which were trained on transposed images;
the converted conv kernels already account for that, and the fully connected layers expect their
input flattened in (width, height, channel) order, hence the ``permute(0, 3, 2, 1)`` below.
Inputs are RGB normalised as ``(x - 127.5) / 128``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import nn

from marginface.data.detect.faces import Face, faces_in_image, nms
from marginface.data.detect.weights import find_mtcnn_weights
from marginface.errors import UserError


class PNet(nn.Module):
    """Fully convolutional proposal net: 12x12 windows at stride 2 -> face prob + box offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return torch.softmax(self.conv4_1(x), dim=1)[:, 1], self.conv4_2(x)


class RNet(nn.Module):
    """Refinement net on 24x24 crops -> face prob + box offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).flatten(1)))
        return torch.softmax(self.dense5_1(x), dim=1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    """Output net on 48x48 crops -> face prob + box offsets + 5 landmarks (xs then ys, box-relative)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).flatten(1)))
        return torch.softmax(self.dense6_1(x), dim=1)[:, 1], self.dense6_2(x), self.dense6_3(x)


def _regress(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Shift each edge by its offset times the box width/height."""
    size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, axis=1)
    return boxes + offsets * size


def _square(boxes: np.ndarray) -> np.ndarray:
    """Grow each box to a square around its centre (the nets were trained on square crops)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])[:, None]
    return np.concatenate([centre - side / 2, centre + side / 2], axis=1)


def _crops(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """``size``x``size`` crops of integer-rounded boxes, zero-padded where they leave the image."""
    h, w = image.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), dtype=np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(np.round(boxes).astype(np.int64)):
        bw, bh = max(int(x2 - x1), 1), max(int(y2 - y1), 1)
        patch = np.zeros((bh, bw, 3), dtype=np.uint8)
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
        if sx2 > sx1 and sy2 > sy1:
            patch[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = image[sy1:sy2, sx1:sx2]
        interp = cv2.INTER_AREA if bw > size else cv2.INTER_LINEAR
        out[k] = cv2.resize(patch, (size, size), interpolation=interp)
    return out


class MTCNNDetector:
    """``detect(rgb_image) -> list[Face]``, largest face first.

    ``thresholds`` are the face-probability cut-offs of P-Net, R-Net and O-Net; ``min_face_size``
    (pixels) sets the largest pyramid scale. Weights: ``weights_dir``, else
    ``$MARGINFACE_DETECTOR_DIR``, else ``~/.cache/marginface/mtcnn`` (``marginface data get-detector``).
    """

    PYRAMID_FACTOR = 0.709  # each pyramid level has half the area of the previous one
    BATCH = 512

    def __init__(
        self,
        weights_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        min_face_size: int = 20,
        thresholds: Sequence[float] = (0.6, 0.7, 0.7),
    ):
        if len(thresholds) != 3:
            raise UserError(f"MTCNN thresholds: expected 3 values (P-Net, R-Net, O-Net), got {list(thresholds)}")
        if min_face_size < 12:
            raise UserError(f"MTCNN min_face_size must be >= 12 pixels, got {min_face_size}")
        folder = find_mtcnn_weights(weights_dir)
        self.device = torch.device(device)
        self.min_face_size = int(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        for name, net in (("pnet", self.pnet), ("rnet", self.rnet), ("onet", self.onet)):
            path = folder / f"{name}.pt"
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                net.load_state_dict(state, strict=True)
            except Exception as e:  # torch.load raises many types for a file that is not a state_dict
                raise UserError(f"{path}: not valid MTCNN {name} weights ({str(e).splitlines()[0]})") from None
            net.to(self.device).eval()

    def _tensor(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        return (x.permute(0, 3, 1, 2).float() - 127.5) * 0.0078125

    def _scales(self, height: int, width: int) -> list[float]:
        scale = 12.0 / self.min_face_size
        side = min(height, width) * scale
        scales = []
        while side >= 12:
            scales.append(scale)
            scale *= self.PYRAMID_FACTOR
            side *= self.PYRAMID_FACTOR
        return scales

    def _stage1(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        found = []
        for scale in self._scales(h, w):
            sw, sh = int(np.ceil(w * scale)), int(np.ceil(h * scale))
            resized = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
            prob, offsets = self.pnet(self._tensor(resized[None]))
            prob, offsets = prob[0].cpu().numpy(), offsets[0].cpu().numpy()
            ys, xs = np.nonzero(prob >= self.thresholds[0])
            if ys.size == 0:
                continue
            # each output cell sees a 12x12 window at stride 2 of the scaled image
            cells = np.stack([xs, ys], axis=1).astype(np.float64) * 2
            boxes = np.concatenate([cells / scale, (cells + 12) / scale], axis=1)
            rows = np.concatenate([boxes, prob[ys, xs][:, None], offsets[:, ys, xs].T], axis=1)
            found.append(rows[nms(rows[:, :4], rows[:, 4], 0.5)])
        if not found:
            return np.zeros((0, 5))
        rows = np.concatenate(found)
        rows = rows[nms(rows[:, :4], rows[:, 4], 0.7)]
        return np.concatenate([_square(_regress(rows[:, :4], rows[:, 5:9])), rows[:, 4:5]], axis=1)

    def _run(self, net: nn.Module, crops: np.ndarray) -> list[np.ndarray]:
        outputs: list[list[np.ndarray]] = []
        for lo in range(0, len(crops), self.BATCH):
            outputs.append([o.cpu().numpy() for o in net(self._tensor(crops[lo : lo + self.BATCH]))])
        return [np.concatenate(parts) for parts in zip(*outputs)]

    @torch.inference_mode()
    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        image = np.asarray(image_rgb)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UserError(f"detect: expected an RGB uint8 H×W×3 image, got {image.shape} {image.dtype}")
        h, w = image.shape[:2]
        boxes = self._stage1(image)
        if len(boxes):
            prob, offsets = self._run(self.rnet, _crops(image, boxes[:, :4], 24))
            keep = prob >= self.thresholds[1]
            boxes, offsets = np.concatenate([boxes[keep, :4], prob[keep, None]], axis=1), offsets[keep]
            keep = nms(boxes[:, :4], boxes[:, 4], 0.7)
            boxes = np.concatenate([_square(_regress(boxes[keep, :4], offsets[keep])), boxes[keep, 4:5]], axis=1)
        if not len(boxes):
            return []
        prob, offsets, points = self._run(self.onet, _crops(image, boxes[:, :4], 48))
        keep = prob >= self.thresholds[2]
        boxes, offsets, points, prob = boxes[keep, :4], offsets[keep], points[keep], prob[keep]
        size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)
        landmarks = boxes[:, None, :2] + np.stack([points[:, :5], points[:, 5:]], axis=2) * size[:, None, :]
        boxes = _regress(boxes, offsets)
        keep = nms(boxes, prob, 0.7, mode="min")
        return faces_in_image(boxes, prob, landmarks, keep, w, h)

"""A segmentation example that ships with prunetune: squares and discs on noise, their masks, and a small
encoder-decoder that returns {"out": logits, "aux": logits} as torchvision's segmenters do.

`PYTHONPATH=. prunetune run examples/segmentation.yaml` (from the repository root) uses `data` and `segmenter`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from prunetune.workers.tasks import IGNORE_INDEX


def shapes(n: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` noisy RGB images [n, 3, size, size] with a square (class 1) and a disc (class 2) each, and their masks
    [n, size, size] (0: background; the one-pixel border IGNORE_INDEX, counted nowhere)."""
    g = torch.Generator().manual_seed(seed)
    images = 0.3 * torch.randn(n, 3, size, size, generator=g)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    rows, cols = torch.arange(size).view(-1, 1), torch.arange(size).view(1, -1)
    for i in range(n):
        side = int(torch.randint(3, size // 2, (), generator=g))
        radius = int(torch.randint(2, size // 4, (), generator=g))
        top, left = torch.randint(0, size - side, (2,), generator=g).tolist()
        cy, cx = torch.randint(radius, size - radius, (2,), generator=g).tolist()
        masks[i, top:top + side, left:left + side] = 1
        masks[i][(rows - cy) ** 2 + (cols - cx) ** 2 <= radius ** 2] = 2
        colour = torch.rand(2, 3, generator=g)
        for cls in (1, 2):
            images[i] += (masks[i] == cls) * colour[cls - 1].view(3, 1, 1)
    masks[:, 0, :] = masks[:, -1, :] = masks[:, :, 0] = masks[:, :, -1] = IGNORE_INDEX
    return images, masks


def data(train_size: int = 512, test_size: int = 128, size: int = 16) -> tuple:
    """The data factory: (train, test, classes) of (image, mask) pairs."""
    x, y = shapes(train_size + test_size, size)
    return TensorDataset(x[:train_size], y[:train_size]), TensorDataset(x[train_size:], y[train_size:]), 3


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Segmenter(nn.Module):
    """Encoder (full and half resolution), a decoder with a skip connection, a 1x1 head and an aux head."""

    def __init__(self, num_classes: int = 3, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.stem, self.down = _block(in_channels, width), _block(width, 2 * width, 2)
        self.middle, self.up = _block(2 * width, 2 * width), _block(3 * width, width)
        self.head, self.aux = nn.Conv2d(width, num_classes, 1), nn.Conv2d(2 * width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> dict:
        skip = self.stem(x)
        low = self.middle(self.down(skip))
        up = F.interpolate(low, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        aux = F.interpolate(self.aux(low), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"out": self.head(self.up(torch.cat([up, skip], 1))), "aux": aux}


def segmenter(num_classes: int = 3, in_channels: int = 3, width: int = 16) -> Segmenter:
    """The model factory."""
    return Segmenter(num_classes, in_channels, width)

"""A detection example for a user task (`model.task: examples.detection:task`): a tiny one-stage detector with a
per-cell head (objectness, box, class logits on a 4x4 grid), data of squares with box lists of any length, its loss,
and mAP@0.5 from statistics that sum exactly over batches.

mAP@0.5 as VOC and COCO compute it, with prunetune's summable statistics (`prunetune.workers.detection`: scores
binned, counts that sum exactly over held-out batches): every cell is a detection (its box, the argmax class, score
sigmoid(objectness) x that class's probability).

`PYTHONPATH=. prunetune run examples/detection.yaml` (from the repository root) uses `data`, `detector` and `task`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from prunetune.workers.detection import map_statistics, mean_average_precision
from prunetune.workers.tasks import Task, first_output

SIZE, GRID, CLASSES = 16, 4, 2  # image side, cells per side, object classes
CELL = SIZE // GRID


class Squares(Dataset):
    """Images [3, size, size] with 1 to 3 squares each (sides in [size 3/16, size 7/16)) and their boxes [k, 5]
    (class, x0, y0, x1, y1 in pixels)."""

    def __init__(self, n: int, seed: int, size: int = SIZE):
        g = torch.Generator().manual_seed(seed)
        self.images, self.boxes = 0.2 * torch.randn(n, 3, size, size, generator=g), []
        for i in range(n):
            found = []
            for _ in range(int(torch.randint(1, 4, (), generator=g))):
                side = int(torch.randint(3 * size // SIZE, 7 * size // SIZE, (), generator=g))
                x0, y0 = torch.randint(0, size - side + 1, (2,), generator=g).tolist()
                cls = int(torch.randint(0, CLASSES, (), generator=g))
                self.images[i, cls, y0:y0 + side, x0:x0 + side] += 1.0
                found.append([cls, x0, y0, x0 + side, y0 + side])
            self.boxes.append(torch.tensor(found, dtype=torch.float32))

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, i: int):
        return self.images[i], self.boxes[i]


def data(train_size: int = 160, test_size: int = 32) -> tuple:
    """The data factory: (train, test, classes)."""
    return Squares(train_size, 0), Squares(test_size, 1), CLASSES


class Detector(nn.Module):
    """Two stride-2 blocks to the 4x4 grid, one more block, and the head: 5 + CLASSES channels per cell."""

    def __init__(self, num_classes: int = CLASSES, in_channels: int = 3, width: int = 8):
        super().__init__()
        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.body = nn.Sequential(block(in_channels, width, 2), block(width, 2 * width, 2),
                                  block(2 * width, 2 * width, 1))
        self.head = nn.Conv2d(2 * width, 5 + num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def detector(num_classes: int = CLASSES, in_channels: int = 3) -> Detector:
    """The model factory."""
    return Detector(num_classes, in_channels)


def _dense(boxes: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per cell: objectness [N, G, G], box (x0, y0, x1, y1 / SIZE) [N, 4, G, G] and class [N, G, G] of the box
    whose centre lies in it."""
    n = len(boxes)
    objectness, box, cls = torch.zeros(n, GRID, GRID), torch.zeros(n, 4, GRID, GRID), torch.zeros(n, GRID, GRID)
    for i, b in enumerate(boxes):
        for c, x0, y0, x1, y1 in b.tolist():
            row, col = int((y0 + y1) / 2) // CELL, int((x0 + x1) / 2) // CELL
            objectness[i, row, col], cls[i, row, col] = 1, c
            box[i, :, row, col] = torch.tensor([x0, y0, x1, y1]) / SIZE
    return objectness.to(device), box.to(device), cls.long().to(device)


def loss(prediction: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    """Objectness BCE over every cell, plus box L1 and class cross-entropy where there is an object."""
    objectness, box, cls = _dense(boxes, prediction.device)
    positive = objectness > 0
    total = F.binary_cross_entropy_with_logits(prediction[:, 0], objectness)
    if positive.any():
        total = total + F.l1_loss(prediction[:, 1:5].permute(0, 2, 3, 1)[positive], box.permute(0, 2, 3, 1)[positive])
        total = total + F.cross_entropy(prediction[:, 5:].permute(0, 2, 3, 1)[positive], cls[positive])
    return total


def detections(prediction: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per image, every cell's detection: boxes [G*G, 4] (x0, y0, x1, y1 in pixels), scores [G*G] (sigmoid of the
    objectness x the probability of the argmax class) and classes [G*G]."""
    prediction = prediction.detach().float().cpu()
    boxes = prediction[:, 1:5].flatten(2).transpose(1, 2) * SIZE
    probability, classes = prediction[:, 5:].softmax(1).flatten(2).max(1)
    scores = torch.sigmoid(prediction[:, 0]).flatten(1) * probability
    return list(zip(boxes, scores, classes))


def statistics(prediction: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    """[loss * images, images, map_statistics of the detector's detections...]."""
    n = len(boxes)
    head = torch.tensor([float(loss(prediction, boxes)) * n, n], dtype=torch.float64)
    return torch.cat([head, map_statistics(detections(prediction), [b.cpu() for b in boxes], CLASSES)])


def score(s: torch.Tensor) -> dict:
    """mAP@0.5 and the mean loss of summed statistics."""
    return {"map50": mean_average_precision(s[2:], CLASSES), "loss": float(s[0] / s[1])}


def task() -> Task:
    """The task: the detector's single output, its loss and mAP@0.5; no distillation (its channels are not one
    distribution)."""
    return Task("detection", ("map50", "loss"), first_output, loss, statistics, score, distill=False)

"""A user's detection task for the tests (`model.task: tests.detection:task`): a tiny one-stage detector with a
per-cell head (objectness, box, class logits on a 4x4 grid), data of squares with box lists of any length, its
loss, and a simple metric: F1 of boxes matched at IoU >= 0.5 with the right class."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from prunetune.workers.tasks import Task, first_output

SIZE, GRID, CLASSES = 16, 4, 2  # image side, cells per side, object classes
CELL = SIZE // GRID


class Squares(Dataset):
    """Images [3, SIZE, SIZE] with 1 to 3 squares each and their boxes [k, 5] (class, x0, y0, x1, y1 in pixels)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.images, self.boxes = 0.2 * torch.randn(n, 3, SIZE, SIZE, generator=g), []
        for i in range(n):
            found = []
            for _ in range(int(torch.randint(1, 4, (), generator=g))):
                side = int(torch.randint(3, 7, (), generator=g))
                x0, y0 = torch.randint(0, SIZE - side + 1, (2,), generator=g).tolist()
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


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box in a [n, 4] with every box in b [m, 4]."""
    low, high = torch.maximum(a[:, None, :2], b[None, :, :2]), torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (high - low).clamp_min(0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp_min(0).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter).clamp_min(1e-9)


def statistics(prediction: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    """[loss * images, images, true positives, false positives, false negatives]: a predicted box (a cell of
    positive objectness) is a true positive if it overlaps an unmatched box of its class at IoU >= 0.5."""
    tp = fp = fn = 0
    for p, truth in zip(prediction, boxes):
        cells = p[0] > 0
        found = p[1:5].permute(1, 2, 0)[cells] * SIZE
        classes = p[5:].permute(1, 2, 0)[cells].argmax(-1)
        unmatched = torch.ones(len(truth), dtype=torch.bool)
        for box, c in zip(found, classes.tolist()):
            iou = _iou(box[None], truth[:, 1:].to(box))[0].cpu()
            iou[~unmatched | (truth[:, 0] != c)] = 0
            if len(iou) and iou.max() >= 0.5:
                unmatched[iou.argmax()] = False
                tp += 1
            else:
                fp += 1
        fn += int(unmatched.sum())
    n = len(boxes)
    return torch.tensor([float(loss(prediction, boxes)) * n, n, tp, fp, fn], dtype=torch.float64)


def score(s: torch.Tensor) -> dict:
    """F1, precision, recall and the mean loss of summed statistics."""
    loss_sum, n, tp, fp, fn = s.tolist()
    return {"f1": 2 * tp / max(2 * tp + fp + fn, 1), "precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1),
            "loss": loss_sum / n}


def task() -> Task:
    """The task: the detector's single output, its loss and F1; no distillation (its channels are not one
    distribution)."""
    return Task("detection", ("f1", "precision", "recall", "loss"), first_output, loss, statistics, score,
                distill=False)

"""A detection example for a user task (`model.task: examples.detection:task`): a tiny one-stage detector with a
per-cell head (objectness, box, class logits on a 4x4 grid), data of squares with box lists of any length, its loss,
and mAP@0.5 from statistics that sum exactly over batches.

mAP@0.5 as VOC and COCO compute it, with the detections' scores binned: every cell is a detection (its box, the
argmax class, score sigmoid(objectness) x that class's probability); per image, detections are matched highest
score first, each to the unmatched ground-truth box of its class it overlaps most at IoU >= 0.5 (a true positive),
else a false positive. The statistics hold, per class, the ground-truth count and histograms of true and false
positives over BINS score bins (uniform in the score's logit on [-12, 12]: a detector's scores crowd near 0 and
1, where bins uniform on [0, 1] tie too many): counts, so they sum exactly over held-out batches. The score builds each
class's precision/recall curve from the bins (detections in one bin count as tied), takes its area with all-point
interpolation (the precision envelope, as VOC 2010+) and averages over the classes with ground truth.

`PYTHONPATH=. prunetune run examples/detection.yaml` (from the repository root) uses `data`, `detector` and `task`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from prunetune.workers.tasks import Task, first_output

SIZE, GRID, CLASSES = 16, 4, 2  # image side, cells per side, object classes
BINS, LOGIT, IOU = 1000, 12.0, 0.5  # score bins, uniform in logit(score) on [-LOGIT, LOGIT]; a hit's IoU
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
    """IoU of every box in a [..., n, 4] with every box in b [..., m, 4]: [..., n, m]."""
    a, b = a[..., :, None, :], b[..., None, :, :]
    inter = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp_min(0).prod(-1)
    area = lambda x: (x[..., 2:] - x[..., :2]).clamp_min(0).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp_min(1e-9)


def detections(prediction: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per image, every cell's detection: boxes [G*G, 4] (x0, y0, x1, y1 in pixels), scores [G*G] (sigmoid of the
    objectness x the probability of the argmax class) and classes [G*G]."""
    prediction = prediction.detach().float().cpu()
    boxes = prediction[:, 1:5].flatten(2).transpose(1, 2) * SIZE
    probability, classes = prediction[:, 5:].softmax(1).flatten(2).max(1)
    scores = torch.sigmoid(prediction[:, 0]).flatten(1) * probability
    return list(zip(boxes, scores, classes))


def _padded(rows: list[torch.Tensor], fill: float) -> torch.Tensor:
    """Rows [k_i, ...] stacked into [n, max k_i, ...], padded with `fill`."""
    return torch.nn.utils.rnn.pad_sequence([r.double() for r in rows], batch_first=True, padding_value=fill)


def matched(found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], truths: list[torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hit, score, class) of every detection of every image [n, k] (class -1: padding): per image, highest score
    first, each takes the unmatched box of its class in the image's list [m, 5] (class, x0, y0, x1, y1) that it
    overlaps most, if at IoU >= IOU (a hit)."""
    boxes, scores, labels = (_padded([f[i] for f in found], -1) for i in range(3))
    truth = _padded(truths, -1) if max(len(t) for t in truths) else torch.full((len(truths), 1, 5), -1.0)
    iou = _iou(boxes, truth[..., 1:])
    iou[(labels[:, :, None] != truth[:, None, :, 0]) | (labels[:, :, None] < 0)] = -1  # other class, padding
    iou = iou.numpy()
    hit = np.zeros(scores.shape, dtype=bool)
    for i in np.flatnonzero((iou.max(-1) >= IOU).any(-1)):  # only images where some detection could hit
        taken = np.zeros(iou.shape[2], dtype=bool)
        order = torch.argsort(scores[i], descending=True, stable=True).numpy()
        for d in order[iou[i, order].max(-1) >= IOU]:
            row = np.where(taken, -1, iou[i, d])
            if row.max() >= IOU:
                taken[row.argmax()] = hit[i, d] = True
    return torch.from_numpy(hit), scores, labels.long()


def score_bin(scores: torch.Tensor, bins: int = BINS) -> torch.Tensor:
    """The bin of each score in [0, 1]: `bins` bins uniform in logit(score) on [-LOGIT, LOGIT] (the outer two take
    the scores beyond)."""
    z = torch.logit(scores.double(), eps=1e-12)
    return ((z + LOGIT) * (bins / (2 * LOGIT))).floor().long().clamp(0, bins - 1)


def map_statistics(found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], truths: list[torch.Tensor],
                   classes: int = CLASSES, bins: int = BINS) -> torch.Tensor:
    """[ground-truth boxes per class, true positives per (class, score bin), false positives per (class, score
    bin)] of detections (boxes, scores in [0, 1], classes per image) against box lists [m, 5], float64 counts."""
    hit, scores, labels = matched(found, truths)
    valid = labels >= 0
    cell = (labels * bins + score_bin(scores.clamp(0, 1), bins))[valid]
    gt = torch.bincount(torch.cat([t[:, 0].long() for t in truths]), minlength=classes)[:classes].double()
    histogram = lambda cells: torch.bincount(cells, minlength=classes * bins).double()  # noqa: E731
    return torch.cat([gt, histogram(cell[hit[valid]]), histogram(cell[~hit[valid]])])


def mean_average_precision(s: torch.Tensor, classes: int = CLASSES) -> float:
    """mAP of summed map_statistics: per class with ground truth, the area under its binned precision/recall curve
    (all-point interpolation); the mean over those classes (0 if none has any)."""
    gt, (tp, fp) = s[:classes], s[classes:].reshape(2, classes, -1).flip(-1).cumsum(-1)  # highest bin first
    precision = tp / (tp + fp).clamp_min(1)
    envelope = precision.flip(-1).cummax(-1).values.flip(-1)  # the best precision at this recall or beyond
    recall = tp / gt[:, None].clamp_min(1)
    steps = torch.diff(recall, dim=-1, prepend=torch.zeros(classes, 1, dtype=recall.dtype))
    ap = (steps * envelope).sum(-1)
    return float(ap[gt > 0].mean()) if (gt > 0).any() else 0.0


def statistics(prediction: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    """[loss * images, images, map_statistics of the detector's detections...]."""
    n = len(boxes)
    head = torch.tensor([float(loss(prediction, boxes)) * n, n], dtype=torch.float64)
    return torch.cat([head, map_statistics(detections(prediction), [b.cpu() for b in boxes])])


def score(s: torch.Tensor) -> dict:
    """mAP@0.5 and the mean loss of summed statistics."""
    return {"map50": mean_average_precision(s[2:]), "loss": float(s[0] / s[1])}


def task() -> Task:
    """The task: the detector's single output, its loss and mAP@0.5; no distillation (its channels are not one
    distribution)."""
    return Task("detection", ("map50", "loss"), first_output, loss, statistics, score, distill=False)

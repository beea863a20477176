"""Detection metrics from statistics that sum exactly over batches: mAP at one IoU threshold (VOC's 0.5) or averaged
over several (COCO's 0.5:0.95), and a greedy per-class NMS (torchvision's, which does the same, does not import
beside the CPU torch this project is built with).

mAP as VOC and COCO compute it, with the detections' scores binned: per image and IoU threshold, detections are
matched highest score first, each to the unmatched ground-truth box of its class it overlaps most at IoU >= the
threshold (a true positive), else a false positive. The statistics hold, per class, the ground-truth count and
histograms of the detections and of the true positives at each threshold over BINS score bins (uniform in the
score's logit on [-12, 12]: a detector's scores crowd near 0 and 1, where bins uniform on [0, 1] tie too many):
counts, so they sum exactly over held-out batches. The score builds each class's precision/recall curve from the
bins (detections in one bin count as tied), takes its area with all-point interpolation (the precision envelope,
as VOC 2010+) and averages over the classes with ground truth (and over the thresholds).
"""
from __future__ import annotations

import numpy as np
import torch

BINS, LOGIT = 1000, 12.0  # score bins, uniform in logit(score) on [-LOGIT, LOGIT]
IOU = 0.5  # VOC's threshold of a hit (mAP@0.5)
COCO_IOUS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # mAP@0.5:0.95

Detections = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # one image's boxes [k, 4] (x0 y0 x1 y1), scores, classes


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box in a [..., n, 4] with every box in b [..., m, 4] (x0, y0, x1, y1): [..., n, m]."""
    a, b = a[..., :, None, :], b[..., None, :, :]
    inter = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp_min(0).prod(-1)
    area = lambda x: (x[..., 2:] - x[..., :2]).clamp_min(0).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp_min(1e-9)


def _padded(rows: list[torch.Tensor], fill: float) -> torch.Tensor:
    """Rows [k_i, ...] stacked into [n, max k_i, ...], padded with `fill`."""
    return torch.nn.utils.rnn.pad_sequence([r.double() for r in rows], batch_first=True, padding_value=fill)


def matched(found: list[Detections], truths: list[torch.Tensor], ious: tuple[float, ...] = (IOU,)
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hit [thresholds, n, k], score [n, k], class [n, k]) of every detection of every image (class -1: padding):
    per image and threshold, highest score first, each takes the unmatched box of its class in the image's list
    [m, 5] (class, x0, y0, x1, y1) that it overlaps most, if at IoU >= the threshold (a hit)."""
    boxes, scores, labels = (_padded([f[i] for f in found], -1) for i in range(3))
    truth = _padded(truths, -1) if max(len(t) for t in truths) else torch.full((len(truths), 1, 5), -1.0)
    overlap = box_iou(boxes, truth[..., 1:])
    overlap[(labels[:, :, None] != truth[:, None, :, 0]) | (labels[:, :, None] < 0)] = -1  # other class, padding
    iou = overlap.numpy()
    hit = np.zeros((len(ious),) + tuple(scores.shape), dtype=bool)
    for t, threshold in enumerate(ious):
        for i in np.flatnonzero((iou.max(-1) >= threshold).any(-1)):  # only images where some detection could hit
            taken = np.zeros(iou.shape[2], dtype=bool)
            order = torch.argsort(scores[i], descending=True, stable=True).numpy()
            for d in order[iou[i, order].max(-1) >= threshold]:
                row = np.where(taken, -1, iou[i, d])
                if row.max() >= threshold:
                    taken[row.argmax()] = hit[t, i, d] = True
    return torch.from_numpy(hit), scores, labels.long()


def score_bin(scores: torch.Tensor, bins: int = BINS) -> torch.Tensor:
    """The bin of each score in [0, 1]: `bins` bins uniform in logit(score) on [-LOGIT, LOGIT] (the outer two take
    the scores beyond)."""
    z = torch.logit(scores.double(), eps=1e-12)
    return ((z + LOGIT) * (bins / (2 * LOGIT))).floor().long().clamp(0, bins - 1)


def map_statistics(found: list[Detections], truths: list[torch.Tensor], classes: int, bins: int = BINS,
                   ious: tuple[float, ...] = (IOU,)) -> torch.Tensor:
    """[ground-truth boxes per class, detections per (class, score bin), true positives per (threshold, class, score
    bin)] of detections (boxes, scores in [0, 1], classes per image) against box lists [m, 5] (class, x0, y0, x1,
    y1), float64 counts."""
    hit, scores, labels = matched(found, truths, ious)
    valid = labels >= 0
    cell = (labels * bins + score_bin(scores.clamp(0, 1), bins))[valid]
    truth_classes = torch.cat([t[:, 0].long() for t in truths]) if truths else torch.zeros(0, dtype=torch.long)
    gt = torch.bincount(truth_classes, minlength=classes)[:classes].double()
    histogram = lambda cells: torch.bincount(cells, minlength=classes * bins).double()  # noqa: E731
    return torch.cat([gt, histogram(cell)] + [histogram(cell[h[valid]]) for h in hit])


def average_precisions(s: torch.Tensor, classes: int, bins: int = BINS) -> tuple[torch.Tensor, torch.Tensor]:
    """AP per (threshold, class) [thresholds, classes] of summed map_statistics (the area under each binned
    precision/recall curve, all-point interpolation), and which classes have ground truth."""
    gt, detected = s[:classes], s[classes:classes * (bins + 1)].reshape(classes, bins)
    tp = s[classes * (bins + 1):].reshape(-1, classes, bins).flip(-1).cumsum(-1)  # highest bin first
    detected = detected.flip(-1).cumsum(-1)
    precision = tp / detected.clamp_min(1)
    envelope = precision.flip(-1).cummax(-1).values.flip(-1)  # the best precision at this recall or beyond
    recall = tp / gt[:, None].clamp_min(1)
    steps = torch.diff(recall, dim=-1, prepend=torch.zeros(recall.shape[:-1] + (1,), dtype=recall.dtype))
    return (steps * envelope).sum(-1), gt > 0


def mean_average_precision(s: torch.Tensor, classes: int, bins: int = BINS) -> float:
    """mAP of summed map_statistics: the AP of every class with ground truth, averaged over those classes and the
    thresholds (0 if no class has any)."""
    ap, present = average_precisions(s, classes, bins)
    return float(ap[:, present].mean()) if present.any() else 0.0


def nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou: float, max_det: int) -> torch.Tensor:
    """Indices of the detections greedy NMS keeps, per class (a box suppresses the lower-scored boxes of its class
    that it overlaps at IoU > `iou`), the `max_det` best, highest score first (torchvision's batched_nms, then a
    cut, as Ultralytics' non_max_suppression does)."""
    kept = []
    for c in classes.unique():
        members = torch.nonzero(classes == c).flatten()
        members = members[torch.argsort(scores[members], descending=True, stable=True)]
        overlap = (box_iou(boxes[members], boxes[members]) > iou).cpu().numpy()
        suppressed = np.zeros(len(members), dtype=bool)
        for i in range(len(members)):
            if not suppressed[i]:
                kept.append(int(members[i]))
                suppressed |= overlap[i]
    kept_ = torch.tensor(kept, dtype=torch.long, device=boxes.device)
    return kept_[torch.argsort(scores[kept_], descending=True, stable=True)[:max_det]]

"""The reference prunetune's binned mAP (workers/detection.py) is checked and timed against: pycocotools' COCOeval
(the COCO evaluation itself; torchmetrics' MeanAveragePrecision wraps it but needs torchvision, which does not
import beside torch 2.13.0+cpu), and random boxes with detections to compare on."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import torch


def coco_map(found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], truths: list[torch.Tensor],
             ious: tuple[float, ...] = (0.5,)) -> float:
    """COCOeval's AP averaged over the IoU thresholds `ious` (0.5: mAP@0.5; area all, 100 detections per image,
    101 recall points) of detections (boxes x0, y0, x1, y1; scores; classes per image) against box lists [m, 5]
    (class, x0, y0, x1, y1)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b: torch.Tensor) -> list[float]:
        x0, y0, x1, y1 = b.tolist()
        return [x0, y0, x1 - x0, y1 - y0]

    annotations = []
    for i, truth in enumerate(truths):
        for t in truth:
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(t[0]),
                                "bbox": xywh(t[1:]), "area": float((t[3] - t[1]) * (t[4] - t[2])), "iscrowd": 0})
    classes = sorted({a["category_id"] for a in annotations})
    results = [{"image_id": i, "category_id": int(c), "bbox": xywh(b), "score": float(s)}
               for i, (boxes, scores, labels) in enumerate(found) for b, s, c in zip(boxes, scores, labels)]
    with contextlib.redirect_stdout(io.StringIO()):  # COCO prints its progress
        gt = COCO()
        gt.dataset = {"images": [{"id": i} for i in range(len(truths))], "annotations": annotations,
                      "categories": [{"id": c} for c in classes]}
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluation.params.iouThrs = np.array(ious)
        evaluation.evaluate()
        evaluation.accumulate()
    precision = evaluation.eval["precision"][:, :, :, 0, -1]  # [thresholds, recall points, classes]: area all,
    # 100 detections
    present = precision[:, :, (precision > -1).all((0, 1))]
    return float(present.mean()) if present.size else 0.0


def random_detections(seed: int, images: int = 24, classes: int = 3, jitter: float = 1.5) -> tuple[list, list]:
    """Detections and box lists on 56 px images: each box found with its corners moved by N(0, jitter) px (or, 1 in
    5, missed; 1 in 10 with a random class), plus up to 3 random false boxes per image, at random scores crowding
    near 0 and 1 as a detector's do."""
    g = torch.Generator().manual_seed(seed)
    found, truths = [], []
    for _ in range(images):
        k = int(torch.randint(1, 5, (), generator=g))
        xy = torch.rand(k, 2, generator=g) * 40
        truth = torch.cat([torch.randint(0, classes, (k, 1), generator=g).float(), xy,
                           xy + 4 + torch.rand(k, 2, generator=g) * 12], 1)
        keep = torch.rand(k, generator=g) < 0.8
        boxes = truth[keep, 1:] + torch.randn(int(keep.sum()), 4, generator=g) * jitter
        labels = torch.where(torch.rand(len(boxes), generator=g) < 0.9, truth[keep, 0].long(),
                             torch.randint(0, classes, (len(boxes),), generator=g))
        extra = int(torch.randint(0, 4, (), generator=g))
        corner = torch.rand(extra, 2, generator=g) * 40
        boxes = torch.cat([boxes, torch.cat([corner, corner + 4 + torch.rand(extra, 2, generator=g) * 12], 1)])
        found.append((boxes, torch.sigmoid(4 * torch.randn(len(boxes), generator=g)),
                      torch.cat([labels, torch.randint(0, classes, (extra,), generator=g)])))
        truths.append(truth)
    return found, truths
